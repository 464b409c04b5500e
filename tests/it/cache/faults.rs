//! Faults and restarts: files deleted, corrupted, torn or rewritten underneath, a full or read-only disk, SIGKILL mid-fill and at random, old layouts, a warm restart.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_deleted_underneath_are_refetched_not_errors() {
    let origin = Origin::start().await;
    origin.fixed("/gone.css", CACHEABLE, pattern_bytes(300_000));
    let sc = TestSidecar::start_with(&origin.url(), |c| c.memory_size = 0).await;
    get(&sc.url("/gone.css")).await;
    assert!(
        eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache().stats().0
            == 1)
        .await
    );
    for f in object_files(&sc.dir.path().join("cache")) {
        destroy(&f);
    }
    let (status, _, body) = get(&sc.url("/gone.css")).await;
    assert_eq!(status, 200);
    assert_eq!(body, Bytes::from(pattern_bytes(300_000)));
    assert_eq!(origin.hits("/gone.css"), 2, "fetched again from the app");
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
    let tmp = dir.path().join("objects-v3/tmp");
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
    let bytes = bodies[0].read();
    bodies[0].write_at(100_000, &[bytes[100_000] ^ 0xff]);

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

/// A record that no longer decodes, found by a lookup (after a restart no record is cached),
/// is a corrupt object: removed, refetched and counted as one, not as a failed read, however
/// many readers meet it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_corrupted_while_running_is_counted_as_a_corrupt_object() {
    let origin = Origin::start().await;
    origin.route(
        "/r.js",
        Behaviour::Generated {
            len: 200_000,
            headers: owned(CACHEABLE),
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let (mut bin, addr) = start_binary(&origin, dir.path()).await;
    get(&format!("http://{addr}/r.js")).await;
    assert!(hit_soon(&format!("http://{addr}/r.js")).await, "stored, then a hit");
    bin.signal(libc::SIGTERM);
    tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(10)));

    let (mut bin, addr) = start_binary(&origin, dir.path()).await;
    let rebuilt = tokio::task::block_in_place(|| bin.wait_line("cache index rebuilt"));
    assert!(rebuilt.contains("objects=1"), "{rebuilt}");
    // A graceful stop leaves nothing torn: a compressed variant being written when it came
    // was (the flake of issue 29: this object counted twice, once for its torn variant).
    assert!(rebuilt.contains("corrupt=0"), "{rebuilt}");
    // The last byte of the record, before the 12-byte footer: its checksum no longer holds.
    let files = object_files(dir.path());
    assert_eq!(files.len(), 1);
    let bytes = files[0].read();
    let at = bytes.len() - 13;
    files[0].write_at(at as u64, &[bytes[at] ^ 0xff]);

    // Eight readers meet the corrupt file at once: each gets the app's bytes, and the one
    // object is counted once, by the reader that removed it.
    let readers: Vec<_> = (0..8)
        .map(|_| tokio::spawn(get_owned(format!("http://{addr}/r.js"))))
        .collect();
    let mut missed = false;
    for r in readers {
        let (status, cs, body) = r.await.unwrap();
        assert_eq!(status, 200);
        missed |= cs.contains("fwd=uri-miss");
        assert!(matches_pattern(0, &body) && body.len() == 200_000);
    }
    assert!(missed, "the corrupt object was fetched again");
    assert!(origin.hits("/r.js") >= 2);
    let metrics = scrape(bin.admin_addr()).await;
    assert_eq!(
        metric(&metrics, "sidecache_corrupt_objects_total", &[]),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "sidecache_storage_errors_total", &[]),
        0.0,
        "not a failed read"
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

    // A crash (of the machine: the slot is appended whole, but its blocks may not all have
    // reached the disk) can leave the segment cut short in the middle of its last slot.
    let records = object_files(dir.path());
    assert_eq!(records.len(), 1);
    assert!(records[0].in_segment(), "a small object is packed into a segment");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&records[0].path)
        .unwrap()
        .set_len(records[0].offset + records[0].len / 2)
        .unwrap();

    let (mut bin, addr) = start_binary(&origin, dir.path()).await;
    let (status, cs, body) = get(&format!("http://{addr}/torn.css")).await;
    assert_eq!(status, 200);
    assert!(cs.contains("fwd=uri-miss"), "{cs}");
    assert_eq!(body, Bytes::from(pattern_bytes(5000)));
    assert_eq!(origin.hits("/torn.css"), 2);
    // Its segment held nothing else: removed with it.
    assert!(!records[0].path.exists(), "the torn object was removed");
    let rebuilt_corrupt = metric(&scrape(bin.admin_addr()).await, "sidecache_corrupt_objects_total", &[]);
    assert_eq!(rebuilt_corrupt, 1.0, "counted as a corrupt object");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_filesystem_keeps_serving_from_the_app_and_caching_resumes() {
    full_filesystem(600_000).await;
}

/// The same with small objects: slots of a segment, whose appends fail when the disk is full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_filesystem_keeps_serving_small_objects_from_the_app_and_caching_resumes() {
    full_filesystem(20_000).await;
}

/// Five objects of `len` bytes through a sidecar whose filesystem is full: served from the app,
/// never a 5xx; once space is freed, stored again.
async fn full_filesystem(len: u64) {
    let fs = Tmpfs::mount("4m");
    let cache_dir = fs.0.path().join("cache");
    let origin = Origin::start().await;
    for i in 0..5 {
        origin.route(
            &format!("/f/{i}.js"),
            Behaviour::Generated {
                len,
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
    assert!(eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache().is_loaded()).await);
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
            assert!(matches_pattern(0, &body) && body.len() as u64 == len);
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
    assert!(
        eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache().stats().0
            == 1)
        .await
    );
    // A hit, read slowly: the body is a mapping of the file.
    let resp = client().get(sc.url("/video.mp4")).send().await.unwrap();
    assert_eq!(cache_status(&resp), "sidecache; hit");
    let mut stream = resp.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    // Remove it from the cache (the same unlink eviction does) while the client is mid-body.
    assert_eq!(sc.sidecar.proxy.cache().purge(&sidecache::cache::Purge::All).await, 1);
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
    assert!(
        eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache().stats().0
            == 1)
        .await
    );
    // Two hits: the second puts it in the open tier, which must notice the change too.
    for _ in 0..2 {
        assert_eq!(get(&sc.url("/m.js")).await.1, "sidecache; hit");
    }
    // Someone rewrites the stored body in place: same length, other bytes.
    let bodies = object_files(&sc.dir.path().join("cache"));
    assert_eq!(bodies.len(), 1);
    let f = std::fs::OpenOptions::new().write(true).open(&bodies[0].path).unwrap();
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
    assert!(
        eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache().stats().0
            == 1)
        .await
    );
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
        std::fs::read_dir(dir.path().join("objects-v3/tmp")).unwrap().count(),
        0,
        "nothing half-written survives a restart"
    );
}
