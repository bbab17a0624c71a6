//! Tests of [`super::SseMeter`]: every usage shape, every split point.

use super::*;

fn run(meter: &mut SseMeter, input: &[u8], cuts: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut last = 0;
    for &c in cuts.iter().chain(std::iter::once(&input.len())) {
        out.extend_from_slice(&meter.feed(Bytes::copy_from_slice(&input[last..c])));
        last = c;
    }
    out.extend_from_slice(&meter.finish());
    out
}

const USAGE: &str = r#"{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12,"prompt_tokens_details":{"cached_tokens":4}}"#;

fn expected() -> Usage {
    Usage {
        prompt: 9,
        cached: 4,
        completion: 3,
        total: 12,
    }
}

fn chunk(delta: &str, finish: &str, usage: Option<&str>) -> String {
    let usage = usage.map_or(String::new(), |u| format!(",\"usage\":{u}"));
    format!(
        "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":{finish}}}]{usage}}}\n\n"
    )
}

/// A stream in one of the shapes upstreams use, and what a client that did not ask for usage
/// must receive.
fn shape(name: &str) -> (String, String) {
    let tokens = ["He", "llo", " wör\\\"ld"];
    let mut with = String::new();
    let mut without = String::new();
    for t in tokens {
        let usage_null = (name == "null").then_some("null");
        with.push_str(&chunk(
            &format!("{{\"content\":\"{t}\"}}"),
            "null",
            usage_null,
        ));
        without.push_str(&chunk(&format!("{{\"content\":\"{t}\"}}"), "null", None));
    }
    match name {
        // OpenAI: a usage-only chunk with `choices: []`.
        "openai" | "null" => {
            let usage_null = (name == "null").then_some("null");
            with.push_str(&chunk("{}", "\"stop\"", usage_null));
            without.push_str(&chunk("{}", "\"stop\"", None));
            with.push_str(&format!(
                "data: {{\"id\":\"c\",\"choices\":[],\"usage\":{USAGE}}}\n\n"
            ));
        }
        // vLLM and others: the usage chunk has a choice with an empty delta.
        "empty-delta" => {
            with.push_str(&chunk("{}", "\"stop\"", None));
            without.push_str(&chunk("{}", "\"stop\"", None));
            with.push_str(&chunk("{}", "null", Some(USAGE)));
        }
        // The usage rides on the finish chunk, which also carries content.
        "finish" => {
            with.push_str(&chunk("{\"content\":\"!\"}", "\"stop\"", Some(USAGE)));
            without.push_str(&chunk("{\"content\":\"!\"}", "\"stop\"", None));
        }
        _ => unreachable!(),
    }
    with.push_str("data: [DONE]\n\n");
    without.push_str("data: [DONE]\n\n");
    (with, without)
}

#[test]
fn no_usage_reaches_a_client_that_did_not_ask_in_any_shape_at_any_split() {
    for name in ["openai", "empty-delta", "finish", "null"] {
        let (with, without) = shape(name);
        let (with, without) = (with.as_bytes(), without.as_bytes());
        for cut in 0..=with.len() {
            let mut m = SseMeter::new(Api::ChatCompletions, true);
            let out = run(&mut m, with, &[cut]);
            assert_eq!(m.usage(), Some(expected()), "{name} cut {cut}");
            assert_eq!(
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(without),
                "{name} cut {cut}"
            );
            // Pass-through when the client asked: byte for byte.
            let mut m = SseMeter::new(Api::ChatCompletions, false);
            assert_eq!(run(&mut m, with, &[cut]), with, "{name} cut {cut}");
            assert_eq!(m.usage(), Some(expected()), "{name} cut {cut}");
        }
        // Every byte its own read.
        let mut m = SseMeter::new(Api::ChatCompletions, true);
        let cuts: Vec<usize> = (1..with.len()).collect();
        assert_eq!(run(&mut m, with, &cuts), without, "{name}");
        assert_eq!(m.usage(), Some(expected()));
        // "He" + "llo" + " wör\"ld" (+ "!") delivered.
        let chars = if name == "finish" { 13 } else { 12 };
        assert_eq!(m.delivered.chars, chars, "{name}");
    }
}

#[test]
fn streams_without_usage_and_crlf_events() {
    let (_, plain) = shape("openai");
    let mut m = SseMeter::new(Api::ChatCompletions, false);
    assert_eq!(run(&mut m, plain.as_bytes(), &[5, 40]), plain.as_bytes());
    assert_eq!(m.usage(), None);
    let crlf = b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}\r\n\r\ndata: [DONE]\r\n\r\n";
    let mut m = SseMeter::new(Api::ChatCompletions, true);
    assert_eq!(run(&mut m, crlf, &[10]), b"data: [DONE]\r\n\r\n");
    assert_eq!(m.usage().unwrap().total, 3);
    // An unterminated last event is still read.
    let cut_short =
        b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}";
    let mut m = SseMeter::new(Api::ChatCompletions, false);
    assert_eq!(run(&mut m, cut_short, &[]), cut_short);
    assert_eq!(m.usage().unwrap().total, 3);
}

#[test]
fn responses_stream_usage_from_response_completed() {
    let events = [
        r#"{"type":"response.created","sequence_number":0,"response":{"id":"resp_1","status":"in_progress","output":[],"usage":null}}"#,
        r#"{"type":"response.output_text.delta","sequence_number":1,"item_id":"msg_1","output_index":0,"content_index":0,"delta":"你好"}"#,
        r#"{"type":"response.output_text.delta","sequence_number":2,"item_id":"msg_1","output_index":0,"content_index":0,"delta":", world"}"#,
        r#"{"type":"response.output_text.done","sequence_number":3,"item_id":"msg_1","output_index":0,"content_index":0,"text":"你好, world"}"#,
        r#"{"type":"response.completed","sequence_number":4,"response":{"id":"resp_1","status":"completed","output":[{"type":"message","content":[{"type":"output_text","text":"你好, world"}]}],"usage":{"input_tokens":1234,"input_tokens_details":{"cached_tokens":34},"output_tokens":567,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":1801}}}"#,
    ];
    let body: String = events
        .iter()
        .map(|e| {
            let kind = e.split('"').nth(3).unwrap();
            format!("event: {kind}\ndata: {e}\n\n")
        })
        .collect();
    for cut in (0..body.len()).step_by(7) {
        let mut m = SseMeter::new(Api::Responses, false);
        assert_eq!(run(&mut m, body.as_bytes(), &[cut]), body.as_bytes());
        let u = m.usage().unwrap();
        assert_eq!(
            (u.prompt, u.cached, u.completion, u.total),
            (1234, 34, 567, 1801)
        );
        assert_eq!(m.delivered.chars, 9, "only the deltas count");
    }
}

#[test]
fn messages_stream_usage_from_start_and_delta() {
    let events = [
        (
            "message_start",
            r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","content":[],"model":"claude","stop_reason":null,"usage":{"input_tokens":25,"cache_creation_input_tokens":10,"cache_read_input_tokens":5,"output_tokens":1}}}"#,
        ),
        (
            "content_block_start",
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
        ),
        (
            "content_block_delta",
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hello"}}"#,
        ),
        (
            "content_block_stop",
            r#"{"type":"content_block_stop","index":0}"#,
        ),
        (
            "message_delta",
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}"#,
        ),
        ("message_stop", r#"{"type":"message_stop"}"#),
    ];
    let body: String = events
        .iter()
        .map(|(k, e)| format!("event: {k}\ndata: {e}\n\n"))
        .collect();
    let mut m = SseMeter::new(Api::Messages, false);
    let cuts: Vec<usize> = (1..body.len()).step_by(3).collect();
    assert_eq!(run(&mut m, body.as_bytes(), &cuts), body.as_bytes());
    let u = m.usage().unwrap();
    assert_eq!((u.prompt, u.cached, u.completion, u.total), (40, 5, 15, 55));
    assert_eq!(m.delivered.chars, 5);
}

#[test]
fn chunks_that_carry_something_are_kept() {
    assert!(carries_nothing(br#"{"id":"c","choices":[]}"#));
    assert!(carries_nothing(br#"{"id":"c"}"#));
    assert!(carries_nothing(
        br#"{"choices":[{"index":0,"delta":{},"finish_reason":null,"logprobs":null}]}"#
    ));
    assert!(carries_nothing(br#"{"choices":[{"index":0,"text":""}]}"#));
    assert!(!carries_nothing(
        br#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#
    ));
    assert!(!carries_nothing(
        br#"{"choices":[{"index":0,"delta":{"role":"assistant"}}]}"#
    ));
    assert!(!carries_nothing(b"not json"));
}

#[test]
fn only_text_under_text_keys_is_sampled() {
    // Key names and `"usage"` inside generated text are text, not keys; escaped quotes too.
    let event = concat!(
        r#"data: {"id":"c1","choices":[{"index":0,"delta":{"role":"assistant","#,
        r#""content":"say \"content\": \"usage\" {"},"finish_reason":null}],"#,
        r#""text":null,"usage":null}"#,
        "\n\n"
    );
    let mut m = SseMeter::new(Api::ChatCompletions, true);
    let out = run(&mut m, event.as_bytes(), &[30, 31, 90]);
    // `say "content": "usage" {` is 24 characters; the `usage: null` member is cut.
    assert_eq!(m.delivered.chars, 24);
    assert!(!String::from_utf8(out).unwrap().contains("\"usage\":null"));
    assert_eq!(m.usage(), None);
}
