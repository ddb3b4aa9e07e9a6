//! The host is hostile too (issue 14): runtime records another user plants, keys in core dumps,
//! LUKS headers that demand endless key derivation, passphrase files others can read, legacy AES
//! passphrases nothing can verify, and backing files that point anywhere. Two real non-root users
//! play victim and attacker where it matters. And non-root mounts themselves (issue 17): refused
//! in one line naming `/dev/fuse` when the user cannot open it, a full read/write round trip of an
//! AES image when the user can.

use crate::common;

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
    // Named by the mount's device and the daemon's pid (src/mount/registry.rs): the one record.
    let records: Vec<PathBuf> = fs::read_dir(&runtime)
        .expect("runtime folder")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "pid"))
        .collect();
    assert_eq!(records.len(), 1, "one pid record: {records:?}");
    let pid_file = records[0].clone();
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

// --- non-root mounts and /dev/fuse -----------------------------------------------------------

/// A mount `user` made: unmounted as that user on drop if a test fails midway, by force (as
/// root) when that does not work. Never panics.
struct UserMount<'a> {
    user: &'a User,
    mountpoint: PathBuf,
}

impl Drop for UserMount<'_> {
    fn drop(&mut self) {
        if !is_mounted(&self.mountpoint) {
            return;
        }
        let _ = self.user.run(
            &qcowfs_bin(),
            ["umount".as_ref(), self.mountpoint.as_os_str()],
        );
        if is_mounted(&self.mountpoint) {
            let _ = run("umount", ["-l".as_ref(), self.mountpoint.as_os_str()]);
        }
    }
}

#[test]
fn a_non_root_mount_without_access_to_dev_fuse_fails_in_one_line_naming_it() {
    let user = test_user("qcowfs-victim");
    let _fuse = FuseRootOnly::new();
    let (_dir, image, mnt) = victim_workspace(&user);
    let r = user.run(
        &qcowfs_bin(),
        ["mount".as_ref(), image.as_os_str(), mnt.as_os_str()],
    );
    let _cleanup = UserMount {
        user: &user,
        mountpoint: mnt.clone(),
    };
    assert_one_line_error(&r, &["/dev/fuse"], Duration::from_secs(10));
    assert_eq!(r.status.code(), Some(6), "not permitted: {}", r.stderr);
    assert!(
        r.stderr.contains("ermission denied") && r.stderr.contains("0666"),
        "the line gives the OS error and the fix: {}",
        r.stderr
    );
    assert!(!is_mounted(&mnt), "mounted all the same");
}

/// Non-root mounts work once `/dev/fuse` is open to the user (mode 0666, fusermount3
/// installed): an AES image and a passphrase file of the user's own, read and written through
/// the mount, unmounted by the user; qemu (as root, afterwards) agrees on every byte. (The
/// runtime-record test above mounts as a user too, a plain image, neither reading nor writing.)
#[test]
fn a_non_root_user_mounts_an_aes_image_of_their_own_reads_writes_and_unmounts_it() {
    const PASS: &str = "non-root secret";
    let user = test_user("qcowfs-victim");
    let _fuse = FuseForAll::new();
    let dir = tempfile::Builder::new()
        .prefix("qcowfs-user-")
        .tempdir()
        .expect("tempdir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let img = qcow2(dir.path().join("disk.qcow2"), 16 * MIB)
        .aes(PASS)
        .create();
    img.write_random(0, MIB as usize, 1);
    img.write_random(5 * MIB + 4096, 300 * KIB as usize, 2);
    let mut expected = img.raw();
    let key = passphrase_file(dir.path(), "key", PASS);
    let (off, len) = (3 * MIB + 8 * KIB, 192 * KIB);
    let pattern = img.test_data(len as usize, 3);
    let pattern_file = dir.path().join("pattern");
    fs::write(&pattern_file, &pattern).expect("write pattern");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).expect("mountpoint");
    user.own(dir.path());
    let meta = fs::metadata(&key).expect("passphrase file");
    assert_eq!((meta.uid(), meta.mode() & 0o777), (user.uid, 0o600));

    let bin = qcowfs_bin();
    let r = user.run(
        &bin,
        [
            "mount".as_ref(),
            "--passphrase-file".as_ref(),
            key.as_os_str(),
            img.path.as_os_str(),
            mnt.as_os_str(),
        ],
    );
    let mounted = UserMount {
        user: &user,
        mountpoint: mnt.clone(),
    };
    r.assert_success();
    assert!(!r.stderr.contains("warning"), "no warning: {}", r.stderr);
    let disk = mnt.join("disk");
    // Without --allow-other only the user may look inside the mount, not even root.
    let stat = user.run(
        Path::new("/usr/bin/stat"),
        ["-c".as_ref(), "%u %a %s".as_ref(), disk.as_os_str()],
    );
    stat.assert_success();
    assert_eq!(
        stat.stdout_str().trim(),
        format!("{} 600 {}", user.uid, 16 * MIB),
        "the disk file belongs to the user, mode 0600, the virtual size"
    );
    let read = user.run(Path::new("/usr/bin/cat"), [disk.as_os_str()]);
    read.assert_success();
    assert_same_bytes(&read.stdout, &expected, "the disk read by the user");
    let of = format!("of={}", disk.display());
    let write = user.run(
        Path::new("/usr/bin/dd"),
        [
            format!("if={}", pattern_file.display()),
            of,
            "bs=4096".into(),
            format!("seek={}", off / 4096),
            "conv=notrunc,fsync".into(),
            "status=none".into(),
        ],
    );
    write.assert_success();
    let r = user.run(&bin, ["umount".as_ref(), mnt.as_os_str()]);
    r.assert_success();
    assert!(!is_mounted(&mnt), "still mounted after the user's umount");
    drop(mounted);

    expected[off as usize..(off + len) as usize].copy_from_slice(&pattern);
    let expected_raw = dir.path().join("expected.raw");
    fs::write(&expected_raw, &expected).expect("write expected raw");
    let r = qemu_compare_with_raw(&img, &expected_raw);
    assert!(
        r.status.success(),
        "qemu-img compare after the user's write: {}\n{}{}",
        describe_status(r.status),
        r.stdout_str(),
        r.stderr
    );
    assert_check_clean(&img);
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
    let luks = qcow2(dir.path().join("luks.qcow2"), 16 * MIB)
        .luks(luks_pass)
        .create()
        .path;
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

// --- bounded LUKS unlock, passphrase files, unverifiable AES, confined backing files -----------

#[test]
fn a_luks_header_demanding_endless_key_derivation_is_refused_at_once() {
    let dir = workdir();
    let pass = "hostile";
    let img = qcow2(dir.path().join("luks.qcow2"), 4 * MIB)
        .luks(pass)
        .create()
        .path;
    // The LUKS header sits where the full-disk-encryption extension says (after the header
    // cluster for a fresh image: find it by its magic).
    let bytes = fs::read(&img).expect("read");
    let at = find_bytes(&bytes, b"LUKS\xba\xbe").expect("LUKS magic") as u64;
    // Eight active slots, each a copy of slot 0 with 20 M iterations, and a 20 M digest.
    let slot0 = bytes[at as usize + 208..at as usize + 256].to_vec();
    for i in 0..8u64 {
        let mut slot = slot0.clone();
        slot[4..8].copy_from_slice(&20_000_000u32.to_be_bytes());
        patch_bytes(&img, at + 208 + i * 48, &slot);
    }
    patch_bytes(&img, at + 164, &20_000_000u32.to_be_bytes());
    let key = passphrase_file(dir.path(), "key", "wrong passphrase");

    let r = mount_failure(&img, &["--passphrase-file".as_ref(), key.as_os_str()], None);
    assert_one_line_error(&r, &["luks.qcow2"], Duration::from_secs(3));
    assert!(
        r.stderr.contains("PBKDF2") && r.stderr.contains("8 key slot"),
        "says what was refused: {}",
        r.stderr
    );
}

#[test]
fn a_passphrase_file_others_can_read_is_used_with_a_warning_naming_it_and_its_mode() {
    let dir = workdir();
    let img = qcow2(dir.path().join("aes.qcow2"), 4 * MIB)
        .aes("secret")
        .create();
    img.write_pattern(0, 64 * KIB, 0x11);
    let key = passphrase_file(dir.path(), "loose.key", "secret");
    fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");

    let r = qcowfs([
        "info".as_ref(),
        "--passphrase-file".as_ref(),
        key.as_os_str(),
        img.path.as_os_str(),
    ]);
    r.assert_success();
    assert!(
        r.stderr.contains("loose.key") && r.stderr.contains("0644"),
        "info warns: {}",
        r.stderr
    );
    let m = Mount::try_new(
        &img.path,
        &["--passphrase-file".as_ref(), key.as_os_str()],
        None,
        Path::new("/"),
    )
    .unwrap_or_else(|r| panic!("mount: {}", r.stderr));
    m.umount();
    // Mode 0600: silence.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod");
    let r = qcowfs([
        "info".as_ref(),
        "--passphrase-file".as_ref(),
        key.as_os_str(),
        img.path.as_os_str(),
    ]);
    assert!(!r.stderr.contains("warning"), "{}", r.stderr);
}

#[test]
fn a_legacy_aes_image_without_data_is_mounted_for_writing_only_with_unverified_key() {
    let dir = workdir();
    let img = qcow2(dir.path().join("empty.qcow2"), 4 * MIB)
        .aes("right")
        .create();
    let key = passphrase_file(dir.path(), "key", "maybe wrong");
    let before = fs::read(&img.path).expect("read image");
    // Nothing to check the key against, and writing would encrypt with it: refused (status 4).
    let r = mount_failure(
        &img.path,
        &["--passphrase-file".as_ref(), key.as_os_str()],
        None,
    );
    assert_eq!(r.status.code(), Some(4), "{}", r.stderr);
    assert_one_line_error(&r, &["empty.qcow2"], Duration::from_secs(60));
    assert!(r.stderr.contains("--unverified-key"), "{}", r.stderr);
    assert_eq!(fs::read(&img.path).expect("read image"), before);
    // Read-only reads nothing with it: mounted without a word about the key.
    let ro = mount_warnings(&img.path, &key, &["--read-only"]);
    assert!(!ro.contains("cannot be verified"), "{ro}");
    // Said explicitly, it mounts, and one line says the key could not be checked.
    let again = mount_warnings(&img.path, &key, &["--unverified-key"]);
    let lines: Vec<&str> = again
        .lines()
        .filter(|l| l.contains("cannot be verified"))
        .collect();
    assert_eq!(lines.len(), 1, "one line says so: {again}");
    assert!(lines[0].contains("empty.qcow2"), "{}", lines[0]);
}

/// The stderr of a successful `qcowfs mount` (then unmounted).
fn mount_warnings(image: &Path, key: &Path, extra: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path().join("mnt");
    fs::create_dir(&mnt).expect("mnt");
    let mut args: Vec<&std::ffi::OsStr> = vec!["mount".as_ref()];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    args.extend([
        "--passphrase-file".as_ref(),
        key.as_os_str(),
        image.as_os_str(),
        mnt.as_os_str(),
    ]);
    let r = qcowfs(args);
    r.assert_success();
    qcowfs(["umount".as_ref(), mnt.as_os_str()]).assert_success();
    r.stderr
}

#[test]
fn backing_within_refuses_a_backing_file_outside_its_folders_symlinks_followed() {
    let dir = workdir();
    let instances = dir.path().join("instances");
    let uuid = instances.join("uuid-1");
    let base_dir = instances.join("_base");
    let outside = dir.path().join("elsewhere");
    for d in [&uuid, &base_dir, &outside] {
        fs::create_dir_all(d).expect("mkdir");
    }
    let secret = create_raw(outside.join("shadow.raw"), 4 * MIB);
    secret.write_pattern(0, 4096, 0x73);
    let good_base = create_raw(base_dir.join("base.raw"), 4 * MIB);
    // A nova-style disk over _base: fine. One over ../../elsewhere: refused. One over a symlink in
    // _base that points elsewhere: refused too.
    let good = qcow2(uuid.join("disk"), 4 * MIB)
        .backing_named(&good_base, "../_base/base.raw")
        .create();
    let bad = qcow2(uuid.join("bad"), 4 * MIB)
        .backing_named(&secret, "../../elsewhere/shadow.raw")
        .create();
    std::os::unix::fs::symlink(&secret.path, base_dir.join("link.raw")).expect("symlink");
    let sneaky = qcow2(uuid.join("sneaky"), 4 * MIB)
        .backing_named(&secret, "../_base/link.raw")
        .create();
    let within = ["--backing-within".as_ref(), instances.as_os_str()];

    let m = Mount::new(&good.path, &within);
    m.umount();
    for img in [&bad, &sneaky] {
        let r = mount_failure(&img.path, &within, None);
        assert_one_line_error(&r, &["shadow.raw", "link.raw"], Duration::from_secs(5));
        assert!(
            r.stderr.contains("outside every --backing-within"),
            "{}",
            r.stderr
        );
        let mut args: Vec<&std::ffi::OsStr> = vec!["info".as_ref()];
        args.extend(within);
        args.push(img.path.as_os_str());
        assert_one_line_error(
            &qcowfs(args),
            &["shadow.raw", "link.raw"],
            Duration::from_secs(5),
        );
    }
    // Without the option, info opens it as QEMU would, and marks it.
    let info = qcowfs_info_json(&bad.path, &[]);
    assert_eq!(info["layers"][1]["outside_image_tree"], true, "{info}");
    let info = qcowfs_info_json(&good.path, &[]);
    assert_eq!(info["layers"][1]["outside_image_tree"], false, "{info}");
    let text = qcowfs(["info".as_ref(), bad.path.as_os_str()]);
    assert!(
        text.stdout_str().contains("outside the image's tree"),
        "{}",
        text.stdout_str()
    );
}

#[test]
fn escape_sequences_in_a_backing_file_name_are_printed_escaped() {
    let dir = workdir();
    let base = create_raw(dir.path().join("base.raw"), 4 * MIB);
    let name = "evil\x1b[2J\x1b]0;owned\x07.raw";
    fs::copy(&base.path, dir.path().join(name)).expect("copy");
    let top = qcow2(dir.path().join("top.qcow2"), 4 * MIB)
        .backing_named(&base, name)
        .create();
    let r = qcowfs(["info".as_ref(), top.path.as_os_str()]);
    r.assert_success();
    let out = r.stdout_str();
    assert!(
        !out.contains('\x1b') && !out.contains('\x07'),
        "raw escape bytes printed: {out:?}"
    );
    assert!(out.contains("evil\\x1b[2J"), "{out}");
    fs::remove_file(dir.path().join(name)).expect("rm");
    let r = qcowfs(["info".as_ref(), top.path.as_os_str()]);
    assert!(
        !r.stderr.contains('\x1b'),
        "error text carries the escape: {:?}",
        r.stderr
    );
    assert!(r.stderr.contains("evil\\x1b"), "{}", r.stderr);
}
