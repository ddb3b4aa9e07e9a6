//! `qemu-img check` as the oracle of consistency: parsed JSON, and the assertions the tests make.

use serde_json::Value;

use super::image::Image;
use super::run::{describe_status, run, Run};

/// `qemu-img check --output=json [EXTRA]` of `image`'s chain, whatever its exit code, parsed.
pub fn qemu_check_json(image: &Image, extra: &[&str]) -> (Run, Value) {
    let (mut args, target) = image.qemu_open_args();
    args.insert(0, "check".into());
    args.insert(1, "--output=json".into());
    for (i, e) in extra.iter().enumerate() {
        args.insert(2 + i, (*e).into());
    }
    args.push(target);
    let r = run("qemu-img", &args);
    let v = serde_json::from_slice(&r.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img check --output=json gave no JSON ({e}; {}):\n{}\n{}",
            describe_status(r.status),
            r.stdout_str(),
            r.stderr
        )
    });
    (r, v)
}

/// A counter of `qemu-img check` JSON (absent means 0).
pub fn json_count(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// `qemu-img check`: exit 0 and no corruption, leak or check error.
pub fn assert_check_clean(image: &Image) {
    assert_check(image, true);
}

/// `qemu-img check`: no corruption and no check error; leaked clusters are allowed (exit 0 or 3).
pub fn assert_check_no_corruption(image: &Image) {
    assert_check(image, false);
}

fn assert_check(image: &Image, no_leaks: bool) {
    let (r, v) = qemu_check_json(image, &[]);
    let status_ok = matches!(r.status.code(), Some(0)) || (!no_leaks && r.status.code() == Some(3));
    assert!(
        status_ok
            && json_count(&v, "corruptions") == 0
            && (!no_leaks || json_count(&v, "leaks") == 0)
            && json_count(&v, "check-errors") == 0,
        "qemu-img check of {} is not clean ({}; exit 2 = corruption, 3 = leaks):\n{}\n{}",
        image.path.display(),
        describe_status(r.status),
        r.stdout_str(),
        r.stderr
    );
}
