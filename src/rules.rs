//! Static-asset rules for apps that send no caching headers: per path glob, bypass the cache,
//! give a default TTL, or force one; fingerprinted file names are immutable; which query
//! parameters count in the key. Pure: no I/O.
//!
//! A rule's TTL is applied by adding a `Sidecache-Cache-Control` directive to the stored copy
//! (RFC 9213 targeted field), so freshness, storability and revalidation stay in `policy`, and
//! the directive never reaches clients.

use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use serde::Deserialize;

use crate::config::HumanDuration;
use crate::policy;

/// One rule as written in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    /// A path glob: `*` within one segment, `**` across segments, `?` one character. Without a
    /// leading `/` it matches the file name (`*.css`).
    #[serde(rename = "match")]
    pub pattern: String,
    /// Never cache these paths.
    #[serde(default)]
    pub bypass: bool,
    /// Freshness for responses that give none.
    pub ttl: Option<HumanDuration>,
    /// Freshness whatever the response says (still never for Set-Cookie or Authorization).
    pub force_ttl: Option<HumanDuration>,
    /// Remove `Set-Cookie` from these responses so they can be stored.
    #[serde(default)]
    pub strip_set_cookie: bool,
}

/// A compiled rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pattern: String,
    file_name_only: bool,
    /// Never cache.
    pub bypass: bool,
    /// Default freshness.
    pub ttl: Option<Duration>,
    /// Forced freshness.
    pub force_ttl: Option<Duration>,
    /// Strip `Set-Cookie` before storing.
    pub strip_set_cookie: bool,
}

impl Rule {
    /// Validates a rule.
    pub fn compile(raw: RawRule) -> Result<Rule, String> {
        if raw.pattern.is_empty() {
            return Err("`match` is empty".into());
        }
        if raw.bypass && (raw.ttl.is_some() || raw.force_ttl.is_some() || raw.strip_set_cookie) {
            return Err("`bypass` cannot be combined with `ttl`, `force_ttl` or `strip_set_cookie`".into());
        }
        if raw.ttl.is_some() && raw.force_ttl.is_some() {
            return Err("give `ttl` or `force_ttl`, not both".into());
        }
        if !raw.bypass && raw.ttl.is_none() && raw.force_ttl.is_none() && !raw.strip_set_cookie {
            return Err("a rule needs `bypass`, `ttl`, `force_ttl` or `strip_set_cookie`".into());
        }
        Ok(Rule {
            file_name_only: !raw.pattern.starts_with('/'),
            pattern: raw.pattern,
            bypass: raw.bypass,
            ttl: raw.ttl.map(|d| d.0),
            force_ttl: raw.force_ttl.map(|d| d.0),
            strip_set_cookie: raw.strip_set_cookie,
        })
    }

    /// Whether the rule applies to this path (no query string).
    pub fn matches(&self, path: &str) -> bool {
        let subject = if self.file_name_only {
            path.rsplit('/').next().unwrap_or(path)
        } else {
            path
        };
        glob(self.pattern.as_bytes(), subject.as_bytes())
    }
}

/// The first rule matching `path`.
pub fn find<'a>(rules: &'a [Rule], path: &str) -> Option<&'a Rule> {
    rules.iter().find(|r| r.matches(path))
}

/// Glob matching: `**` any run of bytes, `*` any run without `/`, `?` one byte but `/`.
fn glob(p: &[u8], s: &[u8]) -> bool {
    match p.first() {
        None => s.is_empty(),
        Some(b'*') if p.get(1) == Some(&b'*') => {
            let rest = &p[2..];
            (0..=s.len()).any(|i| glob(rest, &s[i..]))
        }
        Some(b'*') => {
            let rest = &p[1..];
            for i in 0..=s.len() {
                if glob(rest, &s[i..]) {
                    return true;
                }
                if i < s.len() && s[i] == b'/' {
                    return false;
                }
            }
            false
        }
        Some(b'?') => !s.is_empty() && s[0] != b'/' && glob(&p[1..], &s[1..]),
        Some(c) => s.first() == Some(c) && glob(&p[1..], &s[1..]),
    }
}

/// Whether the file name carries a content hash (`app-3f2a9c81.js`, `main.5e7a1b2c9d.css`,
/// `index-BX3a9_kZ.js`): such URLs never change content, so they are treated as immutable.
pub fn is_fingerprinted(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    let Some((stem, ext)) = name.rsplit_once('.') else {
        return false;
    };
    if ext.is_empty() || ext.len() > 8 {
        return false;
    }
    let Some(hash) = stem.rsplit(['-', '.']).next().filter(|h| h.len() < stem.len()) else {
        return false;
    };
    let hexlike = hash.len() >= 16 && hash.bytes().all(|b| b.is_ascii_hexdigit());
    let tokenlike = (8..=64).contains(&hash.len())
        && hash
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        && hash.bytes().any(|b| b.is_ascii_digit())
        && hash.bytes().any(|b| b.is_ascii_alphabetic());
    hexlike || tokenlike
}

/// File extensions of static assets: a rule never makes HTML cacheable under one of these
/// (web cache deception: `/account/settings.php/x.css` served as the account page).
const STATIC_EXTENSIONS: &[&str] = &[
    "css", "js", "mjs", "map", "png", "jpg", "jpeg", "gif", "webp", "avif", "svg", "ico", "woff", "woff2", "ttf",
    "otf", "eot", "mp4", "webm", "mp3", "wasm", "json", "txt", "xml", "pdf", "zip",
];

/// Adds the freshness a rule (or fingerprinting) gives to a response about to be stored, and
/// strips `Set-Cookie` if the rule says so. Returns what was applied, for logs.
pub fn apply(
    rule: Option<&Rule>,
    fingerprinted_ttl: Duration,
    path: &str,
    headers: &mut HeaderMap,
) -> Option<&'static str> {
    if rule.is_some_and(|r| r.strip_set_cookie) {
        headers.remove(header::SET_COOKIE);
    }
    let (cc, targeted) = policy::response_directives(headers);
    let explicit = targeted || cc.max_age.is_some() || cc.s_maxage.is_some() || headers.contains_key(header::EXPIRES);
    let (ttl, why) = match (rule.and_then(|r| r.force_ttl), rule.and_then(|r| r.ttl)) {
        (Some(force), _) => (force, "force_ttl"),
        (None, Some(ttl)) if !explicit => (ttl, "ttl"),
        _ if !explicit && !fingerprinted_ttl.is_zero() && is_fingerprinted(path) => {
            (fingerprinted_ttl, "fingerprinted")
        }
        _ => return None,
    };
    if looks_like_deception(path, headers) {
        return None;
    }
    let directive = format!("max-age={}", ttl.as_secs());
    headers.insert(
        &policy::SIDECACHE_CACHE_CONTROL,
        HeaderValue::from_str(&directive).ok()?,
    );
    Some(why)
}

/// HTML under a static-asset extension: the app ignored the suffix and answered with a page.
fn looks_like_deception(path: &str, headers: &HeaderMap) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    let static_ext = ext.is_some_and(|e| STATIC_EXTENSIONS.contains(&e.as_str()));
    let html = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.trim_start().to_ascii_lowercase().starts_with("text/html"));
    static_ext && html
}

/// Rewrites a query string for the cache key: parameters kept by `mode`, sorted.
pub fn key_query(query: &str, mode: &QueryKey) -> String {
    let mut pairs: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter(|p| {
            let name = p.split('=').next().unwrap_or("");
            match mode {
                QueryKey::All => true,
                QueryKey::None => false,
                QueryKey::Allow(names) => names.iter().any(|n| n == name),
                QueryKey::Deny(names) => !names.iter().any(|n| n == name),
            }
        })
        .collect();
    pairs.sort_unstable();
    pairs.join("&")
}

/// Which query parameters are part of the cache key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum QueryKey {
    /// All of them (sorted).
    #[default]
    All,
    /// None: the query string is ignored.
    None,
    /// Only these.
    Allow(Vec<String>),
    /// All but these.
    Deny(Vec<String>),
}

/// `query:` as written in the config: `all`, `none`, `{allow: [...]}` or `{deny: [...]}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawQueryKey {
    /// `all` or `none`.
    Word(String),
    /// `{allow: [...]}`.
    Allow {
        /// Kept parameters.
        allow: Vec<String>,
    },
    /// `{deny: [...]}`.
    Deny {
        /// Dropped parameters.
        deny: Vec<String>,
    },
}

impl RawQueryKey {
    /// Validates.
    pub fn compile(self) -> Result<QueryKey, String> {
        match self {
            RawQueryKey::Word(w) if w == "all" => Ok(QueryKey::All),
            RawQueryKey::Word(w) if w == "none" => Ok(QueryKey::None),
            RawQueryKey::Word(w) => Err(format!("`{w}`: use all, none, {{allow: [...]}} or {{deny: [...]}}")),
            RawQueryKey::Allow { allow } => Ok(QueryKey::Allow(allow)),
            RawQueryKey::Deny { deny } => Ok(QueryKey::Deny(deny)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pattern: &str) -> Rule {
        Rule::compile(RawRule {
            pattern: pattern.into(),
            bypass: true,
            ttl: None,
            force_ttl: None,
            strip_set_cookie: false,
        })
        .unwrap()
    }

    #[test]
    fn globs_match_segments_and_file_names() {
        let rows = [
            ("/api/**", "/api/v1/users", true),
            ("/api/**", "/apix", false),
            ("/assets/*", "/assets/app.js", true),
            ("/assets/*", "/assets/img/a.png", false),
            ("/assets/**/*.png", "/assets/img/x/a.png", true),
            ("*.css", "/deep/dir/site.css", true),
            ("*.css", "/deep/dir/site.css.map", false),
            ("/file-?.js", "/file-1.js", true),
            ("/file-?.js", "/file-12.js", false),
        ];
        for (pattern, path, want) in rows {
            assert_eq!(rule(pattern).matches(path), want, "{pattern} ~ {path}");
        }
    }

    #[test]
    fn fingerprinted_names_are_recognised() {
        for yes in [
            "/assets/app-3f2a9c81.js",
            "/static/js/main.5e7a1b2c.chunk.js.map/x/main.5e7a1b2c9d0e1f2a.js",
            "/assets/index-BX3a9_kZ.js",
            "/application-5f1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5.css",
        ] {
            assert!(is_fingerprinted(yes), "{yes}");
        }
        for no in [
            "/app.js",
            "/app-settings.js",
            "/favicon.ico",
            "/assets/",
            "/v1-2.js",
            "/README",
        ] {
            assert!(!is_fingerprinted(no), "{no}");
        }
    }

    #[test]
    fn rule_ttl_becomes_a_targeted_directive_only_where_allowed() {
        let day = Duration::from_secs(86_400);
        let ttl_rule = Rule::compile(RawRule {
            pattern: "/assets/**".into(),
            bypass: false,
            ttl: Some(HumanDuration(day)),
            force_ttl: None,
            strip_set_cookie: true,
        })
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert("set-cookie", HeaderValue::from_static("a=b"));
        h.insert("content-type", HeaderValue::from_static("text/css"));
        assert_eq!(
            apply(Some(&ttl_rule), Duration::ZERO, "/assets/a.css", &mut h),
            Some("ttl")
        );
        assert_eq!(h["sidecache-cache-control"], "max-age=86400");
        assert!(!h.contains_key("set-cookie"));
        // An explicit lifetime from the app wins over a default ttl.
        let mut h = HeaderMap::new();
        h.insert("cache-control", HeaderValue::from_static("max-age=5"));
        assert_eq!(apply(Some(&ttl_rule), Duration::ZERO, "/assets/a.css", &mut h), None);
        // Web cache deception: HTML under a .css name is never made cacheable.
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("text/html; charset=utf-8"));
        assert_eq!(
            apply(Some(&ttl_rule), Duration::ZERO, "/account.php/x.css", &mut h),
            None
        );
        // Fingerprinted names get the fingerprint TTL with no rule at all.
        let mut h = HeaderMap::new();
        assert_eq!(
            apply(None, day, "/assets/app-3f2a9c81.js", &mut h),
            Some("fingerprinted")
        );
    }

    #[test]
    fn query_keys_are_filtered_and_sorted() {
        assert_eq!(key_query("b=2&a=1", &QueryKey::All), "a=1&b=2");
        assert_eq!(key_query("b=2&a=1", &QueryKey::None), "");
        assert_eq!(
            key_query(
                "v=3&utm_source=x&lang=en",
                &QueryKey::Allow(vec!["v".into(), "lang".into()])
            ),
            "lang=en&v=3"
        );
        assert_eq!(
            key_query("v=3&utm_source=x", &QueryKey::Deny(vec!["utm_source".into()])),
            "v=3"
        );
    }

    #[test]
    fn invalid_rules_are_refused() {
        let bad = |bypass, ttl: Option<u64>, force: Option<u64>| {
            Rule::compile(RawRule {
                pattern: "/x".into(),
                bypass,
                ttl: ttl.map(|s| HumanDuration(Duration::from_secs(s))),
                force_ttl: force.map(|s| HumanDuration(Duration::from_secs(s))),
                strip_set_cookie: false,
            })
            .is_err()
        };
        assert!(bad(true, Some(1), None));
        assert!(bad(false, Some(1), Some(1)));
        assert!(bad(false, None, None));
    }
}
