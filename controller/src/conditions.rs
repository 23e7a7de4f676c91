//! Building status conditions that keep their transition time while unchanged.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// A condition to set: type, status (`True`/`False`/`Unknown`), reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// Condition type, for example `Ready`.
    pub type_: &'static str,
    /// `True`, `False` or `Unknown`.
    pub status: &'static str,
    /// One-word CamelCase reason.
    pub reason: &'static str,
    /// Human-readable explanation.
    pub message: String,
}

impl Wanted {
    /// A condition with status `True` or `False`.
    pub fn new(type_: &'static str, ok: bool, reason: &'static str, message: impl Into<String>) -> Self {
        let status = if ok { "True" } else { "False" };
        Wanted { type_, status, reason, message: message.into() }
    }
}

/// The conditions to write: `wanted`, keeping `lastTransitionTime` from `old`
/// for every condition whose status did not change.
pub fn merge(old: &[Condition], wanted: Vec<Wanted>, generation: Option<i64>) -> Vec<Condition> {
    wanted
        .into_iter()
        .map(|w| {
            let since = old
                .iter()
                .find(|c| c.type_ == w.type_ && c.status == w.status)
                .map(|c| c.last_transition_time.clone())
                .unwrap_or_else(|| Time(Timestamp::now()));
            Condition {
                type_: w.type_.to_owned(),
                status: w.status.to_owned(),
                reason: w.reason.to_owned(),
                message: w.message,
                observed_generation: generation,
                last_transition_time: since,
            }
        })
        .collect()
}

/// The reason of condition `type_`, if present.
pub fn reason<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a str> {
    conditions.iter().find(|c| c.type_ == type_).map(|c| c.reason.as_str())
}

/// Whether condition `type_` is present with status `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions.iter().any(|c| c.type_ == type_ && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_is_kept_while_status_is_unchanged() {
        let first = merge(&[], vec![Wanted::new("Ready", false, "A", "a")], Some(1));
        let since = first[0].last_transition_time.clone();
        let same = merge(&first, vec![Wanted::new("Ready", false, "B", "b")], Some(2));
        assert_eq!(same[0].last_transition_time, since);
        assert_eq!(same[0].reason, "B");
        assert_eq!(same[0].observed_generation, Some(2));
        let flipped = merge(&first, vec![Wanted::new("Ready", true, "C", "c")], Some(2));
        assert!(flipped[0].last_transition_time.0 >= since.0);
        assert_eq!(flipped[0].status, "True");
        assert!(is_true(&flipped, "Ready"));
        assert_eq!(reason(&flipped, "Ready"), Some("C"));
        assert_eq!(reason(&flipped, "Degraded"), None);
    }
}
