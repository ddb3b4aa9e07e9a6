//! Unit tests of the chain: backing names, confinement, keys, and reads through layers held in
//! memory (a qcow2 layer built by `qcow2::tiny` over a raw layer).

use super::*;
use crate::qcow2::table::{L2Entry, ZERO};
use crate::qcow2::tiny::{self, TinyImage};

/// 4 KiB clusters.
const CS: u64 = 4096;

#[test]
fn rejects_key_material_whose_offset_overflows() {
    assert!(matches!(
        key_material_at(1 << 16, u64::MAX, u64::MAX - 10, 4096),
        Err(CryptoError::BadLuksHeader("key material offset overflows"))
    ));
    assert!(matches!(
        key_material_at(u64::MAX - 4096, u64::MAX, 1 << 20, 4096),
        Err(CryptoError::BadLuksHeader("key material offset overflows"))
    ));
}

#[test]
fn rejects_key_material_past_the_end_of_the_luks_area() {
    assert!(key_material_at(1 << 16, 1 << 20, (1 << 20) - 512, 4096).is_err());
    assert_eq!(
        key_material_at(1 << 16, 1 << 20, 4096, 4096).unwrap(),
        0x11000
    );
}

#[test]
fn resolves_backing_names_relative_to_the_folder_of_the_image_naming_them() {
    let top = Path::new("/images/vm/top.qcow2");
    assert_eq!(
        resolve_backing(top, "base.raw"),
        Path::new("/images/vm/base.raw")
    );
    assert_eq!(
        resolve_backing(top, "../_base/b.qcow2"),
        Path::new("/images/vm/../_base/b.qcow2")
    );
    assert_eq!(
        resolve_backing(top, "/elsewhere/b.raw"),
        Path::new("/elsewhere/b.raw")
    );
    assert_eq!(
        resolve_backing(Path::new("top.qcow2"), "base.raw"),
        Path::new("base.raw")
    );
}

#[test]
fn confines_backing_files_to_the_given_folders_after_following_symlinks() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    let inside = root.join("in");
    let outside = root.join("out");
    std::fs::create_dir_all(&inside).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(inside.join("base.raw"), b"x").unwrap();
    std::fs::write(outside.join("secret"), b"x").unwrap();
    std::os::unix::fs::symlink(outside.join("secret"), inside.join("link")).unwrap();
    let within = [inside.clone()];

    // No folders given: anything goes, even a path that does not exist.
    confine(Path::new("/no/such/file"), &[]).unwrap();
    confine(&inside.join("base.raw"), &within).unwrap();
    for refused in [outside.join("secret"), inside.join("link")] {
        let err = confine(&refused, &within).unwrap_err();
        assert!(
            matches!(&err.problem, crate::Problem::Refused(m) if m.contains("outside every --backing-within folder")),
            "{err}"
        );
        assert_eq!(err.path, refused);
    }
    let err = confine(&inside.join("missing"), &within).unwrap_err();
    assert!(matches!(&err.problem, crate::Problem::Io(_)), "{err}");
}

#[test]
fn finds_a_layer_key_by_its_canonical_or_literal_path_before_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("a.qcow2");
    std::fs::write(&image, b"x").unwrap();
    let key = |k: &[u8]| Zeroizing::new(k.to_vec());
    let ring = KeyRing {
        default: Some(key(b"default")),
        per_layer: vec![
            (std::fs::canonicalize(&image).unwrap(), key(b"a")),
            (PathBuf::from("/gone/b.qcow2"), key(b"b")),
        ],
    };
    // Named through a symlink: found by the path it resolves to.
    let link = dir.path().join("link.qcow2");
    std::os::unix::fs::symlink(&image, &link).unwrap();
    assert_eq!(ring.for_layer(&link), Some(&b"a"[..]));
    assert_eq!(ring.for_layer(Path::new("/gone/b.qcow2")), Some(&b"b"[..]));
    assert_eq!(
        ring.for_layer(Path::new("/gone/c.qcow2")),
        Some(&b"default"[..])
    );
    let bare = KeyRing::default();
    assert_eq!(bare.for_layer(&image), None);
}

#[test]
fn a_layer_is_outside_the_tree_when_it_leaves_the_folder_above_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let root = std::fs::canonicalize(dir.path()).unwrap();
    for d in ["tree/instance", "tree/_base", "other"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let image = root.join("tree/instance/disk");
    let base = root.join("tree/_base/b");
    let stray = root.join("other/b");
    for f in [&image, &base, &stray] {
        std::fs::write(f, b"x").unwrap();
    }
    assert_eq!(outside_tree(&image, &base), None);
    assert_eq!(outside_tree(&image, &stray), Some(stray.clone()));
}

/// Top: 64 KiB, cluster 1 data (0x71), cluster 2 a zero cluster, the rest unallocated; below it a
/// raw layer of 40000 bytes of `tiny::pattern(5, ..)`.
fn two_layers() -> (Chain, Vec<u8>, Vec<u8>) {
    let mut t = TinyImage::new(12, 64 << 10);
    t.backing = Some("base.raw".into());
    let data = vec![0x71u8; CS as usize];
    t.data(CS, &data);
    t.set_entry(
        2 * CS,
        L2Entry {
            word: ZERO,
            bitmap: 0,
        },
    );
    let base = tiny::pattern(5, 40_000);
    let raw = HostFile::in_memory(Path::new("base.raw"), base.clone());
    let chain = Chain::from_layers(vec![
        Layer::Qcow2(Arc::new(t.open(false).unwrap())),
        Layer::Raw(raw),
    ]);
    (chain, data, base)
}

#[test]
fn reads_through_a_qcow2_layer_into_a_shorter_raw_layer() {
    let (chain, data, base) = two_layers();
    assert_eq!(chain.size(), 64 << 10);
    assert_eq!(chain.layers().len(), 2);
    let mut got = vec![0xeeu8; 64 << 10];
    chain.read(0, &mut got).unwrap();
    let mut expect = base.clone();
    expect.resize(64 << 10, 0);
    expect[CS as usize..2 * CS as usize].copy_from_slice(&data);
    expect[2 * CS as usize..3 * CS as usize].fill(0);
    assert_eq!(got, expect);
    // The lower layer alone: its bytes, zeros past its end.
    let mut low = vec![0xeeu8; 1000];
    chain.read_level(1, 39_500, &mut low).unwrap();
    assert_eq!(&low[..500], &base[39_500..]);
    assert!(low[500..].iter().all(|&b| b == 0));
    // Below the last layer: zeros.
    chain.read_level(2, 0, &mut low).unwrap();
    assert!(low.iter().all(|&b| b == 0));
}

#[test]
fn tells_which_layer_provides_each_range_and_counts_their_bytes() {
    let (chain, _, _) = two_layers();
    assert_eq!(chain.provider(0, 64 << 10).unwrap(), (Some(1), CS));
    assert_eq!(
        chain.provider(CS + 10, 64 << 10).unwrap(),
        (Some(0), CS - 10)
    );
    assert_eq!(chain.provider(2 * CS, 64 << 10).unwrap(), (None, CS));
    // Cluster 9 (36864..40960) is unallocated on top; the raw layer ends at 40000.
    assert_eq!(chain.provider(40_000, 64 << 10).unwrap(), (None, 960));
    assert_eq!(chain.data_extent(3 * CS, 100).unwrap(), (true, 100));
    assert_eq!(chain.coverage().unwrap(), vec![CS, 40_000 - 2 * CS]);
    assert_eq!(chain.data_bytes().unwrap(), 40_000 - CS);
}

#[test]
fn reads_a_qcow2_layer_ending_inside_a_sector_as_zeros_past_its_size() {
    let mut t = TinyImage::new(12, 10_000);
    t.data(2 * CS, &[0x77; CS as usize]);
    let chain = Chain::from_layers(vec![Layer::Qcow2(Arc::new(t.open(false).unwrap()))]);
    assert_eq!(chain.size(), 10_000);
    let mut got = vec![0xeeu8; 1024];
    chain.read(9728, &mut got).unwrap();
    assert!(got[..272].iter().all(|&b| b == 0x77));
    assert!(got[272..].iter().all(|&b| b == 0));
}
