//! Which library reads which guest file system (docs/GUEST-LIBRARIES.md says why each was
//! chosen): the one place a [`Contents`] found on the disk becomes a [`Tree`].

use std::sync::Arc;

use super::btrfs::BtrfsTree;
use super::device::RangeDevice;
use super::error::Contents;
use super::ext::ExtTree;
use super::fat::FatTree;
use super::ntfs::NtfsTree;
#[cfg(test)]
use super::tree::{FileData, Meta, Node};
use super::tree::{FsError, FsResult, Tree};
use super::xfs::XfsTree;
use crate::disk::BlockDevice;

/// The file system of kind `found` in `len` bytes of `disk` from `start`, open for reading
/// (`subvolume`: of btrfs, by path or id).
pub fn load(
    found: Contents,
    disk: Arc<dyn BlockDevice>,
    start: u64,
    len: u64,
    subvolume: Option<&str>,
) -> FsResult<Box<dyn Tree>> {
    match found {
        Contents::Ext => Ok(Box::new(ExtTree::load(disk, start, len)?)),
        Contents::Xfs => Ok(Box::new(XfsTree::load(RangeDevice::new(disk, start, len))?)),
        Contents::Ntfs => Ok(Box::new(NtfsTree::load(RangeDevice::new(
            disk, start, len,
        ))?)),
        Contents::Fat => Ok(Box::new(FatTree::load(RangeDevice::new(disk, start, len))?)),
        Contents::Btrfs => Ok(Box::new(BtrfsTree::load(
            RangeDevice::new(disk, start, len),
            subvolume,
        )?)),
        other => Err(FsError::Library(format!(
            "{} is not a file system qcowfs reads",
            other.name()
        ))),
    }
}

/// The name of file systems of kind `found`, as a [`Tree`] gives it.
pub fn name(found: Contents) -> &'static str {
    match found {
        Contents::Ext => "ext2/3/4",
        Contents::Xfs => "XFS",
        Contents::Btrfs => "btrfs",
        Contents::Ntfs => "NTFS",
        Contents::Fat => "FAT",
        Contents::ExFat => "exFAT",
        _ => "unknown",
    }
}

/// A tree whose entries have no numbers (tests of the bounds that hold without them).
#[cfg(test)]
pub(crate) struct NoIds(pub Box<dyn Tree>);

#[cfg(test)]
fn strip(mut m: Meta) -> Meta {
    m.id = None;
    m
}

#[cfg(test)]
impl Tree for NoIds {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn root(&self) -> FsResult<Meta> {
        self.0.root().map(strip)
    }
    fn lookup(&self, dir: Node, name: &[u8]) -> FsResult<Option<Meta>> {
        Ok(self.0.lookup(dir, name)?.map(strip))
    }
    fn read_dir(
        &self,
        dir: Node,
        each: &mut dyn FnMut(Vec<u8>, Meta) -> FsResult<()>,
    ) -> FsResult<()> {
        self.0.read_dir(dir, &mut |n, m| each(n, strip(m)))
    }
    fn read_link(&self, link: Node) -> FsResult<Vec<u8>> {
        self.0.read_link(link)
    }
    fn open<'a>(&'a self, file: Node) -> FsResult<Box<dyn FileData + 'a>> {
        self.0.open(file)
    }
    fn max_dirs(&self) -> u64 {
        self.0.max_dirs()
    }
}
