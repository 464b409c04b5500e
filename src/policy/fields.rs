//! The one parser of comma-separated field lists (RFC 9110 §5.6.1): `Cache-Control`, `Vary`,
//! `Pragma`, `Age`, `If-None-Match`, `Accept-*`, `Content-Encoding` are all read through it.
//!
//! Pure; no allocation. Commas inside quoted strings (RFC 9110 §5.6.4) do not split; empty
//! elements (`a, , b`) are skipped and each element is trimmed of optional whitespace.

use http::header::{HeaderMap, HeaderName, HeaderValue};

/// The elements of one field line, split on commas outside quoted strings.
pub fn split(line: &str) -> Elements<'_> {
    Elements { rest: Some(line) }
}

/// The elements of every line of a field, in order; a line that is not visible ASCII text is
/// skipped (see [`elements_or_unreadable`] where skipping would be unsafe).
pub fn elements<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(name)
        .iter()
        .filter_map(|line| line.to_str().ok())
        .flat_map(split)
}

/// The elements of every line of a field; `None` when a line is not text, for fields whose
/// unread part must not be ignored (`Vary`: a name left out would merge two users' variants).
pub fn elements_or_unreadable<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<Vec<&'a str>> {
    let mut out = Vec::new();
    for line in headers.get_all(name) {
        out.extend(split(text(line)?));
    }
    Some(out)
}

/// A line as text, if it is.
fn text(line: &HeaderValue) -> Option<&str> {
    line.to_str().ok()
}

/// Whether a field lists `token` (ASCII case-insensitive), ignoring any parameters after `;`.
pub fn contains_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    elements(headers, name).any(|e| element_token(e).eq_ignore_ascii_case(token))
}

/// An element without its parameters (`gzip;q=0.5` -> `gzip`), trimmed.
pub fn element_token(element: &str) -> &str {
    element.split(';').next().unwrap_or("").trim()
}

/// Iterator over a line's elements (see [`split`]).
#[derive(Debug, Clone)]
pub struct Elements<'a> {
    rest: Option<&'a str>,
}

impl<'a> Iterator for Elements<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        loop {
            let rest = self.rest?;
            let mut quoted = false;
            let mut escaped = false;
            let mut end = None;
            for (i, b) in rest.bytes().enumerate() {
                match b {
                    _ if escaped => escaped = false,
                    b'\\' if quoted => escaped = true,
                    b'"' => quoted = !quoted,
                    b',' if !quoted => {
                        end = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let element = match end {
                Some(i) => {
                    self.rest = Some(&rest[i + 1..]);
                    &rest[..i]
                }
                None => {
                    self.rest = None;
                    rest
                }
            };
            let element = element.trim_matches([' ', '\t']);
            if !element.is_empty() {
                return Some(element);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(lines: &[&'static str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append("x-list", HeaderValue::from_static(l));
        }
        h
    }

    /// RFC 9110 §5.6.1: lists are comma-separated, empty elements and optional whitespace are
    /// ignored, and lines of one field combine in order; §5.6.4: commas in quoted strings do
    /// not split.
    #[test]
    fn lists_split_on_commas_outside_quotes_across_lines() {
        let got: Vec<&str> = split(" a ,, b=\"x,y\" ,c\t, \"q\\\"t,\"").collect();
        assert_eq!(got, ["a", "b=\"x,y\"", "c", "\"q\\\"t,\""]);
        assert_eq!(split("").count(), 0);
        assert_eq!(split(" , ,").count(), 0);
        let name = HeaderName::from_static("x-list");
        let h = headers(&["a, b", "c"]);
        assert_eq!(elements(&h, &name).collect::<Vec<_>>(), ["a", "b", "c"]);
        assert!(contains_token(&h, &name, "B"));
        assert!(!contains_token(&h, &name, "d"));
        assert_eq!(element_token(" gzip ;q=0.5"), "gzip");
    }

    #[test]
    fn an_unreadable_line_is_reported_where_skipping_it_would_be_unsafe() {
        let name = HeaderName::from_static("x-list");
        let mut h = headers(&["a"]);
        h.append(&name, HeaderValue::from_bytes(b"b\xff").unwrap());
        assert_eq!(elements(&h, &name).collect::<Vec<_>>(), ["a"], "skipped");
        assert_eq!(elements_or_unreadable(&h, &name), None);
        assert_eq!(elements_or_unreadable(&headers(&["a, b"]), &name), Some(vec!["a", "b"]));
    }
}
