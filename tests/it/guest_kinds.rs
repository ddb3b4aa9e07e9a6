//! `qcowfs ls`, `cat` and `copy-out` on guests that are not ext2/3/4: XFS (v5, v4, and a log
//! the kernel left dirty), btrfs (the default subvolume, `set-default`, `--subvolume`, nested
//! subvolumes), NTFS (a symbolic link and a junction written as Windows writes them) and FAT32,
//! FAT16 and FAT12 — each made by its own tools and the kernel (mkfs.*, loop mounts, ntfs-3g,
//! mtools), put inside a legacy-AES or a LUKS qcow2 by `qemu-img convert`, and read by a user
//! who is not root. exFAT is refused by name.
//!
//! Each test prints the commands it ran (shown on failure: the steps to reproduce).

use crate::common;

use common::*;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

const PASS: &str = "guest kinds secret";

/// A refusal comes at once: no scan of the disk, no waiting.
const REFUSAL_LIMIT: Duration = Duration::from_secs(20);

/// The bytes of the big file: several of cat's 1 MiB chunks, not compressible.
fn big() -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..2_500_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

const FSTAB: &[u8] = b"UUID=1234 / xfs defaults 0 1\nUUID=ABCD /boot/efi vfat umask=0077 0 2\n";

/// The tree every guest gets: a text, a big file, a nested folder, and (where the file system
/// has them) a relative symlink and a second name of the text.
fn source(work: &Path, links: bool) -> PathBuf {
    let src = work.join("src");
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::create_dir_all(src.join("var/log")).unwrap();
    fs::create_dir_all(src.join("dir/sub")).unwrap();
    fs::write(src.join("etc/fstab"), FSTAB).unwrap();
    let fstab = src.join("etc/fstab");
    run_ok("chown", ["1234:5678".as_ref(), fstab.as_os_str()]);
    run_ok("chmod", ["0640".as_ref(), fstab.as_os_str()]);
    fs::write(src.join("var/log/big"), big()).unwrap();
    fs::write(src.join("dir/sub/file"), b"deep\n").unwrap();
    if links {
        std::os::unix::fs::symlink("etc/fstab", src.join("link")).unwrap();
        fs::hard_link(src.join("etc/fstab"), src.join("etc/fstab.again")).unwrap();
    }
    src
}

/// A guest image read by a user who owns it and its key, and nothing else.
struct Reader {
    user: User,
    image: PathBuf,
    key: PathBuf,
}

impl Reader {
    fn new(work: &Path, image: PathBuf) -> Reader {
        let key = passphrase_file(work, "key", PASS);
        let user = test_user("qcowfs-reader");
        user.own(work);
        Reader { user, image, key }
    }

    /// `qcowfs COMMAND [OPTIONS] --passphrase-file KEY IMAGE REST...` as the user.
    fn run(&self, command: &str, options: &[&str], rest: &[&OsStr]) -> Run {
        let mut a: Vec<OsString> = vec![command.into()];
        a.extend(options.iter().map(OsString::from));
        a.push("--passphrase-file".into());
        a.push(self.key.clone().into());
        a.push(self.image.clone().into());
        a.extend(rest.iter().map(|s| s.to_os_string()));
        self.user.run(&qcowfs_bin(), &a)
    }

    fn cat(&self, options: &[&str], path: &str) -> Vec<u8> {
        let r = self.run("cat", options, &[OsStr::new(path)]);
        r.assert_success();
        r.stdout.clone()
    }

    fn ls(&self, options: &[&str], path: &str) -> String {
        let r = self.run("ls", options, &[OsStr::new(path)]);
        r.assert_success();
        r.stdout_str()
    }
}

/// The lines of `ls` output, each reduced to its name (and `-> target`; runs of spaces in a
/// name read as one).
fn names(ls: &str) -> Vec<String> {
    ls.lines()
        .map(|l| l.split_whitespace().skip(6).collect::<Vec<_>>().join(" "))
        .collect()
}

/// Which links a guest has besides the tree: none (FAT; NTFS's are checked by their test), a
/// relative symlink `/link`, or that and a second name `/etc/fstab.again`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Links {
    None,
    Symbolic,
    Both,
}

/// What every guest holds, read as `ls`, `cat` and `copy-out` (to a folder and as tar) read it.
fn assert_reads_the_tree(r: &Reader, work: &Path, options: &[&str], links: Links) {
    let root = names(&r.ls(options, "/"));
    for want in ["dir", "etc", "var"] {
        assert!(root.contains(&want.to_string()), "no {want} in {root:?}");
    }
    assert_eq!(r.cat(options, "/etc/fstab"), FSTAB);
    assert_eq!(r.cat(options, "/dir/sub/file"), b"deep\n");
    assert!(
        r.cat(options, "/var/log/big") == big(),
        "/var/log/big differs"
    );
    let log = r.ls(options, "/var/log");
    assert!(log.contains(" 2500000 "), "the size of big in: {log}");
    if links != Links::None {
        assert_eq!(names(&r.ls(options, "/link")), ["/link -> etc/fstab"]);
        assert_eq!(r.cat(options, "/link"), FSTAB);
    }
    let out = work.join(format!("out-{}", options.join("-")));
    let copied = r.run("copy-out", options, &[OsStr::new("/"), out.as_os_str()]);
    copied.assert_success();
    assert_eq!(fs::read(out.join("etc/fstab")).unwrap(), FSTAB);
    assert!(fs::read(out.join("var/log/big")).unwrap() == big());
    assert_eq!(fs::read(out.join("dir/sub/file")).unwrap(), b"deep\n");
    if links != Links::None {
        let target = fs::read_link(out.join("link")).unwrap();
        assert_eq!(target, Path::new("etc/fstab"));
    }
    if links == Links::Both {
        use std::os::unix::fs::MetadataExt;
        let (a, b) = (out.join("etc/fstab"), out.join("etc/fstab.again"));
        let same = fs::metadata(&a).unwrap().ino() == fs::metadata(&b).unwrap().ino();
        assert!(
            same,
            "the second name of fstab was not copied as a hard link"
        );
    }
    let tar = r.run("copy-out", options, &[OsStr::new("/etc"), OsStr::new("-")]);
    tar.assert_success();
    let listed = run_tar_list(work, &tar.stdout);
    assert!(listed.contains("etc/fstab"), "tar lists: {listed}");
}

/// `tar tv` of an archive.
fn run_tar_list(work: &Path, archive: &[u8]) -> String {
    let file = work.join("list.tar");
    fs::write(&file, archive).unwrap();
    run_ok("tar", ["tvf".as_ref(), file.as_os_str()]).stdout_str()
}

#[test]
fn xfs_v5_and_v4_guests_are_read_in_aes_and_luks_overlays() {
    let dir = workdir();
    let work = dir.path();
    let src = source(work, true);
    let raw = loop_made(work, "xfs5", 320 * MIB, &["mkfs.xfs", "-q", "-f"], |mnt| {
        copy_tree(&src, mnt)
    });
    let r = Reader::new(work, encrypted(&raw, "luks", PASS));
    assert_reads_the_tree(&r, work, &[], Links::Both);
    // Root keeps owners and groups, as `cp -a` does (the setuid bits stay dropped).
    let out = work.join("as-root");
    let mut a: Vec<OsString> = vec!["copy-out".into(), "--passphrase-file".into()];
    a.extend([
        r.key.clone().into(),
        r.image.clone().into(),
        "/etc".into(),
        out.clone().into(),
    ]);
    qcowfs(&a).assert_success();
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(out.join("fstab")).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1234, 5678, 0o640));

    // This kernel mounts no v4 XFS: mkfs.xfs fills it from a prototype file (no hard links).
    let dir = workdir();
    let work = dir.path();
    let src = source(work, false);
    let proto = work.join("proto");
    let file = |p: &str| format!("{}", src.join(p).display());
    let text = format!(
        "boot\n0 0\nd--755 0 0\netc d--755 0 0\nfstab ---644 0 0 {}\n$\nvar d--755 0 0\n\
         log d--755 0 0\nbig ---640 0 0 {}\n$\n$\ndir d--755 0 0\nsub d--700 0 0\n\
         file ---600 0 0 {}\n$\n$\nlink l--777 0 0 etc/fstab\n$\n",
        file("etc/fstab"),
        file("var/log/big"),
        file("dir/sub/file")
    );
    fs::write(&proto, text).unwrap();
    let raw = work.join("xfs4.raw");
    create_raw(&raw, 320 * MIB);
    let p = format!("{}", proto.display());
    run_ok(
        "mkfs.xfs",
        [
            "-q".as_ref(),
            "-f".as_ref(),
            "-m".as_ref(),
            "crc=0".as_ref(),
            "-p".as_ref(),
            OsStr::new(&p),
            raw.as_os_str(),
        ],
    );
    let r = Reader::new(work, encrypted(&raw, "aes", PASS));
    assert_reads_the_tree(&r, work, &[], Links::Symbolic);
}

#[test]
fn an_xfs_log_the_kernel_left_dirty_is_read_as_the_kernel_recovers_it_without_writing() {
    let dir = workdir();
    let work = dir.path();
    let src = source(work, true);
    let raw = loop_made(work, "dirty", 320 * MIB, &["mkfs.xfs", "-q", "-f"], |mnt| {
        copy_tree(&src, mnt);
        run_ok("sync", [] as [&str; 0]);
        // Written and fsynced after the sync, then the file system stops as a power cut stops
        // it: what says `late` exists, and how long it is, is in the log only.
        let late = mnt.join("late");
        let write = ["-f", "-c", "pwrite -S 0x61 0 8192", "-c", "fsync"];
        run_ok(
            "xfs_io",
            write.iter().map(OsStr::new).chain([late.as_os_str()]),
        );
        fs::remove_file(mnt.join("dir/sub/file")).unwrap();
        let shutdown = ["-x", "-c", "shutdown -f"];
        run_ok(
            "xfs_io",
            shutdown.iter().map(OsStr::new).chain([mnt.as_os_str()]),
        );
    });
    let r = Reader::new(work, encrypted(&raw, "luks", PASS));
    let before = fs::read(&r.image).unwrap();
    assert_eq!(r.cat(&[], "/late"), vec![b'a'; 8192]);
    assert_eq!(r.cat(&[], "/etc/fstab"), FSTAB);
    let out = work.join("out");
    r.run("copy-out", &[], &[OsStr::new("/"), out.as_os_str()])
        .assert_success();
    assert!(
        fs::read(&r.image).unwrap() == before,
        "reading the guest wrote the image"
    );

    // The kernel's own recovery, on a copy, is the oracle.
    let copy = work.join("recovered.raw");
    fs::copy(&raw, &copy).unwrap();
    let mnt = LoopMount::new(&copy, "loop");
    let diff = run(
        "diff",
        [
            "-r".as_ref(),
            "--no-dereference".as_ref(),
            mnt.path().as_os_str(),
            out.as_os_str(),
        ],
    );
    mnt.umount(&copy);
    diff.assert_success();
}

#[test]
fn btrfs_guests_read_the_default_subvolume_a_chosen_one_and_nested_ones() {
    let dir = workdir();
    let work = dir.path();
    let src = source(work, true);
    let raw = loop_made(
        work,
        "btrfs",
        320 * MIB,
        &["mkfs.btrfs", "-q", "-f"],
        |mnt| {
            copy_tree(&src, mnt);
            run_ok(
                "btrfs",
                [
                    "subvolume".as_ref(),
                    "create".as_ref(),
                    mnt.join("@home").as_os_str(),
                ],
            );
            fs::write(mnt.join("@home/note"), b"home\n").unwrap();
            let nested = mnt.join("@home/nested");
            run_ok(
                "btrfs",
                ["subvolume".as_ref(), "create".as_ref(), nested.as_os_str()],
            );
            fs::write(nested.join("deeper"), b"nested\n").unwrap();
            run_ok(
                "btrfs",
                [
                    "subvolume".as_ref(),
                    "create".as_ref(),
                    mnt.join("@root").as_os_str(),
                ],
            );
            fs::write(mnt.join("@root/which"), b"the default one\n").unwrap();
        },
    );
    let r = Reader::new(work, encrypted(&raw, "aes", PASS));
    // The top of the file system, its nested subvolumes entered as the kernel enters them.
    assert_reads_the_tree(&r, work, &[], Links::Both);
    assert_eq!(r.cat(&[], "/@home/nested/deeper"), b"nested\n");
    assert_eq!(r.cat(&["--subvolume", "@home"], "/note"), b"home\n");
    assert_eq!(
        r.cat(&["--subvolume", "@home/nested"], "/deeper"),
        b"nested\n"
    );
    let wrong = r.run("ls", &["--subvolume", "@nope"], &[OsStr::new("/")]);
    assert_one_line_error(&wrong, &["no subvolume @nope", "@home"], REFUSAL_LIMIT);

    // `btrfs subvolume set-default`, as openSUSE's snapper roots use it: the default is read.
    let mnt = LoopMount::new(&raw, "loop");
    let set = run(
        "btrfs",
        [
            "subvolume".as_ref(),
            "set-default".as_ref(),
            mnt.path().join("@root").as_os_str(),
        ],
    );
    mnt.umount(&raw);
    set.assert_success();
    let r = Reader::new(work, encrypted(&raw, "luks", PASS));
    assert_eq!(r.cat(&[], "/which"), b"the default one\n");
    assert_eq!(r.cat(&["--subvolume", "5"], "/etc/fstab"), FSTAB);
}

/// A `$REPARSE_POINT` value of tag `tag` with a substitute and a print name (UTF-16LE), and for
/// a symbolic link its flags.
fn reparse(tag: u32, substitute: &str, print: &str, flags: Option<u32>) -> Vec<u8> {
    let utf16 = |s: &str| {
        s.encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect::<Vec<u8>>()
    };
    let (sub, prn) = (utf16(substitute), utf16(print));
    let mut data = Vec::new();
    // Each name ends in a NUL, as Windows writes them.
    for v in [0, sub.len(), sub.len() + 2, prn.len()] {
        data.extend_from_slice(&(v as u16).to_le_bytes());
    }
    if let Some(f) = flags {
        data.extend_from_slice(&f.to_le_bytes());
    }
    for name in [&sub, &prn] {
        data.extend_from_slice(name);
        data.extend_from_slice(&[0, 0]);
    }
    let mut value = tag.to_le_bytes().to_vec();
    value.extend_from_slice(&(data.len() as u16).to_le_bytes());
    value.extend_from_slice(&[0, 0]);
    value.extend_from_slice(&data);
    value
}

/// Unmounts its folder (lazily) when dropped while still mounted, so a step that fails between
/// a helper's mount and its umount leaves no mount behind on the host.
struct UnmountOnDrop(PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
}

#[test]
fn ntfs_guests_show_symbolic_links_and_junctions_as_links() {
    let dir = workdir();
    let work = dir.path();
    let src = source(work, false);
    let raw = work.join("ntfs.raw");
    create_raw(&raw, 64 * MIB);
    run_ok(
        "mkntfs",
        ["-q".as_ref(), "-F".as_ref(), "-f".as_ref(), raw.as_os_str()],
    );
    let mnt = work.join("ntfs.mnt");
    fs::create_dir_all(&mnt).unwrap();
    run_ok("ntfs-3g", [raw.as_os_str(), mnt.as_os_str()]);
    let ntfs_mount = UnmountOnDrop(mnt.clone());
    run_ok(
        "cp",
        ["-r".as_ref(), src.join(".").as_os_str(), mnt.as_os_str()],
    );
    // As Windows writes them (mklink and mklink /J): an empty file holding a reparse point.
    let hex = |v: Vec<u8>| {
        format!(
            "0x{}",
            v.iter().map(|b| format!("{b:02x}")).collect::<String>()
        )
    };
    for (name, value) in [
        (
            "link",
            reparse(0xA000_000C, r"etc\fstab", r"etc\fstab", Some(1)),
        ),
        (
            "Junction",
            reparse(0xA000_0003, r"\??\C:\Windows", r"C:\Windows", None),
        ),
    ] {
        // A junction is a folder, a file link a file.
        let at = mnt.join(name);
        match name {
            "Junction" => fs::create_dir(&at).unwrap(),
            _ => fs::write(&at, b"").unwrap(),
        }
        run_ok(
            "setfattr",
            [
                "-n".as_ref(),
                "system.ntfs_reparse_data".as_ref(),
                "-v".as_ref(),
                OsStr::new(&hex(value)),
                at.as_os_str(),
            ],
        );
    }
    run_ok("umount", [&mnt]);
    drop(ntfs_mount);
    let r = Reader::new(work, encrypted(&raw, "aes", PASS));
    assert_reads_the_tree(&r, work, &[], Links::None);
    assert_eq!(names(&r.ls(&[], "/link")), ["/link -> etc/fstab"]);
    assert_eq!(r.cat(&[], "/link"), FSTAB);
    assert_eq!(names(&r.ls(&[], "/Junction")), [r"/Junction -> C:\Windows"]);
    // Names match as Windows matches them; the metafiles stay hidden.
    assert_eq!(r.cat(&[], "/ETC/FSTAB"), FSTAB);
    let root = names(&r.ls(&[], "/"));
    assert!(
        !root.iter().any(|n| n.starts_with('$')),
        "metafiles listed: {root:?}"
    );
}

#[test]
fn fat32_fat16_and_fat12_guests_are_read() {
    for (name, bits, size, format) in [
        ("fat32", "32", 100 * MIB, "luks"),
        ("fat16", "16", 32 * MIB, "aes"),
        ("fat12", "12", 8 * MIB, "luks"),
    ] {
        let dir = workdir();
        let work = dir.path();
        let src = source(work, false);
        let raw = work.join(format!("{name}.raw"));
        create_raw(&raw, size);
        run_ok("mkfs.vfat", ["-F".as_ref(), bits.as_ref(), raw.as_os_str()]);
        // mtools: no mount, no root.
        let image = format!("{}", raw.display());
        run_ok(
            "mcopy",
            [
                "-s",
                "-i",
                &image,
                &format!("{}/etc", src.display()),
                &format!("{}/var", src.display()),
                &format!("{}/dir", src.display()),
                "::/",
            ],
        );
        let r = Reader::new(work, encrypted(&raw, format, PASS));
        assert_reads_the_tree(&r, work, &[], Links::None);
        assert_eq!(r.cat(&[], "/Etc/Fstab"), FSTAB, "{name}");
    }
}

#[test]
fn exfat_and_subvolumes_of_other_file_systems_are_refused_by_name() {
    let dir = workdir();
    let work = dir.path();
    let raw = work.join("exfat.raw");
    create_raw(&raw, 32 * MIB);
    run_ok("mkfs.exfat", [&raw]);
    let r = Reader::new(work, encrypted(&raw, "luks", PASS));
    let e = r.run("ls", &[], &[OsStr::new("/")]);
    assert_one_line_error(
        &e,
        &["exfat.luks.qcow2", "exFAT", "qcowfs mount"],
        REFUSAL_LIMIT,
    );

    let fat = work.join("fat.raw");
    create_raw(&fat, 8 * MIB);
    run_ok("mkfs.vfat", [&fat]);
    let r = Reader::new(work, encrypted(&fat, "aes", PASS));
    let e = r.run("ls", &["--subvolume", "x"], &[OsStr::new("/")]);
    assert_one_line_error(&e, &["--subvolume", "a FAT file system"], REFUSAL_LIMIT);
}
