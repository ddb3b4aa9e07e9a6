//! Real non-root users for tests that play a victim and an attacker on one host: created with
//! `useradd` when missing (the suite runs as root), and commands run as them with `setpriv`.
//! FUSE mounts as a normal user need `/dev/fuse` open to them; `FuseForAll` makes it so for the
//! test's duration (the usual mode on a desktop system is 0666) and restores the mode after.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;

use super::run::{run_with, Run, COMMAND_TIMEOUT};

/// A system user of the test suite.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
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
        name: name.to_string(),
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
        let mut cmd = Command::new("setpriv");
        cmd.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid))
            .arg("--clear-groups")
            .arg("env")
            .arg("-u")
            .arg("XDG_RUNTIME_DIR")
            .arg(program)
            .args(args)
            .current_dir("/");
        run_with(&mut cmd, None, COMMAND_TIMEOUT)
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

/// `/dev/fuse` readable and writable by everyone while it lives; the old mode comes back on drop.
/// Tests holding one run one at a time, so none restores the mode under another.
pub struct FuseForAll {
    mode: u32,
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
}

impl FuseForAll {
    pub fn new() -> FuseForAll {
        static HELD: Mutex<()> = Mutex::new(());
        let guard = HELD.lock().unwrap_or_else(|e| e.into_inner());
        let dev = Path::new("/dev/fuse");
        let mode = std::fs::metadata(dev)
            .expect("/dev/fuse")
            .permissions()
            .mode()
            & 0o7777;
        std::fs::set_permissions(dev, std::fs::Permissions::from_mode(0o666))
            .expect("chmod /dev/fuse");
        FuseForAll {
            mode,
            _one_at_a_time: guard,
        }
    }
}

impl Drop for FuseForAll {
    fn drop(&mut self) {
        let _ = std::fs::set_permissions("/dev/fuse", std::fs::Permissions::from_mode(self.mode));
    }
}
