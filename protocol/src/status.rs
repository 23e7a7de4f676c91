//! What agents report: instance phases, status snapshots, events and their place
//! in their network cluster. Phases and reasons are enums both sides share.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where an instance is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Accepted, not started yet.
    Pending,
    /// Its artifact is being downloaded, verified or unpacked.
    Downloading,
    /// Its process is being started.
    Starting,
    /// Its process runs; the health check has not passed yet.
    Running,
    /// Its process runs and its health check passes (or it has none).
    Ready,
    /// Its health check failed `failureThreshold` times in a row; it is being restarted.
    Unhealthy,
    /// It exited or failed to start and waits before the next start.
    Backoff,
    /// It exited with code 0 and its restart policy does not restart it.
    Succeeded,
    /// It failed and is not restarted: a failed exit under `Never`, or a spec that cannot run.
    Failed,
    /// A phase of a newer agent that this build does not know.
    #[serde(other)]
    Unknown,
}

impl Phase {
    /// The phase's name, as stored and sent.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Downloading => "Downloading",
            Phase::Starting => "Starting",
            Phase::Running => "Running",
            Phase::Ready => "Ready",
            Phase::Unhealthy => "Unhealthy",
            Phase::Backoff => "Backoff",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
            Phase::Unknown => "Unknown",
        }
    }

    /// Whether the instance is done and waits only for a new spec.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }

    /// Whether a process of the instance runs.
    pub fn is_running(self) -> bool {
        matches!(self, Phase::Running | Phase::Ready | Phase::Unhealthy)
    }

    /// Whether the instance is failing: failed for good, crash-looping or unhealthy.
    pub fn is_failing(self) -> bool {
        matches!(self, Phase::Failed | Phase::Backoff | Phase::Unhealthy)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an instance failed for good (phase Failed), as the agent knows it without reading messages.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// The workload cannot run as given (no command, an invalid health check).
    InvalidSpec,
    /// The downloaded artifact is not the one the spec's sha256 names.
    ArtifactHashMismatch,
    /// The artifact cannot be used: an invalid digest, an unsafe or unreadable archive.
    ArtifactInvalid,
    /// The process exited with a failure and its restart policy does not restart it.
    Exited,
    /// A reason of a newer agent that this build does not know.
    #[serde(other)]
    Unknown,
}

/// Something that happened to an instance, as the agent names it in events.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InstanceEvent {
    /// A process of the instance started.
    Started,
    /// The process exited.
    Exited,
    /// Its health check failed too often.
    Unhealthy,
    /// It was restarted.
    Restarted,
    /// It failed for good.
    Failed,
    /// It failed for good because its artifact's digest does not match.
    ArtifactHashMismatch,
    /// The agent went back, by itself, to the version it ran before, because the new
    /// one failed within its `minReadySeconds` (protocol 1.3).
    RolledBackOnDevice,
}

impl InstanceEvent {
    /// The event reason, as Kubernetes Events show it.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceEvent::Started => "Started",
            InstanceEvent::Exited => "Exited",
            InstanceEvent::Unhealthy => "Unhealthy",
            InstanceEvent::Restarted => "Restarted",
            InstanceEvent::Failed => "Failed",
            InstanceEvent::ArtifactHashMismatch => "ArtifactHashMismatch",
            InstanceEvent::RolledBackOnDevice => "RolledBackOnDevice",
        }
    }

    /// The event of a failure for `reason`.
    pub fn failed(reason: Option<FailureReason>) -> InstanceEvent {
        match reason {
            Some(FailureReason::ArtifactHashMismatch) => InstanceEvent::ArtifactHashMismatch,
            _ => InstanceEvent::Failed,
        }
    }
}

/// Role of a node in its network cluster.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum NodeRole {
    /// The elected supernode of the cluster.
    Supernode,
    /// A member reporting through the supernode.
    Member,
}

/// A node's full instance status (content of MetaSync on [`crate::STATUS_RESOURCE`]).
/// Sent every `meta.sync.podstatus.interval` seconds and, coalesced, on every
/// phase change. Each report supersedes the previous one of the same node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    /// Milliseconds since the epoch when the agent took the snapshot.
    pub taken_ms: i64,
    /// Every instance the node runs or tried to run.
    pub instances: Vec<InstanceReport>,
    /// The node's place in its network cluster, as its own election sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterView>,
}

/// A node's view of its network cluster, carried in its status reports.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    /// Whether the node is its cluster's supernode.
    pub role: NodeRole,
    /// The supernode the node follows (itself when it is the supernode), if any is elected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supernode: Option<String>,
}

/// Status of one instance in a [`StatusReport`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct InstanceReport {
    /// Resource string of the microservice (`namespace/microservice/name`).
    pub resource: String,
    /// Version of the assignment the instance runs.
    pub version: String,
    /// Phase.
    pub phase: Phase,
    /// Whether the instance passes its health check.
    pub ready: bool,
    /// Restarts so far.
    pub restarts: u32,
    /// What went wrong, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Why it failed for good, when it did (protocol 1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<FailureReason>,
    /// Ports the instance declares (`spec.ports`), for endpoint discovery.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<i32>,
    /// The version the agent was sent and went back from, by itself, because it failed
    /// its health check within its `minReadySeconds`; `version` is the one it went back
    /// to (protocol 1.3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_from: Option<String>,
}

impl InstanceReport {
    /// The report of an instance of `resource` at `version` in `phase`: ready when Ready,
    /// no restarts, no message, no ports.
    pub fn new(resource: &str, version: &str, phase: Phase) -> InstanceReport {
        InstanceReport {
            rolled_back_from: None,
            resource: resource.to_owned(),
            version: version.to_owned(),
            phase,
            ready: phase == Phase::Ready,
            restarts: 0,
            message: None,
            reason: None,
            ports: Vec::new(),
        }
    }
}

/// Something that happened to an instance, for `kubectl describe` (content of
/// MetaSync on the instance's resource string). Unlike status reports, events
/// are never collapsed: each is delivered. The reason is an [`InstanceEvent`]
/// for what the agent saw, or one a microservice chose through its local API.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EventReport {
    /// Whether it is a warning (otherwise normal).
    pub warning: bool,
    /// One-word reason, for example Started, Exited or ArtifactHashMismatch.
    pub reason: String,
    /// What happened, for people.
    pub message: String,
}

impl EventReport {
    /// An event the agent saw.
    pub fn instance(event: InstanceEvent, warning: bool, message: String) -> EventReport {
        EventReport { warning, reason: event.as_str().to_owned(), message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_cross_the_wire_by_name_and_unknown_ones_are_kept_apart() {
        for phase in [Phase::Pending, Phase::Ready, Phase::Backoff, Phase::Failed] {
            let text = serde_json::to_string(&phase).unwrap();
            assert_eq!(text, format!("\"{}\"", phase.as_str()));
            assert_eq!(serde_json::from_str::<Phase>(&text).unwrap(), phase);
        }
        assert_eq!(serde_json::from_str::<Phase>("\"Hibernating\"").unwrap(), Phase::Unknown);
        assert!(Phase::Unhealthy.is_running() && Phase::Unhealthy.is_failing());
        assert!(!Phase::Starting.is_running() && !Phase::Succeeded.is_failing() && Phase::Succeeded.is_terminal());
    }

    #[test]
    fn reports_of_protocol_1_0_read_without_a_reason() {
        let old = serde_json::json!({"resource": "t/microservice/a", "version": "1-u", "phase": "Backoff",
            "ready": false, "restarts": 3, "message": "exited with code 2"});
        let r: InstanceReport = serde_json::from_value(old).unwrap();
        assert_eq!((r.phase, r.reason), (Phase::Backoff, None));
        assert_eq!(InstanceEvent::failed(Some(FailureReason::ArtifactHashMismatch)).as_str(), "ArtifactHashMismatch");
        assert_eq!(InstanceEvent::failed(None), InstanceEvent::Failed);
        assert_eq!(serde_json::from_str::<FailureReason>("\"Whatever\"").unwrap(), FailureReason::Unknown);
    }
}
