//! Who the client is when dinghook runs behind reverse proxies.
//!
//! The TCP peer is the only address nobody can forge. `X-Forwarded-For` is a list that every
//! proxy appends its own peer to, so its right end was written by the proxy nearest to us and
//! its left end by whoever sent the request first — possibly the client itself, lying. The
//! header is therefore read only when the peer is a configured trusted proxy, and then from the
//! right: trusted hops are skipped, and the first address that is not a trusted proxy is the
//! client. Anything to its left was written by that untrusted client and is ignored.
//!
//! Used for logging only: nothing is allowed or refused by these addresses.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// A `trusted_proxies` entry that is neither an address nor a CIDR range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{entry:?} is not an address or a CIDR range like 10.0.0.0/8 or fd00::/8")]
pub struct CidrError {
    pub entry: String,
}

/// The address ranges whose `X-Forwarded-For` is believed. Empty (the default): nobody's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

impl TrustedProxies {
    /// Parses CIDR ranges (`10.0.0.0/8`, `fd00::/8`) or single addresses (`127.0.0.1`, `::1`,
    /// meaning `/32` and `/128`). A range with host bits set (`10.1.2.3/8`) means its network.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, CidrError> {
        let nets = entries
            .iter()
            .map(|entry| {
                let text = entry.as_ref().trim();
                text.parse::<IpNet>()
                    .map(|net| net.trunc())
                    .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| CidrError {
                        entry: entry.as_ref().to_owned(),
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(TrustedProxies { nets })
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// True when `ip` is in a trusted range. An IPv4 peer seen on a dual-stack socket
    /// (`::ffff:10.0.0.5`) counts as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|net| net.contains(&ip))
    }

    /// The client's address for a request from `peer` carrying the given `X-Forwarded-For`
    /// header values (several header lines count as one comma-joined list, in order).
    ///
    /// The peer itself, unless it is trusted; then the rightmost forwarded address that is
    /// not trusted. When every forwarded address is trusted, the leftmost (the farthest hop
    /// known). When the header is absent, or an entry where an address should be is not one,
    /// the peer: a garbled header is no evidence of anything.
    pub fn client_addr<'a>(
        &self,
        peer: IpAddr,
        forwarded_for: impl IntoIterator<Item = &'a str>,
    ) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.contains(peer) {
            return peer;
        }
        let entries: Vec<&str> = forwarded_for
            .into_iter()
            .flat_map(|value| value.split(','))
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .collect();
        let mut farthest_trusted = None;
        for entry in entries.iter().rev() {
            let Some(ip) = parse_entry(entry) else {
                return peer;
            };
            if !self.contains(ip) {
                return ip;
            }
            farthest_trusted = Some(ip);
        }
        farthest_trusted.unwrap_or(peer)
    }
}

/// One `X-Forwarded-For` entry: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`, `[2001:db8::1]` or
/// `[2001:db8::1]:443` (some proxies add the port). Anything else (`unknown`, obfuscated
/// identifiers, garbage) is `None`.
pub fn parse_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(addr) = entry.parse::<SocketAddr>() {
        return Some(addr.ip().to_canonical());
    }
    entry
        .strip_prefix('[')
        .and_then(|rest| rest.strip_suffix(']'))
        .and_then(|inner| inner.parse::<std::net::Ipv6Addr>().ok())
        .map(|ip| IpAddr::V6(ip).to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn trusted(entries: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(entries).unwrap()
    }

    #[test]
    fn ranges_and_single_addresses_parse_for_both_families() {
        let t = trusted(&[
            "127.0.0.1/32",
            "10.0.0.0/8",
            " 192.168.1.7 ",
            "fd00::/8",
            "::1",
        ]);
        assert!(t.contains(ip("127.0.0.1")));
        assert!(!t.contains(ip("127.0.0.2")));
        assert!(t.contains(ip("10.255.0.3")));
        assert!(!t.contains(ip("11.0.0.1")));
        assert!(t.contains(ip("192.168.1.7")));
        assert!(!t.contains(ip("192.168.1.8")));
        assert!(t.contains(ip("fd12:3456::1")));
        assert!(!t.contains(ip("fe80::1")));
        assert!(t.contains(ip("::1")));
        assert!(!t.contains(ip("::2")));
        // An IPv4 peer on a dual-stack socket.
        assert!(t.contains(ip("::ffff:10.1.2.3")));
        // Host bits set: the network is meant.
        assert!(trusted(&["10.1.2.3/8"]).contains(ip("10.9.9.9")));
        assert!(trusted(&["0.0.0.0/0"]).contains(ip("203.0.113.1")));
        assert!(!trusted(&["0.0.0.0/0"]).contains(ip("2001:db8::1")));
    }

    #[test]
    fn bad_entries_are_named() {
        for bad in [
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0/8",
            "localhost",
            "",
            "10.0.0.0/",
            "/8",
        ] {
            let err = TrustedProxies::parse(&["10.0.0.0/8", bad]).unwrap_err();
            assert_eq!(err.entry, bad);
            assert!(err.to_string().contains("CIDR"), "{err}");
        }
        assert!(TrustedProxies::parse::<&str>(&[]).unwrap().is_empty());
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(
            t.client_addr(ip("203.0.113.9"), ["198.51.100.1"]),
            ip("203.0.113.9")
        );
        // No trusted proxies at all (the default): the peer, always.
        assert_eq!(
            TrustedProxies::default().client_addr(ip("10.0.0.1"), ["198.51.100.1"]),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn the_walk_goes_right_to_left_past_trusted_hops() {
        let t = trusted(&["127.0.0.1/32", "10.0.0.0/8"]);
        let peer = ip("127.0.0.1");
        // nginx appended its own peer, a trusted load balancer.
        assert_eq!(
            t.client_addr(peer, ["203.0.113.7, 10.0.0.2"]),
            ip("203.0.113.7")
        );
        // A forged left part stops at the first untrusted address from the right.
        assert_eq!(
            t.client_addr(peer, ["1.1.1.1, 203.0.113.7, 10.0.0.2"]),
            ip("203.0.113.7")
        );
        // Header lines are one list, in order.
        assert_eq!(
            t.client_addr(peer, ["1.1.1.1", "203.0.113.7,10.0.0.2 , 10.0.0.3"]),
            ip("203.0.113.7")
        );
        // Every hop trusted: the farthest one known.
        assert_eq!(t.client_addr(peer, ["10.0.0.9, 10.0.0.2"]), ip("10.0.0.9"));
        // Ports and brackets as some proxies write them; IPv6 clients.
        assert_eq!(
            t.client_addr(peer, ["[2001:db8::7]:4711, 10.0.0.2:80"]),
            ip("2001:db8::7")
        );
        assert_eq!(t.client_addr(peer, ["2001:db8::8"]), ip("2001:db8::8"));
        assert_eq!(t.client_addr(peer, ["[2001:db8::9]"]), ip("2001:db8::9"));
        assert_eq!(t.client_addr(peer, ["203.0.113.5:1234"]), ip("203.0.113.5"));
        // A trusted IPv6 proxy forwarding an IPv4 client, mapped or not.
        let v6 = trusted(&["fd00::/8"]);
        assert_eq!(
            v6.client_addr(ip("fd00::1"), ["::ffff:203.0.113.4"]),
            ip("203.0.113.4")
        );
    }

    #[test]
    fn a_missing_or_garbled_header_leaves_the_peer() {
        let t = trusted(&["127.0.0.1/32", "10.0.0.0/8"]);
        let peer = ip("127.0.0.1");
        assert_eq!(t.client_addr(peer, []), peer);
        assert_eq!(t.client_addr(peer, [""]), peer);
        assert_eq!(t.client_addr(peer, [" , ,"]), peer);
        for garbage in [
            "unknown",
            "not an address",
            "203.0.113.7 10.0.0.2",
            "300.1.2.3",
            "[203.0.113.7]",
            "_hidden, 10.0.0.2",
            "2001:db8::1:80:80:80:80:80:80",
        ] {
            assert_eq!(t.client_addr(peer, [garbage]), peer, "{garbage:?}");
        }
        // Garbage left of the client address is never reached.
        assert_eq!(
            t.client_addr(peer, ["garbage, 203.0.113.7, 10.0.0.2"]),
            ip("203.0.113.7")
        );
    }

    #[test]
    fn entries_parse_with_and_without_ports() {
        assert_eq!(parse_entry("1.2.3.4"), Some(ip("1.2.3.4")));
        assert_eq!(parse_entry(" 1.2.3.4:80 "), Some(ip("1.2.3.4")));
        assert_eq!(parse_entry("::1"), Some(ip("::1")));
        assert_eq!(parse_entry("[::1]"), Some(ip("::1")));
        assert_eq!(parse_entry("[::1]:8080"), Some(ip("::1")));
        assert_eq!(parse_entry("::ffff:1.2.3.4"), Some(ip("1.2.3.4")));
        assert_eq!(parse_entry("1.2.3.4:"), None);
        assert_eq!(parse_entry("[1.2.3.4]"), None);
        assert_eq!(parse_entry("[::1"), None);
        assert_eq!(parse_entry("1.2.3.4:99999"), None);
    }
}
