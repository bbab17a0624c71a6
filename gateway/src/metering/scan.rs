//! Byte-level reading of JSON text, for editing and sampling events without building a tree:
//! walking an object's top-level members, the bytes to cut to remove one ([`member_cut`]),
//! and decoding a JSON string's escapes ([`decode_into`]).
//!
//! Invalid JSON is reported as `None`; callers then leave the bytes as they are.

use std::ops::Range;

/// One `"key": value` of an object: byte ranges of the key (quotes included) and the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub key: Range<usize>,
    pub value: Range<usize>,
}

fn skip_ws(json: &[u8], mut i: usize) -> usize {
    while i < json.len() && matches!(json[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// The index just past the string starting with the quote at `start`.
fn string_end(json: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    while i < json.len() {
        match json[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// The index just past the value starting at `start`.
fn value_end(json: &[u8], start: usize) -> Option<usize> {
    match *json.get(start)? {
        b'"' => string_end(json, start),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = start;
            while i < json.len() {
                match json[i] {
                    b'"' => {
                        i = string_end(json, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            None
        }
        _ => {
            let len = json[start..]
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))?;
            (len > 0).then_some(start + len)
        }
    }
}

/// Calls `visit` with each top-level member of the object `json` (surrounding whitespace
/// allowed) until it returns true. `Some(true)`: stopped by `visit`; `Some(false)`: every member
/// visited and the object well formed to its end; `None`: not an object, or malformed before
/// `visit` stopped. Allocates nothing.
fn walk(json: &[u8], mut visit: impl FnMut(Member) -> bool) -> Option<bool> {
    let mut i = skip_ws(json, 0);
    if json.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(json, i + 1);
    if json.get(i) == Some(&b'}') {
        return (skip_ws(json, i + 1) == json.len()).then_some(false);
    }
    loop {
        if json.get(i) != Some(&b'"') {
            return None;
        }
        let key_end = string_end(json, i)?;
        let colon = skip_ws(json, key_end);
        if json.get(colon) != Some(&b':') {
            return None;
        }
        let value_start = skip_ws(json, colon + 1);
        let value_stop = value_end(json, value_start)?;
        let member = Member {
            key: i..key_end,
            value: value_start..value_stop,
        };
        if visit(member) {
            return Some(true);
        }
        i = skip_ws(json, value_stop);
        match json.get(i) {
            Some(b',') => i = skip_ws(json, i + 1),
            Some(b'}') => return (skip_ws(json, i + 1) == json.len()).then_some(false),
            _ => return None,
        }
    }
}

/// The bytes to cut from the object `json` to remove its top-level member named `key` (given
/// with its quotes, e.g. `"usage"`) and one separating comma, leaving valid JSON with every
/// other byte unchanged; `None` when `json` is not an object or has no such member.
pub fn member_cut(json: &[u8], key: &[u8]) -> Option<Range<usize>> {
    let mut previous_end: Option<usize> = None;
    let mut first: Option<Member> = None;
    let mut cut = None;
    walk(json, |m| {
        if let Some(f) = &first {
            // The member was the first: cut up to the next key.
            cut = Some(f.key.start..m.key.start);
            return true;
        }
        if &json[m.key.clone()] == key {
            match previous_end {
                // `, "usage": {…}` after the previous value.
                Some(end) => {
                    cut = Some(end..m.value.end);
                    return true;
                }
                None => first = Some(m.clone()),
            }
        }
        previous_end = Some(m.value.end);
        false
    })?;
    // The only member (`{"usage": …}` → `{}`).
    cut.or_else(|| first.map(|m| m.key.start..m.value.end))
}

/// Appends the text of a JSON string's contents (between the quotes, escapes undone) to `out`;
/// returns the characters appended. Invalid escapes and lone surrogates become U+FFFD.
pub fn decode_into(raw: &[u8], out: &mut String) -> u64 {
    let mut chars = 0;
    let mut i = 0;
    while i < raw.len() {
        let run = raw[i..]
            .iter()
            .position(|&b| b == b'\\')
            .unwrap_or(raw.len() - i);
        if run > 0 {
            let text = String::from_utf8_lossy(&raw[i..i + run]);
            chars += text.chars().count() as u64;
            out.push_str(&text);
            i += run;
            continue;
        }
        let c = match raw.get(i + 1) {
            Some(b'n') => '\n',
            Some(b't') => '\t',
            Some(b'r') => '\r',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'u') => {
                let (c, used) = unicode_escape(&raw[i..]);
                out.push(c);
                chars += 1;
                i += used;
                continue;
            }
            Some(&b) => b as char,
            None => '\u{fffd}',
        };
        out.push(c);
        chars += 1;
        i += 2;
    }
    chars
}

/// `\uXXXX` (and a following low surrogate) at the start of `raw`: the character and the bytes
/// used.
fn unicode_escape(raw: &[u8]) -> (char, usize) {
    let hex = |s: &[u8]| -> Option<u32> {
        let s = std::str::from_utf8(s.get(2..6)?).ok()?;
        u32::from_str_radix(s, 16).ok()
    };
    let Some(high) = hex(raw) else {
        return ('\u{fffd}', raw.len().min(6));
    };
    if (0xD800..0xDC00).contains(&high) && raw.get(6) == Some(&b'\\') {
        if let Some(low) = hex(&raw[6..]).filter(|l| (0xDC00..0xE000).contains(l)) {
            let c = 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00);
            return (char::from_u32(c).unwrap_or('\u{fffd}'), 12);
        }
    }
    (char::from_u32(high).unwrap_or('\u{fffd}'), 6)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `json` without its top-level member named `key` ([`member_cut`] applied).
    pub fn remove_member(json: &[u8], key: &[u8]) -> Option<Vec<u8>> {
        let cut = member_cut(json, key)?;
        let mut out = Vec::with_capacity(json.len() - cut.len());
        out.extend_from_slice(&json[..cut.start]);
        out.extend_from_slice(&json[cut.end..]);
        Some(out)
    }

    /// The top-level members of the object `json` (surrounding whitespace allowed).
    pub fn members(json: &[u8]) -> Option<Vec<Member>> {
        let mut out = Vec::with_capacity(8);
        walk(json, |m| {
            out.push(m);
            false
        })?;
        Some(out)
    }

    #[test]
    fn members_and_removal_are_byte_exact() {
        let j = br#"{"id":"c","choices":[{"delta":{"content":"a,}\"]"}}],"usage":null}"#;
        let m = members(j).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(&j[m[2].value.clone()], b"null");
        assert_eq!(
            remove_member(j, b"\"usage\"").unwrap(),
            br#"{"id":"c","choices":[{"delta":{"content":"a,}\"]"}}]}"#
        );
        let first = br#"{ "usage" : {"a":1} , "id":"x"}"#;
        assert_eq!(
            remove_member(first, b"\"usage\"").unwrap(),
            br#"{ "id":"x"}"#
        );
        assert_eq!(
            remove_member(br#"{"usage":{}}"#, b"\"usage\"").unwrap(),
            b"{}"
        );
        assert_eq!(remove_member(br#"{"id":1}"#, b"\"usage\""), None);
        assert_eq!(remove_member(b"[DONE]", b"\"usage\""), None);
        assert_eq!(members(br#"{"a":1"#), None);
        assert_eq!(members(br#"{"a":1}x"#), None);
        assert_eq!(members(b"{}").unwrap().len(), 0);
    }

    #[test]
    fn removal_matches_a_parsed_edit() {
        let cases: &[&[u8]] = &[
            br#"{"usage":null,"a":[1,{"usage":2}],"b":"}\"usage\":"}"#,
            br#"{"a":1 , "usage" : { "x" : [ ] } , "b" : true }"#,
            br#"  {"a":{"b":{"c":[[[]]]}},"usage":-1.5e3}  "#,
            br#"{"usage":"x"}"#,
        ];
        for case in cases {
            let mut want: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(case).unwrap();
            want.remove("usage");
            let got = remove_member(case, b"\"usage\"").unwrap();
            let got: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&got)
                .unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(&got)));
            assert_eq!(got, want, "{}", String::from_utf8_lossy(case));
        }
    }

    #[test]
    fn strings_decode() {
        let mut s = String::new();
        let n = decode_into(br#"a\n\"\u4f60\ud83d\ude00\ud800x"#, &mut s);
        assert_eq!(s, "a\n\"你😀\u{fffd}x");
        assert_eq!(n, 7);
    }
}
