//! Reports agents send about nodes, directly or relayed by a supernode: who may
//! send them, and how they are taken (by the index, and as Kubernetes Events).

use std::collections::BTreeMap;

use supermesh_protocol::{BatchAck, Report, ReportBatch, OUTBOX_ID_PREFIX};
use tracing::debug;

use super::events::Events;
use crate::forward::Forwarder;
use crate::index::Index;
use crate::metrics::Metrics;

/// The outbox seq of a report an agent sends directly, from its message id `o-<seq>`.
pub fn outbox_seq(message_id: &str) -> Option<i64> {
    message_id.strip_prefix(OUTBOX_ID_PREFIX)?.parse().ok()
}

/// Whether the session of node `relay` may report for `node`: for itself always, for
/// another node only when both are EdgeNodes on the same network. `network_of` reads
/// a node's `spec.network` from the index.
pub fn may_report_for(relay: &str, node: &str, network_of: impl Fn(&str) -> Option<String>) -> Result<(), String> {
    if node == relay {
        return Ok(());
    }
    let Some(network) = network_of(node) else {
        return Err(format!("node {node} has no EdgeNode"));
    };
    match network_of(relay) {
        Some(own) if own == network => Ok(()),
        Some(own) => Err(format!("node {node} is on network {network}, not on {relay}'s network {own}")),
        None => Err(format!("the relaying node {relay} has no EdgeNode")),
    }
}

/// A report of a batch that may be taken, with the node, outbox seq and resource it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Relayed {
    /// The node the report is about.
    pub node: String,
    /// Its seq in that node's outbox.
    pub seq: i64,
    /// The report's resource: the node's status, or the instance an event is about.
    pub resource: String,
    /// The report.
    pub report: Report,
}

/// Splits the batch node `relay` sends into the reports to take and the answer: each
/// report the relay may send ([`may_report_for`]) and that reads well is taken and
/// acknowledged, every other one is refused with its reason; a report of a node the index
/// does not know (yet) is neither, so the supernode sends it again.
pub fn judge_batch(
    relay: &str,
    batch: ReportBatch,
    network_of: impl Fn(&str) -> Option<String>,
) -> (Vec<Relayed>, BatchAck) {
    let mut taken = Vec::with_capacity(batch.entries.len());
    let mut ack = BatchAck::default();
    for entry in batch.entries {
        // A node the index does not know yet may be one that just registered: its report is
        // neither taken nor refused (refused reports are deleted), so it comes again.
        if network_of(&entry.node).is_none() {
            continue;
        }
        let checked = may_report_for(relay, &entry.node, &network_of)
            .and_then(|()| Report::relayed(&entry).map_err(|e| e.to_string()));
        match checked {
            Ok(report) => {
                ack.acked.push(entry.id());
                taken.push(Relayed { node: entry.node, seq: entry.seq, resource: entry.resource, report });
            }
            Err(reason) => ack.refused.push((entry.id(), reason)),
        }
    }
    (taken, ack)
}

/// Where reports go: the index takes statuses, events become Kubernetes Events.
pub struct Intake<'a> {
    /// The fleet index.
    pub index: &'a Index,
    /// Publishes instance events.
    pub events: &'a Events,
    /// Counts what was taken.
    pub metrics: &'a Metrics,
    /// Hands the statuses taken to the other replicas.
    pub forward: &'a Forwarder,
}

impl Intake<'_> {
    /// Takes one report about `node` on `resource`, with its outbox `seq` when known. Only
    /// instances placed on the node count, or held by its own session (`held`); an event
    /// whose seq was taken before is dropped.
    pub fn take(
        &self,
        node: &str,
        seq: Option<i64>,
        resource: &str,
        report: Report,
        held: Option<&BTreeMap<String, String>>,
    ) {
        match report {
            Report::Status(status) => {
                self.metrics.status_reports.inc();
                // A copy only for other replicas: a lone replica takes reports without one.
                let forwarded = self.forward.has_peers().then(|| status.clone());
                if self.index.take_status(node, status, held) {
                    if let Some(forwarded) = forwarded {
                        self.forward.report(node, &forwarded);
                    }
                } else {
                    self.metrics.reports_duplicate.inc();
                }
            }
            Report::Event(event) => {
                if seq.is_some_and(|seq| !self.index.first_event(node, seq)) {
                    debug!(%node, ?seq, %resource, "event taken before; not published again");
                    self.metrics.reports_duplicate.inc();
                    return;
                }
                if let Some(target) = self.index.event_target(node, resource) {
                    self.events.publish(target, node, event);
                }
            }
            // A batch inside a batch never reaches here: `Report::relayed` refuses it.
            Report::Batch(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use supermesh_protocol::{Operation, RelayedReport, STATUS_RESOURCE};

    fn networks(node: &str) -> Option<String> {
        match node {
            "super" | "member" => Some("lan".into()),
            "stranger" => Some("other-lan".into()),
            _ => None,
        }
    }

    #[test]
    fn a_supernode_reports_for_itself_and_its_network_only() {
        assert_eq!(may_report_for("super", "super", networks), Ok(()));
        assert_eq!(may_report_for("super", "member", networks), Ok(()));
        let other = may_report_for("super", "stranger", networks).unwrap_err();
        assert!(other.contains("network other-lan") && other.contains("network lan"), "{other}");
        let unknown = may_report_for("super", "ghost", networks).unwrap_err();
        assert!(unknown.contains("ghost has no EdgeNode"), "{unknown}");
        assert_eq!(may_report_for("new", "new", networks), Ok(()), "a node always reports for itself");
        assert!(may_report_for("new", "member", networks).is_err(), "a relay without an EdgeNode reports for nobody");
    }

    fn entry(node: &str, seq: i64, resource: &str, content: serde_json::Value) -> RelayedReport {
        RelayedReport {
            node: node.into(),
            seq,
            operation: Operation::MetaSync,
            resource: resource.into(),
            content,
            created_ms: 1,
        }
    }

    #[test]
    fn a_batch_is_taken_for_the_relay_s_network_and_refused_elsewhere() {
        let status = json!({"takenMs": 5, "instances": []});
        let event = json!({"warning": false, "reason": "Started", "message": "pid 7"});
        let batch = ReportBatch {
            entries: vec![
                entry("member", 1, STATUS_RESOURCE, status.clone()),
                entry("stranger", 2, STATUS_RESOURCE, status.clone()),
                entry("member", 3, "team/microservice/web", event.clone()),
                entry("ghost", 4, "team/microservice/web", event),
                entry("super", 9, STATUS_RESOURCE, status),
                entry("member", 5, STATUS_RESOURCE, json!({"bad": true})),
            ],
        };
        let (taken, ack) = judge_batch("super", batch, networks);
        let taken: Vec<(&str, i64)> = taken.iter().map(|r| (r.node.as_str(), r.seq)).collect();
        assert_eq!(taken, [("member", 1), ("member", 3), ("super", 9)]);
        let acked: Vec<(&str, i64)> = ack.acked.iter().map(|id| (id.node.as_str(), id.seq)).collect();
        assert_eq!(acked, taken, "what is taken is acknowledged");
        let refused: Vec<(&str, i64)> = ack.refused.iter().map(|(id, _)| (id.node.as_str(), id.seq)).collect();
        assert_eq!(refused, [("stranger", 2), ("member", 5)], "a node not known yet is left to come again");
        assert!(ack.refused[0].1.contains("other-lan"), "{}", ack.refused[0].1);
        assert!(ack.refused[1].1.contains("MetaSync message is invalid"), "{}", ack.refused[1].1);
    }

    #[test]
    fn direct_reports_carry_their_outbox_seq_in_the_id() {
        assert_eq!(outbox_seq("o-42"), Some(42));
        assert_eq!(outbox_seq("o-x"), None);
        assert_eq!(outbox_seq("42"), None);
        assert_eq!(outbox_seq("c1-7"), None);
    }
}
