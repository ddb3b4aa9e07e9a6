//! Host-side I/O: positional reads and writes on image files (through the `HostIo` seam), and
//! QEMU-compatible image locks.

mod file;
pub mod host;
mod lock;

pub use file::HostFile;
pub use host::{HostEvent, HostIo, MemFile, WriteLog};
pub use lock::{ImageLock, LockMode};
