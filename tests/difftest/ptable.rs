//! Partition tables written byte by byte (no sfdisk/sgdisk needed): an MBR with one primary and an
//! extended partition holding two logical ones, or a GPT using slots 1, 2 and 4 with correct CRCs
//! and a backup at the disk's end. The layout keeps every table sector in a reserved 1 MiB range,
//! so random writes (which stay in [`Layout::windows`]) never touch a table: only a table rewrite
//! does, and the engine knows the partitions at every moment.

use std::collections::BTreeMap;

use crate::common::MIB;

const SECTOR: u64 = 512;
/// Room reserved for each table sector (MBR, EBR, GPT header and entries).
const RESERVED: u64 = MIB;
/// The largest a partition may grow to (its slot in the layout).
pub const SLOT: u64 = 16 * MIB;
/// GPT: 128 entries of 128 bytes.
const GPT_ENTRIES: u64 = 128;
const GPT_ENTRY_SIZE: u64 = 128;
/// Linux filesystem data, as GPT stores the GUID 0FC63DAF-8483-4772-8E79-3D69D8477DE4.
const LINUX_FS_GUID: [u8; 16] = [
    0xaf, 0x3d, 0xc6, 0x0f, 0x83, 0x84, 0x72, 0x47, 0x8e, 0x79, 0x3d, 0x69, 0xd8, 0x47, 0x7d, 0xe4,
];

/// Which partition table the guest disk carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Guest {
    Blank,
    Mbr,
    Gpt,
}

/// The guest's partitions and where its table sectors are: N → (start byte, length in bytes).
#[derive(Clone, Debug)]
pub struct Layout {
    pub guest: Guest,
    pub disk_size: u64,
    pub parts: BTreeMap<u32, (u64, u64)>,
}

impl Layout {
    /// The initial layout of a `disk_size` disk (≥ 64 MiB for a partitioned guest).
    pub fn new(guest: Guest, disk_size: u64) -> Layout {
        let mut parts = BTreeMap::new();
        match guest {
            Guest::Blank => {}
            Guest::Mbr => {
                assert!(disk_size >= 64 * MIB, "an MBR guest needs a 64 MiB disk");
                parts.insert(1, (MIB, SLOT));
                parts.insert(5, (Self::ebr(5) + RESERVED, SLOT - 2 * MIB));
                parts.insert(6, (Self::ebr(6) + RESERVED, SLOT - 4 * MIB));
            }
            Guest::Gpt => {
                assert!(disk_size >= 64 * MIB, "a GPT guest needs a 64 MiB disk");
                parts.insert(1, (MIB, SLOT));
                parts.insert(2, (18 * MIB, SLOT - MIB));
                parts.insert(4, (36 * MIB, SLOT - 3 * MIB));
            }
        }
        Layout {
            guest,
            disk_size,
            parts,
        }
    }

    /// The extended partition: from the first EBR to 1 MiB before the disk's end.
    fn extended(&self) -> (u64, u64) {
        (Self::ebr(5), self.disk_size - MIB - Self::ebr(5))
    }

    /// Byte offset of the EBR that describes logical partition `n` (5 or 6).
    fn ebr(n: u32) -> u64 {
        match n {
            5 => 18 * MIB,
            6 => 36 * MIB,
            _ => unreachable!("only logical partitions 5 and 6 exist"),
        }
    }

    /// Ranges random writes may touch: the disk minus every reserved table range.
    pub fn windows(&self) -> Vec<(u64, u64)> {
        let reserved: Vec<(u64, u64)> = match self.guest {
            Guest::Blank => vec![],
            Guest::Mbr => vec![
                (0, RESERVED),
                (Self::ebr(5), RESERVED),
                (Self::ebr(6), RESERVED),
            ],
            Guest::Gpt => vec![(0, RESERVED), (self.disk_size - RESERVED, RESERVED)],
        };
        let mut out = vec![];
        let mut at = 0;
        for (start, len) in reserved {
            if start > at {
                out.push((at, start - at));
            }
            at = start + len;
        }
        if at < self.disk_size {
            out.push((at, self.disk_size - at));
        }
        out
    }

    /// Sets partition `n` to `len` bytes (a multiple of 512, at most [`SLOT`]) and returns the
    /// writes (offset, bytes) that put the new table on the disk.
    pub fn resize(&mut self, n: u32, len: u64) -> Vec<(u64, Vec<u8>)> {
        assert!(len % SECTOR == 0 && len > 0 && len <= SLOT);
        self.parts.get_mut(&n).expect("partition exists").1 = len;
        match (self.guest, n) {
            (Guest::Mbr, 5 | 6) => vec![self.ebr_sector(n)],
            (Guest::Mbr, _) => vec![self.mbr_sector()],
            _ => self.gpt_writes(),
        }
    }

    /// Every table sector of this layout: what a blank disk needs to carry it.
    pub fn table_writes(&self) -> Vec<(u64, Vec<u8>)> {
        match self.guest {
            Guest::Blank => vec![],
            Guest::Mbr => vec![self.mbr_sector(), self.ebr_sector(5), self.ebr_sector(6)],
            Guest::Gpt => self.gpt_writes(),
        }
    }

    fn mbr_sector(&self) -> (u64, Vec<u8>) {
        let (p1, l1) = self.parts[&1];
        let (ext, ext_len) = self.extended();
        let entries = [
            mbr_entry(0x83, p1 / SECTOR, l1 / SECTOR),
            mbr_entry(0x05, ext / SECTOR, ext_len / SECTOR),
        ];
        (0, boot_sector(&entries))
    }

    /// The EBR of logical `n`: its partition relative to the EBR, and a link to the next EBR
    /// relative to the extended partition's start.
    fn ebr_sector(&self, n: u32) -> (u64, Vec<u8>) {
        let ebr = Self::ebr(n);
        let (start, len) = self.parts[&n];
        let (ext, _) = self.extended();
        let mut entries = vec![mbr_entry(0x83, (start - ebr) / SECTOR, len / SECTOR)];
        if n == 5 {
            let next = Self::ebr(6);
            entries.push(mbr_entry(
                0x05,
                (next - ext) / SECTOR,
                (RESERVED + SLOT) / SECTOR,
            ));
        }
        (ebr, boot_sector(&entries))
    }

    fn gpt_writes(&self) -> Vec<(u64, Vec<u8>)> {
        let last_lba = self.disk_size / SECTOR - 1;
        let entry_sectors = GPT_ENTRIES * GPT_ENTRY_SIZE / SECTOR;
        let mut entries = vec![0u8; (GPT_ENTRIES * GPT_ENTRY_SIZE) as usize];
        for (&n, &(start, len)) in &self.parts {
            let e = &mut entries[((u64::from(n) - 1) * GPT_ENTRY_SIZE) as usize..][..128];
            e[..16].copy_from_slice(&LINUX_FS_GUID);
            e[16] = n as u8; // unique GUID: any distinct bytes
            e[17..32].copy_from_slice(b"qcowfs-difftest");
            e[32..40].copy_from_slice(&(start / SECTOR).to_le_bytes());
            e[40..48].copy_from_slice(&((start + len) / SECTOR - 1).to_le_bytes());
            for (i, c) in format!("part{n}").encode_utf16().enumerate() {
                e[56 + 2 * i..58 + 2 * i].copy_from_slice(&c.to_le_bytes());
            }
        }
        let entries_crc = crc32(&entries);
        let header = |current: u64, backup: u64, table: u64| {
            let mut h = vec![0u8; SECTOR as usize];
            h[..8].copy_from_slice(b"EFI PART");
            h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
            h[12..16].copy_from_slice(&92u32.to_le_bytes());
            h[24..32].copy_from_slice(&current.to_le_bytes());
            h[32..40].copy_from_slice(&backup.to_le_bytes());
            h[40..48].copy_from_slice(&(2 + entry_sectors).to_le_bytes());
            h[48..56].copy_from_slice(&(last_lba - 1 - entry_sectors).to_le_bytes());
            h[56..72].copy_from_slice(b"qcowfs-difftest!");
            h[72..80].copy_from_slice(&table.to_le_bytes());
            h[80..84].copy_from_slice(&(GPT_ENTRIES as u32).to_le_bytes());
            h[84..88].copy_from_slice(&(GPT_ENTRY_SIZE as u32).to_le_bytes());
            h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
            let crc = crc32(&h[..92]);
            h[16..20].copy_from_slice(&crc.to_le_bytes());
            h
        };
        let protective = boot_sector(&[mbr_entry(0xee, 1, last_lba.min(0xffff_ffff))]);
        let backup_table = last_lba - entry_sectors;
        vec![
            (0, protective),
            (SECTOR, header(1, last_lba, 2)),
            (2 * SECTOR, entries.clone()),
            (backup_table * SECTOR, entries),
            (last_lba * SECTOR, header(last_lba, 1, backup_table)),
        ]
    }
}

fn mbr_entry(kind: u8, lba: u64, sectors: u64) -> [u8; 16] {
    let mut e = [0u8; 16];
    e[4] = kind;
    e[8..12].copy_from_slice(&u32::try_from(lba).expect("LBA fits an MBR").to_le_bytes());
    e[12..16].copy_from_slice(
        &u32::try_from(sectors)
            .expect("size fits an MBR")
            .to_le_bytes(),
    );
    e
}

fn boot_sector(entries: &[[u8; 16]]) -> Vec<u8> {
    let mut s = vec![0u8; SECTOR as usize];
    for (i, e) in entries.iter().enumerate() {
        s[446 + 16 * i..462 + 16 * i].copy_from_slice(e);
    }
    s[510] = 0x55;
    s[511] = 0xaa;
    s
}

/// CRC-32 (IEEE 802.3, reflected), as GPT uses it.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn crc32_matches_the_standard_check_value() {
    assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
}
