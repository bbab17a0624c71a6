#!/usr/bin/env bash
# Control-plane benchmarks on PostgreSQL (issue: "with 10,000 developers and 100,000 keys"):
#   1. seeds a scratch database `aihub_bench` with DEVELOPERS developers × KEYS_PER keys;
#   2. starts the release admin API on it, and a gateway following its keys;
#   3. gateway start-up: time until /readyz (initial key load) and resident memory;
#   4. admin API: key list and key create, CLIENTS concurrent clients for SECONDS each, closed
#      loop (saturation) and open loop at OPEN_RATES requests/s;
#   5. revocation propagation over TRIALS trials: polling only, then with Redis push.
# Figures go to stdout and to loadtests/results/controlplane-latest.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVELOPERS=${DEVELOPERS:-10000}
KEYS_PER=${KEYS_PER:-10}
CLIENTS=${CLIENTS:-50}
SECONDS_EACH=${SECONDS_EACH:-20}
TRIALS=${TRIALS:-100}
OPEN_RATES=${OPEN_RATES:-200 1000}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
REDIS=${REDIS:-redis://127.0.0.1:6379}
DB=aihub_bench
source deploy/local/deps.sh
cargo build --release -p aihub
cargo build --release -p aihub-benches --bin controlplane-bench
T=${CARGO_TARGET_DIR:-$PWD/target}/release
TMP=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
OUT=loadtests/results/controlplane-latest.md
mkdir -p loadtests/results
log() { echo "$*" | tee -a "$OUT.tmp"; }
bench() { "$T/controlplane-bench" "$@" || { echo "controlplane-bench $1 failed" >&2; exit 1; }; }
: > "$OUT.tmp"

psql "$PG/test" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
log "# Control-plane benchmark — $(date -u +%FT%TZ), $(nproc) cores"
log
r=$(bench seed "$PG/$DB" "$DEVELOPERS" "$KEYS_PER"); log "- seed: $r"

admin_config() { # $1 = port, $2 = redis url or empty
    cat <<YAML
listen: 127.0.0.1:$1
database: {url: "$PG/$DB", max_connections: 16}
email: {transport: {kind: file, dir: "$TMP/mail"}}
# The load client signs in 50 developers from one address and creates many keys each.
auth: {attempts_per_ip_per_minute: 1000000}
keys: {max_per_developer: 1000000}
$( [ -n "$2" ] && echo "redis: {url: \"$2\"}" )
YAML
}
gateway_config() { # $1 = port, $2 = ops port, $3 = redis url or empty
    cat <<YAML
server: {listen: ["127.0.0.1:$1"], ops_listen: "127.0.0.1:$2", threads: 1}
upstreams: {mock: {endpoints: ["http://127.0.0.1:19290/v1"]}}
routes: [{model: mock-gpt, upstream: mock}]
control_plane:
  database_url: "$PG/$DB"
$( [ -n "$3" ] && echo "  redis_url: \"$3\"" )
YAML
}
wait_ready() { # $1 = url, $2 = pid, $3 = log
    until curl -fsS "$1" >/dev/null 2>&1; do
        kill -0 "$2" 2>/dev/null || { cat "$3"; exit 1; }
        sleep 0.02
    done
}

run_pair() { # $1 = label, $2 = redis url or empty; starts admin + gateway, measures, stops
    admin_config 19281 "$2" > "$TMP/admin.yaml"
    gateway_config 19282 19283 "$2" > "$TMP/gateway.yaml"
    RUST_LOG=warn "$T/aihub" admin --config "$TMP/admin.yaml" > /dev/null 2> "$TMP/admin.log" & ADMIN=$!
    PIDS+=($ADMIN)
    wait_ready http://127.0.0.1:19281/readyz $ADMIN "$TMP/admin.log"
    start=$(date +%s%N)
    RUST_LOG=warn "$T/aihub" gateway --config "$TMP/gateway.yaml" 2> "$TMP/gw.log" & GW=$!
    PIDS+=($GW)
    wait_ready http://127.0.0.1:19283/readyz $GW "$TMP/gw.log"
    ready=$(date +%s%N)
    keys=$(curl -s http://127.0.0.1:19283/metrics | awk '/^aihub_keys_loaded/ {print $2}')
    rss=$(awk '/VmRSS/ {print $2}' /proc/$GW/status)
    hwm=$(awk '/VmHWM/ {print $2}' /proc/$GW/status)
    if [ "$1" = polling ]; then
        log "- gateway start-up: $keys keys loaded from PostgreSQL, ready after $(((ready - start) / 1000000)) ms (process start to /readyz); VmRSS $((rss / 1024)) MiB, peak VmHWM $((hwm / 1024)) MiB"
        r=$(bench api http://127.0.0.1:19281 "$CLIENTS" "$SECONDS_EACH" list); log "- admin API $r"
        r=$(bench api http://127.0.0.1:19281 "$CLIENTS" "$SECONDS_EACH" create); log "- admin API $r"
        for rate in $OPEN_RATES; do
            r=$(bench api http://127.0.0.1:19281 "$CLIENTS" "$SECONDS_EACH" list "$rate"); log "- admin API $r"
            r=$(bench api http://127.0.0.1:19281 "$CLIENTS" "$SECONDS_EACH" create "$rate"); log "- admin API $r"
        done
    fi
    r=$(bench propagation http://127.0.0.1:19281 http://127.0.0.1:19282 "$TRIALS"); log "- $1: $r"
    kill $GW $ADMIN; wait $GW $ADMIN 2>/dev/null || true
}

run_pair polling ""
if redis-cli -u "$REDIS" ping >/dev/null 2>&1; then
    run_pair "redis push" "$REDIS"
fi
psql "$PG/test" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
mv "$OUT.tmp" "$OUT"
