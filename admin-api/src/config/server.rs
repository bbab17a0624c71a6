//! The admin listener's `server:` section: TLS files, trusted proxies and the PROXY protocol,
//! deadlines for slow clients, the body cap.

use std::time::Duration;

use aihub_net::server_tls::ServerTls;
use aihub_net::TrustedProxies;
use serde::Deserialize;

/// The admin listener: TLS, the proxies in front of it, and deadlines for slow clients. A
/// connection that has not sent a whole
/// request header within `header_read_timeout` is closed (this also ends idle keep-alive
/// connections), a request whose body has not fully arrived within `body_read_timeout` of
/// its header is answered 408 `request_timeout` and its connection closed, and a connection
/// whose client stops reading (no write progress for `response_write_timeout`) is closed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Default 10s.
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Default 30s.
    #[serde(default = "default_body_read_timeout", with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Default 60s.
    #[serde(default = "default_response_write_timeout", with = "humantime_serde")]
    pub response_write_timeout: Duration,
    /// Largest request body accepted (413 `request_too_large` beyond). Default 2097152 (2 MiB).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// HTTPS: the certificate chain and key, read again on SIGHUP (a bad file is refused and
    /// the previous pair keeps serving). Default: none (plain HTTP).
    #[serde(default)]
    pub tls: Option<ServerTls>,
    /// Networks of the load balancers and proxies in front of this listener (CIDRs or
    /// addresses). Only from these is `X-Forwarded-For` (rightmost untrusted hop) or a PROXY
    /// header believed; the client address feeds throttles, audit entries and sessions.
    /// Default: none (the TCP peer is the client).
    #[serde(default)]
    pub trusted_proxies: TrustedProxies,
    /// Every connection starts with a PROXY protocol header (v1 or v2, as HAProxy or an AWS NLB
    /// send it); a connection from outside `trusted_proxies` is closed. Default false.
    #[serde(default)]
    pub proxy_protocol: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            header_read_timeout: default_header_read_timeout(),
            body_read_timeout: default_body_read_timeout(),
            response_write_timeout: default_response_write_timeout(),
            max_body_bytes: default_max_body_bytes(),
            tls: None,
            trusted_proxies: TrustedProxies::default(),
            proxy_protocol: false,
        }
    }
}

fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_body_read_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_response_write_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_body_bytes() -> usize {
    2 * 1024 * 1024
}
