//! A `log` backend that appends timestamped lines to a file (`--log-file`), for operators who keep
//! qcowfs's messages apart from syslog. Each line is one `write` on an `O_APPEND` descriptor, so
//! lines from several mounts sharing a file do not interleave.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use super::log_target;

/// New log files are private to the mounting user: they name images and mount points.
const LOG_FILE_MODE: u32 = 0o600;

struct FileLog {
    level: log::LevelFilter,
    file: Mutex<File>,
}

impl log::Log for FileLog {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        log_target::wanted(metadata, self.level)
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = format!(
            "{} qcowfs[{}] {}: {}\n",
            timestamp(),
            std::process::id(),
            record.level(),
            record.args()
        );
        // A failing log write has nowhere to be reported; the daemon carries on.
        let _ = self.file.lock().write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = self.file.lock().flush();
    }
}

/// Opens `path` for appending, creating it (mode 0600) if needed. The CLI calls it before
/// daemonizing, so a bad path is reported on the terminal.
pub fn open(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(LOG_FILE_MODE)
        .open(path)
}

/// Open a log file qcowfs chose itself (not one the user named): only in a folder of this user's
/// own (or root's) that nobody else may write, and never through a symbolic link, so that
/// another user who planted the folder or a link in it cannot aim the log at a file of ours.
fn open_in_own_folder(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::MetadataExt;
    let dir = path.parent().unwrap_or(Path::new("/"));
    let meta = std::fs::symlink_metadata(dir)?;
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if !meta.is_dir() || (meta.uid() != uid && meta.uid() != 0) || meta.mode() & 0o022 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "the folder is not this user's own, or others may write in it",
        ));
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(LOG_FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Routes `log` to `path`.
pub fn init(path: &Path, level: log::LevelFilter) -> std::io::Result<()> {
    let file = open(path)?;
    if log::set_boxed_logger(Box::new(FileLog {
        level,
        file: Mutex::new(file),
    }))
    .is_ok()
    {
        log::set_max_level(log_target::max_level(level));
    }
    Ok(())
}

/// Where a daemon may log when no syslog listens, best first: `$XDG_STATE_HOME/qcowfs/qcowfs.log`
/// when that is set (the XDG folder for logs, any user), `/var/log/qcowfs.log` for root,
/// `~/.local/state/qcowfs/qcowfs.log` in a home of the user's own, and last the runtime folder of
/// the mount records. One file for every mount of the user, kept across reboots like syslog's
/// where it can be (the runtime folder is a tmpfs); each line names the daemon's pid.
pub fn fallback_paths() -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let mut paths = Vec::new();
    if let Some(state) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        paths.push(PathBuf::from(state).join("qcowfs/qcowfs.log"));
    }
    if uid == 0 {
        paths.push(PathBuf::from("/var/log/qcowfs.log"));
    }
    // Only a home of this user's own (a HOME inherited through su or setpriv is someone else's).
    if let Some(home) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        if std::fs::metadata(&home).is_ok_and(|m| m.uid() == uid) {
            paths.push(PathBuf::from(home).join(".local/state/qcowfs/qcowfs.log"));
        }
    }
    // Last, the runtime folder of the mount records (a tmpfs: gone at reboot, but there).
    paths.push(super::registry::runtime_dir().join("qcowfs.log"));
    paths
}

/// The log file for a daemonized mount that names none: none while a syslog daemon listens at
/// /dev/log, else the first of [`fallback_paths`] that opens (its folder made, mode 0700). Also the line to say on the
/// terminal once the mount is up (not before: a failed mount's stderr is its one error line).
pub fn instead_of_syslog() -> (Option<PathBuf>, Option<String>) {
    let socket = super::syslog::socket();
    if super::syslog::listening(&socket) {
        return (None, None);
    }
    let mut failed = Vec::new();
    for path in fallback_paths() {
        let opened = match path.parent() {
            Some(dir) if !dir.exists() => std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir),
            _ => Ok(()),
        }
        .and_then(|()| open_in_own_folder(&path));
        match opened {
            Ok(_) => {
                let note = format!(
                    "logging to {} (no syslog at {})",
                    path.display(),
                    socket.display()
                );
                return (Some(path), Some(note));
            }
            Err(e) => failed.push(format!("{}: {}", path.display(), crate::error::io_text(&e))),
        }
    }
    let note = format!(
        "warning: no syslog at {} and no log file ({}): the daemon's messages are lost (use \
         --log-file)",
        socket.display(),
        failed.join("; ")
    );
    (None, Some(note))
}

/// The daemon's logger: `log_file` when given (falling back to syslog, with the reason logged,
/// when it cannot be opened), else syslog.
pub fn init_daemon(log_file: Option<&Path>, level: log::LevelFilter) {
    let Some(path) = log_file else {
        super::syslog::init(level);
        return;
    };
    if let Err(e) = init(path, level) {
        super::syslog::init(level);
        log::error!(
            "cannot open the log file {}: {e}; logging to syslog",
            path.display()
        );
    }
}

/// Local time as `2024-05-01T13:45:12.345+0200`.
fn timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as libc::time_t;
    // SAFETY: an all-zero `tm` is a valid value; localtime_r writes only into it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the duration of the call.
    if unsafe { libc::localtime_r(&secs, &mut tm) }.is_null() {
        return format!("{}.{:03}", now.as_secs(), now.subsec_millis());
    }
    let offset_min = tm.tm_gmtoff / 60;
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}{}{:02}{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        now.subsec_millis(),
        if offset_min < 0 { '-' } else { '+' },
        offset_min.abs() / 60,
        offset_min.abs() % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_iso_8601_local_time_with_offset() {
        let t = timestamp();
        assert_eq!(t.len(), "2024-05-01T13:45:12.345+0200".len(), "{t}");
        assert_eq!(&t[4..5], "-");
        assert_eq!(&t[10..11], "T");
        assert!(matches!(&t[23..24], "+" | "-"), "{t}");
    }

    #[test]
    fn opening_creates_a_private_file_and_appends() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.log");
        open(&path).unwrap().write_all(b"one\n").unwrap();
        open(&path).unwrap().write_all(b"two\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\ntwo\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, LOG_FILE_MODE);
    }
}
