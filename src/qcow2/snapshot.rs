//! The internal snapshot table: a list of variable-length entries, each naming an L1 table.

use super::header::MAX_VIRTUAL_SIZE;
use super::FormatError;
use crate::io::HostFile;

/// QEMU's limits (block/qcow2.h): extra data per entry and the whole table.
const MAX_EXTRA_DATA: u32 = 1024;
const MAX_TABLE_BYTES: u64 = 64 << 20;
const ENTRY_HEADER: usize = 40;

/// One internal snapshot.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub id: String,
    pub name: String,
    pub l1_table_offset: u64,
    pub l1_size: u32,
    /// Virtual disk size when the snapshot was taken (from the extra data, else the current size).
    pub disk_size: Option<u64>,
    pub date_sec: u32,
    pub vm_state_size: u64,
}

/// Read `count` entries from `offset`. Errors are format errors; I/O errors become `Truncated`.
pub fn read_table(file: &HostFile, offset: u64, count: u32) -> Result<Vec<Snapshot>, FormatError> {
    let mut snapshots = Vec::new();
    let mut at = offset;
    for index in 0..count {
        if at - offset > MAX_TABLE_BYTES {
            return Err(FormatError::TooLarge {
                what: "snapshot table",
                size: at - offset,
                limit: MAX_TABLE_BYTES,
            });
        }
        let mut head = [0u8; ENTRY_HEADER];
        file.read_exact_at(at, &mut head)
            .map_err(|_| FormatError::Snapshot(index))?;
        let be16 = |i: usize| u16::from_be_bytes([head[i], head[i + 1]]);
        let be32 = |i: usize| u32::from_be_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
        let be64 = |i: usize| (u64::from(be32(i)) << 32) | u64::from(be32(i + 4));
        let extra_len = be32(36);
        if extra_len > MAX_EXTRA_DATA {
            return Err(FormatError::Snapshot(index));
        }
        let id_len = usize::from(be16(12));
        let name_len = usize::from(be16(14));
        let mut rest = vec![0u8; extra_len as usize + id_len + name_len];
        let rest_at = at
            .checked_add(ENTRY_HEADER as u64)
            .ok_or(FormatError::Snapshot(index))?;
        file.read_exact_at(rest_at, &mut rest)
            .map_err(|_| FormatError::Snapshot(index))?;
        let extra = &rest[..extra_len as usize];
        let extra64 = |i: usize| {
            extra
                .get(i..i + 8)
                .map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
        };
        let vm_state_size = extra64(0).unwrap_or(u64::from(be32(32)));
        let id = String::from_utf8_lossy(&rest[extra_len as usize..extra_len as usize + id_len])
            .into_owned();
        let name = String::from_utf8_lossy(&rest[extra_len as usize + id_len..]).into_owned();
        let disk_size = extra64(8);
        if disk_size.is_some_and(|size| size > MAX_VIRTUAL_SIZE) {
            return Err(FormatError::Snapshot(index));
        }
        snapshots.push(Snapshot {
            id,
            name,
            l1_table_offset: be64(0),
            l1_size: be32(8),
            disk_size,
            date_sec: be32(16),
            vm_state_size,
        });
        let len = (ENTRY_HEADER + rest.len()).div_ceil(8) * 8;
        at = at
            .checked_add(len as u64)
            .ok_or(FormatError::Snapshot(index))?;
    }
    Ok(snapshots)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file with snapshot entries at 512: each has an 16-byte extra data (VM state size, disk size),
    /// an id "1" and a name "s".
    fn table(disk_sizes: &[u64]) -> (tempfile::TempDir, HostFile) {
        let mut b = vec![0u8; 512];
        for &size in disk_sizes {
            let mut e = vec![0u8; 40];
            e[0..8].copy_from_slice(&0x3_0000u64.to_be_bytes());
            e[8..12].copy_from_slice(&1u32.to_be_bytes());
            e[12..14].copy_from_slice(&1u16.to_be_bytes());
            e[14..16].copy_from_slice(&1u16.to_be_bytes());
            e[36..40].copy_from_slice(&16u32.to_be_bytes());
            e.extend_from_slice(&0u64.to_be_bytes());
            e.extend_from_slice(&size.to_be_bytes());
            e.extend_from_slice(b"1s");
            e.resize(e.len().div_ceil(8) * 8, 0);
            b.extend_from_slice(&e);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshots");
        std::fs::write(&path, &b).unwrap();
        let file = HostFile::open(&path, false).unwrap();
        (dir, file)
    }

    #[test]
    fn reads_snapshot_entries_with_extra_data() {
        let (_dir, file) = table(&[1 << 20, 2 << 20]);
        let s = read_table(&file, 512, 2).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!((s[1].id.as_str(), s[1].name.as_str()), ("1", "s"));
        assert_eq!(s[1].disk_size, Some(2 << 20));
        assert_eq!(s[0].l1_table_offset, 0x3_0000);
    }

    #[test]
    fn rejects_a_snapshot_disk_size_beyond_the_largest_virtual_size() {
        let (_dir, file) = table(&[1 << 20, u64::MAX - 511]);
        assert!(matches!(
            read_table(&file, 512, 2),
            Err(FormatError::Snapshot(1))
        ));
    }

    #[test]
    fn rejects_a_snapshot_table_at_the_top_of_the_address_space() {
        let (_dir, file) = table(&[1 << 20]);
        assert!(matches!(
            read_table(&file, u64::MAX - 8, 1),
            Err(FormatError::Snapshot(0))
        ));
    }
}
