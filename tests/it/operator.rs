//! Issue 28, "the operator's day": what an operator runs, run as they would (the binary, real
//! signals, the shipped deploy files' layouts).

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::{Binary, Origin, app_client, eventually, wait_ready};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The value of `Key=` in the shipped systemd unit.
fn unit_value(key: &str) -> String {
    let unit = std::fs::read_to_string(repo("deploy/systemd/sidecache.service")).unwrap();
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key}= in the unit"))
        .to_owned()
}

/// Files (not directories) under `dir`, links not followed.
fn files_under(dir: &Path) -> usize {
    crate::support::disk_usage(dir).1 as usize
}

/// The shipped unit's `DynamicUser=yes` + `CacheDirectory=`: systemd makes
/// `/var/cache/<name>` a link to `private/<name>` (0700, owned by the dynamic user), and
/// `SIDECACHE_CACHE_DIR=%C/<name>` names the link. sidecache caches there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_systemd_dynamic_user_cache_directory_layout_caches() {
    assert_eq!(unit_value("DynamicUser"), "yes");
    let name = unit_value("CacheDirectory");
    let mode = u32::from_str_radix(&unit_value("CacheDirectoryMode"), 8).unwrap();
    assert_eq!(unit_value("Environment=SIDECACHE_CACHE_DIR").replace("%C/", ""), name);

    // %C, as systemd lays it out for a dynamic user.
    let var_cache = tempfile::tempdir().unwrap();
    let private = var_cache.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let real = private.join(&name);
    std::fs::create_dir(&real).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(mode)).unwrap();
    let configured = var_cache.path().join(&name);
    symlink(Path::new("private").join(&name), &configured).unwrap();

    let origin = Origin::start().await;
    origin.fixed(
        "/app.js",
        &[("content-type", "text/javascript"), ("cache-control", "max-age=600")],
        "body",
    );
    let mut bin = Binary::serve(&origin.url(), &configured, &[], &[("SIDECACHE_ACCESS_LOG", "false")]);
    let (addr, admin) = (bin.public_addr(), bin.admin_addr());
    wait_ready(admin).await;
    let c = app_client();
    for _ in 0..2 {
        let resp = c.get(format!("http://{addr}/app.js")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(origin.hits("/app.js"), 1, "the second request was a hit");
    assert!(
        eventually(Duration::from_secs(10), async || files_under(&real) > 1).await,
        "objects are stored in the directory the link resolves to"
    );
    assert!(
        std::fs::symlink_metadata(&configured).unwrap().file_type().is_symlink(),
        "the link stays"
    );
}

/// A link to a directory others may enter (or another user's) is still refused, naming the
/// target and what would make it acceptable.
#[test]
fn a_link_to_a_directory_others_may_enter_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("open");
    std::fs::create_dir(&target).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
    let link = dir.path().join("cache");
    symlink(&target, &link).unwrap();
    let err = sidecache::cache::store::Store::open(&link).unwrap_err().to_string();
    assert!(err.contains("symbolic link to") && err.contains("755"), "{err}");
    assert_eq!(
        std::fs::read_dir(&target).unwrap().count(),
        0,
        "nothing made through the link"
    );
}
