//! File operations of the store, through `rustix`: reads that do not wait for the disk,
//! vectored writes, in-kernel copies, allocation up front, opens that leave access times alone.

use std::fs::File;
use std::path::Path;

/// A file's modification time in nanoseconds since the epoch (0 when unknown).
pub fn mtime_ns(md: &std::fs::Metadata) -> u64 {
    md.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Reads exactly `len` bytes at `offset` into a new buffer (blocking: off the runtime).
pub fn read_at(file: &File, len: usize, offset: u64) -> std::io::Result<Vec<u8>> {
    pread_all(file, len, offset, false).map(|read| read.expect("a blocking read always answers"))
}

/// [`read_at`] only if that needs no disk I/O: the pages are in the page cache (`preadv2` with
/// `RWF_NOWAIT`); `Ok(None)` means it would block (or the kernel cannot tell): read off the
/// runtime instead. Hits and read-while-write readers use this to skip a hand-off to the
/// blocking pool for what is, nearly always, a memory copy.
pub fn read_cached_at(file: &File, len: usize, offset: u64) -> std::io::Result<Option<Vec<u8>>> {
    pread_all(file, len, offset, true)
}

fn pread_all(file: &File, len: usize, offset: u64, nowait: bool) -> std::io::Result<Option<Vec<u8>>> {
    use rustix::io::{Errno, ReadWriteFlags};
    let flags = if nowait {
        ReadWriteFlags::NOWAIT
    } else {
        ReadWriteFlags::empty()
    };
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        let mut iov = [std::io::IoSliceMut::new(&mut buf[filled..])];
        match rustix::io::preadv2(file, &mut iov, offset + filled as u64, flags) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(Errno::INTR) => continue,
            Err(Errno::AGAIN | Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL) if nowait => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Some(buf))
}

/// Fills `bytes` from the kernel's random source without waiting for it to be seeded
/// (`getrandom` with `GRND_NONBLOCK`); an error when it is not, or gives fewer bytes.
pub fn random(bytes: &mut [u8]) -> std::io::Result<()> {
    let want = bytes.len();
    let n = rustix::rand::getrandom(bytes, rustix::rand::GetRandomFlags::NONBLOCK)?;
    if n == want {
        Ok(())
    } else {
        Err(std::io::ErrorKind::UnexpectedEof.into())
    }
}

/// Opens a stored file for reading without updating its access time: reading a cached object
/// must not write its inode. Falls back to a plain open where `O_NOATIME` is refused (a file
/// this user does not own).
pub fn open_for_read(path: &Path) -> std::io::Result<File> {
    use rustix::fs::{Mode, OFlags};
    let flags = OFlags::RDONLY | OFlags::CLOEXEC;
    match rustix::fs::open(path, flags | OFlags::NOATIME, Mode::empty()) {
        Err(rustix::io::Errno::PERM) => Ok(File::from(rustix::fs::open(path, flags, Mode::empty())?)),
        other => Ok(File::from(other?)),
    }
}

/// Allocates `len` bytes for `file` up front, so a full disk is reported now rather than in
/// the middle of a fill that clients are already reading.
pub fn preallocate(file: &File, len: u64) -> std::io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(()),
        // Filesystems without allocation support: the writes themselves will tell.
        Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::INVAL) => Ok(()),
        Err(e) => Err(e.into()),
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
                let rest = read_at(from, (len - off_in) as usize, off_in)?;
                return write_all_at(to, &[&rest], off_out);
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_written_one_after_another_at_the_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        write_all_at(&file, &[b"head", b"", &[7u8; 100_000], b"tail"], 3).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 3 + 4 + 100_000 + 4);
        assert_eq!(&bytes[3..7], b"head");
        assert!(bytes[7..100_007].iter().all(|&b| b == 7));
        assert_eq!(&bytes[100_007..], b"tail");
        // Read back exactly, and a read past the end is an error, not a short buffer.
        assert_eq!(read_at(&file, 4, 100_007).unwrap(), b"tail");
        assert!(read_at(&file, 5, 100_007).is_err());
    }

    #[test]
    fn a_range_is_copied_to_the_start_of_another_file() {
        let dir = tempfile::tempdir().unwrap();
        let from_path = dir.path().join("from");
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&from_path, [&body[..], b"record"].concat()).unwrap();
        let from = open_for_read(&from_path).unwrap();
        let to_path = dir.path().join("to");
        let to = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&to_path)
            .unwrap();
        copy_range(&from, &to, body.len() as u64).unwrap();
        assert_eq!(std::fs::read(&to_path).unwrap(), body, "the body, not what follows it");
    }
}
