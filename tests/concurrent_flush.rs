//! Writes keep going while the flush writer stores earlier ones: drive the disk layer from several
//! threads (each on its own region, so the expected content is known) with flushes in between, then
//! check the image with qemu-img and read it back through a fresh open. Aligned writes make partial
//! blocks (only the written span loaded), so reads, writes, write-backs and discards race over them.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use qcowfs::chain::{Chain, KeyRing, OpenOptions};
use qcowfs::disk::{BlockDevice, Disk, DiskOptions};

const SIZE: u64 = 64 << 20;
const THREADS: u64 = 4;

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is required")
}

const PASS: &str = "race passphrase";

fn open(path: &Path, writable: bool, cache: u64) -> Disk {
    open_with(path, &KeyRing::default(), writable, cache)
}

fn keys() -> KeyRing {
    KeyRing {
        default: Some(zeroize::Zeroizing::new(PASS.as_bytes().to_vec())),
        per_layer: Vec::new(),
    }
}

fn open_with(path: &Path, keys: &KeyRing, writable: bool, cache: u64) -> Disk {
    let chain = Chain::open(
        path,
        keys,
        OpenOptions {
            writable,
            force_share: false,
            without_keys: false,
            backing_within: Vec::new(),
            record: None,
        },
    )
    .expect("open image");
    Disk::new(
        chain,
        DiskOptions {
            cache_size: cache,
            read_only: !writable,
        },
    )
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn writes_during_flushes_all_land_and_the_image_stays_consistent() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("c.qcow2");
    let p = path.to_str().expect("utf-8 path");
    assert!(qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        p,
        &SIZE.to_string()
    ])
    .status
    .success());
    // A small cache: the dirty bound (a quarter) is hit often, so writers and flushes interleave.
    let disk = Arc::new(open(&path, true, 2 << 20));
    let region = SIZE / THREADS;
    let mut expected = vec![0u8; SIZE as usize];
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let disk = disk.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(0x1234_5678 + t);
                let mut image = vec![0u8; region as usize];
                for i in 0..400u64 {
                    let len = (rng.next() % 20_000 + 1) as usize;
                    let off = rng.next() % (region - len as u64);
                    let byte = (rng.next() % 251) as u8 + 1;
                    let data = vec![byte; len];
                    disk.write_at(t * region + off, &data).expect("write");
                    image[off as usize..off as usize + len].copy_from_slice(&data);
                    if i % 97 == 0 {
                        disk.flush().expect("flush");
                    }
                }
                image
            })
        })
        .collect();
    let flusher = {
        let disk = disk.clone();
        std::thread::spawn(move || {
            for _ in 0..50 {
                disk.flush().expect("background flush");
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        })
    };
    for (t, w) in writers.into_iter().enumerate() {
        let image = w.join().expect("writer thread");
        let start = t * region as usize;
        expected[start..start + region as usize].copy_from_slice(&image);
    }
    flusher.join().expect("flusher thread");
    disk.flush().expect("final flush");
    let mut live = vec![0u8; SIZE as usize];
    disk.read_at(0, &mut live).expect("read back");
    assert!(live == expected, "the disk shows what was written");
    drop(disk);

    let check = qemu_img(&["check", p]);
    assert!(
        check.status.success(),
        "qemu-img check: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    let reopened = open(&path, false, 8 << 20);
    let mut stored = vec![0u8; SIZE as usize];
    reopened.read_at(0, &mut stored).expect("read after reopen");
    let first_diff = stored.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(
        first_diff, None,
        "the image holds every write after the last flush"
    );
}

/// `qemu-img create` of a qcow2 at `path` with `-o options` (and the secret, for LUKS).
fn create(path: &Path, options: &str, size: u64) {
    let p = path.to_str().expect("utf-8 path");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    let secret = format!("secret,id=s0,data={PASS}");
    if options.contains("encrypt.") {
        args.extend(["--object", &secret]);
    }
    let size = size.to_string();
    args.extend(["-o", options, p, &size]);
    let out = qemu_img(&args);
    assert!(
        out.status.success(),
        "qemu-img create -o {options}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_check_clean(path: &Path, luks: bool) {
    let p = path.to_str().expect("utf-8 path");
    let out = if luks {
        qemu_img(&[
            "check",
            "--object",
            &format!("secret,id=s0,data={PASS}"),
            "--image-opts",
            &format!("driver=qcow2,file.filename={p},encrypt.key-secret=s0"),
        ])
    } else {
        qemu_img(&["check", p])
    };
    assert!(
        out.status.success(),
        "qemu-img check {p}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two threads write (aligned and not), read back and discard in their own halves of an overlay
/// over a raw base, while a third alternates durable flushes and write-backs; every read must show
/// the latest writes over the base, and so must the image once stored.
fn partial_blocks_race(options: &str, seed: u64) {
    const SIZE: u64 = 16 << 20;
    const THREADS: u64 = 2;
    let dir = tempfile::tempdir().expect("temp dir");
    let base_path = dir.path().join("base.raw");
    let mut rng = Rng(seed | 1);
    let base: Vec<u8> = (0..SIZE).map(|_| rng.next() as u8).collect();
    std::fs::write(&base_path, &base).expect("write the base");
    let path = dir.path().join("race.qcow2");
    let luks = options.contains("luks");
    let backing = format!("backing_file={},backing_fmt=raw", base_path.display());
    create(&path, &format!("{backing},{options}"), SIZE);

    let keys = keys();
    let disk = Arc::new(open_with(&path, &keys, true, 2 << 20));
    let region = SIZE / THREADS;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let disk = disk.clone();
            let mut model = base[(t * region) as usize..((t + 1) * region) as usize].to_vec();
            std::thread::spawn(move || {
                let mut rng = Rng(seed + t * 7919);
                for i in 0..3000u64 {
                    let kind = rng.next() % 10;
                    let unit = [512u64, 4096, 2048, 1][(rng.next() % 4) as usize];
                    let len = ((rng.next() % 24 + 1) * unit).min(region);
                    let off = (rng.next() % (region - len + 1)) / unit * unit;
                    let at = t * region + off;
                    if kind < 5 {
                        let data = vec![(rng.next() % 251) as u8 + 1; len as usize];
                        disk.write_at(at, &data).expect("write");
                        model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    } else if kind < 9 {
                        let mut got = vec![0u8; len as usize];
                        disk.read_at(at, &mut got).expect("read");
                        let want = &model[off as usize..(off + len) as usize];
                        if let Some(p) = got.iter().zip(want).position(|(a, b)| a != b) {
                            panic!("thread {t}, op {i}: read of {len} at {at} differs at +{p}");
                        }
                    } else if rng.next() % 8 == 0 {
                        // Whole clusters become zeros (2 MiB: a multiple of every cluster size).
                        let span = 2 << 20;
                        let first = off / span * span;
                        let n = span * (1 + rng.next() % 2);
                        if first + n <= region {
                            disk.discard(t * region + first, n).expect("discard");
                            model[first as usize..(first + n) as usize].fill(0);
                        }
                    }
                }
                model
            })
        })
        .collect();
    let flusher = {
        let (disk, stop) = (disk.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut k = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if k % 3 == 0 {
                    disk.flush().expect("flush");
                } else {
                    disk.write_back().expect("write-back");
                }
                k += 1;
                std::thread::sleep(std::time::Duration::from_micros(300));
            }
        })
    };
    let mut expected = Vec::new();
    for w in workers {
        expected.extend(w.join().expect("worker thread"));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flusher.join().expect("flusher thread");
    disk.flush().expect("final flush");
    drop(disk);

    assert_check_clean(&path, luks);
    let reopened = open_with(&path, &keys, false, 8 << 20);
    let mut stored = vec![0u8; SIZE as usize];
    reopened.read_at(0, &mut stored).expect("read after reopen");
    let first_diff = stored.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "the stored image differs ({options})");
}

#[test]
fn partial_blocks_race_with_flushes_on_a_plain_overlay() {
    partial_blocks_race("cluster_size=65536", 1);
}

#[test]
fn partial_blocks_race_with_flushes_on_an_extended_l2_overlay() {
    partial_blocks_race("cluster_size=32768,extended_l2=on", 2);
}

#[test]
fn partial_blocks_race_with_flushes_on_a_luks_overlay() {
    partial_blocks_race(
        "cluster_size=16384,encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        3,
    );
}

/// An encrypted disk whose size is not a multiple of 512 (qemu-img rounds sizes, so the header is
/// patched): a write to the tail of the last block leaves its head unloaded; reading the head then
/// loads whole sectors, past the disk's end, as the cipher needs.
#[test]
fn the_partial_last_block_of_an_encrypted_odd_sized_disk_reads_back() {
    for options in [
        "cluster_size=65536,encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10",
        "cluster_size=65536,encrypt.format=aes,encrypt.key-secret=s0",
    ] {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("odd.qcow2");
        create(&path, options, 1 << 20);
        let size: u64 = (1 << 20) - 100;
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("open the image");
            f.write_all_at(&size.to_be_bytes(), 24)
                .expect("patch the size");
        }
        let keys = keys();
        let last = size / 65536 * 65536;
        let head = vec![b'h'; (size - last) as usize];
        {
            let disk = open_with(&path, &keys, true, 4 << 20);
            disk.write_at(last, &head).expect("fill the last block");
            disk.flush().expect("flush");
        }
        let disk = open_with(&path, &keys, true, 4 << 20);
        let tail = vec![b't'; (size - last - 512) as usize];
        disk.write_at(last + 512, &tail).expect("write the tail");
        let mut got = vec![0u8; 512];
        disk.read_at(last, &mut got)
            .unwrap_or_else(|e| panic!("{options}: read the head: {e}"));
        assert_eq!(got, head[..512], "{options}: the head");
        let mut got = vec![0u8; 100];
        disk.read_at(size - 100, &mut got).expect("read the end");
        assert_eq!(got, vec![b't'; 100], "{options}: the end");
        disk.flush().expect("flush");
        drop(disk);
        let disk = open_with(&path, &keys, false, 4 << 20);
        let mut got = vec![0u8; (size - last) as usize];
        disk.read_at(last, &mut got).expect("read after reopen");
        assert_eq!(got[..512], head[..512], "{options}: the head after reopen");
        assert_eq!(got[512..], tail[..], "{options}: the tail after reopen");
    }
}
