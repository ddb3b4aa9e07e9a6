//! Real non-root users for tests that play a victim and an attacker on one host: created with
//! `useradd` when missing (the suite runs as root), and commands run as them with `setpriv`.
//! FUSE mounts as a normal user need `/dev/fuse` open to them; `FuseForAll` makes it so for the
//! test's duration (the usual mode on a desktop system is 0666), `FuseRootOnly` makes sure it is
//! not (0600), and both restore the mode after, one test at a time across the whole suite.
//! The program a user runs is a copy in a root-owned, world-readable folder of /tmp
//! ([`reachable`]): the checkout may live where only root can enter (under /root, mode 700).

use std::ffi::OsStr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use super::run::{run_with, Run, COMMAND_TIMEOUT};

/// A system user of the test suite.
#[derive(Debug, Clone)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

fn id_of(name: &str, flag: &str) -> Option<u32> {
    let out = Command::new("id").arg(flag).arg(name).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
        .flatten()
}

/// The user `name`, created (no home, no login shell) if missing. Fails the test unless root.
pub fn test_user(name: &str) -> User {
    static CREATE: Mutex<()> = Mutex::new(());
    let _one_at_a_time = CREATE.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test plays two users on the host and must run as root (scripts/test.sh does)"
    );
    if id_of(name, "-u").is_none() {
        run_with(
            Command::new("useradd")
                .args([
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                ])
                .arg(name),
            None,
            COMMAND_TIMEOUT,
        )
        .assert_success();
    }
    User {
        uid: id_of(name, "-u").expect("uid of the new user"),
        gid: id_of(name, "-g").expect("gid of the new user"),
    }
}

impl User {
    /// `PROGRAM ARGS` as this user (no supplementary groups, no XDG_RUNTIME_DIR), bounded in time.
    pub fn run<I, S>(&self, program: &Path, args: I) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.run_input(program, args, None)
    }

    /// [`User::run`] with `stdin` as the program's input (None: no input).
    pub fn run_input<I, S>(&self, program: &Path, args: I, stdin: Option<&[u8]>) -> Run
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--clear-groups")
            .arg("env")
            .arg("-u")
            .arg("XDG_RUNTIME_DIR")
            .arg(reachable(program))
            .args(args)
            .current_dir("/");
        run_with(&mut cmd, stdin, COMMAND_TIMEOUT)
    }

    /// Give `path` (and everything under it) to this user.
    pub fn own(&self, path: &Path) {
        run_with(
            Command::new("chown")
                .arg("-R")
                .arg(format!("{}:{}", self.uid, self.gid))
                .arg(path),
            None,
            COMMAND_TIMEOUT,
        )
        .assert_success();
    }
}

/// `program` where any user can run it: a copy (mode 0755) in a root-owned folder of the temp
/// dir (mode 0755), named after the program's path, size and mtime, so one copy serves every
/// test process of one build. A folder of that name that root does not own, or that others
/// may write, fails the test rather than be trusted.
pub fn reachable(program: &Path) -> PathBuf {
    static MADE: Mutex<()> = Mutex::new(());
    let _one_at_a_time = MADE.lock().unwrap_or_else(|e| e.into_inner());
    let meta = std::fs::metadata(program).unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::hash::Hash::hash(
        &(program, meta.len(), meta.mtime(), meta.mtime_nsec()),
        &mut h,
    );
    let key = std::hash::Hasher::finish(&h);
    let dir = std::env::temp_dir().join(format!("qcowfs-tests-bin-{key:016x}"));
    let name = program.file_name().expect("a program file name");
    let copy = dir.join(name);
    match std::fs::create_dir(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            panic!("mkdir {}: {e}", dir.display())
        }
        _ => {}
    }
    let m = std::fs::symlink_metadata(&dir).expect("the program folder");
    assert!(
        m.is_dir() && m.uid() == 0 && m.mode() & 0o022 == 0,
        "{} exists but is not a root-owned folder only root may write",
        dir.display()
    );
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
        .expect("chmod the program folder");
    if !copy.exists() {
        let partial = dir.join(format!(
            ".{}.{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        std::fs::copy(program, &partial)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", program.display(), partial.display()));
        std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the program copy");
        std::fs::rename(&partial, &copy).expect("rename the program copy");
    }
    copy
}

/// `/dev/fuse` readable and writable by everyone while it lives (the usual mode on a desktop
/// system: non-root mounts work); the old mode comes back on drop.
pub struct FuseForAll {
    _mode: FuseMode,
}

impl FuseForAll {
    pub fn new() -> FuseForAll {
        FuseForAll {
            _mode: FuseMode::hold(0o666),
        }
    }
}

/// `/dev/fuse` readable and writable by root only (0600, as in a container by default) while it
/// lives: a non-root mount cannot open it. The old mode comes back on drop.
pub struct FuseRootOnly {
    _mode: FuseMode,
}

impl FuseRootOnly {
    pub fn new() -> FuseRootOnly {
        FuseRootOnly {
            _mode: FuseMode::hold(0o600),
        }
    }
}

/// Where test processes of this suite take turns with `/dev/fuse`'s mode.
const FUSE_MODE_LOCK: &str = "/run/qcowfs-tests-dev-fuse-mode.lock";

/// How long a test waits for another process of the suite to give `/dev/fuse`'s mode back.
const FUSE_MODE_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// `/dev/fuse` at a mode a test relies on, and the right to it: tests holding one run one at a
/// time, in this process (a mutex: the test threads of one binary) and across the suite's test
/// binaries (an exclusive `flock` on [`FUSE_MODE_LOCK`]), so none changes or restores the mode
/// under another. Root's own mounts do not care about the mode (root may open it anyway).
struct FuseMode {
    old: u32,
    _suite: std::fs::File,
    _process: std::sync::MutexGuard<'static, ()>,
}

impl FuseMode {
    fn hold(mode: u32) -> FuseMode {
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::io::AsRawFd;
        static HELD: Mutex<()> = Mutex::new(());
        let process = HELD.lock().unwrap_or_else(|e| e.into_inner());
        let suite = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(FUSE_MODE_LOCK)
            .unwrap_or_else(|e| panic!("open {FUSE_MODE_LOCK}: {e}"));
        let start = std::time::Instant::now();
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        while unsafe { libc::flock(suite.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            assert!(
                start.elapsed() < FUSE_MODE_WAIT,
                "another test process held {FUSE_MODE_LOCK} (the right to /dev/fuse's mode) \
                 for {FUSE_MODE_WAIT:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let dev = Path::new("/dev/fuse");
        let old = std::fs::metadata(dev)
            .expect("/dev/fuse")
            .permissions()
            .mode()
            & 0o7777;
        std::fs::set_permissions(dev, std::fs::Permissions::from_mode(mode))
            .expect("chmod /dev/fuse");
        FuseMode {
            old,
            _suite: suite,
            _process: process,
        }
    }
}

impl Drop for FuseMode {
    // Runs before the fields drop: the mode is back before the next holder may take its turn.
    fn drop(&mut self) {
        let _ = std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(self.old));
    }
}
