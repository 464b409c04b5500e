//! The only `unsafe` in the cache: mapping stored bodies into memory, reading without
//! blocking, asking the filesystem for its free space, and the descriptor limit.
//!
//! SAFETY contract for mappings: an object file (its body first, then its record) is written
//! unnamed or under `tmp/`, linked into place, and from then on never modified, only unlinked.
//! Unlinking leaves a live mapping valid until it is dropped, so eviction can run while
//! readers hold mappings. What no process can prevent is another actor truncating the file
//! underneath (that would fault the reader); the file's length is checked against the index
//! when it is opened, and the body's hash before its first use.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;

/// A file's modification time in nanoseconds since the epoch (0 when unknown).
pub fn mtime_ns(md: &std::fs::Metadata) -> u64 {
    md.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Maps the first `len` bytes of an object file of `file_len` bytes (its body) read-only and
/// returns them as [`Bytes`] that own the mapping, with the file's modification time. Bodies
/// under `min_mmap` bytes are read instead (a mapping costs more than a copy there), together
/// with the `extra` bytes that follow them, in the same read: the returned bytes are then
/// `len + extra` long.
///
/// With `nowait`, `Ok(None)` instead of waiting for the disk: the caller retries off the runtime.
pub fn map_body(
    file: File,
    len: u64,
    file_len: u64,
    extra: u64,
    min_mmap: u64,
    nowait: bool,
) -> std::io::Result<Option<(Bytes, u64)>> {
    let md = file.metadata()?;
    let mtime = mtime_ns(&md);
    let actual = md.len();
    if actual != file_len || len > file_len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("object file is {actual} bytes, the index says {file_len}"),
        ));
    }
    if len < min_mmap || len == 0 {
        let want = (len + extra).min(file_len) as usize;
        if want == 0 {
            return Ok(Some((Bytes::new(), mtime)));
        }
        return Ok(read_at(&file, want, 0, nowait)?.map(|buf| (Bytes::from(buf), mtime)));
    }
    // SAFETY: see the module contract: the file is immutable once placed and only unlinked.
    let map = unsafe { memmap2::MmapOptions::new().len(len as usize).map(&file)? };
    Ok(Some((
        Bytes::from_owner(MappedBody::new(map, Arc::new(file), file_len)),
        mtime,
    )))
}

/// Maps the first `len` bytes of a body file that is still being written (pre-allocated to
/// `len`), for a fill's readers. Only the ranges already written are ever handed out, and on
/// HTTP/1 they go out with `sendfile` without the mapping being read.
pub fn map_fill(file: Arc<File>, len: u64) -> std::io::Result<Bytes> {
    let len = usize::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: written ranges are never rewritten and the file is never truncated by us (see
    // the module contract); readers are only given ranges the fill has written.
    let map = unsafe { memmap2::MmapOptions::new().len(len).map(&*file)? };
    // (Its file grows past the body when the record is written: its length is not checked.)
    Ok(Bytes::from_owner(MappedBody::new(map, file, 0)))
}

/// Mapped bodies by start address, with their files: a connection that is asked to write a
/// slice of one sends it from the file with `sendfile` instead of copying it from the mapping.
static MAPPED: RwLock<BTreeMap<usize, Region>> = RwLock::new(BTreeMap::new());

struct Region {
    len: usize,
    /// The length its file must have (0: not known, for a file still being written).
    file_len: u64,
    file: Arc<File>,
    /// `sendfile` found the file shorter than the mapping: truncated underneath.
    truncated: AtomicBool,
}

/// A mapped body, registered in [`MAPPED`] while it lives.
struct MappedBody {
    map: memmap2::Mmap,
}

impl MappedBody {
    fn new(map: memmap2::Mmap, file: Arc<File>, file_len: u64) -> MappedBody {
        let region = Region {
            len: map.len(),
            file_len,
            file,
            truncated: AtomicBool::new(false),
        };
        MAPPED
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(map.as_ptr() as usize, region);
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
        MAPPED
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(self.map.as_ptr() as usize));
    }
}

/// The file and offset that `bytes` were mapped from, when they lie inside one mapped body.
pub fn mapped_file(bytes: &[u8]) -> Option<(Arc<File>, u64)> {
    with_region(bytes, |start, region| {
        (region.file.clone(), (bytes.as_ptr() as usize - start) as u64)
    })
}

/// Records that the file `bytes` were mapped from turned out shorter than its mapping.
pub fn mark_truncated(bytes: &[u8]) {
    with_region(bytes, |_, region| region.truncated.store(true, Ordering::Relaxed));
}

/// False when `bytes` are a mapped body whose file changed since it was checked at `mtime`:
/// `sendfile` found it truncated, or its length or modification time differs from the
/// object's, or it was removed. Serving it again could send other bytes or fail, so the cache drops it. One
/// `fstat` on the open descriptor; true for bytes that are not mapped.
pub fn unchanged(bytes: &[u8], mtime: u64) -> bool {
    use std::os::unix::fs::MetadataExt;
    // The descriptor is cloned out so that the `fstat` is not made under the table's lock.
    let Some(found) = with_region(bytes, |_, region| {
        (!region.truncated.load(Ordering::Relaxed))
            .then(|| (region.file.clone(), region.file_len.max(region.len as u64)))
    }) else {
        return true;
    };
    let Some((file, len)) = found else {
        return false;
    };
    file.metadata()
        .is_ok_and(|md| md.len() == len && mtime_ns(&md) == mtime && md.nlink() > 0)
}

/// The soft limit on open descriptors (`RLIMIT_NOFILE`); 1024 when it cannot be read.
pub fn descriptor_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the call to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_cur
}

/// How many memory mappings the process may have (`vm.max_map_count`; 65530 when unreadable).
pub fn mapping_limit() -> u64 {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(65530)
}

/// The soft descriptor limit the process started with, before [`raise_descriptor_limit`]:
/// children get it back (0: not raised).
static STARTED_WITH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Gives a child process the descriptor limit this one started with. Async-signal-safe: for
/// use between `fork` and `exec`.
pub fn restore_descriptor_limit() -> std::io::Result<()> {
    let soft = STARTED_WITH.load(Ordering::Relaxed);
    if soft == 0 {
        return Ok(());
    }
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit; getrlimit and setrlimit are async-signal-safe.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    lim.rlim_cur = soft;
    // SAFETY: as above; lowering the soft limit is always allowed.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Raises the soft limit on open descriptors to the hard limit, as servers that hold many
/// connections and files do (nothing else in the process depends on the lower one). Returns
/// (before, after).
pub fn raise_descriptor_limit() -> std::io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the call to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let before = lim.rlim_cur;
    // An unlimited hard limit is still capped by the kernel (`fs.nr_open`, 1M by default).
    let target = lim.rlim_max.min(1 << 20);
    if lim.rlim_cur < target {
        lim.rlim_cur = target;
        // SAFETY: `lim` is a valid rlimit; raising the soft limit up to the hard one is allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        STARTED_WITH.store(before, Ordering::Relaxed);
    }
    Ok((before, lim.rlim_cur))
}

fn with_region<T>(bytes: &[u8], f: impl FnOnce(usize, &Region) -> T) -> Option<T> {
    let at = bytes.as_ptr() as usize;
    let regions = MAPPED.read().unwrap_or_else(|p| p.into_inner());
    let (&start, region) = regions.range(..=at).next_back()?;
    (at + bytes.len() <= start + region.len).then(|| f(start, region))
}

/// Reads exactly `len` bytes at `offset` into a new buffer, which is not zeroed first. With
/// `nowait`, only if that needs no disk I/O: the pages are in the page cache (`preadv2` with
/// `RWF_NOWAIT`), and `Ok(None)` means it would block (or the kernel cannot tell): read off the
/// runtime instead. Hits and read-while-write readers use this to skip a hand-off to the
/// blocking pool for what is, nearly always, a memory copy.
pub fn read_at(file: &File, len: usize, offset: u64, nowait: bool) -> std::io::Result<Option<Vec<u8>>> {
    use std::os::fd::AsRawFd;
    let flags = if nowait { libc::RWF_NOWAIT } else { 0 };
    let mut buf = Vec::<u8>::with_capacity(len);
    while buf.len() < len {
        let filled = buf.len();
        let iov = libc::iovec {
            // SAFETY: `filled < len <= capacity`, so the pointer stays in the allocation.
            iov_base: unsafe { buf.as_mut_ptr().add(filled) }.cast(),
            iov_len: len - filled,
        };
        let at = libc::off_t::try_from(offset + filled as u64)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: `iov` covers the buffer's spare capacity, which is writable for `iov_len`
        // bytes and outlives the call; the descriptor is owned by `file`.
        let rc = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, at, flags) };
        match rc {
            // SAFETY: the kernel wrote `n` more bytes after the `filled` initialised ones.
            n if n > 0 => unsafe { buf.set_len(filled + n as usize) },
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            _ => {
                let err = std::io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) if nowait => return Ok(None),
                    _ => return Err(err),
                }
            }
        }
    }
    Ok(Some(buf))
}

/// Opens a stored file for reading without updating its access time: reading a cached object
/// must not write its inode. Falls back to a plain open where `O_NOATIME` is refused (a file
/// this user does not own).
pub fn open_for_read(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOATIME)
        .open(path)
    {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => File::open(path),
        other => other,
    }
}

/// Free bytes available to unprivileged writers, and the filesystem's total size.
pub fn disk_space(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: c_path is a valid NUL-terminated string; st points to writable memory of the
    // right type, fully initialised by statvfs on success (checked below).
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled the struct.
    let st = unsafe { st.assume_init() };
    let frsize = st.f_frsize;
    Ok((st.f_bavail * frsize, st.f_blocks * frsize))
}

/// Allocates `len` bytes for `file` up front, so a full disk is reported now rather than in
/// the middle of a fill that clients are already reading.
pub fn preallocate(file: &File, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    if len == 0 {
        return Ok(());
    }
    let len = libc::off_t::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: a valid open descriptor owned by `file`; posix_fallocate takes integers only.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
    match rc {
        0 => Ok(()),
        // Filesystems without allocation support: the writes themselves will tell.
        libc::EOPNOTSUPP | libc::EINVAL => Ok(()),
        errno => Err(std::io::Error::from_raw_os_error(errno)),
    }
}

/// Writes all of `parts`, one after another, at `offset`: one `pwritev` for all of them
/// (more only when the kernel writes less than asked).
pub fn write_all_at(file: &File, parts: &[&[u8]], offset: u64) -> std::io::Result<()> {
    use std::io::IoSlice;
    let mut parts: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
    let mut at = offset;
    let mut first = 0;
    while first < parts.len() {
        let slices: Vec<IoSlice<'_>> = parts[first..].iter().map(|p| IoSlice::new(p)).collect();
        let mut n = match rustix::io::pwritev(file, &slices, at) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        };
        at += n as u64;
        while first < parts.len() && n >= parts[first].len() {
            n -= parts[first].len();
            first += 1;
        }
        if n > 0 {
            parts[first] = &parts[first][n..];
        }
    }
    Ok(())
}

/// Copies the first `len` bytes of `from` to the start of `to` inside the kernel
/// (`copy_file_range`: no trip through user memory, and shared extents where the filesystem
/// can), falling back to a read and a write where the call is not supported.
pub fn copy_range(from: &File, to: &File, len: u64) -> std::io::Result<()> {
    let (mut off_in, mut off_out) = (0u64, 0u64);
    while off_in < len {
        let want = (len - off_in).min(1 << 30) as usize;
        match rustix::fs::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), want) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => {}
            Err(
                rustix::io::Errno::XDEV
                | rustix::io::Errno::NOSYS
                | rustix::io::Errno::OPNOTSUPP
                | rustix::io::Errno::INVAL,
            ) => {
                let rest = read_at(from, (len - off_in) as usize, off_in, false)?.expect("a blocking read");
                return write_all_at(to, &[&rest], off_out);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
