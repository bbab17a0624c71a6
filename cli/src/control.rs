//! The control-plane commands: `aihub admin` (the admin API), `aihub serve` (gateway and admin
//! API in one process), the operator's `aihub keys list|create|revoke` on the control-plane
//! database, and the control-plane half of `aihub migrate`.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};

use aihub_admin::{AdminConfig, AppState};
use aihub_control::keys::{CreateKey, ListKeys, Permissions};
use aihub_control::{Actor, Control, Notifier};
use aihub_store::developers;
use aihub_store::outbox::rfc3339_ms;

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("admin API shutting down");
}

/// Builds the state and serves until SIGTERM/SIGINT; SIGHUP reloads the listener's TLS
/// certificate. Prints `listening on http(s)://ADDR` (tests and scripts read the port from it).
async fn run_admin(config: AdminConfig) -> anyhow::Result<()> {
    let listen = config.listen;
    let front = aihub_admin::listener::Front::try_new(&config.server)?;
    let state = AppState::new(config).await.context("admin API start-up")?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, scheme = front.scheme(), "admin API listening");
    println!("listening on {}://{addr}", front.scheme());
    std::io::stdout().flush()?;
    tokio::spawn(reload_on_hangup(front.clone()));
    aihub_admin::serve(listener, front, state, shutdown_signal()).await?;
    Ok(())
}

/// SIGHUP: the listener's certificate and key are read again; a bad file is logged and the
/// previous pair keeps serving. (Without this handler SIGHUP would end the process.)
async fn reload_on_hangup(front: aihub_admin::listener::Front) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::error!("cannot listen for SIGHUP; the admin certificate is not reloaded");
        return;
    };
    while hup.recv().await.is_some() {
        match front.reload_tls() {
            Ok(Some(ck)) => tracing::info!(
                subject = %ck.subject(),
                not_after = %ck.not_after(),
                "admin listener certificate reloaded"
            ),
            Ok(None) => {
                tracing::info!("SIGHUP: the admin API has nothing to reload (no server.tls)")
            }
            Err(e) => {
                tracing::error!(error = %e, "admin certificate reload rejected; the previous certificate keeps serving")
            }
        }
    }
}

/// `aihub admin --config FILE`.
pub fn admin(config: &Path) -> anyhow::Result<()> {
    let config = AdminConfig::load(config)?;
    runtime()?.block_on(run_admin(config))
}

/// `aihub serve`: the admin API on its own runtime thread, the gateway on the main thread
/// (pingora owns its runtimes and signal handling; the process exits with it).
pub fn serve(gateway: &Path, admin: &Path) -> anyhow::Result<()> {
    let admin_config = AdminConfig::load(admin)?;
    let server = aihub_gateway::GatewayServer::build(gateway, false)?;
    let rt = runtime()?;
    std::thread::Builder::new()
        .name("admin-api".into())
        .spawn(move || {
            if let Err(e) = rt.block_on(run_admin(admin_config)) {
                tracing::error!(error = format!("{e:#}"), "admin API stopped");
                std::process::exit(1);
            }
        })?;
    server.run_forever()
}

/// Control-plane migrations (also run by the admin API at start).
pub fn migrate(admin: &Path) -> anyhow::Result<()> {
    let config = AdminConfig::load(admin)?;
    runtime()?.block_on(async {
        let store =
            aihub_store::Store::connect(&aihub_store::StoreOptions::new(&config.database.url))
                .await?;
        let applied = aihub_store::migrations::migrate(&store).await?;
        println!(
            "control plane at {}: applied {applied:?} (schema at version {})",
            redact(&config.database.url),
            aihub_store::migrations::MIGRATIONS
                .last()
                .map_or(0, |m| m.version)
        );
        anyhow::Ok(())
    })
}

/// A database URL without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
            None => url.to_owned(),
        },
        _ => url.to_owned(),
    }
}

/// Operator key commands against the control-plane database.
#[derive(clap::Subcommand)]
pub enum DbKeysCommand {
    /// List a developer's keys (never the keys themselves).
    List {
        /// Developer email or id.
        #[arg(long)]
        developer: String,
        #[arg(long)]
        include_revoked: bool,
    },
    /// Create a key for a developer; prints the key once.
    Create {
        #[arg(long)]
        developer: String,
        #[arg(long)]
        name: String,
        #[arg(long = "model", default_values_t = vec!["*".to_owned()])]
        models: Vec<String>,
        #[arg(long = "endpoint", default_values_t = vec!["*".to_owned()])]
        endpoints: Vec<String>,
        /// Days until expiry; default the platform's; 0 = never.
        #[arg(long)]
        expires_in_days: Option<i64>,
    },
    /// Revoke a key by id (every gateway refuses it within a second).
    Revoke { key_id: String },
}

/// The service layer over the configured database, without the admin server's start-up: no
/// migrations (the schema must be current: `aihub migrate`), no operator bootstrap, no
/// background jobs. Gateways are nudged through Redis when configured.
pub(crate) async fn open_control(config: &AdminConfig) -> anyhow::Result<Control> {
    let mut opts = aihub_store::StoreOptions::new(&config.database.url);
    opts.max_connections = config.database.max_connections;
    let store = aihub_store::Store::connect(&opts)
        .await
        .with_context(|| format!("control-plane database {}", redact(&config.database.url)))?;
    let notifier = match &config.redis {
        Some(r) => Notifier::redis(
            r.target()
                .map_err(|e| anyhow::anyhow!("redis.{}: {}", e.key(), e.message()))?,
        ),
        None => Notifier::disabled(),
    };
    Ok(Control::new(store, config.control(&config.plans)).with_notifier(notifier))
}

/// A key row as the commands print it: never the key, never its hash.
fn key_json(k: &aihub_store::keys::ApiKey) -> serde_json::Value {
    serde_json::json!({
        "id": k.id,
        "name": k.name,
        "prefix": k.key_prefix,
        "permissions": { "models": k.models, "endpoints": k.endpoints },
        "rate_limit_rpm": k.rate_limit_rpm,
        "rate_limit_tpm": k.rate_limit_tpm,
        "ip_allowlist": k.ip_allowlist,
        "expires_at": k.expires_at.map(rfc3339_ms),
        "status": key_status(k),
        "created_at": rfc3339_ms(k.created_at),
        "last_used_at": k.last_used_at.map(rfc3339_ms),
        "rotated_to": k.rotated_to,
    })
}

fn key_status(k: &aihub_store::keys::ApiKey) -> &'static str {
    if k.deleted_at.is_some() {
        "revoked"
    } else if k.expires_at.is_some_and(|e| e <= aihub_store::now_ms()) {
        "expired"
    } else if k.disabled_at.is_some() {
        "disabled"
    } else {
        "active"
    }
}

pub fn db_keys(admin: &Path, command: DbKeysCommand) -> anyhow::Result<()> {
    let config = AdminConfig::load(admin)?;
    runtime()?.block_on(async move {
        let control = open_control(&config).await?;
        let store = control.store().clone();
        let developer = |who: String| {
            let store = store.clone();
            async move {
                let found = if who.contains('@') {
                    developers::by_email(&store, &who).await?
                } else {
                    developers::by_id(&store, &who).await.ok()
                };
                found.with_context(|| format!("no developer `{who}`"))
            }
        };
        match command {
            DbKeysCommand::List {
                developer: who,
                include_revoked,
            } => {
                let dev = developer(who).await?;
                let q = ListKeys {
                    include_revoked,
                    limit: Some(100),
                    after: None,
                };
                let page = control.list_keys(&dev.id, q).await?;
                let list: Vec<_> = page.keys.iter().map(key_json).collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            }
            DbKeysCommand::Create {
                developer: who,
                name,
                models,
                endpoints,
                expires_in_days,
            } => {
                let dev = developer(who).await?;
                let req = CreateKey {
                    name,
                    permissions: Some(Permissions { models, endpoints }),
                    rate_limit_rpm: None,
                    rate_limit_tpm: None,
                    expires_in_days: expires_in_days.filter(|d| *d != 0),
                    never_expires: expires_in_days == Some(0),
                    ip_allowlist: Vec::new(),
                };
                let created = control.create_key(&Actor::Cli, &dev.id, req).await?;
                println!("# New API key, shown once; store it now:\n{}", created.key);
                println!(
                    "{}",
                    serde_json::to_string_pretty(&key_json(&created.api_key))?
                );
            }
            DbKeysCommand::Revoke { key_id } => {
                let k = match control.revoke_key(&Actor::Cli, None, &key_id).await {
                    Ok(k) => k,
                    Err(aihub_control::Error::NotFound) => bail!("no live key `{key_id}`"),
                    Err(e) => bail!("{e:?}"),
                };
                println!("revoked {}", k.id);
            }
        }
        // Let the gateway nudge (Redis) go out before the runtime stops.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            super::redact("postgres://u:secret@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(super::redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(super::redact("sqlite://data/a.db"), "sqlite://data/a.db");
    }
}
