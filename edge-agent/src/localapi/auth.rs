//! Who is calling the local API. Each instance finds a bearer token in the file
//! `SUPERMESH_TOKEN_FILE` names (readable only by the instance's user): an HMAC of its microservice's resource string under the
//! agent's secret, which lives in `<dataDir>/api.key`. The secret survives agent
//! restarts, so instances the next agent adopts keep working tokens.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use supermesh_protocol::peer::sign;
use supermesh_protocol::{Assignment, ResourceRef, MICROSERVICE};

use crate::edged::Desired;

/// File name of the agent's API secret inside its data dir.
pub const SECRET_FILE: &str = "api.key";
/// Fewest characters a usable secret has.
const MIN_SECRET_LEN: usize = 32;

/// The instance token of microservice `key` (`namespace/microservice/name`) under the agent's secret.
pub fn token_for(secret: &str, key: &str) -> String {
    // Prefixed, so a token can never double as a signature the secret makes for anything else.
    sign(secret, format!("supermesh local api token/{key}").as_bytes())
}

/// The agent's API secret: read from `<data_dir>/api.key`, created (32 random bytes, hex, mode 0600) if missing.
pub fn load_or_create_secret(data_dir: &Path) -> io::Result<String> {
    let path = data_dir.join(SECRET_FILE);
    match read_secret(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        held => return held,
    }
    let annotate =
        |what: &str, e: io::Error| io::Error::new(e.kind(), format!("cannot {what} {}: {e}", path.display()));
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(|e| annotate("create the directory of", e))?;
    let secret: String = rand::random::<[u8; 32]>().iter().map(|b| format!("{b:02x}")).collect();
    // Written aside and linked into place: the file appears complete or not at all,
    // and a link never replaces a secret another agent process made meanwhile.
    let aside = data_dir.join(format!(".{SECRET_FILE}.{}", std::process::id()));
    let written = (|| {
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&aside)?;
        file.write_all(format!("{secret}\n").as_bytes())?;
        file.sync_all()?;
        fs::hard_link(&aside, &path)
    })();
    let _ = fs::remove_file(&aside);
    match written {
        Ok(()) => Ok(secret),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => read_secret(&path),
        Err(e) => Err(annotate("create", e)),
    }
}

/// The secret in `path`, with the file made private if it was not; errors keep the OS's kind.
fn read_secret(path: &Path) -> io::Result<String> {
    let text = fs::read_to_string(path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display())))?;
    let secret = text.trim();
    if secret.len() < MIN_SECRET_LEN || !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} does not hold an API secret (at least {MIN_SECRET_LEN} printable characters); delete it and \
                 restart the agent to make a new one (running microservices get new tokens when they restart)",
                path.display()
            ),
        ));
    }
    if fs::metadata(path)?.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(path, Permissions::from_mode(0o600))?;
    }
    Ok(secret.to_owned())
}

/// A microservice calling the API, as its token tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Resource string `namespace/microservice/name`: what its storage and events are keyed by.
    pub key: String,
    /// Namespace of the microservice.
    pub namespace: String,
    /// Name of the microservice.
    pub microservice: String,
    /// Mesh of the microservice.
    pub mesh: String,
}

/// The token of every microservice in `desired`, mapped to that microservice.
/// Entries that edged cannot run (not a microservice, unreadable assignment) get no token.
pub fn callers(secret: &str, desired: &BTreeMap<String, Desired>) -> HashMap<String, Caller> {
    desired
        .iter()
        .filter_map(|(key, d)| {
            let resource = ResourceRef::parse(key).ok().filter(|r| r.res_type == MICROSERVICE)?;
            let assignment: Assignment = serde_json::from_str(&d.value).ok()?;
            let caller = Caller {
                key: key.clone(),
                namespace: resource.namespace.to_owned(),
                microservice: resource.id?.to_owned(),
                mesh: assignment.spec.mesh,
            };
            Some((token_for(secret, key), caller))
        })
        .collect()
}

/// The token of an `Authorization` header (`None` when the request has none).
pub fn bearer(header: Option<&str>) -> Result<&str, &'static str> {
    let header = header
        .ok_or("missing Authorization header; send Authorization: Bearer <the contents of $SUPERMESH_TOKEN_FILE>")?;
    match header.trim().split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => Ok(token.trim()),
        _ => Err("the Authorization header is not \"Bearer <token>\"; send Authorization: Bearer <the contents of $SUPERMESH_TOKEN_FILE>"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desired(entries: &[(&str, &str)]) -> BTreeMap<String, Desired> {
        entries.iter().map(|(k, v)| (k.to_string(), Desired { version: "1".into(), value: v.to_string() })).collect()
    }

    fn assignment(namespace: &str, name: &str, mesh: &str) -> String {
        serde_json::json!({
            "namespace": namespace, "name": name, "uid": "u", "generation": 1,
            "spec": {"mesh": mesh, "command": ["run"]}
        })
        .to_string()
    }

    #[test]
    fn tokens_differ_per_microservice_and_secret() {
        let token = token_for("secret-a", "team/microservice/web");
        assert_eq!(token.len(), 64);
        assert_eq!(token, token_for("secret-a", "team/microservice/web"));
        assert_ne!(token, token_for("secret-a", "team/microservice/db"));
        assert_ne!(token, token_for("secret-b", "team/microservice/web"));
        assert_ne!(token, sign("secret-a", b"team/microservice/web"), "tokens are not bare signatures of the key");
    }

    #[test]
    fn tokens_map_to_the_desired_microservices_only() {
        let set = desired(&[
            ("team/microservice/web", &assignment("team", "web", "lan")),
            ("ops/microservice/db", &assignment("ops", "db", "acct")),
            ("team/microservice/broken", "{not json"),
            ("_/membership/home", &assignment("_", "home", "x")),
        ]);
        let map = callers("s", &set);
        assert_eq!(map.len(), 2, "{map:?}");
        let web = &map[&token_for("s", "team/microservice/web")];
        assert_eq!(
            (web.key.as_str(), web.namespace.as_str(), web.microservice.as_str(), web.mesh.as_str()),
            ("team/microservice/web", "team", "web", "lan")
        );
        assert_eq!(map[&token_for("s", "ops/microservice/db")].mesh, "acct");
        assert!(!map.contains_key(&token_for("s", "team/microservice/broken")));
        assert!(!map.contains_key(&token_for("other", "team/microservice/web")), "another secret's token is unknown");
    }

    #[test]
    fn bearer_tokens_are_read_from_the_header() {
        assert_eq!(bearer(Some("Bearer abc")), Ok("abc"));
        assert_eq!(bearer(Some("bearer   abc ")), Ok("abc"));
        assert!(bearer(None).unwrap_err().contains("missing"));
        for bad in ["", "Bearer", "Bearer  ", "Basic abc", "abc"] {
            assert!(bearer(Some(bad)).unwrap_err().contains("not \"Bearer <token>\""), "{bad:?}");
        }
    }

    #[test]
    fn the_secret_is_made_once_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let secret = load_or_create_secret(&data).unwrap();
        assert_eq!(secret.len(), 64);
        assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()));
        let path = data.join(SECRET_FILE);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(load_or_create_secret(&data).unwrap(), secret, "a restart keeps the secret");
        assert_eq!(fs::read_dir(&data).unwrap().count(), 1, "nothing is left aside");

        fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        assert_eq!(load_or_create_secret(&data).unwrap(), secret);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600, "made private again");

        let other = tempfile::tempdir().unwrap();
        assert_ne!(load_or_create_secret(other.path()).unwrap(), secret, "every agent has its own");
    }

    #[test]
    fn a_damaged_secret_file_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SECRET_FILE);
        fs::write(&path, "short\n").unwrap();
        let err = load_or_create_secret(dir.path()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()) && text.contains("delete it"), "{text}");
        assert_eq!(fs::read_to_string(&path).unwrap(), "short\n", "a damaged file is not overwritten");
    }
}
