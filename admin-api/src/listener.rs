//! What happens on an admin connection before HTTP, and who the client is: the PROXY protocol
//! header (accepted from trusted proxies only), the TLS handshake (certificate swapped on
//! SIGHUP), and the client address of each request (`X-Forwarded-For`, believed only from a
//! trusted peer). Handlers see that address as `ConnectInfo<SocketAddr>`, so throttles, audit
//! entries and sessions never see a load balancer's address instead of the client's.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use aihub_net::proxy_header;
use aihub_net::server_tls::{CertifiedKey, ServerTls};
use aihub_net::TrustedProxies;
use arc_swap::ArcSwap;
use openssl::ssl::{Ssl, SslAcceptor};
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

use crate::config::ServerConfig;

/// A connection ready for HTTP.
pub enum Io {
    Plain(TcpStream),
    Tls(Box<SslStream<TcpStream>>),
}

/// The listener's front: TLS acceptor, trusted proxies, PROXY protocol. Cheap to clone.
#[derive(Clone)]
pub struct Front {
    tls: Option<Arc<Tls>>,
    trusted: Arc<TrustedProxies>,
    proxy_protocol: bool,
}

struct Tls {
    files: ServerTls,
    acceptor: ArcSwap<SslAcceptor>,
}

/// Why the listener's settings cannot be used (at start).
#[derive(Debug, thiserror::Error)]
#[error("server.tls.{0}")]
pub struct FrontError(String);

impl Front {
    /// Reads the TLS files (if any) of the `server` section.
    pub fn try_new(server: &ServerConfig) -> Result<Front, FrontError> {
        let tls = match &server.tls {
            None => None,
            Some(files) => {
                let ck = files.load().map_err(|e| FrontError(e.to_string()))?;
                Some(Arc::new(Tls {
                    acceptor: ArcSwap::from_pointee(acceptor(&ck)?),
                    files: files.clone(),
                }))
            }
        };
        Ok(Front {
            tls,
            trusted: Arc::new(server.trusted_proxies.clone()),
            proxy_protocol: server.proxy_protocol,
        })
    }

    /// `https` or `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Reads the certificate and key again (SIGHUP) and serves them to new connections; on
    /// any error the previous pair keeps serving and the error is returned.
    pub fn reload_tls(&self) -> Result<Option<CertifiedKey>, FrontError> {
        let Some(tls) = &self.tls else {
            return Ok(None);
        };
        let ck = tls.files.load().map_err(|e| FrontError(e.to_string()))?;
        tls.acceptor.store(Arc::new(acceptor(&ck)?));
        Ok(Some(ck))
    }

    /// The PROXY header (when enabled) and the TLS handshake, both within `deadline`. `None`:
    /// the connection is closed (a PROXY header from an untrusted peer or malformed, a failed
    /// or slow handshake); the reason is logged at debug level.
    pub async fn open(
        &self,
        mut tcp: TcpStream,
        peer: SocketAddr,
        deadline: Duration,
    ) -> Option<(Io, SocketAddr)> {
        let opened = tokio::time::timeout(deadline, async {
            let mut peer = peer;
            if self.proxy_protocol {
                if !self.trusted.contains(peer.ip()) {
                    return Err("PROXY protocol from a peer outside server.trusted_proxies".into());
                }
                let source = proxy_header::read::read(&mut tcp)
                    .await
                    .map_err(|e| e.to_string())?;
                if let Some(source) = source {
                    peer = source;
                }
            }
            let io = match &self.tls {
                None => Io::Plain(tcp),
                Some(tls) => {
                    let ssl = Ssl::new(tls.acceptor.load().context()).map_err(|e| e.to_string())?;
                    let mut s = SslStream::new(ssl, tcp).map_err(|e| e.to_string())?;
                    Pin::new(&mut s).accept().await.map_err(|e| e.to_string())?;
                    Io::Tls(Box::new(s))
                }
            };
            Ok::<_, String>((io, peer))
        })
        .await;
        match opened {
            Ok(Ok(io)) => Some(io),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "admin connection refused before HTTP");
                None
            }
            Err(_) => {
                tracing::debug!(%peer, "admin connection: no PROXY header or TLS handshake within the header deadline");
                None
            }
        }
    }

    /// The client of a request on a connection from `peer`: the rightmost untrusted
    /// `X-Forwarded-For` hop when `peer` is a trusted proxy, else `peer`.
    pub fn client(&self, peer: SocketAddr, headers: &http::HeaderMap) -> SocketAddr {
        if self.trusted.is_empty() || !self.trusted.contains(peer.ip()) {
            return SocketAddr::new(peer.ip().to_canonical(), peer.port());
        }
        let ip = aihub_net::client_from_forwarded_for(
            peer.ip(),
            &self.trusted,
            headers
                .get_all("x-forwarded-for")
                .iter()
                .map(http::HeaderValue::as_bytes),
        );
        // The port is the proxy's; there is no client port to tell.
        SocketAddr::new(ip, if ip == peer.ip() { peer.port() } else { 0 })
    }
}

fn acceptor(ck: &CertifiedKey) -> Result<SslAcceptor, FrontError> {
    let mut b = ck
        .acceptor_builder()
        .map_err(|e| FrontError(format!("cert_file: {e}")))?;
    // HTTP/1.1 only: the admin API is served by hyper's HTTP/1 connection.
    b.set_alpn_select_callback(|_, client| {
        openssl::ssl::select_next_proto(b"\x08http/1.1", client)
            .ok_or(openssl::ssl::AlpnError::NOACK)
    });
    Ok(b.build())
}
