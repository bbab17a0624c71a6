//! Developer accounts over real HTTP, on SQLite and PostgreSQL: registration, verification,
//! login and logout, password reset, enumeration resistance, throttling, validation errors.

mod common;

use aihub_store::testing::BACKENDS;
use common::{error_of, TestApi, PASSWORD};
use serde_json::json;

#[tokio::test]
async fn account_lifecycle() {
    for backend in BACKENDS {
        let api = TestApi::start(backend).await;
        let email = "ada@example.com";
        let (s, b) = api
            .call(
                "POST",
                "/developer/register",
                None,
                Some(json!({"email": "Ada@Example.com", "password": PASSWORD,
                            "full_name": "Ada Lovelace", "company_name": "Engines Ltd",
                            "developer_type": "enterprise"})),
            )
            .await;
        assert_eq!(s, 202, "{b}");
        let verify_token = api.mail_token(email, "Verify").await;

        // Unverified accounts may sign in but not create keys.
        let token = api.login(email, PASSWORD).await;
        let (s, me) = api.call("GET", "/developer/me", Some(&token), None).await;
        assert_eq!(s, 200);
        assert_eq!(me["email"], email);
        assert_eq!(me["email_verified"], false);
        assert_eq!(me["developer_type"], "enterprise");
        let (s, b) = api
            .call(
                "POST",
                "/developer/keys",
                Some(&token),
                Some(json!({"name": "k"})),
            )
            .await;
        assert_eq!((s, error_of(&b).1.as_str()), (403, "email_not_verified"));

        // The link in the mail works once.
        let (s, _) = api
            .call(
                "GET",
                &format!("/developer/verify-email?token={verify_token}"),
                None,
                None,
            )
            .await;
        assert_eq!(s, 200);
        let (s, b) = api
            .call(
                "POST",
                "/developer/verify-email",
                None,
                Some(json!({"token": verify_token})),
            )
            .await;
        assert_eq!(s, 422);
        assert_eq!(b["error"]["param"], "token");
        let (_, me) = api.call("GET", "/developer/me", Some(&token), None).await;
        assert_eq!(me["email_verified"], true);

        let (s, me) = api
            .call(
                "PUT",
                "/developer/me",
                Some(&token),
                Some(json!({"full_name": "Ada King", "company_name": null})),
            )
            .await;
        assert_eq!(s, 200);
        assert_eq!(
            (me["full_name"].as_str(), me["company_name"].is_null()),
            (Some("Ada King"), true)
        );

        let (s, b) = api
            .call(
                "POST",
                "/developer/keys",
                Some(&token),
                Some(json!({"name": "first"})),
            )
            .await;
        assert_eq!(s, 201, "{b}");
        assert!(b["key"].as_str().unwrap().starts_with("ahub_dev_"));

        // Logout ends the token at once.
        let (s, _) = api
            .call("POST", "/developer/logout", Some(&token), None)
            .await;
        assert_eq!(s, 204);
        let (s, b) = api.call("GET", "/developer/me", Some(&token), None).await;
        assert_eq!((s, error_of(&b).1.as_str()), (401, "invalid_token"));
        let (s, b) = api.call("GET", "/developer/me", None, None).await;
        assert_eq!((s, error_of(&b).1.as_str()), (401, "missing_token"));
        let (s, _) = api
            .call("GET", "/developer/me", Some("not.a.jwt"), None)
            .await;
        assert_eq!(s, 401);
    }
}

#[tokio::test]
async fn password_reset_and_change() {
    for backend in BACKENDS {
        let api = TestApi::start_with(backend, |c| {
            c.auth.login_attempts_per_account_per_minute = 20
        })
        .await;
        let email = "grace@example.com";
        let old_session = api.signed_up(email).await;
        let (s, _) = api
            .call(
                "POST",
                "/developer/reset-password",
                None,
                Some(json!({"email": email})),
            )
            .await;
        assert_eq!(s, 202);
        let token = api.mail_token(email, "Reset").await;
        let (s, b) = api
            .call(
                "POST",
                "/developer/reset-password/confirm",
                None,
                Some(json!({"token": token, "new_password": "short"})),
            )
            .await;
        assert_eq!(
            (s, b["error"]["param"].as_str()),
            (422, Some("new_password"))
        );
        let new_password = "a much better passphrase";
        let (s, _) = api
            .call(
                "POST",
                "/developer/reset-password/confirm",
                None,
                Some(json!({"token": token, "new_password": new_password})),
            )
            .await;
        assert_eq!(s, 200);
        // Single use; old sessions and the old password stop working.
        let (s, _) = api
            .call(
                "POST",
                "/developer/reset-password/confirm",
                None,
                Some(json!({"token": token, "new_password": new_password})),
            )
            .await;
        assert_eq!(s, 422);
        let (s, _) = api
            .call("GET", "/developer/me", Some(&old_session), None)
            .await;
        assert_eq!(s, 401);
        let (s, _) = api
            .call(
                "POST",
                "/developer/login",
                None,
                Some(json!({"email": email, "password": PASSWORD})),
            )
            .await;
        assert_eq!(s, 401);
        let session = api.login(email, new_password).await;

        // Changing the password needs the current one.
        let (s, _) = api
            .call(
                "PUT",
                "/developer/me/password",
                Some(&session),
                Some(json!({"current_password": "wrong wrong wrong", "new_password": PASSWORD})),
            )
            .await;
        assert_eq!(s, 401);
        let (s, _) = api
            .call(
                "PUT",
                "/developer/me/password",
                Some(&session),
                Some(json!({"current_password": new_password, "new_password": PASSWORD})),
            )
            .await;
        assert_eq!(s, 204);
        api.login(email, PASSWORD).await;
    }
}

#[tokio::test]
async fn no_account_enumeration() {
    for backend in BACKENDS {
        let api = TestApi::start(backend).await;
        let email = "known@example.com";
        api.signed_up(email).await;
        let register = |e: &str| json!({"email": e, "password": PASSWORD, "full_name": "Someone"});
        let known = api
            .call("POST", "/developer/register", None, Some(register(email)))
            .await;
        let fresh = api
            .call(
                "POST",
                "/developer/register",
                None,
                Some(register("fresh@example.com")),
            )
            .await;
        assert_eq!(known, fresh, "registration answers differ");
        // The existing owner is told by mail instead.
        for _ in 0..100 {
            if api.find_mail(email, "Your AI Hub account").is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(api.find_mail(email, "Your AI Hub account").is_some());

        let login = |e: &str, p: &str| json!({"email": e, "password": p});
        let wrong_pw = api
            .call(
                "POST",
                "/developer/login",
                None,
                Some(login(email, "not the password")),
            )
            .await;
        let unknown = api
            .call(
                "POST",
                "/developer/login",
                None,
                Some(login("nobody@example.com", PASSWORD)),
            )
            .await;
        assert_eq!(wrong_pw, unknown);
        assert_eq!(wrong_pw.0, 401);
        assert_eq!(error_of(&wrong_pw.1).1, "invalid_credentials");

        let reset_known = api
            .call(
                "POST",
                "/developer/reset-password",
                None,
                Some(json!({"email": email})),
            )
            .await;
        let reset_unknown = api
            .call(
                "POST",
                "/developer/reset-password",
                None,
                Some(json!({"email": "nobody@example.com"})),
            )
            .await;
        assert_eq!(reset_known, reset_unknown);
        assert_eq!(reset_known.0, 202);
        let resend_known = api
            .call(
                "POST",
                "/developer/verify-email/resend",
                None,
                Some(json!({"email": email})),
            )
            .await;
        let resend_unknown = api
            .call(
                "POST",
                "/developer/verify-email/resend",
                None,
                Some(json!({"email": "x@example.com"})),
            )
            .await;
        assert_eq!(resend_known, resend_unknown);
    }
}

#[tokio::test]
async fn login_is_throttled_per_account_and_ip() {
    for backend in BACKENDS {
        let api = TestApi::start_with(backend, |c| {
            c.auth.login_attempts_per_account_per_minute = 3;
            c.auth.attempts_per_ip_per_minute = 8;
        })
        .await;
        let email = "target@example.com";
        api.signed_up(email).await; // one login attempt used
        let attempt = |e: &str| json!({"email": e, "password": "guess guess guess"});
        for _ in 0..2 {
            let (s, _) = api
                .call("POST", "/developer/login", None, Some(attempt(email)))
                .await;
            assert_eq!(s, 401);
        }
        let resp = api
            .http
            .post(api.url("/developer/login"))
            .json(&attempt(email))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 429);
        let retry: u64 = resp.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry), "Retry-After {retry}");
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(error_of(&body).1, "rate_limit_exceeded");
        // Even the right password is refused while throttled.
        let (s, _) = api
            .call(
                "POST",
                "/developer/login",
                None,
                Some(json!({"email": email, "password": PASSWORD})),
            )
            .await;
        assert_eq!(s, 429);

        // Other accounts are unaffected until the IP's own budget (8 a minute) runs out:
        // register(1) + login(1) + 2 + 1 + 1 = 6 used so far.
        let (s, _) = api
            .call(
                "POST",
                "/developer/login",
                None,
                Some(attempt("a@example.com")),
            )
            .await;
        assert_eq!(s, 401);
        let (s, _) = api
            .call(
                "POST",
                "/developer/login",
                None,
                Some(attempt("b@example.com")),
            )
            .await;
        assert_eq!(s, 401);
        let (s, _) = api
            .call(
                "POST",
                "/developer/login",
                None,
                Some(attempt("c@example.com")),
            )
            .await;
        assert_eq!(s, 429);
    }
}

#[tokio::test]
async fn validation_errors_name_the_fields() {
    for backend in BACKENDS {
        let api = TestApi::start(backend).await;
        let (s, b) = api
            .call(
                "POST",
                "/developer/register",
                None,
                Some(
                    json!({"email": "not-an-email", "password": "short", "full_name": "",
                            "developer_type": "robot"}),
                ),
            )
            .await;
        assert_eq!(s, 422);
        assert_eq!(
            error_of(&b),
            ("invalid_request_error".into(), "validation_failed".into())
        );
        let fields: Vec<&str> = b["error"]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["field"].as_str().unwrap())
            .collect();
        assert_eq!(fields, ["email", "password", "full_name", "developer_type"]);

        // Missing field, unknown field, wrong type: 422 naming it.
        let (s, b) = api
            .call(
                "POST",
                "/developer/register",
                None,
                Some(json!({"email": "a@b.co", "password": PASSWORD})),
            )
            .await;
        assert_eq!(s, 422);
        assert!(
            b["error"]["message"]
                .as_str()
                .unwrap()
                .contains("full_name"),
            "{b}"
        );
        let (s, b) = api
            .call(
                "POST",
                "/developer/login",
                None,
                Some(json!({"email": "a@b.co", "password": "x", "otp": 1})),
            )
            .await;
        assert_eq!(s, 422);
        assert!(
            b["error"]["message"].as_str().unwrap().contains("otp"),
            "{b}"
        );
        let (s, _) = api
            .call(
                "POST",
                "/developer/login",
                None,
                Some(json!({"email": 5, "password": "x"})),
            )
            .await;
        assert_eq!(s, 422);

        // A NUL character in a string: 422, not a database error.
        let (s, b) = api
            .call(
                "POST",
                "/developer/login",
                None,
                Some(json!({"email": "a\u{0}@b.co", "password": "x"})),
            )
            .await;
        assert_eq!(
            (s, b["error"]["param"].as_str()),
            (422, Some("body")),
            "{b}"
        );
        // Bad query parameters: 422 in the same shape; a wrong method: 405 in the same shape.
        let (s, b) = api.call("GET", "/developer/verify-email", None, None).await;
        assert_eq!(
            (s, b["error"]["param"].as_str()),
            (422, Some("query")),
            "{b}"
        );
        let (s, b) = api.call("DELETE", "/developer/login", None, None).await;
        assert_eq!((s, error_of(&b).1.as_str()), (405, "method_not_allowed"));

        // Malformed JSON and a missing content type: 400.
        let resp = api
            .http
            .post(api.url("/developer/login"))
            .header("content-type", "application/json")
            .body("{\"email\": ")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400);
        let b: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(error_of(&b).1, "invalid_json");
        let resp = api
            .http
            .post(api.url("/developer/login"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400);

        // Unknown paths: JSON 404; every response has a request id.
        let resp = api
            .http
            .get(api.url("/developer/nope"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 404);
        assert!(resp.headers().contains_key("x-request-id"));
        let b: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(error_of(&b).1, "unknown_url");
    }
}

/// Someone registers the operator's address before the operator account is bootstrapped: the
/// bootstrap takes the account over on the configured terms, and the squatter's password and
/// sessions stop working.
#[tokio::test]
async fn bootstrap_takes_over_a_squatted_operator_address() {
    for backend in BACKENDS {
        let api = TestApi::start(backend).await;
        let squatter = "squat-ops@aihub.test";
        let (s, _) = api
            .call(
                "POST",
                "/developer/register",
                None,
                Some(json!({"email": squatter, "password": "the squatters password", "full_name": "X"})),
            )
            .await;
        assert_eq!(s, 202);
        let squatter_session = api.login(squatter, "the squatters password").await;

        // A second admin node starts with that address as its operator.
        std::env::set_var("AIHUB_TEST_OPS2_PASSWORD", "the operators real password");
        let mut config = aihub_admin::AdminConfig::default();
        config.database.url = api.db.url.clone();
        config.email.transport = aihub_admin::config::EmailTransport::File {
            dir: api.mail_dir.clone(),
        };
        config.auth.argon2_memory_kib = 8192;
        config.auth.argon2_iterations = 1;
        config.bootstrap_admin = Some(aihub_admin::config::BootstrapAdmin {
            email: squatter.into(),
            password_env: "AIHUB_TEST_OPS2_PASSWORD".into(),
        });
        let _second = aihub_admin::AppState::new(config).await.unwrap();

        let (s, _) = api
            .call("GET", "/developer/me", Some(&squatter_session), None)
            .await;
        assert_eq!(s, 401, "the squatter's session survived");
        let (s, _) = api
            .call(
                "POST",
                "/developer/login",
                None,
                Some(json!({"email": squatter, "password": "the squatters password"})),
            )
            .await;
        assert_eq!(s, 401, "the squatter's password still works");
        let op = api.login(squatter, "the operators real password").await;
        let (_, me) = api.call("GET", "/developer/me", Some(&op), None).await;
        assert_eq!(
            (me["role"].as_str(), me["email_verified"].as_bool()),
            (Some("admin"), Some(true))
        );
    }
}

#[tokio::test]
async fn reset_confirmation_checks_the_token_first_and_is_throttled() {
    let api = TestApi::start_with(aihub_store::testing::Backend::Sqlite, |c| {
        c.auth.attempts_per_ip_per_minute = 5;
    })
    .await;
    let bogus = json!({"token": "not-a-token", "new_password": "a fine new passphrase"});
    for _ in 0..5 {
        let (s, b) = api
            .call(
                "POST",
                "/developer/reset-password/confirm",
                None,
                Some(bogus.clone()),
            )
            .await;
        assert_eq!((s, b["error"]["param"].as_str()), (422, Some("token")));
    }
    let (s, _) = api
        .call(
            "POST",
            "/developer/reset-password/confirm",
            None,
            Some(bogus),
        )
        .await;
    assert_eq!(s, 429);
}
