//! ext2/3/4 as a [`Tree`]: read by the `ext4-view` crate over a byte range of the disk
//! (reader.rs), with qcowfs's own reading of inodes and block maps beside it (layout.rs,
//! extents.rs) where that agrees with ext4-view: it gives the inode numbers that find hard links
//! and folder loops, and a file's holes, so a 15 TiB sparse file costs its data, not its size.

use std::sync::Arc;

use ext4_view::{Ext4, Ext4Error, Metadata};

use super::device::RangeDevice;
use super::error::{GuestError, LayoutError};
use super::ext_xattrs::ExtXattrs;
use super::extents::{self, Extent, Extents};
use super::layout::{Layout, RawInode};
use super::reader;
use super::tree::{
    join_close, FileData, FsError, FsResult, Kind, Meta, Node, Range, Time, Tree, Xattr, MAX_RANGES,
};
use crate::disk::BlockDevice;
use crate::error::{Error, Result};

/// The root folder's inode number.
const ROOT_INODE: u32 = 2;

/// Most entries of one folder whose inode numbers qcowfs reads itself (a larger folder is
/// copied without them).
const DIR_SCAN_LIMIT: usize = 1 << 20;

/// The most block groups accepted: 128 TiB of 4 KiB blocks (ext4-view keeps every group
/// descriptor in memory; a hostile count would ask for gigabytes).
const MAX_BLOCK_GROUPS: u64 = 1 << 20;

/// An ext2/3/4 file system, open for reading.
pub(crate) struct ExtTree {
    fs: Ext4,
    /// The superblock's inode count: no sound tree has more directories.
    inodes: u64,
    /// Inode numbers and block maps, read by qcowfs itself where it can.
    layout: Option<Layout>,
    /// Extended attributes and ACLs.
    attrs: ExtXattrs,
}

impl ExtTree {
    /// The file system in `len` bytes of `disk` from `start`; a refusal is a [`GuestError`]
    /// for the caller to name the image and view in.
    pub fn load(disk: Arc<dyn BlockDevice>, start: u64, len: u64) -> Result<ExtTree, FsError> {
        let mut sb = [0u8; 1024];
        disk.read_at(start + 1024, &mut sb).map_err(FsError::Disk)?;
        let inodes = check_superblock(&sb, len)?;
        let layout = Layout::load(disk.clone(), start, len);
        let attrs = ExtXattrs::new(RangeDevice::new(disk.clone(), start, len));
        let fs =
            Ext4::load(Box::new(reader::RangeReader::new(disk, start, len))).map_err(ext4_error)?;
        Ok(ExtTree {
            fs,
            inodes,
            layout,
            attrs,
        })
    }

    fn path(node: Node) -> FsResult<ext4_view::PathBuf> {
        ext4_view::PathBuf::try_from(node.path.as_bytes())
            .map_err(|_| FsError::Ext4(Ext4Error::MalformedPath))
    }

    /// Inode `number`, when qcowfs reads it and it agrees with ext4-view's `meta`.
    fn inode(&self, number: Option<u32>, meta: &Metadata) -> Option<RawInode> {
        let inode = self.layout.as_ref()?.inode(number?).ok()?;
        inode.agrees(meta).then_some(inode)
    }

    /// The entries of folder inode `id` with their numbers, as qcowfs reads them.
    fn numbers(&self, id: Option<u64>) -> Option<Vec<(Vec<u8>, u32)>> {
        let layout = self.layout.as_ref()?;
        let dir = layout.inode(u32::try_from(id?).ok()?).ok()?;
        extents::dir_entries(layout, &dir, DIR_SCAN_LIMIT).ok()
    }
}

/// ext4-view's metadata as ours, with inode `id` when it is known for certain.
fn meta_of(m: &Metadata, id: Option<u32>) -> Meta {
    let kind = match m.file_type() {
        ext4_view::FileType::Directory => Kind::Dir,
        ext4_view::FileType::Symlink => Kind::Symlink,
        ext4_view::FileType::CharacterDevice => Kind::CharDevice,
        ext4_view::FileType::BlockDevice => Kind::BlockDevice,
        ext4_view::FileType::Fifo => Kind::Fifo,
        ext4_view::FileType::Socket => Kind::Socket,
        _ => Kind::File,
    };
    let time = |t: ext4_view::Timestamp| Time {
        secs: t.seconds(),
        nanos: t.nanoseconds(),
    };
    Meta {
        kind,
        mode: u32::from(m.mode()) & 0o7777,
        uid: m.uid(),
        gid: m.gid(),
        len: m.len(),
        atime: time(m.accessed()),
        mtime: time(m.modified()),
        links: 1,
        id: id.map(u64::from),
    }
}

impl Tree for ExtTree {
    fn name(&self) -> &'static str {
        "ext2/3/4"
    }

    fn root(&self) -> FsResult<Meta> {
        let m = self
            .fs
            .symlink_metadata(&ext4_view::PathBuf::new("/"))
            .map_err(ext4_error)?;
        let id = self.inode(Some(ROOT_INODE), &m).map(|i| i.number);
        Ok(meta_of(&m, id))
    }

    fn lookup(&self, dir: Node, name: &[u8]) -> FsResult<Option<Meta>> {
        let child = dir.path.join(name);
        let p = ext4_view::PathBuf::try_from(child.as_bytes())
            .map_err(|_| FsError::Ext4(Ext4Error::MalformedPath))?;
        let m = match self.fs.symlink_metadata(&p) {
            Ok(m) => m,
            Err(Ext4Error::NotFound) => return Ok(None),
            Err(e) => return Err(ext4_error(e)),
        };
        let number = self
            .numbers(dir.meta.id)
            .and_then(|v| v.into_iter().find(|(n, _)| n == name).map(|(_, n)| n));
        let mut meta = meta_of(&m, None);
        if let Some(inode) = self.inode(number, &m) {
            meta.id = Some(u64::from(inode.number));
            meta.links = u32::from(inode.links);
        }
        Ok(Some(meta))
    }

    fn read_dir(
        &self,
        dir: Node,
        each: &mut dyn FnMut(Vec<u8>, Meta) -> FsResult<()>,
    ) -> FsResult<()> {
        let entries = self.fs.read_dir(&Self::path(dir)?).map_err(ext4_error)?;
        // The same entries in the same order, with their numbers; dropped at the first that
        // differs from ext4-view's.
        let mut numbers = self.numbers(dir.meta.id).map(|v| v.into_iter());
        for entry in entries {
            let entry = entry.map_err(ext4_error)?;
            let name = entry.file_name().as_ref().to_vec();
            let number = match numbers.as_mut().and_then(|n| n.next()) {
                Some((n, number)) if n == name => Some(number),
                _ => {
                    numbers = None;
                    None
                }
            };
            if name == b"." || name == b".." {
                continue;
            }
            let m = entry.metadata().map_err(ext4_error)?;
            let mut meta = meta_of(&m, None);
            if let Some(inode) = self.inode(number, &m) {
                meta.id = Some(u64::from(inode.number));
                meta.links = u32::from(inode.links);
            }
            each(name, meta)?;
        }
        Ok(())
    }

    fn read_link(&self, link: Node) -> FsResult<Vec<u8>> {
        let target = self.fs.read_link(&Self::path(link)?).map_err(ext4_error)?;
        Ok(target.as_ref().to_vec())
    }

    fn open<'a>(&'a self, file: Node) -> FsResult<Box<dyn FileData + 'a>> {
        let number = file.meta.id.and_then(|n| u32::try_from(n).ok());
        let mapped = match (&self.layout, number) {
            (Some(layout), Some(n)) => layout.inode(n).ok().map(|i| (layout, i)),
            _ => None,
        };
        Ok(Box::new(ExtData {
            fs: &self.fs,
            path: Self::path(file)?,
            mapped,
            source: None,
        }))
    }

    fn max_dirs(&self) -> u64 {
        self.inodes.max(1)
    }

    fn xattrs(&self, entry: Node) -> FsResult<Vec<Xattr>> {
        let number = entry.meta.id.and_then(|n| u32::try_from(n).ok());
        // Most entries have none, which the inode qcowfs reads itself says without opening a
        // second reader.
        let none = match (&self.layout, number) {
            (Some(layout), Some(n)) => layout.inode(n).is_ok_and(|i| !i.xattrs),
            _ => false,
        };
        match none {
            true => Ok(Vec::new()),
            false => self.attrs.read(number, entry.path.as_bytes()),
        }
    }
}

/// One ext2/3/4 file's bytes: by its block map when qcowfs reads it, else through ext4-view.
struct ExtData<'a> {
    fs: &'a Ext4,
    path: ext4_view::PathBuf,
    /// The inode, when its block map is read by qcowfs.
    mapped: Option<(&'a Layout, RawInode)>,
    source: Option<Source<'a>>,
}

enum Source<'a> {
    Mapped {
        layout: &'a Layout,
        extents: Extents<'a>,
        current: Option<Extent>,
    },
    Whole(Box<ext4_view::File>),
}

impl FileData for ExtData<'_> {
    fn ranges(&mut self) -> FsResult<Option<Vec<Range>>> {
        if let Some((layout, inode)) = &self.mapped {
            match map_ranges(layout, inode) {
                Ok(r) => return Ok(Some(r)),
                // ext4-view may still read it.
                Err(_) => self.mapped = None,
            }
        }
        Ok(None)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> FsResult<()> {
        if self.source.is_none() {
            self.source = Some(match self.mapped {
                Some((layout, ref inode)) => Source::Mapped {
                    layout,
                    extents: Extents::new(layout, inode).map_err(map_error)?,
                    current: None,
                },
                None => Source::Whole(Box::new(self.fs.open(&self.path).map_err(ext4_error)?)),
            });
        }
        match self.source.as_mut().expect("set above") {
            Source::Whole(file) => {
                file.seek_to(offset).map_err(ext4_error)?;
                let n = fill(file, buf).map_err(ext4_error)?;
                buf[n..].fill(0);
            }
            Source::Mapped {
                layout,
                extents,
                current,
            } => {
                buf.fill(0);
                let bs = layout.block_size();
                let end = offset + buf.len() as u64;
                let mut pos = offset;
                while pos < end {
                    let e = match current {
                        Some(e) if (e.logical + e.len) * bs > pos => *e,
                        _ => match extents.next().map_err(map_error)? {
                            Some(e) => {
                                *current = Some(e);
                                continue;
                            }
                            None => break,
                        },
                    };
                    let start = e.logical * bs;
                    if start >= end {
                        break;
                    }
                    let from = pos.max(start);
                    let to = end.min((e.logical + e.len) * bs);
                    let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
                    layout
                        .read(e.physical * bs + (from - start), dst)
                        .map_err(map_error)?;
                    pos = to;
                }
            }
        }
        Ok(())
    }
}

/// Read from `file` until `buf` is full or the file ends; the bytes read.
fn fill(file: &mut ext4_view::File, buf: &mut [u8]) -> Result<usize, Ext4Error> {
    let mut n = 0;
    while n < buf.len() {
        let got = file.read_bytes(&mut buf[n..])?;
        if got == 0 {
            break;
        }
        n += got;
    }
    Ok(n)
}

fn map_error(e: LayoutError) -> FsError {
    FsError::Library(format!("the block map cannot be read: {e}"))
}

/// The data ranges of a mapped file, joined where adjacent, small holes filled past
/// [`MAX_RANGES`].
fn map_ranges(layout: &Layout, inode: &RawInode) -> std::result::Result<Vec<Range>, LayoutError> {
    let bs = layout.block_size();
    let mut extents = Extents::new(layout, inode)?;
    let mut ranges: Vec<Range> = Vec::new();
    // Holes shorter than this are filled (doubled whenever the list is full).
    let mut fill_below = 0u64;
    while let Some(e) = extents.next()? {
        let offset = e.logical * bs;
        let len = (e.len * bs).min(inode.size - offset);
        match ranges.last_mut() {
            Some(last) if offset - (last.offset + last.len) <= fill_below => {
                last.len = offset + len - last.offset;
            }
            _ => ranges.push(Range { offset, len }),
        }
        if ranges.len() > MAX_RANGES {
            fill_below = (fill_below * 2).max(bs);
            ranges = join_close(&ranges, fill_below);
        }
    }
    Ok(ranges)
}

/// Check the geometry an ext2/3/4 superblock (1024 bytes) claims against what ext4-view would
/// allocate and the `len` bytes the file system has; its inode count.
fn check_superblock(sb: &[u8; 1024], len: u64) -> std::result::Result<u64, GuestError> {
    let u32_at = |o: usize| u64::from(u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]));
    let inodes = u32_at(0);
    let is_64bit = u32_at(96) & 0x80 != 0;
    let blocks = u32_at(4) | if is_64bit { u32_at(0x150) << 32 } else { 0 };
    let log = u32_at(24);
    let per_group = u32_at(32);
    let first = u32_at(20);
    // A block size past 64 KiB or a zero group size is ext4-view's to refuse, by name.
    if log > 6 || per_group == 0 {
        return Ok(inodes);
    }
    let bytes = blocks.saturating_mul(1024 << log);
    if bytes > len {
        return Err(GuestError::Geometry {
            claims: format!("{bytes} bytes"),
            limit: format!("the {len} bytes it lies in"),
        });
    }
    let groups = blocks.saturating_sub(first).div_ceil(per_group);
    if groups > MAX_BLOCK_GROUPS {
        return Err(GuestError::Geometry {
            claims: format!("{groups} block groups"),
            limit: MAX_BLOCK_GROUPS.to_string(),
        });
    }
    Ok(inodes)
}

/// An ext4-view error as ours: a read error of the disk comes back as the error it was (naming
/// the layer that failed).
fn ext4_error(source: Ext4Error) -> FsError {
    match source {
        Ext4Error::Io(inner) => match inner.downcast::<Error>() {
            Ok(ours) => FsError::Disk(*ours),
            Err(other) => FsError::Ext4(Ext4Error::Io(other)),
        },
        other => FsError::Ext4(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn superblock(blocks: u32, log: u32, per_group: u32) -> [u8; 1024] {
        let mut sb = [0u8; 1024];
        sb[0..4].copy_from_slice(&64u32.to_le_bytes());
        sb[4..8].copy_from_slice(&blocks.to_le_bytes());
        sb[24..28].copy_from_slice(&log.to_le_bytes());
        sb[32..36].copy_from_slice(&per_group.to_le_bytes());
        sb
    }

    #[test]
    fn a_superblock_larger_than_its_disk_or_with_too_many_groups_is_refused() {
        assert_eq!(
            check_superblock(&superblock(16384, 0, 8192), 16 << 20).unwrap(),
            64
        );
        assert!(check_superblock(&superblock(16385, 0, 8192), 16 << 20).is_err());
        let e = check_superblock(&superblock(u32::MAX, 0, 8), u64::MAX).unwrap_err();
        assert!(e.to_string().contains("block groups"), "{e}");
    }
}
