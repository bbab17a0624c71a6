#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, unit tests and the black-box tests (which start
# the real `aihub` binary and the mock upstream on loopback). Installs what the build needs.
set -euo pipefail
cd "$(dirname "$0")/../.."
source deploy/local/deps.sh
rustup component add rustfmt clippy >/dev/null 2>&1 || true

echo "==> cargo fmt --check" >&2
cargo fmt --all -- --check
echo "==> cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test" >&2
cargo test --workspace --locked
