//! More devices over one disk: a window onto a byte range (a partition) and the read-only view of an
//! internal snapshot (the top layer read through the snapshot's own L1 table).

use std::sync::Arc;

use super::BlockDevice;
use crate::chain::Chain;
use crate::error::{Error, Result};
use crate::qcow2::snapshot::Snapshot;
use crate::qcow2::snapshot_l1::SnapshotL1;

fn read_only_error(chain: &Chain) -> Error {
    Error::new(
        chain.top().path(),
        std::io::Error::from_raw_os_error(libc::EROFS),
    )
}

fn out_of_range(chain: &Chain) -> Error {
    Error::new(
        chain.top().path(),
        std::io::Error::from_raw_os_error(libc::EINVAL),
    )
}

/// [start, start + len) of another device, e.g. a partition of the disk.
pub struct Window {
    name: String,
    inner: Arc<dyn BlockDevice>,
    start: u64,
    len: u64,
}

impl Window {
    pub fn new(name: String, inner: Arc<dyn BlockDevice>, start: u64, len: u64) -> Self {
        Window {
            name,
            inner,
            start,
            len,
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::new(
                &self.name,
                std::io::Error::from_raw_os_error(libc::EINVAL),
            )),
        }
    }
}

impl BlockDevice for Window {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len() as u64)?;
        self.inner.read_at(self.start + offset, buf)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check(offset, data.len() as u64)?;
        self.inner.write_at(self.start + offset, data)
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }

    fn allocated_bytes(&self) -> Result<u64> {
        Ok(self.len)
    }

    fn seek(&self, offset: u64, want_data: bool) -> Result<Option<u64>> {
        let found = self.inner.seek(self.start + offset, want_data)?;
        Ok(match found {
            Some(at) if at < self.start + self.len => Some(at - self.start),
            _ if want_data => None,
            _ => Some(self.len),
        })
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len)?;
        self.inner.discard(self.start + offset, len)
    }
}

/// The guest disk as it was when an internal snapshot was taken. Read-only, uncached: snapshot
/// clusters are shared and never written in place, so reading them needs no coordination. It
/// holds where the snapshot's L1 table is, not the table: the image reads its entries into a
/// bounded cache when a read needs them, so a view costs no memory until it is read.
pub struct SnapshotView {
    chain: Arc<Chain>,
    l1: SnapshotL1,
    size: u64,
}

impl SnapshotView {
    pub fn new(chain: Arc<Chain>, snapshot: &Snapshot) -> Result<Self> {
        let l1 = chain.image().snapshot_l1(snapshot)?;
        let size = snapshot.disk_size.unwrap_or_else(|| chain.size());
        Ok(SnapshotView { chain, l1, size })
    }

    /// Read whole sectors (the cipher works on sectors), `buf` may be any range.
    fn read_sectors(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let chain = &self.chain;
        let image = chain.image();
        let below = |g: u64, b: &mut [u8]| chain.read_level(1, g, b);
        let first = offset & !511;
        let end = (offset + buf.len() as u64).div_ceil(512) * 512;
        if first == offset && end == offset + buf.len() as u64 {
            return image.read_in(Some(&self.l1), offset, buf, &below);
        }
        let mut tmp = vec![0u8; (end - first) as usize];
        image.read_in(Some(&self.l1), first, &mut tmp, &below)?;
        let skip = (offset - first) as usize;
        buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
        Ok(())
    }
}

impl BlockDevice for SnapshotView {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.size => {}
            _ => return Err(out_of_range(&self.chain)),
        }
        // Past the current top layer's size (a snapshot of a bigger disk) nothing maps: zeros.
        let inside = self
            .chain
            .size()
            .saturating_sub(offset)
            .min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(inside);
        tail.fill(0);
        if head.is_empty() {
            return Ok(());
        }
        self.read_sectors(offset, head)
    }

    fn write_at(&self, _offset: u64, _data: &[u8]) -> Result<()> {
        Err(read_only_error(&self.chain))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        true
    }

    fn allocated_bytes(&self) -> Result<u64> {
        Ok(self.size)
    }

    fn seek(&self, offset: u64, want_data: bool) -> Result<Option<u64>> {
        Ok(if want_data {
            Some(offset)
        } else {
            Some(self.size)
        })
    }

    fn discard(&self, _offset: u64, _len: u64) -> Result<()> {
        Err(read_only_error(&self.chain))
    }
}
