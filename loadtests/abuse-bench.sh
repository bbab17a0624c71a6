#!/usr/bin/env bash
# Protocol abuse benchmark (issue 21, item 2): a fixed-rate well-behaved client's p50/p99 against
# the gateway and the admin API without attack, then during each attack (10,000 idle
# connections, connections idle after one request, slowloris with 1,000 connections, clients
# that stop reading a stream), with the server's RSS and open descriptors before, during and
# after, and whether its deadlines closed the attackers' connections. See
# loadtests/abuse_bench.py; it writes loadtests/results/abuse-latest.md.
#
# Builds aihub --release (AIHUB_BIN overrides), uses the ClickHouse at CLICKHOUSE_URL
# (default http://127.0.0.1:8123; a database of its own, dropped at the end).
# Env: RATE (50), PHASE_SECONDS (20), IDLE_CONNECTIONS (10000), KEPT_ALIVE (2000),
# SLOWLORIS (1000), STALLED (20), KEEP_TMP=1. Ports 19700-19704. About 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
COMMAND="$(for v in RATE PHASE_SECONDS IDLE_CONNECTIONS KEPT_ALIVE SLOWLORIS STALLED AIHUB_BIN; do
    if [ -n "${!v:-}" ]; then printf '%s=%q ' "$v" "${!v}"; fi; done)loadtests/abuse-bench.sh"
export ABUSE_BENCH_COMMAND="$COMMAND"
if [ -z "${AIHUB_BIN:-}" ]; then
    cargo build --release -p aihub
    export AIHUB_BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/aihub
fi
# The attacking client holds IDLE_CONNECTIONS sockets (plus the measured client's and Python's):
# raise this shell's soft limit to the hard one; the servers inherit it and the gateway raises
# its own to the hard limit anyway.
ulimit -n "$(ulimit -Hn)"
need=$(( ${IDLE_CONNECTIONS:-10000} + 1000 ))
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$need" ]; then
    echo "open files limit $(ulimit -n) < $need: raise the hard limit (ulimit -Hn) first" >&2
    exit 1
fi
exec python3 loadtests/abuse_bench.py
