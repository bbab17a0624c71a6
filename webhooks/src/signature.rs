//! Request signatures, both schemes on every request:
//!
//! - `X-AIHub-Signature: sha256=<hex>`: HMAC-SHA256 of the raw body (the seed's scheme, as
//!   GitHub signs), with `X-AIHub-Event: <type>`;
//! - Standard Webhooks (<https://www.standardwebhooks.com>): `webhook-id` (the event id),
//!   `webhook-timestamp` (unix seconds) and `webhook-signature: v1,<base64>`, the HMAC-SHA256
//!   of `{id}.{timestamp}.{body}`, so the `standardwebhooks` libraries verify it.
//!
//! The key is the secret's bytes: a secret is `whsec_` followed by the base64 of 32 random
//! bytes. While a rotated-out secret is still valid, each header carries one signature per
//! secret, separated by spaces (Standard Webhooks' rule; receivers accept any that matches).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// A new signing secret, `whsec_` + base64 of 32 random bytes.
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("whsec_{}", B64.encode(bytes))
}

/// The key bytes of a secret (`whsec_` + base64); a secret not in that shape is used as is.
pub fn key(secret: &str) -> Vec<u8> {
    secret
        .strip_prefix("whsec_")
        .and_then(|b| B64.decode(b).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec())
}

fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// The signature headers of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// `X-AIHub-Signature`: `sha256=<hex>` per secret.
    pub aihub: String,
    /// `webhook-signature`: `v1,<base64>` per secret.
    pub standard: String,
    /// `webhook-timestamp`.
    pub timestamp: String,
}

/// Signs `body` of event `id` sent at `timestamp` (unix seconds) with every secret.
pub fn sign(secrets: &[&str], id: &str, timestamp: i64, body: &[u8]) -> Signed {
    let ts = timestamp.to_string();
    let mut aihub = Vec::with_capacity(secrets.len());
    let mut standard = Vec::with_capacity(secrets.len());
    for s in secrets {
        let k = key(s);
        aihub.push(format!("sha256={}", hex::encode(mac(&k, &[body]))));
        let signed = mac(&k, &[id.as_bytes(), b".", ts.as_bytes(), b".", body]);
        standard.push(format!("v1,{}", B64.encode(signed)));
    }
    Signed {
        aihub: aihub.join(" "),
        standard: standard.join(" "),
        timestamp: ts,
    }
}

/// Why a signature does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("no signature matches")]
    Mismatch,
    #[error("the timestamp is outside the tolerance")]
    Stale,
    #[error("the header is malformed")]
    Malformed,
}

/// Verifies a Standard Webhooks signature header as a receiver would (constant-time compare,
/// timestamp within `tolerance_s` of `now_s`).
pub fn verify_standard(
    secret: &str,
    id: &str,
    timestamp: &str,
    header: &str,
    body: &[u8],
    now_s: i64,
    tolerance_s: i64,
) -> Result<(), VerifyError> {
    let ts: i64 = timestamp.parse().map_err(|_| VerifyError::Malformed)?;
    // In i128: a timestamp near i64::MIN made `now_s - ts` overflow (a panic in debug builds;
    // in release `i64::MIN.abs()` stayed negative and a stale timestamp passed).
    if (i128::from(now_s) - i128::from(ts)).abs() > i128::from(tolerance_s) {
        return Err(VerifyError::Stale);
    }
    let decode = |s: &str| B64.decode(s).ok();
    let parts: [&[u8]; 5] = [id.as_bytes(), b".", timestamp.as_bytes(), b".", body];
    any_matches(secret, header, "v1,", decode, &parts)
}

/// Verifies an `X-AIHub-Signature` header (constant-time compare).
pub fn verify_aihub(secret: &str, header: &str, body: &[u8]) -> Result<(), VerifyError> {
    any_matches(secret, header, "sha256=", |s| hex::decode(s).ok(), &[body])
}

/// Whether any space-separated `prefix<encoded signature>` of `header` is the HMAC of
/// `parts` under `secret` (constant-time compare).
fn any_matches(
    secret: &str,
    header: &str,
    prefix: &str,
    decode: impl Fn(&str) -> Option<Vec<u8>>,
    parts: &[&[u8]],
) -> Result<(), VerifyError> {
    let k = key(secret);
    for sig in header.split(' ').filter_map(|p| p.strip_prefix(prefix)) {
        let Some(sig) = decode(sig) else { continue };
        let mut m = HmacSha256::new_from_slice(&k).expect("any key length");
        for p in parts {
            m.update(p);
        }
        if m.verify_slice(&sig).is_ok() {
            return Ok(());
        }
    }
    Err(VerifyError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_reference_vector() {
        // From the Standard Webhooks specification's test vectors.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        let s = sign(&[secret], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(
            s.standard,
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        verify_standard(
            secret,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            &s.standard,
            body,
            1614265330,
            300,
        )
        .unwrap();
    }

    #[test]
    fn both_schemes_and_rotation() {
        let (new, old) = (new_secret(), new_secret());
        assert!(new.starts_with("whsec_") && new.len() == 6 + 44);
        let body = br#"{"id":"evt_1"}"#;
        let s = sign(&[&new, &old], "evt_1", 1_800_000_000, body);
        for secret in [&new, &old] {
            verify_aihub(secret, &s.aihub, body).unwrap();
            verify_standard(
                secret,
                "evt_1",
                &s.timestamp,
                &s.standard,
                body,
                1_800_000_100,
                300,
            )
            .unwrap();
        }
        let other = new_secret();
        assert_eq!(
            verify_aihub(&other, &s.aihub, body),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify_standard(
                &new,
                "evt_1",
                &s.timestamp,
                &s.standard,
                b"{}",
                1_800_000_000,
                300
            ),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            verify_standard(
                &new,
                "evt_1",
                &s.timestamp,
                &s.standard,
                body,
                1_800_001_000,
                300
            ),
            Err(VerifyError::Stale)
        );
    }

    #[test]
    fn timestamps_at_the_ends_of_i64_are_stale() {
        // Found writing the fuzz target (its seed fuzz/corpus/webhook_verify/seed-min-ts):
        // `now - ts` overflowed.
        let body = b"{}";
        for ts in [i64::MIN, i64::MIN + 1, i64::MAX] {
            let s = sign(
                &["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"],
                "msg_1",
                ts,
                body,
            );
            let verify = |now| {
                verify_standard(
                    "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                    "msg_1",
                    &s.timestamp,
                    &s.standard,
                    body,
                    now,
                    300,
                )
            };
            assert_eq!(verify(1_800_000_000), Err(VerifyError::Stale), "{ts}");
            assert_eq!(verify(ts), Ok(()), "{ts}");
        }
    }
}
