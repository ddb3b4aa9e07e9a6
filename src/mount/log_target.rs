//! The daemon's lifecycle lines ("mounted", "unmounted"): logged at info under their own target,
//! which the daemon's loggers (syslog, the log file) write at every level, so that the default
//! (warnings only) still records when each mount began and how it ended.

/// The `log` target of the lifecycle lines.
pub const LIFECYCLE: &str = "qcowfs::lifecycle";

/// Whether a daemon logger at `level` writes a message: at or above the level, or a lifecycle line.
pub fn wanted(metadata: &log::Metadata, level: log::LevelFilter) -> bool {
    metadata.level() <= level || metadata.target() == LIFECYCLE
}

/// The level the `log` macros must pass on for a logger at `level` to see the lifecycle lines.
pub fn max_level(level: log::LevelFilter) -> log::LevelFilter {
    level.max(log::LevelFilter::Info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_lines_pass_at_every_level_and_other_info_lines_do_not() {
        let info = |target| {
            log::Metadata::builder()
                .level(log::Level::Info)
                .target(target)
                .build()
        };
        assert!(wanted(&info(LIFECYCLE), log::LevelFilter::Error));
        assert!(!wanted(&info("fuser::session"), log::LevelFilter::Warn));
        assert!(wanted(&info("fuser::session"), log::LevelFilter::Info));
        assert_eq!(max_level(log::LevelFilter::Warn), log::LevelFilter::Info);
        assert_eq!(max_level(log::LevelFilter::Trace), log::LevelFilter::Trace);
    }
}
