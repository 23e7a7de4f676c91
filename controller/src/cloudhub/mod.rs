//! cloudhub: one authenticated WebSocket-over-TLS session per agent. Knows
//! which agents are connected (for EdgeNode status), and streams each node the
//! difference between what it holds and what placement gives it.

pub mod desired;
pub mod pki;
pub mod reports;
mod session;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::channel::mpsc::UnboundedSender;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use rand::Rng;
use supermesh_api::protocol::{Message, Operation, CONNECT_PATH, MAX_MESSAGE_BYTES, NODE_HEADER};
use supermesh_api::EdgeNode;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tracing::{debug, info, warn};

use crate::context::Context;
use pki::{token_matches, Pki};

/// Default time after a controller start during which a node without a session
/// keeps its Connected condition: agents reconnect within it, so a restart flips nothing.
pub const RECONNECT_GRACE: Duration = Duration::from_secs(45);
/// Seconds between keepalives on an idle stream.
pub const KEEPALIVE_SECONDS: u64 = 15;
/// Handshakes (TLS + upgrade) allowed at once; more wait, which spreads reconnect storms.
const CONCURRENT_HANDSHAKES: usize = 64;

/// What the cloud knows about a connected agent.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionInfo {
    /// When the session started.
    pub connected_at: Timestamp,
    /// When the agent was last heard from.
    pub last_seen: Timestamp,
    /// Agent version, operating system and architecture from its hello.
    pub agent_version: String,
    /// Operating system of the node.
    pub os: String,
    /// CPU architecture of the node.
    pub arch: String,
    /// Address the agent connected from.
    pub address: String,
    /// `host:port` at which the node's cluster peers reach its supernode service, if it advertises one.
    pub peer_address: Option<String>,
}

struct Registered {
    id: u64,
    info: SessionInfo,
    poke: Arc<Notify>,
    superseded: Arc<Notify>,
    queries: mpsc::Sender<Query>,
}

/// A request to an agent and where its answer goes.
type Query = (Message, oneshot::Sender<Message>);

/// How long the cloud waits for an agent to answer a query.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// The registry of agent sessions, shared with the reconcilers.
pub struct Hub {
    sessions: Mutex<HashMap<String, Registered>>,
    next_id: AtomicU64,
    started: Instant,
    grace: Duration,
    keepalive: Duration,
    max_agents: usize,
    node_trigger: UnboundedSender<ObjectRef<EdgeNode>>,
}

impl Hub {
    /// A hub accepting at most `max_agents` sessions, giving agents `grace` to reconnect after a start.
    pub fn new(max_agents: usize, grace: Duration, node_trigger: UnboundedSender<ObjectRef<EdgeNode>>) -> Hub {
        Hub {
            sessions: Mutex::default(),
            next_id: AtomicU64::new(1),
            started: Instant::now(),
            grace,
            keepalive: Duration::from_secs(KEEPALIVE_SECONDS),
            max_agents,
            node_trigger,
        }
    }

    /// Tells the sessions of `nodes` that their desired set may have changed.
    pub fn poke<'a>(&self, nodes: impl IntoIterator<Item = &'a String>) {
        let sessions = self.lock();
        for node in nodes {
            if let Some(s) = sessions.get(node) {
                s.poke.notify_one();
            }
        }
    }

    /// The session of `node`, if its agent is connected.
    pub fn session(&self, node: &str) -> Option<SessionInfo> {
        self.lock().get(node).map(|s| s.info.clone())
    }

    /// Whether the agent of `node` is connected.
    pub fn is_connected(&self, node: &str) -> bool {
        self.lock().contains_key(node)
    }

    /// Number of connected agents.
    pub fn connected(&self) -> usize {
        self.lock().len()
    }

    /// Whether agents have had time to reconnect since this controller started.
    /// Time between keepalives on an idle stream.
    pub fn keepalive(&self) -> Duration {
        self.keepalive
    }

    /// The same hub with keepalives every `keepalive` on idle streams (a stream silent
    /// for three keepalives is dead, so this also bounds how fast a lost agent is noticed).
    pub fn with_keepalive(mut self, keepalive: Duration) -> Hub {
        self.keepalive = keepalive.max(Duration::from_secs(1));
        self
    }

    /// Whether agents have had time to reconnect since this controller started.
    pub fn grace_over(&self) -> bool {
        self.started.elapsed() >= self.grace
    }

    /// Time left of the reconnect grace (zero once it is over).
    pub fn grace_left(&self) -> Duration {
        self.grace.saturating_sub(self.started.elapsed())
    }

    /// Registers a session for `node`, closing any older one of the same node.
    fn register(&self, node: &str, info: SessionInfo) -> (u64, Arc<Notify>, Arc<Notify>, mpsc::Receiver<Query>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (poke, superseded) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let (queries, incoming) = mpsc::channel(16);
        let registered = Registered { id, info, poke: poke.clone(), superseded: superseded.clone(), queries };
        if let Some(old) = self.lock().insert(node.to_owned(), registered) {
            old.superseded.notify_one();
        }
        self.recount(node);
        (id, poke, superseded, incoming)
    }

    /// Sends `operation` on `resource` with `content` to `node`'s agent and waits for its answer.
    pub async fn query(
        &self,
        node: &str,
        operation: Operation,
        resource: &str,
        content: impl serde::Serialize,
    ) -> Result<Message, String> {
        let sender = self.lock().get(node).map(|s| s.queries.clone());
        let sender = sender.ok_or_else(|| format!("the agent of node {node} is not connected"))?;
        let (reply, answer) = oneshot::channel();
        let message = Message::new(String::new(), Timestamp::now().as_millisecond(), operation, resource, content);
        sender.send((message, reply)).await.map_err(|_| format!("the session of node {node} ended"))?;
        match tokio::time::timeout(QUERY_TIMEOUT, answer).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(format!("the session of node {node} ended before it answered")),
            Err(_) => Err(format!("node {node} did not answer within {} s", QUERY_TIMEOUT.as_secs())),
        }
    }

    fn unregister(&self, node: &str, id: u64) {
        let mut sessions = self.lock();
        if sessions.get(node).is_some_and(|s| s.id == id) {
            sessions.remove(node);
            drop(sessions);
            self.recount(node);
        }
    }

    fn touch(&self, node: &str, id: u64) {
        if let Some(s) = self.lock().get_mut(node).filter(|s| s.id == id) {
            s.info.last_seen = Timestamp::now();
        }
    }

    /// Asks the EdgeNode controller to refresh the node's status.
    fn recount(&self, node: &str) {
        let _ = self.node_trigger.unbounded_send(ObjectRef::new(node));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Registered>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Accepts agents on `listener` until the process ends.
pub async fn serve(listener: TcpListener, pki: Pki, ctx: Arc<Context>) {
    let acceptor = TlsAcceptor::from(pki.tls.clone());
    let secret: Arc<str> = pki.token_secret.into();
    let handshakes = Arc::new(Semaphore::new(CONCURRENT_HANDSHAKES));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                warn!(error = %e, "cloudhub accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, secret, ctx, handshakes) = (acceptor.clone(), secret.clone(), ctx.clone(), handshakes.clone());
        tokio::spawn(async move {
            let Ok(_permit) = handshakes.acquire_owned().await else { return };
            let node =
                match tokio::time::timeout(Duration::from_secs(10), handshake(acceptor, tcp, &secret, &ctx)).await {
                    Ok(Ok(accepted)) => accepted,
                    Ok(Err(reason)) => {
                        info!(%peer, %reason, "agent connection refused");
                        return;
                    }
                    Err(_) => {
                        debug!(%peer, "agent handshake timed out");
                        return;
                    }
                };
            drop(_permit);
            let (ws, name) = node;
            session::run(ws, name, peer, ctx).await;
        });
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>;

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: tokio::net::TcpStream,
    secret: &str,
    ctx: &Context,
) -> Result<(Ws, String), String> {
    let tls = acceptor.accept(tcp).await.map_err(|e| format!("TLS handshake failed: {e}"))?;
    let mut node = String::new();
    let full = ctx.hub.connected() >= ctx.hub.max_agents;
    // tungstenite's handshake callback fixes this signature, large error type included.
    #[allow(clippy::result_large_err)]
    let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        let refuse = |code: StatusCode, reason: String| {
            let mut r = ErrorResponse::new(Some(reason));
            *r.status_mut() = code;
            r
        };
        if req.uri().path() != CONNECT_PATH {
            return Err(refuse(StatusCode::NOT_FOUND, format!("the agent endpoint is {CONNECT_PATH}")));
        }
        let name = req.headers().get(NODE_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default();
        if !valid_node_name(name) {
            return Err(refuse(
                StatusCode::BAD_REQUEST,
                format!("header {NODE_HEADER} must name the node (a DNS-1123 name)"),
            ));
        }
        let bearer =
            req.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if !bearer.is_some_and(|b| token_matches(b, secret)) {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                format!(
                    "bootstrap token rejected for node {name}: its secret does not match the cluster's; \
                     use the joinToken of Secret supermesh-bootstrap-token"
                ),
            ));
        }
        if full {
            let mut r = refuse(StatusCode::SERVICE_UNAVAILABLE, "cloudhub is at its agent limit".into());
            let wait = rand::rng().random_range(5..60).to_string();
            r.headers_mut().insert("retry-after", wait.parse().expect("digits are a valid header"));
            return Err(r);
        }
        node = name.to_owned();
        Ok(resp)
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(2 * MAX_MESSAGE_BYTES))
        .max_frame_size(Some(2 * MAX_MESSAGE_BYTES));
    let ws = tokio_tungstenite::accept_hdr_async_with_config(tls, check, Some(config))
        .await
        .map_err(|e| format!("WebSocket upgrade refused: {e}"))?;
    Ok((ws, node))
}

/// Whether `name` is a valid EdgeNode name (DNS-1123 subdomain).
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
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
