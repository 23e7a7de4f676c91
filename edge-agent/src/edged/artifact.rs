//! Artifacts: archives a microservice runs from. Downloaded once per SHA-256 into
//! `<data_dir>/artifacts/<sha256>.tar.gz`, verified before anything runs, and
//! unpacked into an instance's work directory. All functions block: call them
//! from `spawn_blocking`.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use flate2::read::GzDecoder;
use sha2::{Digest, Sha256};
use supermesh_protocol::{Artifact, FailureReason};
use tar::EntryType;

/// Largest archive downloaded: a bound on disk use against a wrong or hostile URL.
pub const MAX_ARCHIVE_BYTES: u64 = 2 * 1024 * 1024 * 1024;

/// Why an artifact could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The spec's digest is not 64 lower-case hex digits.
    #[error("artifact sha256 {digest:?} is not 64 lower-case hex digits; fix the Microservice spec")]
    InvalidDigest {
        /// The digest as given.
        digest: String,
    },
    /// The download failed (connection, HTTP status, timeout, size limit).
    #[error("cannot download artifact {url}: {source}")]
    Download {
        /// Where it was downloaded from.
        url: String,
        /// What went wrong.
        source: Box<ureq::Error>,
    },
    /// The downloaded archive is not the one the spec names.
    #[error("artifact hash mismatch: expected {expected}, got {got}")]
    HashMismatch {
        /// Digest from the spec.
        expected: String,
        /// Digest of what was downloaded.
        got: String,
    },
    /// The archive holds an entry that would land outside the work directory, or a device file.
    #[error("artifact entry {entry:?} is not allowed: {reason}")]
    UnsafeEntry {
        /// Path of the entry in the archive.
        entry: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The archive is not a readable tar.gz.
    #[error("cannot unpack artifact {}: {source}", archive.display())]
    Unpack {
        /// The cached archive.
        archive: PathBuf,
        /// The read or decode error.
        source: io::Error,
    },
    /// The download was abandoned because the instance no longer needs it.
    #[error("artifact download cancelled")]
    Cancelled,
    /// A local file could not be written or read (disk full, permissions).
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The failed call.
        source: io::Error,
    },
}

impl ArtifactError {
    /// Whether trying again later may succeed (network and disk trouble), as opposed
    /// to a spec or archive that will never run.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ArtifactError::Download { .. } | ArtifactError::Io { .. })
    }

    /// Why an instance fails for good over this error.
    pub fn reason(&self) -> FailureReason {
        match self {
            ArtifactError::HashMismatch { .. } => FailureReason::ArtifactHashMismatch,
            _ => FailureReason::ArtifactInvalid,
        }
    }
}

/// Maps an I/O error on `path` into [`ArtifactError::Io`].
pub(crate) fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ArtifactError {
    let path = path.to_owned();
    move |source| ArtifactError::Io { what, path, source }
}

/// The cache of downloaded archives, keyed by SHA-256.
#[derive(Clone)]
pub struct ArtifactStore {
    dir: PathBuf,
    agent: ureq::Agent,
}

impl ArtifactStore {
    /// A cache in `dir`, downloading through the proxy the environment names (if any).
    pub fn new(dir: PathBuf) -> ArtifactStore {
        let config = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            // Per read rather than a total, so a large archive on a slow link still completes.
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent(concat!("supermesh-agent/", env!("CARGO_PKG_VERSION")))
            .build();
        ArtifactStore { dir, agent: config.new_agent() }
    }

    /// Path of the cached archive with this digest.
    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.tar.gz"))
    }

    /// Returns the verified archive of `artifact`, downloading it unless a copy with
    /// the right digest is cached. A download with another digest is deleted.
    /// Setting `cancel` abandons a download in progress.
    pub fn fetch(&self, artifact: &Artifact, cancel: &AtomicBool) -> Result<PathBuf, ArtifactError> {
        let expected = artifact.sha256.as_str();
        // The digest becomes a file name: anything but hex could escape the cache.
        if expected.len() != 64 || !expected.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(ArtifactError::InvalidDigest { digest: expected.to_owned() });
        }
        let path = self.path(expected);
        match File::open(&path) {
            Ok(file) => {
                if sha256_hex(file).map_err(io_error("cannot read cached artifact", &path))? == expected {
                    return Ok(path);
                }
                // A corrupt cache entry (disk error, killed writer) is fetched again.
                std::fs::remove_file(&path).map_err(io_error("cannot remove corrupt artifact", &path))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("cannot open cached artifact", &path)(e)),
        }
        std::fs::create_dir_all(&self.dir).map_err(io_error("cannot create artifact directory", &self.dir))?;
        // A unique partial file, so concurrent fetches of one digest never mix bytes.
        let partial = self.dir.join(format!("{expected}.{}.{}.part", std::process::id(), rand::random::<u32>()));
        let got = self.download(&artifact.url, &partial, cancel);
        let got = match got {
            Ok(got) => got,
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                return Err(e);
            }
        };
        if got != expected {
            let _ = std::fs::remove_file(&partial);
            return Err(ArtifactError::HashMismatch { expected: expected.to_owned(), got });
        }
        std::fs::rename(&partial, &path).map_err(io_error("cannot store artifact", &path))?;
        Ok(path)
    }

    /// Downloads `url` into `partial`, returning the SHA-256 of what was written.
    fn download(&self, url: &str, partial: &Path, cancel: &AtomicBool) -> Result<String, ArtifactError> {
        let download_error = |source| ArtifactError::Download { url: url.to_owned(), source: Box::new(source) };
        let response = self.agent.get(url).call().map_err(download_error)?;
        let mut body = response.into_body().into_with_config().limit(MAX_ARCHIVE_BYTES).reader();
        let file = File::create(partial).map_err(io_error("cannot create artifact file", partial))?;
        let mut writer = HashingWriter { inner: io::BufWriter::new(file), hasher: Sha256::new() };
        let mut buf = vec![0; 64 * 1024];
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(ArtifactError::Cancelled);
            }
            // Read and write errors are told apart: one is the network, the other the disk.
            let n = body.read(&mut buf).map_err(|e| download_error(ureq::Error::Io(e)))?;
            if n == 0 {
                break;
            }
            writer.write_all(&buf[..n]).map_err(io_error("cannot write artifact file", partial))?;
        }
        let file =
            writer.inner.into_inner().map_err(|e| io_error("cannot write artifact file", partial)(e.into_error()))?;
        file.sync_all().map_err(io_error("cannot write artifact file", partial))?;
        Ok(hex::encode(writer.hasher.finalize()))
    }
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Lower-case hex SHA-256 of everything `reader` yields.
pub fn sha256_hex(mut reader: impl Read) -> io::Result<String> {
    let mut sink = HashingWriter { inner: io::sink(), hasher: Sha256::new() };
    io::copy(&mut reader, &mut sink)?;
    Ok(hex::encode(sink.hasher.finalize()))
}

/// Unpacks the tar.gz `archive` into `dest`, refusing entries that would land
/// outside it (absolute paths, `..`, links pointing out) and device files.
pub fn unpack(archive: &Path, dest: &Path) -> Result<(), ArtifactError> {
    let unpack_error = |source| ArtifactError::Unpack { archive: archive.to_owned(), source };
    let file = File::open(archive).map_err(io_error("cannot open artifact", archive))?;
    let mut tar = tar::Archive::new(GzDecoder::new(BufReader::new(file)));
    tar.set_preserve_permissions(true);
    tar.set_overwrite(true);
    std::fs::create_dir_all(dest).map_err(io_error("cannot create work directory", dest))?;
    for entry in tar.entries().map_err(unpack_error)? {
        let mut entry = entry.map_err(unpack_error)?;
        let path = entry.path().map_err(unpack_error)?.into_owned();
        let refuse = |reason| ArtifactError::UnsafeEntry { entry: path.display().to_string(), reason };
        if !stays_inside(Path::new(""), &path) {
            return Err(refuse("its path leaves the work directory"));
        }
        match entry.header().entry_type() {
            EntryType::Char | EntryType::Block => return Err(refuse("device files are not unpacked")),
            EntryType::Symlink => {
                let target = entry.link_name().map_err(unpack_error)?.unwrap_or_default();
                // A symlink target is relative to the link's own directory.
                if !stays_inside(path.parent().unwrap_or(Path::new("")), &target) {
                    return Err(refuse("its link target leaves the work directory"));
                }
            }
            EntryType::Link => {
                // A hard link target is relative to the archive root.
                let target = entry.link_name().map_err(unpack_error)?.unwrap_or_default();
                if !stays_inside(Path::new(""), &target) {
                    return Err(refuse("its link target leaves the work directory"));
                }
            }
            _ => {}
        }
        // unpack_in also refuses to write through a symlinked parent outside `dest`.
        if !entry.unpack_in(dest).map_err(unpack_error)? {
            return Err(refuse("its path leaves the work directory"));
        }
    }
    Ok(())
}

/// Whether `path`, taken relative to `base` (itself relative to the root), stays
/// within the root after resolving `.` and `..` lexically.
fn stays_inside(base: &Path, path: &Path) -> bool {
    let mut depth = 0usize;
    for component in base.components().chain(path.components()) {
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

#[cfg(test)]
mod tests {
    use flate2::write::GzEncoder;
    use flate2::Compression;
    use tar::Header;

    use super::*;

    /// A tar.gz holding `entries` (path, type, link target, contents); paths are written raw, unchecked.
    fn archive(entries: &[(&str, EntryType, &str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::default()));
        for (path, kind, link, data) in entries {
            let mut header = Header::new_gnu();
            let name = &mut header.as_gnu_mut().unwrap().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_entry_type(*kind);
            header.set_mode(0o755);
            header.set_size(data.len() as u64);
            if !link.is_empty() {
                header.set_link_name(link).unwrap();
            }
            header.set_cksum();
            builder.append(&header, *data).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    fn unpack_bytes(bytes: &[u8]) -> (tempfile::TempDir, Result<(), ArtifactError>) {
        let dir = tempfile::tempdir().unwrap();
        let archive_path = dir.path().join("a.tar.gz");
        std::fs::write(&archive_path, bytes).unwrap();
        let result = unpack(&archive_path, &dir.path().join("work"));
        (dir, result)
    }

    #[test]
    fn a_plain_archive_unpacks_with_its_modes() {
        use std::os::unix::fs::PermissionsExt;
        let bytes = archive(&[
            ("bin/", EntryType::Directory, "", b""),
            ("bin/run.sh", EntryType::Regular, "", b"#!/bin/sh\n"),
            ("run", EntryType::Symlink, "bin/run.sh", b""),
        ]);
        let (dir, result) = unpack_bytes(&bytes);
        result.unwrap();
        let script = dir.path().join("work/bin/run.sh");
        assert_eq!(std::fs::read(&script).unwrap(), b"#!/bin/sh\n");
        assert_eq!(std::fs::metadata(&script).unwrap().permissions().mode() & 0o777, 0o755);
        assert_eq!(std::fs::read(dir.path().join("work/run")).unwrap(), b"#!/bin/sh\n");
    }

    #[test]
    fn entries_escaping_the_work_directory_are_refused() {
        for entries in [
            vec![("../evil", EntryType::Regular, "", &b"x"[..])],
            vec![("/etc/evil", EntryType::Regular, "", &b"x"[..])],
            vec![("a/../../evil", EntryType::Regular, "", &b"x"[..])],
            vec![("link", EntryType::Symlink, "../../etc", &b""[..])],
            vec![("d/link", EntryType::Symlink, "/etc/passwd", &b""[..])],
            vec![("hard", EntryType::Link, "../outside", &b""[..])],
            vec![("dev", EntryType::Char, "", &b""[..])],
        ] {
            let (dir, result) = unpack_bytes(&archive(&entries));
            assert!(
                matches!(result, Err(ArtifactError::UnsafeEntry { .. })),
                "{entries:?} must be refused, got {result:?}"
            );
            assert!(!dir.path().join("evil").exists());
        }
        let (_dir, result) = unpack_bytes(&archive(&[("d/ok", EntryType::Symlink, "../sibling", b"")]));
        result.unwrap();
    }

    #[test]
    fn digests_are_checked_before_anything_is_fetched() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::new(dir.path().to_owned());
        for digest in ["../../etc/passwd", "ABCDEF", &"A".repeat(64)] {
            let artifact = Artifact { url: "http://127.0.0.1:9/x".into(), sha256: digest.into() };
            assert!(matches!(
                store.fetch(&artifact, &AtomicBool::new(false)),
                Err(ArtifactError::InvalidDigest { .. })
            ));
        }
        assert_eq!(
            sha256_hex(&b"abc"[..]).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
