//! A guest file's bytes for `copy-out`: where its data lies (a list of byte ranges; the rest
//! is holes) and a forward reader of those ranges. The ranges come from the file system's
//! library when it can tell (ext.rs reads ext2/3/4 block maps itself); otherwise the whole file
//! is one range, holes read as zeros, and such a file may be no longer than the file system it
//! lies in (no unmapped file that long can be anything but holes): a bound instead of hours of
//! zeros.

use super::error::GuestError;
use super::open::GuestFs;
use super::tree::{join_close, shown, FileData, GuestPath, Meta, Node, MAX_RANGES};
use crate::error::Result;

pub(crate) use super::tree::Range;

/// One regular guest file, open to be copied.
pub(crate) struct GuestData<'a> {
    gfs: &'a GuestFs,
    path: &'a GuestPath,
    len: u64,
    file: Box<dyn FileData + 'a>,
}

impl<'a> GuestData<'a> {
    /// The file at resolved `path` (its metadata `meta`).
    pub fn open(gfs: &'a GuestFs, path: &'a GuestPath, meta: &Meta) -> Result<Self> {
        let file = gfs
            .tree()
            .open(Node { path, meta })
            .map_err(|e| gfs.error(path.as_bytes(), e))?;
        Ok(GuestData {
            gfs,
            path,
            len: meta.len,
            file,
        })
    }

    /// The file's size.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// The ranges that hold data, in order, at most [`MAX_RANGES`]. A file that cannot be
    /// mapped is one range; refused when that is longer than the file system.
    pub fn ranges(&mut self) -> Result<Vec<Range>> {
        // No host file, seek or tar header holds more.
        if self.len > i64::MAX as u64 {
            return Err(self.gfs.guest_error(GuestError::TooLong {
                path: shown(self.path.as_bytes()),
                len: self.len,
            }));
        }
        let mapped = self
            .file
            .ranges()
            .map_err(|e| self.gfs.error(self.path.as_bytes(), e))?;
        if let Some(mut r) = mapped {
            r.retain(|r| r.len > 0 && r.offset < self.len);
            for x in r.iter_mut() {
                x.len = x.len.min(self.len - x.offset);
            }
            let mut fill_below = 0;
            while r.len() > MAX_RANGES {
                fill_below = (fill_below * 2).max(4096);
                r = join_close(&r, fill_below);
            }
            return Ok(r);
        }
        let limit = self.gfs.fs_bytes();
        if self.len > limit {
            return Err(self.gfs.guest_error(GuestError::Unmapped {
                path: shown(self.path.as_bytes()),
                len: self.len,
                limit,
            }));
        }
        Ok(match self.len {
            0 => Vec::new(),
            len => vec![Range { offset: 0, len }],
        })
    }

    /// Fill `buf` with the file's bytes from `offset` (never before the last read's end; holes
    /// read as zeros).
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_at(offset, buf)
            .map_err(|e| self.gfs.error(self.path.as_bytes(), e))
    }
}
