//! Process groups on Linux: who a process is (from `/proc`), whether it still
//! lives, and signals to a whole group. Every instance runs as the leader of its
//! own group, so signalling the group reaches everything it spawned.

use std::collections::BTreeSet;
use std::io;
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::{getpgrp, Pid};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// How often a group is looked at while waiting for it to empty.
const EMPTY_POLL: Duration = Duration::from_millis(50);

/// What `/proc/<pid>/stat` says about a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// State letter: R, S, D, Z (zombie), X (dead), ...
    pub state: char,
    /// Process group id.
    pub pgrp: i32,
    /// Start time in clock ticks after boot (field 22): with the boot id, names a process uniquely.
    pub start_time: u64,
}

impl Stat {
    /// Whether the process still runs (a zombie has exited and only waits to be reaped).
    pub fn is_live(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x')
    }
}

/// Parses the text of `/proc/<pid>/stat`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    // The command name (field 2) is in parentheses and may itself hold spaces or
    // parentheses, so fields are counted from the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(Stat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// Reads `/proc/<pid>/stat`.
pub fn stat(pid: u32) -> io::Result<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("unreadable /proc/{pid}/stat")))
}

/// The id of the current boot; empty when the kernel does not say.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|id| id.trim().to_owned()).unwrap_or_default()
}

/// A process named so that a reused pid is never mistaken for it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    /// Process id, also the id of its process group.
    pub pid: u32,
    /// Start time from `/proc/<pid>/stat`.
    pub start_time: u64,
    /// Boot the process was started in: pids and start times restart at every boot.
    pub boot_id: String,
}

impl Identity {
    /// The identity of a process that runs now.
    pub fn of(pid: u32) -> io::Result<Identity> {
        Ok(Identity { pid, start_time: stat(pid)?.start_time, boot_id: boot_id() })
    }

    /// Whether this very process still runs (not exited, not a reused pid).
    pub fn is_alive(&self) -> bool {
        self.boot_id == boot_id() && stat(self.pid).is_ok_and(|s| s.is_live() && s.start_time == self.start_time)
    }
}

/// Sends `signal` to process group `pgid`. A group that no longer exists is not an
/// error; the agent's own group and the special ids 0 and 1 are never signalled.
pub fn signal(pgid: u32, signal: Signal) -> nix::Result<()> {
    let Ok(raw) = i32::try_from(pgid) else { return Err(Errno::EINVAL) };
    // killpg(0) would hit the agent's own group; a corrupt record must not do that.
    if raw <= 1 || Pid::from_raw(raw) == getpgrp() {
        return Err(Errno::EINVAL);
    }
    match killpg(Pid::from_raw(raw), signal) {
        Err(Errno::ESRCH) => Ok(()),
        other => other,
    }
}

/// Pids of the live (non-zombie) processes of group `pgid`.
pub fn members(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| stat(pid).is_ok_and(|s| s.is_live() && i64::from(s.pgrp) == i64::from(pgid)))
        .collect()
}

/// Process groups of the live processes whose working directory is `dir` or below it.
pub fn working_in(dir: &Path) -> BTreeSet<u32> {
    let (Ok(root), Ok(procs)) = (dir.canonicalize(), std::fs::read_dir("/proc")) else { return BTreeSet::new() };
    procs
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(&root)))
        .filter_map(|pid| u32::try_from(stat(pid).ok().filter(Stat::is_live)?.pgrp).ok())
        .collect()
}

/// Whether group `pgid` still has a live member.
pub fn has_members(pgid: u32) -> bool {
    let Ok(raw) = i32::try_from(pgid) else { return false };
    if raw <= 1 {
        return false;
    }
    // The signal-0 probe is cheap and answers most cases; zombies (which it counts)
    // need the scan, since nothing may ever reap them when PID 1 does not.
    match killpg(Pid::from_raw(raw), None) {
        Err(Errno::ESRCH) => false,
        _ => !members(pgid).is_empty(),
    }
}

/// Waits until group `pgid` has no live member or `deadline` passes; true when it emptied.
pub async fn wait_empty(pgid: u32, deadline: Instant) -> bool {
    loop {
        if !has_members(pgid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep_until(deadline.min(Instant::now() + EMPTY_POLL)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let text = "4242 (we (ird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_stat(text), Some(Stat { state: 'S', pgrp: 4242, start_time: 987654 }));
        assert_eq!(parse_stat("12 (x) Z 1"), None);
        assert!(!parse_stat(&text.replace(") S", ") Z")).unwrap().is_live());
    }

    #[test]
    fn this_process_has_an_identity_and_the_agents_group_is_never_signalled() {
        let me = Identity::of(std::process::id()).unwrap();
        assert!(me.is_alive());
        assert!(!Identity { start_time: me.start_time + 1, ..me.clone() }.is_alive());
        let own_group = u32::try_from(getpgrp().as_raw()).unwrap();
        assert_eq!(signal(own_group, Signal::SIGTERM), Err(Errno::EINVAL));
        assert_eq!(signal(0, Signal::SIGTERM), Err(Errno::EINVAL));
        assert_eq!(signal(1, Signal::SIGTERM), Err(Errno::EINVAL));
    }
}
