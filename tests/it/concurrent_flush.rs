//! Writes keep going while the flush writer stores earlier ones: drive the disk layer from several
//! threads (each on its own region, so the expected content is known) with flushes in between, then
//! check the image with qemu-img and read it back through a fresh open. Aligned writes make partial
//! blocks (only the written span loaded), so reads, writes, write-backs and discards race over them.

use crate::common;

use common::*;
use std::sync::Arc;

use qcowfs::disk::BlockDevice;

const SIZE: u64 = 64 << 20;
const THREADS: u64 = 4;

const PASS: &str = "race passphrase";

/// Creation options added to a qcow2 image description.
type Options = fn(Qcow2Builder) -> Qcow2Builder;

#[test]
fn writes_during_flushes_all_land_and_the_image_stays_consistent() {
    let dir = tempfile::tempdir().expect("temp dir");
    let image = qcow2(dir.path().join("c.qcow2"), SIZE)
        .cluster_size(4096)
        .create();
    // A small cache: the dirty bound (a quarter) is hit often, so writers and flushes interleave.
    let disk = Arc::new(open_disk(&image, true, 2 << 20));
    let region = SIZE / THREADS;
    let mut expected = vec![0u8; SIZE as usize];
    let writers: Vec<_> = (0..THREADS)
        .map(|t| {
            let disk = disk.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(0x1234_5678 + t);
                let mut image = vec![0u8; region as usize];
                for i in 0..400u64 {
                    let len = (rng.next_u64() % 20_000 + 1) as usize;
                    let off = rng.next_u64() % (region - len as u64);
                    let byte = (rng.next_u64() % 251) as u8 + 1;
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

    assert_check_clean(&image);
    let reopened = open_disk(&image, false, 8 << 20);
    let mut stored = vec![0u8; SIZE as usize];
    reopened.read_at(0, &mut stored).expect("read after reopen");
    let first_diff = stored.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(
        first_diff, None,
        "the image holds every write after the last flush"
    );
}

/// Two threads write (aligned and not), read back and discard in their own halves of an overlay
/// over a raw base, while a third alternates durable flushes and write-backs; every read must show
/// the latest writes over the base, and so must the image once stored.
fn partial_blocks_race(what: &str, overlay: Options, seed: u64) {
    const SIZE: u64 = 16 << 20;
    const THREADS: u64 = 2;
    let dir = workdir();
    let base_bytes = random_bytes(SIZE as usize, seed);
    let base = raw_from_bytes(dir.path().join("base.raw"), &base_bytes);
    let image = overlay(qcow2(dir.path().join("race.qcow2"), SIZE).backing(&base)).create();

    let disk = Arc::new(open_disk(&image, true, 2 << 20));
    let region = SIZE / THREADS;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let disk = disk.clone();
            let mut model = base_bytes[(t * region) as usize..((t + 1) * region) as usize].to_vec();
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed + t * 7919);
                for i in 0..3000u64 {
                    let kind = rng.next_u64() % 10;
                    let unit = [512u64, 4096, 2048, 1][(rng.next_u64() % 4) as usize];
                    let len = ((rng.next_u64() % 24 + 1) * unit).min(region);
                    let off = (rng.next_u64() % (region - len + 1)) / unit * unit;
                    let at = t * region + off;
                    if kind < 5 {
                        let data = vec![(rng.next_u64() % 251) as u8 + 1; len as usize];
                        disk.write_at(at, &data).expect("write");
                        model[off as usize..(off + len) as usize].copy_from_slice(&data);
                    } else if kind < 9 {
                        let mut got = vec![0u8; len as usize];
                        disk.read_at(at, &mut got).expect("read");
                        let want = &model[off as usize..(off + len) as usize];
                        if let Some(p) = got.iter().zip(want).position(|(a, b)| a != b) {
                            panic!("thread {t}, op {i}: read of {len} at {at} differs at +{p}");
                        }
                    } else if rng.next_u64() % 8 == 0 {
                        // Whole clusters become zeros (2 MiB: a multiple of every cluster size).
                        let span = 2 << 20;
                        let first = off / span * span;
                        let n = span * (1 + rng.next_u64() % 2);
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

    assert_check_clean_when(&image, what);
    let reopened = open_disk(&image, false, 8 << 20);
    let mut stored = vec![0u8; SIZE as usize];
    reopened.read_at(0, &mut stored).expect("read after reopen");
    let first_diff = stored.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "the stored image differs ({what})");
}

#[test]
fn partial_blocks_race_with_flushes_on_a_plain_overlay() {
    partial_blocks_race("plain, 64 KiB clusters", |b| b.cluster_size(65536), 1);
}

#[test]
fn partial_blocks_race_with_flushes_on_an_extended_l2_overlay() {
    partial_blocks_race(
        "extended L2, 32 KiB clusters",
        |b| b.cluster_size(32768).extended_l2(),
        2,
    );
}

#[test]
fn partial_blocks_race_with_flushes_on_a_luks_overlay() {
    partial_blocks_race(
        "LUKS, 16 KiB clusters",
        |b| b.cluster_size(16384).luks(PASS),
        3,
    );
}

/// An encrypted disk whose size is not a multiple of 512 (qemu-img rounds sizes, so the header is
/// patched): a write to the tail of the last block leaves its head unloaded; reading the head then
/// loads whole sectors, past the disk's end, as the cipher needs.
#[test]
fn the_partial_last_block_of_an_encrypted_odd_sized_disk_reads_back() {
    let encryptions: [(&str, Options); 2] = [("LUKS", |b| b.luks(PASS)), ("AES", |b| b.aes(PASS))];
    for (options, encrypt) in encryptions {
        let dir = workdir();
        let image =
            encrypt(qcow2(dir.path().join("odd.qcow2"), 1 << 20).cluster_size(65536)).create();
        let path = image.path.clone();
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
        let last = size / 65536 * 65536;
        let head = vec![b'h'; (size - last) as usize];
        {
            let disk = open_disk(&image, true, 4 << 20);
            disk.write_at(last, &head).expect("fill the last block");
            disk.flush().expect("flush");
        }
        let disk = open_disk(&image, true, 4 << 20);
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
        let disk = open_disk(&image, false, 4 << 20);
        let mut got = vec![0u8; (size - last) as usize];
        disk.read_at(last, &mut got).expect("read after reopen");
        assert_eq!(got[..512], head[..512], "{options}: the head after reopen");
        assert_eq!(got[512..], tail[..], "{options}: the tail after reopen");
    }
}
