//! Placement: which edge nodes run a microservice. Pure functions, no I/O.
//!
//! Membership follows the mesh type (Network, Account, Proximity), narrowed by the
//! mesh's label selector and the microservice's node selector. Unschedulable
//! nodes host nothing new but keep what they already run. With `replicas`, nodes
//! are chosen by rendezvous (highest-random-weight) hashing so that a node
//! joining or leaving moves at most one instance of each microservice.

use std::collections::{BTreeMap, BTreeSet};

use kube::core::{Selector, SelectorExt};
use sha2::{Digest, Sha256};
use supermesh_api::mesh::{MeshSpec, Proximity};
use supermesh_api::microservice::MicroserviceSpec;
use supermesh_api::names::condition::{INVALID_SPEC, MESH_INVALID, MESH_NOT_FOUND, SECURITY_NOT_ALLOWED};
use supermesh_api::MeshType;

use crate::view::NodeView;

/// Why a spec cannot be placed; the text is shown to users in a condition message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSpec(pub String);

fn invalid(msg: impl Into<String>) -> InvalidSpec {
    InvalidSpec(msg.into())
}

/// Checks the parts of a Mesh spec that the schema cannot express.
pub fn validate_mesh(spec: &MeshSpec) -> Result<(), InvalidSpec> {
    MeshRule::new(spec).map(|_| ())
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
    crate::config::validate(spec).map_err(|e| invalid(format!("spec.{e}")))
}

/// Which nodes a valid mesh admits, compiled once from its spec.
#[derive(Debug, Clone)]
pub struct MeshRule {
    mesh_type: MeshType,
    networks: Option<BTreeSet<String>>,
    account: Option<String>,
    proximity: Option<Proximity>,
    selector: Option<Selector>,
}

impl MeshRule {
    /// The rule of `spec`, or why the spec is invalid.
    pub fn new(spec: &MeshSpec) -> Result<MeshRule, InvalidSpec> {
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
        let selector = spec
            .node_selector
            .clone()
            .map(Selector::try_from)
            .transpose()
            .map_err(|e| invalid(format!("spec.nodeSelector is invalid: {e}")))?;
        Ok(MeshRule {
            mesh_type: t,
            networks: spec.networks.as_ref().map(|n| n.iter().cloned().collect()),
            account: spec.account.clone(),
            proximity: spec.proximity.clone(),
            selector,
        })
    }

    /// Whether `node` belongs to the mesh. Nodes being deleted or awaiting approval belong to none.
    pub fn admits(&self, node: &NodeView) -> bool {
        if !node.active() {
            return false;
        }
        let by_type = match self.mesh_type {
            MeshType::Network => self.networks.as_ref().is_none_or(|nets| nets.contains(&node.network)),
            MeshType::Account => self.account.as_deref() == Some(node.account.as_str()),
            MeshType::Proximity => self
                .proximity
                .as_ref()
                .is_some_and(|p| node.location.is_some_and(|loc| loc.distance_km(&p.center) <= p.radius_km)),
        };
        by_type && self.selector.as_ref().is_none_or(|s| s.matches(&node.labels))
    }
}

/// The nodes that belong to a mesh, in name order.
pub fn mesh_members<'a>(
    spec: &MeshSpec,
    nodes: impl IntoIterator<Item = &'a NodeView>,
) -> Result<Vec<&'a NodeView>, InvalidSpec> {
    let rule = MeshRule::new(spec)?;
    let mut members: Vec<&NodeView> = nodes.into_iter().filter(|n| rule.admits(n)).collect();
    members.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(members)
}

/// Where a microservice runs and out of how many candidate nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    /// Names of the nodes that run one instance each.
    pub nodes: BTreeSet<String>,
    /// Number of mesh nodes that could host the microservice.
    pub candidates: usize,
    /// Mesh nodes matching the node selector that do not allow what the spec needs
    /// (EdgeNode `spec.security`), with what the first of them lacks.
    pub refused: Option<(usize, String)>,
}

/// Places a microservice (identified by `key`, stable for its lifetime) on the
/// nodes of its mesh. `current` is where it runs now: unschedulable nodes keep
/// instances they already host.
pub fn place<'a>(
    mesh: &MeshSpec,
    nodes: impl IntoIterator<Item = &'a NodeView>,
    key: &str,
    msvc: &MicroserviceSpec,
    current: &BTreeSet<String>,
) -> Result<Placement, InvalidSpec> {
    validate_microservice(msvc)?;
    Ok(place_among(&mesh_members(mesh, nodes)?, key, msvc, current))
}

/// Places a valid microservice among `members`, the nodes its mesh admits.
pub fn place_among(members: &[&NodeView], key: &str, msvc: &MicroserviceSpec, current: &BTreeSet<String>) -> Placement {
    let mut refused: Option<(usize, String)> = None;
    let candidates: Vec<&String> = members
        .iter()
        .filter(|n| labels_match(&msvc.node_selector, &n.labels))
        .filter(|n| !n.unschedulable || current.contains(&n.name))
        .filter(|n| match n.security.refuses(msvc) {
            None => true,
            Some(lacks) => {
                refused.get_or_insert((0, lacks)).0 += 1;
                false
            }
        })
        .map(|n| &n.name)
        .collect();
    let chosen = match msvc.replicas {
        None => candidates.iter().map(|n| (*n).clone()).collect(),
        Some(r) => rendezvous(key, &candidates, usize::try_from(r).unwrap_or(0)),
    };
    Placement { nodes: chosen, candidates: candidates.len(), refused }
}

fn labels_match(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The `count` nodes with the highest weight for `key`; ties break on name.
fn rendezvous(key: &str, nodes: &[&String], count: usize) -> BTreeSet<String> {
    order(key, nodes.iter().map(|n| n.as_str())).into_iter().take(count).map(str::to_owned).collect()
}

/// `nodes` in rendezvous order for `key`: by decreasing weight, ties broken on name.
pub fn order<'a>(key: &str, nodes: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut weighted: Vec<(u64, &str)> = nodes.into_iter().map(|n| (weight(key, n), n)).collect();
    weighted.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    weighted.into_iter().map(|(_, n)| n).collect()
}

/// The rendezvous weight of `node` for `key`: stable across builds and machines.
pub(crate) fn weight(key: &str, node: &str) -> u64 {
    let digest = Sha256::new().chain_update(key).chain_update([0u8]).chain_update(node).finalize();
    u64::from_be_bytes(digest[..8].try_into().expect("a SHA-256 digest has 32 bytes"))
}

/// The outcome of placing a microservice: where it runs, or why it cannot.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// Placed on these nodes.
    Placed(Placement),
    /// Not placed; `reason` is a condition reason, `message` says what to fix.
    Blocked {
        /// Condition reason.
        reason: &'static str,
        /// What to fix.
        message: String,
    },
}

impl Default for Plan {
    fn default() -> Self {
        Plan::Placed(Placement::default())
    }
}

impl Plan {
    /// The nodes the plan runs the microservice on (none when blocked).
    pub fn nodes(&self) -> &BTreeSet<String> {
        static NONE: BTreeSet<String> = BTreeSet::new();
        match self {
            Plan::Placed(p) => &p.nodes,
            Plan::Blocked { .. } => &NONE,
        }
    }
}

/// The mesh a microservice names, as placement sees it.
#[derive(Debug, Clone, Copy)]
pub enum MeshState<'a> {
    /// No such Mesh in the microservice's namespace.
    Missing,
    /// The Mesh `name` exists but its spec is invalid.
    Invalid(&'a str, &'a InvalidSpec),
    /// The Mesh is valid and admits these nodes.
    Members(&'a [&'a NodeView]),
}

/// Dereference → validate → place: the pure core of placing Microservice
/// `namespace/name` with `spec`. `current` is where it runs now.
pub fn plan(
    namespace: &str,
    name: &str,
    spec: &MicroserviceSpec,
    mesh: MeshState<'_>,
    current: &BTreeSet<String>,
) -> Plan {
    let members = match mesh {
        MeshState::Missing => {
            return Plan::Blocked {
                reason: MESH_NOT_FOUND,
                message: format!(
                    "Mesh {:?} does not exist in namespace {namespace:?}: create it or change spec.mesh",
                    spec.mesh
                ),
            }
        }
        MeshState::Invalid(mesh, e) => {
            if let Err(e) = validate_microservice(spec) {
                return Plan::Blocked { reason: INVALID_SPEC, message: e.0 };
            }
            return Plan::Blocked { reason: MESH_INVALID, message: format!("Mesh {mesh:?} is invalid: {}", e.0) };
        }
        MeshState::Members(members) => members,
    };
    if let Err(e) = validate_microservice(spec) {
        return Plan::Blocked { reason: INVALID_SPEC, message: e.0 };
    }
    let placement = place_among(members, &format!("{namespace}/{name}"), spec, current);
    match &placement.refused {
        Some((count, lacks)) if placement.nodes.is_empty() && spec.replicas != Some(0) => Plan::Blocked {
            reason: SECURITY_NOT_ALLOWED,
            message: format!(
                "{count} node(s) of Mesh {:?} match but do not allow what it needs; set {lacks} in the \
                 EdgeNode spec.security of the nodes that should run it, or change spec.securityContext",
                spec.mesh
            ),
        },
        _ => Plan::Placed(placement),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
    use kube::ResourceExt;
    use supermesh_api::edgenode::EdgeNodeSpec;
    use supermesh_api::mesh::Proximity;
    use supermesh_api::{EdgeNode, Location};

    fn node(name: &str, network: &str, account: &str) -> EdgeNode {
        EdgeNode::new(
            name,
            EdgeNodeSpec {
                account: account.into(),
                network: network.into(),
                location: None,
                supernode_eligible: true,
                unschedulable: false,
                security: Default::default(),
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

    fn views(nodes: &[EdgeNode]) -> Vec<NodeView> {
        nodes.iter().map(NodeView::from).collect()
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
        let all = place(&mesh(MeshType::Network), &views(&fleet()), "k", &msvc(), NONE).unwrap();
        assert_eq!(names(&all), ["a1", "a2", "b1", "b2"]);
        let mut m = mesh(MeshType::Network);
        m.networks = Some(vec!["lan-b".into()]);
        assert_eq!(names(&place(&m, &views(&fleet()), "k", &msvc(), NONE).unwrap()), ["b1", "b2"]);
    }

    #[test]
    fn account_mesh_takes_nodes_of_the_account_anywhere() {
        let mut m = mesh(MeshType::Account);
        m.account = Some("acme".into());
        assert_eq!(names(&place(&m, &views(&fleet()), "k", &msvc(), NONE).unwrap()), ["a1", "b1", "b2"]);
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
        assert_eq!(names(&place(&m, &views(&nodes), "k", &msvc(), NONE).unwrap()), ["paris", "versailles"]);
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
        assert_eq!(names(&place(&m, &views(&nodes), "k", &msvc(), NONE).unwrap()), ["b1", "b2"]);
        let mut s = msvc();
        s.node_selector.insert("gpu".into(), "yes".into());
        assert_eq!(names(&place(&m, &views(&nodes), "k", &s, NONE).unwrap()), ["b1"]);
    }

    #[test]
    fn unschedulable_nodes_host_nothing_new_but_keep_what_they_run() {
        let mut nodes = fleet();
        nodes[0].spec.unschedulable = true;
        let m = mesh(MeshType::Network);
        assert_eq!(names(&place(&m, &views(&nodes), "k", &msvc(), NONE).unwrap()), ["a2", "b1", "b2"]);
        let current: BTreeSet<String> = ["a1".to_string()].into();
        assert_eq!(names(&place(&m, &views(&nodes), "k", &msvc(), &current).unwrap()), ["a1", "a2", "b1", "b2"]);
    }

    #[test]
    fn what_a_microservice_needs_beyond_the_sandbox_goes_only_where_its_node_allows_it() {
        let mut nodes = fleet();
        nodes[1].spec.security.allowed_capabilities = vec!["NET_BIND_SERVICE".into()];
        nodes[2].spec.security.allow_insecure_artifacts = true;
        nodes[3].spec.security.allow_run_as_user = true;
        let members = views(&nodes);
        let members: Vec<&NodeView> = members.iter().collect();
        let mut s = msvc();
        s.security_context = Some(supermesh_api::microservice::SecurityContext {
            capabilities: vec!["NET_BIND_SERVICE".into()],
            ..Default::default()
        });
        let placed = |s: &MicroserviceSpec| plan("team", "web", s, MeshState::Members(&members), NONE);
        assert!(matches!(placed(&s), Plan::Placed(ref p) if names(p) == ["a2"] && p.refused.as_ref().unwrap().0 == 3));
        s.security_context.as_mut().unwrap().capabilities = vec!["SYS_ADMIN".into()];
        let Plan::Blocked { reason, message } = placed(&s) else { panic!("placed without an allowing node") };
        assert_eq!(reason, SECURITY_NOT_ALLOWED);
        assert!(message.contains("4 node(s)") && message.contains("allowedCapabilities with SYS_ADMIN"), "{message}");
        s.security_context =
            Some(supermesh_api::microservice::SecurityContext { run_as_user: Some(0), ..Default::default() });
        assert!(matches!(placed(&s), Plan::Placed(ref p) if names(p) == ["b2"]));
        let mut plain = msvc();
        plain.artifact =
            Some(supermesh_api::microservice::Artifact { url: "http://x/a.tgz".into(), sha256: "0".repeat(64) });
        assert!(matches!(placed(&plain), Plan::Placed(ref p) if names(p) == ["b1"]));
        plain.artifact.as_mut().unwrap().url = "https://x/a.tgz".into();
        assert!(matches!(placed(&plain), Plan::Placed(ref p) if names(p).len() == 4 && p.refused.is_none()));
        s.security_context.as_mut().unwrap().capabilities = vec!["SYS_ADMIN".into()];
        s.replicas = Some(0);
        assert!(matches!(placed(&s), Plan::Placed(ref p) if p.nodes.is_empty()), "zero replicas need no node");
    }

    #[test]
    fn nodes_being_deleted_are_not_members() {
        let mut nodes = fleet();
        nodes[1].metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        assert_eq!(
            names(&place(&mesh(MeshType::Network), &views(&nodes), "k", &msvc(), NONE).unwrap()),
            ["a1", "b1", "b2"]
        );
    }

    #[test]
    fn replicas_pick_that_many_nodes_deterministically() {
        let nodes: Vec<EdgeNode> = (0..20).map(|i| node(&format!("n{i:02}"), "lan", "acme")).collect();
        let mut s = msvc();
        s.replicas = Some(5);
        let first = place(&mesh(MeshType::Network), &views(&nodes), "ns/web", &s, NONE).unwrap();
        assert_eq!(first.nodes.len(), 5);
        assert_eq!(first.candidates, 20);
        let mut shuffled = nodes.clone();
        shuffled.reverse();
        assert_eq!(place(&mesh(MeshType::Network), &views(&shuffled), "ns/web", &s, NONE).unwrap(), first);
        s.replicas = Some(50);
        assert_eq!(place(&mesh(MeshType::Network), &views(&nodes), "ns/web", &s, NONE).unwrap().nodes.len(), 20);
        s.replicas = Some(0);
        assert!(place(&mesh(MeshType::Network), &views(&nodes), "ns/web", &s, NONE).unwrap().nodes.is_empty());
    }

    #[test]
    fn a_joining_node_moves_at_most_one_instance_per_microservice() {
        let n = 50;
        let mut nodes: Vec<EdgeNode> = (0..n).map(|i| node(&format!("node-{i}"), "lan", "acme")).collect();
        let mut s = msvc();
        s.replicas = Some(10);
        let keys: Vec<String> = (0..200).map(|i| format!("team/svc-{i}")).collect();
        let m = mesh(MeshType::Network);
        let before: Vec<Placement> = keys.iter().map(|k| place(&m, &views(&nodes), k, &s, NONE).unwrap()).collect();
        nodes.push(node("node-new", "lan", "acme"));
        let mut moved_total = 0;
        for (k, old) in keys.iter().zip(&before) {
            let new = place(&m, &views(&nodes), k, &s, NONE).unwrap();
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
