//! Guards for what the fault and host tests mount besides a plain `Mount`: a `qcowfs mount
//! --foreground` child that can be killed -9, and a guest file system loop-mounted from a file
//! (and the helpers that make a guest with its own tools and encrypt it).
//! Dropping either never leaves a mount behind.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::fuse::{is_mounted, qcowfs_bin, require_fuse};
use super::image::create_raw;
use super::run::{describe_status, qemu_img, run, run_ok, run_with};

/// How long a `--foreground` mount may take to appear.
const FOREGROUND_MOUNT_TIMEOUT: Duration = Duration::from_secs(30);

/// `qcowfs mount --foreground` as a child process that the test can kill -9. Dropping it kills
/// the child if still alive and detaches the mount lazily.
pub struct ForegroundMount {
    child: Option<Child>,
    mountpoint: PathBuf,
    _dir: tempfile::TempDir,
}

impl ForegroundMount {
    pub fn start(image: &Path, options: &[OsString]) -> ForegroundMount {
        require_fuse();
        let dir = tempfile::Builder::new()
            .prefix("qcowfs-fg-")
            .tempdir()
            .expect("temp folder");
        let mountpoint = dir.path().join("mnt");
        fs::create_dir(&mountpoint).expect("mkdir mount point");
        let log = dir.path().join("daemon.log");
        let out = File::create(&log).expect("daemon log");
        let mut cmd = Command::new(qcowfs_bin());
        cmd.arg("mount")
            .arg("--foreground")
            .args(options)
            .arg(image)
            .arg(&mountpoint)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone().expect("dup log")))
            .stderr(Stdio::from(out));
        eprintln!("$ {cmd:?} &");
        let child = cmd.spawn().expect("spawn qcowfs mount --foreground");
        let mut fg = ForegroundMount {
            child: Some(child),
            mountpoint,
            _dir: dir,
        };
        let start = Instant::now();
        while !is_mounted(&fg.mountpoint) {
            if let Ok(Some(status)) = fg.child.as_mut().expect("child").try_wait() {
                fg.child = None;
                panic!(
                    "qcowfs mount --foreground exited ({}) before mounting:\n{}",
                    describe_status(status),
                    fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < FOREGROUND_MOUNT_TIMEOUT,
                "qcowfs mount --foreground did not mount within {FOREGROUND_MOUNT_TIMEOUT:?}"
            );
            thread::sleep(Duration::from_millis(5));
        }
        fg
    }

    pub fn disk(&self) -> PathBuf {
        self.mountpoint.join("disk")
    }

    /// SIGKILL, reap, and detach the dead mount point.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            eprintln!("$ kill -9 {}", child.id());
            let _ = child.kill();
            let _ = child.wait();
        }
        lazy_unmount(&self.mountpoint);
    }
}

impl Drop for ForegroundMount {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `fusermount3 -u -z`, then `umount -l`, of a (dead) mount point, each bounded.
pub fn lazy_unmount(mountpoint: &Path) {
    let bounded = Duration::from_secs(20);
    if is_mounted(mountpoint) {
        let _ = run_with(
            Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(mountpoint),
            None,
            bounded,
        );
    }
    if is_mounted(mountpoint) {
        let _ = run_with(
            Command::new("umount").arg("-l").arg(mountpoint),
            None,
            bounded,
        );
    }
}

/// A loop device over a file (`losetup --find --show [OPTIONS] FILE`), detached on drop.
pub struct LoopDevice {
    pub device: PathBuf,
}

impl LoopDevice {
    pub fn attach(file: &Path) -> LoopDevice {
        LoopDevice::attach_with(file, &[])
    }

    pub fn attach_with(file: &Path, options: &[&str]) -> LoopDevice {
        let mut args: Vec<&OsStr> = vec!["--find".as_ref(), "--show".as_ref()];
        args.extend(options.iter().map(OsStr::new));
        args.push(file.as_os_str());
        let r = run_ok("losetup", args);
        LoopDevice {
            device: PathBuf::from(r.stdout_str().trim()),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// `mount -o OPTIONS SOURCE DIR` of a guest file system in a file (OPTIONS with `loop`); dropping
/// it unmounts (lazily if it must).
pub struct LoopMount {
    target: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopMount {
    pub fn new(source: &Path, options: &str) -> LoopMount {
        let dir = tempfile::Builder::new()
            .prefix("qcowfs-loop-")
            .tempdir()
            .expect("temp folder");
        let target = dir.path().join("guest");
        fs::create_dir(&target).expect("mkdir loop target");
        run_ok(
            "mount",
            [
                "-o".as_ref(),
                options.as_ref(),
                source.as_os_str(),
                target.as_os_str(),
            ],
        );
        LoopMount { target, _dir: dir }
    }

    pub fn path(&self) -> &Path {
        &self.target
    }

    /// Unmount, and wait until the loop device over `source` is gone (it holds the file open).
    pub fn umount(self, source: &Path) {
        run_ok("umount", [self.target.as_os_str()]);
        wait_until_no_loop_device_uses(source);
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if is_mounted(&self.target) {
            let bounded = Duration::from_secs(20);
            let _ = run_with(Command::new("umount").arg(&self.target), None, bounded);
            if is_mounted(&self.target) {
                let _ = run_with(
                    Command::new("umount").arg("-l").arg(&self.target),
                    None,
                    bounded,
                );
            }
        }
    }
}

/// Waits (bounded) until no loop device is backed by `file` (an auto-cleared loop device is
/// detached a moment after its file system is unmounted, and holds the file open till then).
pub fn wait_until_no_loop_device_uses(file: &Path) {
    let start = Instant::now();
    loop {
        let r = run("losetup", ["-j".as_ref(), file.as_os_str()]);
        if r.stdout.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "a loop device still uses {}: {}",
            file.display(),
            r.stdout_str()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// `sfdisk DISK < SCRIPT`, without asking the kernel to re-read anything.
pub fn sfdisk(disk: &Path, script: &str) {
    run_with(
        Command::new("sfdisk")
            .arg("--no-reread")
            .arg("--no-tell-kernel")
            .arg(disk),
        Some(script.as_bytes()),
        super::run::COMMAND_TIMEOUT,
    )
    .assert_success();
}
/// A raw file of `size` bytes, `mkfs` run on it, `fill` given it mounted with `mount -o loop`.
pub fn loop_made(
    work: &Path,
    name: &str,
    size: u64,
    mkfs: &[&str],
    fill: impl FnOnce(&Path),
) -> PathBuf {
    let raw = work.join(format!("{name}.raw"));
    create_raw(&raw, size);
    let mut args: Vec<&OsStr> = mkfs[1..].iter().map(OsStr::new).collect();
    args.push(raw.as_os_str());
    run_ok(mkfs[0], args);
    let mnt = LoopMount::new(&raw, "loop");
    fill(mnt.path());
    mnt.umount(&raw);
    raw
}

/// `cp -a SRC/. MNT/`.
pub fn copy_tree(src: &Path, mnt: &Path) {
    run_ok(
        "cp",
        ["-a".as_ref(), src.join(".").as_os_str(), mnt.as_os_str()],
    );
}

/// `raw` as a qcow2 encrypted with `format` (`aes` or `luks`) under `pass`.
pub fn encrypted(raw: &Path, format: &str, pass: &str) -> PathBuf {
    let dest = raw.with_extension(format!("{format}.qcow2"));
    let iter = if format == "luks" {
        ",encrypt.iter-time=10"
    } else {
        ""
    };
    qemu_img([
        "convert".as_ref(),
        "-f".as_ref(),
        "raw".as_ref(),
        "-O".as_ref(),
        "qcow2".as_ref(),
        "--object".as_ref(),
        OsStr::new(&format!("secret,id=s0,data={pass}")),
        "-o".as_ref(),
        OsStr::new(&format!(
            "encrypt.format={format},encrypt.key-secret=s0{iter}"
        )),
        raw.as_os_str(),
        dest.as_os_str(),
    ]);
    dest
}

/// `mke2fs -q -F -t ext4 -d TREE RAW [SIZE]`: an ext4 file system holding `tree`, in `raw` (made
/// `size` long, e.g. "512M", or as long as the file already is).
pub fn mkfs_ext4_from(tree: &Path, raw: &Path, size: Option<&str>) {
    let mut args: Vec<&OsStr> = ["-q", "-F", "-t", "ext4", "-d"]
        .iter()
        .map(OsStr::new)
        .collect();
    args.extend([tree.as_os_str(), raw.as_os_str()]);
    args.extend(size.map(OsStr::new));
    run_ok("mke2fs", args);
}
