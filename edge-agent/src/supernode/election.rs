//! The supernode election: a pure function of what a node knows of its live peers,
//! so that every member who hears the same peers elects the same supernode, with
//! no coordination and no cloud. Eligibility and capacity come from the cloud's
//! membership, the same for every member; a heartbeat cannot claim them.

use supermesh_protocol::Capacity;

/// A node's capability, as the election compares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Score {
    /// `supernodeEligible`, from the membership: a node that is not eligible is never elected.
    pub eligible: bool,
    /// Whether the device stays put (a vehicle or phone is not stationary), as it says.
    pub stationary: bool,
    /// Capacity class, from the membership ([`Capacity::class`]).
    pub capacity: u32,
    /// When its agent started, milliseconds since the epoch: earlier is longer uptime.
    pub started_ms: i64,
}

/// A node that may be elected: its name and capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate<'a> {
    /// EdgeNode name.
    pub name: &'a str,
    /// What the election compares.
    pub score: Score,
}

/// The supernode among `live` nodes: the eligible one with the best capability.
///
/// Compared in this order, first difference wins:
/// 1. stationary devices before mobile ones (a supernode should not drive away);
/// 2. higher capacity class (CPU cores, then memory);
/// 3. longer uptime (earlier agent start), which also keeps an incumbent in office
///    when an equal node joins, so the cluster does not flap;
/// 4. the smaller name, so that ties break the same way everywhere.
///
/// Nodes with `eligible == false` are never elected; with none eligible there is no supernode.
pub fn elect<'a>(live: &[Candidate<'a>]) -> Option<&'a str> {
    live.iter().filter(|c| c.score.eligible).min_by(|a, b| rank(a).cmp(&rank(b))).map(|c| c.name)
}

/// Sort key: smaller is better.
fn rank<'a>(c: &Candidate<'a>) -> (bool, std::cmp::Reverse<u32>, i64, &'a str) {
    (!c.score.stationary, std::cmp::Reverse(c.score.capacity), c.score.started_ms, c.name)
}

/// The capacity class of a machine: CPU cores × 1000 + memory in GiB (capped at 999).
pub fn capacity(cpus: usize, memory_bytes: u64) -> u32 {
    let cpus = u32::try_from(cpus).unwrap_or(u32::MAX);
    Capacity { cpus, memory_bytes }.class()
}

/// This machine's capacity, from its CPU count and `/proc/meminfo`, as its agent tells the cloud.
pub fn local_capacity() -> Capacity {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map(|kib| kib * 1024)
        .unwrap_or(0);
    Capacity { cpus: u32::try_from(cpus).unwrap_or(u32::MAX), memory_bytes: memory }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, eligible: bool, stationary: bool, capacity: u32, started_ms: i64) -> Candidate<'_> {
        Candidate { name, score: Score { eligible, stationary, capacity, started_ms } }
    }

    #[test]
    fn the_best_capability_wins_in_order_of_importance() {
        // Stationary beats capacity and uptime.
        let live = [c("mobile", true, false, 8000, 1), c("fixed", true, true, 1000, 50)];
        assert_eq!(elect(&live), Some("fixed"));
        // Capacity beats uptime.
        let live = [c("old", true, true, 1000, 1), c("big", true, true, 4000, 50)];
        assert_eq!(elect(&live), Some("big"));
        // Uptime beats name.
        let live = [c("a", true, true, 1000, 50), c("z", true, true, 1000, 1)];
        assert_eq!(elect(&live), Some("z"));
        // Ties break on the smaller name.
        let live = [c("b", true, true, 1000, 1), c("a", true, true, 1000, 1)];
        assert_eq!(elect(&live), Some("a"));
    }

    #[test]
    fn ineligible_nodes_are_never_elected() {
        let live = [c("best", false, true, 9000, 1), c("ok", true, false, 1000, 9)];
        assert_eq!(elect(&live), Some("ok"));
        assert_eq!(elect(&[c("only", false, true, 1000, 1)]), None);
        assert_eq!(elect(&[]), None);
    }

    #[test]
    fn every_member_elects_the_same_node_whatever_order_it_hears_them_in() {
        let mut live = vec![
            c("n3", true, true, 2000, 30),
            c("n1", true, true, 2000, 10),
            c("n2", true, true, 2000, 10),
            c("n4", false, true, 9000, 1),
        ];
        let first = elect(&live);
        for _ in 0..live.len() {
            live.rotate_left(1);
            assert_eq!(elect(&live), first);
        }
        live.reverse();
        assert_eq!(elect(&live), Some("n1"));
        // The supernode leaves: the next best takes over.
        live.retain(|c| c.name != "n1");
        assert_eq!(elect(&live), Some("n2"));
    }

    #[test]
    fn capacity_classes_order_cores_then_memory() {
        assert_eq!(capacity(4, 8 << 30), 4008);
        assert!(capacity(8, 1 << 30) > capacity(4, 64 << 30));
        assert_eq!(capacity(1, u64::MAX), 1999);
        assert!(local_capacity().class() >= 1000);
        assert_eq!(capacity(usize::MAX, 0), 4_000_000_000, "capped, not wrapped");
    }
}
