//! Credentials between the gateway and the admin API, signed with the internal secret both read
//! from the control-plane database (`settings.internal_secret`, created by the first admin node).
//!
//! - [`Identity`]: who called `/v1/files…` or `/v1/batches…` on the gateway. The gateway
//!   authenticates the `ahub_` key and forwards the call to the admin API's `/internal/v1/…`
//!   routes with the key's id and developer in headers, signed over method, path and time; the
//!   admin API trusts nothing else on those routes.
//! - [`BatchToken`]: how a batch worker sends one item through the gateway as the key that
//!   created the batch without holding the key: the token names the key by its **hash** (what
//!   the gateway's key cache is indexed by), the task and the item, with an expiry. A revoked,
//!   disabled or expired key fails the item exactly as it fails a live request. A token is
//!   useless outside the gateway-to-admin path (it needs the secret to forge, and it is bound to
//!   one item, whose request id it fixes, so a replay is metered once).

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::KeyHash;

/// Header names of a forwarded identity.
pub const KEY_ID_HEADER: &str = "x-aihub-key-id";
pub const DEVELOPER_ID_HEADER: &str = "x-aihub-developer-id";
pub const TIMESTAMP_HEADER: &str = "x-aihub-identity-ts";
pub const SIGNATURE_HEADER: &str = "x-aihub-identity-sig";

/// The name of the secret in the control-plane `settings` table.
pub const SETTING: &str = "internal_secret";

/// How far a forwarded identity's timestamp may be from the receiver's clock.
pub const IDENTITY_SKEW_MS: i64 = 60_000;

/// The prefix of a batch item's bearer token.
pub const BATCH_TOKEN_PREFIX: &str = "aihub-batch.";

/// Why a signed credential was refused. Safe to log (carries no secret).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InternalAuthError {
    #[error("malformed internal credential")]
    Malformed,
    #[error("internal credential signature mismatch")]
    Signature,
    #[error("internal credential expired")]
    Expired,
}

/// The shared secret (at least 32 bytes of text).
#[derive(Clone)]
pub struct InternalSecret(Vec<u8>);

impl fmt::Debug for InternalSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("InternalSecret(…)")
    }
}

impl InternalSecret {
    /// A secret from its stored text; `None` when shorter than 32 bytes.
    pub fn new(text: &str) -> Option<Self> {
        (text.len() >= 32).then(|| InternalSecret(text.as_bytes().to_vec()))
    }

    /// A fresh random secret's text (64 hex digits), for the first admin node to store.
    pub fn generate_text() -> String {
        let bytes: [u8; 32] = rand::random();
        hex::encode(bytes)
    }

    fn mac(&self, parts: &[&str]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                mac.update(b"\n");
            }
            mac.update(p.as_bytes());
        }
        hex::encode(mac.finalize().into_bytes())
    }

    fn verify(&self, parts: &[&str], sig_hex: &str) -> Result<(), InternalAuthError> {
        let sig = hex::decode(sig_hex).map_err(|_| InternalAuthError::Malformed)?;
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                mac.update(b"\n");
            }
            mac.update(p.as_bytes());
        }
        mac.verify_slice(&sig)
            .map_err(|_| InternalAuthError::Signature)
    }

    /// Signs a forwarded identity: the signature header's value.
    pub fn sign_identity(&self, id: &Identity, method: &str, path: &str, ts_ms: i64) -> String {
        let ts = ts_ms.to_string();
        self.mac(&["identity", method, path, &id.key_id, &id.developer_id, &ts])
    }

    /// Checks a forwarded identity's signature and that its timestamp is within
    /// [`IDENTITY_SKEW_MS`] of `now_ms`.
    pub fn verify_identity(
        &self,
        id: &Identity,
        method: &str,
        path: &str,
        ts: &str,
        sig: &str,
        now_ms: i64,
    ) -> Result<(), InternalAuthError> {
        let at: i64 = ts.parse().map_err(|_| InternalAuthError::Malformed)?;
        self.verify(
            &["identity", method, path, &id.key_id, &id.developer_id, ts],
            sig,
        )?;
        // In i128: any two i64 differ by less than its range (`now - at` could overflow i64).
        if (i128::from(now_ms) - i128::from(at)).abs() > i128::from(IDENTITY_SKEW_MS) {
            return Err(InternalAuthError::Expired);
        }
        Ok(())
    }

    /// The bearer token for one batch item.
    pub fn batch_token(&self, t: &BatchToken) -> String {
        let hash = t.key_hash.to_hex();
        let line = t.line.to_string();
        let expiry = t.expires_at_ms.to_string();
        let sig = self.mac(&["batch", &hash, &t.task_id, &line, &expiry]);
        format!(
            "{BATCH_TOKEN_PREFIX}{hash}.{}.{line}.{expiry}.{sig}",
            t.task_id
        )
    }

    /// Reads and checks a batch item's bearer token (the whole `aihub-batch.…` string).
    pub fn verify_batch_token(
        &self,
        token: &str,
        now_ms: i64,
    ) -> Result<BatchToken, InternalAuthError> {
        let rest = token
            .strip_prefix(BATCH_TOKEN_PREFIX)
            .ok_or(InternalAuthError::Malformed)?;
        let mut parts = rest.split('.');
        let (Some(hash), Some(task), Some(line), Some(expiry), Some(sig), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(InternalAuthError::Malformed);
        };
        self.verify(&["batch", hash, task, line, expiry], sig)?;
        let t = BatchToken {
            key_hash: KeyHash::from_hex(hash).map_err(|_| InternalAuthError::Malformed)?,
            task_id: task.to_owned(),
            line: line.parse().map_err(|_| InternalAuthError::Malformed)?,
            expires_at_ms: expiry.parse().map_err(|_| InternalAuthError::Malformed)?,
        };
        if t.expires_at_ms < now_ms {
            return Err(InternalAuthError::Expired);
        }
        Ok(t)
    }
}

/// Whether a presented bearer credential is a batch item's token (not a developer key).
pub fn is_batch_token(presented: &str) -> bool {
    presented.starts_with(BATCH_TOKEN_PREFIX)
}

/// The caller of a forwarded Files or Batches call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub key_id: String,
    pub developer_id: String,
}

/// One batch item sent through the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchToken {
    /// The hash of the key that created the batch.
    pub key_hash: KeyHash,
    /// The task or batch id (`batch_…`, `task_…`); no `.` in it.
    pub task_id: String,
    /// The item's line in the input (1-based).
    pub line: u64,
    pub expires_at_ms: i64,
}

impl BatchToken {
    /// The request id of this item at the gateway: the same on every attempt, so a usage row
    /// is written once however often a worker takeover sends the item again.
    pub fn request_id(&self) -> uuid::Uuid {
        item_request_id(&self.task_id, self.line)
    }
}

/// The request id of item `line` of `task_id` (UUID v5 in a namespace of ours).
pub fn item_request_id(task_id: &str, line: u64) -> uuid::Uuid {
    const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x5f1f_6c2a_93d4_4b8e_a2f1_0c7d_9e3b_4a61);
    uuid::Uuid::new_v5(&NAMESPACE, format!("{task_id}/{line}").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> InternalSecret {
        InternalSecret::new(&InternalSecret::generate_text()).unwrap()
    }

    #[test]
    fn identities_verify_and_bind_method_path_and_time() {
        let s = secret();
        let id = Identity {
            key_id: "key_1".into(),
            developer_id: "dev_1".into(),
        };
        let sig = s.sign_identity(&id, "POST", "/v1/files", 1_000_000);
        assert!(s
            .verify_identity(&id, "POST", "/v1/files", "1000000", &sig, 1_030_000)
            .is_ok());
        assert_eq!(
            s.verify_identity(&id, "GET", "/v1/files", "1000000", &sig, 1_000_000),
            Err(InternalAuthError::Signature)
        );
        let other = Identity {
            developer_id: "dev_2".into(),
            ..id.clone()
        };
        assert_eq!(
            s.verify_identity(&other, "POST", "/v1/files", "1000000", &sig, 1_000_000),
            Err(InternalAuthError::Signature)
        );
        assert_eq!(
            s.verify_identity(&id, "POST", "/v1/files", "1000000", &sig, 1_061_000),
            Err(InternalAuthError::Expired)
        );
        assert_eq!(
            secret().verify_identity(&id, "POST", "/v1/files", "1000000", &sig, 1_000_000),
            Err(InternalAuthError::Signature)
        );
        assert!(InternalSecret::new("short").is_none());
    }

    #[test]
    fn batch_tokens_round_trip_and_refuse_tampering() {
        let s = secret();
        let t = BatchToken {
            key_hash: KeyHash::of("ahub_dev_x"),
            task_id: "batch_0192abc".into(),
            line: 42,
            expires_at_ms: 2_000,
        };
        let token = s.batch_token(&t);
        assert!(is_batch_token(&token));
        assert_eq!(s.verify_batch_token(&token, 1_000).unwrap(), t);
        assert_eq!(
            s.verify_batch_token(&token, 3_000),
            Err(InternalAuthError::Expired)
        );
        let tampered = token.replace(".42.", ".43.");
        assert_eq!(
            s.verify_batch_token(&tampered, 1_000),
            Err(InternalAuthError::Signature)
        );
        assert_eq!(
            s.verify_batch_token("aihub-batch.x.y", 1_000),
            Err(InternalAuthError::Malformed)
        );
        assert_eq!(t.request_id(), item_request_id("batch_0192abc", 42));
        assert_ne!(t.request_id(), item_request_id("batch_0192abc", 41));
    }

    #[test]
    fn identity_timestamps_at_the_ends_of_i64_are_expired() {
        // Found by fuzzing (fuzz/ apikey): `now_ms - at` overflowed for a signed timestamp
        // far from now.
        let id = Identity {
            key_id: "key_1".into(),
            developer_id: "dev_1".into(),
        };
        let s = secret();
        for ts in [i64::MIN, i64::MAX] {
            let sig = s.sign_identity(&id, "POST", "/v1/files", ts);
            let check =
                |now| s.verify_identity(&id, "POST", "/v1/files", &ts.to_string(), &sig, now);
            assert_eq!(check(1_800_000_000_000), Err(InternalAuthError::Expired));
            assert_eq!(check(ts), Ok(()));
        }
    }
}
