//! Unit tests of opening and mapping: small images built byte by byte in a temporary file.

use super::*;

/// The minimal image of header::tests (64 KiB clusters, 1 MiB disk), padded to its 4 clusters.
fn image() -> (tempfile::TempDir, Qcow2Image) {
    image_with(None, &[])
}

/// `image` with L1[0] set to `l1` and the L2 table in cluster 2 starting with `l2`.
fn image_with(l1: Option<u64>, l2: &[u64]) -> (tempfile::TempDir, Qcow2Image) {
    let mut bytes = super::super::header::tests::v3_header();
    bytes.resize(4 << 16, 0);
    if let Some(l1) = l1 {
        bytes[3 << 16..(3 << 16) + 8].copy_from_slice(&l1.to_be_bytes());
    }
    for (i, word) in l2.iter().enumerate() {
        let at = (2 << 16) + i * 8;
        bytes[at..at + 8].copy_from_slice(&word.to_be_bytes());
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    std::fs::write(&path, &bytes).unwrap();
    let header = Header::parse(&bytes[..1 << 16], bytes.len() as u64).unwrap();
    let file = HostFile::open(&path, false).unwrap();
    (dir, Qcow2Image::open(file, header, false).unwrap())
}

fn snapshot(l1_table_offset: u64, l1_size: u32) -> Snapshot {
    Snapshot {
        id: "1".into(),
        name: "s".into(),
        l1_table_offset,
        l1_size,
        disk_size: None,
        date_sec: 0,
        vm_state_size: 0,
    }
}

#[test]
fn rejects_an_l1_entry_past_the_end_of_the_file() {
    let mut bytes = super::super::header::tests::v3_header();
    bytes.resize(4 << 16, 0);
    bytes[3 << 16..(3 << 16) + 8].copy_from_slice(&super::super::table::OFFSET_MASK.to_be_bytes());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.qcow2");
    std::fs::write(&path, &bytes).unwrap();
    let header = Header::parse(&bytes[..1 << 16], bytes.len() as u64).unwrap();
    let file = HostFile::open(&path, false).unwrap();
    let err = Qcow2Image::open(file, header, false).unwrap_err();
    assert!(err.to_string().contains("L2 table"), "{err}");
    assert!(err.to_string().contains("img.qcow2"), "{err}");
}

#[test]
fn reads_data_and_compressed_clusters_at_the_largest_host_offsets_without_overflow() {
    use super::super::table::{COMPRESSED, COPIED};
    let top_data = 0x00ff_ffff_ffff_0000 | COPIED;
    let top_compressed = COMPRESSED | u64::MAX >> 2;
    let (_dir, img) = image_with(Some((2 << 16) | COPIED), &[top_data, top_compressed]);
    let none = |_: u64, _: &mut [u8]| -> Result<()> { unreachable!() };
    let mut buf = vec![0xffu8; 4096];
    // Past the end of the file: zeros (as a hole reads), not an overflow.
    let (source, _) = img.map(60_000, 8000).unwrap();
    assert_eq!(
        source,
        ClusterSource::Data {
            host: 0x00ff_ffff_ffff_0000 + 60_000
        }
    );
    img.read(60_000, &mut buf, &none).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    let err = img.read(1 << 16, &mut buf, &none).unwrap_err();
    assert!(err.to_string().contains("decompress"), "{err}");
}

#[test]
fn reads_a_snapshot_l1_table_inside_the_file() {
    let (_dir, img) = image();
    assert_eq!(img.snapshot_l1(&snapshot(3 << 16, 2)).unwrap(), vec![0, 0]);
}

#[test]
fn rejects_a_snapshot_l1_table_whose_end_overflows_or_passes_the_file() {
    let (_dir, img) = image();
    for s in [snapshot(!0xffff_u64, 8), snapshot(3 << 16, 1 << 20)] {
        let err = img.snapshot_l1(&s).unwrap_err();
        assert!(err.to_string().contains("beyond the end"), "{err}");
    }
}
