//! Async tasks and the OpenAI Batch and Files APIs, below the HTTP layer: where file bytes
//! live, what a batch input file must hold and what the API's objects look like, and the
//! worker engine that runs queued items through the gateway as the key that created them.
//!
//! The queue itself (tasks, items, leases, results) is in the control-plane store
//! (`aihub_store::{tasks, queue, files}`); the commands (create, cancel, upload, delete) are
//! in the service layer (`aihub_control::tasks`); the routes in the admin API.
//!
//! # Layout
//! - [`config`] — the `tasks:` section of the admin configuration.
//! - [`files`] — [`files::FileStore`] and its local-directory implementation.
//! - [`s3`] — the S3-compatible implementation (`tasks.s3`).
//! - [`openai`] — batch input validation (errors with line numbers), output and error lines,
//!   the `batch` and `file` objects.
//! - [`run`] — one item through the gateway and what its answer means.
//! - [`stage`] — task-level work: validating input into items, exports, finalizing.
//! - [`engine`] — the per-node worker: claims, heartbeats, cancellation, sweeps.

pub mod config;
pub mod engine;
pub mod files;
pub mod openai;
pub mod run;
pub mod s3;
pub mod stage;

pub use config::TasksConfig;
pub use engine::{Engine, Metrics, Waker};
pub use files::{FileStore, LocalDir};
pub use s3::S3Files;
