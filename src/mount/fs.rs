//! The FUSE inode layer: a root directory with `disk`, a `disk-partN` file per partition and a
//! `snapshots/` directory, each a regular file over a [`BlockDevice`].
//! Each request method translates a request into a device call and returns the answer; it never
//! sees qcow2, nor which transport (`devfuse` or `uring`) carried the request.

use std::ffi::OsStr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use fuser::{Errno, FileAttr, FileType, FopenFlags, INodeNo, Notifier};
use parking_lot::Mutex;

use super::inodes::{
    errno, is_partition, Done, FileNode, DISK, DISK_NAME, ROOT, SNAPSHOT_BASE, SNAPSHOT_DIR,
    SNAPSHOT_DIR_NAME,
};
use super::partitions::{PartitionFiles, PartitionWriter};
use crate::disk::BlockDevice;

/// Largest read and write request we ask the kernel for.
pub const MAX_IO: u32 = 1 << 20;
/// The disk and snapshots never change size behind the kernel's back.
const TTL: Duration = Duration::from_secs(3600);
/// Partition files come and go when the guest rewrites its partition table.
const SHORT_TTL: Duration = Duration::from_secs(1);

/// The mounted file system: `disk`, `disk-partN` for each partition, `snapshots/NAME` read-only.
pub struct QcowFs {
    disk: Arc<dyn BlockDevice>,
    snapshots: Vec<FileNode>,
    partitions: Arc<PartitionFiles>,
    partition_writer: PartitionWriter,
    /// Set once the session exists; partition writes use it to drop `disk`'s stale pages.
    notifier: Arc<OnceLock<Notifier>>,
    uid: u32,
    gid: u32,
    mounted_at: SystemTime,
    /// Called once when the kernel ends the session, after the last request.
    on_destroy: Mutex<Option<Box<dyn FnOnce() + Send + Sync>>>,
}

impl QcowFs {
    pub fn new(disk: Arc<dyn BlockDevice>, uid: u32, gid: u32) -> Self {
        let notifier = Arc::new(OnceLock::new());
        let partitions = Arc::new(PartitionFiles::new(disk.clone(), notifier.clone()));
        QcowFs {
            disk,
            snapshots: Vec::new(),
            partition_writer: PartitionWriter::start(partitions.clone()),
            partitions,
            notifier,
            uid,
            gid,
            mounted_at: SystemTime::now(),
            on_destroy: Mutex::new(None),
        }
    }

    /// Show `snapshots/NAME` files, given (name, id, device). A '/' in a name becomes '_'; a name
    /// that repeats (QEMU allows that; ids are unique) gets its id appended: `NAME@ID`.
    pub fn with_snapshots(mut self, views: Vec<(String, String, Arc<dyn BlockDevice>)>) -> Self {
        let clean = |n: &str| {
            if n.is_empty() {
                "_".to_string()
            } else {
                n.replace('/', "_")
            }
        };
        let mut seen = std::collections::HashMap::<String, usize>::new();
        for (name, _, _) in &views {
            *seen.entry(clean(name)).or_default() += 1;
        }
        self.snapshots = views
            .into_iter()
            .enumerate()
            .map(|(i, (name, id, device))| {
                let base = clean(&name);
                let name = if seen.get(&base).copied().unwrap_or(0) > 1 {
                    format!("{base}@{id}")
                } else {
                    base
                };
                FileNode {
                    ino: INodeNo(SNAPSHOT_BASE + i as u64),
                    name,
                    device,
                    disk_range: None,
                }
            })
            .collect();
        self
    }

    pub fn on_destroy(mut self, f: impl FnOnce() + Send + Sync + 'static) -> Self {
        self.on_destroy = Mutex::new(Some(Box::new(f)));
        self
    }

    /// Where the session's notifier goes once the session exists (see `partitions`).
    pub fn notifier_slot(&self) -> Arc<OnceLock<Notifier>> {
        self.notifier.clone()
    }

    fn partitions(&self) -> Vec<FileNode> {
        self.partitions.files()
    }

    fn file(&self, ino: INodeNo) -> Option<FileNode> {
        if ino == DISK {
            return Some(FileNode {
                ino,
                name: DISK_NAME.into(),
                device: self.disk.clone(),
                disk_range: None,
            });
        }
        if ino.0 >= SNAPSHOT_BASE {
            return self.snapshots.iter().find(|f| f.ino == ino).cloned();
        }
        if is_partition(ino) {
            return self.partitions().into_iter().find(|f| f.ino == ino);
        }
        None
    }

    fn dir_attr(&self, ino: INodeNo) -> FileAttr {
        self.make_attr(
            ino,
            FileType::Directory,
            if self.disk.is_read_only() {
                0o555
            } else {
                0o755
            },
            0,
            0,
            2,
        )
    }

    fn file_attr(&self, node: &FileNode) -> FileAttr {
        let device = &node.device;
        let perm = if device.is_read_only() { 0o400 } else { 0o600 };
        let size = device.size();
        let blocks = device.allocated_bytes().unwrap_or(size).div_ceil(512);
        self.make_attr(node.ino, FileType::RegularFile, perm, size, blocks, 1)
    }

    fn make_attr(
        &self,
        ino: INodeNo,
        kind: FileType,
        perm: u16,
        size: u64,
        blocks: u64,
        nlink: u32,
    ) -> FileAttr {
        FileAttr {
            ino,
            size,
            blocks,
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
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<(FileAttr, Duration)> {
        match ino {
            ROOT => Some((self.dir_attr(ino), SHORT_TTL)),
            SNAPSHOT_DIR if !self.snapshots.is_empty() => Some((self.dir_attr(ino), TTL)),
            _ => {
                let node = self.file(ino)?;
                let ttl = if is_partition(ino) { SHORT_TTL } else { TTL };
                Some((self.file_attr(&node), ttl))
            }
        }
    }

    fn lookup_name(&self, parent: INodeNo, name: &str) -> Option<INodeNo> {
        match parent {
            ROOT if name == DISK_NAME => Some(DISK),
            ROOT if name == SNAPSHOT_DIR_NAME && !self.snapshots.is_empty() => Some(SNAPSHOT_DIR),
            ROOT => self
                .partitions()
                .into_iter()
                .find(|f| f.name == name)
                .map(|f| f.ino),
            SNAPSHOT_DIR => self
                .snapshots
                .iter()
                .find(|f| f.name == name)
                .map(|f| f.ino),
            _ => None,
        }
    }

    fn entries(&self, dir: INodeNo) -> Option<Vec<(INodeNo, FileType, String)>> {
        let mut out = vec![
            (dir, FileType::Directory, ".".to_string()),
            (ROOT, FileType::Directory, "..".to_string()),
        ];
        match dir {
            ROOT => {
                out.push((DISK, FileType::RegularFile, DISK_NAME.into()));
                out.extend(
                    self.partitions()
                        .into_iter()
                        .map(|f| (f.ino, FileType::RegularFile, f.name)),
                );
                if !self.snapshots.is_empty() {
                    out.push((SNAPSHOT_DIR, FileType::Directory, SNAPSHOT_DIR_NAME.into()));
                }
            }
            SNAPSHOT_DIR => out.extend(
                self.snapshots
                    .iter()
                    .map(|f| (f.ino, FileType::RegularFile, f.name.clone())),
            ),
            _ => return None,
        }
        Some(out)
    }

    /// How much of a write of `len` bytes at `offset` fits the device.
    fn writable_len(device: &dyn BlockDevice, offset: u64, len: usize) -> Result<usize, Errno> {
        if device.is_read_only() {
            return Err(Errno::EROFS);
        }
        let total = device.size();
        if offset >= total && len > 0 {
            return Err(Errno::ENOSPC);
        }
        Ok((len as u64).min(total - offset) as usize)
    }

    /// A write through `disk` (partition files go through the partition writer).
    fn write_disk(&self, device: &dyn BlockDevice, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let len = Self::writable_len(device, offset, data.len())?;
        device.write_at(offset, &data[..len]).map_err(errno)?;
        let changed = self.partitions.note_write(offset, len as u64);
        self.partition_writer.notify(changed);
        Ok(len as u32)
    }

    fn seek(&self, device: &dyn BlockDevice, offset: i64, whence: i32) -> Result<i64, Errno> {
        let size = device.size();
        let offset = u64::try_from(offset).map_err(|_| Errno::EINVAL)?;
        match whence {
            libc::SEEK_DATA | libc::SEEK_HOLE => {
                if offset >= size {
                    return Err(Errno::ENXIO);
                }
                match device
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

    /// What an fallocate asks: Some((offset, len)) to discard (possibly empty), None for nothing.
    fn fallocate_plan(
        device: &dyn BlockDevice,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<Option<(u64, u64)>, Errno> {
        let end = offset.checked_add(length).ok_or(Errno::EINVAL)?;
        let size = device.size();
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if mode == punch || mode & !libc::FALLOC_FL_KEEP_SIZE == libc::FALLOC_FL_ZERO_RANGE {
            if device.is_read_only() {
                return Err(Errno::EROFS);
            }
            let end = end.min(size);
            return Ok(Some((offset, end.saturating_sub(offset))));
        }
        if mode & !libc::FALLOC_FL_KEEP_SIZE == 0 {
            // Preallocation: every byte of the disk already exists; the size cannot grow.
            return if end <= size || mode & libc::FALLOC_FL_KEEP_SIZE != 0 {
                Ok(None)
            } else {
                Err(Errno::EFBIG)
            };
        }
        Err(Errno::EOPNOTSUPP)
    }
}

/// What lookup and getattr answer: the attributes and how long the kernel may keep them.
pub type Attr = (FileAttr, Duration);

/// The file system's statfs figures: (blocks, block size).
pub struct Statfs {
    pub blocks: u64,
    pub bsize: u32,
}

/// The requests, independent of how they arrive (`/dev/fuse` through fuser in `devfuse`, or the
/// io_uring queues in `uring`): each transport decodes a request, calls one of these and encodes
/// the answer, so both behave the same byte for byte.
impl QcowFs {
    pub fn lookup(&self, parent: INodeNo, name: &OsStr) -> Result<Attr, Errno> {
        name.to_str()
            .and_then(|n| self.lookup_name(parent, n))
            .and_then(|ino| self.attr(ino))
            .ok_or(Errno::ENOENT)
    }

    pub fn getattr(&self, ino: INodeNo) -> Result<Attr, Errno> {
        self.attr(ino).ok_or(Errno::ENOENT)
    }

    /// Only a size equal to the current one is accepted: resizing is qemu-img's job. Other changes
    /// (times, modes) are ignored, as the attributes are fixed.
    pub fn setattr(&self, ino: INodeNo, size: Option<u64>) -> Result<Attr, Errno> {
        let (attr, ttl) = self.attr(ino).ok_or(Errno::ENOENT)?;
        if matches!(size, Some(s) if s != attr.size) {
            return Err(Errno::EPERM);
        }
        Ok((attr, ttl))
    }

    /// `flags` are open(2)'s.
    pub fn open(&self, ino: INodeNo, flags: i32) -> Result<FopenFlags, Errno> {
        let node = self.file(ino).ok_or(Errno::EISDIR)?;
        let wants_write = flags & libc::O_ACCMODE != libc::O_RDONLY;
        if wants_write && node.device.is_read_only() {
            return Err(Errno::EROFS);
        }
        // Only this daemon changes the image while it is mounted, so `disk`'s cached pages stay
        // valid across opens (partition writes drop the ones they change). Partition files have no
        // page cache at all, so they can never hold stale bytes (see `partitions`).
        Ok(if is_partition(ino) {
            FopenFlags::FOPEN_DIRECT_IO
        } else {
            FopenFlags::FOPEN_KEEP_CACHE
        })
    }

    /// Read up to `buf.len()` bytes at `offset` into `buf`; returns how many (short at the end).
    pub fn read(&self, ino: INodeNo, offset: u64, buf: &mut [u8]) -> Result<usize, Errno> {
        let node = self.file(ino).ok_or(Errno::EISDIR)?;
        let device = node.device.as_ref();
        let len = (buf.len() as u64).min(device.size().saturating_sub(offset)) as usize;
        if len == 0 {
            return Ok(0); // at or past the end: end of file, as pread(2) says, not an error
        }
        device.read_at(offset, &mut buf[..len]).map_err(errno)?;
        Ok(len)
    }

    /// Write `data` at `offset`; `done` gets the count written (cut at the end of the file).
    pub fn write(&self, ino: INodeNo, offset: u64, data: &[u8], done: Done<u32>) {
        let Some(node) = self.file(ino) else {
            return done(Err(Errno::EISDIR));
        };
        if node.disk_range.is_some() {
            match Self::writable_len(node.device.as_ref(), offset, data.len()) {
                Ok(len) => self
                    .partition_writer
                    .write(node, offset, &data[..len], done),
                Err(e) => done(Err(e)),
            }
            return;
        }
        done(self.write_disk(node.device.as_ref(), offset, data));
    }

    /// close(2) and fsync(2): write everything back and report a failure to the caller, as a local
    /// file system would.
    pub fn flush(&self, ino: INodeNo) -> Result<(), Errno> {
        match self.file(ino).map(|n| n.device.flush()) {
            Some(Err(e)) => Err(errno(e)),
            _ => Ok(()),
        }
    }

    /// The entries of directory `ino` from index `offset` on, each given to `add` as (inode, the
    /// offset of the next entry, type, name) until `add` says the reply is full (true).
    pub fn readdir(
        &self,
        ino: INodeNo,
        offset: u64,
        mut add: impl FnMut(INodeNo, u64, FileType, &str) -> bool,
    ) -> Result<(), Errno> {
        let entries = self.entries(ino).ok_or(Errno::ENOTDIR)?;
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        Ok(())
    }

    pub fn lseek(&self, ino: INodeNo, offset: i64, whence: i32) -> Result<i64, Errno> {
        let node = self.file(ino).ok_or(Errno::EINVAL)?;
        self.seek(node.device.as_ref(), offset, whence)
    }

    /// Punch hole and zero range discard; plain preallocation is a no-op (every byte exists).
    pub fn fallocate(&self, ino: INodeNo, offset: u64, length: u64, mode: i32, done: Done<()>) {
        let Some(node) = self.file(ino) else {
            return done(Err(Errno::EISDIR));
        };
        match Self::fallocate_plan(node.device.as_ref(), offset, length, mode) {
            Ok(Some((at, len))) if len > 0 && node.disk_range.is_some() => {
                self.partition_writer.discard(node, at, len, done)
            }
            Ok(Some((at, len))) if len > 0 => done(match node.device.discard(at, len) {
                Ok(()) => {
                    let changed = self.partitions.note_write(at, len);
                    self.partition_writer.notify(changed);
                    Ok(())
                }
                Err(e) => Err(errno(e)),
            }),
            Ok(_) => done(Ok(())),
            Err(e) => done(Err(e)),
        }
    }

    pub fn statfs(&self) -> Statfs {
        Statfs {
            blocks: self.disk.size().div_ceil(4096),
            bsize: 4096,
        }
    }

    /// The session ended: apply every queued partition write, then run the final flush (once).
    pub fn destroy(&self) {
        self.partition_writer.finish();
        if let Some(f) = self.on_destroy.lock().take() {
            f();
        }
    }
}

#[cfg(test)]
mod tests;
