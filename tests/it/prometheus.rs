//! Observability proven with a real Prometheus server on loopback scraping the admin port, and
//! promtool over the shipped scrape config, alert rules and their unit tests.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::{Behaviour, Binary, Origin, eventually, origin::owned, scrape};

/// Finds a Debian-packaged tool, installing the package when it is missing and we may (root,
/// apt-get present): `cargo test` on a fresh machine of this project's kind needs nothing else.
pub fn tool(binary: &str, package: &str) -> PathBuf {
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    let find = || {
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|d| d.join(binary))
            .find(|p| p.is_file())
    };
    if let Some(p) = find() {
        return p;
    }
    let status = Command::new("sh")
        .args([
            "-c",
            &format!("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {package}"),
        ])
        .stdout(Stdio::null())
        .status();
    assert!(
        status.is_ok_and(|s| s.success()),
        "{binary} is missing and `apt-get install {package}` failed"
    );
    find().unwrap_or_else(|| panic!("{binary} not found after installing {package}"))
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new(tool("promtool", "prometheus"))
        .args(args)
        .current_dir(repo(""))
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn shipped_prometheus_config_and_alert_rules_pass_promtool() {
    let (ok, out) = promtool(&["check", "config", "deploy/prometheus/prometheus.yml"]);
    assert!(ok, "promtool check config: {out}");
    let (ok, out) = promtool(&["check", "rules", "deploy/prometheus/alerts.yml"]);
    assert!(ok, "promtool check rules: {out}");
    let (ok, out) = promtool(&["test", "rules", "deploy/prometheus/alerts_test.yml"]);
    assert!(ok, "promtool test rules: {out}");
}

#[test]
fn grafana_dashboard_queries_only_exported_metrics() {
    let text = std::fs::read_to_string(repo("deploy/grafana/sidecache-dashboard.json")).unwrap();
    assert_valid_json(&text);
    let mut names: Vec<&str> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("sidecache_"))
        .collect();
    names.sort();
    names.dedup();
    assert!(!names.is_empty());
    let metrics = std::fs::read_to_string(repo("src/metrics.rs")).unwrap();
    for name in names {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .fold(name, |n, s| n.strip_suffix(s).unwrap_or(n));
        assert!(
            metrics.contains(&format!("\"{base}\"")),
            "dashboard uses {name}, which is not exported"
        );
    }
}

/// JSON well-formedness through python3 (on every machine of this kind), rather than another
/// dependency for one check.
fn assert_valid_json(text: &str) {
    let mut child = Command::new("python3")
        .args(["-c", "import json,sys; json.load(sys.stdin)"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success(), "dashboard is not valid JSON");
}

struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_prometheus(target: std::net::SocketAddr) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: sidecache\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(tool("prometheus", "prometheus"))
        .arg(format!("--config.file={}", config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start prometheus");
    let url = format!("http://127.0.0.1:{port}");
    let c = sidecache::http_client().build().unwrap();
    let ready = eventually(Duration::from_secs(60), async || {
        c.get(format!("{url}/-/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ready, "prometheus never became ready");
    Prometheus { child, url, _dir: dir }
}

/// One instant-vector query's single value, if there is exactly one series.
async fn query(prom: &Prometheus, promql: &str) -> Option<f64> {
    let encoded = form_urlencoded::Serializer::new(String::new())
        .append_pair("query", promql)
        .finish();
    let resp = sidecache::http_client()
        .build()
        .unwrap()
        .get(format!("{}/api/v1/query?{encoded}", prom.url))
        .send()
        .await
        .ok()?;
    let text = resp.text().await.ok()?;
    // {"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[t,"N"]}]}}
    let value = text.split("\"value\":[").nth(1)?;
    let n = value.split(',').nth(1)?.trim_start_matches('"').split('"').next()?;
    if text.matches("\"value\":[").count() != 1 {
        return None;
    }
    n.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_exact_hit_and_miss_counts() {
    const MISSES: u64 = 7;
    const HITS: u64 = 23;
    let origin = Origin::start().await;
    for i in 0..MISSES {
        origin.route(
            &format!("/p/{i}.css"),
            Behaviour::Generated {
                len: 10_000 + i,
                headers: owned(&[("cache-control", "max-age=3600")]),
            },
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let mut bin = Binary::serve(&origin.url(), dir.path(), &[], &[("SIDECACHE_ACCESS_LOG", "false")]);
    let addr = bin.public_addr();
    let admin = bin.admin_addr();
    let c = sidecache::http_client().build().unwrap();
    assert!(
        eventually(Duration::from_secs(10), async || {
            c.get(format!("http://{admin}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await
    );
    for i in 0..MISSES {
        let r = c.get(format!("http://{addr}/p/{i}.css")).send().await.unwrap();
        assert!(r.headers()["cache-status"].to_str().unwrap().contains("fwd=uri-miss"));
        r.bytes().await.unwrap();
    }
    // Fills commit on their own task: wait until all are indexed before counting hits.
    assert!(
        eventually(Duration::from_secs(10), async || {
            let m = scrape(admin).await;
            m.lines().any(|l| l == format!("sidecache_cache_objects {MISSES}"))
        })
        .await
    );
    for i in 0..HITS {
        let r = c
            .get(format!("http://{addr}/p/{}.css", i % MISSES))
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["cache-status"], "sidecache; hit");
        r.bytes().await.unwrap();
    }

    let prom = start_prometheus(admin).await;
    let counts = async || {
        let miss = query(&prom, r#"sum(sidecache_requests_total{outcome="miss"})"#).await;
        let hit = query(&prom, r#"sum(sidecache_requests_total{outcome="hit"})"#).await;
        (miss, hit)
    };
    assert!(
        eventually(Duration::from_secs(30), async || counts().await
            == (Some(MISSES as f64), Some(HITS as f64)))
        .await,
        "prometheus saw {:?}, wanted ({MISSES}, {HITS})",
        counts().await
    );
    let buckets = query(
        &prom,
        r#"count(sidecache_request_duration_seconds_bucket{outcome="hit"})"#,
    )
    .await;
    assert!(
        buckets.is_some_and(|n| n >= 18.0),
        "hit latency histogram with explicit buckets: {buckets:?}"
    );
    let hit_count = query(&prom, r#"sum(sidecache_request_duration_seconds_count{outcome="hit"})"#).await;
    assert_eq!(hit_count, Some(HITS as f64));
    let served = query(&prom, "sum(sidecache_served_from_cache_bytes_total)")
        .await
        .unwrap_or(0.0);
    let expected: u64 = (0..HITS).map(|i| 10_000 + i % MISSES).sum();
    assert_eq!(served, expected as f64, "bytes served from the cache");
    assert_eq!(query(&prom, "sum(sidecache_build_info)").await, Some(1.0));
    assert_eq!(origin.total_hits(), MISSES);
}

#[test]
fn the_dashboard_shows_priming_and_descriptor_shortages() {
    let text = std::fs::read_to_string(repo("deploy/grafana/sidecache-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    for metric in [
        "sidecache_prime_objects_total",
        "sidecache_prime_bytes_total",
        "sidecache_descriptor_shortages_total",
    ] {
        assert!(exprs.iter().any(|e| e.contains(metric)), "no panel queries {metric}");
    }
    let mut ids: Vec<u64> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["id"].as_u64())
        .collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "panel ids are unique");
}
