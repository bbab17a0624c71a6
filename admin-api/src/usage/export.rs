//! `GET /developer/usage/export`: a developer's raw usage rows (`usage_events`) as CSV, for any
//! range, streamed in constant memory: ClickHouse rows are read from a cursor, one calendar
//! month per query (sorted by time), written as CSV into a buffer that is handed to the
//! response whenever it holds 64 KiB. A bounded channel between the two makes a slow client
//! slow down the query instead of growing a buffer.
//!
//! The first query runs before the response starts, so an unreachable ClickHouse is a 503. A
//! failure after that can only cut the body short (the chunked encoding is never finished, so
//! clients see an incomplete transfer); it is logged.

use std::io::Write;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use clickhouse::query::RowCursor;
use clickhouse::Client;
use serde::Deserialize;
use tokio::sync::mpsc;

use aihub_plans::period::civil_from_days;
use aihub_plans::Period;
use aihub_store::keys as store_keys;
use aihub_usage::read::events::{self, ExportRow};

use super::range::{DayRange, RangeParams};
use super::whose;
use crate::auth::Caller;
use crate::error::{AppError, Query};
use crate::state::AppState;

/// The body goes out in pieces of about this size.
const CHUNK_BYTES: usize = 64 * 1024;

/// The CSV header line: the columns, in order.
pub const HEADER: &str = "request_id,timestamp,key_id,endpoint,model,status,error_type,\
streamed,usage_estimated,prompt_tokens,cached_tokens,completion_tokens,total_tokens,cost_usd,\
total_latency_ms,upstream_latency_ms,gateway_overhead_us,client_ip,user_agent\r\n";

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ExportQuery {
    /// Billing period, `YYYY-MM` (UTC). Default: the current one. Not with `from`/`to`.
    pub period: Option<String>,
    /// First day, `YYYY-MM-DD` (UTC), with `to`.
    pub from: Option<String>,
    /// Last day, `YYYY-MM-DD` (UTC, inclusive), with `from`. Any length.
    pub to: Option<String>,
    /// Only this API key's requests.
    pub key_id: Option<String>,
    /// Operators only: whose usage (default: their own).
    pub developer_id: Option<String>,
}

type Cursor = RowCursor<ExportRow<'static>>;

/// What one export reads: whose rows, which key, and the month-sized time slices.
struct Export {
    client: Client,
    developer_id: String,
    key_id: Option<String>,
    /// `[start, end)` unix ms, oldest first.
    slices: std::vec::IntoIter<(i64, i64)>,
}

impl Export {
    /// The cursor over the next slice's rows, `None` after the last.
    fn next_cursor(&mut self) -> Result<Option<Cursor>, clickhouse::error::Error> {
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

/// The raw usage rows of a period or range as CSV (RFC 4180, UTF-8, CRLF line ends, a header
/// line), oldest first. Timestamps are RFC 3339 UTC with milliseconds (the request's start);
/// `cost_usd` is the exact decimal. Any range length; streamed.
#[utoipa::path(get, path = "/developer/usage/export", tag = "usage", params(ExportQuery),
    responses((status = 200, description = "CSV, one row per request (see docs/analytics.md)",
               content_type = "text/csv", body = String),
              (status = 404, description = "No such developer or key (or not the caller's)", body = crate::openapi::ErrorBody),
              (status = 422, body = crate::openapi::ErrorBody),
              (status = 503, description = "`usage_unavailable`: no usage database", body = crate::openapi::ErrorBody)),
    security(("bearer" = [])))]
pub(crate) async fn export(
    State(s): State<AppState>,
    caller: Caller,
    Query(q): Query<ExportQuery>,
) -> Result<Response, AppError> {
    export_of(&s, &caller, q).await
}

/// What `export` answers (the caller's, or the developer an operator names), for the portal too.
pub(crate) async fn export_of(
    s: &AppState,
    caller: &Caller,
    q: ExportQuery,
) -> Result<Response, AppError> {
    let db = s.usage_db()?;
    let r = RangeParams {
        period: q.period.as_deref(),
        from: q.from.as_deref(),
        to: q.to.as_deref(),
    }
    .resolve(None, aihub_store::now_ms())?;
    let developer_id = match (&q.key_id, q.developer_id.as_deref()) {
        // An operator naming a key alone: any key, its owner's rows (as for key usage).
        (Some(k), None) if caller.developer.is_admin() => {
            store_keys::get(&s.store, None, k).await?.developer_id
        }
        (key, requested) => {
            let developer_id = whose(s, caller, requested).await?;
            if let Some(k) = key {
                store_keys::get(&s.store, Some(&developer_id), k).await?;
            }
            developer_id
        }
    };
    let filename = match r.period {
        Some(p) => format!("usage-{developer_id}-{p}.csv"),
        None => format!(
            "usage-{developer_id}-{}-to-{}.csv",
            r.first_date(),
            r.last_date()
        ),
    };
    let mut export = Export {
        client: db.client.clone(),
        developer_id,
        key_id: q.key_id,
        slices: month_slices(&r).into_iter(),
    };
    let mut buf = Vec::with_capacity(CHUNK_BYTES + 4096);
    buf.extend_from_slice(HEADER.as_bytes());
    // The first slice's query now: a ClickHouse failure is still an error response.
    let mut cursor = export.next_cursor()?;
    if let Some(c) = cursor.as_mut() {
        if let Some(row) = c.next().await? {
            write_row(&mut buf, &row);
        }
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(2);
    let log_id = export.developer_id.clone();
    tokio::spawn(async move {
        match stream(export, cursor, buf, &tx).await {
            Ok(rows) => tracing::debug!(developer_id = %log_id, rows, "usage export done"),
            Err(StreamEnd::ClientGone) => {
                tracing::info!(developer_id = %log_id, "usage export: client left")
            }
            Err(StreamEnd::Failed(e)) => {
                tracing::error!(developer_id = %log_id, error = %e, "usage export failed mid-stream; the body was cut short");
                let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
            }
        }
    });
    let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_str(&format!("attachment; filename=\"{filename}\""))
            .map_err(AppError::internal)?,
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
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
    let mut export = Export {
        client: client.clone(),
        developer_id: developer_id.to_owned(),
        key_id: key_id.map(str::to_owned),
        slices: month_slices(range).into_iter(),
    };
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

enum StreamEnd {
    ClientGone,
    Failed(clickhouse::error::Error),
}

impl From<clickhouse::error::Error> for StreamEnd {
    fn from(e: clickhouse::error::Error) -> Self {
        StreamEnd::Failed(e)
    }
}

/// Writes the remaining rows: the current cursor's, then each further slice's. Returns the
/// number of rows written after the first.
async fn stream(
    mut export: Export,
    mut cursor: Option<Cursor>,
    mut buf: Vec<u8>,
    tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> Result<u64, StreamEnd> {
    let mut rows = 0u64;
    while let Some(c) = cursor.as_mut() {
        while let Some(row) = c.next().await? {
            write_row(&mut buf, &row);
            rows += 1;
            if buf.len() >= CHUNK_BYTES {
                let full = std::mem::replace(&mut buf, Vec::with_capacity(CHUNK_BYTES + 4096));
                tx.send(Ok(Bytes::from(full)))
                    .await
                    .map_err(|_| StreamEnd::ClientGone)?;
            }
        }
        cursor = export.next_cursor()?;
    }
    if !buf.is_empty() {
        tx.send(Ok(Bytes::from(buf)))
            .await
            .map_err(|_| StreamEnd::ClientGone)?;
    }
    Ok(rows)
}

fn write_row(buf: &mut Vec<u8>, r: &ExportRow<'_>) {
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

/// Whether a spreadsheet would read a cell starting with `s` as a formula: `=`, `+`, `-`,
/// `@`, a tab or a carriage return first (OWASP, "CSV Injection").
pub fn is_formula_like(s: &str) -> bool {
    matches!(
        s.as_bytes().first(),
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r')
    )
}

/// One text cell: formula-like text (see [`is_formula_like`]; e.g. a `user_agent` of
/// `=HYPERLINK(…)`) gets a leading `'`, which spreadsheets show as text rather than
/// evaluate; then RFC 4180: quoted, with quotes doubled, when it holds a comma, a quote or a
/// line break. Only for text columns: numbers (a negative cost) are written as they are.
pub fn text_cell(buf: &mut Vec<u8>, s: &str) {
    let quoted = s.bytes().any(|b| matches!(b, b',' | b'"' | b'\r' | b'\n'));
    if quoted {
        buf.push(b'"');
    }
    if is_formula_like(s) {
        buf.push(b'\'');
    }
    for (i, part) in s.split('"').enumerate() {
        if i > 0 {
            buf.extend_from_slice(b"\"\"");
        }
        buf.extend_from_slice(part.as_bytes());
    }
    if quoted {
        buf.push(b'"');
    }
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
fn write_usd(buf: &mut Vec<u8>, nanos: i64) {
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
    fn usd_like_the_json() {
        for n in [
            0i64,
            1,
            10,
            300_000,
            1_000_000_000,
            1_250_000_000,
            123_456_789_012,
            999_999_999,
            -1,
            -1_500_000_000,
            i64::MAX,
            i64::MIN + 1,
        ] {
            let mut b = Vec::new();
            write_usd(&mut b, n);
            assert_eq!(String::from_utf8(b).unwrap(), super::super::usd(n), "{n}");
        }
    }

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
            from: super::super::range::parse_date("2026-01-30").unwrap(),
            to: super::super::range::parse_date("2026-03-02").unwrap(),
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
