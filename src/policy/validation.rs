//! Validation with the app (RFC 9111 §4.3): the conditional request a cache sends for a stored
//! response ([`conditional_request`]) and the stored head freshened by a `304`
//! ([`merge_not_modified`]). Pure functions over header maps.

use http::header::{self, HeaderMap};

/// Makes the head of a request to the app conditional on what is stored (§4.3.1): the client's
/// own conditionals go (this cache answers them from what it holds), the stored `ETag` is sent
/// as `If-None-Match` and its `Last-Modified` as `If-Modified-Since`. Returns whether the
/// request validates (it carries one of them); with nothing stored it only removes the
/// client's conditionals.
pub fn conditional_request(req: &mut HeaderMap, stored: Option<&HeaderMap>) -> bool {
    for name in [
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_MATCH,
        header::IF_UNMODIFIED_SINCE,
    ] {
        req.remove(name);
    }
    let Some(stored) = stored else { return false };
    let mut validating = false;
    if let Some(etag) = stored.get(header::ETAG) {
        req.insert(header::IF_NONE_MATCH, etag.clone());
        validating = true;
    }
    if let Some(lm) = stored.get(header::LAST_MODIFIED) {
        req.insert(header::IF_MODIFIED_SINCE, lm.clone());
        validating = true;
    }
    validating
}

/// The stored head freshened by a `304` (§3.2, §4.3.4): each field the 304 carries replaces
/// the stored lines of that name, except those describing a body (`Content-Length`,
/// `Content-Range`, `Transfer-Encoding`), which a 304 has none of, and `Content-Encoding`,
/// which would relabel the stored bytes (RFC 9110 §15.4.5: a 304 does not describe the
/// representation's coding). `Set-Cookie` is left to the caller (one client's, never stored).
pub fn merge_not_modified(stored: &HeaderMap, update: &HeaderMap) -> HeaderMap {
    let mut merged = stored.clone();
    let mut seen = std::collections::HashSet::new();
    for (name, value) in update {
        if matches!(
            *name,
            header::CONTENT_LENGTH | header::CONTENT_RANGE | header::TRANSFER_ENCODING | header::CONTENT_ENCODING
        ) {
            continue;
        }
        if seen.insert(name.clone()) {
            merged.remove(name);
        }
        merged.append(name.clone(), value.clone());
    }
    merged
}

#[cfg(test)]
mod tests {
    use http::header::{HeaderName, HeaderValue};

    use super::*;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        m
    }

    /// RFC 9111 §4.3.1: the cache's validators replace the client's conditionals.
    #[test]
    fn a_revalidation_sends_the_stored_validators_instead_of_the_clients() {
        let client = h(&[
            ("if-none-match", "\"client\""),
            ("if-modified-since", "Sat, 01 Jan 2000 00:00:00 GMT"),
            ("if-match", "\"x\""),
            ("accept", "text/html"),
        ]);
        let stored = h(&[("etag", "\"v1\""), ("last-modified", "Sun, 02 Jan 2022 00:00:00 GMT")]);
        let mut req = client.clone();
        assert!(conditional_request(&mut req, Some(&stored)));
        assert_eq!(req["if-none-match"], "\"v1\"");
        assert_eq!(req["if-modified-since"], "Sun, 02 Jan 2022 00:00:00 GMT");
        assert!(!req.contains_key("if-match"));
        assert_eq!(req["accept"], "text/html");
        let mut req = client.clone();
        assert!(!conditional_request(&mut req, Some(&h(&[]))), "no validator");
        assert!(!req.contains_key("if-none-match") && !req.contains_key("if-modified-since"));
        let mut req = client;
        assert!(!conditional_request(&mut req, None));
        assert!(!req.contains_key("if-none-match"));
    }

    /// RFC 9111 §3.2 and §4.3.4: the 304's fields replace the stored ones, all lines of a
    /// name at once; the body's framing and coding stay the stored ones.
    #[test]
    fn a_304_replaces_stored_fields_but_not_the_bodys_description() {
        let stored = h(&[
            ("cache-control", "max-age=1"),
            ("x-a", "1"),
            ("x-a", "2"),
            ("content-length", "10"),
            ("content-encoding", "gzip"),
            ("x-kept", "k"),
        ]);
        let update = h(&[
            ("cache-control", "max-age=3600"),
            ("x-a", "3"),
            ("content-length", "0"),
            ("content-encoding", "br"),
            ("content-range", "bytes 0-1/2"),
            ("x-new", "n"),
        ]);
        let merged = merge_not_modified(&stored, &update);
        assert_eq!(merged["cache-control"], "max-age=3600");
        let xa: Vec<_> = merged.get_all("x-a").iter().collect();
        assert_eq!(xa, ["3"]);
        assert_eq!(merged["content-length"], "10");
        assert_eq!(merged["content-encoding"], "gzip");
        assert!(!merged.contains_key("content-range"));
        assert_eq!(merged["x-kept"], "k");
        assert_eq!(merged["x-new"], "n");
    }
}
