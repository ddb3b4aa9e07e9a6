//! A daemon that cannot make another thread (its pids limit reached: a container's cap, a host
//! out of pids) still stores and syncs what it was given. A flush starts threads of its own (the
//! barrier that overlaps the next batch, the second CPU encrypting half a batch); when the kernel
//! refuses them, that work runs on the flush thread. QEMU then reads every byte written and
//! `qemu-img check` is clean.
//!
//! The limit is a pids cgroup (v1 or v2) holding only the daemon, capped at the threads it has.

use crate::common;

use common::*;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const PASS: &str = "thread limit secret";
const IO_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn a_daemon_at_its_pids_limit_still_writes_and_syncs_an_encrypted_image() {
    let dir = workdir();
    let size = 64 * MIB;
    let img = qcow2(dir.path().join("capped.qcow2"), size)
        .luks(PASS)
        .create();
    let log = dir.path().join("daemon.log");
    let mut options = passphrase_opts(dir.path(), PASS);
    options.extend(["--log-file".into(), log.clone().into_os_string()]);
    let mount = Mount::new(&img.path, &options);
    let pid = mount.daemon_pid().expect("the daemon's pid");
    let cap = PidsCap::hold(pid);

    // 8 MiB in 1 MiB writes (batches big enough to want the second encrypting CPU, and each
    // allocating clusters, so each wants a barrier), an fsync, then 4 KiB writes scattered over
    // the disk and another fsync.
    let sequential: Vec<(u64, Vec<u8>)> = (0..8)
        .map(|i| (i * MIB + 512, random_bytes(MIB as usize, 40 + i)))
        .collect();
    let mut rng = Rng::new(50);
    let scattered: Vec<(u64, Vec<u8>)> = (0..200)
        .map(|i| (rng.below(size / 4096) * 4096, random_bytes(4096, 60 + i)))
        .collect();
    let mut expected = vec![0u8; size as usize];
    for (off, data) in sequential.iter().chain(&scattered) {
        expected[*off as usize..*off as usize + data.len()].copy_from_slice(data);
    }
    let disk = mount.disk();
    within(
        IO_TIMEOUT,
        "writes and fsyncs at the pids limit",
        move || {
            let d = OpenOptions::new()
                .write(true)
                .open(&disk)
                .expect("open disk read-write");
            for part in [sequential, scattered] {
                for (off, data) in &part {
                    d.write_all_at(data, *off).expect("write at the pids limit");
                }
                d.sync_all().expect("fsync at the pids limit");
            }
        },
    );
    let refused = cap.refused_forks();
    assert!(
        refused > 0,
        "the kernel refused no thread of the daemon: the test did not test the limit"
    );
    eprintln!("threads the kernel refused the daemon: {refused}");
    // Still at the limit: umount's last flush must not need a thread either.
    mount.umount();
    drop(cap);

    // The barrier itself ran on the flush thread (the encryption helper, refused too, says
    // nothing): the case that used to panic the flush thread was met.
    let said = fs::read_to_string(&log).unwrap_or_else(|e| panic!("read {}: {e}", log.display()));
    assert!(
        said.contains("no thread for a write barrier"),
        "no barrier ran without its thread, so the test missed the case it is for; the \
         daemon's log:\n{said}"
    );
    assert_same_bytes(
        &img.raw(),
        &expected,
        "what QEMU reads after writes at the pids limit",
    );
    assert_check_clean(&img);
}

/// A pids cgroup holding one process, capped at the tasks it has; removed on drop (once the
/// process has left it by exiting).
struct PidsCap {
    root: PathBuf,
    dir: PathBuf,
}

impl PidsCap {
    fn hold(pid: u32) -> PidsCap {
        let root = pids_hierarchy();
        let dir = root.join(format!("qcowfs-it-{}-{pid}", std::process::id()));
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let cap = PidsCap { root, dir };
        assert!(
            cap.dir.join("pids.max").exists(),
            "{} has no pids.max: the pids controller is not enabled for it",
            cap.dir.display()
        );
        cap.set("cgroup.procs", &pid.to_string());
        let current = cap.get("pids.current");
        cap.set("pids.max", current.trim());
        cap
    }

    /// Forks and thread creations the limit refused so far.
    fn refused_forks(&self) -> u64 {
        let events = self.get("pids.events");
        events
            .lines()
            .find_map(|l| l.strip_prefix("max "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no \"max\" count in pids.events: {events:?}"))
    }

    fn get(&self, file: &str) -> String {
        let path = self.dir.join(file);
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    fn set(&self, file: &str, value: &str) {
        let path = self.dir.join(file);
        fs::write(&path, value)
            .unwrap_or_else(|e| panic!("write {value} to {}: {e}", path.display()));
    }
}

impl Drop for PidsCap {
    fn drop(&mut self) {
        // A test that failed midway leaves the daemon running: it goes back to the root cgroup
        // (the mount guard ends it). Only an empty cgroup can be removed.
        let _ = fs::write(self.dir.join("pids.max"), "max");
        let procs = fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.split_whitespace() {
            let _ = fs::write(self.root.join("cgroup.procs"), pid);
        }
        for _ in 0..100 {
            if fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "warning: could not remove the cgroup {}",
            self.dir.display()
        );
    }
}

/// Where pids cgroups are made: the v1 pids hierarchy, or the v2 root with the pids controller
/// enabled for its children. Fails loudly when neither exists.
fn pids_hierarchy() -> PathBuf {
    let v1 = Path::new("/sys/fs/cgroup/pids");
    if v1.join("cgroup.procs").exists() {
        return v1.to_path_buf();
    }
    let v2 = Path::new("/sys/fs/cgroup");
    let controllers = fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
    assert!(
        controllers.split_whitespace().any(|c| c == "pids"),
        "this test needs a pids cgroup: no /sys/fs/cgroup/pids (v1) and no pids controller in \
         /sys/fs/cgroup/cgroup.controllers (v2: {controllers:?})"
    );
    // Already enabled, or enabled now; a child without pids.max fails in `hold`.
    let _ = fs::write(v2.join("cgroup.subtree_control"), "+pids");
    v2.to_path_buf()
}
