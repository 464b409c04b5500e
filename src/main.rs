//! The `sidecache` command: CLI dispatch. Configuration is loaded and validated before any port
//! is bound; a bad configuration exits with status 64.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use sidecache::admin::client::{self, AdminAccess};
use sidecache::config::{Config, Loader, LogFormat};
use sidecache::{prime, serve, supervise};
use tracing::error;

/// mimalloc in place of glibc's malloc: every request allocates (hyper's buffers, the answer's
/// head and body), and mimalloc's per-thread heaps serve that from local free lists (with huge
/// pages, 1.17x on mixed, user time 11.9 -> 9.4 µs per request; built without them, Cargo.toml
/// says why).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// Check the configuration and exit, as `nginx -t` (the same as `check-config`).
        #[arg(short = 't', long = "test")]
        test: bool,
        /// Prime in the background once the app is ready: a manifest (.json) or a URL list.
        #[arg(long, value_name = "FILE")]
        prime: Option<PathBuf>,
        /// The public Host for --prime (part of the cache key).
        #[arg(long, value_name = "HOST", requires = "prime", value_parser = prime::PublicHost::parse)]
        prime_host: Option<prime::PublicHost>,
        /// The app to start and supervise (gets PORT set to the upstream port).
        #[arg(last = true)]
        app: Vec<String>,
    },
    /// Warm this instance's cache through the sidecar's admin port (from deploy hooks).
    Prime(PrimeArgs),
    /// Validate the configuration (file, environment, flags) and print the effective one as
    /// YAML, each value's source beside it (also `serve -t`).
    CheckConfig {
        #[command(flatten)]
        opts: ConfigOpts,
    },
    /// Purge cached objects through the admin port: one URL, a prefix, tags, or everything.
    Purge {
        /// A URL: a path (`/app.js?v=1`, any host) or a full `http://host/path` URL; repeat
        /// for several.
        #[arg(long, conflicts_with_all = ["prefix", "all", "tag"])]
        url: Vec<String>,
        /// Every URL whose path (or full URL) starts with this (`assets` means `/assets`).
        #[arg(long, conflicts_with_all = ["all", "tag"])]
        prefix: Option<String>,
        /// Every object carrying this tag (`Surrogate-Key`, `Cache-Tag`); repeat for any of
        /// several.
        #[arg(long, conflicts_with = "all")]
        tag: Vec<String>,
        /// Everything.
        #[arg(long)]
        all: bool,
        /// Mark the objects stale instead of removing them: the next request revalidates with
        /// the app, and they still stand in for it if it fails (stale-if-error).
        #[arg(long)]
        soft: bool,
        #[command(flatten)]
        admin: AdminOpts,
    },
    /// Show what is stored for a URL, and why a request would or would not be served from it.
    Inspect {
        /// A path (`/app.js?v=1`, any host) or a full `http://host/path` URL.
        url: String,
        /// Only objects stored for this Host.
        #[arg(long)]
        host: Option<String>,
        /// Print the admin port's JSON instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminOpts,
    },
    /// Run a built-in sample origin with the sidecar in front of it.
    Demo {
        /// Public address of the demo sidecar.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Admin address of the demo sidecar [default: the configuration's admin_listen].
        #[arg(long)]
        admin_listen: Option<String>,
    },
}

/// How `prime`, `purge` and `inspect` reach the sidecar's admin port.
#[derive(Args)]
struct AdminOpts {
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
}

impl AdminOpts {
    /// The admin address and token; `None` (reported) when `--target` is not an address.
    fn resolve(self) -> Option<AdminAccess> {
        AdminAccess::resolve(self.target, self.token, self.config)
            .map_err(|e| eprintln!("sidecache: {e}"))
            .ok()
    }
}

/// `sidecache prime` flags.
#[derive(Args)]
struct PrimeArgs {
    #[command(flatten)]
    admin: AdminOpts,
    /// The public Host your users reach the app by (part of the cache key): www.example.com,
    /// or https://www.example.com to key by that scheme too.
    #[arg(long, value_parser = prime::PublicHost::parse)]
    host: Option<prime::PublicHost>,
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
    #[arg(long, default_value_t = prime::warm::CONCURRENCY)]
    concurrency: usize,
    /// Extra rounds for failed objects (with backoff).
    #[arg(long, default_value_t = 3)]
    retries: u32,
    /// Time limit per object (`30s`, `2m`; a bare number is seconds).
    #[arg(long, default_value = "30s", value_parser = seconds_or_duration)]
    timeout: Duration,
    /// How long to wait for the sidecar to be ready (`120s`, `2m`; a bare number is seconds,
    /// as `grace_period: 3` is).
    #[arg(long, default_value = "120s", value_parser = seconds_or_duration)]
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

/// A duration as the configuration writes one: `25s`, `2m`, or a bare number of seconds.
fn seconds_or_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text).map_err(|e| format!("`{text}` is not a duration such as 30s or 2m: {e}"))
}

async fn prime_command(args: PrimeArgs) -> anyhow::Result<u8> {
    let Some(input) = args.input() else {
        eprintln!("sidecache: prime needs one of --urls, --dir, --manifest or --sitemap");
        return Ok(EXIT_CONFIG);
    };
    let Some(access) = args.admin.resolve() else {
        return Ok(EXIT_CONFIG);
    };
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
    prime::command(&input, &opts).await
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
    /// Shared tier in object storage, s3://BUCKET/PREFIX (key `shared_tier`).
    #[arg(long, value_name = "URL")]
    shared_tier: Option<String>,
}

impl ConfigOpts {
    /// The loader over these flags, the file and the environment (kept by `serve` to load the
    /// configuration again on SIGHUP).
    fn loader(self) -> Loader {
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
            ("shared_tier", self.shared_tier),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k, v)))
        .collect();
        Loader::new(std::env::vars()).file(self.config).flags(flags)
    }
}

/// Prints `text` to standard output; a reader that went away (`check-config | head`) ends the
/// output quietly instead of a panic.
fn print_out(text: &str) -> ExitCode {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sidecache: failed to write to standard output: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `check-config` and `serve -t`: the effective configuration as YAML on standard output, the
/// verdict on standard error (as `nginx -t`).
fn check_config(opts: ConfigOpts) -> ExitCode {
    match opts.loader().load_explained() {
        Ok((_, effective)) => {
            eprintln!("sidecache: configuration is valid");
            print_out(&effective.to_yaml())
        }
        Err(e) => {
            eprintln!("sidecache: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn main() -> ExitCode {
    // `serve -- <app>` starts the app through this binary (see `supervise::launch`).
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|first| first == supervise::LAUNCH) {
        return supervise::launch(args);
    }
    // Bad usage exits 64 (EX_USAGE), as a bad configuration does; help and version exit 0.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_CONFIG } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.command {
        Command::CheckConfig { opts } => check_config(opts),
        Command::Prime(args) => run_async(prime_command(args)),
        Command::Serve { opts, test: true, .. } => check_config(opts),
        Command::Serve {
            opts,
            app,
            prime,
            prime_host,
            test: false,
        } => {
            let loader = opts.loader();
            let (config, effective) = match loader.clone().load_explained() {
                Ok(loaded) => loaded,
                Err(e) => {
                    eprintln!("sidecache: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let log = init_logging(&config);
            let prime = prime.map(|file| serve::PrimeFile { file, host: prime_host });
            // This thread's loop is the first serving loop (see `Sidecar::serve`) and runs the
            // background work; the others get their own threads.
            let blocking = sidecache::sidecar::blocking_threads(config.workers);
            let reload = serve::Reload { loader, effective, log };
            run_logged(
                tokio::runtime::Builder::new_current_thread().max_blocking_threads(blocking),
                serve::run(config, app, prime, reload),
            )
        }
        Command::Purge {
            url,
            prefix,
            tag,
            all,
            soft,
            admin,
        } => {
            let selectors: Vec<Vec<(&'static str, String)>> = match (url.is_empty(), prefix, all) {
                (false, _, _) => url.into_iter().map(|u| vec![("url", u)]).collect(),
                (_, Some(p), _) => vec![vec![("prefix", client::normalize_prefix(&p))]],
                (_, _, true) => vec![vec![("all", "true".to_owned())]],
                _ if !tag.is_empty() => vec![tag.into_iter().map(|t| ("tag", t)).collect()],
                _ => {
                    eprintln!("sidecache: purge needs --url, --prefix, --tag or --all");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let Some(access) = admin.resolve() else {
                return ExitCode::from(EXIT_CONFIG);
            };
            run_async(client::purge(access, selectors, soft))
        }
        Command::Inspect { url, host, json, admin } => {
            let Some(access) = admin.resolve() else {
                return ExitCode::from(EXIT_CONFIG);
            };
            run_async(client::inspect(access, url, host, json))
        }
        Command::Demo { listen, admin_listen } => {
            // The demo's public port is on loopback (the configuration's listens on every address).
            let mut flags = vec![("listen", listen)];
            flags.extend(admin_listen.map(|a| ("admin_listen", a)));
            let config = match Loader::new(std::env::vars()).flags(flags).load() {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("sidecache: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let _log = init_logging(&config);
            run_logged(
                tokio::runtime::Builder::new_multi_thread().max_blocking_threads(64),
                sidecache::demo::run(config),
            )
        }
    }
}

fn run_async(fut: impl std::future::Future<Output = anyhow::Result<u8>>) -> ExitCode {
    // File steps are short; a bounded pool keeps a burst of fills from spawning hundreds of
    // threads (and their allocator arenas).
    run_on(
        tokio::runtime::Builder::new_multi_thread().max_blocking_threads(64),
        fut,
        false,
    )
}

/// [`run_on`] for a command that logs: its fatal error is one log line, not a log line and
/// the same text on standard error.
fn run_logged(
    builder: &mut tokio::runtime::Builder,
    fut: impl std::future::Future<Output = anyhow::Result<u8>>,
) -> ExitCode {
    run_on(builder, fut, true)
}

fn run_on(
    builder: &mut tokio::runtime::Builder,
    fut: impl std::future::Future<Output = anyhow::Result<u8>>,
    logged: bool,
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
        Err(e) if logged => {
            error!(error = format!("{e:#}"), "fatal");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("sidecache: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Starts logging at the configured level; the handle changes the level on a reload.
fn init_logging(config: &Config) -> serve::LogLevel {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let registry = tracing_subscriber::registry().with(filter);
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stdout);
    match config.log_format {
        LogFormat::Json => registry.with(layer.json().flatten_event(true)).init(),
        LogFormat::Text => registry.with(layer).init(),
    }
    Box::new(move |level: &str| {
        let filter = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    })
}
