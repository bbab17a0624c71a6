#!/usr/bin/env bash
# A/B of two aihub binaries' CPU per request on the full metered path (issue 21: the usage record
# written into the WAL before the response's last byte): the same gateway config for both (one
# worker thread pinned to PROXY_CPU, a declared key, metering into ClickHouse, no limits), the
# mock upstream and wrk (closed loop) on LOAD_CPU, ROUNDS rounds alternating old/new (new/old on
# odd rounds), DURATION s each. CPU µs per request = utime+stime of the gateway (/proc/PID/stat)
# over the requests wrk completed. Usage rows are checked against the requests at the end.
#
#   loadtests/ab-cpu.sh OLD_BIN NEW_BIN
# Env: ROUNDS (4), DURATION (5), CONNECTIONS (50), STREAM (0: JSON; 1: SSE), PROXY_CPU (0),
# LOAD_CPU (1), CLICKHOUSE_URL (http://127.0.0.1:8123; a database of its own, dropped at the end).
# Ports 19980-19984. Needs wrk (apt) and a running ClickHouse.
set -euo pipefail
[ $# -eq 2 ] || { sed -n '2,13p' "$0"; exit 2; }
OLD=$1 NEW=$2
ROUNDS=${ROUNDS:-4} DURATION=${DURATION:-5} CONNECTIONS=${CONNECTIONS:-50} STREAM=${STREAM:-0}
PROXY_CPU=${PROXY_CPU:-0} LOAD_CPU=${LOAD_CPU:-1}
CH=${CLICKHOUSE_URL:-http://127.0.0.1:8123}
DB=aihub_ab_$(date -u +%Y%m%d_%H%M%S)_$$
TMP=$(mktemp -d /tmp/aihub-ab.XXXXXX)
PIDS=()
cleanup() {
    set +e
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    wait 2>/dev/null
    curl -s "$CH" --data-binary "DROP DATABASE IF EXISTS $DB" >/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT
command -v wrk >/dev/null || { echo "wrk missing (apt-get install wrk)" >&2; exit 1; }
[ "$(curl -s "$CH/ping")" = "Ok." ] || { echo "ClickHouse does not answer at $CH" >&2; exit 1; }

taskset -c "$LOAD_CPU" "$NEW" mock-upstream --listen 127.0.0.1:19980 --threads 1 >"$TMP/mock.log" 2>&1 &
PIDS+=($!)
"$NEW" keys generate --id key_ab --developer dev_ab --key-file "$TMP/key" | grep -v '^#' >"$TMP/key.yaml"
KEY=$(cat "$TMP/key")
start_gateway() { # NAME BIN PORT
    local name=$1 bin=$2 port=$3
    cat >"$TMP/$name.yaml" <<EOF
server: {listen: ["127.0.0.1:$port"], ops_listen: "127.0.0.1:$((port + 1))", threads: 1,
         pid_file: "$TMP/$name.pid", upgrade_sock: "$TMP/$name.sock"}
upstreams: {mock: {endpoints: ["http://127.0.0.1:19980/v1"]}}
routes: [{model: mock-gpt, upstream: mock}]
metering: {clickhouse: {url: "$CH", database: $DB}, wal_dir: "$TMP/wal-$name"}
keys:
$(cat "$TMP/key.yaml")
EOF
    taskset -c "$PROXY_CPU" "$bin" gateway --config "$TMP/$name.yaml" >"$TMP/$name.log" 2>&1 &
    PIDS+=($!)
    eval "${name}_PID=$!"
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$((port + 1))/readyz" >/dev/null && return 0
        sleep 0.1
    done
    echo "$name did not become ready:" >&2; tail -20 "$TMP/$name.log" >&2; exit 1
}
start_gateway old "$OLD" 19981
start_gateway new "$NEW" 19983

STREAM_JSON=$([ "$STREAM" = 1 ] && echo true || echo false)
cat >"$TMP/post.lua" <<EOF
wrk.method = "POST"
wrk.body = '{"model":"mock-gpt","stream":$STREAM_JSON,"messages":[{"role":"user","content":"Say hello"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $KEY"
EOF
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
declare -A CPU REQS
run() { # NAME PID PORT ROUND
    local before after out n
    taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d1s -s "$TMP/post.lua" "http://127.0.0.1:$3/v1/chat/completions" >/dev/null
    before=$(ticks "$2")
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" -s "$TMP/post.lua" "http://127.0.0.1:$3/v1/chat/completions")
    after=$(ticks "$2")
    n=$(echo "$out" | awk '/requests in/ {print $1}')
    if echo "$out" | grep -q "Non-2xx"; then echo "$1: non-2xx answers:" >&2; echo "$out" >&2; exit 1; fi
    local us; us=$(awk -v t=$((after - before)) -v hz="$hz" -v n="$n" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}')
    printf '  round %d %-3s %8d req  %6.0f req/s  %s µs/req\n' "$4" "$1" "$n" "$(awk -v n="$n" -v d="$DURATION" 'BEGIN {print n / d}')" "$us"
    CPU[$1]+="$us "
    REQS[$1]=$(( ${REQS[$1]:-0} + n ))
}
echo "A/B: old=$OLD new=$NEW, $([ "$STREAM" = 1 ] && echo SSE || echo JSON), $ROUNDS rounds × ${DURATION}s, wrk -c$CONNECTIONS; $(uptime | sed 's/.*load/load/')"
for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then
        run old "$old_PID" 19981 "$r"; run new "$new_PID" 19983 "$r"
    else
        run new "$new_PID" 19983 "$r"; run old "$old_PID" 19981 "$r"
    fi
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {if (NR % 2) print a[(NR+1)/2]; else printf "%.1f\n", (a[NR/2] + a[NR/2+1]) / 2}'; }
mo=$(echo "${CPU[old]}" | median) mn=$(echo "${CPU[new]}" | median)
echo "median CPU µs/req: old $mo, new $mn ($(awk -v o="$mo" -v n="$mn" 'BEGIN {printf "%+.1f %%", (n - o) / o * 100}'))"
# Every request metered: rows equal the requests both gateways answered (warm-ups included).
sleep 3
rows=$(curl -s "$CH/?database=$DB" --data-binary "SELECT count() FROM usage_events")
echo "usage rows: $rows (timed requests: $(( ${REQS[old]} + ${REQS[new]} )) plus the 1 s warm-ups)"
