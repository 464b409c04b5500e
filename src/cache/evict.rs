//! The LRU eviction loop: woken when a reservation leaves usage past the high watermark, and
//! on a timer; each pass evicts least-recently-used objects until usage is under the low
//! watermark, so that most fills find their room ready. It is headroom, not the only way room
//! is made: a fill that does not fit evicts what it needs itself (`Budget::reserve_room`), so
//! a cache sitting between the watermarks never refuses an object that could fit. It never
//! blocks the request path: the index lock is held only to pick victims, and files are
//! unlinked on a blocking thread (open mappings and files stay valid for their readers until
//! dropped).
//!
//! Beside the loop: the pass ([`Cache::evict_pass`], its choice of victims in
//! `select_victims`, pure over the index), and the storage step that removes what the index
//! let go of (`Cache::unlink`, the tail of a purge, and the cache's [`Evictor`] for the
//! victims of a reservation).
//! It owns no lock: it takes the budget's `index` for the choice only, and lets go before the
//! tiers forget the victims and before any `.await`.

use std::collections::HashSet;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::cache::Cache;
use crate::cache::budget::Evictor;
use crate::cache::index::{Index, Removed};
use crate::cache::segments::Place;
use crate::metrics as m;

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
    cache.settings().evict_interval
}

/// Takes the least recently used entries out of the index until what is left is under the low
/// watermarks (`low`, a share of the `budget` and of the `max_objects` bound), when it is over
/// a high watermark (`high`) or a limit; `None` otherwise.
pub(super) fn select_victims(
    ix: &mut Index,
    (budget, max_objects): (u64, u64),
    high: f64,
    low: f64,
) -> Option<Vec<Removed>> {
    let (high, low, high_objects, low_objects) = (
        (budget as f64 * high) as u64,
        (budget as f64 * low) as u64,
        // The object bound has the same watermarks.
        (max_objects as f64 * high) as u64,
        (max_objects as f64 * low) as u64,
    );
    // What is being removed is as good as gone (fills that made room for themselves
    // evicted it): the pass goes by what is left once it is.
    let (usage, objects) = ix.settled();
    let over_bytes = usage > high || usage > budget;
    let over_objects = objects > high_objects || objects > max_objects;
    if !over_bytes && !over_objects {
        return None;
    }
    let mut out = Vec::new();
    while ix.settled().0 > low || ix.settled().1 > low_objects {
        match ix.pop_lru() {
            Some(r) => out.push(r),
            None => break,
        }
    }
    Some(out)
}

impl Cache {
    /// Removes files an index change made unreachable, off the runtime, then accounts them.
    pub(super) async fn unlink(&self, removed: Vec<Removed>) {
        self.budget.remove(self, removed, (0, 0)).await;
    }

    /// Forgets and unlinks objects taken out of the index; how many.
    pub(super) async fn finish_purge(&self, removed: Vec<Removed>) -> usize {
        for r in &removed {
            self.tiers.forget(&r.key);
        }
        let n = removed.len();
        self.unlink(removed).await;
        metrics::counter!(m::PURGED_OBJECTS).increment(n as u64);
        self.publish_gauges();
        n
    }

    /// Evicts least-recently-used objects until usage is under the low watermark. Returns
    /// (objects, bytes) evicted.
    pub async fn evict_pass(&self) -> (usize, u64) {
        let limits = self.limits();
        let (high, low) = (self.settings.high_watermark, self.settings.low_watermark);
        // Segments past the most there may be are reclaimed whole: what they still hold goes.
        let reclaim: HashSet<u64> = self
            .segments()
            .map(|s| s.excess())
            .unwrap_or_default()
            .into_iter()
            .collect();
        let removed: Vec<Removed> = {
            let mut ix = self.lock_index();
            let mut removed = select_victims(&mut ix, limits, high, low).unwrap_or_default();
            if !reclaim.is_empty() {
                let in_it = |p: &Place| p.slot().is_some_and(|s| reclaim.contains(&s.segment_id()));
                let keys = ix.keys_where(|e| in_it(&e.image.place) || e.variants.iter().any(|v| in_it(&v.image.place)));
                removed.extend(keys.iter().filter_map(|k| ix.remove(k)));
            }
            if removed.is_empty() {
                return (0, 0);
            }
            removed
        };
        for r in &removed {
            self.tiers.forget(&r.key);
        }
        let n = removed.len();
        let bytes: u64 = removed.iter().map(|r| r.bytes).sum();
        self.unlink(removed).await;
        metrics::counter!(m::EVICTIONS).increment(n as u64);
        metrics::counter!(m::EVICTED_BYTES).increment(bytes);
        self.publish_gauges();
        (n, bytes)
    }
}

impl Evictor for Cache {
    /// Forgets entries evicted to make room and counts them as evictions.
    fn evicted(&self, victims: &[Removed]) {
        for r in victims {
            self.tiers.forget(&r.key);
        }
        metrics::counter!(m::EVICTIONS).increment(victims.len() as u64);
        metrics::counter!(m::EVICTED_BYTES).increment(victims.iter().map(|r| r.bytes).sum());
    }

    /// Removes the files, off the runtime.
    async fn remove_files(&self, removed: Vec<Removed>) {
        // (There is always a store when something was indexed.)
        if let Some(store) = self.store() {
            let segments = self.segments().cloned();
            let _ = tokio::task::spawn_blocking(move || {
                for r in &removed {
                    remove_removed(&store, r);
                }
                // (The tiers let go of these objects' bodies when they were forgotten, so no
                // mapped body's descriptor keeps a removed file's blocks allocated.)
                // Slots no reader holds are punched when let go: off the disk once the
                // segments' writer has done what is queued.
                drop(removed);
                if let Some(segments) = segments {
                    segments.settle_blocking();
                }
            })
            .await;
        }
    }
}

/// Removes what an index removal names: the object's image and its variants', each a file
/// to unlink or a slot to give back (punched once no reader holds it).
pub(super) fn remove_removed(store: &crate::cache::store::Store, r: &Removed) {
    match &r.place {
        Place::File => {
            let _ = store.remove_object(&r.key, r.generation);
        }
        slot => slot.discard(),
    }
    for (coding, generation, place) in &r.variants {
        match place {
            Place::File => {
                let _ = store.remove_variant(&r.key, *generation, *coding);
            }
            slot => slot.discard(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::key::KeyHash;

    fn kh(i: u32) -> KeyHash {
        KeyHash::of(&i.to_be_bytes())
    }

    /// An index (unit 1) holding objects 0..n of `len` bytes each, 0 least recently used.
    fn index(n: u32, len: u64) -> Index {
        let mut ix = Index::new();
        for i in 0..n {
            ix.insert(kh(i), crate::cache::testing::entry(i, len), 0);
        }
        ix
    }

    fn keys(victims: &[Removed]) -> Vec<KeyHash> {
        victims.iter().map(|r| r.key).collect()
    }

    #[test]
    fn a_pass_over_the_high_watermark_evicts_down_to_the_low_one_in_lru_order() {
        // 960 of 1000 bytes: over 95%; down to 80% takes the two oldest (800 left).
        let mut ix = index(12, 80);
        let victims = select_victims(&mut ix, (1000, 100), 0.95, 0.8).expect("over");
        assert_eq!(keys(&victims), vec![kh(0), kh(1)]);
        assert_eq!(ix.len(), 10);
    }

    #[test]
    fn a_pass_under_the_high_watermark_evicts_nothing() {
        // 920 of 1000 bytes: past the low watermark, under the high one.
        let mut ix = index(23, 40);
        assert!(select_victims(&mut ix, (1000, 100), 0.95, 0.9).is_none());
        assert_eq!(ix.len(), 23);
    }

    #[test]
    fn the_object_bound_has_the_same_watermarks() {
        // 20 objects of a bound of 20 (bytes far under): down to 90%, 18 objects.
        let mut ix = index(20, 1);
        let victims = select_victims(&mut ix, (1_000_000, 20), 0.95, 0.9).expect("over");
        assert_eq!(keys(&victims), vec![kh(0), kh(1)]);
        // 18 of 20 is under 95%: the next pass leaves them.
        assert!(select_victims(&mut ix, (1_000_000, 20), 0.95, 0.9).is_none());
    }

    #[test]
    fn what_is_being_removed_counts_as_gone() {
        // The two oldest were taken out by a fill (their files not removed yet): 800 left.
        let mut ix = index(12, 80);
        assert!(ix.pop_lru().is_some() && ix.pop_lru().is_some());
        assert!(select_victims(&mut ix, (1000, 100), 0.95, 0.9).is_none());
    }
}
