//! A supernode's batches of its cluster's reports, and the cloud's answer.

use serde::{Deserialize, Serialize};

use crate::Operation;

/// Reports of several nodes of one cluster, sent upstream by their supernode in one
/// message (content of MetaSync on [`crate::BATCH_RESOURCE`]). The cloud answers with a
/// Response carrying a [`BatchAck`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReportBatch {
    /// The reports, oldest first per node.
    pub entries: Vec<RelayedReport>,
}

/// One outbox entry of a node, relayed by its supernode.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RelayedReport {
    /// The node that made the report.
    pub node: String,
    /// Its seq in that node's outbox: the node deletes it when this is acknowledged.
    pub seq: i64,
    /// Operation of the report (MetaSync).
    pub operation: Operation,
    /// Resource of the report: [`crate::STATUS_RESOURCE`] or an instance's resource string for events.
    pub resource: String,
    /// The report itself ([`crate::StatusReport`] or [`crate::EventReport`]), read with
    /// [`crate::Report::relayed`].
    pub content: serde_json::Value,
    /// When the node queued it, milliseconds since the epoch.
    pub created_ms: i64,
}

impl RelayedReport {
    /// Which report this is, for acks.
    pub fn id(&self) -> ReportId {
        ReportId { node: self.node.clone(), seq: self.seq }
    }
}

/// Names one relayed report: node and outbox seq.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct ReportId {
    /// The node that made the report.
    pub node: String,
    /// Its outbox seq.
    pub seq: i64,
}

/// The cloud's answer to a [`ReportBatch`] (content of the Response).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BatchAck {
    /// Reports taken (or already taken before): their nodes delete them.
    pub acked: Vec<ReportId>,
    /// Reports refused for good, with the reason (for example a node of another network);
    /// their nodes delete them too, since sending them again cannot succeed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<(ReportId, String)>,
}
