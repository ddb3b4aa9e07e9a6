//! `copy-out` keeps what `cp -a` and GNU tar keep: extended attributes (a file capability in
//! `security.capability`, `trusted.*` on a symlink, `user.*` values large enough for ext4's
//! attribute block) and POSIX ACLs (an access ACL, and a folder's default ACL that its new
//! entries inherited), on ext4, XFS and btrfs guests made and filled by the kernel, inside
//! legacy-AES and LUKS overlays. The oracle is the kernel's own view of the same guest
//! (`getfattr -R -d -m -` on a loop mount): the tar stream extracted by GNU tar (`--xattrs
//! --acls`) as root must show the same attributes; the host copy as root the same but the file
//! capability (never set on a host copy, as setuid bits are not); a non-root user's copy the
//! same `user.*` and ACLs, naming what it could not keep.
//!
//! Each test prints the commands it ran (shown on failure: the steps to reproduce).

use crate::common;

use common::*;
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::Path;

const PASS: &str = "guest xattrs secret";

/// `cap_net_raw+ep`, as `setcap` stores it (VFS_CAP_REVISION_2).
const CAP_NET_RAW: &str = "0x0100000200200000000000000000000000000000";

/// The attributes of every entry below `root` as root sees them through the kernel: path →
/// sorted `name=0xVALUE` lines. XFS's stored form of an ACL (`trusted.SGI_ACL_*`) is left out:
/// `cp -a` and tar leave it out too, carrying the ACL itself.
fn attributes(root: &Path) -> BTreeMap<String, Vec<String>> {
    let script = "cd \"$1\" && getfattr -R -h -d -m - -e hex .";
    let r = run_ok(
        "sh",
        [
            "-c".as_ref(),
            script.as_ref(),
            "sh".as_ref(),
            root.as_os_str(),
        ],
    );
    let mut out = BTreeMap::new();
    let mut file = None;
    for line in r.stdout_str().lines() {
        if let Some(name) = line.strip_prefix("# file: ") {
            file = Some(name.to_string());
        } else if !line.is_empty() && !line.starts_with("trusted.SGI_ACL_") {
            let f = file.clone().expect("getfattr names the file first");
            out.entry(f).or_insert_with(Vec::new).push(line.to_string());
        }
    }
    for v in out.values_mut() {
        v.sort();
    }
    out
}

/// All but file capabilities.
fn without_capabilities(all: &BTreeMap<String, Vec<String>>) -> BTreeMap<String, Vec<String>> {
    all.iter()
        .map(|(f, v)| {
            let kept: Vec<String> = v
                .iter()
                .filter(|l| !l.starts_with("security.capability"))
                .cloned()
                .collect();
            (f.clone(), kept)
        })
        .filter(|(_, v)| !v.is_empty())
        .collect()
}

/// Only the attributes a user may set (`user.*` and ACLs).
fn users_part(all: &BTreeMap<String, Vec<String>>) -> BTreeMap<String, Vec<String>> {
    all.iter()
        .map(|(f, v)| {
            let kept = v
                .iter()
                .filter(|l| l.starts_with("user.") || l.starts_with("system.posix_acl_"))
                .cloned()
                .collect::<Vec<_>>();
            (f.clone(), kept)
        })
        .filter(|(_, v)| !v.is_empty())
        .collect()
}

/// The guest's files and attributes, made by the kernel in the mounted guest `mnt`.
fn fill(mnt: &Path) {
    let p = |rel: &str| mnt.join(rel);
    fs::create_dir_all(p("usr/bin")).unwrap();
    fs::create_dir_all(p("var/log/journal")).unwrap();
    fs::create_dir_all(p("etc")).unwrap();
    fs::write(p("usr/bin/ping"), b"\x7fELF not really\n").unwrap();
    let setfattr = |args: &[&OsStr]| run_ok("setfattr", args.iter().copied());
    let ping = p("usr/bin/ping");
    run_ok("chmod", ["0755".as_ref(), ping.as_os_str()]);
    setfattr(&[
        "-n".as_ref(),
        "security.capability".as_ref(),
        "-v".as_ref(),
        CAP_NET_RAW.as_ref(),
        ping.as_os_str(),
    ]);
    // A folder whose default ACL its new entries inherit, as systemd sets /var/log/journal; a
    // file made before has none (a copy that set the default first would give it one).
    fs::write(p("var/log/journal/early"), b"before the ACL\n").unwrap();
    let journal = p("var/log/journal");
    run_ok(
        "setfacl",
        [
            "-m".as_ref(),
            "u:1000:rwx,g:4:r-x".as_ref(),
            "-d".as_ref(),
            "-m".as_ref(),
            "g:4:r-x".as_ref(),
            journal.as_os_str(),
        ],
    );
    fs::write(p("var/log/journal/system.journal"), b"journal\n").unwrap();
    let secret = p("etc/secret");
    fs::write(&secret, b"secret\n").unwrap();
    setfattr(&[
        "-n".as_ref(),
        "user.comment".as_ref(),
        "-v".as_ref(),
        "hello".as_ref(),
        secret.as_os_str(),
    ]);
    // Over 2 KiB: outside the inode, in ext4's attribute block.
    let big = format!("0x{}", "a5".repeat(3000));
    setfattr(&[
        "-n".as_ref(),
        "user.big".as_ref(),
        "-v".as_ref(),
        big.as_ref(),
        secret.as_os_str(),
    ]);
    fs::hard_link(&secret, p("etc/secret.again")).unwrap();
    let link = p("link");
    std::os::unix::fs::symlink("etc/secret", &link).unwrap();
    setfattr(&[
        "-h".as_ref(),
        "-n".as_ref(),
        "trusted.note".as_ref(),
        "-v".as_ref(),
        "on-the-link".as_ref(),
        link.as_os_str(),
    ]);
}

/// `qcowfs copy-out --passphrase-file KEY IMAGE / DEST` (DEST `-`: a tar stream).
fn copy_out_args(key: &Path, image: &Path, dest: &OsStr) -> Vec<OsString> {
    vec![
        "copy-out".into(),
        "--passphrase-file".into(),
        key.into(),
        image.into(),
        "/".into(),
        dest.into(),
    ]
}

fn attributes_are_kept(fs_name: &str, mkfs: &[&str], format: &str) {
    let dir = workdir();
    let work = dir.path();
    let raw = loop_made(work, fs_name, 320 * MIB, mkfs, fill);
    let image = encrypted(&raw, format, PASS);
    let key = passphrase_file(work, "key", PASS);
    let view = LoopMount::new(&raw, "loop,ro");
    let expected = attributes(view.path());
    view.umount(&raw);
    for must in [
        "security.capability",
        "system.posix_acl_default",
        "user.big",
    ] {
        let found = expected.values().flatten().any(|l| l.starts_with(must));
        assert!(found, "{fs_name}: the kernel shows no {must}: {expected:?}");
    }

    // As root, into a folder: all of them but the file capability, which a host copy never
    // gets (as it never gets setuid bits), and says so.
    let out = work.join("out");
    let r = qcowfs(copy_out_args(&key, &image, out.as_os_str()));
    r.assert_success();
    assert_eq!(
        attributes(&out),
        without_capabilities(&expected),
        "{fs_name}: the host copy"
    );
    assert!(
        r.stderr
            .contains("file capabilities (security.capability) of 1 files were not set")
            && r.stderr.lines().count() == 1,
        "{fs_name}: root's note: {}",
        r.stderr
    );
    assert!(
        !attributes(&out).contains_key("./var/log/journal/early"),
        "{fs_name}: a file made before its folder's default ACL got one"
    );
    use std::os::unix::fs::MetadataExt;
    let (a, b) = (out.join("etc/secret"), out.join("etc/secret.again"));
    assert_eq!(
        fs::metadata(&a).unwrap().ino(),
        fs::metadata(&b).unwrap().ino(),
        "{fs_name}: the second name is not a hard link"
    );

    // As a tar stream, extracted by GNU tar as root.
    let tar = qcowfs(copy_out_args(&key, &image, "-".as_ref()));
    tar.assert_success();
    let archive = work.join("guest.tar");
    fs::write(&archive, &tar.stdout).unwrap();
    let extracted = work.join("extracted");
    fs::create_dir(&extracted).unwrap();
    run_ok(
        "tar",
        [
            "--xattrs".as_ref(),
            "--xattrs-include=*".as_ref(),
            "--acls".as_ref(),
            "-xpf".as_ref(),
            archive.as_os_str(),
            "-C".as_ref(),
            extracted.as_os_str(),
        ],
    );
    assert_eq!(attributes(&extracted), expected, "{fs_name}: tar");

    // As a user: user.* and ACLs kept, what only root may set named once.
    let user = test_user("qcowfs-xattrs");
    user.own(work);
    let mine = work.join("mine");
    let r = user.run(&qcowfs_bin(), copy_out_args(&key, &image, mine.as_os_str()));
    r.assert_success();
    assert_eq!(
        users_part(&attributes(&mine)),
        users_part(&expected),
        "{fs_name}: the user's copy"
    );
    let err = &r.stderr;
    assert!(
        err.contains("1 extended attributes or ACLs not kept (trusted.note)")
            && err.contains("run as root")
            && err.contains("file capabilities (security.capability) of 1 files")
            && err.lines().count() == 2,
        "{fs_name}: the user's notes: {err}"
    );
}

#[test]
fn ext4_attributes_and_acls_are_kept_in_a_copy_and_a_tar_stream() {
    attributes_are_kept("ext4", &["mkfs.ext4", "-q", "-F", "-b", "4096"], "aes");
}

#[test]
fn xfs_attributes_and_acls_are_kept_in_a_copy_and_a_tar_stream() {
    attributes_are_kept("xfs", &["mkfs.xfs", "-q", "-f"], "luks");
}

#[test]
fn btrfs_attributes_and_acls_are_kept_in_a_copy_and_a_tar_stream() {
    attributes_are_kept("btrfs", &["mkfs.btrfs", "-q", "-f"], "aes");
}
