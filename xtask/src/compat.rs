//! The agent of the previous release, for the end-to-end test that an agent one
//! minor protocol version older still works with this controller. Built once from
//! the release's commit in this repository's history, cached like kube-apiserver.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::shell;

/// The previous release of the agent: its version, the protocol it speaks, its commit.
pub struct Release {
    /// Agent version.
    pub version: &'static str,
    /// Protocol version its hello implies.
    pub protocol: &'static str,
    /// Commit it is built from.
    pub commit: &'static str,
}

/// supermesh 0.1.0, protocol 1.0: the last release before protocol versions were negotiated.
pub const PREVIOUS: Release =
    Release { version: "0.1.0", protocol: "1.0", commit: "146fffaccd3cfbd51c1451941fba4d7820e12a05" };

/// Environment variable naming the previous release's agent binary for the tests.
pub const ENV: &str = "SUPERMESH_PREVIOUS_AGENT";

/// The previous release's agent binary: `$SUPERMESH_PREVIOUS_AGENT`, else built once from
/// [`PREVIOUS`]'s commit (it must be in this clone's history) and cached.
pub fn previous_agent() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(ENV) {
        return Ok(PathBuf::from(path));
    }
    let cache = crate::controlplane::cache_dir().join("agent");
    let binary = cache.join(format!("{}-{}", PREVIOUS.version, &PREVIOUS.commit[..12])).join("supermesh-agent");
    if binary.exists() {
        return Ok(binary);
    }
    eprintln!(
        "==> building supermesh-agent {} (protocol {}) from commit {} (once; cached in {})",
        PREVIOUS.version,
        PREVIOUS.protocol,
        &PREVIOUS.commit[..12],
        cache.display()
    );
    let source = cache.join("source");
    let _ = std::fs::remove_dir_all(&source);
    std::fs::create_dir_all(&source).with_context(|| format!("cannot create {}", source.display()))?;
    let export = format!(
        "git -C '{}' archive --format=tar {} | tar -x -C '{}'",
        shell::workspace_root().display(),
        PREVIOUS.commit,
        source.display()
    );
    shell::run(Command::new("bash").args(["-o", "pipefail", "-c", &export])).with_context(|| {
        format!(
            "commit {} of release {} is not in this clone's history; fetch it, or set {ENV} to that agent's binary",
            PREVIOUS.commit, PREVIOUS.version
        )
    })?;
    let target = cache.join("target");
    shell::run(
        shell::cargo()
            .current_dir(&source)
            .args(["build", "--locked", "-p", "supermesh-agent", "--bin", "supermesh-agent"])
            .env("CARGO_TARGET_DIR", &target),
    )
    .context("building the previous release's agent failed; see the output above")?;
    let dir = binary.parent().expect("the binary has a directory");
    std::fs::create_dir_all(dir)?;
    std::fs::copy(target.join("debug/supermesh-agent"), &binary)
        .with_context(|| format!("cannot copy the built agent to {}", binary.display()))?;
    // The build tree is gigabytes; the binary is all the tests need.
    let _ = std::fs::remove_dir_all(&source);
    let _ = std::fs::remove_dir_all(&target);
    Ok(binary)
}
