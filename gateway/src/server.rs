//! Assembles the pingora server: the proxy service on the configured listeners, the operations
//! listener (`/metrics`, `/healthz`, `/readyz`), the background reloader (SIGHUP), the
//! endpoints' upkeep ([`crate::upkeep`]), the usage pipeline and, with a `control_plane`
//! section, the key sync ([`crate::keysync`]).
//!
//! Reload re-reads the file, checks it and builds a new routing table and declared key set;
//! if any step fails, the old configuration keeps serving and
//! `aihub_config_reloads_total{result="error"}` rises. In-flight requests finish on the snapshot
//! they started with; endpoints present before and after keep their health.
//! Reload replaces only the YAML-declared keys, never synced ones. Listener, connection deadline
//! (`header_read_timeout`, `idle_timeout`), thread and `control_plane` changes need a restart
//! (except its `admin_url` and
//! `max_upload_bytes`, which are part of the routing table).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use async_trait::async_trait;
use http::Response;
use pingora_core::apps::http_app::{HttpServer, ServeHttp};
use pingora_core::connectors::http::Connector;
use pingora_core::connectors::ConnectorOptions;
use pingora_core::listeners::{L4BufferSettings, ListenerConfig};
use pingora_core::protocols::http::ServerSession;
use pingora_core::server::configuration::ServerConf;
use pingora_core::server::{Server, ShutdownWatch};
use pingora_core::services::background::{background_service, BackgroundService};
use pingora_core::services::listening::Service;

use aihub_usage::sink::ClickHouseConfig;
use aihub_usage::{PipelineMetrics, UsagePipeline};

use crate::config::ControlPlaneConfig;
use crate::config::{Config, ConfigError, Listen};
use crate::conn_deadline::{ConnDeadlines, Limits};
use crate::context::{is_ready, set_ready, Shared};
use crate::keys::KeySet;
use crate::keysync::KeySync;
use crate::listeners::{tls_settings, CertSlots, ClientPolicies, PreTlsProxyHeader, ProxyProtocol};
use crate::metrics::{LimitMetrics, Metrics};
use crate::proxy::Gateway;
use crate::routing::Runtime;
use pingora_core::apps::ServerApp;

/// Loads the configuration and builds everything it describes, without serving yet.
pub struct GatewayServer {
    pub server: Server,
    pub shared: Arc<Shared>,
    drain_delay: std::time::Duration,
}

/// Checks the configuration as `--check-config` does: parse, check, build routes (which
/// resolves upstream hosts). Returns the number of routes and keys.
pub fn check_config(path: &Path) -> Result<(usize, usize), ConfigError> {
    let (config, checked) = Config::load_checked(path)?;
    let runtime = Runtime::build(&config, checked, path)?;
    Ok((runtime.routes.len(), config.keys.len()))
}

/// The client connection's write buffer. pingora's default (1,460 bytes, one segment) sends a
/// response header and a small body in two writes as soon as they exceed it together (the
/// rate-limit headers alone are ~450 bytes); with 16 KiB a response up to that size leaves in
/// one write. Chunked bodies (streams) are still flushed chunk by chunk. The buffer's pages are
/// touched only as far as a response fills them.
const DOWNSTREAM_WRITE_BUFFER: usize = 16 * 1024;

impl GatewayServer {
    /// Builds the gateway of the file at `path`. With `upgrade`, takes the listening sockets
    /// of the gateway running with the same `server.pid_file` (see [`crate::lifecycle`]).
    pub fn build(path: &Path, upgrade: bool) -> Result<GatewayServer, ConfigError> {
        let (config, mut checked) = Config::load_checked(path)?;
        let declared = std::mem::take(&mut checked.keys);
        let runtime = Runtime::build(&config, checked, path)?;
        let keys = Arc::new(KeySet::new(
            config.keys.len(),
            config.control_plane.is_some(),
        ));
        keys.declared.replace_all(declared);

        raise_open_files_limit();
        let threads = match config.server.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let mut conf = ServerConf {
            threads,
            grace_period_seconds: Some(config.server.shutdown_grace_period.as_secs()),
            graceful_shutdown_timeout_seconds: Some(1),
            upstream_keepalive_pool_size: 1024,
            ..ServerConf::default()
        };
        let pid_file = config.server.pid_file();
        let upgrade_sock = config.server.upgrade_sock();
        conf.pid_file = pid_file.display().to_string();
        conf.upgrade_sock = upgrade_sock.display().to_string();
        let connector = Connector::new(Some(ConnectorOptions::from_server_conf(&conf)));
        let opt = pingora_core::server::configuration::Opt {
            upgrade,
            ..Default::default()
        };
        let mut server = Server::new_with_opt_and_conf(opt, conf);
        let cannot = |key: &str, message: String| ConfigError {
            file: path.to_owned(),
            key: key.into(),
            message,
        };
        if upgrade {
            let old = crate::lifecycle::old_process(&pid_file)
                .map_err(|m| cannot("server.pid_file", m))?;
            crate::lifecycle::ask_for_listeners(old, upgrade_sock);
        }
        // With `upgrade`, blocks until the old process has sent its listening sockets.
        server.bootstrap();
        crate::lifecycle::write_pid_file(&pid_file)
            .map_err(|e| cannot("server.pid_file", format!("{}: {e}", pid_file.display())))?;

        let metrics = Metrics::new();
        let (usage, pipeline) = match &config.metering {
            Some(m) => {
                let clickhouse = m.clickhouse.clone();
                let (sink, pipeline) =
                    aihub_usage::pipeline::open(m.clone(), PipelineMetrics::new(&metrics.registry))
                        .map_err(|e| ConfigError {
                            file: path.to_owned(),
                            key: "metering.wal_dir".into(),
                            message: format!("cannot open the usage WAL: {e}"),
                        })?;
                (Some(sink), Some(UsageService::new(pipeline, clickhouse)))
            }
            None => {
                tracing::warn!("no `metering` section: requests are NOT metered");
                (None, None)
            }
        };
        let (limits, limits_service) = match &config.limits {
            Some(l) => {
                let redis = match &l.redis {
                    Some(r) => {
                        // The URL may hold a password: errors never echo it.
                        let target = r.target().map_err(|e| ConfigError {
                            file: path.to_owned(),
                            key: format!("limits.redis.{}", e.key()),
                            message: e.message(),
                        })?;
                        Some(crate::limits::distributed::Distributed::new(
                            target, &r.prefix, r.timeout,
                        ))
                    }
                    None => None,
                };
                let (limits, queues) = crate::limits::Limits::new(
                    crate::limits::Settings {
                        default_max_tokens: l.default_max_tokens,
                    },
                    redis,
                    LimitMetrics::new(&metrics.registry, l.redis.is_some()),
                );
                // With ClickHouse, quotas wait for this month's usage before creating shared
                // counters (see `Limits::seeded`).
                limits.seeded.store(
                    config.metering.is_none(),
                    std::sync::atomic::Ordering::Relaxed,
                );
                let limits = Arc::new(limits);
                let service = crate::limits::service::LimitsService {
                    limits: Arc::clone(&limits),
                    clickhouse: config.metering.as_ref().map(|m| m.clickhouse.client()),
                    database_url: config
                        .control_plane
                        .as_ref()
                        .map(|c| c.database_url.clone()),
                    queues: std::sync::Mutex::new(Some(queues)),
                };
                (Some(limits), Some(service))
            }
            None => (None, None),
        };
        let shared = Arc::new(Shared {
            runtime: ArcSwap::from_pointee(runtime),
            keys: keys.clone(),
            metrics,
            connector,
            ready: false.into(),
            draining: false.into(),
            keys_ready: config.control_plane.is_none().into(),
            usage,
            limits,
            internal_secret: ArcSwapOption::empty(),
            clients: Arc::new(ArcSwap::from_pointee(ClientPolicies::new(
                &config.server.listen,
            ))),
        });

        let certs = CertSlots::load(&config.server.listen).map_err(|message| ConfigError {
            file: path.to_owned(),
            key: "server.listen".into(),
            message,
        })?;
        let app = ConnDeadlines {
            inner: Arc::new(pingora_proxy::http_proxy(
                &server.configuration,
                Gateway::new(Arc::clone(&shared)),
            )),
            limits: Limits {
                header: config.server.header_read_timeout,
                idle: config.server.idle_timeout,
            },
        };
        // The PROXY protocol's wrapper only where a listener needs it.
        if config.server.listen.iter().any(|l| l.proxy_protocol) {
            let wrapped = ProxyProtocol {
                inner: Arc::new(app),
                clients: Arc::clone(&shared.clients),
            };
            let mut proxy = Service::new("aihub gateway".into(), wrapped);
            add_proxy_listeners(&mut proxy, &config.server.listen, &certs, path)?;
            proxy
                .endpoints()
                .set_pre_tls_callback(Arc::new(PreTlsProxyHeader(Arc::clone(&shared.clients))));
            server.add_service(proxy);
        } else {
            let mut proxy = Service::new("aihub gateway".into(), app);
            add_proxy_listeners(&mut proxy, &config.server.listen, &certs, path)?;
            server.add_service(proxy);
        }
        let mut ops = Service::new(
            "aihub ops".into(),
            HttpServer::new_app(OpsApp {
                shared: Arc::clone(&shared),
            }),
        );
        ops.add_tcp(&config.server.ops_listen);
        ops.threads = Some(1);
        let reloader = background_service(
            "aihub reloader",
            Reloader {
                path: path.to_owned(),
                shared: Arc::clone(&shared),
                keys: Arc::clone(&keys),
                listen: config.server.listen.clone(),
                certs,
                control_plane: config.control_plane.clone(),
            },
        );
        if let Some(service) = limits_service {
            server.add_service(background_service("aihub limits", service));
        }
        server.add_service(ops);
        server.add_service(reloader);
        server.add_service(background_service(
            "aihub early exit",
            crate::lifecycle::EarlyExit {
                shared: Arc::clone(&shared),
            },
        ));
        server.add_service(background_service(
            "aihub upkeep",
            crate::upkeep::Upkeep::new(Arc::clone(&shared)),
        ));
        if let Some(cp) = &config.control_plane {
            let sync = KeySync::new(cp.clone(), Arc::clone(&shared), keys);
            server.add_service(background_service("aihub key sync", sync));
        }
        if let Some(usage) = pipeline {
            server.add_service(background_service("aihub usage pipeline", usage));
        }
        Ok(GatewayServer {
            server,
            shared,
            drain_delay: config.server.drain_delay,
        })
    }

    /// Serves until a signal stops the process: SIGTERM drains, SIGQUIT hands the listeners
    /// to a new process and drains, SIGINT stops at once (see [`crate::lifecycle`]).
    pub fn run_forever(self) -> ! {
        tracing::info!("gateway starting");
        let signals = crate::lifecycle::Signals {
            shared: Arc::clone(&self.shared),
            drain_delay: self.drain_delay,
        };
        self.server.run(pingora_core::server::RunArgs {
            shutdown_signal: Box::new(signals),
        });
        std::process::exit(0)
    }
}

/// Raises the soft limit on open files to the hard one (as Go programs and nginx's
/// `worker_rlimit_nofile` do): every client connection is a descriptor, and the usual soft limit
/// (1,024) would make the accept loop fail for everyone once that many clients are connected,
/// idle ones included. The hard limit stays the operator's (systemd `LimitNOFILE=`).
fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    let before = limit.current;
    // An unlimited hard limit: Linux's default `fs.nr_open`.
    let target = limit.maximum.unwrap_or(1 << 20);
    if before.is_some_and(|soft| soft < target) {
        limit.current = Some(target);
        match setrlimit(Resource::Nofile, limit) {
            Ok(()) => tracing::info!(from = ?before, to = target, "open files limit raised"),
            Err(e) => {
                tracing::warn!(error = %e, limit = ?before, "cannot raise the open files limit")
            }
        }
    }
}

/// The proxy listeners, TLS ones presenting their certificate slot, all with the 16 KiB
/// write buffer.
fn add_proxy_listeners<A: ServerApp + Send + Sync + 'static>(
    service: &mut Service<A>,
    listeners: &[Listen],
    certs: &CertSlots,
    path: &Path,
) -> Result<(), ConfigError> {
    for l in listeners {
        let mut listener = ListenerConfig::tcp(&l.addr)
            .l4_buffer(L4BufferSettings::default().write(DOWNSTREAM_WRITE_BUFFER));
        if let Some(slot) = certs.get(&l.addr) {
            let settings = tls_settings(l, slot).map_err(|e| ConfigError {
                file: path.to_owned(),
                key: "server.listen".into(),
                message: format!("{}: TLS set-up failed: {e}", l.addr),
            })?;
            listener = listener.tls(settings);
        }
        service.add_listener(listener);
    }
    Ok(())
}

/// `/metrics`, `/healthz`, `/readyz` on the operations listener.
struct OpsApp {
    shared: Arc<Shared>,
}

#[async_trait]
impl ServeHttp for OpsApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let (status, content_type, body) = match session.req_header().uri.path() {
            "/metrics" => {
                self.refresh_gauges();
                (
                    200,
                    "text/plain; version=0.0.4",
                    self.shared.metrics.render(),
                )
            }
            "/healthz" => (200, "text/plain", b"ok\n".to_vec()),
            "/readyz" => self.readiness(),
            _ => (404, "text/plain", b"not found\n".to_vec()),
        };
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .header("content-length", body.len())
            .body(body)
            .expect("valid response")
    }
}

impl OpsApp {
    /// Gauges derived from state are computed at scrape time, off the request path.
    fn refresh_gauges(&self) {
        let m = &self.shared.metrics;
        m.keys_loaded.set(self.shared.keys.len() as i64);
        let runtime = self.shared.runtime.load();
        let now = crate::clock::now_ms();
        let e = &m.endpoints;
        m.endpoint_healthy.reset();
        e.in_flight.reset();
        e.latency.reset();
        e.addresses.reset();
        for (upstream, endpoint) in runtime.endpoints() {
            let labels = [upstream.name.as_str(), endpoint.url.as_str()];
            m.endpoint_healthy
                .with_label_values(&labels)
                .set(endpoint.health.is_available(now) as i64);
            e.in_flight
                .with_label_values(&labels)
                .set(i64::from(endpoint.load.in_flight()));
            e.latency
                .with_label_values(&labels)
                .set(endpoint.load.ewma().as_secs_f64());
            e.addresses
                .with_label_values(&labels)
                .set(endpoint.addresses().len() as i64);
        }
    }

    /// `/readyz`: 200 once serving (and, with a control plane, once its keys were loaded),
    /// 503 otherwise; the body reports every upstream endpoint's state. Upstream health does
    /// not decide readiness: a provider's outage must not take every gateway node out of its
    /// load balancer (clients of other models would lose service too).
    fn readiness(&self) -> (u16, &'static str, Vec<u8>) {
        let reason = if is_ready(&self.shared) {
            None
        } else if !self.shared.keys_ready.load(Ordering::Relaxed) {
            Some("control-plane keys not loaded yet")
        } else {
            Some("not serving (starting or shutting down)")
        };
        let runtime = self.shared.runtime.load();
        let now = crate::clock::now_ms();
        let mut upstreams: Vec<serde_json::Value> = runtime
            .upstreams()
            .map(|u| {
                let endpoints: Vec<serde_json::Value> = u
                    .endpoints
                    .iter()
                    .map(|e| {
                        let state = if e.health.is_ejected() {
                            "ejected"
                        } else if !e.health.is_available(now) {
                            "cooling_down"
                        } else {
                            "healthy"
                        };
                        serde_json::json!({
                            "url": e.url,
                            "state": state,
                            "addresses": e.addresses().list().collect::<Vec<_>>(),
                            "in_flight": e.load.in_flight(),
                            "latency_ms": e.load.ewma().as_secs_f64() * 1e3,
                        })
                    })
                    .collect();
                serde_json::json!({"name": u.name, "endpoints": endpoints})
            })
            .collect();
        upstreams.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        let body = serde_json::json!({
            "ready": reason.is_none(),
            "reason": reason,
            "upstreams": upstreams,
        });
        let mut bytes = serde_json::to_vec_pretty(&body).expect("json serializes");
        bytes.push(b'\n');
        let status = if reason.is_none() { 200 } else { 503 };
        (status, "application/json", bytes)
    }
}

/// Runs the usage pipeline; applies ClickHouse migrations first, retrying while ClickHouse is
/// unreachable (records wait in the WAL meanwhile).
struct UsageService {
    pipeline: std::sync::Mutex<Option<UsagePipeline>>,
    clickhouse: ClickHouseConfig,
}

impl UsageService {
    fn new(pipeline: UsagePipeline, clickhouse: ClickHouseConfig) -> Self {
        UsageService {
            pipeline: std::sync::Mutex::new(Some(pipeline)),
            clickhouse,
        }
    }
}

#[async_trait]
impl BackgroundService for UsageService {
    async fn start(&self, shutdown: ShutdownWatch) {
        let Some(pipeline) = self.pipeline.lock().expect("not poisoned").take() else {
            return;
        };
        let clickhouse = self.clickhouse.clone();
        tokio::spawn(async move {
            let mut wait = std::time::Duration::from_millis(500);
            loop {
                match aihub_usage::schema::migrate(&clickhouse).await {
                    Ok(_) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "ClickHouse schema not ready; retrying");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(std::time::Duration::from_secs(10));
                    }
                }
            }
        });
        pipeline.run(shutdown).await;
    }
}

/// Reloads the configuration on SIGHUP; flips readiness on start and shutdown.
struct Reloader {
    path: PathBuf,
    shared: Arc<Shared>,
    keys: Arc<KeySet>,
    listen: Vec<Listen>,
    /// The TLS listeners' certificates, read again on each reload.
    certs: CertSlots,
    control_plane: Option<ControlPlaneConfig>,
}

impl Reloader {
    fn reload(&self) -> Result<(), ConfigError> {
        let served = self.keys.declared.table();
        let (config, mut checked) = Config::load_checked_reusing(&self.path, Some(served))?;
        let keys = std::mem::take(&mut checked.keys);
        let runtime = Runtime::build(&config, checked, &self.path)?;
        let moved = config.server.listen.len() != self.listen.len()
            || config
                .server
                .listen
                .iter()
                .zip(&self.listen)
                .any(|(new, old)| new.needs_restart_for(old));
        if moved {
            tracing::warn!(
                "server.listen changed: listeners (addresses, TLS on or off, HTTP/2) change only \
                 on restart; certificates and trusted proxies are reloaded"
            );
        }
        // Certificates first: if one fails, nothing of this reload is applied.
        let served = self
            .certs
            .reload(&config.server.listen)
            .map_err(|message| ConfigError {
                file: self.path.clone(),
                key: "server.listen".into(),
                message,
            })?;
        for (addr, ck) in served {
            tracing::info!(%addr, subject = %ck.subject(), not_after = %ck.not_after(), "listener certificate loaded");
        }
        self.shared
            .clients
            .store(Arc::new(ClientPolicies::new(&config.server.listen)));
        let restart = match (&config.control_plane, &self.control_plane) {
            (Some(new), Some(old)) => new.needs_restart_for(old),
            (new, old) => new.is_some() != old.is_some(),
        };
        if restart {
            tracing::warn!(
                "control_plane changed: it changes only on restart (except admin_url and \
                 max_upload_bytes)"
            );
        }
        // Endpoints kept across the reload keep their health.
        runtime.carry_over(&self.shared.runtime.load());
        self.shared.runtime.store(Arc::new(runtime));
        // Only the declared layer: keys synced from the control plane stay.
        self.keys.declared.replace_all(keys);
        Ok(())
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; reload disabled");
                set_ready(&self.shared, true);
                let _ = shutdown.changed().await;
                set_ready(&self.shared, false);
                return;
            }
        };
        set_ready(&self.shared, true);
        tracing::info!(config = %self.path.display(), "gateway ready");
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    let result = match self.reload() {
                        Ok(()) => {
                            tracing::info!(config = %self.path.display(), "configuration reloaded");
                            "ok"
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "configuration reload rejected; the previous configuration keeps serving");
                            "error"
                        }
                    };
                    self.shared.metrics.config_reloads.with_label_values(&[result]).inc();
                }
                _ = shutdown.changed() => {
                    set_ready(&self.shared, false);
                    return;
                }
            }
        }
    }
}
