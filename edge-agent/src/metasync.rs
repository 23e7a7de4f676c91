//! MetaSync: the node's instance status goes to the cloud every
//! `meta.sync.podstatus.interval` seconds and, coalesced, at once on every phase
//! change and after every reconnect, so status never lags a whole interval.
//! Reports leave through the SQLite outbox and are deleted only when the cloud
//! acknowledges them; a newer snapshot supersedes an unsent older one.

use std::sync::Arc;
use std::time::Duration;

use supermesh_protocol::{EventReport, InstanceEvent, InstanceReport, Operation, StatusReport, STATUS_RESOURCE};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::edged::runtime::{now_ms, Phase, Statuses};
use crate::edgehub::Signals;
use crate::metamanager::MetaHandle;
use crate::supernode::Cluster;

/// Phase changes arriving within this window go out in one report.
pub const COALESCE: Duration = Duration::from_millis(300);

/// The report of `statuses`, taken at `taken_ms`.
pub fn report(statuses: &Statuses, taken_ms: i64) -> StatusReport {
    let instances = statuses
        .values()
        .map(|s| InstanceReport {
            rolled_back_from: s.rollback.as_ref().map(|r| r.from.clone()),
            resource: s.key.clone(),
            version: s.version.clone(),
            phase: s.phase,
            ready: s.phase == Phase::Ready,
            restarts: s.restarts,
            // What happens to the version it went back to comes first; else why it went back.
            message: s.message.clone().or_else(|| s.rollback.as_ref().map(|r| r.message.clone())),
            reason: s.reason,
            ports: s.ports.clone(),
        })
        .collect();
    StatusReport { taken_ms, instances, cluster: None }
}

/// The events between two snapshots of the instances: what `kubectl describe` should tell.
pub fn events(before: &Statuses, after: &Statuses) -> Vec<(String, EventReport)> {
    let mut out = Vec::new();
    for (key, now) in after {
        let was = before.get(key);
        let event = |warning: bool, reason: InstanceEvent, message: String| {
            (key.clone(), EventReport::instance(reason, warning, message))
        };
        let entered = |phase: Phase| now.phase == phase && was.is_none_or(|w| w.phase != phase);
        if now.pid.is_some() && was.and_then(|w| w.pid) != now.pid {
            out.push(event(false, InstanceEvent::Started, format!("started with pid {}", now.pid.unwrap_or_default())));
        }
        // Snapshots are coalesced: a quick crash may show only as more restarts.
        let restarted = was.is_some_and(|w| now.restarts > w.restarts);
        let ended = entered(Phase::Backoff) || entered(Phase::Failed) || entered(Phase::Succeeded);
        if let Some(code) = now.exit_code.filter(|_| ended || restarted && now.phase == Phase::Backoff) {
            out.push(event(code != 0, InstanceEvent::Exited, format!("exited with code {code}")));
        }
        if entered(Phase::Unhealthy) {
            let message = now.message.clone().unwrap_or_else(|| "health check failing".into());
            out.push(event(true, InstanceEvent::Unhealthy, message));
        }
        if entered(Phase::Failed) {
            let message = now.message.clone().unwrap_or_else(|| "failed".into());
            out.push(event(true, InstanceEvent::failed(now.reason), message));
        }
        if restarted {
            out.push(event(true, InstanceEvent::Restarted, format!("restarted ({} restarts so far)", now.restarts)));
        }
    }
    out
}

/// Queues status reports and instance events until the runtime's status channel closes.
pub async fn run(
    mut statuses: watch::Receiver<Statuses>,
    meta: MetaHandle,
    interval: Duration,
    signals: Signals,
    cluster: Arc<Cluster>,
) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    let mut last = Statuses::new();
    loop {
        tokio::select! {
            changed = statuses.changed() => {
                if changed.is_err() {
                    return;
                }
                tokio::time::sleep(COALESCE).await;
            }
            _ = tick.tick() => {}
            _ = signals.connected.notified() => {}
            _ = cluster.view_changed.notified() => {}
        }
        let current = statuses.borrow_and_update().clone();
        for (key, event) in events(&last, &current) {
            let content = serde_json::to_value(&event).unwrap_or_default();
            if let Err(e) = meta.enqueue_report(Operation::MetaSync, &key, &content).await {
                warn!(error = %e, %key, reason = %event.reason, "cannot queue an instance event");
            }
        }
        let mut snapshot = report(&current, now_ms());
        snapshot.cluster = cluster.view();
        cluster.own_status(&snapshot);
        last = current;
        let content = serde_json::to_value(&snapshot).unwrap_or_default();
        match meta.replace_report(Operation::MetaSync, STATUS_RESOURCE, &content).await {
            Ok(seq) => {
                debug!(seq, instances = snapshot.instances.len(), "MetaSync report queued");
                signals.outbox.notify_one();
            }
            Err(e) => warn!(error = %e, "cannot queue the MetaSync report; the next one retries"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::edged::runtime::InstanceStatus;
    use supermesh_protocol::FailureReason;

    fn at(phase: Phase, pid: Option<u32>, restarts: u32, exit_code: Option<i32>, message: Option<&str>) -> Statuses {
        let s = InstanceStatus {
            key: "ns/microservice/a".into(),
            version: "1-u".into(),
            phase,
            restarts,
            pid,
            exit_code,
            message: message.map(str::to_owned),
            reason: None,
            since_ms: 0,
            ports: Vec::new(),
            rollback: None,
        };
        Statuses::from([(s.key.clone(), s)])
    }

    fn reasons(before: &Statuses, after: &Statuses) -> Vec<String> {
        events(before, after).into_iter().map(|(_, e)| e.reason).collect()
    }

    #[test]
    fn transitions_become_events() {
        let none = Statuses::new();
        let running = at(Phase::Ready, Some(10), 0, None, None);
        assert_eq!(reasons(&none, &running), ["Started"]);
        assert!(reasons(&running, &running).is_empty(), "no change, no event");
        let crashed = at(Phase::Backoff, None, 1, Some(3), Some("exited with code 3"));
        assert_eq!(reasons(&running, &crashed), ["Exited", "Restarted"]);
        let again = at(Phase::Running, Some(11), 1, Some(3), None);
        assert_eq!(reasons(&crashed, &again), ["Started"]);
        let sick = at(Phase::Unhealthy, Some(11), 1, None, Some("health check failed"));
        assert_eq!(reasons(&again, &sick), ["Unhealthy"]);
        let mut bad = at(Phase::Failed, None, 0, None, Some("artifact hash mismatch: expected a, got b"));
        bad.values_mut().for_each(|s| s.reason = Some(FailureReason::ArtifactHashMismatch));
        let e = events(&none, &bad);
        assert_eq!((e[0].1.reason.as_str(), e[0].1.warning), ("ArtifactHashMismatch", true));
        let failed = at(Phase::Failed, None, 0, Some(2), Some("exited with code 2"));
        assert_eq!(reasons(&none, &failed), ["Exited", "Failed"], "the reason is typed, not read from the message");
    }

    #[test]
    fn reports_carry_phase_readiness_and_restarts() {
        let status = |key: &str, phase, restarts| InstanceStatus {
            key: key.into(),
            version: "1-u".into(),
            phase,
            restarts,
            pid: None,
            exit_code: Some(3),
            message: Some("exited with code 3".into()),
            reason: None,
            since_ms: 0,
            ports: Vec::new(),
            rollback: None,
        };
        let statuses = Statuses::from([
            ("a".to_string(), status("a", Phase::Ready, 0)),
            ("b".to_string(), status("b", Phase::Backoff, 4)),
        ]);
        let r = report(&statuses, 42);
        assert_eq!(r.taken_ms, 42);
        assert_eq!((r.instances[0].phase.as_str(), r.instances[0].ready), ("Ready", true));
        assert_eq!(
            (r.instances[1].phase.as_str(), r.instances[1].ready, r.instances[1].restarts),
            ("Backoff", false, 4)
        );
        assert_eq!(r.instances[1].message.as_deref(), Some("exited with code 3"));
    }
}
