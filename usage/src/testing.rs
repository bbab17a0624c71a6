//! A fresh, migrated ClickHouse database per test (feature `testing`), dropped when the value
//! is dropped. The server is `AIHUB_TEST_CLICKHOUSE_URL` (default `http://127.0.0.1:8123`),
//! which `deploy/local/test.sh` starts.

use std::io::{Read, Write};
use std::time::Duration;

use crate::record::UsageRecord;
use crate::sink::{self, ClickHouseConfig};

/// The ClickHouse server tests use.
pub fn clickhouse_url() -> String {
    std::env::var("AIHUB_TEST_CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:8123".into())
}

pub struct TestClickHouse {
    /// Settings pointing at the fresh database.
    pub config: ClickHouseConfig,
}

impl TestClickHouse {
    /// Creates `aihub_t_<random>` and runs every migration.
    pub async fn new() -> TestClickHouse {
        let config = ClickHouseConfig {
            url: clickhouse_url(),
            database: format!("aihub_t_{}", uuid::Uuid::now_v7().simple()),
            ..ClickHouseConfig::default()
        };
        crate::schema::migrate(&config).await.expect(
            "ClickHouse migrations (is ClickHouse running? deploy/local/test.sh starts it)",
        );
        TestClickHouse { config }
    }

    pub fn client(&self) -> clickhouse::Client {
        self.config.client()
    }

    /// Inserts rows as the gateway does (RowBinary; the rollups fill themselves).
    pub async fn insert(&self, rows: &[UsageRecord]) {
        sink::insert(&self.client(), Duration::from_secs(30), rows)
            .await
            .expect("insert usage rows");
    }

    /// Runs a statement in this database.
    pub async fn execute(&self, sql: &str) {
        self.client()
            .query(sql)
            .execute()
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

impl Drop for TestClickHouse {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS `{}`", self.config.database);
        let Some(addr) = self.config.url.strip_prefix("http://") else {
            return;
        };
        let addr = addr.trim_end_matches('/');
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            let _ = write!(
                s,
                "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{sql}",
                sql.len()
            );
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.read(&mut [0u8; 256]);
        }
    }
}

/// A successful chat request of `tokens` tokens (half prompt, half completion) costing
/// `cost_nanos`, by `developer_id` with key `key_<developer_id>`, started at `ts_ms`; a
/// zero-token row is a refusal (429). Tests adjust the other fields as they need.
pub fn usage_row(
    developer_id: &str,
    ts_ms: i64,
    model: &str,
    tokens: u32,
    cost_nanos: i64,
) -> UsageRecord {
    UsageRecord {
        request_id: uuid::Uuid::now_v7(),
        ts: (ts_ms / 1000) as u32,
        ts_ms: ts_ms as u64,
        developer_id: developer_id.into(),
        key_id: format!("key_{developer_id}"),
        endpoint: "chat/completions".into(),
        method: "POST".into(),
        model: model.into(),
        upstream_model: model.into(),
        upstream: "mock".into(),
        upstream_endpoint: "http://127.0.0.1:1/v1/chat/completions".into(),
        prompt_tokens: tokens / 2,
        cached_tokens: 0,
        completion_tokens: tokens - tokens / 2,
        total_tokens: tokens,
        cost_nanos,
        gateway_overhead_us: 50,
        upstream_latency_ms: 100,
        total_latency_ms: 101,
        status: if tokens == 0 { 429 } else { 200 },
        error_type: if tokens == 0 {
            "rate_limit_exceeded".into()
        } else {
            String::new()
        },
        streamed: 0,
        usage_estimated: 0,
        client_ip: "127.0.0.1".into(),
        user_agent: "test".into(),
        batch_id: String::new(),
        attempts: 1,
    }
}
