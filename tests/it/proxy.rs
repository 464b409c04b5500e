//! The proxy: bytes both ways, protocols, headers, upgrades, failures of the app.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::support::{
    Behaviour, Binary, Origin, TestSidecar, client, matches_pattern, origin::owned, pattern_bytes, pattern_chunk,
};

#[tokio::test]
async fn get_and_post_bodies_pass_byte_exact() {
    let origin = Origin::start().await;
    let body = pattern_bytes(3 << 20);
    origin.fixed(
        "/blob.bin",
        &[("content-type", "application/octet-stream")],
        body.clone(),
    );
    origin.route("/echo", Behaviour::Echo);
    let sc = TestSidecar::start(&origin.url()).await;
    let c = client();

    let got = c.get(sc.url("/blob.bin")).send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.unwrap(), Bytes::from(body.clone()));

    let upload: Vec<u8> = body.iter().rev().copied().collect();
    for method in [
        reqwest::Method::POST,
        reqwest::Method::PUT,
        reqwest::Method::PATCH,
        reqwest::Method::DELETE,
    ] {
        let echoed = c
            .request(method.clone(), sc.url("/echo"))
            .body(upload.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(echoed.status(), 200, "{method}");
        assert_eq!(echoed.headers()["x-echo"], "1");
        assert_eq!(echoed.bytes().await.unwrap(), Bytes::from(upload.clone()), "{method}");
    }
    assert_eq!(origin.hits("/echo"), 4);
}

#[tokio::test]
async fn http2_prior_knowledge_clients_are_served() {
    let origin = Origin::start().await;
    origin.fixed("/a.css", &[("content-type", "text/css")], "body{}");
    let sc = TestSidecar::start(&origin.url()).await;
    let h2 = sidecache::http_client().http2_prior_knowledge().build().unwrap();
    let resp = h2.get(sc.url("/a.css")).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "body{}");
    // The app is reached over HTTP/1.1 with the client's authority as Host.
    let seen = origin.last_headers("/a.css").unwrap();
    assert_eq!(seen["host"], sc.addr.to_string());
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_and_forwarded_headers_set() {
    let origin = Origin::start().await;
    origin.route(
        "/h",
        Behaviour::Fixed {
            status: 200,
            headers: owned(&[
                ("connection", "x-app-private"),
                ("x-app-private", "1"),
                ("keep-alive", "timeout=5"),
            ]),
            body: Bytes::from_static(b"ok"),
        },
    );
    let sc = TestSidecar::start(&origin.url()).await;
    let resp = client()
        .get(sc.url("/h"))
        .header("host", "shop.example")
        .header("connection", "x-client-secret")
        .header("x-client-secret", "s3cr3t")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-host", "evil.example")
        .header("via", "1.1 edge")
        .send()
        .await
        .unwrap();
    assert!(
        !resp.headers().contains_key("x-app-private"),
        "named in the app's Connection header"
    );
    assert!(!resp.headers().contains_key("keep-alive"));
    let seen = origin.last_headers("/h").unwrap();
    assert_eq!(seen["host"], "shop.example", "the client's Host is kept");
    assert!(
        !seen.contains_key("x-client-secret"),
        "named in the client's Connection header"
    );
    assert!(!seen.contains_key("proxy-authorization"));
    assert_eq!(
        seen["x-forwarded-for"], "127.0.0.1",
        "an untrusted client XFF is replaced"
    );
    assert_eq!(seen["x-forwarded-host"], "shop.example");
    assert_eq!(seen["x-forwarded-proto"], "http");
    // RFC 9110 §7.6.3: a gateway adds itself to `Via` after what the request came with.
    let via: Vec<_> = seen.get_all("via").iter().map(|v| v.to_str().unwrap()).collect();
    assert_eq!(via.join(", "), "1.1 edge, 1.1 sidecache");
}

#[tokio::test]
async fn websocket_echo_passes_through() {
    let origin = Origin::start().await;
    origin.route("/ws", Behaviour::WebSocket);
    let sc = TestSidecar::start(&origin.url()).await;
    let stream = tokio::net::TcpStream::connect(sc.addr).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{}/ws", sc.addr), stream)
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..20 {
        let text = format!("message {i} {}", "x".repeat(i * 100));
        ws.send(Message::text(text.clone())).await.unwrap();
        let echoed = ws.next().await.unwrap().unwrap();
        assert_eq!(echoed, Message::text(text));
    }
    ws.send(Message::binary(pattern_bytes(100_000))).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(pattern_bytes(100_000))
    );
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn app_down_gives_a_fast_502() {
    // A port that was just free: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sc = TestSidecar::start(&format!("http://127.0.0.1:{port}")).await;
    let started = Instant::now();
    let resp = client().get(sc.url("/app.js")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    assert!(resp.text().await.unwrap().contains("Bad Gateway"));
}

#[tokio::test]
async fn slow_app_gives_a_504() {
    let origin = Origin::start().await;
    origin.route(
        "/slow",
        Behaviour::Delay(Duration::from_secs(5), Box::new(Behaviour::Echo)),
    );
    let sc = TestSidecar::start_with(&origin.url(), |c| c.upstream_timeout = Duration::from_millis(300)).await;
    let started = Instant::now();
    let resp = client().get(sc.url("/slow")).send().await.unwrap();
    assert_eq!(resp.status(), 504);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(resp.text().await.unwrap().contains("Gateway Timeout"));
}

#[tokio::test]
async fn oversized_request_headers_are_refused() {
    let origin = Origin::start().await;
    origin.fixed("/x", &[], "x");
    let sc = TestSidecar::start(&origin.url()).await;
    let resp = client()
        .get(sc.url("/x"))
        .header("x-big", "a".repeat(200_000))
        .send()
        .await;
    match resp {
        Ok(r) => assert_eq!(r.status(), 431),
        Err(e) => assert!(e.is_request() || e.is_connect() || e.is_body(), "{e}"),
    }
    assert_eq!(origin.hits("/x"), 0, "never forwarded");
}

#[tokio::test]
async fn metrics_are_on_the_admin_port_only() {
    let origin = Origin::start().await;
    origin.fixed("/metrics", &[("content-type", "text/plain")], "the app's own metrics");
    let sc = TestSidecar::start(&origin.url()).await;
    let c = client();
    let _ = c.get(sc.url("/metrics")).send().await.unwrap();
    let admin = c.get(sc.admin_url("/metrics")).send().await.unwrap();
    assert_eq!(admin.status(), 200);
    let text = admin.text().await.unwrap();
    assert!(text.contains("sidecache_requests_total"), "{text}");
    let public = c.get(sc.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert_eq!(public, "the app's own metrics", "every public path belongs to the app");
    assert_eq!(origin.hits("/metrics"), 2);
    assert_eq!(c.get(sc.admin_url("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(sc.admin_url("/readyz")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn readyz_fails_while_the_app_is_down() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let sc = TestSidecar::start(&format!("http://127.0.0.1:{port}")).await;
    let resp = client().get(sc.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
}

/// 1 GiB each way through the real binary; its peak RSS stays small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gigabyte_each_way_passes_with_flat_memory() {
    const GIB: u64 = 1 << 30;
    let origin = Origin::start().await;
    origin.route(
        "/big",
        Behaviour::Generated {
            len: GIB,
            headers: owned(&[("cache-control", "no-store")]),
        },
    );
    origin.route("/upload", Behaviour::Echo);
    let cache = tempfile::tempdir().unwrap();
    let mut bin = Binary::serve(&origin.url(), cache.path(), &[], &[("SIDECACHE_ACCESS_LOG", "false")]);
    let addr = bin.public_addr();
    let c = sidecache::http_client()
        .timeout(Duration::from_secs(600))
        .build()
        .unwrap();

    let resp = c.get(format!("http://{addr}/big")).send().await.unwrap();
    let mut stream = resp.bytes_stream();
    let mut n = 0u64;
    let mut mismatch = false;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        mismatch |= !matches_pattern(n, &chunk);
        n += chunk.len() as u64;
    }
    assert_eq!(n, GIB);
    assert!(!mismatch, "download bytes differ");

    // Upload 1 GiB (streamed from a generator) and read the echo back, comparing as it comes.
    let chunks = futures_util::stream::iter(
        (0..GIB)
            .step_by(1 << 20)
            .map(|start| Ok::<_, std::io::Error>(pattern_chunk(start, 1 << 20))),
    );
    let resp = c
        .post(format!("http://{addr}/upload"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    let mut n = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        mismatch |= !matches_pattern(n, &chunk);
        n += chunk.len() as u64;
    }
    assert_eq!(n, GIB);
    assert!(!mismatch, "upload echo bytes differ");

    let peak = bin.peak_rss_kib();
    assert!(peak < 64 * 1024, "peak RSS {peak} KiB after 2 GiB through the proxy");
}

async fn read_response(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn idle_connections_are_closed_after_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = Origin::start().await;
    origin.fixed("/x", &[], "x");
    let sc = TestSidecar::start_with(&origin.url(), |c| c.idle_timeout = Duration::from_millis(500)).await;
    let mut s = tokio::net::TcpStream::connect(sc.addr).await.unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
    // Keep-alive, then nothing: the sidecar closes the connection (EOF), bounded.
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
}

#[tokio::test]
async fn connections_beyond_the_limit_wait_for_a_free_slot() {
    use tokio::io::AsyncWriteExt;
    let origin = Origin::start().await;
    origin.fixed("/x", &[], "x");
    let sc = TestSidecar::start_with(&origin.url(), |c| c.max_connections = 1).await;
    let mut first = tokio::net::TcpStream::connect(sc.addr).await.unwrap();
    first.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    assert!(read_response(&mut first).await.starts_with("HTTP/1.1 200"));
    // The only slot is held by `first` (keep-alive): a second connection is not served...
    let mut second = tokio::net::TcpStream::connect(sc.addr).await.unwrap();
    second.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n").await.unwrap();
    let waited = tokio::time::timeout(Duration::from_millis(500), read_response(&mut second)).await;
    assert!(waited.is_err(), "served beyond the connection limit");
    // ...until the first goes away.
    drop(first);
    let answer = tokio::time::timeout(Duration::from_secs(10), read_response(&mut second))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
