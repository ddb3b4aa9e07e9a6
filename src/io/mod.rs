//! Host-side I/O: positional reads and writes on image files (through the `HostIo` seam, which a
//! recorder or a fault injector can wrap for tests), and QEMU-compatible image locks.

pub mod extents;
pub mod fault;
mod file;
pub mod host;
mod lock;

pub use fault::{Fault, FaultPlan};
pub use file::HostFile;
pub use host::{HostEvent, HostIo, MemFile, WriteLog};
pub use lock::{held_for_writing, ImageLock, LockMode};
