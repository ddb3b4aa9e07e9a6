//! The image's host files going wrong under or before a mount: a backing file deleted or truncated
//! while mounted, an image on a read-only file system or of mode 0444 (refused read-write in one
//! line, mounted read-only), a missing backing file deep in the chain named in one line.
//!
//! Every external command and every FUSE access is bounded in time; every mount is cleaned up
//! whatever the outcome.

use crate::common;

use common::*;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// How long one batch of I/O through a mount may take before the test fails instead of hanging.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// "Within a few seconds" for refusals.
const REFUSAL_LIMIT: Duration = Duration::from_secs(10);

/// A raw base of 16 MiB random bytes and an overlay (64 KiB clusters) with some data of its own.
fn overlay_over_raw_base(dir: &Path, seed: u64) -> (Image, Image) {
    let size = 16 * MIB;
    let base = raw_from_bytes(dir.join("base.raw"), &random_bytes(size as usize, seed));
    let top = qcow2(dir.join("top.qcow2"), size)
        .backing_named(&base, "base.raw")
        .create();
    top.scatter_random(size, 12, 150_000, seed + 1);
    (base, top)
}

#[test]
fn deleting_the_backing_file_while_mounted_keeps_reads_and_cow_writes_right_and_umount_clean() {
    let dir = workdir();
    let (base, top) = overlay_over_raw_base(dir.path(), 1000);
    let mut expected = top.raw();
    let base_bytes = fs::read(&base.path).expect("read base");

    let mount = Mount::new(&top.path, &[] as &[&str]);
    let pid = mount.daemon_pid().expect("daemon pid");
    fs::remove_file(&base.path).expect("delete the backing file");

    let disk = mount.disk();
    let whole = within(
        IO_TIMEOUT,
        "reading after the base was deleted",
        move || fs::read(&disk),
    );
    // The daemon holds the base open: deleting its name changes nothing it reads.
    let bytes = whole.unwrap_or_else(|e| panic!("read after the backing file was deleted: {e}"));
    assert_same_bytes(&bytes, &expected, "disk after its backing file was deleted");
    // A copy-on-write from the (deleted, still open) base.
    let (off, data) = (5 * MIB + 333, random_bytes(200_000, 1002));
    let disk = mount.disk();
    let payload = data.clone();
    let wrote = within(
        IO_TIMEOUT,
        "COW write after the base was deleted",
        move || {
            let d = OpenOptions::new().write(true).open(&disk)?;
            d.write_all_at(&payload, off)?;
            d.sync_all()
        },
    );
    wrote.unwrap_or_else(|e| panic!("COW write after the base was deleted: {e}"));
    expected[off as usize..off as usize + data.len()].copy_from_slice(&data);
    assert!(!process_gone(pid), "the daemon died");
    mount.umount();

    fs::write(&base.path, &base_bytes).expect("restore the base");
    let reference = raw_from_bytes(dir.path().join("expected.raw"), &expected);
    assert_same_guest_contents(&top, &reference.path);
    assert_check_clean(&top);
}

#[test]
fn truncating_the_backing_file_while_mounted_reads_the_lost_range_as_zeros() {
    let dir = workdir();
    let (base, top) = overlay_over_raw_base(dir.path(), 1100);
    let before = top.raw();

    let mount = Mount::new(&top.path, &[] as &[&str]);
    let pid = mount.daemon_pid().expect("daemon pid");
    let head = read_at_bounded(&mount.disk(), 0, MIB as usize);
    assert_same_bytes(
        &head,
        &before[..MIB as usize],
        "first MiB before truncation",
    );

    // Cut the base mid-cluster: 4 MiB + 1000 bytes stay.
    let kept = 4 * MIB + 1000;
    truncate_file(&base.path, kept);
    // What qemu reads now (zeros past the base's end), taken while qcowfs holds the image.
    let now = qemu_raw_shared(&top, dir.path());
    assert_same_bytes(
        &now[..kept as usize],
        &before[..kept as usize],
        "qemu before the cut",
    );

    let disk = mount.disk();
    let results = within(
        IO_TIMEOUT,
        "reading after the base was truncated",
        move || {
            let f = File::open(&disk).expect("open disk");
            (0..16u64)
                .map(|i| {
                    let mut buf = vec![0u8; MIB as usize];
                    f.read_exact_at(&mut buf, i * MIB).map(|()| buf)
                })
                .collect::<Vec<io::Result<Vec<u8>>>>()
        },
    );
    // Past the base's new end qcowfs reads zeros, as qemu does.
    for (i, r) in results.into_iter().enumerate() {
        let range = i * MIB as usize..(i + 1) * MIB as usize;
        let bytes = r.unwrap_or_else(|e| {
            panic!("read of MiB {i} after the base was cut to {kept} bytes: {e}")
        });
        assert_same_bytes(
            &bytes,
            &now[range],
            &format!("MiB {i} after the base was cut to {kept} bytes (vs qemu)"),
        );
    }

    // A copy-on-write inside the lost range.
    let (off, data) = (12 * MIB + 100, random_bytes(8192, 1102));
    let (disk, payload) = (mount.disk(), data.clone());
    let wrote = within(IO_TIMEOUT, "COW write into the lost range", move || {
        let d = OpenOptions::new().write(true).open(&disk)?;
        d.write_all_at(&payload, off)?;
        d.sync_all()
    });
    let mut expected = now;
    wrote.unwrap_or_else(|e| panic!("COW write into the lost range: {e}"));
    expected[off as usize..off as usize + data.len()].copy_from_slice(&data);
    assert!(!process_gone(pid), "the daemon died");
    mount.umount();

    let reference = raw_from_bytes(dir.path().join("expected.raw"), &expected);
    assert_same_guest_contents(&top, &reference.path);
    assert_check_clean(&top);
}

#[test]
fn an_image_on_a_read_only_file_system_is_refused_read_write_in_one_line_and_mounts_read_only() {
    let dir = workdir();
    let ro_dir = dir.path().join("ro");
    fs::create_dir(&ro_dir).expect("mkdir ro");
    let ro = Tmpfs::mount(&ro_dir, "16m");
    let img = qcow2(ro.path().join("sealed.qcow2"), 8 * MIB).create();
    img.write_random(100_000, 500_000, 1200);
    let expected = img.raw();
    run_ok(
        "mount",
        ["-o".as_ref(), "remount,ro".as_ref(), ro.path().as_os_str()],
    );

    let r = mount_failure(&img.path, &[] as &[&str], None);
    assert_one_line_error(&r, &[file_name(&img.path)], REFUSAL_LIMIT);
    let mount = Mount::new(&img.path, &["--read-only"]);
    let actual = read_all_bounded(&mount.disk());
    assert_same_bytes(
        &actual,
        &expected,
        "read-only mount of an image on a read-only fs",
    );
    mount.umount();
    drop(ro);
}

#[test]
fn a_mode_0444_image_file_is_refused_read_write_in_one_line_for_its_owner_and_mounts_read_only() {
    let dir = workdir();
    let img = qcow2(dir.path().join("readonly.qcow2"), 8 * MIB).create();
    img.write_random(70_000, 300_000, 1300);
    let expected = img.raw();
    fs::set_permissions(&img.path, fs::Permissions::from_mode(0o444)).expect("chmod 0444");

    // SAFETY: geteuid(2) cannot fail and has no side effects.
    if unsafe { libc::geteuid() } != 0 {
        let r = mount_failure(&img.path, &[] as &[&str], None);
        assert_one_line_error(&r, &[file_name(&img.path)], REFUSAL_LIMIT);
    } else if !tool_exists("setpriv") {
        panic!(
            "cannot test the read-write refusal of a mode 0444 file: running as root (which \
             ignores file modes) and setpriv is missing (install util-linux; scripts/test.sh does)"
        );
    } else {
        // Root ignores modes: ask as nobody, from a folder nobody can enter, with a copy of the
        // binary nobody can run.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod dir");
        let bin = dir.path().join("qcowfs");
        fs::copy(qcowfs_bin(), &bin).expect("copy binary");
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).expect("chmod binary");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).expect("mkdir mnt");
        fs::set_permissions(&mnt, fs::Permissions::from_mode(0o777)).expect("chmod mnt");
        let r = run_with(
            as_nobody(&bin)
                .arg("mount")
                .arg(&img.path)
                .arg(&mnt)
                .current_dir("/"),
            None,
            COMMAND_TIMEOUT,
        );
        let mounted = is_mounted(&mnt);
        if mounted {
            lazy_unmount(&mnt);
        }
        assert!(
            !mounted,
            "a read-write mount of a 0444 file by nobody succeeded"
        );
        assert_one_line_error(&r, &[file_name(&img.path)], REFUSAL_LIMIT);
        assert!(
            r.stderr.contains("ermission"),
            "the refusal does not say the permission is missing: {:?}",
            r.stderr
        );
        // nobody can open it for reading: `info` works.
        let info = run_with(
            as_nobody(&bin).arg("info").arg(&img.path).current_dir("/"),
            None,
            COMMAND_TIMEOUT,
        );
        info.assert_success();
    }
    // And --read-only serves it (as the test's own user).
    let mount = Mount::new(&img.path, &["--read-only"]);
    let actual = read_all_bounded(&mount.disk());
    assert_same_bytes(&actual, &expected, "read-only mount of a 0444 image");
    mount.umount();
}

#[test]
fn a_missing_backing_file_deep_in_the_chain_is_a_one_line_error_naming_its_path() {
    let dir = workdir();
    let sub = dir.path().join("sub");
    fs::create_dir(&sub).expect("mkdir sub");
    let base = create_raw(sub.join("base.raw"), 8 * MIB);
    let mid = qcow2(sub.join("mid.qcow2"), 8 * MIB)
        .backing_named(&base, "base.raw")
        .create();
    let top = qcow2(dir.path().join("top.qcow2"), 8 * MIB)
        .backing_named(&mid, "sub/mid.qcow2")
        .create();
    fs::remove_file(&base.path).expect("remove base");
    let missing = base.path.to_str().expect("UTF-8 path");
    for options in [&[][..], &["--read-only"][..]] {
        let r = mount_failure(&top.path, options, None);
        assert_one_line_error(&r, &[missing], REFUSAL_LIMIT);
    }

    // Named by an absolute path into a folder that does not exist.
    let nowhere = dir.path().join("nowhere").join("base.qcow2");
    let lost = qcow2(dir.path().join("lost.qcow2"), 8 * MIB)
        .backing_named(&mid, nowhere.to_str().expect("UTF-8 path"))
        .create();
    for options in [&[][..], &["--read-only"][..]] {
        let r = mount_failure(&lost.path, options, None);
        assert_one_line_error(&r, &[nowhere.to_str().unwrap()], REFUSAL_LIMIT);
    }
}

fn tool_exists(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `setpriv` that runs `bin` as nobody:nogroup without supplementary groups.
fn as_nobody(bin: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin)
        .env_remove("XDG_RUNTIME_DIR");
    c
}

/// `qemu-img convert -U -O raw` of a plain chain (allowed while qcowfs holds the image), as bytes.
fn qemu_raw_shared(image: &Image, dir: &Path) -> Vec<u8> {
    let dest = dir.join("shared-view.raw");
    qemu_img([
        "convert".as_ref(),
        "-U".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        image.path.as_os_str(),
        "-O".as_ref(),
        "raw".as_ref(),
        dest.as_os_str(),
    ]);
    let bytes = fs::read(&dest).expect("read converted raw");
    fs::remove_file(&dest).expect("remove converted raw");
    bytes
}
