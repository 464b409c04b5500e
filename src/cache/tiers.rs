//! The memory tiers in front of the disk: the hot tier (small bodies, copied into memory), the
//! open tier (bodies of `OPEN_MIN` bytes and more, kept open and mapped), the doorkeeper of
//! each, the open tier's relief when descriptors run short, and the records cached beside the
//! index so a disk hit need not read its record.
//!
//! Owns what it holds in memory and nothing on disk: it never reads or writes a file (the
//! facade hands it objects it has read), never takes the index, and forgets a key when told
//! (the facade tells it when the index lets go of one).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::{info, warn};

use crate::cache::Hit;
use crate::cache::admit;
use crate::cache::key::KeyHash;
use crate::cache::meta::Meta;
use crate::cache::{MIN_MMAP, Settings};
use crate::metrics as m;
use crate::negotiate::Coding;

/// Bodies from this size go to the open tier (kept open and mapped) instead of the hot tier:
/// the size from which connections send mapped slices with `sendfile`.
pub(super) const OPEN_MIN: u64 = 16 << 10;
/// Most bodies the open tier holds by default, however high the descriptor limit.
const OPEN_FILES_MAX: usize = 16384;
/// After running short of descriptors the open tier keeps to half its size this long, then
/// grows back by a quarter of its full size per such period without a shortage...
const SHORTAGE_HOLD: Duration = Duration::from_secs(300);
/// ...and halves again at most this often (one shortage fails many calls at once).
const SHORTAGE_STEP: Duration = Duration::from_secs(1);
/// A tier is full for admission ([`Tier::admits`]) within this fraction (1/n) of its capacity.
const FULL_MARGIN: u64 = 16;
/// Memory for records cached beside the index, so a disk hit need not read its record.
const METAS_MEMORY: u64 = 16 << 20;

/// A tier's objects by key. Not moka: a hit on a tier is the most frequent operation of a busy
/// cache, and moka's `get` logs every read for its policy and applies the log on the reader's
/// thread (9.5% of a disk-hit load's CPU, and its inserts cost more when a tier turns over;
/// profiled and measured in `BENCHMARKS.md`), where quick_cache's takes a shard's read lock
/// and marks the entry (S3-FIFO-like: the mark decides eviction, no list is reordered on a
/// hit). The records beside the index are held the same way, for the same reason: every disk
/// hit reads one.
type Objects = quick_cache::sync::Cache<KeyHash, Arc<HotObject>, Weight>;

/// What an object weighs in its tier: its bytes in memory (the hot tier), or one descriptor
/// (the open tier).
#[derive(Clone, Copy)]
pub(super) struct Weight {
    per_object: bool,
}

impl quick_cache::Weighter<KeyHash, Arc<HotObject>> for Weight {
    fn weight(&self, _: &KeyHash, v: &Arc<HotObject>) -> u64 {
        if self.per_object {
            1
        } else {
            v.body.len() as u64 + u64::from(meta_weight(&v.meta))
        }
    }
}

/// A tier of `capacity` (in [`Weight`]'s unit) for about `estimated` objects, in shards of at
/// least `shard_min` each (each shard holds its share of the capacity, so a shard must hold
/// several of the largest objects), at most 16.
fn objects(capacity: u64, estimated: u64, shard_min: u64, weight: Weight) -> Objects {
    let fit = (capacity / shard_min.max(1)).clamp(1, 16);
    let shards = 1usize << (63 - fit.leading_zeros());
    let options = quick_cache::OptionsBuilder::new()
        .estimated_items_capacity(estimated.max(1) as usize)
        .weight_capacity(capacity)
        .shards(shards)
        .build()
        .expect("valid tier options");
    Objects::with_options(options, weight, Default::default(), Default::default())
}

/// Records cached beside the index, by key, with their version.
type Metas = quick_cache::sync::Cache<KeyHash, (u64, Arc<Meta>), MetaWeight>;

/// What a cached record weighs: about what it takes in memory ([`meta_weight`]).
#[derive(Clone, Copy)]
pub(super) struct MetaWeight;

impl quick_cache::Weighter<KeyHash, (u64, Arc<Meta>)> for MetaWeight {
    fn weight(&self, _: &KeyHash, (_, meta): &(u64, Arc<Meta>)) -> u64 {
        u64::from(meta_weight(meta))
    }
}

/// The open tier's state after running short of descriptors.
#[derive(Clone, Copy)]
struct Shortage {
    /// How many bodies it may hold for now.
    room: usize,
    /// When it last gave descriptors back.
    relieved: Instant,
    /// When `room` last changed.
    changed: Instant,
}

/// About what a cached record takes in memory: each header is held twice (as stored, and in
/// the prepared head of an answer), at roughly 220 bytes of map entry besides its value.
fn meta_weight(meta: &Meta) -> u32 {
    let headers: usize = meta
        .headers
        .iter()
        .map(|(name, value)| 220 + name.as_str().len() + value.len())
        .sum();
    (512 + meta.key.as_str().len() + headers).min(u32::MAX as usize) as u32
}

/// What a compressed variant's body is held under in the tiers: a hash of the key's and the
/// coding (never a key's own hash).
pub(super) fn variant_key(hash: &KeyHash, coding: Coding) -> KeyHash {
    let mut bytes = [0u8; 17];
    bytes[..16].copy_from_slice(&hash.0);
    bytes[16] = coding.id();
    KeyHash::of(&bytes)
}

/// A hot-tier or open-tier object: the metadata and the whole body, in memory or mapped.
pub struct HotObject {
    pub(super) meta: Arc<Meta>,
    /// Its key's hash as the frequency sketch counts it (the object's, for a variant's body).
    pub(super) hash: KeyHash,
    /// The version of the key it is (its object file's generation).
    pub(super) generation: u64,
    /// For a compressed variant's body: the variant file's version (0: the identity body).
    pub(super) variant: u64,
    /// The variant's coding.
    pub(super) coding: Option<Coding>,
    pub(super) body: Bytes,
    /// For a mapped body: its file's modification time when the body was checked, and how
    /// to tell it changed since.
    pub(super) mapped: Option<(u64, crate::zerocopy::Watch)>,
}

impl HotObject {
    /// True while the body is still what was checked: a copy always is; a mapped one while
    /// its file has not been truncated, rewritten or removed underneath (one `fstat`, no path
    /// walk).
    pub(super) fn still_valid(&self) -> bool {
        self.mapped
            .as_ref()
            .is_none_or(|(mtime, watch)| watch.unchanged(*mtime))
    }
}

/// The hot or the open tier, with what admits to it.
pub(super) struct Tier<'a> {
    pub(super) objects: &'a Objects,
    pub(super) doorkeeper: &'a admit::Doorkeeper,
    /// What the tier let go of lately, for admission once it is full.
    pub(super) victims: &'a admit::Victims,
    /// What one admission counts in the doorkeeper's window: bytes (hot) or objects (open).
    pub(super) weight: u64,
    /// Bodies from this size are held mapped, smaller ones as copies.
    pub(super) map_from: u64,
    /// The open tier: it holds its objects' records, and keeps to a reduced size after a
    /// shortage of descriptors.
    pub(super) open: bool,
}

impl Tier<'_> {
    /// The body held under `tier_key`, if it is version `generation` (and, unless `variant` is
    /// 0, that variant's) of `key` and still what was checked. Anything else held there (a
    /// version that raced a replacement in, or a mapping whose file changed underneath) is
    /// dropped: the disk path checks the file again.
    ///
    /// The key itself is not compared: the index matched the full key to `generation`, and a
    /// generation is given out once ([`crate::cache::store::Store::next_gen`]), so an object
    /// held at that generation is that key's (comparing would read the key's string, a cache
    /// miss on every hit).
    pub(super) fn get(&self, tier_key: &KeyHash, generation: u64, variant: u64) -> Option<Hit> {
        let obj = self.objects.get(tier_key)?;
        if obj.generation == generation && obj.variant == variant && obj.still_valid() {
            return Some(Hit {
                meta: obj.meta.clone(),
                body: obj.body.clone(),
                coding: (variant != 0).then_some(obj.coding).flatten(),
                soft_purged: None,
            });
        }
        self.objects.remove(tier_key);
        None
    }

    /// Whether the tier takes a body held under `tier_key` after this disk hit on it: on the
    /// doorkeeper's second sighting ([`admit::Doorkeeper`]), and once the tier is full only
    /// if its key (`hash`, as the sketch counts it: `estimate`) is asked for more often than
    /// what the tier let go of lately ([`admit::Victims`]).
    ///
    /// Full is within [`FULL_MARGIN`] of its capacity: each shard evicts to fit its own share,
    /// so a full tier's weight stays short of its capacity by up to an object per shard.
    pub(super) fn admits(&self, tier_key: &KeyHash, hash: &KeyHash, estimate: impl Fn(&KeyHash) -> u8) -> bool {
        let full = || {
            let capacity = self.objects.capacity();
            self.objects.weight().saturating_add(self.weight) > capacity - capacity / FULL_MARGIN
        };
        self.doorkeeper.admit(tier_key, self.weight) && self.victims.admits(estimate(hash), full, &estimate)
    }

    /// Holds a hit's body under `tier_key`: version `generation` of its key (`hash`, as the
    /// frequency sketch counts it) and `variant` (0: the identity body), mapped when it is
    /// `min_mmap` bytes or more (its file's modification time then `mtime`). What the tier lets
    /// go of to take it is remembered for its admission from then on.
    pub(super) fn offer(
        &self,
        (hash, tier_key): (KeyHash, KeyHash),
        hit: &Hit,
        (generation, variant): (u64, u64),
        min_mmap: u64,
        mtime: u64,
    ) {
        let len = hit.body.len() as u64;
        // (quick_cache's default lifecycle hands back up to two of the objects an insert
        // evicts, dropped with it once the shard's lock is released.)
        let mut evicted: [Option<(KeyHash, Arc<HotObject>)>; 2] = Default::default();
        self.objects.insert_with_lifecycle(
            tier_key,
            Arc::new(HotObject {
                meta: hit.meta.clone(),
                hash,
                generation,
                variant,
                coding: hit.coding,
                body: hit.body.clone(),
                // `map_body` maps exactly the non-empty bodies of `min_mmap` bytes and more.
                mapped: (len > 0 && len >= min_mmap).then(|| (mtime, crate::zerocopy::watch(&hit.body))),
            }),
            &mut evicted,
        );
        for (_, object) in evicted.iter().flatten() {
            self.victims.note(object.hash);
        }
    }

    /// Whether version `generation` of a key is held under `tier_key` (for `inspect`: not a
    /// hit, so not marked).
    pub(super) fn holds(&self, tier_key: &KeyHash, generation: u64) -> bool {
        self.objects.peek(tier_key).is_some_and(|o| o.generation == generation)
    }

    /// Lets go of what is held under `tier_key`.
    pub(super) fn forget(&self, tier_key: &KeyHash) {
        self.objects.remove(tier_key);
    }
}

/// Drops `closing` (unmapping and closing thousands of files takes a while) on a thread of
/// its own, not an event loop nor the blocking pool, where fills may queue ahead of it; then
/// lets go of `turn`. The receiver learns when that is done.
fn close_in_background(
    closing: Vec<Arc<HotObject>>,
    turn: tokio::sync::OwnedMutexGuard<()>,
) -> tokio::sync::oneshot::Receiver<()> {
    let (done, closed) = tokio::sync::oneshot::channel();
    // When no thread can be had, the closure is dropped unrun: the files are closed here.
    let _ = std::thread::Builder::new()
        .name("sidecache-relief".into())
        .spawn(move || {
            drop(closing);
            drop(turn);
            let _ = done.send(());
        });
    closed
}

/// How many bodies the open tier holds: as configured, else at most [`OPEN_FILES_MAX`]; in
/// either case no more than the descriptor limit leaves after connections (the client's
/// socket, which each holds while open) and some spare, nor more than half the process's
/// allowed memory mappings (one each).
///
/// A busy connection also holds, for a while, one to the app and a file being read or
/// written: these come out of the spare, and when they exhaust it the open tier gives half
/// its descriptors back ([`Tiers::relieve_descriptors`]) rather than sit on room reserved for
/// a worst case that rarely comes.
fn open_files(config: &Settings) -> usize {
    let spare = config.max_connections as u64 + 256;
    let room = crate::limits::descriptor_limit()
        .saturating_sub(spare)
        .min(crate::limits::mapping_limit() / 2);
    let wanted = config.open_files.map_or(OPEN_FILES_MAX as u64, |n| n as u64);
    if wanted > room && config.open_files.is_some() {
        warn!(
            open_files = wanted,
            allowed = room,
            "open_files lowered to what the descriptor and mapping limits allow"
        );
    } else if room == 0 && wanted > 0 {
        // Fewer descriptors than connections.
        warn!(
            descriptor_limit = crate::limits::descriptor_limit(),
            max_connections = config.max_connections,
            "open tier off: the descriptor limit leaves no room after max_connections; \
             lower max_connections or raise the limit to keep large bodies open"
        );
    }
    wanted.min(room) as usize
}

/// The memory tiers and the records cached beside the index.
///
/// Locks, in the order they may be taken (each only while holding those before it):
/// `relieving` (a tokio mutex, held for a whole relief, across the wait for its files to be
/// closed) -> `open_shortage` (a std mutex, held for a few comparisons, never across an
/// `.await`) -> the tiers' and the records' shard locks (leaves: `has_room` reads
/// the open tier's size while holding `open_shortage`). Nothing here takes a lock of the
/// facade's. What a tier lets go of (evicted, removed) is dropped on the calling thread
/// once the shard's lock is released: a mapped body's file is closed then.
pub(super) struct Tiers {
    /// Largest body the hot tier holds.
    memory_object_max: u64,
    hot: Option<Objects>,
    /// Decides which disk hits go into the hot tier...
    doorkeeper: admit::Doorkeeper,
    /// ...with what it let go of lately.
    victims: admit::Victims,
    /// The open tier: bodies of [`OPEN_MIN`] bytes and more, kept open and mapped. A hit on one
    /// makes no `open`, `read` or `close`, and its body goes out with `sendfile`.
    open: Option<Objects>,
    /// Decides which disk hits go into the open tier...
    open_doorkeeper: admit::Doorkeeper,
    /// ...with what it let go of lately.
    open_victims: admit::Victims,
    /// The open tier's reduced size after descriptors ran short (`None`: its full size).
    open_shortage: Mutex<Option<Shortage>>,
    /// Held for the whole of a relief, until its files are closed.
    relieving: Arc<tokio::sync::Mutex<()>>,
    /// Records of stored objects, by key, with their version: one is used only while the
    /// index holds that version.
    metas: Metas,
}

impl Tiers {
    /// The tiers `config` asks for, the open tier sized by the descriptor limit.
    pub(super) fn from_settings(config: &Settings) -> Tiers {
        let open_files = open_files(config);
        if open_files > 0 {
            info!(open_files, "open tier sized");
        }
        Tiers::new(config.memory_size, config.memory_object_max, open_files)
    }

    /// A hot tier of `memory_size` bytes holding bodies up to `memory_object_max` bytes, and an
    /// open tier of `open_files` bodies (either off at 0).
    pub(super) fn new(memory_size: u64, memory_object_max: u64, open_files: usize) -> Tiers {
        let hot = (memory_size > 0).then(|| {
            // (An average body of 16 KiB, for the estimate; four of the largest per shard.)
            let estimated = memory_size / (16 << 10);
            objects(
                memory_size,
                estimated,
                4 * memory_object_max,
                Weight { per_object: false },
            )
        });
        // (About 2 KiB a record, for the estimate.)
        let options = quick_cache::OptionsBuilder::new()
            .estimated_items_capacity((METAS_MEMORY / 2048) as usize)
            .weight_capacity(METAS_MEMORY)
            .build()
            .expect("valid record cache options");
        let metas = Metas::with_options(options, MetaWeight, Default::default(), Default::default());
        let open = (open_files > 0).then(|| {
            let files = open_files as u64;
            objects(files, files, 64, Weight { per_object: true })
        });
        Tiers {
            memory_object_max,
            hot,
            doorkeeper: admit::Doorkeeper::new(memory_size),
            victims: admit::Victims::default(),
            open,
            // Its window counts objects, not bytes: each takes one descriptor whatever its size.
            open_doorkeeper: admit::Doorkeeper::new(open_files as u64),
            open_victims: admit::Victims::default(),
            open_shortage: Mutex::new(None),
            relieving: Arc::new(tokio::sync::Mutex::new(())),
            metas,
        }
    }

    /// The one tier a body of `len` bytes can be held in, if any.
    pub(super) fn tier_for(&self, len: u64) -> Option<Tier<'_>> {
        match (&self.open, &self.hot) {
            (Some(open), _) if len >= OPEN_MIN => Some(Tier {
                objects: open,
                doorkeeper: &self.open_doorkeeper,
                victims: &self.open_victims,
                weight: 1,
                map_from: OPEN_MIN,
                open: true,
            }),
            (_, Some(hot)) if len <= self.memory_object_max => Some(Tier {
                objects: hot,
                doorkeeper: &self.doorkeeper,
                victims: &self.victims,
                weight: len,
                map_from: MIN_MMAP,
                open: false,
            }),
            _ => None,
        }
    }

    /// Whether a tier may take one more object now: always, unless it is the open tier
    /// keeping to a reduced size after a shortage of descriptors.
    pub(super) fn has_room(&self, tier: &Tier<'_>) -> bool {
        self.has_room_at(tier, Instant::now())
    }

    /// [`Tiers::has_room`] as of `now`.
    fn has_room_at(&self, tier: &Tier<'_>, now: Instant) -> bool {
        if !tier.open {
            return true;
        }
        let mut shortage = self.lock_shortage();
        let Some(mut s) = *shortage else { return true };
        // (`changed` is set with every relief, so it is the later of the two.)
        if now.saturating_duration_since(s.changed) >= SHORTAGE_HOLD {
            // A hold without a shortage: a quarter of the full size back, up to all of it.
            let full = tier.objects.capacity() as usize;
            s.room = s.room.saturating_add(full.div_ceil(4));
            s.changed = now;
            *shortage = (s.room < full).then_some(s);
        }
        shortage.is_none_or(|s| tier.objects.len() < s.room)
    }

    fn lock_shortage(&self) -> std::sync::MutexGuard<'_, Option<Shortage>> {
        // Every update leaves a whole value: poisoning is ignored.
        self.open_shortage.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The process ran out of descriptors (or of memory mappings): the open tier closes half
    /// the files it holds, and keeps to that size for [`SHORTAGE_HOLD`], so that connections,
    /// the app and fills get them. Which half is left to the tier's iteration order: this is
    /// relief, not eviction. A body still being sent keeps its file open until it is sent.
    pub(super) fn relieve_descriptors(&self) {
        // A relief under way covers this shortage.
        let Ok(turn) = self.relieving.clone().try_lock_owned() else {
            return;
        };
        if let Some(closing) = self.give_back(Instant::now()) {
            drop(close_in_background(closing, turn));
        }
    }

    /// [`Tiers::relieve_descriptors`], returning once the files are closed. A caller that
    /// comes while a relief is under way waits for its files to be closed: what it then
    /// retries finds the descriptors given back.
    pub(super) async fn relieve_descriptors_now(&self) {
        let turn = self.relieving.clone().lock_owned().await;
        if let Some(closing) = self.give_back(Instant::now()) {
            let _ = close_in_background(closing, turn).await;
        }
    }

    /// Halves the open tier (see [`Tiers::relieve_descriptors`]) unless that was done less
    /// than [`SHORTAGE_STEP`] before `now`; returns the bodies taken out, whose last
    /// references they hold but for bodies still being sent.
    fn give_back(&self, now: Instant) -> Option<Vec<Arc<HotObject>>> {
        let open = self.open.as_ref()?;
        {
            let mut shortage = self.lock_shortage();
            if shortage.is_some_and(|s| now.saturating_duration_since(s.relieved) < SHORTAGE_STEP) {
                return None;
            }
            // Claimed: calls for the same shortage return at once from here on.
            let room = shortage.map_or(usize::MAX, |s| s.room);
            *shortage = Some(Shortage {
                room,
                relieved: now,
                changed: now,
            });
        }
        let held = open.len();
        if let Some(s) = self.lock_shortage().as_mut() {
            s.room = s.room.min(held / 2);
        }
        let hashes: Vec<KeyHash> = open.iter().take(held - held / 2).map(|(k, _)| k).collect();
        let closing: Vec<Arc<HotObject>> = hashes.iter().filter_map(|h| open.remove(h).map(|(_, o)| o)).collect();
        metrics::counter!(m::DESCRIPTOR_SHORTAGES).increment(1);
        warn!(
            held,
            closed = closing.len(),
            "out of descriptors: the open tier closed half its files"
        );
        Some(closing)
    }

    /// Version `generation` of a key's record, if it is cached.
    pub(super) fn meta(&self, hash: &KeyHash, generation: u64) -> Option<Arc<Meta>> {
        self.metas
            .get(hash)
            .filter(|(held, _)| *held == generation)
            .map(|(_, m)| m)
    }

    /// Caches version `generation` of a key's record beside the index, unless its body is going
    /// into the open tier (`held_open`): that keeps the record with the open file, and caching
    /// it here too would crowd out the records of bodies that stay on disk, which every hit on
    /// them needs.
    pub(super) fn remember_meta(&self, hash: KeyHash, generation: u64, meta: &Arc<Meta>, held_open: bool) {
        if held_open {
            self.metas.remove(&hash);
        } else {
            self.metas.insert(hash, (generation, meta.clone()));
        }
    }

    /// Whether a body of `len` bytes will likely be held by the open tier once it is hit: its
    /// record need not be cached when it is stored.
    pub(super) fn open_tier_size(&self, len: u64) -> bool {
        self.open.is_some() && len >= OPEN_MIN
    }

    /// Forgets a key: its object in either tier and its cached record.
    pub(super) fn forget(&self, hash: &KeyHash) {
        self.forget_tiers(hash);
        self.metas.remove(hash);
    }

    /// Forgets a key's object in either tier, its compressed variants' bodies too (its cached
    /// record stays).
    pub(super) fn forget_tiers(&self, hash: &KeyHash) {
        for tier in [&self.hot, &self.open].into_iter().flatten() {
            tier.remove(hash);
            for coding in Coding::ALL {
                tier.remove(&variant_key(hash, coding));
            }
        }
    }

    /// Updates the tiers' gauges.
    pub(super) fn publish_gauges(&self) {
        if let Some(hot) = &self.hot {
            metrics::gauge!(m::HOT_SIZE).set(hot.weight() as f64);
        }
        if let Some(open) = &self.open {
            metrics::gauge!(m::OPEN_FILES).set(open.len() as f64);
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    fn hash(i: usize) -> KeyHash {
        KeyHash::of(format!("http://h/{i}").as_bytes())
    }

    fn meta(i: usize) -> Arc<Meta> {
        Arc::new(crate::cache::testing::meta(&format!("http://h/{i}"), b""))
    }

    fn object(i: usize) -> Arc<HotObject> {
        Arc::new(HotObject {
            meta: meta(i),
            hash: hash(i),
            generation: 1,
            variant: 0,
            coding: None,
            body: Bytes::new(),
            mapped: None,
        })
    }

    /// Tiers with an open tier of `open_files`, holding `held` objects.
    fn filled(open_files: usize, held: usize) -> Tiers {
        let tiers = Tiers::new(1 << 20, 256 << 10, open_files);
        let open = tiers.open.as_ref().expect("an open tier");
        for i in 0..held {
            open.insert(hash(i), object(i));
        }
        tiers
    }

    fn held_open(tiers: &Tiers) -> usize {
        tiers.open.as_ref().expect("an open tier").len()
    }

    fn open_tier(tiers: &Tiers) -> Tier<'_> {
        tiers.tier_for(OPEN_MIN).expect("the open tier")
    }

    #[test]
    fn a_body_goes_to_the_tier_its_size_and_the_config_pick() {
        let tiers = Tiers::new(1 << 20, 256 << 10, 100);
        let small = tiers.tier_for(1024).expect("hot");
        assert!(!small.open);
        assert_eq!((small.weight, small.map_from), (1024, MIN_MMAP));
        let large = tiers.tier_for(OPEN_MIN).expect("open");
        assert!(large.open);
        assert_eq!((large.weight, large.map_from), (1, OPEN_MIN));
        assert!(tiers.tier_for(10 << 20).expect("open, whatever its size").open);
        assert!(tiers.open_tier_size(OPEN_MIN) && !tiers.open_tier_size(OPEN_MIN - 1));

        // Without an open tier, large bodies up to memory_object_max go to the hot tier...
        let no_open = Tiers::new(1 << 20, 256 << 10, 0);
        assert!(!no_open.tier_for(OPEN_MIN).expect("hot").open);
        // ...and larger ones to none.
        assert!(no_open.tier_for((256 << 10) + 1).is_none());
        assert!(!no_open.open_tier_size(OPEN_MIN));

        // Without a hot tier, small bodies stay on disk.
        let no_hot = Tiers::new(0, 256 << 10, 100);
        assert!(no_hot.tier_for(1024).is_none());
        assert!(no_hot.tier_for(OPEN_MIN).expect("open").open);
    }

    #[test]
    fn a_relief_halves_the_open_tier_and_keeps_it_to_that_size() {
        let tiers = filled(100, 10);
        let t0 = Instant::now();
        assert!(tiers.has_room_at(&open_tier(&tiers), t0));
        let closing = tiers.give_back(t0).expect("a relief");
        assert_eq!(closing.len(), 5);
        assert_eq!(held_open(&tiers), 5);
        // Five held, room for five: no more.
        assert!(!tiers.has_room_at(&open_tier(&tiers), t0));
        // One fewer held: room for one.
        let open = tiers.open.as_ref().expect("an open tier");
        let (kept, _) = open.iter().next().expect("one held");
        open.remove(&kept);
        assert!(tiers.has_room_at(&open_tier(&tiers), t0));
        // The hot tier is never held back.
        assert!(tiers.has_room_at(&tiers.tier_for(1024).expect("hot"), t0));
    }

    #[test]
    fn the_open_tier_grows_back_a_quarter_per_hold_without_a_shortage() {
        let tiers = filled(8, 8);
        let t0 = Instant::now();
        tiers.give_back(t0).expect("a relief");
        assert_eq!(held_open(&tiers), 4);
        let room = || tiers.lock_shortage().map(|s| s.room);
        assert!(!tiers.has_room_at(&open_tier(&tiers), t0 + SHORTAGE_HOLD / 2));
        assert_eq!(room(), Some(4));
        // One hold on: a quarter of the full size (2) back.
        assert!(tiers.has_room_at(&open_tier(&tiers), t0 + SHORTAGE_HOLD));
        assert_eq!(room(), Some(6));
        // Another: the full size, and the shortage is over.
        assert!(tiers.has_room_at(&open_tier(&tiers), t0 + 2 * SHORTAGE_HOLD));
        assert_eq!(room(), None);
    }

    #[test]
    fn a_second_relief_within_a_step_does_nothing() {
        let tiers = filled(100, 16);
        let t0 = Instant::now();
        assert_eq!(tiers.give_back(t0).expect("a relief").len(), 8);
        assert!(tiers.give_back(t0 + SHORTAGE_STEP / 2).is_none());
        assert_eq!(held_open(&tiers), 8);
        // A step later, a new shortage halves it again.
        assert_eq!(tiers.give_back(t0 + SHORTAGE_STEP).expect("a relief").len(), 4);
        assert_eq!(held_open(&tiers), 4);
        assert_eq!(tiers.lock_shortage().map(|s| s.room), Some(4));
    }

    #[tokio::test]
    async fn a_relief_returns_once_its_files_are_let_go() {
        let tiers = filled(100, 10);
        let open = tiers.open.as_ref().expect("an open tier");
        let objects: Vec<_> = open.iter().map(|(_, v)| Arc::downgrade(&v)).collect();
        tiers.relieve_descriptors_now().await;
        assert_eq!(held_open(&tiers), 5);
        // The half taken out is dropped (its files closed) by the relief's thread before it
        // returns.
        let closed = objects.iter().filter(|o| o.upgrade().is_none()).count();
        assert_eq!(closed, 5, "the half given back is still held");
        // And its turn is free for the next one.
        assert!(tiers.relieving.try_lock().is_ok());
    }

    /// A hit on object `i` with a body of `len` bytes.
    fn hit(i: usize, len: usize) -> Hit {
        Hit {
            meta: meta(i),
            body: Bytes::from(vec![b'x'; len]),
            coding: None,
            soft_purged: None,
        }
    }

    #[test]
    fn a_full_tier_takes_an_object_only_if_asked_for_more_often_than_what_it_let_go_of() {
        // A hot tier of 64 KiB (one shard) and bodies of 8 KiB: it holds a few.
        let tiers = Tiers::new(64 << 10, 16 << 10, 0);
        let tier = tiers.tier_for(8 << 10).expect("hot");
        let counts = std::sync::Mutex::new(std::collections::HashMap::<KeyHash, u8>::new());
        let estimate = |h: &KeyHash| counts.lock().unwrap().get(h).copied().unwrap_or(0);
        let set = |i: usize, n: u8| counts.lock().unwrap().insert(hash(i), n);
        // Sighted up to three times (the doorkeeper admits a second sighting within its
        // window, which may start anew between two).
        let admits = |i: usize| (0..3).any(|_| tier.admits(&hash(i), &hash(i), estimate));
        // Before it let go of anything, a tier takes what the doorkeeper admits.
        set(0, 3);
        assert!(admits(0), "an empty tier refused an object");
        for i in 0..20 {
            set(i, 3);
            tier.offer((hash(i), hash(i)), &hit(i, 8 << 10), (1, 0), MIN_MMAP, 0);
        }
        let held = tiers.hot.as_ref().expect("hot").len();
        assert!(held < 20, "the tier let go of none of 20 objects ({held} held)");

        // Full: an object asked for as often as what it let go of stays on disk...
        set(100, 3);
        assert!(!admits(100), "a tie displaced a held object");
        // ...one asked for more often gets in.
        set(101, 4);
        assert!(admits(101), "a more frequent object was refused");
        // A victim no longer asked for (the sketch halved) is displaced by a tie of before.
        for i in 0..20 {
            set(i, 1);
        }
        assert!(admits(100), "a faded victim kept a more frequent object out");

        // With room (what it held is gone), a tie is taken again.
        for i in 0..20 {
            set(i, 3);
            tiers.forget(&hash(i));
        }
        assert!(admits(102), "a tier with room refused an object");
    }

    #[test]
    fn records_of_bodies_held_open_are_not_cached_beside_the_index() {
        let tiers = Tiers::new(1 << 20, 256 << 10, 100);
        tiers.remember_meta(hash(1), 7, &meta(1), false);
        assert!(tiers.meta(&hash(1), 7).is_some());
        // Another version of the key is not this one.
        assert!(tiers.meta(&hash(1), 8).is_none());
        // Held open: the open tier keeps the record; the one cached before is dropped.
        tiers.remember_meta(hash(1), 8, &meta(1), true);
        assert!(tiers.meta(&hash(1), 7).is_none() && tiers.meta(&hash(1), 8).is_none());
        tiers.remember_meta(hash(2), 1, &meta(2), false);
        tiers.forget(&hash(2));
        assert!(tiers.meta(&hash(2), 1).is_none());
    }
}
