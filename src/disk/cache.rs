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
///
/// A block first written by an aligned write that did not need the rest of it is *partial*: only
/// `written` holds its content, and the rest is loaded when a read or a copy-on-write needs it. A
/// 4 KiB write into an uncached block so costs neither a read nor a decryption of the whole block.
#[derive(Debug)]
pub struct Dirty {
    pub data: Vec<u8>,
    pub stamp: u64,
    pub written: Range<usize>,
    pub partial: bool,
}

impl Dirty {
    /// Whether `range` of the block can be read from `data`.
    pub fn holds(&self, range: &Range<usize>) -> bool {
        !self.partial || (self.written.start <= range.start && range.end <= self.written.end)
    }
}

/// What became of a write into the cache.
#[derive(Debug, PartialEq, Eq)]
pub enum Update {
    Done,
    /// The block is not dirty: the caller loads or inserts it.
    NotDirty,
    /// The block is partial and the write does not extend its written span in whole aligned
    /// pieces: the caller loads the rest first (`fill_partial`).
    NeedsLoad,
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
    /// The alignment of a partial block's written span (the unit the flush writer stores), or 0
    /// when blocks are never partial.
    partial_align: usize,
}

impl BlockCache {
    /// A cache holding about `clean_bytes` of clean blocks of `block_size` bytes; partial blocks
    /// have written spans aligned to `partial_align` (0: no partial blocks).
    pub fn new(clean_bytes: u64, block_size: u64, partial_align: usize) -> Self {
        debug_assert!(partial_align == 0 || partial_align.is_power_of_two());
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
            partial_align,
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
                partial: false,
            },
        );
    }

    /// The unit a block's written span is stored in (see `partial_align` of `new`).
    pub fn partial_align(&self) -> usize {
        self.partial_align
    }

    /// Whether a write of `range` into an absent block of `len` bytes may make it partial.
    pub fn may_be_partial(&self, range: &Range<usize>, len: usize) -> bool {
        self.aligned(range, len) && range.len() < len
    }

    fn aligned(&self, range: &Range<usize>, len: usize) -> bool {
        let a = self.partial_align;
        a != 0 && range.start % a == 0 && (range.end % a == 0 || range.end == len)
    }

    /// Make `data` at `within` the only known content of the absent `block` of `len` bytes (see
    /// `may_be_partial`).
    pub fn insert_partial(
        &self,
        shard: &mut Shard,
        block: u64,
        len: usize,
        within: usize,
        data: &[u8],
    ) {
        let mut content = vec![0u8; len];
        content[within..within + data.len()].copy_from_slice(data);
        self.insert_dirty(shard, block, content, within..within + data.len());
        if let Some(d) = shard.dirty.get_mut(&block) {
            d.partial = true;
        }
    }

    /// Write `data` at `within` into the dirty `block`.
    pub fn update_dirty(
        &self,
        shard: &mut Shard,
        block: u64,
        within: usize,
        data: &[u8],
    ) -> Update {
        let Some(d) = shard.dirty.get_mut(&block) else {
            return Update::NotDirty;
        };
        let range = within..within + data.len();
        let span = d.written.start.min(range.start)..d.written.end.max(range.end);
        if d.partial {
            // The span must stay one aligned run of written bytes: touching it, aligned ends.
            let touches = range.start <= d.written.end && d.written.start <= range.end;
            if !touches || (span != d.written && !self.aligned(&span, d.data.len())) {
                return Update::NeedsLoad;
            }
        }
        d.data[range].copy_from_slice(data);
        d.stamp = self.next_stamp();
        // Written all over, a partial block is whole.
        d.partial &= span != (0..d.data.len());
        d.written = span;
        Update::Done
    }

    /// Complete the partial `block` with `base`, what the image holds for it: the written span
    /// stays. Nothing happens if the block is no longer partial or no longer dirty.
    pub fn fill_partial(&self, shard: &mut Shard, block: u64, mut base: Vec<u8>) {
        if let Some(d) = shard.dirty.get_mut(&block) {
            if d.partial && base.len() == d.data.len() {
                let w = d.written.clone();
                base[w.clone()].copy_from_slice(&d.data[w]);
                d.data = base;
                d.partial = false;
            }
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
                // A partial block is not a whole block to serve reads from: the image has it now.
                if !d.partial {
                    shard.clean.put(block, Arc::new(d.data));
                }
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
        let cache = BlockCache::new(4096, 1024, 512);
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
        let cache = BlockCache::new(4096, 1024, 512);
        cache.insert_dirty(&mut cache.shard(5), 5, vec![1; 1024], 0..1024);
        let (_, _, stored) = cache.dirty_copy(5, 512).unwrap();
        assert_eq!(
            cache.update_dirty(&mut cache.shard(5), 5, 0, &[2; 10]),
            Update::Done
        );
        cache.mark_clean(5, stored);
        assert_eq!(cache.dirty_blocks(), vec![5]);
        assert_eq!(cache.dirty_bytes(), 1024);
    }

    #[test]
    fn only_the_written_sectors_are_copied_for_storing() {
        let cache = BlockCache::new(1 << 20, 8192, 512);
        cache.insert_dirty(&mut cache.shard(1), 1, vec![0; 8192], 1000..1010);
        let (at, bytes, _) = cache.dirty_copy(1, 512).unwrap();
        assert_eq!((at, bytes.len()), (512, 512));
        // A second write further on widens the span to cover both, in whole sectors.
        assert_eq!(
            cache.update_dirty(&mut cache.shard(1), 1, 5000, &[7; 100]),
            Update::Done
        );
        let (at, bytes, _) = cache.dirty_copy(1, 512).unwrap();
        assert_eq!((at, bytes.len()), (512, 5120 - 512));
        assert_eq!(bytes[5000 - 512], 7);
    }

    #[test]
    fn the_last_block_of_a_disk_may_end_inside_a_sector() {
        let cache = BlockCache::new(1 << 20, 8192, 512);
        cache.insert_dirty(&mut cache.shard(2), 2, vec![1; 700], 600..700);
        let (at, bytes, _) = cache.dirty_copy(2, 512).unwrap();
        assert_eq!((at, bytes.len()), (512, 188));
        // Subclusters of 2 KiB: the whole first one is stored.
        let (at, bytes, _) = cache.dirty_copy(2, 2048).unwrap();
        assert_eq!((at, bytes.len()), (0, 700));
    }

    #[test]
    fn a_partial_block_grows_by_aligned_writes_that_touch_its_span() {
        let cache = BlockCache::new(1 << 20, 8192, 512);
        assert!(cache.may_be_partial(&(1024..2048), 8192));
        assert!(!cache.may_be_partial(&(1000..2048), 8192)); // unaligned: load the block
        assert!(!cache.may_be_partial(&(0..8192), 8192)); // whole: not partial at all
        cache.insert_partial(&mut cache.shard(1), 1, 8192, 1024, &[1; 1024]);
        let up =
            |off: usize, len: usize| cache.update_dirty(&mut cache.shard(1), 1, off, &vec![2; len]);
        assert_eq!(up(1100, 10), Update::Done); // inside the span
        assert_eq!(up(2048, 512), Update::Done); // adjoining, aligned
        assert_eq!(up(2560, 100), Update::NeedsLoad); // adjoining, unaligned end
        assert_eq!(up(4096, 512), Update::NeedsLoad); // a gap before it
        cache.insert_partial(&mut cache.shard(2), 2, 8192, 4096, &[1; 4096]);
        assert_eq!(
            cache.update_dirty(&mut cache.shard(2), 2, 0, &[1; 4096]),
            Update::Done
        );
        assert!(!cache.shard(2).dirty[&2].partial, "written all over: whole");
        {
            let shard = cache.shard(1);
            let d = &shard.dirty[&1];
            assert_eq!(d.written, 1024..2560);
            assert!(d.holds(&(1024..2000)) && !d.holds(&(0..1100)));
        }
        cache.fill_partial(&mut cache.shard(1), 1, vec![9; 8192]);
        assert_eq!(up(4096, 100), Update::Done);
        let shard = cache.shard(1);
        let d = &shard.dirty[&1];
        assert!(!d.partial && d.holds(&(0..8192)));
        assert_eq!(
            (
                d.data[0],
                d.data[1024],
                d.data[1100],
                d.data[3000],
                d.data[4096]
            ),
            (9, 1, 2, 9, 2)
        );
    }

    #[test]
    fn a_stored_partial_block_is_dropped_not_kept_clean() {
        let cache = BlockCache::new(1 << 20, 8192, 512);
        cache.insert_partial(&mut cache.shard(3), 3, 8192, 0, &[1; 512]);
        let stamp = cache.stamp(3).unwrap();
        cache.mark_clean(3, stamp);
        assert_eq!(cache.dirty_bytes(), 0);
        assert!(!cache.shard(3).clean.contains(&3));
    }

    #[test]
    fn clean_blocks_are_evicted_by_the_byte_bound() {
        let cache = BlockCache::new(64 * 1024, 1024, 512); // one block per shard
        for b in [0u64, 64, 128] {
            cache.shard(b).clean.put(b, Arc::new(vec![0; 1024]));
        }
        assert_eq!(cache.shard(0).clean.len(), 1);
    }
}
