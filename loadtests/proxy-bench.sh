#!/usr/bin/env bash
# Gateway vs nginx vs direct, JSON and SSE, closed loop (wrk) and fixed rates (oha).
# Installs what it needs (nginx-light, wrk from apt; oha from crates.io), builds aihub --release,
# then runs loadtests/proxy_bench.py. Env: DURATION (s, default 10), PROXY_CPU, LOAD_CPU, CONNECTIONS.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/local/deps.sh
aihub_apt_install nginx-light wrk python3 util-linux procps
command -v oha >/dev/null 2>&1 || cargo install oha --locked
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -p aihub
export AIHUB_BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/aihub
# A private ClickHouse for the metered gateway, started on the load CPU (off the proxy's CPU) and
# stopped at the end; other ClickHouse servers are left alone.
CH_DIR=${AIHUB_BENCH_CLICKHOUSE_DIR:-/var/tmp/aihub-bench-clickhouse}
export AIHUB_BENCH_CLICKHOUSE_URL=http://127.0.0.1:18124
taskset -c "${LOAD_CPU:-1}" deploy/clickhouse/start.sh "$CH_DIR" 18124 19124
trap 'deploy/clickhouse/stop.sh "$CH_DIR" >/dev/null' EXIT
python3 loadtests/proxy_bench.py
