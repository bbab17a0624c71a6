#!/usr/bin/env bash
# Installs what the documentation and browser tests need, only what is missing, and exports where
# it is. Sourced by test.sh; safe to run again.
#
#   - Debian's chromium (headless browser for the portal's end-to-end test) → AIHUB_TEST_CHROMIUM
#   - Node.js + npm and the packages in e2e/ (playwright-core, the official `openai` Node SDK),
#     installed with `npm ci` from e2e/package-lock.json → AIHUB_TEST_NODE
#   - a Python virtualenv with the official `openai` SDK and the `standardwebhooks` verifier
#     (pinned below)                                                     → AIHUB_TEST_PYTHON
#
# Tools live outside the clone (AIHUB_TEST_TOOLS, default /var/tmp/aihub-test-tools) so CI runs
# in fresh clones reuse them.
set -euo pipefail

AIHUB_OPENAI_PY_VERSION=${AIHUB_OPENAI_PY_VERSION:-2.8.1}
tools=${AIHUB_TEST_TOOLS:-/var/tmp/aihub-test-tools}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
source "$root/deploy/local/deps.sh"

aihub_apt_install chromium fonts-noto-cjk
# nginx: the load balancer of the multi-node test (and `nginx -t` of the deployment lint).
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || aihub_apt_install nginx
# Node.js: any node >= 20 with npm on PATH will do (NodeSource's bundles npm; Debian's does not).
command -v node >/dev/null 2>&1 || aihub_apt_install nodejs
command -v npm >/dev/null 2>&1 || aihub_apt_install npm
python3 -c "import venv, ensurepip" 2>/dev/null || aihub_apt_install python3-venv
export AIHUB_TEST_CHROMIUM=${AIHUB_TEST_CHROMIUM:-/usr/bin/chromium}
export AIHUB_TEST_NODE=${AIHUB_TEST_NODE:-$(command -v node)}

# e2e/node_modules: reinstalled when the lock file changes.
lock_sum=$(sha256sum "$root/e2e/package-lock.json" | cut -d' ' -f1)
if [ "$(cat "$root/e2e/node_modules/.aihub-lock" 2>/dev/null || true)" != "$lock_sum" ]; then
    echo "==> npm ci (e2e)" >&2
    (cd "$root/e2e" && npm ci --no-audit --no-fund --loglevel=error >&2)
    echo "$lock_sum" > "$root/e2e/node_modules/.aihub-lock"
fi

venv="$tools/venv-openai-$AIHUB_OPENAI_PY_VERSION"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import openai" 2>/dev/null; then
    echo "==> python venv with openai==$AIHUB_OPENAI_PY_VERSION" >&2
    mkdir -p "$tools"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "openai==$AIHUB_OPENAI_PY_VERSION" >&2
fi
# The official Standard Webhooks verifier, for the webhook guide's samples.
AIHUB_STANDARDWEBHOOKS_PY_VERSION=${AIHUB_STANDARDWEBHOOKS_PY_VERSION:-1.3.0}
if ! "$venv/bin/python" -c "import standardwebhooks" 2>/dev/null; then
    echo "==> standardwebhooks==$AIHUB_STANDARDWEBHOOKS_PY_VERSION into the venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check "standardwebhooks==$AIHUB_STANDARDWEBHOOKS_PY_VERSION" >&2
fi
# moto's S3-compatible server, for the S3 file store's tests (a real HTTP S3 API on loopback).
AIHUB_MOTO_VERSION=${AIHUB_MOTO_VERSION:-5.2.6}
if [ ! -x "$venv/bin/moto_server" ]; then
    echo "==> moto[server]==$AIHUB_MOTO_VERSION into the venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$AIHUB_MOTO_VERSION" >&2
fi
# aiosmtpd, an SMTP server with STARTTLS and implicit TLS, for the mailer's TLS tests.
AIHUB_AIOSMTPD_VERSION=${AIHUB_AIOSMTPD_VERSION:-1.4.6}
if ! "$venv/bin/python" -c "import aiosmtpd" 2>/dev/null; then
    echo "==> aiosmtpd==$AIHUB_AIOSMTPD_VERSION into the venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check "aiosmtpd==$AIHUB_AIOSMTPD_VERSION" >&2
fi
export AIHUB_TEST_PYTHON="$venv/bin/python"
export AIHUB_TEST_MOTO="$venv/bin/moto_server"
