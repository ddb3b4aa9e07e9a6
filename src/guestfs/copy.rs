//! `qcowfs copy-out`: a guest file, symlink or whole tree copied to the host, modes (less
//! setuid/setgid) and times kept. Everything is created relative to an open directory with
//! `O_EXCL`/`mkdirat`/`symlinkat` and entered with `O_NOFOLLOW`, so a guest symlink is data: it is
//! made as a symlink and never followed on the host, and nothing that exists is overwritten.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{IsTerminal, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use ext4_view::{Component, Metadata, PathBuf as GuestPath};

use super::list::{fill, CHUNK};
use super::{guest_path, shown, GuestError, GuestFs};
use crate::error::{Error, Result};

/// Deepest tree copied (a directory loop in a hostile image ends here, or at the inode count).
pub const MAX_DEPTH: usize = 256;

/// Permission bits kept on the host: setuid and setgid are dropped (a copied-out root-owned
/// program must not become a setuid program of whoever copied it).
const KEPT_MODE: u32 = 0o1777;

/// What a copy did.
#[derive(Debug, Default, Clone, Copy)]
pub struct CopyReport {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub skipped: u64,
}

/// Copy guest `path` to `dest`: into it when it is an existing directory (as `cp -r`), else as
/// the new name `dest`. A path ending in `/` follows a final symlink (inside the guest); without
/// it, a symlink is copied as a symlink. `progress`: a bar on stderr when it is a terminal.
pub fn copy_out(gfs: &GuestFs, path: &OsStr, dest: &Path, progress: bool) -> Result<CopyReport> {
    let p = guest_path(gfs.image(), path)?;
    let bytes = path.as_bytes();
    let fs = gfs.ext4();
    let meta = match bytes.ends_with(b"/") {
        true => fs.metadata(&p),
        false => fs.symlink_metadata(&p),
    }
    .map_err(|e| gfs.error(bytes, e))?;
    let guest_name = p.components().filter_map(|c| match c {
        Component::Normal(n) => Some(n.as_ref().to_vec()),
        _ => None,
    });
    let guest_name = guest_name.last();
    let (parent, name) = match std::fs::metadata(dest) {
        Ok(m) if m.is_dir() => {
            let Some(name) = guest_name else {
                return Err(Error::new(dest, GuestError::RootHasNoName));
            };
            (dest.to_path_buf(), std::ffi::OsString::from_vec(name))
        }
        Ok(_) => return Err(exists(dest)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let Some(name) = dest.file_name() else {
                return Err(Error::new(dest, GuestError::NotAName));
            };
            let parent = match dest.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            (parent, name.to_os_string())
        }
        Err(e) => return Err(Error::new(dest, e)),
    };
    let dir = open_dir(&parent)?;
    let bar = progress && std::io::stderr().is_terminal();
    let mut copier = Copier {
        gfs,
        report: CopyReport::default(),
        bar: bar.then(|| new_bar(&meta)),
        dirs_left: gfs.inode_count().max(1),
    };
    let name = name.into_vec();
    let result = copier.entry(&dir, &parent, &name, &p, &meta, 0);
    if let Some(bar) = &copier.bar {
        bar.finish_and_clear();
    }
    result.map(|()| copier.report)
}

fn new_bar(meta: &Metadata) -> indicatif::ProgressBar {
    let style = |t: &str| {
        indicatif::ProgressStyle::with_template(t)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
    };
    if meta.is_dir() {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(style(
            "{spinner} {bytes} copied ({binary_bytes_per_sec}) {msg}",
        ));
        bar
    } else {
        let bar = indicatif::ProgressBar::new(meta.len());
        bar.set_style(style("{bar:40} {bytes}/{total_bytes} ({eta} left)"));
        bar
    }
}

fn exists(path: &Path) -> Error {
    Error::new(path, GuestError::Exists)
}

struct Copier<'a> {
    gfs: &'a GuestFs,
    report: CopyReport,
    bar: Option<indicatif::ProgressBar>,
    /// Directories that may still be entered: no sound file system has more than its inodes.
    dirs_left: u64,
}

impl Copier<'_> {
    /// Copy guest `path` (its metadata `meta`, not following a final symlink) to `name` in `dir`
    /// (the host folder `host_dir`).
    fn entry(
        &mut self,
        dir: &OwnedFd,
        host_dir: &Path,
        name: &[u8],
        path: &GuestPath,
        meta: &Metadata,
        depth: usize,
    ) -> Result<()> {
        let gfs = self.gfs;
        if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
            return Err(gfs.guest_error(GuestError::UnsafeName(shown(path.as_ref()))));
        }
        let host = host_dir.join(OsStr::from_bytes(name));
        let cname = CString::new(name)
            .map_err(|_| gfs.guest_error(GuestError::UnsafeName(shown(path.as_ref()))))?;
        if meta.is_symlink() {
            let target = gfs
                .ext4()
                .read_link(path)
                .map_err(|e| gfs.error(path.as_ref(), e))?;
            let ctarget = CString::new(target.as_ref())
                .map_err(|_| gfs.guest_error(GuestError::UnsafeName(shown(path.as_ref()))))?;
            // SAFETY: both strings are valid C strings, dir an open directory.
            check(
                unsafe { libc::symlinkat(ctarget.as_ptr(), dir.as_raw_fd(), cname.as_ptr()) },
                &host,
            )?;
            set_times_at(dir, &cname, meta, &host)?;
            self.report.symlinks += 1;
        } else if meta.is_dir() {
            if depth >= MAX_DEPTH || self.dirs_left == 0 {
                return Err(gfs.guest_error(GuestError::TooDeep(shown(path.as_ref()))));
            }
            self.dirs_left -= 1;
            // SAFETY: cname is a valid C string, dir an open directory.
            check(
                unsafe { libc::mkdirat(dir.as_raw_fd(), cname.as_ptr(), 0o700) },
                &host,
            )?;
            let sub = open_at(dir, &cname, libc::O_RDONLY | libc::O_DIRECTORY, &host)?;
            self.report.dirs += 1;
            let entries = gfs
                .ext4()
                .read_dir(path)
                .map_err(|e| gfs.error(path.as_ref(), e))?;
            for entry in entries {
                let entry = entry.map_err(|e| gfs.error(path.as_ref(), e))?;
                let child_name = entry.file_name().as_ref().to_vec();
                if child_name == b"." || child_name == b".." {
                    continue;
                }
                let child = entry.path();
                let child_meta = entry.metadata().map_err(|e| gfs.error(child.as_ref(), e))?;
                self.entry(&sub, &host, &child_name, &child, &child_meta, depth + 1)?;
            }
            // Last, so a read-only guest folder could still be filled.
            set_mode_and_times(&sub, meta, &host)?;
        } else if meta.file_type().is_regular_file() {
            let fd = open_at(
                dir,
                &cname,
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                &host,
            )?;
            let mut out = File::from(fd);
            self.file(&mut out, path, &host)?;
            set_mode_and_times(&out, meta, &host)?;
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

    /// The bytes of guest file `path` into `out`; runs of zeros become holes.
    fn file(&mut self, out: &mut File, path: &GuestPath, host: &Path) -> Result<()> {
        let gfs = self.gfs;
        let mut file = gfs
            .ext4()
            .open(path)
            .map_err(|e| gfs.error(path.as_ref(), e))?;
        let mut buf = vec![0u8; CHUNK];
        let mut at = 0u64;
        loop {
            let n = fill(&mut file, &mut buf).map_err(|e| gfs.error(path.as_ref(), e))?;
            if n == 0 {
                break;
            }
            if buf[..n].iter().all(|&b| b == 0) {
                out.seek(SeekFrom::Current(n as i64))
                    .map_err(|e| Error::new(host, e))?;
            } else {
                out.write_all(&buf[..n]).map_err(|e| Error::new(host, e))?;
            }
            at += n as u64;
            self.report.bytes += n as u64;
            if let Some(bar) = &self.bar {
                bar.inc(n as u64);
            }
        }
        // A file that ends in a hole gets its length.
        out.set_len(at).map_err(|e| Error::new(host, e))
    }
}

/// `rc` of a libc call as a result naming `host`.
fn check(rc: libc::c_int, host: &Path) -> Result<()> {
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        return Err(exists(host));
    }
    Err(Error::new(host, e))
}

/// Open the host folder `path` (the destination's parent: the user's own path, links followed).
fn open_dir(path: &Path) -> Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::new(path, std::io::Error::from_raw_os_error(libc::EINVAL)))?;
    // SAFETY: c is a valid C string; the fd returned is owned below.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(Error::new(path, std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `openat(dir, name, flags | O_NOFOLLOW | O_CLOEXEC, 0600)`.
fn open_at(dir: &OwnedFd, name: &CString, flags: libc::c_int, host: &Path) -> Result<OwnedFd> {
    let flags = flags | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: name is a valid C string, dir an open directory; the fd is owned below.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, 0o600 as libc::c_uint) };
    if fd < 0 {
        check(-1, host)?;
    }
    // SAFETY: fd is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn timespecs(meta: &Metadata) -> [libc::timespec; 2] {
    let ts = |t: ext4_view::Timestamp| libc::timespec {
        tv_sec: t.seconds() as libc::time_t,
        tv_nsec: libc::c_long::from(t.nanoseconds() as i32),
    };
    [ts(meta.accessed()), ts(meta.modified())]
}

/// The guest's permission bits (less setuid/setgid) and atime/mtime on an open file or folder.
fn set_mode_and_times(fd: &impl AsRawFd, meta: &Metadata, host: &Path) -> Result<()> {
    let mode = u32::from(meta.mode()) & KEPT_MODE;
    // SAFETY: fd is open.
    check(
        unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) },
        host,
    )?;
    let times = timespecs(meta);
    // SAFETY: fd is open, times points to two timespecs.
    check(
        unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) },
        host,
    )
}

/// atime/mtime of the symlink `name` in `dir` itself (never of what it points to).
fn set_times_at(dir: &OwnedFd, name: &CString, meta: &Metadata, host: &Path) -> Result<()> {
    let times = timespecs(meta);
    // SAFETY: dir is open, name a valid C string, times two timespecs.
    check(
        unsafe {
            libc::utimensat(
                dir.as_raw_fd(),
                name.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        },
        host,
    )
}
