//! TLS material for tests: the test CA of deploy/tls/test-ca.sh, and HTTPS clients trusting it.

use std::process::Command;

use super::repo_root;

/// The test CA's files in a fresh directory.
pub struct Ca(pub tempfile::TempDir);

impl Ca {
    pub fn new() -> Ca {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(repo_root().join("deploy/tls/test-ca.sh"))
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ca(dir)
    }

    pub fn file(&self, name: &str) -> String {
        self.0.path().join(name).display().to_string()
    }

    /// A `tls:` block (flow YAML) trusting `ca` and presenting the client certificate.
    pub fn client_block(&self, ca: &str) -> String {
        format!(
            "{{ca_file: \"{}\", client_cert_file: \"{}\", client_key_file: \"{}\"}}",
            self.file(ca),
            self.file("client.crt"),
            self.file("client.key")
        )
    }
}

impl Ca {
    /// An HTTPS client trusting only this CA.
    pub fn client(&self) -> reqwest::Client {
        let pem = std::fs::read(self.file("ca.crt")).unwrap();
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .build()
            .unwrap()
    }
}
