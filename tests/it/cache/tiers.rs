//! The hot and open tiers and the records beside the index: memory and mapped hits, sendfile, descriptor shortages, what a tier must never hold.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_tier_serves_small_objects_from_memory() {
    let origin = Origin::start().await;
    origin.fixed("/small.css", CACHEABLE, pattern_bytes(5000));
    let sc = TestSidecar::start(&origin.url()).await;
    get(&sc.url("/small.css")).await;
    assert!(
        eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache().stats().0
            == 1)
        .await
    );
    // Two hits from disk: the second admits it to memory.
    assert_eq!(get(&sc.url("/small.css")).await.1, "sidecache; hit");
    assert_eq!(get(&sc.url("/small.css")).await.1, "sidecache; hit");
    // Remove the files underneath: the hot tier still has the object.
    for f in object_files(&sc.dir.path().join("cache")) {
        destroy(&f);
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
    assert!(
        eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache().stats().0
            == 1)
        .await
    );
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
        .open(&body_file.path)
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
    assert!(
        eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache().stats().0
            == 1)
        .await
    );
    // Two hits from disk: the second admits it to the open tier.
    for _ in 0..2 {
        assert_eq!(get(&sc.url("/open.js")).await.1, "sidecache; hit");
    }
    // Move the object file away: still the same file, but a hit that opened its path would
    // not find it.
    let bodies = object_files(&sc.dir.path().join("cache"));
    assert_eq!(bodies.len(), 1);
    let moved = sc.dir.path().join("moved-away");
    std::fs::rename(&bodies[0].path, &moved).unwrap();
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
    assert!(
        eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache().stats().0
            == 1)
        .await
    );
    // Cut short underneath, into its record: the index knows the file's length, and the
    // object is fetched again, never served from a partial record.
    let cut = record_of("/cut.js");
    let len = std::fs::metadata(&cut.path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&cut.path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (status, cs, body) = get(&sc.url("/cut.js")).await;
    assert_eq!(status, 200);
    assert!(cs.contains("fwd=uri-miss"), "{cs}");
    assert!(body.len() == 100_000 && matches_pattern(0, &body));
    assert_eq!(origin.hits("/cut.js"), 2);

    get(&sc.url("/kept.js")).await;
    assert!(
        eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache().stats().0
            == 2)
        .await
    );
    // A hit from disk that leaves the body on disk keeps the record in memory: the next hit
    // does not read it again. Here it could not: its stored record is damaged (in place, same
    // length; the body is intact, which the changed file is hashed again to show).
    assert_eq!(get(&sc.url("/kept.js")).await.1, "sidecache; hit");
    let kept = record_of("/kept.js");
    let f = std::fs::OpenOptions::new().write(true).open(&kept.path).unwrap();
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
    assert!(
        eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache().stats().0
            == 1)
        .await
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_fails_no_request_and_the_open_tier_gives_half_back() {
    const LIMIT: u32 = 1024;
    const CONNECTIONS: usize = 300;
    // The open tier's size: the limit less one descriptor per connection and 256 spare.
    const HELD: usize = LIMIT as usize - CONNECTIONS - 256;
    let origin = Origin::start().await;
    for i in 0..HELD {
        // Large enough for a file of its own (and a descriptor in the tier): smaller bodies
        // are slots of segments, held open once per segment.
        origin.fixed(&format!("/held/{i}"), CACHEABLE, pattern_chunk(i as u64, 100_000));
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
    let cache = sc.sidecar.proxy.cache().clone();
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
    assert!(
        eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache().stats().0
            == 1)
        .await
    );
    assert_eq!(get(&sc.url("/once.css")).await.1, "sidecache; hit");
    // Only on disk (as the admin port's `GET /objects` says), until a second hit admits it.
    let cache = sc.sidecar.proxy.cache().clone();
    let tier = async || cache.inspect("/once.css", None).await[0].tier;
    assert_eq!(tier().await, "disk", "not held in memory after one hit");
    assert_eq!(get(&sc.url("/once.css")).await.1, "sidecache; hit");
    assert_eq!(tier().await, "memory", "the second hit admits it");
    assert_eq!(origin.hits("/once.css"), 1);
}
