//! Positional I/O on one host file, with the path kept for error messages.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::fault::{FaultInjector, FaultPlan};
use super::host::{HostIo, MemFile, OsFile, Recorder, WriteLog};
use crate::error::{Context, Result};

/// An open image file: a regular file or a block device (an LVM volume, a disk). Reads past the end
/// return zeros, as QEMU's file driver does, so a cluster whose tail was never written (subclusters,
/// sparse preallocation) reads like QEMU shows it. Every operation goes through the `HostIo` seam.
#[derive(Debug)]
pub struct HostFile {
    io: Arc<dyn HostIo>,
    /// The operating system's file, for locks and `stat` (None for a file held in memory).
    os: Option<Arc<File>>,
    path: PathBuf,
    writable: bool,
    /// A block device's size never changes under us and `metadata().len()` is 0 for one.
    device_len: Option<u64>,
}

/// What kind of object a path names, told without opening it (opening a FIFO blocks until a
/// writer comes; opening some character devices has side effects).
fn refuse_unless_file_or_device(path: &Path, meta: &std::fs::Metadata) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let kind = meta.file_type();
    let what = if kind.is_dir() {
        return Err(crate::Error::new(
            path,
            io::Error::from_raw_os_error(libc::EISDIR),
        ));
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() {
        "a character device"
    } else {
        return Ok(());
    };
    Err(crate::Error::new(
        path,
        crate::Problem::Usage(format!(
            "is {what}, not an image: only regular files and block devices are opened"
        )),
    ))
}

impl HostFile {
    /// Open `path`. Anything but a regular file or a block device is refused before open(2) and
    /// again after it (the path may be swapped in between); the open itself never blocks.
    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        refuse_unless_file_or_device(path, &std::fs::metadata(path).at(path)?)?;
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(path)
            .at(path)?;
        Self::checked(file, path, writable)
    }

    /// The checks after open(2): a regular file or a block device (the name may have been
    /// swapped since the first check), back to blocking I/O, a device's size.
    fn checked(file: File, path: &Path, writable: bool) -> Result<Self> {
        use std::os::unix::fs::FileTypeExt;
        let meta = file.metadata().at(path)?;
        refuse_unless_file_or_device(path, &meta)?;
        clear_nonblock(&file).at(path)?;
        let device_len = if meta.file_type().is_block_device() {
            Some(device_size(&file).at(path)?)
        } else {
            None
        };
        let file = Arc::new(file);
        Ok(HostFile {
            io: Arc::new(OsFile(file.clone())),
            os: Some(file),
            path: path.to_path_buf(),
            writable,
            device_len,
        })
    }

    /// Open `rel` read-only inside the folder `dir` without following any symbolic link, so that
    /// nothing swapped in after a check (a component replaced by a link, `..`) can lead outside
    /// it (openat2 with RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS). `rel` must be free of links: a
    /// canonical path made relative to `dir`. `path` names the file in messages.
    pub fn open_beneath(dir: &Path, rel: &Path, path: &Path) -> Result<Self> {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
        let folder = File::open(dir).at(dir)?;
        let name = CString::new(rel.as_os_str().as_bytes())
            .map_err(|_| crate::Error::new(path, io::Error::from(io::ErrorKind::InvalidInput)))?;
        // SAFETY: open_how is plain integers; zero is a valid value for each.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        // O_PATH opens nothing (no FIFO wait, no device side effect): the object is checked by
        // fstat first and opened for reading only then, through the descriptor itself.
        how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
        how.resolve =
            libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
        // SAFETY: valid descriptor, NUL-terminated name, and a pointer to `how` with its size.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                folder.as_raw_fd(),
                name.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd < 0 {
            let err = io::Error::last_os_error();
            let problem = match err.raw_os_error() {
                Some(libc::ELOOP) | Some(libc::EXDEV) => crate::Problem::Refused(format!(
                    "changed while it was opened: a symbolic link or a path leading outside {} \
                     appeared; refused",
                    crate::error::escaped(dir)
                )),
                _ => return Err(crate::Error::new(path, err)),
            };
            return Err(crate::Error::new(path, problem));
        }
        // SAFETY: openat2 returned a new descriptor that nothing else owns.
        let handle = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let handle = File::from(handle);
        refuse_unless_file_or_device(path, &handle.metadata().at(path)?)?;
        let reopen = format!("/proc/self/fd/{}", handle.as_raw_fd());
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(&reopen)
            .at(path)?;
        Self::checked(file, path, false)
    }

    /// A writable file held in memory, named `path` in messages (unit tests of the formats).
    pub fn in_memory(path: &Path, bytes: Vec<u8>) -> Self {
        Self::over(path, Arc::new(MemFile::new(bytes)))
    }

    /// A writable file over any implementation of the seam.
    pub fn over(path: &Path, io: Arc<dyn HostIo>) -> Self {
        HostFile {
            io,
            os: None,
            path: path.to_path_buf(),
            writable: true,
            device_len: None,
        }
    }

    /// The same file, with every write, barrier and hole punched from now on logged to `log`.
    pub fn recorded(self, log: WriteLog) -> Self {
        HostFile {
            io: Arc::new(Recorder::new(self.io, log)),
            ..self
        }
    }

    /// The same file, with the host failure `plan` chooses injected into it from now on.
    pub fn with_faults(self, plan: FaultPlan) -> Self {
        HostFile {
            io: Arc::new(FaultInjector::new(self.io, plan)),
            ..self
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The seam itself, for a barrier run on another thread.
    pub fn io_handle(&self) -> Arc<dyn HostIo> {
        self.io.clone()
    }

    /// The operating system's file (None for a file held in memory).
    pub fn os_file(&self) -> Option<&File> {
        self.os.as_deref()
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The size in bytes: a regular file's length, a block device's capacity.
    pub fn len(&self) -> Result<u64> {
        match self.device_len {
            Some(len) => Ok(len),
            None => self.io.len().at(&self.path),
        }
    }

    pub fn is_block_device(&self) -> bool {
        self.device_len.is_some()
    }

    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Fill `buf` from `offset`; bytes beyond the end of the file read as zeros.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.io.read_at(&mut buf[done..], offset + done as u64) {
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
        let mut done = 0;
        while done < buf.len() {
            match self.io.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)).at(&self.path),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).at(&self.path),
            }
        }
        Ok(())
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.io.write_all_at(data, offset).at(&self.path)
    }

    /// A barrier: everything written before is durable before anything written after.
    pub fn sync(&self) -> Result<()> {
        self.io.sync_data().at(&self.path)
    }

    /// Start writing the file's dirty pages to the device without waiting: the next `sync` then
    /// finds most of them on their way, so the disk works while the caller prepares more.
    pub fn start_writeback(&self) {
        if let Err(e) = self.io.start_writeback() {
            // Only a hint; a real write error shows again at the next sync.
            log::debug!("{}: cannot start write-back: {e}", self.path.display());
        }
    }

    /// Give the space of [offset, offset + len) back to the host file system; the range reads as
    /// zeros. Best effort: a file system without hole punching keeps the bytes.
    pub fn punch_hole(&self, offset: u64, len: u64) {
        if let Err(e) = self.io.punch_hole(offset, len) {
            log::debug!("{}: cannot punch a hole: {e}", self.path.display());
        }
    }

    /// Whether [offset, offset + len) lies in a hole the host file system knows of (it reads as
    /// zeros without being stored), so a scan may skip reading it. False when that cannot be told
    /// (a file held in memory, a block device, no SEEK_DATA).
    pub fn is_hole(&self, offset: u64, len: u64) -> bool {
        use std::os::unix::io::AsRawFd;
        let (Some(os), Ok(at)) = (&self.os, libc::off_t::try_from(offset)) else {
            return false;
        };
        // SAFETY: the descriptor stays open for the call; reads are positional, so moving the
        // file offset disturbs nothing.
        let data = unsafe { libc::lseek(os.as_raw_fd(), at, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data from `offset` to the end.
            return io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
        }
        data as u64 >= offset.saturating_add(len)
    }

    /// Whether [offset, offset + len) holds stored data: Some(false) for a hole (or past the end
    /// of the file), Some(true) for data, None when that cannot be told (a file held in memory,
    /// a block device).
    pub fn holds_data(&self, offset: u64, len: u64) -> Option<bool> {
        let os = self.os.as_ref()?;
        if self.device_len.is_some() || !os.metadata().ok()?.is_file() {
            return None;
        }
        Some(!self.is_hole(offset, len))
    }

    pub fn set_len(&self, len: u64) -> Result<()> {
        self.io.set_len(len).at(&self.path)
    }
}

/// Back to blocking I/O once the object is known to be a file or a device.
fn clear_nonblock(file: &File) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a valid descriptor with integer arguments.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A block device's capacity: where its end is (the same as BLKGETSIZE64; positions do not matter,
/// all I/O is positional).
fn device_size(file: &File) -> io::Result<u64> {
    use std::io::Seek;
    let mut f = file;
    f.seek(io::SeekFrom::End(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn refuses_a_fifo_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string and mode.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let start = Instant::now();
        let err = HostFile::open(&fifo, false).unwrap_err().to_string();
        assert!(start.elapsed() < Duration::from_secs(1));
        assert!(err.contains("is a FIFO, not an image"), "{err}");
        assert!(err.contains("fifo"), "{err}");
    }

    #[test]
    fn refuses_a_character_device() {
        let err = HostFile::open(Path::new("/dev/null"), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/dev/null: is a character device"), "{err}");
    }

    #[test]
    fn refuses_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let err = HostFile::open(&path, false).unwrap_err().to_string();
        assert!(err.contains("is a socket"), "{err}");
    }

    #[test]
    fn a_regular_file_has_its_length_and_reads_zeros_past_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        let f = HostFile::open(&path, false).unwrap();
        assert_eq!(f.len().unwrap(), 3);
        assert!(!f.is_block_device());
        let mut buf = [9u8; 5];
        f.read_at(1, &mut buf).unwrap();
        assert_eq!(&buf, b"bc\0\0\0");
    }

    #[test]
    fn opens_beneath_a_folder_and_refuses_a_link_swapped_in() {
        let dir = tempfile::tempdir().unwrap();
        let inside = dir.path().join("inside");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(inside.join("sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(inside.join("sub/base"), b"inside").unwrap();
        std::fs::write(outside.join("base"), b"outside").unwrap();
        let shown = inside.join("sub/base");
        let f = HostFile::open_beneath(&inside, Path::new("sub/base"), &shown).unwrap();
        let mut buf = [0u8; 6];
        f.read_exact_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"inside");
        // The checked path's folder is replaced by a link to elsewhere: refused, not followed.
        std::fs::rename(inside.join("sub"), dir.path().join("old-sub")).unwrap();
        std::os::unix::fs::symlink(&outside, inside.join("sub")).unwrap();
        let err = HostFile::open_beneath(&inside, Path::new("sub/base"), &shown)
            .unwrap_err()
            .to_string();
        assert!(err.contains("changed while it was opened"), "{err}");
        assert!(err.contains("sub/base"), "{err}");
        // `..` out of the folder is refused the same way.
        let err = HostFile::open_beneath(&inside, Path::new("../outside/base"), &shown)
            .unwrap_err()
            .to_string();
        assert!(err.contains("changed while it was opened"), "{err}");
    }

    #[test]
    fn opening_beneath_refuses_a_fifo_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string and mode.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = HostFile::open_beneath(dir.path(), Path::new("fifo"), &fifo)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is a FIFO, not an image"), "{err}");
    }
}
