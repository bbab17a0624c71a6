//! ClickHouse access for the pipeline: connection settings, batch inserts (RowBinary, schema
//! validation off so Debian's 18.16 works), the dedup queries (rows of a replayed batch already
//! inserted; batch items answered already), and error classification (data errors are never
//! retried).

use std::collections::HashSet;
use std::time::Duration;

use aihub_net::tls::ClientTls;
use clickhouse::{Client, Row};
use serde::Deserialize;

use crate::record::UsageRecord;

/// Where usage goes. Environment overrides: `AIHUB_CLICKHOUSE_URL`, `AIHUB_CLICKHOUSE_DATABASE`,
/// `AIHUB_CLICKHOUSE_USER`; the password only ever comes from the variable named in
/// `password_env`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseConfig {
    /// HTTP interface. Default `http://127.0.0.1:8123`.
    #[serde(default = "default_url")]
    pub url: String,
    /// Default `aihub`.
    #[serde(default = "default_database")]
    pub database: String,
    /// Default `default`.
    #[serde(default = "default_user")]
    pub user: String,
    /// Environment variable holding the password. Default: none (no password).
    #[serde(default)]
    pub password_env: Option<String>,
    /// Longest an insert may take before it counts as failed (and is retried with dedup).
    /// Default 30s.
    #[serde(default = "default_insert_timeout", with = "humantime_serde")]
    pub insert_timeout: Duration,
    /// For an `https://` URL: a private CA (`ca_file`) and a client certificate
    /// (`cert_file`, `key_file`). Default: the system's roots, no client certificate.
    #[serde(default)]
    pub tls: ClientTls,
}

fn default_url() -> String {
    "http://127.0.0.1:8123".into()
}
fn default_database() -> String {
    "aihub".into()
}
fn default_user() -> String {
    "default".into()
}
fn default_insert_timeout() -> Duration {
    Duration::from_secs(30)
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        ClickHouseConfig {
            url: default_url(),
            database: default_database(),
            user: default_user(),
            password_env: None,
            insert_timeout: default_insert_timeout(),
            tls: ClientTls::default(),
        }
    }
}

impl ClickHouseConfig {
    /// Applies the `AIHUB_CLICKHOUSE_*` environment overrides.
    pub fn with_env_overrides(mut self) -> Self {
        if let Ok(v) = std::env::var("AIHUB_CLICKHOUSE_URL") {
            self.url = v;
        }
        if let Ok(v) = std::env::var("AIHUB_CLICKHOUSE_DATABASE") {
            self.database = v;
        }
        if let Ok(v) = std::env::var("AIHUB_CLICKHOUSE_USER") {
            self.user = v;
        }
        self
    }

    /// Checks the URL, the database name and the TLS files. Errors are `(key, message)` with
    /// the key relative to this section (`url`, `database`, `tls.ca_file`, …).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let https = self.url.starts_with("https://");
        if !https && !self.url.starts_with("http://") {
            return Err(("url".into(), "must be an http:// or https:// URL".into()));
        }
        if self.database.is_empty()
            || !self
                .database
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(("database".into(), "letters, digits and `_` only".into()));
        }
        if !self.tls.is_default() && !https {
            return Err(("tls".into(), "set, but the URL is not https://".into()));
        }
        self.tls
            .load()
            .map_err(|e| (format!("tls.{}", e.field), e.reason))?;
        Ok(())
    }

    /// A client bound to the server only (for `CREATE DATABASE`). An `https://` URL is
    /// verified against the system's roots plus `tls.ca_file`.
    pub fn client_without_database(&self) -> Client {
        let mut c = if self.url.starts_with("https://") {
            // The clickhouse crate's default HTTP client (idle connections closed after 2 s,
            // under ClickHouse's 3 s keep-alive) over our verifying connector.
            Client::with_http_client(
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .pool_idle_timeout(Duration::from_secs(2))
                    .build(https_connector(&self.tls)),
            )
        } else {
            Client::default()
        }
        .with_url(&self.url)
        .with_user(&self.user)
        .with_validation(false);
        if let Some(pw) = self
            .password_env
            .as_deref()
            .and_then(|v| std::env::var(v).ok())
        {
            c = c.with_password(pw);
        }
        c
    }

    /// A client bound to the usage database.
    pub fn client(&self) -> Client {
        self.client_without_database().with_database(&self.database)
    }
}

/// HTTP or HTTPS (TCP keep-alive 60 s, as the clickhouse crate's default), verifying with
/// `tls`. The files were checked when the configuration was loaded; if they became unreadable
/// since, the error is logged and the connector trusts the system's roots only, so a private CA
/// fails the handshake (it never falls back to an unverified connection).
fn https_connector(
    tls: &ClientTls,
) -> hyper_tls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector> {
    use hyper_util::client::legacy::connect::HttpConnector;
    let connector = tls.connector().unwrap_or_else(|e| {
        tracing::error!(error = %e, "clickhouse.tls is unusable; using the system's roots only");
        native_default_connector()
    });
    let mut http = HttpConnector::new();
    http.set_keepalive(Some(Duration::from_secs(60)));
    http.enforce_http(false);
    hyper_tls::HttpsConnector::from((http, tokio_native_tls::TlsConnector::from(connector)))
}

fn native_default_connector() -> tokio_native_tls::native_tls::TlsConnector {
    ClientTls::default()
        .connector()
        .expect("a TLS connector with the system's roots")
}

/// How an insert failed, which decides what happens to the batch.
#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    /// The server refused the data itself (bad value, wrong type, …): retrying cannot help; the
    /// batch goes to the dead-letter directory.
    #[error("ClickHouse refused the data: {0}")]
    Data(String),
    /// Anything else (connection, timeout, server overloaded, table missing): retried, with
    /// dedup, until it works.
    #[error("insert failed: {0}")]
    Transient(String),
}

/// ClickHouse error codes that mean "this data can never be inserted as is".
const DATA_ERROR_CODES: &[&str] = &[
    "Code: 6,",   // CANNOT_PARSE_TEXT
    "Code: 26,",  // CANNOT_PARSE_QUOTED_STRING
    "Code: 27,",  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    "Code: 32,",  // ATTEMPT_TO_READ_AFTER_EOF
    "Code: 33,",  // CANNOT_READ_ALL_DATA
    "Code: 41,",  // CANNOT_PARSE_DATETIME
    "Code: 53,",  // TYPE_MISMATCH
    "Code: 69,",  // ARGUMENT_OUT_OF_BOUND
    "Code: 70,",  // CANNOT_CONVERT_TYPE
    "Code: 72,",  // CANNOT_PARSE_NUMBER
    "Code: 117,", // INCORRECT_DATA
    "Code: 131,", // TOO_LARGE_STRING_SIZE
    "Code: 376,", // CANNOT_PARSE_UUID
];

fn classify(e: clickhouse::error::Error) -> InsertError {
    let text = e.to_string();
    if DATA_ERROR_CODES.iter().any(|c| text.contains(c)) {
        InsertError::Data(text)
    } else {
        InsertError::Transient(text)
    }
}

pub const TABLE: &str = "usage_events";

/// Inserts `rows` in one INSERT (one RowBinary body).
pub async fn insert(
    client: &Client,
    timeout: Duration,
    rows: &[UsageRecord],
) -> Result<(), InsertError> {
    if rows.is_empty() {
        return Ok(());
    }
    let run = async {
        let mut insert = client
            .insert::<UsageRecord>(TABLE)
            .await
            .map_err(classify)?;
        for row in rows {
            insert.write(row).await.map_err(classify)?;
        }
        insert.end().await.map_err(classify)
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(result) => result,
        Err(_) => Err(InsertError::Transient(format!(
            "no answer within {timeout:?}"
        ))),
    }
}

/// A row already in ClickHouse, as the dedup queries read it.
#[derive(Debug, Row, Deserialize)]
struct Present {
    id: String,
    ts_ms: u64,
}

/// Removes from `rows` those ClickHouse already holds (a previous attempt of the same batch may
/// have landed, wholly or partly): the same request id started at the same millisecond. (A
/// batch item's answered attempts share their request id; a later attempt is another row until
/// [`drop_batch_duplicates`] drops it.) Returns how many were removed.
pub async fn drop_present(
    client: &Client,
    rows: &mut Vec<UsageRecord>,
) -> Result<usize, InsertError> {
    let mut found = HashSet::new();
    // Bounded query text (ClickHouse's max_query_size is 256 KiB by default).
    for chunk in rows.chunks(2_000) {
        let (lo, hi) = chunk
            .iter()
            .fold((u32::MAX, 0), |(lo, hi), r| (lo.min(r.ts), hi.max(r.ts)));
        let ids: Vec<String> = chunk.iter().map(|r| r.request_id.to_string()).collect();
        let present: Vec<Present> = client
            .query(
                "SELECT toString(request_id) AS id, ts_ms FROM usage_events \
                 WHERE ts >= toDateTime(?) AND ts <= toDateTime(?) AND has(?, toString(request_id))",
            )
            .bind(lo)
            .bind(hi)
            .bind(ids)
            .fetch_all()
            .await
            .map_err(classify)?;
        found.extend(present.into_iter().map(|p| (p.id, p.ts_ms)));
    }
    let before = rows.len();
    if !found.is_empty() {
        rows.retain(|r| !found.contains(&(r.request_id.to_string(), r.ts_ms)));
    }
    Ok(before - rows.len())
}

/// Whether a row is a batch item's answered attempt (status below 400): the row that stands
/// for the item in usage. Refused or failed attempts (a 429, an upstream error) carry request
/// ids of their own (the gateway gives them one), so they are rows of their own and never hide
/// a later answer.
fn is_batch_answer(r: &UsageRecord) -> bool {
    !r.batch_id.is_empty() && (100..400).contains(&r.status)
}

/// Exactly one answered row per batch item: removes from `rows` every batch item's answer
/// (non-empty `batch_id`, status below 400) whose request id is already answered in ClickHouse
/// or earlier in `rows` (an item sent again after a worker takeover carries the same request
/// id). Rows of live requests cost nothing here: without batch answers no query is made; with
/// them, one query per 2,000 of them, by developer (the table's first sort key) and request id.
/// Returns how many were removed.
pub async fn drop_batch_duplicates(
    client: &Client,
    rows: &mut Vec<UsageRecord>,
) -> Result<usize, InsertError> {
    let mut seen = HashSet::new();
    let mut candidates: Vec<&UsageRecord> = Vec::new();
    let mut repeated = false;
    for r in rows.iter().filter(|r| is_batch_answer(r)) {
        if seen.insert(r.request_id) {
            candidates.push(r);
        } else {
            repeated = true;
        }
    }
    if candidates.is_empty() {
        return Ok(0);
    }
    let mut answered = HashSet::new();
    for chunk in candidates.chunks(2_000) {
        let developers: std::collections::BTreeSet<&str> =
            chunk.iter().map(|r| r.developer_id.as_str()).collect();
        let placeholders = vec!["?"; developers.len()].join(", ");
        let sql = format!(
            "SELECT toString(request_id) AS id, ts_ms FROM usage_events \
             WHERE developer_id IN ({placeholders}) AND status >= 100 AND status < 400 \
             AND has(?, toString(request_id))"
        );
        let mut query = client.query(&sql);
        for d in developers {
            query = query.bind(d);
        }
        let ids: Vec<String> = chunk.iter().map(|r| r.request_id.to_string()).collect();
        let present: Vec<Present> = query.bind(ids).fetch_all().await.map_err(classify)?;
        answered.extend(present.into_iter().map(|p| p.id));
    }
    if answered.is_empty() && !repeated {
        return Ok(0);
    }
    let before = rows.len();
    let mut kept = HashSet::new();
    rows.retain(|r| {
        !is_batch_answer(r)
            || (!answered.contains(&r.request_id.to_string()) && kept.insert(r.request_id))
    });
    Ok(before - rows.len())
}
