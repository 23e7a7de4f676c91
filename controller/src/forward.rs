//! What one replica's agents report reaches the other replicas, so that every
//! replica's index holds every node's latest status: the leader counts all of them
//! in Microservice and Mesh status, and any replica answers discovery for any node.
//!
//! A replica forwards each status report it takes from the nodes it serves to every
//! other live replica, in one signed POST per peer every [`FLUSH_EVERY`] (the latest
//! report per node: a node that reports twice meanwhile is sent once). A peer that
//! cannot be reached keeps its queue until it can, or until it leaves the ring; a
//! replica that joins is sent the latest report of every node this one serves. No
//! API writes are involved: the leader writes statuses as often as a lone replica.
//!
//! The key that signs forwards is derived from the cloudhub CA's private key, which
//! only controller replicas hold (agents know the bootstrap secret, not this).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use supermesh_protocol::peer::{sign, verify};
use supermesh_protocol::StatusReport;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::index::Index;
use crate::metrics::Metrics;
use crate::replicas::{Replica, Replicas, Ring};

/// Path of the endpoint replicas forward reports to.
pub const PATH: &str = "/replica/v1/reports";
/// Header carrying the forward's signature.
pub const SIGNATURE_HEADER: &str = "x-supermesh-replica-signature";
/// How often queued reports go out.
pub const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// How long a POST to a peer may take.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Largest forward accepted, in bytes.
pub const MAX_BODY: usize = 64 * 1024 * 1024;

/// One forward: who sends it and the latest report of each node it names.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Forward {
    /// The sending replica's id.
    pub from: String,
    /// By node.
    pub reports: BTreeMap<String, StatusReport>,
}

/// Queues of reports for the other replicas, by replica id.
#[derive(Debug, Default)]
struct Queues {
    by_peer: HashMap<String, (Replica, BTreeMap<String, StatusReport>)>,
}

impl Queues {
    /// Queues `report` of `node` for every peer, replacing an older one.
    fn push(&mut self, node: &str, report: &StatusReport) {
        for (_, queue) in self.by_peer.values_mut() {
            if queue.get(node).is_none_or(|old| old.taken_ms < report.taken_ms) {
                queue.insert(node.to_owned(), report.clone());
            }
        }
    }

    /// Follows the ring: peers that left are dropped, new ones get `everything`.
    fn follow(&mut self, ring: &Ring, me: &str, everything: impl Fn() -> BTreeMap<String, StatusReport>) {
        self.by_peer.retain(|id, _| ring.replicas().iter().any(|r| &r.id == id));
        for replica in ring.replicas().iter().filter(|r| r.id != me) {
            if !self.by_peer.contains_key(&replica.id) {
                self.by_peer.insert(replica.id.clone(), (replica.clone(), everything()));
            }
        }
    }

    /// Takes what is queued for each peer.
    fn take(&mut self) -> Vec<(Replica, BTreeMap<String, StatusReport>)> {
        self.by_peer
            .values_mut()
            .filter(|(_, q)| !q.is_empty())
            .map(|(replica, q)| (replica.clone(), std::mem::take(q)))
            .collect()
    }

    /// Puts back what could not be delivered to `peer`, unless newer reports came meanwhile.
    fn put_back(&mut self, peer: &str, reports: BTreeMap<String, StatusReport>) {
        let Some((_, queue)) = self.by_peer.get_mut(peer) else { return };
        for (node, report) in reports {
            queue.entry(node).or_insert(report);
        }
    }
}

/// Hands the reports this replica takes to the others.
#[derive(Clone)]
pub struct Forwarder {
    queues: Arc<Mutex<Queues>>,
    replicas: Replicas,
}

impl Forwarder {
    /// Forwards what `index` takes from the nodes this replica serves, signed with `key`.
    pub fn start(index: Arc<Index>, replicas: Replicas, key: String, metrics: Arc<Metrics>) -> Forwarder {
        let forwarder = Forwarder { queues: Arc::default(), replicas };
        tokio::spawn(forwarder.clone().run(index, key, metrics));
        forwarder
    }

    /// Whether other replicas are live, to forward reports to.
    pub fn has_peers(&self) -> bool {
        !self.lock().by_peer.is_empty()
    }

    /// Queues `report` of `node` for the other replicas.
    pub fn report(&self, node: &str, report: &StatusReport) {
        self.lock().push(node, report);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn run(self, index: Arc<Index>, key: String, metrics: Arc<Metrics>) {
        let me = self.replicas.me().id.clone();
        let mut ring: watch::Receiver<Arc<Ring>> = self.replicas.subscribe();
        let served = |index: &Index, replicas: &Replicas| {
            let ring = replicas.ring();
            index.reports(|node| ring.owner(node).is_none_or(|r| r.id == replicas.me().id))
        };
        {
            let current = ring.borrow_and_update().clone();
            self.lock().follow(&current, &me, || served(&index, &self.replicas));
        }
        let http: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(TIMEOUT))
            .http_status_as_error(false)
            .proxy(None)
            .build()
            .into();
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                changed = ring.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let current = ring.borrow_and_update().clone();
                    self.lock().follow(&current, &me, || served(&index, &self.replicas));
                }
                _ = tick.tick() => {
                    // Peers at once: one that does not answer delays none of the others.
                    let sends = self.lock().take().into_iter().map(|(peer, reports)| {
                        let forward = Forward { from: me.clone(), reports };
                        async { (post(&http, &peer, &key, &forward).await, peer, forward) }
                    });
                    for (sent, peer, forward) in futures::future::join_all(sends).await {
                        if let Err(e) = sent {
                            debug!(peer = %peer.id, error = %e, "cannot forward reports; kept for the next try");
                            self.lock().put_back(&peer.id, forward.reports);
                        } else {
                            metrics.reports_forwarded.inc_by(forward.reports.len() as u64);
                        }
                    }
                }
            }
        }
    }
}

/// POSTs `forward` to `peer` with `http`, signed with `key`.
async fn post(http: &ureq::Agent, peer: &Replica, key: &str, forward: &Forward) -> Result<(), String> {
    let body = serde_json::to_vec(forward).map_err(|e| e.to_string())?;
    let signature = sign(key, &body);
    let url = format!("http://{}{PATH}", peer.peer);
    let http = http.clone();
    tokio::task::spawn_blocking(move || {
        let mut response = http
            .post(&url)
            .header(SIGNATURE_HEADER, &signature)
            .header("content-type", "application/json")
            .send(&body[..])
            .map_err(|e| format!("{url}: {e}"))?;
        match response.status().as_u16() {
            200 => Ok(()),
            status => {
                Err(format!("{url} answered {status}: {}", response.body_mut().read_to_string().unwrap_or_default()))
            }
        }
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Takes a forward from another replica: checks its signature, then gives the index its
/// reports. A snapshot the index holds already (the same report taken here directly, or
/// through a supernode) or a newer one wins. Returns how many reports it took, or why it
/// refused the forward.
pub fn receive(index: &Index, replicas: &Replicas, key: &str, body: &[u8], signature: &str) -> Result<usize, String> {
    if !verify(key, body, signature) {
        return Err("the signature does not match: the sender holds another CA".into());
    }
    let forward: Forward = serde_json::from_slice(body).map_err(|e| format!("not a forward of reports: {e}"))?;
    if forward.from == replicas.me().id {
        return Err("a forward from this replica itself".into());
    }
    Ok(forward.reports.into_iter().map(|(node, report)| index.take_status(&node, report, None)).filter(|&t| t).count())
}

/// The key replicas sign forwards with, derived from the CA's private key in PEM.
pub fn key(ca_key_pem: &str) -> String {
    sign(ca_key_pem, b"supermesh replica forwards")
}

/// Logs a refused forward.
pub fn refused(reason: &str) {
    warn!(%reason, "refused reports forwarded by a replica");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(taken_ms: i64) -> StatusReport {
        StatusReport { taken_ms, instances: Vec::new(), cluster: None }
    }

    fn replica(id: &str) -> Replica {
        Replica { id: id.into(), address: format!("{id}:10350"), peer: format!("{id}:8080") }
    }

    #[test]
    fn each_peer_gets_the_latest_report_of_each_node_once() {
        let mut queues = Queues::default();
        let ring = Ring::new(vec![replica("a"), replica("b"), replica("c")]);
        queues.follow(&ring, "a", BTreeMap::new);
        queues.push("n1", &report(1));
        queues.push("n1", &report(3));
        queues.push("n1", &report(2));
        queues.push("n2", &report(1));
        let mut taken = queues.take();
        taken.sort_by(|x, y| x.0.id.cmp(&y.0.id));
        let peers: Vec<&str> = taken.iter().map(|(r, _)| r.id.as_str()).collect();
        assert_eq!(peers, ["b", "c"], "not to itself");
        for (_, reports) in &taken {
            assert_eq!(reports["n1"].taken_ms, 3);
            assert_eq!(reports.len(), 2);
        }
        assert!(queues.take().is_empty(), "nothing twice");
    }

    #[test]
    fn an_unreachable_peer_keeps_its_queue_and_a_new_one_gets_everything() {
        let mut queues = Queues::default();
        queues.follow(&Ring::new(vec![replica("a"), replica("b")]), "a", BTreeMap::new);
        queues.push("n1", &report(1));
        let (_, failed) = queues.take().pop().unwrap();
        queues.push("n1", &report(5));
        queues.put_back("b", failed);
        let (_, again) = queues.take().pop().unwrap();
        assert_eq!(again["n1"].taken_ms, 5, "the newer report wins over the one put back");

        let everything = || BTreeMap::from([("n1".to_string(), report(5)), ("n2".to_string(), report(4))]);
        queues.follow(&Ring::new(vec![replica("a"), replica("b"), replica("c")]), "a", everything);
        let taken = queues.take();
        assert_eq!(taken.len(), 1, "b had everything already");
        assert_eq!((taken[0].0.id.as_str(), taken[0].1.len()), ("c", 2));
        // A peer that left is forgotten, and what was put back for it too.
        queues.follow(&Ring::new(vec![replica("a")]), "a", BTreeMap::new);
        queues.put_back("b", BTreeMap::from([("n1".to_string(), report(9))]));
        queues.push("n3", &report(1));
        assert!(queues.take().is_empty());
    }

    #[test]
    fn forwards_are_signed_with_a_key_agents_cannot_derive() {
        let key = key("-----BEGIN PRIVATE KEY-----\nMC4C...\n-----END PRIVATE KEY-----\n");
        assert_eq!(key.len(), 64);
        let body = serde_json::to_vec(&Forward { from: "b".into(), reports: BTreeMap::new() }).unwrap();
        assert!(verify(&key, &body, &sign(&key, &body)));
        assert!(!verify(&key, &body, &sign("the bootstrap secret", &body)));
    }
}
