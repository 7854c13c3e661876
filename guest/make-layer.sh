#!/usr/bin/env bash
# Copy an ext4 disk image and add, replace or delete files in the copy,
# without mounting it (debugfs -w).  Everything not touched stays
# byte-identical; only the new data blocks and the metadata blocks that
# describe them (bitmaps, inode table, directory, group descriptors,
# superblock) change.  The result is reproducible for the same inputs.
#
#   guest/make-layer.sh BASE.img OUT.img SPEC...
#
# SPEC is one of
#   /path=CONTENT     file containing CONTENT plus a newline (mode 0644)
#   /path=@HOSTFILE   copy of HOSTFILE (mode 0755 if HOSTFILE is executable,
#                     else 0644)
#   -/path            delete /path (a file or an empty directory)
# Missing parent directories are created (mode 0755). Owner is root, all
# timestamps are SOURCE_DATE_EPOCH (default 2024-01-01).
# BASE.img and OUT.img may be the same file: then it is edited in place.
set -euo pipefail

GUEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
. "$GUEST_DIR/lib.sh"

[ $# -ge 2 ] || die "usage: make-layer.sh BASE.img OUT.img [/path=CONTENT | /path=@HOSTFILE | -/path]..."
BASE=$1 OUTIMG=$2
shift 2
[ -f "$BASE" ] || die "no such image: $BASE"
command -v debugfs >/dev/null || ensure_packages e2fsprogs

TMPD=$(mktemp -d)
trap 'rm -rf "$TMPD"' EXIT

if [ "$(readlink -f "$BASE")" = "$(readlink -f "$OUTIMG" 2>/dev/null || echo "$OUTIMG")" ]; then
    WORKIMG=$OUTIMG.layer-tmp
else
    WORKIMG=$OUTIMG.tmp
fi
rm -f "$WORKIMG"
cp --sparse=always "$BASE" "$WORKIMG"

exists() { debugfs -R "stat \"$1\"" "$WORKIMG" 2>/dev/null | grep -q '^Inode:'; }
is_dir() { debugfs -R "stat \"$1\"" "$WORKIMG" 2>/dev/null | grep -q 'Type: directory'; }

CMDS=$TMPD/cmds
CHECKS=()       # "path srcfile" to verify afterwards
DELETED=()
n=0
echo "set_current_time @$SPORE_EPOCH" > "$CMDS"
declare -A MADE_DIRS=()

set_meta() { # path mode
    {
        echo "sif \"$1\" mode $2"
        echo "sif \"$1\" uid 0"
        echo "sif \"$1\" gid 0"
    } >> "$CMDS"
}

for spec in "$@"; do
    case "$spec" in
    -/*)
        path=${spec#-}
        exists "$path" || die "cannot delete $path: not in $BASE"
        if is_dir "$path"; then echo "rmdir \"$path\"" >> "$CMDS"; else echo "rm \"$path\"" >> "$CMDS"; fi
        DELETED+=("$path")
        ;;
    /*=*)
        path=${spec%%=*}
        val=${spec#*=}
        case "$path" in */|*//*|*/./*|*/../*|*' '*) die "bad path '$path' (absolute, no spaces, no . or ..)" ;; esac
        n=$((n + 1))
        src=$TMPD/src.$n
        mode=0100644
        if [ "${val#@}" != "$val" ]; then
            [ -f "${val#@}" ] || die "no such host file: ${val#@}"
            cp "${val#@}" "$src"
            [ -x "${val#@}" ] && mode=0100755
        else
            printf '%s\n' "$val" > "$src"
        fi
        # parents, outermost first
        dir=$(dirname "$path")
        parents=()
        while [ "$dir" != / ]; do parents=("$dir" "${parents[@]+"${parents[@]}"}"); dir=$(dirname "$dir"); done
        for d in "${parents[@]+"${parents[@]}"}"; do
            [ -n "${MADE_DIRS[$d]:-}" ] && continue
            if exists "$d"; then
                is_dir "$d" || die "$d exists in $BASE and is not a directory"
            else
                echo "mkdir \"$d\"" >> "$CMDS"
                set_meta "$d" 040755
            fi
            MADE_DIRS[$d]=1
        done
        if exists "$path"; then
            is_dir "$path" && die "$path is a directory in $BASE"
            echo "rm \"$path\"" >> "$CMDS"
        fi
        echo "cd \"$(dirname "$path")\"" >> "$CMDS"
        echo "write \"$src\" \"$(basename "$path")\"" >> "$CMDS"
        echo "cd /" >> "$CMDS"
        set_meta "$path" "$mode"
        CHECKS+=("$path $src")
        ;;
    *) die "bad spec '$spec' (want /path=CONTENT, /path=@HOSTFILE or -/path)" ;;
    esac
done

debugfs -w -f "$CMDS" "$WORKIMG" > "$TMPD/debugfs.log" 2>&1 || { cat "$TMPD/debugfs.log" >&2; die "debugfs failed"; }

# debugfs keeps going after a failed command: verify the result instead.
for c in "${CHECKS[@]+"${CHECKS[@]}"}"; do
    path=${c%% *} src=${c#* }
    debugfs -R "cat \"$path\"" "$WORKIMG" 2>/dev/null > "$TMPD/check"
    if ! cmp -s "$TMPD/check" "$src"; then
        cat "$TMPD/debugfs.log" >&2
        die "$path does not have the expected content in $OUTIMG"
    fi
done
for path in "${DELETED[@]+"${DELETED[@]}"}"; do
    if exists "$path"; then cat "$TMPD/debugfs.log" >&2; die "$path still exists"; fi
done
if ! e2fsck -fn "$WORKIMG" > "$TMPD/fsck.log" 2>&1; then
    cat "$TMPD/debugfs.log" "$TMPD/fsck.log" >&2
    die "e2fsck reports errors in the layered image"
fi
touch -d "@$SPORE_EPOCH" "$WORKIMG"
mv "$WORKIMG" "$OUTIMG"
log "make-layer: $OUTIMG = $BASE + $# change(s)"
