//! FAT12/16/32 (EFI system partitions, data disks) as a [`Tree`], read by fstool's FAT driver
//! (only that: no containers, no codecs). Long names are shown as
//! Linux's vfat shows them and looked up as Windows does (ignoring ASCII case). FAT has no
//! owners and one time: entries are root's, 0755/0644 (0555/0444 when read-only), and atime is
//! the mtime. The driver keeps the whole allocation table in memory, so a volume whose table
//! is larger than [`MAX_FAT_BYTES`] is refused before it is read.

use std::cell::RefCell;
use std::io::{Read, Seek};
use std::path::Path;
use std::sync::Arc;

use fstool::fs::fat::Fat32;
use fstool::fs::{EntryKind, Filesystem};

use super::device::{Cursor, RangeDevice};
use super::tree::{FileData, FsError, FsResult, Kind, Meta, Node, Time, Tree};

/// The largest allocation table read (16 M entries of FAT32: a 512 GiB volume of 32 KiB
/// clusters). fstool holds it all, and a hostile boot sector could claim gigabytes.
pub(super) const MAX_FAT_BYTES: u64 = 64 << 20;

/// Bytes one call of the driver may read: a FAT folder holds at most 65,536 slots of 32 bytes
/// (2 MiB), a path a few of them, a chunk of a file 1 MiB. Past it the call fails by name
/// instead of gathering a hostile cluster chain in memory.
pub(super) const CALL_BUDGET: u64 = 64 << 20;

/// Folders with more entries than this are listed without each entry's time: the driver finds
/// an entry's time by reading its whole folder again, so a time for each of N entries costs N
/// reads of the folder (a folder of 16,384 took 32 s). Their entries show the epoch instead.
const TIMED_ENTRIES: usize = 4096;

/// A FAT volume, open for reading.
pub(crate) struct FatTree {
    device: Arc<RangeDevice>,
    /// The driver and its cursor: every call of the driver takes both mutably.
    fs: RefCell<(Fat32, Cursor)>,
}

impl FatTree {
    pub fn load(device: Arc<RangeDevice>) -> FsResult<FatTree> {
        let (fs, cursor) = open_volume(&device)?;
        Ok(FatTree {
            device,
            fs: RefCell::new((fs, cursor)),
        })
    }

    /// One call of the driver, on its cursor, within [`CALL_BUDGET`].
    fn call<T>(&self, f: impl FnOnce(&mut Fat32, &mut Cursor) -> fstool::Result<T>) -> FsResult<T> {
        let mut guard = self.fs.borrow_mut();
        let (fs, dev) = &mut *guard;
        dev.budget(CALL_BUDGET);
        f(fs, dev).map_err(|e| self.device.error(e))
    }

    /// The metadata of `path` (not the root).
    fn meta(&self, path: &[u8]) -> FsResult<Meta> {
        let path = as_path(path)?;
        let a = self.call(|fs, dev| fs.getattr(dev, path))?;
        Ok(Meta {
            kind: match a.kind {
                EntryKind::Dir => Kind::Dir,
                _ => Kind::File,
            },
            mode: u32::from(a.mode) & 0o7777,
            uid: 0,
            gid: 0,
            len: a.size,
            atime: Time::at(i64::from(a.mtime)),
            mtime: Time::at(i64::from(a.mtime)),
            links: 1,
            id: None,
        })
    }
}

/// The driver open on `device` (and its cursor), once the table the boot sector claims is
/// known to be no larger than [`MAX_FAT_BYTES`].
pub(super) fn open_volume(device: &Arc<RangeDevice>) -> FsResult<(Fat32, Cursor)> {
    let fat_bytes = table_bytes(device)?;
    if fat_bytes > MAX_FAT_BYTES {
        return Err(FsError::Library(format!(
            "its allocation table is {fat_bytes} bytes, more than the {MAX_FAT_BYTES} qcowfs \
             takes in-process; use qcowfs mount and mount -o loop"
        )));
    }
    let mut cursor = Cursor::new(device.clone());
    // The table, the boot sector and the root folder.
    cursor.budget(MAX_FAT_BYTES + (4 << 20));
    let fs = Fat32::open(&mut cursor).map_err(|e| device.error(e))?;
    Ok((fs, cursor))
}

/// The size of the allocation table the boot sector claims.
fn table_bytes(device: &RangeDevice) -> FsResult<u64> {
    let mut boot = [0u8; 512];
    fs_core::BlockRead::read_at(device, 0, &mut boot).map_err(|e| device.error(e))?;
    let b = fstool::fs::fat::boot::BootSector::decode(&boot).map_err(|e| device.error(e))?;
    Ok(u64::from(b.fat_size) * u64::from(b.bytes_per_sector))
}

/// A guest path as the driver takes it (its names are UTF-16, so a path that is not text
/// names nothing there).
pub(super) fn as_path(path: &[u8]) -> FsResult<&Path> {
    std::str::from_utf8(path)
        .map(Path::new)
        .map_err(|_| FsError::Library("not a name a FAT volume can hold".into()))
}

impl Tree for FatTree {
    fn name(&self) -> &'static str {
        "FAT"
    }

    fn root(&self) -> FsResult<Meta> {
        Ok(Meta {
            kind: Kind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            len: 0,
            atime: Time::default(),
            mtime: Time::default(),
            links: 1,
            id: None,
        })
    }

    fn lookup(&self, dir: Node, name: &[u8]) -> FsResult<Option<Meta>> {
        let mut names = Vec::new();
        self.list(dir, &mut |n, _, _| names.push(n))?;
        // The name as stored, else as Windows matches it (ASCII case ignored).
        let found = names
            .iter()
            .find(|n| n.as_slice() == name)
            .or_else(|| names.iter().find(|n| n.eq_ignore_ascii_case(name)));
        match found {
            Some(n) => self.meta(dir.path.join(n).as_bytes()).map(Some),
            None => Ok(None),
        }
    }

    fn read_dir(
        &self,
        dir: Node,
        each: &mut dyn FnMut(Vec<u8>, Meta) -> FsResult<()>,
    ) -> FsResult<()> {
        let mut entries = Vec::new();
        self.list(dir, &mut |n, kind, len| entries.push((n, kind, len)))?;
        let timed = entries.len() <= TIMED_ENTRIES;
        for (name, kind, len) in entries {
            // A name no path can address (a '/' in it: a damaged or hostile volume) is shown
            // with what its entry says; the copy refuses it by name.
            let untimed = !timed || name.contains(&b'/') || name.contains(&0);
            let meta = match untimed {
                true => Meta {
                    kind,
                    len,
                    ..self.root()?
                },
                false => self.meta(dir.path.join(&name).as_bytes())?,
            };
            each(name, meta)?;
        }
        Ok(())
    }

    fn read_link(&self, _: Node) -> FsResult<Vec<u8>> {
        Err(FsError::Library("FAT has no symbolic links".into()))
    }

    fn open<'a>(&'a self, file: Node) -> FsResult<Box<dyn FileData + 'a>> {
        as_path(file.path.as_bytes())?;
        Ok(Box::new(FatData {
            tree: self,
            path: file.path.as_bytes().to_vec(),
            len: file.meta.len,
        }))
    }

    fn max_dirs(&self) -> u64 {
        // Every folder but the root takes a cluster, at least 512 bytes.
        (self.device.len() / 512).max(1)
    }
}

impl FatTree {
    /// The names in folder `dir` with what they are and their lengths, `.` and `..` left out.
    fn list(&self, dir: Node, each: &mut dyn FnMut(Vec<u8>, Kind, u64)) -> FsResult<()> {
        let path = as_path(dir.path.as_bytes())?;
        let entries = self.call(|fs, dev| fs.list(dev, path))?;
        for e in entries {
            let kind = match e.kind {
                EntryKind::Dir => Kind::Dir,
                _ => Kind::File,
            };
            if e.name != "." && e.name != ".." {
                each(e.name.into_bytes(), kind, e.size);
            }
        }
        Ok(())
    }
}

/// One file's bytes: the driver's reader, opened for each chunk (it borrows the driver).
struct FatData<'a> {
    tree: &'a FatTree,
    path: Vec<u8>,
    len: u64,
}

impl FileData for FatData<'_> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> FsResult<()> {
        buf.fill(0);
        let want = self.len.saturating_sub(offset).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(());
        }
        let path = as_path(&self.path)?;
        self.tree
            .call(|fs, dev| read_file(fs, dev, path, offset, &mut buf[..want]))?;
        Ok(())
    }
}

/// Up to `buf.len()` bytes of regular file `path` from `offset` (short only at its end): the
/// driver's reader, opened for this call (it borrows the driver).
pub(super) fn read_file(
    fs: &mut Fat32,
    dev: &mut Cursor,
    path: &Path,
    offset: u64,
    buf: &mut [u8],
) -> fstool::Result<usize> {
    let mut file = fs.open_file_ro(dev, path)?;
    file.seek(std::io::SeekFrom::Start(offset))?;
    let mut done = 0;
    while done < buf.len() {
        let n = file.read(&mut buf[done..])?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}
