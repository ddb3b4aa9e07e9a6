//! The one view of a guest file system that `ls`, `cat` and `copy-out` read through, whatever
//! library reads it (ext.rs: ext4-view; xfs.rs, btrfs.rs, ntfs.rs: the rust-fs crates; fat.rs:
//! fstool): a [`Tree`] answers for one folder or file at a time, and [`Meta`] says what an entry
//! is in the terms `stat` uses. Paths are resolved here, not by the libraries, so every file
//! system follows symlinks the same bounded way (resolve.rs).

use std::ffi::OsStr;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::error::GuestError;
use crate::error::Error;

/// A guest path (bytes) as terminal-safe text.
pub(crate) fn shown(path: &[u8]) -> String {
    crate::error::escaped(Path::new(OsStr::from_bytes(path)))
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

/// A time as seconds and nanoseconds since the epoch (UTC).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Time {
    pub secs: i64,
    pub nanos: u32,
}

impl Time {
    /// `secs` seconds since the epoch, no fraction.
    pub fn at(secs: i64) -> Time {
        Time { secs, nanos: 0 }
    }
}

/// One entry's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    /// Permission bits with setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Bytes (a symlink: its target's length).
    pub len: u64,
    pub atime: Time,
    pub mtime: Time,
    /// Names the entry has (hard links).
    pub links: u32,
    /// The entry's number in its file system (inode, MFT record), when known for certain: a
    /// folder met twice and a file with several names are recognised by it.
    pub id: Option<u64>,
}

impl Meta {
    pub fn is_dir(&self) -> bool {
        self.kind == Kind::Dir
    }

    pub fn is_symlink(&self) -> bool {
        self.kind == Kind::Symlink
    }

    pub fn is_file(&self) -> bool {
        self.kind == Kind::File
    }
}

/// An absolute guest path as bytes (`/`, `/etc/fstab`): resolved ones name no symlink and hold
/// no `.` or `..` (resolve.rs makes them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPath(Vec<u8>);

impl GuestPath {
    pub fn root() -> GuestPath {
        GuestPath(b"/".to_vec())
    }

    /// The entry `name` of this folder.
    pub fn join(&self, name: &[u8]) -> GuestPath {
        let mut p = self.0.clone();
        if p.last() != Some(&b'/') {
            p.push(b'/');
        }
        p.extend_from_slice(name);
        GuestPath(p)
    }

    /// The last name; None for the root.
    pub fn last_name(&self) -> Option<&[u8]> {
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) if i + 1 < self.0.len() => Some(&self.0[i + 1..]),
            _ => None,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The path as text, for libraries that take `&str` (None when it is not UTF-8: such a
    /// name cannot be in a file system whose names are UTF-16).
    pub fn to_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }
}

/// One extended attribute as `getfattr -d -m -` shows it through the kernel: its full name
/// (`user.x`, `security.capability`) and its value, a POSIX ACL in the kernel's
/// `posix_acl_xattr` format whatever the file system stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xattr {
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

/// An entry handed to a [`Tree`]: its resolved path and its metadata (path-based libraries use
/// the one, number-based ones the other).
#[derive(Clone, Copy)]
pub struct Node<'a> {
    pub path: &'a GuestPath,
    pub meta: &'a Meta,
}

/// A byte range of a file that holds data (the bytes between ranges are holes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Range {
    pub offset: u64,
    pub len: u64,
}

/// Most data ranges handed to a sink: a file with more (a hole every few blocks) has its
/// smallest holes filled with zeros until it fits, so the tar header stays small.
pub(crate) const MAX_RANGES: usize = 1 << 16;

/// `ranges` (in order, not overlapping) with the holes of at most `fill_below` bytes between
/// them filled.
pub(crate) fn join_close(ranges: &[Range], fill_below: u64) -> Vec<Range> {
    let mut out: Vec<Range> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.offset.saturating_sub(last.offset + last.len) <= fill_below => {
                last.len = (r.offset + r.len).max(last.offset + last.len) - last.offset;
            }
            _ => out.push(*r),
        }
    }
    out
}

/// Why a tree could not answer.
#[derive(Debug)]
pub enum FsError {
    /// The disk could not be read: our own error, naming the layer that failed.
    Disk(Error),
    /// Something of ours about the guest (a bound, a refusal).
    Guest(GuestError),
    /// ext4-view's error.
    Ext4(ext4_view::Ext4Error),
    /// Another library's message.
    Library(String),
}

impl fmt::Display for FsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsError::Disk(e) => e.fmt(f),
            FsError::Guest(e) => e.fmt(f),
            FsError::Ext4(e) => e.fmt(f),
            FsError::Library(m) => f.write_str(m),
        }
    }
}

impl From<GuestError> for FsError {
    fn from(e: GuestError) -> Self {
        FsError::Guest(e)
    }
}

pub type FsResult<T> = std::result::Result<T, FsError>;

/// The bytes of one regular file, read front to back.
pub trait FileData {
    /// Where the data lies, in order (the rest are holes), when the library can tell; None:
    /// the whole file is read and zeros are found by looking.
    fn ranges(&mut self) -> FsResult<Option<Vec<Range>>> {
        Ok(None)
    }

    /// Fill `buf` with the bytes from `offset` (holes and bytes past the end read as zeros).
    /// Offsets only grow from one call to the next.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> FsResult<()>;
}

/// A guest file system, open for reading.
pub trait Tree {
    /// Its name in messages ("XFS", "ext2/3/4").
    fn name(&self) -> &'static str;

    /// The root folder.
    fn root(&self) -> FsResult<Meta>;

    /// The entry `name` of folder `dir`, a symlink not followed; None when there is none.
    fn lookup(&self, dir: Node, name: &[u8]) -> FsResult<Option<Meta>>;

    /// Each entry of folder `dir` but `.` and `..`, in the file system's order.
    fn read_dir(
        &self,
        dir: Node,
        each: &mut dyn FnMut(Vec<u8>, Meta) -> FsResult<()>,
    ) -> FsResult<()>;

    /// A symlink's target, as stored.
    fn read_link(&self, link: Node) -> FsResult<Vec<u8>>;

    /// A regular file's bytes.
    fn open<'a>(&'a self, file: Node) -> FsResult<Box<dyn FileData + 'a>>;

    /// The most folders a sound tree of this file system can have (the copy's loop bound).
    fn max_dirs(&self) -> u64;

    /// The entry's extended attributes and ACLs, those a copy carries (a file system's own
    /// stored form of an ACL, such as XFS's `trusted.SGI_ACL_FILE`, is left out as `cp -a`
    /// leaves it out). None: the file system has none (FAT, NTFS as read here).
    fn xattrs(&self, _entry: Node) -> FsResult<Vec<Xattr>> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_ranges_are_joined_across_small_holes_only() {
        let r = |offset, len| Range { offset, len };
        let ranges = [r(0, 10), r(12, 4), r(100, 1), r(102, 2)];
        assert_eq!(join_close(&ranges, 2), vec![r(0, 16), r(100, 4)]);
        assert_eq!(join_close(&ranges, 1), vec![r(0, 10), r(12, 4), r(100, 4)]);
        assert_eq!(join_close(&ranges, 1000), vec![r(0, 104)]);
    }

    #[test]
    fn paths_join_and_split_at_slashes() {
        let root = GuestPath::root();
        let etc = root.join(b"etc");
        let fstab = etc.join(b"fstab");
        assert_eq!(fstab.as_bytes(), b"/etc/fstab");
        assert_eq!(fstab.last_name(), Some(&b"fstab"[..]));
        assert_eq!(root.last_name(), None);
    }
}
