#!/usr/bin/env bash
# Gateway memory with N API keys loaded (default 1,000,000), from both sources, in one run:
#
#   (a) YAML: N entries in gateway.yaml's `keys:` (random hashes plus one real key); after the
#       start, the same file is reloaded (SIGHUP) and the peak during the reload is measured.
#   (b) control plane: N keys in a SQLite control-plane database (schema by `aihub migrate`,
#       rows bulk-inserted with python's sqlite3, every key in one change as after a bulk
#       import), the gateway following it (`control_plane:`), no YAML keys; ready means the
#       initial key load is done. Ids as the admin API makes them (`key_`/`dev_` and 32 hex
#       digits), or with DB_IDS=short as in (a) (`key_000000001`: 23 fewer bytes a key id).
#
# For each: starts the release gateway, waits for /readyz, proves the real key works (HTTP 200
# through a mock upstream), and reports the time to ready, keys loaded (`aihub_keys_loaded`),
# VmRSS and the peak VmHWM from /proc, and RSS bytes per key. Target (issue 19): VmRSS <= 300
# MiB and VmHWM <= 1.5x that, for both.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000000}
# BIN=path/to/aihub measures that binary instead of building this tree's.
if [ -z "${BIN:-}" ]; then
    source deploy/local/deps.sh
    cargo build --release -p aihub
    BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/aihub
fi
TMP=$(mktemp -d)
GW=""
MOCK=""
cleanup() {
    for p in $GW $MOCK; do kill -INT "$p" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT

PROXY=127.0.0.1:19182
OPS=127.0.0.1:19183
"$BIN" keys generate --id key_real --developer dev_real --key-file "$TMP/key" | grep -v '^#' > "$TMP/real.yaml"
REAL_HASH=$(awk '/hash:/ {print $2}' "$TMP/real.yaml")
"$BIN" mock-upstream --listen 127.0.0.1:19190 --threads 1 >/dev/null 2>&1 & MOCK=$!

header() {
    printf 'server:\n  listen: ["%s"]\n  ops_listen: %s\n  threads: 1\n' "$PROXY" "$OPS"
    printf 'upstreams:\n  mock:\n    endpoints: ["http://127.0.0.1:19190/v1"]\n'
    printf 'routes:\n  - {model: mock-gpt, upstream: mock}\n'
}

# Prints a result line and keeps it for loadtests/results/keys-latest.md.
report() { printf "$@" | tee -a "$TMP/report"; }
status() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status"; }
# CPU seconds (user + system) the process has used (clock ticks from /proc/PID/stat).
cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.1f", ($14 + $15) / hz}' "/proc/$1/stat"; }
metric() { curl -s "http://$OPS/metrics" | awk -v m="$1" '$1 == m {print $2}'; }

# Starts the gateway on $1, waits until ready, checks the real key; prints one report line.
run() {
    local name=$1 config=$2 start ready code keys rss hwm
    start=$(date +%s%N)
    "$BIN" gateway --config "$config" 2>"$TMP/gw.log" & GW=$!
    until curl -fsS "http://$OPS/readyz" >/dev/null 2>&1; do
        kill -0 "$GW" 2>/dev/null || { cat "$TMP/gw.log"; exit 1; }
        sleep 0.1
    done
    ready=$(date +%s%N)
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://$PROXY/v1/chat/completions" \
        -H "Authorization: Bearer $(cat "$TMP/key")" \
        -d '{"model":"mock-gpt","messages":[{"role":"user","content":"hi"}]}')
    keys=$(metric aihub_keys_loaded)
    rss=$(status "$GW" VmRSS)
    hwm=$(status "$GW" VmHWM)
    # VmRSS = heap and other anonymous memory + the binary's pages read from its file.
    anon=$(status "$GW" RssAnon)
    file=$(status "$GW" RssFile)
    report '%-14s keys %s, real key -> HTTP %s, ready in %d ms (%s CPU s), VmRSS %d MiB (%d bytes/key; anonymous %d MiB, file %d MiB), VmHWM %d MiB (%.2fx RSS)\n' \
        "$name" "$keys" "$code" $(((ready - start) / 1000000)) "$(cpu "$GW")" $((rss / 1024)) \
        $((rss * 1024 / N)) $((anon / 1024)) $((file / 1024)) $((hwm / 1024)) \
        "$(awk -v a="$hwm" -v b="$rss" 'BEGIN {print a / b}')"
    [ "$code" = 200 ] && [ "$keys" = "$N" ] || { echo "FAILED: $name" >&2; cat "$TMP/gw.log" >&2; exit 1; }
}

stop() {
    kill -INT "$GW"
    wait "$GW" 2>/dev/null || true
    GW=""
}

# (a) YAML.
{
    header
    echo 'keys:'
    cat "$TMP/real.yaml"
} > "$TMP/gateway.yaml"
python3 - "$N" "$TMP/gateway.yaml" <<'PY'
import os, sys
n, out = int(sys.argv[1]), sys.argv[2]
with open(out, "a") as f:
    for i in range(n - 1):
        f.write(f'- {{id: key_{i:09d}, hash: "sha256:{os.urandom(32).hex()}", developer_id: dev_{i // 3:08d}, '
                f'models: ["gpt-4o*", "demo"], expires_at: 2027-11-25T00:00:00Z}}\n')
PY
echo "(a) YAML: $(du -h "$TMP/gateway.yaml" | cut -f1) with $N keys" >&2
run "(a) YAML" "$TMP/gateway.yaml"
# Reload the same N keys: VmHWM reset first (clear_refs 5), so it is the reload's own peak.
reloads() { metric 'aihub_config_reloads_total{result="ok"}'; }
before=$(reloads)
cpu_before=$(cpu "$GW")
echo 5 > "/proc/$GW/clear_refs"
start=$(date +%s%N)
kill -HUP "$GW"
until [ "$(reloads)" != "$before" ]; do
    kill -0 "$GW" 2>/dev/null || { cat "$TMP/gw.log"; exit 1; }
    sleep 0.1
done
took=$((($(date +%s%N) - start) / 1000000))
code=$(curl -s -o /dev/null -w '%{http_code}' "http://$PROXY/v1/chat/completions" \
    -H "Authorization: Bearer $(cat "$TMP/key")" -d '{"model":"mock-gpt","messages":[]}')
report '%-14s keys %s, real key -> HTTP %s, reloaded in %d ms (%s CPU s), VmRSS %d MiB, reload peak VmHWM %d MiB\n' \
    "(a) reload" "$(metric aihub_keys_loaded)" "$code" "$took" \
    "$(awk -v a="$(cpu "$GW")" -v b="$cpu_before" 'BEGIN {printf "%.1f", a - b}')" \
    $(($(status "$GW" VmRSS) / 1024)) $(($(status "$GW" VmHWM) / 1024))
stop
rm -f "$TMP/gateway.yaml"

# (b) control plane: a SQLite database with the schema, then N developers' keys in bulk.
DB="$TMP/cp.db"
printf 'database:\n  url: sqlite://%s\n' "$DB" > "$TMP/admin.yaml"
header > "$TMP/gateway.yaml"
# (The gateway half of `migrate` has nothing to do without `metering:` and says so.)
"$BIN" migrate --config "$TMP/gateway.yaml" --admin-config "$TMP/admin.yaml" >"$TMP/migrate.log" 2>&1 || true
grep -q 'control plane at' "$TMP/migrate.log" || { cat "$TMP/migrate.log" >&2; exit 1; }
DB_IDS=${DB_IDS:-admin} python3 - "$N" "$DB" "$REAL_HASH" <<'PY'
import json, os, sqlite3, sys, time
n, path, real = int(sys.argv[1]), sys.argv[2], sys.argv[3].removeprefix("sha256:")
db = sqlite3.connect(path)
db.execute("PRAGMA journal_mode = WAL")
db.execute("PRAGMA synchronous = OFF")
now = int(time.time() * 1000)
# Ids as the admin API makes them (a prefix and 32 hex digits), or as in (a). Three keys per
# developer.
short = os.environ.get("DB_IDS") == "short"
devs = [f"dev_{d:08d}" if short else f"dev_{os.urandom(16).hex()}" for d in range((n + 2) // 3)]
key_id = (lambda i: f"key_{i:09d}") if short else (lambda i: f"key_{os.urandom(16).hex()}")
db.executemany(
    "INSERT INTO developers (id, email, password_hash, full_name, developer_type, plan, "
    "created_at, updated_at) VALUES (?, ?, 'x', 'Load Test', 'individual', 'free', ?, ?)",
    ((d, f"{d}@example.com", now, now) for d in devs))
models, endpoints = json.dumps(["gpt-4o*", "demo"]), json.dumps(["*"])
def keys():
    yield ("key_real", devs[0], real, json.dumps(["*"]))
    for i in range(n - 1):
        yield (key_id(i), devs[i // 3], os.urandom(32).hex(), models)
db.executemany(
    "INSERT INTO api_keys (id, developer_id, name, key_hash, key_prefix, models, endpoints, "
    "ip_allowlist, expires_at, created_at, updated_at, change_seq) "
    "VALUES (?, ?, 'load', ?, 'ahub_dev_xxxx', ?, ?, '[]', ?, ?, ?, 1)",
    ((i, d, h, m, endpoints, now + 86_400_000 * 365, now, now) for i, d, h, m in keys()))
# Every key in one change (as after a bulk import): the initial load pages through a single
# `change_seq`, the feed's hardest case.
db.execute("UPDATE change_counters SET value = 1 WHERE name = 'keys'")
db.commit()
db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
PY
echo "(b) control plane: $(du -h "$DB" | cut -f1) SQLite database with $N keys (${DB_IDS:-admin} ids)" >&2
printf 'control_plane:\n  database_url: sqlite://%s\n' "$DB" >> "$TMP/gateway.yaml"
run "(b) database" "$TMP/gateway.yaml"
report '%-14s initial load %ss (aihub_key_sync_initial_load_seconds)\n' "(b) sync" \
    "$(metric aihub_key_sync_initial_load_seconds)"
stop

# The results, checked in.
OUT=loadtests/results/keys-latest.md
{
    echo "# Gateway memory with $N keys — $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores"
    echo
    echo "\`N=$N${DB_IDS:+ DB_IDS=$DB_IDS} loadtests/keys-rss.sh\` (commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo -dirty))."
    echo "Target (issue 19): VmRSS ≤ 300 MiB and VmHWM ≤ 1.5× that, from YAML and from the control-plane"
    echo "database. (a) YAML \`keys:\` with $N entries (3 keys per developer) and a reload (SIGHUP) of the same"
    echo "file; (b) $N keys in a SQLite control-plane database (${DB_IDS:-admin}-style ids), loaded by the key sync."
    echo
    echo '```'
    cat "$TMP/report"
    echo '```'
} > "$OUT"
echo "written to $OUT" >&2
