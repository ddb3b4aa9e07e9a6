# shellcheck shell=bash
# Sourced by scripts/bench.sh and scripts/bench-guest.sh, after install-deps.sh and resolve_qcowfs
# ($QCOWFS set): the two FUSE sides of the benchmarks on one encrypted qcow2 image at a time, and the
# teardown every exit path runs.
#   qcowfs: qcowfs mount --passphrase-file F --cache-size BENCH_CACHE_SIZE [BENCH_QCOWFS_OPTS] IMG DIR
#           -> DIR/disk
#   qemu:   qemu-storage-daemon --daemonize --object secret,... --blockdev file --blockdev qcow2
#           (encrypt.format=aes or luks) --export type=fuse,mountpoint=FILE,writable=on  -> FILE
#           (its defaults otherwise: cache.direct=off, i.e. it also goes through the page cache)
#   null:   qcowfs transport-floor --size SIZE DIR -> DIR/disk: the transport floor, a FUSE file
#           served by qcowfs's own transport code from memory (no image, no crypto, no host I/O)
# Both qcowfs sides take the transport from QCOWFS_IO_URING (auto, on, off), as qcowfs does.
#
#   bench_traps NAME first (it removes WORK once bench_sides_init has named it), then
#   bench_sides_init WORK     makes WORK/mnt and WORK/passphrase; sets PASSFILE, QEMU_SECRET (the
#                             passphrase as QEMU's secret s0), AES_OPTS and LUKS_OPTS (qemu-img -o
#                             for a legacy-AES or a LUKS qcow2 with 64 KiB clusters), QCOWFS_MNT, QEMU_EXPORT, QSD_PIDFILE,
#                             QCOWFS_MOUNT_OPTS (the qcowfs mount options after the passphrase)
#   fuse_mount SIDE IMG SIZE_B [FORMAT]  mounts IMG (qcowfs|qemu|null; null ignores IMG), FORMAT
#                             aes (default) or luks for QEMU's driver; checks the disk's size and
#                             prints its path
#   fuse_pid SIDE, fuse_umount SIDE
#   qcowfs_stop, qsd_stop     idempotent, for cleanup
#   bench_traps NAME          EXIT/INT/TERM traps: bench_cleanup_hook (if the script defines one),
#                             then both FUSE sides stopped, then WORK removed (kept with BENCH_KEEP=1
#                             or while something is still mounted under it); NAME is for the message.
# Knobs read here: BENCH_CACHE_SIZE (256M), BENCH_QCOWFS_OPTS (extra words for qcowfs mount, e.g.
# "--io-uring off"), BENCH_KEEP.

BENCH_CACHE_SIZE=${BENCH_CACHE_SIZE:-256M}
BENCH_QCOWFS_OPTS=${BENCH_QCOWFS_OPTS:-}
BENCH_PASS=bench-passphrase

bench_sides_init() {
	local extra=()
	BENCH_WORK=$1
	# qcowfs umount recognises its daemon by the process name (/proc/PID/status Name:).
	[ "$(basename "$QCOWFS")" = qcowfs ] ||
		die "the qcowfs binary must be named qcowfs (qcowfs umount finds its daemon by that name): $QCOWFS"
	QCOWFS_MNT="$1/mnt"
	QEMU_EXPORT="$1/qemu-export.disk"
	QSD_PIDFILE="$1/qsd.pid"
	PASSFILE="$1/passphrase"
	mkdir -p "$QCOWFS_MNT"
	printf '%s' "$BENCH_PASS" >"$PASSFILE"
	chmod 600 "$PASSFILE"
	QEMU_SECRET=(--object "secret,id=s0,file=$PASSFILE")
	# shellcheck disable=SC2034 # for the scripts that source this file
	AES_OPTS=encrypt.format=aes,encrypt.key-secret=s0,cluster_size=64k
	# LUKS as qemu-img makes it by default (aes-256, xts-plain64, sha256), but with a short key
	# derivation: each run mounts afresh, and PBKDF2 is not what is measured.
	# shellcheck disable=SC2034
	LUKS_OPTS=encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100,cluster_size=64k
	read -r -a extra <<<"$BENCH_QCOWFS_OPTS"
	QCOWFS_MOUNT_OPTS=(--cache-size "$BENCH_CACHE_SIZE" "${extra[@]}")
}

# The pid of the qcowfs daemon serving $QCOWFS_MNT: its pid file in /run/qcowfs names the mountpoint
# on its second line.
qcowfs_daemon_pid() {
	local f
	for f in /run/qcowfs/*.pid; do
		[ -e "$f" ] || continue
		if [ "$(sed -n 2p "$f" 2>/dev/null)" = "$QCOWFS_MNT" ]; then
			sed -n 1p "$f"
			return 0
		fi
	done
	return 1
}

# wait_gone PID [TENTHS]: wait until the process is gone (or a zombie); 1 on timeout.
wait_gone() {
	local pid=$1 n=${2:-300} state
	while [ "$n" -gt 0 ]; do
		state=$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
		if [ -z "$state" ] || [ "$state" = Z ]; then return 0; fi
		sleep 0.1
		n=$((n - 1))
	done
	return 1
}

qsd_stop() {
	local pid
	[ -n "${QSD_PIDFILE:-}" ] || return 0
	if [ -s "$QSD_PIDFILE" ]; then
		pid=$(cat "$QSD_PIDFILE")
		if kill -0 "$pid" 2>/dev/null; then
			kill -TERM "$pid" 2>/dev/null || true
			if ! wait_gone "$pid" 600; then
				note "qemu-storage-daemon $pid ignored SIGTERM for 60 s: SIGKILL"
				kill -KILL "$pid" 2>/dev/null || true
				wait_gone "$pid" 100 || true
			fi
		fi
	fi
	rm -f "$QSD_PIDFILE"
	if grep -qF " $QEMU_EXPORT fuse" /proc/mounts; then
		fusermount3 -u -z "$QEMU_EXPORT" 2>/dev/null || umount -l "$QEMU_EXPORT" || true
	fi
}

qcowfs_stop() {
	[ -n "${QCOWFS_MNT:-}" ] || return 0
	if mountpoint -q "$QCOWFS_MNT"; then
		"$QCOWFS" umount "$QCOWFS_MNT" || fusermount3 -u -z "$QCOWFS_MNT" || umount -l "$QCOWFS_MNT" || true
	fi
}

# fuse_mount SIDE IMG SIZE_B [FORMAT]: mount IMG with SIDE; prints the disk file's path.
fuse_mount() {
	local side=$1 path=$2 size=$3 format=${4:-aes}
	case "$side" in
	null)
		"$QCOWFS" transport-floor --size "$size" "$QCOWFS_MNT" >&2 || die "qcowfs transport-floor failed"
		[ "$(stat -c %s "$QCOWFS_MNT/disk")" -eq "$size" ] || die "null: $QCOWFS_MNT/disk has the wrong size"
		printf '%s' "$QCOWFS_MNT/disk"
		;;
	qcowfs)
		"$QCOWFS" mount --passphrase-file "$PASSFILE" "${QCOWFS_MOUNT_OPTS[@]}" "$path" "$QCOWFS_MNT" >&2 ||
			die "qcowfs mount of $path failed"
		[ "$(stat -c %s "$QCOWFS_MNT/disk")" -eq "$size" ] || die "qcowfs: $QCOWFS_MNT/disk has the wrong size"
		printf '%s' "$QCOWFS_MNT/disk"
		;;
	qemu)
		: >"$QEMU_EXPORT"
		rm -f "$QSD_PIDFILE"
		qemu-storage-daemon "${QEMU_SECRET[@]}" \
			--blockdev "driver=file,node-name=f0,filename=$path" \
			--blockdev "driver=qcow2,node-name=d0,file=f0,encrypt.format=$format,encrypt.key-secret=s0" \
			--export "type=fuse,id=e0,node-name=d0,mountpoint=$QEMU_EXPORT,writable=on" \
			--pidfile "$QSD_PIDFILE" --daemonize >&2 || die "qemu-storage-daemon could not export $path"
		for _ in $(seq 100); do
			[ "$(stat -c %s "$QEMU_EXPORT")" -eq "$size" ] && break
			sleep 0.1
		done
		[ "$(stat -c %s "$QEMU_EXPORT")" -eq "$size" ] || die "qemu-storage-daemon: the export never showed the disk"
		printf '%s' "$QEMU_EXPORT"
		;;
	*) die "unknown FUSE side: $side" ;;
	esac
}

fuse_pid() {
	case "$1" in
	qcowfs | null) qcowfs_daemon_pid ;;
	qemu) cat "$QSD_PIDFILE" ;;
	*) return 1 ;;
	esac
}

fuse_umount() {
	case "$1" in
	qcowfs | null) "$QCOWFS" umount "$QCOWFS_MNT" || die "qcowfs umount $QCOWFS_MNT failed" ;;
	qemu) qsd_stop ;;
	*) die "unknown FUSE side: $1" ;;
	esac
}

_bench_cleanup() {
	local rc=$?
	set +e
	trap - EXIT INT TERM
	if declare -F bench_cleanup_hook >/dev/null; then bench_cleanup_hook; fi
	qcowfs_stop
	qsd_stop
	if [ -n "${BENCH_WORK:-}" ] && [ -d "$BENCH_WORK" ]; then
		if grep -qF " $BENCH_WORK/" /proc/mounts; then
			note "something is still mounted under $BENCH_WORK: not removing it"
		elif [ "${BENCH_KEEP:-0}" = 1 ]; then
			note "kept $BENCH_WORK"
		else
			rm -rf "$BENCH_WORK"
		fi
	fi
	if [ "$rc" -ne 0 ]; then
		printf '\n\033[1;31m%s FAILED (exit %s)\033[0m\n' "$_bench_name" "$rc" >&2
	fi
	exit "$rc"
}

bench_traps() {
	_bench_name=$1
	trap _bench_cleanup EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
}
