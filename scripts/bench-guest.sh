#!/usr/bin/env bash
# Benchmark, the guest job: what one does with a guest's disk (check its file system, read all of it,
# write a tree into it), timed on three sides that hold the same guest bytes:
#   qcowfs  the legacy-AES qcow2 overlay mounted with qcowfs; DIR/disk on a loop device
#   QEMU    the same overlay exported by qemu-storage-daemon (--export type=fuse); the export on a
#           loop device (both mounted as scripts/bench.sh mounts them: scripts/lib/bench-sides.sh)
#   limit   the same guest as a plain raw file (`qemu-img convert -O raw` of the overlay chain) on a
#           loop device: no FUSE, no qcow2, no decryption; what the kernel alone does
# Run as root (FUSE, loop devices, drop_caches). scripts/bench.sh runs it after its fio part
# (BENCH_PARTS="fio guest"); it also runs alone.
#
# The guest (made in a temp dir at the start, 64 KiB clusters, passphrase as the key):
#   base.raw        raw BENCH_GUEST_SIZE (2G) holding an ext4 made by `mkfs.ext4 -d TREE`; TREE is
#                   BENCH_GUEST_TREE, by default a copy (cp -a) of /usr/share
#   pristine.qcow2  AES overlay over it (qemu-img create -f qcow2 -o encrypt.format=aes,... i.e. nova's
#                   "encryption=on", -b base.raw -F raw; with BENCH_GUEST_ENCRYPTION=luks qemu-img's
#                   default LUKS, iter-time 100 ms) with data of its own, written through qcowfs:
#                   mounted once, its disk loop-mounted, BENCH_GUEST_OVERLAY (80M) of TREE's files
#                   (the first ones in sorted path order) copied to /overlay-data, all unmounted, then
#                   `qemu-img check`
#   pristine.raw    `qemu-img convert -O raw` of that chain, the limit's guest; e2fsck -fn must pass
#   untar.tar       BENCH_GUEST_UNTAR (150M) of TREE's files (the next ones in sorted order) under
#                   bench-untar/, in a temp dir in BENCH_SHM (/dev/shm): drop_caches never drops it
# Each side has its own copy (cp --sparse=always; QEMU's image locks): qcowfs.qcow2 and qemu.qcow2
# over the shared read-only base.raw, and limit.raw.
#
# Steps, each timed on its own (seconds, lower is better):
#   fsck   `e2fsck -fn` of the loop device, guest not mounted; any exit code but 0 (clean) fails
#   tar    `tar -cf - -C MNT . | wc -c`, guest mounted read-only (GNU tar does not read the files when
#          the archive is /dev/null); every side and round must count the same bytes
#   untar  `tar -xf untar.tar -C MNT; sync`, guest mounted read-write (mount, umount untimed). Then,
#          untimed, with BENCH_GUEST_VERIFY=1 (default): a fresh attach, e2fsck -fn, `tar --compare`
#          of the untarred files, qemu-img check of the overlay; then a fresh copy of the side's
#          image, so that every run starts from the pristine guest
# One run of one side: the guest not mounted; `sync; echo 3 > /proc/sys/vm/drop_caches`; cat of the
# side's host files (overlay and base, or the raw file; for untar the tarball too), so that they are
# warm in the host page cache and what is measured is the software stack, not this machine's disk; a
# fresh FUSE mount (its own caches start cold); `losetup --find --show` (FUSE sides:
# --direct-io=BENCH_LOOP_DIO; `blockdev --setra BENCH_LOOP_RA` on the sides in BENCH_LOOP_RA_SIDES);
# the step; the daemon's VmHWM; teardown (umount guest, losetup -d, FUSE umount). For each step and
# each of BENCH_GUEST_ROUNDS rounds every side runs once, the order rotated by one each round.
#
# Knobs (environment): BENCH_GUEST_SIZE (2G), BENCH_GUEST_TREE (copy of /usr/share),
# BENCH_GUEST_ROUNDS (3), BENCH_GUEST_STEPS ("fsck tar untar"), BENCH_GUEST_SIDES ("qcowfs qemu
# limit"), BENCH_GUEST_OVERLAY (80M), BENCH_GUEST_UNTAR (150M), BENCH_GUEST_VERIFY (1), BENCH_LOOP_DIO
# (off|on), BENCH_LOOP_RA (sectors; unset: the kernel's), BENCH_GUEST_ENCRYPTION (aes|luks), BENCH_LOOP_RA_SIDES ("qcowfs qemu"),
# BENCH_CACHE_SIZE (256M) and BENCH_QCOWFS_OPTS (qcowfs mount), BENCH_OUT (the table is appended),
# BENCH_KEEP=1, BENCH_TMP (/tmp), BENCH_SHM (/dev/shm), QCOWFS_BIN (that binary, no build).
# `bench-guest.sh --check-knobs` only checks the knobs.
# Output: a markdown table (per step the three medians, "qcowfs / limit" = limit_time / qcowfs_time,
# so 1.0 is as fast as the plain raw file, "QEMU / limit" likewise, qcowfs vs QEMU = qemu_time /
# qcowfs_time, peak RSS = highest VmHWM) and the per-round values.
set -euo pipefail
export LC_ALL=C # EPOCHREALTIME's decimal point
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
# shellcheck source=scripts/lib/install-deps.sh
source scripts/lib/install-deps.sh
# shellcheck source=scripts/lib/bench-sides.sh
source scripts/lib/bench-sides.sh

BENCH_GUEST_SIZE=${BENCH_GUEST_SIZE:-2G}
BENCH_GUEST_TREE=${BENCH_GUEST_TREE:-}
BENCH_GUEST_ROUNDS=${BENCH_GUEST_ROUNDS:-3}
BENCH_GUEST_STEPS=${BENCH_GUEST_STEPS:-fsck tar untar}
BENCH_GUEST_SIDES=${BENCH_GUEST_SIDES:-qcowfs qemu limit}
BENCH_GUEST_OVERLAY=${BENCH_GUEST_OVERLAY:-80M}
BENCH_GUEST_UNTAR=${BENCH_GUEST_UNTAR:-150M}
BENCH_GUEST_VERIFY=${BENCH_GUEST_VERIFY:-1}
BENCH_LOOP_DIO=${BENCH_LOOP_DIO:-off}
BENCH_LOOP_RA=${BENCH_LOOP_RA:-}
BENCH_LOOP_RA_SIDES=${BENCH_LOOP_RA_SIDES:-qcowfs qemu}
BENCH_OUT=${BENCH_OUT:-}
BENCH_SHM=${BENCH_SHM:-/dev/shm}
BENCH_GUEST_ENCRYPTION=${BENCH_GUEST_ENCRYPTION:-aes}

to_bytes() { numfmt --from=iec "${1%B}" 2>/dev/null || die "not a size: $1"; }
SIZE_B=$(to_bytes "$BENCH_GUEST_SIZE")
OVERLAY_B=$(to_bytes "$BENCH_GUEST_OVERLAY")
UNTAR_B=$(to_bytes "$BENCH_GUEST_UNTAR")
if [ $((SIZE_B % 1048576)) -ne 0 ] || [ "$SIZE_B" -lt $((256 << 20)) ]; then
	die "BENCH_GUEST_SIZE must be a whole number of MiB, at least 256M: $BENCH_GUEST_SIZE"
fi
[ "$UNTAR_B" -gt 0 ] || die "BENCH_GUEST_UNTAR must be above 0"
[[ "$BENCH_GUEST_ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_GUEST_ROUNDS must be a positive integer"
for s in $BENCH_GUEST_STEPS; do
	case "$s" in fsck | tar | untar) ;; *) die "unknown step in BENCH_GUEST_STEPS: $s (fsck, tar, untar)" ;; esac
done
for s in $BENCH_GUEST_SIDES $BENCH_LOOP_RA_SIDES; do
	case "$s" in qcowfs | qemu | limit) ;; *) die "unknown side: $s (qcowfs, qemu, limit)" ;; esac
done
[ -n "${BENCH_GUEST_STEPS// /}" ] || die "BENCH_GUEST_STEPS is empty"
[ -n "${BENCH_GUEST_SIDES// /}" ] || die "BENCH_GUEST_SIDES is empty"
case "$BENCH_LOOP_DIO" in on | off) ;; *) die "BENCH_LOOP_DIO must be on or off: $BENCH_LOOP_DIO" ;; esac
case "$BENCH_GUEST_VERIFY" in 0 | 1) ;; *) die "BENCH_GUEST_VERIFY must be 0 or 1" ;; esac
case "$BENCH_GUEST_ENCRYPTION" in aes | luks) ;; *) die "BENCH_GUEST_ENCRYPTION must be aes or luks: $BENCH_GUEST_ENCRYPTION" ;; esac
if [ -n "$BENCH_LOOP_RA" ] && ! [[ "$BENCH_LOOP_RA" =~ ^[0-9]+$ ]]; then
	die "BENCH_LOOP_RA must be a number of 512-byte sectors: $BENCH_LOOP_RA"
fi
if [ -n "$BENCH_GUEST_TREE" ] && [ ! -d "$BENCH_GUEST_TREE" ]; then
	die "BENCH_GUEST_TREE is not a directory: $BENCH_GUEST_TREE"
fi
[ -d "$BENCH_SHM" ] || die "BENCH_SHM is not a directory: $BENCH_SHM"
if [ "${1:-}" = --check-knobs ]; then exit 0; fi
[ $# -eq 0 ] || die "usage: $0 [--check-knobs] (the rest is environment: see the header)"

[ "$(id -u)" -eq 0 ] || die "run the guest benchmark as root (FUSE, loop devices, drop_caches)"

step "Checking tools"
install_deps
require_fuse_device
for c in blockdev numfmt; do command -v "$c" >/dev/null 2>&1 || die "$c is missing (util-linux/coreutils)"; done
note "$(qemu-storage-daemon --version | head -n 1), $(e2fsck -V 2>&1 | head -n 1), $(tar --version | head -n 1)"

resolve_qcowfs
START=$SECONDS

WORK=$(mktemp -d "${BENCH_TMP:-/tmp}/qcowfs-bench-guest.XXXXXX")
WORK=$(realpath "$WORK")
G="$WORK/guest"
GMNT="$WORK/guest-mnt"
RESULTS="$WORK/results.tsv"
SHM=
GUEST_LOOP=
mkdir -p "$G" "$GMNT"
: >"$RESULTS"

# Run by the EXIT trap before the FUSE sides are stopped: the guest mount, then every loop device
# whose backing file is under $WORK (also one that losetup made just before an interrupt), then the
# tarball's dir in memory.
bench_cleanup_hook() {
	local dev back
	if mountpoint -q "$GMNT" 2>/dev/null; then umount "$GMNT" 2>/dev/null || umount -l "$GMNT"; fi
	while read -r dev back; do
		case "$back" in "$WORK"/*) losetup -d "$dev" || note "could not detach $dev ($back)" ;; esac
	done < <(losetup -l -n -O NAME,BACK-FILE 2>/dev/null)
	if [ -n "$SHM" ] && [ "${BENCH_KEEP:-0}" != 1 ]; then rm -rf "$SHM"; fi
}
bench_traps "guest benchmark"
bench_sides_init "$WORK" # PASSFILE, QEMU_SECRET, AES_OPTS, LUKS_OPTS, the FUSE mountpoints
ENC_OPTS=$AES_OPTS
[ "$BENCH_GUEST_ENCRYPTION" = aes ] || ENC_OPTS=$LUKS_OPTS

SHM=$(mktemp -d "$BENCH_SHM/qcowfs-bench-guest.XXXXXX")
TARBALL="$SHM/untar.tar"

# fail_log LOG MESSAGE: the end of LOG on stderr, then die.
fail_log() {
	printf '    --- %s (last lines) ---\n' "$1" >&2
	tail -n 20 "$1" | sed 's/^/    /' >&2
	die "$2"
}

# loop_attach FILE DIO: GUEST_LOOP = a new loop device on FILE.
loop_attach() {
	GUEST_LOOP=$(losetup --find --show --direct-io="$2" "$1") || die "losetup --find --show $1 failed"
	[ -b "$GUEST_LOOP" ] || die "losetup printed no device for $1: $GUEST_LOOP"
}

# loop_detach: losetup -d GUEST_LOOP, and wait until the kernel let go of the backing file (the FUSE
# side cannot be unmounted before).
loop_detach() {
	local n=100 sys="/sys/block/${GUEST_LOOP#/dev/}/loop"
	[ -n "$GUEST_LOOP" ] || return 0
	losetup -d "$GUEST_LOOP" || die "losetup -d $GUEST_LOOP failed"
	while [ -e "$sys/backing_file" ] && [ "$n" -gt 0 ]; do
		sleep 0.1
		n=$((n - 1))
	done
	[ ! -e "$sys/backing_file" ] || die "$GUEST_LOOP still has its backing file 10 s after losetup -d"
	GUEST_LOOP=
}

guest_mount() { mount -t ext4 "$@" "$GUEST_LOOP" "$GMNT" || die "mount $* of the guest ($GUEST_LOOP) failed"; }
guest_umount() { if mountpoint -q "$GMNT"; then umount "$GMNT" || die "umount $GMNT failed"; fi; }

# checked_fsck LOG WHAT: e2fsck -fn of GUEST_LOOP; only 0 (clean) passes.
checked_fsck() {
	local rc=0
	e2fsck -fn "$GUEST_LOOP" >"$1" 2>&1 || rc=$?
	[ "$rc" -eq 0 ] || fail_log "$1" "e2fsck -fn on $2 exited $rc (0 = clean, 4 = errors left uncorrected, 8 = operational error)"
}

qcow2_check() {
	qemu-img check -q "${QEMU_SECRET[@]}" --image-opts "driver=qcow2,file.filename=$1,encrypt.key-secret=s0" ||
		die "qemu-img check of $1 failed"
}

# ---------------------------------------------------------------------------------------------------
if [ -z "$BENCH_GUEST_TREE" ]; then
	step "The guest's tree: a copy of /usr/share"
	cp -a /usr/share "$WORK/tree"
	TREE="$WORK/tree"
	TREE_DESC="a copy of /usr/share"
else
	TREE=$(realpath "$BENCH_GUEST_TREE")
	TREE_DESC=$TREE
fi
TREE_B=$(du -sb "$TREE" | cut -f1)
TREE_FILES=$(find "$TREE" -type f | wc -l)
note "$TREE_DESC: $((TREE_B >> 20)) MiB (apparent size), $TREE_FILES files"
if [ "$TREE_B" -lt $((500 << 20)) ]; then
	note "WARNING: the tree is far below 500 MiB: the tar step measures less than it should"
fi
[ $(((TREE_B + OVERLAY_B + UNTAR_B) * 11 / 10 + (64 << 20))) -le "$SIZE_B" ] ||
	die "the tree ($((TREE_B >> 20)) MiB) + overlay data + untar do not fit a $BENCH_GUEST_SIZE guest: raise BENCH_GUEST_SIZE"

# Two consecutive slices of TREE's files (regular files and symlinks, sorted path order): the
# overlay's own data, then the untar tarball's. NUL-separated lists; prints "files bytes" for each.
SLICES=$(python3 - "$TREE" "$OVERLAY_B" "$UNTAR_B" "$WORK/overlay.list" "$WORK/untar.list" <<'EOF'
import os, sys
root, want = sys.argv[1], [int(sys.argv[2]), int(sys.argv[3])]
outs = [open(sys.argv[4], "wb"), open(sys.argv[5], "wb")]
def walk(d):
    for e in sorted(os.scandir(d), key=lambda e: e.name):
        if e.is_dir(follow_symlinks=False):
            yield from walk(e.path)
        elif e.is_file(follow_symlinks=False) or e.is_symlink():
            yield e
got, k = [[0, 0], [0, 0]], 0
for e in walk(root):
    while k < 2 and got[k][1] >= want[k]:
        k += 1
    if k == 2:
        break
    outs[k].write(os.path.relpath(e.path, root).encode("utf-8", "surrogateescape") + b"\0")
    got[k][0] += 1
    got[k][1] += e.stat(follow_symlinks=False).st_size
print(got[0][0], got[0][1], got[1][0], got[1][1])
EOF
) || die "could not list the tree's files"
read -r OVL_FILES OVL_BYTES TB_FILES TB_BYTES <<<"$SLICES"
[ "$TB_FILES" -gt 0 ] || die "the tree has no files left for the untar tarball"
[ "$TB_BYTES" -ge $((UNTAR_B / 2)) ] || note "WARNING: the tree had only $((TB_BYTES >> 20)) MiB left for the tarball"

step "Untar tarball: $TB_FILES files, $((TB_BYTES >> 20)) MiB, in $SHM"
tar -cf "$TARBALL" -C "$TREE" --transform 's,^,bench-untar/,S' --null --verbatim-files-from -T "$WORK/untar.list"
note "$(du -h "$TARBALL" | cut -f1)"

step "Base: $BENCH_GUEST_SIZE raw, mkfs.ext4 -d $TREE_DESC"
truncate -s "$SIZE_B" "$G/base.raw"
mkfs.ext4 -q -F -L bench-guest -d "$TREE" "$G/base.raw"

step "Overlay: $BENCH_GUEST_ENCRYPTION over base.raw; $OVL_FILES files ($((OVL_BYTES >> 20)) MiB) written into /overlay-data through qcowfs"
qemu-img create -q -f qcow2 "${QEMU_SECRET[@]}" -b base.raw -F raw -o "$ENC_OPTS" "$G/pristine.qcow2" "$SIZE_B"
# A fresh legacy-AES overlay holds no encrypted data yet, so qcowfs cannot check the passphrase and
# refuses to write with it unless told: this script made the overlay with that passphrase.
mount_opts=("${QCOWFS_MOUNT_OPTS[@]}")
[ "$BENCH_GUEST_ENCRYPTION" = aes ] && QCOWFS_MOUNT_OPTS+=(--unverified-key)
disk=$(fuse_mount qcowfs "$G/pristine.qcow2" "$SIZE_B")
QCOWFS_MOUNT_OPTS=("${mount_opts[@]}")
loop_attach "$disk" off
guest_mount
mkdir "$GMNT/overlay-data"
tar -cf - -C "$TREE" --null --verbatim-files-from -T "$WORK/overlay.list" | tar -xf - -C "$GMNT/overlay-data" ||
	die "copying the overlay's data into the guest failed"
guest_umount
loop_detach
fuse_umount qcowfs
qcow2_check "$G/pristine.qcow2"
note "overlay: $(du -h "$G/pristine.qcow2" | cut -f1) allocated, base $(du -h "$G/base.raw" | cut -f1)"
[ -n "$BENCH_GUEST_TREE" ] || [ "${BENCH_KEEP:-0}" = 1 ] || rm -rf "$TREE"

step "Limit: qemu-img convert -O raw of the chain"
qemu-img convert "${QEMU_SECRET[@]}" --image-opts "driver=qcow2,file.filename=$G/pristine.qcow2,encrypt.key-secret=s0" \
	-O raw "$G/pristine.raw"
rc=0
e2fsck -fn "$G/pristine.raw" >"$WORK/fsck-pristine.log" 2>&1 || rc=$?
[ "$rc" -eq 0 ] || fail_log "$WORK/fsck-pristine.log" "e2fsck -fn of the pristine guest exited $rc: the setup made a broken guest"
note "e2fsck -fn clean: $(grep -E '^[^ ]+: [0-9]+/[0-9]+ files' "$WORK/fsck-pristine.log" || true)"
note "raw: $(du -h "$G/pristine.raw" | cut -f1) allocated"
note "setup took $((SECONDS - START)) s"

# ---------------------------------------------------------------------------------------------------
# The host files of SIDE, one a line.
side_files() {
	case "$1" in
	qcowfs | qemu) printf '%s\n' "$G/$1.qcow2" "$G/base.raw" ;;
	limit) printf '%s\n' "$G/limit.raw" ;;
	esac
}

# fresh_copy SIDE: SIDE's own copy of the pristine guest.
fresh_copy() {
	case "$1" in
	qcowfs | qemu) rm -f "$G/$1.qcow2" && cp --sparse=always "$G/pristine.qcow2" "$G/$1.qcow2" ;;
	limit) rm -f "$G/limit.raw" && cp --sparse=always "$G/pristine.raw" "$G/limit.raw" ;;
	esac
}

# warm SIDE STEP: flush, drop the page cache, then read SIDE's host files (and the tarball) into it.
warm() {
	local f
	sync
	echo 3 >/proc/sys/vm/drop_caches
	while read -r f; do cat "$f" >/dev/null; done < <(side_files "$1")
	if [ "$2" = untar ]; then cat "$TARBALL" >/dev/null; fi
}

declare -A SEEN_DIO SEEN_RA
# attach SIDE: a fresh FUSE mount (not for limit), then GUEST_LOOP on its disk file.
attach() {
	local side=$1 file dio=off
	case "$side" in
	qcowfs | qemu)
		file=$(fuse_mount "$side" "$G/$side.qcow2" "$SIZE_B" "$BENCH_GUEST_ENCRYPTION")
		dio=$BENCH_LOOP_DIO
		;;
	limit) file="$G/limit.raw" ;;
	esac
	loop_attach "$file" "$dio"
	if [ -n "$BENCH_LOOP_RA" ] && [[ " $BENCH_LOOP_RA_SIDES " == *" $side "* ]]; then
		blockdev --setra "$BENCH_LOOP_RA" "$GUEST_LOOP" || die "blockdev --setra $BENCH_LOOP_RA $GUEST_LOOP failed"
	fi
	SEEN_DIO[$side]=$(cat "/sys/block/${GUEST_LOOP#/dev/}/loop/dio")
	SEEN_RA[$side]=$(blockdev --getra "$GUEST_LOOP")
}

# detach SIDE: umount the guest, losetup -d, unmount the FUSE side.
detach() {
	guest_umount
	loop_detach
	case "$1" in qcowfs | qemu) fuse_umount "$1" ;; esac
}

t_start() { T0=$EPOCHREALTIME; }
t_end() { ELAPSED=$(awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }'); }

# verify_untar SIDE ROUND: after an untar run, untimed: what SIDE wrote reads back as a clean file
# system holding the tarball's files, and the overlay is a consistent qcow2.
verify_untar() {
	local side=$1 log="$WORK/verify-$1-$2.log"
	attach "$side"
	checked_fsck "$log" "$side's guest after the untar (round $2)"
	guest_mount -o ro
	tar --compare -f "$TARBALL" -C "$GMNT" >"$log" 2>&1 ||
		fail_log "$log" "$side: the untarred files differ from the tarball (round $2)"
	detach "$side"
	if [ "$side" != limit ]; then qcow2_check "$G/$side.qcow2"; fi
}

TAR_BYTES=
# run_one SIDE STEP ROUND
run_one() {
	local side=$1 st=$2 round=$3 log="$WORK/$2-$1-$3.log" pid="" hwm=0 bytes=0
	! mountpoint -q "$GMNT" || die "the guest is still mounted at $GMNT"
	warm "$side" "$st"
	attach "$side"
	if [ "$side" != limit ]; then pid=$(fuse_pid "$side") || die "$side: no daemon pid"; fi
	case "$st" in
	fsck)
		t_start
		checked_fsck "$log" "$side's guest (round $round)"
		t_end
		;;
	tar)
		guest_mount -o ro
		t_start
		bytes=$(tar -cf - -C "$GMNT" . 2>"$log" | wc -c) || fail_log "$log" "tar of $side's guest failed"
		t_end
		[ -n "$TAR_BYTES" ] || TAR_BYTES=$bytes
		[ "$bytes" -eq "$TAR_BYTES" ] || die "tar of $side's guest gave $bytes bytes, an earlier run $TAR_BYTES"
		[ "$bytes" -ge $((TREE_B * 9 / 10)) ] || die "tar of $side's guest gave only $bytes bytes for a $TREE_B-byte tree"
		;;
	untar)
		guest_mount
		t_start
		tar -xf "$TARBALL" -C "$GMNT" 2>"$log" || fail_log "$log" "untar into $side's guest failed"
		sync
		t_end
		;;
	esac
	if [ -n "$pid" ]; then hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status"); fi
	detach "$side"
	if [ "$st" = untar ]; then
		if [ "$BENCH_GUEST_VERIFY" = 1 ]; then verify_untar "$side" "$round"; fi
		fresh_copy "$side"
	fi
	printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$st" "$side" "$round" "$ELAPSED" "$hwm" "$bytes" >>"$RESULTS"
	note "$(printf '%-5s %-6s round %s: %8s s   VmHWM %7d KiB%s' "$st" "$side" "$round" "$ELAPSED" "$hwm" \
		"$(case "$st" in tar) printf '   %d MiB read' $((bytes >> 20)) ;; untar) [ "$BENCH_GUEST_VERIFY" = 0 ] ||
			printf '   (verified: e2fsck, tar --compare, qemu-img check)' ;; esac)")"
}

read -r -a SIDES <<<"$BENCH_GUEST_SIDES"
for side in "${SIDES[@]}"; do fresh_copy "$side"; done
for st in $BENCH_GUEST_STEPS; do
	step "Guest $st: $BENCH_GUEST_ROUNDS rounds, sides ${SIDES[*]} rotated"
	for round in $(seq "$BENCH_GUEST_ROUNDS"); do
		for ((i = 0; i < ${#SIDES[@]}; i++)); do
			run_one "${SIDES[(i + round - 1) % ${#SIDES[@]}]}" "$st" "$round"
		done
	done
done

# ---------------------------------------------------------------------------------------------------
step "Results"
DIO_SEEN="" RA_SEEN=""
for s in "${SIDES[@]}"; do
	DIO_SEEN+="${DIO_SEEN:+, }$s ${SEEN_DIO[$s]:-?}"
	RA_SEEN+="${RA_SEEN:+, }$s ${SEEN_RA[$s]:-?}"
done
WALL=$((SECONDS - START))
RA_DESC="the kernel's default"
if [ -n "$BENCH_LOOP_RA" ]; then RA_DESC="$BENCH_LOOP_RA sectors on ${BENCH_LOOP_RA_SIDES// /, }"; fi
TABLE=$(python3 - "$RESULTS" "$((TB_BYTES >> 20))" <<'EOF'
import statistics, sys
from collections import defaultdict
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
names = {
    "fsck": "e2fsck -fn, whole fs",
    "tar": "tar of the whole tree (ro mount)",
    "untar": "untar %s MiB + sync" % sys.argv[2],
}
vals, rss, steps = defaultdict(list), defaultdict(int), []
for st, side, rnd, secs, hwm, _ in rows:
    if st not in steps:
        steps.append(st)
    vals[st, side].append(float(secs))
    rss[st, side] = max(rss[st, side], int(hwm))
def med(st, side):
    v = vals.get((st, side))
    return statistics.median(v) if v else None
def fmt(x):
    return "n/a" if x is None else "%.2f" % x
def ratio(num, den):
    return "n/a" if num is None or den is None or den <= 0 else "%.2f" % (num / den)
def mib(st, side):
    return "%.1f MiB" % (rss[st, side] / 1024) if (st, side) in vals else "n/a"
out = ["| step | limit: raw file (s) | qcowfs (s) | QEMU (s) | qcowfs / limit | QEMU / limit "
       "| qcowfs vs QEMU | qcowfs peak RSS | QEMU peak RSS |",
       "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
detail = []
for st in steps:
    l, q, e = med(st, "limit"), med(st, "qcowfs"), med(st, "qemu")
    out.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
        names[st], fmt(l), fmt(q), fmt(e), ratio(l, q), ratio(l, e), ratio(e, q),
        mib(st, "qcowfs"), mib(st, "qemu")))
    detail.append("- %s (s): %s" % (names[st], "; ".join(
        "%s %s" % (label, ", ".join("%.2f" % v for v in vals[st, side]))
        for side, label in (("limit", "limit"), ("qcowfs", "qcowfs"), ("qemu", "QEMU"))
        if (st, side) in vals)))
print("\n".join(out))
print()
print("Per round (in round order):")
print()
print("\n".join(detail))
EOF
)
HEADER="Guest job: $BENCH_GUEST_SIZE ext4 from $TREE_DESC ($((TREE_B >> 20)) MiB, $TREE_FILES files) in a raw base, \
+ $((OVL_BYTES >> 20)) MiB ($OVL_FILES files) written through qcowfs into the $(case $BENCH_GUEST_ENCRYPTION in aes) echo legacy-AES ;; luks) echo LUKS ;; esac) overlay; \
$BENCH_GUEST_ROUNDS rounds (median), sides rotated; host files warm, drop_caches before each run. \
Loop devices: FUSE sides --direct-io=$BENCH_LOOP_DIO (kernel's dio flag: $DIO_SEEN), limit buffered; \
read-ahead $RA_DESC (sectors seen: $RA_SEEN). \
qcowfs ${QCOWFS_MOUNT_OPTS[*]} (fuse enable_uring=$(cat /sys/module/fuse/parameters/enable_uring 2>/dev/null || echo n/a)). \
Ratios: limit_time / side_time (1.0 = as fast as the plain raw file); qcowfs vs QEMU = qemu_time / qcowfs_time. \
Wall time $((WALL / 60)) min $((WALL % 60)) s (setup included)."
printf '%s\n\n%s\n' "$HEADER" "$TABLE"
if [ -n "$BENCH_OUT" ]; then
	printf '\n%s\n\n%s\n' "$HEADER" "$TABLE" >>"$BENCH_OUT"
	note "appended to $BENCH_OUT"
fi
