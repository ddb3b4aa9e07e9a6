//! Unit tests of the on-disk record: field offsets against QEMU's docs/interop/qcow2.txt, decode and
//! encode of headers qemu-img made, in-place updates, and the extension list.

use super::super::qemu_fixtures::{V2, V3_BACKING, V3_EXTENDED_ZSTD, V3_LUKS};
use super::*;

#[test]
fn fields_sit_where_qcow2_txt_puts_them() {
    // (field, first byte, last byte) as the "Header" table of docs/interop/qcow2.txt lists them.
    let spec = [
        (field::MAGIC, 0, 3),
        (field::VERSION, 4, 7),
        (field::BACKING_FILE_OFFSET, 8, 15),
        (field::BACKING_FILE_SIZE, 16, 19),
        (field::CLUSTER_BITS, 20, 23),
        (field::SIZE, 24, 31),
        (field::CRYPT_METHOD, 32, 35),
        (field::L1_SIZE, 36, 39),
        (field::L1_TABLE_OFFSET, 40, 47),
        (field::REFCOUNT_TABLE_OFFSET, 48, 55),
        (field::REFCOUNT_TABLE_CLUSTERS, 56, 59),
        (field::NB_SNAPSHOTS, 60, 63),
        (field::SNAPSHOTS_OFFSET, 64, 71),
        (field::INCOMPATIBLE_FEATURES, 72, 79),
        (field::COMPATIBLE_FEATURES, 80, 87),
        (field::AUTOCLEAR_FEATURES, 88, 95),
        (field::REFCOUNT_ORDER, 96, 99),
        (field::HEADER_LENGTH, 100, 103),
        (field::COMPRESSION_TYPE, 104, 104),
    ];
    for (f, first, last) in spec {
        assert_eq!((f.at, f.end() - 1), (first, last), "{f:?}");
    }
    assert_eq!(V2_HEADER_LEN, 72);
    assert_eq!(V3_MIN_HEADER_LEN, 104);
    // Header extension: type 0..3, length 4..7, data from 8; FDE data: offset, then length.
    assert_eq!(
        (field::EXT_TYPE.at, field::EXT_LENGTH.at, field::EXT_DATA),
        (0, 4, 8)
    );
    assert_eq!((field::FDE_OFFSET.at, field::FDE_LENGTH.at), (0, 8));
}

#[test]
fn decodes_a_v2_header_from_qemu_img_and_encodes_it_back() {
    let bytes = V2.bytes();
    let raw = RawHeader::decode(&bytes).unwrap();
    assert_eq!(raw.magic, u32::from_be_bytes(MAGIC));
    assert_eq!(raw.version, 2);
    assert_eq!(raw.cluster_bits, 16);
    assert_eq!(raw.size, 1 << 20);
    assert_eq!((raw.l1_size, raw.l1_table_offset), (1, 0x3_0000));
    assert_eq!(
        (raw.refcount_table_offset, raw.refcount_table_clusters),
        (0x1_0000, 1)
    );
    // The version 3 fields take their version 2 meaning.
    assert_eq!((raw.refcount_order, raw.header_length), (4, 72));
    let encoded = raw.encode();
    assert_eq!(encoded.len(), V2_HEADER_LEN);
    assert_eq!(encoded, bytes[..V2_HEADER_LEN]);
}

#[test]
fn decodes_v3_headers_from_qemu_img_and_encodes_them_back() {
    for (name, fixture) in [
        ("backing", &V3_BACKING),
        ("extended L2, zstd", &V3_EXTENDED_ZSTD),
        ("LUKS", &V3_LUKS),
    ] {
        let bytes = fixture.bytes();
        let raw = RawHeader::decode(&bytes).unwrap();
        assert_eq!(raw.version, 3, "{name}");
        assert_eq!(raw.header_length, 112, "{name}");
        assert_eq!(raw.refcount_order, 4, "{name}");
        let encoded = raw.encode();
        assert_eq!(encoded.len(), 112, "{name}");
        assert_eq!(encoded, bytes[..112], "{name}");
        assert_eq!(RawHeader::decode(&encoded).unwrap(), raw, "{name}");
    }
    let backing = RawHeader::decode(&V3_BACKING.bytes()).unwrap();
    assert_eq!(
        (backing.backing_file_offset, backing.backing_file_size),
        (0x210, 8)
    );
    let ext = RawHeader::decode(&V3_EXTENDED_ZSTD.bytes()).unwrap();
    assert_eq!(ext.incompatible_features, 0x18); // compression type, extended L2
    assert_eq!(ext.compression_type, 1);
    assert_eq!(ext.size, 4 << 20);
    let luks = RawHeader::decode(&V3_LUKS.bytes()).unwrap();
    assert_eq!(luks.crypt_method, 2);
}

#[test]
fn encodes_every_field_of_a_record_back_to_where_it_was_read() {
    // Distinct values in every field: a field written to the wrong place or width breaks the round trip.
    let raw = RawHeader {
        magic: u32::from_be_bytes(MAGIC),
        version: 3,
        backing_file_offset: 0x0102_0304_0506_0708,
        backing_file_size: 0x1112_1314,
        cluster_bits: 0x2122_2324,
        size: 0x3132_3334_3536_3738,
        crypt_method: 0x4142_4344,
        l1_size: 0x5152_5354,
        l1_table_offset: 0x6162_6364_6566_6768,
        refcount_table_offset: 0x7172_7374_7576_7778,
        refcount_table_clusters: 0x8182_8384,
        nb_snapshots: 0x9192_9394,
        snapshots_offset: 0xa1a2_a3a4_a5a6_a7a8,
        incompatible_features: 0xb1b2_b3b4_b5b6_b7b8,
        compatible_features: 0xc1c2_c3c4_c5c6_c7c8,
        autoclear_features: 0xd1d2_d3d4_d5d6_d7d8,
        refcount_order: 0xe1e2_e3e4,
        header_length: 112,
        compression_type: 0xf1,
    };
    let bytes = raw.encode();
    assert_eq!(bytes.len(), 112);
    assert_eq!(RawHeader::decode(&bytes).unwrap(), raw);
    assert_eq!(&bytes[104..112], &[0xf1, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn a_v3_header_of_104_bytes_has_no_compression_type() {
    let mut bytes = V3_EXTENDED_ZSTD.bytes();
    bytes[field::HEADER_LENGTH.at..field::HEADER_LENGTH.end()]
        .copy_from_slice(&104u32.to_be_bytes());
    let raw = RawHeader::decode(&bytes).unwrap();
    assert_eq!((raw.header_length, raw.compression_type), (104, 0));
    assert_eq!(raw.encode(), bytes[..104]);
}

#[test]
fn decoding_needs_the_whole_version_2_header() {
    let bytes = V2.bytes();
    assert!(matches!(
        RawHeader::decode(&bytes[..71]),
        Err(FormatError::Truncated)
    ));
    assert_eq!(RawHeader::has_magic(&bytes[..3]), None);
    assert_eq!(RawHeader::has_magic(&bytes[..4]), Some(true));
    assert_eq!(RawHeader::has_magic(b"QFI\xfa"), Some(false));
}

#[test]
fn header_updates_write_exactly_the_fields_qcow2_txt_places() {
    assert_eq!(
        HeaderUpdate::RefcountTable {
            offset: 0x0000_0012_3456_0000,
            clusters: 0x0102_0304,
        }
        .encode(),
        (
            48,
            vec![0, 0, 0, 0x12, 0x34, 0x56, 0, 0, 1, 2, 3, 4] // bytes 48..55, then 56..59
        )
    );
    assert_eq!(HeaderUpdate::Autoclear(0).encode(), (88, vec![0; 8]));
    assert_eq!(
        HeaderUpdate::Autoclear(0x8000_0000_0000_0001).encode(),
        (88, vec![0x80, 0, 0, 0, 0, 0, 0, 1])
    );
    assert_eq!(
        HeaderUpdate::BackingFile { offset: 0, size: 0 }.encode(),
        (8, vec![0; 12]) // bytes 8..15, then 16..19
    );
}

#[test]
fn header_updates_change_only_their_fields_of_a_qemu_img_header() {
    let before = V3_BACKING.bytes();
    let old = RawHeader::decode(&before).unwrap();
    let apply = |update: HeaderUpdate| {
        let (at, bytes) = update.encode();
        let mut after = before.clone();
        after[at as usize..at as usize + bytes.len()].copy_from_slice(&bytes);
        RawHeader::decode(&after).unwrap()
    };
    let moved = apply(HeaderUpdate::RefcountTable {
        offset: 0x5_0000,
        clusters: 2,
    });
    assert_eq!(
        moved,
        RawHeader {
            refcount_table_offset: 0x5_0000,
            refcount_table_clusters: 2,
            ..old
        }
    );
    let cleared = apply(HeaderUpdate::Autoclear(0));
    assert_eq!(cleared, old);
    let standalone = apply(HeaderUpdate::BackingFile { offset: 0, size: 0 });
    assert_eq!(
        standalone,
        RawHeader {
            backing_file_offset: 0,
            backing_file_size: 0,
            ..old
        }
    );
}

#[test]
fn lists_the_extensions_qemu_img_writes() {
    let bytes = V3_BACKING.bytes();
    let found: Vec<Extension> = extensions(&bytes, 112, 0x210).map(Result::unwrap).collect();
    assert_eq!(
        found,
        [
            // Backing format "raw": 3 bytes of data padded to 8.
            Extension {
                kind: super::super::EXT_BACKING_FORMAT,
                data: 0x78..0x7b,
                bytes: 0x70..0x80,
            },
            // Feature name table: 8 entries of 48 bytes.
            Extension {
                kind: 0x6803_f857,
                data: 0x88..0x208,
                bytes: 0x80..0x208,
            },
        ]
    );
    let luks = V3_LUKS.bytes();
    let fde = extensions(&luks, 112, luks.len()).next().unwrap().unwrap();
    assert_eq!(fde.kind, 0x0537_be77);
    let data = &luks[fde.data];
    assert_eq!(field::FDE_OFFSET.read(data), Some(0x4_0000));
    assert_eq!(field::FDE_LENGTH.read(data), Some(0x1f_9000));
}

/// A header area of `len` bytes holding extensions (type, length) with zero data, each padded.
fn area(entries: &[(u32, u32)], len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    let mut at = 0;
    for &(kind, ext_len) in entries {
        b[at..at + 4].copy_from_slice(&kind.to_be_bytes());
        b[at + 4..at + 8].copy_from_slice(&ext_len.to_be_bytes());
        at += 8 + (ext_len as usize).div_ceil(8) * 8;
    }
    b
}

#[test]
fn pads_odd_extension_lengths_to_eight_bytes() {
    let b = area(&[(7, 1), (9, 9), (11, 0), (13, 16)], 96);
    let found: Vec<(u32, Range<usize>, Range<usize>)> = extensions(&b, 0, b.len())
        .map(|e| e.map(|e| (e.kind, e.data, e.bytes)).unwrap())
        .collect();
    assert_eq!(
        found,
        [
            (7, 8..9, 0..16),
            (9, 24..33, 16..40),
            (11, 48..48, 40..48),
            (13, 56..72, 48..72),
        ]
    );
}

#[test]
fn an_extension_running_past_the_buffer_is_an_error_and_ends_the_list() {
    // 17 bytes of data pad to 24, one byte more than the buffer has.
    let b = area(&[(7, 8), (9, 17)], 16 + 8 + 23);
    let mut it = extensions(&b, 0, b.len());
    assert_eq!(it.next().unwrap().unwrap().kind, 7);
    assert!(matches!(
        it.next(),
        Some(Err(FormatError::Extension { kind: 9, len: 17 }))
    ));
    assert!(it.next().is_none());
    // A length whose padding passes u32::MAX.
    let b = area(&[(7, u32::MAX)], 16);
    let mut it = extensions(&b, 0, b.len());
    assert!(matches!(
        it.next(),
        Some(Err(FormatError::Extension { len: u32::MAX, .. }))
    ));
    assert!(it.next().is_none());
}

#[test]
fn the_list_ends_at_the_end_marker_or_where_no_extension_header_fits() {
    let b = area(&[(7, 8), (EXT_END, 8), (9, 8)], 64);
    assert_eq!(extensions(&b, 0, b.len()).count(), 1);
    // Seven bytes before `end`: not even a type and a length.
    let b = area(&[(7, 8)], 16 + 7);
    assert_eq!(extensions(&b, 0, b.len()).count(), 1);
    // `end` before the data's end still yields the extension: the data may run up to the buffer's end.
    let b = area(&[(7, 16)], 24);
    assert_eq!(extensions(&b, 0, 8).count(), 1);
    // `end` past the buffer, a start past `end`, an empty buffer.
    let b = area(&[(7, 8)], 16);
    assert_eq!(extensions(&b, 0, 1 << 20).count(), 1);
    assert_eq!(extensions(&b, 20, 16).count(), 0);
    assert_eq!(extensions(&[], 0, 0).count(), 0);
}
