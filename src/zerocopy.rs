//! Zero-copy: stored bodies mapped into memory, and sent from their files. The crate's only
//! `unsafe` lives here, under one contract.
//!
//! SAFETY contract: an object file (its body first, then its record) is mapped only once it is
//! complete and indexed (written whole under its name, or linked into place whole), and from
//! then on never modified, only unlinked (a
//! refreshed head is a new file). Unlinking leaves a live mapping valid until it is dropped,
//! so eviction runs while readers hold mappings. A slot of a segment (small objects) is mapped
//! the same way: its range is written once, before it is indexed, never written again, and
//! punched only when its last holder lets go; a mapping holds its slot ([`Backing::Slot`]),
//! so eviction runs while readers hold those too. A fill's file is mapped while it is written:
//! its readers are only given ranges already written, which are never written again. What no
//! process can prevent is another actor truncating a file underneath (that would fault a
//! reader of the mapping): the file's length is checked against the index when it is opened,
//! the body's hash before its first use, and hits check the open file again (`unchanged`).
//! On HTTP/1 the mapping is not even read: a connection sends a mapped slice from its file
//! with `sendfile` ([`poll_write`]), which comes up short, not faulting, on a truncated file.
//! It sends from the descriptor its mapping's region recorded, borrowed for the one call: the
//! region holds its file open for as long as the mapping lives, and the slice being sent is
//! part of that mapping.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, RwLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::net::TcpStream;

use crate::cache::fileio::{mtime_ns, read_at, read_cached_at};
use crate::cache::segments::Slot;
use crate::cache::store::ReadError;

/// What a mapped body is mapped from: an object file of its own, or a slot of a segment
/// (held while mapped: a discarded slot's range is not punched until the mapping goes).
#[derive(Clone)]
pub enum Backing {
    /// A whole file: the body at its start.
    File(Arc<File>),
    /// A slot: the body at its base.
    Slot(Arc<Slot>),
}

impl Backing {
    fn file(&self) -> &File {
        match self {
            Backing::File(f) => f,
            Backing::Slot(s) => s.file(),
        }
    }

    /// Its file and where the image starts in it, for reads.
    pub fn parts(&self) -> (&File, u64) {
        (self.file(), self.base())
    }

    /// Where the image starts in the file.
    fn base(&self) -> u64 {
        match self {
            Backing::File(_) => 0,
            Backing::Slot(s) => s.base(),
        }
    }
}

/// Maps the first `len` bytes of an object image of `file_len` bytes (its body) read-only and
/// returns them as [`Bytes`] that own the mapping, with the file's modification time. Bodies
/// under `min_mmap` bytes are read instead (a mapping costs more than a copy there), together
/// with the `extra` bytes that follow them, in the same read: the returned bytes are then
/// `len + extra` long. A file of its own is checked with one `fstat` (its length against the
/// index's); a slot is not (its segment grows with every append): its modification time reads
/// as 0.
///
/// Blocking: off the runtime ([`map_body_cached`] on it).
pub fn map_body(from: Backing, len: u64, file_len: u64, extra: u64, min_mmap: u64) -> Result<(Bytes, u64), ReadError> {
    map_with(from, len, file_len, extra, min_mmap, false).map(|m| m.expect("a blocking read always answers"))
}

/// [`map_body`] without waiting for the disk: `Ok(None)` where a read would, for the caller
/// to retry off the runtime.
pub fn map_body_cached(
    from: Backing,
    len: u64,
    file_len: u64,
    extra: u64,
    min_mmap: u64,
) -> Result<Option<(Bytes, u64)>, ReadError> {
    map_with(from, len, file_len, extra, min_mmap, true)
}

fn map_with(
    from: Backing,
    len: u64,
    file_len: u64,
    extra: u64,
    min_mmap: u64,
    nowait: bool,
) -> Result<Option<(Bytes, u64)>, ReadError> {
    let mtime = match &from {
        Backing::File(file) => {
            let md = file.metadata()?;
            let actual = md.len();
            if actual != file_len || len > file_len {
                return Err(ReadError::Corrupt(format!(
                    "object file is {actual} bytes, the index says {file_len}"
                )));
            }
            mtime_ns(&md)
        }
        Backing::Slot(_) if len > file_len => {
            return Err(ReadError::Corrupt("slot shorter than its body".into()));
        }
        Backing::Slot(_) => 0,
    };
    let base = from.base();
    // A slot is read with its prefix, which must still be the slot's (its MAC, its length):
    // a segment cut short or punched underneath, then extended again by an append, reads as
    // zeros there, never as a body.
    let prefix = match &from {
        Backing::Slot(_) => crate::cache::segments::PREFIX_LEN,
        Backing::File(_) => 0,
    };
    let read = |want: usize, at: u64| {
        let read = if nowait {
            read_cached_at(from.file(), want, at)
        } else {
            read_at(from.file(), want, at).map(Some)
        };
        read.map_err(ReadError::of_read)
    };
    let intact = |head: &[u8]| match &from {
        Backing::Slot(slot) if !slot.intact(head) => {
            Err(ReadError::Corrupt("slot prefix does not match its slot".into()))
        }
        _ => Ok(()),
    };
    if len < min_mmap || len == 0 {
        let want = (len + extra).min(file_len) as usize + prefix as usize;
        if want == 0 {
            return Ok(Some((Bytes::new(), mtime)));
        }
        let Some(buf) = read(want, base - prefix)? else {
            return Ok(None);
        };
        intact(&buf[..prefix as usize])?;
        return Ok(Some((Bytes::from(buf).slice(prefix as usize..), mtime)));
    }
    if prefix > 0 {
        let Some(head) = read(prefix as usize, base - prefix)? else {
            return Ok(None);
        };
        intact(&head)?;
    }
    // SAFETY: see the module contract: a placed file is immutable and only unlinked; a slot's
    // range is written once, before it is indexed, and punched only when its last holder (this
    // mapping among them) lets go.
    let map = unsafe {
        memmap2::MmapOptions::new()
            .offset(base)
            .len(len as usize)
            .map(from.file())?
    };
    let file_len = match &from {
        Backing::File(_) => file_len,
        Backing::Slot(_) => 0,
    };
    Ok(Some((
        Bytes::from_owner(MappedBody::new(map, from, base, file_len)),
        mtime,
    )))
}

/// Maps the first `len` bytes of an object file that is still being written (pre-allocated
/// to at least `len`), for a fill's readers. Only the ranges already written are ever handed
/// out, and on HTTP/1 they go out with `sendfile` without the mapping being read.
pub fn map_fill(file: Arc<File>, len: u64) -> std::io::Result<Bytes> {
    let len = usize::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: written ranges are never rewritten and the file is never truncated by us (see
    // the module contract); readers are only given ranges the fill has written.
    let map = unsafe { memmap2::MmapOptions::new().len(len).map(&*file)? };
    // (Its file grows past the body when the record is written: its length is not checked.)
    Ok(Bytes::from_owner(MappedBody::new(map, Backing::File(file), 0, 0)))
}

/// Mapped bodies, with their files: a connection that is asked to write a slice of one sends
/// it from the file with `sendfile` instead of copying it from the mapping.
static MAPPED: LazyLock<Registry> = LazyLock::new(Registry::default);

/// Shards of [`Registry::starts`].
const START_SHARDS: usize = 16;

/// The mapped bodies by start address, twice: in order (a slice anywhere inside one finds it:
/// the rest of a body after a short write), and by exact start in shards (the usual write, a
/// body sent whole from its first byte, finds it with one hash probe, under a lock the other
/// serving loops seldom take: one ordered map behind one lock was 6% of a disk-hit load's user
/// time, its lock's cache line moving between the cores on every hit).
///
/// Lock order: `ordered` before a shard of `starts`; readers take one of them at a time.
#[derive(Default)]
struct Registry {
    ordered: RwLock<BTreeMap<usize, Region>>,
    starts: [Shard; START_SHARDS],
}

/// A shard of the exact starts, on a cache line of its own.
#[derive(Default)]
#[repr(align(64))]
struct Shard(RwLock<HashMap<usize, Region, BuildHasherDefault<AddressHasher>>>);

impl Registry {
    fn shard(&self, start: usize) -> &Shard {
        &self.starts[(hash_address(start) >> 60) as usize % START_SHARDS]
    }

    fn insert(&self, start: usize, region: Region) {
        let mut ordered = self.ordered.write().unwrap_or_else(|p| p.into_inner());
        ordered.insert(start, region.clone());
        let mut shard = self.shard(start).0.write().unwrap_or_else(|p| p.into_inner());
        shard.insert(start, region);
    }

    fn remove(&self, start: usize) {
        let mut ordered = self.ordered.write().unwrap_or_else(|p| p.into_inner());
        ordered.remove(&start);
        let mut shard = self.shard(start).0.write().unwrap_or_else(|p| p.into_inner());
        shard.remove(&start);
    }

    /// `f` of the region `bytes` lie in (its start address and the region), if any.
    fn with<T>(&self, bytes: &[u8], f: impl FnOnce(usize, &Region) -> T) -> Option<T> {
        let at = bytes.as_ptr() as usize;
        {
            let shard = self.shard(at).0.read().unwrap_or_else(|p| p.into_inner());
            if let Some(region) = shard.get(&at) {
                return (bytes.len() <= region.len).then(|| f(at, region));
            }
        }
        let ordered = self.ordered.read().unwrap_or_else(|p| p.into_inner());
        let (&start, region) = ordered.range(..=at).next_back()?;
        (at + bytes.len() <= start + region.len).then(|| f(start, region))
    }
}

/// A folded multiply of an address: its low bits (a hash table's bucket) and high bits (the
/// shard) both depend on all of its bits, where addresses differ mostly in the middle ones.
fn hash_address(at: usize) -> u64 {
    let product = (at as u128).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (product as u64) ^ ((product >> 64) as u64)
}

/// [`hash_address`] as a `Hasher`, for the exact starts.
#[derive(Default)]
struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = hash_address((self.0 as usize).rotate_left(8) ^ usize::from(b));
        }
    }

    fn write_usize(&mut self, at: usize) {
        self.0 = hash_address(at);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[derive(Clone)]
struct Region {
    len: usize,
    /// The length its file must have (0: not known, for a file still being written, or a
    /// segment, which grows).
    file_len: u64,
    /// What it maps, held while it is mapped.
    from: Backing,
    /// The file offset its first byte is at.
    base: u64,
    /// `from`'s descriptor, open while the region is registered (`from` holds it): what a
    /// connection sends a slice from, without reaching through `from` to its file.
    fd: RawFd,
    /// `sendfile` found the file shorter than the mapping: truncated underneath (shared with
    /// the [`Watch`] of a file's body held in a tier).
    truncated: Arc<AtomicBool>,
}

/// How many times `sendfile` found a mapped file shorter than its mapping since startup: a
/// slot's [`Watch`] is the count when it was taken.
static TRUNCATIONS: AtomicU64 = AtomicU64::new(0);

/// A mapped body, registered in [`MAPPED`] while it lives.
struct MappedBody {
    map: memmap2::Mmap,
}

impl MappedBody {
    fn new(map: memmap2::Mmap, from: Backing, base: u64, file_len: u64) -> MappedBody {
        let region = Region {
            len: map.len(),
            file_len,
            fd: from.file().as_raw_fd(),
            from,
            base,
            truncated: Arc::new(AtomicBool::new(false)),
        };
        MAPPED.insert(map.as_ptr() as usize, region);
        MappedBody { map }
    }
}

impl AsRef<[u8]> for MappedBody {
    fn as_ref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for MappedBody {
    fn drop(&mut self) {
        // Before the mapping goes (the field drops after this): no later mapping at the same
        // address can be mistaken for this one.
        MAPPED.remove(self.map.as_ptr() as usize);
    }
}

/// The descriptor of the file `bytes` were mapped from, and their offset in it, when they lie
/// inside one mapped body. The descriptor stays open while `bytes` do: their mapping's region
/// holds its file until the mapping is dropped, and no other mapping can take their address
/// before then.
fn mapped_file(bytes: &[u8]) -> Option<(RawFd, u64)> {
    with_region(bytes, |start, region| {
        (region.fd, region.base + (bytes.as_ptr() as usize - start) as u64)
    })
}

/// Records that the file `bytes` were mapped from turned out shorter than its mapping.
fn mark_truncated(bytes: &[u8]) {
    with_region(bytes, |_, region| {
        region.truncated.store(true, Ordering::Release);
        TRUNCATIONS.fetch_add(1, Ordering::Release);
    });
}

/// How a body held in a tier is checked before each hit on it: resolved once, when the tier
/// takes it ([`watch`]), so that a hit does not look its mapping up again.
pub enum Watch {
    /// Bytes in memory: nothing can change them.
    Copy,
    /// A slot of a segment: only a truncation found by `sendfile` tells (a segment grows and
    /// changes with every append). Any truncation found since the count it holds was taken,
    /// of whatever file, drops it: the disk path checks it again. A truncation is a rare
    /// event, and a hit then reads no memory of the slot's own to check it.
    Slot(u64),
    /// A file of its own, which must keep `len` bytes (and the modification time checked).
    File {
        file: Arc<File>,
        len: u64,
        truncated: Arc<AtomicBool>,
    },
}

/// The [`Watch`] of `bytes`: of the mapped body they lie in, else of a copy.
pub fn watch(bytes: &[u8]) -> Watch {
    with_region(bytes, |_, region| match &region.from {
        Backing::File(file) => Watch::File {
            file: file.clone(),
            len: region.file_len.max(region.len as u64),
            truncated: region.truncated.clone(),
        },
        Backing::Slot(_) => {
            // The count first: a truncation marked after it changes the count; one marked
            // before shows in the region's flag (set before the count is raised).
            let seen = TRUNCATIONS.load(Ordering::Acquire);
            Watch::Slot(if region.truncated.load(Ordering::Acquire) {
                u64::MAX
            } else {
                seen
            })
        }
    })
    .unwrap_or(Watch::Copy)
}

impl Watch {
    /// False when the body's file changed since it was checked at `mtime`: `sendfile` found it
    /// truncated, or (a file of its own, one `fstat` on its open descriptor) its length or
    /// modification time differs from the object's, or it was removed. Serving it again could
    /// send other bytes or fail, so the cache drops it.
    pub fn unchanged(&self, mtime: u64) -> bool {
        use std::os::unix::fs::MetadataExt;
        match self {
            Watch::Copy => true,
            Watch::Slot(seen) => TRUNCATIONS.load(Ordering::Relaxed) == *seen,
            Watch::File { file, len, truncated } => {
                !truncated.load(Ordering::Relaxed)
                    && file
                        .metadata()
                        .is_ok_and(|md| md.len() == *len && mtime_ns(&md) == mtime && md.nlink() > 0)
            }
        }
    }
}

fn with_region<T>(bytes: &[u8], f: impl FnOnce(usize, &Region) -> T) -> Option<T> {
    MAPPED.with(bytes, f)
}

/// Slices smaller than this are written from memory: a lookup and two system calls cost more
/// than the copy they save.
const SENDFILE_MIN: usize = 16 << 10;

/// Writes `bufs` to `stream`, with a mapped body slice among them sent from its file: the
/// slices before it go out first, marked as having more to follow (`MSG_MORE`, so the head
/// and the body still share packets), then the body slice by `sendfile`. Partial progress is
/// reported as such; the caller comes back with the rest. A file found shorter than its
/// mapping fails the write (`UnexpectedEof`) and is marked, so hits stop serving it.
pub fn poll_write(stream: &mut TcpStream, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
    let mapped = bufs
        .iter()
        .position(|b| b.len() >= SENDFILE_MIN)
        .and_then(|i| Some((i, mapped_file(&bufs[i])?)));
    match mapped {
        None => tokio::io::AsyncWrite::poll_write_vectored(std::pin::Pin::new(stream), cx, bufs),
        Some((0, (fd, offset))) => {
            // SAFETY: `fd` is the descriptor of the file `bufs[0]` was mapped from, which
            // stays open while those bytes live ([`mapped_file`]); they live through this call.
            let file = unsafe { BorrowedFd::borrow_raw(fd) };
            let sent = poll_sendfile(stream, cx, file, offset, bufs[0].len());
            if matches!(&sent, Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof) {
                mark_truncated(&bufs[0]);
            }
            sent
        }
        Some((i, _)) => poll_send_more(stream, cx, &bufs[..i]),
    }
}

/// `sendfile` of `len` bytes of `file` from `offset`, when the socket is writable.
fn poll_sendfile(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    file: BorrowedFd<'_>,
    offset: u64,
    len: usize,
) -> Poll<io::Result<usize>> {
    let sent = std::task::ready!(poll_write_with(stream, cx, || {
        let mut at = offset;
        Ok(rustix::fs::sendfile(stream, file, Some(&mut at), len)?)
    }));
    Poll::Ready(match sent {
        // The file is shorter than its mapping: it was truncated underneath. Fail the
        // connection rather than send anything else.
        Ok(0) => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "object file truncated")),
        other => other,
    })
}

/// `sendmsg` of `bufs` with `MSG_MORE`, when the socket is writable.
fn poll_send_more(stream: &TcpStream, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
    use rustix::net::{SendAncillaryBuffer, SendFlags};
    poll_write_with(stream, cx, || {
        let flags = SendFlags::MORE | SendFlags::NOSIGNAL;
        Ok(rustix::net::sendmsg(
            stream,
            bufs,
            &mut SendAncillaryBuffer::default(),
            flags,
        )?)
    })
}

/// Runs the non-blocking write `op` once the socket is writable, again while it would block.
fn poll_write_with(
    stream: &TcpStream,
    cx: &mut Context<'_>,
    mut op: impl FnMut() -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    loop {
        std::task::ready!(stream.poll_write_ready(cx))?;
        match stream.try_io(tokio::io::Interest::WRITABLE, &mut op) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return Poll::Ready(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `len` bytes, mapped whole as a body.
    fn mapped(len: usize) -> (tempfile::TempDir, Bytes) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("body");
        std::fs::write(&path, vec![7u8; len]).expect("write");
        let file = Arc::new(File::open(&path).expect("open"));
        let (body, _) = map_body(Backing::File(file), len as u64, len as u64, 0, 1).expect("map");
        (dir, body)
    }

    #[test]
    fn a_mapped_body_finds_its_file_from_its_start_and_from_inside_and_not_once_unmapped() {
        let (_a_dir, a) = mapped(64 << 10);
        let (_b_dir, b) = mapped(32 << 10);
        // Whole, from the first byte: the exact-start shard.
        assert_eq!(mapped_file(&a).map(|(_, at)| at), Some(0));
        assert_eq!(mapped_file(&b).map(|(_, at)| at), Some(0));
        // The rest after a short write, and a slice in the middle: the ordered map.
        assert_eq!(mapped_file(&a[1000..]).map(|(_, at)| at), Some(1000));
        assert_eq!(mapped_file(&b[5..100]).map(|(_, at)| at), Some(5));
        // The first bytes only: found at the start, shorter than the region.
        assert_eq!(mapped_file(&a[..10]).map(|(_, at)| at), Some(0));
        // The files are told apart, by the descriptors the regions hold.
        let (fd, _) = mapped_file(&b).expect("b is mapped");
        // SAFETY: `b` lives: its region holds the file open.
        let stat = rustix::fs::fstat(unsafe { BorrowedFd::borrow_raw(fd) }).expect("stat");
        assert_eq!(stat.st_size, 32 << 10);
        // A copy is not mapped.
        let copy = a.to_vec();
        assert!(mapped_file(&copy).is_none());
        // Once its last holder lets go, both maps let go of its file (each holds it).
        let Some(Backing::File(file)) = with_region(&a, |_, region| region.from.clone()) else {
            panic!("a is a file of its own")
        };
        assert_eq!(Arc::strong_count(&file), 3, "ours and one per map");
        drop(a);
        assert_eq!(Arc::strong_count(&file), 1, "only ours");
    }
}
