//! Test support: an in-process origin, an in-process sidecar on 127.0.0.1:0 with a temp cache
//! dir, and a harness around the real `sidecache` binary. Not every test module uses every helper.
#![allow(dead_code)]

pub mod origin;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sidecache::config::{Config, Loader};
use sidecache::sidecar::Sidecar;

pub use origin::{Behaviour, Origin, matches_pattern, pattern_bytes, pattern_chunk};

/// A sidecar running in this process.
pub struct TestSidecar {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub sidecar: std::sync::Arc<Sidecar>,
    pub dir: tempfile::TempDir,
    serving: tokio::task::JoinHandle<bool>,
}

/// A config for tests: loopback, port 0, a fresh temp cache dir, quiet, and no free space kept
/// on the filesystem (`min_free` 0): how full the test machine's disk is must not decide what
/// a test stores (the default 5% shrank every budget to nothing while a build filled a
/// 94%-used disk beside the suite). A test about `min_free` sets it.
pub fn test_config(upstream: &str, dir: &Path) -> Config {
    let flags = vec![
        ("min_free", "0".to_owned()),
        ("listen", "127.0.0.1:0".to_owned()),
        ("admin_listen", "127.0.0.1:0".to_owned()),
        ("upstream", upstream.to_owned()),
        ("cache_dir", dir.join("cache").display().to_string()),
        ("max_size", "64MiB".to_owned()),
        ("access_log", "false".to_owned()),
    ];
    Loader::new(std::iter::empty())
        .flags(flags)
        .load()
        .expect("test config is valid")
}

impl TestSidecar {
    pub async fn start(upstream: &str) -> TestSidecar {
        TestSidecar::start_with(upstream, |_| {}).await
    }

    pub async fn start_with(upstream: &str, tweak: impl FnOnce(&mut Config)) -> TestSidecar {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(upstream, dir.path());
        tweak(&mut config);
        TestSidecar::start_config(config, dir).await
    }

    pub async fn start_config(config: Config, dir: tempfile::TempDir) -> TestSidecar {
        let sidecar = std::sync::Arc::new(Sidecar::start(config).await.unwrap());
        let listener = sidecar.bind_public().await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = sidecar.admin_addr();
        let s = sidecar.clone();
        let serving = tokio::spawn(async move { s.serve(listener).await });
        // Like a deployment waiting on /readyz: the startup index scan is done (fills are
        // refused until the files on disk are counted against the budget).
        let cache = sidecar.proxy.cache().clone();
        assert!(
            eventually(Duration::from_secs(10), async || cache.is_loaded()).await,
            "cache index never loaded"
        );
        TestSidecar {
            addr,
            admin,
            sidecar,
            dir,
            serving,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Stops accepting, drains, and returns whether every connection finished in time.
    pub async fn stop(self) -> bool {
        self.sidecar.shutdown.cancel();
        self.serving.await.unwrap()
    }
}

/// A client that sends a fixed Host, as real clients of one app do: the sidecar's own port
/// changes across restarts in the tests, and the cache key includes the Host.
pub fn app_client() -> reqwest::Client {
    app_client_for("app.example")
}

/// A client that always sends this Host.
pub fn app_client_for(host: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("host", reqwest::header::HeaderValue::from_str(host).unwrap());
    sidecache::http_client()
        .default_headers(headers)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// A plain HTTP/1.1 client with no pooling surprises.
pub fn client() -> reqwest::Client {
    sidecache::http_client()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// The real binary, with its stdout read line by line on a thread.
pub struct Binary {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

/// What a finished command printed, stdout then stderr.
pub fn said(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs the binary with `args` and only `env` in its environment, to its end: (exit code,
/// stdout, stderr).
pub fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(binary_path());
    cmd.args(args).env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn binary_path() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sidecache"))
}

impl Binary {
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Binary {
        let mut cmd = Command::new(binary_path());
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Binary::from_command(cmd)
    }

    /// Runs any command (e.g. a Procfile line through `sh -c`), its stdout read line by line.
    pub fn from_command(mut cmd: Command) -> Binary {
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).stdin(Stdio::null());
        let mut child = cmd.spawn().expect("spawn sidecache");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Binary {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// `sidecache serve` on loopback port 0 in front of `upstream`, caching in `cache_dir`,
    /// with extra flags and environment.
    pub fn serve(upstream: &str, cache_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Binary {
        let cache_dir = cache_dir.to_str().expect("utf-8 temp path");
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];
        args.extend(["--upstream", upstream, "--cache-dir", cache_dir]);
        args.extend_from_slice(extra);
        Binary::spawn(&args, env)
    }

    /// Waits (bounded) for a log line containing `needle`; returns it.
    pub fn wait_line(&mut self, needle: &str) -> String {
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!("no log line with {needle:?}; saw:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Waits (bounded) for the `n`-th log line (from 1) containing `needle`; returns it.
    pub fn wait_nth_line(&mut self, needle: &str, n: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(l) = self.seen.iter().filter(|l| l.contains(needle)).nth(n - 1) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => panic!("no {n}th log line with {needle:?}; saw:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// The address in the `listening` (public) log line.
    pub fn public_addr(&mut self) -> SocketAddr {
        addr_field(&self.wait_line("proxy listening"))
    }

    /// The address in the `admin listening` log line.
    pub fn admin_addr(&mut self) -> SocketAddr {
        addr_field(&self.wait_line("admin listening"))
    }

    pub fn signal(&self, sig: i32) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("a child's pid is positive");
        let sig = rustix::process::Signal::from_named_raw(sig).expect("a named signal");
        rustix::process::kill_process(pid, sig).expect("kill(2) on our own child");
    }

    /// Waits (bounded) for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("sidecache did not exit within {limit:?}");
            }
            // Polling a child's exit status: there is no readiness event to wait on here.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Peak resident memory of the process, from /proc.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc status")
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `addr` field of a log line, text (`addr=1.2.3.4:5`) or JSON (`"addr":"1.2.3.4:5"`).
fn addr_field(line: &str) -> SocketAddr {
    let (start, stop) = match line.find("\"addr\":\"") {
        Some(i) => (i + 8, '"'),
        None => (line.find("addr=").expect("addr field") + 5, ' '),
    };
    let rest = &line[start..];
    let end = rest.find(stop).unwrap_or(rest.len());
    rest[..end].parse().expect("socket address")
}

/// Waits (bounded) until the sidecar whose admin port is `admin` says it is ready (`/readyz`:
/// its index rebuilt), and fails the test if it never does.
pub async fn wait_ready(admin: SocketAddr) {
    let ready = eventually(Duration::from_secs(10), async || {
        client()
            .get(format!("http://{admin}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ready, "sidecar never became ready");
}

/// A free loopback address whose port lies below the kernel's ephemeral range
/// (`ip_local_port_range`), for a test that must know a port before the process that binds it
/// starts: no other test's `bind(127.0.0.1:0)` can be handed it in between (the kernel hands
/// out only ports from that range), as it could a port found by binding to 0 and letting go.
pub fn port_outside_ephemeral_range() -> SocketAddr {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    // Start somewhere that differs between concurrent tests and runs, then walk on.
    let span = low.saturating_sub(1024).max(1) as u64;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let start = (u64::from(std::process::id()) << 20 ^ nanos) % span;
    (0..span)
        .map(|i| 1024 + ((start + i) % span) as u16)
        .map(|port| SocketAddr::from(([127, 0, 0, 1], port)))
        .find(|addr| std::net::TcpListener::bind(addr).is_ok())
        .expect("a free port below the ephemeral range")
}

/// Sends raw bytes to `addr` and reads the answer until the server closes (bounded: 10 s): the
/// caller's last request says `Connection: close`, or is HTTP/1.0.
pub async fn raw_until_close(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("no close within 10 s; read so far:\n{}", String::from_utf8_lossy(&out)),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Retries `f` until it returns true, at most `limit` (readiness, not synchronisation by sleep).
pub async fn eventually(limit: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The peak disk use of a directory while something runs: sampled every millisecond on a
/// thread of its own (the interval keeps it from taking a whole core from what it watches).
pub struct PeakDisk {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u64, u64)>,
}

impl PeakDisk {
    pub fn start(dir: PathBuf) -> PeakDisk {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut peak, mut samples) = (0u64, 0u64);
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(disk_usage(&dir).0);
                samples += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            (peak, samples)
        });
        PeakDisk { stop, thread }
    }

    /// Stops sampling: (the peak in bytes, how many samples were taken).
    pub fn stop(self) -> (u64, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("the sampler ran")
    }
}

/// What the files under `dir` spend on disk, as `du` counts it: allocated blocks of every file
/// and directory (links not followed), the measure the budget keeps to; and how many files
/// (not directories) there are. Bounded walk.
pub fn disk_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let (mut bytes, mut files) = (0, 0);
    let mut stack = vec![dir.to_owned()];
    let mut visited = 0;
    while let Some(d) = stack.pop() {
        visited += 1;
        assert!(visited < 100_000, "runaway walk");
        let Ok(md) = std::fs::symlink_metadata(&d) else {
            continue;
        };
        bytes += md.blocks() * 512;
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for entry in entries.flatten() {
            let Ok(md) = std::fs::symlink_metadata(entry.path()) else {
                continue;
            };
            if md.is_dir() {
                stack.push(entry.path());
            } else {
                bytes += md.blocks() * 512;
                files += 1;
            }
        }
    }
    (bytes, files)
}

/// Sum of a metric's samples whose line contains every one of `labels`.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The admin port's `/metrics` text.
pub async fn scrape(admin: SocketAddr) -> String {
    client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// A small tmpfs (needs root, as in CI), mounted for the test's lifetime: a filesystem that
/// fills up, or is remounted read-only, under a running sidecar.
pub struct Tmpfs(pub tempfile::TempDir);

impl Tmpfs {
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// An image stored under a cache directory: an object's (`body | record | footer`) or a
/// compressed variant's (`coded body | record`), in a file of its own or in a slot of a
/// segment (`objects-v3/segments/*.seg`, read here from each slot's prefix: `"SCSEG001"`,
/// the kind (0: an object, else the coding's id), the image's length at byte 40).
#[derive(Debug, Clone)]
pub struct Image {
    /// The file it is in.
    pub path: PathBuf,
    /// Where it starts in that file.
    pub offset: u64,
    /// Its length.
    pub len: u64,
    /// For a variant: its coding's file suffix (`br`, `zst`, `gz`).
    pub coding: Option<String>,
    /// Its key's hash, in hex.
    pub key: String,
}

impl Image {
    /// Its bytes.
    pub fn read(&self) -> Vec<u8> {
        let all = std::fs::read(&self.path).unwrap();
        all[self.offset as usize..(self.offset + self.len) as usize].to_vec()
    }

    /// Overwrites bytes of it in place, from `at` in the image (same length).
    pub fn write_at(&self, at: u64, bytes: &[u8]) {
        let f = std::fs::OpenOptions::new().write(true).open(&self.path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, bytes, self.offset + at).unwrap();
    }

    /// Whether it is still stored where it was (a slot given back reads as zeros).
    pub fn exists(&self) -> bool {
        images(self.path.parent().unwrap().parent().unwrap().parent().unwrap())
            .iter()
            .any(|i| i.path == self.path && i.offset == self.offset)
    }

    /// Whether it is in a segment rather than a file of its own.
    pub fn in_segment(&self) -> bool {
        self.path.extension().is_some_and(|e| e == "seg")
    }
}

/// Every image under a cache directory: files in the fan-out directories, slots in segments.
pub fn images(cache: &Path) -> Vec<Image> {
    let objects = cache.join("objects-v3");
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(&objects) else {
        return out;
    };
    for fanout in entries.flatten().filter(|e| e.file_name().len() == 2) {
        for f in std::fs::read_dir(fanout.path()).into_iter().flatten().flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            out.push(Image {
                path: f.path(),
                offset: 0,
                len: f.metadata().map(|m| m.len()).unwrap_or(0),
                coding: name.splitn(3, '.').nth(2).map(str::to_owned),
                key: name.split('.').next().unwrap_or_default().to_owned(),
            });
        }
    }
    for seg in std::fs::read_dir(objects.join("segments"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if seg.path().extension().is_none_or(|e| e != "seg") {
            continue;
        }
        let Ok(bytes) = std::fs::read(seg.path()) else { continue };
        let mut at = 0;
        while at + 64 <= bytes.len() {
            if &bytes[at..at + 8] == b"SCSEG001" {
                let len = u64::from_be_bytes(bytes[at + 40..at + 48].try_into().unwrap());
                let coding = match bytes[at + 8] {
                    0 => None,
                    1 => Some("br".to_owned()),
                    2 => Some("zst".to_owned()),
                    _ => Some("gz".to_owned()),
                };
                out.push(Image {
                    path: seg.path(),
                    offset: at as u64 + 64,
                    len,
                    coding,
                    key: bytes[at + 16..at + 32].iter().map(|b| format!("{b:02x}")).collect(),
                });
            }
            at += 4096;
        }
    }
    out
}

/// The objects' images under a cache directory (not their variants').
pub fn object_images(cache: &Path) -> Vec<Image> {
    images(cache).into_iter().filter(|i| i.coding.is_none()).collect()
}

/// The compressed variants' images under a cache directory.
pub fn variant_images(cache: &Path) -> Vec<Image> {
    images(cache).into_iter().filter(|i| i.coding.is_some()).collect()
}
