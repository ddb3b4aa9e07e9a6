//! FAT12/16/32 changed by fstool's FAT driver (EFI system partitions: a bootloader's config,
//! a `startup.nsh`). FAT has no journal: the driver writes the directory entries, the table and
//! the data in place, and `finish` writes its staged entries and the table home; a crash in
//! between leaves what `fsck.vfat` repairs, as on any FAT. A volume marked dirty (mounted and
//! not unmounted) is refused before anything is written, and so is a table larger than the
//! reader takes.

use std::cell::RefCell;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;

use fstool::fs::fat::Fat32;
use fstool::fs::{EntryKind, FileMeta, FileSource, Filesystem, OpenFlags};

use super::super::device::{Cursor, RangeDevice};
use super::super::error::GuestError;
use super::super::fat::{table_bytes, CALL_BUDGET, MAX_FAT_BYTES};
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
        let fat_bytes = table_bytes(&device)?;
        if fat_bytes > MAX_FAT_BYTES {
            return Err(FsError::Library(format!(
                "its allocation table is {fat_bytes} bytes, more than the {MAX_FAT_BYTES} qcowfs \
                 takes in-process"
            )));
        }
        let mut boot = [0u8; 512];
        fs_core::BlockRead::read_at(device.as_ref(), 0, &mut boot).map_err(|e| device.error(e))?;
        let kind = fstool::fs::fat::boot::BootSector::decode(&boot)
            .map_err(|e| device.error(e))?
            .kind;
        let at = match kind {
            fstool::fs::fat::FatKind::Fat32 => DIRTY_FAT32,
            _ => DIRTY_FAT16,
        };
        if boot[at] & 1 != 0 {
            return Err(GuestError::NotClean("its dirty flag is set").into());
        }
        let mut cursor = Cursor::new(device.clone());
        // The table, the boot sector and the root folder.
        cursor.budget(MAX_FAT_BYTES + (4 << 20));
        let fs = Fat32::open(&mut cursor).map_err(|e| device.error(e))?;
        Ok(FatEditor {
            fs: RefCell::new((fs, cursor)),
            device,
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> FsError {
        self.device.error(e)
    }
}

/// A guest path as the driver takes it.
fn as_path(path: &[u8]) -> FsResult<&Path> {
    std::str::from_utf8(path)
        .map(Path::new)
        .map_err(|_| FsError::Library("not a name a FAT volume can hold".into()))
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
        let mut guard = self.fs.borrow_mut();
        let (fs, dev) = &mut *guard;
        dev.budget(CALL_BUDGET);
        let entries = match fs.list(dev, as_path(parent)?) {
            Ok(e) => e,
            // A parent that is missing or not a folder: nothing has this name.
            Err(fstool::Error::InvalidArgument(_)) => return Ok(None),
            Err(e) => return Err(self.err(e)),
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
        let mut guard = self.fs.borrow_mut();
        let (fs, dev) = &mut *guard;
        dev.budget(CALL_BUDGET);
        let mut f = fs
            .open_file_ro(dev, as_path(path)?)
            .map_err(|e| self.err(e))?;
        f.seek(SeekFrom::Start(offset)).map_err(|e| self.err(e))?;
        let mut done = 0;
        while done < buf.len() {
            let n = f.read(&mut buf[done..]).map_err(|e| self.err(e))?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }

    fn create(&self, path: &[u8], mode: u32) -> FsResult<()> {
        let mut guard = self.fs.borrow_mut();
        let (fs, dev) = &mut *guard;
        dev.budget(CALL_BUDGET);
        fs.create_file(dev, as_path(path)?, FileSource::Zero(0), meta(mode))
            .map_err(|e| self.err(e))
    }

    fn write(&self, path: &[u8], offset: u64, data: &[u8]) -> FsResult<()> {
        let mut guard = self.fs.borrow_mut();
        let (fs, dev) = &mut *guard;
        dev.budget(CALL_BUDGET);
        let flags = OpenFlags::default();
        let mut f = fs
            .open_file_rw(dev, as_path(path)?, flags, None)
            .map_err(|e| self.err(e))?;
        f.seek(SeekFrom::Start(offset)).map_err(|e| self.err(e))?;
        f.write_all(data).map_err(|e| self.err(e))?;
        f.sync().map_err(|e| self.err(e))
    }

    fn truncate(&self, path: &[u8], len: u64) -> FsResult<()> {
        let mut guard = self.fs.borrow_mut();
        let (fs, dev) = &mut *guard;
        dev.budget(CALL_BUDGET);
        let flags = OpenFlags::default();
        let mut f = fs
            .open_file_rw(dev, as_path(path)?, flags, None)
            .map_err(|e| self.err(e))?;
        f.set_len(len).map_err(|e| self.err(e))?;
        f.sync().map_err(|e| self.err(e))
    }

    fn mkdir(&self, path: &[u8], mode: u32) -> FsResult<()> {
        let mut guard = self.fs.borrow_mut();
        let (fs, dev) = &mut *guard;
        dev.budget(CALL_BUDGET);
        fs.create_dir(dev, as_path(path)?, meta(mode))
            .map_err(|e| self.err(e))
    }

    fn remove(&self, path: &[u8]) -> FsResult<()> {
        let mut guard = self.fs.borrow_mut();
        let (fs, dev) = &mut *guard;
        dev.budget(CALL_BUDGET);
        Filesystem::remove(fs, dev, as_path(path)?).map_err(|e| self.err(e))
    }

    fn finish(self: Box<Self>) -> FsResult<()> {
        let (mut fs, mut dev) = self.fs.into_inner();
        dev.budget(CALL_BUDGET);
        fs.flush(&mut dev).map_err(|e| self.device.error(e))?;
        fstool::block::BlockDevice::sync(&mut dev).map_err(|e| self.device.error(e))
    }
}
