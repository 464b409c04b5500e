//! The shared tier's settings as the configuration gives them (`shared_tier*` keys, the
//! `s3://BUCKET/PREFIX` URL) and the credentials' variables. Below both `config`, which
//! builds them, and [`crate::shared`], which runs the tier on them: `config` imports nothing
//! from `shared`.

use std::time::Duration;

/// The environment variables holding the credentials the shared tier signs with (read by
/// [`SharedTier::open`](crate::shared::SharedTier::open) among the `AWS_*` ones): sidecache's
/// own while the tier is on, so a supervised app does not inherit them.
pub const CREDENTIAL_VARIABLES: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_TOKEN",
    "AWS_SSE_CUSTOMER_KEY_BASE64",
];

/// The shared tier's settings (`shared_tier*` keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedTierConfig {
    /// The bucket.
    pub bucket: String,
    /// The key prefix inside it (no leading or trailing `/`; may be empty).
    pub prefix: String,
    /// Least freshness left for an object to be uploaded.
    pub min_fresh: Duration,
    /// Time limit of one read (waiting for a slot included) and of one upload.
    pub timeout: Duration,
    /// Reads at once; uploads at once.
    pub concurrency: usize,
    /// Uploads waiting at most.
    pub queue: usize,
    /// How long the tier is skipped once the breaker opens.
    pub cooldown: Duration,
    /// Bytes uploaded per hour at most ([`UploadGate`](crate::shared::UploadGate)).
    pub upload_budget: u64,
}

impl SharedTierConfig {
    /// `s3://BUCKET/PREFIX` as shown in logs (no endpoint, no credentials).
    pub fn describe(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }
}

/// Parses `s3://BUCKET/PREFIX` into its bucket and prefix (S3's bucket naming rules; a prefix
/// of plain path segments, without `.`, `..` or empty segments).
pub fn parse_url(url: &str) -> Result<(String, String), String> {
    let Some(rest) = url.strip_prefix("s3://") else {
        return Err(format!("`{url}`: expected s3://BUCKET/PREFIX"));
    };
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && bucket.as_bytes()[0].is_ascii_alphanumeric()
        && bucket.as_bytes()[bucket.len() - 1].is_ascii_alphanumeric();
    if !bucket_ok {
        return Err(format!(
            "`{url}`: `{bucket}` is not a bucket name (3-63 lower-case letters, digits, `-` and `.`)"
        ));
    }
    let prefix = prefix.trim_end_matches('/');
    for segment in prefix.split('/').filter(|_| !prefix.is_empty()) {
        let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if segment.is_empty() || segment == "." || segment == ".." || !segment.chars().all(plain) {
            return Err(format!(
                "`{url}`: the prefix must be path segments of letters, digits, `-`, `_` and `.`"
            ));
        }
    }
    Ok((bucket.to_owned(), prefix.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `shared` runs on the cache and the cache's settings come from `config`: a `config` that
    /// imported `shared` would close the circle cache -> config -> shared -> cache again.
    #[test]
    fn config_imports_nothing_from_shared() {
        let config = include_str!("config.rs");
        for path in [concat!("crate::", "shared::"), concat!("crate::", "shared;")] {
            assert!(!config.contains(path), "src/config.rs names {path}");
        }
    }

    #[test]
    fn urls_name_a_bucket_and_a_plain_prefix() {
        assert_eq!(
            parse_url("s3://assets/fleet/web"),
            Ok(("assets".into(), "fleet/web".into()))
        );
        assert_eq!(parse_url("s3://assets"), Ok(("assets".into(), String::new())));
        assert_eq!(parse_url("s3://my.bucket-1/p/"), Ok(("my.bucket-1".into(), "p".into())));
        for bad in [
            "https://assets/p",
            "s3://",
            "s3://ab/p",
            "s3://Assets/p",
            "s3://-assets/p",
            "s3://assets/../p",
            "s3://assets/a//b",
            "s3://assets/a b",
            "s3://assets/a?x=1",
        ] {
            assert!(parse_url(bad).is_err(), "{bad} accepted");
        }
    }
}
