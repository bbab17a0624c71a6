//! Who is calling: the extractors handlers use ([`Caller`], [`Operator`], [`ClientMeta`]),
//! over the credentials of [`crate::credentials`] held in the state.

use std::net::{IpAddr, SocketAddr};

use aihub_store::developers;
use aihub_store::developers::Developer;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header;
use axum::http::request::Parts;

use crate::error::AppError;
use crate::state::AppState;

pub(crate) use aihub_control::accounts::{check_password, token_hash};

/// The caller's address and user agent, for throttling, sessions and the audit log.
pub struct ClientMeta {
    pub ip: Option<IpAddr>,
    pub user_agent: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for ClientMeta {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip().to_canonical());
        let user_agent = parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(256).collect());
        Ok(ClientMeta { ip, user_agent })
    }
}

/// A signed-in developer (valid token, live session, active account).
#[derive(Clone)]
pub struct Caller {
    pub developer: Developer,
    pub session_id: String,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        const MISSING: AppError = AppError::Unauthorized(
            "missing_token",
            "Sign in: send `Authorization: Bearer <access token>`.",
        );
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(MISSING)?;
        Caller::from_token(state, token.trim()).await
    }
}

impl Caller {
    /// The caller an access token names: valid signature and expiry, a live session, an active
    /// account. Shared by the `Authorization` header and the portal's session cookie.
    pub async fn from_token(state: &AppState, token: &str) -> Result<Caller, AppError> {
        const INVALID: AppError = AppError::Unauthorized(
            "invalid_token",
            "The access token is invalid or has expired.",
        );
        let (developer_id, session_id) = state.jwt.verify(token).ok_or(INVALID)?;
        let developer = match developers::by_live_session(&state.store, &session_id).await? {
            Some(d) if d.id == developer_id => d,
            _ => return Err(INVALID),
        };
        if !developer.is_active() {
            return Err(AppError::Forbidden(
                "account_disabled",
                "This account is disabled.".into(),
            ));
        }
        Ok(Caller {
            developer,
            session_id,
        })
    }
}

/// A signed-in operator (role `admin`).
pub struct Operator(pub Developer);

impl FromRequestParts<AppState> for Operator {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        if !caller.developer.is_admin() {
            return Err(AppError::Forbidden(
                "operator_only",
                "This endpoint is for operators.".into(),
            ));
        }
        Ok(Operator(caller.developer))
    }
}
