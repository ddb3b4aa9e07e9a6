//! L1 and L2 table entries as typed values. Every mask and flag of the on-disk entries is here
//! (the subcluster count is the layout's).

use super::layout::{Layout, SUBCLUSTERS};
use super::FormatError;

/// Bits 9..=55 of L1 entries, standard L2 entries and refcount table entries: a host offset.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: the cluster's refcount is exactly one, so it may be written in place.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of standard L2 entries (v3, without extended L2): the cluster reads as zeros.
pub const ZERO: u64 = 1;
/// Every subcluster, as a mask of one half of the extended L2 bitmap.
pub const ALL_SUBCLUSTERS: u32 = u32::MAX;

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

    /// Store this entry as entry `i` of a decoded L2 table: the inverse of [`L2Entry::at`]. The
    /// bitmap is stored only with extended L2.
    pub fn store_at(self, table: &mut [u64], i: usize, extended: bool) {
        if extended {
            table[2 * i] = self.word;
            table[2 * i + 1] = self.bitmap;
        } else {
            table[i] = self.word;
        }
    }

    /// The extended L2 bitmap word: one bit per subcluster, "allocated" in the low half, "reads as
    /// zero" in the high half.
    pub const fn bitmap_word(alloc: u32, zero: u32) -> u64 {
        (alloc as u64) | ((zero as u64) << 32)
    }

    /// Extended L2: the subclusters allocated in this layer.
    pub fn alloc_bits(self) -> u32 {
        self.bitmap as u32
    }

    /// Extended L2: the subclusters that read as zeros.
    pub fn zero_bits(self) -> u32 {
        (self.bitmap >> 32) as u32
    }

    /// A data cluster at `host` that only this table references (COPIED, so later writes go in
    /// place); with extended L2 all its subclusters are allocated.
    pub fn data(host: u64, layout: &Layout) -> L2Entry {
        debug_assert_eq!(host & !OFFSET_MASK, 0, "unaligned host cluster {host:#x}");
        L2Entry {
            word: host | COPIED,
            bitmap: if layout.extended_l2 {
                Self::bitmap_word(ALL_SUBCLUSTERS, 0)
            } else {
                0
            },
        }
    }

    /// A cluster with no host cluster that reads as zeros: all subclusters zero (extended L2), the
    /// ZERO flag (version 3). Version 2 has no zero clusters: there it is unallocated, so the
    /// backing layer shows through (as QEMU's discard of a v2 image does).
    pub fn zero(layout: &Layout) -> L2Entry {
        if layout.extended_l2 {
            L2Entry {
                word: 0,
                bitmap: Self::bitmap_word(0, ALL_SUBCLUSTERS),
            }
        } else if layout.version >= 3 {
            L2Entry {
                word: ZERO,
                bitmap: 0,
            }
        } else {
            L2Entry::UNALLOCATED
        }
    }

    /// Extended L2: this entry once the subclusters `written` hold data written in place (they
    /// are allocated and no longer read as zeros).
    pub fn with_subclusters_written(self, written: u32) -> L2Entry {
        L2Entry {
            word: self.word,
            bitmap: Self::bitmap_word(self.alloc_bits() | written, self.zero_bits() & !written),
        }
    }

    /// A standard entry once its cluster is written in place: it no longer reads as zeros (version
    /// 3; in version 2 bit 0 means nothing and is left alone).
    pub fn without_zero_flag(self, layout: &Layout) -> L2Entry {
        L2Entry {
            word: if layout.version >= 3 {
                self.word & !ZERO
            } else {
                self.word
            },
            bitmap: self.bitmap,
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
        let alloc = self.alloc_bits();
        let zero = self.zero_bits();
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
    fn new_data_entries_are_copied_and_fully_allocated() {
        let e = L2Entry::data(0x5_0000, &layout(16, false));
        assert_eq!(
            e,
            L2Entry {
                word: 0x8000_0000_0005_0000,
                bitmap: 0
            }
        );
        let l = layout(16, true);
        let e = L2Entry::data(0x5_0000, &l);
        assert_eq!((e.word, e.bitmap), (0x8000_0000_0005_0000, 0xffff_ffff));
        assert_eq!(
            e.source(&l, 0, 0).unwrap(),
            (ClusterSource::Data { host: 0x5_0000 }, 32)
        );
    }

    #[test]
    fn zero_entries_read_as_zeros_and_hold_no_cluster() {
        let l = layout(16, false);
        assert_eq!(L2Entry::zero(&l), L2Entry { word: 1, bitmap: 0 });
        assert_eq!(
            L2Entry::zero(&l).source(&l, 0, 0).unwrap().0,
            ClusterSource::Zero
        );
        let l = layout(16, true);
        let e = L2Entry::zero(&l);
        assert_eq!((e.word, e.bitmap), (0, 0xffff_ffff_0000_0000));
        assert_eq!(e.source(&l, 0, 0).unwrap(), (ClusterSource::Zero, 32));
        // Version 2 has no zero flag: the entry is unallocated.
        let l = Layout::new(16, 2, false);
        assert_eq!(L2Entry::zero(&l), L2Entry::UNALLOCATED);
    }

    #[test]
    fn the_bitmap_word_holds_allocated_bits_low_and_zero_bits_high() {
        let word = L2Entry::bitmap_word(0x8000_0001, 0x0000_0006);
        assert_eq!(word, 0x0000_0006_8000_0001);
        let e = L2Entry {
            word: 0,
            bitmap: word,
        };
        assert_eq!((e.alloc_bits(), e.zero_bits()), (0x8000_0001, 6));
    }

    #[test]
    fn writing_subclusters_in_place_allocates_them_and_clears_their_zero_bits() {
        let e = L2Entry {
            word: 0x3_0000 | COPIED,
            bitmap: L2Entry::bitmap_word(0b0001, 0b0110),
        };
        let w = e.with_subclusters_written(0b0100);
        assert_eq!(w.word, e.word);
        assert_eq!((w.alloc_bits(), w.zero_bits()), (0b0101, 0b0010));
    }

    #[test]
    fn writing_a_zero_cluster_in_place_drops_the_zero_flag_in_version_3_only() {
        let e = L2Entry {
            word: 0x5_0000 | COPIED | ZERO,
            bitmap: 0,
        };
        assert_eq!(
            e.without_zero_flag(&layout(16, false)).word,
            0x5_0000 | COPIED
        );
        assert_eq!(e.without_zero_flag(&Layout::new(16, 2, false)), e);
    }

    #[test]
    fn storing_an_entry_is_the_inverse_of_reading_it() {
        let e = L2Entry {
            word: 0x7_0000 | COPIED,
            bitmap: 0x1234_5678_9abc_def0,
        };
        let mut table = vec![0u64; 8];
        e.store_at(&mut table, 1, true);
        assert_eq!(table, [0, 0, e.word, e.bitmap, 0, 0, 0, 0]);
        assert_eq!(L2Entry::at(&table, 1, true), (2, e));
        let mut table = vec![0u64; 4];
        e.store_at(&mut table, 3, false);
        assert_eq!(table, [0, 0, 0, e.word]);
        assert_eq!(
            L2Entry::at(&table, 3, false),
            (
                3,
                L2Entry {
                    word: e.word,
                    bitmap: 0
                }
            )
        );
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
