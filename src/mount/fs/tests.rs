//! The request handler both transports share, over an in-memory device: what each request answers,
//! without a kernel, a transport or qcow2 in the way.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

use super::*;
use crate::error::{Error, Result};

const MIB: u64 = 1 << 20;
/// The unit the memory device allocates and discards in (as clusters are).
const CHUNK: u64 = 64 << 10;

/// A disk in memory that tracks which chunks hold data, as an image's clusters do.
struct MemDisk {
    bytes: Mutex<Vec<u8>>,
    /// Per chunk: holds data (written since the start or the last discard of all of it).
    data: Mutex<Vec<bool>>,
    read_only: bool,
    discards: Mutex<Vec<(u64, u64)>>,
    flushes: AtomicUsize,
}

impl MemDisk {
    fn new(size: u64, read_only: bool) -> Arc<MemDisk> {
        Arc::new(MemDisk {
            bytes: Mutex::new(vec![0; size as usize]),
            data: Mutex::new(vec![false; size.div_ceil(CHUNK) as usize]),
            read_only,
            discards: Mutex::new(Vec::new()),
            flushes: AtomicUsize::new(0),
        })
    }

    fn range_error(&self) -> Error {
        Error::new(
            std::path::Path::new("mem"),
            std::io::Error::from_raw_os_error(libc::EINVAL),
        )
    }
}

impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        self.bytes.lock().len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let bytes = self.bytes.lock();
        let range = offset as usize..offset as usize + buf.len();
        buf.copy_from_slice(bytes.get(range).ok_or_else(|| self.range_error())?);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut bytes = self.bytes.lock();
        let range = offset as usize..offset as usize + data.len();
        bytes
            .get_mut(range)
            .ok_or_else(|| self.range_error())?
            .copy_from_slice(data);
        let end = offset + data.len() as u64;
        for chunk in offset / CHUNK..end.div_ceil(CHUNK) {
            self.data.lock()[chunk as usize] = true;
        }
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn allocated_bytes(&self) -> Result<u64> {
        Ok(self.data.lock().iter().filter(|&&d| d).count() as u64 * CHUNK)
    }

    fn seek(&self, offset: u64, want_data: bool) -> Result<Option<u64>> {
        let data = self.data.lock();
        let size = self.size();
        let found = (offset / CHUNK..size.div_ceil(CHUNK))
            .find(|&c| data[c as usize] == want_data)
            .map(|c| (c * CHUNK).max(offset));
        Ok(match (found, want_data) {
            (None, false) => Some(size),
            (found, _) => found,
        })
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.discards.lock().push((offset, len));
        self.bytes.lock()[offset as usize..(offset + len) as usize].fill(0);
        let whole = offset.div_ceil(CHUNK)..(offset + len) / CHUNK;
        for chunk in whole {
            self.data.lock()[chunk as usize] = false;
        }
        Ok(())
    }
}

fn fs_over(disk: &Arc<MemDisk>) -> QcowFs {
    QcowFs::new(disk.clone(), 1000, 1000)
}

/// Call a request that answers through `Done` and wait for the answer (partition writes answer
/// from the partition writer's thread).
fn answer<T: Send + 'static>(request: impl FnOnce(Done<T>)) -> std::result::Result<T, Errno> {
    let (tx, rx) = mpsc::channel();
    request(Box::new(move |r| {
        let _ = tx.send(r);
    }));
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the request was answered")
}

/// The names readdir gives from `offset` on, `per_reply` entries at a time, as the kernel asks
/// again from the offset of the last entry it took.
fn listing(fs: &QcowFs, dir: INodeNo, per_reply: usize) -> Vec<String> {
    let mut names = Vec::new();
    let mut offset = 0;
    loop {
        let mut reply = Vec::new();
        fs.readdir(dir, offset, |_, next, _, name| {
            reply.push((next, name.to_string()));
            reply.len() == per_reply
        })
        .unwrap();
        let Some(&(next, _)) = reply.last() else {
            return names;
        };
        names.extend(reply.into_iter().map(|(_, n)| n));
        offset = next;
    }
}

/// An MBR with one Linux partition of `sectors` sectors at sector `start`.
fn mbr(start: u32, sectors: u32) -> Vec<u8> {
    let mut sector = vec![0u8; 512];
    let entry = &mut sector[446..462];
    entry[4] = 0x83;
    entry[8..12].copy_from_slice(&start.to_le_bytes());
    entry[12..16].copy_from_slice(&sectors.to_le_bytes());
    sector[510] = 0x55;
    sector[511] = 0xaa;
    sector
}

#[test]
fn lookup_finds_the_disk_and_nothing_else_by_name() {
    let disk = MemDisk::new(4 * MIB, false);
    let fs = fs_over(&disk);
    let (attr, _) = fs.lookup(ROOT, OsStr::new("disk")).unwrap();
    assert_eq!((attr.ino, attr.size, attr.perm), (DISK, 4 * MIB, 0o600));
    assert_eq!(
        (attr.uid, attr.gid, attr.kind),
        (1000, 1000, FileType::RegularFile)
    );
    for (parent, name) in [
        (ROOT, OsStr::new("disk2")),
        (ROOT, OsStr::new("snapshots")),  // no snapshots: no folder
        (ROOT, OsStr::new("disk-part1")), // no partition table
        (DISK, OsStr::new("disk")),
    ] {
        assert_eq!(
            fs.lookup(parent, name).unwrap_err(),
            Errno::ENOENT,
            "{name:?}"
        );
    }
    use std::os::unix::ffi::OsStrExt;
    let not_utf8 = OsStr::from_bytes(b"di\xffsk");
    assert_eq!(fs.lookup(ROOT, not_utf8).unwrap_err(), Errno::ENOENT);
    assert_eq!(fs.getattr(INodeNo(77)).unwrap_err(), Errno::ENOENT);
}

#[test]
fn readdir_resumes_at_any_offset_without_repeating_or_skipping() {
    let disk = MemDisk::new(4 * MIB, false);
    let snap: Arc<dyn BlockDevice> = MemDisk::new(MIB, true);
    let fs = fs_over(&disk).with_snapshots(vec![
        ("a/b".into(), "1".into(), snap.clone()),
        ("same".into(), "2".into(), snap.clone()),
        ("same".into(), "3".into(), snap),
    ]);
    let all = listing(&fs, ROOT, usize::MAX);
    assert_eq!(all, [".", "..", "disk", "snapshots"]);
    for per_reply in 1..=3 {
        assert_eq!(listing(&fs, ROOT, per_reply), all, "{per_reply} per reply");
    }
    // A '/' in a snapshot name becomes '_'; names that repeat get their id.
    assert_eq!(
        listing(&fs, SNAPSHOT_DIR, 2),
        [".", "..", "a_b", "same@2", "same@3"]
    );
    let (attr, _) = fs.lookup(SNAPSHOT_DIR, OsStr::new("same@3")).unwrap();
    assert_eq!((attr.size, attr.perm), (MIB, 0o400));
    // Past the end: nothing; a file is no folder.
    let mut called = false;
    fs.readdir(ROOT, 99, |_, _, _, _| {
        called = true;
        false
    })
    .unwrap();
    assert!(!called);
    assert_eq!(
        fs.readdir(DISK, 0, |_, _, _, _| false).unwrap_err(),
        Errno::ENOTDIR
    );
}

#[test]
fn open_keeps_the_disk_cache_and_refuses_writes_to_read_only_files() {
    let disk = MemDisk::new(4 * MIB, false);
    let fs = fs_over(&disk);
    assert_eq!(
        fs.open(DISK, libc::O_RDWR).unwrap(),
        FopenFlags::FOPEN_KEEP_CACHE
    );
    assert_eq!(fs.open(ROOT, libc::O_RDONLY).unwrap_err(), Errno::EISDIR);
    let ro = MemDisk::new(4 * MIB, true);
    let fs = fs_over(&ro);
    assert!(fs.open(DISK, libc::O_RDONLY).is_ok());
    for flags in [libc::O_WRONLY, libc::O_RDWR] {
        assert_eq!(fs.open(DISK, flags).unwrap_err(), Errno::EROFS);
    }
    assert_eq!(fs.getattr(DISK).unwrap().0.perm, 0o400);
    assert_eq!(fs.getattr(ROOT).unwrap().0.perm, 0o555);
    assert_eq!(
        answer(|done| fs.write(DISK, 0, &[1], done)).unwrap_err(),
        Errno::EROFS
    );
}

#[test]
fn reads_and_writes_stop_at_the_end_of_the_disk_and_setattr_keeps_the_size() {
    let disk = MemDisk::new(MIB, false);
    let fs = fs_over(&disk);
    assert_eq!(
        answer(|done| fs.write(DISK, MIB - 3, &[7; 10], done)),
        Ok(3)
    );
    assert_eq!(
        answer(|done| fs.write(DISK, MIB, &[7; 10], done)).unwrap_err(),
        Errno::ENOSPC
    );
    let mut buf = [0u8; 10];
    assert_eq!(fs.read(DISK, MIB - 3, &mut buf).unwrap(), 3);
    assert_eq!(buf[..3], [7, 7, 7]);
    assert_eq!(fs.read(DISK, MIB + 5, &mut buf).unwrap(), 0);
    assert!(fs.setattr(DISK, Some(MIB)).is_ok());
    assert!(fs.setattr(DISK, None).is_ok());
    assert_eq!(fs.setattr(DISK, Some(2 * MIB)).unwrap_err(), Errno::EPERM);
    fs.flush(DISK).unwrap();
    assert_eq!(disk.flushes.load(Ordering::SeqCst), 1);
    // st_blocks follows what the device holds.
    assert_eq!(fs.getattr(DISK).unwrap().0.blocks, CHUNK / 512);
}

#[test]
fn fallocate_discards_punched_and_zeroed_ranges_and_accepts_preallocation_inside() {
    let disk = MemDisk::new(MIB, false);
    let fs = fs_over(&disk);
    let keep = libc::FALLOC_FL_KEEP_SIZE;
    let ask = |offset: u64, len: u64, mode: i32| {
        answer(|done| fs.fallocate(DISK, offset, len, mode, done))
    };
    assert_eq!(ask(4096, 8192, libc::FALLOC_FL_PUNCH_HOLE | keep), Ok(()));
    assert_eq!(ask(0, 512, libc::FALLOC_FL_ZERO_RANGE), Ok(()));
    assert_eq!(ask(0, 512, libc::FALLOC_FL_ZERO_RANGE | keep), Ok(()));
    // Cut at the end of the disk; a range wholly past it discards nothing.
    assert_eq!(
        ask(MIB - 512, 4096, libc::FALLOC_FL_PUNCH_HOLE | keep),
        Ok(())
    );
    assert_eq!(
        ask(2 * MIB, 4096, libc::FALLOC_FL_PUNCH_HOLE | keep),
        Ok(())
    );
    assert_eq!(
        *disk.discards.lock(),
        [(4096, 8192), (0, 512), (0, 512), (MIB - 512, 512)]
    );
    // Preallocation: every byte exists; growing the file is refused.
    assert_eq!(ask(0, MIB, 0), Ok(()));
    assert_eq!(ask(0, 2 * MIB, keep), Ok(()));
    assert_eq!(ask(0, 2 * MIB, 0).unwrap_err(), Errno::EFBIG);
    // Punching without keeping the size, collapsing, inserting: not a disk's to do.
    for mode in [
        libc::FALLOC_FL_PUNCH_HOLE,
        libc::FALLOC_FL_COLLAPSE_RANGE,
        libc::FALLOC_FL_INSERT_RANGE,
    ] {
        assert_eq!(
            ask(0, 4096, mode).unwrap_err(),
            Errno::EOPNOTSUPP,
            "{mode:#x}"
        );
    }
    assert_eq!(ask(u64::MAX, 2, keep).unwrap_err(), Errno::EINVAL);
    assert_eq!(disk.discards.lock().len(), 4, "nothing else was discarded");
    let ro = MemDisk::new(MIB, true);
    let fs = fs_over(&ro);
    let punch = libc::FALLOC_FL_PUNCH_HOLE | keep;
    assert_eq!(
        answer(|done| fs.fallocate(DISK, 0, 4096, punch, done)).unwrap_err(),
        Errno::EROFS
    );
}

#[test]
fn lseek_finds_data_and_holes_and_refuses_what_lies_beyond() {
    let disk = MemDisk::new(MIB, false);
    let fs = fs_over(&disk);
    disk.write_at(3 * CHUNK + 10, &[1; 10]).unwrap();
    let size = MIB as i64;
    let c = CHUNK as i64;
    assert_eq!(fs.lseek(DISK, 0, libc::SEEK_DATA), Ok(3 * c));
    assert_eq!(fs.lseek(DISK, 3 * c + 5, libc::SEEK_DATA), Ok(3 * c + 5));
    assert_eq!(fs.lseek(DISK, 3 * c, libc::SEEK_HOLE), Ok(4 * c));
    assert_eq!(fs.lseek(DISK, 4 * c, libc::SEEK_DATA), Err(Errno::ENXIO));
    assert_eq!(fs.lseek(DISK, size - 1, libc::SEEK_HOLE), Ok(size - 1));
    for whence in [libc::SEEK_DATA, libc::SEEK_HOLE] {
        assert_eq!(fs.lseek(DISK, size, whence), Err(Errno::ENXIO));
    }
    assert_eq!(fs.lseek(DISK, 5, libc::SEEK_SET), Ok(5));
    assert_eq!(fs.lseek(DISK, 5, libc::SEEK_END), Ok(size));
    assert_eq!(fs.lseek(DISK, -1, libc::SEEK_SET), Err(Errno::EINVAL));
    assert_eq!(fs.lseek(DISK, 0, 99), Err(Errno::EINVAL));
    assert_eq!(fs.lseek(ROOT, 0, libc::SEEK_SET), Err(Errno::EINVAL));
}

#[test]
fn partition_files_appear_after_a_partition_table_is_written_and_go_with_it() {
    let disk = MemDisk::new(4 * MIB, false);
    let fs = fs_over(&disk);
    assert_eq!(listing(&fs, ROOT, usize::MAX), [".", "..", "disk"]);
    // One partition of 1 MiB at 1 MiB, written through `disk` as a partitioning tool would.
    assert_eq!(
        answer(|done| fs.write(DISK, 0, &mbr(2048, 2048), done)),
        Ok(512)
    );
    assert_eq!(
        listing(&fs, ROOT, usize::MAX),
        [".", "..", "disk", "disk-part1"]
    );
    let (attr, _) = fs.lookup(ROOT, OsStr::new("disk-part1")).unwrap();
    assert_eq!(attr.size, MIB);
    let part = attr.ino;
    assert_eq!(
        fs.open(part, libc::O_RDWR).unwrap(),
        FopenFlags::FOPEN_DIRECT_IO
    );
    // A write through the partition file lands at its offset on the disk, cut at its end.
    assert_eq!(answer(|done| fs.write(part, MIB - 2, &[9; 4], done)), Ok(2));
    assert_eq!(
        answer(|done| fs.write(part, MIB, &[9; 4], done)).unwrap_err(),
        Errno::ENOSPC
    );
    let mut on_disk = [0u8; 4];
    fs.read(DISK, 2 * MIB - 2, &mut on_disk).unwrap();
    assert_eq!(on_disk, [9, 9, 0, 0]);
    let mut through = [0u8; 2];
    assert_eq!(fs.read(part, MIB - 2, &mut through).unwrap(), 2);
    assert_eq!(through, [9, 9]);
    // A discard through the partition file is one of the disk's, at the partition's offset.
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    assert_eq!(
        answer(|done| fs.fallocate(part, 0, 4096, punch, done)),
        Ok(())
    );
    assert_eq!(disk.discards.lock().last(), Some(&(MIB, 4096)));
    // The table wiped (a discard of its sector): the file is gone.
    assert_eq!(
        answer(|done| fs.fallocate(DISK, 0, 512, punch, done)),
        Ok(())
    );
    assert_eq!(listing(&fs, ROOT, usize::MAX), [".", "..", "disk"]);
    assert_eq!(fs.getattr(part).unwrap_err(), Errno::ENOENT);
    assert_eq!(
        answer(|done| fs.write(part, 0, &[1], done)).unwrap_err(),
        Errno::EISDIR
    );
}
