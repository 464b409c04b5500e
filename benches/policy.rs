//! Policy evaluation per request: parsing Cache-Control, deciding storability, freshness
//! lifetime and age, and how a stored response may be used; plus building the cache key.

use std::hint::black_box;
use std::time::{Duration, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use sidecache::cache::key::CacheKey;
use sidecache::policy::{self, CacheControl, Freshness, Heuristic};
use sidecache::rules::{self, QueryKey, RawRule, Rule};

fn bench(c: &mut Criterion) {
    let mut resp = HeaderMap::new();
    resp.insert(
        "cache-control",
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    resp.insert("date", HeaderValue::from_static("Sun, 22 Nov 2026 12:00:00 GMT"));
    resp.insert(
        "last-modified",
        HeaderValue::from_static("Sat, 01 Jan 2022 00:00:00 GMT"),
    );
    resp.insert("etag", HeaderValue::from_static("\"3f2a9c81\""));
    resp.insert("content-type", HeaderValue::from_static("application/javascript"));
    let mut req = HeaderMap::new();
    req.insert("accept-encoding", HeaderValue::from_static("gzip, deflate, br"));
    req.insert("if-none-match", HeaderValue::from_static("\"3f2a9c81\""));
    let h = Heuristic {
        fraction: 0.1,
        max: Duration::from_secs(86_400),
    };
    let now = SystemTime::now();
    let mut g = c.benchmark_group("policy");
    g.bench_function("parse_cache_control", |b| {
        b.iter(|| CacheControl::parse(black_box(&resp)))
    });
    g.bench_function("storable", |b| {
        b.iter(|| policy::storable(&Method::GET, black_box(&req), StatusCode::OK, black_box(&resp)))
    });
    g.bench_function("freshness_and_usable", |b| {
        b.iter(|| {
            let f = Freshness {
                lifetime: policy::freshness_lifetime(StatusCode::OK, black_box(&resp), now, h),
                age: policy::current_age(black_box(&resp), now, now, now),
            };
            policy::usable(f, &CacheControl::parse(&req), &policy::response_directives(&resp).0)
        })
    });
    g.bench_function("conditional_304", |b| {
        b.iter(|| policy::answers_not_modified(black_box(&req), black_box(&resp)))
    });
    let request = Request::builder()
        .uri("/assets/application-3f2a9c81e5d7.js?v=20261122&utm_source=x")
        .header("host", "www.example.com")
        .body(())
        .unwrap();
    g.bench_function("cache_key", |b| {
        b.iter(|| CacheKey::from_request(black_box(&request), "https", &QueryKey::All))
    });
    // Rule matching on every request: a typical path, and the 60 KB paths that took the old
    // backtracking matcher tens of seconds (issue 15, finding 3).
    let rule_set: Vec<Rule> = ["*-*-*.js", "/assets/**/*-*.min.js", "/api/**", "*.{woff,woff2}"]
        .into_iter()
        .map(|p| {
            Rule::compile(RawRule {
                name: None,
                pattern: p.into(),
                bypass: true,
                ttl: None,
                force_ttl: None,
                strip_set_cookie: false,
            })
            .unwrap()
        })
        .collect();
    let dashes = format!("/x/{}.css", "-".repeat(60_000));
    let deep = format!("/assets/{}x.js", "a-/".repeat(20_000));
    g.bench_function("rules_typical_path", |b| {
        b.iter(|| rules::find(black_box(&rule_set), black_box("/assets/app-3f2a9c81e5d7.js")))
    });
    g.bench_function("rules_60k_dashes", |b| {
        b.iter(|| rules::find(black_box(&rule_set), black_box(&dashes)))
    });
    g.bench_function("rules_60k_segments", |b| {
        b.iter(|| rules::find(black_box(&rule_set), black_box(&deep)))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(2)).warm_up_time(Duration::from_millis(500));
    targets = bench
}
criterion_main!(benches);
