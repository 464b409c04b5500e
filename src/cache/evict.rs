//! The LRU eviction loop: woken when a reservation leaves usage past the high watermark, and
//! on a timer; each pass evicts least-recently-used objects until usage is under the low
//! watermark, so that most fills find their room ready. It is headroom, not the only way room
//! is made: a fill that does not fit evicts what it needs itself (`Cache::reserve_room`), so
//! a cache sitting between the watermarks never refuses an object that could fit. It never
//! blocks the request path: the index lock is held only to pick victims, and files are
//! unlinked on a blocking thread (open mappings and files stay valid for their readers until
//! dropped).

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
            _ = cache.evict_wakeup().notified() => {}
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
