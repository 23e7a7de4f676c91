//! `cargo xtask fuzz`: the coverage-guided fuzz targets of fuzz/ (cargo fuzz and
//! libFuzzer), built and run one after another, each from its corpus. A crash, hang or
//! out-of-memory fails the run, naming the input libFuzzer saved for it.
//!
//! Stable Rust builds them: without a sanitizer (`--sanitizer none`: the code is safe
//! Rust, and what the fuzzer looks for is a panic) cargo fuzz passes rustc only stable
//! flags (the sancov passes and `--cfg fuzzing`), so neither a nightly toolchain nor
//! RUSTC_BOOTSTRAP is needed. Debug assertions are on: an arithmetic overflow is a finding.
//!
//! Each target reads the committed corpus `fuzz/corpus/<target>/` (and the dictionary
//! `fuzz/dict/<target>.dict`, if there is one) and writes what it finds new to
//! `fuzz/target/corpus/<target>/`, which later runs start from too; `--merge` adds to
//! the committed corpus the new inputs that reach new code.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::shell::{self, cargo};

/// The cargo-fuzz release the fuzz/ project is laid out for.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Seconds each target runs in `cargo xtask test`.
pub const TEST_SECONDS: u64 = 15;
/// Seconds one input may take before libFuzzer reports it as a hang.
const INPUT_TIMEOUT_SECONDS: u64 = 10;
/// Prefixes of the files libFuzzer writes for what it finds.
const FINDINGS: [&str; 4] = ["crash-", "timeout-", "oom-", "leak-"];

/// What one target's run did.
struct Outcome {
    target: String,
    executions: u64,
    new_inputs: u64,
    seconds: u64,
    /// Inputs that crash, hang or run out of memory, as libFuzzer saved them.
    findings: Vec<PathBuf>,
}

/// Builds the targets and runs each of `targets` (all when empty) for `seconds`; with
/// `merge`, adds what they found new to the committed corpus. Fails on any finding.
pub fn run(seconds: u64, merge: bool, targets: &[String]) -> Result<()> {
    if seconds == 0 {
        bail!("--seconds must be at least 1");
    }
    shell::ensure_cargo_tool("fuzz", "cargo-fuzz", CARGO_FUZZ_VERSION)?;
    let all = list()?;
    let unknown: Vec<&String> = targets.iter().filter(|t| !all.contains(t)).collect();
    if !unknown.is_empty() {
        bail!("no fuzz target {unknown:?}; the targets are {}", all.join(", "));
    }
    let targets = if targets.is_empty() { all } else { targets.to_vec() };
    let binaries = build()?;
    let mut outcomes = Vec::new();
    for target in &targets {
        let outcome = fuzz(&binaries, target, seconds)?;
        if merge && outcome.findings.is_empty() {
            merge_corpus(&binaries, target)?;
        }
        outcomes.push(outcome);
    }
    eprintln!("\n{:<18} {:>12} {:>8} {:>10} {:>8}", "target", "executions", "seconds", "new inputs", "crashes");
    for o in &outcomes {
        eprintln!(
            "{:<18} {:>12} {:>8} {:>10} {:>8}",
            o.target,
            o.executions,
            o.seconds,
            o.new_inputs,
            o.findings.len()
        );
    }
    let findings: Vec<String> = outcomes
        .iter()
        .flat_map(|o| o.findings.iter().map(move |f| format!("  {}: {}", o.target, f.display())))
        .collect();
    if !findings.is_empty() {
        bail!(
            "the fuzzers found inputs that crash, hang or exhaust memory:\n{}\nreplay one with \
             `{}/<target> <input>`; fix the code, add a regression test next to it, then delete the input",
            findings.join("\n"),
            binaries.display()
        );
    }
    Ok(())
}

fn fuzz_dir() -> PathBuf {
    shell::workspace_root().join("fuzz")
}

/// Cargo in fuzz/, without what `cargo run` told this xtask about itself: build scripts
/// (ring's, for one) rebuild when `CARGO_MANIFEST_DIR` changes, so a build by hand and one
/// by the xtask would each rebuild everything.
fn fuzz_cargo() -> Command {
    let mut cmd = cargo();
    cmd.current_dir(fuzz_dir());
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let own = [
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_NAME",
            "CARGO_PRIMARY_PACKAGE",
        ];
        if own.contains(&name.as_ref()) || name.starts_with("CARGO_PKG_") {
            cmd.env_remove(name.as_ref());
        }
    }
    cmd
}

/// The fuzz targets fuzz/Cargo.toml declares.
fn list() -> Result<Vec<String>> {
    let listed = shell::output(fuzz_cargo().args(["fuzz", "list"]))?;
    Ok(listed.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect())
}

/// Builds every target (optimized, instrumented, debug assertions on) and returns the
/// directory of their binaries.
fn build() -> Result<PathBuf> {
    let rustc = shell::output(Command::new("rustc").arg("-vV"))?;
    let host = rustc
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .context("`rustc -vV` names no host triple")?
        .trim()
        .to_owned();
    let target_dir = fuzz_dir().join("target");
    eprintln!("==> building the fuzz targets (the first build takes about 10 minutes)");
    shell::run(
        fuzz_cargo()
            .args(["fuzz", "build", "--sanitizer", "none", "--debug-assertions", "--target", &host, "--target-dir"])
            .arg(&target_dir),
    )
    .context("cannot build the fuzz targets; see the output above")?;
    Ok(target_dir.join(host).join("release"))
}

/// Replays what earlier runs of `target` found, then fuzzes it for `seconds`.
fn fuzz(binaries: &Path, target: &str, seconds: u64) -> Result<Outcome> {
    let binary = binaries.join(target);
    let corpus = fuzz_dir().join("corpus").join(target);
    let found = fuzz_dir().join("target").join("corpus").join(target);
    let artifacts = fuzz_dir().join("artifacts").join(target);
    let logs = fuzz_dir().join("target").join("logs");
    for dir in [&corpus, &found, &artifacts, &logs] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut outcome =
        Outcome { target: target.to_owned(), executions: 0, new_inputs: 0, seconds: 0, findings: Vec::new() };
    for earlier in earlier_findings(&artifacts)? {
        let log = logs.join(format!("{target}.replay.log"));
        let replay = [earlier.clone().into_os_string(), format!("-timeout={INPUT_TIMEOUT_SECONDS}").into()];
        if !libfuzzer(&binary, target, &replay, &log)? {
            eprintln!("==> {target}: {} still fails (log: {})", earlier.display(), log.display());
            outcome.findings.push(earlier);
        }
    }
    if !outcome.findings.is_empty() {
        return Ok(outcome);
    }
    eprintln!("==> fuzzing {target} for {seconds} s");
    let log = logs.join(format!("{target}.log"));
    let mut prefix = OsString::from("-artifact_prefix=");
    prefix.push(&artifacts);
    prefix.push("/");
    let mut args = vec![
        found.into_os_string(),
        corpus.into_os_string(),
        format!("-max_total_time={seconds}").into(),
        format!("-timeout={INPUT_TIMEOUT_SECONDS}").into(),
        "-print_final_stats=1".into(),
        prefix,
    ];
    // Tokens of the input's format (and numbers at the edges of integer types), which
    // mutations of bytes take long to reach in a text format.
    let dictionary = fuzz_dir().join("dict").join(format!("{target}.dict"));
    if dictionary.exists() {
        let mut arg = OsString::from("-dict=");
        arg.push(&dictionary);
        args.push(arg);
    }
    let started = Instant::now();
    let passed = libfuzzer(&binary, target, &args, &log)?;
    outcome.seconds = started.elapsed().as_secs();
    let text = std::fs::read_to_string(&log).with_context(|| format!("cannot read {}", log.display()))?;
    let stat =
        |name: &str| text.lines().find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok()).unwrap_or_default();
    outcome.executions = stat("stat::number_of_executed_units:");
    outcome.new_inputs = stat("stat::new_units_added:");
    outcome.findings = text
        .lines()
        .filter_map(|l| l.split_once("Test unit written to ").map(|(_, path)| PathBuf::from(path.trim())))
        .collect();
    if !passed || !outcome.findings.is_empty() {
        eprintln!("==> {target} failed; the end of {}:", log.display());
        let from = text.lines().position(|l| l.contains("panicked at") || l.contains("ERROR: libFuzzer"));
        for line in text.lines().skip(from.unwrap_or(0)).take(40) {
            eprintln!("    {line}");
        }
        if outcome.findings.is_empty() {
            bail!("the fuzz target {target} failed without saving an input; see {}", log.display());
        }
    } else {
        eprintln!(
            "    {target}: {} executions in {} s, {} new inputs, no crash",
            outcome.executions, outcome.seconds, outcome.new_inputs
        );
    }
    Ok(outcome)
}

/// Inputs earlier runs saved for crashes, hangs and out-of-memory, oldest name first.
fn earlier_findings(artifacts: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(artifacts).with_context(|| format!("cannot read {}", artifacts.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if FINDINGS.iter().any(|p| name.starts_with(p)) {
            found.push(entry.path());
        }
    }
    found.sort();
    Ok(found)
}

/// Adds to the committed corpus of `target` the inputs found since that reach new code.
fn merge_corpus(binaries: &Path, target: &str) -> Result<()> {
    let corpus = fuzz_dir().join("corpus").join(target);
    let found = fuzz_dir().join("target").join("corpus").join(target);
    let log = fuzz_dir().join("target").join("logs").join(format!("{target}.merge.log"));
    let before = files(&corpus)?;
    let args = ["-merge=1".into(), corpus.clone().into_os_string(), found.into_os_string()];
    if !libfuzzer(&binaries.join(target), target, &args, &log)? {
        bail!("merging the corpus of {target} failed; see {}", log.display());
    }
    let bytes: u64 = std::fs::read_dir(&corpus)?.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum();
    let after = files(&corpus)?;
    eprintln!("    {target}: {} inputs added to {} ({after} inputs, {bytes} bytes)", after - before, corpus.display());
    Ok(())
}

fn files(dir: &Path) -> Result<usize> {
    Ok(std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?.count())
}

/// Runs the libFuzzer binary of `target` with `args`, its output in `log`, in a scratch
/// temporary directory of its own (removed after); whether it exited successfully.
fn libfuzzer(binary: &Path, target: &str, args: &[OsString], log: &Path) -> Result<bool> {
    let scratch = match Path::new("/dev/shm").is_dir() {
        // The targets write files (unpacked archives, a SQLite store): memory is faster.
        true => PathBuf::from(format!("/dev/shm/supermesh-fuzz-{target}-{}", std::process::id())),
        false => fuzz_dir().join("target").join("tmp").join(target),
    };
    std::fs::create_dir_all(&scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
    let file = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let status = Command::new(binary)
        .args(args)
        .current_dir(shell::workspace_root())
        .env("TMPDIR", &scratch)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .with_context(|| format!("cannot start {}", binary.display()));
    remove_all(&scratch);
    Ok(status?.success())
}

/// Removes `dir` whatever the modes of what is in it (an unpacked archive may make a
/// directory unwritable).
fn remove_all(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::remove_dir_all(dir).is_ok() {
        return;
    }
    fn writable(dir: &Path) {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                writable(&entry.path());
            }
        }
    }
    writable(dir);
    if let Err(e) = std::fs::remove_dir_all(dir) {
        eprintln!("warning: cannot remove {}: {e}", dir.display());
    }
}
