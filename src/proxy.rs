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
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{debug, info, warn};

use crate::body::{self, ProxyBody};
use crate::cache::key::{CacheKey, Digest};
use crate::cache::meta::Meta;
use crate::cache::{Cache, Claim, FillPermit, Flight, Hit};
use crate::config::Config;
use crate::metrics as m;
use crate::policy::{self, CacheControl, Heuristic};
use crate::upstream::{Upstream, strip_hop_by_hop};

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
fn method_class(method: &Method) -> &'static str {
    match *method {
        Method::GET => "get",
        Method::HEAD => "head",
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE => "unsafe",
        _ => "other",
    }
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
}

impl Answer {
    fn new(response: Response<ProxyBody>, outcome: Outcome, fwd: Option<Fwd>) -> Answer {
        Answer {
            response,
            outcome,
            fwd,
            stored: false,
        }
    }

    /// The `Cache-Status` value (RFC 9211).
    fn cache_status(&self) -> String {
        let mut v = String::from("sidecache");
        match self.fwd {
            None => v.push_str("; hit"),
            Some(fwd) => {
                v.push_str("; fwd=");
                v.push_str(fwd.as_str());
            }
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
    /// Configuration in force.
    pub config: Arc<Config>,
}

impl Proxy {
    /// Answers one client request.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>, client: SocketAddr) -> Response<ProxyBody> {
        let started = Instant::now();
        let method = req.method().clone();
        let path_for_log = req.uri().path().to_owned();
        let version = req.version();

        let answer = self.route(req, client).await;
        let cache_status = answer.cache_status();
        let Answer {
            mut response, outcome, ..
        } = answer;
        if let Ok(v) = HeaderValue::from_str(&cache_status) {
            response.headers_mut().append(CACHE_STATUS.clone(), v);
        }
        let elapsed = started.elapsed();
        metrics::counter!(m::REQUESTS, "outcome" => outcome.as_str(), "method" => method_class(&method)).increment(1);
        metrics::histogram!(m::REQUEST_DURATION, "outcome" => outcome.as_str()).record(elapsed.as_secs_f64());
        if self.config.access_log {
            // The path only: query strings may carry secrets; cookies and credentials never logged.
            info!(
                target: "sidecache::access",
                method = %method,
                path = %path_for_log,
                version = ?version,
                status = response.status().as_u16(),
                outcome = outcome.as_str(),
                cache_status = %cache_status,
                micros = elapsed.as_micros() as u64,
                client = %client.ip(),
                "request"
            );
        }
        response
    }

    async fn route(&self, req: Request<Incoming>, client: SocketAddr) -> Answer {
        if is_upgrade(&req) {
            return self.tunnel(req, client).await;
        }
        let req = req.map(body::boxed);
        if !policy::is_cacheable_request(req.method(), req.headers()) {
            let fwd = if matches!(*req.method(), Method::GET | Method::HEAD) {
                Fwd::Request
            } else {
                Fwd::Method
            };
            return self.forward(req, client, Outcome::Bypass, fwd).await;
        }
        let Some(key) = CacheKey::from_request(&req, self.scheme(&req)) else {
            return self.forward(req, client, Outcome::Bypass, Fwd::Bypass).await;
        };
        let req_cc = CacheControl::parse(req.headers());
        // RFC 9111 §5.2.1: the client asks for a response validated with the app.
        let reload = req_cc.no_cache
            || req_cc.max_age == Some(0)
            || req
                .headers()
                .get(header::PRAGMA)
                .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"no-cache"));
        let mut fwd = if reload { Fwd::Request } else { Fwd::UriMiss };
        // A released waiter retries the cache; bounded so a flapping app cannot loop us.
        for _ in 0..3 {
            if !reload && let Some(hit) = self.cache.lookup(&key).await {
                if !vary_matches(&hit.meta.vary, req.headers()) {
                    fwd = Fwd::VaryMiss;
                } else if self.is_fresh(&hit.meta) {
                    return Answer::new(self.serve_hit(req.method(), hit), Outcome::Hit, None);
                } else {
                    fwd = Fwd::Stale;
                }
            }
            if req.method() == Method::HEAD {
                // A HEAD response has no body to store: ask the app directly.
                return self.forward(req, client, Outcome::Miss, fwd).await;
            }
            match self.cache.claim(&key) {
                Claim::Leader(permit) => return self.fetch(req, client, key, permit, fwd).await,
                Claim::Wait(flight) => match flight.wait(self.config.coalesce_timeout).await {
                    Some(Flight::Streaming(fill)) if vary_matches(&fill.meta.vary, req.headers()) => {
                        // These bytes come from the cache: the app sent them once, for the leader.
                        let reader = body::counted(fill.reader(), metrics::counter!(m::SERVED_CACHE_BYTES));
                        let response = fill_response(&fill.meta, reader);
                        return Answer::new(response, Outcome::Coalesced, Some(fwd));
                    }
                    Some(Flight::Released { retry: true }) => continue,
                    // Not shareable, another variant, or the leader is too slow: go alone.
                    _ => return self.forward(req, client, Outcome::Miss, fwd).await,
                },
            }
        }
        self.forward(req, client, Outcome::Miss, fwd).await
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

    fn is_fresh(&self, meta: &Meta) -> bool {
        let heuristic = Heuristic {
            fraction: self.config.heuristic_fraction,
            max: self.config.heuristic_max,
        };
        let status = StatusCode::from_u16(meta.status).unwrap_or(StatusCode::OK);
        let lifetime = policy::freshness_lifetime(status, &meta.headers, meta.response_time, heuristic);
        let age = policy::current_age(&meta.headers, meta.request_time, meta.response_time, SystemTime::now());
        age < lifetime
    }

    fn serve_hit(&self, method: &Method, hit: Hit) -> Response<ProxyBody> {
        let Hit { meta, body } = hit;
        let len = body.len() as u64;
        let mut resp = Response::new(if method == Method::HEAD {
            body::empty()
        } else {
            body::full(body)
        });
        *resp.status_mut() = StatusCode::from_u16(meta.status).unwrap_or(StatusCode::OK);
        *resp.headers_mut() = meta.headers.clone();
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        // RFC 9111 §4.2.3 / §5.1: the age the client sees includes our residence time.
        let age = policy::current_age(&meta.headers, meta.request_time, meta.response_time, SystemTime::now());
        resp.headers_mut().insert(header::AGE, HeaderValue::from(age.as_secs()));
        if method != Method::HEAD {
            metrics::counter!(m::SERVED_CACHE_BYTES).increment(len);
        }
        resp
    }

    /// The leader's fetch: ask the app, then store the answer while streaming it, or relay it.
    async fn fetch(
        &self,
        mut req: Request<ProxyBody>,
        client: SocketAddr,
        key: CacheKey,
        permit: FillPermit,
        fwd: Fwd,
    ) -> Answer {
        let method = req.method().clone();
        let req_headers = req.headers().clone();
        let request_time = SystemTime::now();
        self.upstream.prepare(&mut req, client, None);
        let resp = match self.upstream.send(req).await {
            Ok(resp) => resp,
            Err(err) => {
                warn!(error = %err, "upstream request failed");
                drop(permit);
                return Answer::new(err.response(), Outcome::Error, Some(fwd));
            }
        };
        let response_time = SystemTime::now();
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let body = body::boxed(body);
        let heuristic = Heuristic {
            fraction: self.config.heuristic_fraction,
            max: self.config.heuristic_max,
        };
        let storable = policy::storable(&method, &req_headers, parts.status, &parts.headers);
        let lifetime = policy::freshness_lifetime(parts.status, &parts.headers, response_time, heuristic);
        if let Err(why) = storable {
            debug!(reason = why.as_str(), "response not stored");
        }
        if storable.is_err() || lifetime.is_zero() {
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
            headers: parts.headers.clone(),
            request_time,
            response_time,
            body_len: 0,
            digest: Digest([0; 32]),
            body_gen: 0,
            vary: vary_values(&parts.headers, &req_headers),
        };
        let length = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        match length {
            Some(len) => match self.cache.start_fill(permit, Meta { body_len: len, ..meta }, body) {
                Ok(fill) => {
                    let mut answer = Answer::new(fill_response(&fill.meta, fill.reader()), Outcome::Miss, Some(fwd));
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
            None => {
                permit.release(false);
                let body = self.cache.tee_fill(meta, from_upstream(body));
                let mut answer = Answer::new(Response::from_parts(parts, body), Outcome::Miss, Some(fwd));
                answer.stored = true;
                answer
            }
        }
    }

    /// Forwards to the app and relays the answer without storing it.
    pub async fn forward(&self, mut req: Request<ProxyBody>, client: SocketAddr, outcome: Outcome, fwd: Fwd) -> Answer {
        self.upstream.prepare(&mut req, client, None);
        match self.upstream.send(req).await {
            Ok(resp) => Answer::new(relay_response(resp), outcome, Some(fwd)),
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

/// A response built from a fill's stored head, its body read while the fill writes it.
fn fill_response(meta: &Meta, body: ProxyBody) -> Response<ProxyBody> {
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(meta.status).unwrap_or(StatusCode::OK);
    *resp.headers_mut() = meta.headers.clone();
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(meta.body_len));
    resp
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
            let value = req_headers.get(&name).cloned();
            (name, value)
        })
        .collect()
}

/// Whether a request has the values a stored response's `Vary` recorded.
fn vary_matches(stored: &[(HeaderName, Option<HeaderValue>)], req_headers: &HeaderMap) -> bool {
    stored
        .iter()
        .all(|(name, value)| req_headers.get(name) == value.as_ref())
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
