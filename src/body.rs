//! Response and request body types shared by the proxy, the cache and the admin port.

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

use crate::cache::fill::TeeMsg;
use crate::error::BoxError;

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
/// of unknown length). The client is held back while the writer's queue is full, as nginx and
/// Varnish pace a client by their cache's writes: a busy machine slows the copy, it does not
/// lose it. The writer bounds that wait (it gives the copy up when the disk stalls, closing the
/// queue); then, or when the writer goes away, the client's bytes go on alone. The writer
/// learns of a clean end only through [`TeeMsg::Last`] or [`TeeMsg::End`].
pub fn tee(
    body: ProxyBody,
    tx: tokio::sync::mpsc::Sender<TeeMsg>,
    copied: Option<tokio::sync::oneshot::Receiver<()>>,
) -> ProxyBody {
    use http_body::Body;
    // An empty body may never be polled at all.
    let tx = if body.is_end_stream() {
        let _ = tx.try_send(TeeMsg::End);
        None
    } else {
        Some(tokio_util::sync::PollSender::new(tx))
    };
    UnsyncBoxBody::new(Tee {
        inner: body,
        tx,
        copied,
        held: None,
    })
}

/// How long a tee's last frame waits for its copy to be over.
const HOLD_LIMIT: std::time::Duration = std::time::Duration::from_secs(1);

type Polled = Option<Result<http_body::Frame<Bytes>, BoxError>>;

struct Tee {
    inner: ProxyBody,
    /// The copy's queue; `None` once the copy ended or was given up.
    tx: Option<tokio_util::sync::PollSender<TeeMsg>>,
    /// Resolves once the copy is over (committed or given up).
    copied: Option<tokio::sync::oneshot::Receiver<()>>,
    /// The body's last frame (or its end), held until the copy is over or [`HOLD_LIMIT`].
    held: Option<(Polled, std::pin::Pin<Box<tokio::time::Sleep>>)>,
}

impl Tee {
    /// Whether the held frame may go: the copy is over, or the wait reached its bound.
    fn release(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        use std::future::Future;
        let over = self
            .copied
            .as_mut()
            .is_none_or(|rx| std::pin::Pin::new(rx).poll(cx).is_ready());
        let late = self
            .held
            .as_mut()
            .is_some_and(|(_, limit)| limit.as_mut().poll(cx).is_ready());
        over || late
    }
}

impl http_body::Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        if self.held.is_some() {
            if !self.release(cx) {
                return Poll::Pending;
            }
            self.copied = None;
            let (polled, _) = self.held.take().expect("held");
            return Poll::Ready(polled);
        }
        // Room for the next message first: the frame read below is then always copied.
        if let Some(tx) = &mut self.tx {
            match tx.poll_reserve(cx) {
                Poll::Ready(Ok(())) => {}
                // The writer closed its queue (it gave the copy up) or is gone.
                Poll::Ready(Err(_)) => self.tx = None,
                Poll::Pending => return Poll::Pending,
            }
        }
        let poll = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        let end = self.inner.is_end_stream();
        let msg = match &poll {
            // A body of known length ends with its last byte: the connection writing it may
            // never poll for the end, so the copy is completed with that byte.
            Poll::Ready(Some(Ok(frame))) => match frame.data_ref() {
                Some(data) if end => Some(TeeMsg::Last(data.clone())),
                Some(data) => Some(TeeMsg::Data(data.clone())),
                None => end.then_some(TeeMsg::End),
            },
            Poll::Ready(None) => Some(TeeMsg::End),
            // A broken body is not complete: the writer sees its queue closed without an end.
            Poll::Ready(Some(Err(_))) => {
                self.tx = None;
                None
            }
            Poll::Pending => None,
        };
        if let Some(msg) = msg
            && let Some(tx) = &mut self.tx
        {
            let last = !matches!(msg, TeeMsg::Data(_));
            let sent = tx.send_item(msg).is_ok();
            if !sent || last {
                self.tx = None;
            }
            // The copy has the whole body: the client's last frame waits for it to be stored.
            if sent && last && self.copied.is_some() {
                let polled = match poll {
                    Poll::Ready(polled) => polled,
                    Poll::Pending => unreachable!("a last message comes from a ready frame"),
                };
                self.held = Some((polled, Box::pin(tokio::time::sleep(HOLD_LIMIT))));
                return self.poll_frame(cx);
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use http_body_util::StreamBody;
    use std::task::{Context, Poll};

    /// A body of `n` chunks of one byte each, with no length (as a chunked answer).
    fn chunked(n: u8) -> ProxyBody {
        let frames = (0..n).map(|i| Ok::<_, BoxError>(http_body::Frame::data(Bytes::from(vec![i]))));
        boxed(StreamBody::new(futures_util::stream::iter(frames)))
    }

    fn poll(body: &mut ProxyBody) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        std::pin::Pin::new(body).poll_frame(&mut cx)
    }

    /// The disk slower than the client: the client waits for the copy's queue instead of the
    /// copy being lost (it was dropped at the first full queue), and every byte reaches both.
    #[test]
    fn a_copy_whose_writer_lags_holds_the_client_back_and_is_whole() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let mut body = tee(chunked(3), tx, None);
        let (mut client, mut copy) = (Vec::new(), Vec::new());
        while client.len() < 3 {
            match poll(&mut body) {
                Poll::Ready(Some(Ok(frame))) => client.extend_from_slice(frame.data_ref().expect("data")),
                // Held back: the writer takes one message, then the client goes on.
                Poll::Pending => match rx.try_recv().expect("the queue is full") {
                    TeeMsg::Data(b) | TeeMsg::Last(b) => copy.extend_from_slice(&b),
                    TeeMsg::End => panic!("ended early"),
                },
                other => panic!("unexpected {:?}", other.map(|o| o.map(|r| r.is_ok()))),
            }
        }
        assert!(matches!(poll(&mut body), Poll::Pending | Poll::Ready(None)));
        // The rest of the copy, then its clean end.
        let mut ended = false;
        while let Ok(msg) = rx.try_recv() {
            match msg {
                TeeMsg::Data(b) => copy.extend_from_slice(&b),
                TeeMsg::Last(b) => {
                    copy.extend_from_slice(&b);
                    ended = true;
                }
                TeeMsg::End => ended = true,
            }
            if !ended {
                let _ = poll(&mut body);
            }
        }
        assert_eq!(client, vec![0, 1, 2]);
        assert_eq!(copy, client, "the copy is whole");
        assert!(ended, "and told it ended cleanly");
    }

    /// A writer that gives the copy up (its queue closed) lets the client go on alone at once.
    #[test]
    fn a_copy_given_up_lets_the_client_go_on() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let mut body = tee(chunked(4), tx, None);
        let mut client = Vec::new();
        assert!(matches!(poll(&mut body), Poll::Ready(Some(Ok(_)))));
        client.push(0);
        rx.close();
        loop {
            match poll(&mut body) {
                Poll::Ready(Some(Ok(frame))) => client.extend_from_slice(frame.data_ref().expect("data")),
                Poll::Ready(None) => break,
                _ => panic!("the client is not held back by a closed copy"),
            }
        }
        assert_eq!(client, vec![0, 1, 2, 3]);
    }
}
