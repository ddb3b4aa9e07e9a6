//! `qemu-img check` as the oracle of consistency: parsed JSON, and the assertions the tests make.
//! Every test that asks qemu-img whether an image is consistent goes through here.

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
            "qemu-img check --output=json gave no JSON ({e}; {}):\n{}\n{}\ncommand: {}",
            describe_status(r.status),
            r.stdout_str(),
            r.stderr,
            r.command
        )
    });
    (r, v)
}

/// A counter of `qemu-img check` JSON (absent means 0: qemu-img leaves out the zero counters).
pub fn json_count(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// What `qemu-img check` may find and still pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leaks {
    /// Exit 0: no corruption, no leak, no check error.
    Forbidden,
    /// Exit 0 or 3: leaked clusters (what a crash may leave, and qemu can reclaim) are allowed;
    /// corruption and check errors are not.
    Allowed,
}

/// `qemu-img check [EXTRA]` of `image` judged by `leaks`: the leak count when it passes, else a
/// message that starts with `when` and quotes qemu-img's output (for tests that collect failures
/// instead of stopping at the first).
pub fn qemu_check(image: &Image, extra: &[&str], leaks: Leaks, when: &str) -> Result<u64, String> {
    let (r, v) = qemu_check_json(image, extra);
    let status_ok = match leaks {
        Leaks::Forbidden => r.status.code() == Some(0),
        Leaks::Allowed => matches!(r.status.code(), Some(0) | Some(3)),
    };
    let leaked = json_count(&v, "leaks");
    if status_ok
        && v.is_object()
        && json_count(&v, "corruptions") == 0
        && (leaks == Leaks::Allowed || leaked == 0)
        && json_count(&v, "check-errors") == 0
    {
        return Ok(leaked);
    }
    let prefix = if when.is_empty() {
        String::new()
    } else {
        format!("{when}: ")
    };
    Err(format!(
        "{prefix}qemu-img check of {} is not {} ({}; exit 2 = corruption, 3 = leaks):\n{}\n{}\ncommand: {}",
        image.path.display(),
        match leaks {
            Leaks::Forbidden => "clean",
            Leaks::Allowed => "free of corruption",
        },
        describe_status(r.status),
        r.stdout_str(),
        r.stderr,
        r.command
    ))
}

/// `qemu-img check`: exit 0 and no corruption, leak or check error.
pub fn assert_check_clean(image: &Image) {
    assert_check_clean_when(image, "");
}

/// [`assert_check_clean`], the failure message starting with `when` ("after seal", "round 3").
pub fn assert_check_clean_when(image: &Image, when: &str) {
    if let Err(e) = qemu_check(image, &[], Leaks::Forbidden, when) {
        panic!("{e}");
    }
}

/// `qemu-img check`: no corruption and no check error; leaked clusters are allowed (exit 0 or 3).
pub fn assert_check_no_corruption(image: &Image) {
    assert_check_no_corruption_when(image, "");
}

/// [`assert_check_no_corruption`], the failure message starting with `when`.
pub fn assert_check_no_corruption_when(image: &Image, when: &str) {
    if let Err(e) = qemu_check(image, &[], Leaks::Allowed, when) {
        panic!("{e}");
    }
}

/// `qemu-img check -r leaks`, which must end with a clean image (exit 0), then
/// [`assert_check_clean`]: leaks are all the image may have had.
pub fn repair_leaks_then_assert_clean(image: &Image, when: &str) {
    if let Err(e) = qemu_check(image, &["-r", "leaks"], Leaks::Forbidden, when) {
        panic!("{e}");
    }
    assert_check_clean_when(image, when);
}
