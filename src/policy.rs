//! HTTP caching rules as pure functions, no I/O: may this request use the cache, may this
//! response be stored, how long is it fresh, how old is it (RFC 9111, shared cache).

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};

pub mod date;
pub mod fields;
pub mod partial;
pub mod validation;
pub mod vary;

pub use vary::Vary;

/// Parsed `Cache-Control` directives (RFC 9111 §5.2). Unknown directives are ignored.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CacheControl {
    /// `max-age=N`.
    pub max_age: Option<u64>,
    /// `s-maxage=N`.
    pub s_maxage: Option<u64>,
    /// `no-store`.
    pub no_store: bool,
    /// `no-cache` (unqualified or with field names: both mean revalidate for a shared cache).
    pub no_cache: bool,
    /// `private` (unqualified or qualified: a shared cache must not store either, §5.2.2.7).
    pub private: bool,
    /// `public`.
    pub public: bool,
    /// `must-revalidate`.
    pub must_revalidate: bool,
    /// `proxy-revalidate`.
    pub proxy_revalidate: bool,
    /// `immutable` (RFC 8246).
    pub immutable: bool,
    /// `no-transform` (RFC 9110 §7.7): no intermediary may change the content's coding.
    pub no_transform: bool,
    /// `max-stale[=N]` (request); `Some(u64::MAX)` when given without a value.
    pub max_stale: Option<u64>,
    /// `min-fresh=N` (request).
    pub min_fresh: Option<u64>,
    /// `only-if-cached` (request).
    pub only_if_cached: bool,
    /// `stale-while-revalidate=N` (RFC 5861).
    pub stale_while_revalidate: Option<u64>,
    /// `stale-if-error=N` (RFC 5861).
    pub stale_if_error: Option<u64>,
    /// `must-understand` (§5.2.2.3): `no-store` yields to it for a status this cache
    /// understands.
    pub must_understand: bool,
}

/// Delta-seconds as RFC 9111 §1.2.2 reads them: digits only; overflow saturates.
fn delta_seconds(v: &str) -> Option<u64> {
    let v = v.trim().trim_matches('"');
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(v.parse().unwrap_or(u64::MAX))
}

impl CacheControl {
    /// Parses every `Cache-Control` field line in `headers`.
    pub fn parse(headers: &HeaderMap) -> CacheControl {
        Self::parse_field(headers, &header::CACHE_CONTROL)
    }

    /// Parses every line of the named field (also used for targeted fields, RFC 9213).
    pub fn parse_field(headers: &HeaderMap, name: &HeaderName) -> CacheControl {
        let mut cc = CacheControl::default();
        for value in headers.get_all(name) {
            let Ok(value) = value.to_str() else { continue };
            for directive in fields::split(value) {
                let (name, arg) = match directive.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim())),
                    None => (directive.trim(), None),
                };
                let name = name.to_ascii_lowercase();
                match name.as_str() {
                    // A malformed max-age makes the response stale (§4.2.1): use 0.
                    "max-age" => cc.max_age = Some(arg.and_then(delta_seconds).unwrap_or(0)),
                    "s-maxage" => cc.s_maxage = Some(arg.and_then(delta_seconds).unwrap_or(0)),
                    "no-store" => cc.no_store = true,
                    "no-cache" => cc.no_cache = true,
                    "private" => cc.private = true,
                    "public" => cc.public = true,
                    "must-revalidate" => cc.must_revalidate = true,
                    "proxy-revalidate" => cc.proxy_revalidate = true,
                    "immutable" => cc.immutable = true,
                    "no-transform" => cc.no_transform = true,
                    "max-stale" => cc.max_stale = Some(arg.and_then(delta_seconds).unwrap_or(u64::MAX)),
                    "min-fresh" => cc.min_fresh = arg.and_then(delta_seconds),
                    "only-if-cached" => cc.only_if_cached = true,
                    "stale-while-revalidate" => cc.stale_while_revalidate = arg.and_then(delta_seconds),
                    "stale-if-error" => cc.stale_if_error = arg.and_then(delta_seconds),
                    "must-understand" => cc.must_understand = true,
                    _ => {}
                }
            }
        }
        cc
    }
}

/// `Sidecache-Cache-Control`: directives for this cache only (RFC 9213 targeted field).
pub static SIDECACHE_CACHE_CONTROL: HeaderName = HeaderName::from_static("sidecache-cache-control");
/// `CDN-Cache-Control`: directives for CDNs and similar shared caches (RFC 9213).
pub static CDN_CACHE_CONTROL: HeaderName = HeaderName::from_static("cdn-cache-control");

/// The response directives this cache obeys: the most specific targeted field present
/// (`Sidecache-Cache-Control`, then `CDN-Cache-Control`), else `Cache-Control` (RFC 9213 §2.2).
/// `true` when a targeted field was used, in which case `Cache-Control` and `Expires` are
/// ignored (RFC 9213 §2.1): a targeted field is the app speaking to this cache, so
/// `CDN-Cache-Control: max-age=600` stores an answer that says `Cache-Control: no-store` to
/// browsers.
///
/// One exception, stricter than RFC 9213: `private` in `Cache-Control` still holds unless the
/// targeted field itself says `public`. A middleware that adds a CDN lifetime to every answer
/// must not make one user's page another's. (And [`storable`] keeps `no-store` too for a
/// request with credentials.) The lifetimes sidecache adds itself (rules, fingerprinted names)
/// are written as a targeted field, but never to an answer whose `Cache-Control` restricts it
/// (`rules::apply`).
pub fn response_directives(headers: &HeaderMap) -> (CacheControl, bool) {
    for name in [&SIDECACHE_CACHE_CONTROL, &CDN_CACHE_CONTROL] {
        if is_valid_targeted(headers, name) {
            let mut cc = CacheControl::parse_field(headers, name);
            if !cc.public {
                cc.private |= CacheControl::parse(headers).private;
            }
            return (cc, true);
        }
    }
    (CacheControl::parse(headers), false)
}

/// Whether a targeted field is present and usable (RFC 9213 §2.1): a Structured Field
/// Dictionary whose lifetimes are integers. One that fails to parse, or gives a lifetime of
/// another type, is ignored as if absent: the next field (down to `Cache-Control`) decides.
fn is_valid_targeted(headers: &HeaderMap, name: &HeaderName) -> bool {
    let mut lines = Vec::new();
    for line in headers.get_all(name) {
        let Ok(text) = line.to_str() else { return false };
        lines.push(text);
    }
    if lines.is_empty() || !fields::is_dictionary(&lines.join(", ")) {
        return false;
    }
    let integer = |v: &str| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
    lines.iter().flat_map(|l| fields::split(l)).all(|member| {
        let (key, value) = member.split_once('=').unwrap_or((member, ""));
        let value = value.split(';').next().unwrap_or("");
        !matches!(
            key,
            "max-age" | "s-maxage" | "stale-while-revalidate" | "stale-if-error"
        ) || integer(value)
    })
}

/// The directives a stored answer with this status is used under: `no-store` yields to
/// `must-understand` when this cache understands the status's caching rules (RFC 9111
/// §5.2.2.3).
pub fn stored_directives(status: StatusCode, headers: &HeaderMap) -> (CacheControl, bool) {
    let (mut cc, targeted) = response_directives(headers);
    if cc.must_understand && understands(status) {
        cc.no_store = false;
    }
    (cc, targeted)
}

/// Statuses whose caching requirements this cache implements (RFC 9111 §5.2.2.3, RFC 9110
/// §15): the final ones it may store. (206 is not stored: partial content is not combined.)
pub fn understands(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 302 | 303 | 307 | 308 | 404 | 405 | 410 | 414 | 451 | 501
    )
}

/// The request's directives (RFC 9111 §5.2.1), with `Pragma: no-cache` read as
/// `Cache-Control: no-cache` when the request has no `Cache-Control` (§5.4).
pub fn request_directives(headers: &HeaderMap) -> CacheControl {
    let mut cc = CacheControl::parse(headers);
    if !headers.contains_key(header::CACHE_CONTROL) && fields::contains_token(headers, &header::PRAGMA, "no-cache") {
        cc.no_cache = true;
    }
    cc
}

/// Whether a non-error answer to this method invalidates what is stored for its URL (RFC 9111
/// §4.4): every method but the ones known to be safe (RFC 9110 §9.2.1: GET, HEAD, OPTIONS,
/// TRACE; and the safe WebDAV and QUERY methods). A method whose safety is unknown (an
/// extension such as `M-SEARCH`, or `get` in lower case, which is not GET: methods are
/// case-sensitive) invalidates, as an unsafe one does.
pub fn invalidates(method: &Method) -> bool {
    !matches!(
        method.as_str(),
        "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PROPFIND" | "SEARCH" | "REPORT" | "QUERY"
    )
}

/// Whether a request may be answered from the cache or fill it. Only GET and HEAD do
/// (RFC 9111 §2: the cache key's method); HEAD is answered from a stored GET.
pub fn is_cacheable_request(method: &Method, headers: &HeaderMap) -> bool {
    if !(method == Method::GET || method == Method::HEAD) {
        return false;
    }
    // Preconditions other than the ones a cache answers (If-None-Match, If-Modified-Since,
    // If-Range) are the app's to evaluate.
    !headers.contains_key(header::IF_MATCH) && !headers.contains_key(header::IF_UNMODIFIED_SINCE)
}

/// Status codes heuristically cacheable (RFC 9110 §15.1).
pub fn is_heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 206 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Why a response is not stored; `None` means it may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStorable {
    /// The request method is not GET.
    Method,
    /// The status code is not final or not understood.
    Status,
    /// `no-store` in the request or the response.
    NoStore,
    /// `private` in the response.
    Private,
    /// The request carries `Authorization` and the response does not allow sharing it.
    Authorization,
    /// `Vary: *`, or a `Vary` with something that is not a field name (not text, or not a
    /// token): no request can be matched against it, so it is taken as `*`, never skipped.
    VaryStar,
    /// The response sets a cookie.
    SetCookie,
    /// The request carries credentials and the app gave its answer no explicit freshness or
    /// shareability (a `Cookie` and only the heuristic; or a targeted lifetime beside a
    /// `Cache-Control` of `no-store` or `no-cache`): an answer built for one user's session is
    /// never guessed shareable.
    Credentials,
    /// Neither explicit freshness, nor a validator, nor a heuristically cacheable status.
    NoFreshness,
    /// Its tags cannot all be indexed (too many, too long, not UTF-8): stored with some
    /// dropped, a purge by one of those would miss it.
    Tags,
    /// A 206 that is not one answered byte range of a known length, its body exactly that
    /// range (see [`partial::storable`]).
    Partial,
}

impl NotStorable {
    /// A closed label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            NotStorable::Method => "method",
            NotStorable::Status => "status",
            NotStorable::NoStore => "no-store",
            NotStorable::Private => "private",
            NotStorable::Authorization => "authorization",
            NotStorable::VaryStar => "vary-star",
            NotStorable::SetCookie => "set-cookie",
            NotStorable::Credentials => "credentials",
            NotStorable::NoFreshness => "no-freshness",
            NotStorable::Tags => "tags",
            NotStorable::Partial => "partial",
        }
    }
}

/// RFC 9111 §3: may a shared cache store this response to this request?
pub fn storable(
    method: &Method,
    req_headers: &HeaderMap,
    status: StatusCode,
    resp_headers: &HeaderMap,
) -> Result<(), NotStorable> {
    // Final statuses only; a 206 is stored as a span of its representation, by
    // `partial::storable` (§3.3), never as a whole answer.
    if status.is_informational() || status == StatusCode::PARTIAL_CONTENT || status.as_u16() >= 600 {
        return Err(NotStorable::Status);
    }
    storable_status(method, req_headers, status, resp_headers)
}

/// RFC 9111 §3 once the status is one that may be stored: the method, the directives of the
/// request and the response, credentials, `Vary`, cookies and freshness. Shared by whole
/// answers ([`storable`]) and spans ([`partial::storable`]).
fn storable_status(
    method: &Method,
    req_headers: &HeaderMap,
    status: StatusCode,
    resp_headers: &HeaderMap,
) -> Result<(), NotStorable> {
    if method != Method::GET {
        return Err(NotStorable::Method);
    }
    let req_cc = CacheControl::parse(req_headers);
    // `must-understand` lifts `no-store` (§5.2.2.3), but not for a request with credentials,
    // whose answer may be one user's: the app's `no-store` then holds.
    let (cc, targeted) = if is_credentialed(req_headers) {
        response_directives(resp_headers)
    } else {
        stored_directives(status, resp_headers)
    };
    if req_cc.no_store || cc.no_store {
        return Err(NotStorable::NoStore);
    }
    if cc.private {
        return Err(NotStorable::Private);
    }
    // A targeted field replaces `Cache-Control` (RFC 9213 §2.1), but for a request with
    // credentials, whose answer may be one user's, a `Cache-Control` that keeps it from being
    // reused as it is (`no-store`, `no-cache`) still holds unless the targeted field says
    // `public` (`private` always does: see `response_directives`).
    if targeted && is_credentialed(req_headers) && !cc.public {
        let plain = CacheControl::parse(resp_headers);
        if plain.no_store || plain.no_cache {
            return Err(NotStorable::Credentials);
        }
    }
    // §3.5: a response to a request with Authorization is shared only when it says so.
    if req_headers.contains_key(header::AUTHORIZATION) && !(cc.public || cc.s_maxage.is_some() || cc.must_revalidate) {
        return Err(NotStorable::Authorization);
    }
    // §4.1: a field left out of the key would let one request's answer reach another that
    // differs in it: what cannot be read as a field name is `*`.
    if Vary::parse(resp_headers).is_star() {
        return Err(NotStorable::VaryStar);
    }
    // Safe by default: a cookie is one user's; never hand it to another.
    if resp_headers.contains_key(header::SET_COOKIE) {
        return Err(NotStorable::SetCookie);
    }
    let expires = !targeted && resp_headers.contains_key(header::EXPIRES);
    let explicit = cc.max_age.is_some() || cc.s_maxage.is_some() || expires;
    if explicit || cc.public {
        return Ok(());
    }
    // What follows is the cache's guess (heuristic freshness, §4.2.2, or a copy kept for its
    // validator): never for a request that carried one user's session. (`Authorization` has
    // its own rule above, §3.5.)
    if req_headers.contains_key(header::COOKIE) {
        return Err(NotStorable::Credentials);
    }
    if is_heuristically_cacheable(status) {
        return Ok(());
    }
    Err(NotStorable::NoFreshness)
}

/// Whether a request carries credentials (`Cookie`, `Authorization`): its answer may be one
/// user's, so nothing but the app's explicit word makes it shareable; heuristics (the
/// `Last-Modified` fraction, the fingerprinted-name lifetime) never apply to it.
pub fn is_credentialed(req_headers: &HeaderMap) -> bool {
    req_headers.contains_key(header::COOKIE) || req_headers.contains_key(header::AUTHORIZATION)
}

/// Parses an HTTP date; `None` for anything invalid (RFC 9110 §5.6.7).
pub fn parse_date(headers: &HeaderMap, name: &HeaderName) -> Option<SystemTime> {
    headers.get(name).and_then(|v| v.to_str().ok()).and_then(date::parse)
}

/// Knobs for heuristic freshness.
#[derive(Debug, Clone, Copy)]
pub struct Heuristic {
    /// Share of (Date - Last-Modified).
    pub fraction: f64,
    /// Cap.
    pub max: Duration,
}

/// RFC 9111 §4.2.1: the freshness lifetime a shared cache gives this response.
/// `s-maxage` > `max-age` > `Expires - Date` > heuristic (§4.2.2) from `Last-Modified`.
pub fn freshness_lifetime(
    status: StatusCode,
    headers: &HeaderMap,
    response_time: SystemTime,
    heuristic: Heuristic,
) -> Duration {
    let (cc, targeted) = response_directives(headers);
    if let Some(s) = cc.s_maxage {
        return Duration::from_secs(s);
    }
    if let Some(s) = cc.max_age {
        return Duration::from_secs(s);
    }
    let date = parse_date(headers, &header::DATE).unwrap_or(response_time);
    if !targeted && headers.contains_key(header::EXPIRES) {
        // An invalid Expires (e.g. "0") means already expired (§5.3).
        return parse_date(headers, &header::EXPIRES)
            .and_then(|exp| exp.duration_since(date).ok())
            .unwrap_or(Duration::ZERO);
    }
    if (is_heuristically_cacheable(status) || cc.public)
        && let Some(lm) = parse_date(headers, &header::LAST_MODIFIED)
        && let Ok(age) = date.duration_since(lm)
    {
        return age.mul_f64(heuristic.fraction).min(heuristic.max);
    }
    Duration::ZERO
}

/// RFC 9111 §4.2.3: the stored response's age now.
pub fn current_age(
    headers: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
    now: SystemTime,
) -> Duration {
    let resident_time = now.duration_since(response_time).unwrap_or_default();
    initial_age(headers, request_time, response_time).saturating_add(resident_time)
}

/// The `Age` a response arrived with (RFC 9111 §5.1): the first value of the field (its first
/// line, or the first element of a line holding a list, so `7200, 0` is 7200), parameters
/// left aside; `None` when absent or not delta-seconds (then it is ignored).
pub fn age(headers: &HeaderMap) -> Option<u64> {
    let first = fields::elements(headers, &header::AGE).next()?;
    delta_seconds(fields::element_token(first))
}

/// RFC 9111 §4.2.3: `corrected_initial_age`, the response's age when it arrived.
pub fn initial_age(headers: &HeaderMap, request_time: SystemTime, response_time: SystemTime) -> Duration {
    let age_value = age(headers).map(Duration::from_secs).unwrap_or_default();
    let date = parse_date(headers, &header::DATE).unwrap_or(response_time);
    let apparent_age = response_time.duration_since(date).unwrap_or_default();
    let response_delay = response_time.duration_since(request_time).unwrap_or_default();
    let corrected_age_value = age_value.saturating_add(response_delay);
    apparent_age.max(corrected_age_value)
}

/// What answering from a stored response needs, worked out once per stored version instead of
/// on every hit: its directives, freshness lifetime and initial age, and the head of a full
/// answer.
#[derive(Debug)]
pub struct Prepared {
    /// Its response directives (§5.2.2; the targeted field when there is one).
    pub cc: CacheControl,
    /// Its freshness lifetime (§4.2.1).
    pub lifetime: Duration,
    /// Its age when it arrived (§4.2.3).
    pub initial_age: Duration,
    /// When it arrived.
    pub response_time: SystemTime,
    /// The head of a full answer: the stored fields without the ones addressed to this cache,
    /// with `Content-Length` (and `Accept-Ranges` for a 200). `Age` is set per answer.
    pub headers: HeaderMap,
    /// Its `Content-Encoding`, which decides whether it may answer a request
    /// ([`vary::reusable`]): read here, with the rest a hit reads, instead of from the stored
    /// head (cold in the CPU's caches by the time a hit comes).
    pub coding: Option<HeaderValue>,
}

/// `head` with all its values in one buffer: every answer copies the prepared head, and a copy
/// takes a reference on each value's buffer. Held in one, the references of a copy all count
/// on one cache line instead of one each (and a stored object is cold in the CPU's caches by
/// the time a hit on it comes).
fn packed(head: &HeaderMap) -> HeaderMap {
    let mut buf = bytes::BytesMut::with_capacity(head.values().map(HeaderValue::len).sum());
    for value in head.values() {
        buf.extend_from_slice(value.as_bytes());
    }
    let buf = buf.freeze();
    let mut out = HeaderMap::with_capacity(head.len());
    let mut at = 0;
    for (name, value) in head {
        let len = value.len();
        // (The bytes of a valid value make a valid value.)
        let mut one = HeaderValue::from_maybe_shared(buf.slice(at..at + len)).unwrap_or_else(|_| value.clone());
        one.set_sensitive(value.is_sensitive());
        out.append(name.clone(), one);
        at += len;
    }
    out
}

impl Prepared {
    /// Works it out from the stored status, head, times and body length.
    pub fn new(
        status: StatusCode,
        headers: &HeaderMap,
        times: (SystemTime, SystemTime),
        body_len: u64,
        heuristic: Heuristic,
    ) -> Prepared {
        let (request_time, response_time) = times;
        let mut head = headers.clone();
        head.remove(&SIDECACHE_CACHE_CONTROL);
        head.insert(header::CONTENT_LENGTH, HeaderValue::from(body_len));
        if status == StatusCode::OK {
            head.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        }
        // A slot for the per-answer `Age`, so that setting it replaces in place instead of
        // growing the copied map on every hit.
        head.insert(header::AGE, HeaderValue::from_static("0"));
        let (mut cc, targeted) = stored_directives(status, headers);
        let lifetime = freshness_lifetime(status, headers, response_time, heuristic);
        let explicit =
            cc.max_age.is_some() || cc.s_maxage.is_some() || !targeted && headers.contains_key(header::EXPIRES);
        if !explicit && lifetime.is_zero() {
            // Stored for its validator alone (an `ETag` and no lifetime: what many frameworks
            // send for per-user JSON): every use is validated with the app first, and it is
            // never served stale (max-stale, stale-if-error): the app never said it may be
            // reused, by anyone.
            cc.no_cache = true;
        }
        Prepared {
            cc,
            lifetime,
            initial_age: initial_age(headers, request_time, response_time),
            response_time,
            headers: packed(&head),
            coding: headers.get(header::CONTENT_ENCODING).cloned(),
        }
    }

    /// Its freshness at `now`.
    pub fn freshness(&self, now: SystemTime) -> Freshness {
        let resident_time = now.duration_since(self.response_time).unwrap_or_default();
        Freshness {
            lifetime: self.lifetime,
            age: self.initial_age.saturating_add(resident_time),
        }
    }
}

/// How a stored response may be used for a request (RFC 9111 §4, §5.2.1, RFC 5861).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usable {
    /// Fresh enough for this request: serve it.
    Fresh,
    /// Stale, but within `stale-while-revalidate`: serve it and refresh in the background.
    StaleWhileRevalidate,
    /// Must be validated with the app first (stale, `no-cache`, or the request asks for more).
    Revalidate,
}

/// Freshness facts about a stored response, computed once per lookup.
#[derive(Debug, Clone, Copy)]
pub struct Freshness {
    /// Its freshness lifetime (§4.2.1).
    pub lifetime: Duration,
    /// Its current age (§4.2.3).
    pub age: Duration,
}

impl Freshness {
    /// Time past its freshness, zero while fresh.
    pub fn staleness(&self) -> Duration {
        self.age.saturating_sub(self.lifetime)
    }

    /// Whether it is fresh (§4.2).
    pub fn is_fresh(&self) -> bool {
        self.age < self.lifetime
    }

    /// Its freshness once soft-purged when its age was `age_then`: its lifetime ends there
    /// (if it had not ended before), so it is stale from the purge on and its stale windows
    /// (`stale-while-revalidate`, `stale-if-error`) count from the purge, as if it had expired
    /// then.
    pub fn soft_purged(self, age_then: Duration) -> Freshness {
        Freshness {
            lifetime: self.lifetime.min(age_then),
            age: self.age,
        }
    }
}

/// RFC 9111 §4.2.4 / §5.2.2: a shared cache must not serve this response stale at all
/// (`must-revalidate`, `proxy-revalidate`, `s-maxage`, or `no-cache`).
pub fn forbids_stale(resp_cc: &CacheControl) -> bool {
    resp_cc.must_revalidate
        || resp_cc.proxy_revalidate
        || resp_cc.s_maxage.is_some()
        || resp_cc.no_cache
        || resp_cc.private
        || resp_cc.no_store
}

/// Decides how a stored response may answer a request: §4.2 freshness, §5.2.1 request
/// directives (`max-age`, `min-fresh`, `max-stale`, `no-cache`), §5.2.2 response directives,
/// and RFC 5861 `stale-while-revalidate`.
pub fn usable(f: Freshness, req_cc: &CacheControl, resp_cc: &CacheControl) -> Usable {
    // §5.2.2.4: no-cache means every use is validated first. A stored head that says
    // `private` or `no-store` is never stored on purpose; should one be (an update merged into
    // it), it is not served without the app either.
    if resp_cc.no_cache || req_cc.no_cache || resp_cc.private || resp_cc.no_store {
        return Usable::Revalidate;
    }
    // §5.2.1.1: the client will not accept a response older than max-age.
    if req_cc.max_age.is_some_and(|max| f.age > Duration::from_secs(max)) {
        return Usable::Revalidate;
    }
    // §5.2.1.3: the client wants it to stay fresh for at least min-fresh more seconds.
    if let Some(min_fresh) = req_cc.min_fresh
        && f.lifetime.saturating_sub(f.age) < Duration::from_secs(min_fresh)
    {
        return Usable::Revalidate;
    }
    if f.is_fresh() {
        return Usable::Fresh;
    }
    if forbids_stale(resp_cc) {
        return Usable::Revalidate;
    }
    // §5.2.1.2: the client accepts a stale response up to max-stale seconds past freshness.
    if req_cc
        .max_stale
        .is_some_and(|max| f.staleness() <= Duration::from_secs(max))
    {
        return Usable::Fresh;
    }
    if resp_cc
        .stale_while_revalidate
        .is_some_and(|swr| f.staleness() <= Duration::from_secs(swr))
    {
        return Usable::StaleWhileRevalidate;
    }
    Usable::Revalidate
}

/// Whether a stale response may stand in for a failing app: within `window` (the larger of the
/// configured window and the response's `stale-if-error`), unless the response forbids serving
/// it stale (§4.2.4).
pub fn may_serve_stale_on_error(f: Freshness, resp_cc: &CacheControl, configured: Duration) -> bool {
    if forbids_stale(resp_cc) {
        return false;
    }
    let window = resp_cc
        .stale_if_error
        .map(Duration::from_secs)
        .unwrap_or_default()
        .max(configured);
    f.staleness() <= window
}

/// An entity tag, parsed (RFC 9110 §8.8.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ETag<'a> {
    /// `W/` prefix.
    pub weak: bool,
    /// The opaque tag with its quotes.
    pub tag: &'a str,
}

/// Parses one entity tag; `None` when malformed.
pub fn parse_etag(s: &str) -> Option<ETag<'_>> {
    let s = s.trim();
    let (weak, rest) = match s.strip_prefix("W/") {
        Some(r) => (true, r),
        None => (false, s),
    };
    if rest.len() < 2 || !rest.starts_with('"') || !rest.ends_with('"') || rest[1..rest.len() - 1].contains('"') {
        return None;
    }
    Some(ETag { weak, tag: rest })
}

/// RFC 9110 §13.1.2: does `If-None-Match` match the stored ETag (weak comparison)?
/// `None` when the request has no (parsable) `If-None-Match`.
pub fn if_none_match(req: &HeaderMap, stored: &HeaderMap) -> Option<bool> {
    let values: Vec<&str> = req
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if values.is_empty() {
        return None;
    }
    let stored_tag = stored
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_etag);
    let mut any = false;
    for list in values {
        for candidate in fields::split(list) {
            any = true;
            // "*" matches any current representation, and a stored one exists.
            if candidate.trim() == "*" {
                return Some(true);
            }
            if let (Some(c), Some(s)) = (parse_etag(candidate), stored_tag.as_ref())
                && c.tag == s.tag
            {
                return Some(true);
            }
        }
    }
    any.then_some(false)
}

/// RFC 9110 §13.1.3: with no `If-None-Match`, does `If-Modified-Since` say "not modified"?
pub fn not_modified_since(req: &HeaderMap, stored: &HeaderMap) -> bool {
    let Some(since) = parse_date(req, &header::IF_MODIFIED_SINCE) else {
        return false;
    };
    let modified = parse_date(stored, &header::LAST_MODIFIED).or_else(|| parse_date(stored, &header::DATE));
    modified.is_some_and(|m| m <= since)
}

/// RFC 9111 §4.3.2: whether a stored response answers this request's conditionals with 304.
pub fn answers_not_modified(req: &HeaderMap, stored: &HeaderMap) -> bool {
    match if_none_match(req, stored) {
        Some(matched) => matched,
        None => not_modified_since(req, stored),
    }
}

/// What a `Range` request gets from a stored full body (RFC 9110 §14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// Ignore the range: send the whole body with 200.
    Full,
    /// Send bytes `start..=end` with 206.
    Partial(u64, u64),
    /// 416 with `Content-Range: bytes */len`.
    Unsatisfiable,
}

/// Interprets a `Range` header against a body of `len` bytes. Only single `bytes` ranges are
/// served partially; anything else (other units, several ranges, syntax errors) gets the full
/// body, which §14.2 permits.
pub fn range(req: &HeaderMap, stored: &HeaderMap, len: u64) -> RangeAnswer {
    let Some(value) = req.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return RangeAnswer::Full;
    };
    // §13.1.5: If-Range: a strong ETag match or an exact Last-Modified date, else the full body.
    if let Some(if_range) = req.get(header::IF_RANGE).and_then(|v| v.to_str().ok()) {
        let matches = match parse_etag(if_range) {
            Some(tag) => {
                !tag.weak
                    && stored
                        .get(header::ETAG)
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_etag)
                        .is_some_and(|s| !s.weak && s.tag == tag.tag)
            }
            None => {
                let date = httpdate::parse_http_date(if_range.trim()).ok();
                date.is_some() && date == parse_date(stored, &header::LAST_MODIFIED)
            }
        };
        if !matches {
            return RangeAnswer::Full;
        }
    }
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Full;
    };
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeAnswer::Full;
    };
    let num = |s: &str| -> Option<u64> {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (first.trim().is_empty(), num(first), num(last)) {
        // bytes=-N: the last N bytes.
        (true, _, Some(n)) => {
            if n == 0 || len == 0 {
                RangeAnswer::Unsatisfiable
            } else {
                RangeAnswer::Partial(len.saturating_sub(n), len - 1)
            }
        }
        (false, Some(start), end) => {
            if !last.trim().is_empty() && end.is_none() {
                return RangeAnswer::Full;
            }
            if end.is_some_and(|e| e < start) {
                return RangeAnswer::Full;
            }
            if start >= len {
                return RangeAnswer::Unsatisfiable;
            }
            RangeAnswer::Partial(start, end.unwrap_or(u64::MAX).min(len - 1))
        }
        _ => RangeAnswer::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// A head of these fields, in order (repeated names appended).
    pub(crate) fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const H: Heuristic = Heuristic {
        fraction: 0.1,
        max: Duration::from_secs(86_400),
    };

    /// A `Vary` line that is not text names no field anyone can match: taken as `*`.
    #[test]
    fn the_prepared_head_is_the_stored_one_with_its_values_in_one_buffer() {
        let mut stored = headers(&[
            ("content-type", "text/css"),
            ("link", "</a.css>; rel=preload"),
            ("etag", "\"v1\""),
            ("link", "</b.js>; rel=preload"),
            ("sidecache-cache-control", "max-age=60"),
        ]);
        let mut secret = HeaderValue::from_static("token");
        secret.set_sensitive(true);
        stored.append("x-secret", secret);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let p = Prepared::new(StatusCode::OK, &stored, (now, now), 42, H);
        let got: Vec<(&str, &str)> = p
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            got,
            [
                ("content-type", "text/css"),
                ("link", "</a.css>; rel=preload"),
                ("link", "</b.js>; rel=preload"),
                ("etag", "\"v1\""),
                ("x-secret", "token"),
                ("content-length", "42"),
                ("accept-ranges", "bytes"),
                ("age", "0"),
            ],
            "every value, in order, none addressed to this cache"
        );
        assert!(
            p.headers["x-secret"].is_sensitive(),
            "a sensitive value stays sensitive"
        );
        // One buffer: each value lies right after the one before it.
        let values: Vec<&HeaderValue> = p.headers.values().collect();
        for pair in values.windows(2) {
            let end = pair[0].as_bytes().as_ptr() as usize + pair[0].len();
            assert_eq!(end, pair[1].as_bytes().as_ptr() as usize);
        }
    }

    #[test]
    fn a_vary_that_is_not_text_is_taken_as_star() {
        let mut resp = HeaderMap::new();
        resp.insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=60"));
        resp.insert(header::VARY, HeaderValue::from_bytes(b"x-user-\xff").unwrap());
        let got = storable(&Method::GET, &HeaderMap::new(), StatusCode::OK, &resp);
        assert_eq!(got, Err(NotStorable::VaryStar));
    }

    #[test]
    fn cache_control_parses_directives_case_insensitively_and_quoted() {
        let cc = CacheControl::parse(&headers(&[
            ("cache-control", "Public, MAX-AGE=60, no-cache=\"set-cookie, x\""),
            ("cache-control", "s-maxage=\"120\", immutable, max-age=bogus"),
        ]));
        assert!(cc.public && cc.no_cache && cc.immutable);
        // A later invalid max-age makes it 0 (§4.2.1: malformed means stale).
        assert_eq!(cc.max_age, Some(0));
        assert_eq!(cc.s_maxage, Some(120));
    }

    /// RFC 9111 §3: storability, one row per rule.
    #[test]
    fn storable_follows_rfc9111_section_3() {
        let get = Method::GET;
        let none = HeaderMap::new();
        let auth = headers(&[("authorization", "Bearer x")]);
        type Row<'a> = (
            &'a str,
            &'a Method,
            &'a HeaderMap,
            u16,
            &'a [(&'a str, &'a str)],
            Result<(), NotStorable>,
        );
        let rows: &[Row] = &[
            (
                "§3 fresh 200",
                &get,
                &none,
                200,
                &[("cache-control", "max-age=60")],
                Ok(()),
            ),
            (
                "§3 POST not stored",
                &Method::POST,
                &none,
                200,
                &[("cache-control", "max-age=60")],
                Err(NotStorable::Method),
            ),
            (
                "§3 no-store",
                &get,
                &none,
                200,
                &[("cache-control", "no-store, max-age=60")],
                Err(NotStorable::NoStore),
            ),
            (
                "§5.2.2.7 private",
                &get,
                &none,
                200,
                &[("cache-control", "private, max-age=60")],
                Err(NotStorable::Private),
            ),
            (
                "§3.5 authorization",
                &get,
                &auth,
                200,
                &[("cache-control", "max-age=60")],
                Err(NotStorable::Authorization),
            ),
            (
                "§3.5 authorization + public",
                &get,
                &auth,
                200,
                &[("cache-control", "public, max-age=60")],
                Ok(()),
            ),
            (
                "§3.5 authorization + s-maxage",
                &get,
                &auth,
                200,
                &[("cache-control", "s-maxage=60")],
                Ok(()),
            ),
            (
                "§4.1 vary star",
                &get,
                &none,
                200,
                &[("cache-control", "max-age=60"), ("vary", "accept, *")],
                Err(NotStorable::VaryStar),
            ),
            (
                "§4.1 vary naming what is not a field: as star",
                &get,
                &none,
                200,
                &[("cache-control", "max-age=60"), ("vary", "accept, user agent")],
                Err(NotStorable::VaryStar),
            ),
            (
                "§4.1 vary with an empty element",
                &get,
                &none,
                200,
                &[("cache-control", "max-age=60"), ("vary", "accept-encoding, ")],
                Ok(()),
            ),
            (
                "set-cookie",
                &get,
                &none,
                200,
                &[("cache-control", "max-age=60"), ("set-cookie", "a=b")],
                Err(NotStorable::SetCookie),
            ),
            ("§3 heuristic 404", &get, &none, 404, &[], Ok(())),
            (
                "§3 302 without freshness",
                &get,
                &none,
                302,
                &[],
                Err(NotStorable::NoFreshness),
            ),
            (
                "§3 302 with max-age",
                &get,
                &none,
                302,
                &[("cache-control", "max-age=5")],
                Ok(()),
            ),
            (
                "§3 206 not stored",
                &get,
                &none,
                206,
                &[("cache-control", "max-age=5")],
                Err(NotStorable::Status),
            ),
        ];
        for (name, method, req, status, resp, want) in rows {
            let got = storable(method, req, StatusCode::from_u16(*status).unwrap(), &headers(resp));
            assert_eq!(got, *want, "{name}");
        }
        let req_no_store = headers(&[("cache-control", "no-store")]);
        assert_eq!(
            storable(
                &get,
                &req_no_store,
                StatusCode::OK,
                &headers(&[("cache-control", "max-age=60")])
            ),
            Err(NotStorable::NoStore),
            "§5.2.1.5 request no-store"
        );
    }

    /// RFC 9111 §4.2.1: s-maxage > max-age > Expires > heuristic.
    #[test]
    fn freshness_lifetime_precedence() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let date = httpdate::fmt_http_date(now);
        let in_100 = httpdate::fmt_http_date(now + Duration::from_secs(100));
        let ago_1000 = httpdate::fmt_http_date(now - Duration::from_secs(1000));
        let ok = StatusCode::OK;
        let f = |h: &[(&str, &str)]| freshness_lifetime(ok, &headers(h), now, H).as_secs();
        assert_eq!(
            f(&[("cache-control", "max-age=10, s-maxage=20"), ("expires", &in_100)]),
            20
        );
        assert_eq!(f(&[("cache-control", "max-age=10"), ("expires", &in_100)]), 10);
        assert_eq!(f(&[("date", &date), ("expires", &in_100)]), 100);
        assert_eq!(
            f(&[("date", &date), ("expires", "0")]),
            0,
            "§5.3 invalid Expires is stale"
        );
        assert_eq!(
            f(&[("date", &date), ("last-modified", &ago_1000)]),
            100,
            "§4.2.2 10% heuristic"
        );
        assert_eq!(f(&[("date", &date)]), 0);
    }

    /// RFC 9111 §4.2.3 age calculation.
    #[test]
    fn current_age_follows_section_4_2_3() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let date = httpdate::fmt_http_date(t0 - Duration::from_secs(5));
        // Upstream says Age 30, the response took 2 s, then it sat 10 s in the cache.
        let h = headers(&[("age", "30"), ("date", &date)]);
        let age = current_age(&h, t0 - Duration::from_secs(2), t0, t0 + Duration::from_secs(10));
        assert_eq!(age.as_secs(), 42);
        // Apparent age dominates when larger.
        let h = headers(&[("date", &httpdate::fmt_http_date(t0 - Duration::from_secs(100)))]);
        assert_eq!(current_age(&h, t0, t0, t0).as_secs(), 100);
    }

    fn fr(lifetime: u64, age: u64) -> Freshness {
        Freshness {
            lifetime: Duration::from_secs(lifetime),
            age: Duration::from_secs(age),
        }
    }

    fn cc(v: &str) -> CacheControl {
        CacheControl::parse(&headers(&[("cache-control", v)]))
    }

    #[test]
    fn a_soft_purge_ends_freshness_at_the_mark_and_stale_windows_count_from_it() {
        // Fresh for an hour, purged at age 100 s, now 130 s old: 30 s stale.
        let f = fr(3600, 130).soft_purged(Duration::from_secs(100));
        assert!(!f.is_fresh());
        assert_eq!(f.staleness(), Duration::from_secs(30));
        let swr = cc("max-age=3600, stale-while-revalidate=60");
        assert_eq!(usable(f, &cc(""), &swr), Usable::StaleWhileRevalidate);
        assert_eq!(
            usable(fr(3600, 200).soft_purged(Duration::from_secs(100)), &cc(""), &swr),
            Usable::Revalidate
        );
        assert!(may_serve_stale_on_error(
            f,
            &cc("max-age=3600"),
            Duration::from_secs(60)
        ));
        assert!(!may_serve_stale_on_error(
            f,
            &cc("max-age=3600, must-revalidate"),
            Duration::from_secs(60)
        ));
        // Purged after it had expired: its staleness is what it was.
        let late = fr(60, 130).soft_purged(Duration::from_secs(100));
        assert_eq!(late.staleness(), Duration::from_secs(70));
    }

    /// RFC 9111 §4.2, §5.2.1, §5.2.2 and RFC 5861: one row per rule.
    #[test]
    fn usable_follows_request_and_response_directives() {
        use Usable::*;
        let rows: &[(&str, Freshness, &str, &str, Usable)] = &[
            ("§4.2 fresh", fr(60, 10), "", "max-age=60", Fresh),
            ("§4.2 stale", fr(60, 61), "", "max-age=60", Revalidate),
            (
                "§5.2.2.4 response no-cache",
                fr(60, 0),
                "",
                "no-cache, max-age=60",
                Revalidate,
            ),
            (
                "§5.2.1.4 request no-cache",
                fr(60, 0),
                "no-cache",
                "max-age=60",
                Revalidate,
            ),
            (
                "§5.2.1.1 request max-age exceeded",
                fr(600, 100),
                "max-age=50",
                "max-age=600",
                Revalidate,
            ),
            (
                "§5.2.1.1 request max-age within",
                fr(600, 10),
                "max-age=50",
                "max-age=600",
                Fresh,
            ),
            (
                "§5.2.1.3 min-fresh not met",
                fr(60, 50),
                "min-fresh=20",
                "max-age=60",
                Revalidate,
            ),
            (
                "§5.2.1.3 min-fresh met",
                fr(60, 10),
                "min-fresh=20",
                "max-age=60",
                Fresh,
            ),
            (
                "§5.2.1.2 max-stale within",
                fr(60, 90),
                "max-stale=60",
                "max-age=60",
                Fresh,
            ),
            (
                "§5.2.1.2 max-stale without value",
                fr(60, 9000),
                "max-stale",
                "max-age=60",
                Fresh,
            ),
            (
                "§5.2.1.2 max-stale exceeded",
                fr(60, 200),
                "max-stale=60",
                "max-age=60",
                Revalidate,
            ),
            (
                "§5.2.2.2 must-revalidate beats max-stale",
                fr(60, 90),
                "max-stale=60",
                "max-age=60, must-revalidate",
                Revalidate,
            ),
            (
                "§5.2.2.8 proxy-revalidate",
                fr(60, 90),
                "max-stale",
                "max-age=60, proxy-revalidate",
                Revalidate,
            ),
            (
                "§5.2.2.10 s-maxage implies proxy-revalidate",
                fr(60, 90),
                "max-stale",
                "s-maxage=60",
                Revalidate,
            ),
            (
                "RFC 5861 stale-while-revalidate",
                fr(60, 90),
                "",
                "max-age=60, stale-while-revalidate=60",
                StaleWhileRevalidate,
            ),
            (
                "RFC 5861 past stale-while-revalidate",
                fr(60, 200),
                "",
                "max-age=60, stale-while-revalidate=60",
                Revalidate,
            ),
        ];
        for (name, f, req, resp, want) in rows {
            assert_eq!(usable(*f, &cc(req), &cc(resp)), *want, "{name}");
        }
    }

    /// RFC 9111 §4.2.4 and RFC 5861 §4: stale-if-error.
    #[test]
    fn stale_on_error_respects_window_and_prohibitions() {
        let hour = Duration::from_secs(3600);
        assert!(may_serve_stale_on_error(fr(60, 120), &cc("max-age=60"), hour));
        assert!(
            !may_serve_stale_on_error(fr(60, 7200), &cc("max-age=60"), hour),
            "past the window"
        );
        assert!(may_serve_stale_on_error(
            fr(60, 7200),
            &cc("max-age=60, stale-if-error=86400"),
            hour
        ));
        for forbidding in [
            "max-age=60, must-revalidate",
            "max-age=60, proxy-revalidate",
            "s-maxage=60",
            "no-cache",
        ] {
            assert!(
                !may_serve_stale_on_error(fr(60, 120), &cc(forbidding), hour),
                "{forbidding}"
            );
        }
    }

    /// RFC 9110 §13.1.2 / §13.1.3 / §13.2.2: If-None-Match (weak comparison) before
    /// If-Modified-Since.
    #[test]
    fn conditional_requests_use_weak_comparison_and_precedence() {
        let lm = "Sat, 01 Jan 2022 00:00:00 GMT";
        let stored = headers(&[("etag", "W/\"v1\""), ("last-modified", lm)]);
        let rows: &[(&[(&str, &str)], bool)] = &[
            (&[("if-none-match", "\"v1\"")], true),
            (&[("if-none-match", "W/\"v1\"")], true),
            (&[("if-none-match", "\"v0\", W/\"v1\"")], true),
            (&[("if-none-match", "*")], true),
            (&[("if-none-match", "\"v2\"")], false),
            (&[("if-modified-since", lm)], true),
            (&[("if-modified-since", "Fri, 31 Dec 2021 00:00:00 GMT")], false),
            // §13.2.2: If-None-Match takes precedence over If-Modified-Since.
            (&[("if-none-match", "\"v2\""), ("if-modified-since", lm)], false),
            (&[("if-modified-since", "not a date")], false),
        ];
        for (req, want) in rows {
            assert_eq!(answers_not_modified(&headers(req), &stored), *want, "{req:?}");
        }
    }

    /// RFC 9110 §14.1.2, §14.2, §13.1.5.
    #[test]
    fn ranges_are_single_byte_ranges_with_if_range() {
        use RangeAnswer::*;
        let stored = headers(&[("etag", "\"v1\""), ("last-modified", "Sat, 01 Jan 2022 00:00:00 GMT")]);
        let rows: &[(&[(&str, &str)], RangeAnswer)] = &[
            (&[], Full),
            (&[("range", "bytes=0-99")], Partial(0, 99)),
            (&[("range", "bytes=900-")], Partial(900, 999)),
            (&[("range", "bytes=900-5000")], Partial(900, 999)),
            (&[("range", "bytes=-100")], Partial(900, 999)),
            (&[("range", "bytes=-5000")], Partial(0, 999)),
            (&[("range", "bytes=1000-")], Unsatisfiable),
            (&[("range", "bytes=-0")], Unsatisfiable),
            (&[("range", "bytes=5-1")], Full),
            (&[("range", "bytes=0-1,5-6")], Full),
            (&[("range", "items=0-1")], Full),
            (&[("range", "bytes=abc")], Full),
            (&[("range", "bytes=0-99999999999999999999999")], Full),
            (&[("range", "bytes=0-9"), ("if-range", "\"v1\"")], Partial(0, 9)),
            (&[("range", "bytes=0-9"), ("if-range", "\"v0\"")], Full),
            (&[("range", "bytes=0-9"), ("if-range", "W/\"v1\"")], Full),
            (
                &[("range", "bytes=0-9"), ("if-range", "Sat, 01 Jan 2022 00:00:00 GMT")],
                Partial(0, 9),
            ),
            (
                &[("range", "bytes=0-9"), ("if-range", "Sun, 02 Jan 2022 00:00:00 GMT")],
                Full,
            ),
        ];
        for (req, want) in rows {
            assert_eq!(range(&headers(req), &stored, 1000), *want, "{req:?}");
        }
    }

    /// RFC 9213 §2.2: the most specific targeted field wins and Cache-Control/Expires are
    /// ignored when one is present.
    #[test]
    fn targeted_fields_take_precedence() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let date = httpdate::fmt_http_date(now);
        let f = |h: &[(&str, &str)]| freshness_lifetime(StatusCode::OK, &headers(h), now, H).as_secs();
        let st = |h: &[(&str, &str)]| storable(&Method::GET, &HeaderMap::new(), StatusCode::OK, &headers(h));
        assert_eq!(
            f(&[
                ("cache-control", "no-store"),
                ("cdn-cache-control", "public, max-age=600")
            ]),
            600
        );
        assert_eq!(
            f(&[
                ("cdn-cache-control", "max-age=600"),
                ("sidecache-cache-control", "max-age=60")
            ]),
            60,
            "ours beats the CDN's"
        );
        assert_eq!(
            f(&[
                ("date", &date),
                ("expires", "Sun, 01 Jan 2090 00:00:00 GMT"),
                ("cdn-cache-control", "no-cache")
            ]),
            0
        );
        assert_eq!(
            st(&[
                ("cache-control", "no-store"),
                ("sidecache-cache-control", "public, max-age=60")
            ]),
            Ok(())
        );
        // RFC 9213 §2.1: Cache-Control is ignored beside a targeted field: the app's word
        // to this cache (issue 27; cache-tests `cdn-fresh-cc-nostore`). For a request with
        // credentials `no-store` still holds unless the targeted field says `public`, and
        // `private` always does: a middleware's blanket CDN lifetime must not share one
        // user's page (issue 15, finding 1).
        for targeted in ["sidecache-cache-control", "cdn-cache-control"] {
            let no_store = [("cache-control", "no-store"), (targeted, "max-age=60")];
            assert_eq!(st(&no_store), Ok(()), "no-store + {targeted}");
            let private = [("cache-control", "private"), (targeted, "max-age=60")];
            assert_eq!(st(&private), Err(NotStorable::Private), "private + {targeted}");
            let public = [("cache-control", "private, no-store"), (targeted, "public, max-age=60")];
            assert_eq!(st(&public), Ok(()), "public {targeted}");
            for credential in [("cookie", "session=a"), ("authorization", "Bearer a")] {
                let req = headers(&[credential]);
                let st = |h: &[(&str, &str)]| storable(&Method::GET, &req, StatusCode::OK, &headers(h));
                assert_eq!(
                    st(&no_store),
                    Err(NotStorable::Credentials),
                    "{targeted} {credential:?}"
                );
                let no_cache = [("cache-control", "no-cache"), (targeted, "max-age=60")];
                assert_eq!(
                    st(&no_cache),
                    Err(NotStorable::Credentials),
                    "{targeted} {credential:?}"
                );
                assert_eq!(st(&private), Err(NotStorable::Private), "{targeted} {credential:?}");
                assert_eq!(st(&public), Ok(()), "{targeted} {credential:?}");
            }
        }
        // Only `public` lifts `private`; must-revalidate and s-maxage do not.
        for lift in ["max-age=600, must-revalidate", "s-maxage=600"] {
            assert_eq!(
                st(&[("cache-control", "private"), ("cdn-cache-control", lift)]),
                Err(NotStorable::Private),
                "{lift}"
            );
        }
        // RFC 9213 §2.1: a targeted field that is no Structured Field Dictionary, or whose
        // lifetime is not an integer, is ignored: Cache-Control decides (cache-tests
        // `cdn-cc-invalid-sh-type-unknown`, `-wrong`).
        for invalid in [
            "max-age=10000, &&&&&",
            "max-age=\"10000\"",
            "MaX-aGe=600",
            "max-age =600",
        ] {
            let h = [("cache-control", "no-store"), ("cdn-cache-control", invalid)];
            assert_eq!(st(&h), Err(NotStorable::NoStore), "{invalid}");
            assert!(!response_directives(&headers(&h)).1, "{invalid}");
        }
        let (cc, _) = response_directives(&headers(&[
            ("cache-control", "no-cache"),
            ("sidecache-cache-control", "max-age=60"),
        ]));
        assert!(!cc.no_cache, "RFC 9213 §2.1: the targeted field replaces Cache-Control");
        assert_eq!(
            st(&[("cache-control", "max-age=60"), ("sidecache-cache-control", "no-store")]),
            Err(NotStorable::NoStore)
        );
    }

    /// RFC 9111 §5.2.2.3: `must-understand` lets a cache that understands the status store
    /// despite `no-store`; one that does not (206 here) must not.
    #[test]
    fn must_understand_overrides_no_store_for_understood_statuses() {
        let resp = headers(&[("cache-control", "max-age=3600, no-store, must-understand")]);
        let st = |status| storable(&Method::GET, &HeaderMap::new(), status, &resp);
        assert_eq!(st(StatusCode::OK), Ok(()));
        assert_eq!(st(StatusCode::NOT_FOUND), Ok(()));
        assert_eq!(st(StatusCode::PARTIAL_CONTENT), Err(NotStorable::Status));
        assert_eq!(
            st(StatusCode::from_u16(299).unwrap()),
            Err(NotStorable::NoStore),
            "a status not understood"
        );
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let p = Prepared::new(StatusCode::OK, &resp, (now, now), 1, H);
        assert_eq!(usable(p.freshness(now), &CacheControl::default(), &p.cc), Usable::Fresh);
        let private = headers(&[("cache-control", "max-age=3600, private, must-understand")]);
        assert_eq!(
            storable(&Method::GET, &HeaderMap::new(), StatusCode::OK, &private),
            Err(NotStorable::Private),
            "must-understand lifts no-store only"
        );
        assert_eq!(
            storable(
                &Method::GET,
                &headers(&[("cache-control", "no-store")]),
                StatusCode::OK,
                &resp
            ),
            Err(NotStorable::NoStore),
            "nor the request's no-store"
        );
        assert_eq!(
            storable(&Method::GET, &headers(&[("cookie", "a=1")]), StatusCode::OK, &resp),
            Err(NotStorable::NoStore),
            "nor for a request with credentials"
        );
    }

    /// RFC 9111 §5.1: `Age` is the first value; a list on one line is read by its first
    /// element (`7200, 0` is old); what is not delta-seconds is ignored.
    #[test]
    fn age_is_the_first_value_of_the_field() {
        let age_of = |lines: &[&str]| {
            let mut h = HeaderMap::new();
            for l in lines {
                h.append(header::AGE, HeaderValue::from_str(l).unwrap());
            }
            age(&h)
        };
        assert_eq!(age_of(&["7200, 0"]), Some(7200));
        assert_eq!(age_of(&["0, 7200"]), Some(0));
        assert_eq!(age_of(&["7200", "0"]), Some(7200));
        assert_eq!(age_of(&["7200;foo=bar"]), Some(7200));
        for ignored in ["abc", "-7200", "7200.0", ""] {
            assert_eq!(age_of(&[ignored]), None, "{ignored}");
        }
        assert_eq!(age_of(&[]), None);
    }

    /// RFC 9111 §5.4: `Pragma: no-cache` is `Cache-Control: no-cache` when the latter is absent.
    #[test]
    fn pragma_no_cache_counts_only_without_cache_control() {
        assert!(request_directives(&headers(&[("pragma", "no-cache")])).no_cache);
        assert!(request_directives(&headers(&[("pragma", "foo, No-Cache")])).no_cache);
        assert!(!request_directives(&headers(&[("pragma", "foo")])).no_cache);
        assert!(!request_directives(&headers(&[("pragma", "no-cache"), ("cache-control", "max-age=5")])).no_cache);
        assert!(request_directives(&headers(&[("cache-control", "no-cache")])).no_cache);
    }

    /// RFC 9111 §4.4, RFC 9110 §9.2.1: unsafe methods and those of unknown safety invalidate;
    /// the known safe ones do not.
    #[test]
    fn methods_not_known_to_be_safe_invalidate() {
        for safe in [
            "GET", "HEAD", "OPTIONS", "TRACE", "PROPFIND", "SEARCH", "REPORT", "QUERY",
        ] {
            assert!(!invalidates(&Method::from_bytes(safe.as_bytes()).unwrap()), "{safe}");
        }
        for other in ["POST", "PUT", "DELETE", "PATCH", "M-SEARCH", "BREW", "get", "post"] {
            assert!(invalidates(&Method::from_bytes(other.as_bytes()).unwrap()), "{other}");
        }
    }

    /// RFC 9110 §5.6.7: `Expires` in the obsolete formats and in any case is read, not taken as
    /// already expired.
    #[test]
    fn expires_in_obsolete_formats_and_any_case_gives_a_lifetime() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let date = httpdate::fmt_http_date(now);
        for expires in [
            "Thu Aug  8 02:01:18 2050",
            "THU, 18 Aug 2050 02:01:18 GMT",
            "Thu, 18 AUG 2050 02:01:18 GMT",
            "Thu, 18 Aug 2050 02:01:18 gMT",
            "Thursday, 18-Aug-50 02:01:18 GMT",
        ] {
            let h = headers(&[("date", &date), ("expires", expires)]);
            assert!(
                freshness_lifetime(StatusCode::OK, &h, now, H).as_secs() > 0,
                "{expires}"
            );
        }
    }

    /// An answer stored for its validator alone is validated on every use and never served
    /// stale; private or no-store heads are never served without the app.
    #[test]
    fn validator_only_and_restricted_heads_are_never_reused_blindly() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let times = (now, now);
        let etag_only = Prepared::new(StatusCode::OK, &headers(&[("etag", "\"a\"")]), times, 1, H);
        assert!(etag_only.cc.no_cache);
        let f = etag_only.freshness(now);
        assert_eq!(usable(f, &cc("max-stale"), &etag_only.cc), Usable::Revalidate);
        assert!(!may_serve_stale_on_error(f, &etag_only.cc, Duration::from_secs(3600)));
        let explicit = Prepared::new(
            StatusCode::OK,
            &headers(&[("cache-control", "max-age=0"), ("etag", "\"a\"")]),
            times,
            1,
            H,
        );
        assert!(
            !explicit.cc.no_cache,
            "an explicit lifetime, even zero, is the app's word"
        );
        for restricted in ["private, max-age=600", "no-store, max-age=600"] {
            let p = Prepared::new(StatusCode::OK, &headers(&[("cache-control", restricted)]), times, 1, H);
            let f = p.freshness(now);
            assert_eq!(
                usable(f, &CacheControl::default(), &p.cc),
                Usable::Revalidate,
                "{restricted}"
            );
            assert!(!may_serve_stale_on_error(f, &p.cc, Duration::from_secs(3600)));
        }
    }

    /// Issue 25, item 8: an answer to a request with a `Cookie` is stored only on the app's
    /// explicit word (a lifetime, `public`); the cache's guesses (the `Last-Modified`
    /// heuristic, a copy kept for its validator) are never made for one user's session.
    #[test]
    fn a_cookie_request_is_stored_only_on_the_apps_explicit_word() {
        let with_cookie = headers(&[("cookie", "session=alice")]);
        let st = |req: &HeaderMap, h: &[(&str, &str)]| storable(&Method::GET, req, StatusCode::OK, &headers(h));
        let guessed = [("last-modified", "Tue, 01 Jan 2019 00:00:00 GMT"), ("etag", "\"a\"")];
        assert_eq!(
            st(&HeaderMap::new(), &guessed),
            Ok(()),
            "without a cookie: as RFC 9111 allows"
        );
        assert_eq!(st(&with_cookie, &guessed), Err(NotStorable::Credentials));
        for explicit in ["max-age=60", "s-maxage=60", "public"] {
            assert_eq!(st(&with_cookie, &[("cache-control", explicit)]), Ok(()), "{explicit}");
        }
        assert_eq!(
            st(&with_cookie, &[("sidecache-cache-control", "max-age=60")]),
            Ok(()),
            "a targeted lifetime is the app's (or a rule's) explicit word"
        );
        assert!(is_credentialed(&with_cookie) && is_credentialed(&headers(&[("authorization", "Bearer x")])));
        assert!(!is_credentialed(&HeaderMap::new()));
    }
}
