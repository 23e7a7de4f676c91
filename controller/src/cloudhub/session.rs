//! One agent's session, as transport only: the handshake (hello, version,
//! registration), delta delivery of its node's desired state ([`Delivery`]),
//! keepalives and silence, and a budget for what the agent asks. Reports go to
//! the index, queries are answered by it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use k8s_openapi::jiff::Timestamp;
use supermesh_api::names::condition::CHANGE_REFUSED;
use supermesh_protocol::identity::REVOKED_CLOSE_CODE;
use supermesh_protocol::{
    decode, encode, now_ms, Answer, Body, CodecError, ConfigData, Connection, EndpointsAnswer, ErrorCode, ErrorContent,
    EventReport, Hello, Message, NodesAnswer, Operation, ProtocolVersion, Query, Report, ResourceRef, Welcome,
    BATCH_RESOURCE, CONFIG, CONNECTION_RESOURCE, MOVED_CLOSE_CODE,
};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message as Frame;
use tracing::{debug, info, warn};

use super::delivery::{is_membership, Delivery, Outgoing};
use super::reports::{in_time, judge_batch, outbox_seq, within_bounds, Intake, Judged, Records};
use super::{resolve_peer_address, Shared, Ws};
use crate::index::{NodeDesired, SessionInfo};
use crate::metrics::{ReasonLabels, ReportPath};
use crate::replicas::Replica;

/// Agent-initiated messages (not answers) allowed per second, with a burst of twice that.
const RATE_PER_SECOND: u32 = 50;
/// Frames of any kind (answers, acks and keepalives included) allowed per second, with a
/// burst of twice that: more is a flood, and ends the session.
const FRAMES_PER_SECOND: u32 = 1_000;
/// How long the agent has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the index hears that an agent is alive: the session knows it to the frame,
/// the index (for `lastHeartbeatTime`, written every few minutes) needs much less.
const LIVENESS_EVERY: Duration = Duration::from_secs(30);

/// Runs the session of `node` until the stream ends, is superseded or goes silent.
pub(super) async fn run(mut ws: Ws, node: String, key: String, peer: SocketAddr, shared: Shared) {
    let (hello, protocol) = match read_hello(&mut ws, &node).await {
        Ok(h) => h,
        Err((code, reason)) => {
            warn!(%node, %peer, %reason, "agent session refused");
            let _ = send(&mut ws, &error(None, ErrorContent::new(code, reason))).await;
            return;
        }
    };
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
        address: peer.ip().to_canonical().to_string(),
        peer_address,
        capacity: hello.capacity,
    };
    let registered = shared.hub.register(&node);
    let desired = shared.index.connect(&node, registered.id, info);
    info!(%node, %peer, held = hello.held.len(), %protocol, "agent connected");
    let burst = NonZeroU32::new(2 * RATE_PER_SECOND).expect("not zero");
    let mut session = Session {
        delivery: Delivery::new(registered.id, hello.held),
        node: node.clone(),
        key,
        revoked: None,
        id: registered.id,
        ws,
        shared: shared.clone(),
        asked: BTreeMap::new(),
        last_heard: Instant::now(),
        last_sent: Instant::now(),
        last_told: Instant::now(),
        budget: RateLimiter::direct(
            Quota::per_second(NonZeroU32::new(RATE_PER_SECOND).expect("not zero")).allow_burst(burst),
        ),
        frames: RateLimiter::direct(
            Quota::per_second(NonZeroU32::new(FRAMES_PER_SECOND).expect("not zero"))
                .allow_burst(NonZeroU32::new(2 * FRAMES_PER_SECOND).expect("not zero")),
        ),
        protocol,
        moved: None,
    };
    let outcome = session.serve(desired, registered.superseded, registered.queries).await;
    shared.index.disconnect(&node, registered.id);
    shared.hub.unregister(&node, registered.id);
    info!(%node, reason = outcome, "agent disconnected");
    // A node handed over to another replica is told where to go; a revoked one, why it is cut off.
    let close = match (session.moved, session.revoked) {
        (Some(to), _) => Some(CloseFrame { code: MOVED_CLOSE_CODE.into(), reason: to.address.into() }),
        (None, Some(why)) => Some(CloseFrame { code: REVOKED_CLOSE_CODE.into(), reason: why.into() }),
        (None, None) => None,
    };
    let _ = session.ws.close(close).await;
}

/// Reads the hello and the protocol version both sides speak; refuses with a code and reason.
async fn read_hello(ws: &mut Ws, node: &str) -> Result<(Hello, ProtocolVersion), (ErrorCode, String)> {
    let bad = |reason: String| (ErrorCode::BadMessage, reason);
    let frame = tokio::time::timeout(HELLO_TIMEOUT, ws.next())
        .await
        .map_err(|_| bad(format!("no hello within {} s", HELLO_TIMEOUT.as_secs())))?
        .ok_or_else(|| bad("stream closed before the hello".into()))?
        .map_err(|e| bad(e.to_string()))?;
    let text = frame.into_text().map_err(|e| bad(e.to_string()))?;
    let msg = decode(&text).map_err(|e| bad(e.to_string()))?;
    let hello = match msg.body().map_err(|e| bad(e.to_string()))? {
        Body::NodeConnection(Connection::Hello(hello)) => *hello,
        other => return Err(bad(format!("the first message must be a hello, got {:?}", other.operation()))),
    };
    if hello.node != node {
        return Err(bad(format!("hello names node {:?} but the connection is for {node:?}", hello.node)));
    }
    hello.check_bounds().map_err(|e| bad(format!("hello refused: {e}")))?;
    let protocol =
        ProtocolVersion::CURRENT.negotiate(hello.protocol).map_err(|reason| (ErrorCode::UnsupportedVersion, reason))?;
    Ok((hello, protocol))
}

fn error(parent: Option<&str>, content: ErrorContent) -> Message {
    let mut msg = Message::with_body("c-error".into(), now_ms(), CONNECTION_RESOURCE, &Body::Error(content));
    msg.parent_id = parent.map(str::to_owned);
    msg
}

async fn send(ws: &mut Ws, msg: &Message) -> Result<(), String> {
    let text = encode(msg).map_err(|e| e.to_string())?;
    ws.send(Frame::text(text)).await.map_err(|e| e.to_string())
}

struct Session {
    node: String,
    /// Fingerprint of the key of the certificate the session was opened with.
    key: String,
    /// Why the node's certificate stopped counting, if it did.
    revoked: Option<&'static str>,
    id: u64,
    ws: Ws,
    shared: Shared,
    delivery: Delivery,
    /// Queries sent on behalf of the hub, awaiting the agent's answer, by message id.
    asked: BTreeMap<String, oneshot::Sender<Message>>,
    last_heard: Instant,
    last_sent: Instant,
    /// When the index last heard this agent is alive.
    last_told: Instant,
    budget: DefaultDirectRateLimiter,
    /// Every frame the agent sends.
    frames: DefaultDirectRateLimiter,
    protocol: ProtocolVersion,
    /// The replica the node was handed over to, when the live replicas changed.
    moved: Option<Replica>,
}

impl Session {
    async fn serve(
        &mut self,
        mut desired: watch::Receiver<Arc<NodeDesired>>,
        superseded: Arc<tokio::sync::Notify>,
        mut queries: tokio::sync::mpsc::Receiver<(Message, oneshot::Sender<Message>)>,
    ) -> &'static str {
        let keepalive = self.shared.hub.keepalive();
        let mut ring = self.shared.replicas.subscribe();
        let current = desired.borrow_and_update().clone();
        if let Err(why) = current.standing.accepts(&self.key) {
            self.revoked = Some(why);
            return "its certificate no longer counts";
        }
        let pending = self.delivery.plan(&current, std::time::Instant::now());
        let welcome =
            Welcome { keepalive_seconds: keepalive.as_secs(), pending: pending.len() as u64, protocol: self.protocol };
        let welcome = Body::NodeConnection(Connection::Welcome(welcome));
        if self.send_body(CONNECTION_RESOURCE, &welcome, None).await.is_err()
            || self.send_changes(pending).await.is_err()
        {
            return "send failed";
        }
        loop {
            let silence = self.last_heard + 3 * keepalive;
            let idle = self.last_sent + keepalive;
            let wake = [Some(silence), Some(idle), self.delivery.next_deadline().map(Instant::from_std)]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(silence);
            tokio::select! {
                changed = desired.changed() => {
                    if changed.is_err() { return "the node left the index"; }
                    let current = desired.borrow_and_update().clone();
                    if let Err(why) = current.standing.accepts(&self.key) {
                        self.revoked = Some(why);
                        return "its certificate no longer counts";
                    }
                    if self.sync(&current).await.is_err() { return "send failed"; }
                }
                _ = superseded.notified() => return "superseded by a newer connection of the same node",
                Ok(()) = ring.changed() => {
                    ring.borrow_and_update();
                    if let Some(owner) = self.shared.replicas.elsewhere(&self.node) {
                        self.moved = Some(owner);
                        return "handed over to another controller replica";
                    }
                }
                Some((mut query, reply)) = queries.recv() => {
                    query.id = self.delivery.next_id();
                    self.asked.retain(|_, waiting| !waiting.is_closed());
                    self.asked.insert(query.id.clone(), reply);
                    if self.write(&query).await.is_err() { return "send failed"; }
                }
                _ = tokio::time::sleep_until(wake) => {
                    if self.last_heard.elapsed() >= 3 * keepalive { return "silent for too long"; }
                    let current = desired.borrow().clone();
                    if self.sync(&current).await.is_err() { return "send failed"; }
                    if self.last_sent.elapsed() >= keepalive
                        && self.send_body(CONNECTION_RESOURCE, &Body::Keepalive, None).await.is_err() {
                        return "send failed";
                    }
                }
                frame = self.ws.next() => match frame {
                    Some(Ok(_)) if self.frames.check().is_err() => {
                        warn!(node = %self.node, limit = FRAMES_PER_SECOND, "agent floods its stream; closing it");
                        return "more frames per second than allowed";
                    }
                    Some(Ok(Frame::Text(text))) => {
                        self.heard();
                        if self.receive(&text).await.is_err() { return "send failed"; }
                    }
                    Some(Ok(Frame::Close(_))) | None => return "closed by the agent",
                    Some(Ok(Frame::Binary(_))) => {
                        self.heard();
                        let refusal = ErrorContent::new(ErrorCode::BadMessage, "binary frames are not supported");
                        if self.write(&error(None, refusal)).await.is_err() { return "send failed"; }
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

    /// Where this session's reports go.
    fn intake<'a>(&'a self, metrics: &'a crate::metrics::Metrics) -> Intake<'a> {
        let shared = &self.shared;
        let budget = &shared.event_budget;
        Intake { index: &shared.index, events: &shared.events, metrics, forward: &shared.forward, budget }
    }

    fn heard(&mut self) {
        self.last_heard = Instant::now();
        if self.last_told.elapsed() >= LIVENESS_EVERY {
            self.last_told = self.last_heard;
            self.shared.index.heard(&self.node, self.id);
        }
    }

    /// Sends what the agent lacks of `desired`.
    async fn sync(&mut self, desired: &NodeDesired) -> Result<(), String> {
        let planned = self.delivery.plan(desired, std::time::Instant::now());
        self.send_changes(planned).await
    }

    /// Sends planned changes, flushed once.
    async fn send_changes(&mut self, planned: Vec<Outgoing>) -> Result<(), String> {
        if planned.is_empty() {
            return Ok(());
        }
        let metrics = self.shared.metrics.clone();
        for out in planned {
            let frame = match &out.content {
                Some(content) => content.frame(&out.id, None, now_ms(), out.operation),
                None => encode(
                    &Message::with_body(out.id.clone(), now_ms(), &out.resource, &Body::Delete)
                        .with_version(&out.version),
                ),
            };
            let frame = frame.map_err(|e| e.to_string())?;
            self.ws.feed(Frame::text(frame)).await.map_err(|e| e.to_string())?;
            if is_membership(&out.resource) {
                metrics.memberships_sent.inc();
            } else {
                metrics.changes_sent.inc();
                if out.resend {
                    metrics.changes_resent.inc();
                }
            }
        }
        self.ws.flush().await.map_err(|e| e.to_string())?;
        self.last_sent = Instant::now();
        Ok(())
    }

    async fn send_body(&mut self, resource: &str, body: &Body, parent: Option<&str>) -> Result<(), String> {
        let mut msg = Message::with_body(self.delivery.next_id(), now_ms(), resource, body);
        msg.parent_id = parent.map(str::to_owned);
        match (encode(&msg), parent) {
            // An answer too big for one message is refused, and the session goes on.
            (Err(CodecError::Oversized(size)), Some(parent)) => {
                warn!(node = %self.node, %resource, size, "an answer is too big for one message; refused");
                let reason = format!("the answer is {size} bytes, more than one message holds; ask for less");
                let refusal = ErrorContent::new(ErrorCode::Unavailable, reason);
                self.write(&error(Some(parent), refusal)).await
            }
            _ => self.write(&msg).await,
        }
    }

    async fn write(&mut self, msg: &Message) -> Result<(), String> {
        send(&mut self.ws, msg).await?;
        self.last_sent = Instant::now();
        Ok(())
    }

    async fn receive(&mut self, text: &str) -> Result<(), String> {
        let metrics = self.shared.metrics.clone();
        let msg = match decode(text) {
            Ok(m) => m,
            Err(e) => {
                warn!(node = %self.node, error = %e, "invalid message from agent");
                metrics.bad_messages.inc();
                return self.write(&error(None, ErrorContent::new(ErrorCode::BadMessage, e.to_string()))).await;
            }
        };
        let body = match msg.body() {
            Ok(body) => body,
            Err(e) => {
                warn!(node = %self.node, error = %e, resource = %msg.resource, "invalid message from agent");
                metrics.bad_messages.inc();
                // An invalid event is dropped: sending it again cannot help. Anything else is
                // refused, and a status report is superseded by the agent's next one.
                if msg.operation == Operation::MetaSync && ResourceRef::microservice(&msg.resource).is_some() {
                    return self.send_body(&msg.resource, &Body::Response(Answer::Ack), Some(&msg.id)).await;
                }
                let refusal = ErrorContent::new(ErrorCode::BadMessage, e.to_string());
                return self.write(&error(Some(&msg.id), refusal)).await;
            }
        };
        match body {
            Body::Response(_) | Body::Error(_) => {
                let parent = msg.parent_id.clone().unwrap_or_default();
                if let Some(waiting) = self.asked.remove(&parent) {
                    let _ = waiting.send(msg);
                } else {
                    self.answered(&parent, &body);
                }
                Ok(())
            }
            Body::Keepalive | Body::NodeConnection(_) => Ok(()),
            _ if self.budget.check().is_err() => {
                let mut refusal = ErrorContent::new(
                    ErrorCode::Overloaded,
                    format!("more than {RATE_PER_SECOND} messages per second"),
                );
                refusal.retry_after_ms = Some(1000);
                let reply = Message::with_body(self.delivery.next_id(), now_ms(), &msg.resource, &Body::Error(refusal));
                self.write(&reply.answering(&msg.id)).await
            }
            Body::Query(query) => self.answer(&msg, query).await,
            Body::MetaSync(Report::Batch(batch)) => {
                metrics.reports_received(ReportPath::Batch, text.len(), batch.entries.len());
                if let Err(reason) = batch.check_bounds() {
                    warn!(node = %self.node, %reason, "refused a batch");
                    metrics.bad_messages.inc();
                    return self.write(&error(Some(&msg.id), ErrorContent::new(ErrorCode::BadMessage, reason))).await;
                }
                let index = &self.shared.index;
                let records = Records {
                    reporter: |n: &str| index.reporter(n),
                    enrolled: |n: &str| index.identity(n).filter(|i| !i.revoked).and_then(|i| i.key),
                };
                let judged = judge_batch(&self.node, batch, &records, &self.shared.cloud_key, now_ms());
                let Judged { taken, ack, waiting, forged } = judged;
                if let Some(reason) = waiting.first() {
                    debug!(node = %self.node, waiting = waiting.len(), %reason, "relayed reports left to come again");
                    metrics
                        .reports_not_taken
                        .get_or_create(&ReasonLabels { reason: "later" })
                        .inc_by(waiting.len() as u64);
                }
                if forged > 0 {
                    metrics
                        .reports_not_taken
                        .get_or_create(&ReasonLabels { reason: "bad_signature" })
                        .inc_by(forged as u64);
                }
                let refused = ack.refused.len() - forged;
                if refused > 0 {
                    metrics.reports_not_taken.get_or_create(&ReasonLabels { reason: "refused" }).inc_by(refused as u64);
                }
                let intake = self.intake(&metrics);
                for relayed in taken {
                    let held = (relayed.node == self.node).then(|| self.delivery.held());
                    intake.take(&relayed.node, Some(relayed.seq), &relayed.resource, relayed.report, held);
                }
                if let Some((first, reason)) = ack.refused.first() {
                    warn!(node = %self.node, refused = ack.refused.len(), forged, first = %first.node, %reason, "refused relayed reports");
                }
                self.send_body(BATCH_RESOURCE, &Body::Response(Answer::Batch(ack)), Some(&msg.id)).await
            }
            Body::MetaSync(report) => {
                metrics.reports_received(ReportPath::Direct, text.len(), 1);
                if let Err(reason) = in_time(&report, now_ms()).and_then(|()| within_bounds(&report)) {
                    warn!(node = %self.node, %reason, "refused a report");
                    metrics.reports_not_taken.get_or_create(&ReasonLabels { reason: "refused" }).inc();
                    let refusal = Body::Error(ErrorContent::new(ErrorCode::Forbidden, reason));
                    return self.send_body(&msg.resource, &refusal, Some(&msg.id)).await;
                }
                let intake = self.intake(&metrics);
                let held = Some(self.delivery.held());
                intake.take(&self.node, outbox_seq(&msg.id), &msg.resource, report, held);
                self.send_body(&msg.resource, &Body::Response(Answer::Ack), Some(&msg.id)).await
            }
            other => {
                // Changes only go cloud to edge; acknowledged so that the agent's outbox drains.
                debug!(node = %self.node, operation = ?other.operation(), resource = %msg.resource, "unexpected from agent");
                self.send_body(&msg.resource, &Body::Response(Answer::Ack), Some(&msg.id)).await
            }
        }
    }

    /// An ack or nack of a change this session sent.
    fn answered(&mut self, parent: &str, body: &Body) {
        let accepted = matches!(body, Body::Response(_));
        let Some(answered) = self.delivery.answered(parent, accepted, std::time::Instant::now()) else { return };
        let metrics = &self.shared.metrics;
        let membership = is_membership(&answered.resource);
        if let Body::Error(refusal) = body {
            warn!(node = %self.node, resource = %answered.resource, reason = %refusal.message, "agent refused a change; it is sent again later");
            // Users see it on the Microservice: an agent too old for a field, a full disk.
            if let Some(target) = self.shared.index.event_target(&self.node, &answered.resource) {
                let message = format!(
                    "{} refused the change: {}; it is sent again every {} s",
                    self.node,
                    refusal.message,
                    super::delivery::NACK_RETRY.as_secs()
                );
                let event = EventReport { warning: true, reason: CHANGE_REFUSED.to_owned(), message };
                self.shared.events.publish(target, &self.node, event);
            }
        }
        if !membership {
            let counter = if accepted { &metrics.changes_acked } else { &metrics.changes_nacked };
            counter.inc();
        }
    }

    /// The configuration snapshot `resource` (`namespace/config/name`), for a node that
    /// holds an assignment naming it; any other node is told it does not exist.
    async fn config_snapshot(&self, resource: &str) -> Result<ConfigData, ErrorContent> {
        let r = ResourceRef::parse(resource).map_err(|e| ErrorContent::new(ErrorCode::BadMessage, e.to_string()))?;
        let name = r.id.unwrap_or_default();
        if !self.shared.index.may_read_config(&self.node, r.namespace, name) {
            warn!(node = %self.node, %resource, "refused a configuration snapshot no assignment of the node names");
            return Err(ErrorContent::new(
                ErrorCode::Forbidden,
                format!("{resource} is not the configuration of any assignment of node {}", self.node),
            ));
        }
        crate::config::snapshot(&self.shared.client, r.namespace, name)
            .await
            .map_err(|e| ErrorContent::new(ErrorCode::Unavailable, e))
    }

    /// Answers an agent's query from the index.
    async fn answer(&mut self, msg: &Message, query: Query) -> Result<(), String> {
        let index = &self.shared.index;
        let answer = match query {
            Query::Nodes(scope) => {
                index.discover_nodes(&self.node, scope).map(|nodes| Answer::Nodes(NodesAnswer { nodes }))
            }
            Query::Endpoints { namespace, name } => index
                .discover_endpoints(&self.node, &namespace, &name)
                .map(|endpoints| Answer::Endpoints(EndpointsAnswer { endpoints })),
            Query::Resource if ResourceRef::parse(&msg.resource).is_ok_and(|r| r.res_type == CONFIG) => {
                self.config_snapshot(&msg.resource).await.map(Answer::Config)
            }
            Query::Resource => match index.assignment(&self.node, &msg.resource) {
                Some(prepared) => {
                    let frame = prepared.frame(&self.delivery.next_id(), Some(&msg.id), now_ms(), Operation::Response);
                    self.ws.send(Frame::text(frame.map_err(|e| e.to_string())?)).await.map_err(|e| e.to_string())?;
                    self.last_sent = Instant::now();
                    return Ok(());
                }
                None => Err(ErrorContent::new(
                    ErrorCode::NotFound,
                    format!("{} is not assigned to node {}", msg.resource, self.node),
                )),
            },
            Query::Unknown(why) => Err(ErrorContent::new(ErrorCode::NotFound, why)),
            Query::Log(_) => Err(ErrorContent::new(ErrorCode::BadMessage, "the cloud keeps no logs; ask an agent")),
        };
        let body = match answer {
            Ok(answer) => Body::Response(answer),
            Err(refusal) => Body::Error(refusal),
        };
        self.send_body(&msg.resource, &body, Some(&msg.id)).await
    }
}
