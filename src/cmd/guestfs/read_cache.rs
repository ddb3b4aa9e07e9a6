//! Recently read blocks of the guest disk, kept for the in-process readers. The disk layer
//! caches only what it must write (a FUSE mount has the kernel's page cache in front of it), so
//! each small read of a library — an inode, a folder block, a group descriptor — went through
//! the chain again: two host reads and a decryption per inode of a 10,000-entry `ls`. Here the
//! small reads are served from whole blocks kept in a bounded LRU; large ones (file data, read
//! once) go straight through, so a 1 GiB `cat` neither fills nor churns it.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::disk::BlockDevice;
use crate::error::Result;

/// The unit kept: a qcow2 cluster by default, and what one read of the chain costs little more
/// for than 4 KiB.
const BLOCK: u64 = 64 << 10;

fn read_only() -> crate::error::Error {
    crate::error::Error::new(
        "<guest reader>",
        std::io::Error::from_raw_os_error(libc::EROFS),
    )
}

/// A disk, read-only, whose small reads are served from the blocks it keeps.
pub(crate) struct ReadCache {
    disk: Arc<dyn BlockDevice>,
    blocks: Mutex<LruCache<u64, Arc<[u8]>>>,
}

impl ReadCache {
    /// `disk`, keeping at most `bytes` of its blocks (at least one).
    pub fn new(disk: Arc<dyn BlockDevice>, bytes: u64) -> ReadCache {
        let count = NonZeroUsize::new((bytes / BLOCK).max(1) as usize).unwrap_or(NonZeroUsize::MIN);
        ReadCache {
            disk,
            blocks: Mutex::new(LruCache::new(count)),
        }
    }

    /// Block `index` (the disk's last one may be short), from the cache or read now.
    fn block(&self, index: u64) -> Result<Arc<[u8]>> {
        if let Some(b) = self
            .blocks
            .lock()
            .ok()
            .and_then(|mut c| c.get(&index).cloned())
        {
            return Ok(b);
        }
        let start = index * BLOCK;
        let len = BLOCK.min(self.disk.size() - start) as usize;
        let mut bytes = vec![0u8; len];
        self.disk.read_at(start, &mut bytes)?;
        let bytes: Arc<[u8]> = bytes.into();
        if let Ok(mut c) = self.blocks.lock() {
            c.put(index, bytes.clone());
        }
        Ok(bytes)
    }
}

impl BlockDevice for ReadCache {
    fn size(&self) -> u64 {
        self.disk.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        let in_range = offset
            .checked_add(len)
            .is_some_and(|end| end <= self.size());
        if len >= BLOCK || !in_range {
            return self.disk.read_at(offset, buf);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let block = self.block(at / BLOCK)?;
            let within = (at % BLOCK) as usize;
            let n = (block.len() - within).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&block[within..within + n]);
            done += n;
        }
        Ok(())
    }

    /// The readers never write: a write would leave kept blocks stale.
    fn write_at(&self, _offset: u64, _data: &[u8]) -> Result<()> {
        Err(read_only())
    }

    fn flush(&self) -> Result<()> {
        self.disk.flush()
    }

    fn is_read_only(&self) -> bool {
        true
    }

    fn allocated_bytes(&self) -> Result<u64> {
        self.disk.allocated_bytes()
    }

    fn seek(&self, offset: u64, want_data: bool) -> Result<Option<u64>> {
        self.disk.seek(offset, want_data)
    }

    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(read_only())
    }
}

#[cfg(test)]
mod tests {
    use super::{ReadCache, BLOCK};
    use crate::disk::memory::MemoryDisk;
    use crate::disk::BlockDevice;
    use std::sync::Arc;

    #[test]
    fn small_reads_come_from_kept_blocks_and_nothing_is_written() {
        let len = 3 * BLOCK as usize + 100;
        let bytes: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        let disk = Arc::new(MemoryDisk::new(bytes.clone()));
        let cache = ReadCache::new(disk.clone(), 2 * BLOCK);
        let mut buf = vec![0u8; 256];
        for _ in 0..10 {
            cache.read_at(BLOCK - 100, &mut buf).unwrap();
            assert_eq!(buf, bytes[BLOCK as usize - 100..BLOCK as usize + 156]);
        }
        assert_eq!(disk.reads(), 2, "two blocks, each read once");
        // The short last block, and a read past the end refused by the disk itself.
        let mut tail = vec![0u8; 50];
        cache.read_at(len as u64 - 50, &mut tail).unwrap();
        assert_eq!(tail, bytes[len - 50..]);
        assert!(cache.read_at(len as u64 - 10, &mut tail).is_err());
        // Nothing is written through it; a large read goes straight through.
        assert!(cache.write_at(BLOCK, &[7u8; 4]).is_err());
        assert!(cache.discard(0, BLOCK).is_err());
        let before = disk.reads();
        let mut big = vec![0u8; BLOCK as usize];
        cache.read_at(0, &mut big).unwrap();
        assert_eq!(disk.reads(), before + 1);
    }
}
