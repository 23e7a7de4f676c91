//! Artifacts: archives a microservice runs from. Downloaded once per SHA-256 into
//! `<data_dir>/artifacts/<sha256>.tar.gz`, verified before anything runs, and
//! unpacked into an instance's work directory. All functions block: call them
//! from `spawn_blocking`.
//!
//! What an artifact may take is bounded ([`Limits`]): only `http://` and `https://`
//! URLs are fetched (whether a node accepts plain http is the cloud's placement
//! decision), an `https://` download never follows a redirect to plain http, the
//! download is capped, and so are the bytes and entries it unpacks to, checked on
//! each entry's header before anything is written and counted on the bytes read.
//! Only regular files, directories and links inside the work directory are
//! unpacked: no setuid, setgid or sticky bits, no device files or fifos.
//!
//! A download goes to `<sha256>.partial`; when the network fails, the next attempt
//! continues it with an HTTP range request, and the SHA-256 is checked over the
//! whole file at the end.

use std::cell::Cell;
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use flate2::read::GzDecoder;
use sha2::{Digest, Sha256};
use supermesh_protocol::{Artifact, FailureReason};
use tar::EntryType;

/// Largest archive downloaded by default: a bound on disk use against a wrong or hostile URL.
pub const MAX_ARCHIVE_BYTES: u64 = 2 * 1024 * 1024 * 1024;
/// Most bytes an archive unpacks to by default, as its entries' headers state them.
pub const MAX_UNPACKED_BYTES: u64 = 4 * 1024 * 1024 * 1024;
/// Most entries unpacked from one archive by default.
pub const MAX_ENTRIES: u64 = 100_000;
/// Most bytes read for the headers of one entry (GNU long names, PAX extensions),
/// which the tar reader holds in memory.
const MAX_HEADER_BYTES: u64 = 1024 * 1024;
/// How often a fetch waiting for another fetch of the same archive looks again.
const WAIT_FOR_OTHER_FETCH: Duration = Duration::from_millis(100);

/// Bounds on what one artifact may take on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes downloaded.
    pub archive_bytes: u64,
    /// Most bytes unpacked, summed over the entries' sizes (a sparse file counts at its full size).
    pub unpacked_bytes: u64,
    /// Most entries unpacked.
    pub entries: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { archive_bytes: MAX_ARCHIVE_BYTES, unpacked_bytes: MAX_UNPACKED_BYTES, entries: MAX_ENTRIES }
    }
}

/// Why an artifact could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The spec's digest is not 64 lower-case hex digits.
    #[error("artifact sha256 {digest:?} is not 64 lower-case hex digits; fix the Microservice spec")]
    InvalidDigest {
        /// The digest as given.
        digest: String,
    },
    /// The spec's URL is not http or https.
    #[error("artifact url {url:?} is not an http:// or https:// URL; fix the Microservice spec")]
    UnsupportedUrl {
        /// The URL as given.
        url: String,
    },
    /// The download failed (connection, HTTP status, timeout).
    #[error("cannot download artifact {url}: {source}")]
    Download {
        /// Where it was downloaded from.
        url: String,
        /// What went wrong.
        source: Box<ureq::Error>,
    },
    /// The server answered in a way a download cannot continue from.
    #[error("cannot download artifact {url}: {reason}")]
    BadAnswer {
        /// Where it was downloaded from.
        url: String,
        /// What was wrong with the answer.
        reason: String,
    },
    /// The download or what it unpacks to is larger than the agent allows.
    #[error("artifact is too large: {what}; make the artifact smaller")]
    TooLarge {
        /// Which limit it passed.
        what: String,
    },
    /// The downloaded archive is not the one the spec names.
    #[error("artifact hash mismatch: expected {expected}, got {got}")]
    HashMismatch {
        /// Digest from the spec.
        expected: String,
        /// Digest of what was downloaded.
        got: String,
    },
    /// The archive holds an entry the agent does not unpack.
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
        matches!(self, ArtifactError::Download { .. } | ArtifactError::BadAnswer { .. } | ArtifactError::Io { .. })
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
    limits: Limits,
    /// Digests being downloaded: one download per archive, so two never write one `.partial`.
    downloading: Arc<Mutex<HashSet<String>>>,
}

/// The right to download one digest, given back on drop.
struct Downloading<'a> {
    set: &'a Mutex<HashSet<String>>,
    digest: String,
}

impl Drop for Downloading<'_> {
    fn drop(&mut self) {
        self.set.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.digest);
    }
}

impl ArtifactStore {
    /// A cache in `dir` with the default [`Limits`], downloading through the proxy the environment names (if any).
    pub fn new(dir: PathBuf) -> ArtifactStore {
        let config = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            // Per read rather than a total, so a large archive on a slow link still completes.
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent(concat!("supermesh-agent/", env!("CARGO_PKG_VERSION")))
            .build();
        ArtifactStore { dir, agent: config.new_agent(), limits: Limits::default(), downloading: Arc::default() }
    }

    /// This cache with other limits.
    pub fn with_limits(self, limits: Limits) -> ArtifactStore {
        ArtifactStore { limits, ..self }
    }

    /// Unpacks the archive `archive` (from [`ArtifactStore::fetch`]) into `dest` within this cache's limits.
    pub fn unpack(&self, archive: &Path, dest: &Path) -> Result<(), ArtifactError> {
        unpack_within(archive, dest, &self.limits)
    }

    /// Path of the cached archive with this digest.
    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.tar.gz"))
    }

    /// Path of the download in progress of the archive with this digest.
    fn partial(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.partial"))
    }

    /// Returns the verified archive of `artifact`, downloading it unless a copy with
    /// the right digest is cached. A download with another digest is deleted; one cut
    /// by the network is kept and continued by the next fetch. Setting `cancel`
    /// abandons a download in progress.
    pub fn fetch(&self, artifact: &Artifact, cancel: &AtomicBool) -> Result<PathBuf, ArtifactError> {
        let expected = artifact.sha256.as_str();
        // The digest becomes a file name: anything but hex could escape the cache.
        if expected.len() != 64 || !expected.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(ArtifactError::InvalidDigest { digest: expected.to_owned() });
        }
        let https =
            is_https(&artifact.url).ok_or_else(|| ArtifactError::UnsupportedUrl { url: artifact.url.clone() })?;
        let path = self.path(expected);
        if self.cached(&path, expected)? {
            return Ok(path);
        }
        std::fs::create_dir_all(&self.dir).map_err(io_error("cannot create artifact directory", &self.dir))?;
        let _downloading = self.wait_for_other_fetch(expected, cancel)?;
        // Another fetch of the same archive may have finished while this one waited.
        if self.cached(&path, expected)? {
            return Ok(path);
        }
        let partial = self.partial(expected);
        match self.download(&artifact.url, https, &partial, expected, cancel) {
            Ok(()) => std::fs::rename(&partial, &path).map_err(io_error("cannot store artifact", &path))?,
            Err(e) => {
                // Only what the network cut short is worth continuing.
                if !matches!(e, ArtifactError::Download { .. }) {
                    let _ = std::fs::remove_file(&partial);
                }
                return Err(e);
            }
        }
        Ok(path)
    }

    /// Whether `path` holds the archive with digest `expected`; a corrupt copy (disk
    /// error, killed writer) is removed, to be fetched again.
    fn cached(&self, path: &Path, expected: &str) -> Result<bool, ArtifactError> {
        match File::open(path) {
            Ok(file) => {
                if sha256_hex(file).map_err(io_error("cannot read cached artifact", path))? == expected {
                    return Ok(true);
                }
                std::fs::remove_file(path).map_err(io_error("cannot remove corrupt artifact", path))?;
                Ok(false)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_error("cannot open cached artifact", path)(e)),
        }
    }

    /// Waits until no other fetch downloads `digest`, then holds that right.
    fn wait_for_other_fetch(&self, digest: &str, cancel: &AtomicBool) -> Result<Downloading<'_>, ArtifactError> {
        loop {
            if self.downloading.lock().unwrap_or_else(PoisonError::into_inner).insert(digest.to_owned()) {
                return Ok(Downloading { set: &self.downloading, digest: digest.to_owned() });
            }
            if cancel.load(Ordering::Relaxed) {
                return Err(ArtifactError::Cancelled);
            }
            std::thread::sleep(WAIT_FOR_OTHER_FETCH);
        }
    }

    /// Downloads `url` into `partial` until it holds the archive with digest `expected`,
    /// continuing what an earlier attempt left there.
    fn download(
        &self,
        url: &str,
        https: bool,
        partial: &Path,
        expected: &str,
        cancel: &AtomicBool,
    ) -> Result<(), ArtifactError> {
        let limit = self.limits.archive_bytes;
        let write_error =
            |source| ArtifactError::Io { what: "cannot write artifact file", path: partial.into(), source };
        let download_error = |source| ArtifactError::Download { url: url.to_owned(), source: Box::new(source) };
        let bad_answer = |reason| ArtifactError::BadAnswer { url: url.to_owned(), reason };
        let too_large = || ArtifactError::TooLarge { what: format!("{url} is larger than {limit} bytes") };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(partial)
            .map_err(write_error)?;
        let mut part = Part::resume(&mut file, limit).map_err(write_error)?;
        if part.len > 0 && part.digest() == expected {
            return Ok(()); // complete, but the agent stopped before renaming it
        }
        let mut resumed = part.len > 0;
        loop {
            let mut request = self.agent.get(url);
            if https {
                // Never follow a redirect from https to plain http.
                request = request.config().https_only(true).build();
            }
            if part.len > 0 {
                request = request.header("Range", format!("bytes={}-", part.len));
            }
            let response = match request.call() {
                Ok(response) => response,
                Err(ureq::Error::StatusCode(416)) if part.len > 0 => {
                    // What is held is no prefix the server can continue: start again.
                    part.restart(&mut file).map_err(write_error)?;
                    resumed = false;
                    continue;
                }
                Err(e) => return Err(download_error(e)),
            };
            match response.status().as_u16() {
                206 if part.len > 0 => {
                    let range = response.headers().get("content-range").and_then(|v| v.to_str().ok());
                    if range_start(range.unwrap_or_default()) != Some(part.len) {
                        return Err(bad_answer(format!(
                            "asked for the bytes from {} on, it sent the range {range:?}",
                            part.len
                        )));
                    }
                }
                // The server ignored the range: take the whole archive from the start.
                200 => {
                    part.restart(&mut file).map_err(write_error)?;
                    resumed = false;
                }
                status => return Err(bad_answer(format!("it answered {status} instead of 200 or 206"))),
            }
            if response.body().content_length().is_some_and(|n| part.len.saturating_add(n) > limit) {
                return Err(too_large());
            }
            let mut body = response.into_body().into_reader();
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
                if part.len + n as u64 > limit {
                    return Err(too_large());
                }
                file.write_all(&buf[..n]).map_err(write_error)?;
                part.add(&buf[..n]);
            }
            file.sync_all().map_err(write_error)?;
            let got = part.digest();
            if got == expected {
                return Ok(());
            }
            if resumed {
                // The bytes of an earlier attempt may be what is wrong: once more, whole.
                part.restart(&mut file).map_err(write_error)?;
                resumed = false;
                continue;
            }
            return Err(ArtifactError::HashMismatch { expected: expected.to_owned(), got });
        }
    }
}

/// What a `.partial` file holds: its length and the running digest of its bytes.
struct Part {
    len: u64,
    hasher: Sha256,
}

impl Part {
    /// Reads the bytes an earlier attempt left in `file`; restarts it if it holds more than `limit`.
    fn resume(file: &mut File, limit: u64) -> io::Result<Part> {
        let mut part = Part { len: 0, hasher: Sha256::new() };
        let mut buf = vec![0; 64 * 1024];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            part.add(&buf[..n]);
            if part.len > limit {
                part.restart(file)?;
                break;
            }
        }
        Ok(part)
    }

    fn add(&mut self, bytes: &[u8]) {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
    }

    /// Empties `file` and starts over.
    fn restart(&mut self, file: &mut File) -> io::Result<()> {
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        *self = Part { len: 0, hasher: Sha256::new() };
        Ok(())
    }

    fn digest(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }
}

/// Whether `url` is https (`Some(true)`) or http (`Some(false)`); `None` for anything else.
fn is_https(url: &str) -> Option<bool> {
    let (scheme, rest) = url.split_once("://")?;
    if rest.is_empty() {
        return None;
    }
    match scheme.to_ascii_lowercase().as_str() {
        "https" => Some(true),
        "http" => Some(false),
        _ => None,
    }
}

/// First byte of a `Content-Range: bytes <first>-<last>/<length>` value.
fn range_start(value: &str) -> Option<u64> {
    let range = value.trim().strip_prefix("bytes ")?;
    range.split_once('-')?.0.trim().parse().ok()
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

/// How many decompressed bytes the tar reader may still take, and whether it asked for more.
#[derive(Clone, Default)]
struct Allowance {
    read: Rc<Cell<u64>>,
    allowed: Rc<Cell<u64>>,
    exceeded: Rc<Cell<bool>>,
}

impl Allowance {
    /// Allows exactly `n` more bytes from here.
    fn set(&self, n: u64) {
        self.allowed.set(self.read.get().saturating_add(n));
    }

    /// Allows `n` more bytes beyond what is allowed and not yet read.
    fn extend(&self, n: u64) {
        self.allowed.set(self.allowed.get().max(self.read.get()).saturating_add(n));
    }
}

/// The decompressed archive, read no further than its [`Allowance`]: what bounds
/// memory and disk against headers and data larger than they claim.
struct Metered<R> {
    inner: R,
    allowance: Allowance,
}

impl<R: Read> Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let a = &self.allowance;
        let left = a.allowed.get().saturating_sub(a.read.get());
        if left == 0 && !buf.is_empty() {
            a.exceeded.set(true);
            return Err(io::Error::other("artifact reads past its limits"));
        }
        let take = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..take])?;
        a.read.set(a.read.get() + n as u64);
        Ok(n)
    }
}

/// Unpacks the tar.gz `archive` into `dest`, refusing entries that would land outside
/// it (absolute paths, `..`, links pointing out), setuid, setgid and sticky bits,
/// device files and fifos, and archives past `limits` (before writing past them).
pub fn unpack_within(archive: &Path, dest: &Path, limits: &Limits) -> Result<(), ArtifactError> {
    let allowance = Allowance::default();
    let unpack_error = |source| ArtifactError::Unpack { archive: archive.to_owned(), source };
    let file = File::open(archive).map_err(io_error("cannot open artifact", archive))?;
    let reader = Metered { inner: GzDecoder::new(BufReader::new(file)), allowance: allowance.clone() };
    let mut tar = tar::Archive::new(reader);
    tar.set_preserve_permissions(true);
    tar.set_overwrite(true);
    std::fs::create_dir_all(dest).map_err(io_error("cannot create work directory", dest))?;
    let (mut count, mut claimed, mut written) = (0u64, 0u64, 0u64);
    let mut last = String::new();
    let mut entries = tar.entries().map_err(unpack_error)?;
    loop {
        // The previous entry's unread data (skipped) and the next headers.
        allowance.extend(MAX_HEADER_BYTES);
        let Some(entry) = entries.next() else { break };
        let mut entry = entry.map_err(|e| match allowance.exceeded.get() {
            true => ArtifactError::TooLarge {
                what: format!("the headers of the entry after {last:?} are larger than {MAX_HEADER_BYTES} bytes"),
            },
            false => unpack_error(e),
        })?;
        let path = entry.path().map_err(unpack_error)?.into_owned();
        last = path.display().to_string();
        let refuse = |reason| ArtifactError::UnsafeEntry { entry: path.display().to_string(), reason };
        count += 1;
        if count > limits.entries {
            return Err(ArtifactError::TooLarge { what: format!("it has more than {} entries", limits.entries) });
        }
        if !stays_inside(Path::new(""), &path) {
            return Err(refuse("its path leaves the work directory"));
        }
        match entry.header().entry_type() {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse | EntryType::Directory => {}
            // A pax global header holds metadata only (`git archive` writes one).
            EntryType::XGlobalHeader => {}
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
            EntryType::Char | EntryType::Block => return Err(refuse("device files are not unpacked")),
            EntryType::Fifo => return Err(refuse("fifos are not unpacked")),
            _ => return Err(refuse("only regular files, directories and links are unpacked")),
        }
        let mode = entry.header().mode().map_err(unpack_error)?;
        if mode & 0o7000 != 0 {
            return Err(refuse("setuid, setgid and sticky bits are not allowed"));
        }
        // Checked on the header, before anything is written; a sparse file counts at its full size.
        let size = entry.size();
        claimed = claimed.saturating_add(size);
        if claimed > limits.unpacked_bytes {
            return Err(ArtifactError::TooLarge {
                what: format!(
                    "it unpacks to more than {} bytes (entry {last:?} alone is {size} bytes)",
                    limits.unpacked_bytes
                ),
            });
        }
        allowance.set(size);
        let before = allowance.read.get();
        // unpack_in also refuses to write through a symlinked parent outside `dest`.
        let inside = entry.unpack_in(dest).map_err(|e| match allowance.exceeded.get() {
            true => ArtifactError::TooLarge { what: format!("entry {last:?} holds more than its stated {size} bytes") },
            false => unpack_error(e),
        })?;
        if !inside {
            return Err(refuse("its path leaves the work directory"));
        }
        written += allowance.read.get() - before;
        if written > limits.unpacked_bytes {
            return Err(ArtifactError::TooLarge {
                what: format!("it unpacks to more than {} bytes", limits.unpacked_bytes),
            });
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
    use std::net::{Shutdown, TcpListener};
    use std::thread::JoinHandle;
    use std::time::Instant;

    use flate2::write::GzEncoder;
    use flate2::Compression;
    use tar::Header;

    use super::*;

    const TEN_GB: u64 = 10_000_000_000;

    /// A GNU header for `path` (written raw, unchecked) of type `kind` with `mode`, stating `size` bytes.
    fn header(path: &str, kind: EntryType, link: &str, mode: u32, size: u64) -> Header {
        let mut header = Header::new_gnu();
        let name = &mut header.as_gnu_mut().unwrap().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        if !link.is_empty() {
            header.set_link_name(link).unwrap();
        }
        header.set_cksum();
        header
    }

    /// A tar.gz of `entries`: each header followed by its bytes, whatever the header states.
    fn tar_gz<'a>(entries: Vec<(Header, Box<dyn Read + 'a>)>) -> Vec<u8> {
        let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
        for (header, data) in entries {
            builder.append(&header, data).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    /// A tar.gz holding `entries` (path, type, link target, contents), mode 0755.
    fn archive(entries: &[(&str, EntryType, &str, &[u8])]) -> Vec<u8> {
        tar_gz(
            entries
                .iter()
                .map(|&(path, kind, link, data)| {
                    (header(path, kind, link, 0o755, data.len() as u64), Box::new(data) as Box<dyn Read>)
                })
                .collect(),
        )
    }

    fn unpack_bytes(bytes: &[u8]) -> (tempfile::TempDir, Result<(), ArtifactError>) {
        let dir = tempfile::tempdir().unwrap();
        let archive_path = dir.path().join("a.tar.gz");
        std::fs::write(&archive_path, bytes).unwrap();
        let result = ArtifactStore::new(dir.path().join("cache")).unpack(&archive_path, &dir.path().join("work"));
        (dir, result)
    }

    fn unpack_limited(bytes: &[u8], limits: &Limits) -> (tempfile::TempDir, Result<(), ArtifactError>) {
        let dir = tempfile::tempdir().unwrap();
        let archive_path = dir.path().join("a.tar.gz");
        std::fs::write(&archive_path, bytes).unwrap();
        let result = unpack_within(&archive_path, &dir.path().join("work"), limits);
        (dir, result)
    }

    /// Bytes of all files under `dir`, at their apparent sizes.
    fn bytes_under(dir: &Path) -> u64 {
        std::fs::read_dir(dir).map_or(0, |entries| {
            entries
                .map(|e| {
                    let e = e.unwrap();
                    let meta = std::fs::symlink_metadata(e.path()).unwrap();
                    if meta.is_dir() {
                        bytes_under(&e.path())
                    } else {
                        meta.len()
                    }
                })
                .sum()
        })
    }

    fn too_large(result: &Result<(), ArtifactError>, what: &str) {
        match result {
            Err(e @ ArtifactError::TooLarge { what: said }) => {
                assert!(said.contains(what), "{e}");
                assert!(!e.is_retryable() && e.reason() == FailureReason::ArtifactInvalid, "{e}");
            }
            other => panic!("expected too large ({what}), got {other:?}"),
        }
    }

    #[test]
    fn a_plain_archive_unpacks_with_its_modes() {
        use std::os::unix::fs::PermissionsExt;
        let bytes = archive(&[
            ("pax_global_header", EntryType::XGlobalHeader, "", b"18 comment=abcdef\n"),
            ("bin/", EntryType::Directory, "", b""),
            ("bin/run.sh", EntryType::Regular, "", b"#!/bin/sh\n"),
            ("run", EntryType::Symlink, "bin/run.sh", b""),
        ]);
        let (dir, result) = unpack_bytes(&bytes);
        result.unwrap();
        let script = dir.path().join("work/bin/run.sh");
        assert_eq!(std::fs::read(&script).unwrap(), b"#!/bin/sh\n");
        assert_eq!(std::fs::metadata(&script).unwrap().permissions().mode() & 0o7777, 0o755);
        assert_eq!(std::fs::read(dir.path().join("work/run")).unwrap(), b"#!/bin/sh\n");
        assert!(!dir.path().join("work/pax_global_header").exists());
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
    fn setuid_setgid_and_sticky_bits_devices_and_fifos_are_refused() {
        let cases = [
            (EntryType::Regular, 0o4755, "setuid"),
            (EntryType::Regular, 0o2711, "setgid"),
            (EntryType::Directory, 0o1777, "sticky"),
            (EntryType::Fifo, 0o644, "fifos"),
            (EntryType::Block, 0o600, "device files"),
            (EntryType::Char, 0o600, "device files"),
            (EntryType::new(b'V'), 0o644, "only regular files, directories and links"),
        ];
        for (kind, mode, why) in cases {
            let data: &[u8] = if kind == EntryType::Regular { b"#!/bin/sh\nid\n" } else { b"" };
            let bytes = tar_gz(vec![
                (header("first", EntryType::Regular, "", 0o644, 2), Box::new(&b"ok"[..])),
                (header("bad", kind, "", mode, data.len() as u64), Box::new(data)),
                (header("after", EntryType::Regular, "", 0o644, 2), Box::new(&b"ok"[..])),
            ]);
            let (dir, result) = unpack_bytes(&bytes);
            match &result {
                Err(e @ ArtifactError::UnsafeEntry { entry, reason }) => {
                    assert_eq!(entry, "bad", "{e}");
                    assert!(reason.contains(why), "{kind:?} {mode:o}: {e}");
                    assert!(!e.is_retryable());
                }
                other => panic!("{kind:?} {mode:o} must be refused, got {other:?}"),
            }
            let work = dir.path().join("work");
            assert!(work.join("first").exists() && !work.join("bad").exists() && !work.join("after").exists());
        }
    }

    #[test]
    fn an_archive_claiming_ten_gigabytes_is_refused_before_anything_is_written() {
        // A regular file whose header states 10 GB, followed by a little of it.
        let plain = header("huge", EntryType::Regular, "", 0o644, TEN_GB);
        // A sparse file of 10 GB holding one block of data at its end.
        let mut sparse = header("sparse", EntryType::GNUSparse, "", 0o644, 512);
        let gnu = sparse.as_gnu_mut().unwrap();
        gnu.sparse[0].set_offset(TEN_GB - 512);
        gnu.sparse[0].set_length(512);
        gnu.set_real_size(TEN_GB);
        sparse.set_cksum();
        for (big, data) in [(plain, 1024 * 1024), (sparse, 512)] {
            let bytes = tar_gz(vec![
                (header("small", EntryType::Regular, "", 0o644, 3), Box::new(&b"abc"[..])),
                (big, Box::new(io::repeat(7).take(data))),
            ]);
            let (dir, result) = unpack_bytes(&bytes);
            too_large(&result, &format!("more than {MAX_UNPACKED_BYTES} bytes"));
            assert_eq!(bytes_under(&dir.path().join("work")), 3, "nothing of the big entry is written");
        }
    }

    #[test]
    fn a_stream_unpacking_past_the_limits_is_stopped_at_them() {
        let limits = Limits { archive_bytes: MAX_ARCHIVE_BYTES, unpacked_bytes: 100_000, entries: 4 };
        // Files within the limit one by one, past it together: the third is never written.
        let chunk = vec![1u8; 40_000];
        let files: Vec<(Header, Box<dyn Read>)> = (0..3)
            .map(|i| {
                (header(&format!("f{i}"), EntryType::Regular, "", 0o644, 40_000), Box::new(&chunk[..]) as Box<dyn Read>)
            })
            .collect();
        let (dir, result) = unpack_limited(&tar_gz(files), &limits);
        too_large(&result, "more than 100000 bytes");
        assert_eq!(bytes_under(&dir.path().join("work")), 80_000);

        let empty: Vec<_> = (0..5)
            .map(|i| {
                (header(&format!("e{i}"), EntryType::Regular, "", 0o644, 0), Box::new(io::empty()) as Box<dyn Read>)
            })
            .collect();
        let (_dir, result) = unpack_limited(&tar_gz(empty), &limits);
        too_large(&result, "more than 4 entries");

        // A long name stating 10 GB over 16 MiB of zeros that compress to almost nothing:
        // the tar reader would hold all of it in memory; it is stopped after 1 MiB.
        let bomb = header("././@LongLink", EntryType::GNULongName, "", 0o644, TEN_GB);
        let bytes = tar_gz(vec![(bomb, Box::new(io::repeat(0).take(16 * 1024 * 1024)))]);
        assert!(bytes.len() < 100 * 1024, "the bomb is small: {} bytes", bytes.len());
        let (dir, result) = unpack_bytes(&bytes);
        too_large(&result, "headers");
        assert_eq!(bytes_under(&dir.path().join("work")), 0);
    }

    #[test]
    fn digests_and_urls_are_checked_before_anything_is_fetched() {
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::new(dir.path().to_owned());
        for digest in ["../../etc/passwd", "ABCDEF", &"A".repeat(64)] {
            let artifact = Artifact { url: "http://127.0.0.1:9/x".into(), sha256: digest.into() };
            assert!(matches!(
                store.fetch(&artifact, &AtomicBool::new(false)),
                Err(ArtifactError::InvalidDigest { .. })
            ));
        }
        for url in ["ftp://example.com/a.tar.gz", "file:///etc/passwd", "127.0.0.1:80/a.tar.gz", "https://", "data:,x"]
        {
            let artifact = Artifact { url: url.into(), sha256: "a".repeat(64) };
            match store.fetch(&artifact, &AtomicBool::new(false)) {
                Err(e @ ArtifactError::UnsupportedUrl { .. }) => {
                    assert!(!e.is_retryable() && e.to_string().contains("http:// or https://"), "{e}")
                }
                other => panic!("{url} must be refused, got {other:?}"),
            }
        }
        assert_eq!((is_https("HTTPS://h/a"), is_https("http://h/a")), (Some(true), Some(false)));
        assert_eq!(
            sha256_hex(&b"abc"[..]).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    /// Some bytes that are not all alike.
    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// A raw HTTP/1.1 answer that closes the connection.
    fn answer(status: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
        let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
        for (name, value) in headers {
            head += &format!("{name}: {value}\r\n");
        }
        let mut out = (head + "\r\n").into_bytes();
        out.extend_from_slice(body);
        out
    }

    /// A server on loopback giving `answers` to as many requests in turn; joined, it
    /// returns the request heads it got (lower case). Fails if a request is missing.
    fn serve(answers: Vec<Vec<u8>>) -> (String, JoinHandle<Vec<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}/a.tar.gz", listener.local_addr().unwrap());
        let thread = std::thread::spawn(move || {
            let mut heads = Vec::new();
            for answer in answers {
                let deadline = Instant::now() + Duration::from_secs(10);
                let mut stream = loop {
                    match listener.accept() {
                        Ok((stream, _)) => break stream,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(10))
                        }
                        Err(e) => panic!("request {} did not come: {e}", heads.len() + 1),
                    }
                };
                stream.set_nonblocking(false).unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8];
                while !head.ends_with(b"\r\n\r\n") && stream.read_exact(&mut byte).is_ok() {
                    head.push(byte[0]);
                }
                // The client may hang up early (a refused size); that is its right.
                let _ = stream.write_all(&answer);
                let _ = stream.shutdown(Shutdown::Write);
                heads.push(String::from_utf8_lossy(&head).to_lowercase());
            }
            heads
        });
        (url, thread)
    }

    fn range_asked(head: &str) -> Option<&str> {
        head.split("\r\n").find_map(|line| line.strip_prefix("range: "))
    }

    #[test]
    fn a_cut_download_is_continued_with_a_range_request_and_verified_whole() {
        let data = sample(200_000);
        let sha = sha256_hex(&data[..]).unwrap();
        let (url, server) = serve(vec![
            answer("200 OK", &[("Content-Length", "200000")], &data[..80_000]),
            answer(
                "206 Partial Content",
                &[("Content-Range", "bytes 80000-199999/200000"), ("Content-Length", "120000")],
                &data[80_000..],
            ),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::new(dir.path().to_owned());
        let artifact = Artifact { url, sha256: sha.clone() };
        let err = store.fetch(&artifact, &AtomicBool::new(false)).unwrap_err();
        assert!(matches!(err, ArtifactError::Download { .. }) && err.is_retryable(), "{err}");
        assert_eq!(std::fs::metadata(store.partial(&sha)).unwrap().len(), 80_000, "what arrived is kept");

        let path = store.fetch(&artifact, &AtomicBool::new(false)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert!(!store.partial(&sha).exists());
        let heads = server.join().unwrap();
        assert_eq!(heads.iter().map(|h| range_asked(h)).collect::<Vec<_>>(), [None, Some("bytes=80000-")]);
    }

    #[test]
    fn a_server_ignoring_the_range_or_a_wrong_partial_means_starting_over() {
        let data = sample(200_000);
        let sha = sha256_hex(&data[..]).unwrap();
        let whole = || answer("200 OK", &[("Content-Length", "200000")], &data);
        let rest = answer(
            "206 Partial Content",
            &[("Content-Range", "bytes 50000-199999/200000"), ("Content-Length", "150000")],
            &data[50_000..],
        );
        let garbage = vec![9u8; 50_000];
        let longer = [&data[..], b"trailing"].concat();
        // What the partial holds, what the server answers, and the ranges asked for.
        type Case<'a> = (&'a [u8], Vec<Vec<u8>>, &'a [Option<&'a str>]);
        let cases: [Case; 4] = [
            // A right prefix; the server ignores the range and sends it all.
            (&data[..50_000], vec![whole()], &[Some("bytes=50000-")]),
            // A wrong prefix, continued: the digest is wrong, so it is fetched whole once more.
            (&garbage, vec![rest, whole()], &[Some("bytes=50000-"), None]),
            // More than the archive holds: 416, then whole.
            (
                &longer,
                vec![answer("416 Range Not Satisfiable", &[("Content-Range", "bytes */200000")], b""), whole()],
                &[Some("bytes=200008-"), None],
            ),
            // Complete already (the agent stopped before renaming it): no request at all.
            (&data, vec![], &[]),
        ];
        for (i, (held, answers, ranges)) in cases.into_iter().enumerate() {
            let (url, server) = serve(answers);
            let dir = tempfile::tempdir().unwrap();
            let store = ArtifactStore::new(dir.path().to_owned());
            std::fs::write(store.partial(&sha), held).unwrap();
            let path = store.fetch(&Artifact { url, sha256: sha.clone() }, &AtomicBool::new(false));
            assert_eq!(std::fs::read(path.unwrap()).unwrap(), data, "case {i}");
            let heads = server.join().unwrap();
            assert_eq!(heads.iter().map(|h| range_asked(h)).collect::<Vec<_>>(), ranges, "case {i}");
        }
    }

    #[test]
    fn downloads_past_the_size_limit_are_refused_and_removed() {
        let data = sample(5000);
        let sha = sha256_hex(&data[..]).unwrap();
        let limits = Limits { archive_bytes: 1000, ..Limits::default() };
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::new(dir.path().to_owned()).with_limits(limits);
        // Stated up front, and only found out while reading (no Content-Length).
        for answer in [answer("200 OK", &[("Content-Length", "5000")], &data), answer("200 OK", &[], &data)] {
            let (url, server) = serve(vec![answer]);
            let result = store.fetch(&Artifact { url, sha256: sha.clone() }, &AtomicBool::new(false));
            match result {
                Err(e @ ArtifactError::TooLarge { .. }) => {
                    assert!(!e.is_retryable() && e.to_string().contains("larger than 1000 bytes"), "{e}")
                }
                other => panic!("expected too large, got {other:?}"),
            }
            assert!(!store.partial(&sha).exists() && !store.path(&sha).exists());
            server.join().unwrap();
        }
    }

    #[test]
    fn a_download_with_another_digest_is_refused_and_removed() {
        let data = sample(10_000);
        let (url, server) = serve(vec![answer("200 OK", &[("Content-Length", "10000")], &data)]);
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::new(dir.path().to_owned());
        let sha = "0".repeat(64);
        match store.fetch(&Artifact { url, sha256: sha.clone() }, &AtomicBool::new(false)) {
            Err(e @ ArtifactError::HashMismatch { .. }) => {
                assert_eq!(e.reason(), FailureReason::ArtifactHashMismatch);
                assert!(e.to_string().contains(&sha256_hex(&data[..]).unwrap()), "{e}");
            }
            other => panic!("expected a hash mismatch, got {other:?}"),
        }
        assert!(!store.partial(&sha).exists() && !store.path(&sha).exists());
        assert_eq!(server.join().unwrap().len(), 1, "a fresh download is not tried twice");
    }

    #[test]
    fn concurrent_fetches_of_one_archive_download_it_once() {
        let data = sample(100_000);
        let sha = sha256_hex(&data[..]).unwrap();
        let (url, server) = serve(vec![answer("200 OK", &[("Content-Length", "100000")], &data)]);
        let dir = tempfile::tempdir().unwrap();
        let store = ArtifactStore::new(dir.path().to_owned());
        let artifact = Artifact { url, sha256: sha };
        let fetches: Vec<_> = (0..2)
            .map(|_| {
                let (store, artifact) = (store.clone(), artifact.clone());
                std::thread::spawn(move || store.fetch(&artifact, &AtomicBool::new(false)).map(std::fs::read))
            })
            .collect();
        for fetch in fetches {
            assert_eq!(fetch.join().unwrap().unwrap().unwrap(), data);
        }
        assert_eq!(server.join().unwrap().len(), 1);
    }
}
