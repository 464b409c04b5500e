//! HTTP caching rules as pure functions, no I/O: may this request use the cache, may this
//! response be stored, how long is it fresh, how old is it (RFC 9111, shared cache).

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName};
use http::{Method, StatusCode};

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
            for directive in split_directives(value) {
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
                    "max-stale" => cc.max_stale = Some(arg.and_then(delta_seconds).unwrap_or(u64::MAX)),
                    "min-fresh" => cc.min_fresh = arg.and_then(delta_seconds),
                    "only-if-cached" => cc.only_if_cached = true,
                    "stale-while-revalidate" => cc.stale_while_revalidate = arg.and_then(delta_seconds),
                    "stale-if-error" => cc.stale_if_error = arg.and_then(delta_seconds),
                    _ => {}
                }
            }
        }
        cc
    }
}

/// Splits a directive list on commas outside quoted strings.
fn split_directives(value: &str) -> impl Iterator<Item = &str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    for (i, b) in value.bytes().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b',' if !quoted => {
                parts.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&value[start..]);
    parts.into_iter().map(str::trim).filter(|p| !p.is_empty())
}

/// Whether a request may be answered from the cache or fill it. Only GET and HEAD do
/// (RFC 9111 §2: the cache key's method); HEAD is answered from a stored GET.
pub fn is_cacheable_request(method: &Method, headers: &HeaderMap) -> bool {
    if !(method == Method::GET || method == Method::HEAD) {
        return false;
    }
    // Range requests go to the app until they can be served from stored full objects.
    !headers.contains_key(header::RANGE)
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
    /// `Vary: *`.
    VaryStar,
    /// The response sets a cookie.
    SetCookie,
    /// Neither explicit freshness, nor a validator, nor a heuristically cacheable status.
    NoFreshness,
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
            NotStorable::NoFreshness => "no-freshness",
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
    if method != Method::GET {
        return Err(NotStorable::Method);
    }
    // Final statuses only; 206 needs range-aware storage (§3.3/§3.4), not attempted.
    if status.is_informational() || status == StatusCode::PARTIAL_CONTENT || status.as_u16() >= 600 {
        return Err(NotStorable::Status);
    }
    let req_cc = CacheControl::parse(req_headers);
    let cc = CacheControl::parse(resp_headers);
    if req_cc.no_store || cc.no_store {
        return Err(NotStorable::NoStore);
    }
    if cc.private {
        return Err(NotStorable::Private);
    }
    // §3.5: a response to a request with Authorization is shared only when it says so.
    if req_headers.contains_key(header::AUTHORIZATION) && !(cc.public || cc.s_maxage.is_some() || cc.must_revalidate) {
        return Err(NotStorable::Authorization);
    }
    if resp_headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|f| f.trim() == "*"))
    {
        return Err(NotStorable::VaryStar);
    }
    // Safe by default: a cookie is one user's; never hand it to another.
    if resp_headers.contains_key(header::SET_COOKIE) {
        return Err(NotStorable::SetCookie);
    }
    let explicit = cc.max_age.is_some() || cc.s_maxage.is_some() || resp_headers.contains_key(header::EXPIRES);
    if explicit || cc.public || is_heuristically_cacheable(status) {
        return Ok(());
    }
    Err(NotStorable::NoFreshness)
}

/// Parses an HTTP date; `None` for anything invalid (RFC 9110 §5.6.7).
pub fn parse_date(headers: &HeaderMap, name: &HeaderName) -> Option<SystemTime> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| httpdate::parse_http_date(s.trim()).ok())
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
    let cc = CacheControl::parse(headers);
    if let Some(s) = cc.s_maxage {
        return Duration::from_secs(s);
    }
    if let Some(s) = cc.max_age {
        return Duration::from_secs(s);
    }
    let date = parse_date(headers, &header::DATE).unwrap_or(response_time);
    if headers.contains_key(header::EXPIRES) {
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
    let age_value = headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(delta_seconds)
        .map(Duration::from_secs)
        .unwrap_or_default();
    let date = parse_date(headers, &header::DATE).unwrap_or(response_time);
    let apparent_age = response_time.duration_since(date).unwrap_or_default();
    let response_delay = response_time.duration_since(request_time).unwrap_or_default();
    let corrected_age_value = age_value.saturating_add(response_delay);
    let corrected_initial_age = apparent_age.max(corrected_age_value);
    let resident_time = now.duration_since(response_time).unwrap_or_default();
    corrected_initial_age.saturating_add(resident_time)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
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
}
