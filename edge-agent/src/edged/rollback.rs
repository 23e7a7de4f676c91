//! Rollback on the device: the decisions, as pure functions of what the cloud sent,
//! what the device keeps in SQLite ([`Revisions`]) and the instance's status.
//!
//! A version of a microservice whose assignment has `minReadySeconds` is on
//! probation until its instance has been ready for that long without a break. If
//! it fails meanwhile (unhealthy, crash-looping or failed), the agent refuses it and
//! runs the version it kept (the last one that proved itself here, or the one that
//! was running and ready when the new one arrived) — cloud or no cloud. The refusal
//! lasts until the cloud sends another version. Without a kept version, or with
//! `minReadySeconds: 0`, nothing is refused: the instance restarts with backoff.

use std::time::Duration;

use tokio::time::Instant;

use super::runtime::{human, Phase, Rollback};
use super::Desired;
use crate::metamanager::store::{Kept, Refusal, Revisions};

impl From<&Kept> for Desired {
    fn from(kept: &Kept) -> Desired {
        Desired { version: kept.version.clone(), value: kept.value.clone() }
    }
}

impl From<&Desired> for Kept {
    fn from(desired: &Desired) -> Kept {
        Kept { version: desired.version.clone(), value: desired.value.clone() }
    }
}

/// What edged runs for a microservice the cloud wants at `desired`: that version,
/// or the kept one while `desired` is refused (with why, for the report).
pub fn choose(desired: &Desired, revisions: &Revisions) -> (Desired, Option<Rollback>) {
    let refused = revisions.refused.as_ref().filter(|r| r.version == desired.version);
    match (refused, &revisions.previous) {
        (Some(refusal), Some(previous)) if previous.version != desired.version => (
            Desired::from(previous),
            Some(Rollback { from: refusal.version.clone(), message: refusal.message.clone() }),
        ),
        _ => (desired.clone(), None),
    }
}

/// The version to keep when the cloud sends `desired` while `running` runs in `phase`:
/// the running one, if it is ready and not kept already.
pub fn kept_on_arrival(running: &Desired, phase: Phase, desired: &Desired, revisions: &Revisions) -> Option<Kept> {
    let kept = revisions.previous.as_ref().is_some_and(|p| p.version == running.version);
    (running.version != desired.version && phase == Phase::Ready && !kept).then(|| Kept::from(running))
}

/// Whether a version running as the cloud sent it is on probation: it has a
/// `minReadySeconds` and has not proved itself on this device yet.
pub fn on_probation(desired: &Desired, min_ready_seconds: u32, revisions: &Revisions) -> bool {
    min_ready_seconds > 0 && revisions.previous.as_ref().is_none_or(|p| p.version != desired.version)
}

/// A version on probation: started at `started`, ready without a break since `ready_since`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probation {
    /// The version on probation.
    pub version: String,
    min_ready: Duration,
    started: Instant,
    ready_since: Option<Instant>,
}

/// What edged does about a version on probation after looking at its instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing yet; look again at this instant, or at the next status change.
    Wait(Option<Instant>),
    /// It stayed ready for `minReadySeconds`: keep it as the version to go back to.
    Keep(Kept),
    /// It failed: refuse it and go back to the kept version.
    Refuse(Refusal),
}

impl Probation {
    /// Probation of `version` for `min_ready_seconds`, from `now`.
    pub fn new(version: &str, min_ready_seconds: u32, now: Instant) -> Probation {
        Probation {
            version: version.to_owned(),
            min_ready: Duration::from_secs(min_ready_seconds.into()),
            started: now,
            ready_since: None,
        }
    }

    /// Judges the instance of `desired` (this probation's version) in `phase` with
    /// `message` at `now`; `None` while no status of this version is known.
    pub fn judge(
        &mut self,
        desired: &Desired,
        revisions: &Revisions,
        status: Option<(Phase, Option<&str>)>,
        now: Instant,
    ) -> Step {
        let Some((phase, message)) = status else { return Step::Wait(None) };
        if phase == Phase::Ready {
            let due = *self.ready_since.get_or_insert(now) + self.min_ready;
            return if now >= due { Step::Keep(Kept::from(desired)) } else { Step::Wait(Some(due)) };
        }
        self.ready_since = None;
        let previous = revisions.previous.as_ref().filter(|p| p.version != desired.version);
        match previous {
            Some(previous) if phase.is_failing() => Step::Refuse(Refusal {
                version: desired.version.clone(),
                back_to: previous.version.clone(),
                message: format!(
                    "version {} went {phase} {} after it started, within its minReadySeconds ({}s): {}; \
                     went back to version {}",
                    desired.version,
                    human(now.saturating_duration_since(self.started)),
                    self.min_ready.as_secs(),
                    message.unwrap_or("no detail"),
                    previous.version
                ),
            }),
            // No version to go back to: today's behaviour, restarts with backoff.
            _ => Step::Wait(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(version: &str) -> Desired {
        Desired { version: version.into(), value: format!("{{\"v\":\"{version}\"}}") }
    }

    fn kept(version: &str) -> Revisions {
        Revisions { previous: Some(Kept::from(&desired(version))), refused: None }
    }

    #[test]
    fn a_refused_version_runs_the_kept_one_until_the_cloud_sends_another() {
        let mut revisions = kept("1-u");
        assert_eq!(choose(&desired("2-u"), &revisions), (desired("2-u"), None), "nothing refused");
        revisions.refused = Some(Refusal { version: "2-u".into(), back_to: "1-u".into(), message: "why".into() });
        let (run, rollback) = choose(&desired("2-u"), &revisions);
        assert_eq!(run, desired("1-u"));
        assert_eq!(rollback, Some(Rollback { from: "2-u".into(), message: "why".into() }));
        assert_eq!(choose(&desired("3-u"), &revisions), (desired("3-u"), None), "a fix runs");
        revisions.previous = None;
        assert_eq!(choose(&desired("2-u"), &revisions), (desired("2-u"), None), "nothing to go back to");
    }

    #[test]
    fn the_running_version_is_kept_when_a_new_one_arrives_only_if_ready() {
        let none = Revisions::default();
        let (v1, v2) = (desired("1-u"), desired("2-u"));
        assert_eq!(kept_on_arrival(&v1, Phase::Ready, &v2, &none), Some(Kept::from(&v1)));
        assert_eq!(kept_on_arrival(&v1, Phase::Backoff, &v2, &none), None, "a crash-looping version is no way back");
        assert_eq!(kept_on_arrival(&v1, Phase::Ready, &v1, &none), None, "no new version");
        assert_eq!(kept_on_arrival(&v1, Phase::Ready, &v2, &kept("1-u")), None, "kept already");
    }

    #[test]
    fn only_versions_with_min_ready_seconds_not_yet_proven_are_on_probation() {
        assert!(on_probation(&desired("2-u"), 30, &kept("1-u")));
        assert!(on_probation(&desired("1-u"), 30, &Revisions::default()), "a first install proves itself too");
        assert!(!on_probation(&desired("2-u"), 0, &kept("1-u")), "minReadySeconds 0: never");
        assert!(!on_probation(&desired("2-u"), 30, &kept("2-u")), "proven already");
    }

    #[test]
    fn ready_without_a_break_for_min_ready_seconds_keeps_the_version() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let (v2, revisions) = (desired("2-u"), kept("1-u"));
        let mut p = Probation::new("2-u", 30, t0);
        assert_eq!(p.judge(&v2, &revisions, None, at(1)), Step::Wait(None), "no status of this version yet");
        assert_eq!(p.judge(&v2, &revisions, Some((Phase::Running, None)), at(2)), Step::Wait(None));
        assert_eq!(p.judge(&v2, &revisions, Some((Phase::Ready, None)), at(3)), Step::Wait(Some(at(33))));
        assert_eq!(p.judge(&v2, &revisions, Some((Phase::Ready, None)), at(20)), Step::Wait(Some(at(33))));
        assert_eq!(p.judge(&v2, &revisions, Some((Phase::Starting, None)), at(21)), Step::Wait(None), "a break");
        assert_eq!(p.judge(&v2, &revisions, Some((Phase::Ready, None)), at(22)), Step::Wait(Some(at(52))));
        assert_eq!(p.judge(&v2, &revisions, Some((Phase::Ready, None)), at(52)), Step::Keep(Kept::from(&v2)));
    }

    #[test]
    fn failing_within_min_ready_seconds_refuses_the_version_saying_why() {
        let t0 = Instant::now();
        let (v2, revisions) = (desired("2-u"), kept("1-u"));
        for phase in [Phase::Unhealthy, Phase::Backoff, Phase::Failed] {
            let mut p = Probation::new("2-u", 30, t0);
            p.judge(&v2, &revisions, Some((Phase::Ready, None)), t0 + Duration::from_secs(2));
            let why = Some("unhealthy: exec check exited with 1 (2 checks in a row)");
            let Step::Refuse(refusal) = p.judge(&v2, &revisions, Some((phase, why)), t0 + Duration::from_secs(7))
            else {
                panic!("{phase} within minReadySeconds refuses the version");
            };
            assert_eq!((refusal.version.as_str(), refusal.back_to.as_str()), ("2-u", "1-u"));
            assert_eq!(
                refusal.message,
                format!(
                    "version 2-u went {phase} 7s after it started, within its minReadySeconds (30s): \
                     unhealthy: exec check exited with 1 (2 checks in a row); went back to version 1-u"
                )
            );
        }
        let mut first_install = Probation::new("2-u", 30, t0);
        let failing = Some((Phase::Backoff, None));
        assert_eq!(first_install.judge(&v2, &Revisions::default(), failing, t0), Step::Wait(None), "restarts instead");
    }
}
