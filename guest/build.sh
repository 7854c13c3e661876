#!/usr/bin/env bash
# Build the spore demo guest: OUTDIR/{vmlinuz,vmlinux,initrd.img,rootfs.img}.
#
#   guest/build.sh [OUTDIR]          (default OUTDIR: <repo>/.cache/guest)
#
# Idempotent: each output carries a stamp (hash of everything it is built
# from) and is rebuilt only when that changes.  Run as root on Debian
# bookworm; missing packages are installed with apt-get.
#
# Environment:
#   SPORE_GUEST_DISK_MIB      virtual size of rootfs.img in MiB (default 512)
#   SPORE_GUEST_FILLER_PCT    share of the disk filled with random, never-read
#                             files under /data (default 60)
#   SPORE_GUEST_KERNEL        kernel version, e.g. 6.1.0-56-cloud-amd64
#                             (default: what linux-image-cloud-amd64 depends on)
#   SPORE_GUEST_EXTRA_MODULES optional modules for the initramfs, space
#                             separated (default: virtio_net virtio_console
#                             button evdev: the ACPI power button)
#   SPORE_GUEST_FORCE=1       rebuild everything
#   SOURCE_DATE_EPOCH         timestamp of every file (default 2024-01-01)
set -euo pipefail

GUEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$GUEST_DIR/lib.sh"

OUT=${1:-$DEFAULT_OUT}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$OUT/work
mkdir -p "$WORK"

DISK_MIB=${SPORE_GUEST_DISK_MIB:-512}
FILLER_PCT=${SPORE_GUEST_FILLER_PCT:-60}
FILLER_FILE_MIB=16
GUEST_VERSION=1
FORCE=${SPORE_GUEST_FORCE:-}

# Modules needed to reach the root disk, in the order the brief lists them.
# Dependencies come from the kernel's modules.dep; builtins are skipped.
# crc32c_generic is a run-time (crypto API) dependency of ext4 metadata_csum
# that modules.dep cannot show.
REQUIRED_MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk crc32c_generic ext4"
EXTRA_MODULES=${SPORE_GUEST_EXTRA_MODULES-virtio_net virtio_console button evdev}

case "$DISK_MIB" in ''|*[!0-9]*) die "SPORE_GUEST_DISK_MIB must be a number of MiB" ;; esac
case "$FILLER_PCT" in ''|*[!0-9]*) die "SPORE_GUEST_FILLER_PCT must be a number" ;; esac
[ "$DISK_MIB" -ge 64 ] || die "SPORE_GUEST_DISK_MIB must be at least 64"
[ "$FILLER_PCT" -le 80 ] || die "SPORE_GUEST_FILLER_PCT must be at most 80"

T0=$(date +%s)

# ---------------------------------------------------------------- packages
ensure_packages busybox-static e2fsprogs cpio gzip kmod python3 coreutils findutils gcc libc6-dev lz4 zstd
BUSYBOX=$(find_busybox) || die "no static busybox (package busybox-static)"
PYTHON=/usr/bin/python3
[ -x "$PYTHON" ] || PYTHON=python3

stamp_ok() { # name stamp
    [ -z "$FORCE" ] && [ -f "$OUT/$1" ] && [ -f "$OUT/.$1.stamp" ] && [ "$(cat "$OUT/.$1.stamp")" = "$2" ]
}
stamp_set() { printf '%s\n' "$2" > "$OUT/.$1.stamp"; }

hash_str() { sha256sum | cut -c1-32; }

# ------------------------------------------------------------------ kernel
resolve_kernel() {
    local dep
    dep=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
          | awk '/Depends: linux-image-[0-9]/ {print $2; exit}') || true
    if [ -z "$dep" ]; then
        apt_update_once
        dep=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
              | awk '/Depends: linux-image-[0-9]/ {print $2; exit}') || true
    fi
    [ -n "$dep" ] || die "cannot resolve linux-image-cloud-amd64 (apt-cache depends)"
    echo "${dep#linux-image-}"
}

KVER=${SPORE_GUEST_KERNEL:-$(resolve_kernel)}
KPKG=linux-image-$KVER
KDIR=$WORK/kernel/$KVER
log "kernel: $KPKG"

if [ ! -f "$KDIR/.unpacked" ]; then
    mkdir -p "$WORK/kernel"
    deb=$(ls "$WORK/kernel/${KPKG}_"*.deb 2>/dev/null | sed -n 1p || true)
    if [ -z "$deb" ]; then
        log "downloading $KPKG"
        ( cd "$WORK/kernel" && apt-get download -o APT::Sandbox::User=root "$KPKG" >&2 ) \
            || { apt_update_once; ( cd "$WORK/kernel" && apt-get download -o APT::Sandbox::User=root "$KPKG" >&2 ); } \
            || die "apt-get download $KPKG failed"
        deb=$(ls "$WORK/kernel/${KPKG}_"*.deb | sed -n 1p)
    fi
    log "unpacking $(basename "$deb")"
    rm -rf "$KDIR"
    mkdir -p "$KDIR"
    dpkg-deb -x "$deb" "$KDIR"
    [ -f "$KDIR/boot/vmlinuz-$KVER" ] || die "no boot/vmlinuz-$KVER in $deb"
    # Debian ships no modules.dep (depmod runs at install time): make one.
    depmod -b "$KDIR" "$KVER"
    touch "$KDIR/.unpacked"
fi
MODROOT=$KDIR/lib/modules/$KVER
[ -f "$MODROOT/modules.dep" ] || die "no modules.dep in $MODROOT"

KSTAMP=$(printf '%s\n' "$KVER" "$(sha256sum < "$KDIR/boot/vmlinuz-$KVER")" | hash_str)
if stamp_ok vmlinuz "$KSTAMP"; then
    log "vmlinuz: up to date"
else
    cp "$KDIR/boot/vmlinuz-$KVER" "$OUT/vmlinuz.tmp"
    touch -d "@$SPORE_EPOCH" "$OUT/vmlinuz.tmp"
    mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
    stamp_set vmlinuz "$KSTAMP"
    log "vmlinuz: $(stat -c %s "$OUT/vmlinuz") bytes"
fi

# ------------------------------------------------------- vmlinux (PVH)
# The same kernel uncompressed, for QEMU's direct (PVH) boot: no
# decompression or real-mode setup in the guest (about 0.25 s under TCG).
VSTAMP=$( { echo "vmlinux v1 $KSTAMP"; sha256sum < "$GUEST_DIR/tools/extract-vmlinux.py"; } | hash_str)
if stamp_ok vmlinux "$VSTAMP"; then
    log "vmlinux: up to date"
elif "$PYTHON" "$GUEST_DIR/tools/extract-vmlinux.py" "$OUT/vmlinuz" "$OUT/vmlinux.tmp"; then
    touch -d "@$SPORE_EPOCH" "$OUT/vmlinux.tmp"
    mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
    stamp_set vmlinux "$VSTAMP"
    log "vmlinux: $(stat -c %s "$OUT/vmlinux") bytes (PVH entry point)"
else
    rm -f "$OUT/vmlinux" "$OUT/vmlinux.tmp" "$OUT/.vmlinux.stamp"
    log "vmlinux: not made (see above); boot vmlinuz instead"
fi

# ------------------------------------------------------- module resolution
declare -A MOD_PATH=() MOD_DEPS=() MOD_BUILTIN=() MOD_SEEN=()
modname() { local n=${1##*/}; n=${n%%.ko*}; echo "${n//-/_}"; }
while IFS= read -r line; do
    p=${line%%:*}
    n=$(modname "$p")
    MOD_PATH[$n]=$p
    MOD_DEPS[$n]=${line#*:}
done < "$MODROOT/modules.dep"
while IFS= read -r p; do
    MOD_BUILTIN[$(modname "$p")]=1
done < "$MODROOT/modules.builtin"

ORDER=()
# resolve NAME: append NAME's dependencies, then NAME, to ORDER (once each)
resolve() {
    local n d
    n=$(modname "$1")
    [ -n "${MOD_SEEN[$n]:-}" ] && return 0
    MOD_SEEN[$n]=1
    if [ -n "${MOD_BUILTIN[$n]:-}" ]; then
        log "  module $n: built into the kernel"
        return 0
    fi
    [ -n "${MOD_PATH[$n]:-}" ] || return 1
    for d in ${MOD_DEPS[$n]}; do
        resolve "$d" || return 1
    done
    ORDER+=("${MOD_PATH[$n]}")
}
for m in $REQUIRED_MODULES; do
    resolve "$m" || die "module $m (or one of its dependencies) not found for kernel $KVER"
done
REQUIRED_ORDER=("${ORDER[@]}")
ORDER=()
for m in $EXTRA_MODULES; do
    resolve "$m" || log "warning: optional module $m not found for $KVER, skipped"
done
OPTIONAL_ORDER=("${ORDER[@]+"${ORDER[@]}"}")
log "initramfs modules: $(for p in "${REQUIRED_ORDER[@]}" "${OPTIONAL_ORDER[@]+"${OPTIONAL_ORDER[@]}"}"; do printf '%s ' "$(modname "$p")"; done)"

# --------------------------------------------------------------- initramfs
BB_HASH=$(sha256sum < "$BUSYBOX" | cut -c1-64)
IRD_STAMP=$( {
    echo "initrd v1 $KVER $BB_HASH"
    printf '%s\n' "${REQUIRED_ORDER[@]}" -- "${OPTIONAL_ORDER[@]+"${OPTIONAL_ORDER[@]}"}"
    for p in "${REQUIRED_ORDER[@]}" "${OPTIONAL_ORDER[@]+"${OPTIONAL_ORDER[@]}"}"; do sha256sum < "$MODROOT/$p"; done
    sha256sum < "$GUEST_DIR/initrd/init"
    sha256sum < "$GUEST_DIR/build.sh"
    sha256sum < "$GUEST_DIR/lib.sh"
    echo "$SPORE_EPOCH"
} | hash_str)

# install_busybox ROOT: /bin/busybox plus a relative symlink per applet
install_busybox() {
    local root=$1 a dir rel
    mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin"
    cp "$BUSYBOX" "$root/bin/busybox"
    chmod 755 "$root/bin/busybox"
    while IFS= read -r a; do
        [ "$a" = bin/busybox ] && continue
        [ -e "$root/$a" ] && continue
        dir=$(dirname "$a")
        case "$dir" in
            bin) rel=busybox ;;
            sbin) rel=../bin/busybox ;;
            usr/bin|usr/sbin) rel=../../bin/busybox ;;
            *) rel=/bin/busybox ;;
        esac
        mkdir -p "$root/$dir"
        ln -s "$rel" "$root/$a"
    done < <("$BUSYBOX" --list-full | LC_ALL=C sort)
}

if stamp_ok initrd.img "$IRD_STAMP"; then
    log "initrd.img: up to date"
else
    log "building initrd.img"
    S=$WORK/initrd-stage
    rm -rf "$S"
    mkdir -p "$S"/{dev,proc,sys,newroot,tmp,etc/spore,lib/modules/"$KVER"}
    install_busybox "$S"
    install -m 755 "$GUEST_DIR/initrd/init" "$S/init"
    : > "$S/etc/spore/modules.required"
    : > "$S/etc/spore/modules.optional"
    for p in "${REQUIRED_ORDER[@]}"; do
        install -D -m 644 "$MODROOT/$p" "$S/lib/modules/$KVER/$p"
        echo "$p" >> "$S/etc/spore/modules.required"
    done
    for p in "${OPTIONAL_ORDER[@]+"${OPTIONAL_ORDER[@]}"}"; do
        install -D -m 644 "$MODROOT/$p" "$S/lib/modules/$KVER/$p"
        echo "$p" >> "$S/etc/spore/modules.optional"
    done
    # stdin/stdout/stderr of /init (the kernel's built-in initramfs usually
    # has this node too)
    if [ "$(id -u)" -eq 0 ]; then
        mknod -m 600 "$S/dev/console" c 5 1
    fi
    normalize_tree "$S"
    ( cd "$S" && find . -mindepth 1 -print0 | LC_ALL=C sort -z \
        | cpio --null --create --format=newc --reproducible --owner=0:0 --quiet ) \
        | gzip -n -9 > "$OUT/initrd.img.tmp"
    touch -d "@$SPORE_EPOCH" "$OUT/initrd.img.tmp"
    mv "$OUT/initrd.img.tmp" "$OUT/initrd.img"
    stamp_set initrd.img "$IRD_STAMP"
    rm -rf "$S"
    log "initrd.img: $(stat -c %s "$OUT/initrd.img") bytes"
fi

# ------------------------------------------------------------------ rootfs
FILLER_MIB=$(( DISK_MIB * FILLER_PCT / 100 ))
OVERLAY_HASH=$( cd "$GUEST_DIR/rootfs" && find . \( -type f -o -type l \) -print0 | LC_ALL=C sort -z \
    | while IFS= read -r -d '' f; do
        if [ -L "$f" ]; then echo "L $f $(readlink "$f")";
        elif [ -x "$f" ]; then echo "X $f $(sha256sum < "$f")";
        else echo "F $f $(sha256sum < "$f")"; fi
      done | hash_str )
ROOTFS_STAMP=$( {
    echo "rootfs v1 guest=$GUEST_VERSION disk=$DISK_MIB filler=$FILLER_MIB/$FILLER_FILE_MIB"
    echo "$BB_HASH $OVERLAY_HASH $SPORE_EPOCH $SPORE_FS_UUID $SPORE_FS_HASH_SEED"
    sha256sum < "$GUEST_DIR/mke2fs.conf"
    sha256sum < "$GUEST_DIR/build.sh"
    sha256sum < "$GUEST_DIR/lib.sh"
    sha256sum < "$GUEST_DIR/tools/spore-reseed.c"
    sha256sum < "$GUEST_DIR/tools/spore-poke.c"
    sha256sum < "$GUEST_DIR/tools/spore-ioloop.c"
    gcc --version | sed -n 1p
    mke2fs -V 2>&1 | sed -n 1p
} | hash_str)

# Deterministic incompressible filler, written into DIR:
# file i = Python's Mersenne Twister seeded with "spore-filler-<i>".
make_filler() {
    log "generating ${FILLER_MIB} MiB of filler data"
    "$PYTHON" - "$1" "$FILLER_MIB" "$FILLER_FILE_MIB" <<'EOF'
import os, random, sys
out, total, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
i = 0
while total > 0:
    n = min(per, total)
    r = random.Random("spore-filler-%d" % i)
    with open(os.path.join(out, "filler-%03d" % i), "wb") as f:
        for _ in range(n):
            f.write(r.randbytes(1 << 20))
    total -= n
    i += 1
EOF
}

# populate_image STAGE IMG: copy the staging tree into the (empty, unmounted)
# ext4 image with debugfs; modes from the stage, owner root, times fixed.
populate_image() {
    local stage=$1 img=$2 script=$WORK/populate.debugfs rel p d b mode
    {
        echo "set_current_time @$SPORE_EPOCH"
        ( cd "$stage" && find . -mindepth 1 -print0 | LC_ALL=C sort -z ) \
        | while IFS= read -r -d '' rel; do
            p=${rel#.}
            case "$p" in *[[:space:]\"\\]*) die "unsupported file name: $p" ;; esac
            d=$(dirname "$p") b=$(basename "$p")
            mode=$(printf '%o' "0x$(stat -c %f "$stage/$rel")")
            if [ -L "$stage/$rel" ]; then
                echo "symlink $p $(readlink "$stage/$rel")"
            elif [ -d "$stage/$rel" ]; then
                echo "mkdir $p"
                echo "sif $p mode 0$mode"
            elif [ -f "$stage/$rel" ]; then
                echo "cd $d"
                echo "write $stage/$rel $b"
                echo "cd /"
                echo "sif $p mode 0$mode"
                echo "sif $p uid 0"
                echo "sif $p gid 0"
            else
                die "unsupported file type: $p"
            fi
          done
    } > "$script"
    debugfs -w -f "$script" "$img" > "$WORK/populate.log" 2>&1 \
        || { tail -n 20 "$WORK/populate.log" >&2; die "debugfs populate failed"; }
    # debugfs does not stop on a failed command; its errors look like
    # "<command>: <message>" lines without the "debugfs: " prompt prefix
    if grep -v -e '^debugfs' -e '^Allocated inode' -e '^Setting current time' -e '^$' "$WORK/populate.log" | grep -q .; then
        grep -v -e '^debugfs' -e '^Allocated inode' -e '^Setting current time' -e '^$' "$WORK/populate.log" | sed -n 1,20p >&2
        die "debugfs reported errors while populating the image (log: $WORK/populate.log)"
    fi
}

if stamp_ok rootfs.img "$ROOTFS_STAMP"; then
    log "rootfs.img: up to date"
else
    log "building rootfs.img (${DISK_MIB} MiB, ${FILLER_MIB} MiB filler)"
    S=$WORK/rootfs-stage
    rm -rf "$S"
    mkdir -p "$S"
    install_busybox "$S"
    # overlay from guest/rootfs with normalised modes (git keeps only +x)
    ( cd "$GUEST_DIR/rootfs" && find . -mindepth 1 -print0 | LC_ALL=C sort -z ) \
        | while IFS= read -r -d '' f; do
            if [ -L "$GUEST_DIR/rootfs/$f" ]; then
                rm -f "$S/$f"; cp -P "$GUEST_DIR/rootfs/$f" "$S/$f"
            elif [ -d "$GUEST_DIR/rootfs/$f" ]; then
                mkdir -p "$S/$f"; chmod 755 "$S/$f"
            elif [ -x "$GUEST_DIR/rootfs/$f" ]; then
                rm -f "$S/$f"; install -m 755 "$GUEST_DIR/rootfs/$f" "$S/$f"
            else
                rm -f "$S/$f"; install -m 644 "$GUEST_DIR/rootfs/$f" "$S/$f"
            fi
          done
    # the guest has no libc: its one compiled helper is static
    gcc -static -Os -s -Wall -o "$S/sbin/spore-reseed" "$GUEST_DIR/tools/spore-reseed.c" \
        || die "compiling guest/tools/spore-reseed.c failed (gcc, libc6-dev)"
    gcc -static -Os -s -Wall -o "$S/sbin/spore-poke" "$GUEST_DIR/tools/spore-poke.c" \
        || die "compiling guest/tools/spore-poke.c failed (gcc, libc6-dev)"
    gcc -static -Os -s -Wall -o "$S/sbin/spore-ioloop" "$GUEST_DIR/tools/spore-ioloop.c" \
        || die "compiling guest/tools/spore-ioloop.c failed (gcc, libc6-dev)"
    mkdir -p "$S"/{proc,sys,dev,tmp,run,root,mnt,var/log,data}
    chmod 1777 "$S/tmp"
    chmod 700 "$S/root"
    printf 'spore-guest %s\n' "$GUEST_VERSION" > "$S/etc/spore-release"
    chmod 644 "$S/etc/spore-release"
    if [ "$FILLER_MIB" -gt 0 ]; then
        make_filler "$S/data"
        chmod 644 "$S"/data/filler-*
    fi
    normalize_tree "$S"
    # An empty file system first, then every file written by one debugfs
    # script in sorted order with a fixed clock.  (mke2fs -d would copy the
    # host's ctimes and readdir order, which are not reproducible.)
    rm -f "$OUT/rootfs.img.tmp"
    truncate -s "${DISK_MIB}M" "$OUT/rootfs.img.tmp"
    mke2fs -q -F -t ext4 -b 4096 -I 256 -i 16384 -m 0 \
        -L spore-root -U "$SPORE_FS_UUID" \
        -E "root_owner=0:0,hash_seed=$SPORE_FS_HASH_SEED,lazy_itable_init=0,lazy_journal_init=0,nodiscard" \
        "$OUT/rootfs.img.tmp" >&2 || die "mke2fs failed"
    populate_image "$S" "$OUT/rootfs.img.tmp"
    e2fsck -fn "$OUT/rootfs.img.tmp" >/dev/null 2>&1 || { e2fsck -fn "$OUT/rootfs.img.tmp" >&2 || true; die "fresh rootfs.img does not pass e2fsck"; }
    touch -d "@$SPORE_EPOCH" "$OUT/rootfs.img.tmp"
    mv "$OUT/rootfs.img.tmp" "$OUT/rootfs.img"
    stamp_set rootfs.img "$ROOTFS_STAMP"
    rm -rf "$S"
    log "rootfs.img: $(stat -c %s "$OUT/rootfs.img") bytes virtual, $(du -k "$OUT/rootfs.img" | cut -f1) KiB allocated"
fi

# -------------------------------------------------------------- manifest
{
    echo "SPORE_GUEST_VERSION=$GUEST_VERSION"
    echo "SPORE_GUEST_KERNEL=$KVER"
    echo "SPORE_GUEST_DISK_MIB=$DISK_MIB"
    echo "SPORE_GUEST_FILLER_MIB=$FILLER_MIB"
    echo "SPORE_GUEST_FS_UUID=$SPORE_FS_UUID"
    echo "SPORE_GUEST_CMDLINE='console=ttyS0 root=/dev/vda'"
    echo "SPORE_GUEST_STAMPS='$(cat "$OUT/.vmlinuz.stamp") $(cat "$OUT/.initrd.img.stamp") $(cat "$OUT/.rootfs.img.stamp")'"
} > "$OUT/manifest.env.tmp"
mv "$OUT/manifest.env.tmp" "$OUT/manifest.env"

log "done in $(( $(date +%s) - T0 ))s: $OUT/{vmlinuz,$([ -f "$OUT/vmlinux" ] && echo vmlinux,)initrd.img,rootfs.img}"
