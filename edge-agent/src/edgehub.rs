//! edgehub: the agent's one stream to the cloudhub. Enrolls the node once with its
//! join token, then connects over mutual TLS with the node's certificate to a cloud
//! whose CA matches the pinned fingerprint, says hello with the versions the
//! metamanager holds, passes messages both ways, keeps the stream alive, renews the
//! certificate before it expires and reconnects with jittered exponential backoff
//! (no reconnect storms).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures::{SinkExt, StreamExt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use supermesh_protocol::identity::{
    EnrollRequest, IdentityAnswer, Issued, RenewRequest, ENROLL_PATH, RENEW_PATH, REVOKED_CLOSE_CODE,
};
use supermesh_protocol::names::ca_fingerprint;
use supermesh_protocol::{
    decode, encode, now_ms, Answer, Body, Connection, ConnectionState, ErrorCode, ErrorContent, Hello, LogChunk,
    LogQuery, Message, ProtocolVersion, Query, ResourceRef, Welcome, CONNECTION_RESOURCE, CONNECT_PATH, MAX_LOG_CHUNK,
    MAX_MESSAGE_BYTES, MICROSERVICE, MOVED_CLOSE_CODE, MOVED_STATUS,
};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as Frame};
use tracing::{debug, error, info, warn};

use crate::config::EdgeConfig;
use crate::identity::{self, Identity, Standing};
use crate::metamanager::store::OutboxEntry;
use crate::metamanager::MetaHandle;
use crate::supernode::Cluster;

/// Reconnect delays: from 1 s doubling up to 60 s, each stretched by a random 0 to 100 %
/// so that agents cut off together do not come back together (no reconnect storms).
const RECONNECT: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_secs(1))
    .with_max_delay(Duration::from_secs(60))
    .with_jitter()
    .without_max_times();
/// Bytes read from the socket at a time: messages are small, and a small buffer keeps
/// an agent (or thousands of simulated ones) light.
const READ_BUFFER: usize = 4 * 1024;

/// The agent's WebSocket over TLS to the cloudhub.
pub type Ws = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// Why a connection attempt or session ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// TCP, TLS or WebSocket failed.
    #[error("cannot reach the cloudhub at {0}: {1}")]
    Unreachable(String, String),
    /// The cloudhub answered the upgrade with an error.
    #[error("the cloudhub refused the connection ({status}): {reason}")]
    Refused {
        /// HTTP status of the refusal.
        status: u16,
        /// The cloudhub's explanation.
        reason: String,
        /// How long the cloudhub asked us to wait.
        retry_after: Option<Duration>,
    },
    /// The stream broke or went silent.
    #[error("the stream to the cloudhub ended: {0}")]
    Lost(String),
    /// Another controller replica serves this node: the cloudhub at this address.
    #[error("another controller replica serves this node, at {0}")]
    Moved(String),
    /// The cloud no longer accepts this node's certificate (revoked, reset or deleted).
    #[error("the cloud cut this node off: {0}")]
    Revoked(String),
    /// The node has no usable certificate and cannot get one now.
    #[error("{0}")]
    Identity(String),
}

/// The device side of the link: where the cloud's changes go and reports come from.
/// The agent's is its SQLite metamanager with its supernode cluster ([`AgentDevice`]);
/// a simulated agent's lives in memory. The edgehub owns the transport either way.
pub trait Device: Send + Sync + 'static {
    /// Versions of the resources the device holds, stated in the hello.
    fn held(&self) -> impl Future<Output = Result<BTreeMap<String, String>, String>> + Send;
    /// A message the edgehub does not answer itself: a change to commit and ack, an answer to
    /// a forwarded query, a query for a held resource. Replies go out through the outbound channel.
    fn receive(&self, msg: Message) -> impl Future<Output = ()> + Send;
    /// Up to `limit` reports of the outbox the cloud has not acknowledged, oldest first.
    fn pending(&self, limit: usize) -> impl Future<Output = Result<Vec<OutboxEntry>, String>> + Send;
    /// The cloud acknowledged the outbox reports `seqs`: they may go.
    fn acked(&self, seqs: &[i64]) -> impl Future<Output = Result<(), String>> + Send;
    /// The link to the cloud went up or down.
    fn connected(&self, connected: bool);
    /// Whether reports go over this link (not through a supernode, nor in its batches).
    fn reports_directly(&self) -> bool;
    /// The cloud's answer to a batch of reports this device sent as its cluster's supernode.
    fn batch_answered(&self, msg: Message, body: Body);
    /// The answer to the cloud's query for the log of instance `resource`.
    fn log(&self, resource: &str, query: &LogQuery) -> Body;
}

/// The agent's device: its metamanager, its cluster and its instances' log files.
pub struct AgentDevice {
    /// The metamanager.
    pub meta: MetaHandle,
    /// The network cluster (supernode election and relay).
    pub cluster: Arc<Cluster>,
    /// The agent's data dir, where instances write their logs.
    pub data_dir: PathBuf,
}

impl Device for AgentDevice {
    async fn held(&self) -> Result<BTreeMap<String, String>, String> {
        self.meta.held_versions().await.map_err(|e| format!("metamanager: {e}"))
    }

    async fn receive(&self, msg: Message) {
        self.meta.from_cloud(msg).await
    }

    async fn pending(&self, limit: usize) -> Result<Vec<OutboxEntry>, String> {
        self.meta.outbox_pending(limit).await.map_err(|e| format!("metamanager: {e}"))
    }

    async fn acked(&self, seqs: &[i64]) -> Result<(), String> {
        self.meta.outbox_acked(seqs).await.map(drop).map_err(|e| format!("metamanager: {e}"))
    }

    fn connected(&self, connected: bool) {
        let state = if connected { ConnectionState::CloudConnected } else { ConnectionState::CloudDisconnected };
        self.meta.set_connection(state);
        self.cluster.set_cloud_connected(connected);
    }

    fn reports_directly(&self) -> bool {
        self.cluster.reports_directly()
    }

    fn batch_answered(&self, msg: Message, body: Body) {
        self.cluster.batch_answered(msg, body)
    }

    fn log(&self, resource: &str, query: &LogQuery) -> Body {
        answer_log_query(&self.data_dir, resource, query)
    }
}

/// Signals between the edgehub and the reporters that fill the outbox.
#[derive(Clone, Default)]
pub struct Signals {
    /// Told when a report was queued in the outbox: send it now if connected.
    pub outbox: Arc<Notify>,
    /// Told after every (re)connect: reporters queue a fresh snapshot.
    pub connected: Arc<Notify>,
}

/// Keeps `device` connected to the cloud `config` names, as the node `identity` holds
/// the certificate of, until the process ends; renews that certificate meanwhile.
pub async fn run<D: Device>(
    config: Arc<EdgeConfig>,
    identity: Arc<Identity>,
    device: Arc<D>,
    mut outbound: mpsc::Receiver<Message>,
    signals: Signals,
) {
    tokio::spawn(renew_in_time(config.clone(), identity.clone()));
    let mut delays = Reconnect::default();
    // The replica the cloud sent this node to, how many redirects in a row led there, and
    // how many such replicas in a row could not be reached.
    let (mut moved_to, mut hops, mut detours) = (None::<String>, 0, 0);
    loop {
        let redirected = moved_to.is_some();
        let address = moved_to.take().unwrap_or_else(|| config.cloud.address.clone());
        let attempt = async {
            certified(&config, &identity, &address).await?;
            connect(&address, &identity).await
        };
        let wait = match attempt.await {
            Ok(ws) => {
                device.connected(true);
                let ended = Session::new(ws, &config, &address, &*device, &signals).run(&mut outbound).await;
                device.connected(false);
                delays = Reconnect::default();
                (hops, detours) = (0, 0);
                match ended {
                    LinkError::Revoked(reason) => {
                        error!(%reason, "the cloud cut this node off; its instances keep running");
                        delays.next()
                    }
                    LinkError::Moved(to) => {
                        info!(from = %address, to = %to, "the cloud handed this node to another replica");
                        moved_to = Some(to);
                        Duration::ZERO
                    }
                    ended => {
                        warn!(reason = %ended, "disconnected from the cloud; instances keep running");
                        delays.next()
                    }
                }
            }
            // Replicas that disagree for a moment must not bounce a node forever: after a few
            // redirects in a row it backs off and starts again from its configured address.
            Err(LinkError::Moved(to)) if hops < MAX_REDIRECTS => {
                debug!(from = %address, to = %to, "redirected to the replica that serves this node");
                hops += 1;
                moved_to = Some(to);
                Duration::ZERO
            }
            Err(LinkError::Refused { status, reason, retry_after }) => {
                error!(status, %reason, "the cloud refused this node");
                let next = delays.next();
                retry_after.unwrap_or(next)
            }
            Err(LinkError::Identity(reason)) => {
                error!(%reason, "this node has no usable certificate");
                delays.next()
            }
            // The replica it was sent to is gone, and the others will know within seconds:
            // ask them again soon instead of backing off further each time.
            Err(e) if redirected && detours < MAX_DETOURS => {
                debug!(error = %e, "the replica this node was sent to is unreachable; asking again");
                (hops, detours) = (0, detours + 1);
                Duration::from_millis(rand::random_range(500..1500))
            }
            Err(e) => {
                hops = 0;
                let next = delays.next();
                warn!(error = %e, attempt = delays.attempts, "cannot connect to the cloud");
                next
            }
        };
        // While offline, answers meant for the cloud are moot: the cloud resends what it misses.
        let until = tokio::time::Instant::now() + wait;
        while let Ok(Some(dropped)) = tokio::time::timeout_at(until, outbound.recv()).await {
            debug!(operation = ?dropped.operation, resource = %dropped.resource, "offline: not sent");
        }
    }
}

/// Opens a stream to the cloudhub as `config` says, as the node `identity` holds (enrolling
/// it first if needed), without saying hello.
pub async fn dial(config: &EdgeConfig, identity: &Identity) -> Result<Ws, LinkError> {
    certified(config, identity, &config.cloud.address).await?;
    connect(&config.cloud.address, identity).await
}

/// Makes sure the node holds a certificate it may connect with: enrolls it with the join
/// token if it has none, renews it if it expired (the cloud allows that within its grace).
pub async fn certified(config: &EdgeConfig, identity: &Identity, address: &str) -> Result<(), LinkError> {
    match identity.standing() {
        Standing::Valid { .. } => Ok(()),
        Standing::Expired => {
            info!("the node certificate expired while offline; renewing it");
            renew(config, identity, address).await
        }
        Standing::Missing => enroll(config, identity, address).await,
    }
}

/// Enrolls the node with the join token: a CSR for its key, a certificate back.
async fn enroll(config: &EdgeConfig, identity: &Identity, address: &str) -> Result<(), LinkError> {
    let Some(token) = &config.cloud.token else {
        return Err(LinkError::Identity(crate::identity::IdentityError::NotEnrolled.to_string()));
    };
    let node = &config.node;
    let request = EnrollRequest {
        node: node.name.clone(),
        account: node.account.clone(),
        network: node.network.clone(),
        location: node.location,
        supernode_eligible: node.supernode_eligible,
        csr: identity.csr(&node.name).map_err(LinkError::Identity)?,
    };
    let bearer = token.0.token.to_string();
    let issued = exchange(address, ENROLL_PATH, Some(&bearer), identity, &request).await?;
    identity.store(&issued).map_err(|e| LinkError::Identity(e.to_string()))?;
    info!(
        node = %node.name,
        "enrolled: the node holds its certificate; the join token in edge.yaml (cloud.token) is not needed any more"
    );
    if !issued.approved {
        warn!(node = %node.name, "the node awaits approval and is sent nothing until `supermeshctl node approve {}`", node.name);
    }
    Ok(())
}

/// Renews the node's certificate, presenting it (valid, or expired within the cloud's grace).
async fn renew(config: &EdgeConfig, identity: &Identity, address: &str) -> Result<(), LinkError> {
    let request = RenewRequest { csr: identity.csr(&config.node.name).map_err(LinkError::Identity)? };
    let issued = exchange(address, RENEW_PATH, None, identity, &request).await?;
    identity.store(&issued).map_err(|e| LinkError::Identity(e.to_string()))?;
    info!(valid_until = issued.not_after, "renewed the node certificate");
    Ok(())
}

/// Renews the node's certificate at 70 to 90 % of its lifetime, again and again.
async fn renew_in_time(config: Arc<EdgeConfig>, identity: Arc<Identity>) {
    let mut retry = Duration::from_secs(5);
    loop {
        let wait = match identity.standing() {
            Standing::Valid { renew_at } => identity::until(renew_at),
            // The connection loop enrolls or renews it before it connects.
            Standing::Missing | Standing::Expired => Duration::from_secs(5),
        };
        tokio::time::sleep(wait).await;
        if !matches!(identity.standing(), Standing::Valid { renew_at } if identity::until(renew_at).is_zero()) {
            continue;
        }
        match renew(&config, &identity, &config.cloud.address).await {
            Ok(()) => retry = Duration::from_secs(5),
            Err(e) => {
                warn!(error = %e, retry_in = ?retry, "cannot renew the node certificate yet");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(Duration::from_secs(300));
            }
        }
    }
}

/// One enrollment or renewal: `request` to `path`, the certificate back.
async fn exchange(
    address: &str,
    path: &str,
    bearer: Option<&str>,
    identity: &Identity,
    request: &impl serde::Serialize,
) -> Result<Issued, LinkError> {
    let lost = |e: &dyn std::fmt::Display| LinkError::Lost(format!("{path}: {e}"));
    let mut ws = open(address, path, bearer, identity).await?;
    let text = serde_json::to_string(request).map_err(|e| lost(&e))?;
    ws.send(Frame::text(text)).await.map_err(|e| lost(&e))?;
    let answer = tokio::time::timeout(Duration::from_secs(30), ws.next())
        .await
        .map_err(|_| lost(&"no answer within 30 s"))?
        .ok_or_else(|| lost(&"closed without an answer"))?
        .map_err(|e| lost(&e))?;
    let _ = ws.close(None).await;
    let answer: IdentityAnswer =
        serde_json::from_str(&answer.into_text().map_err(|e| lost(&e))?).map_err(|e| lost(&e))?;
    match answer {
        IdentityAnswer::Issued(issued) => Ok(issued),
        IdentityAnswer::Refused { status, reason } => Err(LinkError::Refused { status, reason, retry_after: None }),
    }
}

/// The hello an agent with `config` sends on connect: who it is, and the versions it holds.
pub fn hello(config: &EdgeConfig, held: BTreeMap<String, String>) -> Hello {
    let node = &config.node;
    Hello {
        node: node.name.clone(),
        account: node.account.clone(),
        network: node.network.clone(),
        location: node.location,
        supernode_eligible: node.supernode_eligible,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        os: std::env::consts::OS.into(),
        arch: std::env::consts::ARCH.into(),
        held,
        peer_address: Some(
            config.supernode.advertise.clone().unwrap_or_else(|| format!(":{}", config.supernode.listen.port())),
        ),
        protocol: ProtocolVersion::CURRENT,
        capacity: Some(crate::supernode::election::local_capacity()),
    }
}

/// Answers a log query from the instance's current log file (edged writes it; reading needs no runtime).
fn answer_log_query(data_dir: &std::path::Path, resource: &str, query: &LogQuery) -> Body {
    match ResourceRef::parse(resource) {
        Ok(r) => {
            let key = ResourceRef::string(r.namespace, MICROSERVICE, r.id.unwrap_or_default());
            let path = crate::edged::process::InstanceDir::new(data_dir, &key).log();
            match read_log(&path, query) {
                Ok(chunk) => Body::Response(Answer::Log(chunk)),
                Err(e) => {
                    Body::Error(ErrorContent::new(ErrorCode::NotFound, format!("no log for {key} on this node: {e}")))
                }
            }
        }
        Err(e) => Body::Error(ErrorContent::new(ErrorCode::BadMessage, e.to_string())),
    }
}

/// Reads what `query` asks of the log at `path`: bytes from an offset, or the last lines.
pub fn read_log(path: &std::path::Path, query: &LogQuery) -> std::io::Result<LogChunk> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    // After a rotation the file is shorter than the offset: start again from its beginning.
    let from = match query.offset {
        Some(offset) if offset <= len => offset,
        Some(_) => 0,
        None => len.saturating_sub(MAX_LOG_CHUNK),
    };
    file.seek(SeekFrom::Start(from))?;
    let mut bytes = Vec::new();
    file.take(MAX_LOG_CHUNK).read_to_end(&mut bytes)?;
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    if let (None, Some(tail)) = (query.offset, query.tail) {
        let lines: Vec<&str> = text.lines().collect();
        let keep = lines.len().saturating_sub(tail as usize);
        text = lines[keep..].iter().map(|l| format!("{l}\n")).collect();
    }
    Ok(LogChunk { text, offset: from + bytes.len() as u64 })
}

/// The delays between reconnect attempts since the last session ended.
struct Reconnect {
    delays: ExponentialBackoff,
    attempts: u32,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect { delays: RECONNECT.build(), attempts: 0 }
    }
}

impl Reconnect {
    fn next(&mut self) -> Duration {
        self.attempts += 1;
        self.delays.next().unwrap_or(Duration::from_secs(60))
    }
}

/// Opens the node's stream to the cloudhub at `address`, presenting its certificate if it holds one.
pub async fn connect(address: &str, identity: &Identity) -> Result<Ws, LinkError> {
    open(address, CONNECT_PATH, None, identity).await
}

/// Opens a WebSocket to `path` of the cloudhub at `address`: TLS pinned to the cloud's CA,
/// with the node's certificate if it holds one, and `bearer` as the authorization.
async fn open(address: &str, path: &str, bearer: Option<&str>, identity: &Identity) -> Result<Ws, LinkError> {
    let unreachable = |e: &dyn std::fmt::Display| LinkError::Unreachable(address.to_owned(), e.to_string());
    let connector = connector(identity).map_err(|e| unreachable(&e))?;
    let host = supermesh_protocol::names::host_of(address).unwrap_or(address);
    let server_name = ServerName::try_from(host.to_owned()).map_err(|e| unreachable(&e))?;
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(address))
        .await
        .map_err(|_| unreachable(&"timed out"))?
        .map_err(|e| unreachable(&e))?;
    let tls = connector.connect(server_name, tcp).await.map_err(|e| unreachable(&e))?;
    let mut request = format!("wss://{address}{path}").into_client_request().map_err(|e| unreachable(&e))?;
    if let Some(bearer) = bearer {
        let value = format!("Bearer {bearer}").parse().map_err(|e| unreachable(&e))?;
        request.headers_mut().insert("authorization", value);
    }
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(2 * MAX_MESSAGE_BYTES))
        .max_frame_size(Some(2 * MAX_MESSAGE_BYTES));
    match tokio_tungstenite::client_async_with_config(request, tls, Some(ws_config)).await {
        Ok((ws, _)) => Ok(ws),
        Err(WsError::Http(response)) if response.status().as_u16() == MOVED_STATUS => {
            let location = response.headers().get("location").and_then(|v| v.to_str().ok()).unwrap_or_default();
            match supermesh_protocol::moved_address(location) {
                Some(to) => Err(LinkError::Moved(to.to_owned())),
                None => Err(unreachable(&format!("a redirect to {location:?}, which names no cloudhub"))),
            }
        }
        Err(WsError::Http(response)) => {
            let reason = response.body().as_ref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse().ok())
                .map(Duration::from_secs);
            Err(LinkError::Refused { status: response.status().as_u16(), reason, retry_after })
        }
        Err(e) => Err(unreachable(&e)),
    }
}

/// Outbox entries sent per flush; the rest follow as acks arrive.
const OUTBOX_WINDOW: usize = 64;
/// Prefix of the ids of outbox messages, followed by the entry's seq.
const OUTBOX_ID: &str = "o-";
/// Prefix of the ids of a supernode's report batches.
const BATCH_ID: &str = "b-";

/// Redirects followed in a row before the agent backs off.
const MAX_REDIRECTS: u32 = 3;
/// Unreachable replicas it was sent to, in a row, before the agent backs off: replicas
/// notice one gone within seconds (see the controller's `replicas`).
const MAX_DETOURS: u32 = 15;

/// How often the agent speaks on an idle stream, and how long it waits for a word from the cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time after which the agent sends a keepalive.
    pub every: Duration,
    /// Silence of the cloud after which the agent gives the stream up: three keepalives.
    pub silence: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive { every: Duration::from_secs(15), silence: Duration::from_secs(45) }
    }
}

/// Longest keepalive interval taken from a welcome: an hour.
const MAX_KEEPALIVE_SECONDS: u64 = 3_600;

impl Keepalive {
    /// What the cloud's welcome asks for, within 1 s to [`MAX_KEEPALIVE_SECONDS`].
    pub fn of(welcome: &Welcome) -> Keepalive {
        let every = Duration::from_secs(welcome.keepalive_seconds.clamp(1, MAX_KEEPALIVE_SECONDS));
        Keepalive { every, silence: 3 * every }
    }
}

/// One connected session.
struct Session<'a, D> {
    ws: Ws,
    config: &'a EdgeConfig,
    /// The cloudhub it is connected to.
    address: &'a str,
    device: &'a D,
    signals: &'a Signals,
    /// Outbox entries sent and not yet acknowledged, by seq.
    unacked: BTreeSet<i64>,
    keepalive: Keepalive,
    last_heard: Instant,
    last_sent: Instant,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl<'a, D: Device> Session<'a, D> {
    fn new(ws: Ws, config: &'a EdgeConfig, address: &'a str, device: &'a D, signals: &'a Signals) -> Self {
        Session {
            ws,
            config,
            address,
            device,
            signals,
            unacked: BTreeSet::new(),
            keepalive: Keepalive::default(),
            last_heard: Instant::now(),
            last_sent: Instant::now(),
        }
    }

    async fn run(mut self, outbound: &mut mpsc::Receiver<Message>) -> LinkError {
        if let Err(e) = self.hello().await {
            return e;
        }
        self.signals.connected.notify_one();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = self.signals.outbox.notified() => {
                    if let Err(e) = self.flush_outbox().await { return e; }
                }
                frame = self.ws.next() => match frame {
                    Some(Ok(Frame::Text(text))) => {
                        self.last_heard = Instant::now();
                        if let Err(e) = self.receive(&text).await { return e; }
                    }
                    Some(Ok(Frame::Close(Some(close)))) if u16::from(close.code) == MOVED_CLOSE_CODE => {
                        return LinkError::Moved(close.reason.to_string());
                    }
                    Some(Ok(Frame::Close(Some(close)))) if u16::from(close.code) == REVOKED_CLOSE_CODE => {
                        return LinkError::Revoked(close.reason.to_string());
                    }
                    Some(Ok(Frame::Close(_))) | None => return LinkError::Lost("closed by the cloud".into()),
                    Some(Ok(_)) => self.last_heard = Instant::now(),
                    Some(Err(e)) => return LinkError::Lost(e.to_string()),
                },
                Some(msg) = outbound.recv() => {
                    if let Err(e) = self.send(&msg).await { return e; }
                }
                _ = tick.tick() => {
                    if self.last_heard.elapsed() > self.keepalive.silence {
                        return LinkError::Lost(format!("no word from the cloud for {} s", self.keepalive.silence.as_secs()));
                    }
                    if let Err(e) = self.flush_outbox().await { return e; }
                    if self.last_sent.elapsed() >= self.keepalive.every {
                        let ping = message(CONNECTION_RESOURCE, &Body::Keepalive);
                        if let Err(e) = self.send(&ping).await { return e; }
                    }
                }
            }
        }
    }

    async fn hello(&mut self) -> Result<(), LinkError> {
        let held = self.device.held().await.map_err(LinkError::Lost)?;
        let hello = hello(self.config, held);
        let held = hello.held.len();
        let hello = Body::NodeConnection(Connection::Hello(Box::new(hello)));
        self.send(&message(CONNECTION_RESOURCE, &hello)).await?;
        let reply = tokio::time::timeout(Duration::from_secs(15), self.ws.next())
            .await
            .map_err(|_| LinkError::Lost("no welcome from the cloud within 15 s".into()))?
            .ok_or_else(|| LinkError::Lost("closed before the welcome".into()))?
            .map_err(|e| LinkError::Lost(e.to_string()))?;
        let text = reply.into_text().map_err(|e| LinkError::Lost(e.to_string()))?;
        let body = decode(&text).and_then(|m| m.body()).map_err(|e| LinkError::Lost(e.to_string()))?;
        let welcome = match body {
            Body::NodeConnection(Connection::Welcome(welcome)) => welcome,
            Body::Error(refusal) => {
                return Err(LinkError::Refused { status: 0, reason: refusal.message, retry_after: None })
            }
            other => {
                return Err(LinkError::Lost(format!("the cloud answered the hello with a {:?}", other.operation())))
            }
        };
        self.keepalive = Keepalive::of(&welcome);
        self.last_heard = Instant::now();
        info!(cloud = %self.address, held, protocol = %welcome.protocol, "connected to the cloud");
        Ok(())
    }

    async fn receive(&mut self, text: &str) -> Result<(), LinkError> {
        let decoded = decode(text).and_then(|m| m.body().map(|body| (m, body)));
        let (msg, body) = match decoded {
            Ok(decoded) => decoded,
            Err(e) => {
                warn!(error = %e, "invalid message from the cloud");
                let refusal = Body::Error(ErrorContent::new(ErrorCode::BadMessage, e.to_string()));
                let mut reply = message(CONNECTION_RESOURCE, &refusal);
                reply.parent_id = decode(text).ok().map(|m| m.id);
                return self.send(&reply).await;
            }
        };
        if let Some(seq) = msg.parent_id.as_deref().and_then(|p| p.strip_prefix(OUTBOX_ID)?.parse::<i64>().ok()) {
            return self.outbox_answered(seq, &body).await;
        }
        if msg.parent_id.as_deref().is_some_and(|p| p.starts_with(BATCH_ID)) {
            self.device.batch_answered(msg, body);
            return Ok(());
        }
        match body {
            Body::Query(Query::Log(query)) => {
                let reply = message(&msg.resource, &self.device.log(&msg.resource, &query)).answering(&msg.id);
                self.send(&reply).await
            }
            Body::Keepalive | Body::NodeConnection(_) => Ok(()),
            Body::Error(refusal) if msg.parent_id.is_none() => {
                warn!(reason = %refusal.message, "the cloud reported an error");
                Ok(())
            }
            _ => {
                self.device.receive(msg).await;
                Ok(())
            }
        }
    }

    /// Sends outbox entries not yet in flight, oldest first, up to the window.
    async fn flush_outbox(&mut self) -> Result<(), LinkError> {
        // Through a supernode, or as one, reports go in batches instead (see `supernode`).
        if self.unacked.len() >= OUTBOX_WINDOW || !self.device.reports_directly() {
            return Ok(());
        }
        let mut pending = self.device.pending(OUTBOX_WINDOW).await.map_err(LinkError::Lost)?;
        pending.retain(|e| !self.unacked.contains(&e.seq));
        for entry in pending {
            let content: serde_json::Value = serde_json::from_str(&entry.content).unwrap_or(serde_json::Value::Null);
            let mut msg = Message::new(String::new(), now_ms(), entry.operation, &entry.resource, content);
            msg.id = format!("{OUTBOX_ID}{}", entry.seq);
            msg.timestamp = entry.created_ms;
            self.send(&msg).await?;
            self.unacked.insert(entry.seq);
        }
        Ok(())
    }

    /// The cloud's answer to an outbox entry: an ack deletes it, a refusal leaves it for later.
    async fn outbox_answered(&mut self, seq: i64, body: &Body) -> Result<(), LinkError> {
        self.unacked.remove(&seq);
        match body {
            Body::Response(_) => self.device.acked(&[seq]).await.map_err(LinkError::Lost)?,
            // Refused for good (not this node's to make, stamped in the future): sending it again changes nothing.
            Body::Error(refusal) if refusal.code == ErrorCode::Forbidden => {
                warn!(seq, reason = %refusal.message, "the cloud refused a report for good; it leaves the outbox");
                self.device.acked(&[seq]).await.map_err(LinkError::Lost)?
            }
            Body::Error(refusal) => {
                warn!(seq, reason = %refusal.message, "the cloud refused a report; it stays in the outbox")
            }
            other => warn!(seq, operation = ?other.operation(), "the cloud answered a report with nonsense"),
        }
        Ok(())
    }

    async fn send(&mut self, msg: &Message) -> Result<(), LinkError> {
        let text = encode(msg).map_err(|e| LinkError::Lost(e.to_string()))?;
        self.ws.send(Frame::text(text)).await.map_err(|e| LinkError::Lost(e.to_string()))?;
        self.last_sent = Instant::now();
        Ok(())
    }
}

fn message(resource: &str, body: &Body) -> Message {
    Message::with_body(format!("h{}", NEXT_ID.fetch_add(1, Ordering::Relaxed)), now_ms(), resource, body)
}

/// TLS that trusts only a server whose chain includes the CA with `fingerprint`.
fn connector(identity: &Identity) -> Result<TlsConnector, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedCa { fingerprint: identity.ca_hash(), provider: provider.clone() });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match identity.client_auth() {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key)?,
        None => builder.with_no_client_auth(),
    };
    Ok(TlsConnector::from(Arc::new(config)))
}

/// Verifies the server against the one CA the join token pins, found in the presented chain.
#[derive(Debug)]
struct PinnedCa {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates.iter().find(|c| ca_fingerprint(c) == self.fingerprint).ok_or_else(|| {
            rustls::Error::General("the cloud's CA does not match the fingerprint in the join token".into())
        })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let webpki =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        webpki.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_welcome_s_keepalive_is_bounded() {
        // Reproduced with the cloud_message fuzz target: a keepalive of u64::MAX seconds made the
        // session panic tripling it.
        let welcome = |keepalive_seconds| Welcome { keepalive_seconds, pending: 0, protocol: ProtocolVersion::CURRENT };
        let most = Keepalive::of(&welcome(u64::MAX));
        assert_eq!(most.every, Duration::from_secs(MAX_KEEPALIVE_SECONDS));
        assert_eq!(most.silence, 3 * most.every);
        assert_eq!(Keepalive::of(&welcome(0)).every, Duration::from_secs(1));
        assert_eq!(Keepalive::of(&welcome(15)), Keepalive::default());
    }

    #[test]
    fn reconnect_delays_grow_are_capped_and_jittered() {
        let mut delays = Reconnect::default();
        let mut base = Duration::from_secs(1);
        for attempt in 1..=20 {
            let d = delays.next();
            assert!(d >= base && d < base * 2, "attempt {attempt}: {d:?} not in [{base:?}, {:?})", base * 2);
            base = (base * 2).min(Duration::from_secs(60));
        }
        assert_eq!(delays.attempts, 20);
        let samples: std::collections::BTreeSet<Duration> = (0..20).map(|_| Reconnect::default().next()).collect();
        assert!(samples.len() > 10, "agents cut off together come back spread out: {samples:?}");
    }
}
