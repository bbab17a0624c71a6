//! The AI Hub gateway: a metering reverse proxy for OpenAI-compatible APIs, built on pingora.
//!
//! A request with `Authorization: Bearer ahub_dev_…` is authenticated from memory, its JSON body
//! read (bounded), routed by its `model` to an upstream from the YAML configuration (optionally
//! renaming the model), and the upstream's answer is streamed back untouched apart from the
//! `x-request-id` and `x-aihub-overhead-ms` headers.
//!
//! # Layout
//! - [`api`]: the model APIs known by path (Chat Completions, Completions, Embeddings,
//!   Responses, Messages) and how each reports usage.
//! - [`config`]: the YAML file's structs, defaults and `validate()`.
//! - [`routing`]: the live routing table (models, upstreams, endpoints, passive health).
//! - [`keys`]: key records, the [`keys::KeyStore`] trait and the in-memory store.
//! - [`keysync`]: control-plane keys: initial load, change feed, Redis wake-ups, last-used.
//! - [`keysnapshot`]: the on-disk snapshot of control-plane keys for starts without a database.
//! - [`limits`]: request/token limits and plan quotas, local or shared through Redis.
//! - [`path`]: the request path rule (used as sent, or refused: no dot segments, encoded
//!   slashes or dots, doubled slashes, backslashes).
//! - [`request`]: reading `model`/`stream` out of a body and splicing an alias in.
//! - [`proxy`]: the pingora `ProxyHttp` implementation and per-request context.
//! - [`forward`]: sending the request upstream with failover, streaming the response back.
//! - [`metering`]: usage read from JSON bodies and SSE streams as they pass; estimates.
//! - [`usage`]: the usage record of a finished request.
//! - [`error`]: every failure and its OpenAI-shaped response.
//! - [`metrics`]: Prometheus metrics.
//! - [`server`]: assembling listeners, the ops endpoint and the reloader.

pub mod api;
pub mod config;
pub mod error;
pub mod forward;
pub mod keys;
pub mod keysnapshot;
pub mod keysync;
pub mod limits;
pub mod metering;
pub mod metrics;
pub mod path;
pub mod proxy;
pub mod request;
pub mod routing;
pub mod server;
pub mod usage;

pub use config::{Config, ConfigError};
pub use server::{check_config, GatewayServer};
