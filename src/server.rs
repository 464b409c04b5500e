//! The public listener: accept loop, connection limit, timeouts, graceful shutdown.
//!
//! `run` takes a bound listener, the shared [`Proxy`] and a shutdown future (mini-redis): tests
//! bind 127.0.0.1:0 and pass their own future.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
use crate::reload::{LiveProxy, LoopProxy};

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
    seat: Seat,
) -> bool {
    let config = live.current().config().clone();
    let live = Arc::new(LoopProxy::new(live));
    let builder = Arc::new(connection_builder(&config));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);

    loop {
        // This loop's turn to accept (not while it holds more connections than the others).
        tokio::select! {
            _ = &mut shutdown => break,
            () = seat.turn() => {}
        }
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
        let seated = seat.opened();
        tokio::spawn(async move {
            let _permit = permit;
            let _seated = seated;
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

/// A loop more than this many connections ahead of the least loaded loop waits before it
/// accepts again...
const SHARE_SLACK: usize = 1;
/// ...for at most this long (a loop that is slow to accept does not hold the others back).
const SHARE_WAIT: Duration = Duration::from_millis(5);

/// How the loops serving one port share its connections. They accept from one socket (not
/// `SO_REUSEPORT`, see `Sidecar::split`), and a loop woken for a connection accepts every
/// connection queued: a burst (a load balancer opening its pool, a benchmark's clients) would
/// all land on whichever loop woke first, leaving the other cores idle (measured: 64
/// connections on one of two loops). So each loop counts its open connections here, and one
/// more than [`SHARE_SLACK`] ahead of the least loaded loop leaves the queue to the others.
pub struct Share {
    open: Box<[AtomicUsize]>,
    changed: tokio::sync::Notify,
}

impl Share {
    /// The share of `loops` loops.
    pub fn new(loops: usize) -> Arc<Share> {
        Arc::new(Share {
            open: (0..loops.max(1)).map(|_| AtomicUsize::new(0)).collect(),
            changed: tokio::sync::Notify::new(),
        })
    }

    /// Loop `index`'s seat.
    pub fn seat(self: &Arc<Share>, index: usize) -> Seat {
        Seat {
            share: self.clone(),
            index,
        }
    }
}

/// One loop's place in a [`Share`].
pub struct Seat {
    share: Arc<Share>,
    index: usize,
}

impl Seat {
    /// This loop does not serve after all (its thread or runtime could not start): the others
    /// stop waiting for it.
    pub fn retire(self) {
        self.share.open[self.index].store(usize::MAX / 2, Ordering::Release);
        self.share.changed.notify_waiters();
    }

    fn ahead(&self) -> bool {
        let open = &self.share.open;
        let mine = open[self.index].load(Ordering::Acquire);
        let least = open.iter().map(|n| n.load(Ordering::Acquire)).min().unwrap_or(0);
        mine > least + SHARE_SLACK
    }

    /// Returns when this loop may accept: at once unless it is ahead of the others, else once
    /// they catch up (or a connection of its own ends), or after [`SHARE_WAIT`].
    async fn turn(&self) {
        if self.share.open.len() < 2 {
            return;
        }
        let changed = self.share.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if self.ahead() {
            let _ = tokio::time::timeout(SHARE_WAIT, changed).await;
        }
    }

    /// Counts a connection this loop accepted, until the returned value is dropped.
    fn opened(&self) -> Seated {
        self.share.open[self.index].fetch_add(1, Ordering::AcqRel);
        self.share.changed.notify_waiters();
        Seated {
            share: self.share.clone(),
            index: self.index,
        }
    }
}

/// An open connection counted in its loop's seat.
struct Seated {
    share: Arc<Share>,
    index: usize,
}

impl Drop for Seated {
    fn drop(&mut self) {
        self.share.open[self.index].fetch_sub(1, Ordering::AcqRel);
        self.share.changed.notify_waiters();
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
    live: Arc<LoopProxy>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_more_than_one_connection_ahead_leaves_the_queue_to_the_others() {
        let share = Share::new(3);
        let (a, b, c) = (share.seat(0), share.seat(1), share.seat(2));
        let first = a.opened();
        assert!(!a.ahead(), "one ahead is within the slack");
        let second = a.opened();
        assert!(a.ahead(), "two ahead of the least loaded");
        assert!(!b.ahead() && !c.ahead());
        // The others catch up: its turn again.
        let (_b1, _c1) = (b.opened(), c.opened());
        assert!(!a.ahead());
        // Its connections end: never ahead.
        drop((first, second));
        assert!(!a.ahead());
        // A loop that never started is not waited for.
        let _more = (a.opened(), a.opened(), a.opened());
        assert!(a.ahead());
        b.retire();
        assert!(a.ahead(), "c still has fewer");
        let _c2 = (c.opened(), c.opened());
        assert!(!a.ahead());
    }

    #[tokio::test]
    async fn a_loop_ahead_waits_for_its_turn_at_most_the_bounded_wait() {
        let share = Share::new(2);
        let a = share.seat(0);
        let _open = (a.opened(), a.opened(), a.opened());
        use futures_util::FutureExt;
        // No other loop accepts: it waits, then accepts anyway.
        assert!(a.turn().now_or_never().is_none(), "ahead: not at once");
        let started = std::time::Instant::now();
        a.turn().await;
        assert!(started.elapsed() >= SHARE_WAIT);
        // Not ahead: no wait at all.
        let b = share.seat(1);
        let _caught_up = (b.opened(), b.opened());
        assert!(a.turn().now_or_never().is_some(), "its turn at once");
    }
}
