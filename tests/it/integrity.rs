//! Regressions for the data-loss holes adversarial testing found (issue 13): aliased files that
//! disagree, partition tables that move, block devices and FIFOs as backing files, truncated images
//! whose allocator cross-linked clusters, writes that cannot be stored, and a hostile header field.
//! Each test fails on the code before its fix. QEMU is the oracle throughout.

use crate::common;

use common::*;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Refusals come within this; a hang fails the test instead of the suite.
const REFUSAL_LIMIT: Duration = Duration::from_secs(5);

fn pwrite(path: &Path, off: u64, data: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for writing");
    f.write_all_at(data, off).expect("pwrite");
    f.sync_all().expect("fsync");
}

// --- hole 4: a truncated image ---------------------------------------------------------------

#[test]
fn a_write_to_an_image_truncated_inside_its_data_never_lands_on_a_referenced_cluster() {
    let dir = workdir();
    let img = qcow2(dir.path().join("t.qcow2"), 4 * MIB).create();
    img.write_pattern(0, 128 * KIB, 0x5a);
    img.write_pattern(MIB, 64 * KIB, 0x5b);
    // Cut the file inside its data: clusters the L2 table and refcounts still name lie past the end.
    truncate_file(&img.path, 0x60000);
    let before = img.raw();

    let m = Mount::new(&img.path, &[] as &[&str]);
    pwrite(&m.disk(), 2 * MIB, &vec![0xa3; 64 * KIB as usize]);
    m.umount();

    let mut expected = before;
    expected[2 * MIB as usize..(2 * MIB + 64 * KIB) as usize].fill(0xa3);
    assert_same_bytes(
        &img.raw(),
        &expected,
        "guest after one write to a truncated image",
    );
    assert_check_no_corruption(&img);
}

// --- holes 3 and 6: what a backing file may be ---------------------------------------------------

#[test]
fn a_block_device_backing_file_reads_as_its_contents_and_seal_copies_it_all() {
    let dir = workdir();
    let base_file = dir.path().join("base.raw");
    let data = random_bytes(8 * MIB as usize, 31);
    fs::write(&base_file, &data).expect("write base");
    let dev = LoopDevice::attach(&base_file);
    let base = Image::plain(&dev.device, Format::Raw, 8 * MIB);
    let top = qcow2(dir.path().join("top.qcow2"), 8 * MIB)
        .aes("blk")
        .backing(&base)
        .create();
    let key = dir.path().join("key");
    fs::write(&key, "blk").expect("key");

    let info = qcowfs_info_json(&top.path, &[]);
    let layers = info["layers"].as_array().expect("layers");
    assert_eq!(
        layers[1]["virtual_size"].as_u64(),
        Some(8 * MIB),
        "info of the device layer: {info}"
    );

    // The overlay holds no data yet: its key cannot be verified (tests/it/key_discipline.rs).
    let m = Mount::new(
        &top.path,
        &[
            "--unverified-key".as_ref(),
            "--passphrase-file".as_ref(),
            key.as_os_str(),
        ],
    );
    assert_same_bytes(
        &read_all_bounded(&m.disk()),
        &data,
        "disk over a block device",
    );
    // A partial write keeps the rest of its cluster from the device.
    pwrite(&m.disk(), 3 * MIB + 100, b"partial");
    m.umount();

    let mut expected = data.clone();
    expected[(3 * MIB + 100) as usize..(3 * MIB + 107) as usize].copy_from_slice(b"partial");
    assert_same_bytes(&top.raw(), &expected, "qemu's view after a partial write");

    // The device holds random bytes, and so does the one cluster the overlay owns: the right
    // key decrypts to noise as a wrong one would, so the key check is told to stand aside.
    let r = qcowfs([
        "seal".as_ref(),
        "--force".as_ref(),
        "--passphrase-file".as_ref(),
        key.as_os_str(),
        top.path.as_os_str(),
    ]);
    r.assert_success();
    let sealed = Image {
        secrets: vec![Some("blk".into())],
        ..Image::plain(&top.path, Format::Qcow2, 8 * MIB)
    };
    assert!(
        sealed.qemu_info().get("backing-filename").is_none(),
        "seal dropped the backing file"
    );
    drop(dev);
    assert_same_bytes(
        &sealed.raw(),
        &expected,
        "the sealed image, device detached",
    );
    assert_eq!(
        fs::read(&base_file).expect("base"),
        data,
        "the device is unchanged"
    );
    assert_check_clean(&sealed);
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().expect("UTF-8")).expect("no NUL");
    // SAFETY: a valid C string and a plain mode.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

#[test]
fn a_fifo_backing_file_is_refused_by_info_and_mount_within_a_second() {
    let dir = workdir();
    let base = create_raw(dir.path().join("base.raw"), 4 * MIB);
    let top = qcow2(dir.path().join("top.qcow2"), 4 * MIB)
        .backing(&base)
        .create();
    fs::remove_file(&base.path).expect("remove base");
    mkfifo(&base.path);

    let started = Instant::now();
    let r = qcowfs(["info".as_ref(), top.path.as_os_str()]);
    assert_one_line_error(&r, &["base.raw", "FIFO"], REFUSAL_LIMIT);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "info took {:?}",
        started.elapsed()
    );

    let started = Instant::now();
    let r = mount_failure(&top.path, &[] as &[&str], None);
    assert_one_line_error(&r, &["base.raw", "FIFO"], REFUSAL_LIMIT);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "mount took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_socket_or_character_device_backing_file_is_refused_naming_it() {
    let dir = workdir();
    let base = create_raw(dir.path().join("base.raw"), 4 * MIB);
    let top = qcow2(dir.path().join("top.qcow2"), 4 * MIB)
        .backing_named(&base, "/dev/zero")
        .create();
    let r = qcowfs(["info".as_ref(), top.path.as_os_str()]);
    assert_one_line_error(&r, &["/dev/zero", "character device"], REFUSAL_LIMIT);

    let sock = dir.path().join("sock");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
    let top2 = qcow2(dir.path().join("top2.qcow2"), 4 * MIB)
        .backing_named(&base, sock.to_str().expect("UTF-8"))
        .create();
    let r = mount_failure(&top2.path, &[] as &[&str], None);
    assert_one_line_error(&r, &["sock", "socket"], REFUSAL_LIMIT);
}

// --- holes 1 and 2: `disk` and `disk-partN` over the same bytes -----------------------------------

/// A plain qcow2 overlay over a raw base holding an MBR with one 32 MiB partition at 1 MiB.
fn overlay_over_partitioned_base(dir: &Path, script: &str) -> Image {
    let base = create_raw(dir.join("base.raw"), 64 * MIB);
    sfdisk(&base.path, script);
    qcow2(dir.join("top.qcow2"), 64 * MIB)
        .backing(&base)
        .create()
}

/// `len` bytes at `off` through an open file (its page cache, if it has one, is used).
fn pread_fd(f: &File, off: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off).expect("pread");
    buf
}

#[test]
fn disk_and_a_partition_file_show_one_truth_through_pread_pwrite_and_mmap() {
    let dir = workdir();
    let img = overlay_over_partitioned_base(dir.path(), ",32MiB,83\n");
    let m = Mount::new(&img.path, &[] as &[&str]);
    // Both files stay open throughout, as a program (or a loop device) keeps them.
    let open_rw = |p: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .expect("open")
    };
    let disk = open_rw(&m.disk());
    let part1 = open_rw(&m.mountpoint().join("disk-part1"));

    // disk caches the page, then the partition file writes under it.
    let _ = pread_fd(&disk, MIB, 64 * KIB as usize);
    part1.write_all_at(&[b'A'; 4096], 0).expect("pwrite part1");
    assert_eq!(
        pread_fd(&disk, MIB, 8),
        b"AAAAAAAA",
        "disk after a write through part1"
    );

    // An mmap write-back through disk must keep the partition's bytes.
    mmap_write(&disk, MIB + 4095, b"Z", "disk");
    let mut expected = vec![b'A'; 4096];
    expected[4095] = b'Z';
    assert_same_bytes(
        &pread_fd(&part1, 0, 4096),
        &expected,
        "part1 after mmap via disk",
    );

    // The other way: part1 reads, disk writes, part1 reads again.
    let _ = pread_fd(&part1, 8192, 4096);
    disk.write_all_at(&[b'B'; 4096], MIB + 8192)
        .expect("pwrite disk");
    assert_eq!(
        pread_fd(&part1, 8192, 4),
        b"BBBB",
        "part1 after a write through disk"
    );
    assert_eq!(
        pread_fd(&disk, MIB, 4),
        b"AAAA",
        "disk still shows part1's write"
    );
    disk.sync_all().expect("fsync");
    drop((disk, part1));
    m.umount();

    let raw = img.raw();
    assert_same_bytes(
        &raw[MIB as usize..(MIB + 4096) as usize],
        &expected,
        "qemu at 1 MiB",
    );
    assert_same_bytes(
        &raw[(MIB + 8192) as usize..(MIB + 12288) as usize],
        &[b'B'; 4096],
        "qemu at 1 MiB + 8 KiB",
    );
    assert_check_clean(&img);
}

/// An extended partition at 32 MiB with logicals 5 (4 MiB) and 6 (8 MiB).
const LOGICALS: &str = "label: dos
unit: sectors

start=2048, size=20480, type=83
start=65536, size=65536, type=5
start=67584, size=8192, type=83
start=77824, size=16384, type=83
";

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).expect("stat").len()
}

#[test]
fn shrinking_a_logical_partition_in_its_ebr_through_disk_shrinks_its_file_at_once() {
    let dir = workdir();
    let img = overlay_over_partitioned_base(dir.path(), LOGICALS);
    let m = Mount::new(&img.path, &[] as &[&str]);
    let part5 = m.mountpoint().join("disk-part5");
    assert_eq!(file_len(&part5), 8192 * 512, "logical 5 as made");

    // The first EBR sits at the start of the extended partition (LBA 65536); its first entry
    // describes logical 5: sector count at byte 446 + 12. Halve it through disk.
    let ebr = 65536 * 512;
    let count = 4096u32.to_le_bytes();
    pwrite(&m.disk(), ebr + 446 + 12, &count);
    assert_eq!(
        file_len(&part5),
        4096 * 512,
        "logical 5 after its EBR was edited"
    );
    let f = OpenOptions::new()
        .write(true)
        .open(&part5)
        .expect("open part5");
    let err = f
        .write_at(b"past the new end", 4096 * 512)
        .expect_err("a write past the new end fails");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    drop(f);

    // And the second EBR (linked from the first) moves logical 6: dropping the link removes it.
    pwrite(&m.disk(), ebr + 462, &[0u8; 16]);
    assert!(
        !m.mountpoint().join("disk-part6").exists(),
        "disk-part6 is gone once the EBR chain no longer reaches it"
    );
    m.umount();
    assert_check_clean(&img);
}

// --- hole 5: writes that cannot be stored -------------------------------------------------------

/// The host offset of guest cluster 0's data (64 KiB clusters, first L2 table), from its L2 entry.
fn l2_entry_of_cluster0(img: &Image) -> (u64, u64) {
    let l1 = read_be_u64(&img.path, 40);
    let l2 = read_be_u64(&img.path, l1) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0, "no L2 table");
    (l2, read_be_u64(&img.path, l2))
}

fn write_err(path: &Path, off: u64, data: &[u8]) -> Option<i32> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for writing");
    // O_DIRECT is not needed: `disk` writes through the page cache to the daemon synchronously.
    f.write_all_at(data, off)
        .err()
        .and_then(|e| e.raw_os_error())
}

#[test]
fn a_partial_write_into_a_damaged_compressed_cluster_fails_at_once_and_umount_still_works() {
    let dir = workdir();
    let img = qcow2(dir.path().join("c.qcow2"), 4 * MIB).create();
    img.write_compressed(0, &compressible_bytes(64 * KIB as usize, 5));
    assert!(
        has_extent(&img, "compressed"),
        "qemu made a compressed cluster"
    );
    let (_, entry) = l2_entry_of_cluster0(&img);
    // Compressed descriptor with 64 KiB clusters: the host offset is the low 54 bits.
    let host = entry & ((1 << 54) - 1);
    patch_bytes(&img.path, host, &[0xff; 64]);
    let healthy = random_bytes(100_000, 6);

    let m = Mount::new(&img.path, &[] as &[&str]);
    assert_eq!(
        write_err(&m.disk(), 4096, &[0x33; 4096]),
        Some(libc::EIO),
        "a partial write that needs the damaged cluster fails at once"
    );
    pwrite(&m.disk(), MIB + 3, &healthy);
    // A write of the whole cluster needs nothing read: it replaces the damage.
    pwrite(&m.disk(), 0, &vec![0x77; 64 * KIB as usize]);
    m.umount();

    let raw = img.raw();
    assert_same_bytes(
        &raw[..64 * KIB as usize],
        &[0x77; 64 * KIB as usize],
        "repaired cluster",
    );
    assert_same_bytes(
        &raw[(MIB + 3) as usize..(MIB + 3) as usize + healthy.len()],
        &healthy,
        "healthy write",
    );
    assert_check_no_corruption(&img);
}

#[test]
fn a_partial_write_into_a_cluster_that_points_into_metadata_fails_and_healthy_writes_survive_sigterm(
) {
    let dir = workdir();
    let img = qcow2(dir.path().join("m.qcow2"), 4 * MIB).create();
    img.write_pattern(0, 128 * KIB, 0x11);
    let (l2, _) = l2_entry_of_cluster0(&img);
    // Guest cluster 1 now claims the L2 table itself as its data (COPIED: "owned").
    patch_be_u64(&img.path, l2 + 8, (1 << 63) | l2);
    let healthy = random_bytes(200_000, 7);

    let m = Mount::new(&img.path, &[] as &[&str]);
    let pid = m.daemon_pid().expect("daemon pid");
    assert_eq!(
        write_err(&m.disk(), 64 * KIB + 4096, &[0x44; 4096]),
        Some(libc::EIO),
        "a write into a cluster inside metadata fails at once"
    );
    // Healthy data, not fsynced; then SIGTERM: the daemon writes it and exits.
    {
        let f = OpenOptions::new().write(true).open(m.disk()).expect("open");
        f.write_all_at(&healthy, 2 * MIB + 5)
            .expect("healthy write");
    }
    // SAFETY: kill(2) of the daemon this test started.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) }, 0);
    let start = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "daemon still running after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(m);

    // Put the L2 entry back so qemu reads the image, then look for the healthy bytes.
    patch_be_u64(&img.path, l2 + 8, 0);
    let raw = img.raw();
    assert_same_bytes(
        &raw[(2 * MIB + 5) as usize..(2 * MIB + 5) as usize + healthy.len()],
        &healthy,
        "the healthy write after SIGTERM",
    );
}

#[test]
fn a_refcount_block_past_the_end_refuses_a_read_write_mount_naming_it_and_mounts_read_only() {
    let dir = workdir();
    let img = qcow2(dir.path().join("r.qcow2"), 4 * MIB).create();
    img.write_pattern(0, 64 * KIB, 0x22);
    let table = read_be_u64(&img.path, 48);
    let len = fs::metadata(&img.path).expect("stat").len();
    // A second refcount block, far past the end of the file.
    patch_be_u64(
        &img.path,
        table + 8,
        (len + 100 * MIB) / (64 * KIB) * (64 * KIB),
    );

    let r = mount_failure(&img.path, &[] as &[&str], None);
    assert_one_line_error(&r, &["r.qcow2"], REFUSAL_LIMIT);
    assert!(
        r.stderr.contains("refcount block"),
        "names the refcount block: {}",
        r.stderr
    );

    let m = Mount::new(&img.path, &["--read-only"]);
    assert_eq!(read_at_bounded(&m.disk(), 0, 4), [0x22; 4]);
    m.umount();
}
