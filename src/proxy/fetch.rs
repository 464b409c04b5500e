//! Fetching from the app and refreshing: the leader's fetch (revalidate, store while
//! streaming, or relay), stale-while-revalidate in the background, the shared tier read on a
//! local miss and written behind a fill, and an app response made ready for the client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::{debug, warn};

use crate::body::{self, ProxyBody};
use crate::cache::fill::{Fill, FillState};
use crate::cache::key::{CacheKey, Digest, normalize_vary};
use crate::cache::meta::Meta;
use crate::cache::{Claim, FillPermit, Hit};
use crate::metrics as m;
use crate::policy::{self, CacheControl, Freshness, Usable};
use crate::proxy::outcome::{Answer, Fwd, Outcome};
use crate::proxy::stored::answer_fill;
use crate::proxy::{FillFrom, Proxy};
use crate::rules;
use crate::shared::{self, Lookup, Upload};
use crate::upstream::strip_hop_by_hop;

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

    /// The leader's fetch: ask the app (conditionally, when a stale copy has validators), then
    /// refresh, store while streaming, fall back to the stale copy, or relay.
    pub(super) async fn fetch(
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
            policy::is_credentialed(&req_headers),
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
    pub(super) fn refresh_in_background(
        self: &Arc<Self>,
        req: &Request<ProxyBody>,
        key: CacheKey,
        hit: &Hit,
        f: Freshness,
    ) {
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
