//! The admin listener's front, black-box: HTTPS with the test CA's certificate, swapped on
//! SIGHUP (a bad file keeps the old one serving), a client that never finishes its handshake is
//! cut at the header deadline; the client address behind trusted proxies (X-Forwarded-For and
//! PROXY protocol v1/v2) feeds the per-IP throttle, and the same headers from a peer that is
//! not trusted change nothing.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::admin::{Admin, PASSWORD};
use common::tls::Ca;
use common::*;
use serde_json::json;

fn sqlite(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}", dir.path().join("admin.db").display())
}

/// The address part of `https://127.0.0.1:P`.
fn addr_of(base: &str) -> std::net::SocketAddr {
    base.rsplit("://").next().unwrap().parse().unwrap()
}

async fn ready_with(client: &reqwest::Client, base: &str) -> Result<u16, reqwest::Error> {
    Ok(client
        .get(format!("{base}/readyz"))
        .send()
        .await?
        .status()
        .as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_certificate_swapped_on_sighup() {
    let first = Ca::new();
    let second = Ca::new();
    let live = tempfile::tempdir().unwrap();
    let (cert, key) = (live.path().join("tls.crt"), live.path().join("tls.key"));
    std::fs::copy(first.file("server.crt"), &cert).unwrap();
    std::fs::copy(first.file("server.key"), &key).unwrap();
    let db = tempfile::tempdir().unwrap();
    let admin = Admin::start(
        &sqlite(&db),
        &format!(
            "server: {{header_read_timeout: 1s, tls: {{cert_file: \"{}\", key_file: \"{}\"}}}}\n",
            cert.display(),
            key.display()
        ),
    );
    assert!(admin.base.starts_with("https://"), "{}", admin.base);
    assert_eq!(ready_with(&first.client(), &admin.base).await.unwrap(), 200);
    assert!(ready_with(&second.client(), &admin.base).await.is_err());
    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = admin.base.replace("https://", "http://");
    assert!(client()
        .get(format!("{plain}/readyz"))
        .send()
        .await
        .is_err());

    // A handshake that never starts is cut at the header deadline (1 s).
    let mut idle = TcpStream::connect(addr_of(&admin.base)).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let started = Instant::now();
    let n = idle.read(&mut [0u8; 16]).unwrap_or(0);
    assert_eq!(n, 0, "closed without a byte");
    assert!(started.elapsed() < Duration::from_secs(4));

    // A broken file on SIGHUP: refused, the first certificate keeps serving.
    std::fs::write(&cert, "not a certificate").unwrap();
    signal(admin.pid(), "HUP");
    let log = wait_log(&admin, "admin certificate reload rejected").await;
    assert!(
        log.contains("server.tls.cert_file"),
        "{}",
        last_lines(&log, 5)
    );
    assert_eq!(ready_with(&first.client(), &admin.base).await.unwrap(), 200);

    // The second CA's pair: new connections present it.
    std::fs::copy(second.file("server.crt"), &cert).unwrap();
    std::fs::copy(second.file("server.key"), &key).unwrap();
    signal(admin.pid(), "HUP");
    wait_log(&admin, "admin listener certificate reloaded").await;
    assert_eq!(
        ready_with(&second.client(), &admin.base).await.unwrap(),
        200
    );
    assert!(ready_with(&first.client(), &admin.base).await.is_err());
}

async fn wait_log(admin: &Admin, needle: &str) -> String {
    for _ in 0..200 {
        let log = std::fs::read_to_string(&admin.log).unwrap_or_default();
        if log.contains(needle) {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no `{needle}` in the admin log");
}

/// An admin whose per-IP budget is two login attempts a minute.
fn throttled_admin(db: &tempfile::TempDir, server: &str) -> Admin {
    Admin::start(
        &sqlite(db),
        &format!(
            "auth: {{argon2_memory_kib: 8192, argon2_iterations: 1, attempts_per_ip_per_minute: 2}}\n\
             server: {server}\n"
        ),
    )
}

/// A failed login as `n`-th distinct account from a client that says it is `xff`.
async fn login_as(admin: &Admin, n: u32, xff: &str) -> u16 {
    client()
        .post(format!("{}/developer/login", admin.base))
        .header("x-forwarded-for", xff)
        .json(&json!({"email": format!("u{n}@aihub.test"), "password": PASSWORD}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    // Behind a trusted proxy (loopback): each client has its own budget, and the hops the
    // client itself wrote (left of the proxy's entry) are ignored.
    let db = tempfile::tempdir().unwrap();
    let admin = throttled_admin(&db, "{trusted_proxies: [\"127.0.0.0/8\"]}");
    assert_eq!(login_as(&admin, 1, "203.0.113.1").await, 401);
    assert_eq!(login_as(&admin, 2, "198.18.0.9, 203.0.113.1").await, 401);
    assert_eq!(login_as(&admin, 3, "203.0.113.1").await, 429);
    assert_eq!(login_as(&admin, 4, "203.0.113.2").await, 401);
    assert_eq!(login_as(&admin, 5, "203.0.113.1, 127.0.0.1").await, 429);

    // Nobody trusted: a client changing its X-Forwarded-For gains nothing.
    let db = tempfile::tempdir().unwrap();
    let admin = throttled_admin(&db, "{}");
    assert_eq!(login_as(&admin, 1, "203.0.113.1").await, 401);
    assert_eq!(login_as(&admin, 2, "203.0.113.2").await, 401);
    assert_eq!(login_as(&admin, 3, "203.0.113.3").await, 429);
}

/// A login attempt on a fresh connection starting with `header`; the status, or `None` when
/// the connection closed without an answer.
fn raw_login(admin: &Admin, header: &[u8], n: u32) -> Option<u16> {
    let body = json!({"email": format!("p{n}@aihub.test"), "password": PASSWORD}).to_string();
    let mut s = TcpStream::connect(addr_of(&admin.base)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut req = header.to_vec();
    req.extend(
        format!(
            "POST /developer/login HTTP/1.1\r\nHost: admin\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    if s.write_all(&req).is_err() {
        return None;
    }
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .map(|code| code.parse().unwrap())
}

fn v2_header(src: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend([0x21, 0x11, 0, 12]);
    h.extend(src);
    h.extend([127, 0, 0, 1]);
    h.extend(port.to_be_bytes());
    h.extend(80u16.to_be_bytes());
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_names_the_client_for_trusted_balancers_only() {
    let db = tempfile::tempdir().unwrap();
    let admin = throttled_admin(
        &db,
        "{proxy_protocol: true, trusted_proxies: [\"127.0.0.1\"]}",
    );
    let v1 = |ip: &str| format!("PROXY TCP4 {ip} 127.0.0.1 40000 80\r\n").into_bytes();
    assert_eq!(raw_login(&admin, &v1("198.51.100.7"), 1), Some(401));
    assert_eq!(
        raw_login(&admin, &v2_header([198, 51, 100, 7], 40001), 2),
        Some(401)
    );
    assert_eq!(raw_login(&admin, &v1("198.51.100.7"), 3), Some(429));
    assert_eq!(raw_login(&admin, &v1("198.51.100.8"), 4), Some(401));
    // No header, or a malformed one: closed without an answer.
    assert_eq!(raw_login(&admin, b"", 5), None);
    assert_eq!(raw_login(&admin, b"PROXY TCP4 1.2.3.4\r\n", 6), None);

    // A PROXY header from a peer outside trusted_proxies is never believed.
    let db = tempfile::tempdir().unwrap();
    let admin = throttled_admin(
        &db,
        "{proxy_protocol: true, trusted_proxies: [\"10.0.0.0/8\"]}",
    );
    assert_eq!(raw_login(&admin, &v1("198.51.100.7"), 1), None);

    // The configuration refuses PROXY without anybody to trust.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("admin.yaml");
    write(
        &file,
        &format!(
            "database: {{url: \"{}\"}}\nserver: {{proxy_protocol: true}}\n",
            sqlite(&db)
        ),
    );
    let out = std::process::Command::new(BIN)
        .args([
            "migrate",
            "--config",
            "/nonexistent/gateway.yaml",
            "--admin-config",
        ])
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("server.proxy_protocol") && stderr.contains("trusted_proxies"),
        "{stderr}"
    );
}
