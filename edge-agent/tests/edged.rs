//! Component tests of edged's process runtime with real child processes.
//!
//! Every test waits on conditions with deadlines (the statuses channel, or a file
//! or process table polled until a deadline), and kills every process group its
//! runtime recorded when it ends, passed or not.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::{getpgid, getpgrp, Pid};
use sha2::{Digest, Sha256};
use supermesh_agent::edged::group::{self, Identity};
use supermesh_agent::edged::process::{ProcessConfig, ProcessRuntime};
use supermesh_agent::edged::runtime::{InstanceSpec, InstanceStatus, Phase, Runtime};
use supermesh_agent::edged::snapshot::{SnapshotSource, Snapshots, CONFIG_DIR_MODE, CONFIG_FILE_MODE};
use supermesh_protocol::{
    Artifact, ConfigData, ConfigFile, EnvVar, ExecCheck, FailureReason, HealthCheck, HttpCheck, KeyRef, RestartPolicy,
    TcpCheck, ValueFrom, Workload,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Longest wait for any condition; generous so a loaded CI machine does not flake.
const DEADLINE: Duration = Duration::from_secs(30);
const NODE: &str = "edge-7";

/// Fast timings, so restarts and rotations happen within a test's patience.
fn config() -> ProcessConfig {
    ProcessConfig {
        stop_timeout: Duration::from_secs(2),
        log_check_interval: Duration::from_millis(50),
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_secs(1),
        exit_poll_interval: Duration::from_millis(50),
        ..ProcessConfig::default()
    }
}

/// A data directory with a runtime on it; dropping it ends the runtime, then
/// kills every process group it recorded.
struct Harness {
    runtime: Option<ProcessRuntime>,
    dir: tempfile::TempDir,
    config: ProcessConfig,
}

impl Harness {
    fn new(config: ProcessConfig) -> Harness {
        let dir = tempfile::tempdir().expect("temp dir");
        let runtime = ProcessRuntime::with_config(dir.path().to_owned(), NODE.to_owned(), config.clone());
        Harness { runtime: Some(runtime), dir, config }
    }

    fn runtime(&self) -> &ProcessRuntime {
        self.runtime.as_ref().expect("runtime")
    }

    /// Drops the runtime without stopping anything and starts another on the same
    /// data directory: what an agent restart does.
    fn restart_agent(&mut self) {
        drop(self.runtime.take());
        let runtime = ProcessRuntime::with_config(self.dir.path().to_owned(), NODE.to_owned(), self.config.clone());
        self.runtime = Some(runtime);
    }

    fn work(&self, key: &str) -> PathBuf {
        self.runtime().instance_dir(key).work()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        drop(self.runtime.take());
        let Ok(dirs) = std::fs::read_dir(self.dir.path().join("instances")) else { return };
        for dir in dirs.flatten() {
            let Ok(text) = std::fs::read(dir.path().join("instance.json")) else { continue };
            let record: serde_json::Value = serde_json::from_slice(&text).unwrap_or_default();
            if let Ok(identity) = serde_json::from_value::<Identity>(record["process"].clone()) {
                if identity.is_alive() || group::has_members(identity.pid) {
                    let _ = group::signal(identity.pid, Signal::SIGKILL);
                }
            }
        }
    }
}

fn spec(name: &str, command: &[&str]) -> InstanceSpec {
    InstanceSpec {
        key: format!("test/microservice/{name}"),
        namespace: "test".into(),
        name: name.into(),
        version: "1".into(),
        spec: Workload {
            mesh: "lan".into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            args: vec![],
            env: vec![],
            files: vec![],
            artifact: None,
            ports: vec![],
            health_check: None,
            restart_policy: RestartPolicy::Always,
            security_context: None,
        },
        env: BTreeMap::new(),
        token: None,
        rollback: None,
        config: None,
    }
}

fn sh(name: &str, script: &str) -> InstanceSpec {
    spec(name, &["sh", "-c", script])
}

fn with_policy(mut spec: InstanceSpec, policy: RestartPolicy) -> InstanceSpec {
    spec.spec.restart_policy = policy;
    spec
}

fn with_check(
    mut spec: InstanceSpec,
    http: Option<HttpCheck>,
    tcp: Option<TcpCheck>,
    exec: Option<ExecCheck>,
) -> InstanceSpec {
    spec.spec.health_check = Some(HealthCheck { http, tcp, exec, period_seconds: 1, failure_threshold: 2 });
    spec
}

/// Waits until the status of `key` satisfies `pred`, returning it.
async fn wait_status(
    runtime: &ProcessRuntime,
    key: &str,
    what: &str,
    pred: impl Fn(&InstanceStatus) -> bool,
) -> InstanceStatus {
    let mut statuses = runtime.statuses();
    let reached = tokio::time::timeout(DEADLINE, statuses.wait_for(|all| all.get(key).is_some_and(&pred)))
        .await
        .map(|result| result.map(|all| all[key].clone()));
    match reached {
        Ok(Ok(status)) => status,
        _ => panic!("{key}: {what} not reached within {DEADLINE:?}; last status {:?}", statuses.borrow().get(key)),
    }
}

/// Polls `cond` until it holds, failing the test after the deadline.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "{what} did not happen within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn is_live(pid: u32) -> bool {
    group::stat(pid).is_ok_and(|s| s.is_live())
}

/// A port nothing listens on (bound once, then released).
async fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr").port()
}

#[tokio::test]
async fn a_sleep_instance_is_ready_in_its_own_process_group() {
    let h = Harness::new(config());
    let instance = spec("sleeper", &["sleep", "1000"]);
    let key = instance.key.clone();
    h.runtime().ensure(instance.clone()).await;
    let status = wait_status(h.runtime(), &key, "Ready", |s| s.phase == Phase::Ready).await;
    let pid = status.pid.expect("a ready instance has a pid");
    assert!(is_live(pid));
    let raw = Pid::from_raw(i32::try_from(pid).unwrap());
    assert_eq!(getpgid(Some(raw)).unwrap(), raw, "the instance leads its own process group");
    assert_ne!(getpgid(Some(raw)).unwrap(), getpgrp());
    assert_eq!((status.restarts, status.version.as_str()), (0, "1"));
    assert!(h.runtime().running_keys().contains(&key));

    // Ensuring the same spec again changes nothing.
    h.runtime().ensure(instance).await;
    assert_eq!(h.runtime().statuses().borrow()[&key].pid, Some(pid));

    h.runtime().stop(&key).await;
    assert!(!h.runtime().statuses().borrow().contains_key(&key));
    assert!(!is_live(pid));
    assert!(group::members(pid).is_empty());
    assert!(!h.runtime().running_keys().contains(&key));
}

#[tokio::test]
async fn environment_and_working_directory_are_set() {
    let h = Harness::new(config());
    let mut instance = with_policy(
        sh(
            "envy",
            r#"echo "$SUPERMESH_NODE" > out.txt; pwd >> out.txt; echo "$GREETING $SUPERMESH_MESH $SUPERMESH_MICROSERVICE" >> out.txt"#,
        ),
        RestartPolicy::Never,
    );
    instance.spec.env = vec![EnvVar { name: "GREETING".into(), value: "hello".into(), value_from: None }];
    instance.env = BTreeMap::from([("SUPERMESH_MESH".to_owned(), "lan".to_owned())]);
    let key = instance.key.clone();
    h.runtime().ensure(instance).await;
    let status = wait_status(h.runtime(), &key, "Succeeded", |s| s.phase == Phase::Succeeded).await;
    assert_eq!(status.exit_code, Some(0));

    let work = h.work(&key);
    let out = std::fs::read_to_string(work.join("out.txt")).expect("the script wrote out.txt in its work dir");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(lines[0], NODE);
    assert_eq!(Path::new(lines[1]).canonicalize().unwrap(), work.canonicalize().unwrap());
    assert_eq!(lines[2], "hello lan envy");
}

/// Configuration snapshots as the metamanager gives them: only while "connected".
#[derive(Clone, Default)]
struct FakeSnapshots {
    connected: Arc<std::sync::atomic::AtomicBool>,
    asked: Arc<AtomicUsize>,
}

const DB_PASSWORD: &str = "hunter2-not-for-logs";

impl SnapshotSource for FakeSnapshots {
    fn snapshot<'a>(
        &'a self,
        resource: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<ConfigData, String>> + Send + 'a>> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        let connected = self.connected.load(Ordering::SeqCst);
        Box::pin(async move {
            if !connected {
                return Err(format!("resource {resource:?} is not held locally and the cloud is unreachable"));
            }
            let mut data = ConfigData::default();
            data.secrets.insert("db".into(), BTreeMap::from([("password".into(), DB_PASSWORD.into())]));
            data.config_maps.insert("app".into(), BTreeMap::from([("settings".into(), "mode = fast\n".into())]));
            Ok(data)
        })
    }
}

fn secret_ref(name: &str, key: &str) -> ValueFrom {
    ValueFrom { secret_key_ref: Some(KeyRef { name: name.into(), key: key.into() }), ..ValueFrom::default() }
}

fn config_map_ref(name: &str, key: &str) -> ValueFrom {
    ValueFrom { config_map_key_ref: Some(KeyRef { name: name.into(), key: key.into() }), ..ValueFrom::default() }
}

/// An instance whose variable DB_PASSWORD and file app/settings.toml come from snapshot `config`.
fn configured(name: &str, script: &str, config: Option<&str>) -> InstanceSpec {
    let mut instance = with_policy(sh(name, script), RestartPolicy::Never);
    instance.spec.env = vec![EnvVar {
        name: "DB_PASSWORD".into(),
        value: String::new(),
        value_from: Some(secret_ref("db", "password")),
    }];
    instance.spec.files =
        vec![ConfigFile { path: "app/settings.toml".into(), from: config_map_ref("app", "settings") }];
    instance.config = config.map(str::to_owned);
    instance
}

#[tokio::test]
async fn configured_values_reach_the_instance_once_its_snapshot_can_be_had() {
    use std::os::unix::fs::PermissionsExt;
    let snapshots = FakeSnapshots::default();
    let h = Harness::new(ProcessConfig { snapshots: Some(Snapshots::new(snapshots.clone())), ..config() });
    let script = r#"echo "$DB_PASSWORD" > out.txt; echo "$SUPERMESH_CONFIG_DIR" >> out.txt; cat "$SUPERMESH_CONFIG_DIR/app/settings.toml" >> out.txt"#;
    let instance = configured("configured", script, Some("web-1"));
    let key = instance.key.clone();
    h.runtime().ensure(instance.clone()).await;
    let failed =
        wait_status(h.runtime(), &key, "in Backoff for want of its snapshot", |s| s.phase == Phase::Backoff).await;
    let message = failed.message.unwrap_or_default();
    assert!(
        message.contains("test/config/web-1")
            && message.contains("cloud is unreachable")
            && message.contains("retrying"),
        "{message}"
    );
    assert!(!h.work(&key).join("out.txt").exists(), "not started without its configuration");
    let asked = snapshots.asked.load(Ordering::SeqCst);
    eventually("a retry with backoff", || snapshots.asked.load(Ordering::SeqCst) > asked).await;

    // The node connects: the next retry starts it, with nothing else happening.
    snapshots.connected.store(true, Ordering::SeqCst);
    let status = wait_status(h.runtime(), &key, "Succeeded", |s| s.phase == Phase::Succeeded).await;
    assert!(!status.message.unwrap_or_default().contains(DB_PASSWORD));
    let dir = h.runtime().instance_dir(&key).config();
    let out = std::fs::read_to_string(h.work(&key).join("out.txt")).unwrap();
    assert_eq!(out, format!("{DB_PASSWORD}\n{}\nmode = fast\n", dir.display()));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode(&dir), mode(&dir.join("app"))), (CONFIG_DIR_MODE, CONFIG_DIR_MODE));
    assert_eq!(mode(&dir.join("app/settings.toml")), CONFIG_FILE_MODE);

    // The next revision's files replace the previous revision's.
    let mut next = configured("configured", "true", Some("web-2"));
    next.version = "2".into();
    next.spec.files = vec![ConfigFile { path: "other.conf".into(), from: config_map_ref("app", "settings") }];
    h.runtime().ensure(next).await;
    wait_status(h.runtime(), &key, "version 2 Succeeded", |s| s.version == "2" && s.phase == Phase::Succeeded).await;
    assert!(dir.join("other.conf").exists() && !dir.join("app").exists());

    // A new snapshot under the same version is a new start too.
    let mut resnapshotted = configured("configured", "echo again > again.txt", Some("web-3"));
    resnapshotted.version = "2".into();
    h.runtime().ensure(resnapshotted).await;
    eventually("the new snapshot's start", || h.work(&key).join("again.txt").exists()).await;

    h.runtime().stop(&key).await;
    assert!(!h.runtime().instance_dir(&key).path().exists(), "the read-only configuration goes with the instance");
}

/// What a case of `unusable_configuration_fails_the_instance_naming_why` breaks.
type Breakage = fn(&mut InstanceSpec);

#[tokio::test]
async fn unusable_configuration_fails_the_instance_naming_why() {
    let snapshots = FakeSnapshots::default();
    snapshots.connected.store(true, Ordering::SeqCst);
    let h = Harness::new(ProcessConfig { snapshots: Some(Snapshots::new(snapshots.clone())), ..config() });
    let cases: [(&str, Breakage, &str, Option<FailureReason>); 4] = [
        (
            "escape",
            |i| i.spec.files[0].path = "../../etc/cron.d/x".into(),
            "contains `..`",
            Some(FailureReason::InvalidSpec),
        ),
        ("absolute", |i| i.spec.files[0].path = "/etc/passwd".into(), "is absolute", Some(FailureReason::InvalidSpec)),
        ("unnamed", |i| i.config = None, "the cloud sent no configuration for test/microservice/unnamed", None),
        (
            "missing",
            |i| i.spec.env[0].value_from = Some(secret_ref("db", "token")),
            r#"configuration snapshot test/config/web-1 has no key "token" of Secret "db""#,
            None,
        ),
    ];
    for (name, break_it, why, reason) in cases {
        let mut instance = configured(name, "echo ran > ran.txt", Some("web-1"));
        break_it(&mut instance);
        let key = instance.key.clone();
        h.runtime().ensure(instance).await;
        // A spec that can never work fails for good; values that may come later are retried.
        let phase = if reason.is_some() { Phase::Failed } else { Phase::Backoff };
        let status = wait_status(h.runtime(), &key, &format!("{phase:?}"), |s| s.phase == phase).await;
        let message = status.message.unwrap_or_default();
        assert!(message.contains(why), "{name}: {message}");
        assert_eq!(status.reason, reason, "{name}");
        assert!(!h.work(&key).join("ran.txt").exists(), "{name} must not start");
        assert!(!h.runtime().instance_dir(&key).config().exists(), "{name}: no configuration written");
    }
    // Without a configuration source at all (a runtime not given one).
    let bare = Harness::new(config());
    let instance = configured("bare", "true", Some("web-1"));
    bare.runtime().ensure(instance.clone()).await;
    let status = wait_status(bare.runtime(), &instance.key, "Backoff", |s| s.phase == Phase::Backoff).await;
    assert!(status.message.unwrap_or_default().contains("no configuration source"));
}

#[tokio::test]
async fn output_lands_in_the_log_file_and_rotation_keeps_three_old_files() {
    let h = Harness::new(ProcessConfig { log_max_bytes: 2000, ..config() });
    let talker = sh("talker", "echo to-stdout; echo to-stderr >&2; exec sleep 1000");
    h.runtime().ensure(talker.clone()).await;
    let log = h.runtime().instance_dir(&talker.key).log();
    eventually("both streams in current.log", || {
        std::fs::read_to_string(&log).is_ok_and(|text| text.contains("to-stdout") && text.contains("to-stderr"))
    })
    .await;

    let chatty = sh("chatty", "while true; do printf '%0100d\\n' 0; sleep 0.005; done");
    h.runtime().ensure(chatty.clone()).await;
    let log = h.runtime().instance_dir(&chatty.key).log();
    let rotated = |n: usize| PathBuf::from(format!("{}.{n}", log.display()));
    eventually("three rotations", || rotated(3).exists()).await;
    let oldest = std::fs::read(rotated(3)).unwrap();
    // Rotations go on; still only three old files are kept.
    eventually("a fourth rotation", || {
        assert!(!rotated(4).exists(), "more than three old log files");
        std::fs::read(rotated(3)).is_ok_and(|now| now != oldest)
    })
    .await;
    eventually("whole lines in the newest old file", || {
        std::fs::read_to_string(rotated(1))
            .is_ok_and(|text| !text.is_empty() && text.lines().all(|line| line.len() == 100 && line.starts_with('0')))
    })
    .await;
    assert!(!rotated(4).exists());
}

#[tokio::test]
async fn exits_follow_the_restart_policy() {
    let h = Harness::new(config());
    let always = sh("always", "exit 3");
    let never = with_policy(sh("never", "exit 3"), RestartPolicy::Never);
    let done = with_policy(sh("done", "exit 0"), RestartPolicy::OnFailure);
    let retried = with_policy(sh("retried", "exit 3"), RestartPolicy::OnFailure);
    for instance in [&always, &never, &done, &retried] {
        h.runtime().ensure(instance.clone()).await;
    }

    let status = wait_status(h.runtime(), &always.key, "Backoff after 2 restarts", |s| {
        s.phase == Phase::Backoff && s.restarts >= 2
    })
    .await;
    assert_eq!(status.exit_code, Some(3));
    assert!(status.message.as_deref().unwrap().starts_with("exited with code 3; restarting in"), "{status:?}");
    assert_eq!(status.pid, None);

    let status = wait_status(h.runtime(), &never.key, "Failed", |s| s.phase == Phase::Failed).await;
    assert_eq!((status.exit_code, status.restarts), (Some(3), 0));
    assert_eq!(status.message.as_deref(), Some("exited with code 3"));

    let status = wait_status(h.runtime(), &done.key, "Succeeded", |s| s.phase == Phase::Succeeded).await;
    assert_eq!((status.exit_code, status.restarts), (Some(0), 0));

    let status =
        wait_status(h.runtime(), &retried.key, "Backoff", |s| s.phase == Phase::Backoff && s.restarts >= 1).await;
    assert_eq!(status.exit_code, Some(3));

    // A finished instance is not run again after an agent restart.
    let mut h = h;
    h.restart_agent();
    h.runtime().ensure(done.clone()).await;
    let status = wait_status(h.runtime(), &done.key, "Succeeded", |s| s.phase == Phase::Succeeded).await;
    assert_eq!(status.exit_code, Some(0));
}

#[tokio::test]
async fn bad_specs_fail_with_a_message_instead_of_running() {
    let h = Harness::new(config());
    let missing = with_policy(spec("missing", &["/no/such/program"]), RestartPolicy::Never);
    let empty = spec("empty", &[]);
    let bad_check = with_check(spec("bad-check", &["sleep", "1000"]), None, Some(TcpCheck { port: 0 }), None);
    for instance in [&missing, &empty, &bad_check] {
        h.runtime().ensure(instance.clone()).await;
    }
    let status = wait_status(h.runtime(), &missing.key, "Failed", |s| s.phase == Phase::Failed).await;
    assert!(status.message.as_deref().unwrap().contains("cannot start \"/no/such/program\""), "{status:?}");
    let status = wait_status(h.runtime(), &empty.key, "Failed", |s| s.phase == Phase::Failed).await;
    assert!(status.message.as_deref().unwrap().contains("no command"), "{status:?}");
    let status = wait_status(h.runtime(), &bad_check.key, "Failed", |s| s.phase == Phase::Failed).await;
    assert!(status.message.as_deref().unwrap().contains("invalid health check"), "{status:?}");
}

#[tokio::test]
async fn failing_health_checks_mark_unhealthy_and_restart() {
    let h = Harness::new(config());
    // Ignoring SIGTERM keeps it Unhealthy for the whole stop timeout, long enough to see.
    let exec = with_check(
        sh("exec-check", "trap '' TERM; sleep 1000"),
        None,
        None,
        Some(ExecCheck { command: vec!["sh".into(), "-c".into(), "test -f healthy".into()] }),
    );
    let port = free_port().await;
    let tcp = with_check(spec("tcp-check", &["sleep", "1000"]), None, Some(TcpCheck { port: port.into() }), None);
    h.runtime().ensure(exec.clone()).await;
    h.runtime().ensure(tcp.clone()).await;

    let first = wait_status(h.runtime(), &exec.key, "Running", |s| s.phase == Phase::Running).await;
    let status = wait_status(h.runtime(), &exec.key, "Unhealthy", |s| s.phase == Phase::Unhealthy).await;
    assert!(status.message.as_deref().unwrap().starts_with("unhealthy: health check command exited"), "{status:?}");
    let status = wait_status(h.runtime(), &exec.key, "Backoff", |s| s.phase == Phase::Backoff).await;
    assert_eq!(status.restarts, 1, "the unhealthy kill counts as a restart");
    assert!(status.message.as_deref().unwrap().starts_with("unhealthy:"), "{status:?}");
    assert!(!is_live(first.pid.unwrap()), "the unhealthy process was killed");
    let status = wait_status(h.runtime(), &exec.key, "restarted process", |s| s.pid.is_some()).await;
    assert_ne!(status.pid, first.pid);

    let status = wait_status(h.runtime(), &tcp.key, "Backoff", |s| s.phase == Phase::Backoff && s.restarts >= 1).await;
    assert!(status.message.as_deref().unwrap().contains("cannot connect to 127.0.0.1"), "{status:?}");
}

#[tokio::test]
async fn an_http_check_passes_against_a_real_server() {
    let h = Harness::new(config());
    let port = free_port().await;
    let server = with_check(
        spec("web", &["python3", "-m", "http.server", &port.to_string(), "--bind", "127.0.0.1"]),
        Some(HttpCheck { path: "/".into(), port: port.into() }),
        None,
        None,
    );
    h.runtime().ensure(server.clone()).await;
    let status = wait_status(h.runtime(), &server.key, "Ready", |s| s.phase == Phase::Ready).await;
    assert_eq!(status.restarts, 0);
    h.runtime().stop(&server.key).await;
    assert!(!is_live(status.pid.unwrap()));
}

#[tokio::test]
async fn a_graceful_stop_leaves_no_process_of_the_group() {
    let h = Harness::new(ProcessConfig { stop_timeout: Duration::from_millis(500), ..config() });
    let polite = sh("polite", "sleep 1000 & sleep 1000");
    // Ignores SIGTERM (and so do its children): only SIGKILL after the timeout ends it.
    let stubborn = sh("stubborn", "trap '' TERM; sleep 1000 & sleep 1000");
    for instance in [&polite, &stubborn] {
        h.runtime().ensure(instance.clone()).await;
        let pid = wait_status(h.runtime(), &instance.key, "Ready", |s| s.phase == Phase::Ready).await.pid.unwrap();
        eventually("two processes in the group", || group::members(pid).len() >= 2).await;
        h.runtime().stop(&instance.key).await;
        assert_eq!(group::members(pid), Vec::<u32>::new(), "{}: survivors", instance.name);
        assert!(!h.runtime().instance_dir(&instance.key).path().exists(), "stopped instances leave no files");
    }
}

#[tokio::test]
async fn a_restarted_agent_adopts_running_instances() {
    let mut h = Harness::new(config());
    let v1 = sh("adoptee", "exec sleep 1000");
    h.runtime().ensure(v1.clone()).await;
    let before = wait_status(h.runtime(), &v1.key, "Ready", |s| s.phase == Phase::Ready).await;
    let pid = before.pid.unwrap();

    h.restart_agent();
    assert!(is_live(pid), "dropping the runtime must not kill instances");
    assert!(h.runtime().running_keys().contains(&v1.key), "a leftover process counts as running");
    h.runtime().ensure(v1.clone()).await;
    let adopted = wait_status(h.runtime(), &v1.key, "Ready", |s| s.phase == Phase::Ready).await;
    assert_eq!((adopted.pid, adopted.restarts, adopted.version.as_str()), (Some(pid), 0, "1"));

    // Adopted processes are still supervised: an exit is noticed and restarted.
    group::signal(pid, Signal::SIGKILL).unwrap();
    let restarted =
        wait_status(h.runtime(), &v1.key, "restart", |s| s.phase == Phase::Ready && s.pid != Some(pid)).await;
    assert_eq!(restarted.restarts, 1);
    let pid = restarted.pid.unwrap();

    h.restart_agent();
    // Another version runs something else (a version that runs the same keeps its process).
    let mut v2 = InstanceSpec { version: "2".into(), ..v1.clone() };
    v2.env.insert("REVISION".into(), "2".into());
    h.runtime().ensure(v2).await;
    let replaced = wait_status(h.runtime(), &v1.key, "v2 Ready", |s| s.version == "2" && s.phase == Phase::Ready).await;
    assert_ne!(replaced.pid, Some(pid));
    assert!(!is_live(pid), "the old version was stopped");
    let new_pid = replaced.pid.unwrap();

    // A process left by a previous agent and no longer wanted is stopped by key.
    h.restart_agent();
    assert!(is_live(new_pid));
    h.runtime().stop(&v1.key).await;
    assert!(!is_live(new_pid));
    assert!(h.runtime().running_keys().is_empty());
}

/// A tar.gz holding an executable `run.sh` with `script`.
fn archive(script: &str) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut builder = tar::Builder::new(gz);
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o755);
    header.set_size(script.len() as u64);
    builder.append_data(&mut header, "run.sh", script.as_bytes()).unwrap();
    let mut gz = builder.into_inner().unwrap();
    gz.flush().unwrap();
    gz.finish().unwrap()
}

/// Serves `body` to every GET on a local port; returns its URL and a request counter.
async fn serve(body: Vec<u8>) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/app.tar.gz", listener.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let body = body.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let header = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let _ = socket.write_all(header.as_bytes()).await;
                let _ = socket.write_all(&body).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (url, hits)
}

fn with_artifact(mut spec: InstanceSpec, url: &str, sha256: &str) -> InstanceSpec {
    spec.spec.artifact = Some(Artifact { url: url.into(), sha256: sha256.into() });
    with_policy(spec, RestartPolicy::Never)
}

#[tokio::test]
async fn artifacts_are_verified_before_anything_runs() {
    let h = Harness::new(config());
    let body = archive("#!/bin/sh\necho ran > marker\n");
    let sha: String = Sha256::digest(&body).iter().map(|b| format!("{b:02x}")).collect();
    let (url, hits) = serve(body).await;

    let good = with_artifact(spec("good", &["./run.sh"]), &url, &sha);
    h.runtime().ensure(good.clone()).await;
    wait_status(h.runtime(), &good.key, "Succeeded", |s| s.phase == Phase::Succeeded).await;
    assert_eq!(std::fs::read_to_string(h.work(&good.key).join("marker")).unwrap(), "ran\n");
    assert!(h.dir.path().join(format!("artifacts/{sha}.tar.gz")).exists());

    // Another instance of the same archive uses the cached copy.
    let again = with_artifact(spec("again", &["./run.sh"]), &url, &sha);
    h.runtime().ensure(again.clone()).await;
    wait_status(h.runtime(), &again.key, "Succeeded", |s| s.phase == Phase::Succeeded).await;
    assert!(h.work(&again.key).join("marker").exists());
    assert_eq!(hits.load(Ordering::SeqCst), 1, "cached by hash: downloaded once");

    let wrong = "0".repeat(64);
    let tampered = with_artifact(spec("tampered", &["./run.sh"]), &url, &wrong);
    h.runtime().ensure(tampered.clone()).await;
    let status = wait_status(h.runtime(), &tampered.key, "Failed", |s| s.phase == Phase::Failed).await;
    assert_eq!(status.message, Some(format!("artifact hash mismatch: expected {wrong}, got {sha}")));
    assert!(!h.work(&tampered.key).join("marker").exists(), "nothing ran");
    assert!(!h.work(&tampered.key).join("run.sh").exists(), "nothing was unpacked");
    let artifacts: Vec<_> = std::fs::read_dir(h.dir.path().join("artifacts"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(artifacts, [format!("{sha}.tar.gz")], "the mismatching download was deleted");

    let port = free_port().await;
    let unreachable = with_artifact(
        spec("unreachable", &["./run.sh"]),
        &format!("http://127.0.0.1:{port}/a.tar.gz"),
        &"1".repeat(64),
    );
    h.runtime().ensure(unreachable.clone()).await;
    let status = wait_status(h.runtime(), &unreachable.key, "Backoff", |s| s.phase == Phase::Backoff).await;
    assert!(status.message.as_deref().unwrap().starts_with("cannot download artifact"), "{status:?}");
    assert_eq!(status.restarts, 0, "nothing ran, so nothing restarted");

    // A download from a server that never answers does not hold up a stop for long.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hanging = with_artifact(
        spec("hanging", &["./run.sh"]),
        &format!("http://{}/a.tar.gz", silent.local_addr().unwrap()),
        &"2".repeat(64),
    );
    h.runtime().ensure(hanging.clone()).await;
    wait_status(h.runtime(), &hanging.key, "Downloading", |s| s.phase == Phase::Downloading).await;
    let (_connection, _) = tokio::time::timeout(DEADLINE, silent.accept()).await.unwrap().unwrap();
    tokio::time::timeout(DEADLINE, h.runtime().stop(&hanging.key)).await.expect("stop completes");
    assert!(!h.runtime().statuses().borrow().contains_key(&hanging.key));
}
