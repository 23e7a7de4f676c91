//! The cloudhub's CA and serving certificate, and the bootstrap token agents
//! join with. Both are kept in Secrets so every controller start (and every
//! replica) serves with the same CA that join tokens pin.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rand::distr::{Alphanumeric, SampleString};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use supermesh_api::names::CONTROLLER_MANAGER;
use supermesh_protocol::names::join_token;
use tracing::info;

use crate::{Error, Result};

/// Secret holding the cloudhub CA (`tls.crt`, `tls.key`).
pub const CA_SECRET: &str = "supermesh-cloudhub-ca";
/// Secret holding the bootstrap token (`token`) and the full join token for agents (`joinToken`).
pub const TOKEN_SECRET: &str = "supermesh-bootstrap-token";

/// What the cloudhub needs to serve agents.
pub struct Pki {
    /// TLS configuration of the cloudhub listener.
    pub tls: Arc<rustls::ServerConfig>,
    /// The secret part of the bootstrap token agents must present.
    pub token_secret: String,
    /// The full join token, `<ca fingerprint>.<secret>`.
    pub join_token: String,
    /// The CA's private key in PEM: replicas derive the key they sign forwards with from it.
    pub ca_key_pem: String,
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

/// Loads (or creates) the CA and the bootstrap token in `namespace`, and issues
/// a serving certificate for `names` (DNS names or IP addresses agents dial).
pub async fn load(client: &Client, namespace: &str, names: &[String]) -> Result<Pki> {
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
    let field = |s: &Secret, key: &str| -> Result<String> {
        let bytes = s.data.as_ref().and_then(|d| d.get(key)).map(|b| b.0.clone());
        let bytes = bytes.ok_or_else(|| {
            pki_error(
                &format!("Secret {namespace}/{} has no {key}", s.metadata.name.clone().unwrap_or_default()),
                "missing",
            )
        })?;
        String::from_utf8(bytes).map_err(|e| pki_error(key, e))
    };
    let ca_key_pem = field(&ca, "tls.key")?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| pki_error("reading the CA key", e))?;
    let ca_der = pem_to_der(&field(&ca, "tls.crt")?)?;
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
    let tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| pki_error("TLS versions", e))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| pki_error("TLS serving certificate", e))?;

    let token_secret = match secrets.get_opt(TOKEN_SECRET).await? {
        Some(s) => field(&s, "token")?,
        None => {
            let token = Alphanumeric.sample_string(&mut rand::rng(), 32);
            let data = BTreeMap::from([("token".to_string(), ByteString(token.clone().into_bytes()))]);
            info!(namespace, secret = TOKEN_SECRET, "created the bootstrap token");
            field(&create_or_get(&secrets, namespace, TOKEN_SECRET, data).await?, "token")?
        }
    };
    let join = join_token(&ca_der, &token_secret);
    // Publish the full join token beside the secret, for `kubectl get secret` and installers.
    let patch = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "stringData": {"joinToken": join},
    });
    secrets.patch(TOKEN_SECRET, &PatchParams::apply(CONTROLLER_MANAGER), &Patch::Apply(patch)).await?;
    Ok(Pki { tls: Arc::new(tls), token_secret, join_token: join, ca_key_pem })
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

/// Whether `presented` equals `expected`, in time independent of where they differ.
pub fn token_matches(presented: &str, expected: &str) -> bool {
    let (a, b) = (presented.as_bytes(), expected.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_exactly() {
        assert!(token_matches("abc", "abc"));
        assert!(!token_matches("abd", "abc"));
        assert!(!token_matches("ab", "abc"));
        assert!(!token_matches("", "abc"));
    }

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
