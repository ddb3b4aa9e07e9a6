//! What can be wrong with a qcow2 image.

/// A structural problem found in an image. Every variant says what was found and what the limit is.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not a qcow2 image (bad magic)")]
    BadMagic,
    #[error("file is too short to hold a qcow2 header")]
    Truncated,
    #[error("unsupported qcow2 version {0} (only 2 and 3 exist)")]
    UnsupportedVersion(u32),
    #[error("cluster_bits {0} out of range (9..=21, 512 B to 2 MiB)")]
    ClusterBits(u32),
    #[error("header length {0} is invalid")]
    HeaderLength(u32),
    #[error("refcount order {0} out of range (0..=6)")]
    RefcountOrder(u32),
    #[error("unknown incompatible feature bits {0:#x}; a newer QEMU made this image")]
    UnknownIncompatible(u64),
    #[error("the image is marked corrupt; repair it with qcowfs check -r all (qemu-img check, given the passphrase)")]
    CorruptBit,
    #[error("the image has the dirty bit set (lazy refcounts); repair it with qcowfs check -r all (qemu-img check, given the passphrase) before writing")]
    DirtyBit,
    #[error("images with an external data file are not supported")]
    ExternalDataFile,
    #[error("unknown compression type {0}")]
    CompressionType(u8),
    #[error("extended L2 entries need clusters of at least 16 KiB")]
    ExtendedL2Cluster,
    #[error("{what} at offset {offset:#x} is not aligned to {align} bytes")]
    Misaligned {
        what: &'static str,
        offset: u64,
        align: u64,
    },
    #[error("{what} ({size} bytes) exceeds the limit of {limit} bytes")]
    TooLarge {
        what: &'static str,
        size: u64,
        limit: u64,
    },
    #[error("{what} at offset {offset:#x} ({len} bytes) lies beyond the end of the file ({file_len} bytes)")]
    BeyondEnd {
        what: &'static str,
        offset: u64,
        len: u64,
        file_len: u64,
    },
    #[error("virtual size {0} is invalid")]
    VirtualSize(u64),
    #[error("L1 table has {have} entries, too few for the virtual size (needs {need})")]
    L1TooSmall { have: u64, need: u64 },
    #[error("backing file name is invalid: {0}")]
    BackingName(&'static str),
    #[error("header extension {kind:#x} of {len} bytes runs past the end of the header cluster")]
    Extension { kind: u32, len: u32 },
    #[error("{0} header extension is malformed")]
    BadExtension(&'static str),
    #[error("snapshot table entry {0} is malformed")]
    Snapshot(u32),
    #[error("{what} at offset {offset:#x} overlaps image metadata")]
    Overlap { what: &'static str, offset: u64 },
    #[error("L2 entry for guest offset {guest:#x} is invalid: {why}")]
    BadL2Entry { guest: u64, why: &'static str },
    #[error("compressed cluster at guest offset {0:#x} does not decompress")]
    Decompress(u64),
    #[error(
        "the {what} at offset {offset:#x} has refcount 0: the refcounts are damaged and writing \
         could overwrite data still in use (repair with qcowfs check -r all)"
    )]
    Uncounted { what: &'static str, offset: u64 },
    #[error(
        "the data cluster at offset {host:#x} (guest offset {guest:#x}) has refcount {refcount} but \
         is named {named} time(s) or marked unshared wrongly: the refcounts are damaged and writing \
         could overwrite data still in use (repair with qcowfs check -r all)"
    )]
    Undercounted {
        guest: u64,
        host: u64,
        refcount: u64,
        named: u64,
    },
    #[error("refcount block for host cluster {0:#x} is invalid")]
    BadRefcount(u64),
    #[error("unsupported backing format '{0}' (qcow2 and raw are supported)")]
    BackingFormat(String),
    #[error("backing chain is deeper than {0} layers")]
    ChainTooDeep(usize),
    #[error("backing chain loops back to this file")]
    ChainLoop,
    #[error("{0}")]
    Unsupported(&'static str),
}
