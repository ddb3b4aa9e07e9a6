//! Partitions of the guest disk as `disk-partN` files, checked against util-linux: MBR with
//! logical partitions and GPT, numbered as `partx`/`sfdisk` number them, loop-mountable, written
//! through, and re-read after the table is rewritten through `disk`.
//!
//! Each test prints the commands it ran (shown on failure: the steps to reproduce).

use crate::common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::thread;
use std::time::Duration;

const PASS: &str = "partition files secret";

/// The directory entry TTL is 1 s: a rewritten table shows in the listing after this long.
const TABLE_SETTLE: Duration = Duration::from_millis(1100);

const SECTOR: u64 = 512;

/// No mount options.
const NO_OPTS: &[&str] = &[];

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

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

    let m = Mount::new(&image.path, &passphrase_opts(dir.path(), PASS));
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
