//! PROXY protocol version 1: one text line, `PROXY TCP4|TCP6|UNKNOWN ...\r\n`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{starts_like, Parsed, ProxyError, MIN_LEN, V1_MAX_LEN};

const PREFIX: &[u8] = b"PROXY ";

#[derive(Clone, Copy)]
enum Protocol {
    Tcp4,
    Tcp6,
    Unknown,
}

impl Protocol {
    /// The shortest whole header of this protocol.
    fn min_len(self) -> usize {
        match self {
            Protocol::Tcp4 => b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n".len(),
            Protocol::Tcp6 => b"PROXY TCP6 :: :: 0 0\r\n".len(),
            Protocol::Unknown => MIN_LEN,
        }
    }

    /// Whether `b` may appear in the address and port fields.
    fn field_byte(self, b: u8) -> bool {
        match self {
            Protocol::Tcp4 => b.is_ascii_digit() || b == b'.' || b == b' ',
            Protocol::Tcp6 => b.is_ascii_hexdigit() || matches!(b, b':' | b'.' | b' '),
            Protocol::Unknown => true,
        }
    }
}

/// `buf` starts with `P`.
pub(super) fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if !starts_like(buf, PREFIX) {
        return Err(ProxyError::NotProxy);
    }
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let incomplete = |min_len: usize| {
        if buf.len() >= V1_MAX_LEN {
            Err(ProxyError::V1TooLong)
        } else {
            let needed = min_len.saturating_sub(buf.len()).max(1);
            Ok(Parsed::Incomplete { needed })
        }
    };
    let Some(after) = window.get(PREFIX.len()..) else {
        return incomplete(MIN_LEN);
    };
    let Some((protocol, fields)) = protocol(after)? else {
        return incomplete(MIN_LEN);
    };
    // Look for the line end, refusing bytes that cannot be part of the fields on the way.
    let mut end = None;
    for (i, &b) in fields.iter().enumerate() {
        if b == b'\r' {
            match fields.get(i + 1) {
                Some(b'\n') => {
                    end = Some(i);
                    break;
                }
                None => break,
                Some(_) if matches!(protocol, Protocol::Unknown) => {}
                Some(_) => return Err(ProxyError::V1Syntax("carriage return without line feed")),
            }
        } else if !protocol.field_byte(b) {
            return Err(ProxyError::V1Syntax(
                "unexpected byte in the address fields",
            ));
        }
    }
    let Some(end) = end else {
        return incomplete(protocol.min_len());
    };
    // `fields` runs to the end of `window`.
    let consumed = window.len() - fields.len() + end + 2;
    let (source, destination) = match protocol {
        Protocol::Unknown => (None, None),
        Protocol::Tcp4 | Protocol::Tcp6 => {
            let (s, d) = addresses(protocol, &fields[..end])?;
            (Some(s), Some(d))
        }
    };
    Ok(Parsed::Complete {
        consumed,
        source,
        destination,
    })
}

/// The protocol word after `PROXY `, and what follows it (the fields after its space, or for
/// `UNKNOWN` whatever follows), or `None` if more bytes are needed to tell.
fn protocol(after: &[u8]) -> Result<Option<(Protocol, &[u8])>, ProxyError> {
    let mut partial = false;
    for (word, protocol) in [
        (&b"TCP4 "[..], Protocol::Tcp4),
        (b"TCP6 ", Protocol::Tcp6),
        (b"UNKNOWN", Protocol::Unknown),
    ] {
        if !starts_like(after, word) {
            continue;
        }
        let Some(rest) = after.get(word.len()..) else {
            partial = true;
            continue;
        };
        if let Protocol::Unknown = protocol {
            // `UNKNOWN` ends with the line or a space.
            if !matches!(rest.first(), None | Some(b'\r' | b' ')) {
                break;
            }
        }
        return Ok(Some((protocol, rest)));
    }
    if partial {
        Ok(None)
    } else {
        Err(ProxyError::V1Syntax(
            "unknown protocol (only TCP4, TCP6, UNKNOWN)",
        ))
    }
}

/// `<src> <dst> <sport> <dport>`, strictly.
fn addresses(protocol: Protocol, line: &[u8]) -> Result<(SocketAddr, SocketAddr), ProxyError> {
    // Only ASCII got this far (field_byte).
    let line = std::str::from_utf8(line).map_err(|_| ProxyError::V1Syntax("not ASCII"))?;
    let mut fields = line.split(' ');
    // An empty field (two spaces, a trailing space) is no address or port below.
    let mut next = || fields.next();
    let (Some(src), Some(dst), Some(sport), Some(dport), None) =
        (next(), next(), next(), next(), next())
    else {
        return Err(ProxyError::V1Syntax(
            "expected `<src> <dst> <sport> <dport>` separated by single spaces",
        ));
    };
    let address = |s: &str| -> Option<IpAddr> {
        match protocol {
            Protocol::Tcp4 => s.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
            Protocol::Tcp6 | Protocol::Unknown => s.parse::<Ipv6Addr>().ok().map(IpAddr::V6),
        }
    };
    let src = address(src).ok_or(ProxyError::V1Syntax("bad source address"))?;
    let dst = address(dst).ok_or(ProxyError::V1Syntax("bad destination address"))?;
    let sport = port(sport).ok_or(ProxyError::V1Syntax("bad source port"))?;
    let dport = port(dport).ok_or(ProxyError::V1Syntax("bad destination port"))?;
    Ok((SocketAddr::new(src, sport), SocketAddr::new(dst, dport)))
}

/// `0` to `65535`, no leading zero.
fn port(s: &str) -> Option<u16> {
    let b = s.as_bytes();
    let well_formed = (1..=5).contains(&b.len())
        && b.iter().all(u8::is_ascii_digit)
        && (b[0] != b'0' || b.len() == 1);
    if well_formed {
        s.parse().ok()
    } else {
        None
    }
}
