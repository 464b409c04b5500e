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
                    let service = service_fn(move |req: Request<Incoming>| {
                        let a = a.clone();
                        async move {
                            let slow = req.uri().path() == "/nc";
                            let resp = a.answer(req);
                            if slow {
                                // A slow page, so that other users' requests join its fill.
                                tokio::time::sleep(Duration::from_millis(700)).await;
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        }
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
        for s in decoded.split('/') {
            match s.split(';').next().unwrap_or("") {
                ".." => {
                    segments.pop();
                }
                "" | "." => {}
                s => segments.push(s),
            }
        }
        // A case-insensitive router, as Express and ASP.NET have by default.
        let path = format!("/{}", segments.join("/")).to_ascii_lowercase();
        let etag = format!("\"u-{user}\"");
        let inm = req
            .headers()
            .get("if-none-match")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let set_cookie = format!("session={user}");
        let (route, status, headers, body): (&str, u16, Vec<(&str, &str)>, String) = if path == "/api/feed" {
            // A per-user answer with a lifetime: the app's bug that a bypass rule covers.
            (
                "/api/feed",
                200,
                vec![("content-type", "application/json"), ("cache-control", "max-age=600")],
                format!("{{\"feed\":\"{user}\"}}"),
            )
        } else if path == "/account" {
            // Express's default for res.json: an ETag, no Cache-Control.
            if user == "boom" {
                ("/account", 500, vec![], "oops".into())
            } else {
                (
                    "/account",
                    200,
                    vec![("content-type", "application/json"), ("etag", &etag)],
                    format!("{{\"user\":\"{user}\"}}"),
                )
            }
        } else if path == "/static/app.js" || path == "/static/p.js" {
            // Revalidated on every use; the app's 304 to a logged-in user sets its cookie, and
            // for p.js also makes the answer private.
            let logged_in = user != "anonymous";
            let route = if path == "/static/app.js" {
                "/static/app.js"
            } else {
                "/static/p.js"
            };
            let mut h = vec![
                ("content-type", "text/javascript"),
                ("etag", "\"s1\""),
                ("cache-control", "max-age=0"),
            ];
            if logged_in {
                h.push(("set-cookie", &set_cookie));
                if route == "/static/p.js" {
                    h.retain(|(k, _)| *k != "cache-control");
                    h.push(("cache-control", "private, max-age=600"));
                }
            }
            if inm == "\"s1\"" {
                (route, 304, h, String::new())
            } else {
                (route, 200, h, "static();".into())
            }
        } else if path == "/nc" {
            (
                "/nc",
                200,
                vec![
                    ("content-type", "text/html"),
                    ("cache-control", "no-cache"),
                    ("etag", &etag),
                ],
                format!("inbox of {user}"),
            )
        } else if path.starts_with("/me/invoice-") {
            (
                "/me/invoice",
                200,
                vec![("content-type", "application/pdf")],
                format!("%PDF invoice of {user}"),
            )
        } else if path.starts_with("/api/me") {
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
    let cookie = cookie.map(|c| format!("Cookie: {c}\r\n")).unwrap_or_default();
    raw_request(
        addr,
        &format!("GET {target} HTTP/1.1\r\nHost: app.example\r\n{cookie}Connection: close\r\n\r\n"),
    )
    .await
}

/// Sends a raw request head; the status, `Cache-Status` and body of the answer.
async fn raw_request(addr: std::net::SocketAddr, head: &str) -> (u16, String, String) {
    let (status, cache_status, body, _) = raw_exchange(addr, head).await;
    (status, cache_status, body)
}

/// Sends a raw request head; the status, `Cache-Status`, body and head of the answer.
async fn raw_exchange(addr: std::net::SocketAddr, head: &str) -> (u16, String, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
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
    (status, cache_status, body.to_owned(), head.to_owned())
}

fn rule(pattern: &str, ttl: Option<u64>, force_ttl: Option<u64>) -> Rule {
    Rule::compile(RawRule {
        name: None,
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
    assert_eq!(sc.sidecar.proxy.cache().stats().0, 0, "nothing stored");
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
    assert_eq!(sc.sidecar.proxy.cache().stats().0, 0, "nothing stored");
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

/// Review of the fixes, High 1: an answer stored for its validator alone (`ETag`, no lifetime:
/// Express's default for JSON) was served to anyone asking with `max-stale`, and stood in for
/// the app when it failed.
#[tokio::test]
async fn answers_stored_for_their_validator_alone_are_never_served_without_the_app() {
    let (app, url) = UserApp::start().await;
    let sc = TestSidecar::start(&url).await;
    let (_, _, body) = raw_get(sc.addr, "/account", Some("user=victim")).await;
    assert!(body.contains("victim"));
    let (_, status, body) = raw_get_with(sc.addr, "/account", &["Cache-Control: max-stale"]).await;
    assert!(
        !body.contains("victim"),
        "max-stale served the victim's answer ({status})"
    );
    let (code, status, body) = raw_get(sc.addr, "/account", Some("user=boom")).await;
    assert!(
        !body.contains("victim"),
        "a failing app was stood in for by the victim's answer ({status})"
    );
    assert_eq!(code, 500);
    assert_eq!(app.hits("/account"), 3, "every request asked the app");
}

/// Review, High 2: a 304 merged the revalidating user's `Set-Cookie`, or a `private`, into the
/// shared copy.
#[tokio::test]
async fn a_304_never_puts_one_users_cookie_or_private_into_the_shared_copy() {
    let (_app, url) = UserApp::start().await;
    let sc = TestSidecar::start(&url).await;
    for target in ["/static/app.js", "/static/p.js"] {
        let (_, _, _) = raw_get(sc.addr, target, None).await;
        // The victim revalidates the shared copy; its 304 carries its cookie.
        let (code, status, _) = raw_get(sc.addr, target, Some("user=alice")).await;
        assert_eq!(code, 200, "{target}: {status}");
        let head = raw_head(sc.addr, target, Some("user=alice")).await;
        assert!(
            head.contains("session=alice"),
            "{target}: the victim gets its own cookie: {head}"
        );
        for _ in 0..2 {
            let head = raw_head(sc.addr, target, None).await;
            assert!(
                !head.contains("session=alice"),
                "{target}: another user got alice's cookie: {head}"
            );
            assert!(
                !head.to_ascii_lowercase().contains("cache-status: sidecache; hit\r"),
                "{target}: {head}"
            );
        }
    }
}

/// Review, High 3: requests that joined another user's fill got its `no-cache` answer.
#[tokio::test]
async fn coalesced_requests_never_get_another_users_no_cache_answer() {
    let (app, url) = UserApp::start().await;
    let sc = TestSidecar::start(&url).await;
    let addr = sc.addr;
    let victim = tokio::spawn(async move { raw_get(addr, "/nc", Some("user=alice")).await });
    assert!(
        crate::support::eventually(Duration::from_secs(10), async || app.hits("/nc") >= 1).await,
        "the victim's request reached the app"
    );
    let (_, status, body) = raw_get(sc.addr, "/nc", Some("user=mallory")).await;
    assert!(
        body.contains("mallory"),
        "mallory got another answer ({status}): {body}"
    );
    assert!(victim.await.unwrap().2.contains("alice"));
}

/// Review, Medium 5: parameters left out of the key reached the app, so a denied parameter
/// carrying a script changed the page stored under the plain key.
#[tokio::test]
async fn parameters_left_out_of_the_key_never_reach_the_app() {
    let (_app, url) = UserApp::start().await;
    let sc = TestSidecar::start_with(&url, |c: &mut Config| {
        c.query = QueryKey::Deny(vec!["utm_source".into()]);
    })
    .await;
    let (_, _, body) = raw_get(sc.addr, "/q?v=1&utm_source=%22%3E%3Cscript%3E", None).await;
    assert_eq!(body, "v=1", "the app sees what the key holds");
    let (_, _, body) = raw_get(sc.addr, "/q?v=1", None).await;
    assert_eq!(body, "v=1");
    let sc = TestSidecar::start_with(&url, |c: &mut Config| c.query = QueryKey::None).await;
    let (_, _, body) = raw_get(sc.addr, "/q?x=%3Cscript%3E", None).await;
    assert_eq!(body, "", "query: none sends no query");
}

/// Review, Medium 6: the fingerprint heuristic stored per-user downloads whose names look
/// hashed (`invoice-INV20240001.pdf`) for a year.
#[tokio::test]
async fn per_user_downloads_with_hash_looking_names_are_not_shared() {
    let (_app, url) = UserApp::start().await;
    let sc = TestSidecar::start(&url).await;
    victim_then_attacker(&sc, "/me/invoice-INV20240001.pdf").await;
}

/// Review, Medium 7: a bypass rule was dodged by spellings a lenient or case-insensitive
/// router reads as the same path.
#[tokio::test]
async fn bypass_rules_cannot_be_dodged_by_spelling() {
    let (_app, url) = UserApp::start().await;
    let sc = TestSidecar::start_with(&url, |c: &mut Config| {
        c.rules = vec![
            Rule::compile(RawRule {
                name: None,
                pattern: "/api/**".into(),
                bypass: true,
                ttl: None,
                force_ttl: None,
                strip_set_cookie: false,
            })
            .unwrap(),
        ];
    })
    .await;
    for target in [
        "/API/feed",
        "//api/feed",
        "/api;x/feed",
        "/x/../api/feed",
        "/%61pi/feed",
        "/Api/./feed",
    ] {
        victim_then_attacker(&sc, target).await;
    }
}

/// Like [`raw_get`], with extra request lines and no cookie.
async fn raw_get_with(addr: std::net::SocketAddr, target: &str, extra: &[&str]) -> (u16, String, String) {
    let lines: String = extra.iter().map(|l| format!("{l}\r\n")).collect();
    raw_request(
        addr,
        &format!("GET {target} HTTP/1.1\r\nHost: app.example\r\n{lines}Connection: close\r\n\r\n"),
    )
    .await
}

/// The head of a GET's answer, as text.
async fn raw_head(addr: std::net::SocketAddr, target: &str, cookie: Option<&str>) -> String {
    let cookie = cookie.map(|c| format!("Cookie: {c}\r\n")).unwrap_or_default();
    let (_, _, _, head) = raw_exchange(
        addr,
        &format!("GET {target} HTTP/1.1\r\nHost: app.example\r\n{cookie}Connection: close\r\n\r\n"),
    )
    .await;
    head
}
