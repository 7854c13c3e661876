#!/usr/bin/env bash
# Installs the system packages spore needs on Debian (bookworm): QEMU, the
# NBD clients used by tests and benchmarks, fio, and the tools that build the
# demo guest, and moto (an S3-compatible server, for the origin store's S3
# test) in a venv at .cache/moto/venv. Idempotent; run as root.
#
# Debian bookworm's qemu-system-x86 (7.2) conflicts with a newer qemu-utils
# from backports, so qemu-utils is pinned to bookworm in the same call.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-system-x86_64 || need+=(qemu-system-x86)
have nbdcopy || need+=(libnbd-bin)
have fio || need+=(fio)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -q '^switch_root$' || need+=(busybox-static)
have mke2fs || need+=(e2fsprogs)
have debugfs || need+=(e2fsprogs)
have cpio || need+=(cpio)
have depmod || need+=(kmod)
have ip || need+=(iproute2)
have gcc || need+=(gcc)  # the demo guest's static reseed helper
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || need+=(libc6-dev)
have curl || need+=(curl)
# A Python that can make a venv with pip in it, for moto.
have python3 && python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3 python3-venv)

if [ "${#need[@]}" -eq 0 ] && qemu-img --version | grep -q 'version 7\.'; then
    echo "[deps] system packages are installed" >&2
elif [ "$(id -u)" -ne 0 ]; then
    echo "[deps] missing packages (${need[*]}); run this script as root" >&2
    exit 1
else
    export DEBIAN_FRONTEND=noninteractive
    echo "[deps] apt-get update" >&2
    apt-get update -q >/dev/null
    # qemu-utils must match qemu-system-x86 (see above).
    pkgs=(qemu-system-x86 "qemu-utils/bookworm" libnbd-bin fio busybox-static e2fsprogs cpio kmod iproute2 curl ca-certificates python3 python3-venv gcc libc6-dev)
    echo "[deps] apt-get install ${pkgs[*]}" >&2
    apt-get install -y -q --no-install-recommends --allow-downgrades "${pkgs[@]}" >/dev/null
    qemu-system-x86_64 --version | head -1 >&2
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
