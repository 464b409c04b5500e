//! The door of the request path: what a request is, decided once ([`Proxy::admit`]). A request
//! that may use the cache becomes an [`Exchange`] (its key, the rule its path falls under, its
//! directives, the client), which every later step reads instead of working it out again; any
//! other is passed to the app with the reason.

use std::net::SocketAddr;

use http::{Method, Request};
use http_body::Body as _;

use crate::body::{self, ProxyBody};
use crate::cache::key::CacheKey;
use crate::policy::{self, CacheControl};
use crate::proxy::Proxy;
use crate::proxy::outcome::Fwd;
use crate::rules::{self, QueryKey};

/// One cacheable request (GET or HEAD, no body, keyable, not bypassed by a rule), worked out
/// once at the door. It holds the request's head only: it has no body (or the door would have
/// passed it), and a head can be borrowed across the cache's awaits.
pub(super) struct Exchange {
    /// The request's head, cleaned and its query reduced to the key's (what the app gets).
    pub req: http::request::Parts,
    /// Who sent it.
    pub client: SocketAddr,
    /// Its cache key.
    pub key: CacheKey,
    /// The rule its path falls under (a position in `config.rules`), matched once.
    pub rule: Option<usize>,
    /// Its directives (RFC 9111 §5.2.1, `Pragma` included, §5.4).
    pub cc: CacheControl,
}

/// What the door decides for a request.
pub(super) enum Admission {
    /// Through the cache.
    Cache(Exchange),
    /// A GET or HEAD forwarded without the cache: why, and a detail for `Cache-Status`.
    Pass(Request<ProxyBody>, Fwd, Option<&'static str>),
    /// Any other method: forwarded, and its answer may invalidate (RFC 9111 §4.4).
    Method(Request<ProxyBody>),
}

impl Proxy {
    /// Decides what a cleaned request is. `matched`: the rule its path falls under
    /// ([`rules::position`]).
    pub(super) fn admit(&self, mut req: Request<ProxyBody>, client: SocketAddr, matched: Option<usize>) -> Admission {
        let get_or_head = matches!(*req.method(), Method::GET | Method::HEAD);
        if get_or_head && !req.body().is_end_stream() {
            // A GET or HEAD with a body (Content-Length above 0, or chunked): RFC 9110 §9.3.1
            // gives it no meaning, yet an app may read it, and the key does not hold it. Its
            // answer is neither taken from nor stored in the cache, and it invalidates nothing.
            return Admission::Pass(req, Fwd::Bypass, Some("detail=request-body"));
        }
        if !policy::is_cacheable_request(req.method(), req.headers()) {
            if get_or_head {
                return Admission::Pass(req, Fwd::Request, None);
            }
            return Admission::Method(req);
        }
        let Some(key) = CacheKey::from_request(&req, self.scheme(&req), &self.config.query) else {
            return Admission::Pass(req, Fwd::Bypass, None);
        };
        if rules::bypassed(&self.config.rules, req.uri().path(), matched) {
            return Admission::Pass(req, Fwd::Bypass, None);
        }
        keep_keyed_query(&mut req, &self.config.query);
        let cc = policy::request_directives(req.headers());
        Admission::Cache(Exchange {
            req: req.into_parts().0,
            client,
            key,
            rule: matched,
            cc,
        })
    }
}

/// The app gets the query the key holds, no more: a parameter left out of the key
/// (`query: {deny: [utm_source]}`) must not change the answer stored under it.
fn keep_keyed_query<B>(req: &mut Request<B>, mode: &QueryKey) {
    let Some(kept) = req.uri().query().and_then(|q| rules::app_query(q, mode)) else {
        return;
    };
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

impl Exchange {
    /// The request again, with its empty body, to forward.
    pub(super) fn into_request(self) -> Request<ProxyBody> {
        Request::from_parts(self.req, body::empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri_after(uri: &str, mode: &QueryKey) -> String {
        let mut req = Request::builder().uri(uri).body(()).unwrap();
        keep_keyed_query(&mut req, mode);
        req.uri().to_string()
    }

    #[test]
    fn the_app_gets_the_query_the_key_holds() {
        let deny = QueryKey::Deny(vec!["utm_source".into()]);
        assert_eq!(uri_after("/p?q=1&utm_source=x", &deny), "/p?q=1");
        assert_eq!(uri_after("/p?utm_source=x", &deny), "/p");
        assert_eq!(uri_after("/p?b=2&a=1", &QueryKey::All), "/p?b=2&a=1", "untouched");
        assert_eq!(uri_after("/p?a=1", &QueryKey::None), "/p");
    }
}
