//! qemu-img and qemu-io for the qcow2 layer's unit tests: the oracle they judge images by.

use std::path::Path;
use std::process::Command;

/// Run `program ARGS PATH TAIL`; it must start and exit 0. Returns what it printed.
pub fn run(program: &str, args: &[&str], path: &Path, tail: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .arg(path)
        .args(tail)
        .output()
        .unwrap_or_else(|e| panic!("{program} is required: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?} failed:\n{text}");
    text
}

/// What `qemu-img check` found: (corruptions, leaks); exit 0 (clean) or 3 (leaks only), anything
/// else, or a check error, fails the test.
pub fn qemu_check(path: &Path) -> (u64, u64) {
    qemu_check_args(&[], path.as_os_str())
}

/// `qemu_check` with more options before the image (`--object ... --image-opts` for an encrypted
/// one, whose `image` is then the options string).
pub fn qemu_check_args(options: &[&str], image: &std::ffi::OsStr) -> (u64, u64) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json"])
        .args(options)
        .arg(image)
        .output()
        .expect("qemu-img is required");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img check printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let count = |key: &str| v.get(key).and_then(|n| n.as_u64()).unwrap_or(0);
    assert_eq!(count("check-errors"), 0, "qemu-img check: {v}");
    let code = out.status.code();
    assert!(
        code == Some(0) || code == Some(3),
        "qemu-img check: {code:?} {v}"
    );
    (count("corruptions"), count("leaks"))
}
