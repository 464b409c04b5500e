//! Fills and coalescing: one request to the app for many clients, readers during a fill, a leader that fails or leaves, bodies cut short, too large, or without a length.

use super::*;

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
    let (objects, _, _) = sc.sidecar.proxy.cache().stats();
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
        eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache().stats().0
            == 1)
        .await,
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
    // The origin's cut comes after its 40,000 bytes are on the wire, not in place of them.
    let mut direct = client().get(format!("{}/cut.js", origin.url())).send().await.unwrap();
    let mut received = 0;
    while let Ok(Some(chunk)) = direct.chunk().await {
        received += chunk.len();
    }
    assert_eq!(received, 40_000, "the origin sends its part, then breaks");
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
        assert_eq!(origin.hits("/cut.js"), round + 1, "never served from the cache");
    }
    assert_eq!(sc.sidecar.proxy.cache().stats().0, 0);
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
    assert!(
        eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache().stats().0
            == 1)
        .await
    );
    let (_, cs, body) = get(&sc.url("/chunked.css")).await;
    assert_eq!(cs, "sidecache; hit");
    assert!(body.len() == 250_000 && matches_pattern(0, &body));
    assert_eq!(origin.hits("/chunked.css"), 1);
}
