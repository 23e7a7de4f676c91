//! Running commands with errors that say what failed and how to fix it.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

/// Root of the workspace (the directory holding the top Cargo.toml).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Cargo's target directory for this workspace.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace_root().join("target"))
}

/// The cargo that runs this xtask.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs `cmd` with inherited output; fails naming the command and its exit status.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("cannot start {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` and returns its standard output; on failure the error includes its standard error.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("cannot start {}", describe(cmd)))?;
    if !out.status.success() {
        bail!("{} failed ({}): {}", describe(cmd), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `program` is on PATH.
pub fn has(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Installs Debian packages, running `apt-get update` once per xtask run.
pub fn apt_install(packages: &[&str]) -> Result<()> {
    static UPDATED: OnceLock<()> = OnceLock::new();
    eprintln!("==> installing {} with apt-get", packages.join(" "));
    if UPDATED.get().is_none() {
        run(Command::new("apt-get").args(["update", "-qq"]))
            .context("apt-get update failed: supermesh needs root and access to Debian's package archive")?;
        let _ = UPDATED.set(());
    }
    run(Command::new("apt-get").args(["install", "-y", "-qq"]).args(packages).env("DEBIAN_FRONTEND", "noninteractive"))
        .with_context(|| {
            format!("cannot install {}: run `apt-get install {}` as root", packages.join(" "), packages.join(" "))
        })
}

/// Installs `package` when `program` is missing.
pub fn ensure_program(program: &str, package: &str) -> Result<()> {
    if !has(program) {
        apt_install(&[package])?;
    }
    Ok(())
}

/// Installs `krate` at `version` from crates.io with `cargo install --locked` unless
/// `cargo <subcommand> --version` already says it is that version.
pub fn ensure_cargo_tool(subcommand: &str, krate: &str, version: &str) -> Result<()> {
    let installed = output(cargo().args([subcommand, "--version"])).unwrap_or_default();
    if installed.split_whitespace().nth(1) == Some(version) {
        return Ok(());
    }
    let mut install = cargo();
    install.args(["install", krate, "--version", version, "--locked"]);
    if installed.is_empty() {
        eprintln!("==> installing {krate} {version}");
    } else {
        eprintln!("==> installing {krate} {version} in place of {}", installed.trim());
        install.arg("--force");
    }
    run(&mut install).with_context(|| format!("cannot install {krate}: it comes from crates.io"))
}

fn describe(cmd: &Command) -> String {
    let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    format!("`{} {}`", cmd.get_program().to_string_lossy(), args.join(" "))
}
