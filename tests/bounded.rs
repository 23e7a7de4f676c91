//! End-to-end tests of the bounds on device state: a real agent refuses artifacts
//! that would unpack setuid files or unpack to 10 GB, and says why in the
//! Microservice's status, with nothing run and nothing large written.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use kube::api::Api;
use supermesh_agent::edged::artifact::sha256_hex;
use supermesh_agent::edged::process::InstanceDir;
use supermesh_api::Microservice;
use supermesh_tests::{apply_yaml, free_port, try_kubectl, Site};

/// Writes the archives under test into `dir` with Python's tarfile, which writes
/// headers as told: `setuid.tar.gz` holds a setuid script, `huge.tar.gz` a file
/// whose header states 10 GB, followed by 1 MiB of it (the rest never comes).
const ARCHIVES: &str = r#"
import gzip, io, tarfile
data = b"touch ran\nsleep 3600\n"
def script(mode):
    info = tarfile.TarInfo("run.sh")
    info.size, info.mode = len(data), mode
    return info
with tarfile.open("setuid.tar.gz", "w:gz") as tar:
    tar.addfile(script(0o4755), io.BytesIO(data))
big = tarfile.TarInfo("big")
big.size = 10 * 10**9
with gzip.open("huge.tar.gz", "wb") as out:
    out.write(script(0o755).tobuf(tarfile.GNU_FORMAT) + data.ljust(512, b"\0"))
    out.write(big.tobuf(tarfile.GNU_FORMAT) + b"\0" * (1 << 20))
"#;

/// A static HTTP server for `dir` on a free loopback port, stopped on drop.
struct Served {
    dir: PathBuf,
    port: u16,
    server: Child,
}

impl Served {
    fn start(dir: PathBuf) -> Served {
        std::fs::create_dir_all(&dir).unwrap();
        let made = Command::new("python3").args(["-c", ARCHIVES]).current_dir(&dir).status();
        assert!(made.unwrap().success(), "python3 wrote the archives");
        let port = free_port();
        let server = Command::new("python3")
            .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1"])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Served { dir, port, server }
    }

    /// The artifact field of a spec for archive `name`.
    fn artifact(&self, name: &str) -> serde_json::Value {
        let sha256 = sha256_hex(std::fs::File::open(self.dir.join(name)).unwrap()).unwrap();
        serde_json::json!({"url": format!("http://127.0.0.1:{}/{name}", self.port), "sha256": sha256})
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Bytes of all files under `dir`.
fn bytes_under(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter_map(Result::ok)
            .map(|e| match std::fs::symlink_metadata(e.path()) {
                Ok(meta) if meta.is_dir() => bytes_under(&e.path()),
                Ok(meta) => meta.len(),
                Err(_) => 0,
            })
            .sum()
    })
}

#[tokio::test]
async fn an_artifact_with_a_setuid_file_or_ten_gigabytes_unpacked_is_refused() {
    let site = Site::new("bounded").await;
    let agent = site.agent(0);
    let served = Served::start(std::env::temp_dir().join(format!("bounded-{}", site.id)));
    site.wait_agents(1.0).await;
    // The archives are served over plain http, which the node must accept.
    let insecure = r#"{"spec":{"security":{"allowInsecureArtifacts":true}}}"#;
    site.controller
        .wait_until("the EdgeNode accepts http artifacts", || {
            try_kubectl(&["patch", "edgenode", &agent.name, "--type", "merge", "-p", insecure]).is_ok()
        })
        .await;

    let refusals = [("setuid", "setuid.tar.gz", "setuid"), ("huge", "huge.tar.gz", "too large")];
    for (name, archive, _) in refusals {
        let object = serde_json::json!({
            "apiVersion": "supermesh.io/v1alpha1", "kind": "Microservice", "metadata": {"name": name},
            "spec": {"mesh": "m", "command": ["sh", "run.sh"], "artifact": served.artifact(archive)},
        });
        apply_yaml(&object.to_string(), &["-n", &site.ns]).unwrap_or_else(|e| panic!("apply {name}: {e}"));
    }
    let api: Api<Microservice> = Api::namespaced(site.cluster.client.clone(), &site.ns);
    for (name, _, why) in refusals {
        let m = site
            .controller
            .wait_for(&api, name, "Degraded=InstanceFailed", |m| {
                m.status
                    .as_ref()
                    .is_some_and(|s| s.conditions.iter().any(|c| c.type_ == "Degraded" && c.reason == "InstanceFailed"))
            })
            .await;
        let status = m.status.unwrap();
        let message = status.unhealthy_instances[0].message.clone().unwrap_or_default();
        assert!(message.contains(why), "{name}: {message}");
        let work = InstanceDir::new(&agent.data_dir, &site.key(name)).work();
        assert!(!work.join("ran").exists(), "{name}: nothing ran");
        let written = bytes_under(&work);
        assert!(written < 4096, "{name}: {written} bytes unpacked");
    }
    drop(served);
    site.cleanup(&[&agent]).await;
}
