//! `supermesh-agent join`: makes a device a node of a cloud. It checks what it is given
//! with the rules `edge.yaml` is loaded with, and writes `edge.yaml` (0600, it holds the
//! join token) for the agent to run with. A device that already joined keeps its
//! configuration and identity: joining again as the same node changes nothing, joining
//! as another node is refused until the old identity is removed by hand.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::config::{self, ConfigError, EdgeConfig};

/// Where the packaged service reads its configuration.
pub const DEFAULT_CONFIG: &str = "/etc/supermesh/edge.yaml";
/// Where the packaged service keeps its state (systemd's `StateDirectory=supermesh`).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/supermesh";
/// The system user the packaged service runs as: `edge.yaml` is handed to it when it exists.
pub const SERVICE_USER: &str = "supermesh";
/// The file in `dataDir/identity` that holds the certificate the cloud issued for a node name.
const CERT_FILE: &str = "node.crt";

/// What `supermesh-agent join` is given.
#[derive(clap::Args, Clone, Debug)]
pub struct JoinArgs {
    /// host:port of the controller's cloudhub (a wss:// prefix is accepted).
    #[arg(long, value_name = "HOST:PORT")]
    pub cloud: String,
    /// Join string, as `supermeshctl token create` prints it: <ca sha256>.<token id>.<token secret>.
    #[arg(long, env = "SUPERMESH_JOIN_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Name of this device's EdgeNode, a DNS-1123 subdomain, e.g. pi-kitchen.
    #[arg(long)]
    pub name: String,
    /// Account the device belongs to (a DNS-1123 name).
    #[arg(long)]
    pub account: String,
    /// Network the device is on (a DNS-1123 name).
    #[arg(long)]
    pub network: String,
    /// Where the device is, in decimal degrees, e.g. 48.8566,2.3522.
    #[arg(long, value_name = "LAT,LON", allow_hyphen_values = true)]
    pub location: Option<String>,
    /// Configuration file to write.
    #[arg(long, value_name = "EDGE_YAML", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// Where the agent keeps its database, identity and instance files.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// host:port to serve peers on (default 0.0.0.0:10360).
    #[arg(long, value_name = "HOST:PORT")]
    pub peer_listen: Option<String>,
    /// host:port of the local API for microservices; keep it on loopback (default 127.0.0.1:10380).
    #[arg(long, value_name = "HOST:PORT")]
    pub api_listen: Option<String>,
    /// Only write the configuration; start the agent later (for example as a service).
    #[arg(long)]
    pub no_run: bool,
}

/// What `join` did.
#[derive(Debug)]
pub enum Joined {
    /// The configuration was written.
    Written(EdgeConfig),
    /// The device had already joined as this node of this cloud: its configuration is kept as it was.
    /// `differs` names the keys it holds other values for than those given.
    Kept {
        /// The configuration in place.
        config: EdgeConfig,
        /// Keys of the kept file whose values differ from those given.
        differs: Vec<&'static str>,
    },
}

impl Joined {
    /// The configuration the agent runs with.
    pub fn config(&self) -> &EdgeConfig {
        match self {
            Joined::Written(config) | Joined::Kept { config, .. } => config,
        }
    }
}

/// Why the device could not join.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// An argument is not acceptable.
    #[error("invalid {flag}: {message}")]
    Invalid {
        /// The command-line flag.
        flag: &'static str,
        /// What is wrong and what a valid value looks like.
        message: String,
    },
    /// The device already joined as another node or to another cloud.
    #[error(transparent)]
    AlreadyJoined(Box<AlreadyJoined>),
    /// A configuration file exists but cannot be read or is not valid.
    #[error(
        "{} already exists but cannot be used ({error}); it may hold this device's configuration, so nothing was \
         changed: fix it, or remove it (and {}, if this device should join as a new node) and run join again",
        .path.display(),
        .identity.display()
    )]
    Unusable {
        /// The existing file.
        path: PathBuf,
        /// Why it cannot be used.
        error: ConfigError,
        /// The identity directory its node would have.
        identity: PathBuf,
    },
    /// There is no configuration, but an identity from an earlier join.
    #[error(
        "{} holds the certificate of a node this device joined as before, but {} is missing; joining now would \
         give that identity to another configuration, so nothing was changed. Restore {1}, or remove {0} to join \
         as a new node (and retire the old one with `supermeshctl node revoke`)",
        .identity.display(),
        .path.display()
    )]
    OrphanIdentity {
        /// The identity directory.
        identity: PathBuf,
        /// The missing configuration file.
        path: PathBuf,
    },
    /// The file could not be written.
    #[error("cannot write {}: {error}", .path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
}

/// A device that joined as one node being asked to join as another.
#[derive(Debug, thiserror::Error)]
#[error(
    "this device is already joined as node {node} of cloud {cloud} ({path} says so); joining again would \
     replace its identity, so nothing was changed. To join it as {wanted_node} of {wanted_cloud} instead, \
     stop the agent (systemctl stop supermesh-agent), remove {path} and {identity} and run join again; \
     `supermeshctl node revoke {node}` retires the old node in the cloud",
    path = .path.display(),
    identity = .identity.display()
)]
pub struct AlreadyJoined {
    /// The existing configuration file.
    pub path: PathBuf,
    /// The node it names.
    pub node: String,
    /// The cloud it names.
    pub cloud: String,
    /// Its identity directory.
    pub identity: PathBuf,
    /// The node asked for.
    pub wanted_node: String,
    /// The cloud asked for.
    pub wanted_cloud: String,
}

/// Checks `args`, then writes `args.config` unless the device already joined as that node.
pub fn join(args: &JoinArgs) -> Result<Joined, JoinError> {
    let text = render(args)?;
    let wanted = config::parse(&text, "edge.yaml").map_err(|e| match e {
        ConfigError::Invalid { key, message, .. } => {
            // The file's wording, less what only makes sense in a file: its line and column.
            let message = without_position(&message);
            let mut message = message.strip_prefix("invalid join token: ").unwrap_or(message).to_owned();
            let flag = flag_of(&key);
            if matches!(flag, "--peer-listen" | "--api-listen") {
                message.push_str("; expected an IP address and a port, e.g. 0.0.0.0:10360 or [::]:10360");
            }
            JoinError::Invalid { flag, message }
        }
        // Every key is written by `render`: a parse error here is a bug, but name it rather than panic.
        other => JoinError::Invalid { flag: "arguments", message: other.to_string() },
    })?;
    match std::fs::symlink_metadata(&args.config) {
        Ok(_) => return keep_existing(&args.config, &wanted),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(JoinError::Write { path: args.config.clone(), error }),
    }
    let identity = wanted.data_dir.join(crate::run::IDENTITY_DIR);
    if identity.join(CERT_FILE).exists() {
        return Err(JoinError::OrphanIdentity { identity, path: args.config.clone() });
    }
    write_private(&args.config, text.as_bytes())?;
    Ok(Joined::Written(wanted))
}

/// The existing configuration at `path`, if it is that of the node `wanted` describes.
fn keep_existing(path: &Path, wanted: &EdgeConfig) -> Result<Joined, JoinError> {
    let existing = config::load(path).map_err(|error| JoinError::Unusable {
        path: path.to_owned(),
        error,
        identity: wanted.data_dir.join(crate::run::IDENTITY_DIR),
    })?;
    if existing.node.name != wanted.node.name || existing.cloud.address != wanted.cloud.address {
        return Err(JoinError::AlreadyJoined(Box::new(AlreadyJoined {
            path: path.to_owned(),
            identity: existing.data_dir.join(crate::run::IDENTITY_DIR),
            node: existing.node.name,
            cloud: existing.cloud.address,
            wanted_node: wanted.node.name.clone(),
            wanted_cloud: wanted.cloud.address.clone(),
        })));
    }
    let (a, b) = (&existing, wanted);
    let differs = [
        ("node.account", a.node.account != b.node.account),
        ("node.network", a.node.network != b.node.network),
        ("node.location", a.node.location != b.node.location),
        ("cloud.token", a.cloud.token.is_some() && a.cloud.token != b.cloud.token),
        ("dataDir", a.data_dir != b.data_dir),
        ("supernode.listen", a.supernode.listen != b.supernode.listen),
        ("localApi.listen", a.local_api.listen != b.local_api.listen),
    ]
    .into_iter()
    .filter_map(|(key, differs)| differs.then_some(key))
    .collect();
    Ok(Joined::Kept { config: existing, differs })
}

/// The command-line flag that sets `key` of edge.yaml.
fn flag_of(key: &str) -> &'static str {
    match key {
        "node.name" => "--name",
        "node.account" => "--account",
        "node.network" => "--network",
        "node.location" => "--location",
        "cloud.address" => "--cloud",
        "cloud.token" => "--token",
        "dataDir" => "--data-dir",
        "supernode.listen" => "--peer-listen",
        "localApi.listen" => "--api-listen",
        _ => "arguments",
    }
}

/// `message` without the ` at line L column C` the YAML parser ends it with.
fn without_position(message: &str) -> &str {
    match message.rsplit_once(" at line ") {
        Some((head, tail))
            if tail.split_once(" column ").is_some_and(|(l, c)| {
                [l, c].iter().all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            }) =>
        {
            head
        }
        _ => message,
    }
}

/// `LAT,LON` in decimal degrees.
fn parse_location(text: &str) -> Result<(f64, f64), JoinError> {
    let invalid = |message: String| JoinError::Invalid { flag: "--location", message };
    let example = "expected LAT,LON in decimal degrees, latitude within -90..90 and longitude within -180..180, \
                   e.g. 48.8566,2.3522";
    let (lat, lon) = text.split_once(',').ok_or_else(|| invalid(format!("{text:?} is not LAT,LON; {example}")))?;
    let number = |s: &str| s.trim().parse::<f64>().ok().filter(|n| n.is_finite());
    let (Some(latitude), Some(longitude)) = (number(lat), number(lon)) else {
        return Err(invalid(format!("{text:?} is not two numbers; {example}")));
    };
    if !(-90.0..=90.0).contains(&latitude) || !(-180.0..=180.0).contains(&longitude) {
        return Err(invalid(format!("{text:?} is out of range; {example}")));
    }
    Ok((latitude, longitude))
}

/// `value` as a YAML scalar: plain where YAML reads it back as that very string, else double-quoted.
fn scalar(value: &str) -> String {
    let plain = !value.is_empty()
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':' | b'_' | b'/'))
        && value.as_bytes()[0].is_ascii_alphanumeric()
        && serde_yaml::from_str::<String>(value).is_ok_and(|v| v == value);
    if plain {
        value.to_owned()
    } else {
        // A JSON string is a valid YAML double-quoted scalar.
        serde_json::to_string(value).expect("a string serializes")
    }
}

/// The edge.yaml `args` describe, commented like the example the package installs.
fn render(args: &JoinArgs) -> Result<String, JoinError> {
    let location = match args.location.as_deref().map(parse_location).transpose()? {
        Some((latitude, longitude)) => format!("location: {{latitude: {latitude}, longitude: {longitude}}}"),
        None => "# location: {latitude: 48.8566, longitude: 2.3522}".to_owned(),
    };
    let data_dir = args.data_dir.to_str().ok_or_else(|| JoinError::Invalid {
        flag: "--data-dir",
        message: format!("{:?} is not valid UTF-8", args.data_dir),
    })?;
    let default_peer = SocketAddr::from(([0, 0, 0, 0], 10360)).to_string();
    let default_api = SocketAddr::from(([127, 0, 0, 1], 10380)).to_string();
    let peer_listen = scalar(args.peer_listen.as_deref().unwrap_or(&default_peer));
    let api_listen = scalar(args.api_listen.as_deref().unwrap_or(&default_api));
    let (name, account, network) = (scalar(&args.name), scalar(&args.account), scalar(&args.network));
    let (cloud, token, data_dir) =
        (scalar(&args.cloud), serde_json::to_string(&args.token).expect("a string"), scalar(data_dir));
    Ok(format!(
        r#"# Configuration of the supermesh agent on this device, written by
# `supermesh-agent join`. Keys are camelCase; unknown keys are errors. The agent
# reads it when it starts: restart it after a change (systemctl restart supermesh-agent).
node:
  # Name of this device's EdgeNode: a DNS-1123 subdomain (lowercase letters,
  # digits, '-' and '.'). The node's certificate is issued for this name: to
  # change it, the device joins again as a new node.
  name: {name}
  # Account the device belongs to, used by Account meshes (a DNS-1123 name).
  # The cloud records it at enrollment; a token may admit only one account.
  account: {account}
  # Network the device is on, used by Network meshes (a DNS-1123 name).
  network: {network}
  # Where the device is, used by Proximity meshes. Optional.
  {location}
  # Whether this device may be elected supernode of its network. Default true.
  supernodeEligible: true
  # Whether this device stays put; the election prefers stationary devices. Default true.
  stationary: true
cloud:
  # host:port of the controller's cloudhub (a wss:// prefix is accepted).
  address: {cloud}
  # Join string the device enrolls with once, as `supermeshctl token create`
  # prints it: the sha256 of the cloud CA certificate (64 lowercase hex digits),
  # then the bootstrap token <id>.<secret>. On its first start the agent makes a
  # key in dataDir/identity (it never leaves the device) and trades the token for
  # a node certificate; from then on it connects and renews with the certificate,
  # and this key may be removed.
  token: {token}
# Where the agent keeps its SQLite database, its identity and instance files.
dataDir: {data_dir}
meta:
  sync:
    podstatus:
      # Seconds between full status reports of local instances (>= 1). Default 60.
      interval: 60
# This node's part in its network cluster. Nodes on one network heartbeat each
# other, elect a supernode and send their reports upstream through it.
supernode:
  # Where peers reach this node: HTTP over TCP and heartbeats over UDP, same port.
  listen: {peer_listen}
  # host:port peers should use for this node. Default: the address the cloud
  # sees this node connect from, with the listen port.
  # advertise: 192.168.1.20:10360
  # Seconds between heartbeats (>= 1); a peer silent for 2.5 heartbeats is gone. Default 2.
  heartbeatSeconds: 2
  # LAN discovery by UDP multicast (group 239.255.77.77, the listen port). Default false.
  multicast: false
# The HTTP API this node serves its microservices (its URL is in SUPERMESH_API).
localApi:
  # Keep it on loopback.
  listen: {api_listen}
"#
    ))
}

/// Writes `bytes` to `path` as a 0600 file, atomically (a reader sees the old file or the
/// whole new one), creating its directory. When run as root, the file is handed to the
/// service user if there is one, since the packaged service reads it as that user.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), JoinError> {
    let error = |path: &Path| {
        let path = path.to_owned();
        move |error| JoinError::Write { path, error }
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(error(dir))?;
    let name = path.file_name().ok_or_else(|| JoinError::Invalid {
        flag: "--config",
        message: format!("{} does not name a file", path.display()),
    })?;
    let tmp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let written = (|| {
        // Created 0600 rather than chmod-ed after: the token is never readable by others, not even briefly.
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        hand_to_service_user(&tmp)?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(error(path)(e));
    }
    // The rename is durable once the directory is.
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(error(dir))
}

/// Gives `path` to [`SERVICE_USER`] when running as root and that user exists.
fn hand_to_service_user(path: &Path) -> std::io::Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        return Ok(());
    }
    match nix::unistd::User::from_name(SERVICE_USER) {
        Ok(Some(user)) => std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw())),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use supermesh_protocol::Location;

    const JOIN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.abc123.s3cret0s3cret0ab";

    fn args(dir: &Path) -> JoinArgs {
        JoinArgs {
            cloud: "wss://cloud.example.com:10350".into(),
            token: JOIN.into(),
            name: "pi-kitchen".into(),
            account: "acme".into(),
            network: "home".into(),
            location: Some("48.8566, -2.3522".into()),
            config: dir.join("etc/supermesh/edge.yaml"),
            data_dir: dir.join("var/lib/supermesh"),
            peer_listen: Some("[::]:10460".into()),
            api_listen: None,
            no_run: true,
        }
    }

    fn invalid(args: &JoinArgs) -> (&'static str, String) {
        match join(args) {
            Err(JoinError::Invalid { flag, message }) => (flag, message),
            other => panic!("expected an invalid argument, got {other:?}"),
        }
    }

    #[test]
    fn the_written_file_loads_with_the_given_values() {
        let dir = tempfile::tempdir().unwrap();
        let args = args(dir.path());
        let joined = join(&args).unwrap();
        assert!(matches!(joined, Joined::Written(_)), "{joined:?}");
        let config = config::load(&args.config).unwrap();
        assert_eq!(&config, joined.config());
        assert_eq!(config.node.name, "pi-kitchen");
        assert_eq!((config.node.account.as_str(), config.node.network.as_str()), ("acme", "home"));
        assert_eq!(config.node.location, Some(Location { latitude: 48.8566, longitude: -2.3522 }));
        assert_eq!(config.cloud.address, "cloud.example.com:10350");
        assert_eq!(config.cloud.token.as_ref().unwrap().0.to_string(), JOIN);
        assert_eq!(config.data_dir, args.data_dir);
        assert_eq!(config.supernode.listen, "[::]:10460".parse().unwrap());
        assert_eq!(config.local_api.listen, "127.0.0.1:10380".parse().unwrap());
        assert!(config.node.supernode_eligible && config.node.stationary);
        let text = std::fs::read_to_string(&args.config).unwrap();
        assert!(text.starts_with("# Configuration of the supermesh agent"), "a commented file:\n{text}");
        assert!(text.contains("  name: pi-kitchen\n") && text.contains("  listen: \"[::]:10460\"\n"), "{text}");
        let leftovers: Vec<_> = std::fs::read_dir(args.config.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "only edge.yaml is left: {leftovers:?}");
    }

    #[test]
    fn values_yaml_would_misread_are_quoted_and_a_missing_location_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let args = JoinArgs {
            name: "123".into(),
            account: "true".into(),
            network: "null".into(),
            location: None,
            data_dir: dir.path().join("data dir #1"),
            ..args(dir.path())
        };
        join(&args).unwrap();
        let config = config::load(&args.config).unwrap();
        assert_eq!((config.node.name.as_str(), config.node.account.as_str()), ("123", "true"));
        assert_eq!(config.node.network, "null");
        assert_eq!(config.node.location, None);
        assert_eq!(config.data_dir, args.data_dir);
    }

    #[test]
    fn the_file_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let args = args(dir.path());
        join(&args).unwrap();
        let mode = std::fs::metadata(&args.config).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }

    #[test]
    fn bad_arguments_are_refused_with_the_flag_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let base = args(dir.path());
        type Change = fn(&mut JoinArgs);
        let cases: [(Change, &str, &str); 13] = [
            (|a| a.name = "Pi_Kitchen".into(), "--name", "DNS-1123"),
            (|a| a.name = "pi-".into(), "--name", "DNS-1123"),
            (|a| a.account = "Acme Inc".into(), "--account", "DNS-1123"),
            (|a| a.network = String::new(), "--network", "DNS-1123"),
            (|a| a.token = "abc.abc123.s3cret0s3cret0ab".into(), "--token", "64 lowercase hex"),
            (|a| a.token = "s3cret".into(), "--token", "no '.'"),
            (|a| a.token = format!("{}.x", &JOIN[..64]), "--token", "supermesh 0.1"),
            (|a| a.cloud = "cloud.example.com".into(), "--cloud", "host:port"),
            (|a| a.location = Some("48.8566".into()), "--location", "LAT,LON"),
            (|a| a.location = Some("north,east".into()), "--location", "two numbers"),
            (|a| a.location = Some("91,2".into()), "--location", "out of range"),
            (|a| a.location = Some("nan,2".into()), "--location", "two numbers"),
            (|a| a.peer_listen = Some("0.0.0.0".into()), "--peer-listen", "socket address"),
        ];
        for (change, flag, hint) in cases {
            let mut args = base.clone();
            change(&mut args);
            let (got, message) = invalid(&args);
            assert_eq!(got, flag, "{args:?}: {message}");
            assert!(message.contains(hint), "{flag}: {message:?} lacks {hint:?}");
            assert!(!message.contains("s3cret0s3cret0ab"), "the secret leaked: {message}");
            assert!(!message.contains(" at line "), "{flag}: {message:?} points into a file the user never saw");
            assert!(!args.config.exists(), "nothing is written for {flag}");
        }
        let text = JoinError::Invalid { flag: "--name", message: "m".into() }.to_string();
        assert_eq!(text, "invalid --name: m");
    }

    #[test]
    fn joining_again_as_the_same_node_keeps_the_file_and_its_identity() {
        let dir = tempfile::tempdir().unwrap();
        let first = args(dir.path());
        join(&first).unwrap();
        let identity = first.data_dir.join(crate::run::IDENTITY_DIR);
        std::fs::create_dir_all(&identity).unwrap();
        std::fs::write(identity.join(CERT_FILE), "certificate").unwrap();
        let before = std::fs::read(&first.config).unwrap();
        // The same node of the same cloud (with or without wss://), with another token and account.
        let again = JoinArgs {
            cloud: "cloud.example.com:10350".into(),
            token: JOIN.replace("abc123", "def456"),
            account: "other".into(),
            ..first.clone()
        };
        match join(&again).unwrap() {
            Joined::Kept { config, differs } => {
                assert_eq!(config.node.account, "acme", "the kept file's values hold");
                assert_eq!(differs, ["node.account", "cloud.token"]);
            }
            other => panic!("expected the file to be kept, got {other:?}"),
        }
        let Joined::Kept { differs, .. } = join(&first).unwrap() else { panic!("kept") };
        assert!(differs.is_empty(), "{differs:?}");
        assert_eq!(std::fs::read(&first.config).unwrap(), before, "the file is unchanged");
        assert_eq!(std::fs::read(identity.join(CERT_FILE)).unwrap(), b"certificate");
    }

    #[test]
    fn joining_as_another_node_or_cloud_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let first = args(dir.path());
        join(&first).unwrap();
        let before = std::fs::read(&first.config).unwrap();
        for other in [
            JoinArgs { name: "pi-garage".into(), ..first.clone() },
            JoinArgs { cloud: "cloud.example.org:10350".into(), ..first.clone() },
        ] {
            let error = join(&other).unwrap_err();
            assert!(matches!(error, JoinError::AlreadyJoined(_)), "{error:?}");
            let text = error.to_string();
            assert!(
                text.starts_with("this device is already joined as node pi-kitchen of cloud cloud.example.com:10350"),
                "{text}"
            );
            let identity = first.data_dir.join("identity");
            assert!(text.contains(&format!("remove {} and {}", first.config.display(), identity.display())), "{text}");
            assert!(!text.contains("s3cret0s3cret0ab"), "{text}");
        }
        assert_eq!(std::fs::read(&first.config).unwrap(), before, "the file is unchanged");
    }

    #[test]
    fn an_unusable_file_or_an_identity_without_its_file_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let args = args(dir.path());
        std::fs::create_dir_all(args.config.parent().unwrap()).unwrap();
        std::fs::write(&args.config, "node: [").unwrap();
        let error = join(&args).unwrap_err();
        assert!(matches!(error, JoinError::Unusable { .. }), "{error:?}");
        assert!(error.to_string().contains("already exists but cannot be used"), "{error}");
        assert_eq!(std::fs::read_to_string(&args.config).unwrap(), "node: [");

        std::fs::remove_file(&args.config).unwrap();
        let identity = args.data_dir.join(crate::run::IDENTITY_DIR);
        std::fs::create_dir_all(&identity).unwrap();
        std::fs::write(identity.join("node.key"), "key").unwrap();
        assert!(matches!(join(&args), Ok(Joined::Written(_))), "a key without a certificate names no node yet");
        std::fs::remove_file(&args.config).unwrap();
        std::fs::write(identity.join(CERT_FILE), "certificate").unwrap();
        let error = join(&args).unwrap_err();
        assert!(matches!(error, JoinError::OrphanIdentity { .. }), "{error:?}");
        assert!(!args.config.exists());
    }
}
