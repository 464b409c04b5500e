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
//! Modules, in the order a request meets them, then the rest:
//!
//! - [`server`]: the public listener: accept loop, connection limit, timeouts, drain.
//! - [`proxy`]: the request path: classify, key, look up, then hit, fill, wait or bypass.
//! - [`policy`]: HTTP caching rules as pure functions (RFC 9111): storable? fresh? how old?
//! - [`rules`]: per-path rules for apps without caching headers (bypass, TTLs, query keys).
//! - [`negotiate`]: content codings: which stored variant a request gets (`Accept-Encoding`),
//!   a variant's head, the reduced `Accept-Encoding` a key holds.
//! - [`cache`]: the disk cache: lookup, fill coalescing, store, index, eviction, purge, and
//!   the compressed variants made once per stored object.
//! - [`compress`]: the `compress:` settings, which objects get variants, the encoders.
//! - [`shared`]: the shared tier in object storage behind every instance's disk: read on a
//!   local miss, written behind a fill, failing open.
//! - [`access`]: the access log line (written once the body is sent) and the request id.
//! - [`shared_tier`]: the shared tier's settings and `s3://` URL, below both `config` and `shared`.
//! - [`upstream`]: the pooled client to the app: hop-by-hop headers, timeouts, 502/504.
//! - [`body`]: the body types shared by the proxy, the cache and the admin port.
//! - [`zerocopy`]: stored bodies mapped into memory and sent from their files; the only
//!   `unsafe`, under one contract.
//! - [`admin`]: the admin listener (`/metrics`, probes, purge, objects, prime) and its command-side client.
//! - [`inspect`]: what is stored for a URL and why a request would or would not be served from it.
//! - [`prime`]: priming: the `prime` command's inputs (lists, folders, manifests, sitemaps),
//!   the protocol it speaks with `POST /prime`, and the one warming loop in the sidecar.
//! - [`sources`]: the `prime_sources` allow-list a prime may fill from instead of the app.
//! - [`bucket`]: a token bucket bounding a rate (invalidations).
//! - [`config`]: configuration layers (file, environment, flags) validated into [`config::Config`].
//! - [`error`]: [`error::BoxError`], the error every body carries (leaf: imports nothing).
//! - [`units`]: byte sizes and durations as operators write them (leaf: imports nothing).
//! - [`metrics`]: every metric name as a constant, described once.
//! - [`sidecar`]: wires one sidecar together (state, admin port, public port, one shutdown).
//! - [`reload`]: SIGHUP: the configuration read again, its live keys put in force (the
//!   [`reload::LiveProxy`] each request takes), the rest waiting for a restart.
//! - [`serve`]: the `serve` subcommand: supervised app, sidecar, priming, signals, exit status.
//! - [`limits`]: the descriptor limit: raised for the sidecar, given back to the app.
//! - [`supervise`]: the child app of `serve -- <command>`: start, readiness, signals, status.
//! - [`demo`]: a built-in sample origin and the `demo` subcommand.

// `unsafe` only where a module says it may (one: `zerocopy`), under its written contract.
#![deny(unsafe_code)]

pub mod access;
pub mod admin;
pub mod body;
pub mod bucket;
pub mod cache;
pub mod compress;
pub mod config;
pub mod demo;
pub mod error;
pub mod inspect;
pub mod limits;
pub mod metrics;
pub mod negotiate;
pub mod policy;
pub mod prime;
pub mod proxy;
pub mod reload;
pub mod rules;
pub mod serve;
pub mod server;
pub mod shared;
pub mod shared_tier;
pub mod sidecar;

pub mod sources;
pub mod supervise;
pub mod units;
pub mod upstream;
#[allow(unsafe_code)] // The one module allowed it, under its contract (see its doc).
pub mod zerocopy;

/// A builder for outgoing HTTP(S) clients (prime, purge, fills from another source): rustls
/// with the ring provider, system roots, no environment proxies. Installs the provider once.
pub fn http_client() -> reqwest::ClientBuilder {
    // Fails only when a provider is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy()
}

#[cfg(test)]
mod tests {
    /// The module map above names every module, so it cannot fall behind again.
    #[test]
    fn the_module_map_lists_every_module() {
        let lib = include_str!("lib.rs");
        let modules: Vec<&str> = lib
            .lines()
            .filter_map(|l| l.strip_prefix("pub mod ")?.strip_suffix(';'))
            .collect();
        assert!(modules.len() >= 18, "{modules:?}");
        for module in modules {
            assert!(
                lib.contains(&format!("//! - [`{module}`]: ")),
                "src/lib.rs: `{module}` is missing from the module map"
            );
        }
    }
}
