//! Numbered control-plane schema migrations, recorded in `schema_migrations` and safe to run
//! again (each runs once, in its own transaction; concurrent starters are serialized by an
//! advisory lock on PostgreSQL and by the write lock on SQLite).
//!
//! The SQL is shared by both dialects except for `{serial}` (an auto-increment primary key),
//! rewritten per dialect. A migration is never edited once released: add the next number.
//!
//! Conventions of the schema: ids are `TEXT` (`dev_…`, `key_…`), times are `BIGINT` unix
//! milliseconds, a state is the time it began (`NULL` = not in that state), lists and free-form
//! details are JSON text. Usage records are not here: they live in ClickHouse.

use sqlx::Executor;

use crate::{now_ms, Dialect, Result, Store};

/// One migration: its number, a name, and its statements.
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub statements: &'static [&'static str],
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[V1, V2, V3, V4, V5];

const V1: Migration = Migration {
    version: 1,
    name: "accounts_keys_outbox",
    statements: &[
        // Plans and billing periods are filled by the billing issue; the table exists so that a
        // developer's plan history has a home from the first release.
        "CREATE TABLE IF NOT EXISTS developers (
            id TEXT PRIMARY KEY,
            email TEXT NOT NULL,
            password_hash TEXT NOT NULL,
            full_name TEXT NOT NULL,
            company_name TEXT,
            developer_type TEXT NOT NULL,
            role TEXT NOT NULL DEFAULT 'developer',
            plan TEXT NOT NULL DEFAULT 'free',
            api_quota_limit BIGINT,
            api_rate_limit BIGINT,
            stripe_customer_id TEXT,
            email_verified_at BIGINT,
            disabled_at BIGINT,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL
        )",
        "CREATE UNIQUE INDEX IF NOT EXISTS developers_email ON developers (email)",
        "CREATE INDEX IF NOT EXISTS developers_created ON developers (created_at)",
        "CREATE TABLE IF NOT EXISTS subscriptions (
            id TEXT PRIMARY KEY,
            developer_id TEXT NOT NULL REFERENCES developers (id),
            plan TEXT NOT NULL,
            status TEXT NOT NULL,
            current_period_start BIGINT NOT NULL,
            current_period_end BIGINT NOT NULL,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL
        )",
        "CREATE INDEX IF NOT EXISTS subscriptions_developer ON subscriptions (developer_id)",
        // `change_seq` orders the key change feed (see `feed`); a key row is never deleted, only
        // marked `deleted_at`, so the feed can tell gateways to drop it.
        "CREATE TABLE IF NOT EXISTS api_keys (
            id TEXT PRIMARY KEY,
            developer_id TEXT NOT NULL REFERENCES developers (id),
            name TEXT NOT NULL,
            key_hash TEXT NOT NULL,
            key_prefix TEXT NOT NULL,
            models TEXT NOT NULL,
            endpoints TEXT NOT NULL,
            ip_allowlist TEXT NOT NULL,
            rate_limit_rpm BIGINT,
            expires_at BIGINT,
            disabled_at BIGINT,
            deleted_at BIGINT,
            rotated_to TEXT,
            last_used_at BIGINT,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL,
            change_seq BIGINT NOT NULL
        )",
        "CREATE UNIQUE INDEX IF NOT EXISTS api_keys_hash ON api_keys (key_hash)",
        "CREATE INDEX IF NOT EXISTS api_keys_developer ON api_keys (developer_id, created_at)",
        "CREATE INDEX IF NOT EXISTS api_keys_change ON api_keys (change_seq, id)",
        "CREATE TABLE IF NOT EXISTS change_counters (
            name TEXT PRIMARY KEY,
            value BIGINT NOT NULL
        )",
        "INSERT INTO change_counters (name, value) VALUES ('keys', 0) ON CONFLICT (name) DO NOTHING",
        "CREATE TABLE IF NOT EXISTS sessions (
            id TEXT PRIMARY KEY,
            developer_id TEXT NOT NULL REFERENCES developers (id),
            created_at BIGINT NOT NULL,
            expires_at BIGINT NOT NULL,
            revoked_at BIGINT,
            ip TEXT,
            user_agent TEXT
        )",
        "CREATE INDEX IF NOT EXISTS sessions_developer ON sessions (developer_id)",
        "CREATE TABLE IF NOT EXISTS email_tokens (
            token_hash TEXT PRIMARY KEY,
            developer_id TEXT NOT NULL REFERENCES developers (id),
            purpose TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            expires_at BIGINT NOT NULL,
            used_at BIGINT
        )",
        "CREATE INDEX IF NOT EXISTS email_tokens_developer ON email_tokens (developer_id, purpose)",
        "CREATE TABLE IF NOT EXISTS audit_log (
            id {serial},
            at BIGINT NOT NULL,
            actor_id TEXT NOT NULL,
            action TEXT NOT NULL,
            target_type TEXT NOT NULL,
            target_id TEXT NOT NULL,
            details TEXT NOT NULL,
            ip TEXT
        )",
        "CREATE INDEX IF NOT EXISTS audit_log_target ON audit_log (target_id)",
        // The outbox: webhook delivery (a later issue) reads undispatched rows in id order.
        "CREATE TABLE IF NOT EXISTS outbox (
            id {serial},
            event_id TEXT NOT NULL,
            event_type TEXT NOT NULL,
            developer_id TEXT,
            payload TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            dispatched_at BIGINT
        )",
        "CREATE UNIQUE INDEX IF NOT EXISTS outbox_event ON outbox (event_id)",
        "CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (dispatched_at, id)",
        "CREATE TABLE IF NOT EXISTS webhook_configs (
            id TEXT PRIMARY KEY,
            developer_id TEXT NOT NULL REFERENCES developers (id),
            url TEXT NOT NULL,
            secret_key TEXT NOT NULL,
            events TEXT NOT NULL,
            disabled_at BIGINT,
            retry_count BIGINT NOT NULL DEFAULT 3,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL
        )",
        "CREATE INDEX IF NOT EXISTS webhook_configs_developer ON webhook_configs (developer_id)",
        "CREATE TABLE IF NOT EXISTS async_tasks (
            id TEXT PRIMARY KEY,
            developer_id TEXT NOT NULL REFERENCES developers (id),
            task_type TEXT NOT NULL,
            status TEXT NOT NULL,
            input_data TEXT NOT NULL,
            result_data TEXT,
            error_message TEXT,
            progress BIGINT NOT NULL DEFAULT 0,
            started_at BIGINT,
            completed_at BIGINT,
            created_at BIGINT NOT NULL
        )",
        "CREATE INDEX IF NOT EXISTS async_tasks_developer ON async_tasks (developer_id, created_at)",
        "CREATE INDEX IF NOT EXISTS async_tasks_status ON async_tasks (status, created_at)",
        "CREATE TABLE IF NOT EXISTS settings (
            name TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )",
    ],
};

const V2: Migration = Migration {
    version: 2,
    name: "limits_quotas_alerts",
    // Plain `ADD COLUMN` (SQLite has no `IF NOT EXISTS` for columns): the migration runs
    // once, in one transaction (DDL is transactional on both databases), so a failed run
    // leaves nothing behind and the next start runs it whole.
    statements: &[
        // Tokens per minute for one key (`NULL`: the developer's or plan's limit).
        "ALTER TABLE api_keys ADD COLUMN rate_limit_tpm BIGINT",
        // Operator override of the plan's tokens per minute (`api_rate_limit` is requests
        // per minute, `api_quota_limit` tokens per month).
        "ALTER TABLE developers ADD COLUMN api_token_rate_limit BIGINT",
        // The developer's own cap on monthly overage spend, nano-USD (`NULL`: no cap).
        "ALTER TABLE developers ADD COLUMN monthly_spend_cap_nanos BIGINT",
        // One row per usage alert raised (developer, billing period `YYYY-MM`, threshold in
        // percent of the quota): the key makes every alert happen once, whichever gateway
        // node sees the threshold crossed. No foreign key: gateways may meter developers
        // declared in their YAML only.
        "CREATE TABLE IF NOT EXISTS usage_alerts (
            developer_id TEXT NOT NULL,
            period TEXT NOT NULL,
            threshold_pct BIGINT NOT NULL,
            used_tokens BIGINT NOT NULL,
            quota_tokens BIGINT NOT NULL,
            created_at BIGINT NOT NULL,
            PRIMARY KEY (developer_id, period, threshold_pct)
        )",
    ],
};

const V3: Migration = Migration {
    version: 3,
    name: "billing",
    // One transaction like V2. Money is `TEXT` holding an exact decimal (USD), read back with
    // `rust_decimal`: neither database's numeric type maps through the `Any` driver.
    statements: &[
        // V1's `subscriptions` was a placeholder nothing wrote; billing needs the history of
        // plans instead of one current row.
        "DROP TABLE IF EXISTS subscriptions",
        // A developer's plans over time: one row per plan held, `ended_at` NULL for the
        // current one. Billing splits a period at every change (proration).
        "CREATE TABLE subscriptions (
            id TEXT PRIMARY KEY,
            developer_id TEXT NOT NULL REFERENCES developers (id),
            plan TEXT NOT NULL,
            started_at BIGINT NOT NULL,
            ended_at BIGINT,
            changed_by TEXT,
            created_at BIGINT NOT NULL
        )",
        "CREATE INDEX subscriptions_developer ON subscriptions (developer_id, started_at)",
        "CREATE UNIQUE INDEX subscriptions_current ON subscriptions (developer_id) \
         WHERE ended_at IS NULL",
        "CREATE INDEX subscriptions_span ON subscriptions (started_at, ended_at)",
        // Every existing account has held its current plan since it was created.
        "INSERT INTO subscriptions (id, developer_id, plan, started_at, ended_at, changed_by, created_at) \
         SELECT 'sub_' || id, id, plan, created_at, NULL, NULL, created_at FROM developers",
        // One invoice per developer and billing period (`YYYY-MM`), except voided ones.
        // `subtotal` is exact; `total` is the subtotal rounded once to cents.
        "CREATE TABLE IF NOT EXISTS invoices (
            id TEXT PRIMARY KEY,
            developer_id TEXT NOT NULL REFERENCES developers (id),
            period TEXT NOT NULL,
            status TEXT NOT NULL,
            currency TEXT NOT NULL,
            subtotal TEXT NOT NULL,
            total TEXT NOT NULL,
            amount_paid TEXT NOT NULL,
            total_tokens BIGINT NOT NULL,
            included_tokens BIGINT NOT NULL,
            overage_tokens BIGINT NOT NULL,
            waived_tokens BIGINT NOT NULL,
            requests BIGINT NOT NULL,
            usage_cost TEXT NOT NULL,
            computed_at BIGINT NOT NULL,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL,
            finalized_at BIGINT,
            paid_at BIGINT,
            voided_at BIGINT,
            void_reason TEXT
        )",
        "CREATE UNIQUE INDEX IF NOT EXISTS invoices_one_per_period ON invoices (developer_id, period) \
         WHERE status <> 'void'",
        "CREATE INDEX IF NOT EXISTS invoices_period ON invoices (period, status)",
        "CREATE INDEX IF NOT EXISTS invoices_developer ON invoices (developer_id, period)",
        // An invoice's lines: a base fee per plan held in the period, overage per plan and model.
        "CREATE TABLE IF NOT EXISTS invoice_lines (
            invoice_id TEXT NOT NULL REFERENCES invoices (id),
            line_no BIGINT NOT NULL,
            kind TEXT NOT NULL,
            plan TEXT NOT NULL,
            model TEXT NOT NULL,
            description TEXT NOT NULL,
            starts_at BIGINT NOT NULL,
            ends_at BIGINT NOT NULL,
            quantity BIGINT NOT NULL,
            requests BIGINT NOT NULL,
            amount TEXT NOT NULL,
            PRIMARY KEY (invoice_id, line_no)
        )",
        // Payments received, by provider; `(provider, reference)` makes recording idempotent.
        "CREATE TABLE IF NOT EXISTS payments (
            id TEXT PRIMARY KEY,
            invoice_id TEXT NOT NULL REFERENCES invoices (id),
            developer_id TEXT NOT NULL,
            provider TEXT NOT NULL,
            reference TEXT NOT NULL,
            amount TEXT NOT NULL,
            currency TEXT NOT NULL,
            received_at BIGINT NOT NULL,
            recorded_by TEXT,
            created_at BIGINT NOT NULL,
            UNIQUE (provider, reference)
        )",
        "CREATE INDEX IF NOT EXISTS payments_invoice ON payments (invoice_id)",
    ],
};

const V4: Migration = Migration {
    version: 4,
    name: "webhooks",
    statements: &[
        // V1's `webhook_configs` was a placeholder nothing wrote.
        "DROP TABLE IF EXISTS webhook_configs",
        // A developer's webhook endpoints. `event_types` is a JSON list of exact names and
        // wildcards (`task.*`, `*`). `secret` signs every request (it must be readable to
        // sign); after a rotation `previous_secret` signs too until `previous_secret_until`.
        // `failing_since`: the first failed attempt of the current unbroken run of failures.
        "CREATE TABLE IF NOT EXISTS webhook_endpoints (
            id TEXT PRIMARY KEY,
            developer_id TEXT NOT NULL REFERENCES developers (id),
            url TEXT NOT NULL,
            description TEXT NOT NULL,
            event_types TEXT NOT NULL,
            max_retries BIGINT NOT NULL,
            secret TEXT NOT NULL,
            previous_secret TEXT,
            previous_secret_until BIGINT,
            disabled_at BIGINT,
            disabled_reason TEXT,
            failing_since BIGINT,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL,
            deleted_at BIGINT
        )",
        "CREATE INDEX IF NOT EXISTS webhook_endpoints_developer \
         ON webhook_endpoints (developer_id, created_at)",
        // One row per (endpoint, event): the event's body as sent, the attempts made, when
        // the next is due (`NULL`: finished) and which worker holds it until when (a lease:
        // a worker that dies leaves rows others take over once it expires).
        "CREATE TABLE IF NOT EXISTS webhook_deliveries (
            id TEXT PRIMARY KEY,
            endpoint_id TEXT NOT NULL REFERENCES webhook_endpoints (id),
            developer_id TEXT NOT NULL,
            event_id TEXT NOT NULL,
            event_type TEXT NOT NULL,
            payload TEXT NOT NULL,
            status TEXT NOT NULL,
            attempts BIGINT NOT NULL,
            max_attempts BIGINT NOT NULL,
            next_attempt_at BIGINT,
            lease_until BIGINT,
            lease_owner TEXT,
            last_status_code BIGINT,
            last_error TEXT,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL,
            completed_at BIGINT
        )",
        "CREATE UNIQUE INDEX IF NOT EXISTS webhook_deliveries_once \
         ON webhook_deliveries (endpoint_id, event_id)",
        "CREATE INDEX IF NOT EXISTS webhook_deliveries_due \
         ON webhook_deliveries (next_attempt_at) WHERE next_attempt_at IS NOT NULL",
        "CREATE INDEX IF NOT EXISTS webhook_deliveries_endpoint \
         ON webhook_deliveries (endpoint_id, created_at)",
        // Every attempt: when, the answer's status, latency and first 1 KiB, or the error.
        "CREATE TABLE IF NOT EXISTS webhook_attempts (
            id {serial},
            delivery_id TEXT NOT NULL,
            attempt BIGINT NOT NULL,
            started_at BIGINT NOT NULL,
            status_code BIGINT,
            latency_ms BIGINT NOT NULL,
            response_body TEXT NOT NULL,
            error TEXT
        )",
        "CREATE INDEX IF NOT EXISTS webhook_attempts_delivery \
         ON webhook_attempts (delivery_id, attempt)",
        // Event history by developer and type; the events waiting for fan-out (a handful, so
        // the engine's idle check is one index probe however long the history grows).
        "CREATE INDEX IF NOT EXISTS outbox_developer ON outbox (developer_id, id)",
        "CREATE INDEX IF NOT EXISTS outbox_undispatched ON outbox (id) WHERE dispatched_at IS NULL",
    ],
};

const V5: Migration = Migration {
    version: 5,
    name: "tasks_batches_files",
    statements: &[
        // V1's `async_tasks` was a placeholder nothing wrote.
        "DROP TABLE IF EXISTS async_tasks",
        // Uploaded and generated files. `location` is the object's key in the file store
        // (`DEVELOPER/FILE_ID`); the bytes never live in the database.
        "CREATE TABLE IF NOT EXISTS files (
            id TEXT PRIMARY KEY,
            developer_id TEXT NOT NULL REFERENCES developers (id),
            purpose TEXT NOT NULL,
            filename TEXT NOT NULL,
            bytes BIGINT NOT NULL,
            sha256 TEXT NOT NULL,
            location TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            expires_at BIGINT,
            deleted_at BIGINT
        )",
        "CREATE INDEX IF NOT EXISTS files_developer ON files (developer_id, created_at)",
        "CREATE INDEX IF NOT EXISTS files_expiring ON files (expires_at) \
         WHERE deleted_at IS NULL AND expires_at IS NOT NULL",
        // Async tasks and OpenAI batches: one lifecycle (OpenAI's statuses), the seed's task
        // statuses derived from it. `key_id` is the key a batch's items run as (never the key
        // itself). `stage_due_at` set = the task needs task-level work (validating its input,
        // running an export, finalizing), leased like items; `NULL` = nothing to do at task
        // level. Counts are kept current by the workers as items end.
        "CREATE TABLE IF NOT EXISTS tasks (
            id TEXT PRIMARY KEY,
            developer_id TEXT NOT NULL REFERENCES developers (id),
            key_id TEXT,
            kind TEXT NOT NULL,
            endpoint TEXT,
            status TEXT NOT NULL,
            input TEXT NOT NULL,
            metadata TEXT,
            input_file_id TEXT,
            output_file_id TEXT,
            error_file_id TEXT,
            total BIGINT NOT NULL,
            completed BIGINT NOT NULL,
            failed BIGINT NOT NULL,
            errors TEXT,
            error TEXT,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL,
            in_progress_at BIGINT,
            finalizing_at BIGINT,
            finished_at BIGINT,
            expires_at BIGINT NOT NULL,
            cancel_requested_at BIGINT,
            stage_due_at BIGINT,
            lease_owner TEXT,
            lease_until BIGINT
        )",
        "CREATE INDEX IF NOT EXISTS tasks_developer ON tasks (developer_id, created_at)",
        "CREATE INDEX IF NOT EXISTS tasks_stage_due ON tasks (stage_due_at) \
         WHERE stage_due_at IS NOT NULL",
        "CREATE INDEX IF NOT EXISTS tasks_unfinished ON tasks (expires_at) \
         WHERE finished_at IS NULL",
        // One row per request of a task: the request body, its state and its result line
        // (written once; `error` is a `{code, message}` JSON for an item that never got an
        // answer: key revoked, quota exhausted, batch expired). `next_at` set = runnable from then on (queued, or running under a
        // lease that a worker renews by heartbeats; an expired lease is taken over);
        // `NULL` = ended.
        "CREATE TABLE IF NOT EXISTS task_items (
            task_id TEXT NOT NULL,
            line BIGINT NOT NULL,
            developer_id TEXT NOT NULL,
            custom_id TEXT NOT NULL,
            body TEXT NOT NULL,
            status TEXT NOT NULL,
            attempts BIGINT NOT NULL,
            next_at BIGINT,
            lease_owner TEXT,
            lease_until BIGINT,
            result TEXT,
            error TEXT,
            finished_at BIGINT,
            PRIMARY KEY (task_id, line)
        )",
        "CREATE INDEX IF NOT EXISTS task_items_runnable ON task_items (developer_id, next_at) \
         WHERE next_at IS NOT NULL",
    ],
};

fn dialect_sql(sql: &str, dialect: Dialect) -> String {
    let serial = match dialect {
        Dialect::Sqlite => "INTEGER PRIMARY KEY AUTOINCREMENT",
        Dialect::Postgres => "BIGSERIAL PRIMARY KEY",
    };
    sql.replace("{serial}", serial)
}

/// Applies every migration not yet recorded; returns the versions applied now. On PostgreSQL
/// the whole run holds an advisory lock, so nodes starting together migrate one at a time.
pub async fn migrate(store: &Store) -> Result<Vec<i64>> {
    let postgres = store.dialect() == Dialect::Postgres;
    let mut conn = store.pool().acquire().await?;
    if postgres {
        conn.execute("SELECT pg_advisory_lock(7240310)").await?;
    }
    let result = migrate_on(&mut conn, store.dialect()).await;
    if postgres {
        // Unlock even after a failure; the connection returns to the pool.
        conn.execute("SELECT pg_advisory_unlock(7240310)").await?;
    }
    result
}

async fn migrate_on(conn: &mut sqlx::AnyConnection, dialect: Dialect) -> Result<Vec<i64>> {
    use sqlx::Connection;
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version BIGINT PRIMARY KEY,
            name TEXT NOT NULL,
            applied_at BIGINT NOT NULL
        )",
    )
    .await?;
    let mut applied = Vec::new();
    for m in MIGRATIONS {
        let mut tx = match dialect {
            Dialect::Sqlite => conn.begin_with("BEGIN IMMEDIATE").await?,
            Dialect::Postgres => conn.begin().await?,
        };
        let done: Option<(i64,)> =
            sqlx::query_as("SELECT version FROM schema_migrations WHERE version = $1")
                .bind(m.version)
                .fetch_optional(&mut *tx)
                .await?;
        if done.is_some() {
            continue;
        }
        for stmt in m.statements {
            tx.execute(dialect_sql(stmt, dialect).as_str()).await?;
        }
        sqlx::query(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
        )
        .bind(m.version)
        .bind(m.name)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(
            version = m.version,
            name = m.name,
            "control-plane migration applied"
        );
        applied.push(m.version);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_increase() {
        let mut last = 0;
        for m in MIGRATIONS {
            assert!(m.version > last, "migration {} out of order", m.version);
            last = m.version;
        }
    }

    #[test]
    fn serial_per_dialect() {
        assert!(dialect_sql("id {serial}", Dialect::Postgres).contains("BIGSERIAL"));
        assert!(dialect_sql("id {serial}", Dialect::Sqlite).contains("AUTOINCREMENT"));
    }
}
