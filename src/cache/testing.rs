//! Helpers for the cache's unit tests that need a real directory: a `Cache` opened on a temp
//! dir, a response's record, and objects written the way a fill writes them.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use crate::cache::key::{CacheKey, Digest};
use crate::cache::meta::Meta;
use crate::cache::store::{self, Store};
use crate::cache::{Cache, Settings};
use crate::config::{Config, Loader};

/// The settings of the default configuration. The only import of `config` under `cache/`:
/// the tests take the defaults from where they are defined.
pub fn defaults() -> Settings {
    Config::defaults().cache_settings()
}

/// The default settings with the cache under `dir` (no free space kept: the tests' disk is
/// shared). Built by the configuration, so the defaults are the configuration's.
pub fn settings(dir: &std::path::Path) -> Settings {
    let flags = vec![("cache_dir", dir.display().to_string()), ("min_free", "0".to_owned())];
    Loader::new(std::iter::empty())
        .flags(flags)
        .load()
        .expect("config")
        .cache_settings()
}

/// Opens a cache on `dir` and waits (bounded) for its startup rebuild.
pub async fn open(dir: &std::path::Path) -> Arc<Cache> {
    open_with(settings(dir)).await
}

/// Opens a cache with `settings` and waits (bounded) for its startup rebuild. A test that
/// reopens a directory in-process may find it still locked for a moment by the cache it just
/// dropped (a task of that one finishing): the directory is tried again meanwhile, as the
/// eviction loop does when serving ([`Cache::retry_open`]).
pub async fn open_with(settings: Settings) -> Arc<Cache> {
    let cache = Cache::open(settings);
    let started = Instant::now();
    while !cache.is_loaded() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "rebuild took over 10 s (the directory {})",
            if cache.store().is_some() {
                "opened"
            } else {
                "never opened"
            }
        );
        cache.retry_open();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    cache
}

/// Waits (bounded, yielding) until `done` holds; false if it never does.
pub async fn eventually(mut done: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while !done() {
        if started.elapsed() > Duration::from_secs(10) {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}

/// An index entry for object `i` of `len` bytes (as charged in a unit of 1: no tail).
pub fn entry(i: u32, len: u64) -> crate::cache::index::Entry {
    crate::cache::index::Entry {
        key: format!("http://h/{i}").into(),
        image: crate::cache::index::Image {
            generation: u64::from(i),
            body_len: len,
            tail_len: 0,
            place: crate::cache::segments::Place::File,
            digest: Digest::from(blake3::hash(&i.to_be_bytes())),
            verified: true,
            mtime: 0,
        },
        variants: Box::default(),
        tags: Box::default(),
        hits: 0,
        marked: false,
    }
}

/// The record of a 200 response for `url` with `body`.
pub fn meta(url: &str, body: &[u8]) -> Meta {
    let mut headers = http::HeaderMap::new();
    headers.insert("cache-control", http::HeaderValue::from_static("public, max-age=600"));
    Meta {
        key: CacheKey::from_stored(url.to_owned()),
        status: 200,
        headers,
        request_time: SystemTime::now(),
        response_time: SystemTime::now(),
        body_len: body.len() as u64,
        digest: Digest::from(blake3::hash(body)),
        vary: vec![],
        prepared: Default::default(),
    }
}

/// Writes an object as a commit does (`body | record | footer`), as version `generation`;
/// `torn` cuts that many bytes off its end. Returns the bytes written.
pub fn write_object(store: &Store, meta: &Meta, body: &[u8], generation: u64, torn: usize) -> Bytes {
    let tmp = store.create_tmp_object(generation).expect("tmp");
    let mut file = body.to_vec();
    file.extend_from_slice(&store::tail(meta));
    file.truncate(file.len() - torn);
    std::io::Write::write_all(&mut &*tmp.file, &file).expect("write");
    store
        .place_object(tmp, &meta.storage_hash(), generation)
        .expect("place");
    Bytes::from(file)
}
