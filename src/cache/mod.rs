//! The disk cache: lookup (hot tier, then disk), fill coalescing, commit, purge, the startup
//! rebuild and the budget. HTTP decisions (what to store, freshness) are `policy`'s; the
//! request path that uses this API is `proxy`'s.
//!
//! `Cache` is a facade over parts that own their state and their lock: [`coalesce`] (the fill
//! lock), [`tiers`] (the hot and open tiers, descriptor relief, records beside the index) and
//! [`vary`] (the headers each URL varies on). The lock order is written on [`Cache`].
//!
//! Fail open: every storage error is counted and logged, and the request goes on to the app.

pub mod admit;
pub mod budget;
pub mod coalesce;
pub mod evict;
pub mod fileio;
pub mod fill;
pub mod index;
pub mod key;
pub mod meta;
pub mod store;
pub mod tiers;
pub mod vary;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::metrics as m;
use budget::Reservation;
use fill::{Fill, FillState, HashingWriter, Source, TeeMsg};
use index::{Entry, Index, Removed};
use key::{CacheKey, Digest, KeyHash};
use meta::Meta;
use store::{Store, StoreError};
use tiers::{HotObject, Tier};

pub use coalesce::{Claim, FillPermit, InFlight, Waited};

/// Bodies smaller than this are read into memory; larger ones are mapped, and the mapping is
/// never read on the way out: connections send its slices from the file with `sendfile`.
const MIN_MMAP: u64 = 64 << 10;
/// A fill writes what its upstream has ready in steps of up to this many bytes.
const WRITE_BATCH: usize = 256 << 10;
/// Unknown-length fills reserve budget in steps of this many bytes.
const TEE_STEP: u64 = 1 << 20;

/// What the index says an object file holds.
#[derive(Clone, Copy)]
struct Expected {
    /// Body length: the file's first bytes.
    len: u64,
    /// Record and footer after the body.
    tail_len: u64,
    digest: Digest,
    /// Hashed since startup, when its file had `mtime`.
    verified: bool,
    mtime: u64,
    /// Mapped from this size, read below it.
    min_mmap: u64,
}

/// An object file opened for a hit.
struct Opened {
    body: Bytes,
    /// Its record, when asked for.
    record: Option<Meta>,
    /// Whether the body is what its digest says.
    intact: bool,
    mtime: u64,
}

/// Opens an object: its body (read, or mapped from `min_mmap` bytes), its record when
/// `want_record` (read in the same `pread` as a body that is read), whether the body is intact,
/// and the file's mtime. With `nowait`, `Ok(None)` when that would wait for the disk or needs
/// hashing.
fn open_object(
    path: &std::path::Path,
    expect: Expected,
    want_record: bool,
    nowait: bool,
) -> Result<Option<Opened>, StoreError> {
    let io = |op: &'static str| {
        move |source| StoreError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    };
    let file = fileio::open_for_read(path).map_err(io("open"))?;
    let file_len = expect.len + expect.tail_len;
    let mapped = expect.len > 0 && expect.len >= expect.min_mmap;
    // A mapped body's record is read on its own, before the mapping is made.
    let mut record = match want_record && mapped {
        true => match store::read_record(&file, expect.len, expect.tail_len, nowait).map_err(io("read"))? {
            Some(meta) => Some(meta),
            None => return Ok(None),
        },
        false => None,
    };
    let extra = if want_record { expect.tail_len } else { 0 };
    let Some((mut body, mtime)) =
        crate::zerocopy::map_body(file, expect.len, file_len, extra, expect.min_mmap, nowait).map_err(io("map"))?
    else {
        return Ok(None);
    };
    if want_record && !mapped {
        record = Some(store::decode_tail(&body[expect.len as usize..]).map_err(io("decode"))?);
        body.truncate(expect.len as usize);
    }
    // Hashed before it is served when it is from before a restart, or when its file changed
    // since it was written or checked (object files are never rewritten in place).
    let intact = if expect.verified && mtime == expect.mtime {
        true
    } else if nowait {
        return Ok(None);
    } else {
        Digest::from(blake3::hash(&body)) == expect.digest
    };
    Ok(Some(Opened {
        body,
        record,
        intact,
        mtime,
    }))
}

/// Creates a fill's object file, pre-allocated to `len` bytes, off the event loop: allocating
/// an inode can take long (ext4 scans past recently deleted ones, which an evicting cache makes
/// many of) and would stall every connection on the loop.
async fn create_tmp_object(store: Arc<Store>, generation: u64, len: u64) -> Result<store::Tmp, StoreError> {
    tokio::task::spawn_blocking(move || {
        let tmp = store.create_tmp_object(generation)?;
        match fileio::preallocate(&tmp.file, len) {
            Ok(()) => Ok(tmp),
            Err(source) => {
                tmp.discard();
                Err(StoreError::Io {
                    op: "allocate",
                    path: tmp.describe(),
                    source,
                })
            }
        }
    })
    .await
    .unwrap_or_else(|e| {
        Err(StoreError::Io {
            op: "create",
            path: "(blocking task)".into(),
            source: std::io::Error::other(e),
        })
    })
}

/// A stored response ready to serve.
pub struct Hit {
    /// Its metadata.
    pub meta: Arc<Meta>,
    /// Its whole body (memory or a mapping of the file).
    pub body: Bytes,
}

/// What to purge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Purge {
    /// Everything.
    All,
    /// One URL: a path (any host) or a full `http://host/path` URL; the query is part of it.
    Url(String),
    /// Every URL whose path (or full URL) starts with this.
    Prefix(String),
}

/// The cache: a facade over parts that each own their state behind one lock (the budget with
/// the index, the tiers, the flights, the vary specs).
///
/// # Lock order
///
/// No std lock is held across an `.await`. The one lock held across an `.await` is the tiers'
/// `relieving`, a tokio mutex, for the length of a relief. The only nestings, each written
/// "held -> taken meanwhile"; none is ever taken the other way round, so there is no cycle:
///
/// - `budget` -> `index` (both [`budget::Budget`]'s): `Budget::limits` recomputes the budget
///   from the index's usage while holding `budget` (it also asks the filesystem for its free
///   space then).
/// - `index`: held for index work only, a leaf otherwise. The tiers, the flights and the vary
///   specs are asked before or after it, never under it: `lookup` copies its entry out and
///   lets go before it asks a tier, and checks the index again after a tier insert, under no
///   other lock. A `Reservation` locks it when dropped, and `charge` locks it: no reservation
///   is dropped, and `charge` is not called, while it is held (a std mutex is not reentrant).
/// - `tiers` (`tiers::Tiers`): `relieving` (tokio) -> `open_shortage` -> the moka caches'
///   internal locks (hot, open, metas: leaves, no eviction listener calls back).
/// - `flights` ([`coalesce::Flights`]) -> a flight's own watch channel (read to skip a released
///   flight). `claim` picks the variant (taking and letting go of `vary`) before it.
/// - `vary` (`vary::VarySpecs`): a leaf.
/// - A fill's own locks (`fill::Fill`'s chunks and progress) are leaves, as are the metrics
///   recorder's (counters are bumped under `flights` and gauges set under `budget`).
pub struct Cache {
    config: Arc<Config>,
    store: OnceLock<Arc<Store>>,
    /// The budget and the index that counts it (their locks: `budget` -> `index`).
    budget: Arc<budget::Budget>,
    /// The hot and open tiers and the records cached beside the index.
    tiers: tiers::Tiers,
    /// The fills in progress that requests for the same key wait on.
    flights: Arc<coalesce::Flights>,
    /// For URLs whose responses vary: the request headers that pick the variant.
    vary: vary::VarySpecs,
    /// Set once the startup rebuild is complete.
    loaded: AtomicBool,
}

/// Where a fill's bytes are kept until its commit.
enum Staged {
    /// In a file, written and hashed up to a point (the hasher's state is large: boxed).
    File(store::Tmp, Box<HashingWriter>),
    /// In memory (a small body, shared with its readers): the commit creates the file.
    Memory,
}

impl Staged {
    fn describe(&self) -> std::path::PathBuf {
        match self {
            Staged::File(tmp, _) => tmp.describe(),
            Staged::Memory => "(in memory)".into(),
        }
    }

    fn discard(&self) {
        if let Staged::File(tmp, _) = self {
            tmp.discard();
        }
    }
}

impl Cache {
    /// Opens the cache directory and starts the background rebuild of the index. A directory
    /// that cannot be used leaves the cache off (fail open); [`Cache::retry_open`] tries again.
    pub fn open(config: Arc<Config>) -> Arc<Cache> {
        let tiers = tiers::Tiers::from_config(&config);
        let cache = Arc::new(Cache {
            budget: Arc::new(budget::Budget::new(budget::Limits::from_config(&config))),
            config,
            store: OnceLock::new(),
            tiers,
            flights: Arc::new(coalesce::Flights::new()),
            vary: vary::VarySpecs::new(),
            loaded: AtomicBool::new(false),
        });
        cache.retry_open();
        cache
    }

    /// Opens the store if it is not open yet, then rebuilds the index in the background.
    pub fn retry_open(self: &Arc<Self>) {
        if self.store.get().is_some() {
            return;
        }
        match Store::open(&self.config.cache_dir) {
            Ok(store) => {
                // Before anything is found or reserved: every size is charged in this unit.
                self.budget.set_unit(store.unit());
                let store = Arc::new(store);
                if self.store.set(store.clone()).is_ok() {
                    self.budget.set_disk(store);
                    info!(dir = %self.config.cache_dir.display(), "cache directory ready");
                    let cache = self.clone();
                    tokio::task::spawn_blocking(move || cache.rebuild());
                }
            }
            Err(e) => {
                metrics::counter!(m::STORAGE_ERRORS, "kind" => e.kind()).increment(1);
                warn!(error = %e, "cache disabled until the directory is usable; serving from the app");
            }
        }
    }

    /// The configuration the cache runs on.
    pub fn config(&self) -> &Config {
        &self.config
    }

    fn store(&self) -> Option<Arc<Store>> {
        self.store.get().cloned()
    }

    /// True once the startup index rebuild is complete.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// (objects, bytes used, bytes reserved).
    pub fn stats(&self) -> (usize, u64, u64) {
        self.budget.stats()
    }

    /// What wakes the eviction loop.
    pub fn evict_wakeup(&self) -> &Notify {
        self.budget.evict_wakeup()
    }

    fn lock_index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.budget.lock_index()
    }

    /// Looks a key up: the index, then the hot or open tier its size belongs in, then disk.
    /// Any storage problem removes the entry and reads as a miss.
    pub async fn lookup(&self, key: &CacheKey, req: &http::HeaderMap) -> Option<Hit> {
        let store = self.store()?;
        let hash = self.vary.variant_of(key, req);
        let (meta_gen, tail_len, digest, body_len, verified, known_mtime) = {
            let mut ix = self.lock_index();
            let e = ix.touch(&hash)?;
            if &*e.key != key.as_str() {
                return None;
            }
            (e.generation, e.tail_len, e.digest, e.body_len, e.verified, e.mtime)
        };
        let tier = self.tiers.tier_for(body_len);
        if let Some(Tier { objects: tier, .. }) = tier
            && let Some(obj) = tier.get(&hash)
        {
            if obj.meta_gen == meta_gen && obj.meta.key == *key && obj.still_valid() {
                return Some(Hit {
                    meta: obj.meta.clone(),
                    body: obj.body.clone(),
                });
            }
            // Another version of the key (one that raced a replacement in), or changed
            // underneath: the disk path checks the file again (and drops it).
            tier.invalidate(&hash);
        }
        // Whether its tier takes it after this hit, and so from what size it is mapped.
        let tier = tier.filter(|t| t.doorkeeper.admit(&hash, t.weight) && self.tiers.has_room(t));
        let cached = self.tiers.meta(&hash, meta_gen);
        let path = store.object_path(&hash, meta_gen);
        let min_mmap = tier.as_ref().map_or(MIN_MMAP, |t| t.map_from);
        let expect = Expected {
            len: body_len,
            tail_len,
            digest,
            verified,
            mtime: known_mtime,
            min_mmap,
        };
        let want_record = cached.is_none();
        // Inline when the page cache has it and nothing needs hashing; else off the runtime.
        let opened = match open_object(&path, expect, want_record, true) {
            Ok(None) => {
                tokio::task::spawn_blocking(move || {
                    open_object(&path, expect, want_record, false).map(|o| o.expect("a blocking open always answers"))
                })
                .await
            }
            other => Ok(other.map(|o| o.expect("answered"))),
        };
        let opened = self.or_drop(opened, &hash, meta_gen).await?;
        let meta = match (cached, opened.record) {
            (Some(meta), _) => meta,
            (None, Some(meta)) => {
                if meta.key != *key || meta.digest != digest || meta.body_len != body_len {
                    self.drop_corrupt(&hash, meta_gen, "record does not match the index")
                        .await;
                    return None;
                }
                let meta = Arc::new(meta);
                let held_open = tier.as_ref().is_some_and(|t| t.open);
                self.tiers.remember_meta(hash, meta_gen, &meta, held_open);
                meta
            }
            // (A record is read whenever none is cached.)
            (None, None) => return None,
        };
        let (body, mtime) = (opened.body, opened.mtime);
        if !opened.intact {
            self.drop_corrupt(&hash, meta_gen, "body hash mismatch").await;
            return None;
        }
        if mtime != known_mtime || !verified {
            self.lock_index().mark_verified(&hash, meta_gen, mtime);
        }
        if let Some(Tier { objects: tier, .. }) = tier {
            tier.insert(
                hash,
                Arc::new(HotObject {
                    meta: meta.clone(),
                    meta_gen,
                    body: body.clone(),
                    // `map_body` maps exactly the non-empty bodies of `min_mmap` bytes and more.
                    mapped_mtime: (body_len > 0 && body_len >= min_mmap).then_some(mtime),
                }),
            );
            // Evicted, purged or replaced while this lookup read it: `forget` may have run
            // before the insert. A tier must not keep it (nor its descriptor).
            if self.lock_index().peek(&hash).map(|e| e.generation) != Some(meta_gen) {
                tier.invalidate(&hash);
            }
        }
        Some(Hit { meta, body })
    }

    /// The value of a blocking storage step of a lookup; a storage error drops the entry (the
    /// request then goes to the app) and reads as `None`.
    async fn or_drop<T>(
        &self,
        result: Result<Result<T, StoreError>, tokio::task::JoinError>,
        hash: &KeyHash,
        meta_gen: u64,
    ) -> Option<T> {
        match result {
            Ok(Ok(value)) => Some(value),
            Ok(Err(e)) => {
                self.storage_error(&e);
                // Out of descriptors or memory says nothing about the object: keep it.
                if !e.is_exhaustion() {
                    self.drop_entry(hash, meta_gen).await;
                }
                None
            }
            Err(_) => None,
        }
    }

    fn storage_error(&self, e: &StoreError) {
        metrics::counter!(m::STORAGE_ERRORS, "kind" => e.kind()).increment(1);
        warn!(error = %e, "storage error; serving from the app");
        if e.is_exhaustion() {
            self.relieve_descriptors();
        }
    }

    /// The process ran out of descriptors (or of memory mappings): the open tier closes half
    /// the files it holds for a while (`tiers::Tiers::relieve_descriptors`). Called where a
    /// shortage shows: an `accept`, a connection to the app, a cache file.
    pub fn relieve_descriptors(&self) {
        self.tiers.relieve_descriptors();
    }

    /// [`Cache::relieve_descriptors`], returning once the files are closed.
    pub async fn relieve_descriptors_now(&self) {
        self.tiers.relieve_descriptors_now().await;
    }

    async fn drop_corrupt(&self, hash: &KeyHash, meta_gen: u64, why: &'static str) {
        metrics::counter!(m::CORRUPT_OBJECTS).increment(1);
        warn!(key = %hash, reason = why, "corrupt object removed");
        self.drop_entry(hash, meta_gen).await;
    }

    /// Removes a key's entry if it is still the given version.
    async fn drop_entry(&self, hash: &KeyHash, meta_gen: u64) {
        let removed = {
            let mut ix = self.lock_index();
            match ix.peek(hash) {
                Some(e) if e.generation == meta_gen => ix.remove(hash),
                _ => None,
            }
        };
        self.tiers.forget(hash);
        if let Some(r) = removed {
            self.unlink(vec![r]).await;
        }
    }

    /// Claims a key: become its fetcher, or wait on the request that is.
    pub fn claim(&self, key: &CacheKey, req: &http::HeaderMap) -> Claim {
        let hash = self.vary.variant_of(key, req);
        self.flights.claim(hash)
    }

    /// Whether responses for this URL vary (some variant may be stored).
    pub fn varies(&self, key: &CacheKey) -> bool {
        self.vary.varies(key)
    }

    /// The disk budget in force: `max_size`, lowered when the filesystem is short of
    /// `min_free` (checked at most once a second).
    pub fn budget(&self) -> u64 {
        self.budget.budget()
    }

    /// The budget and the object bound in force ([`budget::Budget::limits`]).
    fn limits(&self) -> (u64, u64) {
        self.budget.limits()
    }

    /// What a file of `len` bytes is charged against the budget.
    fn charge(&self, len: u64) -> u64 {
        self.budget.charge(len)
    }

    /// Reserves `bytes` (as charged) and `objects` (0 or 1) for a fill, making room when they
    /// do not fit: this cache forgets and removes the victims ([`budget::Budget::reserve_room`]).
    async fn reserve_room(self: &Arc<Self>, bytes: u64, objects: u64) -> Result<Reservation, &'static str> {
        self.budget.reserve_room(bytes, objects, self).await
    }

    /// Reserves `bytes` and one object for a new fill; a refusal is counted by its reason
    /// (`budget`, `objects` or `room`). The object is given back by the commit (or
    /// [`Cache::release_fill`]).
    async fn reserve_fill(self: &Arc<Self>, bytes: u64) -> Option<Reservation> {
        match self.reserve_room(bytes, 1).await {
            Ok(reservation) => Some(reservation),
            Err(reason) => {
                metrics::counter!(m::FILLS_ABORTED, "reason" => reason).increment(1);
                None
            }
        }
    }

    /// Gives back what [`Cache::reserve_fill`] (and later reservations) took for a fill that
    /// will not be committed.
    fn release_fill(&self, bytes: u64) {
        self.budget.release_fill(bytes);
    }

    /// Starts filling `meta.key` with `body` (exactly `meta.body_len` bytes). On success the
    /// waiters are told to read along and the fill runs on its own task; otherwise the body is
    /// handed back, unread, to be relayed uncached.
    pub async fn start_fill<S: Source>(
        self: &Arc<Self>,
        mut permit: FillPermit,
        meta: Meta,
        body: S,
    ) -> Result<Arc<Fill>, (FillPermit, S)> {
        let Some(store) = self.store() else {
            return Err((permit, body));
        };
        let len = meta.body_len;
        // The whole file: the record's length is known from the head (its fields that depend
        // on the body have a fixed width).
        let file_len = len + store::tail_len(&meta);
        let reservation = self.charge(file_len);
        if len > self.config.max_object_size {
            metrics::counter!(m::FILLS_ABORTED, "reason" => "budget").increment(1);
            return Err((permit, body));
        }
        // Its waiters wait while it makes room: no longer than they wait for it.
        let Some(reserved) = self.reserve_fill(reservation).await else {
            return Err((permit, body));
        };
        let generation = store.next_gen();
        let staged = if Fill::deferred(len) {
            Staged::Memory
        } else {
            match create_tmp_object(store, generation, file_len).await {
                Ok(tmp) => {
                    let writer = Box::new(HashingWriter::new(tmp.file.clone()));
                    Staged::File(tmp, writer)
                }
                Err(e) => {
                    drop(reserved);
                    self.storage_error(&e);
                    metrics::counter!(m::FILLS_ABORTED, "reason" => "storage").increment(1);
                    return Err((permit, body));
                }
            }
        };
        metrics::counter!(m::FILLS_STARTED).increment(1);
        let file = match &staged {
            Staged::File(tmp, _) => Some(tmp.file.clone()),
            Staged::Memory => None,
        };
        let fill = Fill::new(Arc::new(meta), file);
        permit.stream(fill.clone());
        let cache = self.clone();
        let task_fill = fill.clone();
        let reservation = reserved.keep();
        tokio::spawn(async move {
            let ok = cache.run_fill(&task_fill, body, generation, staged, reservation).await;
            task_fill.finish(if ok { FillState::Complete } else { FillState::Failed });
            // Unpublishes the finished flight.
            drop(permit);
        });
        Ok(fill)
    }

    async fn run_fill<S: Source>(
        self: &Arc<Self>,
        fill: &Arc<Fill>,
        mut body: S,
        generation: u64,
        mut staged: Staged,
        reserved: u64,
    ) -> bool {
        let len = fill.meta.body_len;
        let mut failure = None;
        let mut received = 0u64;
        // Received, not written yet: what the commit writes (all of a body kept in memory).
        let mut last = Vec::new();
        while let Some(batch) = body.next_batch(WRITE_BATCH).await {
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    failure = Some(("upstream", e.to_string()));
                    break;
                }
            };
            let size: u64 = batch.iter().map(|c| c.len() as u64).sum();
            if received + size > len {
                failure = Some(("upstream", "body longer than its Content-Length".to_owned()));
                break;
            }
            received += size;
            metrics::counter!(m::UPSTREAM_BYTES).increment(size);
            if fill.is_shared() {
                // Readers send these buffers, not the file's bytes: they need not wait for the
                // write. The batch that completes the body is written by the commit, in the
                // same trip off the runtime.
                fill.advance(received, &batch);
                if received == len {
                    last.extend(batch);
                    break;
                }
            }
            let writer = match &mut staged {
                Staged::File(_, writer) => writer,
                Staged::Memory => {
                    last.extend(batch);
                    continue;
                }
            };
            match writer.write(batch).await {
                // Readers of a file-backed fill read the file: no chunks to hand over.
                Ok(written) if !fill.is_shared() => fill.advance(written, &[]),
                Ok(_) => {}
                Err(source) => {
                    let err = StoreError::Io {
                        op: "write",
                        path: staged.describe(),
                        source,
                    };
                    self.storage_error(&err);
                    failure = Some(("storage", err.to_string()));
                    break;
                }
            }
        }
        if failure.is_none() && received != len {
            failure = Some(("truncated", format!("upstream body ended at {received} of {len} bytes")));
        }
        if let Some((reason, detail)) = failure {
            debug!(reason, detail = %detail, "fill discarded");
            metrics::counter!(m::FILLS_ABORTED, "reason" => reason).increment(1);
            staged.discard();
            self.release_fill(reserved);
            return false;
        }
        let meta = (*fill.meta).clone();
        self.commit(meta, staged, last, generation, reserved).await
    }

    /// Makes a finished object durable and visible, in one trip off the runtime: writes the
    /// `last` chunks after what was staged in a file (or, for a body kept in memory, creates
    /// the file and writes it all), then the record and footer, and links the file into place.
    async fn commit(
        self: &Arc<Self>,
        mut meta: Meta,
        staged: Staged,
        last: Vec<Bytes>,
        generation: u64,
        reserved: u64,
    ) -> bool {
        let Some(store) = self.store() else {
            staged.discard();
            self.release_fill(reserved);
            return false;
        };
        let (tmp, mut hasher, at) = match staged {
            Staged::File(tmp, writer) => match writer.into_parts() {
                Some((hasher, at)) => (Some(tmp), hasher, at),
                None => {
                    tmp.discard();
                    self.release_fill(reserved);
                    return false;
                }
            },
            Staged::Memory => (None, blake3::Hasher::new(), 0),
        };
        let hash = meta.storage_hash();
        let len = meta.body_len;
        // Versions are taken at commit: of two fills of a key, the one committed last is the
        // newest, now and after a restart.
        let version = store.next_gen();
        let written = tokio::task::spawn_blocking(move || -> Result<(Meta, u64, u64), StoreError> {
            for chunk in &last {
                hasher.update(chunk);
            }
            meta.digest = Digest::from(hasher.finalize());
            let tail = store::tail(&meta);
            let tmp = match tmp {
                Some(tmp) => tmp,
                None => store.create_tmp_object(generation)?,
            };
            let mut parts: Vec<&[u8]> = last.iter().map(|c| &c[..]).collect();
            parts.push(&tail);
            if let Err(source) = fileio::write_all_at(&tmp.file, &parts, at) {
                tmp.discard();
                return Err(StoreError::Io {
                    op: "write",
                    path: tmp.describe(),
                    source,
                });
            }
            let mtime = store
                .place_object(&tmp, &hash, version)
                .inspect_err(|_| tmp.discard())?;
            Ok((meta, tail.len() as u64, mtime))
        })
        .await;
        let (meta, tail_len, mtime) = match written {
            Ok(Ok(done)) => done,
            failed => {
                if let Ok(Err(e)) = failed {
                    self.storage_error(&e);
                }
                self.release_fill(reserved);
                metrics::counter!(m::FILLS_ABORTED, "reason" => "storage").increment(1);
                return false;
            }
        };
        let entry = Entry {
            key: meta.key.as_str().into(),
            generation: version,
            body_len: len,
            tail_len,
            digest: meta.digest,
            verified: true,
            mtime,
        };
        let removed = {
            let mut ix = self.lock_index();
            let removed = ix.insert(hash, entry, reserved);
            // The object is indexed now: no longer a reservation.
            ix.release_object();
            removed
        };
        self.vary.remember(&meta);
        let held_open = self.tiers.open_tier_size(meta.body_len);
        self.tiers.remember_meta(hash, version, &Arc::new(meta), held_open);
        if let Some(r) = removed {
            // The tiers can only hold what the index held: a new key has nothing to forget.
            self.tiers.forget_tiers(&hash);
            self.unlink(vec![r]).await;
        }
        metrics::counter!(m::FILLS_COMPLETED).increment(1);
        true
    }

    /// Fills `meta.key` from a body of unknown length that is streamed to one client, which
    /// sends a copy of each chunk to the returned sender (`None`: the cache is off). The copy to
    /// disk is dropped if it grows past `max_object_size`, falls behind, or the budget is full.
    pub fn tee_fill(self: &Arc<Self>, meta: Meta) -> Option<mpsc::Sender<TeeMsg>> {
        let store = self.store()?;
        let generation = store.next_gen();
        let (tx, mut rx) = mpsc::channel::<TeeMsg>(256);
        let cache = self.clone();
        tokio::spawn(async move {
            // Without an object to fill or a file, the receiver goes away and the client's
            // body is left alone. Bytes are reserved as they come, making room as a fill of a
            // known length does; the client is not held back meanwhile (a copy that falls
            // behind is dropped).
            let Some(mut reserved) = cache.reserve_fill(0).await else {
                return;
            };
            let Ok(tmp) = create_tmp_object(store, generation, 0).await else {
                return;
            };
            metrics::counter!(m::FILLS_STARTED).increment(1);
            let mut writer = HashingWriter::new(tmp.file.clone());
            let mut refused = None;
            let mut ended = false;
            while let Some(msg) = rx.recv().await {
                // What is queued already goes to disk in the same step.
                let (mut batch, mut last) = (Vec::new(), false);
                let mut next = Some(msg);
                while let Some(msg) = next.take() {
                    match msg {
                        TeeMsg::Data(c) => batch.push(c),
                        TeeMsg::End => last = true,
                    }
                    if !last && batch.len() < 64 {
                        next = rx.try_recv().ok();
                    }
                }
                let size: u64 = batch.iter().map(|c| c.len() as u64).sum();
                if writer.written() + size > cache.config.max_object_size {
                    refused = Some("budget");
                    break;
                }
                let need = cache.charge(writer.written() + size);
                if need > reserved.bytes {
                    let step = (need - reserved.bytes).max(TEE_STEP);
                    match cache.reserve_room(step, 0).await {
                        Ok(more) => reserved.absorb(more),
                        Err(reason) => {
                            refused = Some(reason);
                            break;
                        }
                    }
                }
                if writer.write(batch).await.is_err() {
                    break;
                }
                if last {
                    // Only a clean end with every byte written makes the copy complete.
                    ended = true;
                    break;
                }
            }
            let written = writer.written();
            let mut meta = meta;
            meta.body_len = written;
            let need = cache.charge(written + store::tail_len(&meta));
            if ended && need > reserved.bytes {
                match cache.reserve_room(need - reserved.bytes, 0).await {
                    Ok(more) => reserved.absorb(more),
                    Err(reason) => refused = Some(reason),
                }
            }
            if !ended || refused.is_some() {
                let reason = refused.unwrap_or("incomplete");
                metrics::counter!(m::FILLS_ABORTED, "reason" => reason).increment(1);
                tmp.discard();
                drop(reserved);
                return;
            }
            let reserved = reserved.keep();
            cache
                .commit(
                    meta,
                    Staged::File(tmp, Box::new(writer)),
                    Vec::new(),
                    generation,
                    reserved,
                )
                .await;
        });
        Some(tx)
    }

    /// Stores a revalidated response's refreshed head (RFC 9111 §4.3.4): a new version of the
    /// object, its body copied from the stored one inside the kernel (`copy_file_range`: a
    /// reflink where the filesystem shares extents) and the new record after it. Returns false
    /// if it could not be stored (the caller still serves).
    pub async fn refresh(self: &Arc<Self>, meta: Meta) -> bool {
        let Some(store) = self.store() else { return false };
        let hash = meta.storage_hash();
        let tail = store::tail(&meta);
        let file_len = meta.body_len + tail.len() as u64;
        let Ok(reserved) = self.reserve_room(self.charge(file_len), 1).await else {
            return false;
        };
        let reserved = reserved.keep();
        let from = match self.lock_index().peek(&hash) {
            Some(e) if e.digest == meta.digest && e.body_len == meta.body_len => (e.generation, e.verified),
            // Evicted or replaced meanwhile: nothing to refresh.
            _ => {
                self.release_fill(reserved);
                return false;
            }
        };
        let version = store.next_gen();
        let blocking_store = store.clone();
        let len = meta.body_len;
        let written = tokio::task::spawn_blocking(move || -> Result<u64, StoreError> {
            let source = store.object_path(&hash, from.0);
            let old = fileio::open_for_read(&source).map_err(|source_err| StoreError::Io {
                op: "open",
                path: source.clone(),
                source: source_err,
            })?;
            let tmp = blocking_store.create_tmp_object(version)?;
            let copied =
                fileio::copy_range(&old, &tmp.file, len).and_then(|()| fileio::write_all_at(&tmp.file, &[&tail], len));
            if let Err(e) = copied {
                tmp.discard();
                return Err(StoreError::Io {
                    op: "copy",
                    path: source,
                    source: e,
                });
            }
            blocking_store
                .place_object(&tmp, &hash, version)
                .inspect_err(|_| tmp.discard())
        })
        .await;
        let mtime = match written {
            Ok(Ok(mtime)) => mtime,
            failed => {
                if let Ok(Err(e)) = &failed {
                    self.storage_error(e);
                }
                self.release_fill(reserved);
                return false;
            }
        };
        let entry = Entry {
            key: meta.key.as_str().into(),
            generation: version,
            body_len: meta.body_len,
            tail_len: file_len - meta.body_len,
            digest: meta.digest,
            // The copy is what the source was: checked only if that was.
            verified: from.1,
            mtime,
        };
        let removed = {
            let mut ix = self.lock_index();
            let removed = ix.insert(hash, entry, reserved);
            ix.release_object();
            removed
        };
        self.tiers.forget(&hash);
        let held_open = self.tiers.open_tier_size(meta.body_len);
        self.tiers.remember_meta(hash, version, &Arc::new(meta), held_open);
        if let Some(r) = removed {
            self.unlink(vec![r]).await;
        }
        true
    }

    /// Removes whatever is stored for one full key (RFC 9111 §4.4 invalidation). A key
    /// without `Vary` variants is one index lookup; anyone may send the unsafe requests that
    /// invalidate, so only keys with variants (stored under hashes of their own) scan the index.
    pub async fn invalidate(&self, key: &CacheKey) -> usize {
        if self.varies(key) {
            return self.purge(&Purge::Url(key.as_str().to_owned())).await;
        }
        let removed: Vec<Removed> = {
            let mut ix = self.lock_index();
            let hash = key.hash();
            // The hash is the key's own (not a variant's): check it names this key.
            match ix.peek(&hash) {
                Some(e) if *e.key == *key.as_str() => ix.remove(&hash).into_iter().collect(),
                _ => Vec::new(),
            }
        };
        self.finish_purge(removed).await
    }

    /// Purges matching objects; returns how many.
    pub async fn purge(&self, what: &Purge) -> usize {
        let matches = |e: &Entry| -> bool {
            let full = &*e.key;
            let pq = key::path_and_query(full);
            match what {
                Purge::All => true,
                Purge::Url(u) if u.contains("://") => full == u,
                Purge::Url(u) => pq == u,
                Purge::Prefix(p) if p.contains("://") => full.starts_with(p.as_str()),
                Purge::Prefix(p) => pq.starts_with(p.as_str()),
            }
        };
        let removed: Vec<Removed> = {
            let mut ix = self.lock_index();
            let keys = ix.keys_where(matches);
            keys.iter().filter_map(|k| ix.remove(k)).collect()
        };
        self.finish_purge(removed).await
    }

    /// Forgets and unlinks objects taken out of the index; how many.
    async fn finish_purge(&self, removed: Vec<Removed>) -> usize {
        for r in &removed {
            self.tiers.forget(&r.key);
        }
        let n = removed.len();
        self.unlink(removed).await;
        metrics::counter!(m::PURGED_OBJECTS).increment(n as u64);
        self.publish_gauges();
        n
    }

    /// Updates the size gauges.
    pub fn publish_gauges(&self) {
        let (objects, used, reserved) = self.stats();
        metrics::gauge!(m::CACHE_OBJECTS).set(objects as f64);
        metrics::gauge!(m::CACHE_SIZE).set(used as f64);
        metrics::gauge!(m::CACHE_RESERVED).set(reserved as f64);
        self.tiers.publish_gauges();
    }

    /// Rebuilds the index from disk (blocking; runs on a blocking thread at startup): every
    /// object file's record is read from its end; the newest version of each key is indexed,
    /// older ones and files that are torn, corrupt or not ours are removed. Bodies are not
    /// read here: each is hashed before its first use.
    fn rebuild(self: Arc<Self>) {
        let Some(store) = self.store() else { return };
        let started = Instant::now();
        if store.remove_old_layouts() > 0 {
            info!("cache directory of an earlier layout version removed");
        }
        let mut found = store.scan_objects();
        let bytes: u64 = found.iter().map(|f| self.charge(f.len)).sum();
        self.lock_index().add_unindexed(bytes, found.len() as u64);
        self.budget.set_accounted();

        // Oldest first, so the most recently stored end up most recently used.
        found.sort_by_key(|f| f.generation);
        let mut loaded = 0u64;
        let mut corrupt = 0u64;
        for f in found {
            // From here it is indexed, removed, or counted by its own fill.
            self.lock_index().forget_unindexed_objects(1);
            let charged = self.charge(f.len);
            if store.is_own(f.generation) {
                // Written since startup: indexed by its fill.
                self.lock_index().forget_unindexed(charged);
                continue;
            }
            let path = store.object_path(&f.id, f.generation);
            let read = fileio::open_for_read(&path).and_then(|file| store::read_found(&file, f.len));
            let meta = match read {
                Ok(meta) if meta.storage_hash() == f.id => meta,
                _ => {
                    // Torn, corrupt, foreign, or its body is not the length its record says.
                    corrupt += 1;
                    let _ = store.remove(&path);
                    self.lock_index().forget_unindexed(charged);
                    continue;
                }
            };
            let entry = Entry {
                key: meta.key.as_str().into(),
                generation: f.generation,
                body_len: meta.body_len,
                tail_len: f.len - meta.body_len,
                digest: meta.digest,
                verified: false,
                mtime: 0,
            };
            self.vary.remember(&meta);
            let removed = self.lock_index().insert_scanned(f.id, entry);
            if let Some(r) = removed {
                let _ = store.remove_object(&r.key, r.generation);
                self.lock_index().unlinked(r.bytes, 1);
            }
            loaded += 1;
            if loaded.is_multiple_of(10_000) {
                metrics::gauge!(m::INDEX_LOADED).set(loaded as f64);
            }
        }
        {
            let mut ix = self.lock_index();
            ix.forget_unindexed(u64::MAX);
            ix.forget_unindexed_objects(u64::MAX);
        }
        self.loaded.store(true, Ordering::Release);
        let secs = started.elapsed().as_secs_f64();
        metrics::gauge!(m::INDEX_LOADED).set(loaded as f64);
        metrics::counter!(m::CORRUPT_OBJECTS).increment(corrupt);
        metrics::gauge!(m::INDEX_REBUILD_SECONDS).set(secs);
        metrics::gauge!(m::INDEX_READY).set(1.0);
        self.publish_gauges();
        info!(objects = loaded, corrupt, seconds = secs, "cache index rebuilt");
        self.evict_wakeup().notify_one();
    }
}
