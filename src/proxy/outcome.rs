//! What the cache did for one request: [`Outcome`], why it went to the app ([`Fwd`]), the
//! [`Answer`] that carries both out with its `Cache-Status` value, and the per-request metric
//! handles they are counted in.

use http::header::{self, HeaderValue};
use http::{Method, Response};

use crate::body::ProxyBody;
use crate::metrics as m;
use crate::negotiate::Coding;

/// What the cache did for one request: the metric label, the log field and the
/// `Cache-Status` header all come from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Served from the cache.
    Hit,
    /// Fetched from the app (and stored when storable).
    Miss,
    /// Served from another request's fill in progress.
    Coalesced,
    /// Served stale because the app failed.
    Stale,
    /// Stored object revalidated with the app (304).
    Revalidated,
    /// Not a cache candidate: passed through to the app.
    Bypass,
    /// The app failed and nothing could stand in.
    Error,
}

impl Outcome {
    pub(super) const ALL: [Outcome; 7] = [
        Outcome::Hit,
        Outcome::Miss,
        Outcome::Coalesced,
        Outcome::Stale,
        Outcome::Revalidated,
        Outcome::Bypass,
        Outcome::Error,
    ];

    /// The label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Coalesced => "coalesced",
            Outcome::Stale => "stale",
            Outcome::Revalidated => "revalidated",
            Outcome::Bypass => "bypass",
            Outcome::Error => "error",
        }
    }
}

/// The method classes used as a metric label.
const METHOD_CLASSES: [&str; 4] = ["get", "head", "unsafe", "other"];

/// A method's index in [`METHOD_CLASSES`].
pub(super) fn method_class(method: &Method) -> usize {
    match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE => 2,
        _ => 3,
    }
}

/// The per-request metric handles, registered once so that the request path counts without
/// building and hashing label sets.
pub(super) struct Handles {
    /// `REQUESTS` by outcome, then method class.
    pub(super) requests: Vec<[metrics::Counter; 4]>,
    /// `REQUEST_DURATION` by outcome.
    pub(super) durations: Vec<metrics::Histogram>,
    pub(super) served_cache_bytes: metrics::Counter,
    /// `SERVED_BY_ENCODING` and `SERVED_BYTES_BY_ENCODING`: identity, then `Coding::ALL`.
    pub(super) by_encoding: [(metrics::Counter, metrics::Counter); 4],
    pub(super) compress_saved: metrics::Counter,
}

/// The `encoding` labels of the served-by-encoding counters, in `Handles::by_encoding` order.
const ENCODINGS: [&str; 4] = ["identity", "br", "zstd", "gzip"];

pub(super) fn encoding_slot(coding: Option<Coding>) -> usize {
    match coding {
        None => 0,
        Some(Coding::Br) => 1,
        Some(Coding::Zstd) => 2,
        Some(Coding::Gzip) => 3,
    }
}

/// Static labels for [`m::hot`].
pub(super) fn labels<const N: usize>(pairs: [(&'static str, &'static str); N]) -> Vec<metrics::Label> {
    pairs.into_iter().map(|(k, v)| metrics::Label::new(k, v)).collect()
}

/// The handles, registered on first use: after the recorder is installed, which happens
/// before anything is served.
pub(super) fn handles() -> &'static Handles {
    static HANDLES: std::sync::OnceLock<Handles> = std::sync::OnceLock::new();
    HANDLES.get_or_init(|| Handles {
        requests: Outcome::ALL
            .iter()
            .map(|o| METHOD_CLASSES.map(|c| m::hot(m::REQUESTS, labels([("outcome", o.as_str()), ("method", c)]))))
            .collect(),
        durations: Outcome::ALL
            .iter()
            .map(|o| metrics::histogram!(m::REQUEST_DURATION, "outcome" => o.as_str()))
            .collect(),
        served_cache_bytes: m::hot(m::SERVED_CACHE_BYTES, Vec::new()),
        by_encoding: ENCODINGS.map(|e| {
            (
                m::hot(m::SERVED_BY_ENCODING, labels([("encoding", e)])),
                m::hot(m::SERVED_BYTES_BY_ENCODING, labels([("encoding", e)])),
            )
        }),
        compress_saved: m::hot(m::COMPRESS_SAVED_BYTES, Vec::new()),
    })
}

/// Why a request went to the app: the `fwd` parameter of `Cache-Status` (RFC 9211 §2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fwd {
    /// Not a cache candidate (method, upgrade, no host).
    Bypass,
    /// The method is not cacheable.
    Method,
    /// The request asked for a fresh copy.
    Request,
    /// Nothing stored for the URL.
    UriMiss,
    /// Stored for the URL, not for this request's `Vary` values.
    VaryMiss,
    /// Stored but stale.
    Stale,
}

impl Fwd {
    fn as_str(self) -> &'static str {
        match self {
            Fwd::Bypass => "bypass",
            Fwd::Method => "method",
            Fwd::Request => "request",
            Fwd::UriMiss => "uri-miss",
            Fwd::VaryMiss => "vary-miss",
            Fwd::Stale => "stale",
        }
    }
}

/// A response on its way out, with what the cache did.
pub struct Answer {
    /// The response.
    pub response: Response<ProxyBody>,
    /// What happened.
    pub outcome: Outcome,
    /// Why it went to the app, when it did.
    pub fwd: Option<Fwd>,
    /// Whether the response is being stored.
    pub stored: bool,
    /// An extra `Cache-Status` parameter (`fwd-status=304`, `stale-if-error`, ...).
    pub detail: Option<&'static str>,
}

impl Answer {
    pub(super) fn new(response: Response<ProxyBody>, outcome: Outcome, fwd: Option<Fwd>) -> Answer {
        Answer {
            response,
            outcome,
            fwd,
            stored: false,
            detail: None,
        }
    }

    /// The `Cache-Status` value (RFC 9211).
    pub(super) fn cache_status(&self) -> HeaderValue {
        if self.outcome == Outcome::Hit && self.fwd.is_none() && self.detail.is_none() && !self.stored {
            return HeaderValue::from_static("sidecache; hit");
        }
        HeaderValue::try_from(self.cache_status_text()).unwrap_or_else(|_| HeaderValue::from_static("sidecache"))
    }

    fn cache_status_text(&self) -> String {
        let mut v = String::from("sidecache");
        if self.fwd.is_none() || self.outcome == Outcome::Stale {
            v.push_str("; hit");
        }
        if let Some(fwd) = self.fwd {
            v.push_str("; fwd=");
            v.push_str(fwd.as_str());
        }
        if let Some(detail) = self.detail {
            v.push_str("; ");
            v.push_str(detail);
        }
        if self.outcome == Outcome::Coalesced {
            v.push_str("; collapsed");
        }
        if self.stored {
            v.push_str("; stored");
        }
        if self.outcome == Outcome::Error {
            v.push_str("; detail=upstream-error");
        }
        v
    }
}

/// The `Cache-Status` header (RFC 9211).
pub static CACHE_STATUS: header::HeaderName = header::HeaderName::from_static("cache-status");
