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
    assert_eq!(c.server.listen, vec!["127.0.0.1:8080"]);
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
    assert_eq!(parse(&ok).unwrap().keys[0].ip_allowlist.len(), 2);
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
    let (hash, key) = &checked.keys[0];
    assert_eq!(*hash, aihub_apikey::KeyHash::from_hex(&h).unwrap());
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
