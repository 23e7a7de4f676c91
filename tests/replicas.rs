//! Several controller replicas against the real API server, with real agents:
//! nodes spread over the replicas, agents sent to the replica that serves them,
//! the Microservice status counting every node whichever replica serves it, and the
//! loss of a replica moving its nodes to the others with nothing resent, no instance
//! restarted, no EdgeNode turning Connected=False and no count dropping.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams};
use kube::runtime::{watcher, WatchStreamExt};
use supermesh_api::{EdgeNode, Microservice};
use supermesh_tests::{
    apply_yaml, free_port, http, join_token, kubectl, microservice, unique, Agent, Cluster, Controller, Launch, AGENTS,
    CONTROLLER_NAMESPACE, SENT,
};

const REPLICAS: usize = 3;
const NODES: usize = 9;
const RESENT: &str = "supermesh_controller_cloudhub_changes_resent_total";
const RECEIVED: &str = "supermesh_controller_reports_received_total";

fn served(controller: &Controller) -> usize {
    controller.metric(AGENTS, "").unwrap_or(0.0) as usize
}

fn connected(node: &EdgeNode) -> Option<&str> {
    let status = node.status.as_ref()?;
    status.conditions.iter().find(|c| c.type_ == "Connected").map(|c| c.status.as_str())
}

#[tokio::test]
async fn a_lost_replica_hands_its_nodes_over_without_a_flap_a_resend_or_a_restart() {
    let cluster = Cluster::connect().await;
    let ns = cluster.namespace("replicas");
    let id = unique();
    let ids: Vec<String> = (0..REPLICAS).map(|i| format!("r{i}-{id}")).collect();
    let mut controllers: Vec<Controller> = ids
        .iter()
        .map(|replica| {
            let addr = format!("127.0.0.1:{}", free_port());
            let args = ["--replica-id", replica.as_str(), "--advertise-address", addr.as_str()];
            Controller::launch_at(replica, None, &addr, &args)
        })
        .collect();
    for controller in &controllers {
        controller.wait_ready().await;
    }
    let token = join_token().await;
    let mesh = format!("apiVersion: supermesh.io/v1alpha1\nkind: Mesh\nmetadata: {{name: m}}\nspec: {{type: Account, account: acct-{id}}}\n");
    apply_yaml(&mesh, &["-n", &ns]).unwrap();

    // Every agent dials replica 0, as it would dial a Service in front of the replicas;
    // replica 0 sends each to the replica that serves its node.
    let agents: Vec<Agent> = (0..NODES)
        .map(|i| {
            let (name, network, account) = (format!("node-{id}-{i}"), format!("net-{id}"), format!("acct-{id}"));
            Agent::launch(&name, &network, &account, &controllers[0].cloudhub_addr, &token, Launch::default())
        })
        .collect();
    let first = &controllers[0];
    first.wait_until("every agent served", || controllers.iter().map(served).sum::<usize>() == NODES).await;
    let spread: Vec<usize> = controllers.iter().map(served).collect();
    assert!(spread.iter().all(|&n| n < NODES), "one replica serves every node: {spread:?}");
    let nodes: Api<EdgeNode> = Api::all(cluster.client.clone());
    for agent in &agents {
        first.wait_for(&nodes, &agent.name, "Connected=True", |n| connected(n) == Some("True")).await;
    }

    apply_yaml(&microservice("svc", "m", ""), &["-n", &ns]).unwrap();
    let key = format!("{ns}/microservice/svc");
    for agent in &agents {
        agent.wait_held("svc", |held| held.contains_key(&key)).await;
        first.wait_until("the instance running", || agent.instance_pid(&key).is_some()).await;
    }
    let pids: Vec<Option<i32>> = agents.iter().map(|a| a.instance_pid(&key)).collect();
    // Any replica reads the log of an instance on any node: one that does not serve the
    // node passes the request on to the one that does.
    for agent in &agents {
        let path = format!("/logs/{ns}/svc?node={}&tail=5", agent.name);
        let answer = first.http_get_as(&path, &supermesh_tests::kube_token());
        assert_eq!(answer.as_ref().map(|(code, _)| *code), Some(200), "{path}: {answer:?}");
    }
    // The leader counts the instances of every node, whichever replica took its reports.
    let msvcs: Api<Microservice> = Api::namespaced(cluster.client.clone(), &ns);
    let ready = |m: &Microservice| m.status.as_ref().map_or(0, |s| s.ready_instances) as usize;
    first.wait_for(&msvcs, "svc", "every instance counted ready", |m| ready(m) == NODES).await;

    // A device knows the bootstrap secret, not the key replicas sign forwards with: a forward
    // it forges (every instance of node 0 gone) is refused and changes nothing.
    let received = |c: &Controller| c.metric(RECEIVED, "").unwrap_or(0.0);
    let before: Vec<f64> = controllers.iter().map(received).collect();
    assert!(before.iter().sum::<f64>() > 0.0, "no replica took the reports of another");
    let secret = token.split_once('.').map(|(_, s)| s).unwrap_or_default();
    let forged = serde_json::json!({
        "from": "intruder",
        "reports": { &agents[0].name: { "takenMs": i64::MAX / 2, "instances": [] } },
    });
    let body = serde_json::to_vec(&forged).unwrap();
    let signature = supermesh_protocol::peer::sign(secret, &body);
    for controller in &controllers {
        let headers = [("x-supermesh-replica-signature", signature.as_str()), ("content-type", "application/json")];
        let answer = http(&controller.metrics_addr, "POST", "/replica/v1/reports", &headers, &body);
        assert_eq!(answer.map(|(code, _)| code), Some(403), "a forged forward was not refused");
    }
    assert_eq!(controllers.iter().map(received).collect::<Vec<_>>(), before, "a forged report was taken");
    assert_eq!(ready(&msvcs.get("svc").await.unwrap()), NODES);

    // Record every Connected=False of these nodes from here on.
    let names: BTreeSet<String> = agents.iter().map(|a| a.name.clone()).collect();
    let flapped = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen_marker = Arc::new(Mutex::new(false));
    let fewest_ready = Arc::new(Mutex::new(NODES));
    let count_watch = {
        let fewest_ready = fewest_ready.clone();
        let stream = watcher(msvcs.clone(), watcher::Config::default()).applied_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(Ok(msvc)) = stream.next().await {
                let mut fewest = fewest_ready.lock().unwrap();
                *fewest = (*fewest).min(ready(&msvc));
            }
        })
    };
    let watch = {
        let (names, flapped, seen_marker) = (names.clone(), flapped.clone(), seen_marker.clone());
        let stream = watcher(nodes.clone(), watcher::Config::default()).applied_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(Ok(node)) = stream.next().await {
                let name = node.metadata.name.clone().unwrap_or_default();
                if names.contains(&name) && connected(&node) == Some("False") {
                    flapped.lock().unwrap().push(name.clone());
                }
                if node.metadata.labels.as_ref().is_some_and(|l| l.contains_key("replicas-test-marker")) {
                    *seen_marker.lock().unwrap() = true;
                }
            }
        })
    };

    // Lose the busiest replica other than the one agents dial (a Service would stop
    // routing to a lost Pod; here the dialled one stays).
    let victim = (1..REPLICAS).max_by_key(|&i| served(&controllers[i])).unwrap();
    let moved = served(&controllers[victim]);
    assert!(moved > 0, "replica {victim} serves no node: {spread:?}");
    let survivors: Vec<usize> = (0..REPLICAS).filter(|&i| i != victim).collect();
    let sent_before: f64 = survivors.iter().map(|&i| controllers[i].metric(SENT, "").unwrap_or(0.0)).sum();
    controllers[victim].kill9();
    let lost = std::time::Instant::now();
    let first = &controllers[0];
    first
        .wait_until("the survivors serving every node", || {
            survivors.iter().map(|&i| served(&controllers[i])).sum::<usize>() == NODES
        })
        .await;
    eprintln!(
        "{moved} nodes of replica {victim} served again {:.1} s after it was killed",
        lost.elapsed().as_secs_f64()
    );

    // The watch has seen everything up to a marker written now.
    kubectl(&["label", "edgenode", &agents[0].name, "replicas-test-marker=1"]);
    first.wait_until("the EdgeNode watch to catch up", || *seen_marker.lock().unwrap()).await;
    watch.abort();
    count_watch.abort();
    assert_eq!(*flapped.lock().unwrap(), Vec::<String>::new(), "EdgeNodes turned Connected=False meanwhile");
    assert_eq!(*fewest_ready.lock().unwrap(), NODES, "the ready count dropped while nodes moved");
    let sent_after: f64 = survivors.iter().map(|&i| controllers[i].metric(SENT, "").unwrap_or(0.0)).sum();
    assert_eq!(sent_after, sent_before, "the survivors sent changes the moved agents already held");
    for &i in &survivors {
        assert_eq!(controllers[i].metric(RESENT, ""), Some(0.0), "replica {i} resent changes");
    }
    let after: Vec<Option<i32>> = agents.iter().map(|a| a.instance_pid(&key)).collect();
    assert_eq!(after, pids, "instances were restarted");
    for agent in &agents {
        assert_eq!(agent.edged_events(&key), 1, "{} was told about svc again", agent.name);
    }

    // Leave nothing behind: the EdgeNodes, and the announcement the killed replica could not withdraw.
    drop(agents);
    for name in &names {
        let _ = nodes.delete(name, &DeleteParams::default()).await;
    }
    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), CONTROLLER_NAMESPACE);
    let _ = leases.delete(&format!("supermesh-replica-{}", ids[victim]), &DeleteParams::default()).await;
    controllers.clear();
}
