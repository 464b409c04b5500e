//! A look inside the cache: what is stored for a URL and why a request would or would not be
//! served from it. The admin port's `GET /objects?url=...[&host=H]` answers a [`Report`] as
//! JSON; `sidecache inspect URL` asks for it and prints it ([`Report::to_text`] or the JSON).
//!
//! The cache finds the stored versions ([`crate::cache::Cache::inspect`]); the verdict is
//! worked out here with the request path's own freshness rules (`policy::usable`,
//! `policy::may_serve_stale_on_error`) for a plain request: no request directives, the `Vary`
//! values the variant was stored for. It reads; it never changes what is stored (nor the LRU
//! order beyond what a lookup of the tiers does).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::cache::Stored;
use crate::policy::{self, CacheControl, Usable};
use crate::proxy::Proxy;

/// What is stored for one URL.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// The URL or path asked about.
    pub url: String,
    /// Every stored variant (at most [`crate::cache::MAX_INSPECTED`]).
    pub objects: Vec<Object>,
    /// When nothing is stored: what can be said about why, one reason a line (empty when
    /// something is).
    #[serde(default)]
    pub nothing_stored_because: Vec<String>,
}

/// A compressed variant of a stored object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Encoded {
    /// `br`, `zstd` or `gzip`.
    pub encoding: String,
    /// Coded body bytes (what its `Content-Length` says).
    pub body_bytes: u64,
    /// What its file spends on disk (whole allocation units).
    pub disk_bytes: u64,
}

/// One stored variant and the verdict for a request it would answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Object {
    /// The full cache key (scheme, host, path, query).
    pub key: String,
    /// The request header values this variant was stored for (`Vary`); `null`: absent.
    pub vary: Vec<(String, Option<String>)>,
    /// The stored status.
    pub status: u16,
    /// The stored response headers, in order (tag headers included: they are stored).
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body_bytes: u64,
    /// The object file's length (body, record, footer).
    pub file_bytes: u64,
    /// What the file spends on disk (whole allocation units).
    pub disk_bytes: u64,
    /// `memory` (hot tier), `open` (held open and mapped) or `disk`.
    pub tier: String,
    /// Its tags.
    pub tags: Vec<String>,
    /// Lookups that found it since it was stored.
    pub hits: u32,
    /// Its compressed variants (made once after it was stored; a request gets the smallest
    /// its `Accept-Encoding` accepts).
    #[serde(default)]
    pub encodings: Vec<Encoded>,
    /// When its response arrived (HTTP date).
    pub stored_at: String,
    /// Its version (object file generation).
    pub generation: u64,
    /// Its current age in seconds (RFC 9111 §4.2.3).
    pub age_secs: u64,
    /// Its freshness lifetime in seconds (§4.2.1), before any soft purge.
    pub lifetime_secs: u64,
    /// Seconds of freshness left (0: stale).
    pub fresh_for_secs: u64,
    /// Seconds past its freshness (0: fresh).
    pub stale_for_secs: u64,
    /// Its `stale-while-revalidate` window in seconds, if any (RFC 5861).
    pub stale_while_revalidate_secs: Option<u64>,
    /// How long past its freshness it may stand in for a failing app (the larger of the
    /// configured `stale_if_error` and its own directive; 0 when it must not be served stale).
    pub stale_if_error_secs: u64,
    /// When it was soft-purged (HTTP date), if it was.
    pub soft_purged_at: Option<String>,
    /// `fresh` (served from the cache), `stale-usable` (served stale while it is refreshed
    /// in the background) or `needs-revalidation` (the app is asked first).
    pub verdict: String,
    /// How the app is asked when it is: `conditional` (validators) or `full`.
    pub revalidation: String,
    /// Whether it stands in if the app fails: `stale-if-error` or `no`.
    pub if_app_fails: String,
    /// Why, in words, one reason a line.
    pub why: Vec<String>,
}

/// Works out the report for what the cache holds for `url`.
pub async fn report(proxy: &Proxy, url: &str, host: Option<&str>) -> Report {
    let stored = proxy.cache().inspect(url, host).await;
    let now = SystemTime::now();
    let objects: Vec<Object> = stored.iter().filter_map(|s| object(proxy, s, now)).collect();
    let nothing_stored_because = if objects.is_empty() {
        absent(proxy, url, host)
    } else {
        Vec::new()
    };
    Report {
        url: url.to_owned(),
        objects,
        nothing_stored_because,
    }
}

/// Why nothing is stored for `url`, as far as can be said: what the configuration decides is
/// certain; for the rest the cache keeps no record of what it did not store (a miss whose
/// answer might not be stored, one declined by admission, an eviction or a purge leave no
/// trace per URL), so those are named as the possibilities, with where to look.
fn absent(proxy: &Proxy, url: &str, host: Option<&str>) -> Vec<String> {
    let config = proxy.config();
    let path = url
        .parse::<http::Uri>()
        .ok()
        .map(|u| u.path().to_owned())
        .unwrap_or_else(|| url.to_owned());
    if let Some(i) = crate::rules::position(&config.rules, &path)
        && config.rules[i].bypass
    {
        return vec![format!(
            "the path is under rule `{}`, which bypasses the cache: it is never stored",
            config.rules[i].name
        )];
    }
    let mut why = Vec::new();
    if !proxy.cache().is_loaded() {
        why.push("the cache index is still loading at startup: ask again when /readyz is 200".to_owned());
    }
    if url.starts_with('/') && host.is_none() {
        why.push(
            "a path was given without --host: it was looked up under every host; the key holds the Host clients send"
                .to_owned(),
        );
    }
    why.push(
        "not recorded per URL, so one of: never requested since this process started (the cache starts empty on \
         every instance); its answer may not be stored (no-store, private, Set-Cookie, Vary: *, an error status, \
         too large: the access log shows outcome=miss for it and sidecache_misses_not_stored_total counts them); \
         declined by admission while the cache is full (sidecache_fills_declined_total); evicted \
         (sidecache_evictions_total) or purged"
            .to_owned(),
    );
    why
}

fn secs(d: Duration) -> u64 {
    d.as_secs()
}

fn object(proxy: &Proxy, s: &Stored, now: SystemTime) -> Option<Object> {
    let meta = s.meta.as_ref()?;
    let prepared = proxy.prepared(meta);
    let plain = prepared.freshness(now);
    let f = match s.soft_purged {
        Some(at) => plain.soft_purged(prepared.freshness(at).age),
        None => plain,
    };
    let cc = &prepared.cc;
    let usable = policy::usable(f, &CacheControl::default(), cc);
    let may_stale = policy::may_serve_stale_on_error(f, cc, proxy.config().stale_if_error);
    let sie_window = if policy::forbids_stale(cc) {
        0
    } else {
        cc.stale_if_error.unwrap_or(0).max(secs(proxy.config().stale_if_error))
    };
    let validators = ["etag", "last-modified"]
        .into_iter()
        .filter(|n| meta.headers.contains_key(*n))
        .collect::<Vec<_>>();
    let mut why = Vec::new();
    if let Some(at) = s.soft_purged {
        why.push(format!(
            "soft-purged at {}: stale from then on",
            httpdate::fmt_http_date(at)
        ));
    }
    if cc.no_cache {
        why.push("no-cache (or stored for its validator alone): every use asks the app first".into());
    }
    if policy::forbids_stale(cc) && !cc.no_cache {
        why.push("must-revalidate, proxy-revalidate or s-maxage: never served stale".into());
    }
    let verdict = match usable {
        Usable::Fresh => {
            why.push(format!("fresh for {} s more", secs(f.lifetime.saturating_sub(f.age))));
            "fresh"
        }
        Usable::StaleWhileRevalidate => {
            why.push(format!(
                "stale for {} s, within stale-while-revalidate ({} s): served stale, refreshed in the background",
                secs(f.staleness()),
                cc.stale_while_revalidate.unwrap_or(0)
            ));
            "stale-usable"
        }
        Usable::Revalidate => {
            if !f.is_fresh() {
                why.push(format!("stale for {} s: the app is asked first", secs(f.staleness())));
            }
            "needs-revalidation"
        }
    };
    let revalidation = if validators.is_empty() { "full" } else { "conditional" };
    if usable != Usable::Fresh {
        why.push(if validators.is_empty() {
            "no validator: a revalidation fetches it whole".into()
        } else {
            format!("revalidated with {} (a 304 refreshes it)", validators.join(" and "))
        });
    }
    why.push(if may_stale {
        format!(
            "if the app fails: served stale (stale-if-error, {} s left)",
            sie_window.saturating_sub(secs(f.staleness()))
        )
    } else {
        "if the app fails: the error is passed on (nothing may stand in)".into()
    });
    if !meta.vary.is_empty() {
        let names: Vec<&str> = meta.vary.iter().map(|(n, _)| n.as_str()).collect();
        why.push(format!(
            "varies on {}: serves only requests with the values below",
            names.join(", ")
        ));
    }
    let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
    Some(Object {
        key: s.key.clone(),
        vary: meta
            .vary
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_ref().map(|v| shown(n, v))))
            .collect(),
        status: meta.status,
        headers: meta
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), text(v.as_bytes())))
            .collect(),
        body_bytes: s.body_len,
        file_bytes: s.file_len,
        disk_bytes: s.charged,
        tier: s.tier.to_owned(),
        tags: s.tags.clone(),
        hits: s.hits,
        encodings: s
            .variants
            .iter()
            .map(|&(coding, body_bytes, disk_bytes)| Encoded {
                encoding: coding.token().to_owned(),
                body_bytes,
                disk_bytes,
            })
            .collect(),
        stored_at: httpdate::fmt_http_date(meta.response_time.max(UNIX_EPOCH)),
        generation: s.generation,
        age_secs: secs(f.age),
        lifetime_secs: secs(plain.lifetime),
        fresh_for_secs: secs(f.lifetime.saturating_sub(f.age)),
        stale_for_secs: secs(f.staleness()),
        stale_while_revalidate_secs: (!policy::forbids_stale(cc))
            .then_some(cc.stale_while_revalidate)
            .flatten(),
        stale_if_error_secs: sie_window,
        soft_purged_at: s.soft_purged.map(httpdate::fmt_http_date),
        verdict: verdict.to_owned(),
        revalidation: revalidation.to_owned(),
        if_app_fails: if may_stale { "stale-if-error" } else { "no" }.to_owned(),
        why,
    })
}

impl Report {
    /// The report for a terminal.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        if self.objects.is_empty() {
            let _ = writeln!(out, "nothing stored for {}", self.url);
            for line in &self.nothing_stored_because {
                let _ = writeln!(out, "  why: {line}");
            }
            return out;
        }
        for (i, o) in self.objects.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            let status = StatusCode::from_u16(o.status).map_or(String::new(), |s| s.to_string());
            let _ = writeln!(out, "{}  {}", o.key, status);
            let _ = writeln!(out, "  verdict      {} ({} revalidation)", o.verdict, o.revalidation);
            for line in &o.why {
                let _ = writeln!(out, "               {line}");
            }
            let _ = writeln!(
                out,
                "  age          {} s (lifetime {} s, fresh for {} s, stale for {} s)",
                o.age_secs, o.lifetime_secs, o.fresh_for_secs, o.stale_for_secs
            );
            let swr = o
                .stale_while_revalidate_secs
                .map_or("none".to_owned(), |s| format!("{s} s"));
            let _ = writeln!(
                out,
                "  stale        while-revalidate {swr}, if-error {} s",
                o.stale_if_error_secs
            );
            if let Some(at) = &o.soft_purged_at {
                let _ = writeln!(out, "  soft-purged  {at}");
            }
            let _ = writeln!(out, "  stored       {} (version {})", o.stored_at, o.generation);
            let _ = writeln!(
                out,
                "  size         {} body bytes, {} on disk, tier {}",
                o.body_bytes, o.disk_bytes, o.tier
            );
            let _ = writeln!(out, "  hits         {}", o.hits);
            let encodings: Vec<String> = o
                .encodings
                .iter()
                .map(|e| format!("{} {} bytes", e.encoding, e.body_bytes))
                .collect();
            let encodings = if encodings.is_empty() {
                "identity only".to_owned()
            } else {
                encodings.join(", ")
            };
            let _ = writeln!(out, "  encodings    {encodings}");
            let tags = if o.tags.is_empty() {
                "none".to_owned()
            } else {
                o.tags.join(" ")
            };
            let _ = writeln!(out, "  tags         {tags}");
            for (name, value) in &o.vary {
                let _ = writeln!(out, "  vary         {name}: {}", value.as_deref().unwrap_or("(absent)"));
            }
            let _ = writeln!(out, "  headers");
            for (name, value) in &o.headers {
                let _ = writeln!(out, "    {name}: {value}");
            }
        }
        out
    }
}
/// Request fields whose values say how a client talks, never who it is: inspect shows what a
/// variant was stored for in them as sent. Every other field a response varies on may carry a
/// credential (`Cookie`, `Authorization`, but as well `X-Api-Key`, `X-Auth-Token`, a tenant's
/// id or anything an app invents), so it is never shown: only its length and a short keyed
/// digest (see [`fingerprint`]), enough to tell two variants apart.
pub const SHOWN_VARY_FIELDS: &[&str] = &[
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "dpr",
    "device-memory",
    "origin",
    "save-data",
    "sec-ch-prefers-color-scheme",
    "sec-ch-ua",
    "sec-ch-ua-mobile",
    "sec-ch-ua-platform",
    "sec-fetch-dest",
    "sec-fetch-mode",
    "sec-fetch-site",
    "viewport-width",
    "width",
    "x-forwarded-proto",
    "x-requested-with",
];

/// A request value a stored object varies on, as inspect shows it: as sent for the fields of
/// [`SHOWN_VARY_FIELDS`], otherwise its length and [`fingerprint`] only.
fn shown(name: &http::HeaderName, value: &http::HeaderValue) -> String {
    if SHOWN_VARY_FIELDS.contains(&name.as_str()) {
        return String::from_utf8_lossy(value.as_bytes()).into_owned();
    }
    format!("({} bytes, {}, not shown)", value.len(), fingerprint(value.as_bytes()))
}

/// Eight hex digits of a blake3 hash keyed with a random key drawn once per process: equal
/// values show equal within one run, and a short or guessable value (a 6-digit PIN) cannot be
/// found by hashing guesses, since the key never leaves the process.
fn fingerprint(value: &[u8]) -> String {
    static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(|| {
        let mut key = [0u8; 32];
        // Without the system's randomness (never seen on Linux) no digest is shown at all.
        match rustix::rand::getrandom(&mut key, rustix::rand::GetRandomFlags::empty()) {
            Ok(n) if n == key.len() => key,
            _ => [0u8; 32],
        }
    });
    if key == &[0u8; 32] {
        return "digest unavailable".to_owned();
    }
    let hash = blake3::keyed_hash(key, value);
    format!("keyed digest {}", &hash.to_hex()[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_fields_known_not_to_be_credentials_are_shown() {
        let value = http::HeaderValue::from_static("session=alice-secret");
        for name in [
            "cookie",
            "authorization",
            "proxy-authorization",
            "x-api-key",
            "x-tenant",
        ] {
            let name = http::HeaderName::from_static(name);
            let text = shown(&name, &value);
            assert!(!text.contains("alice"), "{name}: {text}");
            assert!(text.starts_with("(20 bytes, keyed digest "), "{text}");
            assert_eq!(text, shown(&name, &value), "equal values show equal");
        }
        let other = shown(
            &http::HeaderName::from_static("x-api-key"),
            &http::HeaderValue::from_static("bob"),
        );
        assert_ne!(other, shown(&http::HeaderName::from_static("x-api-key"), &value));
        assert_eq!(
            shown(&http::header::ACCEPT_LANGUAGE, &http::HeaderValue::from_static("de")),
            "de"
        );
    }
}
