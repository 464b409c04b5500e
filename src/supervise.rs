//! App supervision for one-process-per-instance platforms: `sidecache serve -- <app command>`
//! runs the app as a child with `PORT` set to the upstream port, waits until it accepts
//! connections, stops it (SIGTERM or SIGINT, SIGKILL after the grace period), and reports the
//! app's exit status. It reaps every child process, the orphans the app leaves too (as PID 1
//! in a container must).

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::Path;

use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, Mutex};

use rustix::process::{
    Pid, Resource, Rlimit, Signal, WaitOptions, getpid, getppid, getrlimit, set_child_subreaper,
    set_parent_process_death_signal, setrlimit, wait,
};
use tokio::signal::unix::{self as unix_signal, SignalKind, signal};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// The first argument that makes the `sidecache` binary run as the app's launcher, [`launch`]
/// (not a subcommand: it is never typed, and the app's arguments must reach it unparsed).
pub const LAUNCH: &str = "__launch-app";

/// This very binary, even when the file it was started from has been replaced by a deploy.
const SELF_EXE: &str = "/proc/self/exe";

/// Exit status of the launcher when the app cannot be started (as a shell's for a command it
/// cannot run).
const CANNOT_RUN: u8 = 127;

/// Why the app never became ready.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The command could not be started.
    #[error("failed to start app command `{command}`")]
    Spawn {
        /// The program.
        command: String,
        /// Why.
        source: std::io::Error,
    },
    /// This binary could not be started again as the app's launcher.
    #[error("failed to start the app's launcher ({SELF_EXE}, this binary again)")]
    Launcher {
        /// Why.
        source: std::io::Error,
    },
    /// The app exited before accepting connections.
    #[error("app exited before accepting connections ({status})")]
    Exited {
        /// Its exit status.
        status: ExitStatus,
    },
    /// The app did not accept connections in time.
    #[error("app did not accept connections on port {port} within {timeout:?}")]
    Timeout {
        /// The port it was given.
        port: u16,
        /// The time allowed.
        timeout: Duration,
    },
}

/// The supervised app process. Its exit status comes from the [`Reaper`], which reaps every
/// child of this process (the app and the orphans re-parented to it) in one place.
pub struct App {
    pid: Pid,
    exit: watch::Receiver<Option<ExitStatus>>,
}

impl App {
    /// Starts `command` (program and arguments) with `PORT=port`, in its own process group so
    /// that a terminal's Ctrl-C reaches it only through us (once).
    ///
    /// The app is started through [`launch`]: this binary again (its `main` must hand
    /// [`LAUNCH`] to it, as `sidecache`'s does), as a short-lived launcher that prepares the new
    /// process and then replaces itself with the app (same pid, same process group). What must
    /// happen inside the child before the app runs is done there, with safe calls in a process
    /// of its own, instead of in a `pre_exec` hook between `fork` and `exec`.
    ///
    /// `_handled` is the proof that sidecache's handlers for the signals it forwards are
    /// installed: exec resets a handled signal to its default action, so the app gets the
    /// default even when sidecache was started with the signal ignored (a background job of a
    /// non-interactive shell ignores SIGINT), which exec would otherwise keep.
    ///
    /// The variables named in `withheld` (sidecache's own secrets,
    /// [`crate::config::Config::secret_variables`]) are removed from the environment the app
    /// inherits.
    ///
    /// Must be called from a thread that lives as long as the app (the parent-death signal is
    /// tied to the thread that forked).
    pub(crate) fn spawn(
        command: &[String],
        port: u16,
        withheld: &[&str],
        reaper: &Reaper,
        _handled: &Termination,
    ) -> Result<App, StartError> {
        let program = command.first().ok_or_else(|| StartError::Spawn {
            command: String::new(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
        })?;
        // Found here, not by the launcher's exec: a wrong command fails at once, with its cause.
        runnable(program).map_err(|source| StartError::Spawn {
            command: program.clone(),
            source,
        })?;
        let mut launcher = std::process::Command::new(SELF_EXE);
        launcher
            .arg(LAUNCH)
            .arg(std::process::id().to_string())
            .arg(crate::limits::started_with().unwrap_or(0).to_string())
            .args(command)
            .env("PORT", port.to_string())
            .process_group(0);
        for var in withheld {
            launcher.env_remove(var);
        }
        let (pid, exit) = reaper
            .spawn_app(&mut launcher)
            .map_err(|source| StartError::Launcher { source })?;
        info!(pid = pid.as_raw_nonzero().get(), port, command = %program, "app started");
        Ok(App { pid, exit })
    }

    /// Sends a signal to the app (SIGTERM, SIGINT, SIGKILL); nothing once it has exited (its
    /// pid may be another process's by then).
    pub fn signal(&self, signal: i32) {
        if self.exit.borrow().is_some() {
            return;
        }
        if let Some(signal) = Signal::from_named_raw(signal) {
            // An error only means the app exited meanwhile.
            let _ = rustix::process::kill_process(self.pid, signal);
        }
    }

    /// Stops the app: `signal`, then SIGKILL if it has not exited within `grace` (an app that
    /// ignores SIGTERM is not waited for for ever). Its exit status.
    pub async fn stop(&mut self, signal: i32, grace: Duration) -> std::io::Result<ExitStatus> {
        self.signal(signal);
        if let Ok(status) = tokio::time::timeout(grace, self.wait()).await {
            return status;
        }
        warn!(grace = ?grace, "the app did not exit within the grace period; killing it");
        self.signal(libc::SIGKILL);
        self.wait().await
    }

    /// Waits for the app to exit.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        match self.exit.wait_for(Option::is_some).await {
            Ok(status) => Ok(status.expect("waited for a status")),
            Err(_) => Err(std::io::Error::other("the reaper stopped before the app exited")),
        }
    }

    /// The app's exit status, if it has exited.
    fn try_wait(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// Waits until `port` on loopback accepts connections, or the app exits, or `timeout`.
    pub async fn wait_ready(&mut self, host: &str, port: u16, timeout: Duration) -> Result<(), StartError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Err(StartError::Exited { status });
            }
            if tokio::net::TcpStream::connect((host, port)).await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(StartError::Timeout { port, timeout });
            }
            // Polling interval for readiness, not synchronisation: bounded by the deadline.
            tokio::select! {
                status = self.wait() => {
                    if let Ok(status) = status {
                        return Err(StartError::Exited { status });
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(25)) => {}
            }
        }
    }
}

impl Drop for App {
    /// An app left running when supervision ends early (an error on the way) is killed, not
    /// left behind.
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
    }
}

/// Reaps every child process of sidecache, as an init does: the app, whose exit status it
/// hands to [`App::wait`], and any process re-parented to sidecache when its own parent died
/// (an app that double-forks workers or runs commands in the background leaves them), which
/// would otherwise stay zombies for the life of the container. sidecache is made a child
/// subreaper, so orphans of the app come to it as they would to PID 1, whether or not it runs
/// as PID 1.
///
/// It waits for any child (`waitpid(-1)`), so it must be the only code in the process that
/// waits for children: the app is started with `std::process::Command` and never waited by
/// its `Child` (nor by `tokio::process`).
pub struct Reaper {
    state: Arc<Mutex<Reaped>>,
}

/// What the reaper hands statuses to. A std mutex: held only around `fork` and `waitpid`
/// (never across an await), so that a child is never reaped before it is registered.
#[derive(Default)]
struct Reaped {
    app: Option<(Pid, watch::Sender<Option<ExitStatus>>)>,
}

impl Reaper {
    /// Makes this process a child subreaper and starts reaping on every SIGCHLD (within a
    /// Tokio runtime; the task lives as long as the runtime).
    pub fn start() -> std::io::Result<Reaper> {
        if let Err(e) = set_child_subreaper(Some(getpid())) {
            // PID 1 reaps orphans anyway; elsewhere they go to the nearest other reaper.
            warn!(error = %e, "could not become a child subreaper");
        }
        let mut sigchld = signal(SignalKind::child())?;
        let state = Arc::new(Mutex::new(Reaped::default()));
        let reaping = state.clone();
        tokio::spawn(async move {
            loop {
                reap(&reaping);
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(Reaper { state })
    }

    /// Starts `command` as the app: its pid, and where its exit status will appear.
    fn spawn_app(
        &self,
        command: &mut std::process::Command,
    ) -> std::io::Result<(Pid, watch::Receiver<Option<ExitStatus>>)> {
        // Held across the fork: the reaper cannot take the child's status before it knows the
        // child is the app.
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let child = command.spawn()?;
        let pid = i32::try_from(child.id())
            .ok()
            .and_then(Pid::from_raw)
            .ok_or_else(|| std::io::Error::other("the app's pid is out of range"))?;
        let (report, exit) = watch::channel(None);
        state.app = Some((pid, report));
        // `child` is dropped without waiting: the reaper waits for it.
        Ok((pid, exit))
    }
}

/// Reaps every child that has exited, without blocking.
fn reap(state: &Mutex<Reaped>) {
    loop {
        let mut state = state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match wait(WaitOptions::NOHANG) {
            Ok(Some((pid, status))) => {
                let status = ExitStatus::from_raw(status.as_raw());
                match state.app.take_if(|(app, _)| *app == pid) {
                    Some((_, report)) => {
                        let _ = report.send(Some(status));
                    }
                    None => debug!(pid = pid.as_raw_nonzero().get(), status = %status, "reaped an orphaned process"),
                }
            }
            // No child has exited (or there is none).
            Ok(None) | Err(rustix::io::Errno::CHILD) => return,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                warn!(error = %e, "waitpid failed");
                return;
            }
        }
    }
}

/// A signal that stops sidecache: it stops accepting, drains, then stops the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM: the platform's stop.
    Term,
    /// SIGINT: Ctrl-C.
    Int,
    /// SIGQUIT: a graceful stop as well (as SIGTERM), not a core dump.
    Quit,
}

impl Stop {
    /// The signal's name, for the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Stop::Term => "SIGTERM",
            Stop::Int => "SIGINT",
            Stop::Quit => "SIGQUIT",
        }
    }

    /// The signal the app gets: the same, but SIGTERM for SIGQUIT (whose default action in
    /// the app would be a core dump, not a graceful stop).
    pub fn forwarded(self) -> i32 {
        match self {
            Stop::Term | Stop::Quit => libc::SIGTERM,
            Stop::Int => libc::SIGINT,
        }
    }
}

/// What a signal asks of sidecache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// Stop (gracefully).
    Stop(Stop),
    /// SIGHUP: read the configuration again (see [`crate::reload`]).
    Reload,
}

/// sidecache's handlers for the signals it acts on: SIGTERM, SIGINT and SIGQUIT stop it
/// (gracefully); SIGHUP reloads the configuration (nginx's and Varnish's convention); SIGUSR1
/// and SIGUSR2 are logged and otherwise ignored (their default action would kill sidecache, and
/// its app with it, without a drain). Installed once, first thing, so that none arriving while
/// the sidecar starts is lost (a handled signal is held until it is received) and an app
/// started afterwards gets their default action.
pub struct Termination {
    term: unix_signal::Signal,
    int: unix_signal::Signal,
    quit: unix_signal::Signal,
    hup: unix_signal::Signal,
    usr1: unix_signal::Signal,
    usr2: unix_signal::Signal,
}

impl Termination {
    /// Installs the handlers (they stay for the life of the process).
    pub fn install() -> std::io::Result<Termination> {
        Ok(Termination {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
            hup: signal(SignalKind::hangup())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }

    /// The next signal that asks for something; SIGUSR1/2 are logged on the way.
    pub async fn recv(&mut self) -> Asked {
        loop {
            tokio::select! {
                _ = self.term.recv() => return Asked::Stop(Stop::Term),
                _ = self.int.recv() => return Asked::Stop(Stop::Int),
                _ = self.quit.recv() => return Asked::Stop(Stop::Quit),
                _ = self.hup.recv() => return Asked::Reload,
                _ = self.usr1.recv() => info!(signal = "SIGUSR1", "signal ignored"),
                _ = self.usr2.recv() => info!(signal = "SIGUSR2", "signal ignored"),
            }
        }
    }

    /// The next signal that stops sidecache; a SIGHUP meanwhile runs `reload`.
    pub async fn stop(&mut self, mut reload: impl FnMut()) -> Stop {
        loop {
            match self.recv().await {
                Asked::Stop(stop) => return stop,
                Asked::Reload => reload(),
            }
        }
    }
}

/// Whether `program` names a file this process may execute: a path as given, or a name found
/// in `PATH` (as `exec` would look it up).
fn runnable(program: &str) -> std::io::Result<()> {
    let executable = |path: &Path| path.is_file() && rustix::fs::access(path, rustix::fs::Access::EXEC_OK).is_ok();
    if program.contains('/') {
        let path = Path::new(program);
        if executable(path) {
            return Ok(());
        }
        rustix::fs::access(path, rustix::fs::Access::EXEC_OK)?;
        return Err(std::io::Error::from_raw_os_error(libc::EACCES));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    if std::env::split_paths(&path).any(|dir| executable(&dir.join(program))) {
        return Ok(());
    }
    Err(std::io::Error::new(std::io::ErrorKind::NotFound, "not found in PATH"))
}

/// The exit code a shell would report: the code, or 128 + the signal that ended it.
pub fn exit_code(status: ExitStatus) -> i32 {
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Picks a free loopback port for the app when none was configured.
pub fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// The launcher: `sidecache __launch-app <parent pid> <descriptor limit> <program> [args...]`,
/// started by [`App::spawn`]. It runs first thing in `main`, single-threaded, and replaces
/// itself with the app; it returns only the exit status for when that failed.
///
/// Before the app runs, in this process of its own:
/// - the parent-death signal is set, so that if sidecache dies without the chance to forward a
///   signal (SIGKILL, OOM) the app gets SIGTERM instead of lingering on as an orphan holding
///   its port (the signal survives exec); a parent already gone by then means the same;
/// - the soft descriptor limit sidecache started with is given back (sidecache raised its
///   own for its open files: the app sizes its tables from the one its operator set);
/// - then `exec`: pid, process group, environment (`PORT`) and the default signal actions
///   set up by [`App::spawn`] carry over to the app.
pub fn launch(mut args: impl Iterator<Item = OsString>) -> std::process::ExitCode {
    let fail = |why: String| {
        eprintln!("sidecache: failed to start the app: {why}");
        std::process::ExitCode::from(CANNOT_RUN)
    };
    let number = |arg: Option<OsString>| arg.and_then(|a| a.to_str()?.parse::<u64>().ok());
    let (Some(parent), Some(limit), Some(program)) = (number(args.next()), number(args.next()), args.next()) else {
        return fail(format!(
            "usage: sidecache {LAUNCH} <parent pid> <descriptor limit> <program> [args...]"
        ));
    };
    if let Err(e) = set_parent_process_death_signal(Some(Signal::TERM)) {
        return fail(format!("prctl(PR_SET_PDEATHSIG): {e}"));
    }
    // Checked after the signal is set: a parent that died before it was would never send it.
    if getppid().map(|p| u64::from(p.as_raw_nonzero().get().unsigned_abs())) != Some(parent) {
        return std::process::ExitCode::from(128 + libc::SIGTERM as u8);
    }
    if limit > 0 {
        let now = getrlimit(Resource::Nofile);
        let restored = Rlimit {
            current: Some(limit),
            maximum: now.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, restored) {
            return fail(format!("setrlimit(RLIMIT_NOFILE, {limit}): {e}"));
        }
    }
    let error = std::process::Command::new(&program).args(args).exec();
    fail(format!("`{}`: {error}", program.to_string_lossy()))
}
