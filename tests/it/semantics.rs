//! HTTP caching semantics over real sockets (RFC 9111, RFC 9110 conditionals and ranges,
//! RFC 5861). docs/conformance.md maps each requirement to its test.

use std::time::Duration;

use bytes::Bytes;

use crate::support::{
    Behaviour, Binary, Origin, TestSidecar, app_client as client, eventually, metric, origin::owned, pattern_chunk,
    scrape,
};

struct Got {
    status: u16,
    cache_status: String,
    headers: reqwest::header::HeaderMap,
    body: Bytes,
}

async fn send(req: reqwest::RequestBuilder) -> Got {
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let cache_status = headers
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    Got {
        status,
        cache_status,
        headers,
        body: resp.bytes().await.unwrap(),
    }
}

async fn get(sc: &TestSidecar, path: &str) -> Got {
    send(client().get(sc.url(path))).await
}

async fn stored(sc: &TestSidecar, n: usize) {
    assert!(
        eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache().stats().0
            == n)
        .await,
        "expected {n} stored objects, have {:?}",
        sc.sidecar.proxy.cache().stats()
    );
}

fn validating(cache_control: &str, body: &'static str) -> Behaviour {
    Behaviour::Validating {
        etag: "\"v1\"".into(),
        headers: owned(&[("cache-control", cache_control), ("content-type", "text/html")]),
        body: Bytes::from_static(body.as_bytes()),
    }
}

/// RFC 9111 §4.3.1, §4.3.3, §4.3.4: a stored `no-cache` response is revalidated with
/// If-None-Match on every use; a 304 freshens the stored headers and the stored body is served.
#[tokio::test]
async fn no_cache_responses_are_revalidated_and_304_refreshes_headers() {
    let origin = Origin::start().await;
    origin.route("/page", validating("no-cache", "<h1>hello</h1>"));
    let sc = TestSidecar::start(&origin.url()).await;
    let first = get(&sc, "/page").await;
    assert_eq!(first.status, 200);
    assert!(first.cache_status.contains("stored"), "{}", first.cache_status);
    stored(&sc, 1).await;

    // The app now adds a header to its 304s: it must replace the stored one.
    origin.route(
        "/page",
        Behaviour::Validating {
            etag: "\"v1\"".into(),
            headers: owned(&[
                ("cache-control", "no-cache"),
                ("content-type", "text/html"),
                ("x-build", "42"),
            ]),
            body: Bytes::from_static(b"never sent on a 304"),
        },
    );
    let second = get(&sc, "/page").await;
    assert_eq!(second.status, 200);
    assert_eq!(second.cache_status, "sidecache; fwd=stale; fwd-status=304");
    assert_eq!(second.body, Bytes::from_static(b"<h1>hello</h1>"), "the stored body");
    assert_eq!(second.headers["x-build"], "42", "freshened from the 304");
    let seen = origin.last_headers("/page").unwrap();
    assert_eq!(seen["if-none-match"], "\"v1\"", "revalidated with the stored validator");
    assert_eq!(origin.hits("/page"), 2);
    let third = get(&sc, "/page").await;
    assert_eq!(third.headers["x-build"], "42", "the refreshed head was stored");
}

/// RFC 9111 §4.3.2, RFC 9110 §13.1.2 and §13.2.2: client conditionals answered from the cache,
/// weak comparison, If-None-Match before If-Modified-Since.
#[tokio::test]
async fn client_conditionals_get_304_from_the_cache() {
    let origin = Origin::start().await;
    origin.route(
        "/app.css",
        Behaviour::Validating {
            etag: "\"abc\"".into(),
            headers: owned(&[
                ("cache-control", "max-age=3600"),
                ("last-modified", "Sat, 01 Jan 2022 00:00:00 GMT"),
            ]),
            body: Bytes::from_static(b"body{}"),
        },
    );
    let sc = TestSidecar::start(&origin.url()).await;
    get(&sc, "/app.css").await;
    stored(&sc, 1).await;
    let c = client();
    for (name, value, want) in [
        ("if-none-match", "\"abc\"", 304),
        ("if-none-match", "W/\"abc\"", 304),
        ("if-none-match", "\"x\", \"abc\"", 304),
        ("if-none-match", "\"other\"", 200),
        ("if-modified-since", "Sat, 01 Jan 2022 00:00:00 GMT", 304),
        ("if-modified-since", "Fri, 31 Dec 2021 00:00:00 GMT", 200),
    ] {
        let got = send(c.get(sc.url("/app.css")).header(name, value)).await;
        assert_eq!(got.status, want, "{name}: {value}");
        assert_eq!(got.cache_status, "sidecache; hit");
        if want == 304 {
            assert!(got.body.is_empty());
            assert_eq!(got.headers["etag"], "\"abc\"");
        }
    }
    let both = send(
        c.get(sc.url("/app.css"))
            .header("if-none-match", "\"other\"")
            .header("if-modified-since", "Sat, 01 Jan 2022 00:00:00 GMT"),
    )
    .await;
    assert_eq!(both.status, 200, "If-None-Match takes precedence");
    assert_eq!(origin.hits("/app.css"), 1, "all answered by the cache");
}

/// RFC 9110 §14: ranges of a stored full object, If-Range, 416.
#[tokio::test]
async fn ranges_are_served_from_the_stored_full_object() {
    let origin = Origin::start().await;
    let body = pattern_chunk(0, 100_000);
    origin.route(
        "/video.mp4",
        Behaviour::Validating {
            etag: "\"vid\"".into(),
            headers: owned(&[("cache-control", "max-age=3600")]),
            body: body.clone(),
        },
    );
    let sc = TestSidecar::start(&origin.url()).await;
    get(&sc, "/video.mp4").await;
    stored(&sc, 1).await;
    let c = client();
    let part = send(c.get(sc.url("/video.mp4")).header("range", "bytes=1000-1999")).await;
    assert_eq!(part.status, 206);
    assert_eq!(part.headers["content-range"], "bytes 1000-1999/100000");
    assert_eq!(part.body, body.slice(1000..2000));
    let tail = send(c.get(sc.url("/video.mp4")).header("range", "bytes=-10")).await;
    assert_eq!((tail.status, tail.body.clone()), (206, body.slice(99_990..)));
    let out = send(c.get(sc.url("/video.mp4")).header("range", "bytes=200000-")).await;
    assert_eq!(out.status, 416);
    assert_eq!(out.headers["content-range"], "bytes */100000");
    let stale_validator = send(
        c.get(sc.url("/video.mp4"))
            .header("range", "bytes=0-9")
            .header("if-range", "\"old\""),
    )
    .await;
    assert_eq!(
        (stale_validator.status, stale_validator.body.len()),
        (200, 100_000),
        "If-Range mismatch: whole body"
    );
    let matching = send(
        c.get(sc.url("/video.mp4"))
            .header("range", "bytes=0-9")
            .header("if-range", "\"vid\""),
    )
    .await;
    assert_eq!(matching.status, 206);
    assert_eq!(origin.hits("/video.mp4"), 1);
}

/// RFC 9111 §3.3 and §3.4: a 206 the app sends for one range is stored as a span of its
/// representation and answers later ranges inside it (206, the right bytes and
/// `Content-Range` against the whole length) without the app; a range reaching outside it and
/// a request for the whole body go to the app, whose full answer then replaces the span.
#[tokio::test]
async fn a_stored_partial_answer_serves_the_ranges_inside_it_and_nothing_else() {
    let origin = Origin::start().await;
    let body = pattern_chunk(0, 50_000);
    origin.route(
        "/movie.mp4",
        Behaviour::Ranged {
            headers: owned(&[("cache-control", "max-age=3600"), ("etag", "\"m1\"")]),
            body: body.clone(),
        },
    );
    let sc = TestSidecar::start(&origin.url()).await;
    let c = client();
    let range = async |r: &str| send(c.get(sc.url("/movie.mp4")).header("range", r)).await;

    let first = range("bytes=10000-19999").await;
    assert_eq!((first.status, first.body.clone()), (206, body.slice(10_000..20_000)));
    assert!(first.cache_status.contains("stored"), "{}", first.cache_status);
    stored(&sc, 1).await;
    assert_eq!(origin.hits("/movie.mp4"), 1);

    for (asked, from, to) in [
        ("bytes=12000-12999", 12_000, 12_999),
        ("bytes=10000-19999", 10_000, 19_999),
        ("bytes=19990-19999", 19_990, 19_999),
    ] {
        let part = range(asked).await;
        assert_eq!(part.status, 206, "{asked}");
        assert!(part.cache_status.contains("hit"), "{asked}: {}", part.cache_status);
        assert_eq!(part.headers["content-range"], format!("bytes {from}-{to}/50000"));
        assert_eq!(part.headers["content-length"], (to - from + 1).to_string());
        assert_eq!(part.body, body.slice(from as usize..=to as usize), "{asked}");
    }
    // If-Range: the stored validator answers.
    let matching = send(
        c.get(sc.url("/movie.mp4"))
            .header("range", "bytes=15000-15009")
            .header("if-range", "\"m1\""),
    )
    .await;
    assert_eq!(
        (matching.status, matching.body.clone()),
        (206, body.slice(15_000..15_010))
    );
    assert_eq!(origin.hits("/movie.mp4"), 1, "every range inside the span came from it");

    // An open range starting inside the span gets the rest of the span: a 206 may hold less
    // than was asked, and says what it holds (RFC 9110 §15.3.7).
    let open = range("bytes=19000-").await;
    assert_eq!((open.status, open.body.clone()), (206, body.slice(19_000..20_000)));
    assert_eq!(open.headers["content-range"], "bytes 19000-19999/50000");
    assert!(open.cache_status.contains("hit"), "{}", open.cache_status);
    assert_eq!(origin.hits("/movie.mp4"), 1);

    // Another validator, and a range reaching past the span: the app answers.
    let other = send(
        c.get(sc.url("/movie.mp4"))
            .header("range", "bytes=15000-15009")
            .header("if-range", "\"m0\""),
    )
    .await;
    assert_eq!(
        (other.status, other.body.clone()),
        (200, body.clone()),
        "the app's whole body"
    );
    let rest = range("bytes=19990-20009").await;
    assert_eq!((rest.status, rest.body.clone()), (206, body.slice(19_990..20_010)));
    assert_eq!(rest.headers["content-range"], "bytes 19990-20009/50000");
    assert_eq!(origin.hits("/movie.mp4"), 3);

    // The whole body is never the span: the app's full answer is served, and stored.
    let whole = get(&sc, "/movie.mp4").await;
    assert_eq!((whole.status, whole.body.len()), (200, 50_000));
    assert_eq!(whole.body, body);
    assert_eq!(origin.hits("/movie.mp4"), 4);
    stored(&sc, 1).await;
    assert!(
        eventually(Duration::from_secs(10), async || get(&sc, "/movie.mp4")
            .await
            .cache_status
            .contains("hit"))
        .await,
        "the full answer replaced the span"
    );
    let any = range("bytes=0-99").await;
    assert_eq!((any.status, any.body.clone()), (206, body.slice(0..100)));
    assert_eq!(origin.hits("/movie.mp4"), 4, "ranges now come from the whole body");
}

/// A span is stored like any object: the real binary restarted over its cache directory
/// finds it (its record says 206 and its `Content-Range`), and it still answers only the
/// ranges it holds, never the whole body, whose answer replaces it; a purge of the URL
/// removes what is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_span_survives_a_restart_and_still_answers_only_its_ranges() {
    let origin = Origin::start().await;
    let body = pattern_chunk(0, 30_000);
    origin.route(
        "/clip.webm",
        Behaviour::Ranged {
            headers: owned(&[("cache-control", "max-age=3600")]),
            body: body.clone(),
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let env = [("SIDECACHE_ACCESS_LOG", "false"), ("SIDECACHE_MIN_FREE", "0")];
    let start = || async {
        let mut bin = Binary::serve(&origin.url(), &cache, &[], &env);
        let (addr, admin) = (bin.public_addr(), bin.admin_addr());
        crate::support::wait_ready(admin).await;
        (bin, addr, admin)
    };
    let c = client();
    let range = |addr: std::net::SocketAddr, r: &'static str| {
        send(c.get(format!("http://{addr}/clip.webm")).header("range", r))
    };
    let (mut bin, addr, admin) = start().await;
    let first = range(addr, "bytes=1000-8999").await;
    assert_eq!((first.status, first.body.clone()), (206, body.slice(1000..9000)));
    let objects = async || metric(&scrape(admin).await, "sidecache_cache_objects", &[]);
    assert!(
        eventually(Duration::from_secs(10), async || objects().await == 1.0).await,
        "the span is stored"
    );
    let inside = range(addr, "bytes=2000-2099").await;
    assert!(inside.cache_status.contains("hit"), "{}", inside.cache_status);
    bin.signal(libc::SIGTERM);
    assert!(bin.wait_exit(Duration::from_secs(30)).success());
    assert_eq!(origin.hits("/clip.webm"), 1);

    let (_bin, addr, admin) = start().await;
    let part = range(addr, "bytes=4000-4999").await;
    assert_eq!((part.status, part.body.clone()), (206, body.slice(4000..5000)));
    assert!(part.cache_status.contains("hit"), "{}", part.cache_status);
    assert_eq!(part.headers["content-range"], "bytes 4000-4999/30000");
    assert_eq!(origin.hits("/clip.webm"), 1, "answered from the span after the restart");
    let whole = send(c.get(format!("http://{addr}/clip.webm"))).await;
    assert_eq!(
        (whole.status, whole.body.clone()),
        (200, body.clone()),
        "the whole body, from the app"
    );
    assert_eq!(origin.hits("/clip.webm"), 2);

    // The whole body replaces the span once its fill commits (a HEAD, which a span never
    // answers, is then a hit); a purge of the URL removes what is stored: the next range goes
    // to the app.
    let head = async || send(c.head(format!("http://{addr}/clip.webm"))).await.cache_status;
    assert!(eventually(Duration::from_secs(10), async || head().await.contains("hit")).await);
    let again = range(addr, "bytes=100-199").await;
    assert!(again.cache_status.contains("hit"), "{}", again.cache_status);
    let purged = c
        .post(format!("http://{admin}/purge?url=/clip.webm"))
        .send()
        .await
        .unwrap();
    assert!(purged.status().is_success(), "{}", purged.status());
    let after = range(addr, "bytes=100-199").await;
    assert!(!after.cache_status.contains("hit"), "{}", after.cache_status);
    assert_eq!(after.body, body.slice(100..200));
}

/// RFC 9111 §4.2.4 and RFC 5861 §4: a stale object stands in for a failing app, unless the
/// response forbids serving it stale.
#[tokio::test]
async fn stale_objects_stand_in_when_the_app_fails_unless_forbidden() {
    let origin = Origin::start().await;
    origin.route("/ok-stale", validating("max-age=0", "stale but useful"));
    origin.route(
        "/no-stale",
        validating("max-age=0, must-revalidate", "must not be served stale"),
    );
    let sc = TestSidecar::start(&origin.url()).await;
    let a = get(&sc, "/ok-stale").await;
    let b = get(&sc, "/no-stale").await;
    assert!(
        a.cache_status.contains("stored") && b.cache_status.contains("stored"),
        "{} / {} {:?}",
        a.cache_status,
        b.cache_status,
        a.headers
    );
    stored(&sc, 2).await;
    for (behaviour, label) in [(Behaviour::Status(503), "503"), (Behaviour::Abort, "connection reset")] {
        origin.route("/ok-stale", behaviour.clone());
        origin.route("/no-stale", behaviour);
        let got = get(&sc, "/ok-stale").await;
        assert_eq!(got.status, 200, "{label}");
        assert_eq!(got.body, Bytes::from_static(b"stale but useful"));
        assert_eq!(got.cache_status, "sidecache; hit; fwd=stale; stale-if-error", "{label}");
        let forbidden = get(&sc, "/no-stale").await;
        assert!(
            forbidden.status >= 500,
            "{label}: must-revalidate forbids stale: {}",
            forbidden.status
        );
    }
}

/// RFC 5861 §3: stale-while-revalidate serves stale at once and refreshes in the background,
/// once: a burst of stale requests while the refresh is in flight makes no second one.
#[tokio::test]
async fn stale_while_revalidate_serves_stale_and_refreshes_once() {
    let origin = Origin::start().await;
    // The refresh is slow (the burst lands while it is in flight) and its 304 makes the
    // object fresh for long, so nothing after it asks the app again.
    let refreshed = Behaviour::Validating {
        etag: "\"v1\"".into(),
        headers: owned(&[("cache-control", "max-age=600"), ("x-rev", "2")]),
        body: Bytes::from_static(b"v1 body"),
    };
    origin.route(
        "/swr.js",
        Behaviour::FirstThen(
            Box::new(validating("max-age=0, stale-while-revalidate=600", "v1 body")),
            Box::new(Behaviour::Delay(Duration::from_millis(800), Box::new(refreshed))),
        ),
    );
    let sc = TestSidecar::start(&origin.url()).await;
    get(&sc, "/swr.js").await;
    stored(&sc, 1).await;
    let burst: Vec<_> = (0..16)
        .map(|_| {
            let url = sc.url("/swr.js");
            tokio::spawn(async move { send(client().get(url)).await })
        })
        .collect();
    for got in burst {
        let got = got.await.unwrap();
        assert_eq!(got.body, Bytes::from_static(b"v1 body"));
        assert_eq!(got.cache_status, "sidecache; hit; stale-while-revalidate");
    }
    // Wait for the refresh to land: the stored copy turns fresh, with the 304's headers.
    assert!(
        eventually(Duration::from_secs(10), async || {
            let got = get(&sc, "/swr.js").await;
            got.cache_status == "sidecache; hit" && got.headers.get("x-rev").is_some_and(|v| v == "2")
        })
        .await,
        "the background refresh never landed"
    );
    assert_eq!(origin.hits("/swr.js"), 2, "one fill, one refresh for the whole burst");
    let seen = origin.last_headers("/swr.js").unwrap();
    assert_eq!(seen["if-none-match"], "\"v1\"", "the background refresh revalidates");
}

/// RFC 9111 §5.2.1.7: only-if-cached.
#[tokio::test]
async fn only_if_cached_gets_504_when_nothing_is_stored() {
    let origin = Origin::start().await;
    origin.route("/o.js", validating("max-age=600", "o"));
    let sc = TestSidecar::start(&origin.url()).await;
    let c = client();
    let miss = send(c.get(sc.url("/o.js")).header("cache-control", "only-if-cached")).await;
    assert_eq!(miss.status, 504);
    assert_eq!(origin.hits("/o.js"), 0);
    get(&sc, "/o.js").await;
    stored(&sc, 1).await;
    let hit = send(c.get(sc.url("/o.js")).header("cache-control", "only-if-cached")).await;
    assert_eq!((hit.status, hit.cache_status.as_str()), (200, "sidecache; hit"));
}

/// RFC 9111 §5.2.1.1 and §5.2.1.4: max-age=0 and no-cache from the client force validation.
#[tokio::test]
async fn client_no_cache_and_max_age_zero_force_validation() {
    let origin = Origin::start().await;
    origin.route("/v.css", validating("max-age=600", "v"));
    let sc = TestSidecar::start(&origin.url()).await;
    get(&sc, "/v.css").await;
    stored(&sc, 1).await;
    let c = client();
    for directive in ["no-cache", "max-age=0"] {
        let got = send(c.get(sc.url("/v.css")).header("cache-control", directive)).await;
        assert_eq!(got.status, 200);
        assert!(
            got.cache_status.contains("fwd-status=304"),
            "{directive}: {}",
            got.cache_status
        );
    }
    let pragma = send(c.get(sc.url("/v.css")).header("pragma", "no-cache")).await;
    assert!(
        pragma.cache_status.contains("fwd-status=304"),
        "§5.4 Pragma: {}",
        pragma.cache_status
    );
    assert_eq!(origin.hits("/v.css"), 4);
    assert_eq!(get(&sc, "/v.css").await.cache_status, "sidecache; hit");
}

/// RFC 9111 §4.4: a successful unsafe request invalidates its URL and same-host Location.
#[tokio::test]
async fn unsafe_requests_invalidate_their_url_and_location() {
    let origin = Origin::start().await;
    origin.route("/items/1", validating("max-age=600", "item one"));
    origin.route("/items", validating("max-age=600", "list"));
    let sc = TestSidecar::start(&origin.url()).await;
    get(&sc, "/items/1").await;
    get(&sc, "/items").await;
    stored(&sc, 2).await;
    // A POST to /items/1: the app answers 200 and names /items in Content-Location.
    origin.route(
        "/items/1",
        Behaviour::Fixed {
            status: 200,
            headers: owned(&[
                ("content-location", "http://app.example/items"),
                ("cache-control", "max-age=600"),
            ]),
            body: Bytes::from_static(b"updated"),
        },
    );
    let post = send(client().post(sc.url("/items/1")).body("name=x")).await;
    assert_eq!(post.status, 200);
    assert_eq!(post.cache_status, "sidecache; fwd=method");
    stored(&sc, 0).await;
    // A POST to a form URL answered 303 See Other to /items: /items goes, /items/1 stays.
    origin.route("/items/1", validating("max-age=600", "item one"));
    origin.route("/items", validating("max-age=600", "list"));
    get(&sc, "/items/1").await;
    get(&sc, "/items").await;
    stored(&sc, 2).await;
    origin.route(
        "/items/1/edit",
        Behaviour::Fixed {
            status: 303,
            headers: owned(&[("location", "/items")]),
            body: Bytes::new(),
        },
    );
    let mut host = reqwest::header::HeaderMap::new();
    host.insert("host", reqwest::header::HeaderValue::from_static("app.example"));
    let no_redirects = sidecache::http_client()
        .default_headers(host)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let post = send(no_redirects.post(sc.url("/items/1/edit")).body("name=y")).await;
    assert_eq!(post.status, 303);
    stored(&sc, 1).await;
    assert_eq!(get(&sc, "/items/1").await.cache_status, "sidecache; hit");
    assert_ne!(get(&sc, "/items").await.cache_status, "sidecache; hit");
    // A failed unsafe request invalidates nothing.
    stored(&sc, 2).await;
    origin.route("/items", Behaviour::Status(500));
    let failed = send(client().delete(sc.url("/items"))).await;
    assert_eq!(failed.status, 500);
    assert_eq!(sc.sidecar.proxy.cache().stats().0, 2);
    // Every stored variant of a URL goes, not only the one under the key's own hash.
    origin.fixed(
        "/v",
        &[("cache-control", "max-age=600"), ("vary", "accept-language")],
        "variant",
    );
    for lang in ["en", "fr"] {
        send(client().get(sc.url("/v")).header("accept-language", lang)).await;
    }
    stored(&sc, 4).await;
    let post = send(client().post(sc.url("/v")).body("x")).await;
    assert_eq!(post.status, 200);
    stored(&sc, 2).await;
}

/// RFC 9111 §3, §3.5 and safe defaults: private, Set-Cookie and Authorization responses are
/// not shared.
#[tokio::test]
async fn private_cookie_and_authorized_responses_are_not_shared() {
    let origin = Origin::start().await;
    origin.fixed("/private", &[("cache-control", "private, max-age=600")], "mine");
    origin.fixed(
        "/cookie",
        &[("cache-control", "max-age=600"), ("set-cookie", "session=1")],
        "cookie",
    );
    origin.fixed("/auth", &[("cache-control", "max-age=600")], "for one user");
    origin.fixed("/auth-public", &[("cache-control", "public, max-age=600")], "for all");
    let sc = TestSidecar::start(&origin.url()).await;
    let c = client();
    for _ in 0..2 {
        get(&sc, "/private").await;
        get(&sc, "/cookie").await;
        send(c.get(sc.url("/auth")).header("authorization", "Bearer a")).await;
        send(c.get(sc.url("/auth-public")).header("authorization", "Bearer a")).await;
    }
    assert_eq!(origin.hits("/private"), 2);
    assert_eq!(origin.hits("/cookie"), 2);
    assert_eq!(origin.hits("/auth"), 2);
    assert_eq!(
        origin.hits("/auth-public"),
        1,
        "public allows sharing an authorized response"
    );
}

/// RFC 9111 §4.1: variants are stored side by side, selected by the normalized values of the
/// request headers the response varies on.
#[tokio::test]
async fn vary_variants_are_stored_side_by_side() {
    let origin = Origin::start().await;
    origin.fixed(
        "/v.js",
        &[("cache-control", "max-age=600"), ("vary", "Accept-Encoding")],
        "plain",
    );
    let sc = TestSidecar::start(&origin.url()).await;
    let c = client();
    let first = send(c.get(sc.url("/v.js")).header("accept-encoding", "identity")).await;
    assert!(first.cache_status.contains("stored"));
    stored(&sc, 1).await;
    let other = send(c.get(sc.url("/v.js")).header("accept-encoding", "gzip, br")).await;
    assert_eq!(other.cache_status, "sidecache; fwd=vary-miss; stored");
    stored(&sc, 2).await;
    for (ae, n) in [("identity", 2), ("br,gzip", 2), ("GZIP,  BR", 2)] {
        let got = send(c.get(sc.url("/v.js")).header("accept-encoding", ae)).await;
        assert_eq!(got.cache_status, "sidecache; hit", "{ae}");
        assert_eq!(origin.hits("/v.js"), n);
    }
    // No Accept-Encoding accepts no coding, as `identity` does: the same answer.
    let none = send(c.get(sc.url("/v.js"))).await;
    assert_eq!(
        none.cache_status, "sidecache; hit",
        "no Accept-Encoding is identity's variant"
    );
    let gzip = send(c.get(sc.url("/v.js")).header("accept-encoding", "gzip")).await;
    assert!(
        gzip.cache_status.contains("fwd=vary-miss"),
        "gzip alone is its own variant"
    );
    // Purging the URL removes every variant.
    stored(&sc, 3).await;
    assert_eq!(
        sc.sidecar
            .proxy
            .cache()
            .purge(&sidecache::cache::Purge::Url("/v.js".into()))
            .await,
        3
    );
}

/// RFC 9213: Sidecache-Cache-Control steers this cache apart from browsers and is not passed
/// on; CDN-Cache-Control is used when ours is absent.
#[tokio::test]
async fn targeted_cache_control_fields_steer_the_sidecar() {
    let origin = Origin::start().await;
    origin.fixed(
        "/t.js",
        &[
            ("cache-control", "no-store"),
            ("sidecache-cache-control", "public, max-age=600"),
        ],
        "t",
    );
    origin.fixed(
        "/cdn.js",
        &[
            ("cache-control", "no-cache"),
            ("cdn-cache-control", "public, max-age=600"),
        ],
        "c",
    );
    origin.fixed(
        "/never.js",
        &[
            ("cache-control", "max-age=600"),
            ("sidecache-cache-control", "no-store"),
        ],
        "n",
    );
    let sc = TestSidecar::start(&origin.url()).await;
    for p in ["/t.js", "/cdn.js", "/never.js"] {
        let got = get(&sc, p).await;
        assert!(
            !got.headers.contains_key("sidecache-cache-control"),
            "ours is not passed on"
        );
    }
    stored(&sc, 2).await;
    let t = get(&sc, "/t.js").await;
    assert_eq!(t.cache_status, "sidecache; hit");
    assert_eq!(
        t.headers["cache-control"], "no-store",
        "browsers still get the app's Cache-Control"
    );
    assert_eq!(get(&sc, "/cdn.js").await.cache_status, "sidecache; hit");
    get(&sc, "/never.js").await;
    assert_eq!(origin.hits("/never.js"), 2);
}

/// Static-asset rules: bypass, default TTL, forced TTL, Set-Cookie stripping, fingerprinted
/// names, web cache deception, query parameters in the key.
#[tokio::test]
async fn static_asset_rules_fill_in_for_apps_without_caching_headers() {
    let origin = Origin::start().await;
    let plain = |ct: &str| owned(&[("content-type", ct)]);
    for (path, ct) in [
        ("/api/items", "application/json"),
        ("/assets/site.css", "text/css"),
        ("/assets/app-3f2a9c81.js", "application/javascript"),
        ("/plain.js", "application/javascript"),
        ("/account.php/x.css", "text/html; charset=utf-8"),
        ("/fonts/a.woff2", "font/woff2"),
        ("/search.json", "application/json"),
    ] {
        origin.route(
            path,
            Behaviour::Fixed {
                status: 200,
                headers: plain(ct),
                body: Bytes::from_static(b"body"),
            },
        );
    }
    origin.route(
        "/fonts/a.woff2",
        Behaviour::Fixed {
            status: 200,
            headers: owned(&[
                ("content-type", "font/woff2"),
                ("cache-control", "max-age=0, must-revalidate"),
                ("set-cookie", "s=1"),
            ]),
            body: Bytes::from_static(b"font"),
        },
    );
    let yaml = r#"
rules:
  - match: "/api/**"
    bypass: true
  - match: "/assets/**"
    ttl: 1d
  - match: "*.css"
    ttl: 1d
  - match: "*.woff2"
    force_ttl: 30d
    strip_set_cookie: true
query: {allow: [q]}
"#;
    let raw = sidecache::config::parse_yaml(yaml).unwrap();
    let sc = TestSidecar::start_with(&origin.url(), |c| {
        c.rules = raw
            .rules
            .clone()
            .unwrap()
            .into_iter()
            .map(|r| sidecache::rules::Rule::compile(r).unwrap())
            .collect();
        c.query = raw.query.clone().unwrap().compile().unwrap();
        c.rules.push(
            sidecache::rules::Rule::compile(sidecache::rules::RawRule {
                name: None,
                pattern: "/search.json".into(),
                bypass: false,
                ttl: Some(sidecache::units::HumanDuration(Duration::from_secs(60))),
                force_ttl: None,
                strip_set_cookie: false,
            })
            .unwrap(),
        );
    })
    .await;
    for _ in 0..2 {
        for p in [
            "/api/items",
            "/assets/site.css",
            "/assets/app-3f2a9c81.js",
            "/plain.js",
            "/account.php/x.css",
        ] {
            get(&sc, p).await;
        }
        let font = get(&sc, "/fonts/a.woff2").await;
        assert!(!font.headers.contains_key("set-cookie"), "stripped by the rule");
        assert!(!font.headers.contains_key("sidecache-cache-control"));
        // Only `q` counts in the key: tracking parameters do not split the cache.
        get(&sc, "/search.json?q=shoes&utm_source=mail").await;
        get(&sc, "/search.json?utm_source=ad&q=shoes").await;
    }
    assert_eq!(origin.hits("/api/items"), 2, "bypass");
    assert_eq!(origin.hits("/assets/site.css"), 1, "default ttl");
    assert_eq!(
        origin.hits("/assets/app-3f2a9c81.js"),
        1,
        "fingerprinted (and under /assets)"
    );
    assert_eq!(origin.hits("/plain.js"), 2, "no rule, no headers: not cached");
    assert_eq!(
        origin.hits("/account.php/x.css"),
        2,
        "HTML under a .css name is never stored"
    );
    assert_eq!(origin.hits("/fonts/a.woff2"), 1, "force_ttl overrides a short lifetime");
    assert_eq!(
        origin.hits("/search.json"),
        1,
        "one key for both parameter orders and trackers"
    );
    let bypass = get(&sc, "/api/items").await;
    assert_eq!(bypass.cache_status, "sidecache; fwd=bypass");
}

/// RFC 9111 §4.2.3 and §5.1: the stored Date is served unchanged and Age accounts for an
/// upstream Age plus the time since the app's Date.
#[tokio::test]
async fn date_is_not_rewritten_and_age_counts_upstream_age() {
    let origin = Origin::start().await;
    let date = "Sat, 01 Jan 2022 00:00:00 GMT";
    origin.fixed(
        "/old.css",
        &[("cache-control", "max-age=999999999"), ("date", date), ("age", "100")],
        "old",
    );
    let sc = TestSidecar::start(&origin.url()).await;
    get(&sc, "/old.css").await;
    stored(&sc, 1).await;
    let hit = get(&sc, "/old.css").await;
    assert_eq!(hit.cache_status, "sidecache; hit");
    assert_eq!(hit.headers["date"], date, "Date is the app's, not rewritten");
    let age: u64 = hit.headers["age"].to_str().unwrap().parse().unwrap();
    let since_date = std::time::SystemTime::now()
        .duration_since(httpdate::parse_http_date(date).unwrap())
        .unwrap()
        .as_secs();
    assert!(
        age >= since_date && age < since_date + 60,
        "age {age} vs {since_date} s since Date"
    );
}
