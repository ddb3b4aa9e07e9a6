//! Writes keep going while the flush writer stores earlier ones: drive the disk layer from several
//! threads (each on its own region, so the expected content is known) with flushes in between, then
//! check the image with qemu-img and read it back through a fresh open.

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

fn open(path: &Path, writable: bool, cache: u64) -> Disk {
    let chain = Chain::open(
        path,
        &KeyRing::default(),
        OpenOptions {
            writable,
            force_share: false,
            without_keys: false,
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
