//! Guests on LVM2, as RHEL, CentOS and Rocky cloud images lay them out: an MBR disk whose first
//! partition is /boot (ext4) and whose second is a physical volume of the volume group `rhel`,
//! holding `root` (XFS, in two segments placed out of order on the PV, so its bytes cross a
//! jump) and `swap`. This kernel has no device-mapper, so `lvcreate` cannot make the volumes:
//! LVM2's own pvcreate, vgcreate and vgcfgrestore write the metadata (on a loop device at the
//! partition's offset), and the LV's file system, made by mkfs.xfs and filled by the kernel in a
//! file of its own, is put at the offsets that metadata maps it to. The disk is the raw base of
//! a LUKS overlay (as CloudStack keeps volumes over templates), read and changed by a user who is not root.
//!
//! Each test prints the commands it ran (shown on failure: the steps to reproduce).

use crate::common;

use common::*;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const PASS: &str = "guest lvm secret";

/// A refusal comes at once.
const REFUSAL_LIMIT: Duration = Duration::from_secs(30);

const FSTAB: &[u8] = b"/dev/mapper/rhel-root / xfs defaults 0 0\n";

/// The disk's partitions, in 512-byte sectors: /boot, then the PV to the end.
const BOOT_START: u64 = 2048;
const BOOT_SECTORS: u64 = 65536;
const PV_START: u64 = BOOT_START + BOOT_SECTORS;
const DISK_SIZE: u64 = 400 * MIB;

/// LVM2's default extent, and the LVs' places on the PV, in extents: root's first 50 extents
/// at PV extent 30, its last 30 at PV extent 0; swap's 4 at PV extent 80. (XFS wants 300 MB.)
const EXTENT: u64 = 4 * MIB;
const ROOT_EXTENTS: u64 = 80;

/// A file larger than root's first segment: its bytes must cross into the second.
const BIG_LEN: usize = 210 << 20;

fn big() -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..BIG_LEN / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

/// The volume group's metadata: what vgcfgbackup wrote for the empty VG, with the LVs added.
fn with_volumes(backup: &str) -> String {
    let lvs = r#"
	logical_volumes {
		root {
			id = "r00tLV-aaaa-bbbb-cccc-dddd-eeee-ffffff"
			status = ["READ", "WRITE", "VISIBLE"]
			flags = []
			segment_count = 2
			segment1 {
				start_extent = 0
				extent_count = 50
				type = "striped"
				stripe_count = 1
				stripes = ["pv0", 30]
			}
			segment2 {
				start_extent = 50
				extent_count = 30
				type = "striped"
				stripe_count = 1
				stripes = ["pv0", 0]
			}
		}
		swap {
			id = "swapLV-aaaa-bbbb-cccc-dddd-eeee-ffffff"
			status = ["READ", "WRITE", "VISIBLE"]
			flags = []
			segment_count = 1
			segment1 {
				start_extent = 0
				extent_count = 4
				type = "striped"
				stripe_count = 1
				stripes = ["pv0", 80]
			}
		}
	}
"#;
    let end = backup.rfind('}').expect("the VG section ends");
    let text = format!("{}{lvs}{}", &backup[..end], &backup[end..]);
    text.replace("seqno = 1", "seqno = 2")
}

/// `pe_start` of the backup (sectors).
fn pe_start(backup: &str) -> u64 {
    let line = backup
        .lines()
        .find(|l| l.trim_start().starts_with("pe_start"))
        .expect("pe_start in the backup");
    let value = line.split('=').nth(1).unwrap().trim();
    value.split_whitespace().next().unwrap().parse().unwrap()
}

/// Write the VG `rhel` with root and swap onto the PV at `offset` of `disk`: the PV's first data
/// byte (pe_start), in bytes of the PV.
fn make_volume_group(work: &Path, disk: &Path, offset: u64, len: u64) -> u64 {
    let dev = run_ok(
        "losetup",
        [
            "-f".as_ref(),
            "--show".as_ref(),
            "-o".as_ref(),
            OsStr::new(&offset.to_string()),
            "--sizelimit".as_ref(),
            OsStr::new(&len.to_string()),
            disk.as_os_str(),
        ],
    )
    .stdout_str()
    .trim()
    .to_string();
    let backup = work.join("vg.backup");
    let restore = work.join("vg.restore");
    let steps = [
        vec!["pvcreate", "-q", "-ff", "-y", &dev],
        vec!["vgcreate", "-q", "rhel", &dev],
        vec!["vgcfgbackup", "-q", "-f", path_str(&backup), "rhel"],
    ];
    let mut ran = Vec::new();
    for s in &steps {
        ran.push(run(s[0], &s[1..]));
        if !ran.last().unwrap().status.success() {
            break;
        }
    }
    let text = fs::read_to_string(&backup).unwrap_or_default();
    if !text.is_empty() {
        fs::write(&restore, with_volumes(&text)).unwrap();
        ran.push(run(
            "vgcfgrestore",
            ["-q", "-f", path_str(&restore), "rhel"],
        ));
    }
    run_ok("losetup", ["-d", dev.as_str()]);
    for r in &ran {
        r.assert_success();
    }
    pe_start(&text) * 512
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// `len` bytes of `file` copied into `disk` at `at`.
fn place(disk: &Path, at: u64, bytes: &[u8]) {
    let f = fs::OpenOptions::new().write(true).open(disk).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

/// The disk: /boot, and the PV with root (holding `/etc/fstab`, `/var/big`) and swap.
fn lvm_disk(work: &Path) -> (Image, Vec<u8>) {
    let disk = work.join("disk.raw");
    let base = create_raw(&disk, DISK_SIZE);
    let pv_len = DISK_SIZE - PV_START * 512;
    sfdisk(
        &disk,
        &format!(
            "label: dos\nstart={BOOT_START}, size={BOOT_SECTORS}, type=83\nstart={PV_START}, type=8e\n"
        ),
    );
    let boot = loop_made(
        work,
        "boot",
        BOOT_SECTORS * 512,
        &["mkfs.ext4", "-q", "-F"],
        |mnt| {
            fs::write(mnt.join("grub.cfg"), b"set default=0\n").unwrap();
        },
    );
    place(&disk, BOOT_START * 512, &fs::read(&boot).unwrap());
    let big = big();
    let root = loop_made(
        work,
        "root",
        ROOT_EXTENTS * EXTENT,
        &["mkfs.xfs", "-q", "-f"],
        |mnt| {
            fs::create_dir_all(mnt.join("etc")).unwrap();
            fs::create_dir_all(mnt.join("var")).unwrap();
            fs::write(mnt.join("etc/fstab"), FSTAB).unwrap();
            fs::write(mnt.join("var/big"), &big).unwrap();
        },
    );
    let swap = work.join("swap.raw");
    create_raw(&swap, 4 * EXTENT);
    run_ok("mkswap", [swap.as_os_str()]);
    let pv = PV_START * 512;
    let data = pv + make_volume_group(work, &disk, pv, pv_len);
    let root = fs::read(&root).unwrap();
    let split = (50 * EXTENT) as usize;
    place(&disk, data + 30 * EXTENT, &root[..split]);
    place(&disk, data, &root[split..]);
    place(&disk, data + 80 * EXTENT, &fs::read(&swap).unwrap());
    (base, big)
}

/// The LV `root` of QEMU's raw copy of the guest, put back together from its two segments.
fn root_of(work: &Path, image: &Image) -> PathBuf {
    let raw = work.join("view.raw");
    let _ = fs::remove_file(&raw);
    image.convert_raw(&raw);
    let disk = fs::read(&raw).unwrap();
    let backup = fs::read_to_string(work.join("vg.backup")).unwrap();
    let data = (PV_START * 512 + pe_start(&backup) * 512) as usize;
    let e = EXTENT as usize;
    let mut lv = disk[data + 30 * e..data + 80 * e].to_vec();
    lv.extend_from_slice(&disk[data..data + 30 * e]);
    let out = work.join("root.view");
    fs::write(&out, lv).unwrap();
    out
}

#[test]
fn lvm_logical_volumes_are_listed_read_and_changed_by_a_user() {
    let dir = workdir();
    let work = dir.path();
    let (base, big) = lvm_disk(work);
    let image = qcow2(work.join("disk.qcow2"), DISK_SIZE)
        .backing(&base)
        .luks(PASS)
        .create();
    let key = passphrase_file(work, "key", PASS);
    let user = test_user("qcowfs-lvm");
    user.own(work);
    let run_as = |command: &str, options: &[&str], rest: &[&OsStr], stdin: Option<&[u8]>| {
        let mut a: Vec<OsString> = vec![command.into()];
        a.extend(options.iter().map(OsString::from));
        a.extend(["--passphrase-file".into(), key.clone().into()]);
        a.push(image.path.clone().into());
        a.extend(rest.iter().map(|s| s.to_os_string()));
        user.run_input(&qcowfs_bin(), a, stdin)
    };
    let image_name = file_name(&image.path).to_string();

    // Two readable file systems: /boot and rhel/root; the user is told how to choose.
    let r = run_as("ls", &[], &[OsStr::new("/")], None);
    assert_one_line_error(&r, &[&image_name], REFUSAL_LIMIT);
    assert!(
        r.stderr.contains("partition 1, LV rhel/root")
            && r.stderr.contains("--partition N or --lv VG/LV"),
        "{}",
        r.stderr
    );
    // The LV, chosen by name or as the one readable volume of partition 2.
    for options in [&["--lv", "rhel/root"][..], &["--partition", "2"][..]] {
        let r = run_as("cat", options, &[OsStr::new("/etc/fstab")], None);
        r.assert_success();
        assert_eq!(r.stdout, FSTAB, "{options:?}");
    }
    let r = run_as(
        "cat",
        &["--lv", "rhel/root"],
        &[OsStr::new("/var/big")],
        None,
    );
    r.assert_success();
    assert!(
        r.stdout == big,
        "/var/big read through the LV's two segments differs"
    );
    let r = run_as(
        "cat",
        &["--partition", "1"],
        &[OsStr::new("/grub.cfg")],
        None,
    );
    r.assert_success();
    assert_eq!(r.stdout, b"set default=0\n");

    // Refusals name what was found.
    let r = run_as("ls", &["--lv", "rhel/swap"], &[OsStr::new("/")], None);
    assert_one_line_error(&r, &[&image_name], REFUSAL_LIMIT);
    assert!(r.stderr.contains("rhel/swap holds swap"), "{}", r.stderr);
    let r = run_as("ls", &["--lv", "rhel/home"], &[OsStr::new("/")], None);
    assert_one_line_error(&r, &[&image_name], REFUSAL_LIMIT);
    assert!(
        r.stderr
            .contains("--lv rhel/home: no such logical volume (the disk has rhel/root, rhel/swap)"),
        "{}",
        r.stderr
    );

    // A change through the LV: the checker is clean on the LV put back together from QEMU's
    // raw copy, and the kernel reads the new bytes there.
    let motd = b"repaired through LVM\n";
    let r = run_as(
        "write",
        &["--lv", "rhel/root"],
        &[OsStr::new("/etc/motd")],
        Some(motd),
    );
    r.assert_success();
    assert_check_clean_when(&image, "write through the LV");
    let root = root_of(work, &image);
    let repair = run("xfs_repair", ["-n".as_ref(), root.as_os_str()]);
    assert!(
        repair.status.success(),
        "xfs_repair -n after the write:\n{}{}",
        repair.stdout_str(),
        repair.stderr
    );
    // Nothing outside root's extents changed: /boot, the label, the metadata, swap.
    let after = fs::read(work.join("view.raw")).unwrap();
    let before = fs::read(&base.path).unwrap();
    let backup = fs::read_to_string(work.join("vg.backup")).unwrap();
    let data = (PV_START * 512 + pe_start(&backup) * 512) as usize;
    let root_end = data + (ROOT_EXTENTS * EXTENT) as usize;
    assert!(
        after[..data] == before[..data] && after[root_end..] == before[root_end..],
        "the write through rhel/root changed bytes outside its extents"
    );
    let mnt = LoopMount::new(&root, "loop,ro");
    let read = fs::read(mnt.path().join("etc/motd"));
    let fstab = fs::read(mnt.path().join("etc/fstab"));
    mnt.umount(&root);
    assert_eq!(read.unwrap(), motd);
    assert_eq!(fstab.unwrap(), FSTAB);
}
