//! The fleet index: the one owner of everything the controller derives from the
//! cluster and from agents, in the style of linkerd's policy index.
//!
//! It is fed by the shared watch streams of the three kinds (`*_event`) and by
//! the agents' sessions (`connect`, `take_status`, `disconnect`). It owns mesh
//! memberships, the placement of every microservice, network memberships, node
//! reports and liveness, and publishes what each node should hold through a
//! `tokio::sync::watch` channel per node ([`NodeDesired`]). A change recomputes
//! only what it touches: a node event re-plans the microservices of the meshes
//! that admit the node, a spec change republishes the nodes that run it, a
//! report changes the aggregates of the microservices it is about. Reconcilers
//! read what they write into status through a few methods and are asked to run
//! through trigger channels; nothing recomputes the fleet on a timer.

pub mod desired;
mod node;
mod seqs;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures::channel::mpsc::{unbounded, UnboundedReceiver, UnboundedSender};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use supermesh_api::edgenode::InstanceCounts;
use supermesh_api::mesh::MeshSpec;
use supermesh_api::microservice::MicroserviceSpec;
use supermesh_api::names::condition::CONFIG_MISSING;
use supermesh_api::{EdgeNode, Mesh, Microservice};
use supermesh_protocol::{
    Change, ClusterView, Endpoint, ErrorCode, ErrorContent, InstanceReport, NodeInfo, NodeRole, Prepared, ResourceRef,
    Scope, StatusReport, MICROSERVICE,
};
use tokio::sync::{watch, Notify};

pub use crate::view::{NodeIdentity, NodeStatusView, NodeView, SessionInfo};
pub use desired::{NodeDesired, Standing};

use crate::aggregator::{aggregate, Aggregate};
use crate::clusters::{summarize, MemberStatus, Summary};
use crate::discovery;
use crate::membership;
use crate::metrics::Metrics;
use crate::placement::{self, MeshRule, MeshState, Plan};
use crate::rollout;
use node::{Live, NodeEntry};

/// A namespaced object's key: namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl Key {
    /// The key of `obj`.
    pub fn of<K: Resource>(obj: &K) -> Key {
        Key { namespace: obj.namespace().unwrap_or_default(), name: obj.name_any() }
    }

    /// The key of the object `namespace/name`.
    pub fn new(namespace: &str, name: &str) -> Key {
        Key { namespace: namespace.to_owned(), name: name.to_owned() }
    }

    /// The resource string of the microservice with this key.
    pub fn resource(&self) -> String {
        ResourceRef::string(&self.namespace, MICROSERVICE, &self.name)
    }

    fn object_ref<K: Resource<DynamicType = ()>>(&self) -> ObjectRef<K> {
        ObjectRef::new(&self.name).within(&self.namespace)
    }
}

/// Requests to reconcile, from the index to the controllers.
pub struct Triggers {
    /// Microservices whose placement or reports changed.
    pub microservices: UnboundedReceiver<ObjectRef<Microservice>>,
    /// EdgeNodes whose agent connected or disconnected, whose placed instances or whose
    /// cluster role changed: their status should change soon.
    pub nodes_now: UnboundedReceiver<ObjectRef<EdgeNode>>,
    /// EdgeNodes whose running or ready instance counts changed: coalesced longer.
    pub nodes_later: UnboundedReceiver<ObjectRef<EdgeNode>>,
    /// Meshes whose members, their readiness or their microservices changed.
    pub meshes: UnboundedReceiver<ObjectRef<Mesh>>,
}

struct Senders {
    microservices: UnboundedSender<ObjectRef<Microservice>>,
    nodes_now: UnboundedSender<ObjectRef<EdgeNode>>,
    nodes_later: UnboundedSender<ObjectRef<EdgeNode>>,
    meshes: UnboundedSender<ObjectRef<Mesh>>,
}

impl Senders {
    // A closed channel means the controllers stopped: the process is shutting down.
    fn microservice(&self, key: &Key) {
        let _ = self.microservices.unbounded_send(key.object_ref());
    }

    fn mesh(&self, key: &Key) {
        let _ = self.meshes.unbounded_send(key.object_ref());
    }

    fn node_now(&self, name: &str) {
        let _ = self.nodes_now.unbounded_send(ObjectRef::new(name));
    }

    fn node_later(&self, name: &str) {
        let _ = self.nodes_later.unbounded_send(ObjectRef::new(name));
    }
}

/// The three kinds, for listing state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Mesh,
    EdgeNode,
    Microservice,
}

struct MeshEntry {
    spec: MeshSpec,
    rule: Result<MeshRule, placement::InvalidSpec>,
    /// Names of the nodes the mesh admits.
    members: BTreeSet<String>,
}

struct MsvcEntry {
    uid: String,
    deleting: bool,
    spec: MicroserviceSpec,
    /// The revision nodes outside a rollout run.
    current: Arc<Prepared>,
    /// The revision the first `updated_nodes` placed nodes in rendezvous order run.
    updated: Arc<Prepared>,
    /// How many placed nodes run `updated`; `None`: all of them.
    updated_nodes: Option<usize>,
    /// Whether a rollout in waves progresses: its reconciler must look again as time passes.
    rolling: bool,
    /// The placed nodes that run `updated`, while not all of them do.
    updating: Option<BTreeSet<String>>,
    /// Shared with the reconciler that reads it: a fleet-wide plan names every node.
    plan: Arc<Plan>,
    /// The configuration snapshots of `current` and `updated`, which their nodes may read.
    configs: [Option<String>; 2],
    /// No revision can run: the spec's references have not resolved yet.
    unresolved: bool,
}

impl MsvcEntry {
    /// What `node`, if placed, should hold of the microservice.
    fn prepared_for(&self, node: &str) -> &Arc<Prepared> {
        match &self.updating {
            Some(updating) if !updating.contains(node) => &self.current,
            _ => &self.updated,
        }
    }

    /// The configuration snapshot of the revision `node` should hold.
    fn config_for(&self, node: &str) -> Option<&str> {
        match &self.updating {
            Some(updating) if !updating.contains(node) => self.configs[0].as_deref(),
            _ => self.configs[1].as_deref(),
        }
    }

    /// The placed nodes that run `updated` under the plan and `updated_nodes`.
    fn split(&self) -> Option<BTreeSet<String>> {
        let k = self.updated_nodes?;
        let nodes = self.plan.nodes();
        if k >= nodes.len() {
            return None;
        }
        Some(
            rollout::order(&self.uid, nodes.iter().map(String::as_str))
                .into_iter()
                .take(k)
                .map(str::to_owned)
                .collect(),
        )
    }
}

/// The revisions `msvc`'s nodes run.
struct Revisions {
    current: Arc<Prepared>,
    updated: Arc<Prepared>,
    updated_nodes: Option<usize>,
    configs: [Option<String>; 2],
    unresolved: bool,
}

/// The revisions `msvc`'s nodes run, as prepared changes; `old` ones are kept while their version is the same.
///
/// A kept one must also name the same configuration snapshot: the spec's revision is
/// prepared without one while its references are unresolved (and placed nowhere).
fn revisions_of(msvc: &Microservice, old: Option<&MsvcEntry>) -> Revisions {
    let targets = rollout::targets(msvc);
    let configs = [targets.current.config.map(str::to_owned), targets.updated.config.map(str::to_owned)];
    let prepare = |rev: rollout::Rev<'_>, kept: Option<(&Arc<Prepared>, &Option<String>)>| {
        let assignment = rollout::assignment(msvc, rev);
        match kept {
            Some((p, config)) if p.version == assignment.version() && *config == assignment.config => p.clone(),
            _ => Arc::new(Prepared::new(&Change::Assignment(Box::new(assignment)))),
        }
    };
    let current = prepare(targets.current, old.map(|o| (&o.current, &o.configs[0])));
    // One Prepared when both are one revision, so that publishing compares pointers.
    let updated = if targets.updated.number == targets.current.number {
        current.clone()
    } else {
        prepare(targets.updated, old.map(|o| (&o.updated, &o.configs[1])))
    };
    Revisions { current, updated, updated_nodes: targets.updated_nodes, configs, unresolved: targets.unresolved }
}

#[derive(Default)]
struct NetworkEntry {
    /// Nodes whose EdgeNode names the network.
    members: BTreeSet<String>,
    prepared: Option<Arc<Prepared>>,
}

#[derive(Default)]
struct State {
    /// Generation of each network's cluster key that was rotated (absent: 0).
    key_generations: BTreeMap<String, u64>,
    listed: HashSet<Kind>,
    relisting: HashMap<Kind, HashSet<Key>>,
    meshes: HashMap<Key, MeshEntry>,
    /// Microservices by the mesh they name (which may not exist).
    by_mesh: HashMap<Key, BTreeSet<Key>>,
    microservices: HashMap<Key, MsvcEntry>,
    nodes: HashMap<String, NodeEntry>,
    networks: HashMap<String, NetworkEntry>,
    /// Nodes whose desired state must be published again.
    dirty_nodes: BTreeSet<String>,
    /// Networks whose membership must be built again.
    dirty_networks: BTreeSet<String>,
    placed_instances: usize,
}

/// Inputs of a Microservice's status: its plan and what the placed nodes report.
#[derive(Debug, Clone, PartialEq)]
pub struct MicroserviceInputs {
    /// Where it runs, or why it cannot.
    pub plan: Arc<Plan>,
    /// What the nodes it runs on report about it.
    pub aggregate: Aggregate,
    /// Its placed nodes in rendezvous order, for its rollout.
    pub nodes: Vec<NodeRollout>,
}

/// A placed node as a rollout sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRollout {
    /// The node.
    pub name: String,
    /// Whether its agent is connected.
    pub online: bool,
    /// Its latest report on the microservice.
    pub report: Option<InstanceReport>,
}

/// Inputs of an EdgeNode's status.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeInputs {
    /// Instances placed on the node, and how many it reports running and ready.
    pub counts: InstanceCounts,
    /// Its agent's session, while connected.
    pub session: Option<SessionInfo>,
    /// Its place in its cluster, from its latest report.
    pub cluster: Option<ClusterView>,
}

/// Inputs of a Mesh's status.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshInputs {
    /// Its members summed up by network cluster, or why its spec is invalid.
    pub members: Result<Summary, placement::InvalidSpec>,
    /// Microservices of its namespace that name it.
    pub microservices: i32,
}

/// Where a Kubernetes Event about an instance goes: its Microservice, related to its EdgeNode.
#[derive(Debug, Clone)]
pub struct EventTarget {
    /// The Microservice.
    pub microservice: ObjectReference,
    /// The EdgeNode the instance runs on.
    pub node: ObjectReference,
}

/// The fleet index. Share it as `Arc<Index>`.
pub struct Index {
    state: Mutex<State>,
    triggers: Senders,
    /// Derives every network's cluster key.
    secret: String,
    metrics: Arc<Metrics>,
    /// When the reconnect grace began: at the start, and when nodes came from another replica.
    grace_from: Mutex<Instant>,
    grace: Duration,
    synced: watch::Sender<bool>,
    memberships: Notify,
}

impl Index {
    /// An empty index deriving cluster keys from `secret`, giving agents `grace` to reconnect
    /// after a start; and the triggers it sends to the controllers.
    pub fn new(secret: String, grace: Duration, metrics: Arc<Metrics>) -> (Arc<Index>, Triggers) {
        let (microservices, msvc_rx) = unbounded();
        let (nodes_now, now_rx) = unbounded();
        let (nodes_later, later_rx) = unbounded();
        let (meshes, mesh_rx) = unbounded();
        let index = Index {
            state: Mutex::default(),
            triggers: Senders { microservices, nodes_now, nodes_later, meshes },
            secret,
            metrics,
            grace_from: Mutex::new(Instant::now()),
            grace,
            synced: watch::Sender::new(false),
            memberships: Notify::new(),
        };
        let triggers = Triggers { microservices: msvc_rx, nodes_now: now_rx, nodes_later: later_rx, meshes: mesh_rx };
        (Arc::new(index), triggers)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every operation leaves the state consistent before it could panic: keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether every kind is listed and every microservice placed.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits until every kind is listed and every microservice placed.
    pub async fn wait_synced(&self) {
        // An error means the index is gone, that is the controller is shutting down.
        let _ = self.synced.subscribe().wait_for(|s| *s).await;
    }

    /// Whether agents have had time to reconnect since this controller started or last
    /// took nodes over from another replica.
    pub fn grace_over(&self) -> bool {
        self.grace_left().is_zero()
    }

    /// Time left of the reconnect grace (zero once it is over).
    pub fn grace_left(&self) -> Duration {
        let from = *self.grace_from.lock().unwrap_or_else(PoisonError::into_inner);
        self.grace.saturating_sub(from.elapsed())
    }

    /// Starts the reconnect grace again: nodes of a replica that left come to this one, and
    /// their agents are reconnecting.
    pub fn restart_grace(&self) {
        *self.grace_from.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    /// Takes the generations of the networks' cluster keys: a network whose key was rotated
    /// gets its membership, with the new key, sent to its members again.
    pub fn set_key_generations(&self, generations: BTreeMap<String, u64>) {
        let mut s = self.lock();
        if s.key_generations == generations {
            return;
        }
        let changed: Vec<String> = generations
            .iter()
            .filter(|(n, g)| s.key_generations.get(*n) != Some(g))
            .map(|(n, _)| n.clone())
            .chain(s.key_generations.keys().filter(|n| !generations.contains_key(*n)).cloned())
            .collect();
        s.key_generations = generations;
        s.dirty_networks.extend(changed);
        drop(s);
        self.memberships.notify_one();
    }

    // ---- fed by the watches ----

    /// Takes one event of the Mesh watch.
    pub fn mesh_event(&self, event: &watcher::Event<Mesh>) {
        self.on_event(Kind::Mesh, event, |s, ix, m| s.apply_mesh(ix, m), |s, ix, k| s.delete_mesh(ix, k));
    }

    /// Takes one event of the EdgeNode watch.
    pub fn node_event(&self, event: &watcher::Event<EdgeNode>) {
        self.on_event(Kind::EdgeNode, event, |s, ix, n| s.apply_node(ix, n), |s, ix, k| s.delete_node(ix, &k.name));
    }

    /// Takes one event of the Microservice watch.
    pub fn microservice_event(&self, event: &watcher::Event<Microservice>) {
        self.on_event(
            Kind::Microservice,
            event,
            |s, ix, m| s.apply_microservice(ix, m),
            |s, ix, k| s.delete_microservice(ix, k),
        );
    }

    fn on_event<K: Resource>(
        &self,
        kind: Kind,
        event: &watcher::Event<K>,
        apply: impl Fn(&mut State, &Index, &K),
        delete: impl Fn(&mut State, &Index, &Key),
    ) {
        let mut s = self.lock();
        match event {
            watcher::Event::Apply(obj) => apply(&mut s, self, obj),
            watcher::Event::Delete(obj) => delete(&mut s, self, &Key::of(obj)),
            watcher::Event::Init => {
                s.relisting.insert(kind, HashSet::new());
            }
            watcher::Event::InitApply(obj) => {
                apply(&mut s, self, obj);
                s.relisting.entry(kind).or_default().insert(Key::of(obj));
            }
            watcher::Event::InitDone => {
                let listed = s.relisting.remove(&kind).unwrap_or_default();
                for gone in s.keys(kind).into_iter().filter(|k| !listed.contains(k)) {
                    delete(&mut s, self, &gone);
                }
                let first = s.listed.insert(kind) && s.listed.len() == 3;
                if first {
                    s.replan_all(self);
                    let (nodes, networks): (Vec<String>, Vec<String>) =
                        (s.nodes.keys().cloned().collect(), s.networks.keys().cloned().collect());
                    s.dirty_nodes.extend(nodes);
                    s.dirty_networks.extend(networks);
                    s.flush_memberships(self);
                }
            }
        }
        s.publish();
        let synced = s.listed.len() == 3;
        drop(s);
        if synced && !self.is_synced() {
            self.synced.send_replace(true);
        }
        self.memberships.notify_one();
    }

    // ---- fed by the sessions ----

    /// Records that session `id` of `node`'s agent is connected, and returns the
    /// channel of what the node should hold.
    pub fn connect(&self, node: &str, id: u64, info: SessionInfo) -> watch::Receiver<Arc<NodeDesired>> {
        let mut guard = self.lock();
        let s = &mut *guard;
        let entry = s.nodes.entry(node.to_owned()).or_insert_with(NodeEntry::new);
        entry.session = Some(Live { id, info });
        let receiver = entry.desired.subscribe();
        if let Some(network) = entry.network().map(str::to_owned) {
            s.dirty_networks.insert(network);
        }
        self.metrics.agents.set(s.nodes.values().filter(|n| n.session.is_some()).count() as i64);
        drop(guard);
        self.triggers.node_now(node);
        self.memberships.notify_one();
        receiver
    }

    /// Records that session `id` of `node`'s agent ended (a newer session of the node stays).
    pub fn disconnect(&self, node: &str, id: u64) {
        let mut guard = self.lock();
        let s = &mut *guard;
        let Some(entry) = s.nodes.get_mut(node) else { return };
        if entry.session.as_ref().is_none_or(|l| l.id != id) {
            return;
        }
        entry.session = None;
        if let Some(network) = entry.network().map(str::to_owned) {
            s.dirty_networks.insert(network);
        }
        if entry.is_unused() {
            s.nodes.remove(node);
        }
        self.metrics.agents.set(s.nodes.values().filter(|n| n.session.is_some()).count() as i64);
        drop(guard);
        self.triggers.node_now(node);
        self.memberships.notify_one();
    }

    /// Records that `node`'s agent was heard from just now.
    pub fn heard(&self, node: &str, id: u64) {
        let mut s = self.lock();
        if let Some(live) = s.nodes.get_mut(node).and_then(|e| e.session.as_mut()).filter(|l| l.id == id) {
            live.info.last_seen = k8s_openapi::jiff::Timestamp::now();
        }
    }

    /// Whether `node` has an EdgeNode the index knows.
    pub fn knows(&self, node: &str) -> bool {
        self.lock().nodes.get(node).is_some_and(|e| e.view.is_some())
    }

    /// The identity record of `node`'s EdgeNode, if the index knows it.
    pub fn identity(&self, node: &str) -> Option<NodeIdentity> {
        self.lock().nodes.get(node).and_then(|e| e.view.as_ref()).map(|v| v.identity.clone())
    }

    /// What the cloud's own records say of `node` as a reporter: its EdgeNode's network (while
    /// it is active), its place in its cluster as last reported, and whether it is connected.
    pub fn reporter(&self, node: &str) -> Option<crate::view::Reporter> {
        let s = self.lock();
        let e = s.nodes.get(node)?;
        let network = e.network()?.to_owned();
        let cluster = e.report.as_ref().and_then(|r| r.cluster.as_ref());
        Some(crate::view::Reporter {
            network,
            supernode: cluster.is_some_and(|c| c.role == NodeRole::Supernode),
            follows: cluster.and_then(|c| c.supernode.clone()),
            connected: e.session.is_some(),
        })
    }

    /// Takes `node`'s status report: only instances placed on the node, or held by its
    /// own session (`held`), count. Returns false for a snapshot no newer than the one held.
    pub fn take_status(&self, node: &str, mut report: StatusReport, held: Option<&BTreeMap<String, String>>) -> bool {
        let mut s = self.lock();
        let s = &mut *s;
        let Some(entry) = s.nodes.get_mut(node) else { return false };
        if entry.report.as_ref().is_some_and(|old| old.taken_ms >= report.taken_ms) {
            return false;
        }
        // What is placed on the node is what it was last published to hold.
        let placed = entry.desired.borrow().clone();
        report.instances.retain(|i| {
            placed.resources.contains_key(i.resource.as_str()) || held.is_some_and(|h| h.contains_key(&i.resource))
        });
        let old = entry.report.take().unwrap_or_default();
        let recount = counts(&old) != counts(&report);
        let role_changed = old.cluster != report.cluster;
        for resource in changed_instances(&old.instances, &report.instances) {
            if let Some((namespace, name)) = ResourceRef::microservice(resource) {
                let key = Key::new(namespace, name);
                if s.microservices.contains_key(&key) {
                    self.triggers.microservice(&key);
                }
            }
        }
        entry.report = Some(report);
        // An election shows at once; counts that a rollout moves and moves back, later.
        if role_changed {
            self.triggers.node_now(node);
        } else if recount {
            self.triggers.node_later(node);
        }
        true
    }

    /// Records that the event with outbox `seq` of `node` was taken; false when it was
    /// already (it came again, through another path or after a supernode failover).
    pub fn first_event(&self, node: &str, seq: i64) -> bool {
        self.lock().nodes.get_mut(node).is_none_or(|e| e.events.insert(seq))
    }

    /// Where an event about instance `resource` on `node` goes, if both exist.
    pub fn event_target(&self, node: &str, resource: &str) -> Option<EventTarget> {
        let (namespace, name) = ResourceRef::microservice(resource)?;
        let s = self.lock();
        let key = Key::new(namespace, name);
        let msvc = s.microservices.get(&key)?;
        // A node posts events only for microservices placed on it.
        s.nodes.get(node).filter(|e| e.view.is_some() && e.assigned.contains(&key))?;
        let microservice = ObjectReference {
            api_version: Some(Microservice::api_version(&()).into_owned()),
            kind: Some(Microservice::kind(&()).into_owned()),
            namespace: Some(namespace.to_owned()),
            name: Some(name.to_owned()),
            uid: Some(msvc.uid.clone()),
            ..ObjectReference::default()
        };
        let node = ObjectReference {
            api_version: Some(EdgeNode::api_version(&()).into_owned()),
            kind: Some(EdgeNode::kind(&()).into_owned()),
            name: Some(node.to_owned()),
            ..ObjectReference::default()
        };
        Some(EventTarget { microservice, node })
    }

    /// The assignment `resource` as `node` should hold it, if it is placed there.
    pub fn assignment(&self, node: &str, resource: &str) -> Option<Arc<Prepared>> {
        let (namespace, name) = ResourceRef::microservice(resource)?;
        let key = Key::new(namespace, name);
        let s = self.lock();
        if !s.nodes.get(node)?.assigned.contains(&key) {
            return None;
        }
        s.microservices.get(&key).filter(|m| !m.deleting).map(|m| m.prepared_for(node).clone())
    }

    /// Whether `node` holds an assignment in `namespace` whose revision runs configuration
    /// snapshot `snapshot`: the only nodes the cloud hands a snapshot to.
    pub fn may_read_config(&self, node: &str, namespace: &str, snapshot: &str) -> bool {
        let s = self.lock();
        let Some(entry) = s.nodes.get(node) else { return false };
        entry
            .assigned
            .iter()
            .filter(|k| k.namespace == namespace)
            .any(|k| s.microservices.get(k).is_some_and(|m| !m.deleting && m.config_for(node) == Some(snapshot)))
    }

    /// The nodes of `node`'s account within `scope`, for its discovery query.
    pub fn discover_nodes(&self, node: &str, scope: Scope) -> Result<Vec<NodeInfo>, ErrorContent> {
        let s = self.lock();
        let me = s.view(node).ok_or_else(|| no_edgenode(node))?;
        let all = s.nodes.values().filter_map(|e| Some((e.view.as_ref()?, &e.status, e.session.is_some())));
        Ok(discovery::nodes(scope, me, all))
    }

    /// The endpoints of Microservice `namespace/name` for `node`, which must have a
    /// microservice of that namespace placed on it.
    pub fn discover_endpoints(&self, node: &str, namespace: &str, name: &str) -> Result<Vec<Endpoint>, ErrorContent> {
        let s = self.lock();
        // What is placed on the node, never what it says it holds.
        let placed_here: Vec<String> =
            s.nodes.get(node).map(|e| e.assigned.iter().map(Key::resource).collect()).unwrap_or_default();
        if !discovery::may_discover(namespace, placed_here.iter().map(String::as_str)) {
            let message = format!("node {node} runs no microservice of namespace {namespace}");
            return Err(ErrorContent::new(ErrorCode::Forbidden, message));
        }
        let key = Key::new(namespace, name);
        let msvc = s.microservices.get(&key).ok_or_else(|| {
            ErrorContent::new(ErrorCode::NotFound, format!("microservice {namespace}/{name} does not exist"))
        })?;
        let me = s.view(node).ok_or_else(|| no_edgenode(node))?;
        let resource = key.resource();
        let ports: Vec<i32> = msvc.spec.ports.iter().map(|p| p.port).collect();
        let placed = msvc.plan.nodes().iter().filter_map(|n| {
            let e = s.nodes.get(n)?;
            let ready =
                e.report.as_ref().is_some_and(|r| r.instances.iter().any(|i| i.resource == resource && i.ready));
            Some((e.view.as_ref()?, &e.status, ready))
        });
        Ok(discovery::endpoints(me, placed, &ports))
    }

    // ---- read by the reconcilers ----

    /// What a Microservice's status is made of, once it is indexed.
    pub fn microservice(&self, key: &Key) -> Option<MicroserviceInputs> {
        let s = self.lock();
        let m = s.microservices.get(key)?;
        let resource = &*m.updated.resource;
        let report = |n: &str| {
            let report = s.nodes.get(n)?.report.as_ref()?;
            report.instances.iter().find(|i| i.resource == resource)
        };
        let reports = m.plan.nodes().iter().filter_map(|n| Some((n.as_str(), report(n)?)));
        let aggregate = aggregate(&m.updated.version, reports);
        let nodes = rollout::order(&m.uid, m.plan.nodes().iter().map(String::as_str))
            .into_iter()
            .map(|n| NodeRollout {
                name: n.to_owned(),
                online: s.nodes.get(n).is_some_and(|e| e.session.is_some()),
                report: report(n).cloned(),
            })
            .collect();
        Some(MicroserviceInputs { plan: m.plan.clone(), aggregate, nodes })
    }

    /// Asks the reconcilers to look again at every microservice whose rollout progresses:
    /// its waves wait on time (`minReadySeconds`, `progressDeadlineSeconds`) as well as on reports.
    pub fn tick_rollouts(&self) {
        let s = self.lock();
        for (key, _) in s.microservices.iter().filter(|(_, m)| m.rolling && !m.deleting) {
            self.triggers.microservice(key);
        }
    }

    /// The latest status report of every node `keep` accepts, by node.
    pub fn reports(&self, keep: impl Fn(&str) -> bool) -> BTreeMap<String, StatusReport> {
        let s = self.lock();
        let held = s.nodes.iter().filter(|(name, _)| keep(name));
        held.filter_map(|(name, e)| Some((name.clone(), e.report.clone()?))).collect()
    }

    /// The nodes Microservice `key` is placed on.
    pub fn placed(&self, key: &Key) -> BTreeSet<String> {
        self.lock().microservices.get(key).map(|m| m.plan.nodes().clone()).unwrap_or_default()
    }

    /// What an EdgeNode's status is made of.
    pub fn node(&self, name: &str) -> NodeInputs {
        let s = self.lock();
        let Some(e) = s.nodes.get(name) else { return NodeInputs::default() };
        let (running, ready) = e.report.as_ref().map(counts).unwrap_or_default();
        NodeInputs {
            counts: InstanceCounts { desired: e.assigned.len() as i32, running, ready },
            session: e.session.as_ref().map(|l| l.info.clone()),
            cluster: e.report.as_ref().and_then(|r| r.cluster.clone()),
        }
    }

    /// What a Mesh's status is made of, once it is indexed.
    pub fn mesh(&self, key: &Key) -> Option<MeshInputs> {
        let s = self.lock();
        let mesh = s.meshes.get(key)?;
        let members = match &mesh.rule {
            Ok(_) => Ok(summarize(mesh.members.iter().filter_map(|n| {
                let e = s.nodes.get(n)?;
                Some(MemberStatus { name: n, network: &e.view.as_ref()?.network, status: &e.status })
            }))),
            Err(e) => Err(e.clone()),
        };
        let microservices = s.by_mesh.get(key).map_or(0, BTreeSet::len) as i32;
        Some(MeshInputs { members, microservices })
    }

    // ---- memberships, coalesced ----

    /// Builds the memberships of networks that changed, at most every `interval`, until
    /// the index is dropped: a burst of connects sends each network's members one update.
    pub async fn run_memberships(self: Arc<Index>, interval: Duration) {
        loop {
            self.memberships.notified().await;
            tokio::time::sleep(interval).await;
            let mut s = self.lock();
            if s.listed.len() == 3 {
                s.flush_memberships(&self);
                s.publish();
            }
        }
    }
}

fn no_edgenode(node: &str) -> ErrorContent {
    ErrorContent::new(ErrorCode::NotFound, format!("node {node} has no EdgeNode yet"))
}

/// Instances a report says are running and ready.
fn counts(report: &StatusReport) -> (i32, i32) {
    let running = report.instances.iter().filter(|i| i.phase.is_running()).count() as i32;
    let ready = report.instances.iter().filter(|i| i.ready).count() as i32;
    (running, ready)
}

/// Resources whose instance differs between two reports (or is in only one). A node runs a
/// handful of instances: comparing each with each costs less than indexing them.
fn changed_instances<'a>(old: &'a [InstanceReport], new: &'a [InstanceReport]) -> Vec<&'a str> {
    let find = |list: &'a [InstanceReport], resource: &str| list.iter().find(|i| i.resource == resource);
    let mut changed: Vec<&str> =
        new.iter().filter(|i| find(old, &i.resource) != Some(i)).map(|i| i.resource.as_str()).collect();
    changed.extend(old.iter().filter(|i| find(new, &i.resource).is_none()).map(|i| i.resource.as_str()));
    changed
}

impl State {
    fn ready(&self) -> bool {
        self.listed.len() == 3
    }

    fn keys(&self, kind: Kind) -> Vec<Key> {
        match kind {
            Kind::Mesh => self.meshes.keys().cloned().collect(),
            Kind::Microservice => self.microservices.keys().cloned().collect(),
            Kind::EdgeNode => {
                self.nodes.iter().filter(|(_, e)| e.view.is_some()).map(|(n, _)| Key::new("", n)).collect()
            }
        }
    }

    fn view(&self, node: &str) -> Option<&NodeView> {
        self.nodes.get(node)?.view.as_ref()
    }

    // ---- nodes ----

    fn apply_node(&mut self, ix: &Index, node: &EdgeNode) {
        let name = node.name_any();
        let (view, status) = (NodeView::from(node), NodeStatusView::from(node));
        let entry = self.nodes.entry(name.clone()).or_insert_with(NodeEntry::new);
        entry.seen = true;
        let old_view = entry.view.replace(view.clone());
        let old_status = std::mem::replace(&mut entry.status, status.clone());
        if old_view.as_ref() != Some(&view) {
            self.node_view_changed(ix, &name, old_view.as_ref(), Some(&view));
        }
        if old_status != status {
            self.node_status_changed(ix, &view, &old_status, &status);
        }
    }

    fn delete_node(&mut self, ix: &Index, name: &str) {
        let Some(entry) = self.nodes.get_mut(name) else { return };
        let Some(old) = entry.view.take() else { return };
        entry.status = NodeStatusView::default();
        self.node_view_changed(ix, name, Some(&old), None);
        if self.nodes.get(name).is_some_and(NodeEntry::is_unused) {
            self.nodes.remove(name);
        }
    }

    /// A node's EdgeNode appeared, changed or went: its network and meshes follow, and
    /// the microservices of the meshes that admitted or admit it are placed again.
    fn node_view_changed(&mut self, ix: &Index, name: &str, old: Option<&NodeView>, new: Option<&NodeView>) {
        let network = |v: Option<&NodeView>| v.filter(|v| v.active()).map(|v| v.network.clone());
        let (was, is) = (network(old), network(new));
        if was != is {
            if let Some(net) = &was {
                if let Some(n) = self.networks.get_mut(net) {
                    n.members.remove(name);
                }
                self.dirty_networks.insert(net.clone());
            }
            if let Some(net) = &is {
                self.networks.entry(net.clone()).or_default().members.insert(name.to_owned());
                self.dirty_networks.insert(net.clone());
            }
        } else if let Some(net) = is {
            // What the membership says of the node from its EdgeNode (its address and capacity
            // come from elsewhere): account, location, eligibility and enrolled key.
            let member = |v: Option<&NodeView>| v.map(|v| membership::member(v, None, 0));
            if member(old) != member(new) {
                self.dirty_networks.insert(net);
            }
        }
        self.dirty_nodes.insert(name.to_owned());
        let mut touched = Vec::new();
        for (key, mesh) in &mut self.meshes {
            let Ok(rule) = &mesh.rule else { continue };
            let before = old.is_some_and(|v| rule.admits(v));
            let after = new.is_some_and(|v| rule.admits(v));
            if before != after {
                if after {
                    mesh.members.insert(name.to_owned());
                } else {
                    mesh.members.remove(name);
                }
                ix.triggers.mesh(key);
            }
            if before || after {
                touched.push(key.clone());
            }
        }
        if self.ready() {
            for mesh in touched {
                for msvc in self.by_mesh.get(&mesh).cloned().unwrap_or_default() {
                    self.replan(ix, &msvc);
                }
            }
        }
    }

    fn node_status_changed(&mut self, ix: &Index, view: &NodeView, old: &NodeStatusView, new: &NodeStatusView) {
        if (old.peer_address != new.peer_address || old.capacity != new.capacity) && view.active() {
            self.dirty_networks.insert(view.network.clone());
        }
        let shown = |s: &NodeStatusView| (s.ready, s.role, s.supernode.clone());
        if shown(old) != shown(new) {
            for (key, mesh) in &self.meshes {
                if mesh.members.contains(&view.name) {
                    ix.triggers.mesh(key);
                }
            }
        }
    }

    // ---- meshes ----

    fn apply_mesh(&mut self, ix: &Index, mesh: &Mesh) {
        let key = Key::of(mesh);
        if self.meshes.get(&key).is_some_and(|m| m.spec == mesh.spec) {
            return;
        }
        let rule = MeshRule::new(&mesh.spec);
        let members = match &rule {
            Ok(rule) => self
                .nodes
                .iter()
                .filter(|(_, e)| e.view.as_ref().is_some_and(|v| rule.admits(v)))
                .map(|(n, _)| n.clone())
                .collect(),
            Err(_) => BTreeSet::new(),
        };
        self.meshes.insert(key.clone(), MeshEntry { spec: mesh.spec.clone(), rule, members });
        self.replan_mesh(ix, &key);
    }

    fn delete_mesh(&mut self, ix: &Index, key: &Key) {
        if self.meshes.remove(key).is_some() {
            self.replan_mesh(ix, key);
        }
    }

    fn replan_mesh(&mut self, ix: &Index, key: &Key) {
        if self.ready() {
            for msvc in self.by_mesh.get(key).cloned().unwrap_or_default() {
                self.replan(ix, &msvc);
            }
        }
    }

    // ---- microservices ----

    fn apply_microservice(&mut self, ix: &Index, msvc: &Microservice) {
        let key = Key::of(msvc);
        let deleting = msvc.metadata.deletion_timestamp.is_some();
        let mesh = Key::new(&key.namespace, &msvc.spec.mesh);
        let entry = match self.microservices.get_mut(&key) {
            Some(e) => e,
            None => {
                self.by_mesh.entry(mesh.clone()).or_default().insert(key.clone());
                ix.triggers.mesh(&mesh);
                let r = revisions_of(msvc, None);
                let entry = MsvcEntry {
                    uid: msvc.uid().unwrap_or_default(),
                    deleting,
                    spec: msvc.spec.clone(),
                    current: r.current,
                    updated: r.updated,
                    updated_nodes: r.updated_nodes,
                    rolling: rollout::progressing(msvc),
                    updating: None,
                    plan: Arc::default(),
                    configs: r.configs,
                    unresolved: r.unresolved,
                };
                self.microservices.insert(key.clone(), entry);
                if self.ready() {
                    self.replan(ix, &key);
                }
                return;
            }
        };
        let r = revisions_of(msvc, Some(entry));
        let replan = entry.spec != msvc.spec || entry.deleting != deleting || entry.unresolved != r.unresolved;
        if entry.spec.mesh != msvc.spec.mesh {
            let old = Key::new(&key.namespace, &entry.spec.mesh);
            if let Some(set) = self.by_mesh.get_mut(&old) {
                set.remove(&key);
            }
            ix.triggers.mesh(&old);
            self.by_mesh.entry(mesh.clone()).or_default().insert(key.clone());
            ix.triggers.mesh(&mesh);
        }
        let moved = !Arc::ptr_eq(&r.current, &entry.current)
            || !Arc::ptr_eq(&r.updated, &entry.updated)
            || r.updated_nodes != entry.updated_nodes;
        entry.configs = r.configs;
        entry.unresolved = r.unresolved;
        if moved {
            entry.current = r.current;
            entry.updated = r.updated;
            entry.updated_nodes = r.updated_nodes;
            entry.uid = msvc.uid().unwrap_or_default();
            entry.updating = entry.split();
            self.dirty_nodes.extend(entry.plan.nodes().iter().cloned());
        }
        entry.spec = msvc.spec.clone();
        entry.deleting = deleting;
        entry.rolling = rollout::progressing(msvc);
        if replan && self.ready() {
            self.replan(ix, &key);
        }
    }

    fn delete_microservice(&mut self, ix: &Index, key: &Key) {
        let Some(old) = self.microservices.remove(key) else { return };
        let mesh = Key::new(&key.namespace, &old.spec.mesh);
        if let Some(set) = self.by_mesh.get_mut(&mesh) {
            set.remove(key);
        }
        ix.triggers.mesh(&mesh);
        self.assign(ix, key, old.plan.nodes(), &BTreeSet::new());
    }

    // ---- placement ----

    fn replan_all(&mut self, ix: &Index) {
        let keys: Vec<Key> = self.microservices.keys().cloned().collect();
        for key in keys {
            self.replan(ix, &key);
        }
    }

    /// Places Microservice `key` again from its mesh's members; what moved is published
    /// and the controllers hear of what changed.
    fn replan(&mut self, ix: &Index, key: &Key) {
        let Some(m) = self.microservices.get(key) else { return };
        let plan = if m.deleting {
            Plan::default()
        } else if m.unresolved && placement::validate_microservice(&m.spec).is_ok() {
            Plan::Blocked {
                reason: CONFIG_MISSING,
                message: "waiting for the ConfigMap and Secret keys it references to resolve".to_owned(),
            }
        } else {
            let mesh = self.meshes.get(&Key::new(&key.namespace, &m.spec.mesh));
            let members: Vec<&NodeView> = mesh
                .map(|mesh| mesh.members.iter().filter_map(|n| self.nodes.get(n)?.view.as_ref()).collect())
                .unwrap_or_default();
            let state = match mesh.map(|mesh| &mesh.rule) {
                None => MeshState::Missing,
                Some(Err(e)) => MeshState::Invalid(&m.spec.mesh, e),
                Some(Ok(_)) => MeshState::Members(&members),
            };
            placement::plan(&key.namespace, &key.name, &m.spec, state, m.plan.nodes())
        };
        if plan == *m.plan {
            return;
        }
        let old = m.plan.nodes().clone();
        self.assign(ix, key, &old, plan.nodes());
        if let Some(m) = self.microservices.get_mut(key) {
            m.plan = Arc::new(plan);
            let updating = m.split();
            if updating != m.updating {
                // Nodes joining or leaving move others across the rollout's line.
                m.updating = updating;
                self.dirty_nodes.extend(m.plan.nodes().iter().cloned());
            }
        }
        ix.triggers.microservice(key);
    }

    /// Moves microservice `key` from the nodes `old` to the nodes `new`.
    fn assign(&mut self, ix: &Index, key: &Key, old: &BTreeSet<String>, new: &BTreeSet<String>) {
        for gone in old.difference(new) {
            if let Some(e) = self.nodes.get_mut(gone) {
                e.assigned.remove(key);
            }
            self.dirty_nodes.insert(gone.clone());
            ix.triggers.node_now(gone);
        }
        for added in new.difference(old) {
            if let Some(e) = self.nodes.get_mut(added) {
                e.assigned.insert(key.clone());
            }
            self.dirty_nodes.insert(added.clone());
            ix.triggers.node_now(added);
        }
        self.placed_instances = self.placed_instances + new.len() - old.len().min(self.placed_instances + new.len());
        ix.metrics.placed_instances.set(self.placed_instances as i64);
    }

    // ---- memberships and publishing ----

    fn flush_memberships(&mut self, ix: &Index) {
        for network in std::mem::take(&mut self.dirty_networks) {
            let Some(net) = self.networks.get(&network) else { continue };
            let members = net
                .members
                .iter()
                .filter_map(|n| {
                    let e = self.nodes.get(n)?;
                    Some(membership::member(e.view.as_ref()?, e.peer_address(), e.capacity()))
                })
                .collect();
            let generation = self.key_generations.get(&network).copied().unwrap_or(0);
            let built = membership::build(&network, &ix.secret, generation, members);
            if built.members.is_empty() {
                self.networks.remove(&network);
                continue;
            }
            let version = built.version();
            let net = self.networks.entry(network.clone()).or_default();
            if net.prepared.as_ref().is_some_and(|p| p.version == version) {
                continue;
            }
            net.prepared = Some(Arc::new(Prepared::new(&Change::Membership(built))));
            self.dirty_nodes.extend(net.members.iter().cloned());
        }
    }

    /// Publishes what every node marked dirty should hold now.
    fn publish(&mut self) {
        if !self.ready() {
            return;
        }
        for name in std::mem::take(&mut self.dirty_nodes) {
            let Some(e) = self.nodes.get(&name) else { continue };
            let mut resources: BTreeMap<Arc<str>, Arc<Prepared>> = e
                .assigned
                .iter()
                .filter_map(|k| self.microservices.get(k))
                .filter(|m| !m.deleting)
                .map(|m| m.prepared_for(&name))
                .map(|p| (p.resource.clone(), p.clone()))
                .collect();
            let membership = e.network().and_then(|n| self.networks.get(n)).and_then(|n| n.prepared.clone());
            if let Some(m) = membership {
                resources.insert(m.resource.clone(), m);
            }
            let standing = match &e.view {
                Some(v) => Standing::Present(v.identity.clone()),
                None if e.seen => Standing::Deleted,
                None => Standing::Unseen,
            };
            // A node without an EdgeNode is sent nothing: it is being enrolled.
            let desired = NodeDesired { complete: e.view.is_some(), resources, standing };
            let same = {
                let old = e.desired.borrow();
                old.complete == desired.complete
                    && old.standing == desired.standing
                    && old.resources.len() == desired.resources.len()
                    && old.resources.values().zip(desired.resources.values()).all(|(a, b)| Arc::ptr_eq(a, b))
            };
            if !same {
                e.desired.send_replace(Arc::new(desired));
            }
        }
    }
}

#[cfg(test)]
mod tests;
