//! ConfigMap and Secret references of Microservices (`env[].valueFrom`, `files`).
//!
//! The reconciler resolves a spec's references into a snapshot: an immutable Secret
//! owned by the Microservice, named after the hash of the values, holding only the
//! referenced keys. Each revision names its snapshot, so every node of a revision runs
//! the same values (undo and rollback included) and a change to a referenced key is a
//! new revision, rolled out like any other change. Agents ask for a snapshot with a
//! Query; the cloudhub answers only nodes holding an assignment that names it.

use std::collections::{BTreeMap, BTreeSet};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::ByteString;
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use sha2::{Digest, Sha256};
use supermesh_api::microservice::{MicroserviceSpec, ResolvedConfig};
use supermesh_api::Microservice;
use supermesh_protocol::{ConfigData, ConfigKind, KeyRef};

use crate::wire;

/// Label of a snapshot Secret: the name of the Microservice owning it.
pub const SNAPSHOT_OF: &str = "supermesh.io/config-of";
/// Type of snapshot Secrets.
pub const SNAPSHOT_TYPE: &str = "supermesh.io/config-snapshot";
/// Key of a snapshot Secret holding the [`ConfigData`] JSON.
pub const SNAPSHOT_KEY: &str = "config.json";

/// The keys `spec` references, sorted and without repeats.
pub fn references(spec: &MicroserviceSpec) -> BTreeSet<(ConfigKind, KeyRef)> {
    wire::workload(spec).references().map(|(kind, r)| (kind, r.clone())).collect()
}

/// Hash of the keys `spec` references; `None` when it references none.
pub fn references_hash(spec: &MicroserviceSpec) -> Option<String> {
    let refs = references(spec);
    (!refs.is_empty()).then(|| short_hash(&serde_json::to_vec(&refs).expect("references serialize")))
}

fn short_hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes)[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// What the spec of `msvc` resolves to, from its status: `Some(None)` when it references
/// nothing, `Some(Some(..))` when the reconciler resolved these very references, `None`
/// while they are unresolved (just changed, or missing).
pub fn resolved(msvc: &Microservice) -> Option<Option<&ResolvedConfig>> {
    let Some(refs) = references_hash(&msvc.spec) else { return Some(None) };
    let config = msvc.status.as_ref()?.config.as_ref()?;
    (config.references == refs).then_some(Some(config))
}

/// Checks the references of `spec`: each names exactly one source, a variable has a value
/// or a source but not both, each file path stays inside the config directory.
pub fn validate(spec: &MicroserviceSpec) -> Result<(), String> {
    for var in &spec.env {
        if let Some(from) = &var.value_from {
            if !var.value.is_empty() {
                return Err(format!("env {:?} has both value and valueFrom; keep one", var.name));
            }
            one_source(&format!("env {:?}", var.name), from)?;
        }
    }
    let mut paths = BTreeSet::new();
    for file in &spec.files {
        let what = format!("files path {:?}", file.path);
        one_source(&what, &file.from)?;
        let bad = file.path.is_empty()
            || file.path.starts_with('/')
            || file.path.contains('\0')
            || file.path.split('/').any(|part| part.is_empty() || part == "." || part == "..");
        if bad {
            return Err(format!("{what} must be relative, without empty, . or .. parts (like app/settings.toml)"));
        }
        if !paths.insert(file.path.as_str()) {
            return Err(format!("{what} is given twice"));
        }
    }
    Ok(())
}

fn one_source(what: &str, from: &supermesh_api::microservice::ValueFrom) -> Result<(), String> {
    match (&from.config_map_key_ref, &from.secret_key_ref) {
        (Some(_), None) | (None, Some(_)) => Ok(()),
        _ => Err(format!("{what} needs exactly one of configMapKeyRef and secretKeyRef")),
    }
}

/// Why references did not resolve.
#[derive(Debug, thiserror::Error)]
pub enum Unresolved {
    /// A referenced object or key is missing or unusable: a condition, not a retry storm.
    #[error("{0}")]
    Missing(String),
    /// The API server failed; retried.
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

/// Reads the values `spec` references in `namespace`.
pub async fn read(client: &Client, namespace: &str, spec: &MicroserviceSpec) -> Result<ConfigData, Unresolved> {
    let mut data = ConfigData::default();
    let (maps, secrets): (Api<ConfigMap>, Api<Secret>) =
        (Api::namespaced(client.clone(), namespace), Api::namespaced(client.clone(), namespace));
    let mut fetched_maps = BTreeMap::new();
    let mut fetched_secrets = BTreeMap::new();
    for (kind, r) in references(spec) {
        let value = match kind {
            ConfigKind::ConfigMap => {
                if !fetched_maps.contains_key(&r.name) {
                    fetched_maps.insert(r.name.clone(), maps.get_opt(&r.name).await?);
                }
                let Some(map) = &fetched_maps[&r.name] else {
                    return Err(Unresolved::Missing(format!("ConfigMap {:?} does not exist", r.name)));
                };
                match map.data.as_ref().and_then(|d| d.get(&r.key)) {
                    Some(v) => v.clone(),
                    None if map.binary_data.as_ref().is_some_and(|d| d.contains_key(&r.key)) => {
                        return Err(Unresolved::Missing(format!(
                            "key {:?} of ConfigMap {:?} is binaryData; only data keys can be used",
                            r.key, r.name
                        )))
                    }
                    None => return Err(Unresolved::Missing(format!("ConfigMap {:?} has no key {:?}", r.name, r.key))),
                }
            }
            ConfigKind::Secret => {
                if !fetched_secrets.contains_key(&r.name) {
                    fetched_secrets.insert(r.name.clone(), secrets.get_opt(&r.name).await?);
                }
                let Some(secret) = &fetched_secrets[&r.name] else {
                    return Err(Unresolved::Missing(format!("Secret {:?} does not exist", r.name)));
                };
                let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(&r.key)) else {
                    return Err(Unresolved::Missing(format!("Secret {:?} has no key {:?}", r.name, r.key)));
                };
                String::from_utf8(bytes.0.clone()).map_err(|_| {
                    Unresolved::Missing(format!("key {:?} of Secret {:?} is not UTF-8 text", r.key, r.name))
                })?
            }
        };
        let maps = match kind {
            ConfigKind::ConfigMap => &mut data.config_maps,
            ConfigKind::Secret => &mut data.secrets,
        };
        maps.entry(r.name).or_default().insert(r.key, value);
    }
    Ok(data)
}

/// Resolves the references of `msvc` into a snapshot Secret (created if new).
pub async fn resolve(client: &Client, msvc: &Microservice) -> Result<Option<ResolvedConfig>, Unresolved> {
    let Some(references) = references_hash(&msvc.spec) else { return Ok(None) };
    let namespace = msvc.namespace().unwrap_or_default();
    let data = read(client, &namespace, &msvc.spec).await?;
    let json = serde_json::to_vec(&data).expect("config data serializes");
    let hash = short_hash(&json);
    let name = msvc.name_any();
    // Secret names are at most 253 characters; the hash keeps truncated names apart.
    let snapshot = format!("{}-config-{hash}", &name[..name.len().min(253 - 24)]);
    // Snapshots are immutable and named by their values: one written before is this one.
    let known = msvc.status.as_ref().and_then(|s| s.config.as_ref()).is_some_and(|c| c.snapshot == snapshot);
    if known {
        return Ok(Some(ResolvedConfig { references, hash, snapshot }));
    }
    let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(snapshot.clone()),
            namespace: Some(namespace.clone()),
            labels: Some(BTreeMap::from([
                (SNAPSHOT_OF.to_owned(), label_value(&name)),
                ("app.kubernetes.io/managed-by".to_owned(), "supermesh".to_owned()),
            ])),
            owner_references: msvc.controller_owner_ref(&()).map(|mut o: OwnerReference| {
                o.block_owner_deletion = Some(false);
                vec![o]
            }),
            ..ObjectMeta::default()
        },
        immutable: Some(true),
        type_: Some(SNAPSHOT_TYPE.to_owned()),
        data: Some(BTreeMap::from([(SNAPSHOT_KEY.to_owned(), ByteString(json))])),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Some(ResolvedConfig { references, hash, snapshot }))
}

/// A label value for `name` (at most 63 characters).
fn label_value(name: &str) -> String {
    if name.len() <= 63 {
        name.to_owned()
    } else {
        short_hash(name.as_bytes())
    }
}

/// Deletes the snapshot Secrets of `msvc` that no kept revision and not its resolved
/// configuration name.
pub async fn prune(client: &Client, msvc: &Microservice) -> Result<usize, kube::Error> {
    let status = msvc.status.as_ref();
    let keep: BTreeSet<&str> = status
        .into_iter()
        .flat_map(|s| {
            s.revisions.iter().filter_map(|r| r.config.as_deref()).chain(s.config.iter().map(|c| c.snapshot.as_str()))
        })
        .collect();
    let api: Api<Secret> = Api::namespaced(client.clone(), &msvc.namespace().unwrap_or_default());
    let selector = format!("{SNAPSHOT_OF}={}", label_value(&msvc.name_any()));
    let uid = msvc.uid();
    let mut pruned = 0;
    for secret in api.list_metadata(&ListParams::default().labels(&selector)).await? {
        let owned = secret.owner_references().iter().any(|o| Some(&o.uid) == uid.as_ref());
        let name = secret.name_any();
        if owned && !keep.contains(name.as_str()) {
            match api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => pruned += 1,
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(pruned)
}

/// Reads snapshot `name` in `namespace`.
pub async fn snapshot(client: &Client, namespace: &str, name: &str) -> Result<ConfigData, String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = api.get_opt(name).await.map_err(|e| format!("cannot read snapshot {name}: {e}"))?;
    let secret = secret.filter(|s| s.type_.as_deref() == Some(SNAPSHOT_TYPE));
    let bytes = secret
        .as_ref()
        .and_then(|s| s.data.as_ref()?.get(SNAPSHOT_KEY))
        .ok_or_else(|| format!("configuration snapshot {namespace}/{name} does not exist"))?;
    serde_json::from_slice(&bytes.0)
        .map_err(|e| format!("configuration snapshot {namespace}/{name} is unreadable: {e}"))
}

/// Microservices to reconcile when ConfigMaps and Secrets change: those of `msvcs` that
/// reference the changed object. Only metadata is watched, so no Secret value is cached.
pub fn triggers(client: Client, msvcs: Store<Microservice>) -> impl Stream<Item = ObjectRef<Microservice>> + Send {
    fn changes<K>(client: Client, kind: ConfigKind) -> impl Stream<Item = (ConfigKind, String, String)> + Send
    where
        K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + Sync + serde::de::DeserializeOwned + 'static,
    {
        watcher(Api::<PartialObjectMeta<K>>::all(client), watcher::Config::default())
            .default_backoff()
            .touched_objects()
            .filter_map(move |m| async move {
                let m = m.ok()?;
                Some((kind, m.namespace().unwrap_or_default(), m.name_any()))
            })
    }
    let maps = changes::<ConfigMap>(client.clone(), ConfigKind::ConfigMap);
    let secrets = changes::<Secret>(client, ConfigKind::Secret);
    futures::stream::select(maps, secrets).flat_map(move |(kind, namespace, name)| {
        let hit: Vec<ObjectRef<Microservice>> = msvcs
            .state()
            .iter()
            .filter(|m| m.namespace().as_deref() == Some(namespace.as_str()))
            .filter(|m| references(&m.spec).iter().any(|(k, r)| *k == kind && r.name == name))
            .map(|m| ObjectRef::from_obj(&**m))
            .collect();
        futures::stream::iter(hit)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(extra: serde_json::Value) -> MicroserviceSpec {
        let mut base = json!({"mesh": "m", "command": ["x"]});
        base.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn references_are_collected_once_and_hashed_by_what_they_name() {
        let s = spec(json!({
            "env": [
                {"name": "A", "valueFrom": {"configMapKeyRef": {"name": "app", "key": "mode"}}},
                {"name": "B", "valueFrom": {"secretKeyRef": {"name": "db", "key": "password"}}},
                {"name": "C", "value": "plain"}
            ],
            "files": [{"path": "app/mode", "configMapKeyRef": {"name": "app", "key": "mode"}}]
        }));
        let refs = references(&s);
        assert_eq!(refs.len(), 2, "{refs:?}");
        assert!(references_hash(&spec(json!({}))).is_none(), "no references, no snapshot");
        let mut renamed = s.clone();
        renamed.env[0].name = "A2".into();
        assert_eq!(references_hash(&s), references_hash(&renamed), "a variable's name is no reference");
        let mut other = s.clone();
        other.env[1].value_from.as_mut().unwrap().secret_key_ref.as_mut().unwrap().key = "user".into();
        assert_ne!(references_hash(&s), references_hash(&other));
    }

    #[test]
    fn bad_references_are_explained() {
        let both = spec(json!({"env": [{"name": "A", "value": "1",
            "valueFrom": {"configMapKeyRef": {"name": "app", "key": "k"}}}]}));
        assert!(validate(&both).unwrap_err().contains("both value and valueFrom"));
        let none = spec(json!({"env": [{"name": "A", "valueFrom": {}}]}));
        assert!(validate(&none).unwrap_err().contains("exactly one of"));
        for path in ["/etc/passwd", "../up", "a/../../b", "a//b", "./a", ""] {
            let s = spec(json!({"files": [{"path": path, "secretKeyRef": {"name": "s", "key": "k"}}]}));
            assert!(validate(&s).unwrap_err().contains("must be relative"), "{path:?}");
        }
        let twice = spec(json!({"files": [
            {"path": "a", "secretKeyRef": {"name": "s", "key": "k"}},
            {"path": "a", "configMapKeyRef": {"name": "c", "key": "k"}}]}));
        assert!(validate(&twice).unwrap_err().contains("given twice"));
        let good =
            spec(json!({"files": [{"path": "app/settings.toml", "configMapKeyRef": {"name": "c", "key": "k"}}]}));
        assert_eq!(validate(&good), Ok(()));
    }
}
