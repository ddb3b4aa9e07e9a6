# shellcheck shell=bash
# Sourced by scripts/test.sh, demo.sh and bench.sh: logging helpers; resolve_qcowfs; install_deps,
# which makes sure the tools qcowfs's tests and demo need are present, installing the missing ones
# with apt-get (Debian/Ubuntu) when run as root. apt-get update runs at most once.

# Tools in /sbin are not on a normal user's PATH on older Debian.
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() {
	printf '\n\033[1;31mERROR: %s\033[0m\n' "$*" >&2
	exit 1
}

# command:Debian package that provides it
QCOWFS_DEPS=(
	qemu-img:qemu-utils
	qemu-io:qemu-utils
	qemu-storage-daemon:qemu-utils
	fusermount3:fuse3
	mkfs.ext4:e2fsprogs
	mke2fs:e2fsprogs
	debugfs:e2fsprogs
	e2fsck:e2fsprogs
	sfdisk:fdisk
	sgdisk:gdisk
	partx:util-linux
	fstrim:util-linux
	mountpoint:util-linux
	findmnt:util-linux
	umount:mount
	man:man-db
	mandb:man-db
	fio:fio
	python3:python3
	gcore:gdb
	prlimit:util-linux
	cryptsetup:cryptsetup-bin
	setpriv:util-linux
	useradd:passwd
	chown:coreutils
	id:coreutils
	runuser:util-linux
	losetup:mount
	mount:mount
	cc:gcc
	mkfs.xfs:xfsprogs
	xfs_io:xfsprogs
	xfs_repair:xfsprogs
	fsck.vfat:dosfstools
	getfattr:attr
	mkfs.btrfs:btrfs-progs
	btrfs:btrfs-progs
	mkntfs:ntfs-3g
	ntfs-3g:ntfs-3g
	setfattr:attr
	setfacl:acl
	mkfs.vfat:dosfstools
	mcopy:mtools
	mkfs.exfat:exfatprogs
	diff:diffutils
	tar:tar
	base64:coreutils
	mkfifo:coreutils
	pvcreate:lvm2
	vgcreate:lvm2
	vgcfgbackup:lvm2
	vgcfgrestore:lvm2
	mkswap:util-linux
	strip:binutils
	readelf:binutils
	dpkg:dpkg
	dpkg-deb:dpkg
	dpkg-query:dpkg
	dpkg-shlibdeps:dpkg-dev
	fallocate:util-linux
)

_qcowfs_apt_updated=0

_apt_install() {
	if [ "$_qcowfs_apt_updated" -eq 0 ]; then
		note "apt-get update"
		DEBIAN_FRONTEND=noninteractive apt-get update -qq
		_qcowfs_apt_updated=1
	fi
	note "apt-get install $*"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# install_deps: every command of QCOWFS_DEPS present, or a loud failure naming what is missing.
install_deps() {
	local entry cmd pkg missing=() pkgs=()
	for entry in "${QCOWFS_DEPS[@]}"; do
		cmd=${entry%%:*}
		pkg=${entry#*:}
		if ! command -v "$cmd" >/dev/null 2>&1; then
			missing+=("$cmd")
			case " ${pkgs[*]} " in *" $pkg "*) ;; *) pkgs+=("$pkg") ;; esac
		fi
	done
	if [ "${#missing[@]}" -eq 0 ]; then
		note "all tools present: qemu-img, qemu-io, qemu-storage-daemon, fusermount3, mkfs.ext4, ..."
	else
		note "missing: ${missing[*]} (packages: ${pkgs[*]})"
		if [ "$(id -u)" -ne 0 ]; then
			die "missing tools: ${missing[*]}. Run as root to install them, or: sudo apt-get install ${pkgs[*]}"
		fi
		command -v apt-get >/dev/null 2>&1 ||
			die "missing tools: ${missing[*]} and no apt-get to install them (packages on Debian: ${pkgs[*]})"
		_apt_install "${pkgs[@]}"
		# Older releases ship qemu-storage-daemon in qemu-system-common rather than qemu-utils.
		if ! command -v qemu-storage-daemon >/dev/null 2>&1; then
			_apt_install qemu-system-common || true
		fi
		for cmd in "${missing[@]}"; do
			command -v "$cmd" >/dev/null 2>&1 || die "still missing after installing: $cmd"
		done
	fi
	# tests/it/fleet.rs installs ansible-core into a venv: Debian ships `python3 -m venv`'s
	# ensurepip apart, in python3-venv.
	if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
		note "missing: python3's venv module (package: python3-venv)"
		[ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1 ||
			die "python3 -m venv does not work. Run as root to install it, or: sudo apt-get install python3-venv"
		_apt_install python3-venv
		python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || die "still missing after installing: python3-venv"
	fi
	command -v cargo >/dev/null 2>&1 ||
		die "cargo not found: install a Rust toolchain (https://rustup.rs), then rerun"
}

# require_rust_components: rustfmt and clippy, added with rustup when they are missing.
require_rust_components() {
	local comp
	for comp in fmt clippy; do
		if ! cargo "$comp" --version >/dev/null 2>&1; then
			command -v rustup >/dev/null 2>&1 || die "cargo $comp is missing and rustup is not there to add it"
			note "rustup component add $([ "$comp" = fmt ] && echo rustfmt || echo clippy)"
			rustup component add "$([ "$comp" = fmt ] && echo rustfmt || echo clippy)"
		fi
	done
}

# require_fuse_device: /dev/fuse must exist; qcowfs's tests mount for real and never skip.
require_fuse_device() {
	if [ ! -c /dev/fuse ] && [ "$(id -u)" -eq 0 ]; then
		modprobe fuse 2>/dev/null || true
	fi
	[ -c /dev/fuse ] || die "/dev/fuse is missing: load the fuse module (modprobe fuse) or run the \
container with --device /dev/fuse --cap-add SYS_ADMIN. The FUSE tests cannot run without it."
}

# Sets QCOWFS to the qcowfs binary: QCOWFS_BIN when given, else a fresh release build ($REPO is the
# checkout).
resolve_qcowfs() {
	if [ -n "${QCOWFS_BIN:-}" ]; then
		step "Using the qcowfs binary given by QCOWFS_BIN (no build)"
		QCOWFS=$QCOWFS_BIN
	else
		step "Building qcowfs (release)"
		command -v cargo >/dev/null 2>&1 ||
			die "cargo not found; build as a user (cargo build --release) and pass QCOWFS_BIN=target/release/qcowfs"
		(cd "$REPO" && cargo build --release --locked --bin qcowfs)
		QCOWFS="${CARGO_TARGET_DIR:-$REPO/target}/release/qcowfs"
	fi
	[ -x "$QCOWFS" ] || die "no executable qcowfs at $QCOWFS"
	note "$QCOWFS"
}
