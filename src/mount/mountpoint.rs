//! The checks a folder passes before qcowfs mounts on it: not a dead FUSE mount, not a live qcowfs
//! mount, and empty unless `--nonempty` (as mount(8) users expect of FUSE tools such as sshfs).
//! What is mounted where is read in `mount_table`.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::mount_table::{top_mount_at, MountEntry};
use super::registry::Record;
use crate::error::{Error, Problem, Result, Role};

/// Whether an error is what the kernel answers on a FUSE mount whose daemon is gone.
pub fn is_dead_connection(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTCONN) | Some(libc::ECONNABORTED)
    )
}

/// The canonical form of `path`, also when `path` itself is a dead FUSE mount (its folder is
/// canonicalized and the last name kept).
pub fn canonical(path: &Path) -> Result<PathBuf> {
    match std::fs::canonicalize(path) {
        Ok(c) => Ok(c),
        Err(e) if is_dead_connection(&e) => {
            let parent = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            let name = path.file_name().ok_or_else(|| Error::new(path, e))?;
            let parent = std::fs::canonicalize(parent).map_err(|e| Error::new(path, e))?;
            Ok(parent.join(name))
        }
        Err(e) => Err(Error::new(path, e)),
    }
}

/// Whether the FUSE mount `entry` is one of qcowfs: its type says so (non-root mounts), or a
/// qcowfs daemon recorded itself for its device (mounts made as root by older versions are plain "fuse").
pub fn is_qcowfs(canon: &Path, entry: &MountEntry) -> bool {
    entry.is_fuse()
        && (entry.fstype == "fuse.qcowfs" || Record::for_mount(canon, Some(entry)).was_recorded())
}

/// Ask the daemon of the FUSE mount at `canon` for the root's attributes (statx with
/// AT_STATX_FORCE_SYNC): cached attributes would let a plain stat succeed on a mount whose daemon
/// is gone. Used only where no live daemon is known, so a daemon that is alive answers it.
pub fn probe(canon: &Path) -> io::Result<()> {
    let c = std::ffi::CString::new(canon.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: statx is plain data, written by the kernel.
    let mut buf: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a statx buffer that outlives the call.
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_STATX_FORCE_SYNC,
            libc::STATX_TYPE,
            &mut buf,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Refuse a folder qcowfs must not mount on, in one line naming it: a dead FUSE mount, a live
/// qcowfs mount (stacking a second one would hide the first, and `umount` could not tell their
/// daemons apart by the folder), or a folder with files in it unless `nonempty`.
pub fn check_before_mount(mountpoint: &Path, nonempty: bool) -> Result<()> {
    check_mountpoint(mountpoint, nonempty).map_err(|e| e.as_role(Role::Mountpoint))
}

fn check_mountpoint(mountpoint: &Path, nonempty: bool) -> Result<()> {
    let refuse = |problem: Problem| Err(Error::new(mountpoint, problem));
    let dead = |e: &io::Error| {
        refuse(Problem::Busy(format!(
            "a FUSE mount whose daemon has died is here ({}): qcowfs umount it first",
            crate::error::io_text(e)
        )))
    };
    let canon = canonical(mountpoint)?;
    let entry = top_mount_at(&canon).map_err(|e| Error::new("/proc/self/mountinfo", e))?;
    if let Some(entry) = entry.filter(MountEntry::is_fuse) {
        if Record::for_mount(&canon, Some(&entry)).read_pid().is_none() {
            if let Err(e) = probe(&canon) {
                if is_dead_connection(&e) {
                    return dead(&e);
                }
            }
        }
        if is_qcowfs(&canon, &entry) {
            return refuse(Problem::Busy(format!(
                "{} is already mounted here: qcowfs umount it first",
                crate::error::escaped(&entry.source)
            )));
        }
    }
    let meta = match std::fs::metadata(mountpoint) {
        Ok(m) => m,
        Err(e) if is_dead_connection(&e) => return dead(&e),
        Err(e) => return Err(Error::new(mountpoint, e)),
    };
    if !meta.is_dir() {
        return refuse(Problem::Usage(
            "not a folder (a mountpoint is an empty folder)".into(),
        ));
    }
    let mut entries = match std::fs::read_dir(mountpoint) {
        Ok(entries) => entries,
        Err(e) if is_dead_connection(&e) => return dead(&e),
        Err(e) => return Err(Error::new(mountpoint, e)),
    };
    if entries.next().is_some() && !nonempty {
        return refuse(Problem::Usage(
            "the folder is not empty (its files would be hidden while mounted): use an empty \
             folder, or --nonempty to mount over them"
                .into(),
        ));
    }
    Ok(())
}
