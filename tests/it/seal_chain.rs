//! `qcowfs seal` of whole chains: one self-contained encrypted image that `qemu-img compare` finds
//! equal to the chain it replaced, with no plaintext of the base left in it; what it refuses (a
//! locked image, internal snapshots, too little room) without changing anything; and a seal
//! killed midway that a second one completes. The zeros it skips are tests/it/seal.rs's.
//!
//! Each test prints the commands it ran (shown on failure: the steps to reproduce).

use crate::common;

use common::*;
use sha2::{Digest, Sha256};
use std::ffi::OsString;
use std::fs::{self};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

const PASS: &str = "seal chain secret";

const CLUSTER: u64 = 64 * KIB;

fn sha256_of(path: &Path) -> String {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Offset of the first occurrence of `needle` in `haystack`.
fn find_bytes(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let mut i = 0;
    while i + needle.len() <= haystack.len() {
        match haystack[i..haystack.len() - rest.len()]
            .iter()
            .position(|&b| b == first)
        {
            None => return None,
            Some(p) => {
                let at = i + p;
                if &haystack[at + 1..at + needle.len()] == rest {
                    return Some(at);
                }
                i = at + 1;
            }
        }
    }
    None
}

/// Marks plaintext that must never reach an encrypted file.
const MARKER: &[u8] = b"QCOWFS-BASE-PLAINTEXT-MARKER";

/// 4 KiB of recognisable plaintext: the marker, the block number, a line feed, repeated.
fn marker_blocks(first: u64, count: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity((count * 4096) as usize);
    for n in first..first + count {
        let line = format!("{}-{n:06}\n", String::from_utf8_lossy(MARKER));
        let mut block: Vec<u8> = line.bytes().cycle().take(4096).collect();
        block[4095] = b'\n';
        out.extend_from_slice(&block);
    }
    out
}

/// `qcowfs seal [EXTRA] --passphrase-file KEY IMAGE`.
fn seal(image: &Path, dir: &Path, extra: &[&str]) -> Run {
    let mut args: Vec<OsString> = vec!["seal".into()];
    args.extend(extra.iter().map(OsString::from));
    args.extend(passphrase_opts(dir, PASS));
    args.push(image.into());
    qcowfs(&args)
}

/// After a seal: no backing file, check clean, the chain's recorded guest view, fully encrypted
/// coverage, no marker in the file, and qcowfs reads it as qemu does.
fn assert_sealed(top: &Image, recorded_raw: &Path, data_bytes_before: u64, dir: &Path) {
    let sealed = Image {
        path: top.path.clone(),
        format: Format::Qcow2,
        size: top.size,
        secrets: vec![Some(PASS.into())],
    };
    let qinfo = sealed.qemu_info();
    assert!(
        qinfo.get("backing-filename").is_none() && qinfo.get("full-backing-filename").is_none(),
        "qemu-img info still shows a backing file:\n{qinfo:#}"
    );
    assert_eq!(qinfo["encrypted"], true, "{qinfo:#}");
    assert_check_clean(&sealed);
    let r = qemu_compare_with_raw(&sealed, recorded_raw);
    assert!(
        r.status.success(),
        "qemu-img compare of the sealed image with the chain's recorded raw image: {}\n{}{}",
        describe_status(r.status),
        r.stdout_str(),
        r.stderr
    );
    let file = fs::read(&sealed.path).expect("read sealed image");
    if let Some(at) = find_bytes(&file, MARKER) {
        panic!(
            "base plaintext found in the sealed image file at offset {at} (0x{at:x}, cluster {})",
            at as u64 / CLUSTER
        );
    }
    let info = qcowfs_info_json(&sealed.path, &[]);
    assert_eq!(info["layers"].as_array().map(Vec::len), Some(1), "{info:#}");
    assert_eq!(
        info["coverage"]["unencrypted_bytes"].as_u64(),
        Some(0),
        "{info:#}"
    );
    assert_eq!(
        info["coverage"]["data_bytes"].as_u64(),
        Some(data_bytes_before),
        "the sealed image provides what the chain provided"
    );
    let expected = fs::read(recorded_raw).expect("read recorded raw");
    let mut ro = passphrase_opts(dir, PASS);
    ro.push("--read-only".into());
    let m = Mount::new(&sealed.path, &ro);
    assert_same_bytes(
        &read_all_bounded(&m.disk()),
        &expected,
        "the sealed image through qcowfs",
    );
    m.umount();
}

#[test]
fn sealing_an_aes_overlay_over_a_raw_base_encrypts_everything_and_leaves_the_base_untouched() {
    let dir = workdir();
    let (top_path, base_path) = nova_paths(dir.path());
    // The base (the image) is smaller than the instance disk (the flavor), as in nova.
    let base = create_raw(&base_path, 24 * MIB);
    base.write_bytes(0, &marker_blocks(0, 512)); // 0..2 MiB
    base.write_bytes(10 * MIB, &marker_blocks(1000, 256)); // 10..11 MiB
    base.write_bytes(23 * MIB, &marker_blocks(2000, 256)); // the base's last MiB
    let top = qcow2(&top_path, 32 * MIB)
        .aes(PASS)
        .backing_named(&base, "../_base/3b2c1f0e8d7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c")
        .create();
    top.write_random(MIB, 512 * KIB as usize, 1); // over base data
    top.write_random(5 * MIB + 333, 10_000, 2); // beside it, unaligned
    top.write_random(28 * MIB, MIB as usize, 3); // past the base's end
    top.write_zeroes(10 * MIB, 64 * KIB); // hides base data
    let recorded = dir.path().join("chain.raw");
    top.convert_raw(&recorded);
    let base_sha = sha256_of(&base.path);
    assert!(
        find_bytes(&fs::read(&base.path).expect("read base"), MARKER).is_some(),
        "the base holds the markers in plaintext"
    );
    let before = qcowfs_info_json(&top.path, &[]);
    let data_before = before["coverage"]["data_bytes"]
        .as_u64()
        .expect("data_bytes");
    assert!(before["coverage"]["unencrypted_bytes"].as_u64() > Some(0));

    let r = seal(&top.path, dir.path(), &[]);
    r.assert_success();
    assert_eq!(sha256_of(&base.path), base_sha, "the base file changed");
    assert_sealed(&top, &recorded, data_before, dir.path());
    let text = qcowfs(["info".as_ref(), top.path.as_os_str()]);
    assert!(
        !text.stdout_str().contains("warning: "),
        "info still warns after sealing:\n{}",
        text.stdout_str()
    );
}

#[test]
fn sealing_a_three_layer_chain_with_a_plain_qcow2_base_copies_both_lower_layers() {
    let dir = workdir();
    let size = 16 * MIB;
    let raw = create_raw(dir.path().join("base.raw"), size);
    raw.write_bytes(0, &marker_blocks(0, 256));
    raw.write_bytes(12 * MIB, &marker_blocks(300, 64));
    let mid = qcow2(dir.path().join("mid.qcow2"), size)
        .backing_named(&raw, "base.raw")
        .create();
    mid.write_bytes(4 * MIB, &marker_blocks(5000, 128));
    mid.write_compressed(8 * MIB, &marker_blocks(6000, 32));
    mid.write_zeroes(12 * MIB, 64 * KIB); // hides some of the raw base
    let top = qcow2(dir.path().join("top.qcow2"), size)
        .aes(PASS)
        .backing_named(&mid, "mid.qcow2")
        .create();
    top.write_random(4 * MIB + 100 * KIB, 300 * KIB as usize, 11);
    top.write_random(14 * MIB, 512 * KIB as usize, 12);
    let recorded = dir.path().join("chain.raw");
    top.convert_raw(&recorded);
    let shas = [sha256_of(&raw.path), sha256_of(&mid.path)];
    let data_before = qcowfs_info_json(&top.path, &[])["coverage"]["data_bytes"]
        .as_u64()
        .expect("data_bytes");

    // --progress without a terminal must not get in the way.
    let r = seal(&top.path, dir.path(), &["--progress"]);
    r.assert_success();
    assert_eq!(
        [sha256_of(&raw.path), sha256_of(&mid.path)],
        shas,
        "a backing file changed"
    );
    assert_sealed(&top, &recorded, data_before, dir.path());
}

#[test]
fn sealing_an_image_without_a_backing_file_changes_nothing() {
    let dir = workdir();
    let image = qcow2(dir.path().join("alone.qcow2"), 8 * MIB)
        .aes(PASS)
        .create();
    image.write_random(MIB, 256 * KIB as usize, 5);
    let sha = sha256_of(&image.path);
    let r = seal(&image.path, dir.path(), &[]);
    r.assert_success();
    assert_eq!(
        sha256_of(&image.path),
        sha,
        "sealing a self-contained image changed it"
    );
    assert_check_clean(&image);
}

#[test]
fn sealing_an_image_mounted_read_write_fails_with_a_lock_error() {
    let dir = workdir();
    let size = 8 * MIB;
    let base = create_raw(dir.path().join("base.raw"), size);
    base.write_bytes(0, &marker_blocks(0, 64));
    let top = qcow2(dir.path().join("disk"), size)
        .aes(PASS)
        .backing_named(&base, "base.raw")
        .create();
    top.write_random(2 * MIB, 128 * KIB as usize, 7);
    let m = Mount::new(&top.path, &passphrase_opts(dir.path(), PASS));
    let sha = sha256_of(&top.path);
    let r = seal(&top.path, dir.path(), &[]);
    assert_one_line_error(&r, &["disk"], Duration::from_secs(10));
    assert_eq!(
        r.status.code(),
        Some(5),
        "exit status of a seal refused: in use"
    );
    assert!(
        r.stderr.contains("in use"),
        "the error says the image is in use: {}",
        r.stderr
    );
    assert_eq!(
        sha256_of(&top.path),
        sha,
        "a refused seal changed the image"
    );
    m.umount();
    let info = top.qemu_info();
    assert!(
        info.get("backing-filename").is_some(),
        "the image lost its backing file:\n{info:#}"
    );
}

#[test]
fn sealing_an_image_with_internal_snapshots_is_refused_in_one_line_and_changes_nothing() {
    let dir = workdir();
    let size = 8 * MIB;
    let base = create_raw(dir.path().join("base.raw"), size);
    base.write_bytes(0, &marker_blocks(0, 2048)); // the whole base
    let top = qcow2(dir.path().join("disk"), size)
        .aes(PASS)
        .backing_named(&base, "base.raw")
        .create();
    top.write_random(MIB, MIB as usize, 21);
    top.snapshot("before-seal");
    top.write_random(4 * MIB, MIB as usize, 22);
    let sha = sha256_of(&top.path);

    // The snapshot reads the base wherever it has no cluster of its own: sealing would change it.
    let r = seal(&top.path, dir.path(), &[]);
    assert_one_line_error(&r, &["disk"], Duration::from_secs(30));
    assert!(r.stderr.contains("snapshot"), "says why: {}", r.stderr);
    assert_eq!(
        sha256_of(&top.path),
        sha,
        "a refused seal changed the image"
    );
}

/// A tmpfs of a given size, unmounted on drop.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn new(size: &str) -> Tmpfs {
        let dir = tempfile::Builder::new()
            .prefix("qcowfs-tmpfs-")
            .tempdir()
            .expect("temp folder");
        let path = dir.path().join("small");
        fs::create_dir(&path).expect("mkdir tmpfs target");
        run_ok(
            "mount",
            [
                "-t".as_ref(),
                "tmpfs".as_ref(),
                "-o".as_ref(),
                format!("size={size}").as_ref(),
                "tmpfs".as_ref(),
                path.as_os_str(),
            ],
        );
        Tmpfs { path, _dir: dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if is_mounted(&self.path) {
            let bounded = Duration::from_secs(20);
            let r = run_with(Command::new("umount").arg(&self.path), None, bounded);
            if !r.status.success() {
                let _ = run_with(
                    Command::new("umount").arg("-l").arg(&self.path),
                    None,
                    bounded,
                );
            }
        }
    }
}

#[test]
fn sealing_refuses_when_the_host_file_system_lacks_room_and_changes_nothing() {
    let dir = workdir();
    let small = Tmpfs::new("24M");
    let size = 64 * MIB;
    let base = create_raw(dir.path().join("base.raw"), size);
    base.write_pattern(0, 40 * MIB, 0x77);
    let top = qcow2(small.path.join("disk"), size)
        .aes(PASS)
        .backing(&base)
        .create();
    top.write_random(MIB, 64 * KIB as usize, 31);
    let sha = sha256_of(&top.path);
    let r = seal(&top.path, dir.path(), &[]);
    assert_one_line_error(&r, &["disk", "small"], Duration::from_secs(10));
    assert_eq!(
        r.status.code(),
        Some(8),
        "not enough space: a host I/O failure"
    );
    assert!(
        r.stderr.contains("space"),
        "the error says there is not enough space: {}",
        r.stderr
    );
    assert_eq!(
        sha256_of(&top.path),
        sha,
        "a refused seal changed the image"
    );
    assert_check_clean(&top);
}

#[test]
fn a_seal_killed_midway_leaves_a_consistent_image_that_a_second_seal_completes() {
    let dir = workdir();
    let size = 128 * MIB;
    let base = create_raw(dir.path().join("base.raw"), size);
    base.write_pattern(0, size, 0x77);
    let top = qcow2(dir.path().join("disk"), size)
        .aes(PASS)
        .backing_named(&base, "base.raw")
        .create();
    top.write_random(3 * MIB, 256 * KIB as usize, 41);
    let recorded = dir.path().join("chain.raw");
    top.convert_raw(&recorded);

    // SIGKILL once a third of the data has reached the image file.
    let key = passphrase_file(dir.path(), "key", PASS);
    let mut child = Command::new(qcowfs_bin())
        .arg("seal")
        .arg("--passphrase-file")
        .arg(&key)
        .arg(&top.path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start qcowfs seal");
    let start = Instant::now();
    let finished = loop {
        if child.try_wait().expect("wait for seal").is_some() {
            break true;
        }
        let len = fs::metadata(&top.path).map(|m| m.len()).unwrap_or(0);
        if len > size / 3 {
            break false;
        }
        if start.elapsed() > COMMAND_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "seal of {} MiB did not get a third of the way within {COMMAND_TIMEOUT:?}",
                size >> 20
            );
        }
        thread::sleep(Duration::from_millis(2));
    };
    if !finished {
        child.kill().expect("SIGKILL seal");
    }
    let _ = child.wait();
    eprintln!(
        "seal {} before the kill",
        if finished { "finished" } else { "was killed" }
    );

    // Whatever the moment: no corruption (leaks allowed), the same guest view.
    let assert_consistent = |when: &str| {
        assert_check_no_corruption_when(&top, when);
        let r = qemu_compare_with_raw(&top, &recorded);
        assert!(
            r.status.success(),
            "{when}: the guest view changed: {}{}",
            r.stdout_str(),
            r.stderr
        );
    };
    assert_consistent("after SIGKILL during seal");
    let r = seal(&top.path, dir.path(), &[]);
    r.assert_success();
    assert!(
        top.qemu_info().get("backing-filename").is_none(),
        "the second seal left the backing file"
    );
    assert_consistent("after the second seal");
    // What an interrupted seal may leave behind is leaked clusters, which qemu reclaims.
    repair_leaks_then_assert_clean(&top, "after the second seal, leaks repaired");
    let file = fs::read(&top.path).expect("read sealed image");
    assert!(
        find_bytes(&file, &[0x77; 512]).is_none(),
        "a plaintext base sector is in the sealed image"
    );
}

#[test]
fn a_seal_that_commits_in_several_batches_logs_nothing_but_its_summary() {
    let dir = workdir();
    let size = 96 * MIB;
    let base = create_raw(dir.path().join("base.raw"), size);
    base.write_pattern(0, size, 0x66);
    let top = qcow2(dir.path().join("disk"), size)
        .aes(PASS)
        .backing_named(&base, "base.raw")
        .create();
    top.write_random(0, 64 * KIB as usize, 51);
    let r = seal(&top.path, dir.path(), &[]);
    r.assert_success();
    let noise: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("overlap"))
        .collect();
    assert!(
        noise.is_empty(),
        "seal of a healthy image logged warnings (an image reported as damaged):\n{}",
        r.stderr
    );
    assert_check_clean(&top);
}

/// Ctrl-C in the middle of a seal: it stops at the next cluster with exit status 130 and a line
/// saying so; the image still has its backing file, `qemu-img check` is clean and the guest
/// reads as before; a second seal finishes the job.
#[test]
fn an_interrupted_seal_says_so_and_leaves_an_image_that_reads_as_before() {
    let dir = workdir();
    let (top_path, base_path) = nova_paths(dir.path());
    // Large enough that the seal is still copying when the signal comes (it is sent as soon as
    // the image starts to grow); a slower (busy) machine only widens the window.
    let base_size = 512 * MIB;
    {
        use std::io::Write;
        let mut f = fs::File::create(&base_path).expect("create base");
        let chunk = vec![0x5au8; (64 * MIB) as usize];
        for _ in 0..base_size / (64 * MIB) {
            f.write_all(&chunk).expect("write base");
        }
    }
    let base = Image::plain(&base_path, Format::Raw, base_size);
    let top = qcow2(&top_path, base_size)
        .aes(PASS)
        .backing(&base)
        .create();
    top.write_random(0, 64 * KIB as usize, 9);
    let recorded = dir.path().join("chain.raw");
    top.convert_raw(&recorded);
    let start_len = fs::metadata(&top.path).expect("top").len();
    let mut args: Vec<OsString> = vec!["seal".into(), "--no-progress".into()];
    args.extend(passphrase_opts(dir.path(), PASS));
    args.push(top.path.clone().into());
    let mut child = std::process::Command::new(qcowfs_bin())
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run qcowfs seal");
    loop {
        if child.try_wait().expect("wait").is_some() {
            panic!("the seal finished before it could be interrupted");
        }
        if fs::metadata(&top.path).expect("top").len() > start_len + 4 * MIB {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().expect("wait for seal");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("seal interrupted") && stderr.contains("run qcowfs seal again"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let info = top.qemu_info();
    assert!(info.get("backing-filename").is_some(), "{info:#}");
    assert_check_clean(&top);
    let r = qemu_compare_with_raw(&top, &recorded);
    assert!(
        r.status.success(),
        "the interrupted image reads differently: {}",
        r.stdout_str()
    );
    let again = seal(&top.path, dir.path(), &["--no-progress"]);
    again.assert_success();
    assert_sealed(&top, &recorded, base_size, dir.path());
}
