//! The one rule for request paths: a path is used exactly as the client sent it, or refused.
//!
//! Permissions (`endpoints` patterns), routing and usage records all read the path the gateway
//! received, and the same bytes go upstream. That is only safe if nobody down the line reads a
//! different path out of those bytes: an upstream (or a proxy in front of it) that resolves
//! `/v1/embeddings/../chat/completions` or `/v1/embeddings%2F..%2Fchat/completions` would serve
//! chat completions to a key allowed only `embeddings*`. Rewriting such paths into a canonical
//! form would mean guessing how each upstream decodes them; the gateway refuses them instead
//! (400 `invalid_path`). The path that passes [`check`] is the one checked, forwarded and
//! recorded, byte for byte.
//!
//! Refused, anywhere in the path (query strings are not paths and are not looked at):
//! - a dot segment: `.` or `..`, also followed by `;parameters` (`/..;/`, as some servers read it),
//!   the `;` also escaped (`/..%3B/`);
//! - an empty segment (`//`), except a single trailing slash;
//! - a backslash (some servers read it as a slash);
//! - a percent-escape of `.`, `/`, `\` or `%` (`%2e`, `%2F`, `%5c`, `%25`: encoded dots and
//!   slashes, or a second round of decoding), of a letter, digit, `-`, `_` or `~` (equivalent
//!   to the plain character, so an upstream may see another path than the permission check
//!   did), or of a control byte; a `%` not followed by two hex digits;
//! - anything not starting with `/` (absolute-form targets arrive here already split).
//!
//! The function is pure and allocation-free, so it can be fuzzed on its own.

/// Why a path was refused (for logs; the client gets one fixed message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path does not start with `/`")]
    NotAbsolute,
    #[error("dot segment")]
    DotSegment,
    #[error("empty segment (doubled slash)")]
    EmptySegment,
    #[error("backslash")]
    Backslash,
    #[error("percent-escape of a character that must appear as itself")]
    EncodedCharacter,
    #[error("malformed percent-escape")]
    MalformedEscape,
}

/// Checks `path` (without the query); returns it unchanged when it is canonical.
pub fn check(path: &str) -> Result<&str, PathError> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(PathError::NotAbsolute);
    };
    let bytes = path.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\\' => return Err(PathError::Backslash),
            b'%' => {
                let (Some(&h), Some(&l)) = (bytes.get(i + 1), bytes.get(i + 2)) else {
                    return Err(PathError::MalformedEscape);
                };
                let (Some(h), Some(l)) = (hex(h), hex(l)) else {
                    return Err(PathError::MalformedEscape);
                };
                if must_be_literal(h << 4 | l) {
                    return Err(PathError::EncodedCharacter);
                }
            }
            _ => {}
        }
    }
    let segments = rest.split('/');
    let last = rest.split('/').count() - 1;
    for (i, segment) in segments.enumerate() {
        // `/` alone, and one trailing slash, are not doubled slashes.
        if segment.is_empty() && i != last {
            return Err(PathError::EmptySegment);
        }
        // The name before `;parameters`, the `;` also escaped (`.%3B`: a server that decodes
        // before it strips parameters reads `.;`).
        let bytes = segment.as_bytes();
        let end = (0..bytes.len())
            .find(|&i| {
                bytes[i] == b';'
                    || bytes[i..].len() >= 3
                        && bytes[i] == b'%'
                        && bytes[i + 1] == b'3'
                        && bytes[i + 2] | 0x20 == b'b'
            })
            .unwrap_or(bytes.len());
        let name = &segment[..end];
        if name == "." || name == ".." {
            return Err(PathError::DotSegment);
        }
    }
    Ok(path)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Bytes whose percent-escape is refused: path structure, a second decoding round, characters
/// that are the same as their escape (RFC 3986 unreserved), control bytes.
fn must_be_literal(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(b, b'.' | b'/' | b'\\' | b'%' | b'-' | b'_' | b'~')
        || b < 0x20
        || b == 0x7f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_paths_pass_unchanged() {
        for p in [
            "/",
            "/v1/",
            "/v1/chat/completions",
            "/v1/embeddings",
            "/v1/models/ft:gpt-4o:org:name:abc123",
            "/v1/models/gpt-4o-2024-08-06",
            "/v1/files/file-abc/content",
            "/v1/chat/completions/",
            "/v1/models/caf%C3%A9",
            "/v1/models/a%3Ab",
            "/v1/models/v1.5",
            "/v1/models/...",
        ] {
            assert_eq!(check(p), Ok(p), "{p}");
        }
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        use PathError::*;
        for (p, why) in [
            ("v1/chat/completions", NotAbsolute),
            ("", NotAbsolute),
            ("/v1/embeddings/../chat/completions", DotSegment),
            ("/v1/embeddings/./x", DotSegment),
            ("/v1/..", DotSegment),
            ("/v1/embeddings/..;/chat/completions", DotSegment),
            ("/v1/embeddings/.;x/y", DotSegment),
            // Found by fuzzing (fuzz/ path_check): an escaped `;` after a dot segment.
            ("/v1/embeddings/..%3b/chat/completions", DotSegment),
            ("/v1/embeddings/.%3Bx/y", DotSegment),
            ("/v1/embeddings/%2e%2e/chat/completions", EncodedCharacter),
            ("/v1/embeddings/%2E%2E/chat/completions", EncodedCharacter),
            ("/v1/embeddings/.%2e/chat/completions", EncodedCharacter),
            ("/v1/embeddings%2f..%2fchat/completions", EncodedCharacter),
            ("/v1/embeddings%2F..%2Fchat/completions", EncodedCharacter),
            ("/v1/embeddings%5c..%5cchat", EncodedCharacter),
            ("/v1/embeddings%252e%252e", EncodedCharacter),
            ("/v1/%63hat/completions", EncodedCharacter),
            ("/v1/chat%00/completions", EncodedCharacter),
            ("/v1/embeddings//../chat", EmptySegment),
            ("//v1/chat/completions", EmptySegment),
            ("/v1//chat/completions", EmptySegment),
            ("/v1/chat/completions//", EmptySegment),
            ("/v1/embeddings\\..\\chat", Backslash),
            ("/v1/chat%", MalformedEscape),
            ("/v1/chat%2", MalformedEscape),
            ("/v1/chat%zz", MalformedEscape),
        ] {
            assert_eq!(check(p), Err(why), "{p}");
        }
    }

    #[test]
    fn every_accepted_path_is_its_own_normal_form() {
        // Whatever passes has no segment a resolver would remove or merge, and no escape that
        // decodes into structure: splitting on `/` gives the same segments before and after
        // decoding the allowed escapes.
        let samples = [
            "/v1/a%20b/c",
            "/v1/models/a%3Ab%40c",
            "/v1/x;y/z",
            "/v1/..a/b",
            "/v1/a../b",
        ];
        for p in samples {
            let ok = check(p).unwrap();
            assert!(ok.split('/').skip(1).all(|s| s != "." && s != ".."));
        }
    }
}
