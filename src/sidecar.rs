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
use crate::shared::SharedTier;
use crate::upstream::Upstream;

/// A sidecar whose state is built and whose admin port is bound; the public port is bound by
/// [`Sidecar::serve`] (after a supervised app is ready).
pub struct Sidecar {
    /// The request path's shared state.
    pub proxy: Arc<Proxy>,
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
        let cache = Cache::open(config.clone());
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
        let admin_listener = TcpListener::bind(config.admin_listen).await?;
        let admin_addr = admin_listener.local_addr()?;
        let shutdown = CancellationToken::new();
        if let Some(tier) = shared {
            tokio::spawn(tier.run_uploads(cache.clone(), shutdown.clone()));
        }
        tokio::spawn(crate::cache::evict::run(cache, shutdown.clone()));
        let readiness = Arc::new(Readiness::new(shutdown.clone()));
        let admin = Arc::new(Admin {
            proxy: proxy.clone(),
            metrics,
            readiness: readiness.clone(),
        });
        tokio::spawn(admin.run(admin_listener, shutdown.clone().cancelled_owned()));
        info!(addr = %admin_addr, "admin listening");
        Ok(Sidecar {
            proxy,
            admin_addr,
            readiness,
            shutdown,
        })
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Binds the public port; `/readyz` can say ready from then on.
    pub async fn bind_public(&self) -> std::io::Result<TcpListener> {
        let listener = if self.proxy.config().workers > 1 {
            reuseport_listener(self.proxy.config().listen)?
        } else {
            TcpListener::bind(self.proxy.config().listen).await?
        };
        info!(addr = %listener.local_addr()?, upstream = %self.proxy.upstream().addr(), "proxy listening");
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
        let limit = Arc::new(Semaphore::new(self.proxy.config().max_connections));
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
        for (i, listener) in others.into_iter().enumerate() {
            let (proxy, shutdown, limit, released) =
                (self.proxy.clone(), stop.clone(), limit.clone(), released.clone());
            let (done, result) = tokio::sync::oneshot::channel();
            let blocking = blocking_threads(self.proxy.config().workers);
            let spawned = std::thread::Builder::new()
                .name(format!("sidecache-worker-{}", i + 1))
                .spawn(move || {
                    crate::upstream::set_serving_loop(i + 1);
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .max_blocking_threads(blocking)
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => return warn!(error = %e, "failed to start a worker loop"),
                    };
                    runtime.block_on(async move {
                        let Ok(listener) = TcpListener::from_std(listener) else {
                            return;
                        };
                        let ok = crate::server::run(listener, proxy, shutdown.cancelled_owned(), limit).await;
                        let _ = done.send(ok);
                        released.cancelled().await;
                    });
                });
            match spawned {
                Ok(_) => drained.push(result),
                Err(e) => warn!(error = %e, "failed to start a worker thread"),
            }
        }
        let mut all = crate::server::run(listener, self.proxy.clone(), stop.clone().cancelled_owned(), limit).await;
        for result in drained {
            all &= result.await.unwrap_or(false);
        }
        released.cancel();
        all
    }

    /// Adds a listening socket per other loop on the same address, in `listener`'s
    /// `SO_REUSEPORT` group: the kernel spreads new connections over the loops evenly. Fewer
    /// loops when that fails (a listener bound without the option, no descriptors left).
    fn split(&self, listener: TcpListener) -> std::io::Result<(TcpListener, Vec<std::net::TcpListener>)> {
        let workers = self.proxy.config().workers;
        let addr = listener.local_addr()?;
        let mut others = Vec::with_capacity(workers.saturating_sub(1));
        for _ in 1..workers {
            match reuseport_listener(addr).and_then(|l| l.into_std()) {
                Ok(l) => others.push(l),
                Err(e) => {
                    warn!(error = %e, loops = others.len() + 1, "fewer serving loops than configured");
                    break;
                }
            }
        }
        Ok((listener, others))
    }
}

/// Blocking-pool threads for each of `workers` serving loops: file steps are short, and a
/// bounded pool keeps a burst of fills from spawning hundreds of threads (and their allocator
/// arenas).
pub fn blocking_threads(workers: usize) -> usize {
    (64 / workers.max(1)).max(8)
}

/// A listener on `addr` that other sockets of this user may join with `SO_REUSEPORT`.
fn reuseport_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}
