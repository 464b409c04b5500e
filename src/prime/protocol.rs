//! The prime protocol between `POST /prime` (the sidecar, producer) and `sidecache prime` (the
//! command, consumer): one NDJSON [`Line`] per URL, whose outcome is the closed
//! [`WarmResult`] that `Proxy::warm` returns. Both sides use these types; whether a failure is
//! worth another round is decided here, by [`Failure::is_final`], never by reading a message.
//!
//! On the wire (field names as before this type existed, plus `reason`):
//!
//! ```text
//! {"url":"/a.js","result":"warmed","bytes":1234}
//! {"url":"/b.js","result":"warm","bytes":99}
//! {"url":"/c.js","result":"failed","reason":"status","status":404,"error":"status 404"}
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

/// What priming one URL did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result")]
pub enum WarmResult {
    /// Fetched and stored.
    #[serde(rename = "warmed")]
    Warmed {
        /// Body bytes stored.
        bytes: u64,
    },
    /// Already stored and fresh: not fetched.
    #[serde(rename = "warm")]
    AlreadyWarm {
        /// Body bytes of the stored copy.
        bytes: u64,
    },
    /// Could not be warmed, and why.
    #[serde(rename = "failed")]
    Failed(Failure),
}

impl WarmResult {
    /// A closed label for metrics and the protocol's `result` field.
    pub fn as_str(&self) -> &'static str {
        match self {
            WarmResult::Warmed { .. } => "warmed",
            WarmResult::AlreadyWarm { .. } => "warm",
            WarmResult::Failed(_) => "failed",
        }
    }
}

/// Why priming one URL failed: a closed set, each kind knowing whether asking again can help.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Failure {
    /// The app (or the `from` source) answered with this non-success status.
    Status {
        /// The status code.
        status: u16,
    },
    /// Answered 2xx, but the answer may not be stored (`no-store`, `private`, too large, ...).
    NotCacheable,
    /// No answer within the per-object time limit.
    Timeout {
        /// The limit, in seconds.
        seconds: u64,
    },
    /// The URL to fetch is outside `prime_sources` (e.g. a target climbing out of `from`).
    SourceRefused {
        /// What the allow-list said.
        detail: String,
    },
    /// The line is not a URL or path, or names a host that is not a valid header value.
    BadTarget {
        /// What was wrong with it.
        detail: String,
    },
    /// The transfer broke off (the answer's body failed mid-way).
    Interrupted {
        /// The error.
        detail: String,
    },
}

impl Failure {
    /// True when another round cannot help: the app says the object is missing or forbidden
    /// (4xx, but not 408 Request Timeout or 429 Too Many Requests, which ask to come back), the
    /// answer is not storable, or the target itself is wrong. Server errors (5xx), timeouts and
    /// broken transfers are retried.
    pub fn is_final(&self) -> bool {
        match self {
            Failure::Status { status } => !(*status >= 500 || *status == 408 || *status == 429),
            Failure::NotCacheable | Failure::SourceRefused { .. } | Failure::BadTarget { .. } => true,
            Failure::Timeout { .. } | Failure::Interrupted { .. } => false,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Status { status } => write!(f, "status {status}"),
            Failure::NotCacheable => f.write_str("not cacheable"),
            Failure::Timeout { seconds } => write!(f, "timed out after {seconds}s"),
            Failure::SourceRefused { detail } => write!(f, "source refused: {detail}"),
            Failure::BadTarget { detail } => f.write_str(detail),
            Failure::Interrupted { detail } => write!(f, "body: {detail}"),
        }
    }
}

/// One line of the `POST /prime` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    /// The URL or path as submitted.
    pub url: String,
    /// What happened to it.
    #[serde(flatten)]
    pub result: WarmResult,
    /// The failure in words, for people and for commands older than `reason`; ignored when
    /// read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Line {
    /// The line for `url`.
    pub fn new(url: String, result: WarmResult) -> Line {
        let error = match &result {
            WarmResult::Failed(why) => Some(why.to_string()),
            _ => None,
        };
        Line { url, result, error }
    }

    /// The line as NDJSON: JSON and a newline.
    pub fn to_ndjson(&self) -> String {
        let mut s = serde_json::to_string(self).expect("a Line has string keys and plain values");
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_keep_the_old_field_names_and_round_trip() {
        let warmed = Line::new("/a.js".into(), WarmResult::Warmed { bytes: 12 });
        let v: serde_json::Value = serde_json::from_str(&warmed.to_ndjson()).unwrap();
        assert_eq!(v, serde_json::json!({"url": "/a.js", "result": "warmed", "bytes": 12}));
        let failed = Line::new("/b.js".into(), WarmResult::Failed(Failure::Status { status: 404 }));
        let text = failed.to_ndjson();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"url": "/b.js", "result": "failed", "reason": "status", "status": 404, "error": "status 404"})
        );
        for line in [
            warmed,
            failed,
            Line::new("/c".into(), WarmResult::AlreadyWarm { bytes: 0 }),
            Line::new("/d".into(), WarmResult::Failed(Failure::NotCacheable)),
            Line::new("/e".into(), WarmResult::Failed(Failure::Timeout { seconds: 30 })),
            Line::new(
                "/f".into(),
                WarmResult::Failed(Failure::SourceRefused {
                    detail: "outside".into(),
                }),
            ),
        ] {
            assert_eq!(serde_json::from_str::<Line>(&line.to_ndjson()).unwrap(), line);
        }
        assert!(serde_json::from_str::<Line>(r#"{"url":"/x","result":"exploded"}"#).is_err());
    }

    #[test]
    fn missing_or_refused_objects_are_final_and_server_trouble_is_retried() {
        let status = |status| Failure::Status { status };
        for final_ in [
            status(400),
            status(403),
            status(404),
            status(410),
            status(304),
            Failure::NotCacheable,
            Failure::SourceRefused { detail: String::new() },
            Failure::BadTarget { detail: String::new() },
        ] {
            assert!(final_.is_final(), "{final_}");
        }
        for again in [
            status(500),
            status(502),
            status(503),
            status(504),
            status(408),
            status(429),
            Failure::Timeout { seconds: 1 },
            Failure::Interrupted { detail: String::new() },
        ] {
            assert!(!again.is_final(), "{again}");
        }
    }
}
