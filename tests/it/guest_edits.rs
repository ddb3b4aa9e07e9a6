//! `qcowfs write`, `edit`, `copy-in`, `rm` and `mkdir` on ext4, XFS and FAT32 guests in nova's shape
//! (a legacy-AES or LUKS qcow2 overlay over a raw base), run by a user who is not root. After
//! every change the guest file system's own checker is clean (`e2fsck -fn`, `xfs_repair -n`, on
//! QEMU's decryption of the chain; `fsck.vfat -n`), `qemu-img check` is clean, and the kernel, mounting QEMU's
//! raw copy, reads the new bytes. `edit` keeps the file's owner, mode and extended attributes.
//! Refused, with the image's bytes unchanged: a wrong key, an image a writer holds, a file
//! system not cleanly unmounted, and file systems qcowfs does not change.
//!
//! Each test prints the commands it ran (shown on failure: the steps to reproduce).

use crate::common;

use common::*;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const PASS: &str = "guest edits secret";

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A refusal comes at once.
const REFUSAL_LIMIT: Duration = Duration::from_secs(30);

const FSTAB: &[u8] = b"UUID=1234 / ext4 errors=remount-ro 0 1\n";

/// The kinds of guest changed in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fs {
    Ext4,
    Xfs,
    Fat,
}

/// The source tree: /etc/fstab owned by 1234:5678, mode 0640, with an extended attribute.
fn source(work: &Path) -> PathBuf {
    let src = work.join("src");
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::create_dir_all(src.join("var/log")).unwrap();
    fs::write(src.join("etc/fstab"), FSTAB).unwrap();
    fs::write(src.join("etc/hostname"), b"guest\n").unwrap();
    fs::write(src.join("var/log/old.log"), b"old\n").unwrap();
    let fstab = src.join("etc/fstab");
    run_ok("chown", ["1234:5678".as_ref(), fstab.as_os_str()]);
    run_ok("chmod", ["0640".as_ref(), fstab.as_os_str()]);
    run_ok(
        "setfattr",
        [
            "-n".as_ref(),
            "user.note".as_ref(),
            "-v".as_ref(),
            "kept".as_ref(),
            fstab.as_os_str(),
        ],
    );
    src
}

/// A raw base holding `fs` made from the source tree, and an encrypted overlay over it.
fn guest(work: &Path, fs_kind: Fs, format: &str) -> (Image, Image) {
    let src = source(work);
    let raw = work.join("base.raw");
    let size = 320 * MIB;
    let base = create_raw(&raw, size);
    match fs_kind {
        Fs::Ext4 => {
            mkfs_ext4_from(&src, &raw, None);
        }
        Fs::Fat => {
            run_ok("mkfs.vfat", ["-F", "32", path_str(&raw)]);
            let image = path_str(&raw).to_string();
            let (etc, var) = (src.join("etc"), src.join("var"));
            run_ok(
                "mcopy",
                ["-s", "-i", &image, path_str(&etc), path_str(&var), "::/"],
            );
        }
        Fs::Xfs => {
            run_ok("mkfs.xfs", ["-q".as_ref(), "-f".as_ref(), raw.as_os_str()]);
            let mnt = LoopMount::new(&raw, "loop");
            let copied = run(
                "cp",
                [
                    "-a".as_ref(),
                    src.join(".").as_os_str(),
                    mnt.path().as_os_str(),
                ],
            );
            mnt.umount(&raw);
            copied.assert_success();
        }
    }
    let builder = qcow2(work.join("disk"), size).backing(&base);
    let overlay = match format {
        "aes" => builder.aes(PASS),
        _ => builder.luks(PASS),
    }
    .create();
    (base, overlay)
}

/// Runs the changing commands as a user who owns the images and the key, and checks the guest.
struct Editor {
    user: User,
    image: Image,
    key: PathBuf,
    fs: Fs,
    work: PathBuf,
}

impl Editor {
    fn new(work: &Path, image: Image, fs: Fs) -> Editor {
        let key = passphrase_file(work, "key", PASS);
        let user = test_user("qcowfs-editor");
        user.own(work);
        Editor {
            user,
            image,
            key,
            fs,
            work: work.to_path_buf(),
        }
    }

    fn args(&self, command: &str, rest: &[&OsStr]) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![command.into(), "--passphrase-file".into()];
        a.push(self.key.clone().into());
        a.push(self.image.path.clone().into());
        a.extend(rest.iter().map(|s| s.to_os_string()));
        a
    }

    fn run(&self, command: &str, rest: &[&OsStr], stdin: Option<&[u8]>) -> Run {
        self.user
            .run_input(&qcowfs_bin(), self.args(command, rest), stdin)
    }

    /// A change that must succeed, then the checks of a sound guest.
    fn change(&self, command: &str, rest: &[&str], stdin: Option<&[u8]>) {
        let rest: Vec<&OsStr> = rest.iter().map(OsStr::new).collect();
        self.run(command, &rest, stdin).assert_success();
        self.assert_sound(command);
    }

    /// `qemu-img check` clean, and the file system's checker clean on QEMU's raw copy.
    fn assert_sound(&self, after: &str) {
        assert_check_clean_when(&self.image, after);
        let raw = self.work.join("check.raw");
        let _ = fs::remove_file(&raw);
        self.image.convert_raw(&raw);
        let r = match self.fs {
            Fs::Ext4 => run("e2fsck", ["-fn".as_ref(), raw.as_os_str()]),
            Fs::Xfs => run("xfs_repair", ["-n".as_ref(), raw.as_os_str()]),
            Fs::Fat => run("fsck.vfat", ["-n".as_ref(), raw.as_os_str()]),
        };
        assert!(
            r.status.success(),
            "after {after}: the checker found problems:\n{}{}",
            r.stdout_str(),
            r.stderr
        );
    }

    /// The guest as the kernel mounts QEMU's raw copy of it (FAT, which this kernel may not
    /// mount: as mtools copies it out), read by `f`.
    fn kernel_view<T>(&self, f: impl FnOnce(&Path) -> T) -> T {
        let raw = self.work.join("view.raw");
        let _ = fs::remove_file(&raw);
        self.image.convert_raw(&raw);
        if self.fs == Fs::Fat {
            let copy = self.work.join("view.copy");
            fs::create_dir_all(&copy).unwrap();
            run_ok(
                "mcopy",
                ["-s", "-n", "-i", path_str(&raw), "::*", path_str(&copy)],
            );
            return f(&copy);
        }
        let mnt = LoopMount::new(&raw, "loop,ro");
        let out = f(mnt.path());
        mnt.umount(&raw);
        out
    }
}

fn every_change_leaves_a_sound_guest_the_kernel_reads(fs_kind: Fs, format: &str) {
    let dir = workdir();
    let work = dir.path();
    let (_, overlay) = guest(work, fs_kind, format);
    let ed = Editor::new(work, overlay, fs_kind);

    // The first write to a legacy AES overlay without data: nothing can check its key yet.
    ed.change(
        "write",
        &["--unverified-key", "/etc/resolv.conf"],
        Some(b"nameserver 192.0.2.53\n"),
    );
    ed.change("mkdir", &["/root"], None);
    let host = work.join("host");
    fs::create_dir_all(host.join("ssh")).unwrap();
    fs::write(host.join("ssh/authorized_keys"), b"ssh-ed25519 AAAA test\n").unwrap();
    fs::write(host.join("motd"), vec![b'm'; 300_000]).unwrap();
    ed.user.own(&host);
    let (ssh, motd) = (host.join("ssh"), host.join("motd"));
    ed.change(
        "copy-in",
        &[ssh.to_str().unwrap(), motd.to_str().unwrap(), "/root"],
        None,
    );
    // A longer fstab, then a shorter one: the file's inode is kept each time.
    ed.change(
        "edit",
        &[
            "--editor",
            "sed -i s/errors=remount-ro/errors=remount-ro,nofail,x-systemd.device-timeout=5/",
            "/etc/fstab",
        ],
        None,
    );
    ed.change(
        "edit",
        &[
            "--editor",
            "sed -i s/,x-systemd.device-timeout=5//",
            "/etc/fstab",
        ],
        None,
    );
    ed.change("rm", &["/var/log/old.log"], None);
    let same = ed.run(
        "edit",
        &[
            OsStr::new("--editor"),
            OsStr::new("true"),
            OsStr::new("/etc/hostname"),
        ],
        None,
    );
    same.assert_success();
    assert!(
        same.stderr.contains("unchanged; nothing written"),
        "{}",
        same.stderr
    );

    ed.kernel_view(|m| {
        assert_eq!(
            fs::read(m.join("etc/resolv.conf")).unwrap(),
            b"nameserver 192.0.2.53\n"
        );
        assert_eq!(
            fs::read(m.join("root/ssh/authorized_keys")).unwrap(),
            b"ssh-ed25519 AAAA test\n"
        );
        assert_eq!(fs::read(m.join("root/motd")).unwrap(), vec![b'm'; 300_000]);
        assert_eq!(
            fs::read(m.join("etc/fstab")).unwrap(),
            b"UUID=1234 / ext4 errors=remount-ro,nofail 0 1\n"
        );
        assert!(!m.join("var/log/old.log").exists());
        if fs_kind == Fs::Fat {
            return; // no owners, modes or extended attributes to keep
        }
        let meta = fs::metadata(m.join("etc/fstab")).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (1234, 5678, 0o640)
        );
        let xattr = run_ok(
            "getfattr",
            [
                "--only-values".as_ref(),
                "-n".as_ref(),
                "user.note".as_ref(),
                m.join("etc/fstab").as_os_str(),
            ],
        );
        assert_eq!(xattr.stdout, b"kept");
    });
}

#[test]
fn ext4_in_a_luks_overlay_is_changed_in_place_soundly() {
    every_change_leaves_a_sound_guest_the_kernel_reads(Fs::Ext4, "luks");
}

#[test]
fn xfs_in_an_aes_overlay_is_changed_in_place_soundly() {
    every_change_leaves_a_sound_guest_the_kernel_reads(Fs::Xfs, "aes");
}

#[test]
fn fat32_in_a_luks_overlay_is_changed_in_place_soundly() {
    every_change_leaves_a_sound_guest_the_kernel_reads(Fs::Fat, "luks");
}

#[test]
fn a_wrong_key_a_busy_image_and_an_unclean_file_system_are_refused_before_any_write() {
    let dir = workdir();
    let work = dir.path();
    let (_, overlay) = guest(work, Fs::Ext4, "aes");
    let ed = Editor::new(work, overlay, Fs::Ext4);
    // The overlay needs data of its own for its key to be checked.
    ed.change(
        "write",
        &["--unverified-key", "/etc/motd"],
        Some(b"hello\n"),
    );
    let before = fs::read(&ed.image.path).unwrap();

    let wrong = passphrase_file(work, "wrong", "not the key");
    ed.user.own(&wrong);
    let mut a = vec![
        OsString::from("write"),
        "--passphrase-file".into(),
        wrong.into(),
    ];
    a.push(ed.image.path.clone().into());
    a.push("/etc/motd".into());
    let r = ed.user.run_input(&qcowfs_bin(), &a, Some(b"garbage\n"));
    assert_one_line_error(&r, &["passphrase is wrong"], REFUSAL_LIMIT);
    assert!(
        fs::read(&ed.image.path).unwrap() == before,
        "a wrong key wrote"
    );

    // A read-write mount holds QEMU's write lock, as a running VM does.
    {
        let _mount = Mount::new(
            &ed.image.path,
            &["--passphrase-file".as_ref(), ed.key.as_os_str()],
        );
        let r = qcowfs(ed.args("rm", &[OsStr::new("/etc/motd")]));
        assert_one_line_error(&r, &["in use"], REFUSAL_LIMIT);
    }

    // A guest that crashed: its superblock's state not clean (s_state, at 1024 + 0x3a), as the
    // kernel leaves a mounted ext4.
    ed.image.write_pattern(1024 + 0x3a, 2, 0);
    let before = fs::read(&ed.image.path).unwrap();
    let r = ed.run("rm", &[OsStr::new("/etc/motd")], None);
    assert_one_line_error(&r, &["not cleanly unmounted"], REFUSAL_LIMIT);
    assert!(
        fs::read(&ed.image.path).unwrap() == before,
        "an unclean file system was written"
    );
}

#[test]
fn file_systems_qcowfs_does_not_change_are_refused_by_name() {
    let dir = workdir();
    let work = dir.path();
    let raw = work.join("btrfs.raw");
    let base = create_raw(&raw, 128 * MIB);
    run_ok("mkfs.btrfs", ["-q".as_ref(), raw.as_os_str()]);
    let overlay = qcow2(work.join("disk"), 128 * MIB)
        .backing(&base)
        .luks(PASS)
        .create();
    let ed = Editor::new(work, overlay, Fs::Ext4);
    let r = ed.run("mkdir", &[OsStr::new("/srv")], None);
    assert_one_line_error(&r, &["cannot change in place"], REFUSAL_LIMIT);
    assert!(r.stderr.contains("a btrfs file system"), "{}", r.stderr);
}
