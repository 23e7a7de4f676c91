//! Bounds on what an agent sends: every string and every list has a limit. The cloud
//! checks them before it keeps anything, so that one device's hello or report can never
//! grow what the cloud sends to others (a 600 KB account would once have pushed its
//! network's membership past the message limit and cut every member off).

use crate::names::MAX_NAME_LEN;
use crate::{EventReport, Hello, ReportBatch, StatusReport};

/// Longest agent version, OS, architecture or event reason.
pub const MAX_SHORT: usize = 64;
/// Longest resource string (`namespace/type/name`).
pub const MAX_RESOURCE: usize = 600;
/// Longest resource version.
pub const MAX_VERSION: usize = 128;
/// Longest `host:port` a node advertises to its peers.
pub const MAX_ADDRESS: usize = MAX_NAME_LEN + 8;
/// Longest free text: an event's or an instance's message.
pub const MAX_TEXT: usize = 4096;
/// Most resources a hello may say it holds.
pub const MAX_HELD: usize = 10_000;
/// Most instances in one status report.
pub const MAX_INSTANCES: usize = 1_000;
/// Most reports in one supernode batch (agents send at most half that).
pub const MAX_BATCH_ENTRIES: usize = 1_024;

/// `Err` naming `what` when `value` is longer than `max` bytes.
fn within(what: &str, value: &str, max: usize) -> Result<(), String> {
    match value.len() <= max {
        true => Ok(()),
        false => Err(format!("{what} is {} bytes long; at most {max} are allowed", value.len())),
    }
}

fn at_most(what: &str, count: usize, max: usize) -> Result<(), String> {
    match count <= max {
        true => Ok(()),
        false => Err(format!("{what}: {count} entries; at most {max} are allowed")),
    }
}

impl Hello {
    /// Whether every field is within its bound; if not, which one is not.
    pub fn check_bounds(&self) -> Result<(), String> {
        within("node", &self.node, MAX_NAME_LEN)?;
        within("account", &self.account, MAX_NAME_LEN)?;
        within("network", &self.network, MAX_NAME_LEN)?;
        within("agentVersion", &self.agent_version, MAX_SHORT)?;
        within("os", &self.os, MAX_SHORT)?;
        within("arch", &self.arch, MAX_SHORT)?;
        if let Some(address) = &self.peer_address {
            within("peerAddress", address, MAX_ADDRESS)?;
        }
        at_most("held", self.held.len(), MAX_HELD)?;
        for (resource, version) in &self.held {
            within("a held resource", resource, MAX_RESOURCE)?;
            within("a held version", version, MAX_VERSION)?;
        }
        Ok(())
    }
}

impl StatusReport {
    /// Whether every field is within its bound; if not, which one is not.
    pub fn check_bounds(&self) -> Result<(), String> {
        at_most("instances", self.instances.len(), MAX_INSTANCES)?;
        for i in &self.instances {
            within("an instance's resource", &i.resource, MAX_RESOURCE)?;
            within("an instance's version", &i.version, MAX_VERSION)?;
            within("an instance's message", i.message.as_deref().unwrap_or_default(), MAX_TEXT)?;
            at_most("an instance's ports", i.ports.len(), 64)?;
        }
        if let Some(supernode) = self.cluster.as_ref().and_then(|c| c.supernode.as_deref()) {
            within("the supernode", supernode, MAX_NAME_LEN)?;
        }
        Ok(())
    }
}

impl EventReport {
    /// Whether every field is within its bound; if not, which one is not.
    pub fn check_bounds(&self) -> Result<(), String> {
        within("the event's reason", &self.reason, MAX_SHORT)?;
        within("the event's message", &self.message, MAX_TEXT)
    }
}

impl ReportBatch {
    /// Whether the batch holds at most [`MAX_BATCH_ENTRIES`] reports with bounded names.
    pub fn check_bounds(&self) -> Result<(), String> {
        at_most("the batch", self.entries.len(), MAX_BATCH_ENTRIES)?;
        for entry in &self.entries {
            within("a reporting node", &entry.node, MAX_NAME_LEN)?;
            within("a report's resource", &entry.resource, MAX_RESOURCE)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hellos_beyond_their_bounds_name_the_field() {
        let ok = Hello { node: "pi".into(), agent_version: "0.2.0".into(), ..Hello::default() };
        assert_eq!(ok.check_bounds(), Ok(()));
        let long_account = Hello { account: "a".repeat(600_000), ..ok.clone() };
        assert!(long_account.check_bounds().unwrap_err().starts_with("account is 600000 bytes long"));
        let long_version = Hello { agent_version: "v".repeat(65), ..ok.clone() };
        assert!(long_version.check_bounds().unwrap_err().contains("agentVersion"));
        let many =
            Hello { held: (0..=MAX_HELD).map(|i| (format!("ns/microservice/m{i}"), "1".into())).collect(), ..ok };
        assert!(many.check_bounds().unwrap_err().starts_with("held: 10001 entries"));
    }

    #[test]
    fn reports_beyond_their_bounds_name_the_field() {
        let event = EventReport { warning: false, reason: "Started".into(), message: "x".repeat(MAX_TEXT + 1) };
        assert!(event.check_bounds().unwrap_err().contains("message"));
        let batch = ReportBatch { entries: vec![] };
        assert_eq!(batch.check_bounds(), Ok(()));
    }
}
