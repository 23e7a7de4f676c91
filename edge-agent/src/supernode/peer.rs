//! The cluster's network side: heartbeats over UDP, and HTTP over mutual TLS between
//! members and their supernode (reports in, receipts out, registry).
//!
//! A datagram counts only with the cluster key's HMAC and its sender's signature (see
//! [`Cluster::heard`]). A peer connection counts only when the TLS handshake shows a
//! member's certificate with the key the membership gives ([`super::tls`]); at most
//! [`MAX_CONNECTIONS`] are served at once, more are closed as they come. A request is
//! refused before its body is read when it has no length, a length beyond its path's
//! limit, or no cluster key HMAC; every refusal is counted by [`PeerRefusal`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Router};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Serialize;
use supermesh_protocol::peer::{
    max_body, sign, verify, AckPost, PeerRefusal, Registry, ReportPost, SignedHeartbeat, SignedRegistry, ACKS_PATH,
    MAX_BODY, MAX_DATAGRAM, MULTICAST_GROUP, REGISTRY_PATH, REPORTS_PATH, SIGNATURE_HEADER,
};
use supermesh_protocol::{
    now_ms, Answer as CloudAnswer, BatchAck, Body, Message, RelayedReport, Report, StatusReport, BATCH_RESOURCE,
    STATUS_RESOURCE,
};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::tls::{self, PeerCert};
use super::{Cluster, Route};

/// Reports sent to the supernode in one request, and upstream in one batch, at most.
const MAX_ENTRIES: usize = 512;
/// Bytes of reports upstream in one batch, about.
const MAX_BATCH_BYTES: usize = 512 * 1024;
/// How long a peer request may take, TLS handshake included.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a peer connection may take on the serving side, from accept to answer.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Peer connections served at once; more are closed as they come.
pub const MAX_CONNECTIONS: usize = 32;
/// Largest answer read from a peer, in bytes.
const MAX_ANSWER: usize = 8 * 1024 * 1024;
/// How long the cloud has to answer a batch.
const BATCH_TIMEOUT: Duration = Duration::from_secs(30);

/// Changes arriving at a supernode within this window go upstream in one batch.
const COALESCE: Duration = Duration::from_secs(1);
/// How often per heartbeat interval silent peers are looked for.
const CHECKS_PER_HEARTBEAT: u32 = 4;

static NEXT_BATCH: AtomicU64 = AtomicU64::new(1);

/// Sends a heartbeat every interval until the process ends.
pub(super) async fn heartbeats(cluster: Arc<Cluster>, udp: Arc<UdpSocket>) {
    // Liveness is checked four times per heartbeat, so a silent peer is noticed promptly.
    let mut tick = tokio::time::interval(cluster.heartbeat() / CHECKS_PER_HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut checks = 0u32;
    let mut unsigned_logged = false;
    let multicast = cluster.config.supernode.multicast.then(|| {
        let group: std::net::Ipv4Addr = MULTICAST_GROUP.parse().expect("a valid group");
        SocketAddr::from((group, cluster.config.supernode.listen.port()))
    });
    loop {
        tick.tick().await;
        cluster.elect();
        checks += 1;
        if checks % CHECKS_PER_HEARTBEAT != 1 {
            continue;
        }
        let (Some((heartbeat, targets)), Some(key)) = (cluster.beat(), cluster.key()) else { continue };
        let Some(datagram) = SignedHeartbeat::encode(&heartbeat, &key, |p, b| cluster.identity.sign(p, b)) else {
            if !std::mem::replace(&mut unsigned_logged, true) {
                warn!("the node key cannot sign heartbeats (not an ECDSA or Ed25519 key); this node takes no part in its cluster");
            }
            continue;
        };
        let mut addresses: Vec<SocketAddr> = multicast.into_iter().collect();
        for target in targets {
            match tokio::net::lookup_host(&target).await {
                Ok(found) => addresses.extend(found.take(1)),
                Err(e) => debug!(%target, error = %e, "cannot resolve a peer"),
            }
        }
        for address in addresses {
            if let Err(e) = udp.send_to(&datagram, address).await {
                debug!(%address, error = %e, "heartbeat not sent");
            }
        }
    }
}

/// Takes heartbeats until the process ends; see [`Cluster::heard`].
pub(super) async fn receive(cluster: Arc<Cluster>, udp: Arc<UdpSocket>) {
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    loop {
        match udp.recv_from(&mut buf).await {
            Ok((len, from)) => cluster.heard(&buf[..len], from),
            Err(e) => {
                warn!(error = %e, "heartbeat socket failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// The member a peer connection comes from, as its certificate proved in the handshake.
#[derive(Clone)]
struct Caller(String);

/// Serves the peer HTTP API over mutual TLS on `tcp` until the process ends.
pub async fn serve(cluster: Arc<Cluster>, tcp: tokio::net::TcpListener) {
    let app = Router::new()
        .route(REPORTS_PATH, post(take_reports))
        .route(ACKS_PATH, post(take_receipt))
        .route(REGISTRY_PATH, post(give_registry))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(cluster.clone(), admit))
        .with_state(cluster.clone());
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // The acceptor for the certificate held when it was made: a renewal makes a new one.
    let mut acceptor: Option<(Vec<u8>, TlsAcceptor)> = None;
    loop {
        let (stream, from) = match tcp.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                warn!(error = %e, "the peer service cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Closed as it came, unread: a flood holds no more than the slots.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            cluster.refused(PeerRefusal::Busy);
            debug!(%from, limit = MAX_CONNECTIONS, "too many peer connections at once; closed");
            continue;
        };
        let Some(tls) = current_acceptor(&cluster, &mut acceptor) else {
            cluster.refused(PeerRefusal::Handshake);
            continue;
        };
        let (cluster, app) = (cluster.clone(), app.clone());
        tokio::spawn(async move {
            let served = tokio::time::timeout(CONNECTION_TIMEOUT, serve_connection(&cluster, tls, stream, from, app));
            if served.await.is_err() {
                debug!(%from, "a peer connection took too long; closed");
            }
            drop(slot);
        });
    }
}

/// The TLS acceptor for the certificate the node holds now, made anew when it changed.
fn current_acceptor(cluster: &Arc<Cluster>, cached: &mut Option<(Vec<u8>, TlsAcceptor)>) -> Option<TlsAcceptor> {
    let (chain, _) = cluster.identity.client_auth()?;
    let der = chain.first()?.to_vec();
    if let Some((held, acceptor)) = cached {
        if *held == der {
            return Some(acceptor.clone());
        }
    }
    let members: tls::Members = {
        let cluster = Arc::downgrade(cluster);
        Arc::new(move |cert: &PeerCert| cluster.upgrade().is_some_and(|c| c.is_member(cert)))
    };
    match tls::acceptor(&cluster.identity, members) {
        Ok(acceptor) => {
            *cached = Some((der, acceptor.clone()));
            Some(acceptor)
        }
        Err(e) => {
            warn!(error = %e, "the peer service cannot serve TLS");
            None
        }
    }
}

/// One peer connection: the TLS handshake (a member's certificate or nothing), then one request.
async fn serve_connection(cluster: &Cluster, acceptor: TlsAcceptor, stream: TcpStream, from: SocketAddr, app: Router) {
    let tls = match tokio::time::timeout(PEER_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            cluster.refused(PeerRefusal::Handshake);
            debug!(%from, error = %e, "peer connection refused in its TLS handshake");
            return;
        }
        Err(_) => {
            cluster.refused(PeerRefusal::Handshake);
            debug!(%from, "peer connection closed: no TLS handshake in time");
            return;
        }
    };
    // The verifier took the certificate: it names a member.
    let Some(peer) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(|c| tls::read_cert(c).ok())
    else {
        return;
    };
    let app = app.layer(Extension(Caller(peer.node)));
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(PEER_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
        .await;
    if let Err(e) = served {
        debug!(%from, error = %e, "peer connection failed");
    }
}

type Reply = (StatusCode, String);

fn reply(status: StatusCode, body: impl Serialize) -> Reply {
    (status, serde_json::to_string(&body).unwrap_or_default())
}

fn refuse(status: StatusCode, error: impl std::fmt::Display) -> Reply {
    reply(status, serde_json::json!({"error": error.to_string()}))
}

/// Refuses a request before its body is read: without a length, longer than its path
/// allows, or without a cluster key HMAC.
async fn admit(State(cluster): State<Arc<Cluster>>, request: Request, next: Next) -> Response {
    let Some(limit) = max_body(request.uri().path()) else {
        return refuse(StatusCode::NOT_FOUND, "the peer paths are /peer/v1/reports, acks and registry").into_response();
    };
    let length = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let refusal = match length {
        None => Some((PeerRefusal::TooBig, StatusCode::LENGTH_REQUIRED, "a peer request states its length".into())),
        Some(n) if n > limit as u64 => Some((
            PeerRefusal::TooBig,
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a body of {n} bytes; at most {limit} are taken on this path"),
        )),
        Some(_) if request.headers().get(SIGNATURE_HEADER).is_none_or(|v| v.len() != 64) => Some((
            PeerRefusal::Unsigned,
            StatusCode::UNAUTHORIZED,
            format!("no {SIGNATURE_HEADER}: the body's HMAC under the cluster key"),
        )),
        Some(_) => None,
    };
    match refusal {
        Some((why, status, message)) => {
            cluster.refused(why);
            refuse(status, message).into_response()
        }
        None => next.run(request).await,
    }
}

/// Checks a request body's HMAC under the cluster key (or the one before its last rotation).
fn authenticate(cluster: &Cluster, headers: &HeaderMap, body: &[u8]) -> Result<(), Reply> {
    let keys = cluster.keys();
    if keys.is_empty() {
        return Err(refuse(StatusCode::SERVICE_UNAVAILABLE, "this node is in no cluster yet"));
    }
    let signature = headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !keys.iter().any(|key| verify(key, body, signature)) {
        cluster.refused(PeerRefusal::Unsigned);
        return Err(refuse(StatusCode::UNAUTHORIZED, "bad signature: not made with this cluster's key"));
    }
    Ok(())
}

/// A member's reports, taken by the supernode for its next batch.
async fn take_reports(
    State(cluster): State<Arc<Cluster>>,
    Extension(Caller(from)): Extension<Caller>,
    headers: HeaderMap,
    body: Bytes,
) -> Reply {
    if let Err(r) = authenticate(&cluster, &headers, &body) {
        return r;
    }
    let post: ReportPost = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("malformed reports: {e}")),
    };
    if post.from != from || post.entries.iter().any(|e| e.node != from) || post.entries.len() > MAX_ENTRIES {
        return refuse(StatusCode::BAD_REQUEST, format!("a member sends at most {MAX_ENTRIES} of its own reports"));
    }
    if cluster.route() != Route::Upstream {
        let supernode = cluster.state().supernode.clone();
        return reply(StatusCode::CONFLICT, serde_json::json!({"error": "not the supernode", "supernode": supernode}));
    }
    match cluster.queue(post.entries) {
        Ok(taken) => reply(StatusCode::ACCEPTED, serde_json::json!({"accepted": taken})),
        Err(full) => refuse(StatusCode::SERVICE_UNAVAILABLE, full),
    }
}

/// The cloud's receipt for this node's relayed reports, passed on by the supernode: the
/// reports it names leave the outbox once the cloud's signature verifies.
async fn take_receipt(
    State(cluster): State<Arc<Cluster>>,
    Extension(Caller(from)): Extension<Caller>,
    headers: HeaderMap,
    body: Bytes,
) -> Reply {
    if let Err(r) = authenticate(&cluster, &headers, &body) {
        return r;
    }
    let post: AckPost = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("malformed receipt: {e}")),
    };
    let Some(cloud) = cluster.cloud_key() else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "the membership names no cloud key yet");
    };
    if !post.receipt.verify(&cloud, cluster.name(), &cluster.identity.fingerprint()) {
        warn!(supernode = %from, "a receipt not signed by the cloud for this node; the reports stay in the outbox");
        return refuse(StatusCode::FORBIDDEN, "the receipt is not the cloud's for this node");
    }
    let seqs = cluster.receipted(&post.receipt.reports);
    match cluster.meta.outbox_acked(&seqs).await {
        Ok(removed) => reply(StatusCode::OK, serde_json::json!({"removed": removed})),
        Err(e) => refuse(StatusCode::INSUFFICIENT_STORAGE, e),
    }
}

/// This node's registry of the cluster, signed.
async fn give_registry(State(cluster): State<Arc<Cluster>>, headers: HeaderMap, body: Bytes) -> Reply {
    if let Err(r) = authenticate(&cluster, &headers, &body) {
        return r;
    }
    let Some(registry) = cluster.own_registry() else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "this node is in no cluster yet");
    };
    match SignedRegistry::sign(cluster.name(), &registry, |p, b| cluster.identity.sign(p, b)) {
        Some(signed) => reply(StatusCode::OK, signed),
        None => refuse(StatusCode::SERVICE_UNAVAILABLE, "this node's key cannot sign"),
    }
}

/// What a POST to a peer got back.
struct Answer {
    status: u16,
    body: String,
}

/// POSTs `body`, with its cluster key HMAC, to `path` of the member `peer` at `address`,
/// over mutual TLS that takes only `peer`'s certificate with the key the membership gives.
async fn post_signed(
    cluster: &Cluster,
    peer: &str,
    address: &str,
    path: &str,
    body: impl Serialize,
) -> Result<Answer, String> {
    let key = cluster.key().ok_or("in no cluster")?;
    let fingerprint = cluster.member_key(peer).ok_or_else(|| format!("{peer} is not a member with an enrolled key"))?;
    let connector = tls::connector(&cluster.identity, peer, &fingerprint)?;
    let body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
    let signature = sign(&key, &body);
    let exchange = async {
        let tcp = TcpStream::connect(address).await.map_err(|e| e.to_string())?;
        let stream = connector.connect(tls::server_name(peer), tcp).await.map_err(|e| format!("TLS: {e}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let request = hyper::Request::post(path)
            .header(header::HOST, address)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, body.len())
            .header(SIGNATURE_HEADER, signature)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let answer = Limited::new(response.into_body(), MAX_ANSWER).collect().await.map_err(|e| e.to_string())?;
        Ok(Answer { status, body: String::from_utf8_lossy(&answer.to_bytes()).into_owned() })
    };
    match tokio::time::timeout(PEER_TIMEOUT, exchange).await {
        Ok(answer) => answer.map_err(|e: String| format!("{peer} at {address}: {e}")),
        Err(_) => Err(format!("{peer} at {address}: no answer within {} s", PEER_TIMEOUT.as_secs())),
    }
}

/// The registry of the supernode `supernode` at `address`, its signature checked.
pub(super) async fn fetch_registry(cluster: &Cluster, supernode: &str, address: &str) -> Result<Registry, String> {
    let answer = post_signed(cluster, supernode, address, REGISTRY_PATH, serde_json::json!({})).await?;
    if answer.status != 200 {
        return Err(format!("the supernode answered {}: {}", answer.status, answer.body));
    }
    let signed: SignedRegistry = serde_json::from_str(&answer.body).map_err(|e| format!("malformed registry: {e}"))?;
    let key = cluster.member_key(supernode).ok_or_else(|| format!("{supernode} has no enrolled key"))?;
    if signed.node != supernode {
        return Err(format!("asked {supernode} for its registry, got {}'s", signed.node));
    }
    signed.open(&key)
}

impl Cluster {
    /// Queues reports at this supernode; returns how many were new. Status reports also
    /// feed the registry.
    pub(super) fn queue(&self, entries: Vec<RelayedReport>) -> Result<usize, super::relay::Full> {
        let mut urgent = false;
        let mut taken = 0;
        {
            let mut state = self.state();
            for entry in entries {
                if entry.resource == STATUS_RESOURCE {
                    if let Ok(report) = serde_json::from_value::<StatusReport>(entry.content.clone()) {
                        let newer = state.statuses.get(&entry.node).is_none_or(|r| r.taken_ms <= report.taken_ms);
                        if newer {
                            state.statuses.insert(entry.node.clone(), report);
                        }
                    }
                }
                urgent |= state.queue.push(entry)?;
                taken += 1;
            }
        }
        if urgent {
            self.urgent.notify_one();
        }
        Ok(taken)
    }

    /// The seqs of `reports` this node handed to a supernode as they are named (seq and
    /// time of queueing), forgotten as handed: what a receipt lets it delete.
    pub(super) fn receipted(&self, reports: &[supermesh_protocol::Receipted]) -> Vec<i64> {
        let mut state = self.state();
        let seqs: Vec<i64> =
            reports.iter().filter(|r| state.handed.get(&r.seq) == Some(&r.created_ms)).map(|r| r.seq).collect();
        for seq in &seqs {
            state.handed.remove(seq);
        }
        seqs
    }
}

/// The entries of `entries` as relayed reports of node `node`.
fn relayed(node: &str, entries: Vec<crate::metamanager::store::OutboxEntry>) -> Vec<RelayedReport> {
    entries
        .into_iter()
        .map(|e| RelayedReport {
            node: node.to_owned(),
            seq: e.seq,
            operation: e.operation,
            resource: e.resource,
            content: serde_json::from_str(&e.content).unwrap_or(serde_json::Value::Null),
            created_ms: e.created_ms,
            signature: None,
        })
        .collect()
}

/// A member hands its outbox to its supernode until the process ends, each report signed
/// with its key. Entries stay in the outbox until the cloud's receipt comes back; entries
/// handed over and not receipted within a while go again, directly to the cloud if the
/// supernode keeps them to itself; a new route sends them all again.
pub(super) async fn relay_as_member(cluster: Arc<Cluster>) {
    let resend_after = 2 * cluster.config.podstatus_interval() + Duration::from_secs(10);
    let mut sent: BTreeMap<i64, Instant> = BTreeMap::new();
    let mut last_route = Route::Direct;
    let (mut outbox, mut route_changed) = (cluster.outbox.subscribe(), cluster.route_changed.subscribe());
    loop {
        tokio::select! {
            _ = outbox.changed() => {}
            _ = route_changed.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let route = cluster.route();
        if route != last_route {
            sent.clear();
            last_route = route.clone();
        }
        let Route::Relay { supernode, address, .. } = route else { continue };
        let pending = match cluster.meta.outbox_pending(MAX_ENTRIES).await {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot read the outbox");
                continue;
            }
        };
        // What left the outbox otherwise (acked directly, superseded) needs no receipt.
        {
            let mut state = cluster.state();
            state.handed.retain(|seq, _| pending.iter().any(|e| e.seq == *seq));
        }
        sent.retain(|seq, _| pending.iter().any(|e| e.seq == *seq));
        let unreceipted = sent.values().any(|at| at.elapsed() >= resend_after);
        sent.retain(|_, at| at.elapsed() < resend_after);
        if unreceipted {
            info!(%supernode, "the supernode got no receipt from the cloud for reports handed to it; reporting directly for now");
            cluster.relay_failed();
            continue;
        }
        let entries: Vec<RelayedReport> = relayed(cluster.name(), pending)
            .into_iter()
            .filter(|e| !sent.contains_key(&e.seq))
            .map(|e| e.sign(|p, b| cluster.identity.sign(p, b)))
            .collect();
        if entries.is_empty() {
            continue;
        }
        let handed: Vec<(i64, i64)> = entries.iter().map(|e| (e.seq, e.created_ms)).collect();
        let post = ReportPost { from: cluster.name().to_owned(), entries };
        match post_signed(&cluster, &supernode, &address, REPORTS_PATH, &post).await {
            Ok(answer) if answer.status == 202 => {
                debug!(%supernode, reports = handed.len(), "reports handed to the supernode");
                cluster.state().handed.extend(handed.iter().copied());
                sent.extend(handed.into_iter().map(|(seq, _)| (seq, Instant::now())));
            }
            Ok(answer) => {
                info!(%supernode, status = answer.status, answer = %answer.body, "the supernode refused reports; reporting directly for now");
                cluster.relay_failed();
            }
            Err(e) => {
                info!(%supernode, error = %e, "the supernode is unreachable; reporting directly for now");
                cluster.relay_failed();
            }
        }
    }
}

/// As supernode, sends the cluster's reports upstream: everything once per interval,
/// and changes after a short coalescing window. Runs until the process ends.
pub(super) async fn relay_upstream(cluster: Arc<Cluster>) {
    let mut tick = tokio::time::interval(cluster.config.podstatus_interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Subscribed once: a report queued while a batch is in flight is seen at the next wait.
    let (mut outbox, mut route_changed) = (cluster.outbox.subscribe(), cluster.route_changed.subscribe());
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cluster.urgent.notified() => tokio::time::sleep(COALESCE).await,
            _ = outbox.changed() => {
                if cluster.route() == Route::Upstream && cluster.queue_own().await {
                    tokio::time::sleep(COALESCE).await;
                } else {
                    continue;
                }
            }
            _ = route_changed.changed() => {
                if cluster.route() != Route::Upstream || !cluster.queue_own().await {
                    continue;
                }
            }
        }
        if cluster.route() != Route::Upstream || !cluster.state().cloud_connected {
            continue;
        }
        cluster.queue_own().await;
        cluster.flush().await;
    }
}

impl Cluster {
    /// Queues this supernode's own outbox reports; returns whether one is urgent.
    async fn queue_own(&self) -> bool {
        let pending = match self.meta.outbox_pending(MAX_ENTRIES).await {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot read the outbox");
                return false;
            }
        };
        let mut urgent = false;
        let mut state = self.state();
        for entry in relayed(self.name(), pending) {
            match state.queue.push(entry) {
                Ok(u) => urgent |= u,
                Err(full) => {
                    warn!(%full, "own reports wait in the outbox");
                    break;
                }
            }
        }
        urgent
    }

    /// Sends every waiting report upstream, batch after batch, each waiting for its ack.
    async fn flush(&self) {
        loop {
            let id = format!("b-{}", NEXT_BATCH.fetch_add(1, Ordering::Relaxed));
            let Some(batch) = self.state().queue.take_batch(&id, MAX_ENTRIES, MAX_BATCH_BYTES) else { return };
            let entries = batch.entries.len();
            let (tx, rx) = tokio::sync::oneshot::channel();
            super::lock(&self.answers).insert(id.clone(), tx);
            let msg = Message::with_body(id.clone(), now_ms(), BATCH_RESOURCE, &Body::MetaSync(Report::Batch(batch)));
            let answer = if self.to_cloud.send(msg).await.is_ok() {
                tokio::time::timeout(BATCH_TIMEOUT, rx).await.ok().and_then(Result::ok)
            } else {
                None
            };
            super::lock(&self.answers).remove(&id);
            let ack = match answer {
                Some(Body::Response(CloudAnswer::Batch(ack))) => Some(ack),
                _ => None,
            };
            let Some(ack) = ack else {
                warn!(batch = %id, entries, "the cloud did not acknowledge a batch; it is sent again");
                self.state().queue.failed(&id);
                return;
            };
            for (id, reason) in &ack.refused {
                warn!(node = %id.node, seq = id.seq, %reason, "the cloud refused a relayed report");
            }
            let done = self.state().queue.answered(&id, &ack);
            debug!(batch = %id, entries, acked = done.len(), "batch acknowledged");
            self.deliver_acks(&ack).await;
        }
    }

    /// This node's own reports the cloud is done with leave its outbox (its own session is
    /// authenticated); each member gets the cloud's signed receipt for its reports.
    async fn deliver_acks(&self, ack: &BatchAck) {
        let own: Vec<i64> = ack
            .acked
            .iter()
            .chain(ack.refused.iter().map(|(id, _)| id))
            .filter(|id| id.node == self.name())
            .map(|id| id.seq)
            .collect();
        if !own.is_empty() {
            if let Err(e) = self.meta.outbox_acked(&own).await {
                warn!(error = %e, "cannot delete acknowledged reports; they are sent again");
            }
        }
        for receipt in ack.receipts.iter().filter(|r| r.node != self.name()) {
            let Some(address) = self.address_of(&receipt.node) else { continue };
            let post = AckPost { from: self.name().to_owned(), receipt: receipt.clone() };
            match post_signed(self, &receipt.node, &address, ACKS_PATH, &post).await {
                Ok(a) if a.status == 200 => {}
                Ok(a) => {
                    debug!(node = %receipt.node, status = a.status, "a member refused a receipt; it sends its reports again")
                }
                Err(e) => {
                    debug!(node = %receipt.node, error = %e, "a member is unreachable for its receipt; it sends its reports again")
                }
            }
        }
    }
}
