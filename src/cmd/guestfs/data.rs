//! A guest file's bytes for `copy-out`: where its data lies (a list of byte ranges; the rest
//! is holes) and a forward reader of those ranges. When qcowfs could read the file's inode
//! itself and it agrees with ext4-view (layout.rs), the ranges come from the block map
//! (extents.rs) and the bytes straight from the disk, so a 15 TiB sparse file costs its data,
//! not its size. Otherwise the whole file is one range read through ext4-view, holes as zeros,
//! and such a file may be no longer than the file system it lies in (no unmapped file that
//! long can be anything but holes): a bound instead of hours of zeros.

use ext4_view::{Metadata, PathBuf as GuestPath};

use super::error::GuestError;
use super::extents::{Extent, Extents};
use super::layout::{Layout, LayoutError, RawInode};
use super::list::fill;
use super::open::{shown, GuestFs};
use crate::error::{Error, Result};

/// Most data ranges handed to a sink: a file with more (a hole every few blocks) has its
/// smallest holes filled with zeros until it fits, so the tar header stays small.
pub(crate) const MAX_RANGES: usize = 1 << 16;

/// A byte range of a file that holds data (the bytes between ranges are holes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Range {
    pub offset: u64,
    pub len: u64,
}

/// One regular guest file, ready to be copied.
pub(crate) struct GuestData<'a> {
    gfs: &'a GuestFs,
    path: &'a GuestPath,
    len: u64,
    /// The inode, when its block map is read by qcowfs.
    mapped: Option<(&'a Layout, RawInode)>,
}

impl<'a> GuestData<'a> {
    /// The file at `path` (`meta` as ext4-view read it), with `inode` when qcowfs read the
    /// same inode itself.
    pub fn new(
        gfs: &'a GuestFs,
        path: &'a GuestPath,
        meta: &Metadata,
        inode: Option<RawInode>,
    ) -> Self {
        let mapped = gfs.layout().zip(inode);
        GuestData {
            gfs,
            path,
            len: meta.len(),
            mapped,
        }
    }

    /// The file's size.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// The ranges that hold data, in order, at most [`MAX_RANGES`]. A file that cannot be
    /// mapped is one range; refused when that is longer than the file system.
    pub fn ranges(&mut self) -> Result<Vec<Range>> {
        if let Some((layout, inode)) = &self.mapped {
            match map_ranges(layout, inode) {
                Ok(r) => return Ok(r),
                // ext4-view may still read it; the bound below applies.
                Err(_) => self.mapped = None,
            }
        }
        let limit = self.gfs.fs_bytes();
        if self.len > limit {
            return Err(self.gfs.guest_error(GuestError::Unmapped {
                path: shown(self.path.as_ref()),
                len: self.len,
                limit,
            }));
        }
        Ok(match self.len {
            0 => Vec::new(),
            len => vec![Range { offset: 0, len }],
        })
    }

    /// A reader of the file's bytes, forward only (call after [`GuestData::ranges`]).
    pub fn reader(&self) -> Result<DataReader<'a>> {
        let source = match &self.mapped {
            Some((layout, inode)) => Source::Mapped {
                layout,
                extents: Extents::new(layout, inode).map_err(|e| self.map_error(e))?,
                current: None,
            },
            None => Source::Whole(Box::new(
                self.gfs
                    .ext4()
                    .open(self.path)
                    .map_err(|e| self.gfs.error(self.path.as_ref(), e))?,
            )),
        };
        Ok(DataReader {
            gfs: self.gfs,
            path: self.path,
            source,
            at: 0,
        })
    }

    fn map_error(&self, e: LayoutError) -> Error {
        map_error(self.gfs, self.path, e)
    }
}

fn map_error(gfs: &GuestFs, path: &GuestPath, e: LayoutError) -> Error {
    gfs.guest_error(GuestError::Map {
        path: shown(path.as_ref()),
        source: e,
    })
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

/// `ranges` with the holes of at most `fill_below` bytes between them filled.
fn join_close(ranges: &[Range], fill_below: u64) -> Vec<Range> {
    let mut out: Vec<Range> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(last) if r.offset - (last.offset + last.len) <= fill_below => {
                last.len = r.offset + r.len - last.offset;
            }
            _ => out.push(*r),
        }
    }
    out
}

enum Source<'a> {
    Mapped {
        layout: &'a Layout,
        extents: Extents<'a>,
        current: Option<Extent>,
    },
    Whole(Box<ext4_view::File>),
}

/// Reads a guest file's bytes front to back.
pub(crate) struct DataReader<'a> {
    gfs: &'a GuestFs,
    path: &'a GuestPath,
    source: Source<'a>,
    /// Bytes before this were read (or skipped).
    at: u64,
}

impl DataReader<'_> {
    /// Fill `buf` with the file's bytes from `offset` (never before the last read's end; holes
    /// read as zeros).
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let gfs = self.gfs;
        let path = self.path;
        match &mut self.source {
            Source::Whole(file) => {
                if offset != self.at {
                    file.seek_to(offset)
                        .map_err(|e| gfs.error(path.as_ref(), e))?;
                }
                let n = fill(file, buf).map_err(|e| gfs.error(path.as_ref(), e))?;
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
                        _ => match extents.next().map_err(|e| map_error(gfs, path, e))? {
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
                        .map_err(|e| map_error(gfs, path, e))?;
                    pos = to;
                }
            }
        }
        self.at = offset + buf.len() as u64;
        Ok(())
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
}
