//! Unit tests of header parsing: byte-literal headers, patched field by field.

use super::*;

/// A minimal valid v3 header with 64 KiB clusters, a 1 MiB disk, L1 at 3 clusters and the refcount
/// table at 1 cluster, in a 4-cluster file.
pub(crate) fn v3_header() -> Vec<u8> {
    let mut b = vec![0u8; 65536];
    b[..4].copy_from_slice(&MAGIC);
    b[4..8].copy_from_slice(&3u32.to_be_bytes());
    b[20..24].copy_from_slice(&16u32.to_be_bytes());
    b[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
    b[36..40].copy_from_slice(&1u32.to_be_bytes());
    b[40..48].copy_from_slice(&(3u64 << 16).to_be_bytes());
    b[48..56].copy_from_slice(&(1u64 << 16).to_be_bytes());
    b[56..60].copy_from_slice(&1u32.to_be_bytes());
    b[96..100].copy_from_slice(&4u32.to_be_bytes());
    b[100..104].copy_from_slice(&112u32.to_be_bytes());
    b
}

const FILE_LEN: u64 = 4 << 16;

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

#[test]
fn parses_a_minimal_v3_header() {
    let h = Header::parse(&v3_header(), FILE_LEN).unwrap();
    assert_eq!(h.version, 3);
    assert_eq!(h.cluster_size(), 65536);
    assert_eq!(h.size, 1 << 20);
    assert_eq!(h.refcount_bits(), 16);
    assert_eq!(h.encryption, Encryption::None);
    assert!(h.backing_file.is_none());
}

#[test]
fn rejects_bad_magic() {
    let mut b = v3_header();
    b[0] = b'X';
    assert!(matches!(
        Header::parse(&b, FILE_LEN),
        Err(FormatError::BadMagic)
    ));
}

#[test]
fn rejects_unknown_version() {
    let mut b = v3_header();
    put32(&mut b, 4, 4);
    assert!(matches!(
        Header::parse(&b, FILE_LEN),
        Err(FormatError::UnsupportedVersion(4))
    ));
}

#[test]
fn rejects_cluster_bits_out_of_range() {
    for bits in [8, 22, 0xffff_ffff] {
        let mut b = v3_header();
        put32(&mut b, 20, bits);
        assert!(
            matches!(
                Header::parse(&b, FILE_LEN),
                Err(FormatError::ClusterBits(_))
            ),
            "{bits}"
        );
    }
}

#[test]
fn rejects_unknown_incompatible_bit() {
    let mut b = v3_header();
    put64(&mut b, 72, 1 << 20);
    assert!(matches!(
        Header::parse(&b, FILE_LEN),
        Err(FormatError::UnknownIncompatible(_))
    ));
}

#[test]
fn rejects_the_corrupt_bit() {
    let mut b = v3_header();
    put64(&mut b, 72, INCOMPAT_CORRUPT);
    assert!(matches!(
        Header::parse(&b, FILE_LEN),
        Err(FormatError::CorruptBit)
    ));
}

#[test]
fn rejects_a_huge_l1_table() {
    let mut b = v3_header();
    put32(&mut b, 36, 0x7fff_ffff);
    assert!(matches!(
        Header::parse(&b, FILE_LEN),
        Err(FormatError::TooLarge { .. })
    ));
}

#[test]
fn rejects_an_l1_table_too_small_for_the_disk() {
    let mut b = v3_header();
    put64(&mut b, 24, 1 << 40);
    assert!(matches!(
        Header::parse(&b, FILE_LEN),
        Err(FormatError::L1TooSmall { .. })
    ));
}

#[test]
fn rejects_a_misaligned_l1_table() {
    let mut b = v3_header();
    put64(&mut b, 40, (3 << 16) + 8);
    assert!(matches!(
        Header::parse(&b, FILE_LEN),
        Err(FormatError::Misaligned { .. })
    ));
}

#[test]
fn rejects_tables_beyond_the_end_of_the_file() {
    let mut b = v3_header();
    put64(&mut b, 40, 100 << 16);
    assert!(matches!(
        Header::parse(&b, FILE_LEN),
        Err(FormatError::BeyondEnd { .. })
    ));
}

#[test]
fn rejects_a_huge_refcount_table() {
    let mut b = v3_header();
    put32(&mut b, 56, 0xffff_ffff);
    assert!(matches!(
        Header::parse(&b, FILE_LEN),
        Err(FormatError::TooLarge { .. })
    ));
}

#[test]
fn rejects_a_backing_name_longer_than_qemu_allows() {
    let mut b = v3_header();
    put64(&mut b, 8, 512);
    put32(&mut b, 16, 2000);
    assert!(matches!(
        Header::parse(&b, FILE_LEN),
        Err(FormatError::BackingName(_))
    ));
}

#[test]
fn reads_backing_name_and_format_extension() {
    let mut b = v3_header();
    // backing format extension right after the header
    put32(&mut b, 112, EXT_BACKING_FORMAT);
    put32(&mut b, 116, 3);
    b[120..123].copy_from_slice(b"raw");
    put64(&mut b, 8, 256);
    put32(&mut b, 16, 8);
    b[256..264].copy_from_slice(b"base.img");
    let h = Header::parse(&b, FILE_LEN).unwrap();
    assert_eq!(h.backing_file.as_deref(), Some("base.img"));
    assert_eq!(h.backing_format.as_deref(), Some("raw"));
}

#[test]
fn rejects_an_extension_running_past_the_cluster() {
    let mut b = v3_header();
    put32(&mut b, 112, 0x1234_5678);
    put32(&mut b, 116, 0xffff_fff0);
    assert!(matches!(
        Header::parse(&b, FILE_LEN),
        Err(FormatError::Extension { .. })
    ));
}

#[test]
fn rejects_truncated_headers() {
    let b = v3_header();
    assert!(matches!(
        Header::parse(&b[..50], FILE_LEN),
        Err(FormatError::Truncated)
    ));
}

#[test]
fn v2_headers_have_sixteen_bit_refcounts() {
    let mut b = v3_header();
    put32(&mut b, 4, 2);
    let h = Header::parse(&b, FILE_LEN).unwrap();
    assert_eq!(h.refcount_order, 4);
    assert_eq!(h.incompatible, 0);
}

#[test]
fn rejects_backing_file_offset_that_overflows() {
    let mut b = v3_header();
    put64(&mut b, 8, u64::MAX - 3);
    put32(&mut b, 16, 8);
    assert!(matches!(
        Header::parse(&b, FILE_LEN),
        Err(FormatError::BackingName(_))
    ));
}

#[test]
fn rejects_an_extension_length_that_rounds_past_u32() {
    let mut b = v3_header();
    put32(&mut b, 112, 0x1234_5678);
    put32(&mut b, 116, u32::MAX);
    assert!(matches!(
        Header::parse(&b, FILE_LEN),
        Err(FormatError::Extension { len: u32::MAX, .. })
    ));
}

#[test]
fn rejects_a_table_offset_whose_end_overflows() {
    // Cluster-aligned and 8 bytes of table from the top of the address space.
    let top = !0xffff_u64;
    for (field, what) in [
        (40, "L1 table"),
        (48, "refcount table"),
        (64, "snapshot table"),
    ] {
        let mut b = v3_header();
        put32(&mut b, 60, 1);
        put64(&mut b, 64, 2 << 16);
        put64(&mut b, field, top);
        match Header::parse(&b, FILE_LEN) {
            Err(FormatError::BeyondEnd { what: w, .. }) => assert_eq!(w, what),
            other => panic!("{what}: {other:?}"),
        }
    }
}

#[test]
fn parses_the_headers_qemu_img_makes() {
    use super::qemu_fixtures::{V2, V3_BACKING, V3_EXTENDED_ZSTD, V3_LUKS};
    // Long enough for every table these headers name (the LUKS area ends below 2.1 MiB).
    let file_len = 4 << 20;
    let h = Header::parse(&V2.bytes(), file_len).unwrap();
    assert_eq!((h.version, h.refcount_order, h.header_length), (2, 4, 72));
    assert_eq!(h.l1_table_offset, 0x3_0000);

    let h = Header::parse(&V3_BACKING.bytes(), file_len).unwrap();
    assert_eq!(h.backing_file.as_deref(), Some("base.raw"));
    assert_eq!(h.backing_format.as_deref(), Some("raw"));
    assert_eq!(h.feature_names.len(), 8);
    assert!(h
        .feature_names
        .contains(&(1, 0, "lazy refcounts".to_string())));

    let h = Header::parse(&V3_EXTENDED_ZSTD.bytes(), file_len).unwrap();
    assert!(h.extended_l2());
    assert_eq!(h.compression, Compression::Zstd);
    assert_eq!(h.size, 4 << 20);

    let h = Header::parse(&V3_LUKS.bytes(), file_len).unwrap();
    assert_eq!(h.encryption, Encryption::Luks);
    assert_eq!(h.fde_header, Some((0x4_0000, 0x1f_9000)));
}
