//! The fuzz inputs as files: each input written to a temporary image beside the backing file the
//! overlay seed names, opened with the fuzz passphrase and no locks; inputs slow by design refused.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use zeroize::Zeroizing;

use super::fields;
use crate::chain::{Chain, KeyRing, OpenOptions};
use crate::disk::{Disk, DiskOptions};
use crate::error::{Error, Result};

/// The passphrase fuzz seeds are made with.
pub const PASSPHRASE: &[u8] = b"fuzz";
/// The raw backing file the overlay seed of scripts/fuzz-seeds.sh names; made in the input's directory.
pub const BACKING_NAME: &str = "fuzz-base.raw";
const BACKING_LEN: usize = 1 << 20;
/// PBKDF2 iterations an input may ask for (the LUKS seed, iter-time=10, needs about 100 000 on
/// this machine); a larger count is slow by design, not a bug, and only times the fuzzer out: a
/// million took over 10 s on a busy machine.
pub const MAX_LUKS_ITERATIONS: u64 = 250_000;

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A temporary file holding one input, removed on drop.
pub(super) struct TempImage(pub(super) PathBuf);

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub(super) fn temp_image(dir: &Path, data: &[u8]) -> Result<TempImage> {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("fuzz-{}-{n}.qcow2", std::process::id()));
    std::fs::write(&path, data).map_err(|e| Error::new(&path, e))?;
    Ok(TempImage(path))
}

/// Open `data` as an image, with the fuzz passphrase and no locks.
pub(super) fn open_disk(dir: &Path, data: &[u8], writable: bool) -> Result<(TempImage, Disk)> {
    ready(dir, data)?;
    let file = temp_image(dir, data)?;
    let disk = open_path(&file.0, writable)?;
    Ok((file, disk))
}

/// Refuse inputs that are slow by design, and make the backing file the overlay seed names.
pub(super) fn ready(dir: &Path, data: &[u8]) -> Result<()> {
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
pub(super) fn open_path(path: &Path, writable: bool) -> Result<Disk> {
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
