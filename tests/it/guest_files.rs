//! `qcowfs ls`, `cat` and `copy-out`: the guest's ext2/3/4 file system read straight from the
//! decrypted chain, checked against the source trees `mkfs.ext4 -d` and a real loop mount put
//! into images that `qemu-img` made (legacy AES overlay over a raw base, LUKS, a partition of an
//! MBR disk); the refusals for contents it cannot read (XFS, LVM, swap, LUKS in the guest), for
//! more than one file system without `--partition`, and for bad guest paths.
//!
//! Each test prints the commands it ran (shown on failure: the steps to reproduce).

use crate::common;

use common::*;
use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

const PASS: &str = "guest files secret";

/// A refusal comes at once: no scan of the disk, no waiting.
const REFUSAL_LIMIT: Duration = Duration::from_secs(20);

/// Times of the source trees: old, whole seconds (so every ext4 inode size stores them exactly).
const EPOCH: i64 = 1_500_000_000;

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

// --- source trees --------------------------------------------------------------------------------

/// What one entry of a source tree is.
#[derive(Clone, Debug)]
enum Kind {
    File(Vec<u8>),
    /// A file of this length with data only in its first and last 4 KiB.
    Sparse(u64),
    Dir,
    Link(&'static str),
}

/// One entry of a source tree: path (relative), kind, mode, and its atime/mtime.
#[derive(Clone, Debug)]
struct Entry {
    path: String,
    kind: Kind,
    mode: u32,
    atime: i64,
    mtime: i64,
}

fn entry(path: &str, kind: Kind, mode: u32, n: i64) -> Entry {
    Entry {
        path: path.to_string(),
        kind,
        mode,
        atime: EPOCH + n * 86_400 + 7,
        mtime: EPOCH + n * 3_600,
    }
}

fn text(lines: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..lines {
        out.extend_from_slice(
            format!(
                "Dec  2 06:{:02}:{:02} guest kernel: line {i} of seed {seed}\n",
                i % 60,
                i % 59
            )
            .as_bytes(),
        );
    }
    out
}

/// The tree the base image is made from: texts, a big log (several streaming chunks), an empty
/// and a sparse file, a setuid program, a read-only folder, names with a space and a dot, and
/// symlinks that point out of the tree (absolute, up past the root, dangling).
fn base_tree() -> Vec<Entry> {
    vec![
        entry("etc", Kind::Dir, 0o755, 1),
        entry("etc/hostname", Kind::File(b"guest-a\n".to_vec()), 0o644, 2),
        entry("etc/fstab", Kind::File(text(20, 1)), 0o644, 3),
        entry("etc/shadow", Kind::File(text(5, 2)), 0o640, 4),
        entry(
            "etc/sp ace",
            Kind::File(b"a name with a space\n".to_vec()),
            0o600,
            5,
        ),
        entry("etc/escape", Kind::Link("/etc/passwd"), 0o777, 6),
        entry(
            "etc/up",
            Kind::Link("../../../../../../etc/shadow"),
            0o777,
            7,
        ),
        entry(".hidden", Kind::File(b"dot file\n".to_vec()), 0o644, 8),
        entry("usr", Kind::Dir, 0o755, 9),
        entry("usr/bin", Kind::Dir, 0o755, 10),
        entry(
            "usr/bin/tool",
            Kind::File(random_bytes(70_000, 3)),
            0o4755,
            11,
        ),
        entry("var", Kind::Dir, 0o755, 12),
        entry("var/log", Kind::Dir, 0o750, 13),
        entry("var/log/syslog", Kind::File(text(40_000, 4)), 0o640, 14),
        entry("var/empty", Kind::File(Vec::new()), 0o644, 15),
        entry("var/sparse", Kind::Sparse(3 * MIB + 4096), 0o644, 16),
        entry("var/run", Kind::Link("../run"), 0o777, 17),
        entry("opt", Kind::Dir, 0o755, 18),
        entry("opt/ro", Kind::Dir, 0o555, 19),
        entry(
            "opt/ro/inside",
            Kind::File(b"in a read-only folder\n".to_vec()),
            0o444,
            20,
        ),
    ]
}

/// What the overlay adds (written through a qcowfs mount) and the base file it rewrites.
fn overlay_tree() -> Vec<Entry> {
    vec![
        entry("overlay", Kind::Dir, 0o755, 30),
        entry("overlay/new.txt", Kind::File(text(300, 5)), 0o644, 31),
        entry("overlay/deep", Kind::Dir, 0o700, 32),
        entry("overlay/deep/a", Kind::Dir, 0o755, 33),
        entry(
            "overlay/deep/a/c.bin",
            Kind::File(compressible_bytes(200_000, 6)),
            0o600,
            34,
        ),
        entry("overlay/link", Kind::Link("new.txt"), 0o777, 35),
        entry("etc/hostname", Kind::File(b"guest-b\n".to_vec()), 0o644, 36),
    ]
}

/// The expected contents of every path of the chain: the base, then the overlay's entries.
fn merged(base: &[Entry], overlay: &[Entry]) -> Vec<Entry> {
    let mut out: Vec<Entry> = base
        .iter()
        .filter(|b| !overlay.iter().any(|o| o.path == b.path))
        .cloned()
        .collect();
    out.extend(overlay.iter().cloned());
    out
}

fn set_times(path: &Path, atime: i64, mtime: i64) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let ts = [
        libc::timespec {
            tv_sec: atime as libc::time_t,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: mtime as libc::time_t,
            tv_nsec: 0,
        },
    ];
    // SAFETY: c is a valid C string, ts two timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(
        rc,
        0,
        "utimensat {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Make `entries` under `root` (which exists); times and modes are set last, deepest first.
fn build_tree(root: &Path, entries: &[Entry]) {
    for e in entries {
        let p = root.join(&e.path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        match &e.kind {
            Kind::Dir => fs::create_dir_all(&p).unwrap(),
            Kind::File(data) => fs::write(&p, data).unwrap(),
            Kind::Sparse(len) => {
                let f = fs::File::create(&p).unwrap();
                f.set_len(*len).unwrap();
                f.write_all_at(&random_bytes(4096, 7), 0).unwrap();
                f.write_all_at(&random_bytes(4096, 8), len - 4096).unwrap();
            }
            Kind::Link(target) => std::os::unix::fs::symlink(target, &p).unwrap(),
        }
    }
    let mut order: Vec<&Entry> = entries.iter().collect();
    order.sort_by_key(|e| std::cmp::Reverse(e.path.matches('/').count()));
    for e in order {
        let p = root.join(&e.path);
        if !matches!(e.kind, Kind::Link(_)) {
            fs::set_permissions(&p, fs::Permissions::from_mode(e.mode)).unwrap();
        }
        set_times(&p, e.atime, e.mtime);
    }
}

fn expected_bytes(e: &Entry) -> Vec<u8> {
    match &e.kind {
        Kind::File(d) => d.clone(),
        Kind::Sparse(len) => {
            let mut v = vec![0u8; *len as usize];
            v[..4096].copy_from_slice(&random_bytes(4096, 7));
            let end = v.len();
            v[end - 4096..].copy_from_slice(&random_bytes(4096, 8));
            v
        }
        _ => panic!("{} has no bytes", e.path),
    }
}

/// The base tree written into `work/src`: (its entries, the folder).
fn base_source(work: &Path) -> (Vec<Entry>, PathBuf) {
    let entries = base_tree();
    let src = work.join("src");
    fs::create_dir(&src).unwrap();
    build_tree(&src, &entries);
    (entries, src)
}

/// The base tree as an ext4 file system of `size` bytes in `work/fs.raw`: (its entries, the file).
fn base_ext4(work: &Path, size: u64) -> (Vec<Entry>, PathBuf) {
    let (entries, src) = base_source(work);
    let raw = work.join("fs.raw");
    mkfs_ext4(&raw, &src, 0, size);
    (entries, raw)
}

/// An ext4 file system of `size` bytes made from `tree` into `file` at byte `offset` (the file
/// is made or extended as needed; what lies before the offset is kept).
fn mkfs_ext4(file: &Path, tree: &Path, offset: u64, size: u64) {
    let f = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(file)
        .unwrap();
    if f.metadata().unwrap().len() < offset + size {
        f.set_len(offset + size).unwrap();
    }
    drop(f);
    run_ok(
        "mkfs.ext4",
        [
            "-q".as_ref(),
            "-F".as_ref(),
            "-I".as_ref(),
            "256".as_ref(),
            "-E".as_ref(),
            format!("offset={offset},nodiscard").as_ref(),
            "-d".as_ref(),
            tree.as_os_str(),
            file.as_os_str(),
            OsStr::new(&format!("{}k", size / 1024)),
        ],
    );
}

/// `qemu-img convert` of a raw file into a qcow2 image, encrypted as `encrypt` says
/// (`Some("aes")`, `Some("luks")`) with [`PASS`].
fn convert(raw: &Path, dest: &Path, encrypt: Option<&str>) -> Image {
    let size = fs::metadata(raw).unwrap().len();
    let mut args: Vec<String> = vec![
        "convert".into(),
        "-f".into(),
        "raw".into(),
        "-O".into(),
        "qcow2".into(),
    ];
    let mut secrets = vec![None];
    if let Some(format) = encrypt {
        args.push("--object".into());
        args.push(format!("secret,id=s0,data={PASS}"));
        args.push("-o".into());
        let iter = if format == "luks" {
            ",encrypt.iter-time=10"
        } else {
            ""
        };
        args.push(format!(
            "encrypt.format={format},encrypt.key-secret=s0{iter}"
        ));
        secrets = vec![Some(PASS.to_string())];
    }
    args.push(path_str(raw).into());
    args.push(path_str(dest).into());
    qemu_img(&args);
    Image {
        path: dest.to_path_buf(),
        format: Format::Qcow2,
        size,
        secrets,
    }
}

// --- checking a copy ---------------------------------------------------------------------------

/// Every entry of `expected` is at `root` in the copy, with its bytes, mode (setuid and setgid
/// dropped), atime, mtime and symlink target; and the copy holds nothing else (but lost+found).
fn assert_copy_matches(root: &Path, expected: &[Entry], prefix: &str) {
    assert_copy_matches_with(root, expected, prefix, true)
}

/// [`assert_copy_matches`], atimes compared only when `atimes` (a tar archive has none).
fn assert_copy_matches_with(root: &Path, expected: &[Entry], prefix: &str, atimes: bool) {
    let wanted: Vec<&Entry> = expected
        .iter()
        .filter(|e| {
            e.path == prefix || prefix.is_empty() || e.path.starts_with(&format!("{prefix}/"))
        })
        .collect();
    assert!(!wanted.is_empty(), "nothing expected under {prefix:?}");
    for e in &wanted {
        let rel = match prefix {
            "" => e.path.as_str(),
            p if e.path == p => "",
            p => &e.path[p.len() + 1..],
        };
        let p = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(rel)
        };
        let meta = fs::symlink_metadata(&p).unwrap_or_else(|err| panic!("{}: {err}", p.display()));
        match &e.kind {
            Kind::Link(target) => {
                assert!(
                    meta.file_type().is_symlink(),
                    "{} is not a symlink",
                    p.display()
                );
                assert_eq!(
                    fs::read_link(&p).unwrap(),
                    PathBuf::from(target),
                    "{}",
                    p.display()
                );
            }
            Kind::Dir => {
                assert!(meta.is_dir(), "{} is not a folder", p.display());
                assert_eq!(meta.mode() & 0o7777, e.mode, "mode of {}", p.display());
            }
            _ => {
                assert!(meta.is_file(), "{} is not a file", p.display());
                assert_eq!(
                    meta.mode() & 0o7777,
                    e.mode & 0o1777,
                    "mode of {}",
                    p.display()
                );
                assert_same_bytes(&fs::read(&p).unwrap(), &expected_bytes(e), &e.path);
            }
        }
        assert_eq!(
            (meta.mtime(), meta.mtime_nsec()),
            (e.mtime, 0),
            "mtime of {}",
            p.display()
        );
        if atimes {
            assert_eq!(
                (meta.atime(), meta.atime_nsec()),
                (e.atime, 0),
                "atime of {}",
                p.display()
            );
        }
    }
    // Nothing more.
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if !fs::symlink_metadata(&dir).unwrap().is_dir() {
            continue;
        }
        for child in fs::read_dir(&dir).unwrap() {
            let child = child.unwrap().path();
            let rel = child
                .strip_prefix(root)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string();
            if rel == "lost+found" {
                continue;
            }
            let full = if prefix.is_empty() {
                rel.clone()
            } else {
                format!("{prefix}/{rel}")
            };
            assert!(
                wanted.iter().any(|e| e.path == full),
                "the copy holds {full}, which the guest does not"
            );
            stack.push(child);
        }
    }
}

/// `qcowfs ARGS` as `user`, or as root when `user` is None.
fn qcowfs_as(user: Option<&User>, args: &[OsString]) -> Run {
    match user {
        Some(u) => u.run(&qcowfs_bin(), args),
        None => qcowfs(args),
    }
}

/// `qcowfs COMMAND KEY_AND_IMAGE... REST...` as `user`.
fn guest_as(user: &User, command: &str, key_and_image: &[&OsStr], rest: &[&OsStr]) -> Run {
    let mut all = vec![OsStr::new(command)];
    all.extend_from_slice(key_and_image);
    all.extend_from_slice(rest);
    qcowfs_as(Some(user), &args(&all))
}

/// `qcowfs WORDS... IMAGE_ARGS... REST...`: the command and its options, the image with its key,
/// then the command's own arguments.
fn guest(words: &[&str], image_args: &[&OsStr], rest: &[&OsStr]) -> Run {
    let mut all: Vec<&OsStr> = words.iter().map(OsStr::new).collect();
    all.extend_from_slice(image_args);
    all.extend_from_slice(rest);
    qcowfs(args(&all))
}

fn args(items: &[&OsStr]) -> Vec<OsString> {
    items.iter().map(|s| s.to_os_string()).collect()
}

/// `qcowfs ls` of `dir` matches `expected`'s entries directly in it: mode string, size, mtime,
/// name and symlink target.
fn assert_ls_matches(run: &Run, expected: &[Entry], dir: &str) {
    run.assert_success();
    let out = run.stdout_str();
    let mut want: Vec<&Entry> = expected
        .iter()
        .filter(|e| match e.path.rsplit_once('/') {
            Some((parent, _)) => parent == dir,
            None => dir.is_empty(),
        })
        .collect();
    want.sort_by(|a, b| a.path.cmp(&b.path));
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| !l.ends_with(" lost+found"))
        .collect();
    assert_eq!(lines.len(), want.len(), "ls of /{dir}:\n{out}");
    for (line, e) in lines.iter().zip(&want) {
        let name = e.path.rsplit('/').next().unwrap();
        let (kind, mode) = match e.kind {
            Kind::Dir => ('d', e.mode),
            Kind::Link(_) => ('l', 0o777),
            _ => ('-', e.mode),
        };
        let mut ms = String::from(kind);
        for shift in [6, 3, 0] {
            let bits = (mode >> shift) & 7;
            ms.push(if bits & 4 != 0 { 'r' } else { '-' });
            ms.push(if bits & 2 != 0 { 'w' } else { '-' });
            let special = match shift {
                6 => mode & 0o4000 != 0,
                3 => mode & 0o2000 != 0,
                _ => mode & 0o1000 != 0,
            };
            ms.push(match (bits & 1 != 0, special, shift) {
                (true, true, 0) => 't',
                (true, true, _) => 's',
                (true, false, _) => 'x',
                _ => '-',
            });
        }
        let size = match &e.kind {
            Kind::File(d) => d.len() as u64,
            Kind::Sparse(n) => *n,
            Kind::Link(t) => t.len() as u64,
            Kind::Dir => 0,
        };
        let date = run_ok(
            "date",
            ["-u", "-d", &format!("@{}", e.mtime), "+%Y-%m-%d %H:%M:%S"],
        )
        .stdout_str();
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f[0], ms, "mode of {}: {line}", e.path);
        if !matches!(e.kind, Kind::Dir) {
            assert_eq!(f[3], size.to_string(), "size of {}: {line}", e.path);
        }
        assert!(
            line.contains(date.trim()),
            "mtime of {} ({}): {line}",
            e.path,
            date.trim()
        );
        match e.kind {
            Kind::Link(t) => assert!(line.ends_with(&format!(" {name} -> {t}")), "{line}"),
            _ => assert!(line.ends_with(&format!(" {name}")), "{line}"),
        }
    }
}

// --- the tests ---------------------------------------------------------------------------------

#[test]
fn a_user_lists_reads_and_copies_out_files_of_an_aes_overlay_and_its_raw_base() {
    let dir = workdir();
    let work = dir.path();
    let base_entries = base_tree();
    let overlay_entries = overlay_tree();
    let expected = merged(&base_entries, &overlay_entries);

    // The base: an ext4 made from the base tree, as a raw file.
    let src = work.join("src");
    fs::create_dir(&src).unwrap();
    build_tree(&src, &base_entries);
    let base_raw = work.join("base.raw");
    mkfs_ext4(&base_raw, &src, 0, 64 * MIB);
    let base = Image::plain(&base_raw, Format::Raw, 64 * MIB);
    // The overlay: legacy AES, its files written through a real mount of the chain.
    let overlay = qcow2(work.join("disk"), 64 * MIB)
        .aes(PASS)
        .backing(&base)
        .create();
    let key = passphrase_file(work, "key", PASS);
    let add = work.join("add");
    fs::create_dir(&add).unwrap();
    build_tree(&add, &overlay_entries);
    {
        // A fresh overlay: its key cannot be verified yet (tests/it/key_discipline.rs).
        let mount = Mount::new(
            &overlay.path,
            &[
                OsStr::new("--unverified-key"),
                OsStr::new("--passphrase-file"),
                key.as_os_str(),
            ],
        );
        let disk = mount.disk();
        let guest = LoopMount::new(&disk, "loop,noatime");
        run_ok(
            "cp",
            [
                "-a".as_ref(),
                add.join("overlay").as_os_str(),
                guest.path().as_os_str(),
            ],
        );
        run_ok(
            "cp",
            [
                "-a".as_ref(),
                add.join("etc/hostname").as_os_str(),
                guest.path().join("etc/hostname").as_os_str(),
            ],
        );
        run_ok("sync", [guest.path()]);
        guest.umount(&disk);
        mount.umount();
    }
    assert!(
        qemu_map(&overlay)
            .iter()
            .any(|e| e["depth"] == 0 && e["data"] == true),
        "the overlay holds no data: the test would not read files from it"
    );

    // Everything as a user who owns the images and the passphrase, nothing more.
    let user = test_user("qcowfs-reader");
    user.own(work);
    let img = overlay.path.as_os_str();
    let k = key.as_os_str();
    let pf = OsStr::new("--passphrase-file");

    for d in ["", "etc", "var", "overlay"] {
        let r = qcowfs_as(
            Some(&user),
            &args(&[OsStr::new("ls"), pf, k, img, OsStr::new(&format!("/{d}"))]),
        );
        assert_ls_matches(&r, &expected, d);
    }
    // A file or a symlink lists itself.
    let r = qcowfs_as(
        Some(&user),
        &args(&[OsStr::new("ls"), pf, k, img, OsStr::new("/etc/escape")]),
    );
    r.assert_success();
    assert!(
        r.stdout_str()
            .trim_end()
            .ends_with("/etc/escape -> /etc/passwd"),
        "{}",
        r.stdout_str()
    );

    for e in expected
        .iter()
        .filter(|e| matches!(e.kind, Kind::File(_) | Kind::Sparse(_)))
    {
        let r = guest_as(
            &user,
            "cat",
            &[pf, k, img],
            &[OsStr::new(&format!("/{}", e.path))],
        );
        r.assert_success();
        assert_same_bytes(&r.stdout, &expected_bytes(e), &e.path);
    }
    // cat follows a symlink inside the guest.
    let r = qcowfs_as(
        Some(&user),
        &args(&[OsStr::new("cat"), pf, k, img, OsStr::new("/overlay/link")]),
    );
    r.assert_success();
    assert_same_bytes(&r.stdout, &text(300, 5), "/overlay/link");

    // A wrong passphrase reads the overlay's clusters as noise; the refusal says it may be that.
    let wrong = passphrase_file(work, "wrong", "not the key");
    user.own(&wrong);
    let r = qcowfs_as(
        Some(&user),
        &args(&[
            OsStr::new("ls"),
            pf,
            wrong.as_os_str(),
            img,
            OsStr::new("/"),
        ]),
    );
    assert_one_line_error(&r, &["disk"], REFUSAL_LIMIT);
    assert!(r.stderr.contains("passphrase is wrong"), "{}", r.stderr);

    // The whole tree, then one folder and one file into an existing folder.
    let out = work.join("out");
    fs::create_dir(&out).unwrap();
    user.own(&out);
    let whole = out.join("whole");
    let r = guest_as(
        &user,
        "copy-out",
        &[pf, k, img],
        &[OsStr::new("/"), whole.as_os_str()],
    );
    r.assert_success();
    assert_copy_matches(&whole, &expected, "");
    for f in ["usr/bin/tool", "etc/hostname"] {
        assert_eq!(
            fs::metadata(whole.join(f)).unwrap().uid(),
            user.uid,
            "{f} belongs to the user"
        );
    }
    let r = guest_as(
        &user,
        "copy-out",
        &[pf, k, img],
        &[OsStr::new("/var"), out.as_os_str()],
    );
    r.assert_success();
    assert_copy_matches(&out.join("var"), &expected, "var");
    let r = guest_as(
        &user,
        "copy-out",
        &[pf, k, img],
        &[OsStr::new("/etc/hostname"), out.as_os_str()],
    );
    r.assert_success();
    assert_eq!(fs::read(out.join("hostname")).unwrap(), b"guest-b\n");

    // Again: the targets exist, nothing is overwritten.
    let before = fs::read(out.join("hostname")).unwrap();
    fs::write(out.join("hostname"), b"host's own\n").unwrap();
    let r = guest_as(
        &user,
        "copy-out",
        &[pf, k, img],
        &[OsStr::new("/etc/hostname"), out.as_os_str()],
    );
    assert_one_line_error(&r, &["hostname"], REFUSAL_LIMIT);
    assert!(r.stderr.contains("exists"), "{}", r.stderr);
    assert_eq!(fs::read(out.join("hostname")).unwrap(), b"host's own\n");
    assert_ne!(before, b"host's own\n");
    let r = guest_as(
        &user,
        "copy-out",
        &[pf, k, img],
        &[OsStr::new("/var"), out.as_os_str()],
    );
    assert_one_line_error(&r, &["var"], REFUSAL_LIMIT);
}

#[test]
fn a_luks_image_is_read_like_a_plain_one() {
    let dir = workdir();
    let work = dir.path();
    let (entries, raw) = base_ext4(work, 48 * MIB);
    let img = convert(&raw, &work.join("luks.qcow2"), Some("luks"));
    let key = passphrase_file(work, "key", PASS);
    let base = [
        OsStr::new("--passphrase-file"),
        key.as_os_str(),
        img.path.as_os_str(),
    ];

    let r = guest(&["ls"], &base, &[OsStr::new("/etc")]);
    assert_ls_matches(&r, &entries, "etc");
    let r = guest(&["cat"], &base, &[OsStr::new("/var/log/syslog")]);
    r.assert_success();
    assert_same_bytes(&r.stdout, &text(40_000, 4), "/var/log/syslog");
    let out = work.join("etc-copy");
    let r = guest(&["copy-out"], &base, &[OsStr::new("/etc"), out.as_os_str()]);
    r.assert_success();
    assert_copy_matches(&out, &entries, "etc");

    // As a tar stream, unpacked by GNU tar.
    let r = guest(&["copy-out"], &base, &[OsStr::new("/var"), OsStr::new("-")]);
    r.assert_success();
    let unpacked = work.join("unpacked");
    fs::create_dir(&unpacked).unwrap();
    run_with(
        std::process::Command::new("tar")
            .args(["-x", "-p", "-f", "-", "-C"])
            .arg(&unpacked),
        Some(&r.stdout),
        COMMAND_TIMEOUT,
    )
    .assert_success();
    assert_copy_matches_with(&unpacked.join("var"), &entries, "var", false);

    // A wrong passphrase is refused by LUKS's key check, in one line.
    let wrong = passphrase_file(work, "wrong", "not it");
    let r = qcowfs(args(&[
        OsStr::new("ls"),
        OsStr::new("--passphrase-file"),
        wrong.as_os_str(),
        img.path.as_os_str(),
        OsStr::new("/"),
    ]));
    assert_one_line_error(&r, &["luks.qcow2"], REFUSAL_LIMIT);
}

/// An MBR disk of 64 MiB: partition 1 at 1 MiB (16 MiB), partition 2 at 18 MiB (20 MiB); ext4
/// made from `tree` in partition 2, and in partition 1 too when `both`.
fn mbr_disk(work: &Path, tree: &Path, both: bool) -> Image {
    let raw = work.join("mbr.raw");
    create_raw(&raw, 64 * MIB);
    sfdisk(
        &raw,
        "label: dos\nstart=2048, size=32768, type=83\nstart=36864, size=40960, type=83\n",
    );
    if both {
        mkfs_ext4(&raw, tree, 2048 * 512, 16 * MIB);
    }
    mkfs_ext4(&raw, tree, 36864 * 512, 20 * MIB);
    assert_eq!(fs::metadata(&raw).unwrap().len(), 64 * MIB);
    convert(&raw, &work.join("mbr.qcow2"), Some("aes"))
}

/// A temp folder, the base tree, an AES MBR disk holding it (in partition 2; in partition 1 too
/// with `both`) and the passphrase file.
fn mbr_fixture(both: bool) -> (tempfile::TempDir, Vec<Entry>, Image, PathBuf) {
    let dir = workdir();
    let work = dir.path();
    let (entries, src) = base_source(work);
    let img = mbr_disk(work, &src, both);
    let key = passphrase_file(work, "key", PASS);
    (dir, entries, img, key)
}

#[test]
fn the_one_file_system_on_partition_2_of_an_mbr_disk_is_found_or_named() {
    let (dir, entries, img, key) = mbr_fixture(false);
    let work = dir.path();
    let base = [
        OsStr::new("--passphrase-file"),
        key.as_os_str(),
        img.path.as_os_str(),
    ];

    // Found without --partition (partition 1 holds nothing), and named with it.
    for extra in [&[][..], &["--partition", "2"][..]] {
        let r = guest(&[&["ls"][..], extra].concat(), &base, &[OsStr::new("/var")]);
        assert_ls_matches(&r, &entries, "var");
        let r = guest(
            &[&["cat"][..], extra].concat(),
            &base,
            &[OsStr::new("/etc/fstab")],
        );
        r.assert_success();
        assert_same_bytes(&r.stdout, &text(20, 1), "/etc/fstab");
    }
    let out = work.join("usr");
    let r = guest(
        &["copy-out", "--partition", "2"],
        &base,
        &[OsStr::new("/usr"), out.as_os_str()],
    );
    r.assert_success();
    assert_copy_matches(&out, &entries, "usr");

    // Partition 1 holds no file system; partition 7 does not exist.
    let r = guest(&["ls", "--partition", "1"], &base, &[OsStr::new("/")]);
    assert_one_line_error(&r, &["mbr.qcow2"], REFUSAL_LIMIT);
    assert!(
        r.stderr.contains("disk-part1") && r.stderr.contains("no file system"),
        "{}",
        r.stderr
    );
    let r = guest(&["ls", "--partition", "7"], &base, &[OsStr::new("/")]);
    assert_one_line_error(&r, &["mbr.qcow2"], REFUSAL_LIMIT);
    assert!(
        r.stderr.contains("no partition 7") && r.stderr.contains("1, 2"),
        "{}",
        r.stderr
    );
}

#[test]
fn two_file_systems_without_partition_are_listed_and_one_must_be_chosen() {
    let (_dir, _, img, key) = mbr_fixture(true);
    let base = [
        OsStr::new("--passphrase-file"),
        key.as_os_str(),
        img.path.as_os_str(),
    ];
    let r = guest(&["cat"], &base, &[OsStr::new("/etc/hostname")]);
    assert_one_line_error(&r, &["mbr.qcow2"], REFUSAL_LIMIT);
    assert!(
        r.stderr.contains("partitions 1, 2") && r.stderr.contains("--partition"),
        "{}",
        r.stderr
    );
    for n in ["1", "2"] {
        let r = guest(
            &["cat", "--partition", n],
            &base,
            &[OsStr::new("/etc/hostname")],
        );
        r.assert_success();
        assert_eq!(r.stdout, b"guest-a\n");
    }
}

/// A guest disk `name` of `size` bytes whose contents `make` puts into the raw file, as qcow2.
fn guest_disk(work: &Path, name: &str, size: u64, make: impl FnOnce(&Path)) -> Image {
    let raw = work.join(format!("{name}.raw"));
    create_raw(&raw, size);
    make(&raw);
    convert(&raw, &work.join(format!("{name}.qcow2")), None)
}

/// `qcowfs ls IMAGE /` is refused in one line that names the image and `what`, and suggests a
/// mount.
fn assert_refused(img: &Image, what: &str, suggests: &str) {
    for cmd in ["ls", "cat", "copy-out"] {
        let mut a = vec![OsString::from(cmd), img.path.clone().into(), "/".into()];
        if cmd == "copy-out" {
            a.push(img.path.with_extension("out").into());
        }
        let r = qcowfs(&a);
        assert_one_line_error(&r, &[file_name(&img.path)], REFUSAL_LIMIT);
        assert!(
            r.stderr.contains(what),
            "{cmd}: no {what:?} in: {}",
            r.stderr
        );
        assert!(
            r.stderr.contains(suggests),
            "{cmd}: no {suggests:?} in: {}",
            r.stderr
        );
    }
}

#[test]
fn lvm_swap_and_luks_guests_are_refused_with_what_was_found() {
    let dir = workdir();
    let work = dir.path();
    let lvm = guest_disk(work, "lvm", 32 * MIB, |raw| {
        let dev = run_ok(
            "losetup",
            ["-f".as_ref(), "--show".as_ref(), raw.as_os_str()],
        )
        .stdout_str();
        let dev = dev.trim().to_string();
        let made = run("pvcreate", ["-q", "-ff", "-y", dev.as_str()]);
        run_ok("losetup", ["-d", dev.as_str()]);
        made.assert_success();
    });
    assert_refused(&lvm, "LVM2 physical volume", "vgchange");
    let swap = guest_disk(work, "swap", 16 * MIB, |raw| {
        run_ok("mkswap", [raw]);
    });
    assert_refused(&swap, "swap", "holds no files");
    let luks = guest_disk(work, "luks", 32 * MIB, |raw| {
        let key = passphrase_file(work, "inner-key", "inner");
        run_ok(
            "cryptsetup",
            [
                "luksFormat".as_ref(),
                "-q".as_ref(),
                "--batch-mode".as_ref(),
                "--type".as_ref(),
                "luks2".as_ref(),
                "--pbkdf".as_ref(),
                "pbkdf2".as_ref(),
                "--pbkdf-force-iterations".as_ref(),
                "1000".as_ref(),
                "--key-file".as_ref(),
                key.as_os_str(),
                raw.as_os_str(),
            ],
        );
    });
    assert_refused(&luks, "LUKS", "cryptsetup open");
    let empty = guest_disk(work, "empty", 8 * MIB, |_| {});
    assert_refused(&empty, "no file system qcowfs reads found", "qcowfs mount");
}

#[test]
fn bad_guest_paths_are_one_line_errors() {
    let dir = workdir();
    let work = dir.path();
    let (_, raw) = base_ext4(work, 32 * MIB);
    let img = convert(&raw, &work.join("plain.qcow2"), None);
    let p = img.path.as_os_str();
    let dest = work.join("dest");
    let cases: [(&[&str], &str, &str); 7] = [
        (&["ls"], "/etc/nope", "file not found"),
        (&["cat"], "/nope/deeper", "file not found"),
        (&["cat"], "/var/log", "is a directory"),
        (&["cat"], "etc/hostname", "absolute"),
        (&["ls"], "/etc/hostname/x", "not a directory"),
        (&["copy-out"], "/etc/missing", "file not found"),
        (&["ls"], "/var/run/", "file not found"),
    ];
    for (cmd, guest, says) in cases {
        let mut a: Vec<OsString> = cmd.iter().map(OsString::from).collect();
        a.push(p.into());
        a.push(guest.into());
        if cmd[0] == "copy-out" {
            a.push(dest.clone().into());
        }
        let r = qcowfs(&a);
        assert_one_line_error(&r, &["plain.qcow2"], REFUSAL_LIMIT);
        let shown = guest.trim_end_matches('/');
        assert!(
            r.stderr.contains(shown) && r.stderr.contains(says),
            "{cmd:?} {guest}: {}",
            r.stderr
        );
    }
    assert!(!dest.exists(), "a failed copy-out left {}", dest.display());
}

/// Runs `qcowfs ARGS`, which must succeed or fail in one line naming the image, without a panic;
/// whether it failed.
fn assert_success_or_one_line_error(a: &[OsString], image: &str) -> bool {
    let r = qcowfs(a);
    assert!(
        !r.stderr.contains("panicked"),
        "qcowfs panicked: {}\n{}",
        r.command,
        r.stderr
    );
    if !r.status.success() {
        assert_one_line_error(&r, &[image], Duration::from_secs(30));
    }
    !r.status.success()
}

#[test]
fn a_directory_loop_ends_the_copy_with_one_line() {
    let dir = workdir();
    let work = dir.path();
    let (_, raw) = base_ext4(work, 32 * MIB);
    // Two more names for /etc inside itself: a loop that doubles at every level.
    run_ok(
        "debugfs",
        [
            "-w".as_ref(),
            "-R".as_ref(),
            "ln etc etc/loop".as_ref(),
            raw.as_os_str(),
        ],
    );
    run_ok(
        "debugfs",
        [
            "-w".as_ref(),
            "-R".as_ref(),
            "ln etc etc/again".as_ref(),
            raw.as_os_str(),
        ],
    );
    let img = convert(&raw, &work.join("loop.qcow2"), None);
    let r = qcowfs([
        OsStr::new("copy-out"),
        img.path.as_os_str(),
        OsStr::new("/etc"),
        work.join("out").as_os_str(),
    ]);
    assert_one_line_error(&r, &["loop.qcow2"], Duration::from_secs(60));
    // /etc/loop is /etc again: entered once, its second name refused by name.
    assert!(
        r.stderr.contains("/etc/loop: a second name for a folder"),
        "{}",
        r.stderr
    );
    // Listing it is harmless.
    let r = qcowfs([
        OsStr::new("ls"),
        img.path.as_os_str(),
        OsStr::new("/etc/loop/loop/again"),
    ]);
    r.assert_success();
    assert!(r.stdout_str().contains(" hostname\n"), "{}", r.stdout_str());
}

#[test]
fn a_corrupt_file_system_gives_one_line_errors_never_a_panic() {
    const ROUNDS: u64 = 16;
    let dir = workdir();
    let work = dir.path();
    let (_, raw) = base_ext4(work, 16 * MIB);
    let pristine = fs::read(&raw).unwrap();
    // A superblock claiming far more blocks than the disk has is refused before it is used.
    let mut huge = pristine.clone();
    huge[1024 + 4..1024 + 8].copy_from_slice(&u32::MAX.to_le_bytes());
    let huge_raw = work.join("huge.raw");
    fs::write(&huge_raw, &huge).unwrap();
    let img = convert(&huge_raw, &work.join("huge.qcow2"), None);
    let r = qcowfs([OsStr::new("ls"), img.path.as_os_str(), OsStr::new("/")]);
    assert_one_line_error(&r, &["huge.qcow2"], REFUSAL_LIMIT);
    assert!(r.stderr.contains("superblock claims"), "{}", r.stderr);
    // Metadata lives in the first blocks: the superblock, group descriptors, bitmaps, inode
    // table, the first directory and extent blocks (and some file data).
    // Damage lands in blocks that hold something (1 KiB blocks: a small file system).
    let used: Vec<usize> = (1..(2 * MIB as usize) / 1024)
        .filter(|b| pristine[b * 1024..(b + 1) * 1024].iter().any(|&x| x != 0))
        .collect();
    let mut rng = Rng::new(99);
    let mut failures = 0;
    for round in 0..ROUNDS {
        let mut bytes = pristine.clone();
        for _ in 0..8 {
            let block = used[rng.below(used.len() as u64) as usize];
            let off = block * 1024 + rng.below(1024 - 64) as usize;
            let len = rng.range(1, 64) as usize;
            let junk = random_bytes(len, rng.next_u64());
            bytes[off..off + len].copy_from_slice(&junk);
        }
        let raw_n = work.join(format!("bad{round}.raw"));
        fs::write(&raw_n, &bytes).unwrap();
        let img = convert(&raw_n, &work.join(format!("bad{round}.qcow2")), None);
        let name = file_name(&img.path).to_string();
        let p = img.path.as_os_str();
        for a in [
            args(&[OsStr::new("ls"), p, OsStr::new("/etc")]),
            args(&[OsStr::new("cat"), p, OsStr::new("/var/log/syslog")]),
            args(&[
                OsStr::new("copy-out"),
                p,
                OsStr::new("/"),
                work.join(format!("out{round}")).as_os_str(),
            ]),
        ] {
            failures += usize::from(assert_success_or_one_line_error(&a, &name));
        }
    }
    eprintln!("{failures} of {} commands failed", ROUNDS * 3);
    assert!(
        failures > 0,
        "no corruption was noticed: the test damaged nothing that is read"
    );
}

#[test]
fn an_image_in_use_by_a_writer_is_refused_unless_force_share() {
    let dir = workdir();
    let work = dir.path();
    let (_, raw) = base_ext4(work, 32 * MIB);
    let img = convert(&raw, &work.join("busy.qcow2"), None);
    // A read-write mount holds QEMU's write lock, as a running VM does.
    let mount = Mount::new(&img.path, &[] as &[&str]);
    let p = img.path.as_os_str();
    let r = qcowfs([OsStr::new("cat"), p, OsStr::new("/etc/hostname")]);
    assert_one_line_error(&r, &["busy.qcow2"], REFUSAL_LIMIT);
    assert!(r.stderr.contains("in use"), "{}", r.stderr);
    let r = qcowfs([
        OsStr::new("cat"),
        OsStr::new("--force-share"),
        p,
        OsStr::new("/etc/hostname"),
    ]);
    r.assert_success();
    assert_eq!(r.stdout, b"guest-a\n");
    mount.umount();
    // Once the writer is gone, the reader locks are free again.
    let r = qcowfs([OsStr::new("ls"), p, OsStr::new("/")]);
    r.assert_success();
}

// --- hostile shapes: folder DAGs, shared files, huge holes -------------------------------------

/// `mke2fs -t TYPE OPTIONS -d TREE FILE SIZE` (1 KiB blocks: small file systems, many blocks).
fn mke2fs(kind: &str, options: &[&str], tree: &Path, file: &Path, size: &str) {
    let mut a: Vec<&OsStr> = vec![
        "-q".as_ref(),
        "-F".as_ref(),
        "-t".as_ref(),
        kind.as_ref(),
        "-b".as_ref(),
        "1024".as_ref(),
    ];
    a.extend(options.iter().map(OsStr::new));
    a.extend([
        OsStr::new("-d"),
        tree.as_os_str(),
        file.as_os_str(),
        OsStr::new(size),
    ]);
    run_ok("mke2fs", a);
}

/// `debugfs -w -R COMMAND FILE`.
fn debugfs(file: &Path, command: &str) {
    run_ok(
        "debugfs",
        [
            "-w".as_ref(),
            "-R".as_ref(),
            OsStr::new(command),
            file.as_os_str(),
        ],
    );
}

/// Folders /d0 (one 16 KiB file) to /d14, each /dN holding two more names, x and y, for
/// /d(N-1): a DAG in which /d14 reaches /d0 by 2^14 paths (256 MiB of copies from 1 MiB of
/// file system), made into `work/NAME.qcow2`.
fn folder_dag(work: &Path, name: &str) -> Image {
    let src = work.join(format!("{name}-src"));
    fs::create_dir_all(src.join("d0")).unwrap();
    fs::write(src.join("d0/data"), random_bytes(16384, 5)).unwrap();
    for i in 1..=14 {
        fs::create_dir(src.join(format!("d{i}"))).unwrap();
    }
    let raw = work.join(format!("{name}.raw"));
    mke2fs("ext4", &[], &src, &raw, "16M");
    for i in 1..=14 {
        for link in ["x", "y"] {
            debugfs(&raw, &format!("link /d{} /d{i}/{link}", i - 1));
        }
    }
    convert(&raw, &work.join(format!("{name}.qcow2")), None)
}

/// Bytes in all files under `dir` (what a copy wrote), symlinks not followed.
fn bytes_under(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .map(|e| e.unwrap().path())
        .map(|p| match fs::symlink_metadata(&p).unwrap() {
            m if m.is_dir() => bytes_under(&p),
            m => m.len(),
        })
        .sum()
}

#[test]
fn hard_linked_folders_are_entered_once_and_the_second_name_is_refused() {
    let dir = workdir();
    let work = dir.path();
    let img = folder_dag(work, "dag");
    let out = work.join("out");
    let started = std::time::Instant::now();
    let r = qcowfs([
        OsStr::new("copy-out"),
        img.path.as_os_str(),
        OsStr::new("/d14"),
        out.as_os_str(),
    ]);
    assert_one_line_error(&r, &["dag.qcow2"], Duration::from_secs(30));
    // /d14/x/.../x/y is the first second name of a folder met, depth first.
    let second = format!("/d14{}/y", "/x".repeat(13));
    assert!(
        r.stderr
            .contains(&format!("{second}: a second name for a folder")),
        "{}",
        r.stderr
    );
    assert!(
        bytes_under(&out) <= 16384,
        "{} bytes copied",
        bytes_under(&out)
    );
    let r = qcowfs([
        OsStr::new("copy-out"),
        img.path.as_os_str(),
        OsStr::new("/"),
        OsStr::new("-"),
    ]);
    assert_one_line_error(&r, &["dag.qcow2"], Duration::from_secs(30));
    assert!(
        r.stderr.contains(": a second name for a folder"),
        "{}",
        r.stderr
    );
    assert!(
        r.stdout.len() < 256 * 1024,
        "{} bytes of tar",
        r.stdout.len()
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_file_with_two_names_is_copied_once_and_hard_linked() {
    let dir = workdir();
    let work = dir.path();
    let src = work.join("src");
    fs::create_dir_all(src.join("a")).unwrap();
    fs::write(src.join("a/one"), random_bytes(20000, 9)).unwrap();
    fs::hard_link(src.join("a/one"), src.join("two")).unwrap();
    let raw = work.join("links.raw");
    mke2fs("ext4", &[], &src, &raw, "4M");
    let img = convert(&raw, &work.join("links.qcow2"), None);
    let out = work.join("out");
    qcowfs([
        OsStr::new("copy-out"),
        img.path.as_os_str(),
        OsStr::new("/"),
        out.as_os_str(),
    ])
    .assert_success();
    let (one, two) = (out.join("a/one"), out.join("two"));
    assert_eq!(
        fs::read(&one).unwrap(),
        fs::read(src.join("a/one")).unwrap()
    );
    assert_eq!(
        fs::metadata(&one).unwrap().ino(),
        fs::metadata(&two).unwrap().ino()
    );
    // The tar stream: a hard link entry, which GNU tar extracts as one.
    let r = qcowfs([
        OsStr::new("copy-out"),
        img.path.as_os_str(),
        OsStr::new("/"),
        OsStr::new("-"),
    ]);
    r.assert_success();
    assert!(
        r.stdout.len() < 64 * 1024,
        "{} bytes of tar",
        r.stdout.len()
    );
    let tarball = work.join("links.tar");
    fs::write(&tarball, &r.stdout).unwrap();
    let x = work.join("x");
    fs::create_dir(&x).unwrap();
    run_ok(
        "tar",
        [
            "-xf".as_ref(),
            tarball.as_os_str(),
            "-C".as_ref(),
            x.as_os_str(),
        ],
    );
    let (one, two) = (x.join("a/one"), x.join("two"));
    assert_eq!(
        fs::read(&two).unwrap(),
        fs::read(src.join("a/one")).unwrap()
    );
    assert_eq!(
        fs::metadata(&one).unwrap().ino(),
        fs::metadata(&two).unwrap().ino()
    );
}

/// Marks written into the sparse source files: (offset, bytes).
fn marks(len: u64) -> Vec<(u64, Vec<u8>)> {
    vec![
        (0, b"start".to_vec()),
        (len / 3 + 5, random_bytes(3000, 1)),
        (len - 4, b"end!".to_vec()),
    ]
}

/// A file of `len` bytes holding only [`marks`]; the rest holes.
fn sparse_file(path: &Path, len: u64) {
    let f = fs::File::create(path).unwrap();
    f.set_len(len).unwrap();
    for (at, bytes) in marks(len) {
        f.write_all_at(&bytes, at).unwrap();
    }
}

/// `file` is `len` bytes, holds [`marks`], and takes no more than 1 MiB of disk.
fn assert_sparse_copy(file: &Path, len: u64) {
    let m = fs::metadata(file).unwrap();
    assert_eq!(m.len(), len, "{}", file.display());
    assert!(
        m.blocks() * 512 <= MIB,
        "{}: {} blocks",
        file.display(),
        m.blocks()
    );
    let f = fs::File::open(file).unwrap();
    for (at, bytes) in marks(len) {
        let mut got = vec![0u8; bytes.len()];
        f.read_exact_at(&mut got, at).unwrap();
        assert_eq!(got, bytes, "{} at {at}", file.display());
    }
    let mut before = [1u8; 4096];
    f.read_exact_at(&mut before, len / 3 - 4096).unwrap();
    assert!(
        before.iter().all(|&b| b == 0),
        "the hole before the middle mark"
    );
}

#[test]
fn sparse_files_are_copied_as_holes_to_a_folder_and_a_tar_stream_in_seconds() {
    const TIB: u64 = 1 << 40;
    let dir = workdir();
    let work = dir.path();
    // ext4 (an extent tree) with a 1 TiB file, ext3 (indirect blocks) with a 15 GiB one.
    for (kind, len) in [("ext4", TIB), ("ext3", 15 << 30)] {
        let src = work.join(format!("{kind}-src"));
        fs::create_dir(&src).unwrap();
        sparse_file(&src.join("huge"), len);
        let raw = work.join(format!("{kind}.raw"));
        mke2fs(kind, &[], &src, &raw, "8M");
        let img = convert(&raw, &work.join(format!("{kind}.qcow2")), None);
        let started = std::time::Instant::now();
        let out = work.join(format!("{kind}-out"));
        qcowfs([
            OsStr::new("copy-out"),
            img.path.as_os_str(),
            OsStr::new("/huge"),
            out.as_os_str(),
        ])
        .assert_success();
        assert_sparse_copy(&out, len);
        let r = qcowfs([
            OsStr::new("copy-out"),
            img.path.as_os_str(),
            OsStr::new("/huge"),
            OsStr::new("-"),
        ]);
        r.assert_success();
        assert!(
            r.stdout.len() < 64 * 1024,
            "{kind}: {} bytes of tar",
            r.stdout.len()
        );
        let tarball = work.join(format!("{kind}.tar"));
        fs::write(&tarball, &r.stdout).unwrap();
        let x = work.join(format!("{kind}-x"));
        fs::create_dir(&x).unwrap();
        run_ok(
            "tar",
            [
                "-xf".as_ref(),
                tarball.as_os_str(),
                "-C".as_ref(),
                x.as_os_str(),
            ],
        );
        assert_sparse_copy(&x.join("huge"), len);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{kind}: {:?}",
            started.elapsed()
        );
    }
}
