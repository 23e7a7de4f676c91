//! Background processes that a local cluster starts and stops: one pid file and one log
//! per process in a state directory. A recorded pid counts only while that process's
//! command line names the directory, so nothing else is ever signalled.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub struct Procs {
    dir: PathBuf,
    /// Process whose log an error shows when a wait fails without any exit.
    main: &'static str,
}

impl Procs {
    pub fn new(dir: PathBuf, main: &'static str) -> Self {
        Procs { dir, main }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn pid_file(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pid"))
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// The recorded pid of `name`, if that process is alive and is ours.
    pub fn pid(&self, name: &str) -> Option<Pid> {
        let pid: i32 = fs::read_to_string(self.pid_file(name)).ok()?.trim().parse().ok()?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let ours = String::from_utf8_lossy(&cmdline).contains(&self.dir.display().to_string());
        (ours && alive(Pid::from_raw(pid))).then(|| Pid::from_raw(pid))
    }

    /// Starts `cmd` in a process group of its own (it outlives `cargo xtask` and ignores
    /// its terminal's Ctrl-C), logging to `<name>.log`.
    pub fn spawn(&self, name: &str, cmd: &mut Command) -> Result<()> {
        fs::create_dir_all(&self.dir)?;
        let log = fs::File::create(self.log(name))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        fs::write(self.pid_file(name), child.id().to_string())?;
        Ok(())
    }

    /// Stops `name` if it runs (SIGTERM, then SIGKILL after `grace`) and forgets it.
    pub fn stop(&self, name: &str, grace: Duration) {
        if let Some(pid) = self.pid(name) {
            eprintln!("==> stopping {name} (pid {pid})");
            stop(pid, grace);
        }
        let _ = fs::remove_file(self.pid_file(name));
    }

    /// Polls `ready` until it holds; fails with a log when `what` does not come up or one
    /// of `watched` exits meanwhile.
    pub fn wait(&self, what: &str, watched: &[&str], limit: Duration, mut ready: impl FnMut() -> bool) -> Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if ready() {
                return Ok(());
            }
            for name in watched {
                let recorded = fs::read_to_string(self.pid_file(name)).ok().and_then(|p| p.trim().parse().ok());
                if recorded.is_some_and(|pid| !alive(Pid::from_raw(pid))) {
                    bail!("{name} exited while waiting for {what}; its log:\n{}", self.log_tail(name));
                }
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Err(anyhow!("{what} not ready after {}s; {} log:\n{}", limit.as_secs(), self.main, self.log_tail(self.main)))
    }

    pub fn log_tail(&self, name: &str) -> String {
        let text = fs::read_to_string(self.log(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

/// SIGTERM, then SIGKILL after `grace`, to a process or (negative pid) a group (the apiserver can hang on SIGTERM once etcd is gone).
pub fn stop(pid: Pid, grace: Duration) {
    if kill(pid, Signal::SIGTERM).is_err() {
        return;
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if !alive(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = kill(pid, Signal::SIGKILL);
}

/// Whether `pid` runs (a zombie, exited but not yet reaped, does not).
pub fn alive(pid: Pid) -> bool {
    // A negative pid names a process group, which has no /proc entry of its own.
    kill(pid, None).is_ok()
        && (pid.as_raw() < 0 || fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z ")))
}
