#!/usr/bin/env bash
# Installs qcowfs, as root:
#   PREFIX/bin/qcowfs                        the binary (release build), stripped of the debug info
#                                            the release profile keeps for profiling
#   $SBINDIR/mount.fuse.qcowfs -> it         the mount(8) helper: mount -t fuse.qcowfs, fstab
#   PREFIX/share/man/man1/qcowfs*.1          manual pages, generated from the CLI definitions
#   bash, zsh and fish completions           under PREFIX/share
#
#   scripts/install.sh [PREFIX]              PREFIX defaults to /usr/local
#
# Environment:
#   QCOWFS_BIN=/path/to/qcowfs   install that binary instead of building (e.g. built as a user,
#                                since root often has no Rust toolchain:
#                                cargo build --release && sudo QCOWFS_BIN=target/release/qcowfs scripts/install.sh)
#   SBINDIR=/sbin                where mount(8) looks for helpers (util-linux searches /sbin)
#   DESTDIR=                     staging root for packaging; prefixed to every installed path
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib/install-deps.sh
source "$REPO/scripts/lib/install-deps.sh"

PREFIX=${1:-/usr/local}
SBINDIR=${SBINDIR:-/sbin}
DESTDIR=${DESTDIR:-}
[ $# -le 1 ] || die "usage: scripts/install.sh [PREFIX]"
case "$PREFIX" in /*) ;; *) die "PREFIX must be an absolute path: $PREFIX" ;; esac

if [ "$(id -u)" -ne 0 ] && [ -z "$DESTDIR" ]; then
	die "run as root (it installs into $PREFIX and $SBINDIR), or set DESTDIR to stage the files"
fi

resolve_qcowfs
BIN=$QCOWFS
command -v strip >/dev/null 2>&1 || die "strip not found (Debian package binutils): it strips the installed binary"

bindir="$DESTDIR$PREFIX/bin"
sbindir="$DESTDIR$SBINDIR"
mandir="$DESTDIR$PREFIX/share/man/man1"
bashdir="$DESTDIR$PREFIX/share/bash-completion/completions"
zshdir="$DESTDIR$PREFIX/share/zsh/site-functions"
fishdir="$DESTDIR$PREFIX/share/fish/vendor_completions.d"

step "Installing the binary"
install -d -m 0755 "$bindir" "$sbindir" "$mandir" "$bashdir" "$zshdir" "$fishdir"
# Stripped as distributions ship binaries: most of a release build is debug info, which stays with
# the build for profiling. The stripped copy is made first, so the installed file never has it.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
strip --strip-all -o "$tmp/qcowfs" "$BIN"
install -m 0755 "$tmp/qcowfs" "$bindir/qcowfs"
note "$bindir/qcowfs ($(du -h "$bindir/qcowfs" | cut -f1), stripped)"

step "Installing the mount(8) helper"
# The link's target is the installed path (without DESTDIR): what the running system will see.
ln -sfn "$PREFIX/bin/qcowfs" "$sbindir/mount.fuse.qcowfs"
note "$sbindir/mount.fuse.qcowfs -> $PREFIX/bin/qcowfs"

step "Installing manual pages and completions"
"$bindir/qcowfs" generate man "$tmp"
for page in "$tmp"/*.1; do
	install -m 0644 "$page" "$mandir/"
	note "$mandir/$(basename "$page")"
done
"$bindir/qcowfs" generate completions bash >"$tmp/qcowfs.bash"
"$bindir/qcowfs" generate completions zsh >"$tmp/_qcowfs"
"$bindir/qcowfs" generate completions fish >"$tmp/qcowfs.fish"
install -m 0644 "$tmp/qcowfs.bash" "$bashdir/qcowfs"
install -m 0644 "$tmp/_qcowfs" "$zshdir/_qcowfs"
install -m 0644 "$tmp/qcowfs.fish" "$fishdir/qcowfs.fish"
note "$bashdir/qcowfs"
note "$zshdir/_qcowfs"
note "$fishdir/qcowfs.fish"

if [ -z "$DESTDIR" ] && command -v mandb >/dev/null 2>&1; then
	mandb -q 2>/dev/null || true
fi

step "Installed"
note "qcowfs mount --passphrase-file KEY IMAGE MOUNTPOINT"
note "mount -t fuse.qcowfs IMAGE MOUNTPOINT -o ro,passphrase_file=KEY"
note "fstab: IMAGE MOUNTPOINT fuse.qcowfs ro,passphrase_file=KEY,nofail 0 0"
command -v fusermount3 >/dev/null 2>&1 || note "note: fusermount3 (package fuse3) is needed for mounts by other users than root"
