//! Filling the cache from a response while clients read it.
//!
//! A response with a `Content-Length` is filled by its own task ([`Fill`]): it writes the tmp
//! file (pre-allocated, so a full disk shows before the first byte is promised), hashes as it
//! writes, and publishes progress. Every reader, including the request that started it, sends
//! what has landed so far, so a slow or vanished client never holds the fill back, and the fill
//! finishes for the others when one leaves. Readers of a body of 64 KiB or more get slices of
//! the file's mapping, which go out with `sendfile`; smaller bodies are shared as the received
//! buffers, sent before they are written, and their file is only created when the whole body
//! is in: creation, write, hash and commit in one trip off the event loop.
//!
//! A response without a length is not shared: the proxy passes it straight to its one client
//! and sends a copy of each chunk to the cache ([`TeeMsg`]). The client is paced by the copy's
//! queue (a busy disk slows it, as in nginx and Varnish, rather than losing the copy); the
//! writer gives up the copy (never the client) if it grows too large, the budget refuses it,
//! or one write stalls for [`TEE_STALL`].
//!
//! The boundary is bytes: a fill reads its body from a [`Source`] of byte chunks and gives its
//! readers a [`Chunks`] stream; what HTTP body types they come from or go into is the proxy's
//! business.

use std::fs::File;
use std::future::Future;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::watch;

use crate::cache::meta::Meta;
use crate::error::BoxError;

/// Where a fill's body comes from: byte chunks, in order, in batches.
pub trait Source: Send + 'static {
    /// The chunks that are ready now, after waiting for at least one: up to about `limit`
    /// bytes. `None` at the end of the body.
    fn next_batch(&mut self, limit: usize) -> impl Future<Output = Option<Result<Vec<Bytes>, BoxError>>> + Send;
}

/// A fill's bytes for one reader, as they land.
pub type Chunks = Pin<Box<dyn Stream<Item = Result<Bytes, BoxError>> + Send>>;

/// How much a reader asks the file for at once.
const READ_CHUNK: u64 = 256 << 10;
/// Bodies up to this size that are not mapped are also kept in memory while their fill has
/// readers, so every reader sends the same buffers instead of reading the file again.
const SHARED_MAX: u64 = 16 << 20;
/// Bodies of this size and more are mapped for their readers, as cache hits of that size are.
use super::MIN_MMAP as MAPPED_MIN;
/// At most this much of a mapped fill goes into one frame.
const MAPPED_FRAME: u64 = 4 << 20;

/// Where a fill stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillState {
    /// Bytes are still arriving.
    Writing,
    /// All bytes written and the length checked.
    Complete,
    /// The upstream body broke or the disk failed: readers get an error.
    Failed,
}

/// Published progress of a fill.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Bytes readers may send: in the file (readable by `pread`), or, for a body shared in
    /// memory, received.
    pub written: u64,
    /// Where it stands.
    pub state: FillState,
}

/// A fill in progress, shared by its task and its readers.
pub struct Fill {
    /// The response head being stored (digest not known yet).
    pub meta: Arc<Meta>,
    /// The file being written; `None` for a body kept in memory until its commit.
    file: Option<Arc<File>>,
    progress: watch::Sender<Progress>,
    /// The chunks received so far, for bodies under [`MAPPED_MIN`] (or when mapping failed).
    shared: Option<std::sync::Mutex<Vec<Bytes>>>,
    /// The file mapped, for bodies of [`MAPPED_MIN`] and more: readers are handed slices of
    /// what is written, which the connection sends from the file (`sendfile`), so a herd of
    /// clients costs no copy through user space at all.
    mapped: Option<Bytes>,
}

impl Fill {
    /// Whether a body of `len` bytes is kept in memory until its commit, its file created
    /// only then (its readers are sent the received buffers in any case).
    pub fn deferred(len: u64) -> bool {
        len < MAPPED_MIN
    }

    /// A fill for a response described by `meta` (`body_len` is the length), writing `file`,
    /// or with no file yet when [`Fill::deferred`].
    pub fn new(meta: Arc<Meta>, file: Option<Arc<File>>) -> Arc<Fill> {
        let (progress, _) = watch::channel(Progress {
            written: 0,
            state: FillState::Writing,
        });
        let len = meta.body_len;
        let mapped = match &file {
            Some(file) if len >= MAPPED_MIN => crate::zerocopy::map_fill(file.clone(), len).ok(),
            _ => None,
        };
        let shared = (mapped.is_none() && len <= SHARED_MAX).then(|| std::sync::Mutex::new(Vec::new()));
        Arc::new(Fill {
            meta,
            file,
            mapped,
            progress,
            shared,
        })
    }

    /// Whether readers are sent the fill's buffers (true) or read the file.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// Publishes that readers may send `written` bytes: in the file, or, for a shared body,
    /// received (`chunks` are the new ones).
    pub fn advance(&self, written: u64, chunks: &[Bytes]) {
        if let Some(shared) = &self.shared {
            shared
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(chunks);
        }
        self.progress.send_modify(|p| p.written = written);
    }

    /// The next shared chunk at `index`, if the body is shared in memory and it is written.
    fn shared_chunk(&self, index: usize) -> Option<Bytes> {
        let shared = self.shared.as_ref()?.lock().unwrap_or_else(|p| p.into_inner());
        shared.get(index).cloned()
    }

    /// Publishes the final state.
    pub fn finish(&self, state: FillState) {
        self.progress.send_modify(|p| p.state = state);
    }

    /// Waits until the fill is over: complete (committed) or failed.
    pub async fn finished(&self) -> FillState {
        let mut rx = self.progress.subscribe();
        match rx.wait_for(|p| p.state != FillState::Writing).await {
            Ok(p) => p.state,
            // (The sender lives in `self`: it cannot be gone while this borrows it.)
            Err(_) => FillState::Failed,
        }
    }

    /// Current progress.
    pub fn progress(&self) -> Progress {
        *self.progress.borrow()
    }

    /// This fill's bytes (`meta.body_len` of them), streamed as they land.
    pub fn reader(self: &Arc<Self>) -> Chunks {
        let len = self.meta.body_len;
        let stream = futures_util::stream::unfold(
            Some((self.clone(), self.progress.subscribe(), 0u64, 0usize)),
            move |state| async move {
                let (fill, mut rx, offset, index) = state?;
                loop {
                    let p = *rx.borrow_and_update();
                    if offset < p.written {
                        if let Some(mapped) = &fill.mapped {
                            let end = p.written.min(offset + MAPPED_FRAME);
                            let frame = mapped.slice(offset as usize..end as usize);
                            return Some((Ok(frame), Some((fill, rx, end, index))));
                        }
                        if let Some(chunk) = fill.shared_chunk(index) {
                            let next = offset + chunk.len() as u64;
                            return Some((Ok(chunk), Some((fill, rx, next, index + 1))));
                        }
                        let n = (p.written - offset).min(READ_CHUNK) as usize;
                        let Some(file) = fill.file.clone() else {
                            return Some((Err(BoxError::from("cache fill has no file")), None));
                        };
                        return match read_at(file, n, offset).await {
                            Ok(buf) => Some((Ok(buf), Some((fill, rx, offset + n as u64, index)))),
                            Err(e) => Some((Err(BoxError::from(e)), None)),
                        };
                    }
                    match p.state {
                        // Every byte of the body is out: the disk copy's fate is not the reader's.
                        _ if offset >= len => return None,
                        FillState::Failed => return Some((Err(BoxError::from("cache fill failed upstream")), None)),
                        _ => {
                            if rx.changed().await.is_err() {
                                return Some((Err(BoxError::from("cache fill abandoned")), None));
                            }
                        }
                    }
                }
            },
        );
        Box::pin(stream)
    }
}

/// Reads `n` bytes at `offset`: on the runtime when the page cache has them (just written, so
/// nearly always), else on the blocking pool.
pub async fn read_at(file: Arc<File>, n: usize, offset: u64) -> std::io::Result<Bytes> {
    use crate::cache::fileio;
    if let Some(buf) = fileio::read_cached_at(&file, n, offset)? {
        return Ok(Bytes::from(buf));
    }
    tokio::task::spawn_blocking(move || {
        let buf = fileio::read_at(&file, n, offset)?;
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(std::io::Error::other)?
}

/// How long one write of a copy (a body without a length) may take before the copy is given
/// up and its client let go on alone: a disk that stalls this long is failing, not busy.
pub const TEE_STALL: std::time::Duration = std::time::Duration::from_secs(5);

/// One message from a tee to its writer.
pub enum TeeMsg {
    /// More body.
    Data(Bytes),
    /// The last of the body: it ended cleanly with these bytes.
    Last(Bytes),
    /// The body ended cleanly.
    End,
}

/// Writes a body to a file at increasing offsets, hashing it as it goes; the blocking write
/// and hash run off the runtime.
pub struct HashingWriter {
    file: Arc<File>,
    hasher: Option<blake3::Hasher>,
    written: u64,
}

impl HashingWriter {
    /// A writer starting at offset 0 of `file`.
    pub fn new(file: Arc<File>) -> HashingWriter {
        HashingWriter {
            file,
            hasher: Some(blake3::Hasher::new()),
            written: 0,
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends `chunks` in one trip to the blocking pool; returns the new total.
    pub async fn write(&mut self, chunks: Vec<Bytes>) -> std::io::Result<u64> {
        let file = self.file.clone();
        let mut hasher = self
            .hasher
            .take()
            .ok_or_else(|| std::io::Error::other("an earlier write failed"))?;
        let at = self.written;
        let (hasher, n) = tokio::task::spawn_blocking(move || {
            let mut n = 0u64;
            for chunk in &chunks {
                hasher.update(chunk);
                file.write_all_at(chunk, at + n)?;
                n += chunk.len() as u64;
            }
            Ok::<_, std::io::Error>((hasher, n))
        })
        .await
        .map_err(std::io::Error::other)??;
        self.hasher = Some(hasher);
        self.written += n;
        Ok(self.written)
    }

    /// The hasher and the length written, to go on from; `None` after a failed write.
    pub fn into_parts(self) -> Option<(blake3::Hasher, u64)> {
        Some((self.hasher?, self.written))
    }
}
