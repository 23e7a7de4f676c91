//! ConfigMaps and Secrets on devices, on a real API server with real agents: values reach
//! only the nodes that run a microservice referencing them, are sealed in the agent's
//! SQLite file, roll out as a new revision when they change, and a missing reference is
//! a condition, not a crash loop.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use futures::{SinkExt, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::ByteString;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use supermesh_api::names::condition::*;
use supermesh_api::Microservice;
use supermesh_protocol::{self as protocol, Body, ErrorCode, Message, Query};
use supermesh_tests::*;
use tokio_tungstenite::tungstenite::Message as Frame;

/// Prints `$MODE` and the mounted password into `out` in its work dir, then sleeps.
const APP: &str = r#"  replicas: 1
  command: ["/bin/sh", "-c", "printf '%s\n' \"$MODE\" > out; cat \"$SUPERMESH_CONFIG_DIR/db/password\" >> out; exec sleep 3600"]
  env:
    - name: MODE
      valueFrom: {configMapKeyRef: {name: settings, key: mode}}
  files:
    - path: db/password
      secretKeyRef: {name: db, key: password}
"#;

async fn put_config(site: &Site, mode: &str, password: &str) {
    let params = PatchParams::apply("config-test").force();
    let maps: Api<ConfigMap> = Api::namespaced(site.cluster.client.clone(), &site.ns);
    let map = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"},
        "data": {"mode": mode, "unused": "not sent"}});
    maps.patch("settings", &params, &Patch::Apply(&map)).await.expect("apply the ConfigMap");
    let secrets: Api<Secret> = Api::namespaced(site.cluster.client.clone(), &site.ns);
    let secret = Secret {
        metadata: kube::api::ObjectMeta { name: Some("db".into()), ..Default::default() },
        data: Some(BTreeMap::from([
            ("password".to_owned(), ByteString(password.as_bytes().to_vec())),
            ("admin".to_owned(), ByteString(b"never-sent-admin-key".to_vec())),
        ])),
        ..Secret::default()
    };
    secrets.patch("db", &params, &Patch::Apply(&secret)).await.expect("apply the Secret");
}

/// Whether `needle` appears in any file under `dir`.
fn found_under(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return hits };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
        if meta.is_dir() {
            hits.extend(found_under(&path, needle));
        } else if meta.is_file() {
            let bytes = std::fs::read(&path).unwrap_or_default();
            if bytes.windows(needle.len()).any(|w| w == needle) {
                hits.push(path.display().to_string());
            }
        }
    }
    hits
}

#[tokio::test]
async fn a_secret_reaches_only_the_nodes_that_run_it_sealed_and_a_change_rolls_out() {
    let site = Site::new("config").await;
    let agents: Vec<Agent> = (0..2).map(|i| site.agent(i)).collect();
    site.wait_agents(2.0).await;
    let password = format!("hunter2-{}", site.id);
    put_config(&site, "fast", &password).await;
    let msvcs: Api<Microservice> = Api::namespaced(site.cluster.client.clone(), &site.ns);
    site.apply(&microservice("app", "m", APP));
    let key = site.key("app");
    let m = site.controller.wait_for(&msvcs, "app", "one instance ready", |m| all_ready(m, 1)).await;
    let status = m.status.clone().unwrap();
    let snapshot = status.config.as_ref().expect("resolved configuration").snapshot.clone();
    assert_eq!(status.revisions.last().and_then(|r| r.config.as_deref()), Some(snapshot.as_str()));
    assert!(events(&site, "app", CONFIG_MISSING).await.is_empty(), "nothing was missing");
    let (runs, other): (Vec<&Agent>, Vec<&Agent>) = agents.iter().partition(|a| a.instance_dir(&key).is_some());
    let (runs, other) = (runs[0], other[0]);

    // The instance got the values: the variable and the file, 0400 and its user's own.
    let dir = runs.instance_dir(&key).unwrap();
    let out = dir.join("work/out");
    runs.wait_until("the instance to write its values", || {
        std::fs::read_to_string(&out).is_ok_and(|t| t.lines().count() == 2)
    })
    .await;
    assert_eq!(std::fs::read_to_string(&out).unwrap(), format!("fast\n{password}"));
    let file = std::fs::metadata(dir.join("config/db/password")).unwrap();
    let work = std::fs::metadata(dir.join("work")).unwrap();
    assert_eq!(file.permissions().mode() & 0o7777, 0o400);
    assert_eq!((file.uid(), file.gid()), (work.uid(), work.gid()), "owned by the instance's user");

    // Sealed at rest: the plaintext is nowhere in the store of the node that runs it; the
    // other node holds nothing of it at all; unreferenced keys went nowhere.
    for db in ["meta.db", "meta.db-wal"] {
        let bytes = std::fs::read(runs.data_dir.join(db)).unwrap_or_default();
        assert!(!bytes.windows(password.len()).any(|w| w == password.as_bytes()), "{db} holds the plaintext");
    }
    assert!(found_under(&other.data_dir, password.as_bytes()).is_empty(), "the other node got the secret");
    for agent in &agents {
        assert!(found_under(&agent.data_dir, b"never-sent-admin-key").is_empty(), "an unreferenced key was sent");
    }

    // A device that runs nothing of it asks the cloud for the snapshot: refused.
    let resource = format!("{}/config/{snapshot}", site.ns);
    let refusal = ask_as_stranger(&site, &resource).await;
    assert_eq!(refusal.code, ErrorCode::Forbidden, "{refusal:?}");

    // The Secret changes: a new revision rolls out with the new value.
    let first = status.current_revision.unwrap();
    let rotated = format!("rotated-{}", site.id);
    put_config(&site, "fast", &rotated).await;
    let m = site
        .controller
        .wait_for(&msvcs, "app", "the new revision ready", |m| {
            let s = m.status.as_ref();
            all_ready(m, 1)
                && s.and_then(|s| s.current_revision) > Some(first)
                && s.and_then(|s| s.updated_revision) == s.and_then(|s| s.current_revision)
        })
        .await;
    let status = m.status.unwrap();
    let second = status.config.as_ref().unwrap().snapshot.clone();
    assert_ne!(second, snapshot, "a new value is a new snapshot");
    let kept: Vec<Option<&str>> = status.revisions.iter().map(|r| r.config.as_deref()).collect();
    assert_eq!(kept, [Some(snapshot.as_str()), Some(second.as_str())], "each revision keeps its values");
    let dir = runs.instance_dir(&key).expect("still on the same node");
    let out = dir.join("work/out");
    runs.wait_until("the new revision to write its values", || {
        std::fs::read_to_string(&out).is_ok_and(|t| t == format!("fast\n{rotated}"))
    })
    .await;
    let secrets: Api<Secret> = Api::namespaced(site.cluster.client.clone(), &site.ns);
    let snapshots: Vec<String> = secrets
        .list_metadata(&ListParams::default().labels("supermesh.io/config-of=app"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .collect();
    assert_eq!(snapshots.len(), 2, "one snapshot per kept revision: {snapshots:?}");

    let refs: Vec<&Agent> = agents.iter().collect();
    site.cleanup(&refs).await;
}

/// Asks the cloud for `resource` as a freshly enrolled device of another account.
async fn ask_as_stranger(site: &Site, resource: &str) -> protocol::ErrorContent {
    let name = format!("stranger-{}", site.id);
    let mut ws = site.dial_as(&name, &format!("elsewhere-{}", site.id)).await;
    let query = Message::with_body("t-2".into(), 0, resource, &Body::Query(Query::Resource));
    ws.send(Frame::text(protocol::encode(&query).unwrap())).await.unwrap();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let refusal = loop {
        let frame =
            tokio::time::timeout_at(deadline, ws.next()).await.expect("an answer in time").expect("open").unwrap();
        let Ok(text) = frame.into_text() else { continue };
        let msg = protocol::decode(&text).unwrap();
        if msg.parent_id.as_deref() != Some("t-2") {
            continue;
        }
        match msg.body().unwrap() {
            Body::Error(refusal) => break refusal,
            other => panic!("the stranger was answered {other:?}"),
        }
    };
    let nodes: Api<supermesh_api::EdgeNode> = Api::all(site.cluster.client.clone());
    delete_all(&nodes, &[name]).await;
    refusal
}

#[tokio::test]
async fn a_missing_reference_is_a_condition_until_it_exists() {
    let site = Site::new("config-missing").await;
    let agent = site.agent(0);
    site.wait_agents(1.0).await;
    let msvcs: Api<Microservice> = Api::namespaced(site.cluster.client.clone(), &site.ns);
    let spec = "  env:\n    - name: MODE\n      valueFrom: {configMapKeyRef: {name: later, key: mode}}\n";
    site.apply(&microservice("app", "m", spec));
    let m = site
        .controller
        .wait_for(&msvcs, "app", "ConfigMissing", |m| {
            m.status
                .as_ref()
                .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == READY && c.reason == CONFIG_MISSING))
        })
        .await;
    let condition = m.status.unwrap().conditions.into_iter().find(|c| c.type_ == READY).unwrap();
    assert!(condition.message.contains("ConfigMap \"later\" does not exist"), "{}", condition.message);
    assert!(agent.held().is_empty(), "nothing reaches a node while its values are missing");

    // The ConfigMap appears without a key, then with it: it runs, no restart loop before.
    let maps: Api<ConfigMap> = Api::namespaced(site.cluster.client.clone(), &site.ns);
    let mut map = ConfigMap {
        metadata: kube::api::ObjectMeta { name: Some("later".into()), ..Default::default() },
        data: Some(BTreeMap::from([("other".to_owned(), "x".to_owned())])),
        ..ConfigMap::default()
    };
    map = maps.create(&PostParams::default(), &map).await.unwrap();
    site.controller
        .wait_for(&msvcs, "app", "the missing key explained", |m| {
            m.status.as_ref().is_some_and(|s| {
                s.conditions.iter().any(|c| c.type_ == READY && c.message.contains("has no key \"mode\""))
            })
        })
        .await;
    map.data.get_or_insert_with(Default::default).insert("mode".into(), "slow".into());
    maps.replace("later", &PostParams::default(), &map).await.unwrap();
    site.controller.wait_for(&msvcs, "app", "ready once the key exists", |m| all_ready(m, 1)).await;
    assert_eq!(agent.edged_events(&site.key("app")), 1, "one desired version reached the node");
    let warned = events(&site, "app", CONFIG_MISSING).await;
    assert_eq!(warned.len(), 1, "one warning, for the missing ConfigMap: {warned:#?}");
    assert!(warned[0].contains("ConfigMap \"later\" does not exist"), "{warned:#?}");
    site.cleanup(&[&agent]).await;
}
