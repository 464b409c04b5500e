//! Response and request body types shared by the proxy, the cache and the admin port.

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

/// The error type carried by every body in the proxy.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The one body type the proxy returns: streamed from the app, the disk, or memory.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body of these bytes.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    UnsyncBoxBody::new(Full::new(bytes.into()).map_err(|never| match never {}))
}

/// An empty body.
pub fn empty() -> ProxyBody {
    UnsyncBoxBody::new(Empty::<Bytes>::new().map_err(|never| match never {}))
}

/// Boxes any body whose error converts into [`BoxError`].
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    UnsyncBoxBody::new(body.map_err(Into::into))
}

/// Counts the data bytes that pass through a body into a counter metric.
pub fn counted(body: ProxyBody, counter: metrics::Counter) -> ProxyBody {
    UnsyncBoxBody::new(Counted { inner: body, counter })
}

struct Counted {
    inner: ProxyBody,
    counter: metrics::Counter,
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &poll
            && let Some(data) = frame.data_ref()
        {
            self.counter.increment(data.len() as u64);
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

/// A body of `len` bytes (so HTTP/1.1 sends `Content-Length`, not chunked) from a stream of
/// chunks: a cache fill's reader.
pub fn sized(chunks: crate::cache::fill::Chunks, len: u64) -> ProxyBody {
    use futures_util::StreamExt;
    let frames = http_body_util::StreamBody::new(chunks.map(|c| c.map(http_body::Frame::data)));
    UnsyncBoxBody::new(Sized { inner: frames, len })
}

/// A body with a known exact length.
struct Sized<B> {
    inner: B,
    len: u64,
}

impl<B: http_body::Body<Data = Bytes, Error = BoxError> + Unpin> http_body::Body for Sized<B> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.len)
    }
}

/// An upstream body is a cache fill's source: its data chunks, trailers skipped.
impl crate::cache::fill::Source for ProxyBody {
    fn next_batch(
        &mut self,
        limit: usize,
    ) -> impl std::future::Future<Output = Option<Result<Vec<Bytes>, BoxError>>> + Send {
        next_batch(self, limit)
    }
}

/// The body chunks that are ready now, after waiting for at least one: up to about `limit`
/// bytes, so a fast upstream is written in few large steps and a slow one is not held back.
/// `None` at the end of the body.
async fn next_batch(body: &mut ProxyBody, limit: usize) -> Option<Result<Vec<Bytes>, BoxError>> {
    use futures_util::FutureExt;
    let first = match next_chunk(body).await? {
        Ok(chunk) => chunk,
        Err(e) => return Some(Err(e)),
    };
    let mut size = first.len();
    let mut batch = vec![first];
    while size < limit {
        match next_chunk(body).now_or_never() {
            Some(Some(Ok(chunk))) => {
                size += chunk.len();
                batch.push(chunk);
            }
            Some(Some(Err(e))) => return Some(Err(e)),
            Some(None) | None => break,
        }
    }
    Some(Ok(batch))
}

/// Reads the next data chunk of a body, skipping trailers.
async fn next_chunk(body: &mut ProxyBody) -> Option<Result<Bytes, BoxError>> {
    loop {
        match body.frame().await? {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    return Some(Ok(data));
                }
            }
            Err(e) => return Some(Err(e)),
        }
    }
}

/// Passes `body` through to the client and sends a copy of each chunk to `tx` (a cache fill
/// of unknown length). The copy is dropped (never the client's bytes) when the writer falls
/// behind or goes away; the writer learns of a clean end only through
/// [`TeeMsg::End`](crate::cache::fill::TeeMsg::End).
pub fn tee(body: ProxyBody, tx: tokio::sync::mpsc::Sender<crate::cache::fill::TeeMsg>) -> ProxyBody {
    use crate::cache::fill::TeeMsg;
    use http_body::Body;
    // An empty body may never be polled at all.
    let tx = if body.is_end_stream() {
        let _ = tx.try_send(TeeMsg::End);
        None
    } else {
        Some(tx)
    };
    UnsyncBoxBody::new(Tee { inner: body, tx })
}

struct Tee {
    inner: ProxyBody,
    tx: Option<tokio::sync::mpsc::Sender<crate::cache::fill::TeeMsg>>,
}

impl http_body::Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        use crate::cache::fill::TeeMsg;
        use std::task::Poll;
        let poll = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &poll {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref()
                    && let Some(tx) = &self.tx
                    && tx.try_send(TeeMsg::Data(data.clone())).is_err()
                {
                    self.tx = None;
                }
                // A body of known length ends with its last byte: the connection writing it
                // may never poll for the end, so the copy is completed here.
                if self.inner.is_end_stream()
                    && let Some(tx) = self.tx.take()
                {
                    let _ = tx.try_send(TeeMsg::End);
                }
            }
            Poll::Ready(None) => {
                if let Some(tx) = self.tx.take() {
                    let _ = tx.try_send(TeeMsg::End);
                }
            }
            Poll::Ready(Some(Err(_))) => self.tx = None,
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
