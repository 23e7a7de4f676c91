//! Reports agents send about nodes, directly or relayed by a supernode: who may
//! send them, and how they are taken (by the index, and as Kubernetes Events).
//!
//! A report relayed for another node is taken only with that node's signature by the
//! key it enrolled; the answer carries a [`Receipt`] per node, signed with the cloud's
//! key, which is what a member deletes its reports on: a supernode can neither forge or
//! alter a member's report nor make it drop one the cloud never took.

use std::collections::BTreeMap;

use supermesh_protocol::signing::CloudKey;
use supermesh_protocol::{BatchAck, Receipt, Receipted, Report, ReportBatch, OUTBOX_ID_PREFIX};
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

/// What [`judge_batch`] makes of a batch.
#[derive(Debug, Default)]
pub struct Judged {
    /// Reports to take.
    pub taken: Vec<Relayed>,
    /// The answer: acked and refused reports, and a signed receipt per node.
    pub ack: BatchAck,
    /// Why each report that comes again waits.
    pub waiting: Vec<String>,
    /// Reports relayed for another node without that node's valid signature.
    pub forged: usize,
}

/// The cloud's own records that [`judge_batch`] reads.
pub struct Records<R, K> {
    /// What the index says of a node as a reporter.
    pub reporter: R,
    /// Fingerprint of the key a node enrolled (none when revoked or reset).
    pub enrolled: K,
}

/// Splits the batch node `relay` sends into the reports to take and the answer: each
/// report the relay may send ([`may_report_for`]) that carries its node's signature (for
/// another node than the relay), stamped in time and reading well is taken and
/// acknowledged; one that waits is neither (it comes again); every other one is refused
/// with its reason. Each node whose reports were taken or refused for good, signature
/// checked, gets a receipt signed with `cloud`; a report that is not its node's gets none,
/// so its node keeps it.
pub fn judge_batch<R, K>(
    relay: &str,
    batch: ReportBatch,
    records: &Records<R, K>,
    cloud: &CloudKey,
    now_ms: i64,
) -> Judged
where
    R: Fn(&str) -> Option<Reporter>,
    K: Fn(&str) -> Option<String>,
{
    let mut judged = Judged { taken: Vec::with_capacity(batch.entries.len()), ..Judged::default() };
    let mut receipted: BTreeMap<String, (String, Vec<Receipted>)> = BTreeMap::new();
    for entry in batch.entries {
        let signed_by = match may_report_for(relay, &entry.node, &records.reporter) {
            Judgement::Take if entry.node == relay => None,
            Judgement::Take => match (records.enrolled)(&entry.node) {
                None => {
                    judged.waiting.push(format!("node {} has no enrolled key to check its reports with", entry.node));
                    continue;
                }
                Some(key) => match entry.verify(&key) {
                    Ok(()) => Some(key),
                    Err(e) => {
                        judged.forged += 1;
                        let reason = format!("the report is not node {}'s: {e}", entry.node);
                        judged.ack.refused.push((entry.id(), reason));
                        continue;
                    }
                },
            },
            Judgement::Later(reason) => {
                judged.waiting.push(reason);
                continue;
            }
            Judgement::Refuse(reason) => {
                judged.ack.refused.push((entry.id(), reason));
                continue;
            }
        };
        let report = Report::relayed(&entry)
            .map_err(|e| e.to_string())
            .and_then(|report| in_time(&report, now_ms).and_then(|()| within_bounds(&report)).map(|()| report));
        if let Some(key) = signed_by {
            let (_, reports) = receipted.entry(entry.node.clone()).or_insert_with(|| (key, Vec::new()));
            reports.push(Receipted { seq: entry.seq, created_ms: entry.created_ms });
        }
        match report {
            Ok(report) => {
                judged.ack.acked.push(entry.id());
                judged.taken.push(Relayed { node: entry.node, seq: entry.seq, resource: entry.resource, report });
            }
            Err(reason) => judged.ack.refused.push((entry.id(), reason)),
        }
    }
    judged.ack.receipts =
        receipted.into_iter().map(|(node, (key, reports))| Receipt::sign(cloud, &node, &key, reports)).collect();
    judged
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
    use supermesh_protocol::identity::key_fingerprint;
    use supermesh_protocol::signing::{KeyAlgorithm, NodeSignature};
    use supermesh_protocol::{Operation, RelayedReport, ReportId, STATUS_RESOURCE};

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

    /// The keys nodes enrolled, as the cloud's records give them.
    struct Keys(BTreeMap<&'static str, rcgen::KeyPair>);

    impl Keys {
        fn new() -> Keys {
            let names = ["super", "rival", "member", "other-member", "loyal", "stranger", "ghost"];
            Keys(names.into_iter().map(|n| (n, rcgen::KeyPair::generate().unwrap())).collect())
        }

        fn enrolled(&self, node: &str) -> Option<String> {
            self.0.get(node).map(|k| key_fingerprint(k.public_key_raw()))
        }

        /// `report` signed by `node`'s key.
        fn signed(&self, node: &str, report: RelayedReport) -> RelayedReport {
            let key = &self.0[node];
            report.sign(|purpose, body| {
                let value = rcgen::SigningKey::sign(key, &purpose.message(body)).ok()?;
                Some(NodeSignature {
                    algorithm: KeyAlgorithm::EcdsaP256,
                    key: hex::encode(key.public_key_raw()),
                    value: hex::encode(value),
                })
            })
        }

        fn records(&self) -> Records<impl Fn(&str) -> Option<Reporter>, impl Fn(&str) -> Option<String> + '_> {
            Records { reporter: reporters, enrolled: |n: &str| self.enrolled(n) }
        }
    }

    fn entry(node: &str, seq: i64, resource: &str, content: serde_json::Value) -> RelayedReport {
        RelayedReport {
            node: node.into(),
            seq,
            operation: Operation::MetaSync,
            resource: resource.into(),
            content,
            created_ms: 1,
            signature: None,
        }
    }

    fn ids(ids: impl IntoIterator<Item = ReportId>) -> Vec<(String, i64)> {
        ids.into_iter().map(|id| (id.node, id.seq)).collect()
    }

    fn pairs(list: &[(&str, i64)]) -> Vec<(String, i64)> {
        list.iter().map(|(n, s)| (n.to_string(), *s)).collect()
    }

    #[test]
    fn a_batch_is_taken_for_the_relay_s_network_and_refused_elsewhere() {
        let keys = Keys::new();
        let cloud = CloudKey::derive("root");
        let status = json!({"takenMs": 5, "instances": []});
        let future = json!({"takenMs": 5 + MAX_CLOCK_AHEAD_MS + 1_000, "instances": []});
        let event = json!({"warning": false, "reason": "Started", "message": "pid 7"});
        let by = |node: &str, seq, resource: &str, content: &serde_json::Value| {
            keys.signed(node, entry(node, seq, resource, content.clone()))
        };
        let batch = ReportBatch {
            entries: vec![
                by("member", 1, STATUS_RESOURCE, &status),
                by("stranger", 2, STATUS_RESOURCE, &status),
                by("member", 3, "team/microservice/web", &event),
                by("ghost", 4, "team/microservice/web", &event),
                entry("super", 9, STATUS_RESOURCE, status.clone()),
                by("member", 5, STATUS_RESOURCE, &json!({"bad": true})),
                by("member", 6, STATUS_RESOURCE, &future),
            ],
        };
        let judged = judge_batch("super", batch.clone(), &keys.records(), &cloud, 5);
        let taken: Vec<(String, i64)> = judged.taken.iter().map(|r| (r.node.clone(), r.seq)).collect();
        assert_eq!(taken, pairs(&[("member", 1), ("member", 3), ("super", 9)]));
        assert_eq!(ids(judged.ack.acked.clone()), taken, "what is taken is acknowledged");
        let refused = ids(judged.ack.refused.iter().map(|(id, _)| id.clone()));
        assert_eq!(
            refused,
            pairs(&[("stranger", 2), ("member", 5), ("member", 6)]),
            "a node not known yet comes again"
        );
        assert_eq!((judged.waiting.len(), judged.forged), (1, 0));
        let reasons: Vec<&str> = judged.ack.refused.iter().map(|(_, r)| r.as_str()).collect();
        assert!(reasons[0].contains("other-lan"), "{}", reasons[0]);
        assert!(reasons[1].contains("MetaSync message is invalid"), "{}", reasons[1]);
        assert!(reasons[2].contains("in the future"), "{}", reasons[2]);
        // One receipt, for the member, naming what was taken or refused for good; the stranger's
        // report was refused because of the relay, so its node keeps it.
        let [receipt] = &judged.ack.receipts[..] else { panic!("{:?}", judged.ack.receipts) };
        assert!(receipt.verify(&cloud.public(), "member", &keys.enrolled("member").unwrap()));
        let seqs: Vec<i64> = receipt.reports.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 3, 5, 6]);

        // The same batch from a member: only its own reports are taken; the others wait.
        let judged = judge_batch("member", batch, &keys.records(), &cloud, 5);
        let taken: Vec<(String, i64)> = judged.taken.iter().map(|r| (r.node.clone(), r.seq)).collect();
        assert_eq!(taken, pairs(&[("member", 1), ("member", 3)]));
        assert!(judged.waiting.iter().any(|w| w.contains("not the supernode")), "{:?}", judged.waiting);
        assert!(judged.ack.acked.iter().all(|id| id.node == "member"));
        assert!(judged.ack.receipts.is_empty(), "a node's own reports need no receipt: its session is its own");
    }

    #[test]
    fn a_report_relayed_without_its_node_s_signature_is_refused_and_gets_no_receipt() {
        let keys = Keys::new();
        let cloud = CloudKey::derive("root");
        let status = json!({"takenMs": 5, "instances": []});
        let genuine = keys.signed("member", entry("member", 1, STATUS_RESOURCE, status.clone()));
        let mut altered = keys.signed("member", entry("member", 2, STATUS_RESOURCE, status.clone()));
        altered.content = json!({"takenMs": 5, "instances": [], "cluster": {"role": "Member", "supernode": "super"}});
        let unsigned = entry("member", 3, STATUS_RESOURCE, status.clone());
        let by_relay = keys.signed("super", entry("member", 4, STATUS_RESOURCE, status.clone()));
        let batch = ReportBatch { entries: vec![genuine, altered, unsigned, by_relay] };
        let judged = judge_batch("super", batch, &keys.records(), &cloud, 5);
        assert_eq!(ids(judged.ack.acked.clone()), pairs(&[("member", 1)]));
        assert_eq!(judged.forged, 3);
        let refused = ids(judged.ack.refused.iter().map(|(id, _)| id.clone()));
        assert_eq!(refused, pairs(&[("member", 2), ("member", 3), ("member", 4)]));
        assert!(judged.ack.refused.iter().all(|(_, r)| r.contains("not node member's")), "{:?}", judged.ack.refused);
        let [receipt] = &judged.ack.receipts[..] else { panic!("{:?}", judged.ack.receipts) };
        assert_eq!(receipt.reports, [Receipted { seq: 1, created_ms: 1 }], "only the genuine report is receipted");
    }

    #[test]
    fn direct_reports_carry_their_outbox_seq_in_the_id() {
        assert_eq!(outbox_seq("o-42"), Some(42));
        assert_eq!(outbox_seq("o-x"), None);
        assert_eq!(outbox_seq("42"), None);
        assert_eq!(outbox_seq("c1-7"), None);
    }
}
