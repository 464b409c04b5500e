//! Static-asset rules for apps that send no caching headers: per path glob, bypass the cache,
//! give a default TTL, or force one; fingerprinted file names are immutable; which query
//! parameters count in the key. Pure: no I/O.
//!
//! A rule's TTL is applied by adding a `Sidecache-Cache-Control` directive to the stored copy
//! (RFC 9213 targeted field), so freshness, storability and revalidation stay in `policy`, and
//! the directive never reaches clients.
//!
//! Rules and the fingerprint heuristic only ever *lengthen the freshness of a response that is
//! already shareable*; they never make one shareable. Before either touches a response,
//! [`apply`] checks that (safety before hit ratio):
//! - the status is a success (200, 203): a 404 under a fingerprinted name is not pinned;
//! - no field says `private`, `no-store` or `no-cache` (`Cache-Control` or a targeted field);
//! - the path is plain: no path parameters (`;`), no encoded `/`, `\`, `.`, `;` or NUL, no dot
//!   or empty segments: the shapes through which an app's router reaches another resource than
//!   the file name suggests (web cache deception: `/api/me;x.js`, `/api/me%2fx.js`);
//! - the `Content-Type` is what the file name's extension says (`.js` must be JavaScript): an app
//!   that answers `/json/me/x.js` with its JSON ignored the suffix. Names with an unknown
//!   extension (explicit rules only) must at least not be HTML.
//!
//! Globs are compiled once with `globset` (regular expressions without backtracking): matching
//! is linear in the path's length, whatever the pattern.

use std::time::Duration;

use globset::{Candidate, GlobBuilder, GlobMatcher};
use http::StatusCode;
use http::header::{self, HeaderMap, HeaderValue};
use serde::Deserialize;

use crate::policy::{self, CacheControl};
use crate::units::HumanDuration;

/// One rule as written in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    /// The rule's name: the `rule` label its requests are counted under
    /// (`sidecache_rule_requests_total`). Letters, digits, `_`, `-` and `.`, up to 64; unique.
    /// Default: `rule-N`, N its position from 1.
    #[serde(default)]
    pub name: Option<String>,
    /// A path glob: `*` within one segment, `**` across segments, `?` one character, `[a-z]`
    /// a class, `{a,b}` alternatives. With a leading `/` it matches the whole path; without
    /// one it matches the file name (`*.css`) and may not contain `/`.
    #[serde(rename = "match")]
    pub pattern: String,
    /// Never cache these paths.
    #[serde(default)]
    pub bypass: bool,
    /// Freshness for responses that give none.
    pub ttl: Option<HumanDuration>,
    /// Freshness whatever lifetime the response gives (never for `private`, `no-store`,
    /// `no-cache`, `Set-Cookie` or `Authorization`).
    pub force_ttl: Option<HumanDuration>,
    /// Remove `Set-Cookie` from these responses so they can be stored.
    #[serde(default)]
    pub strip_set_cookie: bool,
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Its name (the metric label); set by the configuration when not given.
    pub name: String,
    pattern: String,
    matcher: GlobMatcher,
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

impl PartialEq for Rule {
    fn eq(&self, other: &Rule) -> bool {
        // The matcher is compiled from the pattern: equal patterns, equal matchers.
        self.pattern == other.pattern
            && self.name == other.name
            && self.bypass == other.bypass
            && self.ttl == other.ttl
            && self.force_ttl == other.force_ttl
            && self.strip_set_cookie == other.strip_set_cookie
    }
}

impl Rule {
    /// Validates and compiles a rule.
    pub fn compile(raw: RawRule) -> Result<Rule, String> {
        if raw.pattern.is_empty() {
            return Err("`match` is empty".into());
        }
        let name = raw.name.unwrap_or_default();
        if !name.is_empty() && !is_rule_name(&name) {
            return Err(format!(
                "name `{name}`: use up to 64 letters, digits, `_`, `-` or `.`, and not `none`"
            ));
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
        let file_name_only = !raw.pattern.starts_with('/');
        if file_name_only && raw.pattern.contains('/') {
            // It would be matched against a file name, which never contains `/`: a rule that
            // silently never applies (a `bypass` that bypasses nothing).
            return Err(format!(
                "`{}` contains `/` but does not start with one: write `/{}` to match the path from \
                 its start, `/**/{}` to match it at any depth, or a pattern without `/` for a file name",
                raw.pattern, raw.pattern, raw.pattern
            ));
        }
        let matcher = GlobBuilder::new(&raw.pattern)
            .literal_separator(true)
            .backslash_escape(true)
            // A bypass also holds for spellings a case-insensitive router takes as the same path
            // (`/API/me`): bypassing too much is safe, too little is not.
            .case_insensitive(raw.bypass)
            .build()
            .map_err(|e| format!("`{}` is not a valid glob: {}", raw.pattern, e.kind()))?
            .compile_matcher();
        Ok(Rule {
            name,
            file_name_only,
            pattern: raw.pattern,
            matcher,
            bypass: raw.bypass,
            ttl: raw.ttl.map(|d| d.0),
            force_ttl: raw.force_ttl.map(|d| d.0),
            strip_set_cookie: raw.strip_set_cookie,
        })
    }

    /// The pattern as written.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Whether the rule applies to this path (no query string). Linear in the path's length.
    pub fn matches(&self, path: &str) -> bool {
        self.matches_candidates(&Candidate::new(path), &Candidate::new(file_name(path)))
    }

    fn matches_candidates(&self, path: &Candidate<'_>, name: &Candidate<'_>) -> bool {
        self.matcher
            .is_match_candidate(if self.file_name_only { name } else { path })
    }
}

/// The first rule matching `path`.
pub fn find<'a>(rules: &'a [Rule], path: &str) -> Option<&'a Rule> {
    position(rules, path).map(|i| &rules[i])
}

/// [`find`]'s rule's position in `rules`.
pub fn position(rules: &[Rule], path: &str) -> Option<usize> {
    if rules.is_empty() {
        return None;
    }
    // The path is prepared for matching once, not once per rule.
    let (path_candidate, name_candidate) = (Candidate::new(path), Candidate::new(file_name(path)));
    rules
        .iter()
        .position(|r| r.matches_candidates(&path_candidate, &name_candidate))
}

/// Whether `name` may name a rule: a metric label value of 1-64 plain characters, and not
/// `none` (the label of requests no rule matched).
pub fn is_rule_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name != "none"
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Whether a `bypass` rule covers this path, as written or as the app's router may read it:
/// percent-decoded, path parameters (`;x`) dropped, empty and dot segments resolved (`/%61pi/me`,
/// `//api/me`, `/api;x/me` and `/x/../api/me` are `/api/me` to many frameworks), and in any
/// case (bypass globs match case-insensitively). A bypass must not be dodged by spelling.
/// `matched` is [`position`]`(rules, path)`, which the request path works out once.
pub fn bypassed(rules: &[Rule], path: &str, matched: Option<usize>) -> bool {
    if rules.is_empty() {
        return false;
    }
    if matched.is_some_and(|i| rules[i].bypass) {
        return true;
    }
    if !path.contains(['%', ';', '\\']) && !path.contains("//") && !path.contains("/.") {
        return false;
    }
    find(rules, &router_path(path)).is_some_and(|r| r.bypass)
}

/// A path as lenient routers read it: decoded, `;` parameters dropped per segment, empty and
/// `.` segments removed, `..` resolved.
fn router_path(path: &str) -> String {
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split(['/', '\\']) {
        match segment.split(';').next().unwrap_or("") {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || decoded.ends_with('/') {
        out.push('/');
    }
    out
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Whether the file name carries a content hash (`app-3f2a9c81.js`, `main.5e7a1b2c9d.css`,
/// `index-BX3a9_kZ.js`): such URLs never change content, so they are treated as immutable.
pub fn is_fingerprinted(path: &str) -> bool {
    let name = file_name(path);
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

/// A static-asset extension: the media types an answer under that name may have, and whether
/// the fingerprint heuristic covers it. The heuristic covers what bundlers emit (scripts,
/// styles, fonts, images, wasm, source maps); types apps commonly generate per user (JSON, XML,
/// plain text, PDF and ZIP downloads, media) are left to explicit rules: a hash-looking name is
/// no proof that `/api/me/x-a1b2c3d4.json` or `/me/invoice-INV20240001.pdf` is a build artefact.
struct StaticType {
    ext: &'static str,
    types: &'static [&'static str],
    fingerprint: bool,
}

const fn st(ext: &'static str, types: &'static [&'static str], fingerprint: bool) -> StaticType {
    StaticType {
        ext,
        types,
        fingerprint,
    }
}

const JS: &[&str] = &[
    "text/javascript",
    "application/javascript",
    "application/x-javascript",
    "application/ecmascript",
    "text/ecmascript",
];
const JSON: &[&str] = &["application/json"];

/// Known static-asset extensions (web cache deception: a rule never stores an answer whose type
/// is not what its name says, `/account/settings.php/x.css` served as the account page).
const STATIC_TYPES: &[StaticType] = &[
    st("css", &["text/css"], true),
    st("js", JS, true),
    st("mjs", JS, true),
    st("cjs", JS, true),
    st("map", &["application/json", "application/octet-stream"], true),
    st("png", &["image/png"], true),
    st("apng", &["image/apng", "image/png"], true),
    st("jpg", &["image/jpeg"], true),
    st("jpeg", &["image/jpeg"], true),
    st("gif", &["image/gif"], true),
    st("webp", &["image/webp"], true),
    st("avif", &["image/avif"], true),
    st("svg", &["image/svg+xml"], true),
    st("ico", &["image/x-icon", "image/vnd.microsoft.icon"], true),
    st("bmp", &["image/bmp"], true),
    st("woff", &["font/woff", "application/font-woff"], true),
    st("woff2", &["font/woff2", "application/font-woff2"], true),
    st(
        "ttf",
        &[
            "font/ttf",
            "font/sfnt",
            "application/x-font-ttf",
            "application/font-sfnt",
        ],
        true,
    ),
    st(
        "otf",
        &[
            "font/otf",
            "font/sfnt",
            "application/x-font-otf",
            "application/font-sfnt",
        ],
        true,
    ),
    st("eot", &["application/vnd.ms-fontobject"], true),
    st("mp4", &["video/mp4"], false),
    st("webm", &["video/webm", "audio/webm"], false),
    st("mp3", &["audio/mpeg"], false),
    st("ogg", &["audio/ogg", "video/ogg", "application/ogg"], false),
    st("wasm", &["application/wasm"], true),
    st("pdf", &["application/pdf"], false),
    st("zip", &["application/zip"], false),
    st("json", JSON, false),
    st("webmanifest", &["application/manifest+json", "application/json"], false),
    st("txt", &["text/plain"], false),
    st("xml", &["application/xml", "text/xml"], false),
];

/// The media type of a `Content-Type` value, lower-cased, parameters dropped.
fn media_type(headers: &HeaderMap) -> Option<String> {
    let ct = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let essence = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    (!essence.is_empty()).then_some(essence)
}

/// The path's shape lets the app's router reach something other than the file it names:
/// path parameters, encoded separators or dots, dot or empty segments, backslashes.
fn is_plain_path(path: &str) -> bool {
    if !path.starts_with('/') || path.contains([';', '\\']) {
        return false;
    }
    let bytes = path.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'%' {
            let hex = bytes.get(i + 1..i + 3).unwrap_or(b"");
            // %2f `/`, %5c `\`, %2e `.`, %3b `;`, %00 NUL, and a `%` that is not an escape.
            let decoded = std::str::from_utf8(hex)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match decoded {
                Some(b'/' | b'\\' | b'.' | b';' | 0) | None => return false,
                Some(_) => {}
            }
        }
    }
    // Segments after the leading `/`: none `.` or `..`, none empty but a trailing one.
    let mut segments = path[1..].split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if segment == "." || segment == ".." || segment.is_empty() && !last {
            return false;
        }
    }
    true
}

/// Whether a rule (`fingerprint: false`) or the fingerprint heuristic (`true`) may lengthen
/// the freshness of this answer: see the module's documentation.
fn may_extend(path: &str, status: StatusCode, headers: &HeaderMap, fingerprint: bool) -> bool {
    if !matches!(status.as_u16(), 200 | 203) {
        return false;
    }
    if restricts(&CacheControl::parse(headers))
        || [&policy::SIDECACHE_CACHE_CONTROL, &policy::CDN_CACHE_CONTROL]
            .into_iter()
            .any(|name| restricts(&CacheControl::parse_field(headers, name)))
    {
        return false;
    }
    if !is_plain_path(path) {
        return false;
    }
    let media = media_type(headers);
    let ext = file_name(path).rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref().and_then(|e| STATIC_TYPES.iter().find(|t| t.ext == e)) {
        Some(known) => {
            (known.fingerprint || !fingerprint)
                && media.is_some_and(|m| {
                    // A download of unknown type is no build artefact for the heuristic.
                    (known.types.contains(&m.as_str()) || m.ends_with("+json") && known.types == JSON)
                        && !(fingerprint && m == "application/octet-stream")
                })
        }
        // An unknown extension: only an operator's explicit rule, and never for a page.
        None => !fingerprint && media.is_none_or(|m| !matches!(m.as_str(), "text/html" | "application/xhtml+xml")),
    }
}

fn restricts(cc: &CacheControl) -> bool {
    cc.private || cc.no_store || cc.no_cache
}

/// Adds the freshness a rule (or fingerprinting) gives to a response about to be stored, and
/// strips `Set-Cookie` if the rule says so. Returns what was applied, for logs. Nothing is
/// applied to an answer that is not already shareable or whose path or type does not match
/// what its name says (see the module's documentation). The fingerprint heuristic is a guess:
/// never made for a request that carried credentials (`credentialed`, see
/// [`policy::is_credentialed`]); an operator's rule is the operator's word for the path.
pub fn apply(
    rule: Option<&Rule>,
    fingerprinted_ttl: Duration,
    path: &str,
    status: StatusCode,
    headers: &mut HeaderMap,
    credentialed: bool,
) -> Option<&'static str> {
    let fingerprinted = rule.is_none_or(|r| r.ttl.is_none() && r.force_ttl.is_none())
        && !credentialed
        && !fingerprinted_ttl.is_zero()
        && is_fingerprinted(path);
    if rule.is_none() && !fingerprinted {
        return None;
    }
    if !may_extend(path, status, headers, rule.is_none()) {
        return None;
    }
    if rule.is_some_and(|r| r.strip_set_cookie) {
        headers.remove(header::SET_COOKIE);
    }
    let (cc, targeted) = policy::response_directives(headers);
    let explicit = targeted || cc.max_age.is_some() || cc.s_maxage.is_some() || headers.contains_key(header::EXPIRES);
    let (ttl, why) = match (rule.and_then(|r| r.force_ttl), rule.and_then(|r| r.ttl)) {
        (Some(force), _) => (force, "force_ttl"),
        (None, Some(ttl)) if !explicit => (ttl, "ttl"),
        (None, None) if !explicit && fingerprinted && may_extend(path, status, headers, true) => {
            (fingerprinted_ttl, "fingerprinted")
        }
        _ => return None,
    };
    let directive = format!("max-age={}", ttl.as_secs());
    headers.insert(
        &policy::SIDECACHE_CACHE_CONTROL,
        HeaderValue::from_str(&directive).ok()?,
    );
    Some(why)
}

/// Rewrites a query string for the cache key: parameters kept by `mode`, stably sorted by
/// name, so repeated parameters keep their order (`?v=2&v=1` is not `?v=1&v=2` to most apps).
///
/// Parameters are split on `&`, names compared percent-decoded (`%75tm_source` is
/// `utm_source` to the app). A piece holding a `;` is never dropped: some frameworks split
/// on `;` too, and `utm_source=x;v=evil` carries `v=evil` for them.
pub fn key_query(query: &str, mode: &QueryKey) -> String {
    if matches!(mode, QueryKey::None) {
        return String::new();
    }
    let mut pairs: Vec<(std::borrow::Cow<'_, str>, &str)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| (param_name(p), p))
        .filter(|(name, piece)| keeps(mode, name, piece))
        .collect();
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    let mut out = String::with_capacity(query.len());
    for (i, (_, piece)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(piece);
    }
    out
}

/// The query string the app is sent for a keyed request: the parameters the key holds, in
/// their original order (what the app sees is what the key says; a denied `utm_source`
/// carrying a script cannot reach a page stored under the plain key). `None`: unchanged.
pub fn app_query(query: &str, mode: &QueryKey) -> Option<String> {
    match mode {
        QueryKey::All => None,
        QueryKey::None => Some(String::new()),
        QueryKey::Allow(_) | QueryKey::Deny(_) => {
            let kept: Vec<&str> = query
                .split('&')
                .filter(|p| !p.is_empty() && keeps(mode, &param_name(p), p))
                .collect();
            Some(kept.join("&"))
        }
    }
}

/// Whether a parameter (`piece`, named `name`) counts in the key.
fn keeps(mode: &QueryKey, name: &str, piece: &str) -> bool {
    piece.contains(';')
        || match mode {
            QueryKey::All => true,
            QueryKey::None => false,
            QueryKey::Allow(names) => names.iter().any(|n| n == name),
            QueryKey::Deny(names) => !names.iter().any(|n| n == name),
        }
}

/// A parameter's name as the app reads it: before `=`, `+` as a space, percent-decoded.
fn param_name(piece: &str) -> std::borrow::Cow<'_, str> {
    let raw = piece.split('=').next().unwrap_or("");
    if !raw.contains(['%', '+']) {
        return raw.into();
    }
    let spaced = raw.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8_lossy()
        .into_owned()
        .into()
}

/// Which query parameters are part of the cache key.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum QueryKey {
    /// All of them (sorted by name).
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
    /// `{allow: [...], deny: [...]}`: refused (untagged, `Allow` would take it and drop
    /// `deny` without a word).
    Both {
        /// Kept parameters.
        allow: Vec<String>,
        /// Dropped parameters.
        deny: Vec<String>,
    },
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
            RawQueryKey::Both { .. } => Err(
                "both `allow` and `deny` given: use one (allow: only these parameters are kept; \
                 deny: all but these)"
                    .into(),
            ),
            RawQueryKey::Allow { allow } => Ok(QueryKey::Allow(allow)),
            RawQueryKey::Deny { deny } => Ok(QueryKey::Deny(deny)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(pattern: &str) -> RawRule {
        RawRule {
            name: None,
            pattern: pattern.into(),
            bypass: true,
            ttl: None,
            force_ttl: None,
            strip_set_cookie: false,
        }
    }

    fn rule(pattern: &str) -> Rule {
        Rule::compile(raw(pattern)).unwrap()
    }

    fn ttl_rule(pattern: &str, ttl: Option<u64>, force: Option<u64>) -> Rule {
        Rule::compile(RawRule {
            name: None,
            pattern: pattern.into(),
            bypass: false,
            ttl: ttl.map(|s| HumanDuration(Duration::from_secs(s))),
            force_ttl: force.map(|s| HumanDuration(Duration::from_secs(s))),
            strip_set_cookie: false,
        })
        .unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const OK: StatusCode = StatusCode::OK;
    type Fields<'a> = Vec<(&'a str, &'a str)>;
    /// A rule, a path, a status and the answer's header fields.
    type Case<'a> = (Option<&'a Rule>, &'a str, u16, Fields<'a>);
    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn globs_match_segments_and_file_names() {
        let rows = [
            ("/api/**", "/api/v1/users", true),
            ("/api/**", "/apix", false),
            ("/assets/*", "/assets/app.js", true),
            ("/assets/*", "/assets/img/a.png", false),
            ("/assets/**/*.png", "/assets/img/x/a.png", true),
            ("/assets/**/*.png", "/assets/a.png", true),
            ("*.css", "/deep/dir/site.css", true),
            ("*.css", "/deep/dir/site.css.map", false),
            ("/file-?.js", "/file-1.js", true),
            ("/file-?.js", "/file-12.js", false),
            ("*.{woff,woff2}", "/f/a.woff2", true),
            ("*-*-*.js", "/x/a-b-c.js", true),
            ("*-*-*.js", "/x/a-b.js", false),
        ];
        for (pattern, path, want) in rows {
            assert_eq!(rule(pattern).matches(path), want, "{pattern} ~ {path}");
        }
    }

    /// The old backtracking matcher took over 40 s of CPU for this pair; a compiled glob is
    /// linear. Checked for the result, not timed: the integration test times it end to end.
    #[test]
    fn multi_wildcard_globs_against_huge_paths_do_not_match_wrongly() {
        let dashes = format!("/x/{}.css", "-".repeat(64 * 1024));
        assert!(!rule("*-*-*.js").matches(&dashes));
        let deep = format!("/assets/{}x.js", "a-/".repeat(20_000));
        assert!(!rule("/assets/**/*-*.min.js").matches(&deep));
        assert!(rule("/assets/**/*-*.min.js").matches("/assets/a/b/c-d.min.js"));
    }

    #[test]
    fn bypass_rules_see_the_path_as_the_app_will() {
        let rules = [rule("/api/**")];
        for path in [
            "/api/me",
            "/%61pi/me",
            "/API/me",
            "//api/me",
            "/api;x/me",
            "/x/../api/me",
            "/./api/me",
            "/x\\..\\api/me",
        ] {
            assert!(bypassed(&rules, path, position(&rules, path)), "{path}");
        }
        assert!(!bypassed(&rules, "/assets/app.js", position(&rules, "/assets/app.js")));
        assert!(!bypassed(&[], "/api/me", None));
    }

    #[test]
    fn the_app_gets_the_query_the_key_holds_in_its_order() {
        let deny = QueryKey::Deny(vec!["utm_source".into()]);
        assert_eq!(app_query("v=2&utm_source=x&v=1", &deny).as_deref(), Some("v=2&v=1"));
        assert_eq!(app_query("b=1&a=2", &QueryKey::All), None, "unchanged");
        assert_eq!(app_query("b=1", &QueryKey::None).as_deref(), Some(""));
        let allow = QueryKey::Allow(vec!["v".into()]);
        assert_eq!(app_query("x=1&v=2&y=3;v=4", &allow).as_deref(), Some("v=2&y=3;v=4"));
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
        let ttl_rule = Rule::compile(RawRule {
            name: None,
            pattern: "/assets/**".into(),
            bypass: false,
            ttl: Some(HumanDuration(DAY)),
            force_ttl: None,
            strip_set_cookie: true,
        })
        .unwrap();
        let mut h = headers(&[("set-cookie", "a=b"), ("content-type", "text/css")]);
        assert_eq!(
            apply(Some(&ttl_rule), Duration::ZERO, "/assets/a.css", OK, &mut h, false),
            Some("ttl")
        );
        assert_eq!(h["sidecache-cache-control"], "max-age=86400");
        assert!(!h.contains_key("set-cookie"));
        // An explicit lifetime from the app wins over a default ttl.
        let mut h = headers(&[("cache-control", "max-age=5"), ("content-type", "text/css")]);
        assert_eq!(
            apply(Some(&ttl_rule), Duration::ZERO, "/assets/a.css", OK, &mut h, false),
            None
        );
        // Fingerprinted names get the fingerprint TTL with no rule at all.
        let mut h = headers(&[("content-type", "text/javascript")]);
        assert_eq!(
            apply(None, DAY, "/assets/app-3f2a9c81.js", OK, &mut h, false),
            Some("fingerprinted")
        );
        // Issue 25, item 8: never for a request with credentials (a guess about one user's
        // answer); an operator's rule for the path still applies.
        let mut h = headers(&[("content-type", "text/javascript")]);
        assert_eq!(apply(None, DAY, "/assets/app-3f2a9c81.js", OK, &mut h, true), None);
        assert!(!h.contains_key("sidecache-cache-control"));
        let mut h = headers(&[("content-type", "text/css")]);
        assert_eq!(
            apply(Some(&ttl_rule), DAY, "/assets/a-3f2a9c81.css", OK, &mut h, true),
            Some("ttl")
        );
    }

    /// Issue 15, findings 1, 2, 14: a rule or the fingerprint heuristic lengthens the freshness
    /// of shareable answers only.
    #[test]
    fn rules_and_fingerprints_never_make_an_answer_shareable() {
        let ttl = ttl_rule("/**", Some(86_400), None);
        let force = ttl_rule("/**", None, Some(86_400));
        let js = ("content-type", "text/javascript");
        let json = ("content-type", "application/json");
        // (rule, path, status, response headers)
        let refused: Vec<Case<'_>> = vec![
            (
                None,
                "/api/me;x-a1b2c3d4.json",
                200,
                vec![json, ("cache-control", "private")],
            ),
            (None, "/api/me/x-a1b2c3d4.json", 200, vec![json]),
            (None, "/api/me%2fx-a1b2c3d4.json", 200, vec![json]),
            (
                None,
                "/api/me/x-a1b2c3d4.html",
                200,
                vec![("content-type", "text/html")],
            ),
            (None, "/a/app-3f2a9c81.js", 200, vec![js, ("cache-control", "private")]),
            (None, "/a/app-3f2a9c81.js", 200, vec![js, ("cache-control", "no-store")]),
            (None, "/a/app-3f2a9c81.js", 200, vec![js, ("cache-control", "no-cache")]),
            (None, "/a/app-3f2a9c81.js", 404, vec![js]),
            (None, "/a/app-3f2a9c81.js", 404, vec![("content-type", "text/html")]),
            (
                None,
                "/me/invoice-INV20240001.pdf",
                200,
                vec![("content-type", "application/pdf")],
            ),
            (
                None,
                "/me/export-20240115T1030.zip",
                200,
                vec![("content-type", "application/zip")],
            ),
            (
                None,
                "/a/app-3f2a9c81.js.map",
                200,
                vec![("content-type", "application/octet-stream")],
            ),
            (Some(&ttl), "/a.js", 200, vec![js, ("cache-control", "private")]),
            (Some(&force), "/a.js", 200, vec![js, ("cache-control", "no-store")]),
            (Some(&force), "/a.js", 200, vec![js, ("cache-control", "no-cache")]),
            (Some(&force), "/a.js", 200, vec![js, ("cdn-cache-control", "private")]),
            (Some(&ttl), "/json/me;x.js", 200, vec![json]),
            (Some(&ttl), "/json/me/x.js", 200, vec![json]),
            (Some(&ttl), "/json/me%2fx.js", 200, vec![json]),
            (Some(&ttl), "/json/me%2Fx.js", 200, vec![js]),
            (Some(&ttl), "/assets/..%2fjson/me", 200, vec![json]),
            (Some(&ttl), "/assets/../json/me", 200, vec![json]),
            (Some(&ttl), "/assets/%2e%2e/json/me", 200, vec![json]),
            (Some(&ttl), "/assets//json/me", 200, vec![json]),
            (Some(&ttl), "/assets\\..\\json", 200, vec![json]),
            (
                Some(&ttl),
                "/account.php/x.css",
                200,
                vec![("content-type", "text/html")],
            ),
            (
                Some(&ttl),
                "/page",
                200,
                vec![("content-type", "text/html; charset=utf-8")],
            ),
            (Some(&ttl), "/a.js", 200, vec![]),
            (Some(&ttl), "/a.js", 500, vec![js]),
        ];
        for (rule, path, status, pairs) in refused {
            let mut h = headers(&pairs);
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(
                apply(rule, DAY, path, status, &mut h, false),
                None,
                "{path} {status} {pairs:?}"
            );
            assert!(!h.contains_key("sidecache-cache-control"), "{path}");
        }
        let allowed: Vec<(Option<&Rule>, &str, Fields<'_>)> = vec![
            (None, "/a/app-3f2a9c81.js", vec![js]),
            (
                None,
                "/a/app-3f2a9c81.css",
                vec![("content-type", "text/css; charset=utf-8")],
            ),
            (Some(&ttl), "/api/catalog", vec![json]),
            (
                Some(&ttl),
                "/data/x.json",
                vec![("content-type", "application/ld+json")],
            ),
            (Some(&ttl), "/fonts/A%20B.woff2", vec![("content-type", "font/woff2")]),
            (
                Some(&force),
                "/a.js",
                vec![js, ("cache-control", "max-age=0, must-revalidate")],
            ),
        ];
        for (rule, path, pairs) in allowed {
            let mut h = headers(&pairs);
            assert!(apply(rule, DAY, path, OK, &mut h, false).is_some(), "{path} {pairs:?}");
        }
    }

    #[test]
    fn query_keys_are_filtered_and_sorted_stably() {
        assert_eq!(key_query("b=2&a=1", &QueryKey::All), "a=1&b=2");
        assert_eq!(
            key_query("v=2&v=1", &QueryKey::All),
            "v=2&v=1",
            "repeats keep their order"
        );
        assert_ne!(
            key_query("v=2&v=1", &QueryKey::All),
            key_query("v=1&v=2", &QueryKey::All)
        );
        assert_eq!(key_query("b=2&a=1", &QueryKey::None), "");
        assert_eq!(
            key_query(
                "v=3&utm_source=x&lang=en",
                &QueryKey::Allow(vec!["v".into(), "lang".into()])
            ),
            "lang=en&v=3"
        );
        let deny = QueryKey::Deny(vec!["utm_source".into()]);
        assert_eq!(key_query("v=3&utm_source=x", &deny), "v=3");
        assert_eq!(key_query("v=3&utm%5Fsource=x", &deny), "v=3", "names compared decoded");
        // Issue 15, finding 10: `;` carries parameters for some frameworks.
        assert_eq!(key_query("v=1&utm_source=x;v=evil", &deny), "utm_source=x;v=evil&v=1");
        let allow = QueryKey::Allow(vec!["v".into()]);
        assert_eq!(key_query("utm=1;v=evil&v=1", &allow), "utm=1;v=evil&v=1");
        assert_eq!(
            key_query("%76=evil", &allow),
            "%76=evil",
            "an encoded allowed name counts"
        );
    }

    #[test]
    fn invalid_rules_are_refused() {
        let bad = |bypass, ttl: Option<u64>, force: Option<u64>| {
            Rule::compile(RawRule {
                name: None,
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
        // Issue 15, finding 15: a file-name pattern with `/` would never match.
        let err = Rule::compile(raw("assets/*.js")).unwrap_err();
        assert!(err.contains("/assets/*.js"), "{err}");
        assert!(Rule::compile(raw("/a/[z-a]")).is_err(), "an invalid glob");
    }
}
