//! Connections to Redis, plain (`redis://`) or over TLS (`rediss://`), with the platform's
//! [`ClientTls`] files. The `redis` crate's own TLS (OpenSSL) trusts only the system's roots and
//! presents no client certificate, so for `rediss://` this module opens the TLS stream itself and
//! hands it to the crate. Redis 6+ asks TLS clients for a certificate by default
//! (`tls-auth-clients yes`): give it one with `cert_file`/`key_file`.
//!
//! Connecting spawns the connection's driver on the current Tokio runtime, as the crate's own
//! `get_multiplexed_async_connection` does.

use redis::aio::{MultiplexedConnection, PubSub};
use redis::{ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisConnectionInfo};
use tokio::net::TcpStream;

use crate::tls::{ClientTls, ClientTlsError};

/// Why a Redis URL and its TLS block cannot be used. Never echoes the URL (it may hold a
/// password).
#[derive(Debug, thiserror::Error)]
pub enum RedisTargetError {
    #[error("expected `redis://[USER:PASSWORD@]HOST[:PORT][/DB]` or `rediss://…`")]
    Url,
    #[error("tls is set but the URL is not `rediss://`")]
    TlsWithoutRediss,
    #[error(
        "`#insecure` (no certificate check) is refused: trust the server's CA with tls.ca_file"
    )]
    Insecure,
    #[error("tls.{0}")]
    Tls(#[from] ClientTlsError),
}

impl RedisTargetError {
    /// The key of the Redis section the error is about: `url`, `tls` or `tls.<field>`.
    pub fn key(&self) -> String {
        match self {
            RedisTargetError::Url | RedisTargetError::Insecure => "url".into(),
            RedisTargetError::TlsWithoutRediss => "tls".into(),
            RedisTargetError::Tls(e) => format!("tls.{}", e.field),
        }
    }

    /// The message without the key.
    pub fn message(&self) -> String {
        match self {
            RedisTargetError::Tls(e) => e.reason.clone(),
            other => other.to_string(),
        }
    }
}

/// Where a Redis is and how to reach it. Cheap to clone; connecting does the I/O.
#[derive(Clone)]
pub struct RedisTarget {
    info: RedisConnectionInfo,
    addr: Addr,
}

#[derive(Clone)]
enum Addr {
    /// `redis://` and `redis+unix://`: the crate connects.
    Plain(redis::Client),
    /// `rediss://`: we connect and verify with this connector.
    Tls {
        host: String,
        port: u16,
        connector: tokio_native_tls::TlsConnector,
    },
}

impl RedisTarget {
    /// Parses `url` and reads the TLS files (no network I/O).
    pub fn try_new(url: &str, tls: &ClientTls) -> Result<RedisTarget, RedisTargetError> {
        if !(url.starts_with("redis://")
            || url.starts_with("rediss://")
            || url.starts_with("redis+unix://")
            || url.starts_with("unix://"))
        {
            return Err(RedisTargetError::Url);
        }
        let info: ConnectionInfo = url
            .into_connection_info()
            .map_err(|_| RedisTargetError::Url)?;
        let addr = match &info.addr {
            ConnectionAddr::TcpTls {
                host,
                port,
                insecure,
                ..
            } => {
                if *insecure {
                    return Err(RedisTargetError::Insecure);
                }
                Addr::Tls {
                    host: host.clone(),
                    port: *port,
                    connector: tls.connector()?.into(),
                }
            }
            _ if !tls.is_default() => return Err(RedisTargetError::TlsWithoutRediss),
            _ => Addr::Plain(redis::Client::open(info.clone()).map_err(|_| RedisTargetError::Url)?),
        };
        Ok(RedisTarget {
            info: info.redis,
            addr,
        })
    }

    /// True for `rediss://`.
    pub fn is_tls(&self) -> bool {
        matches!(self.addr, Addr::Tls { .. })
    }

    /// A multiplexed connection; its driver runs on the current runtime.
    pub async fn multiplexed(&self) -> redis::RedisResult<MultiplexedConnection> {
        match &self.addr {
            Addr::Plain(client) => client.get_multiplexed_async_connection().await,
            Addr::Tls {
                host,
                port,
                connector,
            } => {
                let stream = tls_stream(host, *port, connector).await?;
                let (conn, driver) = MultiplexedConnection::new(&self.info, stream).await?;
                tokio::spawn(driver);
                Ok(conn)
            }
        }
    }

    /// A pub/sub connection.
    pub async fn pubsub(&self) -> redis::RedisResult<PubSub> {
        match &self.addr {
            Addr::Plain(client) => client.get_async_pubsub().await,
            Addr::Tls {
                host,
                port,
                connector,
            } => PubSub::new(&self.info, tls_stream(host, *port, connector).await?).await,
        }
    }
}

/// TCP, then a verified TLS handshake for `host` (a name or an IP literal, checked against the
/// certificate's names or IP addresses).
async fn tls_stream(
    host: &str,
    port: u16,
    connector: &tokio_native_tls::TlsConnector,
) -> redis::RedisResult<tokio_native_tls::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect((host, port)).await?;
    tcp.set_nodelay(true)?;
    connector
        .connect(host, tcp)
        .await
        .map_err(|e| std::io::Error::other(format!("TLS with {host}:{port}: {e}")).into())
}
