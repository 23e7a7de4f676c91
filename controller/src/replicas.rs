//! Several controller replicas, on Kubernetes' own machinery.
//!
//! Every replica serves cloudhub and announces itself in a Lease of its own
//! (`supermesh-replica-<id>` in the controller's namespace, labelled
//! [`REPLICA_LABEL`]): its id is the holder, the address agents reach its cloudhub
//! at is the annotation [`ADDRESS_ANNOTATION`], and it renews the Lease every third
//! of [`ANNOUNCE_DURATION`]. Replicas watch these Leases; one is live while its
//! Lease keeps changing, judged by the watcher's own clock (when a renewal was
//! seen, not the time written in it, as client-go's leader election does), so
//! replicas need not agree on the time.
//!
//! Each node belongs to one live replica, by rendezvous hashing of the node's name
//! and the replicas' ids ([`Ring::owner`]): a replica that leaves moves only its own
//! nodes, spread evenly over the others, and one that joins takes an even share.
//! A replica that stops deletes its Lease, so the others take its nodes at once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use supermesh_api::names::CONTROLLER_MANAGER;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::placement::weight;

/// Label of the Leases replicas announce themselves in.
pub const REPLICA_LABEL: &str = "supermesh.io/controller-replica";
/// Annotation of a replica's Lease: where agents reach its cloudhub (`host:port`).
pub const ADDRESS_ANNOTATION: &str = "supermesh.io/cloudhub-address";
/// Annotation of a replica's Lease: where the other replicas reach its HTTP endpoint.
pub const PEER_ANNOTATION: &str = "supermesh.io/peer-address";
/// A replica whose Lease has not changed for this long is gone.
pub const ANNOUNCE_DURATION: Duration = Duration::from_secs(6);
/// Prefix of the name of a replica's Lease.
const LEASE_PREFIX: &str = "supermesh-replica-";
/// The Lease of a replica gone this long (killed, so it could not withdraw it) is deleted.
const FORGET_AFTER: Duration = Duration::from_secs(300);

/// A controller replica: its id and where agents reach its cloudhub.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Replica {
    /// Unique among the replicas (the Pod name in a cluster).
    pub id: String,
    /// `host:port` of its cloudhub, as agents dial it.
    pub address: String,
    /// `host:port` of its HTTP endpoint, as the other replicas reach it.
    pub peer: String,
}

/// The live replicas, and which of them serves each node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ring {
    /// By id.
    replicas: Vec<Replica>,
}

impl Ring {
    /// The ring of `replicas`.
    pub fn new(mut replicas: Vec<Replica>) -> Ring {
        replicas.sort();
        replicas.dedup_by(|a, b| a.id == b.id);
        Ring { replicas }
    }

    /// The live replicas, by id.
    pub fn replicas(&self) -> &[Replica] {
        &self.replicas
    }

    /// The replica that serves `node`: the highest weight of node and replica id; ties
    /// (in practice never) break on id.
    pub fn owner(&self, node: &str) -> Option<&Replica> {
        self.replicas.iter().max_by(|a, b| weight(node, &a.id).cmp(&weight(node, &b.id)).then_with(|| b.id.cmp(&a.id)))
    }
}

/// One replica's Lease as last seen.
#[derive(Debug)]
struct Sighting {
    replica: Replica,
    /// What changes on every renewal.
    renewed: Option<String>,
    /// When this replica saw it change.
    seen: Instant,
    duration: Duration,
}

/// The replica Leases seen, and when each last changed by this replica's clock.
#[derive(Debug, Default)]
pub struct Seen {
    leases: BTreeMap<String, Sighting>,
    /// The Leases of a listing in progress.
    listing: Option<Vec<String>>,
}

impl Seen {
    /// Records `lease` as seen at `now` (`wall` by the calendar); a Lease that is not a
    /// replica's announcement is ignored. A renewal counts from when it is seen; only a
    /// Lease seen for the first time is judged by its renew time, so that the Lease a
    /// killed replica left behind does not count as live for a while.
    pub fn apply(&mut self, lease: &Lease, now: Instant, wall: Timestamp) {
        let Some(replica) = announced(lease) else { return };
        let spec = lease.spec.as_ref();
        let renew_time = spec.and_then(|s| s.renew_time.as_ref()).map(|t| t.0);
        let renewed = renew_time.map(|t| t.to_string());
        let duration = spec
            .and_then(|s| s.lease_duration_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .map_or(ANNOUNCE_DURATION, Duration::from_secs);
        let name = lease.name_any();
        if let Some(listing) = &mut self.listing {
            listing.push(name.clone());
        }
        let known = self.leases.get(&name);
        if known.is_some_and(|s| s.renewed == renewed && s.replica == replica) {
            return;
        }
        // Clocks may disagree by up to a duration before a first sighting counts as stale.
        let stale = known.is_none()
            && renew_time.is_none_or(|t| wall.duration_since(t).as_secs_f64() > 2.0 * duration.as_secs_f64());
        let seen = if stale { now.checked_sub(duration).unwrap_or(now) } else { now };
        self.leases.insert(name, Sighting { replica, renewed, seen, duration });
    }

    /// Forgets the Lease named `name`.
    pub fn delete(&mut self, name: &str) {
        self.leases.remove(name);
    }

    /// A fresh listing begins: what it does not list is forgotten when it is done.
    pub fn listing(&mut self) {
        self.listing = Some(Vec::new());
    }

    /// The listing is done: Leases it did not list are gone.
    pub fn listed(&mut self) {
        if let Some(listed) = self.listing.take() {
            self.leases.retain(|name, _| listed.contains(name));
        }
    }

    /// The Leases of replicas gone for longer than `age` at `now`.
    pub fn stale(&self, now: Instant, age: Duration) -> Vec<String> {
        let gone = |s: &Sighting| now.duration_since(s.seen) >= s.duration + age;
        self.leases.iter().filter(|(_, s)| gone(s)).map(|(name, _)| name.clone()).collect()
    }

    /// The ring at `now`: `me` and every replica whose Lease changed within its duration.
    /// Another id announcing this replica's own address is a previous incarnation of it
    /// (killed before it could withdraw), not a live replica.
    pub fn ring(&self, me: &Replica, now: Instant) -> Ring {
        let live = self
            .leases
            .values()
            .filter(|s| s.replica.id != me.id && s.replica.address != me.address)
            .filter(|s| now.duration_since(s.seen) < s.duration)
            .map(|s| s.replica.clone());
        Ring::new(std::iter::once(me.clone()).chain(live).collect())
    }
}

/// The replica a Lease announces, if it is a replica's announcement.
fn announced(lease: &Lease) -> Option<Replica> {
    lease.labels().get(REPLICA_LABEL)?;
    let id = lease.spec.as_ref()?.holder_identity.clone().filter(|id| !id.is_empty())?;
    let address = lease.annotations().get(ADDRESS_ANNOTATION).filter(|a| !a.is_empty())?.clone();
    let peer = lease.annotations().get(PEER_ANNOTATION).cloned().unwrap_or_default();
    Some(Replica { id, address, peer })
}

/// The Lease in which `me` announces itself, renewed now.
fn announcement(me: &Replica, duration: Duration) -> Lease {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": lease_name(&me.id),
            "labels": { REPLICA_LABEL: "true", "app.kubernetes.io/name": "supermesh-controller" },
            "annotations": { ADDRESS_ANNOTATION: me.address, PEER_ANNOTATION: me.peer },
        },
        "spec": {
            "holderIdentity": me.id,
            "leaseDurationSeconds": duration.as_secs(),
            "renewTime": MicroTime(Timestamp::now()),
        },
    }))
    .expect("a replica Lease is a valid Lease")
}

/// Name of the Lease of replica `id`.
pub fn lease_name(id: &str) -> String {
    format!("{LEASE_PREFIX}{id}")
}

/// This replica and the live replicas it sees.
#[derive(Clone)]
pub struct Replicas {
    me: Replica,
    ring: watch::Receiver<Arc<Ring>>,
    synced: watch::Receiver<bool>,
    leases: Api<Lease>,
}

impl Replicas {
    /// Announces `me` in `namespace` and follows the other replicas' announcements, calling
    /// `left` whenever a replica leaves, before anyone hears of the new ring: its nodes are
    /// coming to the others.
    pub fn start(client: Client, namespace: &str, me: Replica, left: impl Fn() + Send + 'static) -> Replicas {
        let leases: Api<Lease> = Api::namespaced(client, namespace);
        let (ring_tx, ring) = watch::channel(Arc::new(Ring::new(vec![me.clone()])));
        let (synced_tx, synced) = watch::channel(false);
        tokio::spawn(announce(leases.clone(), me.clone()));
        tokio::spawn(follow(leases.clone(), me.clone(), ring_tx, synced_tx, left));
        Replicas { me, ring, synced, leases }
    }

    /// A lone replica that announces nothing and sees nobody (tests).
    #[cfg(test)]
    pub fn alone(client: Client, me: Replica) -> Replicas {
        let (_, ring) = watch::channel(Arc::new(Ring::new(vec![me.clone()])));
        Replicas { me, ring, synced: watch::channel(true).1, leases: Api::default_namespaced(client) }
    }

    /// This replica.
    pub fn me(&self) -> &Replica {
        &self.me
    }

    /// The live replicas now.
    pub fn ring(&self) -> Arc<Ring> {
        self.ring.borrow().clone()
    }

    /// The live replicas, told on every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Ring>> {
        self.ring.clone()
    }

    /// The replica that serves `node` when it is not this one.
    pub fn elsewhere(&self, node: &str) -> Option<Replica> {
        self.ring.borrow().owner(node).filter(|r| r.id != self.me.id).cloned()
    }

    /// Waits until the announcements of the other replicas have been listed once.
    pub async fn wait_synced(&self) {
        let mut synced = self.synced.clone();
        let _ = synced.wait_for(|s| *s).await;
    }

    /// Withdraws this replica's announcement: the others take its nodes at once.
    pub async fn leave(&self) {
        match self.leases.delete(&lease_name(&self.me.id), &DeleteParams::default()).await {
            Ok(_) => info!(replica = %self.me.id, "withdrew this replica's announcement"),
            Err(e) => warn!(replica = %self.me.id, error = %e, "cannot withdraw this replica's announcement"),
        }
    }
}

/// Renews `me`'s announcement every third of its duration until the process ends.
async fn announce(leases: Api<Lease>, me: Replica) {
    let params = PatchParams::apply(CONTROLLER_MANAGER).force();
    let mut tick = tokio::time::interval(ANNOUNCE_DURATION / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let lease = announcement(&me, ANNOUNCE_DURATION);
        match leases.patch(&lease_name(&me.id), &params, &Patch::Apply(&lease)).await {
            Ok(_) if failing => {
                info!(replica = %me.id, "announcing this replica again");
                failing = false;
            }
            Ok(_) => {}
            Err(e) if !failing => {
                warn!(replica = %me.id, error = %e, "cannot renew this replica's announcement; the others will take its nodes");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

/// Follows the replicas' announcements, publishing the ring whenever it changes:
/// on a watch event, and when a Lease that stopped changing runs out.
async fn follow(
    leases: Api<Lease>,
    me: Replica,
    ring: watch::Sender<Arc<Ring>>,
    synced: watch::Sender<bool>,
    left: impl Fn(),
) {
    let config = watcher::Config::default().labels(REPLICA_LABEL);
    let mut events = watcher(leases.clone(), config).default_backoff().boxed();
    let mut seen = Seen::default();
    let mut expiry = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(watcher::Event::Init)) => seen.listing(),
                Some(Ok(watcher::Event::InitApply(lease) | watcher::Event::Apply(lease))) => {
                    seen.apply(&lease, Instant::now(), Timestamp::now());
                }
                Some(Ok(watcher::Event::Delete(lease))) => seen.delete(&lease.name_any()),
                Some(Ok(watcher::Event::InitDone)) => {
                    seen.listed();
                    synced.send_replace(true);
                }
                Some(Err(e)) => warn!(error = %e, "watching the replicas' announcements failed; retrying"),
                None => return,
            },
            _ = expiry.tick() => {
                for name in seen.stale(Instant::now(), FORGET_AFTER) {
                    seen.delete(&name);
                    info!(lease = %name, "deleting the announcement of a replica gone for long");
                    let leases = leases.clone();
                    tokio::spawn(async move { leases.delete(&name, &DeleteParams::default()).await });
                }
            }
        }
        let now = seen.ring(&me, Instant::now());
        ring.send_if_modified(|current| {
            if **current == now {
                return false;
            }
            let ids: Vec<&str> = now.replicas().iter().map(|r| r.id.as_str()).collect();
            info!(replicas = ?ids, "the live controller replicas changed");
            if current.replicas().iter().any(|r| !ids.contains(&r.id.as_str())) {
                left();
            }
            *current = Arc::new(now.clone());
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(id: &str) -> Replica {
        Replica { id: id.into(), address: format!("{id}.example:10350"), peer: format!("{id}.example:8080") }
    }

    fn nodes() -> Vec<String> {
        (0..3000).map(|i| format!("node-{i}")).collect()
    }

    #[test]
    fn nodes_spread_evenly_over_the_replicas() {
        let ring = Ring::new(vec![replica("a"), replica("b"), replica("c")]);
        let mut counts = BTreeMap::new();
        for node in nodes() {
            *counts.entry(ring.owner(&node).unwrap().id.clone()).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), 3);
        for (id, count) in counts {
            assert!((850..=1150).contains(&count), "replica {id} serves {count} of 3000 nodes");
        }
    }

    #[test]
    fn a_replica_leaving_moves_only_its_own_nodes() {
        let three = Ring::new(vec![replica("a"), replica("b"), replica("c")]);
        let two = Ring::new(vec![replica("a"), replica("c")]);
        let mut moved_to = BTreeMap::new();
        for node in nodes() {
            let (before, after) = (three.owner(&node).unwrap(), two.owner(&node).unwrap());
            if before.id == "b" {
                *moved_to.entry(after.id.clone()).or_insert(0) += 1;
            } else {
                assert_eq!(before, after, "{node} moved although its replica stayed");
            }
        }
        // b's thousand or so nodes go to both others, not all to one.
        assert!(moved_to.values().all(|&n| n > 350), "{moved_to:?}");
    }

    #[test]
    fn the_owner_does_not_depend_on_the_order_replicas_are_listed_in() {
        let one = Ring::new(vec![replica("c"), replica("a"), replica("b")]);
        let other = Ring::new(vec![replica("b"), replica("c"), replica("a"), replica("a")]);
        assert_eq!(one, other);
        assert_eq!(one.replicas().len(), 3);
        assert!(Ring::default().owner("node-1").is_none());
    }

    fn lease(id: &str, renewed: &str) -> Lease {
        let mut lease = announcement(&replica(id), ANNOUNCE_DURATION);
        lease.spec.as_mut().unwrap().renew_time = Some(MicroTime(renewed.parse().unwrap()));
        lease
    }

    #[test]
    fn a_replica_is_live_while_its_lease_keeps_changing_by_the_watchers_clock() {
        let me = replica("a");
        let start = Instant::now();
        // This replica's calendar runs 5 s ahead of the one that renews: within tolerance.
        let wall: Timestamp = "2026-01-01T00:00:05Z".parse().unwrap();
        let mut seen = Seen::default();
        seen.apply(&lease("b", "2026-01-01T00:00:00Z"), start, wall);
        assert_eq!(seen.ring(&me, start).replicas().len(), 2);
        let restarted = Replica { id: "a2".into(), ..replica("b") };
        assert_eq!(
            seen.ring(&restarted, start).replicas(),
            std::slice::from_ref(&restarted),
            "b was its previous incarnation"
        );
        let later = start + ANNOUNCE_DURATION - Duration::from_secs(1);
        seen.apply(&lease("b", "2026-01-01T00:00:00Z"), later, wall);
        assert_eq!(seen.ring(&me, later).replicas().len(), 2);
        // Seen again unchanged: that is no renewal.
        let expired = start + ANNOUNCE_DURATION;
        assert_eq!(seen.ring(&me, expired).replicas(), std::slice::from_ref(&me));
        // Renewed: live again, for another duration from when the renewal was seen, whatever
        // time it states.
        seen.apply(&lease("b", "2001-01-01T00:00:02Z"), expired, wall);
        assert_eq!(seen.ring(&me, expired + Duration::from_secs(5)).replicas().len(), 2);
        assert!(seen.stale(expired, FORGET_AFTER).is_empty());
        let forgotten = expired + ANNOUNCE_DURATION + FORGET_AFTER;
        assert_eq!(seen.stale(forgotten, FORGET_AFTER), vec![lease_name("b")]);
        seen.delete(&lease_name("b"));
        assert_eq!(seen.ring(&me, expired).replicas(), &[me]);
    }

    #[test]
    fn the_lease_of_a_killed_replica_does_not_count_when_first_seen_nor_after_a_relisting() {
        let me = replica("a");
        let now = Instant::now() + Duration::from_secs(60);
        let wall: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let mut seen = Seen::default();
        // Left behind a minute ago by a killed replica.
        seen.apply(&lease("b", "2026-01-01T00:00:00Z"), now, wall);
        seen.apply(&lease("c", "2026-01-01T00:00:59Z"), now, wall);
        let ids = |ring: Ring| ring.replicas().iter().map(|r| r.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(seen.ring(&me, now)), ["a", "c"]);
        // A relisting that shows c unchanged keeps when it was seen; d vanished meanwhile.
        seen.apply(&lease("d", "2026-01-01T00:00:59Z"), now, wall);
        let later = now + ANNOUNCE_DURATION;
        seen.listing();
        seen.apply(&lease("b", "2026-01-01T00:00:00Z"), later, wall);
        seen.apply(&lease("c", "2026-01-01T00:00:59Z"), later, wall);
        seen.listed();
        assert_eq!(ids(seen.ring(&me, later)), ["a"]);
        assert_eq!(seen.leases.len(), 2, "d was not listed again: forgotten");
    }

    #[test]
    fn leases_that_announce_no_replica_are_ignored() {
        let me = replica("a");
        let now = Instant::now();
        let mut seen = Seen::default();
        let mut unlabelled = lease("b", "2026-01-01T00:00:00Z");
        unlabelled.metadata.labels = None;
        let mut no_address = lease("c", "2026-01-01T00:00:00Z");
        no_address.metadata.annotations = None;
        let mut no_holder = lease("d", "2026-01-01T00:00:00Z");
        no_holder.spec.as_mut().unwrap().holder_identity = None;
        let wall = "2026-01-01T00:00:01Z".parse().unwrap();
        seen.apply(&lease("e", "2026-01-01T00:00:00Z"), now, wall);
        assert_eq!(seen.ring(&me, now).replicas().len(), 2, "a well-formed announcement counts");
        seen.delete(&lease_name("e"));
        for l in [unlabelled, no_address, no_holder] {
            seen.apply(&l, now, wall);
        }
        assert_eq!(seen.ring(&me, now).replicas(), &[me]);
    }
}
