//! The portal over real HTTP (a real admin API on loopback, SQLite): security headers and
//! cookie attributes, the CSRF guard (missing, wrong, cross-site, bound to the session), the
//! sign-in redirect and its open-redirect guard, keys shown once, the verification link that
//! does not consume its token on GET, validation errors re-rendered in the form, the language
//! switch, the operators' area, logout; the tasks page (list, status filter, the create forms
//! and their errors, cancel, session downloads kept private, live progress over server-sent
//! events). The browser flow end to end is `cli/tests/portal_e2e.rs`.

mod common;

use std::collections::HashMap;

use aihub_store::testing::Backend;
use common::{TestApi, ADMIN_EMAIL, PASSWORD};
use reqwest::header::{HeaderMap, COOKIE, LOCATION, SET_COOKIE};

/// A minimal browser: keeps cookies, follows no redirects.
struct Browser<'a> {
    api: &'a TestApi,
    http: reqwest::Client,
    cookies: HashMap<String, String>,
    /// The raw `Set-Cookie` lines last received, by cookie name.
    set: HashMap<String, String>,
}

struct Page {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Page {
    /// The `csrf` value of the page's first form.
    fn csrf(&self) -> String {
        let at = self
            .body
            .find(r#"name="csrf" value=""#)
            .expect("a form with csrf");
        let rest = &self.body[at + r#"name="csrf" value=""#.len()..];
        rest[..rest.find('"').unwrap()].to_owned()
    }

    fn location(&self) -> &str {
        self.headers.get(LOCATION).unwrap().to_str().unwrap()
    }
}

impl<'a> Browser<'a> {
    fn new(api: &'a TestApi) -> Browser<'a> {
        Browser {
            api,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookies: HashMap::new(),
            set: HashMap::new(),
        }
    }

    async fn send(&mut self, req: reqwest::RequestBuilder) -> Page {
        let cookie: Vec<String> = self
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let resp = req.header(COOKIE, cookie.join("; ")).send().await.unwrap();
        for line in resp.headers().get_all(SET_COOKIE) {
            let line = line.to_str().unwrap().to_owned();
            let (name, value) = line.split(';').next().unwrap().split_once('=').unwrap();
            if line.contains("Max-Age=0") {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.into(), value.into());
            }
            self.set.insert(name.into(), line.clone());
        }
        Page {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: resp.text().await.unwrap(),
        }
    }

    async fn get(&mut self, path: &str) -> Page {
        let req = self.http.get(self.api.url(path));
        self.send(req).await
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let req = self.http.post(self.api.url(path)).form(form);
        self.send(req).await
    }

    /// Logs in through the form; asserts the redirect.
    async fn log_in(&mut self, email: &str, password: &str) {
        let csrf = self.get("/portal/login").await.csrf();
        let p = self
            .post(
                "/portal/login",
                &[("csrf", &csrf), ("email", email), ("password", password)],
            )
            .await;
        assert_eq!(p.status, 303, "{}", p.body);
        assert_eq!(p.location(), "/portal/dashboard");
    }
}

#[tokio::test]
async fn pages_carry_security_headers_and_strict_cookies() {
    let api = TestApi::start(Backend::Sqlite).await;
    let mut b = Browser::new(&api);
    let p = b.get("/portal/login").await;
    assert_eq!(p.status, 200);
    let h = |n: &str| p.headers.get(n).unwrap().to_str().unwrap().to_owned();
    assert!(h("content-security-policy").starts_with("default-src 'none'; script-src 'self'"));
    assert!(!h("content-security-policy").contains("unsafe"));
    assert_eq!(h("x-frame-options"), "DENY");
    assert_eq!(h("cache-control"), "no-store");
    let csrf = &b.set["aihub_csrf"];
    for attr in ["HttpOnly", "SameSite=Lax", "Secure", "Path=/portal"] {
        assert!(csrf.contains(attr), "{csrf} lacks {attr}");
    }
    // No inline script or style anywhere: the CSP would block them.
    assert!(!p.body.contains("<script>") && !p.body.contains("style="));
    let css = b.get("/portal/assets/portal.css").await;
    assert_eq!(css.status, 200);
    assert!(css.headers["cache-control"]
        .to_str()
        .unwrap()
        .contains("immutable"));

    b.log_in(ADMIN_EMAIL, PASSWORD).await;
    let session = &b.set["aihub_session"];
    for attr in ["HttpOnly", "SameSite=Lax", "Secure"] {
        assert!(session.contains(attr), "{session} lacks {attr}");
    }
    assert_eq!(b.get("/portal/dashboard").await.status, 200);
}

#[tokio::test]
async fn state_changes_need_the_sessions_csrf_token() {
    let api = TestApi::start(Backend::Sqlite).await;
    api.signed_up("csrf@example.com").await;
    let mut b = Browser::new(&api);
    let anonymous = b.get("/portal/login").await.csrf();
    let creds = [("email", "csrf@example.com"), ("password", PASSWORD)];

    let missing = b.post("/portal/login", &creds).await;
    assert_eq!(missing.status, 403);
    assert!(missing.body.contains(r#"data-code="csrf_failed""#));
    let wrong = [("csrf", "AAAA"), creds[0], creds[1]];
    assert_eq!(b.post("/portal/login", &wrong).await.status, 403);
    let with_token = [("csrf", anonymous.as_str()), creds[0], creds[1]];
    let cross_site = b
        .http
        .post(api.url("/portal/login"))
        .header("sec-fetch-site", "cross-site")
        .form(&with_token);
    assert_eq!(b.send(cross_site).await.status, 403);
    assert!(!b.cookies.contains_key("aihub_session"));

    b.log_in("csrf@example.com", PASSWORD).await;
    // The token is bound to the session: the one of the signed-out page no longer works.
    let stale = [("csrf", anonymous.as_str()), ("name", "stale")];
    assert_eq!(b.post("/portal/keys", &stale).await.status, 403);
    let fresh = b.get("/portal/keys").await.csrf();
    let created = b
        .post("/portal/keys", &[("csrf", &fresh), ("name", "ok")])
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    // Another visitor's token (another seed) does not work either.
    let mut other = Browser::new(&api);
    let foreign = other.get("/portal/login").await.csrf();
    assert_eq!(
        b.post("/portal/keys", &[("csrf", &foreign), ("name", "x")])
            .await
            .status,
        403
    );
    let token = api.login("csrf@example.com", PASSWORD).await;
    let (_, keys) = api.call("GET", "/developer/keys", Some(&token), None).await;
    assert_eq!(keys["data"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_key_is_shown_once_and_revoked_from_the_page() {
    let api = TestApi::start(Backend::Sqlite).await;
    let token = api.signed_up("keys@example.com").await;
    let mut b = Browser::new(&api);
    b.log_in("keys@example.com", PASSWORD).await;
    let csrf = b.get("/portal/keys").await.csrf();
    let form = [
        ("csrf", csrf.as_str()),
        ("name", "ci key"),
        ("models", "gpt-4o*, demo"),
        ("endpoints", "chat/completions"),
        ("rate_limit_rpm", "120"),
        ("expires_in_days", "30"),
    ];
    let p = b.post("/portal/keys", &form).await;
    assert_eq!(p.status, 201, "{}", p.body);
    let at = p.body.find(r#"id="new-key">"#).unwrap() + r#"id="new-key">"#.len();
    let key = &p.body[at..at + p.body[at..].find('<').unwrap()];
    assert!(key.starts_with("ahub_dev_"), "{key}");
    assert_eq!(p.headers["cache-control"], "no-store");

    let list = b.get("/portal/keys").await;
    assert!(!list.body.contains(key), "the key is rendered again");
    let (_, keys) = api.call("GET", "/developer/keys", Some(&token), None).await;
    let k = &keys["data"][0];
    assert_eq!(
        k["permissions"]["models"],
        serde_json::json!(["gpt-4o*", "demo"])
    );
    assert_eq!(k["rate_limit_rpm"], 120);
    let id = k["id"].as_str().unwrap();
    assert!(list.body.contains(&format!(r#"data-key-id="{id}""#)));

    let bad = b
        .post(
            "/portal/keys",
            &[("csrf", &csrf), ("name", ""), ("rate_limit_rpm", "lots")],
        )
        .await;
    assert_eq!(bad.status, 422);
    assert!(bad.body.contains("must be a whole number"));

    let revoked = b
        .post(&format!("/portal/keys/{id}/revoke"), &[("csrf", &csrf)])
        .await;
    assert_eq!(revoked.status, 303);
    assert_eq!(revoked.location(), "/portal/keys?done=revoked");
    let (_, k) = api
        .call("GET", &format!("/developer/keys/{id}"), Some(&token), None)
        .await;
    assert_eq!(k["status"], "revoked");
    // Someone else's key id is a 404 page, as in the JSON API.
    let again = b
        .post("/portal/keys/key_nope/revoke", &[("csrf", &csrf)])
        .await;
    assert_eq!(again.status, 404);
}

#[tokio::test]
async fn sign_in_redirects_stay_local_and_logout_ends_the_session() {
    let api = TestApi::start(Backend::Sqlite).await;
    api.signed_up("nav@example.com").await;
    let mut b = Browser::new(&api);
    let p = b.get("/portal/usage?period=2026-11").await;
    assert_eq!(p.status, 303);
    assert_eq!(
        p.location(),
        "/portal/login?next=/portal/usage%3Fperiod%3D2026-11"
    );

    let csrf = b.get("/portal/login").await.csrf();
    let creds = [
        ("csrf", csrf.as_str()),
        ("email", "nav@example.com"),
        ("password", PASSWORD),
        ("next", "https://evil.example/"),
    ];
    let p = b.post("/portal/login", &creds).await;
    assert_eq!(p.location(), "/portal/dashboard");
    let wrong = [creds[0], creds[1], ("password", "not the password")];
    let csrf = b.get("/portal/dashboard").await.csrf();
    let wrong = [("csrf", csrf.as_str()), wrong[1], wrong[2]];
    let failed = b.post("/portal/login", &wrong).await;
    assert_eq!(failed.status, 401);
    assert!(failed.body.contains("Incorrect email or password."));

    let session = b.cookies["aihub_session"].clone();
    let out = b.post("/portal/logout", &[("csrf", &csrf)]).await;
    assert_eq!(out.location(), "/portal/login?done=logged_out");
    assert!(!b.cookies.contains_key("aihub_session"));
    // The old cookie is dead server-side too.
    b.cookies.insert("aihub_session".into(), session);
    assert_eq!(b.get("/portal/keys").await.status, 303);
}

#[tokio::test]
async fn the_mail_link_verifies_only_when_the_button_is_pressed() {
    let api = TestApi::start(Backend::Sqlite).await;
    let mut b = Browser::new(&api);
    let csrf = b.get("/portal/register").await.csrf();
    let short = [
        ("csrf", csrf.as_str()),
        ("email", "new@example.com"),
        ("password", "short"),
        ("full_name", "New Dev"),
    ];
    let p = b.post("/portal/register", &short).await;
    assert_eq!(p.status, 422);
    assert!(p.body.contains(r#"id="password-error""#) && p.body.contains("new@example.com"));
    let ok = [short[0], short[1], ("password", PASSWORD), short[3]];
    assert_eq!(b.post("/portal/register", &ok).await.status, 200);

    let mail = api.mail_token("new@example.com", "Verify").await;
    let text = api.find_mail("new@example.com", "Verify").unwrap();
    assert!(text.contains("/portal/verify-email?token="), "{text}");
    // Opening the link (a mail scanner would) shows the form; the token survives.
    let page = b.get(&format!("/portal/verify-email?token={mail}")).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains(&mail));
    let p = b
        .post("/portal/verify-email", &[("csrf", &csrf), ("token", &mail)])
        .await;
    assert_eq!(p.location(), "/portal/login?done=verified");
    let reused = b
        .post("/portal/verify-email", &[("csrf", &csrf), ("token", &mail)])
        .await;
    assert_eq!(reused.status, 422);
    assert!(reused.body.contains(r#"id="token-error""#));
}

#[tokio::test]
async fn language_switch_and_operator_area() {
    let api = TestApi::start(Backend::Sqlite).await;
    api.signed_up("dev@example.com").await;
    let mut b = Browser::new(&api);
    let p = b.get("/portal/lang?to=zh&next=/portal/login").await;
    assert_eq!(p.location(), "/portal/login");
    assert!(b.get("/portal/login").await.body.contains("登录 AI Hub"));
    let away = b.get("/portal/lang?to=en&next=//evil.example").await;
    assert_eq!(away.location(), "/portal/dashboard");
    let req = b
        .http
        .get(api.url("/portal/register"))
        .header("accept-language", "zh-CN,zh;q=0.9");
    let mut fresh = Browser::new(&api);
    assert!(fresh.send(req).await.body.contains("创建开发者账户"));

    b.log_in("dev@example.com", PASSWORD).await;
    assert_eq!(b.get("/portal/admin").await.status, 403);
    let mut op = Browser::new(&api);
    op.log_in(ADMIN_EMAIL, PASSWORD).await;
    let list = op.get("/portal/admin/developers?q=dev%40example").await;
    assert_eq!(list.status, 200);
    assert!(list.body.contains("dev@example.com"));
    assert_eq!(op.get("/portal/admin/plans").await.status, 200);
    assert_eq!(op.get("/portal/nowhere").await.status, 404);
}

#[tokio::test]
async fn the_account_page_sets_the_spend_cap_and_changes_the_password() {
    let api = TestApi::start(Backend::Sqlite).await;
    let token = api.signed_up("acct@example.com").await;
    let mut b = Browser::new(&api);
    b.log_in("acct@example.com", PASSWORD).await;
    let csrf = b.get("/portal/account").await.csrf();
    let bad = [
        ("csrf", csrf.as_str()),
        ("full_name", "Ada"),
        ("monthly_spend_cap_usd", "lots"),
    ];
    assert_eq!(b.post("/portal/account", &bad).await.status, 422);
    let ok = [bad[0], bad[1], ("monthly_spend_cap_usd", "50")];
    assert_eq!(
        b.post("/portal/account", &ok).await.location(),
        "/portal/account?done=saved"
    );
    let (_, me) = api.call("GET", "/developer/me", Some(&token), None).await;
    assert_eq!(me["monthly_spend_cap_usd"], "50.00");
    assert_eq!(me["full_name"], "Ada");

    let wrong = [
        ("csrf", csrf.as_str()),
        ("current_password", "not it at all"),
        ("new_password", "a brand new passphrase"),
    ];
    assert_eq!(b.post("/portal/account/password", &wrong).await.status, 422);
    let right = [wrong[0], ("current_password", PASSWORD), wrong[2]];
    let p = b.post("/portal/account/password", &right).await;
    assert_eq!(p.location(), "/portal/login?done=reset");
    assert_eq!(b.get("/portal/account").await.status, 303);
    b.log_in("acct@example.com", "a brand new passphrase").await;
}

#[tokio::test]
async fn webhooks_pages_the_secret_once_the_log_and_live_events() {
    let api = TestApi::start_with(Backend::Sqlite, |c| {
        c.webhooks.allow_http = true;
        c.webhooks.allow_networks = vec!["127.0.0.0/8".parse().unwrap()];
        c.webhooks.poll_interval = std::time::Duration::from_millis(20);
    })
    .await;
    let rx = aihub_webhooks::testing::Receiver::start().await;
    let token = api.signed_up("hooks@example.com").await;
    let mut b = Browser::new(&api);
    b.log_in("hooks@example.com", PASSWORD).await;
    let page = b.get("/portal/webhooks").await;
    assert_eq!(page.status, 200);
    let csrf = page.csrf();
    let bad = b
        .post(
            "/portal/webhooks",
            &[("csrf", &csrf), ("url", "ftp://x"), ("event_types", "nope")],
        )
        .await;
    assert_eq!(bad.status, 422);
    assert!(bad.body.contains("is not an event type"), "{}", bad.body);
    let url = rx.url("/portal-hook");
    let p = b
        .post(
            "/portal/webhooks",
            &[
                ("csrf", &csrf),
                ("url", &url),
                ("event_types", "webhook.test, api_key.*"),
            ],
        )
        .await;
    assert_eq!(p.status, 201, "{}", p.body);
    let at = p.body.find(r#"id="new-secret">"#).unwrap() + r#"id="new-secret">"#.len();
    let secret = &p.body[at..at + p.body[at..].find('<').unwrap()];
    assert!(secret.starts_with("whsec_"), "{secret}");
    let list = b.get("/portal/webhooks").await;
    assert!(!list.body.contains(secret), "the secret is rendered again");
    let (_, hooks) = api
        .call("GET", "/developer/webhooks", Some(&token), None)
        .await;
    let id = hooks["data"][0]["id"].as_str().unwrap().to_owned();

    // The events page streams new events: open the stream, then cause one.
    let events = b.get("/portal/events").await;
    assert_eq!(events.status, 200);
    assert!(events.body.contains("data-stream="), "{}", events.body);
    let cookie: Vec<String> = b.cookies.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut stream = reqwest::Client::new()
        .get(api.url("/portal/events/stream?since=0"))
        .header(COOKIE, cookie.join("; "))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert!(stream.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let test = b
        .post(&format!("/portal/webhooks/{id}/test"), &[("csrf", &csrf)])
        .await;
    assert_eq!(test.status, 303);
    let mut got = String::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !got.contains("webhook.test") {
        let chunk = tokio::time::timeout_at(deadline.into(), stream.chunk())
            .await
            .expect("an event within 5 s")
            .unwrap()
            .unwrap();
        got.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(got.contains("event: aihub"), "{got}");
    drop(stream);

    // The delivery log shows the attempt; redelivery sends it again.
    rx.wait_for(1, std::time::Duration::from_secs(5)).await;
    let mut detail = b.get(&format!("/portal/webhooks/{id}")).await;
    for _ in 0..50 {
        if detail.body.contains(r#"data-status="succeeded""#) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        detail = b.get(&format!("/portal/webhooks/{id}")).await;
    }
    assert!(
        detail.body.contains(r#"data-status="succeeded""#),
        "{}",
        detail.body
    );
    let at = detail.body.find(r#"data-delivery-id=""#).unwrap() + r#"data-delivery-id=""#.len();
    let did = &detail.body[at..at + detail.body[at..].find('"').unwrap()];
    let r = b
        .post(
            &format!("/portal/deliveries/{did}/redeliver"),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(r.status, 303);
    rx.wait_for(2, std::time::Duration::from_secs(5)).await;

    // Rotate shows the new secret once; delete removes the endpoint.
    let r = b
        .post(&format!("/portal/webhooks/{id}/rotate"), &[("csrf", &csrf)])
        .await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains(r#"id="previous-until""#));
    let d = b
        .post(&format!("/portal/webhooks/{id}/delete"), &[("csrf", &csrf)])
        .await;
    assert_eq!(
        (d.status, d.location()),
        (303, "/portal/webhooks?done=deleted")
    );
    let (_, hooks) = api
        .call("GET", "/developer/webhooks", Some(&token), None)
        .await;
    assert_eq!(hooks["data"], serde_json::json!([]));

    // A usage alert of this month shows as a banner on the dashboard.
    let dash = b.get("/portal/dashboard").await;
    assert!(!dash.body.contains(r#"id="usage-alert""#));
    let store = api.state.store.clone();
    let dev = aihub_store::developers::by_email(&store, "hooks@example.com")
        .await
        .unwrap()
        .unwrap()
        .id;
    aihub_store::usage_alerts::record(
        &store,
        &aihub_store::usage_alerts::UsageAlert {
            developer_id: dev,
            period: aihub_plans::Period::of_unix_ms(aihub_store::now_ms()).to_string(),
            threshold_pct: 100,
            used_tokens: 1_000_200,
            quota_tokens: 1_000_000,
        },
    )
    .await
    .unwrap();
    let dash = b.get("/portal/dashboard").await;
    assert!(dash.body.contains(r#"id="usage-alert""#), "{}", dash.body);
    assert!(dash.body.contains("100 % of this month"), "{}", dash.body);
}

/// An API whose task engine keeps files in a temporary directory and sends items to a port
/// nothing listens on (items of a batch generation retry; nothing reaches a model).
async fn tasks_api(files: &tempfile::TempDir, usage: bool) -> TestApi {
    let dir = files.path().to_owned();
    let tweak = move |c: &mut aihub_admin::AdminConfig| {
        c.tasks.files_dir = dir;
        c.tasks.gateway_url = "http://127.0.0.1:9".into();
    };
    if usage {
        TestApi::start_with_usage(Backend::Sqlite, tweak).await
    } else {
        TestApi::start_with(Backend::Sqlite, tweak).await
    }
}

/// Waits until the JSON API shows task `id` with a status `done` accepts; returns it.
async fn task_until(
    api: &TestApi,
    token: &str,
    id: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    for _ in 0..200 {
        let (s, t) = api
            .call("GET", &format!("/developer/tasks/{id}"), Some(token), None)
            .await;
        assert_eq!(s, 200, "{t}");
        if done(&t) {
            return t;
        }
        last = t;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("task {id} did not get there: {last}");
}

/// The ids of the tasks table's rows, in page order.
fn task_ids(body: &str) -> Vec<String> {
    body.match_indices(r#"data-task-id=""#)
        .map(|(at, m)| {
            let rest = &body[at + m.len()..];
            rest[..rest.find('"').unwrap()].to_owned()
        })
        .collect()
}

/// The HTML of task `id`'s row.
fn task_row<'b>(body: &'b str, id: &str) -> &'b str {
    let at = body
        .find(&format!(r#"data-task-id="{id}""#))
        .unwrap_or_else(|| panic!("no row for {id}"));
    let rest = &body[at..];
    &rest[..rest.find("</tr>").unwrap()]
}

#[tokio::test]
async fn the_tasks_page_lists_queues_and_cancels_tasks() {
    let files = tempfile::tempdir().unwrap();
    let api = tasks_api(&files, false).await;
    let token = api.signed_up("tasks@example.com").await;
    let mut b = Browser::new(&api);
    b.log_in("tasks@example.com", PASSWORD).await;
    let empty = b.get("/portal/tasks").await;
    assert_eq!(empty.status, 200, "{}", empty.body);
    assert!(empty.body.contains(r#"class="on" href="/portal/tasks""#));
    assert!(empty.body.contains(r#"id="no-tasks""#));
    // The forms come with the portal's example model and this month.
    let month = aihub_plans::Period::of_unix_ms(aihub_store::now_ms()).to_string();
    assert!(empty
        .body
        .contains(r#"name="model" required maxlength="200" value="gpt-4o-mini""#));
    assert!(empty.body.contains(&format!(r#"value="{month}""#)));
    assert!(!empty.body.contains("<script>") && !empty.body.contains("style="));
    let csrf = empty.csrf();

    // A task created through the JSON API is listed.
    let (s, t) = api
        .call(
            "POST",
            "/developer/tasks",
            Some(&token),
            Some(serde_json::json!({"type": "usage_export", "period": month})),
        )
        .await;
    assert_eq!(s, 202, "{t}");
    let from_api = t["id"].as_str().unwrap().to_owned();
    let list = b.get("/portal/tasks").await;
    assert_eq!(task_ids(&list.body), vec![from_api.clone()]);
    assert!(task_row(&list.body, &from_api).contains("Usage export"));

    // The export form queues a usage_export task; with no usage database it fails, and the
    // page says why.
    let p = b
        .post(
            "/portal/tasks",
            &[
                ("csrf", &csrf),
                ("type", "usage_export"),
                ("period", &month),
            ],
        )
        .await;
    assert_eq!(
        (p.status, p.location()),
        (303, "/portal/tasks?done=created")
    );
    let done = b.get("/portal/tasks?done=created").await;
    assert!(done.body.contains(r#"class="notice""#));
    let ids = task_ids(&done.body);
    assert_eq!(ids.len(), 2);
    let export = ids[0].clone();
    assert_ne!(export, from_api, "newest first");
    let (_, t) = api
        .call(
            "GET",
            &format!("/developer/tasks/{export}"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(t["type"], "usage_export");
    let failed = task_until(&api, &token, &export, |t| t["status"] == "failed").await;
    assert!(failed["error"]
        .as_str()
        .unwrap()
        .contains("no usage database"));
    task_until(&api, &token, &from_api, |t| t["status"] == "failed").await;
    let page = b.get("/portal/tasks").await;
    let row = task_row(&page.body, &export);
    assert!(row.contains(r#"data-status="failed""#), "{row}");
    assert!(row.contains("no usage database is configured"), "{row}");
    assert!(row.contains(r#"value="100""#), "{row}");
    assert!(
        !row.contains("/cancel"),
        "a finished task has no cancel button: {row}"
    );
    // Nothing is unfinished: the page opens no stream.
    assert!(!page.body.contains("data-stream="));

    // Form errors are shown in the form that was sent, the other keeps its defaults.
    let bad = b
        .post(
            "/portal/tasks",
            &[
                ("csrf", &csrf),
                ("type", "batch_generate"),
                ("model", "gpt-4o-mini"),
                ("prompts", "\n  \n"),
            ],
        )
        .await;
    assert_eq!(bad.status, 422, "{}", bad.body);
    assert!(
        bad.body.contains(r#"id="prompts-error">at least one item"#),
        "{}",
        bad.body
    );
    assert!(bad.body.contains(&format!(r#"value="{month}""#)));
    let bad = b
        .post(
            "/portal/tasks",
            &[
                ("csrf", &csrf),
                ("type", "batch_generate"),
                ("model", "gpt-4o-mini"),
                ("prompts", "hello"),
                ("max_tokens", "lots"),
            ],
        )
        .await;
    assert_eq!(bad.status, 422);
    assert!(bad.body.contains(r#"id="max-tokens-error""#));
    assert!(
        bad.body.contains(">hello</textarea>"),
        "the prompts are kept"
    );
    let bad = b
        .post(
            "/portal/tasks",
            &[
                ("csrf", &csrf),
                ("type", "usage_export"),
                ("period", "2026-13"),
            ],
        )
        .await;
    assert_eq!(bad.status, 422);
    assert!(bad.body.contains(r#"id="period-error""#), "{}", bad.body);
    // A batch generation runs as one of the developer's keys: none yet.
    let no_key = b
        .post(
            "/portal/tasks",
            &[
                ("csrf", &csrf),
                ("type", "batch_generate"),
                ("model", "gpt-4o-mini"),
                ("prompts", "one\ntwo"),
            ],
        )
        .await;
    assert_eq!(no_key.status, 422);
    assert!(no_key
        .body
        .contains(r#"id="key-error">create an API key first"#));
    // No CSRF token, no task.
    let forged = b
        .post(
            "/portal/tasks",
            &[("type", "usage_export"), ("period", &month)],
        )
        .await;
    assert_eq!(forged.status, 403);

    // With a key, the generation is queued with its options; it cannot reach a gateway, so it
    // stays unfinished and the page offers cancel and the live stream.
    let (s, _) = api
        .call(
            "POST",
            "/developer/keys",
            Some(&token),
            Some(serde_json::json!({"name": "tasks"})),
        )
        .await;
    assert_eq!(s, 201);
    let p = b
        .post(
            "/portal/tasks",
            &[
                ("csrf", &csrf),
                ("type", "batch_generate"),
                ("model", "gpt-4o-mini"),
                ("prompts", "one\r\ntwo\r\n\r\nthree"),
                ("max_tokens", "16"),
            ],
        )
        .await;
    assert_eq!(p.status, 303, "{}", p.body);
    let page = b.get("/portal/tasks").await;
    let generate = task_ids(&page.body)[0].clone();
    let t = task_until(&api, &token, &generate, |t| t["counts"]["total"] == 3).await;
    assert_eq!(t["type"], "batch_generate");
    let stored = aihub_store::tasks::get(&api.state.store, None, &generate)
        .await
        .unwrap();
    assert_eq!(
        stored.input["prompts"],
        serde_json::json!(["one", "two", "three"])
    );
    assert_eq!(stored.input["options"]["max_tokens"], 16);
    let page = b.get("/portal/tasks").await;
    let row = task_row(&page.body, &generate);
    assert!(row.contains("Batch generation"), "{row}");
    assert!(
        row.contains(&format!("/portal/tasks/{generate}/cancel")),
        "{row}"
    );
    assert!(page.body.contains(&format!(
        r#"data-stream="/portal/tasks/stream?ids={generate}""#
    )));

    // The status filter is the JSON API's.
    let running = b.get("/portal/tasks?status=running").await;
    assert_eq!(task_ids(&running.body), vec![generate.clone()]);
    assert!(running
        .body
        .contains(r#"<option value="running" selected>"#));
    let failed = b.get("/portal/tasks?status=failed").await;
    assert_eq!(
        task_ids(&failed.body),
        vec![export.clone(), from_api.clone()]
    );
    assert_eq!(b.get("/portal/tasks?status=nope").await.status, 422);

    // Cancel: queued items end now, the task ends cancelled.
    let c = b
        .post(
            &format!("/portal/tasks/{generate}/cancel"),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(
        (c.status, c.location()),
        (303, "/portal/tasks?done=cancelled")
    );
    let t = task_until(&api, &token, &generate, |t| t["status"] == "cancelled").await;
    assert!(t["finished_at"].is_string());
    let page = b.get("/portal/tasks?done=cancelled").await;
    assert!(task_row(&page.body, &generate).contains(r#"data-status="cancelled""#));
    // A finished task cannot be cancelled: the JSON API's 409, as a page.
    let again = b
        .post(
            &format!("/portal/tasks/{generate}/cancel"),
            &[("csrf", &csrf)],
        )
        .await;
    assert_eq!(again.status, 409);
    // A failed export has no result: 404; an unknown task too.
    assert_eq!(
        b.get(&format!("/portal/tasks/{export}/result"))
            .await
            .status,
        404
    );
    assert_eq!(b.get("/portal/tasks/task_nope/result").await.status, 404);
    assert_eq!(
        b.get(&format!("/portal/tasks/{export}/result?file=bogus"))
            .await
            .status,
        422
    );

    // Signed out, the page and the downloads send to the login page.
    let mut anonymous = Browser::new(&api);
    assert_eq!(anonymous.get("/portal/tasks").await.status, 303);
    assert_eq!(
        anonymous
            .get(&format!("/portal/tasks/{export}/result"))
            .await
            .status,
        303
    );
    assert_eq!(anonymous.get("/portal/tasks/stream").await.status, 303);

    // Fifty a page, then older ones.
    for _ in 0..50 {
        let (s, t) = api
            .call(
                "POST",
                "/developer/tasks",
                Some(&token),
                Some(serde_json::json!({"type": "usage_export"})),
            )
            .await;
        assert_eq!(s, 202, "{t}");
    }
    let first = b.get("/portal/tasks").await;
    let newest = task_ids(&first.body);
    assert_eq!(newest.len(), 50);
    let at = first
        .body
        .find(r#"id="older" href=""#)
        .expect("an older page")
        + r#"id="older" href=""#.len();
    let older = first.body[at..at + first.body[at..].find('"').unwrap()].replace("&amp;", "&");
    let second = b.get(&older).await;
    assert_eq!(
        task_ids(&second.body),
        vec![generate.clone(), export.clone(), from_api.clone()]
    );
    assert!(!second.body.contains(r#"id="older""#));
    assert!(second
        .body
        .contains(r#"<a href="/portal/tasks?status=">Newest tasks</a>"#));

    // In Chinese.
    b.get("/portal/lang?to=zh&next=/portal/tasks").await;
    let zh = b.get("/portal/tasks").await;
    assert!(zh.body.contains("任务与批处理") && zh.body.contains("已取消"));
}

#[tokio::test]
async fn task_results_download_with_the_session_and_stay_private() {
    let files = tempfile::tempdir().unwrap();
    let api = tasks_api(&files, true).await;
    let token = api.signed_up("results@example.com").await;
    api.signed_up("other@example.com").await;
    let mut b = Browser::new(&api);
    b.log_in("results@example.com", PASSWORD).await;
    let csrf = b.get("/portal/tasks").await.csrf();
    let month = aihub_plans::Period::of_unix_ms(aihub_store::now_ms()).to_string();
    let p = b
        .post(
            "/portal/tasks",
            &[
                ("csrf", &csrf),
                ("type", "usage_export"),
                ("period", &month),
            ],
        )
        .await;
    assert_eq!(p.status, 303, "{}", p.body);
    let id = task_ids(&b.get("/portal/tasks").await.body)[0].clone();
    let t = task_until(&api, &token, &id, |t| {
        t["status"] != "pending" && t["status"] != "running"
    })
    .await;
    assert_eq!(t["status"], "completed", "{t}");

    let page = b.get("/portal/tasks").await;
    let row = task_row(&page.body, &id);
    assert!(
        row.contains(&format!(r#"href="/portal/tasks/{id}/result""#)),
        "{row}"
    );
    assert!(!row.contains("file=errors"), "{row}");
    let csv = b.get(&format!("/portal/tasks/{id}/result")).await;
    assert_eq!(csv.status, 200, "{}", csv.body);
    assert!(csv.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    assert!(csv.headers["content-disposition"]
        .to_str()
        .unwrap()
        .starts_with("attachment"));
    assert!(
        csv.body.starts_with("request_id,timestamp,"),
        "{}",
        csv.body
    );
    // An export has no error file.
    assert_eq!(
        b.get(&format!("/portal/tasks/{id}/result?file=errors"))
            .await
            .status,
        404
    );

    // Another developer gets 404 for this task: its result, cancel, and its stream.
    let mut other = Browser::new(&api);
    other.log_in("other@example.com", PASSWORD).await;
    let other_page = other.get("/portal/tasks").await;
    assert!(task_ids(&other_page.body).is_empty());
    let other_csrf = other_page.csrf();
    assert_eq!(
        other
            .get(&format!("/portal/tasks/{id}/result"))
            .await
            .status,
        404
    );
    assert_eq!(
        other
            .post(
                &format!("/portal/tasks/{id}/cancel"),
                &[("csrf", &other_csrf)]
            )
            .await
            .status,
        404
    );
    // Their stream, asked to follow it, says nothing about it.
    let cookie: Vec<String> = other
        .cookies
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let mut stream = reqwest::Client::new()
        .get(api.url(&format!("/portal/tasks/stream?ids={id}")))
        .header(COOKIE, cookie.join("; "))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let quiet = tokio::time::timeout(std::time::Duration::from_millis(2500), async {
        let mut got = String::new();
        while let Some(chunk) = stream.chunk().await.unwrap() {
            got.push_str(&String::from_utf8_lossy(&chunk));
            if got.contains(&id) {
                return got;
            }
        }
        got
    })
    .await;
    assert!(
        quiet.is_err(),
        "another developer's task was streamed: {quiet:?}"
    );
}

/// Reads server-sent events from `stream` until one's data contains every string of `want`;
/// returns that event's data as JSON.
async fn task_event(
    stream: &mut reqwest::Response,
    buf: &mut String,
    want: &[&str],
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            if !event.contains("event: task") {
                continue;
            }
            let data = event
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .expect("an event with data");
            if want.iter().all(|w| data.contains(w)) {
                return serde_json::from_str(data).unwrap();
            }
        }
        let chunk = tokio::time::timeout_at(deadline.into(), stream.chunk())
            .await
            .unwrap_or_else(|_| panic!("no event with {want:?} within 10 s; left: {buf}"))
            .unwrap()
            .expect("the stream stays open");
        buf.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test]
async fn task_progress_streams_over_server_sent_events() {
    let files = tempfile::tempdir().unwrap();
    let api = tasks_api(&files, false).await;
    let token = api.signed_up("live@example.com").await;
    let (s, _) = api
        .call(
            "POST",
            "/developer/keys",
            Some(&token),
            Some(serde_json::json!({"name": "live"})),
        )
        .await;
    assert_eq!(s, 201);
    let mut b = Browser::new(&api);
    b.log_in("live@example.com", PASSWORD).await;
    let cookie: Vec<String> = b.cookies.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let cookie = cookie.join("; ");
    let open = |path: String| {
        reqwest::Client::new()
            .get(api.url(&path))
            .header(COOKIE, cookie.clone())
            .send()
    };

    // A stream opened before the task exists reports it once it does (unfinished tasks are
    // read once a second), then each change: here the cancel.
    let mut stream = open("/portal/tasks/stream".into()).await.unwrap();
    assert_eq!(stream.status(), 200);
    assert!(stream.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    assert_eq!(stream.headers()["cache-control"], "no-cache");
    let (s, t) = api
        .call(
            "POST",
            "/developer/tasks",
            Some(&token),
            Some(
                serde_json::json!({"type": "batch_generate", "model": "m", "prompts": ["a", "b"]}),
            ),
        )
        .await;
    assert_eq!(s, 202, "{t}");
    let id = t["id"].as_str().unwrap().to_owned();
    let mut buf = String::new();
    let first = task_event(&mut stream, &mut buf, &[&id, r#""total":"2""#]).await;
    assert_eq!(first["kind"], "batch_generate");
    assert_eq!(first["status"], "running");
    assert_eq!(first["status_text"], "running");
    assert_eq!(first["done"], false);
    assert_eq!(first["cancellable"], true);
    assert!(first["progress"].as_i64().unwrap() < 100);
    let (s, _) = api
        .call(
            "POST",
            &format!("/developer/tasks/{id}/cancel"),
            Some(&token),
            None,
        )
        .await;
    assert_eq!(s, 200);
    let last = task_event(&mut stream, &mut buf, &[&id, r#""done":true"#]).await;
    assert_eq!(last["status"], "cancelled");
    assert_eq!(last["progress"], 100);
    assert_eq!(last["cancellable"], false);
    assert!(last["finished"].as_str().unwrap().ends_with(" UTC"));
    assert!(last["result_url"].is_null());
    drop(stream);

    // A task the page showed unfinished is reported when it ends, even if it ended before
    // the stream's first read; in the visitor's language.
    let (s, t) = api
        .call(
            "POST",
            "/developer/tasks",
            Some(&token),
            Some(serde_json::json!({"type": "usage_export"})),
        )
        .await;
    assert_eq!(s, 202, "{t}");
    let export = t["id"].as_str().unwrap().to_owned();
    task_until(&api, &token, &export, |t| t["status"] == "failed").await;
    let mut stream = reqwest::Client::new()
        .get(api.url(&format!("/portal/tasks/stream?ids={export},bogus'id")))
        .header(COOKIE, format!("{cookie}; aihub_lang=zh"))
        .send()
        .await
        .unwrap();
    let mut buf = String::new();
    let ended = task_event(&mut stream, &mut buf, &[&export]).await;
    assert_eq!(ended["status"], "failed");
    assert_eq!(ended["status_text"], "失败");
    assert_eq!(ended["kind_text"], "用量导出");
    assert_eq!(ended["done"], true);
    assert!(ended["error"]
        .as_str()
        .unwrap()
        .contains("no usage database"));
}
