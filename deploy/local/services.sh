#!/usr/bin/env bash
# Makes sure PostgreSQL (127.0.0.1:5432, user postgres without password, database `test`) and
# Redis (127.0.0.1:6379) answer: running ones are reused; otherwise Debian's packages are
# installed and started. Meant for development and CI machines: a PostgreSQL it sets up trusts
# loopback connections.
set -euo pipefail
cd "$(dirname "$0")/../.."
source deploy/local/deps.sh
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
if ! command -v pg_isready >/dev/null 2>&1 || ! pg_up; then
    echo "==> starting PostgreSQL" >&2
    aihub_apt_install postgresql postgresql-client
    version=$(ls /etc/postgresql | sort -n | tail -1)
    hba=/etc/postgresql/$version/main/pg_hba.conf
    if ! $sudo grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
        $sudo sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    fi
    $sudo pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null \
        || $sudo pg_ctlcluster --skip-systemctl-redirect "$version" main reload
    for _ in $(seq 1 50); do pg_up && break; sleep 0.2; done
fi
if ! psql -h 127.0.0.1 -U postgres -d test -qAtc 'SELECT 1' >/dev/null 2>&1; then
    psql -h 127.0.0.1 -U postgres -d postgres -qc 'CREATE DATABASE test'
fi

if ! command -v redis-cli >/dev/null 2>&1 || [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" != PONG ]; then
    echo "==> starting Redis" >&2
    aihub_apt_install redis-server
    $sudo mkdir -p /var/lib/redis /var/log/redis
    $sudo redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/aihub.log
    for _ in $(seq 1 50); do [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ] && break; sleep 0.1; done
fi
