//! A disk held in memory, for unit tests of what reads and writes through a [`BlockDevice`]
//! (partition tables, byte ranges, logical volumes, caches): reads and writes outside it are
//! errors, as a real disk's are, and it counts the reads that reach it.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::BlockDevice;
use crate::error::{Error, Result};

pub(crate) struct MemoryDisk {
    bytes: Mutex<Vec<u8>>,
    reads: AtomicU64,
}

impl MemoryDisk {
    pub fn new(bytes: Vec<u8>) -> MemoryDisk {
        MemoryDisk {
            bytes: Mutex::new(bytes),
            reads: AtomicU64::new(0),
        }
    }

    /// How many reads reached the disk.
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// A copy of its bytes.
    pub fn bytes(&self) -> Vec<u8> {
        self.bytes.lock().clone()
    }

    /// `[offset, offset + len)` as an index range, when it lies inside `size` bytes.
    fn range(offset: u64, len: usize, size: usize) -> Result<std::ops::Range<usize>> {
        usize::try_from(offset)
            .ok()
            .and_then(|o| Some(o..o.checked_add(len)?))
            .filter(|r| r.end <= size)
            .ok_or_else(|| Error::new("<memory>", std::io::Error::from_raw_os_error(libc::EINVAL)))
    }
}

impl BlockDevice for MemoryDisk {
    fn size(&self) -> u64 {
        self.bytes.lock().len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let bytes = self.bytes.lock();
        let r = Self::range(offset, buf.len(), bytes.len())?;
        buf.copy_from_slice(&bytes[r]);
        Ok(())
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut bytes = self.bytes.lock();
        let r = Self::range(offset, data.len(), bytes.len())?;
        bytes[r].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn allocated_bytes(&self) -> Result<u64> {
        Ok(self.size())
    }
    fn seek(&self, offset: u64, _data: bool) -> Result<Option<u64>> {
        Ok(Some(offset))
    }
    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Ok(())
    }
}
