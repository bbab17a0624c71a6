//! The control plane's service layer: typed commands and queries over the control-plane store
//! (`aihub-store`). Every command is one function that validates its input, opens and commits
//! its own transaction, and writes its outbox event and audit entry through one helper
//! ([`journal`]); after the commit it nudges gateways ([`notify::Notifier`]). The JSON API,
//! the portal pages and the `aihub` command all call it; it knows nothing of HTTP (its
//! failures are [`Error`], which the admin API maps to responses in one place).
//!
//! [`Control::new`] only wraps a [`Store`] and the rules ([`Config`]): it runs no migrations
//! and starts no background job, so a one-shot command can open it cheaply.
//!
//! # Layout
//! - [`accounts`] — registration, email verification, password reset and change, sessions,
//!   the owner's profile and spend cap; the field rules (email, password policy, names, USD).
//! - [`billing`] — billing actions: a developer's plan change (the subscription history
//!   follows in the same transaction), voiding an invoice, the audit entry of an operator's
//!   billing run.
//! - [`error`] — [`Error`] (invalid fields, forbidden, not found, conflict, store) and
//!   [`FieldError`].
//! - [`journal`] — [`Actor`] (who acts) and the one helper that writes a command's outbox event
//!   and audit entry inside its transaction.
//! - [`keys`] — API keys: create (the secret returned once), list, read, update, revoke,
//!   regenerate with a grace period; the key rules ([`keys::KeyRules`]: cap, lifetimes,
//!   expiry).
//! - [`notify`] — Redis pub/sub nudges to gateways after committed key changes.
//! - [`operators`] — operators' account commands (search, create, update: state, plan, role,
//!   overrides) and the audit log.
//! - [`tasks`] — files (streamed uploads under size and storage limits), OpenAI batches and
//!   the seed's async tasks: create, read, list, cancel, results.
//! - [`webhooks`] — webhook endpoints (secret shown once, rotation with a grace period, test
//!   events), the delivery log with redelivery, the event history.

pub mod accounts;
pub mod billing;
pub mod error;
pub mod journal;
pub mod keys;
pub mod notify;
pub mod operators;
pub mod tasks;
pub mod webhooks;

use std::sync::Arc;

use aihub_store::Store;

pub use error::{Error, FieldError, Result};
pub use journal::Actor;
pub use keys::KeyRules;
pub use notify::Notifier;

/// The rules the service enforces (from the admin configuration).
#[derive(Debug, Clone)]
pub struct Config {
    pub keys: KeyRules,
    pub accounts: accounts::AccountRules,
    /// The plans (`plans_file`, or built in).
    pub plans: aihub_plans::PlanCatalog,
    pub webhooks: webhooks::WebhookRules,
    /// Files, batches and tasks (the admin configuration's `tasks:` section).
    pub tasks: aihub_tasks::TasksConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            keys: KeyRules::default(),
            accounts: accounts::AccountRules::default(),
            plans: aihub_plans::PlanCatalog::builtin(),
            webhooks: webhooks::WebhookRules::default(),
            tasks: aihub_tasks::TasksConfig::default(),
        }
    }
}

/// Receives a fixed event name after a command committed (`key_created`, …), e.g. to count
/// it in a metric.
pub type EventSink = Arc<dyn Fn(&'static str) + Send + Sync>;

/// The service: cheap to clone (a store pool handle, the rules, the notifier).
#[derive(Clone)]
pub struct Control {
    store: Store,
    config: Arc<Config>,
    notifier: Notifier,
    events: Option<EventSink>,
    /// Where file bytes live; `None`: files, batches and tasks are refused.
    files: Option<Arc<dyn aihub_tasks::FileStore>>,
    /// Nudges this node's task engine after a task was created or cancelled.
    task_waker: Option<aihub_tasks::Waker>,
}

impl Control {
    /// Wraps an open (already migrated) store; starts nothing. Gateways are not nudged until
    /// a notifier is set ([`Control::with_notifier`]): they still see changes by polling.
    pub fn new(store: Store, config: Config) -> Control {
        Control {
            store,
            config: Arc::new(config),
            notifier: Notifier::disabled(),
            events: None,
            files: None,
            task_waker: None,
        }
    }

    /// Keeps file bytes in `files` (files, batches and tasks work from then on).
    pub fn with_files(mut self, files: Arc<dyn aihub_tasks::FileStore>) -> Control {
        self.files = Some(files);
        self
    }

    /// Nudges `waker` (this node's task engine) when tasks are created or cancelled.
    pub fn with_task_waker(mut self, waker: aihub_tasks::Waker) -> Control {
        self.task_waker = Some(waker);
        self
    }

    /// The file store, when files are enabled.
    pub fn file_store(&self) -> Option<&Arc<dyn aihub_tasks::FileStore>> {
        self.files.as_ref()
    }

    fn wake_tasks(&self) {
        if let Some(w) = &self.task_waker {
            w.wake();
        }
    }

    /// Nudges gateways through `notifier` after key changes.
    pub fn with_notifier(mut self, notifier: Notifier) -> Control {
        self.notifier = notifier;
        self
    }

    /// Reports committed commands to `sink`.
    pub fn with_events(mut self, sink: EventSink) -> Control {
        self.events = Some(sink);
        self
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn event(&self, kind: &'static str) {
        if let Some(sink) = &self.events {
            sink(kind);
        }
    }
}

#[cfg(test)]
mod tests;
