#!/usr/bin/env bash
# Installs the system packages the build needs (Debian/Ubuntu), only those missing.
# Sourced by up.sh and test.sh; safe to run again.
set -euo pipefail

aihub_apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "==> installing ${missing[*]}" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# pingora needs cmake (for its zstd/brotli bits) and OpenSSL headers; curl for the scripts.
aihub_apt_install build-essential cmake pkg-config libssl-dev curl ca-certificates

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install Rust (https://rustup.rs) and run again" >&2
    exit 1
fi
