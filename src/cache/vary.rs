//! The vary specs: for each URL whose responses vary, the request headers that pick the
//! variant (RFC 9111 §4.1), as the app last said in `Vary`. Variants are stored side by side,
//! each under a hash of the key and those headers' normalized values; what `Vary` means
//! (parsing, normalizing, matching, the hash) is [`crate::policy::vary`]'s.
//!
//! Owns that map and nothing else: it learns a spec from each stored record (at a commit and
//! at the startup rebuild) and never reads the index or the disk.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use http::{HeaderMap, HeaderName};

use crate::cache::key::{CacheKey, KeyHash};
use crate::cache::meta::Meta;
use crate::policy::vary;

/// Bits of the filter of URLs that may vary (8 KiB).
const FILTER_BITS: usize = 1 << 16;

/// The request headers each varying URL's responses vary on, by the URL's own hash.
///
/// Lock: `specs` is a std mutex, held only to read or replace one spec (never across an
/// `.await`, never while taking another lock; the spec is cloned out before the variant is
/// hashed). A leaf: callers hold no other cache lock when they take it.
///
/// Every request asks for its URL's spec, and most URLs have none: `may_vary` (one bit per
/// URL hash, set before a spec is inserted, never cleared) answers those without the lock,
/// whose cache line would otherwise move between the cores on every request. A set bit (a
/// varying URL, one that no longer varies, or another URL's) only means asking the map.
pub(super) struct VarySpecs {
    specs: Mutex<HashMap<KeyHash, Arc<[HeaderName]>>>,
    may_vary: Box<[AtomicU64]>,
}

impl Default for VarySpecs {
    fn default() -> VarySpecs {
        VarySpecs {
            specs: Mutex::default(),
            may_vary: (0..FILTER_BITS / 64).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl VarySpecs {
    /// No URL known to vary.
    pub(super) fn new() -> VarySpecs {
        VarySpecs::default()
    }

    /// The filter's word and bit for a URL's hash.
    fn bit(&self, primary: &KeyHash) -> (&AtomicU64, u64) {
        let at = u64::from_le_bytes(primary.0[8..].try_into().expect("8 bytes")) as usize % FILTER_BITS;
        (&self.may_vary[at / 64], 1 << (at % 64))
    }

    /// False when no spec was ever inserted for this URL (nor for any URL sharing its bit).
    fn may_vary(&self, primary: &KeyHash) -> bool {
        let (word, bit) = self.bit(primary);
        word.load(Ordering::Acquire) & bit != 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<KeyHash, Arc<[HeaderName]>>> {
        // Each step is one insert or remove: poisoning is ignored.
        self.specs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The hash a request's variant is stored under: the headers the app last said it varies
    /// on for this URL pick the variant (RFC 9111 §4.1); the key's own hash when it does not.
    pub(super) fn variant_of(&self, key: &CacheKey, req: &HeaderMap) -> KeyHash {
        let primary = key.hash();
        if !self.may_vary(&primary) {
            return primary;
        }
        let spec = self.lock().get(&primary).cloned();
        match spec {
            None => primary,
            Some(names) => vary::variant_hash(key, &vary::values_of(&names, req)),
        }
    }

    /// Whether responses for this URL vary (some variant may be stored).
    pub(super) fn varies(&self, key: &CacheKey) -> bool {
        let primary = key.hash();
        self.may_vary(&primary) && self.lock().contains_key(&primary)
    }

    /// Learns the spec of a stored response: the headers its `Vary` names, or none.
    pub(super) fn remember(&self, meta: &Meta) {
        let mut specs = self.lock();
        if meta.vary.is_empty() {
            specs.remove(&meta.key.hash());
        } else {
            let primary = meta.key.hash();
            // Before the spec is in the map: whoever finds it there finds the bit set.
            let (word, bit) = self.bit(&primary);
            word.fetch_or(bit, Ordering::Release);
            specs.insert(primary, meta.vary.iter().map(|(n, _)| n.clone()).collect());
        }
    }
}

#[cfg(test)]
mod tests {

    use http::HeaderValue;

    use super::*;

    fn key() -> CacheKey {
        CacheKey::from_stored("http://h/page.html".into())
    }

    /// A record of `key()` stored for a request with these `Vary`-named headers.
    fn stored(vary: &[(&'static str, &'static str)]) -> Meta {
        let mut meta = crate::cache::testing::meta(key().as_str(), b"");
        meta.vary = vary
            .iter()
            .map(|(n, v)| (HeaderName::from_static(n), Some(HeaderValue::from_static(v))))
            .collect();
        meta
    }

    fn request(headers: &[(&'static str, &'static str)]) -> HeaderMap {
        headers
            .iter()
            .map(|(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
            .collect()
    }

    #[test]
    fn a_url_without_a_spec_is_stored_under_its_own_hash() {
        let vary = VarySpecs::new();
        assert!(!vary.varies(&key()));
        assert_eq!(vary.variant_of(&key(), &request(&[("x-lang", "en")])), key().hash());
    }

    #[test]
    fn a_spec_picks_a_variant_per_header_value() {
        let vary = VarySpecs::new();
        vary.remember(&stored(&[("x-lang", "en")]));
        assert!(vary.varies(&key()));
        let en = vary.variant_of(&key(), &request(&[("x-lang", "en")]));
        let fr = vary.variant_of(&key(), &request(&[("x-lang", "fr")]));
        let none = vary.variant_of(&key(), &request(&[]));
        assert_ne!(en, fr);
        assert_ne!(en, none);
        assert_ne!(en, key().hash());
        // Headers it does not vary on change nothing.
        assert_eq!(
            vary.variant_of(&key(), &request(&[("x-lang", "en"), ("x-other", "1")])),
            en
        );
        // Another URL is not affected.
        let other = CacheKey::from_stored("http://h/other.html".into());
        assert_eq!(vary.variant_of(&other, &request(&[("x-lang", "en")])), other.hash());
    }

    #[test]
    fn a_response_without_vary_makes_the_url_primary_again() {
        let vary = VarySpecs::new();
        vary.remember(&stored(&[("x-lang", "en")]));
        vary.remember(&stored(&[]));
        assert!(!vary.varies(&key()));
        assert_eq!(vary.variant_of(&key(), &request(&[("x-lang", "en")])), key().hash());
    }
}
