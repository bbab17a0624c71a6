#!/usr/bin/env bash
# Smoke test of README's first command, run by deploy/local/test.sh: does ./deploy/local/up.sh
# work for a new user, and do its printed instructions work as printed?
#
#   deploy/local/smoke.sh
#
# 1. Starts `./deploy/local/up.sh --detach` over a fresh data directory (AIHUB_DATA in a
#    temporary directory) on free ports (GATEWAY_PORT, OPS_PORT, ADMIN_PORT, MOCK_PORT,
#    CLICKHOUSE_PORT), so up.sh starts its own ClickHouse under the data directory, as it does on
#    a fresh machine. Nothing already running is touched.
# 2. Uses only what up.sh printed: the gateway URL and the demo key (its "Try it" curl line, then
#    the same request streamed, model `demo`); the sign-up curl lines (register, the token from
#    the newest mail in the printed mail folder — whose text says the link "expires in 1 day" —,
#    verify, login, create a key) and a call with the new key; an OpenAI batch with the new key
#    (upload, create, poll to `completed`, download the output: Files and Batches forwarded to the
#    admin API, items sent back through the gateway); the printed ClickHouse URL and database,
#    where `usage_events` must get both keys' rows (waiting for the flush).
# 3. `aihub billing reconcile` for the current, open month exits 0 (the live computation
#    matches the raw rows).
# 4. Stops everything with deploy/local/down.sh, starts again over the same data directory:
#    same demo key, the account logs in, both keys work, their new rows arrive; stops again.
#
# On any failure it prints up.sh's output and the logs, and exits 1; down.sh runs on every exit
# (trap), so nothing is left running. AIHUB_SMOKE_KEEP=1 keeps the temporary directory.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
started=$SECONDS

WORK=$(mktemp -d "${TMPDIR:-/tmp}/aihub-smoke.XXXXXX")
export AIHUB_DATA=$WORK/data
FAILED=1
UP_PID=""

step() { echo "==> smoke [$((SECONDS - started)) s]: $*" >&2; }
fail() {
    echo "smoke test FAILED: $*" >&2
    exit 1
}

show_logs() {
    local f
    for f in "$WORK"/up-*.log "$AIHUB_DATA/gateway.log" "$AIHUB_DATA/mock-upstream.log" \
        "$AIHUB_DATA/clickhouse/log/clickhouse-server.err.log"; do
        [ -s "$f" ] || continue
        echo "----- $f (last 80 lines) -----" >&2
        tail -n 80 "$f" >&2
    done
}

cleanup() {
    local code=$?
    trap - EXIT INT TERM
    set +e
    if [ -n "$UP_PID" ]; then
        kill "$UP_PID" 2>/dev/null
        wait "$UP_PID" 2>/dev/null
    fi
    [ "$FAILED" = 0 ] || show_logs
    "$ROOT/deploy/local/down.sh" >&2 || true
    if [ "${AIHUB_SMOKE_KEEP:-0}" = 1 ]; then
        echo "smoke: kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Free ports, below the kernel's ephemeral range: gateway, ops, admin, mock, ClickHouse http,
# and ClickHouse's native (+877) and interserver (+886) ports as up.sh derives them.
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for _ in $(seq 1 50); do
    base=$((20000 + RANDOM % 11000))
    ok=1
    for p in $base $((base + 1)) $((base + 2)) $((base + 3)) $((base + 4)) \
        $((base + 4 + 877)) $((base + 4 + 886)); do
        port_free "$p" || { ok=0; break; }
    done
    [ "$ok" = 1 ] && break
done
[ "$ok" = 1 ] || fail "no free ports found"
export GATEWAY_PORT=$base OPS_PORT=$((base + 1)) ADMIN_PORT=$((base + 2)) \
    MOCK_PORT=$((base + 3)) CLICKHOUSE_PORT=$((base + 4))
# A new user's environment: no provider key (the mock upstream only), none of the variables that
# override the configuration files.
unset OPENAI_API_KEY AIHUB_DATABASE_URL AIHUB_REDIS_URL AIHUB_CLICKHOUSE_URL \
    AIHUB_CLICKHOUSE_DATABASE AIHUB_CLICKHOUSE_USER AIHUB_ADMIN_EMAIL AIHUB_LOG_FORMAT

# up.sh --detach; its printed output in $WORK/up-N.log.
up() {
    step "up.sh --detach (start $1, data $AIHUB_DATA, gateway port $GATEWAY_PORT)"
    # In the background, so that a signal stops it (cleanup) instead of waiting for it.
    ./deploy/local/up.sh --detach > "$WORK/up-$1.log" 2>&1 &
    UP_PID=$!
    wait "$UP_PID" || fail "up.sh exited with $?"
    UP_PID=""
    OUT=$WORK/up-$1.log
}
# A value printed by up.sh as "  Label:  value ..." (the first word after the label).
printed() { sed -n "s/^  $1: *\([^ ]*\).*/\1/p" "$OUT" | head -n 1; }
# The printed command line that contains $1.
printed_line() { grep -F -- "$1" "$OUT" | grep -E '^ +curl ' | head -n 1 | sed 's/^ *//'; }

# Runs a printed curl command line with extra curl arguments; the body goes to $WORK/body and
# the HTTP status is checked against $1.
run_printed() {
    local want=$1 line=$2 status
    shift 2
    [ -n "$line" ] || fail "up.sh did not print the expected command"
    status=$(eval "$line -sS -o \"\$WORK/body\" -w '%{http_code}' $*") || fail "curl failed: $line"
    [ "$status" = "$want" ] || fail "HTTP $status (expected $want) from: $line
$(cat "$WORK/body")"
}
# A string field of the JSON body: json_field NAME.
json_field() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p" "$WORK/body" | head -n 1; }

chat_json() { # KEY
    run_printed 200 "$(printed_line '/v1/chat/completions' | sed "s#Bearer [^\"]*#Bearer $1#")"
    grep -q '"choices"' "$WORK/body" && grep -q '"usage"' "$WORK/body" \
        || fail "not a chat completion: $(cat "$WORK/body")"
}
chat_stream() { # KEY
    local line
    line=$(printed_line '/v1/chat/completions' | sed -e "s#Bearer [^\"]*#Bearer $1#" \
        -e 's#]}'"'"'$#],"stream":true}'"'"'#')
    [[ "$line" == *'"stream":true'* ]] || fail "could not make a streamed request of: $line"
    run_printed 200 "$line" -N
    grep -q '^data: {' "$WORK/body" && grep -q '^data: \[DONE\]' "$WORK/body" \
        || fail "not an SSE stream: $(head -c 2000 "$WORK/body")"
}

CH_URL="" CH_DB=""
ch() { curl -fsS "$CH_URL/?database=$CH_DB" --data-binary "$1"; }
# Waits (15 s at most) until `usage_events` has N rows of key $2 and M rows of other keys.
rows_arrive() { # KEY_ID N M
    local want="$2	$3" got=""
    for _ in $(seq 1 150); do
        got=$(ch "SELECT countIf(key_id = '$1' AND status = 200 AND total_tokens > 0),
                         countIf(key_id != '$1' AND status = 200 AND total_tokens > 0)
                  FROM usage_events FORMAT TabSeparated" 2>/dev/null || true)
        [ "$got" = "$want" ] && return 0
        sleep 0.1
    done
    fail "usage_events: expected $2 rows of $1 and $3 of the demo key, got '${got:-nothing}'"
}

# --- First start: a fresh data directory ------------------------------------------------------
up 1
KEY=$(printed "Demo key")
GATEWAY=$(printed "Gateway")
MAIL=$(printed "Mail")
CH_URL=$(sed -n 's/^  Usage: *ClickHouse \(http[^ ,]*\), database \([A-Za-z0-9_]*\).*/\1/p' "$OUT")
CH_DB=$(sed -n 's/^  Usage: *ClickHouse \(http[^ ,]*\), database \([A-Za-z0-9_]*\).*/\2/p' "$OUT")
[[ "$KEY" == ahub_* ]] || fail "no demo key printed"
[ "$GATEWAY" = "http://127.0.0.1:$GATEWAY_PORT/v1" ] || fail "printed gateway URL: '$GATEWAY'"
[ -n "$MAIL" ] && [ -n "$CH_URL" ] && [ -n "$CH_DB" ] || fail "mail folder or ClickHouse not printed"

step "the demo key: a chat completion and a streamed one"
chat_json "$KEY"
chat_stream "$KEY"

step "sign up with the printed curl lines"
run_printed 202 "$(printed_line '/developer/register')"
MAILFILE=""
for _ in $(seq 1 100); do
    MAILFILE=$(ls -t "$MAIL"/*.eml 2>/dev/null | head -n 1 || true)
    [ -n "$MAILFILE" ] && break
    sleep 0.1
done
[ -n "$MAILFILE" ] || fail "no mail in $MAIL"
# The text as a mail reader shows it (quoted-printable: soft line breaks joined, "=3D" is "=").
tr -d '\r' < "$MAILFILE" | sed -e ':a' -e '/=$/{N;s/=\n//;ba' -e '}' -e 's/=3D/=/g' > "$WORK/mail.txt"
TOKEN=$(sed -n '/paste this token/{n;p;q;}' "$WORK/mail.txt" | tr -d ' ')
[ -n "$TOKEN" ] || fail "no token in $MAILFILE: $(cat "$MAILFILE")"
grep -q "expires in 1 day\." "$WORK/mail.txt" || fail "the mail does not say 'expires in 1 day.': $(cat "$WORK/mail.txt")"
run_printed 200 "$(printed_line '/developer/verify-email' | sed "s#\"token\":\"…\"#\"token\":\"$TOKEN\"#")"
run_printed 200 "$(printed_line '/developer/login')"
ACCESS=$(json_field access_token)
[ -n "$ACCESS" ] || fail "no access_token in $(cat "$WORK/body")"
run_printed 201 "$(printed_line '/developer/keys' | sed "s#<access_token>#$ACCESS#")"
NEW_KEY=$(json_field key)
NEW_ID=$(sed -n 's/.*"api_key":{[^}]*"id":"\([^"]*\)".*/\1/p' "$WORK/body")
[[ "$NEW_KEY" == ahub_* ]] && [ -n "$NEW_ID" ] || fail "no key in $(cat "$WORK/body")"

step "the new key through the gateway (keys reach it from the admin API within a second)"
for i in $(seq 1 50); do
    status=$(curl -sS -o "$WORK/body" -w '%{http_code}' "$GATEWAY/chat/completions" \
        -H "Authorization: Bearer $NEW_KEY" -H "Content-Type: application/json" \
        -d '{"model":"demo","messages":[{"role":"user","content":"Hello"}]}') || true
    [ "$status" = 200 ] && break
    [ "$i" = 50 ] && fail "the new key got HTTP $status: $(cat "$WORK/body")"
    sleep 0.1
done

step "an OpenAI batch with the new key (Files and Batches through the gateway, items back through it)"
printf '%s\n' \
    '{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"demo","messages":[{"role":"user","content":"One"}]}}' \
    '{"custom_id":"b","method":"POST","url":"/v1/chat/completions","body":{"model":"demo","messages":[{"role":"user","content":"Two"}]}}' \
    > "$WORK/batch.jsonl"
status=$(curl -sS -o "$WORK/body" -w '%{http_code}' "$GATEWAY/files" -H "Authorization: Bearer $NEW_KEY" \
    -F purpose=batch -F "file=@$WORK/batch.jsonl") || true
[ "$status" = 200 ] || fail "POST /v1/files: HTTP $status $(cat "$WORK/body")"
FILE_ID=$(json_field id)
status=$(curl -sS -o "$WORK/body" -w '%{http_code}' "$GATEWAY/batches" -H "Authorization: Bearer $NEW_KEY" \
    -H "Content-Type: application/json" \
    -d "{\"input_file_id\":\"$FILE_ID\",\"endpoint\":\"/v1/chat/completions\",\"completion_window\":\"24h\"}") || true
[ "$status" = 200 ] || fail "POST /v1/batches: HTTP $status $(cat "$WORK/body")"
BATCH_ID=$(json_field id)
for i in $(seq 1 100); do
    curl -fsS -o "$WORK/body" "$GATEWAY/batches/$BATCH_ID" -H "Authorization: Bearer $NEW_KEY" || true
    grep -q '"status":"completed"' "$WORK/body" && break
    [ "$i" = 100 ] && fail "the batch did not complete: $(cat "$WORK/body")"
    sleep 0.2
done
OUTPUT_ID=$(json_field output_file_id)
curl -fsS "$GATEWAY/files/$OUTPUT_ID/content" -H "Authorization: Bearer $NEW_KEY" > "$WORK/output.jsonl" \
    || fail "GET /v1/files/$OUTPUT_ID/content"
[ "$(grep -c '"status_code":200' "$WORK/output.jsonl")" = 2 ] || fail "batch output: $(cat "$WORK/output.jsonl")"

step "usage rows in ClickHouse ($CH_URL, database $CH_DB)"
rows_arrive "$NEW_ID" 3 2

step "aihub billing reconcile for the open month"
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/aihub
PERIOD=$(date -u +%Y-%m)
code=0
"$BIN" billing reconcile --period "$PERIOD" --admin-config "$AIHUB_DATA/admin.yaml" \
    > "$WORK/reconcile.log" 2>&1 || code=$?
[ "$code" = 0 ] && grep -q "period $PERIOD is open" "$WORK/reconcile.log" \
    && grep -q "OK: the live computation matches" "$WORK/reconcile.log" \
    || fail "aihub billing reconcile --period $PERIOD (exit $code):
$(cat "$WORK/reconcile.log")"

# down.sh; then nothing may answer on the ports up.sh used.
down() {
    step "down.sh"
    ./deploy/local/down.sh >&2
    local port
    for port in "$GATEWAY_PORT" "$OPS_PORT" "$ADMIN_PORT" "$MOCK_PORT" "$CLICKHOUSE_PORT"; do
        port_free "$port" || fail "port $port still answers after down.sh"
    done
}
down

# --- Second start over the same data directory ------------------------------------------------
up 2
[ "$(printed "Demo key")" = "$KEY" ] || fail "the second start printed another demo key"
step "the same account and keys after a restart"
run_printed 200 "$(printed_line '/developer/login')"
chat_json "$KEY"
chat_json "$NEW_KEY"
rows_arrive "$NEW_ID" 4 3
down

FAILED=0
step "passed in $((SECONDS - started)) s"
