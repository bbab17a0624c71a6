//! What the proxy's modules share: the process-wide [`Shared`] state and the per-request
//! [`RequestCtx`] (with its [`Metering`] decision and its [`ResponseMeter`]).
//!
//! `proxy` (the request flow), `forward` (the upstream exchange) and `usage` (the record of a
//! finished request) all read and fill the context; it lives here, below all three, so none of
//! them imports another's types.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aihub_apikey::internal::InternalSecret;
use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use pingora_core::connectors::http::Connector;

use crate::api::Api;
use crate::clock::now_ms;
use crate::keys::{KeyRecord, KeyStore};
use crate::limits::headers::RateHeaders;
use crate::limits::{Admission, Limits};
use crate::metering::{JsonMeter, SseMeter};
use crate::metrics::Metrics;
use crate::routing::{Route, Runtime, Upstream};

/// State shared by every request, behind one `Arc`.
pub struct Shared {
    /// Routes and request settings; swapped whole on reload.
    pub runtime: ArcSwap<Runtime>,
    pub keys: Arc<dyn KeyStore>,
    pub metrics: Metrics,
    /// Upstream connection pool.
    pub connector: Connector,
    /// False until serving, and again once shutdown starts (`/readyz`).
    pub ready: AtomicBool,
    /// Set on SIGTERM and SIGQUIT: every response from then on closes its connection
    /// (`Connection: close`), so clients open new connections (to the new process, or through
    /// the balancer) instead of reusing one this process is about to close.
    pub draining: AtomicBool,
    /// False until the control-plane keys were loaded once (`/readyz`); true without a
    /// control plane.
    pub keys_ready: AtomicBool,
    /// Where usage records go; `None` when metering is off.
    pub usage: Option<aihub_usage::UsageSink>,
    /// Rate limits and quotas; `None` without a `limits` section.
    pub limits: Option<Arc<Limits>>,
    /// The secret shared with the admin API (`settings.internal_secret`), read by the key sync
    /// once the admin API has created it: it signs forwarded identities and verifies batch
    /// tokens. `None` without a control plane, and until it is read.
    pub internal_secret: ArcSwapOption<InternalSecret>,
    /// Who may name the client on each listener; swapped on reload.
    pub clients: crate::listeners::Clients,
}

/// Whether `/readyz` answers ready: serving, and the initial key load (if any) done.
pub fn is_ready(shared: &Shared) -> bool {
    shared.ready.load(Ordering::Relaxed) && shared.keys_ready.load(Ordering::Relaxed)
}

/// Marks the gateway ready or not for `/readyz`.
pub fn set_ready(shared: &Shared, ready: bool) {
    shared.ready.store(ready, Ordering::Relaxed);
}

/// Whether and how a request is metered. Decided by [`Metering::model_call`] once the request
/// is known to be an authenticated model call, completed by [`Metering::forwarding`] once its
/// route and admission are known; everything after only reads it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Metering {
    /// A usage record is written for this request (metering is on and the request is a model
    /// call: an authenticated `POST /v1/…`), refused or not.
    pub record: bool,
    /// The response's usage is read: for the usage record, or for the limits to settle.
    pub read_usage: bool,
    /// The gateway wants a stream's usage (`stream_options.include_usage`) from this upstream.
    pub ask_stream_usage: bool,
    /// The gateway asked for stream usage the client did not ask for: it is removed from the
    /// client's stream.
    pub strip_stream_usage: bool,
}

impl Metering {
    /// A model call (an authenticated `POST /v1/…`): recorded when metering is on.
    pub fn model_call(shared: &Shared) -> Metering {
        let record = shared.usage.is_some();
        Metering {
            record,
            read_usage: record,
            ..Metering::default()
        }
    }

    /// The decision for forwarding: the usage is read for the record or for a limit to settle
    /// (`settles`: the request holds an admission); a stream's usage is asked for when the
    /// usage is read, the upstream takes `stream_options` and the API reports it only when asked
    /// (other APIs report it unasked and refuse `stream_options`).
    pub fn forwarding(self, settles: bool, upstream: &Upstream, api: Api) -> Metering {
        let read_usage = self.record || settles;
        Metering {
            record: self.record,
            read_usage,
            ask_stream_usage: read_usage
                && upstream.inject_stream_usage
                && api.takes_stream_options(),
            strip_stream_usage: false,
        }
    }
}

/// The batch item a request is (it came with a verified batch token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchItem {
    /// The batch or task id (`batch_…`, `task_…`): the usage record's `batch_id`.
    pub task_id: Arc<str>,
    /// The item's line in the batch's input.
    pub line: u64,
    /// The attempt was refused or failed (status 400 and above) and carries a request id of
    /// its own instead of the item's.
    pub own_id: bool,
}

/// Facts derived while handling one request. No I/O happens in [`RequestCtx::new`].
pub struct RequestCtx {
    /// The request id (UUIDv7; a batch item's is fixed by the item, see
    /// [`RequestCtx::set_batch_item`]): in usage records, logs and the `x-request-id` header.
    pub request_id: uuid::Uuid,
    /// `request_id` rendered once as a header value (cheap to clone into both headers).
    pub request_id_header: http::HeaderValue,
    pub start: Instant,
    /// The client's address: the TCP peer, or the client a trusted proxy names
    /// (`listeners::ClientPolicies`); `None` on a Unix socket.
    pub client_ip: Option<std::net::IpAddr>,
    pub key: Option<Arc<KeyRecord>>,
    pub route: Option<Arc<Route>>,
    /// The route the client asked for, when a fallback serves the request (`route` is then
    /// the serving one: its upstream, its price).
    pub requested: Option<Arc<Route>>,
    /// The API of the request's path (how its usage is read).
    pub api: Api,
    /// Index of the upstream endpoint that answered.
    pub endpoint: Option<usize>,
    /// Times the request was sent upstream (retries included; connect failures not).
    pub attempts: u8,
    pub stream: bool,
    pub status: u16,
    /// Error code when the request failed (`GatewayError::code`, or `aborted`).
    pub error: Option<&'static str>,
    /// Time spent waiting for the client's body and for the upstream: not gateway overhead.
    pub waited: Duration,
    pub overhead: Option<Duration>,
    pub upstream_latency: Option<Duration>,
    pub bytes_in: usize,
    pub bytes_out: u64,
    /// The response header has gone out: failures can no longer become error responses.
    pub response_started: bool,
    /// Wall-clock start, unix milliseconds (the usage record's timestamp).
    pub started_at_ms: u64,
    /// Whether and how the request is metered.
    pub metering: Metering,
    /// The request body as received (kept, reference-counted, for usage estimates).
    pub request_body: Option<Bytes>,
    /// Reads usage from the response as it streams by.
    pub meter: ResponseMeter,
    /// The request's hold on its limits (settled with its usage, by `usage::commit`).
    pub admission: Option<Admission>,
    /// What the exchange used, priced: set once, when its usage record is committed (before
    /// the response's last byte; [`crate::usage::commit`]).
    pub charge: Option<Charge>,
    /// Rate-limit headers for the response (empty when no limit applies).
    pub rate_headers: RateHeaders,
    /// `Retry-After` seconds of a refusal.
    pub retry_after: Option<u64>,
    /// The request is counted in the in-flight gauge (undone in `logging`).
    pub counted: bool,
    /// Set when the request is a batch item: priced with the batch discount, recorded with
    /// its batch id.
    pub batch: Option<BatchItem>,
}

impl RequestCtx {
    /// A fresh context: a new request id, the start instant, nothing known yet.
    pub fn new() -> RequestCtx {
        let request_id = uuid::Uuid::now_v7();
        RequestCtx {
            request_id,
            request_id_header: id_header(request_id),
            start: Instant::now(),
            key: None,
            route: None,
            requested: None,
            api: Api::Other,
            endpoint: None,
            attempts: 0,
            stream: false,
            status: 0,
            error: None,
            waited: Duration::ZERO,
            overhead: None,
            upstream_latency: None,
            bytes_in: 0,
            client_ip: None,
            bytes_out: 0,
            response_started: false,
            started_at_ms: now_ms(),
            metering: Metering::default(),
            request_body: None,
            meter: ResponseMeter::None,
            admission: None,
            charge: None,
            rate_headers: RateHeaders::default(),
            retry_after: None,
            counted: false,
            batch: None,
        }
    }

    /// Marks the request as batch item `item`, whose request id is `request_id` (the same on
    /// every attempt of the item, so its usage is recorded once).
    pub fn set_batch_item(&mut self, item: BatchItem, request_id: uuid::Uuid) {
        self.request_id = request_id;
        self.request_id_header = id_header(request_id);
        self.batch = Some(item);
    }

    /// Called with the status a batch item's attempt ends with, before its response header
    /// goes out: only an answered attempt (status below 400) keeps the item's request id. A
    /// refused or failed one gets an id of its own, so `usage_events` holds at most one row per
    /// request id, and exactly one answered row per item however often it is sent.
    pub fn settle_batch_request_id(&mut self, status: u16) {
        if let Some(b) = self.batch.as_mut().filter(|b| status >= 400 && !b.own_id) {
            b.own_id = true;
            self.request_id = uuid::Uuid::now_v7();
            self.request_id_header = id_header(self.request_id);
        }
    }
}

/// A finished exchange's tokens and cost, for its limits' settle.
#[derive(Debug, Clone, Copy)]
pub struct Charge {
    pub tokens: u64,
    pub cost_nanos: i64,
}

/// A request id as a header value.
fn id_header(id: uuid::Uuid) -> http::HeaderValue {
    http::HeaderValue::from_str(
        id.hyphenated()
            .encode_lower(&mut uuid::Uuid::encode_buffer()),
    )
    .expect("a UUID is a valid header value")
}

impl Default for RequestCtx {
    fn default() -> Self {
        RequestCtx::new()
    }
}

/// How the response is metered.
#[derive(Debug, Default)]
pub enum ResponseMeter {
    /// Not metered (no response yet, or an error status: zero tokens).
    #[default]
    None,
    /// A successful body that is neither JSON nor SSE (audio, images): estimated.
    Opaque,
    /// A JSON body (kept aside when small, scanned for its usage when large).
    Json(JsonMeter),
    /// An SSE stream.
    Sse(SseMeter),
}
