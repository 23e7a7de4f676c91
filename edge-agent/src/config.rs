//! The agent's configuration file, `edge.yaml` (see `examples/agent/edge.yaml`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use supermesh_protocol::identity::JoinString;
use supermesh_protocol::Location;

use crate::metamanager::store::{OutboxCap, DEFAULT_OUTBOX_BYTES, DEFAULT_OUTBOX_REPORTS};

/// The whole contents of `edge.yaml`.
#[derive(Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EdgeConfig {
    /// Who this device is.
    pub node: NodeConfig,
    /// How to reach and join the cloud.
    pub cloud: CloudConfig,
    /// Where the agent keeps its database and files.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Metamanager settings.
    #[serde(default)]
    pub meta: MetaConfig,
    /// The node's part in its network cluster: heartbeats, election, relaying reports.
    #[serde(default)]
    pub supernode: SupernodeConfig,
    /// The local HTTP API the node serves its microservices.
    #[serde(default)]
    pub local_api: LocalApiConfig,
    /// How instances run: isolation and the users they run as.
    #[serde(default)]
    pub edged: EdgedConfig,
}

/// How instances run (`edged`).
#[derive(Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct EdgedConfig {
    /// Whether each microservice runs as a user of its own (see `edged::sandbox`).
    pub isolation: IsolationMode,
    /// The uids (and gids of the same numbers) given to microservices.
    pub instance_users: InstanceUsers,
}

/// Whether instances run isolated (`edged.isolation`).
#[derive(Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IsolationMode {
    /// Isolated when the agent may switch users (root, or CAP_SETUID, CAP_SETGID and
    /// CAP_CHOWN); otherwise instances run as the agent's user and the agent warns.
    #[default]
    Auto,
    /// Always isolated: instances fail to start where the agent may not switch users.
    Required,
    /// Never: instances run as the agent's user and can read what it can.
    Off,
}

/// A range of uids for instances (`edged.instanceUsers`).
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct InstanceUsers {
    /// First uid of the range.
    pub first: u32,
    /// Number of uids: how many microservices the node can run isolated.
    pub count: u32,
}

impl Default for InstanceUsers {
    fn default() -> Self {
        // Far above login users (1000..60000), systemd's dynamic users (61184..65519) and
        // the usual subordinate ranges of container runtimes (100000 + 65536 per user).
        InstanceUsers { first: 1_900_000_000, count: 100_000 }
    }
}

/// Cluster settings (`supernode`).
#[derive(Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct SupernodeConfig {
    /// `host:port` to serve peers on: HTTP over TCP and heartbeats over UDP, same port.
    pub listen: SocketAddr,
    /// `host:port` peers should use to reach this node; default: the address the
    /// cloud sees this node connect from, with the listen port.
    pub advertise: Option<String>,
    /// Seconds between heartbeats (1 to [`MAX_HEARTBEAT_SECONDS`]); a peer silent for 2.5 heartbeats is gone.
    pub heartbeat_seconds: u64,
    /// LAN discovery: also send heartbeats to the multicast group and learn there where
    /// members are (only members the membership lists, with their enrolled keys, are peers).
    pub multicast: bool,
}

impl Default for SupernodeConfig {
    fn default() -> Self {
        SupernodeConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 10360)),
            advertise: None,
            heartbeat_seconds: 2,
            multicast: false,
        }
    }
}

/// Local API settings (`localApi`).
#[derive(Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalApiConfig {
    /// `host:port` of the API; microservices find it in `SUPERMESH_API`. Keep it on loopback.
    pub listen: SocketAddr,
}

impl Default for LocalApiConfig {
    fn default() -> Self {
        LocalApiConfig { listen: SocketAddr::from(([127, 0, 0, 1], 10380)) }
    }
}

/// Identity and placement attributes of this device.
#[derive(Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeConfig {
    /// Name of the device's EdgeNode, a DNS-1123 subdomain.
    pub name: String,
    /// Account the device belongs to.
    pub account: String,
    /// Network the device is on.
    pub network: String,
    /// Where the device is, if known.
    #[serde(default)]
    pub location: Option<Location>,
    /// Whether the device may be elected supernode of its network.
    #[serde(default = "default_supernode_eligible")]
    pub supernode_eligible: bool,
    /// Whether the device stays put; the election prefers stationary devices to mobile ones.
    #[serde(default = "default_supernode_eligible")]
    pub stationary: bool,
}

/// Connection to the controller's cloudhub.
#[derive(Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CloudConfig {
    /// `host:port` of the cloudhub, without any `wss://` prefix.
    pub address: String,
    /// Join string the agent enrolls with once, `<ca-fingerprint>.<token-id>.<token-secret>`
    /// (`supermeshctl token create` prints it). Once the node holds its certificate it is
    /// not needed any more and may be removed.
    #[serde(default)]
    pub token: Option<JoinToken>,
}

/// A join string as `cloud.token` holds it.
#[derive(Deserialize, Clone, PartialEq, Eq, Debug)]
#[serde(try_from = "String")]
pub struct JoinToken(pub JoinString);

impl TryFrom<String> for JoinToken {
    type Error = String;

    fn try_from(token: String) -> Result<Self, String> {
        token.parse().map(JoinToken)
    }
}

/// Metamanager settings (`meta`).
#[derive(Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct MetaConfig {
    /// Synchronisation with the cloud.
    pub sync: SyncConfig,
    /// The cap on reports waiting for the cloud.
    pub outbox: OutboxConfig,
}

/// The outbox's cap (`meta.outbox`): past it the oldest events are dropped, never the last status.
#[derive(Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct OutboxConfig {
    /// Most reports waiting for the cloud, at least [`MIN_OUTBOX_REPORTS`].
    pub max_reports: u64,
    /// Most bytes of reports waiting for the cloud, at least [`MIN_OUTBOX_BYTES`].
    pub max_bytes: u64,
}

/// Most `meta.sync.podstatus.interval`, in seconds: a day.
pub const MAX_PODSTATUS_SECONDS: u64 = 86_400;
/// Most `supernode.heartbeatSeconds`: an hour.
pub const MAX_HEARTBEAT_SECONDS: u64 = 3_600;

/// Least `meta.outbox.maxReports`: room for the status snapshot and some events.
pub const MIN_OUTBOX_REPORTS: u64 = 100;
/// Least `meta.outbox.maxBytes`: room for a large node's status snapshot and some events.
pub const MIN_OUTBOX_BYTES: u64 = 1024 * 1024;

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig { max_reports: DEFAULT_OUTBOX_REPORTS, max_bytes: DEFAULT_OUTBOX_BYTES }
    }
}

/// Synchronisation settings (`meta.sync`).
#[derive(Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct SyncConfig {
    /// Periodic full status of local instances.
    pub podstatus: PodStatusConfig,
}

/// Periodic instance status report (`meta.sync.podstatus`).
#[derive(Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct PodStatusConfig {
    /// Seconds between two full reports, 1 to [`MAX_PODSTATUS_SECONDS`].
    pub interval: u64,
}

impl Default for PodStatusConfig {
    fn default() -> Self {
        PodStatusConfig { interval: 60 }
    }
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/supermesh")
}

fn default_supernode_eligible() -> bool {
    true
}

/// Why `edge.yaml` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// The document as a whole is not valid YAML or lacks a top-level key.
    #[error("{origin}: {error}")]
    Parse {
        /// Name of the file.
        origin: String,
        /// What the YAML parser said.
        error: serde_yaml::Error,
    },
    /// One key has a missing, unknown, mistyped or unacceptable value.
    #[error("{origin}: {key}: {message}")]
    Invalid {
        /// Name of the file.
        origin: String,
        /// Dotted path of the key, e.g. `meta.sync.podstatus.interval`.
        key: String,
        /// What is wrong and what a valid value looks like.
        message: String,
    },
}

/// Reads and validates the configuration file at `path`.
pub fn load(path: &Path) -> Result<EdgeConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: path.to_path_buf(), error })?;
    parse(&text, &path.display().to_string())
}

/// Parses and validates `text`; `origin` names the file in error messages.
pub fn parse(text: &str, origin: &str) -> Result<EdgeConfig, ConfigError> {
    let invalid = |key: String, message: String| ConfigError::Invalid { origin: origin.to_owned(), key, message };
    let config: EdgeConfig =
        serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(text)).map_err(|e| {
            let key = e.path().to_string();
            match key.as_str() {
                "." => ConfigError::Parse { origin: origin.to_owned(), error: e.into_inner() },
                _ => {
                    let message = without_yaml_path(&e.into_inner().to_string(), &key).to_owned();
                    invalid(key, message)
                }
            }
        })?;
    config.validate().map_err(|(key, message)| invalid(key.to_owned(), message))
}

/// `message` without the path serde_yaml puts in front of it (`key` itself or one of its parents).
fn without_yaml_path<'a>(message: &'a str, key: &str) -> &'a str {
    match message.split_once(": ") {
        Some((path, rest)) if key == path || key.strip_prefix(path).is_some_and(|k| k.starts_with('.')) => rest,
        _ => message,
    }
}

/// A key that failed validation and why.
type Rejection = (&'static str, String);

impl EdgeConfig {
    /// Time between two heartbeats to the node's peers.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs(self.supernode.heartbeat_seconds)
    }

    /// How often the full status of local instances is reported.
    pub fn podstatus_interval(&self) -> Duration {
        Duration::from_secs(self.meta.sync.podstatus.interval)
    }

    /// How much the outbox holds before it drops its oldest events.
    pub fn outbox_cap(&self) -> OutboxCap {
        OutboxCap { reports: self.meta.outbox.max_reports, bytes: self.meta.outbox.max_bytes }
    }

    /// Checks what serde cannot, and strips the optional `wss://` from the cloud address.
    fn validate(mut self) -> Result<Self, Rejection> {
        let node = &self.node;
        check(supermesh_protocol::names::is_dns1123_subdomain(&node.name), "node.name", || {
            format!(
                "{:?} is not a valid node name; expected a DNS-1123 subdomain of at most 253 lowercase letters, \
                 digits, '-' and '.', each part starting and ending with a letter or digit, e.g. pi-kitchen",
                node.name
            )
        })?;
        for (key, value) in [("node.account", &node.account), ("node.network", &node.network)] {
            check(supermesh_protocol::names::is_dns1123_subdomain(value), key, || {
                format!("{value:?} is not a DNS-1123 name; expected lowercase letters, digits, '-' and '.', e.g. acme")
            })?;
        }
        if let Some(l) = node.location {
            check(l.is_valid(), "node.location", || {
                format!(
                    "latitude {} / longitude {} is out of range; expected a latitude within -90..90 and a longitude \
                     within -180..180, e.g. {{latitude: 48.8566, longitude: 2.3522}}",
                    l.latitude, l.longitude
                )
            })?;
        }
        non_empty("dataDir", &self.data_dir.to_string_lossy())?;
        // Bounded above too: the agent adds intervals to the clock and multiplies them.
        check(
            (1..=MAX_PODSTATUS_SECONDS).contains(&self.meta.sync.podstatus.interval),
            "meta.sync.podstatus.interval",
            || format!("must be at least 1 and at most {MAX_PODSTATUS_SECONDS} (seconds: a day), e.g. 60"),
        )?;
        check(self.meta.outbox.max_reports >= MIN_OUTBOX_REPORTS, "meta.outbox.maxReports", || {
            format!("must be at least {MIN_OUTBOX_REPORTS}, e.g. {DEFAULT_OUTBOX_REPORTS}")
        })?;
        check(self.meta.outbox.max_bytes >= MIN_OUTBOX_BYTES, "meta.outbox.maxBytes", || {
            format!("must be at least {MIN_OUTBOX_BYTES} (1 MiB), e.g. {DEFAULT_OUTBOX_BYTES} (16 MiB)")
        })?;
        let address = host_port(&self.cloud.address).ok_or_else(|| {
            let message = format!(
                "{:?} is not host:port; expected e.g. 127.0.0.1:10350 or wss://cloud.example.com:10350 \
                 (port 1-65535)",
                self.cloud.address
            );
            ("cloud.address", message)
        })?;
        self.cloud.address = address.to_owned();
        let users = self.edged.instance_users;
        check(users.first >= 1000 && users.count >= 1, "edged.instanceUsers", || {
            format!("{users:?} needs first >= 1000 (not a system user) and count >= 1, e.g. {{first: 1900000000, count: 100000}}")
        })?;
        check(u64::from(users.first) + u64::from(users.count) <= u64::from(u32::MAX), "edged.instanceUsers", || {
            format!("first + count must stay below {}, the largest uid", u32::MAX)
        })?;
        check(
            (1..=MAX_HEARTBEAT_SECONDS).contains(&self.supernode.heartbeat_seconds),
            "supernode.heartbeatSeconds",
            || format!("must be at least 1 and at most {MAX_HEARTBEAT_SECONDS} (seconds: an hour), e.g. 2"),
        )?;
        if let Some(advertise) = &self.supernode.advertise {
            check(host_port(advertise).is_some_and(|a| a == advertise), "supernode.advertise", || {
                format!("{advertise:?} is not host:port; expected e.g. 192.168.1.20:10360")
            })?;
        }
        Ok(self)
    }
}

/// Rejects `key` with the message `why` unless `ok`.
fn check(ok: bool, key: &'static str, why: impl FnOnce() -> String) -> Result<(), Rejection> {
    if ok {
        Ok(())
    } else {
        Err((key, why()))
    }
}

/// Rejects `key` if `value` is empty or blank.
fn non_empty(key: &'static str, value: &str) -> Result<(), Rejection> {
    check(!value.trim().is_empty(), key, || "must not be empty".to_owned())
}

/// `address` without its optional `wss://` prefix, if what remains is `host:port` with a port in 1..=65535.
fn host_port(address: &str) -> Option<&str> {
    let rest = address.strip_prefix("wss://").unwrap_or(address);
    let (host, port) = rest.rsplit_once(':')?;
    let bracketed = host.starts_with('[') && host.ends_with(']');
    let host_ok = !host.is_empty()
        && !host.contains(|c: char| c.is_whitespace() || c == '/')
        && (bracketed || !host.contains(':'));
    let port_ok = port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok_and(|p| p > 0);
    (host_ok && port_ok).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/agent/edge.yaml");
    const HASH: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const MINIMAL: &str = r#"
node:
  name: pi-kitchen
  account: acme
  network: home
cloud:
  address: 127.0.0.1:10350
  token: "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.abc123.s3cret0s3cret0ab"
"#;

    /// The error for `MINIMAL` with `from` replaced by `to`.
    fn error_with(from: &str, to: &str) -> ConfigError {
        assert!(MINIMAL.contains(from), "{from:?} is not in MINIMAL");
        parse(&MINIMAL.replacen(from, to, 1), "edge.yaml").expect_err(to)
    }

    #[test]
    fn example_file_loads() {
        let config = load(Path::new(EXAMPLE)).unwrap();
        assert_eq!(config.node.name, "pi-kitchen");
        assert_eq!((config.node.account.as_str(), config.node.network.as_str()), ("acme", "home"));
        assert_eq!(config.node.location, Some(Location { latitude: 48.8566, longitude: 2.3522 }));
        assert!(config.node.supernode_eligible);
        assert_eq!(config.cloud.address, "127.0.0.1:10350");
        let token = &config.cloud.token.as_ref().expect("the example has a token").0;
        assert_eq!(token.ca_hash.len(), 64);
        assert_eq!(token.token.id, "abcdef");
        assert_eq!(config.data_dir, Path::new("/var/lib/supermesh"));
        assert_eq!(config.podstatus_interval(), Duration::from_secs(60));
        assert_eq!(config.outbox_cap(), OutboxCap { reports: 10_000, bytes: 16 * 1024 * 1024 });
    }

    #[test]
    fn defaults_apply() {
        let config = parse(MINIMAL, "edge.yaml").unwrap();
        assert_eq!(config.meta.sync.podstatus.interval, 60);
        assert_eq!(config.outbox_cap(), OutboxCap::default());
        assert_eq!(config.data_dir, Path::new("/var/lib/supermesh"));
        assert!(config.node.supernode_eligible);
        assert_eq!(config.node.location, None);
        let token = &config.cloud.token.unwrap().0;
        assert_eq!((token.ca_hash.as_str(), token.token.id.as_str()), (HASH, "abc123"));
        assert_eq!(token.token.secret, "s3cret0s3cret0ab");
        let without =
            parse(&MINIMAL.replace(&format!("  token: \"{HASH}.abc123.s3cret0s3cret0ab\"\n"), ""), "edge.yaml");
        assert_eq!(without.unwrap().cloud.token, None, "an enrolled node needs no token");
    }

    #[test]
    fn explicit_values_override_defaults_and_wss_is_stripped() {
        let text = MINIMAL.replace("127.0.0.1:10350", "wss://cloud.example.com:443")
            + "dataDir: /data\nmeta: {sync: {podstatus: {interval: 5}}, outbox: {maxReports: 500, maxBytes: 2097152}}\n";
        let text = text.replace("network: home", "network: home\n  supernodeEligible: false");
        let config = parse(&text, "edge.yaml").unwrap();
        assert_eq!(config.cloud.address, "cloud.example.com:443");
        assert_eq!(config.data_dir, Path::new("/data"));
        assert_eq!(config.podstatus_interval(), Duration::from_secs(5));
        assert_eq!(config.outbox_cap(), OutboxCap { reports: 500, bytes: 2 * 1024 * 1024 });
        assert!(!config.node.supernode_eligible);
    }

    #[test]
    fn unknown_keys_are_named_with_their_path() {
        let top = error_with("cloud:", "dataDri: /data\ncloud:").to_string();
        assert!(top.starts_with("edge.yaml: dataDri: unknown field `dataDri`, expected one of"), "{top}");
        let nested = error_with("name:", "nmae:").to_string();
        assert!(nested.starts_with("edge.yaml: node.nmae: unknown field `nmae`, expected one of"), "{nested}");
        let deep = parse(&format!("{MINIMAL}meta: {{sync: {{podstatus: {{intervall: 5}}}}}}\n"), "edge.yaml");
        let deep = deep.unwrap_err().to_string();
        assert!(deep.starts_with("edge.yaml: meta.sync.podstatus.intervall: unknown field"), "{deep}");
    }

    #[test]
    fn missing_keys_are_named() {
        let nested = error_with("  account: acme\n", "").to_string();
        assert!(nested.starts_with("edge.yaml: node: missing field `account`"), "{nested}");
        let top = parse("node: {name: a, account: b, network: c}\n", "edge.yaml").unwrap_err();
        assert!(matches!(top, ConfigError::Parse { .. }), "{top:?}");
        assert!(top.to_string().starts_with("edge.yaml: missing field `cloud`"), "{top}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let text = format!("{MINIMAL}meta:\n  sync:\n    podstatus:\n      interval: abc\n");
        let message = parse(&text, "edge.yaml").unwrap_err().to_string();
        let expected = r#"edge.yaml: meta.sync.podstatus.interval: invalid type: string "abc", expected u64"#;
        assert!(message.starts_with(expected), "{message}");
    }

    #[test]
    fn invalid_values_name_the_key_and_the_expected_shape() {
        let secret = "s3cret0s3cret0ab";
        let cases = [
            ("name: pi-kitchen", "name: Pi_Kitchen", "node.name", "DNS-1123"),
            ("name: pi-kitchen", "name: pi..kitchen", "node.name", "DNS-1123"),
            ("name: pi-kitchen", "name: pi-", "node.name", "DNS-1123"),
            ("account: acme", "account: ''", "node.account", "DNS-1123"),
            ("network: home", "network: ' '", "node.network", "DNS-1123"),
            ("account: acme", "account: Acme Inc", "node.account", "DNS-1123"),
            ("network: home", "network: home\n  location: {latitude: 91, longitude: 2}", "node.location", "-90..90"),
            ("127.0.0.1:10350", "127.0.0.1", "cloud.address", "host:port"),
            ("127.0.0.1:10350", "127.0.0.1:0", "cloud.address", "port 1-65535"),
            ("127.0.0.1:10350", "https://cloud:443", "cloud.address", "host:port"),
            ("abcdef.abc123.", "abcdefabc123", "cloud.token", "64 lowercase hex"),
            ("0123456789abcdef.", "0123456789ABCDEF.", "cloud.token", "64 lowercase hex digits"),
            (secret, "s3cret", "cloud.token", "a-z 0-9"),
            (secret, "s3cret/s3cret/ab", "cloud.token", "a-z 0-9"),
            ("abc123.s3cret0s3cret0ab", "s3cret-s3cret-s3cret", "cloud.token", "supermesh 0.1"),
            ("cloud:", "dataDir: ''\ncloud:", "dataDir", "must not be empty"),
            (
                "cloud:",
                "meta: {sync: {podstatus: {interval: 0}}}\ncloud:",
                "meta.sync.podstatus.interval",
                "at least 1",
            ),
            // Reproduced with the edge_config fuzz target: the agent panicked multiplying these.
            (
                "cloud:",
                "meta: {sync: {podstatus: {interval: 18446744073709551615}}}\ncloud:",
                "meta.sync.podstatus.interval",
                "at most 86400",
            ),
            (
                "cloud:",
                "supernode: {heartbeatSeconds: 18446744073709551615}\ncloud:",
                "supernode.heartbeatSeconds",
                "at most 3600",
            ),
            ("cloud:", "meta: {outbox: {maxReports: 99}}\ncloud:", "meta.outbox.maxReports", "at least 100"),
            ("cloud:", "meta: {outbox: {maxBytes: 1000}}\ncloud:", "meta.outbox.maxBytes", "at least 1048576"),
            ("cloud:", "edged: {instanceUsers: {first: 0}}\ncloud:", "edged.instanceUsers", "first >= 1000"),
            (
                "cloud:",
                "edged: {instanceUsers: {first: 4294967000, count: 1000}}\ncloud:",
                "edged.instanceUsers",
                "below 4294967295",
            ),
        ];
        for (from, to, expected_key, hint) in cases {
            let error = error_with(from, to);
            let text = error.to_string();
            assert!(text.starts_with(&format!("edge.yaml: {expected_key}: ")), "{to}: {text}");
            assert!(text.contains(hint), "{to}: {text} lacks {hint:?}");
            assert!(!text.contains("s3cret0s3cret"), "{to}: the secret leaked into {text}");
            assert!(matches!(&error, ConfigError::Invalid { key, .. } if key == expected_key), "{error:?}");
        }
    }

    #[test]
    fn token_debug_hides_the_secret() {
        let config = parse(MINIMAL, "edge.yaml").unwrap();
        let debug = format!("{config:?}");
        assert!(debug.contains(HASH) && debug.contains("<redacted>"), "{debug}");
        assert!(!debug.contains("s3cret0s3cret"), "{debug}");
    }

    #[test]
    fn load_of_a_missing_file_names_the_path() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("no-such-dir/edge.yaml");
        let error = load(&path).unwrap_err();
        assert!(matches!(&error, ConfigError::Read { error, .. } if error.kind() == std::io::ErrorKind::NotFound));
        let text = error.to_string();
        assert!(text.starts_with(&format!("cannot read {}: ", path.display())), "{text}");
        assert!(text.contains("No such file or directory"), "{text}");
    }
}
