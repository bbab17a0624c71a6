//! Black-box protocol abuse of the gateway's and the admin API's listeners (issue 21): framing
//! ambiguities (`Content-Length` against `Transfer-Encoding`), obs-fold, oversized and too many
//! headers, malformed chunk sizes, pipelining, HTTP/1.0, `Expect` abuse, slowloris and idle
//! connections (closed by the header and idle deadlines). Each gets a clean 4xx or a closed
//! connection, nothing reaches the upstream that should not, and a normal request is served
//! afterwards. Raw TCP over loopback against the real `aihub` processes. A client that stops
//! reading mid-stream is tested in `hardening.rs`; the same at scale in `loadtests/abuse-bench.sh`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::admin::Admin;
use common::*;

/// One response read off a raw connection.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// Asserts an OpenAI-shaped error body with `code`.
    fn openai_error(&self, code: &str) {
        let v: serde_json::Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("{e}: not JSON: {}{}", self.head, self.body));
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert!(v["error"]["type"].as_str().is_some());
    }
}

/// What came back on a connection: the responses in order, and whether the server closed it.
#[derive(Debug)]
struct Exchange {
    answers: Vec<Answer>,
    closed: bool,
}

impl Exchange {
    fn statuses(&self) -> Vec<u16> {
        self.answers.iter().map(|a| a.status).collect()
    }
}

/// Parses whole responses (Content-Length or chunked bodies) from `raw`.
fn parse(raw: &[u8]) -> Vec<Answer> {
    let text = String::from_utf8_lossy(raw).into_owned();
    let mut rest = text.as_str();
    let mut out = Vec::new();
    while let Some((head, after)) = rest.split_once("\r\n\r\n") {
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let mut a = Answer {
            status,
            head: head.to_owned(),
            body: String::new(),
        };
        if (100..200).contains(&status) {
            rest = after;
            out.push(a);
            continue;
        }
        if let Some(len) = a
            .header("content-length")
            .and_then(|l| l.parse::<usize>().ok())
        {
            let len = len.min(after.len());
            a.body = after[..len].to_owned();
            rest = &after[len..];
        } else if a
            .header("transfer-encoding")
            .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
        {
            let mut r = after;
            while let Some((size, tail)) = r.split_once("\r\n") {
                let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                a.body.push_str(&tail[..n.min(tail.len())]);
                r = tail.get(n + 2..).unwrap_or("");
                if n == 0 {
                    break;
                }
            }
            rest = r;
        } else {
            rest = "";
        }
        out.push(a);
    }
    out
}

/// Writes `request` in one write and reads until the server closes the connection or `wait`
/// passes without a byte.
fn exchange(addr: SocketAddr, request: &[u8], wait: Duration) -> Exchange {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(request).unwrap();
    read_all(&mut s, wait)
}

fn read_all(s: &mut TcpStream, wait: Duration) -> Exchange {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    Exchange {
        answers: parse(&raw),
        closed,
    }
}

/// A POST head with `extra` header lines (each ending in CRLF), without the blank line.
fn head(path: &str, key: &str, extra: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n{extra}")
}

fn chat_body() -> String {
    serde_json::to_string(&chat("mock-gpt")).unwrap()
}

fn chunked(body: &str) -> String {
    format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len())
}

struct Setup {
    gw: Gateway,
    mock: Mock,
    key: TestKey,
}

const WAIT: Duration = Duration::from_secs(3);
const CHAT_PATH: &str = "POST /v1/chat/completions";

fn gateway(server_extra: &[&str]) -> Setup {
    let mock = Mock::start(&[]);
    let key = key("abuse", &[]);
    let body = config(
        &[upstream("m", &[mock.base_url()], &[])],
        &[("mock-gpt", "m", None)],
        &[&key],
    );
    let gw = Gateway::start(&body, server_extra);
    Setup { gw, mock, key }
}

impl Setup {
    /// A normal request is still served, and the upstream saw `upstream` chat requests in all.
    async fn still_serves(&self, upstream: u64) {
        assert_eq!(
            self.gw
                .chat(&self.key.key, &chat("mock-gpt"))
                .await
                .status(),
            200
        );
        assert_eq!(self.mock.received(CHAT_PATH).await, upstream + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_refuses_ambiguous_framing() {
    let s = gateway(&[]);
    let (k, body) = (&s.key.key, chat_body());
    let smuggled = "GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n";
    // Two different lengths, a list that does not end in `chunked`, an unknown coding, a
    // `Transfer-Encoding` in HTTP/1.0: 400, connection closed, nothing forwarded.
    let cases = [
        head("/v1/chat/completions", k, "Content-Length: 5\r\n")
            + &format!("Content-Length: {}\r\n\r\n{body}", body.len()),
        head("/v1/chat/completions", k, "")
            + &format!(
                "Content-Length: {0}, {1}\r\n\r\n{body}",
                body.len(),
                body.len() + 1
            ),
        head(
            "/v1/chat/completions",
            k,
            "Transfer-Encoding: chunked, identity\r\n\r\n",
        ) + &chunked(&body),
        head(
            "/v1/chat/completions",
            k,
            "Transfer-Encoding: xchunked\r\n\r\n",
        ) + &chunked(&body),
        head(
            "/v1/chat/completions",
            k,
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n",
        ) + &chunked(&body),
        head(
            "/v1/chat/completions",
            k,
            "Transfer-Encoding: chunked\r\n\r\n",
        )
        .replace("HTTP/1.1", "HTTP/1.0")
            + &chunked(&body),
    ];
    for request in cases {
        let x = exchange(s.gw.addr, (request.clone() + smuggled).as_bytes(), WAIT);
        assert_eq!(x.statuses(), [400], "{request}\n{x:?}");
        assert!(x.closed, "{request}: connection left open");
    }
    // Both a length and `chunked`: the body is read as chunked (RFC 9112 §6.3), the request is
    // served and the connection closed: what follows is never read as a request.
    let request = head("/v1/chat/completions", k, "Content-Length: 3\r\n")
        + "Transfer-Encoding: chunked\r\n\r\n"
        + &chunked(&body)
        + smuggled;
    let x = exchange(s.gw.addr, request.as_bytes(), WAIT);
    assert_eq!(x.statuses(), [200], "{x:?}");
    assert!(x.closed, "connection left open after CL+TE");
    assert_eq!(s.mock.received(CHAT_PATH).await, 1);
    s.still_serves(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_refuses_malformed_headers_and_chunks() {
    let s = gateway(&[]);
    let (k, body) = (&s.key.key, chat_body());
    let long = format!("X-Long: {}\r\n", "a".repeat(1_100_000));
    let many: String = (0..300).map(|i| format!("X-H{i}: v\r\n")).collect();
    let len = format!("Content-Length: {}\r\n\r\n{body}", body.len());
    // obs-fold, a header line over 1 MB, 300 header lines: 400 (pingora's, no body) and closed.
    for (what, request) in [
        (
            "obs-fold",
            head("/v1/chat/completions", k, "X-Folded: a\r\n  b\r\n") + &len,
        ),
        ("oversized", head("/v1/chat/completions", k, &long) + &len),
        ("too many", head("/v1/chat/completions", k, &many) + &len),
    ] {
        let x = exchange(s.gw.addr, request.as_bytes(), WAIT);
        assert_eq!(x.statuses(), [400], "{what}: {x:?}");
        assert!(x.closed, "{what}: connection left open");
    }
    // Chunk sizes that are not hex, overflow, are negative, or data without its CRLF: 400
    // `invalid_body` and the connection closed, nothing forwarded.
    let te = head(
        "/v1/chat/completions",
        k,
        "Transfer-Encoding: chunked\r\n\r\n",
    );
    for (what, chunks) in [
        ("not hex", format!("zz\r\n{body}\r\n0\r\n\r\n")),
        (
            "overflow",
            format!("1{}\r\n{body}\r\n0\r\n\r\n", "0".repeat(20)),
        ),
        (
            "negative",
            format!("-{:x}\r\n{body}\r\n0\r\n\r\n", body.len()),
        ),
        ("no CRLF", format!("{:x}\r\n{body}XX0\r\n\r\n", body.len())),
    ] {
        let x = exchange(s.gw.addr, (te.clone() + &chunks).as_bytes(), WAIT);
        assert_eq!(x.statuses(), [400], "{what}: {x:?}");
        x.answers[0].openai_error("invalid_body");
        assert!(x.closed, "{what}: connection left open");
    }
    assert_eq!(s.mock.received(CHAT_PATH).await, 0);
    s.still_serves(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_answers_pipelined_requests_in_order_without_smuggling() {
    let s = gateway(&[]);
    let (k, body) = (&s.key.key, chat_body());
    let authorised = head("/v1/chat/completions", k, "")
        + &format!("Content-Length: {}\r\n\r\n{body}", body.len());
    let anonymous = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let models = format!("GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {k}\r\n\r\n");
    // Three requests in one write: pingora reads past the first and then closes the connection
    // after answering it (it does not pipeline); the one without a key is never served.
    let x = exchange(
        s.gw.addr,
        format!("{authorised}{anonymous}{models}").as_bytes(),
        WAIT,
    );
    assert_eq!(x.statuses(), [200], "{x:?}");
    assert!(x.closed, "{x:?}");
    // Two chat requests in one write: the first served, the second never read.
    let x = exchange(
        s.gw.addr,
        format!("{authorised}{authorised}").as_bytes(),
        WAIT,
    );
    assert_eq!(x.statuses(), [200], "{x:?}");
    assert!(x.closed, "{x:?}");
    assert_eq!(s.mock.received(CHAT_PATH).await, 2);
    s.still_serves(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_serves_http_1_0_and_refuses_unmet_expectations() {
    let s = gateway(&["request_body_timeout: 1s"]);
    let (k, body) = (&s.key.key, chat_body());
    let len = format!("Content-Length: {}\r\n", body.len());
    // HTTP/1.0 without keep-alive: answered, then closed.
    let v10 = head("/v1/chat/completions", k, &len).replace("HTTP/1.1", "HTTP/1.0");
    let x = exchange(s.gw.addr, format!("{v10}\r\n{body}").as_bytes(), WAIT);
    assert_eq!(x.statuses(), [200], "{x:?}");
    assert!(x.closed);
    // With keep-alive: two requests on one connection.
    let ka = format!("{v10}Connection: keep-alive\r\n\r\n{body}");
    let mut c = TcpStream::connect(s.gw.addr).unwrap();
    c.write_all(ka.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    c.write_all(ka.as_bytes()).unwrap();
    let x = read_all(&mut c, Duration::from_millis(500));
    assert_eq!(x.statuses(), [200, 200], "{x:?}");
    assert!(!x.closed, "HTTP/1.0 keep-alive honoured");
    // `Expect: 100-continue` and then no body: invited, then 408 at the body deadline.
    let started = Instant::now();
    let request = head("/v1/chat/completions", k, &len) + "Expect: 100-continue\r\n\r\n";
    let x = exchange(s.gw.addr, request.as_bytes(), WAIT);
    assert_eq!(x.statuses(), [100, 408], "{x:?}");
    x.answers[1].openai_error("request_timeout");
    assert!(started.elapsed() < Duration::from_secs(3));
    // An expectation other than `100-continue` cannot be met: 417, nothing forwarded, and the
    // connection closed (the body that followed is not read).
    let request = head("/v1/chat/completions", k, &len) + "Expect: 200-ok\r\n\r\n" + &body;
    let x = exchange(s.gw.addr, request.as_bytes(), Duration::from_millis(500));
    assert_eq!(x.statuses(), [417], "{x:?}");
    x.answers[0].openai_error("expectation_failed");
    assert!(x.closed, "connection left open after a 417");
    assert_eq!(s.mock.received(CHAT_PATH).await, 3);
    s.still_serves(3).await;
}

/// Sends `bytes` one at a time, `every` apart, until the server closes the connection; how
/// long it stayed open and how many bytes went out.
fn trickle(addr: SocketAddr, bytes: &[u8], every: Duration) -> (Duration, usize) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(every)).unwrap();
    let started = Instant::now();
    for (i, b) in bytes.iter().enumerate() {
        if s.write_all(&[*b]).is_err() {
            return (started.elapsed(), i);
        }
        match s.read(&mut [0u8; 1024]) {
            Ok(0) => return (started.elapsed(), i + 1),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return (started.elapsed(), i + 1)
            }
            _ => {}
        }
    }
    panic!("the connection outlived {} bytes", bytes.len());
}

/// How long the server takes to close a connection on which nothing more is sent.
fn closed_after(s: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let x = read_all(s, limit);
    assert!(x.closed, "still open after {limit:?}: {x:?}");
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_closes_slow_headers_and_idle_connections() {
    let s = gateway(&["header_read_timeout: 1s", "idle_timeout: 2s"]);
    let header = format!(
        "{}X-Slow: {}",
        head("/v1/chat/completions", &s.key.key, ""),
        "a".repeat(100)
    );
    // Slowloris, one byte every 200 ms: closed at the header deadline, counted from the first
    // byte (pingora alone bounds each read, 60 s, never the whole header).
    let (open, sent) = trickle(s.gw.addr, header.as_bytes(), Duration::from_millis(200));
    assert!(
        open >= Duration::from_millis(900) && open < Duration::from_secs(3),
        "open {open:?}, {sent} bytes"
    );
    // A connection that never sends a byte: closed at the idle deadline.
    let mut idle = TcpStream::connect(s.gw.addr).unwrap();
    let waited = closed_after(&mut idle, Duration::from_secs(6));
    assert!(waited >= Duration::from_millis(1900), "{waited:?}");
    // Kept alive after a response, then silent: closed at the idle deadline too (pingora alone
    // would wait for the next request forever).
    let body = chat_body();
    let mut kept = TcpStream::connect(s.gw.addr).unwrap();
    let request = head("/v1/chat/completions", &s.key.key, "")
        + &format!("Content-Length: {}\r\n\r\n{body}", body.len());
    kept.write_all(request.as_bytes()).unwrap();
    kept.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = vec![0u8; 65536];
    let n = kept.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let waited = closed_after(&mut kept, Duration::from_secs(6));
    assert!(waited >= Duration::from_millis(1500), "{waited:?}");
    // A slow but steady body is the body deadline's business, not the header's: served.
    let mut slow_body = TcpStream::connect(s.gw.addr).unwrap();
    slow_body
        .write_all(
            request
                .split_inclusive("\r\n\r\n")
                .next()
                .unwrap()
                .as_bytes(),
        )
        .unwrap();
    for part in body.as_bytes().chunks(body.len() / 3 + 1) {
        std::thread::sleep(Duration::from_millis(600));
        slow_body.write_all(part).unwrap();
    }
    let x = read_all(&mut slow_body, Duration::from_millis(500));
    assert_eq!(x.statuses(), [200], "{x:?}");
    assert_eq!(s.mock.received(CHAT_PATH).await, 2);
    s.still_serves(2).await;
}

/// The admin API on SQLite with short deadlines.
fn admin(dir: &tempfile::TempDir) -> (Admin, SocketAddr) {
    let db = format!("sqlite://{}", dir.path().join("admin.db").display());
    let admin = Admin::start(
        &db,
        "server: {header_read_timeout: 1s, body_read_timeout: 1s}\n",
    );
    let addr = admin.base.trim_start_matches("http://").parse().unwrap();
    (admin, addr)
}

fn admin_post(path: &str, extra: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_refuses_framing_and_header_abuse() {
    let dir = tempfile::tempdir().unwrap();
    let (admin, addr) = admin(&dir);
    let body = r#"{"email":"nobody@aihub.test","password":"wrong password here"}"#;
    let login = "/developer/login";
    let smuggled = "GET /developer/me HTTP/1.1\r\nHost: x\r\n\r\n";
    let long = format!("X-Long: {}\r\n", "a".repeat(1_100_000));
    let many: String = (0..300).map(|i| format!("X-H{i}: v\r\n")).collect();
    let len = format!("Content-Length: {}\r\n\r\n{body}", body.len());
    for (what, request) in [
        (
            "two lengths",
            admin_post(login, "Content-Length: 5\r\n") + &len,
        ),
        (
            "chunked, identity",
            admin_post(login, "Transfer-Encoding: chunked, identity\r\n\r\n") + &chunked(body),
        ),
        (
            "unknown coding",
            admin_post(login, "Transfer-Encoding: xchunked\r\n\r\n") + &chunked(body),
        ),
        (
            "obs-fold",
            admin_post(login, "X-Folded: a\r\n  b\r\n") + &len,
        ),
        ("oversized", admin_post(login, &long) + &len),
        ("too many", admin_post(login, &many) + &len),
        (
            "not hex",
            admin_post(login, "Transfer-Encoding: chunked\r\n\r\n")
                + &format!("zz\r\n{body}\r\n0\r\n\r\n"),
        ),
        (
            "overflow",
            admin_post(login, "Transfer-Encoding: chunked\r\n\r\n")
                + &format!("1{}\r\n{body}\r\n0\r\n\r\n", "0".repeat(20)),
        ),
        (
            "negative",
            admin_post(login, "Transfer-Encoding: chunked\r\n\r\n")
                + &format!("-{:x}\r\n{body}\r\n0\r\n\r\n", body.len()),
        ),
        (
            "no CRLF",
            admin_post(login, "Transfer-Encoding: chunked\r\n\r\n")
                + &format!("{:x}\r\n{body}XX0\r\n\r\n", body.len()),
        ),
    ] {
        let x = exchange(addr, (request + smuggled).as_bytes(), WAIT);
        let st = x.statuses();
        assert!(st.is_empty() || st[0] / 100 == 4, "{what}: {x:?}");
        assert!(!st.contains(&200), "{what}: {x:?}");
        assert!(
            st.len() <= 1 && x.closed,
            "{what}: the connection went on: {x:?}"
        );
    }
    // Both a length and `chunked`: read as chunked, answered, connection closed.
    let request = admin_post(
        login,
        "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    ) + &chunked(body)
        + smuggled;
    let x = exchange(addr, request.as_bytes(), WAIT);
    assert_eq!(x.statuses().len(), 1, "{x:?}");
    assert!(x.closed, "{x:?}");
    assert_eq!(
        client()
            .get(format!("{}/readyz", admin.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_pipelining_http_1_0_expect_and_deadlines() {
    let dir = tempfile::tempdir().unwrap();
    let (admin, addr) = admin(&dir);
    // Pipelined: in order, the unauthenticated one refused.
    let me = "GET /developer/me HTTP/1.1\r\nHost: x\r\n\r\n";
    let ready = "GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n";
    let x = exchange(
        addr,
        format!("{ready}{me}{ready}").as_bytes(),
        Duration::from_millis(500),
    );
    assert_eq!(x.statuses(), [200, 401, 200], "{x:?}");
    // HTTP/1.0: closed after the answer unless kept alive.
    let x = exchange(addr, b"GET /readyz HTTP/1.0\r\n\r\n", WAIT);
    assert_eq!(x.statuses(), [200], "{x:?}");
    assert!(x.closed);
    let x = exchange(
        addr,
        b"GET /readyz HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /readyz HTTP/1.0\r\n\r\n",
        WAIT,
    );
    assert_eq!(x.statuses(), [200, 200], "{x:?}");
    assert!(x.closed);
    // Expect without a body: a 408 at the body deadline (or closed), never a hang.
    let body = r#"{"email":"nobody@aihub.test","password":"wrong password here"}"#;
    let started = Instant::now();
    let request = admin_post(
        "/developer/login",
        &format!(
            "Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            body.len()
        ),
    );
    let x = exchange(addr, request.as_bytes(), WAIT);
    assert!(x.closed, "{x:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(x.statuses().iter().all(|&c| c == 100 || c == 408), "{x:?}");
    // Slowloris and an idle connection: closed at the header deadline.
    let header = format!(
        "{}X-Slow: {}",
        admin_post("/developer/login", ""),
        "a".repeat(100)
    );
    let (open, _) = trickle(addr, header.as_bytes(), Duration::from_millis(200));
    assert!(open < Duration::from_secs(3), "{open:?}");
    let mut idle = TcpStream::connect(addr).unwrap();
    assert!(closed_after(&mut idle, Duration::from_secs(4)) >= Duration::from_millis(900));
    assert_eq!(
        client()
            .get(format!("{}/readyz", admin.base))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}
