//! A byte range of the decrypted disk as the device each file-system library reads through:
//! rust-fs-core's `BlockRead` (XFS, btrfs, NTFS) and fstool's `BlockDevice` (FAT). For `ls`,
//! `cat` and `copy-out` it is read-only: a library that would replay a journal by writing is
//! refused by the device, not trusted to behave. The editing commands make it writable
//! ([`RangeDevice::writable`]): its writes go to the disk layer, and a library's flush (its
//! barrier between a journal record and the blocks it describes) is a commit of the image.
//!
//! A library turns a failed read into its own error type and loses ours, which names the layer
//! of the chain that failed; so the device keeps the first failure, and the backend reports it
//! in place of the library's message ([`RangeDevice::error`]).

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::{Arc, Mutex};

use super::tree::FsError;
use crate::disk::BlockDevice;
use crate::error::Error;

/// `len` bytes of a disk from `start`.
pub(crate) struct RangeDevice {
    disk: Arc<dyn BlockDevice>,
    start: u64,
    len: u64,
    /// Whether writes reach the disk (the editing commands) or are refused.
    writable: bool,
    /// The first read or write of the disk that failed, kept for the backend to report.
    failed: Mutex<Option<Error>>,
}

impl RangeDevice {
    pub fn new(disk: Arc<dyn BlockDevice>, start: u64, len: u64) -> Arc<RangeDevice> {
        Arc::new(RangeDevice {
            disk,
            start,
            len,
            writable: false,
            failed: Mutex::new(None),
        })
    }

    /// The same range, its writes reaching the disk.
    pub fn writable(disk: Arc<dyn BlockDevice>, start: u64, len: u64) -> Arc<RangeDevice> {
        Arc::new(RangeDevice {
            disk,
            start,
            len,
            writable: true,
            failed: Mutex::new(None),
        })
    }

    /// Keep the first failure of the disk, for [`RangeDevice::error`]; its message.
    fn keep(&self, e: Error) -> String {
        let message = e.to_string();
        if let Ok(mut f) = self.failed.lock() {
            f.get_or_insert(e);
        }
        message
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// A library's error as ours: the disk's own read failure when one caused it (naming the
    /// layer of the chain), else the library's message.
    pub fn error(&self, e: impl std::fmt::Display) -> FsError {
        match self.failed.lock().map(|mut f| f.take()) {
            Ok(Some(disk)) => FsError::Disk(disk),
            _ => FsError::Library(e.to_string()),
        }
    }

    /// Read `buf.len()` bytes at `offset` of the range: false when that passes its end.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<bool, String> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Ok(false);
        }
        match self.disk.read_at(self.start + offset, buf) {
            Ok(()) => Ok(true),
            Err(e) => Err(self.keep(e)),
        }
    }
}

impl fs_core::BlockDevice for RangeDevice {
    fn write_at(&self, offset: u64, buf: &[u8]) -> fs_core::Result<()> {
        if !self.writable {
            return Err(fs_core::Error::ReadOnly);
        }
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(fs_core::Error::OutOfBounds {
                offset,
                len: buf.len() as u64,
                size: self.len,
            });
        }
        self.disk
            .write_at(self.start + offset, buf)
            .map_err(|e| fs_core::Error::Io(std::io::Error::other(self.keep(e))))
    }

    fn flush(&self) -> fs_core::Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.disk
            .flush()
            .map_err(|e| fs_core::Error::Io(std::io::Error::other(self.keep(e))))
    }

    fn is_writable(&self) -> bool {
        self.writable
    }
}

impl fs_core::BlockRead for RangeDevice {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> fs_core::Result<()> {
        match self.read(offset, buf) {
            Ok(true) => Ok(()),
            Ok(false) => Err(fs_core::Error::ShortRead {
                offset,
                want: buf.len(),
                got: 0,
            }),
            Err(m) => Err(fs_core::Error::Io(std::io::Error::other(m))),
        }
    }

    fn size_bytes(&self) -> u64 {
        self.len
    }
}

/// The range as fstool wants a device: a cursor over it (`Read + Write + Seek`), writing only
/// when the range is writable.
pub(crate) struct Cursor {
    device: Arc<RangeDevice>,
    at: u64,
    /// Bytes the library may still read before the next [`Cursor::budget`] (None: no bound):
    /// fstool gathers a whole folder, or a whole cluster chain, in memory, so a hostile chain
    /// would otherwise ask for as much memory as the volume holds.
    left: Option<u64>,
}

impl Cursor {
    pub fn new(device: Arc<RangeDevice>) -> Cursor {
        Cursor {
            device,
            at: 0,
            left: None,
        }
    }

    /// Let the library read at most `bytes` from now on (for one call of it).
    pub fn budget(&mut self, bytes: u64) {
        self.left = Some(bytes);
    }

    /// Take `n` bytes from the budget, or refuse the read.
    fn spend(&mut self, n: u64) -> std::io::Result<()> {
        match self.left {
            Some(left) if n > left => Err(std::io::Error::other(format!(
                "the volume asks to read more than {} bytes for one folder or chunk \
                 (a damaged cluster chain?)",
                left.max(n)
            ))),
            Some(left) => {
                self.left = Some(left - n);
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn refused() -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "the guest file system is open read-only",
        )
    }
}

impl Read for Cursor {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.device.len.saturating_sub(self.at)).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.spend(n as u64)?;
        self.device
            .read(self.at, &mut buf[..n])
            .map_err(std::io::Error::other)?;
        self.at += n as u64;
        Ok(n)
    }
}

impl Write for Cursor {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        fs_core::BlockDevice::write_at(self.device.as_ref(), self.at, buf).map_err(
            |e| match e {
                fs_core::Error::ReadOnly => Self::refused(),
                other => std::io::Error::other(other.to_string()),
            },
        )?;
        self.at += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        fs_core::BlockDevice::flush(self.device.as_ref())
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

impl Seek for Cursor {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        let to = match pos {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.device.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.at.checked_add_signed(d),
        };
        self.at = to.ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        Ok(self.at)
    }
}

impl fstool::block::BlockDevice for Cursor {
    fn block_size(&self) -> u32 {
        512
    }

    fn total_size(&self) -> u64 {
        self.device.len
    }

    fn sync(&mut self) -> fstool::Result<()> {
        Write::flush(self).map_err(fstool::Error::Io)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> fstool::Result<()> {
        self.spend(buf.len() as u64).map_err(fstool::Error::Io)?;
        match self.device.read(offset, buf) {
            Ok(true) => Ok(()),
            Ok(false) => Err(fstool::Error::OutOfBounds {
                offset,
                len: buf.len() as u64,
                size: self.device.len,
            }),
            Err(m) => Err(fstool::Error::Io(std::io::Error::other(m))),
        }
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> fstool::Result<()> {
        self.at = offset;
        self.write_all(buf).map_err(fstool::Error::Io)
    }

    fn zero_range(&mut self, offset: u64, len: u64) -> fstool::Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            fstool::block::BlockDevice::write_at(self, offset + done, &zeros[..n])?;
            done += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::memory::MemoryDisk;

    #[test]
    fn a_cursor_reads_no_more_than_its_budget_until_given_another() {
        let device = RangeDevice::new(Arc::new(MemoryDisk::new(vec![0; 1 << 20])), 4096, 65536);
        let mut c = Cursor::new(device);
        let mut buf = [0u8; 4096];
        c.budget(8192);
        assert!(fstool::block::BlockDevice::read_at(&mut c, 0, &mut buf).is_ok());
        assert!(c.read(&mut buf).is_ok());
        let e = fstool::block::BlockDevice::read_at(&mut c, 0, &mut buf).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
        c.budget(4096);
        assert!(c.read(&mut buf).is_ok());
    }

    #[test]
    fn a_read_only_range_refuses_writes_and_reads_only_inside_itself() {
        let device = RangeDevice::new(Arc::new(MemoryDisk::new(vec![0; 1 << 20])), 4096, 65536);
        assert!(fs_core::BlockDevice::write_at(device.as_ref(), 0, &[1]).is_err());
        let mut c = Cursor::new(device.clone());
        assert!(c.write(&[1]).is_err());
        let mut buf = [0u8; 16];
        assert!(fs_core::BlockRead::read_at(device.as_ref(), 65536 - 8, &mut buf).is_err());
        let writable =
            RangeDevice::writable(Arc::new(MemoryDisk::new(vec![0; 1 << 20])), 4096, 65536);
        assert!(fs_core::BlockDevice::write_at(writable.as_ref(), 0, &[1]).is_ok());
        assert!(fs_core::BlockDevice::write_at(writable.as_ref(), 65536, &[1]).is_err());
    }
}
