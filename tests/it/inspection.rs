//! Made for inspection, checked against QEMU and util-linux: partitions of the guest disk as
//! `disk-partN` files (MBR with logical partitions, GPT; numbered as `partx`/`sfdisk` number them,
//! loop-mountable, re-read after the table is rewritten), internal snapshots as read-only
//! `snapshots/NAME` files equal to `qemu-img convert -l NAME`, the encryption coverage of
//! `qcowfs info` computed from the ranges each layer was given, and `qcowfs seal` leaving one
//! self-contained encrypted image that `qemu-img compare` finds equal to the chain it replaced.
//!
//! Each test prints the commands it ran (shown on failure: the steps to reproduce).

use crate::common;

use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

const PASS: &str = "inspection secret";

/// The directory entry TTL is 1 s: a rewritten table shows in the listing after this long.
const TABLE_SETTLE: Duration = Duration::from_millis(1100);

/// How long one write through a mount may take before the test fails instead of hanging.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

const SECTOR: u64 = 512;
const CLUSTER: u64 = 64 * KIB;

/// Mount (and seal, info) options that give qcowfs `PASS` through a file in `dir`.
fn passphrase_opts(dir: &Path) -> Vec<OsString> {
    let file = passphrase_file(dir, "passphrase", PASS);
    vec!["--passphrase-file".into(), file.into()]
}

/// No mount options.
const NO_OPTS: &[&str] = &[];

// --- small helpers ---------------------------------------------------------------------------

/// `data` written at `off` of `path` (positional, then fsync), bounded in time.
fn write_at_bounded(path: &Path, off: u64, data: &[u8]) {
    let p = path.to_path_buf();
    let d = data.to_vec();
    within(
        WRITE_TIMEOUT,
        &format!("writing {}", path.display()),
        move || {
            let f = OpenOptions::new()
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

fn sha256_of(path: &Path) -> String {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
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

/// `qemu-img convert -l NAME -O raw` of an internal snapshot of `image`, as bytes.
fn snapshot_raw(image: &Image, name: &str) -> Vec<u8> {
    let dest = tempfile::NamedTempFile::new().expect("temp raw file");
    let (mut args, target) = image.qemu_open_args();
    args.insert(0, "convert".into());
    args.extend(["-l".into(), name.into(), target, "-O".into(), "raw".into()]);
    args.push(path_str(dest.path()).into());
    qemu_img(&args);
    fs::read(dest.path()).expect("read converted snapshot")
}

// --- partitions --------------------------------------------------------------------------------

/// A partition as Linux numbers it: first sector and length in sectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Part {
    start: u64,
    sectors: u64,
}

/// The `disk-partN` files in a mountpoint: N → size in bytes.
fn partition_files(mountpoint: &Path) -> BTreeMap<u32, u64> {
    fs::read_dir(mountpoint)
        .unwrap_or_else(|e| panic!("list {}: {e}", mountpoint.display()))
        .map(|e| e.expect("directory entry"))
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n = name.strip_prefix("disk-part")?;
            let n: u32 = n
                .parse()
                .unwrap_or_else(|_| panic!("odd partition file name {name:?}"));
            let len = e.metadata().expect("stat partition file").len();
            Some((n, len))
        })
        .collect()
}

/// The partitions util-linux finds in `disk` (a regular file), numbered as Linux numbers them
/// (`partx --show`, libblkid), without the extended container (which `sfdisk -J` names by type).
fn linux_partitions(disk: &Path) -> BTreeMap<u32, Part> {
    let r = run_ok(
        "partx",
        [
            "--show".as_ref(),
            "-g".as_ref(),
            "-o".as_ref(),
            "NR,START,SECTORS".as_ref(),
            disk.as_os_str(),
        ],
    );
    let mut parts: BTreeMap<u32, Part> = r
        .stdout_str()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .map(|x| x.parse().unwrap_or_else(|_| panic!("partx line {l:?}")))
                .collect();
            (
                f[0] as u32,
                Part {
                    start: f[1],
                    sectors: f[2],
                },
            )
        })
        .collect();
    let json = run_ok("sfdisk", ["-J".as_ref(), disk.as_os_str()]);
    let v: Value = serde_json::from_slice(&json.stdout).expect("sfdisk -J parses");
    let table = &v["partitiontable"];
    if table["label"] == "dos" {
        for p in table["partitions"].as_array().expect("partitions") {
            let ty = p["type"].as_str().unwrap_or_default().to_ascii_lowercase();
            if ["5", "f", "85"].contains(&ty.as_str()) {
                let node = p["node"].as_str().expect("node");
                let digits: String = node
                    .chars()
                    .rev()
                    .take_while(char::is_ascii_digit)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                parts.remove(&digits.parse::<u32>().expect("partition number"));
            }
        }
    }
    parts
}

/// The partition files match `expected` in number and size.
fn assert_partition_files(mountpoint: &Path, expected: &BTreeMap<u32, Part>, when: &str) {
    let want: BTreeMap<u32, u64> = expected
        .iter()
        .map(|(&n, p)| (n, p.sectors * SECTOR))
        .collect();
    assert_eq!(
        partition_files(mountpoint),
        want,
        "{when}: disk-partN files (number → bytes) differ from the partitions partx/sfdisk find \
         ({expected:?})"
    );
}

/// A primary partition (15 MiB, slot 1) and an extended one (slot 2) holding two logical ones.
const MBR_WITH_LOGICALS: &str = "label: dos
unit: sectors

start=2048, size=30720, type=83
start=32768, size=200704, type=5
start=34816, size=61440, type=83
start=98304, size=120000, type=83
";

#[test]
fn an_mbr_with_logical_partitions_gives_loop_mountable_files_numbered_as_linux_numbers_them() {
    let dir = workdir();
    let image = qcow2(dir.path().join("mbr.qcow2"), 128 * MIB).create();
    let m = Mount::new(&image.path, NO_OPTS);
    assert_eq!(
        partition_files(m.mountpoint()),
        BTreeMap::new(),
        "a blank disk has no partition files"
    );
    sfdisk(&m.disk(), MBR_WITH_LOGICALS);
    thread::sleep(TABLE_SETTLE);
    let table = linux_partitions(&m.disk());
    assert_eq!(
        table.keys().copied().collect::<Vec<_>>(),
        vec![1, 5, 6],
        "util-linux numbering of the script's partitions: {table:?}"
    );
    assert_partition_files(
        m.mountpoint(),
        &table,
        "after sfdisk wrote an MBR through disk",
    );

    // ext4 in the first logical partition, through its file; a file in it through a loop mount.
    let part5 = m.mountpoint().join("disk-part5");
    run_ok(
        "mkfs.ext4",
        [
            "-q".as_ref(),
            "-F".as_ref(),
            "-L".as_ref(),
            "logical5".as_ref(),
            part5.as_os_str(),
        ],
    );
    let guest = LoopMount::new(&part5, "loop");
    fs::write(
        guest.path().join("hello.txt"),
        "hello from a logical partition\n",
    )
    .expect("write a file in the loop-mounted logical partition");
    guest.umount(&part5);

    // The window is read-write both ways and ends where the partition ends.
    let part6 = m.mountpoint().join("disk-part6");
    let p6 = table[&6];
    let part6_len = p6.sectors * SECTOR;
    let tail = random_bytes(4096, 6);
    write_at_bounded(&part6, part6_len - 4096, &tail);
    assert_same_bytes(
        &read_at_bounded(&m.disk(), (p6.start + p6.sectors) * SECTOR - 4096, 4096),
        &tail,
        "disk at the end of partition 6, written through disk-part6",
    );
    let head = random_bytes(8192, 61);
    write_at_bounded(&m.disk(), p6.start * SECTOR, &head);
    assert_same_bytes(
        &read_at_bounded(&part6, 0, 8192),
        &head,
        "disk-part6 at 0, written through disk",
    );
    let after_end = read_at_bounded(&m.disk(), (p6.start + p6.sectors) * SECTOR, 4096);
    {
        let f = OpenOptions::new()
            .write(true)
            .open(&part6)
            .expect("open disk-part6 for writing");
        let spill = vec![0xeeu8; 8192];
        // A write that runs over the partition's end stops there: a short write, as at the end
        // of a block device.
        let n = f
            .write_at(&spill, part6_len - 4096)
            .unwrap_or_else(|e| panic!("a write running over the end of disk-part6: {e}"));
        assert_eq!(
            n, 4096,
            "a write of 8192 bytes 4096 bytes before the end of disk-part6 wrote {n} bytes"
        );
        f.sync_all().expect("fsync disk-part6");
        // Partition files are opened for direct I/O: a shared mapping is refused, not served
        // from pages the disk file's cache would not see.
        let rw = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&part6)
            .expect("open disk-part6 for reading and writing");
        assert_shared_mmap_refused(&rw, 4096, "disk-part6");
    }
    assert_same_bytes(
        &read_at_bounded(&m.disk(), (p6.start + p6.sectors) * SECTOR, 4096),
        &after_end,
        "disk just past partition 6 after a write that ran over the end of disk-part6",
    );
    m.umount();
    assert_check_clean(&image);

    // QEMU's view of the disk: the same table, each partition file equal to its slice.
    let raw_path = dir.path().join("mbr.raw");
    image.convert_raw(&raw_path);
    assert_eq!(
        linux_partitions(&raw_path),
        table,
        "the table util-linux finds in qemu-img convert's raw image"
    );
    let raw = fs::read(&raw_path).expect("read raw conversion");
    let m = Mount::new(&image.path, &["--read-only"]);
    assert_partition_files(m.mountpoint(), &table, "read-only mount");
    for (n, p) in &table {
        let start = (p.start * SECTOR) as usize;
        let end = start + (p.sectors * SECTOR) as usize;
        assert_same_bytes(
            &read_all_bounded(&m.mountpoint().join(format!("disk-part{n}"))),
            &raw[start..end],
            &format!("disk-part{n} vs sectors {}.. of qemu's raw image", p.start),
        );
    }
    let part5 = m.mountpoint().join("disk-part5");
    let guest = LoopMount::new(&part5, "loop,ro");
    assert_eq!(
        fs::read_to_string(guest.path().join("hello.txt")).expect("read hello.txt"),
        "hello from a logical partition\n"
    );
    guest.umount(&part5);
    m.umount();
}

#[test]
fn a_gpt_disk_converted_to_aes_qcow2_gives_partition_files_that_read_and_write_through() {
    let dir = workdir();
    let raw_path = dir.path().join("gpt.raw");
    create_raw(&raw_path, 128 * MIB);
    run_ok(
        "sgdisk",
        [
            "-n",
            "1:2048:+20M",
            "-t",
            "1:ef00",
            "-n",
            "2:0:+60M",
            "-t",
            "2:8300",
            path_str(&raw_path),
        ],
    );
    let table = linux_partitions(&raw_path);
    assert_eq!(
        table.keys().copied().collect::<Vec<_>>(),
        vec![1, 2],
        "{table:?}"
    );
    // ext4 with a file in it, made apart and copied into partition 2.
    let src = dir.path().join("src");
    fs::create_dir(&src).expect("mkdir src");
    fs::write(src.join("os-release"), "NAME=\"inspection\"\n").expect("write src file");
    let fs_image = dir.path().join("part2.ext4");
    let p2 = table[&2];
    run_ok(
        "mkfs.ext4",
        [
            "-q",
            "-F",
            "-L",
            "root",
            "-d",
            path_str(&src),
            path_str(&fs_image),
            &format!("{}k", p2.sectors / 2),
        ],
    );
    {
        let ext4 = fs::read(&fs_image).expect("read ext4 image");
        let raw = OpenOptions::new()
            .write(true)
            .open(&raw_path)
            .expect("open raw");
        raw.write_all_at(&ext4, p2.start * SECTOR)
            .expect("copy ext4 into partition 2");
    }
    let image_path = dir.path().join("gpt.qcow2");
    qemu_img([
        "convert",
        "--object",
        &format!("secret,id=s0,data={PASS}"),
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "encrypt.format=aes,encrypt.key-secret=s0",
        path_str(&raw_path),
        path_str(&image_path),
    ]);
    let image = Image {
        path: image_path,
        format: Format::Qcow2,
        size: 128 * MIB,
        secrets: vec![Some(PASS.into())],
    };

    let m = Mount::new(&image.path, &passphrase_opts(dir.path()));
    assert_partition_files(m.mountpoint(), &table, "GPT image converted from raw");
    assert_eq!(
        linux_partitions(&m.disk()),
        table,
        "the table util-linux finds in MNT/disk"
    );
    let part2 = m.mountpoint().join("disk-part2");
    let guest = LoopMount::new(&part2, "loop");
    assert_eq!(
        fs::read_to_string(guest.path().join("os-release")).expect("read os-release"),
        "NAME=\"inspection\"\n"
    );
    fs::write(guest.path().join("written-through-qcowfs"), "new file\n")
        .expect("write a new file in partition 2");
    guest.umount(&part2);
    m.umount();
    assert_check_clean(&image);

    // What QEMU sees in partition 2 now: the new file too (debugfs reads it without mounting).
    let after = dir.path().join("after.raw");
    image.convert_raw(&after);
    let slice = dir.path().join("part2.after");
    {
        let raw = fs::read(&after).expect("read raw conversion");
        let start = (p2.start * SECTOR) as usize;
        fs::write(&slice, &raw[start..start + (p2.sectors * SECTOR) as usize])
            .expect("write partition slice");
    }
    let r = run_ok(
        "debugfs",
        ["-R", "cat /written-through-qcowfs", path_str(&slice)],
    );
    assert_eq!(
        r.stdout_str(),
        "new file\n",
        "the file written through disk-part2, read by debugfs from qemu-img convert's output"
    );
}

#[test]
fn partition_files_follow_a_table_rewritten_through_disk() {
    let dir = workdir();
    let image = qcow2(dir.path().join("retable.qcow2"), 64 * MIB).create();
    let m = Mount::new(&image.path, NO_OPTS);
    let mnt = m.mountpoint().to_path_buf();
    assert_eq!(partition_files(&mnt), BTreeMap::new(), "blank disk");

    sfdisk(
        &m.disk(),
        "label: dos\nunit: sectors\n\nstart=2048, size=20480, type=83\nstart=22528, size=40960, type=83\n",
    );
    thread::sleep(TABLE_SETTLE);
    let table = linux_partitions(&m.disk());
    assert_eq!(table.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
    assert_partition_files(&mnt, &table, "after writing an MBR with two primaries");

    // A GPT using slots 1 and 3 replaces it: disk-part2 goes, disk-part3 comes.
    run_ok(
        "sgdisk",
        [
            "-Z".as_ref(),
            "-n".as_ref(),
            "1:2048:+8M".as_ref(),
            "-n".as_ref(),
            "3:0:+16M".as_ref(),
            m.disk().as_os_str(),
        ],
    );
    thread::sleep(TABLE_SETTLE);
    let table = linux_partitions(&m.disk());
    assert_eq!(table.keys().copied().collect::<Vec<_>>(), vec![1, 3]);
    assert_partition_files(
        &mnt,
        &table,
        "after replacing the MBR by a GPT in slots 1 and 3",
    );
    // Stat of a name that just appeared works too (no stale negative entry).
    let part3 = mnt.join("disk-part3");
    assert_eq!(
        fs::metadata(&part3).expect("stat disk-part3").len(),
        table[&3].sectors * SECTOR
    );

    // Zeroing the first 34 sectors (protective MBR, GPT header and entries) leaves no table.
    write_at_bounded(&m.disk(), 0, &vec![0u8; 34 * SECTOR as usize]);
    thread::sleep(TABLE_SETTLE);
    assert_eq!(
        partition_files(&mnt),
        BTreeMap::new(),
        "after zeroing the primary table: no partition files"
    );
    assert!(
        fs::metadata(&part3).is_err(),
        "disk-part3 can still be looked up after the table is gone"
    );
    m.umount();
    assert_check_clean(&image);
}

// --- snapshots ---------------------------------------------------------------------------------

/// The names in `MNT/snapshots`.
fn snapshot_files(mountpoint: &Path) -> BTreeSet<String> {
    fs::read_dir(mountpoint.join("snapshots"))
        .unwrap_or_else(|e| panic!("list {}/snapshots: {e}", mountpoint.display()))
        .map(|e| {
            e.expect("directory entry")
                .file_name()
                .into_string()
                .expect("UTF-8 name")
        })
        .collect()
}

/// Every snapshot file equals its recorded `qemu-img convert -l NAME` output.
fn assert_snapshots_equal(mountpoint: &Path, expected: &BTreeMap<&str, Vec<u8>>, when: &str) {
    for (name, raw) in expected {
        assert_same_bytes(
            &read_all_bounded(&mountpoint.join("snapshots").join(name)),
            raw,
            &format!("{when}: snapshots/{name} vs qemu-img convert -l"),
        );
    }
}

/// Opening a snapshot file for writing (or truncating it) must fail.
fn assert_snapshots_read_only(mountpoint: &Path, names: &[&str]) {
    for name in names {
        let path = mountpoint.join("snapshots").join(name);
        let meta = fs::metadata(&path).expect("stat snapshot file");
        assert!(
            meta.permissions().readonly(),
            "snapshots/{name} has write permission bits: {:o}",
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions())
        );
        // As root the permission bits alone would not stop a write: qcowfs must refuse it.
        assert!(
            OpenOptions::new().write(true).open(&path).is_err(),
            "snapshots/{name} opened for writing"
        );
        assert!(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .is_err(),
            "snapshots/{name} opened read-write"
        );
    }
}

#[test]
fn snapshot_files_equal_qemu_img_convert_l_and_stay_unchanged_by_writes_to_disk() {
    let dir = workdir();
    let size = 16 * MIB;
    let image = qcow2(dir.path().join("snap.qcow2"), size).create();
    image.qemu_io(&[
        "write -P 0x11 0 1M".into(),
        "write -P 0x12 5M 100k".into(),
        "write -P 0x13 15M 1M".into(),
    ]);
    image.snapshot("first");
    image.qemu_io(&[
        "write -P 0x21 512k 1M".into(),
        "write -z 5M 64k".into(),
        "discard 15M 512k".into(),
        "write -P 0x22 9M 3000".into(),
    ]);
    image.snapshot("before upgrade");
    image.qemu_io(&["write -P 0x31 0 64k".into(), "write -P 0x32 12M 2M".into()]);

    let names = ["first", "before upgrade"];
    let expected: BTreeMap<&str, Vec<u8>> = names
        .iter()
        .map(|&n| (n, snapshot_raw(&image, n)))
        .collect();
    assert_ne!(
        expected["first"], expected["before upgrade"],
        "the test wrote between snapshots"
    );
    let current = image.raw();

    let m = Mount::new(&image.path, NO_OPTS);
    assert_eq!(
        snapshot_files(m.mountpoint()),
        names.iter().map(|s| s.to_string()).collect(),
        "snapshots/ lists each internal snapshot by name"
    );
    assert_same_bytes(
        &read_all_bounded(&m.disk()),
        &current,
        "disk (current state)",
    );
    assert_snapshots_equal(m.mountpoint(), &expected, "after mounting");
    assert_snapshots_read_only(m.mountpoint(), &names);

    // Overwrite the whole disk: the clusters shared with the snapshots must be copied, not changed.
    let new_state = random_bytes(size as usize, 77);
    write_at_bounded(&m.disk(), 0, &new_state);
    assert_snapshots_equal(m.mountpoint(), &expected, "after overwriting disk");
    m.umount();

    assert_check_clean(&image);
    assert_same_bytes(
        &image.raw(),
        &new_state,
        "qemu's current state after the writes",
    );
    for name in names {
        assert_same_bytes(
            &snapshot_raw(&image, name),
            &expected[name],
            &format!("qemu-img convert -l {name} after writes through qcowfs"),
        );
    }
}

#[test]
fn an_aes_image_shows_its_snapshot_decrypted_and_read_only() {
    let dir = workdir();
    let size = 8 * MIB;
    let image = qcow2(dir.path().join("aes-snap.qcow2"), size)
        .aes(PASS)
        .create();
    image.write_random(0, MIB as usize, 1);
    image.write_random(3 * MIB + 4321, 700 * KIB as usize, 2);
    image.snapshot("nightly");
    image.write_random(512 * KIB, MIB as usize, 3);
    image.write_zeroes(3 * MIB + 64 * KIB, 128 * KIB);
    let expected: BTreeMap<&str, Vec<u8>> = [("nightly", snapshot_raw(&image, "nightly"))].into();
    let current = image.raw();
    assert_ne!(expected["nightly"], current);

    let opts = passphrase_opts(dir.path());
    let mut ro = opts.clone();
    ro.push("--read-only".into());
    let m = Mount::new(&image.path, &ro);
    assert_eq!(
        snapshot_files(m.mountpoint()),
        ["nightly".to_string()].into()
    );
    assert_snapshots_equal(m.mountpoint(), &expected, "read-only mount");
    assert_snapshots_read_only(m.mountpoint(), &["nightly"]);
    m.umount();

    let m = Mount::new(&image.path, &opts);
    assert_snapshots_equal(m.mountpoint(), &expected, "read-write mount");
    assert_snapshots_read_only(m.mountpoint(), &["nightly"]);
    let data = compressible_bytes(2 * MIB as usize, 4);
    write_at_bounded(&m.disk(), 100 * KIB, &data);
    assert_snapshots_equal(m.mountpoint(), &expected, "after writing through disk");
    m.umount();
    assert_check_clean(&image);
    assert_same_bytes(
        &snapshot_raw(&image, "nightly"),
        &expected["nightly"],
        "qemu-img convert -l nightly after writes through qcowfs",
    );
}

#[test]
fn every_snapshot_has_its_own_file_even_when_names_repeat_or_hold_a_slash() {
    let dir = workdir();
    let image = qcow2(dir.path().join("names.qcow2"), 4 * MIB).create();
    // qemu allows two snapshots of one name (they differ by ID) and any byte but NUL in a name.
    for (i, name) in ["daily", "daily", "a/b"].iter().enumerate() {
        image.write_pattern(i as u64 * MIB, MIB, 0x11 * (i as u8 + 1));
        image.snapshot(name);
    }
    image.write_pattern(0, 4 * MIB, 0x99);
    let by_id: Vec<Vec<u8>> = (1..=3)
        .map(|id| snapshot_raw(&image, &format!("snapshot.id={id}")))
        .collect();

    let m = Mount::new(&image.path, &["--read-only"]);
    let mut names: Vec<String> = fs::read_dir(m.mountpoint().join("snapshots"))
        .expect("list snapshots/")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let distinct: BTreeSet<&String> = names.iter().collect();
    assert_eq!(
        distinct.len(),
        names.len(),
        "snapshots/ lists one name twice (the second snapshot of that name cannot be opened): {names:?}"
    );
    assert_eq!(names.len(), 3, "one file per snapshot: {names:?}");
    // Each file is a different snapshot: together they cover all three.
    let mut seen = BTreeSet::new();
    for name in &names {
        let bytes = read_all_bounded(&m.mountpoint().join("snapshots").join(name));
        let id = by_id
            .iter()
            .position(|raw| *raw == bytes)
            .unwrap_or_else(|| panic!("snapshots/{name} equals no snapshot of the image"));
        assert!(
            seen.insert(id + 1),
            "snapshots/{name} shows snapshot ID {} again",
            id + 1
        );
    }
    m.umount();
}

// --- coverage ----------------------------------------------------------------------------------

/// What one layer holds in a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    Data,
    /// A zero cluster: hides what lies below, provides nothing.
    Zero,
}

/// The clusters each layer of a chain holds (top first), to compute what each layer provides.
struct CoverageModel {
    layers: Vec<BTreeMap<u64, Held>>,
    encrypted: Vec<bool>,
}

impl CoverageModel {
    fn new(encrypted: &[bool]) -> Self {
        CoverageModel {
            layers: vec![BTreeMap::new(); encrypted.len()],
            encrypted: encrypted.to_vec(),
        }
    }

    /// Layer `level` holds `held` in every cluster that `off..off+len` touches.
    fn mark(&mut self, level: usize, off: u64, len: u64, held: Held) {
        for c in off / CLUSTER..(off + len).div_ceil(CLUSTER) {
            self.layers[level].insert(c, held);
        }
    }

    /// Bytes each layer provides: data clusters no upper layer covers.
    fn provided(&self) -> Vec<u64> {
        let all: BTreeSet<u64> = self.layers.iter().flat_map(|l| l.keys().copied()).collect();
        let mut out = vec![0; self.layers.len()];
        for c in all {
            if let Some((level, held)) = self
                .layers
                .iter()
                .enumerate()
                .find_map(|(i, l)| l.get(&c).map(|h| (i, *h)))
            {
                if held == Held::Data {
                    out[level] += CLUSTER;
                }
            }
        }
        out
    }

    fn data_bytes(&self) -> u64 {
        self.provided().iter().sum()
    }

    fn unencrypted_bytes(&self) -> u64 {
        self.provided()
            .iter()
            .zip(&self.encrypted)
            .filter(|(_, &e)| !e)
            .map(|(p, _)| p)
            .sum()
    }
}

/// `info --json` agrees with the model: per layer provided bytes, encryption and format, and the
/// coverage totals; the text output warns exactly when some data is unencrypted.
fn assert_coverage(image: &Image, model: &CoverageModel, formats: &[&str], names: &[&str]) {
    let info = qcowfs_info_json(&image.path, &[]);
    let layers = info["layers"].as_array().expect("layers array");
    assert_eq!(layers.len(), model.layers.len(), "layers: {info:#}");
    let provided = model.provided();
    for (i, layer) in layers.iter().enumerate() {
        assert_eq!(
            layer["provided_bytes"].as_u64(),
            Some(provided[i]),
            "provided_bytes of layer {i} ({}) — expected {} ({} clusters)\n{layer:#}",
            names[i],
            provided[i],
            provided[i] / CLUSTER
        );
        assert_eq!(
            layer["encrypted"].as_bool(),
            Some(model.encrypted[i]),
            "{layer:#}"
        );
        assert_eq!(layer["format"], formats[i], "{layer:#}");
        let path = layer["path"].as_str().expect("layer path");
        assert!(
            path.ends_with(names[i]),
            "layer {i} path {path:?}, expected …{}",
            names[i]
        );
        let allocated = layer["allocated_bytes"].as_u64().expect("allocated_bytes");
        assert!(
            allocated >= provided[i],
            "layer {i}: allocated_bytes {allocated} < provided_bytes {}",
            provided[i]
        );
    }
    let coverage = &info["coverage"];
    let data = model.data_bytes();
    let plain = model.unencrypted_bytes();
    assert_eq!(coverage["data_bytes"].as_u64(), Some(data), "{coverage:#}");
    assert_eq!(
        coverage["unencrypted_bytes"].as_u64(),
        Some(plain),
        "{coverage:#}"
    );
    let share = coverage["unencrypted_share"]
        .as_f64()
        .expect("unencrypted_share");
    let want = if data == 0 {
        0.0
    } else {
        plain as f64 / data as f64
    };
    assert!(
        (share - want).abs() < 1e-6,
        "unencrypted_share {share}, expected {want} ({plain} of {data} bytes)"
    );

    let text = qcowfs(["info".as_ref(), image.path.as_os_str()]);
    text.assert_success();
    let out = text.stdout_str();
    let warnings: Vec<&str> = out
        .lines()
        .chain(text.stderr.lines())
        .filter(|l| l.starts_with("warning: "))
        .collect();
    if plain == 0 {
        assert!(warnings.is_empty(), "no warning expected:\n{out}");
        return;
    }
    assert_eq!(
        warnings.len(),
        1,
        "one warning line expected:\n{out}{}",
        text.stderr
    );
    let line = warnings[0];
    assert!(
        line.contains("% of this disk's data lives in the unencrypted"),
        "warning line {line:?}"
    );
    let percent: f64 = line["warning: ".len()..line.find('%').expect("a %")]
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("percentage in {line:?}"));
    assert!(
        (percent - want * 100.0).abs() <= 1.0,
        "warning says {percent}%, the share is {:.2}%: {line:?}",
        want * 100.0
    );
    let base_name = names.last().expect("a base");
    assert!(
        line.contains(base_name),
        "the warning names the base {base_name}: {line:?}"
    );
}

/// A nova instance folder: `DIR/instances/UUID/disk` over `DIR/instances/_base/HASH`.
fn nova_paths(dir: &Path) -> (PathBuf, PathBuf) {
    let instances = dir.join("instances");
    let uuid = instances.join("6f1c0e4e-2b6c-4b8e-9d1e-inspection");
    let base = instances.join("_base");
    fs::create_dir_all(&uuid).expect("mkdir instance");
    fs::create_dir_all(&base).expect("mkdir _base");
    (
        uuid.join("disk"),
        base.join("3b2c1f0e8d7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c"),
    )
}

#[test]
fn coverage_of_an_aes_overlay_over_a_raw_base_counts_what_each_layer_provides() {
    let dir = workdir();
    let size = 64 * MIB;
    let (top_path, base_path) = nova_paths(dir.path());
    let base = create_raw(&base_path, size);
    let mut model = CoverageModel::new(&[true, false]);
    // The raw base: cluster-aligned ranges only (what SEEK_DATA finds is exactly what was written).
    for (off, len, byte) in [
        (0, 4 * MIB, 0x41),
        (16 * MIB, 2 * MIB, 0x42),
        (40 * MIB, 256 * KIB, 0x43),
        (60 * MIB, 4 * MIB, 0x44),
    ] {
        base.write_pattern(off, len, byte);
        model.mark(1, off, len, Held::Data);
    }
    let top = qcow2(&top_path, size)
        .aes(PASS)
        .backing_named(&base, "../_base/3b2c1f0e8d7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c")
        .create();
    // The overlay: data over part of the base and beside it, zero clusters hiding base data,
    // a small unaligned write that allocates one whole cluster.
    let mut cmds = vec![];
    for (off, len) in [(3 * MIB, 2 * MIB), (32 * MIB, MIB), (63 * MIB, 128 * KIB)] {
        cmds.push(format!("write -P 0x51 {off} {len}"));
        model.mark(0, off, len, Held::Data);
    }
    cmds.push(format!("write -P 0x52 {} 100", 50 * MIB + 10));
    model.mark(0, 50 * MIB + 10, 100, Held::Data);
    cmds.push(format!("write -z {} {}", 17 * MIB, 64 * KIB));
    model.mark(0, 17 * MIB, 64 * KIB, Held::Zero);
    cmds.push(format!("write -z -u {} {}", MIB, 128 * KIB));
    model.mark(0, MIB, 128 * KIB, Held::Zero);
    top.qemu_io(&cmds);
    assert!(
        model.unencrypted_bytes() > 0 && model.provided()[0] > 0,
        "the model has data in both layers"
    );
    assert_coverage(
        &top,
        &model,
        &["qcow2", "raw"],
        &["disk", "3b2c1f0e8d7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c"],
    );
}

#[test]
fn coverage_counts_a_plain_qcow2_middle_layer_with_compressed_clusters_as_unencrypted() {
    let dir = workdir();
    let size = 32 * MIB;
    let base = create_raw(dir.path().join("base.raw"), size);
    let mut model = CoverageModel::new(&[true, false, false]);
    base.write_pattern(0, 8 * MIB, 0x61);
    model.mark(2, 0, 8 * MIB, Held::Data);
    let mid = qcow2(dir.path().join("mid.qcow2"), size)
        .backing_named(&base, "base.raw")
        .create();
    mid.write_pattern(2 * MIB, MIB, 0x62);
    model.mark(1, 2 * MIB, MIB, Held::Data);
    mid.write_compressed(20 * MIB, &compressible_bytes(256 * KIB as usize, 9));
    model.mark(1, 20 * MIB, 256 * KIB, Held::Data);
    mid.write_zeroes(6 * MIB, 64 * KIB);
    model.mark(1, 6 * MIB, 64 * KIB, Held::Zero);
    assert!(
        has_extent(&mid, "compressed"),
        "the middle layer has compressed clusters"
    );
    let top = qcow2(dir.path().join("top.qcow2"), size)
        .aes(PASS)
        .backing_named(&mid, "mid.qcow2")
        .create();
    top.write_pattern(2 * MIB + 512 * KIB, MIB, 0x71);
    model.mark(0, 2 * MIB + 512 * KIB, MIB, Held::Data);
    top.write_pattern(24 * MIB, 3 * MIB, 0x72);
    model.mark(0, 24 * MIB, 3 * MIB, Held::Data);
    assert_coverage(
        &top,
        &model,
        &["qcow2", "qcow2", "raw"],
        &["top.qcow2", "mid.qcow2", "base.raw"],
    );
}

#[test]
fn coverage_of_an_image_without_a_backing_file_is_fully_encrypted_and_warns_of_nothing() {
    let dir = workdir();
    let image = qcow2(dir.path().join("alone.qcow2"), 16 * MIB)
        .aes(PASS)
        .create();
    let mut model = CoverageModel::new(&[true]);
    image.write_pattern(MIB, 3 * MIB, 0x5a);
    model.mark(0, MIB, 3 * MIB, Held::Data);
    assert_coverage(&image, &model, &["qcow2"], &["alone.qcow2"]);
}

// --- seal --------------------------------------------------------------------------------------

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
    args.extend(passphrase_opts(dir));
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
    let mut ro = passphrase_opts(dir);
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
    let m = Mount::new(&top.path, &passphrase_opts(dir.path()));
    let sha = sha256_of(&top.path);
    let r = seal(&top.path, dir.path(), &[]);
    assert_one_line_error(&r, &["disk"], Duration::from_secs(10));
    assert_eq!(r.status.code(), Some(1), "exit status of a refused seal");
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
    assert_eq!(r.status.code(), Some(1));
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
