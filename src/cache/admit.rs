//! Admission: to the hot tier, an object enters memory on its second disk hit within a window,
//! not its first (the "doorkeeper" of TinyLFU, [`Doorkeeper`]); to the disk, once the cache is
//! full, a fill is stored only if its key is asked for at least as often as the object it
//! would displace (TinyLFU's admission, [`Frequency`]).
//!
//! Without it, every disk hit inserted into the hot tier, so a working set larger than memory
//! (the usual case: memory holds megabytes, the disk gigabytes) turned each hit into an insert
//! plus an eviction of something else that was just as likely to be asked for. With it, an object
//! is admitted when it is asked for again before a hot tier's worth of bytes has been seen: one
//! that a tier of that size would have kept.
//!
//! The doorkeeper alone still lets a tier churn when the objects asked for again are more than
//! it holds (a working set over its size, asked for evenly: each is hit again long before a
//! window of first sightings passes). Once a tier is full, an object it would take must also be
//! asked for more often than one the tier let go of lately ([`Victims`]); else it stays on disk
//! and the tier keeps what it holds.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::cache::key::KeyHash;

/// Bits in the doorkeeper (8 KiB): a few false "seen before" among the objects of one window.
const BITS: usize = 1 << 16;

/// Remembers which objects had a disk hit in the current window.
pub struct Doorkeeper {
    bits: Box<[AtomicU64]>,
    /// Body bytes first seen in this window.
    seen: AtomicU64,
    /// The window: cleared after this many bytes of first-seen bodies.
    window: u64,
}

impl Doorkeeper {
    /// A doorkeeper whose window is `window` bytes of bodies (the hot tier's size).
    pub fn new(window: u64) -> Doorkeeper {
        Doorkeeper {
            bits: (0..BITS / 64).map(|_| AtomicU64::new(0)).collect(),
            seen: AtomicU64::new(0),
            window: window.max(1),
        }
    }

    /// Records a disk hit on `hash` (a body of `len` bytes); true when it is the second in the
    /// window, so the object should go into memory.
    pub fn admit(&self, hash: &KeyHash, len: u64) -> bool {
        let bit = u64::from_le_bytes(hash.0[..8].try_into().expect("8 bytes")) as usize % BITS;
        let mask = 1u64 << (bit % 64);
        if self.bits[bit / 64].fetch_or(mask, Ordering::Relaxed) & mask != 0 {
            return true;
        }
        if self.seen.fetch_add(len.max(1), Ordering::Relaxed) >= self.window {
            // A new window. Racing hits may lose or keep a bit: either only shifts one admission.
            self.seen.store(0, Ordering::Relaxed);
            for word in self.bits.iter() {
                word.store(0, Ordering::Relaxed);
            }
        }
        false
    }
}

/// Victims a tier remembers.
const VICTIMS: usize = 8;

/// The objects a full tier let go of lately, to weigh an object it would take against
/// (TinyLFU's admission). A tier's cache does not say which object it would evict next, so the
/// candidate is weighed against one it evicted lately, each in turn: the same kind of object
/// its order picks. Between objects asked for as often, the tier keeps what it holds (a tie is
/// refused): an insert and an eviction for an object no more likely to be asked for again is
/// work for nothing. A victim that is no longer asked for fades with the sketch's halving, so a
/// new favourite gets in.
///
/// One lock, a leaf: held for a few copies, never while another is taken.
pub struct Victims {
    recent: Mutex<Ring>,
}

/// The last [`VICTIMS`] victims, and which one the next candidate is weighed against.
struct Ring {
    keys: [KeyHash; VICTIMS],
    held: usize,
    /// Where the next victim is written.
    write: usize,
    /// Which held victim the next candidate is weighed against.
    read: usize,
}

impl Default for Victims {
    fn default() -> Victims {
        Victims {
            recent: Mutex::new(Ring {
                keys: [KeyHash([0; 16]); VICTIMS],
                held: 0,
                write: 0,
                read: 0,
            }),
        }
    }
}

impl Victims {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        // Every update leaves a whole ring: poisoning is ignored.
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers that the tier let go of `key` (the key as the frequency sketch counts it) to
    /// take another object.
    pub fn note(&self, key: KeyHash) {
        let mut ring = self.lock();
        let at = ring.write;
        ring.keys[at] = key;
        ring.write = (at + 1) % VICTIMS;
        ring.held = (ring.held + 1).min(VICTIMS);
    }

    /// Whether a tier takes an object asked for `candidate` times (the sketch's estimate):
    /// yes if it let go of nothing yet or is not `full` now, else only if the candidate is
    /// asked for more often than the next victim in turn now is (`estimate`).
    pub fn admits(&self, candidate: u8, full: impl FnOnce() -> bool, estimate: impl FnOnce(&KeyHash) -> u8) -> bool {
        let victim = {
            let mut ring = self.lock();
            if ring.held == 0 {
                return true;
            }
            let at = ring.read % ring.held;
            ring.read = (at + 1) % ring.held;
            ring.keys[at]
        };
        !full() || candidate > estimate(&victim)
    }
}

/// Counters per word of the sketch (4 bits each).
const PER_WORD: u64 = 16;
/// A counter's largest value.
const MAX_COUNT: u64 = 15;
/// Counters per key (one per row of the count-min sketch).
const ROWS: usize = 4;
/// Words per block: a key's counters all lie in one block, one cache line.
const BLOCK_WORDS: usize = 8;
/// The smallest sketch, in words.
const MIN_WORDS: u64 = 4096;
/// Requests counted between halvings, per word (per object the cache can hold). Caffeine
/// halves every 10; over a store whose objects differ in size, a longer memory ranks them
/// better: `lru_sim.py` (4 KiB slots) gives churn 87.3% at 10, 87.9% at 20, 88.1% at 40 and
/// 80, and its CDN shape (popularity that renews itself) 54.3%, 54.6% and 54.6% at 10, 20, 40.
const SAMPLE_PER_WORD: u64 = 40;

/// Shards of [`Frequency`]'s count of requests since the last halving.
const ADDED_SHARDS: usize = 8;

/// A count on a cache line of its own.
#[repr(align(64))]
#[derive(Default)]
struct Shard(AtomicU64);

/// A block of the sketch: 8 words of 16 counters, on one cache line.
#[repr(align(64))]
struct Block([AtomicU64; BLOCK_WORDS]);

/// How often each key was asked for recently: a count-min sketch of 4-bit counters (as
/// Caffeine's `FrequencySketch`), halved every [`SAMPLE_PER_WORD`] requests per object the
/// cache can hold, so that what was popular long ago fades. About a word per object held: 2 MiB
/// for the default object bound. Lock-free: a request counts its key with a few atomic adds,
/// concurrent ones may lose a count (an estimate off by one is as good). A key's four counters
/// lie in one block of 64 bytes (as Caffeine's, since 3.0), each row in a word of its own:
/// counting a request touches one cache line, not four (every request counts its key).
///
/// What it decides, by the index's eviction order (`budget::Budget::reserve_room`): a fill
/// that finds the cache full (its usage past the low watermark) is stored only if its key's
/// estimate per byte is not below that of the objects next in line for eviction, as many as
/// its size would displace ([`Frequency::admits`]). One-off keys (a crawl, cache-busting query
/// strings) then stop displacing objects asked for again, a large object asked for as often
/// as the small ones it would displace stops taking the room that answers more requests, and a
/// fill declined is never written. It never refuses while the budget has room, and never decides
/// what may be stored: `policy` does, before any of this.
///
/// The counters are indexed by the key's hash mixed with a seed drawn per process, so the
/// keys whose counters collide cannot be worked out from the URLs alone.
pub struct Frequency {
    blocks: Box<[Block]>,
    /// Index mask over the blocks (`blocks.len() - 1`).
    mask: u64,
    /// For the block, then for the counters in it.
    seeds: [u64; 2],
    /// Counts since the last halving, in shards (by the key's hash) each on a cache line of
    /// its own: one counter that every request adds to would move between the cores on every
    /// request. A shard that reaches its share of `sample` halves the sketch.
    added: [Shard; ADDED_SHARDS],
    /// Counts between halvings.
    sample: u64,
}

impl Frequency {
    /// A sketch for a cache of up to `objects` objects.
    pub fn new(objects: u64) -> Frequency {
        // At least 4,096 words (32 KiB): a small cache's keys rarely share all four counters,
        // so two keys asked for as often compare as equal (and a tie is admitted).
        let words = objects.clamp(MIN_WORDS, 1 << 24).next_power_of_two();
        let mut seeds = [0u64; 2];
        for (i, s) in seeds.iter_mut().enumerate() {
            let mut bytes = [0u8; 8];
            // A per-process seed; a fixed one if the kernel will not give randomness.
            if crate::cache::fileio::random(&mut bytes).is_err() {
                bytes = (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(i as u64 + 1)).to_le_bytes();
            }
            *s = u64::from_le_bytes(bytes) | 1;
        }
        let blocks = words / BLOCK_WORDS as u64;
        Frequency {
            blocks: (0..blocks)
                .map(|_| Block(std::array::from_fn(|_| AtomicU64::new(0))))
                .collect(),
            mask: blocks - 1,
            seeds,
            added: Default::default(),
            sample: words.saturating_mul(SAMPLE_PER_WORD),
        }
    }

    /// The counters of `hash`: its block, and (word in the block, shift) for each row. Row
    /// `i` takes one of words `2i` and `2i + 1`, so the four are in four different words.
    fn slots(&self, hash: &KeyHash) -> (&Block, [(usize, u64); ROWS]) {
        let a = u64::from_le_bytes(hash.0[..8].try_into().expect("8 bytes"));
        let b = u64::from_le_bytes(hash.0[8..].try_into().expect("8 bytes"));
        let mix = |seed: u64, rotate: u32| {
            let h = (a ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.rotate_left(rotate);
            let h = (h ^ (h >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            h ^ (h >> 32)
        };
        let block = &self.blocks[(mix(self.seeds[0], 7) & self.mask) as usize];
        let h = mix(self.seeds[1], 24);
        let mut out = [(0, 0); ROWS];
        for (row, slot) in out.iter_mut().enumerate() {
            let bits = h >> (row * 8);
            *slot = (2 * row + (bits & 1) as usize, ((bits >> 1) % PER_WORD) * 4);
        }
        (block, out)
    }

    /// Counts one request for `hash`.
    pub fn record(&self, hash: &KeyHash) {
        let (block, slots) = self.slots(hash);
        for (word, shift) in slots {
            let _ = block.0[word].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                ((w >> shift) & MAX_COUNT < MAX_COUNT).then(|| w + (1 << shift))
            });
        }
        let added = &self.added[usize::from(hash.0[15]) % ADDED_SHARDS].0;
        if added.fetch_add(1, Ordering::Relaxed) + 1 >= self.sample / ADDED_SHARDS as u64 {
            for shard in &self.added {
                shard.0.store(0, Ordering::Relaxed);
            }
            for cell in self.blocks.iter().flat_map(|b| b.0.iter()) {
                let _ = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                    Some((w >> 1) & 0x7777_7777_7777_7777)
                });
            }
        }
    }

    /// How often `hash` was asked for recently (0 to 15).
    pub fn estimate(&self, hash: &KeyHash) -> u8 {
        let (block, slots) = self.slots(hash);
        slots
            .iter()
            .map(|&(word, shift)| (block.0[word].load(Ordering::Relaxed) >> shift) & MAX_COUNT)
            .min()
            .unwrap_or(0) as u8
    }

    /// Whether a fill of `candidate`, `bytes` long, may displace `victims` (the objects next
    /// in line for eviction, with their bytes): unless it is asked for less often per byte
    /// than they are together. Every miss costs the app a request whatever its size, so a byte
    /// of the budget is worth the requests it answers: an object twice the size of another
    /// must be asked for twice as often to take its room. Between objects of one size this is
    /// TinyLFU's rule (not asked for less often than the victim); ties are admitted.
    pub fn admits(&self, candidate: &KeyHash, bytes: u64, victims: &[(KeyHash, u64)]) -> bool {
        let (asked, held) = victims.iter().fold((0u128, 0u128), |(asked, held), (key, len)| {
            (asked + u128::from(self.estimate(key)), held + u128::from(*len))
        });
        u128::from(self.estimate(candidate)) * held >= asked * u128::from(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(i: u64) -> KeyHash {
        KeyHash::of(format!("http://h/{i}").as_bytes())
    }

    #[test]
    fn admits_on_the_second_hit_only() {
        let d = Doorkeeper::new(1 << 20);
        assert!(!d.admit(&hash(1), 1000));
        assert!(d.admit(&hash(1), 1000));
        assert!(!d.admit(&hash(2), 1000));
    }

    #[test]
    fn forgets_after_a_window_of_bytes() {
        let d = Doorkeeper::new(10_000);
        assert!(!d.admit(&hash(1), 1000));
        // Eleven other first hits of 1000 bytes: more than the window, so it is cleared.
        for i in 100..111 {
            d.admit(&hash(i), 1000);
        }
        assert!(!d.admit(&hash(1), 1000), "seen in an earlier window only");
        assert!(d.admit(&hash(1), 1000));
    }

    #[test]
    fn a_working_set_larger_than_the_window_is_mostly_refused() {
        // 20,000 objects of 24 KiB asked for uniformly, a 32 MiB window: an object comes back
        // within the window about 1 time in 15.
        let d = Doorkeeper::new(32 << 20);
        let mut n = 7u64;
        let mut admitted = 0;
        for _ in 0..100_000 {
            n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            if d.admit(&hash((n >> 33) % 20_000), 24 << 10) {
                admitted += 1;
            }
        }
        assert!((3_000..15_000).contains(&admitted), "admitted {admitted} of 100000");
    }

    #[test]
    fn a_key_asked_for_more_often_estimates_higher_and_is_admitted_over_a_rarer_one() {
        let f = Frequency::new(10_000);
        for _ in 0..5 {
            f.record(&hash(1));
        }
        f.record(&hash(2));
        assert_eq!(f.estimate(&hash(1)), 5);
        assert_eq!(f.estimate(&hash(2)), 1);
        assert_eq!(f.estimate(&hash(3)), 0);
        let one = |i: u64| [(hash(i), 1000)];
        assert!(
            !f.admits(&hash(2), 1000, &one(1)),
            "a one-off key does not displace a key asked for five times"
        );
        assert!(f.admits(&hash(1), 1000, &one(2)));
        // Ties are admitted: a cache of one-off keys keeps turning over.
        f.record(&hash(3));
        assert!(f.admits(&hash(3), 1000, &one(2)));
        // Nothing to displace: admitted.
        assert!(f.admits(&hash(4), 1000, &[]));
    }

    #[test]
    fn a_larger_object_must_be_asked_for_more_often_to_take_the_room_of_smaller_ones() {
        let f = Frequency::new(10_000);
        let asked = |i: u64, n: usize| (0..n).for_each(|_| f.record(&hash(i)));
        // Four small objects asked for twice each, in line for eviction.
        (10..14).for_each(|i| asked(i, 2));
        let small: Vec<(KeyHash, u64)> = (10..14).map(|i| (hash(i), 1000)).collect();
        // A candidate of their four kilobytes together, asked for twice: half as many requests
        // per byte as they answer. Declined.
        asked(1, 2);
        assert!(!f.admits(&hash(1), 4000, &small));
        // Asked for as often as the four together: admitted.
        asked(1, 6);
        assert!(f.admits(&hash(1), 4000, &small));
        // A small candidate asked for twice takes one small victim's room.
        asked(2, 2);
        assert!(f.admits(&hash(2), 1000, &small[..1]));
        // A small candidate asked for once takes the room of a large object asked for twice
        // that is ten times its size: it answers five times the requests per byte.
        asked(3, 1);
        assert!(f.admits(&hash(3), 1000, &[(hash(10), 10_000)]));
    }

    #[test]
    fn a_keys_four_counters_are_in_four_words_of_one_cache_line() {
        let f = Frequency::new(10_000);
        let mut blocks = std::collections::HashSet::new();
        for i in 0..1_000 {
            let (block, slots) = f.slots(&hash(i));
            assert_eq!(std::ptr::from_ref(block) as usize % 64, 0, "a block is one cache line");
            let words: std::collections::HashSet<usize> = slots.iter().map(|&(word, _)| word).collect();
            assert_eq!(words.len(), ROWS, "key {i}: {slots:?}");
            assert!(slots.iter().all(|&(word, shift)| word < BLOCK_WORDS && shift < 64));
            blocks.insert(std::ptr::from_ref(block) as usize);
        }
        // 1,000 keys over 2,048 blocks: spread, not piled into a few.
        assert!(blocks.len() > 700, "{} blocks", blocks.len());
    }

    #[test]
    fn counters_saturate_and_fade_with_the_halving() {
        let f = Frequency::new(256);
        for _ in 0..40 {
            f.record(&hash(7));
        }
        assert_eq!(f.estimate(&hash(7)), 15, "4-bit counters saturate");
        // SAMPLE_PER_WORD other requests per word halve every counter once.
        let before = f.estimate(&hash(7));
        for i in 0..f.sample {
            f.record(&hash(1_000_000 + i));
        }
        let after = f.estimate(&hash(7));
        assert!(after < before && after >= before / 2 - 1, "{before} -> {after}");
    }

    #[test]
    fn estimates_of_many_keys_stay_close_to_their_counts() {
        // 50,000 keys once each, 500 keys ten times each, in a sketch sized for 60,000: the
        // frequent ones stay distinguishable from the one-offs (count-min overestimates only).
        let f = Frequency::new(60_000);
        for i in 0..50_000 {
            f.record(&hash(i));
        }
        for _ in 0..10 {
            for i in 100_000..100_500 {
                f.record(&hash(i));
            }
        }
        let over = (0..50_000).filter(|&i| f.estimate(&hash(i)) >= 5).count();
        assert!(over < 500, "{over} one-off keys estimated at 5 or more");
        assert!((100_000..100_500).all(|i| f.estimate(&hash(i)) >= 8));
    }
}
