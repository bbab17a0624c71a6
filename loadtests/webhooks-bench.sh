#!/usr/bin/env bash
# Webhook delivery benchmark (issue 16): deliveries per minute to a local receiver, event to
# first attempt, and the admin API's own latency while a backlog drains.
#
#   loadtests/webhooks-bench.sh [sqlite|postgres]       (default postgres)
#
# 1. A fresh control-plane database (PostgreSQL `aihub_whbench`, or a SQLite file) seeded with
#    DEVELOPERS verified developers (controlplane-bench seed);
# 2. the release admin API on it (webhooks: plain http to loopback allowed, defaults otherwise);
# 3. benches/src/bin/webhooks-bench.rs: one endpoint per developer on a loopback receiver, the
#    admin API's latency idle, EVENTS events written into the outbox and drained, then RATE
#    test events/s for SECONDS over the API and the same rate written straight into the outbox.
# Figures go to stdout and loadtests/results/webhooks-latest.md. The admin API's CPU time over
# the whole run is read from /proc.
set -euo pipefail
cd "$(dirname "$0")/.."
BACKEND=${1:-postgres}
DEVELOPERS=${DEVELOPERS:-100}
EVENTS=${EVENTS:-100000}
RATE=${RATE:-200}
SECONDS_EACH=${SECONDS_EACH:-15}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
source deploy/local/deps.sh
cargo build --release -p aihub -p aihub-benches --bin aihub --bin controlplane-bench --bin webhooks-bench
T=${CARGO_TARGET_DIR:-$PWD/target}/release
TMP=$(mktemp -d)
ADMIN=""
cleanup() { [ -n "$ADMIN" ] && kill "$ADMIN" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
OUT=loadtests/results/webhooks-latest.md
mkdir -p loadtests/results "$TMP/mail"
if [ "$BACKEND" = postgres ]; then
    psql "$PG/test" -qc "DROP DATABASE IF EXISTS aihub_whbench WITH (FORCE)" -c "CREATE DATABASE aihub_whbench"
    DB="$PG/aihub_whbench"
else
    DB="sqlite://$TMP/control.db"
fi
"$T/controlplane-bench" seed "$DB" "$DEVELOPERS" 0 > /dev/null
cat > "$TMP/admin.yaml" <<YAML
listen: 127.0.0.1:19391
database: {url: "$DB", max_connections: 16}
email: {transport: {kind: file, dir: "$TMP/mail"}}
auth: {attempts_per_ip_per_minute: 1000000}
webhooks: {allow_http: true, allow_networks: ["127.0.0.0/8"]}
YAML
RUST_LOG=warn "$T/aihub" admin --config "$TMP/admin.yaml" > /dev/null 2> "$TMP/admin.log" & ADMIN=$!
until curl -fsS http://127.0.0.1:19391/readyz > /dev/null 2>&1; do
    kill -0 "$ADMIN" 2>/dev/null || { cat "$TMP/admin.log"; exit 1; }
    sleep 0.05
done
cpu() { awk '{print $14 + $15}' "/proc/$ADMIN/stat"; }
c0=$(cpu)
r=$("$T/webhooks-bench" "$DB" http://127.0.0.1:19391 "$DEVELOPERS" "$EVENTS" "$RATE" "$SECONDS_EACH")
c1=$(cpu)
{
    echo "# Webhook delivery benchmark — $(date -u +%FT%TZ), $(nproc) cores, $BACKEND"
    echo
    echo "Release \`aihub admin\` (webhooks engine defaults: 256 in flight, 16 per endpoint, poll 50 ms, its own thread) on $BACKEND; $DEVELOPERS developers with one endpoint each on one loopback receiver (keep-alive, answers 200 at once); driver: benches/src/bin/webhooks-bench.rs on the same machine."
    echo
    echo "$r"
    echo "- admin API CPU over the whole run: $(( (c1 - c0) * 10 )) ms ($(getconf CLK_TCK) ticks/s)"
    grep -c . "$TMP/admin.log" | xargs -I{} echo "- admin log lines (warn and above): {}"
} | tee "$OUT"
