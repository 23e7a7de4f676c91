//! Names both sides check the same way: node names, addresses and CA fingerprints.

/// Longest DNS-1123 subdomain, as Kubernetes allows for object names.
pub const MAX_NAME_LEN: usize = 253;

/// Whether `name` is a DNS-1123 subdomain (lower-case alphanumeric labels with
/// inner '-', joined by '.', at most 253 bytes), as Kubernetes requires of the
/// names of cluster-scoped objects such as EdgeNodes.
pub fn is_dns1123_subdomain(name: &str) -> bool {
    let label_ok = |label: &str| {
        let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        let bytes = label.as_bytes();
        bytes.first().is_some_and(alnum)
            && bytes.last().is_some_and(alnum)
            && bytes.iter().all(|c| alnum(c) || *c == b'-')
    };
    !name.is_empty() && name.len() <= MAX_NAME_LEN && name.split('.').all(label_ok)
}

/// The host of a `host:port` address (`[v6]:port` and `[v6]` give `v6`), or `None` when
/// `address` is not one (a bare name, a bare IPv6 address, an empty host or port).
pub fn host_of(address: &str) -> Option<&str> {
    let (host, port) = match address.strip_prefix('[') {
        Some(rest) => {
            let (host, after) = rest.split_once(']')?;
            match after {
                "" => return (!host.is_empty()).then_some(host),
                after => (host, after.strip_prefix(':')?),
            }
        }
        None => address.rsplit_once(':').filter(|(host, _)| !host.contains(':'))?,
    };
    (!host.is_empty() && !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())).then_some(host)
}

/// Lower-case hex SHA-256 of a DER certificate: how a join token pins the cloud's CA.
pub fn ca_fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_of_an_address_is_found_only_in_host_port() {
        assert_eq!(host_of("10.0.0.7:10360"), Some("10.0.0.7"));
        assert_eq!(host_of("[fe80::1]:10360"), Some("fe80::1"));
        assert_eq!(host_of("[fe80::1]"), Some("fe80::1"));
        assert_eq!(host_of("pi.local:1"), Some("pi.local"));
        for other in ["fe80::1", "pi.local", ":10360", "pi:", "pi:x", "[]:1", "[fe80::1]x"] {
            assert_eq!(host_of(other), None, "{other}");
        }
    }

    #[test]
    fn node_names_are_dns_1123_subdomains() {
        for good in ["pi-kitchen", "a", "node.lan-1", "0n", &"a".repeat(253)] {
            assert!(is_dns1123_subdomain(good), "{good:?}");
        }
        for bad in ["", "Pi", "-a", "a-", "a..b", ".a", "a_b", "a b", "ä", &"a".repeat(254)] {
            assert!(!is_dns1123_subdomain(bad), "{bad:?}");
        }
    }

    #[test]
    fn ca_fingerprints_are_sha256_hex() {
        let hash = ca_fingerprint(b"certificate");
        assert_eq!(hash.len(), 64);
        assert_ne!(hash, ca_fingerprint(b"another"));
    }
}
