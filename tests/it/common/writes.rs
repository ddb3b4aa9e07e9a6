//! Seeded guest writes, the shape random-write tests share: sizes from one byte to 400 KiB, at
//! uniform offsets, near the disk's end or across 64 KiB boundaries, some aligned as a guest file
//! system writes them, filled with a constant (zeros too), random or guest-like bytes.

use super::data::{compressible_bytes, random_bytes, Rng};

const KIB: u64 = 1024;

/// What one guest write puts on the disk; its bytes are regenerated from the seed when needed,
/// so a test that issues thousands of writes does not keep them.
#[derive(Clone, Copy, Debug)]
pub enum Fill {
    Byte(u8),
    Random(u64),
    GuestLike(u64),
}

/// One guest write of `len` bytes at `off`.
#[derive(Clone, Copy, Debug)]
pub struct GuestWrite {
    pub off: u64,
    pub len: u64,
    pub fill: Fill,
}

impl GuestWrite {
    pub fn end(&self) -> u64 {
        self.off + self.len
    }

    pub fn data(&self) -> Vec<u8> {
        match self.fill {
            Fill::Byte(b) => vec![b; self.len as usize],
            Fill::Random(seed) => random_bytes(self.len as usize, seed),
            Fill::GuestLike(seed) => compressible_bytes(self.len as usize, seed),
        }
    }

    /// A seeded write inside a disk of `size` bytes: 1 byte to 400 KiB (tiny, sub-cluster,
    /// multi-cluster); at a uniform offset, near the disk's end, or straddling a 64 KiB boundary;
    /// a quarter each aligned to 4 KiB pages and 512-byte sectors (those may leave the rest of a
    /// cache block unloaded, a path of its own); a constant (zeros a third of the time), or random
    /// bytes (guest-like text when `guest_like`, for encrypted images that are mounted again).
    pub fn random(rng: &mut Rng, size: u64, guest_like: bool) -> GuestWrite {
        let len = match rng.below(4) {
            0 => rng.range(1, 64),
            1 => rng.range(65, 8 * KIB),
            2 => rng.range(8 * KIB + 1, 128 * KIB),
            _ => rng.range(128 * KIB + 1, 400 * KIB),
        }
        .min(size);
        let off = match rng.below(8) {
            0 => size - len - rng.below(4096).min(size - len),
            1 => {
                let boundary = rng.below(size / (64 * KIB) + 1) * 64 * KIB;
                boundary.saturating_sub(rng.below(len)).min(size - len)
            }
            _ => rng.below(size - len + 1),
        };
        let (off, len) = match rng.below(4) {
            0 if size >= 4 * KIB => aligned(off, len, 4 * KIB, size),
            1 if size >= 512 => aligned(off, len, 512, size),
            _ => (off, len),
        };
        let fill = match rng.below(3) {
            0 if rng.below(3) == 0 => Fill::Byte(0),
            0 => Fill::Byte(rng.next_u64() as u8),
            _ if guest_like => Fill::GuestLike(rng.next_u64()),
            _ => Fill::Random(rng.next_u64()),
        };
        GuestWrite { off, len, fill }
    }
}

/// (off, len) rounded down to multiples of `unit` (at least one unit), inside a disk of `size`.
fn aligned(off: u64, len: u64, unit: u64, size: u64) -> (u64, u64) {
    let len = (len / unit * unit).max(unit);
    let off = (off / unit * unit).min((size - len) / unit * unit);
    (off, len)
}
