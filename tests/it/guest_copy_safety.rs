//! `copy-out` never leaves a partial file under its final name: a copy killed (-9) while it
//! writes a large file leaves that name absent (only a hidden `.NAME.qcowfs-part-*` file), and a
//! finished copy leaves no such file behind. The guest is ext4 made by `mke2fs -d` in a legacy
//! AES qcow2 made by `qemu-img convert`.

use crate::common;

use common::*;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const PASS: &str = "copy safety secret";

/// A file large enough to be caught while it is written (the copy takes a good part of a
/// second at least); not zeros, which a copy skips as holes.
const BIG: usize = 384 << 20;

/// Whether `dir` holds a temporary file of a copy of `name`.
fn has_part(dir: &Path, name: &str) -> bool {
    let prefix = format!(".{name}.qcowfs-part-");
    fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
    })
}

#[test]
fn a_copy_killed_mid_file_leaves_no_partial_file_under_the_final_name() {
    let dir = workdir();
    let work = dir.path();
    let src = work.join("src");
    fs::create_dir_all(&src).unwrap();
    let block: Vec<u8> = (0..1 << 20).map(|i| (i % 251 + 1) as u8).collect();
    let big: Vec<u8> = block.iter().copied().cycle().take(BIG).collect();
    fs::write(src.join("big"), &big).unwrap();
    drop(big);
    let raw = work.join("guest.raw");
    mkfs_ext4_from(&src, &raw, Some("512M"));
    let image = encrypted(&raw, "aes", PASS);
    let key = passphrase_file(work, "key", PASS);
    let out = work.join("out");
    fs::create_dir(&out).unwrap();

    let mut child = Command::new(qcowfs_bin())
        .args(["copy-out", "--passphrase-file"])
        .arg(&key)
        .arg(&image)
        .arg("/big")
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start qcowfs copy-out");
    let start = Instant::now();
    let caught = loop {
        if has_part(&out, "big") {
            break true;
        }
        if child.try_wait().expect("wait").is_some() || start.elapsed() > Duration::from_secs(60) {
            break false;
        }
        thread::sleep(Duration::from_millis(1));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        caught,
        "the copy ended (or never began) before its temporary file was seen"
    );
    assert!(
        !out.join("big").exists(),
        "a copy killed mid-file left a file under the final name"
    );

    // A finished copy: the file whole under its name, no temporary file left.
    let done = work.join("done");
    fs::create_dir(&done).unwrap();
    let mut a = vec!["copy-out".into(), "--passphrase-file".into()];
    a.extend([key.into_os_string(), image.into_os_string(), "/big".into()]);
    a.push(done.clone().into_os_string());
    qcowfs(&a).assert_success();
    assert_eq!(fs::metadata(done.join("big")).unwrap().len(), BIG as u64);
    assert!(
        !has_part(&done, "big"),
        "a finished copy left its temporary file"
    );
}
