//! Mounting: the FUSE inode layer (`fs`), the daemon lifecycle (`daemon`) and where a running mount
//! records itself so `qcowfs umount` can find and wait for it (`registry`).

pub mod daemon;
pub mod filelog;
pub mod fs;
mod partitions;
pub mod registry;
mod syslog;
pub mod umount;

pub use fs::QcowFs;
