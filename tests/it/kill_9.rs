//! kill -9 of the daemon mid-write at random moments: many short rounds on a plain image, an AES
//! image and an AES overlay over a raw base, which carry their damage from round to round (the
//! suite's one kill -9 test). Every fsynced byte survives and qemu-img check finds no corruption.
//! `scripts/crash.sh ROUNDS` runs it with more rounds (`QCOWFS_CRASH_ROUNDS`, and
//! `QCOWFS_CRASH_SEED` for another sequence).
//!
//! Every external command and every FUSE access is bounded in time; every mount is cleaned up
//! whatever the outcome.

use crate::common;

use common::*;
use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long one batch of I/O through a mount may take before the test fails instead of hanging.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a `--foreground` mount may take to appear, and a killed writer to notice.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);

const PASS: &str = "faults secret";

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
