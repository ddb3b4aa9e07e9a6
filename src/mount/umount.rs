//! `qcowfs umount`: write everything, unmount, and wait until the daemon has exited, so that when it
//! returns 0 the image is complete, consistent and no longer held.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::fs::DISK_NAME;
use super::registry::Record;
use crate::error::{Error, Problem, Result};

/// How long to wait for the daemon to write what is left and exit.
const EXIT_WAIT: Duration = Duration::from_secs(3600);

pub fn umount(mountpoint: &Path) -> Result<()> {
    let canon = std::fs::canonicalize(mountpoint).map_err(|e| Error::new(mountpoint, e))?;
    let record = Record::for_mountpoint(&canon);
    // Without a usable record (none could be written, say the runtime folder was another user's),
    // the daemon is found by its command line.
    let pid = record.read_pid().or_else(|| find_daemon(&canon));
    log::debug!(
        "{}: daemon pid {pid:?} from {}",
        canon.display(),
        record.pid_file.display()
    );
    // As root the kernel records the type as plain "fuse"; our record tells it is ours.
    let ours = match fuse_type_at(&canon)? {
        Some(t) => t == "fuse.qcowfs" || pid.is_some(),
        None => false,
    };
    if !ours {
        return Err(Error::new(
            mountpoint,
            Problem::Usage("not a qcowfs mount point".into()),
        ));
    }
    // Flush first, while the mount is still there: a failure (e.g. host disk full) leaves the mount in
    // place with nothing lost, and the user can free space and run umount again.
    let disk = canon.join(DISK_NAME);
    if let Ok(file) = std::fs::File::open(&disk) {
        file.sync_all().map_err(|e| {
            Error::new(
                &disk,
                Problem::Usage(format!(
                    "writing the image failed, nothing was unmounted: {e}"
                )),
            )
        })?;
    }
    unmount(&canon)?;
    if let Some(pid) = pid {
        if !record.wait_unlocked(pid, EXIT_WAIT) {
            return Err(Error::new(
                mountpoint,
                Problem::Usage("the daemon did not finish writing in time".into()),
            ));
        }
        wait_for_exit(pid, &canon)?;
        if let Some(status) = record.take_status() {
            if !status.trim().is_empty() {
                return Err(Error::relayed(
                    status.trim().to_string(),
                    crate::error::Failure::Other,
                ));
            }
        }
    }
    Ok(())
}

fn unmount(mountpoint: &Path) -> Result<()> {
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_bytes()).map_err(|_| {
        Error::new(
            mountpoint,
            Problem::Usage("path contains a NUL byte".into()),
        )
    })?;
    // SAFETY: c is a valid C string.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EBUSY) {
        return Err(Error::new(mountpoint, Problem::Usage("the mount is busy: unmount the guest file system (umount /mnt/guest) and close files on it first".into())));
    }
    // Not root: the setuid helper unmounts FUSE file systems for their owner.
    let status = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg(mountpoint)
        .status();
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(_) => Err(Error::new(
            mountpoint,
            Problem::Usage(format!("cannot unmount: {err}")),
        )),
        Err(e) => Err(Error::new(
            mountpoint,
            Problem::Usage(format!(
                "cannot unmount ({err}) and fusermount3 failed: {e}"
            )),
        )),
    }
}

/// The FUSE file system type mounted at `mountpoint` ("fuse" or "fuse.SUBTYPE"), if any.
fn fuse_type_at(mountpoint: &Path) -> Result<Option<String>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::new("/proc/self/mountinfo", e))?;
    Ok(info.lines().rev().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let point = unescape(left.split(' ').nth(4)?);
        let fstype = right.split(' ').next()?;
        (point == mountpoint && fstype.starts_with("fuse")).then(|| fstype.to_string())
    }))
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

/// A live qcowfs daemon of ours whose `mount` command line names `mountpoint` as its mountpoint
/// (its last argument, resolved against the daemon's working folder).
fn find_daemon(mountpoint: &Path) -> Option<u32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != std::process::id() && super::registry::is_our_daemon(pid))
        .find(|&pid| {
            let proc_dir = PathBuf::from(format!("/proc/{pid}"));
            let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .collect();
            if !args.iter().any(|a| *a == b"mount") {
                return false;
            }
            let Some(last) = args.last() else {
                return false;
            };
            let named = Path::new(std::ffi::OsStr::from_bytes(last));
            let named = match std::fs::read_link(proc_dir.join("cwd")) {
                Ok(cwd) if named.is_relative() => cwd.join(named),
                _ => named.to_path_buf(),
            };
            std::fs::canonicalize(&named).is_ok_and(|c| c == mountpoint)
        })
}

fn wait_for_exit(pid: u32, mountpoint: &Path) -> Result<()> {
    let start = Instant::now();
    log::debug!("waiting for daemon {pid} to exit");
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    while proc_dir.exists() {
        // A zombie has finished its work (its parent has not reaped it yet).
        if let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) {
            if stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
            {
                break;
            }
        }
        if start.elapsed() > EXIT_WAIT {
            return Err(Error::new(
                mountpoint,
                Problem::Usage(format!("the daemon (pid {pid}) did not exit")),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    log::debug!("daemon {pid} gone after {:?}", start.elapsed());
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
}
