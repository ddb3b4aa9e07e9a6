//! The benchmark's transport floor (`qcowfs transport-floor`): a disk with no image behind it.
//! Reads copy from a pattern held in memory and writes are accepted and forgotten, so a FUSE
//! mount over it measures only what the transport and the request layer cost: the most any
//! FUSE server could deliver on this machine, with no qcow2 lookups, no crypto and no host I/O.

use super::BlockDevice;
use crate::error::{Error, Problem, Result};

/// Bytes of the repeating pattern reads return: one maximum-sized FUSE request, so a read is
/// a single copy, as a hit in the block cache is.
const PATTERN: usize = 1 << 20;

pub struct NullDisk {
    size: u64,
    pattern: Vec<u8>,
}

impl NullDisk {
    pub fn new(size: u64) -> NullDisk {
        // Not zeros: the kernel and the reader see real bytes (an all-zero page could be treated
        // specially somewhere along the way). A cheap, fixed mix.
        let pattern = (0..PATTERN)
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3])
            .collect();
        NullDisk { size, pattern }
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::new(
                "transport floor",
                Problem::Refused(format!(
                    "{len} bytes at {offset} lie beyond the end of the disk ({} bytes)",
                    self.size
                )),
            )),
        }
    }
}

impl BlockDevice for NullDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len())?;
        let mut done = 0;
        while done < buf.len() {
            let at = ((offset + done as u64) % PATTERN as u64) as usize;
            let n = (PATTERN - at).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&self.pattern[at..at + n]);
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_range(offset, data.len())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        false
    }

    fn allocated_bytes(&self) -> Result<u64> {
        Ok(self.size)
    }

    fn seek(&self, offset: u64, want_data: bool) -> Result<Option<u64>> {
        Ok(match (offset < self.size, want_data) {
            (true, true) => Some(offset),
            (_, false) => Some(self.size.max(offset)),
            (false, true) => None,
        })
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len.try_into().unwrap_or(usize::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_repeat_the_pattern_across_its_boundary_and_refuse_past_the_end() {
        let disk = NullDisk::new(4 << 20);
        let mut a = vec![0; 4096];
        let mut b = vec![0; 4096];
        disk.read_at(PATTERN as u64 - 2048, &mut a).unwrap();
        disk.read_at(2 * PATTERN as u64 - 2048, &mut b).unwrap();
        assert_eq!(a, b);
        assert_eq!(&a[2048..], &disk.pattern[..2048]);
        assert!(a.iter().any(|&x| x != 0));
        assert!(disk.read_at((4 << 20) - 100, &mut a).is_err());
        assert!(disk.write_at(4 << 20, &[1]).is_err());
        disk.write_at(0, &[1; 512]).unwrap();
        assert_eq!(disk.seek(4 << 20, true).unwrap(), None);
        assert_eq!(disk.seek(5, false).unwrap(), Some(4 << 20));
    }
}
