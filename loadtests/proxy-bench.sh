#!/usr/bin/env bash
# Proxy benchmark (issue 19): direct, nginx, gateway bare, gateway full with local limits and with
# Redis limits; small JSON, large JSON and SSE; closed loop (wrk: req/s, proxy CPU µs/req) and
# fixed rates (oha at 20 and 1000 req/s: p50/p99 and what each proxy adds over direct); the ratios
# against nginx and issue 19's goals, met or not; usage rows in ClickHouse against the metered
# requests. See loadtests/proxy_bench.py for the details; it writes loadtests/results/proxy-latest.md.
#
# Installs what it needs (nginx-light, wrk, redis-server from apt; oha from crates.io), builds
# aihub --release, starts a private ClickHouse on LOAD_CPU (stopped at the end; other ClickHouse
# servers are left alone), then runs loadtests/proxy_bench.py.
#
# Env: DURATION (s per run, 10), ROUNDS (interleaved rounds, 3), QUICK=1 (DURATION=3 ROUNDS=1, to
# check the script), PROXY_CPU (0), LOAD_CPU (1), CONNECTIONS (50), RATES ("20 1000"),
# LARGE_CHUNKS (tokens of the large JSON answer, 1000), REDIS_URL (default: a private
# redis-server on port 19120; else that Redis with a key prefix unique to the run, deleted after),
# KEEP_TMP=1 (keep configs and logs), KEEP_DB=1 (keep the run's ClickHouse databases).
# Ports: 19080-19087, 19120; ClickHouse 18124 (http), 19124 (tcp), 19133 (interserver).
# A full run (ROUNDS=3, DURATION=10) takes about 25 minutes; QUICK=1 about 4.
set -euo pipefail
cd "$(dirname "$0")/.."
COMMAND="$(for v in QUICK DURATION ROUNDS PROXY_CPU LOAD_CPU CONNECTIONS RATES LARGE_CHUNKS; do
    if [ -n "${!v:-}" ]; then printf '%s=%q ' "$v" "${!v}"; fi; done)loadtests/proxy-bench.sh"
source deploy/local/deps.sh
aihub_apt_install nginx-light wrk redis-server redis-tools python3 util-linux procps curl
export PATH="$HOME/.cargo/bin:$PATH"
command -v oha >/dev/null 2>&1 || cargo install oha --locked
cargo build --release -p aihub
export AIHUB_BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/aihub
export PROXY_BENCH_COMMAND="$COMMAND"

CH_DIR=${AIHUB_BENCH_CLICKHOUSE_DIR:-/var/tmp/aihub-bench-clickhouse}
export AIHUB_BENCH_CLICKHOUSE_URL=http://127.0.0.1:18124
PY=""
cleanup() {
    if [ -n "$PY" ]; then kill -TERM "$PY" 2>/dev/null && wait "$PY" 2>/dev/null; fi
    deploy/clickhouse/stop.sh "$CH_DIR" >/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
taskset -c "${LOAD_CPU:-1}" deploy/clickhouse/start.sh "$CH_DIR" 18124 19124

# The Python script stops everything it started (its children die with it, PR_SET_PDEATHSIG);
# it runs in the background so that a TERM or INT to this script reaches it at once, and on
# LOAD_CPU, off the proxies' CPU.
taskset -c "${LOAD_CPU:-1}" python3 loadtests/proxy_bench.py & PY=$!
rc=0; wait "$PY" || rc=$?
PY=""
exit "$rc"
