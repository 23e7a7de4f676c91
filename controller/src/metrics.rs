//! Prometheus metrics of the controller.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels naming the reconciled kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// Mesh, EdgeNode or Microservice.
    pub kind: &'static str,
}

/// Labels of a failed reconcile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// Mesh, EdgeNode or Microservice.
    pub kind: &'static str,
    /// Error class, see `Error::metric_label`.
    pub reason: &'static str,
}

/// The controller's metrics and the registry that exposes them.
pub struct Metrics {
    /// Registry rendered at `/metrics`.
    pub registry: Registry,
    /// Reconciles started, by kind.
    pub reconciliations: Family<KindLabels, Counter>,
    /// Reconciles that failed, by kind and reason.
    pub failures: Family<FailureLabels, Counter>,
    /// Reconcile duration in seconds, by kind.
    pub duration: Family<KindLabels, Histogram>,
    /// Status writes to the API server, by kind (no-op reconciles write nothing).
    pub status_writes: Family<KindLabels, Counter>,
    /// Microservice instances currently placed on edge nodes.
    pub placed_instances: Gauge,
    /// Changes (Insert, Update, Delete) sent to agents.
    pub changes_sent: Counter,
    /// Changes agents acknowledged after committing them.
    pub changes_acked: Counter,
    /// Changes agents refused.
    pub changes_nacked: Counter,
    /// Invalid messages received from agents.
    pub bad_messages: Counter,
    /// Agents connected now.
    pub agents: Gauge,
    /// Instance status reports (MetaSync) received from agents.
    pub status_reports: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("supermesh_controller");
        let reconciliations = Family::<KindLabels, Counter>::default();
        let failures = Family::<FailureLabels, Counter>::default();
        let duration = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 14))
        });
        let status_writes = Family::<KindLabels, Counter>::default();
        let placed_instances = Gauge::default();
        registry.register("reconciliations", "Reconciles started", reconciliations.clone());
        registry.register("reconcile_failures", "Reconciles that failed", failures.clone());
        registry.register("reconcile_duration_seconds", "Reconcile duration", duration.clone());
        registry.register("status_writes", "Status writes to the API server", status_writes.clone());
        registry.register("placed_instances", "Microservice instances placed on edge nodes", placed_instances.clone());
        let [changes_sent, changes_acked, changes_nacked, bad_messages] = std::array::from_fn(|_| Counter::default());
        registry.register("cloudhub_changes_sent", "Changes sent to agents", changes_sent.clone());
        registry.register("cloudhub_changes_acked", "Changes agents acknowledged", changes_acked.clone());
        registry.register("cloudhub_changes_nacked", "Changes agents refused", changes_nacked.clone());
        registry.register("cloudhub_bad_messages", "Invalid messages received from agents", bad_messages.clone());
        let status_reports = Counter::default();
        registry.register("cloudhub_status_reports", "Instance status reports received", status_reports.clone());
        let agents = Gauge::default();
        registry.register("cloudhub_agents", "Agents connected now", agents.clone());
        Metrics {
            registry,
            reconciliations,
            failures,
            duration,
            status_writes,
            placed_instances,
            changes_sent,
            changes_acked,
            changes_nacked,
            bad_messages,
            agents,
            status_reports,
        }
    }
}

impl Metrics {
    /// Counts a reconcile of `kind` and returns a guard that records its duration when dropped.
    pub fn reconcile(&self, kind: &'static str) -> ReconcileTimer {
        self.reconciliations.get_or_create(&KindLabels { kind }).inc();
        ReconcileTimer {
            histogram: self.duration.get_or_create(&KindLabels { kind }).clone(),
            start: std::time::Instant::now(),
        }
    }

    /// Counts a failed reconcile.
    pub fn failure(&self, kind: &'static str, reason: &'static str) {
        self.failures.get_or_create(&FailureLabels { kind, reason }).inc();
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Records a reconcile's duration when dropped.
pub struct ReconcileTimer {
    histogram: Histogram,
    start: std::time::Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}
