//! Issue 18 over real sockets: purge by tag (admin and the real binary's CLI), tags across a
//! restart, tag headers kept from clients, soft purge (a conditional request and a 304
//! refresh; stale-if-error with the app down, across a restart), `inspect` (JSON field by
//! field, text, the token), and per-rule counts that add up to the requests sent.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

use crate::support::{
    Behaviour, Binary, Origin, TestSidecar, app_client, binary_path, client, eventually, metric, origin::owned, scrape,
};

const TOKEN: &str = "s3cret";

/// The tests' configuration: the token on, and no free space kept (the machine's disk is
/// shared; its free share is not what these tests are about).
fn tweak(c: &mut sidecache::config::Config) {
    c.admin_token = Some(TOKEN.into());
    c.min_free = sidecache::units::MinFree::Bytes(0);
}

async fn get(url: &str) -> (u16, String, Bytes, reqwest::header::HeaderMap) {
    let resp = client().get(url).send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let cs = headers
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, cs, resp.bytes().await.unwrap(), headers)
}

async fn admin_post(sc: &TestSidecar, path: &str) -> (u16, String) {
    let resp = client()
        .post(sc.admin_url(path))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap().trim().to_owned())
}

/// Runs the real binary's CLI (blocking the test's thread, not its runtime).
fn cli(args: &[&str]) -> std::process::Output {
    tokio::task::block_in_place(|| std::process::Command::new(binary_path()).args(args).output().unwrap())
}

/// Stored images (objects and variants) under a cache directory, once it holds `expected`
/// of them or 10 s have passed: a slot let go is punched by the segments' writer just after
/// the index lets go of it.
async fn object_files(cache: &Path, expected: usize) -> usize {
    let count = || crate::support::images(cache).len();
    eventually(Duration::from_secs(10), async || count() == expected).await;
    count()
}

const CACHEABLE: (&str, &str) = ("cache-control", "public, max-age=600");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_by_tag_through_admin_and_cli_removes_every_tagged_object_and_its_file() {
    let origin = Origin::start().await;
    origin.fixed(
        "/p1.jpg",
        &[CACHEABLE, ("surrogate-key", "product-1 all")],
        "p1".repeat(100),
    );
    origin.fixed(
        "/p1.css",
        &[CACHEABLE, ("cache-tag", "product-1, all")],
        "c1".repeat(100),
    );
    origin.fixed(
        "/p2.jpg",
        &[CACHEABLE, ("surrogate-key", "product-2 all")],
        "p2".repeat(100),
    );
    origin.fixed("/t.js", &[CACHEABLE, ("cache-tag", "tenant-a")], "t".repeat(100));
    origin.fixed("/plain.js", &[CACHEABLE], "x".repeat(100));
    let paths = ["/p1.jpg", "/p1.css", "/p2.jpg", "/t.js", "/plain.js"];
    let sc = TestSidecar::start_with(&origin.url(), tweak).await;
    let cache_dir = sc.dir.path().join("cache");
    for p in paths {
        let (status, _, _, headers) = get(&sc.url(p)).await;
        assert_eq!(status, 200);
        assert!(
            !headers.contains_key("surrogate-key") && !headers.contains_key("cache-tag"),
            "tag headers reach the client on a miss: {headers:?}"
        );
    }
    let stored = async |n| {
        eventually(Duration::from_secs(10), async || {
            sc.sidecar.proxy.cache().stats().0 == n
        })
        .await
    };
    assert!(stored(5).await);
    let (_, cs, _, headers) = get(&sc.url("/p1.jpg")).await;
    assert_eq!(cs, "sidecache; hit");
    assert!(
        !headers.contains_key("surrogate-key"),
        "tag headers reach the client on a hit"
    );
    assert_eq!(object_files(&cache_dir, 5).await, 5);

    // Without the token: refused, nothing purged.
    let denied = client().post(sc.admin_url("/purge?tag=all")).send().await.unwrap();
    assert_eq!(denied.status(), 401);
    assert_eq!(
        admin_post(&sc, "/purge?tag=product-1").await,
        (200, r#"{"purged":2}"#.into())
    );
    assert_eq!(
        object_files(&cache_dir, 3).await,
        3,
        "the purged objects' images are gone"
    );
    assert!(get(&sc.url("/p1.jpg")).await.1.contains("fwd=uri-miss"));
    assert!(get(&sc.url("/p1.css")).await.1.contains("fwd=uri-miss"));
    assert_eq!(get(&sc.url("/p2.jpg")).await.1, "sidecache; hit");
    assert!(stored(5).await);

    // The CLI, any of several tags: `all` (three objects) or `tenant-a` (one).
    let admin = sc.admin_url("");
    let out = cli(&[
        "purge", "--tag", "all", "--tag", "tenant-a", "--target", &admin, "--token", TOKEN,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), r#"{"purged":4}"#);
    assert_eq!(sc.sidecar.proxy.cache().stats().0, 1);
    assert_eq!(get(&sc.url("/plain.js")).await.1, "sidecache; hit");
    for p in ["/p1.jpg", "/p2.jpg", "/t.js"] {
        assert!(get(&sc.url(p)).await.1.contains("fwd=uri-miss"), "{p}");
    }
    // A tag nothing carries purges nothing.
    assert_eq!(
        admin_post(&sc, "/purge?tag=nothing").await,
        (200, r#"{"purged":0}"#.into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_headers_can_be_kept_for_clients_and_hostile_tag_lists_are_not_stored() {
    let origin = Origin::start().await;
    let many: String = (0..33).map(|i| format!("t{i} ")).collect();
    origin.fixed("/many.js", &[CACHEABLE, ("surrogate-key", &many)], "m".repeat(100));
    origin.fixed("/kept.js", &[CACHEABLE, ("surrogate-key", "k")], "k".repeat(100));
    let sc = TestSidecar::start_with(&origin.url(), |c| {
        tweak(c);
        c.tags.to_clients = true;
    })
    .await;
    // 33 tags, one past the bound: served, not stored (a purge by the last would miss it).
    for _ in 0..2 {
        let (status, cs, body, _) = get(&sc.url("/many.js")).await;
        assert_eq!((status, body.len()), (200, 100));
        assert!(!cs.contains("stored"), "{cs}");
    }
    assert_eq!(origin.hits("/many.js"), 2);
    let (_, _, _, headers) = get(&sc.url("/kept.js")).await;
    assert_eq!(headers.get("surrogate-key").unwrap(), "k", "kept when configured");
    assert!(
        eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache().stats().0
            == 1)
        .await
    );
}

/// Starts the binary on `dir` with the token and waits until its index is loaded.
async fn start_binary(origin: &Origin, dir: &Path, extra: &[&str]) -> (Binary, std::net::SocketAddr, String) {
    let mut bin = Binary::serve(
        &origin.url(),
        dir,
        extra,
        &[
            ("SIDECACHE_ACCESS_LOG", "false"),
            ("SIDECACHE_ADMIN_TOKEN", TOKEN),
            ("SIDECACHE_MIN_FREE", "0"),
        ],
    );
    let addr = bin.public_addr();
    let admin = bin.admin_addr();
    crate::support::wait_ready(admin).await;
    (bin, addr, format!("http://{admin}"))
}

fn stop(mut bin: Binary) {
    bin.signal(libc::SIGTERM);
    assert!(bin.wait_exit(Duration::from_secs(30)).success());
}

async fn objects(admin: &str) -> f64 {
    let addr = admin.trim_start_matches("http://").parse().unwrap();
    metric(&scrape(addr).await, "sidecache_cache_objects", &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_are_rebuilt_from_the_records_after_a_restart() {
    let origin = Origin::start().await;
    origin.fixed("/a.js", &[CACHEABLE, ("surrogate-key", "release-7")], "a".repeat(500));
    origin.fixed("/b.css", &[CACHEABLE, ("cache-tag", "release-7,css")], "b".repeat(500));
    origin.fixed("/c.png", &[CACHEABLE, ("surrogate-key", "img")], "c".repeat(500));
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let (bin, addr, admin) = start_binary(&origin, &cache, &[]).await;
    for p in ["/a.js", "/b.css", "/c.png"] {
        app_client().get(format!("http://{addr}{p}")).send().await.unwrap();
    }
    assert!(eventually(Duration::from_secs(10), async || objects(&admin).await == 3.0).await);
    stop(bin);

    let (_bin, addr, admin) = start_binary(&origin, &cache, &[]).await;
    let resp = client()
        .post(format!("{admin}/purge?tag=release-7"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap().trim(), r#"{"purged":2}"#);
    let cs = |r: &reqwest::Response| r.headers()["cache-status"].to_str().unwrap().to_owned();
    let c = app_client().get(format!("http://{addr}/c.png")).send().await.unwrap();
    assert_eq!(cs(&c), "sidecache; hit", "an object of another tag stays");
    let a = app_client().get(format!("http://{addr}/a.js")).send().await.unwrap();
    assert!(cs(&a).contains("fwd=uri-miss"));
    assert_eq!(origin.hits("/a.js"), 2);
    assert_eq!(origin.hits("/c.png"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_purge_revalidates_conditionally_and_a_304_refreshes_the_copy() {
    let origin = Origin::start().await;
    origin.route(
        "/v.js",
        Behaviour::Validating {
            etag: "\"v1\"".into(),
            headers: owned(&[CACHEABLE, ("surrogate-key", "bundle")]),
            body: Bytes::from("v".repeat(300)),
        },
    );
    let sc = TestSidecar::start_with(&origin.url(), tweak).await;
    get(&sc.url("/v.js")).await;
    assert!(
        eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache().stats().0
            == 1)
        .await
    );
    assert_eq!(get(&sc.url("/v.js")).await.1, "sidecache; hit");
    assert_eq!(
        admin_post(&sc, "/purge?tag=bundle&soft=true").await,
        (200, r#"{"marked":1}"#.into())
    );
    assert_eq!(sc.sidecar.proxy.cache().stats().0, 1, "marked, not removed");

    let (status, cs, body, _) = get(&sc.url("/v.js")).await;
    assert_eq!((status, body.len()), (200, 300));
    assert!(cs.contains("fwd=stale") && cs.contains("fwd-status=304"), "{cs}");
    assert_eq!(origin.hits("/v.js"), 2);
    let sent = origin.last_headers("/v.js").unwrap();
    assert_eq!(sent.get("if-none-match").unwrap(), "\"v1\"", "a conditional request");
    // The 304 stored a refreshed, unmarked version: hits again.
    assert!(
        eventually(Duration::from_secs(10), async || get(&sc.url("/v.js")).await.1
            == "sidecache; hit")
        .await
    );
    assert_eq!(origin.hits("/v.js"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_soft_purge_survives_a_restart_and_serves_stale_while_the_app_is_down() {
    let origin = Origin::start().await;
    let body = "s".repeat(800);
    origin.fixed("/s.css", &[CACHEABLE, ("surrogate-key", "deploy")], body.clone());
    origin.fixed("/other.css", &[CACHEABLE, ("surrogate-key", "keep")], "o".repeat(800));
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let (bin, addr, admin) = start_binary(&origin, &cache, &[]).await;
    for p in ["/s.css", "/other.css"] {
        app_client().get(format!("http://{addr}{p}")).send().await.unwrap();
    }
    assert!(eventually(Duration::from_secs(10), async || objects(&admin).await == 2.0).await);
    let out = cli(&[
        "purge", "--tag", "deploy", "--soft", "--target", &admin, "--token", TOKEN,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), r#"{"marked":1}"#);
    let before = scrape(admin.trim_start_matches("http://").parse().unwrap()).await;
    assert_eq!(metric(&before, "sidecache_soft_purged_objects_total", &[]), 1.0);
    stop(bin);

    // The app is down (a deploy); the sidecar restarts on the same directory.
    origin.route("/s.css", Behaviour::Status(503));
    origin.route("/other.css", Behaviour::Status(503));
    let (_bin, addr, admin) = start_binary(&origin, &cache, &[]).await;
    let resp = app_client().get(format!("http://{addr}/s.css")).send().await.unwrap();
    let cs = resp.headers()["cache-status"].to_str().unwrap().to_owned();
    assert_eq!(resp.status(), 200, "users are still served");
    assert!(cs.contains("stale-if-error"), "the mark held across the restart: {cs}");
    assert_eq!(resp.text().await.unwrap(), body);
    assert_eq!(origin.hits("/s.css"), 2, "the app was asked first");
    // The object not purged is still fresh: the app is not asked.
    let other = app_client()
        .get(format!("http://{addr}/other.css"))
        .send()
        .await
        .unwrap();
    assert_eq!(other.headers()["cache-status"], "sidecache; hit");
    let text = scrape(admin.trim_start_matches("http://").parse().unwrap()).await;
    assert_eq!(metric(&text, "sidecache_requests_total", &[r#"outcome="stale""#]), 1.0);
    assert_eq!(metric(&text, "sidecache_requests_total", &[r#"outcome="hit""#]), 1.0);
}

fn field<'a>(v: &'a Value, name: &str) -> &'a Value {
    v.get(name).unwrap_or_else(|| panic!("no field {name} in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_shows_each_stored_fact_and_why_it_would_be_served() {
    let origin = Origin::start().await;
    origin.route(
        "/i.js",
        Behaviour::Validating {
            etag: "\"i1\"".into(),
            headers: owned(&[
                ("cache-control", "public, max-age=600, stale-while-revalidate=30"),
                ("surrogate-key", "inspect-me js"),
                ("content-type", "text/javascript"),
            ]),
            body: Bytes::from("i".repeat(1234)),
        },
    );
    let sc = TestSidecar::start_with(&origin.url(), tweak).await;
    get(&sc.url("/i.js")).await;
    assert!(
        eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache().stats().0
            == 1)
        .await
    );
    for _ in 0..2 {
        assert_eq!(get(&sc.url("/i.js")).await.1, "sidecache; hit");
    }

    // The token is required, as for purge.
    let denied = client().get(sc.admin_url("/objects?url=/i.js")).send().await.unwrap();
    assert_eq!(denied.status(), 401);
    let admin = sc.admin_url("");
    let out = cli(&["inspect", "/i.js", "--target", &admin]);
    assert!(!out.status.success(), "the CLI without the token is refused");

    let inspect = async || -> Value {
        let resp = client()
            .get(sc.admin_url("/objects?url=/i.js"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        serde_json::from_str(&resp.text().await.unwrap()).unwrap()
    };
    let report = inspect().await;
    assert_eq!(field(&report, "url"), "/i.js");
    let objects = field(&report, "objects").as_array().unwrap();
    assert_eq!(objects.len(), 1);
    let o = &objects[0];
    assert_eq!(field(o, "key"), &Value::from(format!("http://{}/i.js", sc.addr)));
    assert_eq!(field(o, "status"), 200);
    let headers: Vec<(String, String)> = serde_json::from_value(field(o, "headers").clone()).unwrap();
    assert!(headers.contains(&("etag".into(), "\"i1\"".into())), "{headers:?}");
    assert!(headers.contains(&("surrogate-key".into(), "inspect-me js".into())));
    assert_eq!(field(o, "body_bytes"), 1234);
    let file = field(o, "file_bytes").as_u64().unwrap();
    assert!(file > 1234, "body, record and footer: {file}");
    assert!(field(o, "disk_bytes").as_u64().unwrap() >= file);
    assert_eq!(field(o, "tier"), "memory", "a small body hit twice is in the hot tier");
    assert_eq!(field(o, "tags"), &serde_json::json!(["inspect-me", "js"]));
    assert_eq!(field(o, "hits"), 2);
    let stored_at = httpdate::parse_http_date(field(o, "stored_at").as_str().unwrap()).unwrap();
    assert!(stored_at.elapsed().unwrap() < Duration::from_secs(60));
    assert!(field(o, "generation").as_u64().unwrap() > 0);
    assert!(field(o, "age_secs").as_u64().unwrap() < 60);
    assert_eq!(field(o, "lifetime_secs"), 600);
    let fresh_for = field(o, "fresh_for_secs").as_u64().unwrap();
    assert!((540..=600).contains(&fresh_for), "{fresh_for}");
    assert_eq!(field(o, "stale_for_secs"), 0);
    assert_eq!(field(o, "stale_while_revalidate_secs"), 30);
    assert_eq!(field(o, "stale_if_error_secs"), 3600, "the configured window");
    assert!(field(o, "soft_purged_at").is_null());
    assert_eq!(field(o, "verdict"), "fresh");
    assert_eq!(field(o, "revalidation"), "conditional");
    assert_eq!(field(o, "if_app_fails"), "stale-if-error");
    assert!(
        field(o, "why").as_array().unwrap()[0]
            .as_str()
            .unwrap()
            .starts_with("fresh for")
    );
    assert_eq!(field(o, "vary"), &serde_json::json!([]));

    // Soft-purged: stale from now, within stale-while-revalidate.
    assert_eq!(
        admin_post(&sc, "/purge?url=/i.js&soft=true").await,
        (200, r#"{"marked":1}"#.into())
    );
    let report = inspect().await;
    let o = &field(&report, "objects")[0];
    assert_eq!(field(o, "verdict"), "stale-usable");
    assert_eq!(field(o, "fresh_for_secs"), 0);
    assert!(httpdate::parse_http_date(field(o, "soft_purged_at").as_str().unwrap()).is_ok());
    assert!(field(o, "why")[0].as_str().unwrap().starts_with("soft-purged at"));

    // The CLI: the same JSON with --json, text otherwise; a host narrows a path.
    let out = cli(&["inspect", "/i.js", "--json", "--target", &admin, "--token", TOKEN]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cli_report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(field(&cli_report["objects"][0], "verdict"), "stale-usable");
    let out = cli(&["inspect", "/i.js", "--target", &admin, "--token", TOKEN]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("verdict      stale-usable"), "{text}");
    assert!(text.contains("tags         inspect-me js"), "{text}");
    let out = cli(&[
        "inspect",
        "/i.js",
        "--host",
        "other.example",
        "--target",
        &admin,
        "--token",
        TOKEN,
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("nothing stored for /i.js\n"), "{text}");
    assert!(text.contains("  why: not recorded per URL"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_says_what_can_be_said_about_why_nothing_is_stored() {
    use sidecache::rules::{RawRule, Rule};
    let origin = Origin::start().await;
    let sc = TestSidecar::start_with(&origin.url(), |c| {
        c.rules = vec![
            Rule::compile(RawRule {
                name: Some("api".into()),
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
    let proxy = &sc.sidecar.proxy;
    let bypassed = sidecache::inspect::report(proxy, "/api/feed", Some("app.example")).await;
    assert!(bypassed.objects.is_empty());
    assert_eq!(
        bypassed.nothing_stored_because,
        ["the path is under rule `api`, which bypasses the cache: it is never stored"]
    );
    let unknown = sidecache::inspect::report(proxy, "/never.js", None).await;
    let why = unknown.nothing_stored_because.join("\n");
    assert!(why.contains("without --host"), "{why}");
    assert!(
        why.contains("never requested") && why.contains("may not be stored"),
        "{why}"
    );
    // Something stored: no excuses.
    origin.fixed("/kept.js", &[("cache-control", "max-age=60")], "kept");
    let resp = crate::support::app_client()
        .get(sc.url("/kept.js"))
        .send()
        .await
        .unwrap();
    resp.bytes().await.unwrap();
    let stored = async || {
        !sidecache::inspect::report(proxy, "/kept.js", None)
            .await
            .objects
            .is_empty()
    };
    assert!(crate::support::eventually(Duration::from_secs(10), stored).await);
    let kept = sidecache::inspect::report(proxy, "/kept.js", None).await;
    assert!(kept.nothing_stored_because.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_counts_add_up_to_exactly_the_requests_sent() {
    let origin = Origin::start().await;
    origin.fixed("/assets/a.js", &[("content-type", "text/javascript")], "a".repeat(1000));
    origin.fixed("/api/me", &[("content-type", "application/json")], "{}");
    origin.fixed(
        "/page.html",
        &[CACHEABLE, ("content-type", "text/html")],
        "p".repeat(300),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sidecache.yaml");
    std::fs::write(
        &config,
        "rules:\n  - name: assets\n    match: /assets/**\n    ttl: 1h\n  - match: /api/**\n    bypass: true\n",
    )
    .unwrap();
    let config = config.to_str().unwrap().to_owned();
    let (_bin, addr, admin) = start_binary(&origin, &dir.path().join("cache"), &["--config", &config]).await;
    let c = app_client();
    let url = |p: &str| format!("http://{addr}{p}");
    // rule -> (requests, body bytes the client received)
    let mut sent = std::collections::HashMap::<&str, (u64, u64)>::new();
    let mut send = async |rule, req: reqwest::RequestBuilder| {
        let n = req.send().await.unwrap().bytes().await.unwrap().len() as u64;
        let e = sent.entry(rule).or_default();
        e.0 += 1;
        e.1 += n;
    };
    send("assets", c.get(url("/assets/a.js"))).await;
    assert!(eventually(Duration::from_secs(10), async || objects(&admin).await == 1.0).await);
    for _ in 0..3 {
        send("assets", c.get(url("/assets/a.js"))).await;
    }
    send("assets", c.head(url("/assets/a.js"))).await;
    send("assets", c.get(url("/assets/missing.js"))).await;
    for _ in 0..3 {
        send("rule-2", c.get(url("/api/me"))).await;
    }
    send("rule-2", c.post(url("/api/me")).body("x")).await;
    for _ in 0..2 {
        send("none", c.get(url("/page.html"))).await;
    }
    send("none", c.get(url("/nowhere"))).await;
    let total = sent.values().map(|v| v.0).sum::<u64>() as f64;
    assert_eq!(total, 13.0);
    let text = scrape(admin.trim_start_matches("http://").parse().unwrap()).await;
    assert_eq!(
        metric(&text, "sidecache_requests_total", &[]),
        total,
        "each request once"
    );
    assert_eq!(
        metric(&text, "sidecache_rule_requests_total", &[]),
        total,
        "each request once"
    );
    for (rule, (requests, bytes)) in &sent {
        let label = format!("rule=\"{rule}\"");
        assert_eq!(
            metric(&text, "sidecache_rule_requests_total", &[&label]),
            *requests as f64,
            "{rule}"
        );
        assert_eq!(
            metric(&text, "sidecache_rule_sent_bytes_total", &[&label]),
            *bytes as f64,
            "{rule}"
        );
    }
    // The asset rule's hits are counted as hits.
    assert_eq!(
        metric(
            &text,
            "sidecache_rule_requests_total",
            &["rule=\"assets\"", "outcome=\"hit\""]
        ),
        4.0,
        "three GETs and a HEAD after the fill"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_past_the_index_memory_budget_are_served_not_stored_and_purge_still_finds_every_stored_one() {
    const BUDGET: f64 = 40_960.0;
    const N: usize = 10;
    let origin = Origin::start().await;
    // Each object: the shared tag `all` and 31 long tags of its own (as an app deriving tags
    // from request data would make): ~11 KB of the tag index each, so three fit in 40 KiB.
    for i in 0..N {
        let own: Vec<String> = (0..31).map(|j| format!("o{i}-t{j}-{}", "x".repeat(190))).collect();
        let header = format!("all {}", own.join(" "));
        origin.route(
            &format!("/o{i}.css"),
            Behaviour::Fixed {
                status: 200,
                headers: owned(&[CACHEABLE])
                    .into_iter()
                    .chain([("surrogate-key".to_owned(), header)])
                    .collect(),
                body: Bytes::from(format!("object {i} ").repeat(100)),
            },
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let mut bin = Binary::serve(
        &origin.url(),
        &cache,
        &[],
        &[
            ("SIDECACHE_ACCESS_LOG", "false"),
            ("SIDECACHE_ADMIN_TOKEN", TOKEN),
            ("SIDECACHE_MIN_FREE", "0"),
            ("SIDECACHE_MAX_TAG_INDEX_MEMORY", "40KiB"),
        ],
    );
    let (addr, admin_addr) = (bin.public_addr(), bin.admin_addr());
    crate::support::wait_ready(admin_addr).await;
    let admin = format!("http://{admin_addr}");
    for i in 0..N {
        let resp = app_client()
            .get(format!("http://{addr}/o{i}.css"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "served, stored or not");
        assert_eq!(resp.text().await.unwrap(), format!("object {i} ").repeat(100));
        let held = metric(&scrape(admin_addr).await, "sidecache_tag_index_bytes", &[]);
        assert!(held <= BUDGET, "the tag index holds {held} bytes, over its budget");
    }
    let counted = eventually(Duration::from_secs(10), async || {
        metric(
            &scrape(admin_addr).await,
            "sidecache_tags_refused_total",
            &[r#"reason="memory""#],
        ) == 7.0
    })
    .await;
    let text = scrape(admin_addr).await;
    assert!(
        counted,
        "refused for memory: {}",
        metric(&text, "sidecache_tags_refused_total", &[])
    );
    assert_eq!(metric(&text, "sidecache_cache_objects", &[]), 3.0);
    assert!(metric(&text, "sidecache_tag_index_bytes", &[]) > BUDGET * 0.75);
    assert_eq!(
        object_files(&cache, 3).await,
        3,
        "a refused object leaves nothing stored"
    );
    // The first three are hits; the others go to the app again (never stored, so never
    // served past a purge of a tag they would have lost).
    for i in 0..N {
        let resp = app_client()
            .get(format!("http://{addr}/o{i}.css"))
            .send()
            .await
            .unwrap();
        let cs = resp.headers()["cache-status"].to_str().unwrap().to_owned();
        assert_eq!(cs == "sidecache; hit", i < 3, "/o{i}.css: {cs}");
    }
    // Purge by the shared tag: every stored object carrying it goes.
    let out = cli(&["purge", "--tag", "all", "--target", &admin, "--token", TOKEN]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), r#"{"purged":3}"#);
    assert!(eventually(Duration::from_secs(10), async || objects(&admin).await == 0.0).await);
    assert!(
        eventually(Duration::from_secs(10), async || {
            metric(&scrape(admin_addr).await, "sidecache_tag_index_bytes", &[]) == 0.0
        })
        .await,
        "the purged objects' tags are let go"
    );
    for i in 0..N {
        let resp = app_client()
            .get(format!("http://{addr}/o{i}.css"))
            .send()
            .await
            .unwrap();
        assert!(resp.headers()["cache-status"].to_str().unwrap().contains("fwd="));
    }
}
