//! `cargo xtask crdgen`: CRD YAML from the Rust types, in crds/ and the chart.

use std::fs;

use anyhow::{bail, Context, Result};

use crate::shell::workspace_root;

pub fn run(check: bool) -> Result<()> {
    let root = workspace_root();
    let mut stale = Vec::new();
    for dir in supermesh_api::crd::OUTPUT_DIRS {
        fs::create_dir_all(root.join(dir)).with_context(|| format!("cannot create {dir}"))?;
        for (file, crd) in supermesh_api::crd::all() {
            let path = root.join(dir).join(file);
            let want = supermesh_api::crd::to_yaml(&crd);
            let have = fs::read_to_string(&path).unwrap_or_default();
            if have == want {
                continue;
            }
            if check {
                stale.push(format!("{dir}/{file}"));
            } else {
                fs::write(&path, want).with_context(|| format!("cannot write {}", path.display()))?;
                eprintln!("wrote {dir}/{file}");
            }
        }
    }
    if !stale.is_empty() {
        bail!("generated CRDs differ from the Rust types: {}; run `cargo xtask crdgen`", stale.join(", "));
    }
    Ok(())
}
