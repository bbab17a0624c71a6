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
CH_HTTP_PORT=${CLICKHOUSE_URL##*:}
PG=(psql -h 127.0.0.1 -p 5432 -U postgres -v ON_ERROR_STOP=1 -qAt)

source deploy/local/deps.sh
for tool in psql:postgresql-client redis-cli:redis-tools curl:curl python3:python3; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || aihub_apt_install "${tool#*:}"
done
if [ -z "${AIHUB_BIN:-}" ]; then
    cargo build --release -p aihub
    export AIHUB_BIN=$CARGO_TARGET_DIR/release/aihub
fi

"${PG[@]}" -d postgres -c 'SELECT 1' >/dev/null \
    || { echo "PostgreSQL does not answer on 127.0.0.1:5432 (user postgres, trust)" >&2; exit 1; }
[ "$(redis-cli -u "$REDIS_URL" PING 2>/dev/null)" = PONG ] \
    || { echo "Redis does not answer at ${REDIS_URL##*@}" >&2; exit 1; }

DB=aihub_soak_$(date -u +%Y%m%d_%H%M%S)_$$
CH_DIR=/var/tmp/aihub-soak-clickhouse
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
    deploy/clickhouse/start.sh "$CH_DIR" "$CH_HTTP_PORT" $((CH_HTTP_PORT + 877))
    CH_STARTED=1
fi
"${PG[@]}" -d postgres -c "CREATE DATABASE $DB"
DB_CREATED=1
export SOAK_DATABASE_URL="postgres://postgres@127.0.0.1:5432/$DB"
export SOAK_COMMAND="$COMMAND"

# In the background so that a TERM or INT reaches it at once; its children die with it.
python3 loadtests/soak_bench.py & PY=$!
rc=0; wait "$PY" || rc=$?
PY=""
exit "$rc"
