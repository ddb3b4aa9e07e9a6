//! The qcow2 header and its extensions: raw big-endian bytes in (through the on-disk record of
//! `record`), a validated [`Header`] out. After `Header::parse` succeeds nothing downstream
//! re-checks these numbers.

mod record;

use super::FormatError;
pub(crate) use record::{extensions, field, Extension, Field, HeaderUpdate, RawHeader};
pub use record::{MAGIC, V3_MIN_HEADER_LEN};

pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limits (block/qcow2.h): L1 table 32 MiB, refcount table 8 MiB, 64 Ki snapshots.
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
pub const MAX_SNAPSHOTS: u32 = 65536;
pub const MAX_BACKING_NAME: u32 = 1023;
/// The largest virtual size accepted at all (the L1 limit bounds it further for small clusters); keeps
/// every guest offset computation far from overflow.
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 62;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
pub const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_EXTERNAL_DATA
    | INCOMPAT_COMPRESSION_TYPE
    | INCOMPAT_EXTENDED_L2;
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

pub(super) const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
const EXT_FDE: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// How the layer's data clusters are encrypted (`crypt_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    None,
    /// Legacy AES-128-CBC, sectors numbered by guest offset.
    Aes,
    /// LUKS, sectors numbered by host offset; the LUKS header lives where the FDE extension says.
    Luks,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Zlib,
    Zstd,
}

/// A validated qcow2 header.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub encryption: Encryption,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: Compression,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// Offset and length of the LUKS header (full-disk-encryption extension).
    pub fde_header: Option<(u64, u64)>,
    /// Names of feature bits from the feature-name table: (type, bit, name).
    pub feature_names: Vec<(u8, u8, String)>,
}

impl Header {
    /// How many bytes of the file `parse` wants: the first cluster, once cluster_bits is known.
    pub fn bytes_wanted(first: &[u8]) -> Result<usize, FormatError> {
        if first.len() < field::CLUSTER_BITS.end() {
            return Err(FormatError::Truncated);
        }
        if RawHeader::has_magic(first) != Some(true) {
            return Err(FormatError::BadMagic);
        }
        let bits = field::CLUSTER_BITS.read(first).unwrap_or(0) as u32;
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            return Err(FormatError::ClusterBits(bits));
        }
        Ok(1usize << bits)
    }

    /// Parse and validate the header from the first cluster of the file (`buf`, shorter if the file
    /// is) given the file's length.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header, FormatError> {
        match RawHeader::has_magic(buf) {
            None => return Err(FormatError::Truncated),
            Some(false) => return Err(FormatError::BadMagic),
            Some(true) => {}
        }
        let raw = RawHeader::decode(buf)?;
        let version = raw.version;
        if version != 2 && version != 3 {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let cluster_bits = raw.cluster_bits;
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(FormatError::ClusterBits(cluster_bits));
        }
        let cluster_size = 1u64 << cluster_bits;

        // The record gives a version 3 header cut short the version 2 defaults: refuse it here.
        if version == 3 && buf.len() < V3_MIN_HEADER_LEN as usize {
            return Err(FormatError::Truncated);
        }
        let incompatible = raw.incompatible_features;
        let compatible = raw.compatible_features;
        let autoclear = raw.autoclear_features;
        let refcount_order = raw.refcount_order;
        let header_length = raw.header_length;
        if version == 3
            && (header_length < V3_MIN_HEADER_LEN
                || u64::from(header_length) > cluster_size
                || header_length as usize > buf.len())
        {
            return Err(FormatError::HeaderLength(header_length));
        }
        if refcount_order > 6 {
            return Err(FormatError::RefcountOrder(refcount_order));
        }
        let unknown = incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(FormatError::UnknownIncompatible(unknown));
        }
        if incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(FormatError::CorruptBit);
        }
        if incompatible & INCOMPAT_EXTERNAL_DATA != 0 {
            return Err(FormatError::ExternalDataFile);
        }
        let compression = if incompatible & INCOMPAT_COMPRESSION_TYPE != 0 {
            if header_length as usize <= field::COMPRESSION_TYPE.at {
                return Err(FormatError::HeaderLength(header_length));
            }
            match raw.compression_type {
                0 => Compression::Zlib,
                1 => Compression::Zstd,
                other => return Err(FormatError::CompressionType(other)),
            }
        } else {
            Compression::Zlib
        };
        if incompatible & INCOMPAT_EXTENDED_L2 != 0 && cluster_bits < 14 {
            return Err(FormatError::ExtendedL2Cluster);
        }

        let size = raw.size;
        let encryption = match raw.crypt_method {
            0 => Encryption::None,
            1 => Encryption::Aes,
            2 => Encryption::Luks,
            _ => {
                return Err(FormatError::Unsupported(
                    "unknown encryption method (crypt_method above 2)",
                ))
            }
        };

        // L1 table: within QEMU's size limit, aligned, in the file, and large enough for the disk.
        let l1_size = raw.l1_size;
        let l1_table_offset = raw.l1_table_offset;
        let l1_bytes = u64::from(l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(FormatError::TooLarge {
                what: "L1 table",
                size: l1_bytes,
                limit: MAX_L1_BYTES,
            });
        }
        let entry_bits = if incompatible & INCOMPAT_EXTENDED_L2 != 0 {
            4
        } else {
            3
        };
        let l2_bits = cluster_bits - entry_bits;
        let bytes_per_l1 = 1u64 << (cluster_bits + l2_bits);
        // The largest virtual size QEMU accepts is bounded by the L1 limit; this also keeps every
        // guest offset arithmetic below far from overflow.
        let max_size = (MAX_L1_BYTES / 8)
            .saturating_mul(bytes_per_l1)
            .min(MAX_VIRTUAL_SIZE);
        if size > max_size {
            return Err(FormatError::VirtualSize(size));
        }
        let need = size.div_ceil(bytes_per_l1);
        if u64::from(l1_size) < need {
            return Err(FormatError::L1TooSmall {
                have: l1_size.into(),
                need,
            });
        }
        if l1_size > 0 {
            check_table(
                "L1 table",
                l1_table_offset,
                l1_bytes,
                cluster_size,
                file_len,
            )?;
        }

        let refcount_table_offset = raw.refcount_table_offset;
        let refcount_table_clusters = raw.refcount_table_clusters;
        let rt_bytes = u64::from(refcount_table_clusters) << cluster_bits;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(FormatError::TooLarge {
                what: "refcount table",
                size: rt_bytes,
                limit: MAX_REFTABLE_BYTES,
            });
        }
        check_table(
            "refcount table",
            refcount_table_offset,
            rt_bytes,
            cluster_size,
            file_len,
        )?;

        let nb_snapshots = raw.nb_snapshots;
        let snapshots_offset = raw.snapshots_offset;
        if nb_snapshots > MAX_SNAPSHOTS {
            return Err(FormatError::TooLarge {
                what: "snapshot count",
                size: nb_snapshots.into(),
                limit: MAX_SNAPSHOTS.into(),
            });
        }
        if nb_snapshots > 0 {
            // Each entry is at least 40 bytes; the table itself is checked entry by entry later.
            check_table(
                "snapshot table",
                snapshots_offset,
                u64::from(nb_snapshots) * 40,
                cluster_size,
                file_len,
            )?;
        }

        let mut header = Header {
            version,
            cluster_bits,
            size,
            encryption,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
            incompatible,
            compatible,
            autoclear,
            refcount_order,
            header_length,
            compression,
            backing_file: None,
            backing_format: None,
            fde_header: None,
            feature_names: Vec::new(),
        };
        let backing_end = header.parse_backing_name(buf, &raw)?;
        header.parse_extensions(buf, backing_end)?;
        if encryption == Encryption::Luks && header.fde_header.is_none() {
            return Err(FormatError::BadExtension(
                "full disk encryption (missing for LUKS)",
            ));
        }
        Ok(header)
    }

    fn parse_backing_name(&mut self, buf: &[u8], raw: &RawHeader) -> Result<usize, FormatError> {
        let offset = raw.backing_file_offset;
        let len = raw.backing_file_size;
        if offset == 0 || len == 0 {
            return Ok(buf.len());
        }
        if len > MAX_BACKING_NAME {
            return Err(FormatError::BackingName("longer than 1023 bytes"));
        }
        let start =
            usize::try_from(offset).map_err(|_| FormatError::BackingName("offset out of range"))?;
        let end = start
            .checked_add(len as usize)
            .ok_or(FormatError::BackingName("offset plus length overflows"))?;
        if start < self.header_length as usize || end > buf.len() {
            return Err(FormatError::BackingName(
                "stored outside the header cluster",
            ));
        }
        let name = std::str::from_utf8(&buf[start..end])
            .map_err(|_| FormatError::BackingName("not valid UTF-8"))?;
        if name.contains('\0') {
            return Err(FormatError::BackingName("contains a NUL byte"));
        }
        self.backing_file = Some(name.to_string());
        Ok(start)
    }

    /// Header extensions follow the header up to the backing name (or the end of the first cluster).
    fn parse_extensions(&mut self, buf: &[u8], end: usize) -> Result<(), FormatError> {
        for ext in extensions(buf, self.header_length as usize, end) {
            let Extension { kind, data, .. } = ext?;
            let data = &buf[data];
            match kind {
                EXT_BACKING_FORMAT => {
                    let name = std::str::from_utf8(data)
                        .map_err(|_| FormatError::BadExtension("backing format"))?;
                    self.backing_format = Some(name.trim_end_matches('\0').to_string());
                }
                EXT_FDE => {
                    if data.len() != 16 {
                        return Err(FormatError::BadExtension("full disk encryption"));
                    }
                    let get = |f: Field| f.read(data).unwrap_or(0);
                    self.fde_header = Some((get(field::FDE_OFFSET), get(field::FDE_LENGTH)));
                }
                EXT_DATA_FILE => return Err(FormatError::ExternalDataFile),
                EXT_FEATURE_TABLE => {
                    for entry in data.chunks_exact(48) {
                        let name = entry[2..].split(|&b| b == 0).next().unwrap_or(&[]);
                        self.feature_names.push((
                            entry[0],
                            entry[1],
                            String::from_utf8_lossy(name).into_owned(),
                        ));
                    }
                }
                _ => {} // bitmaps and unknown extensions are only advisory for reading
            }
        }
        Ok(())
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTENDED_L2 != 0
    }

    pub fn is_dirty(&self) -> bool {
        self.incompatible & INCOMPAT_DIRTY != 0
    }
}

/// A table must be cluster-aligned, not overflow, and lie inside the file.
fn check_table(
    what: &'static str,
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<(), FormatError> {
    if offset % cluster_size != 0 || offset == 0 {
        return Err(FormatError::Misaligned {
            what,
            offset,
            align: cluster_size,
        });
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len.div_ceil(cluster_size) * cluster_size => Ok(()),
        _ => Err(FormatError::BeyondEnd {
            what,
            offset,
            len,
            file_len,
        }),
    }
}

#[cfg(test)]
mod qemu_fixtures;

#[cfg(test)]
#[path = "header/tests.rs"]
pub(crate) mod tests;
