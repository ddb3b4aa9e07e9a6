//! FAT12/16/32 changed by fstool's FAT driver (EFI system partitions: a bootloader's config,
//! a `startup.nsh`). FAT has no journal: the driver writes the directory entries, the table and
//! the data in place, and `finish` writes its staged entries and the table home; a crash in
//! between leaves what `fsck.vfat` repairs, as on any FAT. A volume marked dirty (mounted and
//! not unmounted) is refused before anything is written, and so is a table larger than the
//! reader takes.

use std::cell::RefCell;
use std::io::{Seek, SeekFrom, Write};
use std::sync::Arc;

use fstool::fs::fat::{Fat32, FatKind};
use fstool::fs::{EntryKind, FileMeta, FileSource, Filesystem, OpenFlags};

use super::super::device::{Cursor, RangeDevice};
use super::super::error::GuestError;
use super::super::fat::{as_path, open_volume, read_file, CALL_BUDGET};
use super::super::tree::{FsError, FsResult, Kind};
use super::editor::{split, Editor, Entry};

pub(crate) struct FatEditor {
    fs: RefCell<(Fat32, Cursor)>,
    device: Arc<RangeDevice>,
}

/// The boot sector's "volume dirty" flag (BS_Reserved1 bit 0: set while mounted), at its offset
/// for FAT12/16 and for FAT32.
const DIRTY_FAT16: usize = 0x25;
const DIRTY_FAT32: usize = 0x41;

impl FatEditor {
    pub fn open(device: Arc<RangeDevice>) -> FsResult<FatEditor> {
        let (fs, cursor) = open_volume(&device)?;
        let at = match fs.kind() {
            FatKind::Fat32 => DIRTY_FAT32,
            _ => DIRTY_FAT16,
        };
        let mut flags = [0u8];
        fs_core::BlockRead::read_at(device.as_ref(), at as u64, &mut flags)
            .map_err(|e| device.error(e))?;
        if flags[0] & 1 != 0 {
            return Err(GuestError::NotClean("its dirty flag is set").into());
        }
        Ok(FatEditor {
            fs: RefCell::new((fs, cursor)),
            device,
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> FsError {
        self.device.error(e)
    }

    /// One call of the driver, on its cursor, within [`CALL_BUDGET`].
    fn call<T>(&self, f: impl FnOnce(&mut Fat32, &mut Cursor) -> fstool::Result<T>) -> FsResult<T> {
        let mut guard = self.fs.borrow_mut();
        let (fs, dev) = &mut *guard;
        dev.budget(CALL_BUDGET);
        f(fs, dev).map_err(|e| self.err(e))
    }
}

/// Metadata for a new entry: `mode`, times now.
fn meta(mode: u32) -> FileMeta {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs().min(u64::from(u32::MAX)) as u32);
    FileMeta {
        mode: (mode & 0o7777) as u16,
        mtime: now,
        atime: now,
        ctime: now,
        ..FileMeta::default()
    }
}

impl Editor for FatEditor {
    fn stat(&self, path: &[u8]) -> FsResult<Option<Entry>> {
        let Some((parent, name)) = split(path) else {
            return Ok(Some(Entry {
                kind: Kind::Dir,
                len: 0,
                mode: 0o755,
            }));
        };
        let parent = as_path(parent)?;
        let listed = self.call(|fs, dev| match fs.list(dev, parent) {
            Ok(e) => Ok(Some(e)),
            // A parent that is missing or not a folder: nothing has this name.
            Err(fstool::Error::InvalidArgument(_)) => Ok(None),
            Err(e) => Err(e),
        })?;
        let Some(entries) = listed else {
            return Ok(None);
        };
        // As Windows matches names: ASCII case ignored.
        let found = entries
            .iter()
            .find(|e| e.name.as_bytes().eq_ignore_ascii_case(name));
        Ok(found.map(|e| Entry {
            kind: match e.kind {
                EntryKind::Dir => Kind::Dir,
                _ => Kind::File,
            },
            len: e.size,
            mode: match e.kind {
                EntryKind::Dir => 0o755,
                _ => 0o644,
            },
        }))
    }

    fn read(&self, path: &[u8], offset: u64, buf: &mut [u8]) -> FsResult<usize> {
        let path = as_path(path)?;
        self.call(|fs, dev| read_file(fs, dev, path, offset, buf))
    }

    fn create(&self, path: &[u8], mode: u32) -> FsResult<()> {
        let path = as_path(path)?;
        self.call(|fs, dev| fs.create_file(dev, path, FileSource::Zero(0), meta(mode)))
    }

    fn write(&self, path: &[u8], offset: u64, data: &[u8]) -> FsResult<()> {
        let path = as_path(path)?;
        self.call(|fs, dev| {
            let mut f = fs.open_file_rw(dev, path, OpenFlags::default(), None)?;
            f.seek(SeekFrom::Start(offset))?;
            f.write_all(data)?;
            f.sync()
        })
    }

    fn truncate(&self, path: &[u8], len: u64) -> FsResult<()> {
        let path = as_path(path)?;
        self.call(|fs, dev| {
            let mut f = fs.open_file_rw(dev, path, OpenFlags::default(), None)?;
            f.set_len(len)?;
            f.sync()
        })
    }

    fn mkdir(&self, path: &[u8], mode: u32) -> FsResult<()> {
        let path = as_path(path)?;
        self.call(|fs, dev| fs.create_dir(dev, path, meta(mode)))
    }

    fn remove(&self, path: &[u8]) -> FsResult<()> {
        let path = as_path(path)?;
        self.call(|fs, dev| Filesystem::remove(fs, dev, path))
    }

    fn finish(self: Box<Self>) -> FsResult<()> {
        let (mut fs, mut dev) = self.fs.into_inner();
        dev.budget(CALL_BUDGET);
        fs.flush(&mut dev).map_err(|e| self.device.error(e))?;
        fstool::block::BlockDevice::sync(&mut dev).map_err(|e| self.device.error(e))
    }
}
