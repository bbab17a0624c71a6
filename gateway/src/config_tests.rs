//! Tests of [`super`]: parsing, defaults, validation errors naming the file and key.
use super::*;

fn parse(yaml: &str) -> Result<Config, ConfigError> {
    let file = Path::new("test.yaml");
    let c = Config::parse(yaml, file)?;
    c.check(file)?;
    Ok(c)
}

#[test]
fn defaults_apply() {
    let c = parse("{}").unwrap();
    assert_eq!(c.server.listen, vec![Listen::plain("127.0.0.1:8080")]);
    assert_eq!(c.server.max_request_body_bytes, 10 * 1024 * 1024);
}

#[test]
fn unknown_fields_are_named_with_their_path() {
    let e = parse("upstreams:\n  a:\n    endpoints: [http://x]\n    colour: red\n").unwrap_err();
    assert_eq!(e.key, "upstreams.a.colour");
    assert!(e.message.contains("unknown field `colour`"), "{e}");
    assert!(e.to_string().starts_with("test.yaml: upstreams.a.colour: "));
}

#[test]
fn validation_names_the_key() {
    let e = parse("upstreams:\n  a:\n    endpoints: [ftp://x]\n").unwrap_err();
    assert_eq!(e.key, "upstreams.a.endpoints[0]");
    let e = parse(
        "upstreams:\n  a:\n    endpoints: [http://x]\nroutes:\n  - {model: m, upstream: b}\n",
    )
    .unwrap_err();
    assert_eq!(e.key, "routes[0].upstream");
    let e = parse(
        "upstreams:\n  a:\n    endpoints: [http://x]\n    api_key_env: AIHUB_TEST_SURELY_UNSET\n",
    )
    .unwrap_err();
    assert_eq!(e.key, "upstreams.a.api_key_env");
    let e = parse("keys:\n  - {id: k, hash: nope, developer_id: d}\n").unwrap_err();
    assert_eq!(e.key, "keys[0].hash");
    let e = parse("server:\n  listen: [\"nope\"]\n").unwrap_err();
    assert_eq!(e.key, "server.listen[0]");
}

#[test]
fn listeners_take_tls_and_trusted_proxies() {
    let c = parse(
        "server:\n  listen:\n    - 127.0.0.1:1\n    - {addr: \"127.0.0.1:2\", trusted_proxies: [10.0.0.0/8, \"::1\"]}\n",
    )
    .unwrap();
    assert_eq!(c.server.listen[0], Listen::plain("127.0.0.1:1"));
    assert!(c.server.listen[1]
        .trusted_proxies
        .contains("10.2.3.4".parse().unwrap()));
    assert!(!c.server.listen[1].http2);
    let key = |yaml: &str| parse(yaml).unwrap_err().key;
    assert_eq!(
        key("server:\n  listen: [{addr: \"127.0.0.1:2\", trusted_proxies: [10.0.0.1/8]}]\n"),
        "server.listen[0].trusted_proxies"
    );
    assert_eq!(
        key("server:\n  listen: [{addr: \"127.0.0.1:2\", http2: true}]\n"),
        "server.listen[0]"
    );
    assert_eq!(
        key("server:\n  listen: [{addr: \"127.0.0.1:2\", tsl: {}}]\n"),
        "server.listen[0].tsl"
    );
    assert_eq!(
        key("server:\n  listen: [{addr: \"127.0.0.1:2\", tls: {cert_file: /nope.crt, key_file: /nope.key}}]\n"),
        "server.listen[0].tls.cert_file"
    );
}

#[test]
fn control_plane_section() {
    let c = parse("control_plane:\n  database_url: sqlite://data/aihub.db\n").unwrap();
    let cp = c.control_plane.unwrap();
    assert_eq!(cp.poll_interval, Duration::from_millis(250));
    assert_eq!(cp.push_poll_interval, Duration::from_secs(1));
    assert_eq!(cp.last_used_flush_interval, Duration::from_secs(10));
    assert_eq!((cp.max_connections, cp.redis_url), (2, None));
    assert!(parse("{}").unwrap().control_plane.is_none());

    let e = parse("control_plane:\n  database_url: \"mysql://u:secret@h/db\"\n").unwrap_err();
    assert_eq!(e.key, "control_plane.database_url");
    assert!(!e.to_string().contains("secret"), "{e}");
    let e = parse("control_plane:\n  database_url: sqlite://x.db\n  redis_url: \"http://h\"\n")
        .unwrap_err();
    assert_eq!(e.key, "control_plane.redis_url");
    let e =
        parse("control_plane:\n  database_url: sqlite://x.db\n  poll_interval: 0s\n").unwrap_err();
    assert_eq!(e.key, "control_plane.poll_interval");
    let e = parse("control_plane:\n  database_url: sqlite://x.db\n  poll: 1s\n").unwrap_err();
    assert_eq!(e.key, "control_plane.poll");
    let e = parse("control_plane: {}\n").unwrap_err();
    assert!(e.message.contains("database_url"), "{e}");
}

#[test]
fn database_url_override_creates_or_sets_the_section() {
    let mut c = parse("{}").unwrap();
    c.apply_database_url(Some(String::new()));
    assert!(c.control_plane.is_none());
    c.apply_database_url(Some("postgres://u@h/db".into()));
    assert_eq!(
        c.control_plane.as_ref().unwrap(),
        &ControlPlaneConfig::with_url("postgres://u@h/db".into())
    );
    let mut c =
        parse("control_plane:\n  database_url: sqlite://a.db\n  poll_interval: 1s\n").unwrap();
    c.apply_database_url(Some("sqlite://b.db".into()));
    let cp = c.control_plane.unwrap();
    assert_eq!(
        (cp.database_url.as_str(), cp.poll_interval),
        ("sqlite://b.db", Duration::from_secs(1))
    );
}

#[test]
fn key_ip_allowlists_are_validated() {
    let h = format!("sha256:{}", "ab".repeat(32));
    let ok = format!("keys:\n  - {{id: k, hash: \"{h}\", developer_id: d, ip_allowlist: [\"10.0.0.0/8\", \"::1\"]}}\n");
    let table = parse(&ok).unwrap().keys.table();
    let nets = table
        .records()
        .next()
        .unwrap()
        .ip_allowlist
        .clone()
        .unwrap();
    assert_eq!(nets.nets().len(), 2);
    let bad = format!("keys:\n  - {{id: k, hash: \"{h}\", developer_id: d, ip_allowlist: [\"10.0.0.0/8\", \"10.0.0.0/40\"]}}\n");
    let e = parse(&bad).unwrap_err();
    assert_eq!(e.key, "keys[0].ip_allowlist[1]");
}

#[test]
fn write_timeout_and_account_headers() {
    let c = parse("upstreams:\n  a:\n    endpoints: [http://x]\n").unwrap();
    assert_eq!(c.server.response_write_timeout, Duration::from_secs(60));
    assert!(!c.upstreams["a"].forward_account_headers);
    let c = parse("server:\n  response_write_timeout: 5s\nupstreams:\n  a:\n    endpoints: [http://x]\n    forward_account_headers: true\n").unwrap();
    assert_eq!(c.server.response_write_timeout, Duration::from_secs(5));
    assert!(c.upstreams["a"].forward_account_headers);
    let e = parse("server:\n  response_write_timeout: 0s\n").unwrap_err();
    assert_eq!(e.key, "server.response_write_timeout");
}

#[test]
fn connection_deadlines() {
    let c = parse("upstreams:\n  a:\n    endpoints: [http://x]\n").unwrap();
    assert_eq!(c.server.header_read_timeout, Duration::from_secs(10));
    assert_eq!(c.server.idle_timeout, Duration::from_secs(60));
    let c = parse("server:\n  header_read_timeout: 2s\n  idle_timeout: 5s\nupstreams:\n  a:\n    endpoints: [http://x]\n").unwrap();
    assert_eq!(c.server.header_read_timeout, Duration::from_secs(2));
    assert_eq!(c.server.idle_timeout, Duration::from_secs(5));
    for key in ["header_read_timeout", "idle_timeout"] {
        let e = parse(&format!("server:\n  {key}: 0s\n")).unwrap_err();
        assert_eq!(e.key, format!("server.{key}"));
    }
}

#[test]
fn base_urls() {
    let b = BaseUrl::parse("https://api.openai.com/v1/").unwrap();
    assert_eq!((b.tls, b.port, b.path.as_str()), (true, 443, "/v1"));
    let b = BaseUrl::parse("http://127.0.0.1:9000").unwrap();
    assert_eq!((b.tls, b.port, b.path.as_str()), (false, 9000, ""));
    // A query string (Azure's `api-version`) is kept, sent before the client's.
    let b =
        BaseUrl::parse("https://x.openai.azure.com/openai/deployments/d?api-version=2024-06-01")
            .unwrap();
    assert_eq!(b.path, "/openai/deployments/d");
    assert_eq!(b.query, "api-version=2024-06-01");
    assert!(BaseUrl::parse("ftp://h/v1").is_err());
}

#[test]
fn fixed_headers_are_checked_and_never_credentials() {
    let ok = "upstreams:\n  a:\n    endpoints: [\"http://127.0.0.1:1/v1\"]\n    headers: {anthropic-version: \"2023-06-01\"}\n";
    assert!(parse(ok).is_ok());
    for bad in ["x-api-key: k", "authorization: k", "\"bad header\": v"] {
        let yaml = format!(
            "upstreams:\n  a:\n    endpoints: [\"http://127.0.0.1:1/v1\"]\n    headers: {{{bad}}}\n"
        );
        let e = parse(&yaml).unwrap_err();
        assert!(
            e.key.starts_with("upstreams.a.headers."),
            "{bad}: {}",
            e.key
        );
    }
}

#[test]
fn upstream_paths_and_urls_are_checked() {
    let c = parse("upstreams:\n  a:\n    endpoints: [\"http://127.0.0.1:1/v1\"]\n").unwrap();
    assert_eq!(
        c.upstreams["a"].paths,
        [
            "chat/completions",
            "completions",
            "embeddings",
            "responses",
            "messages"
        ]
    );
    for bad in [
        "/audio/speech",
        "v1/audio",
        "audio//speech",
        "audio/../chat",
        "a b",
        "",
    ] {
        let yaml =
            format!("upstreams:\n  a:\n    endpoints: [\"http://h/v1\"]\n    paths: [\"{bad}\"]\n");
        let e = parse(&yaml).unwrap_err();
        assert_eq!(e.key, "upstreams.a.paths[0]", "{bad}");
    }
    let e = parse("upstreams:\n  a:\n    endpoints: [\"https://user:s3cret@h/v1\"]\n").unwrap_err();
    assert_eq!(e.key, "upstreams.a.endpoints[0]");
    assert!(!e.to_string().contains("s3cret"), "{e}");
}

#[test]
fn checking_keeps_what_it_parsed() {
    let file = Path::new("test.yaml");
    let h = format!("sha256:{}", "ab".repeat(32));
    let yaml = format!(
        "upstreams:\n  a:\n    endpoints: [\"https://h:8443/v1/\"]\n  \
         gone:\n    endpoints: [\"http://x\"]\n    api_key_env: AIHUB_TEST_SURELY_UNSET\n    \
         optional: true\n\
         routes:\n  - {{model: m, upstream: a}}\n  - {{model: n, upstream: gone}}\n\
         keys:\n  - {{id: k1, hash: \"{h}\", developer_id: d, models: [\"gpt-*\"]}}\n"
    );
    let c = Config::parse(&yaml, file).unwrap();
    let checked = c.check(file).unwrap();
    // An optional upstream whose credential is unset is left out once, here.
    assert_eq!(checked.upstreams.keys().collect::<Vec<_>>(), ["a"]);
    let (url, base) = &checked.upstreams["a"].endpoints[0];
    assert_eq!(url, "https://h:8443/v1/");
    assert_eq!(
        (base.tls, base.port, base.path.as_str()),
        (true, 8443, "/v1")
    );
    assert!(checked.upstreams["a"].auth.is_none());
    let hash = aihub_apikey::KeyHash::from_hex(&h).unwrap();
    let key = checked.keys.get(&hash).unwrap();
    assert_eq!(checked.keys.len(), 1);
    assert_eq!((&*key.key_id, &*key.developer_id), ("k1", "d"));
    assert!(key.models.matches("gpt-4o") && !key.models.matches("claude"));
    // The first invalid pattern of a list is named by its index.
    let bad =
        format!("keys:\n  - {{id: k, hash: \"{h}\", developer_id: d, endpoints: [\"*\", \"\"]}}\n");
    let e = parse(&bad).unwrap_err();
    assert_eq!(e.key, "keys[0].endpoints[1]");
}

#[test]
fn admin_url_and_upload_cap() {
    let c = parse("control_plane:\n  database_url: sqlite://x.db\n").unwrap();
    let cp = c.control_plane.unwrap();
    assert_eq!(
        (cp.admin_url, cp.max_upload_bytes),
        (None, 200 * 1024 * 1024)
    );
    let yaml = "control_plane:\n  database_url: sqlite://x.db\n  admin_url: \"http://127.0.0.1:8081\"\n  max_upload_bytes: 1000\n";
    let file = Path::new("test.yaml");
    let checked = Config::parse(yaml, file).unwrap().check(file).unwrap();
    let admin = checked.admin_url.unwrap();
    assert_eq!(
        (admin.host.as_str(), admin.port, admin.path.as_str()),
        ("127.0.0.1", 8081, "")
    );
    for bad in ["ftp://h", "http://u:s3cret@h:1", "http://h/?x=1", "nope"] {
        let yaml =
            format!("control_plane:\n  database_url: sqlite://x.db\n  admin_url: \"{bad}\"\n");
        let e = parse(&yaml).unwrap_err();
        assert_eq!(e.key, "control_plane.admin_url", "{bad}");
        assert!(e
            .to_string()
            .starts_with("test.yaml: control_plane.admin_url: "));
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }
    let e = parse("control_plane:\n  database_url: sqlite://x.db\n  max_upload_bytes: 0\n")
        .unwrap_err();
    assert_eq!(e.key, "control_plane.max_upload_bytes");
    // Only the admin settings reload; the rest needs a restart.
    let a = ControlPlaneConfig::with_url("sqlite://a.db".into());
    let b = ControlPlaneConfig {
        admin_url: Some("http://h:1".into()),
        max_upload_bytes: 5,
        ..a.clone()
    };
    assert!(!a.needs_restart_for(&b));
    let c = ControlPlaneConfig::with_url("sqlite://b.db".into());
    assert!(a.needs_restart_for(&c));
}

#[test]
fn batch_discount() {
    let d = |s: &str| s.parse::<rust_decimal::Decimal>().unwrap();
    assert_eq!(parse("{}").unwrap().batches.discount, d("0.5"));
    for (yaml, want) in [
        ("0.25", "0.25"),
        ("\"0.1\"", "0.1"),
        ("0", "0"),
        ("0.999", "0.999"),
    ] {
        let c = parse(&format!("batches:\n  discount: {yaml}\n")).unwrap();
        assert_eq!(c.batches.discount, d(want), "{yaml}");
    }
    for bad in ["1", "1.5", "-0.1"] {
        let e = parse(&format!("batches:\n  discount: {bad}\n")).unwrap_err();
        assert_eq!(e.key, "batches.discount", "{bad}");
    }
    let e = parse("batches:\n  discount: lots\n").unwrap_err();
    assert_eq!(e.key, "batches.discount");
    let e = parse("batches:\n  discout: 0.5\n").unwrap_err();
    assert_eq!(e.key, "batches.discout");
}

#[test]
fn health_checks_dns_tls_and_route_timeouts_are_checked() {
    let up = |extra: &str| {
        format!("upstreams:\n  a:\n    endpoints: [\"http://127.0.0.1:1/v1\"]\n    {extra}\nroutes:\n  - {{model: m, upstream: a}}\n")
    };
    let c = parse(&up(
        "health: {check: {interval: 2s, expect_status: [200, 204]}, slow_start: 0s}",
    ))
    .unwrap();
    let check = c.upstreams["a"].health.check.as_ref().unwrap();
    assert_eq!(check.path, "/models");
    assert_eq!((check.unhealthy, check.healthy), (2, 2));
    assert!(check.passes(204) && !check.passes(201));
    assert!(c.upstreams["a"].health.check.is_some());
    assert_eq!(c.upstreams["a"].dns.refresh, Duration::from_secs(30));
    for (extra, key) in [
        (
            "health: {check: {path: models}}",
            "upstreams.a.health.check.path",
        ),
        (
            "health: {check: {method: PUT}}",
            "upstreams.a.health.check.method",
        ),
        (
            "health: {check: {body: \"{}\"}}",
            "upstreams.a.health.check.body",
        ),
        (
            "health: {check: {interval: 1ms}}",
            "upstreams.a.health.check.interval",
        ),
        (
            "health: {check: {healthy: 0}}",
            "upstreams.a.health.check.healthy",
        ),
        (
            "health: {check: {expect_status: [42]}}",
            "upstreams.a.health.check.expect_status",
        ),
        (
            "tls: {client_key_file: k.pem}",
            "upstreams.a.tls.client_cert_file",
        ),
        (
            "tls: {ca_file: /surely/missing.pem}",
            "upstreams.a.tls.ca_file",
        ),
    ] {
        let e = parse(&up(extra)).unwrap_err();
        assert_eq!(e.key, key, "{extra}: {e}");
    }
    let e = parse("upstreams:\n  a:\n    endpoints: [\"http://127.0.0.1:1/v1\"]\nroutes:\n  - {model: m, upstream: a, timeouts: {idle: 0s}}\n").unwrap_err();
    assert_eq!(e.key, "routes[0].timeouts.idle");
    let c = parse("upstreams:\n  a:\n    endpoints: [\"http://127.0.0.1:1/v1\"]\nroutes:\n  - {model: m, upstream: a, timeouts: {first_byte: 20s, total: 10m}}\n").unwrap();
    assert_eq!(c.routes[0].timeouts.total, Some(Duration::from_secs(600)));
}

#[test]
fn the_routing_guide_example_parses() {
    let doc = include_str!("../../docs/routing.md");
    let yaml = doc
        .split("```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("docs/routing.md has a yaml example");
    // Parsing catches unknown keys and bad values; checking would need the credentials and
    // certificate files it names.
    let c = Config::parse(yaml, Path::new("docs/routing.md")).unwrap();
    assert_eq!(c.routes.len(), 4);
    assert_eq!(c.upstreams["azure"].weights, vec![2, 1]);
}

const H0: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
const H1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const H2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

/// Key sections with one or more mistakes, and what the configuration says about them.
fn key_error_cases() -> Vec<String> {
    let k = |id: &str, hash: &str, extra: &str| {
        format!("- {{id: {id}, hash: \"{hash}\", developer_id: d{extra}}}\n")
    };
    let keys = |entries: &[String]| format!("keys:\n{}", entries.concat());
    vec![
        keys(&[k("a", H0, ""), k("\"\"", H1, "")]),
        keys(&[k("a", H0, ""), k("a", H1, "")]),
        keys(&[k("a", H0, ""), k("b", "sha256:12", "")]),
        keys(&[k("a", H0, ""), k("b", H0, "")]),
        keys(&[k("a", H0, ""), "- {id: b, hash: \"H1\", developer_id: \"\"}\n".replace("H1", H1)]),
        keys(&[k("a", H0, ", models: [ok, \"x*y\"]")]),
        keys(&[k("a", H0, ", endpoints: [\"*\", \"\"]")]),
        keys(&[k("a", H0, ", ip_allowlist: [\"10.0.0.0/8\", nope]")]),
        keys(&[k("a", H0, ", rate_limit_rpm: 0")]),
        keys(&[k("a", H0, ", rate_limit_tpm: 0")]),
        keys(&[k("a", H0, ""), k("b", H1, ", colour: red")]),
        keys(&[k("a", H0, ", rate_limit_rpm: lots")]),
        keys(&[k("a", H0, ""), "- {id: b, developer_id: d}\n".into()]),
        keys(&[k("a", H0, ", models: [x")]),
        // Precedence within and between keys.
        keys(&[k("a", H0, ""), k("b", "nope", ""), k("a", H2, "")]),
        keys(&[k("a", H0, ""), k("a", "nope", "")]),
        keys(&[k("a", H0, ""), k("b", H0, ", rate_limit_rpm: 0")]),
        keys(&[k("a", H0, ", models: [\"*x\"]"), k("a", H1, "")]),
        keys(&[k("a", H0, ""), k("b", H1, ""), k("c", H0, ""), k("b", H2, "")]),
        // Plans.
        format!("limits: {{}}\n{}", keys(&[k("a", H0, ""), k("b", H1, ", plan: pro"), k("c", H2, ", plan: nope")])),
        keys(&[k("a", H0, ""), k("b", H1, ", plan: pro")]),
        // Other sections' errors come first (checks), or in document order (parsing).
        format!("server:\n  listen: [nope]\n{}", keys(&[k("a", "x", "")])),
        format!("{}routes: 5\n", keys(&[k("a", H0, ""), k("b", "x", "")])),
        format!("{}routes: 5\n", keys(&[k("a", H0, ", colour: red")])),
        format!("colour: 5\n{}", keys(&[k("a", H0, ", colour: red")])),
        format!("keys:\n  - id: a\n    hash: \"{H0}\"\n    developer_id: d\n    models:\n      - \"x*y\"\n"),
    ]
}

/// What the gateway said about each of [`key_error_cases`] before keys were streamed (taken from
/// the whole-document parser and the previous checks): the same key and message, line numbers
/// included.
const KEY_ERRORS: &[(&str, &str)] = &[
    ("keys[1].id", "`` is empty or repeated"),
    ("keys[1].id", "`a` is empty or repeated"),
    ("keys[1].hash", "expected `sha256:` and 64 hex digits"),
    ("keys[1].hash", "the same key is listed twice"),
    ("keys[1].developer_id", "empty"),
    ("keys[0].models[1]", "`x*y`: `*` is only allowed at the end"),
    ("keys[0].endpoints[1]", "empty pattern"),
    ("keys[0].ip_allowlist[1]", "`nope`: expected an IP address or a CIDR network (e.g. 10.0.0.0/8)"),
    ("keys[0].rate_limit_rpm", "must be at least 1 (leave it out for no limit)"),
    ("keys[0].rate_limit_tpm", "must be at least 1 (leave it out for no limit)"),
    ("keys[1].colour", "unknown field `colour`, expected one of `id`, `hash`, `developer_id`, `name`, `models`, `endpoints`, `expires_at`, `active`, `ip_allowlist`, `plan`, `rate_limit_rpm`, `rate_limit_tpm` at line 3 column 109"),
    ("keys[0].rate_limit_rpm", "invalid type: string \"lots\", expected u32 at line 2 column 125"),
    ("keys[1]", "missing field `hash` at line 3 column 3"),
    ("keys[0].models", "did not find expected ',' or ']' at line 2 column 119, while parsing a flow sequence at line 2 column 117"),
    ("keys[1].hash", "expected `sha256:` and 64 hex digits"),
    ("keys[1].id", "`a` is empty or repeated"),
    ("keys[1].hash", "the same key is listed twice"),
    ("keys[0].models[0]", "`*x`: `*` is only allowed at the end"),
    ("keys[2].hash", "the same key is listed twice"),
    ("keys[2].plan", "no plan named `nope` in the plans file"),
    ("keys[1].plan", "plans apply only with a `limits:` section"),
    ("server.listen[0]", "`nope`: invalid socket address syntax"),
    ("routes", "invalid type: integer `5`, expected a sequence at line 4 column 9"),
    ("keys[0].colour", "unknown field `colour`, expected one of `id`, `hash`, `developer_id`, `name`, `models`, `endpoints`, `expires_at`, `active`, `ip_allowlist`, `plan`, `rate_limit_rpm`, `rate_limit_tpm` at line 2 column 109"),
    ("colour", "unknown field `colour`, expected one of `server`, `upstreams`, `routes`, `keys`, `metering`, `pricing`, `control_plane`, `limits`, `batches`"),
    ("keys[0].models[0]", "`x*y`: `*` is only allowed at the end"),
];

/// Parses and checks `yaml` read whole (serde_norway over the whole text; the `keys:` list
/// deserialized in place) instead of streamed.
fn parse_whole(yaml: &str) -> Result<Config, ConfigError> {
    let file = Path::new("test.yaml");
    let c: Config = aihub_yamlconf::parse(yaml, file)?;
    c.check(file)?;
    Ok(c)
}

#[test]
fn key_errors_are_those_of_before_streamed_or_not() {
    let cases = key_error_cases();
    assert_eq!(cases.len(), KEY_ERRORS.len());
    for (doc, (key, message)) in cases.iter().zip(KEY_ERRORS) {
        for e in [parse(doc).unwrap_err(), parse_whole(doc).unwrap_err()] {
            assert_eq!(
                (e.key.as_str(), e.message.as_str()),
                (*key, *message),
                "{doc}"
            );
            assert_eq!(e.file, Path::new("test.yaml"));
        }
    }
}

#[test]
fn streamed_keys_are_the_keys() {
    // Several parser batches, block and flow entries, defaults, comments, an anchor.
    let mut yaml = String::from(
        "server:\n  listen: [\"127.0.0.1:1\"]\nlimits: {}\nkeys:\n  # declared keys\n  - id: first\n    hash: \"sha256:H\"\n    developer_id: dev_a\n    models: &m [\"gpt-4o*\", demo]\n    plan: pro\n    ip_allowlist: [10.0.0.0/8]\n    expires_at: 2030-01-01T00:00:00Z\n    rate_limit_rpm: 60\n",
    )
    .replace("H", &aihub_apikey::KeyHash::of("first").to_hex());
    for i in 0..3000 {
        let h = aihub_apikey::KeyHash::of(&i.to_string()).to_hex();
        yaml.push_str(&format!(
            "  - {{id: key_{i}, hash: \"{h}\", developer_id: dev_{}, models: *m, active: {}}}\n",
            i / 3,
            i % 2 == 0
        ));
    }
    yaml.push_str("routes: []\n");
    let streamed = parse(&yaml).unwrap();
    let whole = parse_whole(&yaml).unwrap();
    assert_eq!((streamed.keys.len(), whole.keys.len()), (3001, 3001));
    let (a, b) = (streamed.keys.table(), whole.keys.table());
    assert_eq!((a.len(), b.len()), (3001, 3001));
    for r in a.records() {
        let o = b.get(&r.hash).expect("the same keys");
        assert_eq!(
            (
                &r.key_id,
                &r.developer_id,
                r.active,
                r.expires_at_ms,
                &r.limits
            ),
            (
                &o.key_id,
                &o.developer_id,
                o.active,
                o.expires_at_ms,
                &o.limits
            )
        );
        assert_eq!(
            (&r.models, &r.endpoints, &r.ip_allowlist),
            (&o.models, &o.endpoints, &o.ip_allowlist)
        );
    }
    let first = a.get(&aihub_apikey::KeyHash::of("first")).unwrap();
    assert_eq!(&*first.key_id, "first");
    assert!(first.models.matches("gpt-4o-mini") && first.endpoints.matches("anything"));
    assert_eq!(first.limits.plan.as_deref(), Some("pro"));
    assert_eq!(first.limits.key_rpm, Some(60));
    assert!(first.allows_ip(Some("10.1.1.1".parse().unwrap())));
    assert_eq!(
        first.expires_at_ms.map(|e| e.get()),
        Some(1_893_456_000_000)
    );
    let k = a.get(&aihub_apikey::KeyHash::of("1500")).unwrap();
    assert_eq!(
        (&*k.key_id, &*k.developer_id, k.active),
        ("key_1500", "dev_500", true)
    );
    assert!(k.models.matches("demo") && k.limits.plan.is_none());
    // Equal developer ids and lists are shared, not copied.
    let k2 = a.get(&aihub_apikey::KeyHash::of("1501")).unwrap();
    assert!(Arc::ptr_eq(&k.developer_id, &k2.developer_id));
    assert!(Arc::ptr_eq(&k.limits, &k2.limits));
    // `Checked` shares the table; nothing is copied.
    let checked = streamed.check(Path::new("test.yaml")).unwrap();
    assert!(Arc::ptr_eq(&checked.keys, &a));
}

#[test]
fn reloads_reuse_the_records_of_unchanged_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gateway.yaml");
    let entry = |i: usize, dev: &str| {
        let h = aihub_apikey::KeyHash::of(&i.to_string()).to_hex();
        format!("- {{id: key_{i}, hash: \"{h}\", developer_id: {dev}, models: [m]}}\n")
    };
    let write = |last_dev: &str| {
        let keys: String = (0..100)
            .map(|i| entry(i, if i == 99 { last_dev } else { "d" }))
            .collect();
        std::fs::write(&path, format!("keys:\n{keys}")).unwrap();
    };
    let get = |t: &KeyTable, i: usize| {
        Arc::clone(t.get(&aihub_apikey::KeyHash::of(&i.to_string())).unwrap())
    };
    write("d");
    let (_, first) = Config::load_checked(&path).unwrap();
    write("e");
    let reload = || Config::load_checked_reusing(&path, Some(Arc::clone(&first.keys)));
    let (_, second) = reload().unwrap();
    // Unchanged keys: the same records (and developer ids); the changed one is new.
    assert!(Arc::ptr_eq(&get(&first.keys, 5), &get(&second.keys, 5)));
    assert!(!Arc::ptr_eq(&get(&first.keys, 99), &get(&second.keys, 99)));
    assert_eq!(&*get(&second.keys, 99).developer_id, "e");
    // A failed reload changes nothing; a load without the served table builds every record.
    std::fs::write(&path, "keys:\n- {id: x}\n").unwrap();
    assert!(reload().is_err());
    write("e");
    let (_, fresh) = Config::load_checked(&path).unwrap();
    assert!(!Arc::ptr_eq(&get(&first.keys, 7), &get(&fresh.keys, 7)));
}
