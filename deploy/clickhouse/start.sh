#!/usr/bin/env bash
# Starts a private ClickHouse server (Debian's clickhouse-server, 18.16 or later) in the
# background, not through systemd, with everything under DATA_DIR:
#
#   deploy/clickhouse/start.sh DATA_DIR [HTTP_PORT] [TCP_PORT]      (defaults 8123 and 9000)
#
# DATA_DIR gets config.xml and users.xml (generated on every start), data/, tmp/, log/,
# user_files/, format_schemas/ and clickhouse.pid. The server listens on 127.0.0.1 only; the
# interserver HTTP port is TCP_PORT+9 (9009 for 9000, 19009 for 19000) unless
# CLICKHOUSE_INTERSERVER_PORT is set, so several instances can run side by side. User `default`,
# no password, connections from localhost only. The time zone is UTC (CLICKHOUSE_TZ overrides).
#
# It runs the server as the calling user, root included (18.16 has no objection to root). With
# CLICKHOUSE_RUN_AS=clickhouse (root only) it chowns DATA_DIR to that user and runs as it.
#
# Returns once http://127.0.0.1:HTTP_PORT/ping answers "Ok." (60 s at most, CLICKHOUSE_START_TIMEOUT);
# if this instance is already up it does nothing. deploy/clickhouse/stop.sh DATA_DIR stops it.
set -euo pipefail

usage() { echo "usage: $0 DATA_DIR [HTTP_PORT] [TCP_PORT]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 3 ] && [ -n "$1" ] || usage
HTTP_PORT=${2:-8123}
TCP_PORT=${3:-9000}
INTERSERVER_PORT=${CLICKHOUSE_INTERSERVER_PORT:-$((TCP_PORT + 9))}
TIMEOUT=${CLICKHOUSE_START_TIMEOUT:-60}
TZ_NAME=${CLICKHOUSE_TZ:-UTC}
RUN_AS=${CLICKHOUSE_RUN_AS:-}

for p in "$HTTP_PORT" "$TCP_PORT" "$INTERSERVER_PORT"; do
    [[ "$p" =~ ^[0-9]+$ ]] && [ "$p" -ge 1 ] && [ "$p" -le 65535 ] || { echo "bad port: $p" >&2; usage; }
done
if [ "$HTTP_PORT" = "$TCP_PORT" ] || [ "$HTTP_PORT" = "$INTERSERVER_PORT" ] || [ "$TCP_PORT" = "$INTERSERVER_PORT" ]; then
    echo "ports must differ: http $HTTP_PORT, tcp $TCP_PORT, interserver $INTERSERVER_PORT" >&2
    exit 2
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# The server binary; installed from the distribution if missing.
SERVER=$(command -v clickhouse-server || true)
if [ -z "$SERVER" ] && [ -x /usr/sbin/clickhouse-server ]; then SERVER=/usr/sbin/clickhouse-server; fi
if [ -z "$SERVER" ]; then
    echo "==> clickhouse-server not found; installing it (apt-get install -y clickhouse-server)" >&2
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y clickhouse-server >&2 \
        || { $SUDO apt-get update >&2 && $SUDO apt-get install -y clickhouse-server >&2; }
    SERVER=$(command -v clickhouse-server || echo /usr/sbin/clickhouse-server)
    [ -x "$SERVER" ] || { echo "clickhouse-server is still missing after apt-get" >&2; exit 1; }
fi
command -v curl >/dev/null 2>&1 || { echo "curl is required" >&2; exit 1; }

mkdir -p "$1"
DATA_DIR=$(cd "$1" && pwd -P)
PID_FILE="$DATA_DIR/clickhouse.pid"
LOG_DIR="$DATA_DIR/log"
LOG="$LOG_DIR/clickhouse-server.log"
ERR_LOG="$LOG_DIR/clickhouse-server.err.log"
STDOUT_LOG="$LOG_DIR/stdout.log"

ping_ok() { [ "$(curl -s --max-time 2 "http://127.0.0.1:$HTTP_PORT/ping" 2>/dev/null)" = "Ok." ]; }

# True when $1 is a live clickhouse-server started with this DATA_DIR's config.
is_our_server() {
    local pid=$1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "--config-file=$DATA_DIR/config.xml"
}

wait_ready() { # pid
    local pid=$1 deadline=$((SECONDS + TIMEOUT))
    while [ $SECONDS -lt $deadline ]; do
        ping_ok && return 0
        kill -0 "$pid" 2>/dev/null || { echo "clickhouse-server (pid $pid) exited during startup" >&2; return 1; }
        sleep 0.2
    done
    echo "clickhouse-server (pid $pid) did not answer http://127.0.0.1:$HTTP_PORT/ping within ${TIMEOUT}s" >&2
    return 1
}

dump_logs() {
    local f
    for f in "$STDOUT_LOG" "$ERR_LOG" "$LOG"; do
        [ -s "$f" ] || continue
        echo "----- $f (last 60 lines) -----" >&2
        tail -n 60 "$f" >&2
    done
}

# Already running? Then there is nothing to do (but wait if it is still starting up).
if [ -f "$PID_FILE" ]; then
    OLD_PID=$(cat "$PID_FILE" 2>/dev/null || true)
    if is_our_server "$OLD_PID"; then
        RUNNING_HTTP=$(sed -n 's:.*<http_port>\([0-9]*\)</http_port>.*:\1:p' "$DATA_DIR/config.xml" 2>/dev/null || true)
        RUNNING_TCP=$(sed -n 's:.*<tcp_port>\([0-9]*\)</tcp_port>.*:\1:p' "$DATA_DIR/config.xml" 2>/dev/null || true)
        if [ "$RUNNING_HTTP" != "$HTTP_PORT" ] || [ "$RUNNING_TCP" != "$TCP_PORT" ]; then
            echo "a clickhouse-server for $DATA_DIR is already running (pid $OLD_PID) with http $RUNNING_HTTP, tcp $RUNNING_TCP;" \
                 "stop it first: deploy/clickhouse/stop.sh $DATA_DIR" >&2
            exit 1
        fi
        if wait_ready "$OLD_PID"; then
            echo "clickhouse-server already running (pid $OLD_PID, http 127.0.0.1:$HTTP_PORT)"
            exit 0
        fi
        echo "a clickhouse-server for $DATA_DIR is running (pid $OLD_PID) but not answering on http port $HTTP_PORT;" \
             "it may use other ports: stop it with deploy/clickhouse/stop.sh $DATA_DIR" >&2
        exit 1
    fi
    rm -f "$PID_FILE"
fi

# Refuse early, with a readable message, when a port is taken (e.g. by the system service).
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$HTTP_PORT" "$TCP_PORT" "$INTERSERVER_PORT"; do
    if port_busy "$p"; then
        echo "port 127.0.0.1:$p is already in use; pick other ports: $0 DATA_DIR HTTP_PORT TCP_PORT" >&2
        command -v ss >/dev/null 2>&1 && ss -ltnp "sport = :$p" >&2 || true
        exit 1
    fi
done

mkdir -p "$DATA_DIR/data" "$DATA_DIR/tmp" "$LOG_DIR" "$DATA_DIR/user_files" "$DATA_DIR/format_schemas"

cat > "$DATA_DIR/config.xml" <<XML
<?xml version="1.0"?>
<!-- Generated by deploy/clickhouse/start.sh; rewritten on every start. -->
<yandex>
    <logger>
        <level>information</level>
        <log>$LOG</log>
        <errorlog>$ERR_LOG</errorlog>
        <size>100M</size>
        <count>3</count>
        <console>0</console>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>$HTTP_PORT</http_port>
    <tcp_port>$TCP_PORT</tcp_port>
    <interserver_http_port>$INTERSERVER_PORT</interserver_http_port>
    <interserver_http_host>127.0.0.1</interserver_http_host>
    <max_connections>1024</max_connections>
    <keep_alive_timeout>10</keep_alive_timeout>
    <max_concurrent_queries>100</max_concurrent_queries>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <mark_cache_size>268435456</mark_cache_size>
    <path>$DATA_DIR/data/</path>
    <tmp_path>$DATA_DIR/tmp/</tmp_path>
    <user_files_path>$DATA_DIR/user_files/</user_files_path>
    <format_schema_path>$DATA_DIR/format_schemas/</format_schema_path>
    <users_config>$DATA_DIR/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>$TZ_NAME</timezone>
    <mlock_executable>false</mlock_executable>
    <builtin_dictionaries_reload_interval>3600</builtin_dictionaries_reload_interval>
    <max_session_timeout>3600</max_session_timeout>
    <default_session_timeout>60</default_session_timeout>
</yandex>
XML

cat > "$DATA_DIR/users.xml" <<'XML'
<?xml version="1.0"?>
<!-- Generated by deploy/clickhouse/start.sh; rewritten on every start. -->
<yandex>
    <profiles>
        <default>
            <max_memory_usage>4000000000</max_memory_usage>
            <use_uncompressed_cache>0</use_uncompressed_cache>
            <load_balancing>random</load_balancing>
        </default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks>
                <ip>127.0.0.1</ip>
                <ip>::1</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
XML

CMD=("$SERVER" "--config-file=$DATA_DIR/config.xml")
if [ -n "$RUN_AS" ] && [ "$RUN_AS" != "$(id -un)" ]; then
    [ "$(id -u)" -eq 0 ] || { echo "CLICKHOUSE_RUN_AS needs root" >&2; exit 1; }
    id "$RUN_AS" >/dev/null 2>&1 || { echo "no such user: $RUN_AS" >&2; exit 1; }
    chown -R "$RUN_AS:$(id -gn "$RUN_AS")" "$DATA_DIR"
    # setpriv execs the server, so the pid we record is the server's own.
    CMD=(setpriv "--reuid=$RUN_AS" "--regid=$(id -gn "$RUN_AS")" --init-groups -- "${CMD[@]}")
fi

: > "$STDOUT_LOG"
# setsid: own session, so the caller's Ctrl-C or hangup does not reach the server. In a
# non-interactive shell the background child is not a group leader, so setsid execs (same pid).
(cd "$DATA_DIR" && exec setsid "${CMD[@]}" </dev/null >>"$STDOUT_LOG" 2>&1) &
PID=$!
echo "$PID" > "$PID_FILE"

if ! wait_ready "$PID"; then
    dump_logs
    kill -TERM "$PID" 2>/dev/null || true
    rm -f "$PID_FILE"
    exit 1
fi

# ClickHouse records its own pid in data/status; prefer it should the two ever differ.
STATUS_PID=$(sed -n 's/^PID: *//p' "$DATA_DIR/data/status" 2>/dev/null || true)
if [ -n "$STATUS_PID" ] && [ "$STATUS_PID" != "$PID" ] && kill -0 "$STATUS_PID" 2>/dev/null; then
    PID=$STATUS_PID
fi
echo "$PID" > "$PID_FILE"
[ -z "$RUN_AS" ] || [ "$(id -u)" -ne 0 ] || chown "$RUN_AS:$(id -gn "$RUN_AS")" "$PID_FILE"
echo "clickhouse-server started (pid $PID): http 127.0.0.1:$HTTP_PORT, tcp 127.0.0.1:$TCP_PORT, interserver $INTERSERVER_PORT, data $DATA_DIR"
