//! `cargo xtask controlplane up|down|status`: a real etcd and kube-apiserver as
//! local processes (see shared control-plane notes in the README). The
//! kube-apiserver is built once from Debian's source package and cached.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

pub use crate::procs::stop;
use crate::procs::Procs;
use crate::shell::{self, ensure_program, target_dir};

/// Kubernetes version of the cached kube-apiserver.
pub const KUBE_VERSION: &str = "v1.20.2";
pub const BUILD_SCRIPT: &str = include_str!("../scripts/build-kube.sh");

#[derive(clap::Subcommand, Clone, Copy)]
pub enum Action {
    /// Start etcd and kube-apiserver (or reuse the running ones) and print `export KUBECONFIG=...`.
    Up,
    /// Stop what `up` started, and nothing else.
    Down,
    /// Print `export KUBECONFIG=...` while the control plane runs; fail otherwise.
    Status,
}

pub fn run(action: Action) -> Result<()> {
    let plane = ControlPlane::new();
    match action {
        Action::Up => {
            plane.up()?;
            println!("export KUBECONFIG={}", plane.kubeconfig().display());
        }
        Action::Down => plane.down()?,
        Action::Status => {
            if !plane.is_running() {
                bail!("the control plane is not running: start it with `cargo xtask controlplane up`");
            }
            println!("export KUBECONFIG={}", plane.kubeconfig().display());
        }
    }
    Ok(())
}

/// Runs `work` with the kubeconfig of the cluster to use: the one `KUBECONFIG` names
/// (used as is), else the local control plane, brought up if needed and stopped
/// afterwards only when this call started it.
pub fn with_cluster<T>(work: impl FnOnce(&str) -> Result<T>) -> Result<T> {
    let given = std::env::var("KUBECONFIG").ok().filter(|k| !k.is_empty());
    let plane = ControlPlane::new();
    let started = given.is_none() && !plane.is_running();
    let kubeconfig = match given {
        Some(k) => k,
        None => {
            eprintln!("\n==> control plane");
            plane.up()?;
            plane.kubeconfig().display().to_string()
        }
    };
    let result = work(&kubeconfig);
    if started {
        plane.down()?;
    }
    result
}

/// The control plane whose state lives in `target/controlplane/`.
pub struct ControlPlane {
    dir: PathBuf,
    procs: Procs,
}

impl ControlPlane {
    pub fn new() -> Self {
        let dir = target_dir().join("controlplane");
        ControlPlane { procs: Procs::new(dir.clone(), "kube-apiserver"), dir }
    }

    /// Path of the admin kubeconfig written by `up`.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// Whether both processes run and the API server answers `/readyz`.
    pub fn is_running(&self) -> bool {
        self.procs.pid("etcd").is_some() && self.procs.pid("kube-apiserver").is_some() && self.readyz()
    }

    /// Starts the control plane unless it already runs. Idempotent.
    pub fn up(&self) -> Result<()> {
        if self.is_running() {
            eprintln!("==> control plane already running");
            return Ok(());
        }
        self.down()?;
        let apiserver = ensure_tools()?;
        fs::create_dir_all(self.dir.join("certs"))?;
        let etcd_port = free_port()?;
        let peer_port = free_port()?;
        let api_port = free_port()?;

        let token = hex_token()?;
        write_private(&self.dir.join("tokens.csv"), &format!("{token},admin,admin,system:masters\n"))?;
        let key = self.dir.join("sa.key");
        shell::output(Command::new("openssl").args(["genrsa", "-out"]).arg(&key).arg("2048"))?;
        shell::output(
            Command::new("openssl").args(["rsa", "-pubout", "-in"]).arg(&key).arg("-out").arg(self.dir.join("sa.pub")),
        )?;

        eprintln!("==> starting etcd on 127.0.0.1:{etcd_port}");
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        self.procs.spawn(
            "etcd",
            Command::new("etcd")
                .arg("--data-dir")
                .arg(self.dir.join("etcd-data"))
                .args(["--listen-client-urls", &etcd_url, "--advertise-client-urls", &etcd_url])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer_port}")])
                .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer_port}")])
                .args(["--initial-cluster", &format!("default=http://127.0.0.1:{peer_port}")]),
        )?;
        self.wait("etcd", Duration::from_secs(30), || TcpStream::connect(("127.0.0.1", etcd_port)).is_ok())?;

        eprintln!("==> starting kube-apiserver {KUBE_VERSION} on 127.0.0.1:{api_port}");
        let d = |name: &str| self.dir.join(name).display().to_string();
        self.procs.spawn(
            "kube-apiserver",
            Command::new(&apiserver).args([
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={api_port}"),
                format!("--cert-dir={}", d("certs")),
                format!("--token-auth-file={}", d("tokens.csv")),
                "--authorization-mode=RBAC".into(),
                "--service-account-issuer=https://kubernetes.default.svc".into(),
                format!("--service-account-key-file={}", d("sa.pub")),
                format!("--service-account-signing-key-file={}", d("sa.key")),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                "--allow-privileged=true".into(),
            ]),
        )?;
        let cert = self.dir.join("certs/apiserver.crt");
        self.wait("kube-apiserver serving certificate", Duration::from_secs(60), || cert.exists())?;
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: supermesh\n  cluster:\n    server: https://127.0.0.1:{api_port}\n    certificate-authority: {}\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: supermesh\n  context:\n    cluster: supermesh\n    user: admin\ncurrent-context: supermesh\n",
            cert.display()
        );
        write_private(&self.kubeconfig(), &kubeconfig)?;
        self.wait("kube-apiserver /readyz", Duration::from_secs(90), || self.readyz())?;
        // /readyz can answer before the bootstrap namespaces exist.
        self.wait("namespace default", Duration::from_secs(60), || {
            self.kubectl(&["get", "namespace", "default"]).is_ok()
        })?;
        eprintln!("==> control plane ready");
        Ok(())
    }

    /// Stops the API server, then etcd, and removes their data. Only processes
    /// started by `up` (recorded in pid files and run from this directory) are touched.
    pub fn down(&self) -> Result<()> {
        for name in ["kube-apiserver", "etcd"] {
            self.procs.stop(name, Duration::from_secs(10));
        }
        let _ = fs::remove_dir_all(self.dir.join("etcd-data"));
        Ok(())
    }

    /// Runs kubectl against this control plane and returns its output.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        shell::output(Command::new("kubectl").arg("--kubeconfig").arg(self.kubeconfig()).args(args))
    }

    fn readyz(&self) -> bool {
        self.kubeconfig().exists() && self.kubectl(&["get", "--raw", "/readyz", "--request-timeout=5s"]).is_ok()
    }

    fn wait(&self, what: &str, limit: Duration, ready: impl FnMut() -> bool) -> Result<()> {
        self.procs.wait(what, &["etcd", "kube-apiserver"], limit, ready)
    }
}

/// Installs etcd, openssl and kubectl when missing; builds the apiserver once.
/// Returns the kube-apiserver binary to run.
fn ensure_tools() -> Result<PathBuf> {
    ensure_program("etcd", "etcd-server")?;
    ensure_program("openssl", "openssl")?;
    ensure_program("kubectl", "kubernetes-client")?;
    if let Some(path) = std::env::var_os("SUPERMESH_KUBE_APISERVER") {
        return Ok(PathBuf::from(path));
    }
    let cache = cache_dir().join("k8s").join(KUBE_VERSION);
    let binary = cache.join("kube-apiserver");
    if !binary.exists() {
        eprintln!(
            "==> building kube-apiserver {KUBE_VERSION} from Debian's source package (once; cached in {})",
            cache.display()
        );
        shell::run(
            Command::new("bash").arg("-c").arg(BUILD_SCRIPT).arg("build-kube").arg(&cache).arg("kube-apiserver"),
        )
        .context(
            "building kube-apiserver failed; see the output above. It needs root, Debian's source \
             archive and about 3 GB of free disk. Or set SUPERMESH_KUBE_APISERVER to a kube-apiserver binary",
        )?;
    }
    Ok(binary)
}

/// Where builds made once per machine are kept.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
        .join("supermesh")
}

/// A free TCP port on loopback.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn hex_token() -> Result<String> {
    use std::io::Read;
    let mut buf = [0u8; 16];
    fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

pub fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}
