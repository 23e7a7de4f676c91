//! Automatic registration: a node's first connection creates its EdgeNode from its hello.

use kube::api::PostParams;
use kube::{Api, Client};
use supermesh_api::edgenode::EdgeNodeSpec;
use supermesh_api::EdgeNode;
use supermesh_protocol::Hello;
use tracing::info;

use crate::index::Index;

/// Creates the EdgeNode of the node saying `hello` unless the index knows it already.
pub async fn register(client: &Client, index: &Index, hello: &Hello) -> Result<(), kube::Error> {
    if index.knows(&hello.node) {
        return Ok(());
    }
    let spec = EdgeNodeSpec {
        account: hello.account.clone(),
        network: hello.network.clone(),
        location: hello.location,
        supernode_eligible: hello.supernode_eligible,
        unschedulable: false,
    };
    let api: Api<EdgeNode> = Api::all(client.clone());
    match api.create(&PostParams::default(), &EdgeNode::new(&hello.node, spec)).await {
        Ok(_) => {
            info!(node = %hello.node, network = %hello.network, "registered a new EdgeNode");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.is_already_exists() => Ok(()),
        Err(e) => Err(e),
    }
}
