#!/usr/bin/env bash
# A guided demo of qcowfs on an OpenStack-nova-like layout, as root, showing the finding the
# project started from: nova's "encryption=on" encrypts only the qcow2 overlay; the guest's OS and
# most of its data stay in the plaintext raw base in _base/.
#   instances/_base/<hash>  raw image of an ext4 file system: a small OS-like tree (/etc, /usr/bin
#                           with binaries copied from the host, /var/log), made with mkfs.ext4 -d
#   instances/<uuid>/disk   qcow2, legacy AES (nova's "encryption=on"), backed by the base, made as
#                           nova makes it (qemu-img create -b BASE -F raw); the instance's own files
#                           are written into it through a qcowfs mount
# Then: qcowfs info (most of the guest data is not encrypted), qcowfs audit of the instances
# folder, qcowfs seal of a copy (fully encrypted, no backing file), qcowfs cat/ls (no mount), and a
# read-only mount with the guest file system loop-mounted. Everything is unmounted, every loop
# device detached and the temp folder removed on every exit path.
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

# Loop devices whose backing file is MNT/disk (mount -o loop makes them).
detach_loops() {
	[ -e "$MNT/disk" ] || return 0
	losetup -j "$MNT/disk" | cut -d: -f1 | while read -r dev; do
		note "losetup -d $dev"
		losetup -d "$dev"
	done
}

cleanup() {
	local rc=$?
	set +e
	step "Cleaning up"
	if mountpoint -q "$GUEST"; then
		note "umount $GUEST"
		umount "$GUEST" || umount -l "$GUEST"
	fi
	if mountpoint -q "$MNT"; then
		detach_loops
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

# Indent a command's output under its step header.
indent() { sed 's/^/    /'; }

HASH=$(printf 'ubuntu-24.04-server-cloudimg-amd64.img' | sha1sum | cut -c1-40)
UUID=6f1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d
INSTANCES="$WORK/instances"
BASE="$INSTANCES/_base/$HASH"
DISK="$INSTANCES/$UUID/disk"
SEALED="$WORK/sealed/disk"
PASSFILE="$WORK/passphrase"
ROOT="$WORK/rootfs"

step "Making the base image instances/_base/$HASH (raw ext4, a small OS, made with mkfs.ext4 -d)"
mkdir -p "$INSTANCES/_base" "$INSTANCES/$UUID" "$WORK/sealed"
mkdir -p "$ROOT/etc/ssh" "$ROOT/usr/bin" "$ROOT/var/log" "$ROOT/home/user" "$ROOT/root"
echo "ubuntu" >"$ROOT/etc/hostname"
printf 'NAME="Ubuntu"\nVERSION_ID="24.04"\nPRETTY_NAME="Ubuntu 24.04 LTS (qcowfs demo)"\n' >"$ROOT/etc/os-release"
printf 'root:x:0:0:root:/root:/bin/bash\nuser:x:1000:1000:user:/home/user:/bin/bash\n' >"$ROOT/etc/passwd"
printf 'root:*:19700:0:99999:7:::\nuser:!:19700:0:99999:7:::\n' >"$ROOT/etc/shadow"
chmod 640 "$ROOT/etc/shadow"
printf 'LABEL=cloudimg-rootfs / ext4 discard,errors=remount-ro 0 1\n' >"$ROOT/etc/fstab"
printf 'PermitRootLogin no\nPasswordAuthentication no\n' >"$ROOT/etc/ssh/sshd_config"
for bin in bash cat cp df du find grep gzip ls mount mv sed sort tar umount perl python3 qemu-img; do
	cp -L "$(command -v "$bin")" "$ROOT/usr/bin/$bin"
done
for n in $(seq 1 40000); do
	printf 'Dec  1 12:%02d:%02d ubuntu systemd[1]: demo log line %d of the base image\n' \
		$((n / 60 % 60)) $((n % 60)) "$n"
done >"$ROOT/var/log/syslog"
chown -R 1000:1000 "$ROOT/home/user"
truncate -s 64M "$BASE"
mkfs.ext4 -q -F -L cloudimg-rootfs -d "$ROOT" "$BASE"
rm -rf "$ROOT"
note "$(du -sh --apparent-size "$BASE" | cut -f1) raw file, $(du -sh "$BASE" | cut -f1) of it allocated"
grep -q -a 'root:x:0:0:root:/root:/bin/bash' "$BASE" ||
	die "the base image does not hold /etc/passwd in clear text"
note "plaintext: grep finds /etc/passwd's 'root:x:0:0:root' in the base file"

step "Making the instance disk instances/$UUID/disk as nova does (qcow2, legacy AES, backed by the base)"
printf '%s' 'demo passphrase' >"$PASSFILE" # qemu's secret file= takes the bytes as they are
chmod 600 "$PASSFILE"
note "qemu-img create -f qcow2 -o encrypt.format=aes,encrypt.key-secret=sec0 -b $BASE -F raw disk"
qemu-img create -q -f qcow2 \
	--object "secret,id=sec0,file=$PASSFILE" \
	-o encrypt.format=aes,encrypt.key-secret=sec0 \
	-b "$BASE" -F raw "$DISK"
qemu-img info "$DISK" | grep -E '^(virtual size|disk size|encrypted|backing file:)' | indent

step "Writing the instance's own files through a qcowfs mount (read-write)"
note "qcowfs check-key --passphrase-file passphrase instances/$UUID/disk"
status=0
"$QCOWFS" check-key --passphrase-file "$PASSFILE" "$DISK" | indent || status=$?
[ "$status" -eq 4 ] || die "check-key of a new overlay: status $status, expected 4 (cannot be verified)"
note "(status 4: a new overlay holds no encrypted data to check a legacy AES key against, so"
note " writing needs --unverified-key; once it holds data, a wrong key is refused)"
note "qcowfs mount --unverified-key --passphrase-file passphrase instances/$UUID/disk mnt"
"$QCOWFS" mount --unverified-key --passphrase-file "$PASSFILE" "$DISK" "$MNT"
note "mount -o loop mnt/disk guest"
mount -o loop "$MNT/disk" "$GUEST"
note "the guest writes /home/user/notes.txt and changes /etc/hostname"
printf 'Database password: s3cret-demo-only\nWritten by the instance; stored only in the encrypted overlay.\n' \
	>"$GUEST/home/user/notes.txt"
chown 1000:1000 "$GUEST/home/user/notes.txt"
echo "web-01" >"$GUEST/etc/hostname"
umount "$GUEST"
"$QCOWFS" umount "$MNT"
note "umount guest; qcowfs umount mnt"
qemu-img check -q --object "secret,id=sec0,file=$PASSFILE" \
	--image-opts "driver=qcow2,file.filename=$DISK,encrypt.key-secret=sec0"
note "qemu-img check: no errors"
if grep -q -a "s3cret-demo-only" "$DISK"; then
	die "the overlay holds the instance's notes in clear text"
fi
note "the notes' text does not appear in the overlay file: it is encrypted"

step "qcowfs info instances/$UUID/disk: most of the guest's data is NOT encrypted"
"$QCOWFS" info "$DISK" | indent

step "qcowfs audit instances (the host-wide table)"
"$QCOWFS" audit "$INSTANCES" | indent

step "qcowfs check-key: the overlay now holds data, so the key is verified (a wrong one is refused)"
"$QCOWFS" check-key --passphrase-file "$PASSFILE" "$DISK" | indent
(umask 077 && printf 'not the key' >"$WORK/wrong-key")
status=0
"$QCOWFS" seal --passphrase-file "$WORK/wrong-key" "$DISK" 2>&1 | indent || status=$?
[ "$status" -eq 3 ] || die "seal with a wrong key: status $status, expected 3"
note "(status 3: seal refused the wrong key before writing anything)"

step "qcowfs seal a copy of the instance (the base stays shared)"
cp --sparse=always "$DISK" "$SEALED"
note "cp instances/$UUID/disk sealed/disk"
note "qcowfs seal --passphrase-file passphrase sealed/disk"
"$QCOWFS" seal --passphrase-file "$PASSFILE" "$SEALED" 2>&1 | indent
note "qcowfs info sealed/disk:"
"$QCOWFS" info "$SEALED" | indent
if grep -q -a "root:x:0:0:root" "$SEALED"; then
	die "the sealed copy holds /etc/passwd in clear text"
fi
note "grep finds no 'root:x:0:0:root' in the sealed copy: the OS is encrypted too"
note "sizes (du -h):"
du -h "$BASE" "$DISK" "$SEALED" | sed "s|$WORK/||" | indent

step "qcowfs cat instances/$UUID/disk /etc/hostname (no mount, no loop device)"
"$QCOWFS" cat --passphrase-file "$PASSFILE" "$DISK" /etc/hostname | indent

step "qcowfs ls instances/$UUID/disk /home/user"
"$QCOWFS" ls --passphrase-file "$PASSFILE" "$DISK" /home/user | indent

step "qcowfs mount --read-only --passphrase-file passphrase instances/$UUID/disk mnt"
"$QCOWFS" mount --read-only --passphrase-file "$PASSFILE" "$DISK" "$MNT"
ls -l "$MNT"

step "mount -o loop,ro mnt/disk guest"
mount -o loop,ro "$MNT/disk" "$GUEST"
ls -l "$GUEST"

step "The guest's files: from the raw base (plaintext) and from the AES overlay"
note "guest/etc/os-release (base):"
grep PRETTY_NAME "$GUEST/etc/os-release" | indent
note "guest/var/log/syslog (base), last line:"
tail -n 1 "$GUEST/var/log/syslog" | indent
note "guest/etc/hostname (overlay):"
indent <"$GUEST/etc/hostname"
note "guest/home/user/notes.txt (overlay):"
indent <"$GUEST/home/user/notes.txt"

step "umount guest; qcowfs umount mnt"
umount "$GUEST"
"$QCOWFS" umount "$MNT"

step "Demo finished"
