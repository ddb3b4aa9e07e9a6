#!/usr/bin/env bash
# Make the fuzz seed images with qemu-img and qemu-io:
#   scripts/fuzz-seeds.sh DIR
# Small images (1-4 MiB virtual, a few written clusters, each file < 1 MiB) of every kind qcowfs
# reads: plain v3 and v2, 512-byte clusters (2 MiB clusters make files of 10+ MiB, too big for a seed), refcount_bits 1 and 64, extended L2, AES and
# LUKS (passphrase "fuzz", as src/fuzz/mod.rs expects; LUKS with encrypt.iter-time=10), zlib and zstd
# compressed, internal snapshots, a raw-backed overlay (the base sits beside it in DIR).
# Also, in DIR/guest/, small ext2/3/4 file systems made with mkfs.ext4 -d (raw bytes, the
# input of the `guest` target): folders, symlinks, a hard link, a sparse file, an htree folder;
# and FAT12, FAT16 and NTFS ones (XFS and btrfs have no file system under 4 MiB).
set -euo pipefail
DIR=${1:?usage: scripts/fuzz-seeds.sh DIR}
mkdir -p "$DIR"
cd "$DIR"
SECRET=(--object secret,id=s0,data=fuzz)

# create NAME SIZE OPTIONS: a qcow2 image with some data, a zeroed range and a sub-cluster write.
create() {
    local name=$1 size=$2 opts=$3
    qemu-img create -q -f qcow2 "${SECRET[@]}" -o "$opts" "$name.qcow2" "$size"
    qemu-io "${SECRET[@]}" --image-opts "driver=qcow2,file.filename=$name.qcow2,encrypt.key-secret=s0" \
        -c "write -P 0x61 1000 70000" -c "write -z 300k 64k" -c "write -P 0x62 1536k 5000" >/dev/null
}

create plain 2M cluster_size=65536
create v2 2M compat=0.10,cluster_size=4096
create c512 2M cluster_size=512
create r1 2M cluster_size=4096,refcount_bits=1
create r64 2M cluster_size=4096,refcount_bits=64
create extl2 2M cluster_size=16384,extended_l2=on
create aes 2M encrypt.format=aes,encrypt.key-secret=s0,cluster_size=4096
# AES-128 keeps the eight key slots' material at 512 KiB (XTS doubles the key: a 1 MiB+ file).
create luks 2M encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,cluster_size=4096
create lazy 2M cluster_size=4096,lazy_refcounts=on

# Internal snapshots: two, with data written between them.
create snap 2M cluster_size=4096
qemu-img snapshot -c first snap.qcow2
qemu-io -f qcow2 -c "write -P 0x63 0 4096" snap.qcow2 >/dev/null
qemu-img snapshot -c second snap.qcow2
qemu-io -f qcow2 -c "write -P 0x64 8k 4096" snap.qcow2 >/dev/null

# Compressed clusters, zlib and zstd.
qemu-img convert -c -O qcow2 -o cluster_size=4096 plain.qcow2 zlib.qcow2
qemu-img convert -c -O qcow2 -o compression_type=zstd,cluster_size=4096 plain.qcow2 zstd.qcow2

# A raw-backed overlay (backing file name relative, in DIR).
qemu-img create -q -f raw fuzz-base.raw 1M
qemu-io -f raw -c "write -P 0x71 0 64k" fuzz-base.raw >/dev/null
qemu-img create -q -f qcow2 -b fuzz-base.raw -F raw -o cluster_size=4096 overlay.qcow2 1M
qemu-io -f qcow2 -c "write -P 0x72 4k 4k" overlay.qcow2 >/dev/null

# Guest file systems (raw ext2/3/4, < 1 MiB each): a small tree, made by mkfs -d.
mkdir -p guest
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir -p "$tree/etc/deep/er" "$tree/many"
printf 'hello\n' >"$tree/etc/hostname"
head -c 3000 /dev/urandom >"$tree/etc/deep/er/blob"
ln -s ../hostname "$tree/etc/deep/link"
ln "$tree/etc/hostname" "$tree/hardlink"
truncate -s 40M "$tree/sparse"
printf 'end' | dd of="$tree/sparse" bs=1 seek=$((20 << 20)) conv=notrunc status=none
for i in $(seq 1 120); do : >"$tree/many/file-with-a-longer-name-$i"; done
# NAME TYPE OPTIONS...
while read -r name type opts; do
    rm -f "guest/$name.raw"
    # shellcheck disable=SC2086
    mke2fs -q -F -t "$type" -b 1024 $opts -N 256 -d "$tree" "guest/$name.raw" 900k
done <<'KINDS'
ext4 ext4
ext4-indirect ext4 -O ^extent,^64bit
ext4-plain ext4 -O ^metadata_csum,^has_journal
ext3 ext3
ext2 ext2
KINDS
# FAT12 with the same tree (mtools: no mount), and an empty NTFS (its metafiles and root index
# are what the reader parses first; ntfs-3g would need a mount to add files).
rm -f guest/fat12.raw guest/fat16.raw guest/ntfs.raw
mkfs.vfat -C guest/fat12.raw 900 >/dev/null
mcopy -s -i guest/fat12.raw "$tree/etc" "$tree/hardlink" ::/
# FAT16 needs about 2 MiB (4,085 clusters): the guest target takes inputs up to 4 MiB.
mkfs.vfat -F 16 -s 1 -C guest/fat16.raw 4096 >/dev/null
mcopy -s -i guest/fat16.raw "$tree/etc" "$tree/many" ::/
truncate -s 1100k guest/ntfs.raw
mkntfs -q -F -f guest/ntfs.raw >/dev/null 2>&1
# An LVM2 physical volume (2 MiB, 64 KiB extents) whose volume group `vg` holds one linear LV
# `lv` of 15 extents with the FAT12 seed in it: the metadata written by LVM2's own tools on a
# loop device (this kernel has no device-mapper for lvcreate), the LV's bytes at pe_start.
rm -f guest/lvm.raw
truncate -s 2M guest/lvm.raw
lvm_dev=$(losetup -f --show guest/lvm.raw)
lvm_text=$(mktemp)
{
    pvcreate -q -ff -y "$lvm_dev" &&
        vgcreate -q -s 64k vg "$lvm_dev" &&
        vgcfgbackup -q -f "$lvm_text" vg &&
        python3 - "$lvm_text" <<'PY' &&
import sys
path = sys.argv[1]
text = open(path).read()
lv = """
\tlogical_volumes {
\t\tlv {
\t\t\tid = "seedLV-aaaa-bbbb-cccc-dddd-eeee-ffffff"
\t\t\tstatus = ["READ", "WRITE", "VISIBLE"]
\t\t\tflags = []
\t\t\tsegment_count = 1
\t\t\tsegment1 {
\t\t\t\tstart_extent = 0
\t\t\t\textent_count = 15
\t\t\t\ttype = "striped"
\t\t\t\tstripe_count = 1
\t\t\t\tstripes = ["pv0", 0]
\t\t\t}
\t\t}
\t}
"""
end = text.rindex("}")
open(path, "w").write((text[:end] + lv + text[end:]).replace("seqno = 1", "seqno = 2"))
PY
        vgcfgrestore -q -f "$lvm_text" vg
} >/dev/null 2>&1
lvm_ok=$?
pe_start=$(awk '/pe_start/ {print $3}' "$lvm_text")
losetup -d "$lvm_dev"
rm -f "$lvm_text"
if [ "$lvm_ok" -ne 0 ] || [ -z "$pe_start" ]; then
    echo "fuzz-seeds: the LVM2 seed could not be made (pvcreate, vgcreate, vgcfgrestore)" >&2
    exit 1
fi
dd if=guest/fat12.raw of=guest/lvm.raw bs=512 seek="$pe_start" conv=notrunc status=none

for f in *.qcow2; do
    size=$(stat -c %s "$f")
    if [ "$size" -ge $((1 << 20)) ]; then
        echo "fuzz-seeds: $f is $size bytes (want < 1 MiB)" >&2
        exit 1
    fi
done
# Already in DIR (a relative DIR would not name it from here).
ls -l ./*.qcow2 | awk '{print "    " $5 "\t" $9}'
