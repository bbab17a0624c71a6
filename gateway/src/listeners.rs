//! The proxy listeners' edges: TLS (the certificate each handshake presents, swapped whole on
//! reload) and who the client is: the PROXY protocol header a trusted balancer sends before
//! anything else (read before TLS by a pre-TLS callback, or before HTTP by [`ProxyProtocol`]
//! wrapping the HTTP app), and the trusted proxies of the listener a request came in on with the
//! client address they name in `X-Forwarded-For`.
//!
//! A listener's policy is found by the request's local address, so all listeners share one
//! pingora service (one runtime of `server.threads` workers) instead of a service each.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use aihub_net::proxy_header;
use pingora_core::apps::ServerApp;
use pingora_core::listeners::PreTlsProcess;
use pingora_core::protocols::l4::socket::SocketAddr as PSocketAddr;
use pingora_core::protocols::l4::stream::Stream as L4Stream;
use pingora_core::protocols::{GetSocketDigest, SocketDigest, Stream, UniqueID};
use pingora_core::server::ShutdownWatch;

use aihub_net::server_tls::CertifiedKey;
use aihub_net::TrustedProxies;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::listeners::tls::TlsSettings;
use pingora_core::listeners::TlsAccept;
use pingora_core::protocols::tls::TlsRef;
use pingora_core::tls::ext;
use pingora_proxy::Session;

use crate::config::Listen;

/// The certificate served by a TLS listener, swapped by the reloader.
pub type CertSlot = Arc<ArcSwap<CertifiedKey>>;

/// Presents the slot's current certificate in each handshake.
struct SlotCertificate(CertSlot);

#[async_trait]
impl TlsAccept for SlotCertificate {
    async fn certificate_callback(&self, ssl: &mut TlsRef) {
        let ck = self.0.load();
        let result = ext::ssl_use_certificate(ssl, &ck.chain[0])
            .and_then(|()| {
                ck.chain[1..]
                    .iter()
                    .try_for_each(|c| ext::ssl_add_chain_cert(ssl, c))
            })
            .and_then(|()| ext::ssl_use_private_key(ssl, &ck.key));
        if let Err(e) = result {
            // The handshake then fails for this client; the next may succeed.
            tracing::error!(error = %e, "cannot present the listener's certificate");
        }
    }
}

/// The TLS settings of `listen` (Mozilla intermediate, h2 when enabled) presenting `slot`.
pub fn tls_settings(listen: &Listen, slot: &CertSlot) -> pingora_core::Result<TlsSettings> {
    let mut settings = TlsSettings::with_callbacks(Box::new(SlotCertificate(Arc::clone(slot))))?;
    if listen.http2 {
        settings.enable_h2();
    }
    Ok(settings)
}

/// The certificate slots of the TLS listeners, by address.
#[derive(Default)]
pub struct CertSlots(HashMap<String, CertSlot>);

impl CertSlots {
    /// Loads the certificates of `listeners` (checked with the configuration already).
    pub fn load(listeners: &[Listen]) -> Result<CertSlots, String> {
        let mut slots = HashMap::new();
        for l in listeners {
            if let Some(tls) = &l.tls {
                let ck = tls.load().map_err(|e| format!("{}: {e}", l.addr))?;
                slots.insert(l.addr.clone(), Arc::new(ArcSwap::from_pointee(ck)));
            }
        }
        Ok(CertSlots(slots))
    }

    pub fn get(&self, addr: &str) -> Option<&CertSlot> {
        self.0.get(addr)
    }

    /// Loads `listeners`' files again and swaps them in, all or none: a file that fails leaves
    /// every listener on its current certificate. Returns the certificates now served.
    pub fn reload(&self, listeners: &[Listen]) -> Result<Vec<(String, CertifiedKey)>, String> {
        let mut loaded = Vec::new();
        for l in listeners {
            if let (Some(tls), Some(_)) = (&l.tls, self.0.get(&l.addr)) {
                let ck = tls.load().map_err(|e| format!("{}: {e}", l.addr))?;
                loaded.push((l.addr.clone(), ck));
            }
        }
        for (addr, ck) in &loaded {
            self.0[addr].store(Arc::new(ck.clone()));
        }
        Ok(loaded)
    }
}

/// The policies in force, swapped whole by the reloader.
pub type Clients = Arc<ArcSwap<ClientPolicies>>;

/// Who may name the client, per listener.
#[derive(Debug, Default)]
pub struct ClientPolicies {
    /// Listeners with trusted proxies; an unspecified IP matches any local IP of the port.
    by_addr: Vec<Policy>,
}

#[derive(Debug)]
struct Policy {
    local: SocketAddr,
    trusted: TrustedProxies,
    proxy_protocol: bool,
}

impl ClientPolicies {
    pub fn new(listeners: &[Listen]) -> ClientPolicies {
        ClientPolicies {
            by_addr: listeners
                .iter()
                .filter(|l| !l.trusted_proxies.is_empty())
                .filter_map(|l| {
                    Some(Policy {
                        local: l.socket_addr().ok()?,
                        trusted: l.trusted_proxies.clone(),
                        proxy_protocol: l.proxy_protocol,
                    })
                })
                .collect(),
        }
    }

    fn policy_for(&self, local: Option<SocketAddr>) -> Option<&Policy> {
        let local = local?;
        self.by_addr.iter().find(|p| {
            p.local.port() == local.port()
                && (p.local.ip().is_unspecified() || p.local.ip() == local.ip())
        })
    }

    fn trusted_for(&self, local: Option<SocketAddr>) -> Option<&TrustedProxies> {
        self.policy_for(local).map(|p| &p.trusted)
    }

    /// The trusted proxies of the listener at `local` when it expects a PROXY header.
    fn proxy_protocol_for(&self, local: Option<SocketAddr>) -> Option<&TrustedProxies> {
        self.policy_for(local)
            .filter(|p| p.proxy_protocol)
            .map(|p| &p.trusted)
    }

    /// The request's client: the TCP peer, or, when the peer is a trusted proxy of the
    /// listener, the rightmost untrusted `X-Forwarded-For` hop. `None` on a Unix socket.
    pub fn client_ip(&self, session: &Session) -> Option<IpAddr> {
        let peer = session.client_addr()?.as_inet()?.ip().to_canonical();
        if self.by_addr.is_empty() {
            return Some(peer);
        }
        let local = session
            .server_addr()
            .and_then(|a| a.as_inet())
            .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()));
        let Some(trusted) = self.trusted_for(local) else {
            return Some(peer);
        };
        Some(aihub_net::client_from_forwarded_for(
            peer,
            trusted,
            session
                .req_header()
                .headers
                .get_all("x-forwarded-for")
                .iter()
                .map(http::HeaderValue::as_bytes),
        ))
    }
}

/// Longest wait for a PROXY header after the connection opened.
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A socket address as pingora records it.
fn inet(addr: Option<&PSocketAddr>) -> Option<SocketAddr> {
    addr.and_then(|a| a.as_inet())
        .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
}

/// When the listener the connection came in on expects a PROXY header: reads exactly the
/// header (never a byte of what follows) from a trusted peer and records the client it names as
/// the connection's peer. `Err`: close the connection (untrusted peer, malformed or missing
/// header).
async fn take_proxy_header<S>(stream: &mut S, clients: &Clients) -> Result<(), String>
where
    S: tokio::io::AsyncRead + GetSocketDigest + UniqueID + Unpin + ?Sized,
{
    let digest = stream.get_socket_digest();
    let local = inet(digest.as_ref().and_then(|d| d.local_addr()));
    let peer = inet(digest.as_ref().and_then(|d| d.peer_addr()));
    let policies = clients.load();
    let Some(trusted) = policies.proxy_protocol_for(local) else {
        return Ok(());
    };
    let peer = peer.ok_or("PROXY header on a connection without a peer address")?;
    if !trusted.contains(peer.ip()) {
        return Err(format!("PROXY header from {peer}, outside trusted_proxies"));
    }
    let source = tokio::time::timeout(PROXY_HEADER_TIMEOUT, proxy_header::read::read(stream))
        .await
        .map_err(|_| format!("no PROXY header from {peer} within {PROXY_HEADER_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    if let Some(source) = source {
        let d = SocketDigest::from_raw_fd(stream.id());
        let _ = d.peer_addr.set(Some(PSocketAddr::Inet(source)));
        let _ = d.local_addr.set(local.map(PSocketAddr::Inet));
        stream.set_socket_digest(d);
    }
    Ok(())
}

/// Reads the PROXY header on TLS listeners, before the handshake.
pub struct PreTlsProxyHeader(pub Clients);

#[async_trait]
impl PreTlsProcess for PreTlsProxyHeader {
    async fn process(&self, stream: &mut L4Stream) -> pingora_core::Result<()> {
        take_proxy_header(stream, &self.0).await.map_err(|e| {
            tracing::debug!(error = %e, "connection closed before TLS");
            pingora_core::Error::explain(pingora_core::ErrorType::AcceptError, e)
        })
    }
}

/// The HTTP app behind plaintext listeners, reading a PROXY header first where the listener
/// expects one. Such a connection is served here to its end (keep-alive included): its header
/// came once, at its start.
pub struct ProxyProtocol<A> {
    pub inner: Arc<A>,
    pub clients: Clients,
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for ProxyProtocol<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let expects = {
            let local = inet(
                stream
                    .get_socket_digest()
                    .as_ref()
                    .and_then(|d| d.local_addr()),
            );
            self.clients.load().proxy_protocol_for(local).is_some()
        };
        // TLS listeners read theirs before the handshake.
        if !expects || stream.get_ssl().is_some() {
            return self.inner.process_new(stream, shutdown).await;
        }
        if let Err(e) = take_proxy_header(&mut *stream, &self.clients).await {
            tracing::debug!(error = %e, "connection closed before HTTP");
            return None;
        }
        let mut next = self.inner.process_new(stream, shutdown).await;
        while let Some(s) = next {
            next = self.inner.process_new(s, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listen(addr: &str, trusted: &[&str]) -> Listen {
        Listen {
            trusted_proxies: TrustedProxies::try_new(trusted).unwrap(),
            ..Listen::plain(addr)
        }
    }

    #[test]
    fn the_listener_is_found_by_local_address() {
        let p = ClientPolicies::new(&[
            listen("0.0.0.0:8080", &["10.0.0.0/8"]),
            listen("127.0.0.1:8081", &["192.168.0.0/16"]),
            listen("127.0.0.1:8082", &[]),
        ]);
        let at = |s: &str| {
            p.trusted_for(Some(s.parse().unwrap()))
                .map(|t| t.contains("10.1.1.1".parse().unwrap()))
        };
        assert_eq!(at("10.9.9.9:8080"), Some(true));
        assert_eq!(at("127.0.0.1:8081"), Some(false));
        assert_eq!(at("127.0.0.2:8081"), None);
        assert_eq!(at("127.0.0.1:8082"), None);
    }
}
