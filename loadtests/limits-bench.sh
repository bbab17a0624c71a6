#!/usr/bin/env bash
# Rate-limit benchmarks (docs/limits.md): gateway CPU per request with limits off / on / on with
# Redis (closed loop, wrk), p99 added by Redis at 1,000 req/s (open loop, limits-bench), and
# over-admission with 1 node, 2 nodes sharing Redis, and 2 nodes whose Redis was killed or hangs.
# Installs what it needs (wrk, redis-server, redis-tools from apt), builds `aihub` and
# `limits-bench` in release, then runs loadtests/limits_bench.py (see its docstring), which writes
# loadtests/results/limits-latest.md.
# Env: DURATION (s per wrk run, default 10), SECONDS_EACH (s per open-loop run, default 20),
# ROUNDS (interleaved rounds of a and b, default 2), PROXY_CPU (0), LOAD_CPU (1), CONNECTIONS (50),
# REDIS_URL (shared Redis for a/b, default redis://127.0.0.1:6379; keys under a unique prefix,
# deleted afterwards), OPEN_RATE (1000), OVER_RATE (1500), OVER_RPM (30000), OVER_BURST (50),
# A_RESPONSES (response sizes of part a, default "small large"), KEEP_TMP=1 (keep the gateways'
# configs and logs).
# Ports used: 19400-19406, 19450-19456, 19420 (private Redis).
set -euo pipefail
cd "$(dirname "$0")/.."
COMMAND="$(for v in DURATION SECONDS_EACH ROUNDS PROXY_CPU LOAD_CPU CONNECTIONS OPEN_RATE OVER_RATE OVER_RPM OVER_BURST A_RESPONSES; do
    if [ -n "${!v:-}" ]; then printf '%s=%q ' "$v" "${!v}"; fi; done)loadtests/limits-bench.sh"
source deploy/local/deps.sh
aihub_apt_install wrk redis-server redis-tools python3 util-linux procps
cargo build --release -p aihub -p aihub-benches --bin aihub --bin limits-bench
T=${CARGO_TARGET_DIR:-$PWD/target}/release
export AIHUB_BIN=$T/aihub LIMITS_BENCH_BIN=$T/limits-bench LIMITS_BENCH_COMMAND="$COMMAND"

# The Python script stops everything it started (and its children die with it, PR_SET_PDEATHSIG);
# run it in the background so that a TERM or INT to this script reaches it at once.
PY=""
cleanup() { [ -n "$PY" ] && kill -TERM "$PY" 2>/dev/null && wait "$PY" 2>/dev/null; true; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
python3 loadtests/limits_bench.py & PY=$!
rc=0; wait "$PY" || rc=$?
PY=""
exit "$rc"
