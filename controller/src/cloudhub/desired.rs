//! What a node should hold, and the changes that bring it there. Pure functions.

use std::collections::BTreeMap;

use supermesh_api::protocol::{Assignment, Operation};

/// One change to send to an agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// Insert, Update or Delete.
    pub operation: Operation,
    /// Resource string.
    pub resource: String,
    /// Version sent (for Delete, the version being removed).
    pub version: String,
    /// The assignment for Insert and Update.
    pub assignment: Option<Assignment>,
}

/// The changes that turn what the agent holds (`held`: acked versions, with
/// changes already in flight applied over them) into `desired`.
pub fn diff(desired: &BTreeMap<String, Assignment>, held: &BTreeMap<String, String>) -> Vec<Change> {
    let mut changes = Vec::new();
    for (resource, assignment) in desired {
        let version = assignment.version();
        let operation = match held.get(resource) {
            Some(v) if *v == version => continue,
            Some(_) => Operation::Update,
            None => Operation::Insert,
        };
        changes.push(Change { operation, resource: resource.clone(), version, assignment: Some(assignment.clone()) });
    }
    for (resource, version) in held {
        if !desired.contains_key(resource) {
            changes.push(Change {
                operation: Operation::Delete,
                resource: resource.clone(),
                version: version.clone(),
                assignment: None,
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

    fn desired(items: &[Assignment]) -> BTreeMap<String, Assignment> {
        items.iter().map(|a| (a.resource(), a.clone())).collect()
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
    fn a_recreated_object_is_an_update_even_at_the_same_generation() {
        let mut again = assignment("a", 1);
        again.uid = "uid-new".into();
        let held = BTreeMap::from([("team/microservice/a".to_string(), "1-uid-a".to_string())]);
        assert_eq!(ops(&diff(&desired(&[again]), &held)), [(Operation::Update, "team/microservice/a")]);
    }
}
