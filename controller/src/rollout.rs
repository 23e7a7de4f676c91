//! Rollouts: the revisions of what a Microservice runs, which revision each of its
//! nodes gets, and the waves that move the nodes from one revision to the next.
//!
//! Everything here is a pure function of the object (spec and status) and of what
//! the reconciler observes, so every controller replica derives the same targets:
//! the rollout's whole state is a few numbers in status (the revisions, how many
//! nodes, first in rendezvous order, run the updated one), never a per-node list.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use sha2::{Digest, Sha256};
use supermesh_api::microservice::{
    IntOrString, MicroserviceSpec, MicroserviceStatus, ResolvedConfig, Revision, Rollout, RolloutPhase, RolloutStatus,
    RolloutStrategy,
};
use supermesh_api::names::condition::*;
use supermesh_api::Microservice;
use supermesh_protocol::InstanceReport;

use crate::{config, wire};

/// Default growth factor of waves.
pub const DEFAULT_GROWTH: usize = 2;
/// Default `progressDeadlineSeconds`.
pub const DEFAULT_DEADLINE: u64 = 600;
/// How soon a reconciler looks again while a rollout progresses, at the latest.
pub const WATCH_EVERY: Duration = Duration::from_secs(2);

/// Hash of what runs of `spec` (its wire workload) with the values its references
/// resolved to (`config`): equal hashes are one revision.
pub fn hash(spec: &MicroserviceSpec, config: Option<&ResolvedConfig>) -> String {
    let json = serde_json::to_vec(&wire::workload(spec)).expect("a workload serializes");
    let mut digest = Sha256::new();
    digest.update(json);
    if let Some(config) = config {
        digest.update(b"\0config\0");
        digest.update(config.hash.as_bytes());
    }
    digest.finalize()[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `spec` rolls out in waves.
pub fn in_waves(spec: &MicroserviceSpec) -> bool {
    spec.rollout.as_ref().is_some_and(|r| r.strategy == RolloutStrategy::Waves)
}

/// One revision as nodes get it: its number and the spec it runs.
#[derive(Debug, Clone, Copy)]
pub struct Rev<'a> {
    /// Revision number.
    pub number: i64,
    /// The spec whose workload it runs.
    pub template: &'a MicroserviceSpec,
    /// The snapshot of the values its references resolved to.
    pub config: Option<&'a str>,
}

/// What the nodes of a Microservice should run.
#[derive(Debug, Clone, Copy)]
pub struct Targets<'a> {
    /// What nodes outside the rollout run.
    pub current: Rev<'a>,
    /// What the first `updated_nodes` nodes in rendezvous order run.
    pub updated: Rev<'a>,
    /// How many nodes run `updated`; `None`: all of them.
    pub updated_nodes: Option<usize>,
    /// No revision can run yet: the spec's references have not resolved and no kept
    /// revision runs meanwhile.
    pub unresolved: bool,
}

impl Targets<'_> {
    /// Whether the node of rendezvous `rank` (0 first) runs the updated revision.
    pub fn updates(&self, rank: usize) -> bool {
        self.updated_nodes.is_none_or(|k| rank < k)
    }
}

/// Whether `msvc` has a rollout in waves under way (not paused, rolled back or complete).
pub fn progressing(msvc: &Microservice) -> bool {
    let status = msvc.status.as_ref();
    let rollout = status.and_then(|s| s.rollout.as_ref());
    in_waves(&msvc.spec)
        && rollout.is_some_and(|r| r.phase == RolloutPhase::Progressing)
        && status.is_some_and(|s| s.current_revision != s.updated_revision)
}

/// The number of the revision `msvc`'s spec asks for, once its references resolved: a
/// kept revision of the same content keeps its number, a new content is numbered by the
/// generation asking for it (or one past the newest kept, when a ConfigMap or Secret
/// changed under the same generation).
pub fn spec_revision(msvc: &Microservice) -> Option<i64> {
    let hash = hash(&msvc.spec, config::resolved(msvc)?);
    let revisions = msvc.status.as_ref().map(|s| s.revisions.as_slice()).unwrap_or_default();
    let generation = msvc.metadata.generation.unwrap_or_default();
    Some(match revisions.iter().find(|r| r.hash == hash) {
        Some(kept) => kept.revision,
        None => revisions.iter().map(|r| r.revision + 1).max().unwrap_or(generation).max(generation),
    })
}

/// Which revision the nodes of `msvc` run, from its spec and status.
///
/// Without waves the spec's revision goes everywhere at once. With waves the status
/// says (written by the leading replica's reconciler, see [`advance`]); a spec change
/// it has not recorded yet holds the nodes where they are, and a spec back at the
/// current revision sends every node back at once.
///
/// While the spec's references are unresolved the nodes stay where the status has them;
/// with no kept revision nothing runs ([`Targets::unresolved`]).
pub fn targets(msvc: &Microservice) -> Targets<'_> {
    let resolved = config::resolved(msvc);
    let spec = Rev {
        number: spec_revision(msvc).unwrap_or(msvc.metadata.generation.unwrap_or_default()),
        template: &msvc.spec,
        config: resolved.flatten().map(|c| c.snapshot.as_str()),
    };
    fn everywhere(rev: Rev<'_>) -> Targets<'_> {
        Targets { current: rev, updated: rev, updated_nodes: None, unresolved: false }
    }
    let unresolved = Targets { unresolved: true, ..everywhere(spec) };
    let Some(status) = msvc.status.as_ref() else {
        return if resolved.is_some() { everywhere(spec) } else { unresolved };
    };
    let kept = |n: Option<i64>| {
        let r = status.revision(n?)?;
        Some(Rev { number: r.revision, template: &r.template, config: r.config.as_deref() })
    };
    let (Some(current), Some(updated)) = (kept(status.current_revision), kept(status.updated_revision)) else {
        return if resolved.is_some() { everywhere(spec) } else { unresolved };
    };
    // Unresolved references hold the nodes on the revisions the status gives them.
    let spec = if resolved.is_some() { spec } else { updated };
    if !in_waves(&msvc.spec) {
        return everywhere(spec);
    }
    if spec.number == current.number {
        return everywhere(current);
    }
    let updated_nodes = match status.rollout.as_ref() {
        None => None,
        Some(r) => match r.phase {
            RolloutPhase::Complete => None,
            RolloutPhase::RolledBack => Some(0),
            RolloutPhase::Progressing | RolloutPhase::Paused => Some(r.updated_nodes.max(0) as usize),
        },
    };
    match updated_nodes {
        None => everywhere(updated),
        Some(_) => Targets { current, updated, updated_nodes, unresolved: false },
    }
}

/// The assignment of revision `rev` of `msvc`, as agents are sent it.
pub fn assignment(msvc: &Microservice, rev: Rev<'_>) -> supermesh_protocol::Assignment {
    wire::assignment(msvc, rev.number, rev.template, rev.config)
}

/// Nodes in rendezvous order for the Microservice of uid `uid` make its waves, so the
/// canary nodes stay the same on every retry.
pub use crate::placement::order;

/// What the reconciler observes of one placed node.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    /// The node.
    pub name: &'a str,
    /// Whether its agent is connected.
    pub online: bool,
    /// Its latest report on the microservice.
    pub report: Option<&'a InstanceReport>,
}

/// An Event to publish about a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// Its action, one per revision and wave (`Revision2Wave3`), so that each shows apart.
    pub action: String,
    /// Warning or Normal.
    pub warning: bool,
    /// Reason.
    pub reason: &'static str,
    /// Message.
    pub message: String,
}

impl Note {
    fn new(warning: bool, reason: &'static str, message: String) -> Note {
        Note { action: String::new(), warning, reason, message }
    }
}

/// The revision part of a status, advanced by one look at the fleet.
#[derive(Debug, Clone, PartialEq)]
pub struct Advanced {
    /// `currentRevision`.
    pub current: i64,
    /// `updatedRevision`.
    pub updated: i64,
    /// `revisions`, with their counts.
    pub revisions: Vec<Revision>,
    /// `rollout`, for waves.
    pub rollout: Option<RolloutStatus>,
    /// Events to publish.
    pub notes: Vec<Note>,
    /// When to look again even if nothing changes.
    pub again: Option<Duration>,
}

/// Resolved `spec.rollout` for `nodes` placed nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Params {
    canary: usize,
    growth: usize,
    max_wave: usize,
    max_unavailable: usize,
    min_ready: Duration,
    deadline: Duration,
}

/// A count, or a share of `total` rounded up (`up`) or down.
fn resolve(field: &str, value: Option<&IntOrString>, total: usize, default: usize, up: bool) -> Result<usize, String> {
    match value {
        None => Ok(default),
        Some(IntOrString::Int(n)) => Ok((*n).max(0) as usize),
        Some(IntOrString::String(s)) => {
            let percent =
                s.strip_suffix('%').and_then(|p| p.trim().parse::<u32>().ok()).filter(|p| *p <= 100).ok_or_else(
                    || format!("spec.rollout.{field} {s:?} is neither a count nor a percentage like \"10%\""),
                )?;
            let share = total * percent as usize;
            Ok(if up { share.div_ceil(100) } else { share / 100 })
        }
    }
}

impl Params {
    fn of(r: &Rollout, nodes: usize) -> Result<Params, String> {
        Ok(Params {
            canary: resolve("canary", r.canary.as_ref(), nodes, 1, true)?.max(1),
            growth: r.growth_factor.map_or(DEFAULT_GROWTH, |g| g.max(1) as usize),
            max_wave: resolve("maxWave", r.max_wave.as_ref(), nodes, nodes, true)?.max(1),
            max_unavailable: resolve("maxUnavailable", r.max_unavailable.as_ref(), nodes, nodes, true)?.max(1),
            min_ready: Duration::from_secs(r.min_ready_seconds.max(0) as u64),
            deadline: Duration::from_secs(r.progress_deadline_seconds.map_or(DEFAULT_DEADLINE, |d| d.max(1) as u64)),
        })
    }

    /// Nodes updated once wave `wave` (1 for the canary) is rolled out, of `nodes`.
    fn through(&self, wave: i32, nodes: usize) -> usize {
        let (mut size, mut total) = (self.canary.min(self.max_wave), 0usize);
        for _ in 0..wave.max(0) {
            total = total.saturating_add(size);
            if total >= nodes {
                return nodes;
            }
            size = size.saturating_mul(self.growth).min(self.max_wave);
        }
        total.min(nodes)
    }
}

/// When to look again for something due in `due`: not later than [`WATCH_EVERY`].
fn soon(due: Duration) -> Duration {
    due.clamp(Duration::from_millis(100), WATCH_EVERY)
}

fn elapsed(since: Option<&Time>, now: Timestamp) -> Duration {
    since.map_or(Duration::ZERO, |t| Duration::try_from(now.duration_since(t.0)).unwrap_or(Duration::ZERO))
}

fn names(nodes: &[&str]) -> String {
    let shown: Vec<&str> = nodes.iter().take(MicroserviceStatus::MAX_FAILING).copied().collect();
    let more = nodes.len().saturating_sub(shown.len());
    let tail = if more > 0 { format!(" and {more} more") } else { String::new() };
    format!("{}{tail}", shown.join(", "))
}

/// Takes one look at the fleet of `msvc`: records the spec's revision, starts, advances,
/// pauses or rolls back its rollout. `nodes` are its placed nodes in rendezvous order;
/// unless `settled` (right after a controller start, while agents reconnect) a node
/// that seems offline is not skipped.
///
/// `None` while the spec's references are unresolved: nothing moves until they resolve.
pub fn advance(msvc: &Microservice, nodes: &[Observed<'_>], now: Timestamp, settled: bool) -> Option<Advanced> {
    let old = msvc.status.clone().unwrap_or_default();
    let uid = msvc.uid().unwrap_or_default();
    let config = config::resolved(msvc)?;
    let hash = hash(&msvc.spec, config);
    let spec_number = spec_revision(msvc)?;
    let mut revisions = old.revisions.clone();
    if !revisions.iter().any(|r| r.revision == spec_number) {
        revisions.push(Revision {
            revision: spec_number,
            hash,
            template: msvc.spec.clone(),
            config: config.map(|c| c.snapshot.clone()),
            instances: 0,
            ready: 0,
        });
    }
    let kept = |n: Option<i64>| n.filter(|n| revisions.iter().any(|r| r.revision == *n));
    let mut notes = Vec::new();
    let mut again = None;
    let (current, updated, rollout) = match (kept(old.current_revision), kept(old.updated_revision)) {
        (Some(current), Some(updated)) if in_waves(&msvc.spec) => {
            let rollout =
                old.rollout.clone().unwrap_or(RolloutStatus { phase: RolloutPhase::Complete, ..Default::default() });
            if spec_number == current && updated == current {
                (current, current, Some(rollout))
            } else if spec_number == current {
                let message = format!("revision {updated} was abandoned; every node runs revision {current}");
                let rollout = RolloutStatus {
                    phase: RolloutPhase::Complete,
                    message: Some(message.clone()),
                    ..Default::default()
                };
                notes.push(Note::new(false, ROLLOUT_COMPLETE, message));
                (current, current, Some(rollout))
            } else if spec_number != updated {
                // A new revision: the fleet runs the updated one if its rollout was done.
                let current = if rollout.phase == RolloutPhase::Complete { updated } else { current };
                let params = msvc.spec.rollout.as_ref().map(|r| Params::of(r, nodes.len()));
                let mut fresh = RolloutStatus { wave: 0, ..Default::default() };
                let message =
                    format!("revision {spec_number} replaces revision {current}, in waves over {} nodes", nodes.len());
                notes.push(Note::new(false, ROLLING_OUT, message));
                if let Some(Ok(params)) = params {
                    start_wave(&mut fresh, &params, nodes, now, &mut notes);
                }
                (current, spec_number, Some(fresh))
            } else {
                (current, updated, Some(rollout))
            }
        }
        _ => (spec_number, spec_number, None),
    };
    let rollout = rollout.map(|mut r| {
        if current != updated {
            again = step(msvc, &mut r, nodes, &uid, (updated, current), now, settled, &mut notes);
        }
        r.nodes = nodes.len() as i32;
        r
    });
    let (current, rollout) = match rollout {
        Some(r) if r.phase == RolloutPhase::Complete => (updated, Some(r)),
        other => (current, other),
    };
    let revisions = count(revisions, current, updated, rollout.as_ref(), nodes, &uid);
    let wave = rollout.as_ref().map_or(0, |r| r.wave);
    for note in &mut notes {
        note.action = format!("Revision{updated}Wave{wave}");
    }
    Some(Advanced { current, updated, revisions, rollout, notes, again })
}

/// Starts the next wave of `r`.
fn start_wave(r: &mut RolloutStatus, params: &Params, nodes: &[Observed<'_>], now: Timestamp, notes: &mut Vec<Note>) {
    let from = r.updated_nodes.max(0) as usize;
    r.wave += 1;
    let target = params.through(r.wave, nodes.len());
    r.updated_nodes = target.min(from + params.max_unavailable) as i32;
    r.wave_started_at = Some(Time(now));
    r.ready_since = None;
    r.phase = RolloutPhase::Progressing;
    r.pause_reason = None;
    let wave: Vec<&str> = nodes[from.min(target)..target].iter().map(|o| o.name).collect();
    let name = if r.wave == 1 { "canary wave".to_owned() } else { format!("wave {}", r.wave) };
    let message = format!("{name}: {} of {} nodes: {}", wave.len(), nodes.len(), names(&wave));
    r.message = Some(message.clone());
    notes.push(Note::new(false, ROLLOUT_WAVE, message));
}

fn pause(r: &mut RolloutStatus, reason: &str, message: String, notes: &mut Vec<Note>) {
    let again = r.phase == RolloutPhase::Paused && r.pause_reason.as_deref() == Some(reason);
    r.phase = RolloutPhase::Paused;
    r.pause_reason = Some(reason.to_owned());
    r.message = Some(message.clone());
    if !again {
        notes.push(Note::new(reason != PAUSED, ROLLOUT_PAUSED, message));
    }
}

/// Advances a rollout of revision `updated` (replacing `current`) that is not complete.
#[allow(clippy::too_many_arguments)]
fn step(
    msvc: &Microservice,
    r: &mut RolloutStatus,
    nodes: &[Observed<'_>],
    uid: &str,
    (updated, current): (i64, i64),
    now: Timestamp,
    settled: bool,
    notes: &mut Vec<Note>,
) -> Option<Duration> {
    if r.phase == RolloutPhase::RolledBack || r.phase == RolloutPhase::Complete {
        return None;
    }
    let spec = msvc.spec.rollout.clone().unwrap_or_default();
    let params = match Params::of(&spec, nodes.len()) {
        Ok(p) => p,
        Err(message) => {
            pause(r, INVALID_SPEC, message, notes);
            return None;
        }
    };
    let version = supermesh_protocol::version(updated, uid);
    let k = (r.updated_nodes.max(0) as usize).min(nodes.len());
    let wave = &nodes[..k];
    let runs = |o: &Observed<'_>| o.report.is_some_and(|i| i.version == version);
    let failing: Vec<&str> = wave
        .iter()
        .filter(|o| {
            o.report.is_some_and(|i| {
                (i.version == version && i.phase.is_failing()) || i.rolled_back_from.as_deref() == Some(&*version)
            })
        })
        .map(|o| o.name)
        .collect();
    let ready = wave.iter().filter(|o| runs(o) && o.report.is_some_and(|i| i.ready)).count();
    let offline: Vec<&str> = wave.iter().filter(|o| !o.online && !runs(o)).map(|o| o.name).collect();
    r.offline_nodes = offline.len() as i32;
    r.failing_nodes = failing.iter().take(MicroserviceStatus::MAX_FAILING).map(|n| (*n).to_owned()).collect();
    let threshold = resolve("failureThreshold", spec.failure_threshold.as_ref(), k, 0, false);
    let threshold = match threshold {
        Ok(t) => t,
        Err(message) => {
            pause(r, INVALID_SPEC, message, notes);
            return None;
        }
    };
    if failing.len() > threshold {
        let message = format!(
            "{} of {k} updated instances of revision {updated} failed (allowed: {threshold}): {}",
            failing.len(),
            names(&failing)
        );
        if spec.auto_rollback {
            r.phase = RolloutPhase::RolledBack;
            r.pause_reason = None;
            let message = format!("{message}; every node goes back to revision {current}");
            r.message = Some(message.clone());
            notes.push(Note::new(true, ROLLED_BACK, message));
        } else {
            pause(r, HEALTH_GATE, format!("{message}; fix the spec, `rollout undo` or `rollout resume`"), notes);
        }
        return None;
    }
    if spec.paused {
        pause(r, PAUSED, "paused by spec.rollout.paused".to_owned(), notes);
        return None;
    }
    match (r.phase, r.pause_reason.as_deref()) {
        (RolloutPhase::Paused, Some(PAUSED) | Some(INVALID_SPEC)) => {
            r.phase = RolloutPhase::Progressing;
            r.pause_reason = None;
            let message = format!("resumed at wave {}", r.wave);
            notes.push(Note::new(false, ROLLING_OUT, message));
        }
        (RolloutPhase::Paused, _) => return None,
        _ => {}
    }
    if r.wave == 0 {
        start_wave(r, &params, nodes, now, notes);
        return Some(WATCH_EVERY);
    }
    let target = params.through(r.wave, nodes.len());
    let unavailable = k - ready;
    if k < target {
        // Within the wave, as fast as maxUnavailable lets.
        let more = params.max_unavailable.saturating_sub(unavailable);
        r.updated_nodes = target.min(k + more) as i32;
        return Some(WATCH_EVERY);
    }
    let online_ready = wave.iter().all(|o| !o.online || (runs(o) && o.report.is_some_and(|i| i.ready)));
    let age = elapsed(r.wave_started_at.as_ref(), now);
    if !online_ready {
        r.ready_since = None;
        if age >= params.deadline {
            let waiting: Vec<&str> = wave
                .iter()
                .filter(|o| o.online && !(runs(o) && o.report.is_some_and(|i| i.ready)))
                .map(|o| o.name)
                .collect();
            let message = format!(
                "wave {} waited {}s for its instances; not ready: {}",
                r.wave,
                params.deadline.as_secs(),
                names(&waiting)
            );
            pause(r, PROGRESS_DEADLINE_EXCEEDED, message, notes);
            return None;
        }
        r.message = Some(format!("wave {}: {ready} of {k} updated instances ready", r.wave));
        return Some(WATCH_EVERY);
    }
    let since = r.ready_since.get_or_insert(Time(now)).clone();
    let held = elapsed(Some(&since), now);
    if held < params.min_ready {
        r.message = Some(format!("wave {}: {ready} of {k} updated instances ready, held for minReadySeconds", r.wave));
        return Some(soon(params.min_ready.saturating_sub(held)));
    }
    if !offline.is_empty() && (age < params.deadline || !settled) {
        r.message = Some(format!("wave {}: waiting for {} offline nodes: {}", r.wave, offline.len(), names(&offline)));
        return Some(soon(params.deadline.saturating_sub(age)));
    }
    if k >= nodes.len() {
        r.phase = RolloutPhase::Complete;
        r.pause_reason = None;
        let skipped = if offline.is_empty() {
            String::new()
        } else {
            format!("; {} offline nodes get it when they return", offline.len())
        };
        let message = format!("revision {updated} reached all {} nodes in {} waves{skipped}", nodes.len(), r.wave);
        r.message = Some(message.clone());
        notes.push(Note::new(false, ROLLOUT_COMPLETE, message));
        return None;
    }
    start_wave(r, &params, nodes, now, notes);
    Some(WATCH_EVERY)
}

/// `revisions` with their counts, trimmed to the newest [`MicroserviceStatus::MAX_REVISIONS`]
/// (the current and updated ones always kept).
fn count(
    mut revisions: Vec<Revision>,
    current: i64,
    updated: i64,
    rollout: Option<&RolloutStatus>,
    nodes: &[Observed<'_>],
    uid: &str,
) -> Vec<Revision> {
    let k = match rollout {
        Some(r) if r.phase == RolloutPhase::RolledBack => 0,
        Some(r) if r.phase != RolloutPhase::Complete => (r.updated_nodes.max(0) as usize).min(nodes.len()),
        _ => nodes.len(),
    };
    for rev in &mut revisions {
        let version = supermesh_protocol::version(rev.revision, uid);
        let mut instances = 0;
        if rev.revision == updated {
            instances += k;
        }
        if rev.revision == current && current != updated {
            instances += nodes.len() - k;
        }
        rev.instances = instances as i32;
        rev.ready = nodes.iter().filter(|o| o.report.is_some_and(|i| i.version == version && i.ready)).count() as i32;
    }
    revisions.sort_by_key(|r| r.revision);
    while revisions.len() > MicroserviceStatus::MAX_REVISIONS {
        let Some(i) = revisions.iter().position(|r| r.revision != current && r.revision != updated) else { break };
        revisions.remove(i);
    }
    revisions
}

#[cfg(test)]
mod tests;
