//! Quantities as operators write them in the configuration and the rules: byte sizes (`4GB`,
//! `512MiB`, `65536`), `min_free` as bytes or a percentage of the filesystem, and durations
//! (`25s`, `1h 30m`). Leaf types: this module imports nothing from the crate, so `config` and
//! `rules` both use it without importing each other.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

/// A number of bytes, parsed from `4GB` (powers of 1000), `512MiB` (powers of 1024) or a bare
/// integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

/// Parses a size: digits (with an optional fraction), optional spaces, an optional unit.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("`{s}` is not a size such as 4GB, 512MiB or 65536"));
    }
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "`{s}`: unknown unit `{other}` (use B, KB, MB, GB, KiB, MiB, GiB)"
            ));
        }
    };
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult).ok_or_else(|| format!("`{s}` is too large"));
    }
    let f: f64 = num.parse().map_err(|_| format!("`{s}` is not a number"))?;
    let bytes = f * mult as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("`{s}` is too large"));
    }
    Ok(bytes.round() as u64)
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as 4GB, 512MiB or 65536")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                parse_size(v).map(ByteSize).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Free space to leave on the cache's filesystem.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MinFree {
    /// An absolute number of bytes.
    Bytes(u64),
    /// A percentage of the filesystem's size.
    Percent(f64),
}

impl MinFree {
    /// The bytes to keep free on a filesystem of `total` bytes.
    pub fn bytes(&self, total: u64) -> u64 {
        match *self {
            MinFree::Bytes(b) => b,
            MinFree::Percent(p) => (total as f64 * p / 100.0) as u64,
        }
    }
}

impl<'de> Deserialize<'de> for MinFree {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = MinFree;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as 500MB or a percentage such as 10%")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<MinFree, E> {
                Ok(MinFree::Bytes(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MinFree, E> {
                if let Some(p) = v.trim().strip_suffix('%') {
                    let p: f64 = p
                        .trim()
                        .parse()
                        .map_err(|_| E::custom(format!("`{v}` is not a percentage")))?;
                    if !(0.0..100.0).contains(&p) {
                        return Err(E::custom(format!("`{v}`: a percentage must be from 0 to below 100")));
                    }
                    return Ok(MinFree::Percent(p));
                }
                parse_size(v).map(MinFree::Bytes).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration written as `25s`, `500ms`, `1h 30m` (or a bare number of seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as `25s`, `500ms` or `1h`")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<HumanDuration, E> {
                Ok(HumanDuration(Duration::from_secs(v)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<HumanDuration, E> {
                u64::try_from(v)
                    .map(|v| HumanDuration(Duration::from_secs(v)))
                    .map_err(|_| E::custom("a duration cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                let v = v.trim();
                if let Ok(secs) = v.parse::<u64>() {
                    return Ok(HumanDuration(Duration::from_secs(secs)));
                }
                humantime::parse_duration(v)
                    .map(HumanDuration)
                    .map_err(|e| E::custom(format!("`{v}`: {e}")))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `config` reads rules and `rules` reads units; a `use crate::config` in `rules.rs` (or
    /// any crate import here) would close the circle again.
    #[test]
    fn units_is_a_leaf_and_rules_does_not_import_config() {
        let imports = |text: &str| -> Vec<String> {
            text.lines()
                .map(str::trim)
                .filter(|l| l.starts_with("use crate::") || l.starts_with("pub use crate::"))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(imports(include_str!("units.rs")), Vec::<String>::new());
        let rules = imports(include_str!("rules.rs"));
        assert!(!rules.iter().any(|l| l.contains("crate::config")), "{rules:?}");
        assert!(rules.iter().any(|l| l.contains("crate::units")), "{rules:?}");
    }

    #[test]
    fn sizes_parse_with_decimal_and_binary_units() {
        let cases = [
            ("65536", 65536),
            ("4GB", 4_000_000_000),
            ("4 gb", 4_000_000_000),
            ("512MiB", 512 << 20),
            ("1.5KiB", 1536),
            ("10k", 10_000),
            ("0", 0),
        ];
        for (input, want) in cases {
            assert_eq!(parse_size(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn bad_sizes_are_refused() {
        for input in ["", "GB", "4XB", "-1", "99999999999999999999TB", "1e400"] {
            assert!(parse_size(input).is_err(), "{input}");
        }
    }

    #[test]
    fn min_free_percent_scales_with_filesystem() {
        assert_eq!(MinFree::Percent(10.0).bytes(1000), 100);
        assert_eq!(MinFree::Bytes(7).bytes(1000), 7);
    }
}
