//! Instance log files: `current.log` written by the instance itself (O_APPEND),
//! rotated by size into `current.log.1` .. `current.log.<keep>`.

use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};

/// Name of the log file an instance writes.
pub const CURRENT: &str = "current.log";

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
/// the usual price of copy-truncate.
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
    std::fs::copy(current, &copy)?;
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
}
