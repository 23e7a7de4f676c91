//! A registry answer from the supernode (`SignedRegistry`), as a member takes it: the
//! signature checked with the supernode's enrolled key (`SignedRegistry::open`), then
//! the registry turned into the local API's discovery answers (nodes of the network,
//! endpoints of a microservice). Since the fuzzer cannot sign, each input is also taken
//! as what the supernode signed: its `body` (or the whole input, when it is no signed
//! registry) signed with the supernode's key, as a member of the cluster could answer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use supermesh_agent::localapi::discovery::{
    arrange_nodes, merge_endpoints, registry_endpoints, registry_nodes, NodesQuery,
};
use supermesh_fuzz::{fingerprint, sign};
use supermesh_protocol::peer::{Registry, SignedRegistry};
use supermesh_protocol::signing::Purpose;
use supermesh_protocol::Location;

const HERE: Location = Location { latitude: 48.8566, longitude: 2.3522 };

fuzz_target!(|text: &str| {
    let supernode = fingerprint("super");
    let received = serde_json::from_str::<SignedRegistry>(text);
    let body = match &received {
        Ok(signed) => {
            if let Ok(registry) = signed.open(&supernode) {
                discover(&registry);
            }
            signed.body.clone()
        }
        Err(_) => text.to_owned(),
    };
    let signature = sign("super", Purpose::Registry, body.as_bytes());
    let signed = SignedRegistry { node: "super".into(), body, signature };
    match signed.open(&supernode) {
        Ok(registry) => discover(&registry),
        Err(e) => assert!(e.starts_with("malformed registry"), "a registry the supernode signed is refused: {e}"),
    }
});

/// What the local API answers from `registry`.
fn discover(registry: &Registry) {
    let nodes = registry_nodes(registry);
    assert_eq!(nodes.len(), registry.members.len());
    let query = NodesQuery::parse(Some("network"), None, Some("10")).expect("a valid query");
    assert!(arrange_nodes(&query, nodes, Some(&HERE)).len() <= 10);
    let local = registry_endpoints(registry, "team/microservice/web");
    let endpoints = merge_endpoints(local, Vec::new(), "home", Some(&HERE));
    let mut nodes: Vec<&str> = endpoints.iter().map(|e| e.node.as_str()).collect();
    nodes.sort_unstable();
    nodes.dedup();
    assert_eq!(nodes.len(), endpoints.len(), "one endpoint per node");
}
