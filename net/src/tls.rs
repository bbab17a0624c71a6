//! TLS for the platform's own clients (PostgreSQL aside, which takes libpq's URL parameters
//! `sslmode`, `sslrootcert`, `sslcert`, `sslkey`): the CA a client trusts and the certificate it
//! presents, and the `native_tls` connector built from them. Redis, ClickHouse, SMTP and the
//! task engine's HTTP client read the same `tls:` block as the gateway's upstreams
//! (`ca_file`, `client_cert_file`, `client_key_file`), so an operator learns it once.
//!
//! Without `ca_file` the system's roots are trusted (`SSL_CERT_FILE`, `SSL_CERT_DIR`, then the
//! distribution's bundle, found by `openssl-probe`); with it, only that file's certificates, as
//! for upstreams and PostgreSQL's `sslrootcert`. Connections are TLS 1.2 or newer and always
//! verify the server's certificate chain and name (or IP address).

use std::path::{Path, PathBuf};

use openssl::pkey::PKey;
use openssl::x509::X509;
use serde::Deserialize;

/// A client's TLS files, relative to the configuration file's directory once
/// [`ClientTls::anchor`]ed. Every field is optional: no block means the system's roots and no
/// client certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// PEM certificates trusted instead of the system's roots (a private CA).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Certificate chain (leaf first) presented when the server asks for one (mutual TLS);
    /// needs `client_key_file`.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file` (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
}

/// Why a `tls:` block cannot be used. `field` is the block's key (`ca_file`,
/// `client_cert_file`, `client_key_file`), for the caller to prefix with the block's path.
/// Never holds key material.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ClientTlsError {
    pub field: &'static str,
    pub reason: String,
}

impl ClientTlsError {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        ClientTlsError {
            field,
            reason: reason.into(),
        }
    }
}

/// The contents of a [`ClientTls`], read and checked once: what a client library needs.
#[derive(Clone, Default)]
pub struct ClientTlsMaterial {
    /// The trusted CA certificates, PEM, one each; empty: the system's roots.
    pub roots_pem: Vec<Vec<u8>>,
    /// Certificate chain and its key as PKCS#8 PEM (what `native_tls` takes).
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
}

impl ClientTls {
    /// True when the block changes nothing.
    pub fn is_default(&self) -> bool {
        self == &ClientTls::default()
    }

    /// Makes relative paths relative to `dir` (the configuration file's directory).
    pub fn anchor(&mut self, dir: &Path) {
        for p in [
            &mut self.ca_file,
            &mut self.client_cert_file,
            &mut self.client_key_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
    }

    /// Reads and checks the files: the CA file holds at least one certificate, the certificate
    /// and key come together and the key belongs to the certificate.
    pub fn load(&self) -> Result<ClientTlsMaterial, ClientTlsError> {
        let mut material = ClientTlsMaterial::default();
        if let Some(path) = &self.ca_file {
            for cert in certificates("ca_file", path)? {
                material.roots_pem.push(pem(&cert, "ca_file")?);
            }
        }
        match (&self.client_cert_file, &self.client_key_file) {
            (None, None) => {}
            (Some(_), None) => {
                return Err(ClientTlsError::new(
                    "client_key_file",
                    "needed with client_cert_file",
                ));
            }
            (None, Some(_)) => {
                return Err(ClientTlsError::new(
                    "client_cert_file",
                    "needed with client_key_file",
                ));
            }
            (Some(cert_path), Some(key_path)) => {
                let chain = certificates("client_cert_file", cert_path)?;
                let key = PKey::private_key_from_pem(&read("client_key_file", key_path)?)
                    .map_err(|_| ClientTlsError::new("client_key_file", "not a PEM private key"))?;
                if !chain[0]
                    .public_key()
                    .is_ok_and(|public| public.public_eq(&key))
                {
                    return Err(ClientTlsError::new(
                        "client_key_file",
                        "does not match the first certificate of client_cert_file",
                    ));
                }
                let mut chain_pem = Vec::new();
                for c in &chain {
                    chain_pem.extend(pem(c, "client_cert_file")?);
                }
                let key_pem = key.private_key_to_pem_pkcs8().map_err(|e| {
                    ClientTlsError::new("client_key_file", format!("cannot use the key: {e}"))
                })?;
                material.identity_pem = Some((chain_pem, key_pem));
            }
        }
        Ok(material)
    }

    /// A verifying connector with these files.
    pub fn connector(&self) -> Result<native_tls::TlsConnector, ClientTlsError> {
        self.load()?.connector()
    }
}

impl ClientTlsMaterial {
    /// A `native_tls` connector: TLS 1.2+, the CA file's certificates (or the system's roots),
    /// the client certificate when there is one.
    pub fn connector(&self) -> Result<native_tls::TlsConnector, ClientTlsError> {
        let mut b = native_tls::TlsConnector::builder();
        b.min_protocol_version(Some(native_tls::Protocol::Tlsv12));
        if !self.roots_pem.is_empty() {
            b.disable_built_in_roots(true);
        }
        for pem in &self.roots_pem {
            let cert = native_tls::Certificate::from_pem(pem)
                .map_err(|e| ClientTlsError::new("ca_file", e.to_string()))?;
            b.add_root_certificate(cert);
        }
        if let Some((cert, key)) = &self.identity_pem {
            let id = native_tls::Identity::from_pkcs8(cert, key)
                .map_err(|e| ClientTlsError::new("client_key_file", e.to_string()))?;
            b.identity(id);
        }
        b.build()
            .map_err(|e| ClientTlsError::new("ca_file", format!("TLS set-up failed: {e}")))
    }
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, ClientTlsError> {
    std::fs::read(path)
        .map_err(|e| ClientTlsError::new(field, format!("cannot read {}: {e}", path.display())))
}

fn certificates(field: &'static str, path: &Path) -> Result<Vec<X509>, ClientTlsError> {
    X509::stack_from_pem(&read(field, path)?)
        .ok()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| ClientTlsError::new(field, "no PEM certificate in it"))
}

fn pem(cert: &X509, field: &'static str) -> Result<Vec<u8>, ClientTlsError> {
    cert.to_pem()
        .map_err(|e| ClientTlsError::new(field, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// deploy/tls/test-ca.sh's files in a fresh directory.
    fn test_ca() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/tls/test-ca.sh");
        let out = Command::new(script).arg(dir.path()).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    }

    #[test]
    fn files_are_checked_and_errors_name_the_key() {
        let ca = test_ca();
        let d = ca.path();
        let tls = |ca: Option<&str>, cert: Option<&str>, key: Option<&str>| ClientTls {
            ca_file: ca.map(|f| d.join(f)),
            client_cert_file: cert.map(|f| d.join(f)),
            client_key_file: key.map(|f| d.join(f)),
        };
        let ok = tls(Some("ca.crt"), Some("client.crt"), Some("client.key"));
        let m = ok.load().unwrap();
        assert_eq!(m.roots_pem.len(), 1);
        assert!(m.identity_pem.is_some());
        ok.connector().unwrap();
        assert!(ClientTls::default().load().unwrap().roots_pem.is_empty());

        let field = |t: ClientTls| t.load().err().unwrap().field;
        assert_eq!(field(tls(Some("missing.crt"), None, None)), "ca_file");
        assert_eq!(field(tls(Some("client.key"), None, None)), "ca_file");
        assert_eq!(
            field(tls(None, Some("client.crt"), None)),
            "client_key_file"
        );
        assert_eq!(
            field(tls(None, None, Some("client.key"))),
            "client_cert_file"
        );
        let mismatch = tls(None, Some("client.crt"), Some("server.key")).load();
        assert!(mismatch
            .err()
            .unwrap()
            .reason
            .contains("does not match the first certificate"));
    }

    #[test]
    fn a_sec1_key_is_accepted_and_handed_on_as_pkcs8() {
        let ca = test_ca();
        let d = ca.path();
        let out = Command::new("openssl")
            .args(["ec", "-in", "client.key", "-out", "client.sec1.key"])
            .current_dir(d)
            .output()
            .unwrap();
        assert!(out.status.success());
        let sec1 = std::fs::read_to_string(d.join("client.sec1.key")).unwrap();
        assert!(sec1.starts_with("-----BEGIN EC PRIVATE KEY-----"));
        let t = ClientTls {
            ca_file: None,
            client_cert_file: Some(d.join("client.crt")),
            client_key_file: Some(d.join("client.sec1.key")),
        };
        let (_, key) = t.load().unwrap().identity_pem.unwrap();
        assert!(key.starts_with(b"-----BEGIN PRIVATE KEY-----"));
        t.connector().unwrap();
    }

    #[test]
    fn relative_paths_follow_the_configuration_file() {
        let mut t = ClientTls {
            ca_file: Some("certs/ca.crt".into()),
            client_cert_file: Some("/abs/c.crt".into()),
            client_key_file: None,
        };
        t.anchor(Path::new("/etc/aihub"));
        assert_eq!(t.ca_file.unwrap(), Path::new("/etc/aihub/certs/ca.crt"));
        assert_eq!(t.client_cert_file.unwrap(), Path::new("/abs/c.crt"));
    }
}
