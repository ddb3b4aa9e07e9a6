//! What is mounted at a folder, as the kernel's mount table says (`/proc/self/mountinfo`), and the
//! checks a folder passes before qcowfs mounts on it: not a dead FUSE mount, not a live qcowfs
//! mount, and empty unless `--nonempty` (as mount(8) users expect of FUSE tools such as sshfs).

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::registry::Record;
use crate::error::{Error, Problem, Result};

/// The topmost mount at a path (the one a lookup of the path reaches).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The device numbers (major, minor) of the mounted file system: unique among live mounts,
    /// and kept when the mount is moved, so it names one FUSE connection (and its daemon).
    pub dev: (u32, u32),
    /// "fuse", "fuse.qcowfs", "ext4", ...
    pub fstype: String,
    /// The mount source: for qcowfs the canonical image path.
    pub source: PathBuf,
}

impl MountEntry {
    pub fn is_fuse(&self) -> bool {
        self.fstype == "fuse" || self.fstype.starts_with("fuse.")
    }
}

/// The topmost mount whose mount point is exactly `path` (canonical), if any.
pub fn top_mount_at(path: &Path) -> io::Result<Option<MountEntry>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_top(&info, path))
}

/// Later lines of mountinfo are mounts made later: the last one at `path` is on top.
fn parse_top(info: &str, path: &Path) -> Option<MountEntry> {
    info.lines().rev().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fields: Vec<&str> = left.split(' ').collect();
        if unescape(fields.get(4)?) != path {
            return None;
        }
        let (major, minor) = fields.get(2)?.split_once(':')?;
        let mut right = right.split(' ');
        let fstype = right.next()?.to_string();
        let source = unescape(right.next().unwrap_or(""));
        Some(MountEntry {
            dev: (major.parse().ok()?, minor.parse().ok()?),
            fstype,
            source,
        })
    })
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

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
/// qcowfs daemon recorded itself for its device (root's mounts are plain "fuse").
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
    let refuse = |why: String| Err(Error::new(mountpoint, Problem::Usage(why)));
    let dead = |e: &io::Error| {
        refuse(format!(
            "a FUSE mount whose daemon has died is here ({e}): qcowfs umount it first"
        ))
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
            return refuse(format!(
                "{} is already mounted here: qcowfs umount it first",
                crate::error::escaped(&entry.source)
            ));
        }
    }
    let meta = match std::fs::metadata(mountpoint) {
        Ok(m) => m,
        Err(e) if is_dead_connection(&e) => return dead(&e),
        Err(e) => return Err(Error::new(mountpoint, e)),
    };
    if !meta.is_dir() {
        return refuse("the mountpoint is not a directory".into());
    }
    let mut entries = match std::fs::read_dir(mountpoint) {
        Ok(entries) => entries,
        Err(e) if is_dead_connection(&e) => return dead(&e),
        Err(e) => return Err(Error::new(mountpoint, e)),
    };
    if entries.next().is_some() && !nonempty {
        return refuse(
            "the folder is not empty (its files would be hidden while mounted): use an empty \
             folder, or --nonempty to mount over them"
                .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape("/mnt/a\\040b"), PathBuf::from("/mnt/a b"));
        assert_eq!(unescape("/plain"), PathBuf::from("/plain"));
    }

    #[test]
    fn the_last_mount_at_a_path_is_the_one_on_top() {
        let info = "\
22 1 8:1 / / rw - ext4 /dev/sda1 rw
46 22 0:41 / /tmp/m rw,nosuid - fuse /tmp/a.qcow2 rw,user_id=0
47 46 0:42 / /tmp/m rw,nosuid - fuse.qcowfs /tmp/b\\040c.qcow2 rw,user_id=0
48 22 0:43 / /tmp/other rw - tmpfs tmpfs rw
";
        let top = parse_top(info, Path::new("/tmp/m")).unwrap();
        assert_eq!(top.dev, (0, 42));
        assert_eq!(top.fstype, "fuse.qcowfs");
        assert_eq!(top.source, PathBuf::from("/tmp/b c.qcow2"));
        assert!(top.is_fuse());
        let tmpfs = parse_top(info, Path::new("/tmp/other")).unwrap();
        assert!(!tmpfs.is_fuse());
        assert_eq!(parse_top(info, Path::new("/tmp")), None);
    }
}
