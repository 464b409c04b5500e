//! The binary's interface: configuration layers and refusal, graceful shutdown.

use std::process::Command;
use std::time::Duration;

use crate::support::{Behaviour, Binary, Origin, binary_path, client};

fn check_config(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    crate::support::run_binary(&[&["check-config"], args].concat(), env)
}

#[test]
fn precedence_is_flag_then_env_then_file_then_default() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sidecache.yaml");
    std::fs::write(&file, "max_size: 1GB\nmemory_size: 3MiB\n").unwrap();
    let f = file.to_str().unwrap();

    let (code, out, err) = check_config(&["--config", f, "--max-size", "3GB"], &[("SIDECACHE_MAX_SIZE", "2GB")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("max_size: \"3GB\"  # flag --max-size"), "flag wins: {out}");
    assert!(
        out.contains("memory_size: \"3MiB\"  # config file"),
        "file beats default: {out}"
    );

    let (_, out, _) = check_config(&["--config", f], &[("SIDECACHE_MAX_SIZE", "2GB")]);
    assert!(
        out.contains("max_size: \"2GB\"  # environment variable SIDECACHE_MAX_SIZE"),
        "env beats file: {out}"
    );

    let (_, out, _) = check_config(&["--config", f], &[]);
    assert!(
        out.contains("max_size: \"1GB\"  # config file"),
        "file beats default: {out}"
    );

    let (_, out, _) = check_config(&[], &[]);
    assert!(out.contains("max_size: \"4GB\"  # the default"), "default: {out}");

    let (_, out, _) = check_config(&[], &[("PORT", "5123")]);
    assert!(out.contains("0.0.0.0:5123"), "PORT sets the public listener: {out}");
}

/// `check-config` prints the configuration, never the admin token in it.
#[test]
fn check_config_never_prints_the_admin_token() {
    let token = "tok-4f9a2c-do-not-print";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sidecache.yaml");
    std::fs::write(&file, format!("admin_token: {token}-from-file\n")).unwrap();
    for (args, env) in [
        (vec![], vec![("SIDECACHE_ADMIN_TOKEN", token)]),
        (vec!["--config", file.to_str().unwrap()], vec![]),
    ] {
        let (code, out, err) = check_config(&args, &env);
        assert_eq!(code, 0, "{err}");
        assert!(
            err.contains("configuration is valid") && out.contains("# admin_token: <redacted>"),
            "{out}"
        );
        assert!(
            !out.contains(token) && !err.contains(token),
            "the token was printed: {out}{err}"
        );
    }
}

#[test]
fn unknown_key_is_refused_with_status_64_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, "max_size: 1GB\ncache_dri: /tmp/x\n").unwrap();
    // Hold the port: if serve tried to bind before validating, it would fail differently.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = held.local_addr().unwrap().to_string();
    let out = Command::new(binary_path())
        .args([
            "serve",
            "--config",
            file.to_str().unwrap(),
            "--listen",
            &listen,
            "--admin-listen",
            &listen,
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("cache_dri"), "names the key: {err}");
    assert!(err.contains(file.to_str().unwrap()), "names the file: {err}");
    assert!(!err.contains("in use"), "{err}");

    let (code, _, err) = check_config(&["--config", file.to_str().unwrap()], &[]);
    assert_eq!(code, 64, "check-config runs the same validation: {err}");
}

#[test]
fn bad_values_from_env_and_flags_are_refused_naming_their_source() {
    let (code, _, err) = check_config(&[], &[("SIDECACHE_MAX_SIZE", "lots")]);
    assert_eq!(code, 64);
    assert!(err.contains("max_size") && err.contains("SIDECACHE_MAX_SIZE"), "{err}");
    let (code, _, err) = check_config(&[], &[("SIDECACHE_NO_SUCH_KEY", "1")]);
    assert_eq!(code, 64);
    assert!(err.contains("SIDECACHE_NO_SUCH_KEY"), "{err}");
    let (code, _, err) = check_config(&["--listen", "not-an-address"], &[]);
    assert_eq!(code, 64);
    assert!(err.contains("--listen"), "{err}");
}

#[test]
fn config_example_is_valid_and_documents_every_key() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.yaml");
    let (code, _, err) = check_config(&["--config", example], &[]);
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(example).unwrap();
    for key in sidecache::config::RawConfig::KEYS {
        assert!(
            text.contains(&format!("\n{key}:")),
            "config.example.yaml does not document `{key}`"
        );
    }
}

/// `signal` stops accepting, lets an in-flight request finish, then exits 0.
async fn drains_an_in_flight_request_then_exits_0(signal: i32) {
    let origin = Origin::start().await;
    origin.route(
        "/slow",
        Behaviour::Delay(
            Duration::from_millis(1500),
            Box::new(Behaviour::Fixed {
                status: 200,
                headers: vec![],
                body: "finished".into(),
            }),
        ),
    );
    let cache = tempfile::tempdir().unwrap();
    let mut bin = Binary::serve(&origin.url(), cache.path(), &[], &[]);
    let addr = bin.public_addr();
    let in_flight = tokio::spawn(async move { client().get(format!("http://{addr}/slow")).send().await });
    origin.wait_hits("/slow", 1).await;

    bin.signal(signal);
    bin.wait_line("draining connections");
    // No new connections once draining.
    assert!(
        crate::support::eventually(Duration::from_secs(5), async || tokio::net::TcpStream::connect(addr)
            .await
            .is_err())
        .await,
        "still accepting after the signal"
    );
    let resp = in_flight.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "finished");
    let status = tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(10)));
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_an_in_flight_request_then_exits_0() {
    drains_an_in_flight_request_then_exits_0(libc::SIGTERM).await;
}

/// SIGQUIT is a graceful stop too, not an exit without a drain (its default action).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigquit_drains_an_in_flight_request_then_exits_0() {
    drains_an_in_flight_request_then_exits_0(libc::SIGQUIT).await;
}

/// SIGHUP reloads (nothing changed here), SIGUSR1 and SIGUSR2 are logged and change nothing:
/// sidecache keeps serving (their default action would end it at once, without a drain), and
/// SIGTERM then stops it with 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_sigusr_are_logged_and_do_not_stop_sidecache() {
    let origin = Origin::start().await;
    origin.fixed("/a.js", &[("cache-control", "max-age=60")], "a");
    let cache = tempfile::tempdir().unwrap();
    let mut bin = Binary::serve(&origin.url(), cache.path(), &[], &[("SIDECACHE_ACCESS_LOG", "false")]);
    let addr = bin.public_addr();
    bin.signal(libc::SIGHUP);
    tokio::task::block_in_place(|| bin.wait_line("configuration reloaded"));
    bin.signal(libc::SIGUSR1);
    tokio::task::block_in_place(|| bin.wait_line("signal=\"SIGUSR1\""));
    bin.signal(libc::SIGUSR2);
    tokio::task::block_in_place(|| bin.wait_line("signal=\"SIGUSR2\""));
    assert!(bin.child.try_wait().unwrap().is_none(), "sidecache exited");
    let resp = client().get(format!("http://{addr}/a.js")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "still serving");
    assert_eq!(resp.text().await.unwrap(), "a");
    bin.signal(libc::SIGTERM);
    let status = tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(10)));
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_log_ties_outcome_to_cache_status_and_hides_secrets() {
    let origin = Origin::start().await;
    origin.fixed("/a.js", &[("cache-control", "max-age=60")], "x".repeat(100));
    let cache = tempfile::tempdir().unwrap();
    let mut bin = Binary::serve(&origin.url(), cache.path(), &["--log-format", "json"], &[]);
    let addr = bin.public_addr();
    let c = client();
    let resp = c
        .get(format!("http://{addr}/a.js?token=topsecret"))
        .header("cookie", "session=cookiesecret")
        .header("authorization", "Bearer authsecret")
        .send()
        .await
        .unwrap();
    let cache_status = resp.headers()["cache-status"].to_str().unwrap().to_owned();
    resp.bytes().await.unwrap();
    let line = bin.wait_line("\"path\":\"/a.js\"");
    assert!(
        line.starts_with('{') && line.ends_with('}'),
        "one JSON object a line: {line}"
    );
    assert!(
        line.contains("\"outcome\":\"bypass\"") || line.contains("\"outcome\":\"miss\""),
        "{line}"
    );
    assert!(line.contains(&format!("\"cache_status\":\"{cache_status}\"")), "{line}");
    for secret in ["topsecret", "cookiesecret", "authsecret", "token="] {
        assert!(
            bin.seen.iter().all(|l| !l.contains(secret)),
            "{secret} leaked into the log"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_names_host_bytes_app_time_and_a_request_id_the_app_gets_too() {
    let origin = Origin::start().await;
    origin.fixed("/r.js", &[("cache-control", "public, max-age=60")], "r".repeat(1000));
    let cache = tempfile::tempdir().unwrap();
    let mut bin = Binary::serve(&origin.url(), cache.path(), &["--log-format", "json"], &[]);
    let addr = bin.public_addr();
    let c = crate::support::app_client();
    let field = |line: &str, name: &str| -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["fields"]
            .get(name)
            .or_else(|| v.get(name))
            .cloned()
            .unwrap_or_default()
    };

    // A miss without an id: one is made, the app gets it, the line names it.
    let miss = c.get(format!("http://{addr}/r.js")).send().await.unwrap();
    assert_eq!(miss.bytes().await.unwrap().len(), 1000);
    let line = bin.wait_nth_line("\"request\"", 1);
    let id = field(&line, "request_id");
    let id = id.as_str().unwrap_or_else(|| panic!("no request_id: {line}"));
    assert_eq!(id.len(), 32, "{line}");
    assert_eq!(
        origin.last_headers("/r.js").unwrap()["x-request-id"],
        id,
        "the app logs the same id"
    );
    assert_eq!(field(&line, "host"), "app.example", "{line}");
    assert_eq!(field(&line, "bytes"), 1000, "{line}");
    assert!(
        field(&line, "upstream_micros").as_u64().is_some(),
        "the app was asked: {line}"
    );

    // A hit with the router's id: that id, and no time on the app. (Asked again, each time
    // with its own id, while the fill is still being committed: bounded.)
    let mut id = String::new();
    for attempt in 0..100 {
        id = format!("router-7f3e-{attempt}");
        let hit = c
            .get(format!("http://{addr}/r.js"))
            .header("x-request-id", &id)
            .send()
            .await
            .unwrap();
        let status = hit.headers()["cache-status"].to_str().unwrap().to_owned();
        assert_eq!(hit.bytes().await.unwrap().len(), 1000);
        if status == "sidecache; hit" {
            break;
        }
    }
    let line = bin.wait_line(&format!("\"request_id\":\"{id}\""));
    assert!(line.contains("\"cache_status\":\"sidecache; hit\""), "{line}");
    assert_eq!(field(&line, "bytes"), 1000, "{line}");
    assert!(
        field(&line, "upstream_micros").is_null(),
        "a hit does not ask the app: {line}"
    );

    // A HEAD: no body, the line is written at once.
    let head = c
        .head(format!("http://{addr}/r.js"))
        .header("x-request-id", "head-1")
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    let line = bin.wait_line("\"request_id\":\"head-1\"");
    assert_eq!(field(&line, "bytes"), 0, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_removes_its_cache_directory_when_it_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let tmpdir = tmp.path().to_str().unwrap();
    let mut bin = Binary::spawn(
        &["demo", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
        &[("TMPDIR", tmpdir), ("SIDECACHE_ACCESS_LOG", "false")],
    );
    let addr = bin.public_addr();
    let c = crate::support::app_client();
    for _ in 0..2 {
        let resp = c
            .get(format!("http://{addr}/assets/app-3f2a9c81.js"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
    }
    let dir = tmp.path().join(format!("sidecache-demo-{}", bin.child.id()));
    assert!(dir.is_dir(), "the demo caches in {}", dir.display());
    bin.signal(libc::SIGTERM);
    let status = tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(30)));
    assert_eq!(status.code(), Some(0));
    assert!(!dir.exists(), "{} left behind", dir.display());
}
