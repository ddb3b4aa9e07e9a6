//! `qcowfs audit` over nova-like trees and CloudStack-like pools made by qemu-img and qemu-io: a
//! row per instance disk (`DIR/UUID/disk`, `disk.local`, `disk.eph0`, `disk.swap`; every qcow2
//! of a pool folder but its templates) and per base image (`DIR/_base/HASH`, a pool's template),
//! with the guest data each layer provides computed from `qemu-img map` of each chain and the
//! plaintext a base holds from `qemu-img info` ("actual-size") or `qemu-img map`; never from
//! qcowfs itself. A disk that cannot be audited (a garbage file, a symbolic link, a base gone)
//! gets its own row and exit status 1 while the others are reported; a disk a writer holds is
//! audited and marked in use, exit status 0; a 2 TiB sparse disk is audited at once.
//!
//! Each test prints the commands it ran (shown on failure: the steps to reproduce).

mod live;

use crate::common;

use common::*;
use serde_json::Value;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

const AES_PASS: &str = "audit aes secret";
const LUKS_PASS: &str = "audit luks secret";

const BASE1: &str = "3b2c1f0e8d7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c";
const BASE2: &str = "9f8e7d6c5b4a39281706f5e4d3c2b1a098765432";
const INSTANCE_A: &str = "0a1b2c3d-aaaa-4b8e-9d1e-000000000001";
const INSTANCE_B: &str = "0a1b2c3d-bbbb-4b8e-9d1e-000000000002";
const INSTANCE_C: &str = "0a1b2c3d-cccc-4b8e-9d1e-000000000003";
const INSTANCE_D: &str = "0a1b2c3d-dddd-4b8e-9d1e-000000000004";

/// A nova instances folder: `_base/` with its raw bases, one folder per instance.
struct Nova {
    instances: PathBuf,
}

impl Nova {
    fn new(dir: &Path) -> Nova {
        let instances = dir.join("instances");
        fs::create_dir_all(instances.join("_base")).expect("mkdir _base");
        Nova { instances }
    }

    /// A raw base `_base/NAME` of `size` bytes holding `(offset, length, byte)` patterns.
    fn base(&self, name: &str, size: u64, data: &[(u64, u64, u8)]) -> Image {
        let base = create_raw(self.instances.join("_base").join(name), size);
        for &(off, len, byte) in data {
            base.write_pattern(off, len, byte);
        }
        base
    }

    /// `UUID/disk` as nova makes it: a qcow2 overlay naming its base `../_base/HASH`.
    fn instance(&self, uuid: &str, base: &Image, base_name: &str, enc: Enc) -> Image {
        let folder = self.instances.join(uuid);
        fs::create_dir_all(&folder).expect("mkdir instance");
        let builder = qcow2(folder.join("disk"), base.size)
            .backing_named(base, &format!("../_base/{base_name}"));
        match enc {
            Enc::Aes => builder.aes(AES_PASS),
            Enc::Luks => builder.luks(LUKS_PASS),
            Enc::None => builder,
        }
        .create()
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Enc {
    None,
    Aes,
    Luks,
}

impl Enc {
    fn name(self) -> &'static str {
        match self {
            Enc::None => "none",
            Enc::Aes => "aes",
            Enc::Luks => "luks",
        }
    }
}

/// What QEMU says a two-layer disk holds: the guest data bytes each layer provides (top, base),
/// from `qemu-img map` of the whole chain (extents with data, by depth).
#[derive(Debug, Clone, Copy)]
struct Expected {
    top: u64,
    base: u64,
    encrypted: bool,
}

impl Expected {
    fn of(image: &Image) -> Expected {
        let mut provided = [0u64; 2];
        for extent in qemu_map(image) {
            if extent["data"] == true {
                let depth = extent["depth"].as_u64().expect("depth") as usize;
                let length = extent["length"].as_u64().expect("length");
                assert!(depth < 2, "data at depth {depth}: {extent}");
                provided[depth] += length;
            }
        }
        Expected {
            top: provided[0],
            base: provided[1],
            encrypted: image.encrypted(),
        }
    }

    fn data(&self) -> u64 {
        self.top + self.base
    }

    fn unencrypted(&self) -> u64 {
        self.base + if self.encrypted { 0 } else { self.top }
    }

    fn share(&self) -> f64 {
        self.unencrypted() as f64 / self.data() as f64
    }
}

/// A share as the tables print it: a whole percentage, "<1%" for a small non-zero one.
fn percent(share: f64) -> String {
    if share > 0.0 && share < 0.005 {
        "<1%".to_string()
    } else {
        format!("{:.0}%", share * 100.0)
    }
}

/// A byte count between 1 MiB and 1 GiB as the tables print it.
fn mib(bytes: u64) -> String {
    assert!((MIB..GIB).contains(&bytes), "{bytes} bytes is not in MiB");
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

/// This machine's name, as the kernel has it.
fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .expect("read the host name")
        .trim()
        .to_string()
}

fn canonical(p: &Path) -> String {
    fs::canonicalize(p)
        .unwrap_or_else(|e| panic!("canonicalize {}: {e}", p.display()))
        .display()
        .to_string()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// `qcowfs audit ARGS`, its JSON Lines parsed when `--json` is among them.
fn audit<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    let mut all: Vec<OsString> = vec!["audit".into()];
    all.extend(args.iter().map(|a| a.as_ref().to_os_string()));
    qcowfs(&all)
}

fn json_lines(r: &Run) -> Vec<Value> {
    r.stdout_str()
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not one JSON object per line: {e}\n{l}"))
        })
        .collect()
}

fn objects<'a>(all: &'a [Value], kind: &str) -> Vec<&'a Value> {
    all.iter().filter(|o| o["kind"] == kind).collect()
}

fn object_for<'a>(all: &'a [Value], kind: &str, path: &str) -> &'a Value {
    all.iter()
        .find(|o| o["kind"] == kind && o["path"] == path)
        .unwrap_or_else(|| panic!("no {kind} object for {path} in {all:#?}"))
}

/// The text line of the table row for `path` (its first column), split into words.
fn row<'a>(text: &'a str, path: &str) -> Vec<&'a str> {
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(path))
        .collect();
    assert_eq!(rows.len(), 1, "one row for {path} expected:\n{text}");
    rows[0].split_whitespace().collect()
}

/// Two AES instances share base 1, a LUKS and a plain instance share base 2.
#[test]
fn a_nova_tree_gets_a_row_per_disk_and_per_base_with_the_shares_qemu_maps() {
    let dir = workdir();
    let nova = Nova::new(dir.path());
    let base1 = nova.base(
        BASE1,
        64 * MIB,
        &[
            (0, 8 * MIB, 0x41),
            (20 * MIB, 4 * MIB, 0x42),
            (60 * MIB, MIB, 0x43),
        ],
    );
    let base2 = nova.base(
        BASE2,
        32 * MIB,
        &[(0, 6 * MIB, 0x61), (16 * MIB, MIB, 0x62)],
    );
    let a = nova.instance(INSTANCE_A, &base1, BASE1, Enc::Aes);
    // Over base data (hiding 2 MiB of it) and beside it.
    a.qemu_io(&[
        format!("write -P 0x51 {} {}", 2 * MIB, 2 * MIB),
        format!("write -P 0x52 {} {}", 30 * MIB, 3 * MIB),
    ]);
    let b = nova.instance(INSTANCE_B, &base1, BASE1, Enc::Aes);
    b.write_pattern(40 * MIB, MIB, 0x53);
    let c = nova.instance(INSTANCE_C, &base2, BASE2, Enc::Luks);
    c.qemu_io(&[
        format!("write -P 0x54 {} {}", 8 * MIB, 4 * MIB),
        format!("write -z {} {}", 16 * MIB, MIB),
    ]);
    let d = nova.instance(INSTANCE_D, &base2, BASE2, Enc::None);
    d.write_pattern(MIB, MIB, 0x55);
    let plaintext1 = base1.qemu_info()["actual-size"]
        .as_u64()
        .expect("actual-size");
    let plaintext2 = base2.qemu_info()["actual-size"]
        .as_u64()
        .expect("actual-size");
    let base1_path = canonical(&base1.path);
    let base2_path = canonical(&base2.path);
    let disks = [
        (&a, Enc::Aes, &base1_path),
        (&b, Enc::Aes, &base1_path),
        (&c, Enc::Luks, &base2_path),
        (&d, Enc::None, &base2_path),
    ];
    let expected: Vec<Expected> = disks.iter().map(|(i, _, _)| Expected::of(i)).collect();
    assert!(
        expected.iter().all(|e| e.top > 0 && e.base > 0),
        "every disk has data of its own and from its base: {expected:?}"
    );
    let host = host_name();

    // JSON Lines: one object per disk, then per base, each naming the host.
    let r = audit(&[OsString::from("--json"), nova.instances.clone().into()]);
    r.assert_success();
    let all = json_lines(&r);
    assert_eq!(all.len(), 6, "4 disks and 2 bases: {all:#?}");
    assert!(all.iter().all(|o| o["host"] == host.as_str()), "{all:#?}");
    let kinds: Vec<&str> = all.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["disk", "disk", "disk", "disk", "base", "base"]);
    for ((image, enc, base), want) in disks.iter().zip(&expected) {
        let path = path_str(&image.path);
        let o = object_for(&all, "disk", path);
        assert_eq!(o["audited"], true, "{o:#}");
        assert_eq!(o["encryption"], enc.name(), "{o:#}");
        assert_eq!(o["encrypted"], *enc != Enc::None, "{o:#}");
        assert_eq!(o["format"], "qcow2", "{o:#}");
        assert_eq!(o["data_bytes"].as_u64(), Some(want.data()), "{o:#}");
        assert_eq!(
            o["unencrypted_bytes"].as_u64(),
            Some(want.unencrypted()),
            "{o:#}"
        );
        assert_eq!(o["plaintext_base_bytes"].as_u64(), Some(want.base), "{o:#}");
        let share = o["unencrypted_share"].as_f64().expect("unencrypted_share");
        assert!((share - want.share()).abs() < 1e-9, "{share} vs {want:?}");
        let chain = o["chain"].as_array().expect("chain");
        assert_eq!(chain.len(), 2, "{o:#}");
        assert_eq!(chain[0]["format"], "qcow2");
        assert_eq!(chain[0]["provided_bytes"].as_u64(), Some(want.top));
        assert_eq!(chain[1]["canonical_path"], base.as_str());
        assert_eq!(chain[1]["format"], "raw");
        assert_eq!(chain[1]["encryption"], "none");
        assert_eq!(chain[1]["provided_bytes"].as_u64(), Some(want.base));
    }
    for (path, plaintext, members, encrypted) in [
        (&base1_path, plaintext1, [&a, &b], 2),
        (&base2_path, plaintext2, [&c, &d], 1),
    ] {
        let o = object_for(&all, "base", path);
        assert_eq!(o["format"], "raw", "{o:#}");
        assert_eq!(o["encrypted"], false, "{o:#}");
        assert_eq!(o["instances"], 2, "{o:#}");
        assert_eq!(o["encrypted_instances"], encrypted, "{o:#}");
        assert_eq!(o["plaintext_bytes"].as_u64(), Some(plaintext), "{o:#}");
        let listed: Vec<&str> = o["instance_paths"]
            .as_array()
            .expect("instance_paths")
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        let want: Vec<&str> = members.iter().map(|i| path_str(&i.path)).collect();
        assert_eq!(listed, want, "{o:#}");
    }

    // Text: the disks table, the bases table, the summary.
    let r = audit(&[&nova.instances]);
    r.assert_success();
    let text = r.stdout_str();
    assert!(text.starts_with(&format!("host: {host}\n")), "{text}");
    for ((image, enc, base), want) in disks.iter().zip(&expected) {
        let words = row(&text, path_str(&image.path));
        assert_eq!(words[1], enc.name(), "{text}");
        assert_eq!(
            format!("{} {}", words[2], words[3]),
            mib(want.data()),
            "{text}"
        );
        assert_eq!(words[4], percent(want.share()), "{text}");
        assert_eq!(
            &words[5..],
            ["no", "qcow2", "<-", base.as_str(), "(raw)"],
            "{text}"
        );
    }
    for (path, plaintext, encrypted) in [
        (&base1_path, plaintext1, "2"),
        (&base2_path, plaintext2, "1"),
    ] {
        let words = row(&text, path);
        assert_eq!(&words[1..5], ["raw", "none", "2", encrypted], "{text}");
        assert_eq!(
            format!("{} {}", words[5], words[6]),
            mib(plaintext),
            "{text}"
        );
    }
    let encrypted = &expected[..3];
    let plain: u64 = encrypted.iter().map(|e| e.base).sum();
    let data: u64 = encrypted.iter().map(Expected::data).sum();
    let summary = format!(
        "3 of 3 encrypted instances keep {} of their guest data in plaintext bases",
        percent(plain as f64 / data as f64)
    );
    assert_eq!(text.lines().last(), Some(summary.as_str()), "{text}");
}

#[test]
fn a_garbage_disk_gets_its_own_error_row_and_exit_status_1_while_the_others_are_reported() {
    let dir = workdir();
    let nova = Nova::new(dir.path());
    let base = nova.base(BASE1, 16 * MIB, &[(0, 4 * MIB, 0x41)]);
    let good = nova.instance(INSTANCE_A, &base, BASE1, Enc::Aes);
    good.write_pattern(8 * MIB, MIB, 0x51);
    let want = Expected::of(&good);
    let garbage = nova.instances.join(INSTANCE_B).join("disk");
    fs::create_dir_all(garbage.parent().unwrap()).unwrap();
    fs::write(&garbage, b"this is not a disk image\n".repeat(100)).unwrap();
    // Neither _base nor a folder without a disk is an instance.
    fs::write(nova.instances.join("_base/disk"), b"not an instance").unwrap();
    fs::create_dir_all(nova.instances.join("locks")).unwrap();
    fs::write(nova.instances.join("compute_nodes"), b"{}").unwrap();

    let r = audit(&[&nova.instances]);
    assert_eq!(r.status.code(), Some(1), "{}{}", r.stdout_str(), r.stderr);
    let text = r.stdout_str();
    let bad = row(&text, path_str(&garbage));
    assert_eq!(
        bad[1..].join(" "),
        "error: not a qcow2 image (bad magic); a raw disk needs no qcowfs (mount -o loop)",
        "{text}"
    );
    let ok = row(&text, path_str(&good.path));
    assert_eq!(ok[1], "aes", "{text}");
    assert_eq!(ok[4], percent(want.share()), "{text}");
    assert!(
        !text.contains("_base/disk"),
        "_base is no instance:\n{text}"
    );
    assert_eq!(
        r.stderr.trim_end(),
        "qcowfs: 1 of 2 disks could not be audited (their rows say why)"
    );
    assert_eq!(
        text.lines().last(),
        Some(
            format!(
                "1 of 1 encrypted instances keep {} of their guest data in plaintext bases",
                percent(want.share())
            )
            .as_str()
        ),
        "{text}"
    );

    let r = audit(&[OsString::from("--json"), nova.instances.clone().into()]);
    assert_eq!(r.status.code(), Some(1), "{}", r.stderr);
    let all = json_lines(&r);
    assert_eq!(objects(&all, "disk").len(), 2, "{all:#?}");
    let o = object_for(&all, "disk", path_str(&garbage));
    assert_eq!(o["audited"], false, "{o:#}");
    assert_eq!(
        o["error"], "not a qcow2 image (bad magic); a raw disk needs no qcowfs (mount -o loop)",
        "{o:#}"
    );
    let o = object_for(&all, "disk", path_str(&good.path));
    assert_eq!(o["data_bytes"].as_u64(), Some(want.data()), "{o:#}");
    let o = object_for(&all, "base", &canonical(&base.path));
    assert_eq!(
        (o["instances"].as_u64(), o["encrypted_instances"].as_u64()),
        (Some(1), Some(1))
    );
}

#[test]
fn an_image_named_directly_is_audited_once_even_when_its_folder_is_searched_too() {
    let dir = workdir();
    let nova = Nova::new(dir.path());
    let base = nova.base(BASE1, 16 * MIB, &[(0, 2 * MIB, 0x41)]);
    let inst = nova.instance(INSTANCE_A, &base, BASE1, Enc::Aes);
    let alone = qcow2(dir.path().join("alone.qcow2"), 8 * MIB)
        .luks(LUKS_PASS)
        .create();
    alone.write_pattern(0, 2 * MIB, 0x5a);
    let r = audit(&[
        OsString::from("--json"),
        nova.instances.clone().into(),
        inst.path.clone().into(),
        alone.path.clone().into(),
    ]);
    r.assert_success();
    let all = json_lines(&r);
    assert_eq!(objects(&all, "disk").len(), 2, "{all:#?}");
    let o = object_for(&all, "disk", path_str(&alone.path));
    assert_eq!(o["encryption"], "luks");
    assert_eq!(o["chain"].as_array().map(Vec::len), Some(1), "{o:#}");
    assert_eq!(o["data_bytes"].as_u64(), Some(Expected::of(&alone).top));
    assert_eq!(o["unencrypted_share"].as_f64(), Some(0.0), "{o:#}");
    let o = object_for(&all, "base", &canonical(&base.path));
    assert_eq!(o["instances"], 1, "counted once: {o:#}");
}

#[test]
fn a_disk_named_by_a_symbolic_link_is_not_followed_and_gets_a_row_saying_so() {
    let dir = workdir();
    let nova = Nova::new(dir.path());
    let base = nova.base(BASE1, 16 * MIB, &[(0, 2 * MIB, 0x41)]);
    let elsewhere = qcow2(dir.path().join("elsewhere.qcow2"), 16 * MIB)
        .backing(&base)
        .create();
    let link = nova.instances.join(INSTANCE_A).join("disk");
    fs::create_dir_all(link.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(&elsewhere.path, &link).unwrap();
    let r = audit(&[&nova.instances]);
    assert_eq!(r.status.code(), Some(1), "{}{}", r.stdout_str(), r.stderr);
    let text = r.stdout_str();
    let words = row(&text, path_str(&link));
    assert!(
        words[1..]
            .join(" ")
            .starts_with("error: is a symbolic link"),
        "{text}"
    );
    assert!(text.contains("no base images"), "{text}");
}

#[test]
fn a_path_that_does_not_exist_is_one_line_on_stderr_and_exit_status_1() {
    let dir = workdir();
    let missing = dir.path().join("no-such-folder");
    let r = audit(&[&missing]);
    assert_eq!(r.status.code(), Some(1), "{}", r.stderr);
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(
        lines,
        [
            format!("qcowfs: {}: No such file", missing.display()).as_str(),
            "qcowfs: 1 path could not be searched"
        ],
    );
    assert!(r.stdout_str().contains("no instance disks found in"));
}

#[test]
fn audit_help_explains_the_layout_the_json_lines_and_the_exit_status() {
    let r = qcowfs(["audit", "--help"]);
    r.assert_success();
    // Compared with whitespace folded: clap wraps the text to the terminal's width.
    let help = r
        .stdout_str()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for want in [
        "/var/lib/nova/instances",
        "DIR/*/disk",
        "_base",
        "JSON Lines",
        "\"kind\": \"disk\"",
        "\"kind\": \"base\"",
        "--force-share",
        "in use",
        "disk.local",
        "CloudStack",
        "exit status is then 1",
    ] {
        assert!(help.contains(want), "--help lacks {want:?}:\n{help}");
    }
}

#[test]
fn a_disk_whose_base_is_gone_gets_a_row_naming_the_base() {
    let dir = workdir();
    let nova = Nova::new(dir.path());
    let base = nova.base(BASE1, 16 * MIB, &[(0, 2 * MIB, 0x41)]);
    let inst = nova.instance(INSTANCE_A, &base, BASE1, Enc::Aes);
    fs::remove_file(&base.path).expect("remove the base");
    let r = audit(&[OsString::from("--json"), nova.instances.clone().into()]);
    assert_eq!(r.status.code(), Some(1), "{}", r.stderr);
    let all = json_lines(&r);
    assert_eq!(all.len(), 1, "one disk, no base: {all:#?}");
    let o = object_for(&all, "disk", path_str(&inst.path));
    let error = o["error"].as_str().expect("error");
    assert!(
        error.contains(BASE1) && error.contains(": missing"),
        "{o:#}"
    );
}

/// 2 TiB of virtual disk over a 2 TiB raw base: the coverage walk goes by extents, not bytes.
#[test]
fn a_2_tib_sparse_disk_over_a_2_tib_base_is_audited_at_once() {
    let dir = workdir();
    let nova = Nova::new(dir.path());
    let base = nova.base(BASE1, 2 * TIB, &[(TIB, MIB, 0x41)]);
    let inst = nova.instance(INSTANCE_A, &base, BASE1, Enc::Aes);
    inst.write_pattern(2 * TIB - MIB, MIB, 0x51);
    let want = Expected::of(&inst);
    let r = audit(&[OsString::from("--json"), nova.instances.clone().into()]);
    r.assert_success();
    assert!(r.elapsed < Duration::from_secs(10), "took {:?}", r.elapsed);
    let all = json_lines(&r);
    let o = object_for(&all, "disk", path_str(&inst.path));
    assert_eq!(o["virtual_size"].as_u64(), Some(2 * TIB), "{o:#}");
    assert_eq!(o["data_bytes"].as_u64(), Some(want.data()), "{o:#}");
    assert_eq!(o["plaintext_base_bytes"].as_u64(), Some(want.base), "{o:#}");
}
