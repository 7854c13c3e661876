#!/usr/bin/env bash
# Boot the built guest directly with qemu-system-x86_64 and check it.
#
#   guest/boot-test.sh [OUTDIR]        (default OUTDIR: <repo>/.cache/guest)
#
# Tests (each boots a fresh VM with spore.poweroff, waits for the marker):
#   base   rootfs.img boots to "SPORE-READY ..." and powers off
#   layer  make-layer.sh adds /etc/layer.txt to a copy of rootfs.img; the guest
#          booted with spore.cat=/etc/layer.txt prints
#          "SPORE-FILE /etc/layer.txt <content>"
#   write  the guest booted (no snapshot) on a copy of rootfs.img with
#          spore.write=/etc/vm-written.txt=... writes the file; after power-off
#          debugfs finds it in the image and e2fsck finds the image clean
#
# Environment:
#   SPORE_BOOT_TESTS    tests to run (default "base layer write")
#   SPORE_BOOT_TIMEOUT  seconds to wait for SPORE-READY (default 120)
#   SPORE_ACCEL         tcg|kvm (default: kvm only if the CPU has vmx/svm)
#   SPORE_BOOT_APPEND   extra kernel command line
# Runs build.sh first if an output is missing.
set -euo pipefail

GUEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$GUEST_DIR/lib.sh"

OUT=${1:-$DEFAULT_OUT}
TESTS=${SPORE_BOOT_TESTS:-base layer write}
TIMEOUT=${SPORE_BOOT_TIMEOUT:-120}
ACCEL=$(pick_accel)

# QEMU comes from the project's installer (QEMU 10 from bookworm-backports).
command -v qemu-system-x86_64 >/dev/null || bash "$GUEST_DIR/../scripts/install-deps.sh"
ensure_packages e2fsprogs
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found"

if [ ! -f "$OUT/vmlinuz" ] || [ ! -f "$OUT/initrd.img" ] || [ ! -f "$OUT/rootfs.img" ]; then
    log "outputs missing in $OUT, running build.sh"
    "$GUEST_DIR/build.sh" "$OUT"
fi
OUT=$(cd "$OUT" && pwd)
TDIR=$OUT/work/boot-test
mkdir -p "$TDIR"

now_ms() { date +%s%3N; }

# boot NAME DISK APPEND [DRIVEOPTS]: boots (DRIVEOPTS default snapshot=on, the
# image is not modified), sets READY_LINE, BOOT_MS, SERIAL_LOG; returns 1 on failure
boot() {
    local name=$1 disk=$2 append=$3 driveopts=${4-,snapshot=on} serial=$TDIR/$1.serial.log pid t0 t1 deadline rc=0
    SERIAL_LOG=$serial
    READY_LINE=
    BOOT_MS=
    rm -f "$serial"
    : > "$serial"
    local cmd=(qemu-system-x86_64 -accel "$ACCEL" -m 512 -smp 1
        -display none -monitor none -serial "file:$serial" -no-reboot
        -kernel "$OUT/vmlinuz" -initrd "$OUT/initrd.img"
        -append "console=ttyS0 root=/dev/vda spore.poweroff $append${SPORE_BOOT_APPEND:+ $SPORE_BOOT_APPEND}"
        -drive "file=$disk,format=raw,if=virtio$driveopts")
    log "[$name] ${cmd[*]}"
    t0=$(now_ms)
    "${cmd[@]}" > "$TDIR/$name.qemu.log" 2>&1 &
    pid=$!
    deadline=$(( t0 + TIMEOUT * 1000 ))
    while :; do
        if grep -q 'SPORE-READY' "$serial" 2>/dev/null; then
            t1=$(now_ms)
            BOOT_MS=$(( t1 - t0 ))
            READY_LINE=$(grep -a -m1 'SPORE-READY' "$serial" | tr -d '\r')
            break
        fi
        if grep -q 'SPORE-INITRD-ERROR' "$serial" 2>/dev/null; then
            log "[$name] initramfs error: $(grep -a -m1 'SPORE-INITRD-ERROR' "$serial" | tr -d '\r')"
            rc=1; break
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            log "[$name] qemu exited before SPORE-READY"
            cat "$TDIR/$name.qemu.log" >&2 || true
            rc=1; break
        fi
        if [ "$(now_ms)" -ge "$deadline" ]; then
            log "[$name] no SPORE-READY within ${TIMEOUT}s"
            rc=1; break
        fi
        sleep 0.1
    done
    # spore.poweroff: the VM must power itself off shortly after the marker
    local i
    for i in $(seq 1 300); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        [ "$rc" -ne 0 ] || log "[$name] warning: VM did not power off within 30s after the marker"
        kill "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    if [ "$rc" -ne 0 ]; then
        log "[$name] serial log ($serial), last 40 lines:"
        tail -n 40 "$serial" | tr -d '\r' >&2
    fi
    return "$rc"
}

FAILED=0
for t in $TESTS; do
    case "$t" in
    base)
        if boot base "$OUT/rootfs.img" ""; then
            printf 'base: SPORE-READY after %d.%03d s (host wall clock, qemu start to marker, accel=%s)\n' \
                $((BOOT_MS / 1000)) $((BOOT_MS % 1000)) "$ACCEL"
            printf 'base: %s\n' "$READY_LINE"
        else
            FAILED=1
        fi
        ;;
    layer)
        content="layer-ok-$(date +%s)"
        "$GUEST_DIR/make-layer.sh" "$OUT/rootfs.img" "$TDIR/layer.img" "/etc/layer.txt=$content" >&2
        if boot layer "$TDIR/layer.img" "spore.cat=/etc/layer.txt spore.cat=/etc/no-such-file"; then
            printf 'layer: SPORE-READY after %d.%03d s\n' $((BOOT_MS / 1000)) $((BOOT_MS % 1000))
            if grep -aq "^SPORE-FILE /etc/layer.txt $content" "$SERIAL_LOG" \
               && grep -aq "^SPORE-FILE-MISSING /etc/no-such-file" "$SERIAL_LOG"; then
                printf 'layer: %s\n' "$(grep -a -m1 '^SPORE-FILE /etc/layer.txt' "$SERIAL_LOG" | tr -d '\r')"
            else
                log "[layer] expected 'SPORE-FILE /etc/layer.txt $content' in $SERIAL_LOG"
                grep -a 'SPORE-' "$SERIAL_LOG" >&2 || true
                FAILED=1
            fi
        else
            FAILED=1
        fi
        rm -f "$TDIR/layer.img"
        ;;
    write)
        content="vm-wrote-$(date +%s)"
        cp --sparse=always "$OUT/rootfs.img" "$TDIR/write.img"
        if boot write "$TDIR/write.img" "spore.write=/etc/vm-written.txt=$content" ""; then
            got=$(debugfs -R "cat /etc/vm-written.txt" "$TDIR/write.img" 2>/dev/null || true)
            if [ "$got" = "$content" ] && e2fsck -fn "$TDIR/write.img" >/dev/null 2>&1; then
                printf 'write: guest wrote /etc/vm-written.txt, visible in the image after power-off, fsck clean\n'
            else
                log "[write] /etc/vm-written.txt in the image: '$got' (want '$content'); e2fsck:"
                e2fsck -fn "$TDIR/write.img" >&2 || true
                FAILED=1
            fi
        else
            FAILED=1
        fi
        rm -f "$TDIR/write.img"
        ;;
    *) die "unknown test $t" ;;
    esac
done

[ "$FAILED" -eq 0 ] || die "boot test failed"
log "boot test passed ($TESTS)"
