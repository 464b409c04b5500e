//! Tags (surrogate keys): the names an app gives its responses in `Surrogate-Key`
//! (space-separated, Fastly's convention) and `Cache-Tag` (comma-separated, Cloudflare's), so
//! that an operator purges by what changed (`purge --tag product-42`), not by URL.
//!
//! Two parts, both pure (no I/O, no lock of their own):
//! - [`TagRules`]: which headers carry tags and the bounds on them, and [`TagRules::parse`],
//!   which reads a response's tags. A response whose tags cannot all be indexed (too many, one
//!   too long, not UTF-8) is refused whole ([`Refused`]): its caller does not store it. Keeping
//!   it with some of its tags dropped would make a purge by a dropped tag silently keep
//!   serving it, which is worse than a miss.
//! - [`TagIndex`]: the in-memory index from a tag to the keys carrying it, owned by the
//!   [`crate::cache::index::Index`] and changed under its lock in the same step as the entries
//!   (so a purge by tag and an insert never see one without the other). Tag names are
//!   interned: an entry holds its tags as `u32` ids, and each name is stored once whatever
//!   the number of objects carrying it. A name whose last object goes is forgotten and its id
//!   reused, so the index holds only the tags of what is stored. Its memory is budgeted
//!   (`max_tag_index_memory`): it counts the bytes its names and references hold
//!   ([`TagIndex::bytes`]), and an object whose tags would take it past the budget is refused
//!   whole ([`Refused::Memory`]), never indexed with some of its tags.
//!
//! The tags are not stored separately: they stay in the record's headers (the tag headers are
//! stored with the response, and removed on the way to clients unless configured), and the
//! startup rebuild reads them again from there.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use http::header::{HeaderMap, HeaderName};

use crate::cache::key::KeyHash;

/// How a tag header separates its tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Separator {
    /// Whitespace (`Surrogate-Key: a b c`).
    Space,
    /// Commas, whitespace around each tag ignored (`Cache-Tag: a, b,c`).
    Comma,
}

/// Which response headers carry tags, and the bounds on what one response may make us index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRules {
    /// The tag headers and their separators.
    pub headers: Vec<(HeaderName, Separator)>,
    /// Most distinct tags one object may carry.
    pub max_per_object: usize,
    /// Longest tag, in bytes.
    pub max_length: usize,
    /// Whether the tag headers reach clients (by default they are removed, as CDNs do).
    pub to_clients: bool,
}

/// Why a response's tags were refused (and so the response not stored); the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// More distinct tags than `max_tags_per_object`.
    Count,
    /// A tag longer than `max_tag_length`.
    Length,
    /// A tag header that is not UTF-8.
    Invalid,
    /// Its tags would take the tag index past `max_tag_index_memory`.
    Memory,
}

impl Refused {
    /// The label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Count => "count",
            Refused::Length => "length",
            Refused::Invalid => "invalid",
            Refused::Memory => "memory",
        }
    }
}

impl TagRules {
    /// The distinct tags a response's head carries, in the order first seen: every line of
    /// every tag header, split by its separator, empty tags skipped, duplicates once. Work is
    /// linear in the headers' size (itself bounded by `max_header_size`), and stops at the
    /// first tag past a bound.
    pub fn parse(&self, headers: &HeaderMap) -> Result<Vec<Box<str>>, Refused> {
        let mut tags: Vec<Box<str>> = Vec::new();
        let mut seen: HashSet<&str> = HashSet::new();
        for (name, sep) in &self.headers {
            for value in headers.get_all(name) {
                let text = std::str::from_utf8(value.as_bytes()).map_err(|_| Refused::Invalid)?;
                let parts: Box<dyn Iterator<Item = &str>> = match sep {
                    Separator::Space => Box::new(text.split_ascii_whitespace()),
                    Separator::Comma => Box::new(text.split(',').map(str::trim)),
                };
                for tag in parts.filter(|t| !t.is_empty()) {
                    if tag.len() > self.max_length {
                        return Err(Refused::Length);
                    }
                    if seen.insert(tag) {
                        if seen.len() > self.max_per_object {
                            return Err(Refused::Count);
                        }
                        tags.push(tag.into());
                    }
                }
            }
        }
        Ok(tags)
    }

    /// Removes the tag headers from a head going to a client, unless configured to keep them.
    pub fn strip(&self, headers: &mut HeaderMap) {
        if self.to_clients {
            return;
        }
        for (name, _) in &self.headers {
            headers.remove(name);
        }
    }
}

/// A tag's interned id.
pub type TagId = u32;

/// One interned tag: its name and the keys whose entries carry it.
#[derive(Debug)]
struct Slot {
    name: Arc<str>,
    keys: HashSet<KeyHash>,
}

/// Memory one (key, tag) reference holds: its place in the tag's key set (a 16-byte key
/// hash in a hash table, with its control byte and spare capacity; measured ~34 bytes,
/// BENCHMARKS.md) and its 4-byte id in the entry.
pub const REFERENCE_BYTES: usize = 38;

/// Memory one interned name holds beside its bytes: its `Arc` header, its place in the name
/// table (a fat pointer and an id, with spare capacity) and its slot (name and an empty set).
pub const NAME_BYTES: usize = 112;

/// The tag index: tag name -> id -> keys. Owned by the index, under its lock.
#[derive(Debug)]
pub struct TagIndex {
    ids: HashMap<Arc<str>, TagId>,
    slots: Vec<Slot>,
    /// Ids of forgotten tags, reused first.
    free: Vec<TagId>,
    /// References: (key, tag) pairs held.
    references: usize,
    /// Memory held by the names and references indexed ([`NAME_BYTES`] + length a name,
    /// [`REFERENCE_BYTES`] a reference).
    bytes: usize,
    /// Most `bytes` may be.
    budget: usize,
}

impl Default for TagIndex {
    fn default() -> TagIndex {
        TagIndex::new()
    }
}

impl TagIndex {
    /// An empty index without a memory budget.
    pub fn new() -> TagIndex {
        TagIndex::with_budget(usize::MAX)
    }

    /// An empty index whose names and references may hold at most `budget` bytes.
    pub fn with_budget(budget: usize) -> TagIndex {
        TagIndex {
            ids: HashMap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            references: 0,
            bytes: 0,
            budget,
        }
    }

    /// Sets the memory budget (applies to what is registered from now on).
    pub fn set_budget(&mut self, budget: usize) {
        self.budget = budget;
    }

    /// What registering `names` (distinct) for a key not carrying them yet would add.
    fn cost(&self, names: &[Box<str>]) -> usize {
        names
            .iter()
            .map(|n| match self.ids.contains_key(&**n) {
                true => REFERENCE_BYTES,
                false => REFERENCE_BYTES + NAME_BYTES + n.len(),
            })
            .sum()
    }

    /// Records that `key`'s entry carries `names` (distinct); returns their ids, for the
    /// entry to hold and give back to [`TagIndex::unregister`] when it goes. Refused whole
    /// ([`Refused::Memory`], nothing registered) when they would take the index past its
    /// budget: an object indexed with some of its tags would escape a purge by the others.
    pub fn register(&mut self, key: KeyHash, names: &[Box<str>]) -> Result<Box<[TagId]>, Refused> {
        if names.is_empty() {
            return Ok(Box::default());
        }
        let cost = self.cost(names);
        if self.bytes.saturating_add(cost) > self.budget {
            return Err(Refused::Memory);
        }
        let mut ids = Vec::with_capacity(names.len());
        for name in names {
            let id = match self.ids.get(&**name) {
                Some(&id) => id,
                None => self.intern(name),
            };
            if self.slots[id as usize].keys.insert(key) {
                self.references += 1;
                self.bytes += REFERENCE_BYTES;
                ids.push(id);
            }
        }
        Ok(ids.into_boxed_slice())
    }

    fn intern(&mut self, name: &str) -> TagId {
        let name: Arc<str> = name.into();
        self.bytes += NAME_BYTES + name.len();
        let slot = Slot {
            name: name.clone(),
            keys: HashSet::new(),
        };
        let id = match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = slot;
                id
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as TagId
            }
        };
        self.ids.insert(name, id);
        id
    }

    /// Records that `key`'s entry, which carried `ids`, is gone. A tag no entry carries any
    /// more is forgotten.
    pub fn unregister(&mut self, key: &KeyHash, ids: &[TagId]) {
        for &id in ids {
            let Some(slot) = self.slots.get_mut(id as usize) else {
                continue;
            };
            if slot.keys.remove(key) {
                self.references -= 1;
                self.bytes -= REFERENCE_BYTES;
            }
            if slot.keys.is_empty() && !slot.name.is_empty() {
                self.ids.remove(&slot.name);
                self.bytes -= NAME_BYTES + slot.name.len();
                // An emptied slot keeps no memory: its set's table and its name go.
                *slot = Slot {
                    name: Arc::from(""),
                    keys: HashSet::new(),
                };
                self.free.push(id);
            }
        }
    }

    /// The keys carrying any of `names` (each once).
    pub fn keys_with_any(&self, names: &[String]) -> Vec<KeyHash> {
        let mut out: HashSet<KeyHash> = HashSet::new();
        for name in names {
            if let Some(&id) = self.ids.get(name.as_str()) {
                out.extend(self.slots[id as usize].keys.iter().copied());
            }
        }
        out.into_iter().collect()
    }

    /// The names of `ids`.
    pub fn names(&self, ids: &[TagId]) -> Vec<String> {
        ids.iter()
            .filter_map(|&id| self.slots.get(id as usize))
            .map(|s| s.name.to_string())
            .collect()
    }

    /// Distinct tags indexed.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when no tag is indexed.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// (key, tag) references held.
    pub fn references(&self) -> usize {
        self.references
    }

    /// Memory its names and references hold (as counted against the budget).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rules of the default configuration (their defaults live in the config table).
    fn default_rules() -> TagRules {
        crate::cache::testing::defaults().tags
    }
    use http::HeaderValue;

    fn head(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        h
    }

    fn names(tags: &[Box<str>]) -> Vec<&str> {
        tags.iter().map(|t| &**t).collect()
    }

    fn kh(i: u32) -> KeyHash {
        KeyHash::of(&i.to_be_bytes())
    }

    #[test]
    fn both_conventions_split_dedup_and_skip_empties() {
        let rules = default_rules();
        let h = head(&[
            ("surrogate-key", b"  product-42   all\tp "),
            ("surrogate-key", b"all second-line"),
            ("cache-tag", b"tenant-a, ,product-42,, b c"),
        ]);
        let tags = rules.parse(&h).unwrap();
        assert_eq!(
            names(&tags),
            vec!["product-42", "all", "p", "second-line", "tenant-a", "b c"]
        );
        assert!(
            rules
                .parse(&head(&[("surrogate-key", b"   "), ("cache-tag", b",,")]))
                .unwrap()
                .is_empty()
        );
        assert!(rules.parse(&HeaderMap::new()).unwrap().is_empty());
    }

    #[test]
    fn hostile_tag_lists_are_refused_whole_not_truncated() {
        let rules = default_rules();
        let max = rules.max_per_object;
        // One distinct tag past the bound.
        let many: String = (0..=max).map(|i| format!("t{i} ")).collect();
        assert_eq!(
            rules.parse(&head(&[("surrogate-key", many.as_bytes())])),
            Err(Refused::Count)
        );
        // The bound, each repeated 1,000 times: duplicates do not count.
        let repeated: String = (0..max * 1000).map(|i| format!("t{} ", i % max)).collect();
        assert_eq!(
            rules
                .parse(&head(&[("surrogate-key", repeated.as_bytes())]))
                .unwrap()
                .len(),
            max
        );
        // The count spans both headers.
        let half: String = (0..max / 2 + 1).map(|i| format!("a{i} ")).collect();
        let other: String = (0..max / 2 + 1).map(|i| format!("b{i},")).collect();
        let h = head(&[("surrogate-key", half.as_bytes()), ("cache-tag", other.as_bytes())]);
        assert_eq!(rules.parse(&h), Err(Refused::Count));
        let long = "x".repeat(257);
        assert_eq!(
            rules.parse(&head(&[("cache-tag", long.as_bytes())])),
            Err(Refused::Length)
        );
        assert_eq!(
            rules
                .parse(&head(&[("cache-tag", &long.as_bytes()[1..])]))
                .unwrap()
                .len(),
            1
        );
        // Not UTF-8 (obs-text bytes a header value may hold).
        assert_eq!(
            rules.parse(&head(&[("surrogate-key", b"ok \xff\xfe")])),
            Err(Refused::Invalid)
        );
        // UTF-8 beyond ASCII is a tag like any other.
        assert_eq!(
            names(&rules.parse(&head(&[("surrogate-key", "café".as_bytes())])).unwrap()),
            vec!["café"]
        );
    }

    #[test]
    fn configured_headers_are_the_only_ones_read_and_stripped() {
        let rules = TagRules {
            headers: vec![(HeaderName::from_static("x-tags"), Separator::Comma)],
            ..default_rules()
        };
        let mut h = head(&[("x-tags", b"a,b"), ("surrogate-key", b"c")]);
        assert_eq!(names(&rules.parse(&h).unwrap()), vec!["a", "b"]);
        rules.strip(&mut h);
        assert!(!h.contains_key("x-tags") && h.contains_key("surrogate-key"));
        let keep = TagRules {
            to_clients: true,
            ..rules
        };
        let mut h = head(&[("x-tags", b"a")]);
        keep.strip(&mut h);
        assert!(h.contains_key("x-tags"));
    }

    #[test]
    fn the_index_finds_keys_by_any_tag_and_forgets_unused_names() {
        let mut ix = TagIndex::new();
        let t = |s: &[&str]| s.iter().map(|n| Box::<str>::from(*n)).collect::<Vec<_>>();
        let a = ix.register(kh(1), &t(&["red", "big"])).unwrap();
        let b = ix.register(kh(2), &t(&["red"])).unwrap();
        let c = ix.register(kh(3), &t(&["blue"])).unwrap();
        assert_eq!((ix.len(), ix.references()), (3, 4));
        let mut red = ix.keys_with_any(&["red".into()]);
        red.sort();
        let mut want = vec![kh(1), kh(2)];
        want.sort();
        assert_eq!(red, want);
        assert_eq!(ix.keys_with_any(&["big".into(), "blue".into(), "none".into()]).len(), 2);
        assert_eq!(ix.names(&a), vec!["red", "big"]);
        ix.unregister(&kh(1), &a);
        ix.unregister(&kh(3), &c);
        // "big" and "blue" are carried by nothing now: forgotten, their ids free for reuse.
        assert_eq!((ix.len(), ix.references()), (1, 1));
        assert!(ix.keys_with_any(&["big".into()]).is_empty());
        let d = ix.register(kh(4), &t(&["green"])).unwrap();
        assert!(d[0] == a[1] || d[0] == c[0], "a freed id is reused");
        assert_eq!(ix.keys_with_any(&["green".into()]), vec![kh(4)]);
        ix.unregister(&kh(2), &b);
        ix.unregister(&kh(4), &d);
        assert_eq!((ix.len(), ix.references(), ix.bytes()), (0, 0, 0));
    }

    #[test]
    fn the_memory_budget_refuses_whole_tag_lists_and_counts_a_repeated_name_once() {
        let t = |s: &[&str]| s.iter().map(|n| Box::<str>::from(*n)).collect::<Vec<_>>();
        let long = |i: usize| format!("{i:0>200}");
        // Room for two objects' four long names and forty references to them, not a third's.
        let one = 4 * (NAME_BYTES + 200 + REFERENCE_BYTES);
        let shared = 10 * 4 * REFERENCE_BYTES;
        let mut ix = TagIndex::with_budget(2 * one + shared + one / 2);
        let names = |o: usize| {
            let owned: Vec<String> = (0..4).map(|j| long(o * 10 + j)).collect();
            t(&owned.iter().map(String::as_str).collect::<Vec<_>>())
        };
        let a = ix.register(kh(1), &names(1)).unwrap();
        let b = ix.register(kh(2), &names(2)).unwrap();
        assert_eq!(ix.bytes(), 2 * one);
        // A name already held costs only its reference: the same four names for many keys.
        for k in 10..20 {
            ix.register(kh(k), &names(1)).unwrap();
        }
        assert_eq!(ix.bytes(), 2 * one + shared);
        assert_eq!(ix.register(kh(3), &names(3)), Err(Refused::Memory));
        assert_eq!(
            (ix.len(), ix.references(), ix.bytes()),
            (8, 48, 2 * one + shared),
            "nothing of it held"
        );
        // Forgetting gives the memory back.
        ix.unregister(&kh(2), &b);
        ix.unregister(&kh(1), &a);
        for k in 10..20 {
            let ids: Vec<TagId> = (0..4).map(|j| ix.ids[&*long(10 + j)]).collect();
            ix.unregister(&kh(k), &ids);
        }
        assert_eq!(ix.bytes(), 0);
        assert!(ix.register(kh(3), &names(3)).is_ok());
    }
}
