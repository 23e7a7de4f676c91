//! One agent's session: hello, registration, delta sync with acks, keepalive,
//! reports (direct and relayed in batches) and queries.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use supermesh_api::edgenode::EdgeNodeSpec;
use supermesh_api::protocol::{
    decode, encode, Assignment, EndpointsAnswer, ErrorCode, ErrorContent, EventReport, Hello, Membership, Message,
    NodesAnswer, Operation, ReportBatch, ResourceRef, StatusReport, Welcome, BATCH_RESOURCE, CONNECTION_RESOURCE,
    ENDPOINTS, MEMBERSHIP, MICROSERVICE, NODES, STATUS_RESOURCE,
};
use supermesh_api::{EdgeNode, Microservice};
use tokio_tungstenite::tungstenite::Message as Frame;
use tracing::{debug, info, warn};

use super::desired::{diff, is_kept, Change, Desired};
use super::reports::{judge_batch, outbox_seq, Report};
use super::{resolve_peer_address, SessionInfo, Ws};
use crate::context::Context;
use crate::discovery::{self, Scope};
use crate::metrics::ReportPath;

/// Unacked changes are sent again after this long.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// A stream silent this long is dead.
/// How often the session checks timers, and refreshes the node's heartbeat in its status.
const TICK: Duration = Duration::from_secs(5);
const HEARTBEAT_REFRESH: Duration = Duration::from_secs(60);
/// Agent-initiated messages (not answers) allowed per second, with a burst of twice that.
const RATE_PER_SECOND: f64 = 50.0;

struct Inflight {
    resource: String,
    /// Version being installed, or `None` for a delete.
    version: Option<String>,
    sent: Instant,
}

struct Session {
    node: String,
    id: u64,
    ws: Ws,
    ctx: Arc<Context>,
    /// Versions the agent has committed, by resource.
    acked: BTreeMap<String, String>,
    inflight: HashMap<String, Inflight>,
    /// Queries sent on behalf of the hub, awaiting the agent's answer, by message id.
    asked: HashMap<String, tokio::sync::oneshot::Sender<Message>>,
    counter: u64,
    last_heard: Instant,
    last_sent: Instant,
    bucket: f64,
    bucket_at: Instant,
}

/// Runs the session of `node` until the stream ends, is superseded or goes silent.
pub(super) async fn run(mut ws: Ws, node: String, peer: SocketAddr, ctx: Arc<Context>) {
    let hello = match read_hello(&mut ws, &node).await {
        Ok(h) => h,
        Err(reason) => {
            warn!(%node, %peer, %reason, "agent session refused");
            let _ = send_error(&mut ws, None, ErrorCode::BadMessage, &reason).await;
            return;
        }
    };
    if let Err(e) = register_node(&ctx, &hello).await {
        warn!(%node, error = %e, "cannot register the EdgeNode of a connecting agent");
        let _ = send_error(&mut ws, None, ErrorCode::Unavailable, "registration failed, retry later").await;
        return;
    }
    let peer_address = hello.peer_address.as_deref().and_then(|advertised| {
        let resolved = resolve_peer_address(advertised, peer.ip());
        if resolved.is_none() {
            warn!(%node, advertised, "ignoring a malformed peer address; expected host:port or :port");
        }
        resolved
    });
    let now = Timestamp::now();
    let info = SessionInfo {
        connected_at: now,
        last_seen: now,
        agent_version: hello.agent_version.clone(),
        os: hello.os.clone(),
        arch: hello.arch.clone(),
        address: peer.ip().to_string(),
        peer_address,
    };
    let (id, poke, superseded, queries) = ctx.hub.register(&node, info);
    ctx.metrics.agents.set(ctx.hub.connected() as i64);
    info!(%node, %peer, held = hello.held.len(), "agent connected");
    // The node's peers learn its address from their membership now, not after a status write.
    if let Some(me) = ctx.index.nodes.get(&ObjectRef::new(&node)) {
        let nodes = ctx.index.nodes.state();
        let peers: Vec<String> =
            nodes.iter().filter(|n| n.spec.network == me.spec.network).map(|n| n.name_any()).collect();
        ctx.hub.poke(&peers);
    }
    let acked = hello.held.into_iter().filter(|(r, _)| is_kept(r)).collect();
    let mut s = Session {
        node: node.clone(),
        id,
        ws,
        ctx: ctx.clone(),
        acked,
        inflight: HashMap::new(),
        asked: HashMap::new(),
        counter: 0,
        last_heard: Instant::now(),
        last_sent: Instant::now(),
        bucket: 2.0 * RATE_PER_SECOND,
        bucket_at: Instant::now(),
    };
    let outcome = s.serve(poke, superseded, queries).await;
    ctx.hub.unregister(&node, id);
    ctx.metrics.agents.set(ctx.hub.connected() as i64);
    info!(%node, reason = outcome, "agent disconnected");
    let _ = s.ws.close(None).await;
}

async fn read_hello(ws: &mut Ws, node: &str) -> Result<Hello, String> {
    let frame = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .map_err(|_| "no hello within 10 s".to_string())?
        .ok_or("stream closed before the hello")?
        .map_err(|e| e.to_string())?;
    let text = frame.into_text().map_err(|e| e.to_string())?;
    let msg = decode(&text).map_err(|e| e.to_string())?;
    if msg.operation != Operation::NodeConnection {
        return Err(format!("the first message must be NodeConnection, got {:?}", msg.operation));
    }
    let hello: Hello = msg.content_as().map_err(|e| e.to_string())?;
    if hello.node != node {
        return Err(format!("hello names node {:?} but the connection is for {node:?}", hello.node));
    }
    Ok(hello)
}

/// Creates the node's EdgeNode from its hello when it does not exist yet (automatic registration).
async fn register_node(ctx: &Context, hello: &Hello) -> Result<(), kube::Error> {
    if ctx.index.nodes.get(&ObjectRef::new(&hello.node)).is_some() {
        return Ok(());
    }
    let spec = EdgeNodeSpec {
        account: hello.account.clone(),
        network: hello.network.clone(),
        location: hello.location,
        supernode_eligible: hello.supernode_eligible,
        unschedulable: false,
    };
    let api: Api<EdgeNode> = Api::all(ctx.client.clone());
    match api.create(&PostParams::default(), &EdgeNode::new(&hello.node, spec)).await {
        Ok(_) => {
            info!(node = %hello.node, network = %hello.network, "registered a new EdgeNode");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.is_already_exists() => Ok(()),
        Err(e) => Err(e),
    }
}

async fn send_error(ws: &mut Ws, parent: Option<&str>, code: ErrorCode, message: &str) -> Result<(), String> {
    let content = ErrorContent { code, message: message.to_owned(), retry_after_ms: None };
    let mut msg = Message::new("c-error".into(), now_ms(), Operation::Error, CONNECTION_RESOURCE, content);
    msg.parent_id = parent.map(str::to_owned);
    let text = encode(&msg).map_err(|e| e.to_string())?;
    ws.send(Frame::text(text)).await.map_err(|e| e.to_string())
}

/// The Microservice a resource string `namespace/microservice/name` names.
fn microservice_ref(resource: &str) -> Option<ObjectRef<Microservice>> {
    let r = ResourceRef::parse(resource).ok().filter(|r| r.res_type == MICROSERVICE)?;
    Some(ObjectRef::new(r.id?).within(r.namespace))
}

/// The resource string of a placed Microservice.
fn microservice_resource(msvc: &ObjectRef<Microservice>) -> String {
    ResourceRef::string(msvc.namespace.as_deref().unwrap_or_default(), MICROSERVICE, &msvc.name)
}

/// What a query is answered with: content and version, or an error code and message.
type Answer = Result<(serde_json::Value, Option<String>), (ErrorCode, String)>;

fn answer(content: impl serde::Serialize) -> Answer {
    serde_json::to_value(content).map(|c| (c, None)).map_err(|e| (ErrorCode::Unavailable, e.to_string()))
}

/// Whether `resource` is a network membership (counted apart from microservice changes).
fn is_membership(resource: &str) -> bool {
    ResourceRef::parse(resource).is_ok_and(|r| r.res_type == MEMBERSHIP)
}

fn now_ms() -> i64 {
    Timestamp::now().as_millisecond()
}

impl Session {
    async fn serve(
        &mut self,
        poke: Arc<tokio::sync::Notify>,
        superseded: Arc<tokio::sync::Notify>,
        mut queries: tokio::sync::mpsc::Receiver<(Message, tokio::sync::oneshot::Sender<Message>)>,
    ) -> &'static str {
        let keepalive = self.ctx.hub.keepalive();
        let welcome = Welcome { keepalive_seconds: keepalive.as_secs(), pending: 0 };
        if self.send(Operation::NodeConnection, CONNECTION_RESOURCE, None, welcome).await.is_err() {
            return "send failed";
        }
        if self.sync().await.is_err() {
            return "send failed";
        }
        let mut tick = tokio::time::interval(TICK.min(keepalive));
        let mut heartbeat = Instant::now();
        loop {
            tokio::select! {
                _ = poke.notified() => {
                    if self.sync().await.is_err() { return "send failed"; }
                }
                _ = superseded.notified() => return "superseded by a newer connection of the same node",
                Some((mut query, reply)) = queries.recv() => {
                    self.counter += 1;
                    query.id = format!("c{}-{}", self.id, self.counter);
                    self.asked.retain(|_, waiting| !waiting.is_closed());
                    self.asked.insert(query.id.clone(), reply);
                    if self.write(&query).await.is_err() { return "send failed"; }
                }
                _ = tick.tick() => {
                    if self.last_heard.elapsed() > 3 * keepalive { return "silent for too long"; }
                    self.inflight.retain(|_, f| f.sent.elapsed() < ACK_TIMEOUT);
                    if self.sync().await.is_err() { return "send failed"; }
                    if self.last_sent.elapsed() >= keepalive
                        && self.send(Operation::Keepalive, CONNECTION_RESOURCE, None, ()).await.is_err() {
                        return "send failed";
                    }
                    if heartbeat.elapsed() >= HEARTBEAT_REFRESH {
                        heartbeat = Instant::now();
                        self.ctx.hub.recount(&self.node);
                    }
                }
                frame = self.ws.next() => match frame {
                    Some(Ok(Frame::Text(text))) => {
                        self.heard();
                        if self.receive(&text).await.is_err() { return "send failed"; }
                    }
                    Some(Ok(Frame::Close(_))) | None => return "closed by the agent",
                    Some(Ok(Frame::Binary(_))) => {
                        self.heard();
                        if send_error(&mut self.ws, None, ErrorCode::BadMessage, "binary frames are not supported").await.is_err() {
                            return "send failed";
                        }
                    }
                    Some(Ok(_)) => self.heard(),
                    Some(Err(e)) => {
                        warn!(node = %self.node, error = %e, "agent stream failed");
                        return "stream error";
                    }
                },
            }
        }
    }

    fn heard(&mut self) {
        self.last_heard = Instant::now();
        self.ctx.hub.touch(&self.node, self.id);
    }

    /// Sends every change between what the agent holds (and is being sent) and what it should hold.
    /// Nothing is sent until this controller has placed every microservice: right after a
    /// start, an empty placement would otherwise tell every agent to delete its workloads.
    async fn sync(&mut self) -> Result<(), String> {
        let index = &self.ctx.index;
        if !index.is_ready() || !self.ctx.placements.is_complete(&index.microservices) {
            debug!(node = %self.node, "placements not complete yet; sync deferred");
            return Ok(());
        }
        let desired = self.desired();
        let mut view = self.acked.clone();
        for f in self.inflight.values() {
            match &f.version {
                Some(v) => view.insert(f.resource.clone(), v.clone()),
                None => view.remove(&f.resource),
            };
        }
        for change in diff(&desired, &view) {
            self.send_change(change).await?;
        }
        Ok(())
    }

    /// Everything the node should hold: its assignments and its network's membership.
    fn desired(&self) -> BTreeMap<String, Desired> {
        let mut desired: BTreeMap<String, Desired> =
            self.assignments().into_iter().map(|(r, a)| (r, Desired::Assignment(Box::new(a)))).collect();
        if let Some(membership) = self.membership() {
            desired.insert(Membership::resource(&membership.network), Desired::Membership(membership));
        }
        desired
    }

    /// The membership of the node's network, once its EdgeNode is known.
    fn membership(&self) -> Option<Membership> {
        let me = self.edgenode()?;
        let nodes = self.ctx.index.nodes.state();
        let mut membership =
            crate::membership::build(&me.spec.network, &self.ctx.token_secret, nodes.iter().map(|n| &**n));
        // A connected agent's own word on its address is fresher than its EdgeNode status.
        for member in &mut membership.members {
            if let Some(address) = self.ctx.hub.session(&member.name).and_then(|s| s.peer_address) {
                member.address = Some(address);
            }
        }
        Some(membership)
    }

    /// The node's EdgeNode, from the index.
    fn edgenode(&self) -> Option<Arc<EdgeNode>> {
        self.ctx.index.nodes.get(&ObjectRef::new(&self.node))
    }

    /// The microservices placed on the node, by resource.
    fn assignments(&self) -> BTreeMap<String, Assignment> {
        let index = &self.ctx.index;
        self.ctx
            .placements
            .assigned_to(&self.node)
            .into_iter()
            .filter_map(|r| index.microservices.get(&r))
            .filter(|m| m.metadata.deletion_timestamp.is_none())
            .map(|m| Assignment {
                namespace: m.namespace().unwrap_or_default(),
                name: m.name_any(),
                uid: m.uid().unwrap_or_default(),
                generation: m.metadata.generation.unwrap_or_default(),
                spec: m.spec.clone(),
            })
            .map(|a| (a.resource(), a))
            .collect()
    }

    async fn send_change(&mut self, change: Change) -> Result<(), String> {
        let Change { operation, resource, version, content } = change;
        let id = match content {
            Some(c) => self.send(operation, &resource, Some(&version), c).await?,
            None => self.send(operation, &resource, Some(&version), ()).await?,
        };
        let version = (operation != Operation::Delete).then_some(version);
        let metrics = &self.ctx.metrics;
        if is_membership(&resource) {
            metrics.memberships_sent.inc()
        } else {
            metrics.changes_sent.inc()
        };
        self.inflight.insert(id, Inflight { resource, version, sent: Instant::now() });
        Ok(())
    }

    async fn send(
        &mut self,
        operation: Operation,
        resource: &str,
        version: Option<&str>,
        content: impl serde::Serialize,
    ) -> Result<String, String> {
        self.counter += 1;
        let id = format!("c{}-{}", self.id, self.counter);
        let mut msg = Message::new(id.clone(), now_ms(), operation, resource, content);
        msg.resource_version = version.map(str::to_owned);
        self.write(&msg).await?;
        Ok(id)
    }

    async fn write(&mut self, msg: &Message) -> Result<(), String> {
        let text = encode(msg).map_err(|e| e.to_string())?;
        self.ws.send(Frame::text(text)).await.map_err(|e| e.to_string())?;
        self.last_sent = Instant::now();
        Ok(())
    }

    /// Answers `msg` with an empty Response: the agent's outbox drops it.
    async fn ack(&mut self, msg: &Message) -> Result<(), String> {
        let ack = Message::new(format!("c{}-a{}", self.id, msg.id), now_ms(), Operation::Response, &msg.resource, ())
            .answering(&msg.id);
        self.write(&ack).await
    }

    async fn receive(&mut self, text: &str) -> Result<(), String> {
        let msg = match decode(text) {
            Ok(m) => m,
            Err(e) => {
                warn!(node = %self.node, error = %e, "invalid message from agent");
                self.ctx.metrics.bad_messages.inc();
                return send_error(&mut self.ws, None, ErrorCode::BadMessage, &e.to_string()).await;
            }
        };
        match msg.operation {
            Operation::Response | Operation::Error => {
                match msg.parent_id.as_ref().and_then(|p| self.asked.remove(p)) {
                    Some(waiting) => {
                        let _ = waiting.send(msg);
                    }
                    None => self.answered(&msg),
                }
                Ok(())
            }
            Operation::Keepalive => Ok(()),
            _ if !self.take_token() => {
                let content = ErrorContent {
                    code: ErrorCode::Overloaded,
                    message: format!("more than {RATE_PER_SECOND} messages per second"),
                    retry_after_ms: Some(1000),
                };
                let reply = Message::new(format!("c{}-r", self.id), now_ms(), Operation::Error, &msg.resource, content)
                    .answering(&msg.id);
                self.write(&reply).await
            }
            Operation::Query => self.answer_query(&msg).await,
            Operation::MetaSync if msg.resource == BATCH_RESOURCE => self.batch(&msg, text.len()).await,
            Operation::MetaSync if msg.resource == STATUS_RESOURCE || microservice_ref(&msg.resource).is_some() => {
                self.direct_report(&msg, text.len()).await
            }
            other => {
                // Other reports are acknowledged so the agent's outbox drains.
                debug!(node = %self.node, operation = ?other, resource = %msg.resource, "report from agent");
                self.ack(&msg).await
            }
        }
    }

    /// A report the node sends about itself. An invalid status report is refused; an
    /// invalid event is dropped (and acknowledged, since sending it again cannot help).
    async fn direct_report(&mut self, msg: &Message, bytes: usize) -> Result<(), String> {
        self.ctx.metrics.reports_received(ReportPath::Direct, bytes, 1);
        match Report::parse(msg.operation, &msg.resource, &msg.content) {
            Ok(report) => {
                let node = self.node.clone();
                self.take(&node, outbox_seq(&msg.id), report).await;
            }
            Err(reason) if msg.resource == STATUS_RESOURCE => {
                warn!(node = %self.node, %reason, "invalid status report");
                return send_error(&mut self.ws, Some(&msg.id), ErrorCode::BadMessage, &reason).await;
            }
            Err(reason) => warn!(node = %self.node, %reason, "invalid instance event"),
        }
        self.ack(msg).await
    }

    /// A supernode's batch of its cluster's reports: each is taken as if its node had sent
    /// it, when the session's node may report for that node; one [`BatchAck`] answers all.
    async fn batch(&mut self, msg: &Message, bytes: usize) -> Result<(), String> {
        let batch = match msg.content_as::<ReportBatch>() {
            Ok(batch) => batch,
            Err(e) => {
                warn!(node = %self.node, error = %e, "invalid report batch");
                self.ctx.metrics.bad_messages.inc();
                return send_error(&mut self.ws, Some(&msg.id), ErrorCode::BadMessage, &e.to_string()).await;
            }
        };
        self.ctx.metrics.reports_received(ReportPath::Batch, bytes, batch.entries.len());
        let (taken, ack) = judge_batch(&self.node, batch, |n| self.network_of(n));
        for relayed in taken {
            self.take(&relayed.node, Some(relayed.seq), relayed.report).await;
        }
        if let Some((first, reason)) = ack.refused.first() {
            warn!(node = %self.node, refused = ack.refused.len(), first = %first.node, %reason, "refused relayed reports");
        }
        let reply =
            Message::new(format!("c{}-a{}", self.id, msg.id), now_ms(), Operation::Response, &msg.resource, ack)
                .answering(&msg.id);
        self.write(&reply).await
    }

    /// The network of EdgeNode `node`, from the index.
    fn network_of(&self, node: &str) -> Option<String> {
        self.ctx.index.nodes.get(&ObjectRef::new(node)).map(|n| n.spec.network.clone())
    }

    /// Takes one report about `node` (this session's node, or a member it relays for).
    /// An event whose outbox `seq` was taken before is dropped.
    async fn take(&mut self, node: &str, seq: Option<i64>, report: Report) {
        match report {
            Report::Status(status) => self.status_report(node, status),
            Report::Event { resource, event } => {
                if seq.is_some_and(|seq| !self.ctx.reports.first_event(node, seq)) {
                    debug!(%node, ?seq, %resource, "event taken before; not published again");
                    self.ctx.metrics.reports_duplicate.inc();
                    return;
                }
                self.instance_event(node, &resource, event).await
            }
        }
    }

    /// Publishes an instance's event on `node` as a Kubernetes Event on its Microservice.
    async fn instance_event(&self, node: &str, resource: &str, event: EventReport) {
        let Some(msvc) = microservice_ref(resource).and_then(|r| self.ctx.index.microservices.get(&r)) else { return };
        let note = format!("{node}: {}", event.message);
        let related = self.ctx.index.nodes.get(&ObjectRef::new(node)).map(|n| n.object_ref(&()));
        self.ctx.publish_related(&*msvc, related, event.warning, &event.reason, note).await;
    }

    /// Takes `node`'s instance status: only what is placed on it (or, for this session's
    /// node, what it still holds) counts; then the affected microservices and the node
    /// itself re-aggregate. A snapshot no newer than the one held changes nothing.
    fn status_report(&self, node: &str, mut report: StatusReport) {
        let placed = self.placed_on(node);
        let held = (node == self.node).then_some(&self.acked);
        report.instances.retain(|i| placed.contains(&i.resource) || held.is_some_and(|h| h.contains_key(&i.resource)));
        self.ctx.metrics.status_reports.inc();
        let Some(touched) = self.ctx.reports.update(node, report) else {
            self.ctx.metrics.reports_duplicate.inc();
            return;
        };
        for resource in touched {
            if let Some(msvc) = microservice_ref(&resource) {
                let _ = self.ctx.msvc_trigger.unbounded_send(msvc);
            }
        }
        self.ctx.hub.recount(node);
    }

    /// Resource strings of the microservices placed on `node`.
    fn placed_on(&self, node: &str) -> BTreeSet<String> {
        self.ctx.placements.assigned_to(node).iter().map(microservice_resource).collect()
    }

    /// An ack or nack of a change this session sent.
    fn answered(&mut self, msg: &Message) {
        let Some(f) = msg.parent_id.as_ref().and_then(|p| self.inflight.remove(p)) else { return };
        if msg.operation == Operation::Error {
            let reason = msg.content_as::<ErrorContent>().map(|c| c.message).unwrap_or_default();
            warn!(node = %self.node, resource = %f.resource, %reason, "agent refused a change; it is sent again later");
            if !is_membership(&f.resource) {
                self.ctx.metrics.changes_nacked.inc();
            }
            return;
        }
        if !is_membership(&f.resource) {
            self.ctx.metrics.changes_acked.inc();
        }
        match f.version {
            Some(v) => self.acked.insert(f.resource, v),
            None => self.acked.remove(&f.resource),
        };
    }

    /// Answers an agent's query: discovery (`_/nodes/<scope>`, `namespace/endpoints/name`),
    /// or a resource it does not hold, of which only what is assigned to it.
    async fn answer_query(&mut self, msg: &Message) -> Result<(), String> {
        let answer = match ResourceRef::parse(&msg.resource) {
            Ok(r) if r.namespace == "_" && r.res_type == NODES => self.discover_nodes(r.id.unwrap_or_default()),
            Ok(r) if r.res_type == ENDPOINTS => self.discover_endpoints(r.namespace, r.id.unwrap_or_default()),
            _ => self.assignment(&msg.resource),
        };
        let id = format!("c{}-q{}", self.id, msg.id);
        let reply = match answer {
            Ok((content, version)) => {
                let reply = Message::new(id, now_ms(), Operation::Response, &msg.resource, content);
                match version {
                    Some(v) => reply.with_version(&v),
                    None => reply,
                }
            }
            Err((code, message)) => {
                let content = ErrorContent { code, message, retry_after_ms: None };
                Message::new(id, now_ms(), Operation::Error, &msg.resource, content)
            }
        };
        self.write(&reply.answering(&msg.id)).await
    }

    /// The assignment `resource`, when it is assigned to the node.
    fn assignment(&self, resource: &str) -> Answer {
        let Some(a) = self.assignments().remove(resource) else {
            return Err((ErrorCode::NotFound, format!("{resource} is not assigned to node {}", self.node)));
        };
        let version = a.version();
        answer(a).map(|(content, _)| (content, Some(version)))
    }

    /// The nodes of the node's account (`_/nodes/account`), or those with a location (`_/nodes/proximity`).
    fn discover_nodes(&self, scope: &str) -> Answer {
        let scope = Scope::parse(scope).ok_or_else(|| {
            (ErrorCode::NotFound, format!("no node discovery {scope:?}; ask _/nodes/account or _/nodes/proximity"))
        })?;
        let me = self.edgenode().ok_or_else(|| self.no_edgenode())?;
        let all = self.ctx.index.nodes.state();
        let nodes = discovery::nodes(scope, &me, all.iter().map(|n| &**n), |n| self.ctx.hub.is_connected(n));
        answer(NodesAnswer { nodes })
    }

    /// The endpoints of Microservice `namespace/name`, for a node running a microservice of that namespace.
    fn discover_endpoints(&self, namespace: &str, name: &str) -> Answer {
        let placed_here = self.placed_on(&self.node);
        let held = self.acked.keys().chain(&placed_here).map(String::as_str);
        if !discovery::may_discover(namespace, held) {
            let message = format!("node {} runs no microservice of namespace {namespace}", self.node);
            return Err((ErrorCode::Forbidden, message));
        }
        let msvc_ref = ObjectRef::<Microservice>::new(name).within(namespace);
        let msvc = self.ctx.index.microservices.get(&msvc_ref);
        let msvc =
            msvc.ok_or_else(|| (ErrorCode::NotFound, format!("microservice {namespace}/{name} does not exist")))?;
        let me = self.edgenode().ok_or_else(|| self.no_edgenode())?;
        let placed = self.ctx.placements.get(&msvc_ref).unwrap_or_default();
        let resource = ResourceRef::string(namespace, MICROSERVICE, name);
        let ready: HashMap<String, bool> =
            self.ctx.reports.about(&resource, &placed).into_iter().map(|(n, r)| (n, r.ready)).collect();
        let nodes: Vec<Arc<EdgeNode>> =
            placed.iter().filter_map(|n| self.ctx.index.nodes.get(&ObjectRef::new(n))).collect();
        let ports: Vec<i32> = msvc.spec.ports.iter().map(|p| p.port).collect();
        let endpoints =
            discovery::endpoints(&me, nodes.iter().map(|n| &**n), &ports, |n| ready.get(n).copied().unwrap_or(false));
        answer(EndpointsAnswer { endpoints })
    }

    fn no_edgenode(&self) -> (ErrorCode, String) {
        (ErrorCode::NotFound, format!("node {} has no EdgeNode yet", self.node))
    }

    fn take_token(&mut self) -> bool {
        let elapsed = self.bucket_at.elapsed().as_secs_f64();
        self.bucket_at = Instant::now();
        self.bucket = (self.bucket + elapsed * RATE_PER_SECOND).min(2.0 * RATE_PER_SECOND);
        if self.bucket >= 1.0 {
            self.bucket -= 1.0;
            true
        } else {
            false
        }
    }
}
