//! Header surgery for hostile-input tests: patch big-endian fields, truncate, drop extensions.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// qcow2 header extension type of the backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

pub fn read_be_u32(path: &Path, off: u64) -> u32 {
    let mut b = [0u8; 4];
    File::open(path)
        .expect("open image")
        .read_exact_at(&mut b, off)
        .expect("read header field");
    u32::from_be_bytes(b)
}

pub fn read_be_u64(path: &Path, off: u64) -> u64 {
    let mut b = [0u8; 8];
    File::open(path)
        .expect("open image")
        .read_exact_at(&mut b, off)
        .expect("read header field");
    u64::from_be_bytes(b)
}

pub fn patch_bytes(path: &Path, off: u64, bytes: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open image for patching");
    f.write_all_at(bytes, off).expect("patch image");
}

pub fn patch_be_u32(path: &Path, off: u64, v: u32) {
    patch_bytes(path, off, &v.to_be_bytes());
}

pub fn patch_be_u64(path: &Path, off: u64, v: u64) {
    patch_bytes(path, off, &v.to_be_bytes());
}

pub fn truncate_file(path: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open image for truncation")
        .set_len(len)
        .expect("truncate image");
}

/// Removes the header extension of type `ext_type` from a v3 qcow2 header (the later ones move
/// down; the backing name, found by its own offset, stays where it is). Returns whether it was
/// there.
pub fn strip_header_extension(path: &Path, ext_type: u32) -> bool {
    let bytes = fs::read(path).expect("read image");
    let be32 = |o: usize| u32::from_be_bytes(bytes[o..o + 4].try_into().unwrap());
    let version = be32(4);
    let mut off = if version >= 3 { be32(100) as usize } else { 72 };
    let start = off;
    let mut kept = Vec::new();
    let mut found = false;
    loop {
        let (t, len) = (be32(off), be32(off + 4) as usize);
        let total = 8 + len.div_ceil(8) * 8;
        if t == 0 {
            off += 8;
            break;
        }
        if t == ext_type {
            found = true;
        } else {
            kept.extend_from_slice(&bytes[off..off + total]);
        }
        off += total;
    }
    kept.extend_from_slice(&[0u8; 8]);
    kept.resize(off - start, 0);
    patch_bytes(path, start as u64, &kept);
    found
}
