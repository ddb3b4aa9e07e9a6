//! btrfs as a [`Tree`], read by the rust-fs-btrfs crate: checksums checked, compressed extents
//! inflated, RAID5/6 refused by the library. The tree read is the default subvolume (the one
//! `btrfs subvolume set-default` chose, as a mount without `subvol=` shows it) or the one
//! `--subvolume` names (by path or id); subvolumes nested inside it are entered as the kernel
//! enters them. An inode number is only unique within its subvolume, so an entry's number here
//! is its subvolume's index in [`BtrfsTree::trees`] above its inode number.

use std::sync::{Arc, Mutex};

use fs_btrfs::inode::{FileType, Inode};
use fs_btrfs::Filesystem;

use super::device::RangeDevice;
use super::tree::{FileData, FsError, FsResult, Kind, Meta, Node, Time, Tree, Xattr};

/// Bits of an entry's number that hold its inode number; the subvolume's index sits above.
const INO_BITS: u32 = 48;

/// The root tree's directory, which holds the `default` entry (`BTRFS_ROOT_TREE_DIR_OBJECTID`).
const ROOT_TREE_DIR: u64 = 6;

/// The subvolume a file system starts with (`BTRFS_FS_TREE_OBJECTID`).
const FS_TREE: u64 = 5;

/// A btrfs file system, open for reading.
pub(crate) struct BtrfsTree {
    /// The subvolume read ([0]) and those entered below it, each with the guest path of its
    /// top folder.
    trees: Mutex<Vec<(Vec<u8>, Arc<Filesystem>)>>,
    device: Arc<RangeDevice>,
}

impl BtrfsTree {
    /// The default subvolume, or `subvolume` (a path as `btrfs subvolume list` prints it, or
    /// an id).
    pub fn load(device: Arc<RangeDevice>, subvolume: Option<&str>) -> FsResult<BtrfsTree> {
        let err = |e: fs_btrfs::error::Error| device.error(e);
        let top = Filesystem::mount(device.clone()).map_err(err)?;
        let list = top.subvolumes().map_err(err)?;
        let id = match subvolume {
            Some(want) => {
                let trimmed = want.trim_matches('/');
                list.iter()
                    .find(|s| s.path.trim_matches('/') == trimmed || s.id.to_string() == want)
                    .map(|s| s.id)
                    .ok_or_else(|| {
                        let names: Vec<String> = list
                            .iter()
                            .map(|s| format!("{} ({})", s.path, s.id))
                            .collect();
                        FsError::Library(format!(
                            "no subvolume {want}; it has {}",
                            names.join(", ")
                        ))
                    })?
            }
            None => default_subvolume(&top).map_err(err)?,
        };
        let fs = match id {
            FS_TREE => top,
            id => top.open_subvolume(id).map_err(err)?,
        };
        Ok(BtrfsTree {
            trees: Mutex::new(vec![(b"/".to_vec(), Arc::new(fs))]),
            device,
        })
    }

    fn tree(&self, index: usize) -> FsResult<(Vec<u8>, Arc<Filesystem>)> {
        let trees = self.trees.lock().map_err(|_| lost())?;
        trees.get(index).cloned().ok_or_else(lost)
    }

    /// The subvolume and inode number of `node`.
    fn locate(&self, node: Node) -> FsResult<(usize, Vec<u8>, Arc<Filesystem>, u64)> {
        let id = node.meta.id.ok_or_else(lost)?;
        let index = (id >> INO_BITS) as usize;
        let (prefix, fs) = self.tree(index)?;
        Ok((index, prefix, fs, id & ((1 << INO_BITS) - 1)))
    }

    /// The entry `name` of folder `dir` at guest path `path`, in subvolume `index`: an inode of
    /// that subvolume, or the top folder of the subvolume it names.
    fn entry_meta(
        &self,
        index: usize,
        prefix: &[u8],
        fs: &Filesystem,
        path: &[u8],
        entry: &fs_btrfs::dir::DirEntry,
    ) -> FsResult<Meta> {
        if entry.is_inode() {
            let inode = fs.read_inode(entry.ino).map_err(|e| self.device.error(e))?;
            return meta_of(index, &inode);
        }
        // A nested subvolume: resolved from its parent's top, as the kernel crosses into it.
        let mut child = path.to_vec();
        if child.last() != Some(&b'/') {
            child.push(b'/');
        }
        child.extend_from_slice(&entry.name);
        // The path inside the subvolume (its empty names are skipped by the library).
        let inside = &child[prefix.len().min(child.len())..];
        let target = fs
            .resolve_path_bytes(inside)
            .map_err(|e| self.device.error(e))?;
        let Some(sub) = target.tree else {
            return meta_of(index, &target.inode);
        };
        let mut trees = self.trees.lock().map_err(|_| lost())?;
        let at = match trees.iter().position(|(p, _)| *p == child) {
            Some(at) => at,
            None => {
                trees.push((child, Arc::new(sub)));
                trees.len() - 1
            }
        };
        meta_of(at, &target.inode)
    }
}

/// The subvolume a mount without `subvol=` shows: the root tree's `default` entry.
fn default_subvolume(fs: &Filesystem) -> fs_btrfs::error::Result<u64> {
    for (objectid, key_type, _, data) in fs.root_tree_items()? {
        if objectid != ROOT_TREE_DIR || key_type != fs_btrfs::dir::DIR_ITEM_KEY {
            continue;
        }
        for e in fs_btrfs::dir::parse_dir_items(&data)? {
            if e.name == b"default" {
                return Ok(e.ino);
            }
        }
    }
    Ok(FS_TREE)
}

fn lost() -> FsError {
    FsError::Library("an entry's subvolume is not known (an internal error)".into())
}

fn meta_of(index: usize, i: &Inode) -> FsResult<Meta> {
    let kind = match i.file_type() {
        Some(FileType::Directory) => Kind::Dir,
        Some(FileType::Symlink) => Kind::Symlink,
        Some(FileType::CharDevice) => Kind::CharDevice,
        Some(FileType::BlockDevice) => Kind::BlockDevice,
        Some(FileType::Fifo) => Kind::Fifo,
        Some(FileType::Socket) => Kind::Socket,
        _ => Kind::File,
    };
    let time = |t: fs_btrfs::inode::Timestamp| Time {
        secs: t.sec,
        nanos: t.nsec,
    };
    let id = (i.ino < 1 << INO_BITS && index < 1 << (64 - INO_BITS))
        .then_some(((index as u64) << INO_BITS) | i.ino);
    Ok(Meta {
        kind,
        mode: i.permissions() & 0o7777,
        uid: i.uid,
        gid: i.gid,
        len: i.size,
        atime: time(i.atime),
        mtime: time(i.mtime),
        links: i.nlink,
        id,
    })
}

impl Tree for BtrfsTree {
    fn name(&self) -> &'static str {
        "btrfs"
    }

    fn root(&self) -> FsResult<Meta> {
        let (_, fs) = self.tree(0)?;
        let root = fs.root_inode().map_err(|e| self.device.error(e))?;
        meta_of(0, &root)
    }

    fn lookup(&self, dir: Node, name: &[u8]) -> FsResult<Option<Meta>> {
        let (index, _, fs, ino) = self.locate(dir)?;
        match fs.lookup(ino, name) {
            Ok(inode) => return meta_of(index, &inode).map(Some),
            Err(fs_btrfs::Error::NotFound) => return Ok(None),
            // A subvolume's entry: found by listing, which enters it.
            Err(fs_btrfs::Error::UnsupportedFeature(_)) => {}
            Err(e) => return Err(self.device.error(e)),
        }
        let mut found = None;
        self.read_dir(dir, &mut |n, m| {
            if found.is_none() && n == name {
                found = Some(m);
            }
            Ok(())
        })?;
        Ok(found)
    }

    fn read_dir(
        &self,
        dir: Node,
        each: &mut dyn FnMut(Vec<u8>, Meta) -> FsResult<()>,
    ) -> FsResult<()> {
        let (index, prefix, fs, ino) = self.locate(dir)?;
        let entries = fs.read_dir(ino).map_err(|e| self.device.error(e))?;
        for e in entries {
            let meta = self.entry_meta(index, &prefix, &fs, dir.path.as_bytes(), &e)?;
            each(e.name, meta)?;
        }
        Ok(())
    }

    fn read_link(&self, link: Node) -> FsResult<Vec<u8>> {
        let (_, _, fs, ino) = self.locate(link)?;
        fs.read_link(ino).map_err(|e| self.device.error(e))
    }

    fn open<'a>(&'a self, file: Node) -> FsResult<Box<dyn FileData + 'a>> {
        let (_, _, fs, ino) = self.locate(file)?;
        Ok(Box::new(BtrfsData {
            tree: self,
            fs,
            ino,
            len: file.meta.len,
        }))
    }

    fn max_dirs(&self) -> u64 {
        // Every folder is at least an inode item and a directory entry, over 160 bytes.
        (self.device.len() / 160).max(1)
    }

    fn xattrs(&self, entry: Node) -> FsResult<Vec<Xattr>> {
        let (_, _, fs, ino) = self.locate(entry)?;
        let all = fs.list_xattrs(ino).map_err(|e| self.device.error(e))?;
        Ok(all
            .into_iter()
            .map(|a| Xattr {
                name: a.name,
                value: a.value,
            })
            .collect())
    }
}

struct BtrfsData<'a> {
    tree: &'a BtrfsTree,
    fs: Arc<Filesystem>,
    ino: u64,
    len: u64,
}

impl FileData for BtrfsData<'_> {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> FsResult<()> {
        let mut done = 0;
        while done < buf.len() && offset + (done as u64) < self.len {
            let n = self
                .fs
                .read_at(self.ino, offset + done as u64, &mut buf[done..])
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
