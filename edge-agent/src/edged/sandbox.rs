//! Instance isolation: every microservice runs under a user of its own.
//!
//! With isolation on (`edged.isolation` in edge.yaml), the agent gives each microservice
//! a uid (and a gid of the same number) from `edged.instanceUsers`, stable for as long
//! as the microservice exists and recorded in the `instance_users` table of the agent's
//! SQLite database, so that an agent restart or a new version keeps it. The process
//! starts with no supplementary groups, `no_new_privs`, an empty capability set (the
//! bounding set too, where the agent may drop it) and, in its instance directory:
//!
//! - `work/` (0700, its own): its working directory and HOME, where its artifact is unpacked;
//! - `token` (0400, its own): its bearer token for the local API (`SUPERMESH_TOKEN_FILE`);
//! - `config/` (0500, its own, files 0400): the files of its configuration snapshot
//!   (`SUPERMESH_CONFIG_DIR`, see `edged::snapshot`), rewritten at every start;
//! - `logs/` and `instance.json`, the agent's (0700 and 0600): it writes its log through
//!   the descriptor it is handed and cannot read it back, nor anybody else's.
//!
//! The instance directories themselves and the directories above them are 0711: a user
//! may pass through to its own files but list nothing. The agent's own files (`api.key`,
//! `meta.db`, `identity/` with the key sealing stored configuration, edge.yaml) are 0600
//! or 0700, so no instance can read them.
//!
//! A Microservice may ask for more with `spec.securityContext` (another user, root
//! included, and capabilities to keep, as ambient capabilities); the cloud sends it
//! only to nodes whose EdgeNode `spec.security` allows it.

use std::collections::BTreeSet;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};

use caps::{CapSet, Capability, CapsHashSet};
use rusqlite::{Connection, OptionalExtension};
use supermesh_protocol::SecurityContext;

use crate::config::InstanceUsers;

/// Mode of the instance directory and the directories above it: pass through, list nothing.
pub const PASS_THROUGH: u32 = 0o711;
/// Mode of an instance's work directory.
pub const PRIVATE_DIR: u32 = 0o700;
/// Mode of an instance's token file.
pub const TOKEN_MODE: u32 = 0o400;

/// Why an instance cannot be given its sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Every uid of the configured range is taken.
    #[error(
        "every user of edged.instanceUsers ({first}..{end}) is taken by a microservice; \
         widen the range in edge.yaml",
        end = u64::from(*first) + u64::from(*count)
    )]
    Exhausted {
        /// First uid of the range.
        first: u32,
        /// Number of uids.
        count: u32,
    },
    /// The allocation table could not be read or written.
    #[error("cannot allocate the instance's user in {path}: {source}")]
    Store {
        /// The database.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },
    /// The allocation did not finish (the agent is shutting down).
    #[error("the allocation of the instance's user was interrupted: {0}")]
    Interrupted(String),
    /// A capability of the spec is not a Linux capability.
    #[error("spec.securityContext.capabilities: {0:?} is not a Linux capability (write it without CAP_, e.g. NET_BIND_SERVICE)")]
    UnknownCapability(String),
    /// A directory above the instance's cannot be passed by other users.
    #[error(
        "{} has mode {mode:o}: the instance's user cannot reach its directory below it; \
         give it o+x (chmod o+x) or move dataDir",
        path.display()
    )]
    Unreachable {
        /// The directory.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
}

/// The instance users of this node: the uid range and who has which uid.
pub struct InstanceUserTable {
    users: InstanceUsers,
    path: PathBuf,
    db: Mutex<Connection>,
}

impl std::fmt::Debug for InstanceUserTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceUserTable").field("users", &self.users).field("path", &self.path).finish()
    }
}

impl InstanceUserTable {
    /// The table in the SQLite database at `path` (created if missing), allocating from `users`.
    pub fn open(path: &Path, users: InstanceUsers) -> Result<InstanceUserTable, SandboxError> {
        let failed = |source| SandboxError::Store { path: path.to_owned(), source };
        let db = Connection::open(path).map_err(failed)?;
        db.busy_timeout(std::time::Duration::from_secs(5)).map_err(failed)?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS instance_users (
                 resource TEXT PRIMARY KEY,
                 uid INTEGER NOT NULL UNIQUE,
                 released_ms INTEGER
             )",
        )
        .map_err(failed)?;
        Ok(InstanceUserTable { users, path: path.to_owned(), db: Mutex::new(db) })
    }

    /// The uid of microservice `resource`: the one it had, else the next never used, else
    /// the one released longest ago (so a uid is not handed on while a leftover process
    /// of its former owner might still run).
    pub fn uid_of(&self, resource: &str) -> Result<u32, SandboxError> {
        let failed = |source| SandboxError::Store { path: self.path.clone(), source };
        let mut db = self.db.lock().unwrap_or_else(PoisonError::into_inner);
        let tx = db.transaction_with_behavior(crate::metamanager::store::WRITE).map_err(failed)?;
        let (first, count) = (i64::from(self.users.first), i64::from(self.users.count));
        let end = first + count;
        let held: Option<i64> = tx
            .query_row(
                "SELECT uid FROM instance_users WHERE resource = ?1 AND uid >= ?2 AND uid < ?3",
                (resource, first, end),
                |r| r.get(0),
            )
            .optional()
            .map_err(failed)?;
        let uid = match held {
            Some(uid) => uid,
            None => {
                let highest: Option<i64> = tx
                    .query_row("SELECT max(uid) FROM instance_users WHERE uid >= ?1 AND uid < ?2", (first, end), |r| {
                        r.get(0)
                    })
                    .map_err(failed)?;
                let fresh = highest.map_or(first, |h| h + 1);
                let uid = if fresh < end {
                    fresh
                } else {
                    tx.query_row(
                        "SELECT uid FROM instance_users WHERE released_ms IS NOT NULL AND uid >= ?1 AND uid < ?2
                         ORDER BY released_ms LIMIT 1",
                        (first, end),
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(failed)?
                    .ok_or(SandboxError::Exhausted { first: self.users.first, count: self.users.count })?
                };
                tx.execute("DELETE FROM instance_users WHERE resource = ?1 OR uid = ?2", (resource, uid))
                    .map_err(failed)?;
                tx.execute("INSERT INTO instance_users (resource, uid) VALUES (?1, ?2)", (resource, uid))
                    .map_err(failed)?;
                uid
            }
        };
        tx.execute("UPDATE instance_users SET released_ms = NULL WHERE resource = ?1", [resource]).map_err(failed)?;
        tx.commit().map_err(failed)?;
        Ok(u32::try_from(uid).expect("uids of the range fit in u32"))
    }

    /// Marks the uid of `resource` free for reuse, once its files are gone.
    pub fn release(&self, resource: &str) -> Result<(), SandboxError> {
        let db = self.db.lock().unwrap_or_else(PoisonError::into_inner);
        db.execute(
            "UPDATE instance_users SET released_ms = ?2 WHERE resource = ?1 AND released_ms IS NULL",
            (resource, supermesh_protocol::now_ms()),
        )
        .map(drop)
        .map_err(|source| SandboxError::Store { path: self.path.clone(), source })
    }
}

/// Whether this process may start instances as other users: it holds CAP_SETUID,
/// CAP_SETGID and CAP_CHOWN (root does).
pub fn can_switch_users() -> bool {
    [Capability::CAP_SETUID, Capability::CAP_SETGID, Capability::CAP_CHOWN]
        .into_iter()
        .all(|cap| caps::has_cap(None, CapSet::Effective, cap).unwrap_or(false))
}

/// Who an instance runs as and what it keeps: applied between fork and exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    keep: CapsHashSet,
    drop_bounding: Vec<Capability>,
}

impl Sandbox {
    /// The sandbox of an instance given `uid` (its allocated user) and its spec's `context`.
    pub fn new(uid: u32, context: Option<&SecurityContext>) -> Result<Sandbox, SandboxError> {
        let uid_wanted = context.and_then(|c| c.run_as_user).unwrap_or(uid);
        let gid = context.and_then(|c| c.run_as_group).unwrap_or(uid_wanted);
        let keep = context
            .map(|c| &c.capabilities[..])
            .unwrap_or_default()
            .iter()
            .map(|name| {
                Capability::from_str(&format!("CAP_{name}")).map_err(|_| SandboxError::UnknownCapability(name.clone()))
            })
            .collect::<Result<CapsHashSet, _>>()?;
        let drop_bounding = caps::all().into_iter().filter(|c| !keep.contains(c)).collect();
        Ok(Sandbox { uid: uid_wanted, gid, keep, drop_bounding })
    }

    /// The capabilities the instance keeps, by name.
    pub fn capabilities(&self) -> BTreeSet<String> {
        self.keep.iter().map(|c| c.to_string()).collect()
    }

    /// Makes `cmd`'s process enter the sandbox before it executes its program.
    pub fn apply(self: &Arc<Self>, cmd: &mut tokio::process::Command) {
        let sandbox = self.clone();
        // SAFETY: `enter` only makes system calls (prctl, setgroups, setresgid, setresuid,
        // capset); it allocates only to describe a failure, which glibc allows after fork.
        unsafe {
            cmd.pre_exec(move || sandbox.enter());
        }
    }

    /// Runs in the child between fork and exec.
    fn enter(&self) -> io::Result<()> {
        use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};
        let cap_error = |e: caps::errors::CapsError| io::Error::other(e.to_string());
        if !self.keep.is_empty() {
            caps::securebits::set_keepcaps(true).map_err(cap_error)?;
        }
        for &cap in &self.drop_bounding {
            // Needs CAP_SETPCAP, which a non-root agent may lack; no_new_privs below
            // keeps the bounding set from mattering then.
            let _ = caps::drop(None, CapSet::Bounding, cap);
        }
        setgroups(&[]).map_err(io::Error::from)?;
        let (uid, gid) = (Uid::from_raw(self.uid), Gid::from_raw(self.gid));
        setresgid(gid, gid, gid).map_err(io::Error::from)?;
        setresuid(uid, uid, uid).map_err(io::Error::from)?;
        // Root keeps every capability across setresuid; anybody keeps only what is asked.
        caps::set(None, CapSet::Effective, &self.keep).map_err(cap_error)?;
        caps::set(None, CapSet::Inheritable, &self.keep).map_err(cap_error)?;
        caps::set(None, CapSet::Permitted, &self.keep).map_err(cap_error)?;
        for &cap in &self.keep {
            caps::raise(None, CapSet::Ambient, cap).map_err(cap_error)?;
        }
        nix::sys::prctl::set_no_new_privs().map_err(io::Error::from)
    }

    /// Gives `dir` and everything in it to the instance's user, `dir` itself 0700.
    pub fn own(&self, dir: &Path) -> io::Result<()> {
        // Mode first, while the agent still owns it: a non-root agent has no CAP_FOWNER.
        if std::fs::metadata(dir)?.uid() != self.uid {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(PRIVATE_DIR))?;
        }
        chown_tree(dir, self.uid, self.gid)
    }

    /// Writes `contents` to `path` readable only by the instance's user (0400), atomically.
    pub fn write_private(&self, path: &Path, contents: &[u8]) -> io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let partial = path.with_extension("partial");
        let _ = std::fs::remove_file(&partial);
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(TOKEN_MODE).open(&partial)?;
        file.write_all(contents)?;
        std::os::unix::fs::fchown(&file, Some(self.uid), Some(self.gid))?;
        std::fs::rename(&partial, path)
    }

    /// Checks that the instance's user can pass every directory from `/` down to `dir`.
    pub fn reachable(&self, dir: &Path) -> Result<(), SandboxError> {
        for ancestor in dir.ancestors().skip(1) {
            let Ok(meta) = std::fs::metadata(ancestor) else { continue };
            let mode = meta.mode() & 0o7777;
            let passable = if meta.uid() == self.uid {
                mode & 0o100 != 0
            } else if meta.gid() == self.gid {
                mode & 0o010 != 0
            } else {
                mode & 0o001 != 0
            };
            if !passable && self.uid != 0 {
                return Err(SandboxError::Unreachable { path: ancestor.to_owned(), mode });
            }
        }
        Ok(())
    }
}

/// Makes `dir` passable by everyone (0711) but listable only by its owner.
pub fn pass_through(dir: &Path) -> io::Result<()> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(PASS_THROUGH))
}

/// `chown -hR uid:gid dir`: symbolic links themselves, never what they point to.
fn chown_tree(dir: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let mut pending = vec![dir.to_owned()];
    while let Some(path) = pending.pop() {
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.uid() != uid || meta.gid() != gid {
            std::os::unix::fs::lchown(&path, Some(uid), Some(gid))?;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(dir: &Path, first: u32, count: u32) -> InstanceUserTable {
        InstanceUserTable::open(&dir.join("meta.db"), InstanceUsers { first, count }).unwrap()
    }

    #[test]
    fn each_microservice_keeps_its_own_user_and_released_ones_are_reused_last() {
        let dir = tempfile::tempdir().unwrap();
        let users = table(dir.path(), 5000, 3);
        let a = users.uid_of("t/microservice/a").unwrap();
        let b = users.uid_of("t/microservice/b").unwrap();
        assert_eq!((a, b), (5000, 5001));
        assert_eq!(users.uid_of("t/microservice/a").unwrap(), a, "stable");
        drop(users);
        let users = table(dir.path(), 5000, 3);
        assert_eq!(users.uid_of("t/microservice/b").unwrap(), b, "recorded in SQLite, kept across restarts");
        users.release("t/microservice/a").unwrap();
        assert_eq!(users.uid_of("t/microservice/c").unwrap(), 5002, "a fresh uid before a released one");
        assert_eq!(users.uid_of("t/microservice/d").unwrap(), a, "then the one released longest ago");
        assert!(matches!(users.uid_of("t/microservice/e"), Err(SandboxError::Exhausted { first: 5000, count: 3 })));
        assert_eq!(users.uid_of("t/microservice/d").unwrap(), a);
    }

    #[test]
    fn allocating_users_while_the_metamanager_writes_never_finds_the_database_locked() {
        use crate::metamanager::store::{Change, Store};
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path().join("meta.db")).unwrap();
        let users = table(dir.path(), 5000, 1000);
        let writer = std::thread::spawn(move || {
            for round in 0..300 {
                let key = format!("t/microservice/m{}", round % 7);
                let change = Change::Upsert {
                    key,
                    res_type: "microservice".into(),
                    version: round.to_string(),
                    value: "{}".into(),
                };
                store.apply(&[change]).expect("a batch commits while users are allocated");
            }
        });
        for i in 0..300 {
            users.uid_of(&format!("t/microservice/u{i}")).expect("a user is allocated while batches commit");
        }
        writer.join().unwrap();
    }

    #[test]
    fn capabilities_are_checked_and_everything_else_leaves_the_bounding_set() {
        let context = SecurityContext { capabilities: vec!["NET_BIND_SERVICE".into()], ..Default::default() };
        let sandbox = Sandbox::new(7000, Some(&context)).unwrap();
        assert_eq!((sandbox.uid, sandbox.gid), (7000, 7000));
        assert_eq!(sandbox.capabilities(), BTreeSet::from(["CAP_NET_BIND_SERVICE".to_owned()]));
        assert!(!sandbox.drop_bounding.contains(&Capability::CAP_NET_BIND_SERVICE));
        assert!(sandbox.drop_bounding.contains(&Capability::CAP_SYS_ADMIN));
        let bad = SecurityContext { capabilities: vec!["ROOTKIT".into()], ..Default::default() };
        assert!(matches!(Sandbox::new(7000, Some(&bad)), Err(SandboxError::UnknownCapability(c)) if c == "ROOTKIT"));
        let root = SecurityContext { run_as_user: Some(0), ..Default::default() };
        let sandbox = Sandbox::new(7000, Some(&root)).unwrap();
        assert_eq!((sandbox.uid, sandbox.gid, sandbox.capabilities().len()), (0, 0, 0));
    }

    #[test]
    fn a_directory_closed_to_others_above_the_instance_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let closed = dir.path().join("closed");
        let below = closed.join("instances/x");
        std::fs::create_dir_all(&below).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        let sandbox = Sandbox::new(7000, None).unwrap();
        match sandbox.reachable(&below) {
            Err(SandboxError::Unreachable { path, mode }) => assert_eq!((path, mode), (closed.clone(), 0o700)),
            other => panic!("{other:?}"),
        }
        pass_through(&closed).unwrap();
        sandbox.reachable(&below).unwrap();
    }
}
