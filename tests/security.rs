//! The host is hostile too (issue 14): runtime records another user plants, keys in core dumps,
//! LUKS headers that demand endless key derivation, passphrase files others can read, legacy AES
//! passphrases nothing can verify, and backing files that point anywhere. Two real non-root users
//! play victim and attacker where it matters.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// FNV-1a of the canonical mountpoint: how qcowfs names a mount's records.
fn record_key(mountpoint: &Path) -> String {
    let canon = fs::canonicalize(mountpoint).expect("canonical mountpoint");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in canon.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// A folder under /tmp that `user` owns, with an image and a mountpoint in it.
fn victim_workspace(user: &User) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::Builder::new()
        .prefix("qcowfs-victim-")
        .tempdir()
        .expect("tempdir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let img = qcow2(dir.path().join("disk.qcow2"), 4 * MIB).create();
    img.write_pattern(0, 64 * KIB, 0x42);
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).expect("mountpoint");
    user.own(dir.path());
    (dir, img.path, mnt)
}

#[test]
fn another_users_planted_runtime_folder_and_symlinked_records_never_touch_the_victims_files() {
    let victim = test_user("qcowfs-victim");
    let attacker = test_user("qcowfs-attacker");
    let _fuse = FuseForAll::new();
    let (dir, image, mnt) = victim_workspace(&victim);
    let precious = dir.path().join("precious");
    fs::write(&precious, "the victim's data\n").expect("write");
    victim.own(&precious);

    // The attacker makes the victim's fallback runtime folder first, open to everyone, and plants
    // the victim's record names as symlinks to the victim's file.
    let runtime = PathBuf::from(format!("/tmp/qcowfs-{}", victim.uid));
    let _ = fs::remove_dir_all(&runtime);
    fs::create_dir(&runtime).expect("attacker's folder");
    let key = record_key(&mnt);
    for ext in ["pid", "status"] {
        std::os::unix::fs::symlink(&precious, runtime.join(format!("{key}.{ext}")))
            .expect("plant symlink");
    }
    fs::set_permissions(&runtime, fs::Permissions::from_mode(0o777)).expect("chmod");
    attacker.own(&runtime);

    let bin = qcowfs_bin();
    let r = victim.run(&bin, ["mount".as_ref(), image.as_os_str(), mnt.as_os_str()]);
    r.assert_success();
    assert!(
        r.stderr.contains("not a private folder")
            && r.stderr.contains(&runtime.display().to_string()),
        "the mount warns about the foreign folder: {}",
        r.stderr
    );
    let r = victim.run(&bin, ["umount".as_ref(), mnt.as_os_str()]);
    r.assert_success();
    assert!(
        r.elapsed < Duration::from_secs(20),
        "umount took {:?}",
        r.elapsed
    );
    assert!(!is_mounted(&mnt), "still mounted");
    assert_eq!(
        fs::read_to_string(&precious).expect("read"),
        "the victim's data\n",
        "the victim's file was overwritten through a planted record"
    );
    let _ = fs::remove_dir_all(&runtime);

    // In a folder of the victim's own, records are mode 0600 and umount waits for the daemon.
    let r = victim.run(&bin, ["mount".as_ref(), image.as_os_str(), mnt.as_os_str()]);
    r.assert_success();
    assert!(
        !r.stderr.contains("warning"),
        "no warning now: {}",
        r.stderr
    );
    let meta = fs::metadata(&runtime).expect("runtime folder");
    assert_eq!((meta.uid(), meta.mode() & 0o777), (victim.uid, 0o700));
    let pid_file = runtime.join(format!("{key}.pid"));
    assert_eq!(
        fs::metadata(&pid_file).expect("pid record").mode() & 0o777,
        0o600
    );
    let r = victim.run(&bin, ["umount".as_ref(), mnt.as_os_str()]);
    r.assert_success();
    assert!(
        !pid_file.exists(),
        "the daemon removed its record after writing everything"
    );
    let _ = fs::remove_dir_all(&runtime);
}

use std::os::unix::fs::MetadataExt;
