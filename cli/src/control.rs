//! The control-plane commands: `aihub admin` (the admin API), `aihub serve` (gateway and admin
//! API in one process), the operator's `aihub keys list|create|revoke` on the control-plane
//! database, and the control-plane half of `aihub migrate`.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};

use aihub_admin::keys::{CreateKeyRequest, ListQuery, Permissions};
use aihub_admin::{AdminConfig, AppState};
use aihub_store::developers;

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
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

/// Builds the state and serves until SIGTERM/SIGINT. Prints `listening on http://ADDR` (tests
/// and scripts read the port from it).
async fn run_admin(config: AdminConfig) -> anyhow::Result<()> {
    let listen = config.listen.clone();
    let state = AppState::new(config).await.context("admin API start-up")?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "admin API listening");
    println!("listening on http://{addr}");
    std::io::stdout().flush()?;
    aihub_admin::serve(listener, state, shutdown_signal()).await?;
    Ok(())
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
    let server = aihub_gateway::GatewayServer::build(gateway)?;
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

pub fn db_keys(admin: &Path, command: DbKeysCommand) -> anyhow::Result<()> {
    let config = AdminConfig::load(admin)?;
    runtime()?.block_on(async move {
        let state = AppState::new(config).await?;
        let developer = |who: String| {
            let state = state.clone();
            async move {
                let found = if who.contains('@') {
                    developers::by_email(&state.store, &who).await?
                } else {
                    developers::by_id(&state.store, &who).await.ok()
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
                let q = ListQuery {
                    include_revoked,
                    limit: Some(100),
                    after: None,
                };
                let list = aihub_admin::keys::list_for(&state, &dev.id, q)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                println!("{}", serde_json::to_string_pretty(&list.0.data)?);
            }
            DbKeysCommand::Create {
                developer: who,
                name,
                models,
                endpoints,
                expires_in_days,
            } => {
                let dev = developer(who).await?;
                let req = CreateKeyRequest {
                    name,
                    permissions: Some(Permissions { models, endpoints }),
                    rate_limit_rpm: None,
                    rate_limit_tpm: None,
                    expires_in_days: expires_in_days.filter(|d| *d != 0),
                    never_expires: expires_in_days == Some(0),
                    ip_allowlist: Vec::new(),
                };
                let created = aihub_admin::keys::create_key(&state, &dev.id, req, Some("cli"))
                    .await
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                println!("# New API key, shown once; store it now:\n{}", created.key);
                println!("{}", serde_json::to_string_pretty(&created.api_key)?);
            }
            DbKeysCommand::Revoke { key_id } => {
                let k = match aihub_admin::keys::revoke(&state, None, &key_id, Some(("cli", None)))
                    .await
                {
                    Ok(k) => k,
                    Err(aihub_admin::error::AppError::NotFound) => bail!("no live key `{key_id}`"),
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
