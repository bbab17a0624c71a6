//! PROXY protocol version 2: a binary header after a 12-byte signature.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{starts_like, Parsed, ProxyError, V2_MAX_LEN, V2_SIGNATURE};

/// Signature, version/command, family/protocol, length.
const FIXED_LEN: usize = 16;
const LOCAL: u8 = 0x0;
const PROXY: u8 = 0x1;
const UNSPEC: u8 = 0x00;
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;
/// Two addresses and two ports.
const TCP4_LEN: usize = 2 * 4 + 2 * 2;
const TCP6_LEN: usize = 2 * 16 + 2 * 2;

/// `buf` starts with `\r`.
pub(super) fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    if !starts_like(buf, &V2_SIGNATURE) {
        return Err(ProxyError::NotProxy);
    }
    let Some(&ver_cmd) = buf.get(12) else {
        return Ok(incomplete(buf, FIXED_LEN));
    };
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::V2Version(ver_cmd >> 4));
    }
    let command = ver_cmd & 0x0f;
    if command != LOCAL && command != PROXY {
        return Err(ProxyError::V2Command(command));
    }
    let Some(&family) = buf.get(13) else {
        return Ok(incomplete(buf, FIXED_LEN));
    };
    // LOCAL ignores the family (and whatever address block there is).
    let address_len = match (command, family) {
        (LOCAL, _) | (_, UNSPEC) => 0,
        (_, TCP4) => TCP4_LEN,
        (_, TCP6) => TCP6_LEN,
        _ => return Err(ProxyError::V2Family(family)),
    };
    let Some(&[hi, lo]) = buf.get(14..FIXED_LEN) else {
        return Ok(incomplete(buf, FIXED_LEN));
    };
    let len = u16::from_be_bytes([hi, lo]);
    let total = FIXED_LEN + usize::from(len);
    if total > V2_MAX_LEN {
        return Err(ProxyError::V2TooLong(total));
    }
    if usize::from(len) < address_len {
        return Err(ProxyError::V2AddressLength { family, len });
    }
    let Some(block) = buf.get(FIXED_LEN..total) else {
        return Ok(incomplete(buf, total));
    };
    // TLVs, after the addresses, are skipped.
    let (source, destination) = match address_len {
        0 => (None, None),
        TCP4_LEN => {
            let ip = |at: usize| Ipv4Addr::from(array::<4>(block, at));
            let port = |at: usize| u16::from_be_bytes(array::<2>(block, at));
            (
                Some(SocketAddr::from((ip(0), port(8)))),
                Some(SocketAddr::from((ip(4), port(10)))),
            )
        }
        _ => {
            let ip = |at: usize| Ipv6Addr::from(array::<16>(block, at));
            let port = |at: usize| u16::from_be_bytes(array::<2>(block, at));
            (
                Some(SocketAddr::from((ip(0), port(32)))),
                Some(SocketAddr::from((ip(16), port(34)))),
            )
        }
    };
    Ok(Parsed::Complete {
        consumed: total,
        source,
        destination,
    })
}

fn incomplete(buf: &[u8], len: usize) -> Parsed {
    Parsed::Incomplete {
        needed: len - buf.len(),
    }
}

/// `N` bytes of `block` at `at`; the caller checked the block's length.
fn array<const N: usize>(block: &[u8], at: usize) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(&block[at..at + N]);
    out
}
