//! Where a running daemon records itself and, when it ends, how its final flush went, keyed by the
//! device numbers of its FUSE mount (unique among live mounts, and kept when a mount is moved or
//! another is stacked over its folder), else by the canonical mountpoint. The daemon holds an exclusive flock on its record for its whole life and
//! releases it only after the image is closed, so `qcowfs umount` knows the daemon is done (and the
//! image's QEMU locks are gone) when it can take that lock, whatever happened to pids.
//!
//! The host is hostile too: `/tmp` is shared, so the records live only in a directory that is
//! verified (not assumed) to be ours with mode 0700, every file is opened relative to that
//! directory with O_NOFOLLOW (a planted symlink is never followed), new files are created mode 0600,
//! and `umount` waits only on a process that is a qcowfs daemon of ours.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::mount_table::{top_mount_at, MountEntry};

/// The per-user runtime folder for qcowfs records: `/run/qcowfs` for root, else
/// `$XDG_RUNTIME_DIR/qcowfs`, else `/run/user/UID/qcowfs`, else `/tmp/qcowfs-UID`.
pub(super) fn runtime_dir() -> PathBuf {
    let uid = euid();
    if uid == 0 {
        return PathBuf::from("/run/qcowfs");
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("qcowfs");
    }
    let run_user = PathBuf::from(format!("/run/user/{uid}"));
    if std::fs::metadata(&run_user).is_ok_and(|m| m.uid() == uid && m.mode() & 0o077 == 0) {
        return run_user.join("qcowfs");
    }
    std::env::temp_dir().join(format!("qcowfs-{uid}"))
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

fn cstring(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The runtime folder, opened and verified: a real directory (not a symlink), owned by us, mode
/// 0700 (nobody else can plant, rename or remove anything in it).
struct RuntimeDir {
    fd: OwnedFd,
}

impl RuntimeDir {
    /// Open the folder, creating it (mode 0700) when `create`.
    fn open(dir: &Path, create: bool) -> io::Result<RuntimeDir> {
        let c = cstring(dir)?;
        if create {
            // SAFETY: a valid C string and mode.
            if unsafe { libc::mkdir(c.as_ptr(), 0o700) } != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EEXIST) {
                    return Err(e);
                }
            }
        }
        // SAFETY: a valid C string and flags; the descriptor is owned below.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just opened and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let meta = File::from(fd.try_clone()?).metadata()?;
        if meta.uid() == euid() && meta.mode() & 0o077 != 0 && create {
            // Ours but open to others (made by an older qcowfs, or by hand): close it. Whatever
            // others may have put in it is never followed (O_NOFOLLOW) nor reused (O_EXCL).
            // SAFETY: fchmod of a descriptor we own.
            if unsafe { libc::fchmod(fd.as_raw_fd(), 0o700) } != 0 {
                return Err(io::Error::last_os_error());
            }
            return Ok(RuntimeDir { fd });
        }
        if meta.uid() != euid() || meta.mode() & 0o077 != 0 {
            return Err(io::Error::other(format!(
                "{} is not a private folder of this user (owner uid {}, mode {:04o}); records go only \
                 in a folder owned by uid {} with mode 0700: remove it, or set XDG_RUNTIME_DIR",
                dir.display(),
                meta.uid(),
                meta.mode() & 0o7777,
                euid()
            )));
        }
        Ok(RuntimeDir { fd })
    }

    /// `openat(dir, name, flags | O_NOFOLLOW | O_CLOEXEC, 0600)`.
    fn open_file(&self, name: &str, flags: i32) -> io::Result<File> {
        let c = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a valid directory descriptor, C string, flags and mode.
        let fd = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just opened and is owned by nobody else.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    fn remove(&self, name: &str) {
        if let Ok(c) = CString::new(name) {
            // SAFETY: a valid directory descriptor and C string.
            unsafe { libc::unlinkat(self.fd.as_raw_fd(), c.as_ptr(), 0) };
        }
    }

    /// `renameat` within the folder (replacing `to`).
    fn rename(&self, from: &str, to: &str) {
        let (Ok(from), Ok(to)) = (CString::new(from), CString::new(to)) else {
            return;
        };
        let fd = self.fd.as_raw_fd();
        // SAFETY: a valid directory descriptor and C strings.
        unsafe { libc::renameat(fd, from.as_ptr(), fd, to.as_ptr()) };
    }

    fn read(&self, name: &str) -> Option<String> {
        let mut file = self
            .open_file(name, libc::O_RDONLY | libc::O_NONBLOCK)
            .ok()?;
        if !file.metadata().ok()?.is_file() {
            return None;
        }
        let mut text = String::new();
        // A record is a few lines: read no more than a page of whatever is there.
        Read::by_ref(&mut file)
            .take(4096)
            .read_to_string(&mut text)
            .ok()?;
        Some(text)
    }
}

fn flock(file: &File, how: i32) -> io::Result<()> {
    // SAFETY: a valid descriptor and a plain flag argument.
    if unsafe { libc::flock(file.as_raw_fd(), how) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn key(mountpoint: &Path) -> String {
    // FNV-1a: a short stable name for any path.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in mountpoint.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Whether `pid` is a live qcowfs process of ours: named `qcowfs` (or the mount(8) helper), run by
/// this user (any user's when we are root), not a zombie. A stale record's pid may belong to
/// anything by now. Told from /proc/PID/status, which stays readable although the daemon is not
/// dumpable (its `exe` link is not).
pub fn is_our_daemon(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or("")
    };
    let named = matches!(field("Name:"), "qcowfs" | "mount.fuse.qcow");
    let real_uid: Option<u32> = field("Uid:")
        .split_whitespace()
        .next()
        .and_then(|u| u.parse().ok());
    let owner_ok = euid() == 0 || real_uid == Some(euid());
    let alive = !field("State:").starts_with('Z');
    named && owner_ok && alive
}

/// The files recording one mount: `NAME.pid` and `NAME.status` in the runtime folder. NAME is
/// `dev-MAJOR-MINOR-PID` (the FUSE mount's device and the daemon's pid; a hash of the folder in
/// place of the device when there is no mount entry): a folder can hold two mounts (one stacked
/// over the other) and a mount can move to another folder, and `umount` must wait for the daemon
/// of the mount it detaches, not for another recorded at the same folder.
#[derive(Debug, Clone)]
pub struct Record {
    dir: PathBuf,
    name: String,
    /// The image the mount serves (its mountinfo source): a record whose device numbers were
    /// reused by a later, foreign FUSE mount does not describe it.
    source: Option<PathBuf>,
    pub pid_file: PathBuf,
}

impl Record {
    /// The record this daemon writes for the mount on top at `mountpoint` (canonical) now. Its
    /// name ends in the daemon's pid: the kernel hands a freed device number to the next FUSE
    /// mount at once, while the daemon of the unmounted one may still be writing its last data
    /// under its own record.
    pub fn for_mountpoint(mountpoint: &Path) -> Record {
        let entry = top_mount_at(mountpoint).ok().flatten();
        let entry = entry.as_ref().filter(|e| e.is_fuse());
        let mut record = Self::in_dir(runtime_dir(), mountpoint, entry);
        record.name = format!("{}-{}", record.name, std::process::id());
        record.pid_file = record.dir.join(record.pid_name());
        record
    }

    /// The record of the FUSE mount `entry` at `mountpoint` (without one, the folder's): of the
    /// records of its device, the newest. A device number is reused only once the mount that
    /// had it is gone, so the newest record is the daemon of the mount there now.
    pub fn for_mount(mountpoint: &Path, entry: Option<&MountEntry>) -> Record {
        let mut record = Self::in_dir(runtime_dir(), mountpoint, entry.filter(|e| e.is_fuse()));
        let prefix = format!("{}-", record.name);
        if let Some(name) = newest_with_prefix(&record.dir, &prefix, record.source.as_deref()) {
            record.name = name;
            record.pid_file = record.dir.join(record.pid_name());
        }
        record
    }

    fn in_dir(dir: PathBuf, mountpoint: &Path, entry: Option<&MountEntry>) -> Record {
        let name = match entry {
            Some(e) => format!("dev-{}-{}", e.dev.0, e.dev.1),
            None => key(mountpoint),
        };
        Record {
            pid_file: dir.join(format!("{name}.pid")),
            dir,
            name,
            source: entry.map(|e| e.source.clone()),
        }
    }

    fn pid_name(&self) -> String {
        format!("{}.pid", self.name)
    }

    fn status_name(&self) -> String {
        format!("{}.status", self.name)
    }

    fn dirty_name(&self) -> String {
        format!("{}.dirty", self.name)
    }

    /// Publish the bytes written to the mount but not yet stored in the image (`NAME.dirty`, for
    /// `qcowfs list`): written beside and renamed over, so a reader sees a whole number.
    pub fn write_dirty(&self, bytes: u64) {
        let Ok(dir) = RuntimeDir::open(&self.dir, false) else {
            return;
        };
        let tmp = format!("{}.tmp", self.dirty_name());
        dir.remove(&tmp);
        let Ok(mut file) = dir.open_file(&tmp, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL)
        else {
            return;
        };
        if file.write_all(format!("{bytes}\n").as_bytes()).is_ok() {
            dir.rename(&tmp, &self.dirty_name());
        } else {
            dir.remove(&tmp);
        }
    }

    /// Write the record and hold its lock; the lock is released when the returned file is dropped.
    /// A record another live daemon holds is left alone (its lock is tried before anything is
    /// changed); a stale one is replaced by a new file.
    pub fn write_pid(&self, pid: u32, mountpoint: &Path) -> io::Result<File> {
        if let Some(parent) = self.dir.parent() {
            if euid() == 0 {
                std::fs::create_dir_all(parent)?;
            }
        }
        let dir = RuntimeDir::open(&self.dir, true)?;
        if let Ok(old) = dir.open_file(&self.pid_name(), libc::O_RDONLY | libc::O_NONBLOCK) {
            if flock(&old, libc::LOCK_EX | libc::LOCK_NB).is_err() {
                return Err(io::Error::other(format!(
                    "{} is held by another daemon",
                    self.pid_file.display()
                )));
            }
        }
        dir.remove(&self.pid_name());
        dir.remove(&self.status_name());
        dir.remove(&self.dirty_name());
        let mut file = dir.open_file(
            &self.pid_name(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
        )?;
        flock(&file, libc::LOCK_EX | libc::LOCK_NB)?;
        write!(file, "{pid}\n{}\n", mountpoint.display())?;
        if let Some(source) = &self.source {
            file.write_all(source.as_os_str().as_bytes())?;
            file.write_all(b"\n")?;
        }
        Ok(file)
    }

    /// Wait (up to `limit`) until the daemon `pid` no longer holds the record's lock. True when it
    /// is free; a record whose pid is not a live daemon of ours is never waited for.
    pub fn wait_unlocked(&self, pid: u32, limit: Duration) -> bool {
        let Ok(dir) = RuntimeDir::open(&self.dir, false) else {
            return true;
        };
        let Ok(file) = dir.open_file(&self.pid_name(), libc::O_RDONLY | libc::O_NONBLOCK) else {
            return true;
        };
        let start = Instant::now();
        loop {
            if flock(&file, libc::LOCK_SH | libc::LOCK_NB).is_ok() || !is_our_daemon(pid) {
                return true;
            }
            if start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The pid the record in `dir` names (its first line), whoever it is now.
    fn recorded_pid(&self, dir: &RuntimeDir) -> Option<u32> {
        dir.read(&self.pid_name())?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// The recorded daemon, if the record is in our private folder and names a live daemon of ours.
    pub fn read_pid(&self) -> Option<u32> {
        let dir = RuntimeDir::open(&self.dir, false).ok()?;
        self.recorded_pid(&dir).filter(|&pid| is_our_daemon(pid))
    }

    /// Whether a qcowfs daemon recorded itself for this mount (alive or not): the record exists
    /// and names the same image.
    pub fn was_recorded(&self) -> bool {
        let Ok(dir) = RuntimeDir::open(&self.dir, false) else {
            return false;
        };
        let Some(text) = dir.read(&self.pid_name()) else {
            return false;
        };
        match (&self.source, text.lines().nth(2)) {
            (Some(source), Some(recorded)) => source.as_os_str().as_bytes() == recorded.as_bytes(),
            (Some(_), None) => false,
            (None, _) => true,
        }
    }

    /// The record of a daemon that died without cleaning up: remove it, unless a daemon holds it.
    pub fn forget(&self) {
        let Ok(dir) = RuntimeDir::open(&self.dir, false) else {
            return;
        };
        let Ok(file) = dir.open_file(&self.pid_name(), libc::O_RDONLY | libc::O_NONBLOCK) else {
            return;
        };
        if flock(&file, libc::LOCK_EX | libc::LOCK_NB).is_err() {
            return;
        }
        // A new daemon of the same device may have replaced the file since it was opened: only
        // the file we hold goes.
        let still_ours = dir
            .open_file(&self.pid_name(), libc::O_RDONLY | libc::O_NONBLOCK)
            .and_then(|now| Ok((now.metadata()?, file.metadata()?)))
            .is_ok_and(|(now, held)| now.ino() == held.ino() && now.dev() == held.dev());
        if still_ours {
            dir.remove(&self.pid_name());
            dir.remove(&self.status_name());
            dir.remove(&self.dirty_name());
        }
    }

    /// The daemon's last words: empty when everything was written, else the error. The pid file goes
    /// only if it is still this process's: a newer mount of the same mountpoint may have replaced it.
    pub fn write_status(&self, status: &str) {
        let Ok(dir) = RuntimeDir::open(&self.dir, false) else {
            return;
        };
        if let Ok(mut file) = dir.open_file(
            &self.status_name(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC,
        ) {
            let _ = file.write_all(status.as_bytes());
        }
        if self.recorded_pid(&dir) == Some(std::process::id()) {
            dir.remove(&self.dirty_name());
            dir.remove(&self.pid_name());
        }
    }

    pub fn take_status(&self) -> Option<String> {
        let dir = RuntimeDir::open(&self.dir, false).ok()?;
        let status = dir.read(&self.status_name())?;
        dir.remove(&self.status_name());
        Some(status)
    }
}

/// One record of the runtime folder, as `qcowfs list` reads it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The FUSE mount's device numbers (none for a record named by the folder's hash).
    pub dev: Option<(u32, u32)>,
    pub pid: u32,
    pub mountpoint: PathBuf,
    /// The image (the mount's source), when recorded.
    pub source: Option<PathBuf>,
    /// Whether `pid` is a live qcowfs daemon of ours holding the record's lock (a stale record's
    /// pid may name a newer daemon by now).
    pub alive: bool,
    /// The daemon's last published dirty bytes.
    pub dirty: Option<u64>,
    pub modified: std::time::SystemTime,
}

/// Every record in this user's runtime folder (none when the folder is missing or not private).
pub fn recorded() -> Vec<Recorded> {
    let path = runtime_dir();
    let Ok(dir) = RuntimeDir::open(&path, false) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(&path) else {
        return Vec::new();
    };
    let held = flocks_held();
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(name) = file.to_str().and_then(|n| n.strip_suffix(".pid")) else {
            continue;
        };
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        let Some(text) = dir.read(&format!("{name}.pid")) else {
            continue;
        };
        let mut lines = text.lines();
        let Some(pid) = lines.next().and_then(|p| p.trim().parse::<u32>().ok()) else {
            continue;
        };
        let Some(mountpoint) = lines.next().map(PathBuf::from) else {
            continue;
        };
        let source = lines.next().map(PathBuf::from);
        let dev = name.strip_prefix("dev-").and_then(|rest| {
            let mut parts = rest.split('-');
            Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
        });
        let dirty = dir
            .read(&format!("{name}.dirty"))
            .and_then(|t| t.trim().parse().ok());
        out.push(Recorded {
            dev,
            pid,
            mountpoint,
            source,
            alive: is_our_daemon(pid)
                && held.as_ref().is_none_or(|h| h.contains(&(pid, meta.ino()))),
            dirty,
            modified: meta.modified().unwrap_or(std::time::UNIX_EPOCH),
        });
    }
    out
}

/// The (pid, inode) of every flock held on this host, from /proc/locks (None when unreadable):
/// whether a daemon holds its record is read there, without taking the lock.
fn flocks_held() -> Option<std::collections::HashSet<(u32, u64)>> {
    let text = std::fs::read_to_string("/proc/locks").ok()?;
    Some(parse_flocks(&text))
}

/// `1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF`; blocked requests (`->`) hold nothing.
fn parse_flocks(text: &str) -> std::collections::HashSet<(u32, u64)> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(1) != Some(&"FLOCK") {
                return None;
            }
            let pid = fields.get(4)?.parse().ok()?;
            let inode = fields.get(5)?.rsplit(':').next()?.parse().ok()?;
            Some((pid, inode))
        })
        .collect()
}

/// The record name (without `.pid`) starting with `prefix` then a pid whose pid file changed
/// last, in the runtime folder `dir`; with `source`, only records of a mount of that image count
/// (the daemon of an earlier mount that had the device may still be writing another image, and
/// the same image cannot be mounted twice at once: QEMU's locks refuse it).
fn newest_with_prefix(dir: &Path, prefix: &str, source: Option<&Path>) -> Option<String> {
    let runtime = RuntimeDir::open(dir, false).ok()?;
    drop(runtime); // opened only to refuse a folder that is not private
    let mut newest: Option<(std::time::SystemTime, String)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let file = entry.file_name();
        let Some(name) = file.to_str().and_then(|n| n.strip_suffix(".pid")) else {
            continue;
        };
        let Some(pid) = name.strip_prefix(prefix) else {
            continue;
        };
        if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let Ok(modified) = entry.metadata().and_then(|m| m.modified()) else {
            continue;
        };
        if let Some(source) = source {
            let text = std::fs::read(entry.path()).unwrap_or_default();
            let recorded = text.split(|&b| b == b'\n').nth(2).unwrap_or_default();
            if recorded != source.as_os_str().as_bytes() {
                continue;
            }
        }
        if newest.as_ref().is_none_or(|(at, _)| modified > *at) {
            newest = Some((modified, name.to_string()));
        }
    }
    newest.map(|(_, name)| name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn records_are_files_of_mode_0600_in_a_folder_of_mode_0700() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("qcowfs");
        let record = Record::in_dir(dir.clone(), Path::new("/mnt/x"), None);
        let _held = record
            .write_pid(std::process::id(), Path::new("/mnt/x"))
            .unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        assert_eq!(
            std::fs::metadata(&record.pid_file).unwrap().mode() & 0o777,
            0o600
        );
        record.write_status("all written");
        let status = dir.join(record.status_name());
        assert_eq!(std::fs::metadata(&status).unwrap().mode() & 0o777, 0o600);
        assert_eq!(record.take_status().as_deref(), Some("all written"));
    }

    #[test]
    fn held_flocks_are_read_from_proc_locks_and_waiting_ones_are_not() {
        let text = "\
1: FLOCK  ADVISORY  WRITE 1234 00:1a:5678 0 EOF
1: -> FLOCK  ADVISORY  WRITE 999 00:1a:5678 0 EOF
2: OFDLCK ADVISORY  READ -1 fe:00:10053897 203 203
3: POSIX  ADVISORY  WRITE 77 fe:00:42 0 EOF
";
        let held = parse_flocks(text);
        assert_eq!(held.len(), 1, "{held:?}");
        assert!(held.contains(&(1234, 5678)));
    }

    #[test]
    fn dirty_bytes_are_replaced_whole_and_go_with_the_record() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("qcowfs");
        let mut record = Record::in_dir(dir.clone(), Path::new("/mnt/x"), None);
        record.name = format!("{}-{}", record.name, std::process::id());
        record.pid_file = dir.join(record.pid_name());
        let _held = record
            .write_pid(std::process::id(), Path::new("/mnt/x"))
            .unwrap();
        let dirty = dir.join(record.dirty_name());
        record.write_dirty(4096);
        record.write_dirty(65536);
        assert_eq!(std::fs::read_to_string(&dirty).unwrap(), "65536\n");
        assert_eq!(std::fs::metadata(&dirty).unwrap().mode() & 0o777, 0o600);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            2,
            "no temporary left"
        );
        record.write_status("");
        assert!(!dirty.exists());
        assert!(!record.pid_file.exists());
    }

    #[test]
    fn a_folder_of_ours_open_to_others_is_closed_and_anothers_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("qcowfs");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let record = Record::in_dir(dir.clone(), Path::new("/mnt/x"), None);
        // Only reading: an open folder is not trusted.
        assert!(RuntimeDir::open(&dir, false).is_err());
        drop(
            record
                .write_pid(std::process::id(), Path::new("/mnt/x"))
                .unwrap(),
        );
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        if euid() == 0 {
            // Another user's folder (nobody's) is refused even at mode 0700.
            let theirs = tmp.path().join("theirs");
            std::fs::create_dir(&theirs).unwrap();
            std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
            let err = Record::in_dir(theirs, Path::new("/mnt/x"), None)
                .write_pid(1, Path::new("/mnt/x"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("not a private folder"), "{err}");
        }
    }

    #[test]
    fn a_symlinked_record_is_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("qcowfs");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let record = Record::in_dir(dir.clone(), Path::new("/mnt/x"), None);
        std::os::unix::fs::symlink(&victim, dir.join(record.status_name())).unwrap();
        record.write_status("overwrite?");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        // A symlinked folder is not followed either.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(RuntimeDir::open(&link, false).is_err());
    }

    #[test]
    fn a_record_naming_a_process_that_is_not_a_qcowfs_daemon_is_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("qcowfs");
        let record = Record::in_dir(dir.clone(), Path::new("/mnt/x"), None);
        drop(record.write_pid(1, Path::new("/mnt/x")).unwrap());
        // pid 1 is init, not this program.
        assert_eq!(record.read_pid(), None);
        assert!(record.wait_unlocked(1, Duration::from_secs(3600)));
    }
}
