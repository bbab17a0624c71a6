//! A sans-IO parser of the PROXY protocol header (HAProxy's spec, versions 1 and 2) that TCP
//! load balancers put in front of a connection's bytes to tell the client's address. Owns the
//! wire format only: the caller reads bytes (pingora's stream in the gateway, a tokio socket in
//! the admin API), decides whether the peer may send a header at all (a trusted proxy), and
//! enforces a deadline.
//!
//! [`parse`] takes everything received so far and says either how many more bytes are needed
//! at least, or where the header ends and what it says. Bytes after the header are the
//! application's (HTTP, TLS): [`Parsed::Complete::consumed`] tells how many to drop. The
//! [`Parsed::Incomplete::needed`] hint never overshoots: reading exactly that many more bytes
//! never reads past the end of a valid header, so a caller that cannot push bytes back can loop
//! on `read_exact(needed)`. (For v1 the hint drops to 1 once the shortest header of the given
//! protocol has been read, as the line end is found only by looking.)
//!
//! Version 1 (text), strict:
//! - `PROXY TCP4 <src> <dst> <sport> <dport>\r\n` (or `TCP6`), single spaces, addresses of the
//!   family named (dotted quad without leading zeros for `TCP4`, any IPv6 text form for
//!   `TCP6`), ports `0` to `65535` without leading zeros;
//! - `PROXY UNKNOWN` followed by anything up to `\r\n` (which the spec says to ignore):
//!   [`Parsed::Complete`] without addresses, meaning "keep the peer's address";
//! - at most [`V1_MAX_LEN`] bytes including the `\r\n`. Bytes that cannot belong to a valid
//!   header are refused as soon as they arrive, not when the line ends.
//!
//! Version 2 (binary):
//! - the 12-byte [`V2_SIGNATURE`], the version/command byte (`0x21` PROXY, `0x20` LOCAL), the
//!   family/protocol byte, a big-endian `u16` length of what follows;
//! - LOCAL (health checks from the proxy itself): no addresses, whatever the family; keep the
//!   peer's address;
//! - PROXY with `0x11` (TCP over IPv4) or `0x21` (TCP over IPv6): the addresses and ports; with
//!   `0x00` (UNSPEC): no addresses, keep the peer's. UDP (`0x12`, `0x22`) and unix sockets
//!   (`0x3x`) are refused: nothing here listens on them, and a unix path is no client address;
//! - TLVs after the addresses (AWS VPC endpoint ids, TLS details, NOOP padding) are skipped
//!   unread;
//! - the whole header is at most [`V2_MAX_LEN`] bytes (the format allows 16 + 65535); a longer
//!   one is refused as soon as its length field arrives.
//!
//! Addresses are returned as sent (an IPv4-mapped `TCP6` address stays IPv6); canonicalize them
//! before comparing.

#[cfg(feature = "io")]
pub mod read;
mod v1;
mod v2;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;

/// The longest version 1 header, `\r\n` included (the spec's limit).
pub const V1_MAX_LEN: usize = 107;
/// The longest version 2 header accepted, the 16 fixed bytes included. Addresses take at most
/// 216 bytes (unix), the TLVs of AWS and HAProxy a few hundred.
pub const V2_MAX_LEN: usize = 4096;
/// The first 12 bytes of every version 2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The shortest header of either version (`PROXY UNKNOWN\r\n`; a v2 header is at least 16).
pub const MIN_LEN: usize = 15;

/// What the bytes received so far hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A valid header so far, not yet whole.
    Incomplete {
        /// At least this many more bytes are needed (≥ 1); reading exactly this many never
        /// reads past the end of the header.
        needed: usize,
    },
    /// A whole header.
    Complete {
        /// The header's length: the application's bytes start here.
        consumed: usize,
        /// The client's address, or `None` to keep the TCP peer's (v1 `UNKNOWN`, v2 `LOCAL`
        /// or `UNSPEC`).
        source: Option<SocketAddr>,
        /// The address the client connected to, under the same rule.
        destination: Option<SocketAddr>,
    },
}

/// Why the bytes are not a PROXY protocol header. The connection should be closed: there is no
/// resynchronising a byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("the connection does not start with a PROXY protocol header")]
    NotProxy,
    #[error("malformed PROXY v1 header: {0}")]
    V1Syntax(&'static str),
    #[error("PROXY v1 header without `\\r\\n` in its first {V1_MAX_LEN} bytes")]
    V1TooLong,
    #[error("unsupported PROXY v2 version {0} (only 2)")]
    V2Version(u8),
    #[error("unknown PROXY v2 command {0:#x} (only 0 LOCAL and 1 PROXY)")]
    V2Command(u8),
    #[error(
        "unsupported PROXY v2 address family/protocol {0:#04x} \
         (only 0x11 TCP over IPv4, 0x21 TCP over IPv6, 0x00 unspecified)"
    )]
    V2Family(u8),
    #[error("PROXY v2 header of {0} bytes (the limit is {V2_MAX_LEN})")]
    V2TooLong(usize),
    #[error("PROXY v2 address block of {len} bytes is too short for family {family:#04x}")]
    V2AddressLength { family: u8, len: u16 },
}

/// Parses the PROXY header at the start of `buf` (everything received so far). Pure: call again
/// with more bytes after [`Parsed::Incomplete`]. See the module documentation for the rules.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyError> {
    match buf.first() {
        None => Ok(Parsed::Incomplete { needed: MIN_LEN }),
        Some(b'P') => v1::parse(buf),
        Some(b'\r') => v2::parse(buf),
        Some(_) => Err(ProxyError::NotProxy),
    }
}

/// Whether `buf` matches the start of `expected` (as far as either goes).
fn starts_like(buf: &[u8], expected: &[u8]) -> bool {
    let n = buf.len().min(expected.len());
    buf[..n] == expected[..n]
}
