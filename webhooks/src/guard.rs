//! The SSRF guard: which addresses a webhook may reach. Checked when a URL is registered (its
//! shape) and at every connection (every address its host resolves to, and the connection goes
//! to the address checked, so DNS rebinding cannot swap it afterwards). Redirects are never
//! followed.
//!
//! Refused unless an operator allows the range (`webhooks.allow_networks`): loopback,
//! private (RFC 1918, IPv6 unique local), link-local (and so the cloud metadata addresses
//! `169.254.169.254`, `fd00:ec2::254` is unique local), carrier-grade NAT (`100.64.0.0/10`),
//! multicast, unspecified, broadcast, "this network" (`0.0.0.0/8`), IETF protocol
//! assignments (`192.0.0.0/24`), benchmarking (`198.18.0.0/15`), documentation and reserved
//! (`240.0.0.0/4`) ranges; IPv4-mapped and -compatible IPv6 addresses, NAT64 (`64:ff9b::/96`)
//! and 6to4 (`2002::/16`) are judged by the IPv4 address inside.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// The address policy: everything public, plus the ranges an operator allows.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    pub allow: Vec<IpNet>,
}

impl AddressPolicy {
    pub fn new(allow: Vec<IpNet>) -> AddressPolicy {
        AddressPolicy { allow }
    }

    /// Whether a webhook may connect to `ip`.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.allow.iter().any(|n| n.contains(&ip)) || is_public(ip)
    }
}

/// Whether `ip` is a public unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => public_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => public_v4(v4),
            None => public_v6(v6),
        },
    }
}

fn public_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_unspecified()
        || ip.is_documentation()
        || o[0] == 0
        || (o[0] == 100 && (o[1] & 0xc0) == 64)
        || (o[0] == 192 && o[1] == 0 && o[2] == 0)
        || (o[0] == 198 && (o[1] & 0xfe) == 18)
        || o[0] >= 240)
}

fn public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // unique local
        || (s[0] & 0xffc0) == 0xfe80 // link-local
        || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
        || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
        || s[0] == 0x0100 && s[1..4] == [0, 0, 0]) // discard-only
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`),
/// NAT64 (`64:ff9b::a.b.c.d`) or 6to4 (`2002:AABB:CCDD::`) address.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail = || Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if s[0..5] == [0, 0, 0, 0, 0] && (s[5] == 0xffff || (s[5] == 0 && (s[6] != 0 || s[7] > 1))) {
        return Some(tail());
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        return Some(tail());
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    None
}

/// Why a URL cannot be a webhook endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("must be an absolute http(s) URL")]
    Shape,
    #[error("must use https")]
    NotHttps,
    #[error("must not contain credentials")]
    Credentials,
    #[error("points to a private, loopback or reserved address")]
    Address,
}

/// Checks a URL at registration: absolute, `https` (or `http` when `allow_http`), no
/// credentials, at most 2,048 bytes, and a literal IP address must be allowed. Host names are
/// checked when connecting.
pub fn check_url(url: &str, allow_http: bool, policy: &AddressPolicy) -> Result<(), UrlError> {
    if url.len() > 2048 {
        return Err(UrlError::Shape);
    }
    let uri: http::Uri = url.parse().map_err(|_| UrlError::Shape)?;
    match uri.scheme_str() {
        Some("https") => {}
        Some("http") if allow_http => {}
        Some("http") => return Err(UrlError::NotHttps),
        _ => return Err(UrlError::Shape),
    }
    let auth = uri.authority().ok_or(UrlError::Shape)?;
    if auth.as_str().contains('@') {
        return Err(UrlError::Credentials);
    }
    let host = auth.host();
    if host.is_empty() {
        return Err(UrlError::Shape);
    }
    if let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        if !policy.allows(ip) {
            return Err(UrlError::Address);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn public(s: &str) -> bool {
        is_public(s.parse().unwrap())
    }

    #[test]
    fn refused_ranges() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.0.1",
            "198.18.0.1",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd00:ec2::254",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::10.0.0.1",
            "2002:7f00:1::",
            "2001:db8::1",
        ] {
            assert!(!public(ip), "{ip} must be refused");
        }
        for ip in [
            "93.184.216.34",
            "8.8.8.8",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(public(ip), "{ip} is public");
        }
    }

    #[test]
    fn operators_allow_ranges() {
        let p = AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(p.allows("127.0.0.1".parse().unwrap()));
        assert!(!p.allows("10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn urls() {
        let p = AddressPolicy::default();
        assert_eq!(check_url("https://example.com/hook", false, &p), Ok(()));
        assert_eq!(
            check_url("http://example.com/hook", false, &p),
            Err(UrlError::NotHttps)
        );
        assert_eq!(check_url("http://example.com/hook", true, &p), Ok(()));
        assert_eq!(
            check_url("ftp://example.com", true, &p),
            Err(UrlError::Shape)
        );
        assert_eq!(check_url("/hook", true, &p), Err(UrlError::Shape));
        assert_eq!(
            check_url("https://u:p@example.com/", false, &p),
            Err(UrlError::Credentials)
        );
        assert_eq!(
            check_url("https://127.0.0.1/", false, &p),
            Err(UrlError::Address)
        );
        assert_eq!(
            check_url("https://[::ffff:127.0.0.1]/", false, &p),
            Err(UrlError::Address)
        );
        assert_eq!(
            check_url("https://169.254.169.254/latest", false, &p),
            Err(UrlError::Address)
        );
    }
}
