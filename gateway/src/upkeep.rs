//! Background upkeep of the live endpoints, a pingora background service: active health checks
//! (`health.check`: a request to every endpoint each `interval`, ejecting and returning it) and
//! DNS re-resolution (`dns.refresh`: every address of the endpoint's host name, kept as they
//! were when resolution fails).
//!
//! It follows the routing table across reloads: each round reads the current table, so a new
//! endpoint is checked and resolved from the next round on. Checks go through the same
//! connector, addresses and TLS material as requests, so they test what requests would meet.
//! Nothing here is on the request path: requests read the outcome from atomics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use pingora_http::RequestHeader;

use crate::clock::now_ms;
use crate::config::HealthCheckConfig;
use crate::context::Shared;
use crate::endpoint::{self, Transition};
use crate::routing::Upstream;

/// Longest sleep between two rounds (a reload's new endpoints wait at most this long).
const MAX_SLEEP: Duration = Duration::from_secs(1);
/// Shortest sleep between two rounds.
const MIN_SLEEP: Duration = Duration::from_millis(20);

/// The upkeep service.
pub struct Upkeep {
    shared: Arc<Shared>,
}

impl Upkeep {
    pub fn new(shared: Arc<Shared>) -> Upkeep {
        Upkeep { shared }
    }
}

/// When an endpoint is next checked and resolved, and whether a check or resolution is running.
struct Slot {
    next_check: Instant,
    next_resolve: Instant,
    checking: Arc<AtomicBool>,
    resolving: Arc<AtomicBool>,
}

#[async_trait]
impl BackgroundService for Upkeep {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut slots: HashMap<(String, String), Slot> = HashMap::new();
        loop {
            let sleep = self.round(&mut slots);
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

impl Upkeep {
    /// Starts what is due; returns how long to sleep until the next thing is.
    fn round(&self, slots: &mut HashMap<(String, String), Slot>) -> Duration {
        let runtime = self.shared.runtime.load_full();
        let now = Instant::now();
        let mut next = now + MAX_SLEEP;
        let mut seen = std::collections::HashSet::new();
        for route in runtime.routes.values() {
            let upstream = &route.upstream;
            if !seen.insert(Arc::as_ptr(upstream)) {
                continue;
            }
            for (i, e) in upstream.endpoints.iter().enumerate() {
                let key = (upstream.name.clone(), e.url.clone());
                let slot = slots.entry(key).or_insert_with(|| Slot {
                    next_check: now,
                    next_resolve: now + upstream.dns_refresh,
                    checking: Arc::default(),
                    resolving: Arc::default(),
                });
                if let Some(check) = &upstream.check {
                    if slot.next_check <= now && !slot.checking.swap(true, Ordering::AcqRel) {
                        slot.next_check = now + check.interval;
                        let (shared, upstream) = (Arc::clone(&self.shared), Arc::clone(upstream));
                        let done = Arc::clone(&slot.checking);
                        tokio::spawn(async move {
                            run_check(&shared, &upstream, i).await;
                            done.store(false, Ordering::Release);
                        });
                    }
                    next = next.min(slot.next_check);
                }
                if e.name().is_some() && !upstream.dns_refresh.is_zero() {
                    if slot.next_resolve <= now && !slot.resolving.swap(true, Ordering::AcqRel) {
                        slot.next_resolve = now + upstream.dns_refresh;
                        let (shared, upstream) = (Arc::clone(&self.shared), Arc::clone(upstream));
                        let done = Arc::clone(&slot.resolving);
                        tokio::spawn(async move {
                            run_resolve(&shared, &upstream, i).await;
                            done.store(false, Ordering::Release);
                        });
                    }
                    next = next.min(slot.next_resolve);
                }
            }
        }
        // Endpoints gone with a reload are forgotten.
        slots.retain(|(u, url), _| {
            runtime
                .upstreams()
                .any(|x| x.name == *u && x.endpoints.iter().any(|e| e.url == *url))
        });
        next.saturating_duration_since(Instant::now())
            .max(MIN_SLEEP)
    }
}

/// Checks endpoint `i` once and records the result.
async fn run_check(shared: &Shared, upstream: &Upstream, i: usize) {
    let Some(cfg) = &upstream.check else { return };
    let e = &upstream.endpoints[i];
    let result = tokio::time::timeout(cfg.timeout, check(shared, upstream, i, cfg)).await;
    let (pass, detail) = match result {
        Ok(Ok(status)) => (cfg.passes(status), format!("status {status}")),
        Ok(Err(e)) => (false, e.to_string()),
        Err(_) => (false, format!("no answer within {:?}", cfg.timeout)),
    };
    let m = &shared.metrics.endpoints;
    let labels = [upstream.name.as_str(), e.url.as_str()];
    m.checks
        .with_label_values(&[labels[0], labels[1], if pass { "pass" } else { "fail" }])
        .inc();
    match e
        .health
        .record_check(pass, now_ms(), cfg.unhealthy, cfg.healthy)
    {
        Some(Transition::Ejected) => {
            m.ejections
                .with_label_values(&[labels[0], labels[1], "active"])
                .inc();
            tracing::warn!(upstream = %upstream.name, endpoint = %e.url, %detail, "endpoint ejected by failed health checks");
        }
        Some(Transition::Returned) => {
            tracing::info!(upstream = %upstream.name, endpoint = %e.url, "endpoint returned by passing health checks");
        }
        None if !pass => {
            tracing::debug!(upstream = %upstream.name, endpoint = %e.url, %detail, "health check failed");
        }
        None => {}
    }
}

/// Sends the check request to endpoint `i`; returns the status (the body is read and
/// dropped so the connection can be reused).
async fn check(
    shared: &Shared,
    upstream: &Upstream,
    i: usize,
    cfg: &HealthCheckConfig,
) -> Result<u16, Box<pingora_error::Error>> {
    let e = &upstream.endpoints[i];
    let address = e.pick(now_ms());
    let peer = address.peer();
    let mut path = String::with_capacity(e.base_path.len() + cfg.path.len() + 1);
    path.push_str(&e.base_path);
    path.push_str(&cfg.path);
    if !e.base_query.is_empty() {
        path.push('?');
        path.push_str(&e.base_query);
    }
    let body = Bytes::from(cfg.body.clone().unwrap_or_default());
    let mut h = RequestHeader::build(cfg.method.as_str(), path.as_bytes(), Some(6))?;
    h.insert_header(header::HOST, e.host.clone())?;
    h.insert_header(header::USER_AGENT, "aihub-health-check")?;
    for (name, value) in &upstream.headers {
        h.insert_header(name.clone(), value.clone())?;
    }
    if let Some((name, value)) = &upstream.auth {
        h.insert_header(name.clone(), value.clone())?;
    }
    if cfg.method == "POST" {
        h.insert_header(header::CONTENT_TYPE, "application/json")?;
        h.insert_header(header::CONTENT_LENGTH, body.len())?;
    }
    let (mut s, _) = shared.connector.get_http_session(peer).await?;
    s.set_read_timeout(Some(cfg.timeout));
    s.set_write_timeout(Some(cfg.timeout));
    s.write_request_header(Box::new(h)).await?;
    if !body.is_empty() {
        s.write_request_body(body, true).await?;
    }
    s.finish_request_body().await?;
    s.read_response_header().await?;
    let status = s.response_header().map_or(0, |h| h.status.as_u16());
    while !s.response_done() {
        if s.read_response_body().await?.is_none() {
            break;
        }
    }
    shared
        .connector
        .release_http_session(s, peer, peer.options.idle_timeout)
        .await;
    Ok(status)
}

/// Resolves endpoint `i`'s host name again and swaps in the addresses if they changed.
async fn run_resolve(shared: &Shared, upstream: &Upstream, i: usize) {
    let e = &upstream.endpoints[i];
    let Some((host, port)) = e.name() else { return };
    let host = host.to_owned();
    let resolved = tokio::task::spawn_blocking(move || endpoint::resolve(&host, port))
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
    let result = match resolved {
        Ok(addrs) if e.set_addresses(&addrs) => {
            let list: Vec<String> = e.addresses().list().collect();
            tracing::info!(upstream = %upstream.name, endpoint = %e.url, addresses = ?list, "endpoint addresses changed");
            "changed"
        }
        Ok(_) => "unchanged",
        Err(error) => {
            tracing::warn!(upstream = %upstream.name, endpoint = %e.url, %error, "resolution failed; keeping the known addresses");
            "failed"
        }
    };
    shared
        .metrics
        .endpoints
        .resolutions
        .with_label_values(&[upstream.name.as_str(), e.url.as_str(), result])
        .inc();
}
