//! Writes through L2 entries that a read refuses, through real read-write mounts: the write is
//! refused when it is made (EIO), nothing outside it changes, a healthy write beside it is kept,
//! and the mount ends normally. Found by the hostile-image kit rerun read-write (issue 22).

use crate::common;

use common::*;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The first L2 table of a fresh 1 GiB image with 64 KiB clusters: header, L1, refcount table
/// and block come first.
const FIRST_L2: u64 = 0x40000;

/// 1 GiB, 0x5a at 0 and 0x5b at 512 MiB, both written by qemu-io; the first L2 entry then set to
/// `entry`.
fn damaged_image(dir: &Path, entry: u64) -> Image {
    let image = qcow2(dir.join("u.qcow2"), 1 << 30).create();
    image.write_pattern(0, 64 * KIB, 0x5a);
    image.write_pattern(512 << 20, 64 * KIB, 0x5b);
    let first = read_be_u64(&image.path, FIRST_L2);
    assert_eq!(
        first & !(1 << 63),
        0x50000,
        "the first data cluster where qemu puts it"
    );
    patch_be_u64(&image.path, FIRST_L2, entry);
    image
}

/// Write `data` at `off` of the mounted disk and fsync; the errno of the first that fails.
fn write_and_sync(disk: &Path, off: u64, data: &[u8]) -> Result<(), i32> {
    let file = OpenOptions::new()
        .write(true)
        .open(disk)
        .expect("open disk");
    let errno = |e: std::io::Error| e.raw_os_error().unwrap_or(0);
    file.write_all_at(data, off).map_err(errno)?;
    file.sync_all().map_err(errno)
}

/// What `qemu-img check` finds wrong with `image`: the corruption count and its ERROR lines.
fn corruptions(image: &Image) -> (u64, Vec<String>) {
    let (r, v) = qemu_check_json(image, &[]);
    let mut lines: Vec<String> = r
        .stderr
        .lines()
        .chain(r.stdout_str().lines())
        .filter(|l| l.starts_with("ERROR"))
        .map(str::to_string)
        .collect();
    lines.sort();
    (json_count(&v, "corruptions"), lines)
}

/// The other guest data still reads as qemu wrote it, and `qemu-img check` finds only the damage
/// the test made (`before`), nothing qcowfs added.
fn assert_other_data_intact(image: &Image, before: &(u64, Vec<String>)) {
    image.qemu_io(&[format!("read -P 0x5b {} 65536", 512 << 20)]);
    assert_eq!(
        &corruptions(image),
        before,
        "qemu-img check after the refused write"
    );
}

#[test]
fn a_write_through_an_unaligned_l2_entry_is_refused_and_corrupts_nothing() {
    require_fuse();
    let dir = workdir();
    // Points 512 bytes into the data cluster: a write would run into the next host cluster,
    // the L2 table that maps 512 MiB.
    let image = damaged_image(dir.path(), (1 << 63) | 0x50200);
    let before = corruptions(&image);
    assert!(before.0 > 0, "the damaged entry itself: {before:?}");
    let mount = Mount::new(&image.path, &[] as &[&str]);
    let refused = write_and_sync(&mount.disk(), 0xfe00, &[0xee; 512]);
    assert_eq!(
        refused,
        Err(libc::EIO),
        "the write through the damaged entry"
    );
    // A healthy write elsewhere is stored.
    write_and_sync(&mount.disk(), 256 << 20, &[0x77; 4096]).expect("a healthy write");
    mount.umount().assert_success();
    assert_other_data_intact(&image, &before);
    image.qemu_io(&[format!("read -P 0x77 {} 4096", 256 << 20)]);
}

#[test]
fn a_write_through_an_entry_past_any_file_end_is_refused_at_once_and_umount_works() {
    require_fuse();
    let dir = workdir();
    // 2^56 - 64 KiB: accepted before, it failed every flush with EFBIG and wedged umount. No
    // refcount can count a cluster there, so the writable mount is refused outright (the write's
    // own refusal, behind it, is a unit test of src/qcow2/image); reading still works.
    let far = (1u64 << 56) - 64 * KIB;
    let image = damaged_image(dir.path(), (1 << 63) | far);
    let before = corruptions(&image);
    let never = dir.path().join("never");
    std::fs::create_dir(&never).expect("mountpoint");
    let refused = qcowfs(["mount".as_ref(), image.path.as_os_str(), never.as_os_str()]);
    assert!(
        !refused.status.success()
            && refused.stderr.contains("refcount 0 but is named 1 time(s)")
            && refused.stderr.contains("qemu-img check -r all"),
        "a writable mount over refcounts that cannot count the entry is refused: {}",
        refused.stderr
    );
    let mount = Mount::new(&image.path, &["--read-only"]);
    assert_eq!(
        read_at_bounded(&mount.disk(), 512 << 20, 65536),
        vec![0x5b; 65536],
        "the other data, read-only"
    );
    mount.umount().assert_success();
    assert_other_data_intact(&image, &before);
}
