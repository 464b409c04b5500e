//! Hostile input: malformed and ambiguous requests, slow clients, cache-key poisoning, path
//! tricks, absurd ranges. Each gets a clear 4xx or a safe pass-through, never a crash and
//! never a poisoned entry.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{Behaviour, Origin, TestSidecar, app_client, eventually, origin::owned, pattern_chunk};

/// Sends raw bytes, returns the status line of the answer (empty if the connection closed).
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test]
async fn malformed_and_ambiguous_requests_get_400_and_never_reach_the_app() {
    let origin = Origin::start().await;
    origin.route("/a", Behaviour::Echo);
    let sc = TestSidecar::start(&origin.url()).await;
    let cases: &[&[u8]] = &[
        b"GARBAGE\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"GET /a HTTP/1.1\r\nHost: x\r\nX: \x01\x02\r\n\r\n",
        // Conflicting lengths: the classic request-smuggling setup.
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        // RFC 9112 §3.2: exactly one Host.
        b"GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        b"GET /a HTTP/1.1\r\n\r\n",
    ];
    for case in cases {
        let status = raw(sc.addr, case).await;
        assert!(
            status.is_empty() || status.contains(" 400 "),
            "{:?} -> {status}",
            String::from_utf8_lossy(case)
        );
    }
    assert_eq!(origin.hits("/a"), 0, "none of them was forwarded");
    // The sidecar is unharmed.
    let ok = app_client().post(sc.url("/a")).body("fine").send().await.unwrap();
    assert_eq!(ok.text().await.unwrap(), "fine");
}

#[tokio::test]
async fn transfer_encoding_with_content_length_is_reframed_not_smuggled() {
    let origin = Origin::start().await;
    origin.route("/a", Behaviour::Echo);
    origin.route("/smuggled", Behaviour::Echo);
    let sc = TestSidecar::start(&origin.url()).await;
    // A front end that trusted Content-Length would see one request; chunked framing wins
    // (RFC 9112 §6.3) and the request is re-framed towards the app, so the app can only ever
    // see what the sidecar parsed: here an empty POST, then a second, well-formed request.
    let attack = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut s = tokio::net::TcpStream::connect(sc.addr).await.unwrap();
    s.write_all(attack).await.unwrap();
    let mut all = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&all).matches("HTTP/1.1 ").count() >= 2 {
                break;
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&all);
    assert!(
        text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.1 400"),
        "{text}"
    );
    let seen = origin.last_headers("/a");
    if let Some(h) = seen {
        assert!(h.get("content-length").is_none_or(|v| v == "0"), "re-framed: {h:?}");
        assert!(!h.contains_key("transfer-encoding") || h["transfer-encoding"] == "chunked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_slow_clients_do_not_starve_normal_ones() {
    let origin = Origin::start().await;
    origin.fixed("/fast", &[], "fast");
    let sc = TestSidecar::start_with(&origin.url(), |c| c.client_header_timeout = Duration::from_secs(5)).await;
    // 300 connections that send half a request head and then nothing.
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut s = tokio::net::TcpStream::connect(sc.addr).await.unwrap();
        s.write_all(b"GET /fast HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
        slow.push(s);
    }
    let started = Instant::now();
    for _ in 0..20 {
        let resp = app_client().get(sc.url("/fast")).send().await.unwrap();
        assert_eq!(resp.text().await.unwrap(), "fast");
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "normal clients waited {:?}",
        started.elapsed()
    );
    // The slow ones are cut off by the header timeout.
    let mut first = slow.swap_remove(0);
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(15), first.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(closed, Ok(0)) || closed.is_err() || String::from_utf8_lossy(&buf).contains("408"),
        "{closed:?}"
    );
}

/// The header timeout (1 s here) bounds the wait for a request head and nothing else: on one
/// keep-alive connection, an app that takes longer than it to answer and a body that takes
/// longer than it to stream are answered whole, and the connection is closed once it has
/// waited that long for the next head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_timeout_bounds_the_wait_for_a_head_not_a_slow_answer() {
    use http_body_util::{BodyExt, Empty};
    let origin = Origin::start().await;
    let no_store = owned(&[("cache-control", "no-store")]);
    let late = Behaviour::Fixed {
        status: 200,
        headers: no_store.clone(),
        body: Bytes::from_static(b"late"),
    };
    origin.route("/late", Behaviour::Delay(Duration::from_millis(2500), Box::new(late)));
    let drip = Behaviour::Slow {
        len: 5 * 1024,
        chunk: 1024,
        pause: Duration::from_millis(600),
        headers: no_store,
    };
    origin.route("/drip", drip);
    let sc = TestSidecar::start_with(&origin.url(), |c| c.client_header_timeout = Duration::from_secs(1)).await;

    let stream = tokio::net::TcpStream::connect(sc.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .unwrap();
    let mut conn = tokio::spawn(conn);
    let get = |path: &str| {
        http::Request::get(path)
            .header("host", "app.example")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let started = Instant::now();
    let resp = sender
        .send_request(get("/late"))
        .await
        .expect("a slow app is waited for");
    assert_eq!(resp.status(), 200);
    assert_eq!(&resp.into_body().collect().await.unwrap().to_bytes()[..], b"late");
    assert!(started.elapsed() >= Duration::from_millis(2500));

    sender.ready().await.expect("kept alive after a slow answer");
    let started = Instant::now();
    let resp = sender.send_request(get("/drip")).await.expect("the same connection");
    let body = resp.into_body().collect().await.expect("streamed whole").to_bytes();
    assert_eq!(body.len(), 5 * 1024);
    assert!(
        started.elapsed() >= Duration::from_millis(2400),
        "{:?}",
        started.elapsed()
    );

    // Now waiting for a head: closed after the timeout, not before.
    let idle = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), &mut conn).await;
    assert!(ended.is_ok(), "still open 10 s after the answer");
    let waited = idle.elapsed();
    assert!(waited >= Duration::from_millis(900), "closed after {waited:?}");
}

#[tokio::test]
async fn unkeyed_headers_cannot_poison_the_cache() {
    let origin = Origin::start().await;
    origin.route("/page", Behaviour::Echo);
    // The app builds its body from X-Forwarded-Host, as many do for absolute URLs.
    origin.route(
        "/links.css",
        Behaviour::Fixed {
            status: 200,
            headers: owned(&[("cache-control", "max-age=600")]),
            body: Bytes::from_static(b""),
        },
    );
    let sc = TestSidecar::start(&origin.url()).await;
    let poisoned = app_client()
        .get(sc.url("/links.css"))
        .header("x-forwarded-host", "evil.example")
        .header("x-forwarded-proto", "javascript")
        .header("x-original-url", "/admin")
        .header("x-rewrite-url", "/admin")
        .send()
        .await
        .unwrap();
    assert_eq!(poisoned.status(), 200);
    let seen = origin.last_headers("/links.css").unwrap();
    assert_eq!(
        seen["x-forwarded-host"], "app.example",
        "the app never sees the client's X-Forwarded-Host"
    );
    assert_eq!(seen["x-forwarded-proto"], "http");
    // Headers that make apps route another URL are stripped, not only left out of the key.
    assert!(
        !seen.contains_key("x-original-url"),
        "the app never sees X-Original-URL"
    );
    assert!(!seen.contains_key("x-rewrite-url"), "the app never sees X-Rewrite-URL");
    assert!(
        eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache().stats().0
            == 1)
        .await
    );
    // Another host is another key: a response stored for one host is never served to another.
    let other = app_client()
        .get(sc.url("/links.css"))
        .header("host", "other.example")
        .send()
        .await
        .unwrap();
    assert!(
        other.headers()["cache-status"]
            .to_str()
            .unwrap()
            .contains("fwd=uri-miss")
    );
}

#[tokio::test]
async fn path_tricks_do_not_alias_stored_objects() {
    let origin = Origin::start().await;
    origin.fixed("/b.js", &[("cache-control", "max-age=600")], "the real b");
    origin.fixed("/a/../b.js", &[("cache-control", "max-age=600")], "dot-dot");
    let sc = TestSidecar::start(&origin.url()).await;
    app_client()
        .get(sc.url("/b.js"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    for trick in [
        "/a/../b.js",
        "/%62.js",
        "/b.js%00",
        "//b.js",
        "/static/..%2f..%2fetc%2fpasswd",
    ] {
        let status = raw(
            sc.addr,
            format!("GET {trick} HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(!status.is_empty(), "{trick}: no answer");
    }
    // The stored /b.js is only ever answered for /b.js itself, and is intact.
    let b = app_client().get(sc.url("/b.js")).send().await.unwrap();
    assert_eq!(b.headers()["cache-status"], "sidecache; hit");
    assert_eq!(b.text().await.unwrap(), "the real b");
    assert_eq!(
        origin.hits("/a/../b.js"),
        1,
        "forwarded as written, never served /b.js's body"
    );
}

#[tokio::test]
async fn absurd_ranges_are_answered_safely() {
    let origin = Origin::start().await;
    origin.fixed("/r.bin", &[("cache-control", "max-age=600")], pattern_chunk(0, 10_000));
    let sc = TestSidecar::start(&origin.url()).await;
    app_client()
        .get(sc.url("/r.bin"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache().stats().0
            == 1)
        .await
    );
    let many = (0..5000).map(|i| format!("{}-{}", i, i)).collect::<Vec<_>>().join(",");
    let cases = [
        (format!("bytes={many}"), 200),
        ("bytes=99999999999999999999999999-".to_owned(), 200),
        ("bytes=18446744073709551615-18446744073709551615".to_owned(), 416),
        ("bytes=--1".to_owned(), 200),
        ("bytes=9999-".to_owned(), 206),
        ("bytes=10000-".to_owned(), 416),
    ];
    for (range, want) in cases {
        let resp = app_client()
            .get(sc.url("/r.bin"))
            .header("range", &range)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), want, "{}", &range[..range.len().min(40)]);
        let body = resp.bytes().await.unwrap();
        if want == 200 {
            assert_eq!(body, pattern_chunk(0, 10_000));
        }
    }
    assert_eq!(origin.hits("/r.bin"), 1);
}

#[tokio::test]
async fn prime_is_refused_without_the_admin_token() {
    let origin = Origin::start().await;
    let sc = TestSidecar::start_with(&origin.url(), |c| c.admin_token = Some("t0ken".into())).await;
    let c = app_client();
    let denied = c
        .post(sc.admin_url("/prime?host=app.example"))
        .body("/x\n")
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 401);
    let wrong = c
        .post(sc.admin_url("/prime"))
        .bearer_auth("nope")
        .body("/x\n")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(origin.total_hits(), 0);
    // Metrics and health stay open for probes and scrapers.
    assert_eq!(c.get(sc.admin_url("/metrics")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn an_app_answering_garbage_gets_a_502_and_nothing_is_stored() {
    // A raw TCP "app" that answers every connection with bytes that are not HTTP.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"\x00\xffNOT HTTP AT ALL\r\n\r\n garbage garbage").await;
            });
        }
    });
    let sc = TestSidecar::start(&format!("http://{app}")).await;
    for _ in 0..3 {
        let resp = app_client().get(sc.url("/asset.js")).send().await.unwrap();
        assert_eq!(resp.status(), 502);
    }
    assert_eq!(sc.sidecar.proxy.cache().stats().0, 0);
}
