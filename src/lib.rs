//! sidecache: a caching reverse proxy that runs beside an app on every instance and keeps its
//! static assets on the instance's local, nonpersistent disk.
//!
//! ```text
//! client -> server -> proxy --(bypass, upgrade)------------------------> upstream -> app
//!                       |
//!                       '-- (cache lookup: hit | miss+fill | wait) ----> upstream -> app
//! admin: /metrics /healthz /readyz            supervise: `serve -- <app command>`
//! ```
//!
//! Modules: [`config`] (layers and validation), [`server`] (accept loop, limits, drain),
//! [`proxy`] (the request path), [`upstream`] (client to the app), [`admin`] (admin port),
//! [`supervise`] (child app), [`sidecar`] (wiring), [`demo`] (built-in sample origin),
//! [`metrics`] (names), [`units`] (sizes and durations), [`body`] (body types), [`sources`] (the
//! prime allow-list), [`bucket`] (rate bounds).

pub mod admin;
pub mod body;
pub mod bucket;
pub mod cache;
pub mod config;
pub mod demo;
pub mod metrics;
pub mod policy;
pub mod prime;
pub mod proxy;
pub mod rules;
pub mod serve;
pub mod server;
pub mod sidecar;

pub mod sources;
pub mod supervise;
pub mod units;
pub mod upstream;

/// A builder for outgoing HTTP(S) clients (prime, purge, fills from another source): rustls
/// with the ring provider, system roots, no environment proxies. Installs the provider once.
pub fn http_client() -> reqwest::ClientBuilder {
    // Fails only when a provider is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy()
}
