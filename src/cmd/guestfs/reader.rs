//! The guest file system's view of the disk: one byte range of a [`BlockDevice`] (the whole
//! disk or a partition) as ext4-view's `Ext4Read`, so ext4-view reads the decrypted chain.

use std::sync::Arc;

use crate::disk::BlockDevice;

/// A read that ext4-view asked for outside the file system's byte range (a corrupt block number).
#[derive(Debug, thiserror::Error)]
#[error("the file system asks for {len} bytes at offset {offset}, past its end ({size} bytes)")]
pub struct OutOfRange {
    pub offset: u64,
    pub len: usize,
    pub size: u64,
}

/// [start, start + len) of a device, read by ext4-view. Reads never leave the range.
pub struct RangeReader {
    device: Arc<dyn BlockDevice>,
    start: u64,
    len: u64,
}

impl RangeReader {
    /// `len` bytes of `device` from `start`; the caller has checked they lie inside it.
    pub fn new(device: Arc<dyn BlockDevice>, start: u64, len: u64) -> Self {
        RangeReader { device, start, len }
    }
}

impl ext4_view::Ext4Read for RangeReader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        let inside = start_byte
            .checked_add(dst.len() as u64)
            .is_some_and(|end| end <= self.len);
        if !inside {
            return Err(Box::new(OutOfRange {
                offset: start_byte,
                len: dst.len(),
                size: self.len,
            }));
        }
        // The range lies inside the device (checked when the reader was made), so this cannot
        // overflow.
        self.device
            .read_at(self.start + start_byte, dst)
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::memory::MemoryDisk;
    use ext4_view::Ext4Read;

    #[test]
    fn reads_are_shifted_by_the_start_and_never_leave_the_range() {
        let dev = Arc::new(MemoryDisk::new((0..=255u8).collect()));
        let mut r = RangeReader::new(dev, 16, 32);
        let mut buf = [0u8; 4];
        r.read(2, &mut buf).unwrap();
        assert_eq!(buf, [18, 19, 20, 21]);
        assert!(r.read(30, &mut buf).is_err());
        assert!(r.read(u64::MAX - 1, &mut buf).is_err());
    }
}
