//! Enrollment and renewal: a device proves a bootstrap token once and gets a node
//! certificate for a key it keeps; later it renews that certificate with the
//! certificate itself. Who may be a node is recorded on its EdgeNode (the key's
//! fingerprint, approval, revocation), so every replica reads the same record.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use kube::api::PostParams;
use kube::{Api, ResourceExt};
use serde::de::DeserializeOwned;
use supermesh_api::edgenode::EdgeNodeSpec;
use supermesh_api::names::{identity, FINALIZER};
use supermesh_api::EdgeNode;
use supermesh_protocol::identity::{BootstrapToken, EnrollRequest, IdentityAnswer, Issued, RenewRequest};
use supermesh_protocol::names::is_dns1123_subdomain;
use tokio_tungstenite::tungstenite::Message as Frame;
use tracing::{info, warn};

use super::pki::PeerCert;
use super::{Shared, Ws};
use crate::metrics::ResultLabels;
use crate::tokens::{self, Refusal};
use crate::view::NodeIdentity;

/// How long a device has to send its request once connected.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the cloud's records still accept `cert` as its node's: the index's view of the
/// node's EdgeNode, or the API server's when the index has not seen it yet (just enrolled).
/// A refusal carries the HTTP status that fits.
pub(super) async fn standing(shared: &Shared, cert: &PeerCert) -> Result<(), (u16, String)> {
    let record = match shared.index.identity(&cert.node) {
        Some(record) => record,
        None => {
            let nodes: Api<EdgeNode> = Api::all(shared.client.clone());
            match nodes.get_opt(&cert.node).await {
                Ok(Some(node)) => NodeIdentity::of(&node),
                Ok(None) => return Err((403, format!("node {} has no EdgeNode: it was deleted", cert.node))),
                Err(e) => return Err((503, format!("cannot read the EdgeNode of node {} now: {e}", cert.node))),
            }
        }
    };
    record.accepts(&cert.key).map_err(|why| (403, format!("the certificate of node {} is refused: {why}", cert.node)))
}

/// Serves one enrollment: reads the request, answers with a certificate or a refusal.
pub(super) async fn enroll(mut ws: Ws, token: BootstrapToken, peer: SocketAddr, shared: Shared) {
    let answer = match read::<EnrollRequest>(&mut ws).await {
        Err(reason) => IdentityAnswer::Refused { status: 400, reason },
        Ok(request) => {
            let admitted = match shared.registrations.acquire().await {
                Ok(_permit) => admit(&request, &token, &shared).await,
                Err(_) => Err(Refusal { status: 503, reason: "the controller is shutting down".into() }),
            };
            match admitted {
                Ok(issued) => {
                    info!(node = %request.node, %peer, token = %token.id, approved = issued.approved, "enrolled a node");
                    shared.metrics.enrollments.get_or_create(&ResultLabels { result: "enrolled" }).inc();
                    IdentityAnswer::Issued(issued)
                }
                Err(Refusal { status, reason }) => {
                    warn!(node = %request.node, %peer, token = %token.id, status, %reason, "enrollment refused");
                    shared.metrics.enrollments.get_or_create(&ResultLabels { result: "refused" }).inc();
                    IdentityAnswer::Refused { status, reason }
                }
            }
        }
    };
    reply(ws, &answer).await;
}

/// Serves one renewal of `cert`, which the handshake found still standing.
pub(super) async fn renew(mut ws: Ws, cert: PeerCert, shared: Shared) {
    let approved = shared.index.identity(&cert.node).is_none_or(|i| i.approved);
    let answer = match read::<RenewRequest>(&mut ws).await {
        Err(reason) => IdentityAnswer::Refused { status: 400, reason },
        Ok(request) => match shared.authority.sign(&request.csr, &cert.node, Some(&cert.key), approved) {
            Ok((issued, _)) => {
                info!(node = %cert.node, expired = cert.expired(), "renewed a node certificate");
                shared.metrics.enrollments.get_or_create(&ResultLabels { result: "renewed" }).inc();
                IdentityAnswer::Issued(issued)
            }
            Err(reason) => IdentityAnswer::Refused { status: 400, reason },
        },
    };
    reply(ws, &answer).await;
}

/// Checks what a device states of itself before anything is written.
fn check_request(request: &EnrollRequest) -> Result<(), Refusal> {
    let bad = |reason: String| Refusal { status: 400, reason };
    for (what, value) in [("node name", &request.node), ("account", &request.account), ("network", &request.network)] {
        if !is_dns1123_subdomain(value) {
            return Err(bad(format!(
                "the {what} must be a DNS-1123 name (lower-case letters, digits, '-' and '.', at most 253 characters)"
            )));
        }
    }
    if let Some(l) = request.location {
        if !(-90.0..=90.0).contains(&l.latitude) || !(-180.0..=180.0).contains(&l.longitude) {
            return Err(bad("the location must have a latitude in -90..90 and a longitude in -180..180".into()));
        }
    }
    Ok(())
}

/// Refuses to enroll over `node` when it already has an identity: a token never takes over
/// a node; an enrolled (or revoked) name needs an admin's reset first.
fn not_enrolled(node: Option<&EdgeNode>, name: &str) -> Result<(), Refusal> {
    let record = node.map(NodeIdentity::of);
    if record.is_some_and(|r| r.key.is_some() || r.revoked) {
        return Err(Refusal {
            status: 409,
            reason: format!(
                "node {name} is already enrolled; a token cannot enroll it again until an admin runs \
                 `supermeshctl node reset {name}`"
            ),
        });
    }
    Ok(())
}

/// Enrolls the node `request` describes with `token`, or says why not.
async fn admit(request: &EnrollRequest, token: &BootstrapToken, shared: &Shared) -> Result<Issued, Refusal> {
    check_request(request)?;
    let unavailable = |e: kube::Error| Refusal { status: 503, reason: format!("cannot record the node now: {e}") };
    let nodes: Api<EdgeNode> = Api::all(shared.client.clone());
    let mut existing = nodes.get_opt(&request.node).await.map_err(unavailable)?;
    not_enrolled(existing.as_ref(), &request.node)?;
    // A node registered before (or reset) keeps its EdgeNode's account and network: the token must cover those.
    let stated = match &existing {
        Some(node) => {
            EnrollRequest { account: node.spec.account.clone(), network: node.spec.network.clone(), ..request.clone() }
        }
        None => request.clone(),
    };
    // Sign first (a bad request spends no use), then spend the use, then record the key.
    let (issued, key) = shared
        .authority
        .sign(&request.csr, &request.node, None, false)
        .map_err(|reason| Refusal { status: 400, reason })?;
    let spent = tokens::consume(&shared.secrets, token, &stated).await?;
    let approved = spent.auto_approve;
    let annotations = BTreeMap::from([
        (identity::KEY.to_owned(), key),
        (identity::APPROVED.to_owned(), approved.to_string()),
        (identity::ENROLLED_WITH.to_owned(), token.id.clone()),
    ]);
    // Writes carry the resourceVersion read (or create): whatever changed the EdgeNode meanwhile
    // (its status, another enrollment) makes them fail, and the record is read and checked again.
    for _ in 0..8 {
        let written = match existing.take() {
            Some(mut node) => {
                node.annotations_mut().extend(annotations.clone());
                node.annotations_mut().remove(identity::REVOKED);
                if !approved {
                    node.spec.unschedulable = true;
                }
                nodes.replace(&request.node, &PostParams::default(), &node).await.map(drop)
            }
            None => {
                let spec = EdgeNodeSpec {
                    account: request.account.clone(),
                    network: request.network.clone(),
                    location: request.location,
                    supernode_eligible: request.supernode_eligible,
                    unschedulable: !approved,
                    security: Default::default(),
                };
                let mut node = EdgeNode::new(&request.node, spec);
                node.metadata.annotations = Some(annotations.clone());
                // Born with the finalizer its reconcile would add: one write less per new node.
                node.metadata.finalizers = Some(vec![FINALIZER.to_owned()]);
                nodes.create(&PostParams::default(), &node).await.map(drop)
            }
        };
        match written {
            Ok(()) => return Ok(Issued { approved, ..issued }),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                existing = nodes.get_opt(&request.node).await.map_err(unavailable)?;
                not_enrolled(existing.as_ref(), &request.node)?;
            }
            Err(e) => return Err(unavailable(e)),
        }
    }
    Err(Refusal { status: 503, reason: format!("EdgeNode {} keeps changing; try again", request.node) })
}

/// Reads the one request of an enrollment or renewal.
async fn read<T: DeserializeOwned>(ws: &mut Ws) -> Result<T, String> {
    let frame = tokio::time::timeout(REQUEST_TIMEOUT, ws.next())
        .await
        .map_err(|_| format!("no request within {} s", REQUEST_TIMEOUT.as_secs()))?
        .ok_or("closed before the request")?
        .map_err(|e| e.to_string())?;
    let text = frame.into_text().map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| format!("unreadable request: {e}"))
}

async fn reply(mut ws: Ws, answer: &IdentityAnswer) {
    if let Ok(text) = serde_json::to_string(answer) {
        let _ = ws.send(Frame::text(text)).await;
    }
    let _ = ws.close(None).await;
}
