//! The webhook signature verifiers (`webhooks/src/signature.rs`) on arbitrary headers and
//! bodies. Invariants: what `sign` produced verifies under both schemes (within the
//! timestamp tolerance); the same headers over a body with any one byte changed, or under
//! another id, never verify; arbitrary headers never verify a body; no timestamp panics.
#![no_main]

use aihub_webhooks::signature::{sign, verify_aihub, verify_standard};
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fuzz_target!(|data: &[u8]| {
    // [8 bytes timestamp][1 byte position][header text \0 body].
    if data.len() < 9 {
        return;
    }
    let ts = i64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    let at = data[8];
    let rest = &data[9..];
    let (header, body) = match rest.iter().position(|&b| b == 0) {
        Some(n) => (String::from_utf8_lossy(&rest[..n]), &rest[n + 1..]),
        None => (String::from_utf8_lossy(rest), &[][..]),
    };
    let now = 1_800_000_000;
    // Arbitrary headers: refused, never a panic, at any timestamp.
    assert!(verify_aihub(SECRET, &header, body).is_err());
    assert!(verify_standard(SECRET, "msg_1", &ts.to_string(), &header, body, now, 300).is_err());
    assert!(verify_standard(SECRET, "msg_1", &header, &header, body, now, 300).is_err());

    let signed = sign(&[SECRET, "old-secret"], "msg_1", ts, body);
    assert_eq!(verify_aihub(SECRET, &signed.aihub, body), Ok(()));
    assert_eq!(verify_aihub("old-secret", &signed.aihub, body), Ok(()));
    let standard = |id: &str, b: &[u8], now: i64| {
        verify_standard(SECRET, id, &signed.timestamp, &signed.standard, b, now, 300)
    };
    assert_eq!(standard("msg_1", body, ts), Ok(()));
    assert!(standard("msg_2", body, ts).is_err());
    let _ = standard("msg_1", body, now);
    if !body.is_empty() {
        let mut tampered = body.to_vec();
        let i = usize::from(at) * tampered.len() / 256;
        tampered[i] ^= 0x20;
        assert!(verify_aihub(SECRET, &signed.aihub, &tampered).is_err());
        assert!(standard("msg_1", &tampered, ts).is_err());
    }
});
