//! The walk over a guest tree that `copy-out` makes: each entry's name checked, folders entered
//! within bounds, and every entry handed to a [`Sink`]: the host folder (copy.rs) or a tar
//! stream (tar.rs). Progress is counted here.
//!
//! A hostile image can make the tree far larger than its bytes: folders hard-linked into a
//! DAG (2^n paths through n folders) or a loop, or many files sharing the same blocks. So each
//! folder is entered once — a second name for it stops the copy with an error naming it, since
//! no file system here gives a folder two names and a tree copied from a damaged one should not
//! look whole — and a file with several names is copied once, its other names made hard links
//! (as `cp -a` and tar do). Where entries have no known number (`Meta::id`), the bounds still
//! hold: no more entries than the file system's bytes can hold (12 bytes each), no more file
//! data than its bytes, no deeper than [`MAX_DEPTH`], no more folders than the tree allows.

use std::collections::{HashMap, HashSet};

use super::data::{GuestData, Range};
use super::error::GuestError;
use super::open::GuestFs;
use super::tree::shown;
use super::tree::{GuestPath, Kind, Meta, Xattr};
use crate::error::Result;

/// Deepest tree copied (a directory loop in a hostile image ends here, or at the inode count).
pub const MAX_DEPTH: usize = 256;

/// A single file shows a progress bar from this size on (a tree always shows its spinner).
const LARGE_FILE: u64 = 8 << 20;

/// The smallest folder entry of the file systems read here (ext2/3/4's: 8 bytes of header, a
/// name padded to 4; the others' are larger): a file system of N bytes holds at most N / 12.
const SMALLEST_ENTRY: u64 = 12;

/// What a copy did.
#[derive(Debug, Default, Clone, Copy)]
pub struct CopyReport {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub skipped: u64,
    /// Entries whose extended attributes could not be read (each named in a warning).
    pub xattrs_unread: u64,
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
        meta: &Meta,
        attrs: &[Xattr],
    ) -> Result<()>;
    /// The folder `name` in `parent`, before its entries; `attrs` are its extended attributes
    /// and ACLs, given again to [`Sink::dir_done`].
    fn dir(
        &mut self,
        parent: &Self::Dir,
        name: &[u8],
        meta: &Meta,
        attrs: &[Xattr],
    ) -> Result<Self::Dir>;
    /// After a folder's entries (modes, times and a default ACL go on last, so a read-only
    /// folder is filled and its entries do not inherit an ACL they do not have).
    fn dir_done(&mut self, dir: Self::Dir, meta: &Meta, attrs: &[Xattr]) -> Result<()>;
    /// The regular file `name` in `parent`: `data.len()` bytes, data only in `ranges` (the
    /// rest holes); `progress` is told of every chunk. Returns how a later hard link names it.
    // Every fact about one file, handed over in its one call.
    #[allow(clippy::too_many_arguments)]
    fn file(
        &mut self,
        parent: &Self::Dir,
        name: &[u8],
        data: &mut GuestData,
        ranges: &[Range],
        meta: &Meta,
        attrs: &[Xattr],
        progress: &mut dyn FnMut(u64),
    ) -> Result<Vec<u8>>;
    /// `name` in `parent` as a hard link to the file [`Sink::file`] made and named `first`.
    fn link(&mut self, parent: &Self::Dir, name: &[u8], first: &[u8], meta: &Meta) -> Result<()>;
}

/// One walk: the file system, the bounds left, what was done.
pub(crate) struct Walker<'a> {
    gfs: &'a GuestFs,
    report: CopyReport,
    bar: Option<indicatif::ProgressBar>,
    /// Folders that may still be entered: no sound file system has more.
    dirs_left: u64,
    /// Entries that may still be made (see [`SMALLEST_ENTRY`]).
    entries_left: u64,
    /// Bytes of file data that may still be read: no more than the file system's.
    data_left: u64,
    /// The numbers of the folders entered.
    folders: HashSet<u64>,
    /// Files with several names, by number: how the sink named the first copy.
    links: HashMap<u64, Vec<u8>>,
}

impl<'a> Walker<'a> {
    /// A walk of `gfs`, with a progress bar on stderr when `bar` and the copy is a tree or a
    /// large file (`meta`, the top).
    pub fn new(gfs: &'a GuestFs, meta: &Meta, bar: bool) -> Self {
        Walker {
            gfs,
            report: CopyReport::default(),
            bar: (bar && (meta.is_dir() || meta.len >= LARGE_FILE)).then(|| new_bar(meta)),
            dirs_left: gfs.tree().max_dirs().max(1),
            entries_left: gfs.fs_bytes() / SMALLEST_ENTRY,
            data_left: gfs.fs_bytes(),
            folders: HashSet::new(),
            links: HashMap::new(),
        }
    }

    /// Folder `path` about to be entered: an error if it was entered before under another name.
    pub fn folder(&mut self, path: &GuestPath, meta: &Meta) -> Result<()> {
        if let Some(id) = meta.id {
            if !self.folders.insert(id) {
                let e = GuestError::SecondPath(shown(path.as_bytes()));
                return Err(self.gfs.guest_error(e));
            }
        }
        Ok(())
    }

    /// Hand guest `path` (its metadata `meta`, a final symlink not followed) to `sink` as
    /// `name` in `parent`, and a folder's tree below it.
    pub fn entry<S: Sink>(
        &mut self,
        sink: &mut S,
        parent: &S::Dir,
        name: &[u8],
        path: &GuestPath,
        meta: &Meta,
        depth: usize,
    ) -> Result<()> {
        let gfs = self.gfs;
        let unsafe_name = || gfs.guest_error(GuestError::UnsafeName(shown(path.as_bytes())));
        if name.is_empty()
            || name == b"."
            || name == b".."
            || name.contains(&b'/')
            || name.contains(&0)
        {
            return Err(unsafe_name());
        }
        if self.entries_left == 0 {
            return Err(gfs.guest_error(GuestError::TooManyEntries {
                path: shown(path.as_bytes()),
                limit: gfs.fs_bytes() / SMALLEST_ENTRY,
                fs_bytes: gfs.fs_bytes(),
            }));
        }
        self.entries_left -= 1;
        match meta.kind {
            Kind::Symlink => {
                let target = gfs.read_link(path, meta)?;
                if target.contains(&0) {
                    return Err(unsafe_name());
                }
                let attrs = self.attrs(path, meta);
                sink.symlink(parent, name, &target, meta, &attrs)?;
                self.report.symlinks += 1;
            }
            Kind::Dir => {
                if depth >= MAX_DEPTH || self.dirs_left == 0 {
                    return Err(gfs.guest_error(GuestError::TooDeep {
                        path: shown(path.as_bytes()),
                        max: MAX_DEPTH,
                    }));
                }
                self.dirs_left -= 1;
                self.folder(path, meta)?;
                // Read again for `dir_done` rather than held through the whole subtree.
                let attrs = self.attrs(path, meta);
                let dir = sink.dir(parent, name, meta, &attrs)?;
                drop(attrs);
                self.report.dirs += 1;
                let each = |child_name: Vec<u8>, child: GuestPath, child_meta: Meta| {
                    self.entry(sink, &dir, &child_name, &child, &child_meta, depth + 1)
                };
                gfs.for_each_child(path, meta, path.as_bytes(), each)?;
                let attrs = self.attrs(path, meta);
                sink.dir_done(dir, meta, &attrs)?;
            }
            Kind::File => {
                self.file(sink, parent, name, path, meta)?;
                self.report.files += 1;
            }
            _ => {
                eprintln!(
                    "qcowfs: warning: {}: {}",
                    crate::error::escaped(gfs.image()),
                    GuestError::Special(shown(path.as_bytes()))
                );
                self.report.skipped += 1;
            }
        }
        Ok(())
    }

    /// A regular file: copied, or linked to its first copy when it has several names.
    fn file<S: Sink>(
        &mut self,
        sink: &mut S,
        parent: &S::Dir,
        name: &[u8],
        path: &GuestPath,
        meta: &Meta,
    ) -> Result<()> {
        let gfs = self.gfs;
        let linked = meta.id.filter(|_| meta.links > 1);
        if let Some(first) = linked.and_then(|n| self.links.get(&n)) {
            return sink.link(parent, name, first, meta);
        }
        let mut data = GuestData::open(gfs, path, meta)?;
        let ranges = data.ranges()?;
        let bytes: u64 = ranges.iter().map(|r| r.len).sum();
        if bytes > self.data_left {
            return Err(gfs.guest_error(GuestError::TooMuchData {
                path: shown(path.as_bytes()),
                limit: gfs.fs_bytes(),
            }));
        }
        self.data_left -= bytes;
        let attrs = self.attrs(path, meta);
        let report = &mut self.report;
        let bar = &self.bar;
        let first = sink.file(parent, name, &mut data, &ranges, meta, &attrs, &mut |n| {
            report.bytes += n;
            if let Some(bar) = bar {
                bar.inc(n);
            }
        })?;
        if let Some(n) = linked {
            self.links.insert(n, first);
        }
        Ok(())
    }

    /// The extended attributes and ACLs of `path`. A list the guest cannot give (damaged) is
    /// named in a warning and the entry copied without them, as `cp -a` copies a file whose
    /// attributes it cannot read.
    pub fn attrs(&mut self, path: &GuestPath, meta: &Meta) -> Vec<Xattr> {
        match self.gfs.xattrs(path, meta) {
            Ok(attrs) => attrs,
            Err(e) => {
                eprintln!("qcowfs: warning: {e}; copied without its extended attributes");
                self.report.xattrs_unread += 1;
                Vec::new()
            }
        }
    }

    /// The file system walked.
    pub fn gfs(&self) -> &'a GuestFs {
        self.gfs
    }

    /// Clear the progress bar; what was done.
    pub fn finish(self) -> CopyReport {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        self.report
    }
}

fn new_bar(meta: &Meta) -> indicatif::ProgressBar {
    let style = |t: &str| {
        indicatif::ProgressStyle::with_template(t)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    };
    if meta.is_dir() {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(style("{spinner} {bytes} copied ({binary_bytes_per_sec})"));
        bar
    } else {
        let bar = indicatif::ProgressBar::new(meta.len);
        bar.set_style(style("{bar:40} {bytes}/{total_bytes} ({eta} left)"));
        bar
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::super::fuzzing::memory_fs;

    fn run(program: &str, args: &[&str]) {
        let out = Command::new(program).args(args).output().unwrap();
        assert!(out.status.success(), "{program} {args:?}: {out:?}");
    }

    /// A symlink whose inode claims 2 GiB (found by fuzzing: ext4-view allocated it whole)
    /// is refused by its length before any library reads it.
    #[test]
    fn a_symlink_claiming_gigabytes_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::os::unix::fs::symlink("target", src.join("link")).unwrap();
        let raw = dir.path().join("fs.raw");
        let (src_s, raw_s) = (src.to_str().unwrap(), raw.to_str().unwrap());
        run(
            "mke2fs",
            &["-q", "-F", "-t", "ext4", "-d", src_s, raw_s, "4M"],
        );
        run("debugfs", &["-w", "-R", "sif /link size 2147483648", raw_s]);
        let gfs = memory_fs(&std::fs::read(&raw).unwrap()).unwrap();
        let mut out = Vec::new();
        let e = super::super::tar::copy_out_tar(&gfs, "/".as_ref(), &mut out, false).unwrap_err();
        let message = e.to_string();
        assert!(
            message.contains("/link: a symbolic link of 2147483648 bytes"),
            "{message}"
        );
    }

    /// Without inode numbers (as when qcowfs cannot read the layout or it disagrees with
    /// ext4-view), a folder DAG still ends: at the file system's bytes of file data.
    #[test]
    fn a_folder_dag_without_inode_numbers_ends_at_the_file_systems_size() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("d0")).unwrap();
        std::fs::write(src.join("d0/data"), vec![7u8; 65536]).unwrap();
        for i in 1..=10 {
            std::fs::create_dir(src.join(format!("d{i}"))).unwrap();
        }
        let raw = dir.path().join("fs.raw");
        let (src_s, raw_s) = (src.to_str().unwrap(), raw.to_str().unwrap());
        run(
            "mke2fs",
            &["-q", "-F", "-t", "ext4", "-d", src_s, raw_s, "4M"],
        );
        for i in 1..=10 {
            for name in ["x", "y"] {
                let link = format!("link /d{} /d{i}/{name}", i - 1);
                run("debugfs", &["-w", "-R", &link, raw_s]);
            }
        }
        let gfs = memory_fs(&std::fs::read(&raw).unwrap())
            .unwrap()
            .without_layout();
        let mut out = Vec::new();
        let e =
            super::super::tar::copy_out_tar(&gfs, "/d10".as_ref(), &mut out, false).unwrap_err();
        let message = e.to_string();
        assert!(message.starts_with("<fuzz>: /d10/"), "{message}");
        assert!(
            message.contains("/data: the copy reaches more than 4194304 bytes of file data"),
            "{message}"
        );
        assert!(out.len() < 5 << 20, "{} bytes of tar", out.len());
    }
}
