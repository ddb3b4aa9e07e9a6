//! The kernel's FUSE-over-io_uring switch, set by the tests that run both transports (one test at a
//! time: it is global), and a buffer aligned for O_DIRECT.

use std::fs;
use std::sync::Mutex;

/// The kernel switch: off, FUSE refuses io_uring registrations.
pub const PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// One test at a time touches the kernel switch.
pub static SWITCH: Mutex<()> = Mutex::new(());

/// Sets the kernel switch for the guard's life, then puts the old value back.
pub struct Switch {
    old: String,
}

impl Switch {
    pub fn set(on: bool) -> Switch {
        let old = fs::read_to_string(PARAM).unwrap_or_else(|e| {
            panic!("{PARAM}: {e}: this kernel has no FUSE over io_uring (Linux 6.14+, CONFIG_FUSE_IO_URING)")
        });
        fs::write(PARAM, if on { "1" } else { "0" })
            .unwrap_or_else(|e| panic!("{PARAM}: {e} (these tests must run as root)"));
        Switch { old }
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        let v = if self.old.trim() == "Y" { "1" } else { "0" };
        let _ = fs::write(PARAM, v);
    }
}

/// A heap buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        let raw = vec![0u8; len + 4096];
        let start = raw.as_ptr().align_offset(4096);
        AlignedBuf { raw, start, len }
    }
    pub fn as_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}
