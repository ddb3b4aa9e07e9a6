//! XFS (v4 and v5) as a [`Tree`], read by the rust-fs-xfs crate: a dirty log is replayed into
//! memory over the device (the disk is never written), unknown incompatible features and
//! realtime data are refused by name. Entries are found by inode number, so hard links and
//! folder loops are recognised; a file's extents give its holes.

use std::sync::Arc;

use fs_xfs::inode::{FileType, Inode};
use fs_xfs::Filesystem;

use super::device::RangeDevice;
use super::tree::{FileData, FsResult, Kind, Meta, Node, Range, Time, Tree, Xattr};

/// An XFS file system, open for reading.
pub(crate) struct XfsTree {
    fs: Filesystem,
    device: Arc<RangeDevice>,
}

impl XfsTree {
    pub fn load(device: Arc<RangeDevice>) -> FsResult<XfsTree> {
        let fs = Filesystem::mount(device.clone()).map_err(|e| device.error(e))?;
        Ok(XfsTree { fs, device })
    }

    fn file(&self, node: Node) -> FsResult<fs_xfs::fs::File<'_>> {
        let ino = node.meta.id.unwrap_or(self.fs.superblock().rootino);
        self.fs.open_ino(ino).map_err(|e| self.device.error(e))
    }
}

fn meta_of(i: &Inode) -> Meta {
    let kind = match i.file_type() {
        Some(FileType::Directory) => Kind::Dir,
        Some(FileType::Symlink) => Kind::Symlink,
        Some(FileType::CharDevice) => Kind::CharDevice,
        Some(FileType::BlockDevice) => Kind::BlockDevice,
        Some(FileType::Fifo) => Kind::Fifo,
        Some(FileType::Socket) => Kind::Socket,
        _ => Kind::File,
    };
    let time = |t: fs_xfs::inode::Timestamp| Time {
        secs: t.sec,
        nanos: t.nsec,
    };
    Meta {
        kind,
        mode: u32::from(i.permissions()),
        uid: i.uid,
        gid: i.gid,
        len: i.size,
        atime: time(i.atime),
        mtime: time(i.mtime),
        links: i.nlink,
        id: Some(i.ino),
    }
}

impl Tree for XfsTree {
    fn name(&self) -> &'static str {
        "XFS"
    }

    fn root(&self) -> FsResult<Meta> {
        let root = self.fs.root().map_err(|e| self.device.error(e))?;
        Ok(meta_of(root.inode()))
    }

    fn lookup(&self, dir: Node, name: &[u8]) -> FsResult<Option<Meta>> {
        match self.file(dir)?.open_child(name) {
            Ok(f) => Ok(Some(meta_of(f.inode()))),
            Err(fs_xfs::Error::NotFound) => Ok(None),
            Err(e) => Err(self.device.error(e)),
        }
    }

    fn read_dir(
        &self,
        dir: Node,
        each: &mut dyn FnMut(Vec<u8>, Meta) -> FsResult<()>,
    ) -> FsResult<()> {
        let entries = self
            .file(dir)?
            .entries()
            .map_err(|e| self.device.error(e))?;
        for e in entries {
            if e.name == b"." || e.name == b".." {
                continue;
            }
            let child = self.fs.open_ino(e.ino).map_err(|e| self.device.error(e))?;
            each(e.name, meta_of(child.inode()))?;
        }
        Ok(())
    }

    fn read_link(&self, link: Node) -> FsResult<Vec<u8>> {
        self.file(link)?
            .link_target()
            .map_err(|e| self.device.error(e))
    }

    fn open<'a>(&'a self, file: Node) -> FsResult<Box<dyn FileData + 'a>> {
        Ok(Box::new(XfsData {
            tree: self,
            file: self.file(file)?,
        }))
    }

    fn max_dirs(&self) -> u64 {
        // Every folder is an inode, and no inode is smaller than 256 bytes.
        (self.device.len() / 256).max(1)
    }

    fn xattrs(&self, entry: Node) -> FsResult<Vec<Xattr>> {
        let file = self.file(entry)?;
        let all = self.fs.list_xattrs(file.inode(), file.raw());
        let all = all.map_err(|e| self.device.error(e))?;
        // The stored ACLs (trusted.SGI_ACL_*) come with their VFS names too: only those are kept.
        Ok(all
            .into_iter()
            .filter(|a| !a.name.starts_with(b"trusted.SGI_ACL_"))
            .map(|a| Xattr {
                name: a.name,
                value: a.value,
            })
            .collect())
    }
}

struct XfsData<'a> {
    tree: &'a XfsTree,
    file: fs_xfs::fs::File<'a>,
}

impl FileData for XfsData<'_> {
    fn ranges(&mut self) -> FsResult<Option<Vec<Range>>> {
        let inode = self.file.inode();
        // Data kept inside the inode has no extents: it is read whole.
        if inode.format != fs_xfs::inode::Format::Extents
            && inode.format != fs_xfs::inode::Format::Btree
        {
            return Ok(None);
        }
        let bs = u64::from(self.tree.fs.superblock().blocksize);
        let extents = match self.tree.fs.data_extents(inode, self.file.raw()) {
            Ok(e) => e,
            Err(e) => return Err(self.tree.device.error(e)),
        };
        let mut ranges: Vec<Range> = Vec::new();
        let mut sorted: Vec<_> = extents.iter().filter(|e| !e.unwritten).collect();
        sorted.sort_by_key(|e| e.startoff);
        for e in sorted {
            let offset = e.startoff.saturating_mul(bs);
            let len = e.blockcount.saturating_mul(bs);
            match ranges.last_mut() {
                Some(last) if last.offset + last.len >= offset => {
                    last.len = (offset + len).max(last.offset + last.len) - last.offset;
                }
                _ => ranges.push(Range { offset, len }),
            }
        }
        Ok(Some(ranges))
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> FsResult<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self
                .file
                .read_at(offset + done as u64, &mut buf[done..])
                .map_err(|e| self.tree.device.error(e))?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf[done..].fill(0);
        Ok(())
    }
}
