//! The access log: one line a request, written when its response body has been sent (or the
//! client went away), as nginx writes its `access_log`, so the line holds the bytes sent. It
//! also owns the request id (`X-Request-ID`: the client's or router's when it sent a usable
//! one, else a new one, passed on to the app) and the time the request waited on the app
//! (`upstream_micros`: until the app's response head, as nginx's `$upstream_header_time`).
//! It never logs the query string, cookies or credentials, and it decides nothing about the
//! request.

use std::cell::Cell;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use http::header::{self, HeaderName, HeaderValue};
use tracing::info;

use crate::body::ProxyBody;
use crate::error::BoxError;

/// The request id field: Heroku's router, nginx (`$request_id`) and most frameworks use it.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest request id taken from a client; a longer one is replaced (Heroku takes 20 to 200).
const MAX_REQUEST_ID: usize = 200;

/// Longest Host written to the log.
const MAX_LOGGED_HOST: usize = 255;

tokio::task_local! {
    /// The time this request's task has waited on the app so far, when the access log is on.
    static UPSTREAM_WAIT: Cell<Option<Duration>>;
}

/// Runs `f` (one request's handling) with its upstream wait recorded for [`upstream_wait`].
pub async fn measured<F: Future>(f: F) -> (F::Output, Option<Duration>) {
    UPSTREAM_WAIT
        .scope(Cell::new(None), async move {
            let out = f.await;
            (out, UPSTREAM_WAIT.with(Cell::get))
        })
        .await
}

/// Adds `waited` to the current request's time on the app. Called by the upstream client; a
/// fetch outside a request (a background revalidation, a prime) records nothing.
pub fn record_upstream(waited: Duration) {
    let _ = UPSTREAM_WAIT.try_with(|w| w.set(Some(w.get().unwrap_or_default() + waited)));
}

/// The request's id: its `X-Request-ID` when that is 1 to 200 visible ASCII characters,
/// otherwise a new one (32 hex digits) put in the request, so the app logs the same id.
pub fn request_id(headers: &mut HeaderMap) -> HeaderValue {
    let given = headers.get_all(&REQUEST_ID).iter().collect::<Vec<_>>();
    if let [one] = given[..]
        && (1..=MAX_REQUEST_ID).contains(&one.len())
        && one.as_bytes().iter().all(|b| b.is_ascii_graphic())
    {
        return one.clone();
    }
    let id = HeaderValue::from_str(&new_id()).expect("hex digits are a header value");
    headers.insert(REQUEST_ID.clone(), id.clone());
    id
}

/// 128 bits as hex: a process-wide counter under a keyed blake3, the key drawn from the kernel
/// once (a request id is made for every request to the app: no system call each time, as a
/// `getrandom` per id was). Unpredictable without the key, and never the same twice in a
/// process. Without randomness from the kernel (never seen on Linux) the key is made from the
/// process id and the clock.
fn new_id() -> String {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static KEY: OnceLock<[u8; 32]> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let key = KEY.get_or_init(|| {
        let mut key = [0u8; 32];
        if !rustix::rand::getrandom(&mut key, rustix::rand::GetRandomFlags::NONBLOCK).is_ok_and(|n| n == 32) {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            key = *blake3::hash(format!("{}:{now}", std::process::id()).as_bytes()).as_bytes();
        }
        key
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let bits = blake3::keyed_hash(key, &n.to_le_bytes());
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(32);
    for &b in &bits.as_bytes()[..16] {
        out.push(HEX[usize::from(b >> 4)] as char);
        out.push(HEX[usize::from(b & 15)] as char);
    }
    out
}

/// The host a request names (`Host`, or the HTTP/2 `:authority`), as logged.
pub fn host(req: &http::Request<impl Sized>) -> String {
    let host = req
        .headers()
        .get(header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()))
        .unwrap_or_default();
    host.chars().take(MAX_LOGGED_HOST).collect()
}

/// What one access-log line says, filled in as the request goes.
#[derive(Debug)]
pub struct Entry {
    /// The method.
    pub method: http::Method,
    /// `Host` (part of the cache key).
    pub host: String,
    /// The path, never the query.
    pub path: String,
    /// The client's HTTP version.
    pub version: http::Version,
    /// The status sent.
    pub status: u16,
    /// The outcome label.
    pub outcome: &'static str,
    /// The `Cache-Status` sent.
    pub cache_status: HeaderValue,
    /// The time to the response head.
    pub elapsed: Duration,
    /// The time spent waiting on the app, if it was asked.
    pub upstream: Option<Duration>,
    /// The peer.
    pub client: SocketAddr,
    /// The request id.
    pub request_id: HeaderValue,
    /// When the request arrived.
    pub started: Instant,
}

impl Entry {
    /// Writes the line once the body has been sent: now if there is none.
    pub fn log_after(self, body: ProxyBody) -> ProxyBody {
        use http_body::Body as _;
        if body.is_end_stream() {
            self.write(0);
            return body;
        }
        http_body_util::combinators::UnsyncBoxBody::new(Logged {
            inner: body,
            sent: 0,
            entry: Some(self),
        })
    }

    fn write(self, bytes: u64) {
        let cache_status = self.cache_status.to_str().unwrap_or_default();
        let request_id = self.request_id.to_str().unwrap_or_default();
        let total_micros = self.started.elapsed().as_micros() as u64;
        // No `upstream_micros` when the app was not asked (a hit), rather than a made-up
        // number, as nginx logs `-`: an `Option` field is recorded only when it is `Some`.
        info!(
            target: "sidecache::access",
            method = %self.method,
            host = %self.host,
            path = %self.path,
            version = ?self.version,
            status = self.status,
            outcome = self.outcome,
            cache_status,
            bytes,
            micros = self.elapsed.as_micros() as u64,
            total_micros,
            upstream_micros = self.upstream.map(|waited| waited.as_micros() as u64),
            client = %self.client.ip(),
            request_id,
            "request"
        );
    }
}

/// A response body that counts what it sends and writes the line when it ends or is dropped
/// (the client went away: the bytes sent so far).
struct Logged {
    inner: ProxyBody,
    sent: u64,
    entry: Option<Entry>,
}

impl http_body::Body for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        match &poll {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                }
                if self.inner.is_end_stream()
                    && let Some(entry) = self.entry.take()
                {
                    entry.write(self.sent);
                }
            }
            Poll::Ready(_) => {
                if let Some(entry) = self.entry.take() {
                    entry.write(self.sent);
                }
            }
            Poll::Pending => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        if let Some(entry) = self.entry.take() {
            entry.write(self.sent);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_usable_request_id_is_kept_and_any_other_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert(&REQUEST_ID, HeaderValue::from_static("f9ed4675-f4d5-4a53-8b6e"));
        assert_eq!(request_id(&mut headers), "f9ed4675-f4d5-4a53-8b6e");
        for bad in ["", "has space", &"x".repeat(201)] {
            let mut headers = HeaderMap::new();
            headers.insert(&REQUEST_ID, HeaderValue::from_str(bad).unwrap());
            let id = request_id(&mut headers);
            assert_eq!(id.len(), 32, "{bad:?}");
            assert_eq!(headers[&REQUEST_ID], id, "the app gets the new id");
        }
        let mut two = HeaderMap::new();
        two.append(&REQUEST_ID, HeaderValue::from_static("a"));
        two.append(&REQUEST_ID, HeaderValue::from_static("b"));
        let id = request_id(&mut two);
        assert_eq!(two.get_all(&REQUEST_ID).iter().count(), 1);
        assert_ne!(id, request_id(&mut HeaderMap::new()), "ids differ");
    }

    #[test]
    fn new_ids_are_distinct_hex_and_not_a_visible_counter() {
        let ids: Vec<String> = (0..1000).map(|_| new_id()).collect();
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        assert!(
            ids.iter()
                .all(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        );
        // Consecutive ids share no long prefix (a bare counter would).
        assert!(ids.windows(2).all(|w| w[0][..8] != w[1][..8]));
    }
}
