//! Bootstrap tokens: each a Secret `supermesh-token-<id>` in the controller's namespace,
//! kubeadm-style. A token has an expiry, an optional use limit and an optional scope
//! (account, network, node-name pattern), and says whether the nodes it enrolls are
//! approved at once. Several are valid at once; each is read when it is used, so a new
//! one counts at once and a deleted one (revoked) stops counting at once.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::Api;
use supermesh_protocol::identity::{BootstrapToken, EnrollRequest};
use supermesh_protocol::Location;

/// Type of token Secrets.
pub const SECRET_TYPE: &str = "supermesh.io/bootstrap-token";
/// Label every token Secret carries.
pub const LABEL: &str = "supermesh.io/bootstrap-token";
/// Default lifetime of a token.
pub const DEFAULT_TTL: SignedDuration = SignedDuration::from_hours(24);

/// Name of the Secret of token `id`.
pub fn secret_name(id: &str) -> String {
    format!("supermesh-token-{id}")
}

/// Where a token may enroll nodes. Empty fields allow anything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scope {
    /// The account nodes must state.
    pub account: Option<String>,
    /// The network nodes must state.
    pub network: Option<String>,
    /// A pattern node names must match; `*` stands for any characters.
    pub node_pattern: Option<String>,
    /// A circle nodes must state a location in.
    pub near: Option<Near>,
}

/// A circle on the Earth: a center and a radius.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Near {
    /// Its center.
    pub center: Location,
    /// Its radius in kilometres.
    pub radius_km: f64,
}

impl std::str::FromStr for Near {
    type Err = String;

    /// Parses `LAT,LON,KM`.
    fn from_str(text: &str) -> Result<Near, String> {
        let numbers: Vec<f64> =
            text.split(',').map(|n| n.trim().parse::<f64>()).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
        let [latitude, longitude, radius_km] = numbers[..] else {
            return Err("expected LATITUDE,LONGITUDE,KILOMETRES, for example 48.8566,2.3522,10".into());
        };
        let center = Location { latitude, longitude };
        let positive = radius_km.is_finite() && radius_km > 0.0;
        if !center.is_valid() || !positive {
            return Err("the latitude must be in -90..90, the longitude in -180..180 and the radius positive".into());
        }
        Ok(Near { center, radius_km })
    }
}

impl std::fmt::Display for Near {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{},{},{}", self.center.latitude, self.center.longitude, self.radius_km)
    }
}

/// A bootstrap token as its Secret holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    /// The token itself.
    pub token: BootstrapToken,
    /// When it stops counting.
    pub expires: Timestamp,
    /// Enrollments it allows, if limited.
    pub limit: Option<u32>,
    /// Enrollments made with it (counted when it is limited).
    pub used: u32,
    /// Where it may enroll nodes.
    pub scope: Scope,
    /// Whether the nodes it enrolls are approved at once.
    pub auto_approve: bool,
    /// What it is for.
    pub description: String,
}

/// Why a token does not enroll a node: an HTTP status that fits and a reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 401 (no such token, wrong secret, expired, used up), 403 (outside its scope), 503 (try later).
    pub status: u16,
    /// What the device's log says.
    pub reason: String,
}

impl Refusal {
    fn new(status: u16, reason: impl Into<String>) -> Refusal {
        Refusal { status, reason: reason.into() }
    }
}

/// Whether `presented` equals `expected`, in time independent of where they differ.
pub fn secrets_match(presented: &str, expected: &str) -> bool {
    let (a, b) = (presented.as_bytes(), expected.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `name` matches `pattern`, in which `*` stands for any characters (none included).
pub fn matches_pattern(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(first) else { return false };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else { return rest.is_empty() };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

impl Token {
    /// A new token valid for `ttl` from now.
    pub fn new(token: BootstrapToken, ttl: SignedDuration) -> Token {
        Token {
            token,
            expires: Timestamp::now().saturating_add(ttl).unwrap_or(Timestamp::MAX),
            limit: None,
            used: 0,
            scope: Scope::default(),
            auto_approve: false,
            description: String::new(),
        }
    }

    /// The Secret that holds it.
    pub fn to_secret(&self) -> Secret {
        let mut data = BTreeMap::from([
            ("token-id".to_owned(), self.token.id.clone()),
            ("token-secret".to_owned(), self.token.secret.clone()),
            ("expiration".to_owned(), self.expires.to_string()),
            ("used".to_owned(), self.used.to_string()),
            ("auto-approve".to_owned(), self.auto_approve.to_string()),
        ]);
        let optional = [
            ("usage-limit", self.limit.map(|l| l.to_string())),
            ("account", self.scope.account.clone()),
            ("network", self.scope.network.clone()),
            ("node-pattern", self.scope.node_pattern.clone()),
            ("near", self.scope.near.map(|n| n.to_string())),
            ("description", Some(self.description.clone()).filter(|d| !d.is_empty())),
        ];
        data.extend(optional.into_iter().filter_map(|(k, v)| Some((k.to_owned(), v?))));
        let mut secret = Secret { string_data: Some(data), type_: Some(SECRET_TYPE.to_owned()), ..Secret::default() };
        secret.metadata.name = Some(secret_name(&self.token.id));
        secret.metadata.labels = Some(BTreeMap::from([(LABEL.to_owned(), "true".to_owned())]));
        secret
    }

    /// Reads a token Secret; a malformed one is an error naming the field.
    pub fn from_secret(secret: &Secret) -> Result<Token, String> {
        let name = secret.metadata.name.as_deref().unwrap_or_default();
        let get = |key: &str| -> Option<String> {
            let bytes = secret.data.as_ref()?.get(key)?;
            String::from_utf8(bytes.0.clone()).ok()
        };
        let required = |key: &str| get(key).ok_or_else(|| format!("token Secret {name} has no {key}"));
        let token: BootstrapToken = format!("{}.{}", required("token-id")?, required("token-secret")?)
            .parse()
            .map_err(|e| format!("token Secret {name}: {e}"))?;
        let expires = required("expiration")?
            .parse::<Timestamp>()
            .map_err(|e| format!("token Secret {name}: expiration is not an RFC 3339 time: {e}"))?;
        let number = |key: &str| -> Result<Option<u32>, String> {
            get(key).map(|v| v.parse().map_err(|_| format!("token Secret {name}: {key} is not a number"))).transpose()
        };
        Ok(Token {
            token,
            expires,
            limit: number("usage-limit")?,
            used: number("used")?.unwrap_or(0),
            scope: Scope {
                account: get("account"),
                network: get("network"),
                node_pattern: get("node-pattern"),
                near: get("near")
                    .map(|n| n.parse())
                    .transpose()
                    .map_err(|e| format!("token Secret {name}: near: {e}"))?,
            },
            auto_approve: get("auto-approve").as_deref() == Some("true"),
            description: get("description").unwrap_or_default(),
        })
    }

    /// Whether it admits enrolling the node `request` describes with `presented`, now.
    pub fn admits(&self, presented: &BootstrapToken, request: &EnrollRequest, now: Timestamp) -> Result<(), Refusal> {
        let id = &self.token.id;
        if !secrets_match(&presented.secret, &self.token.secret) {
            return Err(Refusal::new(401, format!("bootstrap token {id} was presented with a wrong secret")));
        }
        if now >= self.expires {
            return Err(Refusal::new(401, format!("bootstrap token {id} expired at {}", self.expires)));
        }
        if self.limit.is_some_and(|limit| self.used >= limit) {
            return Err(Refusal::new(401, format!("bootstrap token {id} is used up ({} enrollments)", self.used)));
        }
        let outside = |what: &str, wanted: &Option<String>, stated: &str| {
            wanted.as_deref().filter(|w| *w != stated).map(|w| {
                Refusal::new(403, format!("bootstrap token {id} enrolls only nodes of {what} {w:?}, not {stated:?}"))
            })
        };
        if let Some(refusal) = outside("account", &self.scope.account, &request.account)
            .or_else(|| outside("network", &self.scope.network, &request.network))
        {
            return Err(refusal);
        }
        if let Some(near) = &self.scope.near {
            if !request.location.is_some_and(|l| l.distance_km(&near.center) <= near.radius_km) {
                return Err(Refusal::new(
                    403,
                    format!(
                        "bootstrap token {id} enrolls only nodes that state a location within {} km of {},{}",
                        near.radius_km, near.center.latitude, near.center.longitude
                    ),
                ));
            }
        }
        if let Some(pattern) = &self.scope.node_pattern {
            if !matches_pattern(pattern, &request.node) {
                return Err(Refusal::new(
                    403,
                    format!("bootstrap token {id} enrolls only nodes named {pattern:?}, not {:?}", request.node),
                ));
            }
        }
        Ok(())
    }
}

/// Takes one use of `presented` to enroll the node `request` describes: reads its Secret,
/// checks it, and counts the use when the token is limited (so that two enrollments at
/// once cannot both take its last use). Returns the token as it was.
pub async fn consume(
    secrets: &Api<Secret>,
    presented: &BootstrapToken,
    request: &EnrollRequest,
) -> Result<Token, Refusal> {
    let unavailable = |e: kube::Error| Refusal::new(503, format!("cannot read bootstrap tokens now: {e}"));
    for _ in 0..8 {
        let Some(secret) = secrets.get_opt(&secret_name(&presented.id)).await.map_err(unavailable)? else {
            return Err(Refusal::new(401, format!("bootstrap token {} does not exist or was deleted", presented.id)));
        };
        let token = Token::from_secret(&secret).map_err(|e| Refusal::new(401, e))?;
        token.admits(presented, request, Timestamp::now())?;
        if token.limit.is_none() {
            return Ok(token);
        }
        let mut counted = secret.clone();
        let data = counted.data.get_or_insert_with(BTreeMap::new);
        data.insert("used".into(), k8s_openapi::ByteString((token.used + 1).to_string().into_bytes()));
        // The replace carries the resourceVersion read: a concurrent use makes it fail, and we read again.
        match secrets.replace(&secret_name(&presented.id), &PostParams::default(), &counted).await {
            Ok(_) => return Ok(token),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(unavailable(e)),
        }
    }
    Err(Refusal::new(503, format!("bootstrap token {} is being used by many nodes at once; try again", presented.id)))
}

/// Every token in the namespace `secrets` covers, with the Secrets that could not be read.
pub async fn list(secrets: &Api<Secret>) -> kube::Result<Vec<Result<Token, String>>> {
    let found = secrets.list(&ListParams::default().labels(&format!("{LABEL}=true"))).await?;
    Ok(found.items.iter().map(Token::from_secret).collect())
}

/// Creates the Secret of `token`.
pub async fn create(secrets: &Api<Secret>, token: &Token) -> kube::Result<()> {
    secrets.create(&PostParams::default(), &token.to_secret()).await.map(drop)
}

/// Deletes token `id`: it stops counting at once. `false` when there was no such token.
pub async fn delete(secrets: &Api<Secret>, id: &str) -> kube::Result<bool> {
    match secrets.delete(&secret_name(id), &DeleteParams::default()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(node: &str, account: &str, network: &str) -> EnrollRequest {
        EnrollRequest {
            node: node.into(),
            account: account.into(),
            network: network.into(),
            location: None,
            supernode_eligible: true,
            csr: String::new(),
        }
    }

    fn token() -> Token {
        Token::new("abc123.0123456789abcdef".parse().unwrap(), SignedDuration::from_hours(1))
    }

    /// A Secret as the API server returns it: what was written as stringData, as data.
    fn stored(token: &Token) -> Secret {
        let mut secret = token.to_secret();
        let data = secret.string_data.take().unwrap();
        secret.data = Some(data.into_iter().map(|(k, v)| (k, k8s_openapi::ByteString(v.into_bytes()))).collect());
        secret
    }

    #[test]
    fn tokens_round_trip_through_their_secret() {
        let mut t = token();
        t.limit = Some(3);
        t.used = 1;
        t.auto_approve = true;
        t.scope = Scope {
            account: Some("acme".into()),
            network: None,
            node_pattern: Some("pi-*".into()),
            near: Some("48.8566,2.3522,10".parse().unwrap()),
        };
        t.description = "kitchen devices".into();
        let back = Token::from_secret(&stored(&t)).unwrap();
        assert_eq!(back.token, t.token);
        assert_eq!(back.expires.as_second(), t.expires.as_second());
        assert_eq!((back.limit, back.used, back.auto_approve), (Some(3), 1, true));
        assert_eq!(back.scope, t.scope);
        assert_eq!(back.description, "kitchen devices");
        assert_eq!(t.to_secret().type_.as_deref(), Some(SECRET_TYPE));
    }

    #[test]
    fn a_token_admits_only_with_its_secret_in_time_within_its_uses_and_scope() {
        let presented: BootstrapToken = "abc123.0123456789abcdef".parse().unwrap();
        let wrong: BootstrapToken = "abc123.0123456789abcdee".parse().unwrap();
        let now = Timestamp::now();
        let mut t = token();
        assert_eq!(t.admits(&presented, &request("pi", "a", "n"), now), Ok(()));
        assert_eq!(t.admits(&wrong, &request("pi", "a", "n"), now).unwrap_err().status, 401);
        let later = now.saturating_add(SignedDuration::from_hours(2)).unwrap();
        assert!(t.admits(&presented, &request("pi", "a", "n"), later).unwrap_err().reason.contains("expired"));
        t.limit = Some(2);
        t.used = 2;
        assert!(t.admits(&presented, &request("pi", "a", "n"), now).unwrap_err().reason.contains("used up"));
        t.used = 1;
        t.scope = Scope {
            account: Some("acme".into()),
            network: Some("home".into()),
            node_pattern: Some("pi-*".into()),
            near: None,
        };
        assert_eq!(t.admits(&presented, &request("pi-1", "acme", "home"), now), Ok(()));
        for (node, account, network, says) in [
            ("pi-1", "other", "home", "account"),
            ("pi-1", "acme", "office", "network"),
            ("cam-1", "acme", "home", "named"),
        ] {
            let refusal = t.admits(&presented, &request(node, account, network), now).unwrap_err();
            assert_eq!(refusal.status, 403);
            assert!(refusal.reason.contains(says), "{refusal:?}");
        }
    }

    #[test]
    fn a_token_near_a_place_enrolls_only_nodes_there() {
        let presented: BootstrapToken = "abc123.0123456789abcdef".parse().unwrap();
        let mut t = token();
        t.scope.near = Some("48.8566,2.3522,30".parse().unwrap());
        let at = |latitude, longitude| EnrollRequest {
            location: Some(Location { latitude, longitude }),
            ..request("pi", "a", "n")
        };
        let now = Timestamp::now();
        assert_eq!(t.admits(&presented, &at(48.8049, 2.1204), now), Ok(()), "Versailles is within 30 km of Paris");
        let london = t.admits(&presented, &at(51.5074, -0.1278), now).unwrap_err();
        assert_eq!(london.status, 403);
        assert!(london.reason.contains("within 30 km"), "{london:?}");
        assert_eq!(t.admits(&presented, &request("pi", "a", "n"), now).unwrap_err().status, 403, "no location stated");
        for bad in ["48.8,2.3", "91,2,10", "48,2,-1", "a,b,c"] {
            assert!(bad.parse::<Near>().is_err(), "{bad}");
        }
    }

    #[test]
    fn patterns_match_with_stars() {
        for (pattern, name, expected) in [
            ("pi-*", "pi-1", true),
            ("pi-*", "pi-", true),
            ("pi-*", "cam-1", false),
            ("*-kitchen", "pi-kitchen", true),
            ("*-kitchen", "pi-kitchen-2", false),
            ("pi-*-k*", "pi-3-kitchen", true),
            ("pi-*-k*", "pi-3", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("*", "anything", true),
            ("a*a", "a", false),
        ] {
            assert_eq!(matches_pattern(pattern, name), expected, "{pattern} {name}");
        }
    }

    #[test]
    fn malformed_token_secrets_are_named() {
        let mut secret = stored(&token());
        secret.data.as_mut().unwrap().remove("expiration");
        assert!(Token::from_secret(&secret).unwrap_err().contains("expiration"));
    }
}
