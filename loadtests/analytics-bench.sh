#!/usr/bin/env bash
# Usage and analytics endpoints over realistic usage (issue 6's benchmark):
#
#   loadtests/analytics-bench.sh [--database aihub_bench] [--rows 10000000] [--requests 200]
#                                [--only TEXT]
#
# 1. Fills the ClickHouse database with loadtests/usage-gen.sh (10,000 developers, Zipf-like
#    traffic, ROWS rows over 90 days; reused when it already holds at least ROWS rows; the
#    rollups fill themselves) and registers the generated developers and their keys
#    (dev_gen_00000…, plans spread over free/developer/pro/enterprise) in a fresh SQLite store.
# 2. Starts the release admin API on that store and database (background billing off), waits
#    for it to apply the ClickHouse migrations (on an existing database a new rollup's backfill
#    runs then: its duration is reported) and signs in as the operator.
# 3. loadtests/analytics_bench.py: p50/p95/p99 of every usage and analytics endpoint over
#    REQUESTS sequential requests for the heaviest developer and for random ones, and the
#    export throughput (rows/s) of the heaviest developer's whole range.
#
# Results go to loadtests/results/analytics-latest.md. `--only TEXT` measures only the endpoints
# whose name contains TEXT (e.g. `--only admin/` for the operator view), without the export, and
# prints the table without touching that file. Needs ClickHouse on CLICKHOUSE_URL
# (default http://127.0.0.1:8123; deploy/local/up.sh or deploy/clickhouse/start.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
DB=aihub_bench
ROWS=10000000
REQUESTS=200
DEVELOPERS=10000
DAYS=90
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --database) DB=$2; shift 2 ;;
        --rows) ROWS=$2; shift 2 ;;
        --requests) REQUESTS=$2; shift 2 ;;
        --only) ONLY=$2; shift 2 ;;
        *) echo "usage: $0 [--database DB] [--rows N] [--requests N] [--only TEXT]" >&2; exit 2 ;;
    esac
done
CH=${CLICKHOUSE_URL:-http://127.0.0.1:8123}
PORT=${ANALYTICS_BENCH_PORT:-19381}
OUT=loadtests/results/analytics-latest.md
# The schema version the admin API migrates to (the last of usage/src/schema/mod.rs's migrations).
SCHEMA_VERSION=$(grep -o 'version: [0-9]*,' usage/src/schema/mod.rs | tail -1 | tr -dc 0-9)

source deploy/local/deps.sh
cargo build --release -p aihub -p aihub-benches --bin aihub --bin usage-gen
T=${CARGO_TARGET_DIR:-$PWD/target}/release
WORK=$(mktemp -d)
[ -n "$ONLY" ] && OUT=$WORK/results.md
ADMIN=""
cleanup() { [ -n "$ADMIN" ] && kill "$ADMIN" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

have=$(curl -sS "$CH/?database=$DB" --data-binary "SELECT count() FROM usage_events" 2>/dev/null || echo 0)
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
q() { curl -sS "$CH/?database=$DB" --data-binary "$1"; }
# An existing database one migration behind (an upgraded deployment): apply the migrations
# first, timed (usage-gen migrates, then writes no rows), so new rollups are backfilled before
# anything is measured.
before=$(q "SELECT toUInt32(max(version)) FROM schema_migrations" 2> /dev/null | tr -dc 0-9)
migrated=""
if [ "${before:-0}" != "$SCHEMA_VERSION" ]; then
    start=$(date +%s%N)
    "$T/usage-gen" --clickhouse "$CH" --database "$DB" --developers "$DEVELOPERS" --days "$DAYS" --rows 0 >&2
    first=$(( ${before:-0} + 1 ))
    [ "$first" = "$SCHEMA_VERSION" ] && which="Migration $first" || which="Migrations $first–$SCHEMA_VERSION"
    migrated="- $which applied to the existing database (an upgraded deployment), backfills included, in $(( ($(date +%s%N) - start) / 1000000 )) ms."
    echo "==> ${migrated#- }" >&2
fi
echo "==> registering developers and keys in a fresh SQLite store" >&2
start=$(date +%s%N)
"$T/usage-gen" --clickhouse "$CH" --database "$DB" --developers "$DEVELOPERS" --days "$DAYS" \
    --rows 0 --store "sqlite://$WORK/store.db" >&2
registered_ms=$(( ($(date +%s%N) - start) / 1000000 ))

cat > "$WORK/admin.yaml" <<YAML
listen: 127.0.0.1:$PORT
public_url: http://127.0.0.1:$PORT
database: {url: "sqlite://$WORK/store.db"}
email: {transport: {kind: file, dir: "$WORK/mail"}}
auth: {attempts_per_ip_per_minute: 1000000}
bootstrap_admin: {email: ops@bench.test, password_env: AIHUB_BENCH_ADMIN_PASSWORD}
clickhouse: {url: "$CH", database: "$DB"}
billing: {enabled: false}
YAML
export AIHUB_BENCH_ADMIN_PASSWORD="bench operator password 0000"
RUST_LOG=warn "$T/aihub" admin --config "$WORK/admin.yaml" > /dev/null 2> "$WORK/admin.log" &
ADMIN=$!
until curl -fsS "http://127.0.0.1:$PORT/readyz" > /dev/null 2>&1; do
    kill -0 "$ADMIN" 2> /dev/null || { cat "$WORK/admin.log" >&2; exit 1; }
    sleep 0.05
done

rows_of() { q "SELECT sum(rows) FROM system.parts WHERE database = '$DB' AND table IN ('${1}_live', '${1}_history', '$1') AND active"; }
daily_rows=$(rows_of usage_daily)
hourly_rows=$(rows_of usage_hourly)
developer_daily_rows=$(rows_of usage_developer_daily)
model_daily_rows=$(rows_of usage_model_daily)
mkdir -p loadtests/results
{
    echo "# Usage and analytics benchmark — $(date -u +%FT%TZ), $(nproc) cores"
    echo
    echo "- ClickHouse $(q 'SELECT version()') at $CH, database \`$DB\`: $have usage rows$generated," \
         "$DEVELOPERS developers, $DAYS days (loadtests/usage-gen.sh); rollup rows as stored" \
         "(parts not necessarily merged): usage_daily $daily_rows, usage_hourly $hourly_rows," \
         "usage_developer_daily $developer_daily_rows, usage_model_daily $model_daily_rows."
    if [ -n "$migrated" ]; then echo "$migrated"; fi
    echo "- Control plane: SQLite; $DEVELOPERS developers and their keys registered in ${registered_ms} ms (usage-gen --store)."
    echo "- Admin API: release build, \`aihub admin\`, background billing off; client:" \
         "loadtests/analytics_bench.py on the same machine."
} > "$OUT"
python3 loadtests/analytics_bench.py --base "http://127.0.0.1:$PORT" --email ops@bench.test \
    --password "$AIHUB_BENCH_ADMIN_PASSWORD" --requests "$REQUESTS" --developers "$DEVELOPERS" \
    --days "$DAYS" --out "$OUT" --server-pid "$ADMIN" --title "" --only "$ONLY"
echo >&2
cat "$OUT"
