//! Black-box tests of the gateway's side of batches and files (issue 17): the real gateway
//! binary following a real control-plane SQLite database (keys and the internal secret written
//! through `aihub-store`, as the admin API writes them), the mock upstream, real ClickHouse.
//!
//! - Batch items arrive with a batch token signed with the internal secret instead of the key:
//!   metered once per item (its request id is fixed by the item) at the batch price, refused
//!   exactly as a live request of their key would be, except by its IP allowlist.
//! - `/v1/files…` and `/v1/batches…` are forwarded to the admin API's internal routes with the
//!   caller's identity signed (a loopback listener stands in for the admin API here); without
//!   `admin_url`, without the secret or without an admin API, they answer OpenAI-shaped errors.

mod common;

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aihub_apikey::internal::{self, BatchToken, Identity, InternalSecret};
use aihub_store::testing::{Backend, TestDatabase};
use aihub_store::Store;
use common::*;
use rust_decimal::Decimal;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const WAIT: Duration = Duration::from_secs(20);

/// A migrated control-plane database with a developer, and the internal secret (stored when
/// `stored`, as the admin API's first start does).
struct ControlPlane {
    db: TestDatabase,
    store: Store,
    secret: InternalSecret,
    secret_text: String,
    dev: String,
}

async fn control_plane(stored: bool) -> ControlPlane {
    let db = TestDatabase::new(Backend::Sqlite).await;
    let store = db.store().await;
    let email = format!("{}@example.com", aihub_store::new_id("dev"));
    let dev = aihub_store::testing::developer(&store, &email).await.id;
    let secret_text = InternalSecret::generate_text();
    if stored {
        aihub_store::settings::get_or_init(&store, internal::SETTING, &secret_text)
            .await
            .unwrap();
    }
    ControlPlane {
        secret: InternalSecret::new(&secret_text).unwrap(),
        secret_text,
        db,
        store,
        dev,
    }
}

/// A batch token for item `line` of `task`, valid for `ttl_ms` (negative: expired).
fn token(secret: &InternalSecret, key: &str, task: &str, line: u64, ttl_ms: i64) -> String {
    secret.batch_token(&BatchToken {
        key_hash: aihub_apikey::KeyHash::of(key),
        task_id: task.into(),
        line,
        expires_at_ms: aihub_store::now_ms() + ttl_ms,
    })
}

/// A gateway routing `gpt-4o` to `mock`, keys from `cp`, with `cp_extra` lines in its
/// `control_plane:` section and `extra` sections.
fn gateway(mock: &Mock, cp: &ControlPlane, cp_extra: &[&str], extra: &str) -> Gateway {
    let body = format!(
        "{}{}{extra}",
        config(
            &[upstream("m", &[mock.base_url()], &[])],
            &[("gpt-4o", "m", None)],
            &[]
        ),
        control_plane_yaml(&cp.db.url, cp_extra),
    );
    Gateway::start(&body, &[])
}

fn control_plane_yaml(url: &str, extra: &[&str]) -> String {
    common::control_plane(url, extra)
}

fn request_id(r: &reqwest::Response) -> String {
    r.headers()["x-request-id"].to_str().unwrap().to_owned()
}

/// How many requests the gateway sent to the upstream `m`.
fn upstream_calls(gw: &Gateway) -> f64 {
    gw.metric("aihub_upstream_latency_seconds_count{upstream=\"m\"}")
}

fn nanos(usd: Decimal) -> i128 {
    (usd * Decimal::from(1_000_000_000))
        .round()
        .try_into()
        .unwrap()
}

/// The seed price of gpt-4o: USD 0.015 per 1K tokens.
fn gpt_4o(tokens: u64) -> Decimal {
    Decimal::from_str("0.015").unwrap() / Decimal::from(1000) * Decimal::from(tokens)
}

async fn total_tokens(r: reqwest::Response) -> u64 {
    let v: serde_json::Value = r.json().await.unwrap();
    v["usage"]["total_tokens"].as_u64().unwrap()
}

#[tokio::test]
async fn a_batch_item_is_metered_once_at_the_batch_price() {
    let cp = control_plane(true).await;
    let (key, key_id) = create_key(&cp.store, &cp.dev, &[]).await;
    let ch = TestDb::new();
    let wal = tempfile::tempdir().unwrap();
    let mock = Mock::start(&[]);
    let gw = gateway(&mock, &cp, &[], &ch.metering_yaml(wal.path(), &[]));

    let live = gw.chat(&key, &chat("gpt-4o")).await;
    assert_eq!(live.status(), 200);
    let live_id = request_id(&live);
    let live_tokens = total_tokens(live).await;

    // The same item sent twice (a worker takeover): the same request id both times.
    let item = token(&cp.secret, &key, "batch_abc", 3, 60_000);
    let item_id = internal::item_request_id("batch_abc", 3).to_string();
    let mut item_tokens = 0;
    for _ in 0..2 {
        let r = gw.chat(&item, &chat("gpt-4o")).await;
        assert_eq!(r.status(), 200, "{}", gw.log_text());
        assert_eq!(request_id(&r), item_id);
        item_tokens = total_tokens(r).await;
    }
    assert_eq!(
        gw.metric_eventually("aihub_batch_item_requests_total{status=\"200\"}", 2.0),
        2.0
    );
    // A live request after both: once its row is in, both items went through the sender.
    let marker = gw.chat(&key, &chat("gpt-4o")).await;
    let marker_id = request_id(&marker);
    marker.bytes().await.unwrap();
    let n = ch
        .wait_for(
            &format!("SELECT count() FROM usage_events WHERE request_id = toUUID('{marker_id}')"),
            1,
            WAIT,
        )
        .await;
    assert_eq!(n, 1);
    assert_eq!(
        gw.metric_eventually("aihub_usage_batch_duplicates_skipped_total", 1.0),
        1.0
    );

    let rows = ch
        .query(
            "SELECT toString(request_id), batch_id, key_id, total_tokens, cost_nanos, status \
             FROM usage_events WHERE batch_id != '' FORMAT TSV",
        )
        .await;
    let expected_cost = nanos(gpt_4o(item_tokens) / Decimal::from(2));
    assert_eq!(
        rows,
        format!("{item_id}\tbatch_abc\t{key_id}\t{item_tokens}\t{expected_cost}\t200\n"),
        "one row for the item, at half price"
    );
    let live_row = ch
        .query(&format!(
            "SELECT batch_id, cost_nanos FROM usage_events \
             WHERE request_id = toUUID('{live_id}') FORMAT TSV"
        ))
        .await;
    let live_cost = nanos(gpt_4o(live_tokens));
    assert_eq!(live_row, format!("\t{live_cost}\n"));
    if live_tokens == item_tokens {
        assert_eq!(live_cost, 2 * expected_cost);
    }
    assert_eq!(
        ch.number("SELECT count() FROM usage_events").await,
        3,
        "live, item, marker"
    );
}

#[tokio::test]
async fn batch_tokens_are_refused_as_their_key_would_be_except_by_its_ip_allowlist() {
    let cp = control_plane(true).await;
    // Only 10.9.9.9 may use this key: the tests run from 127.0.0.1.
    let (fenced, _) = create_key(&cp.store, &cp.dev, &["10.9.9.9"]).await;
    let (key, key_id) = create_key(&cp.store, &cp.dev, &[]).await;
    let mock = Mock::start(&[]);
    let gw = gateway(&mock, &cp, &[], "");

    expect_error(
        gw.chat(&fenced, &chat("gpt-4o")).await,
        403,
        "ip_not_allowed",
    )
    .await;
    let r = gw
        .chat(
            &token(&cp.secret, &fenced, "batch_ip", 1, 60_000),
            &chat("gpt-4o"),
        )
        .await;
    assert_eq!(
        r.status(),
        200,
        "the allowlist was checked when the batch was created"
    );

    let good = token(&cp.secret, &key, "batch_x", 1, 60_000);
    let calls = upstream_calls(&gw);
    let foreign = InternalSecret::new(&InternalSecret::generate_text()).unwrap();
    let refused = [
        ("expired", token(&cp.secret, &key, "batch_x", 1, -1)),
        ("tampered", good.replacen(".1.", ".2.", 1)),
        (
            "another secret",
            token(&foreign, &key, "batch_x", 1, 60_000),
        ),
        ("malformed", "aihub-batch.nope".to_owned()),
    ];
    for (what, t) in &refused {
        let e = expect_error(gw.chat(t, &chat("gpt-4o")).await, 401, "invalid_api_key").await;
        assert!(!e.to_string().contains("aihub-batch"), "{what}: {e}");
    }
    // Model calls only: not the model list, not files or batches.
    expect_error(gw.get(&good, "/v1/models").await, 401, "invalid_api_key").await;
    expect_error(gw.get(&good, "/v1/files").await, 401, "invalid_api_key").await;
    let r = gw.post(&good, "/v1/batches").send().await.unwrap();
    expect_error(r, 401, "invalid_api_key").await;
    assert_eq!(
        upstream_calls(&gw),
        calls,
        "nothing refused reached the upstream"
    );
    assert_eq!(
        gw.metric_eventually("aihub_auth_failures_total{reason=\"batch_token\"}", 4.0),
        4.0
    );
    assert_eq!(
        gw.metric("aihub_auth_failures_total{reason=\"batch_token_not_accepted\"}"),
        3.0
    );

    // The key revoked: its items fail as its live requests do, before any upstream call.
    assert_eq!(gw.chat(&good, &chat("gpt-4o")).await.status(), 200);
    let calls = upstream_calls(&gw);
    let mut tx = cp.store.begin_write().await.unwrap();
    aihub_store::keys::revoke(&mut tx, None, &key_id)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.get(&key, "/v1/models").await.status() != 401 {
        assert!(Instant::now() < deadline, "revocation never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = gw.chat(&good, &chat("gpt-4o")).await;
    // A refused attempt carries a request id of its own: only an answered attempt has the
    // item's (one usage row per request id).
    assert_ne!(
        request_id(&r),
        internal::item_request_id("batch_x", 1).to_string()
    );
    expect_error(r, 401, "invalid_api_key").await;
    assert_eq!(upstream_calls(&gw), calls);
    assert_eq!(
        gw.metric_eventually("aihub_batch_item_requests_total{status=\"401\"}", 1.0),
        1.0
    );
}

#[tokio::test]
async fn an_exhausted_quota_refuses_batch_items() {
    let cp = control_plane(true).await;
    let (key, _) = create_key(&cp.store, &cp.dev, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    // The developer's plan (`free`, as registered) with a hard-stop quota of 60 tokens.
    let plans = dir.path().join("plans.yaml");
    write(
        &plans,
        "default_plan: free\nplans:\n  free:\n    included_tokens: 60\n    overage: false\n",
    );
    let limits = format!("limits:\n  plans_file: \"{}\"\n", plans.display());
    let mock = Mock::start(&[]);
    let gw = gateway(&mock, &cp, &[], &limits);

    let mut served = 0;
    loop {
        let r = gw.chat(&key, &chat("gpt-4o")).await;
        if r.status() == 429 {
            expect_error(r, 429, "insufficient_quota").await;
            break;
        }
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        served += 1;
        assert!(served < 100, "never refused");
    }
    let item = token(&cp.secret, &key, "batch_q", 1, 60_000);
    let e = expect_error(
        gw.chat(&item, &chat("gpt-4o")).await,
        429,
        "insufficient_quota",
    )
    .await;
    assert_eq!(e["type"], "insufficient_quota");
    assert_eq!(
        gw.metric_eventually("aihub_batch_item_requests_total{status=\"429\"}", 1.0),
        1.0
    );
}

#[tokio::test]
async fn the_secret_is_read_once_the_admin_api_has_stored_it() {
    let cp = control_plane(false).await;
    let (key, _) = create_key(&cp.store, &cp.dev, &[]).await;
    let mock = Mock::start(&[]);
    let admin = FakeAdmin::start().await;
    let gw = gateway(&mock, &cp, &[&format!("admin_url: \"{}\"", admin.url)], "");

    let item = token(&cp.secret, &key, "batch_s", 1, 60_000);
    expect_error(
        gw.chat(&item, &chat("gpt-4o")).await,
        401,
        "invalid_api_key",
    )
    .await;
    expect_error(gw.get(&key, "/v1/files").await, 503, "service_unavailable").await;

    aihub_store::settings::get_or_init(&cp.store, internal::SETTING, &cp.secret_text)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = gw.chat(&item, &chat("gpt-4o")).await.status();
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the secret was never read");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gw.get(&key, "/v1/files").await.status(), 201);
}

#[tokio::test]
async fn files_and_batches_without_an_admin_api() {
    let cp = control_plane(true).await;
    let (key, _) = create_key(&cp.store, &cp.dev, &[]).await;
    let mock = Mock::start(&[]);

    // No admin_url: the APIs are off.
    let gw = gateway(&mock, &cp, &[], "");
    let e = expect_error(gw.get(&key, "/v1/files").await, 404, "unsupported_endpoint").await;
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("control_plane.admin_url"),
        "{e}"
    );
    let r = gw
        .post(&key, "/v1/batches/batch_1/cancel")
        .send()
        .await
        .unwrap();
    expect_error(r, 404, "unsupported_endpoint").await;
    // The key is still checked first.
    expect_error(
        gw.get("ahub_dev_nope", "/v1/files").await,
        401,
        "invalid_api_key",
    )
    .await;
    drop(gw);

    // An admin_url nobody answers at.
    let url = format!("http://127.0.0.1:{}", free_port());
    let gw = gateway(&mock, &cp, &[&format!("admin_url: \"{url}\"")], "");
    let e = expect_error(gw.get(&key, "/v1/files").await, 502, "admin_unreachable").await;
    assert!(!e.to_string().contains("127.0.0.1"), "{e}");
    let r = gw
        .post(&key, "/v1/files")
        .header("content-type", "application/octet-stream")
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    expect_error(r, 502, "admin_unreachable").await;
    assert!(gw.metric("aihub_admin_forward_errors_total{kind=\"connect\"}") >= 2.0);
}

#[tokio::test]
async fn files_calls_reach_the_admin_api_with_a_signed_identity_streamed_both_ways() {
    let cp = control_plane(true).await;
    let (key, key_id) = create_key(&cp.store, &cp.dev, &[]).await;
    let narrow = chat_only_key(&cp.store, &cp.dev).await;
    let mock = Mock::start(&[]);
    let admin = FakeAdmin::start().await;
    let gw = gateway(
        &mock,
        &cp,
        &[
            &format!("admin_url: \"{}\"", admin.url),
            "max_upload_bytes: 8000000",
        ],
        "",
    );
    // The key's endpoint permissions apply (on the path after `/v1/`).
    let e = expect_error(gw.get(&narrow, "/v1/files").await, 403, "permission_denied").await;
    assert!(e["message"].as_str().unwrap().contains("/v1/files"), "{e}");
    assert!(admin.requests().is_empty());

    // A 5 MB upload with its length declared, and query parameters.
    let upload: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
    let r = gw
        .post(&key, "/v1/files?purpose=batch")
        .header("content-type", "multipart/form-data; boundary=xyz")
        .header("x-aihub-key-id", "key_forged")
        .header("cookie", "session=1")
        .body(upload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", gw.log_text());
    assert_eq!(r.headers()["x-admin-answer"], "yes");
    let rid = request_id(&r);
    let body = r.bytes().await.unwrap();
    assert_eq!(body.len(), 3_000_000, "the admin API's answer, whole");
    assert_eq!(sha256_hex(&body), sha256_hex(&FakeAdmin::answer()));

    let seen = admin.requests();
    let got = &seen[0];
    assert_eq!(got.method, "POST");
    assert_eq!(got.target, "/internal/v1/files?purpose=batch");
    assert_eq!(got.body_len, upload.len());
    assert_eq!(got.body_sha, sha256_hex(&upload));
    assert_eq!(got.header("content-length"), Some(upload.len().to_string()));
    assert_eq!(
        got.header("content-type").as_deref(),
        Some("multipart/form-data; boundary=xyz")
    );
    assert_eq!(got.header("x-request-id"), Some(rid));
    for gone in ["authorization", "x-api-key", "cookie"] {
        assert_eq!(got.header(gone), None, "{gone}");
    }
    let id = Identity {
        key_id: key_id.clone(),
        developer_id: cp.dev.clone(),
    };
    assert_eq!(got.header("x-aihub-key-id"), Some(key_id.clone()));
    assert_eq!(got.header("x-aihub-developer-id"), Some(cp.dev.clone()));
    let ts = got.header("x-aihub-identity-ts").unwrap();
    let sig = got.header("x-aihub-identity-sig").unwrap();
    cp.secret
        .verify_identity(&id, "POST", "/v1/files", &ts, &sig, aihub_store::now_ms())
        .expect("the identity verifies with the shared secret");

    // A chunked upload (no declared length), then a download without a body.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..20).map(|i| Ok(vec![i as u8; 10_000])).collect();
    let r = gw
        .post(&key, "/v1/files")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    r.bytes().await.unwrap();
    let r = gw.get(&key, "/v1/files/file-abc/content").await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.bytes().await.unwrap().len(), 3_000_000);
    let seen = admin.requests();
    assert_eq!(seen[1].body_len, 200_000);
    assert_eq!(
        seen[1].header("transfer-encoding").as_deref(),
        Some("chunked")
    );
    assert_eq!(seen[2].method, "GET");
    assert_eq!(seen[2].target, "/internal/v1/files/file-abc/content");
    assert_eq!(seen[2].body_len, 0);
    let sig = seen[2].header("x-aihub-identity-sig").unwrap();
    let ts = seen[2].header("x-aihub-identity-ts").unwrap();
    cp.secret
        .verify_identity(
            &id,
            "GET",
            "/v1/files/file-abc/content",
            &ts,
            &sig,
            aihub_store::now_ms(),
        )
        .unwrap();

    // Over the cap, declared: refused before anything is read or forwarded (on a raw
    // connection: the client is told while it would still be sending).
    let answer = {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "POST /v1/files HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n\
             Content-Length: 8000001\r\n\r\n"
        )
        .unwrap();
        read_error_answer(&mut s)
    };
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("\"code\":\"request_too_large\""),
        "{answer}"
    );
    assert_eq!(admin.requests().len(), 3);
    // Not model calls: no usage, whatever happened.
    assert_eq!(gw.metric("aihub_usage_estimated_total"), 0.0);
}

/// Stores a key that may call `chat/completions` only; returns it.
async fn chat_only_key(store: &Store, dev: &str) -> String {
    let key = aihub_apikey::generate();
    let mut tx = store.begin_write().await.unwrap();
    aihub_store::keys::insert(
        &mut tx,
        &aihub_store::keys::NewKey {
            id: aihub_store::new_id("key_"),
            developer_id: dev.into(),
            name: "chat only".into(),
            key_hash: aihub_apikey::KeyHash::of(&key).to_hex(),
            key_prefix: aihub_apikey::display_prefix(&key),
            models: vec!["*".into()],
            endpoints: vec!["chat/completions".into()],
            ip_allowlist: Vec::new(),
            rate_limit_rpm: None,
            rate_limit_tpm: None,
            expires_at: None,
        },
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    key
}

/// One request as the stand-in admin API received it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body_len: usize,
    body_sha: String,
}

impl Seen {
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }
}

/// A loopback HTTP/1.1 listener standing in for the admin API's internal routes: records every
/// request (headers, body length and hash) and answers each with 201 and a 3 MB body.
struct FakeAdmin {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeAdmin {
    async fn start() -> FakeAdmin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let record = Arc::clone(&record);
                tokio::spawn(async move {
                    let _ = serve(stream, record).await;
                });
            }
        });
        FakeAdmin { url, seen, task }
    }

    fn answer() -> Vec<u8> {
        (0..3_000_000u32).map(|i| (i % 241) as u8).collect()
    }

    fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for FakeAdmin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the requests of one connection (keep-alive) until it closes.
async fn serve(stream: tokio::net::TcpStream, seen: Arc<Mutex<Vec<Seen>>>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    loop {
        let mut line = String::new();
        if read.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_owned();
        let target = parts.next().unwrap_or_default().to_owned();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            read.read_line(&mut h).await?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((n, v)) = h.split_once(':') {
                headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
            }
        }
        let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let mut body = Vec::new();
        if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            loop {
                let mut size = String::new();
                read.read_line(&mut size).await?;
                let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                let mut chunk = vec![0u8; n + 2];
                read.read_exact(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
            body.resize(n, 0);
            read.read_exact(&mut body).await?;
        }
        seen.lock().unwrap().push(Seen {
            method,
            target,
            body_len: body.len(),
            body_sha: sha256_hex(&body),
            headers,
        });
        let answer = FakeAdmin::answer();
        let head = format!(
            "HTTP/1.1 201 Created\r\ncontent-type: application/octet-stream\r\n\
             x-admin-answer: yes\r\ncontent-length: {}\r\n\r\n",
            answer.len()
        );
        write.write_all(head.as_bytes()).await?;
        // In pieces, as a file streams from disk.
        for piece in answer.chunks(64 * 1024) {
            write.write_all(piece).await?;
        }
        write.flush().await?;
    }
}
