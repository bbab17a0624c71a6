//! The usage export's CSV text cells (`admin-api/src/csv/cell.rs`, compiled here alone: the
//! fuzz build needs none of the admin API's dependencies) on arbitrary strings: the
//! input's NUL-separated parts are the cells of one row. Invariant: an RFC 4180 reader reads the
//! row back as exactly those cells, each formula-like one (`=`, `+`, `-`, `@`, tab, CR first)
//! with a leading `'`, so no cell a spreadsheet reads starts a formula.
#![no_main]

#[path = "../../admin-api/src/csv/cell.rs"]
mod cell;

use cell::{is_formula_like, text_cell};
use libfuzzer_sys::fuzz_target;

/// Reads one CRLF-terminated RFC 4180 record; panics on anything malformed.
fn read_record(row: &[u8]) -> Vec<Vec<u8>> {
    let mut cells = Vec::new();
    let mut i = 0;
    loop {
        let mut cell = Vec::new();
        if row.get(i) == Some(&b'"') {
            i += 1;
            loop {
                match row.get(i) {
                    Some(b'"') if row.get(i + 1) == Some(&b'"') => {
                        cell.push(b'"');
                        i += 2;
                    }
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(&b) => {
                        cell.push(b);
                        i += 1;
                    }
                    None => panic!("unterminated quoted cell in {row:?}"),
                }
            }
        } else {
            while let Some(&b) = row.get(i) {
                if matches!(b, b',' | b'\r' | b'\n') {
                    break;
                }
                assert_ne!(b, b'"', "a quote in an unquoted cell: {row:?}");
                cell.push(b);
                i += 1;
            }
        }
        cells.push(cell);
        match &row[i..] {
            [b',', ..] => i += 1,
            b"\r\n" => return cells,
            rest => panic!("{rest:?} after a cell in {row:?}"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let cells: Vec<&str> = text.split('\0').collect();
    let mut row = Vec::new();
    for (i, cell) in cells.iter().enumerate() {
        if i > 0 {
            row.push(b',');
        }
        text_cell(&mut row, cell);
    }
    row.extend_from_slice(b"\r\n");
    let read = read_record(&row);
    assert_eq!(read.len(), cells.len());
    for (got, cell) in read.iter().zip(&cells) {
        let want = if is_formula_like(cell) {
            format!("'{cell}")
        } else {
            (*cell).to_owned()
        };
        assert_eq!(got, want.as_bytes());
        assert!(
            !matches!(got.first(), Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r')),
            "a formula-like cell: {got:?}"
        );
    }
});
