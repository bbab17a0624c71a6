//! HTTPS for the mock upstream: the OpenSSL acceptor built from PEM files (`--tls-cert`,
//! `--tls-key`, and `--tls-client-ca` for mutual TLS) and the per-connection handshake.
//!
//! With a client CA, the handshake requires a client certificate that chains to it; without
//! one the handshake fails (under TLS 1.3 the client may only learn it from the alert on its
//! first read). A failed handshake is logged at debug and costs only that connection: the
//! server keeps accepting. Only HTTP/1.1 is spoken (ALPN selects `http/1.1` when offered).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use openssl::pkey::PKey;
use openssl::ssl::{
    select_next_proto, AlpnError, Ssl, SslAcceptor, SslMethod, SslVerifyMode, SslVersion,
};
use openssl::x509::X509;
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

/// A handshake that has not finished by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server side of TLS, shared by every connection.
#[derive(Clone)]
pub struct TlsAcceptor {
    acceptor: Arc<SslAcceptor>,
    client_auth: bool,
}

impl fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

/// Builds the acceptor: `cert` holds the server certificate (PEM, then any intermediates),
/// `key` its private key (PEM); with `client_ca` (PEM, one or more certificates) a client
/// certificate signed by it is required.
pub fn acceptor(cert: &Path, key: &Path, client_ca: Option<&Path>) -> io::Result<TlsAcceptor> {
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())
        .map_err(|e| invalid("TLS setup", e))?;
    let chain = X509::stack_from_pem(&read(cert)?).map_err(|e| invalid(cert.display(), e))?;
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| invalid(cert.display(), "no PEM certificate"))?;
    b.set_certificate(leaf)
        .map_err(|e| invalid(cert.display(), e))?;
    for c in intermediates {
        b.add_extra_chain_cert(c.clone())
            .map_err(|e| invalid(cert.display(), e))?;
    }
    let pkey = PKey::private_key_from_pem(&read(key)?).map_err(|e| invalid(key.display(), e))?;
    let mismatch = |e| {
        invalid(
            key.display(),
            format!("not usable with {}: {e}", cert.display()),
        )
    };
    b.set_private_key(&pkey).map_err(mismatch)?;
    b.check_private_key().map_err(mismatch)?;
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(|e| invalid("TLS setup", e))?;
    b.set_alpn_select_callback(|_, client| {
        select_next_proto(b"\x08http/1.1", client).ok_or(AlpnError::NOACK)
    });
    if let Some(ca) = client_ca {
        let cas = X509::stack_from_pem(&read(ca)?).map_err(|e| invalid(ca.display(), e))?;
        if cas.is_empty() {
            return Err(invalid(ca.display(), "no PEM certificate"));
        }
        for c in &cas {
            b.cert_store_mut()
                .add_cert(c.clone())
                .and_then(|()| b.add_client_ca(c))
                .map_err(|e| invalid(ca.display(), e))?;
        }
        b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
        // Session resumption with peer verification needs a session id context.
        b.set_session_id_context(b"aihub-mock-upstream")
            .map_err(|e| invalid("TLS setup", e))?;
    }
    Ok(TlsAcceptor {
        acceptor: Arc::new(b.build()),
        client_auth: client_ca.is_some(),
    })
}

impl TlsAcceptor {
    /// Whether clients must present a certificate.
    pub fn client_auth(&self) -> bool {
        self.client_auth
    }

    /// Runs the handshake on an accepted connection; `None` (logged at debug) when it fails.
    pub async fn accept(&self, tcp: TcpStream, peer: SocketAddr) -> Option<SslStream<TcpStream>> {
        let handshake = async {
            let ssl = Ssl::new(self.acceptor.context())?;
            let mut stream = SslStream::new(ssl, tcp)?;
            Pin::new(&mut stream).accept().await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(stream)
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                None
            }
        }
    }
}

fn read(path: &Path) -> io::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

fn invalid(what: impl fmt::Display, e: impl fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {e}"))
}
