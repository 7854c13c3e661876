# Shared helpers for guest/build.sh, guest/boot-test.sh, guest/make-layer.sh.
# Sourced from bash scripts running with `set -euo pipefail`.

GUEST_DIR=${GUEST_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
REPO_ROOT=${REPO_ROOT:-$(cd "$GUEST_DIR/.." && pwd)}
DEFAULT_OUT=$REPO_ROOT/.cache/guest

# Fixed values that make the images reproducible byte for byte.
SPORE_EPOCH=${SOURCE_DATE_EPOCH:-1704067200}          # 2024-01-01 00:00:00 UTC
SPORE_FS_UUID=${SPORE_GUEST_FS_UUID:-5b0e0000-5b0e-4000-8000-00000000ba5e}
SPORE_FS_HASH_SEED=${SPORE_GUEST_FS_HASH_SEED:-5b0e0000-5b0e-4000-8000-000000005eed}
export SOURCE_DATE_EPOCH=$SPORE_EPOCH
export E2FSPROGS_FAKE_TIME=$SPORE_EPOCH
export MKE2FS_CONFIG=$GUEST_DIR/mke2fs.conf
export LC_ALL=C
export TZ=UTC

log() { printf '[guest] %s\n' "$*" >&2; }
die() { printf '[guest] ERROR: %s\n' "$*" >&2; exit 1; }

# dpkg says the package is installed
pkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

APT_UPDATED=${APT_UPDATED:-}
apt_update_once() {
    if [ -z "$APT_UPDATED" ]; then
        log "apt-get update"
        apt-get update -qq >&2 || die "apt-get update failed"
        APT_UPDATED=1
    fi
}

# ensure_packages PKG... : install whatever is missing (needs root). Not for
# QEMU: scripts/install-deps.sh installs it (from bookworm-backports).
ensure_packages() {
    local missing=() p
    for p in "$@"; do
        pkg_installed "$p" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || die "missing packages (${missing[*]}) and not root; install them first"
    apt_update_once
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
}

# The static busybox from busybox-static (the rootfs and initramfs have no libc).
find_busybox() {
    pkg_installed busybox-static || return 1
    [ -x /bin/busybox ] && /bin/busybox --list-full >/dev/null 2>&1 || return 1
    echo /bin/busybox
}

# Pick -accel: kvm only when the CPU really has vmx/svm and /dev/kvm is usable.
# Override with SPORE_ACCEL=tcg|kvm.
pick_accel() {
    if [ -n "${SPORE_ACCEL:-}" ]; then echo "$SPORE_ACCEL"; return; fi
    if grep -qwE 'vmx|svm' /proc/cpuinfo && [ -w /dev/kvm ]; then echo kvm; else echo tcg; fi
}

# mtime / owner normalisation of a staging tree (symlinks included)
normalize_tree() {
    chown -hR 0:0 "$1" 2>/dev/null || true
    find "$1" -exec touch -h -d "@$SPORE_EPOCH" {} +
}
