//! The library's disk layer opened in-process (no FUSE, no daemon), for tests that drive it from
//! several threads at once and then hand the image to qemu-img.

use qcowfs::chain::{Chain, KeyRing, OpenOptions};
use qcowfs::disk::{Disk, DiskOptions};
use qcowfs::Problem;
use std::time::{Duration, Instant};

use super::image::Image;

/// The passphrases qemu needs for `image`, as qcowfs takes them: the first one of its chain for
/// every encrypted layer (the tests that open disks in-process use one passphrase per chain).
pub fn keys_of(image: &Image) -> KeyRing {
    KeyRing {
        default: image
            .secrets
            .iter()
            .flatten()
            .next()
            .map(|p| zeroize::Zeroizing::new(p.as_bytes().to_vec())),
        per_layer: Vec::new(),
    }
}

/// How long a reopen waits for a lock the test's own last open still holds in a child process.
const RELOCK_WAIT: Duration = Duration::from_secs(10);

/// `image`'s chain as a [`Disk`] with a cache of `cache_size` bytes, read-write when `writable`.
///
/// Opened right after a test dropped its last open of the image, the lock may still be held: the
/// image locks are open-file-description locks, and a process another test's thread is forking
/// holds a copy of every descriptor until it execs. So a lock refusal is retried, briefly.
pub fn open_disk(image: &Image, writable: bool, cache_size: u64) -> Disk {
    let open = || {
        Chain::open(
            &image.path,
            &keys_of(image),
            OpenOptions {
                writable,
                force_share: false,
                without_keys: false,
                keep_rejected_keys: false,
                ..Default::default()
            },
        )
    };
    let start = Instant::now();
    let chain = loop {
        match open() {
            Err(e) if matches!(e.problem, Problem::Locked(_)) && start.elapsed() < RELOCK_WAIT => {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => break r.unwrap_or_else(|e| panic!("open {}: {e}", image.path.display())),
        }
    };
    Disk::new(
        chain,
        DiskOptions {
            cache_size,
            read_only: !writable,
        },
    )
}
