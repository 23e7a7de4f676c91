//! Instance log files: `current.log` written by the instance itself (O_APPEND),
//! rotated by size into `current.log.1` .. `current.log.<keep>`.
//!
//! The cap per instance: a [`LogWatch`] looks at `current.log` every check interval,
//! sooner while it grows fast (down to [`MIN_CHECK_INTERVAL`]), and rotates it once it
//! is larger than `max_bytes`. A rotated copy holds at most `2 × max_bytes`: a file
//! that outgrew that between two checks keeps only its newest `max_bytes`, after a
//! line saying how much was cut. So an instance's logs take at most
//! `max_bytes + keep × 2 × max_bytes` (7 MiB with the defaults of 1 MiB and 3 copies),
//! plus what it writes within one check interval.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Name of the log file an instance writes.
pub const CURRENT: &str = "current.log";
/// Shortest wait between two checks of a log that grows fast.
pub const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Path of the `n`th rotated copy of `current` (`current.log.1` is the newest; `.0` is a copy in progress).
pub fn rotated(current: &Path, n: usize) -> PathBuf {
    let mut name = current.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// Rotates `current` when it is larger than `max_bytes`, keeping at most `keep`
/// old copies; returns whether it rotated.
///
/// The instance keeps its file descriptor (it may outlive the agent), so the file
/// is copied and truncated rather than renamed: O_APPEND makes the instance's next
/// write land at the new end. Lines written between copy and truncate are lost,
/// the usual price of copy-truncate. A file larger than `2 × max_bytes` is copied
/// from its newest `max_bytes` on, starting at a whole line.
pub fn rotate_if_larger(current: &Path, max_bytes: u64, keep: usize) -> io::Result<bool> {
    let len = match std::fs::metadata(current) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= max_bytes {
        return Ok(false);
    }
    if keep == 0 {
        OpenOptions::new().write(true).open(current)?.set_len(0)?;
        return Ok(true);
    }
    // The copy is made under a temporary name first, so a reader of `.1` never
    // sees a half-written file.
    let copy = rotated(current, 0);
    copy_newest(current, &copy, len, max_bytes)?;
    for n in (1..keep).rev() {
        match std::fs::rename(rotated(current, n), rotated(current, n + 1)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    std::fs::rename(&copy, rotated(current, 1))?;
    OpenOptions::new().write(true).open(current)?.set_len(0)?;
    Ok(true)
}

/// Copies `from` (`len` bytes) to `to`: whole up to `2 × max_bytes`, else its newest
/// `max_bytes` from the first line starting there, after a line telling what was cut.
fn copy_newest(from: &Path, to: &Path, len: u64, max_bytes: u64) -> io::Result<()> {
    if len <= max_bytes.saturating_mul(2) {
        return std::fs::copy(from, to).map(drop);
    }
    let mut source = BufReader::new(File::open(from)?);
    // From the byte before the cut: skip the rest of the line the cut falls in
    // (nothing if it falls on a line's start), unless that line is very long.
    let mut cut = len - max_bytes - 1;
    source.seek(SeekFrom::Start(cut))?;
    let mut partial = Vec::new();
    let skipped = io::Read::take(&mut source, 64 * 1024).read_until(b'\n', &mut partial)?;
    if partial.last() == Some(&b'\n') {
        cut += skipped as u64;
    } else {
        cut += 1;
        source.seek(SeekFrom::Start(cut))?;
    }
    let mut target = File::create(to)?;
    writeln!(
        target,
        "[supermesh-agent: {cut} older bytes of this log were dropped: it grew faster than it was rotated]"
    )?;
    io::copy(&mut io::Read::take(source, max_bytes), &mut target)?;
    Ok(())
}

/// When to look at a log next: half the time it would take to fill the `room` left
/// at the pace it `grew` over `over`, between [`MIN_CHECK_INTERVAL`] and `interval`.
pub fn next_check(grew: u64, over: Duration, room: u64, interval: Duration) -> Duration {
    if grew == 0 {
        return interval;
    }
    let fill_nanos = over.as_nanos().saturating_mul(u128::from(room)) / u128::from(grew);
    let half = Duration::from_nanos(u64::try_from(fill_nanos / 2).unwrap_or(u64::MAX));
    half.clamp(MIN_CHECK_INTERVAL, interval.max(MIN_CHECK_INTERVAL))
}

/// Keeps one instance's log within its cap: rotates it and says when to look again.
#[derive(Debug, Clone)]
pub struct LogWatch {
    current: PathBuf,
    max_bytes: u64,
    keep: usize,
    interval: Duration,
    /// Size and time of the last look.
    last: Option<(u64, Instant)>,
}

impl LogWatch {
    /// A watch on `current`, rotated past `max_bytes` into `keep` copies, looked at
    /// at least every `interval`.
    pub fn new(current: PathBuf, max_bytes: u64, keep: usize, interval: Duration) -> LogWatch {
        LogWatch { current, max_bytes, keep, interval, last: None }
    }

    /// Rotates the log if it is over its cap; returns how long to wait before the next check.
    pub fn check(&mut self, now: Instant) -> io::Result<Duration> {
        let found = self.size()?;
        let len = if rotate_if_larger(&self.current, self.max_bytes, self.keep)? { self.size()? } else { found };
        let grew = self.last.map_or(0, |(before, _)| found.saturating_sub(before));
        let over = self.last.map_or(self.interval, |(_, at)| now.saturating_duration_since(at));
        self.last = Some((len, now));
        Ok(next_check(grew, over, self.max_bytes.saturating_sub(len), self.interval))
    }

    /// Size of the log now; 0 before the instance first wrote it.
    fn size(&self) -> io::Result<u64> {
        match std::fs::metadata(&self.current) {
            Ok(meta) => Ok(meta.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_keeps_at_most_the_given_number_of_old_files() {
        let dir = tempfile::tempdir().unwrap();
        let current = dir.path().join(CURRENT);
        assert!(!rotate_if_larger(&current, 10, 3).unwrap(), "a missing log is not rotated");
        for round in 0..5u8 {
            std::fs::write(&current, [b'a' + round; 20]).unwrap();
            assert!(rotate_if_larger(&current, 10, 3).unwrap());
            assert_eq!(std::fs::metadata(&current).unwrap().len(), 0);
        }
        std::fs::write(&current, b"small").unwrap();
        assert!(!rotate_if_larger(&current, 10, 3).unwrap());
        // The newest copy is .1 (round 4 wrote 'e'), the oldest kept is .3 ('c').
        assert_eq!(std::fs::read(rotated(&current, 1)).unwrap(), [b'e'; 20]);
        assert_eq!(std::fs::read(rotated(&current, 3)).unwrap(), [b'c'; 20]);
        assert!(!rotated(&current, 4).exists());
    }

    #[test]
    fn a_log_that_outgrew_its_cap_keeps_only_its_newest_lines() {
        let dir = tempfile::tempdir().unwrap();
        let current = dir.path().join(CURRENT);
        // 10,000 lines of 100 bytes against a cap that cuts between lines, then within one.
        let text: String = (0..10_000).map(|i| format!("{i:099}\n")).collect();
        for cap in [10_000, 10_050] {
            std::fs::write(&current, &text).unwrap();
            assert!(rotate_if_larger(&current, cap, 3).unwrap());
            let copy = std::fs::read_to_string(rotated(&current, 1)).unwrap();
            let (note, kept) = copy.split_once('\n').unwrap();
            assert_eq!(kept, &text[text.len() - 10_000..], "cap {cap}: the newest 100 whole lines");
            assert!(note.contains(&format!("{} older bytes", text.len() - 10_000)), "{note}");
            assert_eq!(std::fs::metadata(&current).unwrap().len(), 0);
        }

        // Up to twice the cap a file is kept whole.
        let whole: String = (0..150).map(|i| format!("{i:099}\n")).collect();
        std::fs::write(&current, &whole).unwrap();
        assert!(rotate_if_larger(&current, 10_000, 3).unwrap());
        assert_eq!(std::fs::read_to_string(rotated(&current, 1)).unwrap(), whole);
    }

    #[test]
    fn fast_growth_brings_the_next_check_closer() {
        let interval = Duration::from_secs(5);
        assert_eq!(next_check(0, interval, 1000, interval), interval, "a quiet log waits the interval");
        // 512 KiB in 5 s with 512 KiB left fills in 5 s: look again in 2.5 s.
        assert_eq!(next_check(512 << 10, interval, 512 << 10, interval), Duration::from_millis(2500));
        assert_eq!(next_check(100 << 20, interval, 1 << 20, interval), MIN_CHECK_INTERVAL);
        assert_eq!(next_check(1, interval, 1 << 20, interval), interval);

        let dir = tempfile::tempdir().unwrap();
        let current = dir.path().join(CURRENT);
        let mut watch = LogWatch::new(current.clone(), 10_000, 2, interval);
        let start = Instant::now();
        assert_eq!(watch.check(start).unwrap(), interval);
        std::fs::write(&current, vec![b'x'; 5000]).unwrap();
        // 5000 bytes in 1 s, 5000 left: full in 1 s, so half a second.
        assert_eq!(watch.check(start + Duration::from_secs(1)).unwrap(), Duration::from_millis(500));
        std::fs::write(&current, vec![b'x'; 30_000]).unwrap();
        assert_eq!(watch.check(start + Duration::from_millis(1500)).unwrap(), MIN_CHECK_INTERVAL);
        let copy = std::fs::read(rotated(&current, 1)).unwrap();
        assert!(copy.len() <= 10_000 + 200, "a copy past twice the cap keeps the cap: {}", copy.len());
        assert_eq!(std::fs::metadata(&current).unwrap().len(), 0);
    }
}
