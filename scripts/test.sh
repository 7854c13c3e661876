#!/usr/bin/env bash
# Runs spore's whole test suite from a fresh clone: installs system
# packages, builds the demo guest, then runs the tests in tiers, every tier
# even when an earlier one failed:
#   1 unit         every crate's unit tests (and doc tests)
#   2 integration  the tests/ of every crate: real agents, qemu-io,
#                  qemu-img, nbdcopy, nbdinfo and real QEMU guests (and
#                  an upgrade from spore at an earlier commit, built by
#                  scripts/previous-spore.sh: the clone needs its history)
#   3 fuzz         every fuzz target over its seed corpus, then fuzzed for
#                  a bounded time (scripts/fuzz.sh)
#   4 circles      import circles between the files of each crate
#                  (../shared/tools/import-circles.py), and agent services
#                  that import the composition root: either fails the suite
# and ends with a summary: per tier passed, failed, skipped and seconds,
# then the totals alone on a line (`N passed, N failed, N skipped`, which
# CI reads). Exits non-zero if any tier failed.
#
# A test that lacks a tool skips only outside CI (CI=true fails it); its
# skip is written to $SPORE_SKIP_LOG and counted here (crates/testkit).
#
# FUZZ_SECONDS=N sets each target's fuzzing time (0: replay the corpus only);
# TEST_TIERS="unit fuzz" runs only those tiers.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-deps.sh
bash guest/build.sh
export CARGO_TERM_COLOR=never

OUT=target/test-summary
rm -rf "$OUT"
mkdir -p "$OUT"
TIERS=()

# run_tier NAME COMMAND...: runs COMMAND, its output shown and kept in
# $OUT/NAME.log; counts libtest's result lines and the skips recorded.
run_tier() {
    local name=$1
    shift
    local start rc passed failed skipped
    start=$(date +%s)
    export SPORE_SKIP_LOG="$PWD/$OUT/$name.skips"
    : > "$SPORE_SKIP_LOG"
    echo "=== tier $name: $*"
    set +e
    "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    set -e
    # "test result: ok. 23 passed; 0 failed; ..." from libtest, and in the
    # same form from scripts/fuzz.sh and run_circles.
    passed=$(sed -n 's/^test result: .* \([0-9]*\) passed; .*/\1/p' "$OUT/$name.log" |
        awk '{s += $1} END {print s + 0}')
    failed=$(sed -n 's/^test result: .* \([0-9]*\) failed.*/\1/p' "$OUT/$name.log" |
        awk '{s += $1} END {print s + 0}')
    skipped=$(grep -c '^SKIP: ' "$SPORE_SKIP_LOG" || true)
    # A skipped test returned early: libtest counted it as passed.
    passed=$((passed - skipped))
    if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
        # The build failed, or a test binary died without a result line.
        echo "=== tier $name: exit status $rc without a failed test: counted as 1 failure"
        failed=1
    fi
    TIERS+=("$name $passed $failed $skipped $(($(date +%s) - start))")
}

run_unit() {
    # Unit tests of every crate first: a failing integration binary cannot
    # stop them.
    local rc=0
    cargo test --workspace --locked --no-fail-fast --lib --bins || rc=$?
    cargo test --workspace --locked --no-fail-fast --doc || rc=$?
    return "$rc"
}

run_integration() {
    cargo build --workspace --all-targets --locked
    # spore as it was at an earlier commit, for the upgrade test: built
    # here (minutes, once) so that no test waits on it beside a guest.
    bash scripts/previous-spore.sh
    # Two tests at a time at most: VM tests run TCG guests on 2 cores.
    cargo test --workspace --locked --no-fail-fast --test '*' -- --test-threads=2
}

# Import circles between modules: `import-circles.py` exits 1 when any
# crate's files import each other around a loop; a new circle fails the
# suite (CIRCLES_FAIL_SUITE=0 only reports it).
CIRCLES_FAIL_SUITE=${CIRCLES_FAIL_SUITE:-1}
run_circles() {
    local rc=0 layered=0
    if [ ! -f ../shared/tools/import-circles.py ]; then
        echo "circles: ../shared/tools/import-circles.py is not here; not checked"
        return 0
    fi
    python3 ../shared/tools/import-circles.py crates/* || rc=$?
    # The agent's services are built by its composition root (agent.rs) and
    # never see it: only the surfaces (lib.rs, api.rs, peer.rs, metrics.rs)
    # may import it.
    local upward
    upward=$(grep -rlE 'crate::(agent::)?Agent\b' crates/agent/src \
        | grep -vE 'crates/agent/src/(lib|agent|api|peer|metrics)\.rs$' || true)
    if [ -n "$upward" ]; then
        echo "circles: these agent services import the composition root (crate::agent::Agent):"
        echo "$upward" | sed 's/^/  /'
        layered=1
    fi
    if [ "$rc" -eq 0 ] && [ "$layered" -eq 0 ]; then
        echo "test result: ok. 2 passed; 0 failed"
    elif [ "$CIRCLES_FAIL_SUITE" -eq 1 ]; then
        echo "test result: FAILED. $(( (rc == 0) + (layered == 0) )) passed; $(( (rc != 0) + layered )) failed"
        return 1
    else
        echo "circles: import circles found (exit $rc); reported, not failing the suite (CIRCLES_FAIL_SUITE=0)"
    fi
}

for tier in ${TEST_TIERS:-unit integration fuzz circles}; do
    case $tier in
    unit) run_tier unit run_unit ;;
    integration) run_tier integration run_integration ;;
    fuzz) run_tier fuzz bash scripts/fuzz.sh ;;
    circles) run_tier circles run_circles ;;
    *) echo "unknown tier $tier" >&2 && exit 2 ;;
    esac
done

echo
echo "=== summary (logs in $OUT/)"
printf '%-12s %7s %7s %8s %8s\n' tier passed failed skipped seconds
total_p=0 total_f=0 total_s=0
for t in "${TIERS[@]}"; do
    read -r name passed failed skipped seconds <<< "$t"
    printf '%-12s %7d %7d %8d %8d\n' "$name" "$passed" "$failed" "$skipped" "$seconds"
    total_p=$((total_p + passed)) total_f=$((total_f + failed)) total_s=$((total_s + skipped))
done
if [ -s "$OUT/circles.log" ] && grep -q '^circles: import circles found' "$OUT/circles.log"; then
    echo "(circles: import circles reported, not counted as a failure; see $OUT/circles.log)"
fi
cat "$OUT"/*.skips 2>/dev/null | sed 's/^/  /' || true
echo "$total_p passed, $total_f failed, $total_s skipped"
[ "$total_f" -eq 0 ]
