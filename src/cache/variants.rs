//! Compressed variants made once per distinct body, off the request path: when an object is
//! stored whose type compresses (`compress::Settings::eligible`), a job for it joins its body
//! (identity digest and length): the first job of a body puts the body on a small bounded
//! queue (`compress.queue` bodies), later ones wait beside it. A small pool of threads of its
//! own (`compress.threads`, each at a lower CPU priority, so serving always comes first) takes
//! a body, reads it back, makes its brotli, zstd and gzip versions at the levels its lifetime
//! calls for, and stores each one worth it as a variant file of every key waiting on that body
//! ([`index::Index::add_variant`]). A body compressed before, whose variants another key still
//! holds, is not compressed again: those files' bytes are checked and stored for the new key.
//! So a flood of keys for one body (cache-busting query strings) costs one compression.
//!
//! Compression is paced by a CPU budget ([`compress::CpuBudget`], `compress.cpu_share` of one
//! core on average, `compress.cpu_burst` at once): a thread waits for it before it starts a
//! body, so a flood of distinct bodies costs at most the budget; the bodies that do not fit
//! the queue meanwhile are not compressed (`sidecache_compress_dropped_total{reason}`). Until
//! its variants exist an object's requests get the identity body: nothing ever waits on
//! compression but `prime`, which asks to ([`Cache::variants_settled`]).
//!
//! The compressor owns its queue and [`State`] (a std mutex, a leaf: held to add or take jobs,
//! never across an `.await`, never while another lock is taken), and the budget (a leaf too).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::{Receiver, Sender};
use tracing::{debug, warn};

use crate::cache::Cache;
use crate::cache::index::{Image, Variant};
use crate::cache::key::{CacheKey, Digest, KeyHash};
use crate::cache::meta::Meta;
use crate::cache::read::Source;
use crate::cache::segments::{self, Kind, Place};
use crate::cache::store::{self, VariantRecord};
use crate::compress::{self, CpuBudget, Levels};
use crate::metrics as m;
use crate::negotiate::Coding;
use crate::policy::{CacheControl, Heuristic, Prepared};

/// A body's identity: its digest and length (as a variant record's `made_from`).
type Body = (Digest, u64);

/// Bodies remembered as compressed (a hint of which key holds their variants). Past this many
/// the hints start over: a forgotten one costs at most one compression more.
const MADE_HINTS: usize = 4096;

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

/// Why an object was not compressed; the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dropped {
    /// The queue of bodies waiting for a thread (and the CPU budget) was full.
    QueueFull,
}

impl Dropped {
    fn as_str(self) -> &'static str {
        match self {
            Dropped::QueueFull => "queue_full",
        }
    }
}

/// What one body was found to give, in a thread's hands while it serves the body's jobs.
#[derive(Default)]
struct Coded {
    /// The identity body, once read.
    body: Option<Vec<u8>>,
    /// Each coding's bytes (`None`: made, not worth keeping).
    codings: HashMap<Coding, Option<Arc<[u8]>>>,
    /// The fast probe found the body not worth compressing.
    incompressible: bool,
    /// Looked for another key's variants of the body already.
    looked: bool,
}

/// What is known of a body compressed before.
#[derive(Debug, Clone, Copy)]
enum Made {
    /// This key's entry held its variants.
    By(KeyHash),
    /// The probe found it not worth compressing.
    Incompressible,
}

/// The jobs and bodies waiting.
#[derive(Default)]
struct State {
    /// Keys queued or being compressed, with how many of their jobs are (a newer version of a
    /// key may be queued behind an older one: each job compresses the version it was queued
    /// for, if that is still the one stored).
    pending: HashMap<KeyHash, u32>,
    /// Bodies on the queue or being compressed, with the jobs not yet taken.
    bodies: HashMap<Body, Vec<Job>>,
    /// Bodies compressed before (bounded by [`MADE_HINTS`]).
    made: HashMap<Body, Made>,
}

/// The queue, the jobs waiting and the CPU budget.
pub(super) struct Compressor {
    /// `None` when compression is off. Bounded: `compress.queue` bodies.
    queue: Option<Sender<Body>>,
    /// Taken by the threads when they start.
    receiver: Mutex<Option<Receiver<Body>>>,
    state: Mutex<State>,
    /// Shared by the threads (a leaf lock).
    budget: Arc<Mutex<CpuBudget>>,
    /// Woken whenever a key leaves `pending`.
    settled: Notify,
}

impl Compressor {
    pub(super) fn new(settings: &compress::Settings) -> Compressor {
        let (queue, receiver) = if settings.enabled {
            let (tx, rx) = tokio::sync::mpsc::channel(settings.queue.max(1));
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        Compressor {
            queue,
            receiver: Mutex::new(receiver),
            state: Mutex::new(State::default()),
            budget: Arc::new(Mutex::new(CpuBudget::new(
                settings.cpu_share,
                settings.cpu_burst,
                Instant::now(),
            ))),
            settled: Notify::new(),
        }
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a job: to its body's waiting jobs, or with its body onto the queue.
    fn offer(&self, queue: &Sender<Body>, job: Job) {
        let body = (job.digest, job.body_len);
        let hash = job.hash;
        let mut state = self.lock_state();
        *state.pending.entry(hash).or_insert(0) += 1;
        if let Some(waiting) = state.bodies.get_mut(&body) {
            waiting.push(job);
            return;
        }
        match queue.try_send(body) {
            Ok(()) => {
                state.bodies.insert(body, vec![job]);
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Closed(_)) => {
                drop(state);
                metrics::counter!(m::COMPRESS_DROPPED, "reason" => Dropped::QueueFull.as_str()).increment(1);
                self.done(&hash);
            }
        }
    }

    /// The jobs of `body` not yet taken; none left: the body leaves (later jobs queue it
    /// again).
    fn take(&self, body: &Body) -> Vec<Job> {
        let mut state = self.lock_state();
        match state.bodies.get_mut(body) {
            Some(jobs) if !jobs.is_empty() => std::mem::take(jobs),
            _ => {
                state.bodies.remove(body);
                Vec::new()
            }
        }
    }

    fn made(&self, body: &Body) -> Option<Made> {
        self.lock_state().made.get(body).copied()
    }

    fn remember(&self, body: Body, made: Made) {
        let mut state = self.lock_state();
        if state.made.len() >= MADE_HINTS && !state.made.contains_key(&body) {
            state.made.clear();
        }
        state.made.insert(body, made);
    }

    fn done(&self, hash: &KeyHash) {
        {
            let mut state = self.lock_state();
            if let Some(n) = state.pending.get_mut(hash) {
                *n -= 1;
                if *n == 0 {
                    state.pending.remove(hash);
                }
            }
        }
        self.settled.notify_waiters();
    }

    fn is_pending(&self, hash: &KeyHash) -> bool {
        self.lock_state().pending.contains_key(hash)
    }
}

/// Waits (on a compressing thread) until the budget allows work; false if the cache went
/// away meanwhile.
fn pace(budget: &Mutex<CpuBudget>, cache: &Weak<Cache>) -> bool {
    loop {
        let wait = budget.lock().unwrap_or_else(|p| p.into_inner()).wait(Instant::now());
        if wait.is_zero() {
            return true;
        }
        // Rate limiting, not synchronisation: the bucket fills with time alone. In slices, so
        // a cache dropped meanwhile ends the thread.
        std::thread::sleep(wait.min(Duration::from_millis(250)));
        if cache.strong_count() == 0 {
            return false;
        }
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
        for i in 0..self.settings.compress.threads {
            let (cache, receiver, runtime) = (Arc::downgrade(self), receiver.clone(), runtime.clone());
            let budget = self.compressor.budget.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("sidecache-compress-{i}"))
                .spawn(move || compress_loop(cache, receiver, budget, runtime));
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
        let settings = &self.settings.compress;
        if has.len() == Coding::ALL.len() || !settings.eligible(meta.status, &meta.headers, meta.body_len) {
            return;
        }
        let heuristic = Heuristic {
            fraction: self.settings.heuristic_fraction,
            max: self.settings.heuristic_max,
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
        self.compressor.offer(queue, job);
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
            if !filling && !self.compressor.is_pending(&hash) {
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

    /// Makes and stores the variants of one object (on a compressing thread), from what
    /// `coded` holds of its body, from another key's variants of it, or by compressing it.
    fn make_variants(self: &Arc<Self>, job: &Job, coded: &mut Coded, runtime: &tokio::runtime::Handle) {
        let Some(store) = self.store() else { return };
        // Still the version the job is for? (Evicted, purged or replaced meanwhile: nothing.)
        let current = self
            .lock_index()
            .peek(&job.hash)
            .is_some_and(|e| e.image.generation == job.generation);
        if !current {
            return;
        }
        let body: Body = (job.digest, job.body_len);
        if !coded.looked {
            coded.looked = true;
            match self.compressor.made(&body) {
                Some(Made::Incompressible) => coded.incompressible = true,
                Some(Made::By(other)) if other != job.hash => self.reuse_variants(&store, &other, body, coded),
                _ => {}
            }
        }
        for coding in Coding::ALL {
            if job.has.contains(&coding) {
                continue;
            }
            let labels = [("encoding", coding.token())];
            if coded.incompressible {
                metrics::counter!(m::VARIANTS_SKIPPED, &labels).increment(1);
                continue;
            }
            let (bytes, reused) = match coded.codings.get(&coding) {
                Some(bytes) => (bytes.clone(), true),
                None => {
                    let Some(bytes) = self.encode(&store, job, coding, coded) else {
                        if coded.incompressible {
                            metrics::counter!(m::VARIANTS_SKIPPED, &labels).increment(1);
                            self.compressor.remember(body, Made::Incompressible);
                        }
                        continue;
                    };
                    coded.codings.insert(coding, bytes.clone());
                    (bytes, false)
                }
            };
            let Some(bytes) = bytes else {
                metrics::counter!(m::VARIANTS_SKIPPED, &labels).increment(1);
                continue;
            };
            if runtime.block_on(self.store_variant(&store, job, coding, &bytes)) {
                metrics::counter!(m::VARIANTS_MADE, &labels).increment(1);
                if reused {
                    metrics::counter!(m::VARIANTS_REUSED, &labels).increment(1);
                } else {
                    metrics::counter!(m::COMPRESS_OUTPUT_BYTES, &labels).increment(bytes.len() as u64);
                }
                self.compressor.remember(body, Made::By(job.hash));
            }
        }
    }

    /// Takes the variants another key (`other`) holds of `body` into `coded`: each file's
    /// coded bytes, checked against its digest (a changed file is not copied).
    fn reuse_variants(&self, store: &store::Store, other: &KeyHash, body: Body, coded: &mut Coded) {
        let variants: Vec<Variant> = {
            let ix = self.lock_index();
            match ix.peek(other) {
                Some(e) if (e.image.digest, e.image.body_len) == body => e.variants.to_vec(),
                _ => return,
            }
        };
        for v in variants {
            let source = Source::of(store, other, v.image.generation, Some(v.coding), &v.image.place);
            let Ok(bytes) = source.read(v.image.body_len, 0) else {
                continue;
            };
            if Digest::from(blake3::hash(&bytes)) == v.image.digest {
                coded.codings.insert(v.coding, Some(bytes.into()));
            }
        }
    }

    /// Compresses the job's body in `coding` (reading it, and probing it, first if not done
    /// yet), spending its thread CPU time from the budget. `None`: it could not be read, did
    /// not match its record, failed, or the probe found it incompressible (`coded` says so);
    /// `Some(None)`: made, not worth keeping.
    fn encode(&self, store: &store::Store, job: &Job, coding: Coding, coded: &mut Coded) -> Option<Option<Arc<[u8]>>> {
        let cpu = compress::thread_cpu_time();
        let result = self.encode_unpaced(store, job, coding, coded);
        let spent = compress::thread_cpu_time().saturating_sub(cpu);
        self.compressor
            .budget
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .spend(spent, Instant::now());
        result
    }

    fn encode_unpaced(
        &self,
        store: &store::Store,
        job: &Job,
        coding: Coding,
        coded: &mut Coded,
    ) -> Option<Option<Arc<[u8]>>> {
        if coded.body.is_none() {
            // Where the version is (gone from the index: nothing to make).
            let place = match self.lock_index().peek(&job.hash) {
                Some(e) if e.image.generation == job.generation => e.image.place.clone(),
                _ => return None,
            };
            let body = Source::of(store, &job.hash, job.generation, None, &place)
                .read(job.body_len, 0)
                .ok()?;
            // Compress only what the record says the body is: a changed file is the lookup's
            // to find and drop.
            if Digest::from(blake3::hash(&body)) != job.digest {
                return None;
            }
            // A fast probe first: a body that the quickest zstd level cannot shrink by 1/16
            // (minified and already dense, or binary) is not worth the best levels' CPU.
            let probe = compress::encode(Coding::Zstd, 1, &body).map(|p| p.len() as u64);
            if !probe.is_ok_and(|len| compress::worth_keeping(len, job.body_len)) {
                coded.incompressible = true;
                return None;
            }
            coded.body = Some(body);
        }
        let body = coded.body.as_deref()?;
        let level = job.levels.of(coding);
        let started = compress::thread_cpu_time();
        let bytes = match compress::encode(coding, level, body) {
            Ok(bytes) => bytes,
            Err(e) => {
                warn!(error = %e, coding = coding.token(), "compression failed");
                return None;
            }
        };
        let labels = [("encoding", coding.token())];
        metrics::histogram!(m::COMPRESS_SECONDS, &labels)
            .record(compress::thread_cpu_time().saturating_sub(started).as_secs_f64());
        metrics::counter!(m::COMPRESS_INPUT_BYTES, &labels).increment(job.body_len);
        Some(compress::worth_keeping(bytes.len() as u64, job.body_len).then(|| bytes.into()))
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
        let slotted = self.slotted(coded.len() as u64).cloned();
        let charged = self.charge(file_len + slotted.as_ref().map_or(0, |_| segments::PREFIX_LEN));
        // Bytes only: a variant is not an object against `max_objects`.
        let Ok(reserved) = self.budget.reserve_room(charged, 0, self).await else {
            metrics::counter!(m::VARIANTS_SKIPPED, "encoding" => coding.token()).increment(1);
            return false;
        };
        let generation = store.next_gen();
        // (A compressing thread: blocking here stalls no event loop.) A failed write drops the
        // reservation, which gives it back.
        let tail_len = record.len() as u64;
        let written = match slotted {
            Some(segments) => {
                let parts = vec![Bytes::copy_from_slice(coded), Bytes::from(record)];
                segments
                    .write(Kind::Variant(coding), job.hash, generation, parts)
                    .await
                    .map(|slot| (Place::Slot(slot), 0))
            }
            None => store
                .write_variant(&job.hash, generation, coding, &[coded, &record])
                .map(|mtime| (Place::File, mtime)),
        };
        let (place, mtime) = match written {
            Ok(done) => done,
            Err(e) => {
                self.storage_error(&e);
                return false;
            }
        };
        let variant = Variant {
            coding,
            image: Image {
                generation,
                body_len: coded.len() as u64,
                tail_len,
                place: place.clone(),
                digest,
                verified: true,
                mtime,
            },
        };
        // Converted, or given back, by the index in one step.
        let added = {
            let mut ix = self.lock_index();
            let reserved = reserved.hand_over(&mut ix);
            ix.add_variant(&job.hash, job.generation, variant, reserved)
        };
        if !added {
            match place {
                Place::File => {
                    let _ = store.remove_variant(&job.hash, generation, coding);
                }
                slot => slot.discard(),
            }
            return false;
        }
        self.publish_gauges();
        true
    }
}

/// A compressing thread: bodies until the cache is gone. Each body waits for the CPU budget,
/// then its jobs are served (those that join it meanwhile too) from one compression.
fn compress_loop(
    cache: Weak<Cache>,
    receiver: Arc<Mutex<Receiver<Body>>>,
    budget: Arc<Mutex<CpuBudget>>,
    runtime: tokio::runtime::Handle,
) {
    // Serving comes first: this thread yields the CPU to the event loops (nice 10; Linux keeps
    // a nice value per thread).
    if let Err(e) = rustix::process::setpriority_process(None, 10) {
        debug!(error = %e, "could not lower the compressing thread's priority");
    }
    loop {
        let body = {
            let mut rx = receiver.lock().unwrap_or_else(|p| p.into_inner());
            match rx.blocking_recv() {
                Some(body) => body,
                None => return,
            }
        };
        if !pace(&budget, &cache) {
            return;
        }
        let Some(cache) = cache.upgrade() else { return };
        let mut coded = Coded::default();
        loop {
            let jobs = cache.compressor.take(&body);
            if jobs.is_empty() {
                break;
            }
            for job in jobs {
                let started = SystemTime::now();
                cache.make_variants(&job, &mut coded, &runtime);
                cache.compressor.done(&job.hash);
                debug!(key = %job.hash, took = ?started.elapsed().unwrap_or_default(), "variants made");
            }
        }
    }
}
