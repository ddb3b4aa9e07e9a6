//! Writing through shared memory maps of mounted files, as mmap-using programs (and the kernel's
//! write-back of their pages) do, and the refusal a partition file gives.

use std::fs::File;
use std::os::fd::AsRawFd;

/// Maps the pages holding [off, off + data.len()) of `f` shared and writable, copies `data` in,
/// `msync(MS_SYNC)`s and unmaps; a failure panics naming `what`.
pub fn mmap_write(f: &File, off: u64, data: &[u8], what: &str) {
    const PAGE: u64 = 4096;
    let map_off = off / PAGE * PAGE;
    let map_len = (off + data.len() as u64 - map_off) as usize;
    // SAFETY: a fresh shared mapping of an open file; only bytes inside the file (and inside the
    // mapping) are written, and it is unmapped before returning.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            map_len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            map_off as libc::off_t,
        );
        if p == libc::MAP_FAILED {
            panic!(
                "mmap of {map_len} bytes at {map_off:#x} of {what}: {}",
                std::io::Error::last_os_error()
            );
        }
        let dst = (p as *mut u8).add((off - map_off) as usize);
        std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len());
        let rc = libc::msync(p, map_len, libc::MS_SYNC);
        let err = std::io::Error::last_os_error();
        libc::munmap(p, map_len);
        if rc != 0 {
            panic!("msync of {map_len} bytes at {map_off:#x} of {what}: {err}");
        }
    }
}

/// A shared mapping of a partition file fails with ENODEV (it is opened for direct I/O).
pub fn assert_shared_mmap_refused(f: &File, off: u64, what: &str) {
    let map_off = off / 4096 * 4096;
    // SAFETY: a mapping attempt of an open file; on the unexpected success it is unmapped at once.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            map_off as libc::off_t,
        );
        let err = std::io::Error::last_os_error();
        if p != libc::MAP_FAILED {
            libc::munmap(p, 4096);
            panic!("a shared mapping of {what} succeeded: partition files must refuse it");
        }
        assert_eq!(
            err.raw_os_error(),
            Some(libc::ENODEV),
            "mmap of {what}: {err}"
        );
    }
}
