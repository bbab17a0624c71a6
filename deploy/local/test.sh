#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, unit tests and the black-box tests (which start
# the real `aihub` binary and the mock upstream on loopback). Installs what the build needs.
set -euo pipefail
cd "$(dirname "$0")/../.."
source deploy/local/deps.sh
rustup component add rustfmt clippy >/dev/null 2>&1 || true

# ClickHouse for the metering tests: reuse one answering on AIHUB_TEST_CLICKHOUSE_URL, else start
# a private instance (Debian's clickhouse-server, installed when missing) under a scratch dir.
export AIHUB_TEST_CLICKHOUSE_URL=${AIHUB_TEST_CLICKHOUSE_URL:-http://127.0.0.1:8123}
if [ "$(curl -s --max-time 2 "$AIHUB_TEST_CLICKHOUSE_URL/ping" || true)" != "Ok." ]; then
    port=${AIHUB_TEST_CLICKHOUSE_URL##*:}
    echo "==> starting ClickHouse on port $port" >&2
    ./deploy/clickhouse/start.sh "${AIHUB_TEST_CLICKHOUSE_DIR:-/var/tmp/aihub-test-clickhouse}" "$port" $((port + 877))
fi

echo "==> cargo fmt --check" >&2
cargo fmt --all -- --check
echo "==> cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test" >&2
cargo test --workspace --locked
