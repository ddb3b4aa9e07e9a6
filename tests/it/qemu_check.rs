//! `qcowfs check`: QEMU's `qemu-img check` on encrypted images, which it cannot open from the
//! command line QEMU's own messages suggest. A refcount zeroed under the L1 table is found (exit
//! 7), `-r all` repairs it and the guest still reads as before; a wrong passphrase is refused
//! before qemu-img runs; the passphrase never appears on qemu-img's command line.

use crate::common;

use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

const PASS: &str = "check me";

fn key(dir: &Path, text: &str) -> std::path::PathBuf {
    let p = dir.join(format!("key-{}", text.len()));
    fs::write(&p, text).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// Zero the refcount of the cluster holding the L1 table: the corruption qemu-img check reports
/// as "refcount=0 reference=1" and `-r all` repairs.
fn zero_l1_refcount(image: &Path) {
    let l1 = read_be_u64(image, 40);
    let cluster_bits = read_be_u32(image, 20);
    let refcount_table = read_be_u64(image, 48);
    let block = read_be_u64(image, refcount_table);
    assert_ne!(block, 0, "a refcount block");
    let index = l1 >> cluster_bits;
    patch_bytes(image, block + 2 * index, &[0, 0]);
}

/// Run `qcowfs check` with a `qemu-img` first on PATH that records its arguments and then runs
/// the real one: they name the secret by a descriptor, never its value.
fn assert_key_off_the_command_line(dir: &Path, key: &Path, image: &str) {
    let shim = dir.join("shim");
    fs::create_dir_all(&shim).unwrap();
    let log = dir.join("qemu-img.argv");
    let real = String::from_utf8(run_ok("sh", ["-c", "command -v qemu-img"]).stdout).unwrap();
    fs::write(
        shim.join("qemu-img"),
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > '{}'\nexec {} \"$@\"\n",
            log.display(),
            real.trim()
        ),
    )
    .unwrap();
    fs::set_permissions(shim.join("qemu-img"), fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        shim.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let r = run_with(
        std::process::Command::new(qcowfs_bin())
            .args(["check", "--passphrase-file", key.to_str().unwrap(), image])
            .env("PATH", path),
        None,
        std::time::Duration::from_secs(120),
    );
    assert_eq!(r.status.code(), Some(7), "{}", r.stderr);
    let argv = fs::read_to_string(&log).expect("the shim ran");
    assert!(
        !argv.contains(PASS),
        "the passphrase is on qemu-img's command line:\n{argv}"
    );
    assert!(argv.contains("file=/proc/self/fd/"), "{argv}");
    assert!(argv.contains("encrypt.key-secret="), "{argv}");
}

#[test]
fn check_finds_and_repairs_an_encrypted_image_with_its_key_kept_off_the_command_line() {
    for cipher in ["aes", "luks"] {
        let dir = workdir();
        let builder = qcow2(dir.path().join("disk.qcow2"), 16 * MIB);
        let image = match cipher {
            "aes" => builder.aes(PASS),
            _ => builder.luks(PASS),
        }
        .create();
        image.write_random(0, 3 * MIB as usize, 4);
        let recorded = dir.path().join("guest.raw");
        image.convert_raw(&recorded);
        let good = key(dir.path(), PASS);
        let path = image.path.to_str().unwrap();
        // `qcowfs check EXTRA IMAGE` with the right key, which must exit `status`.
        let check = |extra: &[&str], status: i32| {
            let mut args = vec!["check", "--passphrase-file", good.to_str().unwrap()];
            args.extend_from_slice(extra);
            args.push(path);
            let r = qcowfs(&args);
            assert_eq!(
                r.status.code(),
                Some(status),
                "{cipher}: check {extra:?}: {}{}",
                r.stdout_str(),
                r.stderr
            );
            r
        };
        let r = check(&[], 0);
        assert!(
            r.stdout_str().contains("No errors were found"),
            "{}",
            r.stdout_str()
        );

        zero_l1_refcount(&image.path);
        let r = check(&[], 7);
        // qemu-img prints each error on stderr and its summary on stdout.
        assert!(r.stderr.contains("refcount=0"), "{}", r.stderr);
        assert!(
            r.stdout_str().contains("1 errors were found"),
            "{}",
            r.stdout_str()
        );
        assert!(!r.stdout_str().contains(PASS) && !r.stderr.contains(PASS));
        assert_key_off_the_command_line(dir.path(), &good, path);

        check(&["-r", "all"], 0);
        let r = check(&["--json"], 0);
        let v: serde_json::Value = serde_json::from_slice(&r.stdout).expect("qemu-img's JSON");
        assert_eq!(v["check-errors"], 0, "{v:#}");
        assert_check_clean(&image);
        assert_same_guest_contents(&image, &recorded);

        let wrong = key(dir.path(), "not the passphrase");
        let r = qcowfs(["check", "--passphrase-file", wrong.to_str().unwrap(), path]);
        assert_eq!(r.status.code(), Some(3), "{cipher}: {}", r.stderr);
        assert!(r.stdout.is_empty(), "qemu-img ran: {}", r.stdout_str());
    }
}

/// qemu-img is handed the layers qcowfs opened, by descriptor: a backing name that QEMU would read
/// as a network address (`nbd:...`) is the file of that name beside the image, as qcowfs reads it,
/// and qemu-img connects nowhere.
#[test]
fn check_hands_qemu_img_the_files_qcowfs_opened_not_names_it_would_resolve_again() {
    let dir = workdir();
    // An absolute path: QEMU reads no protocol in it when it makes the file.
    let decoy = qcow2(dir.path().join("nbd:127.0.0.1:9"), 16 * MIB).create();
    decoy.write_pattern(0, MIB, 0x33);
    qcow2(dir.path().join("top.qcow2"), 16 * MIB)
        .backing_named(&decoy, "nbd:127.0.0.1:9")
        .create();
    let r = qcowfs(["check", dir.path().join("top.qcow2").to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(0), "{}{}", r.stdout_str(), r.stderr);
    assert!(!r.stderr.contains("connect"), "{}", r.stderr);
}
