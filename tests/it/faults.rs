//! Faults around a live mount: kill -9 of the daemon mid-write at random moments (many short rounds
//! on a plain image, an AES image and an AES overlay over a raw base, which carry their damage from
//! round to round; the suite's one kill -9 test), a host file system that fills up during a flush,
//! backing files that vanish or shrink while mounted, read-only and missing image files, a 4 GiB
//! write burst under a small cache (the daemon's RSS is sampled), and tables that point into
//! metadata. qemu-img is the oracle throughout: `check` for consistency, `convert`/`compare` for
//! contents.
//!
//! Every external command and every FUSE access is bounded in time; every mount is cleaned up
//! whatever the outcome. `scripts/crash.sh ROUNDS` runs the kill -9 test with more rounds
//! (`QCOWFS_CRASH_ROUNDS`, and `QCOWFS_CRASH_SEED` for another sequence).

use crate::common;

use common::*;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long one batch of I/O through a mount may take before the test fails instead of hanging.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a `--foreground` mount may take to appear, and a killed writer to notice.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);

/// "Within a few seconds" for refusals.
const REFUSAL_LIMIT: Duration = Duration::from_secs(10);

const PASS: &str = "faults secret";

// qcow2 header fields and entry bits (big endian).
const H_L1_SIZE: u64 = 36;
const H_L1_TABLE_OFFSET: u64 = 40;
const H_REFCOUNT_TABLE_OFFSET: u64 = 48;
const ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const ENTRY_COPIED: u64 = 1 << 63;

// --- kill -9 rounds ------------------------------------------------------------------------------

/// Default number of kill -9 rounds in the suite (a dozen per image); `QCOWFS_CRASH_ROUNDS`
/// overrides it.
const CRASH_ROUNDS: usize = 36;

/// What the writer of a crash round did: every write it started (recorded before it was
/// issued), how many completed, how many the last completed fsync covers, whether it was inside
/// an fsync, and the error that stopped it.
#[derive(Default)]
struct CrashLog {
    started: Mutex<Vec<GuestWrite>>,
    completed: AtomicUsize,
    synced: AtomicUsize,
    in_fsync: AtomicBool,
    stop: AtomicBool,
    error: Mutex<Option<String>>,
}

/// Writes through `disk` until told to stop or until a write or fsync fails (the daemon died),
/// with an fsync (or fdatasync) after every `every` writes.
fn crash_writer(disk: &Path, size: u64, seed: u64, every: usize, guest_like: bool, log: &CrashLog) {
    let fail = |what: String| *log.error.lock().unwrap() = Some(what);
    let d = match OpenOptions::new().read(true).write(true).open(disk) {
        Ok(d) => d,
        Err(e) => return fail(format!("open {}: {e}", disk.display())),
    };
    let mut rng = Rng::new(seed);
    let mut done = 0usize;
    while !log.stop.load(Ordering::SeqCst) {
        let w = GuestWrite::random(&mut rng, size, guest_like);
        log.started.lock().unwrap().push(w);
        if let Err(e) = d.write_all_at(&w.data(), w.off) {
            return fail(format!("write #{done} ({} bytes at {}): {e}", w.len, w.off));
        }
        done += 1;
        log.completed.store(done, Ordering::SeqCst);
        if done % every == 0 {
            log.in_fsync.store(true, Ordering::SeqCst);
            let r = if rng.below(4) == 0 {
                d.sync_data()
            } else {
                d.sync_all()
            };
            log.in_fsync.store(false, Ordering::SeqCst);
            if let Err(e) = r {
                return fail(format!("fsync after write #{done}: {e}"));
            }
            log.synced.store(done, Ordering::SeqCst);
        }
    }
}

/// One image the crash rounds take turns on, with what mounting it needs.
struct CrashImage {
    label: &'static str,
    image: Image,
    /// How to make it again, empty, after a failed round (so one failure is counted once).
    fresh: Qcow2Builder,
    options: Vec<OsString>,
    guest_like: bool,
    /// What qemu reads from it now.
    contents: Vec<u8>,
    /// The raw backing file and its bytes, which no round may change.
    base: Option<(PathBuf, Vec<u8>)>,
}

/// The workloads: a plain image with small clusters, an AES image with qemu's default clusters,
/// and the nova case, an AES overlay with small clusters (much metadata) over a raw base.
fn crash_images(dir: &Path) -> Vec<CrashImage> {
    let size = 32 * MIB;
    let key = passphrase_file(dir, "passphrase", PASS);
    let key_opts: Vec<OsString> = vec!["--passphrase-file".into(), key.into()];

    let plain_new = qcow2(dir.join("plain-4k.qcow2"), size).cluster_size(4 * KIB);
    let plain = plain_new.clone().create();
    plain.scatter_random(size, 10, 200_000, 700);
    let aes_new = qcow2(dir.join("aes-64k.qcow2"), size)
        .aes(PASS)
        .cluster_size(64 * KIB);
    let aes = aes_new.clone().create();
    aes.scatter_random(size, 10, 200_000, 701);
    let base_bytes = compressible_bytes(size as usize, 170);
    let base = raw_from_bytes(dir.join("base.raw"), &base_bytes);
    let overlay_new = qcow2(dir.join("aes-4k-overlay.qcow2"), size)
        .aes(PASS)
        .cluster_size(4 * KIB)
        .backing_named(&base, "base.raw");
    let overlay = overlay_new.clone().create();
    vec![
        CrashImage {
            label: "plain, 4 KiB clusters",
            contents: plain.raw(),
            image: plain,
            fresh: plain_new,
            options: vec![],
            guest_like: false,
            base: None,
        },
        CrashImage {
            label: "AES, 64 KiB clusters",
            contents: aes.raw(),
            image: aes,
            fresh: aes_new,
            // Recreated fresh after a failed round, it holds no data to check its key against.
            options: [key_opts.clone(), vec!["--unverified-key".into()]].concat(),
            guest_like: true,
            base: None,
        },
        CrashImage {
            label: "AES overlay, 4 KiB clusters, over a raw base",
            contents: overlay.raw(),
            image: overlay,
            fresh: overlay_new,
            // A fresh overlay holds no data to check its key against (tests/it/key_discipline.rs).
            options: [key_opts, vec!["--unverified-key".into()]].concat(),
            guest_like: true,
            base: Some((base.path.clone(), base_bytes)),
        },
    ]
}

/// When a crash round kills the daemon.
#[derive(Clone, Copy, Debug)]
enum KillMoment {
    /// This long after the writer started, whatever it is doing (inside an fsync or not).
    After(Duration),
    /// Once this many writes completed: well after the first fsync, so there is a synced state
    /// to keep.
    AfterWrites(usize),
}

/// What a surviving round did, for the log.
struct RoundStats {
    started: usize,
    completed: usize,
    synced: usize,
    in_fsync: bool,
    leaks: u64,
}

/// A serving qcowfs that a crash round can kill -9: a `--foreground` child, or a daemonized
/// mount killed through its pid.
enum Victim {
    Foreground(ForegroundMount),
    Daemon(Mount, u32),
}

impl Victim {
    fn start(image: &Path, options: &[OsString], daemonized: bool) -> Victim {
        if daemonized {
            let mount = Mount::new(image, options);
            let pid = mount
                .daemon_pid()
                .expect("the daemon of a fresh mount is in /proc");
            Victim::Daemon(mount, pid)
        } else {
            Victim::Foreground(ForegroundMount::start(image, options))
        }
    }

    fn disk(&self) -> PathBuf {
        match self {
            Victim::Foreground(fg) => fg.disk(),
            Victim::Daemon(m, _) => m.disk(),
        }
    }

    /// SIGKILL; returns once the process is dead.
    fn kill(&mut self) {
        match self {
            Victim::Foreground(fg) => fg.kill(),
            Victim::Daemon(_, pid) => {
                let pid = *pid;
                eprintln!("$ kill -9 {pid}");
                // SAFETY: plain kill(2) of the daemon's pid.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
                let start = Instant::now();
                while !process_gone(pid) {
                    assert!(
                        start.elapsed() < MOUNT_TIMEOUT,
                        "daemon {pid} still alive {MOUNT_TIMEOUT:?} after SIGKILL"
                    );
                    thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }

    /// Clears the dead mount once nothing has the disk open: `qcowfs umount` for a daemonized
    /// mount (falling back to a lazy unmount), a lazy unmount for a foreground one.
    fn detach(self) {
        match self {
            Victim::Foreground(fg) => drop(fg),
            Victim::Daemon(mount, _) => {
                let mountpoint = mount.mountpoint().to_path_buf();
                let r = qcowfs(["umount".as_ref(), mountpoint.as_os_str()]);
                if r.status.success() && !is_mounted(&mountpoint) {
                    // Nothing left for the guard to do but remove its folder.
                    std::mem::forget(mount);
                    if let Some(folder) = mountpoint.parent() {
                        let _ = fs::remove_dir_all(folder);
                    }
                } else {
                    eprintln!(
                        "qcowfs umount of the dead mount: {}: {}",
                        describe_status(r.status),
                        r.stderr.trim()
                    );
                    drop(mount);
                    lazy_unmount(&mountpoint);
                }
            }
        }
    }
}

/// One round: mount, write with fsyncs, SIGKILL at a moment timed or counted in writes (`by_count`),
/// clean the dead mount, then `qemu-img check` (leaks allowed, nothing else), every byte the last
/// completed fsync covers must read back and the base must be unchanged. Updates
/// `target.contents` to what qemu reads afterwards.
fn crash_round(
    target: &mut CrashImage,
    rng: &mut Rng,
    daemonized: bool,
    by_count: bool,
) -> Result<RoundStats, String> {
    let size = target.image.size;
    let mut victim = Victim::start(&target.image.path, &target.options, daemonized);
    let log = Arc::new(CrashLog::default());
    let every = rng.range(2, 16) as usize;
    let moment = if by_count {
        KillMoment::AfterWrites(rng.range(40, 200) as usize)
    } else {
        KillMoment::After(Duration::from_millis(rng.range(20, 600)))
    };
    let (done_tx, done_rx) = mpsc::channel();
    {
        let (log, disk, seed, guest_like) = (
            log.clone(),
            victim.disk(),
            rng.next_u64(),
            target.guest_like,
        );
        thread::spawn(move || {
            crash_writer(&disk, size, seed, every, guest_like, &log);
            let _ = done_tx.send(());
        });
    }
    let start = Instant::now();
    let mut writer_done = false;
    loop {
        if done_rx.try_recv().is_ok() {
            writer_done = true;
            break;
        }
        match moment {
            KillMoment::After(after) if start.elapsed() >= after => break,
            KillMoment::AfterWrites(n) if log.completed.load(Ordering::SeqCst) >= n => break,
            KillMoment::AfterWrites(n) => assert!(
                start.elapsed() < IO_TIMEOUT,
                "the writer made no progress: {} of {n} writes within {IO_TIMEOUT:?}",
                log.completed.load(Ordering::SeqCst)
            ),
            KillMoment::After(_) => {}
        }
        thread::sleep(Duration::from_millis(1));
    }
    let in_fsync = log.in_fsync.load(Ordering::SeqCst);
    victim.kill();
    log.stop.store(true, Ordering::SeqCst);
    if !writer_done {
        done_rx.recv_timeout(MOUNT_TIMEOUT).unwrap_or_else(|_| {
            panic!("the writer hangs {MOUNT_TIMEOUT:?} after kill -9 of the daemon")
        });
    }
    victim.detach();
    if writer_done {
        let error = log.error.lock().unwrap().clone();
        return Err(format!(
            "a write or fsync failed before the kill (the daemon was alive): {}",
            error.unwrap_or_else(|| "unknown error".into())
        ));
    }

    let started = log.started.lock().unwrap().clone();
    let completed = log.completed.load(Ordering::SeqCst);
    let synced = log.synced.load(Ordering::SeqCst);
    if let KillMoment::AfterWrites(n) = moment {
        if completed < n || synced == 0 {
            return Err(format!(
                "killed after {completed} completed writes ({synced} fsynced), expected at least \
                 {n} and one fsync"
            ));
        }
    }

    // No corruption; leaked clusters (exit 3) are allowed after a crash.
    let leaks = qemu_check(&target.image, &[], Leaks::Allowed, "after kill -9")?;

    // Every byte of a write the last fsync covers, and not touched by any later write, reads back;
    // so does every byte no write of this round touched.
    let mut expected = target.contents.clone();
    for w in &started[..synced] {
        expected[w.off as usize..w.end() as usize].copy_from_slice(&w.data());
    }
    let uncertain = merged_ranges(started[synced..].iter().map(|w| (w.off, w.end())));
    let after = target.image.raw();
    let mut pos = 0u64;
    for (lo, hi) in uncertain.iter().copied().chain([(size, size)]) {
        let (a, b) = (pos as usize, lo as usize);
        if let Some(at) = first_difference(&after[a..b], &expected[a..b]) {
            let at = pos + at as u64;
            let last = started[..synced]
                .iter()
                .rposition(|w| w.off <= at && at < w.end());
            return Err(format!(
                "byte {at} differs from the fsynced state after kill -9 (last fsynced write \
                 covering it: {last:?}; {synced} writes fsynced, {completed} completed, {} \
                 started); qemu reads {:#04x}, expected {:#04x}",
                started.len(),
                after[at as usize],
                expected[at as usize]
            ));
        }
        pos = hi;
    }
    target.contents = after;
    if let Some((path, bytes)) = &target.base {
        let now = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if let Some(at) = first_difference(&now, bytes) {
            return Err(format!(
                "the base {} changed at byte {at} (the overlay's writes must never reach it)",
                path.display()
            ));
        }
    }
    Ok(RoundStats {
        started: started.len(),
        completed,
        synced,
        in_fsync,
        leaks,
    })
}

#[test]
fn kill_9_at_random_moments_in_many_rounds_never_corrupts_and_keeps_every_fsynced_byte() {
    require_fuse();
    let rounds: usize = std::env::var("QCOWFS_CRASH_ROUNDS")
        .ok()
        .map(|s| s.parse().expect("QCOWFS_CRASH_ROUNDS is a number"))
        .unwrap_or(CRASH_ROUNDS);
    let seed: u64 = std::env::var("QCOWFS_CRASH_SEED")
        .ok()
        .map(|s| s.parse().expect("QCOWFS_CRASH_SEED is a number"))
        .unwrap_or(9);
    let dir = workdir();
    let mut targets = crash_images(dir.path());
    let mut rng = Rng::new(seed);
    let mut failures = Vec::new();
    let mut killed_in_fsync = 0;
    let start = Instant::now();
    for round in 0..rounds {
        let which = round % targets.len();
        let turn = round / targets.len();
        // Every third turn of an image kills a daemonized mount by its pid, the others a
        // --foreground child; every other turn kills after a number of writes, not a time.
        let daemonized = turn % 3 == 2;
        let by_count = turn % 2 == 1;
        let target = &mut targets[which];
        match crash_round(target, &mut rng, daemonized, by_count) {
            Ok(s) => {
                killed_in_fsync += usize::from(s.in_fsync);
                eprintln!(
                    "round {round} ({}, {}, {}): {} writes started, {} completed, {} fsynced; \
                     killed {}; {} leaked clusters so far",
                    target.label,
                    if daemonized { "daemon" } else { "foreground" },
                    if by_count { "by count" } else { "timed" },
                    s.started,
                    s.completed,
                    s.synced,
                    if s.in_fsync {
                        "inside an fsync"
                    } else {
                        "between fsyncs"
                    },
                    s.leaks
                );
            }
            Err(e) => {
                let line = format!("round {round} ({}): {e}", target.label);
                eprintln!("FAILED {line}");
                failures.push(line);
                // Start the next rounds on this image afresh, so one failure is counted once.
                fs::remove_file(&target.image.path).expect("remove the damaged image");
                let fresh = target.fresh.clone().create();
                target.contents = fresh.raw();
                target.image = fresh;
            }
        }
    }
    let survived = rounds - failures.len();
    eprintln!(
        "kill -9 rounds survived: {survived}/{rounds} ({killed_in_fsync} killed inside an fsync; \
         seed {seed}; {:.1} s)",
        start.elapsed().as_secs_f64()
    );
    // Leaks are all a crash may leave, and qemu can reclaim them.
    for t in &targets {
        repair_leaks_then_assert_clean(&t.image, t.label);
    }
    assert!(
        failures.is_empty(),
        "{} of {rounds} kill -9 rounds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// --- host file system full ------------------------------------------------------------------------

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
    // umount refuses to lose the data: exit 1, still mounted, daemon alive.
    let um = qcowfs(["umount".as_ref(), mount.mountpoint().as_os_str()]);
    assert_eq!(
        um.status.code(),
        Some(1),
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

// --- backing file trouble -----------------------------------------------------------------------

/// A raw base of 16 MiB random bytes and an overlay (64 KiB clusters) with some data of its own.
fn overlay_over_raw_base(dir: &Path, seed: u64) -> (Image, Image) {
    let size = 16 * MIB;
    let base = raw_from_bytes(dir.join("base.raw"), &random_bytes(size as usize, seed));
    let top = qcow2(dir.join("top.qcow2"), size)
        .backing_named(&base, "base.raw")
        .create();
    top.scatter_random(size, 12, 150_000, seed + 1);
    (base, top)
}

#[test]
fn deleting_the_backing_file_while_mounted_keeps_reads_and_cow_writes_right_and_umount_clean() {
    let dir = workdir();
    let (base, top) = overlay_over_raw_base(dir.path(), 1000);
    let mut expected = top.raw();
    let base_bytes = fs::read(&base.path).expect("read base");

    let mount = Mount::new(&top.path, &[] as &[&str]);
    let pid = mount.daemon_pid().expect("daemon pid");
    fs::remove_file(&base.path).expect("delete the backing file");

    let disk = mount.disk();
    let whole = within(
        IO_TIMEOUT,
        "reading after the base was deleted",
        move || fs::read(&disk),
    );
    // The daemon holds the base open: deleting its name changes nothing it reads.
    let bytes = whole.unwrap_or_else(|e| panic!("read after the backing file was deleted: {e}"));
    assert_same_bytes(&bytes, &expected, "disk after its backing file was deleted");
    // A copy-on-write from the (deleted, still open) base.
    let (off, data) = (5 * MIB + 333, random_bytes(200_000, 1002));
    let disk = mount.disk();
    let payload = data.clone();
    let wrote = within(
        IO_TIMEOUT,
        "COW write after the base was deleted",
        move || {
            let d = OpenOptions::new().write(true).open(&disk)?;
            d.write_all_at(&payload, off)?;
            d.sync_all()
        },
    );
    wrote.unwrap_or_else(|e| panic!("COW write after the base was deleted: {e}"));
    expected[off as usize..off as usize + data.len()].copy_from_slice(&data);
    assert!(!process_gone(pid), "the daemon died");
    mount.umount();

    fs::write(&base.path, &base_bytes).expect("restore the base");
    let reference = raw_from_bytes(dir.path().join("expected.raw"), &expected);
    assert_same_guest_contents(&top, &reference.path);
    assert_check_clean(&top);
}

#[test]
fn truncating_the_backing_file_while_mounted_reads_the_lost_range_as_zeros() {
    let dir = workdir();
    let (base, top) = overlay_over_raw_base(dir.path(), 1100);
    let before = top.raw();

    let mount = Mount::new(&top.path, &[] as &[&str]);
    let pid = mount.daemon_pid().expect("daemon pid");
    let head = read_at_bounded(&mount.disk(), 0, MIB as usize);
    assert_same_bytes(
        &head,
        &before[..MIB as usize],
        "first MiB before truncation",
    );

    // Cut the base mid-cluster: 4 MiB + 1000 bytes stay.
    let kept = 4 * MIB + 1000;
    truncate_file(&base.path, kept);
    // What qemu reads now (zeros past the base's end), taken while qcowfs holds the image.
    let now = qemu_raw_shared(&top, dir.path());
    assert_same_bytes(
        &now[..kept as usize],
        &before[..kept as usize],
        "qemu before the cut",
    );

    let disk = mount.disk();
    let results = within(
        IO_TIMEOUT,
        "reading after the base was truncated",
        move || {
            let f = File::open(&disk).expect("open disk");
            (0..16u64)
                .map(|i| {
                    let mut buf = vec![0u8; MIB as usize];
                    f.read_exact_at(&mut buf, i * MIB).map(|()| buf)
                })
                .collect::<Vec<io::Result<Vec<u8>>>>()
        },
    );
    // Past the base's new end qcowfs reads zeros, as qemu does.
    for (i, r) in results.into_iter().enumerate() {
        let range = i * MIB as usize..(i + 1) * MIB as usize;
        let bytes = r.unwrap_or_else(|e| {
            panic!("read of MiB {i} after the base was cut to {kept} bytes: {e}")
        });
        assert_same_bytes(
            &bytes,
            &now[range],
            &format!("MiB {i} after the base was cut to {kept} bytes (vs qemu)"),
        );
    }

    // A copy-on-write inside the lost range.
    let (off, data) = (12 * MIB + 100, random_bytes(8192, 1102));
    let (disk, payload) = (mount.disk(), data.clone());
    let wrote = within(IO_TIMEOUT, "COW write into the lost range", move || {
        let d = OpenOptions::new().write(true).open(&disk)?;
        d.write_all_at(&payload, off)?;
        d.sync_all()
    });
    let mut expected = now;
    wrote.unwrap_or_else(|e| panic!("COW write into the lost range: {e}"));
    expected[off as usize..off as usize + data.len()].copy_from_slice(&data);
    assert!(!process_gone(pid), "the daemon died");
    mount.umount();

    let reference = raw_from_bytes(dir.path().join("expected.raw"), &expected);
    assert_same_guest_contents(&top, &reference.path);
    assert_check_clean(&top);
}

#[test]
fn an_image_on_a_read_only_file_system_is_refused_read_write_in_one_line_and_mounts_read_only() {
    let dir = workdir();
    let ro_dir = dir.path().join("ro");
    fs::create_dir(&ro_dir).expect("mkdir ro");
    let ro = Tmpfs::mount(&ro_dir, "16m");
    let img = qcow2(ro.path().join("sealed.qcow2"), 8 * MIB).create();
    img.write_random(100_000, 500_000, 1200);
    let expected = img.raw();
    run_ok(
        "mount",
        ["-o".as_ref(), "remount,ro".as_ref(), ro.path().as_os_str()],
    );

    let r = mount_failure(&img.path, &[] as &[&str], None);
    assert_one_line_error(&r, &[file_name(&img.path)], REFUSAL_LIMIT);
    let mount = Mount::new(&img.path, &["--read-only"]);
    let actual = read_all_bounded(&mount.disk());
    assert_same_bytes(
        &actual,
        &expected,
        "read-only mount of an image on a read-only fs",
    );
    mount.umount();
    drop(ro);
}

#[test]
fn a_mode_0444_image_file_is_refused_read_write_in_one_line_for_its_owner_and_mounts_read_only() {
    let dir = workdir();
    let img = qcow2(dir.path().join("readonly.qcow2"), 8 * MIB).create();
    img.write_random(70_000, 300_000, 1300);
    let expected = img.raw();
    fs::set_permissions(&img.path, fs::Permissions::from_mode(0o444)).expect("chmod 0444");

    // SAFETY: geteuid(2) cannot fail and has no side effects.
    if unsafe { libc::geteuid() } != 0 {
        let r = mount_failure(&img.path, &[] as &[&str], None);
        assert_one_line_error(&r, &[file_name(&img.path)], REFUSAL_LIMIT);
    } else if !tool_exists("setpriv") {
        panic!(
            "cannot test the read-write refusal of a mode 0444 file: running as root (which \
             ignores file modes) and setpriv is missing (install util-linux; scripts/test.sh does)"
        );
    } else {
        // Root ignores modes: ask as nobody, from a folder nobody can enter, with a copy of the
        // binary nobody can run.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod dir");
        let bin = dir.path().join("qcowfs");
        fs::copy(qcowfs_bin(), &bin).expect("copy binary");
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).expect("chmod binary");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).expect("mkdir mnt");
        fs::set_permissions(&mnt, fs::Permissions::from_mode(0o777)).expect("chmod mnt");
        let r = run_with(
            as_nobody(&bin)
                .arg("mount")
                .arg(&img.path)
                .arg(&mnt)
                .current_dir("/"),
            None,
            COMMAND_TIMEOUT,
        );
        let mounted = is_mounted(&mnt);
        if mounted {
            lazy_unmount(&mnt);
        }
        assert!(
            !mounted,
            "a read-write mount of a 0444 file by nobody succeeded"
        );
        assert_one_line_error(&r, &[file_name(&img.path)], REFUSAL_LIMIT);
        assert!(
            r.stderr.contains("ermission"),
            "the refusal does not say the permission is missing: {:?}",
            r.stderr
        );
        // nobody can open it for reading: `info` works.
        let info = run_with(
            as_nobody(&bin).arg("info").arg(&img.path).current_dir("/"),
            None,
            COMMAND_TIMEOUT,
        );
        info.assert_success();
    }
    // And --read-only serves it (as the test's own user).
    let mount = Mount::new(&img.path, &["--read-only"]);
    let actual = read_all_bounded(&mount.disk());
    assert_same_bytes(&actual, &expected, "read-only mount of a 0444 image");
    mount.umount();
}

#[test]
fn a_missing_backing_file_deep_in_the_chain_is_a_one_line_error_naming_its_path() {
    let dir = workdir();
    let sub = dir.path().join("sub");
    fs::create_dir(&sub).expect("mkdir sub");
    let base = create_raw(sub.join("base.raw"), 8 * MIB);
    let mid = qcow2(sub.join("mid.qcow2"), 8 * MIB)
        .backing_named(&base, "base.raw")
        .create();
    let top = qcow2(dir.path().join("top.qcow2"), 8 * MIB)
        .backing_named(&mid, "sub/mid.qcow2")
        .create();
    fs::remove_file(&base.path).expect("remove base");
    let missing = base.path.to_str().expect("UTF-8 path");
    for options in [&[][..], &["--read-only"][..]] {
        let r = mount_failure(&top.path, options, None);
        assert_one_line_error(&r, &[missing], REFUSAL_LIMIT);
    }

    // Named by an absolute path into a folder that does not exist.
    let nowhere = dir.path().join("nowhere").join("base.qcow2");
    let lost = qcow2(dir.path().join("lost.qcow2"), 8 * MIB)
        .backing_named(&mid, nowhere.to_str().expect("UTF-8 path"))
        .create();
    for options in [&[][..], &["--read-only"][..]] {
        let r = mount_failure(&lost.path, options, None);
        assert_one_line_error(&r, &[nowhere.to_str().unwrap()], REFUSAL_LIMIT);
    }
}

// --- memory bound ---------------------------------------------------------------------------------

/// The 4 GiB burst's pattern for MiB `i`: `base` with every 4 KiB block stamped with its number.
fn burst_chunk(base: &[u8], i: u64) -> Vec<u8> {
    let mut chunk = base.to_vec();
    for (b, block) in chunk.chunks_mut(4096).enumerate() {
        block[..8].copy_from_slice(&(i * 256 + b as u64).to_le_bytes());
    }
    chunk
}

/// VmRSS of `pid` in bytes, if it is still running.
fn vm_rss(pid: u32) -> Option<u64> {
    proc_status_bytes(pid, "VmRSS:")
}

#[test]
fn a_4_gib_write_burst_with_a_64m_cache_keeps_the_daemon_under_96_mib_rss() {
    let dir = workdir();
    let size = 4 * GIB;
    let img = qcow2(dir.path().join("burst.qcow2"), size).create();
    let mount = Mount::new(&img.path, &["--cache-size", "64M"]);
    let pid = mount.daemon_pid().expect("daemon pid");

    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        thread::spawn(move || {
            let mut samples = 0u64;
            while !stop.load(Ordering::SeqCst) {
                if let Some(rss) = vm_rss(pid) {
                    peak.fetch_max(rss, Ordering::SeqCst);
                    samples += 1;
                }
                thread::sleep(Duration::from_millis(100));
            }
            samples
        })
    };
    let base = random_bytes(MIB as usize, 1400);
    let disk = mount.disk();
    let started = Instant::now();
    let chunk_base = base.clone();
    within(
        Duration::from_secs(600),
        "4 GiB of sequential writes",
        move || {
            let d = OpenOptions::new()
                .write(true)
                .open(&disk)
                .unwrap_or_else(|e| panic!("open {}: {e}", disk.display()));
            for i in 0..size / MIB {
                d.write_all_at(&burst_chunk(&chunk_base, i), i * MIB)
                    .unwrap_or_else(|e| panic!("write of MiB {i}: {e}"));
            }
            d.sync_all().expect("fsync after 4 GiB");
        },
    );
    let elapsed = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let samples = sampler.join().expect("sampler thread");
    let peak = peak.load(Ordering::SeqCst);
    // The kernel's own high-water mark, for the record (it also sees peaks between samples).
    let hwm = proc_status_bytes(pid, "VmHWM:").unwrap_or(0);
    eprintln!(
        "4 GiB burst: {:.1} s ({:.0} MiB/s); daemon peak VmRSS {:.1} MiB over {samples} samples \
         (VmHWM {:.1} MiB)",
        elapsed.as_secs_f64(),
        4096.0 / elapsed.as_secs_f64(),
        peak as f64 / MIB as f64,
        hwm as f64 / MIB as f64
    );
    assert!(samples > 0, "no VmRSS sample of the daemon (pid {pid})");
    assert!(
        peak < 96 * MIB,
        "the daemon's VmRSS peaked at {:.1} MiB (VmHWM {:.1} MiB) during a 4 GiB burst with \
         --cache-size 64M (limit: cache + 32 MiB = 96 MiB)",
        peak as f64 / MIB as f64,
        hwm as f64 / MIB as f64
    );
    mount.umount();

    assert_check_clean(&img);
    for i in [0u64, 1, 777, 2047, 2048, 3333, 4095] {
        let got = qemu_range(&img.path, i * MIB, MIB);
        assert_same_bytes(
            &got,
            &burst_chunk(&base, i),
            &format!("MiB {i} of the burst (qemu)"),
        );
    }
}

// --- metadata pointed at by tables ---------------------------------------------------------------

/// A 16 MiB image with 64 KiB clusters and data in [0, 4 MiB) and [8, 10 MiB); returns it and the
/// offsets of its L1 table and of the L2 table L1[0] points to.
fn image_with_tables(dir: &Path, name: &str, seed: u64) -> (Image, u64, u64) {
    let img = qcow2(dir.join(name), 16 * MIB).create();
    img.write_random(0, 4 * MIB as usize, seed);
    img.write_random(8 * MIB, 2 * MIB as usize, seed + 1);
    let l1 = read_be_u64(&img.path, H_L1_TABLE_OFFSET);
    let l2 = read_be_u64(&img.path, l1) & ENTRY_OFFSET_MASK;
    assert_ne!(l2, 0, "L1[0] of {} has no L2 table", img.path.display());
    (img, l1, l2)
}

/// Points the L2 entry of guest cluster `cluster` at host offset `host` (COPIED, like a cluster
/// the image owns alone), and checks with `qemu-img map` that qemu sees it so.
fn point_data_cluster_at(img: &Image, l2: u64, cluster: u64, host: u64) {
    patch_be_u64(&img.path, l2 + cluster * 8, ENTRY_COPIED | host);
    let mapped = qemu_map(img).iter().any(|e| {
        e["start"].as_u64() == Some(cluster * 64 * KIB) && e["offset"].as_u64() == Some(host)
    });
    assert!(
        mapped,
        "qemu-img map does not show guest cluster {cluster} at host {host:#x} after the patch"
    );
}

#[test]
fn a_read_only_mount_serves_the_rest_of_an_image_whose_l2_entry_points_at_the_l1_table_and_eio_there(
) {
    let dir = workdir();
    let (img, l1, l2) = image_with_tables(dir.path(), "l2-at-l1.qcow2", 1500);
    let original = img.raw();
    let cs = 64 * KIB as usize;
    let bad = 3usize;
    point_data_cluster_at(&img, l2, bad as u64, l1);
    // qemu's own reading of the undamaged range is unchanged.
    let patched = img.raw();
    assert_same_bytes(
        &patched[..bad * cs],
        &original[..bad * cs],
        "qemu before cluster 3",
    );
    assert_same_bytes(
        &patched[(bad + 1) * cs..],
        &original[(bad + 1) * cs..],
        "qemu after cluster 3",
    );

    let mount = Mount::new(&img.path, &["--read-only"]);
    let disk = mount.disk();
    let (before, after, damaged) = within(IO_TIMEOUT, "reads of a damaged image", move || {
        let f = File::open(&disk).expect("open disk");
        let mut damaged = vec![0u8; cs];
        let damaged = f
            .read_exact_at(&mut damaged, (bad * cs) as u64)
            .map(|()| damaged);
        let mut before = vec![0u8; bad * cs];
        let before = f.read_exact_at(&mut before, 0).map(|()| before);
        let mut after = vec![0u8; 16 * MIB as usize - (bad + 1) * cs];
        let after = f
            .read_exact_at(&mut after, ((bad + 1) * cs) as u64)
            .map(|()| after);
        (before, after, damaged)
    });
    assert_same_bytes(
        &before.expect("read before the damaged cluster"),
        &original[..bad * cs],
        "read-only mount before the damaged cluster",
    );
    assert_same_bytes(
        &after.expect("read after the damaged cluster"),
        &original[(bad + 1) * cs..],
        "read-only mount after the damaged cluster",
    );
    match damaged {
        Ok(bytes) => panic!(
            "reading guest cluster {bad}, whose L2 entry points at the L1 table ({l1:#x}), \
             succeeded (first bytes {:02x?}); expected EIO",
            &bytes[..16]
        ),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "damaged cluster: {e}"),
    }
    mount.umount();
}

#[test]
fn a_write_to_a_cluster_whose_l2_entry_points_at_the_l1_table_never_overwrites_the_l1_table() {
    let dir = workdir();
    let (img, l1, l2) = image_with_tables(dir.path(), "write-at-l1.qcow2", 1600);
    let bad = 3u64;
    point_data_cluster_at(&img, l2, bad, l1);
    let l1_len = u64::from(read_be_u32(&img.path, H_L1_SIZE)) * 8;
    let l1_before = read_range(&img.path, l1, l1_len);

    // The mount succeeds (the damage is in one L2 entry, found when it is used); the write there
    // fails with EIO, and the data it could not write keeps the mount (the guard forces it away).
    let mount = Mount::new(&img.path, &[] as &[&str]);
    let disk = mount.disk();
    let result = within(IO_TIMEOUT, "write over the damaged cluster", move || {
        let d = OpenOptions::new().write(true).open(&disk)?;
        d.write_all_at(&[0x22u8; 64 * 1024], bad * 64 * KIB)?;
        d.sync_all()
    });
    match result {
        Ok(()) => panic!("a write over a data cluster that points at the L1 table succeeded"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "write failed with {e}"),
    }
    drop(mount);
    assert_eq!(
        read_range(&img.path, l1, l1_len),
        l1_before,
        "the L1 table at {l1:#x} was overwritten through a data cluster that points at it"
    );
}

#[test]
fn a_read_write_mount_is_refused_when_an_l1_entry_points_an_l2_table_at_the_refcount_table() {
    let dir = workdir();
    let (img, l1, _) = image_with_tables(dir.path(), "l2-at-refcounts.qcow2", 1700);
    let refcount_table = read_be_u64(&img.path, H_REFCOUNT_TABLE_OFFSET);
    patch_be_u64(&img.path, l1, ENTRY_COPIED | refcount_table);
    let before = fs::read(&img.path).expect("read image");

    let r = mount_failure(&img.path, &[] as &[&str], None);
    assert_one_line_error(&r, &[file_name(&img.path)], REFUSAL_LIMIT);
    assert!(
        fs::read(&img.path).expect("read image") == before,
        "a refused mount changed the image"
    );
    // Read-only, the table's "entries" (refcount block offsets) point into metadata: EIO, and the
    // daemon lives on.
    let mount = Mount::new(&img.path, &["--read-only"]);
    let disk = mount.disk();
    let first = within(IO_TIMEOUT, "read through the bogus L2 table", move || {
        let f = File::open(&disk).expect("open disk");
        let mut buf = vec![0u8; 4096];
        f.read_exact_at(&mut buf, 0).map(|()| buf)
    });
    match first {
        Ok(bytes) => panic!(
            "guest cluster 0, mapped by an L2 table that is the refcount table, read as data \
             (first bytes {:02x?}); expected EIO",
            &bytes[..16]
        ),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}"),
    }
    mount.umount();
}

// --- private helpers -------------------------------------------------------------------------------

/// A tmpfs of `size` mounted on `path` (as small as tests need); unmounted (lazily if it must)
/// when dropped.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Tmpfs {
        run_ok(
            "mount",
            [
                "-t".as_ref(),
                "tmpfs".as_ref(),
                "-o".as_ref(),
                OsStr::new(&format!("size={size},mode=0755")),
                "tmpfs".as_ref(),
                path.as_os_str(),
            ],
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let bounded = Duration::from_secs(20);
        let _ = run_with(Command::new("umount").arg(&self.path), None, bounded);
        if is_mounted(&self.path) {
            let _ = run_with(
                Command::new("umount").arg("-l").arg(&self.path),
                None,
                bounded,
            );
        }
    }
}

/// Whether process `pid` has exited (gone, or a zombie nobody reaped yet).
fn process_gone(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

fn tool_exists(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `setpriv` that runs `bin` as nobody:nogroup without supplementary groups.
fn as_nobody(bin: &Path) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin)
        .env_remove("XDG_RUNTIME_DIR");
    c
}

/// Sorted, merged `[lo, hi)` ranges.
fn merged_ranges(ranges: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ranges.collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (lo, hi) in v {
        match out.last_mut() {
            Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// `len` bytes of the image file at `off`.
fn read_range(path: &Path, off: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    File::open(path)
        .expect("open image")
        .read_exact_at(&mut buf, off)
        .expect("read image file");
    buf
}

/// `qemu-img convert -U -O raw` of a plain chain (allowed while qcowfs holds the image), as bytes.
fn qemu_raw_shared(image: &Image, dir: &Path) -> Vec<u8> {
    let dest = dir.join("shared-view.raw");
    qemu_img([
        "convert".as_ref(),
        "-U".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        image.path.as_os_str(),
        "-O".as_ref(),
        "raw".as_ref(),
        dest.as_os_str(),
    ]);
    let bytes = fs::read(&dest).expect("read converted raw");
    fs::remove_file(&dest).expect("remove converted raw");
    bytes
}

/// `len` bytes of the guest view of a plain qcow2 at `off`, read by qemu (a raw window over the
/// qcow2 driver).
fn qemu_range(image: &Path, off: u64, len: u64) -> Vec<u8> {
    let dest = tempfile::NamedTempFile::new().expect("temp file");
    let spec = format!(
        "driver=raw,offset={off},size={len},file.driver=qcow2,file.file.filename={}",
        image.to_str().expect("UTF-8 path")
    );
    qemu_img([
        "convert".as_ref(),
        "--image-opts".as_ref(),
        OsStr::new(&spec),
        "-O".as_ref(),
        "raw".as_ref(),
        dest.path().as_os_str(),
    ]);
    fs::read(dest.path()).expect("read window")
}

/// `qemu-img compare IMAGE REFERENCE.raw` (plain chains) says identical; on a difference, names the
/// first differing offset.
fn assert_same_guest_contents(image: &Image, reference: &Path) {
    let r = run(
        "qemu-img",
        [
            "compare".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            "raw".as_ref(),
            image.path.as_os_str(),
            reference.as_os_str(),
        ],
    );
    match r.status.code() {
        Some(0) => {}
        Some(1) => {
            let reference_bytes = fs::read(reference).expect("read reference");
            assert_same_bytes(
                &image.raw(),
                &reference_bytes,
                &format!("{} (qemu) vs the raw reference", image.path.display()),
            );
            panic!("qemu-img compare says different: {}", r.stdout_str());
        }
        _ => panic!(
            "qemu-img compare failed ({}): {}\n{}",
            describe_status(r.status),
            r.command,
            r.stderr
        ),
    }
}
