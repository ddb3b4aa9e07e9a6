//! The block cache: decrypted guest blocks, clean ones in sharded LRUs bounded by bytes, dirty ones
//! pinned until the flush writer has stored them. It speaks in guest blocks and knows nothing about
//! files: what the image holds for a block comes from the caller's loader, and storing dirty blocks
//! is the flusher's job (it takes copies with their stamps and marks them clean once stored).
//!
//! Lock order, owned here: a block's stripe, then its shard; a loader runs with the stripe held and
//! no shard locked (it reads the image, which may take the image's own locks).

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use lru::LruCache;
use parking_lot::{Mutex, MutexGuard};

use crate::error::Result;

const SHARDS: usize = 64;
const STRIPES: usize = 256;

/// Fills a whole block with what the image holds for it (dirty data not included).
pub(super) type Load<'a> = &'a dyn Fn(u64, &mut [u8]) -> Result<()>;

/// A block written since the last flush. `stamp` changes with every write to it, so the flush
/// writer can tell whether what it stored is still the latest content. `written` is the byte range
/// the writes covered (one span around all of them): a block written in place stores only that,
/// so a 4 KiB write costs 4 KiB on the image, not the whole block.
///
/// A block first written by an aligned write that did not need the rest of it is *partial*: only
/// `written` holds its content, and the rest is loaded when a read or a copy-on-write needs it. A
/// 4 KiB write into an uncached block so costs neither a read nor a decryption of the whole block.
#[derive(Debug)]
struct Dirty {
    data: Vec<u8>,
    stamp: u64,
    written: Range<usize>,
    partial: bool,
}

impl Dirty {
    /// Whether `range` of the block can be read from `data`.
    fn holds(&self, range: &Range<usize>) -> bool {
        !self.partial || (self.written.start <= range.start && range.end <= self.written.end)
    }
}

/// What became of a write into a dirty block.
#[derive(Debug, PartialEq, Eq)]
enum Update {
    Done,
    /// The block is not dirty: the caller loads or inserts it.
    NotDirty,
    /// The block is partial and the write does not extend its written span in whole aligned
    /// pieces: the rest is loaded first (`fill_partial`).
    NeedsLoad,
}

/// One shard's blocks. A block is either clean (shared, immutable) or dirty (owned), never both.
#[derive(Debug)]
struct Shard {
    clean: LruCache<u64, Arc<Vec<u8>>>,
    dirty: HashMap<u64, Dirty>,
}

/// Blocks keyed by guest block index.
#[derive(Debug)]
pub(super) struct BlockCache {
    shards: Vec<Mutex<Shard>>,
    /// Held while a block is loaded or modified, so two misses on one block load it once and two
    /// writes to one block do not interleave.
    stripes: Vec<Mutex<()>>,
    dirty_bytes: AtomicU64,
    stamps: AtomicU64,
    block_size: u64,
    /// The guest disk's size: its last block may be short.
    disk_size: u64,
    /// The alignment of a partial block's written span: the unit the flush writer stores (a
    /// power of two, at least a sector).
    partial_align: usize,
}

impl BlockCache {
    /// A cache of the blocks of a `disk_size`-byte disk, holding about `clean_bytes` of clean
    /// blocks of `block_size` bytes; partial blocks have written spans aligned to `partial_align`.
    pub fn new(clean_bytes: u64, block_size: u64, disk_size: u64, partial_align: usize) -> Self {
        debug_assert!(partial_align.is_power_of_two() && partial_align >= 512);
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
            block_size,
            disk_size,
            partial_align,
        }
    }

    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// The length of `block` (the disk's last block may be short).
    pub fn block_len(&self, block: u64) -> usize {
        let start = block * self.block_size;
        self.block_size.min(self.disk_size - start) as usize
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_bytes.load(Ordering::Relaxed)
    }

    fn shard(&self, block: u64) -> MutexGuard<'_, Shard> {
        self.shards[(block % SHARDS as u64) as usize].lock()
    }

    fn stripe(&self, block: u64) -> MutexGuard<'_, ()> {
        self.stripes[(block % STRIPES as u64) as usize].lock()
    }

    fn next_stamp(&self) -> u64 {
        self.stamps.fetch_add(1, Ordering::Relaxed)
    }

    /// Copy `out.len()` bytes of `block` from offset `within` into `out`, if the cache has them;
    /// false when it does not (the caller reads the image, then `overlay`s). A partial block that
    /// lacks them is completed first with `load`.
    pub fn read(&self, block: u64, within: usize, out: &mut [u8], load: Load) -> Result<bool> {
        let range = within..within + out.len();
        {
            let mut shard = self.shard(block);
            match shard.dirty.get(&block) {
                Some(d) if d.holds(&range) => {
                    out.copy_from_slice(&d.data[range]);
                    return Ok(true);
                }
                Some(_) => {}
                None => {
                    if let Some(c) = shard.clean.get(&block) {
                        out.copy_from_slice(&c[range]);
                        return Ok(true);
                    }
                    return Ok(false);
                }
            }
        }
        {
            let _serial = self.stripe(block);
            self.fill_partial(block, load)?;
        }
        // Complete now, or stored and dropped meanwhile (then the image has it).
        match self.shard(block).dirty.get(&block) {
            Some(d) if d.holds(&range) => {
                out.copy_from_slice(&d.data[range]);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Let the dirty bytes of `block` win over `out`, which holds the image's bytes of the block
    /// from offset `within`: a read through the image then shows the writes that landed meanwhile.
    pub fn overlay(&self, block: u64, within: usize, out: &mut [u8]) {
        if let Some(d) = self.shard(block).dirty.get(&block) {
            // Of a partial block, only the written span is newer than the image.
            let end = within + out.len();
            let (from, to) = match d.partial {
                true => (within.max(d.written.start), end.min(d.written.end)),
                false => (within, end),
            };
            if from < to {
                out[from - within..to - within].copy_from_slice(&d.data[from..to]);
            }
        }
    }

    /// Write `data` at `within` into `block`. `may_stay_partial`: the flusher stores the block's
    /// cluster in place, so an aligned write into an uncached block need not load the rest of it
    /// (`load` does when it must).
    pub fn write(
        &self,
        block: u64,
        within: usize,
        data: &[u8],
        may_stay_partial: bool,
        load: Load,
    ) -> Result<()> {
        let len = self.block_len(block);
        let range = within..within + data.len();
        let _serial = self.stripe(block);
        let mut shard = self.shard(block);
        match self.update_dirty(&mut shard, block, within, data) {
            Update::Done => return Ok(()),
            Update::NotDirty => {}
            Update::NeedsLoad => {
                drop(shard);
                self.fill_partial(block, load)?;
                shard = self.shard(block);
                if self.update_dirty(&mut shard, block, within, data) == Update::Done {
                    return Ok(());
                }
                // Stored and dropped meanwhile: go on as for a block that is not dirty.
            }
        }
        if range == (0..len) {
            self.insert_dirty(&mut shard, block, data.to_vec(), range);
            return Ok(());
        }
        if let Some(c) = shard.clean.get(&block) {
            let mut copy = c.as_ref().clone();
            copy[range.clone()].copy_from_slice(data);
            self.insert_dirty(&mut shard, block, copy, range);
            return Ok(());
        }
        if may_stay_partial && self.may_be_partial(&range, len) {
            self.insert_partial(&mut shard, block, len, within, data);
            return Ok(());
        }
        drop(shard);
        let mut base = vec![0u8; len];
        load(block, &mut base)?;
        base[range.clone()].copy_from_slice(data);
        self.insert_dirty(&mut self.shard(block), block, base, range);
        Ok(())
    }

    /// Whether `block` holds writes not yet stored.
    pub fn is_dirty(&self, block: u64) -> bool {
        self.shard(block).dirty.contains_key(&block)
    }

    /// Make `data` the dirty content of `block` (it was clean or absent); `written` is the part
    /// that differs from what the image holds.
    fn insert_dirty(&self, shard: &mut Shard, block: u64, data: Vec<u8>, written: Range<usize>) {
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

    /// Whether a write of `range` into an absent block of `len` bytes may make it partial.
    fn may_be_partial(&self, range: &Range<usize>, len: usize) -> bool {
        self.aligned(range, len) && range.len() < len
    }

    fn aligned(&self, range: &Range<usize>, len: usize) -> bool {
        let a = self.partial_align;
        range.start % a == 0 && (range.end % a == 0 || range.end == len)
    }

    /// Make `data` at `within` the only known content of the absent `block` of `len` bytes (see
    /// `may_be_partial`).
    fn insert_partial(
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
    fn update_dirty(&self, shard: &mut Shard, block: u64, within: usize, data: &[u8]) -> Update {
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

    /// Complete the partial `block` with what `load` reads from the image (the caller holds its
    /// stripe, so no write changes it meanwhile). The flush writer stores a partial block's written
    /// span only, so the rest of what was read is still what the image holds for the block,
    /// whatever it did meanwhile; nothing happens if the block is no longer partial or dirty.
    fn fill_partial(&self, block: u64, load: Load) -> Result<()> {
        let mut base = vec![0u8; self.block_len(block)];
        load(block, &mut base)?;
        let mut shard = self.shard(block);
        if let Some(d) = shard.dirty.get_mut(&block) {
            if d.partial && base.len() == d.data.len() {
                let w = d.written.clone();
                base[w.clone()].copy_from_slice(&d.data[w]);
                d.data = base;
                d.partial = false;
            }
        }
        Ok(())
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

    /// A copy of the written part of a dirty block, widened to whole units of `partial_align`:
    /// (offset in the block, bytes, stamp).
    pub fn dirty_copy(&self, block: u64) -> Option<(usize, Vec<u8>, u64)> {
        let align = self.partial_align;
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
        let cache = BlockCache::new(4096, 1024, 1 << 20, 512);
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
        let cache = BlockCache::new(4096, 1024, 1 << 20, 512);
        cache.insert_dirty(&mut cache.shard(5), 5, vec![1; 1024], 0..1024);
        let (_, _, stored) = cache.dirty_copy(5).unwrap();
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
        let cache = BlockCache::new(1 << 20, 8192, 1 << 20, 512);
        cache.insert_dirty(&mut cache.shard(1), 1, vec![0; 8192], 1000..1010);
        let (at, bytes, _) = cache.dirty_copy(1).unwrap();
        assert_eq!((at, bytes.len()), (512, 512));
        // A second write further on widens the span to cover both, in whole sectors.
        assert_eq!(
            cache.update_dirty(&mut cache.shard(1), 1, 5000, &[7; 100]),
            Update::Done
        );
        let (at, bytes, _) = cache.dirty_copy(1).unwrap();
        assert_eq!((at, bytes.len()), (512, 5120 - 512));
        assert_eq!(bytes[5000 - 512], 7);
    }

    #[test]
    fn the_last_block_of_a_disk_may_end_inside_a_sector() {
        let disk_size = 2 * 8192 + 700;
        let cache = BlockCache::new(1 << 20, 8192, disk_size, 512);
        assert_eq!(cache.block_len(2), 700);
        cache.insert_dirty(&mut cache.shard(2), 2, vec![1; 700], 600..700);
        let (at, bytes, _) = cache.dirty_copy(2).unwrap();
        assert_eq!((at, bytes.len()), (512, 188));
        // Subclusters of 2 KiB: the whole first one is stored.
        let cache = BlockCache::new(1 << 20, 8192, disk_size, 2048);
        cache.insert_dirty(&mut cache.shard(2), 2, vec![1; 700], 600..700);
        let (at, bytes, _) = cache.dirty_copy(2).unwrap();
        assert_eq!((at, bytes.len()), (0, 700));
    }

    #[test]
    fn a_partial_block_grows_by_aligned_writes_that_touch_its_span() {
        let cache = BlockCache::new(1 << 20, 8192, 1 << 20, 512);
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
        cache
            .fill_partial(1, &|_, base| {
                base.fill(9);
                Ok(())
            })
            .unwrap();
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
        let cache = BlockCache::new(1 << 20, 8192, 1 << 20, 512);
        cache.insert_partial(&mut cache.shard(3), 3, 8192, 0, &[1; 512]);
        let stamp = cache.stamp(3).unwrap();
        cache.mark_clean(3, stamp);
        assert_eq!(cache.dirty_bytes(), 0);
        assert!(!cache.shard(3).clean.contains(&3));
    }

    #[test]
    fn clean_blocks_are_evicted_by_the_byte_bound() {
        let cache = BlockCache::new(64 * 1024, 1024, 1 << 20, 512); // one block per shard
        for b in [0u64, 64, 128] {
            cache.shard(b).clean.put(b, Arc::new(vec![0; 1024]));
        }
        assert_eq!(cache.shard(0).clean.len(), 1);
    }

    #[test]
    fn reads_and_writes_load_a_block_only_when_they_need_the_rest_of_it() {
        let cache = BlockCache::new(1 << 20, 8192, 1 << 20, 512);
        let loads = std::cell::Cell::new(0);
        let load = |_: u64, base: &mut [u8]| {
            loads.set(loads.get() + 1);
            base.fill(9);
            Ok(())
        };
        let mut out = [0u8; 100];
        assert!(!cache.read(4, 0, &mut out, &load).unwrap(), "a miss");
        // Aligned, in place: partial, nothing loaded; unaligned: the block is loaded first.
        cache.write(4, 512, &[1; 512], true, &load).unwrap();
        assert_eq!(loads.get(), 0);
        cache.write(6, 10, &[2; 10], true, &load).unwrap();
        assert_eq!(loads.get(), 1);
        // Copy-on-write: never partial.
        cache.write(8, 512, &[3; 512], false, &load).unwrap();
        assert_eq!(loads.get(), 2);
        // A read inside the written span needs nothing; one beyond it completes the block once.
        assert!(cache.read(4, 600, &mut out, &load).unwrap());
        assert_eq!((out[0], loads.get()), (1, 2));
        assert!(cache.read(4, 0, &mut out, &load).unwrap());
        assert_eq!((out[0], loads.get()), (9, 3));
        assert!(cache.read(4, 0, &mut out, &load).unwrap());
        assert_eq!(loads.get(), 3);
        // What the image holds, with the dirty bytes over it.
        let mut image = [0u8; 20];
        cache.overlay(6, 5, &mut image);
        assert_eq!(image[..5], [9; 5], "a whole dirty block wins all over");
        assert_eq!(image[5..15], [2; 10]);
        // Of a partial block only the written span wins.
        let mut image = [0u8; 1024];
        cache.insert_partial(&mut cache.shard(10), 10, 8192, 512, &[5; 512]);
        cache.overlay(10, 0, &mut image);
        assert_eq!((image[511], image[512], image[1023]), (0, 5, 5));
        assert!(cache.is_dirty(10) && !cache.is_dirty(11));
    }
}
