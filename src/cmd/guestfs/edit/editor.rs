//! The interface each editing library is driven through (`Editor`), what it says of a path
//! (`Entry`), and how a path splits into its folder and name.

use super::super::tree::{FsResult, Kind};

/// What a guest path names, as an editor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub kind: Kind,
    pub len: u64,
    /// Permission bits (`0o7777`).
    pub mode: u32,
}

/// A guest file system open for changes. Paths are absolute guest paths as bytes, resolved by
/// the library name by name (a symlink is not followed: it is an entry like any other).
pub(crate) trait Editor {
    /// What `path` is; None when nothing has that name.
    fn stat(&self, path: &[u8]) -> FsResult<Option<Entry>>;

    /// `buf.len()` bytes of regular file `path` from `offset` (short only at its end).
    fn read(&self, path: &[u8], offset: u64, buf: &mut [u8]) -> FsResult<usize>;

    /// A new empty regular file `path` (its folder exists, the name is free) with `mode`.
    fn create(&self, path: &[u8], mode: u32) -> FsResult<()>;

    /// `data` into regular file `path` at `offset`, growing it as needed.
    fn write(&self, path: &[u8], offset: u64, data: &[u8]) -> FsResult<()>;

    /// Regular file `path` cut or grown to `len` bytes.
    fn truncate(&self, path: &[u8], len: u64) -> FsResult<()>;

    /// Regular file `path`'s contents made `data`, its inode (owner, mode, times other than
    /// mtime, extended attributes) kept; in one transaction where the library has one.
    fn replace(&self, path: &[u8], data: &[u8]) -> FsResult<()> {
        self.write(path, 0, data)?;
        self.truncate(path, data.len() as u64)
    }

    /// A new folder `path` with `mode`.
    fn mkdir(&self, path: &[u8], mode: u32) -> FsResult<()>;

    /// Remove `path`: a file, a symlink, or an empty folder.
    fn remove(&self, path: &[u8]) -> FsResult<()>;

    /// Write everything home and leave the file system clean (as an unmount does).
    fn finish(self: Box<Self>) -> FsResult<()>;
}

/// `path`'s folder and last name (None for the root).
pub(crate) fn split(path: &[u8]) -> Option<(&[u8], &[u8])> {
    let trimmed = path.strip_suffix(b"/").unwrap_or(path);
    let i = trimmed.iter().rposition(|&b| b == b'/')?;
    let name = &trimmed[i + 1..];
    if name.is_empty() {
        return None;
    }
    let parent = match i {
        0 => &b"/"[..],
        _ => &trimmed[..i],
    };
    Some((parent, name))
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn a_path_splits_into_its_folder_and_name() {
        assert_eq!(split(b"/etc/fstab"), Some((&b"/etc"[..], &b"fstab"[..])));
        assert_eq!(split(b"/fstab"), Some((&b"/"[..], &b"fstab"[..])));
        assert_eq!(split(b"/etc/"), Some((&b"/"[..], &b"etc"[..])));
        assert_eq!(split(b"/"), None);
    }
}
