//! Startup with a warm cache directory: writes N small objects (default 100,000) as the cache
//! stores them (slots of segment files, appended by the segments' writer), then times a fresh
//! `Cache::open` until the index is rebuilt, and reports the process's resident memory. Run:
//! `cargo bench --bench rebuild [-- N] [--dir PATH]`.

use std::time::{Duration, Instant, SystemTime};

use sidecache::cache::Cache;
use sidecache::cache::key::{CacheKey, Digest};
use sidecache::cache::meta::Meta;
use sidecache::cache::segments::{Geometry, Kind, Segments};
use sidecache::cache::store::Store;
use sidecache::config::{Config, Loader};

fn rss_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: u64 = args.iter().find_map(|a| a.parse().ok()).unwrap_or(100_000);
    let dir = tempfile::tempdir().expect("temp dir");
    // `--dir PATH` writes the objects there and keeps them (the load benchmark then times the
    // real binary starting on them).
    let cache_dir = match args.iter().position(|a| a == "--dir") {
        Some(i) => std::path::PathBuf::from(args.get(i + 1).expect("--dir PATH")),
        None => dir.path().join("cache"),
    };

    let started = Instant::now();
    {
        let store = std::sync::Arc::new(Store::open(&cache_dir).expect("open store"));
        let segments = Segments::open(&store, Geometry::for_budget(8 << 30), Default::default())
            .expect("segments")
            .expect("a filesystem that punches holes");
        let mut headers = http::HeaderMap::new();
        headers.insert("content-type", http::HeaderValue::from_static("application/javascript"));
        headers.insert(
            "cache-control",
            http::HeaderValue::from_static("public, max-age=31536000"),
        );
        let mut answers = Vec::with_capacity(n as usize);
        for i in 0..n {
            let body = format!("console.log({i});\n").repeat(8);
            let generation = store.next_gen();
            let digest = Digest::from(blake3::hash(body.as_bytes()));
            let key = CacheKey::from_stored(format!("http://app.example/assets/{i}.js"));
            let meta = Meta {
                key: key.clone(),
                status: 200,
                headers: headers.clone(),
                request_time: SystemTime::now(),
                response_time: SystemTime::now(),
                body_len: body.len() as u64,
                digest,
                vary: vec![],
                prepared: Default::default(),
            };
            let tail = sidecache::cache::store::tail(&meta);
            let parts = vec![bytes::Bytes::from(body), bytes::Bytes::from(tail)];
            answers.push(segments.append(Kind::Object, key.hash(), generation, parts));
        }
        for answer in answers {
            // Kept: as the index holds what it stored when the process stops.
            std::mem::forget(answer.blocking_recv().expect("answered").expect("written"));
        }
    }
    println!("wrote {n} objects in {:.1?}", started.elapsed());

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let flags = vec![
            ("cache_dir", cache_dir.display().to_string()),
            ("max_size", "8GB".to_owned()),
            ("min_free", "0".to_owned()),
        ];
        let config: Config = Loader::new(std::iter::empty()).flags(flags).load().expect("config");
        let before = rss_kib("VmRSS:");
        let started = Instant::now();
        let cache = Cache::open(config.cache_settings());
        while !cache.is_loaded() {
            tokio::time::sleep(Duration::from_millis(5)).await;
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "rebuild took over two minutes"
            );
        }
        let took = started.elapsed();
        let (objects, used, _) = cache.stats();
        println!(
            "rebuilt index of {objects} objects ({used} bytes) in {:.3} s = {:.0} objects/s",
            took.as_secs_f64(),
            objects as f64 / took.as_secs_f64()
        );
        println!(
            "resident memory: {} KiB before open, {} KiB after, peak {} KiB",
            before,
            rss_kib("VmRSS:"),
            rss_kib("VmHWM:")
        );
        assert_eq!(objects as u64, n, "every object indexed");
    });
}
