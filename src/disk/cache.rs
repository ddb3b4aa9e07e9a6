//! The block cache: decrypted guest blocks, clean ones in sharded LRUs bounded by bytes, dirty ones
//! pinned until the flush writer has stored them. It knows nothing about files: loading a block and
//! writing dirty ones back are done by the caller.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use lru::LruCache;
use parking_lot::{Mutex, MutexGuard};

const SHARDS: usize = 64;
const STRIPES: usize = 256;

/// A block written since the last flush. `stamp` changes with every write to it, so the flush
/// writer can tell whether what it stored is still the latest content. `written` is the byte range
/// the writes covered (one span around all of them): a block written in place stores only that,
/// so a 4 KiB write costs 4 KiB on the image, not the whole block.
#[derive(Debug)]
pub struct Dirty {
    pub data: Vec<u8>,
    pub stamp: u64,
    pub written: Range<usize>,
}

/// One shard's blocks. A block is either clean (shared, immutable) or dirty (owned), never both.
#[derive(Debug)]
pub struct Shard {
    pub clean: LruCache<u64, Arc<Vec<u8>>>,
    pub dirty: HashMap<u64, Dirty>,
}

/// Blocks keyed by guest block index.
#[derive(Debug)]
pub struct BlockCache {
    shards: Vec<Mutex<Shard>>,
    /// Held while a block is loaded or modified, so two misses on one block load it once and two
    /// writes to one block do not interleave.
    stripes: Vec<Mutex<()>>,
    dirty_bytes: AtomicU64,
    stamps: AtomicU64,
}

impl BlockCache {
    /// A cache holding about `clean_bytes` of clean blocks of `block_size` bytes.
    pub fn new(clean_bytes: u64, block_size: u64) -> Self {
        let per_shard = (clean_bytes / block_size / SHARDS as u64).max(1) as usize;
        let cap = NonZeroUsize::new(per_shard).unwrap_or(NonZeroUsize::MIN);
        BlockCache {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        clean: LruCache::new(cap),
                        dirty: HashMap::new(),
                    })
                })
                .collect(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            dirty_bytes: AtomicU64::new(0),
            stamps: AtomicU64::new(1),
        }
    }

    pub fn shard(&self, block: u64) -> MutexGuard<'_, Shard> {
        self.shards[(block % SHARDS as u64) as usize].lock()
    }

    pub fn stripe(&self, block: u64) -> MutexGuard<'_, ()> {
        self.stripes[(block % STRIPES as u64) as usize].lock()
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_bytes.load(Ordering::Relaxed)
    }

    fn next_stamp(&self) -> u64 {
        self.stamps.fetch_add(1, Ordering::Relaxed)
    }

    /// Make `data` the dirty content of `block` (it was clean or absent); `written` is the part
    /// that differs from what the image holds.
    pub fn insert_dirty(
        &self,
        shard: &mut Shard,
        block: u64,
        data: Vec<u8>,
        written: Range<usize>,
    ) {
        shard.clean.pop(&block);
        self.dirty_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        shard.dirty.insert(
            block,
            Dirty {
                data,
                stamp: self.next_stamp(),
                written,
            },
        );
    }

    /// Write `data` at `within` into the dirty `block`; false if it is not dirty.
    pub fn update_dirty(&self, shard: &mut Shard, block: u64, within: usize, data: &[u8]) -> bool {
        let stamp = self.next_stamp();
        match shard.dirty.get_mut(&block) {
            Some(d) => {
                d.data[within..within + data.len()].copy_from_slice(data);
                d.stamp = stamp;
                d.written = d.written.start.min(within)..d.written.end.max(within + data.len());
                true
            }
            None => false,
        }
    }

    /// The flush writer stored `block` as of `stamp`: it becomes clean, unless it was written again
    /// since (then it stays dirty for the next flush).
    pub fn mark_clean(&self, block: u64, stamp: u64) {
        let mut shard = self.shard(block);
        if shard.dirty.get(&block).is_some_and(|d| d.stamp == stamp) {
            if let Some(d) = shard.dirty.remove(&block) {
                self.dirty_bytes
                    .fetch_sub(d.data.len() as u64, Ordering::Relaxed);
                shard.clean.put(block, Arc::new(d.data));
            }
        }
    }

    /// The stamp of a dirty block (None when clean).
    pub fn stamp(&self, block: u64) -> Option<u64> {
        self.shard(block).dirty.get(&block).map(|d| d.stamp)
    }

    /// Drop `block`, dirty or clean (its content is being replaced underneath).
    pub fn forget(&self, block: u64) {
        let mut shard = self.shard(block);
        shard.clean.pop(&block);
        if let Some(d) = shard.dirty.remove(&block) {
            self.dirty_bytes
                .fetch_sub(d.data.len() as u64, Ordering::Relaxed);
        }
    }

    /// Every dirty block index, sorted.
    pub fn dirty_blocks(&self) -> Vec<u64> {
        let mut all: Vec<u64> = self
            .shards
            .iter()
            .flat_map(|s| s.lock().dirty.keys().copied().collect::<Vec<_>>())
            .collect();
        all.sort_unstable();
        all
    }

    /// A copy of the written part of a dirty block, widened to multiples of `align` (a power of two,
    /// at least a sector): (offset in the block, bytes, stamp).
    pub fn dirty_copy(&self, block: u64, align: usize) -> Option<(usize, Vec<u8>, u64)> {
        debug_assert!(align.is_power_of_two() && align >= 512);
        self.shard(block).dirty.get(&block).map(|d| {
            let start = d.written.start & !(align - 1);
            let end = d
                .written
                .end
                .div_ceil(align)
                .saturating_mul(align)
                .min(d.data.len());
            (start, d.data[start..end].to_vec(), d.stamp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_blocks_are_pinned_and_counted() {
        let cache = BlockCache::new(4096, 1024);
        {
            let mut s = cache.shard(3);
            cache.insert_dirty(&mut s, 3, vec![1; 1024], 0..1024);
        }
        assert_eq!(cache.dirty_bytes(), 1024);
        assert_eq!(cache.dirty_blocks(), vec![3]);
        let stamp = cache.stamp(3).unwrap();
        cache.mark_clean(3, stamp);
        assert_eq!(cache.dirty_bytes(), 0);
        assert!(cache.shard(3).clean.contains(&3));
    }

    #[test]
    fn a_block_written_during_a_flush_stays_dirty() {
        let cache = BlockCache::new(4096, 1024);
        cache.insert_dirty(&mut cache.shard(5), 5, vec![1; 1024], 0..1024);
        let (_, _, stored) = cache.dirty_copy(5, 512).unwrap();
        assert!(cache.update_dirty(&mut cache.shard(5), 5, 0, &[2; 10]));
        cache.mark_clean(5, stored);
        assert_eq!(cache.dirty_blocks(), vec![5]);
        assert_eq!(cache.dirty_bytes(), 1024);
    }

    #[test]
    fn only_the_written_sectors_are_copied_for_storing() {
        let cache = BlockCache::new(1 << 20, 8192);
        cache.insert_dirty(&mut cache.shard(1), 1, vec![0; 8192], 1000..1010);
        let (at, bytes, _) = cache.dirty_copy(1, 512).unwrap();
        assert_eq!((at, bytes.len()), (512, 512));
        // A second write further on widens the span to cover both, in whole sectors.
        assert!(cache.update_dirty(&mut cache.shard(1), 1, 5000, &[7; 100]));
        let (at, bytes, _) = cache.dirty_copy(1, 512).unwrap();
        assert_eq!((at, bytes.len()), (512, 5120 - 512));
        assert_eq!(bytes[5000 - 512], 7);
    }

    #[test]
    fn the_last_block_of_a_disk_may_end_inside_a_sector() {
        let cache = BlockCache::new(1 << 20, 8192);
        cache.insert_dirty(&mut cache.shard(2), 2, vec![1; 700], 600..700);
        let (at, bytes, _) = cache.dirty_copy(2, 512).unwrap();
        assert_eq!((at, bytes.len()), (512, 188));
        // Subclusters of 2 KiB: the whole first one is stored.
        let (at, bytes, _) = cache.dirty_copy(2, 2048).unwrap();
        assert_eq!((at, bytes.len()), (0, 700));
    }

    #[test]
    fn clean_blocks_are_evicted_by_the_byte_bound() {
        let cache = BlockCache::new(64 * 1024, 1024); // one block per shard
        for b in [0u64, 64, 128] {
            cache.shard(b).clean.put(b, Arc::new(vec![0; 1024]));
        }
        assert_eq!(cache.shard(0).clean.len(), 1);
    }
}
