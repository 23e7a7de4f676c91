//! What a node should hold, and the changes that bring it there. Pure functions.

use std::collections::BTreeMap;

use serde::Serialize;
use supermesh_api::protocol::{Assignment, Membership, Operation, ResourceRef, MEMBERSHIP, MICROSERVICE};

/// One resource the cloud keeps on an agent: its content is the message content.
#[derive(Serialize, Debug, Clone, PartialEq)]
#[serde(untagged)]
pub enum Desired {
    /// A microservice placed on the node (`namespace/microservice/name`).
    Assignment(Box<Assignment>),
    /// The membership of the node's network (`_/membership/<network>`).
    Membership(Membership),
}

impl Desired {
    /// The version the agent stores and states.
    pub fn version(&self) -> String {
        match self {
            Desired::Assignment(a) => a.version(),
            Desired::Membership(m) => m.version(),
        }
    }
}

/// Whether `resource` is of a type the cloud keeps on agents, so that a version an
/// agent states for it in its hello counts as held.
pub fn is_kept(resource: &str) -> bool {
    ResourceRef::parse(resource).is_ok_and(|r| r.id.is_some() && matches!(r.res_type, MICROSERVICE | MEMBERSHIP))
}

/// One change to send to an agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Insert, Update or Delete.
    pub operation: Operation,
    /// Resource string.
    pub resource: String,
    /// Version sent (for Delete, the version being removed).
    pub version: String,
    /// The content for Insert and Update.
    pub content: Option<Desired>,
}

/// The changes that turn what the agent holds (`held`: acked versions, with
/// changes already in flight applied over them) into `desired`.
pub fn diff(desired: &BTreeMap<String, Desired>, held: &BTreeMap<String, String>) -> Vec<Change> {
    let mut changes = Vec::new();
    for (resource, content) in desired {
        let version = content.version();
        let operation = match held.get(resource) {
            Some(v) if *v == version => continue,
            Some(_) => Operation::Update,
            None => Operation::Insert,
        };
        changes.push(Change { operation, resource: resource.clone(), version, content: Some(content.clone()) });
    }
    for (resource, version) in held {
        if !desired.contains_key(resource) {
            changes.push(Change {
                operation: Operation::Delete,
                resource: resource.clone(),
                version: version.clone(),
                content: None,
            });
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(name: &str, generation: i64) -> Assignment {
        Assignment {
            namespace: "team".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            generation,
            spec: serde_json::from_value(serde_json::json!({"mesh": "m", "command": ["x"]})).unwrap(),
        }
    }

    fn desired(items: &[Assignment]) -> BTreeMap<String, Desired> {
        items.iter().map(|a| (a.resource(), Desired::Assignment(Box::new(a.clone())))).collect()
    }

    fn membership(addresses: &[Option<&str>]) -> Membership {
        let members = addresses
            .iter()
            .enumerate()
            .map(|(i, address)| supermesh_api::protocol::Member {
                name: format!("n{i}"),
                account: "a".into(),
                address: address.map(str::to_owned),
                location: None,
                supernode_eligible: true,
            })
            .collect();
        Membership { network: "lan".into(), key: "k".into(), members }
    }

    fn ops(changes: &[Change]) -> Vec<(Operation, &str)> {
        changes.iter().map(|c| (c.operation, c.resource.as_str())).collect()
    }

    #[test]
    fn a_new_agent_gets_inserts_only() {
        let d = desired(&[assignment("a", 1), assignment("b", 3)]);
        let changes = diff(&d, &BTreeMap::new());
        assert_eq!(
            ops(&changes),
            [(Operation::Insert, "team/microservice/a"), (Operation::Insert, "team/microservice/b")]
        );
        assert_eq!(changes[1].version, "3-uid-b");
    }

    #[test]
    fn an_up_to_date_agent_gets_nothing() {
        let d = desired(&[assignment("a", 1)]);
        let held = BTreeMap::from([("team/microservice/a".to_string(), "1-uid-a".to_string())]);
        assert!(diff(&d, &held).is_empty());
    }

    #[test]
    fn only_the_difference_is_sent() {
        let d = desired(&[assignment("a", 2), assignment("c", 1)]);
        let held = BTreeMap::from([
            ("team/microservice/a".to_string(), "1-uid-a".to_string()),
            ("team/microservice/b".to_string(), "5-uid-b".to_string()),
        ]);
        assert_eq!(
            ops(&diff(&d, &held)),
            [
                (Operation::Update, "team/microservice/a"),
                (Operation::Insert, "team/microservice/c"),
                (Operation::Delete, "team/microservice/b")
            ]
        );
    }

    #[test]
    fn membership_goes_through_the_same_diff_as_assignments() {
        let mut d = desired(&[assignment("a", 1)]);
        let first = membership(&[None, None]);
        d.insert(Membership::resource("lan"), Desired::Membership(first.clone()));
        let changes = diff(&d, &BTreeMap::new());
        assert_eq!(
            ops(&changes),
            [(Operation::Insert, "_/membership/lan"), (Operation::Insert, "team/microservice/a")]
        );
        assert_eq!(changes[0].version, first.version());
        let content = serde_json::to_value(changes[0].content.as_ref().unwrap()).unwrap();
        assert_eq!(content, serde_json::to_value(&first).unwrap(), "the content is the membership itself");

        let held: BTreeMap<String, String> = changes.iter().map(|c| (c.resource.clone(), c.version.clone())).collect();
        assert!(diff(&d, &held).is_empty());
        d.insert(Membership::resource("lan"), Desired::Membership(membership(&[None, Some("10.0.0.2:10360")])));
        assert_eq!(ops(&diff(&d, &held)), [(Operation::Update, "_/membership/lan")]);
        d.remove("_/membership/lan");
        assert_eq!(ops(&diff(&d, &held)), [(Operation::Delete, "_/membership/lan")]);
    }

    #[test]
    fn only_microservices_and_memberships_count_as_held() {
        assert!(is_kept("team/microservice/a"));
        assert!(is_kept("_/membership/lan"));
        assert!(!is_kept("team/microservice"));
        assert!(!is_kept("team/log/a"));
        assert!(!is_kept("node/status"));
        assert!(!is_kept("not a resource"));
    }

    #[test]
    fn a_recreated_object_is_an_update_even_at_the_same_generation() {
        let mut again = assignment("a", 1);
        again.uid = "uid-new".into();
        let held = BTreeMap::from([("team/microservice/a".to_string(), "1-uid-a".to_string())]);
        assert_eq!(ops(&diff(&desired(&[again]), &held)), [(Operation::Update, "team/microservice/a")]);
    }
}
