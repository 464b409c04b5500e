//! Behaviours the public cache-tests suite checks that relax a rule (issue 27), each over real
//! sockets with a victim and an attacker: what the app says to this cache is obeyed, but never
//! so that one user's answer reaches another.

use std::time::Duration;

use crate::support::origin::owned;
use crate::support::{Behaviour, Origin, TestSidecar, client, eventually};

/// One GET: its `Cache-Status` and body, with or without the victim's cookie.
async fn get(sc: &TestSidecar, path: &str, cookie: Option<&str>) -> (String, String) {
    let mut req = client().get(sc.url(path));
    if let Some(cookie) = cookie {
        req = req.header("cookie", cookie);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200, "{path}");
    let status = resp
        .headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, resp.text().await.unwrap())
}

/// The victim asks first with its session; then an attacker without one must never get the
/// victim's answer, while an anonymous answer may be stored and reused.
async fn victim_then_attacker(sc: &TestSidecar, path: &str) {
    let (status, body) = get(sc, path, Some("session=victim")).await;
    assert!(body.contains("victim"), "{path}: the victim gets its own answer");
    assert!(
        !status.contains("stored"),
        "{path}: the victim's answer is not stored: {status}"
    );
    assert_eq!(sc.sidecar.proxy.cache().stats().0, 0, "{path}: nothing stored");
    let (first, body) = get(sc, path, None).await;
    assert!(
        !body.contains("victim"),
        "{path}: the attacker got the victim's answer ({first})"
    );
    assert!(
        first.contains("stored"),
        "{path}: the anonymous answer is stored: {first}"
    );
    let reused = eventually(Duration::from_secs(10), async || {
        let (status, body) = get(sc, path, None).await;
        assert!(!body.contains("victim"), "{path}: {status}");
        status == "sidecache; hit"
    })
    .await;
    assert!(reused, "{path}: the anonymous answer was never reused");
    let (_, body) = get(sc, path, Some("session=victim")).await;
    assert!(
        !body.contains("victim"),
        "{path}: the victim now gets the anonymous copy"
    );
}

/// RFC 9213 §2.1 (cache-tests `cdn-fresh-cc-nostore`): a targeted field is the app speaking to
/// this cache, so `CDN-Cache-Control: max-age` stores an answer whose `Cache-Control` says
/// `no-store` to browsers. Not for a request with credentials, unless the targeted field says
/// `public`.
#[tokio::test]
async fn a_cdn_lifetime_beside_no_store_is_obeyed_but_never_for_a_session() {
    let origin = Origin::start().await;
    for (path, cc) in [("/cdn", "no-store"), ("/cdn-nc", "no-cache")] {
        origin.route(
            path,
            Behaviour::Reflect {
                headers: owned(&[("cache-control", cc), ("cdn-cache-control", "max-age=600")]),
            },
        );
    }
    let sc = TestSidecar::start(&origin.url()).await;
    victim_then_attacker(&sc, "/cdn").await;
    let sc = TestSidecar::start(&origin.url()).await;
    victim_then_attacker(&sc, "/cdn-nc").await;
}

/// RFC 9111 §5.2.2.3 (cache-tests `status-200-must-understand`): `no-store, must-understand`
/// is stored by a cache that understands the status; never for a request with credentials.
#[tokio::test]
async fn must_understand_lifts_no_store_but_never_for_a_session() {
    let origin = Origin::start().await;
    origin.route(
        "/mu",
        Behaviour::Reflect {
            headers: owned(&[("cache-control", "max-age=600, no-store, must-understand")]),
        },
    );
    let sc = TestSidecar::start(&origin.url()).await;
    victim_then_attacker(&sc, "/mu").await;
}

/// `private` beside a targeted lifetime still holds for everyone (stricter than RFC 9213): a
/// middleware's blanket CDN lifetime never shares one user's page, anonymous or not.
#[tokio::test]
async fn private_beside_a_cdn_lifetime_is_never_stored() {
    let origin = Origin::start().await;
    origin.route(
        "/p",
        Behaviour::Reflect {
            headers: owned(&[("cache-control", "private"), ("cdn-cache-control", "max-age=600")]),
        },
    );
    let sc = TestSidecar::start(&origin.url()).await;
    for cookie in [Some("session=victim"), None, None] {
        let (status, _) = get(&sc, "/p", cookie).await;
        assert!(!status.contains("stored") && !status.contains("hit"), "{status}");
    }
    assert_eq!(sc.sidecar.proxy.cache().stats().0, 0);
    assert_eq!(origin.hits("/p"), 3);
}

/// An answer stored as it is relayed (a `no-cache` one, or one without a length) is stored
/// before its client has its last byte: a request sent once the answer is complete finds it,
/// and revalidates it with the stored validator (cache-tests `cc-resp-no-cache-revalidate*`)
/// instead of asking the app plain past a copy still in flight. Twenty URLs, each asked twice
/// back to back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_right_after_a_complete_answer_finds_it_stored() {
    let origin = Origin::start().await;
    let headers = [
        ("cache-control", "max-age=10000, no-cache"),
        ("etag", "\"v1\""),
        ("content-type", "text/plain"),
    ];
    for i in 0..20 {
        origin.fixed(&format!("/nc/{i}"), &headers, format!("body {i}").repeat(50));
    }
    let sc = TestSidecar::start(&origin.url()).await;
    let c = client();
    let mut plain = Vec::new();
    for i in 0..20 {
        let path = format!("/nc/{i}");
        for _ in 0..2 {
            let resp = c.get(sc.url(&path)).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.bytes().await.unwrap().len(), format!("body {i}").len() * 50);
        }
        let sent = origin.last_headers(&path).unwrap();
        if sent.get("if-none-match").is_none_or(|v| v != "\"v1\"") {
            plain.push(path.clone());
        }
        assert_eq!(origin.hits(&path), 2, "revalidated, as no-cache asks");
    }
    assert!(
        plain.is_empty(),
        "asked of the app without the stored validator: {plain:?}"
    );
}
