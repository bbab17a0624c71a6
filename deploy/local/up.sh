#!/usr/bin/env bash
# Starts AI Hub locally: builds `aihub` (release), starts ClickHouse, the mock upstream, and
# `aihub serve` (the gateway and the admin API in one process, sharing an SQLite control-plane
# database) with config/gateway.yaml and config/admin.yaml plus a demo key, and prints how to use
# it. Ctrl-C stops everything it started; with --detach it returns and deploy/local/down.sh stops
# it. Running it again over the same data directory keeps its data, keys and accounts.
#
# The local configuration files ($DATA/gateway.yaml, $DATA/admin.yaml) are the reference files
# with the local settings ($DATA/*.overrides.yaml: ports, paths, the demo key) merged in by
# deploy/local/merge-config.sh, each setting once. deploy/local/smoke.sh (run by test.sh) tests
# this script.
#
# Ports: GATEWAY_PORT (8080), OPS_PORT (9091), ADMIN_PORT (8081), MOCK_PORT (9090), ClickHouse
# CLICKHOUSE_PORT (8123, native 9000). State: data/local/ (AIHUB_DATA): ClickHouse data, usage
# WAL, control-plane database, mail folder, demo key, operator password, logs.
# Setting OPENAI_API_KEY adds the real OpenAI models (gpt-4o, gpt-4o-mini, text-embedding-3-small).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DATA=${AIHUB_DATA:-$ROOT/data/local}
GATEWAY_PORT=${GATEWAY_PORT:-8080}
OPS_PORT=${OPS_PORT:-9091}
ADMIN_PORT=${ADMIN_PORT:-8081}
MOCK_PORT=${MOCK_PORT:-9090}
CLICKHOUSE_PORT=${CLICKHOUSE_PORT:-8123}
DETACH=0
[ "${1:-}" = "--detach" ] && DETACH=1

source deploy/local/deps.sh
"$ROOT/deploy/local/down.sh" --quiet --keep-clickhouse || true
mkdir -p "$DATA"

# ClickHouse (Debian's clickhouse-server, installed when missing), loopback only, data under $DATA.
if [ "$(curl -s --max-time 2 "http://127.0.0.1:$CLICKHOUSE_PORT/ping" || true)" = "Ok." ]; then
    echo "==> reusing the ClickHouse answering on port $CLICKHOUSE_PORT" >&2
else
    echo "==> starting ClickHouse on port $CLICKHOUSE_PORT" >&2
    deploy/clickhouse/start.sh "$DATA/clickhouse" "$CLICKHOUSE_PORT" $((CLICKHOUSE_PORT + 877))
fi

echo "==> building aihub (release; the first build takes a few minutes)" >&2
cargo build --release -p aihub
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/aihub

# The demo key is created once and reused by later runs.
if [ ! -s "$DATA/demo-key" ]; then
    "$BIN" keys generate --id key_demo --developer dev_demo --name "demo key" \
        --expires-in never --key-file "$DATA/demo-key" > "$DATA/demo-key.yaml"
fi
KEY=$(cat "$DATA/demo-key")

# Local configuration: the reference files with local settings merged in (each section and
# setting once; $DATA/*.overrides.yaml show what differs from config/).
{
    cat <<YAML
server:
  listen: ["127.0.0.1:$GATEWAY_PORT"]
  ops_listen: "127.0.0.1:$OPS_PORT"
upstreams:
  mock:
    endpoints: ["http://127.0.0.1:$MOCK_PORT/v1"]
metering:
  clickhouse:
    url: "http://127.0.0.1:$CLICKHOUSE_PORT"
  wal_dir: "$DATA/wal"
limits:
  plans_file: "$ROOT/config/plans.yaml"
# Keys created in the admin API reach the gateway through the shared control-plane database.
control_plane:
  database_url: "sqlite://$DATA/aihub.db"
  snapshot_path: "$DATA/keys-snapshot.jsonl"
  # /v1/files and /v1/batches are served by the admin API.
  admin_url: "http://127.0.0.1:$ADMIN_PORT"
# The demo key is on the Developer plan (its limits and headers show; overage allowed).
keys:
YAML
    grep -v '^#' "$DATA/demo-key.yaml" | sed 's/^/  /'
    echo "    plan: developer"
} > "$DATA/gateway.overrides.yaml"
deploy/local/merge-config.sh config/gateway.yaml "$DATA/gateway.overrides.yaml" > "$DATA/gateway.yaml"
"$BIN" gateway --config "$DATA/gateway.yaml" --check-config

# The admin API: SQLite in $DATA, mail written to $DATA/mail, an operator account bootstrapped
# with a password generated once; the portal is reached over plain http here (cookies without
# Secure).
if [ ! -s "$DATA/operator-password" ]; then
    (umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$DATA/operator-password")
fi
cat > "$DATA/admin.overrides.yaml" <<YAML
listen: "127.0.0.1:$ADMIN_PORT"
public_url: "http://127.0.0.1:$ADMIN_PORT"
database:
  url: "sqlite://$DATA/aihub.db"
email:
  transport:
    kind: file
    dir: "$DATA/mail"
plans_file: "$ROOT/config/plans.yaml"
clickhouse:
  url: "http://127.0.0.1:$CLICKHOUSE_PORT"
bootstrap_admin:
  email: ops@aihub.local
  password_env: AIHUB_ADMIN_PASSWORD
portal:
  secure_cookie: false
  gateway_url: "http://127.0.0.1:$GATEWAY_PORT/v1"
  example_model: demo
tasks:
  gateway_url: "http://127.0.0.1:$GATEWAY_PORT"
  files_dir: "$DATA/files"
YAML
deploy/local/merge-config.sh config/admin.yaml "$DATA/admin.overrides.yaml" > "$DATA/admin.yaml"
export AIHUB_ADMIN_PASSWORD
AIHUB_ADMIN_PASSWORD=$(cat "$DATA/operator-password")

"$BIN" mock-upstream --listen "127.0.0.1:$MOCK_PORT" > "$DATA/mock-upstream.log" 2>&1 &
echo $! > "$DATA/mock-upstream.pid"
"$BIN" serve --gateway-config "$DATA/gateway.yaml" --admin-config "$DATA/admin.yaml" \
    > "$DATA/gateway.log" 2>&1 &
echo $! > "$DATA/gateway.pid"

ready() {
    curl -fsS --max-time 2 "http://127.0.0.1:$OPS_PORT/readyz" >/dev/null 2>&1 \
        && curl -fsS --max-time 2 "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null 2>&1
}
deadline=$((SECONDS + 60))
until ready; do
    if ! kill -0 "$(cat "$DATA/gateway.pid")" 2>/dev/null; then
        echo "the gateway failed to start; its log:" >&2
        cat "$DATA/gateway.log" >&2
        exit 1
    fi
    if [ $SECONDS -ge $deadline ]; then
        echo "the gateway is not ready after 60 s; its log:" >&2
        tail -n 50 "$DATA/gateway.log" >&2
        exit 1
    fi
    sleep 0.1
done

cat <<MSG

AI Hub is running.
  Gateway:   http://127.0.0.1:$GATEWAY_PORT/v1   (OpenAI-compatible; model "demo")
  Metrics:   http://127.0.0.1:$OPS_PORT/metrics
  Usage:     ClickHouse http://127.0.0.1:$CLICKHOUSE_PORT, database aihub (see docs/clickhouse.md), e.g.
             curl 'http://127.0.0.1:$CLICKHOUSE_PORT/?database=aihub' --data-binary 'SELECT model, count(), sum(total_tokens) FROM usage_events GROUP BY model'
  Demo key:  $KEY
  Portal:    http://127.0.0.1:$ADMIN_PORT/portal   (sign up, keys, usage, billing, docs)
  Admin API: http://127.0.0.1:$ADMIN_PORT   (reference: http://127.0.0.1:$ADMIN_PORT/docs)
  Operator:  ops@aihub.local, password in $DATA/operator-password
  Mail:      $DATA/mail  (verification and reset messages, as .eml files)
  Logs:      $DATA/gateway.log

Sign up as a developer and get your own key:
  curl -X POST http://127.0.0.1:$ADMIN_PORT/developer/register -H "Content-Type: application/json" -d '{"email":"you@example.com","password":"a long passphrase","full_name":"You"}'
  # then the token from the newest mail in $DATA/mail:
  curl -X POST http://127.0.0.1:$ADMIN_PORT/developer/verify-email -H "Content-Type: application/json" -d '{"token":"…"}'
  curl -X POST http://127.0.0.1:$ADMIN_PORT/developer/login -H "Content-Type: application/json" -d '{"email":"you@example.com","password":"a long passphrase"}'
  curl -X POST http://127.0.0.1:$ADMIN_PORT/developer/keys -H "Authorization: Bearer <access_token>" -H "Content-Type: application/json" -d '{"name":"my key"}'

Try it:
  curl http://127.0.0.1:$GATEWAY_PORT/v1/chat/completions -H "Authorization: Bearer $KEY" -H "Content-Type: application/json" -d '{"model":"demo","messages":[{"role":"user","content":"Hello"}]}'

MSG

if [ "$DETACH" = 1 ]; then
    echo "Stop with: deploy/local/down.sh"
    exit 0
fi
echo "Press Ctrl-C to stop."
trap '"$ROOT/deploy/local/down.sh"; exit 0' INT TERM
wait
