//! A `log` backend for the daemon once it has left the terminal: messages go to syslog (the journal).

use std::ffi::CString;

struct Syslog {
    level: log::LevelFilter,
}

impl log::Log for Syslog {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= self.level
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
        log::set_max_level(level);
    }
}
