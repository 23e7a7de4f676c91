//! Signatures on what crosses a network cluster: nodes sign with the key their
//! certificate carries (made on the device, never sent), the cloud signs its receipts
//! with a key of its own. Both sides verify with the same functions.
//!
//! A node's signature carries its public key; a verifier takes it only when the key's
//! fingerprint is the one the cloud's records give for that node (its EdgeNode's
//! `supermesh.io/identity`, sent to the node's peers in the
//! [`Membership`](crate::Membership)), so nobody can sign for a node but the node.
//! Every signature is made over a label naming its [`Purpose`] followed by the bytes
//! signed, so that a signature made for one purpose never passes for another.

use ring::signature::{self, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, VerificationAlgorithm};
use serde::{Deserialize, Serialize};

use crate::identity::key_fingerprint;

/// Longest hex public key accepted (an uncompressed P-384 point).
const MAX_KEY_HEX: usize = 2 * 97;
/// Longest hex signature accepted (a DER ECDSA P-384 signature).
const MAX_SIGNATURE_HEX: usize = 2 * 104;

/// What a signature is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A peer heartbeat ([`crate::peer::Heartbeat`]).
    Heartbeat,
    /// A report a supernode relays for the node that made it ([`crate::RelayedReport`]).
    Report,
    /// A node's registry of its cluster ([`crate::peer::Registry`]).
    Registry,
    /// The cloud's receipt for a node's relayed reports ([`crate::Receipt`]).
    Receipt,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Purpose::Heartbeat => b"supermesh heartbeat v2\n",
            Purpose::Report => b"supermesh relayed report v1\n",
            Purpose::Registry => b"supermesh registry v1\n",
            Purpose::Receipt => b"supermesh receipt v1\n",
        }
    }

    /// The bytes a signature for this purpose is made over: the label, then `body`.
    pub fn message(self, body: &[u8]) -> Vec<u8> {
        let mut message = Vec::with_capacity(self.label().len() + body.len());
        message.extend_from_slice(self.label());
        message.extend_from_slice(body);
        message
    }
}

/// The algorithm of a node's key (agents make ECDSA P-256 keys).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum KeyAlgorithm {
    /// ECDSA on P-256 with SHA-256, DER-encoded signatures.
    EcdsaP256,
    /// ECDSA on P-384 with SHA-384, DER-encoded signatures.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
}

impl KeyAlgorithm {
    fn verification(self) -> &'static dyn VerificationAlgorithm {
        match self {
            KeyAlgorithm::EcdsaP256 => &signature::ECDSA_P256_SHA256_ASN1,
            KeyAlgorithm::EcdsaP384 => &signature::ECDSA_P384_SHA384_ASN1,
            KeyAlgorithm::Ed25519 => &signature::ED25519,
        }
    }
}

/// Why a signature was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The key or signature is not hex of a sensible length.
    #[error("the signature or its key is malformed")]
    Malformed,
    /// The key is not the one the cloud's records give for the node.
    #[error("signed with a key that is not the node's enrolled key")]
    NotTheNodesKey,
    /// The signature does not verify with the key.
    #[error("the signature does not verify")]
    Invalid,
}

/// A node's signature, with the public key it verifies with.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeSignature {
    /// The key's algorithm.
    pub algorithm: KeyAlgorithm,
    /// Hex of the node's raw public key (as its certificate carries it).
    pub key: String,
    /// Hex of the signature.
    pub value: String,
}

impl NodeSignature {
    /// Signs `body` for `purpose` with `sign` (the node's key), whose public key is `key`.
    pub fn make(
        algorithm: KeyAlgorithm,
        key: &[u8],
        purpose: Purpose,
        body: &[u8],
        sign: impl FnOnce(&[u8]) -> Option<Vec<u8>>,
    ) -> Option<NodeSignature> {
        let value = sign(&purpose.message(body))?;
        Some(NodeSignature { algorithm, key: hex::encode(key), value: hex::encode(value) })
    }

    /// Whether this signs `body` for `purpose` with the key of fingerprint `fingerprint`
    /// (what the cloud's records give for the node); if not, why.
    pub fn verify(&self, fingerprint: &str, purpose: Purpose, body: &[u8]) -> Result<(), SignatureError> {
        if self.key.len() > MAX_KEY_HEX || self.value.len() > MAX_SIGNATURE_HEX {
            return Err(SignatureError::Malformed);
        }
        let key = hex::decode(&self.key).map_err(|_| SignatureError::Malformed)?;
        let value = hex::decode(&self.value).map_err(|_| SignatureError::Malformed)?;
        if key_fingerprint(&key) != fingerprint {
            return Err(SignatureError::NotTheNodesKey);
        }
        UnparsedPublicKey::new(self.algorithm.verification(), &key)
            .verify(&purpose.message(body), &value)
            .map_err(|_| SignatureError::Invalid)
    }

    /// Fingerprint of the key this signature carries (whether it verifies or not).
    pub fn fingerprint(&self) -> Option<String> {
        hex::decode(&self.key).ok().map(|k| key_fingerprint(&k))
    }
}

/// The cloud's signing key for receipts: Ed25519, derived from the cloud's secret root
/// (so every controller replica holds the same one). Its public half goes to every node
/// in its [`Membership`](crate::Membership).
pub struct CloudKey(Ed25519KeyPair);

impl CloudKey {
    /// The key derived from `root`.
    pub fn derive(root: &str) -> CloudKey {
        use hmac::{Hmac, Mac};
        let mut seed = Hmac::<sha2::Sha256>::new_from_slice(root.as_bytes()).expect("HMAC takes keys of any length");
        seed.update(b"supermesh cloud receipt key v1");
        let seed = seed.finalize().into_bytes();
        CloudKey(Ed25519KeyPair::from_seed_unchecked(&seed).expect("any 32 bytes are an Ed25519 seed"))
    }

    /// Hex of the public key.
    pub fn public(&self) -> String {
        hex::encode(self.0.public_key().as_ref())
    }

    /// The hex signature of `body` for `purpose`.
    pub fn sign(&self, purpose: Purpose, body: &[u8]) -> String {
        hex::encode(self.0.sign(&purpose.message(body)).as_ref())
    }
}

impl std::fmt::Debug for CloudKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CloudKey").field(&self.public()).finish()
    }
}

/// Whether `signature` (hex) signs `body` for `purpose` with the cloud's key `public` (hex).
pub fn verify_cloud(public: &str, purpose: Purpose, body: &[u8], signature: &str) -> bool {
    if public.len() != 64 || signature.len() != 128 {
        return false;
    }
    let (Ok(public), Ok(signature)) = (hex::decode(public), hex::decode(signature)) else { return false };
    UnparsedPublicKey::new(&signature::ED25519, &public).verify(&purpose.message(body), &signature).is_ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::EcdsaKeyPair;

    /// A P-256 node key, as agents make them: its public key and a signing function.
    pub(crate) struct TestKey(EcdsaKeyPair);

    impl TestKey {
        pub(crate) fn new() -> TestKey {
            let rng = SystemRandom::new();
            let alg = &signature::ECDSA_P256_SHA256_ASN1_SIGNING;
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
            TestKey(EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap())
        }

        pub(crate) fn fingerprint(&self) -> String {
            key_fingerprint(self.0.public_key().as_ref())
        }

        pub(crate) fn sign(&self, purpose: Purpose, body: &[u8]) -> NodeSignature {
            let rng = SystemRandom::new();
            NodeSignature::make(KeyAlgorithm::EcdsaP256, self.0.public_key().as_ref(), purpose, body, |m| {
                self.0.sign(&rng, m).ok().map(|s| s.as_ref().to_vec())
            })
            .unwrap()
        }
    }

    #[test]
    fn a_node_signature_verifies_only_with_its_key_for_its_purpose_and_body() {
        let (key, other) = (TestKey::new(), TestKey::new());
        let signed = key.sign(Purpose::Heartbeat, b"beat");
        assert_eq!(signed.verify(&key.fingerprint(), Purpose::Heartbeat, b"beat"), Ok(()));
        assert_eq!(signed.fingerprint(), Some(key.fingerprint()));
        assert_eq!(
            signed.verify(&other.fingerprint(), Purpose::Heartbeat, b"beat"),
            Err(SignatureError::NotTheNodesKey)
        );
        assert_eq!(signed.verify(&key.fingerprint(), Purpose::Report, b"beat"), Err(SignatureError::Invalid));
        assert_eq!(signed.verify(&key.fingerprint(), Purpose::Heartbeat, b"beat!"), Err(SignatureError::Invalid));
        // Another key presented as this one's: the fingerprint gives it away.
        let forged = NodeSignature { key: signed.key.clone(), ..other.sign(Purpose::Heartbeat, b"beat") };
        assert_eq!(forged.verify(&key.fingerprint(), Purpose::Heartbeat, b"beat"), Err(SignatureError::Invalid));
        for bad in [
            NodeSignature { value: "zz".into(), ..signed.clone() },
            NodeSignature { key: "0".repeat(MAX_KEY_HEX + 2), ..signed.clone() },
            NodeSignature { value: "00".repeat(MAX_SIGNATURE_HEX), ..signed.clone() },
        ] {
            assert_eq!(bad.verify(&key.fingerprint(), Purpose::Heartbeat, b"beat"), Err(SignatureError::Malformed));
        }
    }

    #[test]
    fn the_cloud_key_is_the_same_for_the_same_root_and_verifies_its_receipts() {
        let key = CloudKey::derive("root-root-root");
        assert_eq!(key.public(), CloudKey::derive("root-root-root").public(), "every replica derives the same key");
        assert_ne!(key.public(), CloudKey::derive("another-root").public());
        let signature = key.sign(Purpose::Receipt, b"acked");
        assert!(verify_cloud(&key.public(), Purpose::Receipt, b"acked", &signature));
        assert!(!verify_cloud(&key.public(), Purpose::Receipt, b"acked!", &signature));
        assert!(!verify_cloud(&key.public(), Purpose::Registry, b"acked", &signature));
        assert!(!verify_cloud(&CloudKey::derive("x").public(), Purpose::Receipt, b"acked", &signature));
        assert!(!verify_cloud(&key.public(), Purpose::Receipt, b"acked", "zz"));
    }
}
