//! Fill and commit: a fill reserves its room, stages its body (in memory, or in a file of
//! its own written and hashed as it comes), and its commit writes the rest with the record and
//! footer (`body | record | footer`) and links the file into place (a body staged in memory is
//! written whole under its final name instead), then indexes it. Also the
//! refresh of a revalidated head, the tee of a body of unknown length, and the import of an
//! object file received whole and already checked (the shared tier's), through the same budget
//! and index steps as a commit.
//!
//! These stay methods of [`Cache`]: each step uses nearly every part (the store, the budget
//! and its index, the tiers that keep records and whose descriptors are relieved on a storage
//! error, the vary specs a commit teaches, the eviction step that unlinks a replaced version),
//! so a type of their own would hold the whole cache again. They own no lock: the budget's
//! `index` is taken for in-memory steps only and let go before any `.await`; every file step
//! runs off the event loop.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::debug;

use crate::cache::budget::Reservation;
use crate::cache::fence::{self, Verdict};
use crate::cache::fill::{Fill, FillState, HashingWriter, Source, TEE_STALL, TeeMsg};
use crate::cache::index::{Entry, Image};
use crate::cache::key::{Digest, KeyHash};
use crate::cache::meta::Meta;
use crate::cache::read::Source as Stored;
use crate::cache::segments::{self, Kind, Place, Segments};
use crate::cache::store::{self, IoContext, Store, StoreError};
use crate::cache::{Cache, FillPermit, Hit, fileio};
use crate::metrics as m;

/// A fill writes what its upstream has ready in steps of up to this many bytes.
const WRITE_BATCH: usize = 256 << 10;
/// Unknown-length fills reserve budget in steps of this many bytes.
const TEE_STEP: u64 = 1 << 20;

/// Creates a fill's object file, pre-allocated to `len` bytes, off the event loop: allocating
/// an inode can take long (ext4 scans past recently deleted ones, which an evicting cache makes
/// many of) and would stall every connection on the loop.
async fn create_tmp_object(store: Arc<Store>, generation: u64, len: u64) -> Result<store::Tmp, StoreError> {
    tokio::task::spawn_blocking(move || {
        let tmp = store.create_tmp_object(generation)?;
        // (Dropped on failure, the file goes.)
        fileio::preallocate(&tmp.file, len).map_err(|source| StoreError::io("allocate", tmp.describe(), source))?;
        Ok(tmp)
    })
    .await
    .unwrap_or_else(|e| Err(StoreError::io("create", "(blocking task)", std::io::Error::other(e))))
}

/// Where a fill's bytes are kept until its commit.
enum Staged {
    /// In a file, written and hashed up to a point (the hasher's state is large: boxed).
    File(store::Tmp, Box<HashingWriter>),
    /// In memory (a small body, shared with its readers): the commit creates the file.
    Memory,
    /// In memory, for a slot: the commit appends it to a segment.
    Slot(Arc<Segments>),
}

impl Staged {
    fn describe(&self) -> std::path::PathBuf {
        match self {
            Staged::File(tmp, _) => tmp.describe(),
            Staged::Memory | Staged::Slot(_) => "(in memory)".into(),
        }
    }
}

/// Why a fill ended before it was stored: the `reason` of `sidecache_fills_aborted_total`, a
/// closed set (`metrics::COUNTERS` lists it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Abort {
    /// It could never fit (`max_object_size`, or the budget less the layout).
    Budget,
    /// The object bound in force is below one.
    Objects,
    /// No room could be made in time.
    Room,
    /// The disk failed it.
    Storage,
    /// One write of a body without a length stalled.
    Stalled,
    /// The app's body failed.
    Upstream,
    /// The app's body ended short of its length.
    Truncated,
    /// A body without a length broke off, or its client left.
    Incomplete,
}

impl Abort {
    fn as_str(self) -> &'static str {
        match self {
            Abort::Budget => "budget",
            Abort::Objects => "objects",
            Abort::Room => "room",
            Abort::Storage => "storage",
            Abort::Stalled => "stalled",
            Abort::Upstream => "upstream",
            Abort::Truncated => "truncated",
            Abort::Incomplete => "incomplete",
        }
    }

    /// The abort for a reservation refused for `reason` (`budget::Budget::reserve_room`).
    fn refused(reason: &str) -> Abort {
        match reason {
            "budget" => Abort::Budget,
            "objects" => Abort::Objects,
            _ => Abort::Room,
        }
    }
}

/// A fill in progress as a value (pingora's `HandleMiss`, cacache's `Writer`): the room it
/// reserved, where its body is staged (a temporary file written and hashed as it comes, or
/// memory), and why it stops if it ends unfinished. Dropped before it is stored, it gives its
/// room back (its `Reservation`), its temporary file goes (`store::Tmp`), and its abort reason
/// is counted, once. A failure path only says why ([`Filling::abort`]); none hands room or a
/// temporary file back by hand. [`Filling::stored`] hands the reservation to the step that
/// indexes the object, which counts what happens from there.
struct Filling {
    reservation: Reservation,
    staged: Staged,
    /// Counted when dropped unfinished.
    reason: Abort,
    finished: bool,
}

impl Filling {
    fn new(reservation: Reservation, staged: Staged) -> Filling {
        Filling {
            reservation,
            staged,
            reason: Abort::Incomplete,
            finished: false,
        }
    }

    /// Ends it for `reason`: the room and the temporary file go back, the reason is counted.
    fn abort(mut self, reason: Abort) {
        self.reason = reason;
    }

    /// Its staged body, for the commit's blocking step (a failure there drops the file).
    fn take_staged(&mut self) -> Staged {
        std::mem::replace(&mut self.staged, Staged::Memory)
    }

    /// The writer of a body staged in a file.
    fn writer(&mut self) -> Option<&mut HashingWriter> {
        match &mut self.staged {
            Staged::File(_, writer) => Some(writer),
            Staged::Memory | Staged::Slot(_) => None,
        }
    }

    /// Its file is placed: the reservation goes to the index step that stores it.
    fn stored(mut self) -> Reservation {
        self.finished = true;
        let empty = Reservation::empty(&self.reservation);
        std::mem::replace(&mut self.reservation, empty)
    }
}

impl Drop for Filling {
    fn drop(&mut self) {
        if !self.finished {
            metrics::counter!(m::FILLS_ABORTED, "reason" => self.reason.as_str()).increment(1);
        }
    }
}

impl Cache {
    /// Reserves `bytes` and one object for a new fill of `key`; a refusal is counted by its
    /// reason (`budget`, `objects` or `room`), or as declined when a full cache does not admit
    /// it (`budget::Budget::reserve_new`). The object is converted by the commit, or given back
    /// when the reservation is dropped.
    async fn reserve_fill(self: &Arc<Self>, bytes: u64, key: &KeyHash) -> Option<Reservation> {
        match self.budget.reserve_new(bytes, key, self).await {
            Ok(reservation) => Some(reservation),
            Err("admission") => {
                metrics::counter!(m::FILLS_DECLINED).increment(1);
                None
            }
            Err(reason) => {
                metrics::counter!(m::FILLS_ABORTED, "reason" => Abort::refused(reason).as_str()).increment(1);
                None
            }
        }
    }

    /// Grows a fill's reservation to what a file of `len` bytes is charged, by at least `step`
    /// (a body without a length reserves as it comes, [`TEE_STEP`] at a time, and exactly
    /// what its whole file needs at the end).
    async fn reserve_more(self: &Arc<Self>, filling: &mut Filling, len: u64, step: u64) -> Result<(), Abort> {
        let need = self.charge(len);
        let have = filling.reservation.bytes;
        if need <= have {
            return Ok(());
        }
        let more = self
            .reserve_room((need - have).max(step), 0)
            .await
            .map_err(Abort::refused)?;
        filling.reservation.absorb(more);
        Ok(())
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
        // A small body goes to a slot, which spends its prefix too.
        let slotted = self.slotted(len).cloned();
        let reservation = self.charge(file_len + slotted.as_ref().map_or(0, |_| segments::PREFIX_LEN));
        if len > self.settings.max_object_size {
            metrics::counter!(m::FILLS_ABORTED, "reason" => Abort::Budget.as_str()).increment(1);
            return Err((permit, body));
        }
        // Its waiters wait while it makes room: no longer than they wait for it.
        let Some(reserved) = self.reserve_fill(reservation, &meta.storage_hash()).await else {
            return Err((permit, body));
        };
        let generation = store.next_gen();
        let staged = if let Some(segments) = slotted {
            Staged::Slot(segments)
        } else if Fill::deferred(len) {
            Staged::Memory
        } else {
            match create_tmp_object(store, generation, file_len).await {
                Ok(tmp) => {
                    let writer = Box::new(HashingWriter::new(tmp.file.clone()));
                    Staged::File(tmp, writer)
                }
                Err(e) => {
                    self.storage_error(&e);
                    Filling::new(reserved, Staged::Memory).abort(Abort::Storage);
                    return Err((permit, body));
                }
            }
        };
        metrics::counter!(m::FILLS_STARTED).increment(1);
        let file = match &staged {
            Staged::File(tmp, _) => Some(tmp.file.clone()),
            Staged::Memory | Staged::Slot(_) => None,
        };
        let fill = Fill::new(Arc::new(meta), file);
        permit.stream(fill.clone());
        let cache = self.clone();
        let task_fill = fill.clone();
        let filling = Filling::new(reserved, staged);
        tokio::spawn(async move {
            let ok = cache.run_fill(&task_fill, body, filling).await;
            task_fill.finish(if ok { FillState::Complete } else { FillState::Failed });
            // Unpublishes the finished flight.
            drop(permit);
        });
        Ok(fill)
    }

    async fn run_fill<S: Source>(self: &Arc<Self>, fill: &Arc<Fill>, mut body: S, mut filling: Filling) -> bool {
        let len = fill.meta.body_len;
        let mut failure = None;
        let mut received = 0u64;
        // Received, not written yet: what the commit writes (all of a body kept in memory).
        let mut last = Vec::new();
        while let Some(batch) = body.next_batch(WRITE_BATCH).await {
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    failure = Some((Abort::Upstream, e.to_string()));
                    break;
                }
            };
            let size: u64 = batch.iter().map(|c| c.len() as u64).sum();
            if received + size > len {
                failure = Some((Abort::Upstream, "body longer than its Content-Length".to_owned()));
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
            let Some(writer) = filling.writer() else {
                last.extend(batch);
                continue;
            };
            match writer.write(batch).await {
                // Readers of a file-backed fill read the file: no chunks to hand over.
                Ok(written) if !fill.is_shared() => fill.advance(written, &[]),
                Ok(_) => {}
                Err(source) => {
                    let err = StoreError::io("write", filling.staged.describe(), source);
                    self.storage_error(&err);
                    failure = Some((Abort::Storage, err.to_string()));
                    break;
                }
            }
        }
        if failure.is_none() && received != len {
            failure = Some((
                Abort::Truncated,
                format!("upstream body ended at {received} of {len} bytes"),
            ));
        }
        if let Some((reason, detail)) = failure {
            debug!(reason = reason.as_str(), detail = %detail, "fill discarded");
            filling.abort(reason);
            return false;
        }
        let meta = (*fill.meta).clone();
        self.commit(meta, filling, last).await
    }

    /// Makes a finished object durable and visible: a small body kept in memory is hashed here
    /// and appended to a segment by its writer (batched with other fills, no trip to the
    /// blocking pool); otherwise, in one trip off the runtime, the `last` chunks are written
    /// after what was staged in a file, then the record and footer, and the file is linked into
    /// place (a body kept in memory without segments is written whole under its final name).
    async fn commit(self: &Arc<Self>, mut meta: Meta, mut filling: Filling, last: Vec<Bytes>) -> bool {
        let Some(store) = self.store() else {
            filling.abort(Abort::Storage);
            return false;
        };
        let hash = meta.storage_hash();
        // Versions are taken at commit: of two fills of a key, the one committed last is the
        // newest, now and after a restart.
        let version = store.next_gen();
        let staged = filling.take_staged();
        if let Staged::Slot(segments) = staged {
            let mut hasher = blake3::Hasher::new();
            for chunk in &last {
                hasher.update(chunk);
            }
            meta.digest = Digest::from(hasher.finalize());
            let tail = Bytes::from(store::tail(&meta));
            let tail_len = tail.len() as u64;
            let mut parts = last;
            parts.push(tail);
            let written = segments.write(Kind::Object, hash, version, parts).await;
            let Some((reserved, slot)) = self.stored(Ok(written), filling) else {
                return false;
            };
            let entry = entry_of(&meta, version, tail_len, true, 0, Place::Slot(slot));
            return self.installed(hash, meta, entry, reserved).await;
        }
        let (tmp, mut hasher, at) = match staged {
            Staged::File(tmp, writer) => match writer.into_parts() {
                Some((hasher, at)) => (Some(tmp), hasher, at),
                None => {
                    filling.abort(Abort::Storage);
                    return false;
                }
            },
            Staged::Memory | Staged::Slot(_) => (None, blake3::Hasher::new(), 0),
        };
        let written = tokio::task::spawn_blocking(move || -> Result<(Meta, u64, u64), StoreError> {
            for chunk in &last {
                hasher.update(chunk);
            }
            meta.digest = Digest::from(hasher.finalize());
            let tail = store::tail(&meta);
            let mut parts: Vec<&[u8]> = last.iter().map(|c| &c[..]).collect();
            parts.push(&tail);
            let Some(tmp) = tmp else {
                // A body received whole: written under its final name in one step.
                let mtime = store.write_object(&hash, version, &parts)?;
                return Ok((meta, tail.len() as u64, mtime));
            };
            // (The temporary file goes with `tmp` on any failure.)
            fileio::write_all_at(&tmp.file, &parts, at)
                .map_err(|source| StoreError::io("write", tmp.describe(), source))?;
            let mtime = store.place_object(tmp, &hash, version)?;
            Ok((meta, tail.len() as u64, mtime))
        })
        .await;
        let Some((reserved, (meta, tail_len, mtime))) = self.stored(written, filling) else {
            return false;
        };
        let entry = entry_of(&meta, version, tail_len, true, mtime, Place::File);
        self.installed(hash, meta, entry, reserved).await
    }

    /// [`Cache::install`] of a fill's object, counted as completed when it is stored.
    async fn installed(&self, hash: KeyHash, meta: Meta, entry: Entry, reserved: Reservation) -> bool {
        // Refused at the last step (its tags, or a purge made while it was in flight): counted
        // as aborted there, not as completed too.
        if !self.install(hash, meta, entry, reserved).await {
            return false;
        }
        metrics::counter!(m::FILLS_COMPLETED).increment(1);
        true
    }

    /// The value of a fill's blocking storage step, with the fill's reservation for the step
    /// that indexes it. On failure the error is counted and logged and the fill dropped
    /// (counted as aborted for storage, its room given back).
    fn stored<T>(
        &self,
        written: Result<Result<T, StoreError>, tokio::task::JoinError>,
        filling: Filling,
    ) -> Option<(Reservation, T)> {
        match written {
            Ok(Ok(done)) => Some((filling.stored(), done)),
            failed => {
                if let Ok(Err(e)) = failed {
                    self.storage_error(&e);
                }
                filling.abort(Abort::Storage);
                None
            }
        }
    }

    /// Stores an object file received whole from elsewhere (the shared tier), already checked
    /// ([`store::check_object`] gave `meta`): written as it is, under its final name, through
    /// the budget and the index as a commit is. Returns it as a hit; `None` when the cache is
    /// off, it is too large, no room can be made or the disk fails (the request then goes to
    /// the app, as on any storage failure).
    pub async fn import(self: &Arc<Self>, meta: Meta, object: Bytes) -> Option<Hit> {
        let store = self.store()?;
        let len = meta.body_len;
        let file_len = object.len() as u64;
        if len > self.settings.max_object_size || file_len < len {
            metrics::counter!(m::FILLS_ABORTED, "reason" => Abort::Budget.as_str()).increment(1);
            return None;
        }
        let hash = meta.storage_hash();
        let slotted = self.slotted(len).cloned();
        let stored_len = file_len + slotted.as_ref().map_or(0, |_| segments::PREFIX_LEN);
        let filling = Filling::new(self.reserve_fill(self.charge(stored_len), &hash).await?, Staged::Memory);
        let version = store.next_gen();
        let body = object.slice(..len as usize);
        let written = match slotted {
            Some(segments) => Ok(segments
                .write(Kind::Object, hash, version, vec![object])
                .await
                .map(|slot| (Place::Slot(slot), 0))),
            None => {
                tokio::task::spawn_blocking(move || {
                    store.write_object(&hash, version, &[&object]).map(|m| (Place::File, m))
                })
                .await
            }
        };
        let (reserved, (place, mtime)) = self.stored(written, filling)?;
        // Its digest was checked on the bytes written. (Variants are made here, not shared:
        // `install` queues them.)
        let entry = entry_of(&meta, version, file_len - len, true, mtime, place);
        let hit = Hit {
            meta: Arc::new(meta.clone()),
            body,
            coding: None,
            soft_purged: None,
        };
        self.install(hash, meta, entry, reserved).await;
        Some(hit)
    }

    /// Indexes an object file just placed as the newest version of its key (converting what
    /// its fill `reserved`), keeps its record beside the index, learns its `Vary`, and lets go
    /// of the version it replaces: out of the tiers, then off the disk.
    ///
    /// Its tags are indexed with it. Tags that cannot all be indexed (the request path
    /// checks them before it stores, so only a head changed on the way, or a configuration
    /// lowered, gets here) leave it unstored: indexed and taken out again in the same step,
    /// through the one removal path, so nothing is counted twice or left on the disk. So does
    /// a purge made while its fill was in flight (see `fence`). Returns whether it is stored.
    async fn install(&self, hash: KeyHash, meta: Meta, entry: Entry, reserved: Reservation) -> bool {
        let version = entry.image.generation;
        let tags = self.settings.tags.parse(&meta.headers);
        let url_hash = meta.key.hash();
        let committing = fence::Committing {
            requested: super::millis(meta.request_time),
            key: meta.key.as_str(),
            hash: &hash,
            url_hash: &url_hash,
            tags: tags.as_deref().unwrap_or_default(),
        };
        let (removed, refused, marked, has) = {
            let mut ix = self.lock_index();
            // Under the index lock: a purge raises its fence before it selects, so either it
            // selects this entry or this commit sees its fence.
            let verdict = self.fences.check(&committing);
            // The object is indexed now: no longer a reservation (its bytes are converted).
            let reserved = reserved.hand_over(&mut ix);
            let inserted = ix.insert_tagged(hash, entry, reserved, tags.as_deref().unwrap_or_default());
            let removed = inserted.removed;
            // Its tags could not all be indexed (read, or held in the tag index's memory), or a
            // purge made while it was in flight selected it (the app's answer from before).
            let why = tags.as_ref().err().copied().or(inserted.refused);
            let refused = (why.is_some() || verdict == Verdict::Purged)
                .then(|| ix.remove(&hash))
                .flatten()
                .map(|r| (why, r));
            // Soft-purged while in flight: stored as if before the purge, marked stale.
            let marked = match verdict {
                Verdict::SoftPurged(at) => ix.mark_stale(&hash, at).is_some(),
                _ => false,
            };
            // The variants a refresh carried over.
            let has: Vec<_> = ix
                .peek(&hash)
                .map_or(Vec::new(), |e| e.variants.iter().map(|v| v.coding).collect());
            (removed, refused, marked, has)
        };
        if let Some((why, refused)) = refused {
            match why {
                Some(why) => metrics::counter!(m::TAGS_REFUSED, "reason" => why.as_str()).increment(1),
                None => metrics::counter!(m::FILLS_ABORTED, "reason" => "purged").increment(1),
            }
            self.tiers.forget(&hash);
            self.unlink(removed.into_iter().chain([refused]).collect()).await;
            return false;
        }
        if marked {
            self.save_marks().await;
            metrics::counter!(m::SOFT_PURGED_OBJECTS).increment(1);
        }
        self.vary.remember(&meta);
        if removed.is_some() {
            // The tiers can only hold what the index held: a new key has nothing to forget.
            self.tiers.forget_tiers(&hash);
        }
        let held_open = self.tiers.open_tier_size(meta.body_len);
        self.queue_variants(hash, version, &meta, &has);
        self.tiers.remember_meta(hash, version, &Arc::new(meta), held_open);
        if let Some(r) = removed {
            self.unlink(vec![r]).await;
        }
        true
    }

    /// Fills `meta.key` from a body of unknown length that is streamed to one client, which
    /// sends a copy of each chunk to the returned sender (`None`: the cache is off) and waits
    /// while its queue is full. The copy to disk is given up (its queue closed, the client let
    /// go on alone) if it grows past `max_object_size`, the budget refuses it, or one write
    /// stalls for [`TEE_STALL`].
    ///
    /// The second value resolves once the copy is over (committed, or given up): the client's
    /// body holds its last frame until then (`body::tee`, bounded), so a request sent once the
    /// answer is complete finds it stored. (A `no-cache` answer, stored through here, is then
    /// revalidated by the next request instead of being asked for plain past a copy still in
    /// flight.)
    pub fn tee_fill(
        self: &Arc<Self>,
        meta: Meta,
    ) -> Option<(mpsc::Sender<TeeMsg>, tokio::sync::oneshot::Receiver<()>)> {
        let store = self.store()?;
        let generation = store.next_gen();
        let (tx, mut rx) = mpsc::channel::<TeeMsg>(256);
        let (over, copied) = tokio::sync::oneshot::channel::<()>();
        let cache = self.clone();
        tokio::spawn(async move {
            // Dropped when this task ends, however it ends: the client's last frame goes.
            let _over = over;
            // Without an object to fill or a file, the receiver goes away and the client's
            // body is left alone. Bytes are reserved as they come, making room as a fill of a
            // known length does (bounded by the room wait; the client waits with it once the
            // queue is full).
            let Some(reserved) = cache.reserve_fill(0, &meta.storage_hash()).await else {
                return;
            };
            let tmp = match create_tmp_object(store, generation, 0).await {
                Ok(tmp) => tmp,
                Err(e) => {
                    // Counted and logged like any storage failure; the client is unaffected.
                    cache.storage_error(&e);
                    Filling::new(reserved, Staged::Memory).abort(Abort::Storage);
                    return;
                }
            };
            metrics::counter!(m::FILLS_STARTED).increment(1);
            let writer = Box::new(HashingWriter::new(tmp.file.clone()));
            let mut filling = Filling::new(reserved, Staged::File(tmp, writer));
            let mut refused = None;
            let mut ended = false;
            while let Some(msg) = rx.recv().await {
                // What is queued already goes to disk in the same step.
                let (mut batch, mut last) = (Vec::new(), false);
                let mut next = Some(msg);
                while let Some(msg) = next.take() {
                    match msg {
                        TeeMsg::Data(c) => batch.push(c),
                        TeeMsg::Last(c) => {
                            batch.push(c);
                            last = true;
                        }
                        TeeMsg::End => last = true,
                    }
                    if !last && batch.len() < 64 {
                        next = rx.try_recv().ok();
                    }
                }
                let size: u64 = batch.iter().map(|c| c.len() as u64).sum();
                let written = filling.writer().map_or(0, |w| w.written());
                if written + size > cache.settings.max_object_size {
                    refused = Some(Abort::Budget);
                    break;
                }
                if let Err(reason) = cache.reserve_more(&mut filling, written + size, TEE_STEP).await {
                    refused = Some(reason);
                    break;
                }
                // The client waits while the queue is full: a write that stalls lets it go.
                let described = filling.staged.describe();
                let Some(writer) = filling.writer() else { break };
                match tokio::time::timeout(TEE_STALL, writer.write(batch)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(source)) => {
                        cache.storage_error(&StoreError::io("write", described, source));
                        refused = Some(Abort::Storage);
                        break;
                    }
                    Err(_) => {
                        refused = Some(Abort::Stalled);
                        break;
                    }
                }
                if last {
                    // Only a clean end with every byte written makes the copy complete.
                    ended = true;
                    break;
                }
            }
            // The client goes on alone at once when the copy is given up.
            rx.close();
            let mut meta = meta;
            meta.body_len = filling.writer().map_or(0, |w| w.written());
            if ended && refused.is_none() {
                let whole = meta.body_len + store::tail_len(&meta);
                refused = cache.reserve_more(&mut filling, whole, 0).await.err();
            }
            match (ended, refused) {
                (true, None) => {
                    cache.commit(meta, filling, Vec::new()).await;
                }
                (_, reason) => filling.abort(reason.unwrap_or(Abort::Incomplete)),
            }
        });
        Some((tx, copied))
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
        let slotted = self.slotted(meta.body_len).cloned();
        let stored_len = file_len + slotted.as_ref().map_or(0, |_| segments::PREFIX_LEN);
        // Given back when dropped, on any path that does not store it.
        let Ok(reserved) = self.reserve_room(self.charge(stored_len), 1).await else {
            return false;
        };
        let (from, source) = match self.lock_index().peek(&hash) {
            // The variants are carried over: the body they were made from is the same.
            Some(e) if e.image.digest == meta.digest && e.image.body_len == meta.body_len => (
                (e.image.verified, e.variants.clone()),
                Stored::of(&store, &hash, e.image.generation, None, &e.image.place),
            ),
            // Evicted or replaced meanwhile: nothing to refresh.
            _ => return false,
        };
        let version = store.next_gen();
        let len = meta.body_len;
        let written = match (slotted, source) {
            (None, Stored::Path(source)) => {
                tokio::task::spawn_blocking(move || -> Result<(Place, u64), StoreError> {
                    let old = fileio::open_for_read(&source).at("open", &source)?;
                    // (The temporary file goes with `tmp` on any failure.)
                    let tmp = store.create_tmp_object(version)?;
                    fileio::copy_range(&old, &tmp.file, len)
                        .and_then(|()| fileio::write_all_at(&tmp.file, &[&tail], len))
                        .map_err(|e| StoreError::io("copy", source, e))?;
                    Ok((Place::File, store.place_object(tmp, &hash, version)?))
                })
                .await
            }
            // A small body: read (from its slot, most often) and written with its new record.
            (slotted, source) => {
                let body = tokio::task::spawn_blocking(move || source.read(len, 0)).await;
                match (body, slotted) {
                    (Ok(Ok(body)), Some(segments)) => Ok(segments
                        .write(Kind::Object, hash, version, vec![Bytes::from(body), Bytes::from(tail)])
                        .await
                        .map(|slot| (Place::Slot(slot), 0))),
                    (Ok(Ok(body)), None) => {
                        tokio::task::spawn_blocking(move || {
                            store
                                .write_object(&hash, version, &[&body, &tail])
                                .map(|m| (Place::File, m))
                        })
                        .await
                    }
                    (Ok(Err(e)), _) => Ok(Err(e)),
                    (Err(e), _) => Err(e),
                }
            }
        };
        let (place, mtime) = match written {
            Ok(Ok(done)) => done,
            failed => {
                if let Ok(Err(e)) = &failed {
                    self.storage_error(e);
                }
                return false;
            }
        };
        // The copy is what the source was: checked only if that was. Its variants carry over.
        let entry = Entry {
            variants: from.1,
            ..entry_of(&meta, version, file_len - meta.body_len, from.0, mtime, place)
        };
        self.install(hash, meta, entry, reserved).await;
        true
    }
}

/// The index entry of version `generation` of the object `meta` describes, its image's record
/// and footer `tail_len` bytes, at `place`; no variants, tags or hits yet.
pub(super) fn entry_of(meta: &Meta, generation: u64, tail_len: u64, verified: bool, mtime: u64, place: Place) -> Entry {
    Entry {
        key: meta.key.as_str().into(),
        image: Image {
            generation,
            body_len: meta.body_len,
            tail_len,
            place,
            digest: meta.digest,
            verified,
            mtime,
        },
        variants: Box::default(),
        tags: Box::default(),
        hits: 0,
        marked: false,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::cache::Claim;
    use crate::cache::testing;
    use crate::error::BoxError;

    /// A body that yields its chunks one at a time.
    struct Chunked(VecDeque<Bytes>);

    impl Source for Chunked {
        async fn next_batch(&mut self, _limit: usize) -> Option<Result<Vec<Bytes>, BoxError>> {
            self.0.pop_front().map(|c| Ok(vec![c]))
        }
    }

    /// A fill dropped unfinished, wherever it stops, gives its room and its object back and
    /// leaves no file: nothing is handed back by hand.
    #[tokio::test]
    async fn a_fill_dropped_unfinished_gives_back_its_room_and_its_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = testing::open(dir.path()).await;
        let store = cache.store().expect("open");
        let meta = testing::meta("http://app.example/big.js", &[7u8; 300_000]);
        let before = (cache.stats().2, cache.lock_index().objects());
        let reserved = cache
            .reserve_fill(cache.charge(400_000), &meta.storage_hash())
            .await
            .expect("room");
        assert!(cache.stats().2 >= 400_000);
        let tmp = create_tmp_object(store, 1, 400_000).await.expect("tmp");
        let mut filling = Filling::new(
            reserved,
            Staged::File(
                tmp,
                Box::new(HashingWriter::new(Arc::new(
                    std::fs::File::open("/dev/null").expect("a file"),
                ))),
            ),
        );
        cache
            .reserve_more(&mut filling, 2_000_000, TEE_STEP)
            .await
            .expect("more room");
        filling.abort(Abort::Stalled);
        assert_eq!((cache.stats().2, cache.lock_index().objects()), before);
        assert!(cache.store().expect("open").scan_objects().is_empty());
    }

    fn leader(cache: &Cache, meta: &Meta) -> FillPermit {
        match cache.claim(&meta.key, &http::HeaderMap::new()) {
            Claim::Leader(permit) => permit,
            _ => panic!("a first claim leads"),
        }
    }

    #[tokio::test]
    async fn a_memory_staged_commit_writes_body_record_and_footer_that_read_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = testing::open(dir.path()).await;
        let body = b"console.log(1);\n".repeat(64);
        assert!(Fill::deferred(body.len() as u64));
        let meta = testing::meta("http://app.example/a.js", &body);
        let file_len = meta.body_len + store::tail_len(&meta);
        // (What the layout spends is counted as used from the start.)
        let layout = cache.stats().1;
        let reserved = cache
            .reserve_fill(cache.charge(file_len), &meta.storage_hash())
            .await
            .expect("room");
        let store = cache.store().expect("open");
        let committed = cache
            .commit(
                meta.clone(),
                Filling::new(reserved, Staged::Memory),
                vec![Bytes::from(body.clone())],
            )
            .await;
        assert!(committed);
        // Written whole under its final name: nothing was staged in `tmp/`.
        assert_eq!(
            std::fs::read_dir(dir.path().join("objects-v3/tmp"))
                .expect("tmp")
                .count(),
            0
        );
        // Indexed, and nothing left reserved.
        assert_eq!(cache.stats(), (1, layout + cache.charge(file_len), 0));
        let found = store.scan_objects();
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].id, found[0].len), (meta.storage_hash(), file_len));
        let path = store.object_path(&found[0].id, found[0].generation);
        let file = fileio::open_for_read(&path).expect("open");
        let read = store::read_found(&file, 0, found[0].len).expect("a whole object");
        assert_eq!(read.key, meta.key);
        assert_eq!(read.body_len, meta.body_len);
        assert_eq!(read.digest, Digest::from(blake3::hash(&body)));
        assert_eq!(&std::fs::read(&path).expect("read")[..body.len()], &body[..]);
    }

    #[tokio::test]
    async fn a_fill_whose_body_ends_short_is_discarded_and_its_reservation_released() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = testing::open(dir.path()).await;
        // Large enough to be staged in a file of its own.
        let body = vec![7u8; 1 << 20];
        assert!(!Fill::deferred(body.len() as u64));
        let meta = testing::meta("http://app.example/big.bin", &body);
        let layout = cache.stats().1;
        let permit = leader(&cache, &meta);
        let short = Chunked(VecDeque::from([Bytes::from(body[..300_000].to_vec())]));
        let Ok(_fill) = cache.start_fill(permit, meta, short).await else {
            panic!("the fill starts");
        };
        assert!(cache.stats().2 > 0, "reserved while it runs");
        // Given back once the fill ends, its flight released and no file left.
        let settled = testing::eventually(|| cache.stats() == (0, layout, 0) && cache.flights.is_empty()).await;
        assert!(settled, "reservation not released: {:?}", cache.stats());
        assert_eq!(cache.lock_index().objects(), 0);
        let store = cache.store().expect("open");
        assert!(store.scan_objects().is_empty());
        let tmp = dir.path().join("objects-v3").join("tmp");
        assert_eq!(std::fs::read_dir(tmp).expect("tmp dir").count(), 0);
    }
}
