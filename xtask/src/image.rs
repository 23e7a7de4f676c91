//! `cargo xtask image`: the `supermesh-controller` container image, built without a
//! container engine as a deterministic docker-archive (`docker load`, `ctr images import`).
//!
//! The image holds a statically linked controller, the CA bundle and a passwd entry for
//! the non-root user 65532, and nothing else. Rebuilding from the same sources gives the
//! same bytes: entries are sorted, owned by root, dated at the epoch.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::shell::{self, cargo, target_dir};

/// The controller image's name, as the chart refers to it (`image.repository`).
pub const REPOSITORY: &str = "docker.io/supermesh/controller";
/// The non-root user the controller runs as, as in the chart's securityContext.
const NONROOT: u32 = 65532;
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// The tag of this workspace's images: its version.
pub fn tag() -> String {
    format!("{REPOSITORY}:{}", env!("CARGO_PKG_VERSION"))
}

/// Builds the controller image and returns the archive's path.
pub fn build() -> Result<PathBuf> {
    let binary = static_controller()?;
    shell::ensure_program("update-ca-certificates", "ca-certificates")?;
    let passwd = format!(
        "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:{NONROOT}:{NONROOT}:nonroot:/home/nonroot:/sbin/nologin\n"
    );
    let group = format!("root:x:0:\nnonroot:x:{NONROOT}:\n");
    let files = vec![
        Entry::dir("etc", 0o755),
        Entry::file("etc/group", group.into_bytes(), 0o644),
        Entry::file("etc/passwd", passwd.into_bytes(), 0o644),
        Entry::dir("etc/ssl", 0o755),
        Entry::dir("etc/ssl/certs", 0o755),
        Entry::file("etc/ssl/certs/ca-certificates.crt", read(Path::new(CA_BUNDLE))?, 0o644),
        Entry::dir("home", 0o755),
        Entry::dir("home/nonroot", 0o700).owned_by(NONROOT),
        Entry::dir("tmp", 0o1777),
        Entry::dir("usr", 0o755),
        Entry::dir("usr/local", 0o755),
        Entry::dir("usr/local/bin", 0o755),
        Entry::file("usr/local/bin/supermesh-controller", read(&binary)?, 0o755),
    ];
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "User": format!("{NONROOT}:{NONROOT}"),
            "Entrypoint": ["/usr/local/bin/supermesh-controller"],
            "Env": [
                "PATH=/usr/local/bin:/usr/bin:/bin",
                format!("SSL_CERT_FILE={CA_BUNDLE}"),
            ],
            "WorkingDir": "/home/nonroot",
            "Labels": {
                "org.opencontainers.image.title": "supermesh-controller",
                "org.opencontainers.image.version": env!("CARGO_PKG_VERSION"),
                "org.opencontainers.image.licenses": "Apache-2.0",
            },
        },
    });
    let out = target_dir().join("image").join(format!("supermesh-controller-{}.tar", env!("CARGO_PKG_VERSION")));
    let id = write_docker_archive(&out, &tag(), &files, config)?;
    eprintln!("==> image {} (id sha256:{id})", tag());
    println!("{}", out.display());
    Ok(out)
}

/// Builds `supermesh-controller` in release mode, statically linked, and returns it.
///
/// An explicit `--target` keeps the static flag away from build scripts and proc macros
/// (which must stay dynamic) and puts the result in its own directory.
fn static_controller() -> Result<PathBuf> {
    let host = shell::output(std::process::Command::new("rustc").arg("-vV"))?
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .context("rustc -vV printed no host triple")?;
    eprintln!("==> building a static supermesh-controller for {host} (release)");
    shell::run(
        cargo()
            .args(["build", "--release", "--locked", "-p", "supermesh-controller", "--bin", "supermesh-controller"])
            .args(["--target", &host])
            .env("RUSTFLAGS", "-C target-feature=+crt-static"),
    )?;
    Ok(target_dir().join(host).join("release/supermesh-controller"))
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// One entry of an image layer.
pub struct Entry {
    path: String,
    mode: u32,
    owner: u32,
    contents: Option<Vec<u8>>,
}

impl Entry {
    pub fn dir(path: &str, mode: u32) -> Entry {
        Entry { path: path.to_owned(), mode, owner: 0, contents: None }
    }

    pub fn file(path: &str, contents: Vec<u8>, mode: u32) -> Entry {
        Entry { path: path.to_owned(), mode, owner: 0, contents: Some(contents) }
    }

    fn owned_by(mut self, uid: u32) -> Entry {
        self.owner = uid;
        self
    }
}

/// Writes a one-layer image as a docker-archive tagged `tag`; returns the image id (the
/// config's sha256). `config` gets the layer's diff id.
pub fn write_docker_archive(out: &Path, tag: &str, entries: &[Entry], mut config: serde_json::Value) -> Result<String> {
    let layer = layer_tar(entries)?;
    let diff_id = hex::encode(Sha256::digest(&layer));
    config["rootfs"] = serde_json::json!({"type": "layers", "diff_ids": [format!("sha256:{diff_id}")]});
    let config = serde_json::to_vec(&config)?;
    let id = hex::encode(Sha256::digest(&config));
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": format!("{id}.json"),
        "RepoTags": [tag],
        "Layers": [format!("{diff_id}/layer.tar")],
    }]))?;
    let mut archive = Vec::new();
    {
        let mut tar = tar::Builder::new(&mut archive);
        append(&mut tar, &Entry::file(&format!("{diff_id}/layer.tar"), layer, 0o644))?;
        append(&mut tar, &Entry::file(&format!("{id}.json"), config, 0o644))?;
        append(&mut tar, &Entry::file("manifest.json", manifest, 0o644))?;
        tar.finish()?;
    }
    fs::create_dir_all(out.parent().context("the archive needs a directory")?)?;
    let partial = out.with_extension("tar.partial");
    fs::write(&partial, archive)?;
    fs::rename(&partial, out)?;
    Ok(id)
}

fn layer_tar(entries: &[Entry]) -> Result<Vec<u8>> {
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let mut tar = tar::Builder::new(Vec::new());
    for entry in sorted {
        append(&mut tar, entry)?;
    }
    Ok(tar.into_inner()?)
}

fn append<W: std::io::Write>(tar: &mut tar::Builder<W>, entry: &Entry) -> Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_mode(entry.mode);
    header.set_uid(entry.owner.into());
    header.set_gid(entry.owner.into());
    header.set_mtime(0);
    match &entry.contents {
        Some(contents) => {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(contents.len() as u64);
            tar.append_data(&mut header, &entry.path, contents.as_slice())?;
        }
        None => {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            tar.append_data(&mut header, format!("{}/", entry.path), std::io::empty())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(dir: &Path, name: &str, entries: &[Entry]) -> (String, Vec<u8>) {
        let out = dir.join(name);
        let config = serde_json::json!({"architecture": "amd64", "os": "linux", "config": {"Entrypoint": ["/x"]}});
        let id = write_docker_archive(&out, "docker.io/example/x:1", entries, config).unwrap();
        (id, fs::read(out).unwrap())
    }

    #[test]
    fn the_same_files_make_the_same_image_whatever_their_order() {
        let dir = std::env::temp_dir().join(format!("supermesh-image-test-{}", std::process::id()));
        let a = [Entry::dir("etc", 0o755), Entry::file("etc/passwd", b"root:x:0:0::/:/x\n".to_vec(), 0o644)];
        let b = [Entry::file("etc/passwd", b"root:x:0:0::/:/x\n".to_vec(), 0o644), Entry::dir("etc", 0o755)];
        let (first, bytes) = archive(&dir, "a.tar", &a);
        let (second, again) = archive(&dir, "b.tar", &b);
        assert_eq!((first.as_str(), bytes.len()), (second.as_str(), again.len()));
        assert_eq!(bytes, again);
        // The archive holds what `docker load` and `ctr images import` read.
        let mut tar = tar::Archive::new(bytes.as_slice());
        let names: Vec<String> =
            tar.entries().unwrap().map(|e| e.unwrap().path().unwrap().display().to_string()).collect();
        assert_eq!(names.len(), 3);
        assert!(names.contains(&"manifest.json".to_owned()) && names.contains(&format!("{first}.json")));
        let changed = [Entry::dir("etc", 0o755), Entry::file("etc/passwd", b"root:x:0:0::/:/y\n".to_vec(), 0o644)];
        assert_ne!(archive(&dir, "c.tar", &changed).0, first, "a changed file kept the image id");
        let _ = fs::remove_dir_all(dir);
    }
}
