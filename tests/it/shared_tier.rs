//! The shared tier (issue 19): real `sidecache` processes in front of one in-process app, a real
//! S3-compatible server (moto's, started here on 127.0.0.1 and a kernel-picked port by
//! `support/s3_server.py`; `.ci/run` installs it). The fleet asks the app once per asset; what
//! may not be shared never reaches the bucket; a stopped or slow bucket is never a client error;
//! a changed object is refused; priming fills through the bucket.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use sidecache::cache::key::{CacheKey, Digest};
use sidecache::cache::meta::Meta;
use sidecache::cache::store;

use crate::support::{Binary, Origin, app_client, eventually, metric, scrape};

const BUCKET: &str = "sidecache-fleet";
const PREFIX: &str = "fleet/web";
const ASSET: &[(&str, &str)] = &[("cache-control", "public, max-age=86400")];
/// The secret the sidecars are given: it must never show in their logs.
const SECRET: &str = "sc-test-secret-7f3a9c01d2e4b5a6";

/// An S3-compatible server in a child process, killed when dropped.
struct S3 {
    child: Child,
    port: u16,
    _log: tempfile::NamedTempFile,
}

/// Installs moto's server from PyPI when it is missing (once per test run), as the other
/// tests install their tools: `cargo test` on a fresh machine needs nothing else.
fn install_moto(python: &str) {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let probe = Command::new(python).args(["-c", "import moto.server, boto3"]).status();
        if probe.is_ok_and(|s| s.success()) {
            return;
        }
        let _ = crate::prometheus::tool("python3", "python3");
        let _ = crate::prometheus::tool("pip3", "python3-pip");
        let pip = |extra: &[&str]| {
            Command::new(python)
                .args(["-m", "pip", "install", "-q"])
                .args(extra)
                .arg("moto[server]==5.2.1")
                .status()
                .is_ok_and(|s| s.success())
        };
        // A Debian system Python (PEP 668) takes it only with --break-system-packages.
        let installed = pip(&[]) || pip(&["--break-system-packages"]);
        assert!(installed, "pip install moto[server] failed");
    });
}

impl S3 {
    /// Starts the server with one empty bucket; fails loudly, saying how to install it, when
    /// it cannot start.
    fn start() -> S3 {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/support/s3_server.py");
        let python = std::env::var("SIDECACHE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        install_moto(&python);
        let log = tempfile::NamedTempFile::new().unwrap();
        let spawned = Command::new(&python)
            .arg(script)
            .arg(BUCKET)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log.reopen().unwrap())
            .spawn();
        let hint = "the shared-tier tests need an S3-compatible server: \
                    `python3 -m pip install 'moto[server]'` (.ci/run installs it)";
        let mut child = spawned.unwrap_or_else(|e| panic!("cannot run {python}: {e}; {hint}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let Ok(port) = line.trim().parse::<u16>() else {
            let _ = child.kill();
            let _ = child.wait();
            let mut said = String::new();
            let _ = log.reopen().unwrap().read_to_string(&mut said);
            panic!("{hint}\nthe server said:\n{said}");
        };
        S3 { child, port, _log: log }
    }

    /// The environment a sidecar reaches it with.
    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", self.port)),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", "sc-test-key-id".into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET.into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// A client of the bucket for the test itself.
    fn bucket(&self) -> AmazonS3 {
        let _ = rustls::crypto::ring::default_provider().install_default();
        AmazonS3Builder::new()
            .with_endpoint(format!("http://127.0.0.1:{}", self.port))
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .with_bucket_name(BUCKET)
            .build()
            .unwrap()
    }

    /// Pauses the server (SIGSTOP): connections are accepted by the kernel, never answered.
    fn pause(&self) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::STOP).unwrap();
    }

    /// Stops the server for good.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Where the fleet keeps `path`'s object (requests are for Host app.example).
fn object_path(path: &str) -> ObjectPath {
    let key = CacheKey::from_stored(format!("http://app.example{path}"));
    ObjectPath::from(format!("{PREFIX}/objects-v2/{}", key.hash().to_hex()))
}

/// Every object under the fleet's prefix.
async fn listing(bucket: &AmazonS3) -> Vec<String> {
    use futures_util::StreamExt;
    let prefix = ObjectPath::from(PREFIX);
    let mut names: Vec<String> = bucket
        .list(Some(&prefix))
        .map(|m| m.unwrap().location.to_string())
        .collect()
        .await;
    names.sort();
    names
}

/// One sidecar process of the fleet.
struct Member {
    bin: Binary,
    addr: SocketAddr,
    admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Member {
    async fn start(origin: &Origin, s3: &S3, extra: &[&str], env: &[(&str, &str)]) -> Member {
        let dir = tempfile::tempdir().unwrap();
        let tier = format!("s3://{BUCKET}/{PREFIX}");
        let mut args = vec!["--shared-tier", tier.as_str()];
        args.extend_from_slice(extra);
        let s3_env = s3.env();
        let mut all: Vec<(&str, &str)> = s3_env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        // What these tests count must not depend on how full the machine's disk is.
        all.push(("SIDECACHE_MIN_FREE", "0"));
        all.extend_from_slice(env);
        let mut bin = Binary::serve(&origin.url(), &dir.path().join("cache"), &args, &all);
        let addr = bin.public_addr();
        let admin = bin.admin_addr();
        crate::support::wait_ready(admin).await;
        Member {
            bin,
            addr,
            admin,
            _dir: dir,
        }
    }

    /// GETs `path` (Host app.example): status, Cache-Status and body.
    async fn get(&self, path: &str) -> (u16, String, Bytes) {
        self.get_with(path, &[]).await
    }

    async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> (u16, String, Bytes) {
        let mut req = app_client().get(format!("http://{}{path}", self.addr));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let cache_status = resp.headers()["cache-status"].to_str().unwrap().to_owned();
        (status, cache_status, resp.bytes().await.unwrap())
    }

    async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        metric(&scrape(self.admin).await, name, labels)
    }

    /// Waits (bounded) until `name{labels}` reaches `at_least`.
    async fn wait_metric(&self, name: &str, labels: &[&str], at_least: f64) {
        let reached = eventually(Duration::from_secs(20), async || {
            self.metric(name, labels).await >= at_least
        })
        .await;
        let text = scrape(self.admin).await;
        let tier: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("sidecache_shared_tier"))
            .collect();
        assert!(
            reached,
            "{name}{labels:?} never reached {at_least}:\n{}",
            tier.join("\n")
        );
    }
}

const LOOKUPS: &str = "sidecache_shared_tier_lookups_total";
const UPLOADS: &str = "sidecache_shared_tier_uploads_total";
const REFUSED: &str = "sidecache_shared_tier_refused_total";
const ERRORS: &str = "sidecache_shared_tier_errors_total";
const BREAKER: &str = "sidecache_shared_tier_breaker_open";

fn body_of(path: &str, len: usize) -> Bytes {
    let line = format!("/* {path} */\n");
    Bytes::from(line.repeat(len / line.len() + 1)[..len].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_asks_the_app_once_per_asset_the_others_read_the_bucket() {
    let s3 = S3::start();
    let origin = Origin::start().await;
    // Small bodies (kept in memory by their fill) and large ones (staged in a file).
    let assets: Vec<(String, Bytes)> = (0..6)
        .map(|i| {
            let path = format!("/assets/app-{i}.js");
            let body = body_of(&path, if i % 2 == 0 { 900 + i } else { 200_000 + i });
            (path, body)
        })
        .collect();
    for (path, body) in &assets {
        origin.fixed(path, ASSET, body.clone());
    }
    let fleet = [
        Member::start(&origin, &s3, &[], &[]).await,
        Member::start(&origin, &s3, &[], &[]).await,
        Member::start(&origin, &s3, &[], &[]).await,
    ];

    for (path, body) in &assets {
        let (status, cache_status, got) = fleet[0].get(path).await;
        assert_eq!((status, &got), (200, body), "{path}");
        assert!(cache_status.contains("fwd=uri-miss"), "{path}: {cache_status}");
    }
    // Uploaded behind the fills.
    fleet[0].wait_metric(UPLOADS, &[], assets.len() as f64).await;
    assert_eq!(listing(&s3.bucket()).await.len(), assets.len());

    // The others read the bucket: five requests at once per asset on each, one GET per key.
    for member in &fleet[1..] {
        let requests = assets.iter().flat_map(|(path, body)| {
            (0..5).map(move |_| async move {
                let (status, cache_status, got) = member.get(path).await;
                assert_eq!((status, &got), (200, body), "{path}");
                cache_status
            })
        });
        let statuses = futures_util::future::join_all(requests).await;
        let from_bucket = statuses.iter().filter(|s| s.contains("detail=shared-tier")).count();
        assert_eq!(
            from_bucket,
            assets.len(),
            "one read through the bucket per asset: {statuses:?}"
        );
        assert_eq!(member.metric(LOOKUPS, &["result=\"hit\""]).await, assets.len() as f64);
        // Stored here now: the next request is a plain local hit.
        let (_, cache_status, _) = member.get(&assets[0].0).await;
        assert_eq!(cache_status, "sidecache; hit");
    }
    for (path, _) in &assets {
        assert_eq!(origin.hits(path), 1, "{path}: the app is asked once by the fleet");
    }
    // What was read from the bucket is not uploaded again.
    for member in &fleet[1..] {
        assert_eq!(member.metric(UPLOADS, &[]).await, 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn answers_that_are_not_for_everyone_never_reach_the_bucket() {
    let s3 = S3::start();
    let origin = Origin::start().await;
    let public = &[("cache-control", "public, max-age=86400")][..];
    origin.fixed("/private.js", &[("cache-control", "private, max-age=86400")], "alice's");
    origin.fixed(
        "/cookie.js",
        &[
            ("cache-control", "public, max-age=86400"),
            ("set-cookie", "session=alice"),
        ],
        "c",
    );
    // A rule strips this cookie, so the instance stores the answer; the bucket still never gets it.
    origin.fixed(
        "/stripped/s.js",
        &[
            ("cache-control", "public, max-age=86400"),
            ("content-type", "text/javascript"),
            ("set-cookie", "session=alice"),
        ],
        "s",
    );
    // Public, so this instance stores it, but it was asked with credentials.
    origin.fixed("/auth.js", public, "for alice");
    origin.fixed("/short.js", &[("cache-control", "public, max-age=60")], "short");
    origin.fixed(
        "/varied.js",
        &[("cache-control", "public, max-age=86400"), ("vary", "accept-language")],
        "v",
    );
    origin.fixed("/control.js", public, "for everyone");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rules.yaml");
    std::fs::write(
        &config,
        "rules:\n  - match: \"/stripped/**\"\n    strip_set_cookie: true\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let fleet = [
        Member::start(&origin, &s3, &["--config", config], &[]).await,
        Member::start(&origin, &s3, &["--config", config], &[]).await,
    ];

    for path in ["/private.js", "/cookie.js", "/stripped/s.js", "/short.js", "/varied.js"] {
        let (status, _, _) = fleet[0].get(path).await;
        assert_eq!(status, 200, "{path}");
    }
    let (_, cache_status, _) = fleet[0]
        .get_with("/auth.js", &[("authorization", "Bearer alice-token")])
        .await;
    assert!(
        cache_status.contains("stored"),
        "stored on this instance: {cache_status}"
    );
    let (_, cache_status, _) = fleet[0].get("/stripped/s.js").await;
    assert_eq!(cache_status, "sidecache; hit", "stored on this instance");
    fleet[0].get("/control.js").await;
    fleet[0].wait_metric(UPLOADS, &[], 1.0).await;

    // Only the control made it, and nothing was queued and dropped instead.
    let bucket = s3.bucket();
    assert_eq!(listing(&bucket).await, vec![object_path("/control.js").to_string()]);
    assert_eq!(fleet[0].metric(UPLOADS, &[]).await, 1.0);
    assert_eq!(
        fleet[0].metric("sidecache_shared_tier_upload_drops_total", &[]).await,
        0.0
    );
    // Another instance, another user without credentials: each from the app, none from the bucket.
    for path in [
        "/private.js",
        "/cookie.js",
        "/stripped/s.js",
        "/auth.js",
        "/short.js",
        "/varied.js",
    ] {
        let (status, cache_status, _) = fleet[1].get(path).await;
        assert_eq!(status, 200, "{path}");
        assert!(!cache_status.contains("shared-tier"), "{path}: {cache_status}");
        assert_eq!(origin.hits(path), 2, "{path}");
    }
    let (_, cache_status, _) = fleet[1].get("/control.js").await;
    assert!(cache_status.contains("detail=shared-tier"), "{cache_status}");
    assert_eq!(origin.hits("/control.js"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_then_stopped_bucket_is_never_a_client_error_and_opens_the_breaker() {
    let mut s3 = S3::start();
    let origin = Origin::start().await;
    for i in 0..40 {
        let path = format!("/a/{i}.js");
        origin.fixed(&path, ASSET, body_of(&path, 500));
    }
    let env = [
        ("SIDECACHE_SHARED_TIER_TIMEOUT", "500ms"),
        ("SIDECACHE_SHARED_TIER_COOLDOWN", "1s"),
    ];
    let mut member = Member::start(&origin, &s3, &["--log-level", "debug"], &env).await;
    // The tier works with these credentials (signed requests accepted).
    member.get("/a/0.js").await;
    member.wait_metric(UPLOADS, &[], 1.0).await;

    // Paused: a read waits no longer than its timeout, then the app answers.
    s3.pause();
    let started = Instant::now();
    let (status, cache_status, body) = member.get("/a/1.js").await;
    assert_eq!((status, body), (200, body_of("/a/1.js", 500)));
    assert!(cache_status.contains("fwd=uri-miss"), "{cache_status}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!(member.metric(ERRORS, &["op=\"get\"", "kind=\"timeout\""]).await, 1.0);

    // Stopped: every request is answered by the app; after failures in a row the tier is
    // skipped, not asked.
    s3.kill();
    for i in 2..12 {
        let path = format!("/a/{i}.js");
        let (status, _, body) = member.get(&path).await;
        assert_eq!((status, body), (200, body_of(&path, 500)), "{path}");
    }
    assert_eq!(
        member.metric(BREAKER, &["op=\"get\""]).await,
        1.0,
        "the reads' breaker is open"
    );
    assert!(member.metric(LOOKUPS, &["result=\"skipped\""]).await >= 1.0);
    let errors = member.metric(ERRORS, &[]).await;
    assert!(errors >= 5.0, "{errors} errors counted");
    // After the cooldown one request probes the bucket again (and, failing, opens it again).
    let mut next = 12;
    let probed = eventually(Duration::from_secs(15), async || {
        let path = format!("/a/{}.js", next.min(39));
        next += 1;
        let (status, _, _) = member.get(&path).await;
        assert_eq!(status, 200);
        member.metric(ERRORS, &[]).await > errors
    })
    .await;
    assert!(probed, "the tier was never tried again");
    for i in 0..next.min(40) {
        assert_eq!(origin.hits(&format!("/a/{i}.js")), 1, "/a/{i}.js");
    }

    // Debug logs of reads, uploads and failures: the secret is in none of them.
    member.bin.wait_line("shared tier failing");
    member.bin.wait_line("shared tier read failed");
    let logs = member.bin.seen.join("\n");
    assert!(
        logs.contains("s3://sidecache-fleet/fleet/web"),
        "the tier is named in the logs"
    );
    assert!(!logs.contains(SECRET), "the secret was logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_object_changed_in_the_bucket_is_refused_and_fetched_from_the_app() {
    let s3 = S3::start();
    let origin = Origin::start().await;
    let paths = ["/x/flipped.js", "/x/cut.js", "/x/swapped.js", "/x/intact.js"];
    for path in paths {
        origin.fixed(path, ASSET, body_of(path, 3000));
    }
    let fleet = [
        Member::start(&origin, &s3, &[], &[]).await,
        Member::start(&origin, &s3, &[], &[]).await,
    ];
    for path in paths {
        fleet[0].get(path).await;
    }
    fleet[0].wait_metric(UPLOADS, &[], paths.len() as f64).await;

    let bucket = s3.bucket();
    let read = async |path: &str| bucket.get(&object_path(path)).await.unwrap().bytes().await.unwrap();
    let mut flipped = read("/x/flipped.js").await.to_vec();
    flipped[100] ^= 0x01;
    let mut cut = read("/x/cut.js").await.to_vec();
    cut.truncate(cut.len() - 5);
    // A valid object, of another key, under this key's name.
    let other = read("/x/intact.js").await;
    for (path, bytes) in [
        ("/x/flipped.js", Bytes::from(flipped)),
        ("/x/cut.js", Bytes::from(cut)),
        ("/x/swapped.js", other),
    ] {
        bucket.put(&object_path(path), PutPayload::from(bytes)).await.unwrap();
    }

    for path in paths {
        let (status, cache_status, body) = fleet[1].get(path).await;
        assert_eq!(
            (status, body),
            (200, body_of(path, 3000)),
            "{path}: never served changed"
        );
        let from_bucket = cache_status.contains("detail=shared-tier");
        assert_eq!(from_bucket, path == "/x/intact.js", "{path}: {cache_status}");
        assert_eq!(origin.hits(path), if from_bucket { 1 } else { 2 }, "{path}");
    }
    for reason in ["digest", "footer", "key"] {
        let label = format!("reason=\"{reason}\"");
        assert_eq!(fleet[1].metric(REFUSED, &[&label]).await, 1.0, "{reason}");
    }
    assert_eq!(fleet[1].metric(LOOKUPS, &["result=\"refused\""]).await, 3.0);
    // The instance that asked the app puts good copies back.
    fleet[1].wait_metric(UPLOADS, &[], 3.0).await;
    let again = read("/x/flipped.js").await;
    assert_eq!(&again[..3000], &body_of("/x/flipped.js", 3000)[..]);
}

/// An object as another instance would have uploaded it, answered by the app `age` ago.
fn object_answered(path: &str, body: &[u8], cache_control: &'static str, age: Duration) -> Bytes {
    let mut headers = http::HeaderMap::new();
    headers.insert("cache-control", http::HeaderValue::from_static(cache_control));
    let then = SystemTime::now() - age;
    let meta = Meta {
        key: CacheKey::from_stored(format!("http://app.example{path}")),
        status: 200,
        headers,
        request_time: then,
        response_time: then,
        body_len: body.len() as u64,
        digest: Digest::from(blake3::hash(body)),
        vary: vec![],
        prepared: Default::default(),
    };
    let mut object = body.to_vec();
    object.extend_from_slice(&store::tail(&meta));
    Bytes::from(object)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_objects_age_counts_from_the_apps_answer_not_the_download() {
    let s3 = S3::start();
    let origin = Origin::start().await;
    origin.fixed("/old.js", ASSET, "from the app");
    origin.fixed("/stale.js", ASSET, "from the app");
    let bucket = s3.bucket();
    let hour = "public, max-age=3600";
    for (path, age) in [("/old.js", 1000), ("/stale.js", 7200)] {
        let object = object_answered(path, b"from the bucket", hour, Duration::from_secs(age));
        bucket.put(&object_path(path), PutPayload::from(object)).await.unwrap();
    }
    let member = Member::start(&origin, &s3, &[], &[]).await;

    let resp = app_client()
        .get(format!("http://{}/old.js", member.addr))
        .send()
        .await
        .unwrap();
    let age: u64 = resp.headers()["age"].to_str().unwrap().parse().unwrap();
    assert!((1000..1100).contains(&age), "Age {age}");
    assert_eq!(resp.text().await.unwrap(), "from the bucket");
    assert_eq!(origin.hits("/old.js"), 0);
    // Stale by the app's clock: not used, the app answers.
    let (_, cache_status, body) = member.get("/stale.js").await;
    assert_eq!(&body[..], b"from the app", "{cache_status}");
    assert_eq!(origin.hits("/stale.js"), 1);
    assert_eq!(member.metric(LOOKUPS, &["result=\"unused\""]).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prime_fills_the_first_instance_from_the_app_and_the_next_from_the_bucket() {
    let s3 = S3::start();
    let origin = Origin::start().await;
    let paths: Vec<String> = (0..8).map(|i| format!("/p/{i}.css")).collect();
    for path in &paths {
        origin.fixed(path, ASSET, body_of(path, 2000));
    }
    let list = paths.join("\n");
    let fleet = [
        Member::start(&origin, &s3, &[], &[]).await,
        Member::start(&origin, &s3, &[], &[]).await,
    ];
    let warmed = async |member: &Member| -> u64 {
        let run = crate::prime::prime(
            &format!("http://{}", member.admin),
            &["--urls", "-", "--json"],
            Some(&list),
        )
        .await;
        assert_eq!(run.code, 0, "{}", run.stderr);
        let summary: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
        summary["warmed"].as_u64().unwrap()
    };
    assert_eq!(warmed(&fleet[0]).await, paths.len() as u64);
    fleet[0].wait_metric(UPLOADS, &[], paths.len() as f64).await;
    assert_eq!(warmed(&fleet[1]).await, paths.len() as u64);
    assert_eq!(fleet[1].metric(LOOKUPS, &["result=\"hit\""]).await, paths.len() as f64);
    for path in &paths {
        assert_eq!(origin.hits(path), 1, "{path}");
        let (_, cache_status, body) = fleet[1].get(path).await;
        assert_eq!(cache_status, "sidecache; hit");
        assert_eq!(body, body_of(path, 2000));
    }
}

/// A purge (by URL, by prefix) or an unsafe request's invalidation on an instance is not
/// undone by its read-through: the bucket still holds the copy the app answered before, and
/// it is not taken. (Before: the next request found nothing local, read the bucket and served
/// the purged version again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purged_or_invalidated_object_is_not_brought_back_from_the_bucket() {
    let s3 = S3::start();
    let origin = Origin::start().await;
    let paths = ["/url.js", "/pre/fix.js", "/posted.js"];
    for path in paths {
        origin.fixed(path, ASSET, format!("v1 {path}"));
    }
    let member = Member::start(&origin, &s3, &[], &[]).await;
    // (Bodies differ by path: one body goes up once, under one key.)
    for path in paths {
        assert_eq!(&member.get(path).await.2[..], format!("v1 {path}").as_bytes());
    }
    member.wait_metric(UPLOADS, &[], paths.len() as f64).await;
    for path in paths {
        origin.fixed(path, ASSET, format!("v2 {path}"));
    }
    let admin = |query: &str| format!("http://{}/purge?{query}", member.admin);
    for query in ["url=/url.js", "prefix=/pre/"] {
        let resp = app_client().post(admin(query)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{query}");
    }
    // A POST the app answers 200 invalidates the URL (RFC 9111 §4.4).
    let posted = app_client()
        .post(format!("http://{}/posted.js", member.addr))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 200);
    for path in paths {
        let (_, cache_status, body) = member.get(path).await;
        assert_eq!(
            &body[..],
            format!("v2 {path}").as_bytes(),
            "{path}: the purged copy came back: {cache_status}"
        );
    }
    assert_eq!(member.metric(LOOKUPS, &["result=\"purged\""]).await, paths.len() as f64);
}

/// A soft purge on the admin port reaches the shared tier as a hard one does: an instance
/// that never held the object (its local miss reads the bucket) does not take the copy the
/// app answered before the purge. (Before: only the hard purge told the tier; the admin port
/// soft-purged the local cache alone, and the next request served the bucket's old copy as
/// a fresh hit.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_soft_purge_on_the_admin_port_is_honoured_by_the_read_through_as_a_hard_one_is() {
    let s3 = S3::start();
    let origin = Origin::start().await;
    let paths = ["/soft.js", "/hard.js"];
    for path in paths {
        origin.fixed(path, ASSET, format!("v1 {path}"));
    }
    let fleet = [
        Member::start(&origin, &s3, &[], &[]).await,
        Member::start(&origin, &s3, &[], &[]).await,
    ];
    for path in paths {
        assert_eq!(&fleet[0].get(path).await.2[..], format!("v1 {path}").as_bytes());
    }
    fleet[0].wait_metric(UPLOADS, &[], paths.len() as f64).await;
    for path in paths {
        origin.fixed(path, ASSET, format!("v2 {path}"));
    }
    // The other instance purges (soft first: a hard purge marks every key), then asks.
    for (path, query) in [("/soft.js", "url=/soft.js&soft=true"), ("/hard.js", "url=/hard.js")] {
        let resp = app_client()
            .post(format!("http://{}/purge?{query}", fleet[1].admin))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{query}");
        let (_, cache_status, body) = fleet[1].get(path).await;
        assert_eq!(
            &body[..],
            format!("v2 {path}").as_bytes(),
            "{path}: the purged copy came from the bucket: {cache_status}"
        );
        assert!(!cache_status.contains("shared-tier"), "{path}: {cache_status}");
    }
    assert_eq!(fleet[1].metric(LOOKUPS, &["result=\"purged\""]).await, 2.0);
}

/// How a [`Relay`] meddles with the S3 server's traffic.
#[derive(Clone, Copy)]
enum Meddle {
    /// Each answer waits this long before it is passed on: a bucket slow, but in time.
    Delay(Duration),
    /// Every PUT is answered `503` (reads pass): a bucket refusing uploads only.
    FailPuts,
}

/// A TCP relay on 127.0.0.1 in front of the S3 server; stops when dropped.
struct Relay {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    async fn start(s3: &S3, meddle: Meddle) -> Relay {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = s3.port;
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    let (mut client_rx, mut client_tx) = client.into_split();
                    let (mut server_rx, mut server_tx) = server.into_split();
                    let asked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                    let asked_up = asked.clone();
                    let up = async move {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match client_rx.read(&mut buf).await {
                                Ok(0) | Err(_) => return None,
                                Ok(n) => n,
                            };
                            if matches!(meddle, Meddle::FailPuts) && buf[..n].starts_with(b"PUT ") {
                                return Some(());
                            }
                            asked_up.store(true, std::sync::atomic::Ordering::SeqCst);
                            if server_tx.write_all(&buf[..n]).await.is_err() {
                                return None;
                            }
                        }
                    };
                    let down = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match server_rx.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if let Meddle::Delay(d) = meddle
                                && asked.swap(false, std::sync::atomic::Ordering::SeqCst)
                            {
                                tokio::time::sleep(d).await;
                            }
                            if client_tx.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        refused = up => {
                            if refused.is_some() {
                                let answer = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
                                let _ = client_tx.write_all(answer).await;
                            }
                        }
                        _ = down => {}
                    }
                });
            }
        });
        Relay { port, task }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

/// A bucket that answers every read in time, but slower than half the timeout, opens the
/// reads' breaker: misses stop paying for it. (Before: only failures counted, so a bucket just
/// inside the timeout cost every miss that long, for ever.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bucket_answering_slowly_but_in_time_opens_the_breaker() {
    let s3 = S3::start();
    let relay = Relay::start(&s3, Meddle::Delay(Duration::from_millis(700))).await;
    let origin = Origin::start().await;
    for i in 0..8 {
        let path = format!("/slow/{i}.js");
        origin.fixed(&path, ASSET, body_of(&path, 500));
    }
    let endpoint = relay.endpoint();
    let env = [
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("SIDECACHE_SHARED_TIER_TIMEOUT", "1s"),
        ("SIDECACHE_SHARED_TIER_COOLDOWN", "60s"),
    ];
    let member = Member::start(&origin, &s3, &[], &env).await;
    for i in 0..5 {
        let path = format!("/slow/{i}.js");
        let (status, _, body) = member.get(&path).await;
        assert_eq!((status, body), (200, body_of(&path, 500)), "{path}");
    }
    assert!(member.metric(BREAKER, &[]).await >= 1.0, "the breaker stayed closed");
    assert!(member.metric(ERRORS, &["op=\"get\"", "kind=\"slow\""]).await >= 5.0);
    assert_eq!(
        member.metric(LOOKUPS, &["result=\"error\""]).await,
        0.0,
        "none timed out"
    );
    assert_eq!(member.metric(BREAKER, &["op=\"get\""]).await, 1.0);
    // The next miss does not wait for the bucket.
    let started = Instant::now();
    let (status, cache_status, _) = member.get("/slow/7.js").await;
    assert_eq!(status, 200);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?} {cache_status}",
        started.elapsed()
    );
    assert_eq!(member.metric(LOOKUPS, &["result=\"skipped\""]).await, 1.0);
}

/// Uploads that fail open the uploads' breaker even though every read between them succeeds,
/// and reads still go. (Before: one breaker counted failures in a row over both, so each read's
/// success hid the upload failure before it, and the breaker never opened.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_uploads_open_their_breaker_though_reads_succeed_between_them() {
    let s3 = S3::start();
    let relay = Relay::start(&s3, Meddle::FailPuts).await;
    let origin = Origin::start().await;
    for i in 0..8 {
        let path = format!("/put/{i}.js");
        origin.fixed(&path, ASSET, body_of(&path, 500));
    }
    let endpoint = relay.endpoint();
    let env = [
        ("AWS_ENDPOINT_URL", endpoint.as_str()),
        ("SIDECACHE_SHARED_TIER_COOLDOWN", "60s"),
    ];
    let member = Member::start(&origin, &s3, &[], &env).await;
    // A read (a miss: success), then its upload (refused), then the next read, in turn.
    for i in 0..5 {
        let path = format!("/put/{i}.js");
        let (status, _, _) = member.get(&path).await;
        assert_eq!(status, 200, "{path}");
        member.wait_metric(ERRORS, &["op=\"put\""], (i + 1) as f64).await;
    }
    assert_eq!(member.metric(LOOKUPS, &["result=\"miss\""]).await, 5.0);
    assert!(member.metric(BREAKER, &[]).await >= 1.0, "the breaker stayed closed");
    assert_eq!(member.metric(BREAKER, &["op=\"put\""]).await, 1.0);
    assert_eq!(member.metric(BREAKER, &["op=\"get\""]).await, 0.0);
    // Reads still go; the next upload is skipped, not tried.
    member.get("/put/6.js").await;
    assert_eq!(member.metric(LOOKUPS, &["result=\"miss\""]).await, 6.0);
    member
        .wait_metric("sidecache_shared_tier_upload_drops_total", &["reason=\"breaker\""], 1.0)
        .await;
    assert_eq!(member.metric(ERRORS, &["op=\"put\""]).await, 5.0);
}

/// Issue 25, item 11: keys are partly the client's choice, and each key of a shareable asset
/// was one PUT. A hundred cache-busting query strings of one asset now cost one upload (the
/// same body is not uploaded again under another key), and distinct bodies stop at the hour's
/// byte budget; what is skipped is counted by reason. (Before: a hundred uploads.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_busting_keys_cost_one_upload_and_bytes_stay_within_the_budget() {
    let s3 = S3::start();
    let origin = Origin::start().await;
    origin.fixed("/app.js", ASSET, body_of("/app.js", 4000));
    for i in 0..20 {
        let path = format!("/big/{i}.js");
        origin.fixed(&path, ASSET, body_of(&path, 100_000));
    }
    let env = [("SIDECACHE_SHARED_TIER_UPLOAD_BUDGET", "600KB")];
    let member = Member::start(&origin, &s3, &[], &env).await;
    let requests = (0..100).map(|n| {
        let member = &member;
        async move {
            let (status, _, body) = member.get(&format!("/app.js?bust={n}")).await;
            assert_eq!((status, body), (200, body_of("/app.js", 4000)));
        }
    });
    futures_util::future::join_all(requests).await;
    assert_eq!(origin.hits("/app.js"), 100, "a hundred keys");
    const DROPS: &str = "sidecache_shared_tier_upload_drops_total";
    member.wait_metric(DROPS, &["reason=\"duplicate\""], 99.0).await;
    assert_eq!(member.metric(UPLOADS, &[]).await, 1.0);
    assert_eq!(listing(&s3.bucket()).await.len(), 1);

    // Distinct bodies: 600 kB an hour is five of these at most; the rest are not uploaded.
    for i in 0..20 {
        let (status, _, _) = member.get(&format!("/big/{i}.js")).await;
        assert_eq!(status, 200);
    }
    let settled = eventually(Duration::from_secs(20), async || {
        member.metric(UPLOADS, &[]).await + member.metric(DROPS, &["reason=\"budget\""]).await >= 21.0
    })
    .await;
    assert!(settled, "every upload went or was counted");
    let uploads = member.metric(UPLOADS, &[]).await;
    assert!((2.0..=6.0).contains(&uploads), "{uploads} uploads");
    assert!(member.metric(DROPS, &["reason=\"budget\""]).await >= 15.0);
    assert_eq!(member.metric(DROPS, &["reason=\"full\""]).await, 0.0);
    assert_eq!(listing(&s3.bucket()).await.len() as f64, uploads);
}
