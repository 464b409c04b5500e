//! THE request path: classify -> key -> lookup -> hit | miss+fill | wait | bypass.
//!
//! Every response leaves through [`Proxy::handle`], which stamps `Cache-Status`, records the
//! request metric and writes the access-log line from one [`Outcome`]. Upgrades (WebSocket) are
//! tunnelled to the app untouched.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{debug, info, warn};

use crate::body::{self, ProxyBody};
use crate::config::Config;
use crate::metrics as m;
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

/// A response on its way out, with what the cache did and the detail for `Cache-Status`.
pub struct Answer {
    /// The response.
    pub response: Response<ProxyBody>,
    /// What happened.
    pub outcome: Outcome,
    /// The `Cache-Status` parameters after the cache name, e.g. `hit` or `fwd=uri-miss; stored`.
    pub status_detail: &'static str,
}

/// Everything the request path needs, shared by every connection.
pub struct Proxy {
    /// The pooled client to the app.
    pub upstream: Upstream,
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
        let Answer {
            mut response,
            outcome,
            status_detail,
        } = answer;

        let cache_status = format!("sidecache; {status_detail}");
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
        self.forward(req, client, Outcome::Bypass, "fwd=bypass").await
    }

    /// Forwards to the app and relays the answer without storing it.
    pub async fn forward(
        &self,
        mut req: Request<ProxyBody>,
        client: SocketAddr,
        outcome: Outcome,
        detail: &'static str,
    ) -> Answer {
        self.upstream.prepare(&mut req, client, None);
        match self.upstream.send(req).await {
            Ok(resp) => Answer {
                response: relay_response(resp),
                outcome,
                status_detail: detail,
            },
            Err(err) => {
                warn!(error = %err, "upstream request failed");
                Answer {
                    response: err.response(),
                    outcome: Outcome::Error,
                    status_detail: "fwd=miss; detail=upstream-error",
                }
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
                return Answer {
                    response: err.response(),
                    outcome: Outcome::Error,
                    status_detail: "fwd=bypass; detail=upstream-error",
                };
            }
        };
        if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Answer {
                response: relay_response(resp),
                outcome: Outcome::Bypass,
                status_detail: "fwd=bypass",
            };
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
        Answer {
            response: Response::from_parts(parts, body::empty()),
            outcome: Outcome::Bypass,
            status_detail: "fwd=bypass",
        }
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

/// An app response made ready for the client: hop-by-hop headers removed, body streamed.
pub fn relay_response(resp: Response<Incoming>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body::boxed(body))
}
