//! Issue 15, the request side: what a client sends must not shape an answer stored for
//! others (fat GET, unkeyed headers, spoofed forwarding, an unnormalised host), must not evict
//! at will (invalidation by method, bounded), and a client's broken body is the client's 400.
//! The app behind reflects what it received, so every test sees what reached it.

use std::time::{Duration, Instant};

use crate::support::origin::owned;
use crate::support::{Behaviour, Binary, Origin, TestSidecar, app_client, eventually, metric, raw_until_close, scrape};

/// A cacheable route that reflects the request.
fn reflect(origin: &Origin, path: &str) {
    origin.route(
        path,
        Behaviour::Reflect {
            headers: owned(&[("cache-control", "max-age=600"), ("content-type", "text/plain")]),
        },
    );
}

fn cache_status(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// A plain GET from a client with nothing special: (Cache-Status, body).
async fn plain_get(sc: &TestSidecar, path: &str) -> (String, String) {
    let resp = app_client().get(sc.url(path)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let status = cache_status(&resp);
    (status, resp.text().await.unwrap())
}

/// Waits until `n` objects are stored.
async fn wait_stored(sc: &TestSidecar, n: usize) {
    let cache = sc.sidecar.proxy.cache().clone();
    assert!(
        eventually(Duration::from_secs(10), async || cache.stats().0 == n).await,
        "never {n} objects stored (have {})",
        cache.stats().0
    );
}

// Finding 4.

#[tokio::test]
async fn a_get_with_a_body_is_neither_answered_from_nor_stored_in_the_cache() {
    let origin = Origin::start().await;
    reflect(&origin, "/search");
    let sc = TestSidecar::start(&origin.url()).await;

    // Attacker, Content-Length: the app reads the body, the answer is not stored.
    let attack = app_client()
        .get(sc.url("/search"))
        .body("POISON-LENGTH")
        .send()
        .await
        .unwrap();
    let status = cache_status(&attack);
    assert!(
        status.contains("fwd=bypass") && status.contains("detail=request-body"),
        "{status}"
    );
    assert!(!status.contains("stored"), "{status}");
    assert!(
        attack.text().await.unwrap().contains("POISON-LENGTH"),
        "the app got the body"
    );
    // Attacker, chunked.
    let chunked = raw_until_close(
        sc.addr,
        b"GET /search HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\nd\r\nPOISON-CHUNKS\r\n0\r\n\r\n",
    )
    .await;
    assert!(chunked.starts_with("HTTP/1.1 200"), "{chunked}");
    assert!(chunked.contains("fwd=bypass"), "{chunked}");
    assert_eq!(
        sc.sidecar.proxy.cache().stats().0,
        0,
        "nothing stored for a GET with a body"
    );

    // Victim: a plain GET is a miss, fills with its own answer, then hits it.
    let (status, body) = plain_get(&sc, "/search").await;
    assert!(status.contains("fwd=uri-miss") && status.contains("stored"), "{status}");
    assert!(!body.contains("POISON"), "victim got the attacker's answer:\n{body}");
    wait_stored(&sc, 1).await;

    // With a clean copy stored, a GET with a body is still not answered from it: it reaches
    // the app, and the stored copy stays the clean one.
    let before = origin.hits("/search");
    let attack = app_client()
        .get(sc.url("/search"))
        .body("POISON-AGAIN")
        .send()
        .await
        .unwrap();
    assert!(cache_status(&attack).contains("fwd=bypass"));
    assert!(attack.text().await.unwrap().contains("POISON-AGAIN"));
    assert_eq!(origin.hits("/search"), before + 1, "the body reached the app");
    let (status, body) = plain_get(&sc, "/search").await;
    assert_eq!(status, "sidecache; hit");
    assert!(!body.contains("POISON"), "{body}");
}

// Finding 5.

/// Headers apps honour that the key does not hold, with an attacker's values.
const UNKEYED: &[(&str, &str)] = &[
    ("forwarded", "for=6.6.6.6;host=evil.example;proto=https"),
    ("x-forwarded-scheme", "javascript"),
    ("x-forwarded-port", "1337"),
    ("x-forwarded-prefix", "/evil"),
    ("x-forwarded-ssl", "on"),
    ("x-forwarded-server", "evil.example"),
    ("x-host", "evil.example"),
    ("x-original-host", "evil.example"),
    ("x-original-url", "/admin"),
    ("x-rewrite-url", "/admin"),
    ("x-override-url", "/admin"),
    ("x-http-method-override", "DELETE"),
    ("x-http-method", "DELETE"),
    ("x-method-override", "DELETE"),
    ("x-real-ip", "6.6.6.6"),
    ("true-client-ip", "6.6.6.6"),
    ("x-proxyuser-ip", "6.6.6.6"),
    ("x-client-ip", "6.6.6.6"),
    ("front-end-https", "on"),
];

#[tokio::test]
async fn unkeyed_headers_are_stripped_before_the_app_and_cannot_poison_the_cache() {
    let origin = Origin::start().await;
    reflect(&origin, "/page");
    let sc = TestSidecar::start(&origin.url()).await;

    let mut attack = app_client().get(sc.url("/page"));
    for (name, value) in UNKEYED {
        attack = attack.header(*name, *value);
    }
    let attack = attack.send().await.unwrap();
    assert!(cache_status(&attack).contains("stored"), "the attacker's request fills");
    let body = attack.text().await.unwrap();
    let seen = origin.last_headers("/page").unwrap();
    for (name, _) in UNKEYED {
        assert!(!seen.contains_key(*name), "the app saw {name}:\n{body}");
    }
    assert_eq!(seen["accept"], "*/*", "other headers pass");
    wait_stored(&sc, 1).await;

    // The victim's plain request is answered from what the attacker's request stored.
    let (status, body) = plain_get(&sc, "/page").await;
    assert_eq!(status, "sidecache; hit");
    for (name, value) in UNKEYED {
        assert!(
            !body.contains(&format!("{name}: {value}")),
            "the victim got the attacker's {name}:\n{body}"
        );
    }
}

#[tokio::test]
async fn a_trusted_router_keeps_only_for_proto_and_port_and_the_list_is_configurable() {
    let origin = Origin::start().await;
    reflect(&origin, "/page");
    let sc = TestSidecar::start_with(&origin.url(), |c| {
        c.trust_forwarded = true;
        c.strip_request_headers.push(http::HeaderName::from_static("x-tenant"));
    })
    .await;
    app_client()
        .get(sc.url("/page"))
        .header("x-forwarded-for", "1.2.3.4")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-port", "443")
        .header("forwarded", "for=1.2.3.4;proto=https")
        .header("x-forwarded-prefix", "/app")
        .header("x-original-url", "/admin")
        .header("x-tenant", "other")
        .send()
        .await
        .unwrap();
    let seen = origin.last_headers("/page").unwrap();
    assert_eq!(seen["x-forwarded-for"], "1.2.3.4, 127.0.0.1", "the router's, appended");
    assert_eq!(seen["x-forwarded-proto"], "https", "the router's, in the key");
    assert_eq!(seen["x-forwarded-port"], "443", "the router's");
    assert_eq!(seen["x-forwarded-host"], "app.example", "the keyed host");
    for name in ["forwarded", "x-forwarded-prefix", "x-original-url"] {
        assert!(!seen.contains_key(name), "{name} passed: not in the key");
    }
    assert!(!seen.contains_key("x-tenant"), "added to the list");
}

/// What a router in front (Heroku's) adds to every request: it sets these three and passes
/// any other `X-Forwarded-*` from the client through.
const ROUTER: &[(&str, &str)] = &[
    ("x-forwarded-for", "1.2.3.4"),
    ("x-forwarded-proto", "https"),
    ("x-forwarded-port", "443"),
];

#[tokio::test]
async fn behind_a_trusted_router_a_clients_forwarded_host_and_prefix_cannot_poison_the_cache() {
    let origin = Origin::start().await;
    reflect(&origin, "/link");
    let sc = TestSidecar::start_with(&origin.url(), |c| c.trust_forwarded = true).await;

    // Attacker, through the router: its own X-Forwarded-Host and -Prefix (and the rest of
    // the family) ride along with the router's three.
    let mut attack = app_client().get(sc.url("/link"));
    for (name, value) in ROUTER {
        attack = attack.header(*name, *value);
    }
    for (name, value) in [
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-prefix", "/evil"),
        ("x-forwarded-scheme", "javascript"),
        ("x-forwarded-ssl", "on"),
        ("x-forwarded-server", "evil.example"),
        ("forwarded", "host=evil.example;proto=https"),
    ] {
        attack = attack.header(name, value);
    }
    let attack = attack.send().await.unwrap();
    assert!(cache_status(&attack).contains("stored"), "the attacker's request fills");
    let body = attack.text().await.unwrap();
    let seen = origin.last_headers("/link").unwrap();
    assert_eq!(seen["host"], "app.example");
    assert_eq!(seen["x-forwarded-host"], "app.example", "the keyed host:\n{body}");
    for name in [
        "x-forwarded-prefix",
        "x-forwarded-scheme",
        "x-forwarded-ssl",
        "x-forwarded-server",
        "forwarded",
    ] {
        assert!(!seen.contains_key(name), "the app saw {name}:\n{body}");
    }
    assert_eq!(seen["x-forwarded-proto"], "https", "the router's scheme, in the key");
    wait_stored(&sc, 1).await;

    // Victim, through the same router: same key, answered from the stored copy, which was
    // built from the host and scheme the key holds and nothing else.
    let mut victim = app_client().get(sc.url("/link"));
    for (name, value) in ROUTER {
        victim = victim.header(*name, *value);
    }
    let victim = victim.send().await.unwrap();
    assert_eq!(cache_status(&victim), "sidecache; hit");
    let body = victim.text().await.unwrap();
    assert!(
        !body.contains("evil") && !body.contains("javascript"),
        "the victim got the attacker's page:\n{body}"
    );
    assert!(body.contains("x-forwarded-host: app.example\n"), "{body}");
}

// Issue 15 re-review, finding B.

#[tokio::test]
async fn no_header_with_an_underscore_reaches_the_app() {
    let origin = Origin::start().await;
    reflect(&origin, "/echo");
    let sc = TestSidecar::start(&origin.url()).await;

    // CGI-style servers map `X_Forwarded_Host` to HTTP_X_FORWARDED_HOST, like the dash spelling.
    let attack = app_client()
        .get(sc.url("/echo"))
        .header("X_Forwarded_Host", "evil.example")
        .header("X_Original_URL", "/admin")
        .header("X_Forwarded_For", "6.6.6.6")
        .header("x_http_method_override", "DELETE")
        .header("accept_language", "evil")
        .send()
        .await
        .unwrap();
    assert!(cache_status(&attack).contains("stored"), "the attacker's request fills");
    let body = attack.text().await.unwrap();
    let seen = origin.last_headers("/echo").unwrap();
    let underscored: Vec<&str> = seen.keys().map(|k| k.as_str()).filter(|k| k.contains('_')).collect();
    assert!(underscored.is_empty(), "the app saw {underscored:?}:\n{body}");
    assert_eq!(seen["accept"], "*/*", "other headers pass");
    assert_eq!(seen["x-forwarded-host"], "app.example");
    wait_stored(&sc, 1).await;

    let (status, body) = plain_get(&sc, "/echo").await;
    assert_eq!(status, "sidecache; hit");
    assert!(
        !body.contains("evil") && !body.contains("6.6.6.6") && !body.contains("/admin"),
        "the victim got the attacker's page:\n{body}"
    );
}

// Finding 6.

#[tokio::test]
async fn spoofed_forwarded_headers_never_reach_the_app_when_the_request_names_no_host() {
    let origin = Origin::start().await;
    reflect(&origin, "/h10");
    reflect(&origin, "/h2");
    let sc = TestSidecar::start(&origin.url()).await;
    let spoof = "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Host: evil.example\r\nX-Forwarded-Proto: https\r\n";

    // HTTP/1.0 without Host.
    let answer = raw_until_close(sc.addr, format!("GET /h10 HTTP/1.0\r\n{spoof}\r\n").as_bytes()).await;
    assert!(
        answer.starts_with("HTTP/1.") && answer[8..].starts_with(" 200"),
        "{answer}"
    );
    let seen = origin.last_headers("/h10").unwrap();
    assert_eq!(seen["host"], origin.addr.to_string());
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert!(!seen.contains_key("x-forwarded-host"), "{seen:?}");
    assert!(
        !answer.contains("evil.example") && !answer.contains("6.6.6.6"),
        "{answer}"
    );

    // HTTP/2 without :authority (a relative URI: no authority pseudo-header, no Host).
    let stream = tokio::net::TcpStream::connect(sc.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("/h2")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-host", "evil.example")
        .header("x-forwarded-proto", "https")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let seen = origin.last_headers("/h2").unwrap();
    // The request named no host: the app gets its own address (the client to it adds it).
    assert_eq!(seen["host"], origin.addr.to_string());
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert!(!seen.contains_key("x-forwarded-host"), "{seen:?}");
}

// Finding 11.

#[tokio::test]
async fn the_app_gets_the_normalised_host_the_key_uses() {
    let origin = Origin::start().await;
    reflect(&origin, "/hosted");
    let sc = TestSidecar::start(&origin.url()).await;
    let resp = crate::support::app_client_for("App.EXAMPLE:80")
        .get(sc.url("/hosted"))
        .send()
        .await
        .unwrap();
    assert!(cache_status(&resp).contains("stored"));
    let seen = origin.last_headers("/hosted").unwrap();
    assert_eq!(seen["host"], "app.example", "the host the key holds");
    assert_eq!(seen["x-forwarded-host"], "app.example");
    wait_stored(&sc, 1).await;
    // Same key, same host: the stored answer names the host the other client sent.
    let (status, body) = plain_get(&sc, "/hosted").await;
    assert_eq!(status, "sidecache; hit");
    assert!(body.contains("host: app.example\n"), "{body}");
    let resp = crate::support::app_client_for("APP.example")
        .get(sc.url("/hosted"))
        .send()
        .await
        .unwrap();
    assert_eq!(cache_status(&resp), "sidecache; hit", "one key for every spelling");
}

// Finding 12.

/// RFC 9111 §4.4, RFC 9110 §9.2.1: a non-error answer to a method known to be safe never
/// invalidates (so no GET-like request evicts); one to an unsafe method, or to one whose safety
/// is unknown (an extension such as `M-SEARCH`, or `get`, which is not `GET`), does.
#[tokio::test]
async fn safe_methods_never_invalidate_and_unsafe_or_unknown_ones_do() {
    let origin = Origin::start().await;
    origin.fixed("/obj", &[("cache-control", "max-age=600")], "stored");
    let sc = TestSidecar::start(&origin.url()).await;
    let client = app_client();
    assert!(plain_get(&sc, "/obj").await.0.contains("stored"));
    wait_stored(&sc, 1).await;
    for method in ["OPTIONS", "TRACE", "PROPFIND", "SEARCH", "REPORT"] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = client.request(m, sc.url("/obj")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{method}: the app answers 2xx");
        assert_eq!(sc.sidecar.proxy.cache().stats().0, 1, "{method} evicted the object");
        assert_eq!(plain_get(&sc, "/obj").await.0, "sidecache; hit", "after {method}");
    }
    for method in ["POST", "PUT", "DELETE", "PATCH", "M-SEARCH", "BREW", "get", "post"] {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = client.request(m, sc.url("/obj")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(sc.sidecar.proxy.cache().stats().0, 0, "{method} invalidates");
        let (status, _) = plain_get(&sc, "/obj").await;
        assert!(
            status.contains("fwd=uri-miss") && status.contains("stored"),
            "after {method}: {status}"
        );
        wait_stored(&sc, 1).await;
    }
}

/// Invalidating a URL with `Vary` variants scans the index: a flood of those is bounded and
/// counted. Any other invalidation is one lookup and is never skipped, so a flood cannot starve
/// a real one.
#[tokio::test]
async fn a_flood_of_posts_invalidates_within_a_bound_and_counts_the_rest() {
    let origin = Origin::start().await;
    origin.fixed(
        "/obj",
        &[("cache-control", "max-age=600"), ("vary", "accept-language")],
        "stored",
    );
    origin.fixed("/plain", &[("cache-control", "max-age=600")], "plain");
    let dir = tempfile::tempdir().unwrap();
    let mut bin = Binary::serve(&origin.url(), &dir.path().join("cache"), &[], &[]);
    let (public, admin) = (bin.public_addr(), bin.admin_addr());
    let client = app_client();
    let url = format!("http://{public}/obj");
    let get = client.get(&url).header("accept-language", "en").send().await.unwrap();
    assert!(cache_status(&get).contains("stored"));
    get.bytes().await.unwrap();
    // Committed (and so known to vary) before the flood: every POST then scans.
    assert!(
        eventually(Duration::from_secs(10), async || {
            let r = client.get(&url).header("accept-language", "en").send().await.unwrap();
            cache_status(&r) == "sidecache; hit"
        })
        .await
    );
    let flood = sidecache::proxy::INVALIDATION_BURST as u64 + 100;
    let started = Instant::now();
    for _ in 0..flood {
        assert_eq!(client.post(&url).send().await.unwrap().status(), 200);
    }
    let elapsed = started.elapsed();
    let text = scrape(admin).await;
    let skipped = metric(&text, "sidecache_invalidations_skipped_total", &[]) as u64;
    let allowed = sidecache::bucket::TokenBucket::new(
        sidecache::proxy::INVALIDATION_BURST,
        sidecache::proxy::INVALIDATION_RATE,
    )
    .allowance(elapsed);
    // One token of slack: the server's clock and this one do not start at the same instant.
    assert!(
        skipped > 0 && flood - skipped <= allowed + 1,
        "{flood} POSTs in {elapsed:?}: {skipped} invalidations skipped, at most {allowed} may run"
    );
    // With the bound used up, a URL without variants is still invalidated.
    let plain = format!("http://{public}/plain");
    let get = client.get(&plain).send().await.unwrap();
    assert!(cache_status(&get).contains("stored"));
    get.bytes().await.unwrap();
    assert!(
        eventually(Duration::from_secs(10), async || {
            let r = client.get(&plain).send().await.unwrap();
            cache_status(&r) == "sidecache; hit"
        })
        .await
    );
    assert_eq!(client.post(&plain).send().await.unwrap().status(), 200);
    let after = client.get(&plain).send().await.unwrap();
    assert!(
        cache_status(&after).contains("fwd=uri-miss"),
        "{}",
        cache_status(&after)
    );
    let text = scrape(admin).await;
    assert_eq!(
        metric(&text, "sidecache_invalidations_skipped_total", &[]) as u64,
        skipped,
        "the plain invalidation was not skipped"
    );
    drop(bin);
}

// Finding 13.

#[tokio::test]
async fn a_malformed_chunked_body_is_the_clients_400_not_an_upstream_error() {
    let origin = Origin::start().await;
    reflect(&origin, "/upload");
    let dir = tempfile::tempdir().unwrap();
    let mut bin = Binary::serve(&origin.url(), &dir.path().join("cache"), &[], &[]);
    let (public, admin) = (bin.public_addr(), bin.admin_addr());
    let answer = raw_until_close(
        public,
        b"POST /upload HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz-not-a-size\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "the client's fault, got:\n{answer}");
    assert!(!answer.contains("app is not reachable"), "{answer}");
    let text = scrape(admin).await;
    assert_eq!(metric(&text, "sidecache_upstream_errors_total", &[]), 0.0, "{text}");
    assert_eq!(
        metric(&text, "sidecache_client_errors_total", &["kind=\"body\""]),
        1.0,
        "counted as the client's"
    );
    // The app is fine and still served.
    let ok = app_client()
        .post(format!("http://{public}/upload"))
        .body("fine")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    drop(bin);
}

/// An app's `Vary` line that is not plain text (`x-user, cookié`: a non-ASCII byte) was
/// skipped whole, `x-user` with it, and the answer stored for everyone: one user's answer
/// served to the next. A `Vary` that cannot be read is `Vary: *`: not stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vary_that_cannot_be_read_keeps_one_users_answer_from_another() {
    let origin = Origin::start().await;
    origin.route(
        "/me",
        Behaviour::Reflect {
            headers: owned(&[
                ("cache-control", "public, max-age=600"),
                ("content-type", "text/plain"),
                ("vary", "x-user, cookié"),
            ]),
        },
    );
    let sc = TestSidecar::start(&origin.url()).await;
    let as_user = |user: &'static str| {
        let url = sc.url("/me");
        async move {
            let resp = app_client().get(url).header("x-user", user).send().await.unwrap();
            resp.text().await.unwrap()
        }
    };
    let victim = as_user("alice").await;
    assert!(victim.contains("x-user: alice"), "{victim}");
    let attacker = as_user("mallory").await;
    assert!(
        !attacker.contains("alice"),
        "alice's answer reached mallory:\n{attacker}"
    );
    assert!(attacker.contains("x-user: mallory"), "{attacker}");
    assert_eq!(origin.hits("/me"), 2, "neither was answered from the cache");
    assert_eq!(sc.sidecar.proxy.cache().stats().0, 0, "nothing stored");
}
