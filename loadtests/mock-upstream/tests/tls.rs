//! HTTPS serving: with a test CA, with a required client certificate (mutual TLS), and the
//! faults over TLS.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;

use aihub_mock_upstream::MockConfig;
use common::{exchange, mock, Certs, Reply};
use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
use openssl::x509::store::X509StoreBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_openssl::SslStream;

/// A client trusting only the test CA, optionally presenting the test client certificate.
fn connector(certs: &Certs, client_cert: bool) -> SslConnector {
    let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
    let mut store = X509StoreBuilder::new().unwrap();
    store.add_cert(certs.ca.clone()).unwrap();
    b.set_verify_cert_store(store.build()).unwrap();
    b.set_verify(SslVerifyMode::PEER);
    if client_cert {
        b.set_certificate(&certs.client_cert).unwrap();
        b.set_private_key(&certs.client_key).unwrap();
    }
    b.build()
}

/// Connects to `addr` verifying the server as `name` (a DNS name, or an IP address).
async fn connect(
    connector: &SslConnector,
    addr: SocketAddr,
    name: &str,
) -> Result<SslStream<TcpStream>, openssl::ssl::Error> {
    let mut config = connector.configure().unwrap();
    if let Ok(ip) = name.parse::<IpAddr>() {
        config.set_use_server_name_indication(false);
        config.set_verify_hostname(false);
        config.param_mut().set_ip(ip).unwrap();
    }
    let ssl = config.into_ssl(name).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut stream = SslStream::new(ssl, tcp).unwrap();
    Pin::new(&mut stream).connect().await?;
    Ok(stream)
}

async fn models(stream: SslStream<TcpStream>) -> Reply {
    exchange(stream, "GET", "/v1/models", &[], "").await
}

async fn tls_mock(certs: &Certs, client_ca: bool) -> SocketAddr {
    let ca = certs.path("ca.pem");
    let tls = aihub_mock_upstream::acceptor(
        &certs.path("server.pem"),
        &certs.path("server.key"),
        client_ca.then_some(ca.as_path()),
    )
    .unwrap();
    assert_eq!(tls.client_auth(), client_ca);
    mock(MockConfig {
        tls: Some(tls),
        ..MockConfig::default()
    })
    .await
}

#[tokio::test]
async fn serves_https_verified_with_the_ca() {
    let certs = Certs::new();
    let addr = tls_mock(&certs, false).await;
    let client = connector(&certs, false);
    for name in ["localhost", "127.0.0.1"] {
        let stream = connect(&client, addr, name).await.unwrap();
        let r = models(stream).await;
        assert_eq!((r.status, r.complete), (200, true), "{name}: {r:?}");
        assert_eq!(r.json()["object"], "list");
    }

    // A name the certificate does not carry, or a client without the CA: refused.
    assert!(connect(&client, addr, "example.com").await.is_err());
    let untrusting = SslConnector::builder(SslMethod::tls_client())
        .unwrap()
        .build();
    assert!(connect(&untrusting, addr, "localhost").await.is_err());

    // Plain HTTP to the HTTPS port fails its handshake; the server keeps serving.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tcp.read_to_end(&mut buf).await;
    assert!(!buf.starts_with(b"HTTP/1.1 200"));
    let stream = connect(&client, addr, "localhost").await.unwrap();
    assert_eq!(models(stream).await.status, 200);

    // Faults break the TLS stream too: the header, then no clean end.
    let stream = connect(&client, addr, "localhost").await.unwrap();
    let headers = [("x-mock-reset-after-headers", "1")];
    let r = exchange(stream, "GET", "/v1/models", &headers, "").await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty() && !r.complete, "{r:?}");
}

#[tokio::test]
async fn client_ca_requires_a_client_certificate() {
    let certs = Certs::new();
    let addr = tls_mock(&certs, true).await;

    // Without a client certificate: the handshake fails (under TLS 1.3 the client may only
    // learn it from the alert when it reads), and no response arrives.
    let anonymous = connector(&certs, false);
    for _ in 0..2 {
        if let Ok(mut stream) = connect(&anonymous, addr, "localhost").await {
            let _ = stream
                .write_all(b"GET /v1/models HTTP/1.1\r\nhost: localhost\r\n\r\n")
                .await;
            let mut buf = Vec::new();
            let read = stream.read_to_end(&mut buf).await;
            assert!(read.is_err() || buf.is_empty(), "{read:?} {buf:?}");
        }
    }

    // With one, served (the failed handshakes did not stop the server).
    let client = connector(&certs, true);
    let stream = connect(&client, addr, "localhost").await.unwrap();
    let r = models(stream).await;
    assert_eq!((r.status, r.complete), (200, true), "{r:?}");
}

#[test]
fn acceptor_reports_bad_files() {
    let certs = Certs::new();
    let missing = certs.path("missing.pem");
    let err = aihub_mock_upstream::acceptor(&missing, &certs.path("server.key"), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.pem"), "{err}");
    // The CA's certificate with the server's key: they do not match.
    let err = aihub_mock_upstream::acceptor(&certs.path("ca.pem"), &certs.path("server.key"), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("server.key: not usable with"), "{err}");
    let err = aihub_mock_upstream::acceptor(
        &certs.path("server.pem"),
        &certs.path("server.key"),
        Some(&certs.path("server.key")),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("server.key"), "{err}");
}
