#!/usr/bin/env bash
# Gateway memory with N declarative keys loaded (default 1,000,000): writes a config with N key
# entries (random hashes plus one real key), starts the release gateway, proves the real key
# works, and reports startup time and resident memory (VmRSS, VmHWM) from /proc.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-1000000}
source deploy/local/deps.sh
cargo build --release -p aihub
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/aihub
TMP=$(mktemp -d)
trap 'kill -INT $GW $MOCK 2>/dev/null; rm -rf "$TMP"' EXIT
"$BIN" keys generate --id key_real --developer dev_real --key-file "$TMP/key" | grep -v '^#' > "$TMP/real.yaml"
python3 - "$N" "$TMP/gateway.yaml" "$TMP/real.yaml" <<'PY'
import os, sys
n, out, real = int(sys.argv[1]), sys.argv[2], sys.argv[3]
with open(out, "w") as f:
    f.write('server:\n  listen: ["127.0.0.1:19182"]\n  ops_listen: 127.0.0.1:19183\n  threads: 1\n'
            'upstreams:\n  mock:\n    endpoints: ["http://127.0.0.1:19190/v1"]\n'
            'routes:\n  - {model: mock-gpt, upstream: mock}\nkeys:\n')
    f.write(open(real).read())
    for i in range(n - 1):
        f.write(f'- {{id: key_{i:09d}, hash: "sha256:{os.urandom(32).hex()}", developer_id: dev_{i // 3:08d}, '
                f'models: ["gpt-4o*", "demo"], expires_at: 2027-11-25T00:00:00Z}}\n')
PY
echo "config: $(du -h "$TMP/gateway.yaml" | cut -f1) with $N keys" >&2
"$BIN" mock-upstream --listen 127.0.0.1:19190 --threads 1 >/dev/null 2>&1 & MOCK=$!
start=$(date +%s%N)
"$BIN" gateway --config "$TMP/gateway.yaml" 2>"$TMP/gw.log" & GW=$!
until curl -fsS http://127.0.0.1:19183/readyz >/dev/null 2>&1; do
    kill -0 $GW 2>/dev/null || { cat "$TMP/gw.log"; exit 1; }
    sleep 0.2
done
ready=$(date +%s%N)
status=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:19182/v1/chat/completions \
    -H "Authorization: Bearer $(cat "$TMP/key")" -d '{"model":"mock-gpt","messages":[{"role":"user","content":"hi"}]}')
keys=$(curl -s http://127.0.0.1:19183/metrics | awk '/^aihub_keys_loaded/ {print $2}')
rss=$(awk '/VmRSS/ {print $2}' /proc/$GW/status)
hwm=$(awk '/VmHWM/ {print $2}' /proc/$GW/status)
printf 'keys loaded: %s, real key -> HTTP %s\nstartup to ready: %d ms\nVmRSS: %d MiB (%d bytes/key), peak VmHWM: %d MiB\n' \
    "$keys" "$status" $(((ready - start) / 1000000)) $((rss / 1024)) $((rss * 1024 / N)) $((hwm / 1024))
