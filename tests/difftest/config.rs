//! The configurations the differential tester runs: one row per image geometry, encryption,
//! chain and guest layout. A row names its layers bottom first; the last one is mounted.

use crate::common::{KIB, MIB, TIB};
use crate::ptable::Guest;

/// How a layer is encrypted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enc {
    Plain,
    /// Legacy QEMU AES-128-CBC (`encrypt.format=aes`).
    Aes,
    /// LUKS1 (`encrypt.format=luks`, iter-time kept short).
    Luks,
}

/// One layer of a chain, as `qemu-img create` makes it.
#[derive(Clone, Copy, Debug)]
pub struct Layer {
    pub raw: bool,
    pub v2: bool,
    pub cluster: u64,
    pub refcount_bits: u32,
    pub extended_l2: bool,
    pub enc: Enc,
    pub prealloc: Option<&'static str>,
    pub lazy_refcounts: bool,
    /// One extent of the layer's starting data is written compressed (`qemu-io write -c`).
    pub compressed: bool,
    /// The layer's virtual size when it is shorter than the disk (a short backing file); a raw
    /// layer may end mid-sector.
    pub size: Option<u64>,
}

/// A qcow2 layer with qemu's defaults: v3, 64 KiB clusters, 16-bit refcounts, plain.
const fn q() -> Layer {
    Layer {
        raw: false,
        v2: false,
        cluster: 64 * KIB,
        refcount_bits: 16,
        extended_l2: false,
        enc: Enc::Plain,
        prealloc: None,
        lazy_refcounts: false,
        compressed: false,
        size: None,
    }
}

/// A raw layer.
const fn raw() -> Layer {
    let mut l = q();
    l.raw = true;
    l
}

impl Layer {
    const fn v2(mut self) -> Self {
        self.v2 = true;
        self
    }
    const fn cluster(mut self, bytes: u64) -> Self {
        self.cluster = bytes;
        self
    }
    const fn refcount(mut self, bits: u32) -> Self {
        self.refcount_bits = bits;
        self
    }
    const fn ext_l2(mut self) -> Self {
        self.extended_l2 = true;
        self
    }
    const fn aes(mut self) -> Self {
        self.enc = Enc::Aes;
        self
    }
    const fn luks(mut self) -> Self {
        self.enc = Enc::Luks;
        self
    }
    const fn prealloc(mut self, mode: &'static str) -> Self {
        self.prealloc = Some(mode);
        self
    }
    const fn lazy(mut self) -> Self {
        self.lazy_refcounts = true;
        self
    }
    const fn compressed(mut self) -> Self {
        self.compressed = true;
        self
    }
    const fn size(mut self, bytes: u64) -> Self {
        self.size = Some(bytes);
        self
    }
}

/// Where operations happen on a huge sparse disk (so the raw reference stays small).
#[derive(Clone, Copy, Debug)]
pub enum Window {
    /// `len` bytes from `start`.
    At(u64, u64),
    /// The last `len` bytes of the disk.
    Tail(u64),
}

/// One row of the table.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub name: &'static str,
    /// The disk's virtual size (qemu rounds it up to whole sectors).
    pub size: u64,
    /// Bottom first; the last layer is the image mounted.
    pub layers: &'static [Layer],
    pub guest: Guest,
    /// An internal snapshot `snap1` of the top layer is taken before mounting.
    pub snapshot: bool,
    /// Operation windows; empty: the whole disk.
    pub windows: &'static [Window],
}

impl Config {
    pub fn top(&self) -> &Layer {
        self.layers.last().expect("a configuration has a layer")
    }

    pub fn encrypted(&self) -> bool {
        self.layers.iter().any(|l| l.enc != Enc::Plain)
    }

    /// `qcowfs seal` applies: the top is encrypted and has backing files (and no snapshot,
    /// whose view of the backing file seal would change).
    pub fn sealable(&self) -> bool {
        self.top().enc != Enc::Plain && self.layers.len() > 1 && !self.snapshot
    }
}

const M64: u64 = 64 * MIB;
/// 3 TiB and a bit, so no table boundary falls on a round number.
const HUGE: u64 = 3 * TIB + 5 * MIB + 512;
const HUGE_WINDOWS: &[Window] = &[
    Window::At(0, 40 * MIB),
    Window::At(3 * TIB / 2 - 20 * MIB, 40 * MIB),
    Window::Tail(40 * MIB),
];

const fn row(name: &'static str, layers: &'static [Layer]) -> Config {
    Config {
        name,
        size: M64,
        layers,
        guest: Guest::Blank,
        snapshot: false,
        windows: &[],
    }
}

const fn sized(mut c: Config, size: u64) -> Config {
    c.size = size;
    c
}

const fn guest(mut c: Config, g: Guest) -> Config {
    c.guest = g;
    c
}

const fn snap(mut c: Config) -> Config {
    c.snapshot = true;
    c
}

const fn huge(mut c: Config) -> Config {
    c.size = HUGE;
    c.windows = HUGE_WINDOWS;
    c
}

/// Every configuration, each name unique (the replay command names one).
pub const CONFIGS: &[Config] = &[
    // Geometry of a single plain layer.
    row("v3-c64k", &[q()]),
    row("v2-c64k", &[q().v2()]),
    sized(
        row("v3-c512-rc1", &[q().cluster(512).refcount(1)]),
        16 * MIB + 1536,
    ),
    row(
        "v3-c1k-rc8-compressed",
        &[q().cluster(KIB).refcount(8).compressed()],
    ),
    row("v3-c4k-rc64", &[q().cluster(4 * KIB).refcount(64)]),
    row("v3-c2m", &[q().cluster(2 * MIB).compressed()]),
    row("v2-c512-over-raw", &[raw(), q().v2().cluster(512)]),
    row(
        "v3-c16k-rc2-over-raw",
        &[raw(), q().cluster(16 * KIB).refcount(2)],
    ),
    // Extended L2 (subclusters).
    row("extl2-c64k-over-raw", &[raw(), q().ext_l2()]),
    row(
        "extl2-c2m-rc64",
        &[q().cluster(2 * MIB).ext_l2().refcount(64)],
    ),
    row(
        "extl2-c32k-luks-over-raw",
        &[raw(), q().cluster(32 * KIB).ext_l2().luks()],
    ),
    // Preallocation and lazy refcounts.
    row("prealloc-metadata", &[q().prealloc("metadata")]),
    row(
        "prealloc-falloc-c4k",
        &[q().cluster(4 * KIB).prealloc("falloc")],
    ),
    row(
        "prealloc-metadata-extl2-over-raw",
        &[raw(), q().ext_l2().prealloc("metadata")],
    ),
    row(
        "prealloc-metadata-aes",
        &[q().cluster(16 * KIB).prealloc("metadata").aes()],
    ),
    row("lazy-refcounts-over-raw", &[raw(), q().lazy()]),
    row(
        "lazy-refcounts-c512-rc64",
        &[q().cluster(512).refcount(64).lazy()],
    ),
    // Encryption.
    row("aes-over-raw", &[raw(), q().aes()]),
    row(
        "aes-v2-c4k-over-raw",
        &[raw(), q().v2().cluster(4 * KIB).aes()],
    ),
    row("aes-c512", &[q().cluster(512).aes()]),
    row("luks-over-raw", &[raw(), q().luks()]),
    row("luks-c2m", &[q().cluster(2 * MIB).luks()]),
    row(
        "luks-c4k-rc1-over-qcow2",
        &[q().compressed(), q().cluster(4 * KIB).refcount(1).luks()],
    ),
    // Chains with a key per layer.
    row("chain3-raw-luks-aes", &[raw(), q().luks(), q().aes()]),
    row("chain3-plain-c4k-c64k", &[raw(), q().cluster(4 * KIB), q()]),
    row(
        "chain4-raw-plain-aes-luks",
        &[raw(), q(), q().cluster(4 * KIB).aes(), q().luks()],
    ),
    row(
        "chain4-v2-luks-c16k-aes",
        &[q().v2(), q().luks(), q().cluster(16 * KIB), q().aes()],
    ),
    // Internal snapshots.
    snap(row("snapshot-c64k", &[q()])),
    snap(row("snapshot-aes-over-raw", &[raw(), q().aes()])),
    snap(row(
        "snapshot-extl2-c32k-rc64",
        &[q().cluster(32 * KIB).ext_l2().refcount(64)],
    )),
    // Huge sparse disks.
    huge(row("sparse-3t-c64k", &[q()])),
    // 512 KiB: with LUKS and clusters of 1 MiB or more on a 3 TiB disk, qemu-img compare itself
    // aborts (bdrv_co_do_block_status assertion, qemu 10.0.2) on a fresh image.
    huge(row(
        "sparse-3t-luks-c512k-over-short-raw",
        &[raw().size(M64), q().cluster(512 * KIB).luks()],
    )),
    huge(row(
        "sparse-3t-extl2-aes-over-short-qcow2",
        &[q().size(GIB_8), q().ext_l2().aes()],
    )),
    // Short backing files.
    row(
        "short-raw-backing-odd-end",
        &[raw().size(5 * MIB + 300), q()],
    ),
    row(
        "short-qcow2-backing-c4k",
        &[q().size(8 * MIB + 512), q().cluster(4 * KIB)],
    ),
    row(
        "short-chain-aes-over-short-luks",
        &[
            raw().size(3 * MIB + 7),
            q().size(20 * MIB).luks(),
            q().aes(),
        ],
    ),
    // Partitioned guests (writes through disk-partN, table rewrites).
    guest(row("mbr-over-raw", &[raw(), q()]), Guest::Mbr),
    guest(row("mbr-aes-over-raw", &[raw(), q().aes()]), Guest::Mbr),
    guest(
        row("mbr-c512-rc1", &[q().cluster(512).refcount(1)]),
        Guest::Mbr,
    ),
    guest(
        row("gpt-c4k-over-raw", &[raw(), q().cluster(4 * KIB)]),
        Guest::Gpt,
    ),
    guest(
        row("gpt-extl2-luks-over-raw", &[raw(), q().ext_l2().luks()]),
        Guest::Gpt,
    ),
    guest(
        row("gpt-chain3-raw-luks-aes", &[raw(), q().luks(), q().aes()]),
        Guest::Gpt,
    ),
];

const GIB_8: u64 = 8 * 1024 * MIB;

#[test]
fn configuration_names_are_unique_and_there_are_at_least_thirty() {
    let mut names: Vec<&str> = CONFIGS.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), CONFIGS.len(), "duplicate configuration names");
    assert!(CONFIGS.len() >= 30);
}
