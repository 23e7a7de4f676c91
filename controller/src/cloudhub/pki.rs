//! The cloudhub's CA, its serving certificate, and the node certificates it issues.
//! The CA is kept in a Secret so every controller start (and every replica) serves
//! with the CA that join strings pin, and accepts the node certificates any replica signed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::PostParams;
use kube::{Api, Client};
use rand::distr::{Alphanumeric, SampleString};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SerialNumber,
};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use supermesh_protocol::identity::{key_fingerprint, Issued};
use supermesh_protocol::names::ca_fingerprint;
use tracing::info;

use crate::{Error, Result};

/// Secret holding the cloudhub CA (`tls.crt`, `tls.key`).
pub const CA_SECRET: &str = "supermesh-cloudhub-ca";
/// Secret holding the root (`root`) every network's cluster key, and the key the cloud signs
/// receipts for relayed reports with, are derived from.
pub const CLUSTER_KEY_SECRET: &str = "supermesh-cluster-key";
/// Organisation of node certificates.
const NODES_ORGANIZATION: &str = "supermesh:nodes";

/// What the cloudhub needs to serve agents.
pub struct Pki {
    /// TLS configuration of the cloudhub listener: node certificates are asked for, not required
    /// (enrollment comes without one), and accepted expired within the grace window (renewal).
    pub tls: Arc<rustls::ServerConfig>,
    /// Signs node certificates.
    pub authority: Arc<Authority>,
    /// Root of the networks' cluster keys and of the cloud's receipt key.
    pub cluster_key_root: String,
    /// The CA's private key in PEM: replicas derive the key they sign forwards with from it.
    pub ca_key_pem: String,
}

/// The CA as a signer of node certificates.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    /// Fingerprint of the CA certificate, as join strings carry it.
    pub fingerprint: String,
    /// How long a node certificate is valid.
    pub lifetime: Duration,
}

/// How long node certificates live and how long after expiry they may still renew.
#[derive(Clone, Copy, Debug)]
pub struct Lifetimes {
    /// Validity of a node certificate.
    pub certificate: Duration,
    /// How long after it expired a certificate may still be renewed; `None` is one lifetime.
    pub grace: Option<Duration>,
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "supermesh cloudhub CA");
    params.distinguished_name.push(DnType::OrganizationName, "supermesh");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    params
}

fn pki_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Pki(format!("{what}: {e}"))
}

/// The CA certificate (PEM) kept in `namespace`, if the controller created it yet.
pub async fn ca_certificate(client: &Client, namespace: &str) -> Result<Option<String>> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    match secrets.get_opt(CA_SECRET).await? {
        Some(s) => Ok(Some(field(&s, namespace, "tls.crt")?)),
        None => Ok(None),
    }
}

/// The fingerprint join strings pin, of a PEM CA certificate.
pub fn fingerprint_of(ca_pem: &str) -> Result<String> {
    Ok(ca_fingerprint(&pem_to_der(ca_pem)?))
}

fn field(s: &Secret, namespace: &str, key: &str) -> Result<String> {
    let bytes = s.data.as_ref().and_then(|d| d.get(key)).map(|b| b.0.clone());
    let bytes = bytes.ok_or_else(|| {
        pki_error(
            &format!("Secret {namespace}/{} has no {key}", s.metadata.name.clone().unwrap_or_default()),
            "missing",
        )
    })?;
    String::from_utf8(bytes).map_err(|e| pki_error(key, e))
}

/// Prefix of the Secret's data keys that hold a network's key generation (`generation.<network>`).
pub const GENERATION_PREFIX: &str = "generation.";

/// The generations of rotated cluster keys, from the cluster key Secret in `namespace`.
pub async fn key_generations(client: &Client, namespace: &str) -> Result<BTreeMap<String, u64>> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let Some(secret) = secrets.get_opt(CLUSTER_KEY_SECRET).await? else { return Ok(BTreeMap::new()) };
    Ok(generations_of(&secret))
}

/// The generations a cluster key Secret holds; an unreadable one counts as 0.
pub fn generations_of(secret: &Secret) -> BTreeMap<String, u64> {
    let data = secret.data.iter().flatten();
    data.filter_map(|(k, v)| {
        let network = k.strip_prefix(GENERATION_PREFIX)?;
        let generation = std::str::from_utf8(&v.0).ok()?.trim().parse().ok()?;
        Some((network.to_owned(), generation))
    })
    .collect()
}

/// Rotates the cluster key of `network`: bumps its generation in the cluster key Secret of
/// `namespace` (the controllers pick it up and send the network's members the new key).
/// Returns the new generation.
pub async fn rotate_cluster_key(client: &Client, namespace: &str, network: &str) -> Result<u64> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for _ in 0..8 {
        let Some(mut secret) = secrets.get_opt(CLUSTER_KEY_SECRET).await? else {
            return Err(pki_error(
                &format!("no Secret {namespace}/{CLUSTER_KEY_SECRET}"),
                "start the controller first",
            ));
        };
        let next = generations_of(&secret).get(network).copied().unwrap_or(0) + 1;
        let key = format!("{GENERATION_PREFIX}{network}");
        secret.data.get_or_insert_with(BTreeMap::new).insert(key, ByteString(next.to_string().into_bytes()));
        match secrets.replace(CLUSTER_KEY_SECRET, &PostParams::default(), &secret).await {
            Ok(_) => return Ok(next),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(pki_error("rotating the cluster key", "the Secret keeps changing; try again"))
}

/// Loads (or creates) the CA and the cluster key root in `namespace`, and issues a serving
/// certificate for `names` (DNS names or IP addresses agents dial).
pub async fn load(client: &Client, namespace: &str, names: &[String], lifetimes: Lifetimes) -> Result<Pki> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let ca = match secrets.get_opt(CA_SECRET).await? {
        Some(s) => s,
        None => {
            let key = KeyPair::generate().map_err(|e| pki_error("generating the CA key", e))?;
            let cert = ca_params().self_signed(&key).map_err(|e| pki_error("self-signing the CA", e))?;
            let data = BTreeMap::from([
                ("tls.crt".to_string(), ByteString(cert.pem().into_bytes())),
                ("tls.key".to_string(), ByteString(key.serialize_pem().into_bytes())),
            ]);
            info!(namespace, secret = CA_SECRET, "created the cloudhub CA");
            create_or_get(&secrets, namespace, CA_SECRET, data).await?
        }
    };
    let ca_key_pem = field(&ca, namespace, "tls.key")?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| pki_error("reading the CA key", e))?;
    let ca_der = pem_to_der(&field(&ca, namespace, "tls.crt")?)?;
    let issuer = Issuer::new(ca_params(), ca_key);

    let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
    sans.extend(names.iter().cloned());
    let mut params = CertificateParams::new(sans).map_err(|e| pki_error("serving certificate names", e))?;
    params.distinguished_name.push(DnType::CommonName, "supermesh cloudhub");
    let key = KeyPair::generate().map_err(|e| pki_error("generating the serving key", e))?;
    let leaf = params.signed_by(&key, &issuer).map_err(|e| pki_error("signing the serving certificate", e))?;
    let chain = vec![leaf.der().clone(), CertificateDer::from(ca_der.clone())];
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.clone())).map_err(|e| pki_error("the CA as a root", e))?;
    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| pki_error("the node certificate verifier", e))?;
    let verifier = Arc::new(NodeCertVerifier { webpki, grace: lifetimes.grace });
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| pki_error("TLS versions", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, private)
        .map_err(|e| pki_error("TLS serving certificate", e))?;

    let cluster_key_root = match secrets.get_opt(CLUSTER_KEY_SECRET).await? {
        Some(s) => field(&s, namespace, "root")?,
        None => {
            let root = Alphanumeric.sample_string(&mut rand::rng(), 48);
            let data = BTreeMap::from([("root".to_string(), ByteString(root.into_bytes()))]);
            info!(namespace, secret = CLUSTER_KEY_SECRET, "created the root of the networks' cluster keys");
            field(&create_or_get(&secrets, namespace, CLUSTER_KEY_SECRET, data).await?, namespace, "root")?
        }
    };
    let authority = Authority {
        issuer,
        fingerprint: ca_fingerprint(&ca_der),
        lifetime: lifetimes.certificate.max(Duration::from_secs(1)),
    };
    Ok(Pki { tls: Arc::new(tls), authority: Arc::new(authority), cluster_key_root, ca_key_pem })
}

impl Authority {
    /// Signs `csr` (PEM) as the certificate of `node`, whose key must have fingerprint `key`
    /// when given (a renewal keeps the key it enrolled). Whatever else the request asks for
    /// is ignored: a node certificate names the node, is for client authentication only and
    /// lives [`Authority::lifetime`]. Returns the certificate and its key's fingerprint.
    pub fn sign(
        &self,
        csr: &str,
        node: &str,
        key: Option<&str>,
        approved: bool,
    ) -> std::result::Result<(Issued, String), String> {
        let request = CertificateSigningRequestParams::from_pem(csr)
            .map_err(|e| format!("the certificate signing request is unreadable or not signed by its key: {e}"))?;
        let fingerprint = key_fingerprint(request.public_key.der_bytes());
        if key.is_some_and(|k| k != fingerprint) {
            return Err("the signing request is for another key than the certificate presented".into());
        }
        let now = time::OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, node);
        params.distinguished_name.push(DnType::OrganizationName, NODES_ORGANIZATION);
        // A device whose clock is a little behind still accepts its new certificate.
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + self.lifetime;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
        let signed = CertificateSigningRequestParams { params, public_key: request.public_key }
            .signed_by(&self.issuer)
            .map_err(|e| format!("cannot sign the node certificate: {e}"))?;
        let issued = Issued {
            certificate: signed.pem(),
            not_before: (now - time::Duration::minutes(5)).unix_timestamp(),
            not_after: (now + self.lifetime).unix_timestamp(),
            approved,
        };
        Ok((issued, fingerprint))
    }
}

/// What a node certificate says: the node it names and the key it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// The node (common name).
    pub node: String,
    /// Fingerprint of its public key.
    pub key: String,
    /// End of its validity, Unix seconds.
    pub not_after: i64,
}

impl PeerCert {
    /// Reads a certificate the TLS handshake already verified against the CA.
    pub fn parse(der: &[u8]) -> std::result::Result<PeerCert, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("unreadable certificate: {e}"))?;
        let node = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or("the certificate names no node (no common name)")?
            .to_owned();
        let node_cert = cert.subject().iter_organization().any(|o| o.as_str() == Ok(NODES_ORGANIZATION));
        if !node_cert {
            return Err("the certificate is not a node certificate".into());
        }
        Ok(PeerCert {
            node,
            key: key_fingerprint(&cert.public_key().subject_public_key.data),
            not_after: cert.validity().not_after.timestamp(),
        })
    }

    /// Whether it expired by now.
    pub fn expired(&self) -> bool {
        UnixTime::now().as_secs() as i64 > self.not_after
    }
}

/// Verifies node certificates against the CA, accepting one that expired less than the grace
/// window ago: the connection may then only renew it (the cloudhub checks which path it asks).
#[derive(Debug)]
struct NodeCertVerifier {
    webpki: Arc<dyn ClientCertVerifier>,
    grace: Option<Duration>,
}

impl ClientCertVerifier for NodeCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        match self.webpki.verify_client_cert(end_entity, intermediates, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            )) => {
                let expired = || rustls::Error::InvalidCertificate(CertificateError::Expired);
                let (_, cert) = x509_parser::parse_x509_certificate(end_entity).map_err(|_| expired())?;
                let (from, until) = (cert.validity().not_before.timestamp(), cert.validity().not_after.timestamp());
                let grace = self.grace.map_or(until - from, |g| g.as_secs() as i64);
                if (now.as_secs() as i64) > until.saturating_add(grace) {
                    return Err(expired());
                }
                // Within the grace window: everything else is checked as at the last valid second.
                let at = UnixTime::since_unix_epoch(Duration::from_secs(until.max(1) as u64 - 1));
                self.webpki.verify_client_cert(end_entity, intermediates, at)
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Creates Secret `name` in `namespace`, or returns the one another replica created first.
async fn create_or_get(
    secrets: &Api<Secret>,
    namespace: &str,
    name: &str,
    data: BTreeMap<String, ByteString>,
) -> Result<Secret> {
    let mut secret = Secret { data: Some(data), ..Secret::default() };
    secret.metadata.name = Some(name.to_owned());
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(s) => Ok(s),
        Err(kube::Error::Api(e)) if e.is_already_exists() => Ok(secrets.get(name).await?),
        // Creating an object answers 404 only when its namespace does not exist.
        Err(kube::Error::Api(e)) if e.is_not_found() => Err(Error::NamespaceMissing(namespace.to_owned())),
        Err(e) => Err(e.into()),
    }
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(|e| pki_error("reading the CA certificate", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_rebuilt_from_its_key_signs_leaves_that_chain_to_it() {
        use rustls::client::danger::ServerCertVerifier;
        let key = KeyPair::generate().unwrap();
        let ca = ca_params().self_signed(&key).unwrap();
        let reloaded = KeyPair::from_pem(&key.serialize_pem()).unwrap();
        let issuer = Issuer::new(ca_params(), reloaded);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["localhost".into()]).unwrap().signed_by(&leaf_key, &issuer).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let now = rustls::pki_types::UnixTime::now();
        verifier.verify_server_cert(leaf.der(), &[], &name, &[], now).expect("leaf chains to the persisted CA");
    }
}
