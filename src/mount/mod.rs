//! Mounting: the FUSE inode layer (`fs`), its two transports (`devfuse`: fuser reading
//! `/dev/fuse`; `uring`: per-CPU io_uring queues), the daemon lifecycle (`daemon`) and where a
//! running mount records itself so `qcowfs umount` can find and wait for it (`registry`).

pub mod daemon;
mod devfuse;
pub mod filelog;
pub(crate) mod fs;
mod inodes;
mod kernel_mount;
pub mod list;
mod log_target;
mod mount_table;
mod mountpoint;
mod partitions;
pub(crate) mod registry;
mod syslog;
pub mod umount;
pub(crate) mod uring;
