//! The walk over a guest tree that `copy-out` makes: each entry's name checked, folders entered
//! within bounds (depth, and no more folders than the file system has inodes, so a directory
//! loop in a hostile image ends), and every entry handed to a [`Sink`]: the host folder
//! (copy.rs) or a tar stream (tar.rs). Progress is counted here.

use ext4_view::{Metadata, PathBuf as GuestPath};

use super::{shown, GuestError, GuestFs};
use crate::error::Result;

/// Deepest tree copied (a directory loop in a hostile image ends here, or at the inode count).
pub const MAX_DEPTH: usize = 256;

/// A single file shows a progress bar from this size on (a tree always shows its spinner).
const LARGE_FILE: u64 = 8 << 20;

/// What a copy did.
#[derive(Debug, Default, Clone, Copy)]
pub struct CopyReport {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub skipped: u64,
}

/// Where the entries of a walk go. `Dir` is the sink's handle on a folder it made.
pub(crate) trait Sink {
    type Dir;
    /// The symlink `name` in `parent`, pointing at `target` (data, never resolved).
    fn symlink(
        &mut self,
        parent: &Self::Dir,
        name: &[u8],
        target: &[u8],
        meta: &Metadata,
    ) -> Result<()>;
    /// The folder `name` in `parent`, before its entries.
    fn dir(&mut self, parent: &Self::Dir, name: &[u8], meta: &Metadata) -> Result<Self::Dir>;
    /// After a folder's entries (modes and times go on last, so a read-only folder is filled).
    fn dir_done(&mut self, dir: Self::Dir, meta: &Metadata) -> Result<()>;
    /// The regular file `name` in `parent`, its bytes read from `file` (`meta.len()` of them);
    /// `progress` is told of every chunk.
    fn file(
        &mut self,
        parent: &Self::Dir,
        name: &[u8],
        path: &GuestPath,
        file: ext4_view::File,
        meta: &Metadata,
        progress: &mut dyn FnMut(u64),
    ) -> Result<()>;
}

/// One walk: the file system, the bounds left, what was done.
pub(crate) struct Walker<'a> {
    pub gfs: &'a GuestFs,
    pub report: CopyReport,
    pub bar: Option<indicatif::ProgressBar>,
    /// Folders that may still be entered: no sound file system has more than its inodes.
    dirs_left: u64,
}

impl<'a> Walker<'a> {
    /// A walk of `gfs`, with a progress bar on stderr when `bar` and the copy is a tree or a
    /// large file (`meta`, the top).
    pub fn new(gfs: &'a GuestFs, meta: &Metadata, bar: bool) -> Self {
        Walker {
            gfs,
            report: CopyReport::default(),
            bar: (bar && (meta.is_dir() || meta.len() >= LARGE_FILE)).then(|| new_bar(meta)),
            dirs_left: gfs.inode_count().max(1),
        }
    }

    /// Hand guest `path` (its metadata `meta`, a final symlink not followed) to `sink` as `name`
    /// in `parent`, and a folder's tree below it.
    pub fn entry<S: Sink>(
        &mut self,
        sink: &mut S,
        parent: &S::Dir,
        name: &[u8],
        path: &GuestPath,
        meta: &Metadata,
        depth: usize,
    ) -> Result<()> {
        let gfs = self.gfs;
        let unsafe_name = || gfs.guest_error(GuestError::UnsafeName(shown(path.as_ref())));
        if name.is_empty()
            || name == b"."
            || name == b".."
            || name.contains(&b'/')
            || name.contains(&0)
        {
            return Err(unsafe_name());
        }
        let fs = gfs.ext4();
        if meta.is_symlink() {
            let target = fs
                .read_link(path)
                .map_err(|e| gfs.error(path.as_ref(), e))?;
            if target.as_ref().contains(&0) {
                return Err(unsafe_name());
            }
            sink.symlink(parent, name, target.as_ref(), meta)?;
            self.report.symlinks += 1;
        } else if meta.is_dir() {
            if depth >= MAX_DEPTH || self.dirs_left == 0 {
                return Err(gfs.guest_error(GuestError::TooDeep(shown(path.as_ref()))));
            }
            self.dirs_left -= 1;
            let dir = sink.dir(parent, name, meta)?;
            self.report.dirs += 1;
            gfs.for_each_child(path, path.as_ref(), |child_name, child, child_meta| {
                self.entry(sink, &dir, &child_name, &child, &child_meta, depth + 1)
            })?;
            sink.dir_done(dir, meta)?;
        } else if meta.file_type().is_regular_file() {
            let file = fs.open(path).map_err(|e| gfs.error(path.as_ref(), e))?;
            let report = &mut self.report;
            let bar = &self.bar;
            sink.file(parent, name, path, file, meta, &mut |n| {
                report.bytes += n;
                if let Some(bar) = bar {
                    bar.inc(n);
                }
            })?;
            self.report.files += 1;
        } else {
            eprintln!(
                "qcowfs: warning: {}: {}",
                crate::error::escaped(gfs.image()),
                GuestError::Special(shown(path.as_ref()))
            );
            self.report.skipped += 1;
        }
        Ok(())
    }

    /// Clear the progress bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn new_bar(meta: &Metadata) -> indicatif::ProgressBar {
    let style = |t: &str| {
        indicatif::ProgressStyle::with_template(t)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    };
    if meta.is_dir() {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(style("{spinner} {bytes} copied ({binary_bytes_per_sec})"));
        bar
    } else {
        let bar = indicatif::ProgressBar::new(meta.len());
        bar.set_style(style("{bar:40} {bytes}/{total_bytes} ({eta} left)"));
        bar
    }
}
