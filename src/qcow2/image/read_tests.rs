//! Unit tests of the read path: what a layer reads itself, what it asks the layer below for, and
//! images qemu-io wrote (`qemu_images.rs`), read back as the commands that made them wrote them.

use std::cell::RefCell;

use super::qemu_images::{self, QemuImage};
use super::*;
use crate::crypto::QcowAes;

/// The layer below for `read`: fills what it is asked with `fill` and logs (offset, length).
struct Below {
    fill: u8,
    calls: RefCell<Vec<(u64, usize)>>,
}

impl Below {
    fn new(fill: u8) -> Self {
        Below {
            fill,
            calls: RefCell::new(Vec::new()),
        }
    }

    fn read(&self, guest: u64, buf: &mut [u8]) -> Result<()> {
        self.calls.borrow_mut().push((guest, buf.len()));
        buf.fill(self.fill);
        Ok(())
    }

    fn calls(&self) -> Vec<(u64, usize)> {
        self.calls.borrow().clone()
    }
}

fn read(img: &Qcow2Image, guest: u64, len: usize, below: &Below) -> Vec<u8> {
    let mut buf = vec![0xeeu8; len];
    img.read(guest, &mut buf, &|g, b| below.read(g, b)).unwrap();
    buf
}

fn open(image: &QemuImage) -> Qcow2Image {
    tiny::open_bytes(image.bytes(), false).unwrap()
}

#[test]
fn reads_data_zero_and_backing_pieces_of_one_range() {
    let cs = CS as usize;
    let mut t = TinyImage::new(BITS, 64 << 10);
    let first = tiny::pattern(0x10, cs);
    let last = tiny::pattern(0x30, cs);
    t.data(0, &first);
    t.set_entry(
        2 * CS,
        L2Entry {
            word: ZERO,
            bitmap: 0,
        },
    );
    t.data(3 * CS, &last);
    let img = t.open(false).unwrap();
    let below = Below::new(0xbb);
    // From the middle of cluster 0 to the middle of cluster 3.
    let got = read(&img, 100, 3 * cs, &below);
    assert_eq!(&got[..cs - 100], &first[100..]);
    assert!(got[cs - 100..2 * cs - 100].iter().all(|&b| b == 0xbb));
    assert!(got[2 * cs - 100..3 * cs - 100].iter().all(|&b| b == 0));
    assert_eq!(&got[3 * cs - 100..], &last[..100]);
    assert_eq!(below.calls(), vec![(CS, cs)]);
}

#[test]
fn a_zero_cluster_reads_zeros_though_its_host_cluster_holds_data() {
    let mut t = TinyImage::new(BITS, 64 << 10);
    let host = t.data(0, &[0x44; CS as usize]);
    t.set_entry(
        0,
        L2Entry {
            word: host | COPIED | ZERO,
            bitmap: 0,
        },
    );
    let img = t.open(false).unwrap();
    let below = Below::new(0xbb);
    assert_eq!(read(&img, 0, CS as usize, &below), vec![0; CS as usize]);
    assert!(below.calls().is_empty());
}

#[test]
fn version_2_reads_the_data_of_an_entry_with_bit_0_set() {
    let mut t = TinyImage::with_layout(Layout::new(BITS, 2, false), 64 << 10);
    let data = tiny::pattern(3, CS as usize);
    let host = t.data(0, &data);
    t.set_entry(
        0,
        L2Entry {
            word: host | COPIED | ZERO,
            bitmap: 0,
        },
    );
    let img = t.open(false).unwrap();
    assert_eq!(read(&img, 0, CS as usize, &Below::new(0xbb)), data);
}

#[test]
fn reads_compressed_clusters_of_either_compression_type() {
    for kind in [Compression::Zlib, Compression::Zstd] {
        let mut t = TinyImage::new(BITS, 64 << 10);
        t.compression = kind;
        let data = tiny::pattern(9, CS as usize);
        t.compressed(5 * CS, &data);
        let img = t.open(false).unwrap();
        assert_eq!(img.header().compression, kind);
        let below = Below::new(0xbb);
        assert_eq!(read(&img, 5 * CS, CS as usize, &below), data, "{kind:?}");
        assert_eq!(read(&img, 5 * CS + 300, 200, &below), &data[300..500]);
        assert!(below.calls().is_empty());
    }
}

#[test]
fn reads_the_pieces_of_one_compressed_cluster_after_decompressing_it_once() {
    let mut t = TinyImage::new(BITS, 64 << 10);
    let data = tiny::pattern(9, CS as usize);
    let host = t.compressed(CS, &data);
    let (img, probe) = t.open_probed(false).unwrap();
    let below = Below::new(0);
    let half = CS as usize / 2;
    assert_eq!(read(&img, CS, half, &below), &data[..half]);
    assert_eq!(read(&img, CS + half as u64, half, &below), &data[half..]);
    assert_eq!(probe.reads_at(host), 1);
}

#[test]
fn a_compressed_cluster_that_does_not_decompress_fails_naming_its_guest_cluster() {
    let mut t = TinyImage::new(BITS, 64 << 10);
    let host = t.compressed(2 * CS, &[1; CS as usize]);
    t.put(host, &[0xff; 64]);
    let img = t.open(false).unwrap();
    let mut buf = vec![0u8; 512];
    let err = img
        .read(2 * CS + 512, &mut buf, &|_, _| unreachable!())
        .unwrap_err();
    assert!(
        matches!(format_error(&err), FormatError::Decompress(at) if *at == 2 * CS),
        "{err}"
    );
}

#[test]
fn reads_data_and_compressed_clusters_at_the_largest_host_offsets_without_overflow() {
    let mut t = TinyImage::new(16, 1 << 20);
    let top_data = 0x00ff_ffff_ffff_0000 | COPIED;
    let top_compressed = COMPRESSED | u64::MAX >> 2;
    t.set_entry(
        0,
        L2Entry {
            word: top_data,
            bitmap: 0,
        },
    );
    t.set_entry(
        1 << 16,
        L2Entry {
            word: top_compressed,
            bitmap: 0,
        },
    );
    let img = t.open(false).unwrap();
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
    assert!(
        matches!(format_error(&err), FormatError::Decompress(0x10000)),
        "{err}"
    );
}

#[test]
fn reads_extended_l2_subclusters_from_data_zeros_and_the_layer_below() {
    let layout = Layout::new(14, 3, true);
    let cs = layout.cluster_size() as usize;
    let mut t = TinyImage::with_layout(layout, 64 << 10);
    let data = tiny::pattern(0x20, cs);
    let host = t.data(0, &data);
    // Subclusters 0..4 data, 4..6 zero, 6..32 from below.
    t.set_entry(
        0,
        L2Entry {
            word: host | COPIED,
            bitmap: L2Entry::bitmap_word(0b1111, 0b11_0000),
        },
    );
    let img = t.open(false).unwrap();
    let below = Below::new(0xbb);
    let got = read(&img, 0, cs, &below);
    assert_eq!(&got[..2048], &data[..2048]);
    assert!(got[2048..3072].iter().all(|&b| b == 0));
    assert!(got[3072..].iter().all(|&b| b == 0xbb));
    assert_eq!(below.calls(), vec![(3072, cs - 3072)]);
}

#[test]
fn decrypts_legacy_aes_sectors_numbered_by_guest_offset() {
    let key = b"qcowfs-unit";
    let mut t = TinyImage::new(BITS, 64 << 10);
    t.crypt_method = 1;
    let plain = tiny::pattern(0x40, CS as usize);
    let mut stored = plain.clone();
    // Guest cluster 6 lands in host cluster 4: the sector numbers must be the guest's.
    QcowAes::new(key)
        .encrypt(6 * CS / 512, &mut stored)
        .unwrap();
    let host = t.data(6 * CS, &stored);
    assert_eq!(host, 4 * CS);
    let mut img = t.open(false).unwrap();
    assert_eq!(img.encryption(), Encryption::Aes);
    img.set_cipher(Box::new(QcowAes::new(key)));
    assert_eq!(
        read(&img, 6 * CS + 512, 1024, &Below::new(0)),
        &plain[512..1536]
    );
}

#[test]
fn reads_the_compressed_data_and_zero_clusters_qemu_io_wrote() {
    let img = open(&qemu_images::COMPRESSED_ZLIB);
    assert_eq!(img.layout().cluster_size(), 4096);
    assert!(matches!(
        img.map(0, 4096).unwrap(),
        (ClusterSource::Compressed { host: 0x5000, .. }, 4096)
    ));
    assert!(matches!(
        img.map(4096, 4096).unwrap(),
        (ClusterSource::Compressed { host: 0x5016, .. }, 4096)
    ));
    assert_eq!(
        img.map(8192, 4096).unwrap(),
        (ClusterSource::Data { host: 0x6000 }, 4096)
    );
    assert_eq!(img.map(12288, 4096).unwrap(), (ClusterSource::Zero, 4096));
    let below = Below::new(0xbb);
    let got = read(&img, 0, 20 << 10, &below);
    let expect: Vec<u8> = [0x5a, 0xa5, 0x33, 0, 0xbb]
        .iter()
        .flat_map(|&b| [b; 4096])
        .collect();
    assert_eq!(got, expect);
    assert_eq!(below.calls(), vec![(16 << 10, 4096)]);
    // The zero cluster keeps its host cluster: it is rewritten by allocating, not in place.
    assert_eq!(img.write_target(12288).unwrap(), WriteTarget::Allocate);
    assert_eq!(
        img.write_target(8192).unwrap(),
        WriteTarget::InPlace { host: 0x6000 }
    );
}

#[test]
fn reads_the_zstd_cluster_qemu_io_wrote() {
    let img = open(&qemu_images::COMPRESSED_ZSTD);
    assert_eq!(img.header().compression, Compression::Zstd);
    let below = Below::new(0xbb);
    let got = read(&img, 0, 12 << 10, &below);
    assert!(got[..4096].iter().all(|&b| b == 0xbb));
    assert!(got[4096..8192].iter().all(|&b| b == 0x6b));
    assert!(got[8192..].iter().all(|&b| b == 0xbb));
    assert_eq!(below.calls(), vec![(0, 4096), (8192, 4096)]);
}

#[test]
fn reads_the_subclusters_qemu_io_wrote_with_extended_l2() {
    let img = open(&qemu_images::EXTENDED_L2);
    assert!(img.layout().extended_l2);
    let below = Below::new(0xbb);
    let got = read(&img, 0, 32 << 10, &below);
    let mut expect = vec![0xbbu8; 16 << 10];
    expect[1024..2048].fill(0x11);
    expect[4096..4608].fill(0);
    expect.extend_from_slice(&[0x22; 16 << 10]);
    assert_eq!(got, expect);
    assert_eq!(
        below.calls(),
        vec![(0, 1024), (2048, 2048), (4608, (16 << 10) - 4608)]
    );
    assert_eq!(
        img.map(1024, 1 << 20).unwrap(),
        (ClusterSource::Data { host: 0x14400 }, 1024)
    );
    assert_eq!(img.map(4096, 1 << 20).unwrap(), (ClusterSource::Zero, 512));
    assert_eq!(img.allocated_bytes().unwrap(), 1024 + (16 << 10));
}

#[test]
fn opens_the_qemu_images_for_writing() {
    for image in [
        &qemu_images::COMPRESSED_ZLIB,
        &qemu_images::COMPRESSED_ZSTD,
        &qemu_images::EXTENDED_L2,
    ] {
        let img = tiny::open_bytes(image.bytes(), true).unwrap();
        assert_eq!(img.virtual_size(), 64 << 10);
    }
}
