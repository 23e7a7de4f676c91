//! Helm, to check the chart and install it: the `helm` on PATH when it is recent
//! enough, else Helm's own Go SDK (helm-python-sdk, which bundles Helm v4) behind
//! `scripts/helm.py`, a `helm` command line installed once in a virtualenv.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::shell;

/// The SDK release `scripts/helm.py` is written against.
const SDK: &str = "helm-python-sdk==0.2.2";
const WRAPPER: &str = include_str!("../scripts/helm.py");
/// The oldest Helm whose `lint`, `template` and `install` take what the docs and tests use.
const MINIMUM: (u32, u32) = (3, 13);

const CHART: &str = "charts/supermesh";

/// A `helm template` of the chart: its `--set` values, and a line its output must
/// hold, or must not when `present` is false.
struct Render {
    set: &'static [&'static str],
    line: &'static str,
    present: bool,
}

const RENDERS: &[Render] = &[
    Render { set: &[], line: "kind: PodDisruptionBudget", present: true },
    Render {
        set: &[
            "cloudhub.serviceType=NodePort",
            "cloudhub.nodePort=30350",
            "cloudhub.names={edge.example.com,203.0.113.7}",
        ],
        line: "nodePort: 30350",
        present: true,
    },
    Render { set: &["serviceMonitor.enabled=true"], line: "kind: ServiceMonitor", present: true },
    // One replica cannot stay available through a drain: no budget that would block it.
    Render { set: &["replicas=1"], line: "kind: PodDisruptionBudget", present: false },
];

/// `cargo xtask helm -- ARGS`: runs helm with ARGS and exits with its status.
pub fn run(args: &[String]) -> Result<()> {
    let helm = ensure_helm()?.join("helm");
    let status = Command::new(&helm).args(args).status().with_context(|| format!("cannot start {}", helm.display()))?;
    if !status.success() {
        // helm has said what failed; its status is all there is to add.
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

/// The chart lints clean under `--strict`, renders with the values users reach for,
/// and its schema refuses a bad value.
pub fn check_chart() -> Result<()> {
    let binary = ensure_helm()?.join("helm");
    let helm = || {
        let mut cmd = Command::new(&binary);
        cmd.current_dir(shell::workspace_root());
        cmd
    };
    shell::run(helm().args(["lint", "--strict", CHART]))?;
    for render in RENDERS {
        let mut cmd = helm();
        cmd.args(["template", "supermesh", CHART, "--namespace", "supermesh"]);
        for value in render.set {
            cmd.args(["--set", value]);
        }
        let manifests = shell::output(&mut cmd)?;
        if manifests.lines().any(|l| l.trim() == render.line) != render.present {
            let verb = if render.present { "lacks" } else { "has" };
            bail!("{CHART} with --set {:?} {verb} `{}`", render.set, render.line);
        }
    }
    if shell::output(helm().args(["template", "supermesh", CHART, "--set", "cloudhub.port=abc"])).is_ok() {
        bail!("{CHART} renders with cloudhub.port=abc: values.schema.json does not check its values");
    }
    Ok(())
}

/// A directory holding an executable `helm`, to put first on PATH: that of the `helm`
/// on PATH when it is Helm 3.13 or later, else one with Helm's SDK behind
/// `scripts/helm.py`, made once in the cache.
pub fn ensure_helm() -> Result<PathBuf> {
    if let Some(dir) = helm_on_path() {
        return Ok(dir);
    }
    let home = crate::controlplane::cache_dir().join("helm");
    let venv = home.join("venv");
    let python = venv.join("bin").join("python3");
    if !sdk_installed(&python) {
        make_venv(&venv)?;
        eprintln!("==> installing {SDK} (once; cached in {})", venv.display());
        shell::run(Command::new(&python).args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", SDK]))
            .with_context(|| format!("cannot install {SDK} from PyPI"))?;
    }
    let bin = home.join("bin");
    install_wrapper(&bin.join("helm"), &python)?;
    Ok(bin)
}

/// The directory of the `helm` on PATH, when it is recent enough.
fn helm_on_path() -> Option<PathBuf> {
    let path = shell::output(Command::new("sh").args(["-c", "command -v helm"])).ok()?;
    let helm = PathBuf::from(path.trim());
    // `v3.14.2+g1234567`, or `v4.2.3`.
    let short = shell::output(Command::new(&helm).args(["version", "--short"])).ok()?;
    let mut numbers = short.trim().trim_start_matches('v').split(['.', '+', '-']).map(|n| n.parse::<u32>().ok());
    let version = (numbers.next()??, numbers.next()??);
    if version < MINIMUM {
        eprintln!("==> {} is Helm {}; using Helm's SDK instead", helm.display(), short.trim());
        return None;
    }
    helm.parent().map(Path::to_path_buf)
}

fn sdk_installed(python: &Path) -> bool {
    let version = SDK.split_once("==").map_or(SDK, |(_, v)| v);
    let check = format!("import helm_python, sys; sys.exit(helm_python.__version__ != {version:?})");
    python.exists() && shell::output(Command::new(python).args(["-c", &check])).is_ok()
}

/// A virtualenv with pip at `venv`. Debian ships venv's pip bootstrap apart from
/// python3, in python3-venv.
fn make_venv(venv: &Path) -> Result<()> {
    if venv.join("bin").join("pip").exists() {
        return Ok(());
    }
    shell::ensure_program("python3", "python3")?;
    let create = || shell::output(Command::new("python3").args(["-m", "venv", "--clear"]).arg(venv));
    if create().is_err() {
        shell::apt_install(&["python3-venv"])?;
        create().with_context(|| format!("cannot make a Python virtualenv in {}", venv.display()))?;
    }
    Ok(())
}

/// Installs `scripts/helm.py` as `helm`, run by the virtualenv's Python, when it differs.
fn install_wrapper(helm: &Path, python: &Path) -> Result<()> {
    let body = WRAPPER.split_once('\n').map_or(WRAPPER, |(_shebang, rest)| rest);
    let script = format!("#!{}\n{body}", python.display());
    if fs::read_to_string(helm).is_ok_and(|have| have == script) {
        return Ok(());
    }
    let dir = helm.parent().expect("helm is in a directory");
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Written aside and renamed, so that a helm running meanwhile never reads half a script.
    let partial = helm.with_extension("partial");
    fs::write(&partial, script).with_context(|| format!("cannot write {}", partial.display()))?;
    fs::set_permissions(&partial, fs::Permissions::from_mode(0o755))?;
    fs::rename(&partial, helm).with_context(|| format!("cannot install {}", helm.display()))
}
