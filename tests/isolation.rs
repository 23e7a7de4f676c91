//! End-to-end tests of instance isolation: real agents run real microservices, each
//! under a user of its own, and one instance tries to reach what is not its own.

use std::collections::BTreeMap;

use kube::api::Api;
use supermesh_api::Microservice;
use supermesh_tests::{Agent, Launch, Site};

/// Microservice `b`: keeps a secret in its work directory and in its key/value storage.
const KEEPER: &str = r#"
import json, os, time, urllib.request
token = open(os.environ["SUPERMESH_TOKEN_FILE"]).read()
open("secret.txt", "w").write("b's secret")
request = urllib.request.Request(os.environ["SUPERMESH_API"] + "/v1/kv/secret", data=json.dumps("b-data").encode(),
                                 method="PUT", headers={"Authorization": "Bearer " + token, "Content-Type": "application/json"})
urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request).read()
open("stored.tmp", "w").write("yes"); os.rename("stored.tmp", "stored")
time.sleep(3600)
"#;

/// Microservice `a`: tries everything that is not its own and writes what it got to
/// `result.json` in its work directory. Arguments: b's instance directory name, edge.yaml.
const PROBER: &str = r#"
import errno, json, os, sys, time, urllib.error, urllib.request
token_file = os.environ["SUPERMESH_TOKEN_FILE"]
mine = os.path.dirname(token_file)
instances = os.path.dirname(mine)
data = os.path.dirname(instances)
other = os.path.join(instances, sys.argv[1])
def attempt(how, path):
    try:
        if how == "list":
            os.listdir(path)
        else:
            open(path, "rb").read(1)
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
result = {
    "own token": attempt("read", token_file),
    "own work": attempt("list", "."),
    "b token": attempt("read", os.path.join(other, "token")),
    "b work": attempt("list", os.path.join(other, "work")),
    "b secret": attempt("read", os.path.join(other, "work", "secret.txt")),
    "b log": attempt("read", os.path.join(other, "logs", "current.log")),
    "b record": attempt("read", os.path.join(other, "instance.json")),
    "api.key": attempt("read", os.path.join(data, "api.key")),
    "meta.db": attempt("read", os.path.join(data, "meta.db")),
    "identity": attempt("list", os.path.join(data, "identity")),
    "edge.yaml": attempt("read", sys.argv[2]),
    "instances": attempt("list", instances),
}
foreign = 0
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        if os.stat("/proc/" + pid).st_uid != os.getuid():
            open("/proc/%s/environ" % pid, "rb").read(1)
            foreign += 1
    except OSError:
        pass
result["foreign environs read"] = foreign
result["token variables"] = sorted(k for k in os.environ if "TOKEN" in k)
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
for field in ("Uid", "Gid", "Groups", "CapEff", "CapPrm", "CapAmb", "CapBnd", "NoNewPrivs"):
    result[field] = status[field].split()
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
def kv(bearer):
    request = urllib.request.Request(os.environ["SUPERMESH_API"] + "/v1/kv", headers={"Authorization": "Bearer " + bearer})
    try:
        return [200, json.loads(opener.open(request).read())]
    except urllib.error.HTTPError as e:
        return [e.code, None]
token = open(token_file).read()
result["kv own"] = kv(token)
result["kv forged"] = kv(token[:-4] + ("0000" if not token.endswith("0000") else "1111"))
json.dump(result, open("result.tmp", "w")); os.rename("result.tmp", "result.json")
time.sleep(3600)
"#;

fn python(name: &str, program: &str, args: &[&str], extra: serde_json::Value) -> String {
    let mut spec = serde_json::json!({"mesh": "m", "command": ["python3", "-c", program], "args": args});
    spec.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    serde_json::json!({
        "apiVersion": "supermesh.io/v1alpha1", "kind": "Microservice", "metadata": {"name": name}, "spec": spec,
    })
    .to_string()
}

/// Waits for file `name` in the work directory of `key`'s instance on `agent`.
async fn work_file(site: &Site, agent: &Agent, key: &str, name: &str) -> String {
    let read = || std::fs::read_to_string(agent.instance_dir(key)?.join("work").join(name)).ok();
    site.controller.wait_until(&format!("{name} of {key}"), || read().is_some()).await;
    read().unwrap()
}

fn owner(path: &std::path::Path) -> (u32, u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (meta.uid(), meta.gid(), meta.mode() & 0o7777)
}

#[tokio::test]
async fn an_instance_reaches_nothing_of_another_microservice_or_of_the_agent() {
    let site = Site::new("isolation").await;
    let agent = site.agent(0);
    site.apply(&python("b", KEEPER, &[], serde_json::json!({})));
    let (key_a, key_b) = (site.key("a"), site.key("b"));
    assert_eq!(work_file(&site, &agent, &key_b, "stored").await, "yes");
    let b_dir = agent.instance_dir(&key_b).unwrap();
    let b_dir_name = b_dir.file_name().unwrap().to_str().unwrap().to_owned();
    let config = agent.config().display().to_string();
    site.apply(&python("a", PROBER, &[&b_dir_name, &config], serde_json::json!({})));
    let result: serde_json::Value =
        serde_json::from_str(&work_file(&site, &agent, &key_a, "result.json").await).unwrap();
    println!("what instance a got: {result:#}");

    for own in ["own token", "own work"] {
        assert_eq!(result[own], "ok", "{own}: {result:#}");
    }
    for theirs in ["b token", "b work", "b secret", "b log", "b record", "api.key", "meta.db", "identity", "edge.yaml"]
    {
        assert_eq!(result[theirs], "EACCES", "{theirs}: {result:#}");
    }
    assert_eq!(result["instances"], "EACCES", "instance users pass through, never list: {result:#}");
    assert_eq!(result["foreign environs read"], 0, "{result:#}");
    assert_eq!(result["token variables"], serde_json::json!(["SUPERMESH_TOKEN_FILE"]), "{result:#}");

    // Users of their own, stable per microservice, with nothing more.
    let uid_a: u32 = result["Uid"][0].as_str().unwrap().parse().unwrap();
    let (uid_b, gid_b, _) = owner(&b_dir.join("work"));
    assert!(uid_a >= 1_900_000_000 && uid_b >= 1_900_000_000 && uid_a != uid_b, "a {uid_a}, b {uid_b}");
    assert_eq!(result["Uid"], serde_json::json!(vec![uid_a.to_string(); 4]), "real, effective, saved and fs uid");
    assert_eq!(result["Gid"][0].as_str().unwrap(), uid_a.to_string());
    assert_eq!(result["Groups"], serde_json::json!([]), "no supplementary groups");
    for set in ["CapEff", "CapPrm", "CapAmb", "CapBnd"] {
        assert_eq!(result[set][0], "0000000000000000", "{set}: {result:#}");
    }
    assert_eq!(result["NoNewPrivs"][0], "1");
    assert_eq!(owner(&b_dir.join("work")), (uid_b, gid_b, 0o700));
    assert_eq!(owner(&b_dir.join("token")), (uid_b, gid_b, 0o400));
    assert_eq!(owner(&b_dir.join("logs")), (0, 0, 0o700));
    assert_eq!(owner(&b_dir), (0, 0, 0o711));
    assert_eq!(owner(&agent.data_dir.join("api.key")).2, 0o600);
    assert_eq!(owner(&agent.data_dir.join("meta.db")).2 & 0o077, 0, "meta.db is the agent's alone");

    // Storage: a's own is empty, b's stays b's, and a forged token is refused.
    assert_eq!(result["kv own"], serde_json::json!([200, {"keys": []}]), "{result:#}");
    assert_eq!(result["kv forged"][0], 401, "{result:#}");

    // The user is recorded: an agent restart keeps it and the instance (adopted, same pid).
    let pid_b = agent.instance_pid(&key_b).unwrap();
    let mut agent = agent;
    agent.restart();
    let api: Api<Microservice> = Api::namespaced(site.cluster.client.clone(), &site.ns);
    site.controller
        .wait_for(&api, "b", "b ready after the restart", |m| m.status.as_ref().is_some_and(|s| s.ready_instances == 1))
        .await;
    assert_eq!(agent.instance_pid(&key_b), Some(pid_b));
    assert_eq!(owner(&b_dir.join("work")).0, uid_b);
    site.cleanup(&[&agent]).await;
}

#[tokio::test]
async fn more_than_the_sandbox_runs_only_where_the_edge_node_allows_it() {
    let site = Site::new("seccontext").await;
    let agent = site.agent(0);
    let status_program = r#"
import os, time
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
open("status.tmp", "w").write(" ".join(status[f].split()[0] for f in ("Uid", "CapEff", "CapAmb", "NoNewPrivs")))
os.rename("status.tmp", "status")
time.sleep(3600)
"#;
    let wants = serde_json::json!({"securityContext": {"capabilities": ["NET_BIND_SERVICE"]}});
    site.apply(&python("binder", status_program, &[], wants));
    let api: Api<Microservice> = Api::namespaced(site.cluster.client.clone(), &site.ns);
    let blocked = site
        .controller
        .wait_for(&api, "binder", "Ready=False/SecurityNotAllowed", |m| {
            m.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.reason == "SecurityNotAllowed"))
        })
        .await;
    let conditions = blocked.status.unwrap().conditions;
    let message = &conditions.iter().find(|c| c.type_ == "Ready").unwrap().message;
    println!("without the node's permission: {message}");
    assert!(message.contains("allowedCapabilities with NET_BIND_SERVICE"), "{message}");
    assert!(agent.instance_dir(&site.key("binder")).is_none(), "nothing was sent to the node");

    site.node_security(&agent, serde_json::json!({"allowedCapabilities": ["NET_BIND_SERVICE"]})).await;
    let status = work_file(&site, &agent, &site.key("binder"), "status").await;
    let fields: Vec<&str> = status.split(' ').collect();
    println!("with allowedCapabilities [NET_BIND_SERVICE]: Uid CapEff CapAmb NoNewPrivs = {fields:?}");
    let cap_net_bind_service = format!("{:016x}", 1u64 << 10);
    assert_eq!(fields[1..], [cap_net_bind_service.as_str(), cap_net_bind_service.as_str(), "1"]);
    assert_ne!(fields[0], "0", "still its own user");

    // Taking the permission back stops the instance.
    site.node_security(&agent, serde_json::Value::Null).await;
    site.controller.wait_until("the instance to go", || agent.instance_dir(&site.key("binder")).is_none()).await;
    let held: BTreeMap<String, String> = agent.held();
    assert!(!held.contains_key(&site.key("binder")), "{held:?}");
    site.cleanup(&[&agent]).await;
}

#[tokio::test]
async fn an_agent_that_is_not_root_isolates_with_the_capabilities_of_its_unit() {
    let site = Site::new("nonroot").await;
    // A uid outside the instance range, as the packaged `supermesh` user would be.
    let agent_uid = 1_899_900_000 + std::process::id() % 1000;
    let agent = site.agent_as(0, Launch { user: Some(agent_uid), ..Launch::default() });
    let status_program = r#"
import os, time
open("uid.tmp", "w").write(str(os.getuid())); os.rename("uid.tmp", "uid")
time.sleep(3600)
"#;
    let check = serde_json::json!({"healthCheck": {"exec": {"command": ["test", "-O", "uid"]}, "periodSeconds": 1}});
    site.apply(&python("w", status_program, &[], check));
    let key = site.key("w");
    let uid: u32 = work_file(&site, &agent, &key, "uid").await.parse().unwrap();
    assert!(uid >= 1_900_000_000, "instance uid {uid}");
    let api: Api<Microservice> = Api::namespaced(site.cluster.client.clone(), &site.ns);
    site.controller
        .wait_for(&api, "w", "w ready: its exec check runs as its user", |m| {
            m.status.as_ref().is_some_and(|s| s.ready_instances == 1)
        })
        .await;
    let dir = agent.instance_dir(&key).unwrap();
    assert_eq!(owner(&dir.join("work")), (uid, uid, 0o700));
    assert_eq!(owner(&dir.join("token")), (uid, uid, 0o400));
    assert_eq!(owner(&agent.data_dir.join("meta.db")).0, agent_uid);
    let log = agent.log();
    assert!(log.contains("instances run isolated"), "{log}");
    let pid = agent.instance_pid(&key).unwrap();

    // Stopping it signals another user's processes and removes another user's files.
    kube::Api::<Microservice>::delete(&api, "w", &Default::default()).await.unwrap();
    site.controller.wait_until("the instance's files to go", || !dir.exists()).await;
    let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err();
    assert!(gone, "the instance's process {pid} is stopped");
    site.cleanup(&[&agent]).await;
}
