//! cloudhub: one authenticated WebSocket-over-TLS session per agent. The hub
//! routes what is addressed to a node's session (a newer session supersedes an
//! older one, queries for logs) and counts sessions; what a node should hold,
//! its reports and its liveness belong to the fleet index.

pub mod delivery;
mod enroll;
pub mod events;
pub mod pki;
pub mod reports;
mod session;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use rand::Rng;
use supermesh_protocol::identity::{BootstrapToken, ENROLL_PATH, RENEW_PATH};
use supermesh_protocol::signing::CloudKey;
use supermesh_protocol::{moved_location, now_ms, Body, Message, Query, CONNECT_PATH, MAX_MESSAGE_BYTES};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tracing::{debug, info, warn};

use crate::forward::Forwarder;
use crate::index::Index;
use crate::metrics::{Metrics, ReasonLabels};
use crate::replicas::Replicas;
use events::Events;
use pki::{Authority, PeerCert, Pki};

/// Default time after a controller start during which a node without a session
/// keeps its Connected condition: agents reconnect within it, so a restart flips nothing.
pub const RECONNECT_GRACE: Duration = Duration::from_secs(45);
/// Seconds between keepalives on an idle stream.
pub const KEEPALIVE_SECONDS: u64 = 15;
/// Handshakes (TLS + upgrade) allowed at once; more wait, which spreads reconnect storms.
const CONCURRENT_HANDSHAKES: usize = 64;
/// How long a connection has to send its first bytes, and then to complete its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of connections from one address still in their handshake: more are closed at once.
pub const MAX_PENDING_PER_ADDRESS: usize = 256;
/// How long the cloud waits for an agent to answer a query.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes a session reads from its socket at a time. Messages are small and an idle
/// session should cost little: the 128 KiB default would be most of its memory.
const READ_BUFFER: usize = 4 * 1024;
/// Enrollments served at once: a fleet coming online for the first time waits its
/// turn instead of opening a connection to the API server per agent.
const CONCURRENT_REGISTRATIONS: usize = 16;

/// A request to an agent and where its answer goes.
type Asked = (Message, oneshot::Sender<Message>);

struct Slot {
    id: u64,
    superseded: Arc<Notify>,
    queries: mpsc::Sender<Asked>,
}

/// The sessions of connected agents, by node: where to send what is addressed to a node.
pub struct Hub {
    sessions: Mutex<HashMap<String, Slot>>,
    next_id: AtomicU64,
    keepalive: Duration,
    max_agents: usize,
}

/// What a session learns when it registers with the hub.
struct Registered {
    id: u64,
    superseded: Arc<Notify>,
    queries: mpsc::Receiver<Asked>,
}

impl Hub {
    /// A hub accepting at most `max_agents` sessions, whose idle streams carry a keepalive every `keepalive`.
    pub fn new(max_agents: usize, keepalive: Duration) -> Hub {
        Hub {
            sessions: Mutex::default(),
            next_id: AtomicU64::new(1),
            keepalive: keepalive.max(Duration::from_secs(1)),
            max_agents,
        }
    }

    /// Number of connected agents.
    pub fn connected(&self) -> usize {
        self.lock().len()
    }

    /// Time between keepalives on an idle stream (a stream silent for three is dead).
    pub fn keepalive(&self) -> Duration {
        self.keepalive
    }

    /// Registers a session for `node`, closing any older one of the same node.
    fn register(&self, node: &str) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let superseded = Arc::new(Notify::new());
        let (queries, incoming) = mpsc::channel(16);
        let slot = Slot { id, superseded: superseded.clone(), queries };
        if let Some(old) = self.lock().insert(node.to_owned(), slot) {
            old.superseded.notify_one();
        }
        Registered { id, superseded, queries: incoming }
    }

    fn unregister(&self, node: &str, id: u64) {
        let mut sessions = self.lock();
        if sessions.get(node).is_some_and(|s| s.id == id) {
            sessions.remove(node);
        }
    }

    /// Asks `node`'s agent `query` about `resource` and waits for its answer.
    pub async fn query(&self, node: &str, resource: &str, query: Query) -> Result<Message, String> {
        let sender = self.lock().get(node).map(|s| s.queries.clone());
        let sender = sender.ok_or_else(|| format!("the agent of node {node} is not connected"))?;
        let (reply, answer) = oneshot::channel();
        let message = Message::with_body(String::new(), now_ms(), resource, &Body::Query(query));
        sender.send((message, reply)).await.map_err(|_| format!("the session of node {node} ended"))?;
        match tokio::time::timeout(QUERY_TIMEOUT, answer).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(format!("the session of node {node} ended before it answered")),
            Err(_) => Err(format!("node {node} did not answer within {} s", QUERY_TIMEOUT.as_secs())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What every session shares.
#[derive(Clone)]
struct Shared {
    hub: Arc<Hub>,
    index: Arc<Index>,
    events: Events,
    metrics: Arc<Metrics>,
    client: kube::Client,
    /// Bounds the enrollments served at once.
    registrations: Arc<Semaphore>,
    /// Signs node certificates.
    authority: Arc<Authority>,
    /// The bootstrap tokens' Secrets, in the controller's namespace.
    secrets: kube::Api<Secret>,
    /// Which replica serves which node.
    replicas: Replicas,
    /// Hands the statuses taken to the other replicas.
    forward: Forwarder,
    /// Events each node may post per minute.
    event_budget: Arc<reports::EventBudget>,
    /// Signs the receipts for relayed reports.
    cloud_key: Arc<CloudKey>,
}

/// What the cloudhub serves agents with.
pub struct Serving {
    /// Its CA and serving certificate.
    pub pki: Pki,
    /// The controller's namespace, where bootstrap tokens live.
    pub namespace: String,
    /// Its sessions.
    pub hub: Arc<Hub>,
    /// The fleet index.
    pub index: Arc<Index>,
    /// Where instance events go.
    pub events: Events,
    /// The controller's metrics.
    pub metrics: Arc<Metrics>,
    /// Records enrolled nodes, reads tokens.
    pub client: kube::Client,
    /// Which replica serves which node.
    pub replicas: Replicas,
    /// Hands the statuses taken to the other replicas.
    pub forward: Forwarder,
    /// Connections from one address that may be in their handshake at once.
    pub max_pending_per_address: usize,
}

/// Connections still in their handshake, per source address: one address (or one
/// attacker behind it) cannot hold every handshake slot.
#[derive(Clone)]
struct Pending {
    by_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
    limit: usize,
}

/// One connection counted in [`Pending`] until dropped.
struct PendingGuard {
    pending: Pending,
    address: IpAddr,
}

impl Pending {
    fn enter(&self, address: IpAddr) -> Option<PendingGuard> {
        let mut by_address = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        let count = by_address.entry(address).or_default();
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(PendingGuard { pending: self.clone(), address })
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut by_address = self.pending.by_address.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = by_address.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                by_address.remove(&self.address);
            }
        }
    }
}

/// Accepts agents on `listener` until the process ends, once it knows the other replicas:
/// an agent of a node another replica serves is sent there.
pub async fn serve(listener: TcpListener, serving: Serving) {
    let Serving { pki, namespace, hub, index, events, metrics, client, replicas, forward, max_pending_per_address } =
        serving;
    let pending = Pending { by_address: Arc::default(), limit: max_pending_per_address.max(1) };
    replicas.wait_synced().await;
    // An agent's first reports name its instances; before placement is known they would be
    // dropped as belonging to nothing, so no agent is accepted before the index has synced.
    index.wait_synced().await;
    let acceptor = TlsAcceptor::from(pki.tls.clone());
    let handshakes = Arc::new(Semaphore::new(CONCURRENT_HANDSHAKES));
    let registrations = Arc::new(Semaphore::new(CONCURRENT_REGISTRATIONS));
    let secrets = kube::Api::namespaced(client.clone(), &namespace);
    let authority = pki.authority.clone();
    let event_budget = Arc::new(reports::event_budget());
    let cloud_key = Arc::new(CloudKey::derive(&pki.cluster_key_root));
    let shared = Shared {
        hub,
        index,
        events,
        metrics,
        client,
        registrations,
        authority,
        secrets,
        replicas,
        forward,
        event_budget,
        cloud_key,
    };
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                warn!(error = %e, "cloudhub accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(counted) = pending.enter(peer.ip()) else {
            debug!(%peer, "too many connections from this address in their handshake; closed");
            shared.metrics.refused.get_or_create(&ReasonLabels { reason: "per_address" }).inc();
            continue;
        };
        let (acceptor, shared, handshakes) = (acceptor.clone(), shared.clone(), handshakes.clone());
        tokio::spawn(async move {
            // A connection that sends nothing holds no handshake slot: it waits for its first bytes.
            // (Readiness alone may be reported before any byte came: peek waits for one.)
            let first = tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut [0u8; 1])).await;
            if !matches!(first, Ok(Ok(n)) if n > 0) {
                debug!(%peer, "connection idle before its handshake; closed");
                return;
            }
            let Ok(permit) = handshakes.acquire_owned().await else { return };
            let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(acceptor, tcp, &shared));
            let (ws, accepted) = match accepted.await {
                Ok(Ok(accepted)) => accepted,
                Ok(Err(Refusal::Redirected(node))) => {
                    debug!(%peer, %node, "agent sent to the replica that serves its node");
                    shared.metrics.redirects.inc();
                    return;
                }
                Ok(Err(Refusal::Refused(why, reason))) => {
                    info!(%peer, %reason, "agent connection refused");
                    shared.metrics.refused.get_or_create(&ReasonLabels { reason: why }).inc();
                    return;
                }
                Err(_) => {
                    debug!(%peer, "agent handshake timed out");
                    return;
                }
            };
            drop((permit, counted));
            match accepted {
                Accepted::Session { node, key } => session::run(ws, node, key, peer, shared).await,
                Accepted::Enroll(token) => enroll::enroll(ws, token, peer, shared).await,
                Accepted::Renew(cert) => enroll::renew(ws, cert, shared).await,
            }
        });
    }
}

/// Why an agent's connection was not taken.
enum Refusal {
    /// Another replica serves its node, named here: the agent was sent there.
    Redirected(String),
    /// Anything else: a metric label and the reason.
    Refused(&'static str, String),
}

/// What a connection asked for and may do, once its handshake is done.
enum Accepted {
    /// A session of the node its certificate names, carrying the key of that fingerprint.
    Session {
        /// The node.
        node: String,
        /// Fingerprint of the key its certificate carries.
        key: String,
    },
    /// An enrollment with a bootstrap token.
    Enroll(BootstrapToken),
    /// A renewal of the certificate presented.
    Renew(PeerCert),
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;

/// The WebSocket limits of both sides: message size, and a small read buffer per stream.
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(2 * MAX_MESSAGE_BYTES))
        .max_frame_size(Some(2 * MAX_MESSAGE_BYTES))
}

/// Hint for a device without a certificate.
const ENROLL_HINT: &str = "a node certificate is required on this endpoint; a device gets one by enrolling once with \
                           a bootstrap token: `supermeshctl token create` prints one, cloud.token in edge.yaml takes \
                           it (supermesh-agent 0.2 or later)";

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    shared: &Shared,
) -> Result<(Ws, Accepted), Refusal> {
    let hub = &shared.hub;
    let tls = acceptor.accept(tcp).await.map_err(|e| Refusal::Refused("tls", format!("TLS handshake failed: {e}")))?;
    // Identity comes from the client certificate alone, which the TLS handshake verified
    // against the CA; whether it still speaks for its node is the cloud's own record.
    let cert = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        Some(der) => Some(PeerCert::parse(der).map_err(|e| Refusal::Refused("bad_certificate", e))?),
        None => None,
    };
    let standing = match &cert {
        Some(cert) => Some(enroll::standing(shared, cert).await),
        None => None,
    };
    let mut accepted = None;
    let mut refused: (&'static str, Option<String>) = ("other", None);
    let full = hub.connected() >= hub.max_agents;
    // tungstenite's handshake callback fixes this signature, large error type included.
    #[allow(clippy::result_large_err)]
    let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        let mut refuse = |why: &'static str, code: StatusCode, reason: String| {
            refused = (why, Some(reason.clone()));
            let mut r = ErrorResponse::new(Some(reason));
            *r.status_mut() = code;
            r
        };
        let path = req.uri().path();
        if path == ENROLL_PATH {
            let bearer = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            return match bearer.map(str::parse::<BootstrapToken>) {
                Some(Ok(token)) => {
                    accepted = Some(Accepted::Enroll(token));
                    Ok(resp)
                }
                _ => Err(refuse(
                    "bad_token",
                    StatusCode::UNAUTHORIZED,
                    "enrollment needs a bootstrap token <id>.<secret> as a bearer token".into(),
                )),
            };
        }
        if path != CONNECT_PATH && path != RENEW_PATH {
            let reason = format!("the agent endpoints are {CONNECT_PATH}, {ENROLL_PATH} and {RENEW_PATH}");
            return Err(refuse("other", StatusCode::NOT_FOUND, reason));
        }
        let (Some(cert), Some(standing)) = (&cert, &standing) else {
            return Err(refuse("no_certificate", StatusCode::UNAUTHORIZED, ENROLL_HINT.into()));
        };
        if let Err((code, reason)) = standing {
            let code = StatusCode::from_u16(*code).unwrap_or(StatusCode::FORBIDDEN);
            return Err(refuse("not_standing", code, reason.clone()));
        }
        if path == RENEW_PATH {
            accepted = Some(Accepted::Renew(cert.clone()));
            return Ok(resp);
        }
        let name = cert.node.as_str();
        if cert.expired() {
            let reason = format!("the certificate of node {name} expired; the agent renews it at {RENEW_PATH}");
            return Err(refuse("expired", StatusCode::UNAUTHORIZED, reason));
        }
        if let Some(owner) = shared.replicas.elsewhere(name) {
            // Only an agent that proved its identity learns where the others are.
            if let Ok(location) = moved_location(&owner.address).parse() {
                let mut r = refuse(
                    "redirected",
                    StatusCode::TEMPORARY_REDIRECT,
                    format!("replica {} serves node {name}", owner.id),
                );
                r.headers_mut().insert("location", location);
                return Err(r);
            }
            warn!(replica = %owner.id, address = %owner.address, "a replica announces an address that is no URL; serving its node here");
        }
        if full {
            let mut r = refuse("full", StatusCode::SERVICE_UNAVAILABLE, "cloudhub is at its agent limit".into());
            let wait = rand::rng().random_range(5..60).to_string();
            r.headers_mut().insert("retry-after", wait.parse().expect("digits are a valid header"));
            return Err(r);
        }
        accepted = Some(Accepted::Session { node: name.to_owned(), key: cert.key.clone() });
        Ok(resp)
    };
    let upgraded = tokio_tungstenite::accept_hdr_async_with_config(tls, check, Some(websocket_config())).await;
    match (upgraded, accepted) {
        (Ok(ws), Some(accepted)) => Ok((ws, accepted)),
        (Err(_), _) if refused.0 == "redirected" => Err(Refusal::Redirected(cert.map(|c| c.node).unwrap_or_default())),
        (Err(e), _) => {
            Err(Refusal::Refused(refused.0, refused.1.unwrap_or_else(|| format!("WebSocket upgrade refused: {e}"))))
        }
        (Ok(_), None) => Err(Refusal::Refused("other", "accepted without a purpose".into())),
    }
}

/// The `host:port` at which a node's peers reach it, from the `peer_address` of its hello:
/// `host:port` as given, or `:port` with `from`, the IP address the agent connects from.
/// `None` when the advertised address is malformed.
pub fn resolve_peer_address(advertised: &str, from: IpAddr) -> Option<String> {
    let (host, port) = advertised.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    if host.is_empty() {
        return Some(SocketAddr::new(from.to_canonical(), port).to_string());
    }
    let bracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    let valid = match bracketed {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => host.len() <= 253 && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'),
    };
    valid.then(|| format!("{host}:{port}"))
}

/// Binds the agents' listener now, so that a taken port fails the start clearly.
pub async fn bind(addr: SocketAddr) -> crate::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| crate::Error::Listen(addr.to_string(), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addresses_resolve_a_bare_port_to_the_connecting_ip() {
        let from: IpAddr = "192.168.1.20".parse().unwrap();
        assert_eq!(resolve_peer_address(":10360", from).as_deref(), Some("192.168.1.20:10360"));
        assert_eq!(resolve_peer_address("pi.local:10360", from).as_deref(), Some("pi.local:10360"));
        assert_eq!(resolve_peer_address("10.0.0.5:7000", from).as_deref(), Some("10.0.0.5:7000"));
        assert_eq!(resolve_peer_address("[fd00::5]:7000", from).as_deref(), Some("[fd00::5]:7000"));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(resolve_peer_address(":80", mapped).as_deref(), Some("10.1.2.3:80"));
        let v6: IpAddr = "fd00::9".parse().unwrap();
        assert_eq!(resolve_peer_address(":80", v6).as_deref(), Some("[fd00::9]:80"));
        for bad in ["", "10360", ":", ":0", ":70000", "host:port", "bad host:1", "[nope]:1", "a/b:1"] {
            assert_eq!(resolve_peer_address(bad, from), None, "{bad:?}");
        }
    }
}
