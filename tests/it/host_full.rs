//! A host file system that fills up during a flush: fsync fails, the daemon keeps serving what it
//! holds, and once space is freed the writes are stored; qemu-img agrees with a raw reference.
//!
//! Every external command and every FUSE access is bounded in time; every mount is cleaned up
//! whatever the outcome.

use crate::common;

use common::*;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// How long one batch of I/O through a mount may take before the test fails instead of hanging.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

#[test]
fn a_full_host_file_system_fails_fsync_keeps_the_daemon_serving_and_recovers_once_space_is_freed() {
    let dir = workdir();
    let fs_dir = dir.path().join("small");
    fs::create_dir(&fs_dir).expect("mkdir small");
    // Declared before the mount: dropped after it.
    let small = Tmpfs::mount(&fs_dir, "64m");
    let img = qcow2(small.path().join("full.qcow2"), 128 * MIB).create();
    img.write_random(0, 2 * MIB as usize, 800);
    let reference = dir.path().join("reference.raw");
    img.convert_raw(&reference);

    // Fill the file system, then leave 1 MiB: enough to mount, not enough for the flush.
    let filler = small.path().join("filler");
    fill_file_system(&filler, MIB);

    let mount = Mount::new(&img.path, &[] as &[&str]);
    let pid = mount.daemon_pid().expect("daemon pid");
    let disk = Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(mount.disk())
            .expect("open disk read-write"),
    );
    let reference_file = Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&reference)
            .expect("open reference"),
    );
    // 12 MiB at an unaligned offset plus small writes here and there, all beyond the free space.
    let mut writes = vec![(16 * MIB + 777, random_bytes(12 * MIB as usize, 801))];
    let mut rng = Rng::new(802);
    for i in 0..20 {
        let len = rng.range(1, 100_000);
        let off = rng.below(128 * MIB - len);
        writes.push((off, random_bytes(len as usize, 900 + i)));
    }
    let first_fsync = {
        let (d, r, writes) = (disk.clone(), reference_file.clone(), writes.clone());
        within(
            IO_TIMEOUT,
            "writes and fsync on a full file system",
            move || {
                for (off, data) in &writes {
                    d.write_all_at(data, *off)
                        .unwrap_or_else(|e| panic!("write of {} bytes at {off}: {e}", data.len()));
                    r.write_all_at(data, *off).expect("write reference");
                }
                d.sync_all()
            },
        )
    };
    match first_fsync {
        Ok(()) => panic!("fsync succeeded although the host file system has only 1 MiB free"),
        Err(e) => {
            eprintln!("fsync on the full file system: {e}");
            assert_eq!(
                e.raw_os_error(),
                Some(libc::ENOSPC),
                "fsync on a full file system failed with {e}, expected ENOSPC"
            );
        }
    }

    // The daemon lives, and still serves what was written (from memory).
    assert!(!process_gone(pid), "the daemon died after a failed flush");
    assert_reads_match_reference(&disk, &reference_file, &writes);
    if let Err(e) = qemu_check(
        &img,
        &["-U"],
        Leaks::Allowed,
        "qemu-img check -U while the flush fails",
    ) {
        panic!("{e}");
    }
    // umount refuses to lose the data: exit 8 (a host I/O error), still mounted, daemon alive.
    let um = qcowfs(["umount".as_ref(), mount.mountpoint().as_os_str()]);
    assert_eq!(
        um.status.code(),
        Some(8),
        "qcowfs umount while the host file system is full: {}\n{}",
        describe_status(um.status),
        um.stderr
    );
    assert!(
        is_mounted(mount.mountpoint()) && !process_gone(pid),
        "qcowfs umount that could not write unmounted anyway or ended the daemon"
    );

    // Free the space: the next fsync writes everything.
    fs::remove_file(&filler).expect("remove filler");
    let second = {
        let d = disk.clone();
        within(IO_TIMEOUT, "fsync after freeing space", move || {
            d.sync_all()
        })
    };
    second.unwrap_or_else(|e| panic!("fsync after the space was freed: {e}"));
    assert_reads_match_reference(&disk, &reference_file, &writes);
    drop(disk);
    mount.umount();

    assert_same_guest_contents(&img, &reference);
    assert_check_clean(&img);
    drop(small);
}

/// Every write in `writes` reads back through `disk` as the reference has it.
fn assert_reads_match_reference(
    disk: &Arc<File>,
    reference: &Arc<File>,
    writes: &[(u64, Vec<u8>)],
) {
    let (d, r) = (disk.clone(), reference.clone());
    let ranges: Vec<(u64, usize)> = writes.iter().map(|(o, data)| (*o, data.len())).collect();
    within(IO_TIMEOUT, "read-back through the mount", move || {
        for (off, len) in ranges {
            let mut got = vec![0u8; len];
            let mut want = vec![0u8; len];
            d.read_exact_at(&mut got, off)
                .unwrap_or_else(|e| panic!("read-back of {len} bytes at {off}: {e}"));
            r.read_exact_at(&mut want, off).expect("read reference");
            if let Some(at) = first_difference(&got, &want) {
                panic!(
                    "read-back of {len} bytes at {off} through the mount differs from what was \
                     written, first at disk offset {}",
                    off + at as u64
                );
            }
        }
    });
}

/// Writes `path` until the file system is full, then gives `leave` bytes back.
fn fill_file_system(path: &Path, leave: u64) {
    let mut f = File::create(path).expect("create filler");
    let chunk = vec![0xf1u8; MIB as usize];
    let mut len = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => len += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    f.set_len(len.saturating_sub(leave)).expect("shrink filler");
    eprintln!(
        "filled {} with {} bytes, gave {leave} back",
        path.display(),
        len
    );
}
