//! The startup rebuild: the index is made again from the object files on disk, on a
//! blocking thread, while the cache serves from the app (fills wait for the files found to be
//! counted: `Budget::set_accounted`). Every file's record is read from its end; the newest
//! version of each key is indexed; older versions and files that are torn, corrupt or not ours
//! are removed. It owns no lock: it takes the budget's `index` for one step at a time, never
//! with another lock held, and `vary` (a leaf) between those steps. Each record's tags are
//! indexed with it (read again from its stored headers), and the soft-purge marks of the
//! versions found are restored.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tracing::{info, warn};

use crate::cache::index::{Image, Variant};
use crate::cache::key::KeyHash;
use crate::cache::read::Source;
use crate::cache::segments::{Kind, Place};
use crate::cache::store::{ReadError, Store, StoreError};
use crate::cache::{Cache, store};
use crate::metrics as m;
use crate::negotiate::Coding;

impl Cache {
    /// Rebuilds the index from disk (blocking; runs on a blocking thread at startup): every
    /// object file's record is read from its end; the newest version of each key is indexed,
    /// older ones and files that are torn, corrupt or not ours are removed. Bodies are not
    /// read here: each is hashed before its first use.
    pub(super) fn rebuild(self: Arc<Self>) {
        let Some(store) = self.store() else { return };
        let started = Instant::now();
        if store.remove_old_layouts() > 0 {
            info!("cache directory of an earlier layout version removed");
        }
        // Images in files of their own, and in segments' slots (segments of this run are
        // its fills', not found).
        let (slots, torn) = self
            .segments()
            .map(|s| s.scan(|id| store.is_own(id)))
            .unwrap_or_default();
        let mut found: Vec<Scanned> = store
            .scan_objects()
            .into_iter()
            .map(|f| Scanned {
                id: f.id,
                generation: f.generation,
                len: f.len,
                coding: f.coding,
                place: Place::File,
            })
            .chain(slots.into_iter().map(|s| Scanned {
                id: s.key,
                generation: s.generation,
                len: s.slot.len(),
                coding: match s.kind {
                    Kind::Object => None,
                    Kind::Variant(coding) => Some(coding),
                },
                place: Place::Slot(s.slot),
            }))
            .collect();
        let bytes: u64 = found.iter().map(|f| self.charge(f.stored_len())).sum();
        // Variants are charged in bytes only: the objects are the files without a coding.
        let objects = found.iter().filter(|f| f.coding.is_none()).count() as u64;
        self.lock_index().add_unindexed(bytes, objects);
        self.budget.set_accounted();

        // Oldest first, so the most recently stored end up most recently used; variants after
        // every object, to be attached to the version indexed.
        // Split in place (no second copy of the list: a scan of a full cache finds a hundred
        // thousand of them).
        found.sort_by_key(|f| (f.coding.is_some(), f.generation));
        let variants = found.split_off(found.partition_point(|f| f.coding.is_none()));
        let mut loaded = 0u64;
        // A torn slot is a corrupt object as a torn file is.
        let mut corrupt = torn;
        let mut failed = FailedReads::default();
        for f in found {
            // From here it is indexed, removed, or counted by its own fill.
            self.lock_index().forget_unindexed_objects(1);
            let charged = self.charge(f.stored_len());
            if store.is_own(f.generation) {
                // Written since startup: indexed by its fill.
                self.lock_index().forget_unindexed(charged);
                continue;
            }
            let source = Source::of(&store, &f.id, f.generation, None, &f.place);
            let read = source.found(f.len);
            let meta = match read {
                Ok(meta) if meta.storage_hash() == f.id => meta,
                other => {
                    // Torn, corrupt, foreign, or its body is not the length its record says;
                    // or it could not be read. Either way it cannot be indexed.
                    corrupt += failed.note(other.err(), &source.describe());
                    f.remove(&store);
                    self.lock_index().forget_unindexed(charged);
                    continue;
                }
            };
            let entry = super::commit::entry_of(&meta, f.generation, f.len - meta.body_len, false, 0, f.place.clone());
            let tags = match self.settings.tags.parse(&meta.headers) {
                Ok(tags) => tags,
                Err(why) => {
                    // Stored under bounds since lowered: its tags cannot all be indexed.
                    metrics::counter!(m::TAGS_REFUSED, "reason" => why.as_str()).increment(1);
                    f.remove(&store);
                    self.lock_index().forget_unindexed(charged);
                    continue;
                }
            };
            self.vary.remember(&meta);
            let (removed, refused) = {
                let mut ix = self.lock_index();
                let inserted = ix.insert_scanned_tagged(f.id, entry, &tags);
                // No memory left in the tag index for its tags: taken out again, whole.
                let refused = inserted.refused.and_then(|why| ix.remove(&f.id).map(|r| (why, r)));
                (inserted.removed, refused)
            };
            if let Some((why, _)) = &refused {
                metrics::counter!(m::TAGS_REFUSED, "reason" => why.as_str()).increment(1);
            }
            for r in removed.into_iter().chain(refused.map(|(_, r)| r)) {
                super::evict::remove_removed(&store, &r);
                self.lock_index().unlinked(r.bytes, 1);
            }
            loaded += 1;
            if loaded.is_multiple_of(10_000) {
                metrics::gauge!(m::INDEX_LOADED).set(loaded as f64);
            }
        }
        for f in variants {
            let Some(coding) = f.coding else { continue };
            let charged = self.charge(f.stored_len());
            if store.is_own(f.generation) {
                self.lock_index().forget_unindexed(charged);
                continue;
            }
            let source = Source::of(&store, &f.id, f.generation, Some(coding), &f.place);
            let attached = match source.variant_found(f.len) {
                Ok(record) if record.coding == coding => {
                    let variant = Variant {
                        coding,
                        image: Image {
                            generation: f.generation,
                            body_len: record.body_len,
                            tail_len: store::VARIANT_TAIL,
                            place: f.place.clone(),
                            digest: record.digest,
                            verified: false,
                            mtime: 0,
                        },
                    };
                    let made_from = (record.made_from.1, record.made_from.0);
                    self.lock_index().add_scanned_variant(&f.id, made_from, variant)
                }
                other => {
                    corrupt += failed.note(other.err(), &source.describe());
                    false
                }
            };
            if !attached {
                // Torn, corrupt, or made from a body no longer stored.
                f.remove(&store);
                self.lock_index().forget_unindexed(charged);
            }
        }
        {
            let mut ix = self.lock_index();
            ix.forget_unindexed(u64::MAX);
            ix.forget_unindexed_objects(u64::MAX);
        }
        // Soft-purge marks of the versions indexed hold again; the file keeps only the marks in
        // force (those, and any a soft purge made meanwhile). Its writes take turns with the
        // soft purges' (`marks_file`; this is a blocking thread).
        {
            let _turn = self.marks_file.blocking_lock();
            let marks = store.read_marks();
            let (restored, in_force) = {
                let mut ix = self.lock_index();
                let restored = marks
                    .iter()
                    .filter(|&&(key, generation, at)| ix.restore_mark(&key, generation, at))
                    .count();
                (restored, ix.marks())
            };
            if (restored < marks.len() || in_force.len() != marks.len())
                && let Err(e) = store.write_marks(&in_force)
            {
                self.storage_error(&e);
            }
        }
        self.loaded.store(true, Ordering::Release);
        let secs = started.elapsed().as_secs_f64();
        metrics::gauge!(m::INDEX_LOADED).set(loaded as f64);
        metrics::counter!(m::CORRUPT_OBJECTS).increment(corrupt);
        metrics::gauge!(m::INDEX_REBUILD_SECONDS).set(secs);
        metrics::gauge!(m::INDEX_READY).set(1.0);
        self.publish_gauges();
        info!(objects = loaded, corrupt, seconds = secs, "cache index rebuilt");
        if let Some(first) = failed.first {
            // One line for them all: a failing disk would otherwise log one for every file.
            warn!(files = failed.count, first = %first, "files that could not be read at startup were removed");
        }
        self.evict_wakeup().notify_one();
    }
}

/// An image found at startup: a file of its own, or a slot.
struct Scanned {
    id: KeyHash,
    generation: u64,
    len: u64,
    coding: Option<Coding>,
    place: Place,
}

impl Scanned {
    /// What it stores: its image, and a slot's prefix.
    fn stored_len(&self) -> u64 {
        self.len + self.place.overhead()
    }

    /// Removes it: its file, or its slot (punched).
    fn remove(&self, store: &Store) {
        match (&self.place, self.coding) {
            (Place::File, None) => {
                let _ = store.remove_object(&self.id, self.generation);
            }
            (Place::File, Some(coding)) => {
                let _ = store.remove_variant(&self.id, self.generation, coding);
            }
            (slot, _) => slot.discard(),
        }
    }
}

/// Files the startup scan could not read (as opposed to corrupt ones): each counted as a
/// storage error by its kind, logged once for all.
#[derive(Default)]
struct FailedReads {
    count: u64,
    first: Option<StoreError>,
}

impl FailedReads {
    /// 1 when a file found at startup is corrupt (no error: it read fine and is not what its
    /// name says), 0 when it could not be read.
    fn note(&mut self, error: Option<ReadError>, path: &Path) -> u64 {
        match error {
            Some(ReadError::Io(source)) => {
                let e = StoreError::io("read", path, source);
                metrics::counter!(m::STORAGE_ERRORS, "kind" => e.kind()).increment(1);
                self.count += 1;
                self.first.get_or_insert(e);
                0
            }
            Some(ReadError::Corrupt(_)) | None => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::cache::store::Store;
    use crate::cache::{Purge, testing};

    #[tokio::test]
    async fn soft_purge_marks_are_restored_at_startup_for_the_version_marked() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("cache");
        let (a, b) = (b"a body".repeat(40), b"b body".repeat(40));
        let mut ma = testing::meta("http://app.example/a.js", &a);
        ma.headers.insert("surrogate-key", http::HeaderValue::from_static("x"));
        let mb = testing::meta("http://app.example/b.js", &b);
        {
            let store = Store::open(&root).expect("store");
            testing::write_object(&store, &ma, &a, store.next_gen(), 0);
            testing::write_object(&store, &mb, &b, store.next_gen(), 0);
        }
        let none = http::HeaderMap::new();
        {
            let cache = testing::open(&root).await;
            assert_eq!(cache.soft_purge(&Purge::Tags(vec!["x".into()])).await, 1);
            assert!(cache.lookup(&ma.key, &none).await.expect("hit").soft_purged.is_some());
        }
        let cache = testing::open(&root).await;
        let hit = cache.lookup(&ma.key, &none).await.expect("a hit after the restart");
        assert!(hit.soft_purged.is_some(), "the mark came back with its version");
        assert!(cache.lookup(&mb.key, &none).await.expect("hit").soft_purged.is_none());
        // A damaged marks file is ignored, never fatal.
        let store = cache.store().expect("open");
        drop(cache);
        let marks = root.join("objects-v3").join("soft-purged");
        std::fs::write(&marks, b"not ours").expect("write");
        assert!(store.read_marks().is_empty());
        std::fs::write(&marks, b"SCMARK01 torn").expect("write");
        assert!(store.read_marks().is_empty(), "a torn record is not read");
    }

    #[tokio::test]
    async fn a_rebuild_indexes_the_newest_whole_version_and_removes_the_rest() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("cache");
        let (old, new, torn) = (b"old body".repeat(50), b"new body".repeat(50), b"torn body".repeat(50));
        let a_old = testing::meta("http://app.example/a.js", &old);
        let a_new = testing::meta("http://app.example/a.js", &new);
        let b = testing::meta("http://app.example/b.js", &torn);
        let newest = {
            let store = Store::open(&root).expect("store");
            let older = store.next_gen();
            testing::write_object(&store, &a_old, &old, older, 0);
            let newest = store.next_gen();
            testing::write_object(&store, &a_new, &new, newest, 0);
            // Cut short inside its footer: torn.
            let gen_b = store.next_gen();
            testing::write_object(&store, &b, &torn, gen_b, 5);
            assert_eq!(store.scan_objects().len(), 3);
            newest
        };
        let cache = testing::open(&root).await;
        assert_eq!(cache.stats().0, 1);
        let store = cache.store().expect("open");
        let left: Vec<_> = store.scan_objects().iter().map(|f| (f.id, f.generation)).collect();
        assert_eq!(left, vec![(a_new.storage_hash(), newest)]);
        let hit = cache.lookup(&a_new.key, &http::HeaderMap::new()).await.expect("a hit");
        assert_eq!(&hit.body[..], &new[..]);
        assert!(cache.lookup(&b.key, &http::HeaderMap::new()).await.is_none());
        // Nothing left reserved or counted for what was removed.
        assert_eq!(cache.stats().2, 0);
    }
}
