//! Every way a request can fail before or while it is proxied, and the one place where a failure
//! becomes an OpenAI-shaped error body (`{"error":{"message","type","param","code"}}`).
//!
//! Messages never contain the caller's key, nor internal details (addresses, OS errors): those
//! go to the logs through the error's `Display`. [`Reason`] (why a limit refused) lives here
//! too, so that the limiter and this module do not import each other.

use aihub_apikey::KeyFormatError;
use serde::Serialize;

/// Why a request was refused (the `reason` label of `aihub_rate_limited_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The key's in-flight cap.
    Concurrency,
    /// A requests-per-minute limit (key or developer).
    Requests,
    /// A tokens-per-minute limit (key or developer).
    Tokens,
    /// The plan's monthly tokens are used up (hard-stop plans).
    Quota,
    /// The developer's monthly spend cap is reached (overage plans).
    SpendCap,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Concurrency => "concurrency",
            Reason::Requests => "requests",
            Reason::Tokens => "tokens",
            Reason::Quota => "quota",
            Reason::SpendCap => "spend_cap",
        }
    }
}

/// Why authentication failed; also the `reason` label of `aihub_auth_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    Missing,
    Malformed(KeyFormatError),
    NotFound,
    Disabled,
    Expired,
    /// A batch item's token that does not verify: malformed, tampered, signed with another
    /// secret, expired, or the gateway has no internal secret yet.
    BatchToken,
    /// A valid-looking batch token on a call other than a model call (`POST /v1/…`).
    BatchTokenNotAccepted,
}

impl AuthFailure {
    pub fn reason(&self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::Malformed(_) => "malformed",
            AuthFailure::NotFound => "not_found",
            AuthFailure::Disabled => "disabled",
            AuthFailure::Expired => "expired",
            AuthFailure::BatchToken => "batch_token",
            AuthFailure::BatchTokenNotAccepted => "batch_token_not_accepted",
        }
    }
}

/// Why a Files or Batches call could not be forwarded to the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminFailure {
    /// No `control_plane.admin_url`: the APIs are off on this gateway (404).
    NotConfigured,
    /// The key is declared in the gateway's YAML: only control-plane keys (issued by the admin
    /// API, whose developer has an account) own files and batches (403).
    DeclaredKey,
    /// The internal secret has not been read from the control plane yet (503).
    SecretMissing,
    /// No connection to the admin API (502).
    Unreachable,
    /// The admin API did not answer in time (504).
    Timeout,
    /// The exchange with the admin API failed after the call was sent (502).
    Failed,
}

/// A failure that ends a request with an error response.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("authentication failed: {}", .0.reason())]
    Auth(AuthFailure),
    #[error("endpoint `{0}` is not allowed for this key")]
    EndpointNotAllowed(String),
    #[error("model `{0}` is not allowed for this key")]
    ModelNotAllowed(String),
    /// The client's address is outside the key's IP allowlist.
    #[error("client address not in the key's IP allowlist")]
    IpNotAllowed,
    #[error("unknown model `{0}`")]
    UnknownModel(String),
    #[error("unknown URL {0}")]
    UnknownUrl(String),
    /// The path is not in canonical form (see [`crate::path`]): refused, never rewritten.
    #[error("non-canonical path: {0}")]
    InvalidPath(crate::path::PathError),
    /// A `POST /v1/…` path no upstream of the model (or of any model) serves.
    #[error("unsupported endpoint `/v1/{0}`")]
    UnsupportedEndpoint(String),
    #[error("malformed JSON body: {0}")]
    InvalidJson(String),
    #[error("the body has no `model` string")]
    MissingModel,
    #[error("body larger than {0} bytes")]
    BodyTooLarge(usize),
    /// The body's framing is broken (an invalid chunk size or chunk end): the connection is
    /// closed after the answer, its next bytes cannot be trusted.
    #[error("malformed request body: {0}")]
    InvalidBody(String),
    /// An `Expect` header other than `100-continue` (RFC 9110 §10.1.1).
    #[error("unsupported expectation")]
    ExpectationFailed,
    #[error("timed out reading the request body")]
    BodyTimeout,
    #[error("the client went away while sending the body")]
    ClientGone,
    /// A write to the client did not complete within `server.response_write_timeout`.
    #[error("the client stopped reading the response")]
    ClientTimeout,
    #[error("no upstream endpoint of `{upstream}` accepted a connection: {detail}")]
    UpstreamUnreachable { upstream: String, detail: String },
    #[error("upstream `{upstream}` timed out: {detail}")]
    UpstreamTimeout { upstream: String, detail: String },
    #[error("upstream `{upstream}` failed: {detail}")]
    UpstreamFailed { upstream: String, detail: String },
    #[error("refused by a limit: {}", .reason.as_str())]
    Limited {
        reason: Reason,
        retry_after_secs: u64,
        /// The per-minute limit that refused (requests or tokens), when one did.
        limit: Option<u32>,
    },
    #[error("usage metering is unavailable (WAL over its disk cap)")]
    MeteringUnavailable,
    /// A Files or Batches call the admin API did not take (see [`AdminFailure`]).
    #[error("admin API call failed ({kind:?}): {detail}")]
    Admin { kind: AdminFailure, detail: String },
    #[error("internal error: {0}")]
    Internal(String),
}

/// The OpenAI error envelope.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub error: ErrorObject<'a>,
}

#[derive(Debug, Serialize)]
pub struct ErrorObject<'a> {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub param: Option<&'a str>,
    pub code: Option<&'a str>,
}

impl GatewayError {
    /// HTTP status of the error response.
    pub fn status(&self) -> u16 {
        use GatewayError::*;
        match self {
            Auth(_) => 401,
            EndpointNotAllowed(_) | ModelNotAllowed(_) | IpNotAllowed => 403,
            UnknownModel(_) | UnknownUrl(_) | UnsupportedEndpoint(_) => 404,
            InvalidJson(_) | MissingModel | InvalidPath(_) | InvalidBody(_) => 400,
            ExpectationFailed => 417,
            BodyTimeout => 408,
            BodyTooLarge(_) => 413,
            Limited { .. } => 429,
            ClientGone | ClientTimeout => 499,
            UpstreamUnreachable { .. } | UpstreamFailed { .. } => 502,
            UpstreamTimeout { .. } => 504,
            MeteringUnavailable => 503,
            Internal(_) => 500,
            Admin { kind, .. } => match kind {
                AdminFailure::NotConfigured => 404,
                AdminFailure::DeclaredKey => 403,
                AdminFailure::SecretMissing => 503,
                AdminFailure::Unreachable | AdminFailure::Failed => 502,
                AdminFailure::Timeout => 504,
            },
        }
    }

    /// Whether the route's upstream failed (unreachable, no answer in time, a broken
    /// exchange): a route with fallbacks moves on to the next.
    pub fn is_upstream_failure(&self) -> bool {
        matches!(
            self,
            GatewayError::UpstreamUnreachable { .. }
                | GatewayError::UpstreamTimeout { .. }
                | GatewayError::UpstreamFailed { .. }
        )
    }

    /// Short machine-readable kind, used as the `error` label in metrics and access logs.
    pub fn code(&self) -> &'static str {
        use GatewayError::*;
        match self {
            Auth(AuthFailure::Expired) => "api_key_expired",
            Auth(AuthFailure::Disabled) => "api_key_disabled",
            Auth(_) => "invalid_api_key",
            EndpointNotAllowed(_) | ModelNotAllowed(_) => "permission_denied",
            IpNotAllowed => "ip_not_allowed",
            UnknownModel(_) => "model_not_found",
            UnknownUrl(_) => "unknown_url",
            InvalidPath(_) => "invalid_path",
            UnsupportedEndpoint(_) => "unsupported_endpoint",
            InvalidJson(_) => "invalid_json",
            MissingModel => "missing_model",
            BodyTooLarge(_) => "request_too_large",
            InvalidBody(_) => "invalid_body",
            ExpectationFailed => "expectation_failed",
            Limited { reason, .. } => match reason {
                Reason::Quota | Reason::SpendCap => "insufficient_quota",
                _ => "rate_limit_exceeded",
            },
            BodyTimeout => "request_timeout",
            ClientGone => "client_closed_request",
            ClientTimeout => "client_timeout",
            UpstreamUnreachable { .. } => "upstream_unreachable",
            UpstreamTimeout { .. } => "upstream_timeout",
            UpstreamFailed { .. } => "upstream_error",
            MeteringUnavailable => "metering_unavailable",
            Internal(_) => "internal_error",
            Admin { kind, .. } => match kind {
                AdminFailure::NotConfigured => "unsupported_endpoint",
                AdminFailure::DeclaredKey => "permission_denied",
                AdminFailure::SecretMissing => "service_unavailable",
                AdminFailure::Unreachable => "admin_unreachable",
                AdminFailure::Timeout => "admin_timeout",
                AdminFailure::Failed => "admin_error",
            },
        }
    }

    fn kind(&self) -> &'static str {
        if let GatewayError::Limited { reason, .. } = self {
            return match reason {
                Reason::Tokens => "tokens",
                Reason::Quota | Reason::SpendCap => "insufficient_quota",
                Reason::Requests | Reason::Concurrency => "requests",
            };
        }
        match self.status() {
            500 | 503 => "server_error",
            502 | 504 => "upstream_error",
            _ => "invalid_request_error",
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            GatewayError::ModelNotAllowed(_)
            | GatewayError::UnknownModel(_)
            | GatewayError::MissingModel => Some("model"),
            _ => None,
        }
    }

    /// The message clients see. Safe by construction: no key, no address, no OS error text.
    pub fn client_message(&self) -> String {
        use GatewayError::*;
        match self {
            Auth(AuthFailure::Missing) => "You didn't provide an API key. Send it as `Authorization: Bearer ahub_dev_…` or in the `x-api-key` header.".into(),
            Auth(AuthFailure::Malformed(why)) => format!("Incorrect API key provided: {why}."),
            Auth(AuthFailure::NotFound) => "Incorrect API key provided.".into(),
            Auth(AuthFailure::Disabled) => "This API key has been disabled.".into(),
            Auth(AuthFailure::Expired) => "This API key has expired.".into(),
            Auth(AuthFailure::BatchToken) => "Incorrect batch item token provided.".into(),
            Auth(AuthFailure::BatchTokenNotAccepted) => "A batch item token is accepted only on model calls (`POST /v1/…`).".into(),
            EndpointNotAllowed(e) => format!("This API key may not call `/v1/{e}`."),
            ModelNotAllowed(m) => format!("This API key may not use the model `{m}`."),
            IpNotAllowed => "This API key may not be used from your IP address.".into(),
            UnknownModel(m) => format!("The model `{m}` does not exist or you do not have access to it."),
            UnknownUrl(u) => format!("Unknown request URL: {u}. Please check the URL for typos."),
            InvalidPath(_) => "The request path is not in canonical form: dot segments (`.`, `..`), percent-encoded dots, slashes and unreserved characters, doubled slashes and backslashes are refused.".into(),
            UnsupportedEndpoint(e) => format!("The endpoint `/v1/{e}` is not supported by this gateway for this model."),
            InvalidJson(why) => format!("We could not parse the JSON body of your request: {why}."),
            MissingModel => "You must provide a model parameter (a JSON string).".into(),
            BodyTooLarge(limit) => format!("The request body is larger than the maximum of {limit} bytes."),
            InvalidBody(_) => "The request body is malformed (invalid chunked encoding).".into(),
            ExpectationFailed => "Only `Expect: 100-continue` is supported.".into(),
            Limited { reason, retry_after_secs: wait, limit } => {
                let per_minute = limit.map_or_else(String::new, |n| format!(" Limit: {n} per minute."));
                match reason {
                    Reason::Requests => format!("Rate limit reached for requests.{per_minute} Please try again in {wait}s."),
                    Reason::Tokens => format!("Rate limit reached for tokens.{per_minute} Please try again in {wait}s."),
                    Reason::Concurrency => "Too many concurrent requests for this API key. Please retry when one has finished.".into(),
                    Reason::Quota => "You exceeded your current quota: this month's included tokens are used up. Upgrade your plan, or wait for the next billing period.".into(),
                    Reason::SpendCap => "You reached your monthly spend cap. Raise it in your account settings, or wait for the next billing period.".into(),
                }
            }
            BodyTimeout => "Timed out while reading the request body.".into(),
            ClientGone => "The client closed the request.".into(),
            ClientTimeout => "The client stopped reading the response.".into(),
            UpstreamUnreachable { .. } => "The upstream model provider could not be reached. Please retry.".into(),
            UpstreamTimeout { .. } => "The upstream model provider did not answer in time. Please retry.".into(),
            UpstreamFailed { .. } => "The upstream model provider returned an invalid response. Please retry.".into(),
            MeteringUnavailable => "The service is temporarily unavailable. Please retry later.".into(),
            Internal(_) => "The gateway had an internal error. Please retry.".into(),
            Admin { kind, .. } => match kind {
                AdminFailure::NotConfigured => "The Files and Batches APIs are not enabled on this gateway: they need `control_plane.admin_url` in its configuration.".into(),
                AdminFailure::DeclaredKey => "The Files and Batches APIs need a key issued by the developer portal or the admin API; this key is declared in the gateway's configuration.".into(),
                AdminFailure::SecretMissing => "The Files and Batches APIs are not available yet (the gateway is waiting for the control plane). Please retry later.".into(),
                AdminFailure::Unreachable => "The Files and Batches service could not be reached. Please retry.".into(),
                AdminFailure::Timeout => "The Files and Batches service did not answer in time. Please retry.".into(),
                AdminFailure::Failed => "The Files and Batches service returned an invalid response. Please retry.".into(),
            },
        }
    }

    /// The JSON error body, ready to send.
    pub fn body(&self) -> Vec<u8> {
        let body = ErrorBody {
            error: ErrorObject {
                message: self.client_message(),
                kind: self.kind(),
                param: self.param(),
                code: Some(self.code()),
            },
        };
        serde_json::to_vec(&body).expect("error bodies serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_have_the_openai_shape() {
        let e = GatewayError::UnknownModel("gpt-9".into());
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(e.status(), 404);
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["param"], "model");
        assert!(v["error"]["message"].as_str().unwrap().contains("gpt-9"));
    }

    #[test]
    fn limits_are_429_in_openai_shapes() {
        let body = |reason| {
            let e = GatewayError::Limited {
                reason,
                retry_after_secs: 7,
                limit: Some(60),
            };
            assert_eq!(e.status(), 429);
            serde_json::from_slice::<serde_json::Value>(&e.body()).unwrap()
        };
        let v = body(Reason::Requests);
        assert_eq!(v["error"]["type"], "requests");
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("60 per minute"));
        assert!(v["error"]["message"].as_str().unwrap().contains("7s"));
        assert_eq!(body(Reason::Tokens)["error"]["type"], "tokens");
        let v = body(Reason::Quota);
        assert_eq!(v["error"]["type"], "insufficient_quota");
        assert_eq!(v["error"]["code"], "insufficient_quota");
        assert_eq!(
            body(Reason::SpendCap)["error"]["code"],
            "insufficient_quota"
        );
    }

    #[test]
    fn invalid_paths_are_400_invalid_path() {
        let e = GatewayError::InvalidPath(crate::path::PathError::DotSegment);
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(e.status(), 400);
        assert_eq!(v["error"]["code"], "invalid_path");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(GatewayError::ClientTimeout.code(), "client_timeout");
    }

    #[test]
    fn ip_refusals_are_403_ip_not_allowed() {
        let e = GatewayError::IpNotAllowed;
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(e.status(), 403);
        assert_eq!(v["error"]["code"], "ip_not_allowed");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn files_and_batches_failures_in_openai_shapes() {
        let e = |kind| GatewayError::Admin {
            kind,
            detail: "127.0.0.1:9 connection refused".into(),
        };
        for (kind, status, code) in [
            (AdminFailure::NotConfigured, 404, "unsupported_endpoint"),
            (AdminFailure::DeclaredKey, 403, "permission_denied"),
            (AdminFailure::SecretMissing, 503, "service_unavailable"),
            (AdminFailure::Unreachable, 502, "admin_unreachable"),
            (AdminFailure::Timeout, 504, "admin_timeout"),
            (AdminFailure::Failed, 502, "admin_error"),
        ] {
            let err = e(kind);
            let v: serde_json::Value = serde_json::from_slice(&err.body()).unwrap();
            assert_eq!((err.status(), err.code()), (status, code));
            assert_eq!(v["error"]["code"], code);
            assert!(!v.to_string().contains("127.0.0.1"));
        }
        let body = String::from_utf8(e(AdminFailure::NotConfigured).body()).unwrap();
        assert!(body.contains("control_plane.admin_url"), "{body}");
        for why in [AuthFailure::BatchToken, AuthFailure::BatchTokenNotAccepted] {
            let err = GatewayError::Auth(why);
            assert_eq!((err.status(), err.code()), (401, "invalid_api_key"));
        }
    }

    #[test]
    fn upstream_details_stay_out_of_client_messages() {
        let e = GatewayError::UpstreamUnreachable {
            upstream: "openai".into(),
            detail: "10.0.0.7:443 connection refused".into(),
        };
        assert_eq!(e.status(), 502);
        let body = String::from_utf8(e.body()).unwrap();
        assert!(!body.contains("10.0.0.7"));
        assert!(e.to_string().contains("10.0.0.7"));
    }
}
