#!/usr/bin/env bash
# A ClickHouse cluster on one machine, for tests and trials: one ZooKeeper and two replicas of
# one shard (Debian's `zookeeper` and `clickhouse-server`; no systemd), everything under DIR:
#
#   deploy/clickhouse/cluster.sh start DIR [ZK_PORT HTTP1 TCP1 HTTP2 TCP2]
#   deploy/clickhouse/cluster.sh stop DIR
#
# Ports come from the arguments, else from CLUSTER_ZK_PORT, CLUSTER_HTTP1, CLUSTER_TCP1,
# CLUSTER_HTTP2, CLUSTER_TCP2, else 12181, 18124, 19100, 18125, 19200. Each replica's
# interserver port is its TCP port + 9 (deploy/clickhouse/start.sh). The cluster is named
# CLUSTER_NAME (default `aihub`); the replicas' macros are shard `01`, replica `r1` and `r2`.
#
# DIR gets zookeeper/ (zoo.cfg, data/, zookeeper.log, zookeeper.pid), r1/ and r2/ (each a
# deploy/clickhouse/start.sh data directory plus config.d/cluster.xml) and ports (what `start`
# used). `start` installs `zookeeper` with apt-get when /usr/share/java/zookeeper.jar is missing
# (clickhouse-server is installed by start.sh the same way), starts ZooKeeper (java, directly)
# and both replicas, and returns once both answer and show the cluster in system.clusters and
# reach ZooKeeper (CLUSTER_START_TIMEOUT, default 90 s). Running it again on a started DIR
# does nothing. With CLUSTER_WATCH_PID=PID it also leaves a watcher behind that runs `stop DIR`
# once process PID has exited (and, with CLUSTER_WATCH_REMOVE=1, deletes DIR), whether the
# start worked or not: tests use it so that nothing outlives them.
#
# One replica alone: deploy/clickhouse/stop.sh DIR/r2, then deploy/clickhouse/start.sh DIR/r2
# HTTP2 TCP2 (its config.d/cluster.xml stays).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd -P)
usage() {
    echo "usage: $0 start DIR [ZK_PORT HTTP1 TCP1 HTTP2 TCP2] | $0 stop DIR" >&2
    exit 2
}
[ $# -ge 2 ] && [ -n "$2" ] || usage
ACTION=$1
NAME=${CLUSTER_NAME:-aihub}
[[ "$NAME" =~ ^[A-Za-z0-9_]+$ ]] || { echo "CLUSTER_NAME: letters, digits and _ only" >&2; exit 2; }

zk_pid_ok() { # pid zoo.cfg: a live ZooKeeper started with this config
    [ -n "$1" ] && kill -0 "$1" 2>/dev/null \
        && tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null | grep -qF -- "ZooKeeperServerMain $2"
}

stop_cluster() { # DIR
    local dir=$1 pid
    [ -d "$dir" ] || { echo "no such directory: $dir (nothing to stop)"; return 0; }
    dir=$(cd "$dir" && pwd -P)
    local rc=0
    for r in r1 r2; do
        [ -d "$dir/$r" ] && { "$HERE/stop.sh" "$dir/$r" || rc=1; }
    done
    pid=$(cat "$dir/zookeeper/zookeeper.pid" 2>/dev/null || true)
    if zk_pid_ok "$pid" "$dir/zookeeper/zoo.cfg"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
        echo "zookeeper stopped (pid $pid)"
    fi
    rm -f "$dir/zookeeper/zookeeper.pid"
    return $rc
}

case "$ACTION" in
    stop)
        [ $# -eq 2 ] || usage
        stop_cluster "$2"
        exit $?
        ;;
    start) ;;
    *) usage ;;
esac

[ $# -eq 2 ] || [ $# -eq 7 ] || usage
if [ $# -eq 7 ]; then
    ZK_PORT=$3 HTTP1=$4 TCP1=$5 HTTP2=$6 TCP2=$7
else
    ZK_PORT=${CLUSTER_ZK_PORT:-12181}
    HTTP1=${CLUSTER_HTTP1:-18124} TCP1=${CLUSTER_TCP1:-19100}
    HTTP2=${CLUSTER_HTTP2:-18125} TCP2=${CLUSTER_TCP2:-19200}
fi
for p in "$ZK_PORT" "$HTTP1" "$TCP1" "$HTTP2" "$TCP2"; do
    [[ "$p" =~ ^[0-9]+$ ]] && [ "$p" -ge 1 ] && [ "$p" -le 65526 ] || { echo "bad port: $p" >&2; usage; }
done
ALL="$ZK_PORT $HTTP1 $TCP1 $((TCP1 + 9)) $HTTP2 $TCP2 $((TCP2 + 9))"
if [ "$(tr ' ' '\n' <<<"$ALL" | sort -u | wc -l)" -ne 7 ]; then
    echo "ports must differ (interserver = TCP + 9): $ALL" >&2
    exit 2
fi
TIMEOUT=${CLUSTER_START_TIMEOUT:-90}
command -v curl >/dev/null 2>&1 || { echo "curl is required" >&2; exit 1; }

mkdir -p "$2"
DIR=$(cd "$2" && pwd -P)
ZK_DIR=$DIR/zookeeper
ZK_CFG=$ZK_DIR/zoo.cfg

# The watcher comes first, so that a start failing halfway is cleaned up too.
if [ -n "${CLUSTER_WATCH_PID:-}" ]; then
    [[ "$CLUSTER_WATCH_PID" =~ ^[0-9]+$ ]] || { echo "CLUSTER_WATCH_PID: a process id" >&2; exit 2; }
    REMOVE=${CLUSTER_WATCH_REMOVE:-0}
    # Its own session, no inherited descriptors: the caller's pipes close when this script ends.
    setsid bash -c '
        while kill -0 "$1" 2>/dev/null; do sleep 1; done
        "$2" stop "$3"
        [ "$4" != 1 ] || rm -rf -- "$3"
    ' watcher "$CLUSTER_WATCH_PID" "$HERE/cluster.sh" "$DIR" "$REMOVE" \
        </dev/null >>"$DIR/watcher.log" 2>&1 &
fi

# A DIR started with other ports must be stopped first (its replicas keep their ZooKeeper).
if [ -f "$DIR/ports" ] && [ "$(cat "$DIR/ports")" != "$ALL" ]; then
    pid=$(cat "$ZK_DIR/zookeeper.pid" 2>/dev/null || true)
    if zk_pid_ok "$pid" "$ZK_CFG"; then
        echo "$DIR runs with ports $(cat "$DIR/ports"); stop it first: $0 stop $DIR" >&2
        exit 1
    fi
fi

# ZooKeeper: Debian's package, run with java directly (its init integration needs systemd).
ZK_JAR=/usr/share/java/zookeeper.jar
if [ ! -f "$ZK_JAR" ]; then
    echo "==> $ZK_JAR not found; installing zookeeper (apt-get install -y zookeeper)" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y zookeeper >&2 \
        || { $SUDO apt-get update >&2 && $SUDO apt-get install -y zookeeper >&2; }
    [ -f "$ZK_JAR" ] || { echo "zookeeper is still missing after apt-get" >&2; exit 1; }
fi
command -v java >/dev/null 2>&1 || { echo "java is required (default-jre)" >&2; exit 1; }

zk_ok() { # "imok" on the 4-letter-word port
    local answer
    answer=$( (exec 3<>"/dev/tcp/127.0.0.1/$ZK_PORT" && printf ruok >&3 && timeout 2 cat <&3) 2>/dev/null) || return 1
    [ "$answer" = imok ]
}
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

mkdir -p "$ZK_DIR/data"
ZK_PID=$(cat "$ZK_DIR/zookeeper.pid" 2>/dev/null || true)
if ! zk_pid_ok "$ZK_PID" "$ZK_CFG"; then
    if port_busy "$ZK_PORT"; then
        echo "port 127.0.0.1:$ZK_PORT is already in use; pick another ZK_PORT" >&2
        exit 1
    fi
    cat > "$ZK_CFG" <<CFG
# Generated by deploy/clickhouse/cluster.sh; rewritten on every start.
tickTime=2000
dataDir=$ZK_DIR/data
clientPort=$ZK_PORT
clientPortAddress=127.0.0.1
admin.enableServer=false
4lw.commands.whitelist=ruok,srvr
autopurge.purgeInterval=1
CFG
    cat > "$ZK_DIR/log4j.properties" <<'CFG'
log4j.rootLogger=WARN, CONSOLE
log4j.appender.CONSOLE=org.apache.log4j.ConsoleAppender
log4j.appender.CONSOLE.layout=org.apache.log4j.PatternLayout
log4j.appender.CONSOLE.layout.ConversionPattern=%d{ISO8601} %-5p [%t] %c{1}: %m%n
CFG
    # The jar's manifest Class-Path brings the other libraries.
    (cd "$ZK_DIR" && exec setsid java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
        "-Dlog4j.configuration=file:$ZK_DIR/log4j.properties" \
        -cp "$ZK_JAR:/usr/share/java/log4j-1.2.jar:/usr/share/java/slf4j-log4j12.jar" \
        org.apache.zookeeper.server.ZooKeeperServerMain "$ZK_CFG" \
        </dev/null >>"$ZK_DIR/zookeeper.log" 2>&1) &
    ZK_PID=$!
    echo "$ZK_PID" > "$ZK_DIR/zookeeper.pid"
    deadline=$((SECONDS + 30))
    until zk_ok; do
        if ! kill -0 "$ZK_PID" 2>/dev/null || [ $SECONDS -ge $deadline ]; then
            echo "zookeeper did not answer on 127.0.0.1:$ZK_PORT" >&2
            tail -n 40 "$ZK_DIR/zookeeper.log" >&2 || true
            kill -TERM "$ZK_PID" 2>/dev/null || true
            rm -f "$ZK_DIR/zookeeper.pid"
            exit 1
        fi
        sleep 0.2
    done
    echo "zookeeper started (pid $ZK_PID): 127.0.0.1:$ZK_PORT, data $ZK_DIR/data"
fi
echo "$ALL" > "$DIR/ports"

cluster_xml() { # replica-name
    cat <<XML
<?xml version="1.0"?>
<!-- Generated by deploy/clickhouse/cluster.sh; rewritten on every start. -->
<yandex>
    <zookeeper>
        <node><host>127.0.0.1</host><port>$ZK_PORT</port></node>
        <session_timeout_ms>30000</session_timeout_ms>
    </zookeeper>
    <remote_servers>
        <$NAME>
            <shard>
                <internal_replication>true</internal_replication>
                <replica><host>127.0.0.1</host><port>$TCP1</port></replica>
                <replica><host>127.0.0.1</host><port>$TCP2</port></replica>
            </shard>
        </$NAME>
    </remote_servers>
    <macros>
        <shard>01</shard>
        <replica>$1</replica>
    </macros>
    <distributed_ddl>
        <path>/clickhouse/task_queue/ddl</path>
    </distributed_ddl>
</yandex>
XML
}

mkdir -p "$DIR/r1/config.d" "$DIR/r2/config.d"
cluster_xml r1 > "$DIR/r1/config.d/cluster.xml"
cluster_xml r2 > "$DIR/r2/config.d/cluster.xml"

# Both replicas at once (each start.sh waits for its own /ping).
"$HERE/start.sh" "$DIR/r1" "$HTTP1" "$TCP1" > "$DIR/r1.start.log" 2>&1 &
S1=$!
"$HERE/start.sh" "$DIR/r2" "$HTTP2" "$TCP2" > "$DIR/r2.start.log" 2>&1 &
S2=$!
rc=0
wait $S1 || rc=1
wait $S2 || rc=1
cat "$DIR/r1.start.log" "$DIR/r2.start.log"
[ $rc -eq 0 ] || { echo "a replica did not start" >&2; exit 1; }

# Ready: each replica lists both replicas of the cluster and reaches ZooKeeper.
ask() { curl -s --max-time 5 "http://127.0.0.1:$1/" --data-binary "$2" 2>/dev/null || true; }
deadline=$((SECONDS + TIMEOUT))
for http in "$HTTP1" "$HTTP2"; do
    until [ "$(ask "$http" "SELECT count() FROM system.clusters WHERE cluster = '$NAME'")" = 2 ] \
        && [[ "$(ask "$http" "SELECT count() FROM system.zookeeper WHERE path = '/'")" =~ ^[0-9]+$ ]]; do
        if [ $SECONDS -ge $deadline ]; then
            echo "replica on http port $http does not show cluster $NAME or reach ZooKeeper within ${TIMEOUT}s" >&2
            exit 1
        fi
        sleep 0.2
    done
done

echo "cluster $NAME up: zookeeper 127.0.0.1:$ZK_PORT; r1 http $HTTP1 tcp $TCP1; r2 http $HTTP2 tcp $TCP2; data $DIR"
