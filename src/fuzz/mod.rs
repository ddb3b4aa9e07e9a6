//! Entry points for fuzzing (cargo-fuzz targets and the randomized test in tests/fuzz_images.rs): take
//! arbitrary bytes as an image file and exercise open, reads and a write through every layer. Any
//! outcome is fine except a panic, a hang or an allocation sized by the input. `fields` edits named
//! fields of seed images for the structure-aware target.

pub mod fields;
mod write_oracle;

pub use write_oracle::{check_write, check_write_at, Misplaced, WriteVerdict};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use zeroize::Zeroizing;

use crate::chain::{Chain, KeyRing, OpenOptions};
use crate::disk::views::SnapshotView;
use crate::disk::{BlockDevice, Disk, DiskOptions};
use crate::error::{Error, Result};

/// The passphrase fuzz seeds are made with.
pub const PASSPHRASE: &[u8] = b"fuzz";
/// Bytes read at each probed offset.
const PROBE: usize = 64 << 10;
/// The raw backing file the overlay seed of scripts/fuzz-seeds.sh names; made in the input's directory.
pub const BACKING_NAME: &str = "fuzz-base.raw";
const BACKING_LEN: usize = 1 << 20;
/// PBKDF2 iterations an input may ask for (the LUKS seed, iter-time=10, needs about 100 000 on
/// this machine); a larger count is slow by design, not a bug, and only times the fuzzer out: a
/// million took over 10 s on a busy machine.
pub const MAX_LUKS_ITERATIONS: u64 = 250_000;

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A temporary file holding one input, removed on drop.
struct TempImage(PathBuf);

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn temp_image(dir: &Path, data: &[u8]) -> Result<TempImage> {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("fuzz-{}-{n}.qcow2", std::process::id()));
    std::fs::write(&path, data).map_err(|e| Error::new(&path, e))?;
    Ok(TempImage(path))
}

/// Open `data` as an image, with the fuzz passphrase and no locks.
fn open_disk(dir: &Path, data: &[u8], writable: bool) -> Result<(TempImage, Disk)> {
    ready(dir, data)?;
    let file = temp_image(dir, data)?;
    let disk = open_path(&file.0, writable)?;
    Ok((file, disk))
}

/// Refuse inputs that are slow by design, and make the backing file the overlay seed names.
fn ready(dir: &Path, data: &[u8]) -> Result<()> {
    if fields::luks_iterations(data) > MAX_LUKS_ITERATIONS {
        return Err(Error::new(
            dir,
            crate::crypto::CryptoError::BadLuksHeader("too many iterations for a fuzz run"),
        ));
    }
    let base = dir.join(BACKING_NAME);
    if !base.exists() {
        let pattern: Vec<u8> = (0..BACKING_LEN).map(|i| (i / 512) as u8).collect();
        std::fs::write(&base, pattern).map_err(|e| Error::new(&base, e))?;
    }
    Ok(())
}

/// Open the image at `path` with the fuzz passphrase and no locks.
fn open_path(path: &Path, writable: bool) -> Result<Disk> {
    let keys = KeyRing {
        default: Some(Zeroizing::new(PASSPHRASE.to_vec())),
        per_layer: Vec::new(),
    };
    let opts = OpenOptions {
        writable,
        force_share: true,
        ..Default::default()
    };
    let chain = Chain::open(path, &keys, opts)?;
    Ok(Disk::new(
        chain,
        DiskOptions {
            cache_size: 8 << 20,
            read_only: !writable,
        },
    ))
}

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
