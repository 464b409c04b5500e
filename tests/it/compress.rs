//! Compressed variants through real sockets: made once after a fill, negotiated by
//! `Accept-Encoding`, decoded by a real decoder (curl, built with brotli, zstd and zlib) back to
//! the app's bytes; HEAD, 304 and Range per encoding; an app's own compressed answers; purge,
//! eviction, restart and a corrupted variant; priming; and a client that tries to make the
//! cache hand its coding to another.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use crate::prime::prime;
use crate::support::Image;
use crate::support::{Binary, Origin, TestSidecar, app_client, client, eventually};

/// A long-lived script, as a build emits it.
const SCRIPT: &[(&str, &str)] = &[
    ("cache-control", "public, max-age=31536000, immutable"),
    ("content-type", "application/javascript; charset=utf-8"),
    ("etag", "\"v1\""),
];

/// About `n` KiB of JavaScript-like text (compressible, not trivially).
fn script(n: usize) -> Vec<u8> {
    let mut out = String::new();
    let mut i = 0u64;
    while out.len() < n * 1024 {
        let x = i.wrapping_mul(2_654_435_761) % 9973;
        out.push_str(&format!(
            "export function handler{i}(event, ctx) {{ return ctx.dispatch('evt-{x}', event.detail * {x}); }}\n"
        ));
        i += 1;
    }
    out.into_bytes()
}

/// What curl saw: status, lower-case headers, and the body (decoded with `--compressed`).
struct Curl {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Curl {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// Runs curl (a real child process and decoder) against `url`.
async fn curl(url: &str, args: &[&str]) -> Curl {
    let dir = tempfile::tempdir().unwrap();
    let (head, body) = (dir.path().join("head"), dir.path().join("body"));
    let curl_bin = crate::prometheus::tool("curl", "curl");
    let out = tokio::process::Command::new(curl_bin)
        .args(["-sS", "--max-time", "30", "-H", "Host: app.example", "-D"])
        .arg(&head)
        .arg("-o")
        .arg(&body)
        .args(args)
        .arg(url)
        .output()
        .await
        .expect("curl runs (Debian's curl has brotli and zstd)");
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    let head = std::fs::read_to_string(head).unwrap();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Curl {
        status,
        headers,
        body: std::fs::read(body).unwrap_or_default(),
    }
}

/// The `Content-Encoding` a request with this `Accept-Encoding` gets (`identity` for none).
async fn served_coding(url: &str, ae: Option<&str>) -> String {
    let mut req = app_client().get(url);
    if let Some(ae) = ae {
        req = req.header("accept-encoding", ae);
    }
    let resp = req.send().await.unwrap();
    let coding = resp
        .headers()
        .get("content-encoding")
        .map_or("identity".to_owned(), |v| v.to_str().unwrap().to_owned());
    resp.bytes().await.unwrap();
    coding
}

/// Waits (bounded) until a request accepting `coding` is answered in it: its variant is made.
async fn variant_ready(url: &str, coding: &str) -> bool {
    eventually(Duration::from_secs(30), async || {
        served_coding(url, Some(coding)).await == coding
    })
    .await
}

/// Waits (bounded) until `n` objects are indexed.
async fn stored(sc: &TestSidecar, n: usize) {
    let cache = sc.sidecar.proxy.cache().clone();
    assert!(
        eventually(Duration::from_secs(10), async || cache.stats().0 == n).await,
        "expected {n} stored objects, have {:?}",
        cache.stats()
    );
}

/// Object and variant images under a cache directory (files, and slots of segments).
fn files(cache: &Path) -> Vec<Image> {
    crate::support::images(cache)
}

fn variant_files(cache: &Path) -> Vec<Image> {
    crate::support::variant_images(cache)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_encoding_decodes_to_the_apps_bytes_with_its_own_head() {
    let origin = Origin::start().await;
    let body = script(96);
    origin.fixed("/app.js", SCRIPT, body.clone());
    let sc = TestSidecar::start(&origin.url()).await;
    let url = sc.url("/app.js");
    // The first answer is the identity body (nothing waits for compression), and says it varies.
    let first = curl(&url, &["-H", "Accept-Encoding: br"]).await;
    assert_eq!(first.body, body);
    assert_eq!(first.header("content-encoding"), None);
    assert_eq!(first.header("vary"), Some("Accept-Encoding"));
    for coding in ["br", "zstd", "gzip"] {
        assert!(variant_ready(&url, coding).await, "{coding} variant never made");
    }
    let mut tags = vec!["\"v1\"".to_owned()];
    let mut lengths = Vec::new();
    for coding in ["br", "zstd", "gzip"] {
        let ae = format!("Accept-Encoding: {coding}");
        // Decoded by curl's own decoder: every byte is the app's.
        let got = curl(&url, &["--compressed", "-H", &ae]).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.header("content-encoding"), Some(coding));
        assert_eq!(got.header("cache-status"), Some("sidecache; hit"));
        assert_eq!(got.header("vary"), Some("Accept-Encoding"));
        assert!(got.body == body, "{coding}: decoded bytes differ from the app's");
        // The bytes on the wire: coded, smaller, and exactly Content-Length of them.
        let raw = curl(&url, &["-H", &ae]).await;
        let len: usize = raw.header("content-length").unwrap().parse().unwrap();
        lengths.push((coding.to_owned(), len as u64));
        assert_eq!(raw.body.len(), len, "{coding}");
        assert!(len < body.len() / 3, "{coding}: {len} of {}", body.len());
        assert_ne!(raw.body, body);
        // A validator of its own: never the identity's, never another coding's.
        let tag = raw.header("etag").unwrap().to_owned();
        assert_eq!(tag, format!("\"v1-{coding}\""));
        assert!(!tags.contains(&tag));
        tags.push(tag);
        assert_eq!(raw.header("accept-ranges"), None, "coded bytes are not ranged");
    }
    // Without Accept-Encoding: the identity body, its own validator, still varying.
    let plain = curl(&url, &[]).await;
    assert_eq!((plain.body == body, plain.header("etag")), (true, Some("\"v1\"")));
    assert_eq!(plain.header("content-encoding"), None);
    assert_eq!(plain.header("vary"), Some("Accept-Encoding"));
    assert_eq!(origin.hits("/app.js"), 1, "the app was asked once");
    // Three variants, each its own file beside the object's, and inspect lists them.
    assert_eq!(variant_files(&sc.dir.path().join("cache")).len(), 3);
    let report = client()
        .get(sc.admin_url("/objects?url=/app.js"))
        .header("x-sidecache-admin", "1")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    let mut listed: Vec<(String, u64)> = report["objects"][0]["encodings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["encoding"].as_str().unwrap().to_owned(),
                e["body_bytes"].as_u64().unwrap(),
            )
        })
        .collect();
    listed.sort();
    lengths.sort();
    assert_eq!(
        listed, lengths,
        "inspect lists each variant with the length it is sent with"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q_values_and_refusals_pick_the_variant_the_client_prefers() {
    let origin = Origin::start().await;
    origin.fixed("/q.js", SCRIPT, script(64));
    let sc = TestSidecar::start(&origin.url()).await;
    let url = sc.url("/q.js");
    served_coding(&url, None).await;
    for coding in ["br", "zstd", "gzip"] {
        assert!(variant_ready(&url, coding).await);
    }
    for (ae, want) in [
        // Browsers: the smallest they name (brotli).
        ("gzip, deflate, br, zstd", "br"),
        ("gzip, deflate, br", "br"),
        ("gzip, deflate", "gzip"),
        // Weights over size; q=0 refuses.
        ("br;q=0.5, gzip;q=1.0", "gzip"),
        ("br;q=0, zstd", "zstd"),
        ("br;q=0, zstd;q=0, gzip;q=0", "identity"),
        ("*", "br"),
        ("*;q=0", "identity"),
        ("*, br;q=0, gzip;q=0", "zstd"),
        ("identity", "identity"),
        ("identity;q=1, br;q=0.5", "identity"),
        ("deflate, compress, sdch", "identity"),
        ("", "identity"),
    ] {
        assert_eq!(served_coding(&url, Some(ae)).await, want, "Accept-Encoding: {ae:?}");
    }
    assert_eq!(served_coding(&url, None).await, "identity");
    assert_eq!(origin.hits("/q.js"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_conditionals_and_ranges_agree_with_get_per_encoding() {
    let origin = Origin::start().await;
    let body = script(64);
    origin.fixed("/h.js", SCRIPT, body.clone());
    let sc = TestSidecar::start(&origin.url()).await;
    let url = sc.url("/h.js");
    served_coding(&url, None).await;
    assert!(variant_ready(&url, "gzip").await && variant_ready(&url, "br").await);
    for coding in ["identity", "br", "zstd", "gzip"] {
        let ae = format!("Accept-Encoding: {coding}");
        let get = curl(&url, &["-H", &ae]).await;
        let head = curl(&url, &["-I", "-H", &ae]).await;
        // HEAD: GET's head, no body.
        for name in ["content-encoding", "content-length", "etag", "vary"] {
            assert_eq!(head.header(name), get.header(name), "{coding} {name}");
        }
        let head = app_client()
            .head(&url)
            .header("accept-encoding", coding)
            .send()
            .await
            .unwrap();
        assert!(head.bytes().await.unwrap().is_empty());
        // A 304 against the variant's own validator, with that validator.
        let tag = get.header("etag").unwrap().to_owned();
        let inm = format!("If-None-Match: {tag}");
        let not_modified = curl(&url, &["-H", &ae, "-H", &inm]).await;
        assert_eq!(not_modified.status, 304, "{coding}");
        assert_eq!(not_modified.header("etag"), Some(tag.as_str()));
        assert_eq!(not_modified.header("vary"), Some("Accept-Encoding"));
        assert!(not_modified.body.is_empty());
        let head_304 = curl(&url, &["-I", "-H", &ae, "-H", &inm]).await;
        assert_eq!(head_304.status, 304);
        // Another coding's validator (or the identity's) does not match this coding's bytes.
        if coding != "identity" {
            let other = curl(&url, &["-H", &ae, "-H", "If-None-Match: \"v1\""]).await;
            assert_eq!(other.status, 200, "{coding}: the identity tag matched coded bytes");
        }
        // A range is of the identity body, whatever the client accepts.
        let ranged = curl(&url, &["-H", &ae, "-H", "Range: bytes=100-199"]).await;
        assert_eq!(ranged.status, 206, "{coding}");
        assert_eq!(ranged.header("content-encoding"), None);
        assert_eq!(ranged.body, body[100..200].to_vec());
        assert_eq!(ranged.header("etag"), Some("\"v1\""));
    }
    assert_eq!(origin.hits("/h.js"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_not_worth_compressing_or_may_not_be_changed_is_served_as_the_app_sent_it() {
    let origin = Origin::start().await;
    let text = script(64);
    origin.fixed(
        "/logo.png",
        &[("cache-control", "max-age=3600"), ("content-type", "image/png")],
        text.clone(),
    );
    origin.fixed(
        "/nt.js",
        &[
            ("cache-control", "max-age=3600, no-transform"),
            ("content-type", "text/javascript"),
        ],
        text.clone(),
    );
    origin.fixed(
        "/tiny.css",
        &[("cache-control", "max-age=3600"), ("content-type", "text/css")],
        "a{b:c}",
    );
    // Compressible type, incompressible bytes.
    let mut noise = vec![0u8; 65_536];
    blake3::Hasher::new().update(b"noise").finalize_xof().fill(&mut noise);
    origin.fixed(
        "/noise.js",
        &[("cache-control", "max-age=3600"), ("content-type", "text/javascript")],
        noise,
    );
    // A control that does get variants, made after every other fill: once it has them, the
    // queue has passed the others.
    origin.fixed("/control.js", SCRIPT, text.clone());
    let sc = TestSidecar::start(&origin.url()).await;
    for path in ["/logo.png", "/nt.js", "/tiny.css", "/noise.js", "/control.js"] {
        served_coding(&sc.url(path), None).await;
    }
    assert!(variant_ready(&sc.url("/control.js"), "gzip").await, "made last");
    for path in ["/logo.png", "/nt.js", "/tiny.css", "/noise.js"] {
        let got = curl(&sc.url(path), &["-H", "Accept-Encoding: gzip, deflate, br, zstd"]).await;
        assert_eq!(got.header("cache-status"), Some("sidecache; hit"), "{path}");
        assert_eq!(got.header("content-encoding"), None, "{path}");
        // A compressible type varies (it may get variants); the others never do.
        let varies = (path == "/noise.js").then_some("Accept-Encoding");
        assert_eq!(got.header("vary"), varies, "{path}");
    }
    assert_eq!(
        variant_files(&sc.dir.path().join("cache")).len(),
        3,
        "only control.js's"
    );
}

/// An app that compresses itself (`Content-Encoding` with `Vary: Accept-Encoding`): its bytes
/// pass through untouched, the spellings real browsers send share one stored copy, and a
/// coded answer is never handed to a client that did not accept its coding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apps_own_compressed_answers_pass_through_once_per_meaning() {
    let origin = Origin::start().await;
    let identity = script(32);
    let gzipped = {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        enc.write_all(&identity).unwrap();
        enc.finish().unwrap()
    };
    origin.fixed(
        "/self.js",
        &[
            ("cache-control", "public, max-age=3600"),
            ("content-type", "application/javascript"),
            ("content-encoding", "gzip"),
            ("vary", "Accept-Encoding"),
        ],
        gzipped.clone(),
    );
    let sc = TestSidecar::start(&origin.url()).await;
    let url = sc.url("/self.js");
    // Real browsers' values (Chrome, Firefox, Safari, curl --compressed) that accept br,
    // deflate, gzip and zstd: one key.
    let spellings = [
        "gzip, deflate, br, zstd",
        "gzip, deflate, br, zstd, dcb, dcz",
        "zstd, br, deflate, gzip",
        "gzip,deflate,br,zstd",
        "deflate, gzip, br, zstd;q=1.0",
    ];
    for (i, ae) in spellings.iter().enumerate() {
        let resp = app_client()
            .get(&url)
            .header("accept-encoding", *ae)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["content-encoding"], "gzip");
        let cs = resp.headers()["cache-status"].to_str().unwrap().to_owned();
        // Byte for byte what the app sent: never compressed again.
        assert_eq!(resp.bytes().await.unwrap().to_vec(), gzipped, "{ae}");
        if i == 0 {
            assert!(cs.contains("stored"), "{cs}");
            stored(&sc, 1).await;
        } else {
            assert_eq!(cs, "sidecache; hit", "{ae}");
        }
    }
    assert_eq!(origin.hits("/self.js"), 1, "one stored copy for every spelling");
    // Decoded by a real decoder: the app's identity bytes.
    let got = curl(&url, &["--compressed"]).await;
    assert_eq!(got.body, identity);
    // Victim: accepts no coding. The stored gzip body is not theirs: they go to the app.
    let victim = app_client()
        .get(&url)
        .header("accept-encoding", "identity")
        .send()
        .await
        .unwrap();
    assert_ne!(victim.headers()["cache-status"], "sidecache; hit");
    assert_eq!(origin.hits("/self.js"), 2, "the app answered the victim");
}

/// Attacker/victim: an app that answers a coding outside the ones the key tells apart. The
/// attacker's request stores it under the same reduced key as a client that accepts nothing;
/// that client must never be handed the attacker's coding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coding_outside_the_key_never_reaches_a_client_that_refused_it() {
    let origin = Origin::start().await;
    origin.fixed(
        "/exotic.js",
        &[
            ("cache-control", "public, max-age=3600"),
            ("content-type", "application/javascript"),
            ("content-encoding", "x-exotic"),
            ("vary", "Accept-Encoding"),
        ],
        "EXOTIC-CODED-BYTES",
    );
    let sc = TestSidecar::start(&origin.url()).await;
    let url = sc.url("/exotic.js");
    let attack = app_client()
        .get(&url)
        .header("accept-encoding", "x-exotic")
        .send()
        .await
        .unwrap();
    assert!(attack.headers()["cache-status"].to_str().unwrap().contains("stored"));
    attack.bytes().await.unwrap();
    stored(&sc, 1).await;
    for victim_ae in [None, Some("identity"), Some("deflate")] {
        let mut req = app_client().get(&url);
        if let Some(ae) = victim_ae {
            req = req.header("accept-encoding", ae);
        }
        let resp = req.send().await.unwrap();
        assert_ne!(
            resp.headers()["cache-status"],
            "sidecache; hit",
            "{victim_ae:?} was handed the attacker's coding from the cache"
        );
    }
    // The attacker's own kind of request still hits.
    let again = app_client()
        .get(&url)
        .header("accept-encoding", "x-exotic")
        .send()
        .await
        .unwrap();
    assert_eq!(again.headers()["cache-status"], "sidecache; hit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_and_eviction_remove_an_objects_variants_with_it() {
    let origin = Origin::start().await;
    for name in ["a", "b", "c"] {
        origin.fixed(&format!("/{name}.js"), SCRIPT, script(200));
    }
    let sc = TestSidecar::start_with(&origin.url(), |c| c.memory_size = 0).await;
    let cache_dir = sc.dir.path().join("cache");
    for name in ["a", "b", "c"] {
        let url = sc.url(&format!("/{name}.js"));
        served_coding(&url, None).await;
        assert!(variant_ready(&url, "gzip").await && variant_ready(&url, "br").await);
    }
    let all_made = eventually(Duration::from_secs(30), async || variant_files(&cache_dir).len() == 9).await;
    assert!(all_made, "{:?}", variant_files(&cache_dir));
    let used_before = sc.sidecar.proxy.cache().stats().1;
    // Purge one URL: its object and its three variants go, bytes and files.
    let resp = client().post(sc.admin_url("/purge?url=/a.js")).send().await.unwrap();
    assert_eq!(resp.text().await.unwrap().trim(), r#"{"purged":1}"#);
    // (A slot let go is punched by the segments' writer just after the purge answers.)
    let settled = eventually(Duration::from_secs(10), async || {
        (variant_files(&cache_dir).len(), files(&cache_dir).len()) == (6, 8)
    })
    .await;
    assert!(settled, "{:?}", files(&cache_dir));
    assert!(sc.sidecar.proxy.cache().stats().1 < used_before);
    assert_ne!(served_coding(&sc.url("/a.js"), Some("br")).await, "br");
    // (Refilled: its client has the whole body a little before the fill is committed.)
    stored(&sc, 3).await;
    // Eviction: a pass down to nothing takes the variants too.
    let cache = sc.sidecar.proxy.cache().clone();
    let evicted = cache.purge(&sidecache::cache::Purge::All).await;
    assert!(evicted >= 2);
    // A variant of the refilled object may be on its way meanwhile (the compressor reserves
    // its room, writes it, finds its object gone, removes it and gives the room back): wait
    // for the whole of it to settle, not for the first moment the directory looks empty.
    let emptied = eventually(Duration::from_secs(10), async || {
        let (objects, _, reserved) = cache.stats();
        files(&cache_dir).is_empty() && (objects, reserved) == (0, 0)
    })
    .await;
    assert!(emptied, "left: {:?}, {:?}", files(&cache_dir), cache.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lru_loop_evicts_variants_with_their_object_and_keeps_the_budget() {
    let origin = Origin::start().await;
    // Short-lived: the fast levels.
    let short = [
        ("cache-control", "public, max-age=600"),
        ("content-type", "application/javascript"),
    ];
    for i in 0..12 {
        origin.fixed(&format!("/e/{i}.js"), &short, script(300));
    }
    // The layout takes about 1 MiB (its 256 directories); about eight objects and their
    // variants fit in the rest.
    let sc = TestSidecar::start_with(&origin.url(), |c| {
        c.max_size = 4 << 20;
        c.max_object_size = 1 << 20;
        c.memory_size = 0;
        c.evict_interval = Duration::from_millis(50);
    })
    .await;
    let cache_dir = sc.dir.path().join("cache");
    for i in 0..12 {
        let url = sc.url(&format!("/e/{i}.js"));
        served_coding(&url, None).await;
        assert!(
            variant_ready(&url, "gzip").await,
            "{i}: {:?} of {}",
            sc.sidecar.proxy.cache().stats(),
            sc.sidecar.proxy.cache().budget()
        );
    }
    let cache = sc.sidecar.proxy.cache().clone();
    let budget = cache.budget();
    let settled = eventually(Duration::from_secs(20), async || {
        let (_, used, reserved) = cache.stats();
        used + reserved <= budget
    })
    .await;
    assert!(settled, "{:?} over {budget}", cache.stats());
    // No variant outlives its object: every variant file's key has an object file.
    let objects: Vec<String> = crate::support::object_images(&cache_dir)
        .into_iter()
        .map(|i| i.key)
        .collect();
    assert!(objects.len() < 12, "something was evicted");
    for v in variant_files(&cache_dir) {
        assert!(objects.contains(&v.key), "orphan variant {v:?}");
    }
    let (du_bytes, _) = crate::support::disk_usage(&cache_dir);
    assert!(du_bytes <= budget, "{du_bytes} on disk over a budget of {budget}");
}

/// The real binary: variants survive a restart (served without being made again), and one
/// corrupted while the sidecar was down is detected and never served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_variants_and_a_corrupted_one_is_never_served() {
    let origin = Origin::start().await;
    let body = script(128);
    origin.fixed("/r.js", SCRIPT, body.clone());
    origin.fixed("/s.js", SCRIPT, body.clone());
    let dir = tempfile::tempdir().unwrap();
    let env = [("SIDECACHE_ACCESS_LOG", "false")];
    let mut bin = Binary::serve(&origin.url(), dir.path(), &[], &env);
    let (addr, admin) = (bin.public_addr(), bin.admin_addr());
    crate::support::wait_ready(admin).await;
    for path in ["/r.js", "/s.js"] {
        let url = format!("http://{addr}{path}");
        served_coding(&url, None).await;
        for coding in ["br", "zstd", "gzip"] {
            assert!(variant_ready(&url, coding).await);
        }
    }
    bin.signal(libc::SIGTERM);
    tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(10)));

    // Flip one byte inside s.js's brotli body (same length: only its digest can tell).
    let br_files: Vec<Image> = variant_files(dir.path())
        .into_iter()
        .filter(|i| i.coding.as_deref() == Some("br"))
        .collect();
    assert_eq!(br_files.len(), 2);
    let mut corrupted = None;
    for variant in &br_files {
        let bytes = variant.read();
        // The object of s.js is the other image with the same key hash; find it by its record.
        let object = crate::support::object_images(dir.path())
            .into_iter()
            .find(|o| o.key == variant.key)
            .unwrap();
        if object.read().windows(5).any(|w| w == b"/s.js") {
            variant.write_at(10, &[bytes[10] ^ 0xff]);
            corrupted = Some(variant.clone());
        }
    }
    assert!(corrupted.is_some());

    let mut bin = Binary::serve(&origin.url(), dir.path(), &[], &env);
    let (addr, admin) = (bin.public_addr(), bin.admin_addr());
    crate::support::wait_ready(admin).await;
    // Kept: served coded from the first request, and decoded to the app's bytes.
    let r = curl(
        &format!("http://{addr}/r.js"),
        &["--compressed", "-H", "Accept-Encoding: br"],
    )
    .await;
    assert_eq!(r.header("cache-status"), Some("sidecache; hit"));
    assert_eq!(r.header("content-encoding"), Some("br"));
    assert!(r.body == body);
    for coding in ["zstd", "gzip"] {
        assert_eq!(
            served_coding(&format!("http://{addr}/r.js"), Some(coding)).await,
            coding
        );
    }
    // Corrupted: never served; the client gets the app's bytes, decodable, from the app.
    let s = curl(
        &format!("http://{addr}/s.js"),
        &["--compressed", "-H", "Accept-Encoding: br"],
    )
    .await;
    assert_eq!(s.status, 200);
    assert!(s.body == body, "corrupted variant bytes were served");
    assert_ne!(s.header("cache-status"), Some("sidecache; hit"));
    let metrics = crate::support::scrape(admin).await;
    assert!(crate::support::metric(&metrics, "sidecache_corrupt_objects_total", &[]) >= 1.0);
    assert!(!corrupted.unwrap().exists(), "the corrupted variant is removed");
    // Nothing was made again for r.js after the restart: its three variants were kept.
    assert_eq!(origin.hits("/r.js"), 1);
    bin.signal(libc::SIGTERM);
    tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(10)));
}

/// After `sidecache prime`, a browser's request is a hit on the brotli variant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_priming_a_browsers_request_is_a_hit_on_the_brotli_variant() {
    let origin = Origin::start().await;
    let paths = ["/assets/app-1a2b.js", "/assets/site-3c4d.css", "/assets/self-5e6f.js"];
    let body = script(80);
    origin.fixed(paths[0], SCRIPT, body.clone());
    origin.fixed(
        paths[1],
        &[
            ("cache-control", "public, max-age=31536000"),
            ("content-type", "text/css"),
        ],
        body.clone(),
    );
    // An app that compresses itself answers the prime as it answers browsers.
    let gz = {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        enc.write_all(&body).unwrap();
        enc.finish().unwrap()
    };
    origin.fixed(
        paths[2],
        &[
            ("cache-control", "public, max-age=31536000"),
            ("content-type", "application/javascript"),
            ("content-encoding", "gzip"),
            ("vary", "Accept-Encoding"),
        ],
        gz,
    );
    let sc = TestSidecar::start(&origin.url()).await;
    let run = prime(&sc.admin_url(""), &["--urls", "-"], Some(&paths.join("\n"))).await;
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    for (path, coding) in [(paths[0], "br"), (paths[1], "br"), (paths[2], "gzip")] {
        let resp = app_client()
            .get(sc.url(path))
            .header("accept-encoding", "gzip, deflate, br, zstd")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["cache-status"], "sidecache; hit", "{path}");
        assert_eq!(resp.headers()["content-encoding"], coding, "{path}");
        assert_eq!(origin.hits(path), 1, "{path}");
    }
}

/// A version stored while an older version of the same key waits in the compressing queue
/// still gets its variants (the older job finds itself replaced and does nothing; the newer
/// one is queued behind it, not folded into it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_stored_while_an_older_one_waits_for_compression_gets_its_variants() {
    let origin = Origin::start().await;
    // A 1 MiB long-lived script ahead in the queue keeps the one thread busy (brotli 11).
    origin.fixed("/big.js", SCRIPT, script(1024));
    let (v1, v2) = (script(40), script(48));
    let fixed = |body: &[u8]| crate::support::Behaviour::Fixed {
        status: 200,
        headers: crate::support::origin::owned(SCRIPT),
        body: bytes::Bytes::from(body.to_vec()),
    };
    origin.route(
        "/v.js",
        crate::support::Behaviour::FirstThen(Box::new(fixed(&v1)), Box::new(fixed(&v2))),
    );
    let sc = TestSidecar::start(&origin.url()).await;
    served_coding(&sc.url("/big.js"), None).await;
    // Version 1, then version 2 (a reload), both queued while big.js is compressed.
    served_coding(&sc.url("/v.js"), None).await;
    stored(&sc, 2).await;
    let reload = app_client()
        .get(sc.url("/v.js"))
        .header("cache-control", "no-cache")
        .send()
        .await
        .unwrap();
    assert!(reload.headers()["cache-status"].to_str().unwrap().contains("stored"));
    reload.bytes().await.unwrap();
    assert_eq!(origin.hits("/v.js"), 2);
    assert!(
        variant_ready(&sc.url("/v.js"), "br").await,
        "the newer version never got its variants"
    );
    let got = curl(&sc.url("/v.js"), &["--compressed", "-H", "Accept-Encoding: br"]).await;
    assert_eq!(got.header("content-encoding"), Some("br"));
    assert!(got.body == v2, "the variant is of the version stored");
}

/// CPU time (user + system) a child process has used, from /proc (USER_HZ is 100 on Linux).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces, inside parentheses).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name and state.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// Starts the real binary with `env` added; returns it, its public and admin addresses.
async fn start_bin(
    origin: &Origin,
    dir: &Path,
    env: &[(&str, &str)],
) -> (Binary, std::net::SocketAddr, std::net::SocketAddr) {
    let mut all = vec![
        ("SIDECACHE_ACCESS_LOG", "false"),
        ("SIDECACHE_MIN_FREE", "0"),
        ("SIDECACHE_MAX_SIZE", "512MiB"),
    ];
    all.extend_from_slice(env);
    let mut bin = Binary::serve(&origin.url(), dir, &[], &all);
    let (addr, admin) = (bin.public_addr(), bin.admin_addr());
    crate::support::wait_ready(admin).await;
    (bin, addr, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_busting_requests_for_one_script_compress_it_once() {
    use crate::support::{metric, scrape};
    let origin = Origin::start().await;
    let body = script(1024);
    origin.fixed("/app.js", SCRIPT, body.clone());
    let dir = tempfile::tempdir().unwrap();
    let (bin, addr, admin) = start_bin(&origin, dir.path(), &[]).await;
    let pid = bin.child.id();
    let cpu_before = cpu_seconds(pid);
    // 40 one-off keys for one body, all at once (a cache-busting flood).
    let sends = (0..40).map(|i| served_coding_owned(format!("http://{addr}/app.js?q={i}")));
    for coding in futures_util::future::join_all(sends).await {
        assert_eq!(coding, "identity", "nothing waits for compression");
    }
    assert_eq!(origin.hits("/app.js"), 40);
    // Every key gets its three variants...
    let made = eventually(Duration::from_secs(120), async || {
        metric(&scrape(admin).await, "sidecache_variants_made_total", &[]) == 120.0
    })
    .await;
    let text = scrape(admin).await;
    assert!(
        made,
        "variants made: {}",
        metric(&text, "sidecache_variants_made_total", &[])
    );
    for (i, coding) in ["br", "zstd", "gzip"].into_iter().enumerate() {
        let label = format!("encoding=\"{coding}\"");
        // ... from one compression of the body in each coding; the others are its bytes.
        assert_eq!(
            metric(&text, "sidecache_compress_input_bytes_total", &[&label]),
            body.len() as f64,
            "{coding} compressed more than once"
        );
        assert_eq!(metric(&text, "sidecache_variants_reused_total", &[&label]), 39.0);
        let url = format!("http://{addr}/app.js?q={}", 7 + i);
        let got = curl(&url, &["--compressed", "-H", &format!("Accept-Encoding: {coding}")]).await;
        assert_eq!(got.header("content-encoding"), Some(coding));
        assert!(got.body == body, "a reused {coding} variant decodes to the app's bytes");
    }
    // The whole flood (40 MiB received, hashed, stored and answered, and one compression of
    // each coding at the levels of a long-lived 1 MiB body) in a few seconds of CPU.
    let cpu = cpu_seconds(pid) - cpu_before;
    let compressing = metric(&text, "sidecache_compress_seconds_sum", &[]);
    assert!(compressing < 3.0, "compressing took {compressing:.2} s of CPU");
    assert!(cpu < 3.0, "the flood cost {cpu:.2} s of CPU");
    eprintln!("flood: {cpu:.2} s of CPU in all, {compressing:.2} s compressing");
}

/// [`served_coding`] of an owned URL, without `Accept-Encoding`.
async fn served_coding_owned(url: String) -> String {
    served_coding(&url, None).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_bodies_beyond_the_cpu_budget_wait_and_the_overflow_is_dropped_and_counted() {
    use crate::support::{metric, scrape};
    let origin = Origin::start().await;
    const N: usize = 20;
    for i in 0..N {
        // Distinct bodies: each its own compression.
        let mut body = format!("// build {i}\n").into_bytes();
        body.extend(script(64));
        origin.fixed(&format!("/b{i}.js"), SCRIPT, body);
    }
    let dir = tempfile::tempdir().unwrap();
    // Half a core, nothing saved up, two bodies may wait.
    let share = 0.5;
    let env = [("SIDECACHE_COMPRESS", "{cpu_share: 0.5, cpu_burst: 0s, queue: 2}")];
    let (_bin, addr, admin) = start_bin(&origin, dir.path(), &env).await;
    let started = std::time::Instant::now();
    let sends = (0..N).map(|i| served_coding_owned(format!("http://{addr}/b{i}.js")));
    futures_util::future::join_all(sends).await;
    let dropped = eventually(Duration::from_secs(10), async || {
        metric(
            &scrape(admin).await,
            "sidecache_compress_dropped_total",
            &["reason=\"queue_full\""],
        ) > 0.0
    })
    .await;
    assert!(dropped, "bodies beyond the queue were not counted as dropped");
    // What was queued is compressed, paced: wait until the queue has drained.
    let settled = eventually(Duration::from_secs(60), async || {
        let text = scrape(admin).await;
        let dropped = metric(&text, "sidecache_compress_dropped_total", &[]);
        let bodies = metric(&text, "sidecache_compress_seconds_count", &["encoding=\"br\""]);
        bodies + dropped == N as f64
    })
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let text = scrape(admin).await;
    assert!(settled, "every body was either compressed or counted as dropped");
    let dropped = metric(&text, "sidecache_compress_dropped_total", &[]);
    let bodies = metric(&text, "sidecache_compress_seconds_count", &["encoding=\"br\""]);
    let cpu = metric(&text, "sidecache_compress_seconds_sum", &[]);
    // One thread took one body, two waited: the rest of the flood was not compressed.
    assert!(
        bodies <= 4.0 && dropped >= (N - 4) as f64,
        "{bodies} compressed, {dropped} dropped"
    );
    // Within the budget: half a core over the span, plus the one body it may owe.
    let per_body = cpu / bodies.max(1.0);
    assert!(
        cpu <= share * elapsed + per_body + 0.05,
        "{cpu:.3} s of CPU compressing in {elapsed:.2} s ({per_body:.3} s a body)"
    );
    // The ones compressed are served in brotli, the dropped ones as the app sent them.
    let mut in_br = 0;
    for i in 0..N {
        in_br += (served_coding(&format!("http://{addr}/b{i}.js"), Some("br")).await == "br") as usize;
    }
    assert_eq!(in_br as f64, bodies);
    eprintln!("{bodies} compressed ({cpu:.3} s of CPU in {elapsed:.2} s), {dropped} dropped");
}

/// Issue 26: variants count bytes, not objects. Twenty-four compressible scripts under an
/// object bound of thirty: each with its three variants is one object, so none is evicted
/// (before, each object and its variants were four entries against the bound: 96 > 30).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn variants_do_not_take_objects_places_under_the_object_bound() {
    let origin = Origin::start().await;
    let body = script(8);
    for i in 0..24 {
        origin.fixed(&format!("/s{i}.js"), SCRIPT, body.clone());
    }
    let sc = TestSidecar::start_with(&origin.url(), |c| {
        c.max_objects = 30;
        c.memory_size = 0;
    })
    .await;
    let cache_dir = sc.dir.path().join("cache");
    for i in 0..24 {
        assert_eq!(served_coding(&sc.url(&format!("/s{i}.js")), None).await, "identity");
    }
    let all_made = eventually(Duration::from_secs(30), async || variant_files(&cache_dir).len() == 72).await;
    assert!(all_made, "{} variant files", variant_files(&cache_dir).len());
    assert_eq!(
        sc.sidecar.proxy.cache().stats().0,
        24,
        "objects evicted while the bound has room"
    );
    for i in 0..24 {
        let path = format!("/s{i}.js");
        assert_eq!(served_coding(&sc.url(&path), Some("br")).await, "br", "{path}");
        assert_eq!(origin.hits(&path), 1, "{path} asked of the app again");
    }
    sc.stop().await;
}
