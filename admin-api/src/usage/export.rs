//! `GET /developer/usage/export`: a developer's raw usage rows (`usage_events`) as CSV, for any
//! range, streamed in constant memory: ClickHouse rows are read from a cursor, one calendar
//! month per query (sorted by time), written as CSV into a buffer that is handed to the
//! response whenever it holds 64 KiB. A bounded channel between the two makes a slow client
//! slow down the query instead of growing a buffer.
//!
//! The first query runs before the response starts, so an unreachable ClickHouse is a 503. A
//! failure after that can only cut the body short (the chunked encoding is never finished, so
//! clients see an incomplete transfer); it is logged.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::mpsc;

use aihub_store::keys as store_keys;

use super::whose;
use crate::auth::Caller;
use crate::csv::{write_row, Cursor, Export, CHUNK_BYTES, HEADER};
use crate::error::{AppError, Query};
use crate::range::RangeParams;
use crate::state::AppState;

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
    let mut export = Export::new(&db.client, developer_id, q.key_id, &r);
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

#[cfg(test)]
mod tests {
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
            crate::csv::write_usd(&mut b, n);
            assert_eq!(String::from_utf8(b).unwrap(), crate::usage::usd(n), "{n}");
        }
    }
}
