//! What the local API accepts: storage keys and values, events, request sizes,
//! and how many events a microservice may send a second.

use std::num::NonZeroU32;

use governor::{DefaultKeyedRateLimiter, Quota};
use serde::{Deserialize, Serialize};
use supermesh_protocol::EventReport;

/// Longest storage key, in bytes.
pub const MAX_KEY_BYTES: usize = 256;
/// Largest stored value, in bytes (64 KiB).
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Most keys one microservice may store.
pub const MAX_KEYS: usize = 1000;
/// Largest request body, in bytes: a value and some room for an event's JSON.
pub const MAX_BODY_BYTES: usize = MAX_VALUE_BYTES + 4 * 1024;
/// Longest event reason, in characters.
pub const MAX_REASON_CHARS: usize = 128;
/// Longest event message, in characters.
pub const MAX_MESSAGE_CHARS: usize = 1024;
/// Events a microservice may send a second, sustained.
pub const EVENTS_PER_SECOND: u32 = 20;
/// Events a microservice may send at once after a quiet spell.
pub const EVENT_BURST: u32 = 100;

/// Checks a storage key: 1 to 256 bytes of `A-Z a-z 0-9 . _ -`.
pub fn check_key(key: &str) -> Result<(), String> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    if (1..=MAX_KEY_BYTES).contains(&key.len()) && key.bytes().all(allowed) {
        return Ok(());
    }
    let shown: String = key.chars().take(64).collect();
    let ellipsis = if shown.len() < key.len() { "..." } else { "" };
    Err(format!(
        "invalid key {shown:?}{ellipsis} ({} bytes); expected 1 to {MAX_KEY_BYTES} bytes of A-Z a-z 0-9 . _ -",
        key.len()
    ))
}

/// Checks the size of a value to store.
pub fn check_value(len: usize) -> Result<(), String> {
    if len <= MAX_VALUE_BYTES {
        return Ok(());
    }
    Err(format!("the value has {len} bytes; at most {MAX_VALUE_BYTES} (64 KiB) may be stored under one key"))
}

/// Kind of an event a microservice sends, as Kubernetes Events know it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    /// Something worth knowing.
    Normal,
    /// Something that may need attention.
    Warning,
}

/// Body of `POST /v1/events`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EventPost {
    /// Normal or Warning.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// One word in UpperCamelCase, for example CacheWarmed.
    pub reason: String,
    /// What happened, for people.
    #[serde(default)]
    pub message: String,
}

/// The report of an event body, or why the body is not a valid event.
pub fn event_report(body: &[u8]) -> Result<EventReport, String> {
    let post: EventPost = serde_json::from_slice(body).map_err(|e| {
        format!(
            "the body is not an event: {e}; expected {{\"type\": \"Normal\" or \"Warning\", \"reason\": \
             \"OneWord\", \"message\": \"...\"}}"
        )
    })?;
    let reason_ok = post.reason.chars().count() <= MAX_REASON_CHARS
        && post.reason.starts_with(|c: char| c.is_ascii_alphabetic())
        && post.reason.chars().all(|c| c.is_ascii_alphanumeric());
    if !reason_ok {
        let shown: String = post.reason.chars().take(64).collect();
        return Err(format!(
            "invalid reason {shown:?}; expected 1 to {MAX_REASON_CHARS} letters and digits starting with a letter, \
             e.g. CacheWarmed"
        ));
    }
    let chars = post.message.chars().count();
    if chars > MAX_MESSAGE_CHARS {
        return Err(format!("the message has {chars} characters; at most {MAX_MESSAGE_CHARS} are allowed"));
    }
    Ok(EventReport { warning: post.kind == EventType::Warning, reason: post.reason, message: post.message })
}

/// Events each microservice may send: [`EVENTS_PER_SECOND`] sustained, bursts of [`EVENT_BURST`].
pub fn event_quota() -> Quota {
    let nonzero = |n: u32| NonZeroU32::new(n).expect("the limits are not zero");
    Quota::per_second(nonzero(EVENTS_PER_SECOND)).allow_burst(nonzero(EVENT_BURST))
}

/// The event limiter: one bucket per microservice key.
pub type EventLimiter = DefaultKeyedRateLimiter<String>;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn keys_are_short_and_plain() {
        for good in ["a", "config.json", "cache_v2-old", &"k".repeat(MAX_KEY_BYTES), "..", "-"] {
            assert_eq!(check_key(good), Ok(()), "{good:?}");
        }
        for bad in ["", "a/b", "a b", "ключ", "a%2Fb", &"k".repeat(MAX_KEY_BYTES + 1)] {
            let err = check_key(bad).unwrap_err();
            assert!(err.contains("expected 1 to 256 bytes of A-Z a-z 0-9 . _ -"), "{bad:?}: {err}");
        }
        assert!(check_key(&"k".repeat(1000)).unwrap_err().contains("\"... (1000 bytes)"), "long keys are cut");
    }

    #[test]
    fn values_are_at_most_64_kib() {
        assert_eq!(check_value(0), Ok(()));
        assert_eq!(check_value(65536), Ok(()));
        assert!(check_value(65537).unwrap_err().contains("65537 bytes"));
    }

    #[test]
    fn events_are_checked_and_become_reports() {
        let report = event_report(br#"{"type": "Warning", "reason": "DiskLow", "message": "5% left"}"#).unwrap();
        assert_eq!(report, EventReport { warning: true, reason: "DiskLow".into(), message: "5% left".into() });
        let normal = event_report(br#"{"type": "Normal", "reason": "R2d2"}"#).unwrap();
        assert_eq!((normal.warning, normal.message.as_str()), (false, ""));
        let long_message = format!(r#"{{"type": "Normal", "reason": "A", "message": "{}"}}"#, "é".repeat(1024));
        assert!(event_report(long_message.as_bytes()).is_ok(), "the limit counts characters, not bytes");

        let reason = |r: &str| format!(r#"{{"type": "Normal", "reason": "{r}"}}"#);
        let cases = [
            (reason(""), "invalid reason"),
            (reason("9Lives"), "invalid reason"),
            (reason("Two Words"), "invalid reason"),
            (reason("Dash-ed"), "invalid reason"),
            (reason(&"A".repeat(MAX_REASON_CHARS + 1)), "invalid reason"),
            (r#"{"type": "Error", "reason": "A"}"#.into(), "unknown variant `Error`"),
            (r#"{"reason": "A"}"#.into(), "missing field `type`"),
            (r#"{"type": "Normal", "reason": "A", "extra": 1}"#.into(), "unknown field `extra`"),
            ("not json".into(), "the body is not an event"),
            (format!(r#"{{"type": "Normal", "reason": "A", "message": "{}"}}"#, "x".repeat(1025)), "1025 characters"),
        ];
        for (body, hint) in cases {
            let err = event_report(body.as_bytes()).unwrap_err();
            assert!(err.contains(hint), "{body}: {err}");
        }
        assert!(event_report(&reason(&"A".repeat(MAX_REASON_CHARS)).into_bytes()).is_ok());
    }

    #[test]
    fn each_microservice_gets_a_burst_then_the_rate() {
        let clock = governor::clock::FakeRelativeClock::default();
        let limiter = governor::RateLimiter::hashmap_with_clock(event_quota(), clock.clone());
        let (web, db) = ("team/microservice/web".to_string(), "team/microservice/db".to_string());
        let take = |key: &String| limiter.check_key(key).is_ok();
        assert_eq!((0..150).filter(|_| take(&web)).count(), 100, "a full burst at once, no more");
        assert!(take(&db), "another microservice has its own bucket");
        clock.advance(Duration::from_millis(10));
        assert!(!take(&web), "a fifth of an event is not enough");
        clock.advance(Duration::from_millis(50));
        assert!(take(&web), "one event flows in every 50 ms");
        clock.advance(Duration::from_millis(1000));
        assert_eq!((0..50).filter(|_| take(&web)).count(), 20, "twenty a second");
        clock.advance(Duration::from_secs(3600));
        assert_eq!((0..500).filter(|_| take(&web)).count(), 100, "never more than the burst");
    }
}
