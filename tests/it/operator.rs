//! Issue 28, "the operator's day": what an operator runs, run as they would (the binary, real
//! signals, the shipped deploy files' layouts).

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::{Binary, Origin, app_client, eventually, wait_ready};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The value of `Key=` in the shipped systemd unit.
fn unit_value(key: &str) -> String {
    let unit = std::fs::read_to_string(repo("deploy/systemd/sidecache.service")).unwrap();
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key}= in the unit"))
        .to_owned()
}

/// Files (not directories) under `dir`, links not followed.
fn files_under(dir: &Path) -> usize {
    crate::support::disk_usage(dir).1 as usize
}

/// The shipped unit's `DynamicUser=yes` + `CacheDirectory=`: systemd makes
/// `/var/cache/<name>` a link to `private/<name>` (0700, owned by the dynamic user), and
/// `SIDECACHE_CACHE_DIR=%C/<name>` names the link. sidecache caches there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_systemd_dynamic_user_cache_directory_layout_caches() {
    assert_eq!(unit_value("DynamicUser"), "yes");
    let name = unit_value("CacheDirectory");
    let mode = u32::from_str_radix(&unit_value("CacheDirectoryMode"), 8).unwrap();
    assert_eq!(unit_value("Environment=SIDECACHE_CACHE_DIR").replace("%C/", ""), name);

    // %C, as systemd lays it out for a dynamic user.
    let var_cache = tempfile::tempdir().unwrap();
    let private = var_cache.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let real = private.join(&name);
    std::fs::create_dir(&real).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(mode)).unwrap();
    let configured = var_cache.path().join(&name);
    symlink(Path::new("private").join(&name), &configured).unwrap();

    let origin = Origin::start().await;
    origin.fixed(
        "/app.js",
        &[("content-type", "text/javascript"), ("cache-control", "max-age=600")],
        "body",
    );
    let mut bin = Binary::serve(&origin.url(), &configured, &[], &[("SIDECACHE_ACCESS_LOG", "false")]);
    let (addr, admin) = (bin.public_addr(), bin.admin_addr());
    wait_ready(admin).await;
    let c = app_client();
    for _ in 0..2 {
        let resp = c.get(format!("http://{addr}/app.js")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(origin.hits("/app.js"), 1, "the second request was a hit");
    assert!(
        eventually(Duration::from_secs(10), async || files_under(&real) > 1).await,
        "objects are stored in the directory the link resolves to"
    );
    assert!(
        std::fs::symlink_metadata(&configured).unwrap().file_type().is_symlink(),
        "the link stays"
    );
}

/// A link to a directory others may enter (or another user's) is still refused, naming the
/// target and what would make it acceptable.
#[test]
fn a_link_to_a_directory_others_may_enter_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("open");
    std::fs::create_dir(&target).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
    let link = dir.path().join("cache");
    symlink(&target, &link).unwrap();
    let err = sidecache::cache::store::Store::open(&link).unwrap_err().to_string();
    assert!(err.contains("symbolic link to") && err.contains("755"), "{err}");
    assert_eq!(
        std::fs::read_dir(&target).unwrap().count(),
        0,
        "nothing made through the link"
    );
}

use crate::support::run_binary as run;

/// The configuration a reload test starts from and changes: a rule, the log level, a limit.
fn reload_config(bypass_b: bool, log_level: &str, max_connections: u32) -> String {
    let rule = if bypass_b {
        "rules:\n  - name: b-bypassed\n    match: \"/b/*\"\n    bypass: true\n"
    } else {
        "rules: []\n"
    };
    format!("access_log: false\nlog_level: {log_level}\nmax_connections: {max_connections}\n{rule}")
}

/// SIGHUP reloads while serving: a load run across three reloads has no failed request, each
/// reload's change is in force afterwards (a rule, the log level, a limit), and a file that
/// does not load is refused, logged, and the configuration in force kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sighup_reloads_under_load_without_a_failed_request_and_refuses_a_bad_file() {
    let origin = Origin::start().await;
    for path in ["/a/1.js", "/b/1.js"] {
        origin.fixed(path, &[("cache-control", "max-age=600")], "body");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sidecache.yaml");
    std::fs::write(&file, reload_config(false, "info", 512)).unwrap();
    let mut bin = Binary::serve(
        &origin.url(),
        &dir.path().join("cache"),
        &["--config", file.to_str().unwrap()],
        &[("SIDECACHE_WORKERS", "2")],
    );
    let (addr, admin) = (bin.public_addr(), bin.admin_addr());
    wait_ready(admin).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut load = Vec::new();
    for i in 0..8 {
        let (stop, answered) = (stop.clone(), answered.clone());
        load.push(tokio::spawn(async move {
            let c = app_client();
            let (mut ok, mut failed) = (0u64, Vec::new());
            let path = if i % 2 == 0 { "/a/1.js" } else { "/b/1.js" };
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match c.get(format!("http://{addr}{path}")).send().await {
                    Ok(r) => {
                        let status = r.status();
                        match r.bytes().await {
                            Ok(b) if status == 200 && &b[..] == b"body" => {
                                ok += 1;
                                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Ok(_) => failed.push(format!("status {status}")),
                            Err(e) => failed.push(e.to_string()),
                        }
                    }
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        }));
    }
    let steps = [
        reload_config(true, "info", 512),
        reload_config(true, "debug", 512),
        reload_config(true, "debug", 64),
    ];
    // Each reload lands in the middle of the load: 300 answers before it, 300 after the last.
    let answers = |n: u64| {
        let answered = answered.clone();
        async move {
            let from = answered.load(std::sync::atomic::Ordering::Relaxed);
            let more = async || answered.load(std::sync::atomic::Ordering::Relaxed) >= from + n;
            assert!(eventually(Duration::from_secs(30), more).await, "the load stalled");
        }
    };
    for (n, config) in steps.iter().enumerate() {
        answers(300).await;
        std::fs::write(&file, config).unwrap();
        bin.signal(libc::SIGHUP);
        let line = tokio::task::block_in_place(|| bin.wait_nth_line("configuration reloaded", n + 1));
        assert!(line.contains("applied=1"), "reload {n}: {line}");
    }
    answers(300).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for task in load {
        let (o, f) = task.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    eprintln!(
        "reload load run: {ok} requests answered, {} failed, across 3 reloads",
        failed.len()
    );
    assert!(ok > 100, "the load ran: {ok}");
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        bin.seen.iter().any(|l| l.contains("key=\"rules\"")),
        "the rule change is logged"
    );
    assert!(
        bin.seen.iter().any(|l| l.contains("key=\"log_level\"")),
        "the level change is logged"
    );
    assert!(bin.seen.iter().any(|l| l.contains("key=\"max_connections\"")));

    // In force: /b/ is bypassed now; debug lines are written.
    let resp = app_client().get(format!("http://{addr}/b/1.js")).send().await.unwrap();
    assert!(resp.headers()["cache-status"].to_str().unwrap().contains("fwd=bypass"));
    // A restart-only key is reported, not applied; a bad file is refused and the old kept.
    std::fs::write(&file, format!("{}max_size: 1GB\n", steps[2])).unwrap();
    bin.signal(libc::SIGHUP);
    let line = tokio::task::block_in_place(|| bin.wait_line("take effect only at a restart"));
    assert!(line.contains("max_size"), "{line}");
    std::fs::write(&file, "rules: [\nlog_level: verbose\n").unwrap();
    bin.signal(libc::SIGHUP);
    let line = tokio::task::block_in_place(|| bin.wait_line("reload refused"));
    assert!(line.contains(file.to_str().unwrap()), "names the file: {line}");
    let resp = app_client().get(format!("http://{addr}/b/1.js")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["cache-status"].to_str().unwrap().contains("fwd=bypass"),
        "the configuration in force was kept"
    );
    assert!(bin.child.try_wait().unwrap().is_none(), "still running");
    bin.signal(libc::SIGTERM);
    let status = tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(30)));
    assert_eq!(status.code(), Some(0));
}

/// `check-config` prints YAML that loads back to the same configuration, each value's source
/// beside it, the token redacted; `check-config | head -1` ends quietly.
#[test]
fn check_config_prints_yaml_that_loads_back_with_sources() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("in.yaml");
    std::fs::write(
        &file,
        "max_size: 1GB\nrules:\n  - match: \"/assets/*\"\n    ttl: 1h\nquery: {deny: [utm_source]}\n",
    )
    .unwrap();
    let env = [
        ("SIDECACHE_ACCESS_LOG", "false"),
        ("SIDECACHE_ADMIN_TOKEN", "tok-secret-xyz"),
    ];
    let (code, out, err) = run(
        &[
            "check-config",
            "--config",
            file.to_str().unwrap(),
            "--grace-period",
            "3",
        ],
        &env,
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("configuration is valid"), "{err}");
    for want in [
        "max_size: \"1GB\"  # config file",
        "access_log: false  # environment variable SIDECACHE_ACCESS_LOG",
        "grace_period: \"3\"  # flag --grace-period",
        "listen: \"0.0.0.0:8080\"  # the default",
        "max_objects: 61035  # derived",
        "# admin_token: <redacted>  # from environment variable SIDECACHE_ADMIN_TOKEN",
    ] {
        assert!(out.contains(want), "{want}:\n{out}");
    }
    assert!(!out.contains("tok-secret-xyz"), "{out}");
    // Loads back: the same values (the sources now the file).
    let back = dir.path().join("back.yaml");
    std::fs::write(&back, &out).unwrap();
    let (code, again, err) = run(&["check-config", "--config", back.to_str().unwrap()], &env[1..]);
    assert_eq!(code, 0, "{err}");
    let values = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split("  # ").next().unwrap().to_owned())
            .collect()
    };
    assert_eq!(values(&out), values(&again));
    // `serve -t` is the same check (nginx -t).
    let (code, _, err) = run(&["serve", "-t", "--config", back.to_str().unwrap()], &env[1..]);
    assert_eq!(code, 0, "{err}");

    // A reader that goes away: no panic, no broken-pipe message.
    let mut child = std::process::Command::new(crate::support::binary_path())
        .arg("check-config")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
    assert_eq!(out.status.code(), Some(0), "{err}");
}

/// The error list of issue 28, item 8: each refusal says what is wrong in an operator's words
/// and exits 64 (usage and configuration alike).
#[test]
fn configuration_and_usage_errors_are_worded_for_operators_and_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    type Case<'a> = (Vec<String>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec![],
            vec![("SIDECACHE_LOG_LEVEL", "verbose")],
            "`verbose` names no level",
        ),
        (
            vec!["--config".into(), file("a.yaml", "max_sise: 1GB\n")],
            vec![],
            "did you mean `max_size`?",
        ),
        (
            vec![],
            vec![("SIDECACHE_MAX_SIZ", "1GB")],
            "did you mean SIDECACHE_MAX_SIZE?",
        ),
        (
            vec!["--config".into(), file("b.yaml", "high_watermark: lots\n")],
            vec![],
            "expected a number",
        ),
        (
            vec!["--config".into(), file("c.yaml", "access_log: yes\n")],
            vec![],
            "expected true or false",
        ),
        (
            vec!["--config".into(), file("d.yaml", "max_size: 1GB\nmax_size: 2GB\n")],
            vec![],
            "set once",
        ),
        (
            vec!["--config".into(), file("e.yaml", "query: {allow: [v], deny: [utm]}\n")],
            vec![],
            "both `allow` and `deny`",
        ),
    ];
    for (args, env, want) in cases {
        let mut all = vec!["check-config".to_owned()];
        all.extend(args);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let (code, _, err) = run(&all, &env);
        assert_eq!(code, 64, "{all:?}: {err}");
        assert!(err.contains(want), "{want}: {err}");
        assert!(
            !err.contains("DuplicateKeyPolicy") && !err.contains("strict mode"),
            "{err}"
        );
        assert_eq!(err.matches("sidecache:").count(), 1, "printed once: {err}");
    }
    // Lists read the same from the environment as from a file.
    let (_, from_env, _) = run(&["check-config"], &[("SIDECACHE_STRIP_REQUEST_HEADERS", "x-a, x-b")]);
    let f = file("f.yaml", "strip_request_headers: [x-a, x-b]\n");
    let (_, from_file, _) = run(&["check-config", "--config", &f], &[]);
    let line = |out: &str| {
        out.lines()
            .find(|l| l.starts_with("strip_request_headers"))
            .unwrap()
            .split("  # ")
            .next()
            .unwrap()
            .to_owned()
    };
    assert!(from_env.contains("strip_request_headers"), "{from_env}");
    let (code, _, err) = run(
        &["check-config", "--config", &f],
        &[("SIDECACHE_STRIP_REQUEST_HEADERS", "x-a, x-b")],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        line(&from_env).replace("\"x-a, x-b\"", "L"),
        line(&from_file).replace("[\"x-a\",\"x-b\"]", "L")
    );

    // Usage errors: 64 as well.
    for args in [
        &["serve", "--no-such-flag"][..],
        &["prime"][..],
        &["purge", "--target", "not an address", "--all"][..],
    ] {
        let (code, _, err) = run(args, &[]);
        assert_eq!(code, 64, "{args:?}: {err}");
    }
    // `--target host:port` is an address (as admin_listen is written); `--wait 3` is seconds.
    let (code, _, err) = run(&["purge", "--all", "--target", "127.0.0.1:9"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("failed to reach the admin port at http://127.0.0.1:9"),
        "{err}"
    );
    let (code, _, err) = run(
        &[
            "prime",
            "--urls",
            "/nonexistent",
            "--wait",
            "3",
            "--target",
            "127.0.0.1:9",
        ],
        &[],
    );
    assert_ne!(code, 64, "--wait 3 is accepted: {err}");
    assert!(!err.contains("--wait"), "{err}");
}

/// Only this process's own serving loops share its port: a second sidecache on a port in use
/// fails to bind, with an error naming the address, printed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sidecache_on_the_same_port_fails_to_bind_naming_the_address() {
    let origin = Origin::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut first = Binary::serve(
        &origin.url(),
        &dir.path().join("one"),
        &[],
        &[("SIDECACHE_WORKERS", "2")],
    );
    let addr = first.public_addr();
    for workers in ["1", "2"] {
        let out = std::process::Command::new(crate::support::binary_path())
            .args(["serve", "--listen", &addr.to_string(), "--admin-listen", "127.0.0.1:0"])
            .args(["--upstream", &origin.url()])
            .env("SIDECACHE_WORKERS", workers)
            .arg("--cache-dir")
            .arg(dir.path().join(format!("two-{workers}")))
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
        let all = format!("{stdout}{stderr}");
        assert_eq!(
            all.matches(&format!("failed to bind the public listener on {addr}"))
                .count(),
            1,
            "named once: {all}"
        );
        assert!(all.contains("in use"), "{all}");
    }
    assert!(first.child.try_wait().unwrap().is_none(), "the first one serves on");
}

/// Every counter and every known label value is exported at 0 from startup, so an alert on
/// `rate`/`increase` sees the first error: `promtool test rules` over the real exporter's
/// series (as scraped from a fresh sidecache), with one storage error after 4 minutes, fires
/// `SidecacheStorageErrors`. A series missing at startup would be given to promtool as absent
/// until the error (born at 1), and the alert would not fire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_exist_at_zero_from_startup_and_the_storage_alert_fires_on_the_first_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut bin = Binary::serve("http://127.0.0.1:9", &dir.path().join("cache"), &[], &[]);
    let admin = bin.admin_addr();
    let text = crate::support::scrape(admin).await;
    for (name, labels) in sidecache::metrics::COUNTERS {
        let first = labels.first().map(|(l, v)| format!("{l}=\"{}\"", v[0]));
        let present = text.lines().any(|l| {
            l.split(['{', ' ']).next() == Some(*name) && first.as_ref().is_none_or(|f| l.contains(f.as_str()))
        });
        assert!(present, "{name} is not exported at startup");
    }
    let io = "sidecache_storage_errors_total{kind=\"io\"}";
    let mut series = String::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let Some((metric, _)) = line.rsplit_once(' ') else {
            continue;
        };
        if !metric.starts_with("sidecache_") || metric.contains("_bucket") || metric.contains("le=") {
            continue;
        }
        let labelled = match metric.split_once('{') {
            Some((name, rest)) => format!("{name}{{job=\"sidecache\",instance=\"x:6083\",{rest}"),
            None => format!("{metric}{{job=\"sidecache\",instance=\"x:6083\"}}"),
        };
        let values = if metric == io { "0x4 1x10" } else { "0x14" };
        series.push_str(&format!("      - series: '{labelled}'\n        values: '{values}'\n"));
    }
    if !text.contains(io) {
        // What an exporter without the zero gives: nothing, then 1.
        series.push_str(
            "      - series: 'sidecache_storage_errors_total{job=\"sidecache\",instance=\"x:6083\",kind=\"io\"}'\n        values: '_x4 1x10'\n",
        );
    }
    let rules = repo("deploy/prometheus/alerts.yml");
    let test = format!(
        "rule_files:\n  - {}\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{series}    alert_rule_test:\n      - eval_time: 7m\n        alertname: SidecacheStorageErrors\n        exp_alerts:\n          - exp_labels: {{severity: warning, job: sidecache, instance: \"x:6083\", kind: io}}\n            exp_annotations: {{summary: \"sidecache storage errors (io) on x:6083\", description: \"x:6083 (job sidecache) is hitting storage errors of kind io at 3.333m/s (5m rate). Check the cache directory's free space, permissions and disk health; affected requests fall back to the app.\"}}\n      - eval_time: 8m\n        alertname: SidecacheHitRatioCollapse\n        exp_alerts: []\n",
        rules.display()
    );
    let file = dir.path().join("real_exporter_test.yml");
    std::fs::write(&file, test).unwrap();
    let out = std::process::Command::new(crate::prometheus::tool("promtool", "prometheus"))
        .args(["test", "rules", file.to_str().unwrap()])
        .output()
        .unwrap();
    let said = crate::support::said(&out);
    assert!(
        out.status.success(),
        "promtool test rules on the real exporter's series: {said}"
    );
    drop(bin);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_line_names_the_version_and_the_limits_in_force() {
    let origin = crate::support::Origin::start().await;
    let cache = tempfile::tempdir().unwrap();
    let mut bin = crate::support::Binary::serve(
        &origin.url(),
        cache.path(),
        &["--max-size", "3MiB"],
        &[("SIDECACHE_MAX_CONNECTIONS", "77"), ("SIDECACHE_GRACE_PERIOD", "7s")],
    );
    let line = bin.wait_line("sidecache starting");
    for field in [
        format!("version={}", env!("CARGO_PKG_VERSION")),
        "max_size=3145728".to_owned(),
        "min_free=5%".to_owned(),
        "max_connections=77".to_owned(),
        "grace_period=7s".to_owned(),
        "descriptors=".to_owned(),
        "max_object_size=".to_owned(),
    ] {
        assert!(line.contains(&field), "{field} missing: {line}");
    }
    bin.public_addr();
    assert!(
        bin.seen.iter().position(|l| l.contains("sidecache starting"))
            < bin.seen.iter().position(|l| l.contains("proxy listening")),
        "the limits come first"
    );
}
