//! `server.listen` items: an address (`"0.0.0.0:8080"`), or an address with TLS (HTTP/2 and
//! HTTP/1.1 by ALPN) and the proxies trusted to name the client in front of it.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use aihub_net::server_tls::ServerTls;
use aihub_net::TrustedProxies;
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// One proxy listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    /// `IP:PORT`.
    pub addr: String,
    /// HTTPS with these files (read again on SIGHUP). Default: plain HTTP/1.1.
    pub tls: Option<ServerTls>,
    /// With `tls`: offer HTTP/2 (ALPN `h2`, then `http/1.1`). Default true.
    pub http2: bool,
    /// Networks of the load balancers and proxies in front (CIDRs or addresses): only from
    /// them is `X-Forwarded-For` believed (its rightmost untrusted hop is the client, for IP
    /// allowlists and usage records). Default: none (the TCP peer is the client).
    pub trusted_proxies: TrustedProxies,
    /// Every connection starts with a PROXY protocol v1/v2 header naming the client (HAProxy,
    /// AWS NLB), read before TLS; a connection from outside `trusted_proxies` is closed.
    /// Default false.
    pub proxy_protocol: bool,
}

/// The map form of an item.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenMap {
    addr: String,
    #[serde(default)]
    tls: Option<ServerTls>,
    #[serde(default)]
    http2: Option<bool>,
    #[serde(default)]
    trusted_proxies: TrustedProxies,
    #[serde(default)]
    proxy_protocol: bool,
}

impl Listen {
    /// A plain listener on `addr`.
    pub fn plain(addr: impl Into<String>) -> Listen {
        Listen {
            addr: addr.into(),
            tls: None,
            http2: false,
            trusted_proxies: TrustedProxies::default(),
            proxy_protocol: false,
        }
    }

    /// The address, parsed.
    pub fn socket_addr(&self) -> Result<SocketAddr, String> {
        self.addr
            .parse()
            .map_err(|e| format!("`{}`: {e}", self.addr))
    }

    /// Makes the TLS file paths relative to `dir` (the configuration file's directory).
    pub fn anchor(&mut self, dir: &Path) {
        if let Some(tls) = &mut self.tls {
            tls.anchor(dir);
        }
    }

    /// What a reload cannot change: the socket, TLS on or off, the protocols offered.
    pub fn needs_restart_for(&self, old: &Listen) -> bool {
        self.addr != old.addr
            || self.tls.is_some() != old.tls.is_some()
            || self.http2 != old.http2
            || self.proxy_protocol != old.proxy_protocol
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Listen, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Listen;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "an address `IP:PORT` or {addr, tls, http2, trusted_proxies, proxy_protocol}",
                )
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Listen, E> {
                Ok(Listen::plain(v))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Listen, A::Error> {
                let m = ListenMap::deserialize(de::value::MapAccessDeserializer::new(map))?;
                if m.proxy_protocol && m.trusted_proxies.is_empty() {
                    return Err(de::Error::custom(
                        "proxy_protocol needs trusted_proxies: only a trusted balancer may name \
                         the client",
                    ));
                }
                if m.http2 == Some(true) && m.tls.is_none() {
                    return Err(de::Error::custom(
                        "http2 needs tls (HTTP/2 is offered through TLS's ALPN only)",
                    ));
                }
                Ok(Listen {
                    http2: m.tls.is_some() && m.http2.unwrap_or(true),
                    addr: m.addr,
                    tls: m.tls,
                    trusted_proxies: m.trusted_proxies,
                    proxy_protocol: m.proxy_protocol,
                })
            }
        }
        d.deserialize_any(V)
    }
}
