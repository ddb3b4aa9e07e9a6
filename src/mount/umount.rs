//! `qcowfs umount`: write everything, unmount, and wait until the daemon has exited, so that when it
//! returns 0 the image is complete, consistent and no longer held.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::inodes::DISK_NAME;
use super::mount_table::{top_mount_at, MountEntry};
use super::mountpoint::{canonical, is_dead_connection, is_qcowfs, probe};
use super::registry::Record;
use crate::error::{Error, Problem, Result};

/// Attempts, 50 ms apart, at unmounting a busy mount.
const BUSY_TRIES: u32 = 20;

/// How long to wait for the daemon to write what is left and exit.
const EXIT_WAIT: Duration = Duration::from_secs(3600);

pub fn umount(mountpoint: &Path) -> Result<()> {
    let canon = canonical(mountpoint)?;
    let entry = top_mount_at(&canon)
        .map_err(|e| Error::new("/proc/self/mountinfo", e))?
        .filter(MountEntry::is_fuse);
    let Some(entry) = entry else {
        return Err(Error::new(
            mountpoint,
            Problem::Usage("not a qcowfs mount point".into()),
        ));
    };
    // The record of this very mount (by its device numbers): another daemon recorded at the same
    // folder (a mount stacked over or under it) is not the one to wait for.
    let record = Record::for_mount(&canon, Some(&entry));
    // Without a usable record (none could be written, say the runtime folder was another user's),
    // the daemon is found by its command line.
    let pid = record.read_pid().or_else(|| find_daemon(&canon));
    log::debug!(
        "{}: daemon pid {pid:?} from {}",
        canon.display(),
        record.pid_file.display()
    );
    // Older versions mounted as plain "fuse" as root; our record tells it is ours.
    if pid.is_none() && !is_qcowfs(&canon, &entry) {
        return Err(Error::new(
            mountpoint,
            Problem::Usage("not a qcowfs mount point".into()),
        ));
    }
    // No live daemon known: ask the mount itself whether anyone still serves it.
    if pid.is_none() {
        if let Err(e) = probe(&canon) {
            if is_dead_connection(&e) {
                return detach_dead(mountpoint, &canon, &entry, &record, &e);
            }
        }
    }
    // Flush first, while the mount is still there: a failure (e.g. host disk full) leaves the mount in
    // place with nothing lost, and the user can free space and run umount again.
    let disk = canon.join(DISK_NAME);
    if let Ok(file) = std::fs::File::open(&disk) {
        file.sync_all().map_err(|e| {
            Error::new(
                &disk,
                Problem::Io(std::io::Error::other(format!(
                    "writing the image failed, nothing was unmounted: {e}"
                ))),
            )
        })?;
    }
    unmount(&canon)?;
    // Success means the image is complete: never say so without having seen the daemon finish.
    let Some(pid) = pid else {
        return Err(Error::new(
            mountpoint,
            Problem::Refused(
                "unmounted, but its daemon could not be found to wait for (it left no record): \
                 the image may still be being written"
                    .into(),
            ),
        ));
    };
    if !record.wait_unlocked(pid, EXIT_WAIT) {
        return Err(Error::new(
            mountpoint,
            Problem::Refused("the daemon did not finish writing in time".into()),
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
    Ok(())
}

/// The daemon of a qcowfs mount died (killed, crashed): the kernel answers every request with
/// "Transport endpoint is not connected". Detach the mount (lazily, so files still open on it
/// do not keep it in the tree) and say, non-zero, that what the daemon had not written is lost.
fn detach_dead(
    mountpoint: &Path,
    canon: &Path,
    entry: &MountEntry,
    record: &Record,
    why: &std::io::Error,
) -> Result<()> {
    detach_lazily(canon).map_err(|e| {
        Error::new(
            mountpoint,
            Problem::Refused(format!(
                "its daemon has died ({why}) and detaching the mount failed: {e}"
            )),
        )
    })?;
    record.forget();
    Err(Error::new(
        mountpoint,
        Problem::Refused(format!(
            "its daemon had died ({why}): the mount is detached, but writes the daemon had not \
             yet flushed are lost; check {} with qcowfs check",
            crate::error::escaped(&entry.source)
        )),
    ))
}

/// `umount -l`: the mount leaves the tree now; as a non-root owner, `fusermount3 -u -z`.
pub(super) fn detach_lazily(mountpoint: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: c is a valid C string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    let status = std::process::Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(mountpoint)
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(err)
    }
}

fn unmount(mountpoint: &Path) -> Result<()> {
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_bytes()).map_err(|_| {
        Error::new(
            mountpoint,
            Problem::Usage("path contains a NUL byte".into()),
        )
    })?;
    // A file closed a moment ago can still hold the mount: a process forking at that moment
    // copies the descriptor until its child's exec closes it. So a busy mount is tried again for
    // a second before it is called busy.
    let mut tries = 0;
    let err = loop {
        // SAFETY: c is a valid C string.
        if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        tries += 1;
        if err.raw_os_error() != Some(libc::EBUSY) || tries == BUSY_TRIES {
            break err;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if err.raw_os_error() == Some(libc::EBUSY) {
        return Err(Error::new(mountpoint, Problem::Busy("the mount is busy: unmount the guest file system (umount /mnt/guest) and close files on it first".into())));
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
            Problem::Refused(format!("cannot unmount: {err}")),
        )),
        Err(e) => Err(Error::new(
            mountpoint,
            Problem::Refused(format!(
                "cannot unmount ({err}) and fusermount3 failed: {e}"
            )),
        )),
    }
}

/// The live qcowfs daemon of ours whose `mount` command line names `mountpoint` as its mountpoint
/// (its last argument, resolved against the daemon's working folder), when only one does: of two
/// stacked at one folder, the command lines cannot tell which serves the mount on top.
fn find_daemon(mountpoint: &Path) -> Option<u32> {
    let entries = std::fs::read_dir("/proc").ok()?;
    let mut found = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != std::process::id() && super::registry::is_our_daemon(pid))
        .filter(|&pid| {
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
        });
    let first = found.next()?;
    found.next().is_none().then_some(first)
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
                Problem::Refused(format!("the daemon (pid {pid}) did not exit")),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    log::debug!("daemon {pid} gone after {:?}", start.elapsed());
    Ok(())
}
