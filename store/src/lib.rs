//! The AI Hub control-plane store: developer accounts, API keys, sessions, one-time email tokens,
//! the operator audit log, the event outbox, usage alerts, subscriptions and invoices, in SQLite (the embedded default)
//! or PostgreSQL.
//!
//! One set of SQL serves both databases through sqlx's `Any` driver: `$N` placeholders (which
//! SQLite accepts too), `TEXT` ids, `BIGINT` unix-millisecond timestamps, and states recorded as
//! the time they began (`email_verified_at`, `disabled_at`, `deleted_at`) instead of booleans, so
//! no type needs a per-database mapping. Only the migrations differ per dialect (auto-increment
//! columns).
//!
//! # Layout
//! - [`Store`] (this file): connecting, dialects, write transactions, [`StoreError`].
//! - [`migrations`] — numbered, re-runnable schema migrations recorded in `schema_migrations`.
//! - [`developers`] — accounts, profiles, operator changes, search.
//! - [`keys`] — the API key lifecycle (create, list, update, revoke, rotate).
//! - [`feed`] — the key change feed gateways follow, and last-used timestamps they report.
//! - [`auth`] — login sessions and single-use email tokens.
//! - [`audit`] — operator actions.
//! - [`outbox`] — events written in the same transaction as the change they describe; the
//!   developer's event history.
//! - [`webhooks`] — webhook endpoints (URL, event types, retries, signing secrets, state).
//! - [`deliveries`] — webhook deliveries and attempts: fan-out from the outbox, leases,
//!   results, redelivery, the delivery log.
//! - [`files`] — uploaded and generated files (the bytes live in the file store).
//! - [`tasks`] — async tasks and OpenAI batches: lifecycle, counts, task-level leases, the
//!   `task.*` events.
//! - [`queue`] — the durable item queue: fair claims with leases and heartbeats, results.
//! - [`settings`] — small named values shared by every admin node (e.g. the JWT secret).
//! - [`usage_alerts`] — monthly quota alerts raised by gateways, once per threshold.
//! - [`subscriptions`] — the plans each developer held over time (billing prorates on them).
//! - [`invoices`] — invoices, their lines and payments.
//! - [`payments`] — recording payments against open invoices (idempotent by provider reference,
//!   `billing.payment` outbox event).
//! - `testing` (feature `testing`): fresh SQLite and PostgreSQL databases for tests.

pub mod audit;
pub mod auth;
pub mod deliveries;
pub mod developers;
pub mod feed;
pub mod files;
pub mod invoices;
pub mod keys;
pub mod migrations;
pub mod outbox;
pub mod payments;
pub mod queue;
pub mod settings;
pub mod subscriptions;
pub mod tasks;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod usage_alerts;
pub mod webhooks;

use std::str::FromStr;
use std::sync::Once;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{Any, AnyPool, Executor, Transaction};

/// A store failure. Callers turn `Conflict`/`NotFound` into client errors and everything else
/// into a 500/503 without showing the message.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A uniqueness constraint refused the write (e.g. an email already registered).
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("not found")]
    NotFound,
    #[error("invalid database url: {0}")]
    Url(String),
    #[error("database: {0}")]
    Db(#[source] sqlx::Error),
    #[error("stored value is invalid: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::RowNotFound => StoreError::NotFound,
            sqlx::Error::Database(d) if d.is_unique_violation() => {
                StoreError::Conflict(d.message().to_owned())
            }
            _ => StoreError::Db(e),
        }
    }
}

impl StoreError {
    /// Whether the database could not be reached or cannot serve for now (as opposed to
    /// refusing a statement): the connection failed or broke (a handshake cut short by an
    /// address with no server behind it is a protocol error), or the server answers that it is
    /// shutting down, starting up or still a read-only standby (SQLSTATE classes 57P and 08,
    /// and 25006): what a failover looks like to clients, worth a retry.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Db(
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Protocol(_),
            ) => true,
            StoreError::Db(sqlx::Error::Database(d)) => d
                .code()
                .is_some_and(|c| c.starts_with("57P") || c.starts_with("08") || c == "25006"),
            _ => false,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Which SQL database is behind the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// `sqlite://path/to/file.db` (created when missing) or `postgres://user@host/db`.
    pub url: String,
    pub max_connections: u32,
    /// How long a caller waits for a pooled connection before failing.
    pub acquire_timeout: Duration,
}

impl StoreOptions {
    pub fn new(url: impl Into<String>) -> Self {
        StoreOptions {
            url: url.into(),
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// A connection pool to the control-plane database.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
}

static DRIVERS: Once = Once::new();

/// Why a PostgreSQL URL's connection is not protected against a machine in the middle, for a
/// host beyond this machine: TLS is verified only with `sslmode=verify-full` (or `verify-ca`);
/// `prefer` (the default) and `require` accept any certificate, and `prefer` falls back to
/// plaintext. Never echoes the URL (it may hold a password).
pub fn postgres_tls_warning(url: &str) -> Option<String> {
    use sqlx::postgres::{PgConnectOptions, PgSslMode};
    let opts = PgConnectOptions::from_str(url).ok()?;
    let host = opts.get_host();
    let local = opts.get_socket().is_some()
        || host.starts_with('/')
        || host == "localhost"
        || host
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    let mode = match opts.get_ssl_mode() {
        PgSslMode::VerifyFull | PgSslMode::VerifyCa => return None,
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
    };
    (!local).then(|| {
        format!(
            "host {host} is reached with sslmode={mode}, which does not verify the server: \
             add `sslmode=verify-full&sslrootcert=CA.pem` to the URL"
        )
    })
}

impl Store {
    /// Connects (lazily: the pool opens connections on first use, so a gateway can start while
    /// the database is down). SQLite files and their folder are created when missing and run
    /// in WAL mode. The control-plane database holds credentials (password and key hashes,
    /// session tokens), so a new file is created with mode 0600 (SQLite gives its `-wal` and
    /// `-shm` files the database file's mode) and a new folder 0700, whatever the umask.
    pub async fn connect(opts: &StoreOptions) -> Result<Store> {
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let dialect = dialect_of(&opts.url)?;
        let mut url = opts.url.clone();
        if dialect == Dialect::Sqlite {
            let path = sqlite_path(&url);
            let in_memory = path == ":memory:" || url.contains("mode=memory");
            if !in_memory && !url.contains("mode=ro") {
                create_private_file(std::path::Path::new(path))?;
            }
            if !url.contains("mode=") {
                url.push_str(if url.contains('?') { "&" } else { "?" });
                url.push_str("mode=rwc");
            }
        }
        if dialect == Dialect::Postgres {
            if let Some(warning) = postgres_tls_warning(&url) {
                tracing::warn!("control-plane database: {warning}");
            }
        }
        let connect =
            AnyConnectOptions::from_str(&url).map_err(|e| StoreError::Url(e.to_string()))?;
        let pool = AnyPoolOptions::new()
            .max_connections(opts.max_connections)
            .acquire_timeout(opts.acquire_timeout)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if dialect == Dialect::Sqlite {
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA busy_timeout = 5000").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                    }
                    Ok(())
                })
            })
            .connect_lazy_with(connect);
        Ok(Store { pool, dialect })
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Starts a transaction that will write. On SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`), so a transaction that reads before writing waits for other writers
    /// instead of failing when it upgrades its lock.
    pub async fn begin_write(&self) -> Result<Transaction<'static, Any>> {
        Ok(match self.dialect {
            Dialect::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Dialect::Postgres => self.pool.begin().await?,
        })
    }

    /// Checks the database answers (for `/readyz`).
    pub async fn ping(&self) -> Result<()> {
        self.pool.execute("SELECT 1").await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Creates a missing SQLite database file, empty (SQLite's form of a new database) and
/// owner-only, and its missing folders owner-only; an existing file is left as it is.
fn create_private_file(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let failed =
        |p: &std::path::Path, e: std::io::Error| StoreError::Url(format!("{}: {e}", p.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| failed(dir, e))?;
    }
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(failed(path, e)),
    }
}

fn dialect_of(url: &str) -> Result<Dialect> {
    if url.starts_with("sqlite:") {
        Ok(Dialect::Sqlite)
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Dialect::Postgres)
    } else {
        Err(StoreError::Url(
            "expected sqlite://PATH or postgres://…".into(),
        ))
    }
}

fn sqlite_path(url: &str) -> &str {
    let rest = url.trim_start_matches("sqlite:").trim_start_matches("//");
    rest.split('?').next().unwrap_or(rest)
}

/// The current time in unix milliseconds, the unit of every timestamp in the store.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A list column (models, endpoints, IP allowlist), stored as a JSON array of strings.
pub(crate) fn json_list(r: &sqlx::any::AnyRow, col: &str) -> Result<Vec<String>> {
    use sqlx::Row;
    let text: String = r.try_get(col)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
}

/// The stored form of a list column.
pub(crate) fn to_json(list: &[String]) -> String {
    serde_json::to_string(list).expect("a list of strings serializes")
}

/// A new id: `prefix` + a time-ordered UUID (v7) in 32 hex digits, e.g. `dev_0192…`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::now_v7().simple())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_cut_mid_handshake_is_unavailable() {
        let db = |e| StoreError::Db(e).is_unavailable();
        assert!(db(sqlx::Error::Protocol("unexpected response".into())));
        assert!(db(sqlx::Error::PoolTimedOut));
        assert!(!db(sqlx::Error::ColumnNotFound("x".into())));
        assert!(!StoreError::NotFound.is_unavailable());
    }

    #[test]
    fn dialects_and_paths() {
        assert_eq!(dialect_of("sqlite://data/a.db").unwrap(), Dialect::Sqlite);
        assert_eq!(dialect_of("postgres://u@h/db").unwrap(), Dialect::Postgres);
        assert!(dialect_of("mysql://x").is_err());
        assert_eq!(sqlite_path("sqlite://data/a.db?mode=rwc"), "data/a.db");
        assert_eq!(sqlite_path("sqlite:///abs/a.db"), "/abs/a.db");
        assert!(new_id("dev_").starts_with("dev_") && new_id("k").len() == 33);
    }

    #[test]
    fn an_unverified_postgres_beyond_this_machine_is_warned_about() {
        let warn = |u: &str| postgres_tls_warning(u);
        assert!(warn("postgres://u:secret@db.internal/aihub")
            .is_some_and(|w| w.contains("sslmode=prefer") && !w.contains("secret")));
        assert!(warn("postgres://u@10.0.0.5/aihub?sslmode=require").is_some());
        assert!(warn("postgres://u@db/aihub?sslmode=verify-full&sslrootcert=/ca.pem").is_none());
        assert!(warn("postgres://u@db/aihub?sslmode=verify-ca").is_none());
        for local in [
            "postgres://u@127.0.0.1/test",
            "postgres://u@localhost/test",
            "postgres://u@[::1]/test",
            "postgres://u@%2Fvar%2Frun%2Fpostgresql/test",
        ] {
            assert!(warn(local).is_none(), "{local}");
        }
    }

    /// The database, its `-wal` and `-shm` files and its folder are owner-only, whatever the
    /// umask (0022 here, as on most systems).
    #[tokio::test]
    async fn sqlite_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("data/nested/aihub.db");
        let store = Store::connect(&StoreOptions::new(format!("sqlite://{}", db.display())))
            .await
            .unwrap();
        migrations::migrate(&store).await.unwrap();
        let wal = db.with_extension("db-wal");
        let shm = db.with_extension("db-shm");
        assert!(wal.exists() && shm.exists(), "WAL mode files");
        for f in [&db, &wal, &shm] {
            assert_eq!(mode(f), 0o600, "{}", f.display());
        }
        assert_eq!(mode(&tmp.path().join("data")), 0o700);
        assert_eq!(mode(db.parent().unwrap()), 0o700);
        store.close().await;
    }
}
