//! Reports agents send about nodes, directly or relayed by a supernode: what they
//! say, and who may send them. Pure functions; the session takes the reports.

use serde::Deserialize;
use supermesh_api::protocol::{
    EventReport, Operation, ResourceRef, StatusReport, MICROSERVICE, OUTBOX_ID_PREFIX, STATUS_RESOURCE,
};

/// One report about a node.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// The node's instance status.
    Status(StatusReport),
    /// Something that happened to one of its instances.
    Event {
        /// The instance's resource string `namespace/microservice/name`.
        resource: String,
        /// The event.
        event: EventReport,
    },
}

impl Report {
    /// Reads the report `operation` on `resource` carries in `content`.
    pub fn parse(operation: Operation, resource: &str, content: &serde_json::Value) -> Result<Report, String> {
        if operation != Operation::MetaSync {
            return Err(format!("a report is a MetaSync, not a {operation:?}"));
        }
        if resource == STATUS_RESOURCE {
            let status = StatusReport::deserialize(content).map_err(|e| format!("invalid status report: {e}"))?;
            return Ok(Report::Status(status));
        }
        match ResourceRef::parse(resource) {
            Ok(r) if r.res_type == MICROSERVICE && r.id.is_some() => {
                let event = EventReport::deserialize(content).map_err(|e| format!("invalid instance event: {e}"))?;
                Ok(Report::Event { resource: resource.to_owned(), event })
            }
            _ => Err(format!("{resource:?} is neither {STATUS_RESOURCE} nor an instance's resource")),
        }
    }
}

/// The outbox seq of a report an agent sends directly, from its message id `o-<seq>`.
pub fn outbox_seq(message_id: &str) -> Option<i64> {
    message_id.strip_prefix(OUTBOX_ID_PREFIX)?.parse().ok()
}

/// Whether the session of node `relay` may report for `node`: for itself always, for
/// another node only when both are EdgeNodes on the same network. `network_of` reads
/// a node's `spec.network` from the index.
pub fn may_report_for(relay: &str, node: &str, network_of: impl Fn(&str) -> Option<String>) -> Result<(), String> {
    if node == relay {
        return Ok(());
    }
    let Some(network) = network_of(node) else {
        return Err(format!("node {node} has no EdgeNode"));
    };
    match network_of(relay) {
        Some(own) if own == network => Ok(()),
        Some(own) => Err(format!("node {node} is on network {network}, not on {relay}'s network {own}")),
        None => Err(format!("the relaying node {relay} has no EdgeNode")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn networks(node: &str) -> Option<String> {
        match node {
            "super" | "member" => Some("lan".into()),
            "stranger" => Some("other-lan".into()),
            _ => None,
        }
    }

    #[test]
    fn a_supernode_reports_for_itself_and_its_network_only() {
        assert_eq!(may_report_for("super", "super", networks), Ok(()));
        assert_eq!(may_report_for("super", "member", networks), Ok(()));
        let other = may_report_for("super", "stranger", networks).unwrap_err();
        assert!(other.contains("network other-lan") && other.contains("network lan"), "{other}");
        let unknown = may_report_for("super", "ghost", networks).unwrap_err();
        assert!(unknown.contains("ghost has no EdgeNode"), "{unknown}");
        assert_eq!(may_report_for("new", "new", networks), Ok(()), "a node always reports for itself");
        assert!(may_report_for("new", "member", networks).is_err(), "a relay without an EdgeNode reports for nobody");
    }

    #[test]
    fn reports_are_status_or_instance_events() {
        let status = json!({"takenMs": 5, "instances": [], "cluster": {"role": "Supernode", "supernode": "a"}});
        match Report::parse(Operation::MetaSync, STATUS_RESOURCE, &status).unwrap() {
            Report::Status(s) => assert_eq!(s.cluster.unwrap().supernode.as_deref(), Some("a")),
            other => panic!("{other:?}"),
        }
        let event = json!({"warning": true, "reason": "Exited", "message": "code 3"});
        let parsed = Report::parse(Operation::MetaSync, "team/microservice/web", &event).unwrap();
        assert!(
            matches!(parsed, Report::Event { ref resource, ref event } if resource == "team/microservice/web" && event.warning)
        );

        assert!(Report::parse(Operation::Insert, STATUS_RESOURCE, &status).unwrap_err().contains("MetaSync"));
        assert!(Report::parse(Operation::MetaSync, STATUS_RESOURCE, &event).unwrap_err().contains("invalid status"));
        assert!(Report::parse(Operation::MetaSync, "team/log/web", &event).unwrap_err().contains("neither"));
        assert!(Report::parse(Operation::MetaSync, "team/microservice", &event).is_err());
    }

    #[test]
    fn direct_reports_carry_their_outbox_seq_in_the_id() {
        assert_eq!(outbox_seq("o-42"), Some(42));
        assert_eq!(outbox_seq("o-x"), None);
        assert_eq!(outbox_seq("42"), None);
        assert_eq!(outbox_seq("c1-7"), None);
    }
}
