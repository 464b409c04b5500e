//! Issue 15, finding 9: the admin port's prime fills only from `prime_sources`, never follows
//! a redirect off them, and beyond loopback the admin port needs its token, which the CLI's
//! prime and purge send. Real sockets: an app, an allowed source, and a second server that
//! must never be asked.

use std::process::Command;

use crate::support::binary_path;

#[test]
fn admin_beyond_loopback_without_a_token_is_refused_at_startup() {
    // check-config validates exactly what serve validates before binding anything; no
    // non-loopback address is bound here.
    let check = |args: &[&str], env: &[(&str, &str)]| {
        Command::new(binary_path())
            .arg("check-config")
            .args(args)
            .env_clear()
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    for (args, env) in [
        (&["--admin-listen", "0.0.0.0:0"][..], &[][..]),
        (&[][..], &[("SIDECACHE_ADMIN_LISTEN", "[::]:0")][..]),
        (
            &["--admin-listen", "10.0.0.1:9090"][..],
            &[("SIDECACHE_ADMIN_TOKEN", "")][..],
        ),
    ] {
        let out = check(args, env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?} {env:?}: {err}");
        assert!(err.contains("admin_token") && err.contains("loopback"), "{err}");
    }
    let ok = check(&["--admin-listen", "0.0.0.0:0"], &[("SIDECACHE_ADMIN_TOKEN", "t0ken")]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let ok = check(&["--admin-listen", "127.0.0.1:0"], &[]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
}
