//! The SSE usage meter and stripper (`gateway/src/metering/sse.rs`) on arbitrary bytes cut at
//! arbitrary points. Invariants: the client's bytes, the usage and the delivered-text count are
//! the same for any split as for the whole body; without stripping the client gets the body
//! byte for byte; with stripping, an event whose one `data:` line is a JSON object comes out
//! as that object without its `usage` member (still valid JSON), or is dropped only when its
//! `usage` was an object.
#![no_main]

use aihub_fuzz::{count, data_lines, sse_events, Split};
use aihub_gateway::metering::SseMeter;
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

fn run(meter: &mut SseMeter, chunks: &[&[u8]]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for c in chunks {
        out.extend_from_slice(&meter.feed(Bytes::copy_from_slice(c)));
    }
    out.extend_from_slice(&meter.finish());
    out.to_vec()
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Split::of(data) else { return };
    let strip = input.flag;
    let mut whole = SseMeter::new(input.api, strip);
    let whole_out = run(&mut whole, &[input.body]);
    let mut split = SseMeter::new(input.api, strip);
    let split_out = run(&mut split, &input.chunks());
    assert_eq!(
        whole_out, split_out,
        "the client's bytes depend on the split"
    );
    assert_eq!(
        whole.usage(),
        split.usage(),
        "the usage depends on the split"
    );
    assert_eq!(whole.delivered.chars, split.delivered.chars);
    if !strip {
        assert_eq!(whole_out, input.body, "pass-through changed the stream");
        return;
    }
    // The stripper, one event at a time (an event's edit depends on that event alone).
    let (mut events, tail) = sse_events(input.body);
    events.push(tail);
    for event in events {
        let lines = data_lines(event);
        let [line] = lines.as_slice() else { continue };
        if count(line, b"\"usage\"") > 1 || count(line, b"\\u") > 0 {
            continue; // duplicate or escaped keys: not this oracle's business
        }
        let Ok(mut object) = serde_json::from_slice::<Map<String, Value>>(line) else {
            continue;
        };
        let out = run(&mut SseMeter::new(input.api, true), &[event]);
        let Some(usage) = object.remove("usage") else {
            assert_eq!(out, event, "an event without usage was changed");
            continue;
        };
        if out.is_empty() {
            assert!(
                usage.is_object(),
                "an event was dropped for a non-object usage"
            );
            continue;
        }
        let out_lines = data_lines(&out);
        assert_eq!(out_lines.len(), 1, "the edited event lost its data line");
        let edited: Map<String, Value> = serde_json::from_slice(out_lines[0]).unwrap_or_else(|e| {
            panic!(
                "the edited event is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&out)
            )
        });
        assert_eq!(edited, object, "the edit is not the object without `usage`");
    }
});
