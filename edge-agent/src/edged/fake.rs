//! `FakeRuntime`: instances that exist only in memory, for scale simulation
//! (many hollow agents on one machine), never for running real workloads.

use std::collections::BTreeSet;

use tokio::sync::watch;

use super::runtime::{now_ms, InstanceSpec, InstanceStatus, Phase, Runtime, Statuses};

/// A runtime whose instances are `Ready` as soon as they are ensured; no process runs.
#[derive(Debug)]
pub struct FakeRuntime {
    statuses: watch::Sender<Statuses>,
}

impl FakeRuntime {
    /// An empty fake runtime.
    pub fn new() -> FakeRuntime {
        FakeRuntime { statuses: watch::Sender::new(Statuses::new()) }
    }
}

impl Default for FakeRuntime {
    fn default() -> FakeRuntime {
        FakeRuntime::new()
    }
}

impl Runtime for FakeRuntime {
    async fn ensure(&self, spec: InstanceSpec) {
        // Only a new key or version is a change, so repeated ensures publish nothing.
        self.statuses.send_if_modified(|statuses| {
            if statuses.get(&spec.key).is_some_and(|status| status.version == spec.version) {
                return false;
            }
            let status = InstanceStatus { phase: Phase::Ready, since_ms: now_ms(), ..InstanceStatus::of(&spec) };
            statuses.insert(spec.key, status);
            true
        });
    }

    async fn stop(&self, key: &str) {
        self.statuses.send_if_modified(|statuses| statuses.remove(key).is_some());
    }

    fn statuses(&self) -> watch::Receiver<Statuses> {
        self.statuses.subscribe()
    }

    fn running_keys(&self) -> BTreeSet<String> {
        self.statuses.borrow().keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use supermesh_protocol::{Port, Protocol, RestartPolicy, Workload};

    use super::*;

    fn spec(version: &str) -> InstanceSpec {
        InstanceSpec {
            key: "team/microservice/web".into(),
            namespace: "team".into(),
            name: "web".into(),
            version: version.into(),
            spec: Workload {
                mesh: "lan".into(),
                command: vec!["web".into()],
                args: vec![],
                env: vec![],
                files: vec![],
                artifact: None,
                ports: vec![Port { name: Some("http".into()), port: 8080, protocol: Protocol::TCP }],
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

    #[tokio::test]
    async fn instances_are_ready_at_once_and_replaced_by_version() {
        let runtime = FakeRuntime::new();
        let mut statuses = runtime.statuses();
        runtime.ensure(spec("1")).await;
        assert!(statuses.has_changed().unwrap());
        let status = statuses.borrow_and_update()["team/microservice/web"].clone();
        assert_eq!((status.phase, status.version.as_str(), status.pid), (Phase::Ready, "1", None));
        assert_eq!(status.ports, [8080], "declared ports are in the status, for endpoint discovery");

        runtime.ensure(spec("1")).await;
        assert!(!statuses.has_changed().unwrap(), "the same version is no change");
        runtime.ensure(spec("2")).await;
        assert_eq!(statuses.borrow_and_update()["team/microservice/web"].version, "2");
        assert_eq!(runtime.running_keys(), BTreeSet::from(["team/microservice/web".to_owned()]));

        runtime.stop("team/microservice/web").await;
        assert!(runtime.running_keys().is_empty());
        assert!(statuses.borrow().is_empty());
    }
}
