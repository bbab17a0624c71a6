//! The request path rule (`gateway/src/path.rs`) on arbitrary strings. Invariants: an accepted
//! path is returned unchanged, starts with `/`, has no backslash, no dot segment (also before
//! `;parameters`), no empty segment but a trailing one, and no percent-escape that decodes to
//! structure (`.`, `/`, `\`, `%`), to an unreserved character or to a control byte; decoding
//! its allowed escapes splits it into the same segments.
#![no_main]

use aihub_gateway::path::check;
use libfuzzer_sys::fuzz_target;

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(ok) = check(path) else { return };
    assert_eq!(ok, path);
    assert!(path.starts_with('/'));
    assert!(!path.contains('\\'));
    let segments: Vec<&str> = path[1..].split('/').collect();
    for (i, s) in segments.iter().enumerate() {
        assert!(
            !s.is_empty() || i == segments.len() - 1,
            "empty segment in {path:?}"
        );
        let name = s.split(';').next().unwrap_or("");
        assert!(name != "." && name != "..", "dot segment in {path:?}");
    }
    // Decode every escape: the result has the same segments, none of them a dot segment.
    let b = path.as_bytes();
    let mut decoded = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = hex(b[i + 1]).expect("accepted escapes are hex");
            let l = hex(b[i + 2]).expect("accepted escapes are hex");
            let c = h << 4 | l;
            assert!(
                !c.is_ascii_alphanumeric()
                    && !matches!(c, b'.' | b'/' | b'\\' | b'%' | b'-' | b'_' | b'~')
                    && c >= 0x20
                    && c != 0x7f,
                "escape of {c:#x} accepted in {path:?}"
            );
            decoded.push(c);
            i += 3;
        } else {
            decoded.push(b[i]);
            i += 1;
        }
    }
    let decoded_segments = decoded[1..].split(|&c| c == b'/').count();
    assert_eq!(
        decoded_segments,
        segments.len(),
        "escapes changed the segments of {path:?}"
    );
    for s in decoded[1..].split(|&c| c == b'/') {
        let name = s.split(|&c| c == b';').next().unwrap_or(&[]);
        assert!(
            name != b"." && name != b"..",
            "decoded dot segment in {path:?}"
        );
    }
});
