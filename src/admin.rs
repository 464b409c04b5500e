//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `POST /purge` (by URL, prefix, tag or
//! all; `soft=true` marks stale instead), `GET /objects` (what is stored for a URL, see
//! [`crate::inspect`]), `POST /prime`, `POST /prime/sitemap` (a sitemap read through the cache). Never
//! on the public port, where every path belongs to the app. Bound to loopback by default; with
//! `admin_token` set, purge, objects and prime require `Authorization: Bearer <token>`, and the
//! configuration refuses an admin port beyond loopback without a token. Without a token,
//! `GET /objects` (the one operation a plain GET reaches) requires [`ADMIN_HEADER`]: the app
//! runs on the same loopback, and a URL it can be made to fetch (an SSRF: a GET with no header
//! of the attacker's choosing) must not read every host's keys. A prime's `from` must be inside
//! `prime_sources`.

pub mod client;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use bytes::Bytes;
use futures_util::StreamExt as _;
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::Frame;

use crate::body::{self, ProxyBody};
use crate::cache::Purge;
use crate::prime::warm::{Job, warm_all};
use crate::proxy::{Proxy, PurgeMode, Purged};
use crate::reload::LiveProxy;
use crate::sources::SourceUrl;

/// The request header (`X-Sidecache-Admin: 1`) an admin GET needs when no token is
/// configured: a forged GET (a URL the app is made to fetch) cannot set it. The CLI sends it.
pub const ADMIN_HEADER: &str = "x-sidecache-admin";

/// What the admin endpoints read.
pub struct Admin {
    /// The request path in force (replaced by a reload).
    pub live: Arc<LiveProxy>,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// Whether the public port accepts connections, for `/readyz`.
    pub readiness: Arc<Readiness>,
}

/// Whether the public port accepts connections: from the moment it is bound (its backlog takes
/// connections from then on) until draining begins. `/readyz` is not ready outside that span:
/// ready means a client sent here now gets in, whatever else is up (in supervision mode the
/// admin port is up, and the app may be, long before the public port is bound).
#[derive(Debug)]
pub struct Readiness {
    bound: AtomicBool,
    draining: CancellationToken,
}

impl Readiness {
    /// Not accepting yet; accepting ends when `draining` is cancelled.
    pub fn new(draining: CancellationToken) -> Readiness {
        Readiness {
            bound: AtomicBool::new(false),
            draining,
        }
    }

    /// The public port is bound and listening.
    pub fn bound(&self) {
        self.bound.store(true, Ordering::Release);
    }

    /// Whether the public port accepts connections now.
    pub fn is_accepting(&self) -> bool {
        self.bound.load(Ordering::Acquire) && !self.draining.is_cancelled()
    }
}

impl Admin {
    /// The proxy in force.
    fn proxy(&self) -> Arc<Proxy> {
        self.live.current()
    }

    /// Serves the admin port until `shutdown` completes.
    pub async fn run(self: Arc<Self>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10));
        tokio::pin!(shutdown);
        loop {
            let (stream, _) = tokio::select! {
                _ = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Out of descriptors: liveness probes land here; the cache gives
                        // back some it holds open.
                        warn!(error = %e, "admin accept failed");
                        if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                            self.proxy().cache().relieve_descriptors();
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let admin = self.clone();
            let builder = builder.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let admin = admin.clone();
                    async move { Ok::<_, std::convert::Infallible>(admin.route(req).await) }
                });
                if let Err(e) = builder.serve_connection(TokioIo::new(stream), service).await {
                    debug!(error = %e, "admin connection ended with an error");
                }
            });
        }
    }

    async fn route(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => {
                // Size gauges are worked out when scraped, not on every fill.
                self.proxy().cache().publish_gauges();
                let mut resp = text(StatusCode::OK, crate::metrics::render(&self.metrics));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                resp
            }
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n".into()),
            (&Method::GET, "/readyz") => {
                if !self.readiness.is_accepting() {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: public port not accepting\n".into(),
                    )
                } else if !self.proxy().upstream().is_reachable(Duration::from_secs(1)).await {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready: app unreachable\n".into())
                } else if !self.proxy().cache().is_loaded() {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: cache index loading\n".into(),
                    )
                } else {
                    text(StatusCode::OK, "ready\n".into())
                }
            }
            (&Method::POST, "/purge") => {
                if let Some(denied) = self.authorize(&req) {
                    return denied;
                }
                let query = req.uri().query().unwrap_or("");
                let Some(what) = purge_selector(query) else {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "purge needs one of ?url=, ?prefix=, ?tag= (repeatable) or ?all=true, and &soft=true to mark stale\n"
                            .into(),
                    );
                };
                let mode = if is_soft(query) {
                    PurgeMode::Soft
                } else {
                    PurgeMode::Hard
                };
                match self.proxy().purge(&what, mode).await {
                    Purged::Removed(n) => {
                        info!(objects = n, "purged");
                        json(StatusCode::OK, format!("{{\"purged\":{n}}}\n"))
                    }
                    Purged::Marked(n) => {
                        info!(objects = n, "soft-purged (marked stale)");
                        json(StatusCode::OK, format!("{{\"marked\":{n}}}\n"))
                    }
                }
            }
            (&Method::GET, "/objects") => {
                if let Some(denied) = self.authorize_get(&req) {
                    return denied;
                }
                let (mut url, mut host) = (None, None);
                for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
                    match &*k {
                        "url" if !v.is_empty() => url = Some(v.into_owned()),
                        "host" if !v.is_empty() => host = Some(v.into_owned()),
                        _ => {}
                    }
                }
                let Some(url) = url else {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "objects needs ?url= (and &host= to narrow a path)\n".into(),
                    );
                };
                let report = crate::inspect::report(&self.proxy(), &url, host.as_deref()).await;
                match serde_json::to_string(&report) {
                    Ok(body) => json(StatusCode::OK, body + "\n"),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
                }
            }
            (&Method::POST, "/prime") => {
                if let Some(denied) = self.authorize(&req) {
                    return denied;
                }
                self.prime(req).await
            }
            (&Method::POST, "/prime/sitemap") => {
                if let Some(denied) = self.authorize(&req) {
                    return denied;
                }
                self.sitemap(req).await
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
        }
    }
}

impl Admin {
    /// `POST /prime?host=H&concurrency=N&timeout=S` with one URL or path a line: warms each
    /// through the cache (the sidecar fetches and stores; no body comes back) and streams one
    /// JSON line per URL as it completes: a [`Line`] (`{"url":..,"result":"warmed|warm|failed",..}`).
    async fn prime(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let mut host = String::from("localhost");
        let mut from: Option<SourceUrl> = None;
        let mut concurrency = 8usize;
        let mut timeout = Duration::from_secs(30);
        for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
            match &*k {
                "host" => host = v.into_owned(),
                // Checked before anything is read or fetched: a source outside the allow-list
                // refuses the whole prime.
                "from" => match self.proxy().config().prime_sources.admit_base(&v) {
                    Ok(base) => from = Some(base),
                    Err(e) => {
                        warn!(error = %e, "prime refused: source not allowed");
                        return text(StatusCode::FORBIDDEN, format!("{e}\n"));
                    }
                },
                "concurrency" => concurrency = v.parse().unwrap_or(8).clamp(1, 64),
                "timeout" => timeout = Duration::from_secs(v.parse().unwrap_or(30).clamp(1, 3600)),
                _ => {}
            }
        }
        let body = match Limited::new(req.into_body(), 16 << 20).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "prime list too large (16 MiB)\n".into()),
        };
        let targets: Vec<String> = String::from_utf8_lossy(&body)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(str::to_owned)
            .collect();
        let job = Job {
            host,
            from,
            concurrency,
            timeout,
        };
        let lines = warm_all(self.proxy(), targets, job);
        let stream = tokio_stream_from(lines)
            .map(|line| Ok::<_, crate::error::BoxError>(Frame::data(Bytes::from(line.to_ndjson()))));
        let mut resp = Response::new(body::boxed(StreamBody::new(stream)));
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
        resp
    }

    /// `POST /prime/sitemap?url=U&host=H`: the document at `U` (a path under the Host `H`, or
    /// an absolute URL) as this instance's app serves it, through the cache, for `sidecache
    /// prime --sitemap` to read. A POST, as `/prime` is: a URL the app can be made to fetch
    /// must not read pages through the admin port. The app's refusal comes back as 502,
    /// naming its status.
    async fn sitemap(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let (mut url, mut host) = (None, String::from("localhost"));
        for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
            match &*k {
                "url" if !v.is_empty() => url = Some(v.into_owned()),
                "host" if !v.is_empty() => host = v.into_owned(),
                _ => {}
            }
        }
        let Some(url) = url else {
            return text(
                StatusCode::BAD_REQUEST,
                "prime/sitemap needs ?url= (and &host=)\n".into(),
            );
        };
        match self.proxy().fetch_document(&host, &url).await {
            Ok(resp) if resp.status().is_success() => resp,
            Ok(resp) => text(
                StatusCode::BAD_GATEWAY,
                format!("the app answered {} for the sitemap\n", resp.status().as_u16()),
            ),
            Err(why) => text(StatusCode::BAD_REQUEST, format!("{why}\n")),
        }
    }

    /// `None` when the request may go on; otherwise the refusal. Without a configured token
    /// the admin port relies on being bound to loopback.
    fn authorize(&self, req: &Request<Incoming>) -> Option<Response<ProxyBody>> {
        let proxy = self.proxy();
        let token = proxy.config().admin_token.as_ref()?.expose();
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer);
        match given {
            Some(given) if token_matches(given, token) => None,
            _ => {
                let mut resp = text(StatusCode::UNAUTHORIZED, "admin token required\n".into());
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                Some(resp)
            }
        }
    }
}

impl Admin {
    /// As [`Admin::authorize`], and without a token [`ADMIN_HEADER`] is required: a GET is
    /// what an SSRF through the app reaches, a request with a header of its own is not.
    fn authorize_get(&self, req: &Request<Incoming>) -> Option<Response<ProxyBody>> {
        if self.proxy().config().admin_token.is_some() {
            return self.authorize(req);
        }
        if req.headers().get(ADMIN_HEADER).is_some_and(|v| v.as_bytes() == b"1") {
            return None;
        }
        Some(text(
            StatusCode::FORBIDDEN,
            "admin GETs need the header X-Sidecache-Admin: 1 (sidecache inspect sends it)\n".into(),
        ))
    }
}

/// The credentials of a `Bearer` authorization (the scheme is case-insensitive, RFC 9110
/// §11.1).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// Compares in constant time: digests of both, so neither the content nor the length of the
/// token shows in the time taken.
fn token_matches(given: &str, token: &str) -> bool {
    use subtle::ConstantTimeEq as _;
    let given = blake3::hash(given.as_bytes());
    let token = blake3::hash(token.as_bytes());
    given.as_bytes().ct_eq(token.as_bytes()).into()
}

/// Most tags one purge request names.
const MAX_PURGE_TAGS: usize = 1024;

/// Reads one selector from a query string: `url=`, `prefix=`, `all=true`, or one or more
/// `tag=` (any of them). `None` when there is none, or more than one kind.
pub fn purge_selector(query: &str) -> Option<Purge> {
    let mut found = Vec::new();
    let mut tags = Vec::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "all" if v == "true" || v == "1" => found.push(Purge::All),
            "url" if !v.is_empty() => found.push(Purge::Url(v.into_owned())),
            "prefix" if !v.is_empty() => found.push(Purge::Prefix(v.into_owned())),
            "tag" if !v.is_empty() => tags.push(v.into_owned()),
            _ => {}
        }
    }
    if !tags.is_empty() {
        if tags.len() > MAX_PURGE_TAGS {
            return None;
        }
        found.push(Purge::Tags(tags));
    }
    (found.len() == 1).then(|| found.remove(0))
}

/// Whether a purge asks to mark stale (`soft=true`) rather than remove.
pub fn is_soft(query: &str) -> bool {
    form_urlencoded::parse(query.as_bytes()).any(|(k, v)| k == "soft" && (v == "true" || v == "1"))
}

fn json(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut resp = text(status, body);
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// An mpsc receiver as a stream, for streamed response bodies.
fn tokio_stream_from<T: Send + 'static>(rx: tokio::sync::mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
}

/// A plain-text response.
pub fn text(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(body::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_selectors_take_one_kind_and_any_number_of_tags() {
        assert_eq!(purge_selector("url=/a.js"), Some(Purge::Url("/a.js".into())));
        assert_eq!(
            purge_selector("tag=a&tag=b%20c&soft=true"),
            Some(Purge::Tags(vec!["a".into(), "b c".into()]))
        );
        assert!(is_soft("tag=a&soft=true") && is_soft("all=1&soft=1") && !is_soft("tag=a"));
        assert_eq!(purge_selector("tag=a&url=/x"), None, "two kinds are ambiguous");
        assert_eq!(purge_selector("tag="), None);
        let many: String = (0..=MAX_PURGE_TAGS).map(|i| format!("tag=t{i}&")).collect();
        assert_eq!(purge_selector(&many), None);
    }

    #[test]
    fn bearer_tokens_compare_whole() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearerabc"), None);
        assert!(token_matches("s3cret", "s3cret"));
        assert!(!token_matches("s3cre", "s3cret"));
        assert!(!token_matches("s3cretx", "s3cret"));
        assert!(!token_matches("", "s3cret"));
    }
}
