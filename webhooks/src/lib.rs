//! Webhook delivery for the AI Hub control plane: every outbox event (`api_key.created`,
//! `api.usage_alert`, `invoice.finalized`, …) is delivered to the developer's subscribed
//! endpoints, signed two ways, retried on a schedule, and logged attempt by attempt.
//!
//! The admin API owns the endpoints' commands (through `aihub-control`) and runs an
//! [`Engine`] per node; the store holds endpoints, deliveries and attempts
//! (`aihub_store::{webhooks, deliveries}`).
//!
//! # Layout
//! - [`config`] — the `webhooks:` section (timeouts, concurrency, the failure window,
//!   networks allowed despite the SSRF guard).
//! - [`catalogue`] — every event type: meaning, JSON Schema, example; subscription patterns.
//! - [`signature`] — `X-AIHub-Signature` and Standard Webhooks signatures, secrets, verifiers.
//! - [`guard`] — the SSRF address policy and the URL check at registration.
//! - [`client`] — one request: resolve, check every address, connect to the checked one,
//!   TLS, POST, status and the first 1 KiB; no redirects.
//! - [`schedule`] — the retry schedule with jitter and `Retry-After`.
//! - [`engine`] — fan-out, leases, bounded concurrency, batched results, disabling.
//! - `testing` (feature `testing`): a scriptable receiver on loopback.

pub mod catalogue;
pub mod client;
pub mod config;
pub mod engine;
pub mod guard;
pub mod schedule;
pub mod signature;
#[cfg(feature = "testing")]
pub mod testing;

pub use client::Sender;
pub use config::WebhooksConfig;
pub use engine::{Engine, Metrics, Notice};
