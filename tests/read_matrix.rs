//! The read-path matrix: images of every geometry and feature the issue names, built by qemu
//! tools, mounted read-only with qcowfs, and compared byte for byte with `qemu-img convert -O raw`.
//!
//! Each test prints the qemu command lines it ran (shown on failure: the steps to reproduce) and,
//! on a mismatch, the first differing offset.

mod common;

use common::*;
use serde_json::Value;
use std::ffi::OsString;
use std::fs;
use std::path::Path;
use std::time::Duration;

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

/// Mount options that give qcowfs `passphrase` through a file in `dir`.
fn passphrase_opts(dir: &Path, passphrase: &str) -> Vec<OsString> {
    let file = passphrase_file(dir, "passphrase", passphrase);
    vec!["--passphrase-file".into(), file.into()]
}

/// Mounts `image` read-only with `options` and checks that `disk` has the virtual size and the
/// same bytes as `qemu-img convert -O raw` (whole file, then random unaligned reads).
fn assert_mount_matches_qemu(image: &Image, options: &[OsString]) {
    let expected = image.raw();
    let mut opts: Vec<OsString> = vec!["--read-only".into()];
    opts.extend(options.iter().cloned());
    let mount = Mount::new(&image.path, &opts);
    let len = fs::metadata(mount.disk())
        .expect("stat MOUNTPOINT/disk")
        .len();
    assert_eq!(len, image.size, "size of MOUNTPOINT/disk");
    let actual = read_all_bounded(&mount.disk());
    assert_same_bytes(
        &actual,
        &expected,
        &format!(
            "{} read through qcowfs vs qemu-img convert -O raw",
            image.path.display()
        ),
    );
    assert_random_reads_match(&mount.disk(), &expected, 40, 0x5eed);
    mount.umount();
}

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

/// A base layer with random bytes everywhere, so anything an overlay fails to hide shows.
fn random_raw_base(path: &Path, size: usize, seed: u64) -> Image {
    raw_from_bytes(path, &random_bytes(size, seed))
}

// --- geometry: versions, cluster sizes, refcount widths ---------------------------------------

#[test]
fn reads_v2_image_with_512_byte_clusters() {
    let dir = workdir();
    let img = qcow2(dir.path().join("v2-512.qcow2"), SMALL)
        .v2()
        .cluster_size(512)
        .create();
    fill_typical(&img, 1);
    assert_mount_matches_qemu(&img, &[]);
}

#[test]
fn reads_v2_image_with_64k_clusters() {
    let dir = workdir();
    let img = qcow2(dir.path().join("v2-64k.qcow2"), MEDIUM).v2().create();
    fill_typical(&img, 2);
    assert_mount_matches_qemu(&img, &[]);
}

#[test]
fn reads_v3_image_with_512_byte_clusters() {
    let dir = workdir();
    let img = qcow2(dir.path().join("v3-512.qcow2"), SMALL)
        .cluster_size(512)
        .create();
    fill_typical(&img, 3);
    assert_mount_matches_qemu(&img, &[]);
}

#[test]
fn reads_v3_image_with_4k_clusters() {
    let dir = workdir();
    let img = qcow2(dir.path().join("v3-4k.qcow2"), MEDIUM)
        .cluster_size(4096)
        .create();
    fill_typical(&img, 4);
    assert_mount_matches_qemu(&img, &[]);
}

#[test]
fn reads_v3_image_with_64k_clusters() {
    let dir = workdir();
    let img = qcow2(dir.path().join("v3-64k.qcow2"), MEDIUM)
        .cluster_size(65536)
        .create();
    fill_typical(&img, 5);
    assert_mount_matches_qemu(&img, &[]);
}

#[test]
fn reads_v3_image_with_2m_clusters() {
    let dir = workdir();
    let img = qcow2(dir.path().join("v3-2m.qcow2"), 32 * MIB)
        .cluster_size(2 * MIB)
        .create();
    fill_typical(&img, 6);
    assert_mount_matches_qemu(&img, &[]);
}

#[test]
fn reads_image_whose_virtual_size_is_not_cluster_aligned() {
    let dir = workdir();
    let img = qcow2(dir.path().join("odd-size.qcow2"), 10_000_001).create();
    assert_eq!(img.size, 10_000_384, "qemu rounds the size to sectors");
    fill_typical(&img, 7);
    assert_mount_matches_qemu(&img, &[]);
}

#[test]
fn reads_image_with_1_bit_refcounts() {
    let dir = workdir();
    let img = qcow2(dir.path().join("rc1.qcow2"), SMALL)
        .refcount_bits(1)
        .cluster_size(4096)
        .create();
    fill_typical(&img, 8);
    assert_mount_matches_qemu(&img, &[]);
}

#[test]
fn reads_image_with_16_bit_refcounts() {
    let dir = workdir();
    let img = qcow2(dir.path().join("rc16.qcow2"), SMALL)
        .refcount_bits(16)
        .create();
    fill_typical(&img, 9);
    assert_mount_matches_qemu(&img, &[]);
}

#[test]
fn reads_image_with_64_bit_refcounts() {
    let dir = workdir();
    let img = qcow2(dir.path().join("rc64.qcow2"), SMALL)
        .refcount_bits(64)
        .cluster_size(512)
        .create();
    fill_typical(&img, 10);
    assert_mount_matches_qemu(&img, &[]);
}

// --- legacy AES ---------------------------------------------------------------------------------

#[test]
fn reads_aes_encrypted_v3_image() {
    let dir = workdir();
    let img = qcow2(dir.path().join("aes.qcow2"), MEDIUM)
        .aes("sesame")
        .create();
    fill_typical(&img, 11);
    assert_mount_matches_qemu(&img, &passphrase_opts(dir.path(), "sesame"));
}

#[test]
fn reads_aes_encrypted_v2_image_with_4k_clusters() {
    let dir = workdir();
    let img = qcow2(dir.path().join("aes-v2.qcow2"), SMALL)
        .v2()
        .cluster_size(4096)
        .aes("sesame")
        .create();
    fill_typical(&img, 12);
    assert_mount_matches_qemu(&img, &passphrase_opts(dir.path(), "sesame"));
}

#[test]
fn reads_aes_encrypted_image_with_512_byte_clusters() {
    let dir = workdir();
    let img = qcow2(dir.path().join("aes-512.qcow2"), SMALL)
        .cluster_size(512)
        .aes("x")
        .create();
    fill_typical(&img, 13);
    assert_mount_matches_qemu(&img, &passphrase_opts(dir.path(), "x"));
}

#[test]
fn reads_aes_encrypted_image_with_2m_clusters() {
    let dir = workdir();
    let img = qcow2(dir.path().join("aes-2m.qcow2"), MEDIUM)
        .cluster_size(2 * MIB)
        .aes("sesame")
        .create();
    fill_typical(&img, 14);
    assert_mount_matches_qemu(&img, &passphrase_opts(dir.path(), "sesame"));
}

#[test]
fn reads_aes_image_whose_passphrase_is_longer_than_16_bytes() {
    // Legacy AES uses the passphrase's first 16 bytes as the key.
    let dir = workdir();
    let pass = "correct horse battery staple";
    let img = qcow2(dir.path().join("aes-long.qcow2"), SMALL)
        .aes(pass)
        .create();
    fill_typical(&img, 15);
    assert_mount_matches_qemu(&img, &passphrase_opts(dir.path(), pass));
}

#[test]
fn reads_aes_image_with_passphrase_from_stdin() {
    let dir = workdir();
    let img = qcow2(dir.path().join("aes-stdin.qcow2"), SMALL)
        .aes("from stdin")
        .create();
    fill_typical(&img, 16);
    let expected = img.raw();
    let mount = Mount::with_stdin(
        &img.path,
        &["--read-only", "--passphrase-file", "-"],
        Some(b"from stdin\n"),
    );
    let actual = read_all_bounded(&mount.disk());
    assert_same_bytes(&actual, &expected, "AES image, passphrase from stdin");
    mount.umount();
}

// --- backing chains -----------------------------------------------------------------------------

#[test]
fn reads_three_layer_chain_of_raw_base_plain_qcow2_and_aes_top() {
    let dir = workdir();
    let base = random_raw_base(&dir.path().join("base.raw"), 6 * MIB as usize, 20);
    let mid = qcow2(dir.path().join("mid.qcow2"), 12 * MIB)
        .cluster_size(4096)
        .backing_named(&base, "base.raw")
        .create();
    mid.scatter_random(12 * MIB, 25, 100_000, 21);
    mid.write_zeroes(MIB, 3 * 65536);
    let top = qcow2(dir.path().join("top.qcow2"), MEDIUM)
        .aes("top secret")
        .backing_named(&mid, "mid.qcow2")
        .create();
    top.scatter_random(MEDIUM, 25, 100_000, 22);
    top.write_zeroes(5 * MIB + 17, 100_000);
    assert_mount_matches_qemu(&top, &passphrase_opts(dir.path(), "top secret"));
}

#[test]
fn reads_chain_of_qcow2_layers_with_different_cluster_sizes() {
    let dir = workdir();
    let base = qcow2(dir.path().join("base.qcow2"), MEDIUM)
        .cluster_size(512)
        .v2()
        .create();
    base.scatter_random(MEDIUM, 20, 300_000, 30);
    let mid = qcow2(dir.path().join("mid.qcow2"), MEDIUM)
        .cluster_size(2 * MIB)
        .backing(&base)
        .create();
    mid.scatter_random(MEDIUM, 10, 50_000, 31);
    let top = qcow2(dir.path().join("top.qcow2"), MEDIUM)
        .cluster_size(4096)
        .backing(&mid)
        .create();
    top.scatter_random(MEDIUM, 20, 20_000, 32);
    assert_mount_matches_qemu(&top, &[]);
}

#[test]
fn reads_aes_overlay_over_raw_base_like_nova() {
    // OpenStack nova: instances/_base/HASH (raw) and instances/UUID/disk backed by "../_base/HASH".
    let dir = workdir();
    let instances = dir.path().join("instances");
    fs::create_dir_all(instances.join("_base")).unwrap();
    fs::create_dir_all(instances.join("0b8f3c9e-uuid")).unwrap();
    let base = random_raw_base(
        &instances.join("_base/da39a3ee5e6b4b0d3255bfef95601890afd80709"),
        8 * MIB as usize,
        40,
    );
    let disk = qcow2(instances.join("0b8f3c9e-uuid/disk"), MEDIUM)
        .aes("nova key")
        .backing_named(&base, "../_base/da39a3ee5e6b4b0d3255bfef95601890afd80709")
        .create();
    disk.scatter_random(MEDIUM, 30, 100_000, 41);
    assert_mount_matches_qemu(&disk, &passphrase_opts(dir.path(), "nova key"));
}

#[test]
fn reads_relative_backing_when_the_image_path_given_is_relative() {
    // The daemon may change folders; the backing name is relative to the overlay's folder, not
    // to the working directory of either process.
    let dir = workdir();
    fs::create_dir_all(dir.path().join("_base")).unwrap();
    fs::create_dir_all(dir.path().join("inst")).unwrap();
    let base = random_raw_base(&dir.path().join("_base/hash"), 4 * MIB as usize, 50);
    let disk = qcow2(dir.path().join("inst/disk"), SMALL)
        .backing_named(&base, "../_base/hash")
        .create();
    disk.scatter_random(SMALL, 10, 100_000, 51);
    let expected = disk.raw();
    let mount = match Mount::try_new(Path::new("inst/disk"), &["--read-only"], None, dir.path()) {
        Ok(m) => m,
        Err(r) => panic!("mount of a relative IMAGE path failed:\n{}", r.stderr),
    };
    let actual = read_all_bounded(&mount.disk());
    assert_same_bytes(&actual, &expected, "relative IMAGE path, relative backing");
    mount.umount();
}

#[test]
fn reads_chain_whose_backing_format_extension_is_absent() {
    // Old images name the backing file without its format; the format is then probed. qemu-img
    // refuses to create such images today, so the extension is cut out of the header.
    let dir = workdir();
    let raw_base = random_raw_base(&dir.path().join("base.raw"), 4 * MIB as usize, 60);
    let over_raw = qcow2(dir.path().join("over-raw.qcow2"), SMALL)
        .backing_named(&raw_base, "base.raw")
        .create();
    over_raw.scatter_random(SMALL, 10, 100_000, 61);
    assert!(strip_header_extension(&over_raw.path, EXT_BACKING_FORMAT));
    let info = over_raw.qemu_info();
    assert!(
        info.get("backing-filename-format").is_none(),
        "the backing format is still recorded: {info}"
    );
    assert_mount_matches_qemu(&over_raw, &[]);

    let qcow_base = qcow2(dir.path().join("base.qcow2"), SMALL).create();
    qcow_base.scatter_random(SMALL, 10, 100_000, 62);
    let over_qcow = qcow2(dir.path().join("over-qcow2.qcow2"), SMALL)
        .backing_named(&qcow_base, "base.qcow2")
        .create();
    over_qcow.scatter_random(SMALL, 10, 100_000, 63);
    assert!(strip_header_extension(&over_qcow.path, EXT_BACKING_FORMAT));
    assert_mount_matches_qemu(&over_qcow, &[]);
}

#[test]
fn reads_chain_whose_backing_format_extension_is_present() {
    let dir = workdir();
    let base = qcow2(dir.path().join("base.qcow2"), SMALL).create();
    base.scatter_random(SMALL, 10, 100_000, 65);
    let top = qcow2(dir.path().join("top.qcow2"), SMALL)
        .backing_named(&base, "base.qcow2")
        .create();
    top.scatter_random(SMALL, 10, 100_000, 66);
    let info = top.qemu_info();
    assert_eq!(info["backing-filename-format"], "qcow2", "{info}");
    assert_mount_matches_qemu(&top, &[]);
}

#[test]
fn reads_past_backing_end_as_zeros() {
    let dir = workdir();
    // A raw base whose length is not even a whole sector.
    let base = random_raw_base(&dir.path().join("short.raw"), 5_000_003, 70);
    let over = qcow2(dir.path().join("over-raw.qcow2"), MEDIUM)
        .cluster_size(4096)
        .backing_named(&base, "short.raw")
        .create();
    over.write_random(4_999_000, 100, 71); // cluster straddling the base's end, partly written
    over.write_random(10 * MIB, 5000, 72);
    assert_mount_matches_qemu(&over, &[]);

    // A qcow2 base full of data up to its end, under a larger overlay.
    let qbase = qcow2(dir.path().join("short.qcow2"), 3 * MIB).create();
    qbase.write_random(0, 3 * MIB as usize, 73);
    let qover = qcow2(dir.path().join("over-qcow2.qcow2"), 12 * MIB)
        .backing_named(&qbase, "short.qcow2")
        .create();
    qover.write_random(3 * MIB - 1000, 600, 74);
    assert_mount_matches_qemu(&qover, &[]);
}

// --- zero and compressed clusters ---------------------------------------------------------------

#[test]
fn reads_zero_clusters_over_backing_data() {
    let dir = workdir();
    let base = random_raw_base(&dir.path().join("base.raw"), MEDIUM as usize, 80);
    let over = qcow2(dir.path().join("zeros.qcow2"), MEDIUM)
        .backing_named(&base, "base.raw")
        .create();
    let c = 65536;
    over.write_random(0, 3 * c as usize, 81);
    over.write_zeroes(0, c); // allocated before: zero flag, host offset kept
    over.write_zeroes_unmap(c, c); // allocated before: zero flag, offset dropped
    over.write_zeroes(4 * c, 2 * c); // never allocated: zero flag only
    over.write_zeroes(7 * c + 999, 12_345); // unaligned: qemu writes real zeros
    let map = qemu_map(&over);
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
    assert_mount_matches_qemu(&over, &[]);
}

#[test]
fn reads_zeroed_ranges_of_v2_image_over_backing_data() {
    // v2 has no zero flag: qemu writes zeros or deallocates.
    let dir = workdir();
    let base = random_raw_base(&dir.path().join("base.raw"), SMALL as usize, 85);
    let over = qcow2(dir.path().join("zeros-v2.qcow2"), SMALL)
        .v2()
        .backing_named(&base, "base.raw")
        .create();
    over.write_random(0, 200_000, 86);
    over.write_zeroes(0, 65536);
    over.write_zeroes(300_000, 100_000);
    assert_mount_matches_qemu(&over, &[]);
}

#[test]
fn reads_zlib_compressed_clusters() {
    let dir = workdir();
    let src = raw_from_bytes(
        dir.path().join("src.raw"),
        &compressible_bytes(SMALL as usize, 90),
    );
    for (name, options) in [
        ("zlib-64k.qcow2", "compression_type=zlib"),
        ("zlib-4k.qcow2", "compression_type=zlib,cluster_size=4096"),
        ("zlib-512-v2.qcow2", "compat=0.10,cluster_size=512"),
    ] {
        let img = convert_compressed(&src, dir.path().join(name), options);
        assert!(
            has_extent(&img, "compressed"),
            "{name} has no compressed cluster"
        );
        assert_mount_matches_qemu(&img, &[]);
    }
}

#[test]
fn reads_zstd_compressed_clusters() {
    let dir = workdir();
    let src = raw_from_bytes(
        dir.path().join("src.raw"),
        &compressible_bytes(SMALL as usize, 91),
    );
    for (name, options) in [
        ("zstd-64k.qcow2", "compression_type=zstd"),
        ("zstd-2m.qcow2", "compression_type=zstd,cluster_size=2M"),
    ] {
        let img = convert_compressed(&src, dir.path().join(name), options);
        assert!(
            has_extent(&img, "compressed"),
            "{name} has no compressed cluster"
        );
        assert_mount_matches_qemu(&img, &[]);
    }
}

#[test]
fn reads_compressed_clusters_written_over_a_backing_file() {
    let dir = workdir();
    let base = random_raw_base(&dir.path().join("base.raw"), SMALL as usize, 92);
    for kind in ["zlib", "zstd"] {
        let img = qcow2(dir.path().join(format!("wc-{kind}.qcow2")), SMALL)
            .compression(kind)
            .backing_named(&base, "base.raw")
            .create();
        let c = 65536;
        img.write_compressed(0, &compressible_bytes(2 * c, 93));
        img.write_compressed(5 * c as u64, &compressible_bytes(c, 94));
        img.write_compressed(SMALL - c as u64, &compressible_bytes(c, 95));
        // Partly overwrite a compressed cluster: qemu decompresses and reallocates it.
        img.write_random(c as u64 + 100, 300, 96);
        assert!(
            has_extent(&img, "compressed"),
            "{kind}: no compressed cluster"
        );
        assert_mount_matches_qemu(&img, &[]);
    }
}

// --- extended L2 --------------------------------------------------------------------------------

#[test]
fn reads_extended_l2_subclusters_over_a_backing_file() {
    let dir = workdir();
    let base = random_raw_base(&dir.path().join("base.raw"), MEDIUM as usize, 100);
    for (cluster, seed) in [(16 * KIB, 101), (64 * KIB, 102), (2 * MIB, 103)] {
        let sub = cluster / 32;
        let img = qcow2(dir.path().join(format!("ext-{cluster}.qcow2")), MEDIUM)
            .extended_l2()
            .cluster_size(cluster)
            .backing_named(&base, "base.raw")
            .create();
        img.scatter_random(MEDIUM, 30, 3 * sub, seed);
        // Zero subclusters: aligned (zero bits) and inside an allocated cluster.
        img.write_zeroes(5 * cluster + 3 * sub, 2 * sub);
        img.write_random(6 * cluster + sub, sub as usize, seed + 1);
        img.write_zeroes(6 * cluster, sub);
        img.write_zeroes_unmap(6 * cluster + 4 * sub, 4 * sub);
        assert_mount_matches_qemu(&img, &[]);
    }
}

#[test]
fn reads_aes_image_with_extended_l2() {
    let dir = workdir();
    let base = random_raw_base(&dir.path().join("base.raw"), SMALL as usize, 105);
    let img = qcow2(dir.path().join("aes-ext.qcow2"), SMALL)
        .extended_l2()
        .cluster_size(32 * KIB)
        .aes("sub")
        .backing_named(&base, "base.raw")
        .create();
    img.scatter_random(SMALL, 30, 5000, 106);
    img.write_zeroes(40 * KIB, 2 * KIB);
    assert_mount_matches_qemu(&img, &passphrase_opts(dir.path(), "sub"));
}

// --- internal snapshots -------------------------------------------------------------------------

#[test]
fn reads_current_state_of_image_with_internal_snapshots() {
    let dir = workdir();
    let img = qcow2(dir.path().join("snap.qcow2"), MEDIUM)
        .cluster_size(4096)
        .create();
    img.write_random(0, 2 * MIB as usize, 110);
    img.snapshot("first");
    img.scatter_random(2 * MIB, 20, 50_000, 111); // over clusters shared with "first"
    img.write_zeroes(MIB, 8192);
    img.snapshot("second");
    img.scatter_random(MEDIUM, 20, 50_000, 112);
    assert_mount_matches_qemu(&img, &[]);
}

#[test]
fn reads_current_state_of_aes_image_with_internal_snapshots() {
    let dir = workdir();
    let img = qcow2(dir.path().join("aes-snap.qcow2"), SMALL)
        .aes("snap")
        .create();
    img.write_random(0, MIB as usize, 115);
    img.snapshot("before");
    img.scatter_random(MIB, 10, 50_000, 116);
    assert_mount_matches_qemu(&img, &passphrase_opts(dir.path(), "snap"));
}

// --- encrypted chains ---------------------------------------------------------------------------

#[test]
fn reads_aes_overlay_over_aes_base_with_different_passphrases() {
    let dir = workdir();
    let base = qcow2(dir.path().join("base.qcow2"), SMALL)
        .aes("base pass")
        .create();
    base.write_random(0, 3 * MIB as usize, 120);
    let top = qcow2(dir.path().join("top.qcow2"), SMALL)
        .aes("top pass")
        .backing_named(&base, "base.qcow2")
        .create();
    top.scatter_random(SMALL, 20, 100_000, 121);
    let top_pass = passphrase_file(dir.path(), "top.pass", "top pass");
    let base_pass = passphrase_file(dir.path(), "base.pass", "base pass");
    let mut layer = OsString::from(base.path.as_os_str());
    layer.push("=");
    layer.push(&base_pass);
    assert_mount_matches_qemu(
        &top,
        &[
            "--passphrase-file".into(),
            top_pass.into(),
            "--layer-passphrase-file".into(),
            layer,
        ],
    );
}

#[test]
fn reads_aes_overlay_over_aes_base_sharing_one_passphrase() {
    let dir = workdir();
    let base = qcow2(dir.path().join("base.qcow2"), SMALL)
        .aes("shared")
        .create();
    base.write_random(0, 3 * MIB as usize, 125);
    let top = qcow2(dir.path().join("top.qcow2"), SMALL)
        .aes("shared")
        .backing_named(&base, "base.qcow2")
        .create();
    top.scatter_random(SMALL, 20, 100_000, 126);
    assert_mount_matches_qemu(&top, &passphrase_opts(dir.path(), "shared"));
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
    let base = random_raw_base(&dir.path().join("base.raw"), MIB as usize, 130);
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
