# spore guest shell helpers; source with `. /etc/spore/lib.sh`.
#
# Kernel command line options of the form spore.NAME or spore.NAME=VALUE.
# Values cannot contain spaces (the kernel splits the line on blanks).

SPORE_CMDLINE=$(cat /proc/cmdline 2>/dev/null)
export SPORE_CMDLINE

# Word-split the command line without expanding globs (spore.cat=/etc/*).
_nog_begin() { case $- in *f*) _nog_was=1 ;; *) _nog_was=; set -f ;; esac; }
_nog_end() { [ -n "$_nog_was" ] || set +f; }

# spore_flag NAME: true if "spore.NAME" or "spore.NAME=..." is on the command line
spore_flag() {
    _nog_begin
    for _a in $SPORE_CMDLINE; do
        case "$_a" in "spore.$1"|"spore.$1="*) _nog_end; return 0 ;; esac
    done
    _nog_end
    return 1
}

# spore_arg NAME: value of the last spore.NAME=VALUE (empty if absent)
spore_arg() {
    _v=
    _nog_begin
    for _a in $SPORE_CMDLINE; do
        case "$_a" in "spore.$1="*) _v=${_a#spore."$1"=} ;; esac
    done
    _nog_end
    printf '%s' "$_v"
}

# spore_args NAME: every value of spore.NAME=VALUE, one per line, in order
spore_args() {
    _nog_begin
    for _a in $SPORE_CMDLINE; do
        case "$_a" in "spore.$1="*) printf '%s\n' "${_a#spore."$1"=}" ;; esac
    done
    _nog_end
}

# spore_print_file PATH: one console line
#   SPORE-FILE <path> <content>     content with the final newline removed and
#                                   inner newlines shown as the two characters \n
#   SPORE-FILE-MISSING <path>       if PATH is not a readable regular file
spore_print_file() {
    if [ -f "$1" ] && [ -r "$1" ]; then
        printf 'SPORE-FILE %s %s\n' "$1" "$(sed -e ':a' -e 'N' -e '$!ba' -e 's/\n/\\n/g' "$1")"
    else
        printf 'SPORE-FILE-MISSING %s\n' "$1"
    fi
}

# spore_write_file /path=CONTENT: write CONTENT and a newline to /path, sync;
# prints "SPORE-WROTE <path>" or "SPORE-WRITE-FAILED <path>"
spore_write_file() {
    _p=${1%%=*}
    _c=${1#*=}
    case "$_p" in
        /*) ;;
        *) printf 'SPORE-WRITE-FAILED %s\n' "$_p"; return 1 ;;
    esac
    _d=${_p%/*}
    if { [ -z "$_d" ] || mkdir -p "$_d" 2>/dev/null; } && printf '%s\n' "$_c" > "$_p" && sync; then
        printf 'SPORE-WROTE %s\n' "$_p"
    else
        printf 'SPORE-WRITE-FAILED %s\n' "$_p"
        return 1
    fi
}

# spore_run_hooks DIR: run every executable DIR/* in name order
spore_run_hooks() {
    [ -d "$1" ] || return 0
    for _h in "$1"/*; do
        { [ -f "$_h" ] && [ -x "$_h" ]; } || continue
        "$_h"
        _rc=$?
        [ "$_rc" -eq 0 ] || echo "spore-init: warning: hook $_h exited with status $_rc"
    done
}
