#!/usr/bin/env bash
# Invoice generation and reconciliation over realistic usage (issue 6's benchmark):
#
#   loadtests/billing-bench.sh [--database aihub_bench] [--rows 10000000] [--postgres]
#
# 1. Fills the ClickHouse database with loadtests/usage-gen.sh (10,000 developers, Zipf-like
#    traffic, ROWS rows over 90 days; reused when it already holds at least ROWS rows) and
#    registers the generated developers (dev_gen_00000…, plans spread over Free, Developer, Pro
#    and Enterprise) in a fresh SQLite store (and, with --postgres, a fresh PostgreSQL database).
# 2. Times `aihub billing generate --period P --finalize` for the last closed month, P: every
#    developer's invoice from the hourly rollup (raw rows for the hours that must be split),
#    saved and finalized. Then again: the second run finds every invoice finalized.
# 3. Times `aihub billing reconcile --period P`: every invoice recomputed from every raw row.
#
# Results go to loadtests/results/billing-latest.md. Needs ClickHouse on CLICKHOUSE_URL
# (default http://127.0.0.1:8123; deploy/local/up.sh or deploy/clickhouse/start.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DB=aihub_bench
ROWS=10000000
POSTGRES=0
while [ $# -gt 0 ]; do
    case "$1" in
        --database) DB=$2; shift 2 ;;
        --rows) ROWS=$2; shift 2 ;;
        --postgres) POSTGRES=1; shift ;;
        *) echo "usage: $0 [--database DB] [--rows N] [--postgres]" >&2; exit 2 ;;
    esac
done
CH=${CLICKHOUSE_URL:-http://127.0.0.1:8123}
WORK=${BILLING_BENCH_DIR:-/var/tmp/aihub-billing-bench}
PG_ADMIN=${AIHUB_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}
OUT=loadtests/results/billing-latest.md

source deploy/local/deps.sh
cargo build --release -p aihub -p aihub-benches --bin aihub --bin usage-gen
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}/release
rm -rf "$WORK" && mkdir -p "$WORK"

have=$(curl -sS "$CH/?database=$DB" --data-binary "SELECT count() FROM usage_events" 2>/dev/null || echo 0)
case "$have" in ''|*[!0-9]*) have=0 ;; esac
if [ "$have" -eq 0 ]; then
    echo "==> generating $ROWS usage rows into $DB" >&2
    "$TARGET/usage-gen" --clickhouse "$CH" --database "$DB" --rows "$ROWS"
elif [ "$have" -lt "$ROWS" ]; then
    echo "$DB holds $have rows, fewer than $ROWS (another run still filling it?): wait, drop it or pass --database" >&2
    exit 1
else
    echo "==> reusing $DB ($have rows)" >&2
fi

PERIOD=$(date -u -d "$(date -u +%Y-%m-01) -1 month" +%Y-%m)
rows_in_period=$(curl -sS "$CH/?database=$DB" --data-binary \
    "SELECT count() FROM usage_events WHERE toYYYYMM(ts) = toYYYYMM(toDate('$PERIOD-01'))")

run() { # label, store url
    local label=$1 url=$2
    echo "==> $label: registering developers" >&2
    "$TARGET/usage-gen" --clickhouse "$CH" --database "$DB" --rows 0 --store "$url" >&2
    cat > "$WORK/admin-$label.yaml" <<YAML
database:
  url: "$url"
clickhouse:
  url: "$CH"
  database: $DB
billing:
  enabled: false
YAML
    local t0 t1 t2 t3
    t0=$(date +%s.%N)
    "$TARGET/aihub" billing generate --period "$PERIOD" --finalize --admin-config "$WORK/admin-$label.yaml" | tee "$WORK/generate-$label.txt" >&2
    t1=$(date +%s.%N)
    "$TARGET/aihub" billing generate --period "$PERIOD" --admin-config "$WORK/admin-$label.yaml" | tee "$WORK/regenerate-$label.txt" >&2
    t2=$(date +%s.%N)
    "$TARGET/aihub" billing reconcile --period "$PERIOD" --admin-config "$WORK/admin-$label.yaml" > "$WORK/reconcile-$label.txt" || true
    t3=$(date +%s.%N)
    tail -3 "$WORK/reconcile-$label.txt" >&2
    {
        echo "### $label"
        echo
        echo "| step | wall time | output |"
        echo "|---|---|---|"
        printf '| generate + finalize (first run) | %.1f s | %s |\n' "$(echo "$t1 - $t0" | bc)" "$(tr '\n' ' ' < "$WORK/generate-$label.txt")"
        printf '| generate again (all finalized) | %.1f s | %s |\n' "$(echo "$t2 - $t1" | bc)" "$(tr '\n' ' ' < "$WORK/regenerate-$label.txt")"
        printf '| reconcile (every raw row) | %.1f s | %s |\n' "$(echo "$t3 - $t2" | bc)" "$(head -1 "$WORK/reconcile-$label.txt"); $(grep -E '^(OK|[0-9]+ problem)' "$WORK/reconcile-$label.txt" | head -1)"
        echo
    } >> "$WORK/results.md"
}

aihub_apt_install bc >/dev/null
run sqlite "sqlite://$WORK/store.db"
if [ "$POSTGRES" = 1 ]; then
    name=aihub_billing_bench
    base=${PG_ADMIN%/*}
    psql "$PG_ADMIN" -qc "DROP DATABASE IF EXISTS $name" -c "CREATE DATABASE $name" >&2
    run postgres "$base/$name"
fi

{
    echo "# Billing benchmark"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores. ClickHouse $(curl -sS "$CH/" --data-binary 'SELECT version()'),"
    echo "database \`$DB\`: $(curl -sS "$CH/?database=$DB" --data-binary 'SELECT count() FROM usage_events') usage rows over 90 days,"
    echo "10,000 developers; period $PERIOD holds $rows_in_period rows."
    echo "Command: \`loadtests/billing-bench.sh$([ "$POSTGRES" = 1 ] && echo ' --postgres')\`."
    echo
    cat "$WORK/results.md"
} > "$OUT"
cat "$OUT"
