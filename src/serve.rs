//! The `serve` subcommand, from a validated configuration to an exit status: start and supervise
//! the app (`serve -- <command>`), start the sidecar, bind the public port once the app is
//! ready, prime in the background (`--prime FILE`), and shut down on SIGTERM/SIGINT/SIGQUIT
//! (stop accepting, drain, then stop the app, killing it after `grace_period`) or when the app
//! exits (its status becomes ours). `main` only parses the command line and calls [`run`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tracing::{error, info, warn};

use crate::config::{Config, Effective, Loader};
use crate::prime::protocol::WarmResult;
use crate::prime::warm::{Job, warm_all};
use crate::prime::{self, Input};
use crate::proxy::Proxy;
use crate::sidecar::Sidecar;
use crate::supervise::{self, App, Reaper, Termination};

/// `serve --prime FILE --prime-host HOST`: what to warm once serving has begun.
#[derive(Debug, Clone)]
pub struct PrimeFile {
    /// A manifest (`.json`, format detected) or a URL list.
    pub file: PathBuf,
    /// The public Host for paths in it [default: `localhost`].
    pub host: Option<prime::PublicHost>,
}

/// Sets the log filter in force (`main`'s subscriber); an error says why the filter was not
/// taken.
pub type LogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// What a SIGHUP needs: how the configuration was loaded (to load it again), its effective
/// values in force, and the log filter's handle.
pub struct Reload {
    /// The same file, environment and flags as at startup.
    pub loader: Loader,
    /// The effective configuration in force.
    pub effective: Effective,
    /// Sets the log level.
    pub log: LogLevel,
}

impl Reload {
    /// Loads the configuration again and puts what can change live in force (see
    /// [`crate::reload`]); logs what changed, what waits for a restart, or why the new
    /// configuration was refused (the one in force is then kept whole).
    fn run(&mut self, sidecar: &Sidecar) {
        info!(signal = "SIGHUP", "reloading the configuration");
        let (config, effective) = match self.loader.clone().load_explained() {
            Ok(loaded) => loaded,
            Err(e) => {
                error!(error = %e, "reload refused; the configuration in force is kept");
                return;
            }
        };
        let done = crate::reload::apply(&sidecar.live, &mut self.effective, &config, &effective);
        for (key, from, to) in &done.applied {
            info!(key, from = %from, to = %to, "reload: applied");
            match *key {
                "log_level" => {
                    if let Err(e) = (self.log)(&config.log_level) {
                        warn!(error = %e, "reload: log level not changed");
                    }
                }
                "max_connections" => sidecar.resize_connection_limit(config.max_connections),
                _ => {}
            }
        }
        if !done.restart.is_empty() {
            warn!(
                keys = done.restart.join(", "),
                "reload: these keys changed but take effect only at a restart; not applied"
            );
        }
        info!(applied = done.applied.len(), "configuration reloaded");
    }
}

/// Serves until a signal or the app's exit; returns the process's exit status (the app's, when
/// there is one). SIGHUP reloads the configuration through `reload`.
pub async fn run(
    mut config: Config,
    app_command: Vec<String>,
    prime: Option<PrimeFile>,
    mut reload: Reload,
) -> anyhow::Result<u8> {
    // Before the cache sizes its open tier from the limit.
    let descriptors = match crate::limits::raise_descriptor_limit() {
        Ok((before, after)) => {
            if before != after {
                info!(before, after, "raised the descriptor limit");
            }
            Some(after)
        }
        Err(e) => {
            warn!(error = %e, "could not raise the descriptor limit");
            None
        }
    };
    log_start(&config, descriptors);
    // First: a signal that arrives from here on is held until it is received below.
    let mut signals = Termination::install().context("failed to install the signal handlers")?;
    let mut app = None;
    if !app_command.is_empty() {
        // With no explicit upstream port for the app, give it a free loopback port.
        if config.upstream_is_default {
            let port = supervise::free_port().context("failed to find a free port for the app")?;
            config.upstream =
                crate::config::Upstream::parse(&format!("http://127.0.0.1:{port}")).map_err(anyhow::Error::msg)?;
        }
        // Before the app exists: every child it leaves behind is reaped (see `Reaper`).
        let reaper = Reaper::start().context("failed to install the SIGCHLD handler")?;
        app = Some(App::spawn(
            &app_command,
            config.upstream.port(),
            &config.secret_variables(),
            &reaper,
            &signals,
        )?);
    }

    let app_start_timeout = config.app_start_timeout;
    let upstream_host = config.upstream.authority.host().to_owned();
    let upstream_port = config.upstream.port();
    let sidecar = Sidecar::start(config).await.context("failed to start the sidecar")?;

    // The grace period in force when it is needed (a reload may change it).
    let grace = || sidecar.live.current().config().grace_period;
    if let Some(app) = app.as_mut() {
        tokio::select! {
            ready = app.wait_ready(&upstream_host, upstream_port, app_start_timeout) => {
                if let Err(e) = ready {
                    error!(error = %e, "app failed to start");
                    return Ok(match e {
                        supervise::StartError::Exited { status } => supervise::exit_code(status).clamp(1, 255) as u8,
                        _ => { app.signal(libc::SIGKILL); 1 }
                    });
                }
                info!(port = upstream_port, "app ready");
            }
            stop = signals.stop(|| reload.run(&sidecar)) => {
                info!(signal = stop.as_str(), "shutting down");
                let status = app.stop(stop.forwarded(), grace()).await?;
                return Ok(supervise::exit_code(status) as u8);
            }
        }
    }

    let listener = sidecar.bind_public().await?;
    if let Some(prime) = prime {
        tokio::spawn(prime_in_background(sidecar.proxy.clone(), prime));
    }
    let serving = sidecar.serve(listener);
    tokio::pin!(serving);

    let mut app_status = None;
    let mut stop_signal = libc::SIGTERM;
    tokio::select! {
        _ = &mut serving => {}
        stop = signals.stop(|| reload.run(&sidecar)) => {
            info!(signal = stop.as_str(), "shutting down");
            stop_signal = stop.forwarded();
            // The app keeps running while the requests in flight finish: it is stopped below,
            // once the drain is over (a request still in the app must not get a 502).
            sidecar.shutdown.cancel();
            let drained = serving.await;
            if !drained {
                warn!("some requests were cut off at the end of the grace period");
            }
        }
        status = wait_app(&mut app) => {
            let status = status?;
            warn!(status = %status, "app exited; shutting down");
            app_status = Some(status);
            sidecar.shutdown.cancel();
            let grace = Duration::from_secs(2);
            let _ = tokio::time::timeout(grace, serving).await;
        }
    }
    if let Some(mut app) = app {
        let status = match app_status {
            Some(status) => status,
            None => app.stop(stop_signal, grace()).await?,
        };
        info!(status = %status, "app exited");
        return Ok(supervise::exit_code(status).clamp(0, 255) as u8);
    }
    Ok(0)
}

/// The first line of a run: the version and the limits in force, so a log shows what this
/// process was allowed (sizes in bytes, durations as configured).
fn log_start(config: &Config, descriptors: Option<u64>) {
    let human = |d: Duration| humantime::format_duration(d).to_string();
    let min_free = match config.min_free {
        crate::units::MinFree::Bytes(b) => b.to_string(),
        crate::units::MinFree::Percent(p) => format!("{p}%"),
    };
    info!(
        version = %env!("CARGO_PKG_VERSION"),
        max_size = config.max_size,
        min_free = %min_free,
        max_objects = config.max_objects,
        max_object_size = config.max_object_size,
        memory_size = config.memory_size,
        max_connections = config.max_connections,
        workers = config.workers,
        descriptors = %descriptors.map_or_else(|| "unknown".to_owned(), |n| n.to_string()),
        grace_period = %human(config.grace_period),
        upstream_timeout = %human(config.upstream_timeout),
        max_header_size = config.max_header_size,
        "sidecache starting"
    );
}

async fn wait_app(app: &mut Option<App>) -> std::io::Result<std::process::ExitStatus> {
    match app {
        Some(app) => app.wait().await,
        None => std::future::pending().await,
    }
}

/// `serve --prime`: warms the listed objects through the same loop as `POST /prime`, once
/// serving has begun, and logs the tally.
async fn prime_in_background(proxy: Arc<Proxy>, prime: PrimeFile) {
    let PrimeFile { file, host } = prime;
    let input = if file.extension().is_some_and(|e| e == "json") {
        Input::Manifest {
            path: file.clone(),
            prefix: None,
        }
    } else {
        Input::Urls(file.clone())
    };
    let urls = match prime::collect(&input) {
        Ok(urls) => match &host {
            Some(host) => urls.iter().map(|u| host.target(u)).collect(),
            None => urls,
        },
        Err(e) => {
            warn!(error = format!("{e:#}"), file = %file.display(), "priming skipped");
            return;
        }
    };
    // Fills are accepted once the index has counted what is on disk.
    while !proxy.cache().is_loaded() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = std::time::Instant::now();
    let job = Job {
        host: host.map_or_else(|| "localhost".into(), |h| h.authority),
        from: None,
        concurrency: prime::warm::CONCURRENCY,
        timeout: prime::warm::OBJECT_TIMEOUT,
    };
    let mut lines = warm_all(proxy, urls, job);
    let (mut warmed, mut warm, mut failed) = (0, 0, 0);
    while let Some(line) = lines.recv().await {
        match line.result {
            WarmResult::Warmed { .. } => warmed += 1,
            WarmResult::AlreadyWarm { .. } => warm += 1,
            WarmResult::Failed(why) => {
                failed += 1;
                warn!(path = %line.url.split('?').next().unwrap_or(""), reason = %why, "prime failed");
            }
        }
    }
    info!(
        warmed,
        warm,
        failed,
        seconds = started.elapsed().as_secs_f64(),
        "primed"
    );
}
