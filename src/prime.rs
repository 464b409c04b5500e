//! The `prime` subcommand: turns what a deploy hook has (a URL list, the built asset folder, a
//! framework's asset manifest, a sitemap) into a warm cache on this instance. It talks to the
//! sidecar's admin port; the sidecar fetches and stores each object itself, so bodies never
//! travel back to this command. The sidecar's side lives beside it: [`protocol`] (the NDJSON
//! lines both sides read and write) and [`warm`] (the one loop that warms a list, for
//! `POST /prime` and `serve --prime`).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::Value;

pub mod protocol;
pub mod warm;

use protocol::{Failure, Line, WarmResult};

/// Where the list of URLs comes from.
#[derive(Debug, Clone)]
pub enum Input {
    /// One URL or path a line; `-` is standard input.
    Urls(PathBuf),
    /// Every file under a folder, mapped to a URL prefix.
    Dir {
        /// The folder (e.g. the app's built `public/`).
        dir: PathBuf,
        /// The URL prefix it is served under.
        prefix: String,
    },
    /// A framework's asset manifest (format detected).
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// URL prefix overriding the format's default.
        prefix: Option<String>,
    },
    /// A sitemap (or sitemap index) URL.
    Sitemap(String),
}

/// Asset manifest formats, detected from the file's name and shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestFormat {
    /// webpack-manifest-plugin `manifest.json`: `{"main.js": "/static/main.1a2b.js"}`.
    Webpack,
    /// Vite `.vite/manifest.json`: entries with `file`, `css`, `assets`.
    Vite,
    /// Rails Sprockets `.sprockets-manifest-*.json`: `{"files": {...}, "assets": {...}}`.
    Sprockets,
    /// Rails Propshaft `.manifest.json`: `{"app.css": "app-1a2b.css"}` or `{digested_path}`.
    Propshaft,
    /// Django `ManifestStaticFilesStorage` `staticfiles.json`: `{"paths": {...}}`.
    Django,
}

impl ManifestFormat {
    fn default_prefix(self) -> &'static str {
        match self {
            ManifestFormat::Webpack | ManifestFormat::Vite => "/",
            ManifestFormat::Sprockets | ManifestFormat::Propshaft => "/assets/",
            ManifestFormat::Django => "/static/",
        }
    }
}

/// Detects a manifest's format and lists the URLs of every asset it names.
pub fn parse_manifest(
    file_name: &str,
    text: &str,
    prefix: Option<&str>,
) -> anyhow::Result<(ManifestFormat, Vec<String>)> {
    let json: Value = serde_json::from_str(text).context("manifest is not JSON")?;
    let Value::Object(map) = &json else {
        bail!("manifest is not a JSON object")
    };
    let strings = |v: Option<&Value>| -> Vec<String> {
        match v {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect(),
            _ => vec![],
        }
    };
    let (format, paths): (ManifestFormat, Vec<String>) =
        if map.get("files").is_some_and(Value::is_object) && map.get("assets").is_some_and(Value::is_object) {
            let files = map["files"].as_object().expect("checked above");
            (ManifestFormat::Sprockets, files.keys().cloned().collect())
        } else if let Some(Value::Object(paths)) = map.get("paths") {
            (
                ManifestFormat::Django,
                paths.values().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
            )
        } else if map.values().any(|v| v.get("file").is_some_and(Value::is_string)) {
            let mut out = Vec::new();
            for entry in map.values() {
                out.extend(strings(entry.get("file")));
                out.extend(strings(entry.get("css")));
                out.extend(strings(entry.get("assets")));
            }
            (ManifestFormat::Vite, out)
        } else if map.values().any(|v| v.get("digested_path").is_some()) || file_name == ".manifest.json" {
            let out = map
                .values()
                .filter_map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .or_else(|| v.get("digested_path")?.as_str().map(str::to_owned))
                })
                .collect();
            (ManifestFormat::Propshaft, out)
        } else if map.values().all(Value::is_string) {
            (
                ManifestFormat::Webpack,
                map.values().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
            )
        } else {
            bail!("unknown manifest format (webpack, Vite, Sprockets, Propshaft and Django are understood)");
        };
    let prefix = prefix.unwrap_or(format.default_prefix());
    let mut urls: Vec<String> = paths.iter().map(|p| join(prefix, p)).collect();
    urls.sort();
    urls.dedup();
    Ok((format, urls))
}

/// A manifest path under a URL prefix; absolute paths and URLs are kept as they are.
fn join(prefix: &str, path: &str) -> String {
    if path.starts_with('/') || path.starts_with("http://") || path.starts_with("https://") {
        return path.to_owned();
    }
    format!("{}/{}", prefix.trim_end_matches('/'), path.trim_start_matches("./"))
}

/// Every file under `dir`, as URLs under `prefix`. Skipped: precompressed `.gz`/`.br` twins
/// (clients ask for the plain name) and every file or folder whose name starts with a dot:
/// build tools keep their own files there (Vite's `.vite/manifest.json`, `.DS_Store`), which
/// the app does not serve; list such a URL with `--urls` to prime it.
pub fn walk_dir(dir: &Path, prefix: &str) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("failed to read {}", d.display()))? {
            let entry = entry?;
            if entry.file_name().as_encoded_bytes().starts_with(b".") {
                continue;
            }
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path
                .strip_prefix(dir)
                .expect("walked from dir")
                .to_string_lossy()
                .replace('\\', "/");
            if rel.ends_with(".gz") || rel.ends_with(".br") {
                continue;
            }
            out.push(join(prefix, &rel));
        }
    }
    out.sort();
    Ok(out)
}

/// What a sitemap document lists: pages, or (an index) further sitemaps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sitemap {
    /// `<urlset>`: the `<loc>` of each `<url>`.
    Urls(Vec<String>),
    /// `<sitemapindex>`: the `<loc>` of each `<sitemap>`.
    Index(Vec<String>),
}

/// The sitemaps.org namespace; a `<loc>` in another namespace (`<image:loc>`,
/// `<video:loc>`) is not a page of this site.
const SITEMAP_NS: &str = "http://www.sitemaps.org/schemas/sitemap/0.9";

/// Reads a sitemap or sitemap index (sitemaps.org protocol) with a real XML parser: namespace
/// prefixes, CDATA, character references and the predefined entities are understood. Only a
/// `<loc>` directly inside `<urlset><url>` or `<sitemapindex><sitemap>` counts.
pub fn parse_sitemap(xml: &str) -> anyhow::Result<Sitemap> {
    use quick_xml::events::Event;
    use quick_xml::name::ResolveResult;

    let mut reader = quick_xml::NsReader::from_str(xml);
    // Element local names from the root down to the current one.
    let mut path: Vec<String> = Vec::new();
    let mut root: Option<String> = None;
    let mut locs = Vec::new();
    // The text of the `<loc>` being read, when in one.
    let mut loc: Option<String> = None;
    loop {
        let at = reader.buffer_position();
        let (ns, event) = reader
            .read_resolved_event()
            .with_context(|| format!("sitemap is not well-formed XML (at byte {at})"))?;
        let in_sitemap_ns =
            matches!(ns, ResolveResult::Unbound) || matches!(ns, ResolveResult::Bound(n) if n.0 == SITEMAP_NS);
        match event {
            Event::Start(e) => {
                let name = e.local_name().as_ref().to_owned();
                root.get_or_insert_with(|| name.clone());
                path.push(name);
                let entry = matches!(
                    path.iter().map(String::as_str).collect::<Vec<_>>()[..],
                    ["urlset", "url", "loc"] | ["sitemapindex", "sitemap", "loc"]
                );
                if entry && in_sitemap_ns {
                    loc = Some(String::new());
                }
            }
            Event::Empty(e) => {
                let name = e.local_name().as_ref().to_owned();
                root.get_or_insert(name);
            }
            Event::End(_) => {
                if path.len() == 3
                    && let Some(text) = loc.take()
                {
                    let text = text.trim();
                    if !text.is_empty() {
                        locs.push(text.to_owned());
                    }
                }
                path.pop();
            }
            Event::Text(t) => {
                if let Some(text) = loc.as_mut() {
                    text.push_str(&t.xml10_content());
                }
            }
            Event::CData(t) => {
                if let Some(text) = loc.as_mut() {
                    text.push_str(&t.xml10_content());
                }
            }
            Event::GeneralRef(r) => {
                if let Some(text) = loc.as_mut() {
                    let name = r.xml10_content();
                    if let Some(c) = r.resolve_char_ref().context("bad character reference in a sitemap")? {
                        text.push(c);
                    } else if let Some(s) = quick_xml::escape::resolve_predefined_entity(&name) {
                        text.push_str(s);
                    } else {
                        bail!("unknown entity `&{name};` in a sitemap");
                    }
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    match root.as_deref() {
        Some("urlset") => Ok(Sitemap::Urls(locs)),
        Some("sitemapindex") => Ok(Sitemap::Index(locs)),
        Some(other) => bail!("not a sitemap: the root element is <{other}>, not <urlset> or <sitemapindex>"),
        None => bail!("not a sitemap: no root element"),
    }
}

/// The public address users reach the app by (`--host`): a host name with an optional port,
/// and the scheme when one was given. `https://www.example.com` is the Host
/// `www.example.com` reached over https, never a Host header of that spelling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicHost {
    /// `https` or `http` when `--host` named one.
    pub scheme: Option<&'static str>,
    /// Host name and optional port: the Host header and the cache key's host.
    pub authority: String,
}

impl PublicHost {
    /// Reads `www.example.com`, `www.example.com:8443` or `https://www.example.com` (a trailing
    /// `/` allowed); a path, query, user or another scheme is refused, naming what to give.
    pub fn parse(text: &str) -> Result<PublicHost, String> {
        let text = text.trim();
        let refuse = || {
            format!(
                "--host `{text}` is not a host: give the name users reach the app by (www.example.com) or a scheme and that name (https://www.example.com)"
            )
        };
        let (scheme, rest) = match text.split_once("://") {
            Some((s, rest)) if s.eq_ignore_ascii_case("https") => (Some("https"), rest),
            Some((s, rest)) if s.eq_ignore_ascii_case("http") => (Some("http"), rest),
            Some(_) => return Err(refuse()),
            None => (None, text),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        match rest.parse::<http::uri::Authority>() {
            Ok(a) if !rest.is_empty() && !rest.contains(['@', '/', '?', '#']) => Ok(PublicHost {
                scheme,
                authority: a.as_str().to_ascii_lowercase(),
            }),
            _ => Err(refuse()),
        }
    }

    /// A line of a list as the sidecar is to fetch it: a path becomes an absolute URL when
    /// the scheme is known (the sidecar keys it by that scheme); an absolute URL is kept.
    pub fn target(&self, line: &str) -> String {
        match self.scheme {
            Some(scheme) if line.starts_with('/') => format!("{scheme}://{}{line}", self.authority),
            _ => line.to_owned(),
        }
    }
}

/// Settings of one prime run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The sidecar's admin address.
    pub target: String,
    /// Admin bearer token.
    pub token: Option<crate::config::Secret>,
    /// The public Host the app is reached by (part of the cache key).
    pub host: Option<PublicHost>,
    /// Fill from this base URL instead of the app.
    pub from: Option<String>,
    /// Objects the sidecar fetches at once.
    pub concurrency: usize,
    /// Extra rounds for failed objects.
    pub retries: u32,
    /// Per-object time limit.
    pub timeout: Duration,
    /// How long to wait for the sidecar to be ready.
    pub wait: Duration,
    /// Failures tolerated before the exit status says so.
    pub max_failures: usize,
    /// Print a JSON summary instead of text.
    pub json: bool,
}

/// What a run achieved.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    /// Fetched and stored now.
    pub warmed: usize,
    /// Already stored and fresh.
    pub warm: usize,
    /// Failed after all retries: (url, why).
    pub failed: Vec<(String, String)>,
    /// Bytes fetched and stored.
    pub bytes: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Lists the URLs of a file input (a list, a folder, a manifest). A sitemap is read through
/// the sidecar by [`command`], not here.
pub fn collect(input: &Input) -> anyhow::Result<Vec<String>> {
    match input {
        Input::Urls(path) => {
            let text = if path.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("failed to read standard input")?
            } else {
                std::fs::read_to_string(path).with_context(|| format!("failed to read {}", path.display()))?
            };
            Ok(text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .collect())
        }
        Input::Dir { dir, prefix } => walk_dir(dir, prefix),
        Input::Manifest { path, prefix } => {
            let text = std::fs::read_to_string(path).with_context(|| format!("failed to read {}", path.display()))?;
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let (_, urls) = parse_manifest(name, &text, prefix.as_deref())
                .with_context(|| format!("failed to read manifest {}", path.display()))?;
            Ok(urls)
        }
        Input::Sitemap(_) => bail!("a sitemap is read through the sidecar (sidecache prime --sitemap)"),
    }
}

/// Most sitemaps one run reads (an index and the sitemaps it names).
const MAX_SITEMAPS: usize = 50;

/// Largest sitemap document read (the sitemaps.org limit, uncompressed).
const MAX_SITEMAP_BYTES: usize = 50 << 20;

/// The pages a sitemap (or sitemap index) lists, each document fetched through the sidecar
/// (`POST /prime/sitemap`) as this instance's app serves it under the public Host: during a
/// deploy the public URL may still be served by the previous release, or not be reachable
/// from here at all.
async fn read_sitemap(client: &reqwest::Client, opts: &Options, url: &str) -> anyhow::Result<Vec<String>> {
    let target = match &opts.host {
        Some(host) => host.target(url),
        None if url.starts_with('/') => {
            bail!("--host is required for a sitemap path: it is the Host your users reach the app by")
        }
        None => url.to_owned(),
    };
    let mut urls = Vec::new();
    let mut queue = vec![target];
    let mut fetched = 0;
    while let Some(u) = queue.pop() {
        fetched += 1;
        if fetched > MAX_SITEMAPS {
            bail!("sitemap index names more than {MAX_SITEMAPS} sitemaps");
        }
        let mut query = form_urlencoded::Serializer::new(String::new());
        query.append_pair("url", &u);
        if let Some(host) = &opts.host {
            query.append_pair("host", &host.authority);
        }
        let mut req = client.post(format!(
            "{}/prime/sitemap?{}",
            opts.target.trim_end_matches('/'),
            query.finish()
        ));
        if let Some(token) = opts.token.as_ref().map(|t| t.expose()).filter(|t| !t.is_empty()) {
            req = req.bearer_auth(token);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("failed to read sitemap {u} through the sidecar at {}", opts.target))?;
        let status = resp.status();
        let body = read_limited(resp, MAX_SITEMAP_BYTES)
            .await
            .with_context(|| format!("failed to read sitemap {u}"))?;
        if !status.is_success() {
            bail!(
                "failed to read sitemap {u} through the sidecar ({status}): {}",
                String::from_utf8_lossy(&body).trim()
            );
        }
        let xml = String::from_utf8(body).with_context(|| format!("sitemap {u} is not UTF-8"))?;
        match parse_sitemap(&xml).with_context(|| format!("failed to read sitemap {u}"))? {
            Sitemap::Index(locs) => queue.extend(locs),
            Sitemap::Urls(locs) => urls.extend(locs),
        }
    }
    Ok(urls)
}

/// A response's body, refused beyond `limit` bytes.
async fn read_limited(resp: reqwest::Response, limit: usize) -> anyhow::Result<Vec<u8>> {
    use futures_util::StreamExt as _;
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        body.extend_from_slice(&chunk?);
        if body.len() > limit {
            bail!("larger than {} MiB", limit >> 20);
        }
    }
    Ok(body)
}

/// The `prime` subcommand: lists the input's URLs, primes them through the sidecar, prints the
/// summary and each failure; the exit status (1 when more than `max_failures` failed).
pub async fn command(input: &Input, opts: &Options) -> anyhow::Result<u8> {
    let urls = match input {
        Input::Sitemap(url) => {
            let client = crate::http_client().timeout(Duration::from_secs(60)).build()?;
            wait_ready(&client, opts).await?;
            read_sitemap(&client, opts, url).await?
        }
        _ => collect(input)?,
    };
    let summary = run(urls, opts).await?;
    if opts.json {
        println!("{}", summary.json());
    } else {
        println!("{}", summary.line());
    }
    for (url, why) in &summary.failed {
        eprintln!("failed: {url}: {why}");
    }
    Ok(if summary.failed.len() > opts.max_failures { 1 } else { 0 })
}

/// Primes `urls` through the sidecar at `opts.target`, following progress.
pub async fn run(urls: Vec<String>, opts: &Options) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let client = crate::http_client().build()?;
    if opts.host.is_none() && urls.iter().any(|u| u.starts_with('/')) {
        bail!("--host is required for paths: it is the Host your users reach the app by (part of the cache key)");
    }
    wait_ready(&client, opts).await?;
    let progress = Progress::new(urls.len(), opts.json);
    let mut summary = Summary::default();
    let mut pending: Vec<String> = match &opts.host {
        Some(host) => urls.iter().map(|u| host.target(u)).collect(),
        None => urls,
    };
    for round in 0..=opts.retries {
        if pending.is_empty() {
            break;
        }
        if round > 0 {
            // Backoff before retrying what failed: 1 s, 2 s, 4 s, ...
            tokio::time::sleep(Duration::from_secs(1 << (round - 1).min(5))).await;
        }
        let last = round == opts.retries;
        let failed = submit(&client, opts, &pending, &mut summary, &progress, last).await?;
        pending = failed
            .into_iter()
            .filter(|(_, why)| !why.is_final())
            .map(|(u, _)| u)
            .collect();
    }
    progress.finish();
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

async fn wait_ready(client: &reqwest::Client, opts: &Options) -> anyhow::Result<()> {
    let deadline = Instant::now() + opts.wait;
    let url = format!("{}/readyz", opts.target.trim_end_matches('/'));
    let mut told = false;
    loop {
        if let Ok(resp) = client.get(&url).timeout(Duration::from_secs(2)).send().await
            && resp.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the sidecar at {} was not ready within {:?}", opts.target, opts.wait);
        }
        if !told && !opts.json {
            eprintln!("waiting for the sidecar at {} to be ready...", opts.target);
            told = true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// One round: posts the list, reads one JSON line per URL. Returns the failures.
async fn submit(
    client: &reqwest::Client,
    opts: &Options,
    urls: &[String],
    summary: &mut Summary,
    progress: &Progress,
    last: bool,
) -> anyhow::Result<Vec<(String, Failure)>> {
    let mut query = form_urlencoded::Serializer::new(String::new());
    query
        .append_pair("host", opts.host.as_ref().map_or("localhost", |h| h.authority.as_str()))
        .append_pair("concurrency", &opts.concurrency.to_string())
        .append_pair("timeout", &opts.timeout.as_secs().max(1).to_string());
    if let Some(from) = &opts.from {
        query.append_pair("from", from);
    }
    let query = query.finish();
    let mut req = client
        .post(format!("{}/prime?{query}", opts.target.trim_end_matches('/')))
        .body(urls.join("\n"));
    if let Some(token) = opts.token.as_ref().map(|t| t.expose()).filter(|t| !t.is_empty()) {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await.context("failed to reach the sidecar's admin port")?;
    if !resp.status().is_success() {
        bail!(
            "the sidecar refused to prime ({}): {}",
            resp.status(),
            resp.text().await.unwrap_or_default().trim()
        );
    }
    let mut failed = Vec::new();
    let mut seen = 0;
    let mut buf = Vec::new();
    let mut stream = resp.bytes_stream();
    use futures_util::StreamExt as _;
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk.context("lost the sidecar's progress stream")?);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let line: Line =
                serde_json::from_slice(&line).context("unreadable line in the sidecar's progress stream")?;
            seen += 1;
            match line.result {
                WarmResult::Warmed { bytes } => {
                    summary.warmed += 1;
                    summary.bytes += bytes;
                    progress.advance(false);
                }
                WarmResult::AlreadyWarm { .. } => {
                    summary.warm += 1;
                    progress.advance(false);
                }
                WarmResult::Failed(why) => {
                    if last || why.is_final() {
                        progress.advance(true);
                        summary.failed.push((line.url.clone(), why.to_string()));
                    }
                    failed.push((line.url, why));
                }
            }
        }
    }
    if seen < urls.len() {
        bail!("the sidecar answered for {seen} of {} URLs", urls.len());
    }
    Ok(failed)
}

/// A bar on a terminal, plain lines in deploy logs, nothing with --json.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: usize,
    done: std::sync::atomic::AtomicUsize,
    failed: std::sync::atomic::AtomicUsize,
    last_line: std::sync::Mutex<Instant>,
    quiet: bool,
}

impl Progress {
    fn new(total: usize, quiet: bool) -> Progress {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(total as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template("priming {bar:40} {pos}/{len} done {elapsed}") {
                bar.set_style(style);
            }
            bar
        });
        Progress {
            bar,
            total,
            done: Default::default(),
            failed: Default::default(),
            last_line: std::sync::Mutex::new(Instant::now()),
            quiet,
        }
    }

    /// One URL settled: warmed or warm, or (`failed`) failed for good.
    fn advance(&self, failed: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        let done = self.done.fetch_add(1, Relaxed) + 1;
        let failed = self.failed.fetch_add(usize::from(failed), Relaxed) + usize::from(failed);
        if let Some(bar) = &self.bar {
            bar.inc(1);
            return;
        }
        if self.quiet {
            return;
        }
        let mut last = self.last_line.lock().unwrap_or_else(|p| p.into_inner());
        if last.elapsed() >= Duration::from_secs(2) || done == self.total {
            // What is settled, not what is primed: failures are among the `done`.
            eprintln!("prime: {done}/{} done, {failed} failed", self.total);
            *last = Instant::now();
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Summary {
    /// The human summary line.
    pub fn line(&self) -> String {
        format!(
            "primed {} of {} objects: {} warmed, {} already warm, {} failed, {} bytes in {:.1} s",
            self.warmed + self.warm,
            self.warmed + self.warm + self.failed.len(),
            self.warmed,
            self.warm,
            self.failed.len(),
            self.bytes,
            self.seconds
        )
    }

    /// The machine summary.
    pub fn json(&self) -> Value {
        serde_json::json!({
            "warmed": self.warmed,
            "warm": self.warm,
            "failed": self.failed.iter().map(|(u, e)| serde_json::json!({"url": u, "error": e})).collect::<Vec<_>>(),
            "bytes": self.bytes,
            "seconds": self.seconds,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_manifest_format_is_detected_and_listed() {
        let rows: &[(&str, &str, ManifestFormat, &[&str])] = &[
            (
                "manifest.json",
                r#"{"main.js": "/static/js/main.1a2b3c4d.js", "main.css": "static/css/main.5e6f.css"}"#,
                ManifestFormat::Webpack,
                &["/static/css/main.5e6f.css", "/static/js/main.1a2b3c4d.js"],
            ),
            (
                "manifest.json",
                r#"{"src/main.ts": {"file": "assets/main-4889e940.js", "css": ["assets/main-b82dbe22.css"],
                    "assets": ["assets/logo-03d6d6da.svg"], "isEntry": true},
                    "_shared.js": {"file": "assets/shared-ChJ_j-JJ.js"}}"#,
                ManifestFormat::Vite,
                &[
                    "/assets/logo-03d6d6da.svg",
                    "/assets/main-4889e940.js",
                    "/assets/main-b82dbe22.css",
                    "/assets/shared-ChJ_j-JJ.js",
                ],
            ),
            (
                ".sprockets-manifest-8e5a.json",
                r#"{"files": {"application-abc.js": {"logical_path": "application.js"}, "application-def.css": {}},
                    "assets": {"application.js": "application-abc.js"}}"#,
                ManifestFormat::Sprockets,
                &["/assets/application-abc.js", "/assets/application-def.css"],
            ),
            (
                ".manifest.json",
                r#"{"application.css": "application-6d58c9e6.css", "logo.svg": "logo-1f2e3d4c.svg"}"#,
                ManifestFormat::Propshaft,
                &["/assets/application-6d58c9e6.css", "/assets/logo-1f2e3d4c.svg"],
            ),
            (
                ".manifest.json",
                r#"{"app.js": {"digested_path": "app-7a8b9c0d.js", "integrity": "sha384-x"}}"#,
                ManifestFormat::Propshaft,
                &["/assets/app-7a8b9c0d.js"],
            ),
            (
                "staticfiles.json",
                r#"{"paths": {"css/base.css": "css/base.5af66c1b1797.css"}, "version": "1.1", "hash": "x"}"#,
                ManifestFormat::Django,
                &["/static/css/base.5af66c1b1797.css"],
            ),
        ];
        for (name, text, format, urls) in rows {
            let (got_format, got) = parse_manifest(name, text, None).unwrap();
            assert_eq!(got_format, *format, "{name}");
            assert_eq!(got, urls.iter().map(|s| s.to_string()).collect::<Vec<_>>(), "{name}");
        }
        let (_, custom) =
            parse_manifest("staticfiles.json", r#"{"paths": {"a.css": "a.1.css"}}"#, Some("/s/")).unwrap();
        assert_eq!(custom, vec!["/s/a.1.css"]);
        assert!(parse_manifest("m.json", "[1,2]", None).is_err());
        assert!(parse_manifest("m.json", r#"{"a": 1}"#, None).is_err());
    }

    #[test]
    fn a_host_is_a_name_with_an_optional_scheme_and_port() {
        let host = |s| PublicHost::parse(s);
        let https = host("https://WWW.example.com/").unwrap();
        assert_eq!(https.scheme, Some("https"));
        assert_eq!(https.authority, "www.example.com");
        assert_eq!(https.target("/a.js?v=1"), "https://www.example.com/a.js?v=1");
        assert_eq!(https.target("http://cdn.example/a.js"), "http://cdn.example/a.js");
        let bare = host("www.example.com:8443").unwrap();
        assert_eq!((bare.scheme, bare.authority.as_str()), (None, "www.example.com:8443"));
        assert_eq!(bare.target("/a.js"), "/a.js", "the sidecar keys a path by its default");
        assert_eq!(host("http://localhost").unwrap().scheme, Some("http"));
        for bad in [
            "",
            "https://",
            "https://www.example.com/app",
            "ftp://x.example",
            "u@x.example",
            "x.example?q",
        ] {
            assert!(host(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_folder_walk_skips_dot_files_and_compressed_twins() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "a.js",
            "a.js.br",
            ".vite/manifest.json",
            "img/.DS_Store",
            "img/logo.svg",
            ".well-known/x",
        ] {
            let path = dir.path().join(f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, "x").unwrap();
        }
        assert_eq!(walk_dir(dir.path(), "/s/").unwrap(), vec!["/s/a.js", "/s/img/logo.svg"]);
    }

    #[test]
    fn sitemaps_yield_their_locations() {
        let xml = r#"<?xml version="1.0"?><urlset><url><loc> https://www.example.com/a?x=1&amp;y=2 </loc></url>
            <url><loc>https://www.example.com/b</loc></url></urlset>"#;
        assert_eq!(
            parse_sitemap(xml).unwrap(),
            Sitemap::Urls(vec![
                "https://www.example.com/a?x=1&y=2".into(),
                "https://www.example.com/b".into()
            ])
        );
    }

    #[test]
    fn sitemaps_are_read_as_xml_not_as_text() {
        // CDATA, character references, predefined entities, a namespace prefix, a space in
        // the tag, and an image extension's <image:loc> that is not a page.
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
            <sm:urlset xmlns:sm="http://www.sitemaps.org/schemas/sitemap/0.9"
                       xmlns:image="http://www.google.com/schemas/sitemap-image/1.1">
              <sm:url><sm:loc><![CDATA[https://e.example/a?x=1&y=2]]></sm:loc>
                <image:image><image:loc>https://img.example/a.png</image:loc></image:image></sm:url>
              <sm:url><sm:loc >https://e.example/b?q=&lt;&#x3E;&#38;</sm:loc ></sm:url>
              <!-- <sm:url><sm:loc>https://e.example/commented-out</sm:loc></sm:url> -->
            </sm:urlset>"#;
        assert_eq!(
            parse_sitemap(xml).unwrap(),
            Sitemap::Urls(vec![
                "https://e.example/a?x=1&y=2".into(),
                "https://e.example/b?q=<>&".into()
            ])
        );
        let index = r#"<sitemapindex xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">
            <sitemap><loc>https://e.example/s1.xml</loc></sitemap></sitemapindex>"#;
        assert_eq!(
            parse_sitemap(index).unwrap(),
            Sitemap::Index(vec!["https://e.example/s1.xml".into()])
        );
        // A <loc> in another namespace is not a page of the sitemap.
        let foreign = r#"<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9" xmlns:o="urn:other">
            <url><o:loc>https://e.example/other</o:loc></url></urlset>"#;
        assert_eq!(parse_sitemap(foreign).unwrap(), Sitemap::Urls(vec![]));
        assert!(
            parse_sitemap("<urlset><url><loc>a</url></urlset>").is_err(),
            "mismatched tags"
        );
        assert!(parse_sitemap("<urlset><url><loc>&nbsp;</loc></url></urlset>").is_err());
        assert!(parse_sitemap("<html><body>not found</body></html>").is_err());
    }
}
