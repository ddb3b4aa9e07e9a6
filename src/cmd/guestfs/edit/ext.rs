//! ext2/3/4 changed by rust-fs-ext4: each operation one JBD2 transaction (a file's new contents
//! too, on an extent-mapped file with a journal), the journal checkpointed and the volume left
//! clean by `finish`. A volume that needs recovery, was not cleanly unmounted or records an
//! error is refused before the library opens it (it would replay the journal by writing).

use std::sync::Arc;

use fs_ext4::Filesystem;

use super::super::device::RangeDevice;
use super::super::error::GuestError;
use super::super::tree::{FsError, FsResult, Kind};
use super::editor::{split, Editor, Entry};

/// `s_state` bits: cleanly unmounted, errors detected.
const STATE_VALID: u16 = 1;
const STATE_ERROR: u16 = 2;
/// `s_feature_incompat` bit: the journal holds transactions not yet applied.
const INCOMPAT_RECOVER: u32 = 4;

pub(crate) struct ExtEditor {
    fs: Filesystem,
    device: Arc<RangeDevice>,
}

impl ExtEditor {
    pub fn open(device: Arc<RangeDevice>) -> FsResult<ExtEditor> {
        let mut sb = [0u8; 1024];
        fs_core::BlockRead::read_at(device.as_ref(), 1024, &mut sb).map_err(|e| device.error(e))?;
        let state = u16::from_le_bytes([sb[0x3a], sb[0x3b]]);
        let incompat = u32::from_le_bytes([sb[0x60], sb[0x61], sb[0x62], sb[0x63]]);
        if incompat & INCOMPAT_RECOVER != 0 {
            return Err(GuestError::NotClean("its journal needs recovery").into());
        }
        if state & STATE_ERROR != 0 {
            return Err(GuestError::NotClean("it records errors").into());
        }
        if state & STATE_VALID == 0 {
            return Err(GuestError::NotClean("its state is not clean").into());
        }
        let dev = Arc::new(fs_ext4::fs_core_bridge::CoreDevice::new(device.clone()));
        let fs = Filesystem::mount(dev).map_err(|e| device.error(e))?;
        Ok(ExtEditor { fs, device })
    }

    fn err(&self, e: fs_ext4::error::Error) -> FsError {
        self.device.error(e)
    }

    fn ino(&self, path: &[u8]) -> FsResult<u32> {
        self.fs.lookup_path_bytes(path).map_err(|e| self.err(e))
    }
}

impl Editor for ExtEditor {
    fn stat(&self, path: &[u8]) -> FsResult<Option<Entry>> {
        let ino = match self.fs.lookup_path_bytes(path) {
            Ok(ino) => ino,
            Err(fs_ext4::error::Error::NotFound) => return Ok(None),
            Err(e) => return Err(self.err(e)),
        };
        let inode = self.fs.stat_ino(ino).map_err(|e| self.err(e))?;
        let kind = match inode.mode & 0o170_000 {
            0o040_000 => Kind::Dir,
            0o100_000 => Kind::File,
            0o120_000 => Kind::Symlink,
            _ => Kind::Socket,
        };
        Ok(Some(Entry {
            kind,
            len: inode.size,
            mode: u32::from(inode.mode) & 0o7777,
        }))
    }

    fn read(&self, path: &[u8], offset: u64, buf: &mut [u8]) -> FsResult<usize> {
        let ino = self.ino(path)?;
        self.fs.read_ino(ino, offset, buf).map_err(|e| self.err(e))
    }

    fn create(&self, path: &[u8], mode: u32) -> FsResult<()> {
        let (parent, name) = split(path).ok_or(FsError::Library("the root has no name".into()))?;
        let dir = self.ino(parent)?;
        let mode = 0o100_000 | (mode & 0o7777) as u16;
        self.fs
            .apply_create_at(dir, name, mode)
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn write(&self, path: &[u8], offset: u64, data: &[u8]) -> FsResult<()> {
        let ino = self.ino(path)?;
        self.fs
            .apply_pwrite_ino(ino, offset, data)
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn truncate(&self, path: &[u8], len: u64) -> FsResult<()> {
        let ino = self.ino(path)?;
        self.fs
            .apply_truncate_ino(ino, len)
            .map_err(|e| self.err(e))
    }

    fn replace(&self, path: &[u8], data: &[u8]) -> FsResult<()> {
        match std::str::from_utf8(path) {
            // One transaction for the whole new contents.
            Ok(p) => {
                self.fs
                    .apply_replace_file_content(p, data)
                    .map_err(|e| self.err(e))?;
                Ok(())
            }
            Err(_) => {
                self.write(path, 0, data)?;
                self.truncate(path, data.len() as u64)
            }
        }
    }

    fn mkdir(&self, path: &[u8], mode: u32) -> FsResult<()> {
        let (parent, name) = split(path).ok_or(FsError::Library("the root exists".into()))?;
        let dir = self.ino(parent)?;
        let mode = 0o040_000 | (mode & 0o7777) as u16;
        self.fs
            .apply_mkdir_at(dir, name, mode)
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn remove(&self, path: &[u8]) -> FsResult<()> {
        let (parent, name) =
            split(path).ok_or(FsError::Library("the root cannot be removed".into()))?;
        let dir = self.ino(parent)?;
        let is_dir = self.stat(path)?.is_some_and(|e| e.kind == Kind::Dir);
        match is_dir {
            true => self.fs.apply_rmdir_at(dir, name),
            false => self.fs.apply_unlink_at(dir, name),
        }
        .map_err(|e| self.err(e))
    }

    fn finish(self: Box<Self>) -> FsResult<()> {
        let device = self.device.clone();
        self.fs.finish().map_err(|e| device.error(e))
    }
}
