//! Issue 16, item 1: room on demand. A new object that does not fit evicts the least recently
//! used objects it needs, whatever the watermarks; it is refused only when it could never fit.
//! The budget (what the directory spends, `du`-style) is never exceeded meanwhile.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

use crate::support::{
    Behaviour, Binary, Origin, TestSidecar, Tmpfs, app_client, disk_usage, eventually, matches_pattern, metric,
    origin::owned, scrape,
};

const CACHEABLE: &[(&str, &str)] = &[
    ("cache-control", "public, max-age=3600"),
    ("content-type", "application/javascript"),
];

const MIB: u64 = 1 << 20;

/// `len` bytes of the test pattern from offset `seed * 7919`: distinct bodies for distinct
/// seeds (identical ones would share one content-addressed file).
fn body(seed: u64, len: u64) -> Bytes {
    let start = seed * 7919;
    let mut out = Vec::with_capacity(len as usize);
    let mut at = 0;
    while at < len {
        let n = (len - at).min(MIB);
        out.extend_from_slice(&crate::support::pattern_chunk(start + at, n as usize));
        at += n;
    }
    Bytes::from(out)
}

/// Serves `path` with [`body`]`(seed, len)` and a Content-Length.
fn route(origin: &Origin, path: &str, seed: u64, len: u64) {
    origin.fixed(path, CACHEABLE, body(seed, len));
}

/// GETs `url`: (cache status, whether the body is `body(seed, len)`).
async fn get(c: &reqwest::Client, url: &str) -> (String, Bytes) {
    let resp = c.get(url).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{url}");
    let cs = resp
        .headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (cs, resp.bytes().await.unwrap())
}

fn is_hit(cs: &str) -> bool {
    cs == "sidecache; hit"
}

/// Waits until no fill holds a reservation: the last one committed (or gave up).
async fn settle(sc: &TestSidecar) {
    let cache = sc.sidecar.proxy.cache().clone();
    assert!(
        eventually(Duration::from_secs(10), async || cache.stats().2 == 0).await,
        "a reservation was never given back"
    );
}

/// Whether the cache alone answers `path` (`only-if-cached`: never a request to the app).
async fn held(sc: &TestSidecar, path: &str) -> bool {
    let resp = app_client()
        .get(sc.url(path))
        .header("cache-control", "only-if-cached")
        .send()
        .await
        .unwrap();
    resp.status() == 200
}

/// GETs `path` (a miss), then asks the cache alone (`only-if-cached`: a `504` while it is not
/// stored, never a request to the app) until it answers: it was stored at its first fill (a
/// fill without a length holds its client back while the disk catches up, rather than give up
/// the copy on a busy machine). Returns the body of the miss.
async fn store(sc: &TestSidecar, path: &str) -> Bytes {
    let c = app_client();
    let (cs, first) = get(&c, &sc.url(path)).await;
    assert!(!is_hit(&cs), "{path} was not stored yet: {cs}");
    let stored = eventually(Duration::from_secs(10), async || held(sc, path).await).await;
    if stored {
        return first;
    }
    // Why, for the failure message (the counters are this process's, all tests').
    let text = scrape(sc.admin).await;
    let aborted: Vec<_> = text
        .lines()
        .filter(|l| l.starts_with("sidecache_fills_aborted"))
        .collect();
    panic!("{path} was never stored; {}", aborted.join(", "));
}

/// The real binary with `--max-size 10MiB` on `dir`, ready: (binary, public, admin).
async fn serve_10mib(origin: &Origin, dir: &Path) -> (Binary, std::net::SocketAddr, std::net::SocketAddr) {
    let mut bin = Binary::serve(
        &origin.url(),
        dir,
        &["--max-size", "10MiB"],
        &[("SIDECACHE_ACCESS_LOG", "false")],
    );
    let (public, admin) = (bin.public_addr(), bin.admin_addr());
    crate::support::wait_ready(admin).await;
    (bin, public, admin)
}

/// The defect as the issue found it, on the real binary (its metrics are its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirteen_one_mib_objects_in_a_ten_mib_budget_are_each_stored() {
    let origin = Origin::start().await;
    for i in 1..=13 {
        route(&origin, &format!("/o{i}"), i, MIB);
    }
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    let (bin, public, admin) = serve_10mib(&origin, &cache_dir).await;
    let c = app_client();
    let url = |i: u64| format!("http://{public}/o{i}");
    // o1..o13, o1 twice (after o8). Each miss is committed before the next request.
    let mut misses = 0.0;
    for i in [1, 2, 3, 4, 5, 6, 7, 8, 1, 9, 10, 11, 12, 13] {
        let (cs, got) = get(&c, &url(i)).await;
        assert!(
            got.len() as u64 == MIB && matches_pattern(i * 7919, &got),
            "o{i} intact"
        );
        if !is_hit(&cs) {
            misses += 1.0;
            let stored = eventually(Duration::from_secs(10), async || {
                let text = scrape(admin).await;
                metric(&text, "sidecache_fills_completed_total", &[])
                    + metric(&text, "sidecache_fills_aborted_total", &[])
                    >= misses
            })
            .await;
            assert!(stored, "the fill of o{i} never ended");
        }
    }
    let text = scrape(admin).await;
    assert_eq!(
        metric(&text, "sidecache_fills_aborted_total", &[]),
        0.0,
        "no fill refused:\n{}",
        text.lines()
            .filter(|l| l.starts_with("sidecache_fills_aborted"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        metric(&text, "sidecache_fills_completed_total", &[]),
        misses,
        "every miss stored"
    );
    assert!(metric(&text, "sidecache_evictions_total", &[]) > 0.0, "room was made");
    // Each again, most recent first: the newest are there, the oldest made room.
    for i in [13, 12, 11, 10] {
        assert!(is_hit(&get(&c, &url(i)).await.0), "o{i} is stored");
    }
    assert!(!is_hit(&get(&c, &url(2)).await.0), "o2, asked for once, made room");
    assert_eq!(origin.hits("/o13"), 1);
    // A restart finds them too.
    bin.signal(libc::SIGTERM);
    let mut bin = bin;
    assert!(bin.wait_exit(Duration::from_secs(20)).success());
    drop(bin);
    let (_bin, public, _) = serve_10mib(&origin, &cache_dir).await;
    let (cs, _) = get(&c, &format!("http://{public}/o13")).await;
    assert!(is_hit(&cs), "o13 survives a restart: {cs}");
    assert_eq!(origin.hits("/o13"), 1);
}

/// Objects of 5%, 10%, 25% and 40% of the budget, one after another into a cache left
/// between its watermarks by small ones: each is stored (then a hit), with a length and
/// without (chunked: the tee fill reserves as the bytes come).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_of_a_growing_share_of_the_budget_are_each_stored() {
    for chunked in [false, true] {
        let budget = 16 * MIB;
        let origin = Origin::start().await;
        let sc = TestSidecar::start_with(&origin.url(), |c| {
            // These tests are about room: `store`'s polls are requests, which would make each
            // victim outweigh the next new object (admission: `a_flood_of_one_off_urls_*`).
            c.admission = false;
            // Budgets here are worked out for objects alone (variants: `compress`'s tests).
            c.compress.enabled = false;
            c.max_size = budget;
            c.max_objects = 64;
            c.max_object_size = budget / 2;
        })
        .await;
        // Fifty objects of 2%: the cache full, then kept between its watermarks.
        for i in 0..50 {
            route(&origin, &format!("/small/{i}"), 1000 + i, budget / 50);
            get(&app_client(), &sc.url(&format!("/small/{i}"))).await;
            settle(&sc).await;
        }
        for (i, percent) in [5u64, 10, 25, 40].into_iter().enumerate() {
            let len = budget * percent / 100;
            let path = format!("/big/{percent}");
            if chunked {
                // Generated from offset 0: distinct because the lengths are.
                origin.route(
                    &path,
                    Behaviour::Chunked {
                        len,
                        headers: owned(CACHEABLE),
                    },
                );
            } else {
                route(&origin, &path, i as u64, len);
            }
            let seed = if chunked { 0 } else { i as u64 * 7919 };
            let got = store(&sc, &path).await;
            assert!(got.len() as u64 == len && matches_pattern(seed, &got), "{path} intact");
            assert_eq!(
                origin.hits(&path),
                1,
                "{path} (chunked: {chunked}) stored at its first fill"
            );
        }
        for percent in [5, 10, 25, 40] {
            let path = format!("/big/{percent}");
            let before = origin.hits(&path);
            assert!(
                is_hit(&get(&app_client(), &sc.url(&path)).await.0),
                "{path} still stored"
            );
            assert_eq!(origin.hits(&path), before);
        }
        assert!(disk_usage(&sc.dir.path().join("cache")).0 <= budget);
        sc.stop().await;
    }
}

/// The LRU order is kept when a fill makes room: an object asked for once goes before one
/// asked for twice, even an older one (the index is a segmented LRU).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_evicts_an_object_asked_for_once_before_one_asked_for_twice() {
    let origin = Origin::start().await;
    for (i, name) in ["a", "b", "c", "d"].into_iter().enumerate() {
        route(&origin, &format!("/{name}"), i as u64, MIB);
    }
    // Room for three such objects besides the layout: the fourth does not fit, yet the cache
    // is below its high watermark, so no eviction pass would run for it.
    let sc = TestSidecar::start_with(&origin.url(), |c| {
        // These tests are about room: `store`'s polls are requests, which would make each
        // victim outweigh the next new object (admission: `a_flood_of_one_off_urls_*`).
        c.admission = false;
        // Budgets here are worked out for objects alone (variants: `compress`'s tests).
        c.compress.enabled = false;
        c.max_size = 4 * MIB;
        c.max_objects = 16;
        c.memory_size = 0;
    })
    .await;
    let c = app_client();
    store(&sc, "/a").await; // a is asked for twice (stored, then a hit)
    for path in ["/b", "/c"] {
        assert!(!is_hit(&get(&c, &sc.url(path)).await.0));
        settle(&sc).await;
    }
    // d makes room: b goes (asked for once), not a (older, but asked for twice), nor c.
    store(&sc, "/d").await;
    for path in ["/a", "/c", "/d"] {
        assert!(is_hit(&get(&c, &sc.url(path)).await.0), "{path} kept");
    }
    assert_eq!(origin.hits("/b"), 1);
    assert!(!is_hit(&get(&c, &sc.url("/b")).await.0), "b was evicted");
    assert_eq!((origin.hits("/a"), origin.hits("/c"), origin.hits("/d")), (1, 1, 1));
}

/// Concurrent readers of a fill that has to make room (coalescing): the app is asked once,
/// every reader gets every byte, and the object is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_of_a_fill_that_makes_room_share_it_and_it_is_stored() {
    let origin = Origin::start().await;
    for i in 0..3 {
        route(&origin, &format!("/full/{i}"), i, MIB);
    }
    // Slow to answer, so that the requests for it meet in one fill.
    origin.route(
        "/new",
        Behaviour::Delay(
            Duration::from_millis(200),
            Box::new(Behaviour::Fixed {
                status: 200,
                headers: owned(CACHEABLE),
                body: body(9, MIB),
            }),
        ),
    );
    let sc = TestSidecar::start_with(&origin.url(), |c| {
        // These tests are about room: `store`'s polls are requests, which would make each
        // victim outweigh the next new object (admission: `a_flood_of_one_off_urls_*`).
        c.admission = false;
        // Budgets here are worked out for objects alone (variants: `compress`'s tests).
        c.compress.enabled = false;
        c.max_size = 4 * MIB;
        c.max_objects = 16;
        c.memory_size = 0;
    })
    .await;
    for i in 0..3 {
        get(&app_client(), &sc.url(&format!("/full/{i}"))).await;
        settle(&sc).await;
    }
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let url = sc.url("/new");
            tokio::spawn(async move { get(&app_client(), &url).await.1 })
        })
        .collect();
    for r in readers {
        let got = r.await.unwrap();
        assert!(got.len() as u64 == MIB && matches_pattern(9 * 7919, &got));
    }
    assert_eq!(origin.hits("/new"), 1, "one fill for all readers");
    settle(&sc).await;
    assert!(is_hit(&get(&app_client(), &sc.url("/new")).await.0), "stored");
    assert_eq!(origin.hits("/new"), 1);
}

/// 32 clients filling at once objects of 5% to 40% of the budget, with and without a length:
/// what the directory spends (`du`, sampled) never exceeds the budget; every reservation is
/// given back; and room is still made afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_is_never_exceeded_while_32_clients_make_room_at_once() {
    let budget = 8 * MIB;
    let origin = Origin::start().await;
    let shares = [5u64, 10, 25, 40];
    let count = 160u64;
    let len_of = move |i: u64| budget * shares[(i % 4) as usize] / 100 + i;
    for i in 0..count {
        let path = format!("/f/{i}");
        if i % 8 == 7 {
            // Chunked: distinct because the lengths are.
            origin.route(
                &path,
                Behaviour::Chunked {
                    len: len_of(i),
                    headers: owned(CACHEABLE),
                },
            );
        } else {
            route(&origin, &path, i, len_of(i));
        }
    }
    let sc = TestSidecar::start_with(&origin.url(), |c| {
        // These tests are about room: `store`'s polls are requests, which would make each
        // victim outweigh the next new object (admission: `a_flood_of_one_off_urls_*`).
        c.admission = false;
        // Budgets here are worked out for objects alone (variants: `compress`'s tests).
        c.compress.enabled = false;
        c.max_size = budget;
        c.max_objects = 64;
        c.max_object_size = budget / 2;
        c.memory_size = 0;
    })
    .await;
    let dir = sc.dir.path().join("cache");
    let sampler = crate::support::PeakDisk::start(dir.clone());
    let next = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..32)
        .map(|_| {
            let next = next.clone();
            let base = sc.url("/f/");
            tokio::spawn(async move {
                let c = app_client();
                // Bytes of known length whose fill got its room (`stored`).
                let mut stored = 0;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return stored;
                    }
                    let (cs, got) = get(&c, &format!("{base}{i}")).await;
                    let seed = if i % 8 == 7 { 0 } else { i * 7919 };
                    assert!(got.len() as u64 == len_of(i) && matches_pattern(seed, &got), "/f/{i}");
                    if i % 8 != 7 && cs.contains("stored") {
                        stored += got.len() as u64;
                    }
                }
            })
        })
        .collect();
    let mut stored = 0;
    for w in workers {
        stored += w.await.unwrap();
    }
    settle(&sc).await;
    let (peak, samples) = sampler.stop();
    assert!(samples > 10, "sampled {samples} times");
    assert!(peak <= budget, "peak {peak} bytes on disk over a budget of {budget}");
    // The budget was pressed: fills were given room for more than it holds, so room was made
    // for them. (Not the disk's peak: under load, room reserved for fills still writing keeps
    // what is on the disk well below the budget at every sample. 42 MB alone, 15.5 MB in a
    // full-suite run, where more of the fills' waits for room run out.)
    assert!(stored > budget, "fills given room: {stored} bytes, budget {budget}");
    // Nothing leaked: room is still made, for the largest share, once the flood is over.
    route(&origin, "/after", 999, budget * 40 / 100);
    store(&sc, "/after").await;
    assert_eq!(origin.hits("/after"), 1);
    assert!(disk_usage(&dir).0 <= budget);
}

/// `min_free` lowers the budget (a 16 MiB filesystem keeping 8 MiB free: about 8 MiB, far
/// below `max_size`): objects that do not fit in what is left still make room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_lowered_by_min_free_still_makes_room() {
    let fs = Tmpfs::mount("16m");
    let cache_dir = fs.0.path().join("cache");
    let origin = Origin::start().await;
    for i in 0..12 {
        route(&origin, &format!("/m/{i}"), i, MIB);
    }
    let sc = TestSidecar::start_with(&origin.url(), |c| {
        // These tests are about room: `store`'s polls are requests, which would make each
        // victim outweigh the next new object (admission: `a_flood_of_one_off_urls_*`).
        c.admission = false;
        // Budgets here are worked out for objects alone (variants: `compress`'s tests).
        c.compress.enabled = false;
        c.cache_dir = cache_dir.clone();
        c.max_size = 64 * MIB;
        c.max_objects = 32;
        c.min_free = sidecache::units::MinFree::Bytes(8 * MIB);
        c.memory_size = 0;
    })
    .await;
    let cache = sc.sidecar.proxy.cache().clone();
    let mut lowest = u64::MAX;
    for i in 0..12 {
        let path = format!("/m/{i}");
        let got = store(&sc, &path).await;
        assert!(got.len() as u64 == MIB && matches_pattern(i * 7919, &got));
        assert_eq!(origin.hits(&path), 1, "{path} stored at its first fill");
        let budget = cache.budget();
        lowest = lowest.min(budget);
        assert!(disk_usage(&cache_dir).0 <= budget, "over the budget in force");
    }
    assert!(lowest <= 9 * MIB, "min_free lowered the budget (to {lowest})");
    assert!(is_hit(&get(&app_client(), &sc.url("/m/11")).await.0));
    sc.stop().await;
}

/// A sidecache of 8 MiB on disk and no memory tier, compression off, `admission` as given: the
/// budget the admission tests fill.
async fn admission_sidecar(origin: &Origin, admission: bool) -> TestSidecar {
    TestSidecar::start_with(&origin.url(), |c| {
        c.compress.enabled = false;
        c.memory_size = 0;
        c.max_size = 8 * MIB;
        c.admission = admission;
    })
    .await
}

/// Issue 26: admission. A flood of one-off URLs (a crawler, an attacker's cache-busting query
/// strings) into a full cache does not push out the objects its users ask for again, even
/// those the segmented LRU has demoted to probation: the flood's objects are asked for once,
/// the victims more often, so the full cache declines them (counted). With admission off the
/// same flood evicts some of them: the test can fail.
async fn one_off_flood(admission: bool) -> (Vec<String>, f64) {
    const HOT: u64 = 10;
    const KIB512: u64 = MIB / 2;
    let origin = Origin::start().await;
    for i in 0..HOT {
        route(&origin, &format!("/hot/{i}"), i, KIB512);
    }
    for i in 0..30 {
        route(&origin, &format!("/crawl/{i}"), 1000 + i, KIB512);
    }
    let sc = admission_sidecar(&origin, admission).await;
    let cache = sc.sidecar.proxy.cache().clone();
    let c = app_client();
    // The users' objects: five megabytes, each asked for four times (a miss and three hits);
    // more than the protected segment's share, so some are back in probation.
    for round in 0..4 {
        for i in 0..HOT {
            let path = format!("/hot/{i}");
            if round == 0 {
                store(&sc, &path).await;
            } else {
                assert!(is_hit(&get(&c, &sc.url(&path)).await.0), "{path} round {round}");
            }
        }
    }
    let declined_before = metric(&scrape(sc.admin).await, "sidecache_fills_declined_total", &[]);
    // The flood: thirty one-off URLs of the same size, one after another, each fill settled
    // before the next (a fill reserves its room before its answer starts).
    for i in 0..30 {
        let (cs, got) = get(&c, &sc.url(&format!("/crawl/{i}"))).await;
        assert!(!is_hit(&cs) && got.len() as u64 == KIB512);
        settle(&sc).await;
        assert!(
            disk_usage(&sc.dir.path().join("cache")).0 <= cache.budget(),
            "over the budget"
        );
    }
    let declined = metric(&scrape(sc.admin).await, "sidecache_fills_declined_total", &[]) - declined_before;
    // Which of the users' objects the cache alone still answers (never asking the app).
    let mut lost = Vec::new();
    for i in 0..HOT {
        let path = format!("/hot/{i}");
        if !held(&sc, &path).await {
            lost.push(path);
        }
    }
    sc.stop().await;
    (lost, declined)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_one_off_urls_does_not_push_out_objects_asked_for_again() {
    let (lost, declined) = one_off_flood(true).await;
    assert!(lost.is_empty(), "the flood pushed out {lost:?}");
    assert!(
        declined >= 1.0,
        "the full cache declined none of the flood ({declined})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_one_off_urls_pushes_out_demoted_objects_without_admission() {
    let (lost, _) = one_off_flood(false).await;
    assert!(
        !lost.is_empty(),
        "without admission the segmented LRU kept every object: the test shows nothing"
    );
}

/// Admission weighs size: a byte of the budget goes to what answers the most requests. A full
/// cache of small objects (256 KiB) each asked for a few times; an attacker asks for one large object
/// over and over (as often as the sketch can count) to push them out. Its eight-fold size
/// needs eight times their requests per byte, which it never has: every fill of it is
/// declined and every small object stays. A small newcomer asked for as often as the
/// objects it would displace is admitted (admission still lets the cache turn over). With the
/// rule before (the large object against the first victim's count alone), the large object
/// is admitted and pushes eight small ones out: the test can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_object_does_not_take_the_room_of_small_ones_asked_for_as_often() {
    const KIB256: u64 = MIB / 4;
    let origin = Origin::start().await;
    for i in 0..40 {
        route(&origin, &format!("/small/{i}"), i, KIB256);
    }
    route(&origin, "/large", 500, 2 * MIB);
    route(&origin, "/newcomer", 501, KIB256);
    let sc = admission_sidecar(&origin, true).await;
    let c = app_client();
    // Small objects until the cache is full: the first one admission declines (a fill now
    // takes the cache past its low watermark). Each stored one is asked for twice more.
    let mut small = Vec::new();
    for i in 0..40 {
        let path = format!("/small/{i}");
        assert!(!is_hit(&get(&c, &sc.url(&path)).await.0), "{path}");
        settle(&sc).await;
        if !held(&sc, &path).await {
            break;
        }
        small.push(path);
    }
    assert!((16..40).contains(&small.len()), "{} small objects stored", small.len());
    for _ in 0..2 {
        for path in &small {
            assert!(is_hit(&get(&c, &sc.url(path)).await.0), "{path}");
        }
    }
    let declined = async || metric(&scrape(sc.admin).await, "sidecache_fills_declined_total", &[]);
    let before = declined().await;
    // The attacker's large object, asked for sixteen times: the sketch's counter saturates
    // at fifteen, well above any one small object's count.
    for _ in 0..16 {
        let (cs, got) = get(&c, &sc.url("/large")).await;
        assert!(!is_hit(&cs) && got.len() as u64 == 2 * MIB, "/large: {cs}");
        settle(&sc).await;
    }
    assert_eq!(
        declined().await - before,
        16.0,
        "a fill of the large object was admitted"
    );
    assert!(!held(&sc, "/large").await);
    for path in &small {
        assert!(held(&sc, path).await, "{path} was pushed out");
    }
    // The newcomer, of the small objects' size: declined while asked for less often than the
    // first of them, admitted once asked for as often.
    let before = declined().await;
    let mut asked = 0;
    while !held(&sc, "/newcomer").await && asked < 16 {
        let (cs, _) = get(&c, &sc.url("/newcomer")).await;
        assert!(!is_hit(&cs), "/newcomer: {cs}");
        settle(&sc).await;
        asked += 1;
    }
    assert!(held(&sc, "/newcomer").await, "the newcomer was never admitted");
    assert!(
        declined().await - before >= 1.0,
        "the newcomer was admitted at once: the cache was not full"
    );
    sc.stop().await;
}
