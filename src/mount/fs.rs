//! The FUSE inode layer: a root directory holding one regular file, `disk`, over a [`BlockDevice`].
//! Each `Filesystem` method only translates a request into a device call and replies; it never sees
//! qcow2.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, KernelConfig,
    LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, WriteFlags,
};

use crate::disk::BlockDevice;

pub const ROOT: INodeNo = INodeNo::ROOT;
pub const DISK: INodeNo = INodeNo(2);
pub const DISK_NAME: &str = "disk";
/// Largest read and write request we ask the kernel for.
pub const MAX_IO: u32 = 1 << 20;
/// Attributes never change behind the kernel's back (only we write the image while mounted).
const TTL: Duration = Duration::from_secs(3600);

/// The mounted file system.
pub struct QcowFs<D: BlockDevice> {
    device: Arc<D>,
    uid: u32,
    gid: u32,
    mounted_at: SystemTime,
    /// Called once when the kernel ends the session, after the last request.
    on_destroy: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl<D: BlockDevice> QcowFs<D> {
    pub fn new(device: Arc<D>, uid: u32, gid: u32) -> Self {
        QcowFs {
            device,
            uid,
            gid,
            mounted_at: SystemTime::now(),
            on_destroy: None,
        }
    }

    pub fn on_destroy(mut self, f: impl FnOnce() + Send + Sync + 'static) -> Self {
        self.on_destroy = Some(Box::new(f));
        self
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            ROOT => (
                FileType::Directory,
                if self.device.is_read_only() {
                    0o555
                } else {
                    0o755
                },
                0,
                2,
            ),
            DISK => (
                FileType::RegularFile,
                if self.device.is_read_only() {
                    0o400
                } else {
                    0o600
                },
                self.device.size(),
                1,
            ),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: if ino == DISK {
                self.device.allocated_bytes().unwrap_or(size).div_ceil(512)
            } else {
                0
            },
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
            crtime: self.mounted_at,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn read(&self, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let total = self.device.size();
        let len = u64::from(size).min(total.saturating_sub(offset)) as usize;
        let mut buf = vec![0u8; len];
        self.device.read_at(offset, &mut buf).map_err(errno)?;
        Ok(buf)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        if self.device.is_read_only() {
            return Err(Errno::EROFS);
        }
        let total = self.device.size();
        if offset >= total && !data.is_empty() {
            return Err(Errno::ENOSPC);
        }
        let len = (data.len() as u64).min(total - offset) as usize;
        self.device.write_at(offset, &data[..len]).map_err(errno)?;
        Ok(len as u32)
    }

    fn flush(&self) -> Result<(), Errno> {
        self.device.flush().map_err(errno)
    }

    fn lseek(&self, offset: i64, whence: i32) -> Result<i64, Errno> {
        let size = self.device.size();
        let offset = u64::try_from(offset).map_err(|_| Errno::EINVAL)?;
        match whence {
            libc::SEEK_DATA | libc::SEEK_HOLE => {
                if offset >= size {
                    return Err(Errno::ENXIO);
                }
                match self
                    .device
                    .seek(offset, whence == libc::SEEK_DATA)
                    .map_err(errno)?
                {
                    Some(at) => Ok(at as i64),
                    None => Err(Errno::ENXIO),
                }
            }
            libc::SEEK_SET => Ok(offset as i64),
            libc::SEEK_END => Ok(size as i64),
            _ => Err(Errno::EINVAL),
        }
    }

    fn fallocate(&self, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
        let end = offset.checked_add(length).ok_or(Errno::EINVAL)?;
        let size = self.device.size();
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if mode == punch || mode & !libc::FALLOC_FL_KEEP_SIZE == libc::FALLOC_FL_ZERO_RANGE {
            if self.device.is_read_only() {
                return Err(Errno::EROFS);
            }
            let end = end.min(size);
            if offset < end {
                self.device.discard(offset, end - offset).map_err(errno)?;
            }
            return Ok(());
        }
        if mode & !libc::FALLOC_FL_KEEP_SIZE == 0 {
            // Preallocation: every byte of the disk already exists; the size cannot grow.
            return if end <= size || mode & libc::FALLOC_FL_KEEP_SIZE != 0 {
                Ok(())
            } else {
                Err(Errno::EFBIG)
            };
        }
        Err(Errno::EOPNOTSUPP)
    }
}

fn errno(e: crate::Error) -> Errno {
    log::error!("{e}");
    Errno::from_i32(e.errno())
}

impl<D: BlockDevice + 'static> Filesystem for QcowFs<D> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        Ok(())
    }

    fn destroy(&mut self) {
        if let Some(f) = self.on_destroy.take() {
            f();
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent, self.attr(DISK)) {
            (ROOT, Some(attr)) if name == DISK_NAME => {
                reply.entry(&TTL, &attr, fuser::Generation(0))
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The disk has the image's virtual size; resizing is qemu-img's job.
        if matches!(size, Some(s) if s != self.device.size()) {
            return reply.error(Errno::EPERM);
        }
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != DISK {
            return reply.error(Errno::EISDIR);
        }
        let wants_write = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        if wants_write && self.device.is_read_only() {
            return reply.error(Errno::EROFS);
        }
        // Only this daemon changes the image while it is mounted, so the page cache stays valid.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != DISK {
            return reply.error(Errno::EISDIR);
        }
        match self.read(offset, size) {
            Ok(buf) => reply.data(&buf),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != DISK {
            return reply.error(Errno::EISDIR);
        }
        match self.write(offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2): report a failed write-back to the closer, as a local file system would.
        match self.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (DISK, FileType::RegularFile, DISK_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        if ino != DISK {
            return reply.error(Errno::EINVAL);
        }
        match self.lseek(offset, whence) {
            Ok(at) => reply.offset(at),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != DISK {
            return reply.error(Errno::EISDIR);
        }
        match self.fallocate(offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.device.size().div_ceil(4096);
        reply.statfs(blocks, 0, 0, 2, 0, 4096, 255, 4096);
    }
}
