//! `sidecache serve -- <app>`: a real child process, its readiness, signals and exit status.

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use crate::support::{Binary, client};

/// A stand-in app: HTTP on $PORT after a delay; exits 42 on SIGTERM; `/exit/N` exits N.
const APP: &str = r#"
import http.server, os, signal, sys, time
port = int(os.environ["PORT"])
signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))
time.sleep(0.5)
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        body = f"app on {port}".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        if self.path.startswith("/exit/"):
            os._exit(int(self.path[6:]))
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"#;

fn spawn_supervised(dir: &std::path::Path, app: &[&str]) -> Binary {
    spawn_supervised_with(dir, "127.0.0.1:0", &[], app)
}

/// `sidecache serve --listen LISTEN [extra] -- APP` (the stand-in app when `app` is empty).
fn spawn_supervised_with(dir: &std::path::Path, listen: &str, extra: &[&str], app: &[&str]) -> Binary {
    let script = dir.join("app.py");
    std::fs::write(&script, APP).unwrap();
    let cache = dir.join("cache");
    let mut args = vec![
        "serve",
        "--listen",
        listen,
        "--admin-listen",
        "127.0.0.1:0",
        "--cache-dir",
    ];
    args.push(cache.to_str().unwrap());
    args.extend_from_slice(extra);
    args.push("--");
    let script = script.to_str().unwrap().to_owned();
    let mut full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    if app.is_empty() {
        full.extend(["python3".to_owned(), script]);
    } else {
        full.extend(app.iter().map(|s| s.to_string()));
    }
    let refs: Vec<&str> = full.iter().map(String::as_str).collect();
    Binary::spawn(&refs, &[("SIDECACHE_ACCESS_LOG", "false")])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervised_app_gets_port_and_sidecar_reports_ready_only_after_it_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let mut bin = spawn_supervised(dir.path(), &[]);
    let admin = bin.admin_addr();
    let ready_line = bin.wait_line("app ready");
    let addr = bin.public_addr();
    let port: u16 = ready_line
        .split("port=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // Public port bound only after the app accepts: the very first request reaches it.
    let resp = client().get(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), format!("app on {port}"));
    let ready = client().get(format!("http://{admin}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);

    bin.signal(libc::SIGTERM);
    let status = tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(15)));
    assert_eq!(
        status.code(),
        Some(42),
        "SIGTERM reached the app and its status is ours"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_exit_status_becomes_sidecache_exit_status() {
    let dir = tempfile::tempdir().unwrap();
    let mut bin = spawn_supervised(dir.path(), &[]);
    let addr = bin.public_addr();
    let resp = client().get(format!("http://{addr}/exit/7")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let status = tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(15)));
    assert_eq!(status.code(), Some(7));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_that_dies_at_startup_is_reported_with_its_status() {
    let dir = tempfile::tempdir().unwrap();
    let mut bin = spawn_supervised(dir.path(), &["sh", "-c", "exit 3"]);
    let status = tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(15)));
    assert_eq!(status.code(), Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_is_forwarded_too() {
    let dir = tempfile::tempdir().unwrap();
    let mut bin = spawn_supervised(dir.path(), &[]);
    let _ = bin.public_addr();
    bin.signal(libc::SIGINT);
    let status = tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(15)));
    // Python's default SIGINT handler raises KeyboardInterrupt: exit status 1 (or 130).
    assert!(matches!(status.code(), Some(1) | Some(130)), "{status:?}");
}

/// Started as a background job of a script (`sh -c 'cmd &'` ignores SIGINT in `cmd`, which
/// its children inherit through exec), sidecache must still stop its app with a forwarded
/// SIGINT: the app starts with the default action for the signals it is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_is_forwarded_to_the_app_even_when_sidecache_started_ignoring_it() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("app.py");
    std::fs::write(&script, APP).unwrap();
    // `trap '' INT` ignores SIGINT, as a non-interactive shell does for a background job, and
    // exec keeps it ignored in sidecache.
    let line = format!(
        "trap '' INT; SIDECACHE_ACCESS_LOG=false exec {} serve --listen 127.0.0.1:0 \
         --admin-listen 127.0.0.1:0 --cache-dir {} -- python3 {}",
        crate::support::binary_path().display(),
        dir.path().join("cache").display(),
        script.display()
    );
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", &line]);
    let mut bin = Binary::from_command(cmd);
    let _ = bin.public_addr();
    bin.signal(libc::SIGINT);
    let status = tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(15)));
    assert!(matches!(status.code(), Some(1) | Some(130)), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_gets_the_descriptor_limit_sidecache_was_started_with() {
    let dir = tempfile::tempdir().unwrap();
    let hard: u64 = String::from_utf8(
        std::process::Command::new("sh")
            .args(["-c", "ulimit -Hn"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap_or(u64::MAX);
    assert!(hard > 512, "the test needs a hard limit above 512, not {hard}");
    // sidecache starts with a soft limit of 512 and raises its own to the hard limit; the app
    // writes the soft limit it got, then exits (and sidecache with it).
    let seen = dir.path().join("limit");
    let app = format!("ulimit -Sn > {}; exit 9", seen.display());
    let cache = dir.path().join("cache");
    let mut cmd = std::process::Command::new("sh");
    cmd.args([
        "-c",
        r#"ulimit -Sn 512 && exec "$0" serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --cache-dir "$1" -- sh -c "$2""#,
    ])
    .arg(crate::support::binary_path())
    .arg(&cache)
    .arg(&app)
    .env("SIDECACHE_ACCESS_LOG", "false");
    let mut bin = Binary::from_command(cmd);
    let raised = bin.wait_line("raised the descriptor limit");
    assert!(raised.contains("before=512"), "{raised}");
    let status = tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(15)));
    assert_eq!(status.code(), Some(9));
    assert_eq!(std::fs::read_to_string(&seen).unwrap().trim(), "512");
}

/// Killed without the chance to forward a signal (SIGKILL, the OOM killer), sidecache must
/// not leave its app behind as an orphan holding the port: the app gets SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_does_not_outlive_a_killed_sidecache() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("app.py");
    std::fs::write(&script, APP).unwrap();
    let pid_file = dir.path().join("app.pid");
    // exec keeps the pid: the one written is the app's.
    let app = format!("echo $$ > {}; exec python3 {}", pid_file.display(), script.display());
    let mut bin = spawn_supervised(dir.path(), &["sh", "-c", &app]);
    let addr = bin.public_addr();
    let resp = client().get(format!("http://{addr}/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let pid: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    assert!(running(pid), "the app runs while sidecache does");

    bin.signal(libc::SIGKILL);
    let status = tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(15)));
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let gone = crate::support::eventually(Duration::from_secs(10), async || !running(pid)).await;
    if !gone {
        let _ = std::process::Command::new("kill").arg(pid.to_string()).status();
    }
    assert!(gone, "the app (pid {pid}) outlived sidecache");
}

/// A command that cannot run fails at once, before any port is bound, naming the command and
/// why (it is looked up as exec would, not left to the launcher).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_that_cannot_run_is_refused_at_once_with_its_cause() {
    for (command, cause) in [
        ("/nonexistent/app", "No such file or directory"),
        ("no-such-command-for-sidecache", "not found in PATH"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut bin = spawn_supervised(dir.path(), &[command]);
        let line = tokio::task::block_in_place(|| bin.wait_line("failed to start app command"));
        assert!(line.contains(command) && line.contains(cause), "{line}");
        let status = tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(15)));
        assert_eq!(status.code(), Some(1));
        assert!(!bin.seen.iter().any(|l| l.contains("listening")), "no port bound");
    }
}

/// The app gets its arguments as given: spaces, empty ones and shell characters intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_gets_its_arguments_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let seen = dir.path().join("args");
    let script = format!("printf '%s|' \"$@\" > {}; exit 5", seen.display());
    let mut bin = spawn_supervised(dir.path(), &["sh", "-c", &script, "sh", "a b", "", "$HOME", "--", "-x"]);
    let status = tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(15)));
    assert_eq!(status.code(), Some(5));
    assert_eq!(std::fs::read_to_string(&seen).unwrap(), "a b||$HOME|--|-x|");
}

/// Before serving, the stand-in app double-forks five grandchildren, as daemonising code and
/// background commands do: each one's parent exits at once, the grandchild waits until it has
/// been re-parented, writes `<pid> <new parent>` to the file named by argv[1], and exits.
const DOUBLE_FORK: &str = r#"
import os, sys, time
out = open(sys.argv[1], "w")
for _ in range(5):
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        me = os.getpid()
        if os.fork() == 0:
            deadline = time.time() + 10
            while os.getppid() == me and time.time() < deadline:
                time.sleep(0.005)
            os.write(w, f"{os.getpid()} {os.getppid()}\n".encode())
            os._exit(0)
        os._exit(0)
    os.close(w)
    os.waitpid(child, 0)
    out.write(os.read(r, 100).decode())
    os.close(r)
out.close()
"#;

/// The processes whose parent is `parent` and that are zombies (exited, not reaped), from
/// /proc (`/proc/<pid>/task/*/children` is not in every kernel).
fn zombie_children(parent: u32) -> Vec<u32> {
    let mut zombies = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let (state, ppid) = (fields.next(), fields.next().and_then(|p| p.parse::<u32>().ok()));
        if state == Some("Z") && ppid == Some(parent) {
            zombies.push(pid);
        }
    }
    zombies
}

/// As PID 1 in a container, sidecache inherits every process its app orphans: it must reap
/// them (a zombie holds its pid for ever), and still report the app's own exit status. It is a
/// child subreaper, so the orphans come to it here as they would to PID 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_of_the_app_are_adopted_and_reaped_and_the_app_status_is_still_ours() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("orphaning_app.py");
    std::fs::write(&script, format!("{DOUBLE_FORK}{APP}")).unwrap();
    let adopted = dir.path().join("adopted");
    let mut bin = spawn_supervised(
        dir.path(),
        &["python3", script.to_str().unwrap(), adopted.to_str().unwrap()],
    );
    let sidecache = bin.child.id();
    let addr = bin.public_addr();
    // The app serves once its grandchildren reported: all five were re-parented to sidecache.
    let lines = std::fs::read_to_string(&adopted).unwrap();
    let orphans: Vec<(u32, u32)> = lines
        .lines()
        .map(|l| {
            let (pid, ppid) = l.split_once(' ').unwrap();
            (pid.parse().unwrap(), ppid.parse().unwrap())
        })
        .collect();
    assert_eq!(orphans.len(), 5, "{lines}");
    for (pid, parent) in &orphans {
        assert_eq!(*parent, sidecache, "orphan {pid} went to {parent}, not to sidecache");
    }
    let reaped = crate::support::eventually(Duration::from_secs(10), async || {
        zombie_children(sidecache).is_empty()
            && orphans
                .iter()
                .all(|(pid, _)| !std::path::Path::new(&format!("/proc/{pid}")).exists())
    })
    .await;
    assert!(reaped, "zombies left under sidecache: {:?}", zombie_children(sidecache));

    let resp = client().get(format!("http://{addr}/exit/7")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let status = tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(15)));
    assert_eq!(status.code(), Some(7), "the app's exit status is still sidecache's");
}

/// An app that ignores SIGTERM is not waited for for ever: SIGKILL follows after the grace
/// period, and sidecache exits with the app's status (killed: 137).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_that_ignores_sigterm_is_killed_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("stubborn_app.py");
    let stubborn = APP.replace(
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))",
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)",
    );
    assert_ne!(stubborn, APP);
    std::fs::write(&script, stubborn).unwrap();
    let mut bin = spawn_supervised_with(
        dir.path(),
        "127.0.0.1:0",
        &["--grace-period", "1s"],
        &["python3", script.to_str().unwrap()],
    );
    let _ = bin.public_addr();
    bin.signal(libc::SIGTERM);
    let status = tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(15)));
    assert_eq!(status.code(), Some(128 + libc::SIGKILL), "{status:?}");
    let line = bin.wait_line("killing it");
    assert!(line.contains("grace period"), "{line}");
}

/// On SIGTERM the app is stopped only once sidecache has drained: a request in the app when
/// the signal comes gets the app's answer, not a 502 because the app was stopped under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_at_sigterm_gets_the_app_answer_before_the_app_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("slow_app.py");
    let started = dir.path().join("slow-started");
    let slow = APP.replace(
        "    def do_GET(self):\n",
        "    def do_GET(self):\n        if self.path == '/slow':\n            open(sys.argv[1], 'w').close()\n            time.sleep(1.5)\n",
    );
    assert_ne!(slow, APP);
    std::fs::write(&script, slow).unwrap();
    let mut bin = spawn_supervised(
        dir.path(),
        &["python3", script.to_str().unwrap(), started.to_str().unwrap()],
    );
    let addr = bin.public_addr();
    let in_flight = tokio::spawn(async move { client().get(format!("http://{addr}/slow")).send().await });
    assert!(
        crate::support::eventually(Duration::from_secs(10), async || started.exists()).await,
        "the request never reached the app"
    );
    bin.signal(libc::SIGTERM);
    let resp = in_flight.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200, "the app was stopped under a request in flight");
    assert!(resp.text().await.unwrap().starts_with("app on "));
    let status = tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(15)));
    assert_eq!(status.code(), Some(42), "then the app got SIGTERM");
}

/// `/readyz` says ready only once the public port accepts: a client sent there the moment it
/// says 200 gets in (in supervision mode the app is up before the public port is bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_ready_only_once_the_public_port_accepts() {
    let dir = tempfile::tempdir().unwrap();
    // A port of our own choosing, so the test can try it before sidecache logs it: outside
    // the ephemeral range, or another test's bind to port 0 may take it meanwhile (it did).
    let public = crate::support::port_outside_ephemeral_range();
    let mut bin = spawn_supervised_with(dir.path(), &public.to_string(), &[], &[]);
    let admin = bin.admin_addr();
    let http = client();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut not_ready = 0;
    loop {
        assert!(std::time::Instant::now() < deadline, "never ready");
        let status = match http.get(format!("http://{admin}/readyz")).send().await {
            Ok(resp) => resp.status(),
            Err(_) => continue,
        };
        if status == 200 {
            break;
        }
        not_ready += 1;
    }
    let connected = tokio::net::TcpStream::connect(public).await;
    assert!(
        connected.is_ok(),
        "/readyz said 200 but the public port refused: {connected:?}"
    );
    assert!(not_ready > 0, "/readyz was polled before the app was up");
    bin.signal(libc::SIGTERM);
    tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(15)));
}

/// Whether `pid` is a live process (a zombie waiting for its new parent to reap it has ended).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| Some(stat.rsplit_once(") ")?.1.chars().next()? != 'Z'))
        .unwrap_or(false)
}

/// `sidecache serve` under a hard descriptor limit of `limit`, with `env`.
fn serve_under_limit(limit: u32, cache: &std::path::Path, env: &[(&str, &str)]) -> Binary {
    let mut cmd = std::process::Command::new("sh");
    cmd.args([
        "-c",
        r#"ulimit -n "$2" && exec "$0" serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --upstream http://127.0.0.1:9 --cache-dir "$1""#,
    ])
    .arg(crate::support::binary_path())
    .arg(cache)
    .arg(limit.to_string())
    .env("SIDECACHE_ACCESS_LOG", "false")
    .envs(env.iter().copied());
    Binary::from_command(cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_descriptor_limit_too_low_for_the_open_tier_is_reported_and_max_connections_makes_room() {
    let dir = tempfile::tempdir().unwrap();
    // Fewer descriptors than the default 4,096 connections and the spare.
    let mut bin = serve_under_limit(4000, &dir.path().join("a"), &[]);
    let line = bin.wait_line("open tier off");
    assert!(line.contains("descriptor_limit=4000"), "{line}");
    bin.signal(libc::SIGTERM);
    tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(15)));
    // Fewer connections leave the rest to held files: 4000 - (1000 + 256).
    let mut bin = serve_under_limit(4000, &dir.path().join("b"), &[("SIDECACHE_MAX_CONNECTIONS", "1000")]);
    let line = bin.wait_line("open tier sized");
    assert!(line.contains("open_files=2744"), "{line}");
    assert!(!bin.seen.iter().any(|l| l.contains("open tier off")));
}

/// The environment a supervised app sees, written by the app (`env -0`) before it exits 6:
/// `sidecache serve [extra] -- sh -c 'env -0 > FILE; exit 6'` with `env` added to ours.
fn app_environment(dir: &std::path::Path, extra: &[&str], env: &[(&str, &str)]) -> Vec<(String, String)> {
    let seen = dir.join("environ");
    let app = format!("env -0 > {}; exit 6", seen.display());
    let cache = dir.join("cache");
    let mut args = vec![
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--cache-dir",
        cache.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args.extend(["--", "sh", "-c", &app]);
    let mut bin = Binary::spawn(&args, env);
    let status = bin.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(6), "the app ran and its status is ours");
    std::fs::read_to_string(&seen)
        .unwrap()
        .split('\0')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// sidecache's secrets stay sidecache's: the app does not inherit the admin token, nor the
/// shared tier's credentials while the tier is on; everything else reaches it.
#[test]
fn the_app_does_not_inherit_sidecache_secrets() {
    let secrets = [
        ("SIDECACHE_ADMIN_TOKEN", "admin-secret-1"),
        ("AWS_ACCESS_KEY_ID", "key-id-secret-2"),
        ("AWS_SECRET_ACCESS_KEY", "secret-key-3"),
        ("AWS_SESSION_TOKEN", "session-secret-4"),
    ];
    let ordinary = [("MY_APP_SETTING", "kept"), ("AWS_REGION", "eu-west-1")];
    let env: Vec<(&str, &str)> = [("SIDECACHE_ACCESS_LOG", "false")]
        .iter()
        .chain(&secrets)
        .chain(&ordinary)
        .copied()
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let seen = app_environment(dir.path(), &["--shared-tier", "s3://sc-test-bucket/app"], &env);
    let value = |name: &str| seen.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    for (name, secret) in secrets {
        assert_eq!(value(name), None, "{name} reached the app");
        assert!(
            seen.iter().all(|(_, v)| !v.contains(secret)),
            "{name}'s value reached the app"
        );
    }
    for (name, v) in ordinary {
        assert_eq!(value(name), Some(v), "{name} must reach the app");
    }
    assert!(value("PATH").is_some_and(|p| !p.is_empty()), "PATH must reach the app");
    assert!(value("PORT").is_some_and(|p| p.parse::<u16>().is_ok()), "PORT is set");

    // Without a shared tier sidecache does not use the AWS credentials: they are the app's.
    let dir = tempfile::tempdir().unwrap();
    let seen = app_environment(dir.path(), &[], &env);
    let value = |name: &str| seen.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    assert_eq!(
        value("SIDECACHE_ADMIN_TOKEN"),
        None,
        "the admin token never reaches the app"
    );
    assert_eq!(value("AWS_SECRET_ACCESS_KEY"), Some("secret-key-3"));
    assert_eq!(value("AWS_ACCESS_KEY_ID"), Some("key-id-secret-2"));
}
