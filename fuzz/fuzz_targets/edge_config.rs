//! `edge.yaml`, as the agent reads it at start (`config::parse`: YAML, then the checks
//! serde cannot make), and what the agent computes from a configuration it accepted:
//! the durations its supernode, relay and metasync tasks derive from the intervals (the
//! same products and sums, against the same clock), its context and local API address.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use supermesh_agent::config;
use supermesh_agent::edged::Context;
use supermesh_agent::localapi::api_url;
use supermesh_agent::supernode::SILENT_HEARTBEATS;

fuzz_target!(|text: &str| {
    let Ok(config) = config::parse(text, "edge.yaml") else { return };
    assert!(!config.cloud.address.starts_with("wss://"));
    // What the supernode and relay tasks compute: a peer is silent after 2.5 heartbeats,
    // checked four times per heartbeat; a failed relay waits three heartbeats; a report
    // handed to the supernode goes again after two status intervals and ten seconds.
    let heartbeat = config.heartbeat();
    let _ = heartbeat.mul_f64(SILENT_HEARTBEATS);
    let _ = heartbeat / 4;
    let _ = Instant::now() + 3 * heartbeat;
    let _ = Instant::now() + 2 * config.podstatus_interval() + Duration::from_secs(10);
    let _ = config.outbox_cap();
    let context = Context::new(&config, String::new());
    assert_eq!(context.node, config.node.name);
    assert!(api_url(config.local_api.listen).starts_with("http://"));
});
