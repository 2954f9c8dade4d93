#!/usr/bin/env bash
# Runs Keel's fuzz targets under libFuzzer (cargo fuzz, nightly Rust) for a stated time each, growing
# fuzz/corpus/<target>/, then shrinks each corpus to the inputs that add coverage (cargo fuzz cmin).
# A crash stops its target and is left in fuzz/artifacts/<target>/: fix it, copy the input to
# fuzz/regressions/<target>/ (tests/corpus.rs replays it in every `cargo test` from then on), run again.
#
#   fuzz/run.sh [SECONDS [TARGET...]]    # default: 600 seconds, every target in fuzz/fuzz_targets/
#
# Built with overflow checks and debug assertions and without a sanitizer: Keel's decoders are safe
# Rust, so an out-of-bounds read is a panic, which libFuzzer reports as a crash. Each target's last
# libFuzzer status line (runs, coverage, executions per second) is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
shift || true
if [ $# -gt 0 ]; then
    targets=("$@")
else
    targets=()
    for file in fuzz/fuzz_targets/*.rs; do targets+=("$(basename "$file" .rs)"); done
fi
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo +nightly install cargo-fuzz --locked

# Fat LTO (the release profile's) would make every build minutes long and buys a fuzzer nothing.
export CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
flags=(--fuzz-dir fuzz --features libfuzzer --sanitizer none --debug-assertions --target-dir target/fuzz)
mkdir -p target/fuzz
summary=()
for target in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$target"
    log="target/fuzz/$target.log"
    echo "== $target: ${seconds}s" >&2
    status=0
    cargo +nightly fuzz run "${flags[@]}" "$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=20 -rss_limit_mb=4096 -max_len=65536 -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
    runs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}' || true)
    if [ "$status" -ne 0 ]; then
        summary+=("$target: CRASH after ${runs:-?} runs (see $log and fuzz/artifacts/$target/)")
        continue
    fi
    cargo +nightly fuzz cmin "${flags[@]}" "$target" "fuzz/corpus/$target" >>"$log" 2>&1
    summary+=("$target: ${seconds}s, ${runs:-?} runs, no crash; corpus $(ls "fuzz/corpus/$target" | wc -l) inputs; last: $last")
done
printf '%s\n' "${summary[@]}"
