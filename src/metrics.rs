//! Every metric name, as a constant, described once. Labels come only from closed enums.
//! The counters every request bumps are [`hot`]: sharded by serving loop, folded into the
//! exporter when `/metrics` renders ([`render`]).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Requests answered, by `outcome` and `method` class.
pub const REQUESTS: &str = "sidecache_requests_total";
/// Time from request head to response head, by `outcome`.
pub const REQUEST_DURATION: &str = "sidecache_request_duration_seconds";
/// Time for the app to answer with a response head.
pub const UPSTREAM_DURATION: &str = "sidecache_upstream_duration_seconds";
/// Upstream failures, by `kind` (connect, timeout, protocol).
pub const UPSTREAM_ERRORS: &str = "sidecache_upstream_errors_total";
/// Requests a client broke, by `kind` (body: a malformed or cut-off request body).
pub const CLIENT_ERRORS: &str = "sidecache_client_errors_total";
/// Invalidations by unsafe requests skipped because their rate was over the bound.
pub const INVALIDATIONS_SKIPPED: &str = "sidecache_invalidations_skipped_total";
/// Body bytes sent to clients from the cache.
pub const SERVED_CACHE_BYTES: &str = "sidecache_served_from_cache_bytes_total";
/// Body bytes received from the app.
pub const UPSTREAM_BYTES: &str = "sidecache_upstream_bytes_total";
/// Client connections open now.
pub const CONNECTIONS: &str = "sidecache_connections";
/// Bytes the cache spends on disk: files in whole allocation units, and its directories.
pub const CACHE_SIZE: &str = "sidecache_cache_size_bytes";
/// Bytes reserved by fills in progress.
pub const CACHE_RESERVED: &str = "sidecache_cache_reserved_bytes";
/// Objects in the cache index.
pub const CACHE_OBJECTS: &str = "sidecache_cache_objects";
/// The disk budget in force (max_size, lowered by min_free when the disk is short).
pub const CACHE_BUDGET: &str = "sidecache_cache_budget_bytes";
/// The object bound in force (max_objects, lowered when the filesystem is short of inodes).
pub const CACHE_OBJECT_LIMIT: &str = "sidecache_cache_object_limit";
/// Bytes held by the in-memory hot tier.
pub const HOT_SIZE: &str = "sidecache_hot_tier_size_bytes";
/// Bodies held open and mapped by the open tier (one descriptor each).
pub const OPEN_FILES: &str = "sidecache_open_tier_files";
/// Times the process ran out of descriptors and the open tier closed half its files.
pub const DESCRIPTOR_SHORTAGES: &str = "sidecache_descriptor_shortages_total";
/// Objects evicted: by the LRU loop, or by a fill making room for itself.
pub const EVICTIONS: &str = "sidecache_evictions_total";
/// Bytes freed by eviction.
pub const EVICTED_BYTES: &str = "sidecache_evicted_bytes_total";
/// Fills started.
pub const FILLS_STARTED: &str = "sidecache_fills_started_total";
/// Fills committed to the cache.
pub const FILLS_COMPLETED: &str = "sidecache_fills_completed_total";
/// Fills abandoned, by `reason`.
pub const FILLS_ABORTED: &str = "sidecache_fills_aborted_total";
/// Misses not stored because the cache was full and what they would displace is asked for
/// more often (admission).
pub const FILLS_DECLINED: &str = "sidecache_fills_declined_total";
/// Storage errors, by `kind`.
pub const STORAGE_ERRORS: &str = "sidecache_storage_errors_total";
/// Requests that waited on another request's fill.
pub const COALESCED_WAITS: &str = "sidecache_coalesced_waits_total";
/// Objects removed by purge requests.
pub const PURGED_OBJECTS: &str = "sidecache_purged_objects_total";
/// Objects found on disk at startup and indexed.
pub const INDEX_LOADED: &str = "sidecache_index_loaded_objects";
/// Objects found corrupt (length, checksum) and removed.
pub const CORRUPT_OBJECTS: &str = "sidecache_corrupt_objects_total";
/// Seconds the startup index rebuild took.
pub const INDEX_REBUILD_SECONDS: &str = "sidecache_index_rebuild_seconds";
/// 1 when the startup index rebuild is done.
pub const INDEX_READY: &str = "sidecache_index_ready";
/// URLs primed, by `result` (warmed, warm, failed).
pub const PRIME_OBJECTS: &str = "sidecache_prime_objects_total";
/// Body bytes fetched and stored by priming.
pub const PRIME_BYTES: &str = "sidecache_prime_bytes_total";
/// Compressed variants stored, by `encoding`.
pub const VARIANTS_MADE: &str = "sidecache_variants_made_total";
/// Compressed versions not kept, by `encoding` (not smaller enough, or no room).
pub const VARIANTS_SKIPPED: &str = "sidecache_variants_skipped_total";
/// Objects not compressed, by `reason` (`queue_full`: the queue of bodies waiting for a
/// thread and the CPU budget was full).
pub const COMPRESS_DROPPED: &str = "sidecache_compress_dropped_total";
/// Variants stored from another key's variants of the same body (not compressed again), by
/// `encoding`.
pub const VARIANTS_REUSED: &str = "sidecache_variants_reused_total";
/// Identity bytes compressed, by `encoding`.
pub const COMPRESS_INPUT_BYTES: &str = "sidecache_compress_input_bytes_total";
/// Bytes of the variants stored, by `encoding`.
pub const COMPRESS_OUTPUT_BYTES: &str = "sidecache_compress_output_bytes_total";
/// CPU time compressing one body in one coding (the compressing thread's), by `encoding`.
pub const COMPRESS_SECONDS: &str = "sidecache_compress_seconds";
/// Responses served from the cache, by `encoding` (identity, br, zstd, gzip).
pub const SERVED_BY_ENCODING: &str = "sidecache_served_by_encoding_total";
/// Body bytes served from the cache, by `encoding`.
pub const SERVED_BYTES_BY_ENCODING: &str = "sidecache_served_bytes_by_encoding_total";
/// Body bytes variants saved on responses served: identity length less the length sent.
pub const COMPRESS_SAVED_BYTES: &str = "sidecache_compress_saved_bytes_total";
/// Shared-tier reads on a local miss, by `result` (hit, miss, unused, refused, error, skipped).
pub const SHARED_LOOKUPS: &str = "sidecache_shared_tier_lookups_total";
/// Objects in the shared tier refused by their checks, by `reason`.
pub const SHARED_REFUSED: &str = "sidecache_shared_tier_refused_total";
/// Objects uploaded to the shared tier.
pub const SHARED_UPLOADS: &str = "sidecache_shared_tier_uploads_total";
/// Uploads given up, by `reason` (full, breaker, gone, size, closed).
pub const SHARED_UPLOAD_DROPS: &str = "sidecache_shared_tier_upload_drops_total";
/// Shared-tier requests that failed, by `op` (get, put) and `kind` (timeout, denied, request).
pub const SHARED_ERRORS: &str = "sidecache_shared_tier_errors_total";
/// Shared-tier request time, by `op` (get, put).
pub const SHARED_DURATION: &str = "sidecache_shared_tier_duration_seconds";
/// 1 while the shared tier is skipped after repeated failures.
pub const SHARED_BREAKER_OPEN: &str = "sidecache_shared_tier_breaker_open";
/// Constant 1 with the version as a label.
pub const BUILD_INFO: &str = "sidecache_build_info";
// Issue 18: tags, soft purge, per-rule counts.
/// Responses not stored because their tags could not all be indexed, by `reason` (count,
/// length, invalid, memory).
pub const TAGS_REFUSED: &str = "sidecache_tags_refused_total";
/// Distinct tags in the index.
pub const TAGS: &str = "sidecache_tags";
/// (object, tag) references in the index.
pub const TAG_REFERENCES: &str = "sidecache_tag_references";
/// Memory the tag index holds (names and references), as counted against
/// `max_tag_index_memory`.
pub const TAG_INDEX_BYTES: &str = "sidecache_tag_index_bytes";
/// Objects marked stale by soft purges.
pub const SOFT_PURGED_OBJECTS: &str = "sidecache_soft_purged_objects_total";
/// Misses whose answer was not stored (`private`, `no-store`, too large, not storable): answers
/// that could never have been hits. The hit ratio's denominator leaves them out.
pub const MISSES_NOT_STORED: &str = "sidecache_misses_not_stored_total";
/// Requests answered, by `rule` (the configured rule's name, `none` when no rule matched)
/// and `outcome`.
pub const RULE_REQUESTS: &str = "sidecache_rule_requests_total";
/// Body bytes sent to clients, by `rule` and `outcome`.
pub const RULE_BYTES: &str = "sidecache_rule_sent_bytes_total";

/// A label and its closed set of values.
pub type Label = (&'static str, &'static [&'static str]);

/// The three content codings variants are made in.
const CODINGS: &[&str] = &["br", "zstd", "gzip"];

/// Every counter with a fixed label set, and each label's closed set of values (as
/// `docs/metrics.md` lists them): all registered at 0 when the recorder is installed, so that
/// `increase(...)` and `rate(...)` see the first event (a series born at 1 has no increase).
/// The per-rule counters are registered by the proxy (their `rule` values come from the
/// configuration).
pub const COUNTERS: &[(&str, &[Label])] = &[
    (
        REQUESTS,
        &[
            (
                "outcome",
                &["hit", "miss", "coalesced", "stale", "revalidated", "bypass", "error"],
            ),
            ("method", &["get", "head", "unsafe", "other"]),
        ],
    ),
    (MISSES_NOT_STORED, &[]),
    (
        UPSTREAM_ERRORS,
        &[(
            "kind",
            &[
                "connect",
                "connect_timeout",
                "descriptors",
                "timeout",
                "protocol",
                "source",
                "client_body",
            ],
        )],
    ),
    (CLIENT_ERRORS, &[("kind", &["body"])]),
    (INVALIDATIONS_SKIPPED, &[]),
    (SERVED_CACHE_BYTES, &[]),
    (UPSTREAM_BYTES, &[]),
    (DESCRIPTOR_SHORTAGES, &[]),
    (EVICTIONS, &[]),
    (EVICTED_BYTES, &[]),
    (FILLS_STARTED, &[]),
    (FILLS_COMPLETED, &[]),
    (
        FILLS_ABORTED,
        &[(
            "reason",
            &[
                "budget",
                "objects",
                "room",
                "storage",
                "stalled",
                "purged",
                "upstream",
                "truncated",
                "incomplete",
            ],
        )],
    ),
    (FILLS_DECLINED, &[]),
    (
        STORAGE_ERRORS,
        &[(
            "kind",
            &["no_space", "permission", "missing", "io", "locked", "unsafe", "corrupt"],
        )],
    ),
    (COALESCED_WAITS, &[]),
    (PURGED_OBJECTS, &[]),
    (CORRUPT_OBJECTS, &[]),
    (PRIME_OBJECTS, &[("result", &["warmed", "warm", "failed"])]),
    (PRIME_BYTES, &[]),
    (VARIANTS_MADE, &[("encoding", CODINGS)]),
    (VARIANTS_SKIPPED, &[("encoding", CODINGS)]),
    (VARIANTS_REUSED, &[("encoding", CODINGS)]),
    (COMPRESS_DROPPED, &[("reason", &["queue_full"])]),
    (COMPRESS_INPUT_BYTES, &[("encoding", CODINGS)]),
    (COMPRESS_OUTPUT_BYTES, &[("encoding", CODINGS)]),
    (SERVED_BY_ENCODING, &[("encoding", &["identity", "br", "zstd", "gzip"])]),
    (
        SERVED_BYTES_BY_ENCODING,
        &[("encoding", &["identity", "br", "zstd", "gzip"])],
    ),
    (COMPRESS_SAVED_BYTES, &[]),
    (
        SHARED_LOOKUPS,
        &[(
            "result",
            &["hit", "miss", "unused", "refused", "purged", "error", "skipped"],
        )],
    ),
    (
        SHARED_REFUSED,
        &[("reason", &["footer", "record", "length", "digest", "key", "not_shared"])],
    ),
    (SHARED_UPLOADS, &[]),
    (
        SHARED_UPLOAD_DROPS,
        &[(
            "reason",
            &["full", "breaker", "gone", "size", "closed", "duplicate", "budget"],
        )],
    ),
    (
        SHARED_ERRORS,
        &[
            ("op", &["get", "put"]),
            ("kind", &["timeout", "denied", "request", "slow"]),
        ],
    ),
    (TAGS_REFUSED, &[("reason", &["count", "length", "invalid", "memory"])]),
    (SOFT_PURGED_OBJECTS, &[]),
];

/// Registers every series of [`COUNTERS`] (each combination of its labels' values) at 0.
fn register_counters_at_zero() {
    for (name, labels) in COUNTERS {
        let mut combos: Vec<Vec<metrics::Label>> = vec![Vec::new()];
        for (label, values) in labels.iter() {
            combos = combos
                .into_iter()
                .flat_map(|combo| {
                    values.iter().map(move |v| {
                        let mut c = combo.clone();
                        c.push(metrics::Label::new(*label, *v));
                        c
                    })
                })
                .collect();
        }
        for combo in combos {
            metrics::counter!(*name, combo).increment(0);
        }
    }
}

/// Shards of a [`hot`] counter: one per serving loop (a loop past the eighth shares one).
const HOT_SHARDS: usize = 8;

std::thread_local! {
    /// The serving loop this thread runs: its shard of the hot counters (0 for the first loop
    /// and any other thread).
    static SERVING_LOOP: Cell<usize> = const { Cell::new(0) };
}

/// Marks this thread as running serving loop `index`: it counts in that loop's shard.
pub fn set_serving_loop(index: usize) {
    SERVING_LOOP.set(index);
}

/// An atomic on a cache line of its own.
#[derive(Default)]
#[repr(align(64))]
struct Line(AtomicU64);

/// A counter every request bumps, in shards by serving loop: each loop adds on a line of its
/// own, where one counter shared by the loops moved its cache line between the cores on every
/// request (and the exporter's counters are two atomics each: value and generation).
struct Sharded {
    shards: [Line; HOT_SHARDS],
    /// What has been added to `target` so far.
    folded: AtomicU64,
    /// The exporter's counter.
    target: metrics::Counter,
}

impl metrics::CounterFn for Sharded {
    fn increment(&self, value: u64) {
        self.shards[SERVING_LOOP.get() % HOT_SHARDS]
            .0
            .fetch_add(value, Ordering::Relaxed);
    }

    fn absolute(&self, value: u64) {
        self.target.absolute(value);
    }
}

impl Sharded {
    /// Adds what was counted since the last fold to the exporter's counter. Concurrent folds
    /// add each count once: each shard only grows, so a later sum is never below an earlier
    /// one, and only the fold that raises `folded` adds the difference.
    fn fold(&self) {
        let sum = self
            .shards
            .iter()
            .map(|line| line.0.load(Ordering::Relaxed))
            .fold(0u64, u64::wrapping_add);
        let before = self.folded.fetch_max(sum, Ordering::Relaxed);
        if sum > before {
            self.target.increment(sum - before);
        }
    }
}

impl Drop for Sharded {
    /// A handle let go of (a reload's old rule counters) hands in what it counted last.
    fn drop(&mut self) {
        self.fold();
    }
}

/// Every hot counter still held, for [`render`] to fold.
static HOT: Mutex<Vec<Weak<Sharded>>> = Mutex::new(Vec::new());

/// The handle of counter `name` with `labels`, sharded by serving loop ([`Sharded`]); what it
/// counts reaches the exporter when `/metrics` renders ([`render`]), or when it is dropped.
/// For the counters every request bumps; the others are plain `metrics::counter!`s.
pub fn hot(name: &'static str, labels: Vec<metrics::Label>) -> metrics::Counter {
    let sharded = Arc::new(Sharded {
        shards: Default::default(),
        folded: AtomicU64::new(0),
        target: metrics::counter!(name, labels),
    });
    HOT.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Arc::downgrade(&sharded));
    metrics::Counter::from_arc(sharded)
}

/// Folds every hot counter still held, and forgets those let go of.
fn fold() {
    HOT.lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|counter| counter.upgrade().inspect(|c| c.fold()).is_some());
}

/// The text `/metrics` serves: `handle`'s metrics, the hot counters folded in first.
pub fn render(handle: &PrometheusHandle) -> String {
    fold();
    handle.render()
}

/// Latency buckets in seconds: 100 µs to 60 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Installs the global recorder (once per process) and describes every metric. Returns the
/// handle `/metrics` renders from; later calls return the same handle.
pub fn install() -> PrometheusHandle {
    static GLOBAL: OnceLock<PrometheusHandle> = OnceLock::new();
    GLOBAL
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .expect("bucket list is not empty")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first (an embedding program's).
            let _ = metrics::set_global_recorder(recorder);
            describe();
            register_counters_at_zero();
            metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            let upkeep = handle.clone();
            // Histograms drain their buffers on upkeep; a plain thread keeps it off the runtime.
            let _ = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                });
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(REQUESTS, "Requests answered, by outcome and method class.");
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Request head to response head, by outcome."
    );
    describe_histogram!(UPSTREAM_DURATION, Unit::Seconds, "App response-head latency.");
    describe_counter!(UPSTREAM_ERRORS, "Failed requests to the app, by kind.");
    describe_counter!(
        CLIENT_ERRORS,
        "Requests a client broke (a malformed or cut-off body), by kind; never counted as upstream errors."
    );
    describe_counter!(
        INVALIDATIONS_SKIPPED,
        "Invalidations by unsafe requests skipped because their rate was over the bound."
    );
    describe_counter!(SERVED_CACHE_BYTES, Unit::Bytes, "Body bytes served from the cache.");
    describe_counter!(UPSTREAM_BYTES, Unit::Bytes, "Body bytes received from the app.");
    describe_gauge!(CONNECTIONS, "Client connections open.");
    describe_gauge!(CACHE_SIZE, Unit::Bytes, "Bytes the cache holds on disk.");
    describe_gauge!(CACHE_RESERVED, Unit::Bytes, "Bytes reserved by fills in progress.");
    describe_gauge!(CACHE_OBJECTS, "Objects in the cache index.");
    describe_gauge!(CACHE_BUDGET, Unit::Bytes, "Disk budget in force.");
    describe_gauge!(
        CACHE_OBJECT_LIMIT,
        Unit::Count,
        "Object bound in force (max_objects, lowered when short of inodes)."
    );
    describe_gauge!(HOT_SIZE, Unit::Bytes, "Bytes in the in-memory hot tier.");
    describe_gauge!(
        OPEN_FILES,
        Unit::Count,
        "Bodies held open and mapped by the open tier (one descriptor each)."
    );
    describe_counter!(
        DESCRIPTOR_SHORTAGES,
        "Times the process ran out of descriptors and the open tier closed half its files."
    );
    describe_counter!(
        EVICTIONS,
        "Objects evicted: by the LRU loop, or by a fill making room for itself."
    );
    describe_counter!(EVICTED_BYTES, Unit::Bytes, "Bytes freed by eviction.");
    describe_counter!(FILLS_STARTED, "Cache fills started.");
    describe_counter!(FILLS_COMPLETED, "Cache fills committed.");
    describe_counter!(FILLS_ABORTED, "Cache fills abandoned, by reason.");
    describe_counter!(
        FILLS_DECLINED,
        "Misses not stored: the cache was full and the object next in line for eviction is asked for more often."
    );
    describe_counter!(STORAGE_ERRORS, "Storage errors, by kind.");
    describe_counter!(COALESCED_WAITS, "Requests that waited on another request's fill.");
    describe_counter!(PURGED_OBJECTS, "Objects removed by purge.");
    describe_gauge!(INDEX_LOADED, "Objects indexed from disk at startup.");
    describe_counter!(CORRUPT_OBJECTS, "Objects found corrupt and removed.");
    describe_gauge!(
        INDEX_REBUILD_SECONDS,
        Unit::Seconds,
        "Duration of the startup index rebuild."
    );
    describe_gauge!(INDEX_READY, "1 once the startup index rebuild is done.");
    describe_counter!(PRIME_OBJECTS, "URLs primed, by result.");
    describe_counter!(PRIME_BYTES, Unit::Bytes, "Body bytes fetched and stored by priming.");
    describe_counter!(VARIANTS_MADE, "Compressed variants stored, by encoding.");
    describe_counter!(
        VARIANTS_SKIPPED,
        "Compressed versions not kept (under 1/16 smaller, or no room), by encoding."
    );
    describe_counter!(
        COMPRESS_DROPPED,
        "Objects not compressed, by reason (queue_full: the queue waiting for a thread and the CPU budget was full)."
    );
    describe_counter!(
        VARIANTS_REUSED,
        "Variants stored from another key's variants of the same body instead of compressing it again, by encoding."
    );

    describe_counter!(
        COMPRESS_INPUT_BYTES,
        Unit::Bytes,
        "Identity bytes compressed, by encoding."
    );
    describe_counter!(
        COMPRESS_OUTPUT_BYTES,
        Unit::Bytes,
        "Bytes of the variants stored, by encoding."
    );
    describe_histogram!(
        COMPRESS_SECONDS,
        Unit::Seconds,
        "CPU time compressing one body in one encoding (the compressing thread's), by encoding."
    );
    describe_counter!(SERVED_BY_ENCODING, "Responses served from the cache, by encoding.");
    describe_counter!(
        SERVED_BYTES_BY_ENCODING,
        Unit::Bytes,
        "Body bytes served from the cache, by encoding."
    );
    describe_counter!(
        COMPRESS_SAVED_BYTES,
        Unit::Bytes,
        "Bytes variants saved on responses served (identity length less length sent)."
    );
    describe_gauge!(BUILD_INFO, "Constant 1, labelled with the version.");
    describe_counter!(
        SHARED_LOOKUPS,
        "Shared-tier reads on a local miss, by result (hit, miss, unused, refused, error, skipped)."
    );
    describe_counter!(
        SHARED_REFUSED,
        "Shared-tier objects refused by their checks, by reason."
    );
    describe_counter!(SHARED_UPLOADS, "Objects uploaded to the shared tier.");
    describe_counter!(SHARED_UPLOAD_DROPS, "Shared-tier uploads given up, by reason.");
    describe_counter!(SHARED_ERRORS, "Failed shared-tier requests, by op and kind.");
    describe_histogram!(SHARED_DURATION, Unit::Seconds, "Shared-tier request time, by op.");
    describe_gauge!(
        SHARED_BREAKER_OPEN,
        "1 while the shared tier's reads or uploads (op) are skipped after repeated failures."
    );
    describe_counter!(
        TAGS_REFUSED,
        "Responses not stored because their tags could not all be indexed, by reason."
    );
    describe_gauge!(TAGS, Unit::Count, "Distinct tags in the index.");
    describe_gauge!(TAG_REFERENCES, Unit::Count, "Object-tag references in the index.");
    describe_gauge!(
        TAG_INDEX_BYTES,
        Unit::Bytes,
        "Memory the tag index holds (names once each, and references), bounded by max_tag_index_memory."
    );
    describe_counter!(SOFT_PURGED_OBJECTS, "Objects marked stale by soft purges.");
    describe_counter!(
        MISSES_NOT_STORED,
        "Misses whose answer was not stored (private, no-store, too large): never hit candidates."
    );
    describe_counter!(
        RULE_REQUESTS,
        "Requests answered, by rule name (none: no rule) and outcome."
    );
    describe_counter!(
        RULE_BYTES,
        Unit::Bytes,
        "Body bytes sent to clients, by rule name (none: no rule) and outcome."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hot_counter_renders_the_sum_of_every_loops_shard() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            let labels = vec![metrics::Label::new("outcome", "hit")];
            let counter = hot("sidecache_test_hot_total", labels.clone());
            // Loops 0 to 9 (two share shards with others), each on a thread of its own.
            std::thread::scope(|s| {
                for index in 0..10 {
                    let counter = counter.clone();
                    s.spawn(move || {
                        set_serving_loop(index);
                        for _ in 0..1000 {
                            counter.increment(1);
                        }
                    });
                }
            });
            let line = |text: &str| {
                text.lines()
                    .find(|l| l.starts_with("sidecache_test_hot_total{"))
                    .map(str::to_owned)
            };
            assert_eq!(
                line(&render(&handle)).as_deref(),
                Some("sidecache_test_hot_total{outcome=\"hit\"} 10000")
            );
            // A second handle for the series counts into it too; a fold adds only what is new;
            // a handle dropped hands in its count.
            let second = hot("sidecache_test_hot_total", labels.clone());
            second.increment(2);
            hot("sidecache_test_hot_total", labels).increment(3);
            counter.increment(1);
            assert_eq!(
                line(&render(&handle)).as_deref(),
                Some("sidecache_test_hot_total{outcome=\"hit\"} 10006")
            );
            assert_eq!(
                line(&render(&handle)).as_deref(),
                Some("sidecache_test_hot_total{outcome=\"hit\"} 10006")
            );
        });
    }

    /// Every labelled value set here is the one `docs/metrics.md` lists for the counter (a
    /// value added on one side only fails here), and every counter in the catalogue is here.
    #[test]
    fn the_zeroed_label_sets_match_the_catalogue() {
        let doc = include_str!("../docs/metrics.md");
        for (name, labels) in COUNTERS {
            let row = doc
                .lines()
                .find(|l| l.starts_with(&format!("| `{name}` |")))
                .unwrap_or_else(|| panic!("{name} is not in docs/metrics.md"));
            // "(same set)": the values are those of the row above that lists them.
            if row.contains("same set") || row.contains("as above") {
                continue;
            }
            for (label, values) in labels.iter() {
                for value in values.iter() {
                    assert!(
                        row.contains(&format!("`{value}`")),
                        "{name}{{{label}=\"{value}\"}} not in its row"
                    );
                }
            }
        }
        for line in doc.lines().filter(|l| l.contains("| counter |")) {
            let name = line.split('`').nth(1).unwrap_or_default();
            if name.starts_with("sidecache_rule_") {
                continue;
            }
            assert!(COUNTERS.iter().any(|(n, _)| *n == name), "{name} is not zeroed");
        }
    }
}
