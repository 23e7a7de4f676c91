//! What several fuzz targets share: node keys whose signatures the targets can check
//! (the committed corpus carries inputs signed with them, so that mutations start from
//! inputs that pass the signature checks).

use supermesh_protocol::identity::key_fingerprint;
use supermesh_protocol::signing::{CloudKey, KeyAlgorithm, NodeSignature, Purpose};

/// The Ed25519 key of node `name`, the same in every run (derived from its name).
pub fn node_key(name: &str) -> CloudKey {
    CloudKey::derive(&format!("supermesh fuzz node key/{name}"))
}

/// The fingerprint of `name`'s key, as a membership or the cloud's records give it.
pub fn fingerprint(name: &str) -> String {
    let public = hex::decode(node_key(name).public()).expect("a public key is hex");
    key_fingerprint(&public)
}

/// `name`'s signature of `body` for `purpose`.
pub fn sign(name: &str, purpose: Purpose, body: &[u8]) -> NodeSignature {
    let key = node_key(name);
    NodeSignature { algorithm: KeyAlgorithm::Ed25519, key: key.public(), value: key.sign(purpose, body) }
}
