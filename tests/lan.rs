//! Networks of agents in their own network namespaces: a Linux bridge per network
//! in the host namespace, one namespace per device joined to it by a veth pair.
//! The host keeps the gateway address `10.77.<subnet>.1` on each bridge, which is
//! where the cloudhub is reached; removing it cuts that network off from the cloud
//! while its devices still reach each other through the bridge.
//!
//! Creating namespaces needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN).

use std::process::Command;

/// One network: a bridge and its devices' namespaces.
pub struct Lan {
    /// Network name, as the agents' `node.network`.
    pub network: String,
    /// The devices, in order.
    pub hosts: Vec<Host>,
    bridge: String,
    subnet: u8,
}

/// One device's network namespace.
#[derive(Debug, Clone)]
pub struct Host {
    /// Name of the network namespace.
    pub netns: String,
    /// The device's address.
    pub ip: String,
}

/// Runs `ip args`, panicking with its error output on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip (iproute2)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Runs `ip args` inside namespace `netns`.
fn ip_in(netns: &str, args: &[&str]) {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    ip(&all);
}

/// Fails the test with a clear message unless it runs as root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces, bridges and veth pairs: run it as root (CI does)"
    );
}

/// Removes namespaces and bridges left by earlier test processes that died without cleaning up.
fn remove_stale() {
    let alive = |pid: &str| std::path::Path::new("/proc").join(pid).exists();
    let me = std::process::id().to_string();
    let out = Command::new("ip").args(["netns", "list"]).output().map(|o| o.stdout).unwrap_or_default();
    for name in String::from_utf8_lossy(&out).lines().filter_map(|l| l.split_whitespace().next()) {
        if let Some(pid) = name.strip_prefix("sm-").and_then(|r| r.split('-').next()) {
            if pid != me && !alive(pid) {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    let out = Command::new("ip").args(["-o", "link", "show", "type", "bridge"]).output().map(|o| o.stdout);
    for line in String::from_utf8_lossy(&out.unwrap_or_default()).lines() {
        let Some(name) = line.split(": ").nth(1).map(|n| n.split('@').next().unwrap_or(n)) else { continue };
        if let Some(pid) = name.strip_prefix("smb").and_then(|r| r.split('-').next()) {
            if pid != me && !alive(pid) {
                let _ = Command::new("ip").args(["link", "del", name]).status();
            }
        }
    }
}

impl Lan {
    /// Creates network `network` on subnet `10.77.<subnet>.0/24` with `hosts` devices.
    pub fn create(network: &str, subnet: u8, hosts: usize) -> Lan {
        require_root();
        remove_stale();
        let pid = std::process::id();
        let bridge = format!("smb{pid}-{subnet}");
        assert!(bridge.len() <= 15, "interface name {bridge} is too long");
        let mut lan = Lan { network: network.into(), hosts: vec![], bridge: bridge.clone(), subnet };
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{}/24", lan.gateway()), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        for i in 0..hosts {
            let netns = format!("sm-{pid}-{subnet}-{i}");
            let host_ip = format!("10.77.{subnet}.{}", 10 + i);
            let veth = format!("smv{pid}{subnet}{i}");
            ip(&["netns", "add", &netns]);
            lan.hosts.push(Host { netns: netns.clone(), ip: host_ip.clone() });
            ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &netns]);
            ip(&["link", "set", &veth, "master", &bridge]);
            ip(&["link", "set", &veth, "up"]);
            ip_in(&netns, &["link", "set", "lo", "up"]);
            ip_in(&netns, &["addr", "add", &format!("{host_ip}/24"), "dev", "eth0"]);
            ip_in(&netns, &["link", "set", "eth0", "up"]);
            ip_in(&netns, &["route", "add", "default", "via", &lan.gateway()]);
        }
        lan
    }

    /// The host's address on this network: where the devices reach the cloudhub.
    pub fn gateway(&self) -> String {
        format!("10.77.{}.1", self.subnet)
    }

    /// Cuts the network off from the cloud: the host drops its address on the bridge.
    /// Devices still reach each other.
    pub fn cut_cloud(&self) {
        ip(&["addr", "del", &format!("{}/24", self.gateway()), "dev", &self.bridge]);
    }

    /// Connects the network to the cloud again.
    pub fn restore_cloud(&self) {
        ip(&["addr", "add", &format!("{}/24", self.gateway()), "dev", &self.bridge]);
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for host in &self.hosts {
            // Deleting the namespace deletes its end of the veth pair, and so the pair.
            let _ = Command::new("ip").args(["netns", "del", &host.netns]).status();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).status();
    }
}

/// Runs `f` on a thread inside network namespace `netns`: sockets it opens live there.
pub fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("enter {path}: {e}"));
        f()
    })
    .join()
    .expect("the thread inside the namespace panicked")
}
