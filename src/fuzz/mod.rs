//! Entry points for fuzzing (cargo-fuzz targets and the randomized test in tests/it/fuzz_images.rs): take
//! arbitrary bytes as an image file and exercise open, reads and a write through every layer. Any
//! outcome is fine except a panic, a hang or an allocation sized by the input. `fields` edits named
//! fields of seed images for the structure-aware target.

pub mod fields;
mod input;
mod write_oracle;

pub use input::{BACKING_NAME, MAX_LUKS_ITERATIONS, PASSPHRASE};
pub use write_oracle::{check_write, check_write_at, Misplaced, WriteVerdict};

use std::path::Path;

use crate::disk::views::SnapshotView;
use crate::disk::BlockDevice;
use crate::error::Result;
use input::open_disk;

/// Bytes read at each probed offset.
const PROBE: usize = 64 << 10;

/// Open `data` as an image (read-only), read its start, end and a few places in between, and the
/// same of the first internal snapshots.
pub fn read_image(dir: &Path, data: &[u8]) -> Result<()> {
    let (_file, disk) = open_disk(dir, data, false)?;
    let mut result = probe(&disk);
    let chain = disk.shared_chain();
    for snapshot in chain.image().snapshots().iter().take(MAX_SNAPSHOT_VIEWS) {
        let view = SnapshotView::new(chain.clone(), snapshot).and_then(|v| probe(&v));
        result = result.and(view);
    }
    result
}

/// Snapshot views read per input.
const MAX_SNAPSHOT_VIEWS: usize = 4;

/// Read the start, end and a few places in between of a device.
fn probe(device: &dyn BlockDevice) -> Result<()> {
    let size = device.size();
    let mut buf = vec![0u8; PROBE];
    let mut result = Ok(());
    for at in [0, size / 3, size / 2, size.saturating_sub(PROBE as u64)] {
        let len = (size - at.min(size)).min(PROBE as u64) as usize;
        if let Err(e) = device.read_at(at, &mut buf[..len]) {
            result = Err(e);
        }
    }
    result
}

/// Open `data` read-write, write a few blocks, flush. Errors are expected; panics are bugs.
pub fn write_image(dir: &Path, data: &[u8]) -> Result<()> {
    let (_file, disk) = open_disk(dir, data, true)?;
    let size = disk.size();
    let block = vec![0x5au8; 4096.min(size as usize)];
    for at in [0, size / 2, size.saturating_sub(block.len() as u64)] {
        disk.write_at(at & !511, &block)?;
    }
    disk.flush()
}

/// Apply `edits` to a copy of `seed`, then run the same reads and write as `read_image` and
/// `write_image` (the structure-aware fuzz target and its stable counterpart).
pub fn edited_image(dir: &Path, seed: &[u8], edits: &[fields::Edit]) -> Result<()> {
    let data = fields::edited(seed, edits);
    let read = read_image(dir, &data);
    let write = write_image(dir, &data);
    read.and(write)
}
