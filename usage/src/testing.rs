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
        crate::schema::migrate(&config)
            .await
            .expect("ClickHouse migrations (is ClickHouse running? deploy/local/test.sh starts it)");
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
