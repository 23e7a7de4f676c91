//! The supernode's relay queue: reports of the cluster's members (and its own)
//! waiting to go upstream in one batch. Pure bookkeeping, no I/O.
//!
//! A report stays in its member's SQLite outbox until the cloud acknowledges it
//! end to end, so this queue may forget anything (a restart, a lost election)
//! without losing a report: the member sends it again.

use std::collections::{BTreeMap, HashMap};

use supermesh_protocol::{
    BatchAck, InstanceReport, RelayedReport, ReportBatch, ReportId, StatusReport, STATUS_RESOURCE,
};

/// Why a report was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the relay queue holds {0} reports, its limit; send again later")]
pub struct Full(pub usize);

#[derive(Debug, Clone)]
struct Queued {
    report: RelayedReport,
    bytes: usize,
    batch: Option<String>,
}

/// Reports waiting to go upstream, and the batches in flight.
#[derive(Debug)]
pub struct Queue {
    entries: BTreeMap<ReportId, Queued>,
    /// Instances in the last status report queued per node, to tell changes from repeats.
    last_status: HashMap<String, Vec<InstanceReport>>,
    limit: usize,
}

impl Queue {
    /// An empty queue holding at most `limit` reports.
    pub fn new(limit: usize) -> Queue {
        Queue { entries: BTreeMap::new(), last_status: HashMap::new(), limit }
    }

    /// Number of queued reports, in flight or not.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Queues `report`; returns whether it is urgent (an event, or a status that changed
    /// since the node's previous one), which flushes the queue after a short coalescing
    /// window instead of at the next interval. A report already queued is ignored; a
    /// status report supersedes the node's older ones that are not in flight.
    pub fn push(&mut self, report: RelayedReport) -> Result<bool, Full> {
        let id = report.id();
        if self.entries.contains_key(&id) {
            return Ok(false);
        }
        let urgent = if report.resource == STATUS_RESOURCE {
            let instances =
                serde_json::from_value::<StatusReport>(report.content.clone()).map(|s| s.instances).unwrap_or_default();
            self.entries.retain(|other, q| {
                !(other.node == id.node
                    && other.seq < id.seq
                    && q.batch.is_none()
                    && q.report.resource == STATUS_RESOURCE)
            });
            self.last_status.insert(id.node.clone(), instances.clone()) != Some(instances)
        } else {
            true
        };
        if self.entries.len() >= self.limit {
            return Err(Full(self.limit));
        }
        let bytes = report.content.to_string().len() + report.resource.len() + report.node.len() + 64;
        self.entries.insert(id, Queued { report, bytes, batch: None });
        Ok(urgent)
    }

    /// Takes the reports not in flight, oldest first per node, into batch `batch_id`:
    /// at most `max_entries` of them and about `max_bytes`. `None` if nothing is waiting.
    pub fn take_batch(&mut self, batch_id: &str, max_entries: usize, max_bytes: usize) -> Option<ReportBatch> {
        let mut entries = Vec::new();
        let mut bytes = 0;
        for q in self.entries.values_mut().filter(|q| q.batch.is_none()) {
            if entries.len() >= max_entries || (!entries.is_empty() && bytes + q.bytes > max_bytes) {
                break;
            }
            bytes += q.bytes;
            q.batch = Some(batch_id.to_owned());
            entries.push(q.report.clone());
        }
        (!entries.is_empty()).then_some(ReportBatch { entries })
    }

    /// Whether reports are waiting that are not in flight.
    pub fn has_waiting(&self) -> bool {
        self.entries.values().any(|q| q.batch.is_none())
    }

    /// The cloud's answer to batch `batch_id`: acked and refused reports leave the
    /// queue (and are returned, for their nodes to delete); anything else of the
    /// batch waits for the next one.
    pub fn answered(&mut self, batch_id: &str, ack: &BatchAck) -> Vec<ReportId> {
        let mut done = Vec::new();
        for id in ack.acked.iter().chain(ack.refused.iter().map(|(id, _)| id)) {
            if self.entries.get(id).is_some_and(|q| q.batch.as_deref() == Some(batch_id)) {
                self.entries.remove(id);
            }
            done.push(id.clone());
        }
        self.failed(batch_id);
        done
    }

    /// Batch `batch_id` got no answer: its reports wait for the next batch.
    pub fn failed(&mut self, batch_id: &str) {
        for q in self.entries.values_mut().filter(|q| q.batch.as_deref() == Some(batch_id)) {
            q.batch = None;
        }
    }

    /// Forgets every report: this node is no longer the supernode, members send theirs elsewhere.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.last_status.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use supermesh_protocol::{Operation, Phase};

    fn status(node: &str, seq: i64, phase: Phase) -> RelayedReport {
        let instance = InstanceReport::new("ns/microservice/web", "1-u", phase);
        let content = serde_json::to_value(StatusReport { taken_ms: seq, instances: vec![instance], cluster: None });
        RelayedReport {
            node: node.into(),
            seq,
            operation: Operation::MetaSync,
            resource: STATUS_RESOURCE.into(),
            content: content.unwrap(),
            created_ms: seq,
            signature: None,
        }
    }

    fn event(node: &str, seq: i64) -> RelayedReport {
        RelayedReport {
            node: node.into(),
            seq,
            operation: Operation::MetaSync,
            resource: "ns/microservice/web".into(),
            content: serde_json::json!({"warning": false, "reason": "Tick", "message": format!("tick {seq}")}),
            created_ms: seq,
            signature: None,
        }
    }

    fn ids(batch: &ReportBatch) -> Vec<(String, i64)> {
        batch.entries.iter().map(|r| (r.node.clone(), r.seq)).collect()
    }

    #[test]
    fn changes_and_events_are_urgent_repeats_are_not() {
        let mut q = Queue::new(100);
        assert_eq!(q.push(status("a", 1, Phase::Running)), Ok(true), "a node's first status");
        assert_eq!(q.push(status("a", 2, Phase::Running)), Ok(false), "the same status again");
        assert_eq!(q.push(status("a", 3, Phase::Ready)), Ok(true), "a phase change");
        assert_eq!(q.push(event("a", 4)), Ok(true));
        assert_eq!(q.push(event("a", 4)), Ok(false), "a report queued twice counts once");
        assert_eq!(q.len(), 2, "the newest status supersedes older ones, events stay");
    }

    #[test]
    fn one_batch_carries_every_member_and_acks_empty_it() {
        let mut q = Queue::new(100);
        for node in ["a", "b", "c"] {
            q.push(status(node, 1, Phase::Ready)).unwrap();
            q.push(event(node, 2)).unwrap();
        }
        let batch = q.take_batch("b-1", 100, 1 << 20).unwrap();
        assert_eq!(batch.entries.len(), 6);
        assert!(q.take_batch("b-2", 100, 1 << 20).is_none(), "everything is in flight");
        // A report arriving meanwhile waits for the next batch.
        q.push(event("a", 3)).unwrap();
        let acked: Vec<ReportId> = batch.entries.iter().map(|r| r.id()).collect();
        let done = q.answered("b-1", &BatchAck { acked: acked.clone(), ..BatchAck::default() });
        assert_eq!(done, acked);
        assert_eq!(ids(&q.take_batch("b-3", 100, 1 << 20).unwrap()), [("a".to_string(), 3)]);
    }

    #[test]
    fn unanswered_and_partly_answered_batches_are_sent_again() {
        let mut q = Queue::new(100);
        q.push(event("a", 1)).unwrap();
        q.push(event("b", 1)).unwrap();
        q.take_batch("b-1", 100, 1 << 20).unwrap();
        q.failed("b-1");
        let again = q.take_batch("b-2", 100, 1 << 20).unwrap();
        assert_eq!(again.entries.len(), 2);
        let only_a = BatchAck { acked: vec![again.entries[0].id()], ..BatchAck::default() };
        q.answered("b-2", &only_a);
        assert_eq!(ids(&q.take_batch("b-3", 100, 1 << 20).unwrap()), [("b".to_string(), 1)]);
    }

    #[test]
    fn batches_are_bounded_and_the_queue_is_too() {
        let mut q = Queue::new(5);
        for seq in 0..5 {
            q.push(event("a", seq)).unwrap();
        }
        assert_eq!(q.push(event("a", 9)), Err(Full(5)));
        assert_eq!(q.take_batch("b-1", 2, 1 << 20).unwrap().entries.len(), 2);
        assert_eq!(q.take_batch("b-2", 100, 1).unwrap().entries.len(), 1, "at least one per batch");
        q.clear();
        assert!(q.is_empty() && !q.has_waiting());
    }

    #[test]
    fn a_status_in_flight_is_not_superseded() {
        let mut q = Queue::new(100);
        q.push(status("a", 1, Phase::Running)).unwrap();
        q.take_batch("b-1", 100, 1 << 20).unwrap();
        q.push(status("a", 2, Phase::Ready)).unwrap();
        assert_eq!(q.len(), 2);
        q.failed("b-1");
        assert_eq!(q.take_batch("b-2", 100, 1 << 20).unwrap().entries.len(), 2);
    }
}
