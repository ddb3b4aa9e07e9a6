#!/usr/bin/env bash
# Benchmark: qcowfs against QEMU's own FUSE export (qemu-storage-daemon --export type=fuse) on the
# same encrypted qcow2 images, with fio. Run as root (FUSE mounts, apt-get for missing tools).
# BENCH_PARTS ("fio guest files"): "fio" is this file's fio workloads below; "guest" then runs
# scripts/bench-guest.sh (a guest's e2fsck, tar and untar on qcowfs, on QEMU's export and on a plain
# loop-mounted raw file; its own header explains it) and "files" scripts/bench-files.sh (the
# in-process guest file jobs — cat, copy-out, ls, copy-in — on qcowfs, on fstool and on the guest
# loop-mounted from a raw file) with the same binary, so that one run prints every table. The
# mounting of both sides is shared with bench-guest.sh: scripts/lib/bench-sides.sh.
#
# Images (made in a temp dir, 64 KiB clusters, the passphrase as the key). The AES ones use QEMU's
# legacy "encryption=on" (nova's); the LUKS ones qemu-img's default LUKS (aes-256-xts-plain64) with a
# short key derivation (iter-time 100 ms: every run mounts afresh, and PBKDF2 is not measured).
#   A   A/*.qcow2     BENCH_SIZE (1 GiB), ~40% of its 1 MiB chunks (seeded shuffle) hold random
#                     text: a sparse raw file filled by python (kept: the raw floor's file), then
#                     `qemu-img convert` to qcow2+AES. (Random text, 6 bits per byte, not uniform
#                     noise: qcowfs refuses a legacy-AES image whose sampled clusters all decrypt to
#                     noise, its wrong-passphrase check.)
#   B   B/*.qcow2     AES overlay over B/base.raw, a raw BENCH_SIZE ext4 (mkfs.ext4 -d, ~30% of the
#                     size in files of random data); ~10% of the overlay's 1 MiB chunks (seeded
#                     shuffle) written by one qemu-io run from a few 1 MiB random-text pattern files.
#                     Its raw floor's file is the chain converted to raw.
#   LA  LA/*.qcow2    A's guest bytes as a LUKS qcow2 (qemu-img convert of A's raw file)
#   LB  LB/*.qcow2    LUKS overlay over the same B/base.raw, written by the same qemu-io commands
# Each side gets its own copy of each image (cp --sparse=always): both take QEMU's image locks.
#
# Sides: the two FUSE servers on each image, and two floors (scripts/lib/bench-sides.sh mounts them):
#   qcowfs  qcowfs mount --passphrase-file F --cache-size BENCH_CACHE_SIZE [BENCH_QCOWFS_OPTS] IMG DIR
#   qemu    qemu-storage-daemon --export type=fuse (cache.direct=off: it also uses the page cache)
#   null    the transport floor, once per workload and round (it has no image): qcowfs
#           transport-floor, a FUSE file served by qcowfs's own transport code (the transport of
#           QCOWFS_IO_URING, as for the qcowfs side) from memory, with no qcow2, crypto or host I/O
#   raw     the image's guest bytes as a plain raw file on the host disk where the images live,
#           with fio's same job but buffered (direct=0): for reads the page-cache floor (the file
#           is warm), for writes the disk floor (the same fsyncs put the same bytes on the disk)
# For each workload, each of BENCH_ROUNDS rounds runs every side on every image once, in an order
# reversed every other round. One run of one side: (write workloads only: a fresh copy of the
# pristine image or raw file, outside the timed part), `sync`, the image (and base, or the raw file)
# read with cat so that it is warm in the host page cache, a fresh mount (FUSE sides start cold),
# the fio job, VmHWM of the daemon from /proc/PID/status, unmount (qcowfs umount / SIGTERM to
# qemu-storage-daemon, waited for).
# Workloads (fio, ioengine=psync; direct=1 on the FUSE sides: the disk file's pages never enter the
# page cache, so no drop_caches is needed):
#   seqread     rw=read      bs=1M  whole disk (or BENCH_SEQ_SIZE)           MiB/s
#   randread    rw=randread  bs=4k  QD1, time_based BENCH_RUNTIME s             IOPS
#   randread4j  rw=randread  bs=4k  numjobs=4 (group_reporting), time_based     IOPS
#   seqwrite    rw=write     bs=1M  BENCH_WRITE_SIZE (256M), end_fsync=1        MiB/s (fsync counted)
#   randwrite   rw=randwrite bs=4k  fsync=64, time_based BENCH_RUNTIME s        IOPS
#   mixed       rw=randrw rwmixread=70 bs=4k QD1, time_based, end_fsync=1        IOPS (read + write)
#   readlat     two jobs at once, time_based: a writer (rw=write bs=1M fsync=16, so barriers come
#               every 16 MiB) and a reader (rw=randread bs=4k QD1)   p99 read latency in us (lower
#               is better: its ratios are inverted)
# fio's random offsets are the same for every side (randrepeat, default seed).
#
# Knobs (environment): BENCH_SIZE (1G), BENCH_ROUNDS (3), BENCH_RUNTIME (10), BENCH_SEQ_SIZE (whole
# disk), BENCH_WRITE_SIZE (256M, capped at BENCH_SIZE), BENCH_CACHE_SIZE (256M, qcowfs --cache-size),
# BENCH_OUT (also write the markdown table there), BENCH_IMAGES ("A B LA LB"), BENCH_SIDES ("qcowfs
# qemu null raw"), BENCH_WORKLOADS (all seven), BENCH_KEEP=1 (keep the temp dir), QCOWFS_BIN (use that
# binary, no build), BENCH_TMP (parent of the temp dir, /tmp), BENCH_QCOWFS_OPTS (more qcowfs mount
# options), QCOWFS_IO_URING (both qcowfs sides' transport: auto, on, off), BENCH_STARVE (N busy CPU
# hogs running beside every qcowfs write workload, at qcowfs's own priority: a starved flush writer
# for the RSS bound; 0), BENCH_PARTS.
# BENCH_OUT is overwritten by the fio table; the guest part appends its table to it.
# Output: one markdown table (scripts/lib/bench-table.py: medians; "x QEMU" = how many times better
# qcowfs is, "of null" and "of raw" = qcowfs as a fraction of each floor, inverted for latency; peak
# RSS = highest VmHWM over the rounds, against the bound of --cache-size + 32 MiB) and per-round values.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
# shellcheck source=scripts/lib/install-deps.sh
source scripts/lib/install-deps.sh
# shellcheck source=scripts/lib/bench-sides.sh
source scripts/lib/bench-sides.sh

[ "$(id -u)" -eq 0 ] || die "run the benchmark as root (FUSE mounts of qemu-storage-daemon, apt-get)"

BENCH_SIZE=${BENCH_SIZE:-1G}
BENCH_ROUNDS=${BENCH_ROUNDS:-3}
BENCH_RUNTIME=${BENCH_RUNTIME:-10}
BENCH_SEQ_SIZE=${BENCH_SEQ_SIZE:-}
BENCH_WRITE_SIZE=${BENCH_WRITE_SIZE:-256M}
BENCH_CACHE_SIZE=${BENCH_CACHE_SIZE:-256M}
BENCH_OUT=${BENCH_OUT:-}
BENCH_IMAGES=${BENCH_IMAGES:-A B LA LB}
BENCH_SIDES=${BENCH_SIDES:-qcowfs qemu null raw}
BENCH_STARVE=${BENCH_STARVE:-0}
BENCH_WORKLOADS=${BENCH_WORKLOADS:-seqread randread randread4j seqwrite randwrite mixed readlat}
BENCH_PARTS=${BENCH_PARTS:-fio guest files}
has_part() { case " $BENCH_PARTS " in *" $1 "*) return 0 ;; esac; return 1; }
for part in $BENCH_PARTS; do
	case "$part" in fio | guest | files) ;; *) die "unknown part in BENCH_PARTS: $part (fio, guest, files)" ;; esac
done
has_part fio || has_part guest || has_part files || die "BENCH_PARTS names no part (fio, guest, files)"
# The guest part's knobs are checked now, not after the fio part.
if has_part guest; then scripts/bench-guest.sh --check-knobs; fi

to_bytes() { numfmt --from=iec "${1%B}" 2>/dev/null || die "not a size: $1"; }
SIZE_B=$(to_bytes "$BENCH_SIZE")
if [ $((SIZE_B % 1048576)) -ne 0 ] || [ "$SIZE_B" -lt $((16 << 20)) ]; then
	die "BENCH_SIZE must be a whole number of MiB, at least 16M: $BENCH_SIZE"
fi
SEQ_B=$SIZE_B
[ -n "$BENCH_SEQ_SIZE" ] && SEQ_B=$(to_bytes "$BENCH_SEQ_SIZE")
WRITE_B=$(to_bytes "$BENCH_WRITE_SIZE")
[ "$SEQ_B" -le "$SIZE_B" ] || SEQ_B=$SIZE_B
[ "$WRITE_B" -le "$SIZE_B" ] || WRITE_B=$SIZE_B
[[ "$BENCH_ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_ROUNDS must be a positive integer"
[[ "$BENCH_RUNTIME" =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNTIME must be a positive integer (seconds)"
[[ "$BENCH_STARVE" =~ ^[0-9]+$ ]] || die "BENCH_STARVE must be a number of CPU hogs (0: none)"
for img in $BENCH_IMAGES; do
	case "$img" in A | B | LA | LB) ;; *) die "unknown image in BENCH_IMAGES: $img (A, B, LA, LB)" ;; esac
done
for side in $BENCH_SIDES; do
	case "$side" in qcowfs | qemu | null | raw) ;; *) die "unknown side in BENCH_SIDES: $side (qcowfs, qemu, null, raw)" ;; esac
done

if ! has_part fio; then
	if has_part guest; then scripts/bench-guest.sh; fi
	if has_part files; then scripts/bench-files.sh; fi
	exit 0
fi

step "Checking tools"
install_deps
require_fuse_device
if ! command -v fio >/dev/null 2>&1; then
	_apt_install fio
	command -v fio >/dev/null 2>&1 || die "fio is still missing after apt-get install fio"
fi
command -v python3 >/dev/null 2>&1 || _apt_install python3
note "$(fio --version), $(qemu-storage-daemon --version | head -n 1)"

resolve_qcowfs

WORK=$(mktemp -d "${BENCH_TMP:-/tmp}/qcowfs-bench.XXXXXX")
WORK=$(realpath "$WORK")
RESULTS="$WORK/results.tsv"
bench_traps benchmark
bench_sides_init "$WORK" # PASSFILE, QEMU_SECRET, AES_OPTS, LUKS_OPTS, the mountpoints
: >"$RESULTS"

CHUNKS=$((SIZE_B >> 20))

# ---------------------------------------------------------------------------------------------------
step "Images A and LA: $BENCH_SIZE legacy-AES and LUKS qcow2, ~40% of 1 MiB chunks random text"
mkdir -p "$WORK/A"
truncate -s "$SIZE_B" "$WORK/A/fill.raw"
python3 - "$WORK/A/fill.raw" "$CHUNKS" <<'EOF'
import os, random, sys
path, n = sys.argv[1], int(sys.argv[2])
idx = list(range(n))
random.Random(20240601).shuffle(idx)
# Random text (64 symbols, 6 bits per byte): data like a real guest's, not uniform noise, since
# qcowfs refuses a legacy-AES image whose sampled clusters all decrypt to noise (wrong key check).
table = bytes(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[i % 64] for i in range(256))
with open(path, "r+b") as f:
    for i in sorted(idx[: n * 4 // 10]):
        f.seek(i << 20)
        f.write(os.urandom(1 << 20).translate(table))
EOF
qemu-img convert -f raw -O qcow2 "${QEMU_SECRET[@]}" -o "$AES_OPTS" "$WORK/A/fill.raw" "$WORK/A/pristine.qcow2"
mkdir -p "$WORK/LA"
qemu-img convert -f raw -O qcow2 "${QEMU_SECRET[@]}" -o "$LUKS_OPTS" "$WORK/A/fill.raw" "$WORK/LA/pristine.qcow2"
mv "$WORK/A/fill.raw" "$WORK/A/pristine.raw"

step "Images B and LB: $BENCH_SIZE raw ext4 base + legacy-AES and LUKS overlays, ~10% of each written"
mkdir -p "$WORK/B" "$WORK/content"
python3 - "$WORK/content" $((SIZE_B * 3 / 10)) <<'EOF'
import os, random, sys
root, target = sys.argv[1], int(sys.argv[2])
rng = random.Random(20240602)
sizes = [4096, 16384, 65536, 262144, 1 << 20, 4 << 20, 16 << 20]
total = i = 0
while total < target:
    d = os.path.join(root, "dir%02d" % (i % 16), "sub%d" % (i % 3))
    os.makedirs(d, exist_ok=True)
    sz = min(rng.choice(sizes), target - total)
    with open(os.path.join(d, "file%05d.bin" % i), "wb") as f:
        f.write(os.urandom(sz))
    total += sz
    i += 1
print("    %d files, %d MiB" % (i, total >> 20))
EOF
truncate -s "$SIZE_B" "$WORK/B/base.raw"
mkfs.ext4 -q -F -L bench-root -d "$WORK/content" "$WORK/B/base.raw"
rm -rf "$WORK/content"
qemu-img create -q -f qcow2 "${QEMU_SECRET[@]}" -b base.raw -F raw -o "$AES_OPTS" "$WORK/B/pristine.qcow2" "$SIZE_B"
mkdir -p "$WORK/pat"
for i in 0 1 2 3 4 5 6 7; do
	base64 -w0 </dev/urandom | head -c 1M >"$WORK/pat/$i" || true # base64 dies of SIGPIPE
	[ "$(stat -c %s "$WORK/pat/$i")" -eq 1048576 ] || die "could not make the pattern file $WORK/pat/$i"
done
mapfile -t B_WRITES < <(python3 - "$CHUNKS" "$WORK/pat" <<'EOF'
import random, sys
n, pat = int(sys.argv[1]), sys.argv[2]
idx = list(range(n))
random.Random(20240603).shuffle(idx)
for k, i in enumerate(sorted(idx[: max(1, n // 10)])):
    print("write -q -s %s/%d %d 1M" % (pat, k % 8, i << 20))
EOF
)
mkdir -p "$WORK/LB"
qemu-img create -q -f qcow2 "${QEMU_SECRET[@]}" -b ../B/base.raw -F raw -o "$LUKS_OPTS" "$WORK/LB/pristine.qcow2" "$SIZE_B"
QEMU_IO_ARGS=()
for c in "${B_WRITES[@]}"; do QEMU_IO_ARGS+=(-c "$c"); done
for img in B LB; do
	qemu-io "${QEMU_SECRET[@]}" --image-opts \
		"driver=qcow2,file.filename=$WORK/$img/pristine.qcow2,encrypt.key-secret=s0" "${QEMU_IO_ARGS[@]}"
done
rm -rf "$WORK/pat"
qemu-img convert "${QEMU_SECRET[@]}" --image-opts -O raw \
	"driver=qcow2,file.filename=$WORK/B/pristine.qcow2,encrypt.key-secret=s0" "$WORK/B/pristine.raw"

for img in A B LA LB; do
	qemu-img check -q "${QEMU_SECRET[@]}" --image-opts \
		"driver=qcow2,file.filename=$WORK/$img/pristine.qcow2,encrypt.key-secret=s0"
	note "$img: $(du -h "$WORK/$img/pristine.qcow2" | cut -f1) allocated in the qcow2 file$(
		case $img in *B) printf ', base %s' "$(du -h "$WORK/B/base.raw" | cut -f1)" ;; esac)"
done
# Both encryptions hold the same guest bytes.
for pair in "A LA" "B LB"; do
	read -r x y <<<"$pair"
	qemu-img compare -q "${QEMU_SECRET[@]}" --image-opts \
		"driver=qcow2,file.filename=$WORK/$x/pristine.qcow2,encrypt.key-secret=s0" \
		"driver=qcow2,file.filename=$WORK/$y/pristine.qcow2,encrypt.key-secret=s0" ||
		die "images $x and $y differ"
done

# What each image is, its encryption (QEMU's encrypt.format) and the raw floor's file (its guest bytes).
declare -A IMAGE_DESC=(
	[A]="A: AES qcow2, 40% allocated" [B]="B: AES overlay (10%) over raw ext4"
	[LA]="LA: LUKS qcow2, 40% allocated" [LB]="LB: LUKS overlay (10%) over raw ext4")
declare -A IMAGE_FORMAT=([A]=aes [B]=aes [LA]=luks [LB]=luks)
declare -A IMAGE_CONTENT=([A]=A [B]=B [LA]=A [LB]=B)

# ---------------------------------------------------------------------------------------------------
# side_image IMG SIDE: the path of SIDE's own copy of image IMG (for raw, of IMG's guest bytes).
side_image() {
	case "$2" in
	raw) printf '%s/%s/raw.raw' "$WORK" "${IMAGE_CONTENT[$1]}" ;;
	*) printf '%s/%s/%s.qcow2' "$WORK" "$1" "$2" ;;
	esac
}

# fresh_copy IMG SIDE: replace SIDE's copy of IMG with a copy of the pristine image (or raw file).
fresh_copy() {
	local dst src
	[ "$2" != null ] || return 0
	dst=$(side_image "$1" "$2")
	case "$2" in
	raw) src="$WORK/${IMAGE_CONTENT[$1]}/pristine.raw" ;;
	*) src="$WORK/$1/pristine.qcow2" ;;
	esac
	rm -f "$dst"
	cp --sparse=always "$src" "$dst"
}

# warm IMG SIDE: flush dirty pages, then read the image (and base) so that it is in the page cache.
warm() {
	sync
	[ "$2" != null ] || return 0
	cat "$(side_image "$1" "$2")" >/dev/null
	case "$1/$2" in *B/qcowfs | *B/qemu) cat "$WORK/B/base.raw" >/dev/null ;; esac
}

# side_mount IMG SIDE: mount SIDE's copy; prints the disk file's path (raw: the file itself).
side_mount() {
	case "$2" in
	raw) side_image "$1" raw ;;
	*) fuse_mount "$2" "$(side_image "$1" "$2")" "$SIZE_B" "${IMAGE_FORMAT[$1]:-aes}" ;;
	esac
}
side_pid() { fuse_pid "$1"; }
side_umount() { [ "$1" = raw ] || fuse_umount "$1"; }

# start_hogs N: N busy shells (BENCH_STARVE's CPU hogs); stop_hogs ends them.
HOGS=()
start_hogs() {
	local i
	for ((i = 0; i < $1; i++)); do
		(while :; do :; done) &
		HOGS+=($!)
	done
}
stop_hogs() {
	[ "${#HOGS[@]}" -gt 0 ] || return 0
	kill "${HOGS[@]}" 2>/dev/null || true
	wait "${HOGS[@]}" 2>/dev/null || true
	HOGS=()
}
bench_cleanup_hook() { stop_hogs; }

# fio_args WORKLOAD [DIRECT]: sets FIO_ARGS to the job's options (beyond name, filename and output
# format); DIRECT is fio's direct= (1, for the FUSE sides).
fio_args() {
	local direct=${2:-1}
	FIO_ARGS=(--ioengine=psync "--direct=$direct" --allow_file_create=0 --fallocate=none)
	case "$1" in
	seqread) FIO_ARGS+=(--rw=read --bs=1M "--size=$SEQ_B") ;;
	randread) FIO_ARGS+=(--rw=randread --bs=4k --time_based "--runtime=$BENCH_RUNTIME") ;;
	randread4j) FIO_ARGS+=(--rw=randread --bs=4k --numjobs=4 --group_reporting --time_based "--runtime=$BENCH_RUNTIME") ;;
	seqwrite) FIO_ARGS+=(--rw=write --bs=1M "--size=$WRITE_B" --end_fsync=1) ;;
	randwrite) FIO_ARGS+=(--rw=randwrite --bs=4k --fsync=64 --time_based "--runtime=$BENCH_RUNTIME") ;;
	mixed) FIO_ARGS+=(--rw=randrw --rwmixread=70 --bs=4k --time_based "--runtime=$BENCH_RUNTIME" --end_fsync=1) ;;
	readlat)
		# The first job (named readlat) writes; the reader is a second job with its own options.
		local common=(--ioengine=psync "--direct=$direct" --allow_file_create=0 --fallocate=none --time_based "--runtime=$BENCH_RUNTIME")
		FIO_ARGS+=(--rw=write --bs=1M "--size=$WRITE_B" --fsync=16 --time_based "--runtime=$BENCH_RUNTIME")
		FIO_ARGS+=(--name=reader "${common[@]}" --rw=randread --bs=4k)
		;;
	*) die "unknown workload: $1" ;;
	esac
}

# fio_value JSON WORKLOAD: MiB/s for sequential workloads, IOPS for random ones.
fio_value() {
	python3 - "$1" "$2" <<'EOF'
import json, sys
with open(sys.argv[1]) as f:
    text = f.read()
d = json.loads(text[text.index("{"):])  # fio may print notes before the JSON
w = sys.argv[2]
for job in d["jobs"]:
    if job["error"]:
        sys.exit("fio job %s reported error %d" % (job["jobname"], job["error"]))
job = d["jobs"][0]
if w == "readlat":
    reader = next(j for j in d["jobs"] if j["jobname"] == "reader")
    if reader["read"]["io_bytes"] <= 0 or job["write"]["io_bytes"] <= 0:
        sys.exit("fio moved no data")
    print("%.1f" % (reader["read"]["clat_ns"]["percentile"]["99.000000"] / 1000))
    sys.exit(0)
if w == "mixed":
    if job["read"]["io_bytes"] <= 0 or job["write"]["io_bytes"] <= 0:
        sys.exit("fio moved no data")
    print("%.2f" % (job["read"]["iops"] + job["write"]["iops"]))
    sys.exit(0)
part = job["write" if "write" in w else "read"]
if part["io_bytes"] <= 0:
    sys.exit("fio moved no data")
print("%.2f" % (part["bw_bytes"] / 1048576 if w.startswith("seq") else part["iops"]))
EOF
}

# run_one IMG WORKLOAD SIDE ROUND (null has no image: IMG is "-")
run_one() {
	local img=$1 wl=$2 side=$3 round=$4 disk pid=0 hwm=0 value json starve=0
	case "$wl" in *write | mixed | readlat) fresh_copy "$img" "$side" ;; esac
	warm "$img" "$side"
	disk=$(side_mount "$img" "$side")
	if [ "$side" != raw ]; then pid=$(side_pid "$side") || die "$side: no daemon pid"; fi
	json="$WORK/fio-$img-$wl-$side-$round.json"
	fio_args "$wl" "$([ "$side" = raw ] && echo 0 || echo 1)"
	# fio drops a file's cached pages before a job by default: the raw floor's file stays warm.
	[ "$side" != raw ] || FIO_ARGS+=(--invalidate=0)
	case "$side/$wl" in qcowfs/*write | qcowfs/mixed | qcowfs/readlat) starve=$BENCH_STARVE ;; esac
	start_hogs "$starve"
	# The file name comes before the first job: global, so the readlat reader uses it too.
	fio --output-format=json --output="$json" --filename="$disk" --name="$wl" "${FIO_ARGS[@]}"
	stop_hogs
	value=$(fio_value "$json" "$wl")
	[ "$pid" -eq 0 ] || hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")
	side_umount "$side"
	printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$wl" "$img" "$side" "$round" "$value" "$hwm" >>"$RESULTS"
	note "$(printf '%-10s %-2s %-6s round %s: %10s %s   VmHWM %6d KiB' "$wl" "$img" "$side" "$round" \
		"$value" "$(case $wl in seq*) echo MiB/s ;; readlat) echo "us p99" ;; *) echo IOPS ;; esac)" "$hwm")"
}

# The runs of one round of a workload: every (image, side) pair, the null floor once, the raw floor
# once per guest content; RUNS as "IMG SIDE" words.
RUNS=()
declare -A RAW_DONE=()
for img in $BENCH_IMAGES; do
	for side in $BENCH_SIDES; do
		case "$side" in
		null) ;;
		raw)
			[ -z "${RAW_DONE[${IMAGE_CONTENT[$img]}]:-}" ] || continue
			RAW_DONE[${IMAGE_CONTENT[$img]}]=1
			RUNS+=("${IMAGE_CONTENT[$img]} raw")
			;;
		*) RUNS+=("$img $side") ;;
		esac
	done
done
case " $BENCH_SIDES " in *" null "*) RUNS+=("- null") ;; esac
for run in "${RUNS[@]}"; do
	read -r img side <<<"$run"
	fresh_copy "$img" "$side"
done

for wl in $BENCH_WORKLOADS; do
	fio_args "$wl" # dies on an unknown workload before anything is mounted
	step "$wl: $BENCH_ROUNDS rounds of ${#RUNS[@]} runs"
	for round in $(seq "$BENCH_ROUNDS"); do
		order=("${RUNS[@]}")
		if [ $((round % 2)) -eq 0 ]; then
			for ((i = 0; i < ${#RUNS[@]}; i++)); do order[i]=${RUNS[${#RUNS[@]} - 1 - i]}; done
		fi
		for run in "${order[@]}"; do
			read -r img side <<<"$run"
			run_one "$img" "$wl" "$side" "$round"
		done
	done
done

# ---------------------------------------------------------------------------------------------------
step "Results"
DESC_ARGS=()
for img in A B LA LB; do DESC_ARGS+=("$img=${IMAGE_DESC[$img]}:${IMAGE_CONTENT[$img]}"); done
TABLE=$(python3 scripts/lib/bench-table.py "$RESULTS" "$(to_bytes "$BENCH_CACHE_SIZE")" "${DESC_ARGS[@]}")
HEADER="Image size $BENCH_SIZE, $BENCH_ROUNDS rounds (median), time-based jobs $BENCH_RUNTIME s, seq read $((SEQ_B >> 20)) MiB, seq write $((WRITE_B >> 20)) MiB, qcowfs ${QCOWFS_MOUNT_OPTS[*]}, transport ${QCOWFS_IO_URING:-auto}, $BENCH_STARVE CPU hogs beside qcowfs's writes; peak RSS = highest VmHWM of the daemon over the rounds."
printf '%s\n\n%s\n' "$HEADER" "$TABLE"
if [ -n "$BENCH_OUT" ]; then
	printf '%s\n\n%s\n' "$HEADER" "$TABLE" >"$BENCH_OUT"
	note "written to $BENCH_OUT"
fi

if has_part guest; then
	step "The guest job: scripts/bench-guest.sh"
	QCOWFS_BIN=$QCOWFS scripts/bench-guest.sh || die "the guest part failed (the fio table above is complete)"
fi
if has_part files; then
	step "The guest file jobs: scripts/bench-files.sh"
	QCOWFS_BIN=$QCOWFS scripts/bench-files.sh || die "the files part failed (the tables above are complete)"
fi
