//! What a node takes of its peers' heartbeats once their signatures verified: only a
//! fresh heartbeat that is newer than the last one taken from the same sender. Pure
//! bookkeeping, no I/O.
//!
//! Within one start of the sender (its `startedMs`), a heartbeat must carry a higher
//! sequence number than the last one taken: a replay, from any address, is dropped. A
//! heartbeat of another start is taken when it was sent after the last one taken, so a
//! restarted node is heard at once while a recording of its previous life is not. Every
//! heartbeat must also have been sent within [`MAX_HEARTBEAT_AGE_MS`] of the receiver's
//! clock, which bounds how long a recording could ever matter.

use supermesh_protocol::peer::{DropReason, Dropped, Heartbeat, MAX_HEARTBEAT_AGE_MS};

/// The last heartbeat taken from a sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Last {
    /// Its start.
    pub started_ms: i64,
    /// Its sequence number.
    pub seq: u64,
    /// When it was sent.
    pub sent_ms: i64,
}

impl Last {
    /// What `hb` leaves as the last heartbeat taken.
    pub fn of(hb: &Heartbeat) -> Last {
        Last { started_ms: hb.started_ms, seq: hb.seq, sent_ms: hb.sent_ms }
    }
}

/// Whether `hb` may be taken at `now_ms`, after `last` from the same sender; if not, why.
pub fn judge(last: Option<Last>, hb: &Heartbeat, now_ms: i64) -> Result<(), Dropped> {
    let age = now_ms.saturating_sub(hb.sent_ms);
    if age.abs() > MAX_HEARTBEAT_AGE_MS {
        let when = if age > 0 { "ago" } else { "ahead" };
        return Err(Dropped::new(DropReason::Stale, format!("sent {} s {when}", age.abs() / 1000)));
    }
    let Some(last) = last else { return Ok(()) };
    let newer = match hb.started_ms == last.started_ms {
        true => hb.seq > last.seq,
        false => hb.sent_ms > last.sent_ms,
    };
    match newer {
        true => Ok(()),
        false => Err(Dropped::new(
            DropReason::Replayed,
            format!("heartbeat {} of the start at {} is not newer than {} taken", hb.seq, hb.started_ms, last.seq),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use supermesh_protocol::peer::PEER_VERSION;

    fn beat(started_ms: i64, seq: u64, sent_ms: i64) -> Heartbeat {
        Heartbeat {
            version: PEER_VERSION,
            node: "a".into(),
            network: "lan".into(),
            address: ":10360".into(),
            stationary: true,
            started_ms,
            cloud_connected: true,
            supernode: None,
            seq,
            sent_ms,
        }
    }

    fn reason(r: Result<(), Dropped>) -> Option<DropReason> {
        r.err().map(|d| d.reason)
    }

    #[test]
    fn a_sender_s_sequence_must_grow_within_one_start() {
        let now = 1_000_000;
        assert_eq!(judge(None, &beat(10, 1, now), now), Ok(()), "the first heartbeat heard");
        let last = Some(Last::of(&beat(10, 5, now)));
        assert_eq!(judge(last, &beat(10, 6, now), now), Ok(()));
        assert_eq!(reason(judge(last, &beat(10, 5, now), now)), Some(DropReason::Replayed), "the same again");
        assert_eq!(reason(judge(last, &beat(10, 4, now + 1), now)), Some(DropReason::Replayed), "an older one");
    }

    #[test]
    fn a_new_start_is_heard_at_once_and_a_recording_of_the_old_one_is_not() {
        let now = 1_000_000;
        let last = Some(Last::of(&beat(10, 500, now - 1_000)));
        assert_eq!(judge(last, &beat(20, 1, now), now), Ok(()), "restarted: its sequence starts again");
        let after_restart = Some(Last::of(&beat(20, 3, now)));
        assert_eq!(
            reason(judge(after_restart, &beat(10, 501, now - 500), now)),
            Some(DropReason::Replayed),
            "a heartbeat of its previous life, replayed"
        );
        // A device whose clock went back across its restart is heard once its beats are newer.
        assert_eq!(judge(last, &beat(5, 1, now), now), Ok(()));
    }

    #[test]
    fn heartbeats_sent_long_ago_or_ahead_are_stale() {
        let now = 1_000_000;
        let old = judge(None, &beat(10, 1, now - MAX_HEARTBEAT_AGE_MS - 1), now).unwrap_err();
        assert_eq!(old.reason, DropReason::Stale);
        assert!(old.detail.contains("ago"), "{old:?}");
        let ahead = judge(None, &beat(10, 1, now + MAX_HEARTBEAT_AGE_MS + 1), now).unwrap_err();
        assert!(ahead.reason == DropReason::Stale && ahead.detail.contains("ahead"), "{ahead:?}");
        assert_eq!(judge(None, &beat(10, 1, now - MAX_HEARTBEAT_AGE_MS), now), Ok(()));
    }
}
