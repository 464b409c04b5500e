//! Configuration: the raw layers (file, `SIDECACHE_*` environment, flags) and the validated
//! [`Config`] built from them.
//!
//! Precedence is flag > env > file > default. Every key is declared once, with its default, in
//! the `config_keys!` table below, so the three layers and the defaults cannot drift apart.
//! Validation happens before any port is bound; each error names the key and where its value
//! came from.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use serde::Deserialize;
use serde::de::IntoDeserializer;

use crate::cache::index::Order;
use crate::cache::tags::{Separator, TagRules};
use crate::rules::{QueryKey, RawQueryKey, RawRule, Rule};
use crate::shared_tier::SharedTierConfig;
use crate::sources::PrimeSources;
use crate::units::{ByteSize, HumanDuration, MinFree};

/// Where a configuration value came from; printed in every configuration error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The built-in default.
    Default,
    /// A YAML configuration file.
    File(PathBuf),
    /// An environment variable.
    Env(String),
    /// A command-line flag.
    Flag(&'static str),
    /// Derived from other keys or from the machine (no layer set it).
    Derived,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("the default"),
            Source::File(path) => write!(f, "config file {}", path.display()),
            Source::Env(var) => write!(f, "environment variable {var}"),
            Source::Flag(key) => write!(f, "flag --{}", key.replace('_', "-")),
            Source::Derived => f.write_str("derived (the default)"),
        }
    }
}

/// A configuration that cannot be used. Reported before anything is bound; exit status 64.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("failed to read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid YAML for the schema (this includes unknown keys).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the key and the line.
        message: String,
    },
    /// An environment variable names no key.
    #[error("unknown key `{key}` in environment variable {var}{hint}")]
    UnknownEnv {
        /// The variable.
        var: String,
        /// The key derived from it.
        key: String,
        /// ` (did you mean SIDECACHE_MAX_SIZE?)`, or a pointer to the list of keys.
        hint: String,
    },
    /// A value is malformed or out of range.
    #[error("invalid value for `{key}` from {origin}: {message}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// Where the value came from.
        origin: Source,
        /// What is wrong with it.
        message: String,
    },
}

/// Declares every configuration key once, in the table below: its doc line, its type in the
/// raw layers and, unless it is derived from other keys or from the machine, its default as
/// an operator would write it:
///
/// ```text
/// /// Public listener address.
/// listen: String = "0.0.0.0:8080",
/// /// Most objects the cache holds; default: one per 16 KiB of `max_size`.
/// max_objects: u64,
/// ```
///
/// From the table it generates:
/// - [`RawConfig`], one layer (file, environment or flags) with every key optional, and its
///   [`RawConfig::KEYS`] and [`RawConfig::DEFAULTS`] (`(key, default)` as the table writes
///   it, for tests and docs);
/// - `Settled`, the layers merged and the table's defaults filled in, which `validate` starts
///   from: a key with a default has its own type, a key without one stays an `Option` (its
///   default, if any, is derived in `validate` and described in its doc line here).
///
/// A default is parsed exactly as an environment value is (`parse_env_value`): `"4GB"` is the
/// same four billion bytes from the table as from `SIDECACHE_MAX_SIZE`. A default that does
/// not parse is a [`ConfigError::Invalid`] from [`Source::Default`], and fails the
/// `every_default_in_the_table_parses` test long before it could reach a deployment.
macro_rules! config_keys {
    // The type of a key once the layers are merged: its own with a default, optional without.
    (@settled $ty:ty, $default:expr) => { $ty };
    (@settled $ty:ty) => { Option<$ty> };

    // The merged value of a key: the layers' if one set it, else the default parsed, else
    // still unset.
    (@settle $value:expr, $name:ident, $ty:ty, $default:expr) => {
        match $value {
            Some(value) => value,
            None => parse_env_value::<$ty>($default).map_err(|message| ConfigError::Invalid {
                key: stringify!($name),
                origin: Source::Default,
                message: format!("`{}` does not parse: {message}", $default),
            })?,
        }
    };
    (@settle $value:expr, $name:ident, $ty:ty) => { $value };

    ($( $(#[$doc:meta])* $name:ident : $ty:ty $(= $default:expr)?, )*) => {
        /// One layer of configuration, every key optional. Unknown keys are refused.
        #[derive(Debug, Default, Clone, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct RawConfig {
            $( $(#[$doc])* pub $name: Option<$ty>, )*
        }

        impl RawConfig {
            /// Every key, as spelled in YAML; `SIDECACHE_<KEY>` upper-cases it.
            pub const KEYS: &'static [&'static str] = &[$(stringify!($name)),*];

            /// `(key, default)` for every key whose default is a value rather than derived
            /// from other keys or the machine, the default as the table writes it.
            pub const DEFAULTS: &'static [(&'static str, &'static str)] =
                &[$($( (stringify!($name), $default), )?)*];

            /// Keys set in this layer.
            fn set_keys(&self) -> Vec<&'static str> {
                let mut keys = Vec::new();
                $( if self.$name.is_some() { keys.push(stringify!($name)); } )*
                keys
            }

            /// Lays `over` on top of `self`: every key `over` sets wins.
            fn overlay(&mut self, over: RawConfig) {
                $( if over.$name.is_some() { self.$name = over.$name; } )*
            }

            /// Sets `key` from an environment string. `Ok(false)` when no such key exists.
            fn set_from_env(&mut self, key: &str, value: &str) -> Result<bool, String> {
                match key {
                    $( stringify!($name) => {
                        self.$name = Some(parse_env_value::<$ty>(value)?);
                        Ok(true)
                    } )*
                    _ => Ok(false),
                }
            }

            /// How an environment or flag value (or a default) for `key` reads as YAML in
            /// `check-config`: the string itself where the key's type takes a plain string
            /// (as `parse_env_value` tries first), else the YAML it was parsed as.
            fn text_node(key: &str, text: &str) -> Option<serde_json::Value> {
                match key {
                    $( stringify!($name) => Some(text_node::<$ty>(text)), )*
                    _ => None,
                }
            }

            /// The merged layers with the table's defaults filled in.
            fn settle(self) -> Result<Settled, ConfigError> {
                Ok(Settled {
                    $( $name: config_keys!(@settle self.$name, $name, $ty $(, $default)?), )*
                })
            }
        }

        /// The merged layers with the table's defaults filled in: a key with a default holds
        /// a value, a key without one is still optional. What `validate` checks and derives
        /// from.
        #[derive(Debug)]
        struct Settled {
            $( $name: config_keys!(@settled $ty $(, $default)?), )*
        }
    };
}

config_keys! {
    /// Public listener address.
    listen: String = "0.0.0.0:8080",
    /// The app's base URL (`http://host:port`).
    upstream: String = "http://127.0.0.1:3000",
    /// Admin listener address (metrics, health, purge, prime).
    admin_listen: String = "127.0.0.1:6083",
    /// Bearer token the admin port requires for purge and prime; empty: none.
    admin_token: Secret = "",
    /// Directory holding the cache; nonpersistent, private to the instance. Default:
    /// `sidecache` in the system temp dir (`$TMPDIR/sidecache`).
    cache_dir: PathBuf,
    /// Disk budget for the cache: bodies plus metadata.
    max_size: ByteSize = "4GB",
    /// Room to keep free on the cache's filesystem: bytes or a percentage.
    min_free: MinFree = "5%",
    /// Most objects the cache holds (index memory each; one of 64 KiB or more is a file of
    /// its own: an inode); default: one per 16 KiB of `max_size`.
    max_objects: u64,
    /// Largest object kept; larger ones are served but not stored. Default: a quarter of
    /// `max_size`, at most 256 MiB.
    max_object_size: ByteSize,
    /// Bytes of the in-memory hot tier; 0 turns it off.
    memory_size: ByteSize = "32MiB",
    /// Largest object the hot tier holds.
    memory_object_max: ByteSize = "1MiB",
    /// Stored bodies of 16 KiB and more kept open and mapped, so hits on them make no `open`,
    /// `read` or `close`; 0 turns it off. Default: 16384, quietly lowered to what the
    /// descriptor and mapping limits leave (set when the cache opens, in `cache::tiers`).
    open_files: usize,
    /// Eviction starts above this share of `max_size`.
    high_watermark: f64 = "0.95",
    /// Eviction stops below this share of `max_size`.
    low_watermark: f64 = "0.9",
    /// Once the cache is full (past `low_watermark`), a new object is stored only if it is
    /// asked for at least as often, per byte, as the objects it would displace (TinyLFU's
    /// admission weighed by size, as nginx's `proxy_cache_min_uses` but relative); false
    /// stores every cacheable miss.
    admission: bool = "true",
    /// The order objects are evicted in: `segmented-lru` (objects hit since they were stored go
    /// after those asked for once) or `lru` (plain LRU, to compare with).
    eviction: Order = "segmented-lru",
    /// How often the eviction loop checks usage when not woken.
    evict_interval: HumanDuration = "10s",
    /// How long a request waits on another request's fill before going to the app itself.
    coalesce_timeout: HumanDuration = "30s",
    /// Drain period on SIGTERM; then, in supervision mode, how long the app has to exit on its
    /// SIGTERM before it is killed.
    grace_period: HumanDuration = "25s",
    /// Timeout for connecting to the app.
    upstream_connect_timeout: HumanDuration = "5s",
    /// Timeout for the app's response headers.
    upstream_timeout: HumanDuration = "60s",
    /// Timeout for reading a client's request headers (also bounds HTTP/1 keep-alive idle).
    client_header_timeout: HumanDuration = "30s",
    /// A connection with no bytes moving either way for this long is closed.
    idle_timeout: HumanDuration = "120s",
    /// Largest request head accepted.
    max_header_size: ByteSize = "64KiB",
    /// Concurrent client connections served; further ones wait, unserved, for a free slot.
    max_connections: usize = "4096",
    /// Threads serving the public port, each with its own event loop (default: one per CPU).
    workers: usize,
    /// How long `serve -- <app>` waits for the app to accept connections.
    app_start_timeout: HumanDuration = "60s",
    /// One log line per request.
    access_log: bool = "true",
    /// `text` or `json`.
    log_format: LogFormat = "text",
    /// A tracing filter: `info`, `debug`, `sidecache=debug,info`, ...
    log_level: String = "info",
    /// Trust `X-Forwarded-*` headers from clients (set when behind a platform router).
    trust_forwarded: bool = "false",
    /// Request headers removed before the app: ones apps honour that the cache key does not hold.
    /// A list, or one string separated by commas or spaces (in a file as in the environment).
    strip_request_headers: StringList = DEFAULT_STRIP_REQUEST_HEADERS,
    /// How long past its freshness a stored object may stand in for a failing app.
    stale_if_error: HumanDuration = "1h",
    /// Heuristic freshness as a share of the time since `Last-Modified` (RFC 9111 §4.2.2).
    heuristic_fraction: f64 = "0.1",
    /// Upper bound of heuristic freshness.
    heuristic_max: HumanDuration = "1d",
    /// Freshness for fingerprinted file names that give none; 0 turns it off.
    fingerprinted_ttl: HumanDuration = "365d",
    /// Per-path rules: bypass, default TTL, forced TTL, strip Set-Cookie. First match wins.
    rules: Vec<RawRule> = "[]",
    /// Which query parameters count in the cache key: all, none, {allow: [...]}, {deny: [...]}.
    query: RawQueryKey = "all",
    /// Base URLs `prime --from` may fill from (scheme, host and port exact, path a prefix);
    /// empty: none. A list, or one string of URLs separated by commas or spaces.
    prime_sources: StringList = "",
    /// Compressed variants: `false`, `true`, or {enabled, types, min_size, max_size,
    /// long_lived, long_levels, short_levels, threads, queue, cpu_share, cpu_burst}. The
    /// defaults of those nested keys are `compress::Settings::compile`'s, the one place they
    /// are set.
    compress: crate::compress::RawCompress = "true",
    /// The shared tier in object storage: `s3://BUCKET/PREFIX`; empty: off. The endpoint,
    /// region and credentials come from the standard `AWS_*` environment variables.
    shared_tier: String = "",
    /// Least freshness an object must have left to be uploaded to the shared tier.
    shared_tier_min_fresh: HumanDuration = "1h",
    /// Time limit of one shared-tier read (waiting for a slot included) or upload.
    shared_tier_timeout: HumanDuration = "2s",
    /// Shared-tier reads at once, and uploads at once.
    shared_tier_concurrency: usize = "16",
    /// Uploads waiting at most; past it an upload is dropped and counted.
    shared_tier_queue: usize = "1024",
    /// How long the shared tier is skipped after repeated failures before it is tried again.
    shared_tier_cooldown: HumanDuration = "30s",
    /// Bytes this instance uploads to the shared tier per hour at most (a token bucket starting
    /// full); past it an upload is dropped and counted. Client-chosen keys (query strings) must
    /// not fill the bucket without bound.
    shared_tier_upload_budget: ByteSize = "1GiB",
    // Tags (issue 18): purge by what changed.
    /// Response header whose space-separated tokens tag the object (Fastly's); empty: none.
    surrogate_key_header: String = "Surrogate-Key",
    /// Response header whose comma-separated values tag the object (Cloudflare's); empty: none.
    cache_tag_header: String = "Cache-Tag",
    /// Most distinct tags one object may carry; a response with more is not stored.
    max_tags_per_object: u32 = "32",
    /// Longest tag in bytes; a response with a longer one is not stored.
    max_tag_length: u32 = "256",
    /// Memory the tag index may hold (its names, once each, and references); a response whose
    /// tags would take it past this is served but not stored.
    max_tag_index_memory: ByteSize = "32MiB",
    /// Send the tag headers to clients (otherwise they are removed, as CDNs do).
    tag_headers_to_clients: bool = "false",
}

/// The default `strip_request_headers` (a YAML list, as `SIDECACHE_STRIP_REQUEST_HEADERS`
/// would give it): headers that apps, frameworks and their middleware honour (to rebuild the
/// URL, the scheme, the host, the method or the client address) but that the cache key does
/// not hold, so one client's value would shape the answer stored for everyone. With
/// `trust_forwarded` on, only the router's `X-Forwarded-For`, `-Proto` and `-Port` are kept;
/// `X-Forwarded-Host` is always set by sidecache from the keyed host.
pub const DEFAULT_STRIP_REQUEST_HEADERS: &str = concat!(
    "[",
    // The URL or path the app should route (IIS, Symfony, Zend, Laminas, ...).
    "x-original-url, x-rewrite-url, x-override-url, ",
    // Another method than the request line's (Rails, Express method-override, Laravel, ...).
    "x-http-method-override, x-http-method, x-method-override, ",
    // The host, scheme, port or prefix the app builds absolute URLs from.
    "forwarded, x-forwarded-host, x-forwarded-proto, x-forwarded-scheme, x-forwarded-port, ",
    "x-forwarded-prefix, x-forwarded-ssl, x-forwarded-server, x-forwarded-uri, ",
    "x-forwarded-path, x-host, x-original-host, x-url-scheme, front-end-https, ",
    // The client address (rate limits, geo answers, allow-lists).
    "x-real-ip, true-client-ip, x-client-ip, x-cluster-client-ip, x-proxyuser-ip, ",
    "x-originating-ip, x-remote-ip, x-remote-addr",
    "]",
);

/// Parses an environment value: as a plain string first (so tokens with `#` or `:` stay
/// whole), then as YAML (numbers, booleans, lists).
fn parse_env_value<T: for<'de> Deserialize<'de>>(value: &str) -> Result<T, String> {
    let plain: Result<T, serde::de::value::Error> = T::deserialize(value.into_deserializer());
    match plain {
        Ok(v) => Ok(v),
        Err(_) => serde_saphyr::from_str_with_options(value, yaml_options()).map_err(|e| humanize(&e.to_string())),
    }
}

/// See `RawConfig::text_node`.
fn text_node<T: for<'de> Deserialize<'de>>(text: &str) -> serde_json::Value {
    let plain: Result<T, serde::de::value::Error> = T::deserialize(text.into_deserializer());
    if plain.is_ok() {
        return serde_json::Value::String(text.to_owned());
    }
    serde_saphyr::from_str_with_options::<serde_json::Value>(text, yaml_options())
        .unwrap_or_else(|_| serde_json::Value::String(text.to_owned()))
}

fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! { strict_booleans: true }
}

/// A value that must never be printed (the admin token): its `Debug` and `Display` show
/// `<redacted>`, so no dump of a configuration (`check-config`, a log line with `?config`)
/// can leak it. [`Secret::expose`] is the one way to its text, for the code that uses it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// The secret's text, for comparing or sending it: never for printing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Secret {
    fn from(text: &str) -> Secret {
        Secret(text.to_owned())
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A list of strings, written as a YAML list or as one string separated by commas or
/// whitespace (convenient in an environment variable).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StringList(pub Vec<String>);

impl<'de> Deserialize<'de> for StringList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = StringList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of strings, or one string separated by commas or spaces")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<StringList, E> {
                // A YAML flow list in a string (an environment variable): read as in a file.
                let t = v.trim();
                if t.starts_with('[') && t.ends_with(']') {
                    return serde_saphyr::from_str_with_options::<Vec<String>>(t, yaml_options())
                        .map(StringList)
                        .map_err(|e| E::custom(humanize(&e.to_string())));
                }
                Ok(StringList(
                    v.split(|c: char| c == ',' || c.is_whitespace())
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect(),
                ))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<StringList, A::Error> {
                let mut out = Vec::new();
                while let Some(item) = seq.next_element::<String>()? {
                    out.push(item);
                }
                Ok(StringList(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line.
    Json,
}

/// The validated configuration the program runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// Public listener.
    pub listen: SocketAddr,
    /// The app.
    pub upstream: Upstream,
    /// Whether `upstream` is the default (no layer set it): `serve -- <app>` then gives the
    /// app a free loopback port instead.
    pub upstream_is_default: bool,
    /// Admin listener.
    pub admin_listen: SocketAddr,
    /// Admin bearer token.
    pub admin_token: Option<Secret>,
    /// Cache directory.
    pub cache_dir: PathBuf,
    /// Disk budget in bytes.
    pub max_size: u64,
    /// Room kept free on the filesystem (its share of inodes is kept free too).
    pub min_free: MinFree,
    /// Most objects stored.
    pub max_objects: u64,
    /// Largest stored object in bytes.
    pub max_object_size: u64,
    /// Hot tier bytes; 0 = off.
    pub memory_size: u64,
    /// Largest hot-tier object.
    pub memory_object_max: u64,
    /// Bodies held open; `None` sizes it from the descriptor limit when the cache opens.
    pub open_files: Option<usize>,
    /// Eviction high watermark (share of `max_size`).
    pub high_watermark: f64,
    /// Eviction low watermark (share of `max_size`).
    pub low_watermark: f64,
    /// A full cache admits new objects by how often they are asked for.
    pub admission: bool,
    /// The order objects are evicted in.
    pub eviction: Order,
    /// Eviction timer.
    pub evict_interval: Duration,
    /// Bound on waiting for another request's fill.
    pub coalesce_timeout: Duration,
    /// Drain period.
    pub grace_period: Duration,
    /// Connect timeout to the app.
    pub upstream_connect_timeout: Duration,
    /// Response-header timeout from the app.
    pub upstream_timeout: Duration,
    /// Client header read timeout.
    pub client_header_timeout: Duration,
    /// Connection idle timeout.
    pub idle_timeout: Duration,
    /// Largest request head.
    pub max_header_size: usize,
    /// Concurrent connections.
    pub max_connections: usize,
    /// Serving threads, one event loop each.
    pub workers: usize,
    /// Wait for a supervised app to come up.
    pub app_start_timeout: Duration,
    /// Access log on/off.
    pub access_log: bool,
    /// Log format.
    pub log_format: LogFormat,
    /// Tracing filter.
    pub log_level: String,
    /// Trust client `X-Forwarded-*`.
    pub trust_forwarded: bool,
    /// Request headers removed before the app (lower-case names).
    pub strip_request_headers: Vec<http::HeaderName>,
    /// Stale-if-error window.
    pub stale_if_error: Duration,
    /// Heuristic freshness fraction.
    pub heuristic_fraction: f64,
    /// Heuristic freshness cap.
    pub heuristic_max: Duration,
    /// Freshness for fingerprinted names; zero = off.
    pub fingerprinted_ttl: Duration,
    /// Path rules, first match wins.
    pub rules: Vec<Rule>,
    /// Query parameters in the key.
    pub query: QueryKey,
    /// Where `prime --from` may fill from.
    pub prime_sources: PrimeSources,
    /// Compressed variants.
    pub compress: crate::compress::Settings,
    /// The shared tier; `None`: off.
    pub shared_tier: Option<SharedTierConfig>,
    /// Which headers tag a response, and the bounds on its tags.
    pub tags: TagRules,
    /// Memory the tag index may hold (bytes).
    pub max_tag_index_memory: u64,
}

impl Config {
    /// What the cache reads: the settings it is opened with ([`Cache::open`](crate::cache::Cache::open)).
    pub fn cache_settings(&self) -> crate::cache::Settings {
        crate::cache::Settings {
            cache_dir: self.cache_dir.clone(),
            max_size: self.max_size,
            min_free: self.min_free,
            max_objects: self.max_objects,
            max_object_size: self.max_object_size,
            memory_size: self.memory_size,
            memory_object_max: self.memory_object_max,
            open_files: self.open_files,
            max_connections: self.max_connections,
            high_watermark: self.high_watermark,
            low_watermark: self.low_watermark,
            admission: self.admission,
            eviction: self.eviction,
            evict_interval: self.evict_interval,
            coalesce_timeout: self.coalesce_timeout,
            max_tag_index_memory: self.max_tag_index_memory,
            tags: self.tags.clone(),
            compress: self.compress.clone(),
            heuristic_fraction: self.heuristic_fraction,
            heuristic_max: self.heuristic_max,
            segments: crate::cache::segments::Geometry::for_budget(self.max_size),
        }
    }

    /// The environment variables that hold sidecache's own secrets, withheld from a supervised
    /// app: `SIDECACHE_ADMIN_TOKEN` always (it opens purge and prime), and the shared tier's
    /// credentials ([`crate::shared_tier::CREDENTIAL_VARIABLES`]) when the tier is on. Without a
    /// shared tier sidecache does not use the `AWS_*` variables, and they are the app's.
    pub fn secret_variables(&self) -> Vec<&'static str> {
        let mut vars = vec!["SIDECACHE_ADMIN_TOKEN"];
        if self.shared_tier.is_some() {
            vars.extend_from_slice(crate::shared_tier::CREDENTIAL_VARIABLES);
        }
        vars
    }
}

/// The app's address: always plain HTTP on a local or private network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `http`.
    pub scheme: Scheme,
    /// `host:port`.
    pub authority: Authority,
}

impl Upstream {
    /// Parses `http://host:port` (a bare `host:port` is taken as http).
    pub fn parse(s: &str) -> Result<Upstream, String> {
        let with_scheme = if s.contains("://") {
            s.to_owned()
        } else {
            format!("http://{s}")
        };
        let uri: http::Uri = with_scheme.parse().map_err(|e| format!("`{s}`: {e}"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => {
                return Err(format!(
                    "`{s}`: scheme `{other}` is not supported (the app is reached over plain http)"
                ));
            }
            None => return Err(format!("`{s}`: missing scheme")),
        }
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(format!("`{s}`: a path prefix is not supported"));
        }
        let authority = uri.authority().cloned().ok_or_else(|| format!("`{s}`: missing host"))?;
        if authority.port_u16().is_none() {
            let authority = format!("{}:80", authority.host())
                .parse()
                .map_err(|e| format!("`{s}`: {e}"))?;
            return Ok(Upstream {
                scheme: Scheme::HTTP,
                authority,
            });
        }
        Ok(Upstream {
            scheme: Scheme::HTTP,
            authority,
        })
    }

    /// The port the app listens on.
    pub fn port(&self) -> u16 {
        self.authority.port_u16().unwrap_or(80)
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

/// Reads and merges the layers, then validates. `env` is the process environment (passed in so
/// tests can supply their own).
#[derive(Debug, Default, Clone)]
pub struct Loader {
    file: Option<PathBuf>,
    env: Vec<(String, String)>,
    flags: Vec<(&'static str, String)>,
}

impl Loader {
    /// A loader over the given environment.
    pub fn new(env: impl IntoIterator<Item = (String, String)>) -> Loader {
        Loader {
            env: env.into_iter().collect(),
            ..Loader::default()
        }
    }

    /// Reads this YAML file as the file layer (otherwise `SIDECACHE_CONFIG`, if set).
    pub fn file(mut self, path: Option<PathBuf>) -> Loader {
        self.file = path;
        self
    }

    /// The flag layer: `(key, value)` pairs; a flag is named like its key (`--max-size`).
    pub fn flags(mut self, flags: Vec<(&'static str, String)>) -> Loader {
        self.flags = flags;
        self
    }

    /// Merges all layers and validates the result.
    pub fn load(self) -> Result<Config, ConfigError> {
        self.load_explained().map(|(config, _)| config)
    }

    /// [`Loader::load`], with the effective value of every key and where it came from (for
    /// `check-config` and for telling what a reload changes).
    pub fn load_explained(self) -> Result<(Config, Effective), ConfigError> {
        let mut origins: HashMap<&'static str, Source> = HashMap::new();
        let mut nodes: HashMap<&'static str, serde_json::Value> = HashMap::new();
        let mut merged = RawConfig::default();
        let known = |key: &str| RawConfig::KEYS.iter().find(|k| **k == key).copied();

        let file = self.file.clone().or_else(|| {
            self.env
                .iter()
                .find(|(k, _)| k == "SIDECACHE_CONFIG")
                .map(|(_, v)| PathBuf::from(v))
        });
        if let Some(path) = file {
            let (layer, mut values) = read_file(&path)?;
            for key in layer.set_keys() {
                origins.insert(key, Source::File(path.clone()));
                nodes.insert(key, values.remove(key).unwrap_or(serde_json::Value::Null));
            }
            merged.overlay(layer);
        }

        // PORT is the platform's word for the public port; SIDECACHE_LISTEN beats it.
        let mut env_layer = RawConfig::default();
        if let Some((_, port)) = self.env.iter().find(|(k, _)| k == "PORT") {
            let port: u16 = port.trim().parse().map_err(|_| ConfigError::Invalid {
                key: "listen",
                origin: Source::Env("PORT".into()),
                message: format!("`{port}` is not a port number"),
            })?;
            env_layer.listen = Some(format!("0.0.0.0:{port}"));
            origins.insert("listen", Source::Env("PORT".into()));
            nodes.insert("listen", serde_json::Value::String(format!("0.0.0.0:{port}")));
        }
        let mut vars: Vec<&(String, String)> = self.env.iter().collect();
        vars.sort();
        for (var, value) in vars {
            let Some(suffix) = var.strip_prefix("SIDECACHE_") else {
                continue;
            };
            // Kubernetes service links: a Service named `sidecache` puts SIDECACHE_SERVICE_HOST,
            // SIDECACHE_PORT_8080_TCP, ... into every container of the namespace.
            if suffix == "CONFIG" || suffix.starts_with("SERVICE_") || suffix == "PORT" || suffix.starts_with("PORT_") {
                continue;
            }
            let key = suffix.to_ascii_lowercase();
            match env_layer.set_from_env(&key, value) {
                Ok(true) => {
                    let key = known(&key).unwrap_or("?");
                    origins.insert(key, Source::Env(var.clone()));
                    nodes.extend(RawConfig::text_node(key, value).map(|n| (key, n)));
                }
                Ok(false) => {
                    let hint = match did_you_mean(&key, RawConfig::KEYS) {
                        Some(k) => format!(" (did you mean SIDECACHE_{}?)", k.to_ascii_uppercase()),
                        None => " (the keys are listed in config.example.yaml)".to_owned(),
                    };
                    return Err(ConfigError::UnknownEnv {
                        var: var.clone(),
                        key,
                        hint,
                    });
                }
                Err(message) => {
                    return Err(ConfigError::Invalid {
                        key: known(&key).unwrap_or("?"),
                        origin: Source::Env(var.clone()),
                        message,
                    });
                }
            }
        }
        merged.overlay(env_layer);

        let mut flag_layer = RawConfig::default();
        for (key, value) in self.flags {
            let origin = Source::Flag(key);
            match flag_layer.set_from_env(key, &value) {
                Ok(true) => {
                    origins.insert(key, origin);
                    nodes.extend(RawConfig::text_node(key, &value).map(|n| (key, n)));
                }
                Ok(false) => {
                    return Err(ConfigError::Invalid {
                        key,
                        origin,
                        message: "no such key".into(),
                    });
                }
                Err(message) => return Err(ConfigError::Invalid { key, origin, message }),
            }
        }
        merged.overlay(flag_layer);

        let config = validate(merged, &origins)?;
        let effective = Effective::of(&config, &origins, nodes);
        Ok((config, effective))
    }
}

/// The effective configuration: every key's value as YAML and where it came from, in the
/// table's order. What `check-config` prints, and what a reload compares.
#[derive(Debug, Clone)]
pub struct Effective {
    /// `(key, value, source)`; `None` for a key left unset whose value is decided at startup
    /// (`open_files`).
    pub settings: Vec<(&'static str, Option<serde_json::Value>, Source)>,
}

/// Keys whose value is never printed.
const SECRET_KEYS: &[&str] = &["admin_token"];

impl Effective {
    fn of(
        config: &Config,
        origins: &HashMap<&'static str, Source>,
        mut nodes: HashMap<&'static str, serde_json::Value>,
    ) -> Effective {
        let settings = RawConfig::KEYS
            .iter()
            .map(|&key| {
                if let Some(node) = nodes.remove(key) {
                    return (key, Some(node), origins.get(key).cloned().unwrap_or(Source::Default));
                }
                let default = RawConfig::DEFAULTS.iter().find(|(k, _)| *k == key);
                if let Some((_, text)) = default {
                    return (key, RawConfig::text_node(key, text), Source::Default);
                }
                let derived = match key {
                    "cache_dir" => Some(serde_json::Value::String(config.cache_dir.display().to_string())),
                    "max_objects" => Some(config.max_objects.into()),
                    "max_object_size" => Some(config.max_object_size.into()),
                    "workers" => Some(config.workers.into()),
                    _ => None,
                };
                (key, derived, Source::Derived)
            })
            .collect();
        Effective { settings }
    }

    /// The value of `key` as YAML (`None`: unset, or no such key).
    pub fn value(&self, key: &str) -> Option<&serde_json::Value> {
        self.settings
            .iter()
            .find(|(k, ..)| *k == key)
            .and_then(|(_, v, _)| v.as_ref())
    }

    /// Takes `keys`' values and sources from `other` (what a reload put in force).
    pub fn adopt(&mut self, other: &Effective, keys: &[&str]) {
        for (key, value, source) in &mut self.settings {
            if keys.contains(key)
                && let Some((_, v, s)) = other.settings.iter().find(|(k, ..)| k == key)
            {
                *value = v.clone();
                *source = s.clone();
            }
        }
    }

    /// Keys whose value differs between `self` and `other` (the sources aside).
    pub fn changed(&self, other: &Effective) -> Vec<&'static str> {
        self.settings
            .iter()
            .filter(|(key, value, _)| other.value(key) != value.as_ref())
            .map(|(key, ..)| *key)
            .collect()
    }

    /// The configuration as a YAML file that loads back, each value's source in a comment.
    /// A secret is a comment (`<redacted>`), never its value: loaded back, it comes from where
    /// it came from before (the environment, a secret file).
    pub fn to_yaml(&self) -> String {
        let mut out = String::from(
            "# sidecache effective configuration: every key, its value and where it came from\n\
             # (default, config file, environment variable, flag, derived). Loads back as a\n\
             # configuration file; secrets are redacted.\n",
        );
        for (key, value, source) in &self.settings {
            let set = !matches!(source, Source::Default | Source::Derived);
            match value {
                Some(_) if SECRET_KEYS.contains(key) && set => {
                    out.push_str(&format!("# {key}: <redacted>  # from {source}\n"));
                }
                Some(value) => {
                    let text = serde_json::to_string(value).unwrap_or_else(|_| "null".into());
                    out.push_str(&format!("{key}: {text}  # {source}\n"));
                }
                None => out.push_str(&format!(
                    "# {key}: not set; decided when the cache opens (see config.example.yaml)\n"
                )),
            }
        }
        out
    }
}

/// The known name closest to `given` (by edit distance, at most a third of its length), for
/// "did you mean".
pub fn did_you_mean<'a>(given: &str, known: &[&'a str]) -> Option<&'a str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let here = row[j + 1];
                row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(here + 1);
                prev = here;
            }
        }
        row[b.len()]
    }
    known
        .iter()
        .map(|k| (distance(given, k), *k))
        .filter(|(d, _)| *d <= (given.chars().count() / 3).max(2))
        .min()
        .map(|(_, k)| k)
}

/// The YAML parser's messages in an operator's words: what was expected, not the parser's
/// option names; an unknown key with the closest known one instead of the list of all.
fn humanize(message: &str) -> String {
    let mut out = message
        .replace(
            ", set DuplicateKeyPolicy in Options if acceptable",
            " (a key may be set once)",
        )
        .replace("duplicate mapping key:", "duplicate key")
        .replace(
            "invalid boolean (strict mode expects true/false)",
            "expected true or false (yes, no, on and off are not booleans here)",
        )
        .replace("invalid floating point", "expected a number such as 0.9")
        .replace("invalid integer", "expected a whole number");
    while let Some(at) = out.find("unknown field `") {
        let rest = &out[at + "unknown field `".len()..];
        let Some(end) = rest.find('`') else { break };
        let field = rest[..end].to_owned();
        let tail = &rest[end + 1..];
        // `, expected one of `a`, `b`, ...` up to the end of the line.
        let (list, after) = match tail.strip_prefix(", expected one of ") {
            Some(l) => l.split_at(l.find('\n').unwrap_or(l.len())),
            None => ("", tail),
        };
        let candidates: Vec<&str> = list.split(", ").map(|c| c.trim_matches('`')).collect();
        let hint = match did_you_mean(&field, &candidates) {
            Some(k) => format!(" (did you mean `{k}`?)"),
            None if !list.is_empty() => " (the keys are listed in config.example.yaml)".to_owned(),
            None => String::new(),
        };
        out = format!("{}unknown key `{field}`{hint}{after}", &out[..at]);
    }
    out
}

/// Whether `filter` is a log filter whose every directive names a level: `info`,
/// `sidecache=debug,warn`; not `verbose` (which `EnvFilter` would take as a target name with
/// no level, silencing everything).
fn check_log_level(filter: &str) -> Result<(), String> {
    const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "`{directive}` names no level: use one of trace, debug, info, warn, error, off, \
                 or target=level (e.g. sidecache=debug,info)"
            ));
        }
    }
    tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| format!("`{filter}` is not a log filter: {e}"))?;
    Ok(())
}

fn read_file(path: &Path) -> Result<(RawConfig, serde_json::Map<String, serde_json::Value>), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let parse = |message| ConfigError::Parse {
        path: path.to_owned(),
        message,
    };
    let layer = parse_yaml(&text).map_err(parse)?;
    let values = if text.trim().is_empty() {
        serde_json::Map::new()
    } else {
        serde_saphyr::from_str_with_options(&text, yaml_options()).map_err(|e| parse(humanize(&e.to_string())))?
    };
    Ok((layer, values))
}

/// Parses a YAML document as one configuration layer.
pub fn parse_yaml(text: &str) -> Result<RawConfig, String> {
    if text.trim().is_empty() {
        return Ok(RawConfig::default());
    }
    serde_saphyr::from_str_with_options(text, yaml_options()).map_err(|e| humanize(&e.to_string()))
}

/// By default one object may be stored per this many bytes of `max_size`: below the size of
/// a typical static asset on disk, so that the bytes, not the count, bound a cache of ordinary
/// assets, while the index stays near 80 MB at 4 GB. Admission weighed by size keeps the
/// objects asked for most per byte, the smaller ones: at 24 KiB the count bound a cache of
/// 1-48 KiB assets (run.py's churn) at 197 of its 239 MiB.
const MAX_OBJECTS_PER: u64 = 16 << 10;

/// Default cache directory: under the system temp dir, writable on Heroku-like platforms.
pub fn default_cache_dir() -> PathBuf {
    std::env::temp_dir().join("sidecache")
}

fn validate(raw: RawConfig, origins: &HashMap<&'static str, Source>) -> Result<Config, ConfigError> {
    let source = |key: &'static str| origins.get(key).cloned().unwrap_or(Source::Default);
    let invalid = |key: &'static str, message: String| ConfigError::Invalid {
        key,
        origin: source(key),
        message,
    };
    let raw = raw.settle()?;
    let tags = tag_rules(&raw, &invalid)?;

    let addr = |key: &'static str, s: &str| -> Result<SocketAddr, ConfigError> {
        s.parse()
            .map_err(|_| invalid(key, format!("`{s}` is not an address such as 127.0.0.1:8080")))
    };
    let listen = addr("listen", &raw.listen)?;
    let admin_listen = addr("admin_listen", &raw.admin_listen)?;
    let upstream = Upstream::parse(&raw.upstream).map_err(|m| invalid("upstream", m))?;

    let nonzero = |key: &'static str, d: HumanDuration| -> Result<Duration, ConfigError> {
        if d.0.is_zero() {
            Err(invalid(key, "must be greater than zero".into()))
        } else {
            Ok(d.0)
        }
    };

    let max_size = raw.max_size.0;
    // By default a quarter of a small budget, so one object never crowds out the rest.
    let max_object_size = raw
        .max_object_size
        .map(|s| s.0)
        .unwrap_or((256 << 20).min(max_size / 4));
    let memory_size = raw.memory_size.0;
    let memory_object_max = raw.memory_object_max.0;
    if raw.open_files.is_some_and(|n| n > 1 << 20) {
        return Err(invalid("open_files", "must be at most 1048576".into()));
    }
    if max_size < 1 << 20 {
        return Err(invalid(
            "max_size",
            format!("{max_size} bytes is below the 1MiB minimum"),
        ));
    }
    if max_object_size == 0 || max_object_size > max_size / 2 {
        return Err(invalid(
            "max_object_size",
            format!("must be between 1 byte and half of max_size ({} bytes)", max_size / 2),
        ));
    }
    // Index memory and inodes grow with the count, not the bytes: bounded on their own. A
    // stored object spends at least one allocation unit (4 KiB, typically) and one name.
    let max_objects = raw.max_objects.unwrap_or((max_size / MAX_OBJECTS_PER).max(1));
    if max_objects == 0 || max_objects > max_size / 1024 {
        return Err(invalid(
            "max_objects",
            format!("must be between 1 and one per KiB of max_size ({})", max_size / 1024),
        ));
    }
    let high_watermark = raw.high_watermark;
    let low_watermark = raw.low_watermark;
    if !(0.1..=1.0).contains(&high_watermark) {
        return Err(invalid("high_watermark", "must be between 0.1 and 1.0".into()));
    }
    if !(0.05..=1.0).contains(&low_watermark) || low_watermark > high_watermark {
        return Err(invalid(
            "low_watermark",
            "must be between 0.05 and high_watermark".into(),
        ));
    }
    let heuristic_fraction = raw.heuristic_fraction;
    if !(0.0..=1.0).contains(&heuristic_fraction) {
        return Err(invalid("heuristic_fraction", "must be between 0.0 and 1.0".into()));
    }
    let max_header_size = raw.max_header_size.0 as usize;
    if !(8192..=1 << 24).contains(&max_header_size) {
        return Err(invalid("max_header_size", "must be between 8KiB and 16MiB".into()));
    }
    let max_connections = raw.max_connections;
    let workers = raw
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if !(1..=1024).contains(&workers) {
        return Err(invalid("workers", "must be 1-1024".into()));
    }
    if max_connections == 0 {
        return Err(invalid("max_connections", "must be at least 1".into()));
    }
    let log_level = raw.log_level;
    check_log_level(&log_level).map_err(|m| invalid("log_level", m))?;
    let admin_token = Some(raw.admin_token).filter(|t| !t.expose().is_empty());
    // Fail closed: beyond loopback, whoever reaches the admin port could purge the cache or
    // have it filled from the prime sources; /purge and /prime then require the token.
    if admin_token.is_none() && !admin_listen.ip().is_loopback() {
        return Err(invalid(
            "admin_token",
            format!(
                "required because admin_listen {admin_listen} (from {}) is not a loopback address: \
                 set SIDECACHE_ADMIN_TOKEN (e.g. from a secret) or listen on 127.0.0.1",
                source("admin_listen")
            ),
        ));
    }
    let prime_sources = PrimeSources::parse(&raw.prime_sources.0).map_err(|m| invalid("prime_sources", m))?;
    let mut rules = Vec::new();
    for (i, r) in raw.rules.into_iter().enumerate() {
        let mut rule = Rule::compile(r).map_err(|m| invalid("rules", format!("rule {}: {m}", i + 1)))?;
        if rule.name.is_empty() {
            rule.name = format!("rule-{}", i + 1);
        }
        if rules.iter().any(|r: &Rule| r.name == rule.name) {
            return Err(invalid(
                "rules",
                format!("rule {}: the name `{}` is taken by another rule", i + 1, rule.name),
            ));
        }
        rules.push(rule);
    }
    let strip_request_headers =
        strip_request_headers(raw.strip_request_headers.0).map_err(|m| invalid("strip_request_headers", m))?;
    let compress = crate::compress::Settings::compile(raw.compress).map_err(|m| invalid("compress", m))?;
    let shared_tier = match raw.shared_tier.trim() {
        "" => None,
        url => {
            let (bucket, prefix) = crate::shared_tier::parse_url(url).map_err(|m| invalid("shared_tier", m))?;
            let concurrency = raw.shared_tier_concurrency;
            if !(1..=1024).contains(&concurrency) {
                return Err(invalid("shared_tier_concurrency", "must be 1-1024".into()));
            }
            let queue = raw.shared_tier_queue;
            if !(1..=1 << 20).contains(&queue) {
                return Err(invalid("shared_tier_queue", "must be 1-1048576".into()));
            }
            Some(SharedTierConfig {
                bucket,
                prefix,
                min_fresh: raw.shared_tier_min_fresh.0,
                timeout: nonzero("shared_tier_timeout", raw.shared_tier_timeout)?,
                concurrency,
                queue,
                cooldown: nonzero("shared_tier_cooldown", raw.shared_tier_cooldown)?,
                upload_budget: raw.shared_tier_upload_budget.0,
            })
        }
    };
    let query = raw.query.compile().map_err(|m| invalid("query", m))?;

    Ok(Config {
        listen,
        upstream,
        upstream_is_default: !origins.contains_key("upstream"),
        admin_listen,
        admin_token,
        cache_dir: raw.cache_dir.unwrap_or_else(default_cache_dir),
        max_size,
        min_free: raw.min_free,
        max_objects,
        max_object_size,
        memory_size,
        memory_object_max,
        open_files: raw.open_files,
        high_watermark,
        low_watermark,
        admission: raw.admission,
        eviction: raw.eviction,
        evict_interval: nonzero("evict_interval", raw.evict_interval)?,
        coalesce_timeout: nonzero("coalesce_timeout", raw.coalesce_timeout)?,
        grace_period: raw.grace_period.0,
        upstream_connect_timeout: nonzero("upstream_connect_timeout", raw.upstream_connect_timeout)?,
        upstream_timeout: nonzero("upstream_timeout", raw.upstream_timeout)?,
        client_header_timeout: nonzero("client_header_timeout", raw.client_header_timeout)?,
        idle_timeout: nonzero("idle_timeout", raw.idle_timeout)?,
        max_header_size,
        max_connections,
        workers,
        app_start_timeout: nonzero("app_start_timeout", raw.app_start_timeout)?,
        access_log: raw.access_log,
        log_format: raw.log_format,
        log_level,
        trust_forwarded: raw.trust_forwarded,
        strip_request_headers,
        stale_if_error: raw.stale_if_error.0,
        heuristic_fraction,
        heuristic_max: raw.heuristic_max.0,
        fingerprinted_ttl: raw.fingerprinted_ttl.0,
        rules,
        query,
        prime_sources,
        compress,
        shared_tier,
        tags,
        max_tag_index_memory: raw.max_tag_index_memory.0,
    })
}

/// The tag headers and bounds (`surrogate_key_header`, `cache_tag_header`,
/// `max_tags_per_object`, `max_tag_length`, `tag_headers_to_clients`).
fn tag_rules(raw: &Settled, invalid: &dyn Fn(&'static str, String) -> ConfigError) -> Result<TagRules, ConfigError> {
    let mut headers = Vec::new();
    for (key, value, sep) in [
        ("surrogate_key_header", &raw.surrogate_key_header, Separator::Space),
        ("cache_tag_header", &raw.cache_tag_header, Separator::Comma),
    ] {
        let name = value.trim();
        if name.is_empty() {
            continue;
        }
        let parsed = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| invalid(key, format!("`{name}` is not a header name")))?;
        if headers.iter().any(|(n, _)| *n == parsed) {
            return Err(invalid(key, format!("`{name}` is already the other tag header")));
        }
        headers.push((parsed, sep));
    }
    let max_per_object = raw.max_tags_per_object as usize;
    if !(1..=1024).contains(&max_per_object) {
        return Err(invalid("max_tags_per_object", "must be 1-1024".into()));
    }
    let max_length = raw.max_tag_length as usize;
    if !(1..=4096).contains(&max_length) {
        return Err(invalid("max_tag_length", "must be 1-4096 bytes".into()));
    }
    Ok(TagRules {
        headers,
        max_per_object,
        max_length,
        to_clients: raw.tag_headers_to_clients,
    })
}

/// Validates `strip_request_headers`: header names, none that frames or routes the request.
fn strip_request_headers(names: Vec<String>) -> Result<Vec<http::HeaderName>, String> {
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let parsed = http::HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("`{name}` is not a header name"))?;
        if matches!(
            parsed,
            http::header::HOST | http::header::CONTENT_LENGTH | http::header::TRANSFER_ENCODING
        ) {
            return Err(format!("`{name}` frames or routes the request and cannot be removed"));
        }
        out.push(parsed);
    }
    Ok(out)
}

impl Config {
    /// The configuration with every default, for tests and the demo.
    pub fn defaults() -> Config {
        Loader::new(std::iter::empty())
            .load()
            .expect("the built-in defaults are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn strip_request_headers_defaults_and_overrides() {
        let c = Config::defaults();
        assert_eq!(c.strip_request_headers.len(), 28);
        assert!(c.strip_request_headers.iter().any(|n| n == "x-original-url"));
        let c = Loader::new(env(&[("SIDECACHE_STRIP_REQUEST_HEADERS", "[X-Custom, x-real-ip]")]))
            .load()
            .unwrap();
        assert_eq!(c.strip_request_headers, ["x-custom", "x-real-ip"]);
        let c = Loader::new(env(&[("SIDECACHE_STRIP_REQUEST_HEADERS", "[]")]))
            .load()
            .unwrap();
        assert!(c.strip_request_headers.is_empty(), "an empty list turns stripping off");
        for bad in ["[host]", "[\"bad name\"]"] {
            let err = Loader::new(env(&[("SIDECACHE_STRIP_REQUEST_HEADERS", bad)]))
                .load()
                .unwrap_err()
                .to_string();
            assert!(err.contains("strip_request_headers"), "{err}");
        }
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::defaults();
        assert_eq!(c.max_size, 4_000_000_000);
        assert_eq!(c.admin_listen, "127.0.0.1:6083".parse().unwrap());
        assert_eq!(c.grace_period, Duration::from_secs(25));
    }

    #[test]
    fn every_default_in_the_table_parses() {
        for (key, default) in RawConfig::DEFAULTS {
            let parsed = RawConfig::default().set_from_env(key, default);
            assert_eq!(parsed, Ok(true), "the default of `{key}`, `{default}`");
        }
        // Each key has its default in the table, or a derived one documented there.
        let derived: Vec<&str> = RawConfig::KEYS
            .iter()
            .filter(|k| !RawConfig::DEFAULTS.iter().any(|(d, _)| d == *k))
            .copied()
            .collect();
        assert_eq!(
            derived,
            ["cache_dir", "max_objects", "max_object_size", "open_files", "workers"]
        );
    }

    #[test]
    // A table of its own, of which only `settle` is used.
    #[allow(dead_code)]
    fn a_default_that_does_not_parse_is_a_config_error_from_the_default() {
        config_keys! {
            /// A key whose default is not a size.
            size: ByteSize = "4XB",
        }
        let err = RawConfig::default().settle().unwrap_err().to_string();
        assert!(err.contains("`size` from the default") && err.contains("4XB"), "{err}");
    }

    /// `config.example.yaml` sets every key that has a default in the table, and read as the
    /// only layer it gives the default configuration: a default changed in the table (or in
    /// `compress`, or a derivation) and not in the example fails here.
    #[test]
    fn config_example_shows_every_default() {
        let text = include_str!("../config.example.yaml");
        let layer = parse_yaml(text).expect("config.example.yaml parses");
        let set = layer.set_keys();
        for (key, _) in RawConfig::DEFAULTS {
            assert!(set.contains(key), "config.example.yaml does not set `{key}`");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("example.yaml");
        std::fs::write(&path, text).unwrap();
        let mut example = Loader::new(std::iter::empty()).file(Some(path)).load().unwrap();
        let defaults = Config::defaults();
        // The example writes /tmp/sidecache; the default follows $TMPDIR. Its upstream is the
        // default's value, but set.
        example.cache_dir = defaults.cache_dir.clone();
        assert!(!example.upstream_is_default);
        example.upstream_is_default = true;
        let (example, defaults) = (format!("{example:#?}"), format!("{defaults:#?}"));
        for (e, d) in example.lines().zip(defaults.lines()) {
            assert_eq!(e, d, "config.example.yaml (left) and the defaults (right) differ");
        }
        assert_eq!(example, defaults);
    }

    #[test]
    fn max_objects_defaults_to_one_per_16_kib_of_max_size_and_is_bounded() {
        assert_eq!(Config::defaults().max_objects, 4_000_000_000 / 16384);
        let c = Loader::new(env(&[
            ("SIDECACHE_MAX_SIZE", "64MiB"),
            ("SIDECACHE_MAX_OBJECTS", "500"),
        ]))
        .load()
        .unwrap();
        assert_eq!(c.max_objects, 500);
        for bad in ["0", "65537"] {
            let err = Loader::new(env(&[("SIDECACHE_MAX_SIZE", "64MiB"), ("SIDECACHE_MAX_OBJECTS", bad)]))
                .load()
                .unwrap_err()
                .to_string();
            assert!(err.contains("max_objects"), "{err}");
        }
    }

    #[test]
    fn env_overrides_file_and_flag_overrides_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "max_size: 1GB\nmemory_size: 1MiB\nlisten: 127.0.0.1:1000\n").unwrap();
        let flags = vec![("listen", "127.0.0.1:3000".to_owned())];
        let c = Loader::new(env(&[
            ("SIDECACHE_MAX_SIZE", "2GB"),
            ("SIDECACHE_LISTEN", "127.0.0.1:2000"),
        ]))
        .file(Some(path))
        .flags(flags)
        .load()
        .unwrap();
        assert_eq!(c.max_size, 2_000_000_000, "env beats file");
        assert_eq!(c.memory_size, 1 << 20, "file beats default");
        assert_eq!(c.listen, "127.0.0.1:3000".parse().unwrap(), "flag beats env");
    }

    #[test]
    fn port_sets_public_listener_but_sidecache_listen_wins() {
        let c = Loader::new(env(&[("PORT", "5000")])).load().unwrap();
        assert_eq!(c.listen, "0.0.0.0:5000".parse().unwrap());
        let c = Loader::new(env(&[("PORT", "5000"), ("SIDECACHE_LISTEN", "127.0.0.1:7")]))
            .load()
            .unwrap();
        assert_eq!(c.listen, "127.0.0.1:7".parse().unwrap());
    }

    #[test]
    fn unknown_file_key_is_refused_naming_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.yaml");
        std::fs::write(&path, "max_sise: 1GB\n").unwrap();
        let err = Loader::new(std::iter::empty())
            .file(Some(path.clone()))
            .load()
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_sise"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
    }

    #[test]
    fn unknown_env_key_and_bad_env_value_are_refused() {
        let err = Loader::new(env(&[("SIDECACHE_MAX_SIZ", "1")]))
            .load()
            .unwrap_err()
            .to_string();
        assert!(err.contains("SIDECACHE_MAX_SIZ"), "{err}");
        let err = Loader::new(env(&[("SIDECACHE_MAX_SIZE", "lots")]))
            .load()
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_size") && err.contains("SIDECACHE_MAX_SIZE"), "{err}");
    }

    #[test]
    fn kubernetes_service_link_variables_are_not_keys() {
        let c = Loader::new(env(&[
            ("SIDECACHE_SERVICE_HOST", "10.0.0.1"),
            ("SIDECACHE_SERVICE_PORT", "80"),
            ("SIDECACHE_PORT", "tcp://10.0.0.1:80"),
            ("SIDECACHE_PORT_80_TCP_ADDR", "10.0.0.1"),
        ]))
        .load();
        assert!(c.is_ok(), "{:?}", c.err());
    }

    #[test]
    fn env_values_parse_as_their_types() {
        let c = Loader::new(env(&[
            ("SIDECACHE_ACCESS_LOG", "false"),
            ("SIDECACHE_MAX_CONNECTIONS", "12"),
            ("SIDECACHE_GRACE_PERIOD", "3s"),
            ("SIDECACHE_ADMIN_TOKEN", "a#b: c"),
            ("SIDECACHE_MIN_FREE", "10%"),
            ("SIDECACHE_EVICTION", "lru"),
        ]))
        .load()
        .unwrap();
        assert_eq!(c.eviction, Order::Lru);
        assert_eq!(c.cache_settings().eviction, Order::Lru);
        assert!(!c.access_log);
        assert_eq!(c.max_connections, 12);
        assert_eq!(c.grace_period, Duration::from_secs(3));
        assert_eq!(c.admin_token.as_ref().map(Secret::expose), Some("a#b: c"));
        assert_eq!(c.min_free, MinFree::Percent(10.0));
    }

    #[test]
    fn bad_flag_value_names_the_flag() {
        let err = Loader::new(std::iter::empty())
            .flags(vec![("max_size", "4XB".into())])
            .load()
            .unwrap_err()
            .to_string();
        assert!(err.contains("--max-size") && err.contains("max_size"), "{err}");
    }

    #[test]
    fn strict_booleans_refuse_yes() {
        let err = parse_yaml("access_log: yes\n").unwrap_err();
        assert!(err.contains("access_log") || err.contains("bool"), "{err}");
        let err = parse_yaml("eviction: lfu\n").unwrap_err();
        assert!(err.contains("eviction"), "{err}");
    }

    #[test]
    fn admin_beyond_loopback_requires_the_token() {
        for addr in ["0.0.0.0:6083", "[::]:6083", "10.1.2.3:6083", "[::ffff:127.0.0.1]:6083"] {
            let err = Loader::new(env(&[("SIDECACHE_ADMIN_LISTEN", addr)]))
                .load()
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("admin_token") && err.contains("SIDECACHE_ADMIN_LISTEN") && err.contains("loopback"),
                "{addr}: {err}"
            );
        }
        for addr in ["127.0.0.1:6083", "127.8.9.10:0", "[::1]:6083"] {
            let c = Loader::new(env(&[("SIDECACHE_ADMIN_LISTEN", addr)])).load();
            assert!(c.is_ok(), "{addr}: {:?}", c.err());
        }
        let c = Loader::new(env(&[
            ("SIDECACHE_ADMIN_LISTEN", "0.0.0.0:6083"),
            ("SIDECACHE_ADMIN_TOKEN", "t"),
        ]))
        .load()
        .unwrap();
        assert_eq!(c.admin_token.as_ref().map(Secret::expose), Some("t"));
        let empty = Loader::new(env(&[
            ("SIDECACHE_ADMIN_LISTEN", "0.0.0.0:6083"),
            ("SIDECACHE_ADMIN_TOKEN", ""),
        ]))
        .load();
        assert!(empty.is_err(), "an empty token is no token");
    }

    #[test]
    fn prime_sources_from_file_list_and_env_string() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            "prime_sources:\n  - https://cdn.example.com/builds\n  - http://127.0.0.1:8000\n",
        )
        .unwrap();
        let c = Loader::new(std::iter::empty()).file(Some(path)).load().unwrap();
        let inside = reqwest::Url::parse("https://cdn.example.com/builds/a.js").unwrap();
        assert!(c.prime_sources.contains(&inside));
        let c = Loader::new(env(&[(
            "SIDECACHE_PRIME_SOURCES",
            "https://cdn.example.com/builds, http://127.0.0.1:8000",
        )]))
        .load()
        .unwrap();
        assert!(c.prime_sources.contains(&inside));
        assert!(
            c.prime_sources
                .contains(&reqwest::Url::parse("http://127.0.0.1:8000/x").unwrap())
        );
        assert!(Config::defaults().prime_sources.is_empty(), "none by default");
        let err = Loader::new(env(&[("SIDECACHE_PRIME_SOURCES", "ftp://x")]))
            .load()
            .unwrap_err()
            .to_string();
        assert!(err.contains("prime_sources"), "{err}");
    }

    #[test]
    fn shared_tier_from_env_with_its_defaults_and_flag_overrides() {
        assert!(Config::defaults().shared_tier.is_none(), "off by default");
        let c = Loader::new(env(&[("SIDECACHE_SHARED_TIER", "s3://assets/fleet/web")]))
            .load()
            .unwrap();
        let t = c.shared_tier.expect("on");
        assert_eq!((t.bucket.as_str(), t.prefix.as_str()), ("assets", "fleet/web"));
        assert_eq!(t.min_fresh, Duration::from_secs(3600));
        assert_eq!(t.timeout, Duration::from_secs(2));
        assert_eq!((t.concurrency, t.queue), (16, 1024));
        assert_eq!(t.cooldown, Duration::from_secs(30));
        let c = Loader::new(env(&[
            ("SIDECACHE_SHARED_TIER", "s3://assets/a"),
            ("SIDECACHE_SHARED_TIER_MIN_FRESH", "10m"),
            ("SIDECACHE_SHARED_TIER_QUEUE", "8"),
        ]))
        .flags(vec![("shared_tier", "s3://other/b".into())])
        .load()
        .unwrap();
        let t = c.shared_tier.expect("on");
        assert_eq!(
            (t.bucket.as_str(), t.min_fresh, t.queue),
            ("other", Duration::from_secs(600), 8)
        );
        for (var, value, key) in [
            ("SIDECACHE_SHARED_TIER", "https://assets/p", "shared_tier"),
            ("SIDECACHE_SHARED_TIER_TIMEOUT", "0s", "shared_tier_timeout"),
            ("SIDECACHE_SHARED_TIER_CONCURRENCY", "0", "shared_tier_concurrency"),
        ] {
            let mut vars = vec![(var, value)];
            if var != "SIDECACHE_SHARED_TIER" {
                vars.push(("SIDECACHE_SHARED_TIER", "s3://assets/p"));
            }
            let err = Loader::new(env(&vars)).load().unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn an_upstream_set_to_the_default_value_is_still_set() {
        assert!(Config::defaults().upstream_is_default);
        let set = Loader::new(env(&[("SIDECACHE_UPSTREAM", "http://127.0.0.1:3000")]))
            .load()
            .unwrap();
        assert_eq!(set.upstream, Config::defaults().upstream);
        assert!(
            !set.upstream_is_default,
            "set by the environment, to the default's value"
        );
    }

    #[test]
    fn upstream_must_be_plain_http_without_path() {
        assert!(Upstream::parse("http://127.0.0.1:3000").is_ok());
        assert_eq!(Upstream::parse("localhost").unwrap().port(), 80);
        assert!(Upstream::parse("https://x:1").is_err());
        assert!(Upstream::parse("http://x:1/app").is_err());
    }
}
