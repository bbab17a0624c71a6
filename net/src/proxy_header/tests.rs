//! The parser's rules, one by one, then deterministic fuzzing: random and mutated inputs must
//! never panic, and whatever parses must parse the same way from every prefix and with any
//! bytes after it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::*;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

const JUNK: [&[u8]; 6] = [
    b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
    b"\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
    b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c",
    b"\0",
];

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// Checks a valid header: whole it parses to these addresses; every shorter prefix is
/// `Incomplete` with a hint that does not read past the end; followed by other bytes it parses
/// the same, with `consumed` its own length.
fn check_valid(header: &[u8], source: Option<SocketAddr>, destination: Option<SocketAddr>) {
    let want = Parsed::Complete {
        consumed: header.len(),
        source,
        destination,
    };
    let shown = String::from_utf8_lossy(header);
    assert_eq!(parse(header), Ok(want), "{shown:?}");
    for k in 0..header.len() {
        match parse(&header[..k]) {
            Ok(Parsed::Incomplete { needed }) => {
                assert!(
                    needed >= 1 && k + needed <= header.len(),
                    "{shown:?}[..{k}]"
                );
            }
            other => panic!("{shown:?}[..{k}] gave {other:?}"),
        }
    }
    // A reader that reads exactly `needed` bytes each time lands on the header's end.
    let mut k = 0;
    while let Ok(Parsed::Incomplete { needed }) = parse(&header[..k]) {
        k += needed;
    }
    assert_eq!(k, header.len(), "{shown:?}");
    let mut rng = Rng(header.len() as u64 + 1);
    let random_junk: Vec<Vec<u8>> = (0..8).map(|i| rng.bytes(1 + i * 40)).collect();
    for junk in JUNK
        .iter()
        .copied()
        .chain(random_junk.iter().map(Vec::as_slice))
    {
        let mut buf = header.to_vec();
        buf.extend_from_slice(junk);
        assert_eq!(parse(&buf), Ok(want), "{shown:?} + {junk:?}");
    }
}

/// Checks an invalid header: it is refused, also with more bytes after it, and no prefix of it
/// is refused and then accepted again when longer.
fn check_invalid(header: &[u8]) -> ProxyError {
    let shown = String::from_utf8_lossy(header);
    let Err(err) = parse(header) else {
        panic!("{shown:?} was accepted: {:?}", parse(header));
    };
    let mut refused = false;
    for k in 0..=header.len() {
        match parse(&header[..k]) {
            Ok(Parsed::Incomplete { .. }) => assert!(!refused, "{shown:?}[..{k}]"),
            Ok(complete) => panic!("{shown:?}[..{k}] gave {complete:?}"),
            Err(_) => refused = true,
        }
    }
    for junk in JUNK {
        let mut buf = header.to_vec();
        buf.extend_from_slice(junk);
        assert!(parse(&buf).is_err(), "{shown:?} + {junk:?}");
    }
    err
}

#[test]
fn empty_and_foreign_input() {
    assert_eq!(parse(b""), Ok(Parsed::Incomplete { needed: MIN_LEN }));
    // Refused as soon as the first differing byte arrives.
    for (input, at) in [
        (&b"GET / HTTP/1.1\r\n"[..], 1),
        (b"POST / HTTP/1.1\r\n", 2),
        (b"PUT / HTTP/1.1\r\n", 2),
        (b"PROXY\r\n", 6),
        (b"\x16\x03\x01\x02\x00", 1),
        (b"\r\n\r\n\r\n", 5),
        (b"\r\n\r\n\0\r\nQUIT\r", 12),
        (b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n", 1),
    ] {
        assert_eq!(parse(&input[..at]), Err(ProxyError::NotProxy), "{input:?}");
        assert!(matches!(
            parse(&input[..at - 1]),
            Ok(Parsed::Incomplete { .. })
        ));
    }
}

#[test]
fn v1_valid() {
    let tcp4 = |s: &str, d: &str| (Some(sa(s)), Some(sa(d)));
    for (line, (source, destination)) in [
        (
            "PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n",
            tcp4("192.0.2.1:56324", "198.51.100.2:443"),
        ),
        (
            "PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n",
            tcp4("0.0.0.0:0", "0.0.0.0:0"),
        ),
        (
            "PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
            tcp4("255.255.255.255:65535", "255.255.255.255:65535"),
        ),
        (
            "PROXY TCP6 2001:db8::1 2001:DB8::A 56324 443\r\n",
            tcp4("[2001:db8::1]:56324", "[2001:db8::a]:443"),
        ),
        ("PROXY TCP6 :: :: 0 0\r\n", tcp4("[::]:0", "[::]:0")),
        // Returned as sent: IPv4-mapped stays IPv6.
        (
            "PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n",
            tcp4("[::ffff:192.0.2.1]:1", "[::1]:2"),
        ),
        (
            "PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
             ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
            tcp4(
                "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
                "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
            ),
        ),
        ("PROXY UNKNOWN\r\n", (None, None)),
        ("PROXY UNKNOWN 192.0.2.1 198.51.100.2 1 2\r\n", (None, None)),
        // The spec's worst case, exactly the limit.
        (
            "PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
             ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
            (None, None),
        ),
        // After UNKNOWN anything up to the line end is ignored.
        ("PROXY UNKNOWN whatever\r it\tsays \x01\r\n", (None, None)),
    ] {
        check_valid(line.as_bytes(), source, destination);
    }
    let longest = "PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
                   ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n";
    assert_eq!(longest.len(), V1_MAX_LEN);
}

#[test]
fn v1_invalid() {
    for line in [
        "PROXY TCP4  192.0.2.1 198.51.100.2 1 2\r\n",
        "PROXY TCP4 192.0.2.1  198.51.100.2 1 2\r\n",
        "PROXY TCP4 192.0.2.1 198.51.100.2 1 2 \r\n",
        "PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n",
        "PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n",
        "PROXY TCP4 192.0.2.1 198.51.100.2\r\n",
        "PROXY TCP4 \r\n",
        "PROXY TCP4\r\n",
        "PROXY TCP4 192.0.2.1 198.51.100.2 01 2\r\n",
        "PROXY TCP4 192.0.2.1 198.51.100.2 1 00\r\n",
        "PROXY TCP4 192.0.2.1 198.51.100.2 1 65536\r\n",
        "PROXY TCP4 192.0.2.1 198.51.100.2 1 100000\r\n",
        "PROXY TCP4 192.0.2.01 198.51.100.2 1 2\r\n",
        "PROXY TCP4 192.0.2 198.51.100.2 1 2\r\n",
        "PROXY TCP4 192.0.2.256 198.51.100.2 1 2\r\n",
        "PROXY TCP4 2001:db8::1 ::1 1 2\r\n",
        "PROXY TCP4 -1.0.0.0 1.0.0.0 1 2\r\n",
        "PROXY TCP6 192.0.2.1 198.51.100.2 1 2\r\n",
        "PROXY TCP6 2001:db8::g ::1 1 2\r\n",
        "PROXY TCP6 fe80::1%1 ::1 1 2\r\n",
        "PROXY TCP6 [::1] ::1 1 2\r\n",
        "PROXY TCP6 ::1 ::1 1 2 \r\n",
        "PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n",
        "PROXY TCP4 192.0.2.1 198.51.100.2 1 2\rX\n",
        "PROXY TCP4 192.0.2.1\t198.51.100.2 1 2\r\n",
        "PROXY TCP5 192.0.2.1 198.51.100.2 1 2\r\n",
        "PROXY tcp4 192.0.2.1 198.51.100.2 1 2\r\n",
        "PROXY  TCP4 192.0.2.1 198.51.100.2 1 2\r\n",
        "PROXY UNKNOWNX\r\n",
        "PROXY UNKNOWN\n",
        "PROXY UDP4 192.0.2.1 198.51.100.2 1 2\r\n",
        "PROXY \r\n",
    ] {
        let err = check_invalid(line.as_bytes());
        assert!(
            matches!(err, ProxyError::V1Syntax(_)),
            "{line:?} gave {err:?}"
        );
    }
    // Bytes that cannot belong to the fields are refused as they arrive.
    for (input, at) in [
        ("PROXY X", 7),
        ("PROXY TCP4 1.2.3.4:", 19),
        ("PROXY TCP6 ::g", 14),
        ("PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n", 31),
        ("PROXY TCP4 1.2.3.4 1.2.3.4 1 2\rX", 32),
        ("PROXY UNKNOWNX", 14),
    ] {
        assert!(parse(&input.as_bytes()[..at]).is_err(), "{input:?}");
        assert!(matches!(
            parse(&input.as_bytes()[..at - 1]),
            Ok(Parsed::Incomplete { .. })
        ));
    }
}

#[test]
fn v1_length_limit() {
    // No line end in the first 107 bytes.
    let mut line = b"PROXY UNKNOWN ".to_vec();
    line.resize(V1_MAX_LEN - 1, b'x');
    assert!(matches!(parse(&line), Ok(Parsed::Incomplete { needed: 1 })));
    line.push(b'\r');
    assert_eq!(parse(&line), Err(ProxyError::V1TooLong));
    line.push(b'\n');
    assert_eq!(check_invalid(&line), ProxyError::V1TooLong);
    let mut line = b"PROXY TCP6 ".to_vec();
    line.resize(V1_MAX_LEN, b'1');
    assert_eq!(check_invalid(&line), ProxyError::V1TooLong);
    // The hint stays small while the line may still end.
    let short = b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2";
    assert_eq!(parse(short), Ok(Parsed::Incomplete { needed: 2 }));
    assert_eq!(parse(b"PROXY TCP4 "), Ok(Parsed::Incomplete { needed: 21 }));
    assert_eq!(parse(b"PROXY TCP6 "), Ok(Parsed::Incomplete { needed: 11 }));
    assert_eq!(parse(b"PROXY "), Ok(Parsed::Incomplete { needed: 9 }));
}

#[test]
fn v1_random_addresses_round_trip() {
    let mut rng = Rng(7);
    for _ in 0..500 {
        let (s, d) = if rng.below(2) == 0 {
            let s = IpAddr::V4(Ipv4Addr::from(rng.next() as u32));
            (s, IpAddr::V4(Ipv4Addr::from(rng.next() as u32)))
        } else {
            // Some zero groups, so the `::` forms come up.
            let mut v6 = || {
                let mask = [0, u128::MAX, u128::MAX << 64, u128::MAX >> 64][rng.below(4)];
                let bits = (u128::from(rng.next()) << 64 | u128::from(rng.next())) & mask;
                IpAddr::V6(Ipv6Addr::from(bits))
            };
            (v6(), v6())
        };
        let (sport, dport) = (rng.next() as u16, rng.next() as u16);
        let proto = if s.is_ipv4() { "TCP4" } else { "TCP6" };
        let line = format!("PROXY {proto} {s} {d} {sport} {dport}\r\n");
        check_valid(
            line.as_bytes(),
            Some(SocketAddr::new(s, sport)),
            Some(SocketAddr::new(d, dport)),
        );
    }
}

fn v2(ver_cmd: u8, family: u8, block: &[u8]) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.extend_from_slice(&[ver_cmd, family]);
    out.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
    out.extend_from_slice(block);
    out
}

fn tcp4_block(s: SocketAddr, d: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (s, d) else {
        unreachable!()
    };
    let mut b = Vec::new();
    b.extend_from_slice(&s.ip().octets());
    b.extend_from_slice(&d.ip().octets());
    b.extend_from_slice(&s.port().to_be_bytes());
    b.extend_from_slice(&d.port().to_be_bytes());
    b
}

fn tcp6_block(s: SocketAddr, d: SocketAddr) -> Vec<u8> {
    let (SocketAddr::V6(s), SocketAddr::V6(d)) = (s, d) else {
        unreachable!()
    };
    let mut b = Vec::new();
    b.extend_from_slice(&s.ip().octets());
    b.extend_from_slice(&d.ip().octets());
    b.extend_from_slice(&s.port().to_be_bytes());
    b.extend_from_slice(&d.port().to_be_bytes());
    b
}

/// A NOOP TLV and an AWS VPC endpoint TLV, as an NLB sends them.
const TLVS: &[u8] = b"\x04\x00\x03\x00\x00\x00\xea\x00\x17\x01vpce-08d2bf15fefb22222";

fn valid_v2() -> Vec<(Vec<u8>, Option<SocketAddr>, Option<SocketAddr>)> {
    let (s4, d4) = (sa("192.0.2.1:56324"), sa("198.51.100.2:443"));
    let (s6, d6) = (sa("[2001:db8::1]:56324"), sa("[2001:db8::2]:443"));
    let with_tlvs = |mut b: Vec<u8>| {
        b.extend_from_slice(TLVS);
        b
    };
    vec![
        (v2(0x21, 0x11, &tcp4_block(s4, d4)), Some(s4), Some(d4)),
        (v2(0x21, 0x21, &tcp6_block(s6, d6)), Some(s6), Some(d6)),
        (
            v2(0x21, 0x11, &with_tlvs(tcp4_block(s4, d4))),
            Some(s4),
            Some(d4),
        ),
        (
            v2(0x21, 0x21, &with_tlvs(tcp6_block(s6, d6))),
            Some(s6),
            Some(d6),
        ),
        // LOCAL: no addresses, whatever the family says.
        (v2(0x20, 0x00, b""), None, None),
        (v2(0x20, 0x11, &tcp4_block(s4, d4)), None, None),
        (v2(0x20, 0x11, b""), None, None),
        (v2(0x20, 0x31, &[b'/'; 216]), None, None),
        (v2(0x20, 0x12, TLVS), None, None),
        // PROXY of an unspecified family: keep the peer.
        (v2(0x21, 0x00, b""), None, None),
        (v2(0x21, 0x00, TLVS), None, None),
        // The largest header accepted.
        (
            v2(0x21, 0x11, &{
                let mut b = tcp4_block(s4, d4);
                b.resize(V2_MAX_LEN - 16, 0);
                b
            }),
            Some(s4),
            Some(d4),
        ),
    ]
}

#[test]
fn v2_valid() {
    for (header, source, destination) in valid_v2() {
        check_valid(&header, source, destination);
    }
    // The hint is exact once the length is known.
    let header = v2(0x21, 0x11, &[0; 12]);
    assert_eq!(parse(&header[..3]), Ok(Parsed::Incomplete { needed: 13 }));
    assert_eq!(parse(&header[..16]), Ok(Parsed::Incomplete { needed: 12 }));
    assert_eq!(parse(&header[..27]), Ok(Parsed::Incomplete { needed: 1 }));
}

#[test]
fn v2_invalid() {
    let block = tcp4_block(sa("192.0.2.1:1"), sa("192.0.2.2:2"));
    let good = v2(0x21, 0x11, &block);
    // Any signature byte changed.
    for i in 0..12 {
        for flip in [0x01, 0x20, 0x80] {
            let mut bad = good.clone();
            bad[i] ^= flip;
            let err = check_invalid(&bad);
            assert!(
                matches!(err, ProxyError::NotProxy | ProxyError::V1Syntax(_)),
                "{i} {flip}: {err:?}"
            );
        }
    }
    for (ver_cmd, err) in [
        (0x11, ProxyError::V2Version(1)),
        (0x01, ProxyError::V2Version(0)),
        (0x31, ProxyError::V2Version(3)),
        (0xf1, ProxyError::V2Version(15)),
        (0x22, ProxyError::V2Command(2)),
        (0x2f, ProxyError::V2Command(15)),
    ] {
        let bad = v2(ver_cmd, 0x11, &block);
        assert_eq!(check_invalid(&bad), err);
        // Refused as soon as the byte arrives.
        assert_eq!(parse(&bad[..13]), Err(err));
    }
    // UDP, unix sockets, unknown families and protocols.
    for family in [
        0x12, 0x22, 0x30, 0x31, 0x32, 0x10, 0x20, 0x01, 0x02, 0x13, 0x41, 0xff,
    ] {
        let bad = v2(0x21, family, &[0; 216]);
        assert_eq!(check_invalid(&bad), ProxyError::V2Family(family));
        assert_eq!(parse(&bad[..14]), Err(ProxyError::V2Family(family)));
    }
    // Address blocks too short for the family.
    for (family, len) in [(0x11, 11), (0x11, 0), (0x21, 35), (0x21, 12)] {
        let bad = v2(0x21, family, &vec![0; len]);
        let err = ProxyError::V2AddressLength {
            family,
            len: len as u16,
        };
        assert_eq!(check_invalid(&bad), err);
        assert_eq!(parse(&bad[..16]), Err(err));
    }
    // Over the cap: refused from the length field alone.
    for len in [V2_MAX_LEN - 16 + 1, 0xffff] {
        let mut header = v2(0x21, 0x11, b"");
        header[14..16].copy_from_slice(&(len as u16).to_be_bytes());
        assert_eq!(check_invalid(&header), ProxyError::V2TooLong(16 + len));
    }
    // Whatever the command and family.
    for (ver_cmd, family) in [(0x20, 0x00), (0x20, 0x31), (0x21, 0x00)] {
        let mut header = v2(ver_cmd, family, b"");
        header[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
        assert_eq!(parse(&header), Err(ProxyError::V2TooLong(16 + 0xffff)));
    }
}

#[test]
fn header_then_application_bytes() {
    let http = b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n";
    let v1 = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n";
    let (v2_header, ..) = valid_v2().swap_remove(2);
    for header in [&v1[..], &v2_header] {
        let mut buf = header.to_vec();
        buf.extend_from_slice(http);
        let Ok(Parsed::Complete {
            consumed, source, ..
        }) = parse(&buf)
        else {
            panic!("{buf:?}");
        };
        assert_eq!(&buf[consumed..], http);
        assert_eq!(source, Some(sa("192.0.2.1:56324")));
    }
    // Two headers in a row: only the first is the header.
    let mut two = v1.to_vec();
    two.extend_from_slice(v1);
    assert!(matches!(parse(&two), Ok(Parsed::Complete { consumed, .. }) if consumed == v1.len()));
}

/// The invariants every input must keep: no panic, a positive hint, `consumed` within the
/// buffer, and a complete header parsed the same from its own bytes with every shorter prefix
/// incomplete.
fn check_any(buf: &[u8]) {
    match parse(buf) {
        Ok(Parsed::Incomplete { needed }) => assert!(needed >= 1, "{buf:?}"),
        Ok(complete @ Parsed::Complete { consumed, .. }) => {
            assert!((MIN_LEN..=buf.len()).contains(&consumed), "{buf:?}");
            assert_eq!(parse(&buf[..consumed]), Ok(complete), "{buf:?}");
            for k in 0..consumed {
                assert!(
                    matches!(parse(&buf[..k]), Ok(Parsed::Incomplete { .. })),
                    "{buf:?}[..{k}]"
                );
            }
        }
        Err(_) => {}
    }
}

#[test]
fn random_bytes_never_panic() {
    let starts: [&[u8]; 10] = [
        b"",
        b"P",
        b"PROXY ",
        b"PROXY TCP4 ",
        b"PROXY TCP6 ",
        b"PROXY UNKNOWN",
        &V2_SIGNATURE,
        b"\r\n\r\n\0\r\nQUIT\n\x21\x11",
        b"\r\n\r\n\0\r\nQUIT\n\x21\x21\x00",
        b"\r\n\r\n\0\r\nQUIT\n\x20",
    ];
    // Bytes that matter to the parser, so random inputs get past the first checks.
    let alphabet = b"0123456789abcdefABCDEF.: \r\n\x00\x0c\x11\x21\xffPROXYTCPUNKNOWN";
    let mut rng = Rng(0x5eed);
    for _ in 0..50_000 {
        let mut buf = starts[rng.below(starts.len())].to_vec();
        let len = rng.below(140);
        for _ in 0..len {
            let b = if rng.below(4) == 0 {
                rng.next() as u8
            } else {
                alphabet[rng.below(alphabet.len())]
            };
            buf.push(b);
        }
        check_any(&buf);
    }
}

#[test]
fn mutated_headers_never_panic() {
    let mut headers: Vec<Vec<u8>> = valid_v2().into_iter().map(|(h, ..)| h).collect();
    headers.retain(|h| h.len() < 200);
    for line in [
        &b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"[..],
        b"PROXY TCP6 2001:db8::1 ::ffff:192.0.2.1 56324 443\r\n",
        b"PROXY UNKNOWN\r\n",
    ] {
        headers.push(line.to_vec());
    }
    let values = [
        0x00, 0xff, b' ', b'\r', b'\n', b'0', b'9', b':', b'.', b'a', b'P',
    ];
    for header in &headers {
        let mut tail = header.clone();
        tail.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        for i in 0..header.len() {
            for &v in values.iter().chain([tail[i] ^ 1].iter()) {
                let mut b = tail.clone();
                b[i] = v;
                check_any(&b);
            }
            let mut removed = tail.clone();
            removed.remove(i);
            check_any(&removed);
            for v in [b' ', b'\r', b'0'] {
                let mut inserted = tail.clone();
                inserted.insert(i, v);
                check_any(&inserted);
            }
        }
    }
}
