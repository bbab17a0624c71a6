//! The documentation in the portal: the guides of `docs/guide/` (Markdown compiled into the
//! binary, rendered once, links between guides rewritten to portal URLs, raw HTML shown as
//! text), a Chinese version where one exists, and the two API references rendered on the
//! server from their OpenAPI documents (the gateway's `docs/gateway-openapi.json`, the admin
//! API's own document) — readable without JavaScript.

use std::fmt::Write;
use std::sync::LazyLock;

use askama::Template;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use pulldown_cmark::{html, CowStr, Event, Options, Parser, Tag};
use serde_json::Value;

use crate::billing::html::escape;
use crate::error::AppError;
use crate::state::AppState;

use super::i18n::Lang;
use super::session::Guest;
use super::{render, Chrome, PageResult};

struct Guide {
    slug: &'static str,
    en: &'static str,
    zh: Option<&'static str>,
}

/// Every guide, in reading order.
const GUIDES: &[Guide] = &[
    Guide {
        slug: "quickstart",
        en: include_str!("../../../docs/guide/quickstart.md"),
        zh: Some(include_str!("../../../docs/guide/zh/quickstart.md")),
    },
    Guide {
        slug: "rate-limits",
        en: include_str!("../../../docs/guide/rate-limits.md"),
        zh: None,
    },
    Guide {
        slug: "errors",
        en: include_str!("../../../docs/guide/errors.md"),
        zh: None,
    },
    Guide {
        slug: "pricing",
        en: include_str!("../../../docs/guide/pricing.md"),
        zh: None,
    },
    Guide {
        slug: "billing-cycle",
        en: include_str!("../../../docs/guide/billing-cycle.md"),
        zh: None,
    },
    Guide {
        slug: "webhooks",
        en: include_str!("../../../docs/guide/webhooks.md"),
        zh: None,
    },
    Guide {
        slug: "best-practices",
        en: include_str!("../../../docs/guide/best-practices.md"),
        zh: None,
    },
    Guide {
        slug: "refunds",
        en: include_str!("../../../docs/guide/refunds.md"),
        zh: None,
    },
    Guide {
        slug: "terms",
        en: include_str!("../../../docs/guide/terms.md"),
        zh: None,
    },
];

const GATEWAY_OPENAPI: &str = include_str!("../../../docs/gateway-openapi.json");

/// A rendered guide: its title (the first `# ` line) and body.
pub struct Rendered {
    pub title: String,
    pub html: String,
}

/// Markdown → HTML: tables and strikethrough on, raw HTML escaped (it would also be inert
/// under the CSP), `other.md` links pointing at `/portal/docs/other`.
pub fn markdown(text: &str) -> Rendered {
    let title = text
        .lines()
        .find_map(|l| l.strip_prefix("# "))
        .unwrap_or("")
        .trim()
        .to_owned();
    let events =
        Parser::new_ext(text, Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH).map(|e| {
            match e {
                Event::Html(h) | Event::InlineHtml(h) => Event::Text(h),
                Event::Start(Tag::Link {
                    link_type,
                    dest_url,
                    title,
                    id,
                }) => Event::Start(Tag::Link {
                    link_type,
                    dest_url: guide_link(dest_url),
                    title,
                    id,
                }),
                e => e,
            }
        });
    let mut out = String::with_capacity(text.len() * 3 / 2);
    html::push_html(&mut out, events);
    Rendered { title, html: out }
}

fn guide_link(url: CowStr<'_>) -> CowStr<'_> {
    let (path, anchor) = url.split_once('#').unwrap_or((&url, ""));
    let name = path.trim_start_matches("./").trim_start_matches("../");
    match name.strip_suffix(".md") {
        Some(slug) if GUIDES.iter().any(|g| g.slug == slug) => {
            let anchor = if anchor.is_empty() {
                String::new()
            } else {
                format!("#{anchor}")
            };
            CowStr::from(format!("/portal/docs/{slug}{anchor}"))
        }
        _ => url,
    }
}

/// Every guide rendered once, in both languages (English where there is no translation).
static RENDERED: LazyLock<Vec<(Rendered, Option<Rendered>)>> = LazyLock::new(|| {
    GUIDES
        .iter()
        .map(|g| (markdown(g.en), g.zh.map(markdown)))
        .collect()
});

pub struct NavItem {
    pub slug: &'static str,
    pub title: String,
    pub on: bool,
}

fn nav(lang: Lang, current: &str) -> Vec<NavItem> {
    GUIDES
        .iter()
        .zip(RENDERED.iter())
        .map(|(g, (en, zh))| NavItem {
            slug: g.slug,
            title: match (lang, zh) {
                (Lang::Zh, Some(zh)) => zh.title.clone(),
                _ => en.title.clone(),
            },
            on: g.slug == current,
        })
        .collect()
}

#[derive(Template)]
#[template(path = "portal/doc.html")]
struct DocPage<'a> {
    page: Chrome,
    nav: Vec<NavItem>,
    body: &'a str,
    english_only: bool,
    gateway_url: String,
}

pub async fn index() -> Response {
    axum::response::Redirect::to("/portal/docs/quickstart").into_response()
}

pub async fn page(State(s): State<AppState>, guest: Guest, Path(slug): Path<String>) -> PageResult {
    let Some(i) = GUIDES.iter().position(|g| g.slug == slug) else {
        return Err(AppError::NotFound.into());
    };
    let lang = guest.visit.lang;
    let (en, zh) = &RENDERED[i];
    let (doc, english_only) = match (lang, zh) {
        (Lang::Zh, Some(zh)) => (zh, false),
        (Lang::Zh, None) => (en, true),
        _ => (en, false),
    };
    let dev = guest.caller.as_ref().map(|c| &c.developer);
    render(&DocPage {
        page: Chrome::new(&guest.visit, dev, "docs", &doc.title),
        nav: nav(lang, &slug),
        body: &doc.html,
        english_only,
        gateway_url: s.config.portal.gateway_url.clone(),
    })
}

/// The gateway's OpenAPI document, as JSON (for tools: client generators, schemathesis).
pub async fn gateway_openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        GATEWAY_OPENAPI,
    )
        .into_response()
}

static GATEWAY_REFERENCE: LazyLock<String> = LazyLock::new(|| {
    let doc: Value = serde_json::from_str(GATEWAY_OPENAPI).unwrap_or(Value::Null);
    reference_html(&doc)
});

static ADMIN_REFERENCE: LazyLock<String> = LazyLock::new(|| {
    let doc = serde_json::to_value(crate::api().1).unwrap_or(Value::Null);
    reference_html(&doc)
});

#[derive(serde::Deserialize)]
pub struct ApiQuery {
    which: Option<String>,
}

/// `GET /portal/docs/api` (the gateway) or `?which=admin` (the admin API).
pub async fn api_reference(
    State(s): State<AppState>,
    guest: Guest,
    crate::error::Query(q): crate::error::Query<ApiQuery>,
) -> PageResult {
    let t = guest.visit.lang.texts();
    let admin = q.which.as_deref() == Some("admin");
    let (title, body) = if admin {
        (t.docs_admin_api, ADMIN_REFERENCE.as_str())
    } else {
        (t.docs_api_title, GATEWAY_REFERENCE.as_str())
    };
    let dev = guest.caller.as_ref().map(|c| &c.developer);
    render(&DocPage {
        page: Chrome::new(&guest.visit, dev, "docs", title),
        nav: nav(guest.visit.lang, if admin { "api-admin" } else { "api" }),
        body,
        english_only: guest.visit.lang == Lang::Zh,
        gateway_url: s.config.portal.gateway_url.clone(),
    })
}

/// An OpenAPI 3 document as HTML: title, description, then every operation with its
/// parameters, request body fields and responses. `$ref`s to components are followed one level
/// deep for field lists.
pub fn reference_html(doc: &Value) -> String {
    let mut out = String::new();
    let str_of = |v: &Value| v.as_str().unwrap_or("").to_owned();
    let _ = write!(
        out,
        "<h1>{}</h1><p>{}</p>",
        escape(&str_of(&doc["info"]["title"])),
        escape(&str_of(&doc["info"]["description"]))
    );
    let schemas = &doc["components"]["schemas"];
    let resolve = |v: &Value| -> Value {
        match v["$ref"].as_str() {
            Some(r) => schemas[r.rsplit('/').next().unwrap_or("")].clone(),
            None => v.clone(),
        }
    };
    let Some(paths) = doc["paths"].as_object() else {
        return out;
    };
    for (path, item) in paths {
        let Some(ops) = item.as_object() else {
            continue;
        };
        for (method, op) in ops {
            if !["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                continue;
            }
            let _ = write!(
                out,
                r#"<section class="card" id="{m}-{id}"><h2><span class="badge">{M}</span> <code>{p}</code></h2><p><strong>{s}</strong></p><p>{d}</p>"#,
                m = method,
                id = escape(&path.replace(['/', '{', '}'], "_")),
                M = method.to_uppercase(),
                p = escape(path),
                s = escape(&str_of(&op["summary"])),
                d = escape(&str_of(&op["description"])),
            );
            if let Some(params) = op["parameters"].as_array().filter(|p| !p.is_empty()) {
                out.push_str("<h3>Parameters</h3><ul>");
                for p in params {
                    let p = resolve(p);
                    let _ = write!(
                        out,
                        "<li><code>{}</code> ({}) {}</li>",
                        escape(&str_of(&p["name"])),
                        escape(&str_of(&p["in"])),
                        escape(&str_of(&p["description"]))
                    );
                }
                out.push_str("</ul>");
            }
            if let Some(content) = op["requestBody"]["content"].as_object() {
                for (kind, body) in content {
                    let schema = resolve(&body["schema"]);
                    let _ = write!(out, "<h3>Request body <code>{}</code></h3>", escape(kind));
                    fields(&mut out, &schema, &resolve);
                }
            }
            if let Some(responses) = op["responses"].as_object() {
                out.push_str(r#"<h3>Responses</h3><div class="scroll"><table><tbody>"#);
                for (status, r) in responses {
                    let r = resolve(r);
                    let _ = write!(
                        out,
                        "<tr><td><code>{}</code></td><td>{}</td></tr>",
                        escape(status),
                        escape(&str_of(&r["description"]))
                    );
                }
                out.push_str("</tbody></table></div>");
            }
            out.push_str("</section>");
        }
    }
    out
}

fn fields(out: &mut String, schema: &Value, resolve: &dyn Fn(&Value) -> Value) {
    let Some(props) = schema["properties"].as_object() else {
        return;
    };
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    out.push_str(r#"<div class="scroll"><table><tbody>"#);
    for (name, p) in props {
        let p = resolve(p);
        let kind = p["type"]
            .as_str()
            .map(str::to_owned)
            .or_else(|| {
                p["type"].as_array().map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(" | ")
                })
            })
            .unwrap_or_else(|| "object".into());
        let _ = write!(
            out,
            "<tr><td><code>{}</code>{}</td><td>{}</td><td>{}</td></tr>",
            escape(name),
            if required.contains(&name.as_str()) {
                " *"
            } else {
                ""
            },
            escape(&kind),
            escape(p["description"].as_str().unwrap_or(""))
        );
    }
    out.push_str("</tbody></table></div>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_links_and_raw_html() {
        let r = markdown("# Title\n\nSee [limits](rate-limits.md#headers) and [x](https://x.test/a.md).\n\n<script>alert(1)</script>\n");
        assert_eq!(r.title, "Title");
        assert!(r
            .html
            .contains(r#"href="/portal/docs/rate-limits#headers""#));
        assert!(r.html.contains(r#"href="https://x.test/a.md""#));
        assert!(!r.html.contains("<script>"));
    }

    #[test]
    fn every_guide_renders_with_a_title() {
        for (en, zh) in RENDERED.iter() {
            assert!(!en.title.is_empty() && en.html.len() > 200);
            if let Some(zh) = zh {
                assert!(!zh.title.is_empty());
            }
        }
        let doc: Value = serde_json::from_str(GATEWAY_OPENAPI).unwrap();
        let html = reference_html(&doc);
        assert!(html.contains("/v1/chat/completions"));
    }
}
