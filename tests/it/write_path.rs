//! The write path, through real read-write mounts: random unaligned writes checked against a raw
//! reference with `qemu-img compare` and `qemu-img check` over a geometry matrix; growth of the
//! metadata; no plaintext in encrypted images; ext4 inside the disk; QEMU's image locks in both
//! directions; wrong passphrases and read-only mounts that leave the image byte-identical. (kill -9
//! mid-write is tests/it/kill_9.rs.)
//!
//! Each test prints the commands it ran (shown on failure: the steps to reproduce). The data is
//! seeded, so a failing test fails the same way again.

use crate::common;

use common::*;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long one batch of writes through a mount may take before the test fails instead of hanging.
const WRITE_TIMEOUT: Duration = Duration::from_secs(180);

const PASS: &str = "write path secret";

/// `passphrase_opts` for a legacy AES image that holds no data yet: its key cannot be verified,
/// and a read-write mount needs `--unverified-key` (tests/it/key_discipline.rs shows the refusal).
fn fresh_aes_opts(dir: &Path, passphrase: &str) -> Vec<OsString> {
    let mut opts = passphrase_opts(dir, passphrase);
    opts.push("--unverified-key".into());
    opts
}

// --- random writes, the common scenario ----------------------------------------------------------

/// Applies `writes` seeded random writes to `disk` (through the mount) and to `reference` (a raw
/// file), with an fsync or fdatasync now and then and read-backs through the mount compared with
/// the reference.
fn apply_random_writes(disk: &Path, reference: &Path, size: u64, writes: usize, seed: u64) {
    let (disk, reference) = (disk.to_path_buf(), reference.to_path_buf());
    within(
        WRITE_TIMEOUT,
        "random writes through the mount",
        move || {
            let d = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&disk)
                .unwrap_or_else(|e| panic!("open {} read-write: {e}", disk.display()));
            let r = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&reference)
                .expect("open the raw reference");
            let mut rng = Rng::new(seed);
            for i in 0..writes {
                let w = GuestWrite::random(&mut rng, size, false);
                let data = w.data();
                d.write_all_at(&data, w.off).unwrap_or_else(|e| {
                    panic!(
                        "write #{i} of {} bytes at {} through the mount: {e}",
                        w.len, w.off
                    )
                });
                r.write_all_at(&data, w.off).expect("write the reference");
                match rng.below(16) {
                    0 => d
                        .sync_all()
                        .unwrap_or_else(|e| panic!("fsync after write #{i}: {e}")),
                    1 => d
                        .sync_data()
                        .unwrap_or_else(|e| panic!("fdatasync after write #{i}: {e}")),
                    2 | 3 => {
                        let len = rng.range(1, 256 * KIB);
                        let off = rng.below(size - len + 1);
                        let mut got = vec![0u8; len as usize];
                        let mut want = vec![0u8; len as usize];
                        d.read_exact_at(&mut got, off).unwrap_or_else(|e| {
                            panic!("read-back of {len} bytes at {off} after write #{i}: {e}")
                        });
                        r.read_exact_at(&mut want, off).expect("read the reference");
                        if let Some(at) = first_difference(&got, &want) {
                            panic!(
                            "read-back through the mount after write #{i} (seed {seed}): {len} bytes \
                             at {off} differ from what was written, first at disk offset {}",
                            off + at as u64
                        );
                        }
                    }
                    _ => {}
                }
            }
        },
    );
}

/// The scenario of the geometry matrix: the raw reference is `qemu-img convert -O raw` of `image`
/// before mounting; the same seeded writes go through a read-write mount and into the reference;
/// after `qcowfs umount`, `qemu-img compare` says identical, `qemu-img check` is clean (no
/// corruption, no leak) and the `backing` files are byte-identical.
fn random_writes_match_qemu(
    dir: &Path,
    image: &Image,
    options: &[OsString],
    backing: &[&Path],
    writes: usize,
    seed: u64,
) {
    let reference = dir.join("reference.raw");
    image.convert_raw(&reference);
    assert_eq!(
        fs::metadata(&reference).expect("stat reference").len(),
        image.size,
        "size of the raw reference"
    );
    let backing_before: Vec<String> = backing.iter().map(|p| sha256_file(p)).collect();

    let mount = Mount::new(&image.path, options);
    assert_eq!(
        fs::metadata(mount.disk())
            .expect("stat MOUNTPOINT/disk")
            .len(),
        image.size,
        "size of MOUNTPOINT/disk"
    );
    apply_random_writes(&mount.disk(), &reference, image.size, writes, seed);
    mount.umount();

    assert_same_guest_contents(image, &reference);
    assert_check_clean(image);
    for (path, before) in backing.iter().zip(&backing_before) {
        assert_eq!(
            &sha256_file(path),
            before,
            "backing file {} changed",
            path.display()
        );
    }
}

// --- geometry matrix ------------------------------------------------------------------------------

/// Random writes to a plain image of one shape (`shape` sets its geometry), holding `scattered`
/// (count, longest, seed) pieces of data of its own first, match qemu.
fn random_writes_on(
    name: &str,
    size: u64,
    shape: impl FnOnce(Qcow2Builder) -> Qcow2Builder,
    scattered: (usize, u64, u64),
    writes: usize,
    seed: u64,
) {
    let dir = workdir();
    let img = shape(qcow2(dir.path().join(format!("{name}.qcow2")), size)).create();
    let (count, longest, scatter_seed) = scattered;
    img.scatter_random(size, count, longest, scatter_seed);
    random_writes_match_qemu(dir.path(), &img, &[], &[], writes, seed);
}

#[test]
fn random_writes_to_an_empty_plain_image_match_qemu() {
    let dir = workdir();
    let img = qcow2(dir.path().join("plain.qcow2"), 64 * MIB).create();
    random_writes_match_qemu(dir.path(), &img, &[], &[], 150, 1);
}

#[test]
fn random_writes_to_an_empty_aes_image_match_qemu() {
    let dir = workdir();
    let img = qcow2(dir.path().join("aes.qcow2"), 64 * MIB)
        .aes(PASS)
        .create();
    random_writes_match_qemu(
        dir.path(),
        &img,
        &fresh_aes_opts(dir.path(), PASS),
        &[],
        150,
        2,
    );
}

#[test]
fn random_writes_to_an_aes_overlay_over_a_raw_base_match_qemu_and_leave_the_base_untouched() {
    let dir = workdir();
    let size = 32 * MIB;
    let base = raw_from_bytes(
        dir.path().join("base.raw"),
        &compressible_bytes(size as usize, 30),
    );
    let top = qcow2(dir.path().join("top.qcow2"), size)
        .aes(PASS)
        .backing_named(&base, "base.raw")
        .create();
    top.scatter_random(size, 20, 100_000, 31);
    random_writes_match_qemu(
        dir.path(),
        &top,
        &passphrase_opts(dir.path(), PASS),
        &[&base.path],
        150,
        3,
    );
}

#[test]
fn random_writes_to_an_aes_overlay_over_a_compressed_qcow2_base_match_qemu() {
    let dir = workdir();
    let size = 32 * MIB;
    let src = raw_from_bytes(
        dir.path().join("src.raw"),
        &compressible_bytes(size as usize, 40),
    );
    let base = convert_compressed(&src, dir.path().join("base.qcow2"), "cluster_size=65536");
    assert!(
        has_extent(&base, "compressed"),
        "the base has no compressed cluster"
    );
    let top = qcow2(dir.path().join("top.qcow2"), size)
        .aes(PASS)
        .backing_named(&base, "base.qcow2")
        .create();
    random_writes_match_qemu(
        dir.path(),
        &top,
        &fresh_aes_opts(dir.path(), PASS),
        &[&base.path],
        150,
        4,
    );
}

#[test]
fn random_writes_to_an_image_with_4k_clusters_match_qemu() {
    random_writes_on(
        "c4k",
        32 * MIB,
        |b| b.cluster_size(4 * KIB),
        (20, 100_000, 50),
        150,
        5,
    );
}

#[test]
fn random_writes_to_an_image_with_2m_clusters_match_qemu() {
    random_writes_on(
        "c2m",
        64 * MIB,
        |b| b.cluster_size(2 * MIB),
        (10, 100_000, 60),
        120,
        6,
    );
}

#[test]
fn random_writes_to_an_image_with_512_byte_clusters_and_1_bit_refcounts_match_qemu() {
    random_writes_on(
        "c512r1",
        32 * MIB,
        |b| b.cluster_size(512).refcount_bits(1),
        (20, 50_000, 70),
        120,
        7,
    );
}

#[test]
fn random_writes_to_a_v2_image_match_qemu() {
    random_writes_on("v2", 32 * MIB, |b| b.v2(), (20, 100_000, 80), 150, 8);
}

/// An empty qcow2 with extended L2 entries (64 KiB clusters, 2 KiB subclusters) in `dir` over a raw
/// base of seeded random bytes: (overlay, base).
fn extended_l2_overlay(dir: &Path, size: u64, seed: u64) -> (Image, Image) {
    let base = raw_from_bytes(dir.join("base.raw"), &random_bytes(size as usize, seed));
    let img = qcow2(dir.join("ext.qcow2"), size)
        .extended_l2()
        .cluster_size(64 * KIB)
        .backing_named(&base, "base.raw")
        .create();
    (img, base)
}

#[test]
fn random_writes_to_an_extended_l2_overlay_over_a_backing_file_match_qemu() {
    let dir = workdir();
    let size = 32 * MIB;
    let (img, base) = extended_l2_overlay(dir.path(), size, 90);
    // Small writes allocate single subclusters; zeroed subclusters too.
    img.scatter_random(size, 40, 3 * 2048, 91);
    img.write_zeroes(5 * 64 * KIB + 3 * 2048, 2 * 2048);
    img.write_zeroes_unmap(9 * 64 * KIB + 4 * 2048, 4 * 2048);
    random_writes_match_qemu(dir.path(), &img, &[], &[&base.path], 150, 9);
}

#[test]
fn random_writes_to_an_image_with_an_internal_snapshot_leave_the_snapshot_intact() {
    let dir = workdir();
    let size = 32 * MIB;
    let img = qcow2(dir.path().join("snap.qcow2"), size)
        .cluster_size(4 * KIB)
        .create();
    img.write_random(0, 12 * MIB as usize, 100);
    img.scatter_random(size, 30, 300_000, 101);
    img.snapshot("s1");
    let at_snapshot = img.raw();

    random_writes_match_qemu(dir.path(), &img, &[], &[], 150, 10);

    let s1 = dir.path().join("s1.raw");
    qemu_img([
        "convert".as_ref(),
        "-l".as_ref(),
        "s1".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-O".as_ref(),
        "raw".as_ref(),
        img.path.as_os_str(),
        s1.as_os_str(),
    ]);
    let snapshot = fs::read(&s1).expect("read the converted snapshot");
    assert_same_bytes(
        &snapshot,
        &at_snapshot,
        "snapshot s1 after writing through qcowfs vs the content when it was taken",
    );
}

#[test]
fn random_writes_to_an_image_with_64_bit_refcounts_match_qemu() {
    random_writes_on(
        "r64",
        32 * MIB,
        |b| b.refcount_bits(64),
        (20, 100_000, 110),
        150,
        11,
    );
}

#[test]
fn random_writes_over_zstd_compressed_clusters_match_qemu() {
    let dir = workdir();
    let size = 32 * MIB;
    let img = qcow2(dir.path().join("zstd.qcow2"), size)
        .compression("zstd")
        .create();
    img.write_compressed(0, &compressible_bytes(24 * MIB as usize, 120));
    assert!(
        has_extent(&img, "compressed"),
        "the image has no compressed cluster to write over"
    );
    random_writes_match_qemu(dir.path(), &img, &[], &[], 150, 12);
}

// --- growth -------------------------------------------------------------------------------------

#[test]
fn sequential_200_mib_into_512_byte_clusters_grows_l2_and_refcount_tables_cleanly() {
    let dir = workdir();
    let size = 256 * MIB;
    let img = qcow2(dir.path().join("grow.qcow2"), size)
        .cluster_size(512)
        .refcount_bits(16)
        .create();
    let refcount_table_before = read_be_u32(&img.path, 56);
    let reference = dir.path().join("reference.raw");
    img.convert_raw(&reference);

    let mount = Mount::new(&img.path, &[] as &[&str]);
    let (disk, refp) = (mount.disk(), reference.clone());
    within(WRITE_TIMEOUT, "200 MiB of sequential writes", move || {
        let d = OpenOptions::new()
            .write(true)
            .open(&disk)
            .unwrap_or_else(|e| panic!("open {}: {e}", disk.display()));
        let r = OpenOptions::new()
            .write(true)
            .open(&refp)
            .expect("open reference");
        // Start unaligned, like dd to an odd offset, and go 200 MiB.
        let start = 3 * MIB + 777;
        let chunk = random_bytes(MIB as usize, 130);
        for i in 0..200u64 {
            // Vary every chunk a little so no two clusters are alike.
            let mut data = chunk.clone();
            data[..8].copy_from_slice(&i.to_le_bytes());
            let off = start + i * MIB;
            d.write_all_at(&data, off)
                .unwrap_or_else(|e| panic!("write of 1 MiB at {off}: {e}"));
            r.write_all_at(&data, off).expect("write reference");
            if i % 32 == 31 {
                d.sync_all()
                    .unwrap_or_else(|e| panic!("fsync after {} MiB: {e}", i + 1));
            }
        }
    });
    mount.umount();

    assert_same_guest_contents(&img, &reference);
    assert_check_clean(&img);
    // refcount_table_clusters (header offset 56): one 512 B cluster of table covers only
    // 64 refcount blocks × 256 clusters = 8 MiB, so 200 MiB must have grown it.
    let refcount_table_after = read_be_u32(&img.path, 56);
    assert!(
        refcount_table_after > refcount_table_before,
        "refcount table did not grow: {refcount_table_before} -> {refcount_table_after} clusters"
    );
}

// --- encryption ----------------------------------------------------------------------------------

#[test]
fn plaintext_written_through_the_mount_never_lands_in_an_aes_image() {
    let dir = workdir();
    let img = qcow2(dir.path().join("secret.qcow2"), 32 * MIB)
        .aes(PASS)
        .create();
    let mut marker = Vec::with_capacity(4096);
    let mut n = 0;
    while marker.len() < 4096 {
        marker.extend_from_slice(format!("PLAINTEXT-MARKER-qcowfs-{n:05}|").as_bytes());
        n += 1;
    }
    marker.truncate(4096);
    let payload: Vec<u8> = marker.repeat(256);
    let off = 5 * MIB + 777;

    let mount = Mount::new(&img.path, &fresh_aes_opts(dir.path(), PASS));
    let (disk, data) = (mount.disk(), payload.clone());
    within(WRITE_TIMEOUT, "writing the marker", move || {
        let d = OpenOptions::new()
            .write(true)
            .open(&disk)
            .expect("open disk");
        d.write_all_at(&data, off).expect("write marker");
        d.sync_all().expect("fsync");
    });
    mount.umount();

    // The decrypted view has it ...
    let raw = img.raw();
    assert_same_bytes(
        &raw[off as usize..off as usize + payload.len()],
        &payload,
        "marker read back by qemu",
    );
    // ... the file does not, not even 16 bytes of it.
    let file = fs::read(&img.path).expect("read image file");
    assert!(
        file.len() as u64 > MIB,
        "the image file is only {} bytes: where did 1 MiB of data go?",
        file.len()
    );
    for needle in [
        &b"PLAINTEXT-MARKER"[..],
        &marker[1000..1016],
        &marker[4000..4016],
    ] {
        if let Some(at) = file.windows(needle.len()).position(|w| w == needle) {
            panic!(
                "plaintext {:?} found in the encrypted image file at byte {at}",
                String::from_utf8_lossy(needle)
            );
        }
    }
}

#[test]
fn wrong_aes_passphrase_is_refused_without_touching_the_image() {
    let dir = workdir();
    let img = qcow2(dir.path().join("locked.qcow2"), 32 * MIB)
        .aes(PASS)
        .create();
    img.scatter_random(32 * MIB, 30, 200_000, 140);
    let before = sha256_file(&img.path);

    let wrong = passphrase_file(dir.path(), "wrong", "not the passphrase");
    let r = mount_failure(
        &img.path,
        &[OsStr::new("--passphrase-file"), wrong.as_os_str()],
        None,
    );
    assert_one_line_error(&r, &[file_name(&img.path)], Duration::from_secs(30));
    assert_eq!(
        sha256_file(&img.path),
        before,
        "the image changed after a refused mount"
    );

    // Control: the right passphrase mounts and reads what qemu reads.
    let expected = img.raw();
    let mount = Mount::new(
        &img.path,
        &[
            OsString::from("--read-only"),
            "--passphrase-file".into(),
            passphrase_file(dir.path(), "right", PASS).into(),
        ],
    );
    let actual = read_all_bounded(&mount.disk());
    mount.umount();
    assert_same_bytes(&actual, &expected, "right passphrase, read through qcowfs");
}

#[test]
fn read_only_mount_never_writes_a_byte() {
    let dir = workdir();
    let size = 32 * MIB;
    let base = raw_from_bytes(
        dir.path().join("base.raw"),
        &compressible_bytes(size as usize, 150),
    );
    let top = qcow2(dir.path().join("top.qcow2"), size)
        .aes(PASS)
        .cluster_size(4 * KIB)
        .backing_named(&base, "base.raw")
        .create();
    top.scatter_random(size, 30, 200_000, 151);
    let expected = top.raw();
    let (top_before, base_before) = (sha256_file(&top.path), sha256_file(&base.path));

    let mut opts = vec![OsString::from("--read-only")];
    opts.extend(passphrase_opts(dir.path(), PASS));
    let mount = Mount::new(&top.path, &opts);
    let actual = read_all_bounded(&mount.disk());
    assert_same_bytes(&actual, &expected, "read-only mount vs qemu-img convert");
    let disk = mount.disk();
    let refused = within(
        Duration::from_secs(60),
        "write attempt",
        move || match OpenOptions::new().write(true).open(&disk) {
            Err(e) => Err(e),
            Ok(f) => f
                .write_all_at(b"must not land", 4096)
                .and_then(|()| f.sync_all()),
        },
    );
    match refused {
        Ok(()) => panic!("writing to a read-only mount's disk succeeded"),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::EROFS),
            "writing to a read-only mount failed with {e}, expected EROFS"
        ),
    }
    mount.umount();

    assert_eq!(
        sha256_file(&top.path),
        top_before,
        "read-only mount changed the image"
    );
    assert_eq!(
        sha256_file(&base.path),
        base_before,
        "read-only mount changed the base"
    );
}

// --- ext4 inside the disk -------------------------------------------------------------------------

#[test]
fn ext4_made_inside_the_mount_passes_fsck_after_umount() {
    let dir = workdir();
    let img = qcow2(dir.path().join("ext4.qcow2"), 64 * MIB)
        .aes(PASS)
        .create();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("big.bin", random_bytes(3 * MIB as usize, 160)),
        ("notes.txt", b"qcowfs wrote this through ext4\n".to_vec()),
        ("odd.bin", compressible_bytes(700_001, 161)),
    ];
    let src = dir.path().join("src");
    fs::create_dir(&src).expect("mkdir src");
    for (name, data) in &files {
        fs::write(src.join(name), data).expect("write source file");
    }

    let mount = Mount::new(&img.path, &fresh_aes_opts(dir.path(), PASS));
    let disk = mount.disk();
    run_ok(
        "mkfs.ext4",
        ["-q".as_ref(), "-F".as_ref(), disk.as_os_str()],
    );
    {
        let guest = LoopMount::new(&disk, "loop");
        let sub = guest.path().join("sub");
        fs::create_dir(&sub).expect("mkdir inside ext4");
        for (name, _) in &files {
            fs::copy(src.join(name), sub.join(name)).expect("copy into ext4");
        }
        guest.umount(&disk);
    }
    mount.umount();

    assert_check_clean(&img);
    let raw = dir.path().join("ext4.raw");
    img.convert_raw(&raw);
    let fsck = run("e2fsck", ["-fn".as_ref(), raw.as_os_str()]);
    assert!(
        fsck.status.success(),
        "e2fsck -fn on the converted image failed ({}):\n{}{}",
        describe_status(fsck.status),
        fsck.stdout_str(),
        fsck.stderr
    );
    // And the files are there, byte for byte.
    let guest = LoopMount::new(&raw, "loop,ro");
    for (name, data) in &files {
        let got = fs::read(guest.path().join("sub").join(name)).expect("read file back");
        assert_same_bytes(
            &got,
            data,
            &format!("{name} read back from the converted image"),
        );
    }
    guest.umount(&raw);
}

// --- locks ---------------------------------------------------------------------------------------

#[test]
fn qemu_writers_are_locked_out_while_mounted_read_write() {
    let dir = workdir();
    let img = qcow2(dir.path().join("busy.qcow2"), 32 * MIB).create();
    img.write_random(0, 1_000_000, 180);
    let path = img.path.as_os_str();

    let mount = Mount::new(&img.path, &[] as &[&str]);
    let io = run(
        "qemu-io",
        [
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-c".as_ref(),
            "write 0 512".as_ref(),
            path,
        ],
    );
    assert_lock_refusal(
        &io,
        "qemu-io write while qcowfs has the image mounted read-write",
    );
    let resize = run(
        "qemu-img",
        [
            "resize".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            path,
            "+1M".as_ref(),
        ],
    );
    assert_lock_refusal(&resize, "qemu-img resize while mounted read-write");
    let info = run("qemu-img", ["info".as_ref(), path]);
    assert_lock_refusal(&info, "qemu-img info without -U while mounted read-write");
    run_ok("qemu-img", ["info".as_ref(), "-U".as_ref(), path]);
    mount.umount();

    // Released on umount: qemu can write again, and nothing changed the virtual size.
    img.write_pattern(0, 512, 0x5a);
    assert_eq!(img.qemu_info()["virtual-size"], 32 * MIB, "virtual size");
    assert_check_clean(&img);
}

#[test]
fn mount_is_refused_while_qemu_holds_the_image_for_writing() {
    let dir = workdir();
    let img = qcow2(dir.path().join("held.qcow2"), 32 * MIB).create();
    img.write_random(0, 1_000_000, 190);

    let holder = QemuIoHolder::start(&img.path);
    let before = sha256_file(&img.path);
    for options in [&[][..], &["--read-only"][..]] {
        let r = mount_failure(&img.path, options, None);
        assert_one_line_error(&r, &[file_name(&img.path)], Duration::from_secs(30));
        let line = r.stderr.to_lowercase();
        assert!(
            line.contains("lock") || line.contains("in use") || line.contains("busy"),
            "qcowfs mount {options:?} refused without saying the image is locked/in use: {:?}",
            r.stderr
        );
    }
    assert_eq!(
        sha256_file(&img.path),
        before,
        "refused mounts changed the image"
    );
    holder.stop();

    // Control: with qemu gone, the same mount works.
    Mount::new(&img.path, &["--read-only"]).umount();
}

/// Asserts that a qemu tool failed because of an image lock.
fn assert_lock_refusal(r: &Run, what: &str) {
    let text = format!("{}{}", r.stdout_str(), r.stderr);
    assert!(
        !r.status.success() && text.contains("lock"),
        "{what}: expected a lock error, got {} \n{text}",
        describe_status(r.status)
    );
}

// --- private helpers --------------------------------------------------------------------------------

fn sha256_file(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = f.read(&mut buf).expect("read for sha256");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A `qemu-io IMAGE` process that holds the image open read-write (QEMU's write locks) while its
/// stdin pipe stays open. Dropping it kills it.
struct QemuIoHolder {
    child: Option<Child>,
}

impl QemuIoHolder {
    fn start(image: &Path) -> QemuIoHolder {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "qcow2"])
            .arg(image)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        eprintln!("$ {cmd:?} < pipe &");
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot run qemu-io: {e} (this suite requires QEMU's tools; it never skips)")
        });
        let mut holder = QemuIoHolder { child: Some(child) };
        // Ready when a plain `qemu-img info` (no -U) is refused for the lock.
        let start = Instant::now();
        loop {
            let r = run("qemu-img", ["info".as_ref(), image.as_os_str()]);
            if !r.status.success() && r.stderr.contains("lock") {
                break;
            }
            if let Ok(Some(status)) = holder.child.as_mut().unwrap().try_wait() {
                holder.child = None;
                panic!("qemu-io exited early ({})", describe_status(status));
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "qemu-io did not lock {} within 30 s",
                image.display()
            );
            thread::sleep(Duration::from_millis(50));
        }
        holder
    }

    /// Closes qemu-io's stdin (it quits) and waits, bounded, for it to exit.
    fn stop(mut self) {
        let mut child = self.child.take().expect("qemu-io running");
        drop(child.stdin.take());
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if start.elapsed() < Duration::from_secs(20) => {
                    thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
            }
        }
    }
}

impl Drop for QemuIoHolder {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// --- small writes in place ------------------------------------------------------------------------

/// Small writes into allocated clusters, each made durable before the next: the flush stores only
/// the sectors they cover (whole subclusters with extended L2), and the rest of each cluster, and of
/// each subcluster that was not allocated yet, still shows what QEMU shows.
fn small_writes_in_place_match_qemu(dir: &Path, image: &Image, options: &[OsString]) {
    let cluster = 64 * KIB;
    let reference = dir.join("reference.raw");
    image.convert_raw(&reference);
    let writes: [(u64, usize); 6] = [
        (4 * cluster + 10, 100),              // inside one sector
        (4 * cluster + 2047, 2),              // across a sector and a subcluster boundary
        (4 * cluster + 20_000, 3000),         // several sectors in the middle
        (5 * cluster - 1, 1),                 // the cluster's last byte
        (6 * cluster + 4096 * 3, 4096),       // a 4 KiB page, as a guest writes it
        (6 * cluster + cluster / 2 - 7, 300), // across the middle of the block
    ];
    let mount = Mount::new(&image.path, options);
    let (disk_path, reference_path) = (mount.disk(), reference.clone());
    within(WRITE_TIMEOUT, "small writes through the mount", move || {
        let d = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&disk_path)
            .expect("open MOUNTPOINT/disk read-write");
        let r = OpenOptions::new()
            .write(true)
            .open(&reference_path)
            .expect("open the raw reference");
        for (i, &(off, len)) in writes.iter().enumerate() {
            let data = random_bytes(len, 200 + i as u64);
            d.write_all_at(&data, off)
                .unwrap_or_else(|e| panic!("write of {len} bytes at {off}: {e}"));
            r.write_all_at(&data, off).expect("write the reference");
            d.sync_all()
                .unwrap_or_else(|e| panic!("fsync after the write at {off}: {e}"));
        }
    });
    mount.umount();
    assert_same_guest_contents(image, &reference);
    assert_check_clean(image);
}

#[test]
fn small_writes_in_place_to_a_plain_image_match_qemu() {
    let dir = workdir();
    let img = qcow2(dir.path().join("plain.qcow2"), 8 * MIB).create();
    img.write_random(4 * 64 * KIB, 3 * 64 * KIB as usize, 210);
    small_writes_in_place_match_qemu(dir.path(), &img, &[]);
}

#[test]
fn small_writes_in_place_to_an_aes_image_match_qemu() {
    let dir = workdir();
    let img = qcow2(dir.path().join("aes.qcow2"), 8 * MIB)
        .aes(PASS)
        .create();
    img.write_random(4 * 64 * KIB, 3 * 64 * KIB as usize, 211);
    small_writes_in_place_match_qemu(dir.path(), &img, &passphrase_opts(dir.path(), PASS));
}

#[test]
fn small_writes_into_unallocated_subclusters_match_qemu() {
    let dir = workdir();
    let (img, _base) = extended_l2_overlay(dir.path(), 8 * MIB, 212);
    // One subcluster allocated in each cluster: the clusters are written in place, and every other
    // subcluster of theirs still shows the backing file.
    for c in 4..7 {
        img.write_random(c * 64 * KIB + 8 * 2048, 2048, 213 + c);
    }
    small_writes_in_place_match_qemu(dir.path(), &img, &[]);
}
