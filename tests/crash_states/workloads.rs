//! The recorded workloads: images made by qemu-img, then driven through qcowfs's write path.
//! Each covers a way the write path changes metadata: allocation with copy-on-write from a backing
//! file, writes in place, discard, clusters and L2 tables shared with a snapshot, compressed
//! clusters overwritten, growth that moves the refcount table, seal, and both ciphers.

use std::path::Path;

use crate::common::{
    compressible_bytes, convert_compressed, qcow2, random_bytes, raw_from_bytes, Rng, MIB,
};
use crate::record::{record, record_seal, Recording, Workload};

pub const PASS: &str = "crash passphrase";

/// A workload's name, its share of the crash states, and how to record it.
pub struct Spec {
    pub name: &'static str,
    pub weight: u64,
    pub run: fn(&Path, u64) -> Recording,
}

pub const ALL: &[Spec] = &[
    Spec {
        name: "random-plain",
        weight: 3,
        run: random_plain,
    },
    Spec {
        name: "random-v2-4k",
        weight: 2,
        run: random_v2_4k,
    },
    Spec {
        name: "random-aes",
        weight: 2,
        run: random_aes,
    },
    Spec {
        name: "random-luks",
        weight: 2,
        run: random_luks,
    },
    Spec {
        name: "aes-overlay-over-raw",
        weight: 3,
        run: aes_overlay,
    },
    Spec {
        name: "extended-l2-overlay",
        weight: 2,
        run: extended_l2_overlay,
    },
    Spec {
        name: "discard",
        weight: 2,
        run: discard,
    },
    Spec {
        name: "snapshot-shared",
        weight: 3,
        run: snapshot_shared,
    },
    Spec {
        name: "compressed-overwrite",
        weight: 2,
        run: compressed_overwrite,
    },
    Spec {
        name: "seal-aes-over-raw",
        weight: 2,
        run: seal_aes,
    },
    Spec {
        name: "growth-512b-1bit-refcounts",
        weight: 1,
        run: growth,
    },
];

/// Random writes and fsyncs: lengths 1 B to 192 KiB, most sector-aligned, an fsync every ten or
/// so; between them the cache's write-back stores batches without a final barrier.
fn random_ops(w: &mut Workload, rng: &mut Rng, count: usize) {
    let size = w.size();
    for _ in 0..count {
        let len = match rng.below(4) {
            0 => rng.range(1, 4096),
            1 => rng.range(1, 64) * 512,
            _ => rng.range(1, 384) * 512,
        }
        .min(size);
        let mut offset = rng.below(size - len + 1);
        if rng.below(4) != 0 {
            offset = offset / 512 * 512;
        }
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data);
        w.write(offset, data);
        if rng.below(10) == 0 {
            w.fsync();
        }
    }
}

/// A small cache: write-back runs during the workload too, not only at fsync.
const CACHE: u64 = 2 * MIB;

fn random_plain(dir: &Path, seed: u64) -> Recording {
    let image = qcow2(dir.join("random-plain.qcow2"), 32 * MIB).create();
    image.scatter_random(32 * MIB, 40, 256 << 10, seed);
    let mut rng = Rng::new(seed);
    record("random-plain", image, dir, CACHE, |w| {
        random_ops(w, &mut rng, 80)
    })
}

fn random_v2_4k(dir: &Path, seed: u64) -> Recording {
    let image = qcow2(dir.join("random-v2.qcow2"), 16 * MIB)
        .v2()
        .cluster_size(4096)
        .create();
    image.scatter_random(16 * MIB, 30, 64 << 10, seed);
    let mut rng = Rng::new(seed + 1);
    record("random-v2-4k", image, dir, CACHE, |w| {
        random_ops(w, &mut rng, 60)
    })
}

fn random_aes(dir: &Path, seed: u64) -> Recording {
    let image = qcow2(dir.join("random-aes.qcow2"), 16 * MIB)
        .cluster_size(4096)
        .aes(PASS)
        .create();
    image.scatter_random(16 * MIB, 30, 64 << 10, seed);
    let mut rng = Rng::new(seed + 2);
    record("random-aes", image, dir, CACHE, |w| {
        random_ops(w, &mut rng, 60)
    })
}

fn random_luks(dir: &Path, seed: u64) -> Recording {
    let image = qcow2(dir.join("random-luks.qcow2"), 16 * MIB)
        .luks(PASS)
        .create();
    image.scatter_random(16 * MIB, 30, 128 << 10, seed);
    let mut rng = Rng::new(seed + 3);
    record("random-luks", image, dir, CACHE, |w| {
        random_ops(w, &mut rng, 60)
    })
}

/// The nova layout: partial writes copy the rest of each cluster up from the plaintext base.
fn aes_overlay(dir: &Path, seed: u64) -> Recording {
    let base = raw_from_bytes(dir.join("aes-base.raw"), &random_bytes(16 << 20, seed));
    let image = qcow2(dir.join("aes-overlay.qcow2"), 16 * MIB)
        .aes(PASS)
        .backing(&base)
        .create();
    let mut rng = Rng::new(seed + 4);
    record("aes-overlay-over-raw", image, dir, CACHE, |w| {
        random_ops(w, &mut rng, 70)
    })
}

fn extended_l2_overlay(dir: &Path, seed: u64) -> Recording {
    let base = raw_from_bytes(dir.join("l2-base.raw"), &random_bytes(16 << 20, seed + 5));
    let image = qcow2(dir.join("extended-l2.qcow2"), 16 * MIB)
        .extended_l2()
        .backing(&base)
        .create();
    let mut rng = Rng::new(seed + 5);
    record("extended-l2-overlay", image, dir, CACHE, |w| {
        random_ops(w, &mut rng, 60)
    })
}

/// Discards of whole clusters (their data freed) and of ragged ranges, between writes.
fn discard(dir: &Path, seed: u64) -> Recording {
    let image = qcow2(dir.join("discard.qcow2"), 16 * MIB).create();
    image.write_random(0, 16 << 20, seed);
    let mut rng = Rng::new(seed + 6);
    record("discard", image, dir, CACHE, |w| {
        for _ in 0..30 {
            let len = rng.range(1, 1024) * 512;
            let offset = rng.below(16 * MIB - len + 1) / 512 * 512;
            w.discard(offset, len);
            random_ops(w, &mut rng, 2);
            if rng.below(3) == 0 {
                w.fsync();
            }
        }
    })
}

/// Every cluster and L2 table is shared with an internal snapshot (refcount 2): writes copy them.
fn snapshot_shared(dir: &Path, seed: u64) -> Recording {
    let image = qcow2(dir.join("snapshot.qcow2"), 16 * MIB).create();
    image.write_random(0, 16 << 20, seed + 7);
    image.snapshot("before");
    let mut rng = Rng::new(seed + 7);
    record("snapshot-shared", image, dir, CACHE, |w| {
        random_ops(w, &mut rng, 60)
    })
}

/// Partial overwrites of compressed clusters: each is decompressed, merged and stored whole.
fn compressed_overwrite(dir: &Path, seed: u64) -> Recording {
    let src = raw_from_bytes(
        dir.join("compressible.raw"),
        &compressible_bytes(16 << 20, seed + 8),
    );
    let image = convert_compressed(&src, dir.join("compressed.qcow2"), "compat=1.1");
    let mut rng = Rng::new(seed + 8);
    record("compressed-overwrite", image, dir, CACHE, |w| {
        random_ops(w, &mut rng, 60)
    })
}

/// Seal copies the base up into the encrypted overlay, then drops the backing file name. The
/// base's second half is stored zeros, which seal leaves unallocated.
fn seal_aes(dir: &Path, seed: u64) -> Recording {
    let mut bytes = random_bytes(8 << 20, seed + 9);
    bytes[4 << 20..].fill(0);
    let base = raw_from_bytes(dir.join("seal-base.raw"), &bytes);
    let image = qcow2(dir.join("seal.qcow2"), 8 * MIB)
        .cluster_size(16 << 10)
        .aes(PASS)
        .backing(&base)
        .create();
    image.scatter_random(8 * MIB, 20, 64 << 10, seed + 9);
    record_seal("seal-aes-over-raw", image, dir)
}

/// 512-byte clusters with 1-bit refcounts: a refcount block covers 2 MiB and the first refcount
/// table 128 MiB of file, so writing 140 MiB adds hundreds of L2 tables and refcount blocks and
/// moves the refcount table.
fn growth(dir: &Path, seed: u64) -> Recording {
    let image = qcow2(dir.join("growth.qcow2"), 160 * MIB)
        .cluster_size(512)
        .refcount_bits(1)
        .create();
    let before = crate::common::read_be_u64(&image.path, 48);
    let mut rng = Rng::new(seed + 10);
    let recording = record("growth-512b-1bit-refcounts", image, dir, 16 * MIB, |w| {
        let chunk = 2 * MIB;
        for i in 0..70 {
            let mut data = vec![0u8; chunk as usize];
            rng.fill(&mut data);
            w.write(i * chunk, data);
            if i % 8 == 7 {
                w.fsync();
            }
        }
    });
    let after = crate::common::read_be_u64(&recording.image.path, 48);
    assert_ne!(
        before, after,
        "growth: the refcount table did not move: the workload no longer covers that"
    );
    recording
}
