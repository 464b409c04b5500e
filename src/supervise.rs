//! App supervision for one-process-per-instance platforms: `sidecache serve -- <app command>`
//! runs the app as a child with `PORT` set to the upstream port, waits until it accepts
//! connections, forwards SIGTERM/SIGINT, and reports the app's exit status.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tracing::info;

/// Why the app never became ready.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The command could not be started.
    #[error("failed to start app command `{command}`: {source}")]
    Spawn {
        /// The program.
        command: String,
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

/// The supervised app process.
pub struct App {
    child: Child,
    pid: Option<u32>,
}

impl App {
    /// Starts `command` (program and arguments) with `PORT=port`, in its own process group so
    /// that a terminal's Ctrl-C reaches it only through us (once).
    pub fn spawn(command: &[String], port: u16) -> Result<App, StartError> {
        let (program, args) = command.split_first().ok_or_else(|| StartError::Spawn {
            command: String::new(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
        })?;
        let mut command = Command::new(program);
        command
            .args(args)
            .env("PORT", port.to_string())
            .process_group(0)
            .kill_on_drop(true);
        // If sidecache dies without a chance to forward a signal (SIGKILL, OOM), the app must
        // not linger on as an orphan holding the port.
        #[cfg(target_os = "linux")]
        // SAFETY: the closure runs in the forked child before exec and only makes system calls
        // (prctl(2), getrlimit(2), setrlimit(2) through rustix, and signal(2)), all
        // async-signal-safe, and reads an atomic; it allocates nothing and takes no lock.
        unsafe {
            command.pre_exec(|| {
                // The signals sidecache forwards reach the app with their default action: a
                // sidecache started with them ignored (a background job of a non-interactive
                // shell ignores SIGINT and SIGQUIT) must not hand that on, or the app would
                // never stop on a forwarded SIGINT. (exec keeps ignored signals ignored.)
                for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGQUIT, libc::SIGHUP] {
                    libc::signal(sig, libc::SIG_DFL);
                }
                rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM))?;
                // The app gets the descriptor limit sidecache was started with, not the one
                // it raised for its own open files.
                crate::limits::restore_descriptor_limit()
            });
        }
        let child = command.spawn().map_err(|source| StartError::Spawn {
            command: program.clone(),
            source,
        })?;
        let pid = child.id();
        info!(pid, port, command = %program, "app started");
        Ok(App { child, pid })
    }

    /// Sends a signal to the app (SIGTERM, SIGINT, SIGKILL).
    pub fn signal(&self, signal: i32) {
        if let Some(pid) = self.pid {
            // An error only means the app already exited.
            kill(pid, signal);
        }
    }

    /// Waits for the app to exit.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Waits until `port` on loopback accepts connections, or the app exits, or `timeout`.
    pub async fn wait_ready(&mut self, host: &str, port: u16, timeout: Duration) -> Result<(), StartError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
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
                status = self.child.wait() => {
                    if let Ok(status) = status {
                        return Err(StartError::Exited { status });
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(25)) => {}
            }
        }
    }
}

fn kill(pid: u32, signal: i32) {
    let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) else {
        return;
    };
    let Some(signal) = rustix::process::Signal::from_named_raw(signal) else {
        return;
    };
    let _ = rustix::process::kill_process(pid, signal);
}

/// The exit code a shell would report: the code, or 128 + the signal that ended it.
pub fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Picks a free loopback port for the app when none was configured.
pub fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}
