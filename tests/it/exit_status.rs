//! Every exit status of the table in `qcowfs --help` (src/cli.rs `EXIT_STATUSES`), through bad
//! inputs an operator meets: each case is one command in a nova-like tree, its exit status and
//! words its one stderr line must hold (the file's role, the fix). With QCOWFS_PRINT_TABLE=1 the
//! test prints the table of cases, messages and statuses (as the README and the closing note of
//! the operator-grade issue show it).
//!
//! Status 8 (host I/O) is here as a tar stream into /dev/full; a full host disk under umount and
//! under seal are tests/it/host_full.rs and tests/it/seal_chain.rs.

use crate::common;

use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const PASS: &str = "right horse battery";

/// One bad input: the arguments (paths relative to the tree), the status and words of its line.
struct Case {
    args: &'static str,
    status: i32,
    says: &'static [&'static str],
}

const fn case(args: &'static str, status: i32, says: &'static [&'static str]) -> Case {
    Case { args, status, says }
}

/// The tree every case runs in: nova's layout (an AES disk over a raw ext4 base, one without
/// data of its own), a LUKS image, keys of every kind, damaged and foreign files.
fn tree(dir: &Path) {
    let key = |name: &str, text: &[u8]| {
        let p = dir.join(name);
        fs::write(&p, text).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    };
    key("key", PASS.as_bytes());
    key("wrong", b"wrong horse");
    key("key.b64", b"cmlnaHQgaG9yc2UgYmF0dGVyeQ==\n");
    key("plain.b64", b"right horse battery!\n");
    key("empty.b64", b" \n");
    fs::create_dir_all(dir.join("nova/_base")).unwrap();
    let files = dir.join("files");
    fs::create_dir_all(files.join("etc")).unwrap();
    fs::write(files.join("etc/fstab"), b"/dev/vda1 / ext4 defaults 0 1\n").unwrap();
    let base = dir.join("nova/_base/base");
    mkfs_ext4_from(&files, &base, Some("16M"));
    let disk = |inst: &str| {
        let path = dir.join(format!("nova/{inst}/disk"));
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        qcow2(&path, 16 * MIB)
            .aes(PASS)
            .backing_named(&Image::plain(&base, Format::Raw, 16 * MIB), "../_base/base")
            .create()
    };
    let inst1 = disk("inst1");
    // Guest data of its own, so a key can be judged: the ext4 superblock rewritten as it is.
    let superblock = fs::read(&base).unwrap()[..64 * 1024].to_vec();
    inst1.write_bytes(0, &superblock);
    disk("inst2");
    let luks = qcow2(dir.join("luks.qcow2"), 16 * MIB).luks(PASS).create();
    luks.write_pattern(0, MIB, 0x5a);
    qcow2(dir.join("plain.qcow2"), 16 * MIB)
        .create()
        .write_pattern(0, MIB, 0x11);
    qcow2(dir.join("nobase.qcow2"), 16 * MIB)
        .backing_named(&Image::plain(&base, Format::Raw, 16 * MIB), "gone.raw")
        .create();
    let corrupt = qcow2(dir.join("corrupt.qcow2"), 16 * MIB).create();
    corrupt.write_pattern(0, 64 * 1024, 1);
    patch_be_u64(&corrupt.path, 72, 1 << 1);
    let short = qcow2(dir.join("short.qcow2"), 16 * MIB).create();
    truncate_file(&short.path, 50);
    let v4 = qcow2(dir.join("v4.qcow2"), 16 * MIB).create();
    patch_be_u32(&v4.path, 4, 4);
    let bits = qcow2(dir.join("bits.qcow2"), 16 * MIB).create();
    patch_be_u32(&bits.path, 20, 8);
    let l1 = qcow2(dir.join("l1.qcow2"), 16 * MIB).create();
    l1.write_pattern(0, 4096, 1);
    patch_be_u64(&l1.path, 40, 1 << 40);
    let future = qcow2(dir.join("future.qcow2"), 16 * MIB).create();
    patch_be_u64(&future.path, 72, 1 << 20);
    fs::write(dir.join("notes.txt"), b"not a disk image\n".repeat(1000)).unwrap();
    let raw = dir.join("raw.img");
    fs::write(&raw, vec![0u8; MIB as usize]).unwrap();
    run_ok("mkfifo", [dir.join("fifo")]);
    // A guest whose ext4 superblock is damaged behind a valid magic.
    let broken = dir.join("broken.raw");
    fs::copy(&base, &broken).unwrap();
    patch_be_u32(&broken, 1024 + 0x18, 0x7fff_ffff); // s_log_block_size
    fs::rename(encrypted(&broken, "aes", PASS), dir.join("broken.qcow2")).unwrap();
    fs::create_dir_all(dir.join("mnt-empty")).unwrap();
    fs::create_dir_all(dir.join("mnt-full")).unwrap();
    fs::write(dir.join("mnt-full/file"), b"x").unwrap();
    fs::create_dir_all(dir.join("dest")).unwrap();
    fs::write(dir.join("dest/fstab"), b"already here").unwrap();
    fs::create_dir_all(dir.join("secrets")).unwrap();
}

const CASES: &[Case] = &[
    // 2: usage.
    case("info", 2, &["IMAGE"]),
    case("frobnicate nova/inst1/disk", 2, &["frobnicate"]),
    case("info --bogus nova/inst1/disk", 2, &["--bogus"]),
    case(
        "mount --cache-size lots nova/inst1/disk mnt-empty",
        2,
        &["lots"],
    ),
    case("mount -U nova/inst1/disk mnt-empty", 2, &["--read-only"]),
    case(
        "ls --tries 0 --passphrase-file key nova/inst1/disk /",
        2,
        &["0"],
    ),
    case(
        "ls --passphrase-file key --passphrase-base64-file key.b64 nova/inst1/disk /",
        2,
        &["cannot be used with"],
    ),
    case(
        "ls --libvirt-secret ../../etc/shadow nova/inst1/disk /",
        2,
        &["UUID"],
    ),
    case(
        "check -r some --passphrase-file key nova/inst1/disk",
        2,
        &["some"],
    ),
    case(
        "check -U -r all --passphrase-file key nova/inst1/disk",
        2,
        &["cannot be used with"],
    ),
    case(
        "ls nova/inst1/disk /",
        2,
        &["no passphrase was given", "--passphrase-file"],
    ),
    case(
        "mount nova/inst1/disk mnt-empty",
        2,
        &["no passphrase was given"],
    ),
    case(
        "ls --passphrase-base64-file plain.b64 nova/inst1/disk /",
        2,
        &[
            "passphrase file plain.b64",
            "not base64",
            "use --passphrase-file",
        ],
    ),
    case(
        "ls --passphrase-base64-file empty.b64 nova/inst1/disk /",
        2,
        &["passphrase file empty.b64", "empty"],
    ),
    case(
        "ls --layer-passphrase-file key nova/inst1/disk /",
        2,
        &["PATH=FILE"],
    ),
    case(
        "ls --layer-passphrase-file luks.qcow2=key nova/inst1/disk /",
        2,
        &["names no layer", "inst1/disk"],
    ),
    case(
        "ls --layer-passphrase-file nope.qcow2=key nova/inst1/disk /",
        2,
        &["nope.qcow2", "--layer-passphrase-file", "No such file"],
    ),
    case(
        "ls --passphrase-file key nova/inst1/disk etc",
        2,
        &["absolute"],
    ),
    case(
        "cat --passphrase-file key nova/inst1/disk /etc",
        2,
        &["is a directory"],
    ),
    case(
        "ls --subvolume @ --passphrase-file key nova/inst1/disk /",
        2,
        &["subvolume"],
    ),
    case(
        "mount --passphrase-file key nova/inst1/disk mnt-full",
        2,
        &["mountpoint mnt-full", "not empty", "--nonempty"],
    ),
    case(
        "mount --passphrase-file key nova/inst1/disk notes.txt",
        2,
        &["mountpoint notes.txt", "not a folder"],
    ),
    case(
        "info --backing-within notes.txt nova/inst1/disk",
        2,
        &["--backing-within needs a folder"],
    ),
    case("info fifo", 2, &["FIFO", "not an image"]),
    case("umount dest", 2, &["not a qcowfs mount point"]),
    // 3: a wrong passphrase.
    case(
        "ls --passphrase-file wrong nova/inst1/disk /",
        3,
        &["passphrase is wrong", "noise"],
    ),
    case(
        "cat --passphrase-file wrong luks.qcow2 /etc/fstab",
        3,
        &["no key slot opens"],
    ),
    case(
        "check-key --passphrase-file wrong luks.qcow2",
        3,
        &["wrong passphrase", "no LUKS key slot opens"],
    ),
    case(
        "check-key --passphrase-file wrong nova/inst1/disk",
        3,
        &["inst1/disk", "wrong"],
    ),
    case(
        "write --passphrase-file wrong nova/inst1/disk /etc/motd",
        3,
        &["passphrase is wrong"],
    ),
    case(
        "seal --passphrase-file wrong nova/inst1/disk",
        3,
        &["passphrase is wrong"],
    ),
    case(
        "mount --passphrase-file wrong nova/inst1/disk mnt-empty",
        3,
        &["passphrase is wrong"],
    ),
    case(
        "check --passphrase-file wrong luks.qcow2",
        3,
        &["no key slot opens"],
    ),
    case(
        "info --passphrase-file wrong luks.qcow2",
        3,
        &["no key slot opens"],
    ),
    // 4: a passphrase that cannot be verified, for a command that writes.
    case(
        "write --passphrase-file wrong nova/inst2/disk /etc/motd",
        4,
        &["cannot be verified", "--unverified-key"],
    ),
    case(
        "mkdir --passphrase-file key nova/inst2/disk /srv",
        4,
        &["cannot be verified"],
    ),
    case(
        "seal --passphrase-file key nova/inst2/disk",
        4,
        &["cannot be verified"],
    ),
    case(
        "mount --passphrase-file key nova/inst2/disk mnt-empty",
        4,
        &["cannot be verified"],
    ),
    case(
        "check-key --passphrase-file key nova/inst2/disk",
        4,
        &["cannot be verified"],
    ),
    // 6: missing, or not permitted.
    case(
        "info nova/inst9/disk",
        6,
        &["nova/inst9/disk", "No such file"],
    ),
    case(
        "ls --passphrase-file nokey nova/inst1/disk /",
        6,
        &["passphrase file nokey: No such file"],
    ),
    case(
        "ls --passphrase-base64-file nokey.b64 nova/inst1/disk /",
        6,
        &["passphrase file nokey.b64"],
    ),
    case(
        "info nobase.qcow2",
        6,
        &["backing file", "gone.raw of nobase.qcow2: missing"],
    ),
    case(
        "ls nobase.qcow2 /",
        6,
        &["gone.raw of nobase.qcow2: missing"],
    ),
    case(
        "mount --passphrase-file key nova/inst1/disk mnt-none",
        6,
        &["mountpoint mnt-none", "mkdir"],
    ),
    case(
        "info nova/inst1",
        6,
        &["instance folder", "nova/inst1/disk"],
    ),
    case(
        "info nova",
        6,
        &["instances folder", "nova/UUID/disk", "qcowfs audit"],
    ),
    case(
        "info --backing-within nowhere nova/inst1/disk",
        6,
        &["nowhere", "No such file"],
    ),
    case(
        "ls --passphrase-file key nova/inst1/disk /etc/nothing",
        6,
        &["/etc/nothing"],
    ),
    case(
        "cat --passphrase-file key nova/inst1/disk /etc/fstab/x",
        6,
        &["/etc/fstab"],
    ),
    case(
        "ls --partition 3 --passphrase-file key nova/inst1/disk /",
        6,
        &["no partition 3"],
    ),
    case(
        "ls --lv vg/root --passphrase-file key nova/inst1/disk /",
        6,
        &["vg/root"],
    ),
    case(
        "rm --passphrase-file key nova/inst1/disk /etc/nothing",
        6,
        &["/etc/nothing"],
    ),
    case(
        "copy-in --passphrase-file key nova/inst1/disk nothing-here /etc",
        6,
        &["nothing-here"],
    ),
    case(
        "ls --libvirt-secret 3f8f9a5e-6d7c-4e11-9a9b-2f1c0d7e8a41 nova/inst1/disk /",
        6,
        &[
            "3f8f9a5e-6d7c-4e11-9a9b-2f1c0d7e8a41.base64",
            "not in libvirt's secret store",
        ],
    ),
    // 7: damaged.
    case(
        "mount --passphrase-file key corrupt.qcow2 mnt-empty",
        7,
        &["corrupt.qcow2", "marked corrupt", "qcowfs check -r all"],
    ),
    case("info short.qcow2", 7, &["short.qcow2", "too short"]),
    case("info bits.qcow2", 7, &["bits.qcow2", "cluster_bits"]),
    case("ls l1.qcow2 /", 7, &["l1.qcow2", "beyond the end"]),
    case("ls --passphrase-file key broken.qcow2 /", 7, &["ext2/3/4"]),
    // 1: anything else.
    case("info v4.qcow2", 1, &["v4.qcow2", "version 4"]),
    case("info future.qcow2", 1, &["future.qcow2", "newer QEMU"]),
    case(
        "info notes.txt",
        1,
        &["notes.txt", "not a qcow2 image", "mount -o loop"],
    ),
    case(
        "mount raw.img mnt-empty",
        1,
        &["raw.img", "raw disk needs no qcowfs"],
    ),
    case("ls plain.qcow2 /", 1, &["no file system qcowfs reads"]),
    case(
        "copy-out --passphrase-file key nova/inst1/disk /etc/fstab dest",
        1,
        &["exists"],
    ),
    case(
        "info --backing-within files nova/inst1/disk",
        1,
        &["outside every --backing-within folder"],
    ),
];

/// Run one case in `dir`: its message line, or what is wrong with it.
fn run_case(dir: &Path, c: &Case) -> Result<String, String> {
    let args: Vec<&str> = c.args.split(' ').collect();
    let secrets = dir.join("secrets");
    let r = run_with(
        Command::new(qcowfs_bin())
            .args(&args)
            .current_dir(dir)
            .env("RUST_BACKTRACE", "0")
            .env("QCOWFS_LIBVIRT_SECRETS_DIR", &secrets),
        None,
        Duration::from_secs(120),
    );
    // check-key reports its verdicts on stdout, one line per layer, and nothing on stderr.
    let text = match r.stderr.trim_end() {
        "" => r.stdout_str().trim_end().to_string(),
        text => text.to_string(),
    };
    let first = text.lines().next().unwrap_or_default().to_string();
    let wrong = |why: String| Err(format!("qcowfs {}: {why}\n{text}", c.args));
    if r.status.code() != Some(c.status) {
        return wrong(format!(
            "exit status {:?}, not {}",
            r.status.code(),
            c.status
        ));
    }
    if text.contains("panicked") {
        return wrong("panicked".into());
    }
    // clap's usage errors are several lines (the usage and a tip); ours are one.
    if !first.starts_with("error:") && (text.lines().count() != 1 || text.contains("os error")) {
        return wrong("not one line without Rust's internals".into());
    }
    if let Some(word) = c.says.iter().find(|w| !text.contains(*w)) {
        return wrong(format!("the message does not say {word:?}"));
    }
    Ok(first)
}

#[test]
fn every_exit_status_of_the_table_for_bad_inputs_an_operator_meets() {
    let dir = workdir();
    tree(dir.path());
    let mut table = Vec::new();
    let mut failures = Vec::new();
    for c in CASES {
        match run_case(dir.path(), c) {
            Ok(line) => table.push(format!(
                "| `qcowfs {}` | {} | {} |",
                c.args,
                c.status,
                line.replace('|', "\\|")
            )),
            Err(why) => failures.push(why),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    let statuses: std::collections::BTreeSet<i32> = CASES.iter().map(|c| c.status).collect();
    for code in [1, 2, 3, 4, 6, 7] {
        assert!(statuses.contains(&code), "no case for exit status {code}");
    }
    assert!(CASES.len() >= 60, "the table has {} cases", CASES.len());
    if std::env::var_os("QCOWFS_PRINT_TABLE").is_some() {
        println!("| command | status | message |\n|---|---|---|");
        for row in table {
            println!("{row}");
        }
    }
}

#[test]
fn a_tar_stream_into_a_full_disk_is_a_host_io_error() {
    let dir = workdir();
    tree(dir.path());
    let out = Command::new(qcowfs_bin())
        .args([
            "copy-out",
            "--passphrase-file",
            "key",
            "nova/inst1/disk",
            "/etc",
            "-",
        ])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(fs::File::create("/dev/full").expect("/dev/full"))
        .stderr(Stdio::piped())
        .output()
        .expect("run qcowfs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(8), "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
}

#[test]
fn an_image_held_by_another_process_is_in_use() {
    let dir = workdir();
    tree(dir.path());
    // QEMU's locks are byte-range locks at 100 and 200 of the image; hold them all, as a VM's
    // writer holds its own.
    let mut holder = Command::new("python3")
        .args([
            "-c",
            "import fcntl,sys; f=open(sys.argv[1],'r+'); \
             fcntl.lockf(f, fcntl.LOCK_EX, 300, 0); print('held', flush=True); sys.stdin.read()",
        ])
        .arg(dir.path().join("plain.qcow2"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.as_mut().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "held");
    for c in [
        case("ls plain.qcow2 /", 5, &["plain.qcow2", "in use"]),
        case("seal plain.qcow2", 5, &["plain.qcow2", "in use"]),
    ] {
        if let Err(why) = run_case(dir.path(), &c) {
            panic!("{why}");
        }
    }
    drop(holder.stdin.take());
    holder.wait().unwrap();
}
