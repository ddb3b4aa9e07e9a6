//! Internal snapshots' L1 tables, read when a read needs them: a snapshot's table is checked for
//! place and size when its view is made, and its entries are read a cluster at a time into one
//! bounded cache per image. A mount so costs no memory per snapshot, however many there are and
//! however large their tables (QEMU allows 32 MiB each).

use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;
use parking_lot::Mutex;

use super::header::MAX_L1_BYTES;
use super::snapshot::Snapshot;
use super::table::L1Entry;
use super::words::decode_words;
use super::FormatError;
use crate::error::{Error, Result};
use crate::io::HostFile;

/// Bytes of snapshot L1 tables kept in memory by default.
pub const DEFAULT_CACHE_BYTES: u64 = 8 << 20;

/// Pieces kept at least, whatever the budget.
const MIN_PIECES: usize = 4;

/// A snapshot's L1 table: where it is and how many entries it has, checked against the file but
/// not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotL1 {
    offset: u64,
    entries: u64,
}

/// Pieces of snapshot L1 tables, one cluster each, keyed by host offset: snapshots that share a
/// table (or a part of one) share its pieces. Pieces are raw words; an entry is checked when it is
/// used (the end of a table's last piece is not the table's).
///
/// Lock order: taken while the image's metadata lock is held (a read maps through a snapshot's
/// table under it), never the other way round.
#[derive(Debug)]
pub(super) struct SnapshotTables {
    pieces: Mutex<LruCache<u64, Arc<Vec<u64>>>>,
    cluster_bits: u32,
}

impl SnapshotTables {
    pub fn new(cluster_bits: u32, cache_bytes: u64) -> Self {
        SnapshotTables {
            pieces: Mutex::new(LruCache::new(Self::pieces_for(cache_bytes, cluster_bits))),
            cluster_bits,
        }
    }

    fn pieces_for(cache_bytes: u64, cluster_bits: u32) -> NonZeroUsize {
        NonZeroUsize::new(((cache_bytes >> cluster_bits) as usize).max(MIN_PIECES))
            .unwrap_or(NonZeroUsize::MIN)
    }

    /// Keep about `cache_bytes` of pieces from now on.
    pub fn set_cache_bytes(&self, cache_bytes: u64) {
        self.pieces
            .lock()
            .resize(Self::pieces_for(cache_bytes, self.cluster_bits));
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes of pieces in memory now.
    pub fn cached_bytes(&self) -> u64 {
        (self.pieces.lock().len() as u64) << self.cluster_bits
    }
}

impl SnapshotTables {
    /// The L1 table of an internal snapshot of the image in `file`, checked like the active one:
    /// no larger than QEMU allows, cluster-aligned, inside the file. Its entries are checked when
    /// they are read.
    pub(super) fn table(&self, file: &HostFile, snapshot: &Snapshot) -> Result<SnapshotL1> {
        let cs = self.cluster_size();
        let bytes = u64::from(snapshot.l1_size) * 8;
        if bytes > MAX_L1_BYTES {
            return Err(Error::new(
                file.path(),
                FormatError::TooLarge {
                    what: "snapshot L1 table",
                    size: bytes,
                    limit: MAX_L1_BYTES,
                },
            ));
        }
        if snapshot.l1_table_offset % cs != 0 {
            return Err(Error::new(
                file.path(),
                FormatError::Misaligned {
                    what: "snapshot L1 table",
                    offset: snapshot.l1_table_offset,
                    align: cs,
                },
            ));
        }
        let file_len = file.len()?;
        if snapshot
            .l1_table_offset
            .checked_add(bytes)
            .is_none_or(|end| end > file_len)
        {
            return Err(Error::new(
                file.path(),
                FormatError::BeyondEnd {
                    what: "snapshot L1 table",
                    offset: snapshot.l1_table_offset,
                    len: bytes,
                    file_len,
                },
            ));
        }
        Ok(SnapshotL1 {
            offset: snapshot.l1_table_offset,
            entries: u64::from(snapshot.l1_size),
        })
    }

    /// Entry `index` of the snapshot table `l1` (None past its end), read through the cache and
    /// checked: an L2 table must be cluster-aligned.
    pub(super) fn entry(
        &self,
        file: &HostFile,
        l1: &SnapshotL1,
        index: u64,
    ) -> Result<Option<u64>> {
        if index >= l1.entries {
            return Ok(None);
        }
        let per_piece = 1u64 << (self.cluster_bits - 3);
        let at = l1.offset + (index / per_piece) * (per_piece * 8);
        let word = {
            let mut pieces = self.pieces.lock();
            let piece = match pieces.get(&at) {
                Some(p) => p.clone(),
                None => {
                    // Inside the file (`snapshot_l1`); the piece may reach past its end: zeros.
                    let mut raw = vec![0u8; 1 << self.cluster_bits];
                    file.read_at(at, &mut raw)?;
                    let piece = Arc::new(decode_words(&raw));
                    pieces.put(at, piece.clone());
                    piece
                }
            };
            piece[(index % per_piece) as usize]
        };
        let cs = self.cluster_size();
        let l2 = L1Entry(word).l2_offset();
        if l2 % cs != 0 {
            return Err(Error::new(
                file.path(),
                FormatError::Misaligned {
                    what: "L2 table",
                    offset: l2,
                    align: cs,
                },
            ));
        }
        Ok(Some(word))
    }
}

#[cfg(test)]
#[path = "snapshot_l1/tests.rs"]
mod tests;
