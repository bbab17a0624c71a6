#!/usr/bin/env bash
# Runs every check and test: formatting, clippy, unit tests and the black-box tests (which start
# the real `aihub` binary and the mock upstream on loopback), then README's first command itself
# (deploy/local/smoke.sh: up.sh over a fresh data directory on free ports, its printed
# instructions, a restart, down.sh). Installs what the build needs and starts the services the
# tests use (ClickHouse, PostgreSQL, Redis) when none is running.
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

# Java ZooKeeper (Debian's zookeeper, pulls default-jre) for usage/tests/cluster.rs, which starts
# ZooKeeper and two ClickHouse replicas itself through deploy/clickhouse/cluster.sh
# (AIHUB_TEST_CLUSTER=0 skips it).
aihub_apt_install zookeeper
# libfaketime for cli/tests/clock.rs (steps a running process's wall clock), and PostgreSQL's
# server binaries (initdb, pg_ctl, pg_basebackup) for cli/tests/pg_failover.rs's private primary
# and standby, even when the tests' PostgreSQL runs elsewhere.
aihub_apt_install faketime
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || aihub_apt_install postgresql

# PostgreSQL and Redis for the control-plane tests: reuse running ones, else install (Debian's
# packages) and start them. Tests create and drop their own databases.
export AIHUB_TEST_POSTGRES_URL=${AIHUB_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}
export AIHUB_TEST_REDIS_URL=${AIHUB_TEST_REDIS_URL:-redis://127.0.0.1:6379}
deploy/local/services.sh

# Chromium, Node.js with e2e/'s packages and a Python virtualenv with the `openai` SDK, for the
# portal's browser test and the documentation's code samples (AIHUB_TEST_CHROMIUM, _NODE, _PYTHON).
source deploy/local/test-tools.sh

echo "==> cargo fmt --check" >&2
cargo fmt --all -- --check
# Unused dependencies stay out: cargo-machete reads the sources (no network once installed).
command -v cargo-machete >/dev/null 2>&1 || cargo install --locked cargo-machete@0.9.2
echo "==> cargo machete" >&2
cargo machete
# Licenses, duplicate versions and sources against deny.toml (docs/supply-chain.md), offline: the
# crates come from Cargo.lock (fetched here first on a fresh machine; nothing else is fetched).
command -v cargo-deny >/dev/null 2>&1 || cargo install --locked cargo-deny@0.20.2
echo "==> cargo deny check licenses bans sources" >&2
cargo fetch --locked --target x86_64-unknown-linux-gnu
cargo deny --frozen check licenses bans sources
echo "==> no import circles between a crate's modules" >&2
python3 deploy/ci/module-cycles.py ./*/src loadtests/mock-upstream/src
echo "==> cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test" >&2
cargo test --workspace --locked
echo "==> deploy/ci/fuzz.sh (every fuzz target ${AIHUB_FUZZ_SECONDS:-30} s on its corpus)" >&2
deploy/ci/fuzz.sh
echo "==> deploy/ci/lint-deploy.sh (Dockerfile, compose, nginx, Kubernetes, systemd; their configs with the built binary)" >&2
AIHUB_BIN="${CARGO_TARGET_DIR:-target}/debug/aihub" deploy/ci/lint-deploy.sh
echo "==> deploy/local/smoke.sh (README's ./deploy/local/up.sh, end to end)" >&2
deploy/local/smoke.sh
