//! The in-memory index of what is on disk: one entry per stored object (one file each), in
//! segmented LRU order, and the byte and object budget.
//!
//! Eviction order is a segmented LRU (as in memcached, and the kernel's active and inactive
//! page lists): a new entry starts in the probation segment; once hit it goes to the protected
//! one, which holds at most [`PROTECTED_SHARE`] of the bytes, its least recently promoted
//! entries going back to probation. Eviction takes probation's least recently used first. What
//! it adds is that objects asked for once (a crawler, a burst of one-off URLs) are evicted
//! before objects asked for again, however recent.
//!
//! Promotion is lazy (as CLOCK, and S3-FIFO's main queue): a hit only marks its entry, and
//! eviction, meeting a marked entry, promotes it (in probation) or gives it another turn (in
//! protected) instead of evicting it ([`Index::pop_lru`]). A hit, the most frequent operation,
//! reorders no list and holds the lock for one lookup; the reordering is done once per entry
//! per eviction pass, by the eviction. Simulated on the churn and CDN workloads, the hit ratio
//! is the same as with a move on every hit (`benches/load/lru_sim.py`, `SLRU+sized+lazy`).
//!
//! Bytes are accounted as `used` (committed files), `reserved` (fills in progress) and
//! `unlinking` (removed from the index, not yet off the disk). Their sum is what the disk may
//! hold at any instant; a reservation is granted only while that sum stays within the budget.
//! One that does not fit makes room: least recently used entries are evicted for it, and the
//! part of it their files still hold is granted once they are off the disk
//! ([`Index::reserve_room`]). So a fill is refused only when it could never fit, or when the
//! room is held by other fills in progress; never because of where the watermarks are.
//!
//! The bytes are what the disk spends, not what the files hold: each file is charged its
//! length rounded up to the filesystem's allocation unit, at least one unit ([`charge`]), and
//! the layout's directories a fixed `overhead`. Objects are counted in the same four states,
//! so their number (files, inodes, index memory) is bounded as the bytes are.
//! This module does no I/O: it says which files to remove, the caller removes them and then
//! reports [`Index::unlinked`].
//!
//! Beside the entries, and changed in the same steps (so under the same lock): the tag index
//! ([`TagIndex`]: which keys carry which tags, for purge by tag; an entry's tags are indexed
//! by [`Index::insert_tagged`] and forgotten whenever the entry leaves, however it leaves),
//! the soft-purge marks (a key's version marked stale and when; a mark goes with its version)
//! and each entry's hit count (for `inspect`).

use std::collections::HashMap;

use lru::LruCache;

use crate::cache::key::{Digest, KeyHash};
pub use crate::cache::segments::Place;
use crate::cache::tags::{self, TagId, TagIndex};
use crate::negotiate::Coding;

/// One stored image: a body and what follows it (an object's record and footer; a variant's
/// footer), where it is, and what its bytes must be. An object's and each of its compressed
/// variants' are one type: every read, check, charge and removal takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Its version: the object's, or the variant's own (a 304 refresh carries a variant over
    /// to the object's new version unchanged).
    pub generation: u64,
    /// Body length: the body is the image's first bytes.
    pub body_len: u64,
    /// Length of what follows the body.
    pub tail_len: u64,
    /// Where it is: a file of its own, or a slot in a segment.
    pub place: Place,
    /// The body's content hash.
    pub digest: Digest,
    /// The body's hash has been checked since this process started (at `mtime`).
    pub verified: bool,
    /// The file's modification time (ns) when it was written or last checked: images are
    /// never written after they are placed, so a different one means someone else changed it.
    pub mtime: u64,
}

impl Image {
    /// The image's length (its file's, when it has one).
    pub fn file_len(&self) -> u64 {
        self.body_len + self.tail_len
    }

    /// What its place stores: the image, and a slot's prefix.
    pub fn stored_len(&self) -> u64 {
        self.file_len() + self.place.overhead()
    }
}

/// One stored version of a key: its object's image, its variants, its tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The full key (for purge by path or prefix, and collision checks).
    pub key: Box<str>,
    /// The object's image (body and record).
    pub image: Image,
    /// Its compressed variants: images of their own, charged, evicted and purged with it.
    pub variants: Box<[Variant]>,
    /// Its tags' ids in the index's [`TagIndex`]: set by [`Index::insert_tagged`], whatever
    /// an entry is built with.
    pub tags: Box<[TagId]>,
    /// Lookups that found it since it was indexed (saturating).
    pub hits: u32,
    /// Hit since eviction last looked at it (segmented order: a hit only sets this; the entry
    /// is promoted, or given a second turn, when room is made).
    pub marked: bool,
}

impl Entry {
    /// The variant in `coding`, if one is stored.
    pub fn variant(&self, coding: Coding) -> Option<&Variant> {
        self.variants.iter().find(|v| v.coding == coding)
    }
}

/// A copy of one entry as it is now, with its tags' names and its soft-purge mark (what
/// `inspect` reports): [`Index::snapshot`].
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The key's hash.
    pub key: KeyHash,
    /// Its entry.
    pub entry: Entry,
    /// Its tags.
    pub tags: Vec<String>,
    /// When its version was soft-purged (ms since the epoch), if it was.
    pub mark: Option<u64>,
}

/// What [`Index::insert_tagged`] did.
#[derive(Debug)]
#[must_use]
pub struct Inserted {
    /// The previous version of the key (or the found file, at startup), for removal.
    pub removed: Option<Removed>,
    /// Why the entry's tags were not indexed: it is in the index untagged, for the caller to
    /// take out again in the same step.
    pub refused: Option<tags::Refused>,
}

/// A compressed variant of an object (`<keyhash>.<generation>.<ext>` in a file of its own, or a
/// slot), made from the object's body once it was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variant {
    /// Its content coding.
    pub coding: Coding,
    /// Its image (the coded body).
    pub image: Image,
}

/// What a hit found ([`Index::hit`]): the versions and length a tier's lookup needs, and not
/// where the images are. Copying that (a reference on a segment's slot) would touch the slot's
/// memory, cold in the CPU's caches, under the lock every hit takes, for a body a tier holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// The object's version.
    pub generation: u64,
    /// The body to read: a variant's coding, or `None` for the identity body...
    pub coding: Option<Coding>,
    /// ...its image's version (the object's, or the variant's own)...
    pub span_generation: u64,
    /// ...and its length.
    pub body_len: u64,
}

impl Found {
    /// The variant's own version; 0 for the identity body (which has the object's).
    pub fn variant_version(&self) -> u64 {
        self.coding.map_or(0, |_| self.span_generation)
    }
}

/// An object an index change made unreachable (its file and its variants' files): the caller
/// unlinks them, then calls [`Index::unlinked`] with `bytes` and one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    /// The key's hash.
    pub key: KeyHash,
    /// The object's version.
    pub generation: u64,
    /// Where its image was.
    pub place: Place,
    /// Bytes its files are charged.
    pub bytes: u64,
    /// Its variants removed with it: coding, version and place.
    pub variants: Vec<(Coding, u64, Place)>,
}

/// What [`Index::reserve_room`] granted: at once when `victims` is empty; otherwise once the
/// victims' files are off the disk and [`Index::room_made`] is told.
#[derive(Debug)]
pub struct Room {
    /// Entries evicted to make the room, least recently used first.
    pub victims: Vec<Removed>,
    /// Bytes and objects of the reservation granted only by [`Index::room_made`].
    pub held: (u64, u64),
}

/// A reservation [`Index::reserve_room`] refused.
#[derive(Debug)]
pub struct Refused {
    /// `"budget"`, `"objects"` (could never fit), `"room"` (none could be made now) or
    /// `"admission"` (a full cache declined a new object: `budget::Budget::reserve_new`).
    pub reason: &'static str,
    /// Entries evicted before the refusal showed: their files are the caller's to remove.
    pub victims: Vec<Removed>,
}

/// Entries [`Index::next_victims`] looks at, per victim it may name: when that many are mostly
/// marked, admission weighs the fill against the marked ones it met.
const VICTIM_SCAN: usize = 8;

/// Most of the indexed bytes the protected segment holds.
const PROTECTED_SHARE: f64 = 0.8;

/// The order entries are evicted in (the configuration's `eviction`: `segmented-lru`, `lru`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Order {
    /// Segmented LRU: what was hit since it was stored goes after what was not.
    #[default]
    #[serde(rename = "segmented-lru")]
    Segmented,
    /// Plain LRU, one list: a hit makes an entry the most recently used, nothing more. The
    /// order before issue 26, kept to measure the segmented one against on the real store.
    Lru,
}

/// Past this many bytes a file is charged one more unit per as many bytes: room for the block
/// map of large files (ext4 needs an extent block beyond four extents of up to 128 MiB).
const MAP_EVERY: u64 = 32 << 20;

/// What the disk spends on a file of `len` bytes with allocation unit `unit`: its length
/// rounded up to whole units, and at least one unit even when empty (which stands for the
/// inode, and for a file no smaller than a unit on most filesystems). The directory entries
/// are charged with the layout's directories, not here.
pub fn charge(len: u64, unit: u64) -> u64 {
    let unit = unit.max(1);
    (len.div_ceil(unit).max(1) + len / MAP_EVERY).saturating_mul(unit)
}

/// The index.
pub struct Index {
    /// Entries not hit since they were stored (or demoted): evicted first.
    probation: LruCache<KeyHash, Entry>,
    /// Entries hit since they were stored.
    protected: LruCache<KeyHash, Entry>,
    /// Bytes of the protected entries ([`weight`]).
    protected_bytes: u64,
    used: u64,
    reserved: u64,
    unlinking: u64,
    unindexed: u64,
    /// The allocation unit files are charged in ([`charge`]).
    unit: u64,
    /// Bytes the layout (its directories) spends whatever is stored.
    overhead: u64,
    /// Objects reserved by fills in progress.
    reserved_objects: u64,
    /// Objects removed from the index whose files are not off the disk yet.
    unlinking_objects: u64,
    /// Objects (records) found at startup, not indexed yet.
    unindexed_objects: u64,
    /// Bytes and objects reservations hold back until their victims are off the disk
    /// ([`Index::reserve_room`]).
    holding: (u64, u64),
    /// Which keys carry which tags: changed with the entries, in the same step.
    tags: TagIndex,
    /// Soft-purge marks: key -> (the generation marked, when, in ms since the epoch). A mark
    /// holds for that version only: a new version of the key (a refresh, a fill) is not
    /// marked, and the mark goes with the entry.
    marks: HashMap<KeyHash, (u64, u64)>,
    /// What a hit does to the order ([`Index::touch`]).
    order: Order,
}

impl Default for Index {
    fn default() -> Self {
        Index::new()
    }
}

impl Index {
    /// An empty index.
    pub fn new() -> Index {
        Index {
            probation: LruCache::unbounded(),
            protected: LruCache::unbounded(),
            protected_bytes: 0,
            used: 0,
            reserved: 0,
            unlinking: 0,
            unindexed: 0,
            unit: 1,
            overhead: 0,
            reserved_objects: 0,
            unlinking_objects: 0,
            unindexed_objects: 0,
            holding: (0, 0),
            tags: TagIndex::new(),
            marks: HashMap::new(),
            order: Order::Segmented,
        }
    }

    /// Sets the eviction order (before anything is indexed: entries stay where they are).
    pub fn set_order(&mut self, order: Order) {
        self.order = order;
    }

    /// Sets the allocation unit files are charged in and the layout's fixed overhead (bytes).
    /// Called once the directory is open, before anything is reserved or found.
    pub fn set_disk(&mut self, unit: u64, overhead: u64) {
        self.unit = unit.max(1);
        self.overhead = overhead;
    }

    /// What a file of `len` bytes is charged ([`charge`] in this index's unit).
    pub fn charge(&self, len: u64) -> u64 {
        charge(len, self.unit)
    }

    /// The bytes an entry stands for: its file and its variants' files, as charged.
    fn weight(&self, e: &Entry) -> u64 {
        self.charge(e.image.stored_len())
            + e.variants
                .iter()
                .map(|v| self.charge(v.image.stored_len()))
                .sum::<u64>()
    }

    /// Objects the disk may hold right now: indexed, being filled, being unlinked, and found
    /// at startup but not indexed yet. An object's compressed variants are not counted here:
    /// they are charged in bytes only, each file at least one allocation unit (so the bytes
    /// bound their files too), and a compressible object with its three variants is one
    /// object against `max_objects`, not four.
    pub fn objects(&self) -> u64 {
        self.len() as u64 + self.reserved_objects + self.unlinking_objects + self.unindexed_objects
    }

    /// Objects indexed.
    pub fn len(&self) -> usize {
        self.probation.len() + self.protected.len()
    }

    /// True when nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.probation.is_empty() && self.protected.is_empty()
    }

    /// Bytes of committed files, and the layout's overhead.
    pub fn used(&self) -> u64 {
        self.used + self.overhead
    }

    /// Bytes reserved by fills in progress.
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// Everything the disk may hold right now: committed, reserved, being unlinked, and found
    /// at startup but not indexed yet.
    pub fn usage(&self) -> u64 {
        self.used + self.overhead + self.reserved + self.unlinking + self.unindexed
    }

    /// Looks up an entry and marks it used (a hit counts as a use): in segmented order it is
    /// marked, for eviction to promote it to the protected segment (or, there, give it another
    /// turn) instead of evicting it; in plain LRU order it becomes probation's most recently
    /// used (nothing is ever protected). Returns whether it was found.
    #[cfg(test)]
    pub fn touch(&mut self, key: &KeyHash) -> bool {
        self.touch_with(key, |_| Some(())).is_some()
    }

    /// [`Index::touch`] when `read` takes something from the entry (`None`: not a use, such as
    /// a collision, and nothing is marked or counted). In segmented order a hit is one lookup
    /// that reorders nothing (the promotion waits for eviction: [`Index::pop_lru`]); in plain
    /// LRU order the entry moves to the front either way.
    fn touch_with<R>(&mut self, key: &KeyHash, read: impl FnOnce(&Entry) -> Option<R>) -> Option<R> {
        let entry = match self.order {
            Order::Lru => self.probation.get_mut(key)?,
            Order::Segmented => match self.protected.peek_mut(key) {
                Some(e) => e,
                None => self.probation.peek_mut(key)?,
            },
        };
        let found = read(entry)?;
        entry.hits = entry.hits.saturating_add(1);
        entry.marked = self.order == Order::Segmented;
        Some(found)
    }

    /// Moves protected's least recently promoted entries back to probation while the segment
    /// holds more than its share of the bytes; a marked one is given another turn instead
    /// (unmarked, at the most recent end).
    fn keep_protected_share(&mut self) {
        let cap = (self.used as f64 * PROTECTED_SHARE) as u64;
        while self.protected_bytes > cap && self.protected.len() > 1 {
            let (k, mut e) = self.protected.pop_lru().expect("more than one entry");
            if std::mem::take(&mut e.marked) {
                self.protected.push(k, e);
                continue;
            }
            self.protected_bytes -= self.weight(&e);
            self.probation.push(k, e);
        }
    }

    /// A hit on `key`'s entry stored for the full key `full` (a hash names one key; a collision
    /// is a miss): marked used ([`Index::touch`]), and what a tier's lookup needs ([`Found`]:
    /// the object's version, and the variant `choose` picks among the stored ones), with its
    /// soft-purge mark. Where the images are is left for [`Index::images`], asked only when no
    /// tier holds the body.
    pub fn hit(
        &mut self,
        key: &KeyHash,
        full: &str,
        choose: impl FnOnce(&Entry) -> Option<Coding>,
    ) -> Option<(Found, Option<u64>)> {
        let found = self.touch_with(key, |e| {
            (&*e.key == full).then(|| {
                let variant = choose(e).and_then(|c| e.variant(c));
                let image = variant.map_or(&e.image, |v| &v.image);
                Found {
                    generation: e.image.generation,
                    coding: variant.map(|v| v.coding),
                    span_generation: image.generation,
                    body_len: image.body_len,
                }
            })
        })?;
        let mark = self.mark_of(key, found.generation);
        Some((found, mark))
    }

    /// The images of what a hit found (the object's, and the variant's when it found one),
    /// with where they are, if `key` still holds those versions (not a hit: not marked again).
    pub fn images(&self, key: &KeyHash, found: &Found) -> Option<(Image, Option<Variant>)> {
        let e = self.peek(key).filter(|e| e.image.generation == found.generation)?;
        let variant = match found.coding {
            None => None,
            Some(coding) => Some(
                e.variant(coding)
                    .filter(|v| v.image.generation == found.span_generation)?
                    .clone(),
            ),
        };
        Some((e.image.clone(), variant))
    }

    /// Copies of the first `max` of these keys' entries (those still stored) that `keep`
    /// keeps, without changing the LRU order.
    pub fn snapshot(&self, keys: &[KeyHash], keep: impl Fn(&Entry) -> bool, max: usize) -> Vec<Snapshot> {
        keys.iter()
            .filter_map(|k| {
                let e = self.peek(k).filter(|e| keep(e))?;
                Some(Snapshot {
                    key: *k,
                    entry: e.clone(),
                    tags: self.tag_names(e),
                    mark: self.mark_of(k, e.image.generation),
                })
            })
            .take(max)
            .collect()
    }

    /// Whether `key` still holds version `generation` (and, unless `variant` is 0, the variant
    /// of that version): a tier must not keep what was evicted, purged or replaced meanwhile.
    pub fn holds(&self, key: &KeyHash, generation: u64, variant: u64) -> bool {
        self.peek(key).is_some_and(|e| {
            e.image.generation == generation
                && (variant == 0 || e.variants.iter().any(|v| v.image.generation == variant))
        })
    }

    /// The keys next in line for eviction, in that order, with the bytes each stands for:
    /// enough of them to cover `bytes`, and never more than `most`.
    ///
    /// Marked entries would be promoted or turned over, not evicted: the unmarked ones come
    /// first, in order, then (only if they do not cover it) the marked ones met on the way.
    /// One pass, of at most [`VICTIM_SCAN`] times `most` entries: this runs under the lock
    /// every hit takes, and a cache whose entries are nearly all marked must not be walked
    /// whole for each fill.
    pub fn next_victims(&self, bytes: u64, most: usize) -> Vec<(KeyHash, u64)> {
        let mut victims = Vec::new();
        let mut marked = Vec::new();
        let mut covered = 0u64;
        let order = self.probation.iter().rev().chain(self.protected.iter().rev());
        for (key, e) in order.take(most.saturating_mul(VICTIM_SCAN)) {
            if covered >= bytes || victims.len() >= most {
                return victims;
            }
            let weight = self.weight(e);
            if e.marked {
                if marked.len() < most {
                    marked.push((*key, weight));
                }
                continue;
            }
            covered = covered.saturating_add(weight);
            victims.push((*key, weight));
        }
        for (key, weight) in marked {
            if covered >= bytes || victims.len() >= most {
                break;
            }
            covered = covered.saturating_add(weight);
            victims.push((key, weight));
        }
        victims
    }

    /// Looks up an entry without changing the LRU order.
    pub fn peek(&self, key: &KeyHash) -> Option<&Entry> {
        self.protected.peek(key).or_else(|| self.probation.peek(key))
    }

    /// Takes an entry out of whichever segment holds it; true when that was the protected one.
    fn take(&mut self, key: &KeyHash) -> Option<(Entry, bool)> {
        if let Some(e) = self.protected.pop(key) {
            self.protected_bytes -= self.weight(&e);
            return Some((e, true));
        }
        self.probation.pop(key).map(|e| (e, false))
    }

    /// Records that an entry's body hash was checked, with the file's modification time then.
    pub fn mark_verified(&mut self, key: &KeyHash, generation: u64, mtime: u64) {
        if let Some(e) = self.protected.peek_mut(key).or_else(|| self.probation.peek_mut(key))
            && e.image.generation == generation
        {
            e.image.verified = true;
            e.image.mtime = mtime;
        }
    }

    /// Reserves `bytes` and `objects` for a fill, making room when they do not fit: the least
    /// recently used entries are removed until they would ([`Room::victims`], whose files the
    /// caller removes). What the victims' files still hold is granted only once they are off
    /// the disk ([`Index::room_made`]), so `usage()` never passes `budget` nor `objects()`
    /// `max_objects` on their account, in between or after.
    ///
    /// Refused, with the reason, when the reservation could never fit (`"budget"`: more than
    /// the budget less the layout; `"objects"`: more than the object bound), or when evicting
    /// every entry would not make the room (`"room"`: it is held by fills in progress, files
    /// being removed, or files found at startup and not indexed yet). Nothing is evicted for
    /// a refusal but in one case: a body counted before its entry is inserted (a commit in
    /// progress) is not freed by evicting, and what was evicted before that shows is returned
    /// in the refusal.
    pub fn reserve_room(&mut self, bytes: u64, objects: u64, budget: u64, max_objects: u64) -> Result<Room, Refused> {
        let refuse = |reason| {
            Err(Refused {
                reason,
                victims: Vec::new(),
            })
        };
        if self.overhead.saturating_add(bytes) > budget {
            return refuse("budget");
        }
        if objects > max_objects {
            return refuse("objects");
        }
        let over = self.usage().saturating_add(bytes).saturating_sub(budget);
        let over_objects = (self.objects() + objects).saturating_sub(max_objects);
        // Evicting frees committed bytes and indexed objects, nothing else.
        if over > self.used || over_objects > self.len() as u64 {
            return refuse("room");
        }
        let mut victims = Vec::new();
        let (mut freed, mut freed_objects) = (0u64, 0u64);
        while freed < over || freed_objects < over_objects {
            let Some(r) = self.pop_lru() else {
                return Err(Refused {
                    reason: "room",
                    victims,
                });
            };
            freed += r.bytes;
            freed_objects += 1;
            victims.push(r);
        }
        // The victims stay counted (as unlinking) until they are off the disk: until then the
        // reservation holds back what would take it over the budget.
        let held = (over.min(bytes), over_objects.min(objects));
        self.reserved += bytes - held.0;
        self.reserved_objects += objects - held.1;
        self.holding.0 += held.0;
        self.holding.1 += held.1;
        Ok(Room { victims, held })
    }

    /// Reports that the files of a [`Room`]'s victims are off the disk, and grants what the
    /// reservation held back: one step, so no other reservation takes the room in between.
    pub fn room_made(&mut self, victims: (u64, u64), held: (u64, u64)) {
        self.unlinked(victims.0, victims.1);
        self.reserved += held.0;
        self.reserved_objects += held.1;
        self.holding.0 = self.holding.0.saturating_sub(held.0);
        self.holding.1 = self.holding.1.saturating_sub(held.1);
    }

    /// What `usage()` and `objects()` will be once what is being removed is off the disk (and
    /// the reservations waiting for that have what they hold back): what the eviction loop
    /// goes by, so that it does not evict again what a fill has just evicted for its room.
    pub fn settled(&self) -> (u64, u64) {
        (
            self.usage() - self.unlinking + self.holding.0,
            self.objects() - self.unlinking_objects + self.holding.1,
        )
    }

    /// Returns what a reservation took: `bytes` and `objects`.
    pub fn release_reservation(&mut self, bytes: u64, objects: u64) {
        self.release(bytes);
        self.reserved_objects = self.reserved_objects.saturating_sub(objects);
    }

    /// Returns reserved bytes a fill will not use.
    pub fn release(&mut self, bytes: u64) {
        self.reserved = self.reserved.saturating_sub(bytes);
    }

    /// Returns an object reserved by [`Index::reserve_room`]: its fill ended, whether its
    /// entry was inserted (then it is counted as indexed) or not.
    pub fn release_object(&mut self) {
        self.reserved_objects = self.reserved_objects.saturating_sub(1);
    }

    /// Inserts a committed object, converting `from_reserved` reserved bytes (its file, as
    /// charged). A previous version of the key is returned for removal; the new one takes its
    /// segment (a new key starts in probation). The new entry keeps only those of its
    /// `variants` the previous version has (a refresh carries them over): they stay charged
    /// once, and are not removed with the previous version.
    pub fn insert(&mut self, key: KeyHash, entry: Entry, from_reserved: u64) -> Option<Removed> {
        self.insert_tagged(key, entry, from_reserved, &[]).removed
    }

    /// [`Index::insert`] of an entry carrying `tags` (distinct): they are indexed with it, in
    /// the same step. Tags the tag index has no memory left for are refused whole: the entry
    /// is then indexed without them, and the caller takes it out again under the same lock
    /// ([`Inserted::refused`]; never left to be found by anything but that removal).
    pub fn insert_tagged(&mut self, key: KeyHash, mut entry: Entry, from_reserved: u64, tags: &[Box<str>]) -> Inserted {
        self.release(from_reserved);
        entry.hits = 0;
        let old = self.take(&key);
        if !entry.variants.is_empty() {
            // As the previous version has them now (checked since, perhaps).
            let carried = |v: &Variant| {
                old.as_ref()
                    .and_then(|(o, _)| o.variants.iter().find(|x| x.image.generation == v.image.generation))
                    .cloned()
            };
            entry.variants = entry.variants.iter().filter_map(carried).collect();
        }
        // (Carried variants stay charged: the old version's removal leaves them out.)
        self.used += self.charge(entry.image.stored_len());
        // The old version's tags go before the new one's are indexed: they may share some.
        let old = old.map(|(old, protected)| (self.account_removal(key, old, &entry.variants), protected));
        let refused = match self.tags.register(key, tags) {
            Ok(ids) => {
                entry.tags = ids;
                None
            }
            Err(why) => {
                entry.tags = Box::default();
                Some(why)
            }
        };
        match old {
            Some((_, true)) => {
                self.protected_bytes += self.weight(&entry);
                self.protected.push(key, entry);
            }
            _ => {
                self.probation.push(key, entry);
            }
        }
        Inserted {
            removed: old.map(|(removed, _)| removed),
            refused,
        }
    }

    /// Adds a variant to the entry of `key` if it is still the version `generation` and has
    /// none in that coding yet, converting `from_reserved` reserved bytes (its file, as
    /// charged). False otherwise, with the reserved bytes given back in the same step: the
    /// caller removes the file.
    pub fn add_variant(&mut self, key: &KeyHash, generation: u64, variant: Variant, from_reserved: u64) -> bool {
        let bytes = self.charge(variant.image.stored_len());
        let (entry, protected) = match self.protected.peek_mut(key) {
            Some(e) => (Some(e), true),
            None => (self.probation.peek_mut(key), false),
        };
        let Some(entry) = entry.filter(|e| e.image.generation == generation && e.variant(variant.coding).is_none())
        else {
            self.release(from_reserved);
            return false;
        };
        let mut variants = std::mem::take(&mut entry.variants).into_vec();
        variants.push(variant);
        entry.variants = variants.into_boxed_slice();
        if protected {
            self.protected_bytes += bytes;
        }
        self.release(from_reserved);
        self.used += bytes;
        true
    }

    /// Adds a variant found on disk at startup (counted as unindexed until now) to the entry
    /// of `key` if its body is the one the variant was made from. False otherwise: the caller
    /// removes the file and stops counting it.
    pub fn add_scanned_variant(&mut self, key: &KeyHash, made_from: (Digest, u64), variant: Variant) -> bool {
        let matches = self
            .peek(key)
            .is_some_and(|e| (e.image.digest, e.image.body_len) == made_from && e.variant(variant.coding).is_none());
        if !matches {
            return false;
        }
        let (generation, bytes) = (
            self.peek(key).map_or(0, |e| e.image.generation),
            self.charge(variant.image.stored_len()),
        );
        self.forget_unindexed(bytes);
        // Counted as a reservation for `add_variant` to convert.
        self.reserved += bytes;
        self.add_variant(key, generation, variant, bytes)
    }

    /// Records that a variant's body hash was checked, with its file's modification time then.
    pub fn mark_variant_verified(&mut self, key: &KeyHash, variant_generation: u64, mtime: u64) {
        if let Some(e) = self.protected.peek_mut(key).or_else(|| self.probation.peek_mut(key)) {
            let mut variants = std::mem::take(&mut e.variants).into_vec();
            for v in variants.iter_mut().filter(|v| v.image.generation == variant_generation) {
                v.image.verified = true;
                v.image.mtime = mtime;
            }
            e.variants = variants.into_boxed_slice();
        }
    }

    /// Counts bytes (as charged) and objects found on disk at startup that are not indexed
    /// yet: they are on the disk, so they count against the budget until indexed or removed.
    pub fn add_unindexed(&mut self, bytes: u64, objects: u64) {
        self.unindexed += bytes;
        self.unindexed_objects += objects;
    }

    /// Stops counting unindexed bytes (removed, or found to be gone).
    pub fn forget_unindexed(&mut self, bytes: u64) {
        self.unindexed = self.unindexed.saturating_sub(bytes);
    }

    /// Stops counting unindexed objects (each record found is indexed or removed).
    pub fn forget_unindexed_objects(&mut self, objects: u64) {
        self.unindexed_objects = self.unindexed_objects.saturating_sub(objects);
    }

    /// Inserts an entry found on disk at startup (counted as unindexed until now), unless the
    /// index already holds a newer version of the key: then the found file is returned for
    /// removal.
    pub fn insert_scanned(&mut self, key: KeyHash, entry: Entry) -> Option<Removed> {
        self.insert_scanned_tagged(key, entry, &[]).removed
    }

    /// [`Index::insert_scanned`] of an entry carrying `tags` (refused as
    /// [`Index::insert_tagged`] refuses them).
    pub fn insert_scanned_tagged(&mut self, key: KeyHash, entry: Entry, tags: &[Box<str>]) -> Inserted {
        let bytes = self.weight(&entry);
        self.forget_unindexed(bytes);
        if let Some(existing) = self.peek(&key)
            && existing.image.generation >= entry.image.generation
        {
            self.unlinking += bytes;
            self.unlinking_objects += 1;
            let removed = Removed {
                key,
                generation: entry.image.generation,
                place: entry.image.place.clone(),
                bytes,
                variants: Vec::new(),
            };
            return Inserted {
                removed: Some(removed),
                refused: None,
            };
        }
        self.insert_tagged(key, entry, 0, tags)
    }

    /// Removes one key's entry.
    pub fn remove(&mut self, key: &KeyHash) -> Option<Removed> {
        let (old, _) = self.take(key)?;
        Some(self.account_removal(*key, old, &[]))
    }

    /// Removes `key`'s entry if it is stored for the full key `full` (a hash that is the key's
    /// own, not a variant's, may still collide).
    pub fn remove_named(&mut self, key: &KeyHash, full: &str) -> Option<Removed> {
        if self.peek(key).is_none_or(|e| *e.key != *full) {
            return None;
        }
        self.remove(key)
    }

    /// Removes the entries of these keys (those still stored).
    pub fn remove_all(&mut self, keys: &[KeyHash]) -> Vec<Removed> {
        keys.iter().filter_map(|k| self.remove(k)).collect()
    }

    /// Removes the next entry to evict: probation's least recently used, else protected's.
    /// Marked entries met on the way are not evicted: one in probation is promoted to the
    /// protected segment, one in protected gets another turn (each unmarked). Each step clears
    /// a mark, so a pass ends; its work is the hits since the last, not a list reordered per hit.
    pub fn pop_lru(&mut self) -> Option<Removed> {
        let (key, old) = loop {
            if let Some((k, mut e)) = self.probation.pop_lru() {
                if !std::mem::take(&mut e.marked) {
                    break (k, e);
                }
                self.protected_bytes += self.weight(&e);
                self.protected.push(k, e);
                self.keep_protected_share();
                continue;
            }
            let (k, mut e) = self.protected.pop_lru()?;
            if std::mem::take(&mut e.marked) {
                self.protected.push(k, e);
                continue;
            }
            self.protected_bytes -= self.weight(&e);
            break (k, e);
        };
        Some(self.account_removal(key, old, &[]))
    }

    /// Keys whose entry matches `pred`, in eviction order.
    pub fn keys_where(&self, mut pred: impl FnMut(&Entry) -> bool) -> Vec<KeyHash> {
        self.probation
            .iter()
            .rev()
            .chain(self.protected.iter().rev())
            .filter(|(_, e)| pred(e))
            .map(|(k, _)| *k)
            .collect()
    }

    /// Accounts an entry taken out of the index as being removed, but for the variants in
    /// `kept` (carried over to its next version).
    fn account_removal(&mut self, key: KeyHash, old: Entry, kept: &[Variant]) -> Removed {
        self.tags.unregister(&key, &old.tags);
        if !self.marks.is_empty() && self.marks.get(&key).is_some_and(|m| m.0 == old.image.generation) {
            self.marks.remove(&key);
        }
        let mut bytes = self.charge(old.image.stored_len());
        let mut variants = Vec::new();
        for v in old.variants.iter() {
            if kept.iter().any(|k| k.image.generation == v.image.generation) {
                continue;
            }
            bytes += self.charge(v.image.stored_len());
            variants.push((v.coding, v.image.generation, v.image.place.clone()));
        }
        self.used -= bytes;
        self.unlinking += bytes;
        self.unlinking_objects += 1;
        Removed {
            key,
            generation: old.image.generation,
            place: old.image.place.clone(),
            bytes,
            variants,
        }
    }

    /// Keys whose entries carry any of `tags`.
    pub fn keys_tagged(&self, tags: &[String]) -> Vec<KeyHash> {
        self.tags.keys_with_any(tags)
    }

    /// The names of an entry's tags.
    pub fn tag_names(&self, entry: &Entry) -> Vec<String> {
        self.tags.names(&entry.tags)
    }

    /// (distinct tags, (key, tag) references) indexed.
    pub fn tag_stats(&self) -> (usize, usize) {
        (self.tags.len(), self.tags.references())
    }

    /// Memory the tag index holds, as counted against its budget.
    pub fn tag_bytes(&self) -> usize {
        self.tags.bytes()
    }

    /// Sets the tag index's memory budget (`max_tag_index_memory`).
    pub fn set_tag_budget(&mut self, bytes: u64) {
        self.tags.set_budget(usize::try_from(bytes).unwrap_or(usize::MAX));
    }

    /// Marks a key's current version stale as of `at_ms` (soft purge); a version marked
    /// already keeps its earlier mark. Returns the generation marked when it is newly so,
    /// `None` when there is no entry or it was marked already.
    pub fn mark_stale(&mut self, key: &KeyHash, at_ms: u64) -> Option<u64> {
        let generation = self.peek(key)?.image.generation;
        match self.marks.get(key) {
            Some(&(marked, _)) if marked == generation => None,
            _ => {
                self.marks.insert(*key, (generation, at_ms));
                Some(generation)
            }
        }
    }

    /// Marks these keys' entries stale as of `at_ms` ([`Index::mark_stale`]): how many are
    /// stored, and how many of those were not marked before.
    pub fn mark_all_stale(&mut self, keys: &[KeyHash], at_ms: u64) -> (usize, usize) {
        keys.iter().fold((0, 0), |(matched, newly), k| {
            let stored = self.peek(k).is_some();
            (
                matched + usize::from(stored),
                newly + usize::from(self.mark_stale(k, at_ms).is_some()),
            )
        })
    }

    /// Restores a mark read back at startup: when the key's current version is `generation`
    /// (else the mark was for a version gone since). Returns whether it holds.
    pub fn restore_mark(&mut self, key: &KeyHash, generation: u64, at_ms: u64) -> bool {
        if self.peek(key).is_none_or(|e| e.image.generation != generation) {
            return false;
        }
        self.marks.insert(*key, (generation, at_ms));
        true
    }

    /// When version `generation` of a key was soft-purged (ms since the epoch), if it was.
    pub fn mark_of(&self, key: &KeyHash, generation: u64) -> Option<u64> {
        if self.marks.is_empty() {
            return None;
        }
        self.marks
            .get(key)
            .and_then(|&(marked, at)| (marked == generation).then_some(at))
    }

    /// Every soft-purge mark: (key, generation, ms since the epoch).
    pub fn marks(&self) -> Vec<(KeyHash, u64, u64)> {
        self.marks.iter().map(|(k, &(g, at))| (*k, g, at)).collect()
    }

    /// Reports that removed files (`bytes` as charged, of `objects` removed entries) are off
    /// the disk.
    pub fn unlinked(&mut self, bytes: u64, objects: u64) {
        self.unlinking = self.unlinking.saturating_sub(bytes);
        self.unlinking_objects = self.unlinking_objects.saturating_sub(objects);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kh(i: u32) -> KeyHash {
        KeyHash::of(&i.to_be_bytes())
    }

    fn digest(i: u32) -> Digest {
        Digest::from(blake3::hash(&i.to_be_bytes()))
    }

    fn entry(key: u32, generation: u64, len: u64) -> Entry {
        Entry {
            key: format!("http://h/{key}").into(),
            image: Image {
                generation,
                body_len: len,
                tail_len: 10,
                place: Place::File,
                digest: digest(key),
                verified: true,
                mtime: 0,
            },
            variants: Box::default(),
            tags: Box::default(),
            hits: 0,
            marked: false,
        }
    }

    fn add(ix: &mut Index, key: u32, len: u64) -> Option<Removed> {
        ix.insert(kh(key), entry(key, u64::from(key), len), 0)
    }

    /// An index of the keys `0..n`, 100 bytes each, stored in that order.
    fn indexed(n: u32) -> Index {
        let mut ix = Index::new();
        for k in 0..n {
            add(&mut ix, k, 100);
        }
        ix
    }

    #[test]
    fn eviction_follows_exact_lru_order_and_hits_count_as_use() {
        let mut ix = indexed(5);
        ix.touch(&kh(0));
        ix.touch(&kh(2));
        let order: Vec<KeyHash> = std::iter::from_fn(|| ix.pop_lru().map(|r| r.key)).collect();
        assert_eq!(order, vec![kh(1), kh(3), kh(4), kh(0), kh(2)]);
        assert_eq!(ix.used(), 0);
    }

    #[test]
    fn objects_used_once_are_evicted_before_objects_used_again() {
        let mut ix = indexed(5);
        ix.touch(&kh(0));
        // A burst of one-off objects, all more recent than the last use of 0.
        for k in 5..10 {
            add(&mut ix, k, 100);
        }
        let order: Vec<KeyHash> = std::iter::from_fn(|| ix.pop_lru().map(|r| r.key)).take(9).collect();
        assert_eq!(order, (1..10).map(kh).collect::<Vec<_>>(), "0 was used again");
        assert_eq!(ix.peek(&kh(0)).map(|e| e.image.generation), Some(0));
    }

    /// What admission weighs a fill against: the entries in eviction order (probation's least
    /// recently used first, then protected's), as many as cover the fill's bytes, at most
    /// `most`, each with the bytes it stands for.
    #[test]
    fn the_next_victims_are_in_eviction_order_and_cover_the_bytes_asked_within_the_cap() {
        let mut ix = indexed(5);
        // 0 and 2 hit: protected, evicted after the rest.
        ix.touch(&kh(0));
        ix.touch(&kh(2));
        let weight = ix.peek(&kh(1)).map(|e| ix.weight(e)).expect("indexed");
        let keys = |v: Vec<(KeyHash, u64)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(ix.next_victims(1, 64), vec![(kh(1), weight)]);
        assert_eq!(keys(ix.next_victims(2 * weight, 64)), [kh(1), kh(3)]);
        assert_eq!(keys(ix.next_victims(2 * weight + 1, 64)), [kh(1), kh(3), kh(4)]);
        assert_eq!(keys(ix.next_victims(u64::MAX, 64)), [kh(1), kh(3), kh(4), kh(0), kh(2)]);
        assert_eq!(
            keys(ix.next_victims(u64::MAX, 2)),
            [kh(1), kh(3)],
            "never more than asked"
        );
        assert!(ix.next_victims(0, 64).is_empty());
    }

    /// The walk is bounded: with every entry marked, it looks at `most * VICTIM_SCAN` of them
    /// and names the first marked ones it met, not the whole index.
    #[test]
    fn the_next_victims_walk_stops_among_marked_entries() {
        let mut ix = indexed(100);
        for i in 0..99 {
            ix.touch(&kh(i));
        }
        let keys = |v: Vec<(KeyHash, u64)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        // 99 is the only unmarked entry, the most recent of all (the walk's last): out of reach
        // of a walk of 16.
        assert_eq!(keys(ix.next_victims(u64::MAX, 2)), [kh(0), kh(1)]);
        // Within reach of one of 800, it comes first.
        assert_eq!(keys(ix.next_victims(u64::MAX, 100))[0], kh(99));
    }

    #[test]
    fn in_plain_lru_order_a_burst_of_one_off_objects_evicts_an_object_used_again() {
        // The same steps as above, in the order kept for comparison: only recency counts.
        let mut ix = Index::new();
        ix.set_order(Order::Lru);
        for k in 0..5 {
            add(&mut ix, k, 100);
        }
        ix.touch(&kh(0));
        ix.touch(&kh(3));
        for k in 5..10 {
            add(&mut ix, k, 100);
        }
        let order: Vec<KeyHash> = std::iter::from_fn(|| ix.pop_lru().map(|r| r.key)).collect();
        let expect: Vec<KeyHash> = [1, 2, 4, 0, 3, 5, 6, 7, 8, 9].into_iter().map(kh).collect();
        assert_eq!(order, expect);
        assert_eq!((ix.used(), ix.protected_bytes), (0, 0), "nothing was ever protected");
    }

    #[test]
    fn the_protected_segment_keeps_to_its_share_and_demotes_in_lru_order() {
        let mut ix = indexed(10);
        // All used again: at most 80% of the bytes stay protected. The least recently used
        // are demoted to probation, so eviction still follows the order of use.
        for k in 0..10 {
            ix.touch(&kh(k));
        }
        assert!(ix.protected_bytes <= (ix.used() as f64 * PROTECTED_SHARE) as u64);
        let order: Vec<KeyHash> = std::iter::from_fn(|| ix.pop_lru().map(|r| r.key)).collect();
        assert_eq!(order, (0..10).map(kh).collect::<Vec<_>>());
        assert_eq!((ix.used(), ix.protected_bytes), (0, 0));
    }

    #[test]
    fn a_hit_marks_its_entry_and_eviction_promotes_it_or_gives_it_another_turn() {
        let mut ix = indexed(5);
        ix.touch(&kh(0));
        ix.touch(&kh(2));
        // Nothing moved: both still in probation, marked; the next victims pass them over.
        assert_eq!((ix.protected.len(), ix.protected_bytes), (0, 0));
        assert!(ix.probation.peek(&kh(0)).is_some_and(|e| e.marked && e.hits == 1));
        let keys = |v: Vec<(KeyHash, u64)>| v.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
        assert_eq!(keys(ix.next_victims(u64::MAX, 64)), [kh(1), kh(3), kh(4), kh(0), kh(2)]);
        // Eviction promotes the marked ones it meets (unmarked) and takes the next.
        assert_eq!(ix.pop_lru().map(|r| r.key), Some(kh(1)));
        assert!(ix.protected.peek(&kh(0)).is_some_and(|e| !e.marked));
        assert_eq!(ix.pop_lru().map(|r| r.key), Some(kh(3)));
        assert_eq!(ix.protected.len(), 2);
        // A protected entry hit again gets another turn: 2 goes before 0.
        ix.touch(&kh(0));
        let order: Vec<KeyHash> = std::iter::from_fn(|| ix.pop_lru().map(|r| r.key)).collect();
        assert_eq!(order, [kh(4), kh(2), kh(0)]);
        assert_eq!((ix.used(), ix.protected_bytes), (0, 0));
    }

    /// The one place a hit checks the full key: a hash that names another key's entry (a
    /// collision) is a miss, and leaves the entry unmarked. The tiers are asked only after
    /// this, for the generation it returns, so they need not compare keys again.
    #[test]
    fn a_hash_naming_another_keys_entry_is_a_miss() {
        let mut ix = indexed(3);
        let none = |_: &Entry| None;
        assert!(
            ix.hit(&kh(1), "http://h/2", none).is_none(),
            "key 2 asked under key 1's hash"
        );
        assert!(ix.peek(&kh(1)).is_some_and(|e| !e.marked && e.hits == 0));
        let (found, _) = ix.hit(&kh(1), "http://h/1", none).expect("its own key");
        assert_eq!(found.generation, 1);
        assert!(ix.peek(&kh(1)).is_some_and(|e| e.marked && e.hits == 1));
    }

    #[test]
    fn an_object_is_one_file_charged_once_until_it_is_unlinked() {
        let mut ix = Index::new();
        add(&mut ix, 1, 1000);
        add(&mut ix, 2, 1000);
        assert_eq!(ix.used(), 2 * 1010);
        let r = ix.remove(&kh(1)).unwrap();
        assert_eq!((r.key, r.generation, r.bytes), (kh(1), 1, 1010));
        assert_eq!(ix.used(), 1010);
        assert_eq!(ix.usage(), 2020, "until unlinked");
        ix.unlinked(r.bytes, 1);
        assert_eq!((ix.usage(), ix.objects()), (1010, 1));
    }

    #[test]
    fn replacing_a_key_returns_the_old_version() {
        let mut ix = Index::new();
        add(&mut ix, 1, 100);
        let old = ix.insert(kh(1), entry(1, 5000, 50), 0).unwrap();
        assert_eq!((old.key, old.generation, old.bytes), (kh(1), 1, 110));
        assert_eq!(ix.used(), 60);
        assert_eq!(ix.len(), 1);
        assert_eq!(ix.peek(&kh(1)).unwrap().image.generation, 5000);
    }

    fn variant(coding: Coding, generation: u64, len: u64) -> Variant {
        Variant {
            coding,
            image: Image {
                generation,
                body_len: len,
                tail_len: 10,
                place: Place::File,
                digest: digest(generation as u32),
                verified: true,
                mtime: 0,
            },
        }
    }

    /// Adds a variant to key `key` (version `generation`) as a compressing thread does: room
    /// reserved first, then converted.
    fn add_variant(ix: &mut Index, key: u32, generation: u64, v: Variant) -> bool {
        let bytes = ix.charge(v.image.file_len());
        ix.reserve_room(bytes, 0, u64::MAX, u64::MAX).expect("room");
        ix.add_variant(&kh(key), generation, v, bytes)
    }

    #[test]
    fn variants_are_charged_counted_and_removed_with_their_object() {
        let mut ix = Index::new();
        add(&mut ix, 1, 100);
        assert!(add_variant(&mut ix, 1, 1, variant(Coding::Br, 50, 20)));
        assert!(add_variant(&mut ix, 1, 1, variant(Coding::Gzip, 51, 40)));
        // One per coding, and only to the version it was made from.
        assert!(!add_variant(&mut ix, 1, 1, variant(Coding::Br, 52, 20)));
        assert!(!add_variant(&mut ix, 1, 7, variant(Coding::Zstd, 53, 20)));
        assert!(!add_variant(&mut ix, 2, 2, variant(Coding::Zstd, 54, 20)));
        // Charged in bytes; one object with its variants (a refused variant gave its bytes back).
        assert_eq!((ix.used(), ix.objects(), ix.reserved()), (110 + 30 + 50, 1, 0));
        // Evicted whole: the object's file and both variants'.
        let r = ix.pop_lru().expect("an entry");
        assert_eq!(
            r.variants,
            vec![(Coding::Br, 50, Place::File), (Coding::Gzip, 51, Place::File)]
        );
        assert_eq!(r.bytes, 190);
        assert_eq!((ix.used(), ix.objects()), (0, 1));
        ix.unlinked(r.bytes, 1);
        assert_eq!(ix.objects(), 0);
    }

    /// The whole operations the cache's facade asks for, each in one hold of the lock: a hit
    /// (named key, chosen variant, mark), whether a version is still held, a named removal
    /// (a colliding hash is not this key's), batches removed and marked.
    #[test]
    fn whole_operations_check_the_key_and_report_what_they_did() {
        let mut ix = Index::new();
        add(&mut ix, 1, 100);
        add(&mut ix, 2, 100);
        assert!(add_variant(&mut ix, 1, 1, variant(Coding::Br, 50, 20)));
        let (found, mark) = ix.hit(&kh(1), "http://h/1", |_| Some(Coding::Br)).expect("a hit");
        assert_eq!(
            (found.generation, found.coding, found.span_generation, mark),
            (1, Some(Coding::Br), 50, None)
        );
        // Its images, with where they are, while the index holds those versions.
        let (object, chosen) = ix.images(&kh(1), &found).expect("held");
        assert_eq!((object.generation, chosen.map(|v| v.image.generation)), (1, Some(50)));
        let gone = Found {
            span_generation: 51,
            ..found
        };
        assert!(ix.images(&kh(1), &gone).is_none(), "another variant's version");
        let (none, _) = ix.hit(&kh(1), "http://h/1", |_| Some(Coding::Gzip)).expect("a hit");
        assert_eq!(none.coding, None, "no gzip variant stored: the identity body");
        assert!(
            ix.hit(&kh(1), "http://h/other", |_| None).is_none(),
            "another key's hash"
        );

        assert!(ix.holds(&kh(1), 1, 0) && ix.holds(&kh(1), 1, 50));
        assert!(!ix.holds(&kh(1), 1, 51) && !ix.holds(&kh(1), 2, 0) && !ix.holds(&kh(3), 3, 0));

        assert_eq!(ix.mark_all_stale(&[kh(1), kh(2), kh(3)], 7), (2, 2));
        assert_eq!(ix.mark_all_stale(&[kh(1), kh(2)], 8), (2, 0), "marked before");
        assert_eq!(ix.hit(&kh(1), "http://h/1", |_| None).unwrap().1, Some(7));

        assert!(ix.remove_named(&kh(1), "http://h/other").is_none());
        assert_eq!(ix.remove_named(&kh(1), "http://h/1").map(|r| r.generation), Some(1));
        let removed = ix.remove_all(&[kh(1), kh(2), kh(3)]);
        assert_eq!(removed.iter().map(|r| r.key).collect::<Vec<_>>(), vec![kh(2)]);
        assert!(ix.is_empty());
    }

    #[test]
    fn a_new_version_carries_over_only_the_variants_the_old_one_has() {
        let mut ix = Index::new();
        add(&mut ix, 1, 100);
        assert!(add_variant(&mut ix, 1, 1, variant(Coding::Br, 50, 20)));
        assert!(add_variant(&mut ix, 1, 1, variant(Coding::Zstd, 51, 30)));
        // A refresh: the same body as version 9, naming br (carried) and a gzip the old one
        // never had (dropped).
        let mut refreshed = entry(1, 9, 100);
        refreshed.variants = vec![variant(Coding::Br, 50, 20), variant(Coding::Gzip, 77, 5)].into();
        let old = ix.insert(kh(1), refreshed, 0).expect("the old version");
        // The old version's file and its zstd go; br stays, charged once.
        assert_eq!(old.variants, vec![(Coding::Zstd, 51, Place::File)]);
        assert_eq!(old.bytes, 110 + 40);
        let now = ix.peek(&kh(1)).expect("indexed");
        assert_eq!(
            now.variants.iter().map(|v| v.image.generation).collect::<Vec<_>>(),
            vec![50]
        );
        assert_eq!((ix.used(), ix.objects()), (110 + 30, 2));
        // A fill's new version (no variants named) lets every variant go.
        let old = ix.insert(kh(1), entry(1, 10, 100), 0).expect("the old version");
        assert_eq!(old.variants, vec![(Coding::Br, 50, Place::File)]);
        assert_eq!(ix.used(), 110);
    }

    #[test]
    fn variants_count_bytes_not_objects_against_the_object_bound() {
        let mut ix = Index::new();
        // Three objects with three variants each under a bound of four objects: no eviction.
        for key in 1..=3 {
            add(&mut ix, key, 100);
            for (i, coding) in [Coding::Br, Coding::Zstd, Coding::Gzip].into_iter().enumerate() {
                assert!(add_variant(
                    &mut ix,
                    key,
                    key as u64,
                    variant(coding, 10 * key as u64 + i as u64, 20)
                ));
            }
        }
        assert_eq!(ix.objects(), 3);
        let room = ix.reserve_room(10, 1, u64::MAX, 4).expect("room");
        assert!(room.victims.is_empty(), "variants took an object's place");
        // The bound reached, one more object evicts one object, its variants with it.
        let room = ix.reserve_room(10, 1, u64::MAX, 4).expect("room made");
        assert_eq!(room.victims.len(), 1);
        assert_eq!(room.victims[0].variants.len(), 3);
    }

    #[test]
    fn a_variant_found_at_startup_attaches_to_the_body_it_was_made_from() {
        let mut ix = Index::new();
        // The object's file and its variant's: one object, both charged.
        ix.add_unindexed(110 + 30, 1);
        let e = entry(1, 3, 100);
        let made_from = (e.image.digest, e.image.body_len);
        assert!(ix.insert_scanned(kh(1), e).is_none());
        ix.forget_unindexed_objects(1);
        assert!(!ix.add_scanned_variant(&kh(1), (digest(99), 100), variant(Coding::Br, 50, 20)));
        assert!(ix.add_scanned_variant(&kh(1), made_from, variant(Coding::Br, 50, 20)));
        assert_eq!((ix.usage(), ix.objects(), ix.reserved()), (140, 1, 0));
    }

    /// Reserves without room to make (nothing is indexed to evict).
    fn reserve(ix: &mut Index, bytes: u64, budget: u64) -> bool {
        match ix.reserve_room(bytes, 0, budget, u64::MAX) {
            Ok(room) => {
                assert!(room.victims.is_empty());
                true
            }
            Err(_) => false,
        }
    }

    #[test]
    fn reservations_never_exceed_the_budget() {
        let mut ix = Index::new();
        assert!(reserve(&mut ix, 600, 1000));
        assert!(!reserve(&mut ix, 500, 1000));
        assert!(reserve(&mut ix, 400, 1000));
        ix.release(400);
        assert_eq!(ix.usage(), 600);
        // Converting a reservation into committed bytes keeps usage unchanged.
        ix.insert(kh(1), entry(1, 1, 590), 600);
        assert_eq!((ix.used(), ix.reserved(), ix.usage()), (600, 0, 600));
    }

    /// Removes a room's victims from the disk (as the caller does) and grants what it held.
    fn make(ix: &mut Index, room: Room) -> Vec<KeyHash> {
        let bytes = room.victims.iter().map(|r| r.bytes).sum();
        ix.room_made((bytes, room.victims.len() as u64), room.held);
        room.victims.iter().map(|r| r.key).collect()
    }

    #[test]
    fn a_reservation_that_does_not_fit_evicts_the_least_recently_used_it_needs() {
        let mut ix = Index::new();
        // Ten entries of 110 bytes in a budget of 1,200: 100 left, below any watermark.
        for k in 0..10 {
            add(&mut ix, k, 100);
        }
        ix.touch(&kh(0));
        // 300 bytes: 200 short, two entries of 110 would do; the oldest of those asked for
        // once go (1 and 2), not 0, asked for again.
        let room = ix.reserve_room(300, 1, 1200, 100).unwrap();
        assert_eq!(make(&mut ix, room), vec![kh(1), kh(2)]);
        assert_eq!((ix.reserved(), ix.objects(), ix.usage()), (300, 9, 8 * 110 + 300));
        // One that fits evicts nothing.
        let room = ix.reserve_room(20, 1, 1200, 100).unwrap();
        assert!(room.victims.is_empty());
        assert_eq!(ix.usage(), 8 * 110 + 320);
    }

    #[test]
    fn the_room_is_granted_only_once_the_victims_are_off_the_disk() {
        let mut ix = indexed(10);
        let room = ix.reserve_room(500, 1, 1200, 100).unwrap();
        // 400 short: four victims, still on the disk. What they hold is held back.
        assert_eq!(room.victims.len(), 4);
        assert_eq!(room.held, (400, 0));
        assert_eq!(
            ix.usage(),
            1200,
            "the victims' files and the part granted: the budget, no more"
        );
        // What the eviction loop goes by: the victims gone, the reservation whole.
        assert_eq!(ix.settled(), (6 * 110 + 500, 7));
        // Meanwhile another fill finds the room taken, and makes its own.
        let other = ix.reserve_room(110, 1, 1200, 100).unwrap();
        assert_eq!(other.victims.len(), 1);
        assert!(ix.usage() <= 1200);
        make(&mut ix, room);
        assert!(ix.usage() <= 1200);
        assert_eq!(ix.reserved(), 500 + 110 - 110);
        make(&mut ix, other);
        assert_eq!((ix.reserved(), ix.usage()), (610, 5 * 110 + 610));
    }

    #[test]
    fn the_object_bound_makes_room_too() {
        let mut ix = indexed(5);
        // Five objects, a bound of five: the sixth evicts one, and its object is held until
        // that one is off the disk.
        let room = ix.reserve_room(10, 1, 1_000_000, 5).unwrap();
        assert_eq!(room.held, (0, 1));
        assert_eq!(ix.objects(), 5);
        assert_eq!(make(&mut ix, room), vec![kh(0)]);
        assert_eq!((ix.objects(), ix.len()), (5, 4));
    }

    #[test]
    fn what_could_never_fit_or_is_held_by_fills_is_refused_without_evicting() {
        let mut ix = Index::new();
        ix.set_disk(1, 100);
        for k in 0..5 {
            add(&mut ix, k, 100);
        }
        let refused = |r: Result<Room, Refused>| {
            let r = r.unwrap_err();
            assert!(r.victims.is_empty());
            r.reason
        };
        // More than the budget less the layout, however empty the cache.
        assert_eq!(refused(ix.reserve_room(1101, 1, 1200, 100)), "budget");
        assert_eq!(refused(ix.reserve_room(10, 2, 1200, 1)), "objects");
        // Room held by fills in progress cannot be evicted.
        let fill = ix.reserve_room(500, 1, 1200, 100).unwrap();
        make(&mut ix, fill);
        assert_eq!(refused(ix.reserve_room(700, 1, 1200, 100)), "room");
        assert_eq!(ix.len(), 5, "nothing evicted for a refusal");
    }

    #[test]
    fn interleaved_reservations_never_pass_the_budget_or_the_bound() {
        // Fills reserving (and making room), victims removed late and out of order, fills
        // committing or failing: at every step what the disk may hold is within the budget.
        let (budget, max_objects) = (5000u64, 12u64);
        let mut ix = Index::new();
        ix.set_disk(10, 200);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let (mut pending, mut fills): (Vec<Room>, Vec<(u64, u64)>) = (Vec::new(), Vec::new());
        let mut made = 0;
        for step in 0..20_000u32 {
            match rand(4) {
                0 | 1 => {
                    let len = 1 + rand(2000);
                    let bytes = ix.charge(len) + ix.charge(10);
                    match ix.reserve_room(bytes, 1, budget, max_objects) {
                        Ok(room) => {
                            made += room.victims.len();
                            fills.push((len, bytes));
                            pending.push(room);
                        }
                        Err(r) => assert!(r.victims.is_empty() && r.reason == "room"),
                    }
                }
                2 if !pending.is_empty() => {
                    let room = pending.swap_remove(rand(pending.len() as u64) as usize);
                    make(&mut ix, room);
                }
                3 if !fills.is_empty() && pending.is_empty() => {
                    let (len, bytes) = fills.swap_remove(rand(fills.len() as u64) as usize);
                    if rand(4) == 0 {
                        ix.release_reservation(bytes, 1);
                    } else {
                        let key = 100_000 + step;
                        assert!(ix.insert(kh(key), entry(key, u64::from(key), len), bytes).is_none());
                        ix.release_object();
                    }
                }
                _ => {}
            }
            assert!(ix.usage() <= budget, "step {step}: {} over {budget}", ix.usage());
            assert!(ix.objects() <= max_objects, "step {step}: {} objects", ix.objects());
        }
        assert!(made > 1000, "room was made {made} times");
    }

    #[test]
    fn the_object_bound_counts_fills_and_unlinking_objects() {
        let mut ix = Index::new();
        add(&mut ix, 1, 100);
        assert!(ix.reserve_room(10, 1, 1_000_000, 3).is_ok());
        assert_eq!(ix.objects(), 2, "one indexed, one being filled");
        assert_eq!(ix.reserve_room(10, 1, 1_000_000, 1).unwrap_err().reason, "room");
        assert_eq!(
            ix.reserve_room(1_000_001, 1, 1_000_000, 3).unwrap_err().reason,
            "budget"
        );
        let r = ix.remove(&kh(1)).unwrap();
        assert_eq!(ix.objects(), 2, "removed, not yet unlinked");
        ix.unlinked(r.bytes, 1);
        assert_eq!(ix.objects(), 1);
        ix.release_reservation(10, 1);
        assert_eq!((ix.objects(), ix.usage()), (0, 0));
    }

    #[test]
    fn scanned_entries_keep_the_newest_version() {
        let mut ix = Index::new();
        ix.add_unindexed(330, 3);
        // (The rebuild stops counting each found object as unindexed as it comes to it.)
        ix.forget_unindexed_objects(1);
        assert!(ix.insert_scanned(kh(1), entry(1, 5, 100)).is_none());
        ix.forget_unindexed_objects(1);
        let stale = ix.insert_scanned(kh(1), entry(1, 3, 100)).unwrap();
        assert_eq!((stale.key, stale.generation), (kh(1), 3));
        ix.forget_unindexed_objects(1);
        let replaced = ix.insert_scanned(kh(1), entry(1, 9, 100)).unwrap();
        assert_eq!((replaced.key, replaced.generation), (kh(1), 5));
        assert_eq!(ix.peek(&kh(1)).unwrap().image.generation, 9);
        assert_eq!(ix.used(), 110);
        // Every found file is indexed (110) or being removed (2 x 110); none is unindexed.
        assert_eq!(ix.usage(), 330);
        ix.unlinked(220, 2);
        assert_eq!((ix.usage(), ix.objects()), (110, 1));
    }

    fn tags(names: &[&str]) -> Vec<Box<str>> {
        names.iter().map(|n| Box::<str>::from(*n)).collect()
    }

    #[test]
    fn tags_follow_their_entries_through_replacement_eviction_and_removal() {
        let mut ix = Index::new();
        let _ = ix.insert_tagged(kh(1), entry(1, 1, 100), 0, &tags(&["p1", "all"]));
        let _ = ix.insert_tagged(kh(2), entry(2, 2, 100), 0, &tags(&["p2", "all"]));
        ix.insert(kh(3), entry(3, 3, 100), 0);
        assert_eq!(ix.keys_tagged(&["all".into()]).len(), 2);
        assert_eq!(ix.tag_stats(), (3, 4));
        // A new version of 1 carries other tags: the old ones go with the old version.
        let old = ix.insert_tagged(kh(1), entry(1, 9, 100), 0, &tags(&["p1-v2"]));
        assert_eq!(old.removed.map(|r| r.generation), Some(1));
        assert!(ix.keys_tagged(&["p1".into()]).is_empty());
        assert_eq!(ix.keys_tagged(&["all".into()]), vec![kh(2)]);
        assert_eq!(ix.tag_names(ix.peek(&kh(1)).unwrap()), vec!["p1-v2"]);
        // Evicted (least recently used first: 2) and removed: nothing left indexed.
        assert_eq!(ix.pop_lru().map(|r| r.key), Some(kh(2)));
        ix.remove(&kh(1));
        assert_eq!(ix.tag_stats(), (0, 0));
        assert!(ix.keys_tagged(&["all".into(), "p1-v2".into()]).is_empty());
        // A scanned entry refused for an older version indexes no tags.
        let _ = ix.insert_scanned_tagged(kh(5), entry(5, 50, 10), &tags(&["a"]));
        assert!(
            ix.insert_scanned_tagged(kh(5), entry(5, 40, 10), &tags(&["b"]))
                .removed
                .is_some()
        );
        assert_eq!(ix.tag_stats(), (1, 1));
    }

    #[test]
    fn tags_past_the_memory_budget_leave_the_entry_untagged_for_its_caller_to_remove() {
        let mut ix = Index::new();
        ix.set_tag_budget(600);
        let first = ix.insert_tagged(kh(1), entry(1, 1, 100), 0, &tags(&["p1", "all"]));
        assert!(first.refused.is_none());
        let held = ix.tag_bytes();
        let long = "x".repeat(400);
        let over = ix.insert_tagged(kh(2), entry(2, 2, 100), 0, &tags(&["all", &long]));
        assert_eq!(over.refused, Some(tags::Refused::Memory));
        assert!(ix.peek(&kh(2)).is_some_and(|e| e.tags.is_empty()), "indexed untagged");
        assert_eq!(ix.tag_bytes(), held, "none of its tags held");
        assert_eq!(ix.keys_tagged(&["all".into()]), vec![kh(1)]);
        assert!(ix.remove(&kh(2)).is_some());
        // A new version's tags are weighed after the old version's are let go.
        let again = ix.insert_tagged(kh(1), entry(1, 3, 100), 0, &tags(&["p1", "all"]));
        assert!(again.refused.is_none() && again.removed.is_some());
        assert_eq!(ix.tag_bytes(), held);
    }

    #[test]
    fn a_soft_purge_mark_holds_for_the_version_marked_only() {
        let mut ix = Index::new();
        add(&mut ix, 1, 100);
        assert_eq!(ix.mark_stale(&kh(1), 1000), Some(1));
        assert_eq!(ix.mark_stale(&kh(1), 2000), None, "the first mark stays");
        assert_eq!(ix.mark_of(&kh(1), 1), Some(1000));
        assert_eq!(ix.mark_stale(&kh(7), 1000), None, "nothing to mark");
        // A new version (a refresh) is not marked, and the old mark is gone with the old one.
        ix.insert(kh(1), entry(1, 2, 100), 0);
        assert_eq!(ix.mark_of(&kh(1), 2), None);
        assert!(ix.marks().is_empty());
        // Restored at startup only for the version it was for.
        assert!(!ix.restore_mark(&kh(1), 1, 5));
        assert!(ix.restore_mark(&kh(1), 2, 5));
        assert_eq!(ix.marks(), vec![(kh(1), 2, 5)]);
        ix.remove(&kh(1));
        assert!(ix.marks().is_empty());
    }

    #[test]
    fn hits_are_counted_per_version() {
        let mut ix = Index::new();
        add(&mut ix, 1, 100);
        for _ in 0..3 {
            ix.touch(&kh(1));
        }
        assert_eq!(ix.peek(&kh(1)).unwrap().hits, 3);
        ix.insert(kh(1), entry(1, 2, 100), 0);
        assert_eq!(ix.peek(&kh(1)).unwrap().hits, 0);
    }

    #[test]
    fn files_are_charged_whole_allocation_units_and_empty_ones_one() {
        assert_eq!(charge(0, 4096), 4096, "an empty file still costs an inode: one unit");
        assert_eq!(charge(1, 4096), 4096);
        assert_eq!(charge(4096, 4096), 4096);
        assert_eq!(charge(4097, 4096), 8192);
        assert_eq!(charge(100_000, 512), 100_352);
        assert_eq!(charge(10, 1), 10, "a unit of one byte counts bytes");
        // Large files get room for their block map: one unit per 32 MiB.
        assert_eq!(charge(64 << 20, 4096), (64 << 20) + 2 * 4096);
        assert_eq!(charge(u64::MAX, 4096), u64::MAX, "saturates");
    }

    #[test]
    fn the_disk_is_charged_in_units_with_the_layout_overhead() {
        let mut ix = Index::new();
        ix.set_disk(4096, 100_000);
        assert_eq!(ix.usage(), 100_000, "the layout costs before anything is stored");
        // 1000 tiny objects: a 100-byte body and a 10-byte record in one file, one unit each.
        for k in 0..1000 {
            add(&mut ix, k, 100);
        }
        assert_eq!(ix.used(), 100_000 + 1000 * 4096);
        let r = ix.pop_lru().unwrap();
        assert_eq!(r.bytes, 4096);
        assert_eq!(ix.usage(), 100_000 + 1000 * 4096, "until unlinked");
        ix.unlinked(r.bytes, 1);
        assert_eq!(ix.usage(), 100_000 + 999 * 4096);
    }
}
