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
# ClickHouse for the metered gateway, kept off the proxy's CPU.
CH_URL=${AIHUB_BENCH_CLICKHOUSE_URL:-http://127.0.0.1:8123}
if [ "$(curl -s --max-time 2 "$CH_URL/ping" || true)" != "Ok." ]; then
    deploy/clickhouse/start.sh "${AIHUB_BENCH_CLICKHOUSE_DIR:-/var/tmp/aihub-bench-clickhouse}" "${CH_URL##*:}" 9000
fi
for pid in $(pgrep -f clickhouse-server); do taskset -apc "${LOAD_CPU:-1}" "$pid" >/dev/null; done
exec python3 loadtests/proxy_bench.py
