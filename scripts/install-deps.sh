#!/usr/bin/env bash
# Installs the system packages spore needs on Debian (bookworm): QEMU, the
# NBD clients used by tests and benchmarks, fio, and the tools that build the
# demo guest, and moto (an S3-compatible server, for the origin store's S3
# test) in a venv at .cache/moto/venv. Idempotent; run as root.
#
# QEMU comes from bookworm-backports (10.0): bookworm's own 7.2 serves a
# post-copy page request only between writes of its migration thread and
# loses TCG guests' writes during a live migration (docs/migration.md).
# qemu-utils comes from the same suite: a qemu-system-x86 of one version
# removes a qemu-utils of another.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
QEMU_MIN_MAJOR=9

# The major version a QEMU tool prints, or 0.
qemu_major() {
    "$1" --version 2>/dev/null | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | sed -n 1p | grep . || echo 0
}

need=()
have() { command -v "$1" >/dev/null 2>&1; }
[ "$(qemu_major qemu-system-x86_64)" -ge "$QEMU_MIN_MAJOR" ] || need+=(qemu-system-x86)
[ "$(qemu_major qemu-img)" -ge "$QEMU_MIN_MAJOR" ] || need+=(qemu-utils)
have nbdcopy || need+=(libnbd-bin)
have fio || need+=(fio)
have strace || need+=(strace)  # crates/spore/tests/integrity.rs watches the agent's syscalls
have b3sum || need+=(b3sum)    # spore bench fsck hashes the same files beside fsck
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -q '^switch_root$' || need+=(busybox-static)
have mke2fs || need+=(e2fsprogs)
have debugfs || need+=(e2fsprogs)
have cpio || need+=(cpio)
have depmod || need+=(kmod)
have ip || need+=(iproute2)
have gcc || need+=(gcc)  # the demo guest's static reseed helper
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
have curl || need+=(curl)
have systemd-analyze || need+=(systemd)  # packaging/spore-agent.service is checked with it
# A Python that can make a venv with pip in it, for moto.
have python3 && python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3 python3-venv)

if [ "${#need[@]}" -eq 0 ]; then
    echo "[deps] system packages are installed" >&2
elif [ "$(id -u)" -ne 0 ]; then
    echo "[deps] missing packages (${need[*]}); run this script as root" >&2
    exit 1
else
    export DEBIAN_FRONTEND=noninteractive
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    qemu_suite=()
    if [ "$codename" = bookworm ]; then
        # Debian's own backports suite, from the same mirror as the rest.
        src=/etc/apt/sources.list.d/spore-bookworm-backports.sources
        if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
            echo "[deps] adding bookworm-backports (for QEMU 10) in $src" >&2
            printf '%s\n' "Types: deb" "URIs: http://deb.debian.org/debian" \
                "Suites: bookworm-backports" "Components: main" \
                "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg" > "$src"
        fi
        qemu_suite=(-t bookworm-backports)
    fi
    echo "[deps] apt-get update" >&2
    apt-get update -q >/dev/null
    pkgs=(libnbd-bin fio strace b3sum busybox-static e2fsprogs cpio kmod iproute2 curl ca-certificates python3 python3-venv gcc libc6-dev systemd)
    echo "[deps] apt-get install ${pkgs[*]}" >&2
    apt-get install -y -q --no-install-recommends "${pkgs[@]}" >/dev/null
    # Both QEMU packages in one call, from one suite (see above).
    echo "[deps] apt-get install ${qemu_suite[*]} qemu-system-x86 qemu-utils" >&2
    apt-get install -y -q --no-install-recommends "${qemu_suite[@]}" qemu-system-x86 qemu-utils >/dev/null
    qemu-system-x86_64 --version | sed -n 1p >&2
    for tool in qemu-system-x86_64 qemu-img; do
        if [ "$(qemu_major "$tool")" -lt "$QEMU_MIN_MAJOR" ]; then
            echo "[deps] $tool is older than $QEMU_MIN_MAJOR.0: $("$tool" --version | sed -n 1p)" >&2
            exit 1
        fi
    done
fi

# moto's server, found there by crates/spore/tests/origin_s3.rs (or
# wherever SPORE_MOTO_SERVER points). pip fetches it from PyPI.
MOTO_VENV=$ROOT/.cache/moto/venv
if [ -x "$MOTO_VENV/bin/moto_server" ]; then
    echo "[deps] moto is installed in $MOTO_VENV" >&2
else
    echo "[deps] installing moto[server] into $MOTO_VENV" >&2
    rm -rf "$MOTO_VENV"
    python3 -m venv "$MOTO_VENV"
    "$MOTO_VENV/bin/pip" install -q --disable-pip-version-check 'moto[server]>=5,<6'
    "$MOTO_VENV/bin/moto_server" --help >/dev/null
fi

# cargo-fuzz (libFuzzer targets in fuzz/, run by scripts/fuzz.sh), from
# crates.io, built once into ~/.cargo/bin. libFuzzer itself is compiled by
# the libfuzzer-sys crate (needs g++).
if command -v cargo-fuzz >/dev/null 2>&1; then
    echo "[deps] cargo-fuzz is installed" >&2
else
    have g++ || { [ "$(id -u)" -eq 0 ] && apt-get install -y -q --no-install-recommends g++ >/dev/null; }
    echo "[deps] cargo install cargo-fuzz" >&2
    cargo install -q --locked cargo-fuzz@0.13.2
fi
