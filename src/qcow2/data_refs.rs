//! Before the first write: do the refcounts count every data cluster the active L1 table names?
//!
//! The allocator and the copy-on-write release trust the refcounts. Where they undercount (one
//! host cluster named by sixteen L2 entries with refcount 1, a data cluster with refcount 0), a
//! copy-on-write frees a cluster other guest offsets still read, and the next allocation hands
//! it out again: a write changes data far from where it was made (the `write` fuzz target found
//! exactly that). QEMU leaves this to `qemu-img check`; a writable open here refuses such an
//! image and names the repair, as it refuses uncounted metadata (`check_metadata_counted`).
//!
//! One pass over the L2 tables of the active L1 (a few MiB for a typical disk: its L2 tables are
//! 1/8192 of the guest data with 64 KiB clusters), each read once straight from the file, with a
//! bitmap of the host clusters seen (in chunks, made as clusters are named). Snapshot tables are
//! not walked: a cluster shared with a snapshot has a refcount above its active references, which
//! this check allows; a snapshot-shared cluster counted once and marked COPIED in the active table
//! is not found here (an in-place write would then change the snapshot too). `qemu-img check`
//! finds it; qcowfs never creates snapshots.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::alloc::Allocator;
use super::layout::Layout;
use super::table::{L1Entry, L2Entry};
use super::words::read_words;
use super::FormatError;
use crate::error::{Error, Result};
use crate::io::HostFile;

/// Refuse (with the repair to run) an image whose refcounts count a data cluster of the active
/// L1 table fewer times than L2 entries name it, or whose COPIED flag (write in place) sits on a
/// cluster that is not referenced exactly once.
pub(super) fn check_data_counted(
    file: &HostFile,
    layout: &Layout,
    l1: &[u64],
    alloc: &mut Allocator,
) -> Result<()> {
    #[cfg(test)]
    if SKIPPED.get() {
        return Ok(());
    }
    let path = file.path();
    let cs = layout.cluster_size();
    let mut refs = References::default();
    let entries = layout.l2_entries() as usize;
    let words = (layout.l2_entry_size() / 8) as usize * entries;
    // QEMU never names one L2 table twice in an L1 table; a hostile one that did would have this
    // pass read the table once per entry (4M times, with a 32 MiB L1).
    let mut walked = HashSet::new();
    for (l1_index, &word) in l1.iter().enumerate() {
        let l2 = L1Entry(word).l2_offset();
        if l2 == 0 {
            continue;
        }
        if !walked.insert(l2) {
            return Err(Error::new(
                path,
                FormatError::Overlap {
                    what: "L2 table named twice by the L1 table",
                    offset: l2,
                },
            ));
        }
        let table = read_words(file, l2, words)?;
        for i in 0..entries {
            let (_, entry) = L2Entry::at(&table, i, layout.extended_l2);
            let guest = (l1_index as u64 * entries as u64 + i as u64) * cs;
            let (first, last) = match host_range(entry, layout) {
                Some(range) => range,
                None => continue,
            };
            for cluster in first..=last {
                let named = refs.add(cluster);
                let refcount = alloc.refcount(file, cluster)?;
                let copied_wrong = !entry.is_compressed() && entry.is_copied() && refcount != 1;
                if refcount < named || copied_wrong {
                    return Err(undercounted(path, guest, cluster * cs, refcount, named));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
thread_local! {
    static SKIPPED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Tests of the checks a write makes itself (defence in depth behind this one) open their damaged
/// images with this check skipped.
#[cfg(test)]
pub(super) fn skipped<R>(f: impl FnOnce() -> R) -> R {
    SKIPPED.set(true);
    let out = f();
    SKIPPED.set(false);
    out
}

/// The host clusters an entry holds data in, first and last; `None` when it holds none.
fn host_range(entry: L2Entry, layout: &Layout) -> Option<(u64, u64)> {
    let bits = layout.cluster_size().trailing_zeros();
    if entry.is_compressed() {
        let (offset, len) = entry.compressed_range(layout);
        return Some((offset >> bits, (offset + len.max(1) - 1) >> bits));
    }
    let host = entry.host_cluster();
    (host != 0).then_some((host >> bits, host >> bits))
}

fn undercounted(path: &Path, guest: u64, host: u64, refcount: u64, named: u64) -> Error {
    Error::new(
        path,
        FormatError::Undercounted {
            guest,
            host,
            refcount,
            named,
        },
    )
}

/// How many times each host cluster has been named so far: a bit per cluster, in chunks made as
/// clusters are named (so memory follows the clusters the tables name, not the file's length,
/// which a sparse file makes anything), and a map for the clusters named twice or more
/// (compressed clusters sharing one).
#[derive(Default)]
struct References {
    seen: HashMap<u64, Box<[u64; CHUNK_WORDS]>>,
    more: HashMap<u64, u64>,
}

/// Words of a bitmap chunk: 4 KiB, 32,768 clusters.
const CHUNK_WORDS: usize = 512;

impl References {
    /// Count one more reference to `cluster`; returns how many it has now.
    fn add(&mut self, cluster: u64) -> u64 {
        let bits = (CHUNK_WORDS * 64) as u64;
        let chunk = self
            .seen
            .entry(cluster / bits)
            .or_insert_with(|| Box::new([0; CHUNK_WORDS]));
        let at = cluster % bits;
        let (word, bit) = ((at / 64) as usize, 1u64 << (at % 64));
        if chunk[word] & bit == 0 {
            chunk[word] |= bit;
            return 1;
        }
        let n = self.more.entry(cluster).or_insert(1);
        *n += 1;
        *n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_references_in_any_chunk() {
        let mut refs = References::default();
        assert_eq!(refs.add(3), 1);
        assert_eq!(refs.add(4), 1);
        assert_eq!(refs.add(3), 2);
        assert_eq!(refs.add(3), 3);
        assert_eq!(refs.add(500), 1);
        assert_eq!(refs.add(500), 2);
        assert_eq!(refs.add(99), 1);
        assert_eq!(refs.add(u64::MAX >> 9), 1);
        assert_eq!(refs.add(u64::MAX >> 9), 2);
    }

    #[test]
    fn a_compressed_entry_spans_every_cluster_it_touches() {
        let layout = Layout::new(16, 3, false);
        // Compressed at host 0x1fe00, 2 sectors (the size field holds sectors - 1 = 1).
        let word = (1 << 62) | (1 << layout.compressed_size_shift()) | 0x1fe00;
        let entry = L2Entry { word, bitmap: 0 };
        assert_eq!(host_range(entry, &layout), Some((1, 2)));
        assert_eq!(host_range(L2Entry::UNALLOCATED, &layout), None);
        let data = L2Entry::data(0x30000, &layout);
        assert_eq!(host_range(data, &layout), Some((3, 3)));
    }
}
