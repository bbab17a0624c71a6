//! The JSON usage readers (`gateway/src/metering/{json,fields,scan}.rs`) of every API on
//! arbitrary bytes cut at arbitrary points. Invariants: the meter's usage and text count are
//! the same for any split as for the whole body; the streaming scan (bodies past 1 MiB) is
//! split-independent too, and agrees with the whole-body reader on a JSON object whose one
//! `"usage"` is its top-level member.
#![no_main]

use aihub_fuzz::{count, Split};
use aihub_gateway::metering::json::scan_usage;
use aihub_gateway::metering::{json_usage, JsonMeter};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

fuzz_target!(|data: &[u8]| {
    let Some(input) = Split::of(data) else { return };
    let api = input.api;
    let chunks = input.chunks();
    let whole = json_usage(input.body, api);

    let mut meter = JsonMeter::default();
    for c in &chunks {
        meter.push(&Bytes::copy_from_slice(c));
    }
    assert_eq!(
        meter.usage(api),
        whole,
        "the meter's usage depends on the split"
    );
    let mut one = JsonMeter::default();
    one.push(&Bytes::copy_from_slice(input.body));
    assert_eq!(meter.delivered().chars, one.delivered().chars);

    let scanned = scan_usage([input.body], api);
    assert_eq!(
        scan_usage(chunks.iter().copied(), api),
        scanned,
        "the streaming scan depends on the split"
    );
    // Both readers agree where the top-level `usage` is unambiguous.
    if count(input.body, b"\"usage\"") == 1 && count(input.body, b"\\u") == 0 {
        if let Ok(object) = serde_json::from_slice::<Map<String, Value>>(input.body) {
            if object.contains_key("usage") {
                assert_eq!(
                    scanned.0, whole,
                    "the streaming scan and the whole read differ"
                );
            }
        }
    }
});
