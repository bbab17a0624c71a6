//! Who acts ([`Actor`]) and the one place a command's outbox event and audit entry are
//! written ([`record`]), inside the command's transaction.

use sqlx::AnyConnection;

use aihub_store::audit::{self, Audit};
use aihub_store::developers::Developer;
use aihub_store::outbox;

use crate::Result;

/// Who runs a command.
#[derive(Debug, Clone, Copy)]
pub enum Actor<'a> {
    /// A developer acting on their own account (the JSON API or the portal).
    Developer {
        developer: &'a Developer,
        ip: Option<&'a str>,
    },
    /// An operator (a developer account with the admin role), from their client address.
    Operator { id: &'a str, ip: Option<&'a str> },
    /// The `aihub` command on the control-plane database (audited as `cli`).
    Cli,
    /// The service itself at start-up (audited under this name, e.g. `bootstrap`).
    System(&'static str),
}

impl<'a> Actor<'a> {
    /// A developer on their own account, address unknown.
    pub fn developer(developer: &'a Developer) -> Actor<'a> {
        Actor::Developer {
            developer,
            ip: None,
        }
    }

    /// Whether someone other than the account's owner acts (operator actions are audited).
    pub fn is_staff(&self) -> bool {
        !matches!(self, Actor::Developer { .. })
    }

    /// The audit log's `actor_id`: a developer id, or `cli`.
    pub fn id(&self) -> &'a str {
        match self {
            Actor::Developer { developer, .. } => &developer.id,
            Actor::Operator { id, .. } => id,
            Actor::Cli => "cli",
            Actor::System(name) => name,
        }
    }

    pub fn ip(&self) -> Option<&'a str> {
        match self {
            Actor::Developer { ip, .. } | Actor::Operator { ip, .. } => *ip,
            Actor::Cli | Actor::System(_) => None,
        }
    }
}

/// An outbox event (`api_key.created`, …) about a developer.
pub struct Event<'a> {
    pub kind: &'a str,
    pub developer_id: Option<&'a str>,
    pub data: serde_json::Value,
}

/// What an audit entry says: the action and its target.
pub struct Entry<'a> {
    pub action: &'a str,
    pub target_type: &'a str,
    pub target_id: &'a str,
    pub details: serde_json::Value,
}

/// Writes `event`, then `entry` (attributed to `by`), on the command's transaction. A command
/// whose transaction ends with a change-feed stamp calls this before that stamp.
pub async fn record(
    conn: &mut AnyConnection,
    by: &Actor<'_>,
    event: Option<Event<'_>>,
    entry: Option<Entry<'_>>,
) -> Result<()> {
    if let Some(e) = event {
        outbox::enqueue(&mut *conn, e.kind, e.developer_id, e.data).await?;
    }
    if let Some(e) = entry {
        let audit = Audit {
            actor_id: by.id(),
            action: e.action,
            target_type: e.target_type,
            target_id: e.target_id,
            details: e.details,
            ip: by.ip(),
        };
        audit::record(conn, &audit).await?;
    }
    Ok(())
}
