//! `qcowfs list` against live mounts (mode, pid, the dirty bytes a daemon publishes, a dead daemon),
//! and the daemon's own log: the mounted and unmounted lines at the default level, no warning on a
//! clean umount, no second unmount of what lies under the mount, and a log file of its own when no
//! syslog listens.
//!
//! Timing is bounded by waiting, never asserted: every state is polled for up to `SETTLE`.

use crate::common;

use common::*;
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// How long a state the daemon reaches by itself (a published figure, a flush) may take.
const SETTLE: Duration = Duration::from_secs(60);

/// `qcowfs list --json`, which must succeed, parsed.
fn list_json() -> Vec<serde_json::Value> {
    let r = qcowfs(["list", "--json"]);
    r.assert_success();
    serde_json::from_slice(&r.stdout)
        .unwrap_or_else(|e| panic!("list --json does not parse: {e}\n{}", r.stdout_str()))
}

/// The row of `list --json` whose mount point is `mountpoint`.
fn row(rows: &[serde_json::Value], mountpoint: &Path) -> Option<serde_json::Value> {
    let want = fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    rows.iter()
        .find(|r| r["mountpoint"].as_str().map(Path::new) == Some(want.as_path()))
        .cloned()
}

/// Poll `list --json` until `ok` holds for the row of `mountpoint`; the last row on timeout.
fn wait_for_row(
    mountpoint: &Path,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let found = row(&list_json(), mountpoint);
        if let Some(r) = &found {
            if ok(r) {
                return r.clone();
            }
        }
        assert!(
            start.elapsed() < SETTLE,
            "{what}: not within {SETTLE:?}; last row for {}: {found:?}",
            mountpoint.display()
        );
        thread::sleep(Duration::from_millis(50));
    }
}

fn canonical(p: &Path) -> PathBuf {
    fs::canonicalize(p).unwrap_or_else(|e| panic!("canonicalize {}: {e}", p.display()))
}

#[test]
fn lists_both_mounts_with_mode_pid_and_dirty_bytes_until_unmounted() {
    let dir = workdir();
    let rw_img = qcow2(dir.path().join("rw.qcow2"), 16 * MIB).create();
    let ro_img = qcow2(dir.path().join("ro.qcow2"), 16 * MIB).create();
    let rw = Mount::new(&rw_img.path, &[] as &[&str]);
    let ro = Mount::new(&ro_img.path, &["--read-only"]);
    // The kernel lists both as fuse.qcowfs, as findmnt -t and umount -a -t select them.
    let r = run_ok("findmnt", ["-n", "-t", "fuse.qcowfs", "-o", "TARGET"]);
    for m in [rw.mountpoint(), ro.mountpoint()] {
        let want = canonical(m);
        assert!(
            r.stdout_str().lines().any(|l| Path::new(l.trim()) == want),
            "findmnt -t fuse.qcowfs does not list {}:\n{}",
            want.display(),
            r.stdout_str()
        );
    }

    // A writer that keeps writing (never idle long enough for the background flush) and never
    // syncs: the daemon holds dirty data as long as it runs.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let disk = rw.disk();
        thread::spawn(move || {
            let f = OpenOptions::new()
                .write(true)
                .open(&disk)
                .expect("open disk for writing");
            let data = random_bytes(64 * KIB as usize, 7);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                f.write_all_at(&data, (i % 128) * 64 * KIB)
                    .expect("write the disk");
                i += 1;
                thread::sleep(Duration::from_millis(100));
            }
        })
    };

    let dirty = wait_for_row(rw.mountpoint(), "dirty bytes > 0 while writing", |r| {
        r["dirty_bytes"].as_u64().is_some_and(|d| d > 0)
    });
    assert_eq!(dirty["image"], canonical(&rw_img.path).to_str().unwrap());
    assert_eq!(dirty["mode"], "read-write");
    assert_eq!(dirty["state"], "running");
    let pid = dirty["pid"].as_u64().expect("a pid") as u32;
    if let Some(daemon) = rw.daemon_pid() {
        assert_eq!(pid, daemon, "{dirty}");
    }
    let read_only = wait_for_row(ro.mountpoint(), "the read-only mount", |r| {
        r["dirty_bytes"].as_u64().is_some()
    });
    assert_eq!(
        read_only["image"],
        canonical(&ro_img.path).to_str().unwrap()
    );
    assert_eq!(read_only["mode"], "read-only");
    assert_eq!(read_only["dirty_bytes"], 0);
    assert_eq!(read_only["state"], "running");

    let text = qcowfs(["list"]);
    text.assert_success();
    let text = text.stdout_str();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    assert_eq!(
        header,
        ["IMAGE", "MOUNTPOINT", "PID", "MODE", "DIRTY", "STATE"],
        "{text}"
    );
    for (mount, mode) in [(&rw, "read-write"), (&ro, "read-only")] {
        let at = canonical(mount.mountpoint());
        let line = lines
            .clone()
            .find(|l| l.split_whitespace().nth(1) == at.to_str())
            .unwrap_or_else(|| panic!("no row for {}:\n{text}", at.display()));
        assert!(line.contains(mode) && line.ends_with("running"), "{line}");
    }

    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer thread");
    fs::File::open(rw.disk())
        .and_then(|f| f.sync_all())
        .expect("fsync the disk");
    wait_for_row(rw.mountpoint(), "dirty bytes back to 0 after fsync", |r| {
        r["dirty_bytes"] == 0
    });

    let (rw_at, ro_at) = (canonical(rw.mountpoint()), canonical(ro.mountpoint()));
    rw.umount();
    ro.umount();
    let rows = list_json();
    assert!(row(&rows, &rw_at).is_none(), "{rows:?}");
    assert!(row(&rows, &ro_at).is_none(), "{rows:?}");
}

#[test]
fn a_mount_whose_daemon_died_is_listed_as_daemon_dead() {
    let dir = workdir();
    let img = qcow2(dir.path().join("dead.qcow2"), 4 * MIB).create();
    let mount = Mount::new(&img.path, &[] as &[&str]);
    let live = wait_for_row(mount.mountpoint(), "the mount listed", |r| {
        r["state"] == "running"
    });
    let pid = live["pid"].as_u64().expect("a pid") as i32;
    // SAFETY: signalling the daemon this test started, by its recorded pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let dead = wait_for_row(mount.mountpoint(), "the dead daemon listed", |r| {
        r["state"] == "daemon dead"
    });
    assert_eq!(dead["dirty_bytes"], serde_json::Value::Null, "{dead}");
    let text = qcowfs(["list"]);
    text.assert_success();
    assert!(
        text.stdout_str().contains("daemon dead"),
        "{}",
        text.stdout_str()
    );
    // The guard detaches the dead mount.
    drop(mount);
}

/// The daemon's lines in `log` (those of `qcowfs[PID]`).
fn lines_of(log: &Path, pid: u64) -> Vec<String> {
    let text = fs::read_to_string(log).unwrap_or_default();
    let tag = format!("qcowfs[{pid}]");
    text.lines()
        .filter(|l| l.contains(&tag))
        .map(String::from)
        .collect()
}

fn assert_clean_lifecycle(lines: &[String], image: &Path, mountpoint: &Path, pid: u64) {
    let mounted = format!(
        "{} mounted on {} (pid {pid}, read-write",
        canonical(image).display(),
        mountpoint.display()
    );
    assert!(
        lines.iter().any(|l| l.contains(&mounted)),
        "no `{mounted}` line:\n{}",
        lines.join("\n")
    );
    let unmounted = format!(
        "{} unmounted: all writes are in the image",
        mountpoint.display()
    );
    assert!(
        lines.iter().any(|l| l.contains(&unmounted)),
        "no `{unmounted}` line:\n{}",
        lines.join("\n")
    );
    for l in lines {
        assert!(
            !l.contains(" WARN: ") && !l.contains(" ERROR: "),
            "a clean mount and umount logged: {l}"
        );
    }
}

#[test]
fn a_clean_umount_logs_the_mounted_and_unmounted_lines_and_no_warning() {
    let dir = workdir();
    let img = qcow2(dir.path().join("log.qcow2"), 4 * MIB).create();
    let log = dir.path().join("qcowfs.log");
    // The default level (warnings): the lifecycle lines are written anyway.
    let mount = Mount::new(&img.path, &["--log-file".as_ref(), log.as_os_str()]);
    let at = canonical(mount.mountpoint());
    let pid = wait_for_row(&at, "the mount listed", |r| r["pid"].is_u64())["pid"]
        .as_u64()
        .unwrap();
    write_at_bounded(&mount.disk(), 0, &random_bytes(64 * KIB as usize, 3));
    mount.umount();
    assert_clean_lifecycle(&lines_of(&log, pid), &img.path, &at, pid);
}

#[test]
fn a_umount_leaves_the_file_system_under_the_mount_in_place() {
    let dir = workdir();
    let img = qcow2(dir.path().join("stacked.qcow2"), 4 * MIB).create();
    let folder = dir.path().join("under");
    fs::create_dir(&folder).expect("create folder");
    let tmpfs = Tmpfs::mount(&folder, "1M");
    let r = qcowfs(["mount".as_ref(), img.path.as_os_str(), folder.as_os_str()]);
    r.assert_success();
    let r = qcowfs(["umount".as_ref(), folder.as_os_str()]);
    r.assert_success();
    // The daemon may still be exiting: give a second unmount, if any, time to happen.
    thread::sleep(Duration::from_millis(500));
    assert!(
        is_mounted(tmpfs.path()),
        "the tmpfs under the qcowfs mount was unmounted with it"
    );
}

#[test]
fn without_syslog_the_daemon_logs_to_a_file_it_names_on_the_terminal() {
    let dir = workdir();
    let img = qcow2(dir.path().join("nolog.qcow2"), 4 * MIB).create();
    let missing = dir.path().join("no-syslog.sock");
    let state = dir.path().join("state");
    let env: [(&str, &OsStr); 2] = [
        ("QCOWFS_SYSLOG_SOCKET", missing.as_os_str()),
        ("XDG_STATE_HOME", state.as_os_str()),
    ];
    let (mount, r) = Mount::try_new_with_env(&img.path, &[] as &[&str], None, Path::new("/"), &env)
        .unwrap_or_else(|r| panic!("mount failed:\n{}", r.stderr));
    let log = state.join("qcowfs").join("qcowfs.log");
    let said = format!(
        "logging to {} (no syslog at {})",
        log.display(),
        missing.display()
    );
    assert_eq!(
        r.stderr.matches(&said).count(),
        1,
        "expected `{said}` once on stderr:\n{}",
        r.stderr
    );
    let at = canonical(mount.mountpoint());
    let pid = wait_for_row(&at, "the mount listed", |r| r["pid"].is_u64())["pid"]
        .as_u64()
        .unwrap();
    mount.umount();
    assert_clean_lifecycle(&lines_of(&log, pid), &img.path, &at, pid);
}
