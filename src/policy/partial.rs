//! Partial content (RFC 9111 §3.3 and §3.4, RFC 9110 §14.4 and §15.3.7): a 206 the app sent
//! for one byte range is stored as what it is, a span of its representation, and answers later
//! requests for ranges that lie inside it. It never answers a request for the whole
//! representation, nor for a range reaching outside it: those are asked of the app, whose
//! answer replaces the span.

use http::header::{self, HeaderMap};
use http::{Method, StatusCode};

use super::{NotStorable, RangeAnswer, range, storable_status};

/// The bytes `first..=last` of a representation of `complete` bytes: what one stored 206 holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Its first byte's position in the representation.
    pub first: u64,
    /// Its last byte's position (inclusive).
    pub last: u64,
    /// The representation's whole length.
    pub complete: u64,
}

impl Span {
    /// The span a 206 holds, from its one `Content-Range` (RFC 9110 §14.4):
    /// `bytes first-last/complete` with `first <= last < complete`. `None` for anything else:
    /// no field or several, another unit, an unknown complete length (`*`), a 416's
    /// `bytes */len`, numbers out of order or that do not parse. (`multipart/byteranges`
    /// carries no `Content-Range` of its own, so it never has a span.)
    pub fn of(headers: &HeaderMap) -> Option<Span> {
        let mut fields = headers.get_all(header::CONTENT_RANGE).iter();
        let (value, None) = (fields.next()?, fields.next()) else {
            return None;
        };
        let rest = value.to_str().ok()?.trim().strip_prefix("bytes ")?;
        let (range, complete) = rest.trim_start().split_once('/')?;
        let (first, last) = range.split_once('-')?;
        let num = |s: &str| -> Option<u64> {
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse().ok())
                .flatten()
        };
        let span = Span {
            first: num(first)?,
            last: num(last)?,
            complete: num(complete)?,
        };
        (span.first <= span.last && span.last < span.complete).then_some(span)
    }

    /// How many bytes it holds.
    pub fn length(&self) -> u64 {
        self.last - self.first + 1
    }

    /// What a body of `len` bytes under this `Content-Range` holds: its first `len` bytes, from
    /// `first` on. `None` for an empty body or one longer than the range. (A 206 whose
    /// `Content-Length` is less than its range is framed complete at that length, RFC 9112
    /// §6.3: it carries the start of the range, which §3.3 lets a cache keep as an incomplete
    /// response; a body longer than its range names bytes nobody asked for.)
    pub fn holding(self, len: u64) -> Option<Span> {
        (len > 0 && len <= self.length()).then(|| Span {
            last: self.first + len - 1,
            ..self
        })
    }

    /// The part of the representation to answer a request with, `(first, last)`: the
    /// request's one `bytes` range, resolved against the complete length, its `If-Range`
    /// satisfied by the stored validators (RFC 9110 §13.1.5), when this span holds all of it;
    /// or, for an open range (`bytes=N-`, "from N on") that starts inside the span, the rest
    /// of the span: a 206 may enclose less than was asked, and its `Content-Range` says what
    /// (RFC 9110 §15.3.7; players ask for the next part from where it ends). `None` when the
    /// request asks for the whole representation (no `Range`, several ranges, another unit,
    /// an `If-Range` that does not match), for bytes outside the span, for the last bytes
    /// (`bytes=-N`) it does not hold, or for none at all.
    pub fn answers(&self, req: &HeaderMap, stored: &HeaderMap) -> Option<(u64, u64)> {
        match range(req, stored, self.complete) {
            RangeAnswer::Partial(first, last) if self.first <= first && last <= self.last => Some((first, last)),
            RangeAnswer::Partial(first, _) if self.first <= first && first <= self.last && open(req) => {
                Some((first, self.last))
            }
            _ => None,
        }
    }
}

/// Whether a request's range is open, `bytes=N-`: everything from `N` on.
fn open(req: &HeaderMap) -> bool {
    req.get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().strip_prefix("bytes="))
        .is_some_and(|spec| {
            let spec = spec.trim();
            spec.ends_with('-') && spec.starts_with(|c: char| c.is_ascii_digit())
        })
}

/// RFC 9111 §3.3: may this answer be stored as a span, and which? A 206 to a request that
/// asked for a range, holding one range of a known complete length (`Content-Range`), with a
/// `Content-Length` (so the bytes stored are the ones it frames: [`Span::holding`]), that any
/// answer could be stored for (§3: method, directives, credentials, `Vary`, cookies,
/// freshness; [`storable_status`]). The span returned is what the body holds.
pub fn storable(
    method: &Method,
    req_headers: &HeaderMap,
    status: StatusCode,
    resp_headers: &HeaderMap,
) -> Result<Span, NotStorable> {
    if status != StatusCode::PARTIAL_CONTENT {
        return Err(NotStorable::Status);
    }
    if !req_headers.contains_key(header::RANGE) {
        return Err(NotStorable::Partial);
    }
    let span = Span::of(resp_headers).ok_or(NotStorable::Partial)?;
    let mut lengths = resp_headers.get_all(header::CONTENT_LENGTH).iter();
    let length = match (lengths.next(), lengths.next()) {
        (Some(v), None) => v.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()),
        _ => None,
    };
    let held = length.and_then(|len| span.holding(len)).ok_or(NotStorable::Partial)?;
    storable_status(method, req_headers, status, resp_headers)?;
    Ok(held)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::headers;

    /// RFC 9110 §14.4: `Content-Range` of a 206 is `bytes first-last/complete`; what is not a
    /// known span of a known length is none.
    #[test]
    fn a_span_is_read_from_one_content_range_of_a_known_length() {
        let span = |v: &[&str]| Span::of(&headers(&v.iter().map(|v| ("content-range", *v)).collect::<Vec<_>>()));
        let s = |first, last, complete| Some(Span { first, last, complete });
        assert_eq!(span(&["bytes 4-9/10"]), s(4, 9, 10));
        assert_eq!(span(&["bytes 0-0/1"]), s(0, 0, 1));
        assert_eq!(span(&["  bytes 0-4/10 "]), s(0, 4, 10));
        assert_eq!(span(&["bytes 4-9/10"]).unwrap().length(), 6);
        for bad in [
            "bytes 4-9/*",
            "bytes */10",
            "bytes 9-4/10",
            "bytes 4-10/10",
            "bytes 4-/10",
            "bytes -4/10",
            "bytes +4-9/10",
            "items 4-9/10",
            "bytes 4-9/99999999999999999999999",
            "bytes=4-9/10",
            "",
        ] {
            assert_eq!(span(&[bad]), None, "{bad:?}");
        }
        assert_eq!(span(&[]), None);
        assert_eq!(span(&["bytes 0-4/10", "bytes 5-9/10"]), None, "two fields: which?");
    }

    /// RFC 9111 §3.4 and RFC 9110 §14.2: a stored span answers a single range inside it,
    /// resolved against the complete length, and nothing else.
    #[test]
    fn a_span_answers_only_ranges_it_holds() {
        let span = Span {
            first: 4,
            last: 9,
            complete: 10,
        };
        let stored = headers(&[("etag", "\"v1\"")]);
        type Row<'a> = (&'a [(&'a str, &'a str)], Option<(u64, u64)>);
        let rows: &[Row] = &[
            (&[("range", "bytes=-5")], Some((5, 9))),
            (&[("range", "bytes=-6")], Some((4, 9))),
            (&[("range", "bytes=6-8")], Some((6, 8))),
            (&[("range", "bytes=6-")], Some((6, 9))),
            (&[("range", "bytes=6-100")], Some((6, 9))),
            (&[("range", "bytes=-1")], Some((9, 9))),
            (&[("range", "bytes=4-9")], Some((4, 9))),
            // Outside the span, or only partly inside it.
            (&[("range", "bytes=0-4")], None),
            (&[("range", "bytes=3-5")], None),
            (&[("range", "bytes=-7")], None),
            // Beyond the end: the app says what that is.
            (&[("range", "bytes=10-")], None),
            // The whole representation, or what is answered with it.
            (&[], None),
            (&[("range", "bytes=4-5,7-8")], None),
            (&[("range", "items=4-5")], None),
            (&[("range", "bytes=6-8"), ("if-range", "\"v0\"")], None),
            (&[("range", "bytes=6-8"), ("if-range", "W/\"v1\"")], None),
            (&[("range", "bytes=6-8"), ("if-range", "\"v1\"")], Some((6, 8))),
        ];
        for (req, want) in rows {
            assert_eq!(span.answers(&headers(req), &stored), *want, "{req:?}");
        }
        // A body shorter than its range holds its start: an open range gets what it holds
        // (RFC 9110 §15.3.7), a closed one or the last bytes not held go to the app.
        let held = span.holding(5).unwrap();
        assert_eq!(
            held,
            Span {
                first: 4,
                last: 8,
                complete: 10
            }
        );
        let rows: &[(&str, Option<(u64, u64)>)] = &[
            ("bytes=6-8", Some((6, 8))),
            ("bytes=6-", Some((6, 8))),
            ("bytes=4-", Some((4, 8))),
            ("bytes=6-9", None),
            ("bytes=9-", None),
            ("bytes=3-", None),
            ("bytes=-1", None),
            ("bytes=-5", None),
        ];
        for (range, want) in rows {
            assert_eq!(held.answers(&headers(&[("range", range)]), &stored), *want, "{range}");
        }
        assert_eq!(span.holding(0), None);
        assert_eq!(span.holding(7), None, "more bytes than the range names");
        assert_eq!(span.holding(6), Some(span));
    }

    /// RFC 9111 §3.3: a 206 is stored as a span only when it is one range of a known length,
    /// its body exactly that range, answering a request for a range, and storable as any
    /// answer is (§3: `private`, `no-store`, cookies, credentials still hold).
    #[test]
    fn a_partial_answer_is_stored_only_as_one_exact_span() {
        let ranged = headers(&[("range", "bytes=-5")]);
        let ok = [
            ("cache-control", "max-age=3600"),
            ("content-range", "bytes 4-9/10"),
            ("content-length", "6"),
        ];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut h = ok.to_vec();
            h.extend_from_slice(extra);
            headers(&h)
        };
        let store = |req: &HeaderMap, status: u16, resp: &HeaderMap| {
            storable(&Method::GET, req, StatusCode::from_u16(status).unwrap(), resp)
        };
        assert_eq!(
            store(&ranged, 206, &with(&[])),
            Ok(Span {
                first: 4,
                last: 9,
                complete: 10
            })
        );
        assert_eq!(store(&ranged, 200, &with(&[])), Err(NotStorable::Status));
        assert_eq!(
            storable(&Method::HEAD, &ranged, StatusCode::PARTIAL_CONTENT, &with(&[])),
            Err(NotStorable::Method)
        );
        assert_eq!(
            store(&HeaderMap::new(), 206, &with(&[])),
            Err(NotStorable::Partial),
            "nothing asked for a range"
        );
        let framed = |len: &'static str| {
            headers(&[
                ("cache-control", "max-age=3600"),
                ("content-range", "bytes 4-9/10"),
                ("content-length", len),
            ])
        };
        assert_eq!(
            store(&ranged, 206, &framed("5")),
            Ok(Span {
                first: 4,
                last: 8,
                complete: 10
            }),
            "the start of the range"
        );
        assert_eq!(
            store(&ranged, 206, &framed("7")),
            Err(NotStorable::Partial),
            "longer than the range"
        );
        assert_eq!(
            store(&ranged, 206, &framed("0")),
            Err(NotStorable::Partial),
            "nothing held"
        );
        assert_eq!(store(&ranged, 206, &framed("x")), Err(NotStorable::Partial));
        let unknown = headers(&[
            ("cache-control", "max-age=3600"),
            ("content-range", "bytes 4-9/*"),
            ("content-length", "6"),
        ]);
        assert_eq!(
            store(&ranged, 206, &unknown),
            Err(NotStorable::Partial),
            "complete length unknown"
        );
        let chunked = headers(&[("cache-control", "max-age=3600"), ("content-range", "bytes 4-9/10")]);
        assert_eq!(store(&ranged, 206, &chunked), Err(NotStorable::Partial), "no length");
        let multipart = headers(&[
            ("cache-control", "max-age=3600"),
            ("content-type", "multipart/byteranges; boundary=x"),
            ("content-length", "200"),
        ]);
        assert_eq!(store(&ranged, 206, &multipart), Err(NotStorable::Partial));
        assert_eq!(
            store(&ranged, 206, &with(&[("cache-control", "private")])),
            Err(NotStorable::Private)
        );
        assert_eq!(
            store(&ranged, 206, &with(&[("cache-control", "no-store")])),
            Err(NotStorable::NoStore)
        );
        assert_eq!(
            store(&ranged, 206, &with(&[("set-cookie", "a=b")])),
            Err(NotStorable::SetCookie)
        );
        assert_eq!(store(&ranged, 206, &with(&[("vary", "*")])), Err(NotStorable::VaryStar));
        let authorized = headers(&[("range", "bytes=-5"), ("authorization", "Basic eDp5")]);
        assert_eq!(store(&authorized, 206, &with(&[])), Err(NotStorable::Authorization));
        let session = headers(&[("range", "bytes=-5"), ("cookie", "s=1")]);
        let heuristic = headers(&[
            ("last-modified", "Sat, 01 Jan 2022 00:00:00 GMT"),
            ("content-range", "bytes 4-9/10"),
            ("content-length", "6"),
        ]);
        assert_eq!(store(&session, 206, &heuristic), Err(NotStorable::Credentials));
        assert!(
            store(&ranged, 206, &heuristic).is_ok(),
            "206 is heuristically cacheable (RFC 9110 §15.1)"
        );
    }
}
