//! Wires one sidecar together: the shared request-path state, the admin listener and the public
//! listener, with one shutdown token. `main` and the integration tests both start it here.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::admin::{Admin, Readiness};
use crate::cache::Cache;
use crate::config::Config;
use crate::proxy::Proxy;
use crate::reload::LiveProxy;
use crate::shared::SharedTier;
use crate::upstream::Upstream;

/// A sidecar whose state is built and whose admin port is bound; the public port is bound by
/// [`Sidecar::serve`] (after a supervised app is ready).
pub struct Sidecar {
    /// The request path's shared state as started (its cache, its parts; the configuration in
    /// force after a reload is `live`'s).
    pub proxy: Arc<Proxy>,
    /// The proxy in force, which each request takes; replaced by a reload.
    pub live: Arc<LiveProxy>,
    /// Connection slots, shared by every loop serving the port; resized by a reload.
    limit: Arc<Semaphore>,
    /// How many slots `limit` has in all (taken and free).
    slots: std::sync::Mutex<usize>,
    admin_addr: SocketAddr,
    readiness: Arc<Readiness>,
    /// Cancelled to stop the sidecar: stop accepting, drain, return.
    pub shutdown: CancellationToken,
}

impl Sidecar {
    /// Builds the state and starts the admin listener.
    pub async fn start(config: Config) -> std::io::Result<Sidecar> {
        let config = Arc::new(config);
        let metrics = crate::metrics::install();
        let cache = Cache::open(config.cache_settings());
        let sources = config.prime_sources.client().map_err(std::io::Error::other)?;
        let relief_cache = cache.clone();
        let relief: crate::upstream::Relief = Arc::new(move || {
            let cache = relief_cache.clone();
            Box::pin(async move { cache.relieve_descriptors_now().await })
        });
        let shared = match &config.shared_tier {
            Some(tier) => {
                let tier = SharedTier::open(tier.clone(), std::env::vars()).map_err(std::io::Error::other)?;
                // The bucket and prefix only: never the endpoint's or the credentials' values.
                info!(at = %tier.config().describe(), "shared tier on");
                Some(tier)
            }
            None => None,
        };
        let proxy = Arc::new(Proxy::new(
            config.clone(),
            cache.clone(),
            Upstream::new(&config, relief),
            sources,
            shared.clone(),
        ));
        let admin_listener = TcpListener::bind(config.admin_listen).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("failed to bind the admin listener on {}: {e}", config.admin_listen),
            )
        })?;
        let admin_addr = admin_listener.local_addr()?;
        let shutdown = CancellationToken::new();
        if let Some(tier) = shared {
            tokio::spawn(tier.run_uploads(cache.clone(), shutdown.clone()));
        }
        tokio::spawn(crate::cache::evict::run(cache, shutdown.clone()));
        let readiness = Arc::new(Readiness::new(shutdown.clone()));
        let live = Arc::new(LiveProxy::new(proxy.clone()));
        let admin = Arc::new(Admin {
            live: live.clone(),
            metrics,
            readiness: readiness.clone(),
        });
        tokio::spawn(admin.run(admin_listener, shutdown.clone().cancelled_owned()));
        info!(addr = %admin_addr, "admin listening");
        let slots = config.max_connections;
        Ok(Sidecar {
            proxy,
            live,
            limit: Arc::new(Semaphore::new(slots)),
            slots: std::sync::Mutex::new(slots),
            admin_addr,
            readiness,
            shutdown,
        })
    }

    /// Makes the connection slots `max_connections` (after a reload): more at once; fewer as
    /// connections end (slots taken are not taken back from their connections).
    pub fn resize_connection_limit(&self, max_connections: usize) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if max_connections > *slots {
            self.limit.add_permits(max_connections - *slots);
        } else if max_connections < *slots {
            let fewer = u32::try_from(*slots - max_connections).unwrap_or(u32::MAX);
            let limit = self.limit.clone();
            tokio::spawn(async move {
                if let Ok(permits) = limit.acquire_many_owned(fewer).await {
                    permits.forget();
                }
            });
        }
        *slots = max_connections;
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Binds the public port; `/readyz` can say ready from then on. The error names the
    /// address. The port is this process's alone: no `SO_REUSEPORT`, so a second sidecache (or
    /// anything else) on the same port fails here instead of splitting its traffic.
    pub async fn bind_public(&self) -> Result<TcpListener, BindError> {
        let addr = self.proxy.config().listen;
        let listener = exclusive_listener(addr).map_err(|source| BindError { addr, source })?;
        let local = listener.local_addr().map_err(|source| BindError { addr, source })?;
        info!(addr = %local, upstream = %self.proxy.upstream().addr(), "proxy listening");
        self.readiness.bound();
        Ok(listener)
    }

    /// Serves `listener` until the shutdown token is cancelled, then drains. True when every
    /// connection finished within the grace period.
    ///
    /// With `workers` above 1, the port is served by that many event loops, each on its own
    /// thread with a single-threaded runtime and accepting from the same socket (this caller's
    /// loop is one of them), like nginx's worker processes. A connection stays on the loop that
    /// accepted it: no work-stealing wake-ups between threads on the request path. Everything
    /// else (the cache, the app's connection pool, fills) is shared.
    pub async fn serve(&self, listener: TcpListener) -> bool {
        let limit = self.limit.clone();
        let (listener, others) = match self.split(listener) {
            Ok(pair) => pair,
            Err(e) => {
                error!(error = %e, "failed to prepare the public listener");
                return false;
            }
        };
        // If this future is dropped instead of run to the end, the other loops stop too.
        let stop = self.shutdown.child_token();
        let _stop_on_drop = stop.clone().drop_guard();
        // The other loops keep running after draining until every loop has: a client may
        // still be reading a fill whose task runs on another loop.
        let released = CancellationToken::new();
        let _release_on_drop = released.clone().drop_guard();
        let mut drained = Vec::new();
        let share = crate::server::Share::new(others.len() + 1);
        for (i, listener) in others.into_iter().enumerate() {
            let (live, shutdown, limit, released) = (self.live.clone(), stop.clone(), limit.clone(), released.clone());
            let seat = share.seat(i + 1);
            let unseat = share.seat(i + 1);
            let (done, result) = tokio::sync::oneshot::channel();
            let blocking = blocking_threads(self.proxy.config().workers);
            let spawned = std::thread::Builder::new()
                .name(format!("sidecache-worker-{}", i + 1))
                .spawn(move || {
                    crate::upstream::set_serving_loop(i + 1);
                    crate::metrics::set_serving_loop(i + 1);
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .max_blocking_threads(blocking)
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            seat.retire();
                            return warn!(error = %e, "failed to start a worker loop");
                        }
                    };
                    runtime.block_on(async move {
                        let Ok(listener) = TcpListener::from_std(listener) else {
                            return seat.retire();
                        };
                        let ok = crate::server::run(listener, live, shutdown.cancelled_owned(), limit, seat).await;
                        let _ = done.send(ok);
                        released.cancelled().await;
                    });
                });
            match spawned {
                Ok(_) => drained.push(result),
                Err(e) => {
                    unseat.retire();
                    warn!(error = %e, "failed to start a worker thread");
                }
            }
        }
        let seat = share.seat(0);
        let mut all =
            crate::server::run(listener, self.live.clone(), stop.clone().cancelled_owned(), limit, seat).await;
        for result in drained {
            all &= result.await.unwrap_or(false);
        }
        released.cancel();
        all
    }

    /// A duplicate of `listener`'s socket per other loop: every loop accepts from the one
    /// queue (as nginx's workers share one listening socket without `reuseport`). Not
    /// `SO_REUSEPORT`: its group is open to any process of the same user, so a second sidecache
    /// started on the port would join it and take half the connections. Fewer loops when a
    /// duplicate cannot be made (no descriptors left).
    fn split(&self, listener: TcpListener) -> std::io::Result<(TcpListener, Vec<std::net::TcpListener>)> {
        let workers = self.proxy.config().workers;
        let std_listener = listener.into_std()?;
        let mut others = Vec::with_capacity(workers.saturating_sub(1));
        for _ in 1..workers {
            match std_listener.try_clone() {
                Ok(l) => others.push(l),
                Err(e) => {
                    warn!(error = %e, loops = others.len() + 1, "fewer serving loops than configured");
                    break;
                }
            }
        }
        Ok((TcpListener::from_std(std_listener)?, others))
    }
}

/// The public port could not be bound; names the address (issue 28).
#[derive(Debug, thiserror::Error)]
#[error("failed to bind the public listener on {addr}: {source}")]
pub struct BindError {
    /// The configured address.
    pub addr: SocketAddr,
    /// Why (`Address already in use`, `Permission denied`, ...).
    pub source: std::io::Error,
}

/// Blocking-pool threads for each of `workers` serving loops: file steps are short, and a
/// bounded pool keeps a burst of fills from spawning hundreds of threads (and their allocator
/// arenas).
pub fn blocking_threads(workers: usize) -> usize {
    (64 / workers.max(1)).max(8)
}

/// A listener on `addr` with `SO_REUSEADDR` (a restart may bind while old connections linger
/// in TIME_WAIT; it never allows binding over another listener) and without `SO_REUSEPORT`.
fn exclusive_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}
