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

/// The way reports reached the cloud.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ReportPath {
    /// Sent by the node's own agent.
    Direct,
    /// Relayed by the node's supernode in a batch.
    Batch,
}

impl ReportPath {
    fn label(self) -> &'static str {
        match self {
            ReportPath::Direct => "direct",
            ReportPath::Batch => "batch",
        }
    }
}

/// Labels naming the way reports came.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PathLabels {
    /// `direct` or `batch`.
    pub path: &'static str,
}

/// Labels naming what became of an enrollment or renewal.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `enrolled`, `renewed` or `refused`.
    pub result: &'static str,
}

/// Labels naming why something was refused: a connection (`no_certificate`, `expired`,
/// `not_standing`, `bad_token`, `per_address`, ...) or a report (`refused` for good, `later`, or
/// `bad_signature`: relayed for another node without that node's signature).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why.
    pub reason: &'static str,
}

/// The controller's metrics and the registries that expose them.
pub struct Metrics {
    /// Registry of the controller's own metrics (`supermesh_controller_*`), rendered at `/metrics`.
    pub registry: Registry,
    /// Registry of metrics named for the product (`supermesh_*`), which benchmarks compare
    /// across components; rendered at `/metrics` too.
    pub product_registry: Registry,
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
    /// Microservice changes (Insert, Update, Delete) sent to agents.
    pub changes_sent: Counter,
    /// Microservice changes agents acknowledged after committing them.
    pub changes_acked: Counter,
    /// Microservice changes agents refused.
    pub changes_nacked: Counter,
    /// Network memberships (Insert, Update, Delete) sent to agents.
    pub memberships_sent: Counter,
    /// Invalid messages received from agents.
    pub bad_messages: Counter,
    /// Agents connected now.
    pub agents: Gauge,
    /// Instance status reports (MetaSync) received from agents.
    pub status_reports: Counter,
    /// Messages from agents carrying reports, by path: a direct report or a batch.
    pub report_messages: Family<PathLabels, Counter>,
    /// Bytes of the frames of those messages, by path.
    pub report_bytes: Family<PathLabels, Counter>,
    /// Reports those messages carried, by path.
    pub reports: Family<PathLabels, Counter>,
    /// Reports received again: an event seen before, or a status snapshot no newer than the one held.
    pub reports_duplicate: Counter,
    /// Microservice changes sent again because their ack did not come in time.
    pub changes_resent: Counter,
    /// Instance events dropped because too many waited for the API server.
    pub events_dropped: Counter,
    /// Kubernetes Events published for instance events (one may sum up many).
    pub events_published: Counter,
    /// Objects skipped because they do not match their kind's schema, by kind.
    pub invalid_objects: Family<KindLabels, Counter>,
    /// Agents sent to the replica that serves their node.
    pub redirects: Counter,
    /// Enrollments and renewals, by result.
    pub enrollments: Family<ResultLabels, Counter>,
    /// Reports not taken: refused (not the sender's to make, stamped in the future, malformed), relayed
    /// without their node's signature (`bad_signature`) or left for later.
    pub reports_not_taken: Family<ReasonLabels, Counter>,
    /// Connections refused at the handshake, by reason.
    pub refused: Family<ReasonLabels, Counter>,
    /// 1 while this replica holds the controller Lease (reconciles Meshes and Microservices).
    pub leader: Gauge,
    /// Controller replicas this one sees live, itself included.
    pub replicas: Gauge,
    /// Status reports forwarded to other replicas (one per peer that took the forward).
    pub reports_forwarded: Counter,
    /// Status reports other replicas forwarded here that were newer than what was held.
    pub reports_received: Counter,
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
        let [changes_sent, changes_acked, changes_nacked, bad_messages, memberships_sent] =
            std::array::from_fn(|_| Counter::default());
        registry.register("cloudhub_changes_sent", "Microservice changes sent to agents", changes_sent.clone());
        registry.register("cloudhub_changes_acked", "Microservice changes agents acknowledged", changes_acked.clone());
        registry.register("cloudhub_changes_nacked", "Microservice changes agents refused", changes_nacked.clone());
        registry.register("cloudhub_memberships_sent", "Network memberships sent to agents", memberships_sent.clone());
        registry.register("cloudhub_bad_messages", "Invalid messages received from agents", bad_messages.clone());
        let [changes_resent, events_dropped, events_published] = std::array::from_fn(|_| Counter::default());
        registry.register(
            "events_published",
            "Kubernetes Events published for instance events",
            events_published.clone(),
        );
        registry.register(
            "cloudhub_changes_resent",
            "Microservice changes sent again after no ack",
            changes_resent.clone(),
        );
        registry.register(
            "events_dropped",
            "Instance events dropped while the API server lagged",
            events_dropped.clone(),
        );
        let invalid_objects = Family::<KindLabels, Counter>::default();
        registry.register("invalid_objects", "Objects skipped for not matching their schema", invalid_objects.clone());
        let status_reports = Counter::default();
        registry.register("cloudhub_status_reports", "Instance status reports received", status_reports.clone());
        let agents = Gauge::default();
        registry.register("cloudhub_agents", "Agents connected now", agents.clone());
        let redirects = Counter::default();
        registry.register("cloudhub_redirects", "Agents sent to the replica that serves their node", redirects.clone());
        let enrollments = Family::<ResultLabels, Counter>::default();
        registry.register("enrollments", "Node enrollments and certificate renewals, by result", enrollments.clone());
        let reports_not_taken = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "reports_not_taken",
            "Reports from agents not taken: refused for good or left to come again",
            reports_not_taken.clone(),
        );
        let refused = Family::<ReasonLabels, Counter>::default();
        registry.register("cloudhub_refused", "Agent connections refused at the handshake, by reason", refused.clone());
        let [leader, replicas] = std::array::from_fn(|_| Gauge::default());
        registry.register("leader", "1 while this replica holds the controller Lease", leader.clone());
        registry.register("replicas", "Controller replicas seen live, this one included", replicas.clone());
        let [reports_forwarded, reports_received] = std::array::from_fn(|_| Counter::default());
        registry.register("reports_forwarded", "Status reports forwarded to other replicas", reports_forwarded.clone());
        registry.register("reports_received", "Status reports taken from other replicas", reports_received.clone());
        let mut product_registry = Registry::with_prefix("supermesh");
        let [report_messages, report_bytes, reports] =
            std::array::from_fn(|_| Family::<PathLabels, Counter>::default());
        product_registry.register("report_messages", "Messages from agents carrying reports", report_messages.clone());
        product_registry.register(
            "report_bytes",
            "Bytes of messages from agents carrying reports",
            report_bytes.clone(),
        );
        product_registry.register("reports", "Reports received from agents", reports.clone());
        let reports_duplicate = Counter::default();
        product_registry.register("reports_duplicate", "Reports received again", reports_duplicate.clone());
        Metrics {
            registry,
            product_registry,
            reconciliations,
            failures,
            duration,
            status_writes,
            placed_instances,
            changes_sent,
            changes_acked,
            changes_nacked,
            memberships_sent,
            bad_messages,
            agents,
            status_reports,
            report_messages,
            report_bytes,
            reports,
            reports_duplicate,
            changes_resent,
            events_dropped,
            events_published,
            invalid_objects,
            redirects,
            enrollments,
            reports_not_taken,
            refused,
            leader,
            replicas,
            reports_forwarded,
            reports_received,
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

    /// Counts one message of `bytes` carrying `reports` reports that came by `path`.
    pub fn reports_received(&self, path: ReportPath, bytes: usize, reports: usize) {
        let labels = PathLabels { path: path.label() };
        self.report_messages.get_or_create(&labels).inc();
        self.report_bytes.get_or_create(&labels).inc_by(bytes as u64);
        self.reports.get_or_create(&labels).inc_by(reports as u64);
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut out = String::new();
        encode_registry(&mut out, &self.registry)
            .and_then(|()| encode_registry(&mut out, &self.product_registry))
            .and_then(|()| encode_eof(&mut out))
            .expect("writing to a String cannot fail");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_metrics_are_named_for_the_product() {
        let m = Metrics::default();
        m.reports_received(ReportPath::Direct, 120, 1);
        m.reports_received(ReportPath::Batch, 900, 7);
        m.reports_received(ReportPath::Batch, 100, 3);
        m.reports_duplicate.inc();
        let text = m.render();
        for line in [
            "supermesh_report_messages_total{path=\"direct\"} 1",
            "supermesh_report_messages_total{path=\"batch\"} 2",
            "supermesh_report_bytes_total{path=\"batch\"} 1000",
            "supermesh_reports_total{path=\"direct\"} 1",
            "supermesh_reports_total{path=\"batch\"} 10",
            "supermesh_reports_duplicate_total 1",
            "supermesh_controller_cloudhub_agents 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from:\n{text}");
        }
        assert_eq!(text.matches("# EOF").count(), 1);
        assert!(text.trim_end().ends_with("# EOF"));
    }
}
