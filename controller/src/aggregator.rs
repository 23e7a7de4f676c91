//! Status aggregation: what the reports of the nodes a microservice is placed
//! on say about it. A pure function; the index holds the reports.

use supermesh_api::microservice::{MicroserviceStatus, UnhealthyInstance};
use supermesh_api::names::condition::{CRASH_LOOP, INSTANCE_FAILED, UNHEALTHY};
use supermesh_protocol::{InstanceReport, Phase};

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

/// Aggregates the `reports` of placed nodes (node name, its instance) for a microservice
/// whose current version is `version`. Borrows them: a fleet-wide microservice has as many as nodes.
pub fn aggregate<'a>(version: &str, reports: impl IntoIterator<Item = (&'a str, &'a InstanceReport)>) -> Aggregate {
    let mut agg = Aggregate::default();
    let mut failing: Vec<UnhealthyInstance> = Vec::new();
    for (node, r) in reports {
        agg.reported += 1;
        if r.ready {
            agg.ready += 1;
            if r.version == version {
                agg.available += 1;
            }
        }
        if r.phase.is_failing() {
            failing.push(UnhealthyInstance {
                node: node.to_owned(),
                phase: r.phase.as_str().to_owned(),
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
    let count = |phase: Phase| failing.iter().filter(|f| f.phase == phase.as_str()).count();
    let (reason, phase) = [Phase::Failed, Phase::Backoff, Phase::Unhealthy]
        .into_iter()
        .find(|p| count(*p) > 0)
        .map(|p| (degraded_reason(p), p))
        .unwrap_or((degraded_reason(Phase::Unhealthy), Phase::Unhealthy));
    let detail = worst.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default();
    let message = format!(
        "{} of the instances are {phase}; {} restarted {} times{detail}",
        count(phase),
        worst.node,
        worst.restarts
    );
    Some((reason, message))
}

/// The reason of the Degraded condition when instances are in the failing `phase`.
pub fn degraded_reason(phase: Phase) -> &'static str {
    match phase {
        Phase::Failed => INSTANCE_FAILED,
        Phase::Backoff => CRASH_LOOP,
        _ => UNHEALTHY,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(resource: &str, version: &str, phase: Phase, ready: bool, restarts: u32) -> InstanceReport {
        InstanceReport {
            rolled_back_from: None,
            resource: resource.into(),
            version: version.into(),
            phase,
            ready,
            restarts,
            message: (phase == Phase::Backoff).then(|| "exited with code 3".into()),
            reason: None,
            ports: vec![],
        }
    }

    #[test]
    fn counts_ready_and_available_instances() {
        let reports = [
            ("n1".to_string(), report("a", "v2", Phase::Ready, true, 0)),
            ("n2".to_string(), report("a", "v1", Phase::Ready, true, 0)),
            ("n3".to_string(), report("a", "v2", Phase::Running, false, 0)),
        ];
        let agg = aggregate("v2", reports.iter().map(|(n, r)| (n.as_str(), r)));
        assert_eq!((agg.reported, agg.ready, agg.available), (3, 2, 1));
        assert_eq!(agg.degraded, None);
    }

    #[test]
    fn crash_loops_are_degraded_with_restart_counts() {
        let reports = [
            ("n1".to_string(), report("a", "v", Phase::Backoff, false, 4)),
            ("n2".to_string(), report("a", "v", Phase::Backoff, false, 7)),
            ("n3".to_string(), report("a", "v", Phase::Ready, true, 0)),
        ];
        let agg = aggregate("v", reports.iter().map(|(n, r)| (n.as_str(), r)));
        let (reason, message) = agg.degraded.unwrap();
        assert_eq!(reason, "CrashLoop");
        assert!(message.contains("n2 restarted 7 times: exited with code 3"), "{message}");
        assert_eq!(agg.unhealthy.len(), 2);
        assert_eq!(agg.unhealthy[0].node, "n2");
    }

    #[test]
    fn the_unhealthy_list_is_bounded() {
        let reports: Vec<_> =
            (0..50).map(|i| (format!("n{i:02}"), report("a", "v", Phase::Failed, false, 1))).collect();
        let agg = aggregate("v", reports.iter().map(|(n, r)| (n.as_str(), r)));
        assert_eq!(agg.unhealthy.len(), MicroserviceStatus::MAX_UNHEALTHY);
        assert_eq!(agg.degraded.unwrap().0, "InstanceFailed");
    }
}
