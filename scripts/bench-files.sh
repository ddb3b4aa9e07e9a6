#!/usr/bin/env bash
# Benchmark of the in-process guest file jobs, three sides in one run:
#   qcowfs  `qcowfs ls|cat|copy-out|copy-in` straight from the encrypted qcow2 (no FUSE, no root)
#   fstool  the peer (crates.io, `cargo install fstool` when missing), the same jobs through its
#           CLI on the same image: `ls`, `cat`, `shell --ro` with `get` for the tree, `add`
#   kernel  the same guest as a plain raw file, loop-mounted: `ls -l`, `cat`, `cp -a`, `cp`+sync
#           (no decryption, no qcow2: the physical limit these jobs are measured against)
# Run as root (loop mounts, apt-get and drop_caches).
#
# The guest: ext4 made by `mke2fs -d` (no mount) holding /big (BENCH_FILES_BIG, 1 GiB, random
# text), /share (a copy of this machine's /usr/share: tens of thousands of files) and /many
# (10,000 empty files); its raw file, and that raw converted to qcow2 with legacy AES
# (`encryption=on`, nova's) by qemu-img.
# Jobs (the time of the whole command, and its peak RSS from /usr/bin/time):
#   cat-1g     the 1 GiB file to /dev/null
#   copy-out   /share into a new host folder (qcowfs copy-out; fstool `get`; cp -a)
#   ls-10k     the 10,000-entry folder, long format, to /dev/null
#   copy-in    one 1 MiB host file into the guest's root (on a fresh copy of the image each time;
#              the kernel side: a read-write loop mount, cp, umount)
# Before each run: sync, drop_caches, then the image read once with cat (warm in the host page
# cache, the guest cold), as scripts/bench.sh does. Each job runs BENCH_ROUNDS times per side, the
# sides alternating first; the table shows medians and ratios (fstool/qcowfs and kernel/qcowfs
# times: above 1 qcowfs is faster) and the highest peak RSS.
# Knobs: BENCH_ROUNDS (3), BENCH_FILES_BIG (1G), BENCH_FILES_SHARE (/usr/share), BENCH_OUT (append
# the table there), BENCH_TMP (/tmp), BENCH_KEEP=1, QCOWFS_BIN, FSTOOL_BIN, BENCH_FILES_JOBS (all).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
# shellcheck source=scripts/lib/install-deps.sh
source scripts/lib/install-deps.sh
[ "$(id -u)" -eq 0 ] || die "run the benchmark as root (loop mounts, drop_caches)"

ROUNDS=${BENCH_ROUNDS:-3}
BIG=${BENCH_FILES_BIG:-1G}
SHARE=${BENCH_FILES_SHARE:-/usr/share}
JOBS=${BENCH_FILES_JOBS:-cat-1g copy-out ls-10k copy-in}
PASS="bench files passphrase"

install_deps
if [ -n "${QCOWFS_BIN:-}" ]; then
	QCOWFS=$QCOWFS_BIN
else
	step "cargo build --release"
	cargo build --release --quiet
	QCOWFS=$REPO/target/release/qcowfs
fi
FSTOOL=${FSTOOL_BIN:-$(command -v fstool || true)}
if [ -z "$FSTOOL" ]; then
	step "cargo install fstool (the peer)"
	cargo install fstool --locked --quiet
	FSTOOL=$(command -v fstool || echo "$HOME/.cargo/bin/fstool")
fi
[ -x "$FSTOOL" ] || die "fstool is missing after cargo install fstool"
[ -x /usr/bin/time ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq time >/dev/null
[ -x /usr/bin/time ] || die "/usr/bin/time is missing after apt-get install time"

WORK=$(mktemp -d "${BENCH_TMP:-/tmp}/qcowfs-bench-files.XXXXXX")
MNT=$WORK/mnt
cleanup() {
	mountpoint -q "$MNT" 2>/dev/null && umount "$MNT"
	[ "${BENCH_KEEP:-0}" = 1 ] && { note "kept $WORK"; return; }
	rm -rf "$WORK"
}
trap cleanup EXIT
mkdir -p "$MNT"

step "The guest: ext4 with /big ($BIG), /share (a copy of $SHARE), /many (10,000 files)"
TREE=$WORK/tree
mkdir -p "$TREE/many"
python3 - "$TREE/big" "$BIG" <<'PY'
import random, sys
size = sys.argv[2]
mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
n = int(size[:-1]) * mult[size[-1]] if size[-1] in mult else int(size)
rng = random.Random(7)
words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz ") for _ in range(4096)) for _ in range(64)]
with open(sys.argv[1], "wb") as f:
    for i in range(n // 4096):
        f.write(words[rng.randrange(64)])
PY
cp -a "$SHARE" "$TREE/share"
(cd "$TREE/many" && seq -f "entry-%05g" 1 10000 | xargs touch)
FILES=$(find "$TREE" | wc -l)
TREE_BYTES=$(du -sb "$TREE" | cut -f1)
RAW=$WORK/guest.raw
truncate -s $((TREE_BYTES * 3 / 2 + (512 << 20))) "$RAW"
mke2fs -q -F -t ext4 -d "$TREE" "$RAW"
rm -rf "$TREE"
KEY=$WORK/key
printf '%s' "$PASS" >"$KEY"
chmod 600 "$KEY"
IMG=$WORK/guest.qcow2
qemu-img convert -f raw -O qcow2 --object "secret,id=s0,data=$PASS" \
	-o encrypt.format=aes,encrypt.key-secret=s0 "$RAW" "$IMG"
head -c 1M /dev/urandom >"$WORK/in.bin"
note "$FILES entries, $((TREE_BYTES >> 20)) MiB of data; qcowfs $("$QCOWFS" --version); $("$FSTOOL" --version 2>&1 | head -n 1)"

# warm FILE: sync, drop the page cache, read FILE once (the image warm, the guest cold).
warm() {
	sync
	echo 3 >/proc/sys/vm/drop_caches
	cat "$1" >/dev/null
}

# timed NAME COMMAND...: run it under /usr/bin/time; append "seconds max_rss_kib" to $WORK/NAME.
timed() {
	local name=$1
	shift
	/usr/bin/time -f "%e %M" -o "$WORK/time.out" "$@" >/dev/null 2>"$WORK/err.out" ||
		die "$name failed: $* ($(tail -n 3 "$WORK/err.out"))"
	cat "$WORK/time.out" >>"$WORK/$name"
}

# run_side JOB SIDE: one timed run.
run_side() {
	local job=$1 side=$2 out=$WORK/out
	rm -rf "$out"
	case $side in
	kernel)
		warm "$RAW"
		if [ "$job" = copy-in ]; then
			cp --sparse=always "$RAW" "$WORK/rw.raw"
			warm "$WORK/rw.raw"
			timed "$job.$side" sh -c "mount -o loop '$WORK/rw.raw' '$MNT' && cp '$WORK/in.bin' '$MNT/in.bin' && umount '$MNT'"
			rm -f "$WORK/rw.raw"
			return
		fi
		mount -o loop,ro "$RAW" "$MNT"
		case $job in
		cat-1g) timed "$job.$side" cat "$MNT/big" ;;
		copy-out) timed "$job.$side" cp -a "$MNT/share" "$out" ;;
		ls-10k) timed "$job.$side" ls -l "$MNT/many" ;;
		esac
		umount "$MNT"
		;;
	qcowfs)
		local img=$IMG
		if [ "$job" = copy-in ]; then
			cp --sparse=always "$IMG" "$WORK/rw.qcow2"
			img=$WORK/rw.qcow2
		fi
		warm "$img"
		local k=(--passphrase-file "$KEY")
		case $job in
		cat-1g) timed "$job.$side" "$QCOWFS" cat "${k[@]}" "$img" /big ;;
		copy-out) timed "$job.$side" "$QCOWFS" copy-out "${k[@]}" "$img" /share "$out" ;;
		ls-10k) timed "$job.$side" "$QCOWFS" ls "${k[@]}" "$img" /many ;;
		copy-in) timed "$job.$side" "$QCOWFS" copy-in "${k[@]}" "$img" "$WORK/in.bin" / ;;
		esac
		rm -f "$WORK/rw.qcow2"
		;;
	fstool)
		local img=$IMG
		if [ "$job" = copy-in ]; then
			cp --sparse=always "$IMG" "$WORK/rw.qcow2"
			img=$WORK/rw.qcow2
		fi
		warm "$img"
		local k=(--password-file "$KEY")
		case $job in
		cat-1g) timed "$job.$side" "$FSTOOL" cat "$img" /big "${k[@]}" ;;
		copy-out)
			printf 'get /share %s\nexit\n' "$out" >"$WORK/get.cmds"
			timed "$job.$side" sh -c "'$FSTOOL' shell --ro '$img' --password-file '$KEY' <'$WORK/get.cmds'"
			[ -d "$out" ] || die "fstool shell get made no $out"
			;;
		ls-10k) timed "$job.$side" "$FSTOOL" ls "$img" /many "${k[@]}" ;;
		copy-in) timed "$job.$side" "$FSTOOL" add "$img" "$WORK/in.bin" /in.bin "${k[@]}" ;;
		esac
		rm -f "$WORK/rw.qcow2"
		;;
	esac
	rm -rf "$out"
}

SIDES=(qcowfs fstool kernel)
for job in $JOBS; do
	step "$job: $ROUNDS rounds"
	for ((r = 0; r < ROUNDS; r++)); do
		# Rotate which side goes first.
		for ((i = 0; i < 3; i++)); do
			side=${SIDES[$(((i + r) % 3))]}
			run_side "$job" "$side"
		done
	done
done

step "Results"
python3 - "$WORK" "$ROUNDS" $JOBS >"$WORK/table.md" <<'PY'
import statistics, sys
work, rounds, jobs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def read(job, side):
    rows = [l.split() for l in open(f"{work}/{job}.{side}") if l.strip()]
    return statistics.median(float(r[0]) for r in rows), max(int(r[1]) for r in rows), [r[0] for r in rows]
print(f"| job | qcowfs s | fstool s | kernel s | fstool/qcowfs | kernel/qcowfs | peak RSS qcowfs / fstool / kernel (MiB) |")
print("|---|---|---|---|---|---|---|")
rounds_lines = []
for job in jobs:
    q, f, k = read(job, "qcowfs"), read(job, "fstool"), read(job, "kernel")
    ratio = lambda a, b: f"{a / b:.2f}" if b > 0 else "-"
    print(f"| {job} | {q[0]:.2f} | {f[0]:.2f} | {k[0]:.2f} | {ratio(f[0], q[0])} | {ratio(k[0], q[0])} | {q[1] >> 10} / {f[1] >> 10} / {k[1] >> 10} |")
    rounds_lines.append(f"{job}: qcowfs {' '.join(q[2])}; fstool {' '.join(f[2])}; kernel {' '.join(k[2])}")
print()
print(f"Medians of {rounds} rounds, seconds. Per round:")
print()
for l in rounds_lines:
    print(f"    {l}")
PY
cat "$WORK/table.md"
if [ -n "${BENCH_OUT:-}" ]; then
	cat "$WORK/table.md" >>"$BENCH_OUT"
fi
