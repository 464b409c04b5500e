//! Request coalescing (the fill lock): the first request to miss a key becomes its leader and
//! fetches it for everyone; the others wait on its flight and read the fill as it lands, or
//! are told why they must not ([`Waited`]).
//!
//! Owns the map of flights in progress and nothing else: it knows keys only by their hash
//! (the variant is picked before a claim), and never touches the index, the tiers or the disk.
//! A leader's [`FillPermit`] is a value with a `Drop` (pingora-cache `lock.rs`'s
//! `WritePermit`): dropped before it is settled, it releases its waiters with a reason, so a
//! leader that fails or vanishes never strands anyone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::cache::fill::Fill;
use crate::cache::key::KeyHash;
use crate::metrics as m;

/// Why a leader let its waiters go without a body to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Release {
    /// Try the cache again: what was fetched is stored (or may be), or the failure was passing.
    Retry,
    /// Go to the app directly: the answer was not shareable.
    Bypass,
    /// The permit was dropped before it was settled (the leader failed or vanished).
    LeaderGone,
}

/// The state of a key being fetched by one request for many.
#[derive(Clone)]
enum Flight {
    /// The leader waits for the app's response head.
    Pending,
    /// The body is being written; read it while it lands.
    Streaming(Arc<Fill>),
    /// The leader gave up, for this reason.
    Released(Release),
}

/// How a wait on another request's fill ended: a closed set, named for logs and labels by
/// [`Waited::as_str`].
#[derive(Clone)]
pub enum Waited {
    /// The leader streams the body: read it as it lands.
    Streaming(Arc<Fill>),
    /// The leader asked its waiters to try the cache again.
    ReleasedRetry,
    /// The leader's answer is not shareable: each waiter goes to the app.
    ReleasedBypass,
    /// The leader did not stream nor give up within the wait's limit.
    TimedOut,
    /// The leader's permit was dropped unsettled: try the cache again (one waiter leads).
    LeaderGone,
}

impl Waited {
    /// The name of the way the wait ended.
    pub fn as_str(&self) -> &'static str {
        match self {
            Waited::Streaming(_) => "streaming",
            Waited::ReleasedRetry => "released-retry",
            Waited::ReleasedBypass => "released-bypass",
            Waited::TimedOut => "timed-out",
            Waited::LeaderGone => "leader-gone",
        }
    }

    /// Whether the waiter should claim the key again.
    pub fn retries(&self) -> bool {
        matches!(self, Waited::ReleasedRetry | Waited::LeaderGone)
    }

    /// How a wait on `flight` ends, or `None` while it is pending.
    fn of(flight: &Flight) -> Option<Waited> {
        match flight {
            Flight::Pending => None,
            Flight::Streaming(fill) => Some(Waited::Streaming(fill.clone())),
            Flight::Released(Release::Retry) => Some(Waited::ReleasedRetry),
            Flight::Released(Release::Bypass) => Some(Waited::ReleasedBypass),
            Flight::Released(Release::LeaderGone) => Some(Waited::LeaderGone),
        }
    }
}

/// One in-flight fetch that requests for the same key wait on.
pub struct InFlight {
    state: watch::Sender<Flight>,
}

impl InFlight {
    /// Waits (at most `limit`) for the leader to stream or give up.
    pub async fn wait(&self, limit: Duration) -> Waited {
        let mut rx = self.state.subscribe();
        match tokio::time::timeout(limit, rx.wait_for(|f| !matches!(f, Flight::Pending))).await {
            // (The sender lives as long as this flight: a closed channel is a leader gone.)
            Ok(Ok(flight)) => Waited::of(&flight).unwrap_or(Waited::LeaderGone),
            Ok(Err(_)) => Waited::LeaderGone,
            Err(_) => Waited::TimedOut,
        }
    }
}

/// The outcome of claiming a key for fetching.
pub enum Claim {
    /// This request fetches for everyone.
    Leader(FillPermit),
    /// Another request is fetching: wait on it.
    Wait(Arc<InFlight>),
}

/// The flights in progress, by the hash of the variant they fetch.
///
/// Lock: `map` is a std mutex, held only to look up, insert or remove one flight (never across
/// an `.await`). While it is held, only a flight's own watch channel is read (to tell a
/// released flight from a live one) and a counter incremented; nothing takes `map` while
/// holding another cache lock, and waiters are woken after it is let go.
#[derive(Default)]
pub struct Flights {
    map: Mutex<HashMap<KeyHash, Arc<InFlight>>>,
}

impl Flights {
    /// No flights.
    pub fn new() -> Flights {
        Flights::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<KeyHash, Arc<InFlight>>> {
        // Each step leaves the map whole (one insert or remove): poisoning is ignored.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `hash`: become its fetcher, or wait on the request that is.
    pub fn claim(self: &Arc<Self>, hash: KeyHash) -> Claim {
        let mut map = self.lock();
        if let Some(f) = map.get(&hash)
            && !matches!(*f.state.borrow(), Flight::Released(_))
        {
            metrics::counter!(m::COALESCED_WAITS).increment(1);
            return Claim::Wait(f.clone());
        }
        let (state, _) = watch::channel(Flight::Pending);
        let flight = Arc::new(InFlight { state });
        map.insert(hash, flight.clone());
        Claim::Leader(FillPermit {
            flights: self.clone(),
            hash,
            flight,
            settled: Settled::No,
        })
    }

    /// Unpublishes `flight` if it is still the one for `hash`.
    fn unpublish(&self, hash: &KeyHash, flight: &Arc<InFlight>) {
        let mut map = self.lock();
        if map.get(hash).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            map.remove(hash);
        }
    }

    /// Whether a fill of `hash` is in progress (published and not released).
    pub fn in_flight(&self, hash: &KeyHash) -> bool {
        self.lock()
            .get(hash)
            .is_some_and(|f| !matches!(*f.state.borrow(), Flight::Released(_)))
    }

    /// How many flights are published.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no flight is published.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How far a permit got.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Settled {
    No,
    /// Its waiters read the fill; the flight stays published (late comers join it) until
    /// the permit is dropped, when the fill is over.
    Streaming,
    /// Its waiters were let go and the flight unpublished.
    Released,
}

/// The right (and duty) to fetch a key for the waiters. Dropped unsettled, it releases them to
/// retry ([`Waited::LeaderGone`]); dropped after [`FillPermit::stream`], it unpublishes the
/// finished flight so the next request for the key is not joined to it.
pub struct FillPermit {
    flights: Arc<Flights>,
    hash: KeyHash,
    flight: Arc<InFlight>,
    settled: Settled,
}

impl FillPermit {
    /// Releases the waiters: to retry the cache, or to go to the app themselves.
    pub fn release(mut self, retry: bool) {
        self.settle(Flight::Released(if retry { Release::Retry } else { Release::Bypass }));
    }

    /// Tells the waiters (and those to come, until this permit is dropped) to read `fill`.
    pub fn stream(&mut self, fill: Arc<Fill>) {
        self.settle(Flight::Streaming(fill));
    }

    fn settle(&mut self, flight: Flight) {
        if let Flight::Streaming(_) = flight {
            self.settled = Settled::Streaming;
        } else {
            self.settled = Settled::Released;
            // Unpublish before waking anyone: a released waiter that claims again must find
            // the key free (or a new leader), never this finished flight.
            self.flights.unpublish(&self.hash, &self.flight);
        }
        self.flight.state.send_replace(flight);
    }
}

impl Drop for FillPermit {
    fn drop(&mut self) {
        match self.settled {
            Settled::No => self.settle(Flight::Released(Release::LeaderGone)),
            Settled::Streaming => self.flights.unpublish(&self.hash, &self.flight),
            Settled::Released => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use http::HeaderMap;

    use super::*;
    use crate::cache::key::{CacheKey, Digest};
    use crate::cache::meta::Meta;

    fn hash(path: &str) -> KeyHash {
        KeyHash::of(format!("http://h{path}").as_bytes())
    }

    fn fill() -> Arc<Fill> {
        let meta = Meta {
            key: CacheKey::from_stored("http://h/a.js".into()),
            status: 200,
            headers: HeaderMap::new(),
            request_time: SystemTime::UNIX_EPOCH,
            response_time: SystemTime::UNIX_EPOCH,
            body_len: 4,
            digest: Digest([0; 32]),
            vary: Vec::new(),
            prepared: Default::default(),
        };
        Fill::new(Arc::new(meta), None)
    }

    fn leader(claim: Claim) -> FillPermit {
        match claim {
            Claim::Leader(permit) => permit,
            Claim::Wait(_) => panic!("expected to lead"),
        }
    }

    fn waiter(claim: Claim) -> Arc<InFlight> {
        match claim {
            Claim::Wait(flight) => flight,
            Claim::Leader(_) => panic!("expected to wait"),
        }
    }

    const LIMIT: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn a_waiter_reads_the_leaders_fill() {
        let flights = Arc::new(Flights::new());
        let mut permit = leader(flights.claim(hash("/a")));
        let flight = waiter(flights.claim(hash("/a")));
        let waiting = tokio::spawn(async move { flight.wait(LIMIT).await });
        let streamed = fill();
        permit.stream(streamed.clone());
        match waiting.await.expect("waiter ran") {
            Waited::Streaming(f) => assert!(Arc::ptr_eq(&f, &streamed)),
            other => panic!("waiter saw {}", other.as_str()),
        }
        // Until the fill is over, late comers join it too.
        let late = waiter(flights.claim(hash("/a")));
        assert_eq!(late.wait(LIMIT).await.as_str(), "streaming");
        // Another key is not coalesced with it.
        drop(leader(flights.claim(hash("/b"))));
    }

    #[tokio::test]
    async fn a_permit_dropped_unsettled_releases_its_waiters_to_retry() {
        let flights = Arc::new(Flights::new());
        let permit = leader(flights.claim(hash("/a")));
        let flight = waiter(flights.claim(hash("/a")));
        let waiting = tokio::spawn(async move { flight.wait(LIMIT).await });
        drop(permit);
        let ended = waiting.await.expect("waiter ran");
        assert_eq!(ended.as_str(), "leader-gone");
        assert!(ended.retries());
        assert!(flights.is_empty());
    }

    #[tokio::test]
    async fn a_release_says_whether_to_retry_or_go_to_the_app() {
        let flights = Arc::new(Flights::new());
        for (retry, name, retries) in [(true, "released-retry", true), (false, "released-bypass", false)] {
            let permit = leader(flights.claim(hash("/a")));
            let flight = waiter(flights.claim(hash("/a")));
            permit.release(retry);
            let ended = flight.wait(LIMIT).await;
            assert_eq!(ended.as_str(), name);
            assert_eq!(ended.retries(), retries);
        }
    }

    #[tokio::test]
    async fn a_released_key_can_be_claimed_again_at_once() {
        let flights = Arc::new(Flights::new());
        let permit = leader(flights.claim(hash("/a")));
        let flight = waiter(flights.claim(hash("/a")));
        let mut woken = flight.state.subscribe();
        let waiting = {
            let flights = flights.clone();
            // What a released waiter does first: claim again, the moment it is woken. (The
            // flight is unpublished before the wake-up is sent; on this one-thread runtime the
            // waiter runs after `release` returns, so this checks the outcome, not the order.)
            tokio::spawn(async move {
                let _ = woken.changed().await;
                matches!(flights.claim(hash("/a")), Claim::Leader(_))
            })
        };
        permit.release(true);
        assert!(waiting.await.expect("waiter ran"), "the released flight was joined");
        // The new leader's permit went with the task: nothing is left published.
        assert!(flights.is_empty());
    }

    /// On a paused clock (it jumps to the next timer when every task waits): the wait takes
    /// its whole limit of virtual time and no real time.
    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_at_its_limit() {
        let flights = Arc::new(Flights::new());
        let _permit = leader(flights.claim(hash("/a")));
        let flight = waiter(flights.claim(hash("/a")));
        // The leader never settles while the waiter waits.
        let started = tokio::time::Instant::now();
        let ended = flight.wait(LIMIT).await;
        assert_eq!(ended.as_str(), "timed-out");
        assert!(!ended.retries());
        let waited = started.elapsed();
        assert!(waited >= LIMIT && waited < LIMIT + Duration::from_secs(1), "{waited:?}");
    }

    #[tokio::test]
    async fn a_finished_flight_is_not_joined() {
        let flights = Arc::new(Flights::new());
        let mut permit = leader(flights.claim(hash("/a")));
        permit.stream(fill());
        // The fill task drops the permit when the fill is over.
        drop(permit);
        assert!(flights.is_empty());
        let next = leader(flights.claim(hash("/a")));
        drop(next);
        assert!(flights.is_empty());
    }
}
