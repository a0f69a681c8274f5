//! Where an allowed request may actually go: names are resolved here (not
//! in the sandbox), and every address is checked after resolution, so a
//! name that is allowed by policy but points at the host's loopback, a
//! private network or a cloud metadata service does not get through
//! (DNS rebinding).

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The proxy's view of the network.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Network {
    /// Names resolved to fixed addresses before DNS is asked (like
    /// `/etc/hosts`, for the proxy only).
    pub hosts: BTreeMap<String, IpAddr>,
    /// Private networks the proxy may connect to (loopback, RFC 1918,
    /// unique-local IPv6 and the like are refused unless listed here).
    /// Link-local addresses (cloud metadata services) are refused always.
    pub allow_networks: Vec<IpNet>,
}

/// Why an address is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Link-local, unspecified, multicast or broadcast: never.
    Never(&'static str),
    /// Loopback or a private range: unless `allow_networks` lists it.
    Private(&'static str),
}

/// The class of `ip` that refuses it, if any.
pub fn classify(ip: IpAddr) -> Option<Refusal> {
    let ip = match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<Refusal> {
    let o = ip.octets();
    if ip.is_link_local() {
        return Some(Refusal::Never(
            "a link-local address (where cloud metadata services live)",
        ));
    }
    if ip.is_unspecified() || o[0] == 0 {
        return Some(Refusal::Never("an unspecified address"));
    }
    if ip.is_multicast() || ip.is_broadcast() || o[0] >= 240 {
        return Some(Refusal::Never("a multicast, broadcast or reserved address"));
    }
    if ip.is_loopback() {
        return Some(Refusal::Private("the host's loopback"));
    }
    if ip.is_private() {
        return Some(Refusal::Private("a private network"));
    }
    // Shared address space (carrier NAT) and benchmarking ranges.
    if (o[0] == 100 && (64..128).contains(&o[1])) || (o[0] == 198 && (o[1] == 18 || o[1] == 19)) {
        return Some(Refusal::Private("a private network"));
    }
    None
}

fn classify_v6(ip: Ipv6Addr) -> Option<Refusal> {
    let seg = ip.segments();
    if ip.is_unspecified() {
        return Some(Refusal::Never("an unspecified address"));
    }
    if ip.is_multicast() {
        return Some(Refusal::Never("a multicast address"));
    }
    if seg[0] & 0xffc0 == 0xfe80 {
        return Some(Refusal::Never(
            "a link-local address (where cloud metadata services live)",
        ));
    }
    if ip.is_loopback() {
        return Some(Refusal::Private("the host's loopback"));
    }
    if seg[0] & 0xfe00 == 0xfc00 {
        return Some(Refusal::Private("a private (unique-local) network"));
    }
    // IPv4-compatible and NAT64 forms could smuggle a private IPv4 address.
    if seg[..6] == [0; 6] || seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let v4 = Ipv4Addr::new(
            (seg[6] >> 8) as u8,
            seg[6] as u8,
            (seg[7] >> 8) as u8,
            seg[7] as u8,
        );
        return classify_v4(v4);
    }
    None
}

impl Network {
    /// Why the proxy must not connect to `ip`, or `None` when it may.
    pub fn refuse(&self, ip: IpAddr) -> Option<String> {
        match classify(ip)? {
            Refusal::Never(what) => Some(format!(
                "{ip} is {what}, which is never reachable from a sandbox"
            )),
            Refusal::Private(what) => {
                if self.allow_networks.iter().any(|n| n.contains(&ip)) {
                    None
                } else {
                    Some(format!(
                        "{ip} is {what}; the egress proxy connects there only when the server's `[egress] allow_networks` lists it"
                    ))
                }
            }
        }
    }

    /// The addresses to try for `host:port`, every one of them checked;
    /// an error says why there are none.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
        let name = host.trim_end_matches('.').to_ascii_lowercase();
        let found: Vec<SocketAddr> = if let Ok(ip) = name.parse::<IpAddr>() {
            vec![SocketAddr::new(ip, port)]
        } else if let Some(ip) = self.hosts.get(&name) {
            vec![SocketAddr::new(*ip, port)]
        } else if name == "localhost" || name.ends_with(".localhost") {
            vec![SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)]
        } else if name == "invalid" || name.ends_with(".invalid") {
            // RFC 6761: never sent to a resolver.
            return Err(format!(
                "{host} does not resolve: names under .invalid never do"
            ));
        } else {
            match tokio::net::lookup_host((name.as_str(), port)).await {
                Ok(addrs) => addrs.collect(),
                Err(e) => return Err(format!("{host} does not resolve: {e}")),
            }
        };
        if found.is_empty() {
            return Err(format!("{host} does not resolve to any address"));
        }
        // One refused address refuses the name: a name that points at both
        // a public and a private address is not one to trust.
        for addr in &found {
            if let Some(why) = self.refuse(addr.ip()) {
                return Err(why);
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn metadata_loopback_and_private_addresses_are_refused() {
        let net = Network::default();
        for never in [
            "169.254.169.254",
            "fe80::1",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
            "::ffff:169.254.169.254",
        ] {
            assert!(
                matches!(classify(ip(never)), Some(Refusal::Never(_))),
                "{never}"
            );
        }
        for private in [
            "127.0.0.1",
            "::1",
            "10.1.2.3",
            "172.18.0.2",
            "192.168.1.1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "::10.0.0.1",
            "64:ff9b::a00:1",
            "100.64.0.1",
        ] {
            assert!(
                matches!(classify(ip(private)), Some(Refusal::Private(_))),
                "{private}"
            );
            assert!(net.refuse(ip(private)).unwrap().contains("allow_networks"));
        }
        for public in ["93.184.216.34", "2606:2800:220:1::1", "1.1.1.1"] {
            assert_eq!(classify(ip(public)), None, "{public}");
        }
    }

    #[test]
    fn listed_networks_are_allowed_but_never_link_local() {
        let net = Network {
            hosts: BTreeMap::new(),
            allow_networks: vec![
                "172.18.0.0/16".parse().unwrap(),
                "169.254.0.0/16".parse().unwrap(),
            ],
        };
        assert_eq!(net.refuse(ip("172.18.0.2")), None);
        assert!(net.refuse(ip("172.19.0.2")).is_some());
        assert!(
            net.refuse(ip("169.254.169.254"))
                .unwrap()
                .contains("never reachable")
        );
    }

    #[tokio::test]
    async fn names_resolve_through_the_hosts_table_first_and_are_checked() {
        let net = Network {
            hosts: BTreeMap::from([
                ("allowed.test.invalid".to_owned(), ip("172.18.0.2")),
                ("metadata.test.invalid".to_owned(), ip("169.254.169.254")),
            ]),
            allow_networks: vec!["172.18.0.0/16".parse().unwrap()],
        };
        assert_eq!(
            net.resolve("Allowed.Test.Invalid.", 80).await.unwrap(),
            vec!["172.18.0.2:80".parse().unwrap()]
        );
        assert!(
            net.resolve("metadata.test.invalid", 80)
                .await
                .unwrap_err()
                .contains("link-local")
        );
        assert!(
            net.resolve("127.0.0.1", 7777)
                .await
                .unwrap_err()
                .contains("loopback")
        );
        assert!(
            net.resolve("nothing.test.invalid", 80)
                .await
                .unwrap_err()
                .contains("does not resolve")
        );
    }
}
