//! Which host clusters hold metadata (header, L1 and L2 tables, refcount table and blocks, snapshot
//! table and snapshot L1 tables, the LUKS area). Built at open: overlapping structures mean a damaged
//! image (refused for writing), and a data cluster that points into metadata reads as EIO and is never
//! written over.

use std::collections::{HashMap, HashSet};

use super::header::Header;
use super::snapshot::Snapshot;
use super::table::{L1Entry, OFFSET_MASK};
use super::words::read_words;
use super::FormatError;
use crate::error::Result;
use crate::io::HostFile;

/// Snapshot L1 tables read at open, at most, to find the L2 tables they use (a table shared by
/// several snapshots counts once).
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
        let mut followed = HashSet::new();
        for s in snapshots {
            let len = u64::from(s.l1_size) * 8;
            let again = followed.contains(&(s.l1_table_offset, s.l1_size));
            if (!again && len > budget) || s.l1_table_offset % cs != 0 {
                log::warn!(
                    "{}: snapshot '{}' L1 table not checked for overlaps",
                    file.path().display(),
                    s.name
                );
                continue;
            }
            // Recorded for every snapshot: a table named twice is an overlap.
            map.add(MetaKind::SnapshotL1, s.l1_table_offset, len);
            if again {
                continue;
            }
            budget -= len;
            followed.insert((s.l1_table_offset, s.l1_size));
            map.add_snapshot_l2s(file, s.l1_table_offset, u64::from(s.l1_size), cs);
        }
        Ok(map)
    }

    /// Record the L2 tables of the snapshot L1 table of `entries` at `offset`, read a piece at a
    /// time (a table may be 32 MiB); one that cannot be read is followed as far as it can.
    fn add_snapshot_l2s(&mut self, file: &HostFile, offset: u64, entries: u64, cs: u64) {
        const PIECE_WORDS: u64 = 1 << 17;
        let mut done = 0;
        while done < entries {
            let n = PIECE_WORDS.min(entries - done);
            let Ok(piece) = read_words(file, offset + done * 8, n as usize) else {
                return;
            };
            for word in piece {
                self.add_l2(L1Entry(word).l2_offset(), cs);
            }
            done += n;
        }
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

    /// Every metadata cluster inside the file, (cluster index, what it holds), in no order.
    pub fn clusters(&self) -> impl Iterator<Item = (u64, &'static str)> + '_ {
        self.clusters.iter().map(|(&c, &kind)| (c, kind.name()))
    }

    /// Does the host cluster containing `offset` hold metadata?
    pub fn contains(&self, offset: u64) -> bool {
        self.clusters.contains_key(&(offset >> self.cluster_bits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::table::COPIED;
    use crate::qcow2::tiny::{self, TinyImage, L1_TABLE, REFCOUNT_BLOCK, REFCOUNT_TABLE};

    /// The cluster size of `map`.
    const CS_64K: u64 = 1 << 16;

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

    /// 4 KiB clusters.
    const CS: u64 = 1 << 12;

    /// The map `build` makes of `t` with these snapshots (and the header changed by `edit`).
    fn built(t: &TinyImage, snapshots: &[Snapshot], edit: impl FnOnce(&mut Header)) -> MetadataMap {
        let bytes = t.bytes();
        let mut header = Header::parse(&bytes[..CS as usize], bytes.len() as u64).unwrap();
        edit(&mut header);
        let file = HostFile::in_memory(std::path::Path::new(tiny::PATH), bytes);
        let l1 = read_words(&file, header.l1_table_offset, header.l1_size as usize).unwrap();
        MetadataMap::build(&file, &header, &l1, snapshots).unwrap()
    }

    fn overlap(m: &MetadataMap) -> Option<(&'static str, u64)> {
        match &m.overlap {
            Some(FormatError::Overlap { what, offset }) => Some((what, *offset)),
            Some(other) => panic!("{other}"),
            None => None,
        }
    }

    #[test]
    fn build_records_every_structure_of_an_image_and_no_data_cluster() {
        let mut t = TinyImage::new(12, 64 << 10);
        let data = t.data(0, &[1; CS as usize]);
        let l2 = t.l2_for(0);
        let m = built(&t, &[], |_| {});
        assert_eq!(overlap(&m), None);
        for cluster in [0, REFCOUNT_TABLE, REFCOUNT_BLOCK, L1_TABLE] {
            assert!(m.contains(cluster * CS + 100), "{cluster}");
        }
        assert!(m.contains(l2));
        assert!(!m.contains(data));
        assert_eq!(m.clusters.get(&(l2 / CS)), Some(&MetaKind::L2Table));
        assert_eq!(m.clusters.len(), 5);
    }

    #[test]
    fn build_records_the_snapshot_table_and_the_luks_area_over_every_cluster_they_touch() {
        let mut t = TinyImage::new(12, 64 << 10);
        let table = t.cluster();
        let luks = t.cluster();
        t.cluster();
        let after = t.cluster();
        let m = built(&t, &[], |h| {
            h.nb_snapshots = 2;
            h.snapshots_offset = table;
            h.fde_header = Some((luks, CS + 1));
        });
        assert_eq!(overlap(&m), None);
        assert_eq!(
            m.clusters.get(&(table / CS)),
            Some(&MetaKind::SnapshotTable)
        );
        assert!(m.contains(luks) && m.contains(luks + CS));
        assert!(!m.contains(after));
    }

    #[test]
    fn an_l2_table_shared_by_a_snapshot_is_not_an_overlap() {
        let mut t = TinyImage::new(12, 64 << 10);
        let l2 = t.l2_for(0);
        let snap_l1 = t.cluster();
        t.put(snap_l1, &(l2 | COPIED).to_be_bytes());
        let m = built(&t, &[tiny::snapshot(snap_l1, 1)], |_| {});
        assert_eq!(overlap(&m), None);
        assert_eq!(m.clusters.get(&(snap_l1 / CS)), Some(&MetaKind::SnapshotL1));
        assert_eq!(m.clusters.get(&(l2 / CS)), Some(&MetaKind::L2Table));
    }

    #[test]
    fn a_snapshot_l2_table_inside_the_l1_table_is_an_overlap() {
        let mut t = TinyImage::new(12, 64 << 10);
        let snap_l1 = t.cluster();
        t.put(snap_l1, &((L1_TABLE * CS) | COPIED).to_be_bytes());
        let m = built(&t, &[tiny::snapshot(snap_l1, 1)], |_| {});
        assert_eq!(overlap(&m), Some(("L2 table", L1_TABLE * CS)));
    }

    #[test]
    fn a_snapshot_l1_table_inside_a_refcount_block_is_an_overlap() {
        let t = TinyImage::new(12, 64 << 10);
        let m = built(&t, &[tiny::snapshot(REFCOUNT_BLOCK * CS, 4)], |_| {});
        assert_eq!(
            overlap(&m),
            Some(("snapshot L1 table", REFCOUNT_BLOCK * CS))
        );
    }

    #[test]
    fn a_misaligned_snapshot_l1_table_is_neither_recorded_nor_followed() {
        let mut t = TinyImage::new(12, 64 << 10);
        let snap_l1 = t.cluster();
        // Followed, its entry would put an L2 table into the refcount block.
        t.put(
            snap_l1 + 512,
            &((REFCOUNT_BLOCK * CS) | COPIED).to_be_bytes(),
        );
        let m = built(&t, &[tiny::snapshot(snap_l1 + 512, 1)], |_| {});
        assert_eq!(overlap(&m), None);
        assert!(!m.contains(snap_l1));
    }

    #[test]
    fn an_l1_table_over_the_refcount_table_is_an_overlap() {
        let t = TinyImage::new(12, 64 << 10);
        let m = built(&t, &[], |h| h.l1_table_offset = REFCOUNT_TABLE * CS);
        assert_eq!(overlap(&m), Some(("refcount table", REFCOUNT_TABLE * CS)));
    }

    #[test]
    fn the_same_refcount_block_or_l2_table_twice_is_not_an_overlap_other_kinds_are() {
        let mut m = map(8);
        m.add(MetaKind::RefcountBlock, 2 * CS_64K, 1);
        m.add(MetaKind::RefcountBlock, 2 * CS_64K, 1);
        m.add(MetaKind::L2Table, 3 * CS_64K, 1);
        m.add(MetaKind::L2Table, 3 * CS_64K, 1);
        assert_eq!(overlap(&m), None);
        m.add(MetaKind::L1Table, 4 * CS_64K, 8);
        m.add(MetaKind::L1Table, 4 * CS_64K, 8);
        assert_eq!(overlap(&m), Some(("L1 table", 4 * CS_64K)));
        // Only the first is kept.
        m.add(MetaKind::Header, 2 * CS_64K, 1);
        assert_eq!(overlap(&m), Some(("L1 table", 4 * CS_64K)));
    }

    #[test]
    fn adds_and_removes_whole_clusters_of_byte_ranges() {
        let mut m = map(8);
        m.add(MetaKind::SnapshotTable, CS_64K - 1, 2);
        assert!(m.contains(0) && m.contains(CS_64K) && !m.contains(2 * CS_64K));
        m.add(MetaKind::Luks, 5 * CS_64K, 0);
        assert!(!m.contains(5 * CS_64K));
        // A range of one byte, and one of none, remove the cluster they are in.
        m.remove_range(CS_64K + 7, 1);
        assert!(m.contains(0) && !m.contains(CS_64K));
        m.remove_range(100, 0);
        assert!(!m.contains(0));
    }

    #[test]
    fn tracks_clusters_past_the_old_end_only_once_the_end_moves() {
        let mut m = map(4);
        m.add(MetaKind::L2Table, 5 * CS_64K, CS_64K);
        assert!(!m.contains(5 * CS_64K));
        m.set_end(6);
        m.add(MetaKind::L2Table, 5 * CS_64K, CS_64K);
        assert!(m.contains(5 * CS_64K));
        // The end never moves back: the cluster stays tracked and removable.
        m.set_end(2);
        m.add(MetaKind::L2Table, 4 * CS_64K, 1);
        assert!(m.contains(4 * CS_64K));
        m.remove_range(5 * CS_64K, CS_64K);
        assert!(!m.contains(5 * CS_64K));
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
