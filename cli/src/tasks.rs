//! `aihub tasks list|show|cancel`: operators' view of async tasks and OpenAI batches in the
//! control-plane database (every developer's, or one's). A cancel is audited as `cli`.

use std::path::PathBuf;

use anyhow::{bail, Context};

use aihub_admin::AdminConfig;
use aihub_control::Actor;
use aihub_store::developers;
use aihub_store::outbox::rfc3339_ms;
use aihub_store::tasks::{self, Filter, Task};

#[derive(clap::Subcommand)]
pub enum TasksCommand {
    /// List tasks and batches, newest first.
    List {
        /// Only this developer's (email or id).
        #[arg(long)]
        developer: Option<String>,
        /// `validating`, `in_progress`, `finalizing`, `completed`, `failed`, `expired`,
        /// `cancelling` or `cancelled` (repeatable).
        #[arg(long)]
        status: Vec<String>,
        /// `openai_batch`, `batch_generate` or `usage_export` (repeatable).
        #[arg(long = "type")]
        kind: Vec<String>,
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long, default_value = "config/admin.yaml")]
        admin_config: PathBuf,
    },
    /// Show one task or batch.
    Show {
        id: String,
        #[arg(long, default_value = "config/admin.yaml")]
        admin_config: PathBuf,
    },
    /// Cancel a task or batch: queued items end now, running ones finish.
    Cancel {
        id: String,
        #[arg(long, default_value = "config/admin.yaml")]
        admin_config: PathBuf,
    },
}

const STATUSES: &[&str] = &[
    tasks::VALIDATING,
    tasks::IN_PROGRESS,
    tasks::FINALIZING,
    tasks::COMPLETED,
    tasks::FAILED,
    tasks::EXPIRED,
    tasks::CANCELLING,
    tasks::CANCELLED,
];
const KINDS: &[&str] = &[
    tasks::OPENAI_BATCH,
    tasks::BATCH_GENERATE,
    tasks::USAGE_EXPORT,
];

fn task_json(t: &Task) -> serde_json::Value {
    serde_json::json!({
        "id": t.id,
        "developer_id": t.developer_id,
        "key_id": t.key_id,
        "type": t.kind,
        "endpoint": t.endpoint,
        "status": t.status,
        "progress": t.progress(),
        "counts": {"total": t.total, "completed": t.completed, "failed": t.failed},
        "output_file_id": t.output_file_id,
        "error_file_id": t.error_file_id,
        "error": t.error,
        "created_at": rfc3339_ms(t.created_at),
        "finished_at": t.finished_at.map(rfc3339_ms),
        "expires_at": rfc3339_ms(t.expires_at),
    })
}

/// Checks values against a known list (clap's `value_parser` cannot borrow the constants).
fn known(
    what: &str,
    given: &[String],
    allowed: &[&'static str],
) -> anyhow::Result<Vec<&'static str>> {
    given
        .iter()
        .map(|g| {
            allowed
                .iter()
                .find(|a| **a == g.as_str())
                .copied()
                .with_context(|| format!("unknown {what} `{g}` (one of {})", allowed.join(", ")))
        })
        .collect()
}

pub fn run(command: TasksCommand) -> anyhow::Result<()> {
    let admin_config = match &command {
        TasksCommand::List { admin_config, .. }
        | TasksCommand::Show { admin_config, .. }
        | TasksCommand::Cancel { admin_config, .. } => admin_config.clone(),
    };
    let config = AdminConfig::load(&admin_config)?;
    crate::control::runtime()?.block_on(async move {
        let control = crate::control::open_control(&config).await?;
        match command {
            TasksCommand::List {
                developer,
                status,
                kind,
                limit,
                ..
            } => {
                let developer_id = match developer {
                    None => None,
                    Some(who) => {
                        let store = control.store();
                        let found = if who.contains('@') {
                            developers::by_email(store, &who).await?
                        } else {
                            developers::by_id(store, &who).await.ok()
                        };
                        Some(found.with_context(|| format!("no developer `{who}`"))?.id)
                    }
                };
                let statuses = known("status", &status, STATUSES)?;
                let kinds = known("type", &kind, KINDS)?;
                let list = control
                    .tasks(&Filter {
                        developer_id: developer_id.as_deref(),
                        kinds: &kinds,
                        statuses: &statuses,
                        before: None,
                        limit,
                    })
                    .await?;
                let list: Vec<_> = list.iter().map(task_json).collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            }
            TasksCommand::Show { id, .. } => match control.task(None, &id).await {
                Ok(t) => println!("{}", serde_json::to_string_pretty(&task_json(&t))?),
                Err(aihub_control::Error::NotFound) => bail!("no task or batch `{id}`"),
                Err(e) => return Err(e.into()),
            },
            TasksCommand::Cancel { id, .. } => {
                match control.cancel_task(&Actor::Cli, None, &id).await {
                    Ok(t) => println!(
                        "cancelling {} ({} of {} items ended)",
                        t.id,
                        t.completed + t.failed,
                        t.total
                    ),
                    Err(aihub_control::Error::NotFound) => bail!("no task or batch `{id}`"),
                    Err(aihub_control::Error::Conflict(m)) => bail!("{m}"),
                    Err(e) => return Err(e.into()),
                }
            }
        }
        anyhow::Ok(())
    })
}
