//! End-to-end: an authenticated LAN. Real agents on loopback, the real controller and API
//! server, and a hostile member of their network played by the test: a device enrolled
//! with the site's token (its own key and certificate, listed in the membership the cloud
//! sends), which hears the agents' heartbeats because it is listed, and tries what a
//! compromised device on the LAN can: replay, forge, alter, flood. Each refusal is
//! asserted together with the victims' state being unchanged; what the agents dropped or
//! refused is read from their registries (the peer service, asked with each agent's own
//! certificate).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use supermesh_agent::edgehub::LinkError;
use supermesh_agent::identity::Identity;
use supermesh_protocol::peer::{
    self, AckPost, DropReason, Heartbeat, PeerRefusal, Registry, ReportPost, SignedHeartbeat, PEER_VERSION,
};
use supermesh_protocol::signing::CloudKey;
use supermesh_protocol::{
    decode, encode, now_ms, Answer, BatchAck, Body, Capacity, Change, ClusterView, Connection, Hello, Membership,
    Message, NodeRole, ProtocolVersion, Receipt, Receipted, RelayedReport, Report, ReportBatch, StatusReport,
    BATCH_RESOURCE, CONNECTION_RESOURCE, STATUS_RESOURCE,
};
use supermesh_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message as Frame;

/// A device of the site's network speaking the protocols by hand: enrolled, connected to
/// the cloud (acking what it is sent), listed in the membership with a peer address on
/// loopback, where it hears the agents' heartbeats.
struct Rogue {
    name: String,
    network: String,
    identity: Arc<Identity>,
    /// Its peer address's UDP socket (on 127.0.0.1).
    udp: Arc<UdpSocket>,
    port: u16,
    to_cloud: mpsc::Sender<Message>,
    membership: watch::Receiver<Option<Membership>>,
    answers: Arc<Mutex<HashMap<String, oneshot::Sender<Body>>>>,
    ids: AtomicU64,
    session: tokio::task::JoinHandle<()>,
}

impl Rogue {
    /// Enrolls `name` in `site`'s network and connects it, stating `capacity` in its hello.
    async fn join(site: &Site, name: &str, capacity: Option<Capacity>) -> Rogue {
        let port = free_port();
        let udp = Arc::new(UdpSocket::bind(("127.0.0.1", port)).await.expect("bind the rogue's peer port"));
        let (config, identity) = site.device(name);
        // Controllers of tests running at once are replicas of each other: follow a redirect.
        let mut dialed = supermesh_agent::edgehub::dial(&config, &identity).await;
        for _ in 0..3 {
            match dialed {
                Err(LinkError::Moved(to)) => dialed = supermesh_agent::edgehub::connect(&to, &identity).await,
                _ => break,
            }
        }
        let mut ws = dialed.expect("enroll and dial");
        let network = format!("net-{}", site.id);
        let hello = Hello {
            node: name.to_owned(),
            account: format!("acct-{}", site.id),
            network: network.clone(),
            agent_version: "rogue".into(),
            peer_address: Some(format!("127.0.0.1:{port}")),
            protocol: ProtocolVersion::CURRENT,
            capacity,
            ..Hello::default()
        };
        let hello = Body::NodeConnection(Connection::Hello(Box::new(hello)));
        let msg = Message::with_body("h-1".into(), now_ms(), CONNECTION_RESOURCE, &hello);
        ws.send(Frame::text(encode(&msg).unwrap())).await.unwrap();
        let (to_cloud, mut outgoing) = mpsc::channel::<Message>(64);
        let (known, membership) = watch::channel(None);
        let answers: Arc<Mutex<HashMap<String, oneshot::Sender<Body>>>> = Arc::default();
        let waiting = answers.clone();
        let session = tokio::spawn(async move {
            let mut keepalive = tokio::time::interval(Duration::from_secs(5));
            let mut n = 0u64;
            loop {
                let reply = tokio::select! {
                    frame = ws.next() => {
                        let Some(Ok(Frame::Text(text))) = frame else {
                            if matches!(frame, None | Some(Err(_)) | Some(Ok(Frame::Close(_)))) { return }
                            continue;
                        };
                        let Ok((msg, body)) = decode(&text).and_then(|m| m.body().map(|b| (m, b))) else { continue };
                        let waiter = msg.parent_id.as_ref().and_then(|p| waiting.lock().unwrap().remove(p));
                        if let Some(waiter) = waiter {
                            let _ = waiter.send(body);
                            continue;
                        }
                        if let Body::Insert(Change::Membership(m)) | Body::Update(Change::Membership(m)) = &body {
                            known.send_replace(Some(m.clone()));
                        }
                        if !matches!(body, Body::Insert(_) | Body::Update(_) | Body::Delete) {
                            continue;
                        }
                        n += 1;
                        let ack = Body::Response(Answer::Ack);
                        Message::with_body(format!("r-{n}"), now_ms(), &msg.resource, &ack).answering(&msg.id)
                    }
                    Some(msg) = outgoing.recv() => msg,
                    _ = keepalive.tick() => {
                        n += 1;
                        Message::with_body(format!("r-{n}"), now_ms(), CONNECTION_RESOURCE, &Body::Keepalive)
                    }
                };
                if ws.send(Frame::text(encode(&reply).unwrap())).await.is_err() {
                    return;
                }
            }
        });
        let rogue = Rogue {
            name: name.to_owned(),
            network,
            identity: Arc::new(identity),
            udp,
            port,
            to_cloud,
            membership,
            answers,
            ids: AtomicU64::new(1),
            session,
        };
        // A membership without the cloud's key comes from a controller of an older version: one
        // that serves this test's nodes as a replica (tests share the controllers' namespace).
        let mut known = rogue.membership.clone();
        let current = known.wait_for(|m| m.as_ref().is_some_and(|m| m.cloud_key.is_some()));
        let waited = tokio::time::timeout(DEADLINE, current).await;
        assert!(
            waited.is_ok(),
            "no membership with the cloud's key: a controller replica of an older version serves this node: {:?}",
            rogue.membership.borrow()
        );
        rogue
    }

    /// A heartbeat of this device: sequence `seq`, started at `started_ms`, sent now.
    fn heartbeat(&self, seq: u64, started_ms: i64) -> Heartbeat {
        Heartbeat {
            version: PEER_VERSION,
            node: self.name.clone(),
            network: self.network.clone(),
            address: format!("127.0.0.1:{}", self.port),
            stationary: true,
            started_ms,
            cloud_connected: true,
            supernode: None,
            seq,
            sent_ms: now_ms(),
        }
    }

    /// The cluster key of the current membership.
    fn cluster_key(&self) -> String {
        self.membership.borrow().as_ref().map(|m| m.key.clone()).expect("a membership")
    }

    /// `body` as a datagram: MACed with the cluster key, signed with `signer`'s key.
    fn datagram(&self, body: &str, signer: &Identity) -> Vec<u8> {
        let signature = signer.sign(supermesh_protocol::signing::Purpose::Heartbeat, body.as_bytes()).unwrap();
        let mac = peer::sign(&self.cluster_key(), body.as_bytes());
        serde_json::to_vec(&SignedHeartbeat { body: body.to_owned(), mac, signature }).unwrap()
    }

    /// Sends `datagram` to the agent's heartbeat port.
    async fn send(&self, to: &Agent, datagram: &[u8]) {
        self.udp.send_to(datagram, &to.peer_addr).await.expect("send a datagram");
    }

    /// The next heartbeat datagram of `node` that reaches this device (what came before is dropped).
    async fn capture(&self, node: &str) -> (Vec<u8>, Heartbeat) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let mut buf = vec![0u8; 4096];
        while self.udp.try_recv_from(&mut buf).is_ok() {}
        loop {
            let (len, _) = tokio::time::timeout_at(deadline, self.udp.recv_from(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no heartbeat of {node} reached {}", self.name))
                .expect("receive a datagram");
            let Ok(signed) = serde_json::from_slice::<SignedHeartbeat>(&buf[..len]) else { continue };
            let Ok(hb) = serde_json::from_str::<Heartbeat>(&signed.body) else { continue };
            if hb.node == node {
                return (buf[..len].to_vec(), hb);
            }
        }
    }

    /// Sends `body` on `resource` to the cloud as message `id` and returns the answer.
    async fn ask(&self, id: String, resource: &str, body: &Body) -> Body {
        let (tx, rx) = oneshot::channel();
        self.answers.lock().unwrap().insert(id.clone(), tx);
        self.to_cloud.send(Message::with_body(id, now_ms(), resource, body)).await.unwrap();
        tokio::time::timeout(DEADLINE, rx).await.expect("the cloud answers").unwrap()
    }

    /// Reports to the cloud, in its own status, that it is its network's supernode.
    async fn claim_supernode(&self) {
        let view = ClusterView { role: NodeRole::Supernode, supernode: Some(self.name.clone()) };
        let status = StatusReport { taken_ms: now_ms(), instances: vec![], cluster: Some(view) };
        let answer = self.ask("o-1".into(), STATUS_RESOURCE, &Body::MetaSync(Report::Status(status))).await;
        assert!(matches!(answer, Body::Response(_)), "{answer:?}");
    }

    /// Sends `entries` upstream as a supernode's batch and returns the cloud's answer.
    async fn relay(&self, entries: Vec<RelayedReport>) -> BatchAck {
        let id = format!("b-{}", self.ids.fetch_add(1, Ordering::Relaxed));
        let batch = Body::MetaSync(Report::Batch(ReportBatch { entries }));
        match self.ask(id, BATCH_RESOURCE, &batch).await {
            Body::Response(Answer::Batch(ack)) => ack,
            other => panic!("a batch answer, got {other:?}"),
        }
    }

    /// Its certificate chain and key, for TLS.
    fn credentials(&self) -> Credentials {
        self.identity.client_auth().expect("enrolled")
    }

    /// Serves the peer API as a supernode would take reports: every report post that comes
    /// in over mutual TLS (its own certificate; any client's) is answered 202 and handed over.
    async fn serve_reports(&self) -> mpsc::UnboundedReceiver<ReportPost> {
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await.expect("bind the rogue's peer port");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (chain, key) = self.credentials();
        let config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(Arc::new(AnyClient { provider }))
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (posts, received) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, posts) = (acceptor.clone(), posts.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let Some((path, body)) = read_request(&mut tls).await else { return };
                    let post = (path == peer::REPORTS_PATH).then(|| serde_json::from_slice::<ReportPost>(&body).ok());
                    let answer = match post.flatten() {
                        Some(post) => {
                            let _ = posts.send(post);
                            "HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
                        }
                        None => "HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
                    };
                    let _ = tls.write_all(answer.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        received
    }
}

impl Drop for Rogue {
    fn drop(&mut self) {
        self.session.abort();
    }
}

/// Reads one HTTP/1.1 request: its path and body.
async fn read_request(stream: &mut (impl AsyncReadExt + Unpin)) -> Option<(String, Vec<u8>)> {
    let mut data = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let end = loop {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
        if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&data[..end]).into_owned();
    let path = head.split_whitespace().nth(1)?.to_owned();
    let length: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().ok()))??;
    let mut body = data[end..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&buf[..n]);
    }
    Some((path, body))
}

/// Takes any client certificate: the rogue wants the reports, whoever sends them.
#[derive(Debug)]
struct AnyClient {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ClientCertVerifier for AnyClient {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The agent's registry of its cluster, asked as itself.
fn registry(agent: &Agent, root: &str) -> Option<Registry> {
    agent.registry(root)
}

fn dropped(registry: &Registry, reason: DropReason) -> u64 {
    registry.dropped.get(&reason).copied().unwrap_or(0)
}

fn refused(registry: &Registry, reason: PeerRefusal) -> u64 {
    registry.refused.get(&reason).copied().unwrap_or(0)
}

/// Polls `check` every 200 ms until it returns `Some`, failing with `what` after [`DEADLINE`].
async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until both agents are live for each other and follow `agents[0]`; returns their registries.
async fn settled(agents: [&Agent; 2], root: &str) -> [Registry; 2] {
    let supernode = agents[0].name.clone();
    eventually(&format!("both agents to follow {supernode}"), || {
        let both = [registry(agents[0], root)?, registry(agents[1], root)?];
        let live = |r: &Registry, n: &str| r.members.iter().any(|m| m.node == n && m.live);
        let ok = both.iter().all(|r| {
            r.supernode.as_deref() == Some(&supernode) && live(r, &agents[0].name) && live(r, &agents[1].name)
        });
        ok.then_some(both)
    })
    .await
}

fn address_of(registry: &Registry, node: &str) -> Option<String> {
    registry.members.iter().find(|m| m.node == node).and_then(|m| m.address.clone())
}

fn live(registry: &Registry, node: &str) -> bool {
    registry.members.iter().any(|m| m.node == node && m.live)
}

#[tokio::test]
async fn a_replayed_heartbeat_from_another_address_changes_nothing() {
    let site = Site::new("lan-replay").await;
    let root = cluster_key_root(&site.cluster.client).await;
    let spy = Rogue::join(&site, &format!("spy-{}", site.id), None).await;
    let mut a0 = site.agent(0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a1 = site.agent(1);
    let [_, before] = settled([&a0, &a1], &root).await;
    let a0_address = address_of(&before, &a0.name);
    assert_eq!(a0_address.as_deref(), Some(a0.peer_addr.as_str()));

    // The spy is listed, so a0's heartbeats reach it; it plays one to a1 from another address.
    let (recorded, hb) = spy.capture(&a0.name).await;
    let elsewhere = UdpSocket::bind("127.0.0.2:0").await.expect("bind another loopback address");
    let [_, before] = settled([&a0, &a1], &root).await;
    for _ in 0..5 {
        elsewhere.send_to(&recorded, &a1.peer_addr).await.unwrap();
    }
    let after = eventually("a1 to count 5 replays", || {
        registry(&a1, &root).filter(|r| dropped(r, DropReason::Replayed) >= dropped(&before, DropReason::Replayed) + 5)
    })
    .await;
    eprintln!("a1 dropped heartbeat {} of {} played again from 127.0.0.2: {:?}", hb.seq, a0.name, after.dropped);
    assert_eq!(dropped(&after, DropReason::Replayed), dropped(&before, DropReason::Replayed) + 5, "each one, once");
    assert_eq!(address_of(&after, &a0.name), a0_address, "a0 is still reached where it is");
    assert_eq!((after.supernode.as_deref(), after.elected_at), (Some(a0.name.as_str()), before.elected_at));

    // a0 dies; its recorded heartbeats, played again and again, do not keep it alive.
    let mut recent = Vec::new();
    for _ in 0..3 {
        recent.push(spy.capture(&a0.name).await.0);
    }
    let at_kill = registry(&a1, &root).expect("a1's registry").heartbeats;
    a0.kill9();
    let replaying = Arc::new(AtomicBool::new(true));
    let player = {
        let (replaying, to) = (replaying.clone(), a1.peer_addr.clone());
        tokio::spawn(async move {
            while replaying.load(Ordering::Relaxed) {
                for datagram in &recent {
                    let _ = elsewhere.send_to(datagram, &to).await;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let taken_over = eventually("a1 to take over from the dead a0", || {
        registry(&a1, &root).filter(|r| r.supernode.as_deref() == Some(a1.name.as_str()) && !live(r, &a0.name))
    })
    .await;
    replaying.store(false, Ordering::Relaxed);
    player.await.unwrap();
    eprintln!(
        "a1 took over at heartbeat {} (a0 killed at {at_kill}) while a0's beats were replayed; dropped: {:?}",
        taken_over.elected_at, taken_over.dropped
    );
    assert!(taken_over.elected_at <= at_kill + 4, "replays did not delay the takeover: {taken_over:?}");
    assert!(dropped(&taken_over, DropReason::Replayed) > dropped(&after, DropReason::Replayed));
    site.cleanup(&[&a0, &a1]).await;
}

#[tokio::test]
async fn a_forged_maximum_score_heartbeat_is_dropped_and_the_election_is_unchanged() {
    let site = Site::new("lan-forge").await;
    let root = cluster_key_root(&site.cluster.client).await;
    // The rogue tells the cloud nothing of its capacity: the membership gives it 0.
    let rogue = Rogue::join(&site, &format!("rogue-{}", site.id), None).await;
    let a0 = site.agent(0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a1 = site.agent(1);
    let [_, before] = settled([&a0, &a1], &root).await;

    // The best score there is, in heartbeats a1 hears that are not signed with the named node's
    // key: the rogue's (signed with a key it made up), and a0's (signed with the rogue's own key,
    // and with the made-up one).
    let made_up = site.device(&format!("nobody-{}", site.id)).1;
    let maximum = |node: &str, seq: u64| {
        let mut hb = serde_json::to_value(Heartbeat { node: node.to_owned(), ..rogue.heartbeat(seq, 0) }).unwrap();
        hb["score"] = serde_json::json!({"eligible": true, "stationary": true, "capacity": u32::MAX, "startedMs": 0});
        hb["capacity"] = serde_json::json!(u32::MAX);
        hb.to_string()
    };
    let forged = [
        rogue.datagram(&maximum(&rogue.name, 1_000_000), &made_up),
        rogue.datagram(&maximum(&a0.name, 1_000_000), &rogue.identity),
        rogue.datagram(&maximum(&a0.name, 1_000_001), &made_up),
    ];
    for datagram in &forged {
        rogue.send(&a1, datagram).await;
    }
    let after = eventually("a1 to drop the 3 forged heartbeats", || {
        registry(&a1, &root)
            .filter(|r| dropped(r, DropReason::BadSignature) >= dropped(&before, DropReason::BadSignature) + 3)
    })
    .await;
    eprintln!("a1 dropped the forged heartbeats: {:?}", after.dropped);
    assert_eq!(dropped(&after, DropReason::BadSignature), dropped(&before, DropReason::BadSignature) + 3);
    assert!(!live(&after, &rogue.name), "the rogue is not heard");
    assert_eq!((after.supernode.as_deref(), after.elected_at), (Some(a0.name.as_str()), before.elected_at));

    // Its genuine heartbeats, signed with its own key, claiming the same score: it is heard,
    // and the election still compares what the cloud's membership says.
    for seq in 1..=8 {
        rogue.send(&a1, &rogue.datagram(&maximum(&rogue.name, seq), &rogue.identity)).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let heard = registry(&a1, &root).expect("a1's registry");
    assert!(live(&heard, &rogue.name), "its own heartbeats are taken: {heard:?}");
    assert_eq!((heard.supernode.as_deref(), heard.elected_at), (Some(a0.name.as_str()), before.elected_at));
    let listed = rogue.membership.borrow().clone().expect("a membership");
    let capacity = |n: &str| listed.member(n).map(|m| m.capacity);
    assert_eq!(capacity(&rogue.name), Some(0), "the membership gives the rogue no capacity");
    assert!(capacity(&a0.name) > Some(0), "and the agents theirs: {listed:?}");
    site.cleanup(&[&a0, &a1]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_report_altered_by_the_supernode_is_refused_and_the_member_keeps_it() {
    let site = Site::new("lan-alter").await;
    let root = cluster_key_root(&site.cluster.client).await;
    // The rogue tells the cloud this machine's capacity, and claims the longest uptime: the
    // member elects it, as it would a genuine supernode that turned hostile.
    let capacity = supermesh_agent::supernode::election::local_capacity();
    let rogue = Arc::new(Rogue::join(&site, &format!("rogue-{}", site.id), Some(capacity)).await);
    let mut posts = rogue.serve_reports().await;
    let member = site.agent_with(0, "meta: {sync: {podstatus: {interval: 2}}}");
    let beating = Arc::new(AtomicBool::new(true));
    let beats = {
        let (rogue, beating, to) = (rogue.clone(), beating.clone(), member.peer_addr.clone());
        tokio::spawn(async move {
            let mut seq = 0;
            while beating.load(Ordering::Relaxed) {
                seq += 1;
                let hb = serde_json::to_string(&rogue.heartbeat(seq, 1)).unwrap();
                let _ = rogue.udp.send_to(&rogue.datagram(&hb, &rogue.identity), &to).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    };
    eventually("the member to follow the rogue", || {
        registry(&member, &root).filter(|r| r.supernode.as_deref() == Some(rogue.name.as_str()))
    })
    .await;
    rogue.claim_supernode().await;
    // Started only now, its instance's Started event is the member's to hand to its supernode.
    site.apply(&microservice("web", "m", ""));
    let events: Api<Event> = Api::namespaced(site.cluster.client.clone(), &site.ns);
    let key = site.key("web");

    // The member hands its reports to the rogue, each signed; the rogue keeps the Started event.
    let started = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let post = posts.recv().await.expect("report posts");
            if let Some(e) = post.entries.into_iter().find(|e| e.resource == key && e.content["reason"] == "Started") {
                return e;
            }
        }
    })
    .await
    .expect("the member hands its Started event to the rogue");
    assert_eq!(started.node, member.name);
    assert!(started.signature.is_some(), "the member signs what it hands over");
    let genuine = started.content["message"].as_str().unwrap_or_default().to_owned();

    // It relays the event altered, and another report it made up, in the member's name.
    let mut altered = started.clone();
    altered.content["message"] = serde_json::json!("pwned by the supernode");
    let made_up = RelayedReport { seq: started.seq + 1000, signature: None, ..altered.clone() };
    let ack = rogue.relay(vec![altered.clone(), made_up]).await;
    let refusals: Vec<&String> =
        ack.refused.iter().filter(|(id, _)| id.node == member.name).map(|(_, reason)| reason).collect();
    eprintln!("the cloud refused the rogue's relay: {refusals:?}");
    assert_eq!(refusals.len(), 2, "{ack:?}");
    assert!(refusals.iter().all(|r| r.contains(&format!("not node {}'s", member.name))), "{refusals:?}");
    assert!(ack.acked.iter().all(|id| id.node != member.name), "{ack:?}");
    assert!(ack.receipts.is_empty(), "no receipt for reports that are not the member's: {ack:?}");
    let forged = site.controller.metric("supermesh_controller_reports_not_taken_total", "reason=\"bad_signature\"");
    assert_eq!(forged, Some(2.0));

    // Nor can it make the member drop the event: receipts it makes are not the cloud's.
    let outbox = || {
        let store = supermesh_agent::metamanager::store::Store::open(member.data_dir.join("meta.db")).unwrap();
        store.pending(10_000).unwrap().into_iter().map(|e| (e.seq, e.created_ms)).collect::<Vec<_>>()
    };
    let named = vec![Receipted { seq: started.seq, created_ms: started.created_ms }];
    let fingerprint = rogue.membership.borrow().as_ref().and_then(|m| m.member(&member.name)?.key.clone()).unwrap();
    for receipt in [
        Receipt::sign(&CloudKey::derive("a guess at the cloud's secret"), &member.name, &fingerprint, named.clone()),
        Receipt { node: member.name.clone(), reports: named.clone(), signature: "00".repeat(64) },
    ] {
        let body = serde_json::to_vec(&AckPost { from: rogue.name.clone(), receipt }).unwrap();
        let signature = peer::sign(&rogue.cluster_key(), &body);
        let head = peer_head(peer::ACKS_PATH, &member.peer_addr, body.len(), Some(&signature));
        let (addr, credentials) = (member.peer_addr.clone(), rogue.credentials());
        let answer = tokio::task::spawn_blocking(move || peer_http_as(&addr, Some(credentials), &head, &body))
            .await
            .unwrap()
            .expect("the member answers its peer");
        eprintln!("the member answered a receipt the rogue made: {} {}", answer.status, answer.body);
        assert_eq!(answer.status, 403, "{answer:?}");
    }
    assert!(outbox().contains(&(started.seq, started.created_ms)), "the member keeps the event in its outbox");
    assert!(member.log().contains("a receipt not signed by the cloud for this node"));

    // Without a receipt from the cloud, the member reports directly: the genuine event arrives.
    let note = format!("{}: {genuine}", member.name);
    let deadline = Instant::now() + DEADLINE;
    let all = loop {
        let all = events.list(&ListParams::default()).await.unwrap().items;
        if all.iter().any(|e| e.reason.as_deref() == Some("Started") && e.note.as_deref() == Some(&note)) {
            break all;
        }
        assert!(Instant::now() < deadline, "the genuine Started event did not reach the cloud: {all:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("the genuine event arrived, reported directly: {note}");
    assert!(!all.iter().any(|e| e.note.as_deref().is_some_and(|n| n.contains("pwned"))), "no altered report taken");
    eventually("the event to leave the outbox", || {
        (!outbox().contains(&(started.seq, started.created_ms))).then_some(())
    })
    .await;
    beating.store(false, Ordering::Relaxed);
    beats.await.unwrap();
    site.cleanup(&[&member]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_or_oversized_peer_requests_are_refused_before_their_bodies_are_read() {
    const FLOOD: usize = 200;
    const BODY: usize = 4 * 1024 * 1024;
    let site = Site::new("lan-flood").await;
    let root = cluster_key_root(&site.cluster.client).await;
    let agent = site.agent(0);
    let before = eventually("the agent's registry", || registry(&agent, &root)).await;
    let pid = agent.pid().expect("the agent runs");
    let baseline = rss_kib(pid).expect("the agent's memory");

    // 200 requests at once, each with a 4 MiB body and no certificate (not even TLS).
    let head = format!("POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: {BODY}\r\n\r\n", peer::REPORTS_PATH);
    let body = Arc::new(vec![b'x'; BODY]);
    let floods: Vec<_> = (0..FLOOD)
        .map(|_| {
            let (addr, head, body) = (agent.peer_addr.clone(), head.clone(), body.clone());
            tokio::spawn(async move {
                let Ok(mut tcp) = tokio::net::TcpStream::connect(&addr).await else { return Vec::new() };
                if tcp.write_all(head.as_bytes()).await.is_ok() {
                    for chunk in body.chunks(64 * 1024) {
                        if tcp.write_all(chunk).await.is_err() {
                            break;
                        }
                    }
                }
                let mut answer = Vec::new();
                let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer)).await;
                answer
            })
        })
        .collect();
    let mut peak = baseline;
    let mut answers = Vec::new();
    for flood in floods {
        peak = peak.max(rss_kib(pid).unwrap_or(0));
        answers.push(flood.await.unwrap());
    }
    assert!(answers.iter().all(|a| !a.starts_with(b"HTTP/")), "no request was answered as HTTP");
    let after = eventually("the agent to count 200 refusals", || {
        let r = registry(&agent, &root)?;
        let counted = |r: &Registry| refused(r, PeerRefusal::Busy) + refused(r, PeerRefusal::Handshake);
        (counted(&r) >= counted(&before) + FLOOD as u64).then_some(r)
    })
    .await;
    let busy = refused(&after, PeerRefusal::Busy) - refused(&before, PeerRefusal::Busy);
    let handshake = refused(&after, PeerRefusal::Handshake) - refused(&before, PeerRefusal::Handshake);
    let grown = rss_kib(pid).unwrap_or(0).max(peak).saturating_sub(baseline);
    eprintln!(
        "{FLOOD} unsigned 4 MiB requests: {busy} closed at once (over the limit), {handshake} in their TLS handshake; \
         agent memory {baseline} KiB -> peak {} KiB (+{grown} KiB)",
        peak.max(baseline)
    );
    assert_eq!(busy + handshake, FLOOD as u64, "each refused once, unread");
    assert!(grown < 20 * 1024, "the agent's memory grew by {grown} KiB");

    // Over TLS without a certificate: refused in the handshake.
    let big = format!("POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: {BODY}\r\n\r\n", peer::REPORTS_PATH);
    let (addr, head) = (agent.peer_addr.clone(), big.clone());
    let anonymous = tokio::task::spawn_blocking(move || peer_http(&addr, None, &head, b"")).await.unwrap();
    assert!(anonymous.is_err(), "{anonymous:?}");
    // A member (the agent's own certificate), but too big or without the cluster key's HMAC:
    // answered from the head alone, the body never sent.
    let identity = identity_dir(&agent.name);
    let too_big = peer_head(peer::REPORTS_PATH, &agent.peer_addr, peer::MAX_BODY + 1, Some(&"0".repeat(64)));
    let unsigned = peer_head(peer::REGISTRY_PATH, &agent.peer_addr, 2, None);
    for (head, status) in [(too_big, 413), (unsigned, 401)] {
        let (addr, identity) = (agent.peer_addr.clone(), identity.clone());
        let answer = tokio::task::spawn_blocking(move || peer_http(&addr, Some(&identity), &head, b""))
            .await
            .unwrap()
            .expect("an answer");
        eprintln!("a member's request without its body: {} {}", answer.status, answer.body);
        assert_eq!(answer.status, status, "{answer:?}");
    }
    let last = registry(&agent, &root).expect("the agent still serves its peers");
    assert_eq!(refused(&last, PeerRefusal::Handshake), refused(&after, PeerRefusal::Handshake) + 1);
    assert_eq!(refused(&last, PeerRefusal::TooBig), refused(&before, PeerRefusal::TooBig) + 1);
    assert_eq!(refused(&last, PeerRefusal::Unsigned), refused(&before, PeerRefusal::Unsigned) + 1);
    site.cleanup(&[&agent]).await;
}
