#!/usr/bin/env bash
# Retries and fallbacks: their cost when configured but never needed (gateway with retries off vs
# on, JSON and SSE, closed loop with wrk and fixed rates with oha), and what a client sees when one
# of two endpoints answers 503 to 20 % of its requests (attempts 1 vs 3).
# Installs what it needs (wrk from apt; oha from crates.io), builds aihub --release, then runs
# loadtests/routing_bench.py, which writes loadtests/results/routing-latest.md.
# Env: DURATION (s per run, default 10), PROXY_CPU (0), LOAD_CPU (1), CONNECTIONS (50), ROUNDS (3),
# B_RATE (req/s for the 503 scenario, 200), BASELINE_REV (a revision from before issue 18, e.g.
# 428e174: built in a temporary worktree and run in scenario A as "before issue 18").
# No ClickHouse: the gateways run without metering.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/local/deps.sh
aihub_apt_install wrk python3 util-linux procps
export PATH="$HOME/.cargo/bin:$PATH"
command -v oha >/dev/null 2>&1 || cargo install oha --locked
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
if [ -n "${BASELINE_REV:-}" ]; then
    # Built first: its workspace crates get artifacts of their own (another path), so the build
    # below only relinks this checkout's binary over the shared release/aihub.
    wt=$(mktemp -d /var/tmp/aihub-baseline-src.XXXXXX)
    git worktree add --detach "$wt" "$BASELINE_REV" >/dev/null
    (cd "$wt" && CARGO_TARGET_DIR=$TARGET cargo build --release -p aihub)
    cp "$TARGET/release/aihub" /var/tmp/aihub-baseline-bin
    git worktree remove --force "$wt"
    export AIHUB_BASELINE_BIN=/var/tmp/aihub-baseline-bin
fi
cargo build --release -p aihub
export AIHUB_BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/aihub
export ROUTING_BENCH_COMMAND="DURATION=${DURATION:-10} PROXY_CPU=${PROXY_CPU:-0} LOAD_CPU=${LOAD_CPU:-1} CONNECTIONS=${CONNECTIONS:-50} ROUNDS=${ROUNDS:-3} B_RATE=${B_RATE:-200}${BASELINE_REV:+ BASELINE_REV=$BASELINE_REV} loadtests/routing-bench.sh"
python3 loadtests/routing_bench.py
