//! Whole small images qemu-img and qemu-io made (QEMU 10.0.2), for tests of the read path: each is
//! the non-zero 16-byte rows of the file (the lines `xxd -a` shows), a run of equal rows written once
//! with its count. Every image was made in an empty folder by the commands in its comment; what a
//! test expects to read is what those commands wrote.

/// A file of `len` bytes: `rows` are (offset, count, hex): `count` copies of the 16 bytes `hex`
/// (shorter at the end of the file) from `offset` on; everything else is zero.
pub(super) struct QemuImage {
    pub len: usize,
    pub rows: &'static [(usize, usize, &'static str)],
}

impl QemuImage {
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.len];
        for &(at, count, hex) in self.rows {
            let row: Vec<u8> = hex
                .as_bytes()
                .chunks(2)
                .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
                .collect();
            for i in 0..count {
                let start = at + 16 * i;
                out[start..start + row.len()].copy_from_slice(&row);
            }
        }
        out
    }
}

/// 4 KiB clusters, zlib; two compressed clusters share host cluster 0x5000, a zero cluster keeps
/// its host cluster (and the 0x44 bytes in it):
///
/// ```text
/// qemu-img create -f qcow2 -o cluster_size=4096 c.qcow2 64K
/// qemu-io -f qcow2 -c 'write -c -P 0x5a 0 4k' -c 'write -c -P 0xa5 4k 4k' \
///     -c 'write -P 0x33 8k 4k' -c 'write -P 0x44 12k 4k' -c 'write -z 12k 4k' c.qcow2
/// ```
pub(super) const COMPRESSED_ZLIB: QemuImage = QemuImage {
    len: 0x8000,
    rows: &[
        (0x00000, 1, "514649fb000000030000000000000000"),
        (0x00010, 1, "000000000000000c0000000000010000"),
        (0x00020, 1, "00000000000000010000000000003000"),
        (0x00030, 1, "00000000000010000000000100000000"),
        (0x00060, 1, "00000004000000700000000000000000"),
        (0x01000, 1, "00000000000020000000000000000000"),
        (0x02000, 1, "00010001000100010001000200010001"),
        (0x03000, 1, "80000000000040000000000000000000"),
        (0x04000, 1, "40000000000050004000000000005016"),
        (0x04010, 1, "80000000000060008000000000007001"),
        (0x05000, 1, "edc1010d000000c2a09eef1fc41e0e28"),
        (0x05010, 1, "000000e0dd00edc1010d000000c2a0fe"),
        (0x05020, 1, "41ded31e0e28000000e0dd0000000000"),
        (0x06000, 256, "33333333333333333333333333333333"),
        (0x07000, 256, "44444444444444444444444444444444"),
    ],
};

/// 4 KiB clusters, zstd; one compressed cluster at guest 4 KiB (its file ends where the
/// compressed bytes do):
///
/// ```text
/// qemu-img create -f qcow2 -o cluster_size=4096,compression_type=zstd z.qcow2 64K
/// qemu-io -f qcow2 -c 'write -c -P 0x6b 4k 4k' z.qcow2
/// ```
pub(super) const COMPRESSED_ZSTD: QemuImage = QemuImage {
    len: 0x5013,
    rows: &[
        (0x00000, 1, "514649fb000000030000000000000000"),
        (0x00010, 1, "000000000000000c0000000000010000"),
        (0x00020, 1, "00000000000000010000000000003000"),
        (0x00030, 1, "00000000000010000000000100000000"),
        (0x00040, 1, "00000000000000000000000000000008"),
        (0x00060, 1, "00000004000000700100000000000000"),
        (0x01000, 1, "00000000000020000000000000000000"),
        (0x02000, 1, "00010001000100010001000100000000"),
        (0x03000, 1, "80000000000040000000000000000000"),
        (0x04000, 1, "00000000000000004000000000005000"),
        (0x05000, 1, "28b52ffd60000f4d0000106b6b0100fb"),
        (0x05010, 1, "f70116"),
    ],
};

/// 16 KiB clusters with extended L2 entries (512-byte subclusters): in guest cluster 0,
/// subclusters 2 and 3 hold data and subcluster 8 reads as zeros; guest cluster 1 is all data:
///
/// ```text
/// qemu-img create -f qcow2 -o cluster_size=16k,extended_l2=on x.qcow2 64K
/// qemu-io -f qcow2 -c 'write -P 0x11 1k 1k' -c 'write -z 4k 512' -c 'write -P 0x22 16k 16k' x.qcow2
/// ```
pub(super) const EXTENDED_L2: QemuImage = QemuImage {
    len: 0x1c000,
    rows: &[
        (0x00000, 1, "514649fb000000030000000000000000"),
        (0x00010, 1, "000000000000000e0000000000010000"),
        (0x00020, 1, "0000000000000001000000000000c000"),
        (0x00030, 1, "00000000000040000000000100000000"),
        (0x00040, 1, "00000000000000000000000000000010"),
        (0x00060, 1, "00000004000000700000000000000000"),
        (0x00070, 1, "6803f857000001800000646972747920"),
        (0x00080, 1, "62697400000000000000000000000000"),
        (0x000a0, 1, "00000000000000000001636f72727570"),
        (0x000b0, 1, "74206269740000000000000000000000"),
        (0x000d0, 1, "0000000000000000000265787465726e"),
        (0x000e0, 1, "616c20646174612066696c6500000000"),
        (0x00100, 1, "00000000000000000003636f6d707265"),
        (0x00110, 1, "7373696f6e2074797065000000000000"),
        (0x00130, 1, "00000000000000000004657874656e64"),
        (0x00140, 1, "6564204c3220656e7472696573000000"),
        (0x00160, 1, "000000000000000001006c617a792072"),
        (0x00170, 1, "6566636f756e74730000000000000000"),
        (0x00190, 1, "000000000000000002006269746d6170"),
        (0x001a0, 1, "73000000000000000000000000000000"),
        (0x001c0, 1, "00000000000000000201726177206578"),
        (0x001d0, 1, "7465726e616c20646174610000000000"),
        (0x04000, 1, "00000000000080000000000000000000"),
        (0x08000, 1, "00010001000100010001000100010000"),
        (0x0c000, 1, "80000000000100000000000000000000"),
        (0x10000, 1, "8000000000014000000001000000000c"),
        (0x10010, 1, "800000000001800000000000ffffffff"),
        (0x14400, 64, "11111111111111111111111111111111"),
        (0x18000, 1024, "22222222222222222222222222222222"),
    ],
};
