//! ClickHouse access for the pipeline: connection settings, batch inserts (RowBinary, schema
//! validation off so Debian's 18.16 works), the dedup queries (rows of a replayed batch already
//! inserted; batch items answered already), and error classification (data errors are never
//! retried).
//!
//! On a cluster (`cluster` set) rows go to the configured server's `usage_events_local` and a
//! replayed batch is checked against that same table; `insert_quorum` makes an insert wait for
//! that many replicas. The client carries the cluster's settings (see
//! [`ClickHouseConfig::client_without_database`]), and the functions here read them off it, so
//! callers pass the client alone on one server and on a cluster.

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
    /// (`client_cert_file`, `client_key_file`). Default: the system's roots, no client certificate.
    #[serde(default)]
    pub tls: ClientTls,
    /// The ClickHouse cluster (its name in the servers' `remote_servers`) the schema is spread
    /// over: migrations run `ON CLUSTER`, tables are replicated (`<name>_local`) behind
    /// `Distributed` tables of the usual names, and inserts go to `url`'s server's
    /// `usage_events_local`. Default: none (one server). `docs/clickhouse.md`, "Cluster".
    #[serde(default)]
    pub cluster: Option<String>,
    /// With `cluster`: replicas that must have an insert before it counts as done (ClickHouse's
    /// `insert_quorum`). While fewer are up, inserts fail and records wait in the gateway's WAL.
    /// Default: none (the server that takes the insert).
    #[serde(default)]
    pub insert_quorum: Option<u64>,
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
            cluster: None,
            insert_quorum: None,
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

    /// Checks the URL, the database and cluster names, the quorum and the TLS files. Errors are
    /// `(key, message)` with the key relative to this section (`url`, `database`,
    /// `tls.ca_file`, …).
    pub fn validate(&self) -> Result<(), (String, String)> {
        let https = self.url.starts_with("https://");
        if !https && !self.url.starts_with("http://") {
            return Err(("url".into(), "must be an http:// or https:// URL".into()));
        }
        let plain =
            |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !plain(&self.database) {
            return Err(("database".into(), "letters, digits and `_` only".into()));
        }
        if self.cluster.as_deref().is_some_and(|c| !plain(c)) {
            return Err(("cluster".into(), "letters, digits and `_` only".into()));
        }
        match self.insert_quorum {
            Some(0) => return Err(("insert_quorum".into(), "must be at least 1".into())),
            Some(_) if self.cluster.is_none() => {
                return Err((
                    "insert_quorum".into(),
                    "set, but no `cluster` (one server has no replicas)".into(),
                ))
            }
            _ => {}
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
    ///
    /// With `cluster`, every query carries `insert_distributed_sync=1` (an insert through a
    /// `Distributed` table returns once every shard has it, not once it is queued), which also
    /// tells [`insert`] and [`drop_present`] to use `usage_events_local`; with
    /// `insert_quorum`, `insert_quorum=N` and `insert_quorum_timeout` = `insert_timeout` (the
    /// server gives up when we do).
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
        if self.cluster.is_some() {
            c = c.with_setting(CLUSTER_SETTING, "1");
        }
        if let Some(n) = self.insert_quorum {
            c = c.with_setting(QUORUM_SETTING, n.to_string()).with_setting(
                "insert_quorum_timeout",
                self.insert_timeout.as_millis().to_string(),
            );
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

/// Set on every query of a cluster's client (see [`ClickHouseConfig::client_without_database`]).
const CLUSTER_SETTING: &str = "insert_distributed_sync";
/// Set on every query of a client with `insert_quorum`.
const QUORUM_SETTING: &str = "insert_quorum";

/// The table rows are inserted into and replays are checked against: `usage_events` on one
/// server; on a cluster, the server's own `usage_events_local`. (Through the `Distributed`
/// table an insert would return before the replica has it, unless `insert_distributed_sync`,
/// and a replay could be checked on a replica that has not fetched it yet.)
pub fn events_table(client: &Client) -> &'static str {
    if client.get_setting(CLUSTER_SETTING).is_some() {
        LOCAL_TABLE
    } else {
        TABLE
    }
}

/// How an insert failed, which decides what happens to the batch.
#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    /// The server refused the data itself (bad value, wrong type, …): retrying cannot help; the
    /// batch goes to the dead-letter directory.
    #[error("ClickHouse refused the data: {0}")]
    Data(String),
    /// Anything else (connection, timeout, server overloaded, table missing; on a cluster
    /// also fewer replicas up than `insert_quorum` (Code 285), ZooKeeper unreachable, a
    /// read-only replica): retried, with dedup, until it works.
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
    classify_text(e.to_string())
}

/// Data errors by code; everything else is transient, notably a cluster's: 285 (fewer
/// replicas alive than `insert_quorum`), 286 (another quorum insert into the table still in
/// flight: 18.16 runs them one at a time), 319 (quorum insert status unknown: it may have
/// landed, so the retry dedups), 225 (no ZooKeeper), 242 (replica read-only, e.g. ZooKeeper
/// down), 289 (replica behind the quorum).
fn classify_text(text: String) -> InsertError {
    if DATA_ERROR_CODES.iter().any(|c| text.contains(c)) {
        InsertError::Data(text)
    } else {
        InsertError::Transient(text)
    }
}

pub const TABLE: &str = "usage_events";
/// On a cluster: the replicated table behind `usage_events`.
pub const LOCAL_TABLE: &str = "usage_events_local";

/// Inserts `rows` in one INSERT (one RowBinary body) into [`events_table`]. On a cluster a
/// repeated insert of the same rows (a retry whose first attempt landed) is dropped by the
/// replicated table's block dedup, on whichever replica it arrives.
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
            .insert::<UsageRecord>(events_table(client))
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

/// Longest a dedup query may take. A server that stops answering (hung, or a connection
/// half-open after a partition) must not hold the pipeline for good: the attempt counts as a
/// transient failure and is retried on a new connection. (The default insert timeout.)
pub const DEDUP_QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// A dedup query, bounded by [`DEDUP_QUERY_TIMEOUT`].
async fn bounded<T>(
    query: impl std::future::Future<Output = clickhouse::error::Result<T>>,
) -> Result<T, InsertError> {
    match tokio::time::timeout(DEDUP_QUERY_TIMEOUT, query).await {
        Ok(result) => result.map_err(classify),
        Err(_) => Err(InsertError::Transient(format!(
            "dedup query: no answer within {DEDUP_QUERY_TIMEOUT:?}"
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
///
/// Reads [`events_table`]: on a cluster the server's own replica, which has every insert made
/// through it. With `insert_quorum`, with `select_sequential_consistency=1`: a replica missing
/// an insert confirmed by the quorum refuses the query (transient) rather than answer without
/// it, so a replay checked on another replica after a failover is exact.
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
        let mut query = client.query(&format!(
            "SELECT toString(request_id) AS id, ts_ms FROM {} \
             WHERE ts >= toDateTime(?) AND ts <= toDateTime(?) AND has(?, toString(request_id))",
            events_table(client)
        ));
        if client.get_setting(QUORUM_SETTING).is_some() {
            query = query.with_setting("select_sequential_consistency", "1");
        }
        let present: Vec<Present> = bounded(query.bind(lo).bind(hi).bind(ids).fetch_all()).await?;
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
/// Returns how many were removed. On a cluster it reads the `Distributed` table: the item's
/// earlier answer may have come through another server (or shard).
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
        let present: Vec<Present> = bounded(query.bind(ids).fetch_all()).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: serde_json::Value) -> ClickHouseConfig {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn cluster_settings_are_checked() {
        assert!(ClickHouseConfig::default().validate().is_ok());
        let c = config(serde_json::json!({"cluster": "aihub_1", "insert_quorum": 2}));
        assert!(c.validate().is_ok());
        for (bad, key) in [
            (serde_json::json!({"cluster": "ai-hub"}), "cluster"),
            (serde_json::json!({"cluster": ""}), "cluster"),
            (serde_json::json!({"cluster": "a b"}), "cluster"),
            (
                serde_json::json!({"cluster": "c", "insert_quorum": 0}),
                "insert_quorum",
            ),
            (serde_json::json!({"insert_quorum": 2}), "insert_quorum"),
        ] {
            assert_eq!(config(bad.clone()).validate().unwrap_err().0, key, "{bad}");
        }
    }

    #[test]
    fn a_cluster_client_inserts_into_the_local_table() {
        let one = ClickHouseConfig::default().client();
        assert_eq!(events_table(&one), "usage_events");
        assert_eq!(one.get_setting("insert_quorum"), None);
        let c =
            config(serde_json::json!({"cluster": "c", "insert_quorum": 2, "insert_timeout": "7s"}));
        let client = c.client();
        assert_eq!(events_table(&client), "usage_events_local");
        assert_eq!(client.get_setting("insert_distributed_sync"), Some("1"));
        assert_eq!(client.get_setting("insert_quorum"), Some("2"));
        assert_eq!(client.get_setting("insert_quorum_timeout"), Some("7000"));
        let no_quorum = config(serde_json::json!({"cluster": "c"})).client();
        assert_eq!(no_quorum.get_setting("insert_quorum"), None);
    }

    #[test]
    fn quorum_and_replica_errors_are_transient() {
        for text in [
            "bad response: Code: 285, e.displayText() = DB::Exception: Number of alive replicas (1) is less than requested quorum (2)., e.what() = DB::Exception",
            "bad response: Code: 286, e.displayText() = DB::Exception: Another quorum insert has been already started, e.what() = DB::Exception",
            "bad response: Code: 319, e.displayText() = DB::Exception: Unknown status, client must retry. Reason: Connection loss",
            "bad response: Code: 242, e.displayText() = DB::Exception: Table is in readonly mode",
            "bad response: Code: 225, e.displayText() = DB::Exception: ZooKeeper session has been expired.",
        ] {
            assert!(matches!(classify_text(text.into()), InsertError::Transient(_)), "{text}");
        }
        assert!(matches!(
            classify_text(
                "bad response: Code: 53, e.displayText() = DB::Exception: Type mismatch".into()
            ),
            InsertError::Data(_)
        ));
    }
}
