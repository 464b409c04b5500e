//! Cache-Control, Range/If-Range, Content-Range, conditional and Vary parsing over arbitrary
//! header values: never a panic, a partial range always lies inside the body, and what a
//! stored span answers always lies inside what it holds.
#![no_main]
use http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use sidecache::policy::{self, CacheControl, RangeAnswer};

const NAMES: [&str; 13] = [
    "cache-control", "range", "if-range", "if-none-match", "if-modified-since", "etag",
    "last-modified", "accept-encoding", "sidecache-cache-control", "vary", "age",
    "accept-language", "content-range",
];

fuzz_target!(|data: &[u8]| {
    let Some((&len_byte, rest)) = data.split_first() else { return };
    let mut headers = HeaderMap::new();
    for (i, part) in rest.split(|b| *b == b'\n').enumerate() {
        if let Ok(v) = HeaderValue::from_bytes(part) {
            headers.append(HeaderName::from_static(NAMES[i % NAMES.len()]), v);
        }
    }
    let _ = CacheControl::parse(&headers);
    let _ = policy::response_directives(&headers);
    let _ = policy::answers_not_modified(&headers, &headers);
    let _ = policy::vary::normalize(&http::header::ACCEPT_ENCODING, &headers);
    let _ = policy::Vary::parse(&headers).values(&headers);
    let _ = policy::vary::normalize(&http::header::ACCEPT_LANGUAGE, &headers);
    let _ = policy::age(&headers);
    let len = u64::from(len_byte) * 97;
    match policy::range(&headers, &headers, len) {
        RangeAnswer::Partial(start, end) => assert!(start <= end && end < len, "{start}-{end} of {len}"),
        RangeAnswer::Full | RangeAnswer::Unsatisfiable => {}
    }
    if let Some(held) = policy::partial::Span::of(&headers).and_then(|s| s.holding(len)) {
        assert!(held.first <= held.last && held.last < held.complete && held.length() == len);
        if let Some((first, last)) = held.answers(&headers, &headers) {
            assert!(held.first <= first && first <= last && last <= held.last, "{first}-{last} of {held:?}");
        }
    }
});
