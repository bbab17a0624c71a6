//! The live routing table built from a checked configuration ([`crate::config::Checked`]):
//! model → [`Route`] (with its timeouts) → [`Upstream`] with its endpoints
//! ([`crate::endpoint`]), balancing cursor and health policy;
//! and the admin API's address for the Files and Batches calls ([`AdminPeer`]).
//!
//! A [`Runtime`] is immutable once built; a reload builds a new one and swaps it in, so a
//! request keeps the snapshot it started with.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use pingora_core::upstreams::peer::HttpPeer;

use crate::clock::now_ms;
use crate::config::{BaseUrl, Checked, Config, ConfigError, UpstreamSpec};
use crate::endpoint::{Endpoint, PeerRef};

/// Everything a request reads from configuration, swapped as a whole on reload.
#[derive(Debug)]
pub struct Runtime {
    pub routes: HashMap<String, Arc<Route>>,
    /// Routed model names, sorted (for `GET /v1/models`).
    pub models: Vec<String>,
    pub max_request_body_bytes: usize,
    pub request_body_timeout: Duration,
    /// Longest one write to the client may take (`server.response_write_timeout`).
    pub response_write_timeout: Duration,
    /// When this table was built, unix seconds (the `created` of `GET /v1/models`).
    pub loaded_at_unix: u64,
    pub pricing: aihub_usage::pricing::Pricing,
    /// Plans for limits and quotas (re-read on reload); built in without `limits.plans_file`.
    pub plans: Arc<aihub_plans::PlanCatalog>,
    /// Every path (after `/v1/`) some upstream serves: others are refused before the body.
    pub paths: std::collections::HashSet<String>,
    /// Where Files and Batches calls go (`control_plane.admin_url`); `None`: they get 404.
    pub admin: Option<AdminPeer>,
    /// Largest body forwarded to the admin API (`control_plane.max_upload_bytes`).
    pub max_upload_bytes: u64,
    /// Fraction off the price of batch items (`batches.discount`).
    pub batch_discount: rust_decimal::Decimal,
}

/// The admin API as the gateway forwards Files and Batches calls to it.
#[derive(Debug)]
pub struct AdminPeer {
    /// `control_plane.admin_url` as configured (for logs).
    pub url: String,
    pub peer: HttpPeer,
    /// `Host` header value.
    pub host: HeaderValue,
    /// Path prefix of the base URL (no trailing slash; usually empty).
    pub base_path: String,
}

/// Connect timeout of admin API connections.
const ADMIN_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest silence while writing to or reading from the admin API (a large upload or download
/// streams without pauses this long).
const ADMIN_IO_TIMEOUT: Duration = Duration::from_secs(300);
/// Idle admin connections are kept this long for reuse.
const ADMIN_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

impl AdminPeer {
    /// Resolves the admin API's host (the only I/O); errors say why, without the URL.
    pub fn build(url: &str, base: &BaseUrl) -> Result<AdminPeer, String> {
        let addr = crate::endpoint::resolve(&base.host, base.port)?[0];
        let mut peer = HttpPeer::new(addr, base.tls, base.host.clone());
        let o = &mut peer.options;
        o.connection_timeout = Some(ADMIN_CONNECT_TIMEOUT);
        o.total_connection_timeout = Some(ADMIN_CONNECT_TIMEOUT);
        o.read_timeout = Some(ADMIN_IO_TIMEOUT);
        o.write_timeout = Some(ADMIN_IO_TIMEOUT);
        o.idle_timeout = Some(ADMIN_IDLE_TIMEOUT);
        Ok(AdminPeer {
            url: url.to_owned(),
            peer,
            host: crate::endpoint::host_header(base)?,
            base_path: base.path.clone(),
        })
    }
}

/// A model clients may name.
#[derive(Debug)]
pub struct Route {
    pub model: String,
    pub upstream: Arc<Upstream>,
    /// Model name to send upstream, when it differs (alias rewrite).
    pub upstream_model: Option<String>,
    /// Routes' models tried in order when this route's upstream fails (`fallbacks`).
    pub fallbacks: Vec<String>,
    /// 4xx error codes that also move on to the next fallback (`fallback_on`).
    pub fallback_on: Vec<String>,
    /// Timeouts toward the upstream (`timeouts:`, else the upstream's).
    pub timeouts: Timeouts,
}

/// A route's timeouts, resolved against its upstream's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Connect limit applied by the request when it differs from the peers' own (the
    /// upstream's `connect_timeout`, raised to the longest of its routes').
    pub connect: Option<Duration>,
    /// Request sent → response header.
    pub first_byte: Duration,
    /// Between two body reads.
    pub idle: Duration,
    /// The whole exchange, retries and body included.
    pub total: Option<Duration>,
}

impl Route {
    /// The model name this route sends upstream.
    pub fn sent_model(&self) -> &str {
        self.upstream_model.as_deref().unwrap_or(&self.model)
    }
}

/// An upstream provider: equivalent endpoints, chosen by `balance:`, retried in turn.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    /// Credential header injected into every upstream request.
    pub auth: Option<(HeaderName, HeaderValue)>,
    /// Add `stream_options.include_usage` to streams (see the config key of the same name).
    pub inject_stream_usage: bool,
    /// Pass `OpenAI-Organization`/`OpenAI-Project` upstream and the provider account's headers
    /// back (see the config key of the same name); stripped when false.
    pub forward_account_headers: bool,
    /// Paths after `/v1/` this upstream serves (`POST`).
    pub paths: Vec<String>,
    /// When a request is sent again (`retry:`).
    pub retry: crate::config::RetryConfig,
    /// Headers set on every request (`headers:`), checked at load.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// How the first endpoint of a request is chosen (`balance:`).
    pub strategy: crate::balance::Strategy,
    /// Active health checks (`health.check`), run by [`crate::upkeep`].
    pub check: Option<crate::config::HealthCheckConfig>,
    /// Time between two resolutions of the endpoints' host names (zero: never again).
    pub dns_refresh: Duration,
    /// The connect timeout of the endpoints' peers.
    peer_connect_timeout: Duration,
    /// The weighted round-robin order of endpoints (`weights:`).
    sequence: Vec<usize>,
    next: AtomicUsize,
    failures_to_trip: u32,
    cooldown_ms: u64,
    slow_start_ms: u64,
}

impl Runtime {
    /// Builds the routing table from a checked configuration; resolves upstream host names
    /// (the only I/O here, and the only error left: everything else was checked and parsed
    /// by [`Config::check`]).
    pub fn build(config: &Config, checked: Checked, file: &Path) -> Result<Runtime, ConfigError> {
        let mut upstreams = HashMap::new();
        for (name, spec) in checked.upstreams {
            // Peers connect within the longest connect timeout of the upstream and its routes;
            // shorter ones are applied per request.
            let connect = config
                .routes
                .iter()
                .filter(|r| r.upstream == name)
                .filter_map(|r| r.timeouts.connect)
                .fold(spec.settings.connect_timeout, Duration::max);
            let upstream =
                Upstream::build(&name, spec, connect).map_err(|(key, message)| ConfigError {
                    file: file.to_owned(),
                    key: format!("upstreams.{name}{key}"),
                    message,
                })?;
            upstreams.insert(name, Arc::new(upstream));
        }
        let mut routes = HashMap::new();
        for r in &config.routes {
            // Routes to a left-out optional upstream are left out too.
            if let Some(upstream) = upstreams.get(r.upstream.as_str()) {
                let t = &r.timeouts;
                // Defaults: the upstream's own settings.
                let u = &config.upstreams[&r.upstream];
                let connect = t.connect.unwrap_or(u.connect_timeout);
                let route = Route {
                    model: r.model.clone(),
                    upstream: Arc::clone(upstream),
                    upstream_model: r.upstream_model.clone().filter(|m| *m != r.model),
                    fallbacks: r.fallbacks.clone(),
                    fallback_on: r.fallback_on.clone(),
                    timeouts: Timeouts {
                        connect: (connect != upstream.peer_connect_timeout).then_some(connect),
                        first_byte: t.first_byte.unwrap_or(u.read_timeout),
                        idle: t.idle.unwrap_or(u.read_timeout),
                        total: t.total,
                    },
                };
                routes.insert(r.model.clone(), Arc::new(route));
            }
        }
        let mut models: Vec<String> = routes.keys().cloned().collect();
        models.sort();
        let paths = routes
            .values()
            .flat_map(|r| r.upstream.paths.iter().cloned())
            .collect();
        let cp = config.control_plane.as_ref();
        let admin = match (cp.and_then(|c| c.admin_url.as_deref()), &checked.admin_url) {
            (Some(url), Some(base)) => {
                Some(AdminPeer::build(url, base).map_err(|message| ConfigError {
                    file: file.to_owned(),
                    key: "control_plane.admin_url".into(),
                    message,
                })?)
            }
            _ => None,
        };
        Ok(Runtime {
            admin,
            max_upload_bytes: cp.map_or(0, |c| c.max_upload_bytes),
            batch_discount: config.batches.discount,
            routes,
            models,
            paths,
            max_request_body_bytes: config.server.max_request_body_bytes,
            request_body_timeout: config.server.request_body_timeout,
            response_write_timeout: config.server.response_write_timeout,
            loaded_at_unix: now_ms() / 1000,
            plans: Arc::new(checked.plans),
            pricing: checked.pricing,
        })
    }

    /// Every upstream in use, once.
    pub fn upstreams(&self) -> impl Iterator<Item = &Upstream> {
        let mut seen = std::collections::HashSet::new();
        self.routes
            .values()
            .filter(move |r| seen.insert(Arc::as_ptr(&r.upstream)))
            .map(|r| &*r.upstream)
    }

    /// Every endpoint of every upstream, once (for health gauges).
    pub fn endpoints(&self) -> impl Iterator<Item = (&Upstream, &Endpoint)> {
        self.upstreams()
            .flat_map(|u| u.endpoints.iter().map(move |e| (u, e)))
    }

    /// Takes over the live state of the table this one replaces (a reload): each endpoint of
    /// the same upstream and URL keeps its health.
    pub fn carry_over(&self, old: &Runtime) {
        for upstream in self.upstreams() {
            let Some(previous) = old.upstreams().find(|u| u.name == upstream.name) else {
                continue;
            };
            for e in &upstream.endpoints {
                if let Some(p) = previous.endpoints.iter().find(|p| p.url == e.url) {
                    e.carry_over(p);
                }
            }
        }
    }
}

impl Upstream {
    /// Whether this upstream serves `path` (after `/v1/`).
    pub fn serves(&self, path: &str) -> bool {
        self.paths.iter().any(|p| p == path)
    }

    fn build(
        name: &str,
        spec: UpstreamSpec,
        connect_timeout: Duration,
    ) -> Result<Upstream, (String, String)> {
        let cfg = spec.settings;
        let n_endpoints = spec.endpoints.len();
        let mut endpoints = Vec::with_capacity(n_endpoints);
        for (i, (url, base)) in spec.endpoints.into_iter().enumerate() {
            let mut peer = Endpoint::template(&base);
            let o = &mut peer.options;
            o.connection_timeout = Some(connect_timeout);
            o.total_connection_timeout = Some(connect_timeout);
            o.read_timeout = Some(cfg.read_timeout);
            o.write_timeout = Some(cfg.read_timeout);
            o.idle_timeout = Some(cfg.idle_timeout);
            o.verify_cert = cfg.verify_tls;
            o.verify_hostname = cfg.verify_tls;
            o.ca = spec.tls.ca.clone();
            peer.client_cert_key = spec.tls.client.clone();
            // Connections made with other TLS files are not reused for these.
            peer.group_key = spec.tls.digest;
            let endpoint =
                Endpoint::build(url, base, peer).map_err(|m| (format!(".endpoints[{i}]"), m))?;
            endpoints.push(endpoint);
        }
        Ok(Upstream {
            name: name.to_owned(),
            endpoints,
            auth: spec.auth,
            inject_stream_usage: cfg.inject_stream_usage,
            forward_account_headers: cfg.forward_account_headers,
            paths: cfg.paths,
            headers: cfg
                .headers
                .iter()
                .filter_map(|(n, v)| {
                    Some((
                        HeaderName::try_from(n.to_ascii_lowercase()).ok()?,
                        HeaderValue::try_from(v.as_str()).ok()?,
                    ))
                })
                .collect(),
            strategy: cfg.balance,
            sequence: crate::balance::sequence(&if cfg.weights.is_empty() {
                vec![1; n_endpoints]
            } else {
                cfg.weights.clone()
            }),
            retry: cfg.retry,
            check: cfg.health.check,
            dns_refresh: cfg.dns.refresh,
            peer_connect_timeout: connect_timeout,
            next: AtomicUsize::new(0),
            failures_to_trip: cfg.health.failures,
            cooldown_ms: cfg.health.cooldown.as_millis() as u64,
            slow_start_ms: cfg.health.slow_start.as_millis() as u64,
        })
    }

    /// Endpoint indices in the order this request should try them: the one the `balance:`
    /// strategy chooses first (an endpoint in its slow start only for its share of the
    /// requests), then the others in turn, available endpoints before those skipped or ejected
    /// (still tried: failing closed helps nobody).
    pub fn attempt_order(&self) -> Vec<usize> {
        let n = self.endpoints.len();
        let tick = self.next.fetch_add(1, Ordering::Relaxed) as u64;
        let now = now_ms();
        let e = &self.endpoints;
        let available = |i: usize| e[i].health.is_available(now);
        let mut start = crate::balance::first(
            self.strategy,
            &self.sequence,
            tick,
            n,
            |i| &e[i].load,
            available,
        );
        let share = e[start].health.share_permille(now, self.slow_start_ms);
        if share < 1000 && crate::balance::draw_permille(tick) >= share {
            // Not this one's turn while it comes back: the next available one at full share.
            if let Some(other) = (1..n).map(|k| (start + k) % n).find(|&i| {
                available(i) && e[i].health.share_permille(now, self.slow_start_ms) == 1000
            }) {
                start = other;
            }
        }
        let rotated = (0..n).map(|i| (start + i) % n);
        let mut order = Vec::with_capacity(n);
        order.extend(rotated.clone().filter(|&i| i == start || available(i)));
        order.extend(rotated.filter(|&i| i != start && !available(i)));
        order
    }

    /// Records a failed request to endpoint `i` (connect error, timeout, 5xx); returns true
    /// when it just started being skipped.
    pub fn record_failure(&self, i: usize) -> bool {
        self.endpoints[i]
            .health
            .record_failure(now_ms(), self.failures_to_trip, self.cooldown_ms)
    }

    /// Records a failed connect to one address of endpoint `i`: that address is skipped for
    /// the cooldown, and the endpoint counts a failure.
    pub fn record_connect_failure(&self, i: usize, peer: &PeerRef) -> bool {
        let now = now_ms();
        self.endpoints[i].address_failed(peer, now, self.cooldown_ms);
        self.endpoints[i]
            .health
            .record_failure(now, self.failures_to_trip, self.cooldown_ms)
    }

    /// Records a successful exchange with endpoint `i`.
    pub fn record_success(&self, i: usize) {
        self.endpoints[i].health.record_success(now_ms());
    }

    /// How many connect failures in a row end a request: one per address of every endpoint.
    pub fn connect_budget(&self) -> usize {
        self.endpoints.iter().map(|e| e.addresses().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime(yaml: &str) -> Runtime {
        let file = Path::new("t.yaml");
        let c = Config::parse(yaml, file).unwrap();
        let checked = c.check(file).unwrap();
        Runtime::build(&c, checked, file).unwrap()
    }

    const TWO: &str = "upstreams:\n  u:\n    endpoints: [http://127.0.0.1:1/v1, http://127.0.0.1:2]\n    health: {failures: 2, cooldown: 1h}\nroutes:\n  - {model: a, upstream: u, upstream_model: real-a}\n  - {model: b, upstream: u, upstream_model: b}\n";

    #[test]
    fn routes_and_alias() {
        let rt = runtime(TWO);
        assert_eq!(rt.models, vec!["a", "b"]);
        assert_eq!(rt.routes["a"].upstream_model.as_deref(), Some("real-a"));
        // An alias to the same name is no rewrite at all.
        assert_eq!(rt.routes["b"].upstream_model, None);
        let u = &rt.routes["a"].upstream;
        assert_eq!(u.endpoints[0].base_path, "/v1");
        assert_eq!(u.endpoints[1].host, "127.0.0.1:2");
        assert_eq!(rt.endpoints().count(), 2);
    }

    #[test]
    fn round_robin_then_cooldown() {
        let rt = runtime(TWO);
        let u = &rt.routes["a"].upstream;
        let first: Vec<usize> = u.attempt_order();
        let second: Vec<usize> = u.attempt_order();
        assert_eq!(first, vec![0, 1]);
        assert_eq!(second, vec![1, 0]);
        assert!(!u.record_failure(0));
        assert!(u.record_failure(0)); // second failure trips the cooldown
        assert!(!u.endpoints[0].health.is_available(now_ms()));
        // Endpoint 0 now comes last whatever the round-robin start.
        for _ in 0..3 {
            assert_eq!(u.attempt_order(), vec![1, 0]);
        }
        u.record_success(0);
        assert!(u.endpoints[0].health.is_available(now_ms()));
    }

    #[test]
    fn route_timeouts_default_to_the_upstream_and_peers_connect_within_the_longest() {
        let rt = runtime("upstreams:\n  u:\n    endpoints: [http://127.0.0.1:1]\n    connect_timeout: 2s\n    read_timeout: 30s\nroutes:\n  - {model: a, upstream: u}\n  - {model: b, upstream: u, timeouts: {connect: 7s, first_byte: 5s, total: 1m}}\n  - {model: c, upstream: u, timeouts: {idle: 1s}}\n");
        let (a, b, c) = (&rt.routes["a"], &rt.routes["b"], &rt.routes["c"]);
        let s = Duration::from_secs;
        let peer = rt.routes["a"].upstream.endpoints[0].pick(0);
        assert_eq!(peer.peer().options.connection_timeout, Some(s(7)));
        assert_eq!(
            a.timeouts.connect,
            Some(s(2)),
            "shorter: applied per request"
        );
        assert_eq!(b.timeouts.connect, None, "the peers' own");
        assert_eq!((a.timeouts.first_byte, a.timeouts.idle), (s(30), s(30)));
        assert_eq!(
            (b.timeouts.first_byte, b.timeouts.total),
            (s(5), Some(s(60)))
        );
        assert_eq!((c.timeouts.first_byte, c.timeouts.idle), (s(30), s(1)));
    }

    #[test]
    fn an_endpoint_in_its_slow_start_takes_a_share_of_its_turns() {
        let rt = runtime("upstreams:\n  u:\n    endpoints: [http://127.0.0.1:1, http://127.0.0.1:2]\n    health: {failures: 1, cooldown: 1ms, slow_start: 1h}\nroutes:\n  - {model: a, upstream: u}\n");
        let u = &rt.routes["a"].upstream;
        u.record_failure(1);
        std::thread::sleep(Duration::from_millis(5));
        // Back, at a tenth of its share: about 5 % of first attempts instead of 50 %.
        let firsts = (0..2000).filter(|_| u.attempt_order()[0] == 1).count();
        assert!((40..=180).contains(&firsts), "{firsts}");
        assert_eq!(u.attempt_order().len(), 2, "still tried after the other");
    }

    #[test]
    fn optional_upstream_without_credential_is_left_out() {
        let rt = runtime("upstreams:\n  o:\n    endpoints: [https://127.0.0.1]\n    api_key_env: AIHUB_TEST_SURELY_UNSET\n    optional: true\nroutes:\n  - {model: gpt-4o, upstream: o}\n");
        assert!(rt.routes.is_empty());
    }
}
