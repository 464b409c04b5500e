//! The pooled HTTP/1.1 client to the app: hop-by-hop header removal, `X-Forwarded-*`,
//! timeouts, and errors classified as 502 (unreachable, broken) or 504 (too slow).

use std::collections::HashSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::{self, ProxyBody};
use crate::cache::key::request_host;
use crate::config::{Config, Upstream as UpstreamAddr};
use crate::error::BoxError;
use crate::metrics as m;
use crate::sources::SourceUrl;

/// Why a request to the app failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Connection refused, reset, or closed before a response head.
    #[error("app unreachable at {addr}: {source}")]
    Unreachable {
        /// The app's address.
        addr: String,
        /// The client error.
        source: hyper_util::client::legacy::Error,
    },
    /// Another source (`prime --from`) failed.
    #[error("source {url} failed: {message}")]
    Source {
        /// The URL asked.
        url: String,
        /// What went wrong.
        message: String,
        /// Whether it was a timeout.
        timeout: bool,
    },
    /// The client's request body broke while it was being sent (malformed chunked framing,
    /// the client went away): the client's fault, not the app's.
    #[error("client request body failed: {source}")]
    ClientBody {
        /// The client error.
        source: hyper_util::client::legacy::Error,
    },
    /// No response head within the timeout.
    #[error("app at {addr} sent no response within {timeout:?}")]
    Timeout {
        /// The app's address.
        addr: String,
        /// The timeout that ran out.
        timeout: Duration,
    },
}

impl UpstreamError {
    /// The status the client gets: 504 for a timeout, 502 otherwise.
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::Unreachable { source, .. } if is_connect_timeout(source) => StatusCode::GATEWAY_TIMEOUT,
            UpstreamError::Unreachable { .. } => StatusCode::BAD_GATEWAY,
            UpstreamError::Source { timeout: true, .. } => StatusCode::GATEWAY_TIMEOUT,
            UpstreamError::Source { .. } => StatusCode::BAD_GATEWAY,
            UpstreamError::ClientBody { .. } => StatusCode::BAD_REQUEST,
            UpstreamError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// A closed label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::Unreachable { source, .. } if is_connect_timeout(source) => "connect_timeout",
            err if err.is_exhaustion() => "descriptors",
            UpstreamError::Unreachable { source, .. } if source.is_connect() => "connect",
            UpstreamError::Unreachable { .. } => "protocol",
            UpstreamError::Source { .. } => "source",
            UpstreamError::ClientBody { .. } => "client_body",
            UpstreamError::Timeout { .. } => "timeout",
        }
    }

    /// True when the connection to the app could not be opened for want of descriptors in
    /// this process (EMFILE, ENFILE), even after a relief: a shortage of sidecache's, not the
    /// app's fault.
    pub fn is_exhaustion(&self) -> bool {
        matches!(self, UpstreamError::Unreachable { source, .. } if source.is_connect() && out_of_descriptors(source))
    }

    /// True when the client, not the app, caused the failure.
    pub fn is_client(&self) -> bool {
        matches!(self, UpstreamError::ClientBody { .. })
    }

    /// The short text body sent to the client.
    pub fn response(&self) -> Response<ProxyBody> {
        let text = match self.status() {
            StatusCode::BAD_REQUEST => "400 Bad Request: the request body is malformed or incomplete\n",
            StatusCode::GATEWAY_TIMEOUT => "504 Gateway Timeout: the app did not answer in time\n",
            _ => "502 Bad Gateway: the app is not reachable\n",
        };
        error_response(self.status(), text)
    }
}

fn is_connect_timeout(e: &hyper_util::client::legacy::Error) -> bool {
    io_cause(e).is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
}

/// True when `e` comes of this process having no descriptor left (EMFILE, ENFILE).
fn out_of_descriptors(e: &(dyn std::error::Error + 'static)) -> bool {
    io_cause(e).is_some_and(|io| matches!(io.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)))
}

/// The I/O error `e` is or has underneath, if any.
fn io_cause<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a std::io::Error> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return Some(io);
        }
        cause = c.source();
    }
    None
}

/// Gives descriptors back (the cache's open tier) and completes once they are free.
pub type Relief = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Connects to the app. A connect that fails for want of descriptors in this process is made
/// once more after the [`Relief`]: nothing was sent on a connection never opened, so this
/// holds for every request, whatever its method or body.
#[derive(Clone)]
struct AppConnector {
    inner: HttpConnector,
    relief: Relief,
}

type Connecting = <HttpConnector as tower_service::Service<Uri>>::Response;
type ConnectFailed = <HttpConnector as tower_service::Service<Uri>>::Error;

impl tower_service::Service<Uri> for AppConnector {
    type Response = Connecting;
    type Error = ConnectFailed;
    type Future = Pin<Box<dyn Future<Output = Result<Connecting, ConnectFailed>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnectFailed>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let (mut inner, relief) = (self.inner.clone(), self.relief.clone());
        Box::pin(async move {
            match inner.call(dst.clone()).await {
                Err(e) if out_of_descriptors(&e) => {
                    relief().await;
                    inner.call(dst).await
                }
                connected => connected,
            }
        })
    }
}

/// A plain-text error response generated by sidecache itself.
pub fn error_response(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(body::full(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

std::thread_local! {
    /// The serving loop this thread runs (0 for the first loop and any other thread).
    static SERVING_LOOP: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks this thread as running serving loop `index`, so it uses that loop's pool.
pub fn set_serving_loop(index: usize) {
    SERVING_LOOP.set(index);
}

/// The pooled client to the app.
#[derive(Clone)]
pub struct Upstream {
    /// One pool per serving loop: a connection's task runs on the loop that opened it, so a
    /// request must not use another loop's connections (every read and write would then
    /// wake two threads).
    clients: Box<[Client<AppConnector, ProxyBody>]>,
    addr: UpstreamAddr,
    timeout: Duration,
    trust_forwarded: bool,
    /// What [`Upstream::clean`] removes from every request.
    removals: Arc<Removals>,
}

impl Upstream {
    /// A client with the configured timeouts and a keep-alive pool; `relief` is called when
    /// a connection cannot be opened for want of descriptors.
    pub fn new(config: &Config, relief: Relief) -> Upstream {
        let mut inner = HttpConnector::new();
        inner.set_connect_timeout(Some(config.upstream_connect_timeout));
        inner.set_nodelay(true);
        inner.set_keepalive(Some(Duration::from_secs(60)));
        let connector = AppConnector { inner, relief };
        let clients = (0..config.workers.max(1))
            .map(|_| {
                Client::builder(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .pool_timer(TokioTimer::new())
                    .pool_idle_timeout(Duration::from_secs(60))
                    .pool_max_idle_per_host(256)
                    .build(connector.clone())
            })
            .collect();
        Upstream {
            clients,
            addr: config.upstream.clone(),
            timeout: config.upstream_timeout,
            trust_forwarded: config.trust_forwarded,
            removals: Arc::new(Removals::new(&config.strip_request_headers, config.trust_forwarded)),
        }
    }

    /// The app's address.
    pub fn addr(&self) -> &UpstreamAddr {
        &self.addr
    }

    /// Cleans a client's request head once, before anything reads it: the cache keys its
    /// variants (`Vary`) and reads its directives from exactly the fields the app will get,
    /// never from one only the client sent. Removes hop-by-hop fields and those `Connection`
    /// names (RFC 9110 §7.6.1: `Connection: close, Origin` removes `Origin`, so the answer is
    /// the app's for no `Origin` and is keyed so), fields with `_` in their name and the
    /// `strip_request_headers`; joins HTTP/2 cookie crumbs into one `Cookie` (RFC 9113
    /// §8.2.3), as the app would read them.
    pub fn clean(&self, headers: &mut HeaderMap) {
        self.removals.apply(headers);
        join_cookies(headers);
    }

    /// Rewrites a cleaned client request (see [`Upstream::clean`]) for the app: absolute URI
    /// at the app, `Host` and `X-Forwarded-Host` set to the host the cache key holds,
    /// `X-Forwarded-For/Proto` set. A `GET` or `HEAD` with a body goes with `Connection:
    /// close`: an app that does not read such a body would take it as the next request on a
    /// pooled connection (CL.0 smuggling); on a connection closed after it, what the app
    /// answers to it reaches no one.
    pub fn prepare(&self, req: &mut Request<ProxyBody>, client: SocketAddr, upgrade: Option<HeaderValue>) {
        // The host the cache key uses; a host that cannot be keyed (never cached) goes as sent.
        let host = request_host(req)
            .and_then(|h| HeaderValue::from_str(&h).ok())
            .or_else(|| req.headers().get(header::HOST).cloned());
        let path = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let uri = Uri::builder()
            .scheme(self.addr.scheme.clone())
            .authority(self.addr.authority.clone())
            .path_and_query(path)
            .build()
            .unwrap_or_else(|_| Uri::from_static("/"));
        *req.uri_mut() = uri;
        let received = req.version();
        add_via(req.headers_mut(), received);
        // The app always speaks HTTP/1.1 to us, whatever the client spoke.
        *req.version_mut() = http::Version::HTTP_11;

        let fat_get = matches!(*req.method(), Method::GET | Method::HEAD) && !req.body().is_end_stream();
        let headers = req.headers_mut();
        if fat_get {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Some(upgrade) = upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, upgrade);
        }
        if let Some(host) = &host {
            headers.insert(header::HOST, host.clone());
        }
        // Also without a host (HTTP/1.0, HTTP/2 without :authority): a client's own values
        // never reach the app untrusted.
        set_forwarded(headers, client.ip(), host.as_ref(), self.trust_forwarded);
    }

    /// Sends a prepared request; waits at most the response-header timeout.
    pub async fn send(&self, mut req: Request<ProxyBody>) -> Result<Response<Incoming>, UpstreamError> {
        let started = Instant::now();
        // The app gets the request's id: the client's, the one the access log made, or a new one.
        crate::access::request_id(req.headers_mut());
        let client = &self.clients[SERVING_LOOP.get() % self.clients.len()];
        // A body that fails while being sent is the client's doing (malformed chunked framing,
        // a client gone mid-upload); the flag tells that apart from the app failing.
        let (req, client_body_failed) = if req.body().is_end_stream() {
            (req, None)
        } else {
            let failed = Arc::new(AtomicBool::new(false));
            let watched = req.map(|inner| {
                body::boxed(WatchedBody {
                    inner,
                    failed: failed.clone(),
                })
            });
            (watched, Some(failed))
        };
        let result = tokio::time::timeout(self.timeout, client.request(req)).await;
        metrics::histogram!(m::UPSTREAM_DURATION).record(started.elapsed().as_secs_f64());
        crate::access::record_upstream(started.elapsed());
        let err = match result {
            Ok(Ok(resp)) => return Ok(resp),
            Ok(Err(source)) if client_body_failed.is_some_and(|f| f.load(Ordering::Acquire)) => {
                metrics::counter!(m::CLIENT_ERRORS, "kind" => "body").increment(1);
                return Err(UpstreamError::ClientBody { source });
            }
            Ok(Err(source)) => UpstreamError::Unreachable {
                addr: self.addr.to_string(),
                source,
            },
            Err(_) => UpstreamError::Timeout {
                addr: self.addr.to_string(),
                timeout: self.timeout,
            },
        };
        metrics::counter!(m::UPSTREAM_ERRORS, "kind" => err.kind()).increment(1);
        Err(err)
    }

    /// Sends a GET to a URL inside `prime_sources` (a CDN or bucket), with the request's
    /// validators, within the response-header timeout. `client` is the sources client, whose
    /// redirect policy keeps it inside `prime_sources`.
    pub async fn send_to(
        &self,
        client: &reqwest::Client,
        source: &SourceUrl,
        headers: &HeaderMap,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let url = source.to_string();
        let mut out = client.get(source.as_url().clone());
        for name in [
            header::IF_NONE_MATCH,
            header::IF_MODIFIED_SINCE,
            header::ACCEPT_ENCODING,
        ] {
            if let Some(v) = headers.get(&name) {
                out = out.header(name, v.clone());
            }
        }
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, out.send()).await;
        metrics::histogram!(m::UPSTREAM_DURATION).record(started.elapsed().as_secs_f64());
        let err = match result {
            Ok(Ok(resp)) => return Ok(http::Response::from(resp).map(body::boxed)),
            Ok(Err(e)) => UpstreamError::Source {
                url,
                message: e.to_string(),
                timeout: e.is_timeout(),
            },
            Err(_) => UpstreamError::Source {
                url,
                message: format!("no response within {:?}", self.timeout),
                timeout: true,
            },
        };
        metrics::counter!(m::UPSTREAM_ERRORS, "kind" => err.kind()).increment(1);
        Err(err)
    }

    /// True when the app accepts a TCP connection now.
    pub async fn is_reachable(&self, timeout: Duration) -> bool {
        let addr = self.addr.authority.as_str().to_owned();
        matches!(
            tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await,
            Ok(Ok(_))
        )
    }
}

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, those named in `Connection`, and `Upgrade`. `Host` is never a
/// connection option: it names the resource (RFC 9110 §7.2), and the key holds it.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in connection_named(headers) {
        headers.remove(name);
    }
    for name in HOP_BY_HOP.iter() {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// The fields a `Connection` field names, but `Host`.
fn connection_named(headers: &HeaderMap) -> Vec<HeaderName> {
    crate::policy::fields::elements(headers, &header::CONNECTION)
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .filter(|name| *name != header::HOST)
        .collect()
}

/// A client's request body on its way to the app; records whether it failed.
struct WatchedBody {
    inner: ProxyBody,
    failed: Arc<AtomicBool>,
}

impl http_body::Body for WatchedBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &poll {
            self.failed.store(true, Ordering::Release);
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// What a client's request loses before anything reads it ([`Upstream::clean`]), in one pass
/// over the names it carries (a handful) against one set made from the lists below, instead
/// of a removal per listed name (about 40):
/// - hop-by-hop fields, `Upgrade` and the fields `Connection` names (as [`strip_hop_by_hop`]);
/// - every field whose name contains `_`, as nginx does by default (`underscores_in_headers
///   off`): CGI-style servers (uWSGI, gunicorn before 22, Unicorn, Puma before 6.4.3) map
///   `X_Forwarded_Host` to the same variable as `X-Forwarded-Host`, so an underscore spelling
///   would slip any name past `strip_request_headers` and the forwarding rules;
/// - the request headers apps and frameworks honour but the cache key does not hold
///   (`strip_request_headers`). Behind a trusted router (`trust_forwarded`) only the ones it is
///   trusted to set are kept (see [`ROUTER_SET`]); any other, `X-Forwarded-Host`, `-Prefix` or
///   `Forwarded` included, is a client's (a router such as Heroku's passes them through) and
///   is removed all the same.
#[derive(Debug)]
struct Removals {
    names: HashSet<HeaderName>,
}

impl Removals {
    fn new(strip: &[HeaderName], trust_forwarded: bool) -> Removals {
        let unkeyed = strip
            .iter()
            .filter(|name| !(trust_forwarded && ROUTER_SET.contains(name)));
        let names = HOP_BY_HOP
            .iter()
            .chain([&header::UPGRADE])
            .chain(unkeyed)
            .cloned()
            .collect();
        Removals { names }
    }

    fn apply(&self, headers: &mut HeaderMap) {
        // (One removal per name `Connection` lists: linear in its length, however long.)
        for name in connection_named(headers) {
            headers.remove(name);
        }
        let doomed: Vec<HeaderName> = headers
            .keys()
            .filter(|name| self.names.contains(*name) || name.as_str().contains('_'))
            .cloned()
            .collect();
        for name in doomed {
            headers.remove(name);
        }
    }
}

/// Joins several `Cookie` fields into one, separated by `; ` (RFC 9113 §8.2.3: an HTTP/2
/// client may split its cookie into crumbs; the app, spoken to in HTTP/1.1, expects one line).
fn join_cookies(headers: &mut HeaderMap) {
    let mut crumbs = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (crumbs.next(), crumbs.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for crumb in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(crumb.as_bytes());
    }
    // (Each crumb was a valid value, and so is their join.)
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// What a trusted router (`trust_forwarded`) sets on every request and may pass to the app:
/// the three that Heroku's router, AWS load balancers and ingress controllers all set,
/// overwriting a client's. `X-Forwarded-For` is appended to, `X-Forwarded-Proto` is part of
/// the cache key (`Proxy::scheme`), `X-Forwarded-Port` follows the scheme. `X-Forwarded-Host` is
/// not among them: not every router sets it (Heroku's passes a client's through), and the
/// key has its own host, which sidecache forwards.
const ROUTER_SET: [HeaderName; 3] = [
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-port"),
];

/// Sets `X-Forwarded-For/Proto/Host`. `X-Forwarded-Host` is always the host the cache key
/// holds (removed when the request names none), never a client's or a router's. Untrusted
/// `X-Forwarded-For/Proto` are replaced; from a trusted router, `X-Forwarded-For` gets the
/// client address appended and `X-Forwarded-Proto` is kept, spelled as the key holds it.
fn set_forwarded(headers: &mut HeaderMap, client: IpAddr, host: Option<&HeaderValue>, trust: bool) {
    let ip = client.to_canonical().to_string();
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) if trust => format!("{prior}, {ip}"),
        _ => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    // The scheme the key holds, by the rule of `Proxy::scheme`: a trusted first line that
    // says `https` (any case), else `http`. One line, so no app reads another value than
    // the key's (a second line, a list, another case).
    let https = trust
        && headers
            .get(&X_FORWARDED_PROTO)
            .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"https"));
    let proto = HeaderValue::from_static(if https { "https" } else { "http" });
    headers.insert(X_FORWARDED_PROTO.clone(), proto);
    match host {
        Some(host) => headers.insert(X_FORWARDED_HOST.clone(), host.clone()),
        None => headers.remove(&X_FORWARDED_HOST),
    };
}

/// RFC 9110 §7.6.3: a gateway adds itself to `Via` in every request it forwards, after the
/// entries the request came with: the protocol version it received and a pseudonym (never the
/// host name: it tells the app nothing it needs and would leak it onward).
fn add_via(headers: &mut HeaderMap, received: http::Version) {
    let via = match received {
        http::Version::HTTP_09 => "0.9 sidecache",
        http::Version::HTTP_10 => "1.0 sidecache",
        http::Version::HTTP_2 => "2 sidecache",
        http::Version::HTTP_3 => "3 sidecache",
        _ => "1.1 sidecache",
    };
    headers.append(header::VIA, HeaderValue::from_static(via));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 9110 §7.6.3: `Via` names the received protocol and this gateway, after any entry
    /// the request already had.
    #[test]
    fn via_is_appended_with_the_received_protocol() {
        let mut h = HeaderMap::new();
        add_via(&mut h, http::Version::HTTP_11);
        assert_eq!(h[header::VIA], "1.1 sidecache");
        let mut h = HeaderMap::new();
        h.insert(header::VIA, HeaderValue::from_static("1.1 router"));
        add_via(&mut h, http::Version::HTTP_2);
        let via: Vec<_> = h.get_all(header::VIA).iter().collect();
        assert_eq!(via, ["1.1 router", "2 sidecache"]);
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/css"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn untrusted_forwarded_headers_are_replaced() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
        let host = HeaderValue::from_static("app.example");
        set_forwarded(&mut h, "10.0.0.1".parse().unwrap(), Some(&host), false);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        assert_eq!(h["x-forwarded-host"], "app.example");
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn untrusted_forwarded_headers_are_replaced_or_removed_without_a_host() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        set_forwarded(&mut h, "10.0.0.1".parse().unwrap(), None, false);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1");
        assert!(!h.contains_key("x-forwarded-host"));
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn unkeyed_headers_are_stripped_and_a_trusted_router_keeps_only_for_proto_and_port() {
        let names = [
            "forwarded",
            "x-forwarded-host",
            "x-forwarded-proto",
            "x-forwarded-port",
            "x-forwarded-prefix",
            "x-forwarded-ssl",
            "x-original-url",
        ];
        let strip: Vec<HeaderName> = names.iter().map(|n| HeaderName::from_static(n)).collect();
        let sent = || {
            let mut h = HeaderMap::new();
            for n in names.iter().chain(&["x-forwarded-for", "accept"]) {
                h.insert(HeaderName::from_static(n), HeaderValue::from_static("v"));
            }
            h
        };
        let mut h = sent();
        Removals::new(&strip, false).apply(&mut h);
        let mut kept: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        kept.sort();
        assert_eq!(kept, ["accept", "x-forwarded-for"], "for is set by set_forwarded");
        let mut h = sent();
        Removals::new(&strip, true).apply(&mut h);
        let mut kept: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        kept.sort();
        assert_eq!(
            kept,
            ["accept", "x-forwarded-for", "x-forwarded-port", "x-forwarded-proto"],
            "only what the router sets; its host, prefix, Forwarded are a client's"
        );
    }

    #[test]
    fn a_request_loses_every_kind_of_field_in_one_pass_and_keeps_its_host() {
        let removals = Removals::new(&[HeaderName::from_static("x-original-url")], false);
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("x-secret, host"));
        h.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        for n in [
            "x-secret",
            "keep-alive",
            "te",
            "upgrade",
            "x_real_ip",
            "x-original-url",
            "accept",
        ] {
            h.append(HeaderName::from_static(n), HeaderValue::from_static("v"));
        }
        h.insert(header::HOST, HeaderValue::from_static("app.example"));
        removals.apply(&mut h);
        let mut kept: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        kept.sort();
        assert_eq!(kept, ["accept", "host"], "Host is never a connection option");
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn headers_with_an_underscore_are_removed() {
        let mut h = HeaderMap::new();
        for n in [
            "x_forwarded_host",
            "x_original_url",
            "accept_language",
            "_",
            "x-forwarded-host",
            "accept",
        ] {
            h.append(HeaderName::from_static(n), HeaderValue::from_static("v"));
        }
        h.append(
            HeaderName::from_static("x_forwarded_for"),
            HeaderValue::from_static("1"),
        );
        h.append(
            HeaderName::from_static("x_forwarded_for"),
            HeaderValue::from_static("2"),
        );
        Removals::new(&[], false).apply(&mut h);
        let mut kept: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        kept.sort();
        assert_eq!(kept, ["accept", "x-forwarded-host"]);
        assert_eq!(h.len(), 2, "every line of a repeated name");
    }

    #[test]
    fn trusted_for_is_appended_and_proto_kept_as_the_key_spells_it() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("HTTPS"));
        h.append("x-forwarded-proto", HeaderValue::from_static("http"));
        let host = HeaderValue::from_static("app.example");
        set_forwarded(&mut h, "10.0.0.1".parse().unwrap(), Some(&host), true);
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.1");
        assert_eq!(h.get_all("x-forwarded-proto").iter().collect::<Vec<_>>(), ["https"]);
        assert_eq!(h["x-forwarded-host"], "app.example");

        // Anything but `https` is keyed as http, and the app is told so.
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-proto", HeaderValue::from_static("javascript"));
        set_forwarded(&mut h, "10.0.0.1".parse().unwrap(), Some(&host), true);
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn a_trusted_requests_forwarded_host_is_the_keyed_host_or_none() {
        let sent = || {
            let mut h = HeaderMap::new();
            h.insert("x-forwarded-host", HeaderValue::from_static("evil.example"));
            h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
            h
        };
        let host = HeaderValue::from_static("app.example");
        let mut h = sent();
        set_forwarded(&mut h, "10.0.0.1".parse().unwrap(), Some(&host), true);
        assert_eq!(h["x-forwarded-host"], "app.example");
        let mut h = sent();
        set_forwarded(&mut h, "10.0.0.1".parse().unwrap(), None, true);
        assert!(!h.contains_key("x-forwarded-host"), "no host, no forwarded host");
        assert_eq!(h["x-forwarded-proto"], "https");
    }
}
