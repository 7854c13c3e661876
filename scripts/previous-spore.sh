#!/usr/bin/env bash
# Builds spore as it was at an earlier commit of this repository and prints
# the path of its binary: the "old version" that the upgrade test
# (crates/spore/tests/restart.rs) starts a VM with before a restart onto
# the binary of this tree. Built once per commit into target/previous/
# (a debug build of its own, so several minutes the first time); the
# tests call this script, and scripts/test.sh calls it before the
# integration tier so that no test waits on the build.
#
# SPORE_PREVIOUS_COMMIT=REV picks another commit (it must have agent
# restarts that keep VMs, so a9033a7 or later).
set -euo pipefail
cd "$(dirname "$0")/.."
# The last commit before the socket holder learnt --no-socket-holder and
# before VMs' RAM promises were counted: its agent starts QEMU, its holder
# keeps the sockets, and the agent of this tree must take both over.
COMMIT=${SPORE_PREVIOUS_COMMIT:-b7f937f09c622aa87a52b98e3c765f3296bf2c15}
mkdir -p target/previous
exec 9>target/previous/lock
flock 9
OUT=target/previous/$COMMIT
BIN=$OUT/target/debug/spore
if [ ! -x "$BIN" ]; then
    if ! git cat-file -e "$COMMIT^{commit}" 2>/dev/null; then
        # A shallow clone: ask where it came from.
        git fetch --quiet origin "$COMMIT" >&2 || {
            echo "previous-spore: commit $COMMIT is not in this clone and could not be fetched" \
                "(a shallow clone? clone with history, or set SPORE_PREVIOUS_COMMIT)" >&2
            exit 1
        }
    fi
    echo "previous-spore: building spore at ${COMMIT:0:12} into $OUT (once)" >&2
    rm -rf "$OUT/src"
    mkdir -p "$OUT/src"
    git archive "$COMMIT" | tar -x -C "$OUT/src"
    (cd "$OUT/src" && CARGO_TARGET_DIR="$PWD/../target" cargo build --locked -p spore --bin spore >&2)
    rm -rf "$OUT/src"
fi
echo "$PWD/$BIN"
