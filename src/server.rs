//! The public listener: accept loop, connection limit, timeouts, graceful shutdown.
//!
//! `run` takes a bound listener, the shared [`Proxy`] and a shutdown future (mini-redis): tests
//! bind 127.0.0.1:0 and pass their own future.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::metrics as m;
use crate::reload::LiveProxy;

/// Serves the public port until `shutdown` completes, then drains in-flight requests for at
/// most `grace_period` (as in force when the drain begins). Returns true when every connection
/// finished in time. `limit` holds the connection slots, shared by every loop serving the port.
/// Each request is answered by the proxy in force when it arrives (`live`, see
/// [`crate::reload`]).
pub async fn run(
    listener: TcpListener,
    live: Arc<LiveProxy>,
    shutdown: impl Future<Output = ()>,
    limit: Arc<Semaphore>,
) -> bool {
    let config = live.current().config().clone();
    let builder = Arc::new(connection_builder(&config));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);

    loop {
        // Accept, then wait for a slot: with several loops sharing the slots, a loop that took
        // a slot before accepting could hold it while the waiting connection sits in another
        // loop's queue. Each loop holds at most one accepted connection waiting for a slot.
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning. Out of descriptors,
                    // the cache gives back some it holds open.
                    warn!(error = %e, "accept failed");
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                        live.current().cache().relieve_descriptors();
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            permit = limit.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let _ = stream.set_nodelay(true);
        let live = live.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let idle_timeout = config.idle_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            metrics::gauge!(m::CONNECTIONS).increment(1.0);
            serve_connection(stream, peer, live, &builder, watcher, idle_timeout).await;
            metrics::gauge!(m::CONNECTIONS).decrement(1.0);
        });
    }

    let grace = live.current().config().grace_period;
    info!(grace = ?grace, open = graceful.count(), "draining connections");
    drop(listener);
    match tokio::time::timeout(grace, graceful.shutdown()).await {
        Ok(()) => {
            info!("all connections drained");
            true
        }
        Err(_) => {
            warn!("grace period ended with connections still open");
            false
        }
    }
}

fn connection_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.client_header_timeout)
        .max_buf_size(config.max_header_size.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(config.max_header_size as u32)
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(256);
    builder
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    live: Arc<LiveProxy>,
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    idle_timeout: Duration,
) {
    let activity = Activity::new();
    let io = TokioIo::new(IdleIo {
        inner: stream,
        activity: activity.clone(),
    });
    let service = service_fn(move |req| {
        let proxy = live.current();
        async move { Ok::<_, std::convert::Infallible>(proxy.handle(req, peer).await) }
    });
    let conn = builder.serve_connection_with_upgrades(io, service);
    let conn = watcher.watch(conn.into_owned());
    tokio::select! {
        result = conn => {
            if let Err(e) = result {
                debug!(error = %e, client = %peer.ip(), "connection ended with an error");
            }
        }
        _ = activity.idle_for(idle_timeout) => {
            debug!(client = %peer.ip(), "idle connection closed");
        }
    }
}

/// Whether bytes moved on a connection lately. The I/O path only sets a flag (no clock read
/// per read or write); the idle check looks at it four times per timeout period.
#[derive(Clone)]
struct Activity {
    moved: Arc<AtomicBool>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            moved: Arc::new(AtomicBool::new(false)),
        }
    }

    fn touch(&self) {
        self.moved.store(true, Ordering::Relaxed);
    }

    /// Completes once no byte has moved for `limit` (detected within a quarter of it).
    async fn idle_for(&self, limit: Duration) {
        let step = (limit / 4).max(Duration::from_millis(1));
        let mut quiet = Duration::ZERO;
        while quiet < limit {
            tokio::time::sleep(step).await;
            if self.moved.swap(false, Ordering::Relaxed) {
                quiet = Duration::ZERO;
            } else {
                quiet += step;
            }
        }
    }
}

/// The client's stream: records when bytes move (for the idle timeout), and sends slices of
/// mapped bodies from their files with `sendfile` instead of copying them through user space.
struct IdleIo {
    inner: TcpStream,
    activity: Activity,
}

impl AsyncRead for IdleIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        poll
    }
}

impl IdleIo {
    /// Writes `bufs` ([`crate::zerocopy::poll_write`]: a mapped body slice goes out from its
    /// file), recording that bytes moved.
    fn poll_write_slices(&mut self, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let poll = crate::zerocopy::poll_write(&mut self.inner, cx, bufs);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }
}

impl AsyncWrite for IdleIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.poll_write_slices(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_slices(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
