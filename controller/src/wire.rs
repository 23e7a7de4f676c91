//! The edge of the controller: custom resources mapped into wire types. Only the
//! fields an agent needs cross, and a CRD change reaches agents only when it is
//! also made here and in the protocol crate.

use kube::ResourceExt;
use supermesh_api::microservice::{self as crd, MicroserviceSpec};
use supermesh_api::Microservice;
use supermesh_protocol as wire;

/// What agents are sent about revision `revision` of `msvc`, which runs `template`'s
/// workload: identity, revision (as the generation, so that the version changes with
/// the revision only) and workload.
pub fn assignment(
    msvc: &Microservice,
    revision: i64,
    template: &MicroserviceSpec,
    config: Option<&str>,
) -> wire::Assignment {
    wire::Assignment {
        namespace: msvc.namespace().unwrap_or_default(),
        name: msvc.name_any(),
        uid: msvc.uid().unwrap_or_default(),
        generation: revision,
        spec: workload(template),
        min_ready_seconds: msvc.spec.rollout.as_ref().map_or(0, |r| r.min_ready_seconds.max(0).unsigned_abs()),
        config: config.map(str::to_owned),
    }
}

/// How agents run `spec`'s instances: the run-related part of the spec.
pub fn workload(spec: &MicroserviceSpec) -> wire::Workload {
    wire::Workload {
        mesh: spec.mesh.clone(),
        command: spec.command.clone(),
        args: spec.args.clone(),
        env: spec
            .env
            .iter()
            .map(|e| wire::EnvVar {
                name: e.name.clone(),
                value: e.value.clone(),
                value_from: e.value_from.as_ref().map(value_from),
            })
            .collect(),
        files: spec
            .files
            .iter()
            .map(|f| wire::ConfigFile { path: f.path.clone(), from: value_from(&f.from) })
            .collect(),
        artifact: spec.artifact.as_ref().map(|a| wire::Artifact { url: a.url.clone(), sha256: a.sha256.clone() }),
        ports: spec.ports.iter().map(port).collect(),
        health_check: spec.health_check.as_ref().map(health_check),
        restart_policy: match spec.restart_policy {
            crd::RestartPolicy::Always => wire::RestartPolicy::Always,
            crd::RestartPolicy::OnFailure => wire::RestartPolicy::OnFailure,
            crd::RestartPolicy::Never => wire::RestartPolicy::Never,
        },
        security_context: spec.security_context.as_ref().map(|sc| wire::SecurityContext {
            run_as_user: sc.run_as_user,
            run_as_group: sc.run_as_group,
            capabilities: sc.capabilities.clone(),
        }),
    }
}

fn value_from(v: &crd::ValueFrom) -> wire::ValueFrom {
    let key = |r: &crd::KeyRef| wire::KeyRef { name: r.name.clone(), key: r.key.clone() };
    wire::ValueFrom {
        config_map_key_ref: v.config_map_key_ref.as_ref().map(key),
        secret_key_ref: v.secret_key_ref.as_ref().map(key),
    }
}

fn port(p: &crd::Port) -> wire::Port {
    let protocol = match p.protocol {
        crd::Protocol::TCP => wire::Protocol::TCP,
        crd::Protocol::UDP => wire::Protocol::UDP,
    };
    wire::Port { name: p.name.clone(), port: p.port, protocol }
}

fn health_check(h: &crd::HealthCheck) -> wire::HealthCheck {
    wire::HealthCheck {
        http: h.http.as_ref().map(|c| wire::HttpCheck { path: c.path.clone(), port: c.port }),
        tcp: h.tcp.as_ref().map(|c| wire::TcpCheck { port: c.port }),
        exec: h.exec.as_ref().map(|c| wire::ExecCheck { command: c.command.clone() }),
        period_seconds: h.period_seconds,
        failure_threshold: h.failure_threshold,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_workload_is_the_spec_without_its_placement_fields() {
        let spec = json!({
            "mesh": "home", "command": ["srv", "--port"], "args": ["8080"],
            "env": [{"name": "A", "value": "1"}],
            "artifact": {"url": "https://x/a.tgz", "sha256": "a".repeat(64)},
            "ports": [{"name": "http", "port": 8080, "protocol": "UDP"}],
            "healthCheck": {"exec": {"command": ["true"]}, "periodSeconds": 3, "failureThreshold": 2},
            "restartPolicy": "OnFailure",
            "replicas": 2, "nodeSelector": {"gpu": "yes"}
        });
        let crd: MicroserviceSpec = serde_json::from_value(spec.clone()).unwrap();
        let mut expected = spec;
        for placement_only in ["replicas", "nodeSelector"] {
            expected.as_object_mut().unwrap().remove(placement_only);
        }
        assert_eq!(serde_json::to_value(workload(&crd)).unwrap(), expected, "agents of 1.0 read the same JSON");
    }

    #[test]
    fn defaults_cross_as_the_crd_fills_them() {
        let crd: MicroserviceSpec =
            serde_json::from_value(json!({"mesh": "m", "command": ["x"], "healthCheck": {"http": {"port": 80}}}))
                .unwrap();
        let w = workload(&crd);
        let check = w.health_check.unwrap();
        assert_eq!((check.period_seconds, check.failure_threshold, check.http.unwrap().path.as_str()), (10, 3, "/"));
        assert_eq!(w.restart_policy, wire::RestartPolicy::Always);
    }
}
