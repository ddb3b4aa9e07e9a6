//! The guest's view of the chain: byte ranges split into blocks, served from the block cache; writes
//! go into the cache as dirty blocks and the flush writer (flush.rs) turns them into image state.

mod cache;
mod flush;
pub(crate) mod partition;
pub(crate) mod views;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};

use crate::chain::{Chain, Layer};
use crate::error::{Error, Result};
use cache::{BlockCache, Update};

/// The largest cache block: bigger clusters are cached in parts so a small read decrypts little.
const MAX_BLOCK: u64 = 64 << 10;

/// What a FUSE file needs from a disk: the thin interface the mount layer sees.
pub trait BlockDevice: Send + Sync {
    fn size(&self) -> u64;
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()>;
    /// Make every write so far durable.
    fn flush(&self) -> Result<()>;
    fn is_read_only(&self) -> bool;
    /// Bytes of data the disk really holds (for `st_blocks`).
    fn allocated_bytes(&self) -> Result<u64>;
    /// The first offset at or after `offset` that holds data (`want_data`) or is a hole; None if none.
    fn seek(&self, offset: u64, want_data: bool) -> Result<Option<u64>>;
    /// Make [offset, offset + len) read as zeros, giving the space back where whole clusters allow.
    fn discard(&self, offset: u64, len: u64) -> Result<()>;
}

/// Tunables of a disk.
#[derive(Debug, Clone, Copy)]
pub struct DiskOptions {
    /// Bytes of decrypted blocks kept in memory, dirty ones included.
    pub cache_size: u64,
    pub read_only: bool,
}

/// The guest disk over a chain.
#[derive(Debug)]
pub struct Disk {
    chain: Arc<Chain>,
    cache: BlockCache,
    block_size: u64,
    size: u64,
    read_only: bool,
    dirty_limit: u64,
    /// Resident memory past which a write-back gives freed heap pages back (the cache size plus
    /// room for the program itself).
    memory_target: u64,
    /// Writers hold it shared; a discard exclusively, so no write lands in its range between its
    /// commit and the forgetting of the range's blocks. The flush writer does not take it: it
    /// copies each block with its stamp, and a block written meanwhile stays dirty.
    write_gate: RwLock<()>,
    flush_lock: Mutex<()>,
    /// Wakes the background writer early (set: dirty data passed half its bound).
    writer_wake: (Mutex<bool>, Condvar),
    last_write: Mutex<Option<Instant>>,
    /// `allocated_bytes`, until the next flush or discard changes it.
    allocated: Mutex<Option<u64>>,
    /// Bytes written and flushed, for logs.
    pub(crate) stats: Stats,
}

#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub flushed_clusters: AtomicU64,
}

impl Disk {
    pub fn new(chain: Chain, opts: DiskOptions) -> Self {
        let block_size = match chain.top() {
            Layer::Qcow2(q) => q.layout().cluster_size().min(MAX_BLOCK),
            Layer::Raw(_) => MAX_BLOCK,
        };
        // The cache budget holds the dirty data, the copies a flush batch makes, and clean blocks
        // (recently written ones: reads do not fill the cache) in what is left.
        let dirty_limit = (64 << 20).min(opts.cache_size / 4).max(block_size * 4);
        let in_flight = flush::BATCH_BYTES.min(opts.cache_size / 4);
        let clean = opts
            .cache_size
            .saturating_sub(dirty_limit + in_flight)
            .max(block_size * 64);
        // The unit the flush writer stores a written span in, and so the alignment a write needs to
        // leave the rest of its block unloaded: whole sectors, or whole subclusters (they are
        // allocated as a whole).
        let partial_align = match chain.top() {
            Layer::Qcow2(q) if q.layout().extended_l2 => q.layout().subcluster_size() as usize,
            Layer::Qcow2(_) => 512,
            Layer::Raw(_) => 0,
        };
        let size = chain.size();
        Disk {
            chain: Arc::new(chain),
            cache: BlockCache::new(clean, block_size, partial_align),
            block_size,
            size,
            read_only: opts.read_only,
            dirty_limit,
            memory_target: opts.cache_size + (8 << 20),
            write_gate: RwLock::new(()),
            flush_lock: Mutex::new(()),
            writer_wake: (Mutex::new(false), Condvar::new()),
            last_write: Mutex::new(None),
            allocated: Mutex::new(None),
            stats: Stats::default(),
        }
    }

    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    pub fn shared_chain(&self) -> Arc<Chain> {
        self.chain.clone()
    }

    fn block_len(&self, block: u64) -> usize {
        let start = block * self.block_size;
        self.block_size.min(self.size - start) as usize
    }

    /// Copy `out.len()` bytes of `block` from offset `within` into `out`, if the cache has it. A
    /// partial block that lacks them is completed first.
    fn cached(&self, block: u64, within: usize, out: &mut [u8]) -> Result<bool> {
        let range = within..within + out.len();
        {
            let mut shard = self.cache.shard(block);
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
        let serial = self.cache.stripe(block);
        self.fill_partial(block)?;
        drop(serial);
        // Complete now, or stored and dropped meanwhile (then the chain has it).
        match self.cache.shard(block).dirty.get(&block) {
            Some(d) if d.holds(&range) => {
                out.copy_from_slice(&d.data[range]);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Load the rest of the partial `block` from the chain (the caller holds its stripe, so no
    /// write changes it meanwhile).
    fn fill_partial(&self, block: u64) -> Result<()> {
        let mut base = vec![0u8; self.block_len(block)];
        self.read_sectors(block * self.block_size, &mut base)?;
        // The flush writer stores a partial block's written span only, so the rest of what was just
        // read is still what the image holds for the block, whatever it did meanwhile.
        let mut shard = self.cache.shard(block);
        self.cache.fill_partial(&mut shard, block, base);
        Ok(())
    }

    /// Copy `out.len()` bytes of `block` from offset `within` into `out`: from the cache, else read
    /// through the chain (not cached: the kernel's page cache keeps what is read again).
    fn read_block(&self, block: u64, within: usize, out: &mut [u8]) -> Result<()> {
        if !self.cached(block, within, out)? {
            self.read_uncached(block * self.block_size + within as u64, out)?;
        }
        Ok(())
    }

    /// Read through the chain, then let writes that landed meanwhile win.
    fn read_uncached(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        self.read_sectors(offset, out)?;
        for (block, within, n, done) in self.pieces(offset, out.len()) {
            if let Some(d) = self.cache.shard(block).dirty.get(&block) {
                // Of a partial block, only the written span is newer than the chain.
                let (from, to) = if d.partial {
                    (within.max(d.written.start), (within + n).min(d.written.end))
                } else {
                    (within, within + n)
                };
                if from < to {
                    let at = done + from - within;
                    out[at..at + to - from].copy_from_slice(&d.data[from..to]);
                }
            }
        }
        Ok(())
    }

    /// Read guest bytes through the chain in whole sectors (ciphers work on sectors).
    fn read_sectors(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        let first = offset & !511;
        let end =
            ((offset + out.len() as u64).div_ceil(512) * 512).min(self.size.div_ceil(512) * 512);
        if first == offset && end == offset + out.len() as u64 {
            return self.chain.read(offset, out);
        }
        let mut tmp = vec![0u8; (end - first) as usize];
        self.chain.read(first, &mut tmp)?;
        let skip = (offset - first) as usize;
        out.copy_from_slice(&tmp[skip..skip + out.len()]);
        Ok(())
    }

    /// Before a block becomes dirty: can the flush writer store it? Nothing unstorable may be left
    /// dirty (it would fail every flush, and umount with it), so a write that the flush could not
    /// store fails here, at once: a cluster whose mapping is damaged (data inside metadata), or a
    /// copy-on-write cluster whose other bytes cannot be read (a damaged compressed cluster, an
    /// unreadable backing file). A write of the whole cluster needs nothing read and may repair it.
    /// Returns whether the cluster is written in place (only then may a block stay partial).
    fn check_storable(&self, block: u64) -> Result<bool> {
        let Layer::Qcow2(image) = self.chain.top() else {
            return Ok(false);
        };
        let cs = image.layout().cluster_size();
        let guest = block * self.block_size / cs * cs;
        if let crate::qcow2::WriteTarget::InPlace { .. } = image.write_target(guest)? {
            return Ok(true);
        }
        let bs = self.block_size;
        // This block itself is read by the write when it is not written whole (and fails there).
        let others: Vec<u64> = (guest / bs..(guest + cs).min(self.size).div_ceil(bs))
            .filter(|&b| b != block)
            .collect();
        if others.is_empty() || others.iter().any(|&b| self.cache.stamp(b).is_some()) {
            return Ok(false); // none, or checked when the cluster's first block became dirty
        }
        let mut scratch = vec![0u8; bs as usize];
        for b in others {
            let len = self.block_len(b);
            self.read_block(b, 0, &mut scratch[..len])?;
        }
        Ok(false)
    }

    fn write_block(&self, block: u64, within: usize, data: &[u8]) -> Result<()> {
        let len = self.block_len(block);
        let full = within == 0 && data.len() == len;
        // Checked outside the block's stripe: the check reads the cluster's other blocks.
        let in_place = match self.cache.stamp(block) {
            None => self.check_storable(block)?,
            Some(_) => false,
        };
        let _serial = self.cache.stripe(block);
        let range = within..within + data.len();
        let mut shard = self.cache.shard(block);
        match self.cache.update_dirty(&mut shard, block, within, data) {
            Update::Done => return Ok(()),
            Update::NotDirty => {}
            Update::NeedsLoad => {
                drop(shard);
                self.fill_partial(block)?;
                shard = self.cache.shard(block);
                if self.cache.update_dirty(&mut shard, block, within, data) == Update::Done {
                    return Ok(());
                }
                // Stored and dropped meanwhile: go on as for a block that is not dirty.
            }
        }
        if full {
            self.cache
                .insert_dirty(&mut shard, block, data.to_vec(), range);
            return Ok(());
        }
        if let Some(c) = shard.clean.get(&block) {
            let mut copy = c.as_ref().clone();
            copy[range.clone()].copy_from_slice(data);
            self.cache.insert_dirty(&mut shard, block, copy, range);
            return Ok(());
        }
        if in_place && self.cache.may_be_partial(&range, len) {
            self.cache
                .insert_partial(&mut shard, block, len, within, data);
            return Ok(());
        }
        drop(shard);
        let mut base = vec![0u8; len];
        self.read_sectors(block * self.block_size, &mut base)?;
        base[within..within + data.len()].copy_from_slice(data);
        let mut shard = self.cache.shard(block);
        let written = within..within + data.len();
        self.cache.insert_dirty(&mut shard, block, base, written);
        Ok(())
    }

    /// Split [offset, offset + len) into (block, offset in block, length) pieces.
    fn pieces(
        &self,
        offset: u64,
        len: usize,
    ) -> impl Iterator<Item = (u64, usize, usize, usize)> + '_ {
        let bs = self.block_size;
        let mut done = 0usize;
        std::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let at = offset + done as u64;
            let block = at / bs;
            let within = (at % bs) as usize;
            let n = (bs as usize - within).min(len - done);
            let piece = (block, within, n, done);
            done += n;
            Some(piece)
        })
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::new(
                self.chain.top().path(),
                std::io::Error::from_raw_os_error(libc::EINVAL),
            )),
        }
    }

    /// The background writer's call: flush when writes have been idle for `idle`, or when dirty
    /// data passes half its bound (so writers rarely have to wait for a flush themselves).
    pub fn flush_if_idle(&self, idle: Duration) -> Result<()> {
        let dirty = self.cache.dirty_bytes();
        let idle_now = matches!(*self.last_write.lock(), Some(t) if t.elapsed() >= idle);
        if dirty > 0 && idle_now {
            // Quiet now: make everything durable, as a disk's write cache would drain.
            BlockDevice::flush(self)?;
        } else if dirty > self.dirty_limit / 2 {
            self.write_back()?;
        }
        Ok(())
    }

    /// The background writer's wait: until dirty data passes half its bound, or `timeout`.
    pub fn wait_for_dirty_data(&self, timeout: Duration) {
        let mut woken = self.writer_wake.0.lock();
        if !*woken {
            self.writer_wake.1.wait_for(&mut woken, timeout);
        }
        *woken = false;
    }

    fn wake_writer(&self) {
        *self.writer_wake.0.lock() = true;
        self.writer_wake.1.notify_one();
    }

    /// Store dirty data to make room, without paying for durability (fsync does that).
    pub fn write_back(&self) -> Result<()> {
        *self.allocated.lock() = None;
        flush::flush(self, false)
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.cache.dirty_bytes()
    }
}

impl BlockDevice for Disk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len())?;
        // Cached blocks are copied; each run of uncached ones is one read through the chain.
        let mut run: Option<(usize, usize)> = None; // (start, end) in buf
        for (block, within, n, done) in self.pieces(offset, buf.len()) {
            if self.cached(block, within, &mut buf[done..done + n])? {
                if let Some((start, end)) = run.take() {
                    self.read_uncached(offset + start as u64, &mut buf[start..end])?;
                }
            } else {
                run = Some((run.map_or(done, |(start, _)| start), done + n));
            }
        }
        if let Some((start, end)) = run {
            self.read_uncached(offset + start as u64, &mut buf[start..end])?;
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        if self.read_only {
            return Err(Error::new(
                self.chain.top().path(),
                std::io::Error::from_raw_os_error(libc::EROFS),
            ));
        }
        self.check_range(offset, data.len())?;
        // Make room first: wait for the background write-back, or do one. When the flush fails
        // (host disk full), this write is refused rather than letting dirty data grow without bound.
        let len = data.len() as u64;
        if self.cache.dirty_bytes() + len > self.dirty_limit {
            self.wake_writer();
            *self.allocated.lock() = None;
            flush::flush_above(self, false, self.dirty_limit.saturating_sub(len))?;
        }
        {
            let _gate = self.write_gate.read();
            for (block, within, n, done) in self.pieces(offset, data.len()) {
                self.write_block(block, within, &data[done..done + n])?;
            }
            *self.last_write.lock() = Some(Instant::now());
        }
        if self.cache.dirty_bytes() > self.dirty_limit / 2 {
            self.wake_writer();
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        *self.allocated.lock() = None;
        flush::flush(self, true)
    }

    fn allocated_bytes(&self) -> Result<u64> {
        if let Some(n) = *self.allocated.lock() {
            return Ok(n);
        }
        let n = self.chain.data_bytes()?;
        *self.allocated.lock() = Some(n);
        Ok(n)
    }

    fn seek(&self, offset: u64, want_data: bool) -> Result<Option<u64>> {
        // Allocation is what the image says: unflushed writes are stored first.
        if self.cache.dirty_bytes() > 0 {
            self.flush()?;
        }
        let mut at = offset;
        while at < self.size {
            let (data, n) = self.chain.data_extent(at, self.size - at)?;
            if data == want_data {
                return Ok(Some(at));
            }
            at += n;
        }
        Ok(if want_data { None } else { Some(self.size) })
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::new(
                self.chain.top().path(),
                std::io::Error::from_raw_os_error(libc::EROFS),
            ));
        }
        self.check_range(offset, len as usize)?;
        flush::discard(self, offset, len)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

#[cfg(test)]
mod tests;
