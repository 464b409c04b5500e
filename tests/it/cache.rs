//! The disk cache: fill, coalescing, budget, LRU, restart, crash, corruption, full disk, purge.

use std::io::Read as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;

use crate::support::{
    Behaviour, Binary, Origin, TestSidecar, Tmpfs, app_client as client, binary_path, eventually, matches_pattern,
    metric, origin::owned, pattern_bytes, pattern_chunk, scrape,
};

const CACHEABLE: &[(&str, &str)] = &[
    ("cache-control", "public, max-age=3600"),
    ("content-type", "application/javascript"),
];

fn cache_status(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        if e.path().is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// The object files (one per stored object: body, record, footer) under a cache directory,
/// not its compressed variants' files.
fn object_files(cache: &Path) -> Vec<std::path::PathBuf> {
    all_files(cache)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().matches('.').count() == 1)
        })
        .collect()
}

/// Every object file and variant file under a cache directory.
fn all_files(cache: &Path) -> Vec<std::path::PathBuf> {
    let objects = cache.join("objects-v2");
    let Ok(entries) = std::fs::read_dir(&objects) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().len() == 2 && e.path().is_dir())
        .flat_map(|fanout| files_under(&fanout.path()))
        .collect()
}

/// Whether a request for `url` is a hit within a bounded wait: a client has the whole body
/// of a small object while its fill is still being committed (a request meanwhile waits on
/// the fill: `collapsed`).
async fn hit_soon(url: &str) -> bool {
    eventually(Duration::from_secs(10), async || get(url).await.1 == "sidecache; hit").await
}

/// The object file whose record holds `name`.
fn object_of(cache: &Path, name: &str) -> std::path::PathBuf {
    object_files(cache)
        .into_iter()
        .find(|f| {
            std::fs::read(f)
                .unwrap()
                .windows(name.len())
                .any(|w| w == name.as_bytes())
        })
        .expect("the object file")
}

async fn get(url: &str) -> (reqwest::StatusCode, String, Bytes) {
    let resp = client().get(url).send().await.unwrap();
    let status = resp.status();
    let cs = cache_status(&resp);
    (status, cs, resp.bytes().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_fetch_origin_once_and_all_get_identical_bytes() {
    let origin = Origin::start().await;
    let len = 2 << 20;
    origin.route(
        "/bundle.js",
        Behaviour::Delay(
            Duration::from_millis(300),
            Box::new(Behaviour::Generated {
                len,
                headers: owned(CACHEABLE),
            }),
        ),
    );
    let sc = TestSidecar::start(&origin.url()).await;
    let c = client();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let c = c.clone();
            let url = sc.url("/bundle.js");
            tokio::spawn(async move {
                let resp = c.get(url).send().await.unwrap();
                let status = resp.status();
                let cs = cache_status(&resp);
                (status, cs, resp.bytes().await.unwrap())
            })
        })
        .collect();
    let mut collapsed = 0;
    for t in tasks {
        let (status, cs, body) = t.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body.len() as u64, len);
        assert!(matches_pattern(0, &body), "bytes differ");
        collapsed += cs.contains("collapsed") as u32;
    }
    assert_eq!(origin.hits("/bundle.js"), 1, "the app saw one request");
    assert!(collapsed > 0, "some requests read the fill while it was written");
    let (_, cs, body) = get(&sc.url("/bundle.js")).await;
    assert_eq!(cs, "sidecache; hit");
    assert!(matches_pattern(0, &body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_get_bytes_before_the_fill_completes() {
    let origin = Origin::start().await;
    let pause = Duration::from_millis(50);
    origin.route(
        "/stream.bin",
        Behaviour::Slow {
            len: 40 * 16384,
            chunk: 16384,
            pause,
            headers: owned(CACHEABLE),
        },
    );
    let sc = TestSidecar::start(&origin.url()).await;
    let resp = client().get(sc.url("/stream.bin")).send().await.unwrap();
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    // The origin needs ~2 s for the whole body; the first bytes arrive long before.
    let (objects, _, _) = sc.sidecar.proxy.cache.stats();
    assert_eq!(objects, 0, "first bytes were served while the fill was still running");
    let mut n = first.len() as u64;
    let mut ok = matches_pattern(0, &first);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        ok &= matches_pattern(n, &chunk);
        n += chunk.len() as u64;
    }
    assert!(ok);
    assert_eq!(n, 40 * 16384);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_finishes_for_others_when_the_first_client_leaves() {
    let origin = Origin::start().await;
    origin.route(
        "/leave.bin",
        Behaviour::Slow {
            len: 20 * 16384,
            chunk: 16384,
            pause: Duration::from_millis(20),
            headers: owned(CACHEABLE),
        },
    );
    let sc = TestSidecar::start(&origin.url()).await;
    {
        let resp = client().get(sc.url("/leave.bin")).send().await.unwrap();
        let mut stream = resp.bytes_stream();
        stream.next().await.unwrap().unwrap();
        // Dropped here: the client goes away mid-body.
    }
    assert!(
        eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache.stats().0 == 1).await,
        "the fill was committed without its client"
    );
    let (_, cs, body) = get(&sc.url("/leave.bin")).await;
    assert_eq!(cs, "sidecache; hit");
    assert!(matches_pattern(0, &body) && body.len() == 20 * 16384);
    assert_eq!(origin.hits("/leave.bin"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_leader_releases_its_waiters_and_one_retries() {
    let origin = Origin::start().await;
    let good = Behaviour::Generated {
        len: 100_000,
        headers: owned(CACHEABLE),
    };
    origin.route(
        "/flaky.js",
        Behaviour::FirstThen(
            Box::new(Behaviour::Delay(Duration::from_millis(300), Box::new(Behaviour::Abort))),
            Box::new(Behaviour::Delay(Duration::from_millis(100), Box::new(good))),
        ),
    );
    let sc = TestSidecar::start(&origin.url()).await;
    let first = tokio::spawn(get_owned(sc.url("/flaky.js")));
    origin.wait_hits("/flaky.js", 1).await;
    let waiters: Vec<_> = (0..20).map(|_| tokio::spawn(get_owned(sc.url("/flaky.js")))).collect();
    let (status, _, _) = first.await.unwrap();
    assert_eq!(status, 502, "the leader's own request failed");
    let mut outcomes = Vec::new();
    for w in waiters {
        let (status, cs, body) = w.await.unwrap();
        assert_eq!(status, 200);
        assert!(matches_pattern(0, &body) && body.len() == 100_000);
        outcomes.push(cs);
    }
    assert_eq!(
        origin.hits("/flaky.js"),
        2,
        "one failed fetch, then one retry for all waiters: {outcomes:?}"
    );
}

async fn get_owned(url: String) -> (reqwest::StatusCode, String, Bytes) {
    get(&url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_on_disk_never_exceed_the_budget_under_concurrent_fills() {
    let origin = Origin::start().await;
    let budget: u64 = 4 << 20;
    let object = 96 * 1024;
    let count = (5 * budget / object) as usize;
    // Distinct bytes per object: identical bodies would share one content-addressed file.
    for i in 0..count {
        origin.fixed(
            &format!("/o/{i}.js"),
            CACHEABLE,
            pattern_chunk(i as u64 * 7919, object as usize),
        );
    }
    let sc = TestSidecar::start_with(&origin.url(), |c| {
        c.max_size = budget;
        c.max_object_size = budget / 4;
        c.memory_size = 0;
    })
    .await;
    let dir = sc.dir.path().join("cache");
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak, dir) = (stop.clone(), peak.clone(), dir.clone());
        std::thread::spawn(move || {
            let mut samples = 0u64;
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(crate::support::disk_usage(&dir).0, Ordering::Relaxed);
                samples += 1;
                // A sampling interval, so the sampler does not take a whole core from the fills.
                std::thread::sleep(Duration::from_millis(1));
            }
            samples
        })
    };
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..32)
        .map(|_| {
            let next = next.clone();
            let base = sc.url("/o/");
            tokio::spawn(async move {
                let c = client();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= count {
                        return;
                    }
                    let resp = c.get(format!("{base}{i}.js")).send().await.unwrap();
                    assert_eq!(resp.status(), 200);
                    let body = resp.bytes().await.unwrap();
                    assert!(body.len() as u64 == object && matches_pattern(i as u64 * 7919, &body));
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.join().unwrap();
    let peak = peak.load(Ordering::Relaxed);
    assert!(samples > 10, "sampled {samples} times");
    assert!(peak <= budget, "peak {peak} bytes on disk over a budget of {budget}");
    // The budget also pays for the layout's directories (a unit for each of the up to 256
    // fan-out directories 128 objects can make, and their names: 1.1 MiB here) and for 32
    // fills in flight at once.
    assert!(peak > budget / 8, "the cache was actually filled (peak {peak})");
    let (objects, used, _) = sc.sidecar.proxy.cache.stats();
    assert!(objects > 0 && used <= budget);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_removes_exactly_the_least_recently_used() {
    let origin = Origin::start().await;
    for i in 0..10 {
        origin.fixed(&format!("/lru/{i}"), CACHEABLE, pattern_chunk(i * 7919, 100_000));
    }
    // A budget that nine objects fill to between the watermarks and a tenth pushes past the
    // high one, in what the disk spends: one file per object in whole allocation units (a
    // 100,000-byte body and its record, a few hundred bytes), and the layout's fixed share (a
    // unit per directory that 16 objects can make, and a 256-byte name per object).
    let unit = rustix::fs::statvfs(std::env::temp_dir())
        .unwrap()
        .f_frsize
        .clamp(512, 1 << 20);
    let object = 101_000u64.div_ceil(unit) * unit;
    let layout = (5 + 16) * unit + 16 * 256;
    let (nine, ten) = (layout + 9 * object, layout + 10 * object);
    let max_size = ((nine as f64 / 0.90 + ten as f64 / 0.95) / 2.0) as u64;
    let sc = TestSidecar::start_with(&origin.url(), |c| {
        c.max_size = max_size;
        c.max_objects = 16;
        c.max_object_size = 200_000;
        c.memory_size = 0;
        // The budget is worked out for the objects alone: no compressed variants beside them
        // (their budget and eviction are `compress`'s tests).
        c.compress.enabled = false;
        c.high_watermark = 0.95;
        c.low_watermark = 0.90;
    })
    .await;
    let cache = sc.sidecar.proxy.cache.clone();
    assert!(eventually(Duration::from_secs(10), async || cache.is_loaded()).await);
    // Objects 0..9 fill ~88% of the budget.
    for i in 0..9 {
        let (_, cs, _) = get(&sc.url(&format!("/lru/{i}"))).await;
        assert!(cs.contains("stored"), "{cs}");
        assert!(eventually(Duration::from_secs(10), async || cache.stats().0 == i + 1).await);
    }
    // Uses: 0, 1, 2 become the most recently used.
    for i in 0..3 {
        assert_eq!(get(&sc.url(&format!("/lru/{i}"))).await.1, "sidecache; hit");
    }
    // Object 9 pushes usage past the high watermark: one eviction brings it under the low one.
    get(&sc.url("/lru/9")).await;
    assert!(
        eventually(Duration::from_secs(10), async || {
            let (n, _, reserved) = cache.stats();
            n == 9 && reserved == 0
        })
        .await,
        "stats: {:?}",
        cache.stats()
    );
    let mut survivors = Vec::new();
    for i in 0..10 {
        let resp = client().head(sc.url(&format!("/lru/{i}"))).send().await.unwrap();
        if cache_status(&resp) == "sidecache; hit" {
            survivors.push(i);
        }
    }
    assert_eq!(
        survivors,
        vec![0, 1, 2, 4, 5, 6, 7, 8, 9],
        "object 3 was the least recently used"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_upstream_body_is_not_cached() {
    let origin = Origin::start().await;
    origin.route(
        "/cut.js",
        Behaviour::Truncated {
            len: 100_000,
            sent: 40_000,
            headers: owned(CACHEABLE),
        },
    );
    let sc = TestSidecar::start(&origin.url()).await;
    for round in 1..=2u64 {
        let resp = client().get(sc.url("/cut.js")).send().await.unwrap();
        let cs = cache_status(&resp);
        let headers = format!("{:?}", resp.headers());
        let body = resp.bytes().await;
        assert!(
            body.is_err(),
            "the client sees the body break: round {round} {cs} {headers} {:?}",
            body.map(|b| b.len())
        );
        assert_eq!(origin.hits("/cut.js"), round, "never served from the cache");
    }
    assert_eq!(sc.sidecar.proxy.cache.stats().0, 0);
}

#[tokio::test]
async fn objects_over_max_object_size_are_served_but_not_kept() {
    let origin = Origin::start().await;
    origin.route(
        "/huge.bin",
        Behaviour::Generated {
            len: 3 << 20,
            headers: owned(CACHEABLE),
        },
    );
    let sc = TestSidecar::start_with(&origin.url(), |c| c.max_object_size = 1 << 20).await;
    for _ in 0..2 {
        let (status, cs, body) = get(&sc.url("/huge.bin")).await;
        assert_eq!(status, 200);
        assert!(!cs.contains("stored") && !cs.contains("hit"), "{cs}");
        assert!(matches_pattern(0, &body) && body.len() == 3 << 20);
    }
    assert_eq!(origin.hits("/huge.bin"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_without_a_length_are_stored_too() {
    let origin = Origin::start().await;
    origin.route(
        "/chunked.css",
        Behaviour::Chunked {
            len: 250_000,
            headers: owned(CACHEABLE),
        },
    );
    let sc = TestSidecar::start(&origin.url()).await;
    let resp = client().get(sc.url("/chunked.css")).send().await.unwrap();
    assert!(
        resp.headers().get("content-length").is_none(),
        "relayed as it came: chunked"
    );
    assert!(cache_status(&resp).contains("stored"));
    let body = resp.bytes().await.unwrap();
    assert!(body.len() == 250_000 && matches_pattern(0, &body));
    assert!(eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache.stats().0 == 1).await);
    let (_, cs, body) = get(&sc.url("/chunked.css")).await;
    assert_eq!(cs, "sidecache; hit");
    assert!(body.len() == 250_000 && matches_pattern(0, &body));
    assert_eq!(origin.hits("/chunked.css"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_tier_serves_small_objects_from_memory() {
    let origin = Origin::start().await;
    origin.fixed("/small.css", CACHEABLE, pattern_bytes(5000));
    let sc = TestSidecar::start(&origin.url()).await;
    get(&sc.url("/small.css")).await;
    assert!(eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache.stats().0 == 1).await);
    // Two hits from disk: the second admits it to memory.
    assert_eq!(get(&sc.url("/small.css")).await.1, "sidecache; hit");
    assert_eq!(get(&sc.url("/small.css")).await.1, "sidecache; hit");
    // Remove the files underneath: the hot tier still has the object.
    for f in object_files(&sc.dir.path().join("cache")) {
        std::fs::remove_file(f).unwrap();
    }
    let (_, cs, body) = get(&sc.url("/small.css")).await;
    assert_eq!(cs, "sidecache; hit");
    assert_eq!(body, Bytes::from(pattern_bytes(5000)));
    assert_eq!(origin.hits("/small.css"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_hits_sent_from_the_file_are_whole_and_a_truncated_file_is_never_served() {
    let origin = Origin::start().await;
    // Held in the open tier as a mapping after its second hit.
    let len: usize = 1 << 20;
    origin.fixed("/big.bin", CACHEABLE, pattern_bytes(len as u64));
    let sc = TestSidecar::start_with(&origin.url(), |c| c.max_connections = 64).await;
    get(&sc.url("/big.bin")).await;
    assert!(eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache.stats().0 == 1).await);
    // Hits of a mapped body go out with sendfile: from disk, then from the open tier's mapping.
    for _ in 0..3 {
        let (status, cs, body) = get(&sc.url("/big.bin")).await;
        assert_eq!((status.as_u16(), cs.as_str()), (200, "sidecache; hit"));
        assert!(body.len() == len && matches_pattern(0, &body));
    }
    let part = client()
        .get(sc.url("/big.bin"))
        .header("range", "bytes=100000-900000")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    let part = part.bytes().await.unwrap();
    assert!(part.len() == 800_001 && matches_pattern(100_000, &part));
    // Another actor cuts the object file short underneath, into its body.
    let body_file = object_of(&sc.dir.path().join("cache"), "/big.bin");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&body_file)
        .unwrap()
        .set_len(1000)
        .unwrap();
    // The mapping still says 1 MiB, but the hit checks the open file first: the object is
    // dropped and the right bytes fetched anew (a truncation racing that check cuts the
    // transfer off instead: `sendfile` comes up short; the mapping is never read, no SIGBUS).
    let (status, cs, body) = get(&sc.url("/big.bin")).await;
    assert_eq!(status, 200);
    assert!(cs.contains("fwd=uri-miss"), "{cs}");
    assert!(
        body.len() == len && matches_pattern(0, &body),
        "a truncated body was served"
    );
    assert_eq!(origin.hits("/big.bin"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_open_tier_serves_hits_without_opening_the_file_and_never_a_removed_one() {
    let origin = Origin::start().await;
    origin.fixed("/open.js", CACHEABLE, pattern_bytes(100_000));
    let sc = TestSidecar::start_with(&origin.url(), |c| {
        c.memory_size = 0;
        c.open_files = Some(16);
        // The tier needs room under this process's descriptor limit.
        c.max_connections = 64;
    })
    .await;
    get(&sc.url("/open.js")).await;
    assert!(eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache.stats().0 == 1).await);
    // Two hits from disk: the second admits it to the open tier.
    for _ in 0..2 {
        assert_eq!(get(&sc.url("/open.js")).await.1, "sidecache; hit");
    }
    // Move the object file away: still the same file, but a hit that opened its path would
    // not find it.
    let bodies = object_files(&sc.dir.path().join("cache"));
    assert_eq!(bodies.len(), 1);
    let moved = sc.dir.path().join("moved-away");
    std::fs::rename(&bodies[0], &moved).unwrap();
    let (status, cs, body) = get(&sc.url("/open.js")).await;
    assert_eq!((status.as_u16(), cs.as_str()), (200, "sidecache; hit"));
    assert!(body.len() == 100_000 && matches_pattern(0, &body));
    assert_eq!(origin.hits("/open.js"), 1);
    // Removed underneath: its descriptor still reads it, but it is dropped, not served.
    std::fs::remove_file(&moved).unwrap();
    let (status, cs, body) = get(&sc.url("/open.js")).await;
    assert_eq!(status, 200);
    assert!(cs.contains("fwd=uri-miss"), "{cs}");
    assert!(body.len() == 100_000 && matches_pattern(0, &body));
    assert_eq!(origin.hits("/open.js"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_is_read_from_disk_once_and_a_damaged_one_is_refetched() {
    let origin = Origin::start().await;
    origin.fixed("/cut.js", CACHEABLE, pattern_bytes(100_000));
    origin.fixed("/kept.js", CACHEABLE, pattern_bytes(100_000));
    let sc = TestSidecar::start_with(&origin.url(), |c| {
        c.memory_size = 0;
        c.open_files = Some(16);
        // The tier needs room under this process's descriptor limit.
        c.max_connections = 64;
    })
    .await;
    let cache = sc.dir.path().join("cache");
    let record_of = |name: &str| object_of(&cache, name);
    get(&sc.url("/cut.js")).await;
    assert!(eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache.stats().0 == 1).await);
    // Cut short underneath, into its record: the index knows the file's length, and the
    // object is fetched again, never served from a partial record.
    let cut = record_of("/cut.js");
    let len = std::fs::metadata(&cut).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cut)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (status, cs, body) = get(&sc.url("/cut.js")).await;
    assert_eq!(status, 200);
    assert!(cs.contains("fwd=uri-miss"), "{cs}");
    assert!(body.len() == 100_000 && matches_pattern(0, &body));
    assert_eq!(origin.hits("/cut.js"), 2);

    get(&sc.url("/kept.js")).await;
    assert!(eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache.stats().0 == 2).await);
    // A hit from disk that leaves the body on disk keeps the record in memory: the next hit
    // does not read it again. Here it could not: its stored record is damaged (in place, same
    // length; the body is intact, which the changed file is hashed again to show).
    assert_eq!(get(&sc.url("/kept.js")).await.1, "sidecache; hit");
    let kept = record_of("/kept.js");
    let f = std::fs::OpenOptions::new().write(true).open(&kept).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"XXXX", 100_000 + 40).unwrap();
    drop(f);
    for _ in 0..2 {
        let (status, cs, body) = get(&sc.url("/kept.js")).await;
        assert_eq!((status.as_u16(), cs.as_str()), (200, "sidecache; hit"));
        assert!(body.len() == 100_000 && matches_pattern(0, &body));
    }
    assert_eq!(origin.hits("/kept.js"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refetched_object_with_the_same_bytes_is_served_from_its_new_record() {
    let origin = Origin::start().await;
    let short = [
        ("cache-control", "public, max-age=5"),
        ("content-type", "text/javascript"),
    ];
    origin.fixed("/short.js", &short, pattern_bytes(100_000));
    let sc = TestSidecar::start_with(&origin.url(), |c| {
        c.memory_size = 0;
        c.open_files = Some(16);
        c.max_connections = 64;
    })
    .await;
    let url = sc.url("/short.js");
    get(&url).await;
    assert!(eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache.stats().0 == 1).await);
    // A disk hit keeps its record in memory.
    assert_eq!(get(&url).await.1, "sidecache; hit");
    // Once stale it is fetched again; the same bytes come back, stored as a new version (a
    // new object file) of the key.
    let refetched = eventually(Duration::from_secs(10), async || {
        get(&url).await.1.contains("fwd=stale")
    })
    .await;
    assert!(refetched);
    assert_eq!(origin.hits("/short.js"), 2);
    // Hits again, from the new record (fresh), not the old one kept in memory (stale).
    let fresh = eventually(Duration::from_secs(10), async || get(&url).await.1 == "sidecache; hit").await;
    assert!(fresh, "answered from the outdated record");
    assert_eq!(get(&url).await.1, "sidecache; hit");
    assert_eq!(origin.hits("/short.js"), 2);
}

/// A sample's value in a Prometheus text page (0 when absent).
fn sample(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_fails_no_request_and_the_open_tier_gives_half_back() {
    const LIMIT: u32 = 1024;
    const CONNECTIONS: usize = 300;
    // The open tier's size: the limit less one descriptor per connection and 256 spare.
    const HELD: usize = LIMIT as usize - CONNECTIONS - 256;
    let origin = Origin::start().await;
    for i in 0..HELD {
        origin.fixed(&format!("/held/{i}"), CACHEABLE, pattern_chunk(i as u64, 20_000));
    }
    for i in 0..2 * CONNECTIONS {
        // Long enough for every request of a burst to be in flight at once.
        let slow = Behaviour::Delay(
            Duration::from_secs(2),
            Box::new(Behaviour::Fixed {
                status: 200,
                headers: owned(CACHEABLE),
                body: pattern_chunk(i as u64, 20_000),
            }),
        );
        origin.route(&format!("/slow/{i}"), slow);
    }
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new("sh");
    cmd.args([
        "-c",
        r#"ulimit -n "$3" && exec "$0" serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --upstream "$1" --cache-dir "$2""#,
    ])
    .arg(binary_path())
    .arg(origin.url())
    .arg(dir.path().join("cache"))
    .arg(LIMIT.to_string())
    .env("SIDECACHE_ACCESS_LOG", "false")
    .env("SIDECACHE_MAX_CONNECTIONS", CONNECTIONS.to_string())
    .env("SIDECACHE_MEMORY_SIZE", "0");
    let mut bin = Binary::from_command(cmd);
    let sized = bin.wait_line("open tier sized");
    assert!(sized.contains(&format!("open_files={HELD}")), "{sized}");
    let (addr, admin) = (bin.public_addr(), bin.admin_addr());
    let c = client();
    let metrics = async || {
        let page = c.get(format!("http://{admin}/metrics")).send().await.unwrap();
        page.text().await.unwrap()
    };
    let fetch = |path: String| {
        let c = c.clone();
        async move {
            // Under the shortage a request may fail any way: 0 stands for no response.
            match c.get(format!("http://{addr}{path}")).send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    (status, resp.bytes().await.unwrap_or_default())
                }
                Err(_) => (0, Bytes::new()),
            }
        }
    };
    // The open tier fills up: every body stored, then hit twice (the second admits it).
    let stored = futures_util::stream::iter(0..HELD)
        .map(|i| fetch(format!("/held/{i}")))
        .buffer_unordered(32)
        .filter(|(status, _)| std::future::ready(*status == 200))
        .count()
        .await;
    assert_eq!(stored, HELD);
    let all_stored = eventually(Duration::from_secs(30), async || {
        sample(&metrics().await, "sidecache_cache_objects") == HELD as f64
    })
    .await;
    assert!(all_stored);
    // Hits each held object twice (the second hit of a body on disk admits it to the tier).
    let hit_held_twice = || {
        futures_util::stream::iter(0..HELD)
            .map(|i| async move {
                for _ in 0..2 {
                    fetch(format!("/held/{i}")).await;
                }
            })
            .buffer_unordered(32)
            .count()
    };
    hit_held_twice().await;
    let held = sample(&metrics().await, "sidecache_open_tier_files");
    assert!(held >= 0.9 * HELD as f64, "the tier holds {held}");

    // Every connection busy with a slow miss: a client socket and a connection to the app
    // each, on top of the tier's descriptors, is more than the limit.
    let burst =
        |from: usize| futures_util::future::join_all((from..from + CONNECTIONS).map(|i| fetch(format!("/slow/{i}"))));
    let whole = |from: usize, answers: Vec<(u16, Bytes)>| {
        for (n, (status, body)) in answers.into_iter().enumerate() {
            let i = (from + n) as u64;
            assert!(
                status == 200 && body.len() == 20_000 && matches_pattern(i, &body),
                "request {i}: {status}, {} bytes",
                body.len()
            );
        }
    };
    // A connection to the app that could not be opened is opened again once the tier has
    // given descriptors back: no request fails.
    whole(0, burst(0).await);
    let page = metrics().await;
    assert!(
        sample(&page, "sidecache_descriptor_shortages_total") >= 1.0,
        "no shortage seen"
    );
    let kept = sample(&page, "sidecache_open_tier_files");
    assert!(kept <= 0.6 * HELD as f64, "the tier still holds {kept}");
    // The tier keeps to its reduced size: hits do not take it back up...
    hit_held_twice().await;
    let after = sample(&metrics().await, "sidecache_open_tier_files");
    assert!(after <= kept, "the tier grew back to {after} from {kept}");
    // ...and another burst comes through whole.
    whole(CONNECTIONS, burst(CONNECTIONS).await);
}

/// Descriptors this process holds on files under `dir`: (all, of files since removed).
fn descriptors_under(dir: &std::path::Path) -> (usize, usize) {
    let dir = dir.canonicalize().unwrap();
    let (mut all, mut removed) = (0, 0);
    for fd in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        if target.starts_with(&dir) {
            all += 1;
            if target.to_string_lossy().ends_with(" (deleted)") {
                removed += 1;
            }
        }
    }
    (all, removed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_bodies_are_not_held_open_by_the_open_tier() {
    let origin = Origin::start().await;
    for i in 0..16 {
        origin.fixed(&format!("/ev/{i}"), CACHEABLE, pattern_chunk(i * 7919, 100_000));
    }
    let sc = TestSidecar::start_with(&origin.url(), |c| {
        c.max_size = 1 << 20;
        c.max_object_size = 200_000;
        c.memory_size = 0;
        c.open_files = Some(64);
        c.max_connections = 64;
    })
    .await;
    let cache = sc.sidecar.proxy.cache.clone();
    assert!(eventually(Duration::from_secs(10), async || cache.is_loaded()).await);
    // Each is stored, then hit twice (into the open tier); the budget holds about nine, so
    // the early ones are evicted while the tier holds them open.
    for i in 0..16 {
        let path = format!("/ev/{i}");
        get(&sc.url(&path)).await;
        assert!(eventually(Duration::from_secs(10), async || cache.stats().2 == 0).await);
        for _ in 0..2 {
            let (status, _, body) = get(&sc.url(&path)).await;
            assert!(status == 200 && body.len() == 100_000 && matches_pattern(i * 7919, &body));
        }
    }
    let (objects, _, _) = cache.stats();
    assert!(objects < 16, "some were evicted: {objects} objects");
    let cache_dir = sc.dir.path().join("cache");
    let settled = eventually(Duration::from_secs(10), async || descriptors_under(&cache_dir).1 == 0).await;
    let (open, removed) = descriptors_under(&cache_dir);
    assert!(settled, "{removed} descriptors on removed bodies");
    assert!(open > 0, "the open tier holds the bodies still stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_disk_hit_does_not_admit_an_object_to_memory() {
    let origin = Origin::start().await;
    origin.fixed("/once.css", CACHEABLE, pattern_bytes(5000));
    let sc = TestSidecar::start(&origin.url()).await;
    get(&sc.url("/once.css")).await;
    assert!(eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache.stats().0 == 1).await);
    assert_eq!(get(&sc.url("/once.css")).await.1, "sidecache; hit");
    // Only on disk: with its files gone it is fetched again.
    for f in object_files(&sc.dir.path().join("cache")) {
        std::fs::remove_file(f).unwrap();
    }
    let (status, _, body) = get(&sc.url("/once.css")).await;
    assert_eq!(status, 200);
    assert_eq!(body, Bytes::from(pattern_bytes(5000)));
    assert_eq!(origin.hits("/once.css"), 2, "not served from memory");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_deleted_underneath_are_refetched_not_errors() {
    let origin = Origin::start().await;
    origin.fixed("/gone.css", CACHEABLE, pattern_bytes(300_000));
    let sc = TestSidecar::start_with(&origin.url(), |c| c.memory_size = 0).await;
    get(&sc.url("/gone.css")).await;
    assert!(eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache.stats().0 == 1).await);
    for f in object_files(&sc.dir.path().join("cache")) {
        std::fs::remove_file(f).unwrap();
    }
    let (status, _, body) = get(&sc.url("/gone.css")).await;
    assert_eq!(status, 200);
    assert_eq!(body, Bytes::from(pattern_bytes(300_000)));
    assert_eq!(origin.hits("/gone.css"), 2, "fetched again from the app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_url_prefix_and_all_through_admin_and_cli() {
    let origin = Origin::start().await;
    for p in ["/assets/a.js", "/assets/b.js", "/img/c.png", "/img/d.png"] {
        origin.fixed(p, CACHEABLE, p.repeat(100));
    }
    let sc = TestSidecar::start_with(&origin.url(), |c| c.admin_token = Some("s3cret".into())).await;
    let fill_all = async || {
        for p in ["/assets/a.js", "/assets/b.js", "/img/c.png", "/img/d.png"] {
            get(&sc.url(p)).await;
        }
        eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache.stats().0 == 4).await
    };
    assert!(fill_all().await);
    let c = client();
    let denied = c.post(sc.admin_url("/purge?all=true")).send().await.unwrap();
    assert_eq!(denied.status(), 401, "the token is required");
    let resp = c
        .post(sc.admin_url("/purge?url=/assets/a.js"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap().trim(), r#"{"purged":1}"#);
    assert!(get(&sc.url("/assets/a.js")).await.1.contains("fwd=uri-miss"));
    assert_eq!(get(&sc.url("/assets/b.js")).await.1, "sidecache; hit");

    // The command line, against the same admin port.
    let out = std::process::Command::new(binary_path())
        .args([
            "purge",
            "--prefix",
            "/img/",
            "--target",
            &sc.admin_url(""),
            "--token",
            "s3cret",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), r#"{"purged":2}"#);
    assert!(get(&sc.url("/img/c.png")).await.1.contains("fwd=uri-miss"));

    assert!(fill_all().await);
    let resp = c
        .post(sc.admin_url("/purge?all=true"))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap().trim(), r#"{"purged":4}"#);
    assert_eq!(sc.sidecar.proxy.cache.stats().0, 0);
}

/// Starts the binary on `dir` and waits until its index is loaded.
async fn start_binary(origin: &Origin, dir: &Path) -> (Binary, std::net::SocketAddr) {
    let mut bin = Binary::serve(&origin.url(), dir, &[], &[("SIDECACHE_ACCESS_LOG", "false")]);
    let addr = bin.public_addr();
    let admin = bin.admin_addr();
    crate::support::wait_ready(admin).await;
    (bin, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_after_restart_does_not_touch_the_app() {
    let origin = Origin::start().await;
    origin.route(
        "/app.js",
        Behaviour::Generated {
            len: 500_000,
            headers: owned(CACHEABLE),
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let (mut bin, addr) = start_binary(&origin, dir.path()).await;
    let (_, cs, _) = get(&format!("http://{addr}/app.js")).await;
    assert!(cs.contains("stored"));
    assert!(hit_soon(&format!("http://{addr}/app.js")).await, "stored, then a hit");
    bin.signal(libc::SIGTERM);
    tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(10)));

    let (_bin, addr) = start_binary(&origin, dir.path()).await;
    let (status, cs, body) = get(&format!("http://{addr}/app.js")).await;
    assert_eq!((status.as_u16(), cs.as_str()), (200, "sidecache; hit"));
    assert!(matches_pattern(0, &body) && body.len() == 500_000);
    assert_eq!(origin.hits("/app.js"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_fill_then_restart_serves_correct_bytes() {
    let origin = Origin::start().await;
    let len = 64 * 65536;
    origin.route(
        "/large.bin",
        Behaviour::Slow {
            len,
            chunk: 65536,
            pause: Duration::from_millis(30),
            headers: owned(CACHEABLE),
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let (mut bin, addr) = start_binary(&origin, dir.path()).await;
    let resp = client().get(format!("http://{addr}/large.bin")).send().await.unwrap();
    let mut stream = resp.bytes_stream();
    let mut got = 0;
    while got < 10 * 65536 {
        got += stream.next().await.unwrap().unwrap().len();
    }
    bin.signal(libc::SIGKILL);
    tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(10)));
    drop(stream);

    let (_bin, addr) = start_binary(&origin, dir.path()).await;
    let tmp = dir.path().join("objects-v2/tmp");
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "half-written files were swept"
    );
    for expect_hit in [false, true] {
        let (status, cs, body) = get(&format!("http://{addr}/large.bin")).await;
        assert_eq!(status, 200);
        assert_eq!(cs == "sidecache; hit", expect_hit, "{cs}");
        assert!(body.len() as u64 == len && matches_pattern(0, &body), "correct bytes");
    }
    assert_eq!(origin.hits("/large.bin"), 2, "the killed fill was never served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_corrupted_while_down_is_detected_and_refetched() {
    let origin = Origin::start().await;
    origin.route(
        "/c.js",
        Behaviour::Generated {
            len: 200_000,
            headers: owned(CACHEABLE),
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let (mut bin, addr) = start_binary(&origin, dir.path()).await;
    get(&format!("http://{addr}/c.js")).await;
    assert!(hit_soon(&format!("http://{addr}/c.js")).await, "stored, then a hit");
    bin.signal(libc::SIGTERM);
    tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(10)));

    // Flip one byte in the middle of the stored body (same length: only the hash can tell).
    let bodies = object_files(dir.path());
    assert_eq!(bodies.len(), 1);
    let mut bytes = std::fs::read(&bodies[0]).unwrap();
    bytes[100_000] ^= 0xff;
    std::fs::write(&bodies[0], &bytes).unwrap();

    let (_bin, addr) = start_binary(&origin, dir.path()).await;
    let (status, cs, body) = get(&format!("http://{addr}/c.js")).await;
    assert_eq!(status, 200);
    assert!(cs.contains("fwd=uri-miss"), "{cs}");
    assert!(
        matches_pattern(0, &body) && body.len() == 200_000,
        "never the corrupt bytes"
    );
    assert_eq!(origin.hits("/c.js"), 2);
    assert_eq!(
        get(&format!("http://{addr}/c.js")).await.1,
        "sidecache; hit",
        "stored again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_directory_of_the_old_layout_is_removed_at_start_not_read() {
    let origin = Origin::start().await;
    origin.fixed("/old.css", CACHEABLE, pattern_bytes(5000));
    let dir = tempfile::tempdir().unwrap();
    // What the previous layout left: a record and a body under `objects-v1`.
    let old = dir.path().join("objects-v1");
    for (sub, name) in [
        ("meta/ab", "ab01.0000000000000001"),
        ("body/cd", "cd02.0000000000000001"),
    ] {
        std::fs::create_dir_all(old.join(sub)).unwrap();
        std::fs::write(old.join(sub).join(name), b"old layout bytes").unwrap();
    }
    let (_bin, addr) = start_binary(&origin, dir.path()).await;
    assert!(!old.exists(), "the old layout is removed");
    let (status, cs, body) = get(&format!("http://{addr}/old.css")).await;
    assert_eq!(status, 200);
    assert!(cs.contains("fwd=uri-miss"), "{cs}");
    assert_eq!(body, Bytes::from(pattern_bytes(5000)));
    assert!(hit_soon(&format!("http://{addr}/old.css")).await, "stored, then a hit");
    assert_eq!(object_files(dir.path()).len(), 1, "one file for the object");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_torn_by_a_crash_is_removed_at_startup_and_refetched() {
    let origin = Origin::start().await;
    origin.fixed("/torn.css", CACHEABLE, pattern_bytes(5000));
    let dir = tempfile::tempdir().unwrap();
    let (mut bin, addr) = start_binary(&origin, dir.path()).await;
    get(&format!("http://{addr}/torn.css")).await;
    assert!(hit_soon(&format!("http://{addr}/torn.css")).await, "stored, then a hit");
    bin.signal(libc::SIGKILL);
    tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(10)));

    // A crash (of the machine: the file is linked into place whole, but its blocks may not
    // all have reached the disk) can leave an object file cut short.
    let records = object_files(dir.path());
    assert_eq!(records.len(), 1);
    let len = std::fs::metadata(&records[0]).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&records[0])
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let (_bin, addr) = start_binary(&origin, dir.path()).await;
    let (status, cs, body) = get(&format!("http://{addr}/torn.css")).await;
    assert_eq!(status, 200);
    assert!(cs.contains("fwd=uri-miss"), "{cs}");
    assert_eq!(body, Bytes::from(pattern_bytes(5000)));
    assert_eq!(origin.hits("/torn.css"), 2);
    assert!(!records[0].exists(), "the torn object was removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_filesystem_keeps_serving_from_the_app_and_caching_resumes() {
    let fs = Tmpfs::mount("4m");
    let cache_dir = fs.0.path().join("cache");
    let origin = Origin::start().await;
    for i in 0..5 {
        origin.route(
            &format!("/f/{i}.js"),
            Behaviour::Generated {
                len: 600_000,
                headers: owned(CACHEABLE),
            },
        );
    }
    let sc = TestSidecar::start_with(&origin.url(), |c| {
        c.cache_dir = cache_dir.clone();
        c.max_size = 64 << 20;
        c.min_free = sidecache::units::MinFree::Bytes(0);
        c.memory_size = 0;
    })
    .await;
    assert!(eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache.is_loaded()).await);
    // Fill the filesystem with something else, leaving less than one object's room.
    let junk = fs.0.path().join("junk");
    let mut free = std::fs::File::create(&junk).unwrap();
    let _ = std::io::copy(&mut std::io::repeat(7).take(16 << 20), &mut free);
    drop(free);
    for round in 1..=2u64 {
        for i in 0..5 {
            let (status, cs, body) = get(&sc.url(&format!("/f/{i}.js"))).await;
            assert_eq!(status, 200, "never a 5xx because the disk is full");
            assert!(!cs.contains("hit"));
            assert!(matches_pattern(0, &body) && body.len() == 600_000);
            assert_eq!(origin.hits(&format!("/f/{i}.js")), round);
        }
    }
    // The disk recovers: caching resumes (the budget is re-read at most once a second).
    std::fs::remove_file(&junk).unwrap();
    assert!(
        eventually(Duration::from_secs(10), async || {
            get(&sc.url("/f/0.js")).await;
            get(&sc.url("/f/0.js")).await.1 == "sidecache; hit"
        })
        .await,
        "caching resumed after space was freed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_removed_while_a_client_reads_it_is_delivered_whole() {
    let origin = Origin::start().await;
    let len: u64 = 8 << 20;
    origin.route(
        "/video.mp4",
        Behaviour::Generated {
            len,
            headers: owned(CACHEABLE),
        },
    );
    let sc = TestSidecar::start_with(&origin.url(), |c| c.memory_size = 0).await;
    get(&sc.url("/video.mp4")).await;
    assert!(eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache.stats().0 == 1).await);
    // A hit, read slowly: the body is a mapping of the file.
    let resp = client().get(sc.url("/video.mp4")).send().await.unwrap();
    assert_eq!(cache_status(&resp), "sidecache; hit");
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    // Remove it from the cache (the same unlink eviction does) while the client is mid-body.
    assert_eq!(sc.sidecar.proxy.cache.purge(&sidecache::cache::Purge::All).await, 1);
    assert!(object_files(&sc.dir.path().join("cache")).is_empty(), "unlinked");
    let mut n = first.len() as u64;
    let mut ok = matches_pattern(0, &first);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        ok &= matches_pattern(n, &chunk);
        n += chunk.len() as u64;
    }
    assert!(ok && n == len, "the reader got every byte, unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_modified_in_place_while_running_is_detected_and_refetched() {
    let origin = Origin::start().await;
    origin.route(
        "/m.js",
        Behaviour::Generated {
            len: 300_000,
            headers: owned(CACHEABLE),
        },
    );
    let sc = TestSidecar::start_with(&origin.url(), |c| {
        c.memory_size = 0;
        c.open_files = Some(16);
        // The tier needs room under this process's descriptor limit.
        c.max_connections = 64;
    })
    .await;
    get(&sc.url("/m.js")).await;
    assert!(eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache.stats().0 == 1).await);
    // Two hits: the second puts it in the open tier, which must notice the change too.
    for _ in 0..2 {
        assert_eq!(get(&sc.url("/m.js")).await.1, "sidecache; hit");
    }
    // Someone rewrites the stored body in place: same length, other bytes.
    let bodies = object_files(&sc.dir.path().join("cache"));
    assert_eq!(bodies.len(), 1);
    let f = std::fs::OpenOptions::new().write(true).open(&bodies[0]).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 1000], 100_000).unwrap();
    drop(f);
    let (status, cs, body) = get(&sc.url("/m.js")).await;
    assert_eq!(status, 200);
    assert!(cs.contains("fwd=uri-miss"), "{cs}");
    assert!(
        body.len() == 300_000 && matches_pattern(0, &body),
        "never the modified bytes"
    );
    assert_eq!(origin.hits("/m.js"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_disk_keeps_serving_and_caching_resumes_when_writable() {
    let fs = Tmpfs::mount("16m");
    let origin = Origin::start().await;
    for i in 0..4 {
        origin.fixed(&format!("/ro/{i}.js"), CACHEABLE, pattern_chunk(i * 7919, 50_000));
    }
    origin.route(
        "/ro/chunked.js",
        Behaviour::Chunked {
            len: 30_000,
            headers: owned(CACHEABLE),
        },
    );
    let cache_dir = fs.0.path().join("cache");
    let sc = TestSidecar::start_with(&origin.url(), |c| {
        c.cache_dir = cache_dir.clone();
        c.memory_size = 0;
    })
    .await;
    get(&sc.url("/ro/0.js")).await;
    assert!(eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache.stats().0 == 1).await);
    let remount = |mode: &str| {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,{mode}"), fs.0.path().to_str().unwrap()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount {mode}");
    };
    remount("ro");
    // What is stored is still served; new objects come from the app, whole, never a 5xx.
    assert_eq!(get(&sc.url("/ro/0.js")).await.1, "sidecache; hit");
    for round in 1..=2u64 {
        let (status, cs, body) = get(&sc.url("/ro/1.js")).await;
        assert_eq!(status, 200, "never a 5xx because the disk is read-only");
        assert!(!cs.contains("hit"), "{cs}");
        assert!(matches_pattern(7919, &body) && body.len() == 50_000);
        assert_eq!(origin.hits("/ro/1.js"), round);
    }
    // A body without a length (copied to disk beside its client) too: served whole, and the
    // copy that could not be made is counted as a storage failure, not lost without a trace.
    let storage_failures = async || {
        let text = scrape(sc.admin).await;
        (
            metric(&text, "sidecache_fills_aborted_total", &["reason=\"storage\""]),
            metric(&text, "sidecache_storage_errors_total", &[]),
        )
    };
    let before = storage_failures().await;
    let (status, _, body) = get(&sc.url("/ro/chunked.js")).await;
    assert!(status == 200 && body.len() == 30_000 && matches_pattern(0, &body));
    let counted = eventually(Duration::from_secs(10), async || {
        let now = storage_failures().await;
        now.0 > before.0 && now.1 > before.1
    })
    .await;
    assert!(counted, "{}", scrape(sc.admin).await);
    remount("rw");
    assert!(
        eventually(Duration::from_secs(10), async || {
            get(&sc.url("/ro/2.js")).await;
            get(&sc.url("/ro/2.js")).await.1 == "sidecache; hit"
        })
        .await,
        "caching resumed once the disk was writable again"
    );
}

/// The bytes object `i` of the kill test must have.
fn kill_test_body(i: u64) -> Bytes {
    pattern_chunk(i * 7919, 20_000 + (i as usize * 3_331) % 180_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_under_load_never_serves_corrupt_bytes() {
    const OBJECTS: u64 = 120;
    let origin = Origin::start().await;
    for i in 0..OBJECTS {
        if i.is_multiple_of(10) {
            // Slow fills, so some are always in progress when the process dies.
            let len = kill_test_body(i).len();
            origin.route(
                &format!("/k/{i}"),
                Behaviour::Slow {
                    len: len as u64,
                    chunk: 8192,
                    pause: Duration::from_millis(15),
                    headers: owned(CACHEABLE),
                },
            );
        } else {
            origin.fixed(&format!("/k/{i}"), CACHEABLE, kill_test_body(i));
        }
    }
    let expected = |i: u64| {
        if i.is_multiple_of(10) {
            pattern_chunk(0, kill_test_body(i).len())
        } else {
            kill_test_body(i)
        }
    };
    let dir = tempfile::tempdir().unwrap();
    // A different kill point each round, from the clock: up to 500 ms into the load.
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    let mut verified = 0u64;
    for round in 0..3 {
        let (mut bin, addr) = start_binary(&origin, dir.path()).await;
        let stop = Arc::new(AtomicBool::new(false));
        let checked = Arc::new(AtomicU64::new(0));
        let clients: Vec<_> = (0..12u64)
            .map(|c| {
                let stop = stop.clone();
                let checked = checked.clone();
                tokio::spawn(async move {
                    let http = client();
                    let mut ok = 0u64;
                    let mut n = c * 37 + round;
                    while !stop.load(Ordering::Relaxed) {
                        n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                        let i = (n >> 33) % OBJECTS;
                        let Ok(resp) = http.get(format!("http://{addr}/k/{i}")).send().await else {
                            break;
                        };
                        if resp.status() != 200 {
                            continue;
                        }
                        // A body cut by the kill is an error, not a short success.
                        let Ok(body) = resp.bytes().await else { break };
                        assert_eq!(body, expected(i), "round {round}: object {i} served corrupt");
                        ok += 1;
                        checked.fetch_add(1, Ordering::Relaxed);
                    }
                    ok
                })
            })
            .collect();
        // The load must be under way before the fault: wait (bounded) until the
        // clients have checked some bodies in this round.
        let deadline = Instant::now() + Duration::from_secs(30);
        while checked.load(Ordering::Relaxed) < 30 {
            assert!(Instant::now() < deadline, "round {round}: clients checked no bodies");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        // The fault injected at a random moment after that; not a synchronisation.
        tokio::time::sleep(Duration::from_millis((seed >> 33) % 500)).await;
        bin.signal(libc::SIGKILL);
        tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(10)));
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            verified += c.await.unwrap();
        }
    }
    assert!(verified > 50, "only {verified} bodies were checked");
    // After the last crash: every object is served whole and correct.
    let (_bin, addr) = start_binary(&origin, dir.path()).await;
    for i in 0..OBJECTS {
        let body = client()
            .get(format!("http://{addr}/k/{i}"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(body, expected(i), "object {i} after restart");
    }
    assert_eq!(
        std::fs::read_dir(dir.path().join("objects-v2/tmp")).unwrap().count(),
        0,
        "nothing half-written survives a restart"
    );
}
