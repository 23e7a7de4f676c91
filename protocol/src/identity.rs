//! Node identity: bootstrap tokens, join strings, and the enrollment and renewal
//! exchanges through which an agent gets the certificate it connects with.
//!
//! A device joins with a join string `<ca-fingerprint>.<token-id>.<token-secret>`:
//! the fingerprint pins the cloud's CA, the token (kubeadm-style `<id>.<secret>`)
//! lets it enroll once. Enrollment is one request and one answer over a WebSocket
//! at [`ENROLL_PATH`]: the agent sends a certificate signing request for its node
//! name (its key never leaves the device) and gets a certificate whose common name
//! is the node name. From then on it connects to [`crate::CONNECT_PATH`] with that
//! certificate (mTLS), and renews it at [`RENEW_PATH`] with the certificate itself.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Location;

/// Where an agent enrolls with a bootstrap token (no client certificate needed).
pub const ENROLL_PATH: &str = "/v1/enroll";
/// Where an agent renews its certificate, presenting it (expired within the grace window, too).
pub const RENEW_PATH: &str = "/v1/renew";
/// Close code of a session whose node was revoked, reset or deleted: its certificate no longer counts.
pub const REVOKED_CLOSE_CODE: u16 = 4401;
/// Characters of a token id.
pub const TOKEN_ID_LEN: usize = 6;
/// Characters of a token secret.
pub const TOKEN_SECRET_LEN: usize = 16;

/// A bootstrap token, `<id>.<secret>`: six and sixteen characters of `[a-z0-9]`, as kubeadm's.
/// The id names the token (its Secret is `supermesh-token-<id>`); the secret proves it.
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken {
    /// Public part: names the token.
    pub id: String,
    /// Secret part.
    pub secret: String,
}

impl BootstrapToken {
    /// A new random token.
    pub fn generate(mut random: impl FnMut() -> u32) -> BootstrapToken {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let mut pick =
            |n: usize| -> String { (0..n).map(|_| ALPHABET[random() as usize % ALPHABET.len()] as char).collect() };
        BootstrapToken { id: pick(TOKEN_ID_LEN), secret: pick(TOKEN_SECRET_LEN) }
    }
}

fn token_chars(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

impl FromStr for BootstrapToken {
    type Err = String;

    /// Parses `<id>.<secret>`; errors never repeat the secret.
    fn from_str(token: &str) -> Result<Self, String> {
        match token.split_once('.') {
            Some((id, secret)) if token_chars(id, TOKEN_ID_LEN) && token_chars(secret, TOKEN_SECRET_LEN) => {
                Ok(BootstrapToken { id: id.to_owned(), secret: secret.to_owned() })
            }
            _ => Err(format!(
                "a bootstrap token is <id>.<secret>: {TOKEN_ID_LEN} and {TOKEN_SECRET_LEN} characters of a-z 0-9"
            )),
        }
    }
}

impl fmt::Display for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.id, self.secret)
    }
}

impl fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootstrapToken").field("id", &self.id).field("secret", &"<redacted>").finish()
    }
}

/// What a device joins with: `<ca-fingerprint>.<token-id>.<token-secret>`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct JoinString {
    /// Lower-case hex SHA-256 of the cloud's CA certificate ([`crate::names::ca_fingerprint`]).
    pub ca_hash: String,
    /// The bootstrap token.
    pub token: BootstrapToken,
}

impl FromStr for JoinString {
    type Err = String;

    /// Parses a join string; errors never repeat the secret.
    fn from_str(join: &str) -> Result<Self, String> {
        let is_hash = |h: &str| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let expected = "expected <sha256 of the cloud CA certificate, 64 lowercase hex digits>.<token id>.<token \
                        secret>, as `supermeshctl token create` prints it";
        let Some((hash, token)) = join.split_once('.') else {
            return Err(format!("invalid join token: it has no '.'; {expected}"));
        };
        if !is_hash(hash) {
            return Err(format!("invalid join token: the CA hash is not 64 lowercase hex digits; {expected}"));
        }
        if !token.contains('.') {
            return Err(format!(
                "invalid join token: it is a fleet-wide token of supermesh 0.1, which no longer admits nodes; \
                 {expected}"
            ));
        }
        let token = token.parse().map_err(|e| format!("invalid join token: {e}; {expected}"))?;
        Ok(JoinString { ca_hash: hash.to_owned(), token })
    }
}

impl fmt::Display for JoinString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.ca_hash, self.token)
    }
}

/// Lower-case hex SHA-256 of a public key's bits: how the cloud recognises a node's key
/// across renewals, and what `supermesh.io/identity` on its EdgeNode records.
pub fn key_fingerprint(public_key: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(public_key))
}

/// The enrollment request: who the device is, and a CSR for its node name.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnrollRequest {
    /// The node name it asks for (the certificate's common name).
    pub node: String,
    /// The account it states; checked against the token's scope.
    pub account: String,
    /// The network it states; checked against the token's scope.
    pub network: String,
    /// Where it says it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    /// Whether it may be elected supernode.
    #[serde(default)]
    pub supernode_eligible: bool,
    /// PEM certificate signing request for its key, common name = node name.
    pub csr: String,
}

/// The renewal request, sent with the certificate being renewed: a CSR for the same key.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RenewRequest {
    /// PEM certificate signing request.
    pub csr: String,
}

/// The answer to an enrollment or a renewal.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", tag = "result")]
pub enum IdentityAnswer {
    /// A certificate was issued.
    Issued(Issued),
    /// Refused: `status` is the HTTP status that fits (401, 403, 409, 400, 503), `reason` says why.
    Refused {
        /// HTTP status that fits the refusal.
        status: u16,
        /// Why, for the agent's log.
        reason: String,
    },
}

/// A certificate issued to a node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Issued {
    /// The node certificate, PEM.
    pub certificate: String,
    /// Start of its validity, Unix seconds.
    pub not_before: i64,
    /// End of its validity, Unix seconds.
    pub not_after: i64,
    /// Whether the node is approved; a pending node is connected but sent nothing.
    pub approved: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn join_strings_round_trip_and_hide_nothing_but_the_secret_in_errors() {
        let join: JoinString = format!("{HASH}.abc123.0123456789abcdef").parse().unwrap();
        assert_eq!(join.token.id, "abc123");
        assert_eq!(join.to_string(), format!("{HASH}.abc123.0123456789abcdef"));
        assert!(!format!("{:?}", join.token).contains("0123456789abcdef"));
        for (bad, says) in [
            ("nodot", "no '.'"),
            ("abc.abc123.0123456789abcdef", "64 lowercase hex"),
            (&format!("{HASH}.s3cret-s3cret-s3cret-s3cret") as &str, "supermesh 0.1"),
            (&format!("{HASH}.ABC123.0123456789abcdef") as &str, "a-z 0-9"),
            (&format!("{HASH}.abc123.short") as &str, "a-z 0-9"),
        ] {
            let err = bad.parse::<JoinString>().unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
            assert!(!err.contains("0123456789abcdef0"), "errors do not repeat the input: {err}");
        }
    }

    #[test]
    fn generated_tokens_parse() {
        let mut n = 7u32;
        let token = BootstrapToken::generate(|| {
            n = n.wrapping_mul(1_103_515_245).wrapping_add(12345);
            n >> 8
        });
        assert_eq!(token.to_string().parse::<BootstrapToken>().unwrap(), token);
    }

    #[test]
    fn answers_are_tagged() {
        let refused = IdentityAnswer::Refused { status: 403, reason: "no".into() };
        let json = serde_json::to_string(&refused).unwrap();
        assert_eq!(json, r#"{"result":"refused","status":403,"reason":"no"}"#);
        assert_eq!(serde_json::from_str::<IdentityAnswer>(&json).unwrap(), refused);
    }
}
