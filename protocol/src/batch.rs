//! A supernode's batches of its cluster's reports, and the cloud's answer.
//!
//! Each relayed report is signed by the node that made it, so the supernode can pass it
//! on but not forge or alter it; the cloud answers with a [`Receipt`] per node, which it
//! signs, so the supernode cannot make a member delete a report the cloud never took.

use serde::{Deserialize, Serialize};

use crate::signing::{verify_cloud, CloudKey, NodeSignature, Purpose, SignatureError};
use crate::Operation;

/// Reports of several nodes of one cluster, sent upstream by their supernode in one
/// message (content of MetaSync on [`crate::BATCH_RESOURCE`]). The cloud answers with a
/// Response carrying a [`BatchAck`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReportBatch {
    /// The reports, oldest first per node.
    pub entries: Vec<RelayedReport>,
}

/// One outbox entry of a node, relayed by its supernode.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RelayedReport {
    /// The node that made the report.
    pub node: String,
    /// Its seq in that node's outbox: the node deletes it when this is acknowledged.
    pub seq: i64,
    /// Operation of the report (MetaSync).
    pub operation: Operation,
    /// Resource of the report: [`crate::STATUS_RESOURCE`] or an instance's resource string for events.
    pub resource: String,
    /// The report itself ([`crate::StatusReport`] or [`crate::EventReport`]), read with
    /// [`crate::Report::relayed`].
    pub content: serde_json::Value,
    /// When the node queued it, milliseconds since the epoch.
    pub created_ms: i64,
    /// The node's signature of the report ([`RelayedReport::signed_bytes`]); the cloud takes
    /// a report relayed for another node only with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<NodeSignature>,
}

impl RelayedReport {
    /// Which report this is, for acks.
    pub fn id(&self) -> ReportId {
        ReportId { node: self.node.clone(), seq: self.seq }
    }

    /// The bytes the node signs: every field but the signature, as compact JSON (objects of
    /// the content with their keys in order, so the bytes do not depend on who encodes them).
    pub fn signed_bytes(&self) -> Vec<u8> {
        let fields = (&self.node, self.seq, self.operation, &self.resource, &self.content, self.created_ms);
        serde_json::to_vec(&fields).unwrap_or_default()
    }

    /// Signs the report with `sign` (the node's key).
    pub fn sign(mut self, sign: impl FnOnce(Purpose, &[u8]) -> Option<NodeSignature>) -> RelayedReport {
        self.signature = sign(Purpose::Report, &self.signed_bytes());
        self
    }

    /// Whether the report carries its node's signature with the key of fingerprint
    /// `fingerprint` (the node's enrolled key).
    pub fn verify(&self, fingerprint: &str) -> Result<(), SignatureError> {
        let signature = self.signature.as_ref().ok_or(SignatureError::Malformed)?;
        signature.verify(fingerprint, Purpose::Report, &self.signed_bytes())
    }
}

/// Names one relayed report: node and outbox seq.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct ReportId {
    /// The node that made the report.
    pub node: String,
    /// Its outbox seq.
    pub seq: i64,
}

/// The cloud's answer to a [`ReportBatch`] (content of the Response).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BatchAck {
    /// Reports taken (or already taken before): their nodes delete them.
    pub acked: Vec<ReportId>,
    /// Reports refused for good, with the reason (for example a node of another network);
    /// their nodes delete them too, since sending them again cannot succeed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<(ReportId, String)>,
    /// The cloud's signed receipts, one per node of the batch whose reports it acked or
    /// refused for good with their signature checked: what a member deletes on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub receipts: Vec<Receipt>,
}

/// One report in a [`Receipt`]: its outbox seq and when the node queued it (a seq alone
/// could name another report after the node's store was made anew).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
pub struct Receipted {
    /// Outbox seq.
    pub seq: i64,
    /// The report's `created_ms`.
    pub created_ms: i64,
}

/// The cloud's word that it is done with some of a node's relayed reports (taken, or
/// refused for good), signed with its [`CloudKey`] for that node and the key it enrolled.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Receipt {
    /// The node whose reports these are.
    pub node: String,
    /// The reports.
    pub reports: Vec<Receipted>,
    /// Hex signature by the cloud ([`Purpose::Receipt`]).
    pub signature: String,
}

impl Receipt {
    fn signed_bytes(node: &str, key: &str, reports: &[Receipted]) -> Vec<u8> {
        serde_json::to_vec(&(node, key, reports)).unwrap_or_default()
    }

    /// The receipt for `reports` of `node`, whose enrolled key has fingerprint `key`.
    pub fn sign(cloud: &CloudKey, node: &str, key: &str, reports: Vec<Receipted>) -> Receipt {
        let signature = cloud.sign(Purpose::Receipt, &Receipt::signed_bytes(node, key, &reports));
        Receipt { node: node.to_owned(), reports, signature }
    }

    /// Whether the cloud of public key `cloud` signed this receipt for `node` with the key
    /// of fingerprint `key`.
    pub fn verify(&self, cloud: &str, node: &str, key: &str) -> bool {
        self.node == node
            && verify_cloud(cloud, Purpose::Receipt, &Receipt::signed_bytes(node, key, &self.reports), &self.signature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::tests::TestKey;

    fn report() -> RelayedReport {
        RelayedReport {
            node: "m".into(),
            seq: 4,
            operation: Operation::MetaSync,
            resource: crate::STATUS_RESOURCE.into(),
            content: serde_json::json!({"takenMs": 9, "instances": [], "b": 1.5, "a": [1, "x"]}),
            created_ms: 8,
            signature: None,
        }
    }

    #[test]
    fn a_relayed_report_verifies_after_the_wire_and_not_after_an_alteration() {
        let key = TestKey::new();
        let signed = report().sign(|p, b| Some(key.sign(p, b)));
        let wire: RelayedReport = serde_json::from_str(&serde_json::to_string(&signed).unwrap()).unwrap();
        assert_eq!(wire.verify(&key.fingerprint()), Ok(()));
        assert_eq!(report().verify(&key.fingerprint()), Err(SignatureError::Malformed), "unsigned");
        let mut altered = wire.clone();
        altered.content = serde_json::json!({"takenMs": 9, "instances": [], "b": 1.5, "a": [2, "x"]});
        assert_eq!(altered.verify(&key.fingerprint()), Err(SignatureError::Invalid));
        let moved = RelayedReport { seq: 5, ..wire.clone() };
        assert_eq!(moved.verify(&key.fingerprint()), Err(SignatureError::Invalid));
        assert_eq!(wire.verify(&TestKey::new().fingerprint()), Err(SignatureError::NotTheNodesKey));
    }

    #[test]
    fn a_relayed_report_with_numbers_verifies_after_every_hop() {
        // Member to supernode to cloud, each decoding and encoding the content again: a number
        // that did not read back exactly (before float_roundtrip) broke the signature.
        let key = TestKey::new();
        let content = serde_json::json!({"takenMs": 9, "instances": [], "load": 12.777777777777779});
        let signed = RelayedReport { content, ..report() }.sign(|p, b| Some(key.sign(p, b)));
        let mut hop = signed;
        for _ in 0..3 {
            hop = serde_json::from_str(&serde_json::to_string(&hop).unwrap()).unwrap();
        }
        assert_eq!(hop.verify(&key.fingerprint()), Ok(()));
    }

    #[test]
    fn a_receipt_holds_only_for_its_node_and_key() {
        let cloud = CloudKey::derive("root");
        let reports = vec![Receipted { seq: 4, created_ms: 8 }];
        let receipt = Receipt::sign(&cloud, "m", "key-m", reports.clone());
        assert!(receipt.verify(&cloud.public(), "m", "key-m"));
        assert!(!receipt.verify(&cloud.public(), "m", "key-of-a-new-enrollment"));
        assert!(!receipt.verify(&cloud.public(), "other", "key-m"));
        assert!(!receipt.verify(&CloudKey::derive("elsewhere").public(), "m", "key-m"));
        let widened = Receipt { reports: vec![reports[0], Receipted { seq: 5, created_ms: 9 }], ..receipt };
        assert!(!widened.verify(&cloud.public(), "m", "key-m"), "a supernode cannot add reports to a receipt");
    }
}
