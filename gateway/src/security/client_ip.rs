//! Who the client of a request is, by IP address: the TCP peer, unless the peer is one of
//! `limits.trusted_proxies` — then the right-most `X-Forwarded-For` address that is not itself a
//! trusted proxy. Every per-IP limit and the logs use this address.
//!
//! Only `X-Forwarded-For` is read: a proxy appends its peer to it, while `Forwarded` is passed
//! through untouched by common proxies (nginx), so its last entry may be the client's own words.

use std::net::{IpAddr, Ipv6Addr};

use hyper::HeaderMap;

/// One `limits.trusted_proxies` entry: an address and the length of its prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    fn parse(text: &str) -> Result<Cidr, String> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR block"))?;
        let addr = canonical(addr);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// An IPv4 address mapped into IPv6 (`::ffff:a.b.c.d`, what a dual-stack socket reports) is
/// the IPv4 address.
pub(crate) fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The proxies whose `X-Forwarded-For` is believed (`limits.trusted_proxies`).
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    blocks: Vec<Cidr>,
}

impl TrustedProxies {
    /// Parses `limits.trusted_proxies`: addresses (`10.0.0.7`, `::1`) and CIDR blocks
    /// (`10.0.0.0/8`, `fd00::/8`).
    pub fn parse(entries: &[String]) -> Result<TrustedProxies, String> {
        let blocks = entries
            .iter()
            .map(|e| Cidr::parse(e))
            .collect::<Result<_, _>>()?;
        Ok(TrustedProxies { blocks })
    }

    /// Whether `ip` is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.blocks.iter().any(|b| b.contains(ip))
    }

    /// The client of a request that arrived from `peer`: walking `X-Forwarded-For` from the
    /// right, the first address that is not a trusted proxy. A peer that is not trusted is the
    /// client whatever the headers say; an entry that is not an address stops the walk at the
    /// proxy that wrote it.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = canonical(peer);
        if !self.contains(client) {
            return client;
        }
        let hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect::<Vec<_>>();
        for hop in hops.iter().rev() {
            if !self.contains(client) {
                break;
            }
            match parse_hop(hop) {
                Some(ip) => client = ip,
                None => break,
            }
        }
        client
    }
}

/// One `X-Forwarded-For` entry: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` or `[2001:db8::1]:80`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Some(rest) = hop.strip_prefix('[') {
        let (ip, _) = rest.split_once(']')?;
        return ip.parse::<Ipv6Addr>().ok().map(|ip| canonical(ip.into()));
    }
    let (ip, port) = hop.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    ip.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// Whether a request carries a header a proxy adds when it forwards (`X-Forwarded-For`,
/// `Forwarded`, `X-Real-IP`): the TCP peer is then not the client.
pub fn is_forwarded(headers: &HeaderMap) -> bool {
    ["x-forwarded-for", "forwarded", "x-real-ip"]
        .iter()
        .any(|name| headers.contains_key(*name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(list: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(&list.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_addresses_and_blocks_and_names_bad_entries() {
        let p = proxies(&["10.0.0.0/8", "192.168.1.7", "fd00::/8", "::ffff:172.16.0.1"]);
        assert!(p.contains(ip("10.200.3.4")));
        assert!(!p.contains(ip("11.0.0.1")));
        assert!(p.contains(ip("192.168.1.7")));
        assert!(!p.contains(ip("192.168.1.8")));
        assert!(p.contains(ip("fd12::1")));
        assert!(p.contains(ip("172.16.0.1")));
        assert!(
            p.contains(ip("::ffff:10.1.1.1")),
            "mapped IPv4 peers match IPv4 blocks"
        );
        assert!(proxies(&["0.0.0.0/0"]).contains(ip("8.8.8.8")));
        for bad in ["10.0.0.0/33", "::/129", "nginx", "10.0.0.0/x", ""] {
            let err = TrustedProxies::parse(&[bad.to_string()]).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn the_client_is_the_rightmost_untrusted_hop() {
        let p = proxies(&["10.0.0.0/8"]);
        let peer = ip("10.0.0.2");
        // Table: headers, expected client.
        let cases: &[(&[&str], &str)] = &[
            (&[], "10.0.0.2"),
            (&["203.0.113.9"], "203.0.113.9"),
            // The client may write anything left of the address the proxy appended.
            (&["1.1.1.1, 203.0.113.9"], "203.0.113.9"),
            (&["1.1.1.1, 203.0.113.9, 10.0.0.5"], "203.0.113.9"),
            (&["1.1.1.1", "203.0.113.9, 10.0.0.5"], "203.0.113.9"),
            (&["203.0.113.9:4711"], "203.0.113.9"),
            (&["[2001:db8::1]:443"], "2001:db8::1"),
            (&["2001:db8::1"], "2001:db8::1"),
            (&["::ffff:203.0.113.9"], "203.0.113.9"),
            // Garbage stops at the proxy that passed it on.
            (&["203.0.113.9, unknown"], "10.0.0.2"),
            (&["203.0.113.9, 10.0.0.5, garbage"], "10.0.0.2"),
        ];
        for (headers, expected) in cases {
            assert_eq!(
                p.client_ip(peer, &xff(headers)),
                ip(expected),
                "{headers:?}"
            );
        }
        // A peer that is not trusted is the client, whatever it claims.
        assert_eq!(
            p.client_ip(ip("198.51.100.1"), &xff(&["203.0.113.9"])),
            ip("198.51.100.1")
        );
        // No trusted proxies: headers are never read.
        assert_eq!(
            TrustedProxies::default().client_ip(peer, &xff(&["203.0.113.9"])),
            peer
        );
    }
}
