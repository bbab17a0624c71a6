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
export CLICKHOUSE_URL=http://127.0.0.1:8123
PG=(psql -h 127.0.0.1 -p 5432 -U postgres -v ON_ERROR_STOP=1 -qAt)

source deploy/local/deps.sh
# The clients this script and the Python script call, installed only when missing.
for tool in psql:postgresql-client redis-cli:redis-tools taskset:util-linux pgrep:procps ss:iproute2 curl:curl python3:python3; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || aihub_apt_install "${tool#*:}"
done
command -v oha >/dev/null 2>&1 || cargo install oha --locked
cargo build --release -p aihub
export AIHUB_BIN=$CARGO_TARGET_DIR/release/aihub

"${PG[@]}" -d postgres -c 'SELECT 1' >/dev/null \
    || { echo "PostgreSQL does not answer on 127.0.0.1:5432 (user postgres, trust)" >&2; exit 1; }
[ "$(redis-cli -u "$REDIS_URL" PING 2>/dev/null)" = PONG ] \
    || { echo "Redis does not answer at ${REDIS_URL##*@}" >&2; exit 1; }

DB=aihub_mnbench_$(date -u +%Y%m%d_%H%M%S)_$$
CH_DIR=/var/tmp/aihub-multinode-clickhouse
CH_STARTED=""
DB_CREATED=""
PY=""
cleanup() {
    set +e  # every step, whatever the previous one did
    if [ -n "$PY" ]; then kill -TERM "$PY" 2>/dev/null && wait "$PY" 2>/dev/null; fi
    if [ -n "$DB_CREATED" ]; then
        "${PG[@]}" -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" || echo "could not drop $DB" >&2
    fi
    if [ -n "$CH_STARTED" ]; then deploy/clickhouse/stop.sh "$CH_DIR" >/dev/null || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if ! curl -fsS "$CLICKHOUSE_URL/ping" >/dev/null 2>&1; then
    deploy/clickhouse/start.sh "$CH_DIR" 8123 9000
    CH_STARTED=1
fi
"${PG[@]}" -d postgres -c "CREATE DATABASE $DB"
DB_CREATED=1
export MULTINODE_DATABASE_URL="postgres://postgres@127.0.0.1:5432/$DB"
export MULTINODE_BENCH_COMMAND="$COMMAND"

# In the background so that a TERM or INT reaches it at once; its children die with it.
python3 loadtests/multinode_bench.py & PY=$!
rc=0; wait "$PY" || rc=$?
PY=""
exit "$rc"
