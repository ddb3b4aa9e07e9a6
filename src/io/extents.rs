//! Which bytes of a raw file hold written data, as the file system's extent map says (FIEMAP).
//!
//! SEEK_DATA alone is not enough to count a raw base's data: an extent that `fallocate`, mkfs or
//! a preallocating copy reserved but nobody wrote is *unwritten* and reads as zeros, yet ext4 and
//! XFS answer SEEK_DATA for it as soon as its pages sit in the page cache. So the same fresh base
//! counted 2.9 MiB of data, then 35 MiB after `cat base > /dev/null`, and `st_blocks` counts all
//! of it. FIEMAP flags such extents `FIEMAP_EXTENT_UNWRITTEN` whatever the cache holds; they are
//! holes here. `FIEMAP_FLAG_SYNC` writes dirty pages back first, so data written into an
//! unwritten extent but not yet on disk counts as data. Where the file system has no FIEMAP
//! (tmpfs, many FUSE and network file systems) the answer is `None` and the caller asks
//! SEEK_DATA/SEEK_HOLE instead.
//!
//! The map is read `BATCH` extents per call: a hugely fragmented file costs more calls, never
//! more memory.

use std::fs::File;
use std::io;
use std::ops::ControlFlow;
use std::os::unix::io::AsRawFd;

/// Extents asked for per FIEMAP call.
const BATCH: usize = 64;

const FIEMAP_FLAG_SYNC: u32 = 0x0000_0001;
const FIEMAP_EXTENT_LAST: u32 = 0x0000_0001;
const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x0000_0800;

/// `struct fiemap_extent` (linux/fiemap.h).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

/// `struct fiemap` (linux/fiemap.h) without its flexible array of extents: the ioctl number
/// encodes this size.
#[repr(C)]
#[derive(Default)]
struct FiemapHead {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
}

/// A `struct fiemap` with room for `BATCH` extents (they follow the head, as in C).
#[repr(C)]
struct Fiemap {
    head: FiemapHead,
    extents: [FiemapExtent; BATCH],
}

impl Fiemap {
    fn ask(start: u64, length: u64, flags: u32) -> Fiemap {
        Fiemap {
            head: FiemapHead {
                fm_start: start,
                fm_length: length,
                fm_flags: flags,
                fm_extent_count: BATCH as u32,
                ..FiemapHead::default()
            },
            extents: [FiemapExtent::default(); BATCH],
        }
    }
}

const FS_IOC_FIEMAP: libc::Ioctl = libc::_IOWR::<FiemapHead>(b'f' as u32, 11);

/// Walk [start, end) as runs of data (`true`) and holes (`false`), in order, handing each run
/// `(data, from, to)` to `visit` until it breaks. Adjacent runs of one kind may come apart.
/// `Ok(false)` when the file system has no FIEMAP (nothing was visited).
fn walk(
    file: &File,
    start: u64,
    end: u64,
    mut visit: impl FnMut(bool, u64, u64) -> ControlFlow<()>,
) -> io::Result<bool> {
    let mut map = Box::new(Fiemap::ask(0, 0, 0));
    let mut pos = start;
    let mut first = true;
    while pos < end {
        *map = Fiemap::ask(pos, end - pos, if first { FIEMAP_FLAG_SYNC } else { 0 });
        // SAFETY: the descriptor is open for the call and `map` is a live `struct fiemap` with
        // room for the `fm_extent_count` extents the kernel may fill in.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut *map as *mut Fiemap) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EBADR | libc::EINVAL) if first => {
                    Ok(false)
                }
                _ => Err(e),
            };
        }
        first = false;
        let mapped = (map.head.fm_mapped_extents as usize).min(BATCH);
        let before = pos;
        for ext in &map.extents[..mapped] {
            let from = ext.fe_logical.max(pos);
            let to = ext.fe_logical.saturating_add(ext.fe_length).min(end);
            if from > pos {
                if visit(false, pos, from.min(end)).is_break() {
                    return Ok(true);
                }
                pos = from.min(end);
            }
            if to > pos {
                let data = ext.fe_flags & FIEMAP_EXTENT_UNWRITTEN == 0;
                if visit(data, pos, to).is_break() {
                    return Ok(true);
                }
                pos = to;
            }
            if ext.fe_flags & FIEMAP_EXTENT_LAST != 0 {
                break;
            }
        }
        let more = mapped == BATCH
            && map.extents[BATCH - 1].fe_flags & FIEMAP_EXTENT_LAST == 0
            && pos < end;
        if !more {
            // Past the last extent: a hole to the end.
            if pos < end {
                let _ = visit(false, pos, end);
            }
            return Ok(true);
        }
        if pos == before {
            // A full batch that did not move on (never seen): the rest counts as data, so the
            // audit errs towards reporting plaintext.
            let _ = visit(true, pos, end);
            return Ok(true);
        }
    }
    Ok(true)
}

/// The run at `at`: whether it holds written data, and for how many bytes (1..=`len`). None when
/// the file system has no FIEMAP.
pub fn run_at(file: &File, at: u64, len: u64) -> io::Result<Option<(bool, u64)>> {
    if len == 0 {
        return Ok(Some((false, 0)));
    }
    let end = at.saturating_add(len);
    let mut run: Option<(bool, u64)> = None;
    let supported = walk(file, at, end, |data, from, to| match run {
        None => {
            run = Some((data, to - from));
            ControlFlow::Continue(())
        }
        Some((kind, n)) if kind == data => {
            run = Some((kind, n + (to - from)));
            ControlFlow::Continue(())
        }
        Some(_) => ControlFlow::Break(()),
    })?;
    Ok(supported.then(|| run.unwrap_or((false, len))))
}

/// The bytes of [0, `size`) in written extents. None when the file system has no FIEMAP.
pub fn written_bytes(file: &File, size: u64) -> io::Result<Option<u64>> {
    let mut total = 0u64;
    let supported = walk(file, 0, size, |data, from, to| {
        if data {
            total += to - from;
        }
        ControlFlow::Continue(())
    })?;
    Ok(supported.then_some(total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1 << 20;

    /// A file in the temp folder, which must be on a file system with FIEMAP and unwritten
    /// extents (ext4, XFS, btrfs): the test fails, naming the folder, when it is not.
    fn scratch() -> tempfile::NamedTempFile {
        let dir = std::env::temp_dir();
        let f = tempfile::NamedTempFile::new_in(&dir).unwrap();
        assert!(
            run_at(f.as_file(), 0, 1).unwrap().is_some(),
            "{} has no FIEMAP (tmpfs?): run the tests with TMPDIR on ext4, XFS or btrfs",
            dir.display()
        );
        f
    }

    #[test]
    fn unwritten_extents_are_holes_and_written_ones_data() {
        let f = scratch();
        let file = f.as_file();
        // SAFETY: a valid descriptor; mode 0 reserves (unwritten) extents and extends the file.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, 16 * MIB as libc::off_t) };
        assert_eq!(rc, 0, "fallocate: {}", io::Error::last_os_error());
        file.write_all_at(&vec![0x41; MIB as usize], 4 * MIB)
            .unwrap();
        // Read it all, as `cat` would: SEEK_DATA then sees the cached unwritten pages as data.
        let mut buf = vec![0; MIB as usize];
        for i in 0..16 {
            file.read_exact_at(&mut buf, i * MIB).unwrap();
        }
        assert_eq!(written_bytes(file, 16 * MIB).unwrap(), Some(MIB));
        assert_eq!(run_at(file, 0, 16 * MIB).unwrap(), Some((false, 4 * MIB)));
        assert_eq!(run_at(file, 4 * MIB, 12 * MIB).unwrap(), Some((true, MIB)));
        assert_eq!(run_at(file, 4 * MIB + 7, 100).unwrap(), Some((true, 100)));
        assert_eq!(
            run_at(file, 5 * MIB, 11 * MIB).unwrap(),
            Some((false, 11 * MIB))
        );
    }

    #[test]
    fn a_file_of_more_extents_than_a_batch_is_walked_to_its_end() {
        let f = scratch();
        let file = f.as_file();
        // Every other 64 KiB written: three batches of data extents with holes between them.
        let n = 3 * BATCH as u64;
        let chunk = 64 << 10;
        for i in 0..n {
            file.write_all_at(&vec![1; chunk as usize], 2 * i * chunk)
                .unwrap();
        }
        let size = 2 * n * chunk;
        assert_eq!(written_bytes(file, size).unwrap(), Some(n * chunk));
        let (mut at, mut data, mut runs) = (0, 0, 0);
        while at < size {
            let (is_data, len) = run_at(file, at, size - at).unwrap().unwrap();
            assert!(len > 0);
            if is_data {
                data += len;
            }
            at += len;
            runs += 1;
        }
        assert_eq!((data, runs), (n * chunk, 2 * n));
    }
}
