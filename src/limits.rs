//! The process's descriptor limit: read, raised for the sidecar's own open files, and given
//! back to the app it starts.

use std::sync::atomic::{AtomicU64, Ordering};

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// The soft limit on open descriptors (`RLIMIT_NOFILE`); 1024 when it is unlimited.
pub fn descriptor_limit() -> u64 {
    getrlimit(Resource::Nofile).current.unwrap_or(1024)
}

/// How many memory mappings the process may have (`vm.max_map_count`; 65530 when unreadable).
pub fn mapping_limit() -> u64 {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(65530)
}

/// The soft descriptor limit the process started with, before [`raise_descriptor_limit`]:
/// children get it back (0: not raised).
static STARTED_WITH: AtomicU64 = AtomicU64::new(0);

/// The soft descriptor limit the process started with, when [`raise_descriptor_limit`] raised
/// it: the app it starts gets it back (see [`crate::supervise::launch`]).
pub fn started_with() -> Option<u64> {
    Some(STARTED_WITH.load(Ordering::Relaxed)).filter(|&soft| soft != 0)
}

/// Raises the soft limit on open descriptors to the hard limit, as servers that hold many
/// connections and files do (nothing else in the process depends on the lower one). Returns
/// (before, after).
pub fn raise_descriptor_limit() -> std::io::Result<(u64, u64)> {
    let lim = getrlimit(Resource::Nofile);
    let before = lim.current.unwrap_or(u64::MAX);
    // An unlimited hard limit is still capped by the kernel (`fs.nr_open`, 1M by default).
    let target = lim.maximum.unwrap_or(u64::MAX).min(1 << 20);
    if before < target {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(target),
                maximum: lim.maximum,
            },
        )?;
        STARTED_WITH.store(before, Ordering::Relaxed);
        return Ok((before, target));
    }
    Ok((before, before))
}
