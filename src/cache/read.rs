//! The disk side of a lookup: what the index expects of an object file ([`Expected`]),
//! opening it for a hit ([`open_object`]: its body read or mapped, its record, whether the
//! body is intact), and dropping an entry whose file fails that. It owns no state and no lock:
//! `open_object` is plain file work (called inline only when it would not wait for the disk),
//! and dropping an entry takes the budget's `index` for one step, then the tiers, then unlinks.

use std::path::PathBuf;
use std::sync::Arc;

use crate::cache::index::Image;
use crate::cache::key::{CacheKey, Digest, KeyHash};
use crate::cache::meta::Meta;
use crate::cache::segments::{Place, Slot};
use crate::cache::store::{self, IoContext, ReadError, Store, StoreError};
use crate::cache::{Cache, fileio};
use crate::metrics as m;
use crate::negotiate::Coding;
use crate::zerocopy::Backing;
use bytes::Bytes;
use tracing::warn;

/// What a read checks an image against: what the index says it holds ([`Image`]), and from
/// what size its body is mapped.
#[derive(Clone, Copy)]
pub(super) struct Expected {
    /// Body length: the file's first bytes.
    pub(super) len: u64,
    /// Record and footer after the body.
    pub(super) tail_len: u64,
    pub(super) digest: Digest,
    /// Hashed since startup, when its file had `mtime`.
    pub(super) verified: bool,
    pub(super) mtime: u64,
    /// Mapped from this size, read below it.
    pub(super) min_mmap: u64,
}

impl Expected {
    /// What `image` must hold, its body mapped from `min_mmap` bytes.
    pub(super) fn of(image: &Image, min_mmap: u64) -> Expected {
        Expected {
            len: image.body_len,
            tail_len: image.tail_len,
            digest: image.digest,
            verified: image.verified,
            mtime: image.mtime,
            min_mmap,
        }
    }
}

/// An object file opened for a hit.
pub(super) struct Opened {
    pub(super) body: Bytes,
    /// Its record, when asked for.
    pub(super) record: Option<Meta>,
    /// Whether the body is what its digest says.
    pub(super) intact: bool,
    pub(super) mtime: u64,
}

/// Where a lookup reads a stored image: a file of its own, opened by its path, or a slot of
/// a segment (its file already open: no `open`, no `fstat`).
pub(super) enum Source {
    Path(PathBuf),
    Slot(Arc<Slot>),
}

impl Source {
    /// The image of version `version` of `hash` (in `coding`, for a variant) at `place`.
    pub(super) fn of(store: &Store, hash: &KeyHash, version: u64, coding: Option<Coding>, place: &Place) -> Source {
        match (place, coding) {
            (Place::Slot(slot), _) => Source::Slot(slot.clone()),
            (Place::File, None) => Source::Path(store.object_path(hash, version)),
            (Place::File, Some(coding)) => Source::Path(store.variant_path(hash, version, coding)),
        }
    }

    /// Opens it: its file and where the image starts in it.
    fn backing(&self) -> std::io::Result<Backing> {
        match self {
            Source::Path(path) => Ok(Backing::File(Arc::new(fileio::open_for_read(path)?))),
            Source::Slot(slot) => Ok(Backing::Slot(slot.clone())),
        }
    }

    /// [`Source::backing`], an error naming it.
    fn open(&self) -> Result<Backing, StoreError> {
        self.backing().map_err(|e| StoreError::io("open", self.describe(), e))
    }

    /// What it is, for errors.
    pub(super) fn describe(&self) -> PathBuf {
        match self {
            Source::Path(path) => path.clone(),
            Source::Slot(slot) => slot.describe(),
        }
    }

    /// Reads `len` bytes of the image from `offset` (blocking).
    pub(super) fn read(&self, len: u64, offset: u64) -> Result<Vec<u8>, StoreError> {
        // (Not `[u8]`: a `Vec`, which `Bytes` takes without a copy.)
        let from = self.open()?;
        let (file, base) = from.parts();
        fileio::read_at(file, len as usize, base + offset).map_err(|e| StoreError::io("read", self.describe(), e))
    }

    /// Reads the record of an object image of `len` bytes found at startup (blocking):
    /// [`store::read_found`].
    pub(super) fn found(&self, len: u64) -> Result<Meta, ReadError> {
        let from = self.backing()?;
        let (file, base) = from.parts();
        store::read_found(file, base, len)
    }

    /// Reads the record of a variant image of `len` bytes found at startup (blocking).
    pub(super) fn variant_found(&self, len: u64) -> Result<store::VariantRecord, ReadError> {
        let from = self.backing()?;
        let (file, base) = from.parts();
        store::read_variant_found(file, base, len)
    }

    /// Reads the record of an object image of `body_len` and `tail_len` bytes (blocking).
    pub(super) fn read_record(&self, body_len: u64, tail_len: u64) -> Result<Meta, StoreError> {
        let from = self.open()?;
        let (file, base) = from.parts();
        in_context(store::read_record(file, base, body_len, tail_len), "read", self)
    }
}

/// A read's error, naming what was read only when there is one.
fn in_context<T>(r: Result<T, ReadError>, op: &'static str, source: &Source) -> Result<T, StoreError> {
    match r {
        Ok(value) => Ok(value),
        Err(e) => Err(e).at(op, &source.describe()),
    }
}

/// Opens an object: its body (read, or mapped from `min_mmap` bytes), its record when
/// `want_record` (read in the same `pread` as a body that is read), whether the body is intact,
/// and the file's mtime. Blocking: off the runtime ([`open_object_cached`] on it).
pub(super) fn open_object(source: &Source, expect: Expected, want_record: bool) -> Result<Opened, StoreError> {
    open_with(source, expect, want_record, false).map(|o| o.expect("a blocking open always answers"))
}

/// [`open_object`] on the event loop, only if that needs no disk I/O and no hashing:
/// `Ok(None)` otherwise, for the caller to open it off the runtime.
pub(super) fn open_object_cached(
    source: &Source,
    expect: Expected,
    want_record: bool,
) -> Result<Option<Opened>, StoreError> {
    open_with(source, expect, want_record, true)
}

fn open_with(source: &Source, expect: Expected, want_record: bool, nowait: bool) -> Result<Option<Opened>, StoreError> {
    let from = source.open()?;
    let (file, base) = from.parts();
    let file_len = expect.len + expect.tail_len;
    let mapped = expect.len > 0 && expect.len >= expect.min_mmap;
    // A mapped body's record is read on its own, before the mapping is made.
    let mut record = match (want_record && mapped, nowait) {
        (true, true) => match in_context(
            store::read_record_cached(file, base, expect.len, expect.tail_len),
            "read",
            source,
        )? {
            Some(meta) => Some(meta),
            None => return Ok(None),
        },
        (true, false) => Some(in_context(
            store::read_record(file, base, expect.len, expect.tail_len),
            "read",
            source,
        )?),
        (false, _) => None,
    };
    let extra = if want_record { expect.tail_len } else { 0 };
    let body = if nowait {
        crate::zerocopy::map_body_cached(from, expect.len, file_len, extra, expect.min_mmap)
    } else {
        crate::zerocopy::map_body(from, expect.len, file_len, extra, expect.min_mmap).map(Some)
    };
    let Some((mut body, mtime)) = in_context(body, "map", source)? else {
        return Ok(None);
    };
    if want_record && !mapped {
        record = Some(in_context(
            store::decode_tail(&body[expect.len as usize..]),
            "decode",
            source,
        )?);
        body.truncate(expect.len as usize);
    }
    // Hashed before it is served when it is from before a restart, or when its file changed
    // since it was written or checked (object files are never rewritten in place).
    let intact = if expect.verified && mtime == expect.mtime {
        true
    } else if nowait {
        return Ok(None);
    } else {
        Digest::from(blake3::hash(&body)) == expect.digest
    };
    Ok(Some(Opened {
        body,
        record,
        intact,
        mtime,
    }))
}

impl Cache {
    /// The value of a blocking storage step of a lookup; a storage error drops the entry (the
    /// request then goes to the app) and reads as `None`. A file found corrupt is removed and
    /// counted as such ([`Cache::drop_corrupt`]); other errors are counted by their kind.
    pub(super) async fn or_drop<T>(
        &self,
        result: Result<Result<T, StoreError>, tokio::task::JoinError>,
        hash: &KeyHash,
        generation: u64,
    ) -> Option<T> {
        match result {
            Ok(Ok(value)) => Some(value),
            Ok(Err(e @ StoreError::Corrupt { .. })) => {
                self.drop_corrupt(hash, generation, &e).await;
                None
            }
            Ok(Err(e)) => {
                self.storage_error(&e);
                // Out of descriptors or memory says nothing about the object: keep it.
                if !e.is_exhaustion() {
                    self.drop_entry(hash, generation).await;
                }
                None
            }
            Err(_) => None,
        }
    }

    /// The length of the object file indexed under `key`'s own hash (objects without `Vary`),
    /// if it is `key`'s.
    pub fn object_len(&self, key: &CacheKey) -> Option<u64> {
        let ix = self.lock_index();
        let e = ix.peek(&key.hash())?;
        (*e.key == *key.as_str()).then_some(e.image.body_len + e.image.tail_len)
    }

    /// The whole object file indexed under `key`'s own hash, as it is on disk (`body | record
    /// | footer`), read off the event loop; `None` when there is none or it cannot be read
    /// whole. The shared tier uploads these bytes; they are checked before they leave.
    pub async fn read_object(&self, key: &CacheKey) -> Option<Bytes> {
        let store = self.store()?;
        let hash = key.hash();
        let (source, len) = {
            let ix = self.lock_index();
            let e = ix.peek(&hash)?;
            if *e.key != *key.as_str() {
                return None;
            }
            (
                Source::of(&store, &hash, e.image.generation, None, &e.image.place),
                e.image.file_len(),
            )
        };
        let read = tokio::task::spawn_blocking(move || source.read(len, 0).map(Bytes::from)).await;
        match read {
            Ok(Ok(bytes)) if bytes.len() as u64 == len => Some(bytes),
            _ => None,
        }
    }

    /// Removes an entry whose file was found corrupt, if it is still the given version, and
    /// counts it in `sidecache_corrupt_objects_total` ("objects found corrupt and removed"):
    /// counted by whichever reader removed it, so two readers meeting the same corrupt file (a
    /// lookup and the compressor, two lookups) count one object once.
    pub(super) async fn drop_corrupt(&self, hash: &KeyHash, generation: u64, why: impl std::fmt::Display) {
        if self.drop_entry(hash, generation).await {
            metrics::counter!(m::CORRUPT_OBJECTS).increment(1);
            warn!(key = %hash, reason = %why, "corrupt object removed");
        }
    }

    /// Removes a key's entry if it is still the given version; whether this call removed it.
    pub(super) async fn drop_entry(&self, hash: &KeyHash, generation: u64) -> bool {
        let removed = {
            let mut ix = self.lock_index();
            match ix.peek(hash) {
                Some(e) if e.image.generation == generation => ix.remove(hash),
                _ => None,
            }
        };
        self.tiers.forget(hash);
        match removed {
            Some(r) => {
                self.unlink(vec![r]).await;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::store::Store;
    use crate::cache::testing;

    fn expect(meta: &Meta, mtime: u64, verified: bool, min_mmap: u64) -> Expected {
        Expected {
            len: meta.body_len,
            tail_len: store::tail_len(meta),
            digest: meta.digest,
            verified,
            mtime,
            min_mmap,
        }
    }

    #[test]
    fn an_object_opens_with_its_record_and_a_changed_body_reads_as_not_intact() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("cache")).expect("store");
        let body = b"body of a.js".repeat(100);
        let meta = testing::meta("http://app.example/a.js", &body);
        let generation = store.next_gen();
        testing::write_object(&store, &meta, &body, generation, 0);
        let path = store.object_path(&meta.storage_hash(), generation);
        for min_mmap in [u64::MAX, 1] {
            // Read, then mapped: the same body and record either way, hashed (not verified yet).
            let opened =
                open_object(&Source::Path(path.clone()), expect(&meta, 0, false, min_mmap), true).expect("opens");
            assert_eq!(&opened.body[..], &body[..]);
            assert_eq!(opened.record.expect("asked for").key, meta.key);
            assert!(opened.intact);
            // Verified at this mtime: not hashed again, and not read inline only if it must be.
            let known = expect(&meta, opened.mtime, true, min_mmap);
            assert!(
                open_object(&Source::Path(path.clone()), known, false)
                    .expect("opens")
                    .intact
            );
        }
        // A body whose bytes are not what its digest says.
        let mut other = meta.clone();
        other.digest = Digest::from(blake3::hash(b"something else"));
        let opened =
            open_object(&Source::Path(path.clone()), expect(&other, 0, false, u64::MAX), false).expect("opens");
        assert!(!opened.intact);
        assert!(opened.record.is_none());
        // Hashing would be needed: an inline open declines.
        assert!(
            open_object_cached(&Source::Path(path.clone()), expect(&meta, 0, false, u64::MAX), false)
                .expect("opens")
                .is_none()
        );
    }
}
