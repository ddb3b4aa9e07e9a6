//! Which host clusters hold metadata (header, L1 and L2 tables, refcount table and blocks, snapshot
//! table and snapshot L1 tables, the LUKS area). Built at open: overlapping structures mean a damaged
//! image (refused for writing), and a data cluster that points into metadata reads as EIO and is never
//! written over.

use std::collections::HashMap;

use super::header::Header;
use super::snapshot::Snapshot;
use super::table::{L1Entry, OFFSET_MASK};
use super::words::read_words;
use super::FormatError;
use crate::error::Result;
use crate::io::HostFile;

/// Snapshot L1 tables read at open, at most, to find the L2 tables they use.
const MAX_SNAPSHOT_L1_BYTES: u64 = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaKind {
    Header,
    L1Table,
    L2Table,
    RefcountTable,
    RefcountBlock,
    SnapshotTable,
    SnapshotL1,
    Luks,
}

impl MetaKind {
    fn name(self) -> &'static str {
        match self {
            MetaKind::Header => "header",
            MetaKind::L1Table => "L1 table",
            MetaKind::L2Table => "L2 table",
            MetaKind::RefcountTable => "refcount table",
            MetaKind::RefcountBlock => "refcount block",
            MetaKind::SnapshotTable => "snapshot table",
            MetaKind::SnapshotL1 => "snapshot L1 table",
            MetaKind::Luks => "LUKS header",
        }
    }
}

/// Host clusters known to hold metadata.
#[derive(Debug, Default)]
pub struct MetadataMap {
    clusters: HashMap<u64, MetaKind>,
    cluster_bits: u32,
    /// Clusters past the end of the file are not tracked (nothing can be read from them).
    end_cluster: u64,
    /// The first overlap found while building, if any.
    pub overlap: Option<FormatError>,
}

impl MetadataMap {
    pub fn build(
        file: &HostFile,
        header: &Header,
        l1: &[u64],
        snapshots: &[Snapshot],
    ) -> Result<Self> {
        let cs = header.cluster_size();
        let mut map = MetadataMap {
            cluster_bits: header.cluster_bits,
            end_cluster: file.len()?.div_ceil(cs),
            ..Default::default()
        };
        map.add(MetaKind::Header, 0, cs);
        map.add(
            MetaKind::L1Table,
            header.l1_table_offset,
            u64::from(header.l1_size) * 8,
        );
        let rt_len = u64::from(header.refcount_table_clusters) * cs;
        map.add(
            MetaKind::RefcountTable,
            header.refcount_table_offset,
            rt_len,
        );
        for entry in read_words(file, header.refcount_table_offset, rt_len as usize / 8)? {
            let block = entry & OFFSET_MASK;
            if block != 0 {
                map.add(MetaKind::RefcountBlock, block, cs);
            }
        }
        for &word in l1 {
            map.add_l2(L1Entry(word).l2_offset(), cs);
        }
        if let Some((offset, len)) = header.fde_header {
            map.add(MetaKind::Luks, offset, len);
        }
        if header.nb_snapshots > 0 {
            map.add(
                MetaKind::SnapshotTable,
                header.snapshots_offset,
                40 * u64::from(header.nb_snapshots),
            );
        }
        let mut budget = MAX_SNAPSHOT_L1_BYTES;
        for s in snapshots {
            let len = u64::from(s.l1_size) * 8;
            if len > budget || s.l1_table_offset % cs != 0 {
                log::warn!(
                    "{}: snapshot '{}' L1 table not checked for overlaps",
                    file.path().display(),
                    s.name
                );
                continue;
            }
            budget -= len;
            map.add(MetaKind::SnapshotL1, s.l1_table_offset, len);
            let Ok(table) = read_words(file, s.l1_table_offset, s.l1_size as usize) else {
                continue;
            };
            for word in table {
                map.add_l2(L1Entry(word).l2_offset(), cs);
            }
        }
        Ok(map)
    }

    fn add_l2(&mut self, offset: u64, cs: u64) {
        if offset != 0 {
            // L2 tables may be shared between the active L1 and snapshots.
            if self.clusters.get(&(offset >> self.cluster_bits)) != Some(&MetaKind::L2Table) {
                self.add(MetaKind::L2Table, offset, cs);
            }
        }
    }

    /// Record [offset, offset + len) as `kind`; remember the first collision with other metadata.
    pub fn add(&mut self, kind: MetaKind, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset >> self.cluster_bits;
        let last = (offset.saturating_add(len) - 1) >> self.cluster_bits;
        // Bounded by the file: a hostile length cannot make this loop (or the map) large.
        for c in first..=last.min(self.end_cluster.saturating_sub(1)) {
            if let Some(previous) = self.clusters.insert(c, kind) {
                // The same structure recorded twice (an L2 table shared with a snapshot, or
                // registered again after a write) is not an overlap.
                let same_kind =
                    previous == kind && matches!(kind, MetaKind::RefcountBlock | MetaKind::L2Table);
                if !same_kind && self.overlap.is_none() {
                    self.overlap = Some(FormatError::Overlap {
                        what: kind.name(),
                        offset: c << self.cluster_bits,
                    });
                    log::warn!(
                        "{} overlaps a {} at {:#x}",
                        kind.name(),
                        previous.name(),
                        c << self.cluster_bits
                    );
                }
            }
        }
    }

    /// The file grew (the allocator appended clusters): track metadata up to `end_cluster`.
    pub fn set_end(&mut self, end_cluster: u64) {
        self.end_cluster = self.end_cluster.max(end_cluster);
    }

    pub fn remove_range(&mut self, offset: u64, len: u64) {
        let first = offset >> self.cluster_bits;
        let last = (offset.saturating_add(len.max(1)) - 1) >> self.cluster_bits;
        // Nothing is recorded past the end (see `add`), so nothing there needs removing.
        for c in first..=last.min(self.end_cluster.saturating_sub(1)) {
            self.clusters.remove(&c);
        }
    }

    /// Does the host cluster containing `offset` hold metadata?
    pub fn contains(&self, offset: u64) -> bool {
        self.clusters.contains_key(&(offset >> self.cluster_bits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(clusters: u64) -> MetadataMap {
        MetadataMap {
            cluster_bits: 16,
            end_cluster: clusters,
            ..Default::default()
        }
    }

    #[test]
    fn bounds_hostile_ranges_by_the_end_of_the_file() {
        let mut m = map(4);
        m.add(MetaKind::Luks, u64::MAX - 10, u64::MAX);
        m.add(MetaKind::SnapshotTable, 1 << 16, u64::MAX);
        m.add(MetaKind::L2Table, !0xffff_u64, 1 << 16);
        assert!(m.clusters.len() <= 4);
        assert!(m.contains(3 << 16));
        // Removing a range as long as the address space visits only the tracked clusters.
        m.remove_range(0, u64::MAX);
        assert!(m.clusters.is_empty());
    }

    #[test]
    fn reports_the_first_overlap() {
        let mut m = map(8);
        m.add(MetaKind::L1Table, 2 << 16, 8);
        m.add(MetaKind::RefcountBlock, 2 << 16, 1 << 16);
        assert!(matches!(
            m.overlap,
            Some(FormatError::Overlap {
                what: "refcount block",
                offset: 0x20000
            })
        ));
    }
}
