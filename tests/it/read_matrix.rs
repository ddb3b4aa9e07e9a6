//! The read-path matrix: images of every geometry and feature the issue names, built by qemu
//! tools, mounted read-only with qcowfs, and compared byte for byte with `qemu-img convert -O raw`.
//!
//! One table ([`cases`]) names each image: its layers (qcow2 version, cluster size, refcount
//! width, encryption, compression, extended L2, backing name), the writes qemu makes on each, how
//! qcowfs gets the passphrases, and what qemu must say about the image first. One runner
//! ([`reads_every_case_of_the_matrix_as_qemu_does`]) builds and checks every case, a few at a
//! time, each on a thread named after the case; a failure lists every failing case by name.
//! `QCOWFS_READ_MATRIX_CASE=NAME[,NAME]` runs only those cases, `QCOWFS_READ_MATRIX_JOBS=N` sets
//! how many run at once.
//!
//! Each case prints the qemu command lines it ran (shown on failure: the steps to reproduce) and,
//! on a mismatch, the first differing offset.

use crate::common;

use common::*;
use serde_json::Value;
use std::ffi::OsString;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

// Keys of `qcowfs info --json`, in one place so they are easy to fix if the output names them
// differently.
const INFO_VIRTUAL_SIZE: &str = "virtual_size";
const INFO_CLUSTER_SIZE: &str = "cluster_size";
const INFO_ENCRYPTED: &str = "encrypted";
const INFO_LAYERS: &str = "layers";
const INFO_LAYER_PATH: &str = "path";
const INFO_LAYER_FORMAT: &str = "format";
const INFO_LAYER_ENCRYPTED: &str = "encrypted";

const SMALL: u64 = 8 * MIB;
const MEDIUM: u64 = 16 * MIB;

/// Cases run at once unless `QCOWFS_READ_MATRIX_JOBS` says otherwise: most of a case's time is
/// spent waiting for qemu-img, qemu-io and FUSE, so a little more than the cores.
const DEFAULT_JOBS: usize = 3;

// --- the table ----------------------------------------------------------------------------------

/// `qemu-img create -f qcow2` options of one layer (qemu's defaults where `None`/`false`).
#[derive(Clone, Copy, Debug, Default)]
struct Opts {
    v2: bool,
    cluster: Option<u64>,
    refcount_bits: Option<u32>,
    aes: Option<&'static str>,
    extended_l2: bool,
    compression: Option<&'static str>,
}

const V3: Opts = Opts {
    v2: false,
    cluster: None,
    refcount_bits: None,
    aes: None,
    extended_l2: false,
    compression: None,
};

impl Opts {
    const fn v2(self) -> Self {
        Opts { v2: true, ..self }
    }
    const fn cluster(self, bytes: u64) -> Self {
        Opts {
            cluster: Some(bytes),
            ..self
        }
    }
    const fn refcount_bits(self, bits: u32) -> Self {
        Opts {
            refcount_bits: Some(bits),
            ..self
        }
    }
    const fn aes(self, passphrase: &'static str) -> Self {
        Opts {
            aes: Some(passphrase),
            ..self
        }
    }
    const fn extended_l2(self) -> Self {
        Opts {
            extended_l2: true,
            ..self
        }
    }
    const fn compression(self, kind: &'static str) -> Self {
        Opts {
            compression: Some(kind),
            ..self
        }
    }

    fn builder(&self, path: &Path, size: u64) -> Qcow2Builder {
        let mut b = qcow2(path, size);
        if self.v2 {
            b = b.v2();
        }
        if let Some(c) = self.cluster {
            b = b.cluster_size(c);
        }
        if let Some(r) = self.refcount_bits {
            b = b.refcount_bits(r);
        }
        if let Some(p) = self.aes {
            b = b.aes(p);
        }
        if self.extended_l2 {
            b = b.extended_l2();
        }
        if let Some(k) = self.compression {
            b = b.compression(k);
        }
        b
    }

    /// The same options as `qemu-img convert -o` takes them (unencrypted images only).
    fn convert_options(&self) -> String {
        assert!(
            self.aes.is_none() && self.refcount_bits.is_none() && !self.extended_l2,
            "convert_options covers version, cluster size and compression only"
        );
        let mut o = vec![];
        if self.v2 {
            o.push("compat=0.10".to_string());
        }
        if let Some(c) = self.cluster {
            o.push(format!("cluster_size={c}"));
        }
        if let Some(k) = self.compression {
            o.push(format!("compression_type={k}"));
        }
        o.join(",")
    }
}

/// How a layer comes to be.
#[derive(Clone, Copy, Debug)]
enum Made {
    /// `qemu-img create -f qcow2` with these options (over the layer below, if any).
    Qcow2(Opts),
    /// A raw file of seeded random bytes, so anything an overlay fails to hide shows.
    RandomRaw { seed: u64 },
    /// `qemu-img convert -c` of seeded compressible bytes into a qcow2 with these options: every
    /// cluster compressed.
    Compressed { opts: Opts, seed: u64 },
}

/// How a layer names the one below it.
#[derive(Clone, Copy, Debug)]
enum Backing {
    /// No backing file (the base of the chain).
    None,
    /// By its absolute path.
    Absolute,
    /// By this name, as is (relative names are relative to the overlay's folder).
    Named(&'static str),
}

/// What qemu writes on a layer once it is made.
#[derive(Clone, Copy, Debug)]
enum W {
    /// [`fill_typical`] with this seed.
    Typical(u64),
    /// `count` seeded writes of up to `max_len` bytes in the first `span` bytes.
    Scatter {
        span: u64,
        count: usize,
        max_len: u64,
        seed: u64,
    },
    /// `len` seeded bytes at `off`.
    Random(u64, u64, u64),
    /// `write -z`: zeroes (allocated where qemu can keep them so).
    Zeroes(u64, u64),
    /// `write -z -u`: zeroes, unmapped.
    ZeroesUnmap(u64, u64),
    /// `write -c`: `len` seeded compressible bytes at `off`, compressed.
    Compressed(u64, u64, u64),
    /// `qemu-img snapshot -c NAME`.
    Snapshot(&'static str),
}

/// One layer of a case's chain (the layers of a case go from the base up).
#[derive(Clone, Debug)]
struct Layer {
    /// Path inside the case's folder (folders are made as needed).
    file: &'static str,
    size: u64,
    made: Made,
    backing: Backing,
    writes: Vec<W>,
    /// Cut the backing format extension out of the header after the writes (old images).
    strip_backing_format: bool,
}

fn layer(file: &'static str, size: u64, made: Made) -> Layer {
    Layer {
        file,
        size,
        made,
        backing: Backing::None,
        writes: vec![],
        strip_backing_format: false,
    }
}

impl Layer {
    fn over(mut self, backing: Backing) -> Self {
        self.backing = backing;
        self
    }
    fn writes(mut self, writes: &[W]) -> Self {
        self.writes = writes.to_vec();
        self
    }
    fn without_backing_format(mut self) -> Self {
        self.strip_backing_format = true;
        self
    }
}

/// How the mount gets its passphrases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Keys {
    /// `--passphrase-file` with the top layer's passphrase (none for a plain top).
    File,
    /// `--passphrase-file -`, the top layer's passphrase on stdin.
    Stdin,
    /// `--passphrase-file` for the top, `--layer-passphrase-file PATH=FILE` for each encrypted
    /// layer below.
    PerLayer,
}

/// One image of the matrix.
struct Case {
    /// Names the case in failure messages and in `QCOWFS_READ_MATRIX_CASE`.
    name: &'static str,
    layers: Vec<Layer>,
    keys: Keys,
    /// Mount the top by its path relative to the case's folder, from that folder.
    relative_path: bool,
    /// What qemu must say about the finished top layer before qcowfs is asked: proof that the
    /// case made what it means to read.
    proof: fn(&Image),
}

fn case(name: &'static str, layers: Vec<Layer>) -> Case {
    Case {
        name,
        layers,
        keys: Keys::File,
        relative_path: false,
        proof: |_| {},
    }
}

impl Case {
    fn keys(mut self, keys: Keys) -> Self {
        self.keys = keys;
        self
    }
    fn relative_path(mut self) -> Self {
        self.relative_path = true;
        self
    }
    fn proof(mut self, proof: fn(&Image)) -> Self {
        self.proof = proof;
        self
    }
}

/// A standalone qcow2 image of `size` with `opts`, filled by [`fill_typical`].
fn typical(name: &'static str, size: u64, opts: Opts, seed: u64) -> Case {
    case(
        name,
        vec![layer("disk.qcow2", size, Made::Qcow2(opts)).writes(&[W::Typical(seed)])],
    )
}

/// Zeroes and data at subcluster granularity in an extended-L2 overlay of `cluster` bytes.
fn extended_l2_writes(cluster: u64, seed: u64) -> Vec<W> {
    let sub = cluster / 32;
    vec![
        W::Scatter {
            span: MEDIUM,
            count: 30,
            max_len: 3 * sub,
            seed,
        },
        // Zero subclusters: aligned (zero bits) and inside an allocated cluster.
        W::Zeroes(5 * cluster + 3 * sub, 2 * sub),
        W::Random(6 * cluster + sub, sub, seed + 1),
        W::Zeroes(6 * cluster, sub),
        W::ZeroesUnmap(6 * cluster + 4 * sub, 4 * sub),
    ]
}

fn scatter(span: u64, count: usize, max_len: u64, seed: u64) -> W {
    W::Scatter {
        span,
        count,
        max_len,
        seed,
    }
}

/// Every image of the matrix.
fn cases() -> Vec<Case> {
    const NOVA_BASE: &str = "instances/_base/da39a3ee5e6b4b0d3255bfef95601890afd80709";
    const C: u64 = 65536;
    let raw = |file, size, seed| layer(file, size, Made::RandomRaw { seed });
    let q = |file, size, opts| layer(file, size, Made::Qcow2(opts));
    let compressed = |file, opts, seed| layer(file, SMALL, Made::Compressed { opts, seed });
    let mut cases = vec![
        // Geometry: versions, cluster sizes, refcount widths.
        typical(
            "reads_v2_image_with_512_byte_clusters",
            SMALL,
            V3.v2().cluster(512),
            1,
        ),
        typical("reads_v2_image_with_64k_clusters", MEDIUM, V3.v2(), 2),
        typical(
            "reads_v3_image_with_512_byte_clusters",
            SMALL,
            V3.cluster(512),
            3,
        ),
        typical(
            "reads_v3_image_with_4k_clusters",
            MEDIUM,
            V3.cluster(4096),
            4,
        ),
        typical(
            "reads_v3_image_with_64k_clusters",
            MEDIUM,
            V3.cluster(65536),
            5,
        ),
        typical(
            "reads_v3_image_with_2m_clusters",
            32 * MIB,
            V3.cluster(2 * MIB),
            6,
        ),
        typical(
            "reads_image_whose_virtual_size_is_not_cluster_aligned",
            10_000_001,
            V3,
            7,
        )
        .proof(|img| assert_eq!(img.size, 10_000_384, "qemu rounds the size to sectors")),
        typical(
            "reads_image_with_1_bit_refcounts",
            SMALL,
            V3.refcount_bits(1).cluster(4096),
            8,
        ),
        typical(
            "reads_image_with_16_bit_refcounts",
            SMALL,
            V3.refcount_bits(16),
            9,
        ),
        typical(
            "reads_image_with_64_bit_refcounts",
            SMALL,
            V3.refcount_bits(64).cluster(512),
            10,
        ),
        // Legacy AES.
        typical("reads_aes_encrypted_v3_image", MEDIUM, V3.aes("sesame"), 11),
        typical(
            "reads_aes_encrypted_v2_image_with_4k_clusters",
            SMALL,
            V3.v2().cluster(4096).aes("sesame"),
            12,
        ),
        typical(
            "reads_aes_encrypted_image_with_512_byte_clusters",
            SMALL,
            V3.cluster(512).aes("x"),
            13,
        ),
        typical(
            "reads_aes_encrypted_image_with_2m_clusters",
            MEDIUM,
            V3.cluster(2 * MIB).aes("sesame"),
            14,
        ),
        // Legacy AES uses the passphrase's first 16 bytes as the key.
        typical(
            "reads_aes_image_whose_passphrase_is_longer_than_16_bytes",
            SMALL,
            V3.aes("correct horse battery staple"),
            15,
        ),
        typical(
            "reads_aes_image_with_passphrase_from_stdin",
            SMALL,
            V3.aes("from stdin"),
            16,
        )
        .keys(Keys::Stdin),
        // Backing chains.
        case(
            "reads_three_layer_chain_of_raw_base_plain_qcow2_and_aes_top",
            vec![
                raw("base.raw", 6 * MIB, 20),
                q("mid.qcow2", 12 * MIB, V3.cluster(4096))
                    .over(Backing::Named("base.raw"))
                    .writes(&[
                        scatter(12 * MIB, 25, 100_000, 21),
                        W::Zeroes(MIB, 3 * 65536),
                    ]),
                q("top.qcow2", MEDIUM, V3.aes("top secret"))
                    .over(Backing::Named("mid.qcow2"))
                    .writes(&[
                        scatter(MEDIUM, 25, 100_000, 22),
                        W::Zeroes(5 * MIB + 17, 100_000),
                    ]),
            ],
        ),
        case(
            "reads_chain_of_qcow2_layers_with_different_cluster_sizes",
            vec![
                q("base.qcow2", MEDIUM, V3.cluster(512).v2())
                    .writes(&[scatter(MEDIUM, 20, 300_000, 30)]),
                q("mid.qcow2", MEDIUM, V3.cluster(2 * MIB))
                    .over(Backing::Absolute)
                    .writes(&[scatter(MEDIUM, 10, 50_000, 31)]),
                q("top.qcow2", MEDIUM, V3.cluster(4096))
                    .over(Backing::Absolute)
                    .writes(&[scatter(MEDIUM, 20, 20_000, 32)]),
            ],
        ),
        // OpenStack nova: instances/_base/HASH (raw), instances/UUID/disk backed by "../_base/HASH".
        case(
            "reads_aes_overlay_over_raw_base_like_nova",
            vec![
                raw(NOVA_BASE, 8 * MIB, 40),
                q("instances/0b8f3c9e-uuid/disk", MEDIUM, V3.aes("nova key"))
                    .over(Backing::Named(
                        "../_base/da39a3ee5e6b4b0d3255bfef95601890afd80709",
                    ))
                    .writes(&[scatter(MEDIUM, 30, 100_000, 41)]),
            ],
        ),
        // The daemon may change folders; the backing name is relative to the overlay's folder,
        // not to the working directory of either process.
        case(
            "reads_relative_backing_when_the_image_path_given_is_relative",
            vec![
                raw("_base/hash", 4 * MIB, 50),
                q("inst/disk", SMALL, V3)
                    .over(Backing::Named("../_base/hash"))
                    .writes(&[scatter(SMALL, 10, 100_000, 51)]),
            ],
        )
        .relative_path(),
        // Old images name the backing file without its format; the format is then probed.
        // qemu-img refuses to create such images today, so the extension is cut out of the header.
        case(
            "reads_chain_whose_backing_format_extension_is_absent/raw_base",
            vec![
                raw("base.raw", 4 * MIB, 60),
                q("over-raw.qcow2", SMALL, V3)
                    .over(Backing::Named("base.raw"))
                    .writes(&[scatter(SMALL, 10, 100_000, 61)])
                    .without_backing_format(),
            ],
        )
        .proof(no_backing_format),
        case(
            "reads_chain_whose_backing_format_extension_is_absent/qcow2_base",
            vec![
                q("base.qcow2", SMALL, V3).writes(&[scatter(SMALL, 10, 100_000, 62)]),
                q("over-qcow2.qcow2", SMALL, V3)
                    .over(Backing::Named("base.qcow2"))
                    .writes(&[scatter(SMALL, 10, 100_000, 63)])
                    .without_backing_format(),
            ],
        )
        .proof(no_backing_format),
        case(
            "reads_chain_whose_backing_format_extension_is_present",
            vec![
                q("base.qcow2", SMALL, V3).writes(&[scatter(SMALL, 10, 100_000, 65)]),
                q("top.qcow2", SMALL, V3)
                    .over(Backing::Named("base.qcow2"))
                    .writes(&[scatter(SMALL, 10, 100_000, 66)]),
            ],
        )
        .proof(|img| {
            let info = img.qemu_info();
            assert_eq!(info["backing-filename-format"], "qcow2", "{info}");
        }),
        // A raw base whose length is not even a whole sector; the cluster that straddles its end
        // partly written.
        case(
            "reads_past_backing_end_as_zeros/raw_base",
            vec![
                raw("short.raw", 5_000_003, 70),
                q("over-raw.qcow2", MEDIUM, V3.cluster(4096))
                    .over(Backing::Named("short.raw"))
                    .writes(&[W::Random(4_999_000, 100, 71), W::Random(10 * MIB, 5000, 72)]),
            ],
        ),
        // A qcow2 base full of data up to its end, under a larger overlay.
        case(
            "reads_past_backing_end_as_zeros/qcow2_base",
            vec![
                q("short.qcow2", 3 * MIB, V3).writes(&[W::Random(0, 3 * MIB, 73)]),
                q("over-qcow2.qcow2", 12 * MIB, V3)
                    .over(Backing::Named("short.qcow2"))
                    .writes(&[W::Random(3 * MIB - 1000, 600, 74)]),
            ],
        ),
        // Zero and compressed clusters.
        case(
            "reads_zero_clusters_over_backing_data",
            vec![
                raw("base.raw", MEDIUM, 80),
                q("zeros.qcow2", MEDIUM, V3)
                    .over(Backing::Named("base.raw"))
                    .writes(&[
                        W::Random(0, 3 * C, 81),
                        W::Zeroes(0, C), // allocated before: zero flag, host offset kept
                        W::ZeroesUnmap(C, C), // allocated before: zero flag, offset dropped
                        W::Zeroes(4 * C, 2 * C), // never allocated: zero flag only
                        W::Zeroes(7 * C + 999, 12_345), // unaligned: qemu writes real zeros
                    ]),
            ],
        )
        .proof(zero_clusters_as_meant),
        // v2 has no zero flag: qemu writes zeros or deallocates.
        case(
            "reads_zeroed_ranges_of_v2_image_over_backing_data",
            vec![
                raw("base.raw", SMALL, 85),
                q("zeros-v2.qcow2", SMALL, V3.v2())
                    .over(Backing::Named("base.raw"))
                    .writes(&[
                        W::Random(0, 200_000, 86),
                        W::Zeroes(0, 65536),
                        W::Zeroes(300_000, 100_000),
                    ]),
            ],
        ),
        case(
            "reads_zlib_compressed_clusters/zlib-64k",
            vec![compressed("zlib-64k.qcow2", V3.compression("zlib"), 90)],
        ),
        case(
            "reads_zlib_compressed_clusters/zlib-4k",
            vec![compressed(
                "zlib-4k.qcow2",
                V3.compression("zlib").cluster(4096),
                90,
            )],
        ),
        case(
            "reads_zlib_compressed_clusters/zlib-512-v2",
            vec![compressed("zlib-512-v2.qcow2", V3.v2().cluster(512), 90)],
        ),
        case(
            "reads_zstd_compressed_clusters/zstd-64k",
            vec![compressed("zstd-64k.qcow2", V3.compression("zstd"), 91)],
        ),
        case(
            "reads_zstd_compressed_clusters/zstd-2m",
            vec![compressed(
                "zstd-2m.qcow2",
                V3.compression("zstd").cluster(2 * MIB),
                91,
            )],
        ),
    ];
    for kind in ["zlib", "zstd"] {
        cases.push(case(
            if kind == "zlib" {
                "reads_compressed_clusters_written_over_a_backing_file/zlib"
            } else {
                "reads_compressed_clusters_written_over_a_backing_file/zstd"
            },
            vec![
                raw("base.raw", SMALL, 92),
                q(
                    if kind == "zlib" {
                        "wc-zlib.qcow2"
                    } else {
                        "wc-zstd.qcow2"
                    },
                    SMALL,
                    V3.compression(kind),
                )
                .over(Backing::Named("base.raw"))
                .writes(&[
                    W::Compressed(0, 2 * C, 93),
                    W::Compressed(5 * C, C, 94),
                    W::Compressed(SMALL - C, C, 95),
                    // Partly overwrite a compressed cluster: qemu decompresses and
                    // reallocates it.
                    W::Random(C + 100, 300, 96),
                ]),
            ],
        ));
    }
    // Extended L2.
    for (name, file, cluster, seed) in [
        (
            "reads_extended_l2_subclusters_over_a_backing_file/16k",
            "ext-16384.qcow2",
            16 * KIB,
            101,
        ),
        (
            "reads_extended_l2_subclusters_over_a_backing_file/64k",
            "ext-65536.qcow2",
            64 * KIB,
            102,
        ),
        (
            "reads_extended_l2_subclusters_over_a_backing_file/2m",
            "ext-2097152.qcow2",
            2 * MIB,
            103,
        ),
    ] {
        cases.push(case(
            name,
            vec![
                raw("base.raw", MEDIUM, 100),
                q(file, MEDIUM, V3.extended_l2().cluster(cluster))
                    .over(Backing::Named("base.raw"))
                    .writes(&extended_l2_writes(cluster, seed)),
            ],
        ));
    }
    cases.extend([
        case(
            "reads_aes_image_with_extended_l2",
            vec![
                raw("base.raw", SMALL, 105),
                q(
                    "aes-ext.qcow2",
                    SMALL,
                    V3.extended_l2().cluster(32 * KIB).aes("sub"),
                )
                .over(Backing::Named("base.raw"))
                .writes(&[scatter(SMALL, 30, 5000, 106), W::Zeroes(40 * KIB, 2 * KIB)]),
            ],
        ),
        // Internal snapshots.
        case(
            "reads_current_state_of_image_with_internal_snapshots",
            vec![q("snap.qcow2", MEDIUM, V3.cluster(4096)).writes(&[
                W::Random(0, 2 * MIB, 110),
                W::Snapshot("first"),
                scatter(2 * MIB, 20, 50_000, 111), // over clusters shared with "first"
                W::Zeroes(MIB, 8192),
                W::Snapshot("second"),
                scatter(MEDIUM, 20, 50_000, 112),
            ])],
        ),
        case(
            "reads_current_state_of_aes_image_with_internal_snapshots",
            vec![q("aes-snap.qcow2", SMALL, V3.aes("snap")).writes(&[
                W::Random(0, MIB, 115),
                W::Snapshot("before"),
                scatter(MIB, 10, 50_000, 116),
            ])],
        ),
        // Encrypted chains.
        case(
            "reads_aes_overlay_over_aes_base_with_different_passphrases",
            vec![
                q("base.qcow2", SMALL, V3.aes("base pass")).writes(&[W::Random(0, 3 * MIB, 120)]),
                q("top.qcow2", SMALL, V3.aes("top pass"))
                    .over(Backing::Named("base.qcow2"))
                    .writes(&[scatter(SMALL, 20, 100_000, 121)]),
            ],
        )
        .keys(Keys::PerLayer),
        case(
            "reads_aes_overlay_over_aes_base_sharing_one_passphrase",
            vec![
                q("base.qcow2", SMALL, V3.aes("shared")).writes(&[W::Random(0, 3 * MIB, 125)]),
                q("top.qcow2", SMALL, V3.aes("shared"))
                    .over(Backing::Named("base.qcow2"))
                    .writes(&[scatter(SMALL, 20, 100_000, 126)]),
            ],
        ),
    ]);
    cases
}

fn no_backing_format(img: &Image) {
    let info = img.qemu_info();
    assert!(
        info.get("backing-filename-format").is_none(),
        "the backing format is still recorded: {info}"
    );
}

/// Cluster 0 a zero cluster that keeps its host offset, cluster 1 a zero cluster of this layer.
fn zero_clusters_as_meant(img: &Image) {
    let c = 65536;
    let map = qemu_map(img);
    let zero_at = |start: u64| {
        map.iter()
            .find(|e| e["start"] == start)
            .unwrap_or_else(|| panic!("no extent starts at {start}: {map:?}"))
    };
    assert!(
        zero_at(0)["zero"] == true && zero_at(0).get("offset").is_some(),
        "cluster 0 should be a zero cluster that keeps its host offset: {map:?}"
    );
    assert!(
        zero_at(c)["zero"] == true && zero_at(c)["depth"] == 0,
        "cluster 1 should be a zero cluster: {map:?}"
    );
}

// --- the runner ---------------------------------------------------------------------------------

/// Data that exercises the mapping of a standalone image: scattered unaligned random writes, a
/// pattern across cluster boundaries, the disk's very last bytes, and an unaligned zeroed range
/// inside written data.
fn fill_typical(image: &Image, seed: u64) {
    let size = image.size;
    image.scatter_random(size, 30, 200_000, seed);
    image.write_pattern(3 * 65536 - 777, 140_000, 0xa5);
    image.write_random(size - 4321, 4321, seed ^ 1);
    image.write_random(size / 2 - 5000, 150_000, seed ^ 2);
    image.write_zeroes(size / 2 + 1000, 70_000);
}

impl Layer {
    /// Makes this layer in `dir` over `below` and writes on it.
    fn build(&self, dir: &Path, below: Option<&Image>) -> Image {
        let path = dir.join(self.file);
        fs::create_dir_all(path.parent().expect("a folder")).expect("create the layer's folder");
        let image = match self.made {
            Made::RandomRaw { seed } => {
                raw_from_bytes(&path, &random_bytes(self.size as usize, seed))
            }
            Made::Compressed { opts, seed } => {
                let src = raw_from_bytes(
                    dir.join("src.raw"),
                    &compressible_bytes(self.size as usize, seed),
                );
                convert_compressed(&src, &path, &opts.convert_options())
            }
            Made::Qcow2(opts) => {
                let b = opts.builder(&path, self.size);
                match (self.backing, below) {
                    (Backing::None, _) => b,
                    (Backing::Absolute, Some(base)) => b.backing(base),
                    (Backing::Named(name), Some(base)) => b.backing_named(base, name),
                    (_, None) => panic!("{}: a backing file needs a layer below", self.file),
                }
                .create()
            }
        };
        for w in &self.writes {
            match *w {
                W::Typical(seed) => fill_typical(&image, seed),
                W::Scatter {
                    span,
                    count,
                    max_len,
                    seed,
                } => {
                    image.scatter_random(span, count, max_len, seed);
                }
                W::Random(off, len, seed) => {
                    image.write_random(off, len as usize, seed);
                }
                W::Zeroes(off, len) => {
                    image.write_zeroes(off, len);
                }
                W::ZeroesUnmap(off, len) => {
                    image.write_zeroes_unmap(off, len);
                }
                W::Compressed(off, len, seed) => {
                    image.write_compressed(off, &compressible_bytes(len as usize, seed));
                }
                W::Snapshot(name) => {
                    image.snapshot(name);
                }
            }
        }
        if self.strip_backing_format {
            assert!(
                strip_header_extension(&image.path, EXT_BACKING_FORMAT),
                "{}: no backing format extension to cut",
                self.file
            );
        }
        image
    }

    fn compressed(&self) -> bool {
        matches!(self.made, Made::Compressed { .. })
            || self.writes.iter().any(|w| matches!(w, W::Compressed(..)))
    }
}

/// Builds `case` in a folder of its own, mounts its top layer read-only and checks that `disk`
/// has the virtual size and the same bytes as `qemu-img convert -O raw` (whole file, then random
/// unaligned reads).
fn run_case(case: &Case) {
    let dir = workdir();
    let mut chain: Vec<Image> = Vec::new();
    for layer in &case.layers {
        let image = layer.build(dir.path(), chain.last());
        chain.push(image);
    }
    let top = chain.last().expect("a case has layers");
    if case.layers.last().is_some_and(Layer::compressed) {
        assert!(
            has_extent(top, "compressed"),
            "{} has no compressed cluster",
            top.path.display()
        );
    }
    (case.proof)(top);
    let expected = top.raw();

    let mut opts: Vec<OsString> = vec!["--read-only".into()];
    let mut stdin = None;
    let top_pass = top.secrets[0].as_deref();
    match (case.keys, top_pass) {
        (Keys::File, None) => {}
        (Keys::File | Keys::PerLayer, Some(pass)) => {
            let file = passphrase_file(dir.path(), "top.pass", pass);
            opts.extend(["--passphrase-file".into(), file.into()]);
        }
        (Keys::Stdin, Some(pass)) => {
            opts.extend(["--passphrase-file".into(), "-".into()]);
            stdin = Some(format!("{pass}\n"));
        }
        (keys, None) => panic!("{keys:?} needs an encrypted top layer"),
    }
    if case.keys == Keys::PerLayer {
        for (i, layer) in chain[..chain.len() - 1].iter().enumerate() {
            if let Some(pass) = &layer.secrets[0] {
                let file = passphrase_file(dir.path(), &format!("layer{i}.pass"), pass);
                let mut arg = OsString::from(layer.path.as_os_str());
                arg.push("=");
                arg.push(&file);
                opts.extend(["--layer-passphrase-file".into(), arg]);
            }
        }
    }
    let (image_arg, cwd) = if case.relative_path {
        (
            top.path
                .strip_prefix(dir.path())
                .expect("inside the case folder"),
            dir.path(),
        )
    } else {
        (top.path.as_path(), Path::new("/"))
    };
    let mount = match Mount::try_new(image_arg, &opts, stdin.as_deref().map(str::as_bytes), cwd) {
        Ok(m) => m,
        Err(r) => panic!(
            "qcowfs mount of {} (from {}) failed ({}):\n{}\ncommand: {}",
            image_arg.display(),
            cwd.display(),
            describe_status(r.status),
            r.stderr,
            r.command
        ),
    };
    let len = fs::metadata(mount.disk())
        .expect("stat MOUNTPOINT/disk")
        .len();
    assert_eq!(len, top.size, "size of MOUNTPOINT/disk");
    let actual = read_all_bounded(&mount.disk());
    assert_same_bytes(
        &actual,
        &expected,
        &format!(
            "{} read through qcowfs vs qemu-img convert -O raw",
            top.path.display()
        ),
    );
    assert_random_reads_match(&mount.disk(), &expected, 40, 0x5eed);
    // The other cases' threads fork qemu tools: a child may hold a copy of a descriptor on this
    // mount until it execs, which makes qcowfs umount refuse as busy for that moment.
    mount.umount_retrying_busy(20);
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(a panic without a message)".into())
}

#[test]
fn reads_every_case_of_the_matrix_as_qemu_does() {
    require_fuse();
    let all = cases();
    let mut names: Vec<&str> = all.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), all.len(), "two cases share a name");
    let chosen: Vec<&Case> = match std::env::var("QCOWFS_READ_MATRIX_CASE") {
        Ok(list) => {
            let wanted: Vec<&str> = list.split(',').map(str::trim).collect();
            for w in &wanted {
                assert!(
                    names.contains(w),
                    "QCOWFS_READ_MATRIX_CASE names no case: {w:?}; the cases:\n{}",
                    names.join("\n")
                );
            }
            all.iter().filter(|c| wanted.contains(&c.name)).collect()
        }
        Err(_) => all.iter().collect(),
    };
    let jobs: usize = std::env::var("QCOWFS_READ_MATRIX_JOBS")
        .ok()
        .map(|s| s.parse().expect("QCOWFS_READ_MATRIX_JOBS is a number"))
        .unwrap_or(DEFAULT_JOBS)
        .max(1);
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let start = Instant::now();
    thread::scope(|s| {
        for _ in 0..jobs.min(chosen.len()) {
            s.spawn(|| loop {
                let Some(case) = chosen.get(next.fetch_add(1, Ordering::SeqCst)) else {
                    return;
                };
                eprintln!("--- case {} ---", case.name);
                // A thread per case, named after it: its panic message names the case.
                let outcome = thread::Builder::new()
                    .name(case.name.to_string())
                    .spawn_scoped(s, || run_case(case))
                    .expect("spawn a case thread")
                    .join();
                if let Err(payload) = outcome {
                    failures
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(format!(
                            "case {}: {}",
                            case.name,
                            panic_message(payload.as_ref())
                        ));
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap_or_else(|e| e.into_inner());
    eprintln!(
        "{} read-matrix cases in {:.1} s ({jobs} at once)",
        chosen.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {} read-matrix cases failed (rerun one with QCOWFS_READ_MATRIX_CASE=NAME):\n{}",
        failures.len(),
        chosen.len(),
        failures.join("\n")
    );
}

// --- a huge sparse disk -------------------------------------------------------------------------

#[test]
fn reads_both_ends_of_a_2_tib_sparse_image() {
    let dir = workdir();
    let size = 2 * TIB;
    let img = qcow2(dir.path().join("huge.qcow2"), size).create();
    // (offset, length, pattern): the start, the middle, the last MiB, the very last bytes.
    let writes: [(u64, u64, u8); 4] = [
        (4097, 10_000, 0x11),
        (TIB - 333, 70_000, 0x22),
        (size - MIB + 12_345, 5000, 0x33),
        (size - 3000, 3000, 0x44),
    ];
    for &(off, len, byte) in &writes {
        img.write_pattern(off, len, byte);
    }
    // qemu agrees with the expectation before qcowfs is asked.
    let mut checks = Vec::new();
    for &(off, len, byte) in &writes {
        checks.push(format!("read -P 0x{byte:02x} {off} {len}"));
    }
    checks.push("read -P 0 0 4097".to_string());
    checks.push(format!("read -P 0 {} 1000", size - MIB));
    img.qemu_io(&checks);

    let mount = Mount::new(&img.path, &["--read-only"]);
    let len = fs::metadata(mount.disk()).expect("stat disk").len();
    assert_eq!(len, size, "size of MOUNTPOINT/disk");
    for window in [0, TIB - MIB / 2, size - MIB] {
        let actual = read_at_bounded(&mount.disk(), window, MIB as usize);
        let mut expected = vec![0u8; MIB as usize];
        for &(off, wlen, byte) in &writes {
            let (start, end) = (off.max(window), (off + wlen).min(window + MIB));
            if start < end {
                expected[(start - window) as usize..(end - window) as usize].fill(byte);
            }
        }
        assert_same_bytes(
            &actual,
            &expected,
            &format!("2 TiB image, the MiB at offset {window} (offsets are relative to it)"),
        );
    }
    mount.umount();
}

// --- info ---------------------------------------------------------------------------------------

/// True for `true` or a string naming an encryption ("aes"), false for `false`, null, "none".
fn says_encrypted(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::String(s) => !matches!(
            s.to_ascii_lowercase().as_str(),
            "" | "none" | "no" | "false"
        ),
        Value::Object(_) => true,
        _ => false,
    }
}

#[test]
fn info_json_reports_size_clusters_encryption_and_chain() {
    let dir = workdir();
    let base = raw_from_bytes(
        dir.path().join("base.raw"),
        &random_bytes(MIB as usize, 130),
    );
    let mid = qcow2(dir.path().join("mid.qcow2"), 8 * MIB)
        .cluster_size(4096)
        .backing_named(&base, "base.raw")
        .create();
    let top = qcow2(dir.path().join("top.qcow2"), 12 * MIB)
        .cluster_size(16 * KIB)
        .aes("info")
        .backing_named(&mid, "mid.qcow2")
        .create();

    let v = qcowfs_info_json(&top.path, &[]);
    assert_eq!(v[INFO_VIRTUAL_SIZE], 12 * MIB, "{v:#}");
    assert_eq!(v[INFO_CLUSTER_SIZE], 16 * KIB, "{v:#}");
    assert!(says_encrypted(&v[INFO_ENCRYPTED]), "{v:#}");
    let layers = v[INFO_LAYERS]
        .as_array()
        .unwrap_or_else(|| panic!("no {INFO_LAYERS} array: {v:#}"));
    assert_eq!(layers.len(), 3, "{v:#}");
    for (layer, (image, format, encrypted)) in layers.iter().zip([
        (&top, "qcow2", true),
        (&mid, "qcow2", false),
        (&base, "raw", false),
    ]) {
        let path = layer[INFO_LAYER_PATH].as_str().unwrap_or("");
        assert!(
            path.ends_with(file_name(&image.path)),
            "layer path {path:?} should name {}: {v:#}",
            image.path.display()
        );
        assert_eq!(layer[INFO_LAYER_FORMAT], format, "{v:#}");
        assert_eq!(
            says_encrypted(&layer[INFO_LAYER_ENCRYPTED]),
            encrypted,
            "{v:#}"
        );
    }

    let plain = qcowfs_info_json(&mid.path, &[]);
    assert_eq!(plain[INFO_VIRTUAL_SIZE], 8 * MIB, "{plain:#}");
    assert_eq!(plain[INFO_CLUSTER_SIZE], 4096, "{plain:#}");
    assert!(!says_encrypted(&plain[INFO_ENCRYPTED]), "{plain:#}");

    let text = qcowfs(["info".as_ref(), top.path.as_os_str()]);
    text.assert_success();
    assert!(!text.stdout.is_empty(), "qcowfs info printed nothing");
}

#[test]
fn mount_is_ready_quickly_and_umount_waits_for_the_daemon_to_exit() {
    let dir = workdir();
    let img = qcow2(dir.path().join("quick.qcow2"), SMALL).create();
    img.write_random(0, 1000, 140);
    let start = std::time::Instant::now();
    let mount = Mount::new(&img.path, &["--read-only"]);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "mount took {:?}",
        start.elapsed()
    );
    let entries: Vec<String> = fs::read_dir(mount.mountpoint())
        .expect("list the mount point")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(entries, vec!["disk".to_string()], "mount point contents");
    let mp = mount.mountpoint().to_path_buf();
    let daemon = mount
        .daemon_pid()
        .expect("a qcowfs daemon process serves the mount");
    mount.umount();
    assert!(!is_mounted(&mp));
    // "umount returns only after the daemon has flushed and exited" (a zombie has exited too).
    let stat = fs::read_to_string(format!("/proc/{daemon}/stat")).unwrap_or_default();
    let state = stat.rsplit(')').next().unwrap_or("").trim_start();
    assert!(
        stat.is_empty() || state.starts_with('Z'),
        "the daemon (pid {daemon}) is still running after umount: {stat}"
    );
}
