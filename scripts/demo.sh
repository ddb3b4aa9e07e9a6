#!/usr/bin/env bash
# A guided demo of qcowfs on an OpenStack-nova-like layout, as root:
#   _base/<hash>          raw image of an ext4 file system (made without mounting: mkfs.ext4 -d)
#   instances/<uuid>/disk qcow2, legacy AES (nova's "encryption=on"), backed by ../../_base/<hash>
# It mounts the overlay with qcowfs, loop-mounts MOUNTPOINT/disk read-only, shows the guest's
# files, and unmounts everything on every exit path.
# QCOWFS_BIN=/path/to/qcowfs skips the build and uses that binary.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
# shellcheck source=scripts/lib/install-deps.sh
source scripts/lib/install-deps.sh

[ "$(id -u)" -eq 0 ] || die "run the demo as root (it loop-mounts the guest file system)"

step "Checking tools"
install_deps
require_fuse_device

resolve_qcowfs

WORK=$(mktemp -d /tmp/qcowfs-demo.XXXXXX)
MNT="$WORK/mnt"
GUEST="$WORK/guest"
mkdir -p "$MNT" "$GUEST"

cleanup() {
	local rc=$?
	set +e
	step "Cleaning up"
	if mountpoint -q "$GUEST"; then
		note "umount $GUEST"
		umount "$GUEST" || umount -l "$GUEST"
	fi
	if mountpoint -q "$MNT"; then
		note "qcowfs umount $MNT"
		"$QCOWFS" umount "$MNT" || fusermount3 -u -z "$MNT" || umount -l "$MNT"
	fi
	rm -rf "$WORK"
	note "removed $WORK"
	if [ "$rc" -ne 0 ]; then
		printf '\n\033[1;31mdemo FAILED (exit %s)\033[0m\n' "$rc" >&2
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

HASH=$(printf 'cirros-0.6.2-x86_64-disk.img' | sha1sum | cut -c1-40)
UUID=6f1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d
BASE="$WORK/_base/$HASH"
INSTANCE="$WORK/instances/$UUID"
PASSFILE="$WORK/passphrase"

step "Making the base image $BASE (raw, ext4, populated without mounting)"
mkdir -p "$WORK/_base" "$INSTANCE" "$WORK/content/etc"
echo "Hello from the base image." >"$WORK/content/hello.txt"
echo "demo-guest" >"$WORK/content/etc/hostname"
seq 1 20000 >"$WORK/content/numbers.txt"
truncate -s 64M "$BASE"
mkfs.ext4 -q -F -L demo-root -d "$WORK/content" "$BASE"
ls -l "$WORK/_base"

step "Making the instance disk $INSTANCE/disk (qcow2, legacy AES, backing ../../_base/$HASH)"
# The guest's own changes: the base file system plus one file, written with debugfs into a
# scratch copy; qemu-img convert -B keeps only what differs from the base, encrypted.
printf '%s' 'demo passphrase' >"$PASSFILE" # qemu's secret file= takes the bytes as they are
chmod 600 "$PASSFILE"
cp --sparse=always "$BASE" "$WORK/scratch.raw"
echo "Written by the instance; stored only in the encrypted overlay." >"$WORK/note.txt"
debugfs -w -R "write $WORK/note.txt instance-note.txt" "$WORK/scratch.raw" >/dev/null 2>&1
debugfs -R "cat instance-note.txt" "$WORK/scratch.raw" 2>/dev/null | grep -q "encrypted overlay" ||
	die "debugfs could not write the instance's note"
(
	cd "$INSTANCE"
	qemu-img convert -f raw -O qcow2 \
		--object "secret,id=sec0,file=$PASSFILE" \
		-o encrypt.format=aes,encrypt.key-secret=sec0 \
		-B "../../_base/$HASH" -F raw \
		"$WORK/scratch.raw" disk
)
rm -f "$WORK/scratch.raw" "$WORK/note.txt"
qemu-img info "$INSTANCE/disk" | grep -E '^(image|file format|virtual size|encrypted|backing file)' | sed 's/^/    /'
if grep -q "stored only in the encrypted overlay" "$INSTANCE/disk"; then
	die "the overlay holds the note in clear text"
fi
note "the note's text does not appear in the overlay file: it is encrypted"

step "qcowfs info $INSTANCE/disk"
"$QCOWFS" info "$INSTANCE/disk"

step "qcowfs mount --read-only --passphrase-file $PASSFILE $INSTANCE/disk $MNT"
"$QCOWFS" mount --read-only --passphrase-file "$PASSFILE" "$INSTANCE/disk" "$MNT"

step "ls -l $MNT"
ls -l "$MNT"

step "mount -o loop,ro $MNT/disk $GUEST"
mount -o loop,ro "$MNT/disk" "$GUEST"

step "ls -l $GUEST"
ls -l "$GUEST"

step "cat $GUEST/hello.txt (from the raw base)"
cat "$GUEST/hello.txt"

step "cat $GUEST/instance-note.txt (from the encrypted overlay)"
cat "$GUEST/instance-note.txt"

step "umount $GUEST"
umount "$GUEST"

step "qcowfs umount $MNT"
"$QCOWFS" umount "$MNT"

step "Demo finished"
