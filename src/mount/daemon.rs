//! The mount daemon's lifecycle. The parent forks before any thread exists; the child opens the chain,
//! mounts, and only then reports "ready" through a pipe, so `qcowfs mount` exits 0 only when
//! `MOUNTPOINT/disk` works, and with the child's one-line error otherwise. The child then serves
//! requests until unmounted (or signalled), flushes everything, records how that went and exits.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::io::{FromRawFd, IntoRawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::devfuse::{serve_without_fuser_unmount, DevFuse};
use super::fs::QcowFs;
use super::kernel_mount::{self, KernelMount};
use super::log_target::LIFECYCLE;
use super::mount_table::top_mount_at;
use super::registry::Record;
use super::uring::{self, Mode};
use crate::chain::{Chain, KeyRing, Layer, OpenOptions};
use crate::disk::null::NullDisk;
use crate::disk::views::SnapshotView;
use crate::disk::{BlockDevice, Disk, DiskOptions};
use crate::error::{Error, Problem, Result};
use crate::keys::{KeyCheck, KeyPolicy};

/// Flush dirty data after this long without writes.
const IDLE_FLUSH: Duration = Duration::from_secs(2);
/// FUSE worker threads: more than cores, so a request waiting on I/O does not stall the rest.
const FUSE_THREADS: usize = 4;
/// How often, at most, the daemon publishes its dirty bytes for `qcowfs list` (a change to zero,
/// after a flush, is published at once).
const DIRTY_PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// Everything a mount needs.
pub struct MountRequest {
    pub image: PathBuf,
    pub mountpoint: PathBuf,
    pub keys: KeyRing,
    /// `--backing-within`: canonical folders backing files must lie in (empty: anywhere).
    pub backing_within: Vec<PathBuf>,
    pub read_only: bool,
    pub cache_size: u64,
    /// `--metadata-cache`: bytes of metadata tables kept, shared by the chain's qcow2 layers.
    pub metadata_cache: u64,
    pub foreground: bool,
    pub allow_other: bool,
    pub force_share: bool,
    /// `--force` (no passphrase check at all) and `--unverified-key` (write even when the top
    /// layer's key cannot be verified: no data yet).
    pub key_policy: KeyPolicy,
    pub log_level: log::LevelFilter,
    /// Where the daemon logs instead of syslog (`--log-file`), an absolute path.
    pub log_file: Option<PathBuf>,
    /// `--io-uring`: which transport carries the requests.
    pub io_uring: Mode,
    /// `--nonempty`: mount over a folder that has files in it.
    pub nonempty: bool,
    /// `qcowfs transport-floor`: serve a disk of this many bytes from memory (see `disk::null`)
    /// instead of opening `image`, which then only names the mount.
    pub null_disk: Option<u64>,
}

/// Mount and, unless in the foreground, return once the daemon reports the mount live.
pub fn mount(mut req: MountRequest) -> Result<()> {
    if req.foreground {
        return serve(req, None);
    }
    let mut log_note = None;
    if req.log_file.is_none() {
        (req.log_file, log_note) = super::filelog::instead_of_syslog();
    }
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::new(&req.mountpoint, std::io::Error::last_os_error()));
    }
    // SAFETY: the fds were just created and are owned here.
    let (mut reader, writer) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    // SAFETY: no other thread exists yet in this process (the CLI forks before starting any).
    match unsafe { libc::fork() } {
        -1 => Err(Error::new(&req.mountpoint, std::io::Error::last_os_error())),
        0 => {
            drop(reader);
            // SAFETY: setsid has no preconditions; the child leaves the terminal's session.
            unsafe { libc::setsid() };
            super::filelog::init_daemon(req.log_file.as_deref(), req.log_level);
            let code = match serve(req, Some(writer)) {
                Ok(()) => 0,
                Err(e) => {
                    log::error!("{e}");
                    1
                }
            };
            std::process::exit(code);
        }
        _child => {
            drop(writer);
            // Only the daemon needs the passphrases.
            let mut req = req;
            drop(std::mem::take(&mut req.keys));
            let mut text = String::new();
            let _ = reader.read_to_string(&mut text);
            // Warnings come first, one per line; the last line is "ok", or the failure's tag, a tab
            // and the error.
            let mut lines: Vec<&str> = text.lines().collect();
            let answer = lines.pop().unwrap_or("").to_string();
            for warning in lines {
                eprintln!("qcowfs: {warning}");
            }
            match answer.strip_prefix("ok") {
                Some(_) => {
                    if let Some(note) = log_note {
                        eprintln!("qcowfs: {note}");
                    }
                    Ok(())
                }
                None if answer.trim().is_empty() => Err(Error::new(
                    &req.image,
                    Problem::Refused("the mount daemon exited before the mount was ready".into()),
                )),
                None => {
                    let (tag, message) = answer.trim().split_once('\t').unwrap_or(("", &answer));
                    Err(Error::relayed(
                        message.trim().to_string(),
                        crate::error::Failure::from_tag(tag),
                    ))
                }
            }
        }
    }
}

/// Open, mount and serve until unmounted. `ready` gets "ok" or the error once that is known.
fn serve(mut req: MountRequest, ready: Option<File>) -> Result<()> {
    let mut ready = ready;
    // One malloc arena. Cache blocks are allocated on the FUSE threads and freed on the flush
    // thread; with an arena per thread (or even two), each arena keeps the holes its freed blocks
    // leave, and the other's allocations cannot use them. Measured under a starved flush writer
    // (the 70/30 mix beside two busy loops): two arenas peaked at 217-283 MiB, an estimated 60-90
    // MiB of it free heap, one arena at 204-209 MiB; unstarved, sequential write peaked at 225-292
    // MiB against 225, and was 3-5% slower in the medians (docs/PERFORMANCE.md, "One malloc
    // arena").
    // SAFETY: mallopt only tunes the allocator; called before this process starts any thread.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let session = match prepare(&req) {
        Ok(s) => s,
        Err(e) => {
            if let Some(mut pipe) = ready.take() {
                let _ = writeln!(pipe, "{}\t{e}", e.failure().tag());
            }
            return Err(e);
        }
    };
    // The keys are derived: the passphrases go now (zeroized), not at the end of the mount, and
    // so do the copies key derivation left on the stack.
    drop(std::mem::take(&mut req.keys));
    crate::crypto::secret::scrub_stack();
    let Prepared {
        session,
        device,
        disk,
        outcome,
        record,
        life: _life,
        mut warnings,
        transport,
        mounted,
        mountpoint,
    } = session;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A thread that cannot be made (a pids limit) costs what it would do, not the mount: the
    // mount is made by now, and a panic here would leave it behind without a daemon.
    let flusher = disk.clone().and_then(|disk| {
        let record = record.clone();
        let spawned =
            spawn_idle_flusher(disk, stop.clone(), move |dirty| record.write_dirty(dirty));
        spawned
            .inspect_err(|e| {
                warnings.push(format!(
                    "no thread for the background writer ({e}): writes are stored only on \
                     fsync, when dirty data reaches its bound, and at umount"
                ))
            })
            .ok()
    });
    if let Ok(mut signals) =
        signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT, libc::SIGHUP])
    {
        // Weak: this thread outlives the session, and the image must close when the session ends.
        let disk = Arc::downgrade(&device);
        let mountpoint = record_mountpoint(&req);
        let spawned = std::thread::Builder::new()
            .name("qcowfs-signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    log::info!("signal {sig}: writing everything and unmounting");
                    // Unmounting ends the session; its last flush failing would drop the dirty
                    // data. So a failed write keeps the mount (and the data) until a later signal
                    // or `qcowfs umount` succeeds, say once space is freed.
                    if let Some(Err(e)) = disk.upgrade().map(|d| d.flush()) {
                        log::error!(
                            "signal {sig}: not unmounting, unwritten data is kept: {e}; \
                             fix the cause and signal again (or run qcowfs umount)"
                        );
                        continue;
                    }
                    match detach(&mountpoint) {
                        Ok(()) => break,
                        Err(e) => log::error!("unmount after signal {sig}: {e}"),
                    }
                }
            });
        if let Err(e) = spawned {
            warnings.push(format!(
                "no thread for signals ({e}): SIGTERM, SIGINT and SIGHUP are ignored; unmount \
                 with qcowfs umount"
            ));
        }
    }
    for w in &warnings {
        log::warn!("{w}");
    }
    if let Some(mut pipe) = ready.take() {
        for w in &warnings {
            let _ = writeln!(pipe, "{w}");
        }
        let _ = writeln!(pipe, "ok");
        drop(pipe);
        detach_stdio();
    }
    log::info!(
        target: LIFECYCLE,
        "{} mounted on {} (pid {}, {}, requests on {transport})",
        std::fs::canonicalize(&req.image)
            .unwrap_or_else(|_| req.image.clone())
            .display(),
        mountpoint.display(),
        std::process::id(),
        if req.read_only { "read-only" } else { "read-write" }
    );
    // The kernel ends the session with ENODEV or ECONNABORTED once the file system is unmounted:
    // that is the normal end, not an error.
    let run = serve_without_fuser_unmount(session).or_else(|e| match e.raw_os_error() {
        Some(libc::ENODEV) | Some(libc::ECONNABORTED) => Ok(()),
        _ => Err(e),
    });
    leave_no_mount_behind(&mountpoint, mounted);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let final_error = outcome.lock().take();
    // Close the image (its last user is the flusher thread) before telling umount we are done.
    if let Some(flusher) = flusher {
        let _ = flusher.join();
    }
    drop(disk);
    drop(device);
    match (run, final_error) {
        (_, Some(e)) => {
            record.write_status(&e);
            Err(Error::relayed(e, crate::error::Failure::Other))
        }
        (Err(e), None) => {
            let e = Error::new(&req.mountpoint, e);
            record.write_status(&e.to_string());
            Err(e)
        }
        (Ok(()), None) => {
            log::info!(
                target: LIFECYCLE,
                "{} unmounted: all writes are in the image",
                mountpoint.display()
            );
            record.write_status("");
            Ok(())
        }
    }
}

/// Open the chain, judge its keys and put the disk over it; also the warnings to show.
fn open_disk(req: &MountRequest) -> Result<(Arc<Disk>, Vec<String>)> {
    let opts = OpenOptions {
        writable: !req.read_only,
        force_share: req.force_share,
        without_keys: false,
        keep_rejected_keys: false,
        backing_within: req.backing_within.clone(),
        record: None,
        faults: None,
    };
    let chain = Chain::open(&req.image, &req.keys, opts)?;
    crate::qcow2::share_metadata_budget(
        chain.layers().iter().filter_map(|l| match l {
            Layer::Qcow2(q) => Some(&**q),
            Layer::Raw(_) => None,
        }),
        req.metadata_cache,
    );
    // Writing with a wrong key would store garbage: refuse. Reading only shows garbage: warn.
    let warnings = match req.key_policy.force {
        true => Vec::new(),
        false => KeyCheck::of(&chain)?.judge_mount(req.read_only, req.key_policy)?,
    };
    let disk = Arc::new(Disk::new(
        chain,
        DiskOptions {
            cache_size: req.cache_size,
            read_only: req.read_only,
        },
    ));
    Ok((disk, warnings))
}

/// A mounted session, not yet serving, and what the daemon keeps beside it.
struct Prepared {
    session: fuser::Session<DevFuse>,
    /// What the mount serves as `disk`.
    device: Arc<dyn BlockDevice>,
    /// The same, when it is an image's (not the transport floor's null disk).
    disk: Option<Arc<Disk>>,
    /// The final flush's error, if it failed.
    outcome: Arc<Mutex<Option<String>>>,
    record: Record,
    /// Held open (and locked) while the daemon lives: `qcowfs umount` waits on it.
    life: Option<std::fs::File>,
    warnings: Vec<String>,
    /// Which transport serves the requests, for the log.
    transport: String,
    /// The device numbers of the FUSE mount, as the mount table shows them after mounting.
    mounted: Option<(u32, u32)>,
    /// The mount point, canonical (resolved before mounting).
    mountpoint: PathBuf,
}

fn prepare(req: &MountRequest) -> Result<Prepared> {
    super::mountpoint::check_before_mount(&req.mountpoint, req.nonempty)?;
    // Resolved before mounting: afterwards the path leads into our own, not yet served, mount.
    let mountpoint =
        std::fs::canonicalize(&req.mountpoint).map_err(|e| Error::new(&req.mountpoint, e))?;
    let (device, disk, mut warnings): (Arc<dyn BlockDevice>, _, _) = match req.null_disk {
        Some(size) => (Arc::new(NullDisk::new(size)), None, Vec::new()),
        None => {
            let (disk, warnings) = open_disk(req)?;
            (disk.clone(), Some(disk), warnings)
        }
    };
    let outcome = Arc::new(Mutex::new(None));
    let on_destroy = {
        let device = device.clone();
        let outcome = outcome.clone();
        move || {
            if let Err(e) = device.flush() {
                log::error!("final flush failed: {e}");
                *outcome.lock() = Some(e.to_string());
            }
        }
    };
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let fs = Arc::new(
        QcowFs::new(device.clone(), uid, gid)
            .with_snapshots(disk.as_deref().map(snapshot_views).unwrap_or_default())
            .on_destroy(on_destroy),
    );
    // After the image (a problem with the image is the more specific error), before the rings
    // (no queue threads for a mount that cannot happen).
    check_fuse_device()?;
    let mut glue = DevFuse::new(fs.clone());
    // The rings exist before INIT asks for io_uring (see `uring`).
    let queues = match req.io_uring {
        Mode::Off => None,
        mode => match uring::Queues::prepare() {
            Ok(q) => Some(q),
            Err(e) if mode == Mode::On => return Err(io_uring_refused(req, &e)),
            Err(e) => {
                log::info!("requests on /dev/fuse: {e}");
                None
            }
        },
    };
    let accepted = queues.as_ref().map(|_| glue.ask_for_uring());
    let running = Arc::new(Mutex::new(None::<uring::Running>));
    {
        // The queues stop before the final flush, so no request is being answered during it.
        let running = running.clone();
        glue.before_destroy(move || {
            if let Some(r) = running.lock().take() {
                r.stop();
            }
        });
    }
    let source = std::fs::canonicalize(&req.image)
        .unwrap_or_else(|_| req.image.clone())
        .display()
        .to_string();
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(source.clone()),
        fuser::MountOption::Subtype("qcowfs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        if req.read_only {
            fuser::MountOption::RO
        } else {
            fuser::MountOption::RW
        },
    ];
    if req.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(FUSE_THREADS);
    config.clone_fd = true;
    let notifier_slot = fs.notifier_slot();
    // As root the mount is made here, as `fuse.qcowfs` (see kernel_mount); it is then ours to
    // undo when the session cannot start.
    let own = kernel_mount::mount(&KernelMount {
        mountpoint: &mountpoint,
        source: &source,
        read_only: req.read_only,
        allow_other: req.allow_other,
    })
    .map_err(|e| Error::new(&req.mountpoint, e).as_role(crate::error::Role::Mountpoint))?;
    let self_mounted = own.is_some();
    let undo = |e: Error| {
        if self_mounted {
            let _ = detach(&mountpoint);
        }
        e
    };
    let session = match own {
        Some(fd) => fuser::Session::from_fd(glue, fd, config.acl, config.clone()),
        None => fuser::Session::new(glue, &req.mountpoint, &config),
    }
    .map_err(|e| undo(Error::new(&req.mountpoint, e)))?;
    let _ = notifier_slot.set(session.notifier());
    let mut transport = "/dev/fuse".to_string();
    match (queues, accepted) {
        (Some(queues), Some(accepted)) if accepted.load(std::sync::atomic::Ordering::Acquire) => {
            use std::os::fd::AsFd;
            match queues.start(session.as_fd(), &fs) {
                Ok(r) => {
                    transport = format!("io_uring, {} queues", r.queues);
                    *running.lock() = Some(r);
                }
                // Dropping the session unmounts a mount fuser made; ours is undone here.
                Err(e) if req.io_uring == Mode::On => return Err(undo(io_uring_refused(req, &e))),
                Err(e) => log::warn!("{e}; requests on /dev/fuse"),
            }
        }
        (Some(_), _) if req.io_uring == Mode::On => {
            let e = "the kernel did not offer FUSE over io_uring in INIT".to_string();
            return Err(undo(io_uring_refused(req, &e)));
        }
        _ => {}
    }
    let mounted = top_mount_at(&mountpoint)
        .ok()
        .flatten()
        .filter(|e| e.is_fuse())
        .map(|e| e.dev);
    let record = Record::for_mountpoint(&mountpoint);
    let life = match record.write_pid(std::process::id(), &mountpoint) {
        Ok(file) => Some(file),
        Err(e) => {
            warnings.push(format!(
                "warning: cannot record the daemon in {}: {e}; qcowfs umount will not wait for \
                 this mount to finish writing",
                record.pid_file.display()
            ));
            None
        }
    };
    Ok(Prepared {
        session,
        device,
        disk,
        outcome,
        record,
        life,
        warnings,
        transport,
        mounted,
        mountpoint,
    })
}

/// After the session: the kernel has unmounted when the session ended by an unmount; when it
/// ended otherwise (an error), the mount is still on top at `mountpoint` with nobody serving it,
/// and is detached (lazily). Only the mount of device `dev` is touched: whatever lies under it,
/// or was mounted there since, is not ours.
fn leave_no_mount_behind(mountpoint: &std::path::Path, dev: Option<(u32, u32)>) {
    let top = top_mount_at(mountpoint).ok().flatten();
    if dev.is_none() || top.map(|e| e.dev) != dev {
        return;
    }
    match super::umount::detach_lazily(mountpoint) {
        Ok(()) => log::warn!(
            "the session ended with {} still mounted: detached it",
            mountpoint.display()
        ),
        Err(e) => log::error!(
            "the session ended with {} still mounted and detaching it failed: {e}",
            mountpoint.display()
        ),
    }
}

/// Mounting opens `/dev/fuse` as the calling user (fusermount3 does so too, with its own rights
/// dropped): say what is wrong with it, rather than the mount point's bare "Permission denied".
fn check_fuse_device() -> Result<()> {
    const DEV: &str = "/dev/fuse";
    match std::fs::OpenOptions::new().read(true).write(true).open(DEV) {
        Ok(_) => Ok(()),
        Err(e) => {
            let fix = match e.kind() {
                std::io::ErrorKind::NotFound => "load the fuse module (modprobe fuse)",
                std::io::ErrorKind::PermissionDenied => {
                    "FUSE mounts need it readable and writable by this user (its usual mode is \
                     0666: as root, chmod 0666 /dev/fuse)"
                }
                _ => "FUSE mounts need it",
            };
            Err(Error::new(DEV, e).hint(fix))
        }
    }
}

fn io_uring_refused(req: &MountRequest, why: &str) -> Error {
    Error::new(
        &req.mountpoint,
        Problem::Refused(format!(
            "--io-uring on: {why} (--io-uring off or auto uses /dev/fuse)"
        )),
    )
}

/// The mountpoint as the kernel knows it (absolute), for unmounting from a signal.
fn record_mountpoint(req: &MountRequest) -> std::path::PathBuf {
    std::fs::canonicalize(&req.mountpoint).unwrap_or_else(|_| req.mountpoint.clone())
}

/// Unmount after a signal. A busy mount (the guest file system still loop-mounted, a file open) is
/// detached lazily: it disappears from the tree now, and the session ends (with a final flush) once
/// its last user lets go, exactly like `umount -l`.
fn detach(mountpoint: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: c is a valid C string.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    // Busy, or not root (the setuid helper may unmount for the owner).
    super::umount::detach_lazily(mountpoint)
}

/// A read-only file per internal snapshot of the top layer, as (name, id, device); one that cannot
/// be read is left out.
fn snapshot_views(disk: &Disk) -> Vec<(String, String, Arc<dyn BlockDevice>)> {
    let chain = disk.shared_chain();
    let Layer::Qcow2(image) = chain.top() else {
        return Vec::new();
    };
    image
        .snapshots()
        .iter()
        .filter_map(|s| match SnapshotView::new(chain.clone(), s) {
            Ok(view) => {
                let name = if s.name.is_empty() {
                    s.id.clone()
                } else {
                    s.name.clone()
                };
                Some((name, s.id.clone(), Arc::new(view) as Arc<dyn BlockDevice>))
            }
            Err(e) => {
                log::warn!("snapshot '{}' is not shown: {e}", s.name);
                None
            }
        })
        .collect()
}

fn spawn_idle_flusher(
    disk: Arc<Disk>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    publish_dirty: impl Fn(u64) + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("qcowfs-writer".into())
        .spawn(move || {
            // After a failure (say the host disk is full) wait longer before trying again.
            let mut retry_at: Option<std::time::Instant> = None;
            let mut published: Option<(u64, std::time::Instant)> = None;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Woken at once when writers pile up dirty data, so a write-back overlaps their
                // work.
                disk.wait_for_dirty_data(Duration::from_millis(100));
                let dirty = disk.dirty_bytes();
                let due = published.is_none_or(|(was, at)| {
                    was != dirty && (dirty == 0 || at.elapsed() >= DIRTY_PUBLISH_EVERY)
                });
                if due {
                    publish_dirty(dirty);
                    published = Some((dirty, std::time::Instant::now()));
                }
                if retry_at.is_some_and(|t| std::time::Instant::now() < t) {
                    continue;
                }
                retry_at = None;
                if let Err(e) = disk.flush_if_idle(IDLE_FLUSH) {
                    log::error!("background flush failed (will retry in 5 s): {e}");
                    retry_at = Some(std::time::Instant::now() + Duration::from_secs(5));
                }
            }
        })
}

/// The daemon keeps no terminal: stdin, stdout and stderr go to /dev/null (logs go to syslog).
fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        let fd = null.into_raw_fd();
        for target in 0..3 {
            // SAFETY: fd is a valid open descriptor; dup2 onto the standard descriptors is sound.
            unsafe { libc::dup2(fd, target) };
        }
        if fd > 2 {
            // SAFETY: fd is ours and no longer needed.
            unsafe { libc::close(fd) };
        }
    }
}
