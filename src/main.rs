//! The `sidecache` command: CLI dispatch. Configuration is loaded and validated before any port
//! is bound; a bad configuration exits with status 64.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use sidecache::config::{Config, Loader, LogFormat};
use sidecache::prime;
use sidecache::sidecar::Sidecar;
use sidecache::supervise::{self, App};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Exit status for a configuration error (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "sidecache",
    version,
    about = "A caching reverse-proxy sidecar for static assets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy in front of the app; with `-- <command>`, start and supervise the app too.
    Serve {
        #[command(flatten)]
        opts: ConfigOpts,
        /// Prime in the background once the app is ready: a manifest (.json) or a URL list.
        #[arg(long, value_name = "FILE")]
        prime: Option<PathBuf>,
        /// The public Host for --prime (part of the cache key).
        #[arg(long, value_name = "HOST", requires = "prime")]
        prime_host: Option<String>,
        /// The app to start and supervise (gets PORT set to the upstream port).
        #[arg(last = true)]
        app: Vec<String>,
    },
    /// Warm this instance's cache through the sidecar's admin port (from deploy hooks).
    Prime(PrimeArgs),
    /// Validate the configuration (file, environment, flags) and print it.
    CheckConfig {
        #[command(flatten)]
        opts: ConfigOpts,
    },
    /// Purge cached objects through the admin port: one URL, a prefix, or everything.
    Purge {
        /// One URL: a path (`/app.js?v=1`, any host) or a full `http://host/path` URL.
        #[arg(long, conflicts_with_all = ["prefix", "all"])]
        url: Option<String>,
        /// Every URL whose path (or full URL) starts with this.
        #[arg(long, conflicts_with = "all")]
        prefix: Option<String>,
        /// Everything.
        #[arg(long)]
        all: bool,
        /// The sidecar's admin address [default: the configuration's admin_listen].
        #[arg(long)]
        target: Option<String>,
        /// Admin bearer token [default: SIDECACHE_ADMIN_TOKEN, else the configuration's].
        #[arg(long, env = "SIDECACHE_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// The sidecar's YAML configuration, for its admin address and token (also
        /// SIDECACHE_CONFIG).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Run a built-in sample origin with the sidecar in front of it.
    Demo {
        /// Public address of the demo sidecar.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Admin address of the demo sidecar.
        #[arg(long, default_value = "127.0.0.1:9090")]
        admin_listen: String,
    },
}

/// `sidecache prime` flags.
#[derive(Args)]
struct PrimeArgs {
    /// The sidecar's admin address [default: the configuration's admin_listen].
    #[arg(long)]
    target: Option<String>,
    /// Admin bearer token [default: SIDECACHE_ADMIN_TOKEN, else the configuration's].
    #[arg(long, env = "SIDECACHE_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The sidecar's YAML configuration, for its admin address and token (also
    /// SIDECACHE_CONFIG).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The public Host your users reach the app by (part of the cache key).
    #[arg(long)]
    host: Option<String>,
    /// One URL or path a line; `-` for standard input.
    #[arg(long, value_name = "FILE", group = "input")]
    urls: Option<PathBuf>,
    /// Every file under this folder (the app's built public assets), under --prefix.
    #[arg(long, value_name = "DIR", group = "input", requires = "prefix")]
    dir: Option<PathBuf>,
    /// An asset manifest: webpack, Vite, Sprockets, Propshaft or Django (detected).
    #[arg(long, value_name = "FILE", group = "input")]
    manifest: Option<PathBuf>,
    /// A sitemap or sitemap index URL.
    #[arg(long, value_name = "URL", group = "input")]
    sitemap: Option<String>,
    /// URL prefix for --dir, or to override a manifest format's default.
    #[arg(long)]
    prefix: Option<String>,
    /// Fill from this base URL (the CDN or bucket the build uploaded to) instead of the app.
    #[arg(long, value_name = "URL")]
    from: Option<String>,
    /// Objects the sidecar fetches at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Extra rounds for failed objects (with backoff).
    #[arg(long, default_value_t = 3)]
    retries: u32,
    /// Time limit per object.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// How long to wait for the sidecar to be ready.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    wait: Duration,
    /// Failures tolerated before the exit status is non-zero.
    #[arg(long, default_value_t = 0)]
    max_failures: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

impl PrimeArgs {
    fn input(&self) -> Option<prime::Input> {
        if let Some(p) = &self.urls {
            return Some(prime::Input::Urls(p.clone()));
        }
        if let Some(dir) = &self.dir {
            let prefix = self.prefix.clone().unwrap_or_else(|| "/".into());
            return Some(prime::Input::Dir {
                dir: dir.clone(),
                prefix,
            });
        }
        if let Some(path) = &self.manifest {
            return Some(prime::Input::Manifest {
                path: path.clone(),
                prefix: self.prefix.clone(),
            });
        }
        self.sitemap.clone().map(prime::Input::Sitemap)
    }
}

/// How `prime` and `purge` reach this instance's sidecar: its admin address and token, from
/// the flags, else from the configuration the sidecar reads (file, `SIDECACHE_*`).
struct AdminAccess {
    target: String,
    token: Option<String>,
}

impl AdminAccess {
    fn resolve(target: Option<String>, token: Option<String>, config: Option<PathBuf>) -> AdminAccess {
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
            let mut addr = loaded.as_ref().map_or_else(
                || std::net::SocketAddr::from(([127, 0, 0, 1], 9090)),
                |c| c.admin_listen,
            );
            // A wildcard listener is reached on loopback from this instance.
            if addr.ip().is_unspecified() {
                addr.set_ip(match addr.ip() {
                    std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            format!("http://{addr}")
        });
        let token = token.or_else(|| loaded.and_then(|c| c.admin_token));
        AdminAccess { target, token }
    }
}

async fn prime_command(args: PrimeArgs) -> anyhow::Result<u8> {
    let Some(input) = args.input() else {
        anyhow::bail!("prime needs one of --urls, --dir, --manifest or --sitemap");
    };
    let client = sidecache::http_client().timeout(Duration::from_secs(30)).build()?;
    let urls = prime::collect(&input, &client).await?;
    let access = AdminAccess::resolve(args.target, args.token, args.config);
    let opts = prime::Options {
        target: access.target,
        token: access.token,
        host: args.host,
        from: args.from,
        concurrency: args.concurrency.clamp(1, 64),
        retries: args.retries,
        timeout: args.timeout,
        wait: args.wait,
        max_failures: args.max_failures,
        json: args.json,
    };
    let summary = prime::run(urls, &opts).await?;
    if opts.json {
        println!("{}", summary.json());
    } else {
        println!("{}", summary.line());
    }
    for (url, why) in &summary.failed {
        eprintln!("failed: {url}: {why}");
    }
    Ok(if summary.failed.len() > opts.max_failures { 1 } else { 0 })
}

/// `serve --prime`: warms the listed objects in-process once serving has begun.
async fn prime_in_background(proxy: std::sync::Arc<sidecache::proxy::Proxy>, file: PathBuf, host: Option<String>) {
    let input = if file.extension().is_some_and(|e| e == "json") {
        prime::Input::Manifest {
            path: file.clone(),
            prefix: None,
        }
    } else {
        prime::Input::Urls(file.clone())
    };
    let urls = match async { prime::collect(&input, &sidecache::http_client().build()?).await }.await {
        Ok(urls) => urls,
        Err(e) => {
            warn!(error = format!("{e:#}"), file = %file.display(), "priming skipped");
            return;
        }
    };
    // Fills are accepted once the index has counted what is on disk.
    while !proxy.cache.is_loaded() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let host = host.unwrap_or_else(|| "localhost".into());
    let started = std::time::Instant::now();
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(8));
    let mut tasks = tokio::task::JoinSet::new();
    for url in urls {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let (proxy, host) = (proxy.clone(), host.clone());
        tasks.spawn(async move {
            let result = proxy.warm(&host, &url, None).await;
            drop(permit);
            (url, result)
        });
    }
    let (mut warmed, mut warm, mut failed) = (0, 0, 0);
    while let Some(Ok((url, result))) = tasks.join_next().await {
        match result {
            sidecache::proxy::WarmResult::Warmed { .. } => warmed += 1,
            sidecache::proxy::WarmResult::AlreadyWarm { .. } => warm += 1,
            sidecache::proxy::WarmResult::Failed(why) => {
                failed += 1;
                warn!(path = %url.split('?').next().unwrap_or(""), reason = %why, "prime failed");
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

/// Flags shared by `serve` and `check-config`; each overrides its config key.
#[derive(Args, Default)]
struct ConfigOpts {
    /// YAML configuration file (also SIDECACHE_CONFIG).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Public listen address (key `listen`).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// The app's URL, e.g. http://127.0.0.1:3000 (key `upstream`).
    #[arg(long, value_name = "URL")]
    upstream: Option<String>,
    /// Cache directory (key `cache_dir`).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<String>,
    /// Disk budget, e.g. 4GB or 512MiB (key `max_size`).
    #[arg(long, value_name = "SIZE")]
    max_size: Option<String>,
    /// Largest object kept (key `max_object_size`).
    #[arg(long, value_name = "SIZE")]
    max_object_size: Option<String>,
    /// Hot tier size; 0 turns it off (key `memory_size`).
    #[arg(long, value_name = "SIZE")]
    memory_size: Option<String>,
    /// Admin listen address (key `admin_listen`).
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<String>,
    /// Drain period on SIGTERM, e.g. 25s (key `grace_period`).
    #[arg(long, value_name = "DURATION")]
    grace_period: Option<String>,
    /// `text` or `json` (key `log_format`).
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,
    /// Log filter, e.g. info or debug (key `log_level`).
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
}

impl ConfigOpts {
    fn load(self) -> Result<Config, sidecache::config::ConfigError> {
        let flags = [
            ("listen", self.listen),
            ("upstream", self.upstream),
            ("cache_dir", self.cache_dir),
            ("max_size", self.max_size),
            ("max_object_size", self.max_object_size),
            ("memory_size", self.memory_size),
            ("admin_listen", self.admin_listen),
            ("grace_period", self.grace_period),
            ("log_format", self.log_format),
            ("log_level", self.log_level),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect();
        Loader::new(std::env::vars()).file(self.config).flags(flags).load()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { opts } => match opts.load() {
            Ok(config) => {
                println!("configuration is valid\n{config:#?}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("sidecache: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Prime(args) => run_async(prime_command(args)),
        Command::Serve {
            opts,
            app,
            prime,
            prime_host,
        } => {
            let config = match opts.load() {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("sidecache: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            init_logging(&config);
            // Before the cache sizes its open tier from the limit.
            match sidecache::cache::mmap::raise_descriptor_limit() {
                Ok((before, after)) if before != after => info!(before, after, "raised the descriptor limit"),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "could not raise the descriptor limit"),
            }
            let prime = prime.map(|file| (file, prime_host));
            // This thread's loop is the first serving loop (see `Sidecar::serve`) and runs the
            // background work; the others get their own threads.
            let blocking = sidecache::sidecar::blocking_threads(config.workers);
            run_on(
                tokio::runtime::Builder::new_current_thread().max_blocking_threads(blocking),
                serve(config, app, prime),
            )
        }
        Command::Purge {
            url,
            prefix,
            all,
            target,
            token,
            config,
        } => {
            let query = match (url, prefix, all) {
                (Some(u), _, _) => ("url", u),
                (_, Some(p), _) => ("prefix", p),
                (_, _, true) => ("all", "true".to_owned()),
                _ => {
                    eprintln!("sidecache: purge needs --url, --prefix or --all");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let access = AdminAccess::resolve(target, token, config);
            run_async(purge(access.target, query, access.token))
        }
        Command::Demo { listen, admin_listen } => {
            let flags = vec![("listen", listen), ("admin_listen", admin_listen)];
            let config = match Loader::new(std::env::vars()).flags(flags).load() {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("sidecache: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            init_logging(&config);
            run_async(demo(config))
        }
    }
}

fn run_async(fut: impl std::future::Future<Output = anyhow::Result<u8>>) -> ExitCode {
    // File steps are short; a bounded pool keeps a burst of fills from spawning hundreds of
    // threads (and their allocator arenas).
    run_on(
        tokio::runtime::Builder::new_multi_thread().max_blocking_threads(64),
        fut,
    )
}

fn run_on(
    builder: &mut tokio::runtime::Builder,
    fut: impl std::future::Future<Output = anyhow::Result<u8>>,
) -> ExitCode {
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("sidecache: failed to start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fut) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            error!("{e:#}");
            eprintln!("sidecache: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stdout);
    match config.log_format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// Resolves on the first SIGTERM or SIGINT, naming it.
async fn termination() -> anyhow::Result<i32> {
    let mut term = signal(SignalKind::terminate()).context("failed to install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("failed to install SIGINT handler")?;
    Ok(tokio::select! {
        _ = term.recv() => libc::SIGTERM,
        _ = int.recv() => libc::SIGINT,
    })
}

async fn serve(
    mut config: Config,
    app_command: Vec<String>,
    prime: Option<(PathBuf, Option<String>)>,
) -> anyhow::Result<u8> {
    let mut app = None;
    if !app_command.is_empty() {
        // With no explicit upstream port for the app, give it a free loopback port.
        if config.upstream.port() == 3000 && std::env::var_os("SIDECACHE_UPSTREAM").is_none() {
            let port = supervise::free_port().context("failed to find a free port for the app")?;
            config.upstream =
                sidecache::config::Upstream::parse(&format!("http://127.0.0.1:{port}")).map_err(anyhow::Error::msg)?;
        }
        app = Some(App::spawn(&app_command, config.upstream.port())?);
    }

    let app_start_timeout = config.app_start_timeout;
    let upstream_host = config.upstream.authority.host().to_owned();
    let upstream_port = config.upstream.port();
    let sidecar = Sidecar::start(config)
        .await
        .context("failed to start the admin listener")?;
    let signals = termination();
    tokio::pin!(signals);

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
            sig = &mut signals => {
                app.signal(sig?);
                let status = app.wait().await?;
                return Ok(supervise::exit_code(status) as u8);
            }
        }
    }

    let listener = sidecar
        .bind_public()
        .await
        .context("failed to bind the public listener")?;
    if let Some((file, host)) = prime {
        tokio::spawn(prime_in_background(sidecar.proxy.clone(), file, host));
    }
    let serving = sidecar.serve(listener);
    tokio::pin!(serving);

    let mut app_status = None;
    tokio::select! {
        _ = &mut serving => {}
        sig = &mut signals => {
            let sig = sig?;
            info!(signal = sig, "shutting down");
            if let Some(app) = app.as_ref() {
                app.signal(sig);
            }
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
            None => app.wait().await?,
        };
        info!(status = %status, "app exited");
        return Ok(supervise::exit_code(status).clamp(0, 255) as u8);
    }
    Ok(0)
}

async fn wait_app(app: &mut Option<App>) -> std::io::Result<std::process::ExitStatus> {
    match app {
        Some(app) => app.wait().await,
        None => std::future::pending().await,
    }
}

async fn purge(target: String, query: (&'static str, String), token: Option<String>) -> anyhow::Result<u8> {
    let client = sidecache::http_client().timeout(Duration::from_secs(30)).build()?;
    let encoded = form_urlencoded::Serializer::new(String::new())
        .append_pair(query.0, &query.1)
        .finish();
    let url = format!("{}/purge?{encoded}", target.trim_end_matches('/'));
    let mut req = client.post(&url);
    if let Some(token) = token.filter(|t| !t.is_empty()) {
        req = req.bearer_auth(token);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("failed to reach the admin port at {target}"))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("purge refused ({status}): {}", body.trim());
    }
    print!("{body}");
    Ok(0)
}

async fn demo(mut config: Config) -> anyhow::Result<u8> {
    let origin = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let origin_addr = origin.local_addr()?;
    config.upstream =
        sidecache::config::Upstream::parse(&format!("http://{origin_addr}")).map_err(anyhow::Error::msg)?;
    config.cache_dir = std::env::temp_dir().join(format!("sidecache-demo-{}", std::process::id()));
    let stop = CancellationToken::new();
    tokio::spawn(sidecache::demo::run_origin(origin, stop.clone()));
    let sidecar = Sidecar::start(config)
        .await
        .context("failed to start the admin listener")?;
    let listener = sidecar
        .bind_public()
        .await
        .context("failed to bind the public listener")?;
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
        sig = termination() => {
            sig?;
            sidecar.shutdown.cancel();
            serving.await;
        }
    }
    stop.cancel();
    Ok(0)
}
