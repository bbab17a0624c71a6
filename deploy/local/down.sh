#!/usr/bin/env bash
# Stops what deploy/local/up.sh started.
set -uo pipefail
cd "$(dirname "$0")/../.."
DATA=${AIHUB_DATA:-$PWD/data/local}
QUIET=0; KEEP_CLICKHOUSE=0
for arg in "$@"; do
    case "$arg" in
        --quiet) QUIET=1 ;;
        --keep-clickhouse) KEEP_CLICKHOUSE=1 ;;
    esac
done
for name in gateway mock-upstream; do
    pidfile="$DATA/$name.pid"
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -INT "$pid" 2>/dev/null
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null
        [ "$QUIET" = 1 ] || echo "stopped $name ($pid)"
    fi
    rm -f "$pidfile"
done
# ClickHouse, when up.sh started it (a reused one is left alone).
if [ "$KEEP_CLICKHOUSE" = 0 ] && [ -f "$DATA/clickhouse/clickhouse.pid" ]; then
    deploy/clickhouse/stop.sh "$DATA/clickhouse" >/dev/null 2>&1 && { [ "$QUIET" = 1 ] || echo "stopped clickhouse"; }
fi
