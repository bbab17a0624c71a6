#!/usr/bin/env bash
# The developer portal's server time and page weight over realistic usage (issue 7's benchmark):
#
#   loadtests/portal-bench.sh [--database aihub_bench] [--rows 10000000] [--requests 200]
#                             [--sessions 20]
#
# 1. Fills the ClickHouse database with loadtests/usage-gen.sh (10,000 developers, Zipf-like
#    traffic, ROWS rows over 90 days; reused when it already holds at least ROWS rows, e.g. the
#    one loadtests/analytics-bench.sh filled) and registers the generated developers and their
#    keys (dev_gen_00000…) in a fresh SQLite store.
# 2. Starts the release admin API on that store and database (background billing off, the
#    portal on plain http).
# 3. loadtests/portal_bench.py signs developers in through the password-reset mail and the
#    portal's login form, then measures p50/p95/p99 of every portal page's server time (its
#    Server-Timing header) and client time for the heaviest developer and for random ones, and
#    the weight of each page load (HTML + assets, raw and gzip).
#
# Results go to loadtests/results/portal-latest.md; exits 1 when the dashboard misses its target
# (server p95 ≤ 50 ms). Needs ClickHouse on CLICKHOUSE_URL (default http://127.0.0.1:8123;
# deploy/local/up.sh or deploy/clickhouse/start.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
DB=aihub_bench
ROWS=10000000
REQUESTS=200
SESSIONS=20
DEVELOPERS=10000
DAYS=90
while [ $# -gt 0 ]; do
    case "$1" in
        --database) DB=$2; shift 2 ;;
        --rows) ROWS=$2; shift 2 ;;
        --requests) REQUESTS=$2; shift 2 ;;
        --sessions) SESSIONS=$2; shift 2 ;;
        *) echo "usage: $0 [--database DB] [--rows N] [--requests N] [--sessions N]" >&2; exit 2 ;;
    esac
done
CH=${CLICKHOUSE_URL:-http://127.0.0.1:8123}
PORT=${PORTAL_BENCH_PORT:-19382}
OUT=loadtests/results/portal-latest.md

source deploy/local/deps.sh
cargo build --release -p aihub -p aihub-benches --bin aihub --bin usage-gen
T=${CARGO_TARGET_DIR:-$PWD/target}/release
WORK=$(mktemp -d)
ADMIN=""
cleanup() { [ -n "$ADMIN" ] && kill "$ADMIN" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

q() { curl -sS "$CH/?database=$DB" --data-binary "$1"; }
have=$(q "SELECT count() FROM usage_events" 2>/dev/null || echo 0)
case "$have" in ''|*[!0-9]*) have=0 ;; esac
generated=""
if [ "$have" -eq 0 ]; then
    echo "==> generating $ROWS usage rows into $DB" >&2
    start=$(date +%s)
    "$T/usage-gen" --clickhouse "$CH" --database "$DB" --developers "$DEVELOPERS" --rows "$ROWS" --days "$DAYS"
    generated=" (generated now in $(( $(date +%s) - start )) s)"
    have=$ROWS
elif [ "$have" -lt "$ROWS" ]; then
    echo "$DB holds $have rows, fewer than $ROWS (another run still filling it?): wait, drop it or pass --database" >&2
    exit 1
else
    echo "==> reusing $DB ($have rows)" >&2
fi
echo "==> registering developers and keys in a fresh SQLite store" >&2
"$T/usage-gen" --clickhouse "$CH" --database "$DB" --developers "$DEVELOPERS" --days "$DAYS" \
    --rows 0 --store "sqlite://$WORK/store.db" >&2

cat > "$WORK/admin.yaml" <<YAML
listen: 127.0.0.1:$PORT
public_url: http://127.0.0.1:$PORT
database: {url: "sqlite://$WORK/store.db"}
email: {transport: {kind: file, dir: "$WORK/mail"}}
auth: {attempts_per_ip_per_minute: 1000000}
clickhouse: {url: "$CH", database: "$DB"}
billing: {enabled: false}
portal: {secure_cookie: false, gateway_url: "http://127.0.0.1:8080/v1"}
YAML
RUST_LOG=warn "$T/aihub" admin --config "$WORK/admin.yaml" > /dev/null 2> "$WORK/admin.log" &
ADMIN=$!
until curl -fsS "http://127.0.0.1:$PORT/readyz" > /dev/null 2>&1; do
    kill -0 "$ADMIN" 2> /dev/null || { cat "$WORK/admin.log" >&2; exit 1; }
    sleep 0.05
done

top_rows=$(q "SELECT count() FROM usage_events WHERE developer_id = 'dev_gen_00000' AND toStartOfMonth(ts) = toStartOfMonth(now())")
mkdir -p loadtests/results
{
    echo "# Developer portal benchmark — $(date -u +%FT%TZ), $(nproc) cores"
    echo
    echo "- ClickHouse $(q 'SELECT version()') at $CH, database \`$DB\`: $have usage rows$generated," \
         "$DEVELOPERS developers, $DAYS days (loadtests/usage-gen.sh); the heaviest developer has" \
         "$top_rows raw rows in the current month."
    echo "- Admin API: release build, \`aihub admin\` on SQLite, background billing off;" \
         "client: loadtests/portal_bench.py on the same machine (\`loadtests/portal-bench.sh\`)."
} > "$OUT"
status=0
python3 loadtests/portal_bench.py --base "http://127.0.0.1:$PORT" --mail "$WORK/mail" \
    --requests "$REQUESTS" --sessions "$SESSIONS" --developers "$DEVELOPERS" --out "$OUT" || status=$?
echo >&2
cat "$OUT"
exit $status
