//! The header as it lies on disk: the table of its fixed fields, the raw record they make (one
//! decoder, one encoder), in-place updates of named fields, and the list of header extensions.
//! Nothing here validates; `Header::parse` does, from the record.

use std::ops::Range;

use super::super::FormatError;

/// The first four bytes of every qcow2 image.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Where one fixed big-endian field lies: byte offset and width (1, 4 or 8 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Field {
    pub at: usize,
    pub width: usize,
}

impl Field {
    const fn first(width: usize) -> Field {
        Field { at: 0, width }
    }

    /// The field right after this one: qcow2 headers have no gaps between fields.
    const fn then(self, width: usize) -> Field {
        Field {
            at: self.end(),
            width,
        }
    }

    pub const fn end(self) -> usize {
        self.at + self.width
    }

    /// The field's value in `buf` (which starts where the field's structure starts), if it holds it.
    pub fn read(self, buf: &[u8]) -> Option<u64> {
        let bytes = buf.get(self.at..self.end())?;
        Some(bytes.iter().fold(0, |acc, &b| (acc << 8) | u64::from(b)))
    }
}

/// The fixed header fields, in the order and widths of QEMU's docs/interop/qcow2.txt.
pub(crate) mod field {
    use super::Field;

    pub const MAGIC: Field = Field::first(4); // 0..4
    pub const VERSION: Field = MAGIC.then(4); // 4..8
    pub const BACKING_FILE_OFFSET: Field = VERSION.then(8); // 8..16
    pub const BACKING_FILE_SIZE: Field = BACKING_FILE_OFFSET.then(4); // 16..20
    pub const CLUSTER_BITS: Field = BACKING_FILE_SIZE.then(4); // 20..24
    pub const SIZE: Field = CLUSTER_BITS.then(8); // 24..32
    pub const CRYPT_METHOD: Field = SIZE.then(4); // 32..36
    pub const L1_SIZE: Field = CRYPT_METHOD.then(4); // 36..40
    pub const L1_TABLE_OFFSET: Field = L1_SIZE.then(8); // 40..48
    pub const REFCOUNT_TABLE_OFFSET: Field = L1_TABLE_OFFSET.then(8); // 48..56
    pub const REFCOUNT_TABLE_CLUSTERS: Field = REFCOUNT_TABLE_OFFSET.then(4); // 56..60
    pub const NB_SNAPSHOTS: Field = REFCOUNT_TABLE_CLUSTERS.then(4); // 60..64
    pub const SNAPSHOTS_OFFSET: Field = NB_SNAPSHOTS.then(8); // 64..72
                                                              // Version 3 only.
    pub const INCOMPATIBLE_FEATURES: Field = SNAPSHOTS_OFFSET.then(8); // 72..80
    pub const COMPATIBLE_FEATURES: Field = INCOMPATIBLE_FEATURES.then(8); // 80..88
    pub const AUTOCLEAR_FEATURES: Field = COMPATIBLE_FEATURES.then(8); // 88..96
    pub const REFCOUNT_ORDER: Field = AUTOCLEAR_FEATURES.then(4); // 96..100
    pub const HEADER_LENGTH: Field = REFCOUNT_ORDER.then(4); // 100..104
    /// Only when header_length covers it (QEMU pads it to 112).
    pub const COMPRESSION_TYPE: Field = HEADER_LENGTH.then(1); // 104

    /// The two words in front of every header extension's data.
    pub const EXT_TYPE: Field = Field::first(4);
    pub const EXT_LENGTH: Field = EXT_TYPE.then(4);
    pub const EXT_DATA: usize = EXT_LENGTH.end();

    /// The data of the full disk encryption extension: where the LUKS header is.
    pub const FDE_OFFSET: Field = Field::first(8);
    pub const FDE_LENGTH: Field = FDE_OFFSET.then(8);
}

/// Bytes of the version 2 header; version 3 adds fields up to `header_length`.
pub const V2_HEADER_LEN: usize = field::SNAPSHOTS_OFFSET.end();
pub const V3_MIN_HEADER_LEN: u32 = field::HEADER_LENGTH.end() as u32;
/// The type of the header extension that ends the list.
pub(crate) const EXT_END: u32 = 0;
/// The magic as the 32-bit field holds it.
const MAGIC_WORD: u64 = u32::from_be_bytes(MAGIC) as u64;

/// The fixed header fields as stored, not validated (cloud-hypervisor's `RawHeader`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawHeader {
    pub magic: u32,
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
}

impl RawHeader {
    /// Whether `buf` starts with the qcow2 magic; `None` if it is shorter than the magic.
    pub fn has_magic(buf: &[u8]) -> Option<bool> {
        field::MAGIC.read(buf).map(|m| m == MAGIC_WORD)
    }

    /// Decode the fixed fields at the start of `buf`. Version 3 fields that `buf` does not hold (a
    /// version 2 header, or a version 3 one cut short, which `Header::parse` refuses) keep their
    /// version 2 meaning: no feature bits, 16-bit refcounts, a 72-byte header. `compression_type`
    /// is read only where `header_length` covers it, else it is 0 (zlib).
    pub fn decode(buf: &[u8]) -> Result<RawHeader, FormatError> {
        if buf.len() < V2_HEADER_LEN {
            return Err(FormatError::Truncated);
        }
        // Every field below is inside `buf` where it is read; widths 4 and 1 fit their types.
        let get = |f: Field| f.read(buf).unwrap_or(0);
        let mut raw = RawHeader {
            magic: get(field::MAGIC) as u32,
            version: get(field::VERSION) as u32,
            backing_file_offset: get(field::BACKING_FILE_OFFSET),
            backing_file_size: get(field::BACKING_FILE_SIZE) as u32,
            cluster_bits: get(field::CLUSTER_BITS) as u32,
            size: get(field::SIZE),
            crypt_method: get(field::CRYPT_METHOD) as u32,
            l1_size: get(field::L1_SIZE) as u32,
            l1_table_offset: get(field::L1_TABLE_OFFSET),
            refcount_table_offset: get(field::REFCOUNT_TABLE_OFFSET),
            refcount_table_clusters: get(field::REFCOUNT_TABLE_CLUSTERS) as u32,
            nb_snapshots: get(field::NB_SNAPSHOTS) as u32,
            snapshots_offset: get(field::SNAPSHOTS_OFFSET),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression_type: 0,
        };
        if raw.version >= 3 && buf.len() >= V3_MIN_HEADER_LEN as usize {
            raw.incompatible_features = get(field::INCOMPATIBLE_FEATURES);
            raw.compatible_features = get(field::COMPATIBLE_FEATURES);
            raw.autoclear_features = get(field::AUTOCLEAR_FEATURES);
            raw.refcount_order = get(field::REFCOUNT_ORDER) as u32;
            raw.header_length = get(field::HEADER_LENGTH) as u32;
            if raw.header_length as usize > field::COMPRESSION_TYPE.at {
                raw.compression_type = get(field::COMPRESSION_TYPE) as u8;
            }
        }
        Ok(raw)
    }

    /// The write path changes single fields in place ([`HeaderUpdate`]) and never writes a whole
    /// header; tests build headers with this.
    ///
    /// The fixed fields as stored: 72 bytes for version 2, `header_length` bytes (at least 104, at
    /// most the largest cluster) for version 3, zeros where no field known here lies.
    #[cfg(test)]
    pub fn encode(&self) -> Vec<u8> {
        let v3 = self.version >= 3;
        let len = if v3 {
            (self.header_length as usize).clamp(V3_MIN_HEADER_LEN as usize, 1 << 21)
        } else {
            V2_HEADER_LEN
        };
        let mut out = vec![0u8; len];
        let mut put = |f: Field, value: u64| put(&mut out, f, value);
        put(field::MAGIC, self.magic.into());
        put(field::VERSION, self.version.into());
        put(field::BACKING_FILE_OFFSET, self.backing_file_offset);
        put(field::BACKING_FILE_SIZE, self.backing_file_size.into());
        put(field::CLUSTER_BITS, self.cluster_bits.into());
        put(field::SIZE, self.size);
        put(field::CRYPT_METHOD, self.crypt_method.into());
        put(field::L1_SIZE, self.l1_size.into());
        put(field::L1_TABLE_OFFSET, self.l1_table_offset);
        put(field::REFCOUNT_TABLE_OFFSET, self.refcount_table_offset);
        put(
            field::REFCOUNT_TABLE_CLUSTERS,
            self.refcount_table_clusters.into(),
        );
        put(field::NB_SNAPSHOTS, self.nb_snapshots.into());
        put(field::SNAPSHOTS_OFFSET, self.snapshots_offset);
        if v3 {
            put(field::INCOMPATIBLE_FEATURES, self.incompatible_features);
            put(field::COMPATIBLE_FEATURES, self.compatible_features);
            put(field::AUTOCLEAR_FEATURES, self.autoclear_features);
            put(field::REFCOUNT_ORDER, self.refcount_order.into());
            put(field::HEADER_LENGTH, self.header_length.into());
            if len > field::COMPRESSION_TYPE.at {
                put(field::COMPRESSION_TYPE, self.compression_type.into());
            }
        }
        out
    }
}

/// Store `value` big-endian in `f`'s bytes of `buf`, cut to the field's width.
fn put(buf: &mut [u8], f: Field, value: u64) {
    buf[f.at..f.end()].copy_from_slice(&value.to_be_bytes()[8 - f.width..]);
}

/// An in-place change of named header fields, as the write path makes it: one write of adjacent
/// fields inside the first sector, ordered by the caller's barriers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeaderUpdate {
    /// The refcount table moved: its offset and size, adjacent fields written together.
    RefcountTable { offset: u64, clusters: u32 },
    /// New autoclear feature bits (a writer that does not know them clears them).
    Autoclear(u64),
    /// Where the backing file name is; both 0 make the image stand alone.
    BackingFile { offset: u64, size: u32 },
}

impl HeaderUpdate {
    /// The one write that makes this change: file offset and bytes.
    pub fn encode(self) -> (u64, Vec<u8>) {
        match self {
            HeaderUpdate::RefcountTable { offset, clusters } => span(&[
                (field::REFCOUNT_TABLE_OFFSET, offset),
                (field::REFCOUNT_TABLE_CLUSTERS, clusters.into()),
            ]),
            HeaderUpdate::Autoclear(bits) => span(&[(field::AUTOCLEAR_FEATURES, bits)]),
            HeaderUpdate::BackingFile { offset, size } => span(&[
                (field::BACKING_FILE_OFFSET, offset),
                (field::BACKING_FILE_SIZE, size.into()),
            ]),
        }
    }
}

/// The bytes of adjacent `fields` (in order) and the offset of the first.
fn span(fields: &[(Field, u64)]) -> (u64, Vec<u8>) {
    let start = fields.first().map_or(0, |(f, _)| f.at);
    let end = fields.last().map_or(start, |(f, _)| f.end());
    let mut out = vec![0u8; end - start];
    for &(f, value) in fields {
        debug_assert!(f.at >= start && f.end() <= end, "{f:?} outside the span");
        put(
            &mut out,
            Field {
                at: f.at - start,
                width: f.width,
            },
            value,
        );
    }
    (start as u64, out)
}

/// One header extension: its type, its data, and all its bytes (type, length, data and the padding
/// to a multiple of 8), as ranges of the buffer it was found in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Extension {
    pub kind: u32,
    pub data: Range<usize>,
    pub bytes: Range<usize>,
}

/// The header extensions in `buf` from `start` (the header's end) on. The list ends at the end
/// marker (type 0) or where fewer than 8 bytes are left before `end`; an extension whose padded data
/// runs past `buf` is an error, after which nothing more is returned.
pub(crate) fn extensions(buf: &[u8], start: usize, end: usize) -> Extensions<'_> {
    Extensions {
        buf,
        at: start,
        end: end.min(buf.len()),
    }
}

/// Iterator of [`extensions`].
#[derive(Debug)]
pub(crate) struct Extensions<'a> {
    buf: &'a [u8],
    /// Offset of the next extension; `end` once finished.
    at: usize,
    end: usize,
}

impl Iterator for Extensions<'_> {
    type Item = Result<Extension, FormatError>;

    fn next(&mut self) -> Option<Self::Item> {
        let head = self.buf.get(self.at..self.end)?;
        let kind = field::EXT_TYPE.read(head)? as u32;
        let len = field::EXT_LENGTH.read(head)? as u32;
        let start = self.at;
        self.at = self.end;
        if kind == EXT_END {
            return None;
        }
        let data_start = start + field::EXT_DATA;
        let Some(padded_end) = usize::try_from(u64::from(len).div_ceil(8) * 8)
            .ok()
            .and_then(|padded| data_start.checked_add(padded))
            .filter(|&e| e <= self.buf.len())
        else {
            return Some(Err(FormatError::Extension { kind, len }));
        };
        self.at = padded_end;
        Some(Ok(Extension {
            kind,
            data: data_start..data_start + len as usize,
            bytes: start..padded_end,
        }))
    }
}

#[cfg(test)]
mod tests;
