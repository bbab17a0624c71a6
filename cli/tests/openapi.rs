//! The gateway's OpenAPI document (`docs/gateway-openapi.json`, written by hand, shown in the
//! portal) checked against the real gateway, so the two cannot drift: every documented
//! operation answers its documented example with 200, every status it answers in the cases
//! below is documented, and every path the gateway serves by default is documented.

mod common;

use common::*;
use serde_json::Value;

fn document() -> Value {
    let text = std::fs::read_to_string(repo_root().join("docs/gateway-openapi.json")).unwrap();
    serde_json::from_str(&text).expect("the OpenAPI document is JSON")
}

#[tokio::test]
async fn every_documented_operation_behaves_as_documented() {
    let doc = document();
    let mock = Mock::start(&[]);
    let k = key("k", &[]);
    let models = [
        "gpt-4o-mini",
        "text-embedding-3-small",
        "claude-3.5-sonnet",
        "demo",
    ];
    let routes: Vec<(&str, &str, Option<&str>)> = models.iter().map(|m| (*m, "m", None)).collect();
    let gw = Gateway::start(
        &config(&[upstream("m", &[mock.base_url()], &[])], &routes, &[&k]),
        &[],
    );
    let client = client();
    let mut checked = 0;
    for (path, operations) in doc["paths"].as_object().unwrap() {
        for (method, op) in operations.as_object().unwrap() {
            let documented = |status: u16| op["responses"].get(status.to_string()).is_some();
            let url = gw.url(&path.replace("{model}", "demo"));
            let request = |key: Option<&str>, body: Option<&Value>| {
                let mut r = match method.as_str() {
                    "get" => client.get(&url),
                    "post" => client.post(&url),
                    m => panic!("{m} {path}: a method the gateway does not serve"),
                };
                if let Some(key) = key {
                    r = r.bearer_auth(key);
                }
                if let Some(body) = body {
                    r = r.json(body);
                }
                r
            };
            let example = op.pointer("/requestBody/content/application~1json/example");
            if method == "post" {
                assert!(example.is_some(), "{method} {path}: no example body");
            }
            // The documented example answers 200.
            let resp = request(Some(&k.key), example).send().await.unwrap();
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap();
            assert_eq!(status, 200, "{method} {path}: {text}");
            assert!(documented(200), "{method} {path}: 200 not documented");
            // Without a key: a documented 401.
            let status = request(None, example)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16();
            assert!(
                status == 401 && documented(401),
                "{method} {path}: {status}"
            );
            if let Some(example) = example {
                // An unknown model: a documented 404; a body that is not JSON: a documented 400.
                let mut unknown = example.clone();
                unknown["model"] = "no-such-model".into();
                let status = request(Some(&k.key), Some(&unknown))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16();
                assert!(
                    status == 404 && documented(404),
                    "{method} {path}: {status}"
                );
                let status = client
                    .post(&url)
                    .bearer_auth(&k.key)
                    .body("{not json")
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16();
                assert!(
                    status == 400 && documented(400),
                    "{method} {path}: {status}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 7, "{checked} operations");
}

#[test]
fn every_served_path_is_documented() {
    let doc = document();
    for path in aihub_gateway::api::Api::METERED_PATHS {
        assert!(
            doc["paths"][format!("/v1/{path}")]["post"].is_object(),
            "POST /v1/{path} is served but not documented"
        );
    }
    for path in ["/v1/models", "/v1/models/{model}"] {
        assert!(doc["paths"][path]["get"].is_object(), "GET {path}");
    }
}
