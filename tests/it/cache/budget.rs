//! The budget, the LRU order and purge: bytes on disk within the budget under concurrent fills, exactly the least recently used evicted, purge by URL, prefix and all.

use super::*;

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
    let sampler = crate::support::PeakDisk::start(dir.clone());
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
    let (peak, samples) = sampler.stop();
    assert!(samples > 10, "sampled {samples} times");
    assert!(peak <= budget, "peak {peak} bytes on disk over a budget of {budget}");
    // The budget also pays for the layout's directories (a unit for each of the up to 256
    // fan-out directories 128 objects can make, and their names: 1.1 MiB here) and for 32
    // fills in flight at once.
    assert!(peak > budget / 8, "the cache was actually filled (peak {peak})");
    let (objects, used, _) = sc.sidecar.proxy.cache().stats();
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
    let cache = sc.sidecar.proxy.cache().clone();
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
        eventually(Duration::from_secs(10), async || {
            sc.sidecar.proxy.cache().stats().0 == 4
        })
        .await
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
    assert_eq!(sc.sidecar.proxy.cache().stats().0, 0);
}

/// Issue 26: small objects are packed into segment files. 2,000 scripts of 1 to 48 KiB (the
/// load benchmark's sizes) fill fewer than 64 files, nothing is evicted while the budget has
/// room, and every one of them is then a hit from disk (no memory tier) with its own bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_small_objects_fill_fewer_than_64_files_and_are_all_hits() {
    const N: u64 = 2000;
    let len = |i: u64| 1024 * (1 + (i * 7919) % 48) as usize;
    let origin = Origin::start().await;
    for i in 0..N {
        origin.fixed(&format!("/p/{i}.js"), CACHEABLE, pattern_chunk(i * 7919, len(i)));
    }
    let sc = TestSidecar::start_with(&origin.url(), |c| {
        c.memory_size = 0;
        c.compress.enabled = false;
    })
    .await;
    // One client for all (making one per request costs more than the request).
    let c = client();
    let fetch_all = async || {
        futures_util::stream::iter(0..N)
            .map(|i| {
                let url = sc.url(&format!("/p/{i}.js"));
                let c = c.clone();
                async move {
                    let resp = c.get(url).send().await.unwrap();
                    let hit = cache_status(&resp) == "sidecache; hit";
                    let body = resp.bytes().await.unwrap();
                    assert!(body.len() == len(i) && matches_pattern(i * 7919, &body), "/p/{i}.js");
                    hit
                }
            })
            .buffer_unordered(16)
            .filter(|hit| std::future::ready(*hit))
            .count()
            .await
    };
    fetch_all().await;
    let cache = sc.sidecar.proxy.cache().clone();
    assert!(
        eventually(Duration::from_secs(20), async || cache.stats().0 == N as usize).await,
        "stored {:?}",
        cache.stats()
    );
    let (_, files) = crate::support::disk_usage(&sc.dir.path().join("cache"));
    assert!(files < 64, "{files} files for {N} objects");
    assert_eq!(
        crate::support::object_images(&sc.dir.path().join("cache")).len() as u64,
        N
    );
    assert_eq!(fetch_all().await as u64, N, "every one a hit");
    // Nothing evicted (the metrics are this test process's, shared): all still indexed, none
    // asked of the app again.
    assert_eq!(cache.stats().0, N as usize);
    assert_eq!(origin.total_hits(), N);
}
