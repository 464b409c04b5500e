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
