//! Positional I/O on one host file, with the path kept for error messages.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Context, Result};

/// An open image file. Reads past the end of the file return zeros, as QEMU's file driver does, so a
/// cluster whose tail was never written (subclusters, sparse preallocation) reads like QEMU shows it.
#[derive(Debug)]
pub struct HostFile {
    file: File,
    path: PathBuf,
    writable: bool,
}

impl HostFile {
    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .at(path)?;
        let meta = file.metadata().at(path)?;
        if meta.is_dir() {
            return Err(crate::Error::new(
                path,
                io::Error::from_raw_os_error(libc::EISDIR),
            ));
        }
        Ok(HostFile {
            file,
            path: path.to_path_buf(),
            writable,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    pub fn len(&self) -> Result<u64> {
        Ok(self.file.metadata().at(&self.path)?.len())
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Fill `buf` from `offset`; bytes beyond the end of the file read as zeros.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(crate::Error::new(&self.path, e)),
            }
        }
        Ok(())
    }

    /// Read exactly `buf.len()` bytes; the range must lie inside the file (metadata reads).
    pub fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, offset).at(&self.path)
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.file.write_all_at(data, offset).at(&self.path)
    }

    /// A barrier: everything written before is durable before anything written after.
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().at(&self.path)
    }

    /// Start writing the file's dirty pages to the device without waiting: the next `sync` then
    /// finds most of them on their way, so the disk works while the caller prepares more.
    pub fn start_writeback(&self) {
        use std::os::unix::io::AsRawFd;
        // SAFETY: a valid descriptor and plain integer arguments (0, 0: the whole file).
        let rc = unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE)
        };
        if rc != 0 {
            // Only a hint; a real write error shows again at the next sync.
            log::debug!(
                "{}: cannot start write-back: {}",
                self.path.display(),
                io::Error::last_os_error()
            );
        }
    }

    /// Give the space of [offset, offset + len) back to the host file system; the range reads as
    /// zeros. Best effort: a file system without hole punching keeps the bytes.
    pub fn punch_hole(&self, offset: u64, len: u64) {
        use std::os::unix::io::AsRawFd;
        // SAFETY: a valid descriptor and plain integer arguments.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc != 0 {
            log::debug!(
                "{}: cannot punch a hole: {}",
                self.path.display(),
                io::Error::last_os_error()
            );
        }
    }

    pub fn set_len(&self, len: u64) -> Result<()> {
        self.file.set_len(len).at(&self.path)
    }
}
