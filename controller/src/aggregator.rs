//! Status aggregation: the latest report of every node, and what they say about
//! each microservice. The index is in memory (reports are re-sent on connect
//! and every interval); aggregation is a pure function.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use supermesh_api::microservice::{MicroserviceStatus, UnhealthyInstance};
use supermesh_api::protocol::{ClusterView, InstanceReport, StatusReport};

/// Event seqs remembered per node to drop events that arrive twice.
pub const REMEMBERED_EVENTS: usize = 4096;

/// The latest status report of every node, and the events recently taken from each.
#[derive(Default)]
pub struct Reports {
    by_node: Mutex<HashMap<String, StatusReport>>,
    events: Mutex<HashMap<String, RecentSeqs>>,
}

impl Reports {
    /// Records `node`'s report and returns the resources whose status it may change,
    /// or `None` when the report is no newer than the one held (a late or repeated snapshot).
    pub fn update(&self, node: &str, report: StatusReport) -> Option<BTreeSet<String>> {
        let mut by_node = self.lock();
        let mut touched: BTreeSet<String> = report.instances.iter().map(|i| i.resource.clone()).collect();
        if let Some(old) = by_node.get(node) {
            if old.taken_ms >= report.taken_ms {
                return None;
            }
            touched.extend(old.instances.iter().map(|i| i.resource.clone()));
        }
        by_node.insert(node.to_owned(), report);
        Some(touched)
    }

    /// `node`'s place in its network cluster, from its latest status report.
    pub fn cluster(&self, node: &str) -> Option<ClusterView> {
        self.lock().get(node).and_then(|r| r.cluster.clone())
    }

    /// Records that the event with outbox `seq` of `node` was taken; false when it was already
    /// (it came again, through another path or after a supernode failover).
    pub fn first_event(&self, node: &str, seq: i64) -> bool {
        let mut events = self.events.lock().unwrap_or_else(|p| p.into_inner());
        events.entry(node.to_owned()).or_insert_with(|| RecentSeqs::new(REMEMBERED_EVENTS)).insert(seq)
    }

    /// What `nodes` report about `resource`.
    pub fn about(&self, resource: &str, nodes: &BTreeSet<String>) -> Vec<(String, InstanceReport)> {
        let by_node = self.lock();
        nodes
            .iter()
            .filter_map(|n| {
                let report = by_node.get(n)?;
                let instance = report.instances.iter().find(|i| i.resource == resource)?;
                Some((n.clone(), instance.clone()))
            })
            .collect()
    }

    /// Instances `node` reports running and ready.
    pub fn node_counts(&self, node: &str) -> (i32, i32) {
        let by_node = self.lock();
        let Some(report) = by_node.get(node) else { return (0, 0) };
        let running = report.instances.iter().filter(|i| is_running(&i.phase)).count() as i32;
        let ready = report.instances.iter().filter(|i| i.ready).count() as i32;
        (running, ready)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, StatusReport>> {
        self.by_node.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The last `capacity` distinct seqs seen, oldest forgotten first.
#[derive(Debug, Clone)]
pub struct RecentSeqs {
    capacity: usize,
    seen: HashSet<i64>,
    order: VecDeque<i64>,
}

impl RecentSeqs {
    /// An empty set remembering at most `capacity` seqs.
    pub fn new(capacity: usize) -> RecentSeqs {
        RecentSeqs { capacity: capacity.max(1), seen: HashSet::new(), order: VecDeque::new() }
    }

    /// Remembers `seq`; false when it is remembered already.
    pub fn insert(&mut self, seq: i64) -> bool {
        if !self.seen.insert(seq) {
            return false;
        }
        self.order.push_back(seq);
        if self.order.len() > self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
        true
    }
}

fn is_running(phase: &str) -> bool {
    matches!(phase, "Running" | "Ready" | "Unhealthy")
}

/// What the reports of the placed nodes say about one microservice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Aggregate {
    /// Placed nodes that reported on the microservice.
    pub reported: i32,
    /// Instances passing their health check.
    pub ready: i32,
    /// Ready instances running the current version.
    pub available: i32,
    /// Instances failing, restarting or unhealthy, at most `MAX_UNHEALTHY`.
    pub unhealthy: Vec<UnhealthyInstance>,
    /// Why the microservice is degraded: condition reason and message.
    pub degraded: Option<(&'static str, String)>,
}

/// Aggregates the `reports` of placed nodes for a microservice whose current version is `version`.
pub fn aggregate(version: &str, reports: &[(String, InstanceReport)]) -> Aggregate {
    let mut agg = Aggregate { reported: reports.len() as i32, ..Aggregate::default() };
    let mut failing: Vec<UnhealthyInstance> = Vec::new();
    for (node, r) in reports {
        if r.ready {
            agg.ready += 1;
            if r.version == version {
                agg.available += 1;
            }
        }
        if matches!(r.phase.as_str(), "Failed" | "Backoff" | "Unhealthy") {
            failing.push(UnhealthyInstance {
                node: node.clone(),
                phase: r.phase.clone(),
                restarts: r.restarts as i32,
                message: r.message.clone(),
            });
        }
    }
    failing.sort_by(|a, b| b.restarts.cmp(&a.restarts).then_with(|| a.node.cmp(&b.node)));
    agg.degraded = degraded(&failing);
    failing.truncate(MicroserviceStatus::MAX_UNHEALTHY);
    agg.unhealthy = failing;
    agg
}

fn degraded(failing: &[UnhealthyInstance]) -> Option<(&'static str, String)> {
    let worst = failing.first()?;
    let count = |phase: &str| failing.iter().filter(|f| f.phase == phase).count();
    let (reason, phase) = if count("Failed") > 0 {
        ("InstanceFailed", "Failed")
    } else if count("Backoff") > 0 {
        ("CrashLoop", "Backoff")
    } else {
        ("Unhealthy", "Unhealthy")
    };
    let detail = worst.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default();
    let message = format!(
        "{} of the instances are {phase}; {} restarted {} times{detail}",
        count(phase),
        worst.node,
        worst.restarts
    );
    Some((reason, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(resource: &str, version: &str, phase: &str, ready: bool, restarts: u32) -> InstanceReport {
        InstanceReport {
            resource: resource.into(),
            version: version.into(),
            phase: phase.into(),
            ready,
            restarts,
            message: (phase == "Backoff").then(|| "exited with code 3".into()),
            ports: vec![],
        }
    }

    #[test]
    fn counts_ready_and_available_instances() {
        let reports = vec![
            ("n1".to_string(), report("a", "v2", "Ready", true, 0)),
            ("n2".to_string(), report("a", "v1", "Ready", true, 0)),
            ("n3".to_string(), report("a", "v2", "Running", false, 0)),
        ];
        let agg = aggregate("v2", &reports);
        assert_eq!((agg.reported, agg.ready, agg.available), (3, 2, 1));
        assert_eq!(agg.degraded, None);
    }

    #[test]
    fn crash_loops_are_degraded_with_restart_counts() {
        let reports = vec![
            ("n1".to_string(), report("a", "v", "Backoff", false, 4)),
            ("n2".to_string(), report("a", "v", "Backoff", false, 7)),
            ("n3".to_string(), report("a", "v", "Ready", true, 0)),
        ];
        let agg = aggregate("v", &reports);
        let (reason, message) = agg.degraded.unwrap();
        assert_eq!(reason, "CrashLoop");
        assert!(message.contains("n2 restarted 7 times: exited with code 3"), "{message}");
        assert_eq!(agg.unhealthy.len(), 2);
        assert_eq!(agg.unhealthy[0].node, "n2");
    }

    #[test]
    fn the_unhealthy_list_is_bounded() {
        let reports: Vec<_> = (0..50).map(|i| (format!("n{i:02}"), report("a", "v", "Failed", false, 1))).collect();
        let agg = aggregate("v", &reports);
        assert_eq!(agg.unhealthy.len(), MicroserviceStatus::MAX_UNHEALTHY);
        assert_eq!(agg.degraded.unwrap().0, "InstanceFailed");
    }

    #[test]
    fn the_index_keeps_the_newest_report_per_node() {
        let reports = Reports::default();
        let first = StatusReport { taken_ms: 10, instances: vec![report("x", "v", "Ready", true, 0)], cluster: None };
        assert_eq!(reports.update("n1", first.clone()), Some(BTreeSet::from(["x".to_string()])));
        assert_eq!(reports.update("n1", first), None, "the same snapshot again changes nothing");
        let stale = StatusReport { taken_ms: 5, instances: vec![], cluster: None };
        assert_eq!(reports.update("n1", stale), None);
        let nodes = BTreeSet::from(["n1".to_string(), "n2".to_string()]);
        assert_eq!(reports.about("x", &nodes).len(), 1);
        assert_eq!(reports.node_counts("n1"), (1, 1));
        let view = ClusterView { role: supermesh_api::edgenode::NodeRole::Member, supernode: Some("n2".into()) };
        let newer = StatusReport {
            taken_ms: 20,
            instances: vec![report("y", "v", "Backoff", false, 2)],
            cluster: Some(view.clone()),
        };
        assert_eq!(reports.update("n1", newer), Some(BTreeSet::from(["x".to_string(), "y".to_string()])));
        assert_eq!(reports.node_counts("n1"), (0, 0));
        assert_eq!(reports.cluster("n1"), Some(view));
        assert_eq!(reports.cluster("n2"), None);
    }

    #[test]
    fn events_seen_before_are_recognised_per_node() {
        let reports = Reports::default();
        assert!(reports.first_event("n1", 7));
        assert!(!reports.first_event("n1", 7), "the same event again");
        assert!(reports.first_event("n2", 7), "another node's seq 7 is another event");
        assert!(reports.first_event("n1", 8));
    }

    #[test]
    fn recent_seqs_forget_the_oldest_beyond_their_capacity() {
        let mut seen = RecentSeqs::new(3);
        assert!([1, 2, 3].iter().all(|s| seen.insert(*s)));
        assert!(!seen.insert(2));
        assert!(seen.insert(4), "a fourth seq pushes out the first");
        assert!(seen.insert(1), "1 was forgotten");
        assert!(!seen.insert(4) && !seen.insert(3));
        assert_eq!(seen.seen.len(), 3);
    }
}
