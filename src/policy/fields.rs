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

/// Whether a field value is a Structured Field Dictionary (RFC 8941 §3.2, §4.2.2), as a
/// targeted cache-control field must be (RFC 9213 §2.1): members `key[=item][;param...]`
/// separated by commas with optional whitespace, lower-case keys, items that are integers,
/// decimals, strings, tokens, byte sequences, booleans or inner lists. Nothing else (no space
/// around `=`, no upper-case key, no stray characters).
pub fn is_dictionary(value: &str) -> bool {
    let value = value.trim_matches(' ');
    if value.is_empty() {
        return false;
    }
    let mut rest = value.as_bytes();
    loop {
        let Some(after_key) = key(rest) else { return false };
        rest = after_key;
        if let Some(after_eq) = rest.strip_prefix(b"=") {
            let item = if after_eq.first() == Some(&b'(') {
                inner_list(after_eq)
            } else {
                bare_item(after_eq)
            };
            let Some(after_item) = item else { return false };
            rest = after_item;
        }
        let Some(after_params) = parameters(rest) else {
            return false;
        };
        rest = trim_ows(after_params);
        match rest.split_first() {
            None => return true,
            Some((b',', after)) => {
                rest = trim_ows(after);
                if rest.is_empty() {
                    return false;
                }
            }
            Some(_) => return false,
        }
    }
}

fn trim_ows(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|b| matches!(b, b' ' | b'\t')).count();
    &s[n..]
}

/// An SF key: `( lcalpha / "*" ) *( lcalpha / DIGIT / "_" / "-" / "." / "*" )`.
fn key(s: &[u8]) -> Option<&[u8]> {
    let first = *s.first()?;
    if !(first.is_ascii_lowercase() || first == b'*') {
        return None;
    }
    let n = s
        .iter()
        .take_while(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.' | b'*'))
        .count();
    Some(&s[n..])
}

/// `*( ";" *SP key [ "=" bare-item ] )`.
fn parameters(mut s: &[u8]) -> Option<&[u8]> {
    while let Some(after) = s.strip_prefix(b";") {
        s = key(trim_sp(after))?;
        if let Some(after_eq) = s.strip_prefix(b"=") {
            s = bare_item(after_eq)?;
        }
    }
    Some(s)
}

fn trim_sp(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|b| **b == b' ').count();
    &s[n..]
}

/// `"(" *SP [ sf-item *( 1*SP sf-item ) *SP ] ")" parameters`.
fn inner_list(s: &[u8]) -> Option<&[u8]> {
    let mut s = s.strip_prefix(b"(")?;
    loop {
        s = trim_sp(s);
        if let Some(after) = s.strip_prefix(b")") {
            return parameters(after);
        }
        s = parameters(bare_item(s)?)?;
        if !matches!(s.first(), Some(b' ' | b')')) {
            return None;
        }
    }
}

/// One bare item: integer, decimal, string, token, byte sequence or boolean (RFC 8941 §3.3).
fn bare_item(s: &[u8]) -> Option<&[u8]> {
    match *s.first()? {
        b'-' | b'0'..=b'9' => {
            let body = s.strip_prefix(b"-").unwrap_or(s);
            let int = body.iter().take_while(|b| b.is_ascii_digit()).count();
            if int == 0 || int > 15 {
                return None;
            }
            let after = &body[int..];
            match after.strip_prefix(b".") {
                Some(frac) => {
                    let n = frac.iter().take_while(|b| b.is_ascii_digit()).count();
                    (int <= 12 && (1..=3).contains(&n)).then_some(&frac[n..])
                }
                None => Some(after),
            }
        }
        b'"' => {
            let mut i = 1;
            while i < s.len() {
                match s[i] {
                    b'\\' if matches!(s.get(i + 1), Some(b'"' | b'\\')) => i += 2,
                    b'"' => return Some(&s[i + 1..]),
                    0x20..=0x7e if s[i] != b'\\' => i += 1,
                    _ => return None,
                }
            }
            None
        }
        b'?' => match s.get(1) {
            Some(b'0' | b'1') => Some(&s[2..]),
            _ => None,
        },
        b':' => {
            let body = &s[1..];
            let n = body
                .iter()
                .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
                .count();
            body[n..].strip_prefix(b":")
        }
        c if c.is_ascii_alphabetic() || c == b'*' => {
            let tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:/".contains(b);
            let n = 1 + s[1..].iter().take_while(|b| tchar(b)).count();
            Some(&s[n..])
        }
        _ => None,
    }
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

    /// RFC 8941 §4.2.2 dictionaries, as RFC 9213 §2.1 requires of targeted fields.
    #[test]
    fn structured_dictionaries_are_told_from_other_text() {
        for ok in [
            "max-age=3600",
            "public, max-age=600",
            "no-store",
            "foobar, max-age=3600",
            "max-age=99999999999",
            "a=?1, b=\"x,y\", c=tok/en:1, d=:aGk=:, e=1.5, f=(x y);p=1, g;q=2",
            " max-age=1 ,\tno-cache ",
        ] {
            assert!(is_dictionary(ok), "{ok}");
        }
        for bad in [
            "",
            "max-age=10000, &&&&&",
            "max-age =100",
            "max-age= 100",
            "MaX-aGe=3600",
            "max-age=1,",
            "max-age=1 no-store",
            "a=\"unterminated",
            "a=1234567890123456",
            "a=1.2345",
        ] {
            assert!(!is_dictionary(bad), "{bad}");
        }
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
