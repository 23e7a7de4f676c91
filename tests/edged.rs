//! End-to-end tests of running microservices: real agents run real processes,
//! report through MetaSync, and the controller aggregates their status.

use std::path::Path;

use kube::api::Api;
use supermesh_api::Microservice;
use supermesh_tests::{all_ready, apply_yaml, kubectl, Agent, Site};

/// A small HTTP service: binds a free port, writes it to `port` in its working
/// directory (several agents share this host) and answers with its node name.
const SERVER: &str = r#"
import http.server, os
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello from " + os.environ["SUPERMESH_NODE"]).encode()
        self.send_response(200); self.end_headers(); self.wfile.write(body)
    def log_message(self, *args): pass
server = http.server.HTTPServer(("127.0.0.1", 0), Hello)
open("port.tmp", "w").write(str(server.server_address[1])); os.rename("port.tmp", "port")
server.serve_forever()
"#;

/// Health check of `SERVER`: a TCP connect to the port it wrote (cheap, so a busy
/// machine does not time it out; the tests themselves GET the service).
const PROBE: &str = "exec 3<>/dev/tcp/127.0.0.1/$(cat port)";

/// Applies Microservice `name` in mesh `m` with `spec` fields merged in.
fn apply(site: &Site, name: &str, spec: serde_json::Value) {
    let mut full = serde_json::json!({"mesh": "m"});
    full.as_object_mut().unwrap().extend(spec.as_object().unwrap().clone());
    let object = serde_json::json!({
        "apiVersion": "supermesh.io/v1alpha1", "kind": "Microservice", "metadata": {"name": name}, "spec": full,
    });
    apply_yaml(&object.to_string(), &["-n", &site.ns]).unwrap_or_else(|e| panic!("apply {name}: {e}"));
}

fn web() -> serde_json::Value {
    serde_json::json!({
        "command": ["python3", "-c", SERVER],
        "healthCheck": {"exec": {"command": ["bash", "-c", PROBE]}, "periodSeconds": 1, "failureThreshold": 3},
    })
}

/// Waits until the Microservice satisfies `check`.
async fn wait_msvc(site: &Site, name: &str, what: &str, check: impl Fn(&Microservice) -> bool) -> Microservice {
    let api: Api<Microservice> = Api::namespaced(site.cluster.client.clone(), &site.ns);
    site.controller.wait_for(&api, name, what, check).await
}

/// GETs `/` from the service whose port is in `port_file`.
fn get(port_file: &Path) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let port = std::fs::read_to_string(port_file)?;
    let port: u16 = port.trim().parse().map_err(|_| std::io::Error::other("no port yet"))?;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(stream, "GET / HTTP/1.0\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// Polls `check` until it holds, failing with `agent`'s log after the deadline.
async fn until(agent: &Agent, what: &str, check: impl FnMut() -> bool) {
    agent.wait_until(what, check).await;
}

#[tokio::test]
async fn a_microservice_runs_and_answers_on_every_node() {
    let site = Site::new("run").await;
    let agents: Vec<Agent> = (0..3).map(|i| site.agent(i)).collect();
    apply(&site, "web", web());
    let m = wait_msvc(&site, "web", "Ready 3/3", |m| all_ready(m, 3)).await;
    let status = m.status.unwrap();
    assert_eq!(status.available_instances, 3);
    assert!(status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let key = site.key("web");
    for agent in &agents {
        let dir = agent.instance_dir(&key).expect("an instance directory");
        let answer = get(&dir.join("work/port")).expect("the service answers");
        assert!(answer.contains(&format!("hello from {}", agent.name)), "{answer}");
    }
    site.controller
        .wait_until("a Started event per node", || {
            let described = kubectl(&["describe", "msvc", "web", "-n", &site.ns]);
            agents.iter().all(|a| described.contains(&format!("{}: started with pid", a.name)))
        })
        .await;
    let table = kubectl(&["get", "msvc", "web", "-n", &site.ns]);
    assert!(
        table.lines().nth(1).is_some_and(|l| l.split_whitespace().take(5).eq(["web", "m", "3", "3", "3"])),
        "{table}"
    );
    site.cleanup(&agents.iter().collect::<Vec<_>>()).await;
}

#[tokio::test]
async fn changing_the_node_selector_moves_instances() {
    let site = Site::new("move").await;
    let agents: Vec<Agent> = (0..2).map(|i| site.agent(i)).collect();
    site.wait_agents(2.0).await;
    kubectl(&["label", "edgenode", &agents[0].name, "zone=a"]);
    kubectl(&["label", "edgenode", &agents[1].name, "zone=b"]);
    let mut spec = web();
    spec["nodeSelector"] = serde_json::json!({"zone": "a"});
    apply(&site, "web", spec.clone());
    wait_msvc(&site, "web", "Ready 1/1 on zone a", |m| all_ready(m, 1)).await;
    let key = site.key("web");
    let first = agents[0].instance_pid(&key).expect("runs on zone a");
    spec["nodeSelector"] = serde_json::json!({"zone": "b"});
    apply(&site, "web", spec);
    until(&agents[1], "the instance to start on zone b", || agents[1].instance_pid(&key).is_some_and(alive)).await;
    until(&agents[0], "the zone a instance to stop", || !alive(first)).await;
    wait_msvc(&site, "web", "Ready 1/1 on zone b", |m| all_ready(m, 1) && m.metadata.generation == Some(2)).await;
    site.cleanup(&agents.iter().collect::<Vec<_>>()).await;
}

#[tokio::test]
async fn a_crash_loop_is_degraded_with_its_reason_and_restart_count() {
    let site = Site::new("crash").await;
    let agent = site.agent(0);
    apply(&site, "crasher", serde_json::json!({"command": ["sh", "-c", "echo starting; exit 3"]}));
    let m = wait_msvc(&site, "crasher", "Degraded=CrashLoop after 2 restarts", |m| {
        m.status.as_ref().is_some_and(|s| {
            s.conditions.iter().any(|c| c.type_ == "Degraded" && c.reason == "CrashLoop")
                && s.unhealthy_instances.first().is_some_and(|u| u.restarts >= 2)
        })
    })
    .await;
    let status = m.status.unwrap();
    let instance = &status.unhealthy_instances[0];
    assert_eq!(instance.node, agent.name);
    assert!(instance.message.as_deref().unwrap_or_default().contains("code 3"), "{instance:?}");
    assert_eq!(status.ready_instances, 0);
    let events = kubectl(&["get", "events", "-n", &site.ns, "-o", "jsonpath={.items[*].reason}"]);
    assert!(events.contains("CrashLoop"), "a CrashLoop event: {events}");
    // edged's own events reach `kubectl describe msvc`.
    site.controller
        .wait_until("Exited and Restarted events from edged", || {
            let described = kubectl(&["describe", "msvc", "crasher", "-n", &site.ns]);
            ["Exited", "Restarted", "exited with code 3"].iter().all(|word| described.contains(word))
        })
        .await;
    site.cleanup(&[&agent]).await;
}

#[tokio::test]
async fn a_failing_health_check_restarts_the_instance() {
    let site = Site::new("health").await;
    let agent = site.agent(0);
    let spec = serde_json::json!({
        "command": ["sleep", "3600"],
        "healthCheck": {"exec": {"command": ["false"]}, "periodSeconds": 1, "failureThreshold": 2},
    });
    apply(&site, "sick", spec);
    let key = site.key("sick");
    until(&agent, "the instance to start", || agent.instance_pid(&key).is_some()).await;
    let first = agent.instance_pid(&key).unwrap();
    until(&agent, "a restart with a new process", || agent.instance_pid(&key).is_some_and(|p| p != first)).await;
    assert!(!alive(first), "the unhealthy process was stopped");
    wait_msvc(&site, "sick", "a reported restart", |m| {
        m.status.as_ref().is_some_and(|s| s.unhealthy_instances.iter().any(|u| u.restarts >= 1))
    })
    .await;
    site.cleanup(&[&agent]).await;
}

#[tokio::test]
async fn reconnects_and_agent_restarts_never_restart_instances() {
    let mut site = Site::new("keep").await;
    let mut agent = site.agent(0);
    apply(&site, "web", web());
    wait_msvc(&site, "web", "Ready 1/1", |m| all_ready(m, 1)).await;
    let key = site.key("web");
    let pid = agent.instance_pid(&key).unwrap();

    site.controller.restart();
    site.wait_agents(1.0).await;
    agent.stop();
    agent.restart();
    site.wait_agents(1.0).await;
    until(&agent, "the agent to adopt its instance", || agent.log().matches("adopted").count() >= 1).await;
    wait_msvc(&site, "web", "Ready 1/1 after the restarts", |m| all_ready(m, 1)).await;
    assert_eq!(agent.instance_pid(&key), Some(pid), "same process");
    assert!(alive(pid));
    let m: Microservice = Api::namespaced(site.cluster.client.clone(), &site.ns).get("web").await.unwrap();
    assert!(m.status.unwrap().unhealthy_instances.is_empty(), "no restart reported");
    site.cleanup(&[&agent]).await;
}

#[tokio::test]
async fn an_agent_restarted_offline_brings_instances_back_and_status_catches_up() {
    let mut site = Site::new("offline-run").await;
    let mut agent = site.agent(0);
    apply(&site, "web", web());
    wait_msvc(&site, "web", "Ready 1/1", |m| all_ready(m, 1)).await;
    let key = site.key("web");
    let before = agent.instance_pid(&key).unwrap();

    // The cloud goes away; the device reboots: agent and instance die.
    site.controller.pause();
    agent.kill9();
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-before), nix::sys::signal::Signal::SIGKILL);
    until(&agent, "the instance to die", || !alive(before)).await;
    agent.restart();
    until(&agent, "the instance to come back without the cloud", || {
        agent.instance_pid(&key).is_some_and(|p| p != before && alive(p))
    })
    .await;
    let dir = agent.instance_dir(&key).unwrap();
    until(&agent, "the restarted service to answer", || {
        get(&dir.join("work/port")).is_ok_and(|answer| answer.contains("hello from"))
    })
    .await;

    site.controller.resume();
    site.wait_agents(1.0).await;
    wait_msvc(&site, "web", "Ready 1/1 once the cloud is back", |m| all_ready(m, 1)).await;
    site.cleanup(&[&agent]).await;
}

#[tokio::test]
async fn a_wrong_artifact_hash_fails_and_runs_nothing() {
    let site = Site::new("artifact").await;
    let agent = site.agent(0);
    // The archive comes over plain http, which only a node that allows it takes.
    site.node_security(&agent, serde_json::json!({"allowInsecureArtifacts": true})).await;
    let served = std::env::temp_dir().join(format!("artifact-{}", site.id));
    std::fs::create_dir_all(served.join("bundle")).unwrap();
    std::fs::write(served.join("bundle/run.sh"), "touch ran\nsleep 3600\n").unwrap();
    let tar = std::process::Command::new("tar")
        .args(["czf", "bundle.tar.gz", "-C", "bundle", "."])
        .current_dir(&served)
        .status();
    assert!(tar.unwrap().success());
    let port = supermesh_tests::free_port();
    let mut server = std::process::Command::new("python3")
        .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1"])
        .current_dir(&served)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let spec = serde_json::json!({
        "command": ["sh", "run.sh"],
        "artifact": {"url": format!("http://127.0.0.1:{port}/bundle.tar.gz"), "sha256": "0".repeat(64)},
    });
    apply(&site, "bundled", spec);
    let m = wait_msvc(&site, "bundled", "Degraded=InstanceFailed", |m| {
        m.status
            .as_ref()
            .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Degraded" && c.reason == "InstanceFailed"))
    })
    .await;
    let instance = &m.status.unwrap().unhealthy_instances[0];
    assert!(instance.message.as_deref().unwrap_or_default().contains("hash mismatch"), "{instance:?}");
    site.controller
        .wait_until("an ArtifactHashMismatch event", || {
            kubectl(&["get", "events", "-n", &site.ns, "-o", "jsonpath={.items[*].reason}"])
                .contains("ArtifactHashMismatch")
        })
        .await;
    let key = site.key("bundled");
    let ran = agent.instance_dir(&key).is_some_and(|d| d.join("work/ran").exists());
    assert!(!ran, "nothing ran");
    let _ = server.kill();
    let _ = server.wait();
    site.cleanup(&[&agent]).await;
}

#[tokio::test]
async fn metasync_goes_out_every_interval() {
    let site = Site::new("metasync").await;
    let agent = site.agent_with(0, "meta:\n  sync:\n    podstatus:\n      interval: 2\n");
    apply(&site, "idle", serde_json::json!({"command": ["sleep", "3600"]}));
    wait_msvc(&site, "idle", "Ready 1/1", |m| all_ready(m, 1)).await;
    let reports = || site.controller.metric("supermesh_controller_cloudhub_status_reports_total", "").unwrap_or(0.0);
    let start = reports();
    let began = std::time::Instant::now();
    // Nothing changes any more: further reports are the periodic ones.
    site.controller.wait_until("3 more periodic reports", || reports() >= start + 3.0).await;
    let seconds = began.elapsed().as_secs_f64();
    println!("3 periodic MetaSync reports in {seconds:.1} s (interval 2 s)");
    site.cleanup(&[&agent]).await;
}

#[tokio::test]
async fn logs_are_read_from_the_node_through_the_controller() {
    let site = Site::new("logs").await;
    let agent = site.agent(0);
    let chatty = "echo first-line; echo second-line; i=0; while true; do i=$((i+1)); echo tick-$i; sleep 0.2; done";
    apply(&site, "chatty", serde_json::json!({"command": ["sh", "-c", chatty]}));
    wait_msvc(&site, "chatty", "Ready 1/1", |m| all_ready(m, 1)).await;
    let controller = format!("http://{}", site.controller.metrics_addr);
    let target = format!("{}/chatty", site.ns);
    let ctl = |args: &[&str]| {
        std::process::Command::new(supermesh_tests::binary("supermeshctl"))
            .args(["--controller", &controller, "logs", &target])
            .args(args)
            .output()
            .expect("run supermeshctl")
    };
    until(&agent, "the log to hold a tick", || String::from_utf8_lossy(&ctl(&[]).stdout).contains("tick-1")).await;
    let all = String::from_utf8_lossy(&ctl(&[]).stdout).into_owned();
    assert!(all.starts_with("first-line\nsecond-line\n"), "{all}");
    let last = String::from_utf8_lossy(&ctl(&["--tail", "1"]).stdout).into_owned();
    assert_eq!(last.lines().count(), 1, "{last}");
    assert!(last.starts_with("tick-"), "{last}");

    // --follow keeps printing what the instance writes.
    let out = std::env::temp_dir().join(format!("follow-{}", site.id));
    let file = std::fs::File::create(&out).unwrap();
    let mut follow = std::process::Command::new(supermesh_tests::binary("supermeshctl"))
        .args(["--controller", &controller, "logs", &target, "--tail", "1", "--follow"])
        .stdout(file)
        .spawn()
        .unwrap();
    let ticks = || std::fs::read_to_string(&out).unwrap_or_default().lines().filter(|l| l.starts_with("tick-")).count();
    until(&agent, "--follow to print new lines", || ticks() >= 4).await;
    let _ = follow.kill();
    let _ = follow.wait();

    let missing = std::process::Command::new(supermesh_tests::binary("supermeshctl"))
        .args(["--controller", &controller, "logs", &format!("{}/nothing", site.ns)])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("runs on no node"));
    site.cleanup(&[&agent]).await;
}
