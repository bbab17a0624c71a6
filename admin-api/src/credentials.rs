//! Credentials the admin API issues and checks, with no knowledge of requests or state:
//! password hashing (argon2id on the blocking pool, a dummy hash for unknown accounts), access
//! tokens (HS256 JWTs that point at a database session, so logout really ends them) and
//! attempt throttling (GCRA per account and per IP). The extractors that use them are in
//! [`crate::auth`].

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use aihub_store::now_ms;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::error::AppError;

/// Argon2id hashing with the configured cost. Hashing runs on the blocking pool.
#[derive(Clone)]
pub struct Passwords {
    params: Params,
    /// At most this many hashes at once (each holds `argon2_memory_kib`): floods of login or
    /// reset attempts queue here instead of exhausting memory and the blocking pool.
    permits: Arc<tokio::sync::Semaphore>,
    /// A real hash of a random password: verifying against it when the account does not exist
    /// makes "unknown email" take as long as "wrong password".
    dummy: Arc<str>,
}

impl Passwords {
    pub fn new(memory_kib: u32, iterations: u32) -> Result<Passwords, String> {
        let params = Params::new(memory_kib, iterations, 1, None).map_err(|e| e.to_string())?;
        let parallel = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
        let mut p = Passwords {
            params,
            permits: Arc::new(tokio::sync::Semaphore::new(parallel)),
            dummy: "".into(),
        };
        let random: [u8; 16] = rand::random();
        p.dummy = p.hash_now(&hex::encode(random))?.into();
        Ok(p)
    }

    fn argon(&self) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, self.params.clone())
    }

    fn hash_now(&self, password: &str) -> Result<String, String> {
        let salt =
            SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(|e| e.to_string())?;
        self.argon()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| e.to_string())
    }

    pub async fn hash(&self, password: String) -> Result<String, AppError> {
        let _permit = self.permits.acquire().await.map_err(AppError::internal)?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.hash_now(&password))
            .await
            .map_err(AppError::internal)?
            .map_err(AppError::Internal)
    }

    /// Checks `password` against `hash`, or against the dummy hash when there is no account.
    pub async fn verify(&self, password: String, hash: Option<String>) -> bool {
        let Ok(_permit) = self.permits.acquire().await else {
            return false;
        };
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let stored = hash.as_deref().unwrap_or(&this.dummy);
            let ok = PasswordHash::new(stored)
                .map(|h| {
                    this.argon()
                        .verify_password(password.as_bytes(), &h)
                        .is_ok()
                })
                .unwrap_or(false);
            ok && hash.is_some()
        })
        .await
        .unwrap_or(false)
    }
}

/// Signs and checks access tokens: HS256, claims `sub` (developer), `sid` (session), `iat`,
/// `exp`. Only this exact header is accepted (no `alg` negotiation).
#[derive(Clone)]
pub struct Jwt {
    key: Arc<[u8]>,
}

#[derive(Serialize, Deserialize)]
struct Claims {
    iss: String,
    sub: String,
    sid: String,
    iat: i64,
    exp: i64,
}

const JWT_HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

/// How far in the future a token's issue time may be (another admin node's clock ahead of this
/// one's) before the token counts as issued before a clock step back, and is refused.
pub const IAT_LEEWAY_SECS: i64 = 60;

impl Jwt {
    pub fn new(secret: &[u8]) -> Jwt {
        Jwt { key: secret.into() }
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length")
    }

    pub fn sign(&self, developer_id: &str, session_id: &str, ttl: Duration) -> String {
        self.sign_at(developer_id, session_id, ttl, now_ms() / 1000)
    }

    fn sign_at(&self, developer_id: &str, session_id: &str, ttl: Duration, now: i64) -> String {
        let claims = Claims {
            iss: "aihub".into(),
            sub: developer_id.into(),
            sid: session_id.into(),
            iat: now,
            exp: now + ttl.as_secs() as i64,
        };
        let body = serde_json::to_vec(&claims).expect("claims serialize");
        let signing_input = format!("{}.{}", B64.encode(JWT_HEADER), B64.encode(body));
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        format!(
            "{signing_input}.{}",
            B64.encode(mac.finalize().into_bytes())
        )
    }

    /// An HMAC-SHA256 of `data` under the signing key, separated by `purpose` from every other
    /// use of the key (JWTs sign with no purpose prefix, and `purpose` must not contain `.`),
    /// URL-safe base64. The portal's CSRF tokens are these.
    pub fn tag(&self, purpose: &str, data: &str) -> String {
        let mut mac = self.mac();
        mac.update(purpose.as_bytes());
        mac.update(b"\0");
        mac.update(data.as_bytes());
        B64.encode(mac.finalize().into_bytes())
    }

    /// Checks a [`Jwt::tag`] in constant time.
    pub fn check_tag(&self, purpose: &str, data: &str, tag: &str) -> bool {
        let Ok(sig) = B64.decode(tag) else {
            return false;
        };
        let mut mac = self.mac();
        mac.update(purpose.as_bytes());
        mac.update(b"\0");
        mac.update(data.as_bytes());
        mac.verify_slice(&sig).is_ok()
    }

    /// Returns `(developer id, session id)` of a valid, unexpired token.
    ///
    /// A token issued more than [`IAT_LEEWAY_SECS`] in the future is refused too: the wall
    /// clock stepped back since it was issued, and its `exp` alone would keep it valid for its
    /// lifetime plus the step. Refusing it bounds every token to its real lifetime (its holder
    /// signs in again); the leeway covers clock differences between admin nodes.
    pub fn verify(&self, token: &str) -> Option<(String, String)> {
        self.verify_at(token, now_ms() / 1000)
    }

    fn verify_at(&self, token: &str, now: i64) -> Option<(String, String)> {
        let (signing_input, sig) = token.rsplit_once('.')?;
        let (header, body) = signing_input.split_once('.')?;
        if B64.decode(header).ok()? != JWT_HEADER.as_bytes() {
            return None;
        }
        let mut mac = self.mac();
        mac.update(signing_input.as_bytes());
        mac.verify_slice(&B64.decode(sig).ok()?).ok()?;
        let claims: Claims = serde_json::from_slice(&B64.decode(body).ok()?).ok()?;
        (claims.exp > now && claims.iat <= now + IAT_LEEWAY_SECS && claims.iss == "aihub")
            .then_some((claims.sub, claims.sid))
    }
}

/// Attempt throttling: logins per account, and logins, registrations and reset requests per
/// client IP (GCRA, in memory; idle entries are dropped by [`Throttle::evict_idle`]).
pub struct Throttle {
    per_account: DefaultKeyedRateLimiter<String>,
    per_ip: DefaultKeyedRateLimiter<IpAddr>,
    /// Mails (verification, reset) per address: 3 a minute, so nobody can bomb an inbox.
    mails: DefaultKeyedRateLimiter<String>,
}

impl Throttle {
    pub fn new(per_account_per_minute: u32, per_ip_per_minute: u32) -> Throttle {
        let quota = |n: u32| Quota::per_minute(NonZeroU32::new(n.max(1)).expect("n ≥ 1"));
        Throttle {
            per_account: RateLimiter::keyed(quota(per_account_per_minute)),
            per_ip: RateLimiter::keyed(quota(per_ip_per_minute)),
            mails: RateLimiter::keyed(quota(3)),
        }
    }

    /// Per client address; IPv6 clients are counted per /64 (one subscriber's usual share),
    /// so hopping addresses inside a prefix does not reset the budget.
    pub fn check_ip(&self, ip: Option<IpAddr>) -> Result<(), AppError> {
        match ip {
            Some(ip) => Self::verdict(self.per_ip.check_key(&throttle_key(ip))),
            None => Ok(()),
        }
    }

    /// Whether another mail may go to `email` now (silently skipped otherwise).
    pub fn allow_mail(&self, email: &str) -> bool {
        self.mails.check_key(&email.to_lowercase()).is_ok()
    }

    pub fn check_account(&self, email: &str) -> Result<(), AppError> {
        Self::verdict(self.per_account.check_key(&email.to_lowercase()))
    }

    fn verdict<T>(
        r: Result<T, governor::NotUntil<governor::clock::QuantaInstant>>,
    ) -> Result<(), AppError> {
        r.map(|_| ())
            .map_err(|not_until| AppError::TooManyRequests {
                retry_after_secs: not_until
                    .wait_time_from(DefaultClock::default().now())
                    .as_secs()
                    + 1,
            })
    }

    pub fn evict_idle(&self) {
        self.per_account.retain_recent();
        self.per_account.shrink_to_fit();
        self.per_ip.retain_recent();
        self.per_ip.shrink_to_fit();
        self.mails.retain_recent();
        self.mails.shrink_to_fit();
    }
}

fn throttle_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aihub_control::accounts::check_password;

    #[test]
    fn jwt_round_trip_and_tamper() {
        let jwt = Jwt::new(b"0123456789abcdef0123456789abcdef");
        let t = jwt.sign("dev_1", "ses_1", Duration::from_secs(60));
        assert_eq!(jwt.verify(&t), Some(("dev_1".into(), "ses_1".into())));
        let other = Jwt::new(b"another secret of enough length!");
        assert_eq!(other.verify(&t), None);
        let mut parts: Vec<&str> = t.split('.').collect();
        let none_header = B64.encode(r#"{"alg":"none","typ":"JWT"}"#);
        parts[0] = &none_header;
        assert_eq!(jwt.verify(&parts.join(".")), None);
        let expired = jwt.sign("dev_1", "ses_1", Duration::ZERO);
        assert_eq!(jwt.verify(&expired), None);
    }

    #[test]
    fn a_clock_step_back_does_not_lengthen_a_token() {
        let jwt = Jwt::new(b"0123456789abcdef0123456789abcdef");
        let issued = 1_800_000_000;
        let t = jwt.sign_at("dev_1", "ses_1", Duration::from_secs(600), issued);
        let ok = Some(("dev_1".into(), "ses_1".into()));
        assert_eq!(jwt.verify_at(&t, issued + 599), ok);
        assert_eq!(jwt.verify_at(&t, issued + 600), None);
        // Another node's clock a little behind: accepted.
        assert_eq!(jwt.verify_at(&t, issued - IAT_LEEWAY_SECS), ok);
        // The clock stepped back an hour: the token would otherwise live 1 h 10 min.
        assert_eq!(jwt.verify_at(&t, issued - 3600), None);
        assert_eq!(jwt.verify_at(&t, issued - IAT_LEEWAY_SECS - 1), None);
    }

    #[test]
    fn ipv6_clients_share_their_64() {
        let a = throttle_key("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = throttle_key("2001:db8:1:2:bbbb::9".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, throttle_key("2001:db8:1:3::1".parse().unwrap()));
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(throttle_key("::ffff:10.1.2.3".parse().unwrap()), v4);
    }

    #[test]
    fn password_policy() {
        assert!(check_password("short", "a@b.c").is_err());
        assert!(check_password("password12", "a@b.c").is_err());
        assert!(check_password("aaaaaaaaaaaa", "a@b.c").is_err());
        assert!(check_password("my-adalovelace-pw", "adalovelace@x.io").is_err());
        assert!(check_password("correct horse battery", "ada@x.io").is_ok());
    }

    #[tokio::test]
    async fn hashing() {
        let p = Passwords::new(8192, 1).unwrap();
        let h = p.hash("correct horse battery".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(
            p.verify("correct horse battery".into(), Some(h.clone()))
                .await
        );
        assert!(!p.verify("wrong".into(), Some(h)).await);
        assert!(!p.verify("anything".into(), None).await);
    }
}
