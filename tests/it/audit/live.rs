//! `qcowfs audit` where operators run it: disks a running writer holds (audited, marked in use,
//! exit 0), a raw base of unwritten extents (reserved by fallocate, counted as holes), nova's
//! `disk.local`/`disk.eph0`/`disk.swap`, and a CloudStack KVM pool whose template is a base.

use super::*;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::Instant;

/// Kills the child (a qemu-io holding an image) in every outcome.
struct Holder {
    child: Child,
    log: PathBuf,
}

impl Holder {
    /// Fails the test if the holder is gone (it must hold the lock while the audit runs).
    fn assert_holding(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "qemu-io, holding the image's lock, exited ({status}) while the audit ran: {}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether some process holds QEMU's write permission lock on `path`: an open file description
/// lock over byte 101 of its inode (QEMU locks byte 100 + the permission's bit; write is bit 1),
/// read from /proc/locks. Unlike asking `qemu-img info`,
/// looking takes no lock itself: a `qemu-img info` running while qemu-io opened the image denied
/// qemu-io its write lock ("Failed to get \"write\" lock"), and the holder below then exited.
fn has_ofd_lock(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path).expect("stat the image");
    let inode = format!(
        "{:02x}:{:02x}:{}",
        libc::major(meta.dev()),
        libc::minor(meta.dev()),
        meta.ino()
    );
    fs::read_to_string("/proc/locks")
        .expect("read /proc/locks")
        .lines()
        .any(|l| {
            // "1: OFDLCK ADVISORY  READ -1 fe:00:10010807 100 101": the last two are the range.
            let w: Vec<&str> = l.split_whitespace().collect();
            let range = match w.as_slice() {
                [.., start, end] => start.parse::<u64>().ok().zip(end.parse::<u64>().ok()),
                _ => None,
            };
            l.contains("OFDLCK")
                && w.contains(&inode.as_str())
                && range.is_some_and(|(start, end)| start <= 101 && 101 <= end)
        })
}

/// A qemu-io that opens `image` read-write and holds QEMU's writer locks while it sleeps, as a
/// running VM does. Should it exit before it locks, it is started again, and its exit status and
/// messages are reported if it never holds the lock.
fn hold_for_writing(dir: &Path, image: &Image) -> Holder {
    let mut gone = Vec::new();
    loop {
        let log = dir.join(format!("qemu-io-{}.log", gone.len()));
        let (mut args, target) = image.qemu_open_args();
        args.extend(["-c".to_string(), "sleep 60000".to_string(), target]);
        let mut holder = Holder {
            child: Command::new("qemu-io")
                .args(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(&log).expect("qemu-io log"))
                .spawn()
                .expect("start qemu-io"),
            log,
        };
        let start = Instant::now();
        let locked = loop {
            if has_ofd_lock(&image.path) {
                break true;
            }
            if let Ok(Some(status)) = holder.child.try_wait() {
                let said = fs::read_to_string(&holder.log).unwrap_or_default();
                gone.push(format!(
                    "qemu-io exited ({status}) before it locked: {said}"
                ));
                break false;
            }
            if start.elapsed() > Duration::from_secs(20) {
                gone.push("qemu-io ran 20 s without locking the image".to_string());
                break false; // dropping the holder kills it
            }
            thread::sleep(Duration::from_millis(50));
        };
        if locked {
            return holder;
        }
        assert!(gone.len() < 3, "{gone:#?}");
    }
}

/// On a live host almost every disk is held by its VM: the audit reads it without locks (as
/// `qemu-img info -U` does), gives it its full row marked in use, and exits 0. `-U` is still
/// accepted and changes nothing.
#[test]
fn a_disk_a_writer_holds_is_audited_and_marked_in_use_with_exit_status_0() {
    let dir = workdir();
    let nova = Nova::new(dir.path());
    let base = nova.base(BASE1, 16 * MIB, &[(0, 2 * MIB, 0x41)]);
    let held = nova.instance(INSTANCE_A, &base, BASE1, Enc::Luks);
    held.write_pattern(4 * MIB, MIB, 0x51);
    let idle = nova.instance(INSTANCE_B, &base, BASE1, Enc::Aes);
    idle.write_pattern(8 * MIB, MIB, 0x52);
    let (want_held, want_idle) = (Expected::of(&held), Expected::of(&idle));
    let mut holder = hold_for_writing(dir.path(), &held);

    let r = audit(&[OsString::from("--json"), nova.instances.clone().into()]);
    holder.assert_holding();
    r.assert_success();
    let all = json_lines(&r);
    for (image, want, in_use) in [(&held, want_held, true), (&idle, want_idle, false)] {
        let o = object_for(&all, "disk", path_str(&image.path));
        assert_eq!(o["audited"], true, "{o:#}");
        assert_eq!(o["in_use"], in_use, "{o:#}");
        assert_eq!(o["data_bytes"].as_u64(), Some(want.data()), "{o:#}");
        assert_eq!(o["plaintext_base_bytes"].as_u64(), Some(want.base), "{o:#}");
    }
    let o = object_for(&all, "base", &canonical(&base.path));
    assert_eq!(o["instances"], 2, "{o:#}");

    for args in [vec![], vec![OsString::from("-U")]] {
        let mut args = args;
        args.push(nova.instances.clone().into());
        let r = audit(&args);
        holder.assert_holding();
        r.assert_success();
        let text = r.stdout_str();
        let header: Vec<&str> = text.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(
            header,
            [
                "DISK",
                "ENCRYPTION",
                "GUEST",
                "DATA",
                "UNENCRYPTED",
                "IN",
                "USE",
                "CHAIN"
            ],
            "{text}"
        );
        for (image, enc, want, in_use) in [
            (&held, "luks", want_held, "yes"),
            (&idle, "aes", want_idle, "no"),
        ] {
            let words = row(&text, path_str(&image.path));
            assert_eq!(words[1], enc, "{text}");
            assert_eq!(format!("{} {}", words[2], words[3]), mib(want.data()));
            assert_eq!(words[4], percent(want.share()), "{text}");
            assert_eq!(words[5], in_use, "{text}");
        }
        assert!(
            text.lines().any(|l| l.starts_with("in use: a running VM")),
            "{text}"
        );
        assert!(r.stderr.is_empty(), "{}", r.stderr);
    }
}

/// Is the file system under `dir` one whose extent map marks unwritten extents (what fallocate
/// reserves)? The test needs it and fails, naming the folder, where it is not (tmpfs).
fn assert_unwritten_extents(dir: &Path) {
    let kind = run_ok("stat", ["-f", "-c", "%T", path_str(dir)]);
    let kind = kind.stdout_str();
    assert!(
        ["ext2/ext3", "xfs", "btrfs"].contains(&kind.trim()),
        "{} is on {}: this test needs a temp folder on ext4, XFS or btrfs (set TMPDIR)",
        dir.display(),
        kind.trim()
    );
}

/// A raw base made by `fallocate -l 64M` holds 64 MiB of unwritten extents (reserved, reading as
/// zeros) and st_blocks says 64 MiB; after `cat base > /dev/null` SEEK_DATA says so too. Only
/// the 4 MiB really written are guest data and plaintext, and `info` agrees with `audit` on
/// every value.
#[test]
fn unwritten_extents_of_a_raw_base_are_not_counted_as_data_even_once_cached() {
    let dir = workdir();
    assert_unwritten_extents(dir.path());
    let nova = Nova::new(dir.path());
    let base_path = nova.instances.join("_base").join(BASE1);
    run_ok("fallocate", ["-l", "64M", path_str(&base_path)]);
    let base = Image::plain(&base_path, Format::Raw, 64 * MIB);
    base.write_pattern(8 * MIB, 4 * MIB, 0x41);
    let reserved = base.qemu_info()["actual-size"]
        .as_u64()
        .expect("actual-size");
    assert!(reserved >= 64 * MIB, "fallocate reserved {reserved} bytes");
    // Read it all, as `cat base > /dev/null` does: its pages now sit in the page cache.
    assert_eq!(
        fs::read(&base_path).expect("read the base").len() as u64,
        64 * MIB
    );
    let inst = nova.instance(INSTANCE_A, &base, BASE1, Enc::Aes);
    inst.write_pattern(32 * MIB, MIB, 0x51);
    // The oracle is what was written (4 MiB of the base, 1 MiB of the disk beside it), not
    // `qemu-img map`: it asks SEEK_DATA and counts the cached unwritten extents as data too.

    let r = audit(&[OsString::from("--json"), nova.instances.clone().into()]);
    r.assert_success();
    let all = json_lines(&r);
    let disk = object_for(&all, "disk", path_str(&inst.path));
    assert_eq!(disk["data_bytes"].as_u64(), Some(5 * MIB), "{disk:#}");
    assert_eq!(
        disk["plaintext_base_bytes"].as_u64(),
        Some(4 * MIB),
        "{disk:#}"
    );
    let o = object_for(&all, "base", &canonical(&base_path));
    assert_eq!(o["plaintext_bytes"].as_u64(), Some(4 * MIB), "{o:#}");
    assert_eq!(o["allocated_bytes"].as_u64(), Some(4 * MIB), "{o:#}");

    // `info` says the same, in the same words and fields.
    let r = qcowfs(["info", "--json", path_str(&inst.path)]);
    r.assert_success();
    let info: Value = serde_json::from_slice(&r.stdout).expect("info JSON");
    assert_eq!(info["encryption"], disk["encryption"], "{info:#}");
    assert_eq!(info["encryption"], "aes", "{info:#}");
    for field in ["data_bytes", "unencrypted_bytes", "unencrypted_share"] {
        assert_eq!(info["coverage"][field], disk[field], "{field}: {info:#}");
    }
    let layers = info["layers"].as_array().expect("layers");
    let chain = disk["chain"].as_array().expect("chain");
    for (layer, link) in layers.iter().zip(chain) {
        for field in ["format", "encryption", "encrypted", "provided_bytes"] {
            assert_eq!(layer[field], link[field], "{field}: {info:#} vs {disk:#}");
        }
    }
    assert_eq!(
        layers[1]["allocated_bytes"], o["allocated_bytes"],
        "{info:#}"
    );

    let r = qcowfs(["info", path_str(&inst.path)]);
    r.assert_success();
    let info = r.stdout_str();
    assert!(info.lines().any(|l| l == "encryption: aes"), "{info}");
    assert!(
        info.contains("guest data: 5.0 MiB (80% unencrypted)"),
        "{info}"
    );
    let r = audit(&[&nova.instances]);
    r.assert_success();
    let text = r.stdout_str();
    let words = row(&text, path_str(&inst.path));
    assert_eq!(&words[1..5], ["aes", "5.0", "MiB", "80%"], "{text}");
    let words = row(&text, &canonical(&base_path));
    assert_eq!(&words[5..], ["4.0", "MiB"], "{text}");
}

/// Nova's extra disks are instance disks too, each its own row: the ephemeral `disk.local`,
/// `disk.eph0` (more than one ephemeral) and `disk.swap`; `disk.config` (a raw config drive) and
/// `disk.info` are not.
#[test]
fn nova_ephemeral_and_swap_disks_get_their_own_rows() {
    let dir = workdir();
    let nova = Nova::new(dir.path());
    let base = nova.base(BASE1, 16 * MIB, &[(0, 2 * MIB, 0x41)]);
    let root = nova.instance(INSTANCE_A, &base, BASE1, Enc::Luks);
    let folder = nova.instances.join(INSTANCE_A);
    let ephemeral = nova.base("ephemeral_1_0706d66", 8 * MIB, &[]);
    let local = qcow2(folder.join("disk.local"), ephemeral.size)
        .backing_named(&ephemeral, "../_base/ephemeral_1_0706d66")
        .luks(LUKS_PASS)
        .create();
    local.write_pattern(0, MIB, 0x61);
    let eph0 = qcow2(folder.join("disk.eph0"), 8 * MIB)
        .luks(LUKS_PASS)
        .create();
    eph0.write_pattern(MIB, 2 * MIB, 0x62);
    let swap = nova.base("swap_512", 4 * MIB, &[]);
    let swap_disk = qcow2(folder.join("disk.swap"), swap.size)
        .backing_named(&swap, "../_base/swap_512")
        .create();
    swap_disk.write_pattern(0, MIB, 0x63);
    fs::write(folder.join("disk.config"), vec![0x43; 64 << 10]).unwrap();
    fs::write(folder.join("disk.info"), br#"{"/x/disk": "qcow2"}"#).unwrap();

    let r = audit(&[OsString::from("--json"), nova.instances.clone().into()]);
    r.assert_success();
    let all = json_lines(&r);
    let disks: Vec<&str> = objects(&all, "disk")
        .iter()
        .map(|o| o["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        disks,
        [&root, &eph0, &local, &swap_disk].map(|i| path_str(&i.path)),
        "{all:#?}"
    );
    for (image, enc) in [
        (&root, Enc::Luks),
        (&eph0, Enc::Luks),
        (&local, Enc::Luks),
        (&swap_disk, Enc::None),
    ] {
        let o = object_for(&all, "disk", path_str(&image.path));
        let want = qemu_map(image)
            .iter()
            .filter(|e| e["data"] == true)
            .map(|e| e["length"].as_u64().unwrap())
            .sum::<u64>();
        assert_eq!(o["encryption"], enc.name(), "{o:#}");
        assert_eq!(o["data_bytes"].as_u64(), Some(want), "{o:#}");
    }
    let bases: Vec<&str> = objects(&all, "base")
        .iter()
        .map(|o| o["path"].as_str().unwrap())
        .collect();
    assert_eq!(bases.len(), 3, "{all:#?}");
}

/// A CloudStack KVM primary storage pool: UUID-named files side by side, LUKS volumes over a
/// plaintext qcow2 template (named by its absolute path, as CloudStack does). The template is a
/// base, not a disk: two encrypted disks leaning on one plaintext base holding its data.
#[test]
fn a_cloudstack_pool_gets_its_volumes_as_disks_and_its_template_as_their_plaintext_base() {
    let dir = workdir();
    let pool = dir.path().join("7a3c1e52-0d44-3f0e-9b6a-5f1c2d3e4f50");
    fs::create_dir(&pool).unwrap();
    let template = qcow2(pool.join("c1b2a3d4-1111-4e5f-8a9b-0c1d2e3f4a5b"), 32 * MIB).create();
    template.qemu_io(&[
        format!("write -P 0x41 0 {}", 6 * MIB),
        format!("write -P 0x42 {} {}", 20 * MIB, 2 * MIB),
    ]);
    let template_bytes: u64 = qemu_map(&template)
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(template_bytes, 8 * MIB);
    let volumes: Vec<Image> = [
        "a0e1f2d3-2222-4c5d-9e8f-1a2b3c4d5e6f",
        "f9e8d7c6-3333-4b5a-8c7d-6e5f4a3b2c1d",
    ]
    .iter()
    .enumerate()
    .map(|(i, uuid)| {
        let v = qcow2(pool.join(uuid), template.size)
            .backing(&template)
            .luks(LUKS_PASS)
            .create();
        v.write_pattern((2 + 10 * i as u64) * MIB, MIB, 0x51 + i as u8);
        v
    })
    .collect();
    // A raw file nothing names is not a disk; the pool's own bookkeeping is not either.
    fs::write(
        pool.join("0d9c8b7a-4444-4f3e-8d2c-1b0a9f8e7d6c"),
        vec![0; 1 << 20],
    )
    .unwrap();
    let wants: Vec<Expected> = volumes.iter().map(Expected::of).collect();

    let r = audit(&[OsString::from("--json"), pool.clone().into()]);
    r.assert_success();
    let all = json_lines(&r);
    assert_eq!(objects(&all, "disk").len(), 2, "{all:#?}");
    for (v, want) in volumes.iter().zip(&wants) {
        let o = object_for(&all, "disk", path_str(&v.path));
        assert_eq!(o["encryption"], "luks", "{o:#}");
        assert_eq!(o["data_bytes"].as_u64(), Some(want.data()), "{o:#}");
        assert_eq!(o["plaintext_base_bytes"].as_u64(), Some(want.base), "{o:#}");
        assert_eq!(o["chain"][1]["format"], "qcow2", "{o:#}");
    }
    let bases = objects(&all, "base");
    assert_eq!(bases.len(), 1, "{all:#?}");
    let o = object_for(&all, "base", &canonical(&template.path));
    assert_eq!(o["format"], "qcow2", "{o:#}");
    assert_eq!(o["encryption"], "none", "{o:#}");
    assert_eq!(o["instances"], 2, "{o:#}");
    assert_eq!(o["encrypted_instances"], 2, "{o:#}");
    assert_eq!(o["plaintext_bytes"].as_u64(), Some(template_bytes), "{o:#}");

    let r = audit(&[&pool]);
    r.assert_success();
    let text = r.stdout_str();
    let plain: u64 = wants.iter().map(|w| w.base).sum();
    let data: u64 = wants.iter().map(Expected::data).sum();
    assert_eq!(
        text.lines().last(),
        Some(
            format!(
                "2 of 2 encrypted instances keep {} of their guest data in plaintext bases",
                percent(plain as f64 / data as f64)
            )
            .as_str()
        ),
        "{text}"
    );
    let words = row(&text, &canonical(&template.path));
    assert_eq!(
        &words[1..],
        ["qcow2", "none", "2", "2", "8.0", "MiB"],
        "{text}"
    );
}
