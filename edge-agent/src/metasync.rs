//! MetaSync: the node's instance status goes to the cloud every
//! `meta.sync.podstatus.interval` seconds and, coalesced, at once on every phase
//! change and after every reconnect, so status never lags a whole interval.
//! Reports leave through the SQLite outbox and are deleted only when the cloud
//! acknowledges them; a newer snapshot supersedes an unsent older one.

use std::time::Duration;

use supermesh_api::protocol::{InstanceReport, Operation, StatusReport, STATUS_RESOURCE};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::edged::runtime::{now_ms, Phase, Statuses};
use crate::edgehub::Signals;
use crate::metamanager::MetaHandle;

/// Phase changes arriving within this window go out in one report.
pub const COALESCE: Duration = Duration::from_millis(300);

/// The report of `statuses`, taken at `taken_ms`.
pub fn report(statuses: &Statuses, taken_ms: i64) -> StatusReport {
    let instances = statuses
        .values()
        .map(|s| InstanceReport {
            resource: s.key.clone(),
            version: s.version.clone(),
            phase: format!("{:?}", s.phase),
            ready: s.phase == Phase::Ready,
            restarts: s.restarts,
            message: s.message.clone(),
        })
        .collect();
    StatusReport { taken_ms, instances }
}

/// Queues status reports until the runtime's status channel closes.
pub async fn run(mut statuses: watch::Receiver<Statuses>, meta: MetaHandle, interval: Duration, signals: Signals) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
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
        }
        let snapshot = report(&statuses.borrow_and_update(), now_ms());
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
            since_ms: 0,
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
