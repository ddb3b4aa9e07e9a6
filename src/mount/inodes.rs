//! The mount's inode plan and the vocabulary every request layer shares: which inode number is
//! which file (the root, `disk`, `disk-partN`, `snapshots/NAME`), the file a number names, how an
//! answer that comes later is delivered, and how an error becomes an errno. A leaf: `fs` (the
//! requests), `partitions` (the partition files and their writer) and both transports import it,
//! and it imports none of them.

use std::sync::Arc;

use fuser::{Errno, INodeNo};

use crate::disk::BlockDevice;

pub const ROOT: INodeNo = INodeNo::ROOT;
pub const DISK: INodeNo = INodeNo(2);
pub const SNAPSHOT_DIR: INodeNo = INodeNo(3);
pub const DISK_NAME: &str = "disk";
pub const SNAPSHOT_DIR_NAME: &str = "snapshots";
/// Partition N is inode PARTITION_BASE + N.
pub const PARTITION_BASE: u64 = 0x100;
/// Inodes from here on are snapshots.
pub const PARTITION_END: u64 = 0x1_0000;

/// Whether `ino` is a partition file's.
pub fn is_partition(ino: INodeNo) -> bool {
    ino.0 > PARTITION_BASE && ino.0 < PARTITION_END
}

/// Snapshot i is SNAPSHOT_BASE + i (after every partition number).
pub const SNAPSHOT_BASE: u64 = PARTITION_END;

/// A file of the mount and the device behind it.
#[derive(Clone)]
pub struct FileNode {
    pub ino: INodeNo,
    pub name: String,
    pub device: Arc<dyn BlockDevice>,
    /// Where a partition file's bytes lie on `disk`: (start, length).
    pub disk_range: Option<(u64, u64)>,
}

/// Where an answer goes that may come later, from another thread (partition writes, see
/// `partitions`). Both transports pass one; most requests call it before returning.
pub type Done<T> = Box<dyn FnOnce(Result<T, Errno>) + Send>;

/// The errno a failed device call answers with; the error itself goes to the log.
pub fn errno(e: crate::Error) -> Errno {
    log::error!("{e}");
    Errno::from_i32(e.errno())
}
