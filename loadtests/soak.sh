#!/usr/bin/env bash
# Soak (issue 21): `loadtests/soak.sh [DURATION_SECONDS]` (default 3600) runs the gateway and the
# admin API at a fixed rate mixing JSON chat completions, SSE streams with and without
# `stream_options.include_usage`, embeddings, a key limited through the admin API (429s expected)
# and key churn through the admin API (create, use, regenerate, delete; 401s on the old keys
# expected). Samples RSS, open FDs and threads of both processes, the WAL folder and the answers
# every SAMPLE s; at the end checks usage rows in ClickHouse against the answers by status, no
# unexpected answer, RSS/FDs/threads/WAL flat. Exits non-zero when a verdict fails. See
# loadtests/soak_bench.py for the details and the verdicts' exact definitions; it writes
# loadtests/results/soak-latest.md and soak-latest.csv.
#
# Needs, on this machine: PostgreSQL on 127.0.0.1:5432 (user postgres, trust), Redis (REDIS_URL,
# default redis://127.0.0.1:6379), ClickHouse on CLICKHOUSE_URL (default http://127.0.0.1:8123;
# started here by deploy/clickhouse/start.sh if nothing answers, and stopped at the end). Builds
# aihub --release (CARGO_TARGET_DIR, default /var/tmp/aihub-target). Creates a PostgreSQL and a
# ClickHouse database of its own and drops them at the end, as it deletes its Redis keys.
#
# Env: RATE (req/s of the mixed load, 40; key churn comes on top, ~1.4 req/s), SAMPLE (s between
# samples; 30 from 30 min on, else DURATION/30, at least 5), LIMITED_RPM (30), CHURN_EVERY (s, 5),
# WORKERS (client threads, 32), GATEWAY_THREADS (2), FD_SLACK (24), WAL_BOUND (bytes, 16 MiB),
# RUN_DIR (configs, logs, samples.csv; default /var/tmp/aihub-soak/<UTC time>), AIHUB_BIN (a built
# binary to soak instead of building one).
# Ports 19960-19963 (PORT_BASE moves them).
set -euo pipefail
cd "$(dirname "$0")/.."
export DURATION=${1:-${DURATION:-3600}}
COMMAND="$(for v in RATE SAMPLE LIMITED_RPM CHURN_EVERY WORKERS GATEWAY_THREADS FD_SLACK WAL_BOUND; do
    if [ -n "${!v:-}" ]; then printf '%s=%q ' "$v" "${!v}"; fi; done)loadtests/soak.sh $DURATION"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/aihub-target}
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
export CLICKHOUSE_URL=${CLICKHOUSE_URL:-http://127.0.0.1:8123}

source deploy/local/deps.sh
source loadtests/services.sh
if [ -z "${AIHUB_BIN:-}" ]; then
    cargo build --release -p aihub
    export AIHUB_BIN=$CARGO_TARGET_DIR/release/aihub
fi

bench_services aihub_soak /var/tmp/aihub-soak-clickhouse
export SOAK_DATABASE_URL=$BENCH_DATABASE_URL
export SOAK_COMMAND="$COMMAND"
bench_run loadtests/soak_bench.py
