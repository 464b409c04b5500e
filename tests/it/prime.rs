//! `sidecache prime` and `serve --prime`: every input kind against a real origin, through the
//! admin port of a running sidecar; the sidecar fetches, the command follows.

use std::path::Path;
use std::time::Duration;

use crate::support::{Binary, Origin, TestSidecar, app_client, binary_path, eventually};

const ASSET: &[(&str, &str)] = &[("cache-control", "public, max-age=31536000")];

pub(crate) struct Run {
    pub(crate) code: i32,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

pub(crate) async fn prime(admin: &str, args: &[&str], stdin: Option<&str>) -> Run {
    prime_as(admin, "app.example", args, stdin).await
}

/// `sidecache prime --host HOST ...` against the admin port `admin`.
pub(crate) async fn prime_as(admin: &str, host: &str, args: &[&str], stdin: Option<&str>) -> Run {
    let mut cmd = tokio::process::Command::new(binary_path());
    cmd.arg("prime")
        .args(["--target", admin, "--host", host, "--retries", "1"])
        .args(args);
    cmd.stdin(if stdin.is_some() {
        std::process::Stdio::piped()
    } else {
        std::process::Stdio::null()
    });
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(text) = stdin {
        use tokio::io::AsyncWriteExt;
        let mut pipe = child.stdin.take().unwrap();
        // A child that refuses its arguments exits before it reads its input: the write then
        // finds the pipe closed, and its exit code and output are what the test checks.
        match pipe.write_all(text.as_bytes()).await {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            written => written.unwrap(),
        }
    }
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub(crate) async fn assert_all_hits(sc: &TestSidecar, origin: &Origin, paths: &[&str]) {
    for p in paths {
        let resp = app_client().get(sc.url(p)).send().await.unwrap();
        assert_eq!(resp.headers()["cache-status"], "sidecache; hit", "{p}");
        assert_eq!(resp.text().await.unwrap(), format!("asset {p}"));
        assert_eq!(origin.hits(p), 1, "{p} fetched once");
    }
}

pub(crate) fn serve_assets(origin: &Origin, paths: &[&str]) {
    for p in paths {
        origin.fixed(p, ASSET, format!("asset {p}"));
    }
}

/// Writes `text` to `dir/name` (creating folders) and returns the path.
fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_manifest_format_warms_every_asset_once_and_a_second_run_fetches_nothing() {
    let origin = Origin::start().await;
    let sc = TestSidecar::start(&origin.url()).await;
    let admin = sc.admin_url("");
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "webpack/manifest.json",
            r#"{"main.js": "/static/js/main.1a2b3c4d.js", "main.css": "/static/css/main.5e6f7a8b.css"}"#,
            &["/static/js/main.1a2b3c4d.js", "/static/css/main.5e6f7a8b.css"],
        ),
        (
            "public/.vite/manifest.json",
            r#"{"index.html": {"file": "assets/index-4889e940.js", "css": ["assets/index-b82dbe22.css"],
                "assets": ["assets/logo-03d6d6da.svg"], "isEntry": true}}"#,
            &[
                "/assets/index-4889e940.js",
                "/assets/index-b82dbe22.css",
                "/assets/logo-03d6d6da.svg",
            ],
        ),
        (
            "rails/.sprockets-manifest-9f8e7d.json",
            r#"{"files": {"application-aa11bb22.js": {"logical_path": "application.js"}},
                "assets": {"application.js": "application-aa11bb22.js"}}"#,
            &["/assets/application-aa11bb22.js"],
        ),
        (
            "propshaft/.manifest.json",
            r#"{"application.css": "application-6d58c9e6.css"}"#,
            &["/assets/application-6d58c9e6.css"],
        ),
        (
            "django/staticfiles.json",
            r#"{"paths": {"css/base.css": "css/base.5af66c1b1797.css"}, "version": "1.1"}"#,
            &["/static/css/base.5af66c1b1797.css"],
        ),
    ];
    for (name, manifest, paths) in cases {
        serve_assets(&origin, paths);
        let file = write(dir.path(), name, manifest);
        let run = prime(&admin, &["--manifest", &file], None).await;
        assert_eq!(run.code, 0, "{name}: {}", run.stderr);
        assert!(
            run.stdout
                .contains(&format!("{} warmed, 0 already warm, 0 failed", paths.len())),
            "{name}: {}",
            run.stdout
        );
        assert_all_hits(&sc, &origin, paths).await;
        let again = prime(&admin, &["--manifest", &file, "--json"], None).await;
        assert_eq!(again.code, 0);
        let summary: serde_json::Value = serde_json::from_str(again.stdout.trim()).unwrap();
        assert_eq!(summary["warmed"], 0, "{name}: idempotent");
        assert_eq!(summary["warm"], paths.len(), "{name}");
        for p in *paths {
            assert_eq!(origin.hits(p), 1, "{name}: {p} not fetched again");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_on_stdin_a_folder_and_a_sitemap_are_primed() {
    let origin = Origin::start().await;
    let sc = TestSidecar::start(&origin.url()).await;
    let admin = sc.admin_url("");
    serve_assets(&origin, &["/a.js", "/b.css"]);
    let run = prime(&admin, &["--urls", "-"], Some("/a.js\n# a comment\n\n/b.css\n")).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_all_hits(&sc, &origin, &["/a.js", "/b.css"]).await;

    let public = tempfile::tempdir().unwrap();
    write(public.path(), "img/logo.png", "png");
    write(public.path(), "app.js", "js");
    write(public.path(), "app.js.gz", "gz twin, not requested by clients");
    // A build tool's own files, which the app does not serve (a 404 each if asked).
    write(public.path(), ".vite/manifest.json", "{}");
    write(public.path(), "img/.DS_Store", "finder");
    serve_assets(&origin, &["/static/img/logo.png", "/static/app.js"]);
    let run = prime(
        &admin,
        &["--dir", public.path().to_str().unwrap(), "--prefix", "/static"],
        None,
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(run.stdout.contains("primed 2 of 2 objects: 2 warmed"), "{}", run.stdout);
    assert_eq!(origin.total_hits(), 4, "no dot-file was asked for");
    assert_all_hits(&sc, &origin, &["/static/img/logo.png", "/static/app.js"]).await;

    // The sitemap's public URL does not resolve from here (`.example` is reserved): it is read
    // through the sidecar, from its app, under the Host it names.
    serve_assets(&origin, &["/page-a", "/page-b"]);
    let sitemap = "<urlset><url><loc>http://app.example/page-a</loc></url><url><loc>http://app.example/page-b</loc></url></urlset>";
    origin.fixed("/sitemap.xml", &[("content-type", "application/xml")], sitemap);
    let run = prime(&admin, &["--sitemap", "http://app.example/sitemap.xml"], None).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(origin.hits("/sitemap.xml"), 1);
    assert_eq!(origin.last_headers("/sitemap.xml").unwrap()["host"], "app.example");
    assert_all_hits(&sc, &origin, &["/page-a", "/page-b"]).await;

    // A sitemap path is read under --host.
    origin.fixed("/other-sitemap.xml", &[("content-type", "application/xml")], sitemap);
    let run = prime_as(
        &admin,
        "https://www.example.com",
        &["--sitemap", "/other-sitemap.xml"],
        None,
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(
        origin.last_headers("/other-sitemap.xml").unwrap()["host"],
        "www.example.com"
    );
    assert!(
        run.stdout.contains("0 warmed, 2 already warm, 0 failed"),
        "{}",
        run.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_with_a_scheme_is_a_host_reached_over_that_scheme() {
    let origin = Origin::start().await;
    serve_assets(&origin, &["/s.js", "/p.js"]);
    let sc = TestSidecar::start_with(&origin.url(), |c| c.trust_forwarded = true).await;
    let admin = sc.admin_url("");
    let run = prime_as(&admin, "https://www.example.com/", &["--urls", "-"], Some("/s.js\n")).await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("primed 1 of 1 objects: 1 warmed"), "{}", run.stdout);
    let sent = origin.last_headers("/s.js").unwrap();
    assert_eq!(sent["host"], "www.example.com", "the scheme is not part of the Host");
    let https = crate::support::app_client_for("www.example.com")
        .get(sc.url("/s.js"))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    assert_eq!(https.headers()["cache-status"], "sidecache; hit");

    // http:// keys by http: the https key stays cold.
    let run = prime_as(&admin, "http://www.example.com", &["--urls", "-"], Some("/p.js\n")).await;
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let get = async |proto: &str| {
        let resp = crate::support::app_client_for("www.example.com")
            .get(sc.url("/p.js"))
            .header("x-forwarded-proto", proto)
            .send()
            .await
            .unwrap();
        resp.headers()["cache-status"].to_str().unwrap().to_owned()
    };
    assert_eq!(get("http").await, "sidecache; hit");
    assert_ne!(get("https").await, "sidecache; hit");
    assert_eq!(origin.hits("/s.js"), 1);

    for bad in [
        "https://www.example.com/app",
        "ftp://www.example.com",
        "user@www.example.com",
        "",
    ] {
        let run = prime_as(&admin, bad, &["--urls", "-"], Some("/s.js\n")).await;
        assert_eq!(run.code, 64, "--host `{bad}`: {}", run.stderr);
        assert!(run.stderr.contains("is not a host"), "{}", run.stderr);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_assets_are_named_and_fail_the_exit_status() {
    let origin = Origin::start().await;
    let sc = TestSidecar::start(&origin.url()).await;
    serve_assets(&origin, &["/here.js"]);
    let run = prime(&sc.admin_url(""), &["--urls", "-"], Some("/here.js\n/missing-1.js\n")).await;
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("failed: /missing-1.js: status 404"),
        "{}",
        run.stderr
    );
    assert!(
        run.stdout
            .contains("primed 1 of 2 objects: 1 warmed, 0 already warm, 1 failed"),
        "{}",
        run.stdout
    );
    // The progress says what is settled, failures included, never "primed 2/2".
    assert!(run.stderr.contains("prime: 2/2 done, 1 failed"), "{}", run.stderr);
    assert!(!run.stderr.contains("primed 2/2"), "{}", run.stderr);
    assert_eq!(origin.hits("/missing-1.js"), 1, "a 404 is not retried");
    let tolerant = prime(
        &sc.admin_url(""),
        &["--urls", "-", "--max-failures", "1"],
        Some("/missing-1.js\n"),
    )
    .await;
    assert_eq!(tolerant.code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priming_started_before_the_sidecar_waits_for_it() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let origin = Origin::start().await;
    serve_assets(&origin, &["/early.js"]);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let admin = format!("http://127.0.0.1:{port}");
    let mut child = tokio::process::Command::new(binary_path())
        .args([
            "prime",
            "--target",
            &admin,
            "--host",
            "app.example",
            "--urls",
            "-",
            "--wait",
            "60s",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"/early.js\n").await.unwrap();
    // Nothing listens on the admin port until the command says it is waiting.
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let waiting = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = stderr.next_line().await.unwrap() {
            if line.contains("waiting for the sidecar") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(waiting, Ok(true), "prime reports that it waits");
    let dir = tempfile::tempdir().unwrap();
    let admin_listen = format!("127.0.0.1:{port}");
    let cache_dir = dir.path().to_str().unwrap();
    let mut bin = Binary::spawn(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            &admin_listen,
            "--upstream",
            &origin.url(),
            "--cache-dir",
            cache_dir,
        ],
        &[("SIDECACHE_ACCESS_LOG", "false")],
    );
    let addr = bin.public_addr();
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
    let resp = app_client()
        .get(format!("http://{addr}/early.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["cache-status"], "sidecache; hit");
    assert_eq!(origin.hits("/early.js"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_prime_warms_in_the_background_without_a_hook() {
    let origin = Origin::start().await;
    serve_assets(&origin, &["/boot-1.js", "/boot-2.css"]);
    let dir = tempfile::tempdir().unwrap();
    let list = write(dir.path(), "prime.txt", "/boot-1.js\n/boot-2.css\n");
    let cache = dir.path().join("cache");
    let mut bin = Binary::serve(
        &origin.url(),
        &cache,
        &["--prime", &list, "--prime-host", "app.example"],
        &[("SIDECACHE_ACCESS_LOG", "false")],
    );
    let addr = bin.public_addr();
    bin.wait_line("primed");
    assert!(eventually(Duration::from_secs(10), async || origin.hits("/boot-2.css") == 1).await);
    for p in ["/boot-1.js", "/boot-2.css"] {
        let resp = app_client().get(format!("http://{addr}{p}")).send().await.unwrap();
        assert_eq!(resp.headers()["cache-status"], "sidecache; hit", "{p}");
        assert_eq!(origin.hits(p), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_fills_from_another_source_not_the_app() {
    let app = Origin::start().await;
    let cdn = Origin::start().await;
    serve_assets(&cdn, &["/cdn/app-1a2b3c4d.js", "/cdn/site-5e6f7a8b.css"]);
    let sources = sidecache::sources::PrimeSources::parse(&[cdn.url()]).unwrap();
    let sc = TestSidecar::start_with(&app.url(), |c| c.prime_sources = sources).await;
    let run = prime(
        &sc.admin_url(""),
        &["--urls", "-", "--from", &cdn.url()],
        Some("/cdn/app-1a2b3c4d.js\n/cdn/site-5e6f7a8b.css\n"),
    )
    .await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    for p in ["/cdn/app-1a2b3c4d.js", "/cdn/site-5e6f7a8b.css"] {
        let resp = app_client().get(sc.url(p)).send().await.unwrap();
        assert_eq!(resp.headers()["cache-status"], "sidecache; hit", "{p}");
        assert_eq!(resp.text().await.unwrap(), format!("asset {p}"));
        assert_eq!(cdn.hits(p), 1);
        assert_eq!(app.hits(p), 0, "the app was never asked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_tls_router_priming_keys_like_https_traffic() {
    let origin = Origin::start().await;
    serve_assets(&origin, &["/tls.js"]);
    let sc = TestSidecar::start_with(&origin.url(), |c| c.trust_forwarded = true).await;
    let run = prime(&sc.admin_url(""), &["--urls", "-"], Some("/tls.js\n")).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    // Real traffic arrives from the router with X-Forwarded-Proto: https.
    let resp = app_client()
        .get(sc.url("/tls.js"))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["cache-status"], "sidecache; hit");
    assert_eq!(origin.hits("/tls.js"), 1);
}
