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

// --- keys out of core dumps ------------------------------------------------------------------

/// Where `needle` occurs in `hay` (the first offset), if anywhere.
fn find_bytes(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The LUKS master key of a LUKS-encrypted qcow2, as cryptsetup reads it from the header clusters
/// the full-disk-encryption extension names.
fn luks_master_key(image: &Path, passphrase_file: &Path, dir: &Path) -> Vec<u8> {
    let bytes = fs::read(image).expect("read image");
    let be32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let be64 = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let mut at = be32(100) as usize; // header_length: extensions follow
    let (offset, len) = loop {
        let (kind, n) = (be32(at), be32(at + 4) as usize);
        assert_ne!(kind, 0, "no full-disk-encryption header extension");
        if kind == 0x0537_be77 {
            break (be64(at + 8) as usize, be64(at + 16) as usize);
        }
        at += 8 + n.div_ceil(8) * 8;
    };
    let header = dir.join("luks-header");
    fs::write(&header, &bytes[offset..offset + len]).expect("write header");
    let r = run_ok(
        "cryptsetup",
        [
            "luksDump".as_ref(),
            "--dump-volume-key".as_ref(),
            "--batch-mode".as_ref(),
            "--key-file".as_ref(),
            passphrase_file.as_os_str(),
            header.as_os_str(),
        ],
    );
    let text = r.stdout_str();
    let dump = &text[text.find("MK dump:").expect("MK dump in luksDump") + 8..];
    let key: Vec<u8> = dump
        .split_whitespace()
        .map_while(|w| u8::from_str_radix(w, 16).ok().filter(|_| w.len() == 2))
        .collect();
    assert!(key.len() >= 32, "master key from luksDump: {text}");
    key
}

/// `gcore` of `pid` into `dir`, as bytes: what a debugger (or root) dumps of the live daemon.
fn gcore(pid: u32, dir: &Path) -> Vec<u8> {
    let prefix = dir.join("gcore");
    run_ok(
        "gcore",
        ["-o".as_ref(), prefix.as_os_str(), pid.to_string().as_ref()],
    );
    let path = PathBuf::from(format!("{}.{pid}", prefix.display()));
    let bytes = fs::read(&path).expect("read gcore output");
    fs::remove_file(&path).expect("remove core");
    assert!(
        bytes.len() > 1 << 20,
        "gcore wrote only {} bytes",
        bytes.len()
    );
    bytes
}

fn cores_in(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .expect("read_dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("core"))
        .collect()
}

/// Abort `pid` with core dumps allowed; it must leave no core file in `cwd` (its working folder).
fn abort_leaves_no_core(pid: u32, cwd: &Path) {
    run_ok(
        "prlimit",
        [
            "--pid".as_ref(),
            pid.to_string().as_ref(),
            "--core=unlimited".as_ref(),
        ] as [&std::ffi::OsStr; 3],
    );
    // SAFETY: kill(2) of the daemon this test started.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGABRT) }, 0);
    let start = std::time::Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "daemon survived SIGABRT"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        cores_in(cwd),
        Vec::<String>::new(),
        "the aborted daemon dumped core"
    );
}

#[test]
fn keys_and_passphrases_are_in_no_core_dump_and_not_in_what_gcore_writes() {
    let dir = workdir();
    let cwd = dir.path().join("cwd");
    fs::create_dir(&cwd).expect("cwd");
    // The control: on this host an ordinary process that aborts does leave a core in its folder,
    // so a missing core below is qcowfs's doing.
    let r = run_with(
        std::process::Command::new("sh")
            .arg("-c")
            .arg("ulimit -c unlimited; kill -ABRT $$")
            .current_dir(&cwd),
        None,
        COMMAND_TIMEOUT,
    );
    assert!(!r.status.success());
    let control = cores_in(&cwd);
    assert!(
        !control.is_empty(),
        "this host writes no core files into the process's folder (see /proc/sys/kernel/core_pattern), \
         so the test cannot show that qcowfs leaves none"
    );
    for c in control {
        fs::remove_file(cwd.join(c)).expect("remove control core");
    }

    // Legacy AES: the key is the passphrase's first 16 bytes.
    let aes_pass = "Qk7#vX2!pL9@mZ4$";
    let aes = qcow2(dir.path().join("aes.qcow2"), 16 * MIB)
        .aes(aes_pass)
        .create();
    aes.write_pattern(0, MIB, 0x61);
    let aes_key_file = passphrase_file(dir.path(), "aes.key", aes_pass);
    // LUKS: the passphrase and the master key.
    let luks_pass = "luks-Passphrase-7a1c-9e2f";
    let luks_key_file = passphrase_file(dir.path(), "luks.key", luks_pass);
    let luks_raw_key = dir.path().join("luks.raw-key");
    fs::write(&luks_raw_key, luks_pass).expect("raw key file");
    let luks = dir.path().join("luks.qcow2");
    run_ok(
        "qemu-img",
        [
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            &format!("secret,id=s0,data={luks_pass}"),
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
            luks.to_str().expect("UTF-8"),
            "16M",
        ],
    );
    let master = luks_master_key(&luks, &luks_raw_key, dir.path());

    for (image, key_file, secrets) in [
        (
            aes.path.clone(),
            aes_key_file,
            vec![aes_pass.as_bytes().to_vec()],
        ),
        (
            luks.clone(),
            luks_key_file,
            std::iter::once(luks_pass.as_bytes().to_vec())
                .chain(master.chunks(16).map(<[u8]>::to_vec))
                .collect(),
        ),
    ] {
        let m = Mount::try_new(
            &image,
            &["--passphrase-file".as_ref(), key_file.as_os_str()],
            None,
            &cwd,
        )
        .unwrap_or_else(|r| panic!("mount {}: {}", image.display(), r.stderr));
        // Use the cipher both ways.
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(m.disk())
            .expect("open disk");
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[0x5a; 65536], 2 * MIB).expect("write");
        f.sync_all().expect("fsync");
        let mut buf = vec![0u8; 65536];
        f.read_exact_at(&mut buf, 0).expect("read");
        drop(f);
        let pid = m.daemon_pid().expect("daemon pid");
        let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let core = gcore(pid, dir.path());
        for secret in &secrets {
            assert_eq!(
                find_bytes(&core, secret),
                None,
                "{}: {} secret bytes found in the daemon's memory dump",
                image.display(),
                secret.len()
            );
        }
        assert!(
            status
                .lines()
                .any(|l| l.starts_with("VmLck:") && !l.contains(" 0 kB")),
            "the daemon locks its key memory:\n{status}"
        );
        abort_leaves_no_core(pid, &cwd);
        drop(m);
    }
}
