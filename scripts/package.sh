#!/usr/bin/env bash
# Builds a Debian package of qcowfs with dpkg-deb (no cargo-deb, no debhelper):
#   /usr/bin/qcowfs                          the release binary, stripped
#   /sbin/mount.fuse.qcowfs -> it            the mount(8) helper, beside fuse3's /sbin/mount.fuse3
#   /usr/share/man/man1/qcowfs*.1.gz         manual pages, generated from the CLI definitions
#   bash, zsh and fish completions           under /usr/share
#   /usr/share/doc/qcowfs/copyright          the licence, changelog.Debian.gz
# scripts/install.sh stages the files (DESTDIR, PREFIX=/usr), so the package holds what it installs.
# Depends comes from the libraries the binary links (dpkg-shlibdeps), plus fuse3 (fusermount3).
#
#   scripts/package.sh                       prints the .deb's path last, e.g.
#                                            target/debian/qcowfs_0.1.0-1_amd64.deb
#
# Environment:
#   QCOWFS_BIN=/path/to/qcowfs   package that binary instead of building; its --version must be
#                                Cargo.toml's version
#   DEB_OUTDIR=DIR               where the .deb goes (default: target/debian)
#   DEB_REVISION=1               the Debian revision of the package version
#   DEB_MAINTAINER="N <mail>"    the Maintainer field (the default's address is a placeholder)
#   SOURCE_DATE_EPOCH            the changelog's date (default: the last commit's, else now)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib/install-deps.sh
source "$REPO/scripts/lib/install-deps.sh"

[ $# -eq 0 ] || die "usage: scripts/package.sh (no arguments; see the environment in its header)"
for tool in dpkg-deb dpkg-shlibdeps strip gzip; do
	command -v "$tool" >/dev/null 2>&1 ||
		die "$tool not found (Debian packages: dpkg, dpkg-dev, binutils, gzip)"
done

# The version of [package] in Cargo.toml: the first `version = "..."` of that section.
VERSION=$(sed -n '/^\[package\]/,/^\[/ s/^version *= *"\([^"]*\)".*/\1/p' "$REPO/Cargo.toml" | head -n 1)
[ -n "$VERSION" ] || die "no version in $REPO/Cargo.toml's [package]"
REVISION=${DEB_REVISION:-1}
ARCH=$(dpkg --print-architecture)
MAINTAINER=${DEB_MAINTAINER:-The qcowfs developers <qcowfs@example.invalid>}
OUTDIR=${DEB_OUTDIR:-${CARGO_TARGET_DIR:-$REPO/target}/debian}
NAME="qcowfs_${VERSION}-${REVISION}_${ARCH}"

resolve_qcowfs
BIN=$QCOWFS
# A binary of another version (a stale QCOWFS_BIN) would be packaged under the wrong version.
got=$("$BIN" --version)
[ "$got" = "qcowfs $VERSION" ] || die "$BIN says \"$got\"; Cargo.toml says qcowfs $VERSION"
note "$BIN: $got"

step "Staging the files with scripts/install.sh"
mkdir -p "$OUTDIR"
stage="$OUTDIR/$NAME"
rm -rf "$stage"
# Files 0644 and folders 0755 whatever the caller's umask: dpkg installs the modes it is given.
umask 022
mkdir -m 0755 "$stage"
DESTDIR="$stage" SBINDIR=/sbin QCOWFS_BIN="$BIN" bash "$REPO/scripts/install.sh" /usr >/dev/null
# Debian policy 12.1: manual pages compressed with gzip -9n (no name, no timestamp: reproducible).
gzip -9n "$stage"/usr/share/man/man1/*.1

docdir="$stage/usr/share/doc/qcowfs"
install -d -m 0755 "$docdir"
{
	printf 'Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n'
	printf 'Upstream-Name: qcowfs\n'
	printf 'Source: https://github.com/qcowfs/qcowfs\n'
	printf 'Comment: The binary links in the Rust crates listed in Cargo.lock, under their own\n'
	printf ' licences (MIT, Apache-2.0 or both for nearly all; see each crate).\n'
	printf '\nFiles: *\n'
	sed -n 's/^Copyright \((c) \)\{0,1\}/Copyright: /p' "$REPO/LICENSE" | head -n 1
	printf 'License: MIT\n'
	# The licence text after its title and copyright line, indented; blank lines as " .".
	sed '1,/^Copyright /d' "$REPO/LICENSE" | sed '/./,$!d' | sed 's/^$/./; s/^/ /'
} >"$docdir/copyright"
chmod 0644 "$docdir/copyright"

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
	SOURCE_DATE_EPOCH=$(git -C "$REPO" log -1 --format=%ct 2>/dev/null || date +%s)
fi
{
	printf 'qcowfs (%s-%s) unstable; urgency=medium\n\n' "$VERSION" "$REVISION"
	printf '  * Package of qcowfs %s, built by scripts/package.sh.\n\n' "$VERSION"
	printf ' -- %s  %s\n' "$MAINTAINER" "$(LC_ALL=C date -R -u -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n >"$docdir/changelog.Debian.gz"
chmod 0644 "$docdir/changelog.Debian.gz"

step "Writing DEBIAN/control"
# dpkg-shlibdeps reads the package name from a debian/control; a scratch one, outside the stage.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
mkdir "$scratch/debian"
printf 'Source: qcowfs\n\nPackage: qcowfs\nArchitecture: any\n' >"$scratch/debian/control"
shlibs=$(cd "$scratch" && dpkg-shlibdeps -O "$stage/usr/bin/qcowfs" 2>"$scratch/warnings") ||
	die "dpkg-shlibdeps failed: $(cat "$scratch/warnings")"
shlibs=${shlibs#shlibs:Depends=}
[ -n "$shlibs" ] || die "dpkg-shlibdeps found no library dependency of $stage/usr/bin/qcowfs"
note "libraries: $shlibs"
# KiB the installed files take (what dpkg-gencontrol computes, near enough).
size=$(du -s -k "$stage" | cut -f1)
install -d -m 0755 "$stage/DEBIAN"
cat >"$stage/DEBIAN/control" <<EOF
Package: qcowfs
Version: $VERSION-$REVISION
Architecture: $ARCH
Maintainer: $MAINTAINER
Installed-Size: $size
Depends: $shlibs, fuse3
Recommends: qemu-utils
Section: admin
Priority: optional
Homepage: https://github.com/qcowfs/qcowfs
Description: mount encrypted qcow2 disk images and their backing chains with FUSE
 qcowfs mounts a qcow2 disk image, with its whole backing chain, as one plain
 file, read-write, without booting the virtual machine and without qemu-nbd or
 kernel modules. Legacy AES (OpenStack nova's encryption=on) and LUKS encrypted
 images are read and written; writes are re-encrypted and leave the image
 consistent for qemu-img check.
 .
 Without mounting, it reads files in a guest's ext2/3/4, XFS, btrfs, NTFS and
 FAT file systems (on partitions and LVM logical volumes too) and changes them
 on ext2/3/4, XFS and FAT. It audits a host's instance disks for unencrypted
 guest data, and mounts from mount(8) and /etc/fstab as type fuse.qcowfs.
EOF
chmod 0644 "$stage/DEBIAN/control"
sed 's/^/    /' "$stage/DEBIAN/control" | head -n 9

step "Building the package"
deb="$OUTDIR/$NAME.deb"
rm -f "$deb"
dpkg-deb --root-owner-group --build "$stage" "$deb" >/dev/null
rm -rf "$stage"
note "$(du -h "$deb" | cut -f1)  $deb"
# lintian only when it is there: it is no tool the build needs, so nothing installs it.
if lint=$(command -v lintian); then
	step "lintian"
	"$lint" --info "$deb" || note "lintian reported the problems above"
fi
step "Built"
# The last line: the package's path alone, for scripts.
printf '%s\n' "$deb"
