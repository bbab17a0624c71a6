//! API key parsing and the internal credentials (`apikey/src/{lib,internal}.rs`) on arbitrary
//! strings. Invariants: an accepted key has the documented shape; a hash read from hex prints
//! back as the same digits; a batch token signed for arbitrary fields verifies as exactly those
//! fields, and with any one byte changed either fails or still means exactly those fields; a
//! signed identity verifies (or is expired), never panics, at any timestamp.
#![no_main]

use aihub_apikey::internal::{BatchToken, Identity, InternalSecret};
use aihub_apikey::{check, display_prefix, parse, KeyHash, KEY_LEN, PREFIX};
use libfuzzer_sys::fuzz_target;

fn num(b: &[u8]) -> i64 {
    let mut a = [0u8; 8];
    let n = b.len().min(8);
    a[..n].copy_from_slice(&b[..n]);
    i64::from_le_bytes(a)
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if check(&text).is_ok() {
        assert!(text.starts_with(PREFIX) && text.len() == KEY_LEN);
        assert!(text[PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(parse(&text).expect("checked"), KeyHash::of(&text));
    }
    let _ = display_prefix(&text);
    if let Ok(hash) = KeyHash::from_hex(&text) {
        let digits = text.strip_prefix("sha256:").unwrap_or(&text);
        assert_eq!(hash.to_hex(), digits.to_ascii_lowercase());
    }

    let secret = InternalSecret::new("0123456789abcdef0123456789abcdef").expect("32 bytes");
    let now = 1_800_000_000_000;
    assert!(
        secret.verify_batch_token(&text, now).is_err(),
        "forged token"
    );
    // Fields from the input: [8 bytes expiry][8 bytes ts][1 byte position][1 byte][task id].
    if data.len() < 18 {
        return;
    }
    let (expiry, ts, at, with) = (num(&data[..8]), num(&data[8..16]), data[16], data[17]);
    let task: String = String::from_utf8_lossy(&data[18..]).replace('.', "_");
    let token = BatchToken {
        key_hash: KeyHash::of(&task),
        task_id: task.clone(),
        line: expiry.unsigned_abs() % 100_000,
        expires_at_ms: expiry,
    };
    let signed = secret.batch_token(&token);
    match secret.verify_batch_token(&signed, now) {
        Ok(t) => assert_eq!(t, token),
        Err(e) => assert!(expiry < now, "a fresh token was refused: {e}"),
    }
    let mut tampered = signed.clone().into_bytes();
    let i = usize::from(at) * tampered.len() / 256;
    if tampered[i] != with {
        tampered[i] = with;
        if let Ok(tampered) = String::from_utf8(tampered) {
            if let Ok(t) = secret.verify_batch_token(&tampered, i64::MIN) {
                assert_eq!(t, token, "a tampered token verified as {tampered:?}");
            }
        }
    }

    let id = Identity {
        key_id: "key_1".into(),
        developer_id: task,
    };
    let sig = secret.sign_identity(&id, "POST", "/v1/files", ts);
    let ts_text = ts.to_string();
    let _ = secret.verify_identity(&id, "POST", "/v1/files", &ts_text, &sig, now);
    assert!(secret
        .verify_identity(&id, "POST", "/v1/filez", &ts_text, &sig, ts)
        .is_err());
});
