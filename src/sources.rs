//! The prime sources: the base URLs a prime may fill from instead of the app (`prime_sources`).
//!
//! `POST /prime?from=URL` makes the sidecar fetch and store what another server answers, under
//! the public cache key. Only URLs inside this allow-list are fetched, and a redirect is
//! followed only to a URL that is itself inside it, so the admin port can neither fetch
//! arbitrary (internal) addresses nor store a stranger's answer. This module owns the matching
//! and the
//! redirect policy of the client that fetches from sources; it does no I/O itself.

use std::fmt;
use std::sync::Arc;

use reqwest::Url;

/// Redirects followed from one source fetch, each to a URL inside the allow-list.
pub const MAX_SOURCE_REDIRECTS: usize = 5;

/// The allow-list: scheme, host and port compared exactly, the path as a prefix on a segment
/// boundary (`https://cdn.example.com/builds` admits `/builds/app.js`, not `/builds2/app.js`).
/// Empty (the default) admits nothing.
#[derive(Debug, Clone, Default)]
pub struct PrimeSources(Arc<[Url]>);

/// A URL the allow-list admitted: the only kind a fill from another source is sent to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceUrl(Url);

/// Why a URL was not admitted. The message names no query string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// Not an absolute http(s) URL.
    #[error("`from` is not an absolute http or https URL")]
    Malformed,
    /// A base URL carries a query or fragment, which a path cannot be appended to.
    #[error("`from` must be a base URL without query or fragment")]
    NotABase,
    /// No source is configured.
    #[error("no prime_sources are configured: add the source to prime_sources in the config")]
    NoneConfigured,
    /// Outside every configured source.
    #[error("{0} is not inside prime_sources: add it to prime_sources in the config")]
    Outside(String),
}

impl PrimeSources {
    /// Validates the configured entries: absolute http(s) URLs with a host, no credentials,
    /// no query or fragment, no encoded `/`, `\` or `.` in the path.
    pub fn parse(entries: &[String]) -> Result<PrimeSources, String> {
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            let url = Url::parse(entry.trim()).map_err(|e| format!("`{entry}`: {e}"))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(format!("`{entry}`: only http and https sources are supported"));
            }
            if url.host().is_none() {
                return Err(format!("`{entry}`: missing host"));
            }
            if !url.username().is_empty() || url.password().is_some() {
                return Err(format!("`{entry}`: credentials in a source URL are not supported"));
            }
            if url.query().is_some() || url.fragment().is_some() {
                return Err(format!("`{entry}`: a source is a base URL, without query or fragment"));
            }
            if has_encoded_separator(url.path()) {
                return Err(format!("`{entry}`: encoded `/`, `\\` or `.` in the path"));
            }
            out.push(url);
        }
        Ok(PrimeSources(out.into()))
    }

    /// True when no source is configured.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// True when `url` is inside one of the sources. `url` comes from `Url::parse`, so its dot
    /// segments are resolved and its host is in canonical form (lowercase, IDNA, IP literals).
    pub fn contains(&self, url: &Url) -> bool {
        if !url.username().is_empty() || url.password().is_some() || has_encoded_separator(url.path()) {
            return false;
        }
        self.0.iter().any(|source| {
            source.scheme() == url.scheme()
                && source.host() == url.host()
                && source.port_or_known_default() == url.port_or_known_default()
                && under(source.path(), url.path())
        })
    }

    /// Admits a `from` base URL: absolute, inside a source, without query or fragment.
    pub fn admit_base(&self, from: &str) -> Result<SourceUrl, SourceError> {
        let url = Url::parse(from).map_err(|_| SourceError::Malformed)?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(SourceError::Malformed);
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(SourceError::NotABase);
        }
        self.admit(url)
    }

    /// The URL a fill of `path_and_query` from `base` fetches, if it is inside a source:
    /// checked after parsing, so `..` segments cannot climb out of the base's prefix.
    pub fn join(&self, base: &SourceUrl, path_and_query: &str) -> Result<SourceUrl, SourceError> {
        let base = base.0.as_str().trim_end_matches('/');
        let joined = if path_and_query.starts_with('/') {
            format!("{base}{path_and_query}")
        } else {
            format!("{base}/{path_and_query}")
        };
        let url = Url::parse(&joined).map_err(|_| SourceError::Malformed)?;
        self.admit(url)
    }

    fn admit(&self, url: Url) -> Result<SourceUrl, SourceError> {
        if self.is_empty() {
            return Err(SourceError::NoneConfigured);
        }
        if self.contains(&url) {
            Ok(SourceUrl(url))
        } else {
            Err(SourceError::Outside(origin_of(&url)))
        }
    }

    /// The client that fetches from sources, with [`PrimeSources::redirect_policy`].
    pub fn client(&self) -> reqwest::Result<reqwest::Client> {
        crate::http_client().redirect(self.redirect_policy()).build()
    }

    /// The redirect policy of the client that fetches from sources: a redirect is followed
    /// only to a URL inside the allow-list, at most [`MAX_SOURCE_REDIRECTS`] times; any other
    /// redirect fails the fetch (nothing is stored, and the target is never contacted).
    pub fn redirect_policy(&self) -> reqwest::redirect::Policy {
        let sources = self.clone();
        reqwest::redirect::Policy::custom(move |attempt| {
            // `previous` starts with the first URL, which was not a redirect.
            if attempt.previous().len() > MAX_SOURCE_REDIRECTS {
                let error = format!("more than {MAX_SOURCE_REDIRECTS} redirects");
                attempt.error(error)
            } else if sources.contains(attempt.url()) {
                attempt.follow()
            } else {
                let error = format!(
                    "redirect to {} refused: outside prime_sources",
                    origin_of(attempt.url())
                );
                attempt.error(error)
            }
        })
    }
}

impl SourceUrl {
    /// The URL.
    pub fn as_url(&self) -> &Url {
        &self.0
    }
}

impl fmt::Display for SourceUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0.as_str())
    }
}

/// `scheme://host:port` of a URL, for messages that must not carry a path or query.
fn origin_of(url: &Url) -> String {
    url.origin().ascii_serialization()
}

/// `path` is `prefix` or below it, on a segment boundary.
fn under(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    path == prefix || path.strip_prefix(prefix).is_some_and(|rest| rest.starts_with('/'))
}

/// An encoded `/`, `\` or `.`: a server may decode it after the prefix check and climb out.
fn has_encoded_separator(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    lower.contains("%2f") || lower.contains("%5c") || lower.contains("%2e")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources(entries: &[&str]) -> PrimeSources {
        PrimeSources::parse(&entries.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn scheme_host_and_port_compare_exactly() {
        let s = sources(&["https://cdn.example.com"]);
        assert!(s.contains(&url("https://cdn.example.com/a.js")));
        assert!(
            s.contains(&url("https://CDN.example.com:443/a.js")),
            "canonical host, default port"
        );
        assert!(!s.contains(&url("http://cdn.example.com/a.js")), "scheme");
        assert!(!s.contains(&url("https://cdn.example.com:8443/a.js")), "port");
        assert!(
            !s.contains(&url("https://cdn.example.com.evil.test/a.js")),
            "host suffix"
        );
        assert!(
            !s.contains(&url("https://evil.test/cdn.example.com/a.js")),
            "host in path"
        );
        assert!(
            !s.contains(&url("https://cdn.example.com@evil.test/a.js")),
            "userinfo trick"
        );
        assert!(!s.contains(&url("https://user@cdn.example.com/a.js")), "credentials");
        let ip = sources(&["http://127.0.0.1:8000"]);
        assert!(ip.contains(&url("http://127.0.0.1:8000/x")));
        assert!(!ip.contains(&url("http://127.0.0.1:8001/x")));
        assert!(
            ip.contains(&url("http://0x7f.0.0.1:8000/x")),
            "IP literals are canonical"
        );
    }

    #[test]
    fn paths_match_as_prefixes_on_segment_boundaries() {
        let s = sources(&["https://cdn.example.com/builds/"]);
        assert!(s.contains(&url("https://cdn.example.com/builds/app.js")));
        assert!(s.contains(&url("https://cdn.example.com/builds")));
        assert!(!s.contains(&url("https://cdn.example.com/builds2/app.js")));
        assert!(!s.contains(&url("https://cdn.example.com/other/app.js")));
        assert!(
            !s.contains(&url("https://cdn.example.com/builds/../secret")),
            "dot segments resolved"
        );
        assert!(
            !s.contains(&url("https://cdn.example.com/builds/%2e%2e/secret")),
            "encoded dots resolved"
        );
        assert!(!s.contains(&url("https://cdn.example.com/builds/..%2fsecret")));
        assert!(!s.contains(&url("https://cdn.example.com/builds/..%5Csecret")));
        let root = sources(&["https://cdn.example.com"]);
        assert!(root.contains(&url("https://cdn.example.com/")));
        assert!(root.contains(&url("https://cdn.example.com/any/thing?q=1")));
    }

    #[test]
    fn joins_are_checked_after_parsing() {
        let s = sources(&["https://cdn.example.com/builds"]);
        let base = s.admit_base("https://cdn.example.com/builds/42/").unwrap();
        let joined = s.join(&base, "/app.js?v=1").unwrap();
        assert_eq!(joined.as_url().as_str(), "https://cdn.example.com/builds/42/app.js?v=1");
        assert!(matches!(s.join(&base, "/../../secret"), Err(SourceError::Outside(_))));
        let odd = s.join(&base, "//evil.test/x").unwrap();
        assert_eq!(
            odd.as_url().host_str(),
            Some("cdn.example.com"),
            "a path never becomes a host"
        );
        assert!(matches!(
            s.admit_base("https://cdn.example.com/other"),
            Err(SourceError::Outside(_))
        ));
        assert_eq!(
            s.admit_base("https://cdn.example.com/builds?x=1"),
            Err(SourceError::NotABase)
        );
        assert_eq!(s.admit_base("file:///etc/passwd"), Err(SourceError::Malformed));
        assert_eq!(s.admit_base("/builds"), Err(SourceError::Malformed));
        let none = PrimeSources::default();
        assert_eq!(
            none.admit_base("https://cdn.example.com/"),
            Err(SourceError::NoneConfigured)
        );
    }

    #[test]
    fn bad_entries_are_refused() {
        for bad in [
            "cdn.example.com",
            "ftp://cdn.example.com",
            "https://user:pw@cdn.example.com",
            "https://cdn.example.com/?x=1",
            "https://cdn.example.com/#x",
            "https://cdn.example.com/a%2fb",
        ] {
            assert!(PrimeSources::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn refusals_do_not_echo_paths_or_queries() {
        let s = sources(&["https://cdn.example.com/builds"]);
        let err = s.admit_base("https://evil.test/secret/path").unwrap_err().to_string();
        assert!(err.contains("https://evil.test") && !err.contains("secret"), "{err}");
        let err = s
            .admit_base("https://evil.test/p?token=secret")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secret"), "{err}");
    }
}
