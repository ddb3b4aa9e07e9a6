//! The internal snapshot table: a list of variable-length entries, each naming an L1 table.

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
        file.read_exact_at(at + ENTRY_HEADER as u64, &mut rest)
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
        snapshots.push(Snapshot {
            id,
            name,
            l1_table_offset: be64(0),
            l1_size: be32(8),
            disk_size: extra64(8),
            date_sec: be32(16),
            vm_state_size,
        });
        let len = (ENTRY_HEADER + rest.len()).div_ceil(8) * 8;
        at += len as u64;
    }
    Ok(snapshots)
}
