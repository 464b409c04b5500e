//! Issue 15, finding 9: the admin port's prime fills only from `prime_sources`, never follows
//! a redirect off them, and beyond loopback the admin port needs its token, which the CLI's
//! prime and purge send. Real sockets: an app, an allowed source, and a second server that
//! must never be asked.

use std::process::Command;
use std::time::Duration;

use reqwest::StatusCode;
use sidecache::sources::PrimeSources;

use crate::support::{Behaviour, Origin, TestSidecar, app_client, binary_path, client, eventually};

const ASSET: &[(&str, &str)] = &[("cache-control", "public, max-age=31536000")];

fn allow(entries: &[String]) -> PrimeSources {
    PrimeSources::parse(entries).unwrap()
}

/// `POST /prime` on the admin port; the status and the streamed NDJSON lines.
async fn prime(sc: &TestSidecar, from: &str, targets: &str) -> (StatusCode, Vec<serde_json::Value>) {
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("host", "app.example")
        .append_pair("from", from)
        .finish();
    let resp = client()
        .post(sc.admin_url(&format!("/prime?{query}")))
        .body(targets.to_owned())
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    let lines = if status.is_success() {
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    } else {
        Vec::new()
    };
    (status, lines)
}

/// Nothing is stored under `path`: no object in the cache, and a client is answered by the
/// app, not from the cache.
async fn assert_not_stored(sc: &TestSidecar, app: &Origin, path: &str) {
    assert_eq!(sc.sidecar.proxy.cache().stats().0, 0, "no object stored");
    let before = app.hits(path);
    let resp = app_client().get(sc.url(path)).send().await.unwrap();
    assert_ne!(resp.headers()["cache-status"], "sidecache; hit", "{path}");
    assert_eq!(app.hits(path), before + 1, "{path}: the app answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prime_from_outside_the_allow_list_is_refused_and_fetches_nothing() {
    let app = Origin::start().await;
    let cdn = Origin::start().await;
    let elsewhere = Origin::start().await;
    for o in [&cdn, &elsewhere] {
        o.fixed("/assets/evil.js", ASSET, "poison");
        o.fixed("/secret/evil.js", ASSET, "poison");
        o.fixed("/assets2/evil.js", ASSET, "poison");
    }
    let sources = allow(&[format!("{}/assets", cdn.url())]);
    let sc = TestSidecar::start_with(&app.url(), |c| c.prime_sources = sources).await;

    let outside = [
        elsewhere.url(),                                        // another server
        format!("http://localhost:{}/assets", cdn.addr.port()), // another host name
        format!("https://{}/assets", cdn.addr),                 // another scheme
        format!("{}/secret", cdn.url()),                        // outside the path
        format!("{}/assets2", cdn.url()),                       // not a segment boundary
        format!("{}/assets/%2e%2e/secret", cdn.url()),          // climbing out
        format!("{}/assets?x=1", cdn.url()),                    // not a base
        "file:///etc/passwd".into(),                            // not http
        "ftp://127.0.0.1/".into(),                              // not http
    ];
    for from in &outside {
        let (status, _) = prime(&sc, from, "/evil.js\n").await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{from}");
    }
    // Inside the allow-list as a base, but the path joined to it climbs out: that object
    // fails, and the server is not asked for it.
    let (status, lines) = prime(&sc, &format!("{}/assets", cdn.url()), "/../secret/evil.js\n").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(lines[0]["result"], "failed", "{lines:?}");

    assert_eq!(elsewhere.total_hits(), 0, "the other server saw no request");
    assert_eq!(cdn.total_hits(), 0, "the source saw no request outside its prefix");
    assert_not_stored(&sc, &app, "/evil.js").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_prime_sources_no_source_is_allowed() {
    let app = Origin::start().await;
    let cdn = Origin::start().await;
    cdn.fixed("/a.js", ASSET, "from the cdn");
    let sc = TestSidecar::start(&app.url()).await;
    let (status, _) = prime(&sc, &cdn.url(), "/a.js\n").await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(cdn.total_hits(), 0);
    assert_not_stored(&sc, &app, "/a.js").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prime_never_follows_a_redirect_off_the_allow_list() {
    let app = Origin::start().await;
    let cdn = Origin::start().await;
    let elsewhere = Origin::start().await;
    elsewhere.fixed("/poison.js", ASSET, "poison");
    let redirect = |to: String| Behaviour::Fixed {
        status: 302,
        headers: vec![("location".into(), to)],
        body: Default::default(),
    };
    cdn.route("/builds/off.js", redirect(format!("{}/poison.js", elsewhere.url())));
    cdn.route("/builds/up.js", redirect(format!("{}/poison.js", cdn.url())));
    let sources = allow(&[format!("{}/builds", cdn.url())]);
    let sc = TestSidecar::start_with(&app.url(), |c| c.prime_sources = sources).await;

    let (status, lines) = prime(&sc, &format!("{}/builds", cdn.url()), "/off.js\n/up.js\n").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(lines.len(), 2);
    for line in &lines {
        assert_eq!(line["result"], "failed", "{lines:?}");
    }
    assert_eq!(cdn.hits("/builds/off.js"), 1);
    assert_eq!(cdn.hits("/builds/up.js"), 1);
    assert_eq!(
        elsewhere.total_hits(),
        0,
        "the redirect target off the list saw no request"
    );
    assert_eq!(cdn.hits("/poison.js"), 0, "nor the same server outside the prefix");
    assert_not_stored(&sc, &app, "/off.js").await;
    assert_not_stored(&sc, &app, "/up.js").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prime_from_an_allowed_source_fills_and_follows_redirects_inside_it() {
    let app = Origin::start().await;
    let cdn = Origin::start().await;
    cdn.fixed("/builds/42/app-1a2b.js", ASSET, "from the cdn");
    cdn.route(
        "/builds/42/old.js",
        Behaviour::Fixed {
            status: 301,
            headers: vec![("location".into(), format!("{}/builds/42/app-1a2b.js", cdn.url()))],
            body: Default::default(),
        },
    );
    let sources = allow(&[format!("{}/builds/", cdn.url())]);
    let sc = TestSidecar::start_with(&app.url(), |c| c.prime_sources = sources).await;

    let (status, lines) = prime(&sc, &format!("{}/builds/42", cdn.url()), "/app-1a2b.js\n/old.js\n").await;
    assert_eq!(status, StatusCode::OK);
    assert!(lines.iter().all(|l| l["result"] == "warmed"), "{lines:?}");
    for p in ["/app-1a2b.js", "/old.js"] {
        let resp = app_client().get(sc.url(p)).send().await.unwrap();
        assert_eq!(resp.headers()["cache-status"], "sidecache; hit", "{p}");
        assert_eq!(resp.text().await.unwrap(), "from the cdn");
    }
    assert_eq!(
        cdn.hits("/builds/42/app-1a2b.js"),
        2,
        "once directly, once through the redirect"
    );
    assert_eq!(app.total_hits(), 0, "the app was never asked");
}

#[test]
fn admin_beyond_loopback_without_a_token_is_refused_at_startup() {
    // check-config validates exactly what serve validates before binding anything; no
    // non-loopback address is bound here.
    let check = |args: &[&str], env: &[(&str, &str)]| {
        Command::new(binary_path())
            .arg("check-config")
            .args(args)
            .env_clear()
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    for (args, env) in [
        (&["--admin-listen", "0.0.0.0:0"][..], &[][..]),
        (&[][..], &[("SIDECACHE_ADMIN_LISTEN", "[::]:0")][..]),
        (
            &["--admin-listen", "10.0.0.1:6083"][..],
            &[("SIDECACHE_ADMIN_TOKEN", "")][..],
        ),
    ] {
        let out = check(args, env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?} {env:?}: {err}");
        assert!(err.contains("admin_token") && err.contains("loopback"), "{err}");
    }
    let ok = check(&["--admin-listen", "0.0.0.0:0"], &[("SIDECACHE_ADMIN_TOKEN", "t0ken")]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let ok = check(&["--admin-listen", "127.0.0.1:0"], &[]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_prime_and_purge_send_the_token_from_the_configuration() {
    let app = Origin::start().await;
    app.fixed("/t-1a2b3c4d.js", ASSET, "asset");
    let token = "s3cret-admin-token";
    let sc = TestSidecar::start_with(&app.url(), |c| c.admin_token = Some(token.into())).await;
    // The sidecar's own configuration file: its admin address and token.
    let config = sc.dir.path().join("sidecache.yaml");
    std::fs::write(&config, format!("admin_listen: {}\nadmin_token: {token}\n", sc.admin)).unwrap();
    let config = config.to_str().unwrap();
    let run = |args: &[&str], env: &[(&str, &str)], stdin: &str| {
        use std::io::Write as _;
        let mut child = Command::new(binary_path())
            .args(args)
            .env_remove("SIDECACHE_ADMIN_TOKEN")
            .env_remove("SIDECACHE_CONFIG")
            .env_remove("SIDECACHE_ADMIN_LISTEN")
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };

    // prime: address and token both from --config.
    let out = tokio::task::block_in_place(|| {
        run(
            &[
                "prime",
                "--config",
                config,
                "--urls",
                "-",
                "--host",
                "app.example",
                "--retries",
                "0",
                "--wait",
                "10s",
            ],
            &[],
            "/t-1a2b3c4d.js\n",
        )
    });
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(app.hits("/t-1a2b3c4d.js"), 1);
    let resp = app_client().get(sc.url("/t-1a2b3c4d.js")).send().await.unwrap();
    assert_eq!(resp.headers()["cache-status"], "sidecache; hit");

    // purge without the token is refused: the token is what makes it through.
    let admin = sc.admin_url("");
    let out = tokio::task::block_in_place(|| run(&["purge", "--all", "--target", &admin], &[], ""));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sc.sidecar.proxy.cache().stats().0, 1);

    // purge: the token from SIDECACHE_CONFIG, as in a container that runs the sidecar with it.
    let out = tokio::task::block_in_place(|| {
        run(
            &["purge", "--all", "--target", &admin],
            &[("SIDECACHE_CONFIG", config)],
            "",
        )
    });
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), r#"{"purged":1}"#);
    assert!(eventually(Duration::from_secs(5), async || sc.sidecar.proxy.cache().stats().0 == 0).await);

    // And from SIDECACHE_ADMIN_TOKEN, as the deploy examples set it.
    let out = tokio::task::block_in_place(|| {
        run(
            &["purge", "--all", "--target", &admin],
            &[("SIDECACHE_ADMIN_TOKEN", token)],
            "",
        )
    });
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Issue 25, item 12: inspect never shows a credential a variant was stored for (an
/// `X-Api-Key` the app varies on, not only `Cookie` and `Authorization`): only fields known to
/// be harmless are shown as sent. And without a token, `GET /objects` needs
/// `X-Sidecache-Admin: 1`: a plain GET, which is all a URL the app is made to fetch on the same
/// loopback sends, is refused. The CLI sends the header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_hides_credentials_a_variant_varies_on_and_refuses_a_plain_get() {
    const API_KEY: &str = "sk-live-alice-7c1e0d93b5a24f68";
    let app = Origin::start().await;
    app.fixed(
        "/k.js",
        &[
            ("cache-control", "public, max-age=600"),
            ("vary", "X-Api-Key, Accept-Language"),
        ],
        "for alice's key",
    );
    // No token: the admin port is on loopback, as by default.
    let sc = TestSidecar::start(&app.url()).await;
    let resp = app_client()
        .get(sc.url("/k.js"))
        .header("x-api-key", API_KEY)
        .header("accept-language", "de-CH")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        eventually(Duration::from_secs(10), async || sc.sidecar.proxy.cache().stats().0
            == 1)
        .await
    );

    // A plain GET, as an SSRF through the app would send it: refused, nothing listed.
    let plain = client().get(sc.admin_url("/objects?url=/k.js")).send().await.unwrap();
    assert_eq!(plain.status(), StatusCode::FORBIDDEN);
    assert!(!plain.text().await.unwrap().contains("/k.js"));

    let resp = client()
        .get(sc.admin_url("/objects?url=/k.js"))
        .header("x-sidecache-admin", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await.unwrap();
    assert!(!text.contains("alice"), "the key was shown: {text}");
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    let vary = &report["objects"][0]["vary"];
    assert_eq!(vary[1], serde_json::json!(["accept-language", "de-ch"]), "{vary}");
    let shown = vary[0][1].as_str().unwrap();
    assert!(
        shown.starts_with(&format!("({} bytes, keyed digest ", API_KEY.len())),
        "{shown}"
    );

    // The real binary's CLI reaches it without a token, and prints no key either.
    let admin = sc.admin_url("");
    let out = tokio::task::block_in_place(|| {
        Command::new(binary_path())
            .args(["inspect", "/k.js", "--target", &admin])
            .output()
            .unwrap()
    });
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(printed.contains("vary         x-api-key: (30 bytes"), "{printed}");
    assert!(!printed.contains("alice"), "{printed}");
}
