//! The Debian package of the agent, installed with dpkg into a throwaway root: what it
//! installs, that its binary joins a device and runs with what `join` wrote, and that
//! removing and purging it take away what they should.
//!
//! The root is empty but for dpkg's database, so the package's dependencies are not in it
//! (`--force-depends`), and its maintainer scripts cannot run chrooted into it (no shell
//! there). They run outside it instead (`--force-script-chrootless`), with `DPKG_ROOT` set
//! to the root, as when an image is built from outside: the scripts honour `DPKG_ROOT` and
//! act on the root only (the user is created there by systemd-sysusers, as adduser cannot
//! act on another root), and a `policy-rc.d` in the root keeps the systemd helpers from
//! starting or stopping anything on this host.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const JOIN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.abc123.s3cret0s3cret0ab";

/// The package under test, built by `cargo xtask test` (or `cargo xtask package`).
fn deb() -> PathBuf {
    let deb = std::env::var_os("SUPERMESH_AGENT_DEB").map(PathBuf::from).expect(
        "SUPERMESH_AGENT_DEB names the supermesh-agent .deb to install: run `cargo xtask test`, which builds it, \
         or set it to the path `cargo xtask package` prints",
    );
    assert!(deb.is_file(), "SUPERMESH_AGENT_DEB={} is not a file: run `cargo xtask package`", deb.display());
    deb
}

/// Runs `command`, failing the test with its output unless it succeeds.
fn succeed(command: &mut Command) -> Output {
    let output = command.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A throwaway root holding an empty dpkg database.
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn new() -> Root {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let root = Root { dir };
        for sub in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "var/log", "usr/sbin"] {
            std::fs::create_dir_all(root.path(sub)).unwrap();
        }
        std::fs::write(root.path("var/lib/dpkg/status"), "").unwrap();
        std::fs::write(root.path("var/lib/dpkg/available"), "").unwrap();
        // Service actions are for a booted system: deb-systemd-invoke asks this and does nothing.
        let policy = root.path("usr/sbin/policy-rc.d");
        std::fs::write(&policy, "#!/bin/sh\nexit 101\n").unwrap();
        std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o755)).unwrap();
        root
    }

    /// `relative` inside the root.
    fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    /// dpkg acting on this root, its scripts run from outside it.
    fn dpkg(&self) -> Command {
        let mut dpkg = Command::new("dpkg");
        dpkg.arg(format!("--root={}", self.dir.path().display()))
            .arg(format!("--log={}", self.path("var/log/dpkg.log").display()))
            .args(["--force-script-chrootless", "--force-not-root", "--force-depends"]);
        dpkg
    }

    /// The package's state in this root's database, e.g. `install ok installed`.
    fn status(&self) -> String {
        let output = self.dpkg().args(["--status", "supermesh-agent"]).output().expect("dpkg --status");
        let text = stdout(&output);
        text.lines().find_map(|l| l.strip_prefix("Status: ")).unwrap_or("not-installed").to_owned()
    }
}

/// Runs the agent with `config` until it has loaded it and is starting, then stops it.
fn starts_with(agent: &Path, config: &Path, log: &Path) {
    let mut child = Command::new(agent)
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("the installed agent starts");
    let deadline = Instant::now() + supermesh_tests::DEADLINE;
    let started = loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("supermesh-agent starting") {
            break Ok(());
        }
        if let Some(status) = child.try_wait().unwrap() {
            break Err(format!("the agent exited ({status}):\n{text}"));
        }
        if Instant::now() > deadline {
            break Err(format!("the agent did not start within {:?}:\n{text}", supermesh_tests::DEADLINE));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let _ = child.wait();
    if let Err(why) = started {
        panic!("{why}");
    }
}

#[test]
fn the_package_installs_joins_runs_and_removes() {
    let deb = deb();
    let depends = stdout(&succeed(Command::new("dpkg-deb").arg("--field").arg(&deb).arg("Depends")));
    assert!(depends.contains("libc6") && depends.contains("adduser"), "Depends: {depends}");

    let root = Root::new();
    succeed(root.dpkg().arg("--install").arg(&deb));
    assert_eq!(root.status(), "install ok installed");

    // The binary, of this version.
    let agent = root.path("usr/bin/supermesh-agent");
    let mode = std::fs::metadata(&agent).expect("usr/bin/supermesh-agent is installed").permissions().mode();
    assert_eq!(mode & 0o777, 0o755, "{mode:o}");
    let version = stdout(&succeed(Command::new(&agent).arg("--version")));
    assert_eq!(version.trim(), format!("supermesh-agent {}", env!("CARGO_PKG_VERSION")));

    // The unit, installed but not enabled: the device joins first.
    let unit = std::fs::read_to_string(root.path("usr/lib/systemd/system/supermesh-agent.service"))
        .expect("the unit is installed");
    for line in [
        "ExecStart=/usr/bin/supermesh-agent --config /etc/supermesh/edge.yaml",
        "ConditionPathExists=/etc/supermesh/edge.yaml",
        "User=supermesh",
        "KillMode=process",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line:?}:\n{unit}");
    }
    assert!(!root.path("etc/systemd/system/multi-user.target.wants/supermesh-agent.service").exists());

    // The service user, made in the root (by systemd-sysusers, where this host has it), not on this host.
    if Command::new("systemd-sysusers").arg("--version").output().is_ok_and(|o| o.status.success()) {
        let passwd = std::fs::read_to_string(root.path("etc/passwd")).unwrap_or_default();
        assert!(passwd.lines().any(|l| l.starts_with("supermesh:")), "no user supermesh in the root:\n{passwd}");
    }

    // The commented example, and no edge.yaml: `join` writes that.
    let example = std::fs::read_to_string(root.path("etc/supermesh/edge.yaml.example")).expect("the example");
    let source = supermesh_tests::workspace().join("examples/agent/edge.yaml");
    assert_eq!(example, std::fs::read_to_string(source).unwrap());
    let config = root.path("etc/supermesh/edge.yaml");
    assert!(!config.exists(), "the package installs no edge.yaml");

    let listed = stdout(&succeed(root.dpkg().args(["--listfiles", "supermesh-agent"])));
    for path in [
        "/usr/bin/supermesh-agent",
        "/usr/lib/systemd/system/supermesh-agent.service",
        "/etc/supermesh/edge.yaml.example",
        "/usr/share/doc/supermesh-agent/README",
        "/usr/share/doc/supermesh-agent/copyright",
    ] {
        assert!(listed.lines().any(|l| l == path), "dpkg -L lacks {path}:\n{listed}");
    }

    // Joining with the installed binary, as a user does after installing.
    let data_dir = root.path("var/lib/supermesh");
    let join = |name: &str| {
        let mut join = Command::new(&agent);
        join.args(["join", "--no-run", "--cloud", "127.0.0.1:1", "--token", JOIN, "--name", name]);
        join.args(["--account", "acme", "--network", "home", "--location", "48.8566,2.3522"]);
        join.args(["--peer-listen", "127.0.0.1:0", "--api-listen", "127.0.0.1:0"]);
        join.arg("--config").arg(&config).arg("--data-dir").arg(&data_dir);
        join.stdin(Stdio::null()).output().unwrap()
    };
    let joined = join("pkg-test");
    assert!(joined.status.success(), "join failed: {}", String::from_utf8_lossy(&joined.stderr));
    let how = format!("start the agent with: supermesh-agent --config {}", config.display());
    assert!(stdout(&joined).contains(&how), "{}", stdout(&joined));
    let mode = std::fs::metadata(&config).expect("join wrote edge.yaml").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "edge.yaml holds the token: {mode:o}");
    // The installed binary reads what it wrote: joining again keeps it, joining as another node is refused.
    let again = join("pkg-test");
    assert!(again.status.success() && stdout(&again).contains("already joined as node pkg-test"));
    let other = join("pkg-other");
    assert!(!other.status.success(), "joined again as another node: {}", stdout(&other));
    assert!(String::from_utf8_lossy(&other.stderr).contains("already joined as node pkg-test"));
    starts_with(&agent, &config, &root.path("agent.log"));
    assert!(data_dir.join("identity/node.key").exists(), "the agent made its key in its dataDir");

    // Removing takes the program away and leaves the configuration and the device's state.
    succeed(root.dpkg().args(["--remove", "supermesh-agent"]));
    assert_eq!(root.status(), "deinstall ok config-files");
    assert!(!agent.exists(), "the binary is removed");
    assert!(!root.path("usr/lib/systemd/system/supermesh-agent.service").exists());
    assert!(config.exists() && data_dir.join("identity/node.key").exists(), "remove keeps the device's identity");

    // Purging takes the rest.
    succeed(root.dpkg().args(["--purge", "supermesh-agent"]));
    assert_eq!(root.status(), "not-installed");
    for gone in ["etc/supermesh", "var/lib/supermesh"] {
        assert!(!root.path(gone).exists(), "{gone} is left after purge");
    }
}
