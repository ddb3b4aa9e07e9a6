//! Writes through L2 entries that a read refuses, through real read-write mounts: the write is
//! refused when it is made (EIO), nothing outside it changes, a healthy write beside it is kept,
//! and the mount ends normally. Found by the hostile-image kit rerun read-write (issue 22). And
//! tables that point into metadata: reads of the rest are served, a write never overwrites the
//! table, and a read-write mount is refused when an L1 entry names the refcount table.

use crate::common;

use common::*;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

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
        refused.status.code() == Some(7)
            && refused.stderr.contains("refcount 0 but is named 1 time(s)")
            && refused.stderr.contains("qcowfs check -r all"),
        "a writable mount over refcounts that cannot count the entry is refused as damaged \
         (exit 7): {:?} {}",
        refused.status.code(),
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

// --- tables that point into metadata -----------------------------------------------------------

/// How long one batch of I/O through a mount may take before the test fails instead of hanging.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// "Within a few seconds" for refusals.
const REFUSAL_LIMIT: Duration = Duration::from_secs(10);

// qcow2 header fields and entry bits (big endian).
const H_L1_SIZE: u64 = 36;

const H_L1_TABLE_OFFSET: u64 = 40;

const H_REFCOUNT_TABLE_OFFSET: u64 = 48;

const ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

const ENTRY_COPIED: u64 = 1 << 63;

/// A 16 MiB image with 64 KiB clusters and data in [0, 4 MiB) and [8, 10 MiB); returns it and the
/// offsets of its L1 table and of the L2 table L1[0] points to.
fn image_with_tables(dir: &Path, name: &str, seed: u64) -> (Image, u64, u64) {
    let img = qcow2(dir.join(name), 16 * MIB).create();
    img.write_random(0, 4 * MIB as usize, seed);
    img.write_random(8 * MIB, 2 * MIB as usize, seed + 1);
    let l1 = read_be_u64(&img.path, H_L1_TABLE_OFFSET);
    let l2 = read_be_u64(&img.path, l1) & ENTRY_OFFSET_MASK;
    assert_ne!(l2, 0, "L1[0] of {} has no L2 table", img.path.display());
    (img, l1, l2)
}

/// Points the L2 entry of guest cluster `cluster` at host offset `host` (COPIED, like a cluster
/// the image owns alone), and checks with `qemu-img map` that qemu sees it so.
fn point_data_cluster_at(img: &Image, l2: u64, cluster: u64, host: u64) {
    patch_be_u64(&img.path, l2 + cluster * 8, ENTRY_COPIED | host);
    let mapped = qemu_map(img).iter().any(|e| {
        e["start"].as_u64() == Some(cluster * 64 * KIB) && e["offset"].as_u64() == Some(host)
    });
    assert!(
        mapped,
        "qemu-img map does not show guest cluster {cluster} at host {host:#x} after the patch"
    );
}

#[test]
fn a_read_only_mount_serves_the_rest_of_an_image_whose_l2_entry_points_at_the_l1_table_and_eio_there(
) {
    let dir = workdir();
    let (img, l1, l2) = image_with_tables(dir.path(), "l2-at-l1.qcow2", 1500);
    let original = img.raw();
    let cs = 64 * KIB as usize;
    let bad = 3usize;
    point_data_cluster_at(&img, l2, bad as u64, l1);
    // qemu's own reading of the undamaged range is unchanged.
    let patched = img.raw();
    assert_same_bytes(
        &patched[..bad * cs],
        &original[..bad * cs],
        "qemu before cluster 3",
    );
    assert_same_bytes(
        &patched[(bad + 1) * cs..],
        &original[(bad + 1) * cs..],
        "qemu after cluster 3",
    );

    let mount = Mount::new(&img.path, &["--read-only"]);
    let disk = mount.disk();
    let (before, after, damaged) = within(IO_TIMEOUT, "reads of a damaged image", move || {
        let f = File::open(&disk).expect("open disk");
        let mut damaged = vec![0u8; cs];
        let damaged = f
            .read_exact_at(&mut damaged, (bad * cs) as u64)
            .map(|()| damaged);
        let mut before = vec![0u8; bad * cs];
        let before = f.read_exact_at(&mut before, 0).map(|()| before);
        let mut after = vec![0u8; 16 * MIB as usize - (bad + 1) * cs];
        let after = f
            .read_exact_at(&mut after, ((bad + 1) * cs) as u64)
            .map(|()| after);
        (before, after, damaged)
    });
    assert_same_bytes(
        &before.expect("read before the damaged cluster"),
        &original[..bad * cs],
        "read-only mount before the damaged cluster",
    );
    assert_same_bytes(
        &after.expect("read after the damaged cluster"),
        &original[(bad + 1) * cs..],
        "read-only mount after the damaged cluster",
    );
    match damaged {
        Ok(bytes) => panic!(
            "reading guest cluster {bad}, whose L2 entry points at the L1 table ({l1:#x}), \
             succeeded (first bytes {:02x?}); expected EIO",
            &bytes[..16]
        ),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "damaged cluster: {e}"),
    }
    mount.umount();
}

#[test]
fn a_write_to_a_cluster_whose_l2_entry_points_at_the_l1_table_never_overwrites_the_l1_table() {
    let dir = workdir();
    let (img, l1, l2) = image_with_tables(dir.path(), "write-at-l1.qcow2", 1600);
    let bad = 3u64;
    point_data_cluster_at(&img, l2, bad, l1);
    let l1_len = u64::from(read_be_u32(&img.path, H_L1_SIZE)) * 8;
    let l1_before = read_range(&img.path, l1, l1_len);

    // The mount succeeds (the damage is in one L2 entry, found when it is used); the write there
    // fails with EIO, and the data it could not write keeps the mount (the guard forces it away).
    let mount = Mount::new(&img.path, &[] as &[&str]);
    let disk = mount.disk();
    let result = within(IO_TIMEOUT, "write over the damaged cluster", move || {
        let d = OpenOptions::new().write(true).open(&disk)?;
        d.write_all_at(&[0x22u8; 64 * 1024], bad * 64 * KIB)?;
        d.sync_all()
    });
    match result {
        Ok(()) => panic!("a write over a data cluster that points at the L1 table succeeded"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "write failed with {e}"),
    }
    drop(mount);
    assert_eq!(
        read_range(&img.path, l1, l1_len),
        l1_before,
        "the L1 table at {l1:#x} was overwritten through a data cluster that points at it"
    );
}

#[test]
fn a_read_write_mount_is_refused_when_an_l1_entry_points_an_l2_table_at_the_refcount_table() {
    let dir = workdir();
    let (img, l1, _) = image_with_tables(dir.path(), "l2-at-refcounts.qcow2", 1700);
    let refcount_table = read_be_u64(&img.path, H_REFCOUNT_TABLE_OFFSET);
    patch_be_u64(&img.path, l1, ENTRY_COPIED | refcount_table);
    let before = fs::read(&img.path).expect("read image");

    let r = mount_failure(&img.path, &[] as &[&str], None);
    assert_one_line_error(&r, &[file_name(&img.path)], REFUSAL_LIMIT);
    assert!(
        fs::read(&img.path).expect("read image") == before,
        "a refused mount changed the image"
    );
    // Read-only, the table's "entries" (refcount block offsets) point into metadata: EIO, and the
    // daemon lives on.
    let mount = Mount::new(&img.path, &["--read-only"]);
    let disk = mount.disk();
    let first = within(IO_TIMEOUT, "read through the bogus L2 table", move || {
        let f = File::open(&disk).expect("open disk");
        let mut buf = vec![0u8; 4096];
        f.read_exact_at(&mut buf, 0).map(|()| buf)
    });
    match first {
        Ok(bytes) => panic!(
            "guest cluster 0, mapped by an L2 table that is the refcount table, read as data \
             (first bytes {:02x?}); expected EIO",
            &bytes[..16]
        ),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
    }
    mount.umount();
}

/// `len` bytes of the image file at `off`.
fn read_range(path: &Path, off: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    File::open(path)
        .expect("open image")
        .read_exact_at(&mut buf, off)
        .expect("read image file");
    buf
}
