//! Unit tests of the disk over chains held in memory: reads through the cache and the chain, range
//! and read-only refusals, writes read back before and after a flush, and seeking.

use std::path::Path;

use super::*;
use crate::chain::Layer;
use crate::io::HostFile;
use crate::qcow2::table::{L2Entry, ZERO};
use crate::qcow2::tiny::{self, Probe, TinyImage};
use crate::qcow2::ClusterSource;

/// 4 KiB clusters (and so 4 KiB cache blocks).
const CS: u64 = 4096;
const SIZE: u64 = 64 << 10;

fn options(read_only: bool) -> DiskOptions {
    DiskOptions {
        cache_size: 1 << 20,
        read_only,
    }
}

/// Cluster 1 data (0x71), cluster 2 a zero cluster, the rest unallocated.
fn top() -> TinyImage {
    let mut t = TinyImage::new(12, SIZE);
    t.backing = Some("base.raw".into());
    t.data(CS, &[0x71; CS as usize]);
    t.set_entry(
        2 * CS,
        L2Entry {
            word: ZERO,
            bitmap: 0,
        },
    );
    t
}

/// A raw layer of 40000 pattern bytes.
fn base() -> Vec<u8> {
    tiny::pattern(5, 40_000)
}

fn chain_over(top: crate::qcow2::Qcow2Image) -> Chain {
    let raw = HostFile::in_memory(Path::new("base.raw"), base());
    Chain::from_layers(vec![Layer::Qcow2(Arc::new(top)), Layer::Raw(raw)])
}

/// What the guest reads of `top()` over `base()`.
fn expected() -> Vec<u8> {
    let mut e = base();
    e.resize(SIZE as usize, 0);
    e[CS as usize..2 * CS as usize].fill(0x71);
    e[2 * CS as usize..3 * CS as usize].fill(0);
    e
}

fn writable_disk() -> (Disk, Probe) {
    let (img, probe) = top().open_probed(true).unwrap();
    (Disk::new(chain_over(img), options(false)), probe)
}

#[test]
fn reads_the_chain_through_the_disk_in_any_pieces() {
    let disk = Disk::new(chain_over(top().open(false).unwrap()), options(true));
    assert_eq!(disk.size(), SIZE);
    assert!(disk.is_read_only());
    let mut all = vec![0xeeu8; SIZE as usize];
    disk.read_at(0, &mut all).unwrap();
    assert_eq!(all, expected());
    // Unaligned, across block boundaries.
    let mut piece = vec![0xeeu8; 5000];
    disk.read_at(CS - 300, &mut piece).unwrap();
    assert_eq!(piece, &expected()[CS as usize - 300..CS as usize + 4700]);
}

#[test]
fn refuses_ranges_past_the_end_of_the_disk() {
    let (disk, _) = writable_disk();
    let mut buf = [0u8; 20];
    for err in [
        disk.read_at(SIZE - 10, &mut buf).unwrap_err(),
        disk.write_at(SIZE - 10, &buf).unwrap_err(),
        disk.write_at(u64::MAX - 5, &buf).unwrap_err(),
        disk.discard(SIZE, 1).unwrap_err(),
    ] {
        assert_eq!(err.errno(), libc::EINVAL, "{err}");
    }
    assert_eq!(disk.dirty_bytes(), 0);
}

#[test]
fn a_read_only_disk_refuses_writes_and_discards() {
    let img = top().open(false).unwrap();
    let disk = Disk::new(chain_over(img), options(true));
    assert_eq!(disk.write_at(0, &[1]).unwrap_err().errno(), libc::EROFS);
    assert_eq!(disk.discard(0, CS).unwrap_err().errno(), libc::EROFS);
}

#[test]
fn reads_back_writes_before_and_after_a_flush_and_stores_them_in_the_image() {
    let (disk, probe) = writable_disk();
    // Inside backing data, inside the zero cluster, and across the end of the raw layer.
    let writes: [(u64, Vec<u8>); 3] = [
        (5000, vec![0xa1; 1000]),
        (2 * CS + 512, vec![0xa2; 512]),
        (39_000, vec![0xa3; 3000]),
    ];
    let mut expect = expected();
    for (at, data) in &writes {
        disk.write_at(*at, data).unwrap();
        expect[*at as usize..*at as usize + data.len()].copy_from_slice(data);
    }
    assert!(disk.dirty_bytes() > 0);
    let mut got = vec![0u8; SIZE as usize];
    disk.read_at(0, &mut got).unwrap();
    assert_eq!(got, expect);

    let syncs = probe.mem.syncs();
    disk.flush().unwrap();
    assert_eq!(disk.dirty_bytes(), 0);
    assert!(probe.mem.syncs() > syncs);
    disk.read_at(0, &mut got).unwrap();
    assert_eq!(got, expect);

    // A fresh open of the bytes the flush left shows the same disk.
    let reopened = tiny::open_bytes(probe.mem.contents(), false).unwrap();
    let chain = chain_over(reopened);
    let mut again = vec![0u8; SIZE as usize];
    chain.read(0, &mut again).unwrap();
    assert_eq!(again, expect);
}

#[test]
fn seeks_data_and_holes_and_counts_allocated_bytes_of_one_layer() {
    let mut t = TinyImage::new(12, SIZE);
    t.data(CS, &[1; CS as usize]);
    t.data(2 * CS, &[2; CS as usize]);
    t.set_entry(
        3 * CS,
        L2Entry {
            word: ZERO,
            bitmap: 0,
        },
    );
    t.data(5 * CS, &[3; CS as usize]);
    let chain = Chain::from_layers(vec![Layer::Qcow2(Arc::new(t.open(false).unwrap()))]);
    let disk = Disk::new(chain, options(true));
    assert_eq!(disk.seek(0, true).unwrap(), Some(CS));
    assert_eq!(disk.seek(CS, false).unwrap(), Some(3 * CS));
    assert_eq!(disk.seek(3 * CS + 1, true).unwrap(), Some(5 * CS));
    assert_eq!(disk.seek(6 * CS, true).unwrap(), None);
    assert_eq!(disk.seek(6 * CS, false).unwrap(), Some(6 * CS));
    assert_eq!(disk.allocated_bytes().unwrap(), 3 * CS);
}

#[test]
fn discard_zeros_its_range_over_a_backing_file_and_supersedes_pending_writes() {
    let (disk, probe) = writable_disk();
    disk.write_at(CS + 10, &[0xa1; 100]).unwrap();
    // Partial clusters at both ends, clusters 1 and 2 whole.
    disk.discard(CS - 100, 2 * CS + 200).unwrap();
    let mut expect = expected();
    expect[CS as usize - 100..3 * CS as usize + 100].fill(0);
    let mut got = vec![0u8; SIZE as usize];
    disk.read_at(0, &mut got).unwrap();
    assert_eq!(got, expect);
    disk.flush().unwrap();

    let reopened = tiny::open_bytes(probe.mem.contents(), false).unwrap();
    assert_eq!(reopened.map(CS, CS).unwrap(), (ClusterSource::Zero, CS));
    assert_eq!(reopened.map(2 * CS, CS).unwrap(), (ClusterSource::Zero, CS));
    let chain = chain_over(reopened);
    let mut again = vec![0u8; SIZE as usize];
    chain.read(0, &mut again).unwrap();
    assert_eq!(again, expect);
}

#[test]
fn a_failed_discard_keeps_the_writes_it_would_have_superseded() {
    let (disk, probe) = writable_disk();
    // Cluster 1 is owned by the image: the write stays dirty in the cache until a flush.
    disk.write_at(CS, &[0x5a; CS as usize]).unwrap();
    let mut expect = expected();
    expect[CS as usize..2 * CS as usize].fill(0x5a);
    // The discard's commit cannot write its L2 table (a full host disk).
    probe.fail_writes(Some(libc::ENOSPC));
    let err = disk.discard(CS, 2 * CS).unwrap_err();
    assert_eq!(err.errno(), libc::ENOSPC, "{err}");
    let mut got = vec![0u8; SIZE as usize];
    disk.read_at(0, &mut got).unwrap();
    assert_eq!(
        got, expect,
        "the guest reads what it read before the discard"
    );
    assert!(disk.dirty_bytes() > 0, "the write is still to be stored");
    // Nothing is acknowledged that is not stored: the flush fails while the disk is full ...
    assert!(disk.flush().is_err());
    // ... and stores the write once there is room again.
    probe.fail_writes(None);
    disk.flush().unwrap();
    let reopened = tiny::open_bytes(probe.mem.contents(), false).unwrap();
    let mut again = vec![0u8; SIZE as usize];
    chain_over(reopened).read(0, &mut again).unwrap();
    assert_eq!(again, expect);
}
