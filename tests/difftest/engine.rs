//! The engine: applies each operation to the mount and to a raw reference file (`qemu-img convert
//! -O raw` of the starting chain, sparse), compares every read, and after the last operation
//! unmounts and checks the image with QEMU: `compare` with the reference, `check` clean (no
//! errors, no leaks), backing files byte-identical, the snapshot unchanged, then QEMU writes
//! after qcowfs and everything is checked again (and read back through a read-only mount).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::build::{build, Built};
use crate::common::{
    assert_check_clean_when, assert_same_bytes, assert_shared_mmap_refused, describe_status,
    mmap_write, qcowfs, qemu_img, Image, Mount, Rng,
};
use crate::config::Config;
use crate::ops::{Gen, Op, Via};

/// How long a rewritten partition table may take to show in the `disk-partN` files.
const TABLE_FOLLOWS: Duration = Duration::from_millis(1500);

/// What the watchdog and the failure report see of a running configuration.
#[derive(Default)]
pub struct Progress {
    /// The operations applied so far (the last one may be the one running).
    pub log: Vec<String>,
    /// What is running now: "op N", "building", "final checks", ...
    pub phase: String,
    pub since: Option<Instant>,
    /// The device of the live mount (names its /sys/fs/fuse/connections entry).
    pub fuse_dev: Option<u64>,
    /// `qcowfs umount` refusals "the mount is busy" that a retry 100 ms later got past.
    pub busy_retries: u32,
}

pub type Shared = Arc<Mutex<Progress>>;

fn set_phase(p: &Shared, phase: String) {
    let mut g = p.lock().unwrap_or_else(|e| e.into_inner());
    g.phase = phase;
    g.since = Some(Instant::now());
}

/// One configuration's run.
struct Engine<'a> {
    cfg: &'a Config,
    built: Built,
    /// The mounted image as qemu opens it (its secrets shrink to one after a seal).
    top: Image,
    reference: File,
    ref_path: PathBuf,
    snap_ref: Option<Vec<u8>>,
    mount: Option<Mount>,
    disk: Option<File>,
    parts: BTreeMap<u32, File>,
    backing_hashes: Vec<(PathBuf, String)>,
    /// How many layers qemu and qcowfs see (all, or just the top after a seal).
    depth: usize,
    progress: Shared,
    dir: PathBuf,
}

/// Runs `ops` operations of `cfg` from `seed`; panics (with the phase in `progress`) on the first
/// failure.
pub fn run(cfg: &Config, seed: u64, ops: usize, exclude: Vec<String>, progress: Shared) {
    set_phase(&progress, "building the chain".into());
    let tmp = tempfile::Builder::new()
        .prefix(&format!("qcowfs-difftest-{}-", cfg.name))
        .tempdir()
        .expect("create temp folder");
    let dir = tmp.path().to_path_buf();
    let tmp = KeepOnPanic(Some(tmp));
    let mut rng = Rng::new(seed);
    let built = build(cfg, &dir, &mut rng);
    let top = built.top().clone();
    let ref_path = dir.join("reference.raw");
    top.convert_raw(&ref_path);
    let reference = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&ref_path)
        .expect("open the reference");
    assert_eq!(
        reference.metadata().expect("stat reference").len(),
        top.size,
        "qemu-img convert made a reference of another size"
    );
    let snap_ref = cfg.snapshot.then(|| snapshot_raw(&top, &dir));
    let backing_hashes = built.layers[..built.layers.len() - 1]
        .iter()
        .map(|l| (l.path.clone(), sha256_of(&l.path)))
        .collect();
    let mut gen = Gen::new(
        rng.next_u64(),
        built.windows.clone(),
        top.size,
        built.layout.clone(),
        cfg.snapshot,
        cfg.sealable(),
        exclude,
    );
    let depth = built.layers.len();
    let mut e = Engine {
        cfg,
        built,
        top,
        reference,
        ref_path,
        snap_ref,
        mount: None,
        disk: None,
        parts: BTreeMap::new(),
        backing_hashes,
        depth,
        progress: progress.clone(),
        dir,
    };
    set_phase(&progress, "first mount".into());
    e.mount();
    let trace = std::env::var_os("QCOWFS_DIFFTEST_TRACE").is_some();
    for i in 0..ops {
        let op = gen.next_op();
        if trace {
            eprintln!("difftest-trace {} #{i} {op}", cfg.name);
        }
        {
            let mut g = progress.lock().unwrap_or_else(|e| e.into_inner());
            g.log.push(op.to_string());
        }
        set_phase(&progress, format!("op #{i}: {op}"));
        e.apply(&op);
    }
    set_phase(&progress, "final checks after the last operation".into());
    e.finish(&mut rng);
    drop(tmp);
}

/// Keeps a failed run's folder (images, reference) when `QCOWFS_DIFFTEST_KEEP` is set.
struct KeepOnPanic(Option<tempfile::TempDir>);

impl Drop for KeepOnPanic {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            if thread::panicking() && std::env::var_os("QCOWFS_DIFFTEST_KEEP").is_some() {
                eprintln!("difftest: kept {}", dir.keep().display());
            }
        }
    }
}

impl Engine<'_> {
    fn mount_options(&self) -> Vec<OsString> {
        self.built.key_options(self.depth)
    }

    fn mount(&mut self) {
        let m = Mount::new(&self.top.path, &self.mount_options());
        let dev = fs::metadata(m.mountpoint()).map(|md| md.dev()).ok();
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fuse_dev = dev;
        self.disk = Some(open_rw(&m.disk()));
        self.mount = Some(m);
        self.parts.clear();
    }

    fn umount(&mut self) {
        self.disk = None;
        self.parts.clear();
        let m = self.mount.take().expect("mounted");
        let retries = m.umount_retrying_busy(20);
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .busy_retries += retries;
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .fuse_dev = None;
    }

    fn mountpoint(&self) -> &Path {
        self.mount.as_ref().expect("mounted").mountpoint()
    }

    /// The file an operation goes through, where it starts on the disk, and its size.
    fn target(&mut self, via: Via) -> (&File, u64, u64) {
        match via {
            Via::Disk => (self.disk.as_ref().expect("disk open"), 0, self.top.size),
            Via::Part(n) => {
                let (start, len) = self.built.layout.parts[&n];
                if !self.parts.contains_key(&n) {
                    let path = self.mountpoint().join(format!("disk-part{n}"));
                    let f = open_rw(&path);
                    self.parts.insert(n, f);
                }
                (&self.parts[&n], start, len)
            }
        }
    }

    fn ref_write(&self, off: u64, data: &[u8]) {
        self.reference
            .write_all_at(data, off)
            .expect("write the reference");
    }

    fn ref_read(&self, off: u64, len: u64) -> Vec<u8> {
        let mut buf = vec![0u8; len as usize];
        self.reference
            .read_exact_at(&mut buf, off)
            .expect("read the reference");
        buf
    }

    fn ref_zero(&self, off: u64, len: u64) {
        let zeros = vec![0u8; MIB_USIZE];
        let mut at = off;
        while at < off + len {
            let n = (off + len - at).min(MIB_USIZE as u64);
            self.ref_write(at, &zeros[..n as usize]);
            at += n;
        }
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Write {
                via,
                off,
                len,
                seed,
            } => {
                let data = self.built.data(*len, *seed);
                let (f, base, size) = self.target(*via);
                if off + len <= size {
                    f.write_all_at(&data, *off).unwrap_or_else(|e| {
                        panic!("pwrite of {len} bytes at {off:#x} of {via}: {e}")
                    });
                    self.ref_write(base + off, &data);
                } else {
                    // Runs past the end: a fixed-size file stores what fits.
                    let fits = size - off;
                    let n = f.write_at(&data, *off).unwrap_or_else(|e| {
                        panic!(
                            "pwrite of {len} bytes at {off:#x} of {via} ({fits} bytes before its \
                             end): {e}"
                        )
                    }) as u64;
                    assert!(
                        n > 0 && n <= fits,
                        "pwrite of {len} bytes at {off:#x} of {via} stored {n} bytes; {fits} fit \
                         before its end"
                    );
                    self.ref_write(base + off, &data[..n as usize]);
                }
            }
            Op::Read { via, off, len } => {
                let (f, base, size) = self.target(*via);
                let len = (*len).min(size - off);
                let mut buf = vec![0u8; len as usize];
                f.read_exact_at(&mut buf, *off)
                    .unwrap_or_else(|e| panic!("pread of {len} bytes at {off:#x} of {via}: {e}"));
                let want = self.ref_read(base + off, len);
                assert_same_bytes(
                    &buf,
                    &want,
                    &format!(
                        "pread of {len} bytes at {off:#x} of {via} (disk offset {:#x}) vs the \
                         reference (offsets below are relative to the read)",
                        base + off
                    ),
                );
            }
            Op::Fsync => {
                let disk = self.disk.as_ref().expect("disk open");
                disk.sync_all()
                    .unwrap_or_else(|e| panic!("fsync of disk: {e}"));
                for (n, f) in &self.parts {
                    f.sync_all()
                        .unwrap_or_else(|e| panic!("fsync of disk-part{n}: {e}"));
                }
            }
            Op::Punch { via, off, len } => {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                self.fallocate(*via, mode, *off, *len);
            }
            Op::ZeroRange {
                via,
                off,
                len,
                keep_size,
            } => {
                let mut mode = libc::FALLOC_FL_ZERO_RANGE;
                if *keep_size {
                    mode |= libc::FALLOC_FL_KEEP_SIZE;
                }
                self.fallocate(*via, mode, *off, *len);
            }
            Op::Mmap {
                via,
                off,
                len,
                seed,
            } => {
                let data = self.built.data(*len, *seed);
                let (f, base, _) = self.target(*via);
                if matches!(via, Via::Part(_)) {
                    // Partition files bypass the page cache (so they never disagree with `disk`)
                    // and so refuse shared mappings, as the README says: map `disk` there instead.
                    assert_shared_mmap_refused(f, *off, &via.to_string());
                    let disk = self.disk.as_ref().expect("disk open");
                    mmap_write(disk, base + off, &data, "disk (for a partition)");
                } else {
                    mmap_write(f, *off, &data, &via.to_string());
                }
                self.ref_write(base + off, &data);
            }
            Op::Threaded { writes } => {
                let datas: Vec<Vec<u8>> = writes
                    .iter()
                    .map(|&(_, len, seed)| self.built.data(len, seed))
                    .collect();
                let disk = self.disk.as_ref().expect("disk open");
                thread::scope(|s| {
                    let handles: Vec<_> = writes
                        .iter()
                        .zip(&datas)
                        .map(|(&(off, len, _), data)| {
                            s.spawn(move || {
                                disk.write_all_at(data, off).map_err(|e| {
                                    format!("threaded pwrite of {len} bytes at {off:#x}: {e}")
                                })
                            })
                        })
                        .collect();
                    for h in handles {
                        if let Err(msg) = h.join().expect("writer thread") {
                            panic!("{msg}");
                        }
                    }
                });
                for (&(off, _, _), data) in writes.iter().zip(&datas) {
                    self.ref_write(off, data);
                }
            }
            Op::Resize { part, len } => self.resize(*part, *len),
            Op::ReadSnapshot { off, len } => {
                let path = self.mountpoint().join("snapshots").join("snap1");
                let f =
                    File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
                let mut buf = vec![0u8; *len as usize];
                f.read_exact_at(&mut buf, *off).unwrap_or_else(|e| {
                    panic!("pread of {len} bytes at {off:#x} of snapshots/snap1: {e}")
                });
                let snap = self.snap_ref.as_ref().expect("a snapshot reference");
                assert_same_bytes(
                    &buf,
                    &snap[*off as usize..(*off + *len) as usize],
                    &format!("pread of {len} bytes at {off:#x} of snapshots/snap1 vs qemu-img convert -l snap1"),
                );
            }
            Op::Remount => {
                self.umount();
                self.check_image("after a remount's umount");
                self.mount();
            }
            Op::Seal => self.seal(),
        }
    }

    fn fallocate(&mut self, via: Via, mode: i32, off: u64, len: u64) {
        let (f, base, size) = self.target(via);
        // SAFETY: fallocate(2) on an open descriptor; no memory is passed.
        let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
        if rc != 0 {
            panic!(
                "fallocate(mode {mode:#x}) of {len} bytes at {off:#x} of {via}: {}",
                std::io::Error::last_os_error()
            );
        }
        let end = (off + len).min(size);
        if off < end {
            self.ref_zero(base + off, end - off);
        }
    }

    /// Rewrites the table through `disk`, then waits for the partition files to follow.
    fn resize(&mut self, part: u32, len: u64) {
        let writes = self.built.layout.resize(part, len);
        let disk = self.disk.as_ref().expect("disk open");
        for (off, bytes) in &writes {
            disk.write_all_at(bytes, *off)
                .unwrap_or_else(|e| panic!("pwrite of the partition table at {off:#x}: {e}"));
            self.ref_write(*off, bytes);
        }
        // Old descriptors may name the partition as it was.
        self.parts.clear();
        let want: BTreeMap<u32, u64> = self
            .built
            .layout
            .parts
            .iter()
            .map(|(&n, &(_, l))| (n, l))
            .collect();
        let start = Instant::now();
        loop {
            let have = partition_files(self.mountpoint());
            if have == want {
                return;
            }
            if start.elapsed() > TABLE_FOLLOWS {
                panic!(
                    "the disk-partN files (number → bytes) do not follow the rewritten table \
                     within {TABLE_FOLLOWS:?}: {have:?}, want {want:?}"
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn seal(&mut self) {
        self.umount();
        let mut args: Vec<OsString> = vec!["seal".into()];
        args.extend(self.built.key_options(self.depth));
        args.push(self.top.path.clone().into());
        let r = qcowfs(&args);
        assert!(
            r.status.success(),
            "qcowfs seal failed ({}): {}\n{}",
            describe_status(r.status),
            r.command,
            r.stderr
        );
        self.depth = 1;
        self.top.secrets.truncate(1);
        let info = self.top.qemu_info();
        assert!(
            info.get("backing-filename").is_none(),
            "the sealed image still names a backing file: {info}"
        );
        self.check_image("after seal");
        self.mount();
    }

    /// `qemu-img check` clean, `qemu-img compare` with the reference, backing files unchanged.
    fn check_image(&self, when: &str) {
        assert_check_clean_when(&self.top, when);
        let r = qemu_compare_with_raw(&self.top, &self.ref_path);
        assert!(
            r.status.code() == Some(0),
            "{when}: qemu-img compare of the image with the raw reference ({}): {}{}\n{}",
            describe_status(r.status),
            r.stdout_str(),
            r.stderr,
            r.command
        );
        for (path, hash) in &self.backing_hashes {
            assert_eq!(
                &sha256_of(path),
                hash,
                "{when}: backing file {} changed",
                path.display()
            );
        }
    }

    fn finish(&mut self, rng: &mut Rng) {
        self.umount();
        self.check_image("after the final umount");
        if let Some(snap) = &self.snap_ref {
            let now = snapshot_raw(&self.top, &self.dir);
            assert_same_bytes(
                &now,
                snap,
                "internal snapshot snap1 after the run vs before",
            );
        }
        // QEMU writes after qcowfs: a pattern, seeded bytes and zeroes, unaligned.
        set_phase(&self.progress, "qemu-io writes after qcowfs".into());
        let mut ranges = vec![];
        let mut cmds = vec![];
        let mut files = vec![];
        for k in 0..3 {
            let (ws, wl) = self.built.windows[rng.below(self.built.windows.len() as u64) as usize];
            let len = rng.range(1, (300 * 1024).min(wl));
            let off = ws + rng.below(wl - len + 1);
            let bytes = match k {
                0 => vec![0xc5u8; len as usize],
                1 => self.built.data(len, rng.next_u64()),
                _ => vec![0u8; len as usize],
            };
            match k {
                0 => cmds.push(format!("write -P 0xc5 {off} {len}")),
                1 => {
                    let f = tempfile::NamedTempFile::new().expect("temp data file");
                    fs::write(f.path(), &bytes).expect("write temp data file");
                    cmds.push(format!("write -s {} {off} {len}", f.path().display()));
                    files.push(f);
                }
                _ => cmds.push(format!("write -z {off} {len}")),
            }
            self.ref_write(off, &bytes);
            ranges.push((off, len));
        }
        self.top.qemu_io(&cmds);
        self.check_image("after qemu-io wrote after qcowfs");
        // And qcowfs reads what QEMU wrote.
        set_phase(&self.progress, "read-only mount after qemu-io".into());
        let mut opts = self.mount_options();
        opts.insert(0, "--read-only".into());
        let m = Mount::new(&self.top.path, &opts);
        let disk = File::open(m.disk()).expect("open disk read-only");
        for (off, len) in ranges {
            let mut buf = vec![0u8; len as usize];
            disk.read_exact_at(&mut buf, off)
                .unwrap_or_else(|e| panic!("read-only pread of {len} bytes at {off:#x}: {e}"));
            assert_same_bytes(
                &buf,
                &self.ref_read(off, len),
                &format!("read-only mount after qemu-io: {len} bytes at {off:#x}"),
            );
        }
        drop(disk);
        let retries = m.umount_retrying_busy(20);
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .busy_retries += retries;
        let _ = self.cfg;
    }
}

const MIB_USIZE: usize = 1 << 20;

fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} read-write: {e}", path.display()))
}

/// The `disk-partN` files in a mountpoint: N → size in bytes.
fn partition_files(mountpoint: &Path) -> BTreeMap<u32, u64> {
    fs::read_dir(mountpoint)
        .unwrap_or_else(|e| panic!("list {}: {e}", mountpoint.display()))
        .map(|e| e.expect("directory entry"))
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n: u32 = name.strip_prefix("disk-part")?.parse().ok()?;
            let len = fs::metadata(e.path()).ok()?.len();
            Some((n, len))
        })
        .collect()
}

fn sha256_of(path: &Path) -> String {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// `qemu-img convert -l snap1 -O raw` of `image`, as bytes.
fn snapshot_raw(image: &Image, dir: &Path) -> Vec<u8> {
    let dest = dir.join("snapshot.raw");
    let (mut args, target) = image.qemu_open_args();
    args.insert(0, "convert".into());
    args.extend([
        "-l".into(),
        "snap1".into(),
        target,
        "-O".into(),
        "raw".into(),
    ]);
    args.push(dest.to_str().expect("UTF-8 path").into());
    qemu_img(&args);
    let bytes = fs::read(&dest).expect("read converted snapshot");
    let _ = fs::remove_file(&dest);
    bytes
}

/// `qemu-img compare IMAGE RAW` (the whole chain with its secrets against a raw file).
fn qemu_compare_with_raw(image: &Image, raw: &Path) -> crate::common::Run {
    let (mut args, target) = image.qemu_open_args();
    args.insert(0, "compare".into());
    let raw = raw.to_str().expect("UTF-8 path");
    if image.secrets.iter().any(Option::is_some) {
        // --image-opts applies to both files.
        args.push(target);
        args.push(format!("driver=raw,file.filename={raw}"));
    } else {
        args.push("-F".into());
        args.push("raw".into());
        args.push(target);
        args.push(raw.into());
    }
    crate::common::run("qemu-img", &args)
}
