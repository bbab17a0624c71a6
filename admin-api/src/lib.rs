//! The AI Hub control plane (axum): developer accounts, API keys, usage, billing, webhooks and
//! the developer portal. Placeholder until the control-plane issue; the gateway already runs
//! without it in declarative mode (keys from YAML).
//!
//! # Layout
//! Empty for now. The key format it will issue lives in `aihub-apikey`, shared with the gateway;
//! the keys it stores will reach gateways through `aihub_gateway::keys::KeyStore`.
