//! Usage rows as CSV (RFC 4180, UTF-8, CRLF line ends, a header line, formula-like text
//! neutralized): read from ClickHouse one calendar month per query through a cursor and written
//! in 64 KiB pieces, for the streamed download (`usage::export`) and for `usage_export` tasks
//! ([`UsageExporter`], the task engine's [`Exporter`]). Imports no HTTP state, so the state can
//! hand the exporter to the engine.

use std::io::Write;

use aihub_plans::period::civil_from_days;
use aihub_plans::Period;
use aihub_tasks::stage::Exporter;
use aihub_usage::read::events::{self, ExportRow};
use clickhouse::query::RowCursor;
use clickhouse::Client;

use crate::range::{DayRange, RangeParams};

mod cell;
pub use cell::text_cell;

/// The body goes out in pieces of about this size.
pub(crate) const CHUNK_BYTES: usize = 64 * 1024;

/// The CSV header line: the columns, in order.
pub const HEADER: &str = "request_id,timestamp,key_id,endpoint,model,status,error_type,\
streamed,usage_estimated,prompt_tokens,cached_tokens,completion_tokens,total_tokens,cost_usd,\
total_latency_ms,upstream_latency_ms,gateway_overhead_us,client_ip,user_agent\r\n";

pub(crate) type Cursor = RowCursor<ExportRow<'static>>;

/// What one export reads: whose rows, which key, and the month-sized time slices.
pub(crate) struct Export {
    client: Client,
    pub(crate) developer_id: String,
    key_id: Option<String>,
    /// `[start, end)` unix ms, oldest first.
    slices: std::vec::IntoIter<(i64, i64)>,
}

impl Export {
    /// An export of `developer_id`'s rows in `range`, optionally one key's.
    pub(crate) fn new(
        client: &Client,
        developer_id: String,
        key_id: Option<String>,
        range: &DayRange,
    ) -> Export {
        Export {
            client: client.clone(),
            developer_id,
            key_id,
            slices: month_slices(range).into_iter(),
        }
    }

    /// The cursor over the next slice's rows, `None` after the last.
    pub(crate) fn next_cursor(&mut self) -> Result<Option<Cursor>, clickhouse::error::Error> {
        let Some((start, end)) = self.slices.next() else {
            return Ok(None);
        };
        events::export(
            &self.client,
            &self.developer_id,
            self.key_id.as_deref(),
            start,
            end,
        )
        .map(Some)
    }
}

/// The range cut at calendar-month boundaries.
fn month_slices(r: &DayRange) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    let mut start = r.start_ms();
    while start < r.end_ms() {
        let end = Period::of_unix_ms(start).end_ms().min(r.end_ms());
        out.push((start, end));
        start = end;
    }
    out
}

/// Writes the CSV of `developer_id`'s rows in `range` (optionally one key's) into a task's
/// result file: the same columns and encoding as the download. Returns the rows written.
pub(crate) async fn write_csv(
    client: &Client,
    developer_id: &str,
    key_id: Option<&str>,
    range: &DayRange,
    out: &mut aihub_tasks::files::Writer,
) -> Result<u64, String> {
    let mut export = Export::new(
        client,
        developer_id.to_owned(),
        key_id.map(str::to_owned),
        range,
    );
    let failed = |e: &dyn std::fmt::Display| format!("the usage export failed: {e}");
    let mut buf = Vec::with_capacity(CHUNK_BYTES + 4096);
    buf.extend_from_slice(HEADER.as_bytes());
    let mut rows = 0u64;
    while let Some(mut cursor) = export.next_cursor().map_err(|e| failed(&e))? {
        while let Some(row) = cursor.next().await.map_err(|e| failed(&e))? {
            write_row(&mut buf, &row);
            rows += 1;
            if buf.len() >= CHUNK_BYTES {
                out.write(&buf).await.map_err(|e| failed(&e))?;
                buf.clear();
            }
        }
    }
    out.write(&buf).await.map_err(|e| failed(&e))?;
    Ok(rows)
}

/// Writes `usage_export` tasks' CSVs from ClickHouse (the task engine's [`Exporter`]).
pub struct UsageExporter {
    pub client: Option<Client>,
}

#[async_trait::async_trait]
impl Exporter for UsageExporter {
    async fn export(
        &self,
        developer_id: &str,
        input: &serde_json::Value,
        out: &mut aihub_tasks::files::Writer,
    ) -> Result<(), String> {
        let client = self
            .client
            .as_ref()
            .ok_or("no usage database is configured (`clickhouse` section)")?;
        let range = RangeParams {
            period: input["period"].as_str(),
            from: input["from"].as_str(),
            to: input["to"].as_str(),
        }
        .resolve(None, aihub_store::now_ms())
        .map_err(|e| e.describe().message)?;
        let key = input["key_id"].as_str();
        let rows = write_csv(client, developer_id, key, &range, out).await?;
        tracing::info!(developer_id, rows, "usage export task written");
        Ok(())
    }
}

pub(crate) fn write_row(buf: &mut Vec<u8>, r: &ExportRow<'_>) {
    text_cell(buf, r.rid);
    buf.push(b',');
    write_timestamp(buf, r.ts_ms);
    buf.push(b',');
    text_cell(buf, r.key_id);
    buf.push(b',');
    text_cell(buf, r.endpoint);
    buf.push(b',');
    text_cell(buf, r.model);
    let _ = write!(buf, ",{},", r.status);
    text_cell(buf, r.error_type);
    let _ = write!(
        buf,
        ",{},{},{},{},{},{},",
        r.streamed,
        r.usage_estimated,
        r.prompt_tokens,
        r.cached_tokens,
        r.completion_tokens,
        r.total_tokens
    );
    write_usd(buf, r.cost_nanos);
    let _ = write!(
        buf,
        ",{},{},{},",
        r.total_latency_ms, r.upstream_latency_ms, r.gateway_overhead_us
    );
    text_cell(buf, r.client_ip);
    buf.push(b',');
    text_cell(buf, r.user_agent);
    buf.extend_from_slice(b"\r\n");
}

/// Unix ms → `2026-11-25T09:30:47.521Z`.
fn write_timestamp(buf: &mut Vec<u8>, ms: u64) {
    let secs = ms / 1000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    let _ = write!(
        buf,
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    );
}

/// Nano-USD as the exact USD decimal, written like [`crate::plans::usd_string`]: no trailing
/// zeros beyond two decimals (`0.0003`, `12.50`, `0.00`).
pub(crate) fn write_usd(buf: &mut Vec<u8>, nanos: i64) {
    if nanos < 0 {
        buf.push(b'-');
    }
    let abs = nanos.unsigned_abs();
    let (units, mut frac) = (abs / 1_000_000_000, abs % 1_000_000_000);
    let mut digits = 9;
    while digits > 2 && frac % 10 == 0 {
        frac /= 10;
        digits -= 1;
    }
    let _ = write!(buf, "{units}.{frac:0digits$}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields() {
        let mut b = Vec::new();
        for s in ["plain", "a,b", "say \"hi\"", "two\nlines", ""] {
            text_cell(&mut b, s);
            b.push(b'|');
        }
        assert_eq!(
            String::from_utf8(b).unwrap(),
            "plain|\"a,b\"|\"say \"\"hi\"\"\"|\"two\nlines\"||"
        );
        // Formula-like text is neutralised, quoted as needed; other text is left alone.
        let mut b = Vec::new();
        for s in [
            "=1+1",
            "+1",
            "-2",
            "@SUM(A1)",
            "\tx",
            "\rx",
            "=HYPERLINK(\"http://x\",\"y\")",
            "a=1",
            " =1",
            "'",
        ] {
            text_cell(&mut b, s);
            b.push(b'|');
        }
        assert_eq!(
            String::from_utf8(b).unwrap(),
            "'=1+1|'+1|'-2|'@SUM(A1)|'\tx|\"'\rx\"|\"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\"|a=1| =1|'|"
        );
        let mut t = Vec::new();
        write_timestamp(&mut t, 1_795_599_047_521);
        assert_eq!(String::from_utf8(t).unwrap(), "2026-11-25T09:30:47.521Z");
    }

    #[test]
    fn slices_follow_months() {
        let r = DayRange {
            from: crate::range::parse_date("2026-01-30").unwrap(),
            to: crate::range::parse_date("2026-03-02").unwrap(),
            period: None,
        };
        let s: Vec<(String, String)> = month_slices(&r)
            .into_iter()
            .map(|(a, b)| {
                (
                    aihub_usage::read::datetime_sql(a),
                    aihub_usage::read::datetime_sql(b),
                )
            })
            .collect();
        assert_eq!(
            s,
            [
                ("2026-01-30 00:00:00", "2026-02-01 00:00:00"),
                ("2026-02-01 00:00:00", "2026-03-01 00:00:00"),
                ("2026-03-01 00:00:00", "2026-03-03 00:00:00"),
            ]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
    }
}
