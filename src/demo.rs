//! A built-in sample origin for `sidecache demo`: a few static assets with the caching headers
//! real apps send (and one dynamic endpoint), so the sidecar can be tried with nothing else
//! running.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::body::{self, ProxyBody};

/// One sample asset.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    cache_control: &'static str,
    body: Bytes,
}

fn assets() -> Vec<Asset> {
    let js = "console.log('hello from sidecache demo');\n".repeat(400);
    let css = "body { font-family: sans-serif; color: #222; }\n".repeat(300);
    let svg = r##"<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><circle cx="32" cy="32" r="30" fill="#3b82f6"/></svg>"##;
    vec![
        Asset {
            path: "/assets/app-3f2a9c81.js",
            content_type: "application/javascript",
            cache_control: "public, max-age=31536000, immutable",
            body: Bytes::from(js),
        },
        Asset {
            path: "/assets/style.css",
            content_type: "text/css",
            cache_control: "public, max-age=3600",
            body: Bytes::from(css),
        },
        Asset {
            path: "/images/logo.svg",
            content_type: "image/svg+xml",
            cache_control: "public, max-age=86400",
            body: Bytes::from_static(svg.as_bytes()),
        },
    ]
}

/// Serves the sample origin on `listener` until `shutdown` is cancelled.
pub async fn run_origin(listener: TcpListener, shutdown: CancellationToken) {
    let assets = Arc::new(assets());
    let served = Arc::new(AtomicU64::new(0));
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let assets = assets.clone();
        let served = served.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let assets = assets.clone();
                let served = served.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&assets, &served, req)) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(assets: &[Asset], served: &AtomicU64, req: Request<Incoming>) -> Response<ProxyBody> {
    let n = served.fetch_add(1, Ordering::Relaxed) + 1;
    let path = req.uri().path();
    if let Some(asset) = assets.iter().find(|a| a.path == path) {
        let mut resp = Response::new(body::full(asset.body.clone()));
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static(asset.cache_control));
        h.insert(
            header::ETAG,
            HeaderValue::from_str(&format!("\"{}\"", blake3::hash(&asset.body).to_hex()[..16].to_owned()))
                .expect("hex is a valid header"),
        );
        return resp;
    }
    let (status, content_type, text) = match path {
        "/" => (
            StatusCode::OK,
            "text/html; charset=utf-8",
            format!(
                "<!doctype html><title>sidecache demo</title><h1>sidecache demo origin</h1>\
                 <p>The origin has answered {n} requests. Reload an asset: the count stops growing \
                 because the sidecar serves it from its cache (see the Cache-Status header).</p><ul>{}</ul>\
                 <p><a href=\"/api/time\">/api/time</a> is dynamic and never cached.</p>",
                assets
                    .iter()
                    .map(|a| format!("<li><a href=\"{0}\">{0}</a></li>", a.path))
                    .collect::<String>()
            ),
        ),
        "/api/time" => (
            StatusCode::OK,
            "application/json",
            format!(
                "{{\"now\":\"{}\",\"origin_requests\":{n}}}\n",
                httpdate::fmt_http_date(std::time::SystemTime::now())
            ),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found\n".to_owned(),
        ),
    };
    let mut resp = Response::new(body::full(text));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// `sidecache demo`: this sample origin on a free loopback port with a sidecar in front of it,
/// until SIGTERM or SIGINT. Its cache lives in a directory of its own under the system temp
/// dir, removed when the demo ends.
pub async fn run(mut config: crate::config::Config) -> anyhow::Result<u8> {
    let dir = std::env::temp_dir().join(format!("sidecache-demo-{}", std::process::id()));
    config.cache_dir = dir.clone();
    let result = serve(config).await;
    // The sidecar and its tasks are gone: nothing writes there any more.
    match tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not remove the demo's cache directory"),
        Err(e) => tracing::warn!(error = %e, "could not remove the demo's cache directory"),
    }
    result
}

async fn serve(mut config: crate::config::Config) -> anyhow::Result<u8> {
    let mut signals = crate::supervise::Termination::install().context("failed to install the signal handlers")?;
    let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let origin_addr = origin.local_addr()?;
    config.upstream = crate::config::Upstream::parse(&format!("http://{origin_addr}")).map_err(anyhow::Error::msg)?;
    let stop = CancellationToken::new();
    tokio::spawn(run_origin(origin, stop.clone()));
    let sidecar = crate::sidecar::Sidecar::start(config)
        .await
        .context("failed to start the sidecar")?;
    let listener = sidecar.bind_public().await?;
    let public = listener.local_addr()?;
    println!("\nsidecache demo: a sample app on {origin_addr}, the sidecar in front of it.");
    println!("  try:      curl -si http://{public}/assets/app-3f2a9c81.js | head -12   (twice: miss, then hit)");
    println!("  browse:   http://{public}/");
    println!(
        "  metrics:  curl -s http://{}/metrics | grep sidecache_requests",
        sidecar.admin_addr()
    );
    println!("  stop:     Ctrl-C\n");
    let serving = sidecar.serve(listener);
    tokio::pin!(serving);
    tokio::select! {
        _ = &mut serving => {}
        _ = signals.stop(|| tracing::info!("the demo does not reload")) => {
            sidecar.shutdown.cancel();
            serving.await;
        }
    }
    stop.cancel();
    Ok(0)
}
