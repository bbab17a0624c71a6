#!/usr/bin/env bash
# Stops what deploy/local/up.sh started.
set -uo pipefail
cd "$(dirname "$0")/../.."
DATA=${AIHUB_DATA:-$PWD/data/local}
for name in gateway mock-upstream; do
    pidfile="$DATA/$name.pid"
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -INT "$pid" 2>/dev/null
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null
        [ "${1:-}" = "--quiet" ] || echo "stopped $name ($pid)"
    fi
    rm -f "$pidfile"
done
