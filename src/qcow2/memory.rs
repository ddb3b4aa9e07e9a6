//! The metadata memory of one image: how a budget is shared between its caches (L2 tables,
//! refcount blocks, snapshot L1 pieces), and what they hold now. Each cache bounds itself; this
//! only sets and reads their sizes.

use std::num::NonZeroUsize;

use super::image::Qcow2Image;

/// L2 tables kept at least, whatever the budget (a sequential reader crosses one at a time).
const MIN_L2_TABLES: usize = 16;

/// How a budget is shared: (L2 tables, refcount blocks, snapshot L1 pieces), adding up to it.
fn shares(bytes: u64) -> (u64, u64, u64) {
    (bytes / 2, bytes / 4, bytes / 4)
}

impl Qcow2Image {
    /// Keep about `bytes` of metadata in memory from now on: half for L2 tables, a quarter for
    /// refcount blocks (only a writable image loads them), a quarter for snapshot L1 tables.
    /// Caches shrink at once (only clean entries go: dirty refcount blocks stay pinned until the
    /// commit pipeline stores them). Each cache keeps a few clusters whatever the budget, and the
    /// active L1 table and the refcount table (at most 32 and 8 MiB, QEMU's limits) are held whole.
    pub fn set_metadata_budget(&self, bytes: u64) {
        let (l2, refcounts, snapshots) = shares(bytes);
        let tables = ((l2 / self.layout.cluster_size()) as usize).max(MIN_L2_TABLES);
        let mut meta = self.meta.lock();
        meta.l2_cache
            .resize(NonZeroUsize::new(tables).unwrap_or(NonZeroUsize::MIN));
        meta.alloc.set_cache_bytes(refcounts);
        drop(meta);
        self.snapshot_tables.set_cache_bytes(snapshots);
    }

    /// Bytes of metadata tables in memory now: the active L1 table, cached L2 tables, refcount
    /// blocks and snapshot L1 pieces.
    pub fn metadata_bytes(&self) -> u64 {
        let cs = self.layout.cluster_size();
        let meta = self.meta.lock();
        let l1 = meta.l1.len() as u64 * 8;
        let l2 = meta.l2_cache.len() as u64 * cs;
        let refcounts = meta.alloc.cached_bytes();
        drop(meta);
        l1 + l2 + refcounts + self.snapshot_tables.cached_bytes()
    }
}

/// Share `bytes` of metadata memory evenly between `images` (the qcow2 layers of one chain).
pub fn share_metadata_budget<'a>(images: impl IntoIterator<Item = &'a Qcow2Image>, bytes: u64) {
    let images: Vec<&Qcow2Image> = images.into_iter().collect();
    let each = bytes / images.len().max(1) as u64;
    for image in images {
        image.set_metadata_budget(each);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shares_add_up_to_the_budget_and_the_mount_default_keeps_32_mib_of_l2_tables() {
        // `--metadata-cache` defaults to 64M.
        let (l2, refcounts, snapshots) = shares(64 << 20);
        assert_eq!(l2, 32 << 20);
        assert_eq!(l2 + refcounts + snapshots, 64 << 20);
    }
}
