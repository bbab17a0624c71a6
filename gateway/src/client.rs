//! Writes to the client, each bounded by `server.response_write_timeout` (set on the session by
//! the proxy): a client that stops reading becomes [`GatewayError::ClientTimeout`], a closed
//! connection [`GatewayError::ClientGone`]; whether the client waits for `100 Continue`.

use std::time::Duration;

use pingora_error::{Error, ErrorType, Result};
use pingora_proxy::Session;

use crate::error::GatewayError;

/// One write to the client, bounded by `limit` (`server.response_write_timeout`, as set on the
/// session by the proxy's `handle`).
pub async fn client_write<T>(
    limit: Option<Duration>,
    write: impl std::future::Future<Output = Result<T>>,
) -> Result<T, GatewayError> {
    let done = match limit {
        Some(limit) => tokio::time::timeout(limit, write)
            .await
            .map_err(|_| GatewayError::ClientTimeout)?,
        None => write.await,
    };
    done.map_err(|e| client_error(&e))
}

/// A failed write to the client: timed out (`server.response_write_timeout`) or gone.
pub fn client_error(e: &Error) -> GatewayError {
    match e.etype() {
        ErrorType::WriteTimedout => GatewayError::ClientTimeout,
        _ => GatewayError::ClientGone,
    }
}

/// Whether the client waits for `100 Continue` before sending its body (HTTP/1.1 `Expect`).
pub fn expects_continue(session: &Session) -> bool {
    !session.is_http2()
        && session
            .get_header(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}
