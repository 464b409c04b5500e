//! Request identity: [`CacheKey`] (what the request names) and its [`KeyHash`], versus
//! [`Digest`] (what a body contains). Only `store.rs` turns either into a path.

use std::fmt;

use http::Request;

use crate::rules::{QueryKey, key_query};
use http::header;

/// The cache key of a request: scheme, host (lower-cased, default port dropped), path and
/// query. GET and HEAD share a key (HEAD is answered from a stored GET).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(String);

impl CacheKey {
    /// The key of a request, or `None` when it names no host (then it is not cached).
    pub fn from_request<B>(req: &Request<B>, scheme: &str, query: &QueryKey) -> Option<CacheKey> {
        let host = checked_host(raw_host(req)?)?;
        let path = req.uri().path();
        let q = req.uri().query().map(|q| key_query(q, query)).unwrap_or_default();
        // Built in one allocation: this runs on every request.
        let mut key = String::with_capacity(scheme.len() + 3 + host.len() + path.len() + 1 + q.len());
        key.push_str(scheme);
        key.push_str("://");
        let at = key.len();
        key.push_str(host);
        // Lower-cased in place: the same spelling `normalize_host` gives the app.
        key[at..].make_ascii_lowercase();
        key.push_str(path);
        if !q.is_empty() {
            key.push('?');
            key.push_str(&q);
        }
        Some(CacheKey(key))
    }

    /// Wraps a key string read back from disk.
    pub fn from_stored(s: String) -> CacheKey {
        CacheKey(s)
    }

    /// The key as text (it contains the query string: never log it).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path and query part of the key.
    pub fn path_and_query(&self) -> &str {
        path_and_query(&self.0)
    }

    /// The key of a `Location`/`Content-Location` target, if it is on this key's host
    /// (RFC 9111 §4.4: a cache must not invalidate other hosts' responses).
    pub fn same_host(&self, target: &str) -> Option<CacheKey> {
        let (scheme, rest) = self.0.split_once("://")?;
        let host = &rest[..rest.find('/').unwrap_or(rest.len())];
        if target.starts_with('/') && !target.starts_with("//") {
            return Some(CacheKey(format!("{scheme}://{host}{target}")));
        }
        let uri: http::Uri = target.parse().ok()?;
        if normalize_host(uri.authority()?.as_str()).as_deref() != Some(host) {
            return None;
        }
        let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        Some(CacheKey(format!("{scheme}://{host}{pq}")))
    }

    /// The key's hash.
    pub fn hash(&self) -> KeyHash {
        KeyHash::of(self.0.as_bytes())
    }
}

/// The host part of a stored key (`scheme://host/path`).
pub fn host_of(key: &str) -> Option<&str> {
    let (_, rest) = key.split_once("://")?;
    Some(&rest[..rest.find('/').unwrap_or(rest.len())])
}

/// The host a request names, normalized: the `Host` field, else the URI's authority (HTTP/2
/// `:authority`, an absolute-form target). `None` when it names none, or one that could not be
/// a host. The cache key and the `Host` the app receives both come from here, so the app never
/// answers for a host other than the one its answer is stored under.
pub fn request_host<B>(req: &Request<B>) -> Option<String> {
    normalize_host(raw_host(req)?)
}

/// The `Host` field, else the URI's authority, as sent.
fn raw_host<B>(req: &Request<B>) -> Option<&str> {
    match req.headers().get(header::HOST) {
        Some(h) => h.to_str().ok(),
        None => req.uri().authority().map(|a| a.as_str()),
    }
}

/// A host as the key spells it: trimmed, lower-cased (RFC 9110 §4.2.3: the host is
/// case-insensitive), the default port `:80` dropped. `None` for an empty host or one with
/// characters that could smuggle a path or credentials.
pub fn normalize_host(raw: &str) -> Option<String> {
    checked_host(raw).map(str::to_ascii_lowercase)
}

/// `raw` trimmed and without `:80`, if it could be a host; not yet lower-cased.
fn checked_host(raw: &str) -> Option<&str> {
    let host = raw.trim();
    let host = host.strip_suffix(":80").unwrap_or(host);
    let smuggles = |c: char| !c.is_ascii_graphic() || matches!(c, '/' | '\\' | '@' | '?' | '#');
    (!host.is_empty() && !host.contains(smuggles)).then_some(host)
}

/// The hash a variant is stored under; its home is `Vary`'s ([`crate::policy::vary`]).
pub use crate::policy::vary::variant_hash;

/// The path and query of a key string (`scheme://host/path?query`).
pub fn path_and_query(key: &str) -> &str {
    let after_scheme = key.split_once("://").map(|(_, rest)| rest).unwrap_or(key);
    after_scheme.find('/').map(|i| &after_scheme[i..]).unwrap_or("/")
}

/// A 128-bit blake3 hash of a cache key: the index's key and the meta file's name. Collisions
/// cannot serve a wrong object: the stored record carries the full key and is compared.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyHash(pub [u8; 16]);

impl KeyHash {
    /// Hashes bytes.
    pub fn of(bytes: &[u8]) -> KeyHash {
        let full = blake3::hash(bytes);
        let mut out = [0u8; 16];
        out.copy_from_slice(&full.as_bytes()[..16]);
        KeyHash(out)
    }

    /// Parses 32 hex digits.
    pub fn from_hex(s: &str) -> Option<KeyHash> {
        let mut out = [0u8; 16];
        hex_decode(s, &mut out)?;
        Some(KeyHash(out))
    }

    /// 32 hex digits.
    pub fn to_hex(&self) -> String {
        hex_encode(&self.0)
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyHash({})", self.to_hex())
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The blake3 hash of a body: its record holds it, and the body is checked against it before its
/// first use after a restart.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Digest> {
        let mut out = [0u8; 32];
        hex_decode(s, &mut out)?;
        Some(Digest(out))
    }

    /// 64 hex digits.
    pub fn to_hex(&self) -> String {
        hex_encode(&self.0)
    }
}

impl From<blake3::Hash> for Digest {
    fn from(h: blake3::Hash) -> Digest {
        Digest(*h.as_bytes())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

fn hex_encode(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

fn hex_decode(s: &str, out: &mut [u8]) -> Option<()> {
    let s = s.as_bytes();
    if s.len() != out.len() * 2 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    for (i, o) in out.iter_mut().enumerate() {
        *o = nibble(s[2 * i])? << 4 | nibble(s[2 * i + 1])?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(host: &str, uri: &str) -> Request<()> {
        Request::builder().uri(uri).header("host", host).body(()).unwrap()
    }

    #[test]
    fn key_includes_scheme_host_path_and_query() {
        let k = CacheKey::from_request(&req("Shop.Example:80", "/a.js?v=1"), "http", &QueryKey::All).unwrap();
        assert_eq!(k.as_str(), "http://shop.example/a.js?v=1");
        assert_eq!(k.path_and_query(), "/a.js?v=1");
        let other_host = CacheKey::from_request(&req("evil.example", "/a.js?v=1"), "http", &QueryKey::All).unwrap();
        assert_ne!(k.hash(), other_host.hash());
    }

    #[test]
    fn hosts_that_could_smuggle_a_path_are_refused() {
        assert!(CacheKey::from_request(&req("a.example/evil", "/x"), "http", &QueryKey::All).is_none());
        assert!(CacheKey::from_request(&req("", "/x"), "http", &QueryKey::All).is_none());
        assert!(CacheKey::from_request(&req("a.example?x", "/x"), "http", &QueryKey::All).is_none());
        assert!(CacheKey::from_request(&req("a\texample", "/x"), "http", &QueryKey::All).is_none());
    }

    #[test]
    fn the_host_is_normalized_once_for_the_key_and_the_app() {
        assert_eq!(normalize_host(" Shop.EXAMPLE:80 ").as_deref(), Some("shop.example"));
        assert_eq!(
            normalize_host("shop.example:8080").as_deref(),
            Some("shop.example:8080")
        );
        assert_eq!(normalize_host("[::1]:80").as_deref(), Some("[::1]"));
        let r = req("Shop.Example:80", "/a");
        let key = CacheKey::from_request(&r, "http", &QueryKey::All).unwrap();
        let host = request_host(&r).unwrap();
        assert_eq!(key.as_str(), format!("http://{host}/a"));
        // HTTP/2 and absolute-form: the authority, when no Host field is sent.
        let h2 = Request::builder().uri("http://A.Example:80/a").body(()).unwrap();
        assert_eq!(request_host(&h2).as_deref(), Some("a.example"));
        let none = Request::builder().uri("/a").body(()).unwrap();
        assert_eq!(request_host(&none), None);
    }

    #[test]
    fn invalidation_targets_stay_on_the_same_host() {
        let k = CacheKey::from_request(&req("shop.example", "/cart"), "http", &QueryKey::All).unwrap();
        assert_eq!(k.same_host("/items/1").unwrap().as_str(), "http://shop.example/items/1");
        assert_eq!(
            k.same_host("http://shop.example/a?b").unwrap().as_str(),
            "http://shop.example/a?b"
        );
        assert!(k.same_host("http://evil.example/a").is_none());
        assert!(k.same_host("//evil.example/a").is_none());
    }

    #[test]
    fn hex_round_trips() {
        let h = KeyHash::of(b"x");
        assert_eq!(KeyHash::from_hex(&h.to_hex()), Some(h));
        let d = Digest::from(blake3::hash(b"y"));
        assert_eq!(Digest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(KeyHash::from_hex("zz"), None);
    }
}
