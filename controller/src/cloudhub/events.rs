//! Instance events from agents become Kubernetes Events on their Microservice,
//! related to their EdgeNode, published by one task: sessions hand them over and
//! never wait on the API server.
//!
//! A rollout over ten thousand nodes makes ten thousand "Started" events: as
//! client-go's event aggregator does, the first [`INDIVIDUAL`] events of one kind
//! (microservice, reason, type) in [`WINDOW`] are published as they come, and the
//! rest as one summary per [`SUMMARY_EVERY`] naming how many nodes and a few of them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::runtime::events::{Event, EventType, Recorder};
use supermesh_protocol::EventReport;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::warn;

use crate::index::EventTarget;
use crate::metrics::Metrics;

/// Events waiting for the API server; beyond this, new ones are dropped and counted.
const QUEUE: usize = 4096;
/// Events of one kind published one by one in a window.
pub const INDIVIDUAL: u32 = 10;
/// How long a window lasts.
pub const WINDOW: Duration = Duration::from_secs(600);
/// How often the events beyond [`INDIVIDUAL`] are summed up in one.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(30);
/// Nodes a summary names.
const NAMED: usize = 5;

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

/// One kind of event: which microservice, why, and whether it is a warning.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Kind {
    microservice: String,
    reason: String,
    warning: bool,
}

/// What a kind of event did in its window.
#[derive(Debug)]
struct Tally {
    window_start: Instant,
    published: u32,
    /// Events held back for the next summary: how many, from which nodes (a few), the last message.
    held: u32,
    nodes: Vec<String>,
    last_message: String,
    first_held: Option<Instant>,
    target: Option<EventTarget>,
}

/// What to do with an event, and the summaries that are due.
#[derive(Debug, Default)]
pub struct Aggregator {
    tallies: HashMap<Kind, Tally>,
}

/// An event to publish now: on `target`, from `node` or summing up several.
#[derive(Debug, Clone)]
pub struct Publish {
    /// Where it goes.
    pub target: EventTarget,
    /// Whether it is a warning.
    pub warning: bool,
    /// Its reason.
    pub reason: String,
    /// Its note.
    pub note: String,
}

impl Aggregator {
    /// Takes `event` from `node` at `now`: publish it now, or hold it for a summary.
    pub fn take(&mut self, target: EventTarget, node: &str, event: EventReport, now: Instant) -> Option<Publish> {
        let kind = Kind {
            microservice: target.microservice.uid.clone().unwrap_or_default(),
            reason: event.reason.clone(),
            warning: event.warning,
        };
        let tally = self.tallies.entry(kind).or_insert_with(|| Tally {
            window_start: now,
            published: 0,
            held: 0,
            nodes: Vec::new(),
            last_message: String::new(),
            first_held: None,
            target: None,
        });
        if now.duration_since(tally.window_start) >= WINDOW && tally.held == 0 {
            tally.window_start = now;
            tally.published = 0;
        }
        if tally.published < INDIVIDUAL {
            tally.published += 1;
            let note = format!("{node}: {}", event.message);
            return Some(Publish { target, warning: event.warning, reason: event.reason, note });
        }
        tally.held += 1;
        if tally.nodes.len() < NAMED {
            tally.nodes.push(node.to_owned());
        }
        tally.last_message = event.message;
        tally.first_held.get_or_insert(now);
        tally.target = Some(target);
        None
    }

    /// The summaries due at `now`, and forgets kinds whose window ended with nothing held.
    pub fn due(&mut self, now: Instant) -> Vec<Publish> {
        let mut out = Vec::new();
        for (kind, tally) in &mut self.tallies {
            if tally.first_held.is_none_or(|t| now.duration_since(t) < SUMMARY_EVERY) {
                continue;
            }
            let Some(target) = tally.target.take() else { continue };
            let more = tally.held as usize - tally.nodes.len();
            let others = if more > 0 { format!(" and {more} more") } else { String::new() };
            let note = format!(
                "on {} nodes ({}{others}) in the last {} s: {}",
                tally.held,
                tally.nodes.join(", "),
                SUMMARY_EVERY.as_secs(),
                tally.last_message
            );
            out.push(Publish { target, warning: kind.warning, reason: kind.reason.clone(), note });
            tally.published += 1;
            tally.held = 0;
            tally.nodes.clear();
            tally.first_held = None;
        }
        self.tallies.retain(|_, t| t.held > 0 || now.duration_since(t.window_start) < WINDOW);
        out
    }
}

/// Starts the task that publishes queued events with `recorder`.
pub fn spawn(recorder: Recorder, metrics: Arc<Metrics>) -> Events {
    let (queue, mut incoming) = mpsc::channel::<(EventTarget, String, EventReport)>(QUEUE);
    let published = metrics.clone();
    tokio::spawn(async move {
        let mut aggregator = Aggregator::default();
        let mut tick = tokio::time::interval(SUMMARY_EVERY / 3);
        loop {
            let ready = tokio::select! {
                taken = incoming.recv() => match taken {
                    Some((target, node, event)) => aggregator.take(target, &node, event, Instant::now()).into_iter().collect(),
                    None => return,
                },
                _ = tick.tick() => aggregator.due(Instant::now()),
            };
            for event in ready {
                publish(&recorder, &event).await;
                published.events_published.inc();
            }
        }
    });
    Events { queue, metrics }
}

async fn publish(recorder: &Recorder, event: &Publish) {
    let published = Event {
        type_: if event.warning { EventType::Warning } else { EventType::Normal },
        reason: event.reason.clone(),
        note: Some(event.note.clone()),
        action: "Reconcile".to_owned(),
        secondary: Some(event.target.node.clone()),
    };
    if let Err(e) = recorder.publish(&published, &event.target.microservice).await {
        warn!(error = %e, reason = %event.reason, "cannot publish an instance event");
    }
}

/// Where an event about `node`'s instance of the microservice `uid` goes (for tests).
#[cfg(test)]
fn target(uid: &str, node: &str) -> EventTarget {
    use k8s_openapi::api::core::v1::ObjectReference;
    let reference = |name: &str, uid: Option<&str>| ObjectReference {
        name: Some(name.to_owned()),
        uid: uid.map(str::to_owned),
        ..ObjectReference::default()
    };
    EventTarget { microservice: reference("web", Some(uid)), node: reference(node, None) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(message: &str) -> EventReport {
        EventReport { warning: false, reason: "Started".into(), message: message.into() }
    }

    #[test]
    fn a_fleet_wide_rollout_makes_a_few_events_and_one_summary() {
        let t = Instant::now();
        let mut agg = Aggregator::default();
        let published: Vec<Publish> = (0..1000)
            .filter_map(|i| agg.take(target("u1", &format!("n{i}")), &format!("n{i}"), started("pid 7"), t))
            .collect();
        assert_eq!(published.len(), INDIVIDUAL as usize, "the first ten as they come");
        assert_eq!(published[0].note, "n0: pid 7");
        assert!(agg.due(t + SUMMARY_EVERY / 2).is_empty(), "the summary waits for its interval");
        let summary = agg.due(t + SUMMARY_EVERY);
        assert_eq!(summary.len(), 1);
        assert_eq!(summary[0].reason, "Started");
        assert_eq!(summary[0].note, "on 990 nodes (n10, n11, n12, n13, n14 and 985 more) in the last 30 s: pid 7");
        assert!(agg.due(t + 2 * SUMMARY_EVERY).is_empty(), "nothing held, nothing summed up");
    }

    #[test]
    fn kinds_are_counted_apart_and_windows_start_again() {
        let t = Instant::now();
        let mut agg = Aggregator::default();
        for i in 0..INDIVIDUAL {
            assert!(agg.take(target("u1", "a"), "a", started(&i.to_string()), t).is_some());
        }
        assert!(agg.take(target("u1", "a"), "a", started("x"), t).is_none(), "the eleventh waits");
        assert!(agg.take(target("u2", "a"), "a", started("x"), t).is_some(), "another microservice is another kind");
        let tick = EventReport { warning: false, reason: "Tick7".into(), message: "x".into() };
        assert!(agg.take(target("u1", "a"), "a", tick, t).is_some(), "another reason is another kind");
        let mut warning = started("x");
        warning.warning = true;
        assert!(agg.take(target("u1", "a"), "a", warning, t).is_some(), "a warning is apart from a normal event");
        assert_eq!(agg.due(t + SUMMARY_EVERY).len(), 1);
        let later = t + WINDOW + SUMMARY_EVERY;
        assert!(agg.take(target("u1", "a"), "a", started("y"), later).is_some(), "a new window, new individual events");
    }
}
