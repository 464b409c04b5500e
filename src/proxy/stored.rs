//! Answering from a stored object: its freshness, a 304 for a satisfied conditional, ranges,
//! compressed variants, whether it may answer this request (`Vary`, codings), and standing in
//! for a failing app (stale-if-error).

use std::time::SystemTime;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use tracing::warn;

use crate::body::{self, ProxyBody};
use crate::cache::Hit;
use crate::cache::meta::Meta;
use crate::negotiate;
use crate::policy::partial::Span;
use crate::policy::{self, Freshness, Heuristic, Prepared, RangeAnswer};
use crate::proxy::Proxy;
use crate::proxy::outcome::{Answer, Fwd, Outcome, encoding_slot, handles};
use crate::upstream::error_response;

impl Proxy {
    pub(super) fn heuristic(&self) -> Heuristic {
        Heuristic {
            fraction: self.config.heuristic_fraction,
            max: self.config.heuristic_max,
        }
    }

    pub(super) fn freshness(&self, meta: &Meta) -> Freshness {
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
    pub(super) fn compressible(&self, meta: &Meta) -> bool {
        self.config.compress.eligible(meta.status, &meta.headers, meta.body_len)
    }

    /// Answers a request from a stored response: 304 for a satisfied conditional, 206 or 416
    /// for a range, else the whole body; `Age` per RFC 9111 §4.2.3 and §5.1. A stored 206
    /// answers only with the part of its span asked for (RFC 9111 §3.4).
    /// A compressed variant is sent with its own head (`negotiate::variant_head`): its
    /// validator is the one conditionals are evaluated against, and it is never ranged.
    pub(super) fn serve_stored(
        &self,
        method: &Method,
        req: &HeaderMap,
        hit: &Hit,
        f: Freshness,
    ) -> Response<ProxyBody> {
        let meta = &hit.meta;
        let status = StatusCode::from_u16(meta.status).unwrap_or(StatusCode::OK);
        let age = HeaderValue::from(f.age.as_secs());
        let len = hit.body.len() as u64;
        // The prepared head already has the full length and Accept-Ranges.
        let mut headers = self.prepared(meta).headers.clone();
        if let Some(coding) = hit.coding {
            negotiate::variant_head(&mut headers, coding, len);
        }
        // A 200's validators, or those of the representation a stored span is part of.
        let validated = matches!(status, StatusCode::OK | StatusCode::PARTIAL_CONTENT);
        if validated && policy::answers_not_modified(req, &headers) {
            let mut resp = not_modified(&headers);
            resp.headers_mut().insert(header::AGE, age);
            return resp;
        }
        // Ranges: of a whole identity body, or of the span a stored 206 holds (which
        // `look_up` lets answer only the ranges inside it).
        let (offset, complete, range) = match (status, hit.coding) {
            (StatusCode::OK, None) => (0, len, policy::range(req, &meta.headers, len)),
            (StatusCode::PARTIAL_CONTENT, _) => match span_answer(meta, req, len) {
                Some((span, first, last)) => (span.first, span.complete, RangeAnswer::Partial(first, last)),
                None => {
                    // Never the span as if it were the whole representation.
                    warn!("a stored span was asked for bytes it does not hold");
                    return error_response(StatusCode::BAD_GATEWAY, "502 Bad Gateway: partial content\n");
                }
            },
            _ => (0, len, RangeAnswer::Full),
        };
        let (status, body) = match range {
            RangeAnswer::Full => (status, hit.body.clone()),
            RangeAnswer::Partial(start, end) => {
                // (Replaces the stored 206's own: digits always make a value.)
                if let Ok(v) = HeaderValue::try_from(format!("bytes {start}-{end}/{complete}")) {
                    headers.insert(header::CONTENT_RANGE, v);
                }
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start + 1));
                headers.remove(header::ACCEPT_RANGES);
                let (start, end) = ((start - offset) as usize, (end - offset) as usize);
                (StatusCode::PARTIAL_CONTENT, hit.body.slice(start..=end))
            }
            RangeAnswer::Unsatisfiable => {
                if let Ok(v) = HeaderValue::try_from(format!("bytes */{complete}")) {
                    headers.insert(header::CONTENT_RANGE, v);
                }
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
    pub(super) fn stale_for_error(
        &self,
        req: &HeaderMap,
        method: &Method,
        stored: &Option<(Hit, Freshness)>,
    ) -> Option<Answer> {
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
}

/// A response built from a fill's stored head, its body read while the fill writes it. A client
/// conditional that the new response satisfies is answered with 304.
pub(super) fn answer_fill(req: &HeaderMap, meta: &Meta, body: ProxyBody, compressible: bool) -> Response<ProxyBody> {
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

/// The fields a 304 carries from the stored (or selected variant's) head: RFC 9110 §15.4.5
/// lists Content-Location, Date, ETag, Vary, Cache-Control and Expires; Last-Modified guides
/// a cache holding a representation without an `ETag`; the targeted caching fields are
/// `Cache-Control` for the caches they name (RFC 9213). No other representation metadata: a
/// client that holds the identity body must not read `Content-Encoding: br` (or a type, a
/// length) from a 304 about the variant this request would be sent, and relabel its body.
const NOT_MODIFIED_FIELDS: [&HeaderName; 8] = [
    &header::CACHE_CONTROL,
    &header::CONTENT_LOCATION,
    &header::DATE,
    &header::ETAG,
    &header::EXPIRES,
    &header::LAST_MODIFIED,
    &header::VARY,
    &policy::CDN_CACHE_CONTROL,
];

/// A 304 for a stored response: [`NOT_MODIFIED_FIELDS`] of its head, no body.
fn not_modified(stored: &HeaderMap) -> Response<ProxyBody> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::NOT_MODIFIED;
    let headers = resp.headers_mut();
    for name in NOT_MODIFIED_FIELDS {
        for value in stored.get_all(name) {
            headers.append(name, value.clone());
        }
    }
    resp
}

/// The bytes of a stored 206 a request asks for, `(span, first, last)` in the
/// representation's positions ([`policy::partial::Span::answers`] over what its body holds,
/// [`policy::partial::Span::holding`]).
pub(super) fn span_answer(meta: &Meta, req: &HeaderMap, body_len: u64) -> Option<(Span, u64, u64)> {
    if meta.status != StatusCode::PARTIAL_CONTENT.as_u16() {
        return None;
    }
    let span = Span::of(&meta.headers)?.holding(body_len)?;
    let (first, last) = span.answers(req, &meta.headers)?;
    Some((span, first, last))
}

/// Whether a stored response may answer a request ([`policy::vary::reusable`]: its variant,
/// and a coding the request accepts), `coding` its `Content-Encoding`.
pub(super) fn reusable(meta: &Meta, coding: Option<&HeaderValue>, req_headers: &HeaderMap) -> bool {
    policy::vary::reusable(&meta.vary, coding, req_headers)
}
