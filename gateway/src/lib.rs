//! The AI Hub gateway: a metering reverse proxy for OpenAI-compatible APIs, built on pingora.
//!
//! A request with `Authorization: Bearer ahub_dev_…` is authenticated from memory, its JSON body
//! read (bounded), routed by its `model` to an upstream from the YAML configuration (optionally
//! renaming the model), and the upstream's answer is streamed back untouched apart from the
//! `x-request-id` and `x-aihub-overhead-ms` headers. Batch items come the same way with a
//! batch token (`Bearer aihub-batch.…`) in place of the key; Files and Batches calls are
//! forwarded to the admin API.
//!
//! # Layout
//! Leaves first: a module imports only modules listed above it, so there are no import circles.
//! - [`clock`]: the wall clock in unix milliseconds.
//! - [`accesslog`]: the access log line, rendered in one pass (or as JSON fields).
//! - [`api`]: the model APIs known by path (Chat Completions, Completions, Embeddings,
//!   Responses, Messages) and how each reports usage.
//! - [`path`]: the request path rule (used as sent, or refused: no dot segments, encoded
//!   slashes or dots, doubled slashes, backslashes).
//! - [`metrics`]: Prometheus metrics.
//! - [`balance`]: which endpoint of an upstream a request goes to first (weighted round
//!   robin, fewest in flight, latency with two random choices).
//! - [`error`]: every failure and its OpenAI-shaped response; why a limit refused.
//! - [`client`]: writes to the client, each bounded by `response_write_timeout`.
//! - [`request`]: reading `model`/`stream` out of a body and splicing an alias in.
//! - [`keys`]: key records and their limits, the [`keys::KeyStore`] trait and the in-memory
//!   store.
//! - [`config`]: the YAML file's structs and defaults; `Config::check` parses every value once
//!   into the values the gateway runs on (routes, prices, plans, declared key records).
//! - [`retry`]: when a request is sent again before its first byte, and how long to wait.
//! - [`endpoint`]: one base URL of an upstream: its resolved addresses (as peers with the
//!   upstream's timeouts and TLS files) and its health (passive, active, slow start).
//! - [`routing`]: the live routing table (models with their timeouts, upstreams, their
//!   endpoints and health policy) and the admin API's address.
//! - [`keysnapshot`]: the on-disk snapshot of control-plane keys for starts without a database.
//! - [`limits`]: request/token limits and plan quotas, local or shared through Redis.
//! - [`metering`]: usage read from JSON bodies and SSE streams as they pass; estimates.
//! - [`context`]: the shared state and the per-request context (with its metering decision)
//!   that the next modules read and fill.
//! - [`upkeep`]: background upkeep of the endpoints: active health checks and DNS
//!   re-resolution.
//! - [`usage`]: the usage record of a finished request.
//! - [`wire`]: the upstream request rendered as HTTP/1.1 wire bytes, written in one write.
//! - [`forward`]: sending the request upstream with failover and retries, streaming the
//!   response back.
//! - [`internal`]: Files and Batches calls forwarded to the admin API (signed identity,
//!   streamed bodies).
//! - [`proxy`]: the pingora `ProxyHttp` implementation: the request flow and `logging`.
//! - [`keysync`]: control-plane keys: initial load, change feed, Redis wake-ups, last-used;
//!   the internal secret shared with the admin API.
//! - [`listeners`]: the proxy listeners' edges: TLS certificates swapped on reload, and the
//!   client address behind trusted proxies (`X-Forwarded-For`).
//! - [`lifecycle`]: draining on SIGTERM and the zero-downtime upgrade (`--upgrade`).
//! - [`server`]: assembling listeners, the ops endpoint and the reloader.

pub mod accesslog;
pub mod api;
pub mod balance;
pub mod client;
pub mod clock;
pub mod config;
pub mod conn_deadline;
pub mod context;
pub mod endpoint;
pub mod error;
pub mod forward;
pub mod internal;
pub mod keys;
pub mod keysnapshot;
pub mod keysync;
pub mod lifecycle;
pub mod limits;
pub mod listeners;
pub mod metering;
pub mod metrics;
pub mod path;
pub mod proxy;
pub mod request;
pub mod retry;
pub mod routing;
pub mod server;
pub mod upkeep;
pub mod usage;
pub mod wire;

pub use config::{Config, ConfigError};
pub use server::{check_config, GatewayServer};
