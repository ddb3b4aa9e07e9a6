//! The FUSE wire format as the io_uring transport sees it: the request header, the per-operation
//! in-structs it decodes and the out-structs it encodes (include/uapi/linux/fuse.h, protocol 7.42).
//! fuser decodes the same records for `/dev/fuse`, but keeps its decoder private, so the few this
//! file system answers are written out here. Integers are in the host's byte order.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileType};

/// `struct fuse_uring_req_header`: the in/out header area, the op's in-struct, `fuse_uring_ent_in_out`.
pub const HEADER_AREA: usize = 128;
pub const OP_AREA: usize = 128;
pub const ENT_IN_OUT: usize = 32;
pub const RING_HEADER_LEN: usize = HEADER_AREA + OP_AREA + ENT_IN_OUT;
/// Where `fuse_uring_ent_in_out.payload_sz` sits in the ring header.
const PAYLOAD_SZ_AT: usize = HEADER_AREA + OP_AREA + 16;

pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const FLUSH: u32 = 25;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FALLOCATE: u32 = 43;
    pub const LSEEK: u32 = 46;
}

/// `FATTR_SIZE` in `fuse_setattr_in.valid`.
const FATTR_SIZE: u32 = 1 << 3;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// `struct fuse_in_header`, as the kernel wrote it into the ring header.
#[derive(Debug, Clone, Copy)]
pub struct InHeader {
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
}

impl InHeader {
    pub fn parse(header: &[u8]) -> InHeader {
        InHeader {
            opcode: u32_at(header, 4),
            unique: u64_at(header, 8),
            nodeid: u64_at(header, 16),
        }
    }
}

/// How many payload bytes the kernel sent with the request (`fuse_uring_ent_in_out.payload_sz`).
pub fn payload_len(header: &[u8]) -> usize {
    u32_at(header, PAYLOAD_SZ_AT) as usize
}

/// Write the answer's `fuse_out_header` and payload size into the ring header.
pub fn set_answer(header: &mut [u8], unique: u64, result: Result<usize, Errno>) {
    let (error, len) = match result {
        Ok(n) => (0i32, n),
        Err(e) => (-e.code(), 0),
    };
    header[0..4].copy_from_slice(&(16 + len as u32).to_ne_bytes());
    header[4..8].copy_from_slice(&error.to_ne_bytes());
    header[8..16].copy_from_slice(&unique.to_ne_bytes());
    header[PAYLOAD_SZ_AT..PAYLOAD_SZ_AT + 4].copy_from_slice(&(len as u32).to_ne_bytes());
}

/// `fuse_read_in` (READ, READDIR): (offset, size).
pub fn read_in(op: &[u8]) -> (u64, u32) {
    (u64_at(op, 8), u32_at(op, 16))
}

/// `fuse_write_in`: (offset, size).
pub fn write_in(op: &[u8]) -> (u64, u32) {
    (u64_at(op, 8), u32_at(op, 16))
}

/// `fuse_open_in.flags`: open(2)'s flags.
pub fn open_in(op: &[u8]) -> i32 {
    u32_at(op, 0) as i32
}

/// `fuse_setattr_in`: the new size, if the request sets one.
pub fn setattr_size(op: &[u8]) -> Option<u64> {
    (u32_at(op, 0) & FATTR_SIZE != 0).then(|| u64_at(op, 16))
}

/// `fuse_lseek_in`: (offset, whence).
pub fn lseek_in(op: &[u8]) -> (i64, i32) {
    (u64_at(op, 8) as i64, u32_at(op, 16) as i32)
}

/// `fuse_fallocate_in`: (offset, length, mode).
pub fn fallocate_in(op: &[u8]) -> (u64, u64, i32) {
    (u64_at(op, 8), u64_at(op, 16), u32_at(op, 24) as i32)
}

/// A LOOKUP's name: the payload up to its terminating NUL.
pub fn name(payload: &[u8]) -> &[u8] {
    payload.split(|&b| b == 0).next().unwrap_or(&[])
}

/// Appends fields in order to an out-struct.
struct Out<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Out<'_> {
    fn u32(&mut self, v: u32) -> &mut Self {
        self.buf[self.at..self.at + 4].copy_from_slice(&v.to_ne_bytes());
        self.at += 4;
        self
    }

    fn u64(&mut self, v: u64) -> &mut Self {
        self.buf[self.at..self.at + 8].copy_from_slice(&v.to_ne_bytes());
        self.at += 8;
        self
    }
}

fn since_epoch(t: SystemTime) -> Duration {
    t.duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// The S_IF* bits of a file type.
fn type_bits(kind: FileType) -> u32 {
    match kind {
        FileType::NamedPipe => libc::S_IFIFO,
        FileType::CharDevice => libc::S_IFCHR,
        FileType::BlockDevice => libc::S_IFBLK,
        FileType::Directory => libc::S_IFDIR,
        FileType::RegularFile => libc::S_IFREG,
        FileType::Symlink => libc::S_IFLNK,
        FileType::Socket => libc::S_IFSOCK,
    }
}

/// `struct fuse_attr`, 88 bytes.
const ATTR_LEN: usize = 88;

fn put_attr(out: &mut Out<'_>, a: &FileAttr) {
    let (at, mt, ct) = (
        since_epoch(a.atime),
        since_epoch(a.mtime),
        since_epoch(a.ctime),
    );
    out.u64(a.ino.0)
        .u64(a.size)
        .u64(a.blocks)
        .u64(at.as_secs())
        .u64(mt.as_secs())
        .u64(ct.as_secs())
        .u32(at.subsec_nanos())
        .u32(mt.subsec_nanos())
        .u32(ct.subsec_nanos())
        .u32(type_bits(a.kind) | u32::from(a.perm))
        .u32(a.nlink)
        .u32(a.uid)
        .u32(a.gid)
        .u32(a.rdev)
        .u32(a.blksize)
        .u32(a.flags);
}

/// `struct fuse_entry_out` (128 bytes) into `buf`; returns its length.
pub fn entry_out(buf: &mut [u8], attr: &FileAttr, ttl: Duration) -> usize {
    let mut out = Out { buf, at: 0 };
    out.u64(attr.ino.0)
        .u64(0) // generation
        .u64(ttl.as_secs())
        .u64(ttl.as_secs())
        .u32(ttl.subsec_nanos())
        .u32(ttl.subsec_nanos());
    put_attr(&mut out, attr);
    debug_assert_eq!(out.at, 40 + ATTR_LEN);
    out.at
}

/// `struct fuse_attr_out` (104 bytes).
pub fn attr_out(buf: &mut [u8], attr: &FileAttr, ttl: Duration) -> usize {
    let mut out = Out { buf, at: 0 };
    out.u64(ttl.as_secs()).u32(ttl.subsec_nanos()).u32(0);
    put_attr(&mut out, attr);
    debug_assert_eq!(out.at, 16 + ATTR_LEN);
    out.at
}

/// `struct fuse_open_out` (16 bytes): file handle 0 and the FOPEN_* flags.
pub fn open_out(buf: &mut [u8], open_flags: u32) -> usize {
    let mut out = Out { buf, at: 0 };
    out.u64(0).u32(open_flags).u32(0);
    out.at
}

/// `struct fuse_write_out` (8 bytes).
pub fn write_out(buf: &mut [u8], written: u32) -> usize {
    let mut out = Out { buf, at: 0 };
    out.u32(written).u32(0);
    out.at
}

/// `struct fuse_lseek_out` (8 bytes).
pub fn lseek_out(buf: &mut [u8], offset: i64) -> usize {
    let mut out = Out { buf, at: 0 };
    out.u64(offset as u64);
    out.at
}

/// `struct fuse_statfs_out` (80 bytes), with the figures fuser's `/dev/fuse` reply gives.
pub fn statfs_out(buf: &mut [u8], blocks: u64, bsize: u32) -> usize {
    let mut out = Out { buf, at: 0 };
    out.u64(blocks).u64(0).u64(0).u64(2).u64(0); // blocks, bfree, bavail, files, ffree
    out.u32(bsize).u32(255).u32(bsize).u32(0); // bsize, namelen, frsize, padding
    for _ in 0..6 {
        out.u32(0); // spare
    }
    debug_assert_eq!(out.at, 80);
    out.at
}

/// Append one `struct fuse_dirent` (padded to 8 bytes) at `at`; None when it does not fit.
pub fn dirent(
    buf: &mut [u8],
    at: usize,
    ino: u64,
    next: u64,
    kind: FileType,
    name: &str,
) -> Option<usize> {
    let len = (24 + name.len()).next_multiple_of(8);
    if at + len > buf.len() {
        return None;
    }
    let mut out = Out {
        buf: &mut buf[at..at + len],
        at: 0,
    };
    out.u64(ino)
        .u64(next)
        .u32(name.len() as u32)
        .u32(type_bits(kind) >> 12);
    buf[at + 24..at + 24 + name.len()].copy_from_slice(name.as_bytes());
    buf[at + 24 + name.len()..at + len].fill(0);
    Some(at + len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fuser::INodeNo;

    fn attr() -> FileAttr {
        let t = UNIX_EPOCH + Duration::new(1_700_000_000, 123);
        FileAttr {
            ino: INodeNo(2),
            size: 1 << 30,
            blocks: 8,
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: FileType::RegularFile,
            perm: 0o600,
            nlink: 1,
            uid: 1000,
            gid: 100,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    #[test]
    fn entry_out_is_128_bytes_with_the_attr_at_40() {
        let mut buf = [0xffu8; 200];
        assert_eq!(
            entry_out(&mut buf, &attr(), Duration::from_millis(1500)),
            128
        );
        assert_eq!(u64_at(&buf, 0), 2); // nodeid
        assert_eq!(u64_at(&buf, 16), 1); // entry_valid seconds
        assert_eq!(u32_at(&buf, 32), 500_000_000); // entry_valid_nsec
        assert_eq!(u64_at(&buf, 40), 2); // attr.ino
        assert_eq!(u64_at(&buf, 48), 1 << 30); // attr.size
        assert_eq!(u64_at(&buf, 64), 1_700_000_000); // atime
        assert_eq!(u32_at(&buf, 40 + 48), 123); // atimensec
        assert_eq!(u32_at(&buf, 40 + 60), libc::S_IFREG | 0o600); // mode
        assert_eq!(u32_at(&buf, 40 + 68), 1000); // uid
        assert_eq!(u32_at(&buf, 40 + 80), 4096); // blksize
    }

    #[test]
    fn attr_out_is_104_bytes() {
        let mut buf = [0u8; 104];
        assert_eq!(attr_out(&mut buf, &attr(), Duration::from_secs(3600)), 104);
        assert_eq!(u64_at(&buf, 0), 3600);
        assert_eq!(u64_at(&buf, 16), 2);
    }

    #[test]
    fn dirents_are_padded_to_eight_bytes_and_stop_when_full() {
        let mut buf = [0xffu8; 72];
        let at = dirent(&mut buf, 0, 2, 1, FileType::RegularFile, "disk").unwrap();
        assert_eq!(at, 32);
        assert_eq!(u32_at(&buf, 16), 4); // namelen
        assert_eq!(u32_at(&buf, 20), libc::DT_REG as u32);
        assert_eq!(&buf[24..32], b"disk\0\0\0\0");
        let at = dirent(&mut buf, at, 1, 2, FileType::Directory, "snapshots").unwrap();
        assert_eq!(at, 72, "24 + 9 bytes, padded to 40");
        assert_eq!(&buf[56..72], b"snapshots\0\0\0\0\0\0\0");
        assert_eq!(dirent(&mut buf, at, 3, 3, FileType::Directory, "x"), None);
    }

    #[test]
    fn answers_set_the_out_header_and_payload_size() {
        let mut header = [0u8; RING_HEADER_LEN];
        set_answer(&mut header, 77, Ok(8));
        assert_eq!(u32_at(&header, 0), 24);
        assert_eq!(u32_at(&header, 4), 0);
        assert_eq!(u64_at(&header, 8), 77);
        assert_eq!(payload_len(&header), 8);
        set_answer(&mut header, 78, Err(Errno::ENOENT));
        assert_eq!(u32_at(&header, 4) as i32, -libc::ENOENT);
        assert_eq!(payload_len(&header), 0);
    }

    #[test]
    fn decodes_the_in_structs_it_answers() {
        let mut op = [0u8; OP_AREA];
        op[8..16].copy_from_slice(&4096u64.to_ne_bytes());
        op[16..20].copy_from_slice(&65536u32.to_ne_bytes());
        assert_eq!(read_in(&op), (4096, 65536));
        assert_eq!(write_in(&op), (4096, 65536));
        // fuse_setattr_in: valid, padding, fh, then size at 16.
        op[0..4].copy_from_slice(&FATTR_SIZE.to_ne_bytes());
        assert_eq!(setattr_size(&op), Some(65536));
        op[0..4].copy_from_slice(&0u32.to_ne_bytes());
        assert_eq!(setattr_size(&op), None);
        assert_eq!(name(b"disk\0junk"), b"disk");
        assert_eq!(name(b""), b"");
    }
}
