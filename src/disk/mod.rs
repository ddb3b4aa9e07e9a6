//! The guest's view of the chain: byte ranges split into blocks, served from the block cache
//! (cache.rs); writes go into the cache as dirty blocks and the flusher (flush.rs) turns them into
//! image state. A write runs one way: `Disk` → `BlockCache`; a flush `Disk` → `Flusher` → the
//! image's commit pipeline.

mod cache;
mod flush;
#[cfg(test)]
pub(crate) mod memory;
pub mod null;
pub(crate) mod partition;
pub(crate) mod views;

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};

use crate::chain::Chain;
use crate::error::{Error, Result};
use crate::qcow2::Durability;
use cache::BlockCache;
use flush::Flusher;

/// The largest cache block: bigger clusters are cached in parts so a small read decrypts little.
const MAX_BLOCK: u64 = 64 << 10;

/// What the daemon itself holds beside the cache, taken out of `--cache-size` (up to a fifth of
/// it) so that the whole process stays within the promised `--cache-size` + 32 MiB: the program
/// (12–14 MiB resident before the first request), the transports' request buffers (1 MiB per
/// io_uring entry or FUSE thread: ~20 MiB once all are touched), the metadata tables of a typical
/// chain, and what the allocator cannot hand back between trims, which grows when the flush
/// writer is starved. Measured with the default 256 MiB cache, a 1 MiB sequential writer beside
/// two busy loops peaked at 286-287 MiB with 32 MiB set aside, at 222-238 MiB with 48 MiB; the
/// 70/30 random mix still reached 288.3-288.4 MiB with 48 (a fifth of 256 MiB is 51.2 MiB), and
/// 296.6 MiB with 52 under two busy loops: freed block buffers held by one malloc arena while the
/// other allocated. With one arena (the daemon's `M_ARENA_MAX`) every bench write workload peaks
/// at 220 MiB or less, starved or not; the margin left is for a bigger chain's metadata tables.
const PROCESS_RESERVE: u64 = 52 << 20;

/// Freed heap pages are handed back (malloc_trim) only once resident memory passes the cache size
/// by this much: above the process's steady use (the cache less what `PROCESS_RESERVE` leaves out,
/// plus the program and its buffers), below the bound. A trim below the steady use would run
/// after every write-back, and the pages it hands back are faulted in (and zeroed) again by the
/// next writes: with the old cache + 8 MiB and no reserve, that cost a sequential write a third
/// of its speed.
const TRIM_ABOVE: u64 = 8 << 20;

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

/// The guest disk over a chain: reads and writes split into blocks of the cache, which the
/// flusher stores into the chain's top image.
#[derive(Debug)]
pub struct Disk {
    chain: Arc<Chain>,
    cache: BlockCache,
    flusher: Flusher,
    size: u64,
    read_only: bool,
    dirty_limit: u64,
    /// Writers hold it shared; a discard exclusively (before the flush lock), so no write lands
    /// in its range between its commit and the forgetting of the range's blocks. The flusher does
    /// not take it: it copies each block with its stamp, and a block written meanwhile stays dirty.
    write_gate: RwLock<()>,
    /// Wakes the background writer early (set: dirty data passed half its bound).
    writer_wake: (Mutex<bool>, Condvar),
    last_write: Mutex<Option<Instant>>,
    /// `allocated_bytes`, until the next flush or discard changes it.
    allocated: Mutex<Option<u64>>,
}

impl Disk {
    pub fn new(chain: Chain, opts: DiskOptions) -> Self {
        let image = chain.image().clone();
        let layout = image.layout();
        let block_size = layout.cluster_size().min(MAX_BLOCK);
        // The cache budget holds the dirty data, the copies a flush batch makes, and clean blocks
        // (recently written ones: reads do not fill the cache) in what is left.
        let dirty_limit = (64 << 20).min(opts.cache_size / 4).max(block_size * 4);
        let in_flight = flush::BATCH_BYTES.min(opts.cache_size / 4);
        let reserve = PROCESS_RESERVE.min(opts.cache_size / 5);
        let clean = opts
            .cache_size
            .saturating_sub(dirty_limit + in_flight + reserve)
            .max(block_size * 64);
        // The unit the flusher stores a written span in, and so the alignment a write needs to
        // leave the rest of its block unloaded: whole sectors, or whole subclusters (they are
        // allocated as a whole).
        let partial_align = match layout.extended_l2 {
            true => layout.subcluster_size() as usize,
            false => 512,
        };
        let size = chain.size();
        Disk {
            chain: Arc::new(chain),
            cache: BlockCache::new(clean, block_size, size, partial_align),
            flusher: Flusher::new(image, size, opts.cache_size + TRIM_ABOVE),
            size,
            read_only: opts.read_only,
            dirty_limit,
            write_gate: RwLock::new(()),
            writer_wake: (Mutex::new(false), Condvar::new()),
            last_write: Mutex::new(None),
            allocated: Mutex::new(None),
        }
    }

    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    pub fn shared_chain(&self) -> Arc<Chain> {
        self.chain.clone()
    }

    /// Copy `out.len()` bytes of `block` from offset `within` into `out`: from the cache, else read
    /// through the chain (not cached: the kernel's page cache keeps what is read again).
    fn read_block(&self, block: u64, within: usize, out: &mut [u8]) -> Result<()> {
        if !self
            .cache
            .read(block, within, out, &|b, base| self.load(b, base))?
        {
            self.read_uncached(block * self.cache.block_size() + within as u64, out)?;
        }
        Ok(())
    }

    /// What the chain holds for the whole `block`, dirty data not included.
    fn load(&self, block: u64, base: &mut [u8]) -> Result<()> {
        self.read_sectors(block * self.cache.block_size(), base)
    }

    /// Read through the chain, then let writes that landed meanwhile win.
    fn read_uncached(&self, offset: u64, out: &mut [u8]) -> Result<()> {
        self.read_sectors(offset, out)?;
        for (block, within, n, done) in self.pieces(offset, out.len()) {
            self.cache.overlay(block, within, &mut out[done..done + n]);
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

    fn write_block(&self, block: u64, within: usize, data: &[u8]) -> Result<()> {
        // Checked before the cache takes the block's stripe: the check reads the cluster's other
        // blocks. A dirty block was checked when it became dirty.
        let in_place = match self.cache.is_dirty(block) {
            false => self.flusher.storable(&self.cache, &self.visible(), block)?,
            true => false,
        };
        let load = |b: u64, base: &mut [u8]| self.load(b, base);
        self.cache.write(block, within, data, in_place, &load)
    }

    /// The guest's view of a whole block, for the flusher's copy-on-write.
    fn visible(&self) -> impl Fn(u64, &mut [u8]) -> Result<()> + '_ {
        |block, out| self.read_block(block, 0, out)
    }

    /// Split [offset, offset + len) into (block, offset in block, length, offset in the buffer).
    fn pieces(
        &self,
        offset: u64,
        len: usize,
    ) -> impl Iterator<Item = (u64, usize, usize, usize)> + '_ {
        let bs = self.cache.block_size();
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
            _ => Err(self.error(libc::EINVAL)),
        }
    }

    fn error(&self, errno: i32) -> Error {
        Error::new(
            self.chain.top().path(),
            std::io::Error::from_raw_os_error(errno),
        )
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
        self.store(Durability::Ordered, 0)
    }

    /// Have the flusher store dirty data (see `Flusher::flush` for `dirty_bound`).
    fn store(&self, durability: Durability, dirty_bound: u64) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        *self.allocated.lock() = None;
        self.flusher
            .flush(&self.cache, &self.visible(), durability, dirty_bound)
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.cache.dirty_bytes()
    }

    /// Write zeros over [from, to) through the cache (nothing when empty).
    fn write_zeros(&self, from: u64, to: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(to.saturating_sub(from)) as usize];
        let mut at = from;
        while at < to {
            let n = CHUNK.min(to - at) as usize;
            self.write_at(at, &zeros[..n])?;
            at += n as u64;
        }
        Ok(())
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
        let load = |b: u64, base: &mut [u8]| self.load(b, base);
        for (block, within, n, done) in self.pieces(offset, buf.len()) {
            if self
                .cache
                .read(block, within, &mut buf[done..done + n], &load)?
            {
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
            return Err(self.error(libc::EROFS));
        }
        self.check_range(offset, data.len())?;
        // Make room first: wait for the background write-back, or do one. When the flush fails
        // (host disk full), this write is refused rather than letting dirty data grow without bound.
        let len = data.len() as u64;
        if self.cache.dirty_bytes() + len > self.dirty_limit {
            self.wake_writer();
            self.store(Durability::Ordered, self.dirty_limit.saturating_sub(len))?;
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
        self.store(Durability::Synced, 0)
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
            return Err(self.error(libc::EROFS));
        }
        self.check_range(offset, len as usize)?;
        let end = offset + len;
        // Whole clusters are dropped; the pieces at either end are written with zeros.
        let Some(clusters) = self.flusher.whole_clusters(offset, end) else {
            return self.write_zeros(offset, end);
        };
        self.write_zeros(offset, clusters.start)?;
        self.write_zeros(clusters.end, end)?;
        *self.allocated.lock() = None;
        let _no_writes = self.write_gate.write();
        self.flusher.discard(&self.cache, clusters)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

#[cfg(test)]
mod tests;
