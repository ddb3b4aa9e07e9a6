//! `qcowfs copy-out` to a host folder: where the copy goes (into an existing folder, like
//! `cp -r`, or to a new name), and the host side of the walk (walk.rs): everything made relative
//! to an open folder with `O_EXCL`, `mkdirat`, `symlinkat` and entered with `O_NOFOLLOW`, so a
//! guest symlink is data, made as a symlink and never followed on the host, and nothing that
//! exists is overwritten. Modes are kept less setuid/setgid, owners kept when run as root, atimes
//! and mtimes kept. A file's holes stay holes (skipped with a seek, the length set at the end),
//! and a file with several names is copied once, its other names hard links (`linkat` below the
//! same open folder). A file is written under a hidden temporary name and renamed into place
//! without replacing anything, so an interrupted copy never leaves a partial file under its
//! final name.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{IsTerminal, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use super::data::{GuestData, Range};
use super::error::GuestError;
use super::list::CHUNK;
use super::open::GuestFs;
use super::tree::{GuestPath, Meta, Time, Xattr};
use super::walk::{CopyReport, Sink, Walker};
use super::xattrs::{set_on_fd, set_on_link, Unkept};
use crate::error::{Error, Result};

/// Permission bits kept on the host: setuid and setgid are dropped (a copied-out root-owned
/// program must not become a setuid program on the host, whoever copied it).
pub(crate) const KEPT_MODE: u32 = 0o1777;

/// The entry guest `path` names, a final symlink followed only when the path ends in `/`:
/// its resolved path, metadata, and the name a copy of it takes (None for the root).
pub(crate) fn top_entry(gfs: &GuestFs, path: &OsStr) -> Result<(GuestPath, Meta, Option<Vec<u8>>)> {
    let bytes = path.as_bytes();
    let (p, meta) = gfs.resolve(bytes, bytes.ends_with(b"/"))?;
    // The name as typed (a symlink copied as itself keeps its own name), unless that is `.`
    // or `..`.
    let typed = bytes.split(|&b| b == b'/').rfind(|n| !n.is_empty());
    let name = match typed {
        Some(n) if n != b"." && n != b".." => Some(n.to_vec()),
        _ => p.last_name().map(<[u8]>::to_vec),
    };
    Ok((p, meta, name))
}

/// Copy guest `path` to `dest`: into it when it is an existing directory (as `cp -r`), else as
/// the new name `dest`. A path ending in `/` follows a final symlink (inside the guest); without
/// it, a symlink is copied as a symlink. `progress`: a bar on stderr when it is a terminal.
pub fn copy_out(gfs: &GuestFs, path: &OsStr, dest: &Path, progress: bool) -> Result<CopyReport> {
    let (p, meta, top_name) = top_entry(gfs, path)?;
    let (parent, name) = match std::fs::metadata(dest) {
        Ok(m) if m.is_dir() => {
            let Some(name) = top_name else {
                return Err(Error::new(dest, GuestError::RootHasNoName));
            };
            (dest.to_path_buf(), name)
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
            (parent, name.to_os_string().into_vec())
        }
        Err(e) => return Err(Error::new(dest, e)),
    };
    let dir = HostDir {
        fd: open_dir(&parent)?,
        path: parent,
    };
    let mut walker = Walker::new(gfs, &meta, progress && std::io::stderr().is_terminal());
    let mut sink = HostSink {
        top: &dir.fd,
        top_path: &dir.path,
        unkept: Unkept::default(),
        buf: Vec::new(),
    };
    let result = walker.entry(&mut sink, &dir, &name, &p, &meta, 0);
    let report = walker.finish();
    for note in sink.unkept.notes() {
        eprintln!(
            "qcowfs: warning: {}: {note}",
            crate::error::escaped(&dir.path.join(OsStr::from_bytes(&name)))
        );
    }
    result.map(|()| report)
}

fn exists(path: &Path) -> Error {
    Error::new(path, GuestError::Exists)
}

/// A host folder being filled: its descriptor and its path (for messages).
pub(crate) struct HostDir {
    fd: OwnedFd,
    path: PathBuf,
}

/// The host side of a copy: entries made in open folders, never through a path (a hard link
/// names its first copy by its path below `top`, the folder the copy goes into, all made by
/// this copy).
struct HostSink<'a> {
    top: &'a OwnedFd,
    top_path: &'a Path,
    /// Extended attributes and ACLs the host would not take.
    unkept: Unkept,
    /// File data on its way, a chunk at a time.
    buf: Vec<u8>,
}

impl HostSink<'_> {
    fn prepare(dir: &HostDir, name: &[u8]) -> (PathBuf, CString) {
        let host = dir.path.join(OsStr::from_bytes(name));
        // The walk refused names with NUL bytes.
        let cname = CString::new(name).unwrap_or_default();
        (host, cname)
    }
}

impl Sink for HostSink<'_> {
    type Dir = HostDir;

    fn symlink(
        &mut self,
        parent: &HostDir,
        name: &[u8],
        target: &[u8],
        meta: &Meta,
        attrs: &[Xattr],
    ) -> Result<()> {
        let (host, cname) = Self::prepare(parent, name);
        let ctarget = CString::new(target).unwrap_or_default();
        // SAFETY: both strings are valid C strings, parent.fd an open directory.
        check(
            unsafe { libc::symlinkat(ctarget.as_ptr(), parent.fd.as_raw_fd(), cname.as_ptr()) },
            &host,
        )?;
        set_owner_at(&parent.fd, &cname, meta, &host)?;
        set_on_link(&parent.fd, name, attrs, &mut self.unkept);
        set_times_at(&parent.fd, &cname, meta, &host)
    }

    fn dir(
        &mut self,
        parent: &HostDir,
        name: &[u8],
        _meta: &Meta,
        _attrs: &[Xattr],
    ) -> Result<HostDir> {
        let (host, cname) = Self::prepare(parent, name);
        // SAFETY: cname is a valid C string, parent.fd an open directory.
        check(
            unsafe { libc::mkdirat(parent.fd.as_raw_fd(), cname.as_ptr(), 0o700) },
            &host,
        )?;
        let fd = open_at(
            &parent.fd,
            &cname,
            libc::O_RDONLY | libc::O_DIRECTORY,
            &host,
        )?;
        Ok(HostDir { fd, path: host })
    }

    fn dir_done(&mut self, dir: HostDir, meta: &Meta, attrs: &[Xattr]) -> Result<()> {
        set_attributes(&dir.fd, meta, attrs, &dir.path, &mut self.unkept)
    }

    fn file(
        &mut self,
        parent: &HostDir,
        name: &[u8],
        data: &mut GuestData,
        ranges: &[Range],
        meta: &Meta,
        attrs: &[Xattr],
        progress: &mut dyn FnMut(u64),
    ) -> Result<Vec<u8>> {
        let (host, cname) = Self::prepare(parent, name);
        // Written under a temporary name and renamed into place (never over anything), so an
        // interrupted copy leaves no partial file under the final name.
        if exists_at(&parent.fd, &cname) {
            return Err(exists(&host));
        }
        let temp = temp_name(name);
        let fd = open_at(
            &parent.fd,
            &temp,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            &host,
        )?;
        let mut out = File::from(fd);
        // One buffer for the whole copy: a fresh 1 MiB for each of 60,000 files was an mmap,
        // page faults and an munmap each.
        self.buf.resize(CHUNK, 0);
        let written = fill(&mut out, data, ranges, &mut self.buf, progress, &host)
            .and_then(|()| set_attributes(&out, meta, attrs, &host, &mut self.unkept))
            .and_then(|()| publish(&parent.fd, &temp, &cname, &host));
        if written.is_err() {
            // SAFETY: parent.fd is open, temp a valid C string; the name this copy made.
            unsafe { libc::unlinkat(parent.fd.as_raw_fd(), temp.as_ptr(), 0) };
        }
        written?;
        let below_top = host.strip_prefix(self.top_path).unwrap_or(&host);
        Ok(below_top.as_os_str().as_bytes().to_vec())
    }

    fn link(&mut self, parent: &HostDir, name: &[u8], first: &[u8], _: &Meta) -> Result<()> {
        let (host, cname) = Self::prepare(parent, name);
        let cfirst = CString::new(first).unwrap_or_default();
        // SAFETY: both strings are valid C strings, both descriptors open folders; flags 0
        // never follow a symlink at `first`.
        check(
            unsafe {
                libc::linkat(
                    self.top.as_raw_fd(),
                    cfirst.as_ptr(),
                    parent.fd.as_raw_fd(),
                    cname.as_ptr(),
                    0,
                )
            },
            &host,
        )
    }
}

/// Write the file's data ranges into `out` (holes, and runs of zeros inside the data, left as
/// holes; its length set at the end), a chunk of `buf` at a time.
fn fill(
    out: &mut File,
    data: &mut GuestData,
    ranges: &[Range],
    buf: &mut [u8],
    progress: &mut dyn FnMut(u64),
    host: &Path,
) -> Result<()> {
    let io = |e| Error::new(host, e);
    let mut done = 0u64;
    for r in ranges {
        progress(r.offset - done);
        let mut at = r.offset;
        out.seek(SeekFrom::Start(at)).map_err(io)?;
        while at < r.offset + r.len {
            let n = (r.offset + r.len - at).min(buf.len() as u64) as usize;
            data.read_at(at, &mut buf[..n])?;
            if buf[..n].iter().all(|&b| b == 0) {
                out.seek(SeekFrom::Current(n as i64)).map_err(io)?;
            } else {
                out.write_all(&buf[..n]).map_err(io)?;
            }
            at += n as u64;
            progress(n as u64);
        }
        done = at;
    }
    progress(data.len() - done);
    out.set_len(data.len()).map_err(io)
}

/// The name a file is written under before it is renamed to `name`: hidden, marked as ours,
/// unique in this process (and short enough for any file system's 255 bytes).
fn temp_name(name: &[u8]) -> CString {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tag = format!(".qcowfs-part-{}-{n}", std::process::id());
    let mut temp = b".".to_vec();
    if name.len() + tag.len() < 250 {
        temp.extend_from_slice(name);
    }
    temp.extend_from_slice(tag.as_bytes());
    CString::new(temp).unwrap_or_default()
}

/// Whether `name` exists in `dir` (a symlink not followed).
fn exists_at(dir: &OwnedFd, name: &CString) -> bool {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: dir is open, name a valid C string, st room for one stat.
    unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        ) == 0
    }
}

/// Rename `temp` to `name` in `dir`, never over an existing `name` (RENAME_NOREPLACE; where
/// the file system has no such rename, a hard link then the temporary name's removal).
fn publish(dir: &OwnedFd, temp: &CString, name: &CString, host: &Path) -> Result<()> {
    let fd = dir.as_raw_fd();
    // SAFETY: fd is an open directory, both names valid C strings.
    let rc =
        unsafe { libc::renameat2(fd, temp.as_ptr(), fd, name.as_ptr(), libc::RENAME_NOREPLACE) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL) => {}
        Some(libc::EEXIST) => return Err(exists(host)),
        _ => return Err(Error::new(host, e)),
    }
    // SAFETY: as above; flags 0 never follow a symlink.
    check(
        unsafe { libc::linkat(fd, temp.as_ptr(), fd, name.as_ptr(), 0) },
        host,
    )?;
    // SAFETY: as above.
    unsafe { libc::unlinkat(fd, temp.as_ptr(), 0) };
    Ok(())
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

fn timespecs(meta: &Meta) -> [libc::timespec; 2] {
    let ts = |t: Time| libc::timespec {
        tv_sec: t.secs as libc::time_t,
        tv_nsec: libc::c_long::from(t.nanos.min(999_999_999) as i32),
    };
    [ts(meta.atime), ts(meta.mtime)]
}

/// Whether this process may give files away (root): then owners and groups are kept, as
/// `cp -a` keeps them; otherwise the copy is the caller's. The setuid and setgid bits are
/// dropped either way: a guest's setuid-root program must not become one on the host (the tar
/// stream keeps them, for whoever extracts it to decide).
fn as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The guest's owner (as root), extended attributes and ACLs, permission bits less
/// setuid/setgid, and atime/mtime on an open file or folder — in that order: a change of owner
/// clears `security.capability`, and a folder or file made read-only can still take attributes
/// before its mode goes on.
fn set_attributes(
    fd: &impl AsRawFd,
    meta: &Meta,
    attrs: &[Xattr],
    host: &Path,
    unkept: &mut Unkept,
) -> Result<()> {
    if as_root() {
        // SAFETY: fd is open.
        check(
            unsafe { libc::fchown(fd.as_raw_fd(), meta.uid, meta.gid) },
            host,
        )?;
    }
    set_on_fd(fd, attrs, unkept);
    let mode = meta.mode & KEPT_MODE;
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

/// The owner (as root) of the symlink `name` in `dir` itself (never of what it points to).
fn set_owner_at(dir: &OwnedFd, name: &CString, meta: &Meta, host: &Path) -> Result<()> {
    if !as_root() {
        return Ok(());
    }
    // SAFETY: dir is open, name a valid C string; the link itself is changed.
    check(
        unsafe {
            libc::fchownat(
                dir.as_raw_fd(),
                name.as_ptr(),
                meta.uid,
                meta.gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        },
        host,
    )
}

/// The atime and mtime of the symlink `name` in `dir` itself.
fn set_times_at(dir: &OwnedFd, name: &CString, meta: &Meta, host: &Path) -> Result<()> {
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
