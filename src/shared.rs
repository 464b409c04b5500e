//! The shared tier: a second tier in S3-compatible object storage behind every instance's local
//! disk, so a fleet asks the app once per asset instead of once per instance.
//!
//! ```text
//! proxy: local miss (leader of the key's flight)
//!    |-- SharedTier::lookup: one GET (timeout, bounded), checked --> Cache::import --> served
//!    '-- not there / refused / failed / breaker open --> the app, as without the tier
//!              '-- fill committed, shareable --> SharedTier::offer --> bounded queue
//!                        '-- uploader: reads the object file, checks it, one PUT
//! ```
//!
//! # Bucket layout
//!
//! `s3://BUCKET/PREFIX/objects-v2/<key hash, 32 hex digits>`: one object per cache key, its
//! bytes exactly the local object file (`body | record | footer`, see [`crate::cache::store`]),
//! so a downloaded object is checked the way a local file is (footer, record checksum, body
//! digest: [`store::check_object`]) before it is stored or served. The record carries the full
//! key (compared, so a hash collision or a misplaced object is refused), the headers and the
//! times the app answered at: freshness counts from the app's answer, not from the download.
//! The format's version is in the path; a new format moves to a new directory.
//!
//! # What is shared
//!
//! Only the identity object of a `200` response without `Vary`, fresh for at least
//! `shared_tier_min_fresh`, never `private` (not stored at all), never one that set a cookie
//! (even one a rule strips), never one for a request with `Authorization`, and at most
//! [`MAX_SHARED_OBJECT`] bytes. Responses with `Vary` are not shared: their variants are stored
//! under hashes a new instance cannot compute before it has seen the app's `Vary` (a read with
//! the wrong spec would find nothing at best). An object with `Vary` found in the bucket is
//! refused. Compressed variant files are local only.
//!
//! # What an instance writes
//!
//! Keys are partly the client's choice (the query string, the `Host`), and each key of a
//! shareable asset is one PUT of up to [`MAX_SHARED_OBJECT`] bytes. So what an instance uploads
//! is bounded ([`UploadGate`]): at most `shared_tier_upload_budget` bytes per hour (a token
//! bucket in bytes), and a body (by its digest) uploaded under one key in the last hour is not
//! uploaded again under another: `/app.js?bust=1`, `?bust=2`, ... cost one upload, not one
//! each. (The layout stays one object per key: content-addressed bodies would cost every
//! read-through a second GET, and the bound is what the attack needs.) The other keys are
//! simply not shared: their instances ask the app, as without the tier.
//!
//! # Failing open
//!
//! Every failure sends the request on to the app: a GET is bounded by `shared_tier_timeout`
//! (waiting for one of `shared_tier_concurrency` slots included), uploads wait in a queue of
//! `shared_tier_queue` (full: dropped and counted, never waited for), and after
//! [`BREAKER_THRESHOLD`] failures in a row the tier is skipped for `shared_tier_cooldown`, then
//! one request probes it. A call that succeeds but takes more than half the timeout counts as
//! a failure there (`slow`): a bucket answering just inside the timeout would otherwise cost
//! every miss that long, for ever. Reads and writes keep their own breakers ([`Op`]): a bucket
//! that refuses uploads while it serves reads (or the other way round) has that path skipped,
//! and the successes of one never hide the failures of the other. Downloaded and uploaded bodies are held in memory, bounded by
//! [`MEMORY_BUDGET`] together.
//!
//! Trust: the checks catch corruption, truncation and misplaced objects, not a forger. Whoever
//! may write the prefix can write a self-consistent object (a digest is not a signature), so
//! write access to it is as trusted as the app itself; the instances need read and write on it
//! and nothing else.
//!
//! Credentials come from the standard `AWS_*` environment (object_store's S3 client) and are
//! never logged: the only description of the tier in logs is `s3://BUCKET/PREFIX`.
//!
//! Owns its client, its queue, its slots and its breakers (one std mutex each, a leaf: held for a
//! few assignments, never across an `.await`). It never touches the index or the disk itself:
//! reads and stores go through [`Cache`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::bucket::TokenBucket;
use crate::cache::Cache;
use crate::cache::key::{CacheKey, Digest, KeyHash};
use crate::cache::meta::Meta;
use crate::cache::store::{self, ObjectRefused};
use crate::metrics as m;
use crate::shared_tier::SharedTierConfig;

/// Largest object file (body, record and footer) shared, either way.
pub const MAX_SHARED_OBJECT: u64 = 32 << 20;
/// Bytes of downloads and uploads held in memory at once, all together.
pub const MEMORY_BUDGET: u64 = 64 << 20;
/// Failures in a row that open the breaker.
pub const BREAKER_THRESHOLD: u32 = 5;
/// The directory under the prefix: the object image format's version (a new format moves it).
const LAYOUT: &str = store::IMAGE_FORMAT;

/// Whether a fill may be shared with the fleet: a `200` without `Vary`, neither `private` nor
/// `no-store`, whose answer set no cookie (`set_cookie`: even one a rule strips) and whose
/// request carried no `Authorization`. (Its freshness is checked by the caller.)
pub fn shareable(meta: &Meta, request: &http::HeaderMap, set_cookie: bool) -> bool {
    let (cc, _) = crate::policy::response_directives(&meta.headers);
    meta.status == 200
        && meta.vary.is_empty()
        && !set_cookie
        && !meta.headers.contains_key(http::header::SET_COOKIE)
        && !request.contains_key(http::header::AUTHORIZATION)
        && !cc.private
        && !cc.no_store
        && meta.body_len < MAX_SHARED_OBJECT
}

/// The circuit breaker: closed (every call goes), open (calls are skipped until a time), then
/// half-open (one probe goes; its success closes it, its failure opens it again). A success
/// slower than `slow` is a failure to it ([`Breaker::succeeded`]). Pure state, clocked by its
/// caller.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    slow: Duration,
    state: Mutex<BreakerState>,
}

/// What a call that succeeded did to the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Succeeded {
    /// In time: the breaker is closed.
    InTime {
        /// Whether this closed an open breaker.
        reopened: bool,
    },
    /// Slower than the bound: counted as a failure.
    Slow {
        /// Whether this opened the breaker.
        opened: bool,
    },
}

#[derive(Debug, Default)]
struct BreakerState {
    failures: u32,
    open_until: Option<Instant>,
    /// When the half-open probe went out. A probe that never reports (its upload returned
    /// early, its request was dropped with the client's) is lost after a cooldown, not held
    /// out for ever: a new one may go.
    probing: Option<Instant>,
}

impl Breaker {
    /// Opens after `threshold` failures in a row (a success slower than `slow` is one), for
    /// `cooldown`.
    pub fn new(threshold: u32, cooldown: Duration, slow: Duration) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            cooldown,
            slow,
            state: Mutex::new(BreakerState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        // Each step is a few assignments: poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a call may go now: closed, or the one probe once the cooldown is over.
    pub fn allow(&self, now: Instant) -> bool {
        let mut s = self.lock();
        match s.open_until {
            None => true,
            Some(until) if now < until => false,
            Some(_) if s.probing.is_some_and(|at| now < at + self.cooldown) => false,
            Some(_) => {
                s.probing = Some(now);
                true
            }
        }
    }

    /// A call succeeded: closed.
    pub fn success(&self) {
        *self.lock() = BreakerState::default();
    }

    /// A call succeeded after `took`: closed when in time; a failure when slower than the bound.
    pub fn succeeded(&self, took: Duration, now: Instant) -> Succeeded {
        if took > self.slow {
            return Succeeded::Slow {
                opened: self.failure(now),
            };
        }
        let reopened = self.is_open();
        self.success();
        Succeeded::InTime { reopened }
    }

    /// A call failed; true when this opened the breaker.
    pub fn failure(&self, now: Instant) -> bool {
        let mut s = self.lock();
        s.failures = s.failures.saturating_add(1);
        if s.probing.is_some() || (s.open_until.is_none() && s.failures >= self.threshold) {
            s.open_until = Some(now + self.cooldown);
            s.probing = None;
            return true;
        }
        false
    }

    /// Whether calls are being skipped (open, or half-open with its probe out).
    pub fn is_open(&self) -> bool {
        self.lock().open_until.is_some()
    }
}

/// A kind of call to the bucket, each with its own breaker; the `op` label of the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A read (GET).
    Get,
    /// An upload (PUT).
    Put,
}

impl Op {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Put => "put",
        }
    }
}

/// The window of the upload budget, and how long an uploaded body keeps other keys with the same
/// body from being uploaded.
pub const UPLOAD_WINDOW: Duration = Duration::from_secs(3600);
/// Bodies [`UploadGate`] remembers at most.
const RECENT_BODIES: usize = 65_536;

/// Why an upload was not let through by the [`UploadGate`]; the `reason` label of the drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// The same body went up under another key within [`UPLOAD_WINDOW`].
    Duplicate,
    /// The hour's byte budget is spent.
    Budget,
}

impl Skip {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::Duplicate => "duplicate",
            Skip::Budget => "budget",
        }
    }
}

/// Bounds what this instance writes to the bucket, whatever keys its clients make up: bytes per
/// [`UPLOAD_WINDOW`] (a token bucket in bytes, starting full), and one upload per body per
/// window. Lock order: `recent`, then the budget's own (a leaf); neither is held across an
/// `.await`.
#[derive(Debug)]
pub struct UploadGate {
    budget: TokenBucket,
    /// Body digest -> the key it went up under, and when.
    recent: Mutex<HashMap<Digest, (KeyHash, Instant)>>,
}

impl UploadGate {
    /// At most `budget` bytes per [`UPLOAD_WINDOW`].
    pub fn new(budget: u64) -> UploadGate {
        UploadGate {
            budget: TokenBucket::per_window(budget, UPLOAD_WINDOW),
            recent: Mutex::new(HashMap::new()),
        }
    }

    /// Lets an upload of `bytes` (the object file) of `key`, whose body is `digest`, through at
    /// `now`, or says why not. The same key again (a refreshed copy) is no duplicate.
    pub fn admit(&self, key: KeyHash, digest: Digest, bytes: u64, now: Instant) -> Result<(), Skip> {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&(under, at)) = recent.get(&digest)
            && under != key
            && now.saturating_duration_since(at) < UPLOAD_WINDOW
        {
            return Err(Skip::Duplicate);
        }
        if !self.budget.try_take_many_at(bytes, now) {
            return Err(Skip::Budget);
        }
        if recent.len() >= RECENT_BODIES {
            recent.retain(|_, (_, at)| now.saturating_duration_since(*at) < UPLOAD_WINDOW);
            if recent.len() >= RECENT_BODIES {
                // Bounded: forgetting lets a body up once more, which the budget still bounds.
                recent.clear();
            }
        }
        recent.insert(digest, (key, now));
        Ok(())
    }

    /// The upload of `key` with `digest` failed: another key with that body may go up.
    pub fn forget(&self, key: KeyHash, digest: Digest) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.get(&digest).is_some_and(|&(under, _)| under == key) {
            recent.remove(&digest);
        }
    }
}

/// What a shared-tier read found.
#[derive(Debug)]
pub enum Lookup {
    /// A checked object: its record (boxed: it is large), the whole object file, and its share
    /// of [`MEMORY_BUDGET`], to hold until the bytes are stored or dropped.
    Found(Box<Meta>, Bytes, Option<tokio::sync::OwnedSemaphorePermit>),
    /// Nothing for this key (or nothing usable: refused, too large).
    Miss,
    /// Not asked: the breaker is open.
    Skipped,
    /// The bucket failed or was too slow.
    Failed,
}

/// An upload offered after a fill: the object committed for this key with these times.
#[derive(Debug, Clone)]
pub struct Upload {
    /// The key (its own hash: shared objects have no `Vary`).
    pub key: CacheKey,
    /// When the app was asked (ms precision, as the record keeps it).
    pub request_time: SystemTime,
    /// When the app answered.
    pub response_time: SystemTime,
}

/// Failure kinds, the `kind` label of the errors metric.
fn error_kind(e: &object_store::Error) -> &'static str {
    match e {
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => "denied",
        _ => "request",
    }
}

/// KiB permits of [`MEMORY_BUDGET`] for `bytes`.
fn kib(bytes: u64) -> u32 {
    bytes.div_ceil(1024).min(u64::from(u32::MAX)) as u32
}

/// The shared tier: the bucket client, the read slots, the upload queue and the breaker.
pub struct SharedTier {
    store: Arc<dyn ObjectStore>,
    config: SharedTierConfig,
    /// `PREFIX/objects-v2`.
    root: String,
    reads: Semaphore,
    writes: Arc<Semaphore>,
    memory: Arc<Semaphore>,
    /// The reads' breaker.
    get_breaker: Breaker,
    /// The uploads' breaker.
    put_breaker: Breaker,
    /// Bounds what is uploaded.
    gate: UploadGate,
    queue: mpsc::Sender<Upload>,
    /// Taken by [`SharedTier::run_uploads`].
    pending: Mutex<Option<mpsc::Receiver<Upload>>>,
    /// What this instance purged or invalidated: the bucket keeps its copy, which must not
    /// come back through a read-through.
    purged: Purged,
}

/// Keys marked one by one (invalidations) before they fold into the mark for all keys.
const PURGED_KEYS: usize = 65_536;

/// Times (ms since the epoch) before which objects in the bucket are not taken: for every
/// key (a purge), and for single keys (an unsafe request's invalidation). A std mutex, held
/// for a map step, never across an `.await`; a leaf (no other lock is taken under it).
#[derive(Debug, Default)]
struct Purged {
    all: std::sync::atomic::AtomicU64,
    keys: Mutex<HashMap<KeyHash, u64>>,
}

impl Purged {
    fn all(&self, at: SystemTime) {
        self.all.fetch_max(millis(at), std::sync::atomic::Ordering::Relaxed);
    }

    fn key(&self, key: KeyHash, at: SystemTime) {
        let at = millis(at);
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if keys.len() >= PURGED_KEYS {
            // Bounded: every mark held so far becomes one for all keys (no later than `at`).
            keys.clear();
            drop(keys);
            self.all.fetch_max(at, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        let mark = keys.entry(key).or_default();
        *mark = (*mark).max(at);
    }

    /// Whether an object of `key` the app answered at `answered` was purged since.
    fn covers(&self, key: &KeyHash, answered: SystemTime) -> bool {
        let answered = millis(answered);
        if answered < self.all.load(std::sync::atomic::Ordering::Relaxed) {
            return true;
        }
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.get(key).is_some_and(|&mark| answered < mark)
    }
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl std::fmt::Debug for SharedTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client's own Debug may show its configuration: only the bucket and prefix.
        f.debug_struct("SharedTier")
            .field("at", &self.config.describe())
            .finish_non_exhaustive()
    }
}

impl SharedTier {
    /// A client for the bucket: the endpoint, region and credentials from the `AWS_*`
    /// variables of `env`, requests bounded by the configured timeout and never retried (a
    /// retry would outlast the timeout; the request goes to the app instead).
    pub fn open(
        config: SharedTierConfig,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Arc<SharedTier>, String> {
        // The client is built with rustls; its provider must be chosen first (ring).
        let _ = rustls::crypto::ring::default_provider().install_default();
        // A backstop only: each call is bounded by `config.timeout` around it (so a slow
        // bucket is always counted as a timeout), a slot waited for included.
        let options = ClientOptions::new()
            .with_timeout(config.timeout + Duration::from_secs(1))
            .with_connect_timeout(config.timeout);
        let mut builder = AmazonS3Builder::new().with_client_options(options);
        for (var, value) in env {
            if var.starts_with("AWS_")
                && let Ok(key) = var.to_ascii_lowercase().parse::<AmazonS3ConfigKey>()
            {
                builder = builder.with_config(key, value);
            }
        }
        let retry = RetryConfig {
            max_retries: 0,
            retry_timeout: config.timeout,
            ..RetryConfig::default()
        };
        let store = builder
            .with_bucket_name(&config.bucket)
            .with_retry(retry)
            .build()
            // Its messages name the setting at fault, never a secret's value.
            .map_err(|e| format!("shared tier {}: {e}", config.describe()))?;
        let root = if config.prefix.is_empty() {
            LAYOUT.to_owned()
        } else {
            format!("{}/{LAYOUT}", config.prefix)
        };
        // Present (closed) from the start, so dashboards and alerts see the series.
        for op in [Op::Get, Op::Put] {
            metrics::gauge!(m::SHARED_BREAKER_OPEN, "op" => op.as_str()).set(0.0);
        }
        let (queue, pending) = mpsc::channel(config.queue.max(1));
        let concurrency = config.concurrency.max(1);
        Ok(Arc::new(SharedTier {
            store: Arc::new(store),
            root,
            reads: Semaphore::new(concurrency),
            writes: Arc::new(Semaphore::new(concurrency)),
            memory: Arc::new(Semaphore::new(kib(MEMORY_BUDGET) as usize)),
            get_breaker: Breaker::new(BREAKER_THRESHOLD, config.cooldown, config.timeout / 2),
            put_breaker: Breaker::new(BREAKER_THRESHOLD, config.cooldown, config.timeout / 2),
            gate: UploadGate::new(config.upload_budget),
            queue,
            pending: Mutex::new(Some(pending)),
            purged: Purged::default(),
            config,
        }))
    }

    /// The settings in force.
    pub fn config(&self) -> &SharedTierConfig {
        &self.config
    }

    /// Where a key's object lives in the bucket.
    pub fn object_path(&self, hash: &KeyHash) -> String {
        format!("{}/{}", self.root, hash.to_hex())
    }

    fn breaker(&self, op: Op) -> &Breaker {
        match op {
            Op::Get => &self.get_breaker,
            Op::Put => &self.put_breaker,
        }
    }

    fn failed(&self, op: Op, kind: &'static str) {
        metrics::counter!(m::SHARED_ERRORS, "op" => op.as_str(), "kind" => kind).increment(1);
        if self.breaker(op).failure(Instant::now()) {
            self.opened(op);
        }
    }

    fn opened(&self, op: Op) {
        metrics::gauge!(m::SHARED_BREAKER_OPEN, "op" => op.as_str()).set(1.0);
        warn!(
            at = %self.config.describe(),
            op = op.as_str(),
            cooldown_s = self.config.cooldown.as_secs(),
            "shared tier failing: skipped for a while"
        );
    }

    /// A call answered after `took`: in time, or slow (a failure to the breaker, counted as
    /// an error of kind `slow`).
    fn succeeded(&self, op: Op, took: Duration) {
        match self.breaker(op).succeeded(took, Instant::now()) {
            Succeeded::InTime { reopened: true } => {
                metrics::gauge!(m::SHARED_BREAKER_OPEN, "op" => op.as_str()).set(0.0);
                info!(at = %self.config.describe(), op = op.as_str(), "shared tier answering again");
            }
            Succeeded::InTime { reopened: false } => {}
            Succeeded::Slow { opened } => {
                debug!(op = op.as_str(), millis = took.as_millis() as u64, "shared tier slow");
                metrics::counter!(m::SHARED_ERRORS, "op" => op.as_str(), "kind" => "slow").increment(1);
                if opened {
                    self.opened(op);
                }
            }
        }
    }

    fn lookup_result(result: &'static str) {
        metrics::counter!(m::SHARED_LOOKUPS, "result" => result).increment(1);
    }

    /// Reads `key`'s object: one GET within the timeout (a slot waited for included), its
    /// bytes checked as a local object file is, its record naming this key, without `Vary`.
    /// Counts the result; never fails the request.
    pub async fn lookup(&self, key: &CacheKey) -> Lookup {
        if !self.get_breaker.allow(Instant::now()) {
            Self::lookup_result("skipped");
            return Lookup::Skipped;
        }
        let path = ObjectPath::from(self.object_path(&key.hash()));
        let started = Instant::now();
        // When the bucket was asked (a slot held): its slowness is the breaker's business, a
        // queue of this instance's own misses waiting for slots is not.
        let mut asked = started;
        let read = tokio::time::timeout(self.config.timeout, async {
            let _slot = self.reads.acquire().await.ok();
            asked = Instant::now();
            let got = self.store.get(&path).await?;
            if got.meta.size > MAX_SHARED_OBJECT {
                return Ok(None);
            }
            let held = self.memory.clone().acquire_many_owned(kib(got.meta.size)).await.ok();
            got.bytes().await.map(|bytes| Some((bytes, held)))
        })
        .await;
        metrics::histogram!(m::SHARED_DURATION, "op" => "get").record(started.elapsed().as_secs_f64());
        let took = asked.elapsed();
        let (bytes, held) = match read {
            Err(_) => {
                debug!("shared tier read timed out");
                self.failed(Op::Get, "timeout");
                Self::lookup_result("error");
                return Lookup::Failed;
            }
            Ok(Err(object_store::Error::NotFound { .. })) => {
                self.succeeded(Op::Get, took);
                Self::lookup_result("miss");
                return Lookup::Miss;
            }
            Ok(Err(e)) => {
                debug!(error = %e, "shared tier read failed");
                self.failed(Op::Get, error_kind(&e));
                Self::lookup_result("error");
                return Lookup::Failed;
            }
            Ok(Ok(None)) => {
                self.succeeded(Op::Get, took);
                self.refused(ObjectRefused::Length);
                return Lookup::Miss;
            }
            Ok(Ok(Some(read))) => read,
        };
        self.succeeded(Op::Get, took);
        let checked = {
            let bytes = bytes.clone();
            tokio::task::spawn_blocking(move || store::check_object(&bytes)).await
        };
        let meta = match checked {
            Ok(Ok(meta)) => meta,
            Ok(Err(why)) => {
                self.refused(why);
                return Lookup::Miss;
            }
            Err(_) => {
                Self::lookup_result("error");
                return Lookup::Failed;
            }
        };
        if meta.key != *key {
            self.refused(ObjectRefused::Key);
            return Lookup::Miss;
        }
        if !meta.vary.is_empty() || meta.status != 200 {
            self.refused(ObjectRefused::NotShared);
            return Lookup::Miss;
        }
        if self.purged.covers(&key.hash(), meta.response_time) {
            Self::lookup_result("purged");
            return Lookup::Miss;
        }
        Lookup::Found(Box::new(meta), bytes, held)
    }

    /// This instance purged objects (by URL, prefix, tag or all) at `at`: no copy the app
    /// answered before is taken from the bucket from now on. (The bucket is not told: another
    /// instance, or a new one, still reads it there.)
    pub fn purged_all(&self, at: SystemTime) {
        self.purged.all(at);
    }

    /// An unsafe request invalidated `key` at `at`: the bucket's older copy of it is not taken.
    pub fn purged_key(&self, key: KeyHash, at: SystemTime) {
        self.purged.key(key, at);
    }

    fn refused(&self, why: ObjectRefused) {
        warn!(reason = why.as_str(), "shared tier object refused");
        metrics::counter!(m::SHARED_REFUSED, "reason" => why.as_str()).increment(1);
        Self::lookup_result("refused");
    }

    /// Counts a found object that was not used (not fresh enough for the request, or the
    /// local store would not take it): the request goes to the app.
    pub fn unused(&self) {
        Self::lookup_result("unused");
    }

    /// Counts a found object stored and served.
    pub fn hit(&self) {
        Self::lookup_result("hit");
    }

    /// Queues an upload; dropped and counted when the queue is full, never waited for.
    /// Whether it was queued.
    pub fn offer(&self, upload: Upload) -> bool {
        let Err(e) = self.queue.try_send(upload) else {
            return true;
        };
        let reason = match e {
            mpsc::error::TrySendError::Full(_) => "full",
            mpsc::error::TrySendError::Closed(_) => "closed",
        };
        metrics::counter!(m::SHARED_UPLOAD_DROPS, "reason" => reason).increment(1);
        false
    }

    /// The uploader: takes queued uploads, `shared_tier_concurrency` at once, until `shutdown`
    /// (what is still queued then is dropped: the tier is a cache). Runs once.
    pub async fn run_uploads(self: Arc<Self>, cache: Arc<Cache>, shutdown: CancellationToken) {
        let Some(mut pending) = self.pending.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        let mut running = tokio::task::JoinSet::new();
        loop {
            let upload = tokio::select! {
                _ = shutdown.cancelled() => break,
                next = pending.recv() => match next {
                    Some(upload) => upload,
                    None => break,
                },
            };
            // Waits for a slot while the queue absorbs (and past its bound drops) the rest.
            let slot = tokio::select! {
                _ = shutdown.cancelled() => break,
                slot = self.writes.clone().acquire_owned() => slot,
            };
            let (tier, cache) = (self.clone(), cache.clone());
            running.spawn(async move {
                let _slot = slot;
                tier.upload(&cache, upload).await;
            });
            while running.try_join_next().is_some() {}
        }
        running.abort_all();
    }

    /// Uploads one committed object file, if it is still the one the fill committed.
    async fn upload(&self, cache: &Arc<Cache>, upload: Upload) {
        let drop = |reason: &'static str| metrics::counter!(m::SHARED_UPLOAD_DROPS, "reason" => reason).increment(1);
        if !self.put_breaker.allow(Instant::now()) {
            return drop("breaker");
        }
        let Some(file_len) = cache.object_len(&upload.key) else {
            return drop("gone");
        };
        if file_len > MAX_SHARED_OBJECT {
            return drop("size");
        }
        let _held = self.memory.acquire_many(kib(file_len)).await.ok();
        let Some(bytes) = cache.read_object(&upload.key).await else {
            return drop("gone");
        };
        // The file is checked before it leaves, and must be the version this fill committed
        // (not a later one stored for another request).
        let same = {
            let bytes = bytes.clone();
            tokio::task::spawn_blocking(move || store::check_object(&bytes)).await
        };
        let ms = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis()).ok();
        let digest = match same {
            Ok(Ok(meta))
                if meta.key == upload.key
                    && ms(meta.request_time) == ms(upload.request_time)
                    && ms(meta.response_time) == ms(upload.response_time) =>
            {
                meta.digest
            }
            _ => return drop("gone"),
        };
        let hash = upload.key.hash();
        if let Err(skip) = self.gate.admit(hash, digest, file_len, Instant::now()) {
            debug!(reason = skip.as_str(), "shared tier upload skipped");
            return drop(skip.as_str());
        }
        let path = ObjectPath::from(self.object_path(&hash));
        let started = Instant::now();
        let put = tokio::time::timeout(self.config.timeout, self.store.put(&path, PutPayload::from(bytes))).await;
        let took = started.elapsed();
        metrics::histogram!(m::SHARED_DURATION, "op" => "put").record(took.as_secs_f64());
        match put {
            Ok(Ok(_)) => {
                self.succeeded(Op::Put, took);
                metrics::counter!(m::SHARED_UPLOADS).increment(1);
                debug!("shared tier upload done");
            }
            Ok(Err(e)) => {
                debug!(error = %e, "shared tier upload failed");
                self.gate.forget(hash, digest);
                self.failed(Op::Put, error_kind(&e));
            }
            Err(_) => {
                self.gate.forget(hash, digest);
                self.failed(Op::Put, "timeout");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_answers_without_cookies_credentials_or_vary_are_shareable() {
        let meta = crate::cache::testing::meta("http://app.example/a.js", b"console.log(1)");
        let none = http::HeaderMap::new();
        assert!(shareable(&meta, &none, false));
        let mut auth = http::HeaderMap::new();
        auth.insert("authorization", http::HeaderValue::from_static("Bearer x"));
        assert!(!shareable(&meta, &auth, false), "a request with credentials");
        assert!(!shareable(&meta, &none, true), "an answer that set a cookie");
        let with = |name: &'static str, value: &'static str| {
            let mut m = meta.clone();
            m.headers.insert(name, http::HeaderValue::from_static(value));
            m
        };
        assert!(!shareable(&with("cache-control", "private, max-age=600"), &none, false));
        assert!(!shareable(&with("cache-control", "no-store"), &none, false));
        assert!(!shareable(&with("set-cookie", "a=1"), &none, false));
        let mut varied = meta.clone();
        varied.vary = vec![(http::HeaderName::from_static("accept-language"), None)];
        assert!(!shareable(&varied, &none, false), "a variant");
        let mut moved = meta.clone();
        moved.status = 301;
        assert!(!shareable(&moved, &none, false), "not a 200");
    }

    #[test]
    fn the_breaker_opens_after_failures_in_a_row_then_lets_one_probe_through() {
        let t0 = Instant::now();
        let cooldown = Duration::from_secs(30);
        let b = Breaker::new(3, cooldown, Duration::from_secs(1));
        assert!(b.allow(t0));
        assert!(!b.failure(t0));
        b.success();
        // A success resets the count: two more are not three in a row.
        assert!(!b.failure(t0));
        assert!(!b.failure(t0));
        assert!(b.allow(t0));
        assert!(b.failure(t0), "the third failure in a row opens it");
        assert!(b.is_open());
        assert!(!b.allow(t0 + cooldown / 2), "skipped during the cooldown");
        // After it, one probe goes, the others wait for its answer.
        assert!(b.allow(t0 + cooldown));
        assert!(!b.allow(t0 + cooldown));
        // A failed probe opens it again for a whole cooldown.
        assert!(b.failure(t0 + cooldown));
        assert!(!b.allow(t0 + cooldown + cooldown / 2));
        assert!(b.allow(t0 + 2 * cooldown));
        b.success();
        assert!(!b.is_open());
        assert!(b.allow(t0 + 2 * cooldown));
    }

    #[test]
    fn invalidation_marks_are_bounded_and_fold_into_the_mark_for_all_keys() {
        let purged = Purged::default();
        let t0 = SystemTime::now();
        let (before, after) = (t0 - Duration::from_secs(1), t0 + Duration::from_secs(1));
        purged.key(KeyHash::of(b"a"), t0);
        assert!(purged.covers(&KeyHash::of(b"a"), before));
        assert!(!purged.covers(&KeyHash::of(b"a"), after), "answered since");
        assert!(!purged.covers(&KeyHash::of(b"b"), before), "another key");
        for i in 0..PURGED_KEYS as u64 {
            purged.key(KeyHash::of(&i.to_le_bytes()), t0);
        }
        // Full: the marks became one for every key, none lost.
        assert!(purged.covers(&KeyHash::of(b"a"), before));
        assert!(purged.covers(&KeyHash::of(b"b"), before));
        assert!(purged.keys.lock().unwrap().len() < PURGED_KEYS);
    }

    /// A probe that never reports (an upload that gave up before its PUT, a lookup dropped
    /// with its client) does not keep the tier off until a restart.
    #[test]
    fn a_probe_that_never_reports_is_lost_after_a_cooldown() {
        let t0 = Instant::now();
        let cooldown = Duration::from_secs(30);
        let b = Breaker::new(1, cooldown, Duration::from_secs(1));
        assert!(b.failure(t0), "open");
        assert!(b.allow(t0 + cooldown), "the probe goes");
        // ... and is never heard of again.
        assert!(!b.allow(t0 + cooldown + cooldown / 2), "still out");
        assert!(b.allow(t0 + 2 * cooldown), "lost: another probe goes");
        b.success();
        assert!(!b.is_open());
    }

    /// A bucket answering just inside the timeout opens the breaker as a failing one does: each
    /// answer slower than the bound is a failure, and an answer in time resets the count.
    #[test]
    fn slow_answers_count_as_failures() {
        let t0 = Instant::now();
        let (cooldown, slow) = (Duration::from_secs(30), Duration::from_secs(1));
        let b = Breaker::new(3, cooldown, slow);
        let late = slow + Duration::from_millis(1);
        assert_eq!(b.succeeded(late, t0), Succeeded::Slow { opened: false });
        assert_eq!(
            b.succeeded(slow, t0),
            Succeeded::InTime { reopened: false },
            "at the bound: in time"
        );
        assert_eq!(b.succeeded(late, t0), Succeeded::Slow { opened: false });
        assert_eq!(b.succeeded(late, t0), Succeeded::Slow { opened: false });
        assert_eq!(
            b.succeeded(late, t0),
            Succeeded::Slow { opened: true },
            "three slow in a row"
        );
        assert!(!b.allow(t0 + cooldown / 2));
        // The probe answers in time: closed again.
        assert!(b.allow(t0 + cooldown));
        assert_eq!(
            b.succeeded(slow / 2, t0 + cooldown),
            Succeeded::InTime { reopened: true }
        );
        assert!(!b.is_open());
    }

    /// Reads and uploads have their own breakers: failing uploads open the uploads' breaker
    /// however many reads succeed between them, and reads still go.
    #[test]
    fn failing_uploads_are_not_hidden_by_reads_that_succeed() {
        let env = [("AWS_ENDPOINT_URL", "http://127.0.0.1:9"), ("AWS_ALLOW_HTTP", "true")];
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        let tier = SharedTier::open(config(1), env).expect("a client");
        for _ in 0..BREAKER_THRESHOLD {
            tier.succeeded(Op::Get, Duration::ZERO);
            tier.failed(Op::Put, "request");
        }
        assert!(tier.put_breaker.is_open(), "the uploads' failures in a row");
        assert!(!tier.get_breaker.is_open());
        assert!(tier.get_breaker.allow(Instant::now()), "reads still go");
        assert!(!tier.put_breaker.allow(Instant::now()));
    }

    fn config(queue: usize) -> SharedTierConfig {
        SharedTierConfig {
            bucket: "assets".into(),
            prefix: "fleet".into(),
            min_fresh: Duration::from_secs(3600),
            timeout: Duration::from_secs(2),
            concurrency: 1,
            queue,
            cooldown: Duration::from_secs(30),
            upload_budget: 1 << 30,
        }
    }

    #[test]
    fn one_body_goes_up_once_per_window_and_bytes_stay_within_the_budget() {
        let gate = UploadGate::new(10_000);
        let t0 = Instant::now();
        let (a, b) = (Digest([1; 32]), Digest([2; 32]));
        let key = |i: u8| KeyHash([i; 16]);
        assert_eq!(gate.admit(key(1), a, 1000, t0), Ok(()));
        // The same body under other keys (cache-busting query strings): not again.
        for i in 2..100 {
            assert_eq!(gate.admit(key(i), a, 1000, t0), Err(Skip::Duplicate));
        }
        // Its own key again (a refreshed copy) goes.
        assert_eq!(gate.admit(key(1), a, 1000, t0), Ok(()));
        // Other bodies: until the budget is spent, whole objects only.
        assert_eq!(gate.admit(key(2), b, 7000, t0), Ok(()));
        assert_eq!(gate.admit(key(3), Digest([3; 32]), 2000, t0), Err(Skip::Budget));
        assert_eq!(gate.admit(key(3), Digest([3; 32]), 1000, t0), Ok(()));
        // A failed upload lets another key with that body go up; after the window, any may.
        gate.forget(key(2), b);
        let later = t0 + UPLOAD_WINDOW;
        assert_eq!(gate.admit(key(4), b, 100, later), Ok(()));
        assert_eq!(gate.admit(key(5), a, 100, later), Ok(()));
    }

    #[test]
    fn a_full_upload_queue_drops_at_once_and_never_waits() {
        let env = [("AWS_ENDPOINT_URL", "http://127.0.0.1:9"), ("AWS_ALLOW_HTTP", "true")];
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        // Nothing takes from the queue (no uploader runs): the second offer finds it full.
        let tier = SharedTier::open(config(1), env).expect("a client");
        let upload = |path: &str| Upload {
            key: CacheKey::from_stored(format!("http://app.example{path}")),
            request_time: SystemTime::now(),
            response_time: SystemTime::now(),
        };
        // (`offer` is not async: it cannot wait for room, only take it or drop.)
        assert!(tier.offer(upload("/a.js")));
        assert!(!tier.offer(upload("/b.js")), "dropped when full");
        assert!(!tier.offer(upload("/c.js")));
        // Keys are placed under the prefix and the format's directory.
        let hash = CacheKey::from_stored("http://app.example/a.js".into()).hash();
        assert_eq!(tier.object_path(&hash), format!("fleet/objects-v2/{}", hash.to_hex()));
    }

    #[test]
    fn memory_permits_are_whole_kib() {
        assert_eq!(kib(0), 0);
        assert_eq!(kib(1), 1);
        assert_eq!(kib(1024), 1);
        assert_eq!(kib(1025), 2);
        assert!(kib(MAX_SHARED_OBJECT) <= kib(MEMORY_BUDGET));
    }
}
