//! qcowfs next to the host's own tools: libvirt's secrets (base64 key files, the secret store),
//! mount(8) and /etc/fstab through the `mount.fuse.qcowfs` helper, sparse-aware readers
//! (SEEK_DATA/SEEK_HOLE against `qemu-img map`), `fstrim` in a loop-mounted guest, signals to the
//! daemon, `--log-file`, and the generated manual pages, completions and installer.
//!
//! Every external command is bounded by a timeout; FUSE tests fail loudly without /dev/fuse; QEMU
//! is the oracle. Each test prints the commands it ran (shown on failure: the steps to reproduce).

use crate::common;

use common::*;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{mpsc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

const PASS: &str = "libvirt made this secret";
/// A libvirt secret UUID, as `virsh secret-list` shows it.
const UUID: &str = "3f8f9a5e-6d7c-4e11-9a9b-2f1c0d7e8a41";
/// The environment variable that moves libvirt's secret store (for tests).
const SECRETS_ENV: &str = "QCOWFS_LIBVIRT_SECRETS_DIR";
/// How long the daemon may take to flush and exit after a signal.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

// --- helpers ---------------------------------------------------------------------------------

/// `qcowfs ARGS` with extra environment variables, from `/`, bounded; status not checked.
fn qcowfs_env(args: &[&OsStr], env: &[(&str, &OsStr)]) -> Run {
    let mut cmd = Command::new(qcowfs_bin());
    cmd.args(args).current_dir("/").env("RUST_BACKTRACE", "0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_with(&mut cmd, None, COMMAND_TIMEOUT)
}

/// base64 of `secret` as `virsh secret-get-value` prints it, then broken into short lines with
/// stray blanks, which qcowfs must ignore.
fn base64_file(dir: &Path, name: &str, secret: &str) -> PathBuf {
    use base64::Engine;
    let text = base64::engine::general_purpose::STANDARD.encode(secret);
    let mut wrapped = String::new();
    for (i, c) in text.chars().enumerate() {
        if i > 0 && i % 8 == 0 {
            wrapped.push_str(if i % 16 == 0 { "\n" } else { " \t" });
        }
        wrapped.push(c);
    }
    wrapped.push('\n');
    let path = dir.join(name);
    fs::write(&path, wrapped).expect("write base64 key file");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod key file");
    path
}

/// An AES image of `size` with guest-like data at a few places, and the bytes qemu reads from it.
fn aes_image(dir: &Path, name: &str, size: u64) -> (Image, Vec<u8>) {
    let img = qcow2(dir.join(name), size).aes(PASS).create();
    img.write_random(0, (size / 4) as usize, 11);
    img.write_random(size / 2 + 12_345, 300_000, 12);
    img.write_random(size - 70_000, 70_000, 13);
    let raw = raw_of(&img);
    (img, raw)
}

/// A mount made some other way than `qcowfs mount` (mount(8), the helper, an environment the
/// harness cannot pass). Dropping it unmounts with `qcowfs umount`, then lazily, whatever happened.
struct HostMount {
    mountpoint: PathBuf,
    _dir: tempfile::TempDir,
}

impl HostMount {
    /// A fresh empty mount point; nothing mounted yet.
    fn prepare() -> HostMount {
        require_fuse();
        let dir = tempfile::Builder::new()
            .prefix("qcowfs-host-")
            .tempdir()
            .expect("temp folder");
        let mountpoint = dir.path().join("mnt");
        fs::create_dir(&mountpoint).expect("mkdir mount point");
        HostMount {
            mountpoint,
            _dir: dir,
        }
    }

    fn path(&self) -> &Path {
        &self.mountpoint
    }

    fn disk(&self) -> PathBuf {
        self.mountpoint.join("disk")
    }

    /// Asserts that `r` succeeded and left the mount point mounted.
    fn assert_mounted_by(&self, r: &Run) {
        r.assert_success();
        assert!(
            is_mounted(&self.mountpoint),
            "{} exited 0 but nothing is mounted at {}\n{}",
            r.command,
            self.mountpoint.display(),
            r.stderr
        );
    }

    /// `qcowfs umount`, which must succeed.
    fn umount(&self) {
        qcowfs(["umount".as_ref(), self.mountpoint.as_os_str()]).assert_success();
        assert!(!is_mounted(&self.mountpoint), "still mounted after umount");
    }
}

impl Drop for HostMount {
    fn drop(&mut self) {
        if !is_mounted(&self.mountpoint) {
            return;
        }
        let bounded = Duration::from_secs(30);
        let _ = run_with(
            Command::new(qcowfs_bin())
                .arg("umount")
                .arg(&self.mountpoint)
                .current_dir("/"),
            None,
            bounded,
        );
        for cmd in [["fusermount3", "-uz"], ["umount", "-l"]] {
            if is_mounted(&self.mountpoint) {
                let _ = run_with(
                    Command::new(cmd[0]).arg(cmd[1]).arg(&self.mountpoint),
                    None,
                    bounded,
                );
            }
        }
    }
}

/// `qemu-img info`'s actual-size: the bytes the image file really occupies on the host.
fn actual_size(image: &Image) -> u64 {
    image.qemu_info()["actual-size"]
        .as_u64()
        .expect("qemu-img info has actual-size")
}

/// The daemon pid recorded for `mountpoint` in /run/qcowfs/*.pid (first line pid, second line the
/// canonical mount point).
fn recorded_daemon_pid(mountpoint: &Path) -> Option<u32> {
    let canon = fs::canonicalize(mountpoint).ok()?;
    fs::read_dir("/run/qcowfs").ok()?.flatten().find_map(|e| {
        let path = e.path();
        if path.extension()? != "pid" {
            return None;
        }
        let text = fs::read_to_string(&path).ok()?;
        let mut lines = text.lines();
        let pid = lines.next()?.trim().parse().ok()?;
        (Path::new(lines.next()?) == canon).then_some(pid)
    })
}

/// Waits until `pid` has exited and `mountpoint` is no longer mounted; fails the test otherwise,
/// showing the daemon's `log` when there is one.
fn wait_for_daemon_exit(pid: u32, mountpoint: &Path, what: &str, log: Option<&Path>) {
    let start = Instant::now();
    while !process_gone(pid) || is_mounted(mountpoint) {
        if start.elapsed() > EXIT_TIMEOUT {
            panic!(
                "{what}: after {EXIT_TIMEOUT:?} the daemon (pid {pid}) is {} and {} is {}\n\
                 --- daemon log ---\n{}",
                if process_gone(pid) { "gone" } else { "alive" },
                mountpoint.display(),
                if is_mounted(mountpoint) {
                    "still mounted"
                } else {
                    "unmounted"
                },
                log.and_then(|l| fs::read_to_string(l).ok())
                    .unwrap_or_else(|| "(none)".into())
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// --- libvirt secrets -------------------------------------------------------------------------

#[test]
fn a_base64_passphrase_file_mounts_an_aes_image_that_reads_as_qemu_reads_it() {
    let dir = workdir();
    let (img, expected) = aes_image(dir.path(), "aes.qcow2", 8 * MIB);
    let key = base64_file(dir.path(), "secret.b64", PASS);
    let mount = Mount::new(
        &img.path,
        &[
            "--read-only".as_ref(),
            "--passphrase-base64-file".as_ref(),
            key.as_os_str(),
        ],
    );
    let got = read_all_bounded(&mount.disk());
    assert_same_bytes(&got, &expected, "disk mounted with a base64 key file");
    mount.umount();
}

#[test]
fn a_base64_passphrase_on_stdin_mounts_read_write_and_qemu_reads_the_writes() {
    let dir = workdir();
    let (img, mut expected) = aes_image(dir.path(), "aes.qcow2", 8 * MIB);
    use base64::Engine;
    let stdin = format!(
        "{}\n",
        base64::engine::general_purpose::STANDARD.encode(PASS)
    );
    let mount = Mount::with_stdin(
        &img.path,
        &["--passphrase-base64-file", "-"],
        Some(stdin.as_bytes()),
    );
    let data = img.test_data(200_000, 21);
    let off = 3 * MIB + 777;
    {
        let f = OpenOptions::new()
            .write(true)
            .open(mount.disk())
            .expect("open disk for writing");
        f.write_all_at(&data, off).expect("write through the mount");
        f.sync_all().expect("fsync disk");
    }
    expected[off as usize..off as usize + data.len()].copy_from_slice(&data);
    mount.umount();
    assert_check_clean(&img);
    assert_same_bytes(
        &raw_of(&img),
        &expected,
        "qemu's view after base64-keyed writes",
    );
}

#[test]
fn a_libvirt_secret_is_read_from_the_secret_store() {
    let dir = workdir();
    let (img, expected) = aes_image(dir.path(), "aes.qcow2", 4 * MIB);
    let store = dir.path().join("secrets");
    fs::create_dir(&store).expect("mkdir secret store");
    // libvirt writes the file without a newline.
    use base64::Engine;
    fs::write(
        store.join(format!("{UUID}.base64")),
        base64::engine::general_purpose::STANDARD.encode(PASS),
    )
    .expect("write secret");
    let mount = HostMount::prepare();
    // Upper case and no dashes: libvirt accepts both spellings of a UUID.
    let spelled = UUID.replace('-', "").to_uppercase();
    let r = qcowfs_env(
        &[
            "mount".as_ref(),
            "--read-only".as_ref(),
            "--libvirt-secret".as_ref(),
            spelled.as_ref(),
            img.path.as_os_str(),
            mount.path().as_os_str(),
        ],
        &[(SECRETS_ENV, store.as_os_str())],
    );
    mount.assert_mounted_by(&r);
    let got = read_all_bounded(&mount.disk());
    assert_same_bytes(&got, &expected, "disk mounted with a libvirt secret");
    mount.umount();
}

#[test]
fn a_missing_libvirt_secret_is_a_one_line_error_naming_the_file() {
    let dir = workdir();
    let (img, _) = aes_image(dir.path(), "aes.qcow2", MIB);
    let store = dir.path().join("empty-store");
    fs::create_dir(&store).expect("mkdir secret store");
    let secret_file = store.join(format!("{UUID}.base64"));
    let mount = HostMount::prepare();
    let env = [(SECRETS_ENV, store.as_os_str())];
    let r = qcowfs_env(
        &[
            "mount".as_ref(),
            "--libvirt-secret".as_ref(),
            UUID.as_ref(),
            img.path.as_os_str(),
            mount.path().as_os_str(),
        ],
        &env,
    );
    assert_one_line_error(
        &r,
        &[secret_file.to_str().unwrap()],
        Duration::from_secs(10),
    );
    assert_eq!(r.status.code(), Some(6), "missing secret: {}", r.stderr);
    assert!(!is_mounted(mount.path()), "mounted without a key");
    let r = qcowfs_env(
        &[
            "info".as_ref(),
            "--libvirt-secret".as_ref(),
            UUID.as_ref(),
            img.path.as_os_str(),
        ],
        &env,
    );
    assert_one_line_error(
        &r,
        &[secret_file.to_str().unwrap()],
        Duration::from_secs(10),
    );
}

#[test]
fn a_libvirt_secret_that_is_not_a_uuid_is_a_usage_error() {
    let r = qcowfs([
        "mount",
        "--libvirt-secret",
        "../../etc/shadow",
        "/nonexistent.qcow2",
        "/nonexistent",
    ]);
    assert_eq!(r.status.code(), Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("UUID"), "{}", r.stderr);
}

#[test]
fn passphrase_sources_are_mutually_exclusive() {
    for (a, b) in [
        ("--passphrase-file", "--passphrase-base64-file"),
        ("--passphrase-base64-file", "--passphrase-file"),
    ] {
        for cmd in [
            vec!["mount", a, "/k1", b, "/k2", "/i.qcow2", "/m"],
            vec!["info", a, "/k1", b, "/k2", "/i.qcow2"],
        ] {
            let r = qcowfs(&cmd);
            assert_eq!(r.status.code(), Some(2), "{cmd:?}: {}", r.stderr);
            assert!(r.stderr.contains("cannot be used with"), "{}", r.stderr);
        }
    }
    let r = qcowfs([
        "mount",
        "--libvirt-secret",
        UUID,
        "--passphrase-file",
        "/k",
        "/i.qcow2",
        "/m",
    ]);
    assert_eq!(r.status.code(), Some(2), "{}", r.stderr);
}

// --- mount(8) and fstab ------------------------------------------------------------------------

/// A symbolic link named `mount.fuse.qcowfs` to the test binary, in a temp folder.
fn helper_link(dir: &Path) -> PathBuf {
    let link = dir.join("mount.fuse.qcowfs");
    std::os::unix::fs::symlink(qcowfs_bin(), &link).expect("symlink the helper");
    link
}

#[test]
fn the_helper_maps_the_options_mount_passes_to_a_read_only_mount() {
    let dir = workdir();
    let (img, expected) = aes_image(dir.path(), "aes.qcow2", 4 * MIB);
    let key = passphrase_file(dir.path(), "key", PASS);
    let helper = helper_link(dir.path());
    let mount = HostMount::prepare();
    // What util-linux passes for an fstab line "... ro,passphrase_file=KEY,nofail,_netdev,...":
    // source, target, then -o with the generic options mixed in.
    let options = format!(
        "rw,nosuid,nodev,noatime,ro,passphrase_file={},nofail,_netdev,defaults,x-systemd.automount,\
         comment=vm,cache_size=64M",
        key.display()
    );
    let r = run_with(
        Command::new(&helper)
            .arg(&img.path)
            .arg(mount.path())
            .args(["-n", "-o", &options])
            .current_dir("/"),
        None,
        COMMAND_TIMEOUT,
    );
    mount.assert_mounted_by(&r);
    let disk = mount.disk();
    let mode = fs::metadata(&disk).expect("stat disk").mode() & 0o777;
    assert_eq!(mode, 0o400, "ro must give a read-only disk, mode {mode:o}");
    assert!(
        OpenOptions::new().write(true).open(&disk).is_err(),
        "a read-only mount opened for writing"
    );
    assert_same_bytes(
        &read_all_bounded(&disk),
        &expected,
        "disk mounted by the helper",
    );
    mount.umount();
}

#[test]
fn the_helper_refuses_an_unknown_option_in_one_line_and_mounts_nothing() {
    let dir = workdir();
    let (img, _) = aes_image(dir.path(), "aes.qcow2", MIB);
    let key = passphrase_file(dir.path(), "key", PASS);
    let helper = helper_link(dir.path());
    let mount = HostMount::prepare();
    let r = run_with(
        Command::new(&helper)
            .arg(&img.path)
            .arg(mount.path())
            .arg("-o")
            .arg(format!("ro,passphrase_file={},compress=yes", key.display()))
            .env("RUST_BACKTRACE", "0"),
        None,
        COMMAND_TIMEOUT,
    );
    assert_one_line_error(&r, &["compress"], Duration::from_secs(10));
    assert_eq!(r.status.code(), Some(2), "usage errors exit 2");
    assert!(!is_mounted(mount.path()));
    // A flag given a value, and a value option without one, are refused the same way.
    for bad in ["allow_other=yes", "passphrase_file"] {
        let r = run_with(
            Command::new(&helper)
                .arg(&img.path)
                .arg(mount.path())
                .args(["-o", bad]),
            None,
            COMMAND_TIMEOUT,
        );
        let name = bad.split('=').next().unwrap();
        assert_one_line_error(&r, &[name], Duration::from_secs(10));
    }
}

/// Serializes the tests that put `/sbin/mount.fuse.qcowfs` in place.
static SBIN_HELPER: Mutex<()> = Mutex::new(());

/// `/sbin/mount.fuse.qcowfs` → the test binary for the guard's life, where mount(8) looks for
/// helpers (util-linux searches /sbin). An installed helper is moved aside and put back.
struct SbinHelper {
    link: PathBuf,
    backup: Option<PathBuf>,
    _lock: MutexGuard<'static, ()>,
}

impl SbinHelper {
    fn install() -> SbinHelper {
        let lock = SBIN_HELPER.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "mount(8) tests run as root (they put a helper in /sbin)"
        );
        let link = PathBuf::from("/sbin/mount.fuse.qcowfs");
        let backup = if fs::symlink_metadata(&link).is_ok() {
            let aside = PathBuf::from("/sbin/.mount.fuse.qcowfs.test-backup");
            fs::rename(&link, &aside).expect("move the installed helper aside");
            Some(aside)
        } else {
            None
        };
        let guard = SbinHelper {
            link,
            backup,
            _lock: lock,
        };
        std::os::unix::fs::symlink(qcowfs_bin(), &guard.link).expect("symlink /sbin helper");
        eprintln!(
            "$ ln -s {} {}",
            qcowfs_bin().display(),
            guard.link.display()
        );
        guard
    }
}

impl Drop for SbinHelper {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.link);
        if let Some(aside) = &self.backup {
            let _ = fs::rename(aside, &self.link);
        }
    }
}

#[test]
fn mount_t_fuse_qcowfs_with_o_options_mounts_through_the_helper() {
    let dir = workdir();
    let (img, expected) = aes_image(dir.path(), "aes.qcow2", 4 * MIB);
    let key = passphrase_file(dir.path(), "key", PASS);
    let _helper = SbinHelper::install();
    let mount = HostMount::prepare();
    let options = format!("ro,passphrase_file={},allow_other", key.display());
    let r = run_with(
        Command::new("mount")
            .args(["-t", "fuse.qcowfs"])
            .arg(&img.path)
            .arg(mount.path())
            .args(["-o", &options])
            .current_dir("/"),
        None,
        COMMAND_TIMEOUT,
    );
    mount.assert_mounted_by(&r);
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let canon = fs::canonicalize(mount.path()).expect("canonical mount point");
    let line = mountinfo
        .lines()
        .find(|l| l.split(' ').nth(4) == canon.to_str())
        .expect("the mount in mountinfo");
    assert!(
        line.contains("allow_other"),
        "allow_other not applied: {line}"
    );
    assert!(line.split(' ').nth(5).unwrap().starts_with("ro"), "{line}");
    assert_same_bytes(
        &read_all_bounded(&mount.disk()),
        &expected,
        "disk mounted by mount -t fuse.qcowfs",
    );
    mount.umount();
}

#[test]
fn the_documented_fstab_line_mounts_through_the_helper() {
    let dir = workdir();
    let (img, expected) = aes_image(dir.path(), "aes.qcow2", 4 * MIB);
    let key = passphrase_file(dir.path(), "key", PASS);
    let _helper = SbinHelper::install();
    let mount = HostMount::prepare();
    // The README's line, with this test's paths; mount --fstab reads it instead of /etc/fstab.
    let fstab = dir.path().join("fstab");
    fs::write(
        &fstab,
        format!(
            "# qcowfs test\n{} {} fuse.qcowfs ro,passphrase_file={},nofail 0 0\n",
            img.path.display(),
            mount.path().display(),
            key.display()
        ),
    )
    .expect("write fstab");
    let r = run_with(
        Command::new("mount")
            .arg("--fstab")
            .arg(&fstab)
            .arg(mount.path())
            .current_dir("/"),
        None,
        COMMAND_TIMEOUT,
    );
    mount.assert_mounted_by(&r);
    assert_same_bytes(
        &read_all_bounded(&mount.disk()),
        &expected,
        "disk mounted from an fstab line",
    );
    // umount(8), as for any fstab entry, then the daemon finishes and exits on its own.
    let pid = recorded_daemon_pid(mount.path()).expect("daemon recorded in /run/qcowfs");
    run_ok("umount", [mount.path()]);
    wait_for_daemon_exit(pid, mount.path(), "umount(8) of an fstab mount", None);
}

// --- sparse disk -------------------------------------------------------------------------------

/// Data extents of `path` found with lseek SEEK_DATA / SEEK_HOLE, as (start, end) pairs.
fn seek_extents(path: &Path) -> Vec<(u64, u64)> {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut at: libc::off_t = 0;
    loop {
        // SAFETY: plain lseek on a descriptor this function owns.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(
                e.raw_os_error(),
                Some(libc::ENXIO),
                "SEEK_DATA at {at}: {e}"
            );
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        assert!(
            hole > data,
            "SEEK_HOLE from data at {data} gave {hole}: {}",
            std::io::Error::last_os_error()
        );
        extents.push((data as u64, hole as u64));
        at = hole;
    }
    extents
}

/// Data extents according to `qemu-img map --output=json` (whole chain), adjacent ones merged.
/// Zero clusters (allocated or not) and unallocated ranges are holes.
fn qemu_data_extents(image: &Image) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in qemu_map(image) {
        if e["data"] != true {
            continue;
        }
        let start = e["start"].as_u64().expect("map start");
        let end = start + e["length"].as_u64().expect("map length");
        match out.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => out.push((start, end)),
        }
    }
    out
}

#[test]
fn seek_data_and_seek_hole_follow_the_allocation_qemu_img_map_reports() {
    let dir = workdir();
    let size = 32 * MIB;
    let base = qcow2(dir.path().join("base.qcow2"), size).create();
    base.write_random(0, MIB as usize, 31);
    base.write_pattern(8 * MIB, 512 * KIB, 0x5a)
        .write_pattern(20 * MIB + 100, 10, 0x11);
    let top = qcow2(dir.path().join("top.qcow2"), size)
        .backing(&base)
        .create();
    top.write_random(4 * MIB + 4096, 200_000, 32);
    // A zero cluster without a host offset hides base data: a hole.
    top.write_zeroes_unmap(8 * MIB + 128 * KIB, 128 * KIB)
        // An allocated zero cluster over nothing: a hole too.
        .write_zeroes(12 * MIB, 64 * KIB)
        .write_pattern(size - 64 * KIB, 64 * KIB, 0x77);
    assert!(has_extent(&top, "zero"), "the test made no zero cluster");
    let expected = qemu_data_extents(&top);
    let mount = Mount::new(&top.path, &["--read-only"]);
    let got = seek_extents(&mount.disk());
    assert_eq!(
        got, expected,
        "SEEK_DATA/SEEK_HOLE extents (left) differ from qemu-img map's data extents (right)"
    );
    // st_blocks counts what the chain holds: at least the data, far below the virtual size.
    let data_bytes: u64 = expected.iter().map(|(s, e)| e - s).sum();
    let blocks = fs::metadata(mount.disk()).expect("stat disk").blocks() * 512;
    assert!(
        blocks >= data_bytes && blocks < size / 2,
        "st_blocks*512 = {blocks}, data = {data_bytes}, virtual size {size}"
    );
    // A sparse-aware copy reads the same bytes as qemu.
    let copy = dir.path().join("copy.raw");
    run_ok(
        "cp",
        [
            "--sparse=always".as_ref(),
            mount.disk().as_os_str(),
            copy.as_os_str(),
        ],
    );
    assert_same_bytes(
        &fs::read(&copy).expect("read copy"),
        &raw_of(&top),
        "cp --sparse=always of the disk",
    );
    mount.umount();
}

#[test]
fn fstrim_in_a_loop_mounted_ext4_gives_the_space_back_and_keeps_the_image_clean() {
    let dir = workdir();
    let img = qcow2(dir.path().join("trim.qcow2"), 256 * MIB).create();
    let payload = random_bytes(64 * MIB as usize, 41);

    // Round 1: an ext4 with a 64 MiB file, written and synced.
    let mount = Mount::new(&img.path, &[] as &[&str]);
    let disk = mount.disk();
    run_ok(
        "mkfs.ext4",
        [
            "-q".as_ref(),
            "-F".as_ref(),
            "-E".as_ref(),
            "nodiscard".as_ref(),
            disk.as_os_str(),
        ],
    );
    {
        let guest = LoopMount::new(&disk, "loop,discard");
        fs::write(guest.path().join("big.bin"), &payload).expect("write 64 MiB into ext4");
        run_ok("sync", [guest.path()]);
        guest.umount(&disk);
    }
    mount.umount();
    assert_check_clean(&img);
    let before = actual_size(&img);
    assert!(
        before > 64 * MIB,
        "the 64 MiB file is not in the image: {before}"
    );

    // Round 2: delete it and trim.
    let mount = Mount::new(&img.path, &[] as &[&str]);
    let disk = mount.disk();
    {
        let guest = LoopMount::new(&disk, "loop,discard");
        fs::remove_file(guest.path().join("big.bin")).expect("rm inside ext4");
        run_ok("sync", [guest.path()]);
        run_ok("fstrim", ["-v".as_ref(), guest.path().as_os_str()]);
        guest.umount(&disk);
    }
    mount.umount();
    assert_check_clean(&img);
    let after = actual_size(&img);
    assert!(
        after + 48 * MIB <= before,
        "fstrim gave back too little: qemu-img info actual-size {before} -> {after}"
    );
    // The file system is still sound.
    let raw = dir.path().join("trim.raw");
    img.convert_raw(&raw);
    run_ok("e2fsck", ["-fn".as_ref(), raw.as_os_str()]);
}

// --- signals ----------------------------------------------------------------------------------

/// Mounts a plain image read-write, writes through the mount while `signal` reaches the daemon
/// (sent once `signal_after` of the writes are done, the file still open), then checks that the
/// daemon unmounted, exited, and left a clean image holding every completed write.
fn signal_during_writes_leaves_a_clean_image(signal: libc::c_int, signal_after: usize) {
    let dir = workdir();
    let size = 32 * MIB;
    let img = qcow2(dir.path().join("sig.qcow2"), size).create();
    img.write_random(0, 2 * MIB as usize, 51);
    let mut reference = raw_of(&img);

    let mount = HostMount::prepare();
    let log = dir.path().join("daemon.log");
    let r = qcowfs([
        "mount".as_ref(),
        "-v".as_ref(),
        "--log-file".as_ref(),
        log.as_os_str(),
        img.path.as_os_str(),
        mount.path().as_os_str(),
    ]);
    mount.assert_mounted_by(&r);
    let pid = recorded_daemon_pid(mount.path()).expect("daemon pid in /run/qcowfs/*.pid");

    let writes: Vec<(u64, Vec<u8>)> = (0..8u64)
        .map(|i| {
            (
                i * 3 * MIB + i * 4099,
                random_bytes(MIB as usize + 333, 60 + i),
            )
        })
        .collect();
    let (tx, rx) = mpsc::channel::<usize>();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let disk = mount.disk();
    let plan = writes.clone();
    let writer = thread::spawn(move || {
        let f = OpenOptions::new()
            .write(true)
            .open(&disk)
            .expect("open disk for writing");
        let mut done = 0;
        for (i, (off, data)) in plan.iter().enumerate() {
            if i == signal_after {
                let _ = tx.send(done);
                // Wait until the signal has been sent; the file stays open meanwhile.
                let _ = go_rx.recv_timeout(Duration::from_secs(30));
            }
            if f.write_all_at(data, *off).is_err() {
                break;
            }
            done += 1;
        }
        drop(f);
        if signal_after >= plan.len() {
            let _ = tx.send(done);
            let _ = go_rx.recv_timeout(Duration::from_secs(30));
        }
        done
    });
    let before_signal = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the writer did not get going");
    assert_eq!(before_signal, signal_after);
    // SAFETY: plain kill(2) of the daemon's pid.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, signal) }, 0, "kill");
    eprintln!("$ kill -{signal} {pid}");
    let _ = go_tx.send(());
    let completed = within(Duration::from_secs(120), "the writer", move || {
        writer.join().expect("writer thread")
    });
    assert!(completed >= signal_after);
    wait_for_daemon_exit(
        pid,
        mount.path(),
        &format!("signal {signal} with the disk open"),
        Some(&log),
    );

    for (off, data) in &writes[..completed] {
        reference[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    let reference_file = raw_from_bytes(dir.path().join("reference.raw"), &reference);
    assert_check_clean(&img);
    assert_same_guest_contents(&img, &reference_file.path);
}

#[test]
fn sigterm_after_writes_unmounts_and_leaves_a_clean_image_with_the_data() {
    signal_during_writes_leaves_a_clean_image(libc::SIGTERM, 8);
}

#[test]
fn sigterm_during_writes_keeps_every_completed_write_and_a_clean_image() {
    signal_during_writes_leaves_a_clean_image(libc::SIGTERM, 3);
}

#[test]
fn sigint_after_writes_unmounts_and_leaves_a_clean_image_with_the_data() {
    signal_during_writes_leaves_a_clean_image(libc::SIGINT, 8);
}

// --- logs ------------------------------------------------------------------------------------

#[test]
fn log_file_receives_timestamped_lines_from_the_daemon() {
    let dir = workdir();
    let img = qcow2(dir.path().join("log.qcow2"), 4 * MIB).create();
    let log = dir.path().join("qcowfs.log");
    fs::write(&log, "earlier line\n").expect("seed log file");
    let mount = Mount::new(
        &img.path,
        &["-v".as_ref(), "--log-file".as_ref(), log.as_os_str()],
    );
    read_at_bounded(&mount.disk(), 0, 4096);
    mount.umount();
    let text = fs::read_to_string(&log).expect("read log file");
    assert!(
        text.starts_with("earlier line\n"),
        "the log was not appended to:\n{text}"
    );
    assert!(text.contains("mounted on"), "no mount line:\n{text}");
    assert!(text.contains("unmounted"), "no unmount line:\n{text}");
    for line in text.lines().skip(1) {
        // 2024-05-01T13:45:12.345+0200 qcowfs[PID] INFO: ...
        let (stamp, rest) = line.split_once(' ').expect("timestamp and message");
        assert_eq!(stamp.len(), 28, "timestamp {stamp:?} in {line:?}");
        assert!(stamp.as_bytes()[10] == b'T', "{line:?}");
        assert!(rest.starts_with("qcowfs["), "{line:?}");
    }
}

#[test]
fn a_log_file_that_cannot_be_opened_is_a_one_line_error_before_mounting() {
    let dir = workdir();
    let img = qcow2(dir.path().join("log.qcow2"), MIB).create();
    let bad = dir.path().join("no-such-folder").join("q.log");
    let r = mount_failure(&img.path, &["--log-file".as_ref(), bad.as_os_str()], None);
    assert_one_line_error(&r, &["q.log"], Duration::from_secs(10));
}

// --- manual pages, completions, installer, exit statuses ---------------------------------------

#[test]
fn generate_man_writes_a_page_per_command_with_the_exit_statuses() {
    let dir = workdir();
    qcowfs(["generate".as_ref(), "man".as_ref(), dir.path().as_os_str()]).assert_success();
    let main = fs::read_to_string(dir.path().join("qcowfs.1")).expect("qcowfs.1");
    for sub in ["mount", "umount", "info"] {
        assert!(main.contains(sub), "qcowfs.1 does not name {sub}");
        let page = dir.path().join(format!("qcowfs-{sub}.1"));
        let text = fs::read_to_string(&page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
        assert!(
            text.contains("EXIT STATUS"),
            "{} has no EXIT STATUS",
            page.display()
        );
    }
    assert!(
        !main.contains("generate"),
        "the hidden command leaked into qcowfs.1"
    );
    let mount = fs::read_to_string(dir.path().join("qcowfs-mount.1")).unwrap();
    for want in [
        "fuse.qcowfs",
        "passphrase_file",
        "libvirt\\-secret",
        "log\\-file",
    ] {
        assert!(mount.contains(want), "qcowfs-mount.1 lacks {want}");
    }
    // man(1) renders it (man-db is one of the tools install-deps.sh installs).
    let r = run_with(
        Command::new("man")
            .args(["--warnings", "-l"])
            .arg(dir.path().join("qcowfs-mount.1"))
            .env("MANWIDTH", "80")
            .env("MAN_KEEP_FORMATTING", "0"),
        None,
        COMMAND_TIMEOUT,
    );
    r.assert_success();
    // Without a terminal, man marks bold by overstriking ("M\x08M"): drop the struck letters.
    let mut plain = String::new();
    for c in r.stdout_str().chars() {
        if c == '\u{8}' {
            plain.pop();
        } else {
            plain.push(c);
        }
    }
    assert!(plain.contains("MOUNT(8) AND FSTAB"), "{plain}");
}

#[test]
fn generate_completions_prints_a_script_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef qcowfs"),
        ("fish", "complete -c qcowfs"),
    ] {
        let r = qcowfs(["generate", "completions", shell]);
        r.assert_success();
        let text = r.stdout_str();
        assert!(text.contains(marker), "{shell}: no {marker:?}");
        assert!(
            text.contains("passphrase-base64-file"),
            "{shell}: options missing"
        );
    }
    let r = qcowfs(["generate", "completions", "tcsh"]);
    assert_eq!(r.status.code(), Some(2));
}

#[test]
fn help_states_the_exit_statuses() {
    let r = qcowfs(["--help"]);
    r.assert_success();
    let text = r.stdout_str();
    assert!(
        text.contains("Exit status") && text.contains("  2  bad usage") && text.contains("  8  "),
        "{text}"
    );
    assert_eq!(
        qcowfs(["mount"]).status.code(),
        Some(2),
        "missing arguments"
    );
    assert_eq!(
        qcowfs(["frobnicate"]).status.code(),
        Some(2),
        "unknown command"
    );
}

#[test]
fn install_script_stages_binary_helper_man_pages_and_completions() {
    let dir = workdir();
    let stage = dir.path().join("stage");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/install.sh");
    let r = run_with(
        Command::new("bash")
            .arg(&script)
            .arg("/opt/qcowfs")
            .env("QCOWFS_BIN", qcowfs_bin())
            .env("DESTDIR", &stage)
            .env("SBINDIR", "/sbin"),
        None,
        COMMAND_TIMEOUT,
    );
    r.assert_success();
    let root = stage.join("opt/qcowfs");
    let bin = root.join("bin/qcowfs");
    assert!(fs::metadata(&bin).expect("installed binary").mode() & 0o111 != 0);
    let link = stage.join("sbin/mount.fuse.qcowfs");
    assert_eq!(
        fs::read_link(&link).expect("helper symlink"),
        Path::new("/opt/qcowfs/bin/qcowfs"),
        "the helper must point at the installed path"
    );
    for f in [
        "share/man/man1/qcowfs.1",
        "share/man/man1/qcowfs-mount.1",
        "share/man/man1/qcowfs-umount.1",
        "share/man/man1/qcowfs-info.1",
        "share/bash-completion/completions/qcowfs",
        "share/zsh/site-functions/_qcowfs",
        "share/fish/vendor_completions.d/qcowfs.fish",
    ] {
        let p = root.join(f);
        let len = fs::metadata(&p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .len();
        assert!(len > 0, "{} is empty", p.display());
    }
}
