//! A wrong or unverifiable passphrase, fed to every command that decrypts (issue 22): `seal`
//! and read-write mounts refuse it before writing a byte (the image stays byte-identical);
//! `ls`/`cat`/`copy-out` and `info` say "the passphrase is wrong" first; `check-key` reports each
//! layer. Exit statuses: 3 a wrong key, 4 a key that cannot be verified for a writing command.

use crate::common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;

const RIGHT: &str = "right";
const WRONG: &str = "wrong";
const EXIT_WRONG_KEY: i32 = 3;
const EXIT_UNVERIFIED_KEY: i32 = 4;

/// A nova-like disk: a raw base with text, an AES overlay (key RIGHT) over it, and, when
/// `overlay_data`, 1 MiB written into the overlay by qemu-io.
fn nova_disk(dir: &Path, overlay_data: bool) -> Image {
    let base = create_raw(dir.join("base.raw"), 16 << 20);
    let text: Vec<u8> = b"root:x:0:0:root:/root:/bin/bash\n"
        .iter()
        .cycle()
        .take(8 << 20)
        .copied()
        .collect();
    base.write_bytes(0, &text);
    let disk = qcow2(dir.join("disk"), 16 << 20)
        .aes(RIGHT)
        .backing(&base)
        .create();
    if overlay_data {
        disk.write_pattern(4 << 20, 1 << 20, 0x61);
    }
    disk
}

fn key(dir: &Path, pass: &str) -> PathBuf {
    passphrase_file(dir, &format!("key-{pass}"), pass)
}

fn args<'a>(cmd: &'a str, key: &'a Path, image: &'a Path) -> Vec<&'a std::ffi::OsStr> {
    vec![
        cmd.as_ref(),
        "--passphrase-file".as_ref(),
        key.as_os_str(),
        image.as_os_str(),
    ]
}

fn assert_status(r: &Run, code: i32, words: &str) {
    assert_eq!(
        r.status.code(),
        Some(code),
        "{}: {}\n{}",
        r.command,
        r.stderr,
        r.stdout_str()
    );
    assert!(r.stderr.contains(words), "{}: {}", r.command, r.stderr);
}

#[test]
fn seal_with_a_wrong_legacy_aes_key_is_refused_and_changes_nothing() {
    let dir = workdir();
    let disk = nova_disk(dir.path(), true);
    let before = std::fs::read(&disk.path).unwrap();
    let r = qcowfs(args("seal", &key(dir.path(), WRONG), &disk.path));
    assert_status(&r, EXIT_WRONG_KEY, "the passphrase is wrong");
    assert_one_line_error(&r, &["disk"], Duration::from_secs(60));
    assert_eq!(std::fs::read(&disk.path).unwrap(), before, "byte-identical");
}

#[test]
fn seal_of_an_overlay_without_data_needs_unverified_key() {
    let dir = workdir();
    let disk = nova_disk(dir.path(), false);
    let before = std::fs::read(&disk.path).unwrap();
    let wrong = key(dir.path(), WRONG);
    let r = qcowfs(args("seal", &wrong, &disk.path));
    assert_status(&r, EXIT_UNVERIFIED_KEY, "--unverified-key");
    assert_one_line_error(&r, &["disk"], Duration::from_secs(60));
    assert_eq!(std::fs::read(&disk.path).unwrap(), before, "byte-identical");
    // Said explicitly, it seals with the key given; the image then reads with that key.
    let mut sealed_args = args("seal", &wrong, &disk.path);
    sealed_args.insert(1, "--unverified-key".as_ref());
    qcowfs(sealed_args).assert_success();
    let mut with_wrong = disk.clone();
    with_wrong.secrets = vec![Some(WRONG.to_string())];
    let base = Image::plain(dir.path().join("base.raw"), Format::Raw, 16 << 20);
    assert_same_bytes(
        &with_wrong.raw(),
        &base.raw(),
        "sealed, read with the key given",
    );
}

#[test]
fn a_read_write_mount_refuses_a_wrong_or_unverifiable_key() {
    require_fuse();
    let dir = workdir();
    let disk = nova_disk(dir.path(), true);
    let before = std::fs::read(&disk.path).unwrap();
    let wrong = key(dir.path(), WRONG);
    let opts = ["--passphrase-file".as_ref(), wrong.as_os_str()];
    let r = mount_failure(&disk.path, &opts, None);
    assert_status(&r, EXIT_WRONG_KEY, "the passphrase is wrong");
    assert_eq!(std::fs::read(&disk.path).unwrap(), before);

    let fresh_dir = workdir();
    let fresh = nova_disk(fresh_dir.path(), false);
    let r = mount_failure(&fresh.path, &opts, None);
    assert_status(&r, EXIT_UNVERIFIED_KEY, "--unverified-key");
    // With --unverified-key it mounts, and says which key it could not check.
    let right = key(dir.path(), RIGHT);
    let mount = Mount::new(
        &fresh.path,
        &[
            "--unverified-key".as_ref(),
            "--passphrase-file".as_ref(),
            right.as_os_str(),
        ],
    );
    mount.umount().assert_success();
}

#[test]
fn guest_file_commands_and_info_say_the_passphrase_is_wrong_first() {
    let dir = workdir();
    let disk = nova_disk(dir.path(), true);
    let wrong = key(dir.path(), WRONG);
    for cmd in ["ls", "cat"] {
        let mut a = args(cmd, &wrong, &disk.path);
        a.push("/etc".as_ref());
        let r = qcowfs(a);
        assert_status(&r, EXIT_WRONG_KEY, "the passphrase is wrong");
        assert_one_line_error(&r, &["disk"], Duration::from_secs(60));
    }
    let dest = dir.path().join("out");
    let mut a = args("copy-out", &wrong, &disk.path);
    a.push("/etc".as_ref());
    a.push(dest.as_os_str());
    let r = qcowfs(a);
    assert_status(&r, EXIT_WRONG_KEY, "the passphrase is wrong");
    assert!(!dest.exists());
    // info describes the image, shows the verdict per layer, and fails with the wrong key.
    let r = qcowfs(args("info", &wrong, &disk.path));
    assert_status(&r, EXIT_WRONG_KEY, "the passphrase is wrong");
    assert!(
        r.stdout_str().contains("key: wrong passphrase"),
        "{}",
        r.stdout_str()
    );
    let r = qcowfs(args("info", &key(dir.path(), RIGHT), &disk.path));
    r.assert_success();
    assert!(
        r.stdout_str().contains("key: verified"),
        "{}",
        r.stdout_str()
    );
}

#[test]
fn check_key_reports_each_layer_and_exits_by_the_worst() {
    let dir = workdir();
    let disk = nova_disk(dir.path(), true);
    let right = qcowfs(args("check-key", &key(dir.path(), RIGHT), &disk.path));
    right.assert_success();
    assert!(
        right.stdout_str().contains("(aes): verified"),
        "{}",
        right.stdout_str()
    );
    let wrong = qcowfs(args("check-key", &key(dir.path(), WRONG), &disk.path));
    assert_eq!(
        wrong.status.code(),
        Some(EXIT_WRONG_KEY),
        "{}",
        wrong.stderr
    );
    assert!(wrong.stdout_str().contains("(aes): wrong passphrase"));

    let fresh_dir = workdir();
    let fresh = nova_disk(fresh_dir.path(), false);
    let r = qcowfs(args("check-key", &key(dir.path(), RIGHT), &fresh.path));
    assert_eq!(r.status.code(), Some(EXIT_UNVERIFIED_KEY), "{}", r.stderr);
    assert!(r.stdout_str().contains("cannot be verified"));

    // LUKS: the slot refuses the wrong key; with --json one object per layer.
    let luks = qcow2(dir.path().join("luks.qcow2"), 1 << 20)
        .luks(RIGHT)
        .create();
    let wrong_key = key(dir.path(), WRONG);
    let mut a = args("check-key", &wrong_key, &luks.path);
    a.insert(1, "--json".as_ref());
    let r = qcowfs(a);
    assert_eq!(r.status.code(), Some(EXIT_WRONG_KEY), "{}", r.stderr);
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).expect("JSON");
    assert_eq!(v["verdict"], "wrong");
    assert_eq!(v["encryption"], "luks");
    qcowfs(args("check-key", &key(dir.path(), RIGHT), &luks.path)).assert_success();
}

#[test]
fn info_reads_a_passphrase_from_stdin_once() {
    // It used to read the key source twice: the second read of stdin found nothing, and the
    // empty passphrase was judged wrong.
    let dir = workdir();
    let disk = nova_disk(dir.path(), true);
    let r = qcowfs_with(
        [
            "info".as_ref(),
            "--passphrase-file".as_ref(),
            "-".as_ref(),
            disk.path.as_os_str(),
        ],
        Some(RIGHT.as_bytes()),
        dir.path(),
    );
    r.assert_success();
    assert!(
        r.stdout_str().contains("key: verified"),
        "{}",
        r.stdout_str()
    );
}

/// A read-only mount writes nothing, so a key that cannot be verified (an overlay without data)
/// gets no warning about new data encrypted with it.
#[test]
fn a_read_only_mount_of_an_overlay_without_data_says_nothing_about_new_data() {
    require_fuse();
    let dir = workdir();
    let fresh = nova_disk(dir.path(), false);
    let right = key(dir.path(), RIGHT);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let r = qcowfs([
        "mount".as_ref(),
        "--read-only".as_ref(),
        "--passphrase-file".as_ref(),
        right.as_os_str(),
        fresh.path.as_os_str(),
        mnt.as_os_str(),
    ]);
    let um = qcowfs(["umount".as_ref(), mnt.as_os_str()]);
    r.assert_success();
    um.assert_success();
    // Without syslog the mount names its log file; nothing else may be said.
    let said: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| !l.starts_with("qcowfs: logging to "))
        .collect();
    assert!(said.is_empty(), "a read-only mount warned: {}", r.stderr);
}
