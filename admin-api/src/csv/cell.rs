//! One CSV text cell: RFC 4180 quoting and formula neutralizing. Depends on nothing (the fuzz
//! target `fuzz/fuzz_targets/csv_cell.rs` compiles this file alone).

/// Whether a spreadsheet would read a cell starting with `s` as a formula: `=`, `+`, `-`,
/// `@`, a tab or a carriage return first (OWASP, "CSV Injection").
pub fn is_formula_like(s: &str) -> bool {
    matches!(
        s.as_bytes().first(),
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r')
    )
}

/// One text cell: formula-like text (see [`is_formula_like`]; e.g. a `user_agent` of
/// `=HYPERLINK(…)`) gets a leading `'`, which spreadsheets show as text rather than
/// evaluate; then RFC 4180: quoted, with quotes doubled, when it holds a comma, a quote or a
/// line break. Only for text columns: numbers (a negative cost) are written as they are.
pub fn text_cell(buf: &mut Vec<u8>, s: &str) {
    let quoted = s.bytes().any(|b| matches!(b, b',' | b'"' | b'\r' | b'\n'));
    if quoted {
        buf.push(b'"');
    }
    if is_formula_like(s) {
        buf.push(b'\'');
    }
    for (i, part) in s.split('"').enumerate() {
        if i > 0 {
            buf.extend_from_slice(b"\"\"");
        }
        buf.extend_from_slice(part.as_bytes());
    }
    if quoted {
        buf.push(b'"');
    }
}
