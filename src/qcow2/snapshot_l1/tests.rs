//! Snapshot L1 tables read on demand: checked for place and size without being read, entries
//! checked when used, pieces shared between snapshots and kept within the budget.

use super::*;
use crate::error::Problem;
use crate::qcow2::table::COPIED;
use crate::qcow2::tiny::{self, TinyImage};

/// 4 KiB clusters: one piece holds 512 entries.
const BITS: u32 = 12;
const CS: u64 = 1 << BITS;

fn format_error(e: &Error) -> &FormatError {
    match &e.problem {
        Problem::Format(f) => f,
        other => panic!("not a format error: {other}"),
    }
}

#[test]
fn reads_a_snapshot_l1_table_inside_the_file() {
    let mut t = TinyImage::new(BITS, 64 << 10);
    let at = t.cluster();
    t.put(at, &((7 * CS) | COPIED).to_be_bytes());
    let img = t.open(false).unwrap();
    let l1 = img.snapshot_l1(&tiny::snapshot(at, 2)).unwrap();
    assert_eq!(
        img.snapshot_l1_entry(&l1, 0).unwrap(),
        Some((7 * CS) | COPIED)
    );
    assert_eq!(img.snapshot_l1_entry(&l1, 1).unwrap(), Some(0));
    assert_eq!(img.snapshot_l1_entry(&l1, 2).unwrap(), None, "past its end");
}

#[test]
fn rejects_a_snapshot_l1_table_that_is_misaligned_or_overflows_or_passes_the_file() {
    let t = TinyImage::new(BITS, 64 << 10);
    let img = t.open(false).unwrap();
    for s in [
        tiny::snapshot(!(CS - 1), 8),
        tiny::snapshot(3 * CS, 1 << 20),
    ] {
        let err = img.snapshot_l1(&s).unwrap_err();
        assert!(
            matches!(
                format_error(&err),
                FormatError::BeyondEnd {
                    what: "snapshot L1 table",
                    ..
                }
            ),
            "{err}"
        );
    }
    let err = img
        .snapshot_l1(&tiny::snapshot(3 * CS + 512, 1))
        .unwrap_err();
    assert!(
        matches!(
            format_error(&err),
            FormatError::Misaligned {
                what: "snapshot L1 table",
                ..
            }
        ),
        "{err}"
    );
    let err = img.snapshot_l1(&tiny::snapshot(0, u32::MAX)).unwrap_err();
    assert!(
        matches!(
            format_error(&err),
            FormatError::TooLarge {
                what: "snapshot L1 table",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn rejects_a_snapshot_l1_entry_with_a_misaligned_l2_table_when_it_is_used() {
    let mut t = TinyImage::new(BITS, 64 << 10);
    let at = t.cluster();
    t.put(at + 8, &(5 * CS + 512).to_be_bytes());
    let img = t.open(false).unwrap();
    let l1 = img.snapshot_l1(&tiny::snapshot(at, 2)).unwrap();
    assert_eq!(img.snapshot_l1_entry(&l1, 0).unwrap(), Some(0));
    let err = img.snapshot_l1_entry(&l1, 1).unwrap_err();
    assert!(
        matches!(
            format_error(&err),
            FormatError::Misaligned { what: "L2 table", offset, .. } if *offset == 5 * CS + 512
        ),
        "{err}"
    );
    // A read through that entry fails with the same error, naming the file.
    let mut buf = vec![0u8; 512];
    let err = img
        .read_in(Some(&l1), 2 << 20, &mut buf, &|_, b| {
            b.fill(0);
            Ok(())
        })
        .unwrap_err();
    assert!(err.to_string().contains(tiny::PATH), "{err}");
}

#[test]
fn a_snapshot_table_is_not_read_until_an_entry_is_needed() {
    let mut t = TinyImage::new(BITS, 64 << 10);
    let at = t.cluster();
    let (img, probe) = t.open_probed(false).unwrap();
    probe.clear();
    let l1 = img.snapshot_l1(&tiny::snapshot(at, 2)).unwrap();
    assert_eq!(probe.reads_at(at), 0);
    img.snapshot_l1_entry(&l1, 1).unwrap();
    assert_eq!(probe.reads_at(at), 1);
}

#[test]
fn snapshots_sharing_a_table_read_it_once() {
    let mut t = TinyImage::new(BITS, 64 << 10);
    let at = t.cluster();
    let (img, probe) = t.open_probed(false).unwrap();
    probe.clear();
    let a = img.snapshot_l1(&tiny::snapshot(at, 2)).unwrap();
    let b = img.snapshot_l1(&tiny::snapshot(at, 1)).unwrap();
    img.snapshot_l1_entry(&a, 1).unwrap();
    img.snapshot_l1_entry(&b, 0).unwrap();
    assert_eq!(probe.reads_at(at), 1);
}

#[test]
fn keeps_the_pieces_of_a_large_table_within_the_budget() {
    // A table of 16 pieces (8192 entries of 4 KiB clusters), every piece read once.
    let mut t = TinyImage::new(BITS, 64 << 10);
    let at = t.cluster();
    for _ in 1..16 {
        t.cluster();
    }
    let img = t.open(false).unwrap();
    img.snapshot_tables.set_cache_bytes(4 * CS);
    let l1 = img.snapshot_l1(&tiny::snapshot(at, 16 * 512)).unwrap();
    for piece in 0..16 {
        img.snapshot_l1_entry(&l1, piece * 512).unwrap();
        assert!(img.snapshot_tables.cached_bytes() <= 4 * CS);
    }
    assert_eq!(img.snapshot_tables.cached_bytes(), 4 * CS);
}
