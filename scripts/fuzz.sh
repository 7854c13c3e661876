#!/usr/bin/env bash
# Fuzz tier of the test suite: every fuzz target (fuzz/, cargo-fuzz and
# libFuzzer) first replays its seed corpus (fuzz/corpus/TARGET), then is
# fuzzed for FUZZ_SECONDS (default 20; 0 replays only). A crash, a panic, a
# leak or a timeout fails its target; the input that caused it is kept in
# target/fuzz/artifacts/TARGET/ and the fuzzer's output in
# target/fuzz/logs/TARGET.log. New inputs the fuzzer finds go to
# target/fuzz/corpus/TARGET, never to the committed seeds.
#
# Ends with a line in libtest's form (`test result: ok. N passed; N
# failed`), one test per target, which scripts/test.sh counts.
#
# A fresh machine has only the stable toolchain: RUSTC_BOOTSTRAP=1 lets it
# take the -Z flags cargo-fuzz passes (sanitizer, coverage).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${FUZZ_SECONDS:-20}
export RUSTC_BOOTSTRAP=1
export CARGO_TERM_COLOR=never
WORK=$PWD/target/fuzz
mkdir -p "$WORK/logs"

command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz is missing: bash scripts/install-deps.sh"; exit 1; }
cargo fuzz build -O
mapfile -t targets < <(cargo fuzz list)

passed=0 failed=0
for t in "${targets[@]}"; do
    seeds=fuzz/corpus/$t
    if [ ! -d "$seeds" ] || [ -z "$(ls -A "$seeds")" ]; then
        echo "fuzz $t: FAILED: no seed corpus in $seeds"
        failed=$((failed + 1))
        continue
    fi
    mkdir -p "$WORK/corpus/$t" "$WORK/artifacts/$t"
    log=$WORK/logs/$t.log
    # -rss_limit_mb and -timeout: a parser that allocates what a length
    # field claims, or loops, fails like a crash.
    common=(-artifact_prefix="$WORK/artifacts/$t/" -rss_limit_mb=2048 -timeout=10)
    start=$(date +%s)
    ok=1
    if ! cargo fuzz run -O "$t" "$seeds" -- -runs=0 "${common[@]}" > "$log" 2>&1; then
        ok=0
        what="replaying $seeds"
    elif [ "$SECONDS_EACH" -gt 0 ] &&
        ! cargo fuzz run -O "$t" "$WORK/corpus/$t" "$seeds" -- \
            -max_total_time="$SECONDS_EACH" "${common[@]}" >> "$log" 2>&1; then
        ok=0
        what="fuzzing for ${SECONDS_EACH}s"
    fi
    runs=$(sed -n 's/^#\([0-9]*\).*DONE.*/\1/p' "$log" | tail -n 1)
    if [ "$ok" -eq 1 ]; then
        echo "fuzz $t: ok ($(ls "$seeds" | wc -l) seeds replayed, ${runs:-0} runs, $(($(date +%s) - start)) s)"
        passed=$((passed + 1))
    else
        echo "fuzz $t: FAILED $what; the fuzzer said (all of it in $log):"
        grep -E -A1 'panicked at|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|^SUMMARY|Test unit written to' "$log" |
            grep -v '^--$' | head -n 20 | sed 's/^/    /'
        failed=$((failed + 1))
    fi
done
if [ "$failed" -eq 0 ]; then
    echo "test result: ok. $passed passed; $failed failed"
else
    echo "test result: FAILED. $passed passed; $failed failed"
    exit 1
fi
