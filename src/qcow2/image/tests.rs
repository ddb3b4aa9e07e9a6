//! Unit tests of opening, mapping and deciding write targets, in memory: images built cluster by
//! cluster (`qcow2::tiny`). Reading is in `read_tests.rs`.

use super::*;
use crate::error::Problem;
use crate::qcow2::table::{COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use crate::qcow2::tiny::{self, TinyImage, L1_TABLE, REFCOUNT_BLOCK, REFCOUNT_TABLE};
use crate::qcow2::Compression;
use crate::qcow2::Durability;

#[path = "pin_tests.rs"]
mod pin_tests;
#[path = "qemu_images.rs"]
mod qemu_images;
#[path = "read_tests.rs"]
mod read_tests;

/// 4 KiB clusters: one L2 table maps 2 MiB.
const BITS: u32 = 12;
const CS: u64 = 1 << BITS;

/// The format error inside a crate error (a test failure if it is another kind).
fn format_error(e: &Error) -> &FormatError {
    match &e.problem {
        Problem::Format(f) => f,
        other => panic!("not a format error: {other}"),
    }
}

#[test]
fn opens_a_built_image_read_only_and_writable() {
    let mut t = TinyImage::new(BITS, 64 << 10);
    t.data(0, &[1; CS as usize]);
    for writable in [false, true] {
        let img = t.open(writable).unwrap();
        assert_eq!(img.virtual_size(), 64 << 10);
        assert_eq!(img.layout().cluster_size(), CS);
        assert_eq!(img.encryption(), Encryption::None);
        assert!(img.snapshots().is_empty());
        assert_eq!(img.path(), Path::new(tiny::PATH));
    }
}

#[test]
fn refuses_an_l2_table_offset_not_aligned_to_the_cluster_size() {
    let mut t = TinyImage::new(BITS, 64 << 10);
    let l2 = t.cluster();
    t.set_l1(0, (l2 + 512) | COPIED);
    let err = t.open(false).unwrap_err();
    assert!(
        matches!(
            format_error(&err),
            FormatError::Misaligned { what: "L2 table", offset, align: CS } if *offset == l2 + 512
        ),
        "{err}"
    );
    assert_eq!(err.path, Path::new(tiny::PATH));
}

#[test]
fn refuses_an_l2_table_past_the_end_of_the_file() {
    let mut t = TinyImage::new(BITS, 64 << 10);
    // The first cluster past the end (4 clusters), and the largest offset an entry can hold.
    for l2 in [4 * CS, OFFSET_MASK & !(CS - 1)] {
        t.set_l1(0, l2 | COPIED);
        for writable in [false, true] {
            let err = t.open(writable).unwrap_err();
            assert!(
                matches!(
                    format_error(&err),
                    FormatError::BeyondEnd { what: "L2 table", offset, len: CS, file_len }
                        if *offset == l2 && *file_len == 4 * CS
                ),
                "{err}"
            );
        }
    }
}

#[test]
fn an_l2_table_in_a_cluster_the_file_holds_only_partly_reads_zeros_past_the_end() {
    let mut t = TinyImage::new(BITS, 64 << 10);
    let l2 = t.cluster();
    t.set_l1(0, l2 | COPIED);
    let mut bytes = t.bytes();
    // Entry 0 is in the file, entry 1 (and the rest of the table) is past its end.
    bytes.truncate(l2 as usize + 8);
    bytes[l2 as usize..].copy_from_slice(&(ZERO).to_be_bytes());
    let img = tiny::open_bytes(bytes, false).unwrap();
    assert_eq!(img.map(0, CS).unwrap(), (ClusterSource::Zero, CS));
    assert_eq!(img.map(CS, CS).unwrap(), (ClusterSource::Backing, CS));
}

#[test]
fn refuses_overlapping_metadata_for_a_writable_open_only() {
    // An L2 table in the refcount block's cluster, then in the L1 table's.
    for shared in [REFCOUNT_BLOCK, L1_TABLE, REFCOUNT_TABLE] {
        let mut t = TinyImage::new(BITS, 64 << 10);
        t.set_l1(0, (shared * CS) | COPIED);
        let img = t.open(false).unwrap();
        assert_eq!(img.virtual_size(), 64 << 10);
        let err = t.open(true).unwrap_err();
        assert!(
            matches!(
                format_error(&err),
                FormatError::Overlap { what: "L2 table", offset } if *offset == shared * CS
            ),
            "{shared}: {err}"
        );
    }
}

#[test]
fn maps_guest_space_without_an_l2_table_as_backing_up_to_the_end_of_its_l1_entry() {
    let span = Layout::new(BITS, 3, false).l2_span();
    let mut t = TinyImage::new(BITS, 4 * span);
    t.data(2 * span, &[7; CS as usize]);
    let img = t.open(false).unwrap();
    assert_eq!(
        img.map(0, 10 * span).unwrap(),
        (ClusterSource::Backing, span)
    );
    assert_eq!(
        img.map(span + 100, 10 * span).unwrap(),
        (ClusterSource::Backing, span - 100)
    );
    assert_eq!(img.map(span, 300).unwrap(), (ClusterSource::Backing, 300));
    // Inside the L2 table of the third entry, an unallocated entry is one cluster long.
    assert_eq!(
        img.map(2 * span + CS, span).unwrap(),
        (ClusterSource::Backing, CS)
    );
}

#[test]
fn maps_a_data_cluster_to_its_host_offset_up_to_the_end_of_the_cluster() {
    let mut t = TinyImage::new(BITS, 64 << 10);
    let host = t.data(3 * CS, &[7; CS as usize]);
    let img = t.open(false).unwrap();
    assert_eq!(
        img.map(3 * CS + 100, 10 * CS).unwrap(),
        (ClusterSource::Data { host: host + 100 }, CS - 100)
    );
    assert_eq!(
        img.map(3 * CS, 10).unwrap(),
        (ClusterSource::Data { host }, 10)
    );
}

#[test]
fn maps_version_3_zero_clusters_with_and_without_a_host_cluster_as_zero() {
    let mut t = TinyImage::new(BITS, 64 << 10);
    let kept = t.cluster();
    t.set_entry(
        0,
        L2Entry {
            word: ZERO,
            bitmap: 0,
        },
    );
    t.set_entry(
        CS,
        L2Entry {
            word: kept | COPIED | ZERO,
            bitmap: 0,
        },
    );
    let img = t.open(false).unwrap();
    assert_eq!(img.map(0, 4 * CS).unwrap(), (ClusterSource::Zero, CS));
    assert_eq!(
        img.map(CS + 8, 4 * CS).unwrap(),
        (ClusterSource::Zero, CS - 8)
    );
}

#[test]
fn version_2_has_no_zero_flag_and_maps_bit_0_as_data() {
    let mut t = TinyImage::with_layout(Layout::new(BITS, 2, false), 64 << 10);
    let host = t.cluster();
    t.set_entry(
        0,
        L2Entry {
            word: host | COPIED | ZERO,
            bitmap: 0,
        },
    );
    let img = t.open(false).unwrap();
    assert_eq!(img.header().version, 2);
    assert_eq!(img.map(0, CS).unwrap(), (ClusterSource::Data { host }, CS));
    assert_eq!(img.map(CS, CS).unwrap(), (ClusterSource::Backing, CS));
}

#[test]
fn maps_subcluster_runs_of_extended_l2_entries() {
    // 16 KiB clusters, 512-byte subclusters: 0..4 data, 4..6 zero, 6..32 unallocated.
    let layout = Layout::new(14, 3, true);
    let mut t = TinyImage::with_layout(layout, 64 << 10);
    let host = t.cluster();
    t.set_entry(
        0,
        L2Entry {
            word: host | COPIED,
            bitmap: L2Entry::bitmap_word(0b1111, 0b11_0000),
        },
    );
    let img = t.open(false).unwrap();
    assert_eq!(
        img.map(0, 1 << 20).unwrap(),
        (ClusterSource::Data { host }, 2048)
    );
    assert_eq!(
        img.map(1000, 1 << 20).unwrap(),
        (ClusterSource::Data { host: host + 1000 }, 1048)
    );
    assert_eq!(img.map(2048, 1 << 20).unwrap(), (ClusterSource::Zero, 1024));
    assert_eq!(
        img.map(3072, 1 << 20).unwrap(),
        (ClusterSource::Backing, (16 << 10) - 3072)
    );
}

#[test]
fn refuses_an_extended_entry_whose_subcluster_is_both_allocated_and_zero() {
    let mut t = TinyImage::with_layout(Layout::new(14, 3, true), 64 << 10);
    let host = t.cluster();
    t.set_entry(
        0,
        L2Entry {
            word: host | COPIED,
            bitmap: L2Entry::bitmap_word(0b10, 0b10),
        },
    );
    let img = t.open(false).unwrap();
    // The first subcluster is fine; the entry as a whole is not.
    let err = img.map(0, 512).unwrap_err();
    assert!(
        matches!(format_error(&err), FormatError::BadL2Entry { guest: 0, .. }),
        "{err}"
    );
}

#[test]
fn refuses_a_data_cluster_not_aligned_to_the_cluster_size() {
    let mut t = TinyImage::new(BITS, 64 << 10);
    let host = t.cluster();
    t.set_entry(
        CS,
        L2Entry {
            word: (host + 512) | COPIED,
            bitmap: 0,
        },
    );
    let img = t.open(false).unwrap();
    let err = img.map(CS + 5, 1).unwrap_err();
    assert!(
        matches!(format_error(&err), FormatError::BadL2Entry { guest, .. } if *guest == CS + 5),
        "{err}"
    );
    assert_eq!(img.map(0, 1).unwrap(), (ClusterSource::Backing, 1));
}

#[test]
fn refuses_data_and_compressed_clusters_that_point_into_metadata() {
    let mut t = TinyImage::new(BITS, 64 << 10);
    let l2 = t.l2_for(0);
    t.set_entry(
        0,
        L2Entry {
            word: (L1_TABLE * CS) | COPIED,
            bitmap: 0,
        },
    );
    // Its own L2 table, and the refcount block.
    t.set_entry(
        CS,
        L2Entry {
            word: l2 | COPIED,
            bitmap: 0,
        },
    );
    t.set_entry(
        2 * CS,
        L2Entry {
            word: COMPRESSED | (REFCOUNT_BLOCK * CS + 16),
            bitmap: 0,
        },
    );
    let img = t.open(false).unwrap();
    let overlap = |guest| match img.map(guest, 1) {
        Err(e) => match format_error(&e) {
            FormatError::Overlap { what, offset } => (*what, *offset),
            other => panic!("{other}"),
        },
        Ok(found) => panic!("mapped {found:?}"),
    };
    assert_eq!(overlap(0), ("data cluster", L1_TABLE * CS));
    assert_eq!(overlap(CS), ("data cluster", l2));
    assert_eq!(
        overlap(2 * CS),
        ("compressed cluster", REFCOUNT_BLOCK * CS + 16)
    );
}

#[test]
fn maps_a_compressed_cluster_to_its_descriptor_for_the_rest_of_the_cluster() {
    let mut t = TinyImage::new(BITS, 64 << 10);
    let host = t.compressed(CS, &tiny::pattern(1, CS as usize));
    let img = t.open(false).unwrap();
    let (source, n) = img.map(CS + 300, 10 * CS).unwrap();
    assert_eq!(n, CS - 300);
    let ClusterSource::Compressed { host: at, size } = source else {
        panic!("{source:?}");
    };
    let packed = tiny::pack(Compression::Zlib, &tiny::pattern(1, CS as usize)).len() as u64;
    assert_eq!(at, host);
    assert_eq!(size, packed.div_ceil(512) * 512);
}

#[test]
fn counts_data_and_compressed_clusters_as_allocated_but_not_zero_clusters() {
    let mut t = TinyImage::new(BITS, 64 << 10);
    let first = t.data(0, &[1; CS as usize]);
    t.compressed(2 * CS, &[2; CS as usize]);
    t.set_entry(
        3 * CS,
        L2Entry {
            word: ZERO,
            bitmap: 0,
        },
    );
    let last = t.data(15 * CS, &[3; CS as usize]);
    let img = t.open(false).unwrap();
    assert_eq!(img.allocated_bytes().unwrap(), 3 * CS);
    assert_eq!(
        img.sample_data_clusters(10).unwrap(),
        vec![(0, first), (15 * CS, last)]
    );
}

#[test]
fn can_discard_unless_version_2_has_a_backing_file() {
    let v3 = TinyImage::new(BITS, 64 << 10);
    let v2 = TinyImage::with_layout(Layout::new(BITS, 2, false), 64 << 10);
    let mut v2_backed = v2.clone();
    v2_backed.backing = Some("base.raw".into());
    let mut v3_backed = v3.clone();
    v3_backed.backing = Some("base.raw".into());
    assert!(v3.open(false).unwrap().can_discard());
    assert!(v3_backed.open(false).unwrap().can_discard());
    assert!(v2.open(false).unwrap().can_discard());
    let img = v2_backed.open(false).unwrap();
    assert_eq!(img.header().backing_file.as_deref(), Some("base.raw"));
    assert!(!img.can_discard());
}

#[test]
fn writes_in_place_only_into_clusters_this_layer_owns() {
    let mut t = TinyImage::new(BITS, 64 << 10);
    let owned = t.data(0, &[1; CS as usize]);
    let shared = t.cluster();
    t.set_refcount(shared / CS, 2);
    t.set_entry(
        CS,
        L2Entry {
            word: shared,
            bitmap: 0,
        },
    );
    let zero_kept = t.cluster();
    t.set_entry(
        2 * CS,
        L2Entry {
            word: zero_kept | COPIED | ZERO,
            bitmap: 0,
        },
    );
    t.set_entry(
        3 * CS,
        L2Entry {
            word: ZERO,
            bitmap: 0,
        },
    );
    t.compressed(4 * CS, &[5; CS as usize]);
    let img = t.open(true).unwrap();
    assert_eq!(
        img.write_target(100).unwrap(),
        WriteTarget::InPlace { host: owned }
    );
    for guest in [CS, 2 * CS, 3 * CS, 4 * CS, 5 * CS, 15 * CS] {
        assert_eq!(
            img.write_target(guest).unwrap(),
            WriteTarget::Allocate,
            "{guest:#x}"
        );
    }
}

#[test]
fn an_l2_table_without_copied_in_the_l1_entry_is_not_written_in_place() {
    let mut t = TinyImage::new(BITS, 64 << 10);
    t.data(0, &[1; CS as usize]);
    let l2 = t.l2_for(0);
    t.set_l1(0, l2);
    let img = t.open(false).unwrap();
    assert_eq!(img.write_target(0).unwrap(), WriteTarget::Allocate);
}

#[test]
fn writes_in_place_into_version_2_bit_0_and_extended_zero_subclusters() {
    let mut t = TinyImage::with_layout(Layout::new(BITS, 2, false), 64 << 10);
    let host = t.cluster();
    t.set_entry(
        0,
        L2Entry {
            word: host | COPIED | ZERO,
            bitmap: 0,
        },
    );
    let img = t.open(false).unwrap();
    assert_eq!(img.write_target(0).unwrap(), WriteTarget::InPlace { host });

    let mut t = TinyImage::with_layout(Layout::new(14, 3, true), 64 << 10);
    let host = t.cluster();
    t.set_entry(
        0,
        L2Entry {
            word: host | COPIED,
            bitmap: L2Entry::bitmap_word(1, 0xffff_fffe),
        },
    );
    let img = t.open(false).unwrap();
    assert_eq!(img.write_target(0).unwrap(), WriteTarget::InPlace { host });
}

#[test]
fn refuses_to_write_in_place_into_metadata() {
    let mut t = TinyImage::new(BITS, 64 << 10);
    t.set_entry(
        0,
        L2Entry {
            word: (REFCOUNT_BLOCK * CS) | COPIED,
            bitmap: 0,
        },
    );
    let img = t.open(false).unwrap();
    let err = img.write_target(0).unwrap_err();
    assert!(
        matches!(
            format_error(&err),
            FormatError::Overlap { what: "data cluster", offset } if *offset == REFCOUNT_BLOCK * CS
        ),
        "{err}"
    );
}

#[test]
fn a_write_makes_every_check_a_read_makes_on_an_entry() {
    let mut t = TinyImage::new(BITS, 64 << 10);
    let data = t.data(0, &[1; CS as usize]);
    let l2 = t.l2_for(0);
    let bad: [(u64, L2Entry); 4] = [
        // Not aligned to the cluster: the write would run into the next host cluster.
        (
            CS,
            L2Entry {
                word: (data + 512) | COPIED,
                bitmap: 0,
            },
        ),
        // Its own L2 table, owned or shared.
        (
            2 * CS,
            L2Entry {
                word: l2 | COPIED,
                bitmap: 0,
            },
        ),
        (
            3 * CS,
            L2Entry {
                word: l2,
                bitmap: 0,
            },
        ),
        // A zero cluster whose preallocated cluster is the refcount block: released by a write.
        (
            4 * CS,
            L2Entry {
                word: (REFCOUNT_BLOCK * CS) | ZERO,
                bitmap: 0,
            },
        ),
    ];
    for (guest, entry) in bad {
        t.set_entry(guest, entry);
    }
    // The writable open refuses the image (the entries name clusters their refcounts do not
    // count); behind that, each write checks its own entry.
    let err = t.open(true).unwrap_err();
    assert!(
        matches!(format_error(&err), FormatError::Undercounted { .. }),
        "{err}"
    );
    let img = super::data_refs::skipped(|| t.open(true)).unwrap();
    for (guest, entry) in bad {
        let err = img.write_target(guest).unwrap_err();
        assert!(
            matches!(
                format_error(&err),
                FormatError::BadL2Entry { .. } | FormatError::Overlap { .. }
            ),
            "{guest:#x} {entry:?}: {err}"
        );
        // A read refuses the first three as well (the fourth reads zeros, touching nothing).
        if guest < 4 * CS {
            assert!(img.map(guest, 1).is_err(), "{guest:#x}");
        }
    }
    assert_eq!(
        img.write_target(0).unwrap(),
        WriteTarget::InPlace { host: data }
    );
}

#[test]
fn refuses_to_write_in_place_past_the_end_of_the_file() {
    let mut t = TinyImage::new(BITS, 64 << 10);
    // 2^56 - 4 KiB: the largest offset an entry can name; no host file system takes a write there.
    let far = OFFSET_MASK & !(CS - 1);
    t.set_entry(
        0,
        L2Entry {
            word: far | COPIED,
            bitmap: 0,
        },
    );
    let err = t.open(true).unwrap_err();
    assert!(
        matches!(
            format_error(&err),
            FormatError::Undercounted { refcount: 0, .. }
        ),
        "{err}"
    );
    let img = super::data_refs::skipped(|| t.open(true)).unwrap();
    let err = img.write_target(0).unwrap_err();
    assert!(
        matches!(
            format_error(&err),
            FormatError::BeyondEnd { what: "data cluster", offset, .. } if *offset == far
        ),
        "{err}"
    );
}

#[test]
fn a_discard_never_releases_metadata_an_entry_names() {
    let mut t = TinyImage::new(BITS, 64 << 10);
    t.set_entry(
        0,
        L2Entry {
            word: REFCOUNT_BLOCK * CS,
            bitmap: 0,
        },
    );
    let (img, probe) = t.open_probed(true).unwrap();
    let before = probe.mem.contents();
    let write = crate::qcow2::ClusterWrite {
        guest: 0,
        target: WriteTarget::Discard,
        pieces: Vec::new(),
    };
    let err = img.commit(vec![write], Durability::Synced).unwrap_err();
    assert!(
        matches!(format_error(&err), FormatError::Overlap { .. }),
        "{err}"
    );
    assert_eq!(probe.mem.contents(), before, "nothing was written");
}

#[test]
fn keeps_l2_tables_in_memory_after_their_first_use() {
    let mut t = TinyImage::new(BITS, 64 << 10);
    t.data(0, &[1; CS as usize]);
    let l2 = t.l2_for(0);
    let (img, probe) = t.open_probed(false).unwrap();
    probe.clear();
    img.map(0, 1).unwrap();
    img.map(5 * CS, 1).unwrap();
    img.write_target(CS).unwrap();
    assert_eq!(probe.reads_at(l2), 1);
}

#[test]
fn the_l2_cache_holds_16_tables_of_2_mib_clusters_and_reloads_the_least_recently_used() {
    let layout = Layout::new(21, 3, false);
    let mut t = TinyImage::with_layout(layout, 17 * layout.l2_span());
    let tables: Vec<u64> = (0..17).map(|i| t.l2_for(i * layout.l2_span())).collect();
    let (img, probe) = t.open_probed(false).unwrap();
    probe.clear();
    for i in 0..17 {
        img.map(i * layout.l2_span(), 1).unwrap();
    }
    // Table 16 is the most recent, table 0 was evicted by it.
    img.map(16 * layout.l2_span(), 1).unwrap();
    img.map(0, 1).unwrap();
    assert_eq!(probe.reads_at(tables[16]), 1);
    assert_eq!(probe.reads_at(tables[0]), 2);
}

#[test]
fn a_writable_open_refuses_a_data_cluster_named_more_often_than_it_is_counted() {
    // The write fuzz target's finding: sixteen entries naming one cluster of refcount 1; a
    // copy-on-write through one released it while the others still read it.
    let mut t = TinyImage::new(BITS, 64 << 10);
    let data = t.data(0, &[7; CS as usize]);
    t.set_entry(
        CS,
        L2Entry {
            word: data,
            bitmap: 0,
        },
    );
    let err = t.open(true).unwrap_err();
    assert!(
        matches!(
            format_error(&err),
            FormatError::Undercounted { guest, host, refcount: 1, named: 2 }
                if *guest == CS && *host == data
        ),
        "{err}"
    );
    // Reading is unaffected: both guest clusters read the shared bytes.
    let img = t.open(false).unwrap();
    assert_eq!(img.map(CS, 1).unwrap(), img.map(0, 1).unwrap());
}

#[test]
fn a_writable_open_refuses_an_l1_table_naming_one_l2_table_twice() {
    // A hostile L1 naming one table over and over would have the open's reference count read it
    // once per entry; QEMU never writes that, so it is refused outright.
    let span = CS * (CS / 8);
    let mut t = TinyImage::new(BITS, 2 * span);
    let l2 = t.l2_for(0);
    t.set_l1(1, l2 | COPIED);
    let err = t.open(true).unwrap_err();
    assert!(
        matches!(format_error(&err), FormatError::Overlap { offset, .. } if *offset == l2),
        "{err}"
    );
}

#[test]
fn a_compressed_entry_spanning_metadata_in_its_middle_cluster_is_refused() {
    // Two clusters of compressed data starting 512 bytes before a cluster's end touch three: the
    // middle one here is the entry's own L2 table, which a copy-on-write would release.
    let mut t = TinyImage::new(BITS, 64 << 10);
    let first = t.cluster();
    let l2 = t.l2_for(0);
    let last = t.cluster();
    assert_eq!((l2 - first, last - l2), (CS, CS), "three clusters in a row");
    let start = first + CS - 512;
    let sectors = 2 * CS / 512; // the most the size field holds
    let layout = crate::qcow2::layout::Layout::new(BITS, 3, false);
    let word = COMPRESSED | ((sectors - 1) << layout.compressed_size_shift()) | start;
    t.set_entry(0, L2Entry { word, bitmap: 0 });
    let img = super::data_refs::skipped(|| t.open(true)).unwrap();
    let err = img.write_target(0).unwrap_err();
    assert!(
        matches!(format_error(&err), FormatError::Overlap { .. }),
        "{err}"
    );
}
