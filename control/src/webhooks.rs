//! Webhook commands and queries: a developer's endpoints (create with the secret shown once,
//! update, delete, rotate the secret with a grace period, send a test event), the delivery log
//! with redelivery, and the event history. Each command is one transaction with its audit
//! entry; delivery itself is `aihub-webhooks`' engine.

use std::time::Duration;

use aihub_store::deliveries::{self, Attempt, Delivery};
use aihub_store::developers::Developer;
use aihub_store::outbox::{self, OutboxEvent};
use aihub_store::webhooks::{self as store_hooks, Endpoint, EndpointUpdate, NewEndpoint};
use aihub_store::{now_ms, StoreError};
use aihub_webhooks::guard::{self, AddressPolicy};
use aihub_webhooks::{catalogue, schedule, signature};

use crate::journal::{self, Actor, Entry};
use crate::{Control, Error, FieldError, Result};

/// The webhook rules (from the admin configuration's `webhooks:` section).
#[derive(Debug, Clone)]
pub struct WebhookRules {
    /// `http://` URLs accepted (tests, private deployments).
    pub allow_http: bool,
    pub policy: AddressPolicy,
    pub max_endpoints: i64,
    /// How long a rotated-out secret keeps signing.
    pub secret_grace: Duration,
    /// The most retries an endpoint may ask for (the retry schedule's length).
    pub max_retries: i64,
}

impl Default for WebhookRules {
    fn default() -> Self {
        WebhookRules {
            allow_http: false,
            policy: AddressPolicy::default(),
            max_endpoints: 20,
            secret_grace: Duration::from_secs(86_400),
            max_retries: schedule::MAX_RETRIES,
        }
    }
}

/// The retry count of an endpoint whose request names none (the seed's).
pub const DEFAULT_RETRIES: i64 = 3;

/// Register an endpoint.
#[derive(Debug, Clone, Default)]
pub struct CreateWebhook {
    pub url: String,
    pub event_types: Vec<String>,
    pub description: Option<String>,
    /// Retries after the first attempt, 0 to 7; `None`: 3.
    pub max_retries: Option<i64>,
    /// `None`: active.
    pub active: Option<bool>,
}

/// Change an endpoint; `None` fields stay.
#[derive(Debug, Clone, Default)]
pub struct UpdateWebhook {
    pub url: Option<String>,
    pub event_types: Option<Vec<String>>,
    pub description: Option<String>,
    pub max_retries: Option<i64>,
    /// `true` re-enables a disabled endpoint (its failure run starts over).
    pub active: Option<bool>,
}

/// An endpoint and its signing secret (shown this once).
#[derive(Debug)]
pub struct WithSecret {
    pub endpoint: Endpoint,
    pub secret: String,
}

/// A delivery and its attempts, oldest first.
#[derive(Debug)]
pub struct LoggedDelivery {
    pub delivery: Delivery,
    pub attempts: Vec<Attempt>,
}

impl Control {
    fn check_url(&self, url: &str, errors: &mut Vec<FieldError>) {
        let r = &self.config.webhooks;
        if let Err(e) = guard::check_url(url.trim(), r.allow_http, &r.policy) {
            errors.push(FieldError::new("url", e.to_string()));
        }
    }

    fn check_types(types: &[String], errors: &mut Vec<FieldError>) {
        if types.is_empty() {
            errors.push(FieldError::new(
                "event_types",
                "name at least one event type (or \"*\")",
            ));
        }
        if types.len() > 50 {
            errors.push(FieldError::new("event_types", "at most 50 entries"));
        }
        for t in types {
            if !catalogue::pattern_known(t) {
                errors.push(FieldError::new(
                    "event_types",
                    format!("`{t}` is not an event type or a wildcard of one (e.g. `task.*`)"),
                ));
            }
        }
    }

    fn check_retries(&self, n: Option<i64>, errors: &mut Vec<FieldError>) {
        let max = self.config.webhooks.max_retries;
        if n.is_some_and(|n| !(0..=max).contains(&n)) {
            errors.push(FieldError::new(
                "max_retries",
                format!("must be 0 to {max}"),
            ));
        }
    }

    fn check_description(d: Option<&str>, errors: &mut Vec<FieldError>) {
        if d.is_some_and(|d| d.chars().count() > 500) {
            errors.push(FieldError::new("description", "at most 500 characters"));
        }
    }

    /// Registers an endpoint under the per-developer cap, with a new secret.
    pub async fn create_webhook(
        &self,
        by: &Actor<'_>,
        dev: &Developer,
        r: CreateWebhook,
    ) -> Result<WithSecret> {
        let mut errors = Vec::new();
        self.check_url(&r.url, &mut errors);
        Self::check_types(&r.event_types, &mut errors);
        self.check_retries(r.max_retries, &mut errors);
        Self::check_description(r.description.as_deref(), &mut errors);
        Error::check(errors)?;
        let secret = signature::new_secret();
        let mut types = r.event_types.clone();
        types.dedup();
        let mut tx = self.store.begin_write().await?;
        aihub_store::developers::lock(&mut tx, &dev.id).await?;
        let max = self.config.webhooks.max_endpoints;
        if store_hooks::count(&mut tx, &dev.id).await? >= max {
            return Err(Error::Forbidden(
                "webhook_limit_reached",
                format!("An account may have {max} webhook endpoints; delete one first."),
            ));
        }
        let endpoint = store_hooks::create(
            &mut tx,
            &NewEndpoint {
                developer_id: &dev.id,
                url: r.url.trim(),
                description: r.description.as_deref().unwrap_or("").trim(),
                event_types: &types,
                max_retries: r
                    .max_retries
                    .unwrap_or(DEFAULT_RETRIES.min(self.config.webhooks.max_retries)),
                secret: &secret,
                active: r.active.unwrap_or(true),
            },
        )
        .await?;
        journal::record(&mut tx, by, None, Some(entry("webhook.create", &endpoint))).await?;
        tx.commit().await?;
        Ok(WithSecret { endpoint, secret })
    }

    pub async fn webhooks(&self, dev: &Developer) -> Result<Vec<Endpoint>> {
        Ok(store_hooks::list(&self.store, &dev.id).await?)
    }

    pub async fn webhook(&self, dev: &Developer, id: &str) -> Result<Endpoint> {
        Ok(store_hooks::get(&self.store, Some(&dev.id), id).await?)
    }

    /// Changes an endpoint; disabling ends its pending deliveries, enabling starts its failure
    /// run over.
    pub async fn update_webhook(
        &self,
        by: &Actor<'_>,
        dev: &Developer,
        id: &str,
        r: UpdateWebhook,
    ) -> Result<Endpoint> {
        let mut errors = Vec::new();
        if let Some(u) = &r.url {
            self.check_url(u, &mut errors);
        }
        if let Some(t) = &r.event_types {
            Self::check_types(t, &mut errors);
        }
        self.check_retries(r.max_retries, &mut errors);
        Self::check_description(r.description.as_deref(), &mut errors);
        Error::check(errors)?;
        let mut tx = self.store.begin_write().await?;
        let u = EndpointUpdate {
            url: r.url.map(|u| u.trim().to_owned()),
            description: r.description.map(|d| d.trim().to_owned()),
            event_types: r.event_types,
            max_retries: r.max_retries,
            active: r.active,
        };
        let endpoint = store_hooks::update(&mut tx, &dev.id, id, &u).await?;
        journal::record(&mut tx, by, None, Some(entry("webhook.update", &endpoint))).await?;
        tx.commit().await?;
        Ok(endpoint)
    }

    /// Deletes an endpoint; its pending deliveries end, its log stays.
    pub async fn delete_webhook(
        &self,
        by: &Actor<'_>,
        dev: &Developer,
        id: &str,
    ) -> Result<Endpoint> {
        let mut tx = self.store.begin_write().await?;
        let endpoint = store_hooks::delete(&mut tx, &dev.id, id).await?;
        journal::record(&mut tx, by, None, Some(entry("webhook.delete", &endpoint))).await?;
        tx.commit().await?;
        Ok(endpoint)
    }

    /// A new signing secret; the old one keeps signing for the grace period.
    pub async fn rotate_webhook_secret(
        &self,
        by: &Actor<'_>,
        dev: &Developer,
        id: &str,
    ) -> Result<WithSecret> {
        let secret = signature::new_secret();
        let until = now_ms() + self.config.webhooks.secret_grace.as_millis() as i64;
        let mut tx = self.store.begin_write().await?;
        let endpoint = store_hooks::rotate_secret(&mut tx, &dev.id, id, &secret, until).await?;
        journal::record(
            &mut tx,
            by,
            None,
            Some(entry("webhook.rotate_secret", &endpoint)),
        )
        .await?;
        tx.commit().await?;
        Ok(WithSecret { endpoint, secret })
    }

    /// Sends a `webhook.test` event to this endpoint only (it must be active).
    pub async fn test_webhook(&self, dev: &Developer, id: &str) -> Result<Delivery> {
        let mut tx = self.store.begin_write().await?;
        let endpoint = store_hooks::get_on(&mut tx, Some(&dev.id), id).await?;
        if !endpoint.active() {
            return Err(Error::Conflict(
                "The endpoint is disabled: enable it first.".into(),
            ));
        }
        let data = serde_json::json!({
            "endpoint_id": endpoint.id,
            "message": "This is a test event from AI Hub.",
        });
        let d = deliveries::enqueue_for_endpoint(&mut tx, &endpoint, outbox::WEBHOOK_TEST, data)
            .await?;
        tx.commit().await?;
        Ok(d)
    }

    /// An endpoint's deliveries, newest first, with their attempts.
    pub async fn webhook_deliveries(
        &self,
        dev: &Developer,
        endpoint_id: &str,
        limit: i64,
        before: Option<&str>,
    ) -> Result<Vec<LoggedDelivery>> {
        store_hooks::get(&self.store, Some(&dev.id), endpoint_id).await?;
        let before = match before {
            Some(id) => {
                let d = deliveries::get(&self.store, &dev.id, id)
                    .await
                    .map_err(|_| Error::invalid("after", "no such delivery"))?;
                Some((d.created_at, d.id))
            }
            None => None,
        };
        let list = deliveries::for_endpoint(
            &self.store,
            endpoint_id,
            limit,
            before.as_ref().map(|(t, id)| (*t, id.as_str())),
        )
        .await?;
        let ids: Vec<&str> = list.iter().map(|d| d.id.as_str()).collect();
        let mut attempts = deliveries::attempts(&self.store, &ids).await?;
        Ok(list
            .into_iter()
            .map(|d| {
                let mine: Vec<Attempt> = attempts
                    .extract_if(.., |(id, _)| *id == d.id)
                    .map(|(_, a)| a)
                    .collect();
                LoggedDelivery {
                    delivery: d,
                    attempts: mine,
                }
            })
            .collect())
    }

    /// Sends a delivery again now (one more attempt); its endpoint must be active.
    pub async fn redeliver(&self, by: &Actor<'_>, dev: &Developer, id: &str) -> Result<Delivery> {
        let mut tx = self.store.begin_write().await?;
        let d = match deliveries::redeliver(&mut tx, &dev.id, id).await {
            Ok(d) => d,
            Err(StoreError::NotFound) => {
                // Tell a delivery of a disabled endpoint from an unknown one.
                deliveries::get(&self.store, &dev.id, id).await?;
                return Err(Error::Conflict(
                    "The delivery's endpoint is disabled or deleted: enable it first.".into(),
                ));
            }
            Err(e) => return Err(e.into()),
        };
        let e = Entry {
            action: "webhook.redeliver",
            target_type: "webhook_delivery",
            target_id: &d.id,
            details: serde_json::json!({"endpoint_id": d.endpoint_id, "event_id": d.event_id}),
        };
        journal::record(&mut tx, by, None, Some(e)).await?;
        tx.commit().await?;
        Ok(d)
    }

    /// The developer's events, newest first (`event_type` exact or `prefix.*`); `before` is
    /// the `evt_…` id of the last event of the previous page.
    pub async fn events(
        &self,
        dev: &Developer,
        event_type: Option<&str>,
        limit: i64,
        before: Option<&str>,
    ) -> Result<Vec<OutboxEvent>> {
        if let Some(t) = event_type {
            if !catalogue::pattern_known(t) {
                return Err(Error::invalid(
                    "type",
                    format!("`{t}` is not an event type"),
                ));
            }
        }
        let before = match before {
            Some(id) => Some(
                outbox::event(&self.store, &dev.id, id)
                    .await
                    .map_err(|_| Error::invalid("after", "no such event"))?
                    .id,
            ),
            None => None,
        };
        Ok(outbox::history(&self.store, &dev.id, event_type, limit, before).await?)
    }

    pub async fn event_of(&self, dev: &Developer, id: &str) -> Result<OutboxEvent> {
        Ok(outbox::event(&self.store, &dev.id, id).await?)
    }
}

fn entry<'a>(action: &'a str, e: &'a Endpoint) -> Entry<'a> {
    Entry {
        action,
        target_type: "webhook_endpoint",
        target_id: &e.id,
        details: serde_json::json!({
            "developer_id": e.developer_id,
            "url": e.url,
            "event_types": e.event_types,
            "active": e.active(),
        }),
    }
}
