//! Instance events from agents become Kubernetes Events on their Microservice,
//! related to their EdgeNode, published by one task: sessions hand them over and
//! never wait on the API server.

use std::sync::Arc;

use kube::runtime::events::{Event, EventType, Recorder};
use supermesh_protocol::EventReport;
use tokio::sync::mpsc;
use tracing::warn;

use crate::index::EventTarget;
use crate::metrics::Metrics;

/// Events waiting for the API server; beyond this, new ones are dropped and counted.
const QUEUE: usize = 4096;

/// Where sessions hand instance events over.
#[derive(Clone)]
pub struct Events {
    queue: mpsc::Sender<(EventTarget, String, EventReport)>,
    metrics: Arc<Metrics>,
}

impl Events {
    /// Queues `event` of an instance on `node` for `target`; drops it (counted) when the queue is full.
    pub fn publish(&self, target: EventTarget, node: &str, event: EventReport) {
        if self.queue.try_send((target, node.to_owned(), event)).is_err() {
            self.metrics.events_dropped.inc();
        }
    }
}

/// Starts the task that publishes queued events with `recorder`.
pub fn spawn(recorder: Recorder, metrics: Arc<Metrics>) -> Events {
    let (queue, mut incoming) = mpsc::channel::<(EventTarget, String, EventReport)>(QUEUE);
    tokio::spawn(async move {
        while let Some((target, node, event)) = incoming.recv().await {
            let published = Event {
                type_: if event.warning { EventType::Warning } else { EventType::Normal },
                reason: event.reason.clone(),
                note: Some(format!("{node}: {}", event.message)),
                action: "Reconcile".to_owned(),
                secondary: Some(target.node),
            };
            if let Err(e) = recorder.publish(&published, &target.microservice).await {
                warn!(error = %e, reason = %event.reason, %node, "cannot publish an instance event");
            }
        }
    });
    Events { queue, metrics }
}
