//! The request sent upstream, rendered straight into HTTP/1.1 wire bytes and written in one
//! write.
//!
//! pingora's HTTP/1 client writes and flushes the request header, then writes the body: two
//! writes, two TCP segments, two reads at the provider. With the whole body buffered already,
//! the gateway renders header and (small) body into one buffer, without building a header map,
//! and writes it on pingora's pooled connection; the answer is then read with pingora's HTTP/1
//! session rebuilt on the same connection, so pooling and keep-alive stay pingora's.

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorType};
use pingora_http::RequestHeader;

use crate::endpoint::Endpoint;
use crate::error::GatewayError;
use crate::routing::Upstream;

/// Bodies up to this size are copied behind the request header and leave in the same write;
/// larger ones are written after it (a copy would cost more than the second write).
pub const INLINE_BODY_MAX: usize = 16 * 1024;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Request headers never forwarded: hop-by-hop, framing (recomputed), the caller's credentials,
/// `accept-encoding` (the gateway reads response bodies to meter them), and what proxies say
/// about the client (its address is not the provider's to know).
fn is_dropped_request_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "host"
            | "authorization"
            | "x-api-key"
            | "content-length"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "upgrade"
            | "expect"
            | "accept-encoding"
            // Who the client is stays here: end users' addresses are not the provider's.
            | "x-forwarded-for"
            | "x-forwarded-host"
            | "x-forwarded-proto"
            | "forwarded"
            | "x-real-ip"
    )
}

/// Headers naming an account at the provider. Sent by a client, they would choose which of the
/// platform's organizations or projects pays (the platform's credential goes with them):
/// stripped unless the upstream has `forward_account_headers`.
const ACCOUNT_REQUEST_HEADERS: [&str; 2] = ["openai-organization", "openai-project"];

/// Where a request goes: one endpoint of an upstream, and what the upstream adds.
pub struct Target<'a> {
    /// The endpoint's base path (`/v1`, `/openai/deployments/x`).
    pub base_path: &'a str,
    /// The endpoint's base query (Azure's `api-version=…`), empty when none.
    pub base_query: &'a str,
    pub host: &'a HeaderValue,
    /// The upstream's fixed headers.
    pub headers: &'a [(HeaderName, HeaderValue)],
    /// The upstream's credential header.
    pub auth: Option<&'a (HeaderName, HeaderValue)>,
    pub forward_account_headers: bool,
}

impl<'a> Target<'a> {
    pub fn of(endpoint: &'a Endpoint, upstream: &'a Upstream) -> Target<'a> {
        Target {
            base_path: &endpoint.base_path,
            base_query: &endpoint.base_query,
            host: &endpoint.host,
            headers: &upstream.headers,
            auth: upstream.auth.as_ref(),
            forward_account_headers: upstream.forward_account_headers,
        }
    }

    /// Whether the gateway sets this header itself (the client's is not forwarded).
    fn sets(&self, name: &HeaderName) -> bool {
        *name == X_REQUEST_ID
            || self.headers.iter().any(|(n, _)| n == name)
            || self.auth.is_some_and(|(n, _)| n == name)
    }
}

/// A request as it goes on the wire to one endpoint: the request line and header, and the body
/// too when it is small ([`INLINE_BODY_MAX`]).
pub struct WireRequest {
    bytes: Bytes,
    body_inline: bool,
}

impl WireRequest {
    /// Renders the request for `target`: the client's path under the endpoint's base path (the
    /// path is the one the client sent, already checked by [`crate::path::check`]: never
    /// rewritten), the base query then the client's, the client's headers minus the dropped
    /// ones, its account headers (unless forwarded) and those the gateway sets (host, exact
    /// framing, request id, the upstream's fixed headers and credential). Header values are the
    /// client's as pingora parsed them or the configuration's as checked at load: none holds CR
    /// or LF.
    pub fn render(
        client: &RequestHeader,
        target: &Target<'_>,
        body: &Bytes,
        request_id: &HeaderValue,
    ) -> Result<WireRequest, GatewayError> {
        let tail = client.uri.path().strip_prefix("/v1").unwrap_or("");
        let body_inline = body.len() <= INLINE_BODY_MAX;
        let mut w = BytesMut::with_capacity(1024 + if body_inline { body.len() } else { 0 });
        w.extend_from_slice(client.method.as_str().as_bytes());
        w.extend_from_slice(b" ");
        let start = w.len();
        w.extend_from_slice(target.base_path.as_bytes());
        w.extend_from_slice(tail.as_bytes());
        let queries = [Some(target.base_query), client.uri.query()];
        for (n, q) in queries
            .into_iter()
            .flatten()
            .filter(|q| !q.is_empty())
            .enumerate()
        {
            w.extend_from_slice(if n == 0 { b"?" } else { b"&" });
            w.extend_from_slice(q.as_bytes());
        }
        // Bytes never allowed in a request target (RFC 9112 3.2), as pingora's writer checks.
        if w[start..]
            .iter()
            .any(|&b| matches!(b, 0 | b'\r' | b'\n' | b' '))
        {
            return Err(GatewayError::Internal("request target not sendable".into()));
        }
        w.extend_from_slice(b" HTTP/1.1\r\n");
        let mut put = |name: &[u8], value: &[u8]| {
            w.extend_from_slice(name);
            w.extend_from_slice(b": ");
            w.extend_from_slice(value);
            w.extend_from_slice(b"\r\n");
        };
        put(b"host", target.host.as_bytes());
        let mut length = itoa::Buffer::new();
        put(b"content-length", length.format(body.len()).as_bytes());
        put(b"x-request-id", request_id.as_bytes());
        for (name, value) in target.headers.iter().chain(target.auth) {
            put(name.as_str().as_bytes(), value.as_bytes());
        }
        for (name, value) in client.headers.iter() {
            let account = ACCOUNT_REQUEST_HEADERS.contains(&name.as_str());
            if !is_dropped_request_header(name)
                && (!account || target.forward_account_headers)
                && !target.sets(name)
            {
                put(name.as_str().as_bytes(), value.as_bytes());
            }
        }
        w.extend_from_slice(b"\r\n");
        if body_inline {
            w.extend_from_slice(body);
        }
        Ok(WireRequest {
            bytes: w.freeze(),
            body_inline,
        })
    }

    /// Writes the request (and `body`, unless inline) on the session's connection, within the
    /// peer's write timeout, and returns an HTTP/1 session on the same connection to read the
    /// answer. Peers are HTTP/1 only (no ALPN is offered, so the connector never makes HTTP/2
    /// sessions).
    pub async fn write(
        &self,
        up: HttpSession,
        peer: &HttpPeer,
        body: &Bytes,
    ) -> pingora_error::Result<HttpSession> {
        use pingora_core::protocols::http::v1::client::HttpSession as Http1Session;
        use pingora_error::OrErr;
        use tokio::io::AsyncWriteExt;
        let HttpSession::H1(h1) = up else {
            return Error::e_explain(ErrorType::InternalError, "not an HTTP/1 upstream session");
        };
        let mut stream = h1.into_inner();
        let write = async {
            stream.write_all(&self.bytes).await?;
            if !self.body_inline {
                stream.write_all(body).await?;
            }
            stream.flush().await
        };
        match peer.options.write_timeout {
            Some(limit) => match tokio::time::timeout(limit, write).await {
                Ok(done) => done.or_err(ErrorType::WriteError, "writing the request")?,
                Err(_) => return Error::e_explain(ErrorType::WriteTimedout, "writing the request"),
            },
            None => write
                .await
                .or_err(ErrorType::WriteError, "writing the request")?,
        }
        Ok(HttpSession::H1(Http1Session::new_with_options(
            stream, peer,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(path: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut h = RequestHeader::build("POST", path.as_bytes(), None).unwrap();
        for (n, v) in headers {
            h.append_header(n.to_string(), *v).unwrap();
        }
        h
    }

    fn text(w: &WireRequest) -> &str {
        std::str::from_utf8(&w.bytes).unwrap()
    }

    #[test]
    fn renders_header_and_small_body_in_one_buffer() {
        let host = HeaderValue::from_static("example.openai.azure.com");
        let fixed = [(
            HeaderName::from_static("x-team"),
            HeaderValue::from_static("a"),
        )];
        let auth = (
            HeaderName::from_static("api-key"),
            HeaderValue::from_static("sk-upstream"),
        );
        let target = Target {
            base_path: "/openai/deployments/gpt",
            base_query: "api-version=2024-10-21",
            host: &host,
            headers: &fixed,
            auth: Some(&auth),
            forward_account_headers: false,
        };
        let req = client(
            "/v1/chat/completions?x=1",
            &[
                ("Authorization", "Bearer ahub_secret"),
                ("Content-Type", "application/json"),
                ("X-Team", "client's"),
                ("api-key", "client's"),
                ("x-request-id", "client's"),
                ("OpenAI-Organization", "org-other"),
                ("Accept-Encoding", "gzip"),
                ("User-Agent", "OpenAI/Python 2.8.1"),
            ],
        );
        let body = Bytes::from_static(b"{\"model\":\"gpt\"}");
        let id = HeaderValue::from_static("0193-id");
        let w = WireRequest::render(&req, &target, &body, &id).unwrap();
        assert!(w.body_inline);
        assert_eq!(
            text(&w),
            "POST /openai/deployments/gpt/chat/completions?api-version=2024-10-21&x=1 HTTP/1.1\r\n\
             host: example.openai.azure.com\r\ncontent-length: 15\r\nx-request-id: 0193-id\r\n\
             x-team: a\r\napi-key: sk-upstream\r\ncontent-type: application/json\r\n\
             user-agent: OpenAI/Python 2.8.1\r\n\r\n{\"model\":\"gpt\"}"
        );
    }

    #[test]
    fn large_bodies_follow_the_header() {
        let host = HeaderValue::from_static("api.openai.com");
        let target = Target {
            base_path: "/v1",
            base_query: "",
            host: &host,
            headers: &[],
            auth: None,
            forward_account_headers: true,
        };
        let req = client("/v1/embeddings", &[("OpenAI-Project", "proj_1")]);
        let body = Bytes::from(vec![b'x'; INLINE_BODY_MAX + 1]);
        let id = HeaderValue::from_static("id");
        let w = WireRequest::render(&req, &target, &body, &id).unwrap();
        assert!(!w.body_inline);
        assert_eq!(
            text(&w),
            "POST /v1/embeddings HTTP/1.1\r\nhost: api.openai.com\r\ncontent-length: 16385\r\n\
             x-request-id: id\r\nopenai-project: proj_1\r\n\r\n"
        );
    }
}
