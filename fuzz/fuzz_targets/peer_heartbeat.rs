//! Peer heartbeats as a node's cluster takes them from its UDP socket
//! (`supernode::Cluster`: `SignedHeartbeat::decode`, the cluster key's HMAC, the sender's
//! signature, freshness and replays, the peer table) and the election that follows.
//!
//! The input is one datagram per line. A line starting with `!` is sent as it is; any
//! other line is a heartbeat's JSON, sent as a member with the keys would send it: MACed
//! with the cluster key and signed with the key of the node it names (`member`'s when it
//! names none), with `NOW` in it replaced by the current time in milliseconds. Each input
//! meets a fresh cluster of node `super`, on network `home` with members `member` and
//! `loyal` (and `nokey`, which never enrolled).
//!
//! Besides not panicking: only listed members become peers or supernode.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, Mutex};

use libfuzzer_sys::fuzz_target;
use supermesh_agent::config;
use supermesh_agent::identity::Identity;
use supermesh_agent::metamanager::store::Store;
use supermesh_agent::metamanager::{self, EdgedEvent, MetaHandle};
use supermesh_agent::supernode::{fuzzing, Cluster};
use supermesh_fuzz::{fingerprint, sign};
use supermesh_protocol::peer::{self, SignedHeartbeat};
use supermesh_protocol::signing::Purpose;
use supermesh_protocol::{now_ms, Member, Membership, Message};
use tokio::sync::mpsc;

const JOIN: &str = "0000000000000000000000000000000000000000000000000000000000000000.abc123.0123456789abcdef";
const MEMBERS: [&str; 4] = ["super", "member", "loyal", "nokey"];

/// What every input's cluster shares: its node's configuration, identity and metamanager.
struct Rig {
    config: Arc<config::EdgeConfig>,
    identity: Arc<Identity>,
    meta: MetaHandle,
    to_cloud: mpsc::Sender<Message>,
    key: String,
    _runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    _ends: Mutex<(mpsc::Receiver<Message>, mpsc::Receiver<EdgedEvent>)>,
}

static RIG: LazyLock<Rig> = LazyLock::new(|| {
    let yaml = format!(
        "node: {{name: super, account: acme, network: home}}\n\
         cloud: {{address: \"127.0.0.1:10350\", token: \"{JOIN}\"}}\n\
         supernode: {{heartbeatSeconds: 1}}\n"
    );
    let config = Arc::new(config::parse(&yaml, "edge.yaml").expect("a valid edge.yaml"));
    let identity = Arc::new(Identity::load(None, Some(&JOIN.parse().expect("a join string"))).expect("a key"));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    let dir = tempfile::Builder::new().prefix("heartbeat").tempdir().expect("a data directory");
    let store = Store::open(dir.path().join("meta.db")).expect("a store");
    let (to_cloud, from_meta) = mpsc::channel(8);
    let (to_edged, edged) = mpsc::channel(8);
    let meta = runtime.block_on(async { metamanager::spawn(store, to_cloud.clone(), to_edged) });
    let key = peer::cluster_key("supermesh fuzz root", "home", 0);
    Rig { config, identity, meta, to_cloud, key, _runtime: runtime, _dir: dir, _ends: Mutex::new((from_meta, edged)) }
});

fn membership(key: &str) -> Membership {
    let member = |name: &str| Member {
        name: name.into(),
        account: "acme".into(),
        address: Some(format!("{name}.local:10360")),
        location: None,
        supernode_eligible: name != "loyal",
        key: (name != "nokey").then(|| fingerprint(name)),
        capacity: 1000,
    };
    Membership { network: "home".into(), key: key.into(), members: MEMBERS.map(member).into(), cloud_key: None }
}

/// The datagram a line stands for.
fn datagram(line: &str, key: &str) -> Vec<u8> {
    if let Some(raw) = line.strip_prefix('!') {
        return raw.as_bytes().to_vec();
    }
    let body = line.replace("NOW", &now_ms().to_string());
    let named =
        serde_json::from_str::<serde_json::Value>(&body).ok().and_then(|v| Some(v.get("node")?.as_str()?.to_owned()));
    let signature = sign(named.as_deref().unwrap_or("member"), Purpose::Heartbeat, body.as_bytes());
    let mac = peer::sign(key, body.as_bytes());
    serde_json::to_vec(&SignedHeartbeat { body, mac, signature }).expect("a datagram encodes")
}

fuzz_target!(|text: &str| {
    let rig = &*RIG;
    let cluster = Cluster::new(rig.config.clone(), rig.meta.clone(), rig.identity.clone(), rig.to_cloud.clone());
    cluster.set_membership(membership(&rig.key));
    let from: SocketAddr = "10.0.0.9:10360".parse().expect("an address");
    for line in text.lines() {
        fuzzing::heard(&cluster, &datagram(line, &rig.key), from);
    }
    let registry = cluster.own_registry().expect("the cluster has a membership");
    assert_eq!(registry.members.len(), MEMBERS.len(), "only members are listed");
    if let Some(supernode) = cluster.view().and_then(|v| v.supernode) {
        assert!(["super", "member"].contains(&supernode.as_str()), "{supernode} was elected supernode");
    }
});
