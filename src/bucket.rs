//! A token bucket: at most `burst` events (or bytes) at once and `rate` per second on average.
//! Owns only its counter and the time of its last refill; no I/O.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bounds the rate of an event (invalidations by unsafe requests) or of bytes (shared-tier
/// uploads).
#[derive(Debug)]
pub struct TokenBucket {
    /// Tokens gained per second.
    rate: f64,
    /// Most tokens held.
    burst: f64,
    /// A std mutex: held for a few arithmetic operations, never across an `.await`.
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens, refilled at `rate` per second.
    pub fn new(burst: u32, rate: u32) -> TokenBucket {
        TokenBucket {
            rate: f64::from(rate),
            burst: f64::from(burst),
            state: Mutex::new(State {
                tokens: f64::from(burst),
                refilled: Instant::now(),
            }),
        }
    }

    /// A full bucket of `amount` tokens, refilled at `amount` per `window` (bytes per hour).
    pub fn per_window(amount: u64, window: Duration) -> TokenBucket {
        let burst = amount as f64;
        TokenBucket {
            rate: burst / window.as_secs_f64().max(1e-3),
            burst,
            state: Mutex::new(State {
                tokens: burst,
                refilled: Instant::now(),
            }),
        }
    }

    /// Takes `n` tokens at `now` at once, or none; false when fewer are left.
    pub fn try_take_many_at(&self, n: u64, now: Instant) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let gained = now.saturating_duration_since(s.refilled).as_secs_f64() * self.rate;
        s.tokens = (s.tokens + gained).min(self.burst);
        s.refilled = now.max(s.refilled);
        let n = n as f64;
        if s.tokens >= n {
            s.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Takes one token now; false when the bucket is empty.
    pub fn try_take(&self) -> bool {
        self.try_take_at(Instant::now())
    }

    /// Takes one token at `now` (a time not before the previous call's).
    pub fn try_take_at(&self, now: Instant) -> bool {
        self.try_take_many_at(1, now)
    }

    /// The most events allowed over `elapsed`, starting full.
    pub fn allowance(&self, elapsed: Duration) -> u64 {
        (self.burst + self.rate * elapsed.as_secs_f64()).floor() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let b = TokenBucket::new(3, 2);
        let t0 = Instant::now();
        assert!((0..3).all(|_| b.try_take_at(t0)));
        assert!(!b.try_take_at(t0), "burst spent");
        assert!(!b.try_take_at(t0 + Duration::from_millis(400)), "0.8 token");
        assert!(b.try_take_at(t0 + Duration::from_millis(600)), "a token after 1/rate");
        assert!(!b.try_take_at(t0 + Duration::from_millis(600)));
        // A long pause refills to the burst, never beyond.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| b.try_take_at(later)).count(), 3);
        assert_eq!(b.allowance(Duration::from_secs(2)), 7);
    }

    #[test]
    fn bytes_per_window_are_taken_whole_or_not_at_all() {
        let b = TokenBucket::per_window(1000, Duration::from_secs(100));
        let t0 = Instant::now();
        assert!(b.try_take_many_at(600, t0));
        assert!(!b.try_take_many_at(600, t0), "400 left: none taken");
        assert!(b.try_take_many_at(400, t0));
        assert!(!b.try_take_many_at(1, t0));
        assert!(b.try_take_many_at(100, t0 + Duration::from_secs(10)), "10 a second");
        assert!(
            !b.try_take_many_at(2000, t0 + Duration::from_secs(1000)),
            "never above the burst"
        );
    }

    #[test]
    fn time_going_backwards_gains_nothing() {
        let b = TokenBucket::new(1, 1);
        let t0 = Instant::now() + Duration::from_secs(5);
        assert!(b.try_take_at(t0));
        assert!(!b.try_take_at(t0 - Duration::from_secs(3)));
        assert!(!b.try_take_at(t0 + Duration::from_millis(500)));
        assert!(b.try_take_at(t0 + Duration::from_secs(1)));
    }
}
