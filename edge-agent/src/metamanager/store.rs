//! The agent's SQLite database: resources from the cloud (`meta`), reports
//! waiting for the cloud's ack (`outbox`), instance status for delta detection
//! (`instance_status`), per-microservice storage of the local API (`kv`) and the
//! configuration snapshots assignments name (`config_snapshot`), sealed with the
//! device's key ([`super::seal`]) so that no secret value is ever on disk in clear.
//!
//! A [`Store`] wraps one connection and is owned by the metamanager task alone,
//! so SQLite never sees two writers and never answers "database is locked".
//!
//! The outbox is bounded by an [`OutboxCap`] (reports and bytes) while the cloud is
//! away. A status snapshot supersedes the unsent snapshots of its resource, so each
//! resource has at most one. When a write leaves the outbox over its cap, the oldest
//! events are dropped until it fits and counted in `counters`; snapshots are never
//! dropped, so the last status of every resource still reaches the cloud.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Transaction, TransactionBehavior};
use serde::Deserialize;
use supermesh_protocol::{Operation, ResourceRef, CONFIG, MICROSERVICE};
use tracing::warn;

use super::seal::SealingKey;

/// Schema migrations; entry `i` moves the schema from `user_version` i to i+1.
const MIGRATIONS: &[&str] = &[
    "
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        type TEXT NOT NULL,
        resource_version TEXT NOT NULL,
        value TEXT NOT NULL
    );
    CREATE INDEX meta_type ON meta(type);
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        operation TEXT NOT NULL,
        resource TEXT NOT NULL,
        content TEXT NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE instance_status (
        key TEXT PRIMARY KEY,
        phase TEXT NOT NULL,
        value TEXT NOT NULL,
        updated_ms INTEGER NOT NULL
    );
    CREATE TABLE kv (
        microservice TEXT NOT NULL,
        key TEXT NOT NULL,
        value BLOB NOT NULL,
        PRIMARY KEY (microservice, key)
    );
",
    "
    ALTER TABLE outbox ADD COLUMN snapshot INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE outbox ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
    -- Older agents superseded only their status report (STATUS_RESOURCE): it is the snapshot.
    UPDATE outbox SET snapshot = (resource = 'node/status'),
        bytes = length(CAST(resource AS BLOB)) + length(CAST(content AS BLOB));
    CREATE INDEX outbox_kind ON outbox(snapshot, seq, bytes);
    CREATE TABLE counters (
        name TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );
",
    // edged's rollback on the device (edged::rollback): the version each microservice
    // goes back to, and the version it refused.
    "
    CREATE TABLE previous_revision (
        key TEXT PRIMARY KEY,
        version TEXT NOT NULL,
        value TEXT NOT NULL,
        kept_ms INTEGER NOT NULL
    );
    CREATE TABLE refused_revision (
        key TEXT PRIMARY KEY,
        version TEXT NOT NULL,
        back_to TEXT NOT NULL,
        message TEXT NOT NULL,
        refused_ms INTEGER NOT NULL
    );
",
    // Configuration snapshots (`namespace/config/<name>`) the cloud answered, as sealed
    // blobs (super::seal): kept while a stored assignment or a kept revision names them.
    "
    CREATE TABLE config_snapshot (
        key TEXT PRIMARY KEY,
        sealed BLOB NOT NULL,
        stored_ms INTEGER NOT NULL
    );
",
];

/// A version of a microservice's assignment kept on the device (a row of `previous_revision`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    /// Its version.
    pub version: String,
    /// The assignment, as JSON text.
    pub value: String,
}

/// A version the device refused because it failed within its `minReadySeconds` (a row of `refused_revision`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The refused version.
    pub version: String,
    /// The version the device went back to.
    pub back_to: String,
    /// What failed and after how long.
    pub message: String,
}

/// What the device keeps about the revisions of one microservice.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revisions {
    /// The version it goes back to: the last one that proved itself here.
    pub previous: Option<Kept>,
    /// The version it refused, until the cloud sends another.
    pub refused: Option<Refusal>,
}

/// Name in `counters` of the events dropped from the full outbox, in all.
const EVENTS_DROPPED: &str = "outbox_events_dropped";

/// Most reports the outbox holds by default.
pub const DEFAULT_OUTBOX_REPORTS: u64 = 10_000;
/// Most bytes (resource and content) the outbox holds by default.
pub const DEFAULT_OUTBOX_BYTES: u64 = 16 * 1024 * 1024;

/// How long a second connection (e.g. `supermesh-agent inspect`) waits for a lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Every write transaction takes the write lock when it begins. Other connections
/// write `meta.db` too (edged's instance users); a deferred transaction that read first
/// would fail with "database is locked" at its first write, without waiting.
pub(crate) const WRITE: TransactionBehavior = TransactionBehavior::Immediate;

/// Why the database could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file or its directory could not be created or given mode 0600.
    #[error("cannot create the agent database {}: {source}; check the data directory's permissions", path.display())]
    Io {
        /// The database file.
        path: PathBuf,
        /// The failed file-system call.
        source: std::io::Error,
    },
    /// The file is not a healthy supermesh database.
    #[error(
        "{} is not a usable agent database: {reason}; move it aside and restart the agent \
         (the cloud resends all resources on connect)",
        path.display()
    )]
    Unusable {
        /// The database file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A statement failed, for example because the disk is full.
    #[error("agent database {}: {source}", path.display())]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// The SQLite error.
        source: rusqlite::Error,
    },
}

/// One change to the `meta` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Store `value` (JSON text) as `version` of `key`.
    Upsert {
        /// Resource string.
        key: String,
        /// Resource type, from the resource string.
        res_type: String,
        /// Resource version.
        version: String,
        /// The resource as JSON text.
        value: String,
    },
    /// Remove `key`.
    Delete {
        /// Resource string.
        key: String,
    },
}

impl Change {
    /// The resource string the change is about.
    pub fn key(&self) -> &str {
        match self {
            Change::Upsert { key, .. } | Change::Delete { key } => key,
        }
    }
}

/// What [`Store::apply`] did with one [`Change`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A new row was written.
    Inserted,
    /// An existing row was overwritten with a new version or value.
    Updated,
    /// The same version and value were already stored; nothing was written.
    Unchanged,
    /// The row was removed.
    Deleted,
    /// There was no row to remove.
    Absent,
}

impl Outcome {
    /// Whether a row was written, i.e. whether edged has to hear about it.
    pub fn changed(self) -> bool {
        !matches!(self, Outcome::Unchanged | Outcome::Absent)
    }
}

/// A stored resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Resource string.
    pub key: String,
    /// Resource type.
    pub res_type: String,
    /// Resource version.
    pub version: String,
    /// The resource as JSON text.
    pub value: String,
}

/// A report waiting for the cloud's ack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Position in the outbox; acks name it.
    pub seq: i64,
    /// Operation of the report.
    pub operation: Operation,
    /// Resource string of the report.
    pub resource: String,
    /// Content as JSON text.
    pub content: String,
    /// When it was enqueued, milliseconds since the epoch.
    pub created_ms: i64,
}

/// How much the outbox holds before it drops its oldest events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxCap {
    /// Most reports (snapshots and events).
    pub reports: u64,
    /// Most bytes of resource strings and contents (SQLite's own overhead comes on top).
    pub bytes: u64,
}

impl Default for OutboxCap {
    fn default() -> Self {
        OutboxCap { reports: DEFAULT_OUTBOX_REPORTS, bytes: DEFAULT_OUTBOX_BYTES }
    }
}

/// What the outbox holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxUsage {
    /// Reports waiting for the cloud's ack.
    pub reports: u64,
    /// Bytes of their resource strings and contents.
    pub bytes: u64,
}

impl OutboxUsage {
    /// Whether this usage is within `cap`.
    pub fn within(self, cap: OutboxCap) -> bool {
        self.reports <= cap.reports && self.bytes <= cap.bytes
    }
}

/// What writing a report to the outbox did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queued {
    /// Seq of the new report (gone already if it was itself dropped to make room).
    pub seq: i64,
    /// Events this write dropped, oldest first, to keep the outbox within its cap.
    pub dropped: u64,
    /// Events dropped in all, across restarts.
    pub dropped_total: u64,
    /// What the outbox holds after the write; over the cap only when snapshots alone exceed it.
    pub usage: OutboxUsage,
}

/// What [`Store::kv_put`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvPut {
    /// The key was new and is now stored.
    Created,
    /// The key existed and its value was replaced.
    Replaced,
    /// The key was new and the microservice already holds the most keys allowed; nothing was written.
    Full,
}

/// Write counters, so tests and metrics can see what reached the disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// `meta` rows inserted, updated or deleted by [`Store::apply`].
    pub rows_written: u64,
    /// Transactions committed by [`Store::apply`].
    pub batches: u64,
}

/// The agent's database; one connection, one owner.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
    stats: StoreStats,
    outbox_cap: OutboxCap,
    /// Seals configuration snapshots; without it none is stored.
    sealing: Option<SealingKey>,
}

/// Maps a SQLite error, telling a damaged file apart from a failed statement.
fn sql_err(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |source| match source.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => {
            StoreError::Unusable { path: path.to_owned(), reason: source.to_string() }
        }
        _ => StoreError::Sqlite { path: path.to_owned(), source },
    }
}

/// Runs `PRAGMA quick_check` or `integrity_check`; `Ok(Err(report))` when it finds damage.
fn check(conn: &Connection, pragma: &str) -> rusqlite::Result<Result<(), String>> {
    let mut stmt = conn.prepare(&format!("PRAGMA {pragma}"))?;
    let report = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(if report == ["ok"] { Ok(()) } else { Err(report.join("; ")) })
}

/// Inserts one outbox row, a snapshot or an event; the operation is stored as its
/// variant name, which `pending` parses back.
fn insert_report(
    conn: &Connection,
    operation: Operation,
    resource: &str,
    content: &str,
    snapshot: bool,
) -> rusqlite::Result<i64> {
    let bytes = resource.len() + content.len();
    conn.prepare_cached(
        "INSERT INTO outbox (operation, resource, content, created_ms, snapshot, bytes)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute((format!("{operation:?}"), resource, content, supermesh_protocol::now_ms(), snapshot, bytes))?;
    Ok(conn.last_insert_rowid())
}

/// What the outbox holds.
fn outbox_usage(conn: &Connection) -> rusqlite::Result<OutboxUsage> {
    conn.prepare_cached("SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM outbox")?
        .query_row([], |r| Ok(OutboxUsage { reports: r.get(0)?, bytes: r.get(1)? }))
}

/// The value of counter `name`, 0 if never counted.
fn counter(conn: &Connection, name: &str) -> rusqlite::Result<u64> {
    conn.prepare_cached("SELECT value FROM counters WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()
        .map(Option::unwrap_or_default)
}

/// Drops the oldest events until the outbox is within `cap` (or holds only
/// snapshots) and counts them; returns how many it dropped and the usage left.
fn trim_outbox(conn: &Connection, cap: OutboxCap) -> rusqlite::Result<(u64, OutboxUsage)> {
    let mut usage = outbox_usage(conn)?;
    if usage.within(cap) {
        return Ok((0, usage));
    }
    let (mut dropped, mut last) = (0u64, None);
    {
        let mut oldest = conn.prepare_cached("SELECT seq, bytes FROM outbox WHERE snapshot = 0 ORDER BY seq")?;
        let mut rows = oldest.query([])?;
        while !usage.within(cap) {
            let Some(row) = rows.next()? else { break };
            let (seq, bytes): (i64, u64) = (row.get(0)?, row.get(1)?);
            usage.reports = usage.reports.saturating_sub(1);
            usage.bytes = usage.bytes.saturating_sub(bytes);
            dropped += 1;
            last = Some(seq);
        }
    }
    if let Some(last) = last {
        conn.prepare_cached("DELETE FROM outbox WHERE snapshot = 0 AND seq <= ?1")?.execute([last])?;
        conn.prepare_cached(
            "INSERT INTO counters (name, value) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
        )?
        .execute((EVENTS_DROPPED, dropped))?;
    }
    Ok((dropped, usage))
}

/// Runs `PRAGMA integrity_check` on the database at `path` from a separate connection.
pub fn integrity_check(path: &Path) -> Result<(), String> {
    let fail = |e: &dyn std::fmt::Display| format!("integrity check of {} failed: {e}", path.display());
    // No CREATE flag: checking a missing file must not leave an empty database behind.
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
        .map_err(|e| fail(&e))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(|e| fail(&e))?;
    check(&conn, "integrity_check").map_err(|e| fail(&e))?.map_err(|report| fail(&report))
}

/// Checks a freshly opened connection, sets its pragmas and migrates the schema.
fn prepare(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let err = sql_err(path);
    conn.busy_timeout(BUSY_TIMEOUT).map_err(&err)?;
    // First read of the file: garbage shows up here as NotADatabase.
    check(conn, "quick_check")
        .map_err(&err)?
        .map_err(|reason| StoreError::Unusable { path: path.to_owned(), reason })?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0)).map_err(&err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Unusable {
            path: path.to_owned(),
            reason: format!("journal mode stays {mode:?}, WAL is required"),
        });
    }
    // FULL: an ack promises the cloud that the change survives a power cut.
    conn.pragma_update(None, "synchronous", "FULL").map_err(&err)?;
    conn.pragma_update(None, "foreign_keys", "ON").map_err(&err)?;

    let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(&err)?;
    if version > MIGRATIONS.len() {
        let reason =
            format!("schema version {version} was written by a newer agent (this one knows {})", MIGRATIONS.len());
        return Err(StoreError::Unusable { path: path.to_owned(), reason });
    }
    if version < MIGRATIONS.len() {
        let tx = conn.transaction_with_behavior(WRITE).map_err(&err)?;
        for sql in &MIGRATIONS[version..] {
            tx.execute_batch(sql).map_err(&err)?;
        }
        tx.pragma_update(None, "user_version", MIGRATIONS.len()).map_err(&err)?;
        tx.commit().map_err(&err)?;
    }
    Ok(())
}

fn read_row(r: &rusqlite::Row) -> rusqlite::Result<Row> {
    Ok(Row { key: r.get(0)?, res_type: r.get(1)?, version: r.get(2)?, value: r.get(3)? })
}

impl Store {
    /// Opens or creates the database at `path` (mode 0600), checks it and brings its schema up to date.
    pub fn open(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        let path = path.as_ref().to_owned();
        let io = |source| StoreError::Io { path: path.clone(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
        }
        // Created 0600 before SQLite sees it (SQLite gives -wal and -shm the same
        // mode); set again for files left by older agents.
        OpenOptions::new().create(true).append(true).mode(0o600).open(&path).map_err(io)?;
        fs::set_permissions(&path, Permissions::from_mode(0o600)).map_err(io)?;

        let mut conn = Connection::open(&path).map_err(sql_err(&path))?;
        prepare(&mut conn, &path)?;
        Ok(Store { conn, path, stats: StoreStats::default(), outbox_cap: OutboxCap::default(), sealing: None })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write counters since the store was opened.
    pub fn stats(&self) -> StoreStats {
        self.stats
    }

    /// Applies `changes` in order in one transaction; no row is written for an Upsert that changes nothing.
    pub fn apply(&mut self, changes: &[Change]) -> Result<Vec<Outcome>, StoreError> {
        let err = sql_err(&self.path);
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(&err)?;
        // The snapshot of an assignment being replaced stays until the next prune: edged may
        // still keep that version as the one to go back to (edged::rollback).
        let replaced = changes
            .iter()
            .filter(|c| matches!(c, Change::Upsert { res_type, .. } if res_type == MICROSERVICE))
            .map(|c| held_config(&tx, c.key()))
            .collect::<rusqlite::Result<Vec<_>>>()
            .map_err(&err)?;
        let outcomes = changes.iter().map(|c| apply_one(&tx, c)).collect::<rusqlite::Result<Vec<_>>>().map_err(&err)?;
        let assignments_changed =
            changes.iter().zip(&outcomes).any(|(c, o)| o.changed() && res_type_of(c) == Some(MICROSERVICE));
        if assignments_changed {
            let replaced: BTreeSet<String> = replaced.into_iter().flatten().collect();
            prune_configs(&tx, &replaced).map_err(&err)?;
        }
        tx.commit().map_err(&err)?;
        self.stats.rows_written += outcomes.iter().filter(|o| o.changed()).count() as u64;
        self.stats.batches += 1;
        Ok(outcomes)
    }

    /// The stored resource `key`, if held.
    pub fn get(&self, key: &str) -> Result<Option<Row>, StoreError> {
        self.conn
            .prepare_cached("SELECT key, type, resource_version, value FROM meta WHERE key = ?1")
            .and_then(|mut s| s.query_row([key], read_row).optional())
            .map_err(sql_err(&self.path))
    }

    /// All stored resources of type `res_type`, by key.
    pub fn list(&self, res_type: &str) -> Result<Vec<Row>, StoreError> {
        self.conn
            .prepare_cached("SELECT key, type, resource_version, value FROM meta WHERE type = ?1 ORDER BY key")
            .and_then(|mut s| s.query_map([res_type], read_row)?.collect())
            .map_err(sql_err(&self.path))
    }

    /// Version of every stored resource, by key: what the agent's hello states.
    pub fn held_versions(&self) -> Result<BTreeMap<String, String>, StoreError> {
        self.conn
            .prepare_cached("SELECT key, resource_version FROM meta")
            .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
            .map_err(sql_err(&self.path))
    }

    /// Sets how much the outbox holds; the next report written enforces it.
    pub fn set_outbox_cap(&mut self, cap: OutboxCap) {
        self.outbox_cap = cap;
    }

    /// How much the outbox holds before it drops its oldest events.
    pub fn outbox_cap(&self) -> OutboxCap {
        self.outbox_cap
    }

    /// What the outbox holds now.
    pub fn outbox_usage(&self) -> Result<OutboxUsage, StoreError> {
        outbox_usage(&self.conn).map_err(sql_err(&self.path))
    }

    /// Events dropped from the full outbox, in all, across restarts.
    pub fn dropped_events(&self) -> Result<u64, StoreError> {
        counter(&self.conn, EVENTS_DROPPED).map_err(sql_err(&self.path))
    }

    /// Appends an event to the outbox; the oldest events make room if it is full.
    pub fn enqueue(&mut self, operation: Operation, resource: &str, content: &str) -> Result<Queued, StoreError> {
        self.write_report(operation, resource, content, false)
    }

    /// Appends a snapshot that supersedes every unsent snapshot of the same operation
    /// and resource (a newer full snapshot makes older ones moot); the oldest events
    /// make room if the outbox is full.
    pub fn replace(&mut self, operation: Operation, resource: &str, content: &str) -> Result<Queued, StoreError> {
        self.write_report(operation, resource, content, true)
    }

    /// Writes a report and trims the outbox to its cap, in one transaction.
    fn write_report(
        &mut self,
        operation: Operation,
        resource: &str,
        content: &str,
        snapshot: bool,
    ) -> Result<Queued, StoreError> {
        let err = sql_err(&self.path);
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(&err)?;
        let queued = queue_report(&tx, self.outbox_cap, operation, resource, content, snapshot).map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(queued)
    }

    /// What this device keeps about the revisions of microservice `key`.
    pub fn revisions(&self, key: &str) -> Result<Revisions, StoreError> {
        let err = sql_err(&self.path);
        let previous = self
            .conn
            .prepare_cached("SELECT version, value FROM previous_revision WHERE key = ?1")
            .and_then(|mut s| s.query_row([key], |r| Ok(Kept { version: r.get(0)?, value: r.get(1)? })).optional())
            .map_err(&err)?;
        let refused = self
            .conn
            .prepare_cached("SELECT version, back_to, message FROM refused_revision WHERE key = ?1")
            .and_then(|mut s| s.query_row([key], |r| read_refusal(r, 0)).optional())
            .map_err(&err)?;
        Ok(Revisions { previous, refused })
    }

    /// Every refused version, by microservice: what `inspect` shows.
    pub fn refusals(&self) -> Result<Vec<(String, Refusal)>, StoreError> {
        self.conn
            .prepare_cached("SELECT key, version, back_to, message FROM refused_revision ORDER BY key")
            .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, read_refusal(r, 1)?)))?.collect())
            .map_err(sql_err(&self.path))
    }

    /// Keeps `kept` as the version microservice `key` goes back to (replacing the one kept
    /// before, whose configuration snapshot goes unless something else names it).
    pub fn keep_previous(&mut self, key: &str, kept: &Kept) -> Result<(), StoreError> {
        let err = sql_err(&self.path);
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(&err)?;
        tx.prepare_cached(
            "INSERT INTO previous_revision (key, version, value, kept_ms) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (key) DO UPDATE SET version = excluded.version, value = excluded.value,
             kept_ms = excluded.kept_ms",
        )
        .and_then(|mut s| s.execute((key, &kept.version, &kept.value, supermesh_protocol::now_ms())))
        .map_err(&err)?;
        prune_configs(&tx, &BTreeSet::new()).map_err(&err)?;
        tx.commit().map_err(&err)
    }

    /// Records that microservice `key` refused a version, and queues `event` (an
    /// `EventReport`, JSON) saying so, in one transaction: a crash leaves both or neither.
    pub fn refuse(&mut self, key: &str, refusal: &Refusal, event: &str) -> Result<Queued, StoreError> {
        let err = sql_err(&self.path);
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(&err)?;
        tx.prepare_cached(
            "INSERT INTO refused_revision (key, version, back_to, message, refused_ms) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (key) DO UPDATE SET version = excluded.version, back_to = excluded.back_to,
             message = excluded.message, refused_ms = excluded.refused_ms",
        )
        .and_then(|mut s| {
            s.execute((key, &refusal.version, &refusal.back_to, &refusal.message, supermesh_protocol::now_ms()))
        })
        .map_err(&err)?;
        let queued = queue_report(&tx, self.outbox_cap, Operation::MetaSync, key, event, false).map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(queued)
    }

    /// Ends the refusal of microservice `key` (the cloud sent another version); with
    /// `forget`, also drops the version kept for it (the microservice left this node).
    pub fn clear_revisions(&mut self, key: &str, forget: bool) -> Result<(), StoreError> {
        let err = sql_err(&self.path);
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(&err)?;
        tx.prepare_cached("DELETE FROM refused_revision WHERE key = ?1")
            .and_then(|mut s| s.execute([key]))
            .map_err(&err)?;
        if forget {
            tx.prepare_cached("DELETE FROM previous_revision WHERE key = ?1")
                .and_then(|mut s| s.execute([key]))
                .map_err(&err)?;
            prune_configs(&tx, &BTreeSet::new()).map_err(&err)?;
        }
        tx.commit().map_err(&err)
    }

    /// Seals configuration snapshots with `key` from now on; without a key none is stored.
    pub fn set_sealing_key(&mut self, key: SealingKey) {
        self.sealing = Some(key);
    }

    /// Stores configuration snapshot `key` (`namespace/config/<name>`, its JSON text
    /// `plaintext`) sealed, if a stored assignment or a kept revision names it and it is
    /// not stored already (a snapshot never changes). Returns whether it wrote it.
    pub fn put_config(&mut self, key: &str, plaintext: &str) -> Result<bool, StoreError> {
        let err = sql_err(&self.path);
        let Some(sealing) = &self.sealing else { return Ok(false) };
        let sealed = sealing
            .seal(plaintext.as_bytes(), key.as_bytes())
            .map_err(|e| StoreError::Unusable { path: self.path.clone(), reason: format!("cannot seal {key}: {e}") })?;
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(&err)?;
        if !referenced_configs(&tx).map_err(&err)?.contains(key) {
            return Ok(false);
        }
        let held: Option<Vec<u8>> = tx
            .prepare_cached("SELECT sealed FROM config_snapshot WHERE key = ?1")
            .and_then(|mut s| s.query_row([key], |r| r.get(0)).optional())
            .map_err(&err)?;
        // One sealed with a lost key is replaced; one that opens is final.
        if held.is_some_and(|blob| sealing.open(&blob, key.as_bytes()).is_ok()) {
            return Ok(false);
        }
        tx.prepare_cached(
            "INSERT INTO config_snapshot (key, sealed, stored_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (key) DO UPDATE SET sealed = excluded.sealed, stored_ms = excluded.stored_ms",
        )
        .and_then(|mut s| s.execute((key, &sealed, supermesh_protocol::now_ms())))
        .map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(true)
    }

    /// The JSON text of stored configuration snapshot `key`, unsealed; `None` when it is
    /// not stored, or cannot be unsealed (sealed with a key since lost): then it is asked for again.
    pub fn config(&self, key: &str) -> Result<Option<String>, StoreError> {
        let Some(sealing) = &self.sealing else { return Ok(None) };
        let held: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT sealed FROM config_snapshot WHERE key = ?1")
            .and_then(|mut s| s.query_row([key], |r| r.get(0)).optional())
            .map_err(sql_err(&self.path))?;
        let Some(blob) = held else { return Ok(None) };
        let opened = sealing
            .open(&blob, key.as_bytes())
            .map_err(|e| e.to_string())
            .and_then(|plain| String::from_utf8(plain).map_err(|_| "the unsealed snapshot is not UTF-8".to_owned()));
        match opened {
            Ok(text) => Ok(Some(text)),
            Err(e) => {
                warn!(%key, error = %e, path = %self.path.display(), "a stored configuration snapshot cannot be used; asking the cloud again");
                Ok(None)
            }
        }
    }

    /// The configuration snapshots stored, by key.
    pub fn config_keys(&self) -> Result<Vec<String>, StoreError> {
        self.conn
            .prepare_cached("SELECT key FROM config_snapshot ORDER BY key")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(sql_err(&self.path))
    }

    /// Up to `limit` outbox entries, oldest first.
    pub fn pending(&self, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        let rows: Vec<(i64, String, String, String, i64)> = self
            .conn
            .prepare_cached("SELECT seq, operation, resource, content, created_ms FROM outbox ORDER BY seq LIMIT ?1")
            .and_then(|mut s| {
                s.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect()
            })
            .map_err(sql_err(&self.path))?;
        rows.into_iter()
            .map(|(seq, op, resource, content, created_ms)| {
                let operation = serde_json::from_value(serde_json::Value::String(op.clone())).map_err(|_| {
                    StoreError::Unusable {
                        path: self.path.clone(),
                        reason: format!("outbox entry {seq} has unknown operation {op:?}"),
                    }
                })?;
                Ok(OutboxEntry { seq, operation, resource, content, created_ms })
            })
            .collect()
    }

    /// Removes the acked outbox entries `seqs` in one transaction; returns how many were there.
    pub fn remove(&mut self, seqs: &[i64]) -> Result<usize, StoreError> {
        let err = sql_err(&self.path);
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(&err)?;
        let mut removed = 0;
        for seq in seqs {
            removed += tx
                .prepare_cached("DELETE FROM outbox WHERE seq = ?1")
                .and_then(|mut s| s.execute([seq]))
                .map_err(&err)?;
        }
        tx.commit().map_err(&err)?;
        Ok(removed)
    }

    /// The keys microservice `microservice` stored, in byte order.
    pub fn kv_keys(&self, microservice: &str) -> Result<Vec<String>, StoreError> {
        self.conn
            .prepare_cached("SELECT key FROM kv WHERE microservice = ?1 ORDER BY key")
            .and_then(|mut s| s.query_map([microservice], |r| r.get(0))?.collect())
            .map_err(sql_err(&self.path))
    }

    /// The value microservice `microservice` stored under `key`, if any.
    pub fn kv_get(&self, microservice: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.conn
            .prepare_cached("SELECT value FROM kv WHERE microservice = ?1 AND key = ?2")
            .and_then(|mut s| s.query_row([microservice, key], |r| r.get(0)).optional())
            .map_err(sql_err(&self.path))
    }

    /// Stores `value` under `key` for `microservice`, unless the key is new and the
    /// microservice already holds `max_keys` keys. One transaction: all or nothing.
    pub fn kv_put(
        &mut self,
        microservice: &str,
        key: &str,
        value: &[u8],
        max_keys: usize,
    ) -> Result<KvPut, StoreError> {
        let err = sql_err(&self.path);
        let tx = self.conn.transaction_with_behavior(WRITE).map_err(&err)?;
        let exists = tx
            .prepare_cached("SELECT 1 FROM kv WHERE microservice = ?1 AND key = ?2")
            .and_then(|mut s| s.exists([microservice, key]))
            .map_err(&err)?;
        if !exists {
            let held: i64 = tx
                .prepare_cached("SELECT COUNT(*) FROM kv WHERE microservice = ?1")
                .and_then(|mut s| s.query_row([microservice], |r| r.get(0)))
                .map_err(&err)?;
            if usize::try_from(held).unwrap_or(usize::MAX) >= max_keys {
                return Ok(KvPut::Full);
            }
        }
        tx.prepare_cached(
            "INSERT INTO kv (microservice, key, value) VALUES (?1, ?2, ?3)
             ON CONFLICT (microservice, key) DO UPDATE SET value = excluded.value",
        )
        .and_then(|mut s| s.execute((microservice, key, value)))
        .map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(if exists { KvPut::Replaced } else { KvPut::Created })
    }

    /// Removes `key` of `microservice`; returns whether it was there.
    pub fn kv_delete(&mut self, microservice: &str, key: &str) -> Result<bool, StoreError> {
        self.conn
            .prepare_cached("DELETE FROM kv WHERE microservice = ?1 AND key = ?2")
            .and_then(|mut s| s.execute([microservice, key]))
            .map(|n| n > 0)
            .map_err(sql_err(&self.path))
    }

    /// Stops the file from growing, so tests can make a write fail like a full disk does.
    #[cfg(test)]
    pub(crate) fn fill_disk(&self) {
        let pages: i64 = self.conn.pragma_query_value(None, "page_count", |r| r.get(0)).unwrap();
        self.conn.pragma_update(None, "max_page_count", pages).unwrap();
    }
}

/// Writes a report inside `tx` and trims the outbox to `cap`.
fn queue_report(
    tx: &Transaction,
    cap: OutboxCap,
    operation: Operation,
    resource: &str,
    content: &str,
    snapshot: bool,
) -> rusqlite::Result<Queued> {
    if snapshot {
        tx.prepare_cached("DELETE FROM outbox WHERE snapshot = 1 AND operation = ?1 AND resource = ?2")
            .and_then(|mut s| s.execute((format!("{operation:?}"), resource)))?;
    }
    let seq = insert_report(tx, operation, resource, content, snapshot)?;
    let (dropped, usage) = trim_outbox(tx, cap)?;
    let dropped_total = counter(tx, EVENTS_DROPPED)?;
    Ok(Queued { seq, dropped, dropped_total, usage })
}

/// The resource type a change is about.
fn res_type_of(change: &Change) -> Option<&str> {
    match change {
        Change::Upsert { res_type, .. } => Some(res_type),
        Change::Delete { key } => ResourceRef::parse(key).ok().map(|r| r.res_type),
    }
}

/// The configuration snapshot an assignment (JSON text) names, as its resource string.
fn config_of(assignment: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Named {
        namespace: String,
        #[serde(default)]
        config: Option<String>,
    }
    let named: Named = serde_json::from_str(assignment).ok()?;
    Some(ResourceRef::string(&named.namespace, CONFIG, &named.config?))
}

/// Every configuration snapshot a stored assignment or a kept revision names.
fn referenced_configs(conn: &Connection) -> rusqlite::Result<BTreeSet<String>> {
    let mut stmt =
        conn.prepare_cached("SELECT value FROM meta WHERE type = ?1 UNION ALL SELECT value FROM previous_revision")?;
    let values = stmt.query_map([MICROSERVICE], |r| r.get::<_, String>(0))?;
    let mut referenced = BTreeSet::new();
    for value in values {
        referenced.extend(config_of(&value?));
    }
    Ok(referenced)
}

/// The configuration snapshot the stored assignment `key` names, if any.
fn held_config(conn: &Connection, key: &str) -> rusqlite::Result<Option<String>> {
    let value: Option<String> =
        conn.prepare_cached("SELECT value FROM meta WHERE key = ?1")?.query_row([key], |r| r.get(0)).optional()?;
    Ok(value.as_deref().and_then(config_of))
}

/// Drops the configuration snapshots nothing names any more, but those in `spared`; returns how many.
fn prune_configs(conn: &Connection, spared: &BTreeSet<String>) -> rusqlite::Result<usize> {
    let referenced = referenced_configs(conn)?;
    let held: Vec<String> = conn
        .prepare_cached("SELECT key FROM config_snapshot")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut dropped = 0;
    for key in held.iter().filter(|k| !referenced.contains(*k) && !spared.contains(*k)) {
        dropped += conn.prepare_cached("DELETE FROM config_snapshot WHERE key = ?1")?.execute([key])?;
    }
    Ok(dropped)
}

/// A refusal from the columns version, back_to, message, starting at column `first`.
fn read_refusal(r: &rusqlite::Row, first: usize) -> rusqlite::Result<Refusal> {
    Ok(Refusal { version: r.get(first)?, back_to: r.get(first + 1)?, message: r.get(first + 2)? })
}

/// Applies one change inside `tx`, reading first so an unchanged resource costs no write.
fn apply_one(tx: &Transaction, change: &Change) -> rusqlite::Result<Outcome> {
    match change {
        Change::Upsert { key, res_type, version, value } => {
            let held: Option<(String, String)> = tx
                .prepare_cached("SELECT resource_version, value FROM meta WHERE key = ?1")?
                .query_row([key], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            if held.as_ref().is_some_and(|(v, val)| v == version && val == value) {
                return Ok(Outcome::Unchanged);
            }
            tx.prepare_cached(
                "INSERT INTO meta (key, type, resource_version, value) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (key) DO UPDATE SET type = excluded.type,
                     resource_version = excluded.resource_version, value = excluded.value",
            )?
            .execute((key, res_type, version, value))?;
            Ok(if held.is_some() { Outcome::Updated } else { Outcome::Inserted })
        }
        Change::Delete { key } => {
            let n = tx.prepare_cached("DELETE FROM meta WHERE key = ?1")?.execute([key])?;
            Ok(if n > 0 { Outcome::Deleted } else { Outcome::Absent })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_creates_a_private_wal_database_with_the_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/sub/agent.db");
        let mut store = Store::open(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let upsert = |v: &str| Change::Upsert {
            key: "team/microservice/web".into(),
            res_type: "microservice".into(),
            version: v.into(),
            value: "{}".into(),
        };
        let delete_absent = Change::Delete { key: "team/microservice/none".into() };
        assert_eq!(
            store.apply(&[upsert("1"), upsert("1"), upsert("2"), delete_absent]).unwrap(),
            [Outcome::Inserted, Outcome::Unchanged, Outcome::Updated, Outcome::Absent]
        );
        assert_eq!(store.stats(), StoreStats { rows_written: 2, batches: 1 });
        drop(store);

        let store = Store::open(&path).unwrap();
        let (mode, version): (String, i64) = store
            .conn
            .query_row("SELECT * FROM pragma_journal_mode, pragma_user_version", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap();
        assert_eq!((mode.as_str(), version), ("wal", MIGRATIONS.len() as i64));
        assert_eq!(store.list("microservice").unwrap().iter().map(|r| r.version.as_str()).collect::<Vec<_>>(), ["2"]);
        assert_eq!(store.held_versions().unwrap(), BTreeMap::from([("team/microservice/web".into(), "2".into())]));
        assert!(store.list("edgenode").unwrap().is_empty());
        integrity_check(&path).unwrap();
    }

    #[test]
    fn kept_and_refused_revisions_survive_a_reopen_and_the_refusal_comes_with_its_event() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let (web, db) = ("team/microservice/web", "team/microservice/db");
        let kept = |v: &str| Kept { version: v.into(), value: format!("{{\"v\":\"{v}\"}}") };
        let refusal = Refusal { version: "2-u".into(), back_to: "1-u".into(), message: "unhealthy".into() };
        let mut store = Store::open(&path).unwrap();
        assert_eq!(store.revisions(web).unwrap(), Revisions::default());
        store.keep_previous(web, &kept("0-u")).unwrap();
        store.keep_previous(web, &kept("1-u")).unwrap();
        store.keep_previous(db, &kept("7-u")).unwrap();
        store.refuse(web, &refusal, r#"{"warning":true,"reason":"RolledBackOnDevice","message":"m"}"#).unwrap();
        drop(store);

        let mut store = Store::open(&path).unwrap();
        let held = Revisions { previous: Some(kept("1-u")), refused: Some(refusal.clone()) };
        assert_eq!(store.revisions(web).unwrap(), held, "one kept version per microservice, the latest");
        assert_eq!(store.refusals().unwrap(), [(web.to_owned(), refusal)]);
        let pending = store.pending(10).unwrap();
        assert_eq!(pending.len(), 1, "the event was queued with the refusal");
        assert_eq!((pending[0].operation, pending[0].resource.as_str()), (Operation::MetaSync, web));
        store.clear_revisions(web, false).unwrap();
        assert_eq!(store.revisions(web).unwrap(), Revisions { previous: Some(kept("1-u")), refused: None });
        store.clear_revisions(web, true).unwrap();
        assert_eq!(store.revisions(web).unwrap(), Revisions::default());
        assert_eq!(store.revisions(db).unwrap().previous, Some(kept("7-u")), "other microservices keep theirs");
    }

    #[test]
    fn kv_keeps_values_per_microservice_within_the_key_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let mut store = Store::open(&path).unwrap();
        let (web, db) = ("team/microservice/web", "team/microservice/db");
        assert_eq!(store.kv_put(web, "a", b"1", 2).unwrap(), KvPut::Created);
        assert_eq!(store.kv_put(web, "a", b"\x00\xff", 2).unwrap(), KvPut::Replaced);
        assert_eq!(store.kv_put(web, "b", b"", 2).unwrap(), KvPut::Created);
        assert_eq!(store.kv_put(web, "c", b"3", 2).unwrap(), KvPut::Full, "a third key is refused");
        assert_eq!(store.kv_put(web, "b", b"2", 2).unwrap(), KvPut::Replaced, "a held key may change when full");
        assert_eq!(store.kv_put(db, "a", b"other", 2).unwrap(), KvPut::Created, "limits are per microservice");
        assert_eq!(store.kv_get(web, "c").unwrap(), None);
        assert_eq!(store.kv_keys(web).unwrap(), ["a", "b"]);
        assert!(store.kv_delete(web, "a").unwrap());
        assert!(!store.kv_delete(web, "a").unwrap());
        drop(store);

        let store = Store::open(&path).unwrap();
        assert_eq!(store.kv_keys(web).unwrap(), ["b"]);
        assert_eq!(store.kv_get(web, "b").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(store.kv_get(db, "a").unwrap().as_deref(), Some(&b"other"[..]));
        assert_eq!(store.kv_get(db, "b").unwrap(), None);
    }

    #[test]
    fn a_kv_write_on_a_full_disk_fails_and_leaves_the_old_value() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path().join("agent.db")).unwrap();
        let web = "team/microservice/web";
        store.kv_put(web, "a", b"old", 10).unwrap();
        store.fill_disk();
        let err = store.kv_put(web, "a", &vec![7; 256 * 1024], 10).unwrap_err();
        assert!(err.to_string().contains("full"), "{err}");
        assert!(store.kv_put(web, "new", &vec![7; 256 * 1024], 10).is_err());
        assert_eq!(store.kv_get(web, "a").unwrap().as_deref(), Some(&b"old"[..]));
        assert_eq!(store.kv_keys(web).unwrap(), ["a"]);
    }

    #[test]
    fn garbage_and_future_files_are_refused_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        fs::write(&path, b"this is not sqlite at all, just some bytes ".repeat(200)).unwrap();
        let err = Store::open(&path).unwrap_err();
        assert!(matches!(err, StoreError::Unusable { .. }), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
        assert!(integrity_check(&path).unwrap_err().contains(&path.display().to_string()));
        assert!(integrity_check(&dir.path().join("missing.db")).is_err());

        let newer = dir.path().join("newer.db");
        Store::open(&newer).unwrap().conn.pragma_update(None, "user_version", 9).unwrap();
        let err = Store::open(&newer).unwrap_err().to_string();
        assert!(err.contains("newer agent") && err.contains("newer.db"), "{err}");
    }

    /// What the outbox holds, as (resource, content) in seq order.
    fn outbox(store: &Store) -> Vec<(String, String)> {
        store.pending(usize::MAX >> 1).unwrap().into_iter().map(|e| (e.resource, e.content)).collect()
    }

    #[test]
    fn a_week_offline_stays_under_the_cap_keeps_every_last_status_and_counts_dropped_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let mut store = Store::open(&path).unwrap();
        // Speed only: a week of writes, each otherwise waiting for fsync.
        store.conn.pragma_update(None, "synchronous", "OFF").unwrap();
        let cap = OutboxCap { reports: 400, bytes: 48 * 1024 };
        store.set_outbox_cap(cap);
        let snapshots = [supermesh_protocol::STATUS_RESOURCE, "team/status/relay-a", "team/status/relay-b"];
        let instances: Vec<String> = (0..5).map(|i| format!("team/microservice/ms-{i}")).collect();
        let (mut events, mut dropped, mut bound) = (Vec::new(), 0, (false, false));
        // Status every 60 s for 7 days; instance i has an event every 7·(i+1) minutes,
        // longer each day, so the report count binds first and the byte limit later.
        for minute in 0..7 * 24 * 60u64 {
            for (i, instance) in instances.iter().enumerate() {
                if minute % (7 * (i as u64 + 1)) == 0 {
                    let detail = "x".repeat(minute as usize / (24 * 60) * 40);
                    let n = events.len();
                    let content = format!(r#"{{"reason":"Restarted","message":"restart {n} at {minute} {detail}"}}"#);
                    let queued = store.enqueue(Operation::MetaSync, instance, &content).unwrap();
                    assert!(queued.usage.within(cap), "minute {minute}: {queued:?}");
                    dropped += queued.dropped;
                    if queued.dropped > 0 {
                        let by_count = queued.usage.reports == cap.reports;
                        bound = (bound.0 || by_count, bound.1 || !by_count);
                    }
                    events.push((instance.clone(), content));
                }
            }
            for resource in snapshots {
                let content = format!(r#"{{"takenMs":{minute},"instances":[{}]}}"#, "{}, ".repeat(40));
                let queued = store.replace(Operation::MetaSync, resource, &content).unwrap();
                assert!(queued.usage.within(cap), "minute {minute}: {queued:?}");
                assert_eq!(queued.dropped_total, dropped + queued.dropped);
                dropped += queued.dropped;
            }
            assert!(store.outbox_usage().unwrap().within(cap), "minute {minute}");
        }
        assert_eq!(bound, (true, true), "both the report count and the byte limit must have bound");
        let held = outbox(&store);
        let last = format!(r#"{{"takenMs":{},"instances":[{}]}}"#, 7 * 24 * 60 - 1, "{}, ".repeat(40));
        for resource in snapshots {
            let kept: Vec<_> = held.iter().filter(|(r, _)| r == resource).collect();
            assert_eq!(kept, [&(resource.to_owned(), last.clone())], "exactly the last status of {resource}");
        }
        // What is left of the events is the newest ones, in order; the rest were counted.
        let kept_events: Vec<_> = held.into_iter().filter(|(r, _)| r.starts_with("team/microservice/")).collect();
        assert!(!kept_events.is_empty() && kept_events.len() < events.len());
        assert_eq!(kept_events, events[events.len() - kept_events.len()..]);
        assert_eq!(dropped, (events.len() - kept_events.len()) as u64);
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.dropped_events().unwrap(), dropped, "the count survives a restart");
        assert!(store.outbox_usage().unwrap().within(cap));
    }

    #[test]
    fn a_snapshot_supersedes_only_snapshots_and_snapshots_are_never_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path().join("agent.db")).unwrap();
        store.set_outbox_cap(OutboxCap { reports: 2, bytes: 1 << 20 });
        let web = "team/microservice/web";
        store.enqueue(Operation::MetaSync, web, "{\"event\":1}").unwrap();
        store.replace(Operation::MetaSync, web, "{\"status\":1}").unwrap();
        store.replace(Operation::MetaSync, web, "{\"status\":2}").unwrap();
        assert_eq!(
            outbox(&store),
            [(web.to_owned(), "{\"event\":1}".to_owned()), (web.to_owned(), "{\"status\":2}".to_owned())],
            "a snapshot replaces the older snapshot, not the event"
        );
        // Snapshots alone over the cap: every event goes, every snapshot stays.
        for n in 0..3 {
            let queued = store.replace(Operation::MetaSync, &format!("node/status-{n}"), "{}").unwrap();
            assert_eq!(queued.dropped, u64::from(n == 0));
        }
        let queued = store.enqueue(Operation::MetaSync, web, "{\"event\":2}").unwrap();
        assert_eq!((queued.dropped, queued.dropped_total), (1, 2), "the new event itself is dropped");
        assert!(!queued.usage.within(store.outbox_cap()));
        assert_eq!(queued.usage.reports, 4);
        assert!(outbox(&store).iter().all(|(_, content)| !content.contains("event")));
        assert_eq!(store.dropped_events().unwrap(), 2);
    }

    #[test]
    fn an_outbox_of_the_first_schema_is_migrated_and_capped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            for (resource, content) in
                [("team/microservice/web", "{\"é\":1}"), (supermesh_protocol::STATUS_RESOURCE, "{\"old\":1}")]
            {
                conn.execute(
                    "INSERT INTO outbox (operation, resource, content, created_ms) VALUES ('MetaSync', ?1, ?2, 1)",
                    [resource, content],
                )
                .unwrap();
            }
        }
        let mut store = Store::open(&path).unwrap();
        let bytes = ("team/microservice/web".len() + "{\"é\":1}".len() + "node/status{\"old\":1}".len()) as u64;
        assert_eq!(store.outbox_usage().unwrap(), OutboxUsage { reports: 2, bytes }, "sizes in bytes, not chars");
        assert_eq!(store.dropped_events().unwrap(), 0);
        // The old status row became a snapshot: the new one supersedes it.
        store.replace(Operation::MetaSync, supermesh_protocol::STATUS_RESOURCE, "{\"new\":1}").unwrap();
        let held = outbox(&store);
        assert_eq!(held.iter().map(|(_, c)| c.as_str()).collect::<Vec<_>>(), ["{\"é\":1}", "{\"new\":1}"]);
    }

    /// An assignment of `name` in `team` naming snapshot `config`, as JSON text.
    fn assignment(name: &str, config: &str) -> String {
        serde_json::json!({"namespace": "team", "name": name, "uid": "u", "generation": 1,
            "spec": {"mesh": "m", "command": ["x"]}, "config": config})
        .to_string()
    }

    fn upsert(name: &str, config: &str) -> Change {
        Change::Upsert {
            key: format!("team/microservice/{name}"),
            res_type: "microservice".into(),
            version: config.into(),
            value: assignment(name, config),
        }
    }

    /// Every byte of the database and its WAL.
    fn file_bytes(path: &Path) -> Vec<u8> {
        let mut bytes = fs::read(path).unwrap();
        bytes.extend(fs::read(path.with_extension("db-wal")).unwrap_or_default());
        bytes
    }

    #[test]
    fn config_snapshots_are_stored_sealed_and_survive_a_reopen_with_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meta.db");
        let key = [7u8; 32];
        let secret = "s3cr3t-value-never-in-clear";
        let snapshot =
            format!(r#"{{"secrets":{{"db":{{"password":"{secret}"}}}},"configMaps":{{"app":{{"mode":"fast"}}}}}}"#);
        let (web_1, other) = ("team/config/web-1", "team/config/other");
        let mut store = Store::open(&path).unwrap();
        assert!(!store.put_config(web_1, &snapshot).unwrap(), "no key, nothing stored");
        store.set_sealing_key(SealingKey::from_bytes(&key));
        assert!(!store.put_config(web_1, &snapshot).unwrap(), "no assignment names it yet");
        store.apply(&[upsert("web", "web-1")]).unwrap();
        assert!(store.put_config(web_1, &snapshot).unwrap());
        assert!(!store.put_config(web_1, &snapshot).unwrap(), "stored already: final");
        assert!(!store.put_config(other, &snapshot).unwrap());
        assert_eq!(store.config(web_1).unwrap().as_deref(), Some(snapshot.as_str()));
        assert_eq!(store.config(other).unwrap(), None);
        let bytes = file_bytes(&path);
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "the secret is in the file in clear");
        assert!(!bytes.windows(4).any(|w| w == b"fast"), "nor is a ConfigMap value");
        drop(store);

        let mut store = Store::open(&path).unwrap();
        store.conn.pragma_update(None, "wal_checkpoint", "TRUNCATE").unwrap();
        let bytes = file_bytes(&path);
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "not after a checkpoint either");
        assert_eq!(store.config(web_1).unwrap(), None, "without the key nothing opens");
        store.set_sealing_key(SealingKey::from_bytes(&[8u8; 32]));
        assert_eq!(store.config(web_1).unwrap(), None, "another key opens nothing");
        store.set_sealing_key(SealingKey::from_bytes(&key));
        assert_eq!(store.config(web_1).unwrap().as_deref(), Some(snapshot.as_str()), "the same key after a restart");
        assert_eq!(store.config_keys().unwrap(), [web_1]);
    }

    #[test]
    fn config_snapshots_go_when_neither_an_assignment_nor_a_kept_revision_names_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path().join("meta.db")).unwrap();
        store.set_sealing_key(SealingKey::generate().unwrap());
        let (web_1, web_2, db_1) = ("team/config/web-1", "team/config/web-2", "team/config/db-1");
        store.apply(&[upsert("web", "web-1"), upsert("db", "db-1")]).unwrap();
        assert!(store.put_config(web_1, "{}").unwrap() && store.put_config(db_1, "{}").unwrap());
        // web-1 proved itself: kept while web-2 runs.
        store
            .keep_previous(
                "team/microservice/web",
                &Kept { version: "web-1".into(), value: assignment("web", "web-1") },
            )
            .unwrap();
        store.apply(&[upsert("web", "web-2")]).unwrap();
        assert!(store.put_config(web_2, "{}").unwrap());
        assert_eq!(store.config_keys().unwrap(), [db_1, web_1, web_2], "the kept revision's snapshot stays");
        // web-2 proved itself in turn: web-1 is named by nothing any more.
        store
            .keep_previous(
                "team/microservice/web",
                &Kept { version: "web-2".into(), value: assignment("web", "web-2") },
            )
            .unwrap();
        assert_eq!(store.config_keys().unwrap(), [db_1, web_2]);
        store.apply(&[Change::Delete { key: "team/microservice/db".into() }]).unwrap();
        assert_eq!(store.config_keys().unwrap(), [web_2], "deleting the assignment drops its snapshot");
        // Replaced without being kept: it stays for one more change, for edged to keep it or not.
        store.apply(&[upsert("web", "web-3")]).unwrap();
        assert!(store.put_config("team/config/web-3", "{}").unwrap());
        store.apply(&[upsert("web", "web-4")]).unwrap();
        assert_eq!(store.config_keys().unwrap(), [web_2, "team/config/web-3"]);
        store.apply(&[upsert("web", "web-5")]).unwrap();
        assert_eq!(store.config_keys().unwrap(), [web_2], "then it goes: they do not pile up");
        store.apply(&[Change::Delete { key: "team/microservice/web".into() }]).unwrap();
        assert_eq!(store.config_keys().unwrap(), [web_2], "still kept for a rollback");
        store.clear_revisions("team/microservice/web", true).unwrap();
        assert!(store.config_keys().unwrap().is_empty());

        // Kept on arrival: edged keeps the running version once the new one is stored.
        store.apply(&[upsert("api", "api-1")]).unwrap();
        assert!(store.put_config("team/config/api-1", "{}").unwrap());
        store.apply(&[upsert("api", "api-2")]).unwrap();
        let kept = Kept { version: "api-1".into(), value: assignment("api", "api-1") };
        store.keep_previous("team/microservice/api", &kept).unwrap();
        store.apply(&[upsert("api", "api-3")]).unwrap();
        store.apply(&[upsert("api", "api-4")]).unwrap();
        assert_eq!(store.config_keys().unwrap(), ["team/config/api-1"], "the way back works with the cloud down");
    }
}
