//! The mount(2) call of a root mount, made here rather than by fuser: fuser mounts as type plain
//! `fuse` and drops the subtype, so `findmnt -t fuse.qcowfs` and `umount -a -t fuse.qcowfs` would
//! not select qcowfs mounts. libfuse mounts as `fuse.SUBTYPE`, and so does this (the kernel keeps
//! the subtype of a `fuse.*` type); fusermount3, which mounts for other users, passes it already.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The file system type the kernel lists qcowfs mounts under.
pub const FSTYPE: &str = "fuse.qcowfs";

/// How to mount.
pub struct KernelMount<'a> {
    pub mountpoint: &'a Path,
    /// What the mount table shows as the source (the image).
    pub source: &'a str,
    pub read_only: bool,
    pub allow_other: bool,
}

/// As root: open /dev/fuse and mount it at the mount point as `fuse.qcowfs`; the descriptor
/// then serves the mount (`fuser::Session::from_fd`). `None` when not root (fusermount3 mounts,
/// through fuser).
pub fn mount(m: &KernelMount) -> std::io::Result<Option<OwnedFd>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let fd = OwnedFd::from(dev);
    let mut options = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions",
        fd.as_raw_fd()
    );
    if m.allow_other {
        options.push_str(",allow_other");
    }
    let mut flags = libc::MS_NODEV | libc::MS_NOSUID;
    if m.read_only {
        flags |= libc::MS_RDONLY;
    }
    let invalid = || std::io::Error::from_raw_os_error(libc::EINVAL);
    let target = CString::new(m.mountpoint.as_os_str().as_bytes()).map_err(|_| invalid())?;
    let source = CString::new(m.source).map_err(|_| invalid())?;
    let fstype = CString::new(FSTYPE).map_err(|_| invalid())?;
    let data = CString::new(options).map_err(|_| invalid())?;
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Some(fd))
}
