#!/usr/bin/env bash
# Builds the libFuzzer targets of fuzz/ with coverage instrumentation (stable Rust: the flags
# cargo-fuzz passes with `-s none`, no nightly, no sanitizer) into their own target directory,
# then runs each for AIHUB_FUZZ_SECONDS (default 30) seconds on a scratch copy of its checked-in
# corpus (fuzz/corpus/<target>/, never written here). Fails on the first crash, printing the
# crashing input's path. See fuzz/README.md.
#
#   deploy/ci/fuzz.sh                 # every target, 30 s each
#   deploy/ci/fuzz.sh sse_meter       # one target
#   AIHUB_FUZZ_SECONDS=600 deploy/ci/fuzz.sh json_usage
# Environment: AIHUB_FUZZ_TARGET_DIR (build, default /var/tmp/aihub-fuzz-target),
# AIHUB_FUZZ_WORK (scratch corpora and crash artifacts, default a fresh temporary directory),
# AIHUB_FUZZ_JOBS (targets run at once, default the number of CPUs, at most 2).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
seconds=${AIHUB_FUZZ_SECONDS:-30}
target_dir=${AIHUB_FUZZ_TARGET_DIR:-/var/tmp/aihub-fuzz-target}
work=${AIHUB_FUZZ_WORK:-$(mktemp -d /tmp/aihub-fuzz.XXXXXX)}
jobs=${AIHUB_FUZZ_JOBS:-$(( $(nproc) < 2 ? 1 : 2 ))}
triple=$(rustc -vV | sed -n 's/^host: //p')

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^aihub-fuzz$')
fi

# The target triple keeps RUSTFLAGS off build scripts and proc macros (as cargo-fuzz does).
echo "==> building ${#targets[@]} fuzz targets (instrumented, $target_dir)" >&2
build_start=$SECONDS
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-sanitizer-coverage-stack-depth \
--cfg fuzzing -Cdebug-assertions -Coverflow-checks" \
    cargo build --manifest-path fuzz/Cargo.toml --locked --release --target "$triple" \
    --target-dir "$target_dir" "${bins[@]}"
echo "==> built in $((SECONDS - build_start)) s" >&2

# Runs one target; prints its last status line; exit status 1 on a crash.
run_one() {
    local t=$1 corpus="$work/corpus/$1" artifacts="$work/artifacts/$1/"
    mkdir -p "$corpus" "$artifacts"
    if [ -d "$root/fuzz/corpus/$t" ]; then cp -r "$root/fuzz/corpus/$t/." "$corpus/"; fi
    local dicts=()
    if [ -f "$root/fuzz/dict/$t.dict" ]; then dicts=(-dict="$root/fuzz/dict/$t.dict"); fi
    if "$target_dir/$triple/release/$t" "$corpus" "${dicts[@]}" -max_total_time="$seconds" \
        -artifact_prefix="$artifacts" -print_final_stats=1 -rss_limit_mb=2048 -timeout=10 \
        >"$work/$t.log" 2>&1; then
        local line execs
        line=$(grep -E '^#[0-9]+' "$work/$t.log" | tail -1)
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log")
        echo "ok    $t: $execs runs in ${seconds}s | ${line}"
    else
        echo "CRASH $t: log $work/$t.log"
        grep -E '^(thread .* panicked|.*panicked at|==[0-9]+== ERROR)' -A3 "$work/$t.log" | head -8
        ls "$artifacts"* 2>/dev/null | sed 's/^/      crash input: /'
        return 1
    fi
}

echo "==> running each target ${seconds}s ($jobs at a time; scratch: $work)" >&2
failed=0
pids=()
names=()
for t in "${targets[@]}"; do
    run_one "$t" &
    pids+=($!)
    names+=("$t")
    if [ "${#pids[@]}" -ge "$jobs" ]; then
        wait "${pids[0]}" || failed=1
        pids=("${pids[@]:1}")
        names=("${names[@]:1}")
    fi
done
for p in "${pids[@]}"; do wait "$p" || failed=1; done
if [ "$failed" -ne 0 ]; then
    echo "fuzzing found a crash: see the crash inputs above (fuzz/README.md: a crash becomes a regression test)" >&2
    exit 1
fi
echo "==> every fuzz target ran ${seconds}s without a crash" >&2
# A scratch directory of our own is removed once nothing crashed (kept on a crash).
if [ -z "${AIHUB_FUZZ_WORK:-}" ]; then rm -rf "$work"; fi
