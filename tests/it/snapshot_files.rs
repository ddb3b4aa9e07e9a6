//! Internal snapshots as read-only `snapshots/NAME` files, equal to `qemu-img convert -l NAME`
//! and unchanged by writes to `disk`; decrypted for AES images; one file per snapshot even when
//! names repeat or hold a slash.
//!
//! Each test prints the commands it ran (shown on failure: the steps to reproduce).

use crate::common;

use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::path::Path;

const PASS: &str = "snapshot files secret";

/// No mount options.
const NO_OPTS: &[&str] = &[];

/// `qemu-img convert -l NAME -O raw` of an internal snapshot of `image`, as bytes.
fn snapshot_raw(image: &Image, name: &str) -> Vec<u8> {
    let dest = tempfile::NamedTempFile::new().expect("temp raw file");
    let (mut args, target) = image.qemu_open_args();
    args.insert(0, "convert".into());
    args.extend(["-l".into(), name.into(), target, "-O".into(), "raw".into()]);
    args.push(dest.path().to_str().expect("test paths are UTF-8").into());
    qemu_img(&args);
    fs::read(dest.path()).expect("read converted snapshot")
}

/// The names in `MNT/snapshots`.
fn snapshot_files(mountpoint: &Path) -> BTreeSet<String> {
    fs::read_dir(mountpoint.join("snapshots"))
        .unwrap_or_else(|e| panic!("list {}/snapshots: {e}", mountpoint.display()))
        .map(|e| {
            e.expect("directory entry")
                .file_name()
                .into_string()
                .expect("UTF-8 name")
        })
        .collect()
}

/// Every snapshot file equals its recorded `qemu-img convert -l NAME` output.
fn assert_snapshots_equal(mountpoint: &Path, expected: &BTreeMap<&str, Vec<u8>>, when: &str) {
    for (name, raw) in expected {
        assert_same_bytes(
            &read_all_bounded(&mountpoint.join("snapshots").join(name)),
            raw,
            &format!("{when}: snapshots/{name} vs qemu-img convert -l"),
        );
    }
}

/// Opening a snapshot file for writing (or truncating it) must fail.
fn assert_snapshots_read_only(mountpoint: &Path, names: &[&str]) {
    for name in names {
        let path = mountpoint.join("snapshots").join(name);
        let meta = fs::metadata(&path).expect("stat snapshot file");
        assert!(
            meta.permissions().readonly(),
            "snapshots/{name} has write permission bits: {:o}",
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions())
        );
        // As root the permission bits alone would not stop a write: qcowfs must refuse it.
        assert!(
            OpenOptions::new().write(true).open(&path).is_err(),
            "snapshots/{name} opened for writing"
        );
        assert!(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .is_err(),
            "snapshots/{name} opened read-write"
        );
    }
}

#[test]
fn snapshot_files_equal_qemu_img_convert_l_and_stay_unchanged_by_writes_to_disk() {
    let dir = workdir();
    let size = 16 * MIB;
    let image = qcow2(dir.path().join("snap.qcow2"), size).create();
    image.qemu_io(&[
        "write -P 0x11 0 1M".into(),
        "write -P 0x12 5M 100k".into(),
        "write -P 0x13 15M 1M".into(),
    ]);
    image.snapshot("first");
    image.qemu_io(&[
        "write -P 0x21 512k 1M".into(),
        "write -z 5M 64k".into(),
        "discard 15M 512k".into(),
        "write -P 0x22 9M 3000".into(),
    ]);
    image.snapshot("before upgrade");
    image.qemu_io(&["write -P 0x31 0 64k".into(), "write -P 0x32 12M 2M".into()]);

    let names = ["first", "before upgrade"];
    let expected: BTreeMap<&str, Vec<u8>> = names
        .iter()
        .map(|&n| (n, snapshot_raw(&image, n)))
        .collect();
    assert_ne!(
        expected["first"], expected["before upgrade"],
        "the test wrote between snapshots"
    );
    let current = image.raw();

    let m = Mount::new(&image.path, NO_OPTS);
    assert_eq!(
        snapshot_files(m.mountpoint()),
        names.iter().map(|s| s.to_string()).collect(),
        "snapshots/ lists each internal snapshot by name"
    );
    assert_same_bytes(
        &read_all_bounded(&m.disk()),
        &current,
        "disk (current state)",
    );
    assert_snapshots_equal(m.mountpoint(), &expected, "after mounting");
    assert_snapshots_read_only(m.mountpoint(), &names);

    // Overwrite the whole disk: the clusters shared with the snapshots must be copied, not changed.
    let new_state = random_bytes(size as usize, 77);
    write_at_bounded(&m.disk(), 0, &new_state);
    assert_snapshots_equal(m.mountpoint(), &expected, "after overwriting disk");
    m.umount();

    assert_check_clean(&image);
    assert_same_bytes(
        &image.raw(),
        &new_state,
        "qemu's current state after the writes",
    );
    for name in names {
        assert_same_bytes(
            &snapshot_raw(&image, name),
            &expected[name],
            &format!("qemu-img convert -l {name} after writes through qcowfs"),
        );
    }
}

#[test]
fn an_aes_image_shows_its_snapshot_decrypted_and_read_only() {
    let dir = workdir();
    let size = 8 * MIB;
    let image = qcow2(dir.path().join("aes-snap.qcow2"), size)
        .aes(PASS)
        .create();
    image.write_random(0, MIB as usize, 1);
    image.write_random(3 * MIB + 4321, 700 * KIB as usize, 2);
    image.snapshot("nightly");
    image.write_random(512 * KIB, MIB as usize, 3);
    image.write_zeroes(3 * MIB + 64 * KIB, 128 * KIB);
    let expected: BTreeMap<&str, Vec<u8>> = [("nightly", snapshot_raw(&image, "nightly"))].into();
    let current = image.raw();
    assert_ne!(expected["nightly"], current);

    let opts = passphrase_opts(dir.path(), PASS);
    let mut ro = opts.clone();
    ro.push("--read-only".into());
    let m = Mount::new(&image.path, &ro);
    assert_eq!(
        snapshot_files(m.mountpoint()),
        ["nightly".to_string()].into()
    );
    assert_snapshots_equal(m.mountpoint(), &expected, "read-only mount");
    assert_snapshots_read_only(m.mountpoint(), &["nightly"]);
    m.umount();

    let m = Mount::new(&image.path, &opts);
    assert_snapshots_equal(m.mountpoint(), &expected, "read-write mount");
    assert_snapshots_read_only(m.mountpoint(), &["nightly"]);
    let data = compressible_bytes(2 * MIB as usize, 4);
    write_at_bounded(&m.disk(), 100 * KIB, &data);
    assert_snapshots_equal(m.mountpoint(), &expected, "after writing through disk");
    m.umount();
    assert_check_clean(&image);
    assert_same_bytes(
        &snapshot_raw(&image, "nightly"),
        &expected["nightly"],
        "qemu-img convert -l nightly after writes through qcowfs",
    );
}

#[test]
fn every_snapshot_has_its_own_file_even_when_names_repeat_or_hold_a_slash() {
    let dir = workdir();
    let image = qcow2(dir.path().join("names.qcow2"), 4 * MIB).create();
    // qemu allows two snapshots of one name (they differ by ID) and any byte but NUL in a name.
    for (i, name) in ["daily", "daily", "a/b"].iter().enumerate() {
        image.write_pattern(i as u64 * MIB, MIB, 0x11 * (i as u8 + 1));
        image.snapshot(name);
    }
    image.write_pattern(0, 4 * MIB, 0x99);
    let by_id: Vec<Vec<u8>> = (1..=3)
        .map(|id| snapshot_raw(&image, &format!("snapshot.id={id}")))
        .collect();

    let m = Mount::new(&image.path, &["--read-only"]);
    let mut names: Vec<String> = fs::read_dir(m.mountpoint().join("snapshots"))
        .expect("list snapshots/")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let distinct: BTreeSet<&String> = names.iter().collect();
    assert_eq!(
        distinct.len(),
        names.len(),
        "snapshots/ lists one name twice (the second snapshot of that name cannot be opened): {names:?}"
    );
    assert_eq!(names.len(), 3, "one file per snapshot: {names:?}");
    // Each file is a different snapshot: together they cover all three.
    let mut seen = BTreeSet::new();
    for name in &names {
        let bytes = read_all_bounded(&m.mountpoint().join("snapshots").join(name));
        let id = by_id
            .iter()
            .position(|raw| *raw == bytes)
            .unwrap_or_else(|| panic!("snapshots/{name} equals no snapshot of the image"));
        assert!(
            seen.insert(id + 1),
            "snapshots/{name} shows snapshot ID {} again",
            id + 1
        );
    }
    m.umount();
}
