//! Delta delivery to one agent, as a pure state machine: what the agent holds,
//! what is in flight, and what to send so that it comes to hold what its node
//! should. The session feeds it the desired state, acks, nacks and the clock,
//! and sends what it returns; nothing here does I/O.
//!
//! Like Envoy's delta xDS: one change per resource in flight at a time is
//! tracked (a newer one replaces it), an ack records the version the agent
//! committed, an unanswered change is sent again after the ack timeout, and a
//! refused one waits before it is tried again.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use supermesh_protocol::{Operation, Prepared, ResourceRef, MEMBERSHIP, MICROSERVICE};

use crate::index::NodeDesired;

/// An unanswered change is sent again after this long.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// A refused change is tried again after this long.
pub const NACK_RETRY: Duration = Duration::from_secs(5);

/// Whether `resource` is of a type the cloud keeps on agents, so that a version an
/// agent states for it in its hello counts as held.
pub fn is_kept(resource: &str) -> bool {
    ResourceRef::parse(resource).is_ok_and(|r| r.id.is_some() && matches!(r.res_type, MICROSERVICE | MEMBERSHIP))
}

/// Whether `resource` is a network membership (counted apart from microservice changes).
pub fn is_membership(resource: &str) -> bool {
    ResourceRef::parse(resource).is_ok_and(|r| r.res_type == MEMBERSHIP)
}

/// One change to send.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Message id; the agent's answer names it as parent.
    pub id: String,
    /// Insert, Update or Delete.
    pub operation: Operation,
    /// Resource string.
    pub resource: String,
    /// Version sent (for Delete, the version being removed).
    pub version: String,
    /// The content, for Insert and Update.
    pub content: Option<Arc<Prepared>>,
    /// Whether an earlier send of this resource went unanswered.
    pub resend: bool,
}

/// What an answer said about a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answered {
    /// Resource string of the change.
    pub resource: String,
    /// Whether the agent committed it (ack) or refused it (nack).
    pub accepted: bool,
}

#[derive(Debug)]
struct Inflight {
    resource: String,
    /// Version being installed, or `None` for a delete.
    version: Option<String>,
    sent: Instant,
}

/// The delivery state of one session.
#[derive(Debug)]
pub struct Delivery {
    prefix: String,
    counter: u64,
    /// Versions the agent has committed, by resource.
    held: BTreeMap<String, String>,
    /// Changes sent and not answered, by message id.
    inflight: HashMap<String, Inflight>,
    /// The id of the newest change in flight, by resource.
    latest: HashMap<String, String>,
    /// Resources whose newest change was refused, and when to try again.
    retry_at: HashMap<String, Instant>,
    /// Resources whose change went unanswered: their next send is a resend.
    unanswered: HashMap<String, ()>,
}

impl Delivery {
    /// The state of session `session` of an agent that states it holds `held`
    /// (only resources the cloud keeps on agents count).
    pub fn new(session: u64, held: BTreeMap<String, String>) -> Delivery {
        Delivery {
            prefix: format!("c{session}-"),
            counter: 0,
            held: held.into_iter().filter(|(r, _)| is_kept(r)).collect(),
            inflight: HashMap::new(),
            latest: HashMap::new(),
            retry_at: HashMap::new(),
            unanswered: HashMap::new(),
        }
    }

    /// Versions the agent has committed, by resource.
    pub fn held(&self) -> &BTreeMap<String, String> {
        &self.held
    }

    /// Number of changes in flight.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// A fresh message id of this session.
    pub fn next_id(&mut self) -> String {
        self.counter += 1;
        format!("{}{}", self.prefix, self.counter)
    }

    /// The changes to send at `now` so that the agent comes to hold `desired`.
    /// Nothing is sent while `desired` is incomplete: right after a controller
    /// start, an empty picture would tell every agent to delete its workloads.
    pub fn plan(&mut self, desired: &NodeDesired, now: Instant) -> Vec<Outgoing> {
        if !desired.complete {
            return Vec::new();
        }
        self.expire(now);
        self.retry_at.retain(|_, at| *at > now);
        // What the agent will hold once everything in flight is committed.
        let mut view: BTreeMap<&str, Option<&str>> =
            self.held.iter().map(|(r, v)| (r.as_str(), Some(v.as_str()))).collect();
        for id in self.latest.values() {
            if let Some(f) = self.inflight.get(id) {
                view.insert(f.resource.as_str(), f.version.as_deref());
            }
        }
        let mut wanted: Vec<(Operation, String, String, Option<Arc<Prepared>>)> = Vec::new();
        for (resource, prepared) in &desired.resources {
            if view.get(&**resource).copied().flatten() == Some(prepared.version.as_str()) {
                continue;
            }
            let operation = if self.held.contains_key(&**resource) { Operation::Update } else { Operation::Insert };
            wanted.push((operation, resource.to_string(), prepared.version.clone(), Some(prepared.clone())));
        }
        for (resource, version) in &view {
            if let (Some(version), false) = (version, desired.resources.contains_key(*resource)) {
                wanted.push((Operation::Delete, (*resource).to_owned(), (*version).to_owned(), None));
            }
        }
        wanted.retain(|(_, resource, _, _)| !self.retry_at.contains_key(resource));
        wanted
            .into_iter()
            .map(|(operation, resource, version, content)| {
                let id = self.next_id();
                let resend = self.unanswered.remove(&resource).is_some();
                let installs = (operation != Operation::Delete).then(|| version.clone());
                self.inflight.insert(id.clone(), Inflight { resource: resource.clone(), version: installs, sent: now });
                self.latest.insert(resource.clone(), id.clone());
                Outgoing { id, operation, resource, version, content, resend }
            })
            .collect()
    }

    /// Takes the agent's answer to message `parent`: an ack (`accepted`) records what it
    /// committed, a nack holds the resource back for [`NACK_RETRY`]. `None` for an answer
    /// to no change in flight (a late answer to a change already given up on).
    pub fn answered(&mut self, parent: &str, accepted: bool, now: Instant) -> Option<Answered> {
        let f = self.inflight.remove(parent)?;
        let newest = self.latest.get(&f.resource).is_some_and(|id| id == parent);
        if newest {
            self.latest.remove(&f.resource);
        }
        if accepted {
            match f.version {
                Some(v) => self.held.insert(f.resource.clone(), v),
                None => self.held.remove(&f.resource),
            };
        } else if newest {
            self.retry_at.insert(f.resource.clone(), now + NACK_RETRY);
        }
        Some(Answered { resource: f.resource, accepted })
    }

    /// When the session must look again even if nothing else happens: the first
    /// ack timeout or retry, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        let timeouts = self.inflight.values().map(|f| f.sent + ACK_TIMEOUT);
        timeouts.chain(self.retry_at.values().copied()).min()
    }

    /// Gives up waiting for answers older than [`ACK_TIMEOUT`]: their resources are sent again.
    fn expire(&mut self, now: Instant) {
        let expired: Vec<String> =
            self.inflight.iter().filter(|(_, f)| f.sent + ACK_TIMEOUT <= now).map(|(id, _)| id.clone()).collect();
        for id in expired {
            if let Some(f) = self.inflight.remove(&id) {
                if self.latest.get(&f.resource) == Some(&id) {
                    self.latest.remove(&f.resource);
                    self.unanswered.insert(f.resource, ());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use supermesh_protocol::{Assignment, Change, Member, Membership, Workload};

    fn assignment(name: &str, generation: i64) -> Arc<Prepared> {
        let spec: Workload = serde_json::from_value(serde_json::json!({"mesh": "m", "command": ["x"]})).unwrap();
        let a = Assignment {
            min_ready_seconds: 0,
            namespace: "team".into(),
            name: name.into(),
            uid: format!("u{name}"),
            generation,
            spec,
            config: None,
        };
        Arc::new(Prepared::new(&Change::Assignment(Box::new(a))))
    }

    fn membership(members: &[&str]) -> Arc<Prepared> {
        let members = members
            .iter()
            .map(|n| Member {
                name: (*n).into(),
                account: "a".into(),
                address: None,
                location: None,
                supernode_eligible: true,
                key: None,
                capacity: 0,
            })
            .collect();
        let membership = Membership { network: "lan".into(), key: "k".into(), members, cloud_key: None };
        Arc::new(Prepared::new(&Change::Membership(membership)))
    }

    fn desired(items: &[Arc<Prepared>]) -> NodeDesired {
        let resources = items.iter().map(|p| (p.resource.clone(), p.clone())).collect();
        NodeDesired { complete: true, resources, ..NodeDesired::default() }
    }

    fn sent(out: &[Outgoing]) -> Vec<(Operation, &str, &str)> {
        out.iter().map(|o| (o.operation, o.resource.as_str(), o.version.as_str())).collect()
    }

    fn ack_all(d: &mut Delivery, out: &[Outgoing], now: Instant) {
        for o in out {
            assert!(d.answered(&o.id, true, now).unwrap().accepted);
        }
    }

    #[test]
    fn a_new_agent_gets_inserts_then_nothing_once_it_acked() {
        let t = Instant::now();
        let mut d = Delivery::new(7, BTreeMap::new());
        let want = desired(&[assignment("a", 1), assignment("b", 3)]);
        let out = d.plan(&want, t);
        assert_eq!(
            sent(&out),
            [(Operation::Insert, "team/microservice/a", "1-ua"), (Operation::Insert, "team/microservice/b", "3-ub")]
        );
        assert_eq!((out[0].id.as_str(), out[1].id.as_str()), ("c7-1", "c7-2"));
        assert!(out.iter().all(|o| o.content.is_some() && !o.resend));
        assert!(d.plan(&want, t).is_empty(), "what is in flight is not sent twice");
        ack_all(&mut d, &out, t);
        assert_eq!(d.held().len(), 2);
        assert!(d.plan(&want, t).is_empty());
        assert_eq!(d.next_deadline(), None, "nothing to wait for");
    }

    #[test]
    fn nothing_is_sent_until_the_picture_is_complete() {
        let mut d = Delivery::new(1, BTreeMap::from([("team/microservice/a".to_string(), "1-ua".to_string())]));
        let incomplete = NodeDesired::default();
        assert!(d.plan(&incomplete, Instant::now()).is_empty(), "no delete of what the agent runs");
    }

    #[test]
    fn an_up_to_date_agent_gets_nothing_and_a_stale_one_only_the_difference() {
        let t = Instant::now();
        let held = BTreeMap::from([
            ("team/microservice/a".to_string(), "1-ua".to_string()),
            ("team/microservice/b".to_string(), "5-ub".to_string()),
            ("team/log/a".to_string(), "x".to_string()),
        ]);
        let mut d = Delivery::new(1, held.clone());
        assert_eq!(d.held().len(), 2, "only kept resources count as held");
        let want = desired(&[assignment("a", 2), assignment("c", 1)]);
        let out = d.plan(&want, t);
        assert_eq!(
            sent(&out),
            [
                (Operation::Update, "team/microservice/a", "2-ua"),
                (Operation::Insert, "team/microservice/c", "1-uc"),
                (Operation::Delete, "team/microservice/b", "5-ub")
            ]
        );
        assert!(out[2].content.is_none());
        ack_all(&mut d, &out, t);
        assert!(!d.held().contains_key("team/microservice/b"));
        let mut same = Delivery::new(2, held);
        assert_eq!(sent(&same.plan(&desired(&[assignment("a", 1), assignment("b", 5)]), t)), []);
    }

    #[test]
    fn a_newer_version_goes_out_at_once_even_while_the_older_is_in_flight() {
        let t = Instant::now();
        let mut d = Delivery::new(1, BTreeMap::new());
        let first = d.plan(&desired(&[assignment("a", 1)]), t);
        let second = d.plan(&desired(&[assignment("a", 2)]), t);
        assert_eq!(sent(&second), [(Operation::Insert, "team/microservice/a", "2-ua")]);
        // Acks come in order: the older first.
        d.answered(&first[0].id, true, t);
        assert_eq!(d.held()["team/microservice/a"], "1-ua");
        assert!(d.plan(&desired(&[assignment("a", 2)]), t).is_empty(), "version 2 is still in flight");
        d.answered(&second[0].id, true, t);
        assert_eq!(d.held()["team/microservice/a"], "2-ua");
    }

    #[test]
    fn an_unanswered_change_is_sent_again_after_the_ack_timeout() {
        let t = Instant::now();
        let mut d = Delivery::new(1, BTreeMap::new());
        let want = desired(&[assignment("a", 1)]);
        let out = d.plan(&want, t);
        assert_eq!(d.next_deadline(), Some(t + ACK_TIMEOUT));
        assert!(d.plan(&want, t + ACK_TIMEOUT - Duration::from_millis(1)).is_empty());
        let again = d.plan(&want, t + ACK_TIMEOUT);
        assert_eq!(sent(&again), [(Operation::Insert, "team/microservice/a", "1-ua")]);
        assert!(again[0].resend && again[0].id != out[0].id);
        assert_eq!(d.answered(&out[0].id, true, t + ACK_TIMEOUT), None, "a late answer to the first send is moot");
        assert!(d.answered(&again[0].id, true, t + ACK_TIMEOUT).unwrap().accepted);
        assert!(d.plan(&want, t + 3 * ACK_TIMEOUT).is_empty());
    }

    #[test]
    fn a_refused_change_waits_before_it_is_tried_again() {
        let t = Instant::now();
        let mut d = Delivery::new(1, BTreeMap::new());
        let want = desired(&[assignment("a", 1), assignment("b", 1)]);
        let out = d.plan(&want, t);
        let refused = d.answered(&out[0].id, false, t).unwrap();
        assert_eq!(refused, Answered { resource: "team/microservice/a".into(), accepted: false });
        d.answered(&out[1].id, true, t);
        assert!(d.plan(&want, t + Duration::from_secs(1)).is_empty(), "no hot loop on a refusal");
        assert_eq!(d.next_deadline(), Some(t + NACK_RETRY));
        let retry = d.plan(&want, t + NACK_RETRY);
        assert_eq!(sent(&retry), [(Operation::Insert, "team/microservice/a", "1-ua")]);
        assert!(!retry[0].resend, "a refusal is an answer, not a loss");
    }

    #[test]
    fn a_removed_resource_is_deleted_once_even_while_its_insert_is_in_flight() {
        let t = Instant::now();
        let mut d = Delivery::new(1, BTreeMap::new());
        let insert = d.plan(&desired(&[assignment("a", 1)]), t);
        let delete = d.plan(&desired(&[]), t);
        assert_eq!(sent(&delete), [(Operation::Delete, "team/microservice/a", "1-ua")]);
        assert!(d.plan(&desired(&[]), t).is_empty());
        d.answered(&insert[0].id, true, t);
        d.answered(&delete[0].id, true, t);
        assert!(d.held().is_empty());
    }

    #[test]
    fn memberships_go_through_the_same_delivery_as_assignments() {
        let t = Instant::now();
        let mut d = Delivery::new(1, BTreeMap::new());
        let first = membership(&["a"]);
        let out = d.plan(&desired(&[first.clone(), assignment("a", 1)]), t);
        assert_eq!(
            sent(&out),
            [
                (Operation::Insert, "_/membership/lan", first.version.as_str()),
                (Operation::Insert, "team/microservice/a", "1-ua")
            ]
        );
        ack_all(&mut d, &out, t);
        let second = membership(&["a", "b"]);
        let update = d.plan(&desired(&[second.clone(), assignment("a", 1)]), t);
        assert_eq!(sent(&update), [(Operation::Update, "_/membership/lan", second.version.as_str())]);
        assert!(is_membership(&update[0].resource) && !is_membership("team/microservice/a"));
    }

    #[test]
    fn only_microservices_and_memberships_count_as_held() {
        assert!(is_kept("team/microservice/a"));
        assert!(is_kept("_/membership/lan"));
        assert!(!is_kept("team/microservice"));
        assert!(!is_kept("team/log/a"));
        assert!(!is_kept("node/status"));
        assert!(!is_kept("not a resource"));
    }

    #[test]
    fn a_recreated_object_is_an_update_even_at_the_same_generation() {
        let t = Instant::now();
        let held = BTreeMap::from([("team/microservice/a".to_string(), "1-uold".to_string())]);
        let mut d = Delivery::new(1, held);
        assert_eq!(
            sent(&d.plan(&desired(&[assignment("a", 1)]), t)),
            [(Operation::Update, "team/microservice/a", "1-ua")]
        );
    }
}
