//! What the benchmarks share: index entries made up by number.

use sidecache::cache::index::Entry;
use sidecache::cache::key::{Digest, KeyHash};

/// The hash of key `i`.
pub fn key(i: u64) -> KeyHash {
    KeyHash::of(&i.to_le_bytes())
}

/// An index entry for object `i`: a 20,000-byte script, its digest made from `i`.
pub fn entry(i: u64) -> Entry {
    let mut d = [0u8; 32];
    d[..8].copy_from_slice(&i.to_le_bytes());
    Entry {
        key: format!("http://app.example/assets/{i}.js").into(),
        image: sidecache::cache::index::Image {
            generation: i,
            body_len: 20_000,
            tail_len: 300,
            place: sidecache::cache::index::Place::File,
            digest: Digest(d),
            verified: true,
            mtime: 0,
        },
        variants: Box::default(),
        tags: Box::default(),
        hits: 0,
        marked: false,
    }
}
