//! `cargo xtask cluster up|down|status|load`: a real single-node Kubernetes on this
//! machine (containerd, etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
//! kubelet, kube-proxy), where Pods run locally built images: what kind gives elsewhere.
//!
//! The five Kubernetes binaries and the pause image's binary are built once from Debian's
//! source package and cached beside the control plane's kube-apiserver. Everything the
//! cluster writes lives in one state directory under the build cache, except what a node
//! cannot be told to keep there (a few host paths, sysctls, iptables chains, a bridge,
//! cgroups): `up` records how the host was before its first start and `down` puts it back.

use std::collections::BTreeMap;
use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

use crate::controlplane::{cache_dir, free_port, hex_token, write_private, KUBE_VERSION};
use crate::image::{write_docker_archive, Entry};
use crate::procs::Procs;
use crate::shell::{self, apt_install, has};

/// The node's name.
pub const NODE: &str = "supermesh-node";
/// The pod network: one bridge, one /24 on the node.
const POD_CIDR: &str = "10.244.0.0/24";
const SERVICE_CIDR: &str = "10.96.0.0/24";
/// The `kubernetes` Service's address, the first of the service range.
const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
const BRIDGE: &str = "smcni0";
const PAUSE_IMAGE: &str = "k8s.gcr.io/pause:3.2";
/// Kubernetes components, in start order after containerd and etcd.
const COMPONENTS: [&str; 5] = ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy"];
/// Sysctls the kubelet, kube-proxy and the CNI bridge change.
const SYSCTLS: [&str; 6] = [
    "vm/overcommit_memory",
    "kernel/panic",
    "kernel/panic_on_oops",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
];
/// Host paths a node writes wherever its state directory is.
const HOST_PATHS: [&str; 6] =
    ["/var/lib/kubelet", "/var/log/pods", "/var/log/containers", "/var/lib/cni", "/run/containerd", "/opt/containerd"];

#[derive(clap::Subcommand, Clone, Debug)]
pub enum Action {
    /// Start the cluster (or reuse the running one) and print `export KUBECONFIG=...`.
    Up,
    /// Stop what `up` started, and put the host back as it was.
    Down,
    /// Print `export KUBECONFIG=...` while the cluster runs; fail otherwise.
    Status,
    /// Import a docker-archive image (`cargo xtask image` writes one) into the node's containerd.
    Load {
        /// The image archive.
        archive: PathBuf,
    },
}

pub fn run(action: Action) -> Result<()> {
    let cluster = Cluster::new();
    match action {
        Action::Up => {
            cluster.up()?;
            println!("export KUBECONFIG={}", cluster.kubeconfig().display());
        }
        Action::Down => cluster.down()?,
        Action::Status => {
            if !cluster.is_running() {
                bail!("the cluster is not running: start it with `cargo xtask cluster up`");
            }
            println!("export KUBECONFIG={}", cluster.kubeconfig().display());
        }
        Action::Load { archive } => {
            if !cluster.is_running() {
                bail!("the cluster is not running: start it with `cargo xtask cluster up`");
            }
            cluster.load(&archive)?;
        }
    }
    Ok(())
}

/// Runs `work` with the kubeconfig of a cluster with a node that has `image`: the one
/// `SUPERMESH_CLUSTER_KUBECONFIG` names (kind or any other, the image loaded beforehand,
/// for example with `kind load image-archive`), else this machine's, brought up if needed,
/// given the image, and stopped afterwards only when this call started it.
pub fn with_cluster<T>(image: &Path, work: impl FnOnce(&str) -> Result<T>) -> Result<T> {
    if let Some(given) = std::env::var("SUPERMESH_CLUSTER_KUBECONFIG").ok().filter(|k| !k.is_empty()) {
        eprintln!("==> using the cluster of SUPERMESH_CLUSTER_KUBECONFIG; it must hold {}", crate::image::tag());
        return work(&given);
    }
    let cluster = Cluster::new();
    let started = !cluster.is_running();
    eprintln!("\n==> cluster");
    let result = cluster
        .up()
        .and_then(|()| cluster.load(image))
        .and_then(|()| work(&cluster.kubeconfig().display().to_string()));
    if started {
        cluster.down()?;
    }
    result
}

pub struct Cluster {
    dir: PathBuf,
    procs: Procs,
}

/// Ports picked at `up`, written into every component's configuration.
struct Ports {
    etcd: u16,
    etcd_peer: u16,
    apiserver: u16,
    controller_manager: u16,
    scheduler: u16,
    kubelet: u16,
    kubelet_healthz: u16,
    proxy_healthz: u16,
    proxy_metrics: u16,
}

impl Cluster {
    pub fn new() -> Self {
        let dir = cache_dir().join("cluster");
        Cluster { procs: Procs::new(dir.join("run"), "kube-apiserver"), dir }
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    fn run_dir(&self) -> &Path {
        self.procs.dir()
    }

    fn socket(&self) -> PathBuf {
        self.run_dir().join("containerd/containerd.sock")
    }

    /// Whether every process runs and the node is Ready.
    pub fn is_running(&self) -> bool {
        ["containerd", "etcd"].iter().chain(COMPONENTS.iter()).all(|name| self.procs.pid(name).is_some())
            && self.node_ready()
    }

    fn node_ready(&self) -> bool {
        let query = "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}";
        self.kubectl(&["get", "node", NODE, "-o", query, "--request-timeout=5s"]).is_ok_and(|s| s.trim() == "True")
    }

    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        shell::output(Command::new("kubectl").arg("--kubeconfig").arg(self.kubeconfig()).args(args))
    }

    /// Starts the cluster unless it already runs. Idempotent.
    pub fn up(&self) -> Result<()> {
        if self.is_running() {
            eprintln!("==> cluster already running");
            return Ok(());
        }
        if !nix::unistd::geteuid().is_root() {
            bail!("the cluster runs a kubelet and containerd: run `cargo xtask cluster up` as root");
        }
        self.down()?;
        let bin = ensure_tools()?;
        self.save_host()?;
        let run = self.run_dir().to_owned();
        fs::create_dir_all(&run)?;
        let node_ip = node_ip()?;
        let ports = Ports {
            etcd: free_port()?,
            etcd_peer: free_port()?,
            apiserver: free_port()?,
            controller_manager: free_port()?,
            scheduler: free_port()?,
            kubelet: free_port()?,
            kubelet_healthz: free_port()?,
            proxy_healthz: free_port()?,
            proxy_metrics: free_port()?,
        };
        eprintln!("==> certificates and configuration in {}", run.display());
        self.write_pki(node_ip, &ports)?;

        eprintln!("==> starting containerd");
        let containerd_config = run.join("containerd.toml");
        fs::write(&containerd_config, self.containerd_config())?;
        fs::create_dir_all(run.join("cni/net.d"))?;
        fs::write(run.join("cni/net.d/10-supermesh.conflist"), self.cni_config())?;
        self.procs.spawn("containerd", Command::new("containerd").arg("--config").arg(&containerd_config))?;
        self.procs.wait("containerd", &["containerd"], Duration::from_secs(30), || self.ctr(&["version"]).is_ok())?;
        let pause = run.join("pause.tar");
        write_docker_archive(
            &pause,
            PAUSE_IMAGE,
            &[Entry::file("pause", fs::read(bin.join("pause"))?, 0o755)],
            serde_json::json!({"architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
                "config": {"Entrypoint": ["/pause"]}}),
        )?;
        self.load(&pause)?;

        eprintln!("==> starting etcd on 127.0.0.1:{}", ports.etcd);
        let etcd_url = format!("http://127.0.0.1:{}", ports.etcd);
        let peer_url = format!("http://127.0.0.1:{}", ports.etcd_peer);
        self.procs.spawn(
            "etcd",
            Command::new("etcd")
                .arg("--data-dir")
                .arg(run.join("etcd-data"))
                .args(["--listen-client-urls", &etcd_url, "--advertise-client-urls", &etcd_url])
                .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("default={peer_url}")]),
        )?;
        self.procs.wait("etcd", &["etcd"], Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", ports.etcd)).is_ok()
        })?;

        eprintln!("==> starting kube-apiserver {KUBE_VERSION} on {node_ip}:{}", ports.apiserver);
        let p = |name: &str| run.join(name).display().to_string();
        self.procs.spawn(
            "kube-apiserver",
            Command::new(bin.join("kube-apiserver")).args([
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=0.0.0.0".into(),
                // Pods cannot reach the host's loopback: the `kubernetes` Service points here.
                format!("--advertise-address={node_ip}"),
                format!("--secure-port={}", ports.apiserver),
                format!("--tls-cert-file={}", p("pki/apiserver.crt")),
                format!("--tls-private-key-file={}", p("pki/apiserver.key")),
                format!("--client-ca-file={}", p("pki/ca.crt")),
                format!("--token-auth-file={}", p("tokens.csv")),
                // No cluster DNS knows the node's name: logs, exec and port-forward dial its address.
                "--kubelet-preferred-address-types=InternalIP".into(),
                format!("--kubelet-client-certificate={}", p("pki/apiserver-kubelet-client.crt")),
                format!("--kubelet-client-key={}", p("pki/apiserver-kubelet-client.key")),
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                "--service-account-issuer=https://kubernetes.default.svc".into(),
                format!("--service-account-key-file={}", p("pki/sa.pub")),
                format!("--service-account-signing-key-file={}", p("pki/sa.key")),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--allow-privileged=true".into(),
                // Without the front proxy's CA the controller-manager and scheduler complain forever.
                format!("--requestheader-client-ca-file={}", p("pki/front-proxy-ca.crt")),
                "--requestheader-allowed-names=front-proxy-client".into(),
                "--requestheader-extra-headers-prefix=X-Remote-Extra-".into(),
                "--requestheader-group-headers=X-Remote-Group".into(),
                "--requestheader-username-headers=X-Remote-User".into(),
                format!("--proxy-client-cert-file={}", p("pki/front-proxy-client.crt")),
                format!("--proxy-client-key-file={}", p("pki/front-proxy-client.key")),
            ]),
        )?;
        self.procs.wait("kube-apiserver /readyz", &["etcd", "kube-apiserver"], Duration::from_secs(90), || {
            self.kubectl(&["get", "--raw", "/readyz", "--request-timeout=5s"]).is_ok()
        })?;
        self.procs.wait("namespace default", &["kube-apiserver"], Duration::from_secs(60), || {
            self.kubectl(&["get", "namespace", "default"]).is_ok()
        })?;

        eprintln!("==> starting kube-controller-manager and kube-scheduler");
        self.procs.spawn(
            "kube-controller-manager",
            Command::new(bin.join("kube-controller-manager")).args([
                format!("--kubeconfig={}", p("controller-manager.kubeconfig")),
                format!("--authentication-kubeconfig={}", p("controller-manager.kubeconfig")),
                format!("--authorization-kubeconfig={}", p("controller-manager.kubeconfig")),
                "--use-service-account-credentials".into(),
                format!("--service-account-private-key-file={}", p("pki/sa.key")),
                format!("--root-ca-file={}", p("pki/ca.crt")),
                format!("--cluster-signing-cert-file={}", p("pki/ca.crt")),
                format!("--cluster-signing-key-file={}", p("pki/ca.key")),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--leader-elect=false".into(),
                "--port=0".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", ports.controller_manager),
                format!("--flex-volume-plugin-dir={}", p("flexvolume")),
            ]),
        )?;
        self.procs.spawn(
            "kube-scheduler",
            Command::new(bin.join("kube-scheduler")).args([
                format!("--kubeconfig={}", p("scheduler.kubeconfig")),
                format!("--authentication-kubeconfig={}", p("scheduler.kubeconfig")),
                format!("--authorization-kubeconfig={}", p("scheduler.kubeconfig")),
                "--leader-elect=false".into(),
                "--port=0".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", ports.scheduler),
            ]),
        )?;

        eprintln!("==> starting kubelet and kube-proxy (node {NODE}, {node_ip})");
        fs::write(run.join("kubelet.yaml"), self.kubelet_config(&ports))?;
        let endpoint = format!("unix://{}", self.socket().display());
        self.procs.spawn(
            "kubelet",
            Command::new(bin.join("kubelet")).args([
                format!("--config={}", p("kubelet.yaml")),
                format!("--kubeconfig={}", p("kubelet.kubeconfig")),
                "--container-runtime=remote".into(),
                format!("--container-runtime-endpoint={endpoint}"),
                format!("--image-service-endpoint={endpoint}"),
                format!("--containerd={}", self.socket().display()),
                format!("--root-dir={}", p("kubelet")),
                format!("--cert-dir={}", p("kubelet-pki")),
                format!("--node-ip={node_ip}"),
                format!("--hostname-override={NODE}"),
            ]),
        )?;
        fs::write(run.join("kube-proxy.yaml"), self.proxy_config(&ports))?;
        self.procs.spawn(
            "kube-proxy",
            Command::new(bin.join("kube-proxy")).arg(format!("--config={}", p("kube-proxy.yaml"))),
        )?;
        let all: Vec<&str> = ["containerd", "etcd"].into_iter().chain(COMPONENTS).collect();
        self.procs.wait(&format!("node {NODE} Ready"), &all, Duration::from_secs(120), || self.node_ready())?;
        eprintln!("==> cluster ready: node {NODE} at {node_ip}");
        Ok(())
    }

    /// Imports a docker-archive into the node's containerd, where the kubelet finds it.
    pub fn load(&self, archive: &Path) -> Result<()> {
        eprintln!("==> importing {}", archive.display());
        let archive = archive.display().to_string();
        self.ctr(&["images", "import", &archive]).map(drop)
    }

    fn ctr(&self, args: &[&str]) -> Result<String> {
        shell::output(Command::new("ctr").arg("--address").arg(self.socket()).args(["-n", "k8s.io"]).args(args))
    }

    /// Stops everything `up` started, then undoes what the node did to the host.
    pub fn down(&self) -> Result<()> {
        let apiserver = self.procs.pid("kube-apiserver").is_some() && self.procs.pid("kubelet").is_some();
        if apiserver {
            // Pods first, while the kubelet runs, so that it tears their networks down.
            eprintln!("==> deleting workloads");
            let _ = self.kubectl(&["delete", "deployments,daemonsets,statefulsets,replicasets,jobs", "--all", "-A"]);
            let _ = self.kubectl(&["delete", "pods", "--all", "-A", "--grace-period=5", "--timeout=60s"]);
        }
        for name in ["kube-proxy", "kube-scheduler", "kube-controller-manager", "kubelet"] {
            self.procs.stop(name, Duration::from_secs(10));
        }
        if self.procs.pid("containerd").is_some() {
            for task in self.ctr(&["tasks", "ls", "-q"]).unwrap_or_default().lines() {
                let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", task]);
                let _ = self.ctr(&["tasks", "rm", "-f", task]);
            }
        }
        for name in ["kube-apiserver", "etcd", "containerd"] {
            self.procs.stop(name, Duration::from_secs(10));
        }
        self.kill_shims();
        self.restore_host()?;
        if self.run_dir().exists() {
            // Logs stay for a post-mortem; the rest goes.
            let logs = self.dir.join("logs");
            let _ = fs::remove_dir_all(&logs);
            fs::create_dir_all(&logs)?;
            for entry in fs::read_dir(self.run_dir())? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "log") {
                    let _ = fs::rename(&path, logs.join(path.file_name().unwrap_or_default()));
                }
            }
            fs::remove_dir_all(self.run_dir())
                .with_context(|| format!("cannot remove {}", self.run_dir().display()))?;
        }
        Ok(())
    }

    /// containerd's shims outlive it: stop those of this cluster's socket.
    fn kill_shims(&self) {
        let socket = self.socket().display().to_string();
        let Ok(procs) = fs::read_dir("/proc") else { return };
        for entry in procs.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else { continue };
            let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.contains("containerd-shim") && cmdline.contains(&socket) {
                crate::procs::stop(nix::unistd::Pid::from_raw(pid), Duration::from_secs(5));
            }
        }
    }

    fn host_file(&self) -> PathBuf {
        self.dir.join("host-before.json")
    }

    /// Records the sysctls and host paths the node changes, unless a record from an
    /// earlier start that was never undone is there (that one tells the host's real state).
    fn save_host(&self) -> Result<()> {
        if self.host_file().exists() {
            return Ok(());
        }
        let sysctls: BTreeMap<&str, String> = SYSCTLS
            .iter()
            .filter_map(|s| Some((*s, fs::read_to_string(Path::new("/proc/sys").join(s)).ok()?.trim().to_owned())))
            .collect();
        let absent: Vec<&str> = HOST_PATHS.iter().copied().filter(|p| !Path::new(p).exists()).collect();
        fs::create_dir_all(&self.dir)?;
        fs::write(
            self.host_file(),
            serde_json::to_vec_pretty(&serde_json::json!({"sysctls": sysctls, "absent": absent}))?,
        )?;
        Ok(())
    }

    fn restore_host(&self) -> Result<()> {
        let Ok(saved) = fs::read(self.host_file()) else { return Ok(()) };
        eprintln!("==> restoring the host: iptables chains, bridge, mounts, cgroups, paths, sysctls");
        let saved: serde_json::Value = serde_json::from_slice(&saved)?;
        if let Some(proxy) = Some(self.bin_dir().join("kube-proxy")).filter(|p| p.exists()) {
            let _ = shell::output(Command::new(proxy).arg("--cleanup"));
        }
        for tool in ["iptables", "ip6tables"] {
            remove_chains(tool);
        }
        if Path::new("/sys/class/net").join(BRIDGE).exists() {
            let _ = shell::output(Command::new("ip").args(["link", "del", BRIDGE]));
        }
        self.unmount_all();
        remove_cgroups();
        for path in saved["absent"].as_array().into_iter().flatten().filter_map(|p| p.as_str()) {
            let _ = fs::remove_dir_all(path);
        }
        for (key, value) in saved["sysctls"].as_object().into_iter().flatten() {
            if let Some(value) = value.as_str() {
                let _ = fs::write(Path::new("/proc/sys").join(key), value);
            }
        }
        fs::remove_file(self.host_file())?;
        Ok(())
    }

    /// Unmounts whatever the node mounted in its state directory or in host paths (netns,
    /// volumes, overlay roots, shm), deepest first.
    fn unmount_all(&self) {
        let roots = [self.dir.display().to_string(), "/run/containerd".into(), "/var/lib/kubelet".into()];
        let mut points: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
            .filter(|p| roots.iter().any(|r| p.starts_with(r.as_str())))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for point in points {
            let _ = shell::output(Command::new("umount").arg("--lazy").arg(&point));
        }
    }

    fn bin_dir(&self) -> PathBuf {
        cache_dir().join("k8s").join(KUBE_VERSION)
    }

    fn write_pki(&self, node_ip: Ipv4Addr, ports: &Ports) -> Result<()> {
        let pki = self.run_dir().join("pki");
        fs::create_dir_all(&pki)?;
        let ca = Authority::new("supermesh-cluster-ca", &pki.join("ca"))?;
        let front = Authority::new("supermesh-front-proxy-ca", &pki.join("front-proxy-ca"))?;
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let apiserver_names: Vec<SanType> = ["kubernetes", "kubernetes.default", "kubernetes.default.svc"]
            .into_iter()
            .chain(["kubernetes.default.svc.cluster.local", "localhost"])
            .map(|n| Ok(SanType::DnsName(n.try_into()?)))
            .chain([loopback, IpAddr::V4(SERVICE_IP), IpAddr::V4(node_ip)].map(|ip| Ok(SanType::IpAddress(ip))))
            .collect::<Result<_>>()?;
        ca.issue(&pki.join("apiserver"), "kube-apiserver", None, apiserver_names, ExtendedKeyUsagePurpose::ServerAuth)?;
        let client = ExtendedKeyUsagePurpose::ClientAuth;
        ca.issue(
            &pki.join("apiserver-kubelet-client"),
            "kube-apiserver-kubelet-client",
            Some("system:masters"),
            vec![],
            client.clone(),
        )?;
        front.issue(&pki.join("front-proxy-client"), "front-proxy-client", None, vec![], client.clone())?;
        let sa = KeyPair::generate()?;
        write_private(&pki.join("sa.key"), &sa.serialize_pem())?;
        fs::write(pki.join("sa.pub"), sa.public_key_pem())?;

        let server = format!("https://{node_ip}:{}", ports.apiserver);
        let users = [
            ("controller-manager", "system:kube-controller-manager", None),
            ("scheduler", "system:kube-scheduler", None),
            ("kubelet", &*format!("system:node:{NODE}"), Some("system:nodes")),
            ("kube-proxy", "system:kube-proxy", None),
        ];
        for (file, user, group) in users {
            let key = pki.join(file);
            ca.issue(&key, user, group, vec![], client.clone())?;
            let user = format!("client-certificate: {}.crt\n    client-key: {}.key", key.display(), key.display());
            write_private(&self.run_dir().join(format!("{file}.kubeconfig")), &kubeconfig(&server, &pki, &user))?;
        }
        // The admin presents a bearer token (as with a cloud provider's kubeconfig), which the
        // controller's /logs can check with a TokenReview.
        let token = hex_token()?;
        write_private(&self.run_dir().join("tokens.csv"), &format!("{token},admin,admin,system:masters\n"))?;
        write_private(&self.kubeconfig(), &kubeconfig(&server, &pki, &format!("token: {token}")))?;
        Ok(())
    }

    fn containerd_config(&self) -> String {
        let run = self.run_dir().display();
        format!(
            r#"version = 2
root = "{run}/containerd/root"
state = "{run}/containerd/state"
[grpc]
  address = "{run}/containerd/containerd.sock"
[ttrpc]
  address = "{run}/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{run}/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # This kind of VM withholds CAP_SYS_RESOURCE even from root: runc cannot set
  # oom_score_adj below the runtime's own, and every sandbox would fail.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{run}/cni/net.d"
"#
        )
    }

    fn cni_config(&self) -> String {
        serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "supermesh",
            "plugins": [
                {
                    "type": "bridge", "bridge": BRIDGE, "isGateway": true, "ipMasq": true, "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": self.run_dir().join("cni/ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
            ],
        })
        .to_string()
    }

    fn kubelet_config(&self, ports: &Ports) -> String {
        let run = self.run_dir().display();
        format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failSwapOn: false
address: 0.0.0.0
port: {}
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: {}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {run}/pki/ca.crt}}
authorization: {{mode: Webhook}}
# Imported images cannot be pulled again: never collect them.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}}
volumePluginDir: {run}/volume-plugins
resolvConf: /etc/resolv.conf
"#,
            ports.kubelet, ports.kubelet_healthz
        )
    }

    fn proxy_config(&self, ports: &Ports) -> String {
        let run = self.run_dir().display();
        format!(
            r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {{kubeconfig: {run}/kube-proxy.kubeconfig}}
mode: iptables
clusterCIDR: {POD_CIDR}
hostnameOverride: {NODE}
healthzBindAddress: 127.0.0.1:{}
metricsBindAddress: 127.0.0.1:{}
# Leave the host's conntrack settings alone.
conntrack: {{maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}
"#,
            ports.proxy_healthz, ports.proxy_metrics
        )
    }
}

fn kubeconfig(server: &str, pki: &Path, user: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: supermesh\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: user\n  user:\n    {user}\ncontexts:\n- name: supermesh\n  context:\n    cluster: supermesh\n    user: user\ncurrent-context: supermesh\n",
        pki.join("ca.crt").display()
    )
}

/// A CA written as `<path>.crt`/`<path>.key` that issues the cluster's certificates.
struct Authority {
    issuer: Issuer<'static, KeyPair>,
}

impl Authority {
    fn new(name: &str, path: &Path) -> Result<Authority> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        fs::write(path.with_extension("crt"), cert.pem())?;
        write_private(&path.with_extension("key"), &key.serialize_pem())?;
        Ok(Authority { issuer: Issuer::new(params, key) })
    }

    /// Writes `<path>.crt`/`<path>.key`: CN `user`, O `group`.
    fn issue(
        &self,
        path: &Path,
        user: &str,
        group: Option<&str>,
        names: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<()> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, user);
        if let Some(group) = group {
            params.distinguished_name.push(DnType::OrganizationName, group);
        }
        params.subject_alt_names = names;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        fs::write(path.with_extension("crt"), cert.pem())?;
        write_private(&path.with_extension("key"), &key.serialize_pem())?;
        Ok(())
    }
}

/// Installs the node's runtime packages when missing and builds (once) the Kubernetes
/// binaries; returns the directory holding them.
fn ensure_tools() -> Result<PathBuf> {
    let wanted = [
        ("containerd", "containerd"),
        ("runc", "runc"),
        ("iptables", "iptables"),
        ("conntrack", "conntrack"),
        ("etcd", "etcd-server"),
        ("kubectl", "kubernetes-client"),
    ];
    let mut missing: Vec<&str> = wanted.iter().filter(|(p, _)| !has(p)).map(|(_, package)| *package).collect();
    if !Path::new("/usr/lib/cni/bridge").exists() {
        missing.push("containernetworking-plugins");
    }
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    let bin = cache_dir().join("k8s").join(KUBE_VERSION);
    let names = ["kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "pause"];
    if names.iter().any(|n| !bin.join(n).exists()) {
        eprintln!(
            "==> building Kubernetes {KUBE_VERSION} node components from Debian's source package (once, about 15 \
             minutes; cached in {})",
            bin.display()
        );
        shell::run(Command::new("bash").arg("-c").arg(crate::controlplane::BUILD_SCRIPT).arg("build-kube").arg(&bin).args(names))
            .context("building the Kubernetes components failed; see the output above (it needs root, Debian's source archive and about 4 GB of free disk)")?;
    }
    Ok(bin)
}

/// The host's address on its default route: what Pods reach the API server at.
fn node_ip() -> Result<Ipv4Addr> {
    let route = shell::output(Command::new("ip").args(["-4", "route", "show", "default"]))?;
    let device = route.split_whitespace().skip_while(|w| *w != "dev").nth(1);
    let addrs = match device {
        Some(dev) => shell::output(Command::new("ip").args(["-4", "-o", "addr", "show", "dev", dev]))?,
        None => shell::output(Command::new("ip").args(["-4", "-o", "addr", "show", "scope", "global"]))?,
    };
    addrs
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next()?.parse().ok())
        .context("this host has no IPv4 address besides loopback for the node and its API server")
}

/// Removes the KUBE-* and CNI-* chains of every table, and the rules that jump to them.
fn remove_chains(tool: &str) {
    let owned = |chain: &str| chain.starts_with("KUBE-") || chain.starts_with("CNI-");
    for table in ["filter", "nat", "mangle"] {
        let Ok(rules) = shell::output(Command::new(tool).args(["-t", table, "-S"])) else { continue };
        let mut chains = Vec::new();
        for line in rules.lines() {
            if let Some(chain) = line.strip_prefix("-N ").filter(|c| owned(c)) {
                chains.push(chain.to_owned());
            } else if let Some(rule) = line.strip_prefix("-A ") {
                let chain = rule.split_whitespace().next().unwrap_or_default();
                let jumps = rule.split_whitespace().skip_while(|w| *w != "-j").nth(1).is_some_and(owned);
                if !owned(chain) && jumps {
                    // `-S` prints rules quoted for a shell.
                    let _ = shell::output(Command::new("sh").arg("-c").arg(format!("{tool} -t {table} -D {rule}")));
                }
            }
        }
        for chain in &chains {
            let _ = shell::output(Command::new(tool).args(["-t", table, "-F", chain]));
        }
        for chain in &chains {
            let _ = shell::output(Command::new(tool).args(["-t", table, "-X", chain]));
        }
    }
}

/// Removes the kubelet's `kubepods` cgroups, innermost first (a cgroup goes only when empty).
fn remove_cgroups() {
    fn remove(dir: &Path) {
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    remove(&entry.path());
                }
            }
        }
        let _ = fs::remove_dir(dir);
    }
    let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") else { return };
    for hierarchy in hierarchies.flatten() {
        let pods = hierarchy.path().join("kubepods");
        if pods.exists() {
            remove(&pods);
        }
    }
}
