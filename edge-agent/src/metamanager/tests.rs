//! Component tests: the real task on real SQLite files, driven through real channels.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::json;
use supermesh_protocol::{decode, encode};
use tempfile::TempDir;
use tokio::time::timeout;

use super::store::{integrity_check, OutboxCap, OutboxUsage, Row};
use super::*;

const DEADLINE: Duration = Duration::from_secs(10);
const WEB: &str = "team/microservice/web";
const REMOTE: &str = "team/microservice/db";

struct Rig {
    _dir: TempDir,
    path: PathBuf,
    meta: MetaHandle,
    cloud: mpsc::Receiver<Message>,
    edged: mpsc::Receiver<EdgedEvent>,
}

fn rig() -> Rig {
    rig_with(|_| ())
}

/// A task on a fresh database, after `prepare` had its way with the store.
fn rig_with(prepare: impl FnOnce(&mut Store)) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state/agent.db");
    let mut store = Store::open(&path).unwrap();
    prepare(&mut store);
    let (to_cloud, cloud) = mpsc::channel(QUEUE_CAPACITY);
    let (to_edged, edged) = mpsc::channel(QUEUE_CAPACITY);
    Rig { meta: spawn(store, to_cloud, to_edged), path, _dir: dir, cloud, edged }
}

impl Rig {
    /// Sends `msg` from the cloud and returns the reply to it.
    async fn send(&mut self, msg: Message) -> Message {
        let id = msg.id.clone();
        self.meta.from_cloud(msg).await;
        let reply = next(&mut self.cloud).await;
        assert_eq!(reply.parent_id.as_deref(), Some(id.as_str()), "{reply:?}");
        reply
    }

    /// The row as another connection sees it in the file.
    fn stored(&self, key: &str) -> Option<Row> {
        Store::open(&self.path).unwrap().get(key).unwrap()
    }

    /// Events edged got so far; complete once a change's reply arrived, since edged is told first.
    fn edged_events(&mut self) -> Vec<EdgedEvent> {
        std::iter::from_fn(|| self.edged.try_recv().ok()).collect()
    }
}

async fn next<T>(rx: &mut mpsc::Receiver<T>) -> T {
    timeout(DEADLINE, rx.recv()).await.expect("nothing arrived before the deadline").expect("channel closed")
}

fn change(operation: Operation, id: &str, resource: &str, version: Option<&str>, content: Value) -> Message {
    let mut msg = Message::new(id.into(), 1, operation, resource, content);
    msg.resource_version = version.map(Into::into);
    msg
}

fn upserted(version: &str, value: &Value) -> EdgedEvent {
    EdgedEvent::Upserted {
        key: WEB.into(),
        res_type: "microservice".into(),
        version: version.into(),
        value: value.to_string(),
    }
}

fn error_content(msg: &Message) -> ErrorContent {
    match msg.body() {
        Ok(Body::Error(refusal)) => refusal,
        other => panic!("expected an Error, got {other:?} in {msg:?}"),
    }
}

/// Holds the task inside a job until the returned sender fires, so what is sent meanwhile forms one batch.
async fn pause(meta: &MetaHandle) -> std::sync::mpsc::Sender<()> {
    let (release, wait) = std::sync::mpsc::channel();
    let (started, running) = oneshot::channel();
    let meta = meta.clone();
    tokio::spawn(async move {
        meta.with_actor(move |_| {
            let _ = started.send(());
            let _ = wait.recv();
            Ok(())
        })
        .await
    });
    timeout(DEADLINE, running).await.unwrap().unwrap();
    release
}

#[tokio::test]
async fn an_insert_is_in_the_file_when_acked_and_edged_is_told() {
    let mut rig = rig();
    let web = json!({"image": "web:1", "replicas": 1});
    let ack = rig.send(change(Operation::Insert, "c-1", WEB, Some("1"), web.clone())).await;
    // Read from a second connection the moment the ack arrives: the ack follows the commit.
    let row = rig.stored(WEB).expect("an acked change is in the file");
    assert_eq!((row.res_type.as_str(), row.version.as_str()), ("microservice", "1"));
    assert_eq!(serde_json::from_str::<Value>(&row.value).unwrap(), web);
    assert_eq!(
        (ack.operation, ack.resource.as_str(), ack.resource_version.as_deref()),
        (Operation::Response, WEB, Some("1"))
    );
    assert_eq!(ack.content, json!({"status": "ok"}));
    assert!(ack.id.starts_with("e-"), "{}", ack.id);
    assert_eq!(rig.edged_events(), [upserted("1", &web)]);
    assert_eq!(rig.meta.held_versions().await.unwrap(), BTreeMap::from([(WEB.to_owned(), "1".to_owned())]));
}

#[tokio::test]
async fn only_real_changes_are_written_and_passed_on_but_all_are_acked() {
    let mut rig = rig();
    let (v1, v1b) = (json!({"image": "web:1"}), json!({"image": "web:1", "replicas": 2}));
    let steps = [
        (Operation::Update, Some("1"), v1.clone(), Some(upserted("1", &v1))),
        (Operation::Update, Some("1"), v1.clone(), None), // delivered twice
        (Operation::Update, Some("1"), v1b.clone(), Some(upserted("1", &v1b))), // new content
        (Operation::Update, Some("2"), v1b.clone(), Some(upserted("2", &v1b))), // new version
        (Operation::Delete, None, Value::Null, Some(EdgedEvent::Deleted { key: WEB.into() })),
        (Operation::Delete, None, Value::Null, None), // already absent
    ];
    let mut written = 0;
    for (i, (operation, version, content, event)) in steps.into_iter().enumerate() {
        let reply = rig.send(change(operation, &format!("c-{i}"), WEB, version, content)).await;
        assert_eq!(reply.operation, Operation::Response, "step {i}");
        assert_eq!(rig.edged_events(), Vec::from_iter(event.clone()), "step {i}");
        written += u64::from(event.is_some());
        assert_eq!(rig.meta.stats().await.unwrap().rows_written, written, "step {i}");
    }
    assert_eq!(rig.stored(WEB), None);
    let stats = rig.meta.stats().await.unwrap();
    assert_eq!((stats.rows_written, stats.unchanged, stats.edged_events, stats.batches), (4, 2, 4, 6));
}

#[tokio::test]
async fn a_burst_of_changes_is_committed_in_one_transaction() {
    let mut rig = rig();
    let release = pause(&rig.meta).await;
    for i in 0..200 {
        let msg = change(
            Operation::Insert,
            &format!("c-{i}"),
            &format!("team/microservice/ms-{i}"),
            Some("1"),
            json!({"i": i}),
        );
        rig.meta.from_cloud(msg).await;
    }
    release.send(()).unwrap();
    let mut acked = BTreeSet::new();
    for _ in 0..200 {
        let ack = next(&mut rig.cloud).await;
        assert_eq!(ack.operation, Operation::Response, "{ack:?}");
        acked.insert(ack.parent_id.unwrap());
    }
    assert_eq!(acked.len(), 200);
    let stats = rig.meta.stats().await.unwrap();
    assert_eq!((stats.batches, stats.rows_written, stats.edged_events), (1, 200, 200));
}

#[tokio::test]
async fn bad_changes_are_refused_and_the_next_good_one_is_stored() {
    let mut rig = rig();
    let bad = [
        (change(Operation::Insert, "b-1", WEB, Some("1"), json!("{not json")), "JSON object"),
        (change(Operation::Insert, "b-2", WEB, Some("1"), Value::Null), "JSON object"),
        (change(Operation::Insert, "b-3", "team/../etc", Some("1"), json!({})), "invalid resource"),
        (change(Operation::Update, "b-4", WEB, None, json!({})), "no resourceVersion"),
    ];
    for (msg, reason) in bad {
        let nack = rig.send(msg).await;
        let content = error_content(&nack);
        assert_eq!(content.code, ErrorCode::BadMessage);
        assert!(content.message.contains(reason), "{}", content.message);
        // The nack must itself be a valid message, even when the refused resource is not.
        decode(&encode(&nack).unwrap()).unwrap();
    }
    assert_eq!(rig.stored(WEB), None);
    assert!(rig.edged_events().is_empty());
    assert_eq!(
        rig.send(change(Operation::Insert, "g-1", WEB, Some("1"), json!({}))).await.operation,
        Operation::Response
    );
    assert_eq!(rig.stored(WEB).unwrap().version, "1");
    assert_eq!(rig.meta.stats().await.unwrap().rows_written, 1);
}

#[tokio::test]
async fn queries_are_answered_locally_or_forwarded_while_connected() {
    let mut rig = rig();
    let web = json!({"image": "web"});
    rig.send(change(Operation::Insert, "c-1", WEB, Some("3"), web.clone())).await;
    assert_eq!(rig.meta.query(WEB).await.unwrap(), web);
    let err = rig.meta.query(REMOTE).await.unwrap_err();
    assert!(matches!(err, MetaError::Offline(_)) && err.to_string().contains("cloud is unreachable"), "{err}");
    assert!(rig.cloud.try_recv().is_err(), "nothing is forwarded while offline");
    assert!(matches!(rig.meta.query("bad").await, Err(MetaError::BadResource(_))));

    rig.meta.set_connection(ConnectionState::CloudConnected);
    let cloud_answers = [
        (Operation::Response, json!({"name": "db"})),
        (Operation::Error, json!({"code": "NotFound", "message": "no such microservice"})),
    ];
    for (operation, content) in cloud_answers {
        let meta = rig.meta.clone();
        let query = tokio::spawn(async move { meta.query(REMOTE).await });
        let forwarded = next(&mut rig.cloud).await;
        assert_eq!((forwarded.operation, forwarded.resource.as_str()), (Operation::Query, REMOTE));
        rig.meta.from_cloud(Message::new("c-2".into(), 2, operation, REMOTE, &content).answering(&forwarded.id)).await;
        match timeout(DEADLINE, query).await.unwrap().unwrap() {
            Ok(value) => assert_eq!((operation, value), (Operation::Response, content)),
            Err(MetaError::Cloud { code, .. }) => {
                assert_eq!((operation, code), (Operation::Error, ErrorCode::NotFound))
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }

    // A query in flight fails at once when the stream drops, not after the timeout.
    let meta = rig.meta.clone();
    let query = tokio::spawn(async move { meta.query(REMOTE).await });
    next(&mut rig.cloud).await;
    rig.meta.set_connection(ConnectionState::CloudDisconnected);
    assert!(matches!(timeout(DEADLINE, query).await.unwrap().unwrap(), Err(MetaError::Offline(_))));

    // The cloud's own queries are answered from the store.
    let reply = rig.send(Message::new("c-3".into(), 3, Operation::Query, WEB, ())).await;
    assert_eq!(
        (reply.operation, reply.resource_version.as_deref(), reply.content),
        (Operation::Response, Some("3"), web)
    );
    let reply = rig.send(Message::new("c-4".into(), 4, Operation::Query, REMOTE, ())).await;
    assert_eq!(error_content(&reply).code, ErrorCode::NotFound);
}

/// Every byte of the database file and its WAL.
fn db_bytes(path: &std::path::Path) -> Vec<u8> {
    let mut bytes = std::fs::read(path).unwrap();
    bytes.extend(std::fs::read(path.with_extension("db-wal")).unwrap_or_default());
    bytes
}

#[tokio::test]
async fn a_config_snapshot_from_the_cloud_is_stored_sealed_and_answered_locally_after_a_restart() {
    const KEY: [u8; 32] = [42; 32];
    const SNAPSHOT: &str = "team/config/web-1";
    let secret = "p4ssw0rd-of-the-db";
    let data = json!({"secrets": {"db": {"password": secret}}, "configMaps": {"app": {"mode": "fast"}}});
    let mut rig = rig_with(|store| store.set_sealing_key(seal::SealingKey::from_bytes(&KEY)));
    let web = json!({"namespace": "team", "name": "web", "uid": "u", "generation": 1,
        "spec": {"mesh": "m", "command": ["web"]}, "config": "web-1"});
    rig.send(change(Operation::Insert, "c-1", WEB, Some("1"), web)).await;
    assert!(matches!(rig.meta.query(SNAPSHOT).await, Err(MetaError::Offline(_))), "not stored, no cloud");

    rig.meta.set_connection(ConnectionState::CloudConnected);
    let meta = rig.meta.clone();
    let query = tokio::spawn(async move { meta.query(SNAPSHOT).await });
    let forwarded = next(&mut rig.cloud).await;
    assert_eq!((forwarded.operation, forwarded.resource.as_str()), (Operation::Query, SNAPSHOT));
    let answer = Message::new("c-2".into(), 2, Operation::Response, SNAPSHOT, &data).answering(&forwarded.id);
    rig.meta.from_cloud(answer).await;
    assert_eq!(timeout(DEADLINE, query).await.unwrap().unwrap().unwrap(), data);

    // From now on it is answered here, with no cloud.
    rig.meta.set_connection(ConnectionState::CloudDisconnected);
    assert_eq!(rig.meta.query(SNAPSHOT).await.unwrap(), data);
    assert!(rig.cloud.try_recv().is_err(), "nothing forwarded");
    let bytes = db_bytes(&rig.path);
    assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "the secret is in meta.db in clear");
    assert!(rig.stored(SNAPSHOT).is_none(), "not a resource of meta: not stated in the hello");

    // The cloud cannot read it back, nor push one.
    let reply = rig.send(Message::new("c-3".into(), 3, Operation::Query, SNAPSHOT, ())).await;
    assert_eq!(error_content(&reply).code, ErrorCode::NotFound);
    let pushed = rig.send(change(Operation::Insert, "c-4", "team/config/pushed", Some("1"), data.clone())).await;
    assert_eq!(error_content(&pushed).code, ErrorCode::BadMessage);
    assert_eq!(Store::open(&rig.path).unwrap().config_keys().unwrap(), [SNAPSHOT], "the pushed one is not stored");

    // An agent restart, offline: the same key opens it.
    let mut store = Store::open(&rig.path).unwrap();
    store.set_sealing_key(seal::SealingKey::from_bytes(&KEY));
    let (to_cloud, mut cloud) = mpsc::channel(QUEUE_CAPACITY);
    let (to_edged, _edged) = mpsc::channel(QUEUE_CAPACITY);
    let restarted = spawn(store, to_cloud, to_edged);
    assert_eq!(restarted.query(SNAPSHOT).await.unwrap(), data);
    assert!(cloud.try_recv().is_err());

    // Once no assignment names it, it is gone.
    rig.send(change(Operation::Delete, "c-5", WEB, None, Value::Null)).await;
    assert!(matches!(rig.meta.query(SNAPSHOT).await, Err(MetaError::Offline(_))));
}

#[tokio::test]
async fn the_outbox_keeps_unacked_reports_across_reopen() {
    let rig = rig();
    let mut seqs = Vec::new();
    for n in 0..3 {
        seqs.push(rig.meta.enqueue_report(Operation::MetaSync, "team/status/n1", &json!({"n": n})).await.unwrap());
    }
    let pending = rig.meta.outbox_pending(10).await.unwrap();
    assert_eq!(pending.iter().map(|e| e.seq).collect::<Vec<_>>(), seqs);
    assert_eq!((pending[2].operation, pending[2].content.as_str()), (Operation::MetaSync, r#"{"n":2}"#));
    assert_eq!(rig.meta.outbox_pending(2).await.unwrap().len(), 2);
    assert_eq!(rig.meta.outbox_acked(&seqs[..2]).await.unwrap(), 2);
    let left = Store::open(&rig.path).unwrap().pending(10).unwrap();
    assert_eq!(left.iter().map(|e| (e.seq, e.operation)).collect::<Vec<_>>(), [(seqs[2], Operation::MetaSync)]);
}

#[tokio::test]
async fn a_failed_commit_nacks_the_whole_batch_and_the_task_goes_on() {
    let mut rig = rig_with(|store| store.fill_disk());
    let release = pause(&rig.meta).await;
    let small = "team/microservice/small";
    rig.meta.from_cloud(change(Operation::Insert, "c-1", small, Some("1"), json!({}))).await;
    rig.meta
        .from_cloud(change(Operation::Insert, "c-2", WEB, Some("1"), json!({"blob": "x".repeat(256 * 1024)})))
        .await;
    release.send(()).unwrap();
    for id in ["c-1", "c-2"] {
        let nack = next(&mut rig.cloud).await;
        assert_eq!(nack.parent_id.as_deref(), Some(id));
        let content = error_content(&nack);
        assert_eq!(content.code, ErrorCode::StoreFailed);
        assert!(content.message.contains("full"), "{}", content.message);
    }
    assert_eq!(rig.stored(small), None);
    assert!(rig.edged_events().is_empty());
    // Still serving: a change that needs no new page goes through.
    let ack = rig.send(change(Operation::Delete, "c-3", WEB, None, Value::Null)).await;
    assert_eq!(ack.operation, Operation::Response);
    assert_eq!(rig.meta.stats().await.unwrap().batches, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_changes_and_queries_never_meet_a_locked_database() {
    let mut rig = rig();
    let workers: Vec<_> = (0..8)
        .map(|t| {
            let meta = rig.meta.clone();
            tokio::spawn(async move {
                for i in 0..25 {
                    let (key, content) = (format!("team/microservice/t{t}-{i}"), json!({"t": t, "i": i}));
                    meta.from_cloud(change(Operation::Insert, &format!("c-{t}-{i}"), &key, Some("1"), content.clone()))
                        .await;
                    // Queued behind the change, so answered from the store.
                    assert_eq!(meta.query(&key).await.unwrap(), content);
                    assert!(matches!(meta.query(&format!("team/other/t{t}-{i}")).await, Err(MetaError::Offline(_))));
                }
            })
        })
        .collect();
    // A second connection reading all along, as `supermesh-agent inspect` does.
    let path = rig.path.clone();
    let inspector = tokio::task::spawn_blocking(move || (0..20).try_for_each(|_| integrity_check(&path)));
    for worker in workers {
        timeout(DEADLINE, worker).await.unwrap().unwrap();
    }
    timeout(DEADLINE, inspector).await.unwrap().unwrap().unwrap();
    for _ in 0..200 {
        let ack = next(&mut rig.cloud).await;
        assert_eq!(ack.operation, Operation::Response, "{:?}", ack.content);
    }
    assert_eq!(rig.meta.held_versions().await.unwrap().len(), 200);
}

#[tokio::test]
async fn a_full_outbox_drops_the_oldest_events_counts_them_and_keeps_the_status() {
    let rig = rig_with(|store| store.set_outbox_cap(OutboxCap { reports: 3, bytes: 1 << 20 }));
    let status = supermesh_protocol::STATUS_RESOURCE;
    for n in 0..5 {
        rig.meta.enqueue_report(Operation::MetaSync, WEB, &json!({"event": n})).await.unwrap();
    }
    rig.meta.replace_report(Operation::MetaSync, status, &json!({"status": 1})).await.unwrap();
    rig.meta.replace_report(Operation::MetaSync, status, &json!({"status": 2})).await.unwrap();
    let held: Vec<_> = rig.meta.outbox_pending(10).await.unwrap().into_iter().map(|e| e.content).collect();
    assert_eq!(held, [r#"{"event":3}"#, r#"{"event":4}"#, r#"{"status":2}"#]);
    assert_eq!(rig.meta.stats().await.unwrap().events_dropped, 3);
    // Acked reports make room again: nothing more is dropped.
    let seqs: Vec<i64> = rig.meta.outbox_pending(2).await.unwrap().into_iter().map(|e| e.seq).collect();
    assert_eq!(rig.meta.outbox_acked(&seqs).await.unwrap(), 2);
    rig.meta.enqueue_report(Operation::MetaSync, WEB, &json!({"event": 5})).await.unwrap();
    assert_eq!(rig.meta.stats().await.unwrap().events_dropped, 3);
    assert_eq!(Store::open(&rig.path).unwrap().dropped_events().unwrap(), 3, "the count is in the file");
}

#[test]
fn drop_warnings_come_at_most_every_interval_with_what_was_dropped_since() {
    let cap = OutboxCap { reports: 3, bytes: 1 << 20 };
    let queued =
        |dropped, reports| Queued { seq: 1, dropped, dropped_total: 0, usage: OutboxUsage { reports, bytes: 0 } };
    let (mut warning, start) = (DropWarning::default(), Instant::now());
    assert!(!warning.note(&queued(0, 3), cap, start), "a full outbox that dropped nothing is no news");
    assert!(warning.note(&queued(2, 3), cap, start));
    assert!(!warning.note(&queued(1, 3), cap, start + DROP_WARNING_EVERY / 2));
    assert!(!warning.note(&queued(1, 3), cap, start + DROP_WARNING_EVERY / 2));
    assert_eq!(warning.unreported, 2, "held for the next warning");
    assert!(warning.note(&queued(1, 3), cap, start + DROP_WARNING_EVERY));
    assert_eq!(warning.unreported, 0);
    assert!(warning.note(&queued(0, 4), cap, start + DROP_WARNING_EVERY * 2), "snapshots alone over the cap");
}
