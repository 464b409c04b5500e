//! `Vary` (RFC 9111 §4.1), its one home: parsed once into [`Vary`] (`*` or the field names),
//! the normalized request values a variant is recorded with ([`Vary::values`]), whether a
//! stored variant matches a request ([`Vary::matches`]), the hash it is stored under
//! ([`variant_hash`]), and whether a stored answer may be reused for a request at all
//! ([`reusable`]: its variant, and a coding the client accepts).
//!
//! Pure functions over header maps; the cache (`cache::vary`) only remembers which URLs vary.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::cache::key::{CacheKey, KeyHash};
use crate::policy::fields;

/// The recorded values of a stored variant: each field its response's `Vary` names, with the
/// normalized value the request had (`None`: absent).
pub type Recorded = [(HeaderName, Option<HeaderValue>)];

/// A response's `Vary`, parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vary {
    /// `*`, or something that cannot be read as field names (not text, not a token): no
    /// request can be matched against it (§4.1), so it is never stored.
    Star,
    /// The request fields that select the variant, lower-case, each once; empty: no `Vary`.
    Fields(Vec<HeaderName>),
}

impl Vary {
    /// Parses every `Vary` line of a response. A line that is not text, or an element that is
    /// not a field name, is `*`: skipping it would leave a field out of the key and let one
    /// request's answer reach another that differs in it.
    pub fn parse(resp: &HeaderMap) -> Vary {
        let Some(elements) = fields::elements_or_unreadable(resp, &header::VARY) else {
            return Vary::Star;
        };
        let mut names: Vec<HeaderName> = Vec::with_capacity(elements.len());
        for element in elements {
            if element == "*" {
                return Vary::Star;
            }
            let Ok(name) = HeaderName::from_bytes(element.as_bytes()) else {
                return Vary::Star;
            };
            if !names.contains(&name) {
                names.push(name);
            }
        }
        Vary::Fields(names)
    }

    /// `Vary: *` (or unreadable).
    pub fn is_star(&self) -> bool {
        matches!(self, Vary::Star)
    }

    /// The field names (none for `*`).
    pub fn names(&self) -> &[HeaderName] {
        match self {
            Vary::Star => &[],
            Vary::Fields(names) => names,
        }
    }

    /// What a variant stored for this request records: each named field's normalized value.
    pub fn values(&self, req: &HeaderMap) -> Vec<(HeaderName, Option<HeaderValue>)> {
        values_of(self.names(), req)
    }

    /// Whether a request has the values a stored variant recorded (§4.1).
    pub fn matches(stored: &Recorded, req: &HeaderMap) -> bool {
        stored
            .iter()
            .all(|(name, value)| normalize(name, req).as_ref() == value.as_ref())
    }
}

/// Each named field's normalized value in a request (see [`normalize`]).
pub fn values_of(names: &[HeaderName], req: &HeaderMap) -> Vec<(HeaderName, Option<HeaderValue>)> {
    names.iter().map(|n| (n.clone(), normalize(n, req))).collect()
}

/// The hash a variant is stored under: the key's own hash when the response does not vary,
/// else the key plus the normalized values of the fields it varies on.
pub fn variant_hash(key: &CacheKey, vary: &Recorded) -> KeyHash {
    if vary.is_empty() {
        return key.hash();
    }
    let mut h = blake3::Hasher::new();
    h.update(key.as_str().as_bytes());
    for (name, value) in vary {
        h.update(b"\n");
        h.update(name.as_str().as_bytes());
        match value {
            Some(v) => {
                h.update(b"=");
                h.update(v.as_bytes());
            }
            None => {
                h.update(b"!");
            }
        }
    }
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    KeyHash(out)
}

/// The normalized value of one `Vary`-named request field (§4.1 lets a cache normalize, e.g.
/// whitespace and case where the field's syntax allows): lines combined, list whitespace
/// folded, `Accept`, `Accept-Charset` lower-cased; `Accept-Language` lower-cased and in order
/// of weight (its order among equal weights chooses nothing, RFC 9110 §12.5.4);
/// `Accept-Encoding` reduced to the common codings it accepts, so its many spellings make a
/// few variants, not one each. `None` when the request lacks the field (or, for
/// `Accept-Encoding`, accepts none of them).
pub fn normalize(name: &HeaderName, headers: &HeaderMap) -> Option<HeaderValue> {
    if name == header::ACCEPT_ENCODING {
        // Reduced to what decides an app's coded answer (`negotiate::Accepts::reduced`).
        return crate::negotiate::Accepts::parse(headers).reduced();
    }
    let lines: Vec<&HeaderValue> = headers.get_all(name).iter().collect();
    if lines.is_empty() {
        return None;
    }
    if lines.iter().any(|v| v.to_str().is_err()) {
        // Not text: compare the raw bytes of the first line, unnormalized.
        return Some(lines[0].clone());
    }
    let lower = matches!(name.as_str(), "accept" | "accept-language" | "accept-charset");
    let mut parts: Vec<(u16, String)> = fields::elements(headers, name)
        .map(|p| p.split_whitespace().collect::<String>())
        .map(|p| if lower { p.to_ascii_lowercase() } else { p })
        .map(|p| (1000, p))
        .collect();
    if name == header::ACCEPT_LANGUAGE {
        parts = parts.into_iter().map(|(_, p)| language_range(p)).collect();
        // Heaviest first; among equal weights by name, and each range once.
        parts.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        parts.dedup();
    }
    let joined: Vec<String> = parts.into_iter().map(|(_, p)| p).collect();
    HeaderValue::from_str(&joined.join(",")).ok()
}

/// An `Accept-Language` element (whitespace removed, lower-case) as its weight and a canonical
/// spelling: `de;q=1.0` is `de`, `fr;q=0.50` is `fr;q=0.5`. A malformed weight is kept as
/// written (weight 0, so it sorts last and still tells requests apart).
fn language_range(element: String) -> (u16, String) {
    let Some((range, params)) = element.split_once(';') else {
        return (1000, element);
    };
    let q = params.strip_prefix("q=").and_then(crate::negotiate::qvalue);
    match q {
        Some(1000) => (1000, range.to_owned()),
        Some(q) => {
            let frac = format!("{q:03}");
            (q, format!("{range};q=0.{}", frac.trim_end_matches('0')))
        }
        None => (0, element),
    }
}

/// Whether a stored answer may be reused for a request (§4.1, RFC 9110 §12.5.3): it has the
/// values its `Vary` recorded, and a body the app coded goes only to a request that accepts
/// that coding. Where the app does not vary on `Accept-Encoding`, a request without it accepts
/// any coding (§12.5.3); so does any request for an answer coded in none of the codings clients negotiate
/// (an app's own, such as `aes128gcm`, that no browser names), is reused as §4.1 says: the
/// app's answer does not depend on `Accept-Encoding`. A negotiated coding (`gzip`, `br`, ...)
/// is still checked without `Vary`: an app that compresses but forgets to say so must not hand
/// one client's coding to another that refuses it.
pub fn reusable(stored: &Recorded, coding: Option<&HeaderValue>, req: &HeaderMap) -> bool {
    if !Vary::matches(stored, req) {
        return false;
    }
    let Some(coding) = coding else {
        return true;
    };
    // With `Vary: Accept-Encoding` the request must accept the coding, named: the key holds
    // `Accept-Encoding` reduced to the common codings, so a request that names an exotic one
    // and a request that names none share a variant.
    let varies_on_coding = stored.iter().any(|(name, _)| name == header::ACCEPT_ENCODING);
    if !varies_on_coding && (!req.contains_key(header::ACCEPT_ENCODING) || !crate::negotiate::is_negotiated(coding)) {
        return true;
    }
    crate::negotiate::accepts_stored(req, Some(coding))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        m
    }

    /// RFC 9111 §4.1: `*` and what cannot be read as field names match no request.
    #[test]
    fn vary_parses_to_star_or_field_names_once() {
        assert_eq!(Vary::parse(&h(&[])), Vary::Fields(vec![]));
        assert_eq!(
            Vary::parse(&h(&[("vary", "Accept-Language, x-a"), ("vary", "ACCEPT-language")])),
            Vary::Fields(vec![header::ACCEPT_LANGUAGE, HeaderName::from_static("x-a")])
        );
        for star in ["*", "x-a, *", "x a", "x-a, \"q\""] {
            assert!(Vary::parse(&h(&[("vary", star)])).is_star(), "{star}");
        }
        let mut bad = HeaderMap::new();
        bad.insert(header::VARY, HeaderValue::from_bytes(b"x-a\xff").unwrap());
        assert!(Vary::parse(&bad).is_star());
        assert!(Vary::Star.names().is_empty());
    }

    /// RFC 9111 §4.1: a stored variant matches a request with the same normalized values; a
    /// field absent then must be absent now.
    #[test]
    fn a_variant_matches_requests_with_its_normalized_values() {
        let vary = Vary::parse(&h(&[("vary", "x-a, accept")]));
        let recorded = vary.values(&h(&[("x-a", "1, 2"), ("accept", "Text/HTML")]));
        assert!(Vary::matches(
            &recorded,
            &h(&[("x-a", " 1 ,2 "), ("accept", "text/html")])
        ));
        assert!(Vary::matches(
            &recorded,
            &h(&[("x-a", "1"), ("x-a", "2"), ("accept", "text/html")])
        ));
        assert!(!Vary::matches(
            &recorded,
            &h(&[("x-a", "2, 1"), ("accept", "text/html")])
        ));
        assert!(!Vary::matches(&recorded, &h(&[("accept", "text/html")])));
        let absent = vary.values(&h(&[]));
        assert!(Vary::matches(&absent, &h(&[("x-other", "1")])));
        assert!(!Vary::matches(&absent, &h(&[("x-a", "1")])));
    }

    /// RFC 9110 §12.5.4: `Accept-Language` case, spacing, order among equal weights and a
    /// spelled-out `q=1` choose nothing; weights do.
    #[test]
    fn accept_language_is_normalized_by_weight_not_order() {
        let n = |v: &'static str| normalize(&header::ACCEPT_LANGUAGE, &h(&[("accept-language", v)]));
        assert_eq!(n("en, de"), n("de, en"));
        assert_eq!(n("en, de"), n(" EN ,   De"));
        assert_eq!(n("de;q=1.0, fr;q=0.50"), n("fr;q=0.5, de"));
        assert_ne!(n("en, de;q=0.5"), n("de, en;q=0.5"));
        assert_eq!(n("fr;q=0.5, de").unwrap(), "de,fr;q=0.5");
    }

    /// The key's hash: the key's own without `Vary`, else one per set of values.
    #[test]
    fn variants_hash_apart_and_a_plain_answer_keeps_the_keys_hash() {
        let k = CacheKey::from_stored("http://h/a".into());
        let ae = header::ACCEPT_ENCODING;
        let gzip = values_of(std::slice::from_ref(&ae), &h(&[("accept-encoding", "GZIP,  br")]));
        let same = values_of(
            std::slice::from_ref(&ae),
            &h(&[("accept-encoding", "br"), ("accept-encoding", "gzip")]),
        );
        assert_eq!(gzip, same);
        let none = values_of(std::slice::from_ref(&ae), &h(&[]));
        assert_eq!(none, [(ae.clone(), None)]);
        assert_ne!(variant_hash(&k, &gzip), variant_hash(&k, &none));
        assert_ne!(variant_hash(&k, &gzip), k.hash());
        assert_eq!(variant_hash(&k, &[]), k.hash());
    }

    /// RFC 9110 §12.5.3: no `Accept-Encoding` accepts any coding; one that is present must
    /// accept the stored coding.
    #[test]
    fn a_coded_answer_is_reused_only_for_requests_that_accept_its_coding() {
        let gz = HeaderValue::from_static("gzip");
        let gz = Some(&gz);
        assert!(
            reusable(&[], gz, &h(&[])),
            "§12.5.3: no Accept-Encoding takes any coding"
        );
        assert!(reusable(&[], gz, &h(&[("accept-encoding", "gzip, br")])));
        assert!(!reusable(&[], gz, &h(&[("accept-encoding", "br")])));
        assert!(!reusable(&[], gz, &h(&[("accept-encoding", "identity")])));
        assert!(reusable(&[], None, &h(&[("accept-encoding", "identity")])));
        let recorded = [(HeaderName::from_static("x-a"), Some(HeaderValue::from_static("1")))];
        assert!(!reusable(&recorded, None, &h(&[("x-a", "2")])));
        // §4.1: no `Vary: Accept-Encoding` and a coding no client negotiates: the app's
        // answer does not depend on `Accept-Encoding` (cache-tests
        // `headers-store-Content-Encoding`).
        let own = HeaderValue::from_static("aes128gcm");
        let own = Some(&own);
        assert!(reusable(&[], own, &h(&[("accept-encoding", "gzip, deflate")])));
        let ae = [(header::ACCEPT_ENCODING, HeaderValue::from_str("gzip").ok())];
        let gzip_req = h(&[("accept-encoding", "gzip")]);
        assert!(!reusable(&ae, own, &gzip_req), "varies on it: the request must name it");
        assert!(!reusable(
            &[],
            Some(&HeaderValue::from_static("gzip, aes128gcm")),
            &h(&[("accept-encoding", "br")])
        ));
    }
}
