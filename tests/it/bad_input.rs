//! Hostile and broken images through the CLI. Each must be refused within a few seconds with a
//! non-zero exit and exactly one stderr line that names the image file, never a panic. Most cases
//! use the cheap `qcowfs info`; those that only show when the chain is opened or the disk is
//! served use `qcowfs mount`.

use crate::common;

use common::*;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// "Within a few seconds".
const LIMIT: Duration = Duration::from_secs(10);

// Header field offsets (big endian).
const H_MAGIC: u64 = 0;
const H_VERSION: u64 = 4;
const H_BACKING_FILE_SIZE: u64 = 16;
const H_CLUSTER_BITS: u64 = 20;
const H_L1_SIZE: u64 = 36;
const H_L1_TABLE_OFFSET: u64 = 40;
const H_REFCOUNT_TABLE_CLUSTERS: u64 = 56;
const H_INCOMPATIBLE_FEATURES: u64 = 72;

const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_UNKNOWN_BIT_20: u64 = 1 << 20;

/// A valid v3 image (64 KiB clusters) with some data, so its L1 table has an entry.
fn good_image(dir: &Path, name: &str) -> Image {
    let img = qcow2(dir.join(name), 8 * MIB).create();
    img.write_pattern(70_000, 5000, 0x5a);
    img
}

/// `qcowfs info IMAGE` must be refused per the error contract.
fn assert_info_refuses(image: &Path) -> Run {
    let r = qcowfs(["info".as_ref(), image.as_os_str()]);
    assert_one_line_error(&r, &[file_name(image)], LIMIT);
    r
}

/// `qcowfs mount --read-only IMAGE MNT` must be refused per the error contract, naming one of
/// `names`.
fn assert_mount_refuses(image: &Path, options: &[&OsStr], names: &[&str]) -> Run {
    let mut opts: Vec<&OsStr> = vec!["--read-only".as_ref()];
    opts.extend_from_slice(options);
    let r = mount_failure(image, &opts, None);
    assert_one_line_error(&r, names, LIMIT);
    r
}

#[test]
fn rejects_bad_magic() {
    let dir = workdir();
    let img = good_image(dir.path(), "bad-magic.qcow2");
    patch_bytes(&img.path, H_MAGIC, b"QFI\0");
    assert_info_refuses(&img.path);
}

#[test]
fn rejects_unknown_version_4() {
    let dir = workdir();
    let img = good_image(dir.path(), "v4.qcow2");
    patch_be_u32(&img.path, H_VERSION, 4);
    assert_info_refuses(&img.path);
}

#[test]
fn rejects_cluster_bits_8() {
    let dir = workdir();
    let img = good_image(dir.path(), "cb8.qcow2");
    patch_be_u32(&img.path, H_CLUSTER_BITS, 8);
    assert_info_refuses(&img.path);
}

#[test]
fn rejects_cluster_bits_22() {
    let dir = workdir();
    let img = good_image(dir.path(), "cb22.qcow2");
    patch_be_u32(&img.path, H_CLUSTER_BITS, 22);
    assert_info_refuses(&img.path);
}

#[test]
fn rejects_huge_l1_size() {
    let dir = workdir();
    let img = good_image(dir.path(), "l1-huge.qcow2");
    patch_be_u32(&img.path, H_L1_SIZE, 0x7fff_ffff);
    assert_info_refuses(&img.path);
}

#[test]
fn rejects_misaligned_l1_table_offset() {
    let dir = workdir();
    for (name, delta) in [("l1-plus-1.qcow2", 1), ("l1-plus-512.qcow2", 512)] {
        let img = good_image(dir.path(), name);
        let l1 = read_be_u64(&img.path, H_L1_TABLE_OFFSET);
        patch_be_u64(&img.path, H_L1_TABLE_OFFSET, l1 + delta);
        assert_info_refuses(&img.path);
    }
}

#[test]
fn rejects_huge_refcount_table() {
    let dir = workdir();
    let img = good_image(dir.path(), "rt-huge.qcow2");
    patch_be_u32(&img.path, H_REFCOUNT_TABLE_CLUSTERS, 0x0100_0000);
    assert_info_refuses(&img.path);
}

#[test]
fn rejects_backing_name_of_2000_bytes() {
    let dir = workdir();
    let base = create_raw(dir.path().join("base.raw"), 8 * MIB);
    let img = qcow2(dir.path().join("long-backing.qcow2"), 8 * MIB)
        .backing_named(&base, "base.raw")
        .create();
    patch_be_u32(&img.path, H_BACKING_FILE_SIZE, 2000);
    assert_info_refuses(&img.path);
}

#[test]
fn rejects_header_cut_to_50_bytes() {
    let dir = workdir();
    let img = good_image(dir.path(), "cut50.qcow2");
    truncate_file(&img.path, 50);
    assert_info_refuses(&img.path);
}

#[test]
fn rejects_image_whose_l1_table_is_cut_off() {
    let dir = workdir();
    let img = good_image(dir.path(), "no-l1.qcow2");
    let l1 = read_be_u64(&img.path, H_L1_TABLE_OFFSET);
    truncate_file(&img.path, l1);
    assert_mount_refuses(&img.path, &[], &[file_name(&img.path)]);
}

#[test]
fn rejects_unknown_incompatible_feature_bit() {
    let dir = workdir();
    let img = good_image(dir.path(), "incompat20.qcow2");
    let f = read_be_u64(&img.path, H_INCOMPATIBLE_FEATURES);
    patch_be_u64(
        &img.path,
        H_INCOMPATIBLE_FEATURES,
        f | INCOMPAT_UNKNOWN_BIT_20,
    );
    assert_info_refuses(&img.path);
}

#[test]
fn refuses_to_mount_image_marked_corrupt() {
    let dir = workdir();
    let img = good_image(dir.path(), "corrupt.qcow2");
    let f = read_be_u64(&img.path, H_INCOMPATIBLE_FEATURES);
    patch_be_u64(&img.path, H_INCOMPATIBLE_FEATURES, f | INCOMPAT_CORRUPT);
    assert_mount_refuses(&img.path, &[], &[file_name(&img.path)]);
}

#[test]
fn refuses_backing_chain_loop() {
    let dir = workdir();
    let a = qcow2(dir.path().join("a.qcow2"), MIB).create();
    let b = qcow2(dir.path().join("b.qcow2"), MIB)
        .backing_named(&a, "a.qcow2")
        .create();
    a.rebase_unsafe("b.qcow2", Format::Qcow2);
    assert_mount_refuses(&a.path, &[], &["a.qcow2", "b.qcow2"]);
    assert_mount_refuses(&b.path, &[], &["a.qcow2", "b.qcow2"]);
}

#[test]
fn refuses_image_that_is_its_own_backing_file() {
    let dir = workdir();
    let a = qcow2(dir.path().join("self.qcow2"), MIB).create();
    a.rebase_unsafe("self.qcow2", Format::Qcow2);
    assert_mount_refuses(&a.path, &[], &["self.qcow2"]);
}

#[test]
fn refuses_backing_chain_loop_spelled_with_different_paths() {
    // a -> "./b.qcow2" -> "../DIR/a.qcow2": the same files under other names.
    let dir = workdir();
    let folder = file_name(dir.path()).to_string();
    let a = qcow2(dir.path().join("a.qcow2"), MIB).create();
    let _b = qcow2(dir.path().join("b.qcow2"), MIB)
        .backing_named(&a, &format!("../{folder}/a.qcow2"))
        .create();
    a.rebase_unsafe("./b.qcow2", Format::Qcow2);
    assert_mount_refuses(&a.path, &[], &["a.qcow2", "b.qcow2"]);
}

#[test]
fn refuses_backing_chain_deeper_than_32() {
    let dir = workdir();
    let mut below = create_raw(dir.path().join("l00.raw"), MIB);
    let mut names = vec!["l00.raw".to_string()];
    for i in 1..=34 {
        let name = format!("l{i:02}.qcow2");
        let prev = file_name(&below.path).to_string();
        below = qcow2(dir.path().join(&name), MIB)
            .backing_named(&below, &prev)
            .create();
        names.push(name);
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_mount_refuses(&below.path, &[], &names);
}

#[test]
fn accepts_backing_chain_of_depth_32() {
    // The limit is on depth beyond 32, not at it: 1 top + 31 below must still mount.
    let dir = workdir();
    let mut below = create_raw(dir.path().join("l00.raw"), MIB);
    below.write_pattern(0, 1000, 0x42);
    for i in 1..=31 {
        let name = format!("l{i:02}.qcow2");
        let prev = file_name(&below.path).to_string();
        below = qcow2(dir.path().join(&name), MIB)
            .backing_named(&below, &prev)
            .create();
    }
    let expected = below.raw();
    let mount = Mount::new(&below.path, &["--read-only"]);
    let actual = read_all_bounded(&mount.disk());
    assert_same_bytes(&actual, &expected, "chain of 32 layers");
    mount.umount();
}

#[test]
fn refuses_missing_backing_file() {
    let dir = workdir();
    let base = create_raw(dir.path().join("gone.raw"), 8 * MIB);
    let img = qcow2(dir.path().join("orphan.qcow2"), 8 * MIB)
        .backing_named(&base, "gone.raw")
        .create();
    fs::remove_file(&base.path).unwrap();
    assert_mount_refuses(&img.path, &[], &["orphan.qcow2", "gone.raw"]);
}

#[test]
fn refuses_encrypted_image_without_passphrase_and_without_tty() {
    let dir = workdir();
    let img = qcow2(dir.path().join("locked.qcow2"), 8 * MIB)
        .aes("secret")
        .create();
    img.write_pattern(0, 4096, 0x77);
    // stdin is /dev/null and the command runs in a new session: nothing to prompt on.
    assert_mount_refuses(&img.path, &[], &[file_name(&img.path)]);
}

#[test]
fn refuses_unreadable_image() {
    let dir = workdir();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let img = good_image(dir.path(), "unreadable.qcow2");
    fs::set_permissions(&img.path, fs::Permissions::from_mode(0o000)).unwrap();
    // SAFETY: geteuid(2) cannot fail and has no side effects.
    let root = unsafe { libc::geteuid() } == 0;
    let r = if root {
        // Root reads anything: drop to nobody, with a copy of the binary nobody can run.
        let bin_dir = tempfile::Builder::new()
            .prefix("qcowfs-bin-")
            .tempdir()
            .unwrap();
        fs::set_permissions(bin_dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let bin = bin_dir.path().join("qcowfs");
        fs::copy(qcowfs_bin(), &bin).unwrap();
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
        let Some(mut cmd) = as_nobody(&bin) else {
            panic!(
                "refuses_unreadable_image cannot run: as root, neither setpriv nor runuser is there \
                 to drop privileges (install util-linux; scripts/test.sh does)"
            );
        };
        cmd.arg("info").arg(&img.path).current_dir("/");
        run_with(&mut cmd, None, COMMAND_TIMEOUT)
    } else {
        qcowfs(["info".as_ref(), img.path.as_os_str()])
    };
    assert_one_line_error(&r, &[file_name(&img.path)], LIMIT);
}

/// A command that runs `bin` as user nobody, or None when no tool for it is installed.
fn as_nobody(bin: &Path) -> Option<Command> {
    let has = |tool: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if has("setpriv") {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"])
            .arg(bin);
        return Some(c);
    }
    if has("runuser") {
        let mut c = Command::new("runuser");
        c.args(["-u", "nobody", "--"]).arg(bin);
        return Some(c);
    }
    None
}

#[test]
fn hostile_l2_offset_gives_an_error_not_a_crash() {
    // L1[0] points at a misaligned L2 table far past the end of the file: qcowfs checks the L1
    // table at open and refuses the mount in one line that names the image and the table.
    let dir = workdir();
    let img = good_image(dir.path(), "bad-l2.qcow2");
    let l1 = read_be_u64(&img.path, H_L1_TABLE_OFFSET);
    let copied = 1u64 << 63;
    patch_be_u64(&img.path, l1, copied | 0x00ff_ffff_ffff_0200);
    let r = mount_failure(&img.path, &["--read-only"], None);
    assert_one_line_error(&r, &[file_name(&img.path), "L2 table"], LIMIT);
}
