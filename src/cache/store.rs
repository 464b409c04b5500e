//! The cache directory on disk. The only module that turns a [`KeyHash`] into a path, and the
//! one that knows how an object file is laid out.
//!
//! ```text
//! <cache_dir>/objects-v3/segments/<id>.seg          small objects and variants, packed
//!                                                   (`cache::segments`: slots of images)
//! <cache_dir>/objects-v3/tmp/<gen>.obj              being written; swept at startup
//!                                                   (unnamed `O_TMPFILE`s instead where the
//!                                                   filesystem has them: nothing to sweep)
//! <cache_dir>/objects-v3/<kh:2>/<keyhash>.<gen>     a large object's file, one per version
//! <cache_dir>/objects-v3/<kh:2>/<keyhash>.<gen>.br  a compressed variant of a key's body
//!                                                   (`.zst`, `.gz`), versioned on its own
//! <cache_dir>/objects-v3/generations                where the next run's versions start
//! <cache_dir>/objects-v3/soft-purged                soft-purge marks: (key, version, when)
//! <cache_dir>/lock                                  held (flock) while a process uses the dir
//! ```
//!
//! An object's *image* is `body | record | footer`, the same in a file of its own and in a
//! segment's slot. The body comes first, at the image's offset 0, so a mapping of it is a
//! mapping of the body and `sendfile` sends it with the image's own offsets; the record
//! ([`Meta`], checksummed, holding the body's length and blake3 digest) follows it, and the
//! 12-byte footer (`u32 record length | "SCOBJ002"`) ends the image, so the startup scan finds
//! the record from the image's length alone. Readers take a `base` (0 for a file of its own, a
//! slot's offset in its segment). Bodies under 64 KiB go to segments (no inode, no name, no
//! `open` per hit: `cache::segments`); a large body's file is written unnamed (or under
//! `tmp/`) while its clients read it and linked into place whole. Where the filesystem cannot
//! punch holes (no segments), a small body's file is written under its final name in one
//! `pwritev` ([`Store::write_object`]) before the index learns of it. Either way a name in a
//! fan-out directory is a complete object, or a torn one a crash cut short, which its footer
//! and record checksum reveal. A body's digest is checked before its first use after a
//! restart.
//!
//! A compressed variant's image is `coded body | variant record` (fixed length: magic,
//! coding, the coded body's length and blake3 digest, the length and digest of the body it was
//! made from, a checksum), in a slot or a file of its own named by the key's hash and its own
//! version; the startup scan attaches it to the key's indexed object when that object's body
//! is the one it was made from, and removes it otherwise.
//!
//! Every stored image has a version (`gen`): a new version never lands on the path (or the
//! slot) of one being evicted, so an unlink can only ever remove the version it meant to.
//! Layouts of earlier versions (`objects-v1`, `objects-v2`: one file per object) are removed
//! whole at startup, never read.
//!
//! Nothing here follows a symbolic link planted in the directory. The cache directory itself
//! must be a real directory owned by this process's user (else it is refused, naming the
//! path); it is made private (0700) if it is not. Every directory under it is created 0700 and
//! opened with `O_NOFOLLOW` under its parent's descriptor; a symbolic link (or any other file)
//! where a directory of the layout belongs is removed, never followed. `lock` and
//! `generations` are opened with `O_NOFOLLOW` under the directory's descriptor, and startup
//! sweeps remove entries with `unlinkat` under the descriptor of the directory they are in, so
//! they can only ever remove the entry itself, never what a link points to. Files are 0600.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use crate::cache::key::{Digest, KeyHash};
use crate::cache::meta::{MAX_RECORD, Meta};
use crate::negotiate::Coding;

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
    /// The directory is not one this process may trust: a symbolic link, not a directory, or
    /// owned by another user.
    #[error("refusing cache directory {path}: {reason}")]
    Unsafe {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file read fine and does not hold what it should: torn, changed underneath, foreign.
    #[error("{path} is corrupt: {what}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
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
    /// True when the process ran out of descriptors or memory: nothing is wrong with the
    /// object the operation concerned.
    pub fn is_exhaustion(&self) -> bool {
        let StoreError::Io { source, .. } = self else {
            return false;
        };
        matches!(source.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM))
    }

    /// A closed label for the storage-errors metric.
    pub fn kind(&self) -> &'static str {
        let source = match self {
            StoreError::Prepare { source, .. } | StoreError::Io { source, .. } => source,
            StoreError::Locked { .. } => return "locked",
            StoreError::Unsafe { .. } => return "unsafe",
            StoreError::Corrupt { .. } => return "corrupt",
        };
        match source.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => "no_space",
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => "permission",
            Some(libc::ENOENT) => "missing",
            _ => "io",
        }
    }
}

impl StoreError {
    /// An I/O failure of step `op` on `path`.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> StoreError {
        StoreError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Names the step and the file an I/O error came from (as cacache's `IoErrorExt`): the path
/// is copied only when there is an error.
pub trait IoContext<T> {
    /// The value, or [`StoreError::Io`] naming `op` and `path`.
    fn at(self, op: &'static str, path: &Path) -> Result<T, StoreError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, op: &'static str, path: &Path) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::io(op, path, source))
    }
}

/// Why a cache file could not be read as what it should hold: the file system failed, or the
/// file was read and its contents are wrong. Only the path is missing to make it a
/// [`StoreError`]: [`IoContext::at`] adds it.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A read (or open, or stat) failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The bytes read are not a valid record, or not the length the record or the index says.
    #[error("{0}")]
    Corrupt(String),
}

impl ReadError {
    fn corrupt(what: impl Into<String>) -> ReadError {
        ReadError::Corrupt(what.into())
    }

    /// A failed read of bytes the record or the index says are there: a file that ends
    /// before them is corrupt (cut short), not a failed read.
    pub fn of_read(e: std::io::Error) -> ReadError {
        match e.kind() {
            std::io::ErrorKind::UnexpectedEof => ReadError::corrupt("the file ends before the length it should have"),
            _ => ReadError::Io(e),
        }
    }
}

impl<T> IoContext<T> for Result<T, ReadError> {
    fn at(self, op: &'static str, path: &Path) -> Result<T, StoreError> {
        self.map_err(|e| match e {
            ReadError::Io(source) => StoreError::io(op, path, source),
            ReadError::Corrupt(what) => StoreError::Corrupt {
                path: path.to_owned(),
                what,
            },
        })
    }
}

/// Makes the file at `path` with `make`, creating its fan-out directory first when it is
/// missing (they are made on first use); `op` names the step in an error.
fn in_its_dir<T>(path: &Path, op: &'static str, make: impl Fn() -> std::io::Result<T>) -> Result<T, StoreError> {
    match make() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let parent = path.parent().expect("object paths have a parent");
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .at("create", parent)?;
            make()
        }
        other => other,
    }
    .at(op, path)
}

/// The on-disk layout of one cache directory.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    objects: PathBuf,
    next_gen: AtomicU64,
    /// The first generation this process gave out: files of later ones are its own.
    first_gen: u64,
    /// How files being written are named, found by trying at open.
    tmp_mode: TmpMode,
    /// The filesystem's allocation unit: what the smallest file spends.
    unit: u64,
    /// Held (flocked) while this process uses the directory; also how the filesystem is asked
    /// for its free space.
    lock: File,
    /// `objects-v3/`, for the layout's own files (the soft-purge marks).
    objects_fd: OwnedFd,
}

/// What the cache directory's filesystem has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    /// Bytes free to unprivileged writers.
    pub free: u64,
    /// Bytes in all.
    pub total: u64,
    /// Inodes (files) free to unprivileged writers.
    pub free_files: u64,
    /// Inodes in all; 0 on filesystems without a fixed number (btrfs, some FUSE).
    pub total_files: u64,
}

/// Fixed entries of the layout, charged one allocation unit each whatever is stored: the
/// cache directory, `objects-v3`, `tmp`, `segments` and its `key`, `lock` and `generations`.
pub const LAYOUT_FIXED: u64 = 7;

/// Fan-out directories there can be under `objects-v3` (the first byte of a key's hash).
pub const FANOUT_DIRS: u64 = 256;

/// What one name costs in a directory, conservatively: ext4 spends 92 bytes on an object's
/// name, and its hashed directories keep leaf blocks from half full. Directories never
/// shrink, so the layout is charged this for every object it may hold (one name each).
pub const NAME_COST: u64 = 256;

/// The layout's directory under the cache directory; the number is the layout's version.
pub const OBJECTS: &str = "objects-v3";
/// The version of an object image (`body | record | footer`), whether in a file or a slot:
/// the shared tier names its objects' directory after it, so a new image format is never read
/// from a bucket written in the old one. (The local layout moved to `objects-v3` for segments;
/// the image inside did not change.)
pub const IMAGE_FORMAT: &str = "objects-v2";
/// Layouts of earlier versions: removed at startup, never read.
const OLD_LAYOUTS: &[&str] = &["objects-v1", "objects-v2"];

/// Bytes at the end of every object file: `u32 record length | FOOTER_MAGIC`.
pub const FOOTER_LEN: u64 = 12;
const FOOTER_MAGIC: &[u8; 8] = b"SCOBJ002";
/// How much of a file's end the startup scan reads in one go: the record and footer of
/// nearly every object.
const TAIL_READ: u64 = 4096;

/// What follows a body in its object file: the encoded record and the footer.
pub fn tail(meta: &Meta) -> Vec<u8> {
    let mut out = meta.encode();
    let len = out.len() as u32;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(FOOTER_MAGIC);
    out
}

/// The length of [`tail`] for `meta`, without a copy of it: the record's length does not
/// depend on the body's length or digest (fixed-width fields), so a fill knows its whole
/// file's size from the response head.
pub fn tail_len(meta: &Meta) -> u64 {
    meta.encoded_len() + FOOTER_LEN
}

/// Decodes the tail of an object file (record and footer, exactly), checking the footer.
pub fn decode_tail(bytes: &[u8]) -> Result<Meta, ReadError> {
    let Some(record_len) = footer_record_len(bytes) else {
        return Err(ReadError::corrupt("object footer missing"));
    };
    if record_len + FOOTER_LEN != bytes.len() as u64 {
        return Err(ReadError::corrupt("object footer does not match its record"));
    }
    Meta::decode(&bytes[..record_len as usize]).map_err(|e| ReadError::corrupt(e.to_string()))
}

/// The record length a footer at the end of `bytes` states; `None` when there is none.
fn footer_record_len(bytes: &[u8]) -> Option<u64> {
    let at = bytes.len().checked_sub(FOOTER_LEN as usize)?;
    let (len, magic) = bytes[at..].split_at(4);
    (magic == FOOTER_MAGIC).then(|| u64::from(u32::from_be_bytes(len.try_into().expect("4 bytes"))))
}

const VARIANT_MAGIC: &[u8; 8] = b"SCVAR001";
/// Bytes of a variant file after its coded body: its record.
pub const VARIANT_TAIL: u64 = 8 + 1 + 8 + 32 + 8 + 32 + 16;

/// What a variant file's record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VariantRecord {
    /// Its content coding.
    pub coding: Coding,
    /// The coded body's length.
    pub body_len: u64,
    /// The coded body's blake3 digest.
    pub digest: Digest,
    /// The length and digest of the body it was made from.
    pub made_from: (u64, Digest),
}

impl VariantRecord {
    /// `magic | u8 coding | u64 body_len | digest | u64 made-from length | made-from digest |
    /// blake3(all before)[..16]`, integers big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(VARIANT_TAIL as usize);
        out.extend_from_slice(VARIANT_MAGIC);
        out.push(self.coding.id());
        out.extend_from_slice(&self.body_len.to_be_bytes());
        out.extend_from_slice(&self.digest.0);
        out.extend_from_slice(&self.made_from.0.to_be_bytes());
        out.extend_from_slice(&self.made_from.1.0);
        let sum = blake3::hash(&out);
        out.extend_from_slice(&sum.as_bytes()[..16]);
        out
    }

    /// Decodes exactly one record, checking its magic and checksum.
    pub fn decode(bytes: &[u8]) -> Result<VariantRecord, ReadError> {
        let invalid = ReadError::corrupt;
        if bytes.len() as u64 != VARIANT_TAIL || &bytes[..8] != VARIANT_MAGIC {
            return Err(invalid("variant record missing"));
        }
        let (fields, sum) = bytes.split_at(bytes.len() - 16);
        if &blake3::hash(fields).as_bytes()[..16] != sum {
            return Err(invalid("variant record checksum mismatch"));
        }
        let u64_at = |at: usize| u64::from_be_bytes(fields[at..at + 8].try_into().expect("8 bytes"));
        let digest_at = |at: usize| Digest(fields[at..at + 32].try_into().expect("32 bytes"));
        Ok(VariantRecord {
            coding: Coding::from_id(fields[8]).ok_or_else(|| invalid("unknown coding"))?,
            body_len: u64_at(9),
            digest: digest_at(17),
            made_from: (u64_at(49), digest_at(57)),
        })
    }
}

/// Reads the record of a variant image of `len` bytes found at startup (at `base`, as
/// [`read_record`]); its coded body must
/// account for the rest of the file exactly.
pub fn read_variant_found(file: &File, base: u64, len: u64) -> Result<VariantRecord, ReadError> {
    let invalid = ReadError::corrupt;
    if len < VARIANT_TAIL {
        return Err(invalid("variant file too short"));
    }
    let bytes = crate::cache::fileio::read_at(file, VARIANT_TAIL as usize, base + len - VARIANT_TAIL)
        .map_err(ReadError::of_read)?;
    let record = VariantRecord::decode(&bytes)?;
    if record.body_len + VARIANT_TAIL != len {
        return Err(invalid("variant file length does not match its record"));
    }
    Ok(record)
}

/// How a file being written gets its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TmpMode {
    /// Written as an unnamed `O_TMPFILE` and linked into place with `linkat` through
    /// `/proc/self/fd`. Nothing is created in, or renamed out of, a shared directory: concurrent
    /// fills do not queue on one directory's lock or on the filesystem's rename lock, and a
    /// crash leaves nothing behind.
    Unnamed,
    /// Written under `tmp/` and renamed into place (filesystems without `O_TMPFILE`, no `/proc`).
    Named,
}

/// A file being written: an unnamed one, or one under `tmp/`. It cleans up after itself:
/// dropped before it is placed ([`Store::place_object`] takes it), a named one is removed and
/// an unnamed one is freed when its last descriptor closes. No failure path gives a temporary
/// file back by hand.
#[derive(Debug)]
pub struct Tmp {
    /// The open file.
    pub file: Arc<File>,
    /// Its path under `tmp/` when it has one, until it is placed.
    name: Option<PathBuf>,
}

impl Drop for Tmp {
    fn drop(&mut self) {
        if let Some(name) = self.name.take() {
            let _ = fs::remove_file(name);
        }
    }
}

impl Tmp {
    /// What to call it in errors.
    pub fn describe(&self) -> PathBuf {
        self.name
            .clone()
            .unwrap_or_else(|| PathBuf::from("(unnamed temporary file)"))
    }
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
    /// For a compressed variant's file: its coding.
    pub coding: Option<Coding>,
}

/// The directory of the segment files, under `objects-v3/` ([`crate::cache::segments`]).
const SEGMENTS: &str = "segments";
/// Its key file.
const SEGMENTS_KEY: &str = "key";
/// The file under `objects-v3/` holding the first version the next run may hand out.
const GENERATIONS: &str = "generations";
/// The file under `objects-v3/` holding the soft-purge marks: `MARKS_MAGIC`, then one
/// 32-byte record per mark, `[16] key hash | u64 version | u64 ms since the epoch`
/// (big-endian). Replaced whole (written aside, renamed over), so it is never torn. A mark
/// only ever makes an object stale sooner, so a damaged file cannot make anything be served
/// that should not: it is read as far as it makes sense and otherwise ignored.
const MARKS: &str = "soft-purged";
const MARKS_MAGIC: &[u8; 8] = b"SCMARK01";
const MARK_LEN: usize = 32;
/// Most marks read back (a file past it is ignored): two per object of a large cache.
const MAX_MARKS: usize = 4 << 20;
/// How many versions one run may hand out (a fill a microsecond for half a year): the next
/// run starts past them, whatever its clock says.
const RUN_GENERATIONS: u64 = 1 << 44;

impl Store {
    /// Creates the layout under `root`, takes the directory lock and sweeps `tmp/`.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Store::open_at(root, now)
    }

    /// [`Store::open`] with the clock reading `now` (ns since the epoch).
    fn open_at(root: &Path, now: u64) -> Result<Store, StoreError> {
        let prepare = |source| StoreError::Prepare {
            path: root.to_owned(),
            source,
        };
        let root_fd = open_root(root)?;
        let objects_fd = layout_dir(&root_fd, OBJECTS).map_err(prepare)?;
        let tmp_fd = layout_dir(&objects_fd, "tmp").map_err(prepare)?;
        let objects = root.join(OBJECTS);
        // Held read-only (flock does not need write access): no descriptor keeps the
        // filesystem from being remounted read-only underneath a running sidecar.
        let lock = open_lock(&root_fd).map_err(prepare)?;
        if !try_lock(&lock) {
            return Err(StoreError::Locked { path: root.to_owned() });
        }
        // Versions must be unique and increasing per directory (the newest record of a key
        // wins at startup, and a run's own files are told apart by number). A run starts past
        // the clock and past the bound the previous run recorded, and records its own: a clock
        // that stepped back cannot give a new version a number an old one has. On a read-only
        // disk nothing is stored anyway; the clock alone is used.
        let floor = read_small(&objects_fd, GENERATIONS)
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let first = now.max(floor);
        let _ = write_replace(
            &objects_fd,
            GENERATIONS,
            format!("{}\n", first.saturating_add(RUN_GENERATIONS)).as_bytes(),
        );
        let mut store = Store {
            root: root.to_owned(),
            objects,
            next_gen: AtomicU64::new(first),
            first_gen: first,
            tmp_mode: TmpMode::Named,
            unit: alloc_unit(&root_fd),
            lock,
            objects_fd,
        };
        sweep_tmp(&tmp_fd);
        if store.unnamed_tmp_works() {
            store.tmp_mode = TmpMode::Unnamed;
        }
        Ok(store)
    }

    /// The directory of the segment files (`objects-v3/segments`, created 0700 if missing),
    /// with its path.
    pub fn segments_dir(&self) -> Result<(OwnedFd, PathBuf), StoreError> {
        let fd = layout_dir(&self.objects_fd, SEGMENTS).at("prepare", &self.objects.join(SEGMENTS))?;
        Ok((fd, self.objects.join(SEGMENTS)))
    }

    /// The key that authenticates this directory's segment slots: made at random the first
    /// time, then read back (a 0600 file under `segments/`, replaced whole).
    pub fn segments_key(&self) -> Result<[u8; 32], StoreError> {
        let (dir, path) = self.segments_dir()?;
        let parse = |s: String| -> Option<[u8; 32]> {
            let s = s.trim();
            let mut key = [0u8; 32];
            if s.len() != 64 {
                return None;
            }
            for (i, b) in key.iter_mut().enumerate() {
                *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
            }
            Some(key)
        };
        if let Some(key) = read_small(&dir, SEGMENTS_KEY).and_then(parse) {
            return Ok(key);
        }
        let mut key = [0u8; 32];
        crate::cache::fileio::random(&mut key).at("make", &path.join(SEGMENTS_KEY))?;
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        write_replace(&dir, SEGMENTS_KEY, hex.as_bytes()).at("write", &path.join(SEGMENTS_KEY))?;
        Ok(key)
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The filesystem's allocation unit (bytes): files are charged in whole units.
    pub fn unit(&self) -> u64 {
        self.unit
    }

    /// The free and total bytes and inodes of the directory's filesystem.
    pub fn space(&self) -> Result<Space, StoreError> {
        let st = rustix::fs::fstatvfs(&self.lock)
            .map_err(std::io::Error::from)
            .at("statvfs", &self.root)?;
        Ok(Space {
            free: st.f_bavail.saturating_mul(st.f_frsize),
            total: st.f_blocks.saturating_mul(st.f_frsize),
            free_files: st.f_favail,
            total_files: st.f_files,
        })
    }

    /// Whether a generation was given out by this process (not found from an earlier one).
    pub fn is_own(&self, generation: u64) -> bool {
        generation >= self.first_gen
    }

    /// A fresh, never-used version number.
    pub fn next_gen(&self) -> u64 {
        self.next_gen.fetch_add(1, Ordering::Relaxed)
    }

    fn tmp_path(&self, generation: u64, kind: &str) -> PathBuf {
        self.objects.join("tmp").join(format!("{generation:016x}.{kind}"))
    }

    /// Where a version of a key's object lives: `objects-v3/<first hex byte>/<hex>.<generation
    /// as 16 hex digits>`, built in one allocation (disk hits compute it on every request).
    pub fn object_path(&self, key: &KeyHash, generation: u64) -> PathBuf {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let id = &key.0;
        let base = self.objects.as_os_str().as_encoded_bytes();
        let mut p = Vec::with_capacity(base.len() + 4 + 2 * id.len() + 1 + 16);
        p.extend_from_slice(base);
        p.push(b'/');
        p.extend_from_slice(&[HEX[(id[0] >> 4) as usize], HEX[(id[0] & 15) as usize], b'/']);
        for b in id {
            p.extend_from_slice(&[HEX[(b >> 4) as usize], HEX[(b & 15) as usize]]);
        }
        p.push(b'.');
        p.extend((0..16).rev().map(|i| HEX[((generation >> (4 * i)) & 15) as usize]));
        PathBuf::from(std::ffi::OsString::from_vec(p))
    }

    /// Whether this filesystem takes unnamed temporary files that can be linked into place:
    /// one is made, linked under `tmp/` and removed.
    fn unnamed_tmp_works(&self) -> bool {
        let Ok(file) = self.open_unnamed(false) else {
            return false;
        };
        let probe = self.tmp_path(self.next_gen(), "probe");
        let linked = link_fd(&file, &probe).is_ok();
        let _ = fs::remove_file(&probe);
        linked
    }

    fn open_unnamed(&self, read: bool) -> std::io::Result<File> {
        OpenOptions::new()
            .read(read)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .mode(0o600)
            .open(self.objects.join("tmp"))
    }

    /// Creates a file to write a new version into (`read`: open for reading too).
    fn create_tmp(&self, generation: u64, kind: &str, read: bool) -> Result<Tmp, StoreError> {
        if self.tmp_mode == TmpMode::Unnamed {
            let file = self.open_unnamed(read).at("create", &self.objects.join("tmp"))?;
            return Ok(Tmp {
                file: Arc::new(file),
                name: None,
            });
        }
        let path = self.tmp_path(generation, kind);
        let file = OpenOptions::new()
            .read(read)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .at("create", &path)?;
        Ok(Tmp {
            file: Arc::new(file),
            name: Some(path),
        })
    }

    /// Gives a finished file its final name (the fan-out directory is created on first use);
    /// placed, it is no longer a temporary file to remove.
    fn place(&self, tmp: &mut Tmp, to: &Path) -> Result<(), StoreError> {
        let put = || match &tmp.name {
            Some(name) => fs::rename(name, to),
            None => link_fd(&tmp.file, to),
        };
        in_its_dir(to, "place", put)?;
        tmp.name = None;
        Ok(())
    }

    /// Creates an object file to write, open for reading (by a fill's readers) and writing.
    pub fn create_tmp_object(&self, generation: u64) -> Result<Tmp, StoreError> {
        self.create_tmp(generation, "obj", true)
    }

    /// Moves a finished object file into place as version `generation` of `key`; its
    /// modification time (ns) after. On failure the temporary file goes with `tmp`.
    pub fn place_object(&self, mut tmp: Tmp, key: &KeyHash, generation: u64) -> Result<u64, StoreError> {
        self.place(&mut tmp, &self.object_path(key, generation))?;
        Ok(tmp
            .file
            .metadata()
            .map(|md| crate::cache::fileio::mtime_ns(&md))
            .unwrap_or(0))
    }

    /// Writes a whole object (`parts`: its body, then its [`tail`]) straight under its final
    /// name as version `generation` of `key`, in one `pwritev`; its modification time (ns).
    ///
    /// No temporary file and no link: the name is new (its version is) and the index learns of
    /// it only after this returns, so no reader can see it partly written; a crash that cuts
    /// it short leaves a file without its footer, or with a body its digest rejects, which the
    /// next startup (or first use) removes. For bodies small enough to be received whole
    /// before they are written: larger ones are written while readers read them, through
    /// [`Store::create_tmp_object`] and [`Store::place_object`].
    pub fn write_object(&self, key: &KeyHash, generation: u64, parts: &[&[u8]]) -> Result<u64, StoreError> {
        self.write_new(self.object_path(key, generation), parts)
    }

    /// Where a compressed variant of `key`'s body lives: beside its objects, its own version
    /// and the coding's suffix in its name.
    pub fn variant_path(&self, key: &KeyHash, generation: u64, coding: Coding) -> PathBuf {
        let mut path = self.object_path(key, generation).into_os_string();
        path.push(".");
        path.push(coding.ext());
        PathBuf::from(path)
    }

    /// Writes a whole variant file (`parts`: the coded body, then its record's encoding) aside
    /// and links it into place whole; its modification time (ns). Variants are written by the
    /// compressing threads, which a process exit (a graceful stop included) can end in the
    /// middle of a write: written under its final name, such a file was torn and counted as a
    /// corrupt object at the next start. Aside (an unnamed file, or one under `tmp/`), an
    /// interrupted write leaves nothing under an object's name.
    pub fn write_variant(
        &self,
        key: &KeyHash,
        generation: u64,
        coding: Coding,
        parts: &[&[u8]],
    ) -> Result<u64, StoreError> {
        // Dropped on any failure, the temporary file goes.
        let mut tmp = self.create_tmp(generation, coding.ext(), false)?;
        crate::cache::fileio::write_all_at(&tmp.file, parts, 0).at("write", &tmp.describe())?;
        self.place(&mut tmp, &self.variant_path(key, generation, coding))?;
        let md = tmp.file.metadata().at("stat", &tmp.describe())?;
        Ok(crate::cache::fileio::mtime_ns(&md))
    }

    /// Removes a variant file; one already gone is not an error.
    pub fn remove_variant(&self, key: &KeyHash, generation: u64, coding: Coding) -> Result<(), StoreError> {
        self.remove(&self.variant_path(key, generation, coding))
    }

    /// Creates `path` (a new name) and writes `parts` into it in one `pwritev`.
    fn write_new(&self, path: PathBuf, parts: &[&[u8]]) -> Result<u64, StoreError> {
        let file = in_its_dir(&path, "create", || {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path)
        })?;
        let written = crate::cache::fileio::write_all_at(&file, parts, 0).and_then(|()| file.metadata());
        match written {
            Ok(md) => Ok(crate::cache::fileio::mtime_ns(&md)),
            Err(source) => {
                let _ = fs::remove_file(&path);
                Err(StoreError::io("write", path, source))
            }
        }
    }

    /// Removes version `generation` of `key`'s object; one already gone is not an error.
    pub fn remove_object(&self, key: &KeyHash, generation: u64) -> Result<(), StoreError> {
        self.remove(&self.object_path(key, generation))
    }

    /// Removes a file; a file already gone is not an error.
    pub fn remove(&self, path: &Path) -> Result<(), StoreError> {
        match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::io("remove", path, e)),
        }
    }

    /// Every object file on disk, by key and version (with what the directory says of it).
    pub fn scan_objects(&self) -> Vec<Found<KeyHash>> {
        scan(&self.objects, KeyHash::from_hex)
    }

    /// Replaces the soft-purge marks file with `marks` (key, version, ms since the epoch).
    pub fn write_marks(&self, marks: &[(KeyHash, u64, u64)]) -> Result<(), StoreError> {
        let mut bytes = Vec::with_capacity(MARKS_MAGIC.len() + marks.len() * MARK_LEN);
        bytes.extend_from_slice(MARKS_MAGIC);
        for (key, generation, at) in marks.iter().take(MAX_MARKS) {
            bytes.extend_from_slice(&key.0);
            bytes.extend_from_slice(&generation.to_be_bytes());
            bytes.extend_from_slice(&at.to_be_bytes());
        }
        write_replace(&self.objects_fd, MARKS, &bytes).at("write", &self.objects.join(MARKS))
    }

    /// The soft-purge marks written last (none when there is no file, or not one of ours).
    pub fn read_marks(&self) -> Vec<(KeyHash, u64, u64)> {
        let Ok(fd) = rustix::fs::openat(
            &self.objects_fd,
            MARKS,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        ) else {
            return Vec::new();
        };
        match rustix::fs::fstat(&fd) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile => {}
            _ => return Vec::new(),
        }
        let mut bytes = Vec::new();
        let cap = (MARKS_MAGIC.len() + MAX_MARKS * MARK_LEN) as u64;
        if File::from(fd).take(cap + 1).read_to_end(&mut bytes).is_err()
            || bytes.len() as u64 > cap
            || !bytes.starts_with(MARKS_MAGIC)
        {
            return Vec::new();
        }
        bytes[MARKS_MAGIC.len()..]
            .chunks_exact(MARK_LEN)
            .map(|r| {
                let key = KeyHash(r[..16].try_into().expect("16 bytes"));
                let generation = u64::from_be_bytes(r[16..24].try_into().expect("8 bytes"));
                let at = u64::from_be_bytes(r[24..32].try_into().expect("8 bytes"));
                (key, generation, at)
            })
            .collect()
    }

    /// Removes the layouts of earlier format versions, whole: they are never read. Blocking
    /// (a large old cache takes a while); the startup rebuild runs it before anything is
    /// counted. Returns how many were found.
    pub fn remove_old_layouts(&self) -> usize {
        let mut found = 0;
        for old in OLD_LAYOUTS {
            let path = self.root.join(old);
            // (`remove_dir_all` does not follow symbolic links, at the top or below.)
            match fs::symlink_metadata(&path) {
                Ok(md) if md.is_dir() => {
                    found += 1;
                    if let Err(e) = fs::remove_dir_all(&path) {
                        tracing::warn!(dir = %path.display(), error = %e, "failed to remove an old cache layout");
                    }
                }
                Ok(_) => {
                    let _ = fs::remove_file(&path);
                }
                Err(_) => {}
            }
        }
        found
    }
}

/// Reads the record at the end of an object image (at `base` in `file`: 0 for a file of its
/// own, a slot's base in a segment) that the index says holds `body_len` bytes of body and
/// `tail_len` of record and footer (blocking: off the runtime).
pub fn read_record(file: &File, base: u64, body_len: u64, tail_len: u64) -> Result<Meta, ReadError> {
    check_tail_len(tail_len)?;
    let bytes = crate::cache::fileio::read_at(file, tail_len as usize, base + body_len).map_err(ReadError::of_read)?;
    decode_tail(&bytes)
}

/// [`read_record`] only if that needs no disk I/O; `Ok(None)` when it would wait for the disk.
pub fn read_record_cached(file: &File, base: u64, body_len: u64, tail_len: u64) -> Result<Option<Meta>, ReadError> {
    check_tail_len(tail_len)?;
    crate::cache::fileio::read_cached_at(file, tail_len as usize, base + body_len)
        .map_err(ReadError::of_read)?
        .map(|bytes| decode_tail(&bytes))
        .transpose()
}

fn check_tail_len(tail_len: u64) -> Result<(), ReadError> {
    if tail_len > MAX_RECORD as u64 + FOOTER_LEN {
        return Err(ReadError::corrupt("record too large"));
    }
    Ok(())
}

/// Reads the record of an object image found at startup (at `base`, as [`read_record`]), of
/// `len` bytes, from its end: the
/// footer says where the record starts. The record's body length must account for the rest
/// of the file exactly.
pub fn read_found(file: &File, base: u64, len: u64) -> Result<Meta, ReadError> {
    let invalid = ReadError::corrupt;
    let first = len.min(TAIL_READ);
    let bytes = crate::cache::fileio::read_at(file, first as usize, base + len - first).map_err(ReadError::of_read)?;
    let record_len = footer_record_len(&bytes).ok_or_else(|| invalid("object footer missing"))?;
    let tail = record_len + FOOTER_LEN;
    if record_len > MAX_RECORD as u64 || tail > len {
        return Err(invalid("object footer out of range"));
    }
    let meta = if tail <= first {
        decode_tail(&bytes[(first - tail) as usize..])?
    } else {
        let bytes =
            crate::cache::fileio::read_at(file, tail as usize, base + len - tail).map_err(ReadError::of_read)?;
        decode_tail(&bytes)?
    };
    if meta.body_len + tail != len {
        return Err(invalid("object file length does not match its record"));
    }
    Ok(meta)
}

/// Why a whole object file held in memory (one from the shared tier) is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectRefused {
    /// No footer, or one pointing outside the file.
    Footer,
    /// The record is malformed or its checksum does not match.
    Record,
    /// The record's body length does not account for the file, or the file is too large.
    Length,
    /// The body is not what the record's digest says.
    Digest,
    /// The record names another key.
    Key,
    /// Not an object the shared tier carries (`Vary`, or not a 200).
    NotShared,
}

impl ObjectRefused {
    /// A closed label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectRefused::Footer => "footer",
            ObjectRefused::Record => "record",
            ObjectRefused::Length => "length",
            ObjectRefused::Digest => "digest",
            ObjectRefused::Key => "key",
            ObjectRefused::NotShared => "not_shared",
        }
    }
}

/// Checks a whole object file held in memory as a local one is checked: the footer, the
/// record's checksum, the body's length against the file's, and the body's blake3 digest.
/// Returns its record. Hashes the whole body: call it off the event loop.
pub fn check_object(bytes: &[u8]) -> Result<Meta, ObjectRefused> {
    let len = bytes.len() as u64;
    let record_len = footer_record_len(bytes).ok_or(ObjectRefused::Footer)?;
    let tail = record_len + FOOTER_LEN;
    if record_len > MAX_RECORD as u64 || tail > len {
        return Err(ObjectRefused::Footer);
    }
    let meta = decode_tail(&bytes[(len - tail) as usize..]).map_err(|_| ObjectRefused::Record)?;
    if meta.body_len.checked_add(tail) != Some(len) {
        return Err(ObjectRefused::Length);
    }
    let body = &bytes[..meta.body_len as usize];
    if crate::cache::key::Digest::from(blake3::hash(body)) != meta.digest {
        return Err(ObjectRefused::Digest);
    }
    Ok(meta)
}

/// Links an unnamed (`O_TMPFILE`) file to `to` through its `/proc/self/fd` entry, which needs
/// no privilege (unlike `AT_EMPTY_PATH`). Fails if `to` exists: every name is used once.
fn link_fd(file: &File, to: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let from = format!("/proc/self/fd/{}", file.as_raw_fd());
    rustix::fs::linkat(
        rustix::fs::CWD,
        from.as_str(),
        rustix::fs::CWD,
        to,
        AtFlags::SYMLINK_FOLLOW,
    )?;
    Ok(())
}

/// Every object file under `dir` (`<fan-out>/<id>.<gen>`). Entries that are not ours are
/// removed: a fan-out entry that is not a real directory (a symbolic link is removed, never
/// followed), a file whose name does not parse, anything in a fan-out directory that is not a
/// regular file.
fn scan<T>(dir: &Path, parse: fn(&str) -> Option<T>) -> Vec<Found<T>> {
    let mut out = Vec::new();
    let Ok(dir_fd) = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return out;
    };
    for (sub, _) in entries(&dir_fd) {
        // Only the fan-out directories: `tmp`, `generations` and the like are the layout's own.
        if !is_fanout_name(sub.to_bytes()) {
            continue;
        }
        let fanout = match open_dir_nofollow(&dir_fd, &sub) {
            Ok(fd) => fd,
            Err(e) if e == rustix::io::Errno::LOOP || e == rustix::io::Errno::NOTDIR => {
                let _ = rustix::fs::unlinkat(&dir_fd, sub.as_c_str(), AtFlags::empty());
                continue;
            }
            Err(_) => continue,
        };
        for (file, _) in entries(&fanout) {
            let Ok(st) = rustix::fs::statat(&fanout, file.as_c_str(), AtFlags::SYMLINK_NOFOLLOW) else {
                continue;
            };
            let kind = FileType::from_raw_mode(st.st_mode);
            if kind == FileType::Directory {
                continue;
            }
            // `<id>.<gen>`, or `<id>.<gen>.<coding suffix>` for a variant.
            let parsed = file.to_str().ok().and_then(|name| {
                let mut parts = name.splitn(3, '.');
                let (id, generation) = (parts.next()?, parts.next()?);
                let coding = match parts.next() {
                    None => None,
                    Some(ext) => Some(Coding::from_ext(ext)?),
                };
                Some((parse(id)?, u64::from_str_radix(generation, 16).ok()?, coding))
            });
            match parsed {
                Some((id, generation, coding)) if kind == FileType::RegularFile => out.push(Found {
                    id,
                    generation,
                    len: st.st_size as u64,
                    modified: UNIX_EPOCH + Duration::new(st.st_mtime.max(0) as u64, st.st_mtime_nsec as u32),
                    coding,
                }),
                // Not ours (or mangled, or a link): nothing may be served from it.
                _ => {
                    let _ = rustix::fs::unlinkat(&fanout, file.as_c_str(), AtFlags::empty());
                }
            }
        }
    }
    out
}

/// Whether a name in `objects-v3` is a fan-out directory's: two lower-case hex digits.
fn is_fanout_name(name: &[u8]) -> bool {
    name.len() == 2 && name.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

/// The names in a directory (but `.` and `..`), with their types as the directory says.
fn entries(dir: &OwnedFd) -> Vec<(std::ffi::CString, FileType)> {
    let Ok(reader) = rustix::fs::Dir::read_from(dir) else {
        return Vec::new();
    };
    reader
        .filter_map(Result::ok)
        .filter(|e| !matches!(e.file_name().to_bytes(), b"." | b".."))
        .map(|e| (e.file_name().to_owned(), e.file_type()))
        .collect()
}

fn open_dir_nofollow(parent: &impl AsFd, name: &std::ffi::CStr) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// The allocation unit of the filesystem `dir` is on: its fragment size (`f_frsize`, what
/// `statvfs` counts blocks in), else its block size, within 512 B to 1 MiB; 4 KiB when it
/// cannot be asked.
fn alloc_unit(dir: &OwnedFd) -> u64 {
    match rustix::fs::fstatvfs(dir) {
        Ok(st) if st.f_frsize > 0 => st.f_frsize.clamp(512, 1 << 20),
        Ok(st) if st.f_bsize > 0 => st.f_bsize.clamp(512, 1 << 20),
        _ => 4096,
    }
}

/// Opens the cache directory, creating it (0700, with any missing parents) if it is missing.
/// Refused: anything but a directory, a directory owned by another user, and a symbolic link
/// unless it resolves to a directory this user owns that no one else may enter (systemd's
/// `DynamicUser=` with `CacheDirectory=` makes the configured path such a link, to
/// `private/<name>`). One owned by this user that others may enter is made private (0700);
/// through a link it is refused instead (its permissions are not ours to change). Links
/// found *inside* the directory are never followed (see `layout_dir`, `open_lock`).
fn open_root(root: &Path) -> Result<OwnedFd, StoreError> {
    let refuse = |reason: String| StoreError::Unsafe {
        path: root.to_owned(),
        reason,
    };
    let prepare = |source| StoreError::Prepare {
        path: root.to_owned(),
        source,
    };
    match fs::symlink_metadata(root) {
        Ok(md) if md.file_type().is_symlink() => return open_linked_root(root),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(root)
                .map_err(prepare)?;
        }
        Err(e) => return Err(prepare(e)),
    }
    let fd = match rustix::fs::open(
        root,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(e) if e == rustix::io::Errno::LOOP => {
            return Err(refuse("it is a symbolic link; give the real directory".into()));
        }
        Err(e) if e == rustix::io::Errno::NOTDIR => return Err(refuse("it is not a directory".into())),
        Err(e) => return Err(prepare(e.into())),
    };
    let st = rustix::fs::fstat(&fd).map_err(|e| prepare(e.into()))?;
    let uid = rustix::process::geteuid().as_raw();
    if st.st_uid != uid {
        return Err(refuse(format!(
            "it is owned by uid {}, not by this process's uid {uid}; give a directory this \
             user owns (one it creates, such as a subdirectory)",
            st.st_uid
        )));
    }
    if st.st_mode & 0o077 != 0 {
        tracing::warn!(
            dir = %root.display(),
            mode = format!("{:o}", st.st_mode & 0o7777),
            "cache directory was open to other users; made private (0700)"
        );
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700)).map_err(|e| prepare(e.into()))?;
    }
    Ok(fd)
}

/// Opens the directory the configured cache path `root` (a symbolic link) resolves to, if this
/// user owns it and it has no group or other access; refused otherwise, naming the target.
fn open_linked_root(root: &Path) -> Result<OwnedFd, StoreError> {
    let refuse = |reason: String| StoreError::Unsafe {
        path: root.to_owned(),
        reason,
    };
    let target =
        fs::canonicalize(root).map_err(|e| refuse(format!("it is a symbolic link that does not resolve ({e})")))?;
    let fd = rustix::fs::open(
        &target,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| {
        refuse(format!(
            "it is a symbolic link to {}, which is not a directory that can be opened ({e})",
            target.display()
        ))
    })?;
    let st = rustix::fs::fstat(&fd).map_err(|e| refuse(format!("fstat {}: {e}", target.display())))?;
    let uid = rustix::process::geteuid().as_raw();
    if st.st_uid != uid || st.st_mode & 0o077 != 0 {
        return Err(refuse(format!(
            "it is a symbolic link to {} (owner uid {}, mode {:o}); a linked cache directory \
             must be owned by this process's uid {uid} with no group or other access (0700), \
             or give the real directory",
            target.display(),
            st.st_uid,
            st.st_mode & 0o7777
        )));
    }
    tracing::info!(dir = %root.display(), target = %target.display(), "cache directory is a link to a private directory");
    Ok(fd)
}

/// Opens the layout directory `name` under `parent`, creating it 0700. Whatever else is found
/// under that name (a symbolic link, a file) is removed and the directory made in its place.
fn layout_dir(parent: &OwnedFd, name: &str) -> std::io::Result<OwnedFd> {
    for _ in 0..2 {
        match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::EXIST => {}
            Err(e) => return Err(e.into()),
        }
        match rustix::fs::openat(
            parent,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => {
                let st = rustix::fs::fstat(&fd)?;
                if st.st_mode & 0o077 != 0 {
                    rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700))?;
                }
                return Ok(fd);
            }
            // Unlinked without following: a link goes, what it points to stays.
            Err(e) if e == rustix::io::Errno::LOOP || e == rustix::io::Errno::NOTDIR => {
                rustix::fs::unlinkat(parent, name, AtFlags::empty())?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(std::io::Error::other(format!("{name} keeps being replaced")))
}

/// Opens (creating, 0600) the lock file under the cache directory. A symbolic link there is
/// removed, never followed (nor its target created); anything but a regular file is refused.
fn open_lock(root: &OwnedFd) -> std::io::Result<File> {
    for _ in 0..2 {
        match rustix::fs::openat(
            root,
            "lock",
            // Non-blocking: a FIFO planted here must not hang the open.
            OFlags::RDONLY | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        ) {
            Ok(fd) => {
                let st = rustix::fs::fstat(&fd)?;
                if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
                    return Err(std::io::Error::other("lock is not a regular file"));
                }
                return Ok(File::from(fd));
            }
            Err(e) if e == rustix::io::Errno::LOOP => {
                rustix::fs::unlinkat(root, "lock", AtFlags::empty())?;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(std::io::Error::other("lock keeps being replaced"))
}

/// The first bytes of the regular file `name` under `dir`; `None` if it is missing, a link or
/// not a regular file.
fn read_small(dir: &OwnedFd, name: &str) -> Option<String> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let st = rustix::fs::fstat(&fd).ok()?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return None;
    }
    let mut s = String::new();
    File::from(fd).take(64).read_to_string(&mut s).ok()?;
    Some(s)
}

/// Replaces `name` under `dir` with `bytes`: written to `<name>.new` (created afresh, 0600,
/// after removing whatever was there: a planted link is removed, not written through), then
/// renamed over `name` (which replaces a link, not its target).
fn write_replace(dir: &OwnedFd, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let staged = format!("{name}.new");
    match rustix::fs::unlinkat(dir, staged.as_str(), AtFlags::empty()) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::NOENT => {}
        Err(e) => return Err(e.into()),
    }
    let fd = rustix::fs::openat(
        dir,
        staged.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    File::from(fd).write_all(bytes)?;
    rustix::fs::renameat(dir, staged.as_str(), dir, name)?;
    Ok(())
}

/// Removes everything in `tmp/`: leftovers of fills a crash interrupted. Each entry is
/// unlinked under the directory's descriptor: a link is removed, never followed.
fn sweep_tmp(tmp: &OwnedFd) -> usize {
    entries(tmp)
        .iter()
        .filter(|(name, _)| rustix::fs::unlinkat(tmp, name.as_c_str(), AtFlags::empty()).is_ok())
        .count()
}

fn try_lock(file: &File) -> bool {
    file.try_lock().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_object_in_memory_is_checked_like_a_file_and_every_cut_or_flip_is_refused() {
        let body = b"body of an asset shared through a bucket".repeat(8);
        let mut meta = crate::cache::testing::meta("http://app.example/a.js", &body);
        meta.digest = crate::cache::key::Digest::from(blake3::hash(&body));
        let mut object = body.clone();
        object.extend_from_slice(&tail(&meta));
        assert_eq!(check_object(&object).map(|m| m.key), Ok(meta.key.clone()));
        for cut in [0, 1, body.len(), object.len() - 1] {
            assert!(check_object(&object[..cut]).is_err(), "cut at {cut}");
        }
        // A changed body byte, record byte or footer byte: each refused, for its reason.
        let flip = |at: usize| {
            let mut o = object.clone();
            o[at] ^= 0x20;
            check_object(&o)
        };
        assert_eq!(flip(3), Err(ObjectRefused::Digest));
        assert_eq!(flip(body.len() + 20), Err(ObjectRefused::Record));
        assert_eq!(flip(object.len() - 2), Err(ObjectRefused::Footer));
        // Bytes in front of a valid object: the record no longer accounts for the file.
        let mut longer = b"x".to_vec();
        longer.extend_from_slice(&object);
        assert_eq!(check_object(&longer), Err(ObjectRefused::Length));
    }

    #[test]
    fn a_cache_directory_serves_one_process_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path()).unwrap();
        assert!(matches!(Store::open(dir.path()), Err(StoreError::Locked { .. })));
        drop(first);
        assert!(Store::open(dir.path()).is_ok(), "the lock goes with its holder");
    }

    #[test]
    fn versions_keep_increasing_across_runs_even_when_the_clock_steps_back() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open_at(dir.path(), 5_000_000).unwrap();
        let used = first.next_gen();
        assert!(first.is_own(used));
        drop(first);
        // The clock now reads earlier than the first run's versions.
        let second = Store::open_at(dir.path(), 10).unwrap();
        assert!(second.next_gen() > used);
        assert!(!second.is_own(used), "the first run's versions are not the second's");
    }

    #[test]
    fn startup_sweeps_half_written_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.tmp_mode = TmpMode::Named;
        let tmp = store.create_tmp_object(store.next_gen()).unwrap();
        let name = tmp.name.clone().expect("a named temporary file");
        drop(store);
        assert!(name.exists());
        let _store = Store::open(dir.path()).unwrap();
        assert!(!name.exists());
    }

    #[test]
    fn a_temporary_file_dropped_unplaced_is_removed_and_a_placed_one_stays() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        store.tmp_mode = TmpMode::Named;
        let tmp_dir = dir.path().join("objects-v3/tmp");
        let tmp = store.create_tmp_object(store.next_gen()).unwrap();
        assert_eq!(fs::read_dir(&tmp_dir).unwrap().count(), 1);
        drop(tmp);
        assert_eq!(
            fs::read_dir(&tmp_dir).unwrap().count(),
            0,
            "a dropped fill left its file"
        );
        let generation = store.next_gen();
        let tmp = store.create_tmp_object(generation).unwrap();
        let key = KeyHash::of(b"http://h/kept");
        store.place_object(tmp, &key, generation).unwrap();
        assert!(store.object_path(&key, generation).exists());
        assert_eq!(fs::read_dir(&tmp_dir).unwrap().count(), 0);
    }

    fn object(body: &[u8]) -> (crate::cache::meta::Meta, Vec<u8>) {
        let mut meta = crate::cache::meta::tests::sample();
        meta.body_len = body.len() as u64;
        meta.digest = crate::cache::key::Digest::from(blake3::hash(body));
        let mut file = body.to_vec();
        file.extend_from_slice(&tail(&meta));
        (meta, file)
    }

    #[test]
    fn both_kinds_of_temporary_file_land_whole_under_their_final_name() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path()).unwrap();
        // This machine's filesystem has O_TMPFILE: the unnamed kind is found and used.
        assert_eq!(store.tmp_mode, TmpMode::Unnamed);
        let (_, bytes) = object(b"body bytes");
        let key = KeyHash::of(b"http://h/a");
        for mode in [TmpMode::Unnamed, TmpMode::Named] {
            store.tmp_mode = mode;
            let generation = store.next_gen();
            let tmp = store.create_tmp_object(generation).unwrap();
            (&*tmp.file).write_all(&bytes).unwrap();
            let mtime = store.place_object(tmp, &key, generation).unwrap();
            assert!(mtime > 0);
            assert_eq!(fs::read(store.object_path(&key, generation)).unwrap(), bytes);
            assert_eq!(
                fs::read_dir(dir.path().join("objects-v3/tmp")).unwrap().count(),
                0,
                "{mode:?}"
            );
        }
        let found = store.scan_objects();
        assert_eq!(found.len(), 2);
        assert!(found.iter().all(|f| f.id == key && f.len == bytes.len() as u64));
    }

    #[test]
    fn a_small_object_is_written_whole_under_its_final_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (meta, bytes) = object(b"small body");
        let key = KeyHash::of(b"http://h/s");
        let generation = store.next_gen();
        let tail = tail(&meta);
        let mtime = store.write_object(&key, generation, &[b"small body", &tail]).unwrap();
        assert!(mtime > 0);
        let path = store.object_path(&key, generation);
        assert_eq!(fs::read(&path).unwrap(), bytes);
        assert_eq!(
            read_found(&File::open(&path).unwrap(), 0, bytes.len() as u64).unwrap(),
            meta
        );
        // A name is used once: the same version is never written over.
        assert!(store.write_object(&key, generation, &[b"other"]).is_err());
        assert_eq!(fs::read(&path).unwrap(), bytes);
    }

    #[test]
    fn an_object_file_is_its_body_then_its_record_found_from_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let _store = Store::open(dir.path()).unwrap();
        // A record longer than the first read from the end, and an empty body.
        for body in [&b"0123456789"[..], &[7u8; 10_000][..], b""] {
            let (mut meta, mut bytes) = object(body);
            if body.is_empty() {
                meta.headers
                    .insert("x-long", http::HeaderValue::from_str(&"v".repeat(6000)).unwrap());
                bytes = tail(&meta);
            }
            let path = dir.path().join("obj");
            fs::write(&path, &bytes).unwrap();
            let file = File::open(&path).unwrap();
            assert_eq!(read_found(&file, 0, bytes.len() as u64).unwrap(), meta);
            assert_eq!(read_record(&file, 0, meta.body_len, tail_len(&meta)).unwrap(), meta);
            assert_eq!(&bytes[..body.len()], body);
            // Cut short anywhere, or with a byte changed, it is not an object.
            for cut in [1, 5, FOOTER_LEN as usize, bytes.len() / 2] {
                fs::write(&path, &bytes[..bytes.len() - cut]).unwrap();
                let file = File::open(&path).unwrap();
                assert!(read_found(&file, 0, (bytes.len() - cut) as u64).is_err(), "cut {cut}");
            }
            let mut flipped = bytes.clone();
            let at = body.len() + 20;
            flipped[at] ^= 1;
            fs::write(&path, &flipped).unwrap();
            assert!(read_found(&File::open(&path).unwrap(), 0, flipped.len() as u64).is_err());
        }
        // A body whose length disagrees with the record: appended bytes move the footer away.
        let (_, mut bytes) = object(b"abc");
        bytes.insert(0, b'x');
        let path = dir.path().join("obj");
        fs::write(&path, &bytes).unwrap();
        assert!(read_found(&File::open(&path).unwrap(), 0, bytes.len() as u64).is_err());
    }

    #[test]
    fn an_old_layout_is_removed_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("objects-v1/meta/ab");
        fs::create_dir_all(&old).unwrap();
        fs::write(old.join("x.1"), b"old record").unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("keep"), b"not ours").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("objects-v1/link")).unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.remove_old_layouts(), 1);
        assert!(!dir.path().join("objects-v1").exists());
        assert!(
            outside.path().join("keep").exists(),
            "a link inside is removed, not followed"
        );
        assert!(store.scan_objects().is_empty());
    }

    #[test]
    fn a_variant_file_is_found_beside_its_object_and_its_record_checked() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("cache")).expect("store");
        let key = KeyHash::of(b"http://app.example/app.js");
        let coded = b"coded bytes".repeat(10);
        let record = VariantRecord {
            coding: Coding::Br,
            body_len: coded.len() as u64,
            digest: Digest::from(blake3::hash(&coded)),
            made_from: (5000, Digest::from(blake3::hash(b"identity"))),
        };
        let generation = store.next_gen();
        store
            .write_variant(&key, generation, Coding::Br, &[&coded, &record.encode()])
            .expect("written");
        let path = store.variant_path(&key, generation, Coding::Br);
        assert!(path.to_string_lossy().ends_with(".br"));
        let found = store.scan_objects();
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].id, found[0].generation, found[0].coding),
            (key, generation, Some(Coding::Br))
        );
        let len = found[0].len;
        assert_eq!(len, coded.len() as u64 + VARIANT_TAIL);
        let file = File::open(&path).expect("open");
        assert_eq!(read_variant_found(&file, 0, len).expect("whole"), record);
        // Every cut, and a flipped byte in the record, is refused.
        let bytes = std::fs::read(&path).expect("read");
        for cut in [1, 10, VARIANT_TAIL as usize, bytes.len() - 1] {
            std::fs::write(&path, &bytes[..bytes.len() - cut]).expect("cut");
            let file = File::open(&path).expect("open");
            assert!(
                read_variant_found(&file, 0, (bytes.len() - cut) as u64).is_err(),
                "cut {cut}"
            );
        }
        let mut flipped = bytes.clone();
        let at = bytes.len() - 30;
        flipped[at] ^= 1;
        std::fs::write(&path, &flipped).expect("flip");
        let file = File::open(&path).expect("open");
        assert!(read_variant_found(&file, 0, flipped.len() as u64).is_err());
        // A name with an unknown suffix is not ours: removed by the scan.
        std::fs::write(path.with_extension("xz"), b"x").expect("write");
        assert_eq!(store.scan_objects().len(), 1);
        assert!(!path.with_extension("xz").exists());
    }
}
