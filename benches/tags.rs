//! Issue 18's figures, as a bounded program (not criterion: it measures memory and a latency
//! distribution under a concurrent purge, not one operation's mean). Run:
//! `cargo bench --bench tags` (release). Every loop is bounded in count.
//!
//! 1. The index: 200,000 entries, each tagged `product-<i/20>` and `tenant-<i%50>`, one in 20
//!    also `hot` (10,000). The time the index lock is held to select and remove the 10,000
//!    `hot` entries (what a purge by tag stalls hits for), against a purge by prefix (a scan);
//!    and the memory per tag reference, from the resident set: an index of the same entries
//!    without tags, then with.
//! 2. A real sidecar (in process, loopback, a small origin in this program): 20,000 objects
//!    stored, 10,000 tagged `hot`; hits on the others from 8 clients, p50/p99/max of their
//!    latency before and while `POST /purge?tag=hot` runs, and the purge's own time.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt as _;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
mod common;

use common::{entry, key};
use sidecache::cache::index::Index;

const N: u64 = 200_000;
const HOT_EVERY: u64 = 20;

fn tags(i: u64) -> Vec<Box<str>> {
    let mut t: Vec<Box<str>> = vec![
        format!("product-{}", i / 20).into(),
        format!("tenant-{}", i % 50).into(),
    ];
    if i.is_multiple_of(HOT_EVERY) {
        t.push("hot".into());
    }
    t
}

fn index(tagged: bool) -> Index {
    let mut ix = Index::new();
    for i in 0..N {
        if tagged {
            let _ = ix.insert_tagged(key(i), entry(i), 0, &tags(i));
        } else {
            ix.insert(key(i), entry(i), 0);
        }
    }
    ix
}

/// Resident bytes of this process (`VmRSS`).
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    kib * 1024
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn part_index() {
    println!("## index: {N} entries, {} tagged `hot`", N / HOT_EVERY);
    let before = rss();
    let plain = index(false);
    let untagged = rss() - before;
    let started = Instant::now();
    let tagged = index(true);
    let build = started.elapsed();
    let with_tags = rss() - before - untagged;
    let (names, references) = tagged.tag_stats();
    let extra = with_tags as f64 - untagged as f64;
    println!(
        "memory: {:.0} B per entry untagged; tags add {:.1} MB for {references} references to {names} tags: {:.1} B per reference (names included)",
        untagged as f64 / N as f64,
        extra / 1e6,
        extra / references as f64
    );
    println!("build with tags: {:.0} ms", ms(build));
    drop(plain);
    drop(tagged);

    let mut tag_runs = Vec::new();
    let mut prefix_runs = Vec::new();
    let mut select_runs = Vec::new();
    let mut batch_max = Duration::ZERO;
    for _ in 0..5 {
        let mut ix = index(true);
        let started = Instant::now();
        let keys = ix.keys_tagged(&["hot".to_owned()]);
        select_runs.push(started.elapsed());
        // As `Cache::purge` does: the lock is let go between batches.
        let mut removed = 0;
        for batch in keys.chunks(sidecache::cache::PURGE_BATCH) {
            let t = Instant::now();
            removed += batch.iter().filter_map(|k| ix.remove(k)).count();
            batch_max = batch_max.max(t.elapsed());
        }
        tag_runs.push(started.elapsed());
        assert_eq!(removed as u64, N / HOT_EVERY);
        // The same count by a scan (a purge by prefix matching 1 in 20 keys).
        let started = Instant::now();
        let keys = ix.keys_where(|e| e.key.ends_with("0.js") && e.image.generation % 2 == 0);
        let removed = keys.iter().filter_map(|k| ix.remove(k)).count();
        prefix_runs.push(started.elapsed());
        std::hint::black_box(removed);
    }
    tag_runs.sort();
    prefix_runs.sort();
    println!(
        "purge by tag, index steps (select + remove 10,000): min {:.1} ms, median {:.1} ms, max {:.1} ms",
        ms(tag_runs[0]),
        ms(tag_runs[2]),
        ms(tag_runs[4])
    );
    select_runs.sort();
    println!(
        "  of which selecting by tag: median {:.2} ms; longest single hold of the lock (selection or a batch of {}): {:.2} ms",
        ms(select_runs[2]),
        sidecache::cache::PURGE_BATCH,
        ms(batch_max.max(select_runs[4]))
    );
    println!(
        "for comparison, a scan that selects and removes ~10,000 of 190,000: median {:.1} ms",
        ms(prefix_runs[2])
    );
}

const SIDE_N: u64 = 20_000;

async fn origin() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = service_fn(|req: Request<Incoming>| async move {
                    let i: u64 = req.uri().path().trim_start_matches("/o/").parse().unwrap_or(0);
                    let tag = if i.is_multiple_of(2) { "hot" } else { "cold" };
                    let resp = Response::builder()
                        .header("cache-control", "public, max-age=3600")
                        .header("content-type", "application/javascript")
                        .header("surrogate-key", format!("{tag} group-{}", i % 100))
                        .body(Full::new(Bytes::from(vec![b'x'; 512])))
                        .unwrap();
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn percentiles(mut v: Vec<Duration>) -> String {
    if v.is_empty() {
        return "no samples".into();
    }
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
    format!(
        "{} hits: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        v.len(),
        ms(at(0.5)),
        ms(at(0.99)),
        ms(*v.last().unwrap())
    )
}

async fn part_sidecar() {
    println!("\n## sidecar: {SIDE_N} objects stored, {} tagged `hot`", SIDE_N / 2);
    let upstream = origin().await;
    let dir = tempfile::tempdir().unwrap();
    let flags = vec![
        ("listen", "127.0.0.1:0".to_owned()),
        ("admin_listen", "127.0.0.1:0".to_owned()),
        ("upstream", format!("http://{upstream}")),
        ("cache_dir", dir.path().join("cache").display().to_string()),
        ("max_size", "2GiB".to_owned()),
        ("min_free", "0".to_owned()),
        ("access_log", "false".to_owned()),
    ];
    let config = sidecache::config::Loader::new(std::iter::empty())
        .flags(flags)
        .load()
        .unwrap();
    let sidecar = std::sync::Arc::new(sidecache::sidecar::Sidecar::start(config).await.unwrap());
    let listener = sidecar.bind_public().await.unwrap();
    let addr = listener.local_addr().unwrap();
    let admin = sidecar.admin_addr();
    let s = sidecar.clone();
    tokio::spawn(async move { s.serve(listener).await });
    let cache = sidecar.proxy.cache().clone();
    for _ in 0..1000 {
        if cache.is_loaded() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let client = sidecache::http_client()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let started = Instant::now();
    futures_util::stream::iter(0..SIDE_N)
        .map(|i| {
            let client = client.clone();
            async move {
                let _ = client
                    .get(format!("http://{addr}/o/{i}"))
                    .send()
                    .await
                    .unwrap()
                    .bytes()
                    .await;
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    for _ in 0..1000 {
        if cache.stats().0 as u64 == SIDE_N {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "filled {} objects in {:.1} s",
        cache.stats().0,
        started.elapsed().as_secs_f64()
    );

    // Hits on the `cold` objects from 8 clients: a fixed number before, then while the purge runs.
    let running = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let during = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let window = std::sync::Arc::new(std::sync::Mutex::new(None::<(Instant, Instant)>));
    let mut clients = Vec::new();
    for c in 0..8u64 {
        let (client, running) = (client.clone(), running.clone());
        clients.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut i = c;
            // Bounded: at most 200,000 hits per client.
            for _ in 0..200_000 {
                if !running.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let n = (i * 2 + 1) % SIDE_N;
                i += 8;
                let t = Instant::now();
                let resp = client.get(format!("http://{addr}/o/{n}")).send().await.unwrap();
                let _ = resp.bytes().await;
                samples.push((t, t.elapsed()));
            }
            samples
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let purge_started = Instant::now();
    let answer = client
        .post(format!("http://{admin}/purge?tag=hot"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let purge_done = Instant::now();
    *window.lock().unwrap() = Some((purge_started, purge_done));
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut before = Vec::new();
    for c in clients {
        for (t, d) in c.await.unwrap() {
            if t + d < purge_started {
                before.push(d);
            } else if t <= purge_done {
                during.lock().unwrap().push(d);
            }
        }
    }
    println!(
        "purge by tag over HTTP: {} in {:.1} ms (index step, unlinking off the runtime, gauges)",
        answer.trim(),
        ms(purge_done - purge_started)
    );
    println!("hits before the purge: {}", percentiles(before));
    println!("hits while it ran:     {}", percentiles(during.lock().unwrap().clone()));
    println!("objects left: {}", cache.stats().0);
    sidecar.shutdown.cancel();
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    part_index();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(part_sidecar());
}
