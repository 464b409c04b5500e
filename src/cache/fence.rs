//! Purge fences: what a fill in flight learns when it commits.
//!
//! A fill asks the app, then commits its answer when the body is in: seconds later for a large
//! or slow one. A purge (by URL, prefix, tag or all, hard or soft) or an unsafe request's
//! invalidation that lands in between finds nothing to remove yet; without a fence the fill
//! would then store the answer the app gave *before* the purge, fresh, and undo it. So every
//! purge leaves a fence (when, what it selects, hard or soft), and a commit whose request left
//! for the app at or before a fence that selects it is dropped (hard) or stored already marked
//! stale at the fence (soft), as if it had been stored before the purge.
//!
//! Fences are bounded ([`MAX_FENCES`], and [`FENCE_LIFETIME`]): the oldest fold into a floor,
//! a fence that selects everything. Folding can only make a commit count as purged when it
//! was not: it costs a refetch of what was in flight, never a purged answer served.
//!
//! Owns one std mutex, a leaf, taken under the index's lock by a commit (so a purge that
//! raises its fence before it takes the index lock is seen by every commit that follows it,
//! and every commit before it is found by its selection) and alone by a purge. Pure: no I/O.

use std::collections::VecDeque;
use std::sync::Mutex;

use crate::cache::Purge;
use crate::cache::key::KeyHash;

/// Most fences kept; beyond, the oldest folds into the floor.
pub const MAX_FENCES: usize = 1024;

/// How long a fence is kept (milliseconds): a fill whose request left longer ago than this
/// before a purge of anything counts as purged by it (the floor).
pub const FENCE_LIFETIME: u64 = 15 * 60 * 1000;

/// What a purge selected.
#[derive(Debug)]
enum Selects {
    /// One stored key (an invalidation): its hash.
    Key(KeyHash),
    /// What a purge names.
    Purge(Purge),
}

#[derive(Debug)]
struct Fence {
    /// When the purge was made (milliseconds since the epoch).
    at: u64,
    selects: Selects,
    soft: bool,
}

/// A commit's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No purge since its request left: store it as it is.
    Clear,
    /// A hard purge selected it after its request left: drop it.
    Purged,
    /// Only soft purges selected it: store it marked stale as of this time (milliseconds).
    SoftPurged(u64),
}

/// The fences of the purges made recently (see the module's documentation).
#[derive(Debug, Default)]
pub struct Fences {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Oldest first.
    fences: VecDeque<Fence>,
    /// Every commit whose request left at or before this (milliseconds) counts as purged.
    floor: u64,
}

/// What a commit is checked against a fence by.
pub struct Committing<'a> {
    /// When its request left for the app (milliseconds since the epoch).
    pub requested: u64,
    /// Its key, as the index holds it.
    pub key: &'a str,
    /// The hash it is indexed under (its variant's, for a `Vary` response).
    pub hash: &'a KeyHash,
    /// The hash of its URL's key (the key invalidations name).
    pub url_hash: &'a KeyHash,
    /// Its tags.
    pub tags: &'a [Box<str>],
}

impl Fences {
    /// Fences that select nothing yet.
    pub fn new() -> Fences {
        Fences::default()
    }

    /// Records a purge made at `at` (milliseconds).
    pub fn purge(&self, at: u64, what: &Purge, soft: bool) {
        self.raise(Fence {
            at,
            selects: Selects::Purge(what.clone()),
            soft,
        });
    }

    /// Records the invalidation of one key (by the hash of its URL's key) at `at`.
    pub fn invalidate(&self, at: u64, url_hash: KeyHash) {
        self.raise(Fence {
            at,
            selects: Selects::Key(url_hash),
            soft: false,
        });
    }

    fn raise(&self, fence: Fence) {
        let mut st = self.lock();
        // Kept in order of time (purges made at once may arrive a little out of order).
        let at = st.fences.partition_point(|f| f.at <= fence.at);
        st.fences.insert(at, fence);
        let newest = st.fences.back().map_or(0, |f| f.at);
        while st.fences.len() > MAX_FENCES
            || st
                .fences
                .front()
                .is_some_and(|f| f.at.saturating_add(FENCE_LIFETIME) < newest)
        {
            let Some(old) = st.fences.pop_front() else { break };
            st.floor = st.floor.max(old.at);
        }
    }

    /// Whether a commit was purged after its request left. Costs nothing when no purge
    /// came since (the newest fence is older): the case of nearly every commit.
    pub fn check(&self, c: &Committing<'_>) -> Verdict {
        let st = self.lock();
        if c.requested <= st.floor {
            return Verdict::Purged;
        }
        let mut soft = None;
        // Newest first; stop at the first fence from before the request.
        for f in st.fences.iter().rev().take_while(|f| f.at >= c.requested) {
            let selected = match &f.selects {
                Selects::Key(h) => h == c.url_hash || h == c.hash,
                Selects::Purge(Purge::Tags(tags)) => tags.iter().any(|t| c.tags.iter().any(|own| **own == **t)),
                Selects::Purge(p) => p.matches(c.key),
            };
            match (selected, f.soft) {
                (false, _) => {}
                (true, false) => return Verdict::Purged,
                // The oldest soft fence that selects it: stale from then on.
                (true, true) => soft = Some(f.at),
            }
        }
        soft.map_or(Verdict::Clear, Verdict::SoftPurged)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic elsewhere while holding it leaves fences that are still whole.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kh(n: u8) -> KeyHash {
        KeyHash([n; 16])
    }

    fn commit<'a>(requested: u64, key: &'a str, hash: &'a KeyHash, tags: &'a [Box<str>]) -> Committing<'a> {
        Committing {
            requested,
            key,
            hash,
            url_hash: hash,
            tags,
        }
    }

    #[test]
    fn a_purge_after_the_request_left_selects_the_commit_and_one_before_does_not() {
        let f = Fences::new();
        let (h, other) = (kh(1), kh(2));
        let key = "http://app.example/assets/a.js";
        let no_tags: Vec<Box<str>> = Vec::new();
        assert_eq!(f.check(&commit(100, key, &h, &no_tags)), Verdict::Clear);
        f.purge(200, &Purge::Url("/assets/a.js".into()), false);
        assert_eq!(f.check(&commit(100, key, &h, &no_tags)), Verdict::Purged);
        assert_eq!(
            f.check(&commit(200, key, &h, &no_tags)),
            Verdict::Purged,
            "same millisecond"
        );
        assert_eq!(
            f.check(&commit(201, key, &h, &no_tags)),
            Verdict::Clear,
            "asked after it"
        );
        assert_eq!(
            f.check(&commit(100, "http://app.example/assets/b.js", &other, &no_tags)),
            Verdict::Clear,
            "another URL"
        );
        f.purge(300, &Purge::Prefix("/img/".into()), false);
        assert_eq!(
            f.check(&commit(250, "http://app.example/img/x.png", &other, &no_tags)),
            Verdict::Purged
        );
        f.purge(400, &Purge::Tags(vec!["p1".into()]), false);
        let tagged: Vec<Box<str>> = vec!["p0".into(), "p1".into()];
        assert_eq!(
            f.check(&commit(350, "http://app.example/z", &other, &tagged)),
            Verdict::Purged
        );
        assert_eq!(
            f.check(&commit(350, "http://app.example/z", &other, &no_tags)),
            Verdict::Clear
        );
        f.invalidate(500, kh(9));
        let mut c = commit(450, "http://app.example/post", &other, &no_tags);
        let url = kh(9);
        c.url_hash = &url;
        assert_eq!(f.check(&c), Verdict::Purged, "a variant of an invalidated URL");
        f.purge(600, &Purge::All, false);
        assert_eq!(f.check(&commit(550, key, &h, &no_tags)), Verdict::Purged);
    }

    #[test]
    fn a_soft_purge_marks_the_commit_stale_at_its_fence_and_a_hard_one_wins() {
        let f = Fences::new();
        let h = kh(1);
        let key = "http://app.example/a.css";
        let none: Vec<Box<str>> = Vec::new();
        f.purge(200, &Purge::All, true);
        f.purge(300, &Purge::Url("/a.css".into()), true);
        assert_eq!(f.check(&commit(100, key, &h, &none)), Verdict::SoftPurged(200));
        assert_eq!(f.check(&commit(250, key, &h, &none)), Verdict::SoftPurged(300));
        f.purge(400, &Purge::Url("/a.css".into()), false);
        assert_eq!(f.check(&commit(100, key, &h, &none)), Verdict::Purged);
    }

    #[test]
    fn fences_are_bounded_and_the_oldest_fold_into_a_floor_that_purges_what_is_older() {
        let f = Fences::new();
        let h = kh(1);
        let none: Vec<Box<str>> = Vec::new();
        for i in 0..(MAX_FENCES as u64 + 10) {
            f.invalidate(1000 + i, kh(200));
        }
        assert!(f.lock().fences.len() <= MAX_FENCES);
        // Folded: a commit from before the floor is purged whatever it is.
        assert_eq!(f.check(&commit(1005, "http://a/x", &h, &none)), Verdict::Purged);
        // One from after every fence is clear, one between them not selected is clear.
        assert_eq!(f.check(&commit(5000, "http://a/x", &h, &none)), Verdict::Clear);
        assert_eq!(f.check(&commit(1500, "http://a/x", &h, &none)), Verdict::Clear);
        // Fences older than their lifetime fold as well.
        let f = Fences::new();
        f.invalidate(10, kh(200));
        f.invalidate(10 + FENCE_LIFETIME + 1, kh(201));
        assert_eq!(f.lock().fences.len(), 1);
        assert_eq!(f.check(&commit(5, "http://a/x", &h, &none)), Verdict::Purged);
    }
}
