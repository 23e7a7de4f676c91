//! The supervisor of one instance: a task that owns its process, status and
//! files, and follows the desired state the runtime hands it through a watch
//! channel (run this spec, or stop).

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use nix::sys::signal::Signal;
use supermesh_protocol::{Artifact, FailureReason, RestartPolicy, Workload};
use tokio::process::Child;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{info, warn};

use super::{
    blocking, command, fingerprint, read_record, write_record, Desired, InstanceDir, Outcome, ProcessConfig, Record,
    Shared, StartError,
};
use crate::edged::artifact::{io_error, ArtifactError, ArtifactStore};
use crate::edged::group::{self, Identity};
use crate::edged::health::{self, ExecContext, HealthError, Probe};
use crate::edged::logs;
use crate::edged::runtime::{
    human, now_ms, InstanceSpec, InstanceStatus, Phase, ENV_MICROSERVICE, ENV_NAMESPACE, ENV_NODE,
};
use crate::edged::sandbox::{self, Sandbox, SandboxError};
use crate::edged::snapshot::{self, ConfigError, Resolved, ENV_CONFIG_DIR};
use crate::edged::ENV_TOKEN_FILE;

/// Longest wait before asking again for a configuration snapshot that could not be had,
/// so that an instance starts soon after its node reconnects.
const CONFIG_RETRY_MAX: Duration = Duration::from_secs(10);

/// Variables passed from the agent's environment to instances; nothing else is, so
/// the agent's own secrets (join token, ...) never reach a microservice.
const INHERITED_ENV: [&str; 4] = ["PATH", "LANG", "LC_ALL", "TZ"];
/// PATH of instances when the agent has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Longest wait before the first health check: a process needs a moment to listen,
/// but a long period should not delay `Ready` by a whole period.
const FIRST_CHECK_DELAY: Duration = Duration::from_secs(1);
/// How long a SIGKILLed process is waited for.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// Wait before a restart: doubles from `initial` up to `max`, and starts over
/// after a run of at least `reset_after`.
#[derive(Debug)]
struct Backoff {
    builder: ExponentialBuilder,
    reset_after: Duration,
    max: Duration,
    delays: ExponentialBackoff,
}

impl Backoff {
    fn new(config: &ProcessConfig) -> Backoff {
        let builder = ExponentialBuilder::new()
            .with_min_delay(config.backoff_initial)
            .with_max_delay(config.backoff_max)
            .without_max_times();
        Backoff { builder, reset_after: config.backoff_reset_after, max: config.backoff_max, delays: builder.build() }
    }

    fn reset(&mut self) {
        self.delays = self.builder.build();
    }

    /// The wait before the next start, after a run that lasted `ran_for`.
    fn delay(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= self.reset_after {
            self.reset();
        }
        self.delays.next().unwrap_or(self.max)
    }
}

/// Why a supervisor left what it was doing.
enum Interrupt {
    /// The desired state changed.
    Changed,
    /// The runtime is gone.
    Closed,
}

/// Awaits `fut` unless the desired state changes first.
async fn interruptible<F: Future>(desired: &mut watch::Receiver<Desired>, fut: F) -> Result<F::Output, Interrupt> {
    tokio::select! {
        out = fut => Ok(out),
        changed = desired.changed() => Err(if changed.is_ok() { Interrupt::Changed } else { Interrupt::Closed }),
    }
}

/// What the supervisor does next for the current version.
#[derive(Debug, Clone, Copy)]
enum State {
    Start,
    Monitor,
    Backoff(Instant),
    /// Finished or failed; waits for another spec.
    Done,
}

/// How a process ended.
#[derive(Debug)]
struct Exit {
    code: Option<i32>,
    message: String,
}

impl Exit {
    fn of(status: ExitStatus) -> Exit {
        use std::os::unix::process::ExitStatusExt;
        let message = match (status.code(), status.signal()) {
            (Some(code), _) => format!("exited with code {code}"),
            (None, Some(signal)) => match Signal::try_from(signal) {
                Ok(signal) => format!("killed by {signal}"),
                Err(_) => format!("killed by signal {signal}"),
            },
            (None, None) => "exited".to_owned(),
        };
        Exit { code: status.code(), message }
    }

    fn unknown() -> Exit {
        Exit { code: None, message: "exited; exit code unknown (adopted after an agent restart)".to_owned() }
    }
}

/// The process of an instance: our child, or adopted from a previous agent.
struct Live {
    /// `None` for an adopted process, which can only be watched through `/proc`.
    child: Option<Child>,
    identity: Identity,
    version: String,
    /// What it runs, whatever the version ([`fingerprint`]); `None` if a previous agent did not record it.
    fingerprint: Option<String>,
    /// The configuration snapshot it was started with.
    config: Option<String>,
    started: Instant,
}

impl Live {
    async fn wait(&mut self, poll: Duration) -> Exit {
        match &mut self.child {
            Some(child) => match child.wait().await {
                Ok(status) => Exit::of(status),
                Err(e) => Exit { code: None, message: format!("exit status unknown: {e}") },
            },
            None => {
                while self.identity.is_alive() {
                    tokio::time::sleep(poll).await;
                }
                Exit::unknown()
            }
        }
    }
}

/// An artifact download and unpack running on a blocking thread.
struct Preparation {
    artifact: Artifact,
    cancel: Arc<AtomicBool>,
    task: JoinHandle<Result<(), ArtifactError>>,
}

/// What the monitor loop woke up for.
enum Event {
    Exited(Exit),
    Checked(Result<(), HealthError>),
    RotateLogs,
    Desired(bool),
}

type CheckFuture = Pin<Box<dyn Future<Output = Result<(), HealthError>> + Send>>;

/// A health check `delay` from now; never completes without a probe.
fn next_check(probe: &Option<Probe>, context: &ExecContext, timeout: Duration, delay: Duration) -> CheckFuture {
    let (probe, context) = (probe.clone(), context.clone());
    Box::pin(async move {
        tokio::time::sleep(delay).await;
        match probe {
            Some(probe) => health::check(&probe, &context, timeout).await,
            None => std::future::pending().await,
        }
    })
}

/// Downloads (or finds cached), verifies and unpacks `artifact` into the work
/// directory; skipped when that very archive is already unpacked there.
fn prepare_artifact(
    store: &ArtifactStore,
    artifact: &Artifact,
    dir: &InstanceDir,
    cancel: &AtomicBool,
) -> Result<(), ArtifactError> {
    let archive = store.fetch(artifact, cancel)?;
    if cancel.load(Ordering::Relaxed) {
        return Err(ArtifactError::Cancelled);
    }
    let (marker, work) = (dir.artifact_marker(), dir.work());
    if dir.unpacked().as_deref() == Some(artifact.sha256.as_str()) {
        return Ok(());
    }
    // The unpacked artifact of the version before is kept, for a rollback on the device.
    if dir.swap_previous(&artifact.sha256).map_err(io_error("cannot keep the previous artifact in", dir.path()))? {
        return Ok(());
    }
    store.unpack(&archive, &work)?;
    std::fs::write(&marker, &artifact.sha256).map_err(io_error("cannot write", &marker))
}

/// Checked health probe of a spec; an invalid one is reported by `start`.
fn probe_of(spec: &Workload) -> Result<Option<Probe>, HealthError> {
    spec.health_check.as_ref().map(Probe::from_check).transpose().map(Option::flatten)
}

/// Supervises instance `key` until it is stopped; `stops` counts completed stops.
pub(super) async fn run(
    shared: Arc<Shared>,
    id: u64,
    key: String,
    dir: InstanceDir,
    desired: watch::Receiver<Desired>,
    stops: watch::Sender<u64>,
) {
    let backoff = Backoff::new(&shared.config);
    let status = InstanceStatus::pending(&key, "");
    let supervisor = Supervisor {
        shared,
        id,
        key,
        dir,
        desired,
        stops,
        status,
        version: None,
        config: None,
        resolved: None,
        live: None,
        finished: None,
        preparing: None,
        state: State::Start,
        backoff,
    };
    supervisor.run().await;
}

/// The task owning one instance: its process, status and files.
struct Supervisor {
    shared: Arc<Shared>,
    id: u64,
    key: String,
    dir: InstanceDir,
    desired: watch::Receiver<Desired>,
    stops: watch::Sender<u64>,
    status: InstanceStatus,
    /// Version the state below belongs to.
    version: Option<String>,
    /// Configuration snapshot the state below belongs to (a new snapshot is a new version).
    config: Option<String>,
    /// The values of the spec's references, once had for this version.
    resolved: Option<Resolved>,
    live: Option<Live>,
    /// Outcome recorded by a previous agent: (version, configuration snapshot, outcome).
    finished: Option<(String, Option<String>, Outcome)>,
    preparing: Option<Preparation>,
    state: State,
    backoff: Backoff,
}

impl Supervisor {
    async fn run(mut self) {
        self.load_record().await;
        loop {
            let desired = self.desired.borrow_and_update().clone();
            match desired {
                Desired::Stop => {
                    self.stop().await;
                    if self.finish_stop() {
                        return;
                    }
                }
                Desired::Run(spec) => {
                    if let Interrupt::Closed = self.run_spec(&spec).await {
                        return;
                    }
                }
            }
        }
    }

    /// Adopts the live process a previous agent recorded, or remembers its outcome.
    async fn load_record(&mut self) {
        let path = self.dir.record();
        let Ok(Some(record)) = blocking(move || Ok(read_record(&path))).await else { return };
        if record.key != self.key {
            return;
        }
        if let Some(identity) = record.process.filter(Identity::is_alive) {
            info!(target: "edged", key = %self.key, pid = identity.pid, version = %record.version, "found running instance");
            let (version, fingerprint, config) = (record.version, record.fingerprint, record.config);
            self.live = Some(Live { child: None, identity, version, fingerprint, config, started: Instant::now() });
        } else if let Some(outcome) = record.outcome {
            self.finished = Some((record.version, record.config, outcome));
        }
    }

    /// Runs `spec` until the desired state changes.
    async fn run_spec(&mut self, spec: &InstanceSpec) -> Interrupt {
        if self.version.as_deref() != Some(spec.version.as_str()) || self.config != spec.config {
            self.begin_version(spec).await;
        } else if self.status.rollback != spec.rollback {
            self.status.rollback = spec.rollback.clone();
            self.set_phase(self.status.phase, self.status.message.clone());
        }
        loop {
            let next = match self.state {
                State::Start => self.start(spec).await,
                State::Monitor => self.monitor(spec).await,
                State::Backoff(until) => {
                    interruptible(&mut self.desired, tokio::time::sleep_until(until)).await.map(|()| State::Start)
                }
                State::Done => interruptible(&mut self.desired, std::future::pending::<State>()).await,
            };
            match next {
                Ok(state) => self.state = state,
                Err(interrupt) => return interrupt,
            }
        }
    }

    /// Switches to a new version: replaces a process of another version, keeps
    /// (adopts) one of this version, and counts restarts from zero.
    async fn begin_version(&mut self, spec: &InstanceSpec) {
        if let Some(live) = self.live.as_mut().filter(|live| live.version != spec.version || live.config != spec.config)
        {
            if live.fingerprint.as_deref() == Some(fingerprint(spec).as_str()) {
                // The cloud sent back what already runs (say, the version the agent rolled back to).
                info!(target: "edged", key = %self.key, from = %live.version, to = %spec.version, "same workload under a new version: the instance keeps running");
                live.version = spec.version.clone();
                let record = Record {
                    key: self.key.clone(),
                    version: spec.version.clone(),
                    process: Some(live.identity.clone()),
                    outcome: None,
                    fingerprint: live.fingerprint.clone(),
                    config: live.config.clone(),
                };
                let path = self.dir.record();
                if let Err(e) = blocking(move || write_record(&path, &record)).await {
                    warn!(target: "edged", key = %self.key, error = %e, "cannot record the instance's new version");
                }
            } else {
                info!(target: "edged", key = %self.key, from = %live.version, to = %spec.version, "replacing instance");
                self.terminate().await;
            }
        }
        self.version = Some(spec.version.clone());
        self.config = spec.config.clone();
        self.resolved = None;
        self.status = InstanceStatus::of(spec);
        self.backoff.reset();
        let finished =
            self.finished.take().filter(|(version, config, _)| *version == spec.version && *config == spec.config);
        self.state = if let Some(live) = &self.live {
            self.status.pid = Some(live.identity.pid);
            info!(target: "edged", key = %self.key, pid = live.identity.pid, "adopted running instance");
            State::Monitor
        } else if let Some((_, _, outcome)) = finished {
            self.status.exit_code = outcome.exit_code;
            self.set_phase(outcome.phase, outcome.message);
            State::Done
        } else {
            State::Start
        };
    }

    /// Prepares the artifact and starts the process.
    async fn start(&mut self, spec: &InstanceSpec) -> Result<State, Interrupt> {
        if let Err(e) = probe_of(&spec.spec) {
            return Ok(self.fail(FailureReason::InvalidSpec, e.to_string()));
        }
        if spec.spec.command.is_empty() {
            return Ok(self.fail(FailureReason::InvalidSpec, StartError::NoCommand.to_string()));
        }
        // Before any download: without its configuration the instance does not start.
        match self.configuration(spec).await? {
            Ok(resolved) => self.resolved = Some(resolved),
            Err(e) if e.is_invalid_spec() => return Ok(self.fail(FailureReason::InvalidSpec, e.to_string())),
            Err(e) => {
                // Retried like an artifact download, but often: the snapshot may come with the
                // next connection, and asking costs a local read or one query.
                let delay = self.backoff.delay(Duration::ZERO).min(CONFIG_RETRY_MAX);
                self.status.exit_code = None;
                self.status.reason = None;
                self.set_phase(Phase::Backoff, Some(format!("{e}; retrying in {}", human(delay))));
                return Ok(State::Backoff(Instant::now() + delay));
            }
        }
        if let Some(artifact) = &spec.spec.artifact {
            self.set_phase(Phase::Downloading, None);
            if let Err(e) = self.prepare(artifact).await? {
                if !e.is_retryable() {
                    return Ok(self.fail(e.reason(), e.to_string()));
                }
                let delay = self.backoff.delay(Duration::ZERO);
                self.set_phase(Phase::Backoff, Some(format!("{e}; retrying in {}", human(delay))));
                return Ok(State::Backoff(Instant::now() + delay));
            }
        }
        let sandbox = match self.sandbox(spec).await {
            Ok(sandbox) => sandbox,
            Err(e @ SandboxError::UnknownCapability(_)) => {
                return Ok(self.fail(FailureReason::InvalidSpec, e.to_string()))
            }
            Err(e) => {
                let delay = self.backoff.delay(Duration::ZERO);
                self.set_phase(Phase::Backoff, Some(format!("{e}; retrying in {}", human(delay))));
                return Ok(State::Backoff(Instant::now() + delay));
            }
        };
        self.set_phase(Phase::Starting, None);
        match self.spawn(spec, sandbox).await {
            Ok(live) => {
                info!(target: "edged", key = %self.key, pid = live.identity.pid, version = %live.version, "started instance");
                self.status.pid = Some(live.identity.pid);
                self.live = Some(live);
                Ok(State::Monitor)
            }
            Err(e) => Ok(self.after_exit(spec, None, true, e.to_string(), Duration::ZERO).await),
        }
    }

    /// The values of the spec's `valueFrom` variables and `files`, from its configuration
    /// snapshot (the store's, else the cloud's while connected); none when it references nothing.
    async fn configuration(&mut self, spec: &InstanceSpec) -> Result<Result<Resolved, ConfigError>, Interrupt> {
        if let Err(e) = snapshot::check(&spec.spec) {
            return Ok(Err(e));
        }
        if !snapshot::has_references(&spec.spec) {
            return Ok(Ok(Resolved::default()));
        }
        let Some(name) = &spec.config else {
            return Ok(Err(ConfigError::NoSnapshot { microservice: spec.key.clone() }));
        };
        let resource = snapshot::resource(&spec.namespace, name);
        let Some(source) = self.shared.config.snapshots.clone() else {
            return Ok(Err(ConfigError::NoSource { snapshot: resource }));
        };
        let data = interruptible(&mut self.desired, source.get(&resource)).await?;
        Ok(data
            .map_err(|reason| ConfigError::Unavailable { snapshot: resource.clone(), reason })
            .and_then(|data| snapshot::resolve(&spec.spec, &resource, &data)))
    }

    /// Awaits the artifact's preparation, reusing one already under way for it.
    async fn prepare(&mut self, artifact: &Artifact) -> Result<Result<(), ArtifactError>, Interrupt> {
        if self.preparing.as_ref().is_some_and(|p| p.artifact != *artifact) {
            self.abandon_preparation().await;
        }
        let preparation = self.preparing.get_or_insert_with(|| {
            let cancel = Arc::new(AtomicBool::new(false));
            let (store, wanted, dir, flag) =
                (self.shared.artifacts.clone(), artifact.clone(), self.dir.clone(), cancel.clone());
            let task = tokio::task::spawn_blocking(move || prepare_artifact(&store, &wanted, &dir, &flag));
            Preparation { artifact: artifact.clone(), cancel, task }
        });
        // Kept across an interrupt: the next spec likely needs the same archive.
        let joined = interruptible(&mut self.desired, &mut preparation.task).await?;
        self.preparing = None;
        Ok(joined.unwrap_or_else(|e| {
            Err(ArtifactError::Io {
                what: "artifact preparation failed in",
                path: self.dir.work(),
                source: io::Error::other(e),
            })
        }))
    }

    /// Cancels a preparation no longer wanted and waits (boundedly) for it to end.
    async fn abandon_preparation(&mut self) {
        if let Some(preparation) = self.preparing.take() {
            preparation.cancel.store(true, Ordering::Relaxed);
            // A download blocked in connect or read sees the flag only at its network
            // timeout. Past this wait it is left to finish alone: it then touches only
            // the shared cache, since it checks the flag again before unpacking.
            if tokio::time::timeout(self.shared.config.stop_timeout, preparation.task).await.is_err() {
                warn!(target: "edged", key = %self.key, "artifact download did not stop in time; leaving it to time out");
            }
        }
    }

    /// The sandbox of the instance: its user (allocated once) and what its spec asks for;
    /// `None` when this node runs instances as the agent's user and the spec asks nothing.
    async fn sandbox(&self, spec: &InstanceSpec) -> Result<Option<Arc<Sandbox>>, SandboxError> {
        let context = spec.spec.security_context.clone();
        let Some(users) = self.shared.config.isolation.clone() else {
            let own = nix::unistd::geteuid().as_raw();
            return context.map(|c| Sandbox::new(own, Some(&c)).map(Arc::new)).transpose();
        };
        let key = self.key.clone();
        let uid = tokio::task::spawn_blocking(move || users.uid_of(&key))
            .await
            .map_err(|e| SandboxError::Interrupted(e.to_string()))??;
        Ok(Some(Arc::new(Sandbox::new(uid, context.as_ref())?)))
    }

    /// Starts the process with its log file as stdout and stderr, and records it.
    async fn spawn(&mut self, spec: &InstanceSpec, sandbox: Option<Arc<Sandbox>>) -> Result<Live, StartError> {
        let io_failed = |what, path: PathBuf| move |source| StartError::Io { what, path, source };
        let (work, log) = (self.dir.work(), self.dir.log());
        tokio::fs::create_dir_all(&work).await.map_err(io_failed("cannot create work directory", work.clone()))?;
        if let Some(logs_dir) = log.parent() {
            tokio::fs::create_dir_all(logs_dir)
                .await
                .map_err(io_failed("cannot create log directory", logs_dir.into()))?;
        }
        self.hand_over(spec, sandbox.clone()).await?;
        // The child gets the descriptor (O_APPEND): its output never passes through
        // the agent, and truncation by rotation is safe.
        let stdout = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io_failed("cannot open log file", log.clone()))?;
        let stderr = stdout.try_clone().map_err(io_failed("cannot open log file", log.clone()))?;
        let argv: Vec<String> = spec.spec.command.iter().chain(&spec.spec.args).cloned().collect();
        let mut cmd = command(&argv, &work, &self.instance_env(spec)).ok_or(StartError::NoCommand)?;
        cmd.stdout(stdout).stderr(stderr);
        if let Some(sandbox) = &sandbox {
            sandbox.apply(&mut cmd);
        }
        let program = argv.first().cloned().unwrap_or_default();
        let mut child = cmd.spawn().map_err(|source| StartError::Spawn { program, source })?;
        // The child stays unreaped until we wait, so its pid and /proc entry hold still.
        let identity = child
            .id()
            .ok_or_else(|| io::Error::other("exited before it was seen"))
            .and_then(Identity::of)
            .map_err(io_failed("cannot read /proc of the process in", self.dir.path().into()));
        let identity = match identity {
            Ok(identity) => identity,
            Err(e) => {
                let _ = child.kill().await;
                return Err(e);
            }
        };
        let record = Record {
            key: self.key.clone(),
            version: spec.version.clone(),
            process: Some(identity.clone()),
            outcome: None,
            fingerprint: Some(fingerprint(spec)),
            config: spec.config.clone(),
        };
        let path = self.dir.record();
        if let Err(source) = blocking(move || write_record(&path, &record)).await {
            // An unrecorded process would be started a second time by the next agent
            // (the duplicate-after-restart failure of KubeEdge): better not run it at all.
            let _ = group::signal(identity.pid, Signal::SIGKILL);
            let _ = child.wait().await;
            return Err(StartError::Io { what: "cannot record the instance in", path: self.dir.record(), source });
        }
        let (version, fingerprint, config) = (spec.version.clone(), Some(fingerprint(spec)), spec.config.clone());
        Ok(Live { child: Some(child), identity, version, fingerprint, config, started: Instant::now() })
    }

    /// Gives the instance's user its work directory, its token file and its configuration
    /// files, and checks that it can reach them; without a sandbox they are the agent's own.
    async fn hand_over(&self, spec: &InstanceSpec, sandbox: Option<Arc<Sandbox>>) -> Result<(), StartError> {
        let (dir, token) = (self.dir.clone(), spec.token.clone());
        let files = self.resolved.as_ref().map(|r| r.files.clone()).unwrap_or_default();
        blocking(move || {
            let failed = |what: &'static str, path: PathBuf| {
                move |e: io::Error| io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
            };
            if let Some(sandbox) = &sandbox {
                sandbox::pass_through(dir.path()).map_err(failed("cannot open", dir.path().into()))?;
                sandbox.reachable(&dir.work()).map_err(io::Error::other)?;
                // Its log is written through a descriptor it is handed, never read back by it.
                if let Some(logs) = dir.log().parent() {
                    let private = std::os::unix::fs::PermissionsExt::from_mode(sandbox::PRIVATE_DIR);
                    std::fs::set_permissions(logs, private).map_err(failed("cannot close", logs.into()))?;
                }
                sandbox.own(&dir.work()).map_err(failed("cannot hand over", dir.work()))?;
            }
            match (token, &sandbox) {
                (Some(token), Some(sandbox)) => sandbox.write_private(&dir.token(), token.as_bytes()),
                (Some(token), None) => {
                    let own = Sandbox::new(nix::unistd::geteuid().as_raw(), None).map_err(io::Error::other)?;
                    own.write_private(&dir.token(), token.as_bytes())
                }
                (None, _) => Ok(()),
            }
            .map_err(failed("cannot write the token file", dir.token()))?;
            // What a previous revision left there goes, whatever this one brings.
            snapshot::write(dir.path(), &files, sandbox.as_deref())
        })
        .await
        .map_err(|source| StartError::Io {
            what: "cannot prepare the instance in",
            path: self.dir.path().into(),
            source,
        })
    }

    /// Environment of the process and its exec checks: a few inherited variables,
    /// the spec's, then the context (which the spec cannot override).
    fn instance_env(&self, spec: &InstanceSpec) -> BTreeMap<String, String> {
        let mut env: BTreeMap<String, String> =
            INHERITED_ENV.iter().filter_map(|&name| Some((name.to_owned(), std::env::var(name).ok()?))).collect();
        env.entry("PATH".to_owned()).or_insert_with(|| DEFAULT_PATH.to_owned());
        env.insert("HOME".to_owned(), self.dir.work().display().to_string());
        let resolved = self.resolved.as_ref();
        env.extend(spec.spec.env.iter().filter_map(|var| {
            let value = match &var.value_from {
                // Unresolved only for an adopted process whose snapshot cannot be had now.
                Some(_) => resolved?.env.get(&var.name)?.clone(),
                None => var.value.clone(),
            };
            Some((var.name.clone(), value))
        }));
        env.insert(ENV_NODE.to_owned(), self.shared.node.clone());
        env.insert(ENV_NAMESPACE.to_owned(), spec.namespace.clone());
        env.insert(ENV_MICROSERVICE.to_owned(), spec.name.clone());
        env.extend(spec.env.clone());
        if spec.token.is_some() {
            env.insert(ENV_TOKEN_FILE.to_owned(), self.dir.token().display().to_string());
        }
        if !spec.spec.files.is_empty() {
            env.insert(ENV_CONFIG_DIR.to_owned(), self.dir.config().display().to_string());
        }
        env
    }

    /// Watches the running process: its exit, its health checks and its log size.
    async fn monitor(&mut self, spec: &InstanceSpec) -> Result<State, Interrupt> {
        let Some(started) = self.live.as_ref().map(|live| live.started) else { return Ok(State::Start) };
        // Validated by `start`; an adopted process's spec was validated when it started.
        let probe = probe_of(&spec.spec).ok().flatten();
        if self.status.phase != Phase::Ready {
            self.set_phase(if probe.is_some() { Phase::Running } else { Phase::Ready }, None);
        }
        let config = self.shared.config.clone();
        let check = spec.spec.health_check.as_ref();
        let period = Duration::from_secs(check.map_or(10, |c| c.period_seconds).max(1).unsigned_abs().into());
        let threshold = check.map_or(3, |c| c.failure_threshold).max(1).unsigned_abs();
        let timeout = period.min(config.health_timeout);
        if self.resolved.is_none() && snapshot::has_references(&spec.spec) {
            // Adopted after an agent restart: its exec checks need the values too.
            match self.configuration(spec).await? {
                Ok(resolved) => self.resolved = Some(resolved),
                Err(e) => {
                    warn!(target: "edged", key = %self.key, error = %e, "exec health checks run without the configured variables")
                }
            }
        }
        let sandbox = self.sandbox(spec).await.ok().flatten();
        let context = ExecContext { dir: self.dir.work(), env: self.instance_env(spec), sandbox };
        let mut check_due = next_check(&probe, &context, timeout, period.min(FIRST_CHECK_DELAY));
        let mut failures = 0u32;
        let mut rotation =
            tokio::time::interval_at(Instant::now() + config.log_check_interval, config.log_check_interval);
        rotation.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut log_watch =
            logs::LogWatch::new(self.dir.log(), config.log_max_bytes, config.log_keep, config.log_check_interval);
        loop {
            let event = {
                let Some(live) = self.live.as_mut() else { return Ok(State::Start) };
                tokio::select! {
                    exit = live.wait(config.exit_poll_interval) => Event::Exited(exit),
                    result = &mut check_due, if probe.is_some() => Event::Checked(result),
                    _ = rotation.tick() => Event::RotateLogs,
                    changed = self.desired.changed() => Event::Desired(changed.is_ok()),
                }
            };
            match event {
                Event::Exited(exit) => {
                    let failed = exit.code != Some(0);
                    return Ok(self.after_exit(spec, exit.code, failed, exit.message, started.elapsed()).await);
                }
                Event::Checked(Ok(())) => {
                    failures = 0;
                    if self.status.phase != Phase::Ready {
                        self.set_phase(Phase::Ready, None);
                    }
                    check_due = next_check(&probe, &context, timeout, period);
                }
                Event::Checked(Err(e)) => {
                    failures += 1;
                    if failures >= threshold {
                        let reason = format!("unhealthy: {e} ({failures} checks in a row)");
                        self.set_phase(Phase::Unhealthy, Some(reason.clone()));
                        let code = self.terminate().await.and_then(|exit| exit.code);
                        return Ok(self.after_exit(spec, code, true, reason, started.elapsed()).await);
                    }
                    warn!(target: "edged", key = %self.key, error = %e, failures, "health check failed");
                    check_due = next_check(&probe, &context, timeout, period);
                }
                Event::RotateLogs => rotation.reset_after(self.rotate_logs(&mut log_watch).await),
                Event::Desired(true) => return Err(Interrupt::Changed),
                Event::Desired(false) => return Err(Interrupt::Closed),
            }
        }
    }

    /// Rotates the instance's log if it is over its cap; returns when to look again.
    async fn rotate_logs(&self, watch: &mut logs::LogWatch) -> Duration {
        let mut next = watch.clone();
        match blocking(move || next.check(std::time::Instant::now()).map(|delay| (next, delay))).await {
            Ok((checked, delay)) => {
                *watch = checked;
                delay
            }
            Err(e) => {
                warn!(target: "edged", key = %self.key, error = %e, "cannot rotate instance log");
                self.shared.config.log_check_interval
            }
        }
    }

    /// Applies the restart policy after the process ended (or could not start).
    async fn after_exit(
        &mut self,
        spec: &InstanceSpec,
        code: Option<i32>,
        failed: bool,
        message: String,
        ran_for: Duration,
    ) -> State {
        if let Some(live) = self.live.take() {
            // The instance is the whole group: what the leader left behind goes too.
            // (The group id cannot be reused while members remain.)
            if group::has_members(live.identity.pid) {
                let _ = group::signal(live.identity.pid, Signal::SIGKILL);
            }
        }
        self.status.pid = None;
        self.status.exit_code = code;
        let restart = match spec.spec.restart_policy {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => failed,
            RestartPolicy::Never => false,
        };
        if restart {
            self.status.restarts = self.status.restarts.saturating_add(1);
            let delay = self.backoff.delay(ran_for);
            self.set_phase(Phase::Backoff, Some(format!("{message}; restarting in {}", human(delay))));
            return State::Backoff(Instant::now() + delay);
        }
        let phase = if failed { Phase::Failed } else { Phase::Succeeded };
        self.status.reason = failed.then_some(FailureReason::Exited);
        self.set_phase(phase, Some(message.clone()));
        let record = Record {
            key: self.key.clone(),
            version: spec.version.clone(),
            process: None,
            outcome: Some(Outcome { phase, exit_code: code, message: Some(message) }),
            fingerprint: None,
            config: spec.config.clone(),
        };
        let path = self.dir.record();
        if let Err(e) = blocking(move || write_record(&path, &record)).await {
            warn!(target: "edged", key = %self.key, error = %e, "cannot record how the instance ended; it runs again after an agent restart");
        }
        State::Done
    }

    /// Fails the instance for good (for this version): a spec or artifact that cannot run.
    fn fail(&mut self, reason: FailureReason, message: String) -> State {
        self.status.exit_code = None;
        self.status.reason = Some(reason);
        self.set_phase(Phase::Failed, Some(message));
        State::Done
    }

    /// Stops the process gracefully: SIGTERM to its group, SIGKILL after the stop timeout.
    async fn terminate(&mut self) -> Option<Exit> {
        let mut live = self.live.take()?;
        self.status.pid = None;
        let pgid = live.identity.pid;
        let config = &self.shared.config;
        if live.child.is_none() && !live.identity.is_alive() {
            return Some(Exit::unknown());
        }
        if let Err(e) = group::signal(pgid, Signal::SIGTERM) {
            warn!(target: "edged", key = %self.key, pgid, error = %e, "cannot signal instance");
        }
        let deadline = Instant::now() + config.stop_timeout;
        let mut exit = tokio::time::timeout_at(deadline, live.wait(config.exit_poll_interval)).await.ok();
        let emptied = group::wait_empty(pgid, deadline).await;
        if exit.is_none() || !emptied {
            warn!(target: "edged", key = %self.key, pgid, "instance did not stop in time; killing it");
            let _ = group::signal(pgid, Signal::SIGKILL);
            // SIGKILL is delivered asynchronously: wait until the group is really gone.
            let deadline = Instant::now() + KILL_GRACE;
            if exit.is_none() {
                exit = tokio::time::timeout_at(deadline, live.wait(config.exit_poll_interval)).await.ok();
            }
            if !group::wait_empty(pgid, deadline).await {
                warn!(target: "edged", key = %self.key, pgid, "processes of the instance survived SIGKILL");
            }
        }
        exit
    }

    /// Stops whatever runs and removes the instance's files.
    async fn stop(&mut self) {
        self.abandon_preparation().await;
        if self.terminate().await.is_some() {
            info!(target: "edged", key = %self.key, "stopped instance");
        }
        self.version = None;
        self.config = None;
        self.resolved = None;
        self.finished = None;
        self.state = State::Start;
        let (dir, config) = (self.dir.path().to_owned(), self.dir.config());
        // The configuration directory is read-only, even to the agent when it owns it.
        let removed = blocking(move || match snapshot::remove(&config).and_then(|()| std::fs::remove_dir_all(&dir)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        });
        match removed.await {
            Err(e) => warn!(target: "edged", key = %self.key, error = %e, "cannot remove instance files"),
            Ok(()) => {
                if let Some(users) = self.shared.config.isolation.clone() {
                    let key = self.key.clone();
                    if let Err(e) = blocking(move || users.release(&key).map_err(io::Error::other)).await {
                        warn!(target: "edged", key = %self.key, error = %e, "cannot release the instance's user");
                    }
                }
            }
        }
    }

    /// After a stop: leaves (returns true) unless a new spec arrived meanwhile. Done
    /// under the supervisors lock so `ensure` never talks to a departing supervisor.
    fn finish_stop(&self) -> bool {
        let mut supervisors = self.shared.supervisors();
        let leave = !self.desired.has_changed().unwrap_or(false);
        if leave {
            if supervisors.get(&self.key).is_some_and(|h| h.id == self.id) {
                supervisors.remove(&self.key);
            }
            self.shared.statuses.send_if_modified(|all| all.remove(&self.key).is_some());
        }
        self.stops.send_modify(|done| *done += 1);
        leave
    }

    /// Publishes the status with `phase` and `message` if anything changed.
    fn set_phase(&mut self, phase: Phase, message: Option<String>) {
        if self.status.phase != phase {
            self.status.since_ms = now_ms();
            info!(target: "edged", key = %self.key, version = %self.status.version, %phase, message = message.as_deref().unwrap_or(""), "instance phase");
        }
        self.status.phase = phase;
        self.status.message = message;
        let status = &self.status;
        self.shared.statuses.send_if_modified(|all| {
            if all.get(&status.key) == Some(status) {
                return false;
            }
            all.insert(status.key.clone(), status.clone());
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets_after_a_long_run() {
        let config = ProcessConfig::default();
        let mut backoff = Backoff::new(&config);
        let delays: Vec<u64> = (0..11).map(|_| backoff.delay(Duration::from_secs(1)).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
        assert_eq!(backoff.delay(Duration::from_secs(600)), Duration::from_secs(1));
        assert_eq!(backoff.delay(Duration::ZERO), Duration::from_secs(2));
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human(Duration::from_millis(200)), "200ms");
        assert_eq!(human(Duration::from_secs(4)), "4s");
        assert_eq!(human(Duration::from_secs(128)), "2m8s");
    }
}
