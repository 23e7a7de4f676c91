//! The node's identity: a key made on the device (kept 0600 in `dataDir/identity`,
//! never sent), the certificate the cloud issued for it, and the CA it pins. The
//! agent trades its join token for the certificate once (enrollment), then connects
//! with the certificate and renews it at 70 to 90 % of its lifetime; a certificate
//! that expired while the device was offline renews itself within the cloud's grace.
//!
//! The same key signs what the node says on its LAN (heartbeats, relayed reports,
//! registries, see `supernode`): its peers and the cloud check those signatures against
//! the key fingerprint the cloud recorded when the node enrolled.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, DnType, KeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use supermesh_protocol::identity::{key_fingerprint, Issued, JoinString};
use supermesh_protocol::signing::{KeyAlgorithm, NodeSignature, Purpose};

/// Files of the identity directory.
const KEY_FILE: &str = "node.key";
const CERT_FILE: &str = "node.crt";
const VALIDITY_FILE: &str = "node.json";

/// Why the identity could not be read or kept.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file of the identity directory could not be read or written.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The stored key or certificate is unreadable.
    #[error("{0}")]
    Corrupt(String),
    /// Neither a certificate nor a join token.
    #[error(
        "this node has no certificate yet and edge.yaml has no cloud.token to enroll with; \
         create one with `supermeshctl token create` and put it in cloud.token"
    )]
    NotEnrolled,
}

/// The validity of the certificate held, beside it on disk.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
struct Validity {
    not_before: i64,
    not_after: i64,
    /// Whether the node was approved when the certificate was issued.
    #[serde(default)]
    approved: bool,
}

/// A certificate the node holds.
#[derive(Clone, Debug)]
struct Held {
    der: CertificateDer<'static>,
    validity: Validity,
    /// When to renew it: a point between 70 and 90 % of its lifetime, drawn once.
    renew_at: i64,
}

/// Where the certificate stands now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// No certificate: enroll with the join token.
    Missing,
    /// Valid; renew it at this Unix second.
    Valid {
        /// Unix second to renew at.
        renew_at: i64,
    },
    /// Expired: renew it (the cloud allows that within its grace window).
    Expired,
}

/// The node's key and certificate. Share it as `Arc<Identity>`.
pub struct Identity {
    dir: Option<PathBuf>,
    key: KeyPair,
    /// Fingerprint of the cloud CA: the join token's, then the one enrolled with.
    ca_hash: RwLock<String>,
    held: RwLock<Option<Held>>,
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |e| IdentityError::Io(path.display().to_string(), e)
}

impl Identity {
    /// The identity kept in `dir` (created 0700, the key made 0600 on first use), or held in
    /// memory only when `dir` is `None` (simulated agents). `token` is the join string from
    /// edge.yaml, if any: it pins the CA until the node enrolled.
    pub fn load(dir: Option<&Path>, token: Option<&JoinString>) -> Result<Identity, IdentityError> {
        let Some(dir) = dir else {
            let key = KeyPair::generate().map_err(|e| IdentityError::Corrupt(format!("cannot make a key: {e}")))?;
            let ca_hash = token.ok_or(IdentityError::NotEnrolled)?.ca_hash.clone();
            return Ok(Identity { dir: None, key, ca_hash: RwLock::new(ca_hash), held: RwLock::new(None) });
        };
        create_private_dir(dir)?;
        let key = load_or_make_key(&dir.join(KEY_FILE))?;
        let held = load_certificate(dir)?;
        let pinned = std::fs::read_to_string(dir.join("cloud-ca.sha256")).ok().map(|s| s.trim().to_owned());
        let ca_hash = match (&held, pinned, token) {
            // Enrolled: the CA it enrolled with, whatever a token left in edge.yaml says.
            (Some(_), Some(pinned), _) => pinned,
            (_, _, Some(token)) => token.ca_hash.clone(),
            (_, Some(pinned), None) => pinned,
            (_, None, None) => return Err(IdentityError::NotEnrolled),
        };
        Ok(Identity { dir: Some(dir.to_owned()), key, ca_hash: RwLock::new(ca_hash), held: RwLock::new(held) })
    }

    /// Fingerprint of the cloud CA the agent trusts.
    pub fn ca_hash(&self) -> String {
        self.ca_hash.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Where the certificate stands now.
    pub fn standing(&self) -> Standing {
        match &*self.held.read().unwrap_or_else(|p| p.into_inner()) {
            None => Standing::Missing,
            Some(h) if now() >= h.validity.not_after => Standing::Expired,
            Some(h) => Standing::Valid { renew_at: h.renew_at },
        }
    }

    /// The certificate and key to present, if the node holds a certificate.
    pub fn client_auth(&self) -> Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let held = self.held.read().unwrap_or_else(|p| p.into_inner()).clone()?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()));
        Some((vec![held.der], key))
    }

    /// A certificate signing request for `node` with the device's key (PEM).
    pub fn csr(&self, node: &str) -> Result<String, String> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, node);
        let request = params.serialize_request(&self.key).map_err(|e| format!("cannot make a signing request: {e}"))?;
        request.pem().map_err(|e| format!("cannot encode the signing request: {e}"))
    }

    /// Keeps `issued` as the node's certificate (on disk first, then for the next connection).
    pub fn store(&self, issued: &Issued) -> Result<(), IdentityError> {
        let der = CertificateDer::from_pem_slice(issued.certificate.as_bytes())
            .map_err(|e| IdentityError::Corrupt(format!("the cloud sent an unreadable certificate: {e}")))?;
        let validity =
            Validity { not_before: issued.not_before, not_after: issued.not_after, approved: issued.approved };
        if let Some(dir) = &self.dir {
            let json = serde_json::to_vec(&validity).expect("plain fields serialize");
            write_atomically(&dir.join(CERT_FILE), issued.certificate.as_bytes(), 0o644)?;
            write_atomically(&dir.join(VALIDITY_FILE), &json, 0o644)?;
            write_atomically(&dir.join("cloud-ca.sha256"), self.ca_hash().as_bytes(), 0o644)?;
        }
        *self.held.write().unwrap_or_else(|p| p.into_inner()) =
            Some(Held { der: der.into_owned(), validity, renew_at: renew_point(validity) });
        Ok(())
    }

    /// Whether the node was approved when its certificate was last issued.
    pub fn approved(&self) -> bool {
        self.held.read().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|h| h.validity.approved)
    }

    /// Fingerprint of the node's public key: what the cloud records when the node enrolls,
    /// and what its peers check its signatures against.
    pub fn fingerprint(&self) -> String {
        key_fingerprint(self.key.public_key_raw())
    }

    /// The node's signature of `body` for `purpose`; `None` for a key of an algorithm peers
    /// cannot check (agents make ECDSA P-256 keys).
    pub fn sign(&self, purpose: Purpose, body: &[u8]) -> Option<NodeSignature> {
        let algorithm = key_algorithm(&self.key)?;
        NodeSignature::make(algorithm, self.key.public_key_raw(), purpose, body, |message| {
            rcgen::SigningKey::sign(&self.key, message).ok()
        })
    }
}

/// The peer-protocol name of `key`'s algorithm, if peers can check its signatures.
fn key_algorithm(key: &KeyPair) -> Option<KeyAlgorithm> {
    let alg = key.algorithm();
    if alg == &rcgen::PKCS_ECDSA_P256_SHA256 {
        Some(KeyAlgorithm::EcdsaP256)
    } else if alg == &rcgen::PKCS_ECDSA_P384_SHA384 {
        Some(KeyAlgorithm::EcdsaP384)
    } else if alg == &rcgen::PKCS_ED25519 {
        Some(KeyAlgorithm::Ed25519)
    } else {
        None
    }
}

/// A point between 70 and 90 % of the certificate's lifetime, so that nodes enrolled
/// together do not all renew together.
fn renew_point(v: Validity) -> i64 {
    let lifetime = (v.not_after - v.not_before).max(1) as f64;
    v.not_before + (lifetime * rand::random_range(0.7..0.9)) as i64
}

/// How long to wait before renewing a certificate to renew at Unix second `at`.
pub fn until(at: i64) -> Duration {
    Duration::from_secs(at.saturating_sub(now()).max(0) as u64)
}

fn create_private_dir(dir: &Path) -> Result<(), IdentityError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))
}

/// The device's key: read, or made now and written 0600 (never world-readable, not even briefly).
fn load_or_make_key(path: &Path) -> Result<KeyPair, IdentityError> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read_to_string(path) {
        Ok(pem) => KeyPair::from_pem(&pem).map_err(|e| {
            IdentityError::Corrupt(format!("{}: unreadable key ({e}); remove it to enroll anew", path.display()))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = KeyPair::generate().map_err(|e| IdentityError::Corrupt(format!("cannot make a key: {e}")))?;
            let mut file =
                std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io(path))?;
            file.write_all(key.serialize_pem().as_bytes()).and_then(|()| file.sync_all()).map_err(io(path))?;
            Ok(key)
        }
        Err(e) => Err(io(path)(e)),
    }
}

fn load_certificate(dir: &Path) -> Result<Option<Held>, IdentityError> {
    let (cert, validity) = (dir.join(CERT_FILE), dir.join(VALIDITY_FILE));
    let Ok(pem) = std::fs::read(&cert) else { return Ok(None) };
    let der = CertificateDer::from_pem_slice(&pem)
        .map_err(|e| IdentityError::Corrupt(format!("{}: unreadable certificate: {e}", cert.display())))?;
    let validity: Validity = std::fs::read(&validity)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| IdentityError::Corrupt(format!("{}: missing or unreadable", validity.display())))?;
    Ok(Some(Held { der: der.into_owned(), validity, renew_at: renew_point(validity) }))
}

/// Writes `path` whole or not at all: a crash leaves the old file or the new one.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp).map_err(io(&tmp))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const JOIN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.abc123.0123456789abcdef";

    fn issued(not_before: i64, not_after: i64) -> Issued {
        // Any certificate will do for storing: the agent does not parse it.
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["pi".into()]).unwrap().self_signed(&key).unwrap();
        Issued { certificate: cert.pem(), not_before, not_after, approved: true }
    }

    #[test]
    fn the_key_is_made_once_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let join: JoinString = JOIN.parse().unwrap();
        let first = Identity::load(Some(&dir.path().join("identity")), Some(&join)).unwrap();
        let key = dir.path().join("identity").join(KEY_FILE);
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(dir.path().join("identity")).unwrap().permissions().mode() & 0o777, 0o700);
        let again = Identity::load(Some(&dir.path().join("identity")), Some(&join)).unwrap();
        assert_eq!(first.key.serialize_der(), again.key.serialize_der(), "the same key after a restart");
        assert_eq!(first.standing(), Standing::Missing);
        assert!(first.csr("pi-kitchen").unwrap().starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
    }

    #[test]
    fn an_enrolled_node_needs_no_token_and_keeps_its_ca_pin() {
        let dir = tempfile::tempdir().unwrap();
        let join: JoinString = JOIN.parse().unwrap();
        assert!(matches!(Identity::load(Some(dir.path()), None), Err(IdentityError::NotEnrolled)));
        let identity = Identity::load(Some(dir.path()), Some(&join)).unwrap();
        let t = now();
        identity.store(&issued(t - 10, t + 1000)).unwrap();
        let Standing::Valid { renew_at } = identity.standing() else { panic!("valid") };
        assert!((t - 10 + 707..=t - 10 + 909).contains(&renew_at), "renews at 70-90 % of the lifetime: {renew_at}");
        let restarted = Identity::load(Some(dir.path()), None).unwrap();
        assert_eq!(restarted.ca_hash(), join.ca_hash);
        assert!(restarted.client_auth().is_some());
        assert!(restarted.approved());
        restarted.store(&issued(t - 100, t - 1)).unwrap();
        assert_eq!(restarted.standing(), Standing::Expired);
    }

    #[test]
    fn the_node_signs_with_the_key_the_cloud_records_at_enrollment() {
        let join: JoinString = JOIN.parse().unwrap();
        let identity = Identity::load(None, Some(&join)).unwrap();
        let signed = identity.sign(Purpose::Heartbeat, b"beat").unwrap();
        assert_eq!(signed.verify(&identity.fingerprint(), Purpose::Heartbeat, b"beat"), Ok(()));
        // The cloud fingerprints the key of the CSR it signs, and of the certificate presented.
        let csr = rcgen::CertificateSigningRequestParams::from_pem(&identity.csr("pi").unwrap()).unwrap();
        assert_eq!(key_fingerprint(rcgen::PublicKeyData::der_bytes(&csr.public_key)), identity.fingerprint());
        let other = Identity::load(None, Some(&join)).unwrap();
        assert!(signed.verify(&other.fingerprint(), Purpose::Heartbeat, b"beat").is_err());
    }

    #[test]
    fn a_corrupt_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(KEY_FILE), "not a key").unwrap();
        let join: JoinString = JOIN.parse().unwrap();
        let error = Identity::load(Some(dir.path()), Some(&join)).err().unwrap().to_string();
        assert!(error.contains("node.key") && error.contains("unreadable key"), "{error}");
    }
}
