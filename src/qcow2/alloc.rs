//! Host cluster allocation: the refcounts, the end of the file and the free cursor, owned by one
//! `Allocator` so nothing else changes them. New clusters come from free ones (refcount 0) below
//! the end, else from growing the file; refcount blocks and a larger refcount table are placed as
//! they are needed. Nothing here waits for the disk: `store_blocks` and `store_table` write what
//! changed, and the commit pipeline puts the barriers between them.

use super::header::{Header, MAX_REFTABLE_BYTES};
use super::overlap::{MetaKind, MetadataMap};
use super::refcount::{self, Refcounts};
use super::FormatError;
use crate::error::{Error, Result};
use crate::io::HostFile;

/// The one owner of the refcounts. Memory: the refcount table and a bounded cache of blocks
/// (`cache_bytes`, see `Refcounts`), whatever the size of the image.
#[derive(Debug)]
pub(super) struct Allocator {
    /// Loaded before the first allocation.
    refcounts: Option<Refcounts>,
    /// Bytes of clean refcount blocks kept in memory.
    cache_bytes: u64,
    /// First cluster index past everything allocated (the file grows from here).
    end_cluster: u64,
    /// Where the search for a free cluster resumes.
    free_cursor: u64,
    /// The refcount table the header points to: (offset, clusters).
    committed_table: (u64, u64),
    cluster_bits: u32,
}

/// A refcount table written at a new place: the header must point to it once it is durable, and
/// the old one is released after that.
#[derive(Debug, Clone, Copy)]
pub(super) struct TableMove {
    pub offset: u64,
    pub clusters: u64,
    pub old: (u64, u64),
}

impl Allocator {
    /// Nothing loaded yet; the file ends at `file_len`.
    pub fn new(header: &Header, file_len: u64) -> Self {
        let cs = 1u64 << header.cluster_bits;
        Allocator {
            refcounts: None,
            cache_bytes: refcount::DEFAULT_CACHE_BYTES,
            end_cluster: file_len.div_ceil(cs),
            free_cursor: 0,
            committed_table: (
                header.refcount_table_offset,
                header.refcount_table_clusters.into(),
            ),
            cluster_bits: header.cluster_bits,
        }
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn end_cluster(&self) -> u64 {
        self.end_cluster
    }

    /// Keep about `bytes` of clean refcount blocks in memory from now on.
    pub fn set_cache_bytes(&mut self, bytes: u64) {
        self.cache_bytes = bytes;
        if let Some(rc) = &mut self.refcounts {
            rc.set_cache_bytes(bytes);
        }
    }

    /// Bytes of refcount blocks in memory now (the table aside).
    pub fn cached_bytes(&self) -> u64 {
        self.refcounts.as_ref().map_or(0, Refcounts::cached_bytes)
    }

    /// Load the refcounts before the first allocation, check that they can take one, and move the
    /// end of allocation past every cluster they count (see `Refcounts::last_used_cluster`).
    pub fn ensure_loaded(&mut self, file: &HostFile, header: &Header) -> Result<()> {
        if self.refcounts.is_some() {
            return Ok(());
        }
        let mut rc = Refcounts::load(
            file,
            header.refcount_table_offset,
            header.refcount_table_clusters.into(),
            header.cluster_bits,
            header.refcount_order,
            self.cache_bytes,
        )?;
        rc.check_blocks_inside(file, file.len()?)?;
        if let Some(last) = rc.last_used_cluster(file)? {
            self.end_cluster = self.end_cluster.max(last + 1);
        }
        self.refcounts = Some(rc);
        Ok(())
    }

    fn refcounts(&mut self, file: &HostFile) -> Result<&mut Refcounts> {
        self.refcounts.as_mut().ok_or_else(|| {
            Error::new(
                file.path(),
                FormatError::Unsupported("refcounts not loaded"),
            )
        })
    }

    /// The refcount of host cluster `cluster` (loaded refcounts only).
    pub fn refcount(&mut self, file: &HostFile, cluster: u64) -> Result<u64> {
        self.refcounts(file)?.get(file, cluster)
    }

    /// Find a free host cluster (refcount 0, not metadata, no stored data) or grow the file; its
    /// refcount becomes 1.
    /// Returns the cluster index.
    pub fn alloc(&mut self, file: &HostFile, metadata: &MetadataMap) -> Result<u64> {
        let cs = self.cluster_size();
        let mut found = None;
        while self.free_cursor < self.end_cluster {
            let end = self.end_cluster;
            let from = self.free_cursor;
            let Some(c) = self.refcounts(file)?.next_free(file, from, end)? else {
                self.free_cursor = end;
                break;
            };
            self.free_cursor = c + 1;
            // A free cluster that still holds data is not taken: QEMU and this allocator punch
            // what they free, so stored data under a zero refcount is a cluster the refcounts
            // lost track of (damage), which some L2 entry may still name. Where holes cannot be
            // told (memory, block devices) the refcounts are trusted, as QEMU trusts them.
            if !metadata.contains(c * cs) && file.holds_data(c * cs, cs) != Some(true) {
                found = Some(c);
                break;
            }
        }
        let cluster = match found {
            Some(c) => c,
            None => self.append(1),
        };
        self.ensure_block(file, cluster)?;
        self.refcounts(file)?.set(file, cluster, 1)?;
        log::trace!("allocated cluster {cluster}");
        Ok(cluster)
    }

    /// `n` new clusters at the end of the file; returns the first.
    fn append(&mut self, n: u64) -> u64 {
        let first = self.end_cluster;
        self.end_cluster += n;
        self.free_cursor = self.free_cursor.max(self.end_cluster);
        first
    }

    /// Make sure a refcount block covers `cluster`, creating it (and growing the table) if needed.
    fn ensure_block(&mut self, file: &HostFile, cluster: u64) -> Result<()> {
        let rc = self.refcounts(file)?;
        if rc.has_block_for(cluster) {
            return Ok(());
        }
        let index = cluster / rc.per_block();
        if index >= rc.table_capacity() {
            self.grow_table(file, index + 1)?;
            if self.refcounts(file)?.has_block_for(cluster) {
                return Ok(());
            }
        }
        // New blocks go at the end of the file; usually the block then describes itself.
        let block_cluster = self.append(1);
        let cs = self.cluster_size();
        self.refcounts(file)?.add_block(index, block_cluster * cs);
        self.ensure_block(file, block_cluster)?;
        self.refcounts(file)?.set(file, block_cluster, 1)
    }

    /// Place the refcount table in new clusters at the end of the file with room for `entries`.
    fn grow_table(&mut self, file: &HostFile, entries: u64) -> Result<()> {
        let cs = self.cluster_size();
        let (placed_at, old_clusters) = self.refcounts(file)?.table_place();
        let want = (entries * 8).div_ceil(cs).max(old_clusters * 2).max(1);
        if want * cs > MAX_REFTABLE_BYTES {
            return Err(Error::new(
                file.path(),
                FormatError::TooLarge {
                    what: "refcount table",
                    size: want * cs,
                    limit: MAX_REFTABLE_BYTES,
                },
            ));
        }
        // A table placed earlier and not yet committed was never pointed to: give it back now.
        if placed_at != self.committed_table.0 {
            for c in placed_at / cs..placed_at / cs + old_clusters {
                self.refcounts(file)?.set(file, c, 0)?;
                self.free_cursor = self.free_cursor.min(c);
            }
        }
        let start = self.append(want);
        self.refcounts(file)?.move_table(start * cs, want);
        for c in start..start + want {
            self.ensure_block(file, c)?;
            self.refcounts(file)?.set(file, c, 1)?;
        }
        Ok(())
    }

    /// Write the dirty refcount blocks. Returns whether the table changed too (new blocks, or a
    /// new place): its entries may point to new blocks only once those are durable, so the caller
    /// puts a barrier between this and `store_table` (as QEMU does when it adds a block).
    pub fn store_blocks(&mut self, file: &HostFile, metadata: &mut MetadataMap) -> Result<bool> {
        let cs = self.cluster_size();
        // The map only tracks clusters below the end of the file, which new blocks moved.
        metadata.set_end(self.end_cluster);
        let rc = self.refcounts(file)?;
        rc.write_dirty_blocks(file)?;
        if !rc.table_dirty() {
            return Ok(false);
        }
        // New refcount blocks (they always dirty the table) become known metadata.
        for block in rc.block_offsets() {
            if !metadata.contains(block) {
                metadata.add(MetaKind::RefcountBlock, block, cs);
            }
        }
        Ok(true)
    }

    /// Write the refcount table (after the barrier that follows `store_blocks`). When it moved,
    /// the caller makes it durable, points the header to it (`table_committed`) and releases the
    /// old one.
    pub fn store_table(&mut self, file: &HostFile) -> Result<Option<TableMove>> {
        let committed = self.committed_table;
        let rc = self.refcounts(file)?;
        if !rc.write_table(file)? {
            return Ok(None);
        }
        let (offset, clusters) = rc.table_place();
        if offset == committed.0 {
            return Ok(None);
        }
        Ok(Some(TableMove {
            offset,
            clusters,
            old: committed,
        }))
    }

    /// The header now points to the moved table (durably).
    pub fn table_committed(&mut self, moved: &TableMove, metadata: &mut MetadataMap) {
        self.committed_table = (moved.offset, moved.clusters);
        metadata.set_end(self.end_cluster);
        metadata.add(
            MetaKind::RefcountTable,
            moved.offset,
            moved.clusters * self.cluster_size(),
        );
    }

    /// Drop one reference from every cluster overlapping [offset, offset + len); clusters that
    /// become free are added to `freed` (their space goes back to the host once this is durable).
    pub fn release(
        &mut self,
        file: &HostFile,
        offset: u64,
        len: u64,
        freed: &mut Vec<u64>,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let first = offset / cs;
        let last = (offset + len.max(1) - 1) / cs;
        for c in first..=last {
            let rc = self.refcounts(file)?;
            let count = rc.get(file, c)?;
            if count == 0 {
                log::warn!(
                    "{}: cluster {:#x} already has refcount 0",
                    file.path().display(),
                    c * cs
                );
                continue;
            }
            rc.set(file, c, count - 1)?;
            log::trace!("released cluster {c}: refcount {}", count - 1);
            if count == 1 {
                self.free_cursor = self.free_cursor.min(c);
                freed.push(c);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "alloc/tests.rs"]
mod tests;
