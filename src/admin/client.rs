//! How the `prime`, `purge` and `inspect` commands reach this instance's sidecar: the admin
//! address and token, and the purge and inspect requests. The server side is [`super::Admin`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use crate::config::{Loader, RawConfig, Secret};

/// How `prime` and `purge` reach this instance's sidecar: its admin address and token, from
/// the flags, else from the configuration the sidecar reads (file, `SIDECACHE_*`).
pub struct AdminAccess {
    /// The admin port's base URL, e.g. `http://127.0.0.1:6083`.
    pub target: String,
    /// The bearer token, if any.
    pub token: Option<Secret>,
}

impl AdminAccess {
    /// Flags first, then the configuration (file, `SIDECACHE_*`), then the default
    /// `admin_listen` when that configuration does not load. `--target` may be an address
    /// (`127.0.0.1:6083`, as `admin_listen` is written) or a URL; anything else is refused.
    pub fn resolve(
        target: Option<String>,
        token: Option<String>,
        config: Option<PathBuf>,
    ) -> Result<AdminAccess, String> {
        let target = target.map(|t| admin_url(&t)).transpose()?;
        let token = token.filter(|t| !t.is_empty());
        let loaded = if target.is_some() && token.is_some() {
            None
        } else {
            match Loader::new(std::env::vars()).file(config).load() {
                Ok(config) => Some(config),
                Err(e) => {
                    eprintln!("sidecache: the admin address and token are not taken from the configuration: {e}");
                    None
                }
            }
        };
        let target = target.unwrap_or_else(|| {
            let mut addr = loaded.as_ref().map_or_else(default_admin_listen, |c| c.admin_listen);
            // A wildcard listener is reached on loopback from this instance.
            if addr.ip().is_unspecified() {
                addr.set_ip(match addr.ip() {
                    std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            format!("http://{addr}")
        });
        let token = token
            .map(|t| Secret::from(t.as_str()))
            .or_else(|| loaded.and_then(|c| c.admin_token));
        Ok(AdminAccess { target, token })
    }
}

/// `--target` as a base URL: `host:port` gets `http://`; a URL must be http(s) with a host.
fn admin_url(target: &str) -> Result<String, String> {
    let target = target.trim();
    let url = if target.contains("://") {
        target.to_owned()
    } else {
        format!("http://{target}")
    };
    match reqwest::Url::parse(&url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(url),
        _ => Err(format!(
            "--target `{target}` is not the admin address: give host:port (127.0.0.1:6083) or http://host:port"
        )),
    }
}

/// A purge prefix as the admin port matches it: a path starts with `/` (`assets` means
/// `/assets`, which would otherwise match nothing); a full URL stays as it is.
pub fn normalize_prefix(prefix: &str) -> String {
    if prefix.starts_with('/') || prefix.contains("://") {
        prefix.to_owned()
    } else {
        format!("/{prefix}")
    }
}

impl AdminAccess {
    /// One request to the admin port (`path` with its query), with the token when there is
    /// one: the answer's body, or an error saying `what` was refused and why.
    async fn call(&self, method: reqwest::Method, path: &str, what: &str) -> anyhow::Result<String> {
        let client = crate::http_client().timeout(Duration::from_secs(30)).build()?;
        let url = format!("{}{path}", self.target.trim_end_matches('/'));
        // Marks the request as the operator's, not a URL fetch forged through the app.
        let mut req = client.request(method, &url).header(super::ADMIN_HEADER, "1");
        if let Some(token) = self.token.as_ref().map(Secret::expose).filter(|t| !t.is_empty()) {
            req = req.bearer_auth(token);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("failed to reach the admin port at {}", self.target))?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            anyhow::bail!("{what} refused ({status}): {}", body.trim());
        }
        Ok(body)
    }
}

/// `sidecache purge`: asks the admin port at `access` to purge each selector in turn (`url`
/// (one request per `--url`), `prefix`, `tag` (repeated) or `all`), softly with `soft`, and
/// prints the total: how many objects were removed (`{"purged":N}`) or marked stale
/// (`{"marked":N}`).
pub async fn purge(access: AdminAccess, selectors: Vec<Vec<(&'static str, String)>>, soft: bool) -> anyhow::Result<u8> {
    let mut total = 0u64;
    let field = if soft { "marked" } else { "purged" };
    for selector in selectors {
        let mut encoded = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &selector {
            encoded.append_pair(k, v);
        }
        if soft {
            encoded.append_pair("soft", "true");
        }
        let body = access
            .call(reqwest::Method::POST, &format!("/purge?{}", encoded.finish()), "purge")
            .await?;
        let answer: serde_json::Value =
            serde_json::from_str(&body).context("the admin port answered something other than a count")?;
        total += answer.get(field).and_then(serde_json::Value::as_u64).unwrap_or(0);
    }
    println!("{{\"{field}\":{total}}}");
    Ok(0)
}

/// `sidecache inspect`: asks the admin port at `access` what is stored for `url` (narrowed to
/// `host`) and prints it: as text, or the admin port's JSON with `json`.
pub async fn inspect(access: AdminAccess, url: String, host: Option<String>, json: bool) -> anyhow::Result<u8> {
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("url", &url);
    if let Some(host) = &host {
        query.append_pair("host", host);
    }
    let body = access
        .call(reqwest::Method::GET, &format!("/objects?{}", query.finish()), "inspect")
        .await?;
    if json {
        print!("{body}");
        return Ok(0);
    }
    let report: crate::inspect::Report =
        serde_json::from_str(&body).context("the admin port answered something other than a report")?;
    print!("{}", report.to_text());
    Ok(0)
}

/// The admin address by default, from the configuration table (not by validating a whole
/// default configuration, which depends on the machine).
fn default_admin_listen() -> std::net::SocketAddr {
    RawConfig::DEFAULTS
        .iter()
        .find(|(key, _)| *key == "admin_listen")
        .and_then(|(_, addr)| addr.parse().ok())
        .expect("the table's admin_listen default is an address")
}
