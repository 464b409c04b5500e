//! The budget: what the cache may spend on disk (bytes, as charged, and objects) and what it
//! spends, with the index that counts it. It owns the index lock and the limits in force, and
//! hands out [`Reservation`]s that give back what they hold when dropped. Room is made on
//! demand: a reservation that does not fit evicts the least recently used objects it needs
//! and is granted once their files are off the disk ([`Budget::reserve_room`]).
//!
//! It does not touch files: it asks a [`SpaceSource`] (the store) for the filesystem's free
//! space, and an [`Evictor`] (the cache) to forget and remove the victims it picks.
//!
//! # Locks
//!
//! Two std mutexes, held for in-memory steps only, never across an `.await`: `limits` ->
//! `index` (the limits are recomputed from the index's usage while `limits` is held; the
//! filesystem is asked for its free space then too), never the other way round. `index` is a
//! leaf otherwise. A [`Reservation`] locks `index` when dropped, and [`Budget::charge`] locks
//! it: neither happens while it is held (a std mutex is not reentrant).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::debug;

use crate::cache::Settings;
use crate::cache::admit::Frequency;
use crate::cache::index::{Index, Order, Removed};
use crate::cache::key::KeyHash;
use crate::cache::store::{self, Space, Store};
use crate::metrics as m;
use crate::units::MinFree;

/// Most objects in line for eviction that admission weighs a fill against: a large fill is
/// judged by the rate of the first of them (the walk is made under the index's lock).
const ADMISSION_VICTIMS: usize = 64;

/// Longest a fill waits for the files evicted to make its room to be removed; past it the
/// response is relayed uncached.
const ROOM_WAIT: Duration = Duration::from_secs(2);

/// Where the budget learns the filesystem's free space (the store; a fake in tests).
pub trait SpaceSource: Send + Sync {
    /// The filesystem's space now; `None` when it cannot be asked.
    fn space(&self) -> Option<Space>;
}

impl SpaceSource for Store {
    fn space(&self) -> Option<Space> {
        Store::space(self).ok()
    }
}

/// What removes the victims the budget picks to make room (the cache; a fake in tests).
pub trait Evictor: Send + Sync + 'static {
    /// Victims were taken out of the index: forget them wherever else they are held, and
    /// count them as evictions.
    fn evicted(&self, victims: &[Removed]);
    /// Removes the victims' files; done once they are off the disk. The budget accounts for
    /// them then ([`Index::room_made`]).
    fn remove_files(&self, victims: Vec<Removed>) -> impl Future<Output = ()> + Send;
}

/// The configured limits the budget works within.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The budget in bytes, before `min_free` lowers it.
    pub max_size: u64,
    /// The object bound, before short inodes lower it.
    pub max_objects: u64,
    /// Free space to leave on the filesystem.
    pub min_free: MinFree,
    /// Share of the budget past which the eviction loop is woken.
    pub high_watermark: f64,
    /// Share of the budget the eviction loop evicts down to.
    pub low_watermark: f64,
    /// Whether a full cache admits new objects by frequency ([`Budget::reserve_new`]).
    pub admission: bool,
    /// The index's eviction order.
    pub order: Order,
    /// How long waiters wait on a fill: a fill waits for its room no longer.
    pub coalesce_timeout: Duration,
    /// Memory the index's tags may hold (`max_tag_index_memory`).
    pub tag_memory: u64,
}

impl Limits {
    /// The limits the cache's settings set.
    pub fn from_settings(settings: &Settings) -> Limits {
        Limits {
            max_size: settings.max_size,
            max_objects: settings.max_objects,
            min_free: settings.min_free,
            high_watermark: settings.high_watermark,
            low_watermark: settings.low_watermark,
            admission: settings.admission,
            order: settings.eviction,
            coalesce_timeout: settings.coalesce_timeout,
            tag_memory: settings.max_tag_index_memory,
        }
    }
}

/// The budget: the index (what is stored, reserved, being removed) and the limits in force.
pub struct Budget {
    limits: Limits,
    /// A std mutex: held for in-memory index steps only (see the module's locks).
    index: Mutex<Index>,
    /// The budget in force (bytes, objects) and when it was computed (`None`: not yet). A std
    /// mutex, taken before `index` when both are held.
    budget: Mutex<(u64, u64, Option<Instant>)>,
    /// Set once files found at startup are counted (fills may reserve from then on).
    accounted: AtomicBool,
    /// The filesystem's free space, once the store is open.
    disk: OnceLock<Arc<dyn SpaceSource>>,
    /// Wakes the eviction loop.
    evict_wakeup: Arc<Notify>,
    /// How often each key is asked for: whether a new object may displace an old one once the
    /// cache is full (lock-free, beside the index, never under its lock for long).
    frequency: Frequency,
}

/// Bytes (as charged) and objects reserved for a fill, given back when dropped unless handed
/// to the index step that uses them ([`Reservation::hand_over`]): a fill that stops anywhere
/// leaves nothing reserved, and no failure path gives room back by hand. Never dropped while
/// the index is locked.
pub struct Reservation {
    budget: Arc<Budget>,
    /// Bytes reserved, as charged.
    pub bytes: u64,
    objects: u64,
}

impl Reservation {
    /// Hands what is reserved to an index step, under the index lock the caller holds: the
    /// objects are released (the object is indexed now, or refused and given back in that
    /// step), and the bytes returned for the step to convert into its entry or give back.
    pub fn hand_over(mut self, ix: &mut Index) -> u64 {
        ix.release_reservation(0, std::mem::take(&mut self.objects));
        std::mem::take(&mut self.bytes)
    }

    /// Nothing reserved, against the same budget (what a taken reservation leaves behind).
    pub fn empty(of: &Reservation) -> Reservation {
        Reservation {
            budget: of.budget.clone(),
            bytes: 0,
            objects: 0,
        }
    }

    /// Adds another reservation's bytes and objects to this one.
    pub fn absorb(&mut self, mut other: Reservation) {
        self.objects += std::mem::take(&mut other.objects);
        self.bytes += std::mem::take(&mut other.bytes);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 || self.objects > 0 {
            self.budget.lock_index().release_reservation(self.bytes, self.objects);
        }
    }
}

/// The object bound in force: `max_objects`, lowered to what the filesystem's free inodes
/// allow (one per object) beyond the `our_objects` held already, keeping free the same share
/// of the inodes as `keep` bytes are of the filesystem.
fn object_limit(max_objects: u64, our_objects: u64, space: &Space, keep: u64) -> u64 {
    if space.total_files == 0 || space.total == 0 {
        // No fixed number of inodes to run out of.
        return max_objects;
    }
    let keep_files = (space.total_files as f64 * keep as f64 / space.total as f64) as u64;
    let room = our_objects + space.free_files.saturating_sub(keep_files);
    max_objects.min(room)
}

/// What the layout spends on disk whatever is stored, charged up front: a unit for each of
/// its fixed entries and fan-out directories, and a name per file it may hold at once, for
/// directories never shrink. Fan-out directories are never removed either, so the files made
/// over time, not those held at once, make them: as many as `max_objects` objects can make.
fn layout_overhead(unit: u64, max_objects: u64, max_files: u64) -> u64 {
    let fanout = max_objects.min(store::FANOUT_DIRS);
    (store::LAYOUT_FIXED + fanout) * unit + max_files * store::NAME_COST
}

impl Budget {
    /// A budget of `limits` over an empty index, with no disk yet.
    pub fn new(limits: Limits) -> Budget {
        let mut index = Index::new();
        index.set_tag_budget(limits.tag_memory);
        index.set_order(limits.order);
        Budget {
            budget: Mutex::new((limits.max_size, limits.max_objects, None)),
            limits,
            index: Mutex::new(index),
            accounted: AtomicBool::new(false),
            disk: OnceLock::new(),
            evict_wakeup: Arc::new(Notify::new()),
            frequency: Frequency::new(limits.max_objects),
        }
    }

    /// Sets the disk's allocation unit (every size is charged in it) and charges the layout's
    /// overhead, with names for the files it may hold: every object's, or (`files_from` > 0,
    /// smaller images packed into segments) only those of `files_from` bytes and more, of which
    /// the budget holds at most `max_size / files_from`. Before anything is found or reserved.
    pub fn set_unit(&self, unit: u64, files_from: u64) {
        let max_files = match files_from {
            0 => self.limits.max_objects,
            from => self.limits.max_objects.min(self.limits.max_size / from),
        };
        let overhead = layout_overhead(unit, self.limits.max_objects, max_files);
        self.lock_index().set_disk(unit, overhead);
    }

    /// Where the filesystem's free space is asked from from now on (once).
    pub fn set_disk(&self, disk: Arc<dyn SpaceSource>) {
        let _ = self.disk.set(disk);
    }

    /// Marks the files found at startup as counted: fills may reserve from now on.
    pub fn set_accounted(&self) {
        self.accounted.store(true, Ordering::Release);
    }

    /// What wakes the eviction loop.
    pub fn evict_wakeup(&self) -> &Arc<Notify> {
        &self.evict_wakeup
    }

    /// The configured limits.
    pub fn config(&self) -> &Limits {
        &self.limits
    }

    /// The index, locked.
    pub fn lock_index(&self) -> MutexGuard<'_, Index> {
        // A panic while holding the lock cannot leave the index half-updated in a way that
        // serves wrong bytes (lookups re-check keys and hashes), so poisoning is ignored.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// (objects, bytes used, bytes reserved).
    pub fn stats(&self) -> (usize, u64, u64) {
        let ix = self.lock_index();
        (ix.len(), ix.used(), ix.reserved())
    }

    /// The disk budget in force: `max_size`, lowered when the filesystem is short of
    /// `min_free` (checked at most once a second).
    pub fn budget(&self) -> u64 {
        self.limits().0
    }

    /// The budget and the object bound in force: `max_size` and `max_objects`, lowered when
    /// the filesystem is short of `min_free` bytes, or of its share of inodes (checked at most
    /// once a second).
    pub fn limits(&self) -> (u64, u64) {
        self.limits_at(Instant::now())
    }

    /// [`Budget::limits`] as of `now`.
    fn limits_at(&self, now: Instant) -> (u64, u64) {
        let mut b = self.budget.lock().unwrap_or_else(|p| p.into_inner());
        if b.2
            .is_none_or(|at| now.saturating_duration_since(at) >= Duration::from_secs(1))
        {
            (b.0, b.1) = self.compute_limits();
            b.2 = Some(now);
            metrics::gauge!(m::CACHE_BUDGET).set(b.0 as f64);
            metrics::gauge!(m::CACHE_OBJECT_LIMIT).set(b.1 as f64);
        }
        (b.0, b.1)
    }

    fn compute_limits(&self) -> (u64, u64) {
        let (max_size, max_objects) = (self.limits.max_size, self.limits.max_objects);
        let Some(space) = self.disk.get().and_then(|d| d.space()) else {
            return (max_size, max_objects);
        };
        let (ours, our_objects) = {
            let ix = self.lock_index();
            (ix.usage(), ix.objects())
        };
        let keep = self.limits.min_free.bytes(space.total);
        let budget = max_size.min((ours + space.free).saturating_sub(keep));
        let limit = object_limit(max_objects, our_objects, &space, keep);
        if limit < max_objects {
            debug!(limit, max_objects, "short of inodes: object bound lowered");
        }
        (budget, limit)
    }

    /// What a file of `len` bytes is charged against the budget.
    pub fn charge(&self, len: u64) -> u64 {
        self.lock_index().charge(len)
    }

    /// Reserves `bytes` (as charged) and `objects` (0 or 1) for a fill, making room when they
    /// do not fit ([`Index::reserve_room`]): the least recently used objects are evicted for
    /// it, and the reservation is complete once their files are removed (off the event loop,
    /// on a task of its own). That wait is bounded by `ROOM_WAIT`, and by `coalesce_timeout`
    /// when shorter (the fill's waiters wait for it no longer): a fill that does not get its
    /// room in time is refused (`"room"`) and what it reserved is given back, now or when the
    /// removal ends. Refused at once when it could never fit (`"budget"`, `"objects"`) or the
    /// room is held by other fills in progress (`"room"`). Wakes the eviction loop when over
    /// the high watermark, so later fills find room ready.
    pub async fn reserve_room<E: Evictor>(
        self: &Arc<Self>,
        bytes: u64,
        objects: u64,
        evictor: &Arc<E>,
    ) -> Result<Reservation, &'static str> {
        self.reserve(bytes, objects, None, evictor).await
    }

    /// Counts a request for `key` (a lookup): how often keys are asked for decides which new
    /// objects a full cache admits ([`Budget::reserve_new`]).
    pub fn note_request(&self, key: &KeyHash) {
        self.frequency.record(key);
    }

    /// How often `key` was asked for recently ([`Frequency::estimate`]): what the memory tiers
    /// weigh a new object by once they are full.
    pub fn estimate(&self, key: &KeyHash) -> u8 {
        self.frequency.estimate(key)
    }

    /// [`Budget::reserve_room`] for a new object of `key` (one object, `bytes`): once the
    /// cache is full (what it would hold with this object is past the low watermark, so storing
    /// it means evicting something, now or in the loop's next pass), it is admitted only if
    /// `key` was asked for at least as often per byte as the objects next in line for eviction
    /// that its size would displace (TinyLFU's admission, weighed by size; see
    /// [`Frequency::admits`]). Declined (`"admission"`) otherwise, with nothing evicted and
    /// nothing reserved.
    pub async fn reserve_new<E: Evictor>(
        self: &Arc<Self>,
        bytes: u64,
        key: &KeyHash,
        evictor: &Arc<E>,
    ) -> Result<Reservation, &'static str> {
        self.reserve(bytes, 1, Some(key), evictor).await
    }

    async fn reserve<E: Evictor>(
        self: &Arc<Self>,
        bytes: u64,
        objects: u64,
        candidate: Option<&KeyHash>,
        evictor: &Arc<E>,
    ) -> Result<Reservation, &'static str> {
        if !self.accounted.load(Ordering::Acquire) {
            // The files found at startup are not counted yet: the room is not known.
            return Err("room");
        }
        let (budget, max_objects) = self.limits();
        let low = self.limits.low_watermark;
        let (result, usage, count) = {
            let mut ix = self.lock_index();
            let (settled, settled_objects) = ix.settled();
            let full = settled.saturating_add(bytes) as f64 > budget as f64 * low
                || (settled_objects + objects) as f64 > max_objects as f64 * low;
            let declined = full
                && self.limits.admission
                && candidate.is_some_and(|key| {
                    !self
                        .frequency
                        .admits(key, bytes, &ix.next_victims(bytes, ADMISSION_VICTIMS))
                });
            let result = if declined {
                Err(crate::cache::index::Refused {
                    reason: "admission",
                    victims: Vec::new(),
                })
            } else {
                ix.reserve_room(bytes, objects, budget, max_objects)
            };
            (result, ix.usage(), ix.objects())
        };
        if usage as f64 > budget as f64 * self.limits.high_watermark
            || count as f64 > max_objects as f64 * self.limits.high_watermark
        {
            self.evict_wakeup.notify_one();
        }
        let room = match result {
            Ok(room) => room,
            Err(refused) => {
                if !refused.victims.is_empty() {
                    evictor.evicted(&refused.victims);
                    let (budget, evictor) = (self.clone(), evictor.clone());
                    tokio::spawn(async move { budget.remove(&*evictor, refused.victims, (0, 0)).await });
                }
                return Err(refused.reason);
            }
        };
        let (held, victims) = (room.held, room.victims);
        let mut reservation = Reservation {
            budget: self.clone(),
            bytes: bytes - held.0,
            objects: objects - held.1,
        };
        if victims.is_empty() {
            return Ok(reservation);
        }
        evictor.evicted(&victims);
        let (budget, evictor) = (self.clone(), evictor.clone());
        // On a task of its own: the files are removed and the held part granted even when this
        // fill stops waiting; a grant nobody waits for any more is dropped with the task's
        // output, which gives it back.
        let made = tokio::spawn(async move {
            budget.remove(&*evictor, victims, held).await;
            Reservation {
                budget,
                bytes: held.0,
                objects: held.1,
            }
        });
        match tokio::time::timeout(ROOM_WAIT.min(self.limits.coalesce_timeout), made).await {
            Ok(Ok(rest)) => {
                reservation.absorb(rest);
                Ok(reservation)
            }
            _ => Err("room"),
        }
    }

    /// Has the files of objects taken out of the index removed, then accounts them; for the
    /// victims of a reservation, grants the bytes and objects it `held` back in the same step
    /// ([`Index::room_made`]).
    pub async fn remove<E: Evictor>(&self, evictor: &E, removed: Vec<Removed>, held: (u64, u64)) {
        let bytes: u64 = removed.iter().map(|r| r.bytes).sum();
        let objects = removed.len() as u64;
        evictor.remove_files(removed).await;
        self.lock_index().room_made((bytes, objects), held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::key::KeyHash;

    #[test]
    fn the_object_bound_shrinks_when_inodes_are_short() {
        let space = |free_files, total_files| Space {
            free: 500,
            total: 1000,
            free_files,
            total_files,
        };
        // Plenty of inodes: max_objects.
        assert_eq!(object_limit(100, 10, &space(1_000_000, 2_000_000), 50), 100);
        // 5% of 2,000 inodes kept (100): 300 free leave 200, one per object, beside our 10.
        assert_eq!(object_limit(1000, 10, &space(300, 2000), 50), 210);
        // None to spare: what is held, no more.
        assert_eq!(object_limit(1000, 10, &space(50, 2000), 50), 10);
        // A filesystem without a fixed number of inodes.
        assert_eq!(object_limit(1000, 10, &space(0, 0), 50), 1000);
    }

    #[test]
    fn the_layout_is_charged_for_the_directories_its_objects_can_make() {
        // Two objects can make two fan-out directories, beside the five fixed entries.
        assert_eq!(layout_overhead(4096, 2, 2), (7 + 2) * 4096 + 2 * 256);
        // Never more than the 256 fan-out directories there are.
        assert_eq!(layout_overhead(4096, 100_000, 100_000), 263 * 4096 + 100_000 * 256);
        // Names only for the files (large objects) when small ones are packed into segments;
        // the directories for every object the bound lets be made over time.
        assert_eq!(layout_overhead(4096, 100_000, 64), 263 * 4096 + 64 * 256);
    }

    /// A filesystem whose free space the test sets.
    struct FakeDisk(Mutex<Space>);

    impl FakeDisk {
        fn new(free: u64, total: u64) -> Arc<FakeDisk> {
            Arc::new(FakeDisk(Mutex::new(Space {
                free,
                total,
                free_files: 0,
                total_files: 0,
            })))
        }

        fn set_free(&self, free: u64) {
            self.0.lock().unwrap().free = free;
        }
    }

    impl SpaceSource for FakeDisk {
        fn space(&self) -> Option<Space> {
            Some(*self.0.lock().unwrap())
        }
    }

    /// Removes nothing from any disk: records the victims, and reports them removed when the
    /// test says so.
    #[derive(Default)]
    struct FakeEvictor {
        evicted: Mutex<Vec<KeyHash>>,
        removed: Mutex<Vec<KeyHash>>,
        go: Notify,
    }

    impl Evictor for FakeEvictor {
        fn evicted(&self, victims: &[Removed]) {
            self.evicted.lock().unwrap().extend(victims.iter().map(|r| r.key));
        }

        async fn remove_files(&self, victims: Vec<Removed>) {
            self.go.notified().await;
            self.removed.lock().unwrap().extend(victims.iter().map(|r| r.key));
        }
    }

    fn limits(max_size: u64, max_objects: u64) -> Limits {
        Limits {
            max_size,
            max_objects,
            min_free: MinFree::Bytes(0),
            high_watermark: 0.95,
            low_watermark: 0.9,
            admission: true,
            order: Order::Segmented,
            coalesce_timeout: Duration::from_secs(30),
            tag_memory: u64::MAX,
        }
    }

    fn budget(max_size: u64, max_objects: u64) -> Arc<Budget> {
        let b = Arc::new(Budget::new(limits(max_size, max_objects)));
        b.set_accounted();
        b
    }

    fn kh(i: u32) -> KeyHash {
        KeyHash::of(&i.to_be_bytes())
    }

    /// Stores an object of `len` bytes (as charged: unit 1, no tail).
    fn store(b: &Budget, i: u32, len: u64) {
        b.lock_index().insert(kh(i), crate::cache::testing::entry(i, len), 0);
    }

    #[tokio::test]
    async fn a_dropped_reservation_gives_back_what_it_held() {
        let b = budget(1000, 10);
        let evictor = Arc::new(FakeEvictor::default());
        let r = b.reserve_room(400, 1, &evictor).await.expect("fits");
        assert_eq!(r.bytes, 400);
        assert_eq!(b.stats().2, 400);
        assert_eq!(b.lock_index().objects(), 1);
        drop(r);
        assert_eq!(b.stats().2, 0);
        assert_eq!(b.lock_index().objects(), 0);
        // Handed over, the objects are released at once and the bytes left for the index step
        // to convert.
        let r = b.reserve_room(300, 1, &evictor).await.expect("fits");
        let bytes = {
            let mut ix = b.lock_index();
            let bytes = r.hand_over(&mut ix);
            ix.release(bytes);
            bytes
        };
        assert_eq!(bytes, 300);
        assert_eq!((b.stats().2, b.lock_index().objects()), (0, 0));
    }

    #[tokio::test]
    async fn a_full_cache_admits_a_new_object_only_if_asked_for_as_often_as_its_victim() {
        let b = budget(1000, 100);
        let evictor = Arc::new(FakeEvictor::default());
        // Below the low watermark (900 of 1000) every new object is admitted, asked for or not.
        for i in 0..8 {
            let r = b.reserve_new(100, &kh(i), &evictor).await.expect("room");
            drop(r);
            store(&b, i, 100);
        }
        // 800 used: the next victim is object 0. Asked for three times, it outweighs a key
        // asked for once.
        for _ in 0..3 {
            b.note_request(&kh(0));
        }
        b.note_request(&kh(50));
        assert_eq!(b.reserve_new(150, &kh(50), &evictor).await.err(), Some("admission"));
        assert!(
            evictor.evicted.lock().unwrap().is_empty(),
            "a declined object evicts nothing"
        );
        assert_eq!(b.stats().2, 0, "and reserves nothing");
        // Another object's victim asked for as often: admitted (ties turn the cache over).
        for _ in 0..3 {
            b.note_request(&kh(51));
        }
        let r = b.reserve_new(50, &kh(51), &evictor).await.expect("admitted");
        drop(r);
        // Room below the low watermark is never declined, however rare the key.
        assert!(b.reserve_new(50, &kh(52), &evictor).await.is_ok());
        // Reservations that are not new objects (a refresh, a variant, more of a tee) are not
        // subject to admission.
        assert!(b.reserve_room(150, 0, &evictor).await.is_ok());
    }

    #[test]
    fn the_limits_are_recomputed_at_most_once_a_second() {
        let b = budget(1000, 10);
        let disk = FakeDisk::new(800, 10_000);
        b.set_disk(disk.clone());
        let t0 = Instant::now();
        assert_eq!(b.limits_at(t0).0, 800);
        disk.set_free(500);
        assert_eq!(b.limits_at(t0 + Duration::from_millis(999)).0, 800);
        assert_eq!(b.limits_at(t0 + Duration::from_secs(1)).0, 500);
    }

    #[test]
    fn min_free_lowers_the_budget() {
        let mut l = limits(1000, 10);
        l.min_free = MinFree::Bytes(200);
        let b = Budget::new(l);
        // No disk to ask: the configured budget.
        assert_eq!(b.budget(), 1000);
        let b = Budget::new(l);
        b.set_disk(FakeDisk::new(600, 10_000));
        // 600 free, 200 kept: 400 for the cache.
        assert_eq!(b.budget(), 400);
        // What the cache holds counts as its own.
        let b = Budget::new(l);
        store(&b, 1, 300);
        b.set_disk(FakeDisk::new(600, 10_000));
        assert_eq!(b.budget(), 700);
        // Never past max_size.
        let b = Budget::new(l);
        b.set_disk(FakeDisk::new(5_000, 10_000));
        assert_eq!(b.budget(), 1000);
    }

    #[tokio::test]
    async fn a_reservation_that_needs_room_is_granted_once_its_victims_are_removed() {
        let b = budget(1000, 10);
        for i in 0..4 {
            store(&b, i, 200);
        }
        let evictor = Arc::new(FakeEvictor::default());
        let task = {
            let (b, evictor) = (b.clone(), evictor.clone());
            tokio::spawn(async move { b.reserve_room(500, 1, &evictor).await })
        };
        // 800 used, 500 wanted of 1000: the two least recently used go.
        let picked = async {
            loop {
                if evictor.evicted.lock().unwrap().len() == 2 {
                    break;
                }
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(1), picked)
            .await
            .expect("victims picked");
        assert_eq!(*evictor.evicted.lock().unwrap(), vec![kh(0), kh(1)]);
        assert!(!task.is_finished());
        // Not granted yet: only what fits beside the victims' files is reserved.
        assert_eq!(b.stats().2, 200);
        assert!(b.lock_index().usage() <= 1000);
        evictor.go.notify_one();
        let r = task.await.expect("task").expect("granted");
        assert_eq!(r.bytes, 500);
        assert_eq!(*evictor.removed.lock().unwrap(), vec![kh(0), kh(1)]);
        assert_eq!(b.stats(), (2, 400, 500));
    }

    /// On a paused clock (it jumps to the next timer when every task waits): the refusal
    /// comes after exactly the time allowed, of virtual time.
    #[tokio::test(start_paused = true)]
    async fn a_reservation_whose_room_is_not_made_in_time_is_refused_and_given_back() {
        for (coalesce_timeout, allowed) in [
            (Duration::from_secs(30), ROOM_WAIT),
            // Waiters wait this long on a fill: it waits for its room no longer.
            (Duration::from_millis(300), Duration::from_millis(300)),
        ] {
            let mut l = limits(1000, 10);
            l.coalesce_timeout = coalesce_timeout;
            let b = Arc::new(Budget::new(l));
            b.set_accounted();
            store(&b, 0, 800);
            let evictor = Arc::new(FakeEvictor::default());
            let started = tokio::time::Instant::now();
            assert_eq!(b.reserve_room(500, 1, &evictor).await.err(), Some("room"));
            let waited = started.elapsed();
            assert!(
                waited >= allowed && waited < allowed + Duration::from_millis(100),
                "{waited:?}"
            );
            // The removal goes on; once it ends, what it granted is given back. (Yields, not
            // a timeout: a paused clock does not move while a task is ready to run.)
            evictor.go.notify_one();
            let mut yields = 0;
            while b.stats().2 != 0 || b.lock_index().objects() != 0 {
                assert!(yields < 10_000, "never given back");
                yields += 1;
                tokio::task::yield_now().await;
            }
        }
    }

    #[tokio::test]
    async fn refusals_name_their_reason() {
        let evictor = Arc::new(FakeEvictor::default());
        // Before the files found at startup are counted.
        let b = Arc::new(Budget::new(limits(1000, 10)));
        assert_eq!(b.reserve_room(1, 1, &evictor).await.err(), Some("room"));
        // More than the budget itself.
        let b = budget(1000, 10);
        assert_eq!(b.reserve_room(1001, 1, &evictor).await.err(), Some("budget"));
        // More objects than the bound.
        let b = budget(1000, 0);
        assert_eq!(b.reserve_room(1, 1, &evictor).await.err(), Some("objects"));
        // The room is held by a fill in progress: nothing to evict for it.
        let b = budget(1000, 10);
        let _held = b.reserve_room(900, 1, &evictor).await.expect("fits");
        assert_eq!(b.reserve_room(200, 1, &evictor).await.err(), Some("room"));
        assert!(evictor.evicted.lock().unwrap().is_empty());
    }

    /// On a paused clock: "not woken" is checked over a whole minute of virtual time.
    #[tokio::test(start_paused = true)]
    async fn passing_the_high_watermark_wakes_the_evictor() {
        let b = budget(1000, 100);
        let evictor = Arc::new(FakeEvictor::default());
        let _under = b.reserve_room(900, 1, &evictor).await.expect("fits");
        let woken = tokio::time::timeout(Duration::from_secs(60), b.evict_wakeup().notified()).await;
        assert!(woken.is_err(), "woken under the watermark");
        // Usage is read after the reservation: 990 of 1000 is past 95%.
        let _over = b.reserve_room(90, 1, &evictor).await.expect("fits");
        tokio::time::timeout(Duration::from_secs(1), b.evict_wakeup().notified())
            .await
            .expect("woken over the watermark");
    }
}
