//! Health checks of running instances: an HTTP GET, a TCP connect or a command,
//! each bounded by a timeout.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;
use supermesh_protocol::HealthCheck;
use tokio::net::TcpStream;

use super::group;
use super::process::command;

/// Why a check failed, or why a spec's check cannot be run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HealthError {
    /// The spec's health check is malformed.
    #[error("invalid health check: {0}")]
    Invalid(String),
    /// The check did not finish in time.
    #[error("health check timed out after {0:?}")]
    Timeout(Duration),
    /// The TCP connection (for http or tcp) failed.
    #[error("cannot connect to 127.0.0.1:{port}: {reason}")]
    Connect {
        /// Local port.
        port: u16,
        /// The connect error.
        reason: String,
    },
    /// The HTTP exchange failed or the answer was not HTTP.
    #[error("no HTTP answer from 127.0.0.1:{port}: {reason}")]
    BadResponse {
        /// Local port.
        port: u16,
        /// What was wrong.
        reason: String,
    },
    /// The HTTP status was not 2xx or 3xx.
    #[error("GET {path} on port {port} answered {status}")]
    Status {
        /// Local port.
        port: u16,
        /// Path requested.
        path: String,
        /// Status code received.
        status: u16,
    },
    /// The check command could not be started.
    #[error("cannot run health check command {program:?}: {reason}")]
    Spawn {
        /// Program of the command.
        program: String,
        /// The spawn error.
        reason: String,
    },
    /// The check command exited unsuccessfully.
    #[error("health check command exited with {0}")]
    Exit(String),
}

/// A validated health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// GET `path` on 127.0.0.1:`port`; 2xx or 3xx is healthy.
    Http {
        /// Local port.
        port: u16,
        /// Absolute path, already checked to be a valid request target.
        path: String,
    },
    /// Connect to 127.0.0.1:`port`.
    Tcp {
        /// Local port.
        port: u16,
    },
    /// Run a command in the instance's work directory with its environment; exit 0 is healthy.
    Exec {
        /// Program and arguments.
        command: Vec<String>,
    },
}

fn port(port: i32) -> Result<u16, HealthError> {
    u16::try_from(port)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| HealthError::Invalid(format!("port {port} is not 1-65535")))
}

impl Probe {
    /// The probe of a spec's check, `None` when it names no method; the first of
    /// http, tcp, exec wins when several are given.
    pub fn from_check(check: &HealthCheck) -> Result<Option<Probe>, HealthError> {
        if let Some(http) = &check.http {
            let path = if http.path.is_empty() { "/".to_owned() } else { http.path.clone() };
            // The path goes into the request line verbatim: no spaces or control characters.
            if !path.starts_with('/') || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
                return Err(HealthError::Invalid(format!("http path {path:?} must start with / and hold no spaces")));
            }
            return Ok(Some(Probe::Http { port: port(http.port)?, path }));
        }
        if let Some(tcp) = &check.tcp {
            return Ok(Some(Probe::Tcp { port: port(tcp.port)? }));
        }
        if let Some(exec) = &check.exec {
            if exec.command.is_empty() {
                return Err(HealthError::Invalid("exec command is empty".into()));
            }
            return Ok(Some(Probe::Exec { command: exec.command.clone() }));
        }
        Ok(None)
    }
}

/// Where an exec check runs: the instance's work directory and environment.
#[derive(Debug, Clone)]
pub struct ExecContext {
    /// Working directory.
    pub dir: PathBuf,
    /// Complete environment.
    pub env: BTreeMap<String, String>,
    /// The instance's sandbox, which its exec checks run in too.
    pub sandbox: Option<std::sync::Arc<super::sandbox::Sandbox>>,
}

/// Runs `probe` once, failing after `timeout`.
pub async fn check(probe: &Probe, context: &ExecContext, timeout: Duration) -> Result<(), HealthError> {
    tokio::time::timeout(timeout, run(probe, context, timeout)).await.unwrap_or(Err(HealthError::Timeout(timeout)))
}

async fn run(probe: &Probe, context: &ExecContext, timeout: Duration) -> Result<(), HealthError> {
    match probe {
        Probe::Http { port, path } => http_get(*port, path, timeout).await,
        Probe::Tcp { port } => connect(*port).await.map(drop),
        Probe::Exec { command: argv } => exec(argv, context).await,
    }
}

async fn connect(port: u16) -> Result<TcpStream, HealthError> {
    TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| HealthError::Connect { port, reason: e.to_string() })
}

/// GETs `path` on the instance's local `port` with the agent's HTTP client; 2xx and 3xx
/// are healthy. Redirects are not followed: a 3xx answer already says the server is up.
async fn http_get(port: u16, path: &str, timeout: Duration) -> Result<(), HealthError> {
    let url = format!("http://127.0.0.1:{port}{path}");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .max_redirects(0)
        .proxy(None)
        .user_agent(concat!("supermesh-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    let answer = tokio::task::spawn_blocking(move || agent.get(&url).call().map(|r| r.status().as_u16())).await;
    let status = match answer {
        Ok(Ok(status)) => status,
        Ok(Err(ureq::Error::Io(e))) => return Err(HealthError::Connect { port, reason: e.to_string() }),
        Ok(Err(e)) => return Err(HealthError::BadResponse { port, reason: e.to_string() }),
        Err(e) => return Err(HealthError::BadResponse { port, reason: e.to_string() }),
    };
    if (200..400).contains(&status) {
        Ok(())
    } else {
        Err(HealthError::Status { port, path: path.to_owned(), status })
    }
}

async fn exec(argv: &[String], context: &ExecContext) -> Result<(), HealthError> {
    let program = argv.first().cloned().unwrap_or_default();
    let mut cmd = command(argv, &context.dir, &context.env)
        .ok_or_else(|| HealthError::Invalid("exec command is empty".into()))?;
    if let Some(sandbox) = &context.sandbox {
        sandbox.apply(&mut cmd);
    }
    cmd.kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| HealthError::Spawn { program, reason: e.to_string() })?;
    // A check that times out is dropped mid-wait; its whole group goes with it.
    let guard = KillGroupOnDrop(child.id());
    let status = child.wait().await;
    guard.disarm();
    match status {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(HealthError::Exit(status.to_string())),
        Err(e) => Err(HealthError::Exit(format!("unknown status ({e})"))),
    }
}

/// Kills a check's process group unless disarmed once its leader was reaped (after
/// which the group id may be reused and must not be signalled).
struct KillGroupOnDrop(Option<u32>);

impl KillGroupOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            let _ = group::signal(pgid, Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use supermesh_protocol::{ExecCheck, HttpCheck, TcpCheck};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    fn check_of(http: Option<HttpCheck>, tcp: Option<TcpCheck>, exec: Option<ExecCheck>) -> HealthCheck {
        HealthCheck { http, tcp, exec, period_seconds: 1, failure_threshold: 1 }
    }

    fn context() -> ExecContext {
        let path = std::env::var("PATH").unwrap_or_default();
        ExecContext { dir: std::env::temp_dir(), env: BTreeMap::from([("PATH".to_owned(), path)]), sandbox: None }
    }

    #[test]
    fn malformed_checks_are_refused() {
        let http = |path: &str, port| Some(HttpCheck { path: path.into(), port });
        assert!(matches!(Probe::from_check(&check_of(http("/ x", 80), None, None)), Err(HealthError::Invalid(_))));
        assert!(matches!(Probe::from_check(&check_of(http("/", 0), None, None)), Err(HealthError::Invalid(_))));
        assert!(matches!(
            Probe::from_check(&check_of(None, Some(TcpCheck { port: 70000 }), None)),
            Err(HealthError::Invalid(_))
        ));
        assert_eq!(Probe::from_check(&check_of(None, None, None)), Ok(None));
        assert_eq!(
            Probe::from_check(&check_of(http("", 8080), Some(TcpCheck { port: 1 }), None)),
            Ok(Some(Probe::Http { port: 8080, path: "/".into() }))
        );
    }

    #[tokio::test]
    async fn http_checks_judge_by_status() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let n = socket.read(&mut buf).await.unwrap();
                let answer: &[u8] = match &buf[..n] {
                    r if r.starts_with(b"GET /ok ") => b"HTTP/1.1 204 No Content\r\n\r\n",
                    r if r.starts_with(b"GET /moved ") => {
                        b"HTTP/1.1 302 Found\r\nLocation: /bad\r\nContent-Length: 0\r\n\r\n"
                    }
                    r if r.starts_with(b"GET /ssh ") => b"SSH-2.0-OpenSSH\r\n",
                    _ => b"HTTP/1.1 503 Nope\r\nContent-Length: 0\r\n\r\n",
                };
                socket.write_all(answer).await.unwrap();
            }
        });
        let timeout = Duration::from_secs(5);
        let ok = Probe::Http { port, path: "/ok".into() };
        assert_eq!(check(&ok, &context(), timeout).await, Ok(()));
        let bad = Probe::Http { port, path: "/bad".into() };
        assert!(matches!(check(&bad, &context(), timeout).await, Err(HealthError::Status { status: 503, .. })));
        let moved = Probe::Http { port, path: "/moved".into() };
        assert_eq!(check(&moved, &context(), timeout).await, Ok(()), "a redirect is an answer; it is not followed");
        let not_http = Probe::Http { port, path: "/ssh".into() };
        assert!(matches!(check(&not_http, &context(), timeout).await, Err(HealthError::BadResponse { .. })));
        assert_eq!(check(&Probe::Tcp { port }, &context(), timeout).await, Ok(()));
        server.abort();
    }

    #[tokio::test]
    async fn exec_checks_judge_by_exit_status_and_time_out() {
        let timeout = Duration::from_secs(5);
        let run = |argv: &[&str]| Probe::Exec { command: argv.iter().map(|s| s.to_string()).collect() };
        assert_eq!(check(&run(&["true"]), &context(), timeout).await, Ok(()));
        assert!(matches!(check(&run(&["false"]), &context(), timeout).await, Err(HealthError::Exit(_))));
        assert!(matches!(check(&run(&["/no/such/cmd"]), &context(), timeout).await, Err(HealthError::Spawn { .. })));
        let slow = Duration::from_millis(200);
        assert_eq!(check(&run(&["sleep", "30"]), &context(), slow).await, Err(HealthError::Timeout(slow)));
    }
}
