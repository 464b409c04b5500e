//! The LRU eviction loop: woken when a fill pushes usage past the high watermark (or a
//! reservation is refused), and on a timer; each pass evicts least-recently-used objects until
//! usage is under the low watermark. It never blocks the request path: the index lock is held
//! only to pick victims, and files are unlinked on a blocking thread (open mappings and files
//! stay valid for their readers until dropped).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::cache::Cache;

/// Runs until `cancel` fires.
pub async fn run(cache: Arc<Cache>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(cache_interval(&cache));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = cache.evict_wakeup.notified() => {}
            _ = tick.tick() => {
                // A cache dir that was unusable at startup is retried here: caching resumes
                // once the disk recovers.
                cache.retry_open();
            }
        }
        let (objects, bytes) = cache.evict_pass().await;
        if objects > 0 {
            debug!(objects, bytes, "evicted");
        }
        cache.publish_gauges();
    }
}

fn cache_interval(cache: &Cache) -> std::time::Duration {
    cache.config().evict_interval
}
