//! The proxy listeners' edges: TLS (the certificate each handshake presents, swapped whole on
//! reload) and who the client is (the trusted proxies of the listener a request came in on,
//! and the client address they name in `X-Forwarded-For`).
//!
//! A listener's policy is found by the request's local address, so all listeners share one
//! pingora service (one runtime of `server.threads` workers) instead of a service each.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

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

/// Who may name the client, per listener.
#[derive(Debug, Default)]
pub struct ClientPolicies {
    /// `(local address, trusted proxies)`; an unspecified IP matches any local IP of the port.
    by_addr: Vec<(SocketAddr, TrustedProxies)>,
}

impl ClientPolicies {
    pub fn new(listeners: &[Listen]) -> ClientPolicies {
        ClientPolicies {
            by_addr: listeners
                .iter()
                .filter(|l| !l.trusted_proxies.is_empty())
                .filter_map(|l| Some((l.socket_addr().ok()?, l.trusted_proxies.clone())))
                .collect(),
        }
    }

    fn trusted_for(&self, local: Option<SocketAddr>) -> Option<&TrustedProxies> {
        let local = local?;
        self.by_addr.iter().find_map(|(addr, trusted)| {
            (addr.port() == local.port() && (addr.ip().is_unspecified() || addr.ip() == local.ip()))
                .then_some(trusted)
        })
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
