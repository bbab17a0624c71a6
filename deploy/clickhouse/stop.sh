#!/usr/bin/env bash
# Stops the ClickHouse server that deploy/clickhouse/start.sh DATA_DIR started: SIGTERM, up to
# 30 s (CLICKHOUSE_STOP_TIMEOUT) for a clean shutdown, then SIGKILL. Does nothing if it is not running.
set -uo pipefail

[ $# -eq 1 ] && [ -n "$1" ] || { echo "usage: $0 DATA_DIR" >&2; exit 2; }
[ -d "$1" ] || { echo "no such directory: $1 (nothing to stop)"; exit 0; }
DATA_DIR=$(cd "$1" && pwd -P)
PID_FILE="$DATA_DIR/clickhouse.pid"
TIMEOUT=${CLICKHOUSE_STOP_TIMEOUT:-30}

PID=$(cat "$PID_FILE" 2>/dev/null || true)
# Only signal a live clickhouse-server that runs this DATA_DIR's config (never a recycled pid).
if [ -z "$PID" ] || ! kill -0 "$PID" 2>/dev/null \
    || ! tr '\0' ' ' < "/proc/$PID/cmdline" 2>/dev/null | grep -qF -- "--config-file=$DATA_DIR/config.xml"; then
    rm -f "$PID_FILE"
    echo "clickhouse-server for $DATA_DIR is not running"
    exit 0
fi

kill -TERM "$PID" 2>/dev/null
deadline=$((SECONDS + TIMEOUT))
while kill -0 "$PID" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
if kill -0 "$PID" 2>/dev/null; then
    echo "clickhouse-server (pid $PID) still running after ${TIMEOUT}s; sending SIGKILL" >&2
    kill -KILL "$PID" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
fi
rm -f "$PID_FILE"
echo "clickhouse-server stopped (pid $PID)"
