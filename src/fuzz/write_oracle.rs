//! The write oracle for fuzzing: a write through a damaged image either is refused, or changes
//! exactly the bytes it wrote. Unlike `write_image`, which only asks for no panic, this catches a
//! write that lands somewhere else (an L2 entry that reads refuse but a write trusted: issue 22).
//!
//! The input is an image and a write placed by its bytes. The guest is read before (a few
//! windows, so memory stays bounded whatever the virtual size), the write is made and flushed on
//! a read-write open, and a fresh read-only open reads the windows again: every byte that read
//! before must read the same, but for the written range, which must read as written.

use std::path::Path;

use super::input::{open_path, ready, temp_image};
use crate::disk::BlockDevice;
use crate::error::Result;

/// Bytes per window read before and after.
const WINDOW: u64 = 128 << 10;
/// The write is at most this long.
const MAX_WRITE: u64 = 64 << 10;

/// What the oracle saw.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteVerdict {
    /// The image did not open, or the write or its flush was refused: nothing to judge.
    Refused,
    /// The write was stored and changed exactly its bytes.
    Exact,
}

/// A write that changed bytes outside its range, or did not store its own: a bug.
#[derive(Debug)]
pub struct Misplaced {
    pub write_at: u64,
    pub write_len: u64,
    pub offset: u64,
    pub expected: u8,
    pub found: u8,
}

impl std::fmt::Display for Misplaced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a write of {} bytes at {:#x} left {:#04x} at guest offset {:#x}, expected {:#04x}",
            self.write_len, self.write_at, self.found, self.offset, self.expected
        )
    }
}

/// Where the write goes and what it writes, from the input's last 8 bytes (the image is the rest):
/// sector aligned or not, inside the disk.
fn placement(size: u64, tail: &[u8]) -> (u64, Vec<u8>) {
    let mut seed = [0u8; 8];
    seed[..tail.len()].copy_from_slice(tail);
    let x = u64::from_le_bytes(seed);
    let len = (1 + (x >> 40) % MAX_WRITE).min(size);
    let mut at = (x % size.max(1)).min(size - len);
    if x & (1 << 63) != 0 {
        at &= !511;
    }
    let fill = 0xa5 ^ (x >> 32) as u8;
    (at, vec![fill; len as usize])
}

/// Run the oracle on `input` (an image, then 8 bytes placing the write) in `dir`.
pub fn check_write(dir: &Path, input: &[u8]) -> std::result::Result<WriteVerdict, Misplaced> {
    let split = input.len().saturating_sub(8);
    let (image, tail) = input.split_at(split);
    check_write_at(dir, image, &|size| placement(size, tail))
}

/// The oracle with the write chosen by `place` from the disk's size: (offset, bytes, all one
/// value).
pub fn check_write_at(
    dir: &Path,
    image: &[u8],
    place: &dyn Fn(u64) -> (u64, Vec<u8>),
) -> std::result::Result<WriteVerdict, Misplaced> {
    match judge(dir, image, place) {
        Ok(verdict) => verdict,
        Err(_) => Ok(WriteVerdict::Refused),
    }
}

fn judge(
    dir: &Path,
    image: &[u8],
    place: &dyn Fn(u64) -> (u64, Vec<u8>),
) -> Result<std::result::Result<WriteVerdict, Misplaced>> {
    // One file for all three opens: the write must be seen by the read after it.
    ready(dir, image)?;
    let file = temp_image(dir, image)?;
    let before_disk = open_path(&file.0, false)?;
    let size = before_disk.size();
    if size == 0 {
        return Ok(Ok(WriteVerdict::Refused));
    }
    let (at, data) = place(size);
    if data.is_empty() || at + data.len() as u64 > size {
        return Ok(Ok(WriteVerdict::Refused));
    }
    let windows = windows(size, at, data.len() as u64);
    let before: Vec<Option<Vec<u8>>> = windows
        .iter()
        .map(|&(start, len)| read(&before_disk, start, len))
        .collect();
    drop(before_disk);
    {
        let disk = open_path(&file.0, true)?;
        if disk.write_at(at, &data).is_err() || disk.flush().is_err() {
            return Ok(Ok(WriteVerdict::Refused));
        }
    }
    let after_disk = open_path(&file.0, false)?;
    let end = at + data.len() as u64;
    for (&(start, len), old) in windows.iter().zip(&before) {
        let Some(new) = read(&after_disk, start, len) else {
            continue; // unreadable afterwards: the write's own range, say, in a damaged cluster
        };
        for (i, &found) in new.iter().enumerate() {
            let offset = start + i as u64;
            let expected = match (offset >= at && offset < end, old) {
                (true, _) => data[0],
                (false, Some(old)) => old[i],
                (false, None) => continue, // nothing read before to compare with
            };
            if found != expected {
                return Ok(Err(Misplaced {
                    write_at: at,
                    write_len: data.len() as u64,
                    offset,
                    expected,
                    found,
                }));
            }
        }
    }
    Ok(Ok(WriteVerdict::Exact))
}

/// The windows compared: the disk's start and end, the written range with a margin, and the
/// middle; each clipped to the disk.
fn windows(size: u64, at: u64, len: u64) -> Vec<(u64, u64)> {
    let around = at.saturating_sub(WINDOW);
    let mut out = Vec::new();
    for (start, want) in [
        (0, WINDOW),
        (around, len + 2 * WINDOW),
        (size / 2, WINDOW),
        (size.saturating_sub(WINDOW), WINDOW),
    ] {
        let start = start.min(size);
        let len = want.min(size - start);
        if len > 0 {
            out.push((start, len));
        }
    }
    out
}

fn read(disk: &dyn BlockDevice, start: u64, len: u64) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    disk.read_at(start, &mut buf).ok().map(|_| buf)
}
