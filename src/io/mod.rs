//! Host-side I/O: positional reads and writes on image files, and QEMU-compatible image locks.

mod file;
mod lock;

pub use file::HostFile;
pub use lock::{ImageLock, LockMode};
