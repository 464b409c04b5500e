//! THE request path: classify -> key -> lookup -> hit | miss+fill | wait | bypass.
//!
//! Every response leaves through [`Proxy::handle`], which stamps `Cache-Status`, records the
//! request metric and writes the access-log line from one [`Outcome`]. Upgrades (WebSocket) are
//! tunnelled to the app untouched.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use std::time::SystemTime;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{debug, info, warn};

use crate::body::{self, ProxyBody};
use crate::bucket::TokenBucket;
use crate::cache::fill::{Fill, FillState};
use crate::cache::key::{CacheKey, Digest, normalize_vary};
use crate::cache::meta::Meta;
use crate::cache::{Cache, Claim, FillPermit, Hit, Waited};
use crate::config::Config;
use crate::metrics as m;
use crate::negotiate::{self, Coding};
use crate::policy::{self, CacheControl, Freshness, Heuristic, Prepared, RangeAnswer, Usable};
use crate::prime::protocol::Failure;
use crate::rules;
use crate::shared::{self, Lookup, SharedTier, Upload};
use crate::sources::SourceUrl;
use crate::upstream::{Upstream, error_response, strip_hop_by_hop};

/// What the cache did for one request: the metric label, the log field and the
/// `Cache-Status` header all come from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Served from the cache.
    Hit,
    /// Fetched from the app (and stored when storable).
    Miss,
    /// Served from another request's fill in progress.
    Coalesced,
    /// Served stale because the app failed.
    Stale,
    /// Stored object revalidated with the app (304).
    Revalidated,
    /// Not a cache candidate: passed through to the app.
    Bypass,
    /// The app failed and nothing could stand in.
    Error,
}

impl Outcome {
    const ALL: [Outcome; 7] = [
        Outcome::Hit,
        Outcome::Miss,
        Outcome::Coalesced,
        Outcome::Stale,
        Outcome::Revalidated,
        Outcome::Bypass,
        Outcome::Error,
    ];

    /// The label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Coalesced => "coalesced",
            Outcome::Stale => "stale",
            Outcome::Revalidated => "revalidated",
            Outcome::Bypass => "bypass",
            Outcome::Error => "error",
        }
    }
}

/// The method classes used as a metric label.
const METHOD_CLASSES: [&str; 4] = ["get", "head", "unsafe", "other"];

/// A method's index in [`METHOD_CLASSES`].
fn method_class(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE => 2,
        _ => 3,
    }
}

/// The per-request metric handles, registered once so that the request path counts without
/// building and hashing label sets.
struct Handles {
    /// `REQUESTS` by outcome, then method class.
    requests: Vec<[metrics::Counter; 4]>,
    /// `REQUEST_DURATION` by outcome.
    durations: Vec<metrics::Histogram>,
    served_cache_bytes: metrics::Counter,
    /// `SERVED_BY_ENCODING` and `SERVED_BYTES_BY_ENCODING`: identity, then `Coding::ALL`.
    by_encoding: [(metrics::Counter, metrics::Counter); 4],
    compress_saved: metrics::Counter,
}

/// The `Accept-Encoding` a prime's requests carry: a current browser's.
const PRIME_ACCEPT_ENCODING: &str = "gzip, deflate, br, zstd";

/// How long a prime waits for one object's variants to be made.
const PRIME_COMPRESS_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The `encoding` labels of the served-by-encoding counters, in `Handles::by_encoding` order.
const ENCODINGS: [&str; 4] = ["identity", "br", "zstd", "gzip"];

fn encoding_slot(coding: Option<Coding>) -> usize {
    match coding {
        None => 0,
        Some(Coding::Br) => 1,
        Some(Coding::Zstd) => 2,
        Some(Coding::Gzip) => 3,
    }
}

/// The handles, registered on first use: after the recorder is installed, which happens
/// before anything is served.
fn handles() -> &'static Handles {
    static HANDLES: std::sync::OnceLock<Handles> = std::sync::OnceLock::new();
    HANDLES.get_or_init(|| Handles {
        requests: Outcome::ALL
            .iter()
            .map(|o| METHOD_CLASSES.map(|c| metrics::counter!(m::REQUESTS, "outcome" => o.as_str(), "method" => c)))
            .collect(),
        durations: Outcome::ALL
            .iter()
            .map(|o| metrics::histogram!(m::REQUEST_DURATION, "outcome" => o.as_str()))
            .collect(),
        served_cache_bytes: metrics::counter!(m::SERVED_CACHE_BYTES),
        by_encoding: ENCODINGS.map(|e| {
            (
                metrics::counter!(m::SERVED_BY_ENCODING, "encoding" => e),
                metrics::counter!(m::SERVED_BYTES_BY_ENCODING, "encoding" => e),
            )
        }),
        compress_saved: metrics::counter!(m::COMPRESS_SAVED_BYTES),
    })
}

/// Why a request went to the app: the `fwd` parameter of `Cache-Status` (RFC 9211 §2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fwd {
    /// Not a cache candidate (method, upgrade, no host).
    Bypass,
    /// The method is not cacheable.
    Method,
    /// The request asked for a fresh copy.
    Request,
    /// Nothing stored for the URL.
    UriMiss,
    /// Stored for the URL, not for this request's `Vary` values.
    VaryMiss,
    /// Stored but stale.
    Stale,
}

impl Fwd {
    fn as_str(self) -> &'static str {
        match self {
            Fwd::Bypass => "bypass",
            Fwd::Method => "method",
            Fwd::Request => "request",
            Fwd::UriMiss => "uri-miss",
            Fwd::VaryMiss => "vary-miss",
            Fwd::Stale => "stale",
        }
    }
}

/// A response on its way out, with what the cache did.
pub struct Answer {
    /// The response.
    pub response: Response<ProxyBody>,
    /// What happened.
    pub outcome: Outcome,
    /// Why it went to the app, when it did.
    pub fwd: Option<Fwd>,
    /// Whether the response is being stored.
    pub stored: bool,
    /// An extra `Cache-Status` parameter (`fwd-status=304`, `stale-if-error`, ...).
    pub detail: Option<&'static str>,
}

impl Answer {
    fn new(response: Response<ProxyBody>, outcome: Outcome, fwd: Option<Fwd>) -> Answer {
        Answer {
            response,
            outcome,
            fwd,
            stored: false,
            detail: None,
        }
    }

    /// The `Cache-Status` value (RFC 9211).
    fn cache_status(&self) -> HeaderValue {
        if self.outcome == Outcome::Hit && self.fwd.is_none() && self.detail.is_none() && !self.stored {
            return HeaderValue::from_static("sidecache; hit");
        }
        HeaderValue::try_from(self.cache_status_text()).unwrap_or_else(|_| HeaderValue::from_static("sidecache"))
    }

    fn cache_status_text(&self) -> String {
        let mut v = String::from("sidecache");
        if self.fwd.is_none() || self.outcome == Outcome::Stale {
            v.push_str("; hit");
        }
        if let Some(fwd) = self.fwd {
            v.push_str("; fwd=");
            v.push_str(fwd.as_str());
        }
        if let Some(detail) = self.detail {
            v.push_str("; ");
            v.push_str(detail);
        }
        if self.outcome == Outcome::Coalesced {
            v.push_str("; collapsed");
        }
        if self.stored {
            v.push_str("; stored");
        }
        if self.outcome == Outcome::Error {
            v.push_str("; detail=upstream-error");
        }
        v
    }
}

/// Everything the request path needs, shared by every connection.
pub struct Proxy {
    /// The pooled client to the app.
    pub upstream: Upstream,
    /// The disk cache.
    pub cache: Arc<Cache>,
    /// Client for filling from other sources (`prime --from`): CDNs, buckets, over HTTPS. Its
    /// redirect policy stays inside `prime_sources` (see [`crate::sources::PrimeSources::client`]).
    pub sources: reqwest::Client,
    /// Configuration in force.
    pub config: Arc<Config>,
    /// Bounds invalidations by unsafe requests (see [`invalidation_bucket`]).
    pub invalidations: TokenBucket,
    /// The shared tier in object storage, when configured: read on a local miss, written
    /// behind a fill.
    pub shared: Option<Arc<SharedTier>>,
    /// Requests and bytes by rule and outcome.
    pub rule_counts: RuleCounts,
}

/// The per-rule counters (`sidecache_rule_requests_total`, `sidecache_rule_sent_bytes_total`),
/// registered once: one row per configured rule, in order, then `none` (no rule matched),
/// each by outcome. The label's values are the configured names: bounded by the configuration.
pub struct RuleCounts {
    requests: Vec<[metrics::Counter; 7]>,
    bytes: Vec<[metrics::Counter; 7]>,
}

impl RuleCounts {
    /// The counters for these rules.
    pub fn new(rules: &[rules::Rule]) -> RuleCounts {
        let names: Vec<String> = rules
            .iter()
            .enumerate()
            // (The configuration names every rule; one compiled elsewhere may have none.)
            .map(|(i, r)| {
                if r.name.is_empty() {
                    format!("rule-{}", i + 1)
                } else {
                    r.name.clone()
                }
            })
            .chain(["none".to_owned()])
            .collect();
        let row = |metric: &'static str, name: &str| {
            Outcome::ALL.map(|o| metrics::counter!(metric, "rule" => name.to_owned(), "outcome" => o.as_str()))
        };
        RuleCounts {
            requests: names.iter().map(|n| row(m::RULE_REQUESTS, n)).collect(),
            bytes: names.iter().map(|n| row(m::RULE_BYTES, n)).collect(),
        }
    }
}

/// Invalidations of URLs with `Vary` variants (each scans the index) allowed at once, then per
/// second: anyone may send POSTs, so a flood must not make them scan without limit. Beyond it an invalidation is skipped and counted
/// (`sidecache_invalidations_skipped_total`).
pub const INVALIDATION_BURST: u32 = 128;
/// See [`INVALIDATION_BURST`].
pub const INVALIDATION_RATE: u32 = 32;

/// The bucket bounding invalidations by unsafe requests.
pub fn invalidation_bucket() -> TokenBucket {
    TokenBucket::new(INVALIDATION_BURST, INVALIDATION_RATE)
}

/// Whether a method's non-error answer invalidates what is stored for its URL: the unsafe
/// methods RFC 9111 §4.4 means. Safe methods (GET, HEAD, OPTIONS, TRACE, PROPFIND, SEARCH,
/// REPORT, ...) change nothing by definition (RFC 9110 §9.2.1). §4.4 also lets unknown methods
/// invalidate; sidecache does not, deliberately: a method it cannot classify (an extension,
/// or `get` in lower case, which is not GET: methods are case-sensitive) would let anyone
/// evict anything.
fn invalidates(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::DELETE | Method::PATCH)
}

impl Proxy {
    /// Answers one client request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>, client: SocketAddr) -> Response<ProxyBody> {
        let started = Instant::now();
        let method = req.method().clone();
        // Only the path (never the query) is logged, and only when logging is on.
        let path_for_log = self.config.access_log.then(|| req.uri().path().to_owned());
        let version = req.version();

        // The rule the path falls under, for the per-rule counts (`none`: the last row).
        let rule = rules::position(&self.config.rules, req.uri().path()).unwrap_or(self.config.rules.len());

        let answer = self.route(req, client).await;
        let cache_status = answer.cache_status();
        let Answer {
            mut response, outcome, ..
        } = answer;
        // Directives addressed to this cache are not for anyone downstream (RFC 9213).
        response.headers_mut().remove(&policy::SIDECACHE_CACHE_CONTROL);
        // Nor are the tags, unless configured: hits, misses, 304s and bypasses alike.
        self.config.tags.strip(response.headers_mut());
        let counts = &self.rule_counts;
        counts.requests[rule][outcome as usize].increment(1);
        let mut response = if response.body().is_end_stream() {
            response
        } else {
            let sent = counts.bytes[rule][outcome as usize].clone();
            response.map(|b| body::counted(b, sent))
        };
        response
            .headers_mut()
            .append(CACHE_STATUS.clone(), cache_status.clone());
        let elapsed = started.elapsed();
        let handles = handles();
        handles.requests[outcome as usize][method_class(&method)].increment(1);
        handles.durations[outcome as usize].record(elapsed.as_secs_f64());
        if self.config.access_log {
            // The path only: query strings may carry secrets; cookies and credentials never logged.
            info!(
                target: "sidecache::access",
                method = %method,
                path = path_for_log.as_deref().unwrap_or(""),
                version = ?version,
                status = response.status().as_u16(),
                outcome = outcome.as_str(),
                cache_status = cache_status.to_str().unwrap_or_default(),
                micros = elapsed.as_micros() as u64,
                client = %client.ip(),
                "request"
            );
        }
        response
    }

    async fn route(self: &Arc<Self>, req: Request<Incoming>, client: SocketAddr) -> Answer {
        // RFC 9112 §3.2: an HTTP/1.1 request needs exactly one Host; ambiguity here is how
        // routing and cache keys get confused.
        if req.version() == http::Version::HTTP_11 && req.headers().get_all(header::HOST).iter().count() != 1 {
            let response = error_response(
                StatusCode::BAD_REQUEST,
                "400 Bad Request: exactly one Host header is required\n",
            );
            return Answer::new(response, Outcome::Bypass, Some(Fwd::Bypass));
        }
        if is_upgrade(&req) {
            return self.tunnel(req, client).await;
        }
        self.serve(req.map(body::boxed), client).await
    }

    /// Warms one URL for the prime command: a GET through the cache whose body goes nowhere.
    /// A fresh stored copy is not fetched again. With `from`, a miss is filled from that base
    /// URL (a CDN or bucket holding the built assets, admitted by `prime_sources`) instead of
    /// the app; the URL fetched must be inside `prime_sources` too.
    ///
    /// `target` may be an absolute URL: its host, not `host`, is then the key's. Either is the
    /// caller's choice; the admin port takes it only with the token beyond loopback.
    pub async fn warm(self: &Arc<Self>, host: &str, target: &str, from: Option<&SourceUrl>) -> WarmResult {
        let mut req = Request::new(body::empty());
        let Ok(uri) = target.parse::<http::Uri>() else {
            return WarmResult::Failed(Failure::BadTarget {
                detail: "not a URL or path".into(),
            });
        };
        let host = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_else(|| host.to_owned());
        let Ok(path) = http::Uri::builder()
            .path_and_query(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
            .build()
        else {
            return WarmResult::Failed(Failure::BadTarget {
                detail: "not a URL or path".into(),
            });
        };
        if let Some(from) = from {
            // The URL fetched is the one checked: the request's own path, joined and parsed.
            let pq = path.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            match self.config.prime_sources.join(from, pq) {
                Ok(url) => req.extensions_mut().insert(FillFrom(Arc::new(url))),
                Err(e) => return WarmResult::Failed(Failure::SourceRefused { detail: e.to_string() }),
            };
        }
        *req.uri_mut() = path;
        match HeaderValue::from_str(&host) {
            Ok(h) => req.headers_mut().insert(header::HOST, h),
            Err(_) => {
                return WarmResult::Failed(Failure::BadTarget {
                    detail: "bad host".into(),
                });
            }
        };
        req.headers_mut()
            .insert(header::USER_AGENT, HeaderValue::from_static("sidecache-prime"));
        // Warm what browsers will ask for: an app that compresses itself stores the answer
        // browsers get; for one that does not, the variants made are what they are sent.
        req.headers_mut()
            .insert(header::ACCEPT_ENCODING, HeaderValue::from_static(PRIME_ACCEPT_ENCODING));
        // Key it like the traffic it prepares for: behind a TLS-terminating router the
        // forwarded scheme is part of every key (see `scheme`).
        if self.config.trust_forwarded {
            let https = uri.scheme_str().is_none_or(|s| s == "https");
            let proto = HeaderValue::from_static(if https { "https" } else { "http" });
            req.headers_mut().insert("x-forwarded-proto", proto);
        }
        let key = CacheKey::from_request(&req, self.scheme(&req), &self.config.query);
        let headers = req.headers().clone();
        let answer = self.serve(req, SocketAddr::from(([127, 0, 0, 1], 0))).await;
        let status = answer.response.status();
        let (outcome, stored) = (answer.outcome, answer.stored);
        let mut body = answer.response.into_body();
        let mut bytes = 0u64;
        while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
            match frame {
                Ok(f) => bytes += f.data_ref().map(|d| d.len() as u64).unwrap_or(0),
                Err(e) => return WarmResult::Failed(Failure::Interrupted { detail: e.to_string() }),
            }
        }
        let result = match outcome {
            // From the shared tier: stored here now.
            Outcome::Hit if stored => WarmResult::Warmed { bytes },
            Outcome::Hit => WarmResult::AlreadyWarm { bytes },
            _ if !status.is_success() => WarmResult::Failed(Failure::Status {
                status: status.as_u16(),
            }),
            Outcome::Coalesced => WarmResult::Warmed { bytes },
            _ if stored => WarmResult::Warmed { bytes },
            _ => WarmResult::Failed(Failure::NotCacheable),
        };
        if matches!(result, WarmResult::Warmed { .. } | WarmResult::AlreadyWarm { .. })
            && let Some(key) = key
        {
            // Primed means ready for browsers: its compressed variants made (bounded).
            self.cache.variants_settled(&key, &headers, PRIME_COMPRESS_WAIT).await;
        }
        metrics::counter!(m::PRIME_OBJECTS, "result" => result.as_str()).increment(1);
        if let WarmResult::Warmed { bytes } = result {
            metrics::counter!(m::PRIME_BYTES).increment(bytes);
        }
        result
    }

    /// Serves a request through the cache (everything but upgrades).
    async fn serve(self: &Arc<Self>, req: Request<ProxyBody>, client: SocketAddr) -> Answer {
        if matches!(*req.method(), Method::GET | Method::HEAD) && !req.body().is_end_stream() {
            // A GET or HEAD with a body (Content-Length above 0, or chunked): RFC 9110 §9.3.1
            // gives it no meaning, yet an app may read it, and the key does not hold it. Its
            // answer is neither taken from nor stored in the cache, and it invalidates nothing.
            let mut answer = self.forward(req, client, Outcome::Bypass, Fwd::Bypass).await;
            if answer.outcome == Outcome::Bypass {
                answer.detail = Some("detail=request-body");
            }
            return answer;
        }
        if !policy::is_cacheable_request(req.method(), req.headers()) {
            if matches!(*req.method(), Method::GET | Method::HEAD) {
                return self.forward(req, client, Outcome::Bypass, Fwd::Request).await;
            }
            return self.forward_unsafe(req, client).await;
        }
        let Some(key) = CacheKey::from_request(&req, self.scheme(&req), &self.config.query) else {
            return self.forward(req, client, Outcome::Bypass, Fwd::Bypass).await;
        };
        if rules::bypassed(&self.config.rules, req.uri().path()) {
            return self.forward(req, client, Outcome::Bypass, Fwd::Bypass).await;
        }
        // The app gets the query the key holds, no more: a parameter left out of the key
        // (`query: {deny: [utm_source]}`) must not change the answer stored under it.
        let mut req = req;
        if let Some(kept) = req.uri().query().and_then(|q| rules::app_query(q, &self.config.query)) {
            let path = req.uri().path();
            let pq = if kept.is_empty() {
                path.to_owned()
            } else {
                format!("{path}?{kept}")
            };
            let mut parts = req.uri().clone().into_parts();
            parts.path_and_query = pq.parse().ok();
            if let Ok(uri) = http::Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
        let mut req_cc = CacheControl::parse(req.headers());
        // RFC 9111 §5.4: Pragma: no-cache means Cache-Control: no-cache when the latter is absent.
        if !req.headers().contains_key(header::CACHE_CONTROL)
            && req
                .headers()
                .get(header::PRAGMA)
                .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"no-cache"))
        {
            req_cc.no_cache = true;
        }
        let reload = req_cc.no_cache;
        let mut fwd = if reload { Fwd::Request } else { Fwd::UriMiss };
        let mut stored: Option<(Hit, Freshness)> = None;
        // A released waiter retries the cache; bounded so a flapping app cannot loop us.
        for _ in 0..3 {
            if let Some(hit) = self.cache.lookup(&key, req.headers()).await {
                if !reusable_for(&hit.meta, req.headers()) {
                    fwd = Fwd::VaryMiss;
                } else {
                    let f = self.hit_freshness(&hit);
                    match policy::usable(f, &req_cc, &self.prepared(&hit.meta).cc) {
                        Usable::Fresh => {
                            let response = self.serve_stored(req.method(), req.headers(), &hit, f);
                            return Answer::new(response, Outcome::Hit, None);
                        }
                        Usable::StaleWhileRevalidate => {
                            self.refresh_in_background(&req, key.clone(), &hit, f);
                            let response = self.serve_stored(req.method(), req.headers(), &hit, f);
                            let mut answer = Answer::new(response, Outcome::Stale, None);
                            answer.detail = Some("stale-while-revalidate");
                            return answer;
                        }
                        Usable::Revalidate => {
                            if !reload {
                                fwd = Fwd::Stale;
                            }
                            stored = Some((hit, f));
                        }
                    }
                }
            }
            if fwd == Fwd::UriMiss && self.cache.varies(&key) {
                fwd = Fwd::VaryMiss;
            }
            // §5.2.1.7: only-if-cached and nothing usable is stored.
            if req_cc.only_if_cached {
                let response = error_response(StatusCode::GATEWAY_TIMEOUT, "504 Gateway Timeout: not cached\n");
                return Answer::new(response, Outcome::Miss, Some(fwd));
            }
            if req.method() == Method::HEAD || req.headers().contains_key(header::RANGE) {
                // Nothing to store from a HEAD or a partial answer: ask the app directly.
                return self.forward(req, client, Outcome::Miss, fwd).await;
            }
            match self.cache.claim(&key, req.headers()) {
                Claim::Leader(permit) => {
                    // Nothing stored here for the URL: the shared tier first, still as the
                    // key's one leader (its waiters retry the local cache once it is stored).
                    if stored.is_none()
                        && fwd == Fwd::UriMiss
                        && let Some(answer) = self.read_through(req.method(), req.headers(), &key, &req_cc).await
                    {
                        permit.release(true);
                        return answer;
                    }
                    return self.fetch(req, client, key, permit, fwd, stored).await;
                }
                Claim::Wait(flight) => match flight.wait(self.config.coalesce_timeout).await {
                    Waited::Streaming(fill) if reusable_for(&fill.meta, req.headers()) => {
                        // These bytes come from the cache: the app sent them once, for the leader.
                        let reader = body::sized(fill.reader(), fill.meta.body_len);
                        let reader = body::counted(reader, handles().served_cache_bytes.clone());
                        let response = answer_fill(req.headers(), &fill.meta, reader, self.compressible(&fill.meta));
                        return Answer::new(response, Outcome::Coalesced, Some(fwd));
                    }
                    ended if ended.retries() => continue,
                    // Not shareable, another variant, or the leader is too slow: go alone.
                    ended => {
                        debug!(wait = ended.as_str(), "coalesced wait ended without a body");
                        return self.forward(req, client, Outcome::Miss, fwd).await;
                    }
                },
            }
        }
        self.forward(req, client, Outcome::Miss, fwd).await
    }

    /// Reads a local miss through the shared tier: an object found there, checked, and fresh
    /// enough for this request by the app's own times (RFC 9111 §4.2.3: its age counts from
    /// the app's answer, not from the download), is stored here and served. `None`: ask the
    /// app (no tier, not there, refused, failing, stale, or not storable here).
    async fn read_through(
        &self,
        method: &Method,
        headers: &HeaderMap,
        key: &CacheKey,
        req_cc: &CacheControl,
    ) -> Option<Answer> {
        let shared = self.shared.as_ref()?;
        let Lookup::Found(meta, object) = shared.lookup(key).await else {
            return None;
        };
        let f = self.freshness(&meta);
        if policy::usable(f, req_cc, &self.prepared(&meta).cc) != Usable::Fresh {
            debug!("shared tier object not fresh enough: asking the app");
            shared.unused();
            return None;
        }
        let Some(hit) = self.cache.import(*meta, object).await else {
            shared.unused();
            return None;
        };
        shared.hit();
        let f = self.freshness(&hit.meta);
        let response = self.serve_stored(method, headers, &hit, f);
        let mut answer = Answer::new(response, Outcome::Hit, None);
        answer.detail = Some("detail=shared-tier");
        answer.stored = true;
        Some(answer)
    }

    /// Offers a fill to the shared tier once it is committed, if it may be shared
    /// ([`shared::shareable`]) and stays fresh for at least `shared_tier_min_fresh`.
    fn share_when_committed(&self, fill: &Arc<Fill>, req_headers: &HeaderMap, set_cookie: bool) {
        let Some(tier) = &self.shared else { return };
        if !shared::shareable(&fill.meta, req_headers, set_cookie) {
            return;
        }
        let f = self.freshness(&fill.meta);
        if f.lifetime.saturating_sub(f.age) < tier.config().min_fresh {
            return;
        }
        let (tier, fill) = (tier.clone(), fill.clone());
        tokio::spawn(async move {
            if fill.finished().await == FillState::Complete {
                tier.offer(Upload {
                    key: fill.meta.key.clone(),
                    request_time: fill.meta.request_time,
                    response_time: fill.meta.response_time,
                });
            }
        });
    }

    /// The scheme the client used, for the cache key.
    fn scheme(&self, req: &Request<ProxyBody>) -> &'static str {
        let https = self.config.trust_forwarded
            && req
                .headers()
                .get("x-forwarded-proto")
                .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"https"));
        if https { "https" } else { "http" }
    }

    fn heuristic(&self) -> Heuristic {
        Heuristic {
            fraction: self.config.heuristic_fraction,
            max: self.config.heuristic_max,
        }
    }

    fn freshness(&self, meta: &Meta) -> Freshness {
        self.prepared(meta).freshness(SystemTime::now())
    }

    /// A stored response's freshness now, counting a soft purge: stale from the mark on.
    pub fn hit_freshness(&self, hit: &Hit) -> Freshness {
        let prepared = self.prepared(&hit.meta);
        let f = prepared.freshness(SystemTime::now());
        match hit.soft_purged {
            Some(at) => f.soft_purged(prepared.freshness(at).age),
            None => f,
        }
    }

    /// What serving `meta` needs, worked out on its first hit. The head of an object that
    /// gets compressed variants says `Vary: Accept-Encoding` whichever body it is sent with.
    pub(crate) fn prepared<'m>(&self, meta: &'m Meta) -> &'m Prepared {
        meta.prepared.get_or_init(|| {
            let status = StatusCode::from_u16(meta.status).unwrap_or(StatusCode::OK);
            let times = (meta.request_time, meta.response_time);
            let mut prepared = Prepared::new(status, &meta.headers, times, meta.body_len, self.heuristic());
            if self.compressible(meta) {
                negotiate::vary_on_accept_encoding(&mut prepared.headers);
            }
            prepared
        })
    }

    /// Whether a stored response gets compressed variants (so its answers vary on
    /// `Accept-Encoding`).
    fn compressible(&self, meta: &Meta) -> bool {
        self.config.compress.eligible(meta.status, &meta.headers, meta.body_len)
    }

    /// Answers a request from a stored response: 304 for a satisfied conditional, 206 or 416
    /// for a range, else the whole body; `Age` per RFC 9111 §4.2.3 and §5.1.
    /// A compressed variant is sent with its own head (`negotiate::variant_head`): its
    /// validator is the one conditionals are evaluated against, and it is never ranged.
    fn serve_stored(&self, method: &Method, req: &HeaderMap, hit: &Hit, f: Freshness) -> Response<ProxyBody> {
        let meta = &hit.meta;
        let status = StatusCode::from_u16(meta.status).unwrap_or(StatusCode::OK);
        let age = HeaderValue::from(f.age.as_secs());
        let len = hit.body.len() as u64;
        // The prepared head already has the full length and Accept-Ranges.
        let mut headers = self.prepared(meta).headers.clone();
        if let Some(coding) = hit.coding {
            negotiate::variant_head(&mut headers, coding, len);
        }
        if status == StatusCode::OK && policy::answers_not_modified(req, &headers) {
            let mut resp = not_modified(&headers);
            resp.headers_mut().insert(header::AGE, age);
            return resp;
        }
        let range = if status == StatusCode::OK && hit.coding.is_none() {
            policy::range(req, &meta.headers, len)
        } else {
            RangeAnswer::Full
        };
        let (status, body) = match range {
            RangeAnswer::Full => (status, hit.body.clone()),
            RangeAnswer::Partial(start, end) => {
                let content_range = HeaderValue::try_from(format!("bytes {start}-{end}/{len}"));
                headers.extend(content_range.map(|v| (header::CONTENT_RANGE, v)));
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start + 1));
                headers.remove(header::ACCEPT_RANGES);
                (
                    StatusCode::PARTIAL_CONTENT,
                    hit.body.slice(start as usize..=end as usize),
                )
            }
            RangeAnswer::Unsatisfiable => {
                let content_range = HeaderValue::try_from(format!("bytes */{len}"));
                headers.extend(content_range.map(|v| (header::CONTENT_RANGE, v)));
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0u64));
                headers.remove(header::ACCEPT_RANGES);
                (StatusCode::RANGE_NOT_SATISFIABLE, bytes::Bytes::new())
            }
        };
        headers.insert(header::AGE, age);
        let sent = body.len() as u64;
        let mut resp = Response::new(if method == Method::HEAD {
            body::empty()
        } else {
            let h = handles();
            h.served_cache_bytes.increment(sent);
            let (responses, bytes) = &h.by_encoding[encoding_slot(hit.coding)];
            responses.increment(1);
            bytes.increment(sent);
            if hit.coding.is_some() {
                h.compress_saved.increment(meta.body_len.saturating_sub(sent));
            }
            body::full(body)
        });
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        resp
    }

    /// A stale stored response standing in for a failing app, if it may (RFC 9111 §4.2.4).
    fn stale_for_error(&self, req: &HeaderMap, method: &Method, stored: &Option<(Hit, Freshness)>) -> Option<Answer> {
        let (hit, f) = stored.as_ref()?;
        if !policy::may_serve_stale_on_error(*f, &self.prepared(&hit.meta).cc, self.config.stale_if_error) {
            return None;
        }
        let mut answer = Answer::new(
            self.serve_stored(method, req, hit, *f),
            Outcome::Stale,
            Some(Fwd::Stale),
        );
        answer.detail = Some("stale-if-error");
        Some(answer)
    }

    /// The leader's fetch: ask the app (conditionally, when a stale copy has validators), then
    /// refresh, store while streaming, fall back to the stale copy, or relay.
    async fn fetch(
        &self,
        mut req: Request<ProxyBody>,
        client: SocketAddr,
        key: CacheKey,
        permit: FillPermit,
        fwd: Fwd,
        stored: Option<(Hit, Freshness)>,
    ) -> Answer {
        let method = req.method().clone();
        let client_headers = req.headers().clone();
        let path = req.uri().path().to_owned();
        // The client's own conditionals are answered by us from what we hold; the app is asked
        // with our validators instead (RFC 9111 §4.3.1).
        for name in [
            header::IF_NONE_MATCH,
            header::IF_MODIFIED_SINCE,
            header::IF_MATCH,
            header::IF_UNMODIFIED_SINCE,
        ] {
            req.headers_mut().remove(name);
        }
        let mut validating = false;
        if let Some((hit, _)) = &stored {
            if let Some(etag) = hit.meta.headers.get(header::ETAG) {
                req.headers_mut().insert(header::IF_NONE_MATCH, etag.clone());
                validating = true;
            }
            if let Some(lm) = hit.meta.headers.get(header::LAST_MODIFIED) {
                req.headers_mut().insert(header::IF_MODIFIED_SINCE, lm.clone());
                validating = true;
            }
        }
        let req_headers = req.headers().clone();
        let request_time = SystemTime::now();
        let sent = match req.extensions().get::<FillFrom>().cloned() {
            Some(from) => self.upstream.send_to(&self.sources, &from.0, &req_headers).await,
            None => {
                self.upstream.prepare(&mut req, client, None);
                self.upstream.send(req).await.map(|r| r.map(body::boxed))
            }
        };
        let resp = match sent {
            Ok(resp) => resp,
            Err(err) => {
                warn!(error = %err, "upstream request failed");
                if let Some(answer) = self.stale_for_error(&client_headers, &method, &stored) {
                    permit.release(false);
                    return answer;
                }
                drop(permit);
                return Answer::new(err.response(), Outcome::Error, Some(fwd));
            }
        };
        let response_time = SystemTime::now();
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);

        if validating
            && parts.status == StatusCode::NOT_MODIFIED
            && let Some((hit, _)) = stored
        {
            // §4.3.4: freshen the stored response with the 304's headers, serve the stored body.
            // A cookie the 304 sets is this client's alone: it goes to this client, never into
            // the shared copy. An update that makes the copy unshareable (`private`,
            // `no-store`, ...) removes it instead: the 304 answers this client only.
            let mut update = parts.headers.clone();
            let cookies: Vec<HeaderValue> = update.get_all(header::SET_COOKIE).iter().cloned().collect();
            update.remove(header::SET_COOKIE);
            let meta = refreshed(&hit.meta, &update, request_time, response_time);
            let status = StatusCode::from_u16(meta.status).unwrap_or(StatusCode::OK);
            let shareable = policy::storable(&method, &req_headers, status, &meta.headers).is_ok()
                && self.config.tags.parse(&meta.headers).is_ok();
            let refreshed_hit = Hit {
                meta: Arc::new(meta.clone()),
                body: hit.body.clone(),
                coding: hit.coding,
                // Revalidated now: whatever mark the stored version had is answered.
                soft_purged: None,
            };
            if shareable {
                self.cache.refresh(meta).await;
                permit.release(true);
            } else {
                debug!("a 304 made the stored copy unshareable: removed");
                self.cache.invalidate(&key).await;
                permit.release(false);
            }
            let f = self.freshness(&refreshed_hit.meta);
            // Unshareable, the merged head still answers this client (it was validated for it).
            let mut response = self.serve_stored(&method, &client_headers, &refreshed_hit, f);
            for cookie in cookies {
                response.headers_mut().append(header::SET_COOKIE, cookie);
            }
            let mut answer = Answer::new(response, Outcome::Revalidated, Some(fwd));
            answer.detail = Some("fwd-status=304");
            return answer;
        }
        if parts.status.is_server_error()
            && let Some(answer) = self.stale_for_error(&client_headers, &method, &stored)
        {
            permit.release(false);
            return answer;
        }
        // Before a rule may strip it: an answer that set a cookie is never shared beyond here.
        let set_cookie = parts.headers.contains_key(header::SET_COOKIE);
        let rule = rules::find(&self.config.rules, &path);
        if let Some(applied) = rules::apply(
            rule,
            self.config.fingerprinted_ttl,
            &path,
            parts.status,
            &mut parts.headers,
        ) {
            debug!(rule = applied, "freshness from a static-asset rule");
        }
        let storable = policy::storable(&method, &req_headers, parts.status, &parts.headers).and_then(|()| {
            self.config.tags.parse(&parts.headers).map(drop).map_err(|why| {
                metrics::counter!(m::TAGS_REFUSED, "reason" => why.as_str()).increment(1);
                policy::NotStorable::Tags
            })
        });
        let lifetime = policy::freshness_lifetime(parts.status, &parts.headers, response_time, self.heuristic());
        if let Err(why) = storable {
            debug!(reason = why.as_str(), "response not stored");
        }
        if storable.is_err() || lifetime.is_zero() && !has_validator(&parts.headers) {
            permit.release(false);
            return Answer::new(
                Response::from_parts(parts, from_upstream(body)),
                Outcome::Miss,
                Some(fwd),
            );
        }
        let meta = Meta {
            key,
            status: parts.status.as_u16(),
            headers: detached(&parts.headers),
            request_time,
            response_time,
            body_len: 0,
            digest: Digest([0; 32]),
            vary: vary_values(&parts.headers, &req_headers)
                .into_iter()
                .map(|(name, value)| (name, value.map(|v| detach(&v))))
                .collect(),
            prepared: Default::default(),
        };
        let length = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        // Waiters for this fill get its bytes only if the answer may be reused without asking
        // the app: fresh, and not `no-cache`. Another user's `no-cache` page, or an answer
        // stored for its validator alone, is stored, but each waiter asks the app for its own.
        let reusable = !lifetime.is_zero() && !policy::response_directives(&parts.headers).0.no_cache;
        match length {
            Some(len) if reusable => match self
                .cache
                .start_fill(permit, Meta { body_len: len, ..meta }, body)
                .await
            {
                Ok(fill) => {
                    self.share_when_committed(&fill, &req_headers, set_cookie);
                    let reader = body::sized(fill.reader(), fill.meta.body_len);
                    let response = answer_fill(&client_headers, &fill.meta, reader, self.compressible(&fill.meta));
                    let mut answer = Answer::new(response, Outcome::Miss, Some(fwd));
                    answer.stored = true;
                    answer
                }
                Err((permit, body)) => {
                    permit.release(false);
                    Answer::new(
                        Response::from_parts(parts, from_upstream(body)),
                        Outcome::Miss,
                        Some(fwd),
                    )
                }
            },
            _ => {
                permit.release(false);
                let body = match self.cache.tee_fill(meta) {
                    Some(copy) => body::tee(from_upstream(body), copy),
                    None => from_upstream(body),
                };
                let mut answer = Answer::new(Response::from_parts(parts, body), Outcome::Miss, Some(fwd));
                answer.stored = true;
                answer
            }
        }
    }

    /// RFC 5861 §3: serve stale now, revalidate once in the background.
    fn refresh_in_background(self: &Arc<Self>, req: &Request<ProxyBody>, key: CacheKey, hit: &Hit, f: Freshness) {
        let Claim::Leader(permit) = self.cache.claim(&key, req.headers()) else {
            return;
        };
        let mut bg = Request::new(body::empty());
        *bg.uri_mut() = req.uri().clone();
        *bg.headers_mut() = req.headers().clone();
        bg.headers_mut().remove(header::RANGE);
        bg.headers_mut().remove(header::IF_RANGE);
        let stored = Some((
            Hit {
                meta: hit.meta.clone(),
                body: hit.body.clone(),
                coding: hit.coding,
                soft_purged: hit.soft_purged,
            },
            f,
        ));
        let proxy = self.clone();
        let client = SocketAddr::from(([127, 0, 0, 1], 0));
        tokio::spawn(async move {
            let answer = proxy.fetch(bg, client, key, permit, Fwd::Stale, stored).await;
            // Drain a stored fill so it completes; nobody reads this response.
            let mut body = answer.response.into_body();
            while http_body_util::BodyExt::frame(&mut body).await.is_some() {}
        });
    }

    /// Forwards a request of any other method than GET and HEAD. A non-error answer to an
    /// unsafe method (see [`invalidates`]) invalidates what is stored for its URL and for the
    /// URLs in `Location` and `Content-Location` on the same host (RFC 9111 §4.4), within the
    /// bound of [`INVALIDATION_BURST`].
    async fn forward_unsafe(&self, req: Request<ProxyBody>, client: SocketAddr) -> Answer {
        let key = invalidates(req.method())
            .then(|| CacheKey::from_request(&req, self.scheme(&req), &self.config.query))
            .flatten();
        let answer = self.forward(req, client, Outcome::Bypass, Fwd::Method).await;
        let status = answer.response.status();
        if let Some(key) = key
            && answer.outcome == Outcome::Bypass
            && (status.is_success() || status.is_redirection())
        {
            let mut n = self.invalidate(&key).await;
            for name in [header::LOCATION, header::CONTENT_LOCATION] {
                if let Some(target) = answer.response.headers().get(&name).and_then(|v| v.to_str().ok())
                    && let Some(other) = key.same_host(target)
                {
                    n += self.invalidate(&other).await;
                }
            }
            if n > 0 {
                debug!(objects = n, "invalidated by an unsafe request");
            }
        }
        answer
    }

    /// Invalidates what is stored for one key; how many objects went. A key with `Vary`
    /// variants scans the index, so those are bounded; any other is one lookup, the cost of the
    /// request itself, and never skipped (a flood must not starve real invalidations).
    async fn invalidate(&self, key: &CacheKey) -> usize {
        if self.cache.varies(key) && !self.invalidations.try_take() {
            metrics::counter!(m::INVALIDATIONS_SKIPPED).increment(1);
            debug!("invalidation skipped: over the rate bound");
            return 0;
        }
        self.cache.invalidate(key).await
    }

    /// Forwards to the app and relays the answer without storing it.
    pub async fn forward(&self, mut req: Request<ProxyBody>, client: SocketAddr, outcome: Outcome, fwd: Fwd) -> Answer {
        self.upstream.prepare(&mut req, client, None);
        match self.upstream.send(req).await {
            Ok(resp) => Answer::new(relay_response(resp), outcome, Some(fwd)),
            Err(err) if err.is_client() => {
                // The client's body broke (malformed chunked framing, gone mid-upload): its
                // 400, counted as a client error, never as the app's.
                debug!(error = %err, "client request body failed");
                let mut answer = Answer::new(err.response(), Outcome::Bypass, Some(fwd));
                answer.detail = Some("detail=client-error");
                answer
            }
            Err(err) => {
                warn!(error = %err, "upstream request failed");
                Answer::new(err.response(), Outcome::Error, Some(fwd))
            }
        }
    }

    /// Passes an `Upgrade` request (WebSocket, ...) to the app and, on `101`, splices the two
    /// connections together.
    async fn tunnel(&self, mut req: Request<Incoming>, client: SocketAddr) -> Answer {
        let upgrade_header = req.headers().get(header::UPGRADE).cloned();
        let client_upgrade = hyper::upgrade::on(&mut req);
        let mut req = req.map(body::boxed);
        self.upstream.prepare(&mut req, client, upgrade_header);
        let mut resp = match self.upstream.send(req).await {
            Ok(resp) => resp,
            Err(err) => {
                warn!(error = %err, "upstream upgrade request failed");
                return Answer::new(err.response(), Outcome::Error, Some(Fwd::Bypass));
            }
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Answer::new(relay_response(resp), Outcome::Bypass, Some(Fwd::Bypass));
        }
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok((client_io, app_io)) => {
                    let mut client_io = TokioIo::new(client_io);
                    let mut app_io = TokioIo::new(app_io);
                    match tokio::io::copy_bidirectional(&mut client_io, &mut app_io).await {
                        Ok((up, down)) => debug!(up, down, "tunnel closed"),
                        Err(e) => debug!(error = %e, "tunnel ended with an error"),
                    }
                }
                Err(e) => debug!(error = %e, "upgrade failed"),
            }
        });
        let (parts, _) = resp.into_parts();
        Answer::new(
            Response::from_parts(parts, body::empty()),
            Outcome::Bypass,
            Some(Fwd::Bypass),
        )
    }
}

/// Request extension: fill this request's miss from this URL (inside `prime_sources`) instead
/// of the app.
#[derive(Debug, Clone)]
struct FillFrom(Arc<SourceUrl>);

/// What priming one URL did: the prime protocol's outcome, produced by [`Proxy::warm`].
pub use crate::prime::protocol::WarmResult;

/// The `Cache-Status` header (RFC 9211).
pub static CACHE_STATUS: header::HeaderName = header::HeaderName::from_static("cache-status");

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == http::Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
        // h2c upgrade is deprecated (RFC 9113 §3.1) and hop-by-hop: serve it as HTTP/1.1.
        && !req.headers().get(header::UPGRADE).is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(b"h2c"))
}

/// A response built from a fill's stored head, its body read while the fill writes it. A client
/// conditional that the new response satisfies is answered with 304.
fn answer_fill(req: &HeaderMap, meta: &Meta, body: ProxyBody, compressible: bool) -> Response<ProxyBody> {
    let status = StatusCode::from_u16(meta.status).unwrap_or(StatusCode::OK);
    let mut headers = meta.headers.clone();
    if compressible {
        negotiate::vary_on_accept_encoding(&mut headers);
    }
    if status == StatusCode::OK && policy::answers_not_modified(req, &headers) {
        return not_modified(&headers);
    }
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(meta.body_len));
    resp
}

/// A 304 for a stored response (RFC 9110 §15.4.5: the validator and caching fields, no body).
fn not_modified(stored: &HeaderMap) -> Response<ProxyBody> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::NOT_MODIFIED;
    let mut headers = stored.clone();
    for name in [header::CONTENT_LENGTH, header::CONTENT_RANGE, header::TRANSFER_ENCODING] {
        headers.remove(name);
    }
    *resp.headers_mut() = headers;
    resp
}

/// The stored head freshened by a 304 (RFC 9111 §3.2, §4.3.4): the 304's fields replace the
/// stored ones, except those describing the body, which the 304 has none of.
fn refreshed(stored: &Meta, update: &HeaderMap, request_time: SystemTime, response_time: SystemTime) -> Meta {
    let mut meta = stored.clone();
    let mut seen = std::collections::HashSet::new();
    for (name, value) in update {
        if matches!(
            *name,
            header::CONTENT_LENGTH | header::CONTENT_RANGE | header::TRANSFER_ENCODING
        ) {
            continue;
        }
        if seen.insert(name.clone()) {
            meta.headers.remove(name);
        }
        meta.headers.append(name.clone(), detach(value));
    }
    meta.request_time = request_time;
    meta.response_time = response_time;
    meta
}

/// A copy of `headers` in allocations of its own. Values parsed by hyper share the buffer the
/// response was read into, body bytes included: a stored head must not keep that alive for as
/// long as it is cached.
fn detached(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        out.append(name.clone(), detach(value));
    }
    out
}

/// A copy of one value in an allocation of its own (see [`detached`]).
fn detach(value: &HeaderValue) -> HeaderValue {
    let mut copy = HeaderValue::from_maybe_shared(bytes::Bytes::copy_from_slice(value.as_bytes()))
        .unwrap_or_else(|_| value.clone());
    copy.set_sensitive(value.is_sensitive());
    copy
}

/// Whether a response carries a validator a later revalidation can use.
fn has_validator(headers: &HeaderMap) -> bool {
    headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED)
}

/// For each header a response's `Vary` names, the value this request had (RFC 9111 §4.1).
fn vary_values(resp_headers: &HeaderMap, req_headers: &HeaderMap) -> Vec<(HeaderName, Option<HeaderValue>)> {
    resp_headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .map(|name| {
            let value = normalize_vary(&name, req_headers);
            (name, value)
        })
        .collect()
}

/// Whether a stored response may answer a request: it has the values the response's `Vary`
/// recorded, and a body the app coded goes only to requests that accept its coding (the key
/// holds `Accept-Encoding` reduced to the common codings: one the app used outside them must
/// still be checked; and an app that codes without saying `Vary` must not hand one client's
/// coding to another that refuses it).
fn reusable_for(meta: &Meta, req_headers: &HeaderMap) -> bool {
    if !vary_matches(&meta.vary, req_headers) {
        return false;
    }
    let varies_on_coding = meta.vary.iter().any(|(name, _)| name == header::ACCEPT_ENCODING);
    // (A request without `Accept-Encoding` takes any coding, RFC 9110 §12.5.3, from an app
    // that does not vary on it: the app answers it the same.)
    if !varies_on_coding && !req_headers.contains_key(header::ACCEPT_ENCODING) {
        return true;
    }
    negotiate::accepts_stored(req_headers, meta.headers.get(header::CONTENT_ENCODING))
}

/// Whether a request has the values a stored response's `Vary` recorded.
fn vary_matches(stored: &[(HeaderName, Option<HeaderValue>)], req_headers: &HeaderMap) -> bool {
    stored
        .iter()
        .all(|(name, value)| normalize_vary(name, req_headers).as_ref() == value.as_ref())
}

/// An app response made ready for the client: hop-by-hop headers removed, body streamed.
pub fn relay_response(resp: Response<Incoming>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, from_upstream(body::boxed(body)))
}

/// Counts an app body's bytes as received from upstream.
fn from_upstream(body: ProxyBody) -> ProxyBody {
    body::counted(body, metrics::counter!(m::UPSTREAM_BYTES))
}
