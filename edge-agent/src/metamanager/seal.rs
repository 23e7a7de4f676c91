//! Sealing of what the agent keeps about secrets: configuration snapshots are stored
//! in `meta.db` encrypted with a key of the device (ChaCha20-Poly1305), so neither the
//! database file nor its WAL ever holds a secret's value in clear.
//!
//! The key is 32 random bytes made on first use in `dataDir/identity/config.key`
//! (mode 0600, in the 0700 identity directory) and never leaves the device. A sealed
//! blob is `version (1 byte) ‖ nonce (12 random bytes) ‖ ciphertext ‖ tag (16 bytes)`;
//! the resource string it belongs to is authenticated with it, so a blob cannot be
//! moved to another row. Losing the key only loses the stored snapshots: the agent
//! asks the cloud for them again while it is connected.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

/// File name of the sealing key in the identity directory.
pub const KEY_FILE: &str = "config.key";
/// Length of the key, in bytes.
pub const KEY_LEN: usize = 32;
/// First byte of every sealed blob: the format.
const FORMAT: u8 = 1;

/// Why sealing, unsealing or loading the key failed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The key file could not be read or written.
    #[error("cannot read or create the sealing key {}: {source}", path.display())]
    Io {
        /// The key file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The key file does not hold a key.
    #[error(
        "{} is not a sealing key ({len} bytes, {KEY_LEN} expected); remove it: the agent makes a new one \
         and asks the cloud again for the configuration it stored",
        path.display()
    )]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// The system's random generator failed.
    #[error("the system random generator failed")]
    Random,
    /// The blob is not one this agent sealed, was changed, or was sealed with another key.
    #[error("cannot unseal: the stored data was tampered with, is damaged, or was sealed with another key")]
    Unopenable,
}

/// The device's sealing key. Its Debug output shows no key material.
pub struct SealingKey {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealingKey(<redacted>)")
    }
}

impl SealingKey {
    /// The key of `bytes`.
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> SealingKey {
        let key = UnboundKey::new(&CHACHA20_POLY1305, bytes).expect("a 32-byte key suits ChaCha20-Poly1305");
        SealingKey { key: LessSafeKey::new(key), rng: SystemRandom::new() }
    }

    /// A new random key, held in memory only.
    pub fn generate() -> Result<SealingKey, SealError> {
        Ok(SealingKey::from_bytes(&random_key(&SystemRandom::new())?))
    }

    /// The key in `dir/config.key`, made now (0600, `dir` 0700) if there is none.
    pub fn load_or_create(dir: &Path) -> Result<SealingKey, SealError> {
        let path = dir.join(KEY_FILE);
        let io = |source| SealError::Io { path: path.clone(), source };
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
        match std::fs::read(&path) {
            Ok(bytes) => {
                let key: [u8; KEY_LEN] = bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| SealError::BadKey { path: path.clone(), len: bytes.len() })?;
                // A key left readable by others (copied around, say) is closed again.
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
                Ok(SealingKey::from_bytes(&key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = random_key(&SystemRandom::new())?;
                // Whole or not at all: a crash must not leave a short key behind.
                let partial = dir.join(format!("{KEY_FILE}.partial"));
                let _ = std::fs::remove_file(&partial);
                let mut file =
                    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&partial).map_err(io)?;
                file.write_all(&key).and_then(|()| file.sync_all()).map_err(io)?;
                std::fs::rename(&partial, &path).map_err(io)?;
                Ok(SealingKey::from_bytes(&key))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Encrypts `plaintext`, binding it to `context` (the resource string it is stored under).
    pub fn seal(&self, plaintext: &[u8], context: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| SealError::Random)?;
        let mut in_out = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(context), &mut in_out)
            .map_err(|_| SealError::Random)?;
        let mut blob = Vec::with_capacity(1 + NONCE_LEN + in_out.len());
        blob.push(FORMAT);
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&in_out);
        Ok(blob)
    }

    /// Decrypts a blob [`SealingKey::seal`] made with this key for `context`.
    pub fn open(&self, blob: &[u8], context: &[u8]) -> Result<Vec<u8>, SealError> {
        let (&format, rest) = blob.split_first().ok_or(SealError::Unopenable)?;
        if format != FORMAT || rest.len() < NONCE_LEN + CHACHA20_POLY1305.tag_len() {
            return Err(SealError::Unopenable);
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Unopenable)?;
        let mut in_out = sealed.to_vec();
        let plaintext =
            self.key.open_in_place(nonce, Aad::from(context), &mut in_out).map_err(|_| SealError::Unopenable)?;
        Ok(plaintext.to_vec())
    }
}

fn random_key(rng: &SystemRandom) -> Result<[u8; KEY_LEN], SealError> {
    let mut key = [0u8; KEY_LEN];
    rng.fill(&mut key).map_err(|_| SealError::Random)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = br#"{"secrets":{"db":{"password":"hunter2-very-secret"}}}"#;
    const CONTEXT: &[u8] = b"team/config/web-1";

    #[test]
    fn a_sealed_blob_opens_with_its_key_and_context_and_hides_the_plaintext() {
        let key = SealingKey::generate().unwrap();
        let blob = key.seal(SECRET, CONTEXT).unwrap();
        assert_eq!(key.open(&blob, CONTEXT).unwrap(), SECRET);
        assert!(!blob.windows(b"hunter2".len()).any(|w| w == b"hunter2"), "the blob holds no plaintext");
        assert_eq!(blob.len(), 1 + NONCE_LEN + SECRET.len() + 16);
        let again = key.seal(SECRET, CONTEXT).unwrap();
        assert_ne!(blob, again, "a fresh nonce for every seal");
        assert_eq!(key.open(&again, CONTEXT).unwrap(), SECRET);
        assert_eq!(key.open(&key.seal(b"", CONTEXT).unwrap(), CONTEXT).unwrap(), b"");
        assert!(!format!("{key:?}").contains("key:"), "{key:?}");
    }

    #[test]
    fn a_tampered_blob_another_context_or_another_key_fails_clearly() {
        let key = SealingKey::generate().unwrap();
        let blob = key.seal(SECRET, CONTEXT).unwrap();
        for i in [0, 1, NONCE_LEN + 1, blob.len() - 1] {
            let mut tampered = blob.clone();
            tampered[i] ^= 0x01;
            assert!(matches!(key.open(&tampered, CONTEXT), Err(SealError::Unopenable)), "byte {i} changed");
        }
        assert!(matches!(key.open(&blob[..blob.len() - 1], CONTEXT), Err(SealError::Unopenable)), "truncated");
        assert!(matches!(key.open(&[], CONTEXT), Err(SealError::Unopenable)));
        assert!(matches!(key.open(&blob, b"team/config/other"), Err(SealError::Unopenable)), "another row");
        let other = SealingKey::generate().unwrap();
        let err = other.open(&blob, CONTEXT).unwrap_err();
        assert!(err.to_string().contains("another key"), "{err}");
    }

    #[test]
    fn the_key_is_made_once_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let identity = dir.path().join("identity");
        let first = SealingKey::load_or_create(&identity).unwrap();
        let path = identity.join(KEY_FILE);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&identity).unwrap().permissions().mode() & 0o777, 0o700);
        assert_eq!(std::fs::read(&path).unwrap().len(), KEY_LEN);
        let blob = first.seal(SECRET, CONTEXT).unwrap();
        let second = SealingKey::load_or_create(&identity).unwrap();
        assert_eq!(second.open(&blob, CONTEXT).unwrap(), SECRET, "the same key after a restart");
        assert!(!identity.join(format!("{KEY_FILE}.partial")).exists());

        std::fs::write(&path, b"short").unwrap();
        let err = SealingKey::load_or_create(&identity).unwrap_err();
        assert!(matches!(err, SealError::BadKey { len: 5, .. }) && err.to_string().contains(KEY_FILE), "{err}");
    }
}
