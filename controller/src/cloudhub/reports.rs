//! Reports agents send about nodes, directly or relayed by a supernode: who may
//! send them, and how they are taken (by the index, and as Kubernetes Events).

use std::collections::BTreeMap;

use supermesh_protocol::{BatchAck, Report, ReportBatch, OUTBOX_ID_PREFIX};
use tracing::debug;

use super::events::Events;
use crate::forward::Forwarder;
use crate::index::Index;
use crate::metrics::Metrics;
pub use crate::view::Reporter;

/// The outbox seq of a report an agent sends directly, from its message id `o-<seq>`.
pub fn outbox_seq(message_id: &str) -> Option<i64> {
    message_id.strip_prefix(OUTBOX_ID_PREFIX)?.parse().ok()
}

/// How far ahead of the cloud's clock a report may be stamped: devices' clocks drift a
/// little; a report from further ahead would hide every later one of its node.
pub const MAX_CLOCK_AHEAD_MS: i64 = 60_000;

/// What becomes of one relayed report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Judgement {
    /// Taken and acknowledged.
    Take,
    /// Neither taken nor refused: it comes again (the relay resends what is not acknowledged).
    Later(String),
    /// Refused for good, with the reason (the relay drops it).
    Refuse(String),
}

/// Whether the session of node `relay` may report for `node` (NodeRestriction's rule for
/// devices): for itself always; never across networks; for another node of its network
/// only while the cloud's records make `relay` that network's supernode and `node` follows
/// no other supernode that is still connected. A report for a node the cloud does not know
/// yet, or through a relay it does not know as that node's supernode yet (an election it
/// has not heard of), waits: it comes again and is taken once the records agree, or never.
/// `reporter` reads the index.
pub fn may_report_for(relay: &str, node: &str, reporter: impl Fn(&str) -> Option<Reporter>) -> Judgement {
    if node == relay {
        return Judgement::Take;
    }
    let Some(subject) = reporter(node) else {
        return Judgement::Later(format!("node {node} has no active EdgeNode (yet)"));
    };
    match reporter(relay) {
        None => Judgement::Refuse(format!("the relaying node {relay} has no active EdgeNode")),
        Some(own) if own.network != subject.network => Judgement::Refuse(format!(
            "node {node} is on network {}, not on {relay}'s network {}",
            subject.network, own.network
        )),
        Some(own) if !own.supernode => Judgement::Later(format!(
            "node {relay} is not the supernode of network {} as the cloud knows it",
            own.network
        )),
        Some(_) => match subject.follows {
            Some(other) if other != relay && reporter(&other).is_some_and(|s| s.connected) => {
                Judgement::Later(format!("node {node} follows supernode {other}, which is connected"))
            }
            _ => Judgement::Take,
        },
    }
}

/// Refuses a status report stamped further ahead than [`MAX_CLOCK_AHEAD_MS`] of `now_ms`.
pub fn in_time(report: &Report, now_ms: i64) -> Result<(), String> {
    match report {
        Report::Status(s) if s.taken_ms > now_ms + MAX_CLOCK_AHEAD_MS => Err(format!(
            "the report is stamped {} s in the future; check the device's clock",
            (s.taken_ms - now_ms) / 1000
        )),
        _ => Ok(()),
    }
}

/// Refuses a report with a string or a list beyond its bound (see `supermesh_protocol::bounds`).
pub fn within_bounds(report: &Report) -> Result<(), String> {
    match report {
        Report::Status(s) => s.check_bounds(),
        Report::Event(e) => e.check_bounds(),
        Report::Batch(b) => b.check_bounds(),
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
/// report the relay may send ([`may_report_for`]), stamped in time and reading well is
/// taken and acknowledged; one that waits is neither (it comes again); every other one is
/// refused with its reason. Returns, too, how many wait and the first reason.
pub fn judge_batch(
    relay: &str,
    batch: ReportBatch,
    reporter: impl Fn(&str) -> Option<Reporter>,
    now_ms: i64,
) -> (Vec<Relayed>, BatchAck, Vec<String>) {
    let mut taken = Vec::with_capacity(batch.entries.len());
    let mut ack = BatchAck::default();
    let mut waiting = Vec::new();
    for entry in batch.entries {
        let judged = match may_report_for(relay, &entry.node, &reporter) {
            Judgement::Take => Report::relayed(&entry)
                .map_err(|e| e.to_string())
                .and_then(|report| in_time(&report, now_ms).and_then(|()| within_bounds(&report)).map(|()| report)),
            Judgement::Later(reason) => {
                waiting.push(reason);
                continue;
            }
            Judgement::Refuse(reason) => Err(reason),
        };
        match judged {
            Ok(report) => {
                ack.acked.push(entry.id());
                taken.push(Relayed { node: entry.node, seq: entry.seq, resource: entry.resource, report });
            }
            Err(reason) => ack.refused.push((entry.id(), reason)),
        }
    }
    (taken, ack, waiting)
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
    /// Events each node may post per minute.
    pub budget: &'a EventBudget,
}

/// Events a node may post: [`EVENTS_PER_MINUTE`] a minute, in bursts of a fifth of that.
pub type EventBudget = governor::DefaultKeyedRateLimiter<String>;

/// Events one node may post per minute; more are dropped and counted.
pub const EVENTS_PER_MINUTE: u32 = 600;

/// A fresh budget of events per node.
pub fn event_budget() -> EventBudget {
    let per_minute = std::num::NonZeroU32::new(EVENTS_PER_MINUTE).expect("not zero");
    let burst = std::num::NonZeroU32::new(EVENTS_PER_MINUTE / 5).expect("not zero");
    governor::RateLimiter::keyed(governor::Quota::per_minute(per_minute).allow_burst(burst))
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
                if self.budget.check_key(&node.to_owned()).is_err() {
                    self.metrics.events_dropped.inc();
                    // Nodes that posted nothing lately need no entry (deleted ones included).
                    if self.budget.len() > 10_000 {
                        self.budget.retain_recent();
                    }
                    return;
                }
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

    /// `super` is the supernode of `lan`, `member` a member; `stranger` is on another network;
    /// `rival` claims to be supernode of `lan` too, and `loyal` follows `super`.
    fn reporters(node: &str) -> Option<Reporter> {
        let on = |network: &str, supernode, follows: Option<&str>| {
            Some(Reporter { network: network.into(), supernode, follows: follows.map(str::to_owned), connected: true })
        };
        match node {
            "super" => on("lan", true, Some("super")),
            "rival" => on("lan", true, Some("rival")),
            "member" | "other-member" => on("lan", false, None),
            "loyal" => on("lan", false, Some("super")),
            "stranger" => on("other-lan", true, None),
            _ => None,
        }
    }

    #[test]
    fn a_supernode_reports_for_itself_and_its_network_only() {
        assert_eq!(may_report_for("super", "super", reporters), Judgement::Take);
        assert_eq!(may_report_for("super", "member", reporters), Judgement::Take);
        let Judgement::Refuse(other) = may_report_for("super", "stranger", reporters) else { panic!("refused") };
        assert!(other.contains("network other-lan") && other.contains("network lan"), "{other}");
        assert!(matches!(may_report_for("super", "ghost", reporters), Judgement::Later(_)), "not known yet: later");
        assert_eq!(may_report_for("new", "new", reporters), Judgement::Take, "a node always reports for itself");
        assert!(
            matches!(may_report_for("new", "member", reporters), Judgement::Refuse(_)),
            "a relay without an EdgeNode"
        );
        let Judgement::Later(why) = may_report_for("member", "other-member", reporters) else {
            panic!("a member the cloud does not know as supernode reports for nobody else")
        };
        assert!(why.contains("not the supernode"), "{why}");
        assert_eq!(may_report_for("super", "loyal", reporters), Judgement::Take);
        let Judgement::Later(why) = may_report_for("rival", "loyal", reporters) else {
            panic!("a self-declared supernode does not speak for a node that follows another, connected one")
        };
        assert!(why.contains("follows supernode super"), "{why}");
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
        let future = json!({"takenMs": 5 + MAX_CLOCK_AHEAD_MS + 1_000, "instances": []});
        let event = json!({"warning": false, "reason": "Started", "message": "pid 7"});
        let batch = ReportBatch {
            entries: vec![
                entry("member", 1, STATUS_RESOURCE, status.clone()),
                entry("stranger", 2, STATUS_RESOURCE, status.clone()),
                entry("member", 3, "team/microservice/web", event.clone()),
                entry("ghost", 4, "team/microservice/web", event),
                entry("super", 9, STATUS_RESOURCE, status),
                entry("member", 5, STATUS_RESOURCE, json!({"bad": true})),
                entry("member", 6, STATUS_RESOURCE, future),
            ],
        };
        let (taken, ack, waiting) = judge_batch("super", batch.clone(), reporters, 5);
        let taken: Vec<(&str, i64)> = taken.iter().map(|r| (r.node.as_str(), r.seq)).collect();
        assert_eq!(taken, [("member", 1), ("member", 3), ("super", 9)]);
        let acked: Vec<(&str, i64)> = ack.acked.iter().map(|id| (id.node.as_str(), id.seq)).collect();
        assert_eq!(acked, taken, "what is taken is acknowledged");
        let refused: Vec<(&str, i64)> = ack.refused.iter().map(|(id, _)| (id.node.as_str(), id.seq)).collect();
        assert_eq!(refused, [("stranger", 2), ("member", 5), ("member", 6)], "a node not known yet comes again");
        assert_eq!(waiting.len(), 1);
        assert!(ack.refused[0].1.contains("other-lan"), "{}", ack.refused[0].1);
        assert!(ack.refused[1].1.contains("MetaSync message is invalid"), "{}", ack.refused[1].1);
        assert!(ack.refused[2].1.contains("in the future"), "{}", ack.refused[2].1);

        // The same batch from a member: only its own reports are taken; the others wait.
        let (taken, ack, waiting) = judge_batch("member", batch, reporters, 5);
        let taken: Vec<(&str, i64)> = taken.iter().map(|r| (r.node.as_str(), r.seq)).collect();
        assert_eq!(taken, [("member", 1), ("member", 3)]);
        assert!(waiting.iter().any(|w| w.contains("not the supernode")), "{waiting:?}");
        assert!(ack.acked.iter().all(|id| id.node == "member"));
    }

    #[test]
    fn direct_reports_carry_their_outbox_seq_in_the_id() {
        assert_eq!(outbox_seq("o-42"), Some(42));
        assert_eq!(outbox_seq("o-x"), None);
        assert_eq!(outbox_seq("42"), None);
        assert_eq!(outbox_seq("c1-7"), None);
    }
}
