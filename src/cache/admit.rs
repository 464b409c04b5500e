//! Admission to the hot tier: an object enters memory on its second disk hit within a window,
//! not its first (the "doorkeeper" of TinyLFU).
//!
//! Without it, every disk hit inserted into the hot tier, so a working set larger than memory
//! (the usual case: memory holds megabytes, the disk gigabytes) turned each hit into an insert
//! plus an eviction of something else that was just as likely to be asked for. With it, an object
//! is admitted when it is asked for again before a hot tier's worth of bytes has been seen: one
//! that a tier of that size would have kept.

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
}
