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
//!
//! Nothing on the LAN is taken on its word (see `supermesh_protocol::peer` for the
//! guarantees): a heartbeat counts only when signed by its sender's enrolled key, fresh
//! and newer than the last one ([`beats`]), and only listed members are peers; the
//! election reads eligibility and capacity from the cloud's membership; peer HTTP is
//! mutual TLS between members ([`tls`]); each relayed report carries its node's
//! signature, and a member deletes one only on the cloud's signed receipt.

mod beats;
pub mod election;
mod peer;
pub mod relay;
pub mod tls;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use supermesh_protocol::peer::{
    DropReason, Dropped, Heartbeat, PeerRefusal, Registry, RegistryEntry, SignedHeartbeat, PEER_VERSION,
};
use supermesh_protocol::{now_ms, NodeRole};
use supermesh_protocol::{Body, ClusterView, Membership, Message, StatusReport};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tracing::{debug, info};

use crate::config::EdgeConfig;
use crate::identity::Identity;
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
/// How often a dropped heartbeat is logged at info level, per reason: the rest go to debug,
/// so that a flood of forged datagrams cannot flood the log.
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);

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
    /// Listed members heard recently: never more than the membership lists.
    peers: BTreeMap<String, Peer>,
    /// The last heartbeat taken from each listed member, against replays.
    last: HashMap<String, beats::Last>,
    supernode: Option<String>,
    heartbeats: u64,
    elected_at: u64,
    cloud_connected: bool,
    relay_failed_until: Option<Instant>,
    queue: relay::Queue,
    /// The latest status report of each node that reported through this one (its own included).
    statuses: HashMap<String, StatusReport>,
    /// Outbox reports handed to a supernode and not receipted yet: seq and `created_ms`.
    handed: BTreeMap<i64, i64>,
    /// Heartbeats dropped, by reason.
    dropped: BTreeMap<DropReason, u64>,
    /// When a dropped heartbeat was last logged at info level, by reason.
    drop_logged: HashMap<DropReason, Instant>,
    /// Peer connections and requests refused unread, by reason.
    refused: BTreeMap<PeerRefusal, u64>,
}

/// The node's cluster state, shared by the heartbeat, relay and HTTP tasks, edgehub,
/// MetaSync and the local API.
pub struct Cluster {
    config: Arc<EdgeConfig>,
    meta: MetaHandle,
    /// The node's key and certificate: what it signs and connects to peers with.
    identity: Arc<Identity>,
    /// When this agent started: its heartbeats' `startedMs`.
    started_ms: i64,
    state: Mutex<State>,
    /// Bumped when the route or the elected supernode changes. A watch, not a Notify: a
    /// relay task busy sending still sees, at its next wait, a bump made meanwhile.
    route_changed: watch::Sender<u64>,
    /// Told when this node's view (role, supernode) changes, so MetaSync reports it.
    pub view_changed: Arc<Notify>,
    /// Bumped when the outbox got a report (a watch, for the same reason).
    outbox: watch::Sender<u64>,
    /// Told when an urgent report was queued at this supernode.
    urgent: Notify,
    to_cloud: mpsc::Sender<Message>,
    answers: Mutex<HashMap<String, oneshot::Sender<Body>>>,
}

/// Tells every subscriber of `signal` that something changed.
fn bump(signal: &watch::Sender<u64>) {
    signal.send_modify(|n| *n = n.wrapping_add(1));
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Cluster {
    /// The cluster state of the node `config` describes, holding `identity`; `to_cloud` is
    /// edgehub's outbound queue.
    pub fn new(
        config: Arc<EdgeConfig>,
        meta: MetaHandle,
        identity: Arc<Identity>,
        to_cloud: mpsc::Sender<Message>,
    ) -> Arc<Cluster> {
        Arc::new(Cluster {
            config,
            meta,
            identity,
            started_ms: crate::edged::runtime::now_ms(),
            state: Mutex::new(State {
                membership: None,
                previous_key: None,
                listening_since: None,
                peers: BTreeMap::new(),
                last: HashMap::new(),
                supernode: None,
                heartbeats: 0,
                elected_at: 0,
                cloud_connected: false,
                relay_failed_until: None,
                queue: relay::Queue::new(QUEUE_LIMIT),
                statuses: HashMap::new(),
                handed: BTreeMap::new(),
                dropped: BTreeMap::new(),
                drop_logged: HashMap::new(),
                refused: BTreeMap::new(),
            }),
            route_changed: watch::channel(0).0,
            view_changed: Arc::new(Notify::new()),
            outbox: watch::channel(0).0,
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

    /// Takes the membership the cloud sent (or SQLite held at start). Peers it no longer
    /// lists, or lists with another key, are forgotten.
    pub fn set_membership(&self, membership: Membership) {
        let mut state = self.state();
        if state.membership.as_ref() != Some(&membership) {
            info!(network = %membership.network, members = membership.members.len(), "cluster membership");
            if let Some(old) = state.membership.as_ref().filter(|old| old.key != membership.key) {
                info!(network = %membership.network, "the cluster key was rotated; the old one counts two more minutes");
                state.previous_key = Some((old.key.clone(), Instant::now() + KEY_OVERLAP));
            }
            let same_key = |name: &str| {
                let key = |m: &Membership| m.member(name).and_then(|m| m.key.clone());
                state.membership.as_ref().and_then(key).is_some_and(|k| Some(k) == key(&membership))
            };
            let kept: Vec<String> = state.last.keys().filter(|n| same_key(n)).cloned().collect();
            state.last.retain(|n, _| kept.contains(n));
            state.peers.retain(|n, _| kept.contains(n));
            state.membership = Some(membership);
            state.listening_since.get_or_insert_with(Instant::now);
        }
    }

    /// Records whether this node's stream to the cloud is up.
    pub fn set_cloud_connected(&self, connected: bool) {
        self.state().cloud_connected = connected;
        bump(&self.route_changed);
        bump(&self.outbox);
    }

    /// Tells the relay tasks that the outbox got a report.
    pub fn outbox_changed(&self) {
        bump(&self.outbox);
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
        Route::Relay { supernode, address: peer.address.clone(), incarnation: peer.heartbeat.started_ms }
    }

    /// The supernode could not take reports: report directly for a few heartbeats.
    fn relay_failed(&self) {
        self.state().relay_failed_until = Some(Instant::now() + 3 * self.config.heartbeat());
        bump(&self.route_changed);
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

    /// The cluster key, once the cloud sent the membership: what this node MACs with.
    fn key(&self) -> Option<String> {
        self.state().membership.as_ref().map(|m| m.key.clone())
    }

    /// The keys a peer's message may be MACed with: the cluster key, and the one before the
    /// last rotation for [`KEY_OVERLAP`] after it.
    fn keys(&self) -> Vec<String> {
        let state = self.state();
        let current = state.membership.as_ref().map(|m| m.key.clone());
        let previous = state.previous_key.as_ref().filter(|(_, until)| Instant::now() < *until).map(|(k, _)| k.clone());
        current.into_iter().chain(previous).collect()
    }

    /// Fingerprint of the key the membership gives for `node`, if it lists `node` with one.
    fn member_key(&self, node: &str) -> Option<String> {
        self.state().membership.as_ref()?.member(node)?.key.clone()
    }

    /// The public key of the cloud's receipts, from the membership.
    fn cloud_key(&self) -> Option<String> {
        self.state().membership.as_ref()?.cloud_key.clone()
    }

    /// `host:port` peers reach this node at, or `:port` when the cloud has not told it yet.
    fn own_address(&self, state: &State) -> String {
        if let Some(advertise) = &self.config.supernode.advertise {
            return advertise.clone();
        }
        state
            .membership
            .as_ref()
            .and_then(|m| m.member(self.name()))
            .and_then(|m| m.address.clone())
            .unwrap_or_else(|| format!(":{}", self.config.supernode.listen.port()))
    }

    /// The candidates of an election: this node and every live peer, each with what the
    /// membership says of it (eligibility, capacity) and what it says of itself in its
    /// signed heartbeats (whether it is stationary, when it started). A node the membership
    /// does not list is not eligible.
    fn candidates<'a>(&'a self, state: &'a State) -> Vec<election::Candidate<'a>> {
        let listed = |name: &str| state.membership.as_ref().and_then(|m| m.member(name));
        let score = |name: &str, stationary: bool, started_ms: i64| {
            let member = listed(name);
            election::Score {
                eligible: member.is_some_and(|m| m.supernode_eligible),
                stationary,
                capacity: member.map_or(0, |m| m.capacity),
                started_ms,
            }
        };
        let me = election::Candidate {
            name: self.name(),
            score: score(self.name(), self.config.node.stationary, self.started_ms),
        };
        let peers = state.peers.values().map(|p| {
            let hb = &p.heartbeat;
            election::Candidate { name: &hb.node, score: score(&hb.node, hb.stationary, hb.started_ms) }
        });
        std::iter::once(me).chain(peers).collect()
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
        let elected = election::elect(&self.candidates(&state)).map(str::to_owned);
        if elected != state.supernode {
            info!(supernode = ?elected, previous = ?state.supernode, heartbeat = state.heartbeats, "supernode elected");
            state.supernode = elected;
            state.elected_at = state.heartbeats;
            state.relay_failed_until = None;
            if state.supernode.as_deref() != Some(self.name()) {
                state.queue.clear();
            }
            bump(&self.route_changed);
            self.view_changed.notify_one();
            bump(&self.outbox);
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
            address: self.own_address(&state),
            stationary: self.config.node.stationary,
            started_ms: self.started_ms,
            cloud_connected: state.cloud_connected,
            supernode: state.supernode.clone(),
            seq: state.heartbeats,
            sent_ms: now_ms(),
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

    /// A datagram arrived from `from`: takes its heartbeat if it is a listed member's, signed
    /// with that member's key, fresh and newer than the last one taken from it (its own
    /// heartbeats, looped back by multicast, are ignored). Anything else is counted and dropped.
    fn heard(&self, datagram: &[u8], from: SocketAddr) {
        let keys = self.keys();
        if keys.is_empty() {
            return;
        }
        let taken = SignedHeartbeat::decode(datagram, &keys).and_then(|(hb, signed)| self.take(hb, &signed, from));
        if let Err(dropped) = taken {
            self.dropped(dropped, from);
        }
    }

    /// Takes a heartbeat whose cluster key HMAC was checked: see [`Cluster::heard`].
    fn take(&self, heartbeat: Heartbeat, signed: &SignedHeartbeat, from: SocketAddr) -> Result<(), Dropped> {
        let key = {
            let state = self.state();
            let Some(membership) = &state.membership else { return Ok(()) };
            if heartbeat.node == self.name() {
                return Ok(());
            }
            if heartbeat.network != membership.network {
                let detail = format!("a heartbeat of network {}", heartbeat.network);
                return Err(Dropped::new(DropReason::Foreign, detail));
            }
            let Some(key) = membership.member(&heartbeat.node).and_then(|m| m.key.clone()) else {
                let detail = format!("{:?} is not a member with an enrolled key", heartbeat.node);
                return Err(Dropped::new(DropReason::Unknown, detail));
            };
            key
        };
        // Verified without the lock: one task takes the datagrams, in order.
        signed.verify(&key)?;
        let mut state = self.state();
        let listed = state.membership.as_ref().and_then(|m| m.member(&heartbeat.node)?.key.clone());
        if listed.as_deref() != Some(key.as_str()) {
            return Err(Dropped::new(DropReason::Unknown, format!("{} was enrolled anew meanwhile", heartbeat.node)));
        }
        beats::judge(state.last.get(&heartbeat.node).copied(), &heartbeat, now_ms())?;
        state.last.insert(heartbeat.node.clone(), beats::Last::of(&heartbeat));
        let address = match heartbeat.address.strip_prefix(':') {
            Some(port) => format!("{}:{port}", from.ip()),
            None => heartbeat.address.clone(),
        };
        if !state.peers.contains_key(&heartbeat.node) {
            info!(peer = %heartbeat.node, %address, "peer joined");
        }
        state.peers.insert(heartbeat.node.clone(), Peer { heartbeat, address, heard: Instant::now() });
        Ok(())
    }

    /// Counts a dropped heartbeat and logs it: at info level once per reason every
    /// [`DROP_LOG_EVERY`], else at debug level.
    fn dropped(&self, dropped: Dropped, from: SocketAddr) {
        let mut state = self.state();
        *state.dropped.entry(dropped.reason).or_default() += 1;
        let count = state.dropped[&dropped.reason];
        let due = state.drop_logged.get(&dropped.reason).is_none_or(|t| t.elapsed() >= DROP_LOG_EVERY);
        let (reason, detail) = (dropped.reason.as_str(), &dropped.detail);
        if due {
            state.drop_logged.insert(dropped.reason, Instant::now());
            info!(%from, reason, %detail, dropped = count, "heartbeat dropped");
        } else {
            debug!(%from, reason, %detail, dropped = count, "heartbeat dropped");
        }
    }

    /// Counts a peer connection or request refused unread.
    fn refused(&self, why: PeerRefusal) {
        *self.state().refused.entry(why).or_default() += 1;
    }

    /// Whether the certificate `cert` is a listed member's, with the key the membership gives.
    fn is_member(&self, cert: &tls::PeerCert) -> bool {
        self.member_key(&cert.node).is_some_and(|k| k == cert.key)
    }

    /// The address of peer `node`, if known.
    fn address_of(&self, node: &str) -> Option<String> {
        let state = self.state();
        if let Some(p) = state.peers.get(node) {
            return Some(p.address.clone());
        }
        state.membership.as_ref()?.member(node)?.address.clone()
    }

    /// This node's registry of its cluster: every member, who is live, and what the
    /// members that report through it run, with what it dropped and refused.
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
            let (live, address) = match (m.name == me, state.peers.get(&m.name)) {
                (true, _) => (true, Some(self.own_address(&state))),
                (false, Some(p)) => (true, Some(p.address.clone())),
                (false, None) => (false, m.address.clone()),
            };
            let entry = RegistryEntry {
                node: m.name.clone(),
                account: m.account.clone(),
                address,
                location: m.location,
                live,
                role: live.then(|| role(&m.name)),
                instances: state.statuses.get(&m.name).map(|r| r.instances.clone()).unwrap_or_default(),
            };
            members.insert(m.name.clone(), entry);
        }
        Some(Registry {
            network: membership.network.clone(),
            supernode: state.supernode.clone(),
            members: members.into_values().collect(),
            heartbeats: state.heartbeats,
            elected_at: state.elected_at,
            dropped: state.dropped.clone(),
            refused: state.refused.clone(),
        })
    }

    /// The cluster's registry: the supernode's when this node relays through one that
    /// answers, else this node's own.
    pub async fn registry(&self) -> Result<Registry, String> {
        let own = self.own_registry().ok_or("this node is in no cluster yet: the cloud has not sent its membership")?;
        if let Route::Relay { address, supernode, .. } = self.route() {
            match peer::fetch_registry(self, &supernode, &address).await {
                Ok(registry) => return Ok(registry),
                Err(e) => debug!(%supernode, error = %e, "supernode registry unavailable; answering from this node's"),
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

/// What the fuzz target `peer_heartbeat` (fuzz/) drives; not the agent's interface.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// Takes `datagram` from `from` as the UDP task does, then elects as the heartbeat task
    /// does, the warm-up taken as over.
    pub fn heard(cluster: &Cluster, datagram: &[u8], from: SocketAddr) {
        cluster.heard(datagram, from);
        let warm = cluster.heartbeat().mul_f64(2.0 * WARM_UP_HEARTBEATS);
        cluster.state().listening_since = Instant::now().checked_sub(warm);
        cluster.elect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use supermesh_protocol::identity::{Issued, JoinString};

    #[tokio::test]
    async fn a_report_queued_while_the_relay_is_busy_wakes_it_at_its_next_wait() {
        // With a Notify's notify_waiters, a bump while the relay sent a batch was lost and
        // the report waited a whole podstatus interval (seen in CI).
        let (signal, _) = watch::channel(0u64);
        let mut relay = signal.subscribe();
        bump(&signal); // the relay is busy flushing: nobody waits
        let woken = tokio::time::timeout(Duration::from_millis(100), relay.changed()).await;
        assert!(woken.is_ok_and(|r| r.is_ok()), "the bump made while busy is seen");
        let idle = tokio::time::timeout(Duration::from_millis(50), relay.changed()).await;
        assert!(idle.is_err(), "and only once");
    }
    use supermesh_protocol::signing::CloudKey;
    use supermesh_protocol::{InstanceReport, Member, Phase, Receipt, Receipted};

    const KEY: &str = "cluster-key";
    const JOIN: &str = "0000000000000000000000000000000000000000000000000000000000000000.abc123.0123456789abcdef";

    fn config(name: &str) -> Arc<EdgeConfig> {
        let yaml = format!(
            "node: {{name: {name}, account: acme, network: lan}}\ncloud: {{address: \"127.0.0.1:1\", token: \"{JOIN}\"}}\nsupernode: {{heartbeatSeconds: 1}}\n"
        );
        Arc::new(crate::config::parse(&yaml, "edge.yaml").unwrap())
    }

    /// The devices of a LAN: each with its own key, and a certificate from a test CA.
    struct Lan {
        ids: BTreeMap<String, Arc<Identity>>,
        /// Capacity class the cloud records per node (absent: 1000).
        capacity: BTreeMap<String, u32>,
        addresses: BTreeMap<String, String>,
        dir: tempfile::TempDir,
    }

    impl Lan {
        fn new(names: &[&str]) -> Lan {
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca_params = rcgen::CertificateParams::default();
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let issuer = rcgen::Issuer::new(ca_params, ca_key);
            let join: JoinString = JOIN.parse().unwrap();
            let ids = names
                .iter()
                .map(|n| {
                    let id = Identity::load(None, Some(&join)).unwrap();
                    let csr = rcgen::CertificateSigningRequestParams::from_pem(&id.csr(n).unwrap()).unwrap();
                    let cert = csr.signed_by(&issuer).unwrap();
                    let issued = Issued { certificate: cert.pem(), not_before: 0, not_after: i64::MAX, approved: true };
                    id.store(&issued).unwrap();
                    (n.to_string(), Arc::new(id))
                })
                .collect();
            Lan { ids, capacity: BTreeMap::new(), addresses: BTreeMap::new(), dir: tempfile::tempdir().unwrap() }
        }

        fn membership(&self) -> Membership {
            let members = self
                .ids
                .iter()
                .map(|(n, id)| Member {
                    name: n.clone(),
                    account: "acme".into(),
                    address: Some(self.addresses.get(n).cloned().unwrap_or(format!("10.0.0.{}:10360", n.len()))),
                    location: None,
                    supernode_eligible: true,
                    key: Some(id.fingerprint()),
                    capacity: self.capacity.get(n).copied().unwrap_or(1000),
                })
                .collect();
            Membership { network: "lan".into(), key: KEY.into(), members, cloud_key: Some(cloud().public()) }
        }

        /// The cluster of node `name` with a real metamanager on a temporary SQLite file.
        fn cluster(&self, name: &str) -> Arc<Cluster> {
            let store = crate::metamanager::store::Store::open(self.dir.path().join(format!("{name}.db"))).unwrap();
            let (to_cloud, _) = mpsc::channel(8);
            let (to_edged, _) = mpsc::channel(8);
            let meta = crate::metamanager::spawn(store, to_cloud.clone(), to_edged);
            let cluster = Cluster::new(config(name), meta, self.ids[name].clone(), to_cloud);
            cluster.set_membership(self.membership());
            // As if the warm-up had passed: the peers' first heartbeats were heard.
            cluster.state().listening_since = Some(Instant::now() - Duration::from_secs(10));
            cluster
        }

        /// A heartbeat of `hb.node` signed with the key of `signer`.
        fn datagram(&self, hb: &Heartbeat, signer: &str) -> Vec<u8> {
            SignedHeartbeat::encode(hb, KEY, |p, b| self.ids[signer].sign(p, b)).unwrap()
        }
    }

    fn cloud() -> CloudKey {
        CloudKey::derive("root")
    }

    fn heartbeat(node: &str, started_ms: i64, seq: u64, cloud_connected: bool) -> Heartbeat {
        Heartbeat {
            version: PEER_VERSION,
            node: node.into(),
            network: "lan".into(),
            address: ":10360".into(),
            stationary: true,
            started_ms,
            cloud_connected,
            supernode: None,
            seq,
            sent_ms: now_ms(),
        }
    }

    fn from() -> SocketAddr {
        "10.0.0.9:5000".parse().unwrap()
    }

    fn dropped(cluster: &Cluster, reason: DropReason) -> u64 {
        cluster.state().dropped.get(&reason).copied().unwrap_or(0)
    }

    #[tokio::test]
    async fn members_follow_the_elected_supernode_and_take_over_when_it_goes_silent() {
        let lan = Lan::new(&["a", "b", "c"]);
        let b = lan.cluster("b");
        b.set_cloud_connected(true);
        assert_eq!(b.view(), None, "no election before the first check");
        b.heard(&lan.datagram(&heartbeat("a", 1, 1, true), "a"), from());
        b.elect();
        assert_eq!(b.view(), Some(ClusterView { role: NodeRole::Member, supernode: Some("a".into()) }));
        let Route::Relay { supernode, address, incarnation } = b.route() else { panic!("{:?}", b.route()) };
        assert_eq!((supernode.as_str(), address.as_str(), incarnation), ("a", "10.0.0.9:10360", 1));

        // A connected member does not hand its reports to a supernode that lost the cloud.
        b.heard(&lan.datagram(&heartbeat("a", 1, 2, false), "a"), from());
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
    async fn only_fresh_heartbeats_signed_by_listed_members_are_taken_and_the_rest_are_counted() {
        let mut lan = Lan::new(&["a", "b", "c", "stranger"]);
        let a = {
            let stranger = lan.ids.remove("stranger").unwrap();
            let a = lan.cluster("a");
            lan.ids.insert("stranger".into(), stranger);
            a
        };
        let mut other = heartbeat("c", 1, 1, true);
        other.network = "elsewhere".into();
        a.heard(&lan.datagram(&other, "c"), from());
        a.heard(&lan.datagram(&heartbeat("stranger", 1, 1, true), "stranger"), from());
        a.heard(&lan.datagram(&heartbeat("a", 1, 1, true), "a"), from());
        // A member speaking for another: its own key, another's name.
        a.heard(&lan.datagram(&heartbeat("b", 1, 1, true), "c"), from());
        let wrong_cluster =
            SignedHeartbeat::encode(&heartbeat("b", 1, 1, true), "other-key", |p, m| lan.ids["b"].sign(p, m));
        a.heard(&wrong_cluster.unwrap(), from());
        let mut stale = heartbeat("b", 1, 1, true);
        stale.sent_ms -= 60_000;
        a.heard(&lan.datagram(&stale, "b"), from());
        a.heard(b"{not json", from());
        assert!(a.state().peers.is_empty(), "nothing taken");
        assert_eq!(dropped(&a, DropReason::Foreign), 2);
        assert_eq!(dropped(&a, DropReason::Unknown), 1);
        assert_eq!(dropped(&a, DropReason::BadSignature), 1);
        assert_eq!(dropped(&a, DropReason::Stale), 1);
        assert_eq!(dropped(&a, DropReason::Malformed), 1);

        // A genuine heartbeat is taken once; the same datagram again, from anywhere, is a replay.
        let genuine = lan.datagram(&heartbeat("b", 1, 1, true), "b");
        a.heard(&genuine, from());
        let address = a.address_of("b");
        a.heard(&genuine, "10.6.6.6:10360".parse().unwrap());
        assert_eq!(dropped(&a, DropReason::Replayed), 1);
        assert_eq!(a.address_of("b"), address, "a replay from elsewhere does not move the peer");
        a.heard(&lan.datagram(&heartbeat("b", 1, 2, true), "b"), from());
        assert_eq!(dropped(&a, DropReason::Replayed), 1, "the next one is taken");
        let registry = a.own_registry().unwrap();
        assert_eq!(registry.dropped.get(&DropReason::Replayed), Some(&1));
        assert_eq!(registry.dropped.values().sum::<u64>(), 7);
    }

    #[tokio::test]
    async fn the_election_reads_capacity_and_eligibility_from_the_membership_never_from_a_heartbeat() {
        let mut lan = Lan::new(&["a", "b", "c"]);
        lan.capacity.insert("c".into(), 2000);
        let a = lan.cluster("a");
        // b claims a huge capacity and the longest uptime in a heartbeat it signs itself.
        let mut claim = serde_json::to_value(heartbeat("b", 0, 1, true)).unwrap();
        claim["score"] =
            serde_json::json!({"eligible": true, "stationary": true, "capacity": u32::MAX, "startedMs": 0});
        claim["capacity"] = serde_json::json!(u32::MAX);
        let body = serde_json::to_string(&claim).unwrap();
        let signature = lan.ids["b"].sign(supermesh_protocol::signing::Purpose::Heartbeat, body.as_bytes()).unwrap();
        let mac = supermesh_protocol::peer::sign(KEY, body.as_bytes());
        let datagram = serde_json::to_vec(&SignedHeartbeat { body, mac, signature }).unwrap();
        a.heard(&datagram, from());
        a.heard(&lan.datagram(&heartbeat("c", i64::MAX / 2, 1, true), "c"), from());
        a.elect();
        assert_eq!(a.state().peers.len(), 2, "both heartbeats are genuine");
        assert_eq!(a.view().unwrap().supernode.as_deref(), Some("c"), "the capacity the cloud records wins");

        // The cloud makes c ineligible: the oldest of the others wins.
        let mut membership = lan.membership();
        membership.members.iter_mut().filter(|m| m.name == "c").for_each(|m| m.supernode_eligible = false);
        a.set_membership(membership);
        a.elect();
        assert_eq!(a.view().unwrap().supernode.as_deref(), Some("b"));
    }

    #[tokio::test]
    async fn peers_are_listed_members_only_however_many_names_a_lan_brings() {
        let mut lan = Lan::new(&["a", "b"]);
        let a = lan.cluster("a");
        let join: JoinString = JOIN.parse().unwrap();
        for i in 0..200 {
            let name = format!("n{i}");
            lan.ids.insert(name.clone(), Arc::new(Identity::load(None, Some(&join)).unwrap()));
            a.heard(&lan.datagram(&heartbeat(&name, 1, 1, true), &name), from());
        }
        a.heard(&lan.datagram(&heartbeat("b", 1, 1, true), "b"), from());
        assert_eq!(a.state().peers.keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(dropped(&a, DropReason::Unknown), 200);
        assert!(a.state().last.len() <= 1, "no record is kept of strangers");
    }

    #[tokio::test]
    async fn a_new_key_for_a_member_forgets_what_was_heard_under_the_old_one() {
        let mut lan = Lan::new(&["a", "b"]);
        let a = lan.cluster("a");
        a.heard(&lan.datagram(&heartbeat("b", 1, 9, true), "b"), from());
        assert!(a.state().peers.contains_key("b"));
        let join: JoinString = JOIN.parse().unwrap();
        lan.ids.insert("b".into(), Arc::new(Identity::load(None, Some(&join)).unwrap()));
        a.set_membership(lan.membership());
        assert!(!a.state().peers.contains_key("b") && !a.state().last.contains_key("b"));
        a.heard(&lan.datagram(&heartbeat("b", 1, 1, true), "b"), from());
        assert!(a.state().peers.contains_key("b"), "b re-enrolled and started counting again");
    }

    #[tokio::test]
    async fn the_registry_lists_members_liveness_roles_and_reported_instances() {
        let lan = Lan::new(&["a", "b", "c"]);
        let a = lan.cluster("a");
        a.heard(&lan.datagram(&heartbeat("b", i64::MAX, 1, true), "b"), from());
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
            signature: None,
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

    #[tokio::test]
    async fn a_receipt_deletes_only_reports_handed_over_as_it_names_them() {
        let lan = Lan::new(&["a", "b"]);
        let b = lan.cluster("b");
        b.state().handed.extend([(1, 100), (2, 200)]);
        let named = [Receipted { seq: 1, created_ms: 100 }, Receipted { seq: 2, created_ms: 999 }];
        let receipt = Receipt::sign(&cloud(), "b", &lan.ids["b"].fingerprint(), named.to_vec());
        assert!(receipt.verify(&b.cloud_key().unwrap(), "b", &b.identity.fingerprint()));
        assert_eq!(b.receipted(&receipt.reports), [1], "seq 2 names another report");
        assert_eq!(b.receipted(&receipt.reports), Vec::<i64>::new(), "once");
    }

    #[tokio::test]
    async fn peers_talk_over_mutual_tls_with_the_keys_the_membership_gives() {
        let mut lan = Lan::new(&["a", "b", "stranger"]);
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = tcp.local_addr().unwrap().to_string();
        lan.addresses.insert("a".into(), address.clone());
        let stranger_id = lan.ids.remove("stranger").unwrap();
        let (a, b) = (lan.cluster("a"), lan.cluster("b"));
        tokio::spawn(peer::serve(a.clone(), tcp));

        let registry = peer::fetch_registry(&b, "a", &address).await.expect("b reads a's registry");
        assert_eq!(registry.network, "lan");
        assert!(peer::fetch_registry(&b, "b", &address).await.is_err(), "a is not b: its certificate says so");

        // A device the membership does not list is refused in the handshake, whatever it holds.
        lan.ids.insert("stranger".into(), stranger_id);
        let mut stranger_view = lan.membership();
        let listed_a = lan.membership().members.into_iter().find(|m| m.name == "a").unwrap();
        stranger_view.members.retain(|m| m.name == "stranger");
        stranger_view.members.push(listed_a);
        let stranger = lan.cluster("stranger");
        stranger.set_membership(stranger_view);
        let refused = peer::fetch_registry(&stranger, "a", &address).await.unwrap_err();
        assert!(refused.contains("a at"), "{refused}");
        let counted = a.own_registry().unwrap().refused;
        // The stranger's handshake, and b's that b itself broke off (a is not who it asked for).
        assert_eq!(counted.get(&PeerRefusal::Handshake), Some(&2), "{counted:?}");
    }
}
