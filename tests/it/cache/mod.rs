//! The disk cache, split like its subject: fill, coalescing, budget, LRU, restart, crash, corruption, full disk, purge.
//!
//! - [`fill`]: fills and coalescing;
//! - [`budget`]: the budget, the LRU order and purge;
//! - [`tiers`]: the hot and open tiers, records beside the index;
//! - [`faults`]: faults and restarts.
//!
//! This file holds what they share: the cacheable head, and helpers to read responses and the
//! cache directory.

mod budget;
mod faults;
mod fill;
mod tiers;

use std::io::Read as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;

use crate::support::{
    Behaviour, Binary, Image, Origin, TestSidecar, Tmpfs, app_client as client, binary_path, eventually,
    matches_pattern, metric, object_images, origin::owned, pattern_bytes, pattern_chunk, scrape,
};

const CACHEABLE: &[(&str, &str)] = &[
    ("cache-control", "public, max-age=3600"),
    ("content-type", "application/javascript"),
];

fn cache_status(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// The objects' images (body, record, footer) under a cache directory, in files of their own
/// or slots of segments; not their compressed variants'.
fn object_files(cache: &Path) -> Vec<Image> {
    object_images(cache)
}

/// Destroys a stored image underneath the cache: a file of its own is removed; a segment is
/// cut short at the slot (its descriptor, held open, then reads nothing there).
fn destroy(image: &Image) {
    if image.in_segment() {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&image.path)
            .unwrap()
            .set_len(image.offset - 64)
            .unwrap();
    } else {
        std::fs::remove_file(&image.path).unwrap();
    }
}

/// Whether a request for `url` is a hit within a bounded wait: a client has the whole body
/// of a small object while its fill is still being committed (a request meanwhile waits on
/// the fill: `collapsed`).
async fn hit_soon(url: &str) -> bool {
    eventually(Duration::from_secs(10), async || get(url).await.1 == "sidecache; hit").await
}

/// The object image whose record holds `name`.
fn object_of(cache: &Path, name: &str) -> Image {
    object_files(cache)
        .into_iter()
        .find(|f| f.read().windows(name.len()).any(|w| w == name.as_bytes()))
        .expect("the object's image")
}

async fn get(url: &str) -> (reqwest::StatusCode, String, Bytes) {
    let resp = client().get(url).send().await.unwrap();
    let status = resp.status();
    let cs = cache_status(&resp);
    (status, cs, resp.bytes().await.unwrap())
}

async fn get_owned(url: String) -> (reqwest::StatusCode, String, Bytes) {
    get(&url).await
}

/// A sample's value in a Prometheus text page (0 when absent).
fn sample(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Descriptors this process holds on files under `dir`: (all, of files since removed).
fn descriptors_under(dir: &std::path::Path) -> (usize, usize) {
    let dir = dir.canonicalize().unwrap();
    let (mut all, mut removed) = (0, 0);
    for fd in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        if target.starts_with(&dir) {
            all += 1;
            if target.to_string_lossy().ends_with(" (deleted)") {
                removed += 1;
            }
        }
    }
    (all, removed)
}

/// Starts the binary on `dir` and waits until its index is loaded.
async fn start_binary(origin: &Origin, dir: &Path) -> (Binary, std::net::SocketAddr) {
    let mut bin = Binary::serve(&origin.url(), dir, &[], &[("SIDECACHE_ACCESS_LOG", "false")]);
    let addr = bin.public_addr();
    let admin = bin.admin_addr();
    crate::support::wait_ready(admin).await;
    (bin, addr)
}

/// The bytes object `i` of the kill test must have.
fn kill_test_body(i: u64) -> Bytes {
    pattern_chunk(i * 7919, 20_000 + (i as usize * 3_331) % 180_000)
}
