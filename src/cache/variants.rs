//! Compressed variants made once, off the request path: when an object is stored whose type
//! compresses (`compress::Settings::eligible`), a job goes on a bounded queue; a small pool of
//! threads of its own (`compress.threads`, each at a lower CPU priority, so serving always
//! comes first) reads the stored body back, makes its brotli, zstd and gzip versions at the
//! levels its lifetime calls for, and stores each one that is worth it as a variant file
//! charged to the budget ([`index::Index::add_variant`]). Until then requests get the identity
//! body: nothing ever waits on compression but `prime`, which asks to ([`Cache::variants_settled`]).
//!
//! The compressor owns its queue and `pending` (a std mutex, a leaf: held to add or remove one
//! key, never across an `.await`, never while another lock is taken).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::Notify;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::{Receiver, Sender};
use tracing::{debug, warn};

use crate::cache::index::Variant;
use crate::cache::key::{CacheKey, Digest, KeyHash};
use crate::cache::meta::Meta;
use crate::cache::store::{self, VariantRecord};
use crate::cache::{Cache, fileio};
use crate::compress::{self, Levels};
use crate::metrics as m;
use crate::negotiate::Coding;
use crate::policy::{CacheControl, Heuristic, Prepared};

/// One stored object to make variants of.
struct Job {
    hash: KeyHash,
    /// The object's version: variants attach only to it.
    generation: u64,
    body_len: u64,
    digest: Digest,
    levels: Levels,
    /// Codings it has already (a refresh carried them over).
    has: Vec<Coding>,
}

/// The queue and the keys waiting on it.
pub(super) struct Compressor {
    /// `None` when compression is off. Bounded; its blocks are allocated as it fills, so a
    /// bound of every object the cache may hold costs nothing until used.
    queue: Option<Sender<Job>>,
    /// Taken by the threads when they start.
    receiver: Mutex<Option<Receiver<Job>>>,
    /// Keys queued or being compressed, with how many of their jobs are (a newer version of a
    /// key may be queued behind an older one: each job compresses the version it was queued
    /// for, if that is still the one stored).
    pending: Mutex<HashMap<KeyHash, u32>>,
    /// Woken whenever a key leaves `pending`.
    settled: Notify,
}

impl Compressor {
    pub(super) fn new(settings: &compress::Settings, max_objects: u64) -> Compressor {
        let (queue, receiver) = if settings.enabled {
            let bound = settings.queue.unwrap_or(max_objects.clamp(1, 1 << 24) as usize);
            let (tx, rx) = tokio::sync::mpsc::channel(bound);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        Compressor {
            queue,
            receiver: Mutex::new(receiver),
            pending: Mutex::new(HashMap::new()),
            settled: Notify::new(),
        }
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<KeyHash, u32>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn done(&self, hash: &KeyHash) {
        {
            let mut pending = self.lock_pending();
            if let Some(n) = pending.get_mut(hash) {
                *n -= 1;
                if *n == 0 {
                    pending.remove(hash);
                }
            }
        }
        self.settled.notify_waiters();
    }
}

impl Cache {
    /// Starts the compressing threads (once the cache is shared: they hold it weakly, and end
    /// when it is dropped).
    pub(super) fn start_compressor(self: &Arc<Self>) {
        let Some(receiver) = self
            .compressor
            .receiver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let receiver = Arc::new(Mutex::new(receiver));
        for i in 0..self.config.compress.threads {
            let (cache, receiver, runtime) = (Arc::downgrade(self), receiver.clone(), runtime.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("sidecache-compress-{i}"))
                .spawn(move || compress_loop(cache, receiver, runtime));
            if let Err(e) = spawned {
                warn!(error = %e, "failed to start a compressing thread");
            }
        }
    }

    /// Queues an object just stored (`meta`, as version `generation`) for its variants, if its
    /// type, size and head call for them and it lacks some. Never blocks: a full queue drops it
    /// (counted).
    pub(super) fn queue_variants(&self, hash: KeyHash, generation: u64, meta: &Meta, has: &[Coding]) {
        let Some(queue) = &self.compressor.queue else { return };
        let settings = &self.config.compress;
        if has.len() == Coding::ALL.len() || !settings.eligible(meta.status, &meta.headers, meta.body_len) {
            return;
        }
        let heuristic = Heuristic {
            fraction: self.config.heuristic_fraction,
            max: self.config.heuristic_max,
        };
        let prepared = Prepared::new(
            http::StatusCode::OK,
            &meta.headers,
            (meta.request_time, meta.response_time),
            meta.body_len,
            heuristic,
        );
        let immutable = CacheControl::parse(&meta.headers).immutable;
        let job = Job {
            hash,
            generation,
            body_len: meta.body_len,
            digest: meta.digest,
            levels: settings.levels(prepared.lifetime, immutable, meta.body_len),
            has: has.to_vec(),
        };
        *self.compressor.lock_pending().entry(hash).or_insert(0) += 1;
        match queue.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Closed(_)) => {
                metrics::counter!(m::COMPRESS_DROPPED).increment(1);
                self.compressor.done(&hash);
            }
        }
    }

    /// Waits (at most `limit`) until the variants of the object a request would get are made,
    /// or were not to be: `prime` answers only once what browsers ask for is ready. The fill
    /// that stores the object ends (its client may have the whole body a little before it is
    /// committed), then its compression; the first is looked at every few milliseconds, the
    /// second wakes this.
    pub async fn variants_settled(&self, key: &CacheKey, req: &http::HeaderMap, limit: Duration) {
        const FILL_POLL: Duration = Duration::from_millis(10);
        let hash = self.vary.variant_of(key, req);
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.compressor.settled.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let filling = self.flights.in_flight(&hash);
            if !filling && !self.compressor.lock_pending().contains_key(&hash) {
                return;
            }
            let wake = async {
                match filling {
                    true => tokio::time::sleep(FILL_POLL).await,
                    false => notified.await,
                }
            };
            if tokio::time::timeout_at(deadline, wake).await.is_err() {
                return;
            }
        }
    }

    /// Makes and stores the variants of one object (on a compressing thread).
    fn make_variants(self: &Arc<Self>, job: &Job, runtime: &tokio::runtime::Handle) {
        let Some(store) = self.store() else { return };
        // Still the version the job is for? (Evicted, purged or replaced meanwhile: nothing.)
        let current = self
            .lock_index()
            .peek(&job.hash)
            .is_some_and(|e| e.generation == job.generation);
        if !current {
            return;
        }
        let path = store.object_path(&job.hash, job.generation);
        let body = match fileio::open_for_read(&path).and_then(|f| fileio::read_at(&f, job.body_len as usize, 0, false))
        {
            Ok(Some(body)) => body,
            Ok(None) | Err(_) => return,
        };
        // Compress only what the record says the body is: a changed file is the lookup's to
        // find and drop.
        if Digest::from(blake3::hash(&body)) != job.digest {
            return;
        }
        // A fast probe first: a body that the quickest zstd level cannot shrink by 1/16 (minified
        // and already dense, or binary) is not worth the best levels' CPU.
        let probe = compress::encode(Coding::Zstd, 1, &body).map(|p| p.len() as u64);
        if !probe.is_ok_and(|len| compress::worth_keeping(len, job.body_len)) {
            for coding in Coding::ALL {
                metrics::counter!(m::VARIANTS_SKIPPED, "encoding" => coding.token()).increment(1);
            }
            return;
        }
        for coding in Coding::ALL {
            if job.has.contains(&coding) {
                continue;
            }
            let level = job.levels.of(coding);
            let started = Instant::now();
            let coded = match compress::encode(coding, level, &body) {
                Ok(coded) => coded,
                Err(e) => {
                    warn!(error = %e, coding = coding.token(), "compression failed");
                    continue;
                }
            };
            let took = started.elapsed();
            let labels = [("encoding", coding.token())];
            metrics::histogram!(m::COMPRESS_SECONDS, &labels).record(took.as_secs_f64());
            metrics::counter!(m::COMPRESS_INPUT_BYTES, &labels).increment(job.body_len);
            if !compress::worth_keeping(coded.len() as u64, job.body_len) {
                metrics::counter!(m::VARIANTS_SKIPPED, &labels).increment(1);
                continue;
            }
            let stored = runtime.block_on(self.store_variant(&store, job, coding, &coded));
            if stored {
                metrics::counter!(m::VARIANTS_MADE, &labels).increment(1);
                metrics::counter!(m::COMPRESS_OUTPUT_BYTES, &labels).increment(coded.len() as u64);
            }
        }
    }

    /// Stores one coded body as a variant of the job's object: room reserved, file written
    /// whole under its final name, then added to the entry if it is still that version.
    async fn store_variant(
        self: &Arc<Self>,
        store: &Arc<store::Store>,
        job: &Job,
        coding: Coding,
        coded: &[u8],
    ) -> bool {
        let digest = Digest::from(blake3::hash(coded));
        let record = VariantRecord {
            coding,
            body_len: coded.len() as u64,
            digest,
            made_from: (job.body_len, job.digest),
        }
        .encode();
        let file_len = coded.len() as u64 + record.len() as u64;
        let charged = self.charge(file_len);
        let Ok(reserved) = self.budget.reserve_room(charged, 1, self).await else {
            metrics::counter!(m::VARIANTS_SKIPPED, "encoding" => coding.token()).increment(1);
            return false;
        };
        let reserved = reserved.keep();
        let generation = store.next_gen();
        // (A compressing thread: blocking here stalls no event loop.)
        let written = store.write_variant(&job.hash, generation, coding, &[coded, &record]);
        let mtime = match written {
            Ok(mtime) => mtime,
            Err(e) => {
                self.storage_error(&e);
                self.release_fill(reserved);
                return false;
            }
        };
        let variant = Variant {
            coding,
            generation,
            body_len: coded.len() as u64,
            tail_len: record.len() as u64,
            digest,
            verified: true,
            mtime,
        };
        let added = self
            .lock_index()
            .add_variant(&job.hash, job.generation, variant, reserved);
        if !added {
            let _ = store.remove_variant(&job.hash, generation, coding);
            self.release_fill(reserved);
            return false;
        }
        self.publish_gauges();
        true
    }
}

/// A compressing thread: jobs until the cache is gone.
fn compress_loop(cache: Weak<Cache>, receiver: Arc<Mutex<Receiver<Job>>>, runtime: tokio::runtime::Handle) {
    // Serving comes first: this thread yields the CPU to the event loops (nice 10; Linux keeps
    // a nice value per thread).
    if let Err(e) = rustix::process::setpriority_process(None, 10) {
        debug!(error = %e, "could not lower the compressing thread's priority");
    }
    loop {
        let job = {
            let mut rx = receiver.lock().unwrap_or_else(|p| p.into_inner());
            match rx.blocking_recv() {
                Some(job) => job,
                None => return,
            }
        };
        let Some(cache) = cache.upgrade() else { return };
        let started = SystemTime::now();
        cache.make_variants(&job, &runtime);
        cache.compressor.done(&job.hash);
        debug!(key = %job.hash, took = ?started.elapsed().unwrap_or_default(), "variants made");
    }
}
