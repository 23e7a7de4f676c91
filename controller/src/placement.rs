//! Placement: which edge nodes run a microservice. Pure functions, no I/O.
//!
//! Membership follows the mesh type (Network, Account, Proximity), narrowed by the
//! mesh's label selector and the microservice's node selector. Unschedulable
//! nodes host nothing new but keep what they already run. With `replicas`, nodes
//! are chosen by rendezvous (highest-random-weight) hashing so that a node
//! joining or leaving moves at most one instance of each microservice.

use std::collections::{BTreeMap, BTreeSet};

use kube::core::{Selector, SelectorExt};
use kube::ResourceExt;
use sha2::{Digest, Sha256};
use supermesh_api::mesh::MeshSpec;
use supermesh_api::microservice::MicroserviceSpec;
use supermesh_api::{EdgeNode, MeshType};

/// Why a spec cannot be placed; the text is shown to users in a condition message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

fn invalid(msg: impl Into<String>) -> InvalidSpec {
    InvalidSpec(msg.into())
}

/// Checks the parts of a Mesh spec that the schema cannot express.
pub fn validate_mesh(spec: &MeshSpec) -> Result<(), InvalidSpec> {
    let t = spec.mesh_type;
    match t {
        MeshType::Account if spec.account.as_deref().unwrap_or("").is_empty() => {
            return Err(invalid("an Account mesh needs spec.account: the account whose nodes form the mesh"));
        }
        MeshType::Proximity if spec.proximity.is_none() => {
            return Err(invalid(
                "a Proximity mesh needs spec.proximity with center {latitude, longitude} and radiusKm",
            ));
        }
        MeshType::Network if spec.networks.as_ref().is_some_and(Vec::is_empty) => {
            return Err(invalid("spec.networks is empty: list networks, or omit it to include every network"));
        }
        _ => {}
    }
    if t != MeshType::Account && spec.account.is_some() {
        return Err(invalid(format!("spec.account applies only to Account meshes, this mesh is {t:?}")));
    }
    if t != MeshType::Proximity && spec.proximity.is_some() {
        return Err(invalid(format!("spec.proximity applies only to Proximity meshes, this mesh is {t:?}")));
    }
    if t != MeshType::Network && spec.networks.is_some() {
        return Err(invalid(format!("spec.networks applies only to Network meshes, this mesh is {t:?}")));
    }
    if let Some(p) = &spec.proximity {
        if !p.center.is_valid() || !p.radius_km.is_finite() || p.radius_km < 0.0 {
            return Err(invalid("spec.proximity needs a valid center and a radiusKm of at least 0"));
        }
    }
    mesh_selector(spec)?;
    Ok(())
}

/// Checks the parts of a Microservice spec that the schema cannot express.
pub fn validate_microservice(spec: &MicroserviceSpec) -> Result<(), InvalidSpec> {
    if spec.command.first().is_none_or(|c| c.is_empty()) {
        return Err(invalid("spec.command needs a non-empty executable as its first item"));
    }
    if let Some(hc) = &spec.health_check {
        let kinds = [hc.http.is_some(), hc.tcp.is_some(), hc.exec.is_some()];
        if kinds.iter().filter(|k| **k).count() != 1 {
            return Err(invalid("spec.healthCheck needs exactly one of http, tcp or exec"));
        }
    }
    let mut names = BTreeSet::new();
    if let Some(dup) = spec.env.iter().find(|e| !names.insert(e.name.as_str())) {
        return Err(invalid(format!("spec.env sets {} more than once", dup.name)));
    }
    let mut ports = BTreeSet::new();
    if let Some(dup) = spec.ports.iter().find(|p| !ports.insert((p.port, p.protocol as u8))) {
        return Err(invalid(format!("spec.ports lists port {} more than once", dup.port)));
    }
    Ok(())
}

fn mesh_selector(spec: &MeshSpec) -> Result<Option<Selector>, InvalidSpec> {
    spec.node_selector
        .clone()
        .map(Selector::try_from)
        .transpose()
        .map_err(|e| invalid(format!("spec.nodeSelector is invalid: {e}")))
}

/// The nodes that belong to a mesh, in name order. Nodes being deleted are left out.
pub fn mesh_members<'a>(spec: &MeshSpec, nodes: &'a [EdgeNode]) -> Result<Vec<&'a EdgeNode>, InvalidSpec> {
    validate_mesh(spec)?;
    let selector = mesh_selector(spec)?;
    let mut members: Vec<&EdgeNode> = nodes
        .iter()
        .filter(|n| n.metadata.deletion_timestamp.is_none())
        .filter(|n| match spec.mesh_type {
            MeshType::Network => spec.networks.as_ref().is_none_or(|nets| nets.contains(&n.spec.network)),
            MeshType::Account => spec.account.as_deref() == Some(n.spec.account.as_str()),
            MeshType::Proximity => {
                let p = spec.proximity.as_ref().expect("validated above");
                n.spec.location.is_some_and(|loc| loc.distance_km(&p.center) <= p.radius_km)
            }
        })
        .filter(|n| selector.as_ref().is_none_or(|s| s.matches(n.labels())))
        .collect();
    members.sort_by_key(|n| n.name_any());
    Ok(members)
}

/// Where a microservice runs and out of how many candidate nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// Names of the nodes that run one instance each.
    pub nodes: BTreeSet<String>,
    /// Number of mesh nodes that could host the microservice.
    pub candidates: usize,
}

/// Places a microservice (identified by `key`, stable for its lifetime) on the
/// nodes of its mesh. `current` is where it runs now: unschedulable nodes keep
/// instances they already host.
pub fn place(
    mesh: &MeshSpec,
    nodes: &[EdgeNode],
    key: &str,
    msvc: &MicroserviceSpec,
    current: &BTreeSet<String>,
) -> Result<Placement, InvalidSpec> {
    validate_microservice(msvc)?;
    let candidates: Vec<String> = mesh_members(mesh, nodes)?
        .into_iter()
        .filter(|n| labels_match(&msvc.node_selector, n.labels()))
        .filter(|n| !n.spec.unschedulable || current.contains(&n.name_any()))
        .map(|n| n.name_any())
        .collect();
    let chosen = match msvc.replicas {
        None => candidates.iter().cloned().collect(),
        Some(r) => rendezvous(key, &candidates, usize::try_from(r).unwrap_or(0)),
    };
    Ok(Placement { nodes: chosen, candidates: candidates.len() })
}

fn labels_match(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The `count` nodes with the highest weight for `key`; ties break on name.
fn rendezvous(key: &str, nodes: &[String], count: usize) -> BTreeSet<String> {
    let mut weighted: Vec<(u64, &String)> = nodes.iter().map(|n| (weight(key, n), n)).collect();
    weighted.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    weighted.into_iter().take(count).map(|(_, n)| n.clone()).collect()
}

fn weight(key: &str, node: &str) -> u64 {
    let digest = Sha256::new().chain_update(key).chain_update([0u8]).chain_update(node).finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("a SHA-256 digest has 32 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
    use supermesh_api::edgenode::EdgeNodeSpec;
    use supermesh_api::mesh::Proximity;
    use supermesh_api::Location;

    fn node(name: &str, network: &str, account: &str) -> EdgeNode {
        EdgeNode::new(
            name,
            EdgeNodeSpec {
                account: account.into(),
                network: network.into(),
                location: None,
                supernode_eligible: true,
                unschedulable: false,
            },
        )
    }

    fn labeled(mut n: EdgeNode, k: &str, v: &str) -> EdgeNode {
        n.labels_mut().insert(k.into(), v.into());
        n
    }

    fn located(mut n: EdgeNode, latitude: f64, longitude: f64) -> EdgeNode {
        n.spec.location = Some(Location { latitude, longitude });
        n
    }

    fn mesh(t: MeshType) -> MeshSpec {
        MeshSpec { mesh_type: t, account: None, networks: None, proximity: None, node_selector: None }
    }

    fn msvc() -> MicroserviceSpec {
        serde_json::from_value(serde_json::json!({"mesh": "m", "command": ["/bin/true"]})).unwrap()
    }

    fn names(p: &Placement) -> Vec<&str> {
        p.nodes.iter().map(String::as_str).collect()
    }

    fn fleet() -> Vec<EdgeNode> {
        vec![
            node("a1", "lan-a", "acme"),
            node("a2", "lan-a", "globex"),
            node("b1", "lan-b", "acme"),
            node("b2", "lan-b", "acme"),
        ]
    }

    const NONE: &BTreeSet<String> = &BTreeSet::new();

    #[test]
    fn network_mesh_takes_every_network_or_the_listed_ones() {
        let all = place(&mesh(MeshType::Network), &fleet(), "k", &msvc(), NONE).unwrap();
        assert_eq!(names(&all), ["a1", "a2", "b1", "b2"]);
        let mut m = mesh(MeshType::Network);
        m.networks = Some(vec!["lan-b".into()]);
        assert_eq!(names(&place(&m, &fleet(), "k", &msvc(), NONE).unwrap()), ["b1", "b2"]);
    }

    #[test]
    fn account_mesh_takes_nodes_of_the_account_anywhere() {
        let mut m = mesh(MeshType::Account);
        m.account = Some("acme".into());
        assert_eq!(names(&place(&m, &fleet(), "k", &msvc(), NONE).unwrap()), ["a1", "b1", "b2"]);
    }

    #[test]
    fn proximity_mesh_takes_nodes_within_the_radius() {
        let nodes = vec![
            located(node("paris", "n1", "x"), 48.8566, 2.3522),
            located(node("versailles", "n2", "x"), 48.8049, 2.1204),
            located(node("lyon", "n3", "x"), 45.764, 4.8357),
            node("nowhere", "n4", "x"),
        ];
        let mut m = mesh(MeshType::Proximity);
        m.proximity = Some(Proximity { center: Location { latitude: 48.85, longitude: 2.35 }, radius_km: 50.0 });
        assert_eq!(names(&place(&m, &nodes, "k", &msvc(), NONE).unwrap()), ["paris", "versailles"]);
    }

    #[test]
    fn both_selectors_narrow_membership() {
        let nodes: Vec<EdgeNode> = fleet()
            .into_iter()
            .map(|n| {
                let gpu = if n.name_any().ends_with('1') { "yes" } else { "no" };
                let zone = if n.name_any().starts_with('a') { "north" } else { "south" };
                labeled(labeled(n, "gpu", gpu), "zone", zone)
            })
            .collect();
        let mut m = mesh(MeshType::Network);
        m.node_selector = Some(LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "zone".into(),
                operator: "In".into(),
                values: Some(vec!["south".into()]),
            }]),
            match_labels: None,
        });
        assert_eq!(names(&place(&m, &nodes, "k", &msvc(), NONE).unwrap()), ["b1", "b2"]);
        let mut s = msvc();
        s.node_selector.insert("gpu".into(), "yes".into());
        assert_eq!(names(&place(&m, &nodes, "k", &s, NONE).unwrap()), ["b1"]);
    }

    #[test]
    fn unschedulable_nodes_host_nothing_new_but_keep_what_they_run() {
        let mut nodes = fleet();
        nodes[0].spec.unschedulable = true;
        let m = mesh(MeshType::Network);
        assert_eq!(names(&place(&m, &nodes, "k", &msvc(), NONE).unwrap()), ["a2", "b1", "b2"]);
        let current: BTreeSet<String> = ["a1".to_string()].into();
        assert_eq!(names(&place(&m, &nodes, "k", &msvc(), &current).unwrap()), ["a1", "a2", "b1", "b2"]);
    }

    #[test]
    fn nodes_being_deleted_are_not_members() {
        let mut nodes = fleet();
        nodes[1].metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert_eq!(names(&place(&mesh(MeshType::Network), &nodes, "k", &msvc(), NONE).unwrap()), ["a1", "b1", "b2"]);
    }

    #[test]
    fn replicas_pick_that_many_nodes_deterministically() {
        let nodes: Vec<EdgeNode> = (0..20).map(|i| node(&format!("n{i:02}"), "lan", "acme")).collect();
        let mut s = msvc();
        s.replicas = Some(5);
        let first = place(&mesh(MeshType::Network), &nodes, "ns/web", &s, NONE).unwrap();
        assert_eq!(first.nodes.len(), 5);
        assert_eq!(first.candidates, 20);
        let mut shuffled = nodes.clone();
        shuffled.reverse();
        assert_eq!(place(&mesh(MeshType::Network), &shuffled, "ns/web", &s, NONE).unwrap(), first);
        s.replicas = Some(50);
        assert_eq!(place(&mesh(MeshType::Network), &nodes, "ns/web", &s, NONE).unwrap().nodes.len(), 20);
        s.replicas = Some(0);
        assert!(place(&mesh(MeshType::Network), &nodes, "ns/web", &s, NONE).unwrap().nodes.is_empty());
    }

    #[test]
    fn a_joining_node_moves_at_most_one_instance_per_microservice() {
        let n = 50;
        let mut nodes: Vec<EdgeNode> = (0..n).map(|i| node(&format!("node-{i}"), "lan", "acme")).collect();
        let mut s = msvc();
        s.replicas = Some(10);
        let keys: Vec<String> = (0..200).map(|i| format!("team/svc-{i}")).collect();
        let m = mesh(MeshType::Network);
        let before: Vec<Placement> = keys.iter().map(|k| place(&m, &nodes, k, &s, NONE).unwrap()).collect();
        nodes.push(node("node-new", "lan", "acme"));
        let mut moved_total = 0;
        for (k, old) in keys.iter().zip(&before) {
            let new = place(&m, &nodes, k, &s, NONE).unwrap();
            let moved = old.nodes.difference(&new.nodes).count();
            assert!(moved <= 1, "{k}: {moved} instances moved when one node joined");
            assert_eq!(moved == 1, new.nodes.contains("node-new"));
            moved_total += moved;
        }
        // Expected share of instances that move: 1/(n+1) of all 2000 instances, about 39.
        let instances = keys.len() * 10;
        assert!(moved_total > 0 && moved_total <= instances * 2 / (n + 1), "{moved_total} of {instances} moved");
    }

    #[test]
    fn invalid_meshes_are_rejected_with_a_reason() {
        let e = validate_mesh(&mesh(MeshType::Proximity)).unwrap_err();
        assert!(e.0.contains("spec.proximity"), "{e}");
        assert!(validate_mesh(&mesh(MeshType::Account)).unwrap_err().0.contains("spec.account"));
        let mut m = mesh(MeshType::Network);
        m.networks = Some(vec![]);
        assert!(validate_mesh(&m).is_err());
        m.networks = None;
        m.account = Some("acme".into());
        assert!(validate_mesh(&m).unwrap_err().0.contains("only to Account"));
        let mut m = mesh(MeshType::Network);
        m.node_selector = Some(LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "zone".into(),
                operator: "Near".into(),
                values: None,
            }]),
            match_labels: None,
        });
        assert!(validate_mesh(&m).unwrap_err().0.contains("nodeSelector"));
    }

    #[test]
    fn invalid_microservices_are_rejected_with_a_reason() {
        let mut s = msvc();
        s.health_check = Some(serde_json::from_value(serde_json::json!({})).unwrap());
        assert!(validate_microservice(&s).unwrap_err().0.contains("exactly one"));
        let mut s = msvc();
        s.env = serde_json::from_value(serde_json::json!([{"name": "A", "value": ""}, {"name": "A", "value": "x"}]))
            .unwrap();
        assert!(validate_microservice(&s).unwrap_err().0.contains("more than once"));
        let mut s = msvc();
        s.command = vec![String::new()];
        assert!(validate_microservice(&s).is_err());
    }
}
