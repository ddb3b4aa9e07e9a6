//! The seam between the formats and the host: the few positional operations a layer performs on
//! its file, as a trait. The operating system's file is one implementation; an in-memory file lets
//! the qcow2 layer be tested without a disk, and a recorder logs every write and barrier of a real
//! workload so that crash states can be built from it (tests/crash_states).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use parking_lot::Mutex;

/// What a layer does to its host file. Offsets are bytes; reads past the end return short counts.
#[allow(clippy::len_without_is_empty)] // a file length, not a collection
pub trait HostIo: Send + Sync + std::fmt::Debug {
    /// Read into `buf` from `offset`; fewer bytes (0 at the end) when the file ends first.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// A barrier: every write that returned before it began is durable when it returns.
    fn sync_data(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Make [offset, offset + len) read as zeros and give its space back (the length stays).
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// A hint to start writing dirty data to the device; durability still needs `sync_data`.
    fn start_writeback(&self) -> io::Result<()>;
}

/// The operating system's file.
#[derive(Debug)]
pub struct OsFile(pub Arc<File>);

impl HostIo for OsFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(data, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        use std::os::unix::io::AsRawFd;
        // SAFETY: a valid descriptor and plain integer arguments.
        let rc = unsafe {
            libc::fallocate(
                self.0.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn start_writeback(&self) -> io::Result<()> {
        use std::os::unix::io::AsRawFd;
        // SAFETY: a valid descriptor and plain integer arguments (0, 0: the whole file).
        let rc =
            unsafe { libc::sync_file_range(self.0.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A file held in memory: every operation is immediate and durable.
#[derive(Debug, Default)]
pub struct MemFile {
    bytes: Mutex<Vec<u8>>,
    /// Barriers so far, so a test can see that an operation paid (or skipped) one.
    syncs: std::sync::atomic::AtomicU64,
}

impl MemFile {
    pub fn new(bytes: Vec<u8>) -> Self {
        MemFile {
            bytes: Mutex::new(bytes),
            syncs: Default::default(),
        }
    }

    pub fn contents(&self) -> Vec<u8> {
        self.bytes.lock().clone()
    }

    pub fn syncs(&self) -> u64 {
        self.syncs.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl HostIo for MemFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let bytes = self.bytes.lock();
        let start = (offset.min(bytes.len() as u64)) as usize;
        let n = buf.len().min(bytes.len() - start);
        buf[..n].copy_from_slice(&bytes[start..start + n]);
        Ok(n)
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let mut bytes = self.bytes.lock();
        let end = offset as usize + data.len();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[offset as usize..end].copy_from_slice(data);
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.syncs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.lock().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.bytes.lock().resize(len as usize, 0);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut bytes = self.bytes.lock();
        let start = (offset as usize).min(bytes.len());
        let end = (offset.saturating_add(len) as usize).min(bytes.len());
        bytes[start..end].fill(0);
        Ok(())
    }

    fn start_writeback(&self) -> io::Result<()> {
        Ok(())
    }
}

/// One operation that changed a host file, or a mark the workload put between them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostEvent {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    /// A barrier began: every event before it is durable once it returns (`BarrierDone` with the
    /// same number; a barrier that failed has none).
    Barrier(u64),
    BarrierDone(u64),
    Punch {
        offset: u64,
        len: u64,
    },
    SetLen(u64),
    /// Put by the workload (`WriteLog::mark`), e.g. "guest write N issued", "fsync returned".
    Mark(u64),
}

/// The events of one file, in the order they were issued (shared by a recorder and its reader).
#[derive(Debug, Clone, Default)]
pub struct WriteLog(Arc<Mutex<Vec<HostEvent>>>);

impl WriteLog {
    pub fn mark(&self, id: u64) {
        self.0.lock().push(HostEvent::Mark(id));
    }

    pub fn events(&self) -> Vec<HostEvent> {
        self.0.lock().clone()
    }

    fn push(&self, event: HostEvent) {
        self.0.lock().push(event);
    }
}

/// Passes every operation to `inner` and logs those that change the file: a change once it is
/// done (so one logged before a barrier began was in the file when it began), a barrier when it
/// begins and again when it returns.
#[derive(Debug)]
pub struct Recorder {
    inner: Arc<dyn HostIo>,
    log: WriteLog,
    barriers: std::sync::atomic::AtomicU64,
}

impl Recorder {
    pub fn new(inner: Arc<dyn HostIo>, log: WriteLog) -> Self {
        Recorder {
            inner,
            log,
            barriers: Default::default(),
        }
    }
}

impl HostIo for Recorder {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.read_at(buf, offset)
    }

    fn write_all_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let result = self.inner.write_all_at(data, offset);
        // Logged even when it failed: part of it may have reached the file.
        self.log.push(HostEvent::Write {
            offset,
            data: data.to_vec(),
        });
        result
    }

    fn sync_data(&self) -> io::Result<()> {
        let id = self
            .barriers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.log.push(HostEvent::Barrier(id));
        self.inner.sync_data()?;
        self.log.push(HostEvent::BarrierDone(id));
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let result = self.inner.set_len(len);
        self.log.push(HostEvent::SetLen(len));
        result
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let result = self.inner.punch_hole(offset, len);
        self.log.push(HostEvent::Punch { offset, len });
        result
    }

    fn start_writeback(&self) -> io::Result<()> {
        self.inner.start_writeback()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_memory_file_grows_on_write_and_reads_short_at_its_end() {
        let f = MemFile::new(b"abc".to_vec());
        f.write_all_at(b"xy", 5).unwrap();
        assert_eq!(f.contents(), b"abc\0\0xy");
        let mut buf = [9u8; 4];
        assert_eq!(f.read_at(&mut buf, 5).unwrap(), 2);
        assert_eq!(&buf[..2], b"xy");
        assert_eq!(f.read_at(&mut buf, 100).unwrap(), 0);
        f.punch_hole(1, 100).unwrap();
        assert_eq!(f.contents(), b"a\0\0\0\0\0\0");
    }

    #[test]
    fn the_recorder_logs_changes_in_order_and_passes_them_on() {
        let log = WriteLog::default();
        let r = Recorder::new(Arc::new(MemFile::new(Vec::new())), log.clone());
        r.write_all_at(b"ab", 0).unwrap();
        log.mark(7);
        r.sync_data().unwrap();
        r.punch_hole(0, 1).unwrap();
        r.set_len(4).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(r.read_at(&mut buf, 0).unwrap(), 4);
        assert_eq!(&buf, b"\0b\0\0");
        assert_eq!(
            log.events(),
            vec![
                HostEvent::Write {
                    offset: 0,
                    data: b"ab".to_vec()
                },
                HostEvent::Mark(7),
                HostEvent::Barrier(0),
                HostEvent::BarrierDone(0),
                HostEvent::Punch { offset: 0, len: 1 },
                HostEvent::SetLen(4),
            ]
        );
    }
}
