//! Names shared by the controller, the agent, the chart and the tests.

/// API group of every supermesh custom resource.
pub const GROUP: &str = "supermesh.io";
/// API version of the custom resources.
pub const VERSION: &str = "v1alpha1";
/// Field manager used for every server-side apply made by the controller.
pub const CONTROLLER_MANAGER: &str = "supermesh-controller";
/// Finalizer the controller puts on every supermesh object it reconciles.
pub const FINALIZER: &str = "supermesh.io/cleanup";

/// Annotations of an EdgeNode's identity: the cloud's own record of who may be the node.
pub mod identity {
    /// SHA-256 (hex) of the public key enrolled for the node; its certificates must carry that key.
    /// Removed by `supermeshctl node reset`, after which a token may enroll the name again.
    pub const KEY: &str = "supermesh.io/identity";
    /// Set (to the time, RFC 3339) by `supermeshctl node revoke`: the node's certificates no longer count.
    pub const REVOKED: &str = "supermesh.io/revoked";
    /// `"false"` while the node awaits approval (it is sent nothing); `"true"` once approved.
    /// A node without it (registered before enrollment existed) counts as approved.
    pub const APPROVED: &str = "supermesh.io/approved";
    /// Id of the bootstrap token the node enrolled with.
    pub const ENROLLED_WITH: &str = "supermesh.io/enrolled-with";
}

/// Condition types and reasons, one spelling for code, docs and tests.
pub mod condition {
    pub const READY: &str = "Ready";
    pub const PROGRESSING: &str = "Progressing";
    pub const DEGRADED: &str = "Degraded";
    pub const CONNECTED: &str = "Connected";
    pub const APPROVED: &str = "Approved";

    /// Approved=False: the node enrolled with a token that does not approve, and awaits `supermeshctl node approve`.
    pub const PENDING_APPROVAL: &str = "PendingApproval";
    /// Approved=True: approved by a token or an admin.
    pub const NODE_APPROVED: &str = "NodeApproved";

    /// The Microservice's mesh does not exist in its namespace.
    pub const MESH_NOT_FOUND: &str = "MeshNotFound";
    /// The spec is well-typed but inconsistent (for example a Proximity mesh without `proximity`).
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The Microservice's mesh is itself invalid.
    pub const MESH_INVALID: &str = "MeshInvalid";
    /// No node of the mesh matches the Microservice.
    pub const NO_MATCHING_NODES: &str = "NoMatchingNodes";
    /// The nodes that match the Microservice do not allow what its securityContext or artifact needs.
    pub const SECURITY_NOT_ALLOWED: &str = "SecurityNotAllowed";
    /// A ConfigMap or Secret key the spec references is missing or unusable.
    pub const CONFIG_MISSING: &str = "ConfigMissing";
    /// Instances were placed and are awaited on their nodes.
    pub const PLACED: &str = "Placed";
    /// Not every desired instance reports ready yet.
    pub const INSTANCES_NOT_READY: &str = "InstancesNotReady";
    /// Every desired instance reports ready.
    pub const INSTANCES_READY: &str = "InstancesReady";
    /// A Mesh whose spec is valid.
    pub const MESH_VALID: &str = "Valid";
    /// No instance is failing.
    pub const AS_EXPECTED: &str = "AsExpected";
    /// Degraded: an instance failed for good.
    pub const INSTANCE_FAILED: &str = "InstanceFailed";
    /// Degraded: an instance keeps exiting and is restarted with backoff.
    pub const CRASH_LOOP: &str = "CrashLoop";
    /// Degraded: an instance fails its health check.
    pub const UNHEALTHY: &str = "Unhealthy";
    /// Event: an agent went back, by itself, to the version it ran before, because the new
    /// one failed its health check within `minReadySeconds` on the device.
    pub const ROLLED_BACK_ON_DEVICE: &str = "RolledBackOnDevice";
    /// Event: an agent refused a change the cloud sent it (say, a field its version cannot
    /// take); the change is sent again.
    pub const CHANGE_REFUSED: &str = "ChangeRefused";
    /// Progressing=True: a new revision is rolled out in waves.
    pub const ROLLING_OUT: &str = "RollingOut";
    /// Progressing=True: the latest rollout reached every node.
    pub const ROLLOUT_COMPLETE: &str = "RolloutComplete";
    /// Progressing=False: the rollout is paused (by the spec, the health gate or its deadline).
    pub const ROLLOUT_PAUSED: &str = "RolloutPaused";
    /// Progressing=False: the health gate sent the fleet back to the current revision.
    pub const ROLLED_BACK: &str = "RolledBack";
    /// A rollout's wave started (Event).
    pub const ROLLOUT_WAVE: &str = "RolloutWave";
    /// Why a rollout paused: `spec.rollout.paused`.
    pub const PAUSED: &str = "Paused";
    /// Why a rollout paused: too many updated instances failed.
    pub const HEALTH_GATE: &str = "HealthGate";
    /// Why a rollout paused: a wave's instances were not ready within `progressDeadlineSeconds`.
    pub const PROGRESS_DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";
    /// An EdgeNode whose agent has not connected to the cloud yet.
    pub const AGENT_NEVER_CONNECTED: &str = "AgentNeverConnected";
    /// An EdgeNode whose agent holds a session with the cloudhub.
    pub const AGENT_CONNECTED: &str = "AgentConnected";
    /// An EdgeNode whose agent lost its session; its instances keep running.
    pub const AGENT_DISCONNECTED: &str = "AgentDisconnected";
}
