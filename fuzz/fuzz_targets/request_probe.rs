//! The routing probe (`gateway/src/request.rs`): `model`, `stream`, `stream_options` and the
//! token fields read from arbitrary bytes, then the upstream body with the model renamed and
//! the usage option injected. Invariants: a probe's model span is the model's JSON string in
//! the body; the upstream body is the same JSON object with only `model` and
//! `stream_options.include_usage` changed (where the body parses as a whole).
#![no_main]

use aihub_gateway::request::{inspect, upstream_body};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

fuzz_target!(|data: &[u8]| {
    let Some((&cfg, body)) = data.split_first() else {
        return;
    };
    let Ok(probe) = inspect(body) else { return };
    assert!(!probe.model.is_empty());
    let spanned: String = serde_json::from_slice(&body[probe.model_span.clone()])
        .expect("the model span is a JSON string");
    assert_eq!(spanned, probe.model);
    assert!(probe.n > 0);

    let alias = match cfg & 3 {
        0 => None,
        1 => Some("alias"),
        2 => Some("a \"quoted\" \\ alias \u{1F600}"),
        _ => Some(probe.model.as_str()),
    };
    let metering = cfg & 4 != 0;
    let (out, injected) = upstream_body(Bytes::copy_from_slice(body), &probe, alias, metering);
    assert_eq!(injected, metering && probe.stream && !probe.include_usage);
    if alias.is_none() && !injected {
        assert_eq!(&out[..], body, "an unchanged body was rewritten");
        return;
    }
    // The probe reads only its fields (others are skipped, e.g. a lone surrogate escape in a
    // message is not decoded): the rest is compared where the body parses whole.
    let Ok(mut before) = serde_json::from_slice::<Map<String, Value>>(body) else {
        return;
    };
    let mut after: Map<String, Value> = serde_json::from_slice(&out).unwrap_or_else(|e| {
        panic!(
            "the upstream body is not a JSON object ({e}): {:?}",
            String::from_utf8_lossy(&out)
        )
    });
    let model = after.remove("model").expect("the model stays");
    assert_eq!(model, Value::from(alias.unwrap_or(&probe.model)));
    before.remove("model");
    if injected {
        let options = after
            .remove("stream_options")
            .expect("stream_options injected");
        assert_eq!(options["include_usage"], Value::Bool(true));
        before.remove("stream_options");
    }
    assert_eq!(
        before, after,
        "the upstream body changed more than model/stream_options"
    );
});
