//! Mutual TLS between the members of a cluster, with the node certificates the cloud
//! issued. Each side presents its own certificate and takes the other's only when the
//! certificate names a member and carries the key the cloud's membership gives for it:
//! the membership, which only the cloud sends, is the trust anchor, so a revoked or reset
//! node (listed without a key) or a stranger fails the handshake before a byte of its
//! request is read.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use supermesh_protocol::identity::key_fingerprint;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::identity::Identity;

/// What a peer's certificate says: the node it names and its key's fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// The node (common name).
    pub node: String,
    /// Fingerprint of its public key.
    pub key: String,
}

/// Reads the node and key of a certificate.
pub fn read_cert(der: &[u8]) -> Result<PeerCert, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("unreadable certificate: {e}"))?;
    let node = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .ok_or("the certificate names no node (no common name)")?
        .to_owned();
    Ok(PeerCert { node, key: key_fingerprint(&cert.public_key().subject_public_key.data) })
}

/// Whether a certificate with this node name and key fingerprint is a member's right now.
pub type Members = Arc<dyn Fn(&PeerCert) -> bool + Send + Sync>;

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The TLS acceptor of the peer service: this node's certificate, and clients that are members.
pub fn acceptor(identity: &Identity, members: Members) -> Result<TlsAcceptor, String> {
    let (chain, key) = identity.client_auth().ok_or("this node holds no certificate yet")?;
    let provider = provider();
    let verifier = Arc::new(MemberClients { members: MembersFn(members), provider: provider.clone() });
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_client_cert_verifier(verifier).with_single_cert(chain, key))
        .map_err(|e| format!("the peer service's TLS: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A TLS connector to the peer `node` whose key has fingerprint `key`, presenting this node's certificate.
pub fn connector(identity: &Identity, node: &str, key: &str) -> Result<TlsConnector, String> {
    let (chain, private) = identity.client_auth().ok_or("this node holds no certificate yet")?;
    let provider = provider();
    let expected = PeerCert { node: node.to_owned(), key: key.to_owned() };
    let verifier = Arc::new(MemberServer { expected, provider: provider.clone() });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS to peer {node}: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, private)
        .map_err(|e| format!("TLS to peer {node}: {e}"))?;
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The name to give a TLS connection to `node`: its name when it is a DNS name (node names
/// are), else a fixed one; the verifier checks the certificate, not this name.
pub fn server_name(node: &str) -> ServerName<'static> {
    ServerName::try_from(node.to_owned())
        .unwrap_or_else(|_| ServerName::try_from("supermesh-peer").expect("a valid DNS name"))
}

fn refused(why: String) -> rustls::Error {
    rustls::Error::General(why)
}

struct MembersFn(Members);

impl std::fmt::Debug for MembersFn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the cluster's membership")
    }
}

/// Takes a client certificate that is a member's.
#[derive(Debug)]
struct MemberClients {
    members: MembersFn,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for MemberClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let cert = read_cert(end_entity).map_err(refused)?;
        if !(self.members.0)(&cert) {
            return Err(refused(format!("{} presents no key of a member of this cluster", cert.node)));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Takes the server certificate of the one member a request is for.
#[derive(Debug)]
struct MemberServer {
    expected: PeerCert,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for MemberServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = read_cert(end_entity).map_err(refused)?;
        if cert != self.expected {
            return Err(refused(format!(
                "the peer at this address is {} with another key than the membership gives for {}",
                cert.node, self.expected.node
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
