//! The load benchmark's helpers (driven by `benches/load/run.py`):
//!
//! - `origin PORT`: the app. `GET /a/<size>/<name>` answers `size` bytes of a pattern picked by
//!   `name`, cacheable for a day; `/js/<size>/<name>` the same for `size` bytes of JavaScript-like
//!   text (compresses as minified scripts do); `/slow/...` the pattern after 500 ms;
//!   `/__stats` the number of asset requests served so far.
//! - `gen DIR KIND COUNT`: writes the same bodies as files, for nginx serving them directly.
//! - `fetch BASE PREFIX COUNT CONCURRENCY`: fetches `COUNT` distinct objects once each (the cold
//!   fill), checks every byte, prints JSON. A `js:` prefix fetches the JavaScript set. The Host
//!   sent is BASE, or `LOADTOOL_HOST` when set.
//! - `herd URL CLIENTS`: connects `CLIENTS` clients, then sends all their requests at once;
//!   prints completion times as JSON.
//!
//! Every address is 127.0.0.1.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

/// The largest body the origin serves.
const MAX_SIZE: usize = 16 << 20;
/// Bodies start at one of this many offsets into the pattern, picked by name.
const OFFSETS: usize = 4096;

fn pattern() -> &'static Bytes {
    static PATTERN: OnceLock<Bytes> = OnceLock::new();
    PATTERN.get_or_init(|| {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let bytes: Vec<u8> = (0..MAX_SIZE + OFFSETS)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        Bytes::from(bytes)
    })
}

/// JavaScript-like text: statements built from a vocabulary with varied identifiers and
/// numbers, so brotli, zstd and gzip find the repeats they find in minified scripts (a 3-6x
/// ratio), not a period.
fn script() -> &'static Bytes {
    static SCRIPT: OnceLock<Bytes> = OnceLock::new();
    SCRIPT.get_or_init(|| {
        const WORDS: &[&str] = &[
            "function",
            "return",
            "const",
            "let",
            "this",
            "props",
            "state",
            "render",
            "value",
            "index",
            "length",
            "push",
            "map",
            "filter",
            "reduce",
            "Promise",
            "resolve",
            "then",
            "catch",
            "error",
            "document",
            "window",
            "querySelector",
            "addEventListener",
            "dispatch",
            "payload",
            "type",
            "undefined",
            "null",
            "true",
            "false",
            "Object",
            "keys",
            "assign",
            "Array",
            "isArray",
        ];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut out = String::with_capacity(MAX_SIZE + OFFSETS + 256);
        while out.len() < MAX_SIZE + OFFSETS {
            let (a, b, c) = (next(), next(), next());
            let w = |x: u64| WORDS[(x % WORDS.len() as u64) as usize];
            let ident: String = (0..2 + a % 5)
                .map(|i| (b'a' + ((b >> (i * 5)) % 26) as u8) as char)
                .collect();
            match c % 4 {
                0 => out.push_str(&format!(
                    "function {ident}({}, {}) {{ return {}.{}({}); }}\n",
                    w(a),
                    w(b),
                    w(c),
                    w(a >> 8),
                    b % 1000
                )),
                1 => out.push_str(&format!(
                    "const {ident} = {}.{}[{}] || {};\n",
                    w(b),
                    w(c),
                    a % 97,
                    w(a >> 16)
                )),
                2 => out.push_str(&format!(
                    "if ({ident}.{} === {}) {{ {}.{}(\"{ident}-{}\"); }}\n",
                    w(a),
                    b % 10000,
                    w(c),
                    w(b >> 8),
                    c % 512
                )),
                _ => out.push_str(&format!(
                    "{ident}.{}({}, function({}) {{ {} {}; }});\n",
                    w(c),
                    w(a),
                    w(b),
                    w(a >> 24),
                    ident
                )),
            }
        }
        out.truncate(MAX_SIZE + OFFSETS);
        Bytes::from(out)
    })
}

/// The body of `/js/<size>/<name>`.
fn script_of(size: usize, name: &str) -> Bytes {
    let offset = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let offset = (offset % OFFSETS as u64) as usize;
    script().slice(offset..offset + size.min(MAX_SIZE))
}

/// The body of a generated path, by its kind.
fn body_for(kind: &str, size: usize, name: &str) -> Bytes {
    match kind {
        "js" => script_of(size, name),
        _ => body_of(size, name),
    }
}

/// The body of `/a/<size>/<name>`.
fn body_of(size: usize, name: &str) -> Bytes {
    let offset = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let offset = (offset % OFFSETS as u64) as usize;
    pattern().slice(offset..offset + size.min(MAX_SIZE))
}

/// Size of the `i`th object of the mixed and churn sets: 1 to 48 KiB.
fn mixed_size(i: usize) -> usize {
    1024 * (1 + (i * 7919) % 48)
}

/// `(size, name)` from a path `/<kind>/<size>/<name>`.
fn parse(path: &str) -> Option<(&str, usize, &str)> {
    let mut parts = path.trim_start_matches('/').splitn(3, '/');
    let kind = parts.next()?;
    let size = parts.next()?.parse().ok()?;
    let name = parts.next()?;
    Some((kind, size, name))
}

async fn origin(port: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    let served = Arc::new(AtomicU64::new(0));
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let served = served.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let served = served.clone();
                async move { Ok::<_, Infallible>(answer(req.uri().path(), &served).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(path: &str, served: &AtomicU64) -> Response<Full<Bytes>> {
    if path == "/__stats" {
        return Response::new(Full::new(Bytes::from(served.load(Ordering::SeqCst).to_string())));
    }
    let Some((kind, size, name)) = parse(path).filter(|(k, s, _)| matches!(*k, "a" | "js" | "slow") && *s <= MAX_SIZE)
    else {
        let mut not_found = Response::new(Full::new(Bytes::new()));
        *not_found.status_mut() = StatusCode::NOT_FOUND;
        return not_found;
    };
    served.fetch_add(1, Ordering::SeqCst);
    if kind == "slow" {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let body = body_for(kind, size, name);
    let content_type = match kind {
        "js" => "application/javascript; charset=utf-8",
        _ => "application/octet-stream",
    };
    Response::builder()
        .header("content-type", content_type)
        .header("cache-control", "public, max-age=86400")
        .header("last-modified", "Sun, 01 Nov 2026 00:00:00 GMT")
        .header("etag", format!("\"{size}-{name}\""))
        .body(Full::new(body))
        .expect("valid response")
}

/// Writes the files nginx serves directly: `hot` (1 KiB, 128 KiB, 1 MiB objects named `hot`)
/// or `mixed` (`COUNT` objects `m<i>`).
fn generate(dir: &str, kind: &str, count: usize) -> anyhow::Result<()> {
    let write = |size: usize, name: &str| -> anyhow::Result<()> {
        let folder = format!("{dir}/a/{size}");
        std::fs::create_dir_all(&folder)?;
        std::fs::write(format!("{folder}/{name}"), body_of(size, name))?;
        Ok(())
    };
    match kind {
        "hot" => [1 << 10, 128 << 10, 1 << 20].iter().try_for_each(|&s| write(s, "hot")),
        "mixed" => (0..count).try_for_each(|i| write(mixed_size(i), &format!("m{i}"))),
        other => anyhow::bail!("unknown set {other}"),
    }
}

/// One keep-alive HTTP/1.1 connection.
async fn connect(addr: SocketAddr) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// GETs `path` and checks the body is the origin's, byte for byte.
async fn get(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    host: &str,
    path: &str,
) -> anyhow::Result<usize> {
    sender.ready().await?;
    // The Host wrk sends, so both fill the same cache keys.
    let req = Request::get(path).header("host", host).body(Empty::new())?;
    let res = sender.send_request(req).await?;
    anyhow::ensure!(res.status() == StatusCode::OK, "status {}", res.status());
    let body = res.into_body().collect().await?.to_bytes();
    let (kind, size, name) = parse(path).expect("a generated path");
    anyhow::ensure!(
        body == body_for(kind, size, name),
        "body of {path} differs from the origin's"
    );
    Ok(body.len())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(mut millis: Vec<f64>, errors: usize, bytes: u64, seconds: f64) {
    millis.sort_by(f64::total_cmp);
    println!(
        "{{\"requests\": {}, \"errors\": {errors}, \"bytes\": {bytes}, \"seconds\": {seconds:.4}, \
         \"p50_ms\": {:.3}, \"p99_ms\": {:.3}, \"max_ms\": {:.3}}}",
        millis.len(),
        percentile(&millis, 0.5),
        percentile(&millis, 0.99),
        millis.last().copied().unwrap_or(0.0),
    );
}

async fn fetch(addr: SocketAddr, prefix: String, count: usize, concurrency: usize) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (next, errors, bytes, prefix) = (next.clone(), errors.clone(), bytes.clone(), prefix.clone());
        // The Host is part of the cache key: a fleet's instances share one (LOADTOOL_HOST).
        let host = std::env::var("LOADTOOL_HOST").unwrap_or_else(|_| addr.to_string());
        workers.push(tokio::spawn(async move {
            let mut millis = Vec::new();
            let mut sender = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return millis;
                }
                let path = match prefix.strip_prefix("js:") {
                    Some(name) => format!("/js/{}/{name}{i}", mixed_size(i)),
                    None => format!("/a/{}/{prefix}{i}", mixed_size(i)),
                };
                let at = Instant::now();
                let result = tokio::time::timeout(Duration::from_secs(60), async {
                    if sender.is_none() {
                        sender = Some(connect(addr).await?);
                    }
                    get(sender.as_mut().expect("connected"), &host, &path).await
                })
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer in 60 s")));
                match result {
                    Ok(n) => {
                        bytes.fetch_add(n as u64, Ordering::Relaxed);
                        millis.push(at.elapsed().as_secs_f64() * 1e3);
                    }
                    Err(e) => {
                        eprintln!("{path}: {e}");
                        errors.fetch_add(1, Ordering::Relaxed);
                        sender = None;
                    }
                }
            }
        }));
    }
    let mut millis = Vec::new();
    for w in workers {
        millis.extend(w.await?);
    }
    let seconds = started.elapsed().as_secs_f64();
    report(
        millis,
        errors.load(Ordering::Relaxed),
        bytes.load(Ordering::Relaxed),
        seconds,
    );
    Ok(())
}

async fn herd(addr: SocketAddr, path: String, clients: usize) -> anyhow::Result<()> {
    let mut senders = Vec::new();
    for _ in 0..clients {
        senders.push(connect(addr).await?);
    }
    let start = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let mut tasks = Vec::new();
    for mut sender in senders {
        let (start, path) = (start.clone(), path.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let at = Instant::now();
            let result = get(&mut sender, &addr.to_string(), &path).await;
            (result, at.elapsed().as_secs_f64() * 1e3)
        }));
    }
    let started = Instant::now();
    start.wait().await;
    let (mut millis, mut errors, mut bytes) = (Vec::new(), 0, 0u64);
    for t in tasks {
        match t.await? {
            (Ok(n), ms) => {
                bytes += n as u64;
                millis.push(ms);
            }
            (Err(e), _) => {
                eprintln!("{path}: {e}");
                errors += 1;
            }
        }
    }
    report(millis, errors, bytes, started.elapsed().as_secs_f64());
    Ok(())
}

fn usage() -> ! {
    eprintln!(
        "usage: loadtool origin PORT | gen DIR hot|mixed COUNT | fetch ADDR PREFIX COUNT CONCURRENCY | herd ADDR PATH CLIENTS"
    );
    std::process::exit(2)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or_else(|| usage());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match arg(0) {
        "origin" => runtime.block_on(origin(arg(1).parse()?)),
        "gen" => generate(arg(1), arg(2), arg(3).parse()?),
        "fetch" => runtime.block_on(fetch(arg(1).parse()?, arg(2).into(), arg(3).parse()?, arg(4).parse()?)),
        "herd" => runtime.block_on(herd(arg(1).parse()?, arg(2).into(), arg(3).parse()?)),
        _ => usage(),
    }
}
