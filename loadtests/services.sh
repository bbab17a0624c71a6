# Sourced by the load scripts that run the platform against its real services (soak.sh,
# multinode-bench.sh). Needs REDIS_URL and CLICKHOUSE_URL set and deploy/local/deps.sh sourced.
#
#   bench_services PREFIX CH_DIR   checks that PostgreSQL (127.0.0.1:5432, user postgres, trust)
#                                  and Redis answer, starts a private ClickHouse under CH_DIR when
#                                  nothing answers on CLICKHOUSE_URL, creates the database
#                                  PREFIX_<UTC time>_<pid> and exports its URL as
#                                  BENCH_DATABASE_URL; on exit the database is dropped (FORCE) and
#                                  the ClickHouse it started stopped, whatever failed before.
#   bench_run SCRIPT.py            runs the Python driver in the background (so that a TERM or INT
#                                  reaches it at once; its children die with it) and exits with
#                                  its status.
PG=(psql -h 127.0.0.1 -p 5432 -U postgres -v ON_ERROR_STOP=1 -qAt)
BENCH_CH_DIR=""
BENCH_CH_STARTED=""
BENCH_DB=""
BENCH_PY=""

bench_cleanup() {
    set +e  # every step, whatever the previous one did
    if [ -n "$BENCH_PY" ]; then kill -TERM "$BENCH_PY" 2>/dev/null && wait "$BENCH_PY" 2>/dev/null; fi
    if [ -n "$BENCH_DB" ]; then
        "${PG[@]}" -d postgres -c "DROP DATABASE IF EXISTS $BENCH_DB WITH (FORCE)" \
            || echo "could not drop $BENCH_DB" >&2
    fi
    if [ -n "$BENCH_CH_STARTED" ]; then deploy/clickhouse/stop.sh "$BENCH_CH_DIR" >/dev/null || true; fi
}

bench_services() {
    local prefix=$1 port
    BENCH_CH_DIR=$2
    for tool in psql:postgresql-client redis-cli:redis-tools curl:curl python3:python3; do
        command -v "${tool%%:*}" >/dev/null 2>&1 || aihub_apt_install "${tool#*:}"
    done
    "${PG[@]}" -d postgres -c 'SELECT 1' >/dev/null \
        || { echo "PostgreSQL does not answer on 127.0.0.1:5432 (user postgres, trust)" >&2; exit 1; }
    [ "$(redis-cli -u "$REDIS_URL" PING 2>/dev/null)" = PONG ] \
        || { echo "Redis does not answer at ${REDIS_URL##*@}" >&2; exit 1; }
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    if ! curl -fsS "$CLICKHOUSE_URL/ping" >/dev/null 2>&1; then
        port=${CLICKHOUSE_URL##*:}
        deploy/clickhouse/start.sh "$BENCH_CH_DIR" "$port" $((port + 877))
        BENCH_CH_STARTED=1
    fi
    local db
    db=${prefix}_$(date -u +%Y%m%d_%H%M%S)_$$
    "${PG[@]}" -d postgres -c "CREATE DATABASE $db"
    BENCH_DB=$db
    export BENCH_DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db"
}

bench_run() {
    python3 "$1" & BENCH_PY=$!
    local rc=0
    wait "$BENCH_PY" || rc=$?
    BENCH_PY=""
    exit "$rc"
}
