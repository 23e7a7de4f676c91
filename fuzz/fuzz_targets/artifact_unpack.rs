//! Artifact unpacking (`edged::artifact::unpack_within`): an archive that passed its
//! SHA-256 check, unpacked into a fresh work directory under small limits. The input is
//! a tar.gz when it starts with the gzip magic and a plain tar (gzipped here) otherwise,
//! so that mutations reach the tar reader instead of stopping at the gzip checksum.
//!
//! Besides not panicking: nothing appears beside the work directory, every link in it
//! points inside it, and no file is larger than the limit.
#![no_main]

use std::io::Write;
use std::path::{Component, Path};

use flate2::write::GzEncoder;
use flate2::Compression;
use libfuzzer_sys::fuzz_target;
use supermesh_agent::edged::artifact::{unpack_within, Limits};

/// Small limits: the fuzzer explores the checks, not the disk.
const LIMITS: Limits = Limits { archive_bytes: 1 << 20, unpacked_bytes: 1 << 20, entries: 64 };

fuzz_target!(|data: &[u8]| {
    let root = tempfile::Builder::new().prefix("unpack").tempdir().expect("a temporary directory");
    let archive = root.path().join("artifact.tar.gz");
    let gzipped = match data.starts_with(&[0x1f, 0x8b]) {
        true => data.to_vec(),
        false => {
            let mut gz = GzEncoder::new(Vec::new(), Compression::fast());
            gz.write_all(data).and_then(|()| gz.finish()).expect("gzip in memory")
        }
    };
    std::fs::write(&archive, gzipped).expect("the archive is written");
    let work = root.path().join("work");
    let _ = unpack_within(&archive, &work, &LIMITS);

    let mut beside: Vec<String> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    beside.sort();
    assert!(beside == ["artifact.tar.gz", "work"] || beside == ["artifact.tar.gz"], "written beside: {beside:?}");
    if work.exists() {
        check_inside(&work, Path::new(""));
    }
    // Unpacked modes may forbid the removal: the directory goes whatever its modes.
    allow_removal(root.path());
});

/// Every entry under `dir` (at `relative` from the work directory) is a file within the
/// limit, a directory, or a link pointing inside the work directory.
fn check_inside(dir: &Path, relative: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = std::fs::symlink_metadata(entry.path()).unwrap();
        let path = relative.join(entry.file_name());
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(entry.path()).unwrap();
            assert!(stays_inside(&relative.join(&target)), "link {path:?} points to {target:?}");
        } else if meta.is_dir() {
            check_inside(&entry.path(), &path);
        } else {
            assert!(meta.is_file(), "{path:?} is neither a file, a directory nor a link");
            assert!(meta.len() <= LIMITS.unpacked_bytes, "{path:?} holds {} bytes", meta.len());
        }
    }
}

/// Whether `path` (relative to the work directory) stays inside it, resolved lexically.
fn stays_inside(path: &Path) -> bool {
    let mut depth = 0usize;
    for component in path.components() {
        match component {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

fn allow_removal(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            allow_removal(&entry.path());
        }
    }
}
