//! The client address of an HTTP request from its TCP peer and its `X-Forwarded-For` header:
//! owns the header's parsing and the rule for which hop to believe.
//!
//! Each proxy appends the address it received the request from, so the header reads
//! `client, proxy1, proxy2` and the TCP peer is the last proxy. Only the hops added by proxies
//! we trust are reliable: everything to their left may have been sent by the client itself. So
//! the header is walked from the right, past trusted hops, and the first untrusted hop is the
//! client (nginx's `real_ip_recursive on`). A header is read only when the TCP peer itself is
//! trusted; from any other peer it is ignored.
//!
//! Details:
//! - Several header fields are one list, in order (RFC 9110 §5.3); elements are separated by
//!   commas, with optional whitespace around them; empty elements are skipped.
//! - A hop is an IPv4 address, optionally with `:port`, or an IPv6 address, plain or in brackets
//!   with an optional `:port` (`[2001:db8::1]:443`), as nginx, HAProxy and cloud load balancers
//!   write them.
//! - A hop that is not an address (`unknown`, an obfuscated identifier, garbage) stops the walk:
//!   nothing left of it can be attributed, and the nearest address known good (the last trusted
//!   hop, or the peer) is the client.
//! - If every hop is trusted, the leftmost one is the client.
//! - At most [`MAX_FORWARDED_HOPS`] elements are examined (empty ones included); a header that
//!   is longer and trusted all the way gives the last address examined. Only the last
//!   [`MAX_FORWARDED_HOPS`] header fields are kept, in a fixed array: no allocation.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::TrustedProxies;

/// How many `X-Forwarded-For` elements are examined at most, from the right. More trusted
/// proxies than this in a row is not a real deployment.
pub const MAX_FORWARDED_HOPS: usize = 64;

/// The longest hop accepted, in bytes: the longest form,
/// `[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255]:65535`, is 53.
const MAX_HOP_LEN: usize = 64;

/// The client address of a request that arrived from `peer` with these `X-Forwarded-For` field
/// values (all of them, in the order received). The result is canonical: an IPv4-mapped address
/// is returned as the IPv4 address. See the module documentation for the rules.
pub fn client_from_forwarded_for<'a>(
    peer: IpAddr,
    trusted: &TrustedProxies,
    values: impl IntoIterator<Item = &'a [u8]>,
) -> IpAddr {
    let peer = peer.to_canonical();
    if !trusted.contains(peer) {
        return peer;
    }
    // Every field holds at least one element, so fields before the last MAX are never reached.
    let mut last: [&[u8]; MAX_FORWARDED_HOPS] = [&[]; MAX_FORWARDED_HOPS];
    let mut count = 0usize;
    for value in values {
        last[count % MAX_FORWARDED_HOPS] = value;
        count += 1;
    }
    let mut client = peer;
    let mut examined = 0;
    for i in (count.saturating_sub(MAX_FORWARDED_HOPS)..count).rev() {
        for hop in last[i % MAX_FORWARDED_HOPS].rsplit(|&b| b == b',') {
            examined += 1;
            if examined > MAX_FORWARDED_HOPS {
                return client;
            }
            let hop = trim_ows(hop);
            if hop.is_empty() {
                continue;
            }
            match parse_hop(hop) {
                Some(ip) if trusted.contains(ip) => client = ip,
                Some(ip) => return ip,
                None => return client,
            }
        }
    }
    client
}

/// Strips spaces and tabs on both sides.
fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// One hop's address (canonical), or `None` if the hop is not one of the accepted forms.
fn parse_hop(hop: &[u8]) -> Option<IpAddr> {
    if hop.len() > MAX_HOP_LEN {
        return None;
    }
    let s = std::str::from_utf8(hop).ok()?;
    if let Some(rest) = s.strip_prefix('[') {
        let (addr, after) = rest.split_once(']')?;
        let addr: Ipv6Addr = addr.parse().ok()?;
        if !after.is_empty() && !is_port(after.strip_prefix(':')?) {
            return None;
        }
        return Some(IpAddr::V6(addr).to_canonical());
    }
    if let Ok(addr) = s.parse::<IpAddr>() {
        return Some(addr.to_canonical());
    }
    // An unbracketed colon after an IPv4 address can only be a port.
    let (addr, port) = s.split_once(':')?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    is_port(port).then_some(IpAddr::V4(addr))
}

/// 1 to 5 decimal digits, at most 65535.
fn is_port(s: &str) -> bool {
    (1..=5).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()) && s.parse::<u16>().is_ok()
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

    /// The client for a peer and header fields, with proxies `10.0.0.0/8` and `fd00::/8`.
    fn client(peer: &str, values: &[&str]) -> IpAddr {
        let t = trusted(&["10.0.0.0/8", "fd00::/8"]);
        client_from_forwarded_for(ip(peer), &t, values.iter().map(|v| v.as_bytes()))
    }

    #[test]
    fn untrusted_peer_headers_are_ignored() {
        assert_eq!(client("203.0.113.5", &["198.51.100.1"]), ip("203.0.113.5"));
        assert_eq!(client("203.0.113.5", &["10.0.0.1"]), ip("203.0.113.5"));
        assert_eq!(client("2001:db8::5", &["198.51.100.1"]), ip("2001:db8::5"));
        // Nobody is trusted by default.
        let none = TrustedProxies::default();
        let got = client_from_forwarded_for(ip("10.0.0.1"), &none, [&b"198.51.100.1"[..]]);
        assert_eq!(got, ip("10.0.0.1"));
    }

    #[test]
    fn rightmost_untrusted_hop_is_the_client() {
        assert_eq!(client("10.0.0.1", &["198.51.100.1"]), ip("198.51.100.1"));
        // A spoofed hop on the left of the real client is ignored.
        assert_eq!(
            client("10.0.0.1", &["1.1.1.1, 198.51.100.1, 10.0.0.2, 10.0.0.3"]),
            ip("198.51.100.1")
        );
        assert_eq!(
            client("fd00::1", &["2001:db8::1, fd00::2"]),
            ip("2001:db8::1")
        );
    }

    #[test]
    fn several_fields_are_one_list_in_order() {
        assert_eq!(
            client(
                "10.0.0.1",
                &["1.1.1.1, 198.51.100.1", "10.0.0.2", "10.0.0.3"]
            ),
            ip("198.51.100.1")
        );
        assert_eq!(
            client("10.0.0.1", &["198.51.100.1", "10.0.0.2, 198.51.100.2"]),
            ip("198.51.100.2")
        );
    }

    #[test]
    fn all_trusted_gives_the_leftmost() {
        assert_eq!(client("10.0.0.1", &["10.0.0.2, 10.0.0.3"]), ip("10.0.0.2"));
        assert_eq!(client("10.0.0.1", &["10.0.0.9", "fd00::9"]), ip("10.0.0.9"));
    }

    #[test]
    fn empty_or_missing_header_gives_the_peer() {
        assert_eq!(client("10.0.0.1", &[]), ip("10.0.0.1"));
        assert_eq!(client("10.0.0.1", &[""]), ip("10.0.0.1"));
        assert_eq!(client("10.0.0.1", &[" , ,\t"]), ip("10.0.0.1"));
        // Empty elements are skipped, not walls.
        assert_eq!(
            client("10.0.0.1", &["198.51.100.1,, ", ""]),
            ip("198.51.100.1")
        );
    }

    #[test]
    fn ipv4_mapped_addresses_are_ipv4() {
        // Peer and hops as IPv4-mapped IPv6 match IPv4 networks, and come back as IPv4.
        assert_eq!(
            client("::ffff:10.0.0.1", &["::ffff:198.51.100.1"]),
            ip("198.51.100.1")
        );
        assert_eq!(
            client("::ffff:10.0.0.1", &["[::ffff:10.0.0.2]"]),
            ip("10.0.0.2")
        );
        assert_eq!(
            client("::ffff:203.0.113.5", &["198.51.100.1"]),
            ip("203.0.113.5")
        );
        let none = TrustedProxies::default();
        let got = client_from_forwarded_for(ip("::ffff:203.0.113.5"), &none, []);
        assert_eq!(got, ip("203.0.113.5"));
    }

    #[test]
    fn hop_forms() {
        for (hop, want) in [
            ("198.51.100.1", "198.51.100.1"),
            ("198.51.100.1:443", "198.51.100.1"),
            ("198.51.100.1:0", "198.51.100.1"),
            ("198.51.100.1:65535", "198.51.100.1"),
            ("2001:db8::1", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("[2001:db8::1]:8080", "2001:db8::1"),
            ("::ffff:198.51.100.1", "198.51.100.1"),
            (
                "[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255]:65535",
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            ),
            ("\t 198.51.100.1 \t", "198.51.100.1"),
        ] {
            assert_eq!(client("10.0.0.1", &[hop]), ip(want), "{hop:?}");
        }
    }

    #[test]
    fn unparsable_hop_stops_the_walk() {
        for bad in [
            "unknown",
            "_hidden",
            "198.51.100.1:",
            "198.51.100.1:65536",
            "198.51.100.1:123456",
            "198.51.100.1:-1",
            "198.51.100.1:80:80",
            "198.51.100",
            "198.051.100.1",
            "[198.51.100.1]",
            "[2001:db8::1",
            "[2001:db8::1]:",
            "[2001:db8::1]80",
            "[2001:db8::1]:http",
            "2001:db8::1:80:80:80:80:80",
            "fe80::1%eth0",
            "198.51.100.1 198.51.100.2",
            "\u{e9}",
        ] {
            // The peer is the nearest good address.
            assert_eq!(client("10.0.0.1", &[bad]), ip("10.0.0.1"), "{bad:?}");
            // Or the nearest trusted hop; the spoofable left side is never reached.
            let header = format!("198.51.100.7, {bad}, 10.0.0.2, 10.0.0.3");
            assert_eq!(client("10.0.0.1", &[&header]), ip("10.0.0.2"), "{bad:?}");
        }
        let invalid_utf8: &[u8] = b"198.51.100.7, \xff, 10.0.0.2";
        let t = trusted(&["10.0.0.0/8"]);
        let got = client_from_forwarded_for(ip("10.0.0.1"), &t, [invalid_utf8]);
        assert_eq!(got, ip("10.0.0.2"));
        // An untrusted hop right of the bad one is still the client.
        assert_eq!(
            client("10.0.0.1", &["unknown, 198.51.100.1"]),
            ip("198.51.100.1")
        );
    }

    #[test]
    fn the_walk_is_bounded() {
        let trusted_hops: Vec<String> = (0..200)
            .map(|i| format!("10.0.{}.{}", i / 250, i % 250))
            .collect();
        // 200 trusted hops in one field, behind a client: the walk stops after 64 of them.
        let header = format!("198.51.100.1, {}", trusted_hops.join(", "));
        let limit_hop = &trusted_hops[200 - MAX_FORWARDED_HOPS];
        assert_eq!(client("10.9.9.9", &[&header]), ip(limit_hop));
        // The same hops as 200 fields.
        let mut fields: Vec<&str> = vec!["198.51.100.1"];
        fields.extend(trusted_hops.iter().map(String::as_str));
        assert_eq!(client("10.9.9.9", &fields), ip(limit_hop));
        // Exactly 64 hops: the client, leftmost, is still reached.
        let mut fields: Vec<&str> = vec!["198.51.100.1"];
        fields.extend(
            trusted_hops[..MAX_FORWARDED_HOPS - 1]
                .iter()
                .map(String::as_str),
        );
        assert_eq!(client("10.9.9.9", &fields), ip("198.51.100.1"));
        // Empty elements count towards the limit.
        let commas = format!("198.51.100.1{}", ",".repeat(100));
        assert_eq!(client("10.9.9.9", &[&commas]), ip("10.9.9.9"));
        let commas = format!("198.51.100.1{}", ",".repeat(MAX_FORWARDED_HOPS - 1));
        assert_eq!(client("10.9.9.9", &[&commas]), ip("198.51.100.1"));
        // Huge fields are fine (the rsplit only goes as far as the walk does).
        let huge = format!("{}198.51.100.1", "x,".repeat(100_000));
        assert_eq!(client("10.9.9.9", &[&huge]), ip("198.51.100.1"));
    }

    #[test]
    fn trim_and_port_helpers() {
        assert_eq!(trim_ows(b" \t a b \t "), b"a b");
        assert_eq!(trim_ows(b"   "), b"");
        assert!(is_port("0") && is_port("65535") && is_port("00080"));
        assert!(!is_port("") && !is_port("65536") && !is_port("+80") && !is_port("123456"));
    }
}
