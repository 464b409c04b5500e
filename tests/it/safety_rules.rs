//! Issue 15 (safety), what is stored and for whom: rules and the fingerprint heuristic never
//! make an answer shareable, rule matching costs no more than the path's length, query keys
//! keep what the app reads. Each test is a victim/attacker pair over real sockets, against an
//! app that routes leniently (as many frameworks do) and answers per user.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use sidecache::config::Config;
use sidecache::rules::{QueryKey, RawRule, Rule};
use sidecache::units::HumanDuration;

use crate::support::TestSidecar;

/// An app with per-user answers and the lenient routing that web cache deception relies on:
/// `/api/me;x.js`, `/api/me/x.js` and `/api/me%2fx.js` all reach `/api/me`.
#[derive(Clone, Default)]
struct UserApp {
    hits: Arc<Mutex<HashMap<String, u64>>>,
}

impl UserApp {
    async fn start() -> (UserApp, String) {
        let app = UserApp::default();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let a = app.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let a = a.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let a = a.clone();
                        async move { Ok::<_, std::convert::Infallible>(a.answer(req)) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (app, url)
    }

    fn hits(&self, route: &str) -> u64 {
        self.hits.lock().unwrap().get(route).copied().unwrap_or(0)
    }

    fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let user = req
            .headers()
            .get("cookie")
            .and_then(|c| c.to_str().ok())
            .and_then(|c| c.strip_prefix("user="))
            .unwrap_or("anonymous")
            .to_owned();
        let raw = req.uri().path();
        // Lenient routing: decode, drop path parameters, resolve dot segments.
        let decoded = percent_encoding::percent_decode_str(raw)
            .decode_utf8_lossy()
            .into_owned();
        let mut segments: Vec<&str> = Vec::new();
        for s in decoded.split(';').next().unwrap_or("").split('/') {
            match s {
                ".." => {
                    segments.pop();
                }
                "" | "." => {}
                s => segments.push(s),
            }
        }
        let path = format!("/{}", segments.join("/"));
        let (route, status, headers, body): (&str, u16, Vec<(&str, &str)>, String) = if path.starts_with("/api/me") {
            let html = path.ends_with(".html");
            let ct = if html {
                "text/html; charset=utf-8"
            } else {
                "application/json"
            };
            (
                "/api/me",
                200,
                vec![("content-type", ct), ("cache-control", "private")],
                format!("{{\"user\":\"{user}\"}}"),
            )
        } else if path.starts_with("/json/me") {
            // Dynamic JSON with no caching headers at all.
            (
                "/json/me",
                200,
                vec![("content-type", "application/json")],
                format!("{{\"user\":\"{user}\"}}"),
            )
        } else if path == "/cdn/me.js" {
            // A middleware adds a CDN lifetime to every answer; the page itself is private.
            (
                "/cdn/me.js",
                200,
                vec![
                    ("content-type", "text/javascript"),
                    ("cache-control", "private"),
                    ("cdn-cache-control", "max-age=600"),
                ],
                format!("var user = '{user}';"),
            )
        } else if path == "/p.js" {
            (
                "/p.js",
                200,
                vec![("content-type", "text/javascript"), ("cache-control", "private")],
                format!("var user = '{user}';"),
            )
        } else if path == "/ns.css" {
            (
                "/ns.css",
                200,
                vec![("content-type", "text/css"), ("cache-control", "no-store")],
                format!("/* {user} */"),
            )
        } else if path == "/q" {
            // Reflects the query string as the app reads it.
            let q = req.uri().query().unwrap_or("").to_owned();
            (
                "/q",
                200,
                vec![("content-type", "text/plain"), ("cache-control", "max-age=600")],
                q,
            )
        } else if path == "/assets/app-3f2a9c81.js" {
            // A deploy race: the first request comes before the file exists.
            let n = self.hits(&path);
            if n == 0 {
                (
                    "/assets/app-3f2a9c81.js",
                    404,
                    vec![("content-type", "text/plain")],
                    "not yet".into(),
                )
            } else {
                (
                    "/assets/app-3f2a9c81.js",
                    200,
                    vec![("content-type", "text/javascript")],
                    "ok()".into(),
                )
            }
        } else {
            ("other", 404, vec![], "no".into())
        };
        *self.hits.lock().unwrap().entry(route.to_owned()).or_default() += 1;
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
        for (k, v) in headers {
            resp.headers_mut().insert(k, v.parse().unwrap());
        }
        resp
    }
}

/// One HTTP/1.1 request with the target exactly as written (no client-side normalisation of
/// `..` or `%2f`), answered on a connection of its own.
async fn raw_get(addr: std::net::SocketAddr, target: &str, cookie: Option<&str>) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let cookie = cookie.map(|c| format!("Cookie: {c}\r\n")).unwrap_or_default();
    let head = format!("GET {target} HTTP/1.1\r\nHost: app.example\r\n{cookie}Connection: close\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut out))
        .await
        .expect("an answer within 30 s")
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let cache_status = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("cache-status: ").map(str::to_owned))
        .unwrap_or_default();
    // Bodies here are small and sent with Content-Length.
    (status, cache_status, body.to_owned())
}

fn rule(pattern: &str, ttl: Option<u64>, force_ttl: Option<u64>) -> Rule {
    Rule::compile(RawRule {
        pattern: pattern.into(),
        bypass: false,
        ttl: ttl.map(|s| HumanDuration(Duration::from_secs(s))),
        force_ttl: force_ttl.map(|s| HumanDuration(Duration::from_secs(s))),
        strip_set_cookie: false,
    })
    .unwrap()
}

/// The victim asks with its cookie, then the attacker without: the attacker must never see
/// the victim's answer, whether from a stored object or a fill in progress.
async fn victim_then_attacker(sc: &TestSidecar, target: &str) {
    let (status, _, body) = raw_get(sc.addr, target, Some("user=victim")).await;
    assert_eq!(status, 200, "{target}: the victim is served");
    assert!(
        body.contains("victim"),
        "{target}: the victim gets its own answer: {body}"
    );
    for _ in 0..2 {
        let (_, cache_status, body) = raw_get(sc.addr, target, None).await;
        assert!(
            !body.contains("victim"),
            "{target}: the attacker got the victim's answer ({cache_status})"
        );
        assert!(!cache_status.contains("hit"), "{target}: {cache_status}");
    }
}

/// Finding 1: with the default configuration, `private` answers reached through names that look
/// fingerprinted (`;`, `/`, `%2f`, `.html`) were stored for a year and served to others.
#[tokio::test]
async fn private_answers_under_fingerprinted_looking_names_are_never_shared() {
    let (app, url) = UserApp::start().await;
    let sc = TestSidecar::start(&url).await;
    for target in [
        "/api/me;x-a1b2c3d4.json",
        "/api/me/x-a1b2c3d4.json",
        "/api/me%2fx-a1b2c3d4.json",
        "/api/me/x-a1b2c3d4.html",
        "/api/me;x-a1b2c3d4.js",
        // Dynamic JSON without caching headers, under a hashed-looking JSON name.
        "/json/me/x-a1b2c3d4.json",
        // `private` with a CDN lifetime added by a middleware.
        "/cdn/me.js",
    ] {
        victim_then_attacker(&sc, target).await;
    }
    assert_eq!(sc.sidecar.proxy.cache.stats().0, 0, "nothing stored");
    assert!(app.hits("/api/me") >= 15, "every request reached the app");
}

/// Finding 2: `ttl` overrode `private`, `force_ttl` stored `no-store`, and extension or prefix
/// rules stored dynamic JSON reached through deception paths.
#[tokio::test]
async fn rules_never_store_private_no_store_or_deceptive_answers() {
    let (_app, url) = UserApp::start().await;
    let sc = TestSidecar::start_with(&url, |c: &mut Config| {
        c.rules = vec![
            rule("*.js", Some(86_400), None),
            rule("*.css", None, Some(86_400)),
            rule("/assets/**", Some(86_400), None),
        ];
    })
    .await;
    for target in [
        "/p.js",
        "/ns.css",
        "/json/me;x.js",
        "/json/me/x.js",
        "/json/me%2fx.js",
        "/json/me%2Fx.css",
        "/assets/..%2fjson/me",
        "/assets/%2e%2e/json/me",
        "/assets/../json/me",
    ] {
        victim_then_attacker(&sc, target).await;
    }
    assert_eq!(sc.sidecar.proxy.cache.stats().0, 0, "nothing stored");
}

/// Finding 3: the backtracking glob matcher used over 40 s of CPU for one request with a long
/// path, on the serving loop, stalling every other request. Four such requests and one plain
/// request must all be answered at once (the bound is generous: the old matcher needed tens of
/// seconds for each).
#[tokio::test]
async fn huge_paths_against_multi_wildcard_rules_cost_no_more_than_a_request() {
    let (app, url) = UserApp::start().await;
    let sc = TestSidecar::start_with(&url, |c: &mut Config| {
        c.rules = vec![
            rule("*-*-*.js", Some(60), None),
            rule("/assets/**/*-*.min.js", Some(60), None),
            rule("/x/**/*-*-*-*.map", Some(60), None),
        ];
    })
    .await;
    let dashes = format!("/x/{}.css", "-".repeat(60_000));
    let deep = format!("/assets/{}x.js", "a-/".repeat(20_000));
    let started = Instant::now();
    let mut slow = Vec::new();
    for target in [dashes.clone(), deep.clone(), dashes, deep] {
        let addr = sc.addr;
        slow.push(tokio::spawn(async move { raw_get(addr, &target, None).await.0 }));
    }
    let (status, _, _) = raw_get(sc.addr, "/q?plain=1", None).await;
    assert_eq!(status, 200, "an unrelated request is served");
    for s in slow {
        assert_eq!(s.await.unwrap(), 404, "the long paths reach the app");
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "five requests took {took:?}");
    assert_eq!(app.hits("other"), 4);
}

/// Finding 14: a 404 under a fingerprinted name was stored for `fingerprinted_ttl` (365 days),
/// so a deploy race pinned a missing asset.
#[tokio::test]
async fn a_missing_asset_under_a_fingerprinted_name_is_not_pinned() {
    let (app, url) = UserApp::start().await;
    let sc = TestSidecar::start(&url).await;
    let (status, _, _) = raw_get(sc.addr, "/assets/app-3f2a9c81.js", None).await;
    assert_eq!(status, 404, "the deploy race");
    let (status, _, body) = raw_get(sc.addr, "/assets/app-3f2a9c81.js", None).await;
    assert_eq!((status, body.as_str()), (200, "ok()"), "the asset, once it exists");
    // The successful answer gets the fingerprint lifetime.
    let (status, cache_status, _) = raw_get(sc.addr, "/assets/app-3f2a9c81.js", None).await;
    assert_eq!(status, 200);
    assert!(
        cache_status.contains("hit") || cache_status.contains("collapsed"),
        "{cache_status}"
    );
    assert_eq!(app.hits("/assets/app-3f2a9c81.js"), 2);
}

/// Finding 10: `?v=1&utm_source=x;v=evil` was stored under `?v=1` (frameworks that split on `;`
/// read `v=evil`), and sorting made `?v=2&v=1` share `?v=1&v=2`'s answer.
#[tokio::test]
async fn query_keys_keep_what_the_app_reads() {
    let (_app, url) = UserApp::start().await;
    let sc = TestSidecar::start_with(&url, |c: &mut Config| {
        c.query = QueryKey::Deny(vec!["utm_source".into()]);
    })
    .await;
    // The attacker's request first, so a shared key would hand its answer to the victim.
    let (_, _, body) = raw_get(sc.addr, "/q?v=1&utm_source=x;v=evil", None).await;
    assert_eq!(body, "v=1&utm_source=x;v=evil");
    let (_, _, body) = raw_get(sc.addr, "/q?v=1", None).await;
    assert_eq!(body, "v=1", "the victim gets the answer to its own query");
    let (_, _, body) = raw_get(sc.addr, "/q?v=2&v=1", None).await;
    assert_eq!(body, "v=2&v=1");
    let (_, _, body) = raw_get(sc.addr, "/q?v=1&v=2", None).await;
    assert_eq!(body, "v=1&v=2", "repeated parameters keep their order in the key");
    // Trackers are still dropped from the key: one answer for both.
    let (_, _, body) = raw_get(sc.addr, "/q?v=1&utm_source=mail", None).await;
    assert_eq!(body, "v=1");
}

/// Finding 15: a file-name pattern with `/` never matched, and check-config accepted it.
#[test]
fn a_rule_that_could_never_match_is_refused_by_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sidecache.yaml");
    std::fs::write(&file, "rules:\n  - match: \"api/*.json\"\n    bypass: true\n").unwrap();
    let out = std::process::Command::new(crate::support::binary_path())
        .args(["check-config", "--config", file.to_str().unwrap()])
        .env_clear()
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("/api/*.json"), "the error shows the fix: {err}");
}
