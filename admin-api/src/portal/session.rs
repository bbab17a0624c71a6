//! Who is visiting the portal and whether a form may act: the cookies (session, CSRF seed,
//! language), the CSRF check every state-changing request passes in [`guard`], the security
//! headers every portal response carries, and the extractors pages use ([`Guest`], [`Member`],
//! [`Staff`]).
//!
//! - **Session**: `aihub_session` holds the same access token (a JWT bound to a session row)
//!   the JSON API takes as `Authorization: Bearer`; `HttpOnly`, `SameSite=Lax`, `Secure` unless
//!   `portal.secure_cookie` is off, path `/portal`. Logout ends the session row, so a stolen
//!   cookie dies with it.
//! - **CSRF**: signed double submit bound to the session. `aihub_csrf` holds a random seed;
//!   every form carries `csrf = HMAC(secret, "csrf", seed | session id)`. A POST without the
//!   matching field, or marked `Sec-Fetch-Site: cross-site`, is refused before any handler
//!   runs — no handler can forget the check.

use std::sync::Arc;
use std::time::Instant;

use axum::body::{to_bytes, Body};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;

use crate::auth::Caller;
use crate::error::AppError;
use crate::state::AppState;

use super::i18n::Lang;
use super::{error_page, Failure};

pub const SESSION_COOKIE: &str = "aihub_session";
pub const CSRF_COOKIE: &str = "aihub_csrf";
pub const LANG_COOKIE: &str = "aihub_lang";
/// Form bodies larger than this are refused (the largest portal form is a few hundred bytes).
const MAX_FORM_BYTES: usize = 64 * 1024;

/// The facts of one portal request, derived once by [`guard`] (no I/O).
#[derive(Clone)]
pub struct Visit {
    pub lang: Lang,
    /// The token this visitor's forms must carry.
    pub csrf: String,
    /// The session cookie's token, when there is one.
    pub session: Option<Arc<str>>,
    /// Path and query, for the language switch and the sign-in redirect.
    pub here: String,
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// A `Set-Cookie` value for the portal: `HttpOnly`, `SameSite=Lax`, path `/portal`, `Secure`
/// when configured; `max_age` 0 deletes it.
pub fn set_cookie(s: &AppState, name: &str, value: &str, max_age_secs: u64) -> HeaderValue {
    let secure = if s.config.portal.secure_cookie {
        "; Secure"
    } else {
        ""
    };
    HeaderValue::try_from(format!(
        "{name}={value}; Path=/portal; Max-Age={max_age_secs}; HttpOnly; SameSite=Lax{secure}"
    ))
    .expect("cookie values are base64url or JWTs")
}

/// What a CSRF token signs: the visitor's seed and the session the cookie names (none when
/// signed out or the token is invalid).
fn csrf_data(s: &AppState, seed: &str, session: Option<&str>) -> String {
    let sid = session
        .and_then(|t| s.jwt.verify(t))
        .map(|(_, sid)| sid)
        .unwrap_or_default();
    format!("{seed}|{sid}")
}

fn form_field(body: &[u8], name: &str) -> Option<String> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

/// The portal's middleware: derives the [`Visit`], refuses cross-site or token-less state
/// changes, renders failures as pages (the one place a portal error becomes a response), and
/// adds the security headers.
pub async fn guard(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let headers = req.headers();
    let lang = Lang::pick(
        cookie(headers, LANG_COOKIE),
        headers
            .get(header::ACCEPT_LANGUAGE)
            .and_then(|v| v.to_str().ok()),
    );
    let existing_seed = cookie(headers, CSRF_COOKIE)
        .filter(|v| v.len() == 43 && B64.decode(v).is_ok())
        .map(str::to_owned);
    let new_seed = existing_seed.is_none();
    let seed = existing_seed.unwrap_or_else(|| B64.encode(rand::random::<[u8; 32]>()));
    let session: Option<Arc<str>> = cookie(headers, SESSION_COOKIE)
        .filter(|v| !v.is_empty())
        .map(Into::into);
    let signed = csrf_data(&s, &seed, session.as_deref());
    let csrf = s.jwt.tag("csrf", &signed);
    let here = req
        .uri()
        .path_and_query()
        .map_or("/portal".to_owned(), |p| p.as_str().to_owned());
    let visit = Visit {
        lang,
        csrf,
        session,
        here,
    };

    let mut req = req;
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let cross_site = req
            .headers()
            .get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes() == b"cross-site");
        let (parts, body) = req.into_parts();
        let Ok(bytes) = to_bytes(body, MAX_FORM_BYTES).await else {
            return finish(&s, &visit, new_seed, &seed, csrf_refused());
        };
        let token_ok =
            form_field(&bytes, "csrf").is_some_and(|t| s.jwt.check_tag("csrf", &signed, &t));
        if cross_site || !token_ok {
            s.metrics.event("portal_csrf_refused");
            return finish(&s, &visit, new_seed, &seed, csrf_refused());
        }
        req = Request::from_parts(parts, Body::from(bytes));
    }
    req.extensions_mut().insert(visit.clone());
    let resp = next.run(req).await;
    let mut resp = finish(&s, &visit, new_seed, &seed, resp);
    // The server's share of the page (the page is rendered in full before it is sent), for the
    // browser's developer tools and loadtests/portal-bench.sh.
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if let Ok(v) = HeaderValue::from_str(&format!("app;dur={ms:.2}")) {
        resp.headers_mut().insert("server-timing", v);
    }
    resp
}

fn csrf_refused() -> Response {
    Failure::response(AppError::Forbidden("csrf_failed", String::new()))
}

fn finish(s: &AppState, visit: &Visit, new_seed: bool, seed: &str, mut resp: Response) -> Response {
    if let Some(Failure(err)) = resp.extensions_mut().remove::<Failure>() {
        resp = error_page(visit, &err);
    }
    let h = resp.headers_mut();
    // A page with a policy of its own (the printable invoice) keeps it.
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(
                "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                 connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
            ),
        );
    }
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    if new_seed {
        h.append(
            header::SET_COOKIE,
            set_cookie(s, CSRF_COOKIE, seed, 400 * 86_400),
        );
    }
    resp
}

/// Any visitor; `caller` is set when the session cookie names a live session.
pub struct Guest {
    pub visit: Visit,
    pub caller: Option<Caller>,
}

/// A signed-in developer; anyone else is sent to the login page (and back afterwards).
pub struct Member {
    pub visit: Visit,
    pub caller: Caller,
}

/// A signed-in operator; other developers get a 403 page.
pub struct Staff {
    pub visit: Visit,
    pub caller: Caller,
}

impl FromRequestParts<AppState> for Guest {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, Response> {
        let Some(visit) = parts.extensions.get::<Visit>().cloned() else {
            return Err(Failure::response(AppError::Internal(
                "portal route without the guard".into(),
            )));
        };
        let caller = match &visit.session {
            Some(token) => Caller::from_token(s, token).await.ok(),
            None => None,
        };
        Ok(Guest { visit, caller })
    }
}

impl FromRequestParts<AppState> for Member {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, Response> {
        let Guest { visit, caller } = Guest::from_request_parts(parts, s).await?;
        match caller {
            Some(caller) => Ok(Member { visit, caller }),
            None => {
                let next = if parts.method == Method::GET {
                    visit.here.as_str()
                } else {
                    "/portal/dashboard"
                };
                let to = format!("/portal/login?next={}", encode(next));
                Err(Redirect::to(&to).into_response())
            }
        }
    }
}

impl FromRequestParts<AppState> for Staff {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self, Response> {
        let Member { visit, caller } = Member::from_request_parts(parts, s).await?;
        if !caller.developer.is_admin() {
            return Err(Failure::response(AppError::Forbidden(
                "operator_only",
                "This page is for operators.".into(),
            )));
        }
        Ok(Staff { visit, caller })
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters pass).
pub fn encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A local portal path to return to after signing in or switching language; anything else
/// (another site, a protocol-relative URL) becomes the dashboard.
pub fn local_next(next: Option<&str>) -> &str {
    match next {
        Some(n) if n.starts_with("/portal") && !n.contains("//") && !n.contains('\\') => n,
        _ => "/portal/dashboard",
    }
}

/// 303 See Other to `to` (the answer to a successful form).
pub fn see_other(to: &str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_owned())]).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_and_redirect_targets() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; aihub_lang=zh"),
        );
        h.append(header::COOKIE, HeaderValue::from_static("aihub_csrf=xyz"));
        assert_eq!(cookie(&h, "aihub_lang"), Some("zh"));
        assert_eq!(cookie(&h, "aihub_csrf"), Some("xyz"));
        assert_eq!(cookie(&h, "aihub"), None);
        assert_eq!(local_next(Some("/portal/keys?x=1")), "/portal/keys?x=1");
        assert_eq!(local_next(Some("https://evil.test/")), "/portal/dashboard");
        assert_eq!(local_next(Some("/portal//evil.test")), "/portal/dashboard");
        assert_eq!(local_next(None), "/portal/dashboard");
        assert_eq!(
            encode("/portal/usage?period=2026-11"),
            "/portal/usage%3Fperiod%3D2026-11"
        );
    }
}
