//! The Files and Batches APIs (`/v1/files…`, `/v1/batches…`): the gateway authenticates the
//! caller's key (as for any call) and forwards the call to the admin API, which owns files,
//! batches and their queue, at `{control_plane.admin_url}/internal{path}{?query}`.
//!
//! What goes to the admin API: the method, the client's `content-type`, `accept` and
//! `user-agent`, its framing (`content-length`, or `transfer-encoding: chunked`), the gateway's
//! `x-request-id`, and the caller's identity, signed with the internal secret over method,
//! path (without the query) and time ([`aihub_apikey::internal`]): `x-aihub-key-id`,
//! `x-aihub-developer-id`, `x-aihub-identity-ts` (unix ms), `x-aihub-identity-sig`. Nothing
//! else of the client's (never its credential, nor an `x-aihub-*` header it made up).
//!
//! Bodies stream both ways chunk by chunk, never buffered: an upload (up to
//! `control_plane.max_upload_bytes`, 413 past it, declared or streamed) goes to the admin API
//! as it arrives, each read bounded by `server.request_body_timeout`; the answer (a file's
//! content can be large) goes back to the client as it arrives, headers and status untouched
//! apart from hop-by-hop headers, `x-request-id` and the rate-limit headers. These calls are
//! not model calls: no token reservation, no usage record.

use std::sync::Arc;
use std::time::Instant;

use aihub_apikey::internal::{
    Identity, InternalSecret, DEVELOPER_ID_HEADER, KEY_ID_HEADER, SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
};
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use pingora_core::protocols::http::client::HttpSession;
use pingora_error::{Error, ErrorType};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::Session;

use crate::client::client_write;
use crate::clock::now_ms;
use crate::context::{RequestCtx, Shared};
use crate::error::{AdminFailure, GatewayError};
use crate::keys::KeyRecord;
use crate::routing::{AdminPeer, Runtime};

/// How many times a call without a body may meet a stale pooled connection.
const STALE_RETRIES: usize = 2;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Client headers the admin API gets (besides framing): what it needs to read the body and
/// shape its answer.
const FORWARDED_HEADERS: [HeaderName; 3] =
    [header::CONTENT_TYPE, header::ACCEPT, header::USER_AGENT];

/// Whether `endpoint` (the path after `/v1/`) is a Files or Batches call.
pub fn is_files_or_batches(endpoint: &str) -> bool {
    ["files", "batches"].iter().any(|api| {
        endpoint
            .strip_prefix(api)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// The admin API's path for a client's path (`/v1/files/file-abc/content`) and query:
/// `{base}/internal/v1/files/file-abc/content?{query}`.
pub fn admin_path(base_path: &str, client_path: &str, query: Option<&str>) -> String {
    let mut path = String::with_capacity(base_path.len() + client_path.len() + 16);
    path.push_str(base_path);
    path.push_str("/internal");
    path.push_str(client_path);
    if let Some(q) = query {
        path.push('?');
        path.push_str(q);
    }
    path
}

/// How a request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// `content-length`.
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
}

impl Framing {
    /// The framing the client declared (HTTP/1.1: chunked wins over a length).
    pub fn of(client: &RequestHeader) -> Result<Framing, GatewayError> {
        let chunked = client
            .headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
        if chunked {
            return Ok(Framing::Chunked);
        }
        match client.headers.get(header::CONTENT_LENGTH) {
            None => Ok(Framing::Empty),
            Some(v) => {
                let n = v
                    .to_str()
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    // pingora refuses such a request before it gets here.
                    .ok_or_else(|| GatewayError::Internal("invalid Content-Length".into()))?;
                Ok(if n == 0 {
                    Framing::Empty
                } else {
                    Framing::Length(n)
                })
            }
        }
    }

    fn has_body(self) -> bool {
        self != Framing::Empty
    }
}

/// The request header the admin API gets (see the module documentation). `ts_ms` is the
/// signature's time, unix milliseconds.
pub fn admin_request(
    client: &RequestHeader,
    admin: &AdminPeer,
    (identity, secret, ts_ms): (&Identity, &InternalSecret, i64),
    framing: Framing,
    request_id: &HeaderValue,
) -> Result<RequestHeader, GatewayError> {
    let internal = |e: Box<Error>| GatewayError::Internal(e.to_string());
    let path = admin_path(&admin.base_path, client.uri.path(), client.uri.query());
    let mut h =
        RequestHeader::build(client.method.clone(), path.as_bytes(), Some(12)).map_err(internal)?;
    for name in &FORWARDED_HEADERS {
        if let Some(v) = client.headers.get(name) {
            h.insert_header(name.clone(), v.clone()).map_err(internal)?;
        }
    }
    match framing {
        Framing::Empty => {}
        Framing::Length(n) => h
            .insert_header(header::CONTENT_LENGTH, n)
            .map_err(internal)?,
        Framing::Chunked => h
            .insert_header(header::TRANSFER_ENCODING, "chunked")
            .map_err(internal)?,
    }
    h.insert_header(header::HOST, admin.host.clone())
        .map_err(internal)?;
    h.insert_header(X_REQUEST_ID, request_id.clone())
        .map_err(internal)?;
    let signature =
        secret.sign_identity(identity, client.method.as_str(), client.uri.path(), ts_ms);
    let value = |s: &str| {
        HeaderValue::from_str(s).map_err(|_| GatewayError::Internal("identity header".into()))
    };
    for (name, v) in [
        (KEY_ID_HEADER, value(&identity.key_id)?),
        (DEVELOPER_ID_HEADER, value(&identity.developer_id)?),
        (TIMESTAMP_HEADER, HeaderValue::from(ts_ms)),
        (SIGNATURE_HEADER, value(&signature)?),
    ] {
        h.insert_header(name, v).map_err(internal)?;
    }
    Ok(h)
}

/// Where a Files or Batches call goes and what signs it; refused when the gateway has no
/// `admin_url` (404) or has not read the internal secret yet (503). Checked before the call's
/// limits, so such a refusal takes nothing from its buckets.
pub fn target(shared: &Shared, rt: &Runtime) -> Result<Arc<InternalSecret>, GatewayError> {
    if rt.admin.is_none() {
        return Err(GatewayError::Admin {
            kind: AdminFailure::NotConfigured,
            detail: "no control_plane.admin_url".into(),
        });
    }
    shared
        .internal_secret
        .load_full()
        .ok_or_else(|| GatewayError::Admin {
            kind: AdminFailure::SecretMissing,
            detail: "the internal secret has not been read from the control plane yet".into(),
        })
}

/// Forwards a Files or Batches call of `key` to the admin API and streams its answer back
/// (after [`target`]).
pub async fn forward(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut RequestCtx,
    (rt, secret): (&Runtime, &InternalSecret),
    key: &KeyRecord,
) -> Result<(), GatewayError> {
    let admin = rt.admin.as_ref().ok_or_else(|| GatewayError::Admin {
        kind: AdminFailure::NotConfigured,
        detail: "no control_plane.admin_url".into(),
    })?;
    let limit = rt.max_upload_bytes;
    let framing = Framing::of(session.req_header())?;
    if matches!(framing, Framing::Length(n) if n > limit) {
        return Err(too_large(limit));
    }
    let identity = Identity {
        key_id: key.key_id.to_string(),
        developer_id: key.developer_id.to_string(),
    };
    let signed = (&identity, secret, now_ms() as i64);
    let header = admin_request(
        session.req_header(),
        admin,
        signed,
        framing,
        &ctx.request_id_header,
    )?;
    let sent_at = Instant::now();
    let mut up = send_header(shared, admin, header, framing.has_body()).await?;
    let mut reusable = true;
    if framing.has_body() {
        if crate::client::expects_continue(session) {
            let limit = session.downstream_session.get_write_timeout();
            client_write(limit, session.downstream_session.write_continue_response()).await?;
        }
        let answered = match stream_body(session, ctx, rt, &mut up).await {
            Ok(()) => up.read_response_header().await,
            // The admin API stopped taking the body: it may have answered (a refusal). The
            // rest of the client's body is unread, and the admin connection is done.
            Err(Upload::Admin(e)) => {
                session.set_keepalive(None);
                reusable = false;
                up.read_response_header().await.map_err(|_| e)
            }
            Err(Upload::Client(e)) => return Err(e),
        };
        answered.map_err(|e| exchange_error(shared, &e))?;
    }
    ctx.upstream_latency = Some(sent_at.elapsed());
    relay(shared, session, ctx, (admin, reusable), up).await
}

/// Connects (or reuses a pooled connection) and writes the request header; without a body,
/// also ends the request and reads the answer's header, retrying a stale pooled connection.
async fn send_header(
    shared: &Shared,
    admin: &AdminPeer,
    header: RequestHeader,
    has_body: bool,
) -> Result<HttpSession, GatewayError> {
    let mut stale = 0;
    loop {
        let (mut up, reused) = shared
            .connector
            .get_http_session(&admin.peer)
            .await
            .map_err(|e| {
                count_error(shared, "connect");
                GatewayError::Admin {
                    kind: AdminFailure::Unreachable,
                    detail: format!("{}: {e}", admin.url),
                }
            })?;
        // The connector does not apply the peer's I/O timeouts to the session; we must.
        up.set_read_timeout(admin.peer.options.read_timeout);
        up.set_write_timeout(admin.peer.options.write_timeout);
        let result = async {
            up.write_request_header(Box::new(header.clone())).await?;
            if !has_body {
                up.finish_request_body().await?;
                up.read_response_header().await?;
            }
            Ok::<(), Box<Error>>(())
        }
        .await;
        match result {
            Ok(()) => return Ok(up),
            // A pooled connection the admin API closed meanwhile: nothing was processed.
            Err(e) if reused && stale < STALE_RETRIES && is_stale(&e) => stale += 1,
            Err(e) => return Err(exchange_error(shared, &e)),
        }
    }
}

/// Why an upload stopped.
enum Upload {
    /// On the client's side: too large, too slow, gone.
    Client(GatewayError),
    /// On the admin API's side.
    Admin(Box<Error>),
}

/// Streams the client's body to the admin API as it arrives, bounded in size
/// (`max_upload_bytes`) and in silence between reads (`request_body_timeout`).
async fn stream_body(
    session: &mut Session,
    ctx: &mut RequestCtx,
    rt: &Runtime,
    up: &mut HttpSession,
) -> Result<(), Upload> {
    let limit = rt.max_upload_bytes;
    let mut received: u64 = 0;
    loop {
        let read = tokio::time::timeout(rt.request_body_timeout, session.read_request_body());
        let chunk = match read.await {
            Err(_) => return Err(Upload::Client(GatewayError::BodyTimeout)),
            Ok(Err(_)) => return Err(Upload::Client(GatewayError::ClientGone)),
            Ok(Ok(None)) => break,
            Ok(Ok(Some(chunk))) => chunk,
        };
        received += chunk.len() as u64;
        ctx.bytes_in += chunk.len();
        if received > limit {
            return Err(Upload::Client(too_large(limit)));
        }
        up.write_request_body(chunk, false)
            .await
            .map_err(Upload::Admin)?;
    }
    up.finish_request_body().await.map_err(Upload::Admin)?;
    Ok(())
}

/// Sends the admin API's answer to the client: its status and headers (without hop-by-hop
/// headers, with our `x-request-id` and rate-limit headers), then its body as it arrives.
async fn relay(
    shared: &Shared,
    session: &mut Session,
    ctx: &mut RequestCtx,
    (admin, reusable): (&AdminPeer, bool),
    mut up: HttpSession,
) -> Result<(), GatewayError> {
    let source = up
        .response_header()
        .ok_or_else(|| GatewayError::Internal("no admin response header".into()))?;
    let mut resp = source.as_owned_parts();
    for name in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    ] {
        resp.headers.remove(name);
    }
    resp.headers
        .insert(X_REQUEST_ID, ctx.request_id_header.clone());
    ctx.rate_headers.apply(&mut resp.headers);
    ctx.status = resp.status.as_u16();
    ctx.response_started = true;
    let limit = session.downstream_session.get_write_timeout();
    let header = Box::new(ResponseHeader::from(resp));
    client_write(limit, session.write_response_header(header, false)).await?;
    loop {
        let chunk: Bytes = match up.read_response_body().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => return Err(exchange_error(shared, &e)),
        };
        ctx.bytes_out += chunk.len() as u64;
        client_write(limit, session.write_response_body(Some(chunk), false)).await?;
        if up.response_done() {
            break;
        }
    }
    client_write(limit, session.write_response_body(None, true)).await?;
    if reusable {
        shared
            .connector
            .release_http_session(up, &admin.peer, admin.peer.options.idle_timeout)
            .await;
    }
    Ok(())
}

fn too_large(limit: u64) -> GatewayError {
    GatewayError::BodyTooLarge(usize::try_from(limit).unwrap_or(usize::MAX))
}

fn is_stale(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectionClosed | ErrorType::WriteError | ErrorType::ReadError
    )
}

/// A failed exchange with the admin API: a timeout is a 504, anything else a 502.
fn exchange_error(shared: &Shared, e: &Error) -> GatewayError {
    let timed_out = matches!(
        e.etype(),
        ErrorType::ReadTimedout | ErrorType::WriteTimedout
    );
    count_error(shared, if timed_out { "timeout" } else { "exchange" });
    GatewayError::Admin {
        kind: if timed_out {
            AdminFailure::Timeout
        } else {
            AdminFailure::Failed
        },
        detail: e.to_string(),
    }
}

fn count_error(shared: &Shared, kind: &str) {
    shared.metrics.admin_errors.with_label_values(&[kind]).inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> InternalSecret {
        InternalSecret::new(&InternalSecret::generate_text()).unwrap()
    }

    fn admin(url: &str) -> AdminPeer {
        let base = crate::config::BaseUrl::parse(url).unwrap();
        AdminPeer::build(url, &base).unwrap()
    }

    #[test]
    fn files_and_batches_paths() {
        for p in [
            "files",
            "files/file-abc",
            "files/file-abc/content",
            "batches",
            "batches/batch_1/cancel",
        ] {
            assert!(is_files_or_batches(p), "{p}");
        }
        for p in [
            "filesystem",
            "batch",
            "batchesx/1",
            "chat/completions",
            "models",
            "",
        ] {
            assert!(!is_files_or_batches(p), "{p}");
        }
        assert_eq!(
            admin_path("", "/v1/files/file-abc/content", None),
            "/internal/v1/files/file-abc/content"
        );
        assert_eq!(
            admin_path("/admin", "/v1/batches", Some("limit=2&after=batch_1")),
            "/admin/internal/v1/batches?limit=2&after=batch_1"
        );
    }

    fn client(method: &str, uri: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut h = RequestHeader::build(method, uri.as_bytes(), None).unwrap();
        for (n, v) in headers {
            h.append_header(n.to_string(), *v).unwrap();
        }
        h
    }

    #[test]
    fn the_admin_request_carries_a_signed_identity_and_nothing_of_the_credential() {
        let s = secret();
        let peer = admin("http://127.0.0.1:8081");
        let id = Identity {
            key_id: "key_1".into(),
            developer_id: "dev_1".into(),
        };
        let c = client(
            "POST",
            "/v1/files?purpose=batch",
            &[
                ("authorization", "Bearer ahub_dev_secret"),
                ("x-api-key", "ahub_dev_secret"),
                ("x-aihub-key-id", "key_someone_else"),
                ("x-aihub-identity-sig", "forged"),
                ("cookie", "a=b"),
                ("content-type", "multipart/form-data; boundary=xyz"),
                ("accept", "application/json"),
                ("content-length", "1234"),
                ("expect", "100-continue"),
            ],
        );
        let rid = HeaderValue::from_static("0192f0c1-0000-7000-8000-000000000001");
        let framing = Framing::of(&c).unwrap();
        assert_eq!(framing, Framing::Length(1234));
        let h = admin_request(&c, &peer, (&id, &s, 1_000_000), framing, &rid).unwrap();
        assert_eq!(h.method, http::Method::POST);
        assert_eq!(
            h.uri.to_string(),
            "/internal/v1/files?purpose=batch",
            "path and query"
        );
        let get = |n: &str| h.headers.get(n).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(get("host").as_deref(), Some("127.0.0.1:8081"));
        assert_eq!(get("content-length").as_deref(), Some("1234"));
        assert_eq!(
            get("content-type").as_deref(),
            Some("multipart/form-data; boundary=xyz")
        );
        assert_eq!(get("accept").as_deref(), Some("application/json"));
        assert_eq!(get("x-request-id"), Some(rid.to_str().unwrap().to_owned()));
        for gone in [
            "authorization",
            "x-api-key",
            "cookie",
            "expect",
            "transfer-encoding",
        ] {
            assert_eq!(get(gone), None, "{gone}");
        }
        assert_eq!(get(KEY_ID_HEADER).as_deref(), Some("key_1"));
        assert_eq!(get(DEVELOPER_ID_HEADER).as_deref(), Some("dev_1"));
        assert_eq!(get(TIMESTAMP_HEADER).as_deref(), Some("1000000"));
        // The signature covers the method and the client's path without its query.
        let sig = get(SIGNATURE_HEADER).unwrap();
        assert!(s
            .verify_identity(&id, "POST", "/v1/files", "1000000", &sig, 1_000_500)
            .is_ok());
        assert!(s
            .verify_identity(&id, "GET", "/v1/files", "1000000", &sig, 1_000_500)
            .is_err());
        assert!(secret()
            .verify_identity(&id, "POST", "/v1/files", "1000000", &sig, 1_000_500)
            .is_err());
    }

    #[test]
    fn framing_is_kept() {
        let s = secret();
        let peer = admin("http://localhost:80/base/");
        let id = Identity {
            key_id: "k".into(),
            developer_id: "d".into(),
        };
        let rid = HeaderValue::from_static("x");
        let chunked = client(
            "POST",
            "/v1/files",
            &[("transfer-encoding", "chunked"), ("content-length", "5")],
        );
        let framing = Framing::of(&chunked).unwrap();
        assert_eq!(framing, Framing::Chunked);
        let h = admin_request(&chunked, &peer, (&id, &s, 1), framing, &rid).unwrap();
        assert_eq!(h.headers["transfer-encoding"], "chunked");
        assert!(h.headers.get("content-length").is_none());
        assert_eq!(h.uri.path(), "/base/internal/v1/files");
        assert_eq!(h.headers["host"], "localhost");

        let get = client("GET", "/v1/files/file-abc/content", &[]);
        let framing = Framing::of(&get).unwrap();
        assert_eq!(framing, Framing::Empty);
        let h = admin_request(&get, &peer, (&id, &s, 1), framing, &rid).unwrap();
        assert!(h.headers.get("content-length").is_none());
        assert!(h.headers.get("transfer-encoding").is_none());
        let sig = h.headers[SIGNATURE_HEADER].to_str().unwrap();
        assert!(s
            .verify_identity(&id, "GET", "/v1/files/file-abc/content", "1", sig, 1)
            .is_ok());
        assert!(Framing::of(&client("POST", "/v1/files", &[("content-length", "x")])).is_err());
    }
}
