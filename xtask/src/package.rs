//! `cargo xtask package`: the Debian package of the edge agent, built by cargo-deb from
//! `[package.metadata.deb]` in edge-agent/Cargo.toml and the files in packaging/, then
//! checked with lintian.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::shell::{self, cargo};

/// The cargo-deb release the packaging is written for: others lay out units and
/// maintainer scripts differently.
const CARGO_DEB_VERSION: &str = "3.8.0";

/// Environment variable naming the package for the tests that install it.
pub const ENV: &str = "SUPERMESH_AGENT_DEB";

/// Builds the package (a release build of supermesh-agent), fails if lintian finds an
/// error in it, and returns its path, `target/debian/supermesh-agent_<version>-1_<arch>.deb`.
pub fn build() -> Result<PathBuf> {
    check_changelog()?;
    shell::ensure_cargo_tool("deb", "cargo-deb", CARGO_DEB_VERSION)?;
    shell::ensure_program("lintian", "lintian")?;
    let arch = shell::output(Command::new("dpkg").arg("--print-architecture"))
        .context("packages are built on Debian or a derivative: dpkg is needed")?;
    let deb = shell::target_dir().join("debian").join(format!(
        "supermesh-agent_{}-1_{}.deb",
        env!("CARGO_PKG_VERSION"),
        arch.trim()
    ));
    eprintln!("==> building {} (a release build of supermesh-agent: minutes)", deb.display());
    // Their reports go to stderr: stdout is for the package's path alone.
    shell::run(
        cargo().args(["deb", "--locked", "-p", "supermesh-agent", "--output"]).arg(&deb).stdout(std::io::stderr()),
    )
    .context("cargo-deb failed; see the output above")?;
    eprintln!("==> lintian {}", deb.display());
    // Errors fail the build; warnings are shown. Tags that do not apply are overridden, each
    // with the reason, in packaging/lintian-overrides, which the package installs.
    shell::run(
        Command::new("lintian").args(["--fail-on", "error", "--display-info"]).arg(&deb).stdout(std::io::stderr()),
    )
    .context("lintian found errors in the package (above): fix them, or override a tag that does not apply")?;
    Ok(deb)
}

/// `cargo xtask package`: builds and checks the package, then prints its path.
pub fn run() -> Result<()> {
    let deb = build()?;
    eprintln!("==> to test it: {ENV}={} cargo nextest run -p supermesh-tests --test package", deb.display());
    println!("{}", deb.display());
    Ok(())
}

/// The changelog's newest entry is this version's: lintian sees that there is a changelog,
/// not that it is current.
fn check_changelog() -> Result<()> {
    let path = shell::workspace_root().join("packaging/debian/changelog");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let entry = format!("supermesh-agent ({}-1) ", env!("CARGO_PKG_VERSION"));
    if !text.starts_with(&entry) {
        bail!("{} does not start with an entry for {}: add one on top for this version", path.display(), entry.trim());
    }
    Ok(())
}
