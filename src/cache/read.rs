//! The disk side of a lookup: what the index expects of an object file ([`Expected`]),
//! opening it for a hit ([`open_object`]: its body read or mapped, its record, whether the
//! body is intact), and dropping an entry whose file fails that. It owns no state and no lock:
//! `open_object` is plain file work (called inline only when it would not wait for the disk),
//! and dropping an entry takes the budget's `index` for one step, then the tiers, then unlinks.

use crate::cache::key::{CacheKey, Digest, KeyHash};
use crate::cache::meta::Meta;
use crate::cache::store::{self, IoContext, StoreError};
use crate::cache::{Cache, fileio};
use crate::metrics as m;
use bytes::Bytes;
use tracing::warn;

/// What the index says an object file holds.
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

/// An object file opened for a hit.
pub(super) struct Opened {
    pub(super) body: Bytes,
    /// Its record, when asked for.
    pub(super) record: Option<Meta>,
    /// Whether the body is what its digest says.
    pub(super) intact: bool,
    pub(super) mtime: u64,
}

/// Opens an object: its body (read, or mapped from `min_mmap` bytes), its record when
/// `want_record` (read in the same `pread` as a body that is read), whether the body is intact,
/// and the file's mtime. Blocking: off the runtime ([`open_object_cached`] on it).
pub(super) fn open_object(path: &std::path::Path, expect: Expected, want_record: bool) -> Result<Opened, StoreError> {
    open_with(path, expect, want_record, false).map(|o| o.expect("a blocking open always answers"))
}

/// [`open_object`] on the event loop, only if that needs no disk I/O and no hashing:
/// `Ok(None)` otherwise, for the caller to open it off the runtime.
pub(super) fn open_object_cached(
    path: &std::path::Path,
    expect: Expected,
    want_record: bool,
) -> Result<Option<Opened>, StoreError> {
    open_with(path, expect, want_record, true)
}

fn open_with(
    path: &std::path::Path,
    expect: Expected,
    want_record: bool,
    nowait: bool,
) -> Result<Option<Opened>, StoreError> {
    let file = fileio::open_for_read(path).at("open", path)?;
    let file_len = expect.len + expect.tail_len;
    let mapped = expect.len > 0 && expect.len >= expect.min_mmap;
    // A mapped body's record is read on its own, before the mapping is made.
    let mut record = match (want_record && mapped, nowait) {
        (true, true) => match store::read_record_cached(&file, expect.len, expect.tail_len).at("read", path)? {
            Some(meta) => Some(meta),
            None => return Ok(None),
        },
        (true, false) => Some(store::read_record(&file, expect.len, expect.tail_len).at("read", path)?),
        (false, _) => None,
    };
    let extra = if want_record { expect.tail_len } else { 0 };
    let body = if nowait {
        crate::zerocopy::map_body_cached(file, expect.len, file_len, extra, expect.min_mmap)
    } else {
        crate::zerocopy::map_body(file, expect.len, file_len, extra, expect.min_mmap).map(Some)
    };
    let Some((mut body, mtime)) = body.at("map", path)? else {
        return Ok(None);
    };
    if want_record && !mapped {
        record = Some(store::decode_tail(&body[expect.len as usize..]).at("decode", path)?);
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
        (*e.key == *key.as_str()).then_some(e.body_len + e.tail_len)
    }

    /// The whole object file indexed under `key`'s own hash, as it is on disk (`body | record
    /// | footer`), read off the event loop; `None` when there is none or it cannot be read
    /// whole. The shared tier uploads these bytes; they are checked before they leave.
    pub async fn read_object(&self, key: &CacheKey) -> Option<Bytes> {
        let store = self.store()?;
        let hash = key.hash();
        let (generation, len) = {
            let ix = self.lock_index();
            let e = ix.peek(&hash)?;
            if *e.key != *key.as_str() {
                return None;
            }
            (e.generation, e.body_len + e.tail_len)
        };
        let path = store.object_path(&hash, generation);
        let read = tokio::task::spawn_blocking(move || -> std::io::Result<Bytes> {
            let file = fileio::open_for_read(&path)?;
            Ok(Bytes::from(fileio::read_at(&file, len as usize, 0)?))
        })
        .await;
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
                Some(e) if e.generation == generation => ix.remove(hash),
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
            let opened = open_object(&path, expect(&meta, 0, false, min_mmap), true).expect("opens");
            assert_eq!(&opened.body[..], &body[..]);
            assert_eq!(opened.record.expect("asked for").key, meta.key);
            assert!(opened.intact);
            // Verified at this mtime: not hashed again, and not read inline only if it must be.
            let known = expect(&meta, opened.mtime, true, min_mmap);
            assert!(open_object(&path, known, false).expect("opens").intact);
        }
        // A body whose bytes are not what its digest says.
        let mut other = meta.clone();
        other.digest = Digest::from(blake3::hash(b"something else"));
        let opened = open_object(&path, expect(&other, 0, false, u64::MAX), false).expect("opens");
        assert!(!opened.intact);
        assert!(opened.record.is_none());
        // Hashing would be needed: an inline open declines.
        assert!(
            open_object_cached(&path, expect(&meta, 0, false, u64::MAX), false)
                .expect("opens")
                .is_none()
        );
    }
}
