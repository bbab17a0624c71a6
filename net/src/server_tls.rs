//! TLS on our own listeners (the gateway's and the admin API's): the certificate and key files
//! a listener is configured with, read and checked into a [`CertifiedKey`], and the OpenSSL
//! acceptor settings both servers share (Mozilla's "intermediate" profile: TLS 1.2 and 1.3).
//! Reloading is the servers' business: they load a new [`CertifiedKey`] on SIGHUP and swap it in
//! only when it loaded, so a bad file never stops a listener that serves.

use std::path::{Path, PathBuf};

use openssl::pkey::{PKey, Private};
use openssl::ssl::{SslAcceptor, SslAcceptorBuilder, SslMethod};
use openssl::x509::X509;
use serde::Deserialize;

/// A listener's TLS files (PEM), relative to the configuration file's directory once
/// [`ServerTls::anchor`]ed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// The certificate chain, leaf first (what the server presents).
    pub cert_file: PathBuf,
    /// The leaf's private key (PKCS#8, PKCS#1 or SEC1; unencrypted).
    pub key_file: PathBuf,
}

/// Why a listener's TLS files cannot be used; `field` is `cert_file` or `key_file`. Never holds
/// key material.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ServerTlsError {
    pub field: &'static str,
    pub reason: String,
}

fn error(field: &'static str, reason: impl Into<String>) -> ServerTlsError {
    ServerTlsError {
        field,
        reason: reason.into(),
    }
}

/// A loaded certificate chain and the key that belongs to its leaf.
#[derive(Clone)]
pub struct CertifiedKey {
    pub chain: Vec<X509>,
    pub key: PKey<Private>,
}

impl std::fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedKey")
            .field("subject", &self.subject())
            .field("not_after", &self.not_after())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Makes relative paths relative to `dir` (the configuration file's directory).
    pub fn anchor(&mut self, dir: &Path) {
        for p in [&mut self.cert_file, &mut self.key_file] {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
    }

    /// Reads the files: a chain of at least one certificate, a key matching its leaf, a leaf
    /// that has not expired.
    pub fn load(&self) -> Result<CertifiedKey, ServerTlsError> {
        let read = |field, path: &Path| {
            std::fs::read(path)
                .map_err(|e| error(field, format!("cannot read {}: {e}", path.display())))
        };
        let chain = X509::stack_from_pem(&read("cert_file", &self.cert_file)?)
            .ok()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| error("cert_file", "no PEM certificate in it"))?;
        let key = PKey::private_key_from_pem(&read("key_file", &self.key_file)?)
            .map_err(|_| error("key_file", "not an unencrypted PEM private key"))?;
        if !chain[0]
            .public_key()
            .is_ok_and(|public| public.public_eq(&key))
        {
            return Err(error(
                "key_file",
                "does not match the first certificate of cert_file",
            ));
        }
        let now = openssl::asn1::Asn1Time::days_from_now(0)
            .map_err(|e| error("cert_file", e.to_string()))?;
        if chain[0].not_after() < now {
            return Err(error(
                "cert_file",
                format!("the certificate expired on {}", chain[0].not_after()),
            ));
        }
        Ok(CertifiedKey { chain, key })
    }
}

impl CertifiedKey {
    /// The leaf's subject common name (for logs).
    pub fn subject(&self) -> String {
        self.chain[0]
            .subject_name()
            .entries_by_nid(openssl::nid::Nid::COMMONNAME)
            .next()
            .and_then(|e| e.data().to_string().ok())
            .unwrap_or_default()
    }

    /// When the leaf expires (for logs).
    pub fn not_after(&self) -> String {
        self.chain[0].not_after().to_string()
    }

    /// An acceptor builder (Mozilla intermediate) presenting this chain, for a server to add
    /// its ALPN choice to.
    pub fn acceptor_builder(&self) -> Result<SslAcceptorBuilder, openssl::error::ErrorStack> {
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls())?;
        b.set_certificate(&self.chain[0])?;
        for c in &self.chain[1..] {
            b.add_extra_chain_cert(c.clone())?;
        }
        b.set_private_key(&self.key)?;
        b.check_private_key()?;
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_ca() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/tls/test-ca.sh");
        let out = std::process::Command::new(script)
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success());
        dir
    }

    #[test]
    fn a_listener_pair_is_checked() {
        let ca = test_ca();
        let d = ca.path();
        let tls = |cert: &str, key: &str| ServerTls {
            cert_file: d.join(cert),
            key_file: d.join(key),
        };
        let ck = tls("server.crt", "server.key").load().unwrap();
        assert_eq!(ck.subject(), "localhost");
        ck.acceptor_builder().unwrap();
        let e = tls("server.crt", "client.key").load().unwrap_err();
        assert_eq!(e.field, "key_file");
        assert!(e.reason.contains("does not match"));
        assert_eq!(
            tls("server.key", "server.key").load().unwrap_err().field,
            "cert_file"
        );
        assert_eq!(
            tls("missing.crt", "server.key").load().unwrap_err().field,
            "cert_file"
        );
        assert_eq!(
            tls("server.crt", "server.crt").load().unwrap_err().field,
            "key_file"
        );

        let mut rel = ServerTls {
            cert_file: "tls/a.crt".into(),
            key_file: "/k".into(),
        };
        rel.anchor(Path::new("/etc/aihub"));
        assert_eq!(rel.cert_file, Path::new("/etc/aihub/tls/a.crt"));
        assert_eq!(rel.key_file, Path::new("/k"));
    }
}
