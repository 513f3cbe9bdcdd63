#!/usr/bin/env bash
# Builds (or reuses) a minimal Debian root with no Python, to test the frozen `cvae` binary in:
#
#   packaging/make_chroot.sh [--suite SUITE] [ROOT]
#       SUITE: a Debian release, default bookworm (the tests also use bullseye, Debian 11,
#       whose glibc 2.31 is older than the build machine's);
#       ROOT default: ~/.cache/cvae-ci/SUITE-minbase
#
# `debootstrap --variant=minbase SUITE` from the Debian mirror this machine's apt already
# uses, read from /etc/apt/sources.list and /etc/apt/sources.list.d/*.{list,sources} (no host
# is named here): the URI that lists SUITE, else the first one whose path ends in /debian
# (a bookworm machine's deb.debian.org/debian still serves bullseye). Installs debootstrap with apt-get when it is missing. Needs root.
# A finished root carries a marker file naming its suite and is reused as long as it still
# looks sane; a half-built one (interrupted run) is thrown away and rebuilt. Prints the
# root's path last.
set -euo pipefail

SUITE=bookworm
ROOT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --suite) SUITE="${2:?--suite needs a Debian release name}"; shift 2 ;;
        --suite=*) SUITE="${1#--suite=}"; shift ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;p}' "$0"; exit 0 ;;
        -*) echo "make_chroot: unknown option $1" >&2; exit 2 ;;
        *) ROOT="$1"; shift ;;
    esac
done
ROOT="${ROOT:-${CVAE_CHROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/cvae-ci/$SUITE-minbase}}"
MARKER="$ROOT/.cvae-chroot-ok"

say() { echo "make_chroot: $*" >&2; }

valid_root() {
    # The loader may be an absolute symlink (bullseye's points at ld-2.31.so), which the
    # host cannot follow: test the link itself.
    local loader="$ROOT/lib64/ld-linux-x86-64.so.2"
    [ "$(cat "$MARKER" 2>/dev/null)" = "$SUITE" ] && [ -x "$ROOT/bin/sh" ] \
        && { [ -e "$loader" ] || [ -L "$loader" ]; } && [ ! -e "$ROOT/usr/bin/python3" ]
}

if [ "$(id -u)" != 0 ]; then
    say "needs root (debootstrap and chroot)"
    exit 1
fi

mkdir -p "$(dirname "$ROOT")"
# One builder at a time (parallel test runs share the cache).
exec 9>"$ROOT.lock"
flock 9

if valid_root; then
    say "reusing $ROOT"
    echo "$ROOT"
    exit 0
fi

if ! command -v debootstrap >/dev/null 2>&1; then
    say "installing debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q debootstrap >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q debootstrap >/dev/null; }
fi

# The mirror: the first Debian archive URI in apt's sources that serves the plain suite (not
# -security / -updates); failing that, the first URI whose path ends in /debian.
mirror_from_sources() {
    local files=()
    [ -f /etc/apt/sources.list ] && files+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && files+=("$f")
    done
    [ ${#files[@]} -gt 0 ] || return 0
    awk -v suite="$SUITE" '
        function consider(uri, suites,   n, i, s) {
            sub(/\/+$/, "", uri)
            n = split(suites, s, /[ \t]+/)
            for (i = 1; i <= n; i++) if (s[i] == suite && exact == "") exact = uri
            if (uri ~ /\/debian$/ && loose == "") loose = uri
        }
        function flush_stanza() {
            if (types ~ /(^|[ \t])deb([ \t]|$)/ && enabled != "no" && uris != "") {
                n = split(uris, u, /[ \t]+/)
                for (j = 1; j <= n; j++) if (u[j] != "") consider(u[j], suites)
            }
            types = ""; uris = ""; suites = ""; enabled = ""
        }
        FILENAME ~ /\.sources$/ {
            if (FILENAME != current) { flush_stanza(); current = FILENAME }
            if ($0 ~ /^[ \t]*$/) { flush_stanza(); next }
            if ($0 ~ /^[ \t]*#/) next
            key = tolower($1); val = $0; sub(/^[^:]*:[ \t]*/, "", val)
            if (key == "types:") types = val
            else if (key == "uris:") uris = val
            else if (key == "suites:") suites = val
            else if (key == "enabled:") enabled = tolower(val)
            next
        }
        FILENAME !~ /\.sources$/ {
            if (current ~ /\.sources$/) { flush_stanza(); current = FILENAME }
            line = $0; sub(/#.*/, "", line)
            n = split(line, w, /[ \t]+/)
            k = 1; while (k <= n && w[k] == "") k++
            if (w[k] != "deb") next
            k++
            if (w[k] ~ /^\[/) { while (k <= n && w[k] !~ /\]$/) k++; k++ }
            if (k + 1 <= n) consider(w[k], w[k + 1])
        }
        END { flush_stanza(); if (exact != "") print exact; else if (loose != "") print loose }
    ' "${files[@]}"
}

MIRROR="$(mirror_from_sources)"
if [ -z "$MIRROR" ]; then
    say "no Debian mirror found in /etc/apt/sources.list{,.d/*}; cannot debootstrap"
    exit 1
fi

say "debootstrap --variant=minbase $SUITE into $ROOT (mirror from apt's sources)"
WORK="$ROOT.partial"
# A previous interrupted run may have left mounts inside the partial or old root.
for d in "$WORK" "$ROOT"; do
    for m in proc sys dev/pts dev; do
        mountpoint -q "$d/$m" 2>/dev/null && umount -l "$d/$m" || true
    done
done
rm -rf "$WORK" "$ROOT"
start=$(date +%s)
if ! debootstrap --variant=minbase "$SUITE" "$WORK" "$MIRROR" >"$ROOT.log" 2>&1; then
    say "debootstrap failed; last lines of $ROOT.log:"
    tail -n 20 "$ROOT.log" >&2
    exit 1
fi
# Keep the root small: the package cache is not needed.
rm -rf "$WORK/var/cache/apt/archives/"*.deb
if [ -e "$WORK/usr/bin/python3" ]; then
    say "the new root unexpectedly contains python3"
    exit 1
fi
echo "$SUITE" >"$WORK/.cvae-chroot-ok"  # which release: a root is reused only for its own
mv "$WORK" "$ROOT"
say "built in $(( $(date +%s) - start )) s"
echo "$ROOT"
