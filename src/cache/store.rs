//! The cache directory on disk. The only module that turns a [`KeyHash`] or [`Digest`] into a
//! path.
//!
//! ```text
//! <cache_dir>/objects-v1/tmp/<gen>.<kind>          being written; swept at startup
//! <cache_dir>/objects-v1/meta/<kh:2>/<keyhash>.<gen> one record per stored version of a key
//! <cache_dir>/objects-v1/body/<d:2>/<digest>.<gen>   bodies, content-addressed by blake3
//! <cache_dir>/lock                                  held (flock) while a process uses the dir
//! ```
//! Every stored file has a version (`gen`) in its name: a new version never lands on the path
//! of one being evicted, so an unlink can only ever remove the version it meant to.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::cache::key::{Digest, KeyHash};
use crate::cache::meta::{MAX_RECORD, Meta};

/// Storage failures, each naming the object it concerns.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory could not be prepared.
    #[error("failed to prepare cache directory {path}: {source}")]
    Prepare {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Another process holds the directory.
    #[error("cache directory {path} is in use by another sidecache process")]
    Locked {
        /// The directory.
        path: PathBuf,
    },
    /// A file operation failed.
    #[error("failed to {op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl StoreError {
    /// A closed label for the storage-errors metric.
    pub fn kind(&self) -> &'static str {
        let source = match self {
            StoreError::Prepare { source, .. } | StoreError::Io { source, .. } => source,
            StoreError::Locked { .. } => return "locked",
        };
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => "no_space",
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => "permission",
            Some(libc::ENOENT) => "missing",
            _ if source.kind() == std::io::ErrorKind::InvalidData => "corrupt",
            _ => "io",
        }
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// The on-disk layout of one cache directory.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    objects: PathBuf,
    next_gen: AtomicU64,
    _lock: File,
}

/// A file found by a directory scan.
#[derive(Debug)]
pub struct Found<T> {
    /// What its name says.
    pub id: T,
    /// Its version.
    pub generation: u64,
    /// Its length.
    pub len: u64,
    /// Its modification time.
    pub modified: SystemTime,
}

impl Store {
    /// Creates the layout under `root`, takes the directory lock and sweeps `tmp/`.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        let prepare = |source| StoreError::Prepare {
            path: root.to_owned(),
            source,
        };
        let objects = root.join("objects-v1");
        for sub in ["tmp", "meta", "body"] {
            fs::create_dir_all(objects.join(sub)).map_err(prepare)?;
        }
        // Held read-only (flock does not need write access): no descriptor keeps the
        // filesystem from being remounted read-only underneath a running sidecar.
        let lock_path = root.join("lock");
        if !lock_path.exists() {
            File::create(&lock_path).map_err(prepare)?;
        }
        let lock = File::open(&lock_path).map_err(prepare)?;
        if !try_lock(&lock) {
            return Err(StoreError::Locked { path: root.to_owned() });
        }
        // Generations only need to be unique per directory: start past anything a previous
        // process of this deploy can have written.
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        let store = Store {
            root: root.to_owned(),
            objects,
            next_gen: AtomicU64::new(now),
            _lock: lock,
        };
        store.sweep_tmp()?;
        Ok(store)
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A fresh, never-used version number.
    pub fn next_gen(&self) -> u64 {
        self.next_gen.fetch_add(1, Ordering::Relaxed)
    }

    fn tmp_path(&self, generation: u64, kind: &str) -> PathBuf {
        self.objects.join("tmp").join(format!("{generation:016x}.{kind}"))
    }

    /// Where a meta record version lives.
    pub fn meta_path(&self, key: &KeyHash, generation: u64) -> PathBuf {
        let hex = key.to_hex();
        self.objects
            .join("meta")
            .join(&hex[..2])
            .join(format!("{hex}.{generation:016x}"))
    }

    /// Where a body version lives.
    pub fn body_path(&self, digest: &Digest, generation: u64) -> PathBuf {
        let hex = digest.to_hex();
        self.objects
            .join("body")
            .join(&hex[..2])
            .join(format!("{hex}.{generation:016x}"))
    }

    /// Removes everything in `tmp/`: leftovers of fills a crash interrupted.
    fn sweep_tmp(&self) -> Result<usize, StoreError> {
        let dir = self.objects.join("tmp");
        let mut n = 0;
        for entry in fs::read_dir(&dir).map_err(io("read", &dir))? {
            let Ok(entry) = entry else { continue };
            if fs::remove_file(entry.path()).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Creates a temporary body file for a fill, open for reading and writing.
    pub fn create_tmp_body(&self, generation: u64) -> Result<(File, PathBuf), StoreError> {
        let path = self.tmp_path(generation, "body");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io("create", &path))?;
        Ok((file, path))
    }

    /// Moves a finished temporary body into place.
    pub fn commit_body(&self, tmp: &Path, digest: &Digest, generation: u64) -> Result<(), StoreError> {
        let path = self.body_path(digest, generation);
        rename_into(tmp, &path)
    }

    /// Writes a meta record through `tmp/` and renames it into place.
    pub fn write_meta(&self, key: &KeyHash, generation: u64, record: &[u8]) -> Result<(), StoreError> {
        let tmp = self.tmp_path(generation, "meta");
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        if let Err(e) = f.write_all(record) {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::Io {
                op: "write",
                path: tmp,
                source: e,
            });
        }
        drop(f);
        let result = rename_into(&tmp, &self.meta_path(key, generation));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Reads and decodes a meta record.
    pub fn read_meta(&self, key: &KeyHash, generation: u64) -> Result<Meta, StoreError> {
        read_meta_file(&self.meta_path(key, generation))
    }

    /// A body version's modification time (ns; 0 when it cannot be read).
    pub fn body_mtime(&self, digest: &Digest, generation: u64) -> u64 {
        fs::metadata(self.body_path(digest, generation))
            .map(|md| crate::cache::mmap::mtime_ns(&md))
            .unwrap_or(0)
    }

    /// Opens a body version for reading.
    pub fn open_body(&self, digest: &Digest, generation: u64) -> Result<File, StoreError> {
        let path = self.body_path(digest, generation);
        File::open(&path).map_err(io("open", &path))
    }

    /// Removes a file; a file already gone is not an error.
    pub fn remove(&self, path: &Path) -> Result<(), StoreError> {
        match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Io {
                op: "remove",
                path: path.to_owned(),
                source: e,
            }),
        }
    }

    /// Every meta record file on disk.
    pub fn scan_meta(&self) -> Vec<Found<KeyHash>> {
        scan(&self.objects.join("meta"), KeyHash::from_hex)
    }

    /// Every body file on disk.
    pub fn scan_bodies(&self) -> Vec<Found<Digest>> {
        scan(&self.objects.join("body"), Digest::from_hex)
    }
}

/// Reads and decodes a meta record file.
pub fn read_meta_file(path: &Path) -> Result<Meta, StoreError> {
    read_meta(path, false).map(|m| m.expect("a blocking read always answers"))
}

/// [`read_meta_file`] without waiting for the disk: `Ok(None)` when the record is not in the
/// page cache (read it off the runtime then).
pub fn read_meta_nowait(path: &Path) -> Result<Option<Meta>, StoreError> {
    read_meta(path, true)
}

fn read_meta(path: &Path, nowait: bool) -> Result<Option<Meta>, StoreError> {
    let bytes = if nowait {
        let file = fs::File::open(path).map_err(io("open", path))?;
        let len = file.metadata().map_err(io("stat", path))?.len() as usize;
        let mut buf = vec![0u8; len.min(MAX_RECORD + 65)];
        if !crate::cache::mmap::read_exact_at_nowait(&file, &mut buf, 0).map_err(io("read", path))? {
            return Ok(None);
        }
        buf
    } else {
        fs::read(path).map_err(io("read", path))?
    };
    if bytes.len() > MAX_RECORD + 64 {
        return Err(StoreError::Io {
            op: "decode",
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "record too large"),
        });
    }
    Meta::decode(&bytes).map(Some).map_err(|e| StoreError::Io {
        op: "decode",
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

fn rename_into(from: &Path, to: &Path) -> Result<(), StoreError> {
    match fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // The two-hex-digit fan-out directory is created on first use.
            let parent = to.parent().expect("object paths have a parent");
            fs::create_dir_all(parent).map_err(io("create", parent))?;
            fs::rename(from, to).map_err(io("rename", to))
        }
        Err(e) => Err(StoreError::Io {
            op: "rename",
            path: to.to_owned(),
            source: e,
        }),
    }
}

fn scan<T>(dir: &Path, parse: fn(&str) -> Option<T>) -> Vec<Found<T>> {
    let mut out = Vec::new();
    let Ok(fanout) = fs::read_dir(dir) else { return out };
    for sub in fanout.flatten() {
        let Ok(files) = fs::read_dir(sub.path()) else { continue };
        for file in files.flatten() {
            let name = file.file_name();
            let Some(name) = name.to_str() else { continue };
            let parsed = name
                .split_once('.')
                .and_then(|(id, g)| Some((parse(id)?, u64::from_str_radix(g, 16).ok()?)));
            let Ok(md) = file.metadata() else { continue };
            match parsed {
                Some((id, generation)) => out.push(Found {
                    id,
                    generation,
                    len: md.len(),
                    modified: md.modified().unwrap_or(UNIX_EPOCH),
                }),
                // Not ours (or mangled): nothing may be served from it.
                None => {
                    let _ = fs::remove_file(file.path());
                }
            }
        }
    }
    out
}

fn try_lock(file: &File) -> bool {
    file.try_lock().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_directory_serves_one_process_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path()).unwrap();
        assert!(matches!(Store::open(dir.path()), Err(StoreError::Locked { .. })));
        drop(first);
        assert!(Store::open(dir.path()).is_ok(), "the lock goes with its holder");
    }

    #[test]
    fn startup_sweeps_half_written_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (_, tmp) = store.create_tmp_body(store.next_gen()).unwrap();
        drop(store);
        assert!(tmp.exists());
        let _store = Store::open(dir.path()).unwrap();
        assert!(!tmp.exists());
    }
}
