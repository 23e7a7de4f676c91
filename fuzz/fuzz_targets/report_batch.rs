//! Reports as the cloudhub takes them from a session: the frame decoded, a direct
//! status or event checked for its clock and bounds, and a supernode's batch checked
//! for bounds and judged (`judge_batch`: who may report for whom, signatures, receipts)
//! against fixed records of the cloud, the way `cloudhub::session` does before any I/O.
//!
//! Besides not panicking: every entry of a batch is taken, left to come again or
//! refused, exactly once; what is taken is acknowledged and reads well; every receipt
//! verifies for its node's enrolled key and names only reports of that node.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use supermesh_controller::cloudhub::reports::{
    in_time, judge_batch, outbox_seq, within_bounds, Records, Reporter, MAX_CLOCK_AHEAD_MS,
};
use supermesh_fuzz::fingerprint;
use supermesh_protocol::signing::CloudKey;
use supermesh_protocol::{decode, Body, Report};

/// The session's node: the supernode of network `home`.
const RELAY: &str = "super";
/// The cloud's clock.
const NOW_MS: i64 = 1_800_000_000_000;

static CLOUD: LazyLock<CloudKey> = LazyLock::new(|| CloudKey::derive("supermesh fuzz cloud"));

/// What the index says of each node: `member` and `loyal` are members of `home` (`loyal`
/// follows `super`), `rival` claims to be a supernode of `home` too, `stranger` is on
/// another network; any other node is unknown.
fn reporter(node: &str) -> Option<Reporter> {
    let on = |network: &str, supernode, follows: Option<&str>| {
        Some(Reporter { network: network.into(), supernode, follows: follows.map(str::to_owned), connected: true })
    };
    match node {
        "super" => on("home", true, Some("super")),
        "rival" => on("home", true, Some("rival")),
        "member" => on("home", false, None),
        "loyal" => on("home", false, Some("super")),
        "stranger" => on("elsewhere", true, None),
        _ => None,
    }
}

/// The keys nodes enrolled (`rival` has none: revoked).
fn enrolled(node: &str) -> Option<String> {
    matches!(node, "super" | "member" | "loyal" | "stranger").then(|| fingerprint(node))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(message) = decode(text) else { return };
    let Ok(Body::MetaSync(report)) = message.body() else { return };
    let batch = match report {
        Report::Batch(batch) => batch,
        report => {
            let _ = outbox_seq(&message.id);
            if in_time(&report, NOW_MS).and_then(|()| within_bounds(&report)).is_ok() {
                if let Report::Status(status) = &report {
                    assert!(status.taken_ms <= NOW_MS + MAX_CLOCK_AHEAD_MS);
                }
            }
            return;
        }
    };
    // The session refuses a batch out of bounds before it judges it.
    if batch.check_bounds().is_err() {
        return;
    }
    let entries = batch.entries.clone();
    let records = Records { reporter, enrolled };
    let judged = judge_batch(RELAY, batch, &records, &CLOUD, NOW_MS);
    let ack = &judged.ack;
    assert_eq!(ack.acked.len() + ack.refused.len() + judged.waiting.len(), entries.len(), "{text}");
    assert_eq!(judged.taken.len(), ack.acked.len());
    assert!(judged.forged <= ack.refused.len());
    for taken in &judged.taken {
        assert!(matches!(taken.report, Report::Status(_) | Report::Event(_)), "a batch in a batch: {text}");
        assert_eq!(within_bounds(&taken.report), Ok(()));
        assert_eq!(in_time(&taken.report, NOW_MS), Ok(()));
        assert!(reporter(&taken.node).is_some() || taken.node == RELAY, "{} is nobody the cloud knows", taken.node);
    }
    let public = CLOUD.public();
    for receipt in &ack.receipts {
        assert_ne!(receipt.node, RELAY, "the relay's own reports need no receipt");
        let key = enrolled(&receipt.node).expect("a receipt only for a node with an enrolled key");
        assert!(receipt.verify(&public, &receipt.node, &key));
        for r in &receipt.reports {
            let named =
                entries.iter().any(|e| e.node == receipt.node && e.seq == r.seq && e.created_ms == r.created_ms);
            assert!(named, "receipt for {} names a report it never sent: {r:?}", receipt.node);
        }
    }
});
