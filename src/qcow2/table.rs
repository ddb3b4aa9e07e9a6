//! L1 and L2 table entries as typed values. Every mask and flag of the on-disk entries is here.

use super::layout::Layout;
use super::FormatError;

/// Bits 9..=55 of L1 entries, standard L2 entries and refcount table entries: a host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: the cluster's refcount is exactly one, so it may be written in place.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of standard L2 entries (v3, without extended L2): the cluster reads as zeros.
pub const ZERO: u64 = 1;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// An L1 entry: where the L2 table for 1 << (cluster_bits + l2_bits) bytes of guest space lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L1Entry(pub u64);

impl L1Entry {
    pub fn l2_offset(self) -> u64 {
        self.0 & OFFSET_MASK
    }

    pub fn is_copied(self) -> bool {
        self.0 & COPIED != 0
    }

    pub fn new(l2_offset: u64) -> Self {
        L1Entry(l2_offset | COPIED)
    }
}

/// What an L2 entry (with its subcluster bitmap, for extended L2) says about one guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Entry {
    pub word: u64,
    /// Extended L2 only: low 32 bits "allocated", high 32 bits "reads as zero", per subcluster.
    pub bitmap: u64,
}

/// Where the bytes of one guest cluster, or of one run of subclusters, come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterSource {
    /// Not in this layer: read the backing layer (or zeros when there is none).
    Backing,
    Zero,
    /// Plain (possibly encrypted) data at this host offset of the run's first byte.
    Data {
        host: u64,
    },
    /// A compressed cluster: `size` bytes at `host` hold the whole cluster.
    Compressed {
        host: u64,
        size: u64,
    },
}

impl L2Entry {
    pub const UNALLOCATED: L2Entry = L2Entry { word: 0, bitmap: 0 };

    /// Entry `i` of a decoded L2 table and the index of its first word (two words per entry with
    /// extended L2).
    pub fn at(table: &[u64], i: usize, extended: bool) -> (usize, L2Entry) {
        if extended {
            (
                2 * i,
                L2Entry {
                    word: table[2 * i],
                    bitmap: table[2 * i + 1],
                },
            )
        } else {
            (
                i,
                L2Entry {
                    word: table[i],
                    bitmap: 0,
                },
            )
        }
    }

    pub fn is_compressed(self) -> bool {
        self.word & COMPRESSED != 0
    }

    pub fn is_copied(self) -> bool {
        self.word & COPIED != 0
    }

    /// Host cluster offset of a standard (uncompressed) entry; 0 if none.
    pub fn host_cluster(self) -> u64 {
        self.word & OFFSET_MASK
    }

    /// The host byte range a compressed entry covers: (offset, length).
    pub fn compressed_range(self, layout: &Layout) -> (u64, u64) {
        let offset = self.word & layout.compressed_offset_mask();
        let sectors =
            ((self.word >> layout.compressed_size_shift()) & layout.compressed_size_mask()) + 1;
        (offset, sectors * 512 - (offset & 511))
    }

    /// Decode the entry for the subcluster `sub` (0 without extended L2), returning its source and
    /// how many subclusters from `sub` on share it. `guest` is for error messages only.
    pub fn source(
        self,
        layout: &Layout,
        sub: u32,
        guest: u64,
    ) -> Result<(ClusterSource, u32), FormatError> {
        let bad = |why| FormatError::BadL2Entry { guest, why };
        if self.is_compressed() {
            let (host, size) = self.compressed_range(layout);
            if host == 0 {
                return Err(bad("compressed cluster at host offset 0"));
            }
            let runs = layout.subclusters() - sub;
            return Ok((ClusterSource::Compressed { host, size }, runs));
        }
        let host = self.host_cluster();
        if host % layout.cluster_size() != 0 {
            return Err(bad("host offset not aligned to the cluster size"));
        }
        if !layout.extended_l2 {
            let source = if self.word & ZERO != 0 && layout.version >= 3 {
                ClusterSource::Zero
            } else if host == 0 {
                ClusterSource::Backing
            } else {
                ClusterSource::Data { host }
            };
            return Ok((source, 1));
        }
        let alloc = self.bitmap as u32;
        let zero = (self.bitmap >> 32) as u32;
        if alloc & zero != 0 {
            return Err(bad("a subcluster is both allocated and zero"));
        }
        if alloc != 0 && host == 0 {
            return Err(bad("allocated subclusters without a host cluster"));
        }
        let state = |i: u32| (alloc >> i & 1, zero >> i & 1);
        let first = state(sub);
        let mut n = 1;
        while sub + n < SUBCLUSTERS && state(sub + n) == first {
            n += 1;
        }
        let source = match first {
            (1, _) => ClusterSource::Data {
                host: host + u64::from(sub) * layout.subcluster_size(),
            },
            (_, 1) => ClusterSource::Zero,
            _ => ClusterSource::Backing,
        };
        Ok((source, n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(bits: u32, extended: bool) -> Layout {
        Layout::new(bits, 3, extended)
    }

    #[test]
    fn decodes_unallocated_zero_and_data_entries() {
        let l = layout(16, false);
        let src = |w| L2Entry { word: w, bitmap: 0 }.source(&l, 0, 0).unwrap().0;
        assert_eq!(src(0), ClusterSource::Backing);
        assert_eq!(src(ZERO), ClusterSource::Zero);
        assert_eq!(src(0x5_0000 | ZERO | COPIED), ClusterSource::Zero);
        assert_eq!(
            src(0x5_0000 | COPIED),
            ClusterSource::Data { host: 0x5_0000 }
        );
    }

    #[test]
    fn v2_images_have_no_zero_flag() {
        let l = Layout::new(16, 2, false);
        let e = L2Entry {
            word: 0x5_0000 | ZERO,
            bitmap: 0,
        };
        assert_eq!(
            e.source(&l, 0, 0).unwrap().0,
            ClusterSource::Data { host: 0x5_0000 }
        );
    }

    #[test]
    fn rejects_unaligned_data_offsets() {
        let l = layout(16, false);
        let e = L2Entry {
            word: 0x5_0200,
            bitmap: 0,
        };
        assert!(e.source(&l, 0, 0).is_err());
    }

    #[test]
    fn decodes_compressed_descriptors() {
        // 64 KiB clusters: offset in bits 0..54, additional sectors in bits 54..62.
        let l = layout(16, false);
        let word = COMPRESSED | (3u64 << 54) | 0x1_0123;
        let e = L2Entry { word, bitmap: 0 };
        assert_eq!(e.compressed_range(&l), (0x1_0123, 4 * 512 - 0x123));
    }

    #[test]
    fn compressed_descriptors_with_every_bit_set_stay_in_range() {
        // The largest offset and sector count any cluster size can encode: the range ends far
        // below u64::MAX and is at most two clusters long (QEMU's bound), so reading it allocates
        // little and adding its length cannot overflow.
        for bits in 9..=21 {
            let l = layout(bits, false);
            let e = L2Entry {
                word: u64::MAX,
                bitmap: 0,
            };
            let (offset, len) = e.compressed_range(&l);
            assert!(offset < 1 << 62, "{bits}");
            assert!(len <= 2 << bits && len > 0, "{bits}: {len}");
            assert!(offset.checked_add(len).is_some());
        }
    }

    #[test]
    fn groups_subclusters_with_the_same_state() {
        let l = layout(16, true);
        // subclusters 0-1 allocated, 2 zero, rest unallocated
        let e = L2Entry {
            word: 0x3_0000 | COPIED,
            bitmap: 0b11 | (0b100u64 << 32),
        };
        assert_eq!(
            e.source(&l, 0, 0).unwrap(),
            (ClusterSource::Data { host: 0x3_0000 }, 2)
        );
        assert_eq!(
            e.source(&l, 1, 0).unwrap(),
            (
                ClusterSource::Data {
                    host: 0x3_0000 + 2048
                },
                1
            )
        );
        assert_eq!(e.source(&l, 2, 0).unwrap(), (ClusterSource::Zero, 1));
        assert_eq!(e.source(&l, 3, 0).unwrap(), (ClusterSource::Backing, 29));
    }

    #[test]
    fn rejects_subclusters_both_allocated_and_zero() {
        let l = layout(16, true);
        let e = L2Entry {
            word: 0x3_0000,
            bitmap: 1 | (1 << 32),
        };
        assert!(e.source(&l, 0, 0).is_err());
    }
}
