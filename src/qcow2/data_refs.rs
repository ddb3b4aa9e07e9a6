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
//! bitmap of the host clusters seen (one bit per cluster of the file). Snapshot tables are not
//! walked: a cluster shared with a snapshot has a refcount above its active references, which
//! this check allows.

use std::collections::HashMap;
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
    let mut refs = References::new(file.len()?.div_ceil(cs));
    let entries = layout.l2_entries() as usize;
    let words = (layout.l2_entry_size() / 8) as usize * entries;
    for (l1_index, &word) in l1.iter().enumerate() {
        let l2 = L1Entry(word).l2_offset();
        if l2 == 0 {
            continue;
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

/// How many times each host cluster has been named so far: a bit per cluster of the file, and a
/// map for the clusters named twice or more (compressed clusters sharing one) or past its end.
struct References {
    seen: Vec<u64>,
    clusters: u64,
    more: HashMap<u64, u64>,
}

impl References {
    fn new(clusters: u64) -> Self {
        References {
            seen: vec![0; clusters.div_ceil(64) as usize],
            clusters,
            more: HashMap::new(),
        }
    }

    /// Count one more reference to `cluster`; returns how many it has now.
    fn add(&mut self, cluster: u64) -> u64 {
        if cluster < self.clusters {
            let (word, bit) = ((cluster / 64) as usize, 1u64 << (cluster % 64));
            if self.seen[word] & bit == 0 {
                self.seen[word] |= bit;
                return 1;
            }
            let n = self.more.entry(cluster).or_insert(1);
            *n += 1;
            return *n;
        }
        let n = self.more.entry(cluster).or_insert(0);
        *n += 1;
        *n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_references_inside_and_past_the_bitmap() {
        let mut refs = References::new(100);
        assert_eq!(refs.add(3), 1);
        assert_eq!(refs.add(4), 1);
        assert_eq!(refs.add(3), 2);
        assert_eq!(refs.add(3), 3);
        assert_eq!(refs.add(500), 1);
        assert_eq!(refs.add(500), 2);
        assert_eq!(refs.add(99), 1);
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
