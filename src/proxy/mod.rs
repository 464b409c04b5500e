//! THE request path: classify -> key -> lookup -> hit | miss+fill | wait | bypass.
//!
//! Every response leaves through [`Proxy::handle`], which stamps `Cache-Status`, records the
//! request metric and writes the access-log line from one [`Outcome`]. Upgrades (WebSocket) are
//! tunnelled to the app untouched.
//!
//! This file is the concept: [`Proxy`], the route every request takes as named steps (admit,
//! look up, lead or follow a fill, forward), warming for a prime, invalidation by unsafe
//! requests, and forwarding without storing. It sequences; `crate::policy` decides (what may
//! be stored, reused, validated, invalidated). Its side jobs each have a file: `exchange` (the
//! door: a request classified once, and the per-request context every later step reads:
//! key, matched rule, directives, client), `outcome` (what the cache did: [`Outcome`], [`Fwd`],
//! the [`Answer`] and its `Cache-Status`, the per-request metric handles), `stored` (answering
//! from a stored object:
//! freshness, 304s, ranges, variants, stale-if-error), `fetch` (fetching from the app and
//! refreshing: the leader's fetch, revalidation, stale-while-revalidate, the shared tier read
//! through and written behind, relaying) and `upgrade` (tunnelling upgrades).

mod exchange;
mod fetch;
mod outcome;
mod stored;
mod upgrade;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Body as _;
use hyper::body::Incoming;
use tracing::{debug, warn};

use crate::access;
use crate::body::{self, ProxyBody};
use crate::bucket::TokenBucket;
use crate::cache::fill::Fill;
use crate::cache::key::CacheKey;
use crate::cache::{Cache, Claim, FillPermit, Hit, Waited};
use crate::config::Config;
use crate::metrics as m;
use crate::policy::{self, Freshness, Usable};
use crate::prime::protocol::Failure;
use crate::rules;
use crate::shared::SharedTier;
use crate::sources::SourceUrl;
use crate::upstream::{Upstream, error_response};
use exchange::{Admission, Exchange};
use outcome::{handles, method_class};
use stored::{answer_fill, reusable, span_answer};
use upgrade::is_upgrade;

pub use fetch::relay_response;
pub use outcome::{Answer, CACHE_STATUS, Fwd, Outcome};

/// The `Accept-Encoding` a prime's requests carry: a current browser's.
const PRIME_ACCEPT_ENCODING: &str = "gzip, deflate, br, zstd";

/// How long a prime waits for one object's variants to be made.
const PRIME_COMPRESS_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Everything the request path needs, shared by every connection. Its parts are private:
/// callers reach the cache through whole operations ([`Proxy::handle`], [`Proxy::warm`],
/// [`Proxy::purge`]), so a purge has one door that does everything a purge must (the local
/// index, the soft marks, the shared tier's bookkeeping), never a second one that forgets a
/// step.
///
/// A clone shares every part (the cache, the app client, the invalidation bucket, the
/// counters): it is how a serving loop holds a replica of its own
/// ([`crate::reload::LoopProxy`]), since each request takes a reference on the proxy that
/// answers it, and one proxy shared by the loops moved that count's cache line between the
/// cores on every request.
#[derive(Clone)]
pub struct Proxy {
    /// The pooled client to the app.
    upstream: Upstream,
    /// The disk cache.
    cache: Arc<Cache>,
    /// Client for filling from other sources (`prime --from`): CDNs, buckets, over HTTPS. Its
    /// redirect policy stays inside `prime_sources` (see [`crate::sources::PrimeSources::client`]).
    sources: reqwest::Client,
    /// Configuration in force.
    config: Arc<Config>,
    /// Bounds invalidations by unsafe requests (see [`invalidation_bucket`]).
    invalidations: Arc<TokenBucket>,
    /// The shared tier in object storage, when configured: read on a local miss, written
    /// behind a fill.
    shared: Option<Arc<SharedTier>>,
    /// Requests and bytes by rule and outcome.
    rule_counts: RuleCounts,
}

/// How a purge treats what it selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurgeMode {
    /// Removed, with their variants.
    Hard,
    /// Marked stale as of now: the next request revalidates (see [`Cache::soft_purge`]).
    Soft,
}

/// What a purge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purged {
    /// A hard purge removed this many objects.
    Removed(usize),
    /// A soft purge marked this many objects stale.
    Marked(usize),
}

/// The per-rule counters (`sidecache_rule_requests_total`, `sidecache_rule_sent_bytes_total`),
/// registered once: one row per configured rule, in order, then `none` (no rule matched),
/// each by outcome. The label's values are the configured names: bounded by the configuration.
#[derive(Clone)]
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
            Outcome::ALL.map(|o| {
                let labels = vec![
                    metrics::Label::new("rule", name.to_owned()),
                    metrics::Label::new("outcome", o.as_str()),
                ];
                m::hot(metric, labels)
            })
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

impl Proxy {
    /// The request path over these parts; invalidations are bounded by
    /// [`invalidation_bucket`], rules counted by [`RuleCounts`].
    pub fn new(
        config: Arc<Config>,
        cache: Arc<Cache>,
        upstream: Upstream,
        sources: reqwest::Client,
        shared: Option<Arc<SharedTier>>,
    ) -> Proxy {
        Proxy {
            upstream,
            cache,
            sources,
            invalidations: Arc::new(invalidation_bucket()),
            shared,
            rule_counts: RuleCounts::new(&config.rules),
            config,
        }
    }

    /// The same parts (cache, app client, sources, shared tier) under another configuration,
    /// for a reload ([`crate::reload`]): its rules and their counters; requests in flight
    /// finish on `self`.
    pub fn reconfigured(&self, config: Arc<Config>) -> Proxy {
        let (cache, upstream) = (self.cache.clone(), self.upstream.clone());
        Proxy::new(config, cache, upstream, self.sources.clone(), self.shared.clone())
    }

    /// The disk cache (to read: its stats, inspect, gauges; purges go through [`Proxy::purge`]).
    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// The configuration in force.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// The client to the app.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Answers one client request.
    pub async fn handle(self: Arc<Self>, mut req: Request<Incoming>, client: SocketAddr) -> Response<ProxyBody> {
        let started = Instant::now();
        let method = req.method().clone();
        // Only the path (never the query) is logged, and only when logging is on.
        let path_for_log = self.config.access_log.then(|| req.uri().path().to_owned());
        let host_for_log = self.config.access_log.then(|| access::host(&req));
        // The client's (or router's) id, or a new one the app gets too: made here only for the
        // log; a request the app is asked gets one on its way (`Upstream::send`), and a hit
        // with the log off needs none.
        let request_id = self.config.access_log.then(|| access::request_id(req.headers_mut()));
        let version = req.version();

        // The rule the path falls under, matched once: for the bypass check and the per-rule
        // counts (`none`: the last row).
        let matched = rules::position(&self.config.rules, req.uri().path());
        let rule = matched.unwrap_or(self.config.rules.len());

        let (answer, upstream_wait) = if self.config.access_log {
            access::measured(self.route(req, client, matched)).await
        } else {
            (self.route(req, client, matched).await, None)
        };
        let cache_status = answer.cache_status();
        let Answer {
            mut response,
            outcome,
            stored,
            ..
        } = answer;
        if outcome == Outcome::Miss && !stored {
            // Not a hit candidate: the hit ratio leaves it out (issue 28, item 5).
            metrics::counter!(m::MISSES_NOT_STORED).increment(1);
        }
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
        if let (Some(path), Some(host), Some(request_id)) = (path_for_log, host_for_log, request_id) {
            // The path only: query strings may carry secrets; cookies and credentials never
            // logged. Written once the body is sent, with the bytes sent.
            let entry = access::Entry {
                method,
                host,
                path,
                version,
                status: response.status().as_u16(),
                outcome: outcome.as_str(),
                cache_status,
                elapsed,
                upstream: upstream_wait,
                client,
                request_id,
                started,
            };
            return response.map(|b| entry.log_after(b));
        }
        response
    }

    async fn route(self: &Arc<Self>, req: Request<Incoming>, client: SocketAddr, matched: Option<usize>) -> Answer {
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
        self.serve(req.map(body::boxed), client, matched).await
    }

    /// The GET a prime sends through the cache for `target` (see [`Proxy::warm`]): `host` (or
    /// the target's own authority) as Host, the browsers' Accept-Encoding, and the scheme as
    /// `X-Forwarded-Proto` when that is part of the key.
    fn prime_request(&self, host: &str, target: &str, from: Option<&SourceUrl>) -> Result<Request<ProxyBody>, Failure> {
        let mut req = Request::new(body::empty());
        let Ok(uri) = target.parse::<http::Uri>() else {
            return Err(Failure::BadTarget {
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
            return Err(Failure::BadTarget {
                detail: "not a URL or path".into(),
            });
        };
        if let Some(from) = from {
            // The URL fetched is the one checked: the request's own path, joined and parsed.
            let pq = path.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            match self.config.prime_sources.join(from, pq) {
                Ok(url) => req.extensions_mut().insert(FillFrom(Arc::new(url))),
                Err(e) => return Err(Failure::SourceRefused { detail: e.to_string() }),
            };
        }
        *req.uri_mut() = path;
        match HeaderValue::from_str(&host) {
            Ok(h) => req.headers_mut().insert(header::HOST, h),
            Err(_) => {
                return Err(Failure::BadTarget {
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
        Ok(req)
    }

    /// Gets one document through the cache as a prime sees it (same Host and scheme as
    /// [`Proxy::warm`], uncompressed), for the prime command to read: a sitemap is fetched
    /// from this instance's app, under the public Host, not from the public URL.
    pub async fn fetch_document(self: &Arc<Self>, host: &str, target: &str) -> Result<Response<ProxyBody>, Failure> {
        let mut req = self.prime_request(host, target, None)?;
        req.headers_mut()
            .insert(header::ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        let matched = rules::position(&self.config.rules, req.uri().path());
        Ok(self
            .serve(req, SocketAddr::from(([127, 0, 0, 1], 0)), matched)
            .await
            .response)
    }

    /// Warms one URL for the prime command: a GET through the cache whose body goes nowhere.
    /// A fresh stored copy is not fetched again. With `from`, a miss is filled from that base
    /// URL (a CDN or bucket holding the built assets, admitted by `prime_sources`) instead of
    /// the app; the URL fetched must be inside `prime_sources` too.
    ///
    /// `target` may be an absolute URL: its host, not `host`, is then the key's. Either is the
    /// caller's choice; the admin port takes it only with the token beyond loopback.
    pub async fn warm(self: &Arc<Self>, host: &str, target: &str, from: Option<&SourceUrl>) -> WarmResult {
        let req = match self.prime_request(host, target, from) {
            Ok(req) => req,
            Err(why) => return WarmResult::Failed(why),
        };
        let key = CacheKey::from_request(&req, self.scheme(&req), &self.config.query);
        let headers = req.headers().clone();
        let matched = rules::position(&self.config.rules, req.uri().path());
        let answer = self.serve(req, SocketAddr::from(([127, 0, 0, 1], 0)), matched).await;
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
    /// `matched`: the rule the request's path falls under ([`rules::position`]).
    async fn serve(
        self: &Arc<Self>,
        mut req: Request<ProxyBody>,
        client: SocketAddr,
        matched: Option<usize>,
    ) -> Answer {
        // From here on, the head is what the app will get: the key, `Vary` and the directives
        // are read from nothing else.
        self.upstream.clean(req.headers_mut());
        match self.admit(req, client, matched) {
            Admission::Cache(ex) => self.through_cache(ex).await,
            Admission::Pass(req, fwd, detail) => self.pass(req, client, fwd, detail).await,
            Admission::Method(req) => self.forward_unsafe(req, client).await,
        }
    }

    /// A cacheable request: answered from what is stored when it may be (fresh, or stale
    /// within `stale-while-revalidate`); else by the key's one leader asking the app (the
    /// shared tier first); else from the leader's fill as it streams in; else forwarded.
    async fn through_cache(self: &Arc<Self>, ex: Exchange) -> Answer {
        let client = ex.client;
        let mut fwd = if ex.cc.no_cache { Fwd::Request } else { Fwd::UriMiss };
        let mut stored: Option<(Hit, Freshness)> = None;
        // A released waiter retries the cache; bounded so a flapping app cannot loop us.
        for _ in 0..3 {
            match self.look_up(&ex).await {
                Found::Answer(answer) => return answer,
                Found::Validate(hit, f) => {
                    if !ex.cc.no_cache {
                        fwd = Fwd::Stale;
                    }
                    stored = Some((hit, f));
                }
                Found::OtherVariant => fwd = Fwd::VaryMiss,
                Found::Nothing => {}
            }
            if fwd == Fwd::UriMiss && self.cache.varies(&ex.key) {
                fwd = Fwd::VaryMiss;
            }
            // §5.2.1.7: only-if-cached and nothing usable is stored.
            if ex.cc.only_if_cached {
                let response = error_response(StatusCode::GATEWAY_TIMEOUT, "504 Gateway Timeout: not cached\n");
                return Answer::new(response, Outcome::Miss, Some(fwd));
            }
            if ex.req.method == Method::HEAD || ex.req.headers.contains_key(header::RANGE) {
                return self.head_or_range(ex, fwd, stored.is_some()).await;
            }
            match self.cache.claim(&ex.key, &ex.req.headers) {
                Claim::Leader(permit) => return self.lead(ex, permit, fwd, stored).await,
                Claim::Wait(flight) => match flight.wait(self.config.coalesce_timeout).await {
                    Waited::Streaming(fill)
                        if reusable(
                            &fill.meta,
                            fill.meta.headers.get(header::CONTENT_ENCODING),
                            &ex.req.headers,
                        ) =>
                    {
                        return self.follow(&ex, &fill, fwd);
                    }
                    ended if ended.retries() => continue,
                    // Not shareable, another variant, or the leader is too slow: go alone.
                    ended => {
                        debug!(wait = ended.as_str(), "coalesced wait ended without a body");
                        return self.forward(ex.into_request(), client, Outcome::Miss, fwd).await;
                    }
                },
            }
        }
        self.forward(ex.into_request(), client, Outcome::Miss, fwd).await
    }

    /// A HEAD or a range nothing stored answered: neither leads a fill. A HEAD is asked of the
    /// app directly (nothing to store from it); so is a range of a stored answer that must be
    /// validated first (a span would replace it); a range of nothing stored may be stored as
    /// a span ([`Proxy::fetch_range`]).
    async fn head_or_range(&self, ex: Exchange, fwd: Fwd, validating: bool) -> Answer {
        if ex.req.method == Method::HEAD || validating {
            let client = ex.client;
            return self.forward(ex.into_request(), client, Outcome::Miss, fwd).await;
        }
        self.fetch_range(ex, fwd).await
    }

    /// What is stored for a request, and whether it may answer it (RFC 9111 §4): fresh, or
    /// stale within `stale-while-revalidate` (then refreshed in the background), answers now.
    async fn look_up(self: &Arc<Self>, ex: &Exchange) -> Found {
        let Some(hit) = self.cache.lookup(&ex.key, &ex.req.headers).await else {
            return Found::Nothing;
        };
        // (Its coding from the prepared head, which the answer reads next anyway.)
        if !reusable(&hit.meta, self.prepared(&hit.meta).coding.as_ref(), &ex.req.headers) {
            return Found::OtherVariant;
        }
        let (method, headers) = (&ex.req.method, &ex.req.headers);
        // A stored span (a 206) answers a GET for a range inside it, while fresh, and nothing
        // else: for any other request it is as if nothing were stored, and the app's answer
        // replaces it (RFC 9111 §3.4). It is never revalidated or served stale.
        let span = hit.meta.status == StatusCode::PARTIAL_CONTENT.as_u16();
        if span && (*method != Method::GET || span_answer(&hit.meta, headers, hit.body.len() as u64).is_none()) {
            return Found::Nothing;
        }
        let f = self.hit_freshness(&hit);
        match policy::usable(f, &ex.cc, &self.prepared(&hit.meta).cc) {
            Usable::Fresh => Found::Answer(Answer::new(
                self.serve_stored(method, headers, &hit, f),
                Outcome::Hit,
                None,
            )),
            _ if span => Found::Nothing,
            Usable::StaleWhileRevalidate => {
                self.refresh_in_background(&ex.req, ex.key.clone(), ex.rule, &hit, f);
                let mut answer = Answer::new(self.serve_stored(method, headers, &hit, f), Outcome::Stale, None);
                answer.detail = Some("stale-while-revalidate");
                Found::Answer(answer)
            }
            Usable::Revalidate => Found::Validate(hit, f),
        }
    }

    /// The key's one leader: nothing stored here for the URL, the shared tier first (its
    /// waiters retry the local cache once it is stored); else the app.
    async fn lead(&self, ex: Exchange, permit: FillPermit, fwd: Fwd, stored: Option<(Hit, Freshness)>) -> Answer {
        if stored.is_none()
            && fwd == Fwd::UriMiss
            && let Some(answer) = self
                .read_through(&ex.req.method, &ex.req.headers, &ex.key, &ex.cc)
                .await
        {
            permit.release(true);
            return answer;
        }
        self.fetch(ex, permit, fwd, stored).await
    }

    /// A waiter answered from the leader's fill as it is written: these bytes come from the
    /// cache (the app sent them once, for the leader).
    fn follow(&self, ex: &Exchange, fill: &Arc<Fill>, fwd: Fwd) -> Answer {
        let reader = body::sized(fill.reader(), fill.meta.body_len);
        let reader = body::counted(reader, handles().served_cache_bytes.clone());
        let response = answer_fill(&ex.req.headers, &fill.meta, reader, self.compressible(&fill.meta));
        Answer::new(response, Outcome::Coalesced, Some(fwd))
    }

    /// A GET or HEAD passed to the app without the cache (see [`Admission::Pass`]).
    async fn pass(
        &self,
        req: Request<ProxyBody>,
        client: SocketAddr,
        fwd: Fwd,
        detail: Option<&'static str>,
    ) -> Answer {
        let mut answer = self.forward(req, client, Outcome::Bypass, fwd).await;
        if answer.outcome == Outcome::Bypass && detail.is_some() {
            answer.detail = detail;
        }
        answer
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

    /// Forwards a request of any other method than GET and HEAD. A non-error answer to a
    /// method not known to be safe ([`policy::invalidates`]) invalidates what is stored for its URL and for the
    /// URLs in `Location` and `Content-Location` on the same host (RFC 9111 §4.4), within the
    /// bound of [`INVALIDATION_BURST`].
    async fn forward_unsafe(&self, req: Request<ProxyBody>, client: SocketAddr) -> Answer {
        let key = policy::invalidates(req.method())
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
        let n = self.cache.invalidate(key).await;
        // The bucket may hold a copy this instance never had: marked whatever `n` is.
        if let Some(shared) = &self.shared {
            shared.purged_key(key.hash(), SystemTime::now());
        }
        n
    }

    /// Purges what `what` selects, the one way every caller purges: hard (removed) or soft
    /// (marked stale). Either way the shared tier's copies the app answered before now are
    /// not read back: a soft purge says the copy has changed as much as a hard one does, and
    /// the bucket's copy, found on a local miss, would come back fresh without a revalidation.
    pub async fn purge(&self, what: &crate::cache::Purge, mode: PurgeMode) -> Purged {
        // Marked before the local step: a read-through racing the purge must not store the
        // bucket's copy again once the local one is gone or marked.
        if let Some(shared) = &self.shared {
            shared.purged_all(SystemTime::now());
        }
        match mode {
            PurgeMode::Hard => Purged::Removed(self.cache.purge(what).await),
            PurgeMode::Soft => Purged::Marked(self.cache.soft_purge(what).await),
        }
    }

    /// Forwards to the app and relays the answer without storing it.
    pub async fn forward(&self, req: Request<ProxyBody>, client: SocketAddr, outcome: Outcome, fwd: Fwd) -> Answer {
        match self.send(req, client, fwd).await {
            Ok(resp) => Answer::new(relay_response(resp), outcome, Some(fwd)),
            Err(answer) => answer,
        }
    }

    /// Sends a request to the app as it is (with the forwarding fields): its answer, or the
    /// answer to give the client when there is none (a broken client body's 400, the error's
    /// 502 or 504).
    async fn send(
        &self,
        mut req: Request<ProxyBody>,
        client: SocketAddr,
        fwd: Fwd,
    ) -> Result<Response<Incoming>, Answer> {
        self.upstream.prepare(&mut req, client, None);
        match self.upstream.send(req).await {
            Ok(resp) => Ok(resp),
            Err(err) if err.is_client() => {
                // The client's body broke (malformed chunked framing, gone mid-upload): its
                // 400, counted as a client error, never as the app's.
                debug!(error = %err, "client request body failed");
                let mut answer = Answer::new(err.response(), Outcome::Bypass, Some(fwd));
                answer.detail = Some("detail=client-error");
                Err(answer)
            }
            Err(err) => {
                warn!(error = %err, "upstream request failed");
                Err(Answer::new(err.response(), Outcome::Error, Some(fwd)))
            }
        }
    }
}

/// What is stored for a cacheable request, as [`Proxy::look_up`] found it.
enum Found {
    /// It answers the request now.
    Answer(Answer),
    /// It must be validated with the app first (stale, or `no-cache`).
    Validate(Hit, Freshness),
    /// A variant is stored, but not this request's.
    OtherVariant,
    /// Nothing.
    Nothing,
}

/// Request extension: fill this request's miss from this URL (inside `prime_sources`) instead
/// of the app.
#[derive(Debug, Clone)]
struct FillFrom(Arc<SourceUrl>);

/// What priming one URL did: the prime protocol's outcome, produced by [`Proxy::warm`].
pub use crate::prime::protocol::WarmResult;
