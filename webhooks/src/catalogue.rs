//! The event catalogue: every event type the platform sends, what it means, the fields of its
//! `data` (as a JSON Schema of the whole event body) and an example. Served by
//! `GET /developer/webhooks/event-types` and rendered into `docs/webhooks.md`; a test checks
//! every event the platform writes against its schema's required fields.
//!
//! Every event body has the same envelope:
//! `{"id": "evt_…", "type": "…", "created_at": "RFC 3339 UTC", "data": {…}}`; `id` is stable
//! across retries and redeliveries (receivers de-duplicate on it).

use serde_json::{json, Value};

/// One `data` field: name, JSON type, whether it may be `null`, and what it holds.
type Field = (&'static str, &'static str, bool, &'static str);

/// One event type.
pub struct EventType {
    pub name: &'static str,
    pub description: &'static str,
    fields: &'static [Field],
    example: fn() -> Value,
}

const KEY_FIELDS: &[Field] = &[
    ("key_id", "string", false, "The key's id (`key_…`)."),
    ("developer_id", "string", false, "The key's owner."),
    ("name", "string", false, "The key's name."),
    (
        "prefix",
        "string",
        false,
        "The key's displayable prefix (never the key).",
    ),
    (
        "expires_at",
        "string",
        true,
        "When the key expires (RFC 3339), or null.",
    ),
];

const TASK_FIELDS: &[Field] = &[
    ("task_id", "string", false, "The task's id."),
    (
        "task_type",
        "string",
        false,
        "`batch_generate`, `usage_export` or `openai_batch`.",
    ),
    (
        "status",
        "string",
        false,
        "The final status (a batch's OpenAI status, a task's seed status).",
    ),
    ("error", "string", true, "Why it failed, or null."),
];

const INVOICE_FIELDS: &[Field] = &[
    ("invoice_id", "string", false, "The invoice's id (`inv_…`)."),
    ("period", "string", false, "Billing period, `YYYY-MM`."),
    (
        "status",
        "string",
        false,
        "`draft`, `open`, `paid` or `void`.",
    ),
    ("total", "string", false, "Exact decimal amount."),
    ("currency", "string", false, "`USD`."),
];

/// Every event type, by name.
pub const CATALOGUE: &[EventType] = &[
    EventType {
        name: "api_key.created",
        description: "An API key was created.",
        fields: KEY_FIELDS,
        example: || json!({"key_id": "key_01", "developer_id": "dev_01", "name": "prod", "prefix": "ahub_live_AbCd", "expires_at": "2027-12-05T10:00:00.000Z"}),
    },
    EventType {
        name: "api_key.deleted",
        description: "An API key was revoked.",
        fields: KEY_FIELDS,
        example: || json!({"key_id": "key_01", "developer_id": "dev_01", "name": "prod", "prefix": "ahub_live_AbCd", "expires_at": null}),
    },
    EventType {
        name: "api_key.rotated",
        description: "An API key was regenerated; the previous key works until `previous_expires_at`.",
        fields: &[
            ("key_id", "string", false, "The new key's id."),
            ("previous_key_id", "string", false, "The replaced key's id."),
            ("developer_id", "string", false, "The keys' owner."),
            ("name", "string", false, "The key's name."),
            ("prefix", "string", false, "The new key's displayable prefix."),
            ("previous_expires_at", "string", false, "When the previous key stops working."),
        ],
        example: || json!({"key_id": "key_02", "previous_key_id": "key_01", "developer_id": "dev_01", "name": "prod", "prefix": "ahub_live_EfGh", "previous_expires_at": "2026-12-06T10:00:00.000Z"}),
    },
    EventType {
        name: "api.usage_alert",
        description: "This month's token usage crossed an alert threshold of the quota (once per threshold and month).",
        fields: &[
            ("developer_id", "string", false, "Whose usage."),
            ("period", "string", false, "Billing period, `YYYY-MM`."),
            ("threshold_percent", "integer", false, "The threshold crossed, percent of the quota."),
            ("used_tokens", "integer", false, "Tokens used when the crossing was seen."),
            ("quota_tokens", "integer", false, "The monthly quota."),
        ],
        example: || json!({"developer_id": "dev_01", "period": "2026-12", "threshold_percent": 80, "used_tokens": 80_412, "quota_tokens": 100_000}),
    },
    EventType {
        name: "billing.payment",
        description: "A payment was recorded against an invoice.",
        fields: &[
            ("invoice_id", "string", false, "The invoice paid."),
            ("payment_id", "string", false, "The payment's id."),
            ("amount", "string", false, "Exact decimal amount."),
            ("currency", "string", false, "`USD`."),
            ("provider", "string", false, "How it was paid (`manual`, …)."),
            ("reference", "string", false, "The provider's reference."),
            ("invoice_status", "string", false, "The invoice's status after the payment."),
            ("amount_due", "string", false, "What remains due."),
        ],
        example: || json!({"invoice_id": "inv_01", "payment_id": "pay_01", "amount": "29.00", "currency": "USD", "provider": "manual", "reference": "bank-2026-12-001", "invoice_status": "paid", "amount_due": "0.00"}),
    },
    EventType {
        name: "invoice.created",
        description: "A closed month's draft invoice was created; its amounts may change until it is finalized.",
        fields: INVOICE_FIELDS,
        example: || json!({"invoice_id": "inv_01", "period": "2026-11", "status": "draft", "total": "29.00", "currency": "USD"}),
    },
    EventType {
        name: "invoice.finalized",
        description: "An invoice was finalized: `open` (due) or `paid` when nothing is due.",
        fields: INVOICE_FIELDS,
        example: || json!({"invoice_id": "inv_01", "period": "2026-11", "status": "open", "total": "29.00", "currency": "USD"}),
    },
    EventType {
        name: "invoice.voided",
        description: "A finalized invoice was voided.",
        fields: &[
            ("invoice_id", "string", false, "The invoice."),
            ("period", "string", false, "Billing period, `YYYY-MM`."),
            ("status", "string", false, "`void`."),
            ("reason", "string", false, "Why."),
        ],
        example: || json!({"invoice_id": "inv_01", "period": "2026-11", "status": "void", "reason": "billed twice"}),
    },
    EventType {
        name: "task.progress",
        description: "An async task or batch crossed another tenth of its items (10 %, 20 %, … 90 %).",
        fields: &[
            ("task_id", "string", false, "The task's or batch's id."),
            ("task_type", "string", false, "`batch_generate`, `usage_export` or `openai_batch`."),
            ("status", "string", false, "Its status now (a batch's OpenAI status, a task's seed status)."),
            ("progress", "integer", false, "Percent of items ended."),
            ("total", "integer", false, "Items in all."),
            ("completed", "integer", false, "Items that succeeded."),
            ("failed", "integer", false, "Items that failed."),
        ],
        example: || json!({"task_id": "batch_01", "task_type": "openai_batch", "status": "in_progress", "progress": 40, "total": 1000, "completed": 398, "failed": 2}),
    },
    EventType {
        name: "task.completed",
        description: "An async task or batch completed.",
        fields: TASK_FIELDS,
        example: || json!({"task_id": "task_01", "task_type": "batch_generate", "status": "completed", "error": null}),
    },
    EventType {
        name: "task.failed",
        description: "An async task or batch failed.",
        fields: TASK_FIELDS,
        example: || json!({"task_id": "task_01", "task_type": "usage_export", "status": "failed", "error": "the range holds no usage"}),
    },
    EventType {
        name: "task.cancelled",
        description: "An async task or batch was cancelled.",
        fields: TASK_FIELDS,
        example: || json!({"task_id": "task_01", "task_type": "batch_generate", "status": "cancelled", "error": null}),
    },
    EventType {
        name: "webhook.disabled",
        description: "A webhook endpoint was disabled: it answered 410 Gone, or every attempt failed for the configured period.",
        fields: &[
            ("endpoint_id", "string", false, "The endpoint (`whk_…`)."),
            ("url", "string", false, "Its URL."),
            ("reason", "string", false, "Why it was disabled."),
            ("failing_since", "string", true, "The first failure of the run (RFC 3339), or null."),
        ],
        example: || json!({"endpoint_id": "whk_01", "url": "https://example.com/hooks", "reason": "every attempt failed for 72 hours", "failing_since": "2026-12-02T10:00:00.000Z"}),
    },
    EventType {
        name: "webhook.test",
        description: "Sent to one endpoint when its developer asks (`POST /developer/webhooks/{id}/test`).",
        fields: &[
            ("endpoint_id", "string", false, "The endpoint tested."),
            ("message", "string", false, "A fixed sentence."),
        ],
        example: || json!({"endpoint_id": "whk_01", "message": "This is a test event from AI Hub."}),
    },
];

impl EventType {
    /// A JSON Schema (draft 2020-12) of the whole event body.
    pub fn schema(&self) -> Value {
        let mut props = serde_json::Map::new();
        for (name, ty, nullable, desc) in self.fields {
            let ty = if *nullable {
                json!([ty, "null"])
            } else {
                json!(ty)
            };
            props.insert((*name).into(), json!({"type": ty, "description": desc}));
        }
        let required: Vec<&str> = self.fields.iter().map(|f| f.0).collect();
        json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": self.name,
            "description": self.description,
            "type": "object",
            "required": ["id", "type", "created_at", "data"],
            "properties": {
                "id": {"type": "string", "pattern": "^evt_", "description": "Stable across retries: de-duplicate on it."},
                "type": {"const": self.name},
                "created_at": {"type": "string", "format": "date-time"},
                "data": {"type": "object", "required": required, "properties": props},
            },
        })
    }

    /// An example event body.
    pub fn example(&self) -> Value {
        json!({
            "id": "evt_0193a1b2c3d4e5f60718293a4b5c6d7e",
            "type": self.name,
            "created_at": "2026-12-05T10:00:00.000Z",
            "data": (self.example)(),
        })
    }

    /// The names of `data`'s fields.
    pub fn fields(&self) -> impl Iterator<Item = &'static str> {
        self.fields.iter().map(|f| f.0)
    }
}

/// The catalogue entry of `name`.
pub fn find(name: &str) -> Option<&'static EventType> {
    CATALOGUE.iter().find(|e| e.name == name)
}

/// Whether a subscription pattern names catalogue events: an exact name, `*`, or `prefix.*`
/// where some event starts with `prefix.`.
pub fn pattern_known(pattern: &str) -> bool {
    match pattern.strip_suffix(".*") {
        _ if pattern == "*" => true,
        Some(prefix) => CATALOGUE.iter().any(|e| {
            e.name
                .strip_prefix(prefix)
                .is_some_and(|r| r.starts_with('.'))
        }),
        None => find(pattern).is_some(),
    }
}

/// Whether `body` has the envelope and every `data` field its type's schema requires, with
/// the declared JSON types.
pub fn conforms(body: &Value) -> Result<(), String> {
    let t = body["type"].as_str().ok_or("no type")?;
    let e = find(t).ok_or_else(|| format!("`{t}` is not in the catalogue"))?;
    if !body["id"].as_str().is_some_and(|i| i.starts_with("evt_")) {
        return Err("id must start with evt_".into());
    }
    body["created_at"].as_str().ok_or("no created_at")?;
    let data = body["data"].as_object().ok_or("data must be an object")?;
    for (name, ty, nullable, _) in e.fields {
        let v = data
            .get(*name)
            .ok_or_else(|| format!("{t}: data.{name} missing"))?;
        let ok = match *ty {
            _ if v.is_null() => *nullable,
            "string" => v.is_string(),
            "integer" => v.is_i64() || v.is_u64(),
            _ => true,
        };
        if !ok {
            return Err(format!("{t}: data.{name} is not a {ty}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_conform_and_names_are_unique() {
        for e in CATALOGUE {
            conforms(&e.example()).unwrap();
            assert_eq!(e.schema()["properties"]["type"]["const"], e.name);
            assert_eq!(CATALOGUE.iter().filter(|o| o.name == e.name).count(), 1);
        }
        assert!(pattern_known("task.*"));
        assert!(pattern_known("*"));
        assert!(pattern_known("invoice.finalized"));
        assert!(!pattern_known("invoice.paid"));
        assert!(!pattern_known("tas.*"));
        assert!(!pattern_known("task*"));
    }
}

#[cfg(test)]
mod docs {
    /// The guide's table lists every event type with its description and every `data` field.
    #[test]
    fn the_guide_lists_the_catalogue() {
        let guide = include_str!("../../docs/guide/webhooks.md");
        for e in super::CATALOGUE {
            let row = guide
                .lines()
                .find(|l| l.starts_with(&format!("| `{}` |", e.name)))
                .unwrap_or_else(|| panic!("docs/guide/webhooks.md lacks `{}`", e.name));
            assert!(
                row.contains(e.description),
                "{}: description differs",
                e.name
            );
            for f in e.fields() {
                assert!(
                    row.contains(&format!("`{f}`")),
                    "{}: field {f} missing",
                    e.name
                );
            }
        }
    }
}
