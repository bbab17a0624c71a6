//! Criterion benchmarks of the gateway's hot paths live in `benches/benches/`; run them with
//! `cargo bench -p aihub-benches`. This library holds what the load-test drivers in `src/bin/`
//! share: the accounts `controlplane-bench seed` creates and how to sign in as one.

use serde_json::{json, Value};

/// The password of every account `controlplane-bench seed` creates (`bench-N@aihub.test`).
pub const PASSWORD: &str = "bench password 0000";

/// Signs in as seeded account `i` (`POST /developer/login`); returns the access token.
pub async fn login(http: &reqwest::Client, admin: &str, i: usize) -> anyhow::Result<String> {
    let r: Value = http
        .post(format!("{admin}/developer/login"))
        .json(&json!({"email": format!("bench-{i}@aihub.test"), "password": PASSWORD}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let token = r["access_token"].as_str().unwrap_or_default().to_owned();
    anyhow::ensure!(!token.is_empty(), "login of bench-{i} failed: {r}");
    Ok(token)
}
