//! End-to-end tests of supermesh-controller against a real kube-apiserver.

use kube::api::{Api, ListParams};
use kube::ResourceExt;
use supermesh_api::names::condition::*;
use supermesh_api::names::FINALIZER;
use supermesh_api::{EdgeNode, Mesh, Microservice};
use supermesh_tests::{
    apply_yaml, delete_all, kubectl, microservice, try_kubectl, unique, workspace, Agent, Cluster, Controller,
    CONTROLLER_NAMESPACE,
};

fn ready_reason(m: &Microservice) -> Option<String> {
    let conditions = &m.status.as_ref()?.conditions;
    conditions.iter().find(|c| c.type_ == READY).map(|c| c.reason.clone())
}

fn desired(m: &Microservice) -> Option<i32> {
    m.status.as_ref().filter(|s| s.observed_generation == m.metadata.generation).map(|s| s.desired_instances)
}

/// EdgeNodes on a network and account of their own, so tests never see each other's nodes.
struct Fleet {
    names: Vec<String>,
    network: String,
    account: String,
}

impl Fleet {
    fn new(count: usize) -> Fleet {
        let id = unique();
        let fleet = Fleet {
            names: (0..count).map(|i| format!("node-{id}-{i}")).collect(),
            network: format!("net-{id}"),
            account: format!("acct-{id}"),
        };
        for name in &fleet.names {
            fleet.apply(name, &fleet.account, "");
        }
        fleet
    }

    /// Applies node `name` with `account` and extra YAML under `metadata` (labels).
    fn apply(&self, name: &str, account: &str, metadata: &str) {
        let yaml = format!(
            "apiVersion: supermesh.io/v1alpha1\nkind: EdgeNode\nmetadata:\n  name: {name}\n{metadata}spec:\n  account: {account}\n  network: {}\n",
            self.network
        );
        apply_yaml(&yaml, &[]).expect("apply EdgeNode");
    }

    fn account_mesh(&self, ns: &str, name: &str) {
        let yaml = format!(
            "apiVersion: supermesh.io/v1alpha1\nkind: Mesh\nmetadata:\n  name: {name}\nspec:\n  type: Account\n  account: {}\n",
            self.account
        );
        apply_yaml(&yaml, &["-n", ns]).expect("apply Mesh");
    }

    async fn delete(&self, api: &Api<EdgeNode>) {
        delete_all(api, &self.names).await;
    }
}

#[tokio::test]
async fn examples_get_their_expected_desired_instances() {
    let cluster = Cluster::connect().await;
    let ns = cluster.namespace("examples");
    let controller = Controller::start("examples");
    let examples = workspace().join("examples").display().to_string();
    kubectl(&["apply", "-n", &ns, "-f", &examples]);

    let msvcs: Api<Microservice> = Api::namespaced(cluster.client.clone(), &ns);
    let hello = controller.wait_for(&msvcs, "hello", "3 desired instances", |m| desired(m) == Some(3)).await;
    assert_eq!(ready_reason(&hello).as_deref(), Some(INSTANCES_NOT_READY));
    controller.wait_for(&msvcs, "telemetry", "2 desired instances", |m| desired(m) == Some(2)).await;

    let meshes: Api<Mesh> = Api::namespaced(cluster.client.clone(), &ns);
    let count = |n: i32| move |m: &Mesh| m.status.as_ref().is_some_and(|s| s.node_count == n);
    let home = controller.wait_for(&meshes, "home", "3 nodes", count(3)).await;
    let cluster_home = &home.status.unwrap().clusters[0];
    assert_eq!((cluster_home.network.as_str(), cluster_home.members), ("home", 3));
    controller.wait_for(&meshes, "acme", "4 nodes", count(4)).await;
    controller.wait_for(&meshes, "paris", "3 nodes (Lyon is outside 5 km)", count(3)).await;

    // What a user sees with kubectl: printer columns filled in.
    let table = kubectl(&["get", "msvc", "-n", &ns]);
    let row = table.lines().find(|l| l.starts_with("hello")).unwrap_or_else(|| panic!("no hello row in\n{table}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cols[..6], ["hello", "home", "3", "0", "0", INSTANCES_NOT_READY], "{table}");
    let edgenodes: Api<EdgeNode> = Api::all(cluster.client.clone());
    controller.wait_for(&edgenodes, "pi-kitchen", "hello counted on the node", |n| instances(n) >= 1).await;

    let example_nodes = ["pi-kitchen", "pi-garage", "pi-attic", "nuc-office"].map(String::from);
    kubectl(&["delete", "-n", &ns, "--wait=false", "-f", &examples]);
    for name in &example_nodes {
        controller.wait_gone(&edgenodes, name).await;
    }
}

#[tokio::test]
async fn a_missing_mesh_is_reported_until_the_mesh_appears() {
    let cluster = Cluster::connect().await;
    let ns = cluster.namespace("missing-mesh");
    let controller = Controller::start("missing-mesh");
    let fleet = Fleet::new(2);
    apply_yaml(&microservice("orphan", "ghost", ""), &["-n", &ns]).unwrap();

    let msvcs: Api<Microservice> = Api::namespaced(cluster.client.clone(), &ns);
    let m = controller
        .wait_for(&msvcs, "orphan", "MeshNotFound", |m| ready_reason(m).as_deref() == Some(MESH_NOT_FOUND))
        .await;
    let message = &m.status.unwrap().conditions[0].message;
    assert!(message.contains("\"ghost\"") && message.contains(&ns), "message names mesh and namespace: {message}");
    let events = kubectl(&["get", "events", "-n", &ns, "-o", "jsonpath={.items[*].reason}"]);
    assert!(events.contains(MESH_NOT_FOUND), "a MeshNotFound event is published: {events:?}");

    // Creating the mesh is enough: the controller reacts to Mesh changes.
    fleet.account_mesh(&ns, "ghost");
    controller.wait_for(&msvcs, "orphan", "placed on 2 nodes", |m| desired(m) == Some(2)).await;
    fleet.delete(&Api::all(cluster.client.clone())).await;
}

#[tokio::test]
async fn the_schema_rejects_malformed_objects_and_bad_specs_become_conditions() {
    let cluster = Cluster::connect().await;
    let ns = cluster.namespace("invalid");
    let controller = Controller::start("invalid");

    let rejected = [
        ("kind: Mesh\nmetadata: {name: m1}\nspec: {type: Galaxy}", "spec.type"),
        ("kind: Mesh\nmetadata: {name: m2}\nspec: {type: Proximity, proximity: {center: {latitude: 91, longitude: 0}, radiusKm: 1}}", "latitude"),
        ("kind: Mesh\nmetadata: {name: m3}\nspec: {type: Proximity, proximity: {center: {latitude: 0, longitude: 0}, radiusKm: -1}}", "radiusKm"),
        ("kind: Microservice\nmetadata: {name: s1}\nspec: {mesh: m, command: [x], replicas: -1}", "replicas"),
        ("kind: Microservice\nmetadata: {name: s2}\nspec: {mesh: m, command: [x], artifact: {url: 'http://x', sha256: NOTAHASH}}", "sha256"),
        ("kind: Microservice\nmetadata: {name: s3}\nspec: {command: [x]}", "mesh"),
        ("kind: Microservice\nmetadata: {name: s4}\nspec: {mesh: m, command: [x], ports: [{port: 70000}]}", "port"),
        ("kind: EdgeNode\nmetadata: {name: bad-node}\nspec: {account: a}", "network"),
    ];
    for (body, field) in rejected {
        let yaml = format!("apiVersion: supermesh.io/v1alpha1\n{body}\n");
        let err = apply_yaml(&yaml, &["-n", &ns]).expect_err(&format!("the API server must reject:\n{yaml}"));
        assert!(err.contains(field), "the error names {field}: {err}");
    }

    // Well-typed but inconsistent specs are accepted and explained in conditions.
    let fleet = Fleet::new(1);
    apply_yaml(
        "apiVersion: supermesh.io/v1alpha1\nkind: Mesh\nmetadata: {name: near}\nspec: {type: Proximity}\n",
        &["-n", &ns],
    )
    .unwrap();
    apply_yaml(&microservice("on-bad-mesh", "near", ""), &["-n", &ns]).unwrap();
    fleet.account_mesh(&ns, "good");
    let two_checks = "  healthCheck: {tcp: {port: 80}, exec: {command: [\"true\"]}}\n";
    apply_yaml(&microservice("two-checks", "good", two_checks), &["-n", &ns]).unwrap();
    apply_yaml(&microservice("fine", "good", ""), &["-n", &ns]).unwrap();

    let meshes: Api<Mesh> = Api::namespaced(cluster.client.clone(), &ns);
    let near = controller
        .wait_for(&meshes, "near", "InvalidSpec", |m| {
            m.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.reason == INVALID_SPEC))
        })
        .await;
    assert!(near.status.unwrap().conditions[0].message.contains("spec.proximity"));
    let msvcs: Api<Microservice> = Api::namespaced(cluster.client.clone(), &ns);
    let reason = |r: &'static str| move |m: &Microservice| ready_reason(m).as_deref() == Some(r);
    controller.wait_for(&msvcs, "on-bad-mesh", "MeshInvalid", reason(MESH_INVALID)).await;
    let m = controller.wait_for(&msvcs, "two-checks", "InvalidSpec", reason(INVALID_SPEC)).await;
    assert!(m.status.unwrap().conditions[0].message.contains("exactly one"));
    // Bad objects do not stop the watch: a good one beside them is reconciled.
    controller.wait_for(&msvcs, "fine", "placed", |m| desired(m) == Some(1)).await;
    fleet.delete(&Api::all(cluster.client.clone())).await;
}

#[tokio::test]
async fn edgenode_changes_move_placement() {
    let cluster = Cluster::connect().await;
    let ns = cluster.namespace("placement");
    let controller = Controller::start("placement");
    let fleet = Fleet::new(3);
    fleet.account_mesh(&ns, "fleet");
    apply_yaml(&microservice("gpu-job", "fleet", "  nodeSelector: {gpu: \"yes\"}\n"), &["-n", &ns]).unwrap();
    let msvcs: Api<Microservice> = Api::namespaced(cluster.client.clone(), &ns);
    let on = |n: i32| move |m: &Microservice| desired(m) == Some(n);
    let m = controller.wait_for(&msvcs, "gpu-job", "no matching nodes", on(0)).await;
    assert_eq!(ready_reason(&m).as_deref(), Some(NO_MATCHING_NODES));

    let gpu = "  labels: {gpu: \"yes\"}\n";
    fleet.apply(&fleet.names[0], &fleet.account, gpu);
    controller.wait_for(&msvcs, "gpu-job", "1 node after labelling one", on(1)).await;
    fleet.apply(&fleet.names[1], &fleet.account, gpu);
    controller.wait_for(&msvcs, "gpu-job", "2 nodes after labelling another", on(2)).await;

    // Moving a node to another account takes it out of the Account mesh.
    fleet.apply(&fleet.names[0], "someone-else", gpu);
    controller.wait_for(&msvcs, "gpu-job", "1 node after an account change", on(1)).await;

    // An unschedulable node gets nothing new, even when it starts to match.
    let unschedulable = format!(
        "apiVersion: supermesh.io/v1alpha1\nkind: EdgeNode\nmetadata:\n  name: {}\n{gpu}spec:\n  account: {}\n  network: {}\n  unschedulable: true\n",
        fleet.names[2], fleet.account, fleet.network
    );
    apply_yaml(&unschedulable, &[]).unwrap();
    let meshes: Api<Mesh> = Api::namespaced(cluster.client.clone(), &ns);
    controller
        .wait_for(&meshes, "fleet", "still 2 members", |m| m.status.as_ref().is_some_and(|s| s.node_count == 2))
        .await;
    let edgenodes: Api<EdgeNode> = Api::all(cluster.client.clone());
    let n2 = controller
        .wait_for(&edgenodes, &fleet.names[2], "reconciled", |n| {
            n.status.as_ref().is_some_and(|s| s.instances.is_some())
        })
        .await;
    assert_eq!(n2.status.unwrap().instances.unwrap().desired, 0);
    assert_eq!(desired(&msvcs.get("gpu-job").await.unwrap()), Some(1));
    fleet.delete(&edgenodes).await;
}

#[tokio::test]
async fn deleting_objects_removes_finalizers_cleanly() {
    let cluster = Cluster::connect().await;
    let ns = cluster.namespace("delete");
    let controller = Controller::start("delete");
    let fleet = Fleet::new(1);
    fleet.account_mesh(&ns, "m");
    apply_yaml(&microservice("a", "m", ""), &["-n", &ns]).unwrap();
    apply_yaml(&microservice("b", "m", ""), &["-n", &ns]).unwrap();

    let msvcs: Api<Microservice> = Api::namespaced(cluster.client.clone(), &ns);
    let meshes: Api<Mesh> = Api::namespaced(cluster.client.clone(), &ns);
    let edgenodes: Api<EdgeNode> = Api::all(cluster.client.clone());
    let has_finalizer = |finalizers: &[String]| finalizers.iter().any(|f| f == FINALIZER);
    for name in ["a", "b"] {
        let m = controller.wait_for(&msvcs, name, "placed", |m| desired(m) == Some(1)).await;
        assert!(has_finalizer(m.finalizers()), "{name} carries {FINALIZER}");
    }
    let node = controller.wait_for(&edgenodes, &fleet.names[0], "2 instances", |n| instances(n) == 2).await;
    assert!(has_finalizer(node.finalizers()));
    let mesh = meshes.get("m").await.unwrap();
    assert!(has_finalizer(mesh.finalizers()));

    kubectl(&["delete", "msvc", "a", "-n", &ns, "--timeout=30s"]);
    controller.wait_gone(&msvcs, "a").await;
    controller.wait_for(&edgenodes, &fleet.names[0], "1 instance left", |n| instances(n) == 1).await;

    kubectl(&["delete", "mesh", "m", "-n", &ns, "--timeout=30s"]);
    controller.wait_gone(&meshes, "m").await;
    controller.wait_for(&msvcs, "b", "MeshNotFound", |m| ready_reason(m).as_deref() == Some(MESH_NOT_FOUND)).await;

    kubectl(&["delete", "edgenode", &fleet.names[0], "--timeout=30s"]);
    controller.wait_gone(&edgenodes, &fleet.names[0]).await;
    kubectl(&["delete", "msvc", "b", "-n", &ns, "--timeout=30s"]);
    controller.wait_gone(&msvcs, "b").await;
}

/// Instances placed on a node, as its status says (-1 before the first count).
fn instances(node: &EdgeNode) -> i32 {
    node.status.as_ref().and_then(|s| s.instances.as_ref()).map_or(-1, |i| i.desired)
}

#[tokio::test]
async fn a_controller_restart_changes_nothing() {
    let cluster = Cluster::connect().await;
    let ns = cluster.namespace("restart");
    let fleet = Fleet::new(3);
    fleet.account_mesh(&ns, "m");
    apply_yaml(&microservice("every", "m", ""), &["-n", &ns]).unwrap();
    apply_yaml(&microservice("two", "m", "  replicas: 2\n"), &["-n", &ns]).unwrap();

    let msvcs: Api<Microservice> = Api::namespaced(cluster.client.clone(), &ns);
    let meshes: Api<Mesh> = Api::namespaced(cluster.client.clone(), &ns);
    let edgenodes: Api<EdgeNode> = Api::all(cluster.client.clone());
    let first = Controller::start("restart-1");
    first.wait_ready().await;
    assert_eq!(first.http_get("/healthz").map(|(c, _)| c), Some(200));
    first.wait_for(&msvcs, "every", "3 placed", |m| desired(m) == Some(3)).await;
    first.wait_for(&msvcs, "two", "2 placed", |m| desired(m) == Some(2)).await;
    first.wait_for(&meshes, "m", "3 nodes", |m| m.status.as_ref().is_some_and(|s| s.node_count == 3)).await;
    // 3 instances of "every" and 2 of "two": 5 in all across the nodes.
    first
        .wait_until("5 instances counted on the nodes", || {
            let out = kubectl(&[
                "get",
                "edgenodes",
                "-o",
                "jsonpath={range .items[*]}{.metadata.name}={.status.instances.desired}{\"\\n\"}{end}",
            ]);
            let sum: i32 = out
                .lines()
                .filter_map(|l| l.split_once('='))
                .filter(|(name, _)| fleet.names.iter().any(|n| n == name))
                .filter_map(|(_, v)| v.parse::<i32>().ok())
                .sum();
            sum == 5
        })
        .await;
    let versions = snapshot(&msvcs, &meshes, &edgenodes, &fleet.names).await;
    first.stop();

    let second = Controller::start("restart-2");
    second.wait_ready().await;
    // Wait until the new controller has reconciled every object at least once.
    for (kind, n) in [("Microservice", 2.0), ("Mesh", 1.0), ("EdgeNode", 3.0)] {
        second
            .wait_until(&format!("{n} {kind} reconciles"), || {
                second.metric("supermesh_controller_reconciliations_total", &format!("kind=\"{kind}\"")).unwrap_or(0.0)
                    >= n
            })
            .await;
    }
    let after = snapshot(&msvcs, &meshes, &edgenodes, &fleet.names).await;
    assert_eq!(versions, after, "a restart must not rewrite any object");
    for kind in ["Microservice", "Mesh", "EdgeNode"] {
        let writes = second.metric("supermesh_controller_status_writes_total", &format!("kind=\"{kind}\""));
        assert_eq!(writes.unwrap_or(0.0), 0.0, "{kind} status writes after restart");
    }
    fleet.delete(&edgenodes).await;
}

/// Resource versions of every object a test made, by name.
async fn snapshot(
    msvcs: &Api<Microservice>,
    meshes: &Api<Mesh>,
    nodes: &Api<EdgeNode>,
    node_names: &[String],
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for m in msvcs.list(&ListParams::default()).await.unwrap() {
        out.push((m.name_any(), m.resource_version().unwrap_or_default()));
    }
    for m in meshes.list(&ListParams::default()).await.unwrap() {
        out.push((m.name_any(), m.resource_version().unwrap_or_default()));
    }
    for name in node_names {
        let n = nodes.get(name).await.unwrap();
        out.push((n.name_any(), n.resource_version().unwrap_or_default()));
    }
    out
}

#[tokio::test]
async fn the_controller_needs_no_more_than_the_charts_rbac_rules() {
    let cluster = Cluster::connect().await;
    let user = format!("supermesh-rbac-{}", unique());
    let read = |file: &str| -> serde_yaml::Value {
        let path = workspace().join("charts/supermesh/rbac").join(file);
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let (rules, namespace_rules) = (read("rules.yaml"), read("namespace-rules.yaml"));
    let subject = serde_json::json!([{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]);
    let in_ns = serde_json::json!({"name": user, "namespace": CONTROLLER_NAMESPACE});
    let rbac = serde_json::json!({
        "apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": user}, "rules": rules},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": user},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": user},
             "subjects": subject},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": in_ns, "rules": namespace_rules},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": in_ns,
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": user}, "subjects": subject},
        ]
    });
    apply_yaml(&serde_yaml::to_string(&rbac).unwrap(), &[]).expect("apply RBAC");
    // Without the binding, the same user may not even read the CRDs.
    let denied = try_kubectl(&["get", "crd", "meshes.supermesh.io", "--as", "nobody-at-all"]);
    assert!(denied.is_err_and(|e| e.contains("forbidden")));

    let ns = cluster.namespace("rbac");
    let fleet = Fleet::new(2);
    fleet.account_mesh(&ns, "m");
    apply_yaml(&microservice("svc", "m", ""), &["-n", &ns]).unwrap();
    let controller = Controller::start_as("rbac", &user);
    let msvcs: Api<Microservice> = Api::namespaced(cluster.client.clone(), &ns);
    controller.wait_for(&msvcs, "svc", "placed with the chart's permissions", |m| desired(m) == Some(2)).await;
    let meshes: Api<Mesh> = Api::namespaced(cluster.client.clone(), &ns);
    controller.wait_for(&meshes, "m", "counted", |m| m.status.as_ref().is_some_and(|s| s.node_count == 2)).await;
    let edgenodes: Api<EdgeNode> = Api::all(cluster.client.clone());
    controller.wait_for(&edgenodes, &fleet.names[0], "instance counted", |n| instances(n) == 1).await;
    controller
        .wait_until("a Placed event", || {
            kubectl(&["get", "events", "-n", &ns, "-o", "jsonpath={.items[*].reason}"]).contains(PLACED)
        })
        .await;
    // A device enrolls with a limited token: the controller reads it, counts the use, creates the EdgeNode.
    let token = supermesh_tests::join_token_with(&["--auto-approve", "--uses", "1"]).await;
    let agent =
        Agent::start(&format!("rbac-agent-{}", unique()), "rbac-net", "rbac-acct", &controller.cloudhub_addr, &token);
    let connected = |n: &EdgeNode| {
        n.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Connected" && c.status == "True"))
    };
    controller
        .wait_for(&edgenodes, &agent.name, "enrolled and connected with the chart's permissions", connected)
        .await;
    // `/logs` checks its caller with a TokenReview and a SubjectAccessReview.
    let (code, body) = controller.http_get_as(&format!("/logs/{ns}/svc"), &supermesh_tests::kube_token()).unwrap();
    assert!(![401, 403].contains(&code) && !body.contains("cannot check"), "{code}: {body}");
    let log = controller.log();
    assert!(!log.contains("forbidden"), "the controller hit an RBAC denial:\n{log}");
    fleet.delete(&edgenodes).await;
    delete_all(&edgenodes, std::slice::from_ref(&agent.name)).await;
}

#[tokio::test]
async fn install_crds_applies_the_crds_and_waits_until_established() {
    let _cluster = Cluster::connect().await;
    let controller = Controller::launch("install-crds", None, &["--install-crds"]);
    controller.wait_ready().await;
    let installed = controller.log().matches("CRD installed").count();
    assert_eq!(installed, 3, "three CRDs installed:\n{}", controller.log_tail());
    let managers =
        kubectl(&["get", "crd", "meshes.supermesh.io", "-o", "jsonpath={.metadata.managedFields[*].manager}"]);
    assert!(managers.contains("supermesh-controller"), "applied by the controller: {managers}");
}

#[tokio::test]
async fn a_missing_namespace_is_named_with_the_way_to_create_it() {
    let _cluster = Cluster::connect().await;
    let absent = format!("absent-{}", unique());
    let mut controller = Controller::launch("no-namespace", None, &["--namespace", &absent]);
    let status =
        controller.wait_exit(supermesh_tests::DEADLINE).expect("the controller stops instead of retrying forever");
    assert!(!status.success(), "{status}");
    let log = controller.log();
    assert!(
        log.contains(&format!("namespace \"{absent}\" does not exist: create it (kubectl create namespace {absent})")),
        "{log}"
    );
    assert!(!log.contains("ApiError"), "a raw API error is no explanation:\n{log}");
}
