//! Permission patterns and IP allowlist entries (`apikey/src/pattern.rs`) on arbitrary
//! strings: the input's lines are the patterns, its last line also the subject. Invariants: a
//! parsed pattern prints as written and parses back to itself; the list matches exactly when
//! one of its patterns matches by the documented rule (`*`, `prefix*`, exact); lenient parsing
//! keeps exactly the valid patterns; an allowlist entry contains its own network address.
#![no_main]

use aihub_apikey::pattern::{parse_ip_net, IpAllowlist, Pattern, Patterns};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let lines: Vec<&str> = text.split('\n').collect();
    let subject = lines.last().copied().unwrap_or("");
    let mut valid = Vec::new();
    for line in &lines {
        let Ok(p) = Pattern::parse(line) else {
            assert!(line.is_empty() || line.strip_suffix('*').unwrap_or(line).contains('*'));
            continue;
        };
        assert_eq!(p.to_string(), *line);
        assert_eq!(Pattern::parse(&p.to_string()), Ok(p.clone()));
        let by_rule = match line.strip_suffix('*') {
            Some(prefix) => subject.starts_with(prefix),
            None => subject == *line,
        };
        assert_eq!(p.matches(subject), by_rule, "{line:?} on {subject:?}");
        valid.push(*line);
    }
    let (lenient, errors) = Patterns::parse_lenient(&lines);
    assert_eq!(lenient.to_strings(), valid);
    assert_eq!(errors.len(), lines.len() - valid.len());
    assert_eq!(Patterns::parse(&lines).is_ok(), errors.is_empty());
    assert_eq!(
        lenient.matches(subject),
        valid
            .iter()
            .any(|v| Pattern::parse(v).unwrap().matches(subject))
    );

    for line in &lines {
        if let Ok(net) = parse_ip_net(line) {
            let list = IpAllowlist::new(vec![net]);
            assert!(list.contains(&net.network()), "{line:?} → {net}");
            assert!(list.contains(&net.broadcast()), "{line:?} → {net}");
            assert_eq!(parse_ip_net(&net.to_string()), Ok(net));
        }
    }
});
