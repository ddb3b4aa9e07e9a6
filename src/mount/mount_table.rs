//! What is mounted at a folder, as the kernel's mount table says (`/proc/self/mountinfo`).

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

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
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// Mounted read-only (the mount's own options).
    pub read_only: bool,
    /// FUSE's `user_id=`: the user who mounted it.
    pub user_id: Option<u32>,
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

/// Every mount of this mount namespace, in mount order.
pub fn all_mounts() -> io::Result<Vec<MountEntry>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info.lines().filter_map(parse_line).collect())
}

/// Later lines of mountinfo are mounts made later: the last one at `path` is on top.
fn parse_top(info: &str, path: &Path) -> Option<MountEntry> {
    info.lines()
        .rev()
        .filter_map(parse_line)
        .find(|e| e.mountpoint == path)
}

/// `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS`.
fn parse_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let fields: Vec<&str> = left.split(' ').collect();
    let mountpoint = unescape(fields.get(4)?);
    let read_only = fields.get(5)?.split(',').any(|o| o == "ro");
    let (major, minor) = fields.get(2)?.split_once(':')?;
    let mut right = right.split(' ');
    let fstype = right.next()?.to_string();
    let source = unescape(right.next().unwrap_or(""));
    let user_id = right
        .next()
        .unwrap_or("")
        .split(',')
        .find_map(|o| o.strip_prefix("user_id=")?.parse().ok());
    Some(MountEntry {
        dev: (major.parse().ok()?, minor.parse().ok()?),
        fstype,
        source,
        mountpoint,
        read_only,
        user_id,
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
        assert_eq!(top.user_id, Some(0));
        assert!(!top.read_only);
        assert!(top.is_fuse());
        let tmpfs = parse_top(info, Path::new("/tmp/other")).unwrap();
        assert!(!tmpfs.is_fuse());
        assert_eq!(parse_top(info, Path::new("/tmp")), None);
    }
}
