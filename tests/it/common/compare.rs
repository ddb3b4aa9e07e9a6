//! Comparing bytes (naming the first differing offset), and bounded reads and writes through FUSE.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use super::data::Rng;
use super::image::Image;
use super::run::{describe_status, run, within};

/// How long reading a whole `disk` through FUSE may take before the test fails instead of hanging.
pub const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// The first offset where `a` and `b` differ (or the shorter length if one is a prefix).
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    const CHUNK: usize = 64 * 1024;
    let n = a.len().min(b.len());
    let mut base = 0;
    while base < n {
        let end = (base + CHUNK).min(n);
        if a[base..end] != b[base..end] {
            return (base..end).find(|&i| a[i] != b[i]);
        }
        base = end;
    }
    (a.len() != b.len()).then_some(n)
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Asserts `actual == expected`; on a mismatch names the first differing offset (and its 512 B
/// sector and 64 KiB cluster), how many bytes differ, and the bytes there.
pub fn assert_same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    let Some(at) = first_difference(actual, expected) else {
        return;
    };
    let differing = actual.iter().zip(expected).filter(|(x, y)| x != y).count();
    let show = |v: &[u8]| hex(&v[at.min(v.len())..(at + 16).min(v.len())]);
    panic!(
        "{what}: first difference at offset {at} (0x{at:x}; sector {}, 64 KiB cluster {}); \
         lengths {} (qcowfs) vs {} (qemu); {differing} differing bytes in the common length\n\
         qcowfs: {}\nqemu:   {}",
        at / 512,
        at / 65536,
        actual.len(),
        expected.len(),
        show(actual),
        show(expected),
    );
}

/// Reads the whole of `path` under [`READ_TIMEOUT`].
pub fn read_all_bounded(path: &Path) -> Vec<u8> {
    let p = path.to_path_buf();
    within(
        READ_TIMEOUT,
        &format!("reading {}", path.display()),
        move || fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display())),
    )
}

/// Reads `len` bytes at `off` of `path` (positional read) under [`READ_TIMEOUT`].
pub fn read_at_bounded(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let p = path.to_path_buf();
    within(
        READ_TIMEOUT,
        &format!("reading {}", path.display()),
        move || {
            let f = File::open(&p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, off)
                .unwrap_or_else(|e| panic!("read {len} bytes at {off} of {}: {e}", p.display()));
            buf
        },
    )
}

/// `count` positional reads at random unaligned offsets and lengths, each compared to `expected`.
pub fn assert_random_reads_match(disk: &Path, expected: &[u8], count: usize, seed: u64) {
    let p = disk.to_path_buf();
    let exp = expected.to_vec();
    within(READ_TIMEOUT, "random reads", move || {
        let f = File::open(&p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
        let mut rng = Rng::new(seed);
        for _ in 0..count {
            let len = rng.range(1, 300_000.min(exp.len() as u64)) as usize;
            let off = rng.below(exp.len() as u64 - len as u64 + 1) as usize;
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, off as u64)
                .unwrap_or_else(|e| panic!("read {len} bytes at {off}: {e}"));
            if let Some(d) = first_difference(&buf, &exp[off..off + len]) {
                panic!(
                    "read of {len} bytes at offset {off}: first difference at disk offset {}",
                    off + d
                );
            }
        }
    });
}

/// How long one write through FUSE may take before the test fails instead of hanging.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// `data` written at `off` of `path` (positional, then fsync) under [`WRITE_TIMEOUT`].
pub fn write_at_bounded(path: &Path, off: u64, data: &[u8]) {
    let p = path.to_path_buf();
    let d = data.to_vec();
    within(
        WRITE_TIMEOUT,
        &format!("writing {}", path.display()),
        move || {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap_or_else(|e| panic!("open {} for writing: {e}", p.display()));
            f.write_all_at(&d, off).unwrap_or_else(|e| {
                panic!("write {} bytes at {off} of {}: {e}", d.len(), p.display())
            });
            f.sync_all()
                .unwrap_or_else(|e| panic!("fsync {}: {e}", p.display()));
        },
    );
}

/// `qemu-img compare IMAGE REFERENCE.raw` says identical (encrypted images too); on a difference, names the first
/// differing offset.
pub fn assert_same_guest_contents(image: &Image, reference: &Path) {
    let (mut args, target) = image.qemu_open_args();
    args.insert(0, "compare".into());
    let reference_str = reference.to_str().expect("UTF-8 path");
    if args.iter().any(|a| a == "--image-opts") {
        args.push(target);
        args.push(format!("driver=raw,file.filename={reference_str}"));
    } else {
        args.extend(["-F".into(), "raw".into(), target, reference_str.into()]);
    }
    let r = run("qemu-img", &args);
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
