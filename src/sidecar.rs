//! Wires one sidecar together: the shared request-path state, the admin listener and the public
//! listener, with one shutdown token. `main` and the integration tests both start it here.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::admin::Admin;
use crate::cache::Cache;
use crate::config::Config;
use crate::proxy::Proxy;
use crate::upstream::Upstream;

/// A sidecar whose state is built and whose admin port is bound; the public port is bound by
/// [`Sidecar::serve`] (after a supervised app is ready).
pub struct Sidecar {
    /// The request path's shared state.
    pub proxy: Arc<Proxy>,
    admin_addr: SocketAddr,
    /// Cancelled to stop the sidecar: stop accepting, drain, return.
    pub shutdown: CancellationToken,
}

impl Sidecar {
    /// Builds the state and starts the admin listener.
    pub async fn start(config: Config) -> std::io::Result<Sidecar> {
        let config = Arc::new(config);
        let metrics = crate::metrics::install();
        let cache = Cache::open(config.clone());
        let sources = crate::http_client().build().map_err(std::io::Error::other)?;
        let proxy = Arc::new(Proxy {
            upstream: Upstream::new(&config),
            cache: cache.clone(),
            sources,
            config: config.clone(),
        });
        let admin_listener = TcpListener::bind(config.admin_listen).await?;
        let admin_addr = admin_listener.local_addr()?;
        let shutdown = CancellationToken::new();
        tokio::spawn(crate::cache::evict::run(cache, shutdown.clone()));
        let admin = Arc::new(Admin {
            proxy: proxy.clone(),
            metrics,
        });
        tokio::spawn(admin.run(admin_listener, shutdown.clone().cancelled_owned()));
        info!(addr = %admin_addr, "admin listening");
        Ok(Sidecar {
            proxy,
            admin_addr,
            shutdown,
        })
    }

    /// The admin listener's address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Binds the public port.
    pub async fn bind_public(&self) -> std::io::Result<TcpListener> {
        let listener = TcpListener::bind(self.proxy.config.listen).await?;
        info!(addr = %listener.local_addr()?, upstream = %self.proxy.upstream.addr(), "proxy listening");
        Ok(listener)
    }

    /// Serves `listener` until the shutdown token is cancelled, then drains. True when every
    /// connection finished within the grace period.
    pub async fn serve(&self, listener: TcpListener) -> bool {
        crate::server::run(listener, self.proxy.clone(), self.shutdown.clone().cancelled_owned()).await
    }
}
