//! The library's disk layer opened in-process (no FUSE, no daemon), for tests that drive it from
//! several threads at once and then hand the image to qemu-img.

use qcowfs::chain::{Chain, KeyRing, OpenOptions};
use qcowfs::disk::{Disk, DiskOptions};

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

/// `image`'s chain as a [`Disk`] with a cache of `cache_size` bytes, read-write when `writable`.
pub fn open_disk(image: &Image, writable: bool, cache_size: u64) -> Disk {
    let chain = Chain::open(
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
    .unwrap_or_else(|e| panic!("open {}: {e}", image.path.display()));
    Disk::new(
        chain,
        DiskOptions {
            cache_size,
            read_only: !writable,
        },
    )
}
