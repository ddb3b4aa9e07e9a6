//! FUSE over io_uring (`--io-uring`): the same requests answered alike on both transports, the
//! result checked against QEMU, and the refusal when the kernel has io_uring off.
//!
//! The kernel switch is global (`/sys/module/fuse/parameters/enable_uring`, root only): these tests
//! set it and put the old value back, one at a time. They need root, as every FUSE test here does
//! in CI; without it they fail, loudly.

use crate::common;

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

use common::*;

const PASS: &str = "uring-pass";
/// Two primaries: 10 MiB at 1 MiB, 20 MiB at 11 MiB.
const TABLE: &str =
    "label: dos\nunit: sectors\n\nstart=2048, size=20480, type=83\nstart=22528, size=40960, type=83\n";
const PART2_START: u64 = 22528 * 512;

/// An AES overlay (data of its own in both partitions and outside them) over a raw base
/// holding an MBR with two partitions.
fn partitioned_image(dir: &Path, name: &str) -> Image {
    let base = create_raw(dir.join(format!("{name}-base.raw")), 64 * MIB);
    sfdisk(&base.path, TABLE);
    let top = qcow2(dir.join(format!("{name}.qcow2")), 64 * MIB)
        .aes(PASS)
        .backing(&base)
        .create();
    top.write_random(3 * MIB + 512, 300 * 1024, 1);
    top.write_random(PART2_START + 4 * MIB, 2 * MIB as usize, 2);
    top.write_random(40 * MIB, 64 * 1024, 3);
    top
}

fn errno_of(r: std::io::Result<impl Sized>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => format!("errno {}", e.raw_os_error().unwrap_or(-1)),
    }
}

/// A libc call's result: "ok", or the errno it set.
fn errno_or_ok(r: i32) -> String {
    if r < 0 {
        format!(
            "errno {}",
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        )
    } else {
        "ok".into()
    }
}

fn seek(f: &File, at: i64, whence: i32) -> String {
    // SAFETY: lseek on an open descriptor; no memory is passed.
    let r = unsafe { libc::lseek(f.as_raw_fd(), at, whence) };
    if r < 0 {
        format!(
            "errno {}",
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        )
    } else {
        r.to_string()
    }
}

/// Every kind of request the file system answers, through the mount at `mnt`; returns what each
/// one answered (which must not depend on the transport) and applies its writes to `expected`.
fn exercise(mnt: &Path, expected: &mut [u8]) -> Vec<String> {
    let mut seen = Vec::new();
    let disk = mnt.join("disk");
    let part2 = mnt.join("disk-part2");
    // LOOKUP, GETATTR, OPENDIR, READDIR.
    let mut names: Vec<String> = fs::read_dir(mnt)
        .expect("readdir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    seen.push(format!("readdir: {names:?}"));
    for p in [&disk, &part2, &mnt.join("disk-part1")] {
        let m = fs::metadata(p).expect("stat");
        seen.push(format!(
            "stat {}: size {} mode {:o} nlink {} blksize {}",
            file_name(p),
            m.len(),
            m.mode(),
            m.nlink(),
            m.blksize()
        ));
    }
    seen.push(format!(
        "lookup missing: {}",
        errno_of(fs::metadata(mnt.join("nope")))
    ));
    // OPEN, READ (buffered and direct), checked against QEMU's bytes.
    assert_same_bytes(
        &read_all_bounded(&disk),
        expected,
        "disk read before writes",
    );
    let direct = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&disk)
        .expect("open O_DIRECT");
    let mut buf = AlignedBuf::new(1 << 20);
    direct
        .read_exact_at(buf.as_mut(), 3 * MIB)
        .expect("direct read");
    assert_same_bytes(
        buf.as_mut(),
        &expected[3 * MIB as usize..4 * MIB as usize],
        "direct 1 MiB read",
    );
    // WRITE through disk (buffered, then FSYNC and FLUSH at close) and through a partition.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .expect("open rw");
    let data = pseudo_random(700 * 1024 + 17, 9);
    let at = 5 * MIB + 3 * KIB;
    f.write_all_at(&data, at).expect("write disk");
    expected[at as usize..at as usize + data.len()].copy_from_slice(&data);
    seen.push(format!("fsync: {}", errno_of(f.sync_all())));
    let p = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&part2)
        .expect("open part2");
    let pdata = pseudo_random(64 * 1024, 10);
    p.write_all_at(&pdata, 4096).expect("write part2");
    let pat = (PART2_START + 4096) as usize;
    expected[pat..pat + pdata.len()].copy_from_slice(&pdata);
    seen.push(format!("fsync part2: {}", errno_of(p.sync_all())));
    drop(p);
    assert_same_bytes(
        &read_at_bounded(&disk, PART2_START + 4096, pdata.len()),
        &pdata,
        "a partition write, read through disk",
    );
    // LSEEK: data and holes (holes of the whole chain: the base is a sparse raw).
    for (off, whence) in [
        (0, libc::SEEK_DATA),
        (0, libc::SEEK_HOLE),
        (40 * MIB as i64, libc::SEEK_HOLE),
        (63 * MIB as i64, libc::SEEK_DATA),
    ] {
        seen.push(format!("lseek {off} {whence}: {}", seek(&f, off, whence)));
    }
    // FALLOCATE: punch a hole, and a preallocation past the end.
    // SAFETY: fallocate on an open descriptor; no memory is passed.
    let punched = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            (40 * MIB) as i64,
            (64 * KIB) as i64,
        )
    };
    seen.push(format!("punch: {}", errno_or_ok(punched)));
    expected[40 * MIB as usize..(40 * MIB + 64 * KIB) as usize].fill(0);
    // SAFETY: as above.
    let grow = unsafe { libc::fallocate(f.as_raw_fd(), 0, (63 * MIB) as i64, (2 * MIB) as i64) };
    seen.push(format!("preallocate past the end: {}", errno_or_ok(grow)));
    // SETATTR: the same size is fine, another is refused.
    seen.push(format!("truncate same: {}", errno_of(f.set_len(64 * MIB))));
    seen.push(format!("truncate other: {}", errno_of(f.set_len(32 * MIB))));
    drop(f);
    // STATFS, and what is not implemented.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let c = std::ffi::CString::new(mnt.as_os_str().as_bytes()).expect("path");
    // SAFETY: a NUL-terminated path and a statvfs to fill.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    seen.push(format!(
        "statfs {}: blocks {} bsize {} namemax {}",
        errno_or_ok(r),
        st.f_blocks,
        st.f_bsize,
        st.f_namemax
    ));
    seen.push(format!(
        "mkdir: {}",
        errno_of(fs::create_dir(mnt.join("d")))
    ));
    seen.push(format!("unlink: {}", errno_of(fs::remove_file(&disk))));
    // Everything reads back as expected, through a fresh open.
    assert_same_bytes(&read_all_bounded(&disk), expected, "disk read after writes");
    seen
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Mount `image` with `--io-uring MODE` (and a log), run `exercise`, unmount; returns the log and
/// what the requests answered.
fn run_transport(
    dir: &Path,
    image: &Image,
    mode: &str,
    expected: &mut [u8],
) -> (String, Vec<String>) {
    let key = passphrase_file(dir, &format!("key-{mode}"), PASS);
    let log = dir.join(format!("log-{mode}"));
    let m = Mount::new(
        &image.path,
        &[
            "-v".as_ref(),
            "--io-uring".as_ref(),
            mode.as_ref(),
            "--passphrase-file".as_ref(),
            key.as_os_str(),
            "--log-file".as_ref(),
            log.as_os_str(),
        ],
    );
    let seen = exercise(m.mountpoint(), expected);
    m.umount().assert_success();
    (fs::read_to_string(&log).unwrap_or_default(), seen)
}

#[test]
fn both_transports_answer_every_request_alike_and_as_qemu_reads() {
    let _one = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let _on = Switch::set(true);
    let dir = workdir();
    let ring_image = partitioned_image(dir.path(), "ring");
    let dev_image = partitioned_image(dir.path(), "dev");
    // (Each base has its own MBR disk identifier: sfdisk picks one at random.)
    let mut expected = raw_of(&ring_image);
    let mut expected_dev = raw_of(&dev_image);

    let (ring_log, ring_seen) = run_transport(dir.path(), &ring_image, "on", &mut expected);
    assert!(
        ring_log.contains("requests on io_uring"),
        "--io-uring on did not serve on io_uring:\n{ring_log}"
    );
    let (dev_log, dev_seen) = run_transport(dir.path(), &dev_image, "off", &mut expected_dev);
    assert!(
        dev_log.contains("requests on /dev/fuse"),
        "--io-uring off did not serve on /dev/fuse:\n{dev_log}"
    );
    eprintln!("what the requests answered: {ring_seen:#?}");
    assert_eq!(ring_seen, dev_seen, "the transports answered differently");
    for (image, expected, what) in [
        (&ring_image, &expected, "io_uring"),
        (&dev_image, &expected_dev, "/dev/fuse"),
    ] {
        assert_check_clean_when(image, &format!("after the {what} session"));
        assert_same_bytes(
            &raw_of(image),
            expected,
            &format!("QEMU's read after the {what} session"),
        );
    }
}

#[test]
fn io_uring_on_refuses_clearly_when_the_kernel_has_it_off_and_auto_falls_back() {
    let _one = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let _off = Switch::set(false);
    let dir = workdir();
    let image = qcow2(dir.path().join("plain.qcow2"), 16 * MIB).create();
    image.write_pattern(0, MIB, 0x5a);
    let r = mount_failure(&image.path, &["--io-uring", "on"], None);
    assert_one_line_error(&r, &[PARAM], Duration::from_secs(10));

    let log = dir.path().join("log");
    let expected = raw_of(&image);
    let m = Mount::new(
        &image.path,
        &[
            "-v".as_ref(),
            "--io-uring".as_ref(),
            "auto".as_ref(),
            "--log-file".as_ref(),
            log.as_os_str(),
        ],
    );
    assert_same_bytes(
        &read_all_bounded(&m.disk()),
        &expected,
        "auto, on /dev/fuse",
    );
    m.umount().assert_success();
    let log = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        log.contains("requests on /dev/fuse"),
        "auto did not fall back to /dev/fuse:\n{log}"
    );
}

/// Run this thread on CPU `cpu` only, so every request it makes goes to that CPU's queue.
fn pin_to(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET bounds-checks `cpu`; the set is only read.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "pin to CPU {cpu}"
        );
    }
}

/// What writer `w` writes in its `i`th write: 64 KiB of one byte.
fn partition_chunk(w: usize, i: usize) -> Vec<u8> {
    vec![(w * 16 + i % 2 + 1) as u8; 64 * KIB as usize]
}

/// An AES overlay over a raw base whose MBR (written here, byte by byte) has one Linux partition:
/// 10 MiB at 1 MiB.
fn one_partition_image(dir: &Path) -> Image {
    let base = create_raw(dir.join("one-base.raw"), 64 * MIB);
    let mut mbr = [0u8; 512];
    let entry = &mut mbr[446..462];
    entry[4] = 0x83;
    entry[8..12].copy_from_slice(&2048u32.to_le_bytes());
    entry[12..16].copy_from_slice(&20480u32.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    OpenOptions::new()
        .write(true)
        .open(&base.path)
        .expect("open base")
        .write_all_at(&mbr, 0)
        .expect("write the MBR");
    let top = qcow2(dir.join("one.qcow2"), 64 * MIB)
        .aes(PASS)
        .backing(&base)
        .create();
    top.write_random(MIB + 512 * KIB, 1024 * 1024, 4);
    top
}

/// A partition write holds its queue entry until the partition writer has dropped `disk`'s pages
/// over it, which can wait on a `disk` read queued on the same CPU's queue: 16 writers and 4
/// readers pinned to CPU 0 keep every entry of queue 0 busy. Bounded: no progress for 90 s aborts
/// the connection and fails. The bytes are checked through `disk` and by QEMU.
#[test]
fn many_partition_writes_and_disk_reads_on_one_queue_never_deadlock() {
    const WRITERS: usize = 16;
    const READERS: usize = 4;
    const WRITES: usize = 1000;
    let _one = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let _on = Switch::set(true);
    let dir = workdir();
    let image = one_partition_image(dir.path());
    let key = passphrase_file(dir.path(), "key", PASS);
    let m = Mount::new(
        &image.path,
        &[
            "--io-uring".as_ref(),
            "on".as_ref(),
            "--passphrase-file".as_ref(),
            key.as_os_str(),
        ],
    );
    let dev = fs::metadata(m.mountpoint()).expect("stat mount").dev();
    // The bytes the writers cover (two 64 KiB chunks each), from 1 MiB into `disk`.
    let span = (WRITERS * 2) as u64 * 64 * KIB;
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let mut threads = Vec::new();
    // Every writer and reader on CPU 0: their requests share one queue (4 entries), so the
    // partition writes can hold every entry while disk reads queue behind them.
    for w in 0..WRITERS {
        let part = m.mountpoint().join("disk-part1");
        let done = done_tx.clone();
        threads.push(std::thread::spawn(move || {
            pin_to(0);
            let f = OpenOptions::new()
                .write(true)
                .open(&part)
                .expect("open part1");
            for i in 0..WRITES {
                let at = (w as u64 * 2 + (i % 2) as u64) * 64 * KIB;
                f.write_all_at(&partition_chunk(w, i), at)
                    .expect("partition write");
            }
            let _ = done.send(());
        }));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for r in 0..READERS {
        let disk = m.disk();
        let stop = stop.clone();
        let done = done_tx.clone();
        threads.push(std::thread::spawn(move || {
            pin_to(0);
            let f = File::open(&disk).expect("open disk");
            let mut buf = vec![0u8; 128 * KIB as usize];
            let mut at = r as u64 * 128 * KIB;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Buffered reads of what the writers write, through `disk`'s page cache.
                f.read_exact_at(&mut buf, MIB + at).expect("disk read");
                at = (at + 128 * KIB) % span;
            }
            let _ = done.send(());
        }));
    }
    drop(done_tx);
    finish_or_abort(&done_rx, WRITERS, dev, &stop, threads);
    // The last write of each writer to each of its two chunks, through disk and through QEMU.
    let mut expected = vec![0u8; span as usize];
    for w in 0..WRITERS {
        for i in WRITES - 2..WRITES {
            let at = ((w * 2 + i % 2) as u64 * 64 * KIB) as usize;
            expected[at..at + 64 * KIB as usize].copy_from_slice(&partition_chunk(w, i));
        }
    }
    let span = span as usize;
    assert_same_bytes(
        &read_at_bounded(&m.disk(), MIB, span),
        &expected,
        "the partition writes, read through disk",
    );
    m.umount().assert_success();
    assert_check_clean_when(&image, "after the concurrent partition writes");
    assert_same_bytes(
        &raw_of(&image)[MIB as usize..MIB as usize + span],
        &expected,
        "the partition writes, read by QEMU",
    );
}

/// Abort the FUSE connection of the mount on device `dev` (a deadlocked one), mounting the FUSE
/// control file system first where the machine has not.
fn abort_connection(dev: u64) {
    let minor = (dev & 0xff) | ((dev >> 12) & 0xffff_ff00);
    let abort = format!("/sys/fs/fuse/connections/{minor}/abort");
    if !Path::new(&abort).exists() {
        let _ = std::process::Command::new("mount")
            .args(["-t", "fusectl", "none", "/sys/fs/fuse/connections"])
            .status();
    }
    if let Err(e) = fs::write(&abort, "1") {
        eprintln!("{abort}: {e}: the stuck mount stays");
    }
}

/// Wait for `writers` done messages, then stop the readers and join every thread. No progress for
/// 90 s is a deadlock: the connection (of the mount on device `dev`) is aborted so every thread
/// gets an error, and the test fails.
fn finish_or_abort(
    done: &std::sync::mpsc::Receiver<()>,
    writers: usize,
    dev: u64,
    stop: &std::sync::atomic::AtomicBool,
    threads: Vec<std::thread::JoinHandle<()>>,
) {
    const LIMIT: Duration = Duration::from_secs(90);
    let start = std::time::Instant::now();
    for finished in 0..writers {
        if done
            .recv_timeout(LIMIT.saturating_sub(start.elapsed()))
            .is_err()
        {
            abort_connection(dev);
            panic!(
                "partition writes and disk reads on one io_uring queue made no progress for \
                 {LIMIT:?} ({finished} of {writers} writers done): deadlock"
            );
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in threads {
        t.join().expect("a reader or writer failed");
    }
}

/// Six partitions, 1 MiB each from 1 MiB on (GPT).
const SIX: &str = "label: gpt\nunit: sectors\n\nstart=2048, size=2048\nstart=4096, size=2048\n\
                   start=6144, size=2048\nstart=8192, size=2048\nstart=10240, size=2048\n\
                   start=12288, size=2048\n";

/// The kernel lets one direct write per file run at a time, so the test above holds at most one
/// queue entry with a partition write. Writers of six partition files pinned to CPU 0 can hold
/// more entries than the queue has; the partition writer's page drop then waits on a `disk` read
/// queued behind them unless the queue keeps entries free for it (it registers more).
#[test]
fn writes_to_more_partition_files_than_queue_entries_never_deadlock() {
    const PARTS: usize = 6;
    const READERS: usize = 4;
    const WRITES: usize = 600;
    let _one = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let _on = Switch::set(true);
    let dir = workdir();
    let base = create_raw(dir.path().join("six-base.raw"), 16 * MIB);
    sfdisk(&base.path, SIX);
    let image = qcow2(dir.path().join("six.qcow2"), 16 * MIB)
        .aes(PASS)
        .backing(&base)
        .create();
    image.write_random(MIB, 6 * MIB as usize, 5);
    let key = passphrase_file(dir.path(), "key", PASS);
    let m = Mount::new(
        &image.path,
        &[
            "--io-uring".as_ref(),
            "on".as_ref(),
            "--passphrase-file".as_ref(),
            key.as_os_str(),
        ],
    );
    let dev = fs::metadata(m.mountpoint()).expect("stat mount").dev();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let mut threads = Vec::new();
    for p in 0..PARTS {
        let part = m.mountpoint().join(format!("disk-part{}", p + 1));
        let done = done_tx.clone();
        threads.push(std::thread::spawn(move || {
            pin_to(0);
            let f = OpenOptions::new()
                .write(true)
                .open(&part)
                .unwrap_or_else(|e| panic!("open {}: {e}", part.display()));
            for i in 0..WRITES {
                let at = (i % 2) as u64 * 64 * KIB;
                f.write_all_at(&partition_chunk(p, i), at)
                    .expect("partition write");
            }
            let _ = done.send(());
        }));
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for r in 0..READERS {
        let disk = m.disk();
        let stop = stop.clone();
        let done = done_tx.clone();
        threads.push(std::thread::spawn(move || {
            pin_to(0);
            let f = File::open(&disk).expect("open disk");
            let mut buf = vec![0u8; 128 * KIB as usize];
            let mut p = r;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                f.read_exact_at(&mut buf, MIB * (1 + p as u64))
                    .expect("disk read");
                p = (p + 1) % PARTS;
            }
            let _ = done.send(());
        }));
    }
    drop(done_tx);
    finish_or_abort(&done_rx, PARTS, dev, &stop, threads);
    let disk = read_at_bounded(&m.disk(), 0, 8 * MIB as usize);
    m.umount().assert_success();
    assert_check_clean_when(&image, "after writes to six partition files");
    let raw = raw_of(&image);
    for p in 0..PARTS {
        for i in WRITES - 2..WRITES {
            let at = ((1 + p as u64) * MIB + (i % 2) as u64 * 64 * KIB) as usize;
            let want = partition_chunk(p, i);
            assert_same_bytes(
                &disk[at..at + want.len()],
                &want,
                "a partition write, via disk",
            );
            assert_same_bytes(
                &raw[at..at + want.len()],
                &want,
                "a partition write, by QEMU",
            );
        }
    }
}

/// The null disk's byte at `offset` (src/disk/null.rs): a 1 MiB pattern, repeated.
fn floor_byte(offset: u64) -> u8 {
    ((offset % MIB) as u32)
        .wrapping_mul(2_654_435_761)
        .to_le_bytes()[3]
}

/// `qcowfs transport-floor`, scripts/bench.sh's transport floor, is served by the same transports
/// as a mount: every byte read is the null disk's pattern, across the pattern's boundary and up to
/// the end of the disk (where reads end), a write is acknowledged whole, fsync succeeds, and
/// `qcowfs umount` ends it.
#[test]
fn the_transport_floor_serves_its_pattern_on_both_transports() {
    let _one = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let _on = Switch::set(true);
    for mode in ["off", "on"] {
        let m = Mount::transport_floor("4M", &["--io-uring", mode]);
        let disk = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(m.disk())
            .expect("open the null disk");
        assert_eq!(disk.metadata().expect("stat").len(), 4 * MIB);
        let mut buf = AlignedBuf::new(2 * MIB as usize);
        for at in [0, MIB - 4096, 3 * MIB] {
            let want = (4 * MIB - at).min(2 * MIB) as usize;
            let n = disk.read_at(buf.as_mut(), at).expect("read");
            assert_eq!(n, want, "{mode}: read at {at}");
            let wrong = (0..n).find(|&i| buf.as_mut()[i] != floor_byte(at + i as u64));
            assert_eq!(
                wrong, None,
                "{mode}: byte differs from the pattern (read at {at})"
            );
        }
        buf.as_mut()[..4096].fill(0x5a);
        assert_eq!(
            disk.write_at(&buf.as_mut()[..4096], MIB).expect("write"),
            4096
        );
        disk.sync_all().expect("fsync");
        drop(disk);
        m.umount().assert_success();
    }
}
