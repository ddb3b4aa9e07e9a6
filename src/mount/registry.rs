//! Where a running daemon records its pid and, when it ends, how its final flush went, keyed by the
//! canonical mountpoint. `qcowfs umount` reads both.

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

    pub fn write_pid(&self, pid: u32, mountpoint: &Path) -> io::Result<()> {
        if let Some(dir) = self.pid_file.parent() {
            fs::create_dir_all(dir)?;
        }
        let _ = fs::remove_file(&self.status_file);
        fs::write(&self.pid_file, format!("{pid}\n{}\n", mountpoint.display()))
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
