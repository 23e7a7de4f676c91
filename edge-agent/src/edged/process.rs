//! `ProcessRuntime`: the default runtime. Each instance is an OS process in its
//! own process group, watched by one supervising task.
//!
//! Files of an instance live in `<data_dir>/instances/<dir_name(key)>/`:
//! `work/` (working directory, unpacked artifact), `logs/current.log` (+ `.1`..`.3`),
//! `config/` (the files of its configuration snapshot, see [`super::snapshot`]),
//! and `instance.json` naming the running process (pid, start time, boot, version)
//! so that a restarted agent adopts it instead of starting a duplicate. The child
//! writes its log through its own O_APPEND descriptor, never a pipe to the agent,
//! so it outlives an agent restart untouched.
//!
//! An instance's environment is clean: PATH, LANG, LC_ALL and TZ from the agent,
//! HOME set to its work directory, the spec's `env`, then `SUPERMESH_NODE`,
//! `SUPERMESH_NAMESPACE`, `SUPERMESH_MICROSERVICE` and the agent's context
//! variables, which the spec cannot override.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::process::Command;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::warn;

use super::artifact::ArtifactStore;
use super::group::{self, Identity};
use super::logs;
use super::runtime::{InstanceSpec, InstanceStatus, Phase, Runtime, Statuses};
use super::sandbox::{self, InstanceUserTable};
use super::snapshot::Snapshots;

mod supervisor;

/// Timings and limits of the process runtime.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// Wait between SIGTERM and SIGKILL when stopping an instance.
    pub stop_timeout: Duration,
    /// Size above which `current.log` is rotated.
    pub log_max_bytes: u64,
    /// Rotated log files kept.
    pub log_keep: usize,
    /// Longest wait between two checks of a log's size; sooner while it grows fast (see `logs`).
    pub log_check_interval: Duration,
    /// First wait before a restart.
    pub backoff_initial: Duration,
    /// Longest wait before a restart.
    pub backoff_max: Duration,
    /// Uninterrupted run after which the wait starts again from `backoff_initial`.
    pub backoff_reset_after: Duration,
    /// Longest time one health check may take (also bounded by its period).
    pub health_timeout: Duration,
    /// How often an adopted process (not our child, so not waitable) is looked at.
    pub exit_poll_interval: Duration,
    /// The users instances run as ([`sandbox`](super::sandbox)); `None` runs them as the agent's user.
    pub isolation: Option<Arc<InstanceUserTable>>,
    /// Where configuration snapshots come from ([`super::snapshot`]); without it, an instance
    /// whose spec references ConfigMap or Secret keys fails.
    pub snapshots: Option<Snapshots>,
}

impl Default for ProcessConfig {
    fn default() -> ProcessConfig {
        ProcessConfig {
            stop_timeout: Duration::from_secs(10),
            log_max_bytes: 1024 * 1024,
            log_keep: 3,
            log_check_interval: Duration::from_secs(5),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            backoff_reset_after: Duration::from_secs(600),
            health_timeout: Duration::from_secs(5),
            exit_poll_interval: Duration::from_millis(500),
            isolation: None,
            snapshots: None,
        }
    }
}

/// Why an instance's process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The spec names no command.
    #[error("the spec has no command; set spec.command")]
    NoCommand,
    /// A file or directory of the instance could not be made.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The failed call.
        source: io::Error,
    },
    /// The program could not be executed.
    #[error("cannot start {program:?}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The exec error.
        source: io::Error,
    },
}

/// Directory name of an instance key: `/` becomes `_`, and anything but ASCII
/// letters, digits, `.` and `-` is %-escaped, so distinct keys never share a directory.
pub fn dir_name(key: &str) -> String {
    let mut name = String::with_capacity(key.len());
    for byte in key.bytes() {
        match byte {
            b'/' => name.push('_'),
            b if b.is_ascii_alphanumeric() || b == b'-' || (b == b'.' && !name.is_empty()) => name.push(char::from(b)),
            b => name.push_str(&format!("%{b:02x}")),
        }
    }
    if name.is_empty() {
        name.push('%');
    }
    name
}

/// The files of one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceDir(PathBuf);

impl InstanceDir {
    /// The directory of `key` under `data_dir`.
    pub fn new(data_dir: &Path, key: &str) -> InstanceDir {
        InstanceDir(data_dir.join("instances").join(dir_name(key)))
    }

    /// The instance's directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Working directory of the process, where its artifact is unpacked.
    pub fn work(&self) -> PathBuf {
        self.0.join("work")
    }

    /// The log file the process writes.
    pub fn log(&self) -> PathBuf {
        self.0.join("logs").join(logs::CURRENT)
    }

    /// `instance.json`: which process runs which version.
    pub fn record(&self) -> PathBuf {
        self.0.join("instance.json")
    }

    /// The instance's bearer token for the local API, readable only by the instance's user.
    pub fn token(&self) -> PathBuf {
        self.0.join("token")
    }

    /// The files of its configuration snapshot (`SUPERMESH_CONFIG_DIR`, see [`super::snapshot`]).
    pub fn config(&self) -> PathBuf {
        self.0.join(super::snapshot::CONFIG_DIR)
    }

    /// Digest of the artifact unpacked in `work`.
    fn artifact_marker(&self) -> PathBuf {
        self.0.join(ARTIFACT_MARKER)
    }

    /// The work directory and artifact marker of the version before: at most one.
    pub fn previous(&self) -> PathBuf {
        self.0.join("previous")
    }

    /// Digest of the artifact unpacked in the work directory, if one is.
    fn unpacked(&self) -> Option<String> {
        std::fs::read_to_string(self.artifact_marker()).ok().filter(|_| self.work().is_dir())
    }

    /// Makes the unpacked artifact (work directory and marker) the previous one, dropping
    /// the one kept before; if that one is the archive `sha256`, it comes back into the
    /// work directory and this returns true. Each step is a rename, so an agent killed
    /// at any point leaves an artifact whole or not marked (then unpacked again).
    fn swap_previous(&self, sha256: &str) -> io::Result<bool> {
        let (previous, next, staging) = (self.previous(), self.0.join("next"), self.0.join("previous.partial"));
        remove_dir_if_present(&next)?;
        remove_dir_if_present(&staging)?;
        let restoring = InstanceDir(previous.clone()).unpacked().as_deref() == Some(sha256);
        if restoring {
            std::fs::rename(&previous, &next)?;
        } else {
            remove_dir_if_present(&previous)?;
        }
        if self.unpacked().is_some() {
            std::fs::create_dir(&staging)?;
            std::fs::rename(self.work(), staging.join("work"))?;
            std::fs::rename(self.artifact_marker(), staging.join(ARTIFACT_MARKER))?;
            std::fs::rename(&staging, &previous)?;
        } else {
            // Files of no known archive must not linger next to the new ones.
            remove_file_if_present(&self.artifact_marker())?;
            remove_dir_if_present(&self.work())?;
        }
        if restoring {
            std::fs::rename(next.join("work"), self.work())?;
            std::fs::rename(next.join(ARTIFACT_MARKER), self.artifact_marker())?;
            remove_dir_if_present(&next)?;
        }
        Ok(restoring)
    }
}

/// File naming the digest of the artifact unpacked next to it.
const ARTIFACT_MARKER: &str = "artifact.sha256";

fn remove_dir_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn remove_file_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// What an instance runs, whatever its version: the workload, its context environment
/// and its token. Two versions with one fingerprint need no restart between them.
pub(crate) fn fingerprint(spec: &InstanceSpec) -> String {
    let text = match &spec.config {
        // Without one, what agents before configuration snapshots recorded.
        None => serde_json::to_vec(&(&spec.spec, &spec.env, &spec.token)),
        Some(config) => serde_json::to_vec(&(&spec.spec, &spec.env, &spec.token, config)),
    }
    .unwrap_or_default();
    super::artifact::sha256_hex(text.as_slice()).unwrap_or_default()
}

/// What `instance.json` holds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct Record {
    key: String,
    version: String,
    /// The running process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    process: Option<Identity>,
    /// How a finished (not restarted) process ended, so a restarted agent does not run it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    outcome: Option<Outcome>,
    /// What the running process runs ([`fingerprint`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fingerprint: Option<String>,
    /// The configuration snapshot the running process was started with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    config: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct Outcome {
    phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

fn read_record(path: &Path) -> Option<Record> {
    let text = match std::fs::read(path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            warn!(target: "edged", path = %path.display(), error = %e, "cannot read instance record");
            return None;
        }
    };
    serde_json::from_slice(&text)
        .inspect_err(|e| warn!(target: "edged", path = %path.display(), error = %e, "ignoring corrupt instance record"))
        .ok()
}

/// Kills the process groups of processes that run in an instance's directory but are not
/// the process its record names: an agent killed between starting a process and recording
/// it leaves one behind, which would otherwise run unsupervised beside the instance the next
/// agent starts (the duplicate-after-restart failure of KubeEdge). Returns how many groups.
fn reap_strays(data_dir: &Path) -> usize {
    let instances = data_dir.join("instances");
    let Ok(dirs) = std::fs::read_dir(&instances) else { return 0 };
    let recorded: HashSet<u32> = dirs
        .flatten()
        .filter_map(|d| read_record(&d.path().join("instance.json"))?.process)
        .filter(Identity::is_alive)
        .map(|p| p.pid)
        .collect();
    let strays = group::working_in(&instances);
    let strays = strays.iter().filter(|pgid| !recorded.contains(pgid));
    strays.filter(|pgid| group::signal(**pgid, nix::sys::signal::Signal::SIGKILL).is_ok()).count()
}

/// Writes the record durably: a power cut leaves the old or the new one, never half.
fn write_record(path: &Path, record: &Record) -> io::Result<()> {
    use std::io::Write;
    let text = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
    let partial = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&partial)?;
    file.write_all(&text)?;
    file.sync_all()?;
    std::fs::rename(&partial, path)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| Err(io::Error::other(e)))
}

/// A command for `argv` in `dir` with exactly `env`, in its own process group and
/// with null stdio; `None` for an empty `argv`.
pub(crate) fn command(argv: &[String], dir: &Path, env: &BTreeMap<String, String>) -> Option<Command> {
    let (program, args) = argv.split_first()?;
    // A relative path with a slash names a file of the work directory (an unpacked
    // artifact); resolve it here rather than rely on when the child changes directory.
    let program = if program.contains('/') && Path::new(program).is_relative() {
        dir.join(program)
    } else {
        PathBuf::from(program)
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(dir)
        .env_clear()
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Its own group: stopping the instance reaches everything it spawned, and a
        // signal to the agent's group (Ctrl-C, systemd stop) does not reach it.
        .process_group(0);
    Some(cmd)
}

/// The default runtime: instances are supervised OS processes.
///
/// Dropping it ends supervision but leaves the processes running, so that the
/// next runtime on the same data directory adopts them.
pub struct ProcessRuntime {
    shared: Arc<Shared>,
}

/// State shared by the runtime and its supervisors.
struct Shared {
    data_dir: PathBuf,
    node: String,
    config: ProcessConfig,
    artifacts: ArtifactStore,
    statuses: watch::Sender<Statuses>,
    supervisors: Mutex<HashMap<String, Handle>>,
    next_id: AtomicU64,
}

impl Shared {
    fn supervisors(&self) -> MutexGuard<'_, HashMap<String, Handle>> {
        // A panicking supervisor cannot leave the map half-changed; keep using it.
        self.supervisors.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The agent's side of one supervisor.
struct Handle {
    id: u64,
    desired: watch::Sender<Desired>,
    /// Counts the stops the supervisor completed.
    stops: watch::Receiver<u64>,
    task: JoinHandle<()>,
}

/// What the runtime wants of an instance's supervisor.
#[derive(Debug, Clone, PartialEq)]
enum Desired {
    Run(Box<InstanceSpec>),
    Stop,
}

impl ProcessRuntime {
    /// A runtime keeping its files in `data_dir`, running instances for edge node `node`.
    pub fn new(data_dir: PathBuf, node: String) -> ProcessRuntime {
        ProcessRuntime::with_config(data_dir, node, ProcessConfig::default())
    }

    /// Like [`ProcessRuntime::new`] with other timings and limits.
    pub fn with_config(data_dir: PathBuf, node: String, config: ProcessConfig) -> ProcessRuntime {
        let strays = reap_strays(&data_dir);
        if strays > 0 {
            warn!(target: "edged", strays, "stopped processes a previous agent started but never recorded");
        }
        let artifacts = ArtifactStore::new(data_dir.join("artifacts"));
        if config.isolation.is_some() {
            // Instance users pass through to their own directories, and see nothing else.
            let instances = data_dir.join("instances");
            let opened = std::fs::create_dir_all(&instances)
                .and_then(|()| sandbox::pass_through(&data_dir))
                .and_then(|()| sandbox::pass_through(&instances));
            if let Err(e) = opened {
                warn!(target: "edged", dir = %instances.display(), error = %e, "cannot open the instance directories to their users");
            }
        }
        ProcessRuntime {
            shared: Arc::new(Shared {
                data_dir,
                node,
                config,
                artifacts,
                statuses: watch::Sender::new(Statuses::new()),
                supervisors: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// The files of instance `key`.
    pub fn instance_dir(&self, key: &str) -> InstanceDir {
        InstanceDir::new(&self.shared.data_dir, key)
    }

    fn spawn_supervisor<'m>(
        &self,
        supervisors: &'m mut HashMap<String, Handle>,
        key: &str,
        desired: Desired,
    ) -> &'m mut Handle {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (desired_tx, desired_rx) = watch::channel(desired);
        let (stops_tx, stops_rx) = watch::channel(0);
        let task = tokio::spawn(supervisor::run(
            self.shared.clone(),
            id,
            key.to_owned(),
            self.instance_dir(key),
            desired_rx,
            stops_tx,
        ));
        let handle = Handle { id, desired: desired_tx, stops: stops_rx, task };
        supervisors.entry(key.to_owned()).insert_entry(handle).into_mut()
    }
}

impl Drop for ProcessRuntime {
    fn drop(&mut self) {
        // Only supervision ends; the processes stay for the next agent to adopt.
        for handle in self.shared.supervisors().values() {
            handle.task.abort();
        }
    }
}

impl Runtime for ProcessRuntime {
    async fn ensure(&self, spec: InstanceSpec) {
        let mut supervisors = self.shared.supervisors();
        if let Some(handle) = supervisors.get(&spec.key).filter(|h| !h.task.is_finished()) {
            let desired = Desired::Run(Box::new(spec));
            handle.desired.send_if_modified(|current| {
                let changed = *current != desired;
                if changed {
                    *current = desired;
                }
                changed
            });
            return;
        }
        let status = InstanceStatus::of(&spec);
        self.shared.statuses.send_modify(|all| {
            all.insert(spec.key.clone(), status);
        });
        let key = spec.key.clone();
        self.spawn_supervisor(&mut supervisors, &key, Desired::Run(Box::new(spec)));
    }

    async fn stop(&self, key: &str) {
        let (mut stops, before) = {
            let mut supervisors = self.shared.supervisors();
            let handle = match supervisors.get_mut(key).filter(|h| !h.task.is_finished()) {
                Some(handle) => handle,
                // No supervisor: a previous agent may still have left a process behind.
                None => self.spawn_supervisor(&mut supervisors, key, Desired::Stop),
            };
            let mut stops = handle.stops.clone();
            let before = *stops.borrow_and_update();
            handle.desired.send_if_modified(|current| std::mem::replace(current, Desired::Stop) != Desired::Stop);
            (stops, before)
        };
        // An error means the supervisor is gone (aborted): nothing is left to wait for.
        let _ = stops.wait_for(|&done| done > before).await;
    }

    fn statuses(&self) -> watch::Receiver<Statuses> {
        self.shared.statuses.subscribe()
    }

    fn running_keys(&self) -> BTreeSet<String> {
        let mut keys: BTreeSet<String> = self
            .shared
            .supervisors()
            .iter()
            .filter(|(_, h)| !h.task.is_finished() && matches!(*h.desired.borrow(), Desired::Run(_)))
            .map(|(key, _)| key.clone())
            .collect();
        // Processes left by a previous agent count too, so the agent can stop the
        // ones it no longer wants.
        if let Ok(dirs) = std::fs::read_dir(self.shared.data_dir.join("instances")) {
            for dir in dirs.flatten() {
                if let Some(record) = read_record(&dir.path().join("instance.json")) {
                    if record.process.is_some_and(|p| p.is_alive()) {
                        keys.insert(record.key);
                    }
                }
            }
        }
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_distinct_safe_directory_names() {
        assert_eq!(dir_name("team/microservice/web-1.v2"), "team_microservice_web-1.v2");
        assert_eq!(dir_name("a_b/c"), "a%5fb_c");
        assert_eq!(dir_name(".."), "%2e.");
        assert_eq!(dir_name(""), "%");
        assert_ne!(dir_name("a/b"), dir_name("a_b"));
        assert!(!dir_name("../../etc").contains('/'));
    }

    #[test]
    fn records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("instance.json");
        assert_eq!(read_record(&path), None);
        let record = Record {
            key: "team/microservice/web".into(),
            version: "3-uid".into(),
            process: Some(Identity { pid: 42, start_time: 7, boot_id: "boot".into() }),
            outcome: None,
            fingerprint: None,
            config: None,
        };
        write_record(&path, &record).unwrap();
        assert_eq!(read_record(&path), Some(record));
        std::fs::write(&path, b"{not json").unwrap();
        assert_eq!(read_record(&path), None, "a corrupt record is ignored, not fatal");
    }

    /// Unpacks a fake artifact `sha` into `dir`'s work directory, as `prepare_artifact` does.
    fn unpack(dir: &InstanceDir, sha: &str) {
        std::fs::create_dir_all(dir.work()).unwrap();
        std::fs::write(dir.work().join("app"), sha).unwrap();
        std::fs::write(dir.artifact_marker(), sha).unwrap();
    }

    #[test]
    fn the_previous_artifact_is_kept_bounded_and_comes_back_unpacked() {
        let data = tempfile::tempdir().unwrap();
        let dir = InstanceDir::new(data.path(), "t/microservice/web");
        let app = |d: &InstanceDir| std::fs::read_to_string(d.work().join("app")).ok();
        let previous = || InstanceDir(dir.previous());
        unpack(&dir, "a");
        assert!(!dir.swap_previous("b").unwrap(), "b was never unpacked here");
        assert_eq!((dir.unpacked(), previous().unpacked()), (None, Some("a".into())), "a is kept");
        unpack(&dir, "b");
        assert!(dir.swap_previous("a").unwrap(), "a comes back without unpacking");
        assert_eq!((app(&dir).as_deref(), dir.unpacked().as_deref()), (Some("a"), Some("a")));
        assert_eq!((app(&previous()).as_deref(), previous().unpacked().as_deref()), (Some("b"), Some("b")));
        assert!(!dir.swap_previous("c").unwrap());
        unpack(&dir, "c");
        assert_eq!(previous().unpacked().as_deref(), Some("a"), "only the version before is kept: b is gone");
        let entries = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(entries, 3, "work, its marker and previous; nothing else");
    }

    #[test]
    fn an_agent_killed_while_swapping_leaves_no_artifact_marked_that_is_not_whole() {
        let data = tempfile::tempdir().unwrap();
        let dir = InstanceDir::new(data.path(), "t/microservice/web");
        unpack(&dir, "b");
        // Killed after moving the work directory aside, before its marker.
        let staging = dir.path().join("previous.partial");
        std::fs::create_dir(&staging).unwrap();
        std::fs::rename(dir.work(), staging.join("work")).unwrap();
        assert_eq!(dir.unpacked(), None, "a marker without its work directory counts for nothing");
        assert!(!dir.swap_previous("b").unwrap());
        assert!(!staging.exists() && !dir.artifact_marker().exists(), "the half-moved artifact is cleared");
    }

    fn sleeper(dir: &Path) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        std::fs::create_dir_all(dir).unwrap();
        std::process::Command::new("sleep").arg("60").current_dir(dir).process_group(0).spawn().unwrap()
    }

    #[test]
    fn a_new_runtime_stops_unrecorded_processes_and_keeps_recorded_ones() {
        let data = tempfile::tempdir().unwrap();
        let (kept_dir, stray_dir) = (
            InstanceDir::new(data.path(), "t/microservice/kept"),
            InstanceDir::new(data.path(), "t/microservice/stray"),
        );
        let mut kept = sleeper(&kept_dir.work());
        let mut stray = sleeper(&stray_dir.work());
        let identity = Identity::of(kept.id()).unwrap();
        let record = Record {
            key: "t/microservice/kept".into(),
            version: "1".into(),
            process: Some(identity),
            outcome: None,
            fingerprint: None,
            config: None,
        };
        write_record(&kept_dir.record(), &record).unwrap();
        let _runtime = ProcessRuntime::new(data.path().to_owned(), "n".into());
        let status = stray.wait().unwrap();
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(9), "the unrecorded process is killed");
        assert!(kept.try_wait().unwrap().is_none(), "the recorded process runs on, for the next agent to adopt");
        let _ = std::process::Command::new("kill").arg("-9").arg(kept.id().to_string()).status();
        let _ = kept.wait();
    }
}
