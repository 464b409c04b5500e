//! Compressed variants, the pure parts: the `compress:` settings, which stored responses get
//! variants and at what levels ([`Settings::plan`]), and the encoders (the `brotli`, `zstd`
//! and `flate2` crates). The pool that runs them and stores their output is
//! `cache::variants`.

use std::time::{Duration, Instant};

use http::header::{self, HeaderMap};
use serde::Deserialize;

use crate::negotiate::Coding;
use crate::policy::CacheControl;
use crate::units::{ByteSize, HumanDuration};

/// Media types compressed by default: text and the binary formats that shrink (wasm, TTF and
/// OTF fonts, icons). Never images in compressed formats, video, audio, archives or WOFF
/// fonts (already compressed). `text/*` covers every text type.
pub const DEFAULT_TYPES: &[&str] = &[
    "text/*",
    "application/javascript",
    "application/x-javascript",
    "application/ecmascript",
    "application/json",
    "application/ld+json",
    "application/manifest+json",
    "application/geo+json",
    "application/xml",
    "application/xhtml+xml",
    "application/rss+xml",
    "application/atom+xml",
    "application/wasm",
    "image/svg+xml",
    "image/x-icon",
    "image/vnd.microsoft.icon",
    "image/bmp",
    "font/ttf",
    "font/otf",
    "application/x-font-ttf",
    "application/x-font-otf",
    "application/vnd.ms-fontobject",
];

/// Compression levels, one per coding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Levels {
    /// Brotli quality, 0..=11.
    pub br: u32,
    /// Zstandard level, 1..=22.
    pub zstd: i32,
    /// Gzip level, 1..=9.
    pub gzip: u32,
}

impl Levels {
    /// For long-lived objects: the best ratios (brotli 11 is ~1 MB/s of input; worth it once
    /// for an object served for a year).
    pub const LONG: Levels = Levels {
        br: 11,
        zstd: 19,
        gzip: 9,
    };
    /// For short-lived objects: fast levels, still smaller than what apps compress on the fly.
    pub const SHORT: Levels = Levels {
        br: 5,
        zstd: 3,
        gzip: 6,
    };
    /// Ceilings for bodies over [`LARGE`]: a few seconds of one core at most.
    pub const LARGE_CAP: Levels = Levels {
        br: 9,
        zstd: 15,
        gzip: 9,
    };

    fn validate(&self) -> Result<(), String> {
        if self.br > 11 || !(1..=22).contains(&self.zstd) || !(1..=9).contains(&self.gzip) {
            return Err(format!("levels {self:?} out of range (br 0-11, zstd 1-22, gzip 1-9)"));
        }
        Ok(())
    }

    fn min(self, cap: Levels) -> Levels {
        Levels {
            br: self.br.min(cap.br),
            zstd: self.zstd.min(cap.zstd),
            gzip: self.gzip.min(cap.gzip),
        }
    }

    /// The level for one coding, as the encoder takes it.
    pub fn of(&self, coding: Coding) -> i32 {
        match coding {
            Coding::Br => self.br as i32,
            Coding::Zstd => self.zstd,
            Coding::Gzip => self.gzip as i32,
        }
    }
}

/// Bodies above this size are compressed at no more than [`Levels::LARGE_CAP`].
pub const LARGE: u64 = 1 << 20;

/// `compress:` as written: `false`/`true`, or a map of the keys below.
#[derive(Debug, Clone)]
pub enum RawCompress {
    /// `compress: false` turns it off; `true` is the defaults.
    Switch(bool),
    /// The keys.
    Keys(RawCompressKeys),
}

impl<'de> Deserialize<'de> for RawCompress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RawCompress;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("`false`, `true`, or a map of enabled, types, min_size, max_size, long_lived, long_levels, short_levels, threads, queue, cpu_share, cpu_burst")
            }
            fn visit_bool<E: serde::de::Error>(self, on: bool) -> Result<RawCompress, E> {
                Ok(RawCompress::Switch(on))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RawCompress, A::Error> {
                RawCompressKeys::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(RawCompress::Keys)
            }
        }
        d.deserialize_any(V)
    }
}

/// The keys of `compress:`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCompressKeys {
    /// On by default.
    pub enabled: Option<bool>,
    /// Media types compressed (`type/subtype`, or `type/*`).
    pub types: Option<Vec<String>>,
    /// Smallest body compressed.
    pub min_size: Option<ByteSize>,
    /// Largest body compressed.
    pub max_size: Option<ByteSize>,
    /// Freshness lifetime from which an object counts as long-lived.
    pub long_lived: Option<HumanDuration>,
    /// Levels for long-lived objects (and `immutable` ones).
    pub long_levels: Option<Levels>,
    /// Levels for the others.
    pub short_levels: Option<Levels>,
    /// Background threads compressing (each runs at a lower CPU priority).
    pub threads: Option<usize>,
    /// Distinct bodies waiting for a thread (and for the CPU budget); more are not compressed
    /// (counted). Default: 256.
    pub queue: Option<usize>,
    /// Share of one core the compressing threads may use on average (0 < share <= threads).
    pub cpu_share: Option<f64>,
    /// CPU time they may use at once beyond that average (the token bucket's depth).
    pub cpu_burst: Option<HumanDuration>,
}

/// The `compress:` settings in force.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// Variants are made at all.
    pub enabled: bool,
    /// Media types compressed, lower-case; `type/*` entries as their `type/` prefix.
    pub types: Vec<String>,
    /// Smallest body compressed (bytes).
    pub min_size: u64,
    /// Largest body compressed (bytes).
    pub max_size: u64,
    /// Lifetime from which an object is long-lived.
    pub long_lived: Duration,
    /// Levels for long-lived objects.
    pub long_levels: Levels,
    /// Levels for short-lived objects.
    pub short_levels: Levels,
    /// Compressing threads.
    pub threads: usize,
    /// Distinct bodies that may wait for a thread.
    pub queue: usize,
    /// Average share of one core spent compressing, at most.
    pub cpu_share: f64,
    /// CPU time that may be spent at once beyond the average.
    pub cpu_burst: Duration,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings::compile(RawCompress::Switch(true)).expect("the defaults are valid")
    }
}

impl Settings {
    /// The settings from `compress:` (`true`, the configuration's default, gives the defaults of
    /// every nested key, which are written here).
    pub fn compile(raw: RawCompress) -> Result<Settings, String> {
        let (enabled, keys) = match raw {
            RawCompress::Switch(on) => (on, RawCompressKeys::default()),
            RawCompress::Keys(k) => (k.enabled.unwrap_or(true), k),
        };
        let types: Vec<String> = keys
            .types
            .unwrap_or_else(|| DEFAULT_TYPES.iter().map(|t| (*t).to_owned()).collect())
            .into_iter()
            .map(|t| {
                let t = t.trim().to_ascii_lowercase();
                match t.split_once('/') {
                    Some((a, b)) if !a.is_empty() && !b.is_empty() => Ok(t.trim_end_matches('*').to_owned()),
                    _ => Err(format!("type `{t}` is not `type/subtype` or `type/*`")),
                }
            })
            .collect::<Result<_, _>>()?;
        let long_levels = keys.long_levels.unwrap_or(Levels::LONG);
        let short_levels = keys.short_levels.unwrap_or(Levels::SHORT);
        long_levels.validate()?;
        short_levels.validate()?;
        let threads = keys.threads.unwrap_or(1);
        if threads == 0 || threads > 64 {
            return Err(format!(
                "threads {threads}: from 1 to 64 (turn compression off with enabled: false)"
            ));
        }
        let min_size = keys.min_size.map_or(1024, |b| b.0);
        let max_size = keys.max_size.map_or(8 << 20, |b| b.0);
        if max_size < min_size {
            return Err(format!("max_size {max_size} is below min_size {min_size}"));
        }
        if max_size > 1 << 30 {
            return Err("max_size: at most 1 GiB (a body is compressed in memory)".into());
        }
        let cpu_share = keys.cpu_share.unwrap_or(0.25);
        if !(cpu_share > 0.0 && cpu_share <= threads as f64) {
            return Err(format!(
                "cpu_share {cpu_share}: above 0 and at most threads ({threads}) (turn compression off with enabled: false)"
            ));
        }
        let cpu_burst = keys.cpu_burst.map_or(Duration::from_secs(30), |d| d.0);
        if cpu_burst > Duration::from_secs(3600) {
            return Err("cpu_burst: at most 1h".into());
        }
        Ok(Settings {
            enabled,
            types,
            min_size,
            max_size,
            long_lived: keys.long_lived.map_or(Duration::from_secs(86_400), |d| d.0),
            long_levels,
            short_levels,
            threads,
            queue: keys.queue.map_or(256, |q| q.clamp(1, 1 << 20)),
            cpu_share,
            cpu_burst,
        })
    }

    /// Whether a media type (a `Content-Type` value, parameters and all) is compressed.
    pub fn compresses_type(&self, content_type: &str) -> bool {
        // (The configured types are lower case; compared in place, without a copy.)
        let essence = content_type.split(';').next().unwrap_or("").trim();
        self.types.iter().any(|t| {
            if t.ends_with('/') {
                essence.len() > t.len() && essence.as_bytes()[..t.len()].eq_ignore_ascii_case(t.as_bytes())
            } else {
                essence.eq_ignore_ascii_case(t)
            }
        })
    }

    /// Whether a stored response gets variants: a 200 of a compressed type, within the size
    /// bounds, not coded already, and not marked `no-transform` (RFC 9110 §7.7).
    pub fn eligible(&self, status: u16, headers: &HeaderMap, body_len: u64) -> bool {
        if !self.enabled || status != 200 || body_len < self.min_size || body_len > self.max_size {
            return false;
        }
        let coded = headers.get_all(header::CONTENT_ENCODING).iter().any(|v| {
            v.to_str().map_or(true, |t| {
                t.split(',').any(|c| !c.trim().eq_ignore_ascii_case("identity"))
            })
        });
        if coded || headers.contains_key(header::CONTENT_RANGE) {
            return false;
        }
        if CacheControl::parse(headers).no_transform {
            return false;
        }
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| self.compresses_type(t))
    }

    /// The levels for a body of `len` bytes whose freshness lifetime is `lifetime`.
    pub fn levels(&self, lifetime: Duration, immutable: bool, len: u64) -> Levels {
        let levels = if immutable || lifetime >= self.long_lived {
            self.long_levels
        } else {
            self.short_levels
        };
        if len > LARGE {
            levels.min(Levels::LARGE_CAP)
        } else {
            levels
        }
    }
}

/// The compressing threads' CPU budget: a token bucket of CPU seconds, filled at `share`
/// seconds a second up to `burst`. A thread waits until the bucket is not empty before it
/// starts on a body, then spends what the body actually cost (its thread CPU time), so the
/// bucket may go below zero by one body's compression. Over any span of `t` seconds the
/// threads spend at most `burst + share * t` plus one body's cost per thread, whatever the
/// requests: a flood of distinct bodies waits (and, its queue full, is dropped), it does not
/// take the CPU the app shares.
#[derive(Debug, Clone)]
pub struct CpuBudget {
    share: f64,
    burst: f64,
    /// Seconds available (negative: owed).
    level: f64,
    at: Instant,
}

impl CpuBudget {
    /// A full bucket.
    pub fn new(share: f64, burst: Duration, now: Instant) -> CpuBudget {
        CpuBudget {
            share,
            burst: burst.as_secs_f64(),
            level: burst.as_secs_f64(),
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + elapsed * self.share).min(self.burst);
        self.at = self.at.max(now);
    }

    /// How long until work may start (zero: now).
    pub fn wait(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.level > 0.0 || self.burst == 0.0 && self.level >= 0.0 {
            return Duration::ZERO;
        }
        // The time for the bucket to reach just above zero.
        Duration::from_secs_f64(-self.level / self.share + 0.001)
    }

    /// Records CPU time spent.
    pub fn spend(&mut self, cpu: Duration, now: Instant) {
        self.refill(now);
        self.level -= cpu.as_secs_f64();
    }
}

/// CPU time the calling thread has used so far.
pub fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(t.tv_sec.max(0) as u64, t.tv_nsec.clamp(0, 999_999_999) as u32)
}

/// Compresses `body` in `coding` at `level`.
pub fn encode(coding: Coding, level: i32, body: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write;
    let mut out = Vec::with_capacity(body.len() / 3 + 64);
    match coding {
        Coding::Br => {
            let params = brotli::enc::BrotliEncoderParams {
                quality: level,
                // A window as large as the body (up to 16 MiB) finds its repeats.
                lgwin: (body.len().max(1 << 16) as f64).log2().ceil().clamp(16.0, 24.0) as i32,
                size_hint: body.len(),
                ..Default::default()
            };
            brotli::BrotliCompress(&mut &body[..], &mut out, &params)?;
        }
        Coding::Zstd => {
            let mut enc = zstd::stream::Encoder::new(&mut out, level)?;
            enc.set_pledged_src_size(Some(body.len() as u64))?;
            enc.include_checksum(true)?;
            enc.write_all(body)?;
            enc.finish()?;
        }
        Coding::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(&mut out, flate2::Compression::new(level as u32));
            enc.write_all(body)?;
            enc.finish()?;
        }
    }
    Ok(out)
}

/// Whether a coded body is worth keeping beside an identity body of `len` bytes: at least
/// 1/16 smaller (a variant that saves less costs a file, an inode and a lookup for little).
pub fn worth_keeping(coded: u64, len: u64) -> bool {
    coded < len - len / 16
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use http::HeaderValue;

    use super::*;

    fn head(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(n, v)| (http::HeaderName::from_static(n), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn every_coding_decodes_back_to_the_body() {
        let body = b"function f(x) { return x * 2; }\n".repeat(4000);
        for coding in Coding::ALL {
            for levels in [Levels::LONG, Levels::SHORT] {
                let coded = encode(coding, levels.of(coding), &body).expect("encodes");
                assert!(worth_keeping(coded.len() as u64, body.len() as u64), "{coding:?}");
                let mut back = Vec::new();
                match coding {
                    Coding::Br => brotli::Decompressor::new(&coded[..], 4096).read_to_end(&mut back),
                    Coding::Zstd => zstd::stream::Decoder::new(&coded[..])
                        .expect("zstd")
                        .read_to_end(&mut back),
                    Coding::Gzip => flate2::read::GzDecoder::new(&coded[..]).read_to_end(&mut back),
                }
                .expect("decodes");
                assert_eq!(back, body, "{coding:?}");
            }
        }
    }

    #[test]
    fn only_compressible_uncoded_transformable_200s_in_bounds_get_variants() {
        let s = Settings::default();
        let js = head(&[("content-type", "application/javascript; charset=utf-8")]);
        assert!(s.eligible(200, &js, 50_000));
        assert!(s.eligible(200, &head(&[("content-type", "text/css")]), 50_000));
        assert!(s.eligible(200, &head(&[("content-type", "image/svg+xml")]), 50_000));
        assert!(!s.eligible(200, &head(&[("content-type", "image/png")]), 50_000));
        assert!(!s.eligible(200, &head(&[("content-type", "font/woff2")]), 50_000));
        assert!(!s.eligible(200, &head(&[("content-type", "video/mp4")]), 50_000));
        assert!(!s.eligible(200, &head(&[("content-type", "application/zip")]), 50_000));
        assert!(!s.eligible(200, &head(&[]), 50_000));
        // Sizes, status, codings, no-transform.
        assert!(!s.eligible(200, &js, 100));
        assert!(!s.eligible(200, &js, 9 << 20));
        assert!(!s.eligible(404, &js, 50_000));
        let gz = head(&[("content-type", "text/css"), ("content-encoding", "gzip")]);
        assert!(!s.eligible(200, &gz, 50_000));
        let id = head(&[("content-type", "text/css"), ("content-encoding", "identity")]);
        assert!(s.eligible(200, &id, 50_000));
        let nt = head(&[("content-type", "text/css"), ("cache-control", "public, no-transform")]);
        assert!(!s.eligible(200, &nt, 50_000));
        // `text/*` does not match `text/` alone, nor another type that starts alike.
        assert!(!s.compresses_type("text/"));
        assert!(!s.compresses_type("textual/x"));
        let off = Settings::compile(RawCompress::Switch(false)).expect("valid");
        assert!(!off.eligible(200, &js, 50_000));
    }

    #[test]
    fn long_lived_objects_get_the_best_levels_and_large_ones_a_ceiling() {
        let s = Settings::default();
        let day = Duration::from_secs(86_400);
        assert_eq!(s.levels(day, false, 10_000), Levels::LONG);
        assert_eq!(s.levels(Duration::from_secs(60), true, 10_000), Levels::LONG);
        assert_eq!(s.levels(Duration::from_secs(60), false, 10_000), Levels::SHORT);
        assert_eq!(s.levels(day, false, 4 << 20), Levels::LARGE_CAP);
    }

    #[test]
    fn the_cpu_budget_allows_its_burst_then_its_share() {
        let t0 = Instant::now();
        let mut b = CpuBudget::new(0.25, Duration::from_secs(2), t0);
        assert_eq!(b.wait(t0), Duration::ZERO);
        // A body that cost 3 s leaves the bucket 1 s in debt: 4 s at a quarter of a core.
        b.spend(Duration::from_secs(3), t0);
        let w = b.wait(t0);
        assert!(w > Duration::from_secs(4) && w < Duration::from_millis(4010), "{w:?}");
        assert_eq!(b.wait(t0 + w), Duration::ZERO);
        // Idle time refills up to the burst only.
        let later = t0 + Duration::from_secs(3600);
        b.spend(Duration::from_millis(2100), later);
        assert!(b.wait(later) > Duration::ZERO, "no more than the burst was saved up");
        // Over a long run, spent <= burst + share * elapsed + one body.
        let mut b = CpuBudget::new(0.5, Duration::from_secs(1), t0);
        let (mut now, mut spent) = (t0, Duration::ZERO);
        for _ in 0..1000 {
            now += b.wait(now);
            b.spend(Duration::from_millis(300), now);
            spent += Duration::from_millis(300);
        }
        let elapsed = now.duration_since(t0).as_secs_f64();
        assert!(
            spent.as_secs_f64() <= 1.0 + 0.5 * elapsed + 0.3 + 1e-6,
            "{spent:?} in {elapsed}"
        );
    }

    #[test]
    fn compress_is_written_as_a_switch_or_a_map_and_a_wrong_key_is_named() {
        let parse = |yaml: &str| serde_saphyr::from_str::<RawCompress>(yaml).map_err(|e| e.to_string());
        let off = Settings::compile(parse("false").expect("a switch")).expect("valid");
        assert!(!off.enabled);
        let map = Settings::compile(parse("{threads: 2, min_size: 4KiB}").expect("a map")).expect("valid");
        assert_eq!((map.enabled, map.threads, map.min_size), (true, 2, 4096));
        assert!(parse("{thread: 2}").expect_err("unknown key").contains("thread"));
        assert!(parse("bogus").expect_err("a string").contains("a map of"));
    }

    #[test]
    fn settings_refuse_what_cannot_work() {
        let keys = |k: RawCompressKeys| Settings::compile(RawCompress::Keys(k));
        assert!(
            keys(RawCompressKeys {
                threads: Some(0),
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            keys(RawCompressKeys {
                long_levels: Some(Levels {
                    br: 12,
                    zstd: 3,
                    gzip: 6
                }),
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            keys(RawCompressKeys {
                types: Some(vec!["javascript".into()]),
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            keys(RawCompressKeys {
                min_size: Some(ByteSize(10_000)),
                max_size: Some(ByteSize(1_000)),
                ..Default::default()
            })
            .is_err()
        );
        let s = keys(RawCompressKeys {
            types: Some(vec!["Application/Foo".into()]),
            ..Default::default()
        })
        .expect("valid");
        assert!(s.compresses_type("application/foo"));
        assert!(!s.compresses_type("text/css"));
    }
}
