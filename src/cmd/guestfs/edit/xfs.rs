//! XFS changed by rust-fs-xfs: creates, removals, folders, truncation to zero and filling an
//! empty file are log records; overwrites of the same length go in place. The library reads
//! nothing it has logged but not yet written home, so after a logged change the editor
//! checkpoints — the library's clean unmount (metadata written home, the log ended with an
//! unmount record, as the kernel's own unmount leaves it) and a fresh writable mount — before
//! the next change that needs it. New contents of another length are written whole: the file is
//! emptied (logged), checkpointed, and given its bytes in one logged allocation. A volume whose
//! log needs replay is refused by the library before anything is written.

use std::sync::{Arc, Mutex, MutexGuard};

use fs_xfs::inode::FileType;
use fs_xfs::Filesystem;

use super::super::device::RangeDevice;
use super::super::error::GuestError;
use super::super::tree::{FsError, FsResult, Kind};
use super::editor::{split, Editor, Entry};

pub(crate) struct XfsEditor {
    /// The writable mount; None only between a checkpoint's unmount and its mount.
    fs: Mutex<Option<Filesystem>>,
    device: Arc<RangeDevice>,
}

impl XfsEditor {
    pub fn open(device: Arc<RangeDevice>) -> FsResult<XfsEditor> {
        let fs = mount(&device)?;
        Ok(XfsEditor {
            fs: Mutex::new(Some(fs)),
            device,
        })
    }

    fn err(&self, e: fs_xfs::Error) -> FsError {
        self.device.error(e)
    }

    fn lock(&self) -> FsResult<MutexGuard<'_, Option<Filesystem>>> {
        let guard = self.fs.lock().map_err(|_| lost())?;
        match guard.is_some() {
            true => Ok(guard),
            false => Err(lost()),
        }
    }

    /// Run `f` on the mount.
    fn with<T>(&self, f: impl FnOnce(&Filesystem) -> fs_xfs::Result<T>) -> FsResult<T> {
        let guard = self.lock()?;
        f(guard.as_ref().expect("checked by lock")).map_err(|e| self.err(e))
    }

    /// Write home what was logged and mount again, so the next change reads it.
    fn checkpoint(&self) -> FsResult<()> {
        let mut guard = self.lock()?;
        let fs = guard.take().expect("checked by lock");
        fs.unmount().map_err(|e| self.err(e))?;
        *guard = Some(mount(&self.device)?);
        Ok(())
    }

    fn ino(&self, path: &[u8]) -> FsResult<u64> {
        self.with(|fs| fs.open_bytes(path).map(|f| f.inode().ino))
    }

    fn parent(&self, path: &[u8]) -> FsResult<(u64, Vec<u8>)> {
        let (parent, name) = split(path).ok_or(FsError::Library("the root has no name".into()))?;
        Ok((self.ino(parent)?, name.to_vec()))
    }
}

fn mount(device: &Arc<RangeDevice>) -> FsResult<Filesystem> {
    match Filesystem::mount_rw(device.clone()) {
        Ok(fs) => Ok(fs),
        Err(fs_xfs::Error::DirtyLog) => Err(GuestError::NotClean("its log needs replay").into()),
        Err(e) => Err(device.error(e)),
    }
}

fn lost() -> FsError {
    FsError::Library("the XFS mount was lost after a failed checkpoint".into())
}

impl Editor for XfsEditor {
    fn stat(&self, path: &[u8]) -> FsResult<Option<Entry>> {
        let found = self.with(|fs| match fs.open_bytes(path) {
            Ok(f) => Ok(Some(f.inode().clone())),
            Err(fs_xfs::Error::NotFound) => Ok(None),
            Err(e) => Err(e),
        })?;
        Ok(found.map(|inode| Entry {
            kind: match inode.file_type() {
                Some(FileType::Directory) => Kind::Dir,
                Some(FileType::Regular) => Kind::File,
                Some(FileType::Symlink) => Kind::Symlink,
                _ => Kind::Socket,
            },
            len: inode.size,
            mode: u32::from(inode.permissions()),
        }))
    }

    fn read(&self, path: &[u8], offset: u64, buf: &mut [u8]) -> FsResult<usize> {
        self.with(|fs| fs.open_bytes(path)?.read_at(offset, buf))
    }

    fn create(&self, path: &[u8], mode: u32) -> FsResult<()> {
        let (dir, name) = self.parent(path)?;
        let mode = 0o100_000 | (mode & 0o7777) as u16;
        self.with(|fs| fs.create_file(dir, &name, mode))?;
        self.checkpoint()
    }

    fn write(&self, path: &[u8], offset: u64, data: &[u8]) -> FsResult<()> {
        let size = self.stat(path)?.map_or(0, |e| e.len);
        if size == 0 && offset == 0 {
            let ino = self.ino(path)?;
            self.with(|fs| fs.write_into_empty_file(ino, data))?;
            return self.checkpoint();
        }
        // In place, within the file's length (the library refuses growing it here).
        self.with(|fs| {
            let mut done = 0;
            while done < data.len() {
                let f = fs.open_bytes(path)?;
                let n = fs.write_at(f.inode(), f.raw(), offset + done as u64, &data[done..])?;
                if n == 0 {
                    return Err(fs_xfs::Error::Internal("a write made no progress".into()));
                }
                done += n;
            }
            Ok(())
        })
    }

    fn truncate(&self, path: &[u8], len: u64) -> FsResult<()> {
        let ino = self.ino(path)?;
        if len == 0 {
            self.with(|fs| fs.truncate_to_zero(ino).map(|_| ()))?;
            return self.checkpoint();
        }
        self.with(|fs| {
            let f = fs.open_bytes(path)?;
            fs.truncate(f.inode(), len, None)
        })
    }

    fn replace(&self, path: &[u8], data: &[u8]) -> FsResult<()> {
        let old = self.stat(path)?.map_or(0, |e| e.len);
        if old == data.len() as u64 {
            return self.write(path, 0, data);
        }
        if old != 0 {
            self.truncate(path, 0)?;
        }
        match data.is_empty() {
            true => Ok(()),
            false => self.write(path, 0, data),
        }
    }

    fn mkdir(&self, path: &[u8], mode: u32) -> FsResult<()> {
        let (dir, name) = self.parent(path)?;
        let mode = 0o040_000 | (mode & 0o7777) as u16;
        self.with(|fs| fs.create_directory(dir, &name, mode))?;
        self.checkpoint()
    }

    fn remove(&self, path: &[u8]) -> FsResult<()> {
        let (dir, name) = self.parent(path)?;
        let is_dir = self.stat(path)?.is_some_and(|e| e.kind == Kind::Dir);
        self.with(|fs| match is_dir {
            true => fs.remove_directory(dir, &name),
            false => fs.unlink_file(dir, &name),
        })?;
        self.checkpoint()
    }

    fn finish(self: Box<Self>) -> FsResult<()> {
        let fs = self
            .fs
            .lock()
            .map_err(|_| lost())?
            .take()
            .ok_or_else(lost)?;
        fs.unmount().map_err(|e| self.device.error(e))
    }
}
