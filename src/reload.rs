//! Reloading the configuration on SIGHUP, as nginx and Varnish do: the file, environment and
//! flags are read again; what can change while serving is applied, with no connection dropped
//! and the cache kept; a configuration that does not load is refused, logged, and the one in
//! force kept.
//!
//! The request path's state is replaced whole: [`LiveProxy`] holds the [`Proxy`] in force, and
//! each request takes the one in force when it arrives, so a request in flight finishes under
//! the configuration it began with (its rule, its counters) while the next one gets the new
//! one. The parts behind it (the cache, the app's connection pool, the shared tier) are the
//! same objects, shared by old and new.
//!
//! Not here: which signal means reload ([`crate::supervise::Termination`]), the log level's
//! filter (`main`'s subscriber, reached through [`crate::serve::LogLevel`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::config::{Config, Effective};
use crate::proxy::Proxy;

/// Keys a reload applies while serving. The others (addresses, the cache's sizes and layout,
/// the app's address and timeouts, the shared tier, compression, tags, the key's `query`) are
/// read once at startup by the parts built from them; a reload that changes them says they
/// wait for a restart.
pub const LIVE_KEYS: &[&str] = &[
    "rules",
    "log_level",
    "access_log",
    "max_connections",
    "grace_period",
    "stale_if_error",
    "fingerprinted_ttl",
];

/// The [`Proxy`] in force; replaced whole by a reload.
pub struct LiveProxy {
    // A std lock: held only to clone or swap the `Arc`, never across an await.
    current: RwLock<Arc<Proxy>>,
    /// Raised by each replacement, after it (for [`LoopProxy`] to notice).
    version: AtomicU64,
}

impl LiveProxy {
    /// Starts with `proxy` in force.
    pub fn new(proxy: Arc<Proxy>) -> LiveProxy {
        LiveProxy {
            current: RwLock::new(proxy),
            version: AtomicU64::new(0),
        }
    }

    /// The proxy in force now.
    pub fn current(&self) -> Arc<Proxy> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Puts `config` in force: a proxy over the same parts under it.
    fn replace(&self, config: Config) -> Arc<Proxy> {
        let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
        let next = Arc::new(current.reconfigured(Arc::new(config)));
        *current = next.clone();
        self.version.fetch_add(1, Ordering::Release);
        next
    }
}

/// One serving loop's view of the [`LiveProxy`]: the proxy in force, as a replica of its own
/// (a clone: every part shared), made again when a reload replaces it. Each request takes a
/// reference on the proxy that answers it: on the replica that count's cache line stays with
/// the loop's core, where on the shared proxy (and its lock) it moved between the cores on
/// every request.
/// The lock here is taken only by this loop's tasks.
pub struct LoopProxy {
    live: Arc<LiveProxy>,
    /// The version of the live proxy the replica was made of, and the replica.
    own: Mutex<(u64, Arc<Proxy>)>,
}

impl LoopProxy {
    /// A view of `live` for one serving loop.
    pub fn new(live: Arc<LiveProxy>) -> LoopProxy {
        let version = live.version.load(Ordering::Acquire);
        let own = Mutex::new((version, Arc::new(Proxy::clone(&live.current()))));
        LoopProxy { live, own }
    }

    /// The proxy in force now: what [`LiveProxy::current`] answers, as this loop's replica.
    pub fn current(&self) -> Arc<Proxy> {
        // (Read before the proxy: a replacement between the two makes the next call replicate
        // again, never keeps an old proxy under the new version.)
        let version = self.live.version.load(Ordering::Acquire);
        let mut own = self.own.lock().unwrap_or_else(|p| p.into_inner());
        if own.0 != version {
            *own = (version, Arc::new(Proxy::clone(&self.live.current())));
        }
        own.1.clone()
    }
}

/// What a reload did.
#[derive(Debug, Default)]
pub struct Reloaded {
    /// Live keys whose value changed, now in force: `(key, old, new)` as YAML, secrets never.
    pub applied: Vec<(&'static str, String, String)>,
    /// Keys whose value changed that wait for a restart.
    pub restart: Vec<&'static str>,
}

/// Applies the live keys of `new` over the configuration in force in `live` (whose effective
/// values are `in_force`, updated to what is now in force). Returns what changed.
pub fn apply(live: &LiveProxy, in_force: &mut Effective, new: &Config, new_effective: &Effective) -> Reloaded {
    let mut reloaded = Reloaded::default();
    let changed = in_force.changed(new_effective);
    let show = |e: &Effective, key: &str| {
        e.value(key)
            .map_or_else(|| "unset".to_owned(), |v| serde_json::to_string(v).unwrap_or_default())
    };
    for key in &changed {
        if LIVE_KEYS.contains(key) {
            reloaded
                .applied
                .push((key, show(in_force, key), show(new_effective, key)));
        } else {
            reloaded.restart.push(key);
        }
    }
    if reloaded.applied.is_empty() {
        return reloaded;
    }
    let mut config = Config::clone(live.current().config());
    config.rules = new.rules.clone();
    config.log_level = new.log_level.clone();
    config.access_log = new.access_log;
    config.max_connections = new.max_connections;
    config.grace_period = new.grace_period;
    config.stale_if_error = new.stale_if_error;
    config.fingerprinted_ttl = new.fingerprinted_ttl;
    live.replace(config);
    in_force.adopt(new_effective, LIVE_KEYS);
    reloaded
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every live key is a key, and `apply` copies each (a key added to `LIVE_KEYS` without
    /// its line in `apply` would be reported applied and not be).
    #[test]
    fn live_keys_are_keys_and_each_is_copied() {
        for key in LIVE_KEYS {
            assert!(crate::config::RawConfig::KEYS.contains(key), "{key}");
            let copied = format!("config.{key} = new.{key}");
            assert!(
                include_str!("reload.rs").contains(&copied),
                "apply does not copy `{key}`"
            );
        }
    }
}
