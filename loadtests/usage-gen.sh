#!/usr/bin/env bash
# Fills ClickHouse with realistic usage for benchmarks and demos (see benches/src/bin/usage-gen.rs):
# 10,000 developers with Zipf-like traffic, many models, 10,000,000 rows over 90 days by default.
#   loadtests/usage-gen.sh [--clickhouse URL] [--database DB] [--developers N] [--rows N] [--days N] [--seed N]
# Deterministic for a seed; the usage_hourly rollup fills itself at insert time.
set -euo pipefail
cd "$(dirname "$0")/.."
source deploy/local/deps.sh
cargo build --release -p aihub-benches --bin usage-gen
exec "${CARGO_TARGET_DIR:-$PWD/target}/release/usage-gen" "$@"
