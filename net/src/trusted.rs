//! The operator's trusted proxies: the networks whose connections may say who the client is
//! (`X-Forwarded-For`, PROXY protocol). Owns the parsing and validation of the config entries
//! and the membership test; nothing else.
//!
//! An entry is a CIDR network (`10.0.0.0/8`, `2001:db8::/32`) or a single address (a /32 or
//! /128). Entries are strict, as a typo here decides whose word about client addresses is
//! believed: an address with host bits set after the prefix (`10.0.0.1/8`) is refused rather
//! than silently widened or narrowed, as are prefixes longer than the family allows and
//! anything that is not an address.
//!
//! IPv4 peers match IPv4 entries, including peers that a dual-stack socket reports as
//! IPv4-mapped IPv6 addresses (`::ffff:10.1.2.3`). An IPv4-mapped entry with a prefix of at
//! least 96 (`::ffff:10.0.0.0/104`) is read as the IPv4 network (`10.0.0.0/8`); other IPv6
//! entries match native IPv6 peers only, so `::/0` trusts every IPv6 peer and no IPv4 one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;

/// Why a trusted proxy entry is refused. Every variant names the entry as written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    #[error(
        "trusted proxy `{entry}` is not an IP address or a CIDR network \
         (like `10.0.0.0/8`, `2001:db8::/32` or `192.0.2.7`)"
    )]
    Invalid { entry: String },
    #[error("trusted proxy `{entry}`: the prefix length is longer than {max} bits")]
    PrefixTooLong { entry: String, max: u8 },
    #[error(
        "trusted proxy `{entry}` has host bits set after the prefix length; \
         write the network as `{network}` (or the address alone for a single host)"
    )]
    HostBits { entry: String, network: String },
}

/// A parsed list of trusted proxy networks. The default (and an empty config list) trusts
/// nobody: every TCP peer is the client.
///
/// Deserializes from a list of strings, refusing the whole list if one entry is bad. Two lists
/// are equal when they hold the same networks, in any order and with duplicates ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Vec<String>")]
pub struct TrustedProxies {
    v4: Box<[Ipv4Net]>,
    v6: Box<[Ipv6Net]>,
}

impl TrustedProxies {
    /// Parses config entries; the first bad one is the error.
    pub fn try_new<S: AsRef<str>>(entries: &[S]) -> Result<Self, NetError> {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for entry in entries {
            match parse_entry(entry.as_ref())? {
                IpNet::V4(n) => v4.push(n),
                IpNet::V6(n) => v6.push(n),
            }
        }
        v4.sort_unstable();
        v4.dedup();
        v6.sort_unstable();
        v6.dedup();
        Ok(TrustedProxies {
            v4: v4.into_boxed_slice(),
            v6: v6.into_boxed_slice(),
        })
    }

    /// Whether `ip` is in one of the networks (an IPv4-mapped address as its IPv4 address).
    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        match ip.to_canonical() {
            IpAddr::V4(a) => self.contains_v4(a),
            IpAddr::V6(a) => self.contains_v6(a),
        }
    }

    #[inline]
    fn contains_v4(&self, a: Ipv4Addr) -> bool {
        self.v4.iter().any(|n| n.contains(&a))
    }

    #[inline]
    fn contains_v6(&self, a: Ipv6Addr) -> bool {
        self.v6.iter().any(|n| n.contains(&a))
    }

    /// Whether the list trusts nobody.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// The networks, IPv4 first, each family sorted (for logs and config dumps).
    pub fn nets(&self) -> impl Iterator<Item = IpNet> + '_ {
        let v4 = self.v4.iter().map(|&n| IpNet::V4(n));
        v4.chain(self.v6.iter().map(|&n| IpNet::V6(n)))
    }
}

impl TryFrom<Vec<String>> for TrustedProxies {
    type Error = NetError;

    fn try_from(entries: Vec<String>) -> Result<Self, NetError> {
        TrustedProxies::try_new(&entries)
    }
}

/// One config entry: `addr` or `addr/prefix`, surrounding whitespace ignored.
fn parse_entry(entry: &str) -> Result<IpNet, NetError> {
    let invalid = || NetError::Invalid {
        entry: entry.to_owned(),
    };
    let s = entry.trim();
    let (addr, prefix) = match s.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (s, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| invalid())?;
    let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => parse_prefix(p).ok_or_else(invalid)?,
    };
    if prefix > max {
        return Err(NetError::PrefixTooLong {
            entry: entry.to_owned(),
            max,
        });
    }
    let net = IpNet::new(addr, prefix).map_err(|_| invalid())?;
    if net.trunc() != net {
        return Err(NetError::HostBits {
            entry: entry.to_owned(),
            network: net.trunc().to_string(),
        });
    }
    Ok(match net {
        IpNet::V6(n) if n.prefix_len() >= 96 => match n.network().to_ipv4_mapped() {
            Some(v4) => IpNet::V4(Ipv4Net::new(v4, n.prefix_len() - 96).map_err(|_| invalid())?),
            None => net,
        },
        _ => net,
    })
}

/// A prefix length: 1 to 3 decimal digits, no sign, no leading zero (but `0` itself).
fn parse_prefix(p: &str) -> Option<u8> {
    let b = p.as_bytes();
    let well_formed = (1..=3).contains(&b.len())
        && b.iter().all(u8::is_ascii_digit)
        && (b[0] != b'0' || b.len() == 1);
    if well_formed {
        p.parse().ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn trusted(entries: &[&str]) -> TrustedProxies {
        TrustedProxies::try_new(entries).unwrap()
    }

    #[test]
    fn networks_and_single_addresses() {
        let t = trusted(&["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "::1"]);
        assert!(!t.is_empty());
        for yes in [
            "10.0.0.0",
            "10.255.255.255",
            "192.0.2.7",
            "2001:db8::1",
            "::1",
        ] {
            assert!(t.contains(ip(yes)), "{yes}");
        }
        for no in [
            "11.0.0.0",
            "9.255.255.255",
            "192.0.2.8",
            "2001:db9::1",
            "::2",
        ] {
            assert!(!t.contains(ip(no)), "{no}");
        }
    }

    #[test]
    fn prefix_boundaries_are_exact() {
        // Every prefix length: the network's first and last addresses are in, the neighbours
        // just outside are not.
        let base = u32::from(Ipv4Addr::new(172, 16, 0, 0));
        for len in 12u8..=32 {
            let t = trusted(&[&format!("172.16.0.0/{len}")]);
            let size = 1u64 << (32 - len);
            let last = base + (size - 1) as u32;
            assert!(t.contains(IpAddr::V4(base.into())), "/{len}");
            assert!(t.contains(IpAddr::V4(last.into())), "/{len}");
            assert!(!t.contains(IpAddr::V4((base - 1).into())), "/{len}");
            assert!(!t.contains(IpAddr::V4((last + 1).into())), "/{len}");
        }
        let base = u128::from("fd00::".parse::<Ipv6Addr>().unwrap());
        for len in 8u8..=128 {
            let t = trusted(&[&format!("fd00::/{len}")]);
            let last = base + u128::MAX.checked_shr(len.into()).unwrap_or(0);
            assert!(t.contains(IpAddr::V6(base.into())), "/{len}");
            assert!(t.contains(IpAddr::V6(last.into())), "/{len}");
            assert!(!t.contains(IpAddr::V6((base - 1).into())), "/{len}");
            assert!(!t.contains(IpAddr::V6((last + 1).into())), "/{len}");
        }
    }

    #[test]
    fn zero_prefixes_cover_their_family_only() {
        let t = trusted(&["0.0.0.0/0"]);
        assert!(t.contains(ip("203.0.113.9")) && t.contains(ip("::ffff:203.0.113.9")));
        assert!(!t.contains(ip("2001:db8::1")));
        let t = trusted(&["::/0"]);
        assert!(t.contains(ip("2001:db8::1")) && t.contains(ip("::")));
        assert!(!t.contains(ip("203.0.113.9")) && !t.contains(ip("::ffff:203.0.113.9")));
    }

    #[test]
    fn ipv4_mapped_peers_match_ipv4_entries() {
        let t = trusted(&["10.0.0.0/8", "192.0.2.7"]);
        assert!(t.contains(ip("::ffff:10.1.2.3")));
        assert!(t.contains(ip("::ffff:192.0.2.7")));
        assert!(!t.contains(ip("::ffff:11.1.2.3")));
        // IPv4-compatible (deprecated `::a.b.c.d`) addresses are IPv6 addresses.
        assert!(!t.contains(ip("::10.1.2.3")));
    }

    #[test]
    fn ipv4_mapped_entries_become_ipv4_networks() {
        let t = trusted(&["::ffff:10.0.0.0/104", "::ffff:192.0.2.7"]);
        let nets: Vec<String> = t.nets().map(|n| n.to_string()).collect();
        assert_eq!(nets, ["10.0.0.0/8", "192.0.2.7/32"]);
        assert!(t.contains(ip("10.9.9.9")) && t.contains(ip("::ffff:10.9.9.9")));
        assert_eq!(trusted(&["::ffff:0.0.0.0/96"]), trusted(&["0.0.0.0/0"]));
    }

    #[test]
    fn bad_entries_are_refused_by_name() {
        let err = TrustedProxies::try_new(&["10.0.0.0/8", "10.0.0.1/8"]).unwrap_err();
        assert_eq!(
            err,
            NetError::HostBits {
                entry: "10.0.0.1/8".into(),
                network: "10.0.0.0/8".into()
            }
        );
        let msg = err.to_string();
        assert!(
            msg.contains("`10.0.0.1/8`") && msg.contains("`10.0.0.0/8`"),
            "{msg}"
        );
        assert!(matches!(
            TrustedProxies::try_new(&["2001:db8::1/32"]),
            Err(NetError::HostBits { network, .. }) if network == "2001:db8::/32"
        ));
        assert_eq!(
            TrustedProxies::try_new(&["10.0.0.0/33"]),
            Err(NetError::PrefixTooLong {
                entry: "10.0.0.0/33".into(),
                max: 32
            })
        );
        assert_eq!(
            TrustedProxies::try_new(&["::/129"]),
            Err(NetError::PrefixTooLong {
                entry: "::/129".into(),
                max: 128
            })
        );
        for bad in [
            "",
            " ",
            "localhost",
            "10.0.0.*",
            "10.0.0",
            "10.0.0.0/",
            "10.0.0.0/8/8",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "10.0.0.0/08",
            "10.0.0.0/ 8",
            "10.0.0.0/1000",
            "010.0.0.0/8",
            "[::1]",
            "[::1]/128",
            "10.0.0.1:80",
            "fe80::1%eth0",
            "::ffff:10.0.0.0/256",
        ] {
            let err = TrustedProxies::try_new(&[bad]).unwrap_err();
            assert_eq!(
                err,
                NetError::Invalid { entry: bad.into() },
                "{bad:?} gave {err}"
            );
            assert!(err.to_string().contains(&format!("`{bad}`")));
        }
    }

    #[test]
    fn empty_list_trusts_nobody() {
        let t = TrustedProxies::try_new::<String>(&[]).unwrap();
        assert!(t.is_empty() && t == TrustedProxies::default());
        assert!(!t.contains(ip("127.0.0.1")) && !t.contains(ip("::1")));
    }

    #[test]
    fn equality_ignores_order_and_duplicates_and_whitespace() {
        assert_eq!(
            trusted(&["10.0.0.0/8", "::1", " 192.0.2.7 ", "10.0.0.0/8"]),
            trusted(&["::1/128", "192.0.2.7/32", "10.0.0.0/8"])
        );
        assert_ne!(trusted(&["10.0.0.0/8"]), trusted(&["10.0.0.0/9"]));
    }

    #[test]
    fn takes_owned_strings_and_deserializes() {
        let owned = vec!["10.0.0.0/8".to_string()];
        assert_eq!(
            TrustedProxies::try_new(&owned),
            TrustedProxies::try_from(owned)
        );
        use serde::de::value::{Error, SeqDeserializer};
        let de = SeqDeserializer::<_, Error>::new(vec!["10.0.0.0/8", "::1"].into_iter());
        let t = TrustedProxies::deserialize(de).unwrap();
        assert_eq!(t, trusted(&["::1", "10.0.0.0/8"]));
        let de = SeqDeserializer::<_, Error>::new(vec!["10.0.0.1/8"].into_iter());
        let err = TrustedProxies::deserialize(de).unwrap_err().to_string();
        assert!(err.contains("`10.0.0.1/8`"), "{err}");
    }
}
