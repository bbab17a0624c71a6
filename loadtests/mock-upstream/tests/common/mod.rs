//! Test helpers: one raw HTTP/1.1 exchange over any stream (so a broken response can be seen
//! exactly as it arrived), a mock on loopback, and test certificates made with the `openssl`
//! crate.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aihub_mock_upstream::MockConfig;
use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
};
use openssl::x509::{X509NameBuilder, X509};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A response as it arrived.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// The header block, lowercased.
    pub head: String,
    /// The body, de-chunked as far as it arrived.
    pub body: Vec<u8>,
    /// The message ended properly (terminating chunk, or `content-length` bytes).
    pub complete: bool,
    /// Reading failed (reset, TLS error) rather than ending at EOF.
    pub read_error: Option<String>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        self.head
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map(str::trim)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    /// The SSE events received (complete ones, `\n\n`-terminated).
    pub fn events(&self) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.body);
        let mut events: Vec<String> = text.split("\n\n").map(str::to_owned).collect();
        events.pop(); // the remainder after the last separator
        events
    }
}

/// Starts a mock with `config` on loopback.
pub async fn mock(config: MockConfig) -> SocketAddr {
    aihub_mock_upstream::spawn("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap()
}

/// Sends one request (`connection: close`) and reads the response until the peer closes.
pub async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let mut read_error = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => raw.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => {
                read_error = Some(e.to_string());
                break;
            }
            Err(_) => panic!("no end of response within 10 s: {raw:?}"),
        }
    }
    parse(&raw, read_error)
}

/// An HTTP request over plain TCP.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    exchange(tcp, method, path, headers, body).await
}

fn parse(raw: &[u8], read_error: Option<String>) -> Reply {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response header in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    let mut reply = Reply {
        status,
        head,
        body: Vec::new(),
        complete: false,
        read_error,
    };
    let rest = &raw[end + 4..];
    if reply.header("transfer-encoding") == Some("chunked") {
        let (body, complete) = dechunk(rest);
        reply.body = body;
        reply.complete = complete;
    } else if let Some(len) = reply.header("content-length") {
        let len: usize = len.parse().unwrap();
        reply.complete = rest.len() == len;
        reply.body = rest.to_vec();
    } else {
        reply.body = rest.to_vec();
    }
    reply
}

/// The data of the complete chunks, and whether the terminating chunk arrived.
fn dechunk(mut rest: &[u8]) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            return (body, false);
        };
        let size = std::str::from_utf8(&rest[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
            .unwrap_or_else(|| panic!("bad chunk size line in {rest:?}"));
        let data = &rest[eol + 2..];
        if size == 0 {
            return (body, data.starts_with(b"\r\n"));
        }
        if data.len() < size + 2 {
            body.extend_from_slice(&data[..size.min(data.len())]);
            return (body, false);
        }
        body.extend_from_slice(&data[..size]);
        rest = &data[size + 2..];
    }
}

/// A CA, a server certificate it signed (SAN `IP:127.0.0.1`, `DNS:localhost`) and a client
/// certificate it signed, as PEM files in a temporary directory.
pub struct Certs {
    pub dir: tempfile::TempDir,
    pub ca: X509,
    pub client_cert: X509,
    pub client_key: PKey<Private>,
}

impl Certs {
    pub fn new() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let (ca, ca_key) = cert("aihub test CA", None, Kind::Ca);
        let (server, server_key) = cert("localhost", Some((&ca, &ca_key)), Kind::Server);
        let (client_cert, client_key) = cert("test client", Some((&ca, &ca_key)), Kind::Client);
        write(&dir.path().join("ca.pem"), &ca.to_pem().unwrap());
        write(&dir.path().join("server.pem"), &server.to_pem().unwrap());
        let key_pem = server_key.private_key_to_pem_pkcs8().unwrap();
        write(&dir.path().join("server.key"), &key_pem);
        Certs {
            dir,
            ca,
            client_cert,
            client_key,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

enum Kind {
    Ca,
    Server,
    Client,
}

fn cert(cn: &str, issuer: Option<(&X509, &PKey<Private>)>, kind: Kind) -> (X509, PKey<Private>) {
    let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", cn).unwrap();
    let name = name.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    let mut serial = BigNum::new().unwrap();
    serial.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
    b.set_serial_number(&serial.to_asn1_integer().unwrap())
        .unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(2).unwrap())
        .unwrap();
    match issuer {
        Some((ca, _)) => b.set_issuer_name(ca.subject_name()).unwrap(),
        None => b.set_issuer_name(&name).unwrap(),
    }
    match kind {
        Kind::Ca => {
            b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
                .unwrap();
            let usage = KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build();
            b.append_extension(usage.unwrap()).unwrap();
        }
        Kind::Server | Kind::Client => {
            b.append_extension(BasicConstraints::new().build().unwrap())
                .unwrap();
            let usage = KeyUsage::new()
                .digital_signature()
                .key_encipherment()
                .build();
            b.append_extension(usage.unwrap()).unwrap();
            let eku = match kind {
                Kind::Server => ExtendedKeyUsage::new().server_auth().build(),
                _ => ExtendedKeyUsage::new().client_auth().build(),
            };
            b.append_extension(eku.unwrap()).unwrap();
        }
    }
    if let Kind::Server = kind {
        let san = SubjectAlternativeName::new()
            .ip("127.0.0.1")
            .dns("localhost")
            .build(&b.x509v3_context(issuer.map(|(ca, _)| &**ca), None))
            .unwrap();
        b.append_extension(san).unwrap();
    }
    let signer = issuer.map_or(&key, |(_, k)| k);
    b.sign(signer, MessageDigest::sha256()).unwrap();
    (b.build(), key)
}
