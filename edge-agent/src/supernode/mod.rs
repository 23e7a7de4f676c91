//! supernode: the node's part in its network cluster.
//!
//! Every node heartbeats the members of its network (the membership the cloud
//! sends, kept in SQLite, and optionally peers found by UDP multicast) and elects
//! the supernode from the peers it hears with a deterministic function
//! ([`election::elect`]), so no cloud is needed to agree. Members hand their
//! outbox reports to the supernode, which sends the cluster's reports upstream in
//! one batch per interval (changes coalesced); a report leaves a member's outbox
//! only when the cloud acknowledged it, so a supernode that dies loses nothing:
//! the members send again to the next one, or directly to the cloud.

pub mod election;
mod peer;
pub mod relay;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use supermesh_protocol::peer::{Heartbeat, Registry, RegistryEntry, Score, PEER_VERSION};
use supermesh_protocol::NodeRole;
use supermesh_protocol::{Body, ClusterView, Membership, Message, StatusReport};
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::info;

use crate::config::EdgeConfig;
use crate::metamanager::MetaHandle;

pub use peer::serve;

/// A peer is gone when it has not been heard for this many heartbeat intervals.
pub const SILENT_HEARTBEATS: f64 = 2.5;
/// Heartbeat intervals a node listens before its first election.
const WARM_UP_HEARTBEATS: f64 = 1.5;
/// Reports queued at a supernode, at most.
const QUEUE_LIMIT: usize = 20_000;
/// How long the cluster key before a rotation still counts: members get the new one at
/// slightly different times, and none of them should look gone meanwhile.
const KEY_OVERLAP: Duration = Duration::from_secs(120);

/// How this node's outbox reports reach the cloud right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Over this node's own stream (no cluster, no supernode, or it is unreachable).
    Direct,
    /// Through the supernode at `address`.
    Relay {
        /// The supernode.
        supernode: String,
        /// `host:port` of its peer service.
        address: String,
        /// When its agent started: a restarted supernode forgot what it was handed.
        incarnation: i64,
    },
    /// This node is the supernode: its reports and its members' go upstream in batches.
    Upstream,
}

/// A peer heard recently.
#[derive(Debug, Clone)]
struct Peer {
    heartbeat: Heartbeat,
    address: String,
    heard: Instant,
}

struct State {
    membership: Option<Membership>,
    /// The cluster key before the last rotation, accepted until the instant given: members
    /// get the new key at slightly different times.
    previous_key: Option<(String, Instant)>,
    /// When the membership first arrived: the first election waits to hear the peers.
    listening_since: Option<Instant>,
    peers: BTreeMap<String, Peer>,
    supernode: Option<String>,
    heartbeats: u64,
    elected_at: u64,
    cloud_connected: bool,
    relay_failed_until: Option<Instant>,
    queue: relay::Queue,
    /// The latest status report of each node that reported through this one (its own included).
    statuses: HashMap<String, StatusReport>,
}

/// The node's cluster state, shared by the heartbeat, relay and HTTP tasks, edgehub,
/// MetaSync and the local API.
pub struct Cluster {
    config: Arc<EdgeConfig>,
    meta: MetaHandle,
    score: Score,
    state: Mutex<State>,
    /// Told when the route or the elected supernode changes.
    route_changed: Notify,
    /// Told when this node's view (role, supernode) changes, so MetaSync reports it.
    pub view_changed: Arc<Notify>,
    /// Told when the outbox got a report.
    outbox: Notify,
    /// Told when an urgent report was queued at this supernode.
    urgent: Notify,
    to_cloud: mpsc::Sender<Message>,
    answers: Mutex<HashMap<String, oneshot::Sender<Body>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Cluster {
    /// The cluster state of the node `config` describes; `to_cloud` is edgehub's outbound queue.
    pub fn new(config: Arc<EdgeConfig>, meta: MetaHandle, to_cloud: mpsc::Sender<Message>) -> Arc<Cluster> {
        let score = Score {
            eligible: config.node.supernode_eligible,
            stationary: config.node.stationary,
            capacity: election::local_capacity(),
            started_ms: crate::edged::runtime::now_ms(),
        };
        Arc::new(Cluster {
            config,
            meta,
            score,
            state: Mutex::new(State {
                membership: None,
                previous_key: None,
                listening_since: None,
                peers: BTreeMap::new(),
                supernode: None,
                heartbeats: 0,
                elected_at: 0,
                cloud_connected: false,
                relay_failed_until: None,
                queue: relay::Queue::new(QUEUE_LIMIT),
                statuses: HashMap::new(),
            }),
            route_changed: Notify::new(),
            view_changed: Arc::new(Notify::new()),
            outbox: Notify::new(),
            urgent: Notify::new(),
            to_cloud,
            answers: Mutex::default(),
        })
    }

    fn name(&self) -> &str {
        &self.config.node.name
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Takes the membership the cloud sent (or SQLite held at start).
    pub fn set_membership(&self, membership: Membership) {
        let mut state = self.state();
        if state.membership.as_ref() != Some(&membership) {
            info!(network = %membership.network, members = membership.members.len(), "cluster membership");
            if let Some(old) = state.membership.as_ref().filter(|old| old.key != membership.key) {
                info!(network = %membership.network, "the cluster key was rotated; the old one counts two more minutes");
                state.previous_key = Some((old.key.clone(), Instant::now() + KEY_OVERLAP));
            }
            state.membership = Some(membership);
            state.listening_since.get_or_insert_with(Instant::now);
        }
    }

    /// Records whether this node's stream to the cloud is up.
    pub fn set_cloud_connected(&self, connected: bool) {
        self.state().cloud_connected = connected;
        self.route_changed.notify_waiters();
        self.outbox.notify_waiters();
    }

    /// Tells the relay tasks that the outbox got a report.
    pub fn outbox_changed(&self) {
        self.outbox.notify_waiters();
    }

    /// This node's latest status report, for the registry.
    pub fn own_status(&self, report: &StatusReport) {
        self.state().statuses.insert(self.name().to_owned(), report.clone());
    }

    /// The node's role and supernode, once it is in a cluster with an elected supernode.
    pub fn view(&self) -> Option<ClusterView> {
        let state = self.state();
        state.membership.as_ref()?;
        let supernode = state.supernode.clone()?;
        let role = if supernode == self.name() { NodeRole::Supernode } else { NodeRole::Member };
        Some(ClusterView { role, supernode: Some(supernode) })
    }

    /// How reports reach the cloud right now.
    pub fn route(&self) -> Route {
        let state = self.state();
        let Some(supernode) = state.supernode.clone() else { return Route::Direct };
        if supernode == self.name() {
            return Route::Upstream;
        }
        let Some(peer) = state.peers.get(&supernode) else { return Route::Direct };
        if state.relay_failed_until.is_some_and(|t| Instant::now() < t) {
            return Route::Direct;
        }
        // A connected member does not wait for a supernode that lost the cloud.
        if state.cloud_connected && !peer.heartbeat.cloud_connected {
            return Route::Direct;
        }
        Route::Relay { supernode, address: peer.address.clone(), incarnation: peer.heartbeat.score.started_ms }
    }

    /// The supernode could not take reports: report directly for a few heartbeats.
    fn relay_failed(&self) {
        self.state().relay_failed_until = Some(Instant::now() + 3 * self.config.heartbeat());
        self.route_changed.notify_waiters();
    }

    /// Whether edgehub should send outbox reports over the node's own stream.
    pub fn reports_directly(&self) -> bool {
        self.route() == Route::Direct
    }

    /// An answer of the cloud to a batch this node sent (parent id `b-…`).
    pub fn batch_answered(&self, msg: Message, body: Body) {
        if let Some(waiter) = msg.parent_id.as_ref().and_then(|p| lock(&self.answers).remove(p)) {
            let _ = waiter.send(body);
        }
    }

    /// The cluster key, once the cloud sent the membership: what this node signs with.
    fn key(&self) -> Option<String> {
        self.state().membership.as_ref().map(|m| m.key.clone())
    }

    /// The keys a peer's message may be signed with: the cluster key, and the one before the
    /// last rotation for [`KEY_OVERLAP`] after it.
    fn keys(&self) -> Vec<String> {
        let state = self.state();
        let current = state.membership.as_ref().map(|m| m.key.clone());
        let previous = state.previous_key.as_ref().filter(|(_, until)| Instant::now() < *until).map(|(k, _)| k.clone());
        current.into_iter().chain(previous).collect()
    }

    /// `host:port` peers reach this node at, or `:port` when the cloud has not told it yet.
    fn own_address(&self, state: &State) -> String {
        if let Some(advertise) = &self.config.supernode.advertise {
            return advertise.clone();
        }
        state
            .membership
            .as_ref()
            .and_then(|m| m.members.iter().find(|m| m.name == self.name()))
            .and_then(|m| m.address.clone())
            .unwrap_or_else(|| format!(":{}", self.config.supernode.listen.port()))
    }

    /// Forgets silent peers and elects the supernode among the live ones (itself included).
    /// Run several times per heartbeat, so a supernode that left is replaced within
    /// [`SILENT_HEARTBEATS`] heartbeats plus a fraction of one.
    fn elect(&self) {
        let silent = self.config.heartbeat().mul_f64(SILENT_HEARTBEATS);
        let mut state = self.state();
        // Before electing, listen long enough to hear every live peer once; else each
        // node would first elect itself and the cluster would start with a flap.
        if state.listening_since.is_none_or(|t| t.elapsed() < self.config.heartbeat().mul_f64(WARM_UP_HEARTBEATS)) {
            return;
        }
        state.peers.retain(|_, p| p.heard.elapsed() <= silent);
        let me = self.name().to_owned();
        let mut live = vec![election::Candidate { name: &me, score: self.score }];
        live.extend(
            state.peers.values().map(|p| election::Candidate { name: &p.heartbeat.node, score: p.heartbeat.score }),
        );
        let elected = election::elect(&live).map(str::to_owned);
        drop(live);
        if elected != state.supernode {
            info!(supernode = ?elected, previous = ?state.supernode, heartbeat = state.heartbeats, "supernode elected");
            state.supernode = elected;
            state.elected_at = state.heartbeats;
            state.relay_failed_until = None;
            if state.supernode.as_deref() != Some(&me) {
                state.queue.clear();
            }
            self.route_changed.notify_waiters();
            self.view_changed.notify_one();
            self.outbox.notify_waiters();
        }
    }

    /// One heartbeat: the heartbeat to send and the addresses to send it to (nothing
    /// without a membership).
    fn beat(&self) -> Option<(Heartbeat, Vec<String>)> {
        let mut state = self.state();
        let membership = state.membership.clone()?;
        state.heartbeats += 1;
        let me = self.name().to_owned();
        let heartbeat = Heartbeat {
            version: PEER_VERSION,
            node: me.clone(),
            network: membership.network.clone(),
            account: self.config.node.account.clone(),
            address: self.own_address(&state),
            location: self.config.node.location,
            score: self.score,
            cloud_connected: state.cloud_connected,
            supernode: state.supernode.clone(),
            seq: state.heartbeats,
        };
        let mut targets: Vec<String> = membership
            .members
            .iter()
            .filter(|m| m.name != me)
            .filter_map(|m| m.address.clone())
            .chain(state.peers.values().map(|p| p.address.clone()))
            .filter(|a| !a.starts_with(':'))
            .collect();
        targets.sort();
        targets.dedup();
        Some((heartbeat, targets))
    }

    /// A heartbeat arrived from `from`; `listed_only` drops peers the membership does not list.
    fn heard(&self, heartbeat: Heartbeat, from: SocketAddr, listed_only: bool) {
        let mut state = self.state();
        let Some(membership) = &state.membership else { return };
        if heartbeat.node == self.name() || heartbeat.network != membership.network {
            return;
        }
        if listed_only && !membership.members.iter().any(|m| m.name == heartbeat.node) {
            return;
        }
        let address = match heartbeat.address.strip_prefix(':') {
            Some(port) => format!("{}:{port}", from.ip()),
            None => heartbeat.address.clone(),
        };
        if !state.peers.contains_key(&heartbeat.node) {
            info!(peer = %heartbeat.node, %address, "peer joined");
        }
        state.peers.insert(heartbeat.node.clone(), Peer { heartbeat, address, heard: Instant::now() });
    }

    /// Whether `node` is a member of this node's cluster (listed or heard).
    fn knows(&self, node: &str) -> bool {
        let state = self.state();
        state.peers.contains_key(node)
            || state.membership.as_ref().is_some_and(|m| m.members.iter().any(|m| m.name == node))
    }

    /// The address of peer `node`, if known.
    fn address_of(&self, node: &str) -> Option<String> {
        let state = self.state();
        if let Some(p) = state.peers.get(node) {
            return Some(p.address.clone());
        }
        let member = state.membership.as_ref()?.members.iter().find(|m| m.name == node)?;
        member.address.clone()
    }

    /// This node's registry of its cluster: every member, who is live, and what the
    /// members that report through it run.
    pub fn own_registry(&self) -> Option<Registry> {
        let state = self.state();
        let membership = state.membership.as_ref()?;
        let me = self.name();
        let role = |node: &str| {
            if state.supernode.as_deref() == Some(node) {
                NodeRole::Supernode
            } else {
                NodeRole::Member
            }
        };
        let mut members: BTreeMap<String, RegistryEntry> = BTreeMap::new();
        for m in &membership.members {
            members.insert(
                m.name.clone(),
                RegistryEntry {
                    node: m.name.clone(),
                    account: m.account.clone(),
                    address: m.address.clone(),
                    location: m.location,
                    live: false,
                    role: None,
                    instances: vec![],
                },
            );
        }
        let own = RegistryEntry {
            node: me.to_owned(),
            account: self.config.node.account.clone(),
            address: Some(self.own_address(&state)),
            location: self.config.node.location,
            live: true,
            role: Some(role(me)),
            instances: vec![],
        };
        members.insert(me.to_owned(), own);
        for p in state.peers.values() {
            let entry = members.entry(p.heartbeat.node.clone()).or_insert_with(|| RegistryEntry {
                node: p.heartbeat.node.clone(),
                account: p.heartbeat.account.clone(),
                address: None,
                location: p.heartbeat.location,
                live: true,
                role: None,
                instances: vec![],
            });
            entry.live = true;
            entry.address = Some(p.address.clone());
            entry.role = Some(role(&p.heartbeat.node));
        }
        for (node, report) in &state.statuses {
            if let Some(entry) = members.get_mut(node) {
                entry.instances = report.instances.clone();
            }
        }
        Some(Registry {
            network: membership.network.clone(),
            supernode: state.supernode.clone(),
            members: members.into_values().collect(),
            heartbeats: state.heartbeats,
            elected_at: state.elected_at,
        })
    }

    /// The cluster's registry: the supernode's when this node relays through one that
    /// answers, else this node's own.
    pub async fn registry(&self) -> Result<Registry, String> {
        let own = self.own_registry().ok_or("this node is in no cluster yet: the cloud has not sent its membership")?;
        if let Route::Relay { address, supernode, .. } = self.route() {
            match peer::fetch_registry(self, &address).await {
                Ok(registry) => return Ok(registry),
                Err(e) => {
                    tracing::debug!(%supernode, error = %e, "supernode registry unavailable; answering from this node's")
                }
            }
        }
        Ok(own)
    }

    /// Time between two heartbeats.
    fn heartbeat(&self) -> Duration {
        self.config.heartbeat()
    }
}

impl crate::localapi::Cluster for Cluster {
    fn view(&self) -> Option<ClusterView> {
        Cluster::view(self)
    }

    fn registry(&self) -> futures::future::BoxFuture<'_, Result<Registry, String>> {
        Box::pin(Cluster::registry(self))
    }
}

/// Starts the heartbeat, relay and peer tasks of `cluster`; the peer listener is bound already.
pub fn spawn(cluster: Arc<Cluster>, tcp: tokio::net::TcpListener, udp: tokio::net::UdpSocket) {
    let udp = Arc::new(udp);
    tokio::spawn(peer::serve(cluster.clone(), tcp));
    tokio::spawn(peer::heartbeats(cluster.clone(), udp.clone()));
    tokio::spawn(peer::receive(cluster.clone(), udp));
    tokio::spawn(peer::relay_as_member(cluster.clone()));
    tokio::spawn(peer::relay_upstream(cluster));
}

/// Binds the peer service (TCP for HTTP, UDP for heartbeats) where `config` says, joining
/// the multicast group when LAN discovery is on.
pub async fn bind(config: &EdgeConfig) -> std::io::Result<(tokio::net::TcpListener, tokio::net::UdpSocket)> {
    let listen = config.supernode.listen;
    let tcp = tokio::net::TcpListener::bind(listen).await?;
    let udp = tokio::net::UdpSocket::bind(listen).await?;
    if config.supernode.multicast {
        let group: std::net::Ipv4Addr = supermesh_protocol::peer::MULTICAST_GROUP.parse().expect("a valid group");
        udp.join_multicast_v4(group, std::net::Ipv4Addr::UNSPECIFIED)?;
        udp.set_multicast_ttl_v4(1)?;
        udp.set_multicast_loop_v4(true)?;
    }
    Ok((tcp, udp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use supermesh_protocol::{InstanceReport, Member, Phase};

    const KEY: &str = "cluster-key";

    fn config(name: &str) -> Arc<EdgeConfig> {
        let yaml = format!(
            "node: {{name: {name}, account: acme, network: lan}}\ncloud: {{address: \"127.0.0.1:1\", token: \"{}.abc123.0123456789abcdef\"}}\nsupernode: {{heartbeatSeconds: 1}}\n",
            "0".repeat(64)
        );
        Arc::new(crate::config::parse(&yaml, "edge.yaml").unwrap())
    }

    fn membership(names: &[&str]) -> Membership {
        let members = names
            .iter()
            .map(|n| Member {
                name: n.to_string(),
                account: "acme".into(),
                address: Some(format!("10.0.0.{}:10360", n.len())),
                location: None,
                supernode_eligible: true,
            })
            .collect();
        Membership { network: "lan".into(), key: KEY.into(), members }
    }

    /// A cluster of node `name` with a real metamanager on a temporary SQLite file.
    fn cluster(name: &str, dir: &tempfile::TempDir) -> Arc<Cluster> {
        let store = crate::metamanager::store::Store::open(dir.path().join(format!("{name}.db"))).unwrap();
        let (to_cloud, _) = mpsc::channel(8);
        let (to_edged, _) = mpsc::channel(8);
        let meta = crate::metamanager::spawn(store, to_cloud.clone(), to_edged);
        let cluster = Cluster::new(config(name), meta, to_cloud);
        cluster.set_membership(membership(&["a", "b", "c"]));
        // As if the warm-up had passed: the peers' first heartbeats were heard.
        cluster.state().listening_since = Some(Instant::now() - Duration::from_secs(10));
        cluster
    }

    fn heartbeat(node: &str, started_ms: i64, cloud_connected: bool) -> Heartbeat {
        Heartbeat {
            version: PEER_VERSION,
            node: node.into(),
            network: "lan".into(),
            account: "acme".into(),
            address: ":10360".into(),
            location: None,
            score: Score { eligible: true, stationary: true, capacity: election::local_capacity(), started_ms },
            cloud_connected,
            supernode: None,
            seq: 1,
        }
    }

    fn from() -> SocketAddr {
        "10.0.0.9:5000".parse().unwrap()
    }

    #[tokio::test]
    async fn members_follow_the_elected_supernode_and_take_over_when_it_goes_silent() {
        let dir = tempfile::tempdir().unwrap();
        let b = cluster("b", &dir);
        b.set_cloud_connected(true);
        assert_eq!(b.view(), None, "no election before the first check");
        b.heard(heartbeat("a", 1, true), from(), true);
        b.elect();
        assert_eq!(b.view(), Some(ClusterView { role: NodeRole::Member, supernode: Some("a".into()) }));
        let Route::Relay { supernode, address, incarnation } = b.route() else { panic!("{:?}", b.route()) };
        assert_eq!((supernode.as_str(), address.as_str(), incarnation), ("a", "10.0.0.9:10360", 1));

        // A connected member does not hand its reports to a supernode that lost the cloud.
        b.heard(heartbeat("a", 1, false), from(), true);
        assert_eq!(b.route(), Route::Direct);
        b.set_cloud_connected(false);
        assert!(matches!(b.route(), Route::Relay { .. }), "with no cloud at all, the supernode keeps the reports");

        // The supernode goes silent: the member elects the next best, here itself.
        b.state().peers.get_mut("a").unwrap().heard = Instant::now() - Duration::from_secs(3);
        let before = b.state().heartbeats;
        b.elect();
        assert_eq!(b.view().unwrap().role, NodeRole::Supernode);
        assert_eq!(b.route(), Route::Upstream);
        assert_eq!(b.own_registry().unwrap().elected_at, before);
    }

    #[tokio::test]
    async fn heartbeats_of_strangers_and_other_networks_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let a = cluster("a", &dir);
        let mut other = heartbeat("c", 0, true);
        other.network = "elsewhere".into();
        a.heard(other, from(), true);
        a.heard(heartbeat("stranger", 0, true), from(), true);
        a.heard(heartbeat("a", 0, true), from(), true);
        assert!(a.state().peers.is_empty());
        // With LAN discovery on, a node the membership does not list yet is accepted
        // (its heartbeat was signed with the cluster key, checked before this).
        a.heard(heartbeat("stranger", 0, true), from(), false);
        assert!(a.knows("stranger"));
    }

    #[tokio::test]
    async fn the_registry_lists_members_liveness_roles_and_reported_instances() {
        let dir = tempfile::tempdir().unwrap();
        let a = cluster("a", &dir);
        a.heard(heartbeat("b", i64::MAX, true), from(), true);
        a.elect();
        let instance =
            InstanceReport { ports: vec![8080], ..InstanceReport::new("ns/microservice/web", "1-u", Phase::Ready) };
        let report = StatusReport { taken_ms: 1, instances: vec![instance.clone()], cluster: None };
        let relayed = supermesh_protocol::RelayedReport {
            node: "b".into(),
            seq: 1,
            operation: supermesh_protocol::Operation::MetaSync,
            resource: supermesh_protocol::STATUS_RESOURCE.into(),
            content: serde_json::to_value(&report).unwrap(),
            created_ms: 1,
        };
        assert_eq!(a.queue(vec![relayed]), Ok(1));
        let registry = a.own_registry().unwrap();
        let entry = |n: &str| registry.members.iter().find(|m| m.node == n).unwrap().clone();
        assert_eq!(registry.supernode.as_deref(), Some("a"), "a started before b");
        assert_eq!((entry("a").live, entry("a").role), (true, Some(NodeRole::Supernode)));
        assert_eq!((entry("b").live, entry("b").role), (true, Some(NodeRole::Member)));
        assert_eq!(entry("b").instances, vec![instance]);
        assert_eq!((entry("c").live, entry("c").role), (false, None));
    }
}
