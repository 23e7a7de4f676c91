//! The agent's SQLite database: resources from the cloud (`meta`), reports
//! waiting for the cloud's ack (`outbox`), instance status for delta detection
//! (`instance_status`) and per-microservice storage of the local API (`kv`).
//!
//! A [`Store`] wraps one connection and is owned by the metamanager task alone,
//! so SQLite never sees two writers and never answers "database is locked".

use std::collections::BTreeMap;
use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Transaction};
use supermesh_protocol::Operation;

/// Schema migrations; entry `i` moves the schema from `user_version` i to i+1.
const MIGRATIONS: &[&str] = &["
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
"];

/// How long a second connection (e.g. `supermesh-agent inspect`) waits for a lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

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

/// Inserts one outbox row; the operation is stored as its variant name, which `pending` parses back.
fn insert_report(conn: &Connection, operation: Operation, resource: &str, content: &str) -> rusqlite::Result<i64> {
    conn.prepare_cached("INSERT INTO outbox (operation, resource, content, created_ms) VALUES (?1, ?2, ?3, ?4)")?
        .execute((format!("{operation:?}"), resource, content, supermesh_protocol::now_ms()))?;
    Ok(conn.last_insert_rowid())
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
        let tx = conn.transaction().map_err(&err)?;
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
        Ok(Store { conn, path, stats: StoreStats::default() })
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
        let tx = self.conn.transaction().map_err(&err)?;
        let outcomes = changes.iter().map(|c| apply_one(&tx, c)).collect::<rusqlite::Result<Vec<_>>>().map_err(&err)?;
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

    /// Appends a report to the outbox and returns its seq.
    pub fn enqueue(&mut self, operation: Operation, resource: &str, content: &str) -> Result<i64, StoreError> {
        insert_report(&self.conn, operation, resource, content).map_err(sql_err(&self.path))
    }

    /// Appends a report that supersedes every unsent report of the same operation and
    /// resource (a newer full snapshot makes older ones moot), in one transaction.
    pub fn replace(&mut self, operation: Operation, resource: &str, content: &str) -> Result<i64, StoreError> {
        let err = sql_err(&self.path);
        let tx = self.conn.transaction().map_err(&err)?;
        tx.execute("DELETE FROM outbox WHERE operation = ?1 AND resource = ?2", (format!("{operation:?}"), resource))
            .map_err(&err)?;
        let seq = insert_report(&tx, operation, resource, content).map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(seq)
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
        let tx = self.conn.transaction().map_err(&err)?;
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
        let tx = self.conn.transaction().map_err(&err)?;
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
        assert_eq!((mode.as_str(), version), ("wal", 1));
        assert_eq!(store.list("microservice").unwrap().iter().map(|r| r.version.as_str()).collect::<Vec<_>>(), ["2"]);
        assert_eq!(store.held_versions().unwrap(), BTreeMap::from([("team/microservice/web".into(), "2".into())]));
        assert!(store.list("edgenode").unwrap().is_empty());
        integrity_check(&path).unwrap();
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
}
