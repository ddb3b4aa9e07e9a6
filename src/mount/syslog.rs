//! A `log` backend for the daemon once it has left the terminal: messages go to syslog (the journal).

use std::ffi::CString;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};

use super::log_target;

/// Moves the socket looked for (not the one syslog(3) writes to, always /dev/log): for tests.
const SOCKET_ENV: &str = "QCOWFS_SYSLOG_SOCKET";

struct Syslog {
    level: log::LevelFilter,
}

impl log::Log for Syslog {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        log_target::wanted(metadata, self.level)
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let priority = match record.level() {
            log::Level::Error => libc::LOG_ERR,
            log::Level::Warn => libc::LOG_WARNING,
            log::Level::Info => libc::LOG_INFO,
            log::Level::Debug | log::Level::Trace => libc::LOG_DEBUG,
        };
        let text = format!("{}", record.args()).replace('\0', " ");
        if let Ok(msg) = CString::new(text) {
            // SAFETY: both strings are valid NUL-terminated C strings; "%s" consumes exactly one.
            unsafe { libc::syslog(priority, c"%s".as_ptr(), msg.as_ptr()) };
        }
    }

    fn flush(&self) {}
}

/// Route `log` to syslog as `qcowfs[pid]`.
pub fn init(level: log::LevelFilter) {
    // SAFETY: the identifier is a static C string that outlives the process's use of syslog.
    unsafe { libc::openlog(c"qcowfs".as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
    if log::set_boxed_logger(Box::new(Syslog { level })).is_ok() {
        log::set_max_level(log_target::max_level(level));
    }
}

/// The socket syslog(3) writes to: /dev/log (or `QCOWFS_SYSLOG_SOCKET`, for tests).
pub fn socket() -> PathBuf {
    std::env::var_os(SOCKET_ENV)
        .filter(|s| !s.is_empty())
        .map_or_else(|| PathBuf::from("/dev/log"), PathBuf::from)
}

/// Whether a syslog daemon listens at `path`, as syslog(3) tries it: a datagram, else a stream
/// socket. Without one, syslog(3) drops every message.
pub fn listening(path: &Path) -> bool {
    UnixDatagram::unbound().is_ok_and(|s| s.connect(path).is_ok())
        || UnixStream::connect(path).is_ok()
}
