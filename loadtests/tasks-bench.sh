#!/usr/bin/env bash
# Tasks and batches benchmark (issue 17): task creation latency, 10,000 queued tasks with 1,000
# items running at once, and the queue's CPU per item.
#
#   loadtests/tasks-bench.sh [sqlite|postgres]       (default sqlite)
#
# 1. A fresh control-plane database (SQLite file, or PostgreSQL `aihub_tasksbench`) seeded with
#    verified developers (controlplane-bench seed);
# 2. release binaries: two mock upstreams (`fast` answers at once, `slow` after 2 s), the
#    gateway (metering into ClickHouse database `aihub_tasksbench`, no limits) and the admin
#    API (tasks: 1,000 items in flight on the node, 100 per developer, 2,000 open tasks per
#    developer);
# 3. benches/src/bin/tasks-bench.rs: `create` (CREATE_N task and batch creations, one at a
#    time), `queue` (QUEUE_N one-prompt tasks over 10 developers to the slow model), `items`
#    (one batch of ITEMS_N items to the fast model; the admin's, the gateway's and — on
#    PostgreSQL — the database's CPU per item read from /proc).
# Figures go to stdout and loadtests/results/tasks-<backend>-latest.md.
set -euo pipefail
cd "$(dirname "$0")/.."
BACKEND=${1:-sqlite}
CREATE_N=${CREATE_N:-1000}
QUEUE_N=${QUEUE_N:-10000}
ITEMS_N=${ITEMS_N:-20000}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
CH=${CH:-http://127.0.0.1:8123}
source deploy/local/deps.sh
cargo build --release -p aihub -p aihub-benches --bin aihub --bin controlplane-bench --bin tasks-bench
T=${CARGO_TARGET_DIR:-$PWD/target}/release
TMP=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
OUT=loadtests/results/tasks-$BACKEND-latest.md
mkdir -p loadtests/results "$TMP/mail" "$TMP/files" "$TMP/wal"
[ "$(curl -s "$CH/ping" || true)" = "Ok." ] || deploy/clickhouse/start.sh /var/tmp/aihub-test-clickhouse 8123 9000
curl -fsS "$CH/" --data-binary "DROP DATABASE IF EXISTS aihub_tasksbench" > /dev/null
if [ "$BACKEND" = postgres ]; then
    psql "$PG/test" -qc "DROP DATABASE IF EXISTS aihub_tasksbench WITH (FORCE)" -c "CREATE DATABASE aihub_tasksbench"
    DB="$PG/aihub_tasksbench"
else
    DB="sqlite://$TMP/control.db"
fi
"$T/controlplane-bench" seed "$DB" 200 0 > /dev/null

RUST_LOG=warn "$T/aihub" mock-upstream --listen 127.0.0.1:19501 --name fast --threads 1 > /dev/null 2>&1 & PIDS+=($!)
RUST_LOG=warn "$T/aihub" mock-upstream --listen 127.0.0.1:19502 --name slow --latency 2s --threads 1 > /dev/null 2>&1 & PIDS+=($!)
cat > "$TMP/gateway.yaml" <<YAML
server: {listen: ["127.0.0.1:19500"], ops_listen: 127.0.0.1:19509, threads: 1}
upstreams:
  fast: {endpoints: ["http://127.0.0.1:19501/v1"]}
  slow: {endpoints: ["http://127.0.0.1:19502/v1"]}
routes:
  - {model: fast, upstream: fast}
  - {model: slow, upstream: slow}
metering:
  clickhouse: {url: "$CH", database: aihub_tasksbench}
  wal_dir: "$TMP/wal"
control_plane:
  database_url: "$DB"
  admin_url: "http://127.0.0.1:19510"
keys: []
YAML
cat > "$TMP/admin.yaml" <<YAML
listen: 127.0.0.1:19510
database: {url: "$DB", max_connections: 16}
email: {transport: {kind: file, dir: "$TMP/mail"}}
auth: {attempts_per_ip_per_minute: 1000000}
keys: {max_per_developer: 1000}
tasks:
  gateway_url: "http://127.0.0.1:19500"
  files_dir: "$TMP/files"
  concurrency: 1000
  per_developer_concurrency: 100
  max_open_per_developer: 2000
YAML
RUST_LOG=warn "$T/aihub" admin --config "$TMP/admin.yaml" > /dev/null 2> "$TMP/admin.log" & ADMIN=$!; PIDS+=($ADMIN)
until curl -fsS http://127.0.0.1:19510/readyz > /dev/null 2>&1; do
    kill -0 "$ADMIN" 2>/dev/null || { cat "$TMP/admin.log"; exit 1; }
    sleep 0.05
done
RUST_LOG=warn "$T/aihub" gateway --config "$TMP/gateway.yaml" > /dev/null 2> "$TMP/gateway.log" & GATEWAY=$!; PIDS+=($GATEWAY)
until curl -fsS http://127.0.0.1:19509/readyz > /dev/null 2>&1; do
    kill -0 "$GATEWAY" 2>/dev/null || { cat "$TMP/gateway.log"; exit 1; }
    sleep 0.05
done

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
pg_ticks() {
    local t=0
    for p in $(pgrep -x postgres || true); do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done
    echo "$t"
}
HZ=$(getconf CLK_TCK)
B="$T/tasks-bench"
ADMIN_URL=http://127.0.0.1:19510
GW_URL=http://127.0.0.1:19500

create=$("$B" create "$ADMIN_URL" "$GW_URL" 1 "$CREATE_N")
# Let the creation stage's tasks finish before the next stage.
sleep 5
queue=$("$B" queue "$ADMIN_URL" "$GW_URL" 10 "$QUEUE_N")
a0=$(ticks "$ADMIN"); g0=$(ticks "$GATEWAY"); p0=$(pg_ticks)
items=$("$B" items "$ADMIN_URL" "$GW_URL" 1 "$ITEMS_N")
a1=$(ticks "$ADMIN"); g1=$(ticks "$GATEWAY"); p1=$(pg_ticks)
per_item() { awk -v t="$1" -v hz="$HZ" -v n="$ITEMS_N" 'BEGIN { printf "%.1f", t * 1000000 / hz / n }'; }
{
    echo "# Tasks and batches benchmark — $(date -u +%FT%TZ), $(nproc) cores, $BACKEND"
    echo
    echo "Release \`aihub admin\` (tasks engine: 1,000 items in flight, 100 per developer, lease 30 s), \`aihub gateway\` (1 worker thread, metering into ClickHouse, no limits) and two mock upstreams on one $(nproc)-core machine, control plane on $BACKEND; driver benches/src/bin/tasks-bench.rs."
    echo
    echo "## Task creation (one request at a time)"
    echo '```'
    echo "$create"
    echo '```'
    echo "## $QUEUE_N queued tasks, upstream answering after 2 s"
    echo '```'
    echo "$queue"
    echo '```'
    echo "Ideal with 1,000 in flight and 2 s per item: 500 tasks/s."
    echo
    echo "## Queue overhead: one batch of $ITEMS_N items, upstream answering at once"
    echo '```'
    echo "$items"
    echo '```'
    echo "- admin API (queue, workers, result files) CPU per item: $(per_item $((a1 - a0))) µs"
    echo "- gateway (auth, routing, metering) CPU per item: $(per_item $((g1 - g0))) µs"
    if [ "$BACKEND" = postgres ]; then
        echo "- PostgreSQL CPU per item: $(per_item $((p1 - p0))) µs"
    fi
    echo "- admin log lines (warn and above): $(grep -c . "$TMP/admin.log" || true)"
} | tee "$OUT"
