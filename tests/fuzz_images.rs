//! Randomized robustness test: mutate real qemu-img-made images (bit flips, boundary values in header
//! and table fields, truncation) and feed them through open, reads and a write. No input may panic or
//! hang. A bounded number of cases runs in the normal suite; `scripts/fuzz.sh SECONDS` runs longer via
//! QCOWFS_FUZZ_SECONDS. Inputs in tests/fuzz_corpus/ are regression cases found this way.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use qcowfs::fuzz::{read_image, write_image, PASSPHRASE};

/// Cases in the normal test run.
const DEFAULT_CASES: u64 = 1500;
/// A case that takes longer than this is a hang.
const CASE_LIMIT: Duration = Duration::from_secs(20);

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

fn qemu(tool: &str, args: &[&str]) {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} is required: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn secret() -> String {
    format!("secret,id=s0,data={}", String::from_utf8_lossy(PASSPHRASE))
}

/// Small images of many kinds, each with some data.
fn seeds(dir: &Path) -> Vec<Vec<u8>> {
    let specs: &[(&str, &str)] = &[
        ("plain64k", "cluster_size=65536"),
        ("plain512", "cluster_size=512,refcount_bits=1"),
        ("v2", "compat=0.10,cluster_size=4096"),
        ("extl2", "extended_l2=on,cluster_size=16384"),
        ("r64", "refcount_bits=64,cluster_size=4096"),
        (
            "aes",
            "encrypt.format=aes,encrypt.key-secret=s0,cluster_size=4096",
        ),
        (
            "luks",
            "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=1,cluster_size=4096",
        ),
    ];
    let mut out = Vec::new();
    for (name, opts) in specs {
        let img = dir.join(format!("{name}.qcow2"));
        let img_s = img.to_str().unwrap_or_default();
        qemu(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "--object",
                &secret(),
                "-o",
                opts,
                img_s,
                "2M",
            ],
        );
        let spec = format!("driver=qcow2,file.filename={img_s},encrypt.key-secret=s0");
        qemu(
            "qemu-io",
            &[
                "--object",
                &secret(),
                "--image-opts",
                &spec,
                "-c",
                "write -P 0x61 1000 70000",
                "-c",
                "write -z 300k 64k",
                "-c",
                "write -P 0x62 1536k 5000",
            ],
        );
        if *name == "plain64k" {
            qemu("qemu-img", &["snapshot", "-c", "snap", img_s]);
            qemu(
                "qemu-io",
                &["-f", "qcow2", "-c", "write -P 0x63 0 4096", img_s],
            );
        }
        out.push(std::fs::read(&img).unwrap_or_default());
    }
    let compressed = dir.join("zstd.qcow2");
    let src = dir.join("plain512.qcow2");
    qemu(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd,cluster_size=4096",
            src.to_str().unwrap_or_default(),
            compressed.to_str().unwrap_or_default(),
        ],
    );
    out.push(std::fs::read(&compressed).unwrap_or_default());
    out
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
                let at = rng.below(span as u64) as usize;
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
                    (rng.below(data.len() as u64 / 8) as usize * 8, 8)
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
    let (tx, rx) = mpsc::channel();
    let work_dir = dir.to_path_buf();
    let data = input.clone();
    std::thread::spawn(move || {
        let outcome = std::panic::catch_unwind(|| {
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
        let _ = std::fs::write(&saved, &input);
        panic!(
            "input {} (saved at {}): {}",
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
    let mut rng = Rng(seed);
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
