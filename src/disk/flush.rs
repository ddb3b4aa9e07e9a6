//! The flush writer's half that knows the cache: group dirty blocks by top-layer cluster, decide per
//! cluster whether it is written in place or moves to a new cluster (copy-on-write: then the whole
//! cluster is assembled from dirty blocks and what the chain shows), and hand batches to the image.

use std::sync::atomic::Ordering;

use super::Disk;
use crate::chain::Layer;
use crate::error::Result;
use crate::qcow2::{ClusterWrite, Qcow2Image, WriteTarget};

/// Bytes of cluster data handed to one commit: bounds the extra memory a flush needs.
pub(super) const BATCH_BYTES: u64 = 16 << 20;

/// Clusters zeroed by one commit of a discard: bounds the L2 tables one commit rewrites.
const DISCARD_BATCH: usize = 4096;

/// Store the dirty blocks; with `durable` (fsync, close, umount) they are on stable storage when
/// this returns, without it (background write-back) only the barriers that order metadata are paid.
pub(super) fn flush(disk: &Disk, durable: bool) -> Result<()> {
    flush_above(disk, durable, 0)
}

/// Like `flush`, but nothing is done when, once the flush before has ended, at most `dirty_bound`
/// bytes are dirty: a writer that waited for a background write-back to make room need not start
/// another one.
pub(super) fn flush_above(disk: &Disk, durable: bool, dirty_bound: u64) -> Result<()> {
    if disk.read_only {
        return Ok(());
    }
    let result = flush_blocks(disk, durable, dirty_bound);
    let stored = matches!(result, Ok(true));
    if stored && !durable && resident_bytes() > disk.memory_target {
        // A write burst left freed heap pages behind (the blocks just stored moved to the clean
        // cache or were dropped): hand them back so memory follows the cache bound, not its
        // high-water mark. Only past the bound: pages given back are faulted in again by the next
        // writes, which costs a sequential write a fifth of its speed.
        // SAFETY: malloc_trim only returns unused memory of the allocator.
        unsafe { libc::malloc_trim(0) };
    }
    result.map(|_| ())
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

/// Whether blocks were stored (false: nothing to do).
fn flush_blocks(disk: &Disk, durable: bool, dirty_bound: u64) -> Result<bool> {
    // Writes go on meanwhile: each block is copied with its stamp, and a block written again before
    // its copy is stored stays dirty for the next flush.
    let _one_flush = disk.flush_lock.lock();
    if dirty_bound > 0 && disk.cache.dirty_bytes() <= dirty_bound {
        return Ok(false);
    }
    let dirty = disk.cache.dirty_blocks();
    if dirty.is_empty() {
        return match disk.chain.top() {
            Layer::Qcow2(image) if durable => image.sync_pending().map(|_| false),
            _ => Ok(false),
        };
    }
    match disk.chain.top() {
        // Chain::open only accepts a qcow2 image on top; raw layers are backing files, never written.
        Layer::Raw(file) => {
            return Err(crate::Error::new(
                file.path(),
                std::io::Error::from_raw_os_error(libc::EROFS),
            ))
        }
        Layer::Qcow2(image) => store(disk, image, &dirty, durable)?,
    }
    Ok(true)
}

/// Store the `dirty` blocks in batches through the image's commit pipeline, which runs each
/// batch's barrier while the next is assembled, encrypted and written: the device and the
/// processor work at the same time instead of taking turns. A batch's blocks become clean once it
/// is complete.
fn store(disk: &Disk, image: &Qcow2Image, dirty: &[u64], durable: bool) -> Result<()> {
    let mut pipeline = image.pipeline();
    let cs = image.layout().cluster_size();
    let per_cluster = (cs / disk.block_size).max(1);
    // Only the written part of a block is stored in place, in the units a partial block is
    // aligned to (sectors, or whole subclusters: a subcluster becomes allocated as a whole).
    let align = disk.cache.partial_align();
    let mut batch: Vec<ClusterWrite> = Vec::new();
    let mut batch_blocks: Vec<(u64, u64)> = Vec::new(); // (block, stamp stored)
    let mut batch_bytes = 0u64;
    let mut i = 0;
    while i < dirty.len() {
        let cluster = dirty[i] / per_cluster;
        let mut j = i;
        while j < dirty.len() && dirty[j] / per_cluster == cluster {
            j += 1;
        }
        let blocks = &dirty[i..j];
        let guest = cluster * cs;
        let target = image.write_target(guest)?;
        let pieces = match target {
            WriteTarget::InPlace { .. } => blocks
                .iter()
                .filter_map(|&b| {
                    let (at, data, stamp) = disk.cache.dirty_copy(b, align)?;
                    batch_blocks.push((b, stamp));
                    Some((b * disk.block_size - guest + at as u64, pad(data)))
                })
                .collect(),
            WriteTarget::Allocate | WriteTarget::Discard => {
                // Stamps first: a write landing during the copy then keeps its block dirty.
                batch_blocks.extend(
                    blocks
                        .iter()
                        .filter_map(|&b| Some((b, disk.cache.stamp(b)?))),
                );
                vec![(0, assemble(disk, guest, cs)?)]
            }
        };
        batch_bytes += pieces
            .iter()
            .map(|(_, d): &(u64, Vec<u8>)| d.len() as u64)
            .sum::<u64>();
        batch.push(ClusterWrite {
            guest,
            target,
            pieces,
        });
        if batch_bytes >= BATCH_BYTES {
            let stored = Stored {
                blocks: std::mem::take(&mut batch_blocks),
                clusters: batch.len() as u64,
            };
            let done = pipeline.submit(std::mem::take(&mut batch), stored)?;
            mark_clean(disk, done);
            batch_bytes = 0;
        }
        i = j;
    }
    let stored = Stored {
        blocks: batch_blocks,
        clusters: batch.len() as u64,
    };
    let done = pipeline.submit(batch, stored)?;
    mark_clean(disk, done);
    let last = pipeline.finish(durable)?;
    mark_clean(disk, last);
    Ok(())
}

/// What a batch stores: its blocks with the stamps copied, and how many clusters they fill.
struct Stored {
    blocks: Vec<(u64, u64)>,
    clusters: u64,
}

/// The blocks of a complete batch become clean (unless written again since their copy).
fn mark_clean(disk: &Disk, done: Option<Stored>) {
    let Some(done) = done else { return };
    for &(b, stamp) in &done.blocks {
        disk.cache.mark_clean(b, stamp);
    }
    disk.stats
        .flushed_clusters
        .fetch_add(done.clusters, Ordering::Relaxed);
}

/// Blocks are whole sectors except possibly the disk's last one; the image stores whole sectors.
fn pad(mut data: Vec<u8>) -> Vec<u8> {
    data.resize(data.len().div_ceil(512) * 512, 0);
    data
}

/// The full new content of the cluster at `guest`: dirty blocks over what the chain shows now.
fn assemble(disk: &Disk, guest: u64, cs: u64) -> Result<Vec<u8>> {
    let mut out = vec![0u8; cs as usize];
    let bs = disk.block_size;
    let visible = disk.size.saturating_sub(guest).min(cs);
    let mut at = 0u64;
    while at < visible {
        let block = (guest + at) / bs;
        let len = bs.min(visible - at) as usize;
        let dst = &mut out[at as usize..at as usize + len];
        // Dirty blocks come from the cache, the rest from the cache or the chain.
        disk.read_block(block, 0, dst)?;
        at += bs;
    }
    Ok(out)
}

/// Zero [offset, offset + len): whole top-layer clusters become zero clusters (their data freed), the
/// partial clusters at either end are written with zeros like any write.
pub(super) fn discard(disk: &Disk, offset: u64, len: u64) -> Result<()> {
    let end = offset + len;
    let image = match disk.chain.top() {
        Layer::Qcow2(image) if image.can_discard() => image,
        _ => return write_zeros(disk, offset, end),
    };
    let cs = image.layout().cluster_size();
    let first = offset.div_ceil(cs) * cs;
    let last = (end / cs) * cs;
    if first >= last {
        return write_zeros(disk, offset, end);
    }
    write_zeros(disk, offset, first)?;
    write_zeros(disk, last, end)?;
    *disk.allocated.lock() = None;
    let _one_flush = disk.flush_lock.lock();
    let _no_writes = disk.write_gate.write();
    // Dirty blocks of the range stay until the commit that zeroes their clusters has succeeded:
    // a discard that fails (no space for a new L2 table, an I/O error, a poisoned image) must
    // leave the guest reading what it read before, and its unstored writes still to be stored.
    // Batches that did commit read as zeros from then on, so their blocks go at once.
    let forget = |from: u64, to: u64| {
        for block in from / disk.block_size..to.div_ceil(disk.block_size) {
            disk.cache.forget(block);
        }
    };
    let mut batch = Vec::new();
    let mut batch_start = first;
    for guest in (first..last).step_by(cs as usize) {
        batch.push(ClusterWrite {
            guest,
            target: WriteTarget::Discard,
            pieces: Vec::new(),
        });
        if batch.len() >= DISCARD_BATCH {
            image.commit(std::mem::take(&mut batch), false)?;
            forget(batch_start, guest + cs);
            batch_start = guest + cs;
        }
    }
    image.commit(batch, true)?;
    forget(batch_start, last);
    Ok(())
}

/// Write zeros over [from, to) through the cache (nothing when empty).
fn write_zeros(disk: &Disk, from: u64, to: u64) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(to.saturating_sub(from)) as usize];
    let mut at = from;
    while at < to {
        let n = CHUNK.min(to - at) as usize;
        crate::disk::BlockDevice::write_at(disk, at, &zeros[..n])?;
        at += n as u64;
    }
    Ok(())
}
