//! [`AppState`]: everything handlers share (store, config, plans, mailer, token signer,
//! throttles, metrics, the service layer with its gateway notifier), built once at start by
//! [`AppState::new`], which also runs the control-plane migrations, bootstraps the operator
//! account and starts the background jobs (throttle eviction, billing).

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;

use aihub_billing::Billing;
use aihub_control::{Control, Notifier};
use aihub_plans::PlanCatalog;
use aihub_store::developers;
use aihub_store::{migrations, settings, Store, StoreOptions};

use crate::config::{AdminConfig, ClickHouseConfig};
use crate::credentials::{Jwt, Passwords, Throttle};
use crate::email::Mailer;
use crate::error::AppError;
use crate::metrics::Metrics;

/// Why the admin API could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("database: {0}")]
    Store(#[from] aihub_store::StoreError),
    #[error("{0}")]
    Setup(String),
}

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

pub struct Inner {
    pub store: Store,
    /// The service layer (accounts, keys, …) over the same store, with the notifier and the
    /// metrics' event counter.
    pub control: Control,
    pub config: AdminConfig,
    /// The plans (`plans_file`, or built in).
    pub plans: PlanCatalog,
    pub mailer: Mailer,
    pub jwt: Jwt,
    pub passwords: Passwords,
    pub throttle: Throttle,
    pub metrics: Metrics,
    /// The usage database (`clickhouse`), when configured.
    pub usage: Option<UsageDb>,
    /// Billing, when the usage database is configured.
    pub billing: Option<Billing>,
    /// Wakes this node's webhook engine (when it runs one) after a request that may have
    /// written events.
    pub webhooks: Option<Arc<tokio::sync::Notify>>,
    /// Ticks when events may have been written (the portal's event streams re-read then).
    pub event_ticks: tokio::sync::broadcast::Sender<()>,
    /// Signs and checks what the gateway forwards (`settings.internal_secret`).
    pub internal: aihub_apikey::internal::InternalSecret,
    /// This node's task engine, while it runs one.
    pub task_engine: Option<aihub_tasks::Engine>,
}

/// The ClickHouse usage database: its settings and a client (a pooled HTTP client, cheap to
/// clone).
pub struct UsageDb {
    pub config: ClickHouseConfig,
    pub client: clickhouse::Client,
}

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Inner {
    /// Tells the webhook engine events may be waiting (cheap: it then reads the backlog).
    pub fn wake_webhooks(&self) {
        if let Some(w) = &self.webhooks {
            w.notify_one();
        }
        let _ = self.event_ticks.send(());
    }

    /// Billing, or 503 `usage_unavailable` when no usage database is configured.
    pub fn billing(&self) -> Result<&Billing, AppError> {
        self.billing.as_ref().ok_or_else(|| {
            AppError::UsageUnavailable("no `clickhouse` section in the admin configuration".into())
        })
    }

    /// The usage database, or 503 `usage_unavailable` when none is configured.
    pub fn usage_db(&self) -> Result<&UsageDb, AppError> {
        self.usage.as_ref().ok_or_else(|| {
            AppError::UsageUnavailable("no `clickhouse` section in the admin configuration".into())
        })
    }
}

fn is_loopback_url(url: &str) -> bool {
    let host = url
        .split("://")
        .nth(1)
        .unwrap_or("")
        .split(['/', ':'])
        .next()
        .unwrap_or("");
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl AppState {
    /// Reads the plans, connects, migrates, loads or creates the JWT secret, and bootstraps
    /// the operator.
    pub async fn new(config: AdminConfig) -> Result<AppState, StartError> {
        let plans = config.plans.clone();
        let mut opts = StoreOptions::new(&config.database.url);
        opts.max_connections = config.database.max_connections;
        let store = Store::connect(&opts).await?;
        migrations::migrate(&store).await?;

        let secret = match config
            .auth
            .jwt_secret_env
            .as_deref()
            .and_then(|v| std::env::var(v).ok())
        {
            Some(s) if s.len() >= 32 => s.into_bytes(),
            Some(_) => {
                return Err(StartError::Setup(
                    "auth.jwt_secret_env: the secret needs ≥ 32 bytes".into(),
                ))
            }
            None => {
                let proposed =
                    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>());
                let stored = settings::get_or_init(&store, "jwt_secret", &proposed).await?;
                base64::engine::general_purpose::STANDARD
                    .decode(stored)
                    .map_err(|e| StartError::Setup(format!("stored jwt_secret: {e}")))?
            }
        };
        let passwords =
            Passwords::new(config.auth.argon2_memory_kib, config.auth.argon2_iterations)
                .map_err(StartError::Setup)?;
        let mailer = Mailer::new(&config.email).map_err(StartError::Setup)?;
        let notifier =
            match &config.redis {
                Some(r) => Notifier::redis(r.target().map_err(|e| {
                    StartError::Setup(format!("redis.{}: {}", e.key(), e.message()))
                })?),
                None => Notifier::disabled(),
            };
        let throttle = Throttle::new(
            config.auth.login_attempts_per_account_per_minute,
            config.auth.attempts_per_ip_per_minute,
        );
        let usage = config.clickhouse.as_ref().map(|ch| {
            // The gateways migrate too. In the background: a first start on a large existing
            // database backfills new rollups (about 25 s per 10M rows), and the accounts and
            // keys endpoints need not wait for it; a ClickHouse that is down only makes the
            // usage endpoints fail until it is back.
            let migrating = ch.clone();
            tokio::spawn(async move {
                if let Err(e) = aihub_usage::schema::migrate(&migrating).await {
                    tracing::warn!(error = %e, "ClickHouse schema not checked at start (`aihub migrate` applies it)");
                }
            });
            UsageDb {
                client: ch.client(),
                config: ch.clone(),
            }
        });
        let billing = config
            .clickhouse
            .as_ref()
            .map(|ch| Billing::new(store.clone(), ch, plans.clone(), config.billing.clone()));
        let metrics = Metrics::new();
        let engine = if config.webhooks.deliver {
            let sender =
                aihub_webhooks::Sender::new(config.webhooks.policy(), config.webhooks.timeout)
                    .map_err(StartError::Setup)?;
            let m = aihub_webhooks::Metrics::new(&metrics.registry);
            Some(aihub_webhooks::Engine::new(
                store.clone(),
                config.webhooks.clone(),
                sender,
                m,
            ))
        } else {
            None
        };
        let counter = metrics.events.clone();
        let internal_text = settings::get_or_init(
            &store,
            aihub_apikey::internal::SETTING,
            &aihub_apikey::internal::InternalSecret::generate_text(),
        )
        .await?;
        let internal = aihub_apikey::internal::InternalSecret::new(&internal_text)
            .ok_or_else(|| StartError::Setup("stored internal_secret is too short".into()))?;
        let files_dir = &config.tasks.files_dir;
        let files: Arc<dyn aihub_tasks::FileStore> = match &config.tasks.s3 {
            Some(s3) => Arc::new(
                aihub_tasks::S3Files::new(s3, files_dir.join("spool"))
                    .map_err(|e| StartError::Setup(format!("tasks.s3: {e}")))?,
            ),
            None => Arc::new(aihub_tasks::LocalDir::new(files_dir).map_err(|e| {
                StartError::Setup(format!("tasks.files_dir {}: {e}", files_dir.display()))
            })?),
        };
        let task_waker = aihub_tasks::Waker::default();
        let control = Control::new(store.clone(), config.control(&plans))
            .with_notifier(notifier)
            .with_events(Arc::new(move |kind| {
                counter.with_label_values(&[kind]).inc()
            }))
            .with_files(Arc::clone(&files))
            .with_task_waker(task_waker.clone());
        let task_engine = config.tasks.work.then(|| {
            aihub_tasks::Engine::start(
                store.clone(),
                files,
                config.tasks.clone(),
                internal.clone(),
                Arc::new(crate::csv::UsageExporter {
                    client: usage.as_ref().map(|u| u.client.clone()),
                }),
                aihub_tasks::Metrics::new(&metrics.registry),
                task_waker,
            )
        });
        let state = AppState(Arc::new(Inner {
            control,
            usage,
            billing,
            store,
            plans,
            jwt: Jwt::new(&secret),
            passwords,
            mailer,
            throttle,
            metrics,
            config,
            webhooks: engine.as_ref().map(|(e, _)| e.waker()),
            event_ticks: tokio::sync::broadcast::channel(16).0,
            internal,
            task_engine,
        }));
        state.bootstrap_admin().await?;
        let weak = Arc::downgrade(&state.0);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(s) => s.throttle.evict_idle(),
                    None => return,
                }
            }
        });
        if let (Some(b), true) = (&state.billing, state.config.billing.enabled) {
            tokio::spawn(billing_job(b.clone()));
        }
        if let Some((engine, notices)) = engine {
            aihub_webhooks::engine::spawn(engine).map_err(StartError::Setup)?;
            let mail = crate::notices::Mail {
                store: state.store.clone(),
                mailer: state.mailer.clone(),
                public_url: state.config.public_url.clone(),
                ticks: state.event_ticks.clone(),
            };
            tokio::spawn(crate::notices::run(mail, notices));
        }
        if matches!(
            state.config.email.transport,
            crate::config::EmailTransport::File { .. }
        ) && !is_loopback_url(&state.config.public_url)
        {
            tracing::warn!(
                public_url = %state.config.public_url,
                "email.transport is `file`: verification and reset mails are written to disk, not sent; configure SMTP for a public deployment"
            );
        }
        Ok(state)
    }

    /// Creates the configured operator account. An existing account with that email (someone
    /// may have registered it first) becomes the operator only on the configured terms: its
    /// password is replaced by the configured one, it is marked verified, and its sessions end,
    /// so whoever registered it cannot sign in as the operator.
    /// The plan of a bootstrapped operator: `enterprise` when the plans have it, else the
    /// default plan.
    fn operator_plan(&self) -> String {
        if self.plans.plans.contains_key("enterprise") {
            "enterprise".into()
        } else {
            self.plans.default_plan.clone()
        }
    }

    async fn bootstrap_admin(&self) -> Result<(), StartError> {
        let Some(b) = &self.config.bootstrap_admin else {
            return Ok(());
        };
        let existing = developers::by_email(&self.store, &b.email).await?;
        if existing.as_ref().is_some_and(|d| d.is_admin()) {
            return Ok(());
        }
        let password = std::env::var(&b.password_env).map_err(|_| {
            StartError::Setup(format!(
                "bootstrap_admin: ${} must hold the operator's password",
                b.password_env
            ))
        })?;
        aihub_control::accounts::check_password(&password, &b.email)
            .map_err(|e| StartError::Setup(format!("bootstrap_admin password {e}")))?;
        let hash = self
            .passwords
            .hash(password)
            .await
            .map_err(|e| StartError::Setup(e.to_string()))?;
        let bootstrapped = self
            .control
            .bootstrap_operator(&b.email, hash, self.operator_plan())
            .await
            .map_err(|e| match e {
                aihub_control::Error::Store(e) => StartError::Store(e),
                e => StartError::Setup(e.to_string()),
            })?;
        let Some(id) = bootstrapped else {
            return Ok(());
        };
        tracing::info!(developer_id = %id, "operator account bootstrapped");
        Ok(())
    }
}

/// The background billing pass (`billing.run_every`): drafts for closed periods, finalization
/// after the grace window. Every admin node runs it; the store's unique index makes concurrent
/// passes harmless.
async fn billing_job(billing: Billing) {
    let mut tick = tokio::time::interval(billing.config().run_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match billing.run_once(aihub_store::now_ms()).await {
            Ok(r) => {
                for (period, g) in &r.generated {
                    tracing::info!(%period, developers = g.developers, created = g.created, refreshed = g.refreshed, kept = g.kept, "invoices generated");
                }
                if r.finalized > 0 {
                    tracing::info!(finalized = r.finalized, "invoices finalized");
                }
            }
            Err(e) => tracing::warn!(error = %e, "billing pass failed; retried at the next run"),
        }
    }
}
