//! Index and eviction cost per operation at 10k, 100k and 1M objects: lookup (a hit:
//! `Index::hit`, which marks the entry used), insert-with-replace, and eviction selection (`pop_lru`). Flat from 10k to 1M is the
//! target: every operation is O(1).

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
mod common;

use common::{entry, key};
use sidecache::cache::index::Index;
use sidecache::cache::key::KeyHash;

fn filled(n: u64) -> Index {
    let mut ix = Index::new();
    for i in 0..n {
        ix.insert(key(i), entry(i), 0);
    }
    ix
}

fn bench(c: &mut Criterion) {
    for n in [10_000u64, 100_000, 1_000_000] {
        let mut ix = filled(n);
        let keys: Vec<(KeyHash, String)> = (0..4096)
            .map(|i| {
                let i = i * 7919 % n;
                (key(i), entry(i).key.to_string())
            })
            .collect();
        let mut g = c.benchmark_group("index");
        // Baseline: a bare std HashMap lookup at the same size and access pattern. What the
        // index costs above it is the structure; what both grow by is the memory hierarchy.
        let map: std::collections::HashMap<KeyHash, u64> = (0..n).map(|i| (key(i), i)).collect();
        g.bench_with_input(BenchmarkId::new("baseline_hashmap_get", n), &n, |b, _| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % keys.len();
                black_box(map.get(&keys[i].0))
            })
        });
        drop(map);
        g.bench_with_input(BenchmarkId::new("lookup_touch", n), &n, |b, _| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % keys.len();
                let (hash, full) = &keys[i];
                black_box(ix.hit(hash, full, |_| None).map(|(found, _)| found.body_len))
            })
        });
        g.bench_with_input(BenchmarkId::new("insert_replace", n), &n, |b, _| {
            let mut i = 0u64;
            b.iter(|| {
                i = (i + 1) % n;
                let e = entry(i + n);
                black_box(ix.insert(key(i), e, 0))
            })
        });
        // Eviction selection in steady state: evict the least recently used, admit a new one.
        g.bench_with_input(BenchmarkId::new("evict_pop_lru_and_admit", n), &n, |b, _| {
            let mut i = 2 * n;
            b.iter(|| {
                i += 1;
                let victim = ix.pop_lru();
                let e = entry(i);
                ix.insert(key(i), e, 0);
                black_box(victim)
            })
        });
        g.finish();
        drop(ix);
    }
    let mut g = c.benchmark_group("key");
    let k = "http://app.example/assets/application-3f2a9c81e5d7.js?v=20261122";
    g.bench_function("hash", |b| b.iter(|| KeyHash::of(black_box(k.as_bytes()))));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(2)).warm_up_time(std::time::Duration::from_millis(500));
    targets = bench
}
criterion_main!(benches);
