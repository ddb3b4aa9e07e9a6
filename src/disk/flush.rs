//! The flusher: turns the cache's dirty blocks into image state. It groups them by top-layer
//! cluster, decides per cluster whether it is written in place or moves to a new cluster
//! (copy-on-write: then the whole cluster is assembled from what the guest sees), and hands
//! batches to the image's commit pipeline. It sees the cache, the writable top image (fixed when
//! the disk is made) and the guest's view of a block, and nothing else of the disk.
//!
//! One flush or discard runs at a time (the flush lock). Writes go on meanwhile: each block is
//! copied with its stamp, and a block written again before its copy is stored stays dirty.

use std::ops::Range;
use std::sync::Arc;

use parking_lot::Mutex;

use super::cache::BlockCache;
use crate::error::Result;
use crate::qcow2::{ClusterWrite, Durability, Qcow2Image, WriteTarget};

/// Bytes of cluster data handed to one commit: bounds the extra memory a flush needs.
pub(super) const BATCH_BYTES: u64 = 16 << 20;

/// Clusters zeroed by one commit of a discard: bounds the L2 tables one commit rewrites.
const DISCARD_BATCH: usize = 4096;

/// Fills a whole block with what the guest sees there, dirty data included: what copy-on-write
/// assembles a new cluster from.
pub(super) type Visible<'a> = &'a dyn Fn(u64, &mut [u8]) -> Result<()>;

#[derive(Debug)]
pub(super) struct Flusher {
    image: Arc<Qcow2Image>,
    /// The guest disk's size, fixed while the disk is open (the image's own header field is
    /// behind its metadata lock).
    size: u64,
    lock: Mutex<()>,
    /// Resident memory past which a write-back gives freed heap pages back (the cache size plus
    /// room for the program itself).
    memory_target: u64,
}

/// What a batch stores: its blocks with the stamps copied.
type Stored = Vec<(u64, u64)>;

impl Flusher {
    pub fn new(image: Arc<Qcow2Image>, size: u64, memory_target: u64) -> Self {
        Flusher {
            image,
            size,
            lock: Mutex::new(()),
            memory_target,
        }
    }

    /// Store the dirty blocks; with `Synced` they are on stable storage when this returns. Nothing
    /// is done when, once the flush before has ended, at most `dirty_bound` bytes are dirty: a
    /// writer that waited for a background write-back to make room need not start another one.
    pub fn flush(
        &self,
        cache: &BlockCache,
        visible: Visible,
        durability: Durability,
        dirty_bound: u64,
    ) -> Result<()> {
        let stored = {
            let _one_flush = self.lock.lock();
            if dirty_bound > 0 && cache.dirty_bytes() <= dirty_bound {
                return Ok(());
            }
            let dirty = cache.dirty_blocks();
            if dirty.is_empty() {
                return match durability {
                    Durability::Synced => self.image.sync_pending(),
                    Durability::Ordered => Ok(()),
                };
            }
            self.store(cache, visible, &dirty, durability)?;
            true
        };
        if stored && resident_bytes() > self.memory_target {
            // A write burst left freed heap pages behind (the blocks just stored moved to the
            // clean cache or were dropped): hand them back so memory follows the cache bound, not
            // its high-water mark. Only past the bound: pages given back are faulted in again by
            // the next writes, which costs a sequential write a fifth of its speed.
            // SAFETY: malloc_trim only returns unused memory of the allocator.
            unsafe { libc::malloc_trim(0) };
        }
        Ok(())
    }

    /// Before `block` becomes dirty: can the flusher store it? Nothing unstorable may be left
    /// dirty (it would fail every flush, and umount with it), so a write that could not be stored
    /// fails here, at once: a cluster whose mapping is damaged (data inside metadata), or a
    /// copy-on-write cluster whose other bytes cannot be read (a damaged compressed cluster, an
    /// unreadable backing file). A write of the whole cluster needs nothing read and may repair it.
    /// Returns whether the cluster is written in place (only then may a block stay partial).
    pub fn storable(&self, cache: &BlockCache, visible: Visible, block: u64) -> Result<bool> {
        let cs = self.image.layout().cluster_size();
        let bs = cache.block_size();
        let guest = block * bs / cs * cs;
        if let WriteTarget::InPlace { .. } = self.image.write_target(guest)? {
            return Ok(true);
        }
        // This block itself is read by the write when it is not written whole (and fails there).
        let end = (guest + cs).min(self.size);
        let others: Vec<u64> = (guest / bs..end.div_ceil(bs))
            .filter(|&b| b != block)
            .collect();
        if others.is_empty() || others.iter().any(|&b| cache.is_dirty(b)) {
            return Ok(false); // none, or checked when the cluster's first block became dirty
        }
        let mut scratch = vec![0u8; bs as usize];
        for b in others {
            visible(b, &mut scratch[..cache.block_len(b)])?;
        }
        Ok(false)
    }

    /// The whole top-layer clusters of [offset, end) that a discard can drop: None when there are
    /// none, or the image cannot discard (then the range is written with zeros like any write).
    pub fn whole_clusters(&self, offset: u64, end: u64) -> Option<Range<u64>> {
        let cs = self.image.layout().cluster_size();
        let clusters = offset.div_ceil(cs) * cs..(end / cs) * cs;
        (self.image.can_discard() && clusters.start < clusters.end).then_some(clusters)
    }

    /// Make the whole `clusters` (from `whole_clusters`) zero clusters, their data freed. The
    /// caller keeps writes out meanwhile, so none lands in the range between a commit and the
    /// forgetting of the range's blocks.
    pub fn discard(&self, cache: &BlockCache, clusters: Range<u64>) -> Result<()> {
        let _one_flush = self.lock.lock();
        let cs = self.image.layout().cluster_size();
        let bs = cache.block_size();
        // Dirty blocks of the range stay until the commit that zeroes their clusters has succeeded:
        // a discard that fails (no space for a new L2 table, an I/O error, a poisoned image) must
        // leave the guest reading what it read before, and its unstored writes still to be stored.
        // Batches that did commit read as zeros from then on, so their blocks go at once.
        let forget = |from: u64, to: u64| {
            for block in from / bs..to.div_ceil(bs) {
                cache.forget(block);
            }
        };
        let mut batch = Vec::new();
        let mut batch_start = clusters.start;
        for guest in clusters.clone().step_by(cs as usize) {
            batch.push(ClusterWrite {
                guest,
                target: WriteTarget::Discard,
                pieces: Vec::new(),
            });
            if batch.len() >= DISCARD_BATCH {
                self.image
                    .commit(std::mem::take(&mut batch), Durability::Ordered)?;
                forget(batch_start, guest + cs);
                batch_start = guest + cs;
            }
        }
        self.image.commit(batch, Durability::Synced)?;
        forget(batch_start, clusters.end);
        Ok(())
    }

    /// Store the `dirty` blocks in batches through the image's commit pipeline, which runs each
    /// batch's barrier while the next is assembled, encrypted and written: the device and the
    /// processor work at the same time instead of taking turns. A batch's blocks become clean once
    /// it is complete.
    fn store(
        &self,
        cache: &BlockCache,
        visible: Visible,
        dirty: &[u64],
        durability: Durability,
    ) -> Result<()> {
        let image = &*self.image;
        let mut pipeline = image.pipeline();
        let cs = image.layout().cluster_size();
        let bs = cache.block_size();
        let per_cluster = (cs / bs).max(1);
        let mut batch: Vec<ClusterWrite> = Vec::new();
        let mut stored: Stored = Vec::new();
        let mut batch_bytes = 0u64;
        for blocks in dirty.chunk_by(|a, b| a / per_cluster == b / per_cluster) {
            let guest = blocks[0] / per_cluster * cs;
            let target = image.write_target(guest)?;
            let pieces = match target {
                // Only the written part of a block is stored in place, in the units a partial
                // block is aligned to (sectors, or whole subclusters: a subcluster becomes
                // allocated as a whole).
                WriteTarget::InPlace { .. } => blocks
                    .iter()
                    .filter_map(|&b| {
                        let (at, data, stamp) = cache.dirty_copy(b)?;
                        stored.push((b, stamp));
                        Some((b * bs - guest + at as u64, pad(data)))
                    })
                    .collect(),
                WriteTarget::Allocate | WriteTarget::Discard => {
                    // Stamps first: a write landing during the copy then keeps its block dirty.
                    stored.extend(blocks.iter().filter_map(|&b| Some((b, cache.stamp(b)?))));
                    vec![(0, self.assemble(cache, visible, guest)?)]
                }
            };
            let write = ClusterWrite {
                guest,
                target,
                pieces,
            };
            batch_bytes += write.bytes() as u64;
            batch.push(write);
            if batch_bytes >= BATCH_BYTES {
                let done =
                    pipeline.submit(std::mem::take(&mut batch), std::mem::take(&mut stored))?;
                mark_clean(cache, done);
                batch_bytes = 0;
            }
        }
        let done = pipeline.submit(batch, stored)?;
        mark_clean(cache, done);
        let last = pipeline.finish(durability)?;
        mark_clean(cache, last);
        Ok(())
    }

    /// The full new content of the cluster at `guest`: what the guest sees there now.
    fn assemble(&self, cache: &BlockCache, visible: Visible, guest: u64) -> Result<Vec<u8>> {
        let cs = self.image.layout().cluster_size();
        let mut out = vec![0u8; cs as usize];
        let bs = cache.block_size();
        let shown = self.size.saturating_sub(guest).min(cs);
        for at in (0..shown).step_by(bs as usize) {
            let len = bs.min(shown - at) as usize;
            visible((guest + at) / bs, &mut out[at as usize..at as usize + len])?;
        }
        Ok(out)
    }
}

/// The blocks of a complete batch become clean (unless written again since their copy).
fn mark_clean(cache: &BlockCache, done: Option<Stored>) {
    for (b, stamp) in done.into_iter().flatten() {
        cache.mark_clean(b, stamp);
    }
}

/// Blocks are whole sectors except possibly the disk's last one; the image stores whole sectors.
fn pad(mut data: Vec<u8>) -> Vec<u8> {
    data.resize(data.len().div_ceil(512) * 512, 0);
    data
}

/// This process's resident memory in bytes (0 when /proc cannot tell).
fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    pages * page
}
