//! Partition tables of the guest disk (MBR with extended/logical partitions, GPT), numbered as Linux
//! numbers them: MBR primaries 1-4 by slot and logicals from 5 in chain order; GPT entries by slot.
//! A missing or corrupt table yields no partitions, never an error.

use crate::disk::BlockDevice;

const SECTOR: u64 = 512;
/// The most logical partitions followed in an extended partition chain (a loop guard).
const MAX_LOGICAL: usize = 128;
/// The most GPT entries read.
const MAX_GPT_ENTRIES: u32 = 1024;

/// One partition: its Linux number and its byte range on the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    pub number: u32,
    pub start: u64,
    pub len: u64,
}

/// A partition table as read, and every byte range it was read from: the MBR, each EBR of the
/// extended chain, both GPT headers and entry arrays. A write to any of them may change it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    pub partitions: Vec<Partition>,
    pub sources: Vec<(u64, u64)>,
}

impl Table {
    /// Could writing [offset, offset + len) change the table? True for the sectors it was read
    /// from, and for the first 34 and last 33 sectors (where a new MBR or GPT would appear).
    pub fn touched_by(&self, disk_size: u64, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        let overlaps = |start: u64, n: u64| offset < start.saturating_add(n) && start < end;
        overlaps(0, 34 * SECTOR)
            || end > disk_size.saturating_sub(33 * SECTOR)
            || self.sources.iter().any(|&(start, n)| overlaps(start, n))
    }
}

/// Read the partition table of `disk`, noting where it lies.
pub fn read_table(disk: &dyn BlockDevice) -> Table {
    let mut table = Table::default();
    let mut mbr = [0u8; 512];
    if disk.size() < 1024 || disk.read_at(0, &mut mbr).is_err() {
        return table;
    }
    table.sources.push((0, SECTOR));
    if mbr[510..512] != [0x55, 0xaa] {
        return table;
    }
    let entries: Vec<MbrEntry> = (0..4)
        .map(|i| MbrEntry::parse(&mbr[446 + i * 16..462 + i * 16]))
        .collect();
    if entries.iter().any(|e| e.kind == 0xee) {
        table.partitions = read_gpt(disk, &mut table.sources);
        return table;
    }
    let size = disk.size();
    let mut next_logical = 5;
    for (slot, e) in entries.iter().enumerate() {
        if e.kind == 0 || e.sectors == 0 {
            continue;
        }
        let Some((start, len)) = e.range(0, size) else {
            continue;
        };
        if is_extended(e.kind) {
            for (lstart, llen) in read_logicals(disk, start, len, &mut table.sources) {
                table.partitions.push(Partition {
                    number: next_logical,
                    start: lstart,
                    len: llen,
                });
                next_logical += 1;
            }
        } else {
            table.partitions.push(Partition {
                number: slot as u32 + 1,
                start,
                len,
            });
        }
    }
    table
}

struct MbrEntry {
    kind: u8,
    lba: u64,
    sectors: u64,
}

impl MbrEntry {
    fn parse(b: &[u8]) -> Self {
        let le32 = |i: usize| u64::from(u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]));
        MbrEntry {
            kind: b[4],
            lba: le32(8),
            sectors: le32(12),
        }
    }

    /// The byte range, with LBA relative to `base`, if it lies on a disk of `size` bytes.
    fn range(&self, base: u64, size: u64) -> Option<(u64, u64)> {
        let start = (base + self.lba).checked_mul(SECTOR)?;
        let len = self.sectors.checked_mul(SECTOR)?;
        (start.checked_add(len)? <= size && len > 0).then_some((start, len))
    }
}

fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0f | 0x85)
}

/// Follow the chain of extended boot records inside the extended partition [start, start + len).
fn read_logicals(
    disk: &dyn BlockDevice,
    start: u64,
    len: u64,
    sources: &mut Vec<(u64, u64)>,
) -> Vec<(u64, u64)> {
    let ext_lba = start / SECTOR;
    let mut out = Vec::new();
    let mut ebr_lba = ext_lba;
    let mut seen = std::collections::HashSet::new();
    while out.len() < MAX_LOGICAL && seen.insert(ebr_lba) {
        let mut ebr = [0u8; 512];
        let Some(at) = ebr_lba.checked_mul(SECTOR) else {
            break;
        };
        if at >= start + len || disk.read_at(at, &mut ebr).is_err() {
            break;
        }
        // Watched even when it holds no table yet: writing one there extends the chain.
        sources.push((at, SECTOR));
        if ebr[510..512] != [0x55, 0xaa] {
            break;
        }
        let this = MbrEntry::parse(&ebr[446..462]);
        let next = MbrEntry::parse(&ebr[462..478]);
        if this.kind != 0 {
            if let Some(r) = this.range(ebr_lba, disk.size()) {
                out.push(r);
            }
        }
        if next.kind == 0 || next.lba == 0 {
            break;
        }
        let Some(lba) = ext_lba.checked_add(next.lba) else {
            break;
        };
        ebr_lba = lba;
    }
    out
}

fn le32(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn le64(b: &[u8], i: usize) -> u64 {
    u64::from(le32(b, i)) | (u64::from(le32(b, i + 4)) << 32)
}

/// Where a GPT header at `lba` says its entry array is: (byte offset, byte length), if the header
/// is there and the array lies on the disk. Notes the header (and the array) as table sources.
fn gpt_entries(
    disk: &dyn BlockDevice,
    lba: u64,
    sources: &mut Vec<(u64, u64)>,
) -> Option<(u64, u64, u32)> {
    let mut hdr = [0u8; 512];
    let at = lba.checked_mul(SECTOR)?;
    if at.checked_add(SECTOR)? > disk.size() || disk.read_at(at, &mut hdr).is_err() {
        return None;
    }
    sources.push((at, SECTOR));
    if &hdr[..8] != b"EFI PART" {
        return None;
    }
    let count = le32(&hdr, 80).min(MAX_GPT_ENTRIES);
    let entry_size = le32(&hdr, 84);
    if !(128..=4096).contains(&entry_size) || entry_size % 8 != 0 {
        return None;
    }
    let table_len = u64::from(count).checked_mul(u64::from(entry_size))?;
    let table_start = le64(&hdr, 72).checked_mul(SECTOR)?;
    if table_start.checked_add(table_len)? > disk.size() {
        return None;
    }
    sources.push((table_start, table_len));
    // The backup header (normally the last sector) and its array are table data too.
    let alternate = le64(&hdr, 32);
    if lba == 1 && alternate != 1 {
        let _ = gpt_entries(disk, alternate, sources);
    }
    Some((table_start, table_len, entry_size))
}

fn read_gpt(disk: &dyn BlockDevice, sources: &mut Vec<(u64, u64)>) -> Vec<Partition> {
    let Some((table_start, table_len, entry_size)) = gpt_entries(disk, 1, sources) else {
        return Vec::new();
    };
    let mut table = vec![0u8; table_len as usize];
    if disk.read_at(table_start, &mut table).is_err() {
        return Vec::new();
    }
    let size = disk.size();
    table
        .chunks_exact(entry_size as usize)
        .enumerate()
        .filter(|(_, e)| e[..16].iter().any(|&b| b != 0))
        .filter_map(|(i, e)| {
            let first = le64(e, 32);
            let last = le64(e, 40);
            let start = first.checked_mul(SECTOR)?;
            let len = last
                .checked_sub(first)?
                .checked_add(1)?
                .checked_mul(SECTOR)?;
            (start.checked_add(len)? <= size).then_some(Partition {
                number: i as u32 + 1,
                start,
                len,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::memory::MemoryDisk;

    fn entry(kind: u8, lba: u32, sectors: u32) -> [u8; 16] {
        let mut e = [0u8; 16];
        e[4] = kind;
        e[8..12].copy_from_slice(&lba.to_le_bytes());
        e[12..16].copy_from_slice(&sectors.to_le_bytes());
        e
    }

    fn put_table(disk: &MemoryDisk, lba: u64, entries: &[[u8; 16]]) {
        let mut sector = [0u8; 512];
        for (i, e) in entries.iter().enumerate() {
            sector[446 + i * 16..462 + i * 16].copy_from_slice(e);
        }
        sector[510] = 0x55;
        sector[511] = 0xaa;
        disk.write_at(lba * 512, &sector).unwrap();
    }

    #[test]
    fn numbers_mbr_primaries_by_slot_and_logicals_from_five() {
        let disk = MemoryDisk::new(vec![0u8; 8 << 20]);
        // slot 1: primary at 2048 (1000 sectors); slot 2: extended at 4096 (8000 sectors)
        put_table(
            &disk,
            0,
            &[entry(0x83, 2048, 1000), entry(0x05, 4096, 8000)],
        );
        // EBR 1 at 4096: logical at +63 (500 sectors), next EBR at ext+2000
        put_table(
            &disk,
            4096,
            &[entry(0x83, 63, 500), entry(0x05, 2000, 1000)],
        );
        put_table(&disk, 6096, &[entry(0x83, 63, 300)]);
        let parts = read_table(&disk).partitions;
        assert_eq!(
            parts,
            vec![
                Partition {
                    number: 1,
                    start: 2048 * 512,
                    len: 1000 * 512
                },
                Partition {
                    number: 5,
                    start: (4096 + 63) * 512,
                    len: 500 * 512
                },
                Partition {
                    number: 6,
                    start: (6096 + 63) * 512,
                    len: 300 * 512
                },
            ]
        );
    }

    #[test]
    fn every_ebr_of_the_chain_is_a_table_source_and_touched_by_writes() {
        let disk = MemoryDisk::new(vec![0u8; 8 << 20]);
        put_table(&disk, 0, &[entry(0x05, 4096, 8000)]);
        put_table(
            &disk,
            4096,
            &[entry(0x83, 63, 500), entry(0x05, 2000, 1000)],
        );
        put_table(&disk, 6096, &[entry(0x83, 63, 300)]);
        let table = read_table(&disk);
        assert_eq!(table.partitions.len(), 2);
        for ebr in [4096u64, 6096] {
            assert!(
                table.sources.contains(&(ebr * 512, 512)),
                "{:?}",
                table.sources
            );
            assert!(table.touched_by(8 << 20, ebr * 512 + 446 + 12, 4));
        }
        // Inside a logical partition's data, away from every table: not touched.
        assert!(!table.touched_by(8 << 20, (4096 + 100) * 512, 4096));
    }

    #[test]
    fn the_first_34_and_last_33_sectors_are_always_watched() {
        let table = Table::default();
        let size = 8 << 20;
        assert!(table.touched_by(size, 33 * 512, 1));
        assert!(!table.touched_by(size, 34 * 512, 512));
        assert!(table.touched_by(size, size - 33 * 512, 1));
        assert!(!table.touched_by(size, size - 34 * 512, 512));
    }

    #[test]
    fn gpt_headers_and_both_entry_arrays_are_table_sources() {
        let size: u64 = 4 << 20;
        let disk = MemoryDisk::new(vec![0u8; size as usize]);
        put_table(&disk, 0, &[entry(0xee, 1, 8191)]);
        let last = size / 512 - 1;
        let header = |entries_lba: u64, alternate: u64| {
            let mut hdr = [0u8; 512];
            hdr[..8].copy_from_slice(b"EFI PART");
            hdr[32..40].copy_from_slice(&alternate.to_le_bytes());
            hdr[72..80].copy_from_slice(&entries_lba.to_le_bytes());
            hdr[80..84].copy_from_slice(&128u32.to_le_bytes());
            hdr[84..88].copy_from_slice(&128u32.to_le_bytes());
            hdr
        };
        disk.write_at(512, &header(2, last)).unwrap();
        disk.write_at(last * 512, &header(last - 32, 1)).unwrap();
        let table = read_table(&disk);
        for source in [
            (512, 512),
            (1024, 128 * 128),
            (last * 512, 512),
            ((last - 32) * 512, 128 * 128),
        ] {
            assert!(
                table.sources.contains(&source),
                "{source:?} in {:?}",
                table.sources
            );
        }
    }

    #[test]
    fn an_ebr_offset_that_overflows_ends_the_chain() {
        let disk = MemoryDisk::new(vec![0u8; 8 << 20]);
        put_table(&disk, 0, &[entry(0x05, 4096, 8000)]);
        put_table(
            &disk,
            4096,
            &[entry(0x83, 63, 10), entry(0x05, u32::MAX, 100)],
        );
        assert_eq!(read_table(&disk).partitions.len(), 1);
    }

    #[test]
    fn no_signature_means_no_partitions() {
        let disk = MemoryDisk::new(vec![0u8; 1 << 20]);
        assert!(read_table(&disk).partitions.is_empty());
    }

    #[test]
    fn a_looping_ebr_chain_ends() {
        let disk = MemoryDisk::new(vec![0u8; 8 << 20]);
        put_table(&disk, 0, &[entry(0x05, 2048, 8000)]);
        put_table(&disk, 2048, &[entry(0x83, 63, 10), entry(0x05, 0, 100)]);
        assert_eq!(read_table(&disk).partitions.len(), 1);
    }

    #[test]
    fn partitions_past_the_disk_end_are_ignored() {
        let disk = MemoryDisk::new(vec![0u8; 1 << 20]);
        put_table(&disk, 0, &[entry(0x83, 2048, 1 << 30)]);
        assert!(read_table(&disk).partitions.is_empty());
    }

    #[test]
    fn reads_gpt_entries_by_slot() {
        let disk = MemoryDisk::new(vec![0u8; 4 << 20]);
        put_table(&disk, 0, &[entry(0xee, 1, 8191)]);
        let mut hdr = [0u8; 512];
        hdr[..8].copy_from_slice(b"EFI PART");
        hdr[72..80].copy_from_slice(&2u64.to_le_bytes());
        hdr[80..84].copy_from_slice(&128u32.to_le_bytes());
        hdr[84..88].copy_from_slice(&128u32.to_le_bytes());
        disk.write_at(512, &hdr).unwrap();
        let mut e = [0u8; 128];
        e[0] = 1; // non-zero type GUID
        e[32..40].copy_from_slice(&2048u64.to_le_bytes());
        e[40..48].copy_from_slice(&4095u64.to_le_bytes());
        disk.write_at(1024 + 2 * 128, &e).unwrap(); // slot 3
        assert_eq!(
            read_table(&disk).partitions,
            vec![Partition {
                number: 3,
                start: 2048 * 512,
                len: 2048 * 512
            }]
        );
    }
}
