//! Content codings: which of a stored object's compressed variants a request gets
//! (`Accept-Encoding` with q-values, RFC 9110 §12.5.3), the head a variant is served with, and
//! the reduced `Accept-Encoding` a cache key holds when an app's responses vary on it.
//!
//! Pure functions over header values; no state, no I/O.

use http::header::{self, HeaderMap, HeaderValue};

use crate::policy::{Vary, fields};

/// A content coding sidecache makes variants in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Coding {
    /// Brotli (RFC 7932).
    Br,
    /// Zstandard (RFC 8878).
    Zstd,
    /// Gzip (RFC 1952).
    Gzip,
}

impl Coding {
    /// Every coding, in the order variants are made (the best ratio first).
    pub const ALL: [Coding; 3] = [Coding::Br, Coding::Zstd, Coding::Gzip];

    /// The token in `Accept-Encoding` and `Content-Encoding`.
    pub fn token(self) -> &'static str {
        match self {
            Coding::Br => "br",
            Coding::Zstd => "zstd",
            Coding::Gzip => "gzip",
        }
    }

    /// The suffix of a variant's file name.
    pub fn ext(self) -> &'static str {
        match self {
            Coding::Br => "br",
            Coding::Zstd => "zst",
            Coding::Gzip => "gz",
        }
    }

    /// The coding a file suffix names.
    pub fn from_ext(ext: &str) -> Option<Coding> {
        Coding::ALL.into_iter().find(|c| c.ext() == ext)
    }

    /// A small number for records and metrics (stable on disk).
    pub fn id(self) -> u8 {
        match self {
            Coding::Br => 1,
            Coding::Zstd => 2,
            Coding::Gzip => 3,
        }
    }

    /// The coding a record's number names.
    pub fn from_id(id: u8) -> Option<Coding> {
        Coding::ALL.into_iter().find(|c| c.id() == id)
    }
}

/// Codings an app's own compressed responses may use that the reduced key tells apart.
const KEYED: [&str; 4] = ["br", "deflate", "gzip", "zstd"];

/// Upper bound on the `Accept-Encoding` elements looked at: a real browser sends under ten;
/// anything past this is ignored, so a hostile header costs a bounded parse.
const MAX_ELEMENTS: usize = 32;

/// What a request's `Accept-Encoding` says, as quality values in thousandths (0..=1000).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepts {
    /// The header was present (absent: any coding is acceptable, none is preferred, so the
    /// identity body is sent, RFC 9110 §12.5.3).
    present: bool,
    /// `br`, `zstd`, `gzip`, `deflate`, `identity`, `*`: the q named, if named.
    q: [Option<u16>; 6],
}

const IDENTITY: usize = 4;
const STAR: usize = 5;

/// A coding token's slot in [`Accepts::q`], in any case (tokens are case-insensitive), without
/// a lower-cased copy of it.
fn slot(token: &str) -> Option<usize> {
    const SLOTS: [(&str, usize); 7] = [
        ("br", 0),
        ("zstd", 1),
        ("gzip", 2),
        ("x-gzip", 2),
        ("deflate", 3),
        ("identity", IDENTITY),
        ("*", STAR),
    ];
    SLOTS
        .iter()
        .find(|(name, _)| token.eq_ignore_ascii_case(name))
        .map(|&(_, i)| i)
}

/// Parses a q-value (`0`, `0.5`, `1.000`) into thousandths; malformed reads as absent.
pub(crate) fn qvalue(s: &str) -> Option<u16> {
    let s = s.trim();
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut thousandths: u16 = frac.bytes().fold(0, |n, b| n * 10 + u16::from(b - b'0'));
    for _ in frac.len()..3 {
        thousandths *= 10;
    }
    match int {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

impl Accepts {
    /// Reads every `Accept-Encoding` line of a request.
    pub fn parse(headers: &HeaderMap) -> Accepts {
        let mut out = Accepts {
            present: headers.contains_key(header::ACCEPT_ENCODING),
            q: [None; 6],
        };
        for (token, q) in elements(headers) {
            if let Some(i) = slot(token) {
                // Named twice: the higher weight stands (a lenient reading).
                out.q[i] = Some(out.q[i].map_or(q, |old| old.max(q)));
            }
        }
        out
    }

    /// The weight of a coding token (`br`, `gzip`, ...): named, else `*`'s, else 0. Without the
    /// header no coding is asked for: 0.
    fn weight(&self, i: usize) -> u16 {
        if !self.present {
            return 0;
        }
        self.q[i].or(self.q[STAR]).unwrap_or(0)
    }

    /// Which stored variant to send: of the codings accepted, the highest weight, then the
    /// smallest; `None` for the identity body. An identity the request names with a weight
    /// above every variant's wins; one it does not name is preferred less than any coding it
    /// names (browsers list the codings they want and leave identity implicit).
    pub fn choose(&self, variants: impl IntoIterator<Item = (Coding, u64)>, identity_len: u64) -> Option<Coding> {
        let mut best: Option<(u16, u64, Coding)> = None;
        for (coding, len) in variants {
            let w = self.weight(coding as usize);
            if w == 0 || len >= identity_len {
                continue;
            }
            let better = match best {
                None => true,
                Some((bw, blen, _)) => w > bw || (w == bw && len < blen),
            };
            if better {
                best = Some((w, len, coding));
            }
        }
        let (w, _, coding) = best?;
        match self.q[IDENTITY] {
            Some(iq) if iq > w => None,
            _ => Some(coding),
        }
    }

    /// The `Accept-Encoding` a cache key holds when an app varies on it: the codings among
    /// `br`, `deflate`, `gzip`, `zstd` this request accepts, sorted, and whether it refuses
    /// identity. The hundreds of spellings browsers and clients send reduce to these few
    /// values, so an app's compressed responses are stored once per answer, not once per
    /// spelling. `None` when none is accepted and identity is not refused (same as no header).
    pub fn reduced(&self) -> Option<HeaderValue> {
        let mut parts: Vec<&str> = KEYED
            .iter()
            .copied()
            .filter(|t| self.present && slot(t).is_some_and(|i| self.weight(i) > 0))
            .collect();
        let identity_refused = self.present && self.q[IDENTITY].or(self.q[STAR]) == Some(0);
        if identity_refused {
            parts.push("identity;q=0");
        }
        if parts.is_empty() {
            return None;
        }
        Some(HeaderValue::from_str(&parts.join(",")).expect("tokens are valid header text"))
    }
}

/// Whether a stored `Content-Encoding` (its codings, in order applied) may be sent to a request
/// with these headers: every coding in it must be acceptable, named by the request (or
/// covered by its `*`) with a weight above 0. No `Content-Encoding` (or `identity`): yes.
/// Without `Accept-Encoding` any coding is acceptable (RFC 9110 §12.5.3), but an app that
/// coded an answer for one client must not reach one that did not ask: the caller decides
/// when that reading applies.
pub fn accepts_stored(req: &HeaderMap, content_encoding: Option<&HeaderValue>) -> bool {
    let Some(value) = content_encoding else { return true };
    let Ok(text) = value.to_str() else { return false };
    let accepts = Accepts::parse(req);
    fields::split(text)
        .filter(|t| !t.eq_ignore_ascii_case("identity"))
        .all(|t| match slot(t) {
            Some(i) => accepts.weight(i) > 0,
            // A coding this module has no slot for: named with a weight above 0, else `*`'s.
            None => named_weight(req, t)
                .or(accepts.q[STAR])
                .is_some_and(|q| accepts.present && q > 0),
        })
}

/// Whether a `Content-Encoding` uses a coding clients negotiate with `Accept-Encoding`
/// (`gzip`, `br`, `zstd`, `deflate`, `compress` and their aliases), or cannot be read. An app's
/// own coding (`aes128gcm`, ...) is not chosen by `Accept-Encoding`: no browser names it.
pub fn is_negotiated(content_encoding: &HeaderValue) -> bool {
    const NEGOTIATED: [&str; 7] = ["br", "zstd", "gzip", "x-gzip", "deflate", "compress", "x-compress"];
    let Ok(text) = content_encoding.to_str() else {
        return true;
    };
    fields::split(text).any(|t| NEGOTIATED.iter().any(|n| t.eq_ignore_ascii_case(n)))
}

/// The weight a request's `Accept-Encoding` gives a coding token by name (the highest, when
/// named twice); `None` when it does not name it.
fn named_weight(req: &HeaderMap, token: &str) -> Option<u16> {
    elements(req)
        .filter(|(t, _)| t.eq_ignore_ascii_case(token))
        .map(|(_, q)| q)
        .max()
}

/// The elements of a request's `Accept-Encoding` lines, as (token, weight), in order: at most
/// [`MAX_ELEMENTS`] are looked at, so a hostile header costs a bounded parse. An element with a
/// malformed weight is void (left out) rather than acceptable.
fn elements(req: &HeaderMap) -> impl Iterator<Item = (&str, u16)> {
    fields::elements(req, &header::ACCEPT_ENCODING)
        .take(MAX_ELEMENTS)
        .filter_map(|element| {
            let mut parts = element.split(';');
            let token = parts.next().unwrap_or("").trim();
            let mut q = Some(1000);
            for param in parts {
                if let Some((name, value)) = param.split_once('=')
                    && name.trim().eq_ignore_ascii_case("q")
                {
                    q = qvalue(value);
                }
            }
            Some((token, q?))
        })
}

/// The entity tag of a variant: the identity's with the coding appended inside the quotes
/// (`"abc"` -> `"abc-br"`, `W/"abc"` -> `W/"abc-br"`), so a validator never names two
/// different byte sequences. `None` for a malformed tag (then the variant is sent without one).
pub fn variant_etag(etag: &HeaderValue, coding: Coding) -> Option<HeaderValue> {
    let text = etag.to_str().ok()?;
    let (weak, quoted) = match text.strip_prefix("W/") {
        Some(rest) => ("W/", rest),
        None => ("", text),
    };
    let inner = quoted.strip_prefix('"')?.strip_suffix('"')?;
    HeaderValue::from_str(&format!("{weak}\"{inner}-{}\"", coding.token())).ok()
}

/// Adds `Accept-Encoding` to a response's `Vary` unless it is there (or `Vary: *`).
pub fn vary_on_accept_encoding(headers: &mut HeaderMap) {
    let listed = match Vary::parse(headers) {
        Vary::Star => true,
        vary => vary.names().contains(&header::ACCEPT_ENCODING),
    };
    if !listed {
        headers.append(header::VARY, HeaderValue::from_static("Accept-Encoding"));
    }
}

/// The head of a stored response sent as `coding`'s variant of `len` bytes: `Content-Encoding`,
/// its own `Content-Length` and entity tag, and `Vary: Accept-Encoding`.
pub fn variant_head(headers: &mut HeaderMap, coding: Coding, len: u64) {
    headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(coding.token()));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if let Some(etag) = headers.remove(header::ETAG)
        && let Some(tag) = variant_etag(&etag, coding)
    {
        headers.insert(header::ETAG, tag);
    }
    // A range of the coded bytes is not offered: ranges are served from the identity body.
    headers.remove(header::ACCEPT_RANGES);
    // Digests of the identity bytes would be wrong for these.
    for digest in ["content-md5", "content-digest", "repr-digest", "digest"] {
        headers.remove(digest);
    }
    vary_on_accept_encoding(headers);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepts(value: &str) -> Accepts {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(value).expect("value"));
        Accepts::parse(&h)
    }

    const ALL: [(Coding, u64); 3] = [(Coding::Br, 300), (Coding::Zstd, 320), (Coding::Gzip, 400)];

    #[test]
    fn a_browser_gets_the_smallest_variant_it_names() {
        for browser in [
            "gzip, deflate, br, zstd",
            "gzip, deflate, br",
            "br;q=1.0, gzip;q=0.8, *;q=0.1",
            "GZIP, BR",
        ] {
            assert_eq!(accepts(browser).choose(ALL, 1000), Some(Coding::Br), "{browser}");
        }
        assert_eq!(accepts("gzip, deflate").choose(ALL, 1000), Some(Coding::Gzip));
        assert_eq!(accepts("zstd, gzip").choose(ALL, 1000), Some(Coding::Zstd));
        // Only gzip stored: a brotli client that also takes gzip gets it.
        assert_eq!(
            accepts("br, gzip").choose([(Coding::Gzip, 400)], 1000),
            Some(Coding::Gzip)
        );
    }

    #[test]
    fn weights_and_refusals_are_honoured() {
        // Higher weight wins over size.
        assert_eq!(accepts("br;q=0.5, gzip").choose(ALL, 1000), Some(Coding::Gzip));
        // q=0 refuses.
        assert_eq!(accepts("br;q=0, gzip;q=0, zstd;q=0").choose(ALL, 1000), None);
        assert_eq!(accepts("gzip;q=0").choose([(Coding::Gzip, 1)], 1000), None);
        // `*` covers what is not named; a named q=0 still refuses.
        assert_eq!(accepts("*").choose(ALL, 1000), Some(Coding::Br));
        assert_eq!(accepts("*, br;q=0").choose(ALL, 1000), Some(Coding::Zstd));
        assert_eq!(accepts("*;q=0").choose(ALL, 1000), None);
        // An identity preferred over every coding.
        assert_eq!(accepts("identity, br;q=0.5").choose(ALL, 1000), None);
        // No header, an empty one, or identity only: the identity body.
        assert_eq!(Accepts::parse(&HeaderMap::new()).choose(ALL, 1000), None);
        assert_eq!(accepts("").choose(ALL, 1000), None);
        assert_eq!(accepts("identity").choose(ALL, 1000), None);
        // Malformed weights void their element.
        assert_eq!(accepts("br;q=2, gzip;q=abc").choose(ALL, 1000), None);
        assert_eq!(accepts("br;q=0.0001").choose(ALL, 1000), None);
        assert_eq!(accepts("br;q=0.001").choose(ALL, 1000), Some(Coding::Br));
        // A variant no smaller than the identity body is never chosen.
        assert_eq!(accepts("br").choose([(Coding::Br, 1000)], 1000), None);
    }

    #[test]
    fn a_hostile_header_is_parsed_in_bounded_steps() {
        let long = format!("{}br", "x, ".repeat(100_000));
        // Past the element bound: `br` is never reached.
        assert_eq!(accepts(&long).choose(ALL, 1000), None);
        let q_spam = "br;q=1;q=1;q=1;".repeat(1000);
        assert!(accepts(&q_spam).q[0].is_some());
    }

    #[test]
    fn the_reduced_key_collapses_spellings_to_what_decides_the_answer() {
        let chrome = accepts("gzip, deflate, br, zstd").reduced();
        for same in [
            "gzip, deflate, br, zstd",
            "zstd, br, deflate, gzip",
            "gzip,deflate,br,zstd",
            "gzip;q=1.0, deflate;q=0.9, br;q=1.0, zstd, sdch, compress",
            "*",
        ] {
            assert_eq!(accepts(same).reduced(), chrome, "{same}");
        }
        assert_eq!(chrome, Some(HeaderValue::from_static("br,deflate,gzip,zstd")));
        assert_eq!(
            accepts("gzip, deflate, br").reduced(),
            Some(HeaderValue::from_static("br,deflate,gzip"))
        );
        assert_eq!(accepts("x-gzip").reduced(), Some(HeaderValue::from_static("gzip")));
        assert_eq!(accepts("identity").reduced(), None);
        assert_eq!(accepts("sdch").reduced(), None);
        assert_eq!(Accepts::parse(&HeaderMap::new()).reduced(), None);
        assert_eq!(
            accepts("br;q=0, gzip").reduced(),
            Some(HeaderValue::from_static("gzip"))
        );
        assert_eq!(
            accepts("gzip, identity;q=0").reduced(),
            Some(HeaderValue::from_static("gzip,identity;q=0"))
        );
    }

    #[test]
    fn a_stored_coding_goes_only_to_requests_that_accept_it() {
        let req = |ae: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(ae) = ae {
                h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(ae).expect("value"));
            }
            h
        };
        let gz = HeaderValue::from_static("gzip");
        assert!(accepts_stored(&req(Some("gzip, br")), Some(&gz)));
        assert!(!accepts_stored(&req(Some("br")), Some(&gz)));
        assert!(!accepts_stored(&req(Some("gzip;q=0, br")), Some(&gz)));
        assert!(!accepts_stored(&req(None), Some(&gz)));
        assert!(accepts_stored(&req(None), None));
        assert!(accepts_stored(
            &req(Some("identity")),
            Some(&HeaderValue::from_static("identity"))
        ));
        let unknown = HeaderValue::from_static("x-exotic");
        assert!(!accepts_stored(&req(Some("gzip")), Some(&unknown)));
        assert!(accepts_stored(&req(Some("x-exotic")), Some(&unknown)));
        assert!(!accepts_stored(&req(Some("x-exotic;q=0, *")), Some(&unknown)));
        assert!(accepts_stored(&req(Some("*")), Some(&unknown)));
        let both = HeaderValue::from_static("gzip, br");
        assert!(accepts_stored(&req(Some("br, gzip")), Some(&both)));
        assert!(!accepts_stored(&req(Some("br")), Some(&both)));
    }

    #[test]
    fn a_variant_has_its_own_validator_and_head() {
        let strong = HeaderValue::from_static("\"abc\"");
        assert_eq!(
            variant_etag(&strong, Coding::Br),
            Some(HeaderValue::from_static("\"abc-br\""))
        );
        let weak = HeaderValue::from_static("W/\"abc\"");
        assert_eq!(
            variant_etag(&weak, Coding::Gzip),
            Some(HeaderValue::from_static("W/\"abc-gzip\""))
        );
        assert_eq!(variant_etag(&HeaderValue::from_static("abc"), Coding::Br), None);

        let mut h = HeaderMap::new();
        h.insert(header::ETAG, strong);
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(1000u64));
        h.insert("content-digest", HeaderValue::from_static("sha-256=:AAAA:"));
        h.insert("content-md5", HeaderValue::from_static("Q2hlY2sgSW50ZWdyaXR5IQ=="));
        variant_head(&mut h, Coding::Zstd, 321);
        assert!(!h.contains_key("content-digest") && !h.contains_key("content-md5"));
        assert_eq!(h[header::CONTENT_ENCODING], "zstd");
        assert_eq!(h[header::CONTENT_LENGTH], "321");
        assert_eq!(h[header::ETAG], "\"abc-zstd\"");
        assert!(!h.contains_key(header::ACCEPT_RANGES));
        let vary: Vec<_> = h.get_all(header::VARY).iter().collect();
        assert_eq!(vary, ["Origin", "Accept-Encoding"]);
        // Listed already (any case), or `*`: not added again.
        vary_on_accept_encoding(&mut h);
        assert_eq!(h.get_all(header::VARY).iter().count(), 2);
        let mut star = HeaderMap::new();
        star.insert(header::VARY, HeaderValue::from_static("*"));
        vary_on_accept_encoding(&mut star);
        assert_eq!(star.get_all(header::VARY).iter().count(), 1);
    }
}
