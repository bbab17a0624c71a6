#!/usr/bin/env bash
# Multi-node benchmark (issue 20): per-node CPU per request with 1, 2 and 3 gateways under the
# same load per node (each gateway driven directly by its own oha at RATE req/s), usage rows
# against the 200s, and the time a revocation takes to reach all three gateways (target ≤ 1 s).
# See loadtests/multinode_bench.py for the details; it writes loadtests/results/multinode-latest.md.
#
# Needs, on this machine: PostgreSQL on 127.0.0.1:5432 (user postgres, trust), Redis on
# 127.0.0.1:6379 (REDIS_URL), ClickHouse on 8123 (started here by deploy/clickhouse/start.sh
# if nothing answers, and stopped at the end). Installs oha from crates.io when missing, builds
# aihub --release (CARGO_TARGET_DIR, default /var/tmp/aihub-target). Creates a PostgreSQL
# database of its own and drops it at the end, as it drops its ClickHouse database and deletes
# its Redis keys.
#
# Env: RATE (req/s per gateway, 1000), DURATION (s, 10), ROUNDS (2), TRIALS (revocations, 20),
# CONNECTIONS (per oha, 50), GATEWAY_CPU (0), LOAD_CPU (1), PIN (1; 0 = no taskset), REDIS_URL,
# KEEP_TMP=1 (keep configs and logs). Ports 19880-19887. A default run takes about 2.5 minutes
# after the build.
set -euo pipefail
cd "$(dirname "$0")/.."
COMMAND="$(for v in RATE DURATION ROUNDS TRIALS CONNECTIONS GATEWAY_CPU LOAD_CPU PIN; do
    if [ -n "${!v:-}" ]; then printf '%s=%q ' "$v" "${!v}"; fi; done)loadtests/multinode-bench.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/aihub-target}
export PATH="$HOME/.cargo/bin:$PATH"
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
export CLICKHOUSE_URL=${CLICKHOUSE_URL:-http://127.0.0.1:8123}

source deploy/local/deps.sh
source loadtests/services.sh
# The clients this script and the Python script call, installed only when missing.
for tool in psql:postgresql-client redis-cli:redis-tools taskset:util-linux pgrep:procps ss:iproute2; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || aihub_apt_install "${tool#*:}"
done
command -v oha >/dev/null 2>&1 || cargo install oha --locked
cargo build --release -p aihub
export AIHUB_BIN=$CARGO_TARGET_DIR/release/aihub

bench_services aihub_mnbench /var/tmp/aihub-multinode-clickhouse
export MULTINODE_DATABASE_URL=$BENCH_DATABASE_URL
export MULTINODE_BENCH_COMMAND="$COMMAND"
bench_run loadtests/multinode_bench.py
