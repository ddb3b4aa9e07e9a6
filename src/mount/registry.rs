//! Where a running daemon records itself and, when it ends, how its final flush went, keyed by the
//! canonical mountpoint. The daemon holds an exclusive flock on its record for its whole life and
//! releases it only after the image is closed, so `qcowfs umount` knows the daemon is done (and the
//! image's QEMU locks are gone) when it can take that lock, whatever happened to pids.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The per-user runtime folder for qcowfs records.
fn runtime_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/qcowfs");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("qcowfs"),
        None => std::env::temp_dir().join(format!("qcowfs-{uid}")),
    }
}

fn flock(file: &fs::File, how: i32) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
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

/// The files recording one mount.
#[derive(Debug, Clone)]
pub struct Record {
    pub pid_file: PathBuf,
    pub status_file: PathBuf,
}

impl Record {
    pub fn for_mountpoint(mountpoint: &Path) -> Record {
        let dir = runtime_dir();
        let k = key(mountpoint);
        Record {
            pid_file: dir.join(format!("{k}.pid")),
            status_file: dir.join(format!("{k}.status")),
        }
    }

    /// Write the record and hold its lock; the lock is released when the returned file is dropped.
    pub fn write_pid(&self, pid: u32, mountpoint: &Path) -> io::Result<fs::File> {
        use std::io::Write;
        if let Some(dir) = self.pid_file.parent() {
            fs::create_dir_all(dir)?;
        }
        let _ = fs::remove_file(&self.status_file);
        let mut file = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&self.pid_file)?;
        flock(&file, libc::LOCK_EX | libc::LOCK_NB)?;
        write!(file, "{pid}\n{}\n", mountpoint.display())?;
        Ok(file)
    }

    /// Wait (up to `limit`) until no daemon holds the record's lock. True when it is free.
    pub fn wait_unlocked(&self, limit: std::time::Duration) -> bool {
        let Ok(file) = fs::File::open(&self.pid_file) else {
            return true;
        };
        let start = std::time::Instant::now();
        loop {
            if flock(&file, libc::LOCK_SH | libc::LOCK_NB).is_ok() {
                return true;
            }
            if start.elapsed() > limit {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    pub fn read_pid(&self) -> Option<u32> {
        fs::read_to_string(&self.pid_file)
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// The daemon's last words: empty when everything was written, else the error. The pid file goes
    /// only if it is still this process's: a newer mount of the same mountpoint may have replaced it.
    pub fn write_status(&self, status: &str) {
        let _ = fs::write(&self.status_file, status);
        if self.read_pid() == Some(std::process::id()) {
            let _ = fs::remove_file(&self.pid_file);
        }
    }

    pub fn take_status(&self) -> Option<String> {
        let s = fs::read_to_string(&self.status_file).ok()?;
        let _ = fs::remove_file(&self.status_file);
        Some(s)
    }
}
