//! End-to-end harness: a real API server (from `KUBECONFIG`), the real
//! `supermesh-controller` binary as a child process, and waits with deadlines.

use std::fmt::Debug;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kube::api::{Api, DeleteParams};
use kube::runtime::wait::await_condition;
use kube::{Client, Resource};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::de::DeserializeOwned;
use tokio_tungstenite::tungstenite::Message as Frame;

pub mod lan;
pub mod sim;

/// Whether `m` has `n` instances placed, all ready.
pub fn all_ready(m: &supermesh_api::Microservice, n: i32) -> bool {
    m.status.as_ref().is_some_and(|s| s.desired_instances == n && s.ready_instances == n)
}

/// Namespace the controllers under test keep their Secrets in.
pub const CONTROLLER_NAMESPACE: &str = "supermesh";

/// How long any awaited condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(45);

/// Root of the workspace.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is in the workspace").to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace().join("target"))
}

/// Path of a workspace binary: from `SUPERMESH_BIN_DIR` (for example a release
/// build, as benchmarks use), else the debug build.
pub fn binary(name: &str) -> PathBuf {
    let dir = std::env::var_os("SUPERMESH_BIN_DIR").map(PathBuf::from).unwrap_or_else(|| target_dir().join("debug"));
    dir.join(name)
}

/// The cluster under test, with the supermesh CRDs applied.
pub struct Cluster {
    /// Client for the API server named by `KUBECONFIG`.
    pub client: Client,
}

impl Cluster {
    /// Connects to the cluster given by `KUBECONFIG` and applies `crds/`.
    pub async fn connect() -> Cluster {
        assert!(
            std::env::var_os("KUBECONFIG").is_some(),
            "end-to-end tests need a cluster: run `cargo xtask test`, or set KUBECONFIG \
             (for example from `cargo xtask controlplane up`)"
        );
        kubectl(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            &workspace().join("crds").display().to_string(),
        ]);
        kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/meshes.supermesh.io",
            "crd/edgenodes.supermesh.io",
            "crd/microservices.supermesh.io",
        ]);
        // The controller keeps its CA and bootstrap token in its namespace.
        let _ =
            apply_yaml(&format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {CONTROLLER_NAMESPACE}\n"), &[]);
        let client = Client::try_default().await.expect("a client for KUBECONFIG");
        Cluster { client }
    }

    /// Creates a namespace unique to this test run.
    pub fn namespace(&self, prefix: &str) -> String {
        let ns = format!("{prefix}-{}", unique());
        kubectl(&["create", "namespace", &ns]);
        ns
    }
}

/// A short random suffix for names.
pub fn unique() -> String {
    let mut buf = [0u8; 4];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom").expect("urandom"), &mut buf).expect("random");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs kubectl and returns its standard output; panics with its error output on failure.
pub fn kubectl(args: &[&str]) -> String {
    let out = try_kubectl(args);
    match out {
        Ok(stdout) => stdout,
        Err(stderr) => panic!("kubectl {} failed: {stderr}", args.join(" ")),
    }
}

/// Runs kubectl; `Err` holds its error output.
pub fn try_kubectl(args: &[&str]) -> Result<String, String> {
    let out = Command::new("kubectl").args(args).stdin(Stdio::null()).output().expect("kubectl is installed");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Pipes `yaml` into `kubectl apply -f -` (with extra args such as `-n ns`).
pub fn apply_yaml(yaml: &str, extra: &[&str]) -> Result<String, String> {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .args(["apply", "-f", "-"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl is installed");
    child.stdin.take().expect("stdin").write_all(yaml.as_bytes()).expect("write to kubectl");
    let out = child.wait_with_output().expect("kubectl runs");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// YAML of a Microservice `name` in `mesh` running a long sleep, with `extra_spec` lines appended to its spec.
pub fn microservice(name: &str, mesh: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: supermesh.io/v1alpha1\nkind: Microservice\nmetadata:\n  name: {name}\nspec:\n  mesh: {mesh}\n  command: [\"/bin/sleep\", \"3600\"]\n{extra_spec}"
    )
}

/// A running `supermesh-controller`, stopped (SIGTERM) when dropped.
pub struct Controller {
    child: Child,
    name: String,
    user: Option<String>,
    extra: Vec<String>,
    /// Address of its metrics and health endpoints.
    pub metrics_addr: String,
    /// Address agents connect to.
    pub cloudhub_addr: String,
    log: PathBuf,
}

impl Controller {
    /// Starts the controller binary built by `cargo build --bins`; its log goes to target/e2e/<name>.log.
    pub fn start(name: &str) -> Controller {
        Controller::launch(name, None, &[])
    }

    /// Starts the controller acting as `user` (Kubernetes impersonation), so that
    /// it has only the permissions RBAC grants that user.
    pub fn start_as(name: &str, user: &str) -> Controller {
        Controller::launch(name, Some(user), &[])
    }

    /// Starts the controller, optionally as `user`, with extra command-line arguments.
    pub fn launch(name: &str, user: Option<&str>, extra: &[&str]) -> Controller {
        Controller::launch_at(name, user, &format!("127.0.0.1:{}", free_port()), extra)
    }

    /// Starts the controller with its cloudhub on `cloudhub_addr` (for example `0.0.0.0:<port>`).
    pub fn launch_at(name: &str, user: Option<&str>, cloudhub_addr: &str, extra: &[&str]) -> Controller {
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        let cloudhub_addr = cloudhub_addr.to_owned();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let (child, log) = spawn_controller(name, user, &extra, &metrics_addr, &cloudhub_addr);
        Controller { child, name: name.into(), user: user.map(str::to_owned), extra, metrics_addr, cloudhub_addr, log }
    }

    /// Stops the controller and starts a new process with the same addresses and arguments.
    pub fn restart(&mut self) {
        self.terminate();
        self.resume();
    }

    /// Stops the controller process, keeping what `resume` needs to start it again.
    pub fn pause(&mut self) {
        self.terminate();
    }

    /// Starts the controller again after `pause`, with the same addresses and arguments.
    pub fn resume(&mut self) {
        let (child, log) =
            spawn_controller(&self.name, self.user.as_deref(), &self.extra, &self.metrics_addr, &self.cloudhub_addr);
        self.child = child;
        self.log = log;
    }
}

/// Starts one controller process; returns it and its log file.
fn spawn_controller(
    name: &str,
    user: Option<&str>,
    extra: &[String],
    metrics_addr: &str,
    cloudhub_addr: &str,
) -> (Child, PathBuf) {
    let binary = binary("supermesh-controller");
    assert!(binary.exists(), "{} is missing: run `cargo build --bins` (cargo xtask test does)", binary.display());
    let dir = target_dir().join("e2e");
    std::fs::create_dir_all(&dir).expect("create target/e2e");
    let log = dir.join(format!("{name}-{}.log", unique()));
    let file = std::fs::File::create(&log).expect("create controller log");
    let mut cmd = Command::new(binary);
    if let Some(user) = user {
        cmd.env("KUBECONFIG", impersonating_kubeconfig(&dir, user));
    }
    let child = cmd
        .args(["--metrics-addr", metrics_addr, "--cloudhub-addr", cloudhub_addr])
        .args(["--namespace", CONTROLLER_NAMESPACE, "--log-level", "info,supermesh_controller=debug"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log handle"))
        .stderr(file)
        .spawn()
        .expect("start supermesh-controller");
    (child, log)
}

impl Controller {
    /// Stops the controller and waits until it exited.
    pub fn stop(mut self) {
        self.terminate();
    }

    fn terminate(&mut self) {
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the controller with SIGKILL, as a lost Pod or machine would go.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The controller's whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of the controller's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// GETs `path` from the controller's HTTP endpoint; `None` until it answers.
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        http(&self.metrics_addr, "GET", path, &[], b"")
    }

    /// GET `path` from its HTTP endpoint presenting Kubernetes bearer `token`.
    pub fn http_get_as(&self, path: &str, token: &str) -> Option<(u16, String)> {
        let bearer = format!("Bearer {token}");
        http(&self.metrics_addr, "GET", path, &[("authorization", bearer.as_str())], b"")
    }

    /// Waits at most `limit` for the controller to exit on its own; its status, or `None`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    /// Waits until `/readyz` answers 200, for at most `limit`; `Err` says so with the log's tail.
    pub async fn wait_ready_within(&self, limit: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + limit;
        while self.http_get("/readyz").is_none_or(|(code, _)| code != 200) {
            if tokio::time::Instant::now() > deadline {
                return Err(format!("not ready within {} s; controller log:\n{}", limit.as_secs(), self.log_tail()));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        self.wait_until("/readyz to answer 200", || self.http_get("/readyz").is_some_and(|(code, _)| code == 200))
            .await;
    }

    /// Value of metric `name` with label set `labels` (for example `kind="Mesh"`, or empty) in /metrics.
    pub fn metric(&self, name: &str, labels: &str) -> Option<f64> {
        let (_, body) = self.http_get("/metrics")?;
        let prefix = if labels.is_empty() { format!("{name} ") } else { format!("{name}{{{labels}}} ") };
        body.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok())
    }

    /// Polls `check` until it holds, failing the test with the controller log after `DEADLINE`.
    pub async fn wait_until(&self, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !check() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; controller log:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until object `name` satisfies `check`, failing with the last seen object and the log.
    pub async fn wait_for<K>(&self, api: &Api<K>, name: &str, what: &str, check: impl Fn(&K) -> bool) -> K
    where
        K: Resource + Clone + Debug + DeserializeOwned + Send + 'static,
    {
        let cond = move |obj: Option<&K>| obj.is_some_and(&check);
        match tokio::time::timeout(DEADLINE, await_condition(api.clone(), name, cond)).await {
            Ok(Ok(Some(obj))) => obj,
            other => {
                let last = api.get_opt(name).await.ok().flatten();
                panic!(
                    "timed out waiting for {name}: {what} ({other:?})\nlast seen: {last:#?}\ncontroller log:\n{}",
                    self.log_tail()
                )
            }
        }
    }

    /// Waits until object `name` no longer exists.
    pub async fn wait_gone<K>(&self, api: &Api<K>, name: &str)
    where
        K: Resource + Clone + Debug + DeserializeOwned + Send + 'static,
    {
        let cond = |obj: Option<&K>| obj.is_none();
        let waited = tokio::time::timeout(DEADLINE, await_condition(api.clone(), name, cond)).await;
        assert!(matches!(waited, Ok(Ok(_))), "{name} was not deleted in time; controller log:\n{}", self.log_tail());
    }
}

/// A free TCP port on the loopback interface.
/// One HTTP/1.1 request to `addr`; `None` if it gets no answer within 5 s.
pub fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = addr.parse().ok()?;
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (name, value) in headers {
        request += &format!("{name}: {value}\r\n");
    }
    request += "\r\n";
    stream.write_all(request.as_bytes()).ok()?;
    stream.write_all(body).ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let response = String::from_utf8_lossy(&response);
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((code, body))
}

/// The cluster registry of the agent whose peer service is at `addr`, asked as `node`
/// of its cluster with the (first) cluster key derived from `root` ([`cluster_key_root`]).
pub fn peer_registry(addr: &str, node: &str, network: &str, root: &str) -> Option<supermesh_protocol::peer::Registry> {
    peer_registry_with(addr, node, &supermesh_protocol::peer::cluster_key(root, network, 0))
}

/// The cluster registry of the agent whose peer service is at `addr`, asked as `node` with
/// cluster key `key`: over mutual TLS with `node`'s own certificate (from its data dir, see
/// [`identity_dir`]), the answer's signature checked against the key the server's certificate carries.
pub fn peer_registry_with(addr: &str, node: &str, key: &str) -> Option<supermesh_protocol::peer::Registry> {
    use supermesh_protocol::peer;
    let body = b"{}";
    let signature = peer::sign(key, body);
    let head = peer_head(peer::REGISTRY_PATH, addr, body.len(), Some(&signature));
    let answer = peer_http(addr, Some(&identity_dir(node)), &head, body).ok()?;
    if answer.status != 200 {
        return None;
    }
    let signed: peer::SignedRegistry = serde_json::from_str(&answer.body).ok()?;
    let server = supermesh_agent::supernode::tls::read_cert(answer.server_certificate.as_deref()?).ok()?;
    signed.open(&server.key).ok()
}

/// Where `Agent::launch` keeps agent `node`'s key and certificate (its `dataDir/identity`).
pub fn identity_dir(node: &str) -> PathBuf {
    target_dir().join("e2e/agents").join(node).join("data/identity")
}

/// The head of a POST of `length` bytes to `path` of the peer service at `addr`, with the
/// cluster key HMAC `signature` if given.
pub fn peer_head(path: &str, addr: &str, length: usize, signature: Option<&str>) -> String {
    let mut head = format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {length}\r\n");
    if let Some(signature) = signature {
        head += &format!("{}: {signature}\r\n", supermesh_protocol::peer::SIGNATURE_HEADER);
    }
    head + "\r\n"
}

/// What the peer service answered over TLS.
#[derive(Debug)]
pub struct PeerAnswer {
    /// HTTP status.
    pub status: u16,
    /// Body.
    pub body: String,
    /// The certificate the server presented (DER).
    pub server_certificate: Option<Vec<u8>>,
}

/// One HTTP/1.1 request (`head`, then `body`) to the peer service at `addr` over TLS,
/// presenting the node certificate and key kept in `identity` (none: no certificate), taking
/// any server certificate (and returning it). `Err` says where it failed.
pub fn peer_http(addr: &str, identity: Option<&Path>, head: &str, body: &[u8]) -> Result<PeerAnswer, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let credentials = match identity {
        Some(dir) => {
            let chain =
                vec![CertificateDer::from_pem_file(dir.join("node.crt")).map_err(|e| format!("node.crt: {e}"))?];
            let key = PrivateKeyDer::from_pem_file(dir.join("node.key")).map_err(|e| format!("node.key: {e}"))?;
            Some((chain, key))
        }
        None => None,
    };
    peer_http_as(addr, credentials, head, body)
}

/// A node certificate chain and its key, as a TLS client presents them.
pub type Credentials = (Vec<rustls::pki_types::CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>);

/// Like [`peer_http`], presenting `credentials` (for example a hand-made device's, from its
/// `Identity::client_auth`).
pub fn peer_http_as(
    addr: &str,
    credentials: Option<Credentials>,
    head: &str,
    body: &[u8],
) -> Result<PeerAnswer, String> {
    use rustls::pki_types::ServerName;
    use std::io::{Read, Write};
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let verifier = std::sync::Arc::new(AnyServer { provider: provider.clone(), seen: seen.clone() });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match credentials {
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|e| e.to_string())?,
        None => builder.with_no_client_auth(),
    };
    let name = ServerName::try_from("supermesh-peer").map_err(|e| e.to_string())?;
    let connection = rustls::ClientConnection::new(std::sync::Arc::new(config), name).map_err(|e| e.to_string())?;
    let address: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let tcp = std::net::TcpStream::connect_timeout(&address, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    tls.write_all(head.as_bytes()).map_err(|e| format!("sending the head: {e}"))?;
    tls.write_all(body).map_err(|e| format!("sending the body: {e}"))?;
    let mut response = Vec::new();
    match tls.read_to_end(&mut response) {
        Ok(_) => {}
        // The server may close without close_notify after its answer: what came is the answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
        Err(e) => return Err(format!("reading the answer: {e}")),
    }
    let response = String::from_utf8_lossy(&response);
    let status = response.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or("no HTTP answer")?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    let server_certificate = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(PeerAnswer { status, body, server_certificate })
}

/// Takes any server certificate and keeps it: the tests check what it says themselves.
#[derive(Debug)]
struct AnyServer {
    provider: std::sync::Arc<rustls::crypto::CryptoProvider>,
    seen: std::sync::Arc<std::sync::Mutex<Option<Vec<u8>>>>,
}

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(end_entity.to_vec());
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// A port free now for TCP and UDP, never handed out before by this process, and below
/// the kernel's ephemeral range (32768 and up): a port the kernel picks for an outgoing
/// connection meanwhile (agents and controllers open many) can never take it first.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let mut random = std::fs::File::open("/dev/urandom").expect("urandom");
    loop {
        let mut buf = [0u8; 2];
        std::io::Read::read_exact(&mut random, &mut buf).expect("random");
        let port = 20_000 + u16::from_le_bytes(buf) % 12_000;
        let free = TcpListener::bind(("0.0.0.0", port)).is_ok() && std::net::UdpSocket::bind(("0.0.0.0", port)).is_ok();
        if free && !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A copy of the current kubeconfig whose users act as `user`.
fn impersonating_kubeconfig(dir: &Path, user: &str) -> PathBuf {
    let source = std::env::var("KUBECONFIG").expect("KUBECONFIG is set");
    let text = std::fs::read_to_string(&source).unwrap_or_else(|e| panic!("cannot read {source}: {e}"));
    let mut config: serde_yaml::Value = serde_yaml::from_str(&text).expect("KUBECONFIG is YAML");
    for entry in config["users"].as_sequence_mut().expect("kubeconfig has users") {
        entry["user"]["as"] = serde_yaml::Value::from(user);
    }
    let path = dir.join(format!("kubeconfig-{user}"));
    std::fs::write(&path, serde_yaml::to_string(&config).expect("serialize kubeconfig")).expect("write kubeconfig");
    path
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Deletes the named objects (cluster-scoped EdgeNodes made by a test) without waiting.
pub async fn delete_all<K>(api: &Api<K>, names: &[String])
where
    K: Resource + Clone + Debug + DeserializeOwned,
{
    for name in names {
        let _ = api.delete(name, &DeleteParams::default()).await;
    }
}

/// Runs `supermeshctl` with `args` against the test cluster and the controllers' namespace:
/// its standard output, or its standard error when it fails.
pub fn supermeshctl(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(binary("supermeshctl"))
        .args(["--namespace", CONTROLLER_NAMESPACE])
        .args(args)
        .output()
        .map_err(|e| format!("cannot run supermeshctl: {e}"))?;
    match out.status.success() {
        true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        false => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
    }
}

/// The bearer token of the kubeconfig's user (the test cluster's admin).
pub fn kube_token() -> String {
    let path = std::env::var("KUBECONFIG").expect("KUBECONFIG");
    let config = kube::config::Kubeconfig::read_from(&path).expect("a readable kubeconfig");
    let user = config.auth_infos.first().and_then(|a| a.auth_info.as_ref()).expect("a user in the kubeconfig");
    use secrecy::ExposeSecret;
    user.token.as_ref().map(|t| t.expose_secret().to_owned()).expect("the test cluster's user has a token")
}

/// A join string agents enroll with: a new auto-approving token without a scope.
pub async fn join_token() -> String {
    join_token_with(&["--auto-approve"]).await
}

/// A join string of a new token created with `supermeshctl token create ARGS`, once a
/// controller created the CA it pins.
pub async fn join_token_with(args: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut command = vec!["token", "create"];
    command.extend_from_slice(args);
    loop {
        match supermeshctl(&command) {
            Ok(out) => return out.trim().to_owned(),
            Err(e) if e.contains("no cloudhub CA") && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("supermeshctl token create failed: {e}"),
        }
    }
}

/// The root of the networks' cluster keys, kept by the controller in its namespace.
pub async fn cluster_key_root(client: &Client) -> String {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), CONTROLLER_NAMESPACE);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let root = secrets.get_opt("supermesh-cluster-key").await.ok().flatten().and_then(|s| {
            let bytes = s.data?.get("root")?.0.clone();
            String::from_utf8(bytes).ok()
        });
        if let Some(root) = root {
            return root;
        }
        assert!(tokio::time::Instant::now() < deadline, "the controller did not create the cluster key root");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A command running `binary` as `uid` with exactly the capabilities the packaged systemd
/// unit gives the agent (its `AmbientCapabilities=`), as systemd would start it.
fn service_user(uid: u32, binary: &Path) -> Command {
    let unit = std::fs::read_to_string(workspace().join("packaging/supermesh-agent.service")).expect("the unit");
    let line = unit.lines().find_map(|l| l.strip_prefix("AmbientCapabilities=")).expect("AmbientCapabilities=");
    let caps: Vec<String> =
        line.split_whitespace().map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase())).collect();
    let caps = caps.join(",");
    let mut command = Command::new("setpriv");
    command.arg(format!("--reuid={uid}")).arg(format!("--regid={uid}")).arg("--clear-groups");
    command.arg(format!("--inh-caps={caps}")).arg(format!("--ambient-caps={caps}"));
    command.arg(format!("--bounding-set=-all,{caps}")).arg("--").arg(binary);
    command
}

/// How to start an agent, beyond its name, network, account and cloud.
#[derive(Default)]
pub struct Launch<'a> {
    /// Run it inside this host's network namespace (peer service on the host's address).
    pub host: Option<&'a lan::Host>,
    /// Appended to its edge.yaml (for example a `meta:` block).
    pub extra: &'a str,
    /// Its binary, when not this workspace's build (for example an older release).
    pub binary: Option<PathBuf>,
    /// The node name its edge.yaml states, when not its own (a device claiming another's name).
    pub claims: Option<&'a str>,
    /// Run it as this uid (and gid), owning its directory, with only the capabilities
    /// `packaging/supermesh-agent.service` gives the agent.
    pub user: Option<u32>,
}

/// A `supermesh-agent` process with its own edge.yaml and data dir under target/e2e/agents/.
pub struct Agent {
    /// Node name.
    pub name: String,
    /// The agent's dataDir.
    pub data_dir: PathBuf,
    /// `host:port` of its peer (supernode) service.
    pub peer_addr: String,
    /// Its network.
    pub network: String,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    netns: Option<String>,
    binary: PathBuf,
    user: Option<u32>,
}

impl Agent {
    /// Writes the agent's edge.yaml and starts it.
    pub fn start(name: &str, network: &str, account: &str, cloudhub: &str, token: &str) -> Agent {
        Agent::launch(name, network, account, cloudhub, token, Launch::default())
    }

    /// Like `start`, with `extra` appended to edge.yaml (for example a `meta:` block).
    pub fn start_with(name: &str, network: &str, account: &str, cloudhub: &str, token: &str, extra: &str) -> Agent {
        Agent::launch(name, network, account, cloudhub, token, Launch { extra, ..Launch::default() })
    }

    /// Starts an agent inside `host`'s network namespace, its peer service on the
    /// host's address and its local API on the namespace's loopback (default ports).
    pub fn start_in(
        host: &lan::Host,
        name: &str,
        network: &str,
        account: &str,
        cloudhub: &str,
        token: &str,
        extra: &str,
    ) -> Agent {
        Agent::launch(name, network, account, cloudhub, token, Launch { host: Some(host), extra, ..Launch::default() })
    }

    /// Writes the agent's edge.yaml and starts it as `how` says.
    pub fn launch(name: &str, network: &str, account: &str, cloudhub: &str, token: &str, how: Launch<'_>) -> Agent {
        let Launch { host, extra, binary: chosen, claims, user } = how;
        let stated = claims.unwrap_or(name);
        let dir = target_dir().join("e2e/agents").join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("agent dir");
        let config = dir.join("edge.yaml");
        let data_dir = dir.join("data");
        let mut yaml = format!(
            "node: {{name: {stated}, account: {account}, network: {network}}}\ncloud: {{address: \"{cloudhub}\", token: \"{token}\"}}\ndataDir: {}\n{extra}\n",
            data_dir.display()
        );
        // Agents sharing the host's network namespace need ports of their own.
        let peer_addr = match host {
            Some(h) => format!("{}:10360", h.ip),
            None => format!("127.0.0.1:{}", free_port()),
        };
        if !extra.contains("supernode:") {
            let listen = if host.is_some() { "0.0.0.0:10360".to_owned() } else { peer_addr.clone() };
            yaml += &format!("supernode: {{listen: \"{listen}\", heartbeatSeconds: 1}}\n");
        }
        if !extra.contains("localApi:") && host.is_none() {
            yaml += &format!("localApi: {{listen: \"127.0.0.1:{}\"}}\n", free_port());
        }
        std::fs::write(&config, yaml).expect("write edge.yaml");
        let mut agent = Agent {
            name: name.into(),
            data_dir,
            peer_addr,
            network: network.into(),
            config,
            log: dir.join("agent.log"),
            child: None,
            netns: host.map(|h| h.netns.clone()),
            binary: chosen.unwrap_or_else(|| binary("supermesh-agent")),
            user,
        };
        if let Some(uid) = user {
            let owner = format!("{uid}:{uid}");
            let chown = Command::new("chown").args(["-R", &owner]).arg(&dir).status();
            assert!(chown.is_ok_and(|s| s.success()), "chown {owner} {}", dir.display());
        }
        agent.restart();
        agent
    }

    /// Joins a device as a user does, with `supermesh-agent join`: it writes the device's
    /// edge.yaml and keeps running. The devices share this host, so each gets its own ports.
    pub fn join(name: &str, network: &str, account: &str, cloudhub: &str, token: &str) -> Agent {
        let dir = target_dir().join("e2e/agents").join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("agent dir");
        let peer_addr = format!("127.0.0.1:{}", free_port());
        let mut agent = Agent {
            name: name.into(),
            data_dir: dir.join("data"),
            peer_addr,
            network: network.into(),
            config: dir.join("edge.yaml"),
            log: dir.join("agent.log"),
            child: None,
            netns: None,
            binary: binary("supermesh-agent"),
            user: None,
        };
        let api = format!("127.0.0.1:{}", free_port());
        let mut command = Command::new(&agent.binary);
        command.args(["join", "--cloud", cloudhub, "--token", token, "--name", name, "--account", account]);
        command.args(["--network", network, "--peer-listen", &agent.peer_addr, "--api-listen", &api]);
        command.arg("--config").arg(&agent.config).arg("--data-dir").arg(&agent.data_dir);
        agent.spawn(command);
        agent
    }

    /// The agent's cluster registry, asked over its peer service (from the host namespace).
    pub fn registry(&self, root: &str) -> Option<supermesh_protocol::peer::Registry> {
        peer_registry(&self.peer_addr, &self.name, &self.network, root)
    }

    /// The agent's cluster registry, asked over its peer service with cluster key `key`.
    pub fn registry_with(&self, key: &str) -> Option<supermesh_protocol::peer::Registry> {
        peer_registry_with(&self.peer_addr, &self.name, key)
    }

    /// Like `registry`, asked from inside the agent's own namespace (works while its network is cut off).
    pub fn registry_inside(&self, root: &str) -> Option<supermesh_protocol::peer::Registry> {
        let Some(netns) = self.netns.clone() else { return self.registry(root) };
        let (addr, name, network, root) =
            (self.peer_addr.clone(), self.name.clone(), self.network.clone(), root.to_owned());
        lan::in_netns(&netns, move || peer_registry(&addr, &name, &network, &root))
    }

    /// Starts the agent process again, appending to its log; one still running is stopped
    /// first (SIGTERM), so that no agent outlives the handle that started it.
    pub fn restart(&mut self) {
        self.stop();
        // `ip netns exec` execs the agent in place, so the child's pid is the agent's.
        let mut command = match &self.netns {
            Some(netns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", netns]).arg(&self.binary);
                c
            }
            None => match self.user {
                Some(uid) => service_user(uid, &self.binary),
                None => Command::new(&self.binary),
            },
        };
        command.arg("--config").arg(&self.config);
        self.spawn(command);
    }

    /// Runs `command` (this agent's binary with its arguments) as this agent, logging to its log.
    fn spawn(&mut self, mut command: Command) {
        assert!(self.binary.exists(), "{} is missing: run `cargo build --bins`", self.binary.display());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("agent log");
        let child = command
            .args(["--log-level", "info,supermesh_agent=debug"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("start supermesh-agent");
        self.child = Some(child);
    }

    /// Stops the agent gracefully (SIGTERM) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let _ = child.wait();
        }
    }

    /// Kills the agent with SIGKILL, as a power cut would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Path of its edge.yaml.
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// Rewrites its edge.yaml with `edit` (takes effect at its next start).
    pub fn edit_config(&self, edit: impl FnOnce(String) -> String) {
        let yaml = std::fs::read_to_string(&self.config).expect("edge.yaml");
        std::fs::write(&self.config, edit(yaml)).expect("write edge.yaml");
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many times edged was told about `key` (stored or removed).
    pub fn edged_events(&self, key: &str) -> usize {
        let field = format!("key={key}");
        let whole = |l: &&str| l.split_whitespace().any(|word| word == field);
        self.log().lines().filter(|l| l.contains("edged: desired microservice")).filter(whole).count()
    }

    /// The working directory of the instance of `key` (`namespace/microservice/name`).
    pub fn instance_dir(&self, key: &str) -> Option<PathBuf> {
        let dirs = std::fs::read_dir(self.data_dir.join("instances")).ok()?;
        dirs.filter_map(|d| d.ok()).map(|d| d.path()).find(|p| {
            let text = std::fs::read_to_string(p.join("instance.json")).unwrap_or_default();
            serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|r| r["key"] == key)
        })
    }

    /// Process id of the instance of `key`, as recorded by the agent.
    pub fn instance_pid(&self, key: &str) -> Option<i32> {
        let text = std::fs::read_to_string(self.instance_dir(key)?.join("instance.json")).ok()?;
        let record: serde_json::Value = serde_json::from_str(&text).ok()?;
        i32::try_from(record["process"]["pid"].as_i64()?).ok()
    }

    /// `supermesh-agent inspect` of this agent's data dir; `Err` holds its error output.
    pub fn inspect(&self) -> Result<String, String> {
        let out = Command::new(&self.binary)
            .arg("inspect")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .output()
            .expect("run supermesh-agent inspect");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// The microservices in the agent's SQLite store with their versions (memberships left out);
    /// none before the agent created its store.
    pub fn held(&self) -> std::collections::BTreeMap<String, String> {
        if !self.data_dir.join("meta.db").exists() {
            return Default::default();
        }
        let report = self.inspect().unwrap_or_else(|e| panic!("inspect {}: {e}", self.name));
        report
            .lines()
            .skip(1)
            .take_while(|l| !l.trim().is_empty())
            .filter_map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                (cols.get(1) == Some(&"microservice")).then_some(())?;
                Some((cols.first()?.to_string(), cols.get(2)?.to_string()))
            })
            .collect()
    }

    /// Polls `check` until it holds, failing with the agent's log after `DEADLINE`.
    pub async fn wait_until(&self, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while !check() {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}; agent log:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until the store satisfies `check`, failing with the agent log after `DEADLINE`.
    pub async fn wait_held(&self, what: &str, check: impl Fn(&std::collections::BTreeMap<String, String>) -> bool) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let held = self.held();
            if check(&held) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "agent {}: timed out waiting for {what}; holds {held:?}\nlog:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        // Agents leave instances running on purpose (the next agent adopts them); a test must
        // not: every process working in this agent's instance directories goes, recorded or not.
        let instances = self.data_dir.join("instances");
        for pgid in supermesh_agent::edged::group::working_in(&instances) {
            let _ = supermesh_agent::edged::group::signal(pgid, Signal::SIGKILL);
        }
    }
}

impl Agent {
    /// Process id of the running agent, for example to read its memory use from /proc.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// Resident memory of process `pid` in KiB (`VmRSS` of /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

impl Controller {
    /// Process id of the running controller, for example to read its memory use from /proc.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Controller metric: changes sent to agents.
pub const SENT: &str = "supermesh_controller_cloudhub_changes_sent_total";
/// Controller metric: agents connected now.
pub const AGENTS: &str = "supermesh_controller_cloudhub_agents";

/// A controller, a namespace with an Account mesh `m`, and what agents need to join.
pub struct Site {
    /// The cluster under test.
    pub cluster: Cluster,
    /// Namespace of the test's objects.
    pub ns: String,
    /// The controller under test.
    pub controller: Controller,
    /// Join token for agents.
    pub token: String,
    /// Suffix unique to this test.
    pub id: String,
}

impl Site {
    pub async fn new(prefix: &str) -> Site {
        Site::with_args(prefix, &[]).await
    }

    pub async fn with_args(prefix: &str, args: &[&str]) -> Site {
        let cluster = Cluster::connect().await;
        let ns = cluster.namespace(prefix);
        let controller = Controller::launch(prefix, None, args);
        let token = join_token().await;
        let id = unique();
        let mesh = format!("apiVersion: supermesh.io/v1alpha1\nkind: Mesh\nmetadata: {{name: m}}\nspec: {{type: Account, account: acct-{id}}}\n");
        apply_yaml(&mesh, &["-n", &ns]).unwrap();
        Site { cluster, ns, controller, token, id }
    }

    /// Starts agent `i` of this site.
    pub fn agent(&self, i: usize) -> Agent {
        self.agent_with(i, "")
    }

    /// Starts agent `i` with `extra` appended to its edge.yaml.
    pub fn agent_with(&self, i: usize, extra: &str) -> Agent {
        self.agent_as(i, Launch { extra, ..Launch::default() })
    }

    /// Starts agent `i` as `how` says.
    pub fn agent_as(&self, i: usize, how: Launch<'_>) -> Agent {
        let name = format!("node-{}-{i}", self.id);
        let (network, account) = (format!("net-{}", self.id), format!("acct-{}", self.id));
        Agent::launch(&name, &network, &account, &self.controller.cloudhub_addr, &self.token, how)
    }

    /// The edge.yaml of a device `name` of this site (its account and network), and the
    /// identity it would enroll, held in memory: for tests that speak the protocol by hand.
    pub fn device(&self, name: &str) -> (supermesh_agent::config::EdgeConfig, supermesh_agent::identity::Identity) {
        self.device_in(name, &format!("acct-{}", self.id))
    }

    /// Like [`Site::device`], of account `account`.
    pub fn device_in(
        &self,
        name: &str,
        account: &str,
    ) -> (supermesh_agent::config::EdgeConfig, supermesh_agent::identity::Identity) {
        let yaml = format!(
            "node: {{name: {name}, account: {account}, network: net-{id}}}\ncloud: {{address: \"{}\", token: \"{}\"}}\n",
            self.controller.cloudhub_addr,
            self.token,
            id = self.id
        );
        let config = supermesh_agent::config::parse(&yaml, "edge.yaml").expect("a valid edge.yaml");
        let token = config.cloud.token.as_ref().map(|t| &t.0);
        let identity = supermesh_agent::identity::Identity::load(None, token).expect("an identity in memory");
        (config, identity)
    }

    /// Enrolls device `name` of `account`, dials the cloudhub and says hello: a session
    /// spoken by hand.
    pub async fn dial_as(&self, name: &str, account: &str) -> supermesh_agent::edgehub::Ws {
        use futures::SinkExt;
        use supermesh_protocol::{self as protocol, Hello, Message, Operation};
        let (config, identity) = self.device_in(name, account);
        let mut ws = supermesh_agent::edgehub::dial(&config, &identity).await.expect("enroll and dial the cloudhub");
        let hello = Hello {
            node: name.to_owned(),
            account: account.to_owned(),
            network: format!("net-{}", self.id),
            agent_version: "test".into(),
            ..Hello::default()
        };
        let hello = Message::new("t-1".into(), 0, Operation::NodeConnection, protocol::CONNECTION_RESOURCE, hello);
        ws.send(Frame::text(protocol::encode(&hello).unwrap())).await.unwrap();
        ws
    }

    pub fn apply(&self, yaml: &str) {
        apply_yaml(yaml, &["-n", &self.ns]).unwrap_or_else(|e| panic!("apply failed: {e}"));
    }

    pub fn key(&self, name: &str) -> String {
        format!("{}/microservice/{name}", self.ns)
    }

    pub fn sent(&self) -> f64 {
        self.controller.metric(SENT, "").unwrap_or(0.0)
    }

    pub async fn wait_agents(&self, n: f64) {
        self.controller
            .wait_until(&format!("{n} agents connected"), || self.controller.metric(AGENTS, "") == Some(n))
            .await;
    }

    /// Sets `spec.security` of `agent`'s EdgeNode (JSON, `null` to clear), once it enrolled.
    pub async fn node_security(&self, agent: &Agent, security: serde_json::Value) {
        use kube::api::{Patch, PatchParams};
        let nodes: Api<supermesh_api::EdgeNode> = Api::all(self.cluster.client.clone());
        self.controller.wait_for(&nodes, &agent.name, "the node to enroll", |_| true).await;
        let patch = serde_json::json!({"spec": {"security": security}});
        nodes.patch(&agent.name, &PatchParams::default(), &Patch::Merge(&patch)).await.expect("patch spec.security");
    }

    pub async fn cleanup(&self, agents: &[&Agent]) {
        let nodes: Api<supermesh_api::EdgeNode> = Api::all(self.cluster.client.clone());
        let names: Vec<String> = agents.iter().map(|a| a.name.clone()).collect();
        delete_all(&nodes, &names).await;
    }
}

/// The Events of reason `reason` on Microservice `name`, oldest first.
pub async fn events(site: &Site, name: &str, reason: &str) -> Vec<String> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(site.cluster.client.clone(), &site.ns);
    let mut found: Vec<k8s_openapi::api::events::v1::Event> = api
        .list(&kube::api::ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter(|e| e.reason.as_deref() == Some(reason))
        .collect();
    found.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    found.into_iter().filter_map(|e| e.note).collect()
}
