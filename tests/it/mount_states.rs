//! The states of a mount point a user meets besides "mounted" and "not mounted": a mount whose
//! daemon was killed, a folder that already holds a qcowfs mount or other files, and two mounts
//! stacked at one folder. Each ends in one line and a known exit status, never a hang, and
//! `qcowfs umount` exits 0 only once the daemon of the mount it detached has written everything.
//!
//! Real FUSE mounts (root, as in CI); QEMU checks the images.

use crate::common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// How long a umount that has nothing to wait for may take.
const PROMPT: Duration = Duration::from_secs(20);

/// How many mounts the mount table has at `path` (stacked ones count each).
fn mounts_at(path: &Path) -> usize {
    let canon = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let want = canon.to_str().expect("UTF-8 path").replace(' ', "\\040");
    fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(want.as_str()))
        .count()
}

/// `qcowfs umount PATH`, bounded by `limit` (the test fails if it takes longer).
fn umount_within(path: &Path, limit: Duration) -> Run {
    run_with(
        Command::new(qcowfs_bin())
            .arg("umount")
            .arg(path)
            .current_dir("/")
            .env("RUST_BACKTRACE", "0"),
        None,
        limit,
    )
}

/// Drop the guard of a mount that is gone already (its unmount would fail and fall back to
/// forcing), and remove its folder.
fn forget_unmounted(m: Mount) {
    let mnt = m.mountpoint().to_path_buf();
    assert!(!is_mounted(&mnt), "{} is still mounted", mnt.display());
    std::mem::forget(m);
    if let Some(parent) = mnt.parent() {
        let _ = fs::remove_dir_all(parent);
    }
}

/// A mount made by hand in a folder of the test's; dropping it unmounts whatever is left there.
struct Folder {
    path: PathBuf,
}

impl Drop for Folder {
    fn drop(&mut self) {
        for _ in 0..3 {
            if !is_mounted(&self.path) {
                return;
            }
            let _ = umount_within(&self.path, COMMAND_TIMEOUT);
            if is_mounted(&self.path) {
                let _ = Command::new("umount").arg("-l").arg(&self.path).status();
            }
        }
    }
}

#[test]
fn umount_of_a_mount_whose_daemon_was_killed_detaches_it_and_says_unflushed_writes_are_lost() {
    let dir = workdir();
    let image = qcow2(dir.path().join("killed.qcow2"), 16 * MIB).create();
    image.write_pattern(0, MIB, 0x11);
    let m = Mount::new(&image.path, &[] as &[&str]);
    let pid = m.daemon_pid().expect("the daemon is found");
    // Written and flushed before the kill: these must survive it.
    let data = vec![0x5au8; 256 * 1024];
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .write(true)
            .open(m.disk())
            .expect("open disk");
        f.write_all_at(&data, 3 * MIB).expect("write");
        f.sync_all().expect("fsync");
    }
    // SAFETY: kill(2) with a pid and a signal number.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let start = Instant::now();
    while !process_gone(pid) {
        assert!(start.elapsed() < PROMPT, "the killed daemon {pid} lingers");
        thread::sleep(Duration::from_millis(10));
    }
    let mnt = m.mountpoint().to_path_buf();
    let mnt_name = mnt.to_str().expect("UTF-8 path");

    // Mounting there again is refused, pointing at the way out.
    let again = qcowfs(["mount".as_ref(), image.path.as_os_str(), mnt.as_os_str()]);
    assert_one_line_error(&again, &[mnt_name], PROMPT);
    assert!(
        again.stderr.contains("died") && again.stderr.contains("qcowfs umount"),
        "mounting over a dead mount does not say so: {}",
        again.stderr
    );

    let r = umount_within(&mnt, PROMPT);
    assert_one_line_error(&r, &[mnt_name], PROMPT);
    assert_eq!(r.status.code(), Some(1), "{}", r.stderr);
    assert!(
        r.stderr.contains("died") && r.stderr.contains("lost"),
        "the message does not say the daemon died and unflushed writes are lost: {}",
        r.stderr
    );
    assert!(
        r.stderr.contains(image.path.to_str().expect("UTF-8 path")),
        "the message does not name the image to check: {}",
        r.stderr
    );
    assert!(
        !is_mounted(&mnt),
        "{} is still mounted after umount",
        mnt.display()
    );
    // The folder is usable again, and what was flushed before the kill is in the image.
    assert_check_clean_when(&image, "after the daemon was killed and the mount detached");
    let raw = raw_of(&image);
    assert_same_bytes(
        &raw[3 * MIB as usize..3 * MIB as usize + data.len()],
        &data,
        "flushed writes, read by QEMU after the kill",
    );
    forget_unmounted(m);
}

#[test]
fn mounting_over_a_live_qcowfs_mount_is_refused_in_one_line_even_with_nonempty() {
    let dir = workdir();
    let first = qcow2(dir.path().join("first.qcow2"), 16 * MIB).create();
    let second = qcow2(dir.path().join("second.qcow2"), 16 * MIB).create();
    let m = Mount::new(&first.path, &[] as &[&str]);
    let mnt = m.mountpoint();
    let mnt_name = mnt.to_str().expect("UTF-8 path");
    for extra in [None, Some("--nonempty")] {
        let mut args: Vec<&std::ffi::OsStr> = vec!["mount".as_ref()];
        args.extend(extra.map(std::ffi::OsStr::new));
        args.push(second.path.as_os_str());
        args.push(mnt.as_os_str());
        let r = qcowfs(&args);
        let stacked = mounts_at(mnt);
        if stacked > 1 {
            // Leave only the first mount, then fail.
            let _ = Command::new("umount").arg("-l").arg(mnt).status();
        }
        assert_one_line_error(&r, &[mnt_name], PROMPT);
        assert!(
            r.stderr.contains("already mounted"),
            "the refusal ({extra:?}) does not say a mount is there: {}",
            r.stderr
        );
        assert_eq!(stacked, 1, "a second mount ({extra:?}) was stacked");
    }
    // The first mount is untouched.
    assert_eq!(read_at_bounded(&m.disk(), 0, 4096), vec![0u8; 4096]);
    m.umount();
    assert_check_clean_when(&second, "after the refused mounts");
}

#[test]
fn mounting_on_a_folder_with_files_is_refused_unless_nonempty() {
    let dir = workdir();
    let image = qcow2(dir.path().join("img.qcow2"), 16 * MIB).create();
    image.write_pattern(0, 64 * KIB, 0x77);
    let folder = Folder {
        path: dir.path().join("full"),
    };
    fs::create_dir(&folder.path).expect("mkdir");
    fs::write(folder.path.join("notes.txt"), "keep me").expect("write a file");
    let name = folder.path.to_str().expect("UTF-8 path");

    let r = qcowfs([
        "mount".as_ref(),
        image.path.as_os_str(),
        folder.path.as_os_str(),
    ]);
    let mounted = is_mounted(&folder.path);
    assert!(
        !mounted,
        "qcowfs mounted over a folder with files ({})",
        r.stderr
    );
    assert_one_line_error(&r, &[name], PROMPT);
    assert!(
        r.stderr.contains("not empty") && r.stderr.contains("--nonempty"),
        "the refusal does not say why and how to override: {}",
        r.stderr
    );

    let r = qcowfs([
        "mount".as_ref(),
        "--nonempty".as_ref(),
        image.path.as_os_str(),
        folder.path.as_os_str(),
    ]);
    r.assert_success();
    assert!(is_mounted(&folder.path), "--nonempty did not mount");
    assert!(!folder.path.join("notes.txt").exists(), "the file shows");
    assert_eq!(
        read_at_bounded(&folder.path.join("disk"), 0, 64 * KIB as usize),
        vec![0x77u8; 64 * KIB as usize]
    );
    umount_within(&folder.path, COMMAND_TIMEOUT).assert_success();
    assert_eq!(
        fs::read_to_string(folder.path.join("notes.txt")).expect("the file is back"),
        "keep me"
    );
    assert_check_clean_when(&image, "after the --nonempty mount");
}

#[test]
fn umount_waits_for_the_daemon_of_the_mount_on_top_not_the_one_under_it() {
    let dir = workdir();
    let under = qcow2(dir.path().join("under.qcow2"), 16 * MIB).create();
    let top = qcow2(dir.path().join("top.qcow2"), 32 * MIB).create();
    let a = Mount::new(&under.path, &[] as &[&str]);
    let b = Mount::new(&top.path, &["--cache-size", "64M"]);
    let (a_pid, b_pid) = (
        a.daemon_pid().expect("daemon A"),
        b.daemon_pid().expect("daemon B"),
    );
    // Dirty data in B's cache: written, not flushed; umount must see it into the image.
    let mut expected = vec![0u8; 32 * MIB as usize];
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .write(true)
            .open(b.disk())
            .expect("open disk");
        for i in 0..24u64 {
            let chunk = vec![(i as u8) ^ 0xa5; MIB as usize];
            f.write_all_at(&chunk, i * MIB).expect("write");
            expected[(i * MIB) as usize..((i + 1) * MIB) as usize].copy_from_slice(&chunk);
        }
    }
    // Stack B over A at A's folder (a mount moved there: qcowfs itself refuses to stack).
    let moved = Command::new("mount")
        .arg("--move")
        .arg(b.mountpoint())
        .arg(a.mountpoint())
        .status()
        .expect("run mount --move");
    assert!(moved.success(), "mount --move failed");
    assert_eq!(mounts_at(a.mountpoint()), 2, "B is not stacked over A");

    // Bounded well below the daemon wait (an hour): waiting for A's daemon instead would hang.
    let r = umount_within(a.mountpoint(), PROMPT * 2);
    r.assert_success();
    assert!(
        process_gone(b_pid),
        "umount returned 0 while B's daemon (pid {b_pid}) still runs"
    );
    assert!(!process_gone(a_pid), "A's daemon (pid {a_pid}) was stopped");
    assert_eq!(
        mounts_at(a.mountpoint()),
        1,
        "umount did not detach exactly the mount on top"
    );
    assert_check_clean_when(&top, "right after qcowfs umount returned 0");
    assert_same_bytes(&raw_of(&top), &expected, "B's writes, read by QEMU");
    a.umount();
    assert_check_clean_when(&under, "after A's umount");
    // B's mount left its own folder with the move.
    forget_unmounted(b);
}
