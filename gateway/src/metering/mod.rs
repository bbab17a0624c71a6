//! Token usage from responses as they stream by, without holding back what the client sees.
//!
//! Every API the gateway meters exactly ([`crate::api`]) reports a `usage` object; this module
//! reads all of their shapes ([`UsageFields`]) into one [`Usage`]. When no usage can be read,
//! the record is an estimate ([`estimate`]), flagged `usage_estimated = 1`: never an exact zero.
//!
//! # Layout
//! - [`fields`]: [`Usage`], [`UsageFields`] (Chat Completions, Completions, Embeddings,
//!   Responses and Messages usage objects), [`json_usage`] for a complete body;
//! - [`json`]: [`JsonMeter`], a JSON body's usage without keeping a large body (chunks kept up
//!   to [`json::KEEP_MAX`], then a streaming scan that keeps only the usage object);
//! - [`sse`]: [`SseMeter`], SSE events cut across any split, usage read from every API's events,
//!   the usage the gateway asked for hidden from clients that did not;
//! - [`scan`]: a byte-level reader of JSON objects (top-level members, string decoding) that
//!   never allocates a tree;
//! - [`estimate`]: token estimates with a real BPE tokenizer (o200k_base), off the hot path.

pub mod estimate;
pub mod fields;
pub mod json;
pub mod scan;
pub mod sse;

pub use estimate::Delivered;
pub use fields::{json_usage, Usage, UsageFields};
pub use json::JsonMeter;
pub use sse::SseMeter;

#[cfg(test)]
mod proptests;
