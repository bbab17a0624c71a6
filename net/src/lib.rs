//! Who the client is when connections arrive through proxies or load balancers; shared by the
//! gateway (pingora) and the admin API (hyper/axum), which each feed it their own connection
//! data.
//!
//! The TCP peer of a connection is the client unless it is a proxy the operator trusts. A
//! trusted proxy tells the real client address either in the `X-Forwarded-For` request header
//! (HTTP proxies: nginx, AWS ALB) or in a PROXY protocol header in front of the byte stream (TCP
//! load balancers: HAProxy, AWS NLB). Anything a peer outside the trusted networks says about
//! the client is ignored: the header is trivially forged.
//!
//! Every function here is pure and does no I/O, so the same code serves both servers and is
//! tested (and can be fuzzed) on its own. All returned addresses are canonical: an IPv4-mapped
//! IPv6 address (`::ffff:a.b.c.d`) comes back as the IPv4 address, the form key allowlists,
//! throttles and usage records compare and store (PROXY headers' addresses are returned as
//! sent).
//!
//! # Layout
//! - [`trusted`]: [`TrustedProxies`], the operator's list of proxy networks (CIDRs), and
//!   [`NetError`], why an entry is refused.
//! - [`forwarded`]: [`client_from_forwarded_for`], the client address from the TCP peer and the
//!   `X-Forwarded-For` header (rightmost untrusted hop).
//! - [`proxy_header`]: a sans-IO parser of PROXY protocol v1 and v2 headers
//!   ([`proxy_header::parse`]); with feature `io`, `proxy_header::read` reads one from a tokio
//!   stream for both servers.
//! - [`tls`]: the other direction, our own clients' TLS: [`tls::ClientTls`], the `tls:` block
//!   (CA, client certificate) of Redis, ClickHouse, SMTP and the task engine, and its
//!   `native_tls` connector.
//! - [`server_tls`]: TLS on our listeners: [`server_tls::ServerTls`] (certificate and key
//!   files), loaded and checked into a [`server_tls::CertifiedKey`], the shared acceptor settings.
//! - `redis` (feature `redis`): `RedisTarget`, a Redis URL and its TLS block,
//!   connecting plain or over verified TLS.

pub mod forwarded;
pub mod proxy_header;
#[cfg(feature = "redis")]
pub mod redis;
pub mod server_tls;
pub mod tls;
pub mod trusted;

pub use forwarded::{client_from_forwarded_for, MAX_FORWARDED_HOPS};
pub use trusted::{NetError, TrustedProxies};
