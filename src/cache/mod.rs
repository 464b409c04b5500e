//! The disk cache: lookup (hot tier, then disk), fill coalescing, commit, purge, the startup
//! rebuild and the budget. HTTP decisions (what to store, freshness) are `policy`'s; the
//! request path that uses this API is `proxy`'s.
//!
//! `Cache` is a facade (open, lookup, claim, purge and invalidate, delegation) over parts.
//! Parts that own their state and its lock: [`budget`] (the index and the limits in force;
//! reservations and room made on demand), [`coalesce`] (the fill lock), [`tiers`] (the hot
//! and open tiers, descriptor relief, records beside the index) and [`vary`] (the headers each
//! URL varies on), `variants` (the compressing queue and threads) and [`segments`] (the
//! segment files small objects are packed into, and the one thread that writes them). Steps
//! that own no state: `commit` (fill and commit, refresh, tee),
//! [`evict`] (the loop, its pass, the unlinking of what the index let go), `read` (the disk
//! side of a lookup) and `rebuild` (the startup rebuild). Beneath them: [`index`] (LRU order
//! and accounting), [`store`] (the layout, `body | record | footer` per object file),
//! [`meta`], [`key`], [`fill`], [`fileio`], [`admit`]. The lock order is written on [`Cache`].
//!
//! Fail open: every storage error is counted and logged, and the request goes on to the app.

pub mod admit;
pub mod budget;
pub mod coalesce;
mod commit;
pub mod evict;
pub mod fence;
pub mod fileio;
pub mod fill;
pub mod index;
pub mod key;
pub mod meta;
mod read;
mod rebuild;
pub mod segments;
mod settings;
pub mod store;
pub mod tags;
#[cfg(test)]
pub(crate) mod testing;
pub mod tiers;
mod variants;
pub mod vary;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::metrics as m;
use crate::negotiate::{Accepts, Coding};
use budget::Reservation;
use index::{Entry, Found, Image, Index, Removed};
use key::{CacheKey, KeyHash};
use meta::Meta;
use read::{Expected, Source, open_object, open_object_cached};
use segments::Segments;
use store::{Store, StoreError};
use tiers::Tier;

pub use coalesce::{Claim, FillPermit, InFlight, Waited};
pub use settings::Settings;

/// Bodies smaller than this are read into memory; larger ones are mapped, and the mapping is
/// never read on the way out: connections send its slices from the file with `sendfile`.
const MIN_MMAP: u64 = 64 << 10;

/// A stored response ready to serve.
pub struct Hit {
    /// Its metadata.
    pub meta: Arc<Meta>,
    /// Its whole body (memory or a mapping of the file): the identity body, or a compressed
    /// variant's.
    pub body: Bytes,
    /// The variant's coding; `None` for the identity body.
    pub coding: Option<Coding>,
    /// When this version was soft-purged, if it was: it counts as stale from then on
    /// ([`crate::policy::Freshness::soft_purged`]).
    pub soft_purged: Option<SystemTime>,
}

/// One stored body a lookup reads: an object's identity body or one of its compressed
/// variants, each an [`Image`] of its own.
struct Span {
    /// The variant's coding; `None` for the identity body.
    coding: Option<Coding>,
    /// The key it is held under in the hot and open tiers.
    tier_key: KeyHash,
    /// Its image: the object's, or the variant's (with its own version).
    image: Image,
}

/// The key a body is held under in the hot and open tiers: the key's hash (`hash`) for the
/// identity body, else one of its and the variant's `coding`.
fn tier_key(hash: KeyHash, coding: Option<Coding>) -> KeyHash {
    coding.map_or(hash, |c| tiers::variant_key(&hash, c))
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
    /// Every object carrying any of these tags (`Surrogate-Key`, `Cache-Tag`).
    Tags(Vec<String>),
}

impl Purge {
    /// Whether a stored key (`scheme://host/path?query`) is one this purge selects by its key
    /// (tags are looked up instead).
    pub fn matches(&self, full: &str) -> bool {
        let pq = key::path_and_query(full);
        match self {
            Purge::All => true,
            Purge::Url(u) if u.contains("://") => full == u,
            Purge::Url(u) => pq == u,
            Purge::Prefix(p) if p.contains("://") => full.starts_with(p.as_str()),
            Purge::Prefix(p) => pq.starts_with(p.as_str()),
            Purge::Tags(_) => false,
        }
    }

    /// The keys of the entries this purge selects: by the tag index for tags (the cost of
    /// the objects tagged, not of the index), else one pass over the index.
    fn select(&self, ix: &Index) -> Vec<KeyHash> {
        match self {
            Purge::Tags(tags) => ix.keys_tagged(tags),
            _ => ix.keys_where(|e| self.matches(&e.key)),
        }
    }
}

/// Most entries a purge takes out of the index in one hold of its lock.
pub const PURGE_BATCH: usize = 1024;

/// Most variants [`Cache::inspect`] reports.
pub const MAX_INSPECTED: usize = 100;

/// One stored version of a URL, as [`Cache::inspect`] finds it.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The full key (scheme, host, path and query).
    pub key: String,
    /// Its version (object file generation).
    pub generation: u64,
    /// Body bytes.
    pub body_len: u64,
    /// The object file's length (body, record, footer).
    pub file_len: u64,
    /// What the file is charged on disk (whole allocation units).
    pub charged: u64,
    /// Where a hit finds its body: `memory` (the hot tier), `open` (a file held open and
    /// mapped) or `disk`.
    pub tier: &'static str,
    /// Its tags.
    pub tags: Vec<String>,
    /// Lookups that found it since it was stored.
    pub hits: u32,
    /// When it was soft-purged, if it was.
    pub soft_purged: Option<SystemTime>,
    /// Its compressed variants: coding, coded body bytes, what the file is charged.
    pub variants: Vec<(Coding, u64, u64)>,
    /// Its record (`None` when the file could not be read).
    pub meta: Option<Arc<Meta>>,
}

/// Milliseconds since the epoch.
fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The cache: a facade over parts that each own their state behind one lock.
///
/// # Lock order
///
/// Who owns which lock: `budget::Budget` owns `budget` (the limits in force) and `index`
/// (std mutexes); `tiers::Tiers` owns `relieving` (tokio) and `open_shortage` (std), beside
/// the tiers' and the records' shard locks (quick_cache); `coalesce::Flights` owns `map`
/// (std); `vary::VarySpecs` owns `specs` (std). `commit`, `evict`, `read` and `rebuild` own none: they take the parts' locks one
/// step at a time. No std lock is held across an `.await`; the one lock held across an
/// `.await` is `relieving`, for the length of a relief. The only nestings ("held -> taken
/// meanwhile"), none ever the other way round, so there is no cycle:
///
/// - `budget` -> `index`: `Budget::limits` recomputes the limits from the index's usage while
///   holding `budget` (and asks the filesystem for its free space then).
/// - `index`: a leaf otherwise, held for index work only. No other part is asked under it:
///   `lookup` copies its entry out before it asks a tier and checks the index again after a
///   tier insert; the victims a reservation or a pass takes out are forgotten by the tiers and
///   unlinked after it is let go. A `Reservation` locks it when dropped, as does
///   `Budget::charge`: neither happens while it is held (a std mutex is not reentrant).
/// - `relieving` (tokio) -> `open_shortage` -> the tiers' and the records' shard locks (hot,
///   open, metas): leaves, no eviction listener calls back.
/// - `map` -> a flight's own watch channel (read to skip a released flight). `claim` picks
///   the variant (taking and letting go of `specs`) before it.
/// - `segments::Segments` owns `ops` (its writer's queue) and `table` (its segment files):
///   std mutexes, each a leaf, never held across an `.await` nor while another lock is taken.
///   Its writer thread takes no lock of any other part; a slot let go is punched by it, so
///   dropping a slot (under `index`, or anywhere) only queues a message.
/// - `specs`: a leaf. So are the compressor's `state` and CPU `budget` (`variants::Compressor`); its
///   threads take the budget's and index's locks one step at a time, like a fill.
/// - `specs`: a leaf.
/// - `marks_file` (tokio, held across the write of the soft-purge marks) -> `index` (the
///   marks are copied out under it, then it is let go before the write).
/// - `index` -> `fences` (`fence::Fences`, std, a leaf): a commit checks the purges made since
///   its request left while it inserts; a purge raises its fence before it takes `index`.
/// - A fill's own locks (`fill::Fill`'s chunks and progress) are leaves, as are the metrics
///   recorder's (counters are bumped under `map`, gauges set under `budget`).
pub struct Cache {
    settings: Settings,
    store: OnceLock<Arc<Store>>,
    /// Where small objects are packed, once the store is open (absent where the filesystem
    /// cannot punch holes: every object then has a file).
    segments: OnceLock<Option<Arc<Segments>>>,
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
    /// The queue and threads that make compressed variants.
    compressor: variants::Compressor,
    /// Serializes writes of the soft-purge marks file, so the last one written holds the
    /// newest marks.
    marks_file: tokio::sync::Mutex<()>,
    /// The purges a fill in flight must learn of when it commits.
    fences: fence::Fences,
}

impl Cache {
    /// Opens the cache directory and starts the background rebuild of the index. A directory
    /// that cannot be used leaves the cache off (fail open); [`Cache::retry_open`] tries again.
    pub fn open(settings: Settings) -> Arc<Cache> {
        let tiers = tiers::Tiers::from_settings(&settings);
        let compressor = variants::Compressor::new(&settings.compress);
        let cache = Arc::new(Cache {
            budget: Arc::new(budget::Budget::new(budget::Limits::from_settings(&settings))),
            settings,
            store: OnceLock::new(),
            segments: OnceLock::new(),
            tiers,
            flights: Arc::new(coalesce::Flights::new()),
            vary: vary::VarySpecs::new(),
            loaded: AtomicBool::new(false),
            compressor,
            marks_file: tokio::sync::Mutex::new(()),
            fences: fence::Fences::new(),
        });
        cache.start_compressor();
        cache.retry_open();
        cache
    }

    /// Opens the store if it is not open yet, then rebuilds the index in the background.
    pub fn retry_open(self: &Arc<Self>) {
        if self.store.get().is_some() {
            return;
        }
        match Store::open(&self.settings.cache_dir) {
            Ok(store) => {
                let store = Arc::new(store);
                let past_bound = self.budget.evict_wakeup().clone();
                let segments = match Segments::open(&store, self.settings.segments, past_bound) {
                    Ok(segments) => segments.map(Arc::new),
                    Err(e) => {
                        self.storage_error(&e);
                        None
                    }
                };
                // Before anything is found or reserved: every size is charged in this unit,
                // and names in directories only for the images that get a file.
                let files_from = if segments.is_some() { MIN_MMAP } else { 0 };
                self.budget.set_unit(store.unit(), files_from);
                let _ = self.segments.set(segments);
                if self.store.set(store.clone()).is_ok() {
                    self.budget.set_disk(store);
                    info!(dir = %self.settings.cache_dir.display(), "cache directory ready");
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

    /// The settings the cache runs on.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn store(&self) -> Option<Arc<Store>> {
        self.store.get().cloned()
    }

    /// The segments small objects are packed into, when there are.
    fn segments(&self) -> Option<&Arc<Segments>> {
        self.segments.get().and_then(Option::as_ref)
    }

    /// The segments an image with a body of `body_len` bytes goes to: a body small enough to
    /// be received whole in memory ([`fill::Fill::deferred`], under [`MIN_MMAP`]), when there
    /// are segments. A larger one gets a file of its own, mapped and sent with `sendfile`,
    /// where a file's own cost is small against its size.
    fn slotted(&self, body_len: u64) -> Option<&Arc<Segments>> {
        self.segments().filter(|_| fill::Fill::deferred(body_len))
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
    /// The body is the smallest compressed variant the request accepts when one is stored
    /// (never for a `Range` request: ranges are of the identity body), else the identity body.
    /// Any storage problem removes the entry and reads as a miss.
    pub async fn lookup(&self, key: &CacheKey, req: &http::HeaderMap) -> Option<Hit> {
        let store = self.store()?;
        let hash = self.vary.variant_of(key, req);
        // Every request for the key counts, found or not: how often decides admission.
        self.budget.note_request(&hash);
        // Read before the index is locked: its length is the client's to choose.
        let accepts = (!req.contains_key(http::header::RANGE)).then(|| Accepts::parse(req));
        // A range gets the identity body: no variant.
        let choose = |e: &Entry| {
            let accepts = accepts.as_ref().filter(|_| !e.variants.is_empty())?;
            accepts.choose(
                e.variants.iter().map(|v| (v.coding, v.image.body_len)),
                e.image.body_len,
            )
        };
        let (found, mark) = self.lock_index().hit(&hash, key.as_str(), choose)?;
        let hit = self.lookup_span(&store, key, hash, found).await?;
        Some(Hit {
            soft_purged: mark.map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
            ..hit
        })
    }

    /// The body a hit reads (what the index `found`: the identity body of `hash`'s object, or
    /// one of its compressed variants) with the object's record: from the tier its size
    /// belongs in, else from disk. One path for both: what differs is the span's file and what
    /// is expected of it. The record is the cached one, else read from the
    /// object's file (with the identity body, in the same open), and checked against the index.
    /// Anything that does not match drops the object (the next request fills it again).
    async fn lookup_span(&self, store: &Store, key: &CacheKey, hash: KeyHash, found: Found) -> Option<Hit> {
        let generation = found.generation;
        let tier_key = tier_key(hash, found.coding);
        let tier = self.tiers.tier_for(found.body_len);
        if let Some(hit) = tier
            .as_ref()
            .and_then(|t| t.get(&tier_key, generation, found.variant_version()))
        {
            return Some(hit);
        }
        // No tier holds it: where its images are, if the index still holds those versions
        // (else it was replaced or let go of since: a miss).
        let (object, variant) = self.lock_index().images(&hash, &found)?;
        let span = Span {
            coding: found.coding,
            tier_key,
            image: variant.map_or_else(|| object.clone(), |v| v.image),
        };
        // Whether its tier takes it after this hit, and so from what size it is mapped.
        let estimate = |h: &KeyHash| self.budget.estimate(h);
        let tier = tier.filter(|t| t.admits(&span.tier_key, &hash, estimate) && self.tiers.has_room(t));
        let expect = Expected::of(&span.image, tier.as_ref().map_or(MIN_MMAP, |t| t.map_from));
        let mut meta = self.tiers.meta(&hash, generation);
        if meta.is_none() && span.coding.is_some() {
            // A variant's image holds no record: the object's does.
            let source = Source::of(store, &hash, generation, None, &object.place);
            let (len, tail_len) = (object.body_len, object.tail_len);
            let read = tokio::task::spawn_blocking(move || source.read_record(len, tail_len)).await;
            let read = self.or_drop(read, &hash, generation).await?;
            meta = Some(
                self.checked_record(read, key, &hash, generation, &object, false)
                    .await?,
            );
        }
        let source = Source::of(store, &hash, span.image.generation, span.coding, &span.image.place);
        let opened = self.open_blocking(source, expect, meta.is_none()).await;
        let opened = self.or_drop(opened, &hash, generation).await?;
        let meta = match (meta, opened.record) {
            (Some(meta), _) => meta,
            (None, Some(read)) => {
                let held_open = tier.as_ref().is_some_and(|t| t.open);
                self.checked_record(read, key, &hash, generation, &object, held_open)
                    .await?
            }
            // (A record is read whenever none is cached.)
            (None, None) => return None,
        };
        if !opened.intact {
            // A variant's object goes with it: the next request fills both again.
            let why = if span.coding.is_some() {
                "variant body hash mismatch"
            } else {
                "body hash mismatch"
            };
            self.drop_corrupt(&hash, generation, why).await;
            return None;
        }
        if opened.mtime != expect.mtime || !expect.verified {
            let mut ix = self.lock_index();
            match span.coding {
                None => ix.mark_verified(&hash, generation, opened.mtime),
                Some(_) => ix.mark_variant_verified(&hash, span.image.generation, opened.mtime),
            }
        }
        let hit = Hit {
            meta,
            body: opened.body,
            coding: span.coding,
            soft_purged: None,
        };
        self.tier_insert(
            tier.as_ref(),
            (hash, span.tier_key),
            (generation, found.variant_version()),
            &hit,
            expect.min_mmap,
            opened.mtime,
        );
        Some(hit)
    }

    /// A record read from disk, if it is the one the index expects for version `generation`
    /// of `hash` (else the object is dropped as corrupt); kept beside the index from then on.
    async fn checked_record(
        &self,
        meta: Meta,
        key: &CacheKey,
        hash: &KeyHash,
        generation: u64,
        object: &Image,
        held_open: bool,
    ) -> Option<Arc<Meta>> {
        if meta.key != *key || meta.digest != object.digest || meta.body_len != object.body_len {
            self.drop_corrupt(hash, generation, "record does not match the index")
                .await;
            return None;
        }
        let meta = Arc::new(meta);
        self.tiers.remember_meta(*hash, generation, &meta, held_open);
        Some(meta)
    }

    /// Opens a stored file for a hit: inline when the page cache has it and nothing needs
    /// hashing, else off the runtime.
    async fn open_blocking(
        &self,
        source: Source,
        expect: Expected,
        want_record: bool,
    ) -> Result<Result<read::Opened, StoreError>, tokio::task::JoinError> {
        match open_object_cached(&source, expect, want_record) {
            Ok(None) => tokio::task::spawn_blocking(move || open_object(&source, expect, want_record)).await,
            Ok(Some(opened)) => Ok(Ok(opened)),
            Err(e) => Ok(Err(e)),
        }
    }

    /// Keeps a hit's body in its tier (when it was admitted) under `tier_key`, unless the key
    /// `hash` was evicted, purged or replaced meanwhile. `(generation, variant)`: the versions of
    /// the object and of the variant (0: the identity body).
    fn tier_insert(
        &self,
        tier: Option<&Tier<'_>>,
        (hash, tier_key): (KeyHash, KeyHash),
        (generation, variant): (u64, u64),
        hit: &Hit,
        min_mmap: u64,
        mtime: u64,
    ) {
        let Some(tier) = tier else { return };
        tier.offer((hash, tier_key), hit, (generation, variant), min_mmap, mtime);
        // Evicted, purged or replaced while this lookup read it: `forget` may have run before
        // the insert. A tier must not keep it (nor its descriptor).
        if !self.lock_index().holds(&hash, generation, variant) {
            tier.forget(&tier_key);
        }
    }

    /// Counts and logs a storage failure by its kind. A file found corrupt on a lookup is not
    /// one: it is removed and counted once by [`Cache::drop_corrupt`].
    fn storage_error(&self, e: &StoreError) {
        metrics::counter!(m::STORAGE_ERRORS, "kind" => e.kind()).increment(1);
        // (The error names the step: a fill, a hit, a variant's write.)
        warn!(error = %e, "storage error");
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

    /// Removes whatever is stored for one full key (RFC 9111 §4.4 invalidation). A key
    /// without `Vary` variants is one index lookup; anyone may send the unsafe requests that
    /// invalidate, so only keys with variants (stored under hashes of their own) scan the index.
    pub async fn invalidate(&self, key: &CacheKey) -> usize {
        if self.varies(key) {
            return self.purge(&Purge::Url(key.as_str().to_owned())).await;
        }
        // A fill of this key in flight commits the app's answer from before: not stored.
        self.fences.invalidate(millis(SystemTime::now()), key.hash());
        // The hash is the key's own (not a variant's): it must name this key.
        let removed: Vec<Removed> = self
            .lock_index()
            .remove_named(&key.hash(), key.as_str())
            .into_iter()
            .collect();
        self.finish_purge(removed).await
    }

    /// Purges matching objects: out of the index, the tiers and off the disk (with whatever
    /// files an entry owns), all through the one removal path. Returns how many.
    ///
    /// The entries are selected in one hold of the index lock and taken out in holds of at
    /// most [`PURGE_BATCH`]: hits go on between them, so a purge of 10,000 objects does not
    /// stall them for the whole of it (BENCHMARKS.md, issue 18). A key given a new version
    /// meanwhile is removed too: a purge says what it names has changed.
    pub async fn purge(&self, what: &Purge) -> usize {
        // Fills in flight that it selects are not stored when they commit.
        self.fences.purge(millis(SystemTime::now()), what, false);
        let keys = what.select(&self.lock_index());
        let mut removed: Vec<Removed> = Vec::with_capacity(keys.len());
        for batch in keys.chunks(PURGE_BATCH) {
            removed.extend(self.lock_index().remove_all(batch));
        }
        self.finish_purge(removed).await
    }

    /// Soft purge: marks the matching objects stale as of now instead of removing them. The
    /// next request for one revalidates with the app (conditionally when it has validators),
    /// and `stale-while-revalidate` and `stale-if-error` count from the mark, so users are
    /// still served while the app is down. The mark holds for the version marked (a refresh
    /// or a new fill replaces it unmarked) and is kept in a small file beside the objects, so
    /// it survives a restart. Returns how many objects are marked (marked before included).
    pub async fn soft_purge(&self, what: &Purge) -> usize {
        let at = millis(SystemTime::now());
        // Fills in flight that it selects are stored marked, as if stored before it.
        self.fences.purge(at, what, true);
        let keys = what.select(&self.lock_index());
        let (mut matched, mut newly) = (0, 0);
        // In batches, as `purge` removes: hits go on between them.
        for batch in keys.chunks(PURGE_BATCH) {
            // (One removed since the selection is not counted.)
            let (m, n) = self.lock_index().mark_all_stale(batch, at);
            (matched, newly) = (matched + m, newly + n);
        }
        if newly > 0 {
            self.save_marks().await;
        }
        metrics::counter!(m::SOFT_PURGED_OBJECTS).increment(newly as u64);
        matched
    }

    /// Writes the soft-purge marks in force to the store (off the runtime); a failure is
    /// counted and logged: the marks hold in memory until the process ends.
    async fn save_marks(&self) {
        let Some(store) = self.store() else { return };
        let _turn = self.marks_file.lock().await;
        let mut marks = self.lock_index().marks();
        // Before the startup rebuild is done, the file still holds marks of versions not
        // indexed yet (restored at its end): they are kept, not overwritten.
        let loading = !self.is_loaded();
        let written = tokio::task::spawn_blocking(move || {
            if loading {
                marks.extend(store.read_marks());
            }
            store.write_marks(&marks)
        })
        .await;
        if let Ok(Err(e)) = written {
            self.storage_error(&e);
        }
    }

    /// What is stored for a URL (a path, any host, or a full URL; `host` narrows a path to
    /// one host): every variant, at most [`MAX_INSPECTED`], with its record read from the
    /// disk when it is not cached. For the admin port's `GET /objects`: one pass over the
    /// index under its lock (as a purge by URL), the records read after it is let go.
    pub async fn inspect(&self, url: &str, host: Option<&str>) -> Vec<Stored> {
        let Some(store) = self.store() else {
            return Vec::new();
        };
        let host = host.and_then(key::normalize_host);
        let what = Purge::Url(url.to_owned());
        let selected = what.select(&self.lock_index());
        let on_host = |e: &Entry| host.as_ref().is_none_or(|h| key::host_of(&e.key) == Some(h.as_str()));
        let found = self.lock_index().snapshot(&selected, on_host, MAX_INSPECTED);
        let mut out = Vec::with_capacity(found.len());
        for index::Snapshot {
            key: hash,
            entry: e,
            tags,
            mark,
        } in found
        {
            let tier = match self.tiers.tier_for(e.image.body_len) {
                Some(t) if t.holds(&hash, e.image.generation) => {
                    if t.open {
                        "open"
                    } else {
                        "memory"
                    }
                }
                _ => "disk",
            };
            let meta = match self.tiers.meta(&hash, e.image.generation) {
                Some(meta) => Some(meta),
                None => {
                    let source = Source::of(&store, &hash, e.image.generation, None, &e.image.place);
                    let (body_len, tail_len) = (e.image.body_len, e.image.tail_len);
                    tokio::task::spawn_blocking(move || source.read_record(body_len, tail_len).ok())
                        .await
                        .ok()
                        .flatten()
                        .map(Arc::new)
                }
            };
            out.push(Stored {
                key: e.key.to_string(),
                generation: e.image.generation,
                body_len: e.image.body_len,
                file_len: e.image.file_len(),
                charged: self.charge(e.image.stored_len()),
                tier,
                tags,
                hits: e.hits,
                soft_purged: mark.map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
                variants: e
                    .variants
                    .iter()
                    .map(|v| (v.coding, v.image.body_len, self.charge(v.image.stored_len())))
                    .collect(),
                meta,
            });
        }
        out
    }

    /// Updates the size gauges.
    pub fn publish_gauges(&self) {
        let (objects, used, reserved) = self.stats();
        metrics::gauge!(m::CACHE_OBJECTS).set(objects as f64);
        metrics::gauge!(m::CACHE_SIZE).set(used as f64);
        metrics::gauge!(m::CACHE_RESERVED).set(reserved as f64);
        let ((tags, references), tag_bytes) = {
            let ix = self.lock_index();
            (ix.tag_stats(), ix.tag_bytes())
        };
        metrics::gauge!(m::TAG_INDEX_BYTES).set(tag_bytes as f64);
        metrics::gauge!(m::TAGS).set(tags as f64);
        metrics::gauge!(m::TAG_REFERENCES).set(references as f64);
        self.tiers.publish_gauges();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    /// The cache is below the configuration: it is opened with [`Settings`] and imports nothing
    /// from `config` (but for `testing.rs`, whose helpers take the defaults from there).
    #[test]
    fn the_cache_imports_nothing_from_config() {
        let files = [
            ("admit.rs", include_str!("admit.rs")),
            ("budget.rs", include_str!("budget.rs")),
            ("coalesce.rs", include_str!("coalesce.rs")),
            ("commit.rs", include_str!("commit.rs")),
            ("evict.rs", include_str!("evict.rs")),
            ("fence.rs", include_str!("fence.rs")),
            ("fileio.rs", include_str!("fileio.rs")),
            ("fill.rs", include_str!("fill.rs")),
            ("index.rs", include_str!("index.rs")),
            ("key.rs", include_str!("key.rs")),
            ("meta.rs", include_str!("meta.rs")),
            ("mod.rs", include_str!("mod.rs")),
            ("read.rs", include_str!("read.rs")),
            ("rebuild.rs", include_str!("rebuild.rs")),
            ("settings.rs", include_str!("settings.rs")),
            ("store.rs", include_str!("store.rs")),
            ("tags.rs", include_str!("tags.rs")),
            ("tiers.rs", include_str!("tiers.rs")),
            ("variants.rs", include_str!("variants.rs")),
            ("vary.rs", include_str!("vary.rs")),
        ];
        for (name, text) in files {
            assert!(
                !text.contains(concat!("crate::", "config")),
                "src/cache/{name} imports config"
            );
        }
    }

    #[tokio::test]
    async fn a_purge_by_tag_larger_than_a_batch_removes_every_tagged_object_and_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("cache");
        let n = PURGE_BATCH * 2 + 20;
        {
            let store = Store::open(&root).expect("store");
            for i in 0..n {
                let body = format!("body {i}").into_bytes();
                let mut meta = testing::meta(&format!("http://app.example/{i}.js"), &body);
                let tag = if i % 200 == 0 { "other" } else { "many" };
                meta.headers.insert("cache-tag", http::HeaderValue::from_static(tag));
                testing::write_object(&store, &meta, &body, store.next_gen(), 0);
            }
        }
        let cache = testing::open(&root).await;
        assert_eq!(cache.stats().0, n);
        let tagged = (0..n).filter(|i| i % 200 != 0).count();
        assert!(tagged > 2 * PURGE_BATCH);
        assert_eq!(cache.purge(&Purge::Tags(vec!["many".into()])).await, tagged);
        assert_eq!(cache.stats().0, n - tagged);
        let store = cache.store().expect("open");
        assert_eq!(store.scan_objects().len(), n - tagged, "their files are gone");
        assert_eq!(cache.lock_index().tag_stats(), (1, n - tagged));
    }

    /// The ids of the segment files on disk under the cache directory `root`.
    fn segment_files(root: &std::path::Path) -> BTreeSet<u64> {
        std::fs::read_dir(root.join(store::OBJECTS).join("segments"))
            .expect("the segments directory")
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                u64::from_str_radix(name.strip_suffix(".seg")?, 16).ok()
            })
            .collect()
    }

    /// Settings for a cache at `root` whose segments reach their bound in a few appends: 64 KiB
    /// segments, at most 4; nothing declined, and bodies read from their segments (no memory
    /// tier).
    fn small_segments(root: &std::path::Path) -> Settings {
        let mut settings = testing::settings(root);
        settings.segments = segments::Geometry {
            segment_bytes: 64 << 10,
            max_segments: 4,
        };
        settings.admission = false;
        settings.memory_size = 0;
        settings
    }

    /// Past the most segment files the geometry allows, the eviction pass reclaims the
    /// sparsest whole, in one pass: every object with an image in one (its own, or a
    /// compressed variant's) goes (out of the index, off the disk, no longer charged), every
    /// other object is still a hit with its own bytes, now and after a restart.
    #[tokio::test]
    async fn segments_past_the_bound_are_reclaimed_whole_with_the_objects_they_hold() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("cache");
        let settings = small_segments(&root);
        let geometry = settings.segments;
        let cache = testing::open_with(settings.clone()).await;
        let layout = cache.stats().1;
        let none = http::HeaderMap::new();
        let body = |i: usize| (0..6000).map(|b| (b * 31 + i * 7) as u8).collect::<Vec<u8>>();
        // Small objects (slots of about 8 KiB) until three segments more than the bound
        // exist, the last one open. The first has a type that compresses: its variants are
        // made (in its segment) before the next is stored; the others have none.
        let mut stored: Vec<(Meta, Vec<u8>)> = Vec::new();
        while segment_files(&root).len() < geometry.max_segments + 3 {
            assert!(stored.len() < 1000, "the segments never filled");
            let i = stored.len();
            let body = body(i);
            assert!(fill::Fill::deferred(body.len() as u64), "small enough for a slot");
            let mut meta = testing::meta(&format!("http://app.example/{i}.js"), &body);
            if i == 0 {
                let js = http::HeaderValue::from_static("application/javascript");
                meta.headers.insert(http::header::CONTENT_TYPE, js);
            }
            let mut object = body.clone();
            object.extend_from_slice(&store::tail(&meta));
            assert!(
                cache.import(meta.clone(), Bytes::from(object)).await.is_some(),
                "stored"
            );
            if i == 0 {
                cache.variants_settled(&meta.key, &none, Duration::from_secs(10)).await;
            }
            stored.push((meta, body));
        }
        // Where each object's images are (its own first), and what they are charged.
        let (images, charged): (Vec<Vec<u64>>, Vec<u64>) = {
            let ix = cache.lock_index();
            stored
                .iter()
                .map(|(meta, _)| {
                    let e = ix.peek(&meta.storage_hash()).expect("indexed");
                    let all = std::iter::once(&e.image).chain(e.variants.iter().map(|v| &v.image));
                    let place = |im: &Image| im.place.slot().expect("in a slot").segment_id();
                    let charged: u64 = all.clone().map(|im| ix.charge(im.stored_len())).sum();
                    (all.map(place).collect(), charged)
                })
                .unzip()
        };
        assert!(images[0].len() > 1, "no variants made");
        assert!(
            images[0].iter().all(|&id| id == images[0][0]),
            "variants in another segment"
        );
        let mut by_segment: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for (i, images) in images.iter().enumerate() {
            by_segment.entry(images[0]).or_default().push(i);
        }
        // The first segment keeps the object with variants (a few slots), the others 4 to 6
        // of their objects (never none: a segment would go on its own); the rest are purged.
        let mut kept: Vec<usize> = Vec::new();
        for (k, objects) in by_segment.values().enumerate() {
            let keep = if k == 0 { 1 } else { 4 + k % 3 };
            let (keep, purge) = objects.split_at(objects.len().min(keep));
            kept.extend(keep);
            for &i in purge {
                assert_eq!(cache.invalidate(&stored[i].0.key).await, 1);
            }
        }
        let live_in = |id: u64| kept.iter().flat_map(|&i| &images[i]).filter(|&&s| s == id).count();
        let before = segment_files(&root);
        assert!(before.len() > geometry.max_segments, "{} segment files", before.len());
        assert_eq!(before, by_segment.keys().copied().collect(), "none went on its own");
        assert_eq!(cache.segments().expect("segments").count(), before.len());

        // One pass takes out all that is too many (the loop runs one a tick when under the
        // budget); the files go once the writer has given back their last slots.
        cache.evict_pass().await;
        let within = testing::eventually(|| segment_files(&root).len() <= geometry.max_segments).await;
        assert!(within, "{} segment files after a pass", segment_files(&root).len());
        let after = segment_files(&root);
        assert_eq!(after.len(), geometry.max_segments, "more reclaimed than too many");
        assert_eq!(cache.segments().expect("segments").count(), after.len());
        let reclaimed: Vec<u64> = before.difference(&after).copied().collect();
        // The sparsest went (the one with variants among them): none reclaimed held more
        // live slots than a sealed one kept.
        assert!(reclaimed.contains(&images[0][0]));
        let newest = *before.last().expect("segments");
        let most_reclaimed = reclaimed.iter().map(|&id| live_in(id)).max().unwrap_or(0);
        let sealed_kept = after.iter().filter(|&&id| id != newest);
        assert!(sealed_kept.map(|&id| live_in(id)).all(|n| n >= most_reclaimed));
        // What they held is gone; everything else reads back byte for byte.
        let survivors: Vec<usize> = kept
            .iter()
            .copied()
            .filter(|&i| images[i].iter().all(|id| after.contains(id)))
            .collect();
        assert!(survivors.len() < kept.len());
        let check = async |cache: &Cache| {
            for &i in &kept {
                let (meta, body) = &stored[i];
                let hit = cache.lookup(&meta.key, &none).await;
                if survivors.contains(&i) {
                    let hit = hit.unwrap_or_else(|| panic!("object {i} lost"));
                    assert_eq!(&hit.body[..], &body[..], "object {i}");
                } else {
                    assert!(hit.is_none(), "object {i} outlived its segment");
                }
            }
        };
        check(&cache).await;
        // Only what is left is charged: no slot of a reclaimed segment, nothing unlinking.
        let left = layout + survivors.iter().map(|&i| charged[i]).sum::<u64>();
        assert_eq!(cache.stats(), (survivors.len(), left, 0));
        assert_eq!(cache.lock_index().usage(), left);
        drop(cache);

        // A restart finds the survivors and nothing of the reclaimed.
        let cache = testing::open_with(settings).await;
        assert_eq!(segment_files(&root), after);
        assert_eq!(cache.stats(), (survivors.len(), left, 0));
        check(&cache).await;
    }

    /// The eviction loop is woken when a new segment takes the count past the bound: with
    /// its timer an hour away and the budget far from full, the excess is still reclaimed.
    #[tokio::test]
    async fn a_segment_past_the_bound_wakes_the_eviction_loop() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("cache");
        let mut settings = small_segments(&root);
        let geometry = settings.segments;
        settings.evict_interval = Duration::from_secs(3600);
        let cache = testing::open_with(settings).await;
        let cancel = tokio_util::sync::CancellationToken::new();
        let evictor = tokio::spawn(evict::run(cache.clone(), cancel.clone()));
        // About seven slots of 8 KiB a segment: more than the bound holds, all live.
        let mut objects = 0;
        for i in 0..(geometry.max_segments + 3) * 8 {
            let body: Vec<u8> = (0..6000).map(|b| (b * 31 + i * 7) as u8).collect();
            let meta = testing::meta(&format!("http://app.example/{i}.css"), &body);
            let mut object = body;
            object.extend_from_slice(&store::tail(&meta));
            assert!(cache.import(meta, Bytes::from(object)).await.is_some(), "stored");
            objects += 1;
        }
        let used = cache.stats().1;
        assert!(used < cache.budget() / 2, "far from the watermarks: {used}");
        let within = testing::eventually(|| segment_files(&root).len() <= geometry.max_segments).await;
        assert!(within, "{} segment files, none reclaimed", segment_files(&root).len());
        assert!(cache.stats().0 < objects, "the reclaimed segments' objects went");
        cancel.cancel();
        evictor.await.expect("the loop ends");
    }
}
