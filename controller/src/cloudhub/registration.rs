//! Automatic registration: a node's first connection creates its EdgeNode from its
//! hello. It runs beside the session, never in its way: the agent is welcomed at
//! once, and is sent its assignments when its EdgeNode reaches the index.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use kube::api::PostParams;
use kube::{Api, Client};
use supermesh_api::edgenode::EdgeNodeSpec;
use supermesh_api::names::FINALIZER;
use supermesh_api::EdgeNode;
use supermesh_protocol::Hello;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::index::Index;

/// Retries of a registration the API server refused for now: 1 s doubling up to a minute.
const RETRY: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_secs(1))
    .with_max_delay(Duration::from_secs(60))
    .with_jitter()
    .without_max_times();

/// Creates the EdgeNode of the node saying `hello` unless the index knows it, retrying
/// until it exists; at most as many at once as `permits` allows.
pub async fn ensure(client: Client, index: Arc<Index>, permits: Arc<Semaphore>, hello: Hello) {
    let mut delays = RETRY.build();
    loop {
        let created = {
            let Ok(_permit) = permits.acquire().await else { return };
            if index.knows(&hello.node) {
                return;
            }
            create(&client, &hello).await
        };
        match created {
            Ok(()) => return,
            Err(e) => {
                let wait = delays.next().unwrap_or(Duration::from_secs(60));
                warn!(node = %hello.node, error = %e, retry_in = ?wait, "cannot register the EdgeNode of a connected agent");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

async fn create(client: &Client, hello: &Hello) -> Result<(), kube::Error> {
    let spec = EdgeNodeSpec {
        account: hello.account.clone(),
        network: hello.network.clone(),
        location: hello.location,
        supernode_eligible: hello.supernode_eligible,
        unschedulable: false,
    };
    let api: Api<EdgeNode> = Api::all(client.clone());
    let mut node = EdgeNode::new(&hello.node, spec);
    // Born with the finalizer its reconcile would add: one write less per new node.
    node.metadata.finalizers = Some(vec![FINALIZER.to_owned()]);
    match api.create(&PostParams::default(), &node).await {
        Ok(_) => {
            info!(node = %hello.node, network = %hello.network, "registered a new EdgeNode");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.is_already_exists() => Ok(()),
        Err(e) => Err(e),
    }
}
