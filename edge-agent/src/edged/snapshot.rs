//! Configuration of an instance from its revision's snapshot: the values of the
//! `valueFrom` variables and the `files` written into `<instance dir>/config/`.
//!
//! The assignment names a snapshot ([`Assignment::config`](supermesh_protocol::Assignment));
//! the supervisor gets it from a [`SnapshotSource`] (the metamanager: its store first,
//! where snapshots are kept sealed, else the cloud while connected) each time it starts
//! the instance. Values are never logged: errors name the snapshot, the ConfigMap or
//! Secret and the key, never a value.
//!
//! `config/` and its subdirectories are 0500 and its files 0400, owned by the
//! instance's user when instances are isolated; the directory is rebuilt at every
//! start, so nothing of a previous revision remains, and `SUPERMESH_CONFIG_DIR` names it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use supermesh_protocol::{ConfigData, ConfigKind, KeyRef, ResourceRef, ValueFrom, Workload, CONFIG};

use super::sandbox::Sandbox;
use crate::metamanager::MetaHandle;

/// Variable naming the instance's configuration directory (set when its spec has `files`).
pub const ENV_CONFIG_DIR: &str = "SUPERMESH_CONFIG_DIR";
/// Name of the configuration directory inside the instance directory.
pub const CONFIG_DIR: &str = "config";
/// Mode of the configuration directory and its subdirectories.
pub const CONFIG_DIR_MODE: u32 = 0o500;
/// Mode of a configuration file.
pub const CONFIG_FILE_MODE: u32 = 0o400;

/// The resource string of snapshot `name` of namespace `namespace`.
pub fn resource(namespace: &str, name: &str) -> String {
    ResourceRef::string(namespace, CONFIG, name)
}

/// Where a supervisor gets configuration snapshots from.
pub trait SnapshotSource: Send + Sync + 'static {
    /// Snapshot `resource` (`namespace/config/<name>`), or why it cannot be had now.
    fn snapshot<'a>(
        &'a self,
        resource: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<ConfigData, String>> + Send + 'a>>;
}

impl SnapshotSource for MetaHandle {
    fn snapshot<'a>(
        &'a self,
        resource: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<ConfigData, String>> + Send + 'a>> {
        Box::pin(async move {
            let value = self.query(resource).await.map_err(|e| e.to_string())?;
            // Not serde's message: it may quote a value.
            serde_json::from_value(value).map_err(|_| "the snapshot is malformed".to_owned())
        })
    }
}

/// A shareable [`SnapshotSource`], for the process runtime's configuration.
#[derive(Clone)]
pub struct Snapshots(Arc<dyn SnapshotSource>);

impl Snapshots {
    /// Snapshots from `source`.
    pub fn new(source: impl SnapshotSource) -> Snapshots {
        Snapshots(Arc::new(source))
    }

    /// Snapshot `resource`, or why it cannot be had now.
    pub async fn get(&self, resource: &str) -> Result<ConfigData, String> {
        self.0.snapshot(resource).await
    }
}

impl fmt::Debug for Snapshots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Snapshots")
    }
}

/// Why an instance's configuration cannot be had or written.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A `files` path is unsafe; the spec cannot run.
    #[error("files: path {path:?} {why}; it must be relative, without `..` and without NUL")]
    BadPath {
        /// The path as the spec gives it.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A reference names neither or both of configMapKeyRef and secretKeyRef; the spec cannot run.
    #[error("{what} must name exactly one of configMapKeyRef and secretKeyRef")]
    BadReference {
        /// Which variable or file.
        what: String,
    },
    /// The spec references keys, but the assignment names no snapshot.
    #[error(
        "the cloud sent no configuration for {microservice}: its spec references ConfigMap or Secret keys \
         but the assignment names no configuration snapshot"
    )]
    NoSnapshot {
        /// Resource string of the microservice.
        microservice: String,
    },
    /// This runtime was given no way to get snapshots.
    #[error("configuration snapshot {snapshot} cannot be had: this runtime has no configuration source")]
    NoSource {
        /// The snapshot's resource string.
        snapshot: String,
    },
    /// The snapshot is neither stored nor given by the cloud now.
    #[error("configuration snapshot {snapshot} cannot be had: {reason}")]
    Unavailable {
        /// The snapshot's resource string.
        snapshot: String,
        /// Why (offline, refused by the cloud, ...).
        reason: String,
    },
    /// A referenced key is not in the snapshot.
    #[error("configuration snapshot {snapshot} has no key {key:?} of {kind} {name:?}")]
    MissingKey {
        /// The snapshot's resource string.
        snapshot: String,
        /// `ConfigMap` or `Secret`.
        kind: &'static str,
        /// Name of the ConfigMap or Secret.
        name: String,
        /// The key.
        key: String,
    },
}

impl ConfigError {
    /// Whether the spec itself is wrong, so that retrying cannot help.
    pub fn is_invalid_spec(&self) -> bool {
        matches!(self, ConfigError::BadPath { .. } | ConfigError::BadReference { .. })
    }
}

/// The values of an instance's references. Its Debug output shows names and paths, never values.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Value of every `valueFrom` variable, by name.
    pub env: BTreeMap<String, String>,
    /// Content of every file, by its path under `config/`.
    pub files: BTreeMap<PathBuf, String>,
}

impl fmt::Debug for Resolved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resolved")
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("files", &self.files.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// `path` of a `files` entry as a relative path of normal components, or why it is refused.
pub fn checked_path(path: &str) -> Result<PathBuf, ConfigError> {
    let bad = |why| Err(ConfigError::BadPath { path: path.to_owned(), why });
    if path.is_empty() {
        return bad("is empty");
    }
    if path.contains('\0') {
        return bad("contains NUL");
    }
    let mut checked = PathBuf::new();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(part) => checked.push(part),
            Component::CurDir => {}
            Component::ParentDir => return bad("contains `..`"),
            Component::RootDir | Component::Prefix(_) => return bad("is absolute"),
        }
    }
    if checked.as_os_str().is_empty() {
        return bad("names no file");
    }
    Ok(checked)
}

/// Checks the spec's references and file paths, before anything is fetched.
pub fn check(workload: &Workload) -> Result<(), ConfigError> {
    let mut paths = BTreeSet::new();
    for file in &workload.files {
        let path = checked_path(&file.path)?;
        if file.from.source().is_none() {
            return Err(ConfigError::BadReference { what: format!("files {:?}", file.path) });
        }
        if !paths.insert(path) {
            return Err(ConfigError::BadPath { path: file.path.clone(), why: "is given twice" });
        }
    }
    for var in &workload.env {
        if var.value_from.as_ref().is_some_and(|from| from.source().is_none()) {
            return Err(ConfigError::BadReference { what: format!("env {:?} valueFrom", var.name) });
        }
    }
    Ok(())
}

/// Whether the workload takes anything from a snapshot.
pub fn has_references(workload: &Workload) -> bool {
    !workload.files.is_empty() || workload.env.iter().any(|v| v.value_from.is_some())
}

/// The values `workload` references, from `data`, snapshot `snapshot`.
pub fn resolve(workload: &Workload, snapshot: &str, data: &ConfigData) -> Result<Resolved, ConfigError> {
    check(workload)?;
    let value = |from: &ValueFrom| -> Result<String, ConfigError> {
        let (kind, r) = from.source().ok_or_else(|| ConfigError::BadReference { what: "a reference".into() })?;
        lookup(data, snapshot, kind, r)
    };
    let mut resolved = Resolved::default();
    for var in &workload.env {
        if let Some(from) = &var.value_from {
            resolved.env.insert(var.name.clone(), value(from)?);
        }
    }
    for file in &workload.files {
        resolved.files.insert(checked_path(&file.path)?, value(&file.from)?);
    }
    Ok(resolved)
}

fn lookup(data: &ConfigData, snapshot: &str, kind: ConfigKind, r: &KeyRef) -> Result<String, ConfigError> {
    data.get(kind, r).map(str::to_owned).ok_or_else(|| ConfigError::MissingKey {
        snapshot: snapshot.to_owned(),
        kind: match kind {
            ConfigKind::ConfigMap => "ConfigMap",
            ConfigKind::Secret => "Secret",
        },
        name: r.name.clone(),
        key: r.key.clone(),
    })
}

/// Makes a configuration directory (or what a crash left of one) removable by the agent.
fn unlock(path: &Path) {
    let mut pending = vec![path.to_owned()];
    let me = nix::unistd::geteuid().as_raw();
    while let Some(dir) = pending.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&dir) else { continue };
        if !meta.is_dir() {
            continue;
        }
        // Only the owner (or root) may; with CAP_DAC_OVERRIDE the agent need not.
        if meta.uid() == me || me == 0 {
            let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            pending.extend(entries.flatten().map(|e| e.path()));
        }
    }
}

/// Removes the configuration directory at `path` and everything in it, if present.
pub fn remove(path: &Path) -> io::Result<()> {
    unlock(path);
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Replaces `instance_dir/config` with `files` (nothing when there are none), given to
/// `sandbox`'s user if any: directories 0500, files 0400. Built aside and renamed in place.
pub fn write(instance_dir: &Path, files: &BTreeMap<PathBuf, String>, sandbox: Option<&Sandbox>) -> io::Result<()> {
    let (target, staging) = (instance_dir.join(CONFIG_DIR), instance_dir.join("config.partial"));
    let failed = |what: &str, path: &Path| {
        let (what, path) = (what.to_owned(), path.to_owned());
        move |e: io::Error| io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    remove(&staging).map_err(failed("cannot remove", &staging))?;
    remove(&target).map_err(failed("cannot remove", &target))?;
    if files.is_empty() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.mode(0o700);
    builder.create(&staging).map_err(failed("cannot create", &staging))?;
    let mut dirs = vec![staging.clone()];
    for (relative, content) in files {
        let path = staging.join(relative);
        if let Some(parent) = path.parent() {
            for dir in parent.ancestors().take_while(|d| *d != staging) {
                if !dirs.iter().any(|d| d == dir) {
                    dirs.push(dir.to_owned());
                }
            }
            builder.recursive(true).create(parent).map_err(failed("cannot create", parent))?;
        }
        // A fresh directory of the agent's: nothing in it can be a link to elsewhere.
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(CONFIG_FILE_MODE)
            .open(&path)
            .map_err(failed("cannot write", &path))?;
        file.write_all(content.as_bytes()).map_err(failed("cannot write", &path))?;
        if let Some(sandbox) = sandbox {
            std::os::unix::fs::fchown(&file, Some(sandbox.uid), Some(sandbox.gid))
                .map_err(failed("cannot hand over", &path))?;
        }
    }
    // Deepest first; the mode while the agent still owns it, then the owner.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for dir in &dirs {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(CONFIG_DIR_MODE))
            .map_err(failed("cannot close", dir))?;
        if let Some(sandbox) = sandbox {
            std::os::unix::fs::lchown(dir, Some(sandbox.uid), Some(sandbox.gid))
                .map_err(failed("cannot hand over", dir))?;
        }
    }
    std::fs::rename(&staging, &target).map_err(failed("cannot move in place", &target))
}

#[cfg(test)]
mod tests {
    use supermesh_protocol::{ConfigFile, EnvVar};

    use super::*;

    const SNAPSHOT: &str = "team/config/web-1";

    fn key_ref(name: &str, key: &str) -> KeyRef {
        KeyRef { name: name.into(), key: key.into() }
    }

    fn secret(name: &str, key: &str) -> ValueFrom {
        ValueFrom { secret_key_ref: Some(key_ref(name, key)), ..ValueFrom::default() }
    }

    fn config_map(name: &str, key: &str) -> ValueFrom {
        ValueFrom { config_map_key_ref: Some(key_ref(name, key)), ..ValueFrom::default() }
    }

    fn workload(env: Vec<EnvVar>, files: Vec<ConfigFile>) -> Workload {
        let mut w: Workload = serde_json::from_value(serde_json::json!({"mesh": "m", "command": ["x"]})).unwrap();
        w.env = env;
        w.files = files;
        w
    }

    fn data() -> ConfigData {
        let mut data = ConfigData::default();
        data.config_maps.insert("app".into(), BTreeMap::from([("mode".into(), "fast".into())]));
        data.secrets.insert("db".into(), BTreeMap::from([("password".into(), "hunter2".into())]));
        data.secrets.insert("tls".into(), BTreeMap::from([("key.pem".into(), "PEM".into())]));
        data
    }

    fn file(path: &str, from: ValueFrom) -> ConfigFile {
        ConfigFile { path: path.into(), from }
    }

    #[test]
    fn variables_and_files_take_their_values_from_the_snapshot() {
        let w = workload(
            vec![
                EnvVar { name: "PLAIN".into(), value: "p".into(), value_from: None },
                EnvVar { name: "MODE".into(), value: String::new(), value_from: Some(config_map("app", "mode")) },
                EnvVar { name: "DB_PASSWORD".into(), value: String::new(), value_from: Some(secret("db", "password")) },
            ],
            vec![file("tls/key.pem", secret("tls", "key.pem")), file("./mode", config_map("app", "mode"))],
        );
        assert!(has_references(&w));
        let resolved = resolve(&w, SNAPSHOT, &data()).unwrap();
        assert_eq!(
            resolved.env,
            BTreeMap::from([("DB_PASSWORD".into(), "hunter2".into()), ("MODE".into(), "fast".into())])
        );
        assert_eq!(
            resolved.files,
            BTreeMap::from([(PathBuf::from("mode"), "fast".into()), (PathBuf::from("tls/key.pem"), "PEM".into())])
        );
        assert!(!format!("{resolved:?}").contains("hunter2"), "values stay out of Debug: {resolved:?}");
        assert!(!has_references(&workload(vec![], vec![])));
    }

    #[test]
    fn a_missing_key_names_the_snapshot_the_source_and_the_key_but_no_value() {
        let w = workload(
            vec![EnvVar { name: "TOKEN".into(), value: String::new(), value_from: Some(secret("db", "token")) }],
            vec![],
        );
        let err = resolve(&w, SNAPSHOT, &data()).unwrap_err();
        assert!(matches!(err, ConfigError::MissingKey { .. }) && !err.is_invalid_spec());
        assert_eq!(err.to_string(), r#"configuration snapshot team/config/web-1 has no key "token" of Secret "db""#);
        let w = workload(vec![], vec![file("a", config_map("nope", "mode"))]);
        let err = resolve(&w, SNAPSHOT, &data()).unwrap_err().to_string();
        assert!(err.contains(r#"ConfigMap "nope""#), "{err}");
        let err = ConfigError::NoSnapshot { microservice: "team/microservice/web".into() }.to_string();
        assert!(err.starts_with("the cloud sent no configuration for team/microservice/web"), "{err}");
    }

    #[test]
    fn unsafe_paths_and_ambiguous_references_are_refused_as_invalid_specs() {
        for (path, why) in [
            ("", "is empty"),
            ("/etc/passwd", "is absolute"),
            ("../escape", "contains `..`"),
            ("a/../../b", "contains `..`"),
            ("a\0b", "contains NUL"),
            (".", "names no file"),
        ] {
            let err =
                resolve(&workload(vec![], vec![file(path, secret("db", "password"))]), SNAPSHOT, &data()).unwrap_err();
            assert!(err.is_invalid_spec(), "{path:?}");
            assert!(err.to_string().contains(why), "{path:?}: {err}");
        }
        let twice = workload(vec![], vec![file("a", secret("db", "password")), file("./a", config_map("app", "mode"))]);
        assert!(resolve(&twice, SNAPSHOT, &data()).unwrap_err().to_string().contains("given twice"));
        let both = ValueFrom { config_map_key_ref: Some(key_ref("app", "mode")), ..secret("db", "password") };
        let err = check(&workload(vec![], vec![file("a", both)])).unwrap_err();
        assert!(err.is_invalid_spec() && err.to_string().contains("exactly one"), "{err}");
        let neither = EnvVar { name: "X".into(), value: String::new(), value_from: Some(ValueFrom::default()) };
        assert!(check(&workload(vec![neither], vec![])).unwrap_err().is_invalid_spec());
    }

    #[test]
    fn the_directory_is_private_read_only_and_replaced_whole() {
        let instance = tempfile::tempdir().unwrap();
        let config = instance.path().join(CONFIG_DIR);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let files = BTreeMap::from([
            (PathBuf::from("app/settings.toml"), "a = 1".to_owned()),
            (PathBuf::from("app/deep/x"), "x".to_owned()),
            (PathBuf::from("token"), "t".to_owned()),
        ]);
        write(instance.path(), &files, None).unwrap();
        assert_eq!(std::fs::read_to_string(config.join("app/settings.toml")).unwrap(), "a = 1");
        for dir in [config.clone(), config.join("app"), config.join("app/deep")] {
            assert_eq!(mode(&dir), CONFIG_DIR_MODE, "{}", dir.display());
        }
        for f in ["app/settings.toml", "app/deep/x", "token"] {
            assert_eq!(mode(&config.join(f)), CONFIG_FILE_MODE, "{f}");
        }
        // The next revision's files replace the previous ones entirely.
        let next = BTreeMap::from([(PathBuf::from("other"), "o".to_owned())]);
        write(instance.path(), &next, None).unwrap();
        let names: Vec<_> = std::fs::read_dir(&config).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["other"]);
        assert!(!instance.path().join("config.partial").exists());
        write(instance.path(), &BTreeMap::new(), None).unwrap();
        assert!(!config.exists(), "no files, no directory");
        write(instance.path(), &next, None).unwrap();
        remove(&config).unwrap();
        assert!(!config.exists(), "the agent removes what it made read-only");
    }
}
