//! The streaming YAML reader (`yamlconf/src/stream.rs`) against the whole-document parser on
//! arbitrary text. Invariant (its documented contract): streaming `keys:` item by item gives
//! the same document and the same items as parsing the whole text, and fails when (and only
//! when) parsing the whole text fails, but for anchors used across the list's boundary, which
//! it documents as an error of its own. Both refuse an anchor name defined twice
//! (`yamlconf/src/anchors.rs`: serde_norway misreads aliases after one, found here).
#![no_main]

use std::path::Path;

use aihub_yamlconf::{parse, parse_streaming};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new("fuzz.yaml");
    if text
        .split(['\n', '\r'])
        .filter(|l| without_properties(l).starts_with("keys"))
        .count()
        > 1
    {
        // A repeated top-level key (also after a lone CR, a YAML line break, or behind an
        // anchor or tag: `&a keys:`): the configuration's structs refuse it either way; a JSON
        // value here would keep the last one (not a contract of the streaming reader).
        return;
    }
    // The reader's documented limit: it splits lines, so a `keys:` line inside a quoted or
    // flow scalar whose continuation lines are not indented (libyaml tolerates them) is read as
    // the list. Such documents (a quote or bracket before the list) are not compared.
    let before = text.find("\nkeys").map_or(text, |i| &text[..i]);
    if before.contains(['"', '\'', '[', '{']) {
        return;
    }
    let mut items = Vec::new();
    let streamed =
        parse_streaming::<Value, Value>(text.as_bytes(), file, "keys", |i| items.push(i));
    let whole = parse::<Value>(text, file);
    if let (Ok(_), Err(e)) = (&streamed, &whole) {
        panic!("streaming accepted what the whole parse refuses ({e}): {text:?}");
    }
    let (Ok((mut doc, was_streamed)), Ok(mut want)) = (streamed, whole) else {
        return;
    };
    if was_streamed {
        let Some(list) = want.get_mut("keys") else {
            panic!("streamed a list the whole document does not have: {text:?}");
        };
        let list = std::mem::take(list);
        assert_eq!(Value::Array(items), list, "streamed items differ: {text:?}");
        assert_eq!(
            doc.get_mut("keys").map(std::mem::take),
            Some(Value::Array(vec![]))
        );
    } else {
        assert!(items.is_empty());
    }
    assert_eq!(doc, want, "the rest of the document differs: {text:?}");
});

/// A line without the anchors and tags (`&a `, `!t `) in front of its first node.
fn without_properties(mut line: &str) -> &str {
    while line.starts_with(['&', '!']) {
        match line.split_once([' ', '\t']) {
            Some((_, rest)) => line = rest.trim_start(),
            None => return "",
        }
    }
    line
}
