//! What a byte range of the guest disk holds, by the magic numbers at its start: an ext2/3/4 file
//! system (which `ls`, `cat` and `copy-out` read) or something they cannot read (XFS, btrfs, NTFS,
//! FAT, an LVM physical volume, LUKS, swap, nothing known), named so the refusal can say what was
//! found and how to get at it instead.

pub use super::error::Contents;
use crate::disk::BlockDevice;
use crate::error::Result;

/// Bytes read to detect every kind below (btrfs's superblock ends at 64 KiB + 4 KiB).
const PROBE_BYTES: u64 = 68 << 10;

/// What [start, start + len) of `disk` holds. A range too small for a file system holds nothing.
pub fn detect(disk: &dyn BlockDevice, start: u64, len: u64) -> Result<Contents> {
    let n = PROBE_BYTES.min(len) as usize;
    let mut buf = vec![0u8; n];
    disk.read_at(start, &mut buf)?;
    Ok(classify(&buf))
}

/// The kind of contents whose first bytes are `head` (up to [`PROBE_BYTES`] of them).
pub fn classify(head: &[u8]) -> Contents {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    // ext2/3/4: the superblock at 1024, its magic 0xEF53 (little-endian) at offset 56.
    if at(1024 + 56, &[0x53, 0xef]) {
        return Contents::Ext;
    }
    if at(0, b"XFSB") {
        return Contents::Xfs;
    }
    if at((64 << 10) + 64, b"_BHRfS_M") {
        return Contents::Btrfs;
    }
    if at(3, b"NTFS    ") {
        return Contents::Ntfs;
    }
    if at(3, b"EXFAT   ") {
        return Contents::ExFat;
    }
    if at(0, b"LUKS\xba\xbe") {
        return Contents::Luks;
    }
    // LVM2: a label in one of the first four sectors ("LABELONE", type "LVM2 001" at +24).
    if (0..4).any(|s| at(s * 512, b"LABELONE") && at(s * 512 + 24, b"LVM2 001")) {
        return Contents::Lvm2;
    }
    // Swap: the signature ends the first page, whatever the page size was.
    let swap = [4096usize, 8192, 16384, 65536]
        .iter()
        .any(|&page| at(page - 10, b"SWAPSPACE2") || at(page - 10, b"SWAP-SPACE"));
    if swap {
        return Contents::Swap;
    }
    if at(54, b"FAT12   ") || at(54, b"FAT16   ") || at(82, b"FAT32   ") {
        return Contents::Fat;
    }
    if at(510, &[0x55, 0xaa]) {
        return Contents::PartitionTable;
    }
    Contents::Nothing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(off: usize, magic: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; PROBE_BYTES as usize];
        b[off..off + magic.len()].copy_from_slice(magic);
        b
    }

    #[test]
    fn names_each_kind_by_its_magic() {
        assert_eq!(classify(&with(1080, &[0x53, 0xef])), Contents::Ext);
        assert_eq!(classify(&with(0, b"XFSB")), Contents::Xfs);
        assert_eq!(classify(&with(65600, b"_BHRfS_M")), Contents::Btrfs);
        assert_eq!(classify(&with(3, b"NTFS    ")), Contents::Ntfs);
        assert_eq!(classify(&with(0, b"LUKS\xba\xbe")), Contents::Luks);
        assert_eq!(classify(&with(4086, b"SWAPSPACE2")), Contents::Swap);
        assert_eq!(classify(&with(82, b"FAT32   ")), Contents::Fat);
        let mut lvm = with(512, b"LABELONE");
        lvm[536..544].copy_from_slice(b"LVM2 001");
        assert_eq!(classify(&lvm), Contents::Lvm2);
        assert_eq!(classify(&with(0, b"")), Contents::Nothing);
    }

    #[test]
    fn a_short_range_holds_nothing_rather_than_failing() {
        assert_eq!(classify(&[0u8; 100]), Contents::Nothing);
        assert_eq!(classify(&[]), Contents::Nothing);
    }
}
