//! The block cache: decrypted guest blocks, clean ones in sharded LRUs bounded by bytes, dirty ones
//! pinned until the flush writer has stored them. It knows nothing about files: loading a block and
//! writing dirty ones back are done by the caller.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use lru::LruCache;
use parking_lot::{Mutex, MutexGuard};

const SHARDS: usize = 64;
const STRIPES: usize = 256;

/// A block written since the last flush. `stamp` changes with every write to it, so the flush
/// writer can tell whether what it stored is still the latest content.
#[derive(Debug)]
pub struct Dirty {
    pub data: Vec<u8>,
    pub stamp: u64,
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

    /// Make `data` the dirty content of `block` (it was clean or absent).
    pub fn insert_dirty(&self, shard: &mut Shard, block: u64, data: Vec<u8>) {
        shard.clean.pop(&block);
        self.dirty_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        shard.dirty.insert(
            block,
            Dirty {
                data,
                stamp: self.next_stamp(),
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

    /// A copy of a dirty block's content, with its stamp.
    pub fn dirty_copy(&self, block: u64) -> Option<(Vec<u8>, u64)> {
        self.shard(block)
            .dirty
            .get(&block)
            .map(|d| (d.data.clone(), d.stamp))
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
            cache.insert_dirty(&mut s, 3, vec![1; 1024]);
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
        cache.insert_dirty(&mut cache.shard(5), 5, vec![1; 1024]);
        let (_, stored) = cache.dirty_copy(5).unwrap();
        assert!(cache.update_dirty(&mut cache.shard(5), 5, 0, &[2; 10]));
        cache.mark_clean(5, stored);
        assert_eq!(cache.dirty_blocks(), vec![5]);
        assert_eq!(cache.dirty_bytes(), 1024);
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
