//! Fetching from the app and refreshing: the leader's fetch (revalidate, store while
//! streaming, or relay), stale-while-revalidate in the background, the shared tier read on a
//! local miss and written behind a fill, and an app response made ready for the client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::{debug, warn};

use crate::body::{self, ProxyBody};
use crate::cache::fill::{Fill, FillState};
use crate::cache::key::{CacheKey, Digest};
use crate::cache::meta::Meta;
use crate::cache::{Claim, FillPermit, Hit};
use crate::metrics as m;
use crate::policy::{self, CacheControl, Freshness, Usable, Vary};
use crate::proxy::exchange::Exchange;
use crate::proxy::outcome::{Answer, Fwd, Outcome};
use crate::proxy::stored::answer_fill;
use crate::proxy::{FillFrom, Proxy};
use crate::rules;
use crate::shared::{self, Lookup, Upload};
use crate::upstream::{UpstreamError, strip_hop_by_hop};

impl Proxy {
    /// Reads a local miss through the shared tier: an object found there, checked, and fresh
    /// enough for this request by the app's own times (RFC 9111 §4.2.3: its age counts from
    /// the app's answer, not from the download), is stored here and served. `None`: ask the
    /// app (no tier, not there, refused, failing, stale, or not storable here).
    pub(super) async fn read_through(
        &self,
        method: &Method,
        headers: &HeaderMap,
        key: &CacheKey,
        req_cc: &CacheControl,
    ) -> Option<Answer> {
        let shared = self.shared.as_ref()?;
        // `_held` counts the download against the tier's memory bound until it is stored.
        let Lookup::Found(meta, object, _held) = shared.lookup(key).await else {
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

    /// The leader's fetch, as steps: ask the app (conditionally, when a stale copy has
    /// validators); then freshen the stored copy with a 304, stand in with it for an error, or
    /// store the answer while relaying it (or only relay it).
    pub(super) async fn fetch(
        &self,
        ex: Exchange,
        permit: FillPermit,
        fwd: Fwd,
        stored: Option<(Hit, Freshness)>,
    ) -> Answer {
        let (asked, sent) = self
            .ask_app(ex, stored.as_ref().map(|(hit, _)| &hit.meta.headers))
            .await;
        let resp = match sent {
            Ok(resp) => resp,
            Err(err) => return self.app_failed(&asked, err, permit, fwd, &stored),
        };
        let response_time = SystemTime::now();
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if asked.validating
            && parts.status == StatusCode::NOT_MODIFIED
            && let Some((hit, _)) = stored
        {
            return self
                .freshen(&asked, parts.headers, response_time, hit, permit, fwd)
                .await;
        }
        if parts.status.is_server_error()
            && let Some(answer) = self.stale_for_error(&asked.client_headers, &asked.method, &stored)
        {
            permit.release(false);
            return answer;
        }
        self.store_or_relay(asked, parts, body, response_time, permit, fwd)
            .await
    }

    /// Sends the leader's request: to the app, or to the source a prime fills from. The
    /// client's conditionals are answered from what is stored; the app is asked with the
    /// stored validators instead (RFC 9111 §4.3.1).
    async fn ask_app(
        &self,
        ex: Exchange,
        stored: Option<&HeaderMap>,
    ) -> (Asked, Result<Response<ProxyBody>, UpstreamError>) {
        let (client, key, rule) = (ex.client, ex.key.clone(), ex.rule);
        let mut req = ex.into_request();
        let client_headers = req.headers().clone();
        let validating = policy::validation::conditional_request(req.headers_mut(), stored);
        let asked = Asked {
            key,
            method: req.method().clone(),
            path: req.uri().path().to_owned(),
            rule,
            client_headers,
            sent_headers: req.headers().clone(),
            validating,
            request_time: SystemTime::now(),
        };
        let sent = match req.extensions().get::<FillFrom>().cloned() {
            Some(from) => self.upstream.send_to(&self.sources, &from.0, &asked.sent_headers).await,
            None => {
                self.upstream.prepare(&mut req, client, None);
                self.upstream.send(req).await.map(|r| r.map(body::boxed))
            }
        };
        (asked, sent)
    }

    /// No answer from the app: the stale copy stands in if it may (RFC 9111 §4.2.4), else the
    /// error's 502 or 504.
    fn app_failed(
        &self,
        asked: &Asked,
        err: UpstreamError,
        permit: FillPermit,
        fwd: Fwd,
        stored: &Option<(Hit, Freshness)>,
    ) -> Answer {
        warn!(error = %err, "upstream request failed");
        if let Some(answer) = self.stale_for_error(&asked.client_headers, &asked.method, stored) {
            permit.release(false);
            return answer;
        }
        drop(permit);
        Answer::new(err.response(), Outcome::Error, Some(fwd))
    }

    /// §4.3.4: a 304 freshens the stored copy with its fields and the stored body answers. A
    /// cookie the 304 sets is this client's alone: it goes to this client, never into the
    /// shared copy. An update that makes the copy unshareable (`private`, `no-store`, ...)
    /// removes it instead: the merged head answers this client only (it was validated for it).
    async fn freshen(
        &self,
        asked: &Asked,
        mut update: HeaderMap,
        response_time: SystemTime,
        hit: Hit,
        permit: FillPermit,
        fwd: Fwd,
    ) -> Answer {
        let cookies: Vec<HeaderValue> = update.get_all(header::SET_COOKIE).iter().cloned().collect();
        update.remove(header::SET_COOKIE);
        let meta = Meta {
            headers: policy::validation::merge_not_modified(&hit.meta.headers, &detached(&update)),
            request_time: asked.request_time,
            response_time,
            ..(*hit.meta).clone()
        };
        let status = StatusCode::from_u16(meta.status).unwrap_or(StatusCode::OK);
        let shareable = policy::storable(&asked.method, &asked.sent_headers, status, &meta.headers).is_ok()
            && self.config.tags.parse(&meta.headers).is_ok();
        // Revalidated now: whatever mark the stored version had is answered.
        let refreshed = Hit {
            meta: Arc::new(meta.clone()),
            soft_purged: None,
            ..hit
        };
        if shareable {
            self.cache.refresh(meta).await;
            permit.release(true);
        } else {
            debug!("a 304 made the stored copy unshareable: removed");
            self.cache.invalidate(&asked.key).await;
            permit.release(false);
        }
        let f = self.freshness(&refreshed.meta);
        let mut response = self.serve_stored(&asked.method, &asked.client_headers, &refreshed, f);
        for cookie in cookies {
            response.headers_mut().append(header::SET_COOKIE, cookie);
        }
        let mut answer = Answer::new(response, Outcome::Revalidated, Some(fwd));
        answer.detail = Some("fwd-status=304");
        answer
    }

    /// A full answer from the app: the path's rule applied, then stored while it is relayed if
    /// it may be (RFC 9111 §3), else only relayed.
    async fn store_or_relay(
        &self,
        asked: Asked,
        mut parts: http::response::Parts,
        body: ProxyBody,
        response_time: SystemTime,
        permit: FillPermit,
        fwd: Fwd,
    ) -> Answer {
        // Before a rule may strip it: an answer that set a cookie is never shared beyond here.
        let set_cookie = parts.headers.contains_key(header::SET_COOKIE);
        self.apply_rule(&asked, &mut parts);
        let lifetime = policy::freshness_lifetime(parts.status, &parts.headers, response_time, self.heuristic());
        let keep = self
            .storable(&asked, &parts)
            .map(|()| !lifetime.is_zero() || has_validator(&parts.headers));
        if !keep.is_ok_and(|keep| keep) {
            permit.release(false);
            let response = Response::from_parts(parts, from_upstream(body));
            return Answer::new(response, Outcome::Miss, Some(fwd));
        }
        // Waiters for this fill get its bytes only if the answer may be reused without asking
        // the app: fresh, and not `no-cache`. Another user's `no-cache` page, or an answer
        // stored for its validator alone, is stored, but each waiter asks the app for its own.
        let reusable = !lifetime.is_zero() && !policy::stored_directives(parts.status, &parts.headers).0.no_cache;
        let meta = record(
            &asked.key,
            &asked.sent_headers,
            &parts,
            (asked.request_time, response_time),
        );
        let mut answer = match content_length(&parts.headers) {
            Some(len) if reusable => {
                let meta = Meta { body_len: len, ..meta };
                self.fill(&asked, parts, body, meta, permit, set_cookie).await
            }
            _ => {
                // Of unknown length, or for its validator alone: stored as it is relayed.
                permit.release(false);
                let body = match self.cache.tee_fill(meta) {
                    Some((copy, copied)) => body::tee(from_upstream(body), copy, Some(copied)),
                    None => from_upstream(body),
                };
                let mut answer = Answer::new(Response::from_parts(parts, body), Outcome::Miss, None);
                answer.stored = true;
                answer
            }
        };
        answer.fwd = Some(fwd);
        answer
    }

    /// A range of a URL the cache holds nothing usable for: asked of the app as it is. A 206
    /// holding one range of a known length, storable as any answer is and fresh
    /// ([`policy::partial::storable`]), is stored as a span while it is relayed, and answers
    /// later ranges inside it (RFC 9111 §3.3); anything else is only relayed. No rule lends a
    /// span freshness: the app's own word, or the heuristic, decides.
    pub(super) async fn fetch_range(&self, ex: Exchange, fwd: Fwd) -> Answer {
        let (client, key) = (ex.client, ex.key.clone());
        let req = ex.into_request();
        let (method, sent) = (req.method().clone(), req.headers().clone());
        let request_time = SystemTime::now();
        let resp = match self.send(req, client, fwd).await {
            Ok(resp) => resp,
            Err(answer) => return answer,
        };
        let response_time = SystemTime::now();
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        let body = from_upstream(body::boxed(body));
        let span = policy::partial::storable(&method, &sent, parts.status, &parts.headers);
        let lifetime = policy::freshness_lifetime(parts.status, &parts.headers, response_time, self.heuristic());
        let copy = match self.tagged(span, &parts.headers) {
            Ok(span) if !lifetime.is_zero() => self.cache.tee_fill(Meta {
                body_len: span.length(),
                ..record(&key, &sent, &parts, (request_time, response_time))
            }),
            _ => None,
        };
        let stored = copy.is_some();
        let body = match copy {
            Some((copy, copied)) => body::tee(body, copy, Some(copied)),
            None => body,
        };
        let mut answer = Answer::new(Response::from_parts(parts, body), Outcome::Miss, Some(fwd));
        answer.stored = stored;
        answer
    }

    /// The freshness the path's rule (matched once, at the door) or a fingerprinted name gives
    /// an answer about to be stored ([`rules::apply`]: never to one that is not already
    /// shareable).
    fn apply_rule(&self, asked: &Asked, parts: &mut http::response::Parts) {
        let rule = asked.rule.and_then(|i| self.config.rules.get(i));
        let credentialed = policy::is_credentialed(&asked.sent_headers);
        let (ttl, path, status) = (self.config.fingerprinted_ttl, &asked.path, parts.status);
        if let Some(applied) = rules::apply(rule, ttl, path, status, &mut parts.headers, credentialed) {
            debug!(rule = applied, "freshness from a static-asset rule");
        }
    }

    /// RFC 9111 §3, and the tags: whether this answer may be stored, logged when not.
    fn storable(&self, asked: &Asked, parts: &http::response::Parts) -> Result<(), policy::NotStorable> {
        let storable = policy::storable(&asked.method, &asked.sent_headers, parts.status, &parts.headers);
        self.tagged(storable, &parts.headers)
    }

    /// What policy said of an answer, and then whether its tags can all be indexed (a purge
    /// by a tag dropped would miss it); logged when it is not stored.
    fn tagged<T>(
        &self,
        storable: Result<T, policy::NotStorable>,
        headers: &HeaderMap,
    ) -> Result<T, policy::NotStorable> {
        let storable = storable.and_then(|ok| {
            self.config.tags.parse(headers).map(|_| ok).map_err(|why| {
                metrics::counter!(m::TAGS_REFUSED, "reason" => why.as_str()).increment(1);
                policy::NotStorable::Tags
            })
        });
        if let Err(why) = &storable {
            debug!(reason = why.as_str(), "response not stored");
        }
        storable
    }

    /// Stores an answer of known length while streaming it: the client and the key's waiters
    /// read the fill as it is written. Relayed unstored if the fill cannot start.
    async fn fill(
        &self,
        asked: &Asked,
        parts: http::response::Parts,
        body: ProxyBody,
        meta: Meta,
        permit: FillPermit,
        set_cookie: bool,
    ) -> Answer {
        match self.cache.start_fill(permit, meta, body).await {
            Ok(fill) => {
                self.share_when_committed(&fill, &asked.sent_headers, set_cookie);
                let reader = body::sized(fill.reader(), fill.meta.body_len);
                let response = answer_fill(&asked.client_headers, &fill.meta, reader, self.compressible(&fill.meta));
                let mut answer = Answer::new(response, Outcome::Miss, None);
                answer.stored = true;
                answer
            }
            Err((permit, body)) => {
                permit.release(false);
                Answer::new(Response::from_parts(parts, from_upstream(body)), Outcome::Miss, None)
            }
        }
    }

    /// RFC 5861 §3: serve stale now, revalidate once in the background.
    pub(super) fn refresh_in_background(
        self: &Arc<Self>,
        req: &http::request::Parts,
        key: CacheKey,
        rule: Option<usize>,
        hit: &Hit,
        f: Freshness,
    ) {
        let Claim::Leader(permit) = self.cache.claim(&key, &req.headers) else {
            return;
        };
        let mut bg = Request::new(());
        *bg.uri_mut() = req.uri.clone();
        *bg.headers_mut() = req.headers.clone();
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
        let ex = Exchange {
            cc: policy::request_directives(bg.headers()),
            req: bg.into_parts().0,
            client: SocketAddr::from(([127, 0, 0, 1], 0)),
            key,
            rule,
        };
        let proxy = self.clone();
        tokio::spawn(async move {
            let answer = proxy.fetch(ex, permit, Fwd::Stale, stored).await;
            // Drain a stored fill so it completes; nobody reads this response.
            let mut body = answer.response.into_body();
            while http_body_util::BodyExt::frame(&mut body).await.is_some() {}
        });
    }
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

/// The record of an answer about to be stored under `key` (its length and digest still to
/// come): the normalized values of the fields of `sent` (the head the app got) its `Vary`
/// names pick its variant (RFC 9111 §4.1); `times`: when it was asked and answered.
fn record(key: &CacheKey, sent: &HeaderMap, parts: &http::response::Parts, times: (SystemTime, SystemTime)) -> Meta {
    let (request_time, response_time) = times;
    Meta {
        key: key.clone(),
        status: parts.status.as_u16(),
        headers: detached(&parts.headers),
        request_time,
        response_time,
        body_len: 0,
        digest: Digest([0; 32]),
        vary: Vary::parse(&parts.headers)
            .values(sent)
            .into_iter()
            .map(|(name, value)| (name, value.map(|v| detach(&v))))
            .collect(),
        prepared: Default::default(),
    }
}

/// A `Content-Length` that parses.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// The leader's request as it was sent to the app, and when: what the steps after it read.
struct Asked {
    /// The key the answer is stored under.
    key: CacheKey,
    /// GET (HEAD and others never fill).
    method: Method,
    /// The request's path (for the rule).
    path: String,
    /// The rule its path falls under ([`Exchange::rule`]).
    rule: Option<usize>,
    /// The client's head: its conditionals are answered from the new answer or stored copy.
    client_headers: HeaderMap,
    /// The head the app got (the cache's validators instead of the client's), before the
    /// forwarding fields: storability and `Vary` are judged on it.
    sent_headers: HeaderMap,
    /// Whether it carried the stored copy's validators.
    validating: bool,
    /// When it was sent (RFC 9111 §4.2.3).
    request_time: SystemTime,
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
