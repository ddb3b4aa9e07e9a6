//! Geometry of one qcow2 image: how a guest offset splits into L1 index, L2 index and cluster offset,
//! and where the fields of a compressed-cluster descriptor lie.

/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// The sizes derived from `cluster_bits`, the version and the L2 entry width.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub cluster_bits: u32,
    pub version: u32,
    pub extended_l2: bool,
}

impl Layout {
    pub fn new(cluster_bits: u32, version: u32, extended_l2: bool) -> Self {
        Layout {
            cluster_bits,
            version,
            extended_l2,
        }
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes per L2 entry: 8, or 16 with the subcluster bitmap.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }

    /// Guest bytes one L2 table maps.
    pub fn l2_span(&self) -> u64 {
        self.l2_entries() * self.cluster_size()
    }

    pub fn l1_index(&self, guest: u64) -> u64 {
        guest / self.l2_span()
    }

    pub fn l2_index(&self, guest: u64) -> u64 {
        (guest >> self.cluster_bits) % self.l2_entries()
    }

    pub fn offset_in_cluster(&self, guest: u64) -> u64 {
        guest & (self.cluster_size() - 1)
    }

    pub fn subclusters(&self) -> u32 {
        if self.extended_l2 {
            SUBCLUSTERS
        } else {
            1
        }
    }

    pub fn subcluster_size(&self) -> u64 {
        self.cluster_size() / u64::from(self.subclusters())
    }

    /// Compressed descriptors: the host offset fills bits 0..x, the sector count bits x..62, with
    /// x = 62 - (cluster_bits - 8).
    pub fn compressed_size_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }

    pub fn compressed_offset_mask(&self) -> u64 {
        (1u64 << self.compressed_size_shift()) - 1
    }

    pub fn compressed_size_mask(&self) -> u64 {
        (1u64 << (self.cluster_bits - 8)) - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_guest_offsets() {
        let l = Layout::new(16, 3, false);
        assert_eq!(l.l2_entries(), 8192);
        assert_eq!(l.l2_span(), 512 << 20);
        let g = (3u64 << 29) + (5 << 16) + 77;
        assert_eq!(
            (l.l1_index(g), l.l2_index(g), l.offset_in_cluster(g)),
            (3, 5, 77)
        );
    }

    #[test]
    fn extended_l2_halves_the_entries_per_table() {
        let l = Layout::new(16, 3, true);
        assert_eq!(l.l2_entries(), 4096);
        assert_eq!(l.subcluster_size(), 2048);
    }

    #[test]
    fn small_clusters_map_small_spans() {
        let l = Layout::new(9, 3, false);
        assert_eq!(l.l2_span(), 64 * 512);
        assert_eq!(l.compressed_size_shift(), 61);
    }
}
