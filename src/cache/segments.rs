//! Small objects packed into segment files (as Traffic Server's cyclic store, CacheLib's Navy
//! regions and Kangaroo do): no file, no inode and no directory entry per small object, and
//! one descriptor per segment for every hit on what it holds.
//!
//! ```text
//! <cache_dir>/objects-v3/segments/<id:016x>.seg   appended to while open, then sealed
//! <cache_dir>/objects-v3/segments/key             this directory's prefix key (32 bytes, hex)
//! ```
//!
//! A segment is a sequence of slots, each starting at a multiple of the filesystem's
//! allocation unit: `prefix | image`, where the image is exactly what an object file or a
//! variant file holds (`body | record | footer`, or `coded body | variant record`), so every
//! reader of a file reads a slot by adding the slot's offset. The 64-byte prefix says what the
//! slot holds: `"SCSEG001" | kind (0: object, else a coding's id) | 7 zero bytes | [16] key
//! hash | u64 version | u64 image length | [16] MAC`, the MAC a keyed blake3 of the segment's
//! id, the slot's offset and the 48 bytes before it, under a key made at random for the
//! directory. Bytes of a cached body are the app's (an attacker's) to choose, and could spell
//! a whole prefix and image: the key, which never leaves the directory, is what keeps a scan
//! that resumes after a torn slot from ever taking them for a slot.
//!
//! One thread writes (the *committing writer*): fills hand it their whole image and wait; it
//! takes every append queued, lays them out one after the other and writes them in one
//! `pwritev`, then answers each with its [`Slot`]. A batch is one wake-up of the writer and one
//! system call however many fills it holds. A segment is not preallocated: it grows by what
//! is written (an instance's disk is its app's too) and is sealed at `segment_bytes`.
//!
//! A slot is charged what it spans (its prefix and image rounded up to whole units), exactly
//! what the disk spends on it. When the index lets go of a slot ([`Slot::discard`]) its range
//! is given back to the filesystem with `fallocate(PUNCH_HOLE)` once the last reader holding
//! it lets go (a slot is reference-counted: a hit's mapped body holds it), so a reader never
//! sees a range punched underneath; a sealed segment whose slots are all gone is unlinked.
//! Segments are reclaimed whole when there are more than the [`Geometry`] allows: the eviction
//! pass takes the remaining objects of as many of the sparsest as there are too many out
//! ([`Segments::excess`]), so that one pass brings them back within the bound.
//!
//! Where the filesystem cannot punch holes (tried once at open), there are no segments: every
//! object gets a file of its own, as before.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rustix::fs::{AtFlags, FallocateFlags, Mode, OFlags};

use crate::cache::key::KeyHash;
use crate::cache::store::{IoContext, Store, StoreError};
use crate::negotiate::Coding;

/// Bytes before every slot's image.
pub const PREFIX_LEN: u64 = 64;
const MAGIC: &[u8; 8] = b"SCSEG001";
/// The kind byte of a discarded slot's prefix (a tombstone).
const DEAD: u8 = 0xFF;
/// Most segments a budget's [`Geometry`] keeps.
const MAX_SEGMENTS: usize = 256;
/// Segment sizes: the budget spread over a quarter of [`MAX_SEGMENTS`], within these bounds.
const SEGMENT_MIN: u64 = 1 << 20;
const SEGMENT_MAX: u64 = 64 << 20;
/// Most appends and bytes one batch writes.
const BATCH_APPENDS: usize = 256;
const BATCH_BYTES: u64 = 8 << 20;

/// How large segments grow and how many there may be. Derived from the budget
/// ([`Geometry::for_budget`]), not configured; a test sets a small one to reach the bound with
/// a few appends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes at which a segment is sealed (rounded up to whole allocation units at open).
    pub segment_bytes: u64,
    /// Most segment files kept: past it the sparsest are reclaimed whole. Bounds the
    /// descriptors held (one per segment) whatever pattern of evictions leaves a few live
    /// slots in many segments.
    pub max_segments: usize,
}

impl Geometry {
    /// The geometry for a budget of `budget` bytes: the budget spread over a quarter of the
    /// most segments, each within 1 MiB and 64 MiB.
    pub fn for_budget(budget: u64) -> Geometry {
        Geometry {
            segment_bytes: (budget / (MAX_SEGMENTS as u64 / 4)).clamp(SEGMENT_MIN, SEGMENT_MAX),
            max_segments: MAX_SEGMENTS,
        }
    }
}

/// What a slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// An object: `body | record | footer`.
    Object,
    /// A compressed variant of one: `coded body | variant record`.
    Variant(Coding),
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Object => 0,
            Kind::Variant(c) => c.id(),
        }
    }

    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            0 => Some(Kind::Object),
            b => Coding::from_id(b).map(Kind::Variant),
        }
    }
}

/// One segment file, open for reading (and appending, by the writer only).
pub struct Segment {
    id: u64,
    file: File,
    /// Slots not yet given back (indexed, or held by a reader).
    live: AtomicU64,
    /// Appends go elsewhere: unlinked once `live` is 0.
    sealed: AtomicBool,
    /// The bytes appended (its length, but for the last slot's padding).
    end: AtomicU64,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "segment {:016x}", self.id)
    }
}

/// A stored image inside a segment. Held by the index while indexed and by readers while they
/// read it: the range is punched when the last holder lets go of a discarded slot.
pub struct Slot {
    segment: Arc<Segment>,
    /// Where its prefix starts.
    offset: u64,
    /// Its image's length.
    len: u64,
    /// The index let go of it: its range goes back to the filesystem when the last holder does.
    discarded: AtomicBool,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "slot {:016x}@{}+{}", self.segment.id, self.offset, self.len)
    }
}

impl Slot {
    /// The segment file.
    pub fn file(&self) -> &File {
        &self.segment.file
    }

    /// Where its image starts in the segment file: add it to an object file's offsets.
    pub fn base(&self) -> u64 {
        self.offset + PREFIX_LEN
    }

    /// Its image's length (what an object file of its own would hold).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether its image is empty (never: an image holds at least its record).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The segment it is in.
    pub fn segment_id(&self) -> u64 {
        self.segment.id
    }

    /// The index let go of it: its prefix is marked dead at once (a restart, even a crash
    /// right after, never finds it again: a purge sticks), and its range is punched once no
    /// reader holds it (readers read the image, never the prefix).
    pub fn discard(&self) {
        if !self.discarded.swap(true, Ordering::AcqRel) {
            self.segment.shared.send(Op::Bury {
                segment: self.segment.clone(),
                offset: self.offset,
                len: self.len,
            });
        }
    }

    /// Whether `prefix` (read just before its image) is still this slot's: a prefix under the
    /// directory's MAC for this segment and offset (so written by this process for this very
    /// slot: offsets are never reused), of this length, not a tombstone.
    pub fn intact(&self, prefix: &[u8]) -> bool {
        let shared = &self.segment.shared;
        matches!(shared.parse(self.segment.id, self.offset, prefix), Some(Ok((_, _, _, len))) if len == self.len)
    }

    /// A description for errors.
    pub fn describe(&self) -> PathBuf {
        self.segment.shared.path(self.segment.id)
    }

    fn span(&self) -> u64 {
        span(PREFIX_LEN + self.len, self.segment.shared.unit)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.discarded.load(Ordering::Acquire) {
            // To the writer, which owns every change to the segment files: a holder letting
            // go may be an event loop.
            self.segment.shared.send(Op::Punch {
                segment: self.segment.clone(),
                offset: self.offset,
                len: self.span(),
            });
        }
    }
}

/// Where a stored image is: a file of its own (named by its key and version) or a slot.
#[derive(Debug, Clone)]
pub enum Place {
    /// `<keyhash>.<version>` (and the coding's suffix, for a variant).
    File,
    /// A slot in a segment.
    Slot(Arc<Slot>),
}

impl PartialEq for Place {
    fn eq(&self, other: &Place) -> bool {
        match (self, other) {
            (Place::File, Place::File) => true,
            (Place::Slot(a), Place::Slot(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for Place {}

impl Place {
    /// Bytes stored besides the image (the slot's prefix).
    pub fn overhead(&self) -> u64 {
        match self {
            Place::File => 0,
            Place::Slot(_) => PREFIX_LEN,
        }
    }

    /// The slot, if it is one.
    pub fn slot(&self) -> Option<&Arc<Slot>> {
        match self {
            Place::File => None,
            Place::Slot(s) => Some(s),
        }
    }

    /// The index let go of it: a slot's range is punched once no reader holds it (a file is
    /// the caller's to unlink).
    pub fn discard(&self) {
        if let Place::Slot(s) = self {
            s.discard();
        }
    }
}

/// What the segments' writer is asked to do.
enum Op {
    Append(Append),
    /// A discarded slot's prefix is marked dead (`len`: its image's).
    Bury {
        segment: Arc<Segment>,
        offset: u64,
        len: u64,
    },
    /// A discarded slot no one holds: its range goes back to the filesystem.
    Punch {
        segment: Arc<Segment>,
        offset: u64,
        len: u64,
    },
    /// Answered once everything queued before it is done (punches included).
    Barrier(tokio::sync::oneshot::Sender<()>),
    /// The segments are closed: the writer ends after what was queued before.
    Stop,
}

struct Append {
    kind: Kind,
    key: KeyHash,
    generation: u64,
    /// The image, in parts.
    parts: Vec<Bytes>,
    reply: tokio::sync::oneshot::Sender<Result<Arc<Slot>, StoreError>>,
}

impl Append {
    fn len(&self) -> u64 {
        self.parts.iter().map(|p| p.len() as u64).sum()
    }
}

/// What every segment shares: the directory, its key, the unit, the writer's queue.
struct Shared {
    dir: OwnedFd,
    dir_path: PathBuf,
    key: [u8; 32],
    unit: u64,
    /// Its segment size (in whole units) and bound.
    geometry: Geometry,
    /// The writer's queue (a mutex: `Sender` is `Sync` on recent std, but clones per slot
    /// would cost more than an uncontended lock).
    ops: Mutex<mpsc::Sender<Op>>,
    /// Every segment file there is, by id (the writer adds and removes them).
    table: Mutex<BTreeMap<u64, Arc<Segment>>>,
    /// Told when a new segment takes the count past the bound: the eviction loop, which
    /// reclaims the excess ([`Segments::excess`]) at once rather than at its next tick.
    past_bound: Arc<tokio::sync::Notify>,
}

impl Shared {
    /// Queues `op` for the writer (dropped if it has stopped).
    fn send(&self, op: Op) {
        let _ = self.ops.lock().unwrap_or_else(|p| p.into_inner()).send(op);
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir_path.join(name(id))
    }

    /// A descriptor to write segment `id` with, held only while it is written or punched:
    /// every other descriptor on a segment is read-only, so a sidecar that is not writing
    /// keeps nothing open for writing (the filesystem can be remounted read-only under it).
    fn writable(&self, id: u64) -> std::io::Result<File> {
        let fd = rustix::fs::openat(
            &self.dir,
            name(id).as_str(),
            OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(File::from(fd))
    }

    fn mac(&self, id: u64, offset: u64, head: &[u8]) -> [u8; 16] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&id.to_be_bytes());
        h.update(&offset.to_be_bytes());
        h.update(head);
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize().as_bytes()[..16]);
        out
    }

    fn prefix(&self, id: u64, offset: u64, kind: Kind, key: &KeyHash, generation: u64, len: u64) -> [u8; 64] {
        self.head(id, offset, kind.byte(), key, generation, len)
    }

    /// A prefix with kind byte `kind`, under the MAC.
    fn head(&self, id: u64, offset: u64, kind: u8, key: &KeyHash, generation: u64, len: u64) -> [u8; 64] {
        let mut p = [0u8; 64];
        p[..8].copy_from_slice(MAGIC);
        p[8] = kind;
        p[16..32].copy_from_slice(&key.0);
        p[32..40].copy_from_slice(&generation.to_be_bytes());
        p[40..48].copy_from_slice(&len.to_be_bytes());
        let mac = self.mac(id, offset, &p[..48]);
        p[48..].copy_from_slice(&mac);
        p
    }

    /// The prefix of a discarded slot: no key, no version, the dead kind, its length.
    fn tombstone(&self, id: u64, offset: u64, len: u64) -> [u8; 64] {
        self.head(id, offset, DEAD, &KeyHash([0; 16]), 0, len)
    }

    /// A prefix read at `offset` of segment `id`, if it is one this directory wrote: a slot's
    /// `(kind, key, version, image length)`, or `Err(length)` for a discarded one's.
    fn parse(&self, id: u64, offset: u64, p: &[u8]) -> Option<Result<Head, u64>> {
        if p.len() < 64 || &p[..8] != MAGIC || p[9..16].iter().any(|&b| b != 0) {
            return None;
        }
        if !constant_time_eq(&self.mac(id, offset, &p[..48]), &p[48..64]) {
            return None;
        }
        let len = u64::from_be_bytes(p[40..48].try_into().ok()?);
        if p[8] == DEAD {
            return Some(Err(len));
        }
        let kind = Kind::from_byte(p[8])?;
        let key = KeyHash(p[16..32].try_into().ok()?);
        let generation = u64::from_be_bytes(p[32..40].try_into().ok()?);
        Some(Ok((kind, key, generation, len)))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn name(id: u64) -> String {
    format!("{id:016x}.seg")
}

/// What a slot of `len` bytes (prefix included) spans: whole units.
fn span(len: u64, unit: u64) -> u64 {
    len.div_ceil(unit).max(1) * unit
}

/// What a live slot's prefix says: its kind, key, version and image length.
type Head = (Kind, KeyHash, u64, u64);

/// A slot found by the startup scan.
#[derive(Debug)]
pub struct FoundSlot {
    pub kind: Kind,
    pub key: KeyHash,
    pub generation: u64,
    pub slot: Arc<Slot>,
}

/// The segments of one cache directory: the table, and the writer that owns every change.
/// Dropped, it stops the writer and waits for it (which lets go of the store, and so of the
/// directory's lock).
pub struct Segments {
    shared: Arc<Shared>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Segments {
    fn drop(&mut self) {
        self.shared.send(Op::Stop);
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Segments {
    /// Opens the segments of `store` laid out as `geometry` says and starts the writer, which
    /// tells `past_bound` whenever a new segment makes more than the geometry allows.
    /// `None` where the filesystem cannot punch holes (every object then has a file).
    pub fn open(
        store: &Arc<Store>,
        geometry: Geometry,
        past_bound: Arc<tokio::sync::Notify>,
    ) -> Result<Option<Segments>, StoreError> {
        let (dir, dir_path) = store.segments_dir()?;
        let key = store.segments_key()?;
        let unit = store.unit();
        if !punch_works(&dir, unit) {
            tracing::warn!(
                dir = %dir_path.display(),
                "the filesystem cannot punch holes: small objects get a file each"
            );
            return Ok(None);
        }
        let (tx, rx) = mpsc::channel();
        let geometry = Geometry {
            segment_bytes: span(geometry.segment_bytes, unit),
            ..geometry
        };
        let shared = Arc::new(Shared {
            dir,
            dir_path,
            key,
            unit,
            geometry,
            ops: Mutex::new(tx),
            table: Mutex::new(BTreeMap::new()),
            past_bound,
        });
        let writer = Writer {
            shared: shared.clone(),
            store: store.clone(),
            open: None,
        };
        let writer = std::thread::Builder::new()
            .name("sidecache-segments".into())
            .spawn(move || writer.run(rx))
            .at("spawn", std::path::Path::new("segments writer"))?;
        Ok(Some(Segments {
            shared,
            writer: Some(writer),
        }))
    }

    /// Appends an image (`parts`, in order) as version `generation` of `key`: the writer
    /// batches it with whatever else is queued. The answer comes when it is written.
    pub fn append(
        &self,
        kind: Kind,
        key: KeyHash,
        generation: u64,
        parts: Vec<Bytes>,
    ) -> tokio::sync::oneshot::Receiver<Result<Arc<Slot>, StoreError>> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let op = Op::Append(Append {
            kind,
            key,
            generation,
            parts,
            reply,
        });
        // A writer gone (it never stops while this lives) drops the reply: the receiver errs.
        self.shared.send(op);
        answer
    }

    /// [`Segments::append`] awaited.
    pub async fn write(
        &self,
        kind: Kind,
        key: KeyHash,
        generation: u64,
        parts: Vec<Bytes>,
    ) -> Result<Arc<Slot>, StoreError> {
        self.append(kind, key, generation, parts)
            .await
            .unwrap_or_else(|_| Err(writer_gone()))
    }

    /// Waits (blocking: not on an event loop) until what was queued before is done: the
    /// ranges of slots let go meanwhile are punched, so the disk no longer holds them.
    pub fn settle_blocking(&self) {
        let (done, settled) = tokio::sync::oneshot::channel();
        let _ = self
            .shared
            .ops
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(Op::Barrier(done));
        let _ = settled.blocking_recv();
    }

    /// How many segment files there are.
    pub fn count(&self) -> usize {
        self.shared.table.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The segments past the geometry's most: as many sealed segments as there are too many,
    /// those with the fewest live slots, for their objects to be taken out so they are
    /// reclaimed whole. All of them at once: the eviction loop may run a pass only once a
    /// tick, and one segment a pass would fall behind fills that seal segments faster.
    pub fn excess(&self) -> Vec<u64> {
        let table = self.shared.table.lock().unwrap_or_else(|p| p.into_inner());
        let Some(over) = table.len().checked_sub(self.shared.geometry.max_segments) else {
            return Vec::new();
        };
        let mut sealed: Vec<(u64, u64)> = table
            .values()
            .filter(|s| s.sealed.load(Ordering::Acquire))
            .map(|s| (s.live.load(Ordering::Acquire), s.id))
            .collect();
        // Fewest live slots first; of as many, the oldest.
        sealed.sort_unstable();
        sealed.into_iter().take(over).map(|(_, id)| id).collect()
    }

    /// Every slot in the segments on disk (blocking: the startup scan), in the order written.
    /// Segments are all sealed: this run appends to new ones. What is not a slot this
    /// directory wrote (torn by a crash, or anything else) is punched and counted; a segment
    /// left without slots is unlinked. Returns the slots and the ranges found corrupt.
    pub fn scan(&self, is_own: impl Fn(u64) -> bool) -> (Vec<FoundSlot>, u64) {
        let shared = &self.shared;
        let mut found = Vec::new();
        let mut corrupt = 0;
        let names: Vec<(u64, std::ffi::CString)> = match rustix::fs::Dir::read_from(&shared.dir) {
            Ok(dir) => dir
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let name = e.file_name().to_owned();
                    let id = name.to_str().ok()?.strip_suffix(".seg")?;
                    (id.len() == 16)
                        .then(|| u64::from_str_radix(id, 16).ok())
                        .flatten()
                        .map(|id| (id, name))
                })
                .collect(),
            Err(_) => return (found, 0),
        };
        let mut names = names;
        // This run's segments (its fills') are not found: they are being written.
        names.retain(|(id, _)| !is_own(*id));
        names.sort();
        for (id, name) in names {
            let Ok(fd) = rustix::fs::openat(
                &shared.dir,
                name.as_c_str(),
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOATIME,
                Mode::empty(),
            )
            .or_else(|_| {
                rustix::fs::openat(
                    &shared.dir,
                    name.as_c_str(),
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
            }) else {
                let _ = rustix::fs::unlinkat(&shared.dir, name.as_c_str(), AtFlags::empty());
                continue;
            };
            let Ok(st) = rustix::fs::fstat(&fd) else { continue };
            if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
                let _ = rustix::fs::unlinkat(&shared.dir, name.as_c_str(), AtFlags::empty());
                continue;
            }
            let file_len = st.st_size as u64;
            let segment = Arc::new(Segment {
                id,
                file: File::from(fd),
                live: AtomicU64::new(0),
                sealed: AtomicBool::new(true),
                end: AtomicU64::new(file_len),
                shared: shared.clone(),
            });
            let (slots, bad) = scan_segment(&segment, file_len);
            corrupt += bad;
            if slots.is_empty() {
                let _ = rustix::fs::unlinkat(&shared.dir, name.as_c_str(), AtFlags::empty());
                continue;
            }
            shared
                .table
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, segment.clone());
            found.extend(slots);
        }
        (found, corrupt)
    }
}

fn writer_gone() -> StoreError {
    StoreError::io(
        "append",
        "segments",
        std::io::Error::other("the segments writer stopped"),
    )
}

/// The slots of one segment, in order; a range that is no slot of ours is punched and
/// counted. Reads each slot's prefix (and, for a small image, the whole slot) in one `pread`.
fn scan_segment(segment: &Arc<Segment>, file_len: u64) -> (Vec<FoundSlot>, u64) {
    let shared = &segment.shared;
    // What is not a slot is given back through a descriptor held for the scan only.
    let cut = |from: u64, len: Option<u64>| {
        if let Ok(w) = shared.writable(segment.id) {
            match len {
                Some(len) => {
                    punch(&w, from, len);
                }
                None => {
                    let _ = rustix::fs::ftruncate(&w, from);
                }
            }
        }
    };
    let unit = shared.unit;
    let mut out = Vec::new();
    let mut bad_ranges = 0;
    let mut offset = 0u64;
    let mut bad_from: Option<u64> = None;
    while offset + PREFIX_LEN <= file_len {
        // Holes (punched slots) are skipped without reading them.
        let data = match rustix::fs::seek(&segment.file, rustix::fs::SeekFrom::Data(offset)) {
            Ok(at) => at,
            Err(_) => break,
        };
        if data > offset {
            if let Some(from) = bad_from.take() {
                cut(from, Some(offset - from));
                bad_ranges += 1;
            }
            offset = data / unit * unit;
            continue;
        }
        let mut prefix = [0u8; 64];
        let parsed = match rustix::io::pread(&segment.file, &mut prefix, offset) {
            Ok(64) => shared.parse(segment.id, offset, &prefix),
            _ => None,
        };
        match parsed {
            // Discarded, not punched yet (the process stopped first): its range goes now.
            Some(Err(len)) => {
                if let Some(from) = bad_from.take() {
                    cut(from, Some(offset - from));
                    bad_ranges += 1;
                }
                let gone = span(PREFIX_LEN + len, unit);
                cut(offset, Some(gone));
                offset += gone;
            }
            Some(Ok((kind, key, generation, len))) if offset + PREFIX_LEN + len <= file_len => {
                if let Some(from) = bad_from.take() {
                    cut(from, Some(offset - from));
                    bad_ranges += 1;
                }
                segment.live.fetch_add(1, Ordering::AcqRel);
                let slot = Arc::new(Slot {
                    segment: segment.clone(),
                    offset,
                    len,
                    discarded: AtomicBool::new(false),
                });
                let next = offset + slot.span();
                out.push(FoundSlot {
                    kind,
                    key,
                    generation,
                    slot,
                });
                offset = next;
            }
            _ => {
                bad_from.get_or_insert(offset);
                offset += unit;
            }
        }
    }
    if let Some(from) = bad_from {
        // Torn at the end: cut off.
        cut(from, None);
        bad_ranges += 1;
    }
    (out, bad_ranges)
}

/// Gives `len` bytes at `offset` back to the filesystem; the file keeps its length.
fn punch(file: &File, offset: u64, len: u64) -> bool {
    rustix::fs::fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
    .is_ok()
}

/// Whether the filesystem under `dir` punches holes: a probe file written and punched.
fn punch_works(dir: &OwnedFd, unit: u64) -> bool {
    let probe = "probe.seg-tmp";
    let _ = rustix::fs::unlinkat(dir, probe, AtFlags::empty());
    let Ok(fd) = rustix::fs::openat(
        dir,
        probe,
        OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    ) else {
        return false;
    };
    let file = File::from(fd);
    let zeros = vec![1u8; (2 * unit) as usize];
    let works = crate::cache::fileio::write_all_at(&file, &[&zeros], 0).is_ok() && punch(&file, 0, unit);
    let _ = rustix::fs::unlinkat(dir, probe, AtFlags::empty());
    works
}

/// The committing writer: the one thread that appends to segments, punches them and removes
/// them. Owns the open segment.
struct Writer {
    shared: Arc<Shared>,
    store: Arc<Store>,
    open: Option<Arc<Segment>>,
}

impl Writer {
    fn run(mut self, ops: mpsc::Receiver<Op>) {
        let mut stopped = false;
        while !stopped && let Ok(first) = ops.recv() {
            let mut appends = Vec::new();
            let mut upkeep = Vec::new();
            let mut bytes = 0;
            let mut next = Some(first);
            while let Some(op) = next.take() {
                match op {
                    Op::Append(a) => {
                        bytes += a.len();
                        appends.push(a);
                    }
                    op @ (Op::Bury { .. } | Op::Punch { .. }) => upkeep.push(op),
                    Op::Barrier(done) => {
                        // What was queued before it is done before it is answered.
                        self.write(std::mem::take(&mut appends));
                        self.upkeep(std::mem::take(&mut upkeep));
                        let _ = done.send(());
                    }
                    Op::Stop => stopped = true,
                }
                if !stopped && appends.len() < BATCH_APPENDS && bytes < BATCH_BYTES {
                    next = ops.try_recv().ok();
                }
            }
            self.write(appends);
            self.upkeep(upkeep);
        }
    }

    /// Marks discarded slots dead and punches those no one holds, with one write descriptor
    /// per segment for the batch.
    fn upkeep(&mut self, ops: Vec<Op>) {
        let mut writable: std::collections::HashMap<u64, Option<File>> = std::collections::HashMap::new();
        for op in ops {
            let (Op::Bury { segment, offset, len } | Op::Punch { segment, offset, len }) = &op else {
                continue;
            };
            let w = writable
                .entry(segment.id)
                .or_insert_with(|| self.shared.writable(segment.id).ok());
            match op {
                Op::Bury { .. } => {
                    if let Some(w) = w {
                        let dead = self.shared.tombstone(segment.id, *offset, *len);
                        let _ = crate::cache::fileio::write_all_at(w, &[&dead], *offset);
                    }
                }
                _ => {
                    if let Some(w) = w {
                        punch(w, *offset, *len);
                    }
                    let left = segment.live.fetch_sub(1, Ordering::AcqRel) - 1;
                    if left == 0 && segment.sealed.load(Ordering::Acquire) {
                        self.remove(segment);
                    }
                }
            }
        }
    }

    fn remove(&mut self, segment: &Arc<Segment>) {
        let _ = rustix::fs::unlinkat(&self.shared.dir, name(segment.id).as_str(), AtFlags::empty());
        self.shared
            .table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&segment.id);
    }

    /// Seals the open segment: no more appends go to it.
    fn seal(&mut self) {
        if let Some(s) = self.open.take() {
            s.sealed.store(true, Ordering::Release);
            if s.live.load(Ordering::Acquire) == 0 {
                self.remove(&s);
            }
        }
    }

    fn create(&mut self) -> Result<Arc<Segment>, StoreError> {
        let id = self.store.next_gen();
        let fd = rustix::fs::openat(
            &self.shared.dir,
            name(id).as_str(),
            OFlags::RDONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(std::io::Error::from)
        .at("create", &self.shared.path(id))?;
        let segment = Arc::new(Segment {
            id,
            file: File::from(fd),
            live: AtomicU64::new(0),
            sealed: AtomicBool::new(false),
            end: AtomicU64::new(0),
            shared: self.shared.clone(),
        });
        let count = {
            let mut table = self.shared.table.lock().unwrap_or_else(|p| p.into_inner());
            table.insert(id, segment.clone());
            table.len()
        };
        if count > self.shared.geometry.max_segments {
            self.shared.past_bound.notify_one();
        }
        Ok(segment)
    }

    /// Writes a batch: as many runs as segments it fills, one `pwritev` each.
    fn write(&mut self, appends: Vec<Append>) {
        if appends.is_empty() {
            return;
        }
        let unit = self.shared.unit;
        let mut run: Vec<(Append, u64)> = Vec::new();
        for a in appends {
            let need = span(PREFIX_LEN + a.len(), unit);
            let fits = self
                .open
                .as_ref()
                .is_some_and(|s| s.end.load(Ordering::Relaxed) + need <= self.shared.geometry.segment_bytes);
            if !fits {
                self.flush(std::mem::take(&mut run));
                self.seal();
                match self.create() {
                    Ok(s) => self.open = Some(s),
                    Err(e) => {
                        let _ = a.reply.send(Err(e));
                        continue;
                    }
                }
            }
            let Some(open) = &self.open else { continue };
            let at = open.end.fetch_add(need, Ordering::Relaxed);
            run.push((a, at));
        }
        self.flush(run);
    }

    /// Writes one run of appends to the open segment, laid out from their offsets, and
    /// answers each.
    fn flush(&mut self, run: Vec<(Append, u64)>) {
        let Some(segment) = self.open.clone() else {
            return;
        };
        let Some(&(_, start)) = run.first() else {
            return;
        };
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let unit = self.shared.unit;
        let prefixes: Vec<[u8; 64]> = run
            .iter()
            .map(|(a, at)| {
                self.shared
                    .prefix(segment.id, *at, a.kind, &a.key, a.generation, a.len())
            })
            .collect();
        let mut parts: Vec<&[u8]> = Vec::with_capacity(run.len() * 4);
        let mut end = start;
        for ((a, at), prefix) in run.iter().zip(&prefixes) {
            // Padding between slots: the previous slot's last unit.
            let gap = (at - end) as usize;
            let mut gap_left = gap;
            while gap_left > 0 {
                let n = gap_left.min(ZEROS.len());
                parts.push(&ZEROS[..n]);
                gap_left -= n;
            }
            parts.push(prefix);
            parts.extend(a.parts.iter().map(|p| &p[..]));
            end = at + PREFIX_LEN + a.len();
        }
        let written = self
            .shared
            .writable(segment.id)
            .and_then(|w| write_vectored(&w, &parts, start).map(|()| w));
        drop(parts);
        match written {
            Ok(_) => {
                for (a, at) in run {
                    segment.live.fetch_add(1, Ordering::AcqRel);
                    let slot = Arc::new(Slot {
                        segment: segment.clone(),
                        offset: at,
                        len: a.len(),
                        discarded: AtomicBool::new(false),
                    });
                    if let Err(Ok(slot)) = a.reply.send(Ok(slot)) {
                        // Its fill is gone: the slot is no one's.
                        slot.discard();
                    }
                }
            }
            Err(source) => {
                // Nothing after a failed write goes to this segment; what it wrote is given
                // back (its length stays: the earlier slots are intact).
                if let Ok(w) = self.shared.writable(segment.id) {
                    punch(&w, start, span(end - start, unit));
                }
                let path = self.shared.path(segment.id);
                for (a, _) in run {
                    let copy = std::io::Error::new(source.kind(), source.to_string());
                    let _ = a.reply.send(Err(StoreError::io("write", path.clone(), copy)));
                }
                self.seal();
            }
        }
    }
}

/// [`crate::cache::fileio::write_all_at`] in runs of at most `IOV_MAX` parts.
fn write_vectored(file: &File, parts: &[&[u8]], offset: u64) -> std::io::Result<()> {
    let mut at = offset;
    for chunk in parts.chunks(1024) {
        crate::cache::fileio::write_all_at(file, chunk, at)?;
        at += chunk.iter().map(|p| p.len() as u64).sum::<u64>();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn open(dir: &std::path::Path, budget: u64) -> (Arc<Store>, Segments) {
        let store = Arc::new(Store::open(dir).expect("store"));
        let segments = Segments::open(&store, Geometry::for_budget(budget), Default::default())
            .expect("open")
            .expect("holes punch here");
        (store, segments)
    }

    fn kh(i: u32) -> KeyHash {
        KeyHash::of(&i.to_be_bytes())
    }

    /// An append waited for (these tests run on no runtime).
    fn write(segments: &Segments, kind: Kind, key: KeyHash, generation: u64, image: Bytes) -> Arc<Slot> {
        let answer = segments.append(kind, key, generation, vec![image]).blocking_recv();
        answer.expect("answered").expect("written")
    }

    fn image(i: u32, len: usize) -> Bytes {
        Bytes::from((0..len).map(|b| (b as u32 ^ i) as u8).collect::<Vec<u8>>())
    }

    /// Another actor cuts the first segment file to nothing underneath.
    fn cut_first_segment(dir: &std::path::Path) {
        let path = segment_files(dir).remove(0);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
    }

    fn segment_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir.join(crate::cache::store::OBJECTS).join("segments"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect()
    }

    #[test]
    fn appended_images_read_back_at_their_base_and_share_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, segments) = open(dir.path(), 64 << 20);
        let slots: Vec<_> = (0..50)
            .map(|i| {
                let s = write(
                    &segments,
                    Kind::Object,
                    kh(i),
                    u64::from(i),
                    image(i, 1000 + i as usize * 37),
                );
                (i, s)
            })
            .collect();
        for (i, s) in &slots {
            let want = image(*i, 1000 + *i as usize * 37);
            assert_eq!(s.len(), want.len() as u64);
            assert_eq!(s.base() % 4096, PREFIX_LEN % 4096, "slots start on whole units");
            let got = crate::cache::fileio::read_at(s.file(), want.len(), s.base()).unwrap();
            assert_eq!(got, want);
        }
        assert_eq!(segment_files(dir.path()).len(), 1, "fifty objects, one file");
        assert_eq!(segments.count(), 1);
    }

    #[test]
    fn a_discarded_slot_is_punched_once_its_last_holder_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, segments) = open(dir.path(), 64 << 20);
        let a = write(&segments, Kind::Object, kh(1), 1, image(1, 40_000));
        let b = write(&segments, Kind::Object, kh(2), 2, image(2, 40_000));
        let path = segment_files(dir.path()).remove(0);
        let blocks = || std::fs::metadata(&path).unwrap().blocks() * 512;
        let before = blocks();
        assert!(before >= 2 * 40_000, "{before}");
        // A reader holds `a` while the index lets go of it: its bytes stay readable.
        let reader = a.clone();
        a.discard();
        drop(a);
        segments.settle_blocking();
        assert_eq!(blocks(), before, "not punched under a reader");
        let got = crate::cache::fileio::read_at(reader.file(), 40_000, reader.base()).unwrap();
        assert_eq!(got, image(1, 40_000));
        drop(reader);
        segments.settle_blocking();
        let after = blocks();
        assert!(before - after >= 40_000, "given back: {before} -> {after}");
        // The other slot is untouched.
        let got = crate::cache::fileio::read_at(b.file(), 40_000, b.base()).unwrap();
        assert_eq!(got, image(2, 40_000));
    }

    /// A purge must stick: a slot let go while a reader still holds it is marked dead at once,
    /// so a process that stops before the reader lets go (and so before the punch) does not
    /// find it again at the next start, nor counts it as corrupt.
    #[test]
    fn a_slot_let_go_under_a_reader_is_not_found_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_store, segments) = open(dir.path(), 64 << 20);
            let kept = write(&segments, Kind::Object, kh(1), 1, image(1, 6000));
            let purged = write(&segments, Kind::Object, kh(2), 2, image(2, 6000));
            let reader = purged.clone();
            purged.discard();
            drop(purged);
            segments.settle_blocking();
            // Still readable by its reader.
            let got = crate::cache::fileio::read_at(reader.file(), 6000, reader.base()).unwrap();
            assert_eq!(got, image(2, 6000));
            // The process stops with both still held.
            std::mem::forget((kept, reader));
        }
        let (store, segments) = open(dir.path(), 64 << 20);
        let (found, torn) = segments.scan(|id| store.is_own(id));
        let keys: Vec<_> = found.iter().map(|f| f.key).collect();
        assert_eq!(keys, vec![kh(1)], "the purged slot came back");
        assert_eq!(torn, 0, "a dead slot is not a corrupt one");
    }

    /// A hit reads a slot with its prefix and checks it: a segment cut short underneath and
    /// extended again (a later append) reads as zeros over the cut, which must never be served.
    #[test]
    fn a_slot_cut_underneath_reads_as_corrupt_not_as_zeros() {
        use crate::zerocopy::{Backing, map_body};
        let dir = tempfile::tempdir().unwrap();
        let (_store, segments) = open(dir.path(), 64 << 20);
        let small = write(&segments, Kind::Object, kh(1), 1, image(1, 6000));
        let large = write(&segments, Kind::Object, kh(2), 2, image(2, 40_000));
        // Intact: read (under the mapping size) and mapped, each the image's first bytes.
        let (body, _) = map_body(Backing::Slot(small.clone()), 5000, 6000, 0, u64::MAX).expect("read");
        assert_eq!(&body[..], &image(1, 6000)[..5000]);
        let (body, _) = map_body(Backing::Slot(large.clone()), 30_000, 40_000, 0, 16 << 10).expect("mapped");
        assert_eq!(&body[..], &image(2, 40_000)[..30_000]);
        // Someone cuts the segment at the first slot; an append extends it again.
        cut_first_segment(dir.path());
        let _later = write(&segments, Kind::Object, kh(3), 3, image(3, 100));
        for (slot, len, min_mmap) in [(&small, 5000, u64::MAX), (&large, 30_000, 16 << 10)] {
            let read = map_body(Backing::Slot(slot.clone()), len, slot.len(), 0, min_mmap);
            assert!(
                matches!(read, Err(crate::cache::store::ReadError::Corrupt(_))),
                "zeros served as a body"
            );
        }
    }

    /// A slot held mapped in a tier is checked before each hit by its watch: once `sendfile`
    /// (over a real socket) finds its segment cut short underneath, the watch says changed, so
    /// the tier drops it and the disk path checks the slot again.
    #[test]
    fn a_slot_found_cut_short_by_sendfile_fails_its_watch() {
        use crate::zerocopy::{Backing, map_body, poll_write, watch};
        let dir = tempfile::tempdir().unwrap();
        let (_store, segments) = open(dir.path(), 64 << 20);
        let large = write(&segments, Kind::Object, kh(2), 2, image(2, 40_000));
        let (body, _) = map_body(Backing::Slot(large.clone()), 30_000, 40_000, 0, 16 << 10).expect("mapped");
        let held = watch(&body);
        assert!(held.unchanged(0), "an intact slot fails its watch");
        cut_first_segment(dir.path());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let sent = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (client, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
            let (mut client, _peer) = (client.unwrap(), accepted.unwrap());
            std::future::poll_fn(|cx| poll_write(&mut client, cx, &[std::io::IoSlice::new(&body)])).await
        });
        assert_eq!(
            sent.map_err(|e| e.kind()).err(),
            Some(std::io::ErrorKind::UnexpectedEof),
            "sendfile sent a slot cut short"
        );
        assert!(!held.unchanged(0), "a slot found cut short passes its watch");
        assert!(!watch(&body).unchanged(0), "a new watch of it passes");
    }

    #[test]
    fn a_full_segment_is_sealed_and_unlinked_once_its_slots_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        // The smallest segments: 1 MiB, 25 slots of 40 KiB each.
        let (_store, segments) = open(dir.path(), 0);
        let slots: Vec<_> = (0..60)
            .map(|i| write(&segments, Kind::Object, kh(i), u64::from(i), image(i, 40_000)))
            .collect();
        assert_eq!(segment_files(dir.path()).len(), 3);
        let first = slots[0].segment_id();
        for s in slots.iter().filter(|s| s.segment_id() == first) {
            s.discard();
        }
        drop(slots);
        segments.settle_blocking();
        // The first (sealed) segment is gone; the others' slots were never discarded.
        let left = segment_files(dir.path());
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(left.iter().all(|p| !p.ends_with(name(first))));
    }

    #[test]
    fn a_restart_finds_every_slot_and_cuts_a_torn_end() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_store, segments) = open(dir.path(), 64 << 20);
            for i in 0..10 {
                let s = write(
                    &segments,
                    Kind::Variant(Coding::Br),
                    kh(i),
                    u64::from(i),
                    image(i, 5000),
                );
                // Kept: what the index held when the process went.
                std::mem::forget(s);
            }
        }
        // A crash cut the last slot short.
        let path = segment_files(dir.path()).remove(0);
        let len = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 100)
            .unwrap();
        let (store, segments) = open(dir.path(), 64 << 20);
        let (found, torn) = segments.scan(|id| store.is_own(id));
        assert_eq!(found.len(), 9, "the whole slots");
        assert_eq!(torn, 1, "the torn one counted");
        for (i, f) in found.iter().enumerate() {
            assert_eq!(
                (f.kind, f.key, f.generation),
                (Kind::Variant(Coding::Br), kh(i as u32), i as u64)
            );
            let got = crate::cache::fileio::read_at(f.slot.file(), 5000, f.slot.base()).unwrap();
            assert_eq!(got, image(i as u32, 5000));
        }
        assert!(
            std::fs::metadata(&path).unwrap().len() < len - 4096,
            "cut at the torn slot"
        );
    }

    /// The attacker's body spells a whole slot (a prefix, then an image) at a unit boundary;
    /// the slot that holds it is torn by a crash before its end. The scan resumes past the torn
    /// slot's prefix, meets the forged one, and must not take it for a slot: its MAC is
    /// under a key the attacker never sees.
    #[test]
    fn bytes_of_a_body_that_spell_a_slot_are_never_taken_for_one() {
        let dir = tempfile::tempdir().unwrap();
        let victim = kh(7);
        let forged = {
            let mut p = vec![0u8; 64];
            p[..8].copy_from_slice(MAGIC);
            p[16..32].copy_from_slice(&victim.0);
            p[32..40].copy_from_slice(&u64::MAX.to_be_bytes());
            p[40..48].copy_from_slice(&100u64.to_be_bytes());
            p.extend_from_slice(&[0xAA; 100]);
            p
        };
        {
            let (_store, segments) = open(dir.path(), 64 << 20);
            // The attacker's body: its forged slot lands on the unit after the prefix's.
            let mut body = vec![1u8; 4096 - PREFIX_LEN as usize];
            body.extend_from_slice(&forged);
            body.resize(12_000, 2);
            let s = write(&segments, Kind::Object, kh(1), 1, Bytes::from(body));
            std::mem::forget(s);
        }
        // Its slot's own prefix is lost (a torn write of the first unit).
        let path = segment_files(dir.path()).remove(0);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 64], 0).unwrap();
        let (store, segments) = open(dir.path(), 64 << 20);
        let (found, torn) = segments.scan(|id| store.is_own(id));
        assert!(
            found.iter().all(|f| f.key != victim),
            "a forged slot was read: {found:?}"
        );
        assert!(found.is_empty());
        assert!(torn >= 1);
        // And with the key: the same bytes, given a valid MAC, would have been read (so the
        // test can tell).
        let shared = &segments.shared;
        let mac = shared.mac(0, 4096, &forged[..48]);
        let mut valid = forged[..64].to_vec();
        valid[48..64].copy_from_slice(&mac);
        let id = u64::from_str_radix(path.file_stem().unwrap().to_str().unwrap(), 16).unwrap();
        assert!(shared.parse(id, 4096, &valid).is_none(), "bound to its segment");
        let mac = shared.mac(id, 4096, &forged[..48]);
        valid[48..64].copy_from_slice(&mac);
        assert!(shared.parse(id, 4096, &valid).is_some());
    }
}
