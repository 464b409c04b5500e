//! Issue 15, findings 7 and 8: what the cache directory really spends on disk stays within the
//! budget (allocated blocks, object count), and nothing planted in the directory is followed.

use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sidecache::cache::store::Store;

use crate::support::{Binary, Origin, TestSidecar, app_client, disk_usage, test_config};

/// The cache directory a test sidecar uses under `dir` (as `test_config` sets it).
fn cache_dir(dir: &Path) -> PathBuf {
    dir.join("cache")
}

/// A directory outside the cache holding one canary file; returns (directory, canary).
fn canary_dir(dir: &Path) -> (PathBuf, PathBuf) {
    let outside = dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let canary = outside.join("canary");
    std::fs::write(&canary, b"precious").unwrap();
    (outside, canary)
}

/// Starts a sidecar on the cache directory under `dir`, fills one object through it over a
/// real socket, and stops it: a startup with its sweeps, and a fill that makes fan-out
/// directories.
async fn run_once(dir: tempfile::TempDir) -> tempfile::TempDir {
    let origin = Origin::start().await;
    origin.fixed(
        "/a.js",
        &[("content-type", "text/javascript"), ("cache-control", "max-age=600")],
        "body",
    );
    let config = test_config(&origin.url(), dir.path());
    // The sidecar's own temp dir goes with it; `dir` (the cache's) outlives it.
    let sidecar = TestSidecar::start_config(config, tempfile::tempdir().unwrap()).await;
    let c = app_client();
    for _ in 0..2 {
        let resp = c.get(sidecar.url("/a.js")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "body");
    }
    let cache = sidecar.sidecar.proxy.cache().clone();
    assert!(
        crate::support::eventually(Duration::from_secs(10), async || cache.stats().0 == 1).await,
        "the object was stored"
    );
    sidecar.stop().await;
    dir
}

#[tokio::test]
async fn a_symlinked_tmp_dir_is_replaced_not_swept_through() {
    let dir = tempfile::tempdir().unwrap();
    let (outside, canary) = canary_dir(dir.path());
    let objects = cache_dir(dir.path()).join("objects-v3");
    std::fs::create_dir_all(&objects).unwrap();
    symlink(&outside, objects.join("tmp")).unwrap();

    let dir = run_once(dir).await;
    let objects = cache_dir(dir.path()).join("objects-v3");
    assert_eq!(
        std::fs::read(&canary).unwrap(),
        b"precious",
        "the sweep followed the link"
    );
    let tmp = std::fs::symlink_metadata(objects.join("tmp")).unwrap();
    assert!(tmp.is_dir(), "tmp is a real directory now");
}

#[tokio::test]
async fn a_symlinked_fanout_dir_is_removed_not_swept_through() {
    let dir = tempfile::tempdir().unwrap();
    let (outside, canary) = canary_dir(dir.path());
    let objects = cache_dir(dir.path()).join("objects-v3");
    std::fs::create_dir_all(&objects).unwrap();
    // A name the startup scan would remove as "not ours" if it looked inside.
    symlink(&outside, objects.join("ab")).unwrap();

    let dir = run_once(dir).await;
    assert_eq!(
        std::fs::read(&canary).unwrap(),
        b"precious",
        "the scan followed the link"
    );
    let objects = cache_dir(dir.path()).join("objects-v3");
    assert!(
        std::fs::symlink_metadata(objects.join("ab")).is_err(),
        "the planted link is removed"
    );
}

#[tokio::test]
async fn a_symlink_at_generations_new_does_not_redirect_the_write() {
    let dir = tempfile::tempdir().unwrap();
    let (_, canary) = canary_dir(dir.path());
    let objects = cache_dir(dir.path()).join("objects-v3");
    std::fs::create_dir_all(&objects).unwrap();
    symlink(&canary, objects.join("generations.new")).unwrap();

    let dir = run_once(dir).await;
    assert_eq!(
        std::fs::read(&canary).unwrap(),
        b"precious",
        "the write followed the link"
    );
    let generations = cache_dir(dir.path()).join("objects-v3/generations");
    let md = std::fs::symlink_metadata(&generations).unwrap();
    assert!(md.is_file(), "generations is a regular file of ours");
    assert!(
        std::fs::read_to_string(&generations)
            .unwrap()
            .trim()
            .parse::<u64>()
            .is_ok()
    );
}

#[tokio::test]
async fn a_dangling_lock_symlink_does_not_create_its_target() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("created-by-sidecache");
    std::fs::create_dir_all(cache_dir(dir.path())).unwrap();
    symlink(&target, cache_dir(dir.path()).join("lock")).unwrap();

    let dir = run_once(dir).await;
    assert!(
        !target.exists(),
        "the lock's open followed the link and created its target"
    );
    let lock = std::fs::symlink_metadata(cache_dir(dir.path()).join("lock")).unwrap();
    assert!(lock.is_file());
    assert_eq!(lock.mode() & 0o777, 0o600);
}

#[tokio::test]
async fn created_directories_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let dir = run_once(dir).await;
    let root = cache_dir(dir.path());
    let mut dirs = vec![root.clone()];
    let mut files = Vec::new();
    // Every directory and file the sidecar made (a bounded walk: the tree is small).
    let mut i = 0;
    while i < dirs.len() && i < 10_000 {
        for entry in std::fs::read_dir(&dirs[i]).unwrap() {
            let entry = entry.unwrap();
            let md = std::fs::symlink_metadata(entry.path()).unwrap();
            if md.is_dir() {
                dirs.push(entry.path());
            } else {
                files.push(entry.path());
            }
        }
        i += 1;
    }
    // The root, objects-v3, tmp and a fan-out directory.
    assert!(dirs.len() >= 4, "{dirs:?}");
    for d in &dirs {
        let mode = std::fs::metadata(d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{} is {mode:o}", d.display());
    }
    assert!(files.len() >= 3, "{files:?}");
    for f in &files {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is {mode:o}", f.display());
    }
}

#[test]
fn an_open_cache_dir_of_ours_is_made_private() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    std::fs::create_dir(&root).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
    let _store = Store::open(&root).unwrap();
    assert_eq!(std::fs::metadata(&root).unwrap().permissions().mode() & 0o777, 0o700);
}

#[test]
fn a_cache_dir_owned_by_another_user_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    std::fs::create_dir(&root).unwrap();
    let me = rustix::process::geteuid().as_raw();
    if me != 0 {
        // Only root can hand a directory to another user; /tmp's owner is not us either.
        let other = std::fs::metadata("/").unwrap().uid();
        assert_ne!(other, me, "the filesystem root is owned by another user");
        let err = Store::open(Path::new("/")).unwrap_err().to_string();
        assert!(
            err.contains("refusing cache directory /") && err.contains("owned by uid"),
            "{err}"
        );
        return;
    }
    let other = 65534;
    std::os::unix::fs::chown(&root, Some(other), Some(other)).unwrap();
    let err = Store::open(&root).unwrap_err().to_string();
    assert!(
        err.contains(&format!("refusing cache directory {}", root.display())),
        "{err}"
    );
    assert!(err.contains(&format!("owned by uid {other}")), "{err}");
    assert!(
        std::fs::read_dir(&root).unwrap().next().is_none(),
        "nothing is created in a refused directory"
    );
}

#[test]
fn a_symlinked_cache_dir_is_refused_by_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let (outside, canary) = canary_dir(dir.path());
    let link = dir.path().join("cache");
    symlink(&outside, &link).unwrap();

    let err = Store::open(&link).unwrap_err().to_string();
    assert!(
        err.contains(&format!("refusing cache directory {}", link.display())),
        "{err}"
    );
    assert!(err.contains("symbolic link"), "{err}");

    // The real binary: it serves from the app (fail open) and says why the cache is off.
    let mut bin = Binary::serve("http://127.0.0.1:9", &link, &[], &[("SIDECACHE_ACCESS_LOG", "false")]);
    let line = bin.wait_line("cache disabled");
    assert!(
        line.contains("refusing cache directory") && line.contains("symbolic link"),
        "{line}"
    );
    assert_eq!(std::fs::read(&canary).unwrap(), b"precious");
    let entries: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        entries,
        vec![std::ffi::OsString::from("canary")],
        "nothing made through the link"
    );
}

/// Objects' images (one per stored object: a file, or a slot of a segment) under the cache
/// directory.
fn records(cache: &Path) -> u64 {
    crate::support::object_images(cache).len() as u64
}

/// Fills `/tiny/0.js` .. `/tiny/<n-1>.js` (a distinct 100-byte cacheable body each, so no
/// two share a body file) through the sidecar over real
/// sockets, `parallel` at a time, in batches; after each batch (and at the end) samples what
/// the cache directory spends on disk. Returns (the largest sample, the most records seen).
async fn fill_tiny_objects(sidecar: &TestSidecar, n: u64, parallel: u64, max_size: u64) -> (u64, u64) {
    let cache = cache_dir(sidecar.dir.path());
    let c = app_client();
    let (mut peak_bytes, mut peak_records) = (0, 0);
    let batch = parallel * 10;
    for start in (0..n).step_by(batch as usize) {
        let tasks: Vec<_> = (0..parallel)
            .map(|lane| {
                let c = c.clone();
                let base = sidecar.url("/tiny/");
                tokio::spawn(async move {
                    for q in (start + lane..(start + batch).min(n)).step_by(parallel as usize) {
                        let resp = c.get(format!("{base}{q}.js")).send().await.unwrap();
                        assert_eq!(resp.status(), 200);
                        assert_eq!(resp.bytes().await.unwrap(), tiny_body(q));
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let (bytes, _) = disk_usage(&cache);
        assert!(
            bytes <= max_size,
            "after {} requests the cache directory spends {bytes} bytes, over max_size {max_size}",
            start + batch
        );
        peak_bytes = peak_bytes.max(bytes);
        peak_records = peak_records.max(records(&cache));
    }
    (peak_bytes, peak_records)
}

fn tiny_body(q: u64) -> Vec<u8> {
    format!("{q:0100}").into_bytes()
}

/// An origin answering `/tiny/<q>.js` for `q` below `n` with [`tiny_body`].
async fn tiny_origin(n: u64) -> Origin {
    let origin = Origin::start().await;
    for q in 0..n {
        origin.fixed(
            &format!("/tiny/{q}.js"),
            &[
                ("content-type", "text/javascript"),
                ("cache-control", "public, max-age=600"),
            ],
            tiny_body(q),
        );
    }
    origin
}

#[tokio::test]
async fn tiny_objects_never_spend_more_disk_than_the_budget() {
    let origin = tiny_origin(2500).await;
    let max_size: u64 = 8 << 20;
    let sidecar = TestSidecar::start_with(&origin.url(), |c| {
        c.max_size = max_size;
        c.max_objects = 2000;
        c.memory_size = 0;
    })
    .await;
    // 2,500 objects of 100 bytes: 250 KB of bodies and ~330 KB of records, but a slot of a
    // whole allocation unit each (its range is punched alone when it goes): 10 MB on a
    // 4 KiB-block filesystem.
    let (peak, _) = fill_tiny_objects(&sidecar, 2500, 8, max_size).await;
    let cache = sidecar.sidecar.proxy.cache().clone();
    let (objects, accounted, _) = cache.stats();
    let (bytes, files) = disk_usage(&cache_dir(sidecar.dir.path()));
    assert!(bytes <= max_size, "{bytes} bytes on disk over {max_size}");
    // The accounting is what the disk spends, not less: the gauge can be trusted.
    assert!(
        bytes <= accounted,
        "the cache says it uses {accounted} bytes, the disk holds {bytes} in {files} files"
    );
    // Not vacuous: the budget, not the object bound, is what stopped it, close to full.
    assert!(objects > 400 && objects < 2000, "{objects} objects stored");
    assert!(peak > max_size / 2, "peak {peak}");
    assert_eq!(origin.total_hits(), 2500);
}

#[tokio::test]
async fn the_number_of_stored_objects_is_bounded() {
    let origin = tiny_origin(1000).await;
    let max_objects = 200;
    let sidecar = TestSidecar::start_with(&origin.url(), |c| {
        c.max_objects = max_objects;
        c.memory_size = 0;
    })
    .await;
    let max_size = sidecar.sidecar.proxy.cache().settings().max_size;
    let (_, peak_records) = fill_tiny_objects(&sidecar, 1000, 8, max_size).await;
    assert!(
        peak_records <= max_objects,
        "{peak_records} records on disk, over max_objects {max_objects}"
    );
    let (objects, _, _) = sidecar.sidecar.proxy.cache().stats();
    assert!(
        objects as u64 <= max_objects && objects > 100,
        "{objects} objects indexed"
    );
    // One file per object, and the lock and generations files: the inodes used.
    let (_, files) = disk_usage(&cache_dir(sidecar.dir.path()));
    assert!(files <= max_objects + 2, "{files} files");
    // The newest objects are the ones kept (LRU): the last one is a hit.
    let resp = app_client().get(sidecar.url("/tiny/999.js")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(origin.total_hits(), 1000, "the most recent object was kept");
}

/// Issue 26: small objects share segment files, so one object's bytes lie beside another's
/// slot. An attacker's cached body that spells a whole slot for a victim's URL (a prefix, then
/// an image with a good record and digest) is never read as one, even when a crash tears the
/// attacker's own slot so that the startup scan resumes inside the attacker's body. The
/// control run gives the forged slot the directory's real MAC (read from its key file, which
/// an attacker never sees): then it is read and served, which shows the forgery is otherwise
/// perfect and that this test can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_spelling_a_slot_for_another_url_is_never_read_as_one_after_a_crash() {
    let legit = crate::support::pattern_bytes(5000);
    let evil = b"evil".repeat(1250);
    assert_eq!(
        forge_and_restart(true, &evil).await,
        evil,
        "control: a slot with the key's MAC is read"
    );
    assert_eq!(
        forge_and_restart(false, &evil).await,
        legit,
        "the victim got the attacker's bytes"
    );
}

/// Stores the victim, then the attacker's body spelling a newer slot of the victim's key; stops;
/// tears the attacker's slot's prefix; restarts; returns what the victim's URL then serves.
async fn forge_and_restart(with_mac: bool, evil: &[u8]) -> Vec<u8> {
    use sidecache::cache::key::Digest;
    use sidecache::cache::store;
    const CACHEABLE: &[(&str, &str)] = &[
        ("cache-control", "public, max-age=3600"),
        ("content-type", "text/plain"),
    ];
    let origin = Origin::start().await;
    origin.fixed("/victim.txt", CACHEABLE, crate::support::pattern_bytes(5000));
    let dir = tempfile::tempdir().unwrap();
    let env = [
        ("SIDECACHE_ACCESS_LOG", "false"),
        ("SIDECACHE_COMPRESS", "{enabled: false}"),
        ("SIDECACHE_MEMORY_SIZE", "0"),
    ];
    let mut bin = Binary::serve(&origin.url(), dir.path(), &[], &env);
    crate::support::wait_ready(bin.admin_addr()).await;
    let get = async |addr: std::net::SocketAddr, path: &str| {
        let resp = app_client().get(format!("http://{addr}{path}")).send().await.unwrap();
        let hit = resp
            .headers()
            .get("cache-status")
            .is_some_and(|v| v == "sidecache; hit");
        (hit, resp.bytes().await.unwrap().to_vec())
    };
    let addr = bin.public_addr();
    get(addr, "/victim.txt").await;
    assert!(crate::support::eventually(Duration::from_secs(10), async || get(addr, "/victim.txt").await.0).await);

    // The victim's slot: the first of the first segment.
    let images = crate::support::object_images(dir.path());
    assert_eq!(images.len(), 1);
    let victim = &images[0];
    assert!(victim.in_segment() && victim.offset == 64, "{victim:?}");
    let segment = std::fs::read(&victim.path).unwrap();
    let generation = u64::from_be_bytes(segment[32..40].try_into().unwrap());
    // The attacker knows the format: the victim's record with its own body's length and digest.
    let bytes = victim.read();
    let mut meta = store::decode_tail(&bytes[5000..]).expect("the victim's record");
    meta.body_len = evil.len() as u64;
    meta.digest = Digest::from(blake3::hash(evil));
    let image = [evil, &store::tail(&meta)].concat();
    // The attacker's slot comes next, on the unit after the victim's; its body starts after its
    // 64-byte prefix, and the forged slot is placed on the unit after that.
    let attacker_slot = (64 + victim.len).div_ceil(4096) * 4096;
    let forged_at = attacker_slot + 4096;
    let mut prefix = vec![0u8; 64];
    prefix[..8].copy_from_slice(b"SCSEG001");
    prefix[16..32].copy_from_slice(&meta.storage_hash().0);
    prefix[32..40].copy_from_slice(&(generation + 1).to_be_bytes());
    prefix[40..48].copy_from_slice(&(image.len() as u64).to_be_bytes());
    if with_mac {
        let hex = std::fs::read_to_string(dir.path().join("objects-v3/segments/key")).unwrap();
        let key: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&hex.trim()[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let id = u64::from_str_radix(victim.path.file_stem().unwrap().to_str().unwrap(), 16).unwrap();
        let mut h = blake3::Hasher::new_keyed(&key.try_into().unwrap());
        h.update(&id.to_be_bytes());
        h.update(&forged_at.to_be_bytes());
        h.update(&prefix[..48]);
        prefix[48..].copy_from_slice(&h.finalize().as_bytes()[..16]);
    }
    let mut attack = vec![b'x'; (forged_at - attacker_slot - 64) as usize];
    attack.extend_from_slice(&prefix);
    attack.extend_from_slice(&image);
    attack.resize(attack.len() + 3000, b'y');
    origin.fixed("/attack.txt", CACHEABLE, attack);
    get(addr, "/attack.txt").await;
    assert!(crate::support::eventually(Duration::from_secs(10), async || get(addr, "/attack.txt").await.0).await);
    let placed = crate::support::object_images(dir.path())
        .into_iter()
        .any(|i| i.path == victim.path && i.offset == attacker_slot + 64);
    assert!(placed, "the attacker's slot is where the test expects it");
    bin.signal(libc::SIGTERM);
    tokio::task::block_in_place(|| bin.wait_exit(Duration::from_secs(10)));

    // A crash tore the attacker's slot: its prefix never reached the disk.
    let f = std::fs::OpenOptions::new().write(true).open(&victim.path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 64], attacker_slot).unwrap();
    drop(f);
    let mut bin = Binary::serve(&origin.url(), dir.path(), &[], &env);
    crate::support::wait_ready(bin.admin_addr()).await;
    let (_, body) = get(bin.public_addr(), "/victim.txt").await;
    body
}
