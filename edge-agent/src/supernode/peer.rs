//! The cluster's network side: heartbeats over UDP, and HTTP between members and
//! their supernode (reports in, acks out, registry). Every datagram and request
//! body is signed with the cluster key; anything else is dropped or refused.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use serde::Serialize;
use supermesh_protocol::peer::{
    sign, verify, AckPost, Registry, ReportPost, SignedHeartbeat, ACKS_PATH, MAX_BODY, MAX_DATAGRAM, MULTICAST_GROUP,
    NODE_HEADER, REGISTRY_PATH, REPORTS_PATH, SIGNATURE_HEADER,
};
use supermesh_protocol::{
    now_ms, Answer as CloudAnswer, Body, Message, RelayedReport, Report, ReportId, StatusReport, BATCH_RESOURCE,
    STATUS_RESOURCE,
};
use tokio::net::UdpSocket;
use tracing::{debug, info, warn};

use super::{Cluster, Route};

/// Reports sent to the supernode in one request, and upstream in one batch, at most.
const MAX_ENTRIES: usize = 512;
/// Bytes of reports upstream in one batch, about.
const MAX_BATCH_BYTES: usize = 512 * 1024;
/// How long a peer request may take.
const PEER_TIMEOUT: Duration = Duration::from_secs(3);
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
        let datagram = SignedHeartbeat::encode(&heartbeat, &key);
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

/// Takes heartbeats until the process ends; unsigned, foreign or malformed ones are dropped.
pub(super) async fn receive(cluster: Arc<Cluster>, udp: Arc<UdpSocket>) {
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let listed_only = !cluster.config.supernode.multicast;
    loop {
        let (len, from) = match udp.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "heartbeat socket failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let keys = cluster.keys();
        let Some(current) = keys.first() else { continue };
        let decoded = SignedHeartbeat::decode(&buf[..len], current)
            .or_else(|e| keys[1..].iter().find_map(|k| SignedHeartbeat::decode(&buf[..len], k).ok()).ok_or(e));
        match decoded {
            Ok(heartbeat) => cluster.heard(heartbeat, from, listed_only),
            Err(reason) => debug!(%from, %reason, "heartbeat dropped"),
        }
    }
}

/// Serves the peer HTTP API on `tcp` until the process ends.
pub async fn serve(cluster: Arc<Cluster>, tcp: tokio::net::TcpListener) {
    let app = Router::new()
        .route(REPORTS_PATH, post(take_reports))
        .route(ACKS_PATH, post(take_acks))
        .route(REGISTRY_PATH, post(give_registry))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(cluster);
    if let Err(e) = axum::serve(tcp, app).await {
        warn!(error = %e, "the peer service stopped");
    }
}

type Reply = (StatusCode, String);

fn reply(status: StatusCode, body: impl Serialize) -> Reply {
    (status, serde_json::to_string(&body).unwrap_or_default())
}

fn refuse(status: StatusCode, error: impl std::fmt::Display) -> Reply {
    reply(status, serde_json::json!({"error": error.to_string()}))
}

/// Checks a request's signature and sender; returns the sending node.
fn authenticate(cluster: &Cluster, headers: &HeaderMap, body: &[u8]) -> Result<String, Reply> {
    let keys = cluster.keys();
    if keys.is_empty() {
        return Err(refuse(StatusCode::SERVICE_UNAVAILABLE, "this node is in no cluster yet"));
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default();
    if !keys.iter().any(|key| verify(key, body, header(SIGNATURE_HEADER))) {
        return Err(refuse(StatusCode::UNAUTHORIZED, "bad or missing signature: not signed with this cluster's key"));
    }
    let node = header(NODE_HEADER).to_owned();
    if !cluster.knows(&node) {
        return Err(refuse(StatusCode::FORBIDDEN, format!("{node:?} is not a member of this cluster")));
    }
    Ok(node)
}

/// A member's reports, taken by the supernode for its next batch.
async fn take_reports(State(cluster): State<Arc<Cluster>>, headers: HeaderMap, body: Bytes) -> Reply {
    let from = match authenticate(&cluster, &headers, &body) {
        Ok(node) => node,
        Err(r) => return r,
    };
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

/// Acks of this node's reports, from the supernode that sent them upstream.
async fn take_acks(State(cluster): State<Arc<Cluster>>, headers: HeaderMap, body: Bytes) -> Reply {
    if let Err(r) = authenticate(&cluster, &headers, &body) {
        return r;
    }
    let acks: AckPost = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("malformed acks: {e}")),
    };
    match cluster.meta.outbox_acked(&acks.seqs).await {
        Ok(removed) => reply(StatusCode::OK, serde_json::json!({"removed": removed})),
        Err(e) => refuse(StatusCode::INSUFFICIENT_STORAGE, e),
    }
}

/// This node's registry of the cluster.
async fn give_registry(State(cluster): State<Arc<Cluster>>, headers: HeaderMap, body: Bytes) -> Reply {
    if let Err(r) = authenticate(&cluster, &headers, &body) {
        return r;
    }
    match cluster.own_registry() {
        Some(registry) => reply(StatusCode::OK, registry),
        None => refuse(StatusCode::SERVICE_UNAVAILABLE, "this node is in no cluster yet"),
    }
}

/// What a signed POST to a peer got back.
struct Answer {
    status: u16,
    body: String,
}

/// POSTs `body` signed with the cluster key to `path` of the peer at `address`.
async fn post_signed(cluster: &Cluster, address: &str, path: &str, body: impl Serialize) -> Result<Answer, String> {
    let key = cluster.key().ok_or("in no cluster")?;
    let body = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
    let signature = sign(&key, &body);
    let url = format!("http://{address}{path}");
    let node = cluster.name().to_owned();
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(PEER_TIMEOUT))
            .http_status_as_error(false)
            .proxy(None)
            .build()
            .into();
        let mut response = agent
            .post(&url)
            .header(NODE_HEADER, &node)
            .header(SIGNATURE_HEADER, &signature)
            .header("content-type", "application/json")
            .send(&body[..])
            .map_err(|e| format!("{url}: {e}"))?;
        let status = response.status().as_u16();
        let body = response.body_mut().read_to_string().unwrap_or_default();
        Ok(Answer { status, body })
    })
    .await
    .map_err(|e| e.to_string())?
}

/// The registry of the supernode at `address`.
pub(super) async fn fetch_registry(cluster: &Cluster, address: &str) -> Result<Registry, String> {
    let answer = post_signed(cluster, address, REGISTRY_PATH, serde_json::json!({"from": cluster.name()})).await?;
    if answer.status != 200 {
        return Err(format!("the supernode answered {}: {}", answer.status, answer.body));
    }
    serde_json::from_str(&answer.body).map_err(|e| format!("malformed registry: {e}"))
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
        })
        .collect()
}

/// A member hands its outbox to its supernode until the process ends. Entries stay in
/// the outbox until the supernode's ack arrives; a new route sends them all again.
pub(super) async fn relay_as_member(cluster: Arc<Cluster>) {
    let resend_after = 2 * cluster.config.podstatus_interval() + Duration::from_secs(10);
    let mut sent: HashMap<i64, Instant> = HashMap::new();
    let mut last_route = Route::Direct;
    loop {
        tokio::select! {
            _ = cluster.outbox.notified() => {}
            _ = cluster.route_changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let route = cluster.route();
        if route != last_route {
            sent.clear();
            last_route = route.clone();
        }
        let Route::Relay { supernode, address, .. } = route else { continue };
        sent.retain(|_, at| at.elapsed() < resend_after);
        let pending = match cluster.meta.outbox_pending(MAX_ENTRIES).await {
            Ok(p) => p,
            Err(e) => {
                warn!(error = %e, "cannot read the outbox");
                continue;
            }
        };
        let entries: Vec<RelayedReport> =
            relayed(cluster.name(), pending.into_iter().filter(|e| !sent.contains_key(&e.seq)).collect());
        if entries.is_empty() {
            continue;
        }
        let seqs: Vec<i64> = entries.iter().map(|e| e.seq).collect();
        let post = ReportPost { from: cluster.name().to_owned(), entries };
        match post_signed(&cluster, &address, REPORTS_PATH, &post).await {
            Ok(answer) if answer.status == 202 => {
                debug!(%supernode, reports = seqs.len(), "reports handed to the supernode");
                sent.extend(seqs.into_iter().map(|s| (s, Instant::now())));
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
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = cluster.urgent.notified() => tokio::time::sleep(COALESCE).await,
            _ = cluster.outbox.notified() => {
                if cluster.route() == Route::Upstream && cluster.queue_own().await {
                    tokio::time::sleep(COALESCE).await;
                } else {
                    continue;
                }
            }
            _ = cluster.route_changed.notified() => {
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
            self.deliver_acks(done).await;
        }
    }

    /// Deletes acked reports: this node's from its outbox, members' by telling them.
    async fn deliver_acks(&self, done: Vec<ReportId>) {
        let mut by_node: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for id in done {
            by_node.entry(id.node).or_default().push(id.seq);
        }
        for (node, seqs) in by_node {
            if node == self.name() {
                if let Err(e) = self.meta.outbox_acked(&seqs).await {
                    warn!(error = %e, "cannot delete acknowledged reports; they are sent again");
                }
                continue;
            }
            let Some(address) = self.address_of(&node) else { continue };
            let post = AckPost { from: self.name().to_owned(), seqs };
            match post_signed(self, &address, ACKS_PATH, &post).await {
                Ok(a) if a.status == 200 => {}
                Ok(a) => debug!(%node, status = a.status, "a member refused acks; it sends its reports again"),
                Err(e) => debug!(%node, error = %e, "a member is unreachable for acks; it sends its reports again"),
            }
        }
    }
}
