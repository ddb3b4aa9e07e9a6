//! Randomized robustness test: mutate real qemu-img-made images (bit flips, boundary values in header
//! and table fields, truncation) and feed them through open, reads and a write. No input may panic or
//! hang. A bounded number of cases runs in the normal suite; `scripts/fuzz.sh SECONDS` runs longer via
//! QCOWFS_FUZZ_SECONDS. Inputs in tests/fuzz_corpus/ are regression cases found this way.

use crate::common;

use common::Rng;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use qcowfs::fuzz::fields::{Edit, Field, INTERESTING};
use qcowfs::fuzz::{
    check_write, check_write_at, edited_image, read_image, write_image, WriteVerdict,
};

/// Cases in the normal test run.
const DEFAULT_CASES: u64 = 1500;
/// Seconds of field edits in the normal test run.
const DEFAULT_FIELD_SECONDS: u64 = 15;
/// A case that takes longer than this is a hang.
const CASE_LIMIT: Duration = Duration::from_secs(20);

/// Uniform in `0..n`, or 0 when `n` is 0 (a truncated input can leave nothing to pick from).
fn below(rng: &mut Rng, n: u64) -> u64 {
    if n == 0 {
        0
    } else {
        rng.below(n)
    }
}

/// The seed images of scripts/fuzz-seeds.sh (also the cargo-fuzz seeds), made in `dir`; the raw
/// backing file of the overlay seed lands there too, where the inputs are opened.
fn seeds(dir: &Path) -> Vec<Vec<u8>> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/fuzz-seeds.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(dir)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} (qemu-img and qemu-io are required): {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("seed dir")
        .map(|e| e.expect("seed entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 10, "too few seeds: {paths:?}");
    paths
        .iter()
        .map(|p| std::fs::read(p).expect("readable seed"))
        .collect()
}

/// Interesting numbers for header and table fields.
const BOUNDARY: [u64; 10] = [
    0,
    1,
    511,
    512,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x00ff_ffff_ffff_fe00,
    u64::MAX,
    1 << 40,
];

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        match rng.below(5) {
            // Bit flips, mostly in the first clusters where the metadata lives.
            0 | 1 => {
                let span = if rng.below(2) == 0 {
                    data.len().min(4096)
                } else {
                    data.len()
                };
                let at = below(rng, span as u64) as usize;
                if at < data.len() {
                    data[at] ^= 1 << rng.below(8);
                }
            }
            // A boundary value in a header field or an aligned table slot.
            2 | 3 => {
                let value = BOUNDARY[rng.below(BOUNDARY.len() as u64) as usize];
                let (at, width) = if rng.below(2) == 0 {
                    (
                        rng.below(26) as usize * 4,
                        if rng.below(2) == 0 { 4 } else { 8 },
                    )
                } else {
                    (below(rng, data.len() as u64 / 8) as usize * 8, 8)
                };
                if at + width <= data.len() {
                    let bytes = value.to_be_bytes();
                    data[at..at + width].copy_from_slice(&bytes[8 - width..]);
                }
            }
            // Truncation.
            _ => {
                let keep = rng.below(data.len() as u64 + 1) as usize;
                data.truncate(keep);
            }
        }
    }
    data
}

/// Run one input in a thread, failing on a panic or a hang; the input is saved for reproduction.
fn check(dir: &Path, input: Vec<u8>, write: bool) {
    check_with(dir, input, &[], write);
}

/// `check` of `input` with `edits` applied (the edited image is what is saved).
fn check_with(dir: &Path, input: Vec<u8>, edits: &[Edit], write: bool) {
    let (tx, rx) = mpsc::channel();
    let work_dir = dir.to_path_buf();
    let data = input.clone();
    let thread_edits = edits.to_vec();
    std::thread::spawn(move || {
        let outcome = std::panic::catch_unwind(|| {
            if !thread_edits.is_empty() {
                let _ = edited_image(&work_dir, &data, &thread_edits);
                return;
            }
            let _ = read_image(&work_dir, &data);
            if write {
                let _ = write_image(&work_dir, &data);
            }
        });
        let _ = tx.send(outcome.is_ok());
    });
    let verdict = rx.recv_timeout(CASE_LIMIT);
    if verdict != Ok(true) {
        let saved =
            std::env::temp_dir().join(format!("qcowfs-fuzz-failure-{}.bin", std::process::id()));
        let _ = std::fs::write(&saved, qcowfs::fuzz::fields::edited(&input, edits));
        panic!(
            "input {} bytes, edits {edits:?} (edited image saved at {}): {}",
            input.len(),
            saved.display(),
            if verdict.is_err() { "hang" } else { "panic" }
        );
    }
}

#[test]
fn mutated_images_never_panic_or_hang() {
    let dir = tempfile::tempdir().expect("temp dir");
    let seeds = seeds(dir.path());
    let seconds: Option<u64> = std::env::var("QCOWFS_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok());
    let seed = std::env::var("QCOWFS_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15);
    let mut rng = Rng::new(seed);
    let start = Instant::now();
    let mut cases = 0u64;
    loop {
        match seconds {
            Some(s) if start.elapsed() >= Duration::from_secs(s) => break,
            None if cases >= DEFAULT_CASES => break,
            _ => {}
        }
        let base = &seeds[rng.below(seeds.len() as u64) as usize];
        let input = mutate(&mut rng, base);
        // Writing is slower (a flush per case): every fourth case.
        check(dir.path(), input, cases % 4 == 0);
        cases += 1;
    }
    eprintln!(
        "fuzz: {cases} cases in {:.1}s, no panic, no hang",
        start.elapsed().as_secs_f64()
    );
    assert!(cases > 0);
}

#[test]
fn regression_inputs_never_panic_or_hang() {
    let dir = tempfile::tempdir().expect("temp dir");
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus");
    let mut n = 0;
    for entry in std::fs::read_dir(&corpus).expect("tests/fuzz_corpus exists") {
        let path = entry.expect("corpus entry").path();
        if path.extension().is_some_and(|e| e == "bin") {
            check(
                dir.path(),
                std::fs::read(&path).expect("readable corpus file"),
                true,
            );
            n += 1;
        }
    }
    assert!(n > 0, "the regression corpus is empty");
}

/// A random edit: any field, any instance, a value that is mostly one worth trying.
fn random_edit(rng: &mut Rng) -> Edit {
    let field = Field::ALL[rng.below(Field::ALL.len() as u64) as usize];
    let value = match rng.below(4) {
        0 | 1 => INTERESTING[rng.below(INTERESTING.len() as u64) as usize],
        2 => rng.below(1 << 16),
        _ => rng.next_u64(),
    };
    Edit {
        field,
        index: rng.below(1 << 16) as u32,
        value,
    }
}

/// The stable counterpart of the cargo-fuzz `fields` target: seeds with 1-4 named fields edited.
#[test]
fn field_edits_never_panic_or_hang() {
    let dir = tempfile::tempdir().expect("temp dir");
    let seeds = seeds(dir.path());
    let seconds = std::env::var("QCOWFS_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_FIELD_SECONDS);
    let seed = std::env::var("QCOWFS_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x2545_f491_4f6c_dd1d);
    let mut rng = Rng::new(seed);
    let start = Instant::now();
    let mut cases = 0u64;
    while start.elapsed() < Duration::from_secs(seconds) {
        let base = seeds[rng.below(seeds.len() as u64) as usize].clone();
        let edits: Vec<Edit> = (0..1 + rng.below(4))
            .map(|_| random_edit(&mut rng))
            .collect();
        check_with(dir.path(), base, &edits, true);
        cases += 1;
    }
    eprintln!(
        "fuzz fields: {cases} cases in {:.1}s, no panic, no hang",
        start.elapsed().as_secs_f64()
    );
    assert!(cases > 0);
}

/// Cases of the write oracle in the normal test run (each opens its input three times).
const DEFAULT_WRITE_CASES: u64 = 300;

/// Run the write oracle on one input in a thread: a panic, a hang or a misplaced write fails.
fn check_write_case(dir: &Path, input: Vec<u8>) -> WriteVerdict {
    let (tx, rx) = mpsc::channel();
    let work_dir = dir.to_path_buf();
    let data = input.clone();
    std::thread::spawn(move || {
        let outcome = std::panic::catch_unwind(|| check_write(&work_dir, &data));
        let _ = tx.send(outcome.map_err(|_| ()));
    });
    let saved = || {
        let path =
            std::env::temp_dir().join(format!("qcowfs-write-failure-{}.bin", std::process::id()));
        let _ = std::fs::write(&path, &input);
        path
    };
    match rx.recv_timeout(CASE_LIMIT) {
        Ok(Ok(Ok(verdict))) => verdict,
        Ok(Ok(Err(misplaced))) => panic!("{misplaced} (input saved at {})", saved().display()),
        Ok(Err(())) => panic!("panic (input saved at {})", saved().display()),
        Err(_) => panic!("hang (input saved at {})", saved().display()),
    }
}

#[test]
fn writes_through_mutated_images_are_refused_or_change_exactly_their_bytes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let seeds = seeds(dir.path());
    let seconds: Option<u64> = std::env::var("QCOWFS_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok());
    let mut rng = Rng::new(0x0005_eed0_fa11);
    let start = Instant::now();
    let (mut cases, mut exact) = (0u64, 0u64);
    loop {
        match seconds {
            Some(s) if start.elapsed() >= Duration::from_secs(s) => break,
            None if cases >= DEFAULT_WRITE_CASES => break,
            _ => {}
        }
        let base = &seeds[rng.below(seeds.len() as u64) as usize];
        // Half the cases write through an unchanged seed (the oracle itself is checked there).
        let mut input = match cases % 2 {
            0 => base.clone(),
            _ => mutate(&mut rng, base),
        };
        input.extend_from_slice(&rng.next_u64().to_le_bytes());
        if check_write_case(dir.path(), input) == WriteVerdict::Exact {
            exact += 1;
        }
        cases += 1;
    }
    eprintln!(
        "write oracle: {cases} cases ({exact} stored exactly, the rest refused) in {:.1}s",
        start.elapsed().as_secs_f64()
    );
    // The unchanged seeds take most writes: an oracle that refuses everything proves nothing.
    assert!(
        exact >= cases / 4,
        "only {exact} of {cases} writes were stored"
    );
}

#[test]
fn a_write_through_an_l2_entry_pointing_inside_a_cluster_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("u.qcow2");
    let image = common::qcow2(&path, 1 << 30).create();
    image.write_pattern(0, 64 << 10, 0x5a);
    image.write_pattern(512 << 20, 64 << 10, 0x5b);
    // The first L2 entry, 512 bytes into its data cluster (the L2 table of 512 MiB follows it).
    common::patch_be_u64(&path, 0x40000, (1 << 63) | 0x50200);
    let bytes = std::fs::read(&path).expect("read image");
    let verdict = check_write_at(dir.path(), &bytes, &|_| (0xfe00, vec![0xee; 512]));
    assert_eq!(verdict.expect("no misplaced write"), WriteVerdict::Refused);
    // The same write through the undamaged entry is stored, and exactly.
    common::patch_be_u64(&path, 0x40000, (1 << 63) | 0x50000);
    let bytes = std::fs::read(&path).expect("read image");
    let verdict = check_write_at(dir.path(), &bytes, &|_| (0xfe00, vec![0xee; 512]));
    assert_eq!(verdict.expect("no misplaced write"), WriteVerdict::Exact);
}

#[test]
fn write_regression_inputs_are_refused_or_change_exactly_their_bytes() {
    // write-*.bin: an image then 8 bytes placing the write (see qcowfs::fuzz::check_write).
    // write-refcounts-zeroed-data-reused.bin: every refcount 0, so the allocator took a cluster
    // an L2 entry still named and the write overwrote guest offset 0x3e8.
    let dir = tempfile::tempdir().expect("temp dir");
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus");
    let mut n = 0;
    for entry in std::fs::read_dir(&corpus).expect("tests/fuzz_corpus exists") {
        let path = entry.expect("corpus entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("write-") && name.ends_with(".bin") {
            let input = std::fs::read(&path).expect("readable corpus file");
            check_write_case(dir.path(), input);
            n += 1;
        }
    }
    assert!(n > 0, "no write-*.bin regression input");
}
