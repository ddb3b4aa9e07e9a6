//! QEMU-compatible image locks (block/file-posix.c): open-file-description byte-range locks where byte
//! 100+i means "I hold permission i" and byte 200+i means "I do not share permission i", with
//! i = 0 consistent read, 1 write, 2 write-unchanged, 3 resize. QEMU takes them as shared read locks
//! and finds conflicts by asking whether an exclusive lock on a byte would be refused.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const PERM_CONSISTENT_READ: i64 = 0;
const PERM_WRITE: i64 = 1;
const PERM_RESIZE: i64 = 3;

/// How the image is being used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Read-only: hold consistent-read, forbid writers (like `qemu-img` reading an image).
    Read,
    /// Read-write: hold read, write and resize, forbid other writers and resizers (like a VM).
    Write,
}

/// The lock bytes held on an image file. Held as long as the file description stays open.
#[derive(Debug)]
pub struct ImageLock;

impl ImageLock {
    /// Check for conflicting users, then take the locks QEMU would take for `mode`.
    /// On conflict, returns a message naming what the other user does.
    pub fn acquire(file: &File, mode: LockMode) -> Result<ImageLock, String> {
        let (held, unshared): (&[i64], &[i64]) = match mode {
            LockMode::Read => (&[PERM_CONSISTENT_READ], &[PERM_WRITE, PERM_RESIZE]),
            LockMode::Write => (
                &[PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE],
                &[PERM_WRITE, PERM_RESIZE],
            ),
        };
        // Someone forbids what we want to hold?
        for &perm in held {
            if conflicts(file, SHARED_BASE + perm).map_err(|e| e.to_string())? {
                return Err(format!(
                    "another process (a VM, qemu-img or qcowfs) does not allow {} while it has the image open",
                    perm_name(perm)
                ));
            }
        }
        // Someone holds what we forbid?
        for &perm in unshared {
            if conflicts(file, PERM_BASE + perm).map_err(|e| e.to_string())? {
                return Err(format!(
                    "another process (a VM, qemu-img or qcowfs) has it open for {}",
                    perm_name(perm)
                ));
            }
        }
        for byte in held
            .iter()
            .map(|p| PERM_BASE + p)
            .chain(unshared.iter().map(|p| SHARED_BASE + p))
        {
            set_shared_lock(file, byte).map_err(|e| format!("cannot lock the image: {e}"))?;
        }
        Ok(ImageLock)
    }
}

/// Whether another process holds the image open for writing (a running VM, `qemu-img commit`, a
/// read-write qcowfs mount): QEMU's lock probe, an exclusive lock on the write-permission byte
/// asked with `F_OFD_GETLK`. Takes no lock, so it never disturbs the writer; a writer that takes
/// no locks (QEMU's `locking=off`) is not seen.
pub fn held_for_writing(file: &File) -> io::Result<bool> {
    conflicts(file, PERM_BASE + PERM_WRITE)
}

fn perm_name(perm: i64) -> &'static str {
    match perm {
        PERM_CONSISTENT_READ => "consistent reads",
        PERM_WRITE => "writing",
        PERM_RESIZE => "resizing",
        _ => "this use",
    }
}

fn flock_for(byte: i64, kind: libc::c_short) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

/// Would an exclusive lock on `byte` be refused (someone else holds it)?
fn conflicts(file: &File, byte: i64) -> io::Result<bool> {
    let mut fl = flock_for(byte, libc::F_WRLCK as libc::c_short);
    // SAFETY: valid fd and a pointer to a live flock.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

fn set_shared_lock(file: &File, byte: i64) -> io::Result<()> {
    let fl = flock_for(byte, libc::F_RDLCK as libc::c_short);
    // SAFETY: valid fd and a pointer to a live flock.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
