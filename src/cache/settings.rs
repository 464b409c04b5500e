//! What the cache runs on: the part of the configuration it reads, as one plain struct. The
//! configuration builds it (`Config::cache_settings`); the cache imports nothing from `config`.

use std::path::PathBuf;
use std::time::Duration;

use crate::cache::index::Order;
use crate::cache::segments::Geometry;
use crate::cache::tags::TagRules;
use crate::units::MinFree;

/// The cache's settings, each named and meant as the configuration key of the same name (but
/// for `segments`, derived from one).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Cache directory.
    pub cache_dir: PathBuf,
    /// Disk budget in bytes.
    pub max_size: u64,
    /// Room kept free on the filesystem (its share of inodes is kept free too).
    pub min_free: MinFree,
    /// Most objects stored.
    pub max_objects: u64,
    /// Largest stored object in bytes.
    pub max_object_size: u64,
    /// Hot tier bytes; 0 = off.
    pub memory_size: u64,
    /// Largest hot-tier object.
    pub memory_object_max: u64,
    /// Bodies held open; `None` sizes it from the descriptor limit when the cache opens.
    pub open_files: Option<usize>,
    /// Concurrent connections: each may hold a descriptor the open tier must leave free.
    pub max_connections: usize,
    /// Eviction high watermark (share of `max_size`).
    pub high_watermark: f64,
    /// Eviction low watermark (share of `max_size`).
    pub low_watermark: f64,
    /// A full cache admits new objects by how often they are asked for.
    pub admission: bool,
    /// The order objects are evicted in.
    pub eviction: Order,
    /// Eviction timer.
    pub evict_interval: Duration,
    /// Bound on waiting for another request's fill.
    pub coalesce_timeout: Duration,
    /// Memory the tag index may hold (bytes).
    pub max_tag_index_memory: u64,
    /// Which headers tag a response, and the bounds on its tags.
    pub tags: TagRules,
    /// Compressed variants.
    pub compress: crate::compress::Settings,
    /// Heuristic freshness fraction (a variant is made only for an object still fresh).
    pub heuristic_fraction: f64,
    /// Heuristic freshness cap.
    pub heuristic_max: Duration,
    /// Segment size and the most segment files: derived from the budget
    /// ([`Geometry::for_budget`]), not a configuration key.
    pub segments: Geometry,
}
