//! Running qcowfs: the binary, `info --json`, `require_fuse`, and the `Mount` guard that never
//! leaves a FUSE mount behind; plus the CLI's error contract.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::run::{describe_status, run_with, Run, COMMAND_TIMEOUT};

/// The qcowfs binary cargo built for this test run.
pub fn qcowfs_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_qcowfs"))
}

/// Runs `qcowfs ARGS` from `/` (so nothing depends on the test's working directory), under the
/// default timeout; does not check the status.
pub fn qcowfs<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    qcowfs_with(args, None, Path::new("/"))
}

/// `qcowfs ARGS` with stdin bytes and a working directory.
pub fn qcowfs_with<I, S>(args: I, stdin: Option<&[u8]>, cwd: &Path) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    qcowfs_with_env(args, stdin, cwd, &[])
}

/// `qcowfs ARGS` with stdin bytes, a working directory and extra environment variables.
pub fn qcowfs_with_env<I, S>(
    args: I,
    stdin: Option<&[u8]>,
    cwd: &Path,
    env: &[(&str, &OsStr)],
) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_with(
        Command::new(qcowfs_bin())
            .args(args)
            .current_dir(cwd)
            .env("RUST_BACKTRACE", "0")
            .envs(env.iter().copied()),
        stdin,
        COMMAND_TIMEOUT,
    )
}

/// `qcowfs info --json [ARGS] IMAGE`, which must succeed, parsed.
pub fn qcowfs_info_json(image: &Path, extra: &[&OsStr]) -> serde_json::Value {
    let mut args: Vec<OsString> = vec!["info".into(), "--json".into()];
    args.extend(extra.iter().map(|s| s.to_os_string()));
    args.push(image.into());
    let r = qcowfs(&args);
    r.assert_success();
    serde_json::from_slice(&r.stdout).unwrap_or_else(|e| {
        panic!(
            "qcowfs info --json output does not parse: {e}\n{}",
            r.stdout_str()
        )
    })
}

/// Fails the test, loudly, when FUSE is not available: FUSE tests must never pass by not running.
pub fn require_fuse() {
    if !Path::new("/dev/fuse").exists() {
        panic!(
            "\n\n*** /dev/fuse is missing: this test mounts qcowfs for real and cannot run. ***\n\
             *** Load the fuse module (modprobe fuse) or run the container with --device /dev/fuse \
             --cap-add SYS_ADMIN. This is a failure, not a skip. ***\n"
        );
    }
}

/// Whether `path` is a mount point now (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    !mounted_devices(path).is_empty()
}

/// The devices ("major:minor", as mountinfo gives them) mounted at `path`, read from mountinfo
/// (no call into the mount, which may hang).
fn mounted_devices(path: &Path) -> Vec<String> {
    let target = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let at = unescape_mountinfo(fields.get(4)?);
            (Path::new(&at) == target).then(|| fields.get(2).map(|d| d.to_string()))?
        })
        .collect()
}

fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            if let Ok(v) = u8::from_str_radix(&code, 8) {
                out.push(v as char);
                continue;
            }
            out.push('\\');
            out.push_str(&code);
        } else {
            out.push(c);
        }
    }
    out
}

/// A live qcowfs mount. Dropping it unmounts with `qcowfs umount`, falling back to aborting the
/// FUSE connection and a lazy `fusermount3 -u -z` / `umount -l`, so no test leaves a mount behind
/// whatever its outcome. The mount point lives in a temp folder owned by the guard.
pub struct Mount {
    mountpoint: PathBuf,
    /// The daemon serving the mount, found by its command line (crash tests kill it).
    daemon: Option<u32>,
    /// Device number of the mounted file system: names its /sys/fs/fuse/connections entry.
    dev: u64,
    live: bool,
    // Dropped after `drop` has unmounted.
    _dir: tempfile::TempDir,
}

impl Mount {
    /// `qcowfs mount OPTIONS IMAGE MNT`, which must succeed.
    pub fn new<S: AsRef<OsStr>>(image: &Path, options: &[S]) -> Mount {
        Self::with_stdin(image, options, None)
    }

    /// Like [`Mount::new`] with bytes on the mount command's stdin (`--passphrase-file -`).
    pub fn with_stdin<S: AsRef<OsStr>>(image: &Path, options: &[S], stdin: Option<&[u8]>) -> Mount {
        match Self::try_new(image, options, stdin, Path::new("/")) {
            Ok(m) => m,
            Err(r) => panic!(
                "qcowfs mount of {} failed ({}):\n{}\ncommand: {}",
                image.display(),
                describe_status(r.status),
                r.stderr,
                r.command
            ),
        }
    }

    /// Tries a mount from working directory `cwd`; on failure returns what the command printed
    /// (and makes sure nothing stayed mounted).
    pub fn try_new<S: AsRef<OsStr>>(
        image: &Path,
        options: &[S],
        stdin: Option<&[u8]>,
        cwd: &Path,
    ) -> Result<Mount, Run> {
        Self::try_new_with_env(image, options, stdin, cwd, &[]).map(|(m, _)| m)
    }

    /// Like [`Mount::try_new`] with extra environment variables for the mount command (and its
    /// daemon); also returns what the mount command printed.
    pub fn try_new_with_env<S: AsRef<OsStr>>(
        image: &Path,
        options: &[S],
        stdin: Option<&[u8]>,
        cwd: &Path,
        env: &[(&str, &OsStr)],
    ) -> Result<(Mount, Run), Run> {
        let mut args: Vec<OsString> = vec!["mount".into()];
        args.extend(options.iter().map(|o| o.as_ref().to_os_string()));
        args.push(image.into());
        Self::start(args, stdin, cwd, env)
    }

    /// `qcowfs transport-floor --size SIZE OPTIONS MNT` (the benchmark's null disk), which must
    /// succeed.
    pub fn transport_floor(size: &str, options: &[&str]) -> Mount {
        let mut args: Vec<OsString> = vec!["transport-floor".into(), "--size".into(), size.into()];
        args.extend(options.iter().map(OsString::from));
        match Self::start(args, None, Path::new("/"), &[]) {
            Ok((m, _)) => m,
            Err(r) => panic!(
                "qcowfs transport-floor failed ({}):\n{}",
                describe_status(r.status),
                r.stderr
            ),
        }
    }

    /// Runs qcowfs with `args` and a fresh mount point after them.
    fn start(
        mut args: Vec<OsString>,
        stdin: Option<&[u8]>,
        cwd: &Path,
        env: &[(&str, &OsStr)],
    ) -> Result<(Mount, Run), Run> {
        require_fuse();
        let dir = tempfile::Builder::new()
            .prefix("qcowfs-mnt-")
            .tempdir()
            .expect("create mount point folder");
        let mountpoint = dir.path().join("mnt");
        fs::create_dir(&mountpoint).expect("create mount point");
        args.push(mountpoint.clone().into());
        let r = qcowfs_with_env(&args, stdin, cwd, env);
        let mounted = is_mounted(&mountpoint);
        let dev = fs::metadata(&mountpoint).map(|m| m.dev()).unwrap_or(0);
        let daemon = if mounted {
            find_daemon(&mountpoint)
        } else {
            None
        };
        let mut guard = Mount {
            mountpoint,
            daemon,
            dev,
            live: mounted,
            _dir: dir,
        };
        if !r.status.success() {
            if mounted {
                let mp = guard.mountpoint.display().to_string();
                drop(guard);
                panic!(
                    "qcowfs mount failed ({}) but left {mp} mounted:\n{}",
                    describe_status(r.status),
                    r.stderr
                );
            }
            return Err(r);
        }
        if !mounted {
            guard.live = false;
            panic!(
                "qcowfs mount exited 0 but nothing is mounted at {}\nstderr:\n{}",
                guard.mountpoint.display(),
                r.stderr
            );
        }
        Ok((guard, r))
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The pid of the daemon serving this mount, if it could be found in /proc.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon
    }

    /// "daemon pid N alive" / "... gone" / "daemon not found", for failure messages.
    fn daemon_state(&self) -> String {
        match self.daemon {
            Some(pid) if Path::new(&format!("/proc/{pid}")).exists() => {
                format!("daemon pid {pid} still alive")
            }
            Some(pid) => format!("daemon pid {pid} is gone"),
            None => "daemon pid unknown".to_string(),
        }
    }

    /// `MOUNTPOINT/disk`.
    pub fn disk(&self) -> PathBuf {
        self.mountpoint.join("disk")
    }

    /// `qcowfs umount`, which must succeed and leave nothing mounted.
    pub fn umount(mut self) -> Run {
        let r = qcowfs(["umount".as_ref(), self.mountpoint.as_os_str()]);
        if r.status.success() {
            self.live = is_mounted(&self.mountpoint);
            assert!(
                !self.live,
                "qcowfs umount exited 0 but {} is still mounted",
                self.mountpoint.display()
            );
        } else {
            panic!(
                "qcowfs umount failed ({}; {}; {}):\n{}",
                describe_status(r.status),
                self.daemon_state(),
                if is_mounted(&self.mountpoint) {
                    "still mounted"
                } else {
                    "no longer mounted"
                },
                r.stderr
            );
        }
        r
    }

    /// Like [`Mount::umount`], but a refusal because the mount is busy is retried (up to `tries`
    /// times, 100 ms apart): in a multithreaded test another thread's fork may hold a copy of a
    /// descriptor on the mount until its child execs. Returns how many retries it took.
    pub fn umount_retrying_busy(mut self, tries: u32) -> u32 {
        for retry in 0..tries {
            let r = qcowfs(["umount".as_ref(), self.mountpoint.as_os_str()]);
            if r.status.success() {
                self.live = is_mounted(&self.mountpoint);
                assert!(
                    !self.live,
                    "qcowfs umount exited 0 but {} is still mounted",
                    self.mountpoint.display()
                );
                return retry;
            }
            if !r.stderr.contains("the mount is busy") {
                panic!(
                    "qcowfs umount failed ({}; {}):\n{}",
                    describe_status(r.status),
                    self.daemon_state(),
                    r.stderr
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
        self.umount();
        tries
    }

    /// Last resort: abort the FUSE connection (so no request can hang) and detach lazily.
    fn force_unmount(&self) {
        // minor(3) of a Linux dev_t, which names the FUSE connection.
        let minor = (self.dev & 0xff) | ((self.dev >> 12) & 0xffff_ff00);
        let major = ((self.dev >> 8) & 0xfff) | ((self.dev >> 32) & !0xfff);
        let abort = PathBuf::from(format!("/sys/fs/fuse/connections/{minor}/abort"));
        // Only while this mount is still there: once it is gone its connection number may name
        // another test's mount (the tests of one binary mount side by side).
        let ours = mounted_devices(&self.mountpoint).contains(&format!("{major}:{minor}"));
        if self.dev != 0 && ours && abort.exists() {
            let _ = fs::write(&abort, "1");
        }
        let mp = self.mountpoint.as_os_str();
        let bounded = Duration::from_secs(20);
        let _ = run_with(
            Command::new("fusermount3").arg("-u").arg("-z").arg(mp),
            None,
            bounded,
        );
        if is_mounted(&self.mountpoint) {
            let _ = run_with(Command::new("umount").arg("-l").arg(mp), None, bounded);
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if !self.live {
            return;
        }
        // Never panic in drop (it may run during a panic): report and fall back instead.
        let umount = Command::new(qcowfs_bin())
            .arg("umount")
            .arg(&self.mountpoint)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let ok = match umount {
            Ok(mut child) => {
                let start = Instant::now();
                loop {
                    match child.try_wait() {
                        Ok(Some(status)) => break status.success(),
                        Ok(None) if start.elapsed() < COMMAND_TIMEOUT => {
                            thread::sleep(Duration::from_millis(20))
                        }
                        _ => {
                            let _ = child.kill();
                            let _ = child.wait();
                            break false;
                        }
                    }
                }
            }
            Err(_) => false,
        };
        if !ok || is_mounted(&self.mountpoint) {
            eprintln!(
                "warning: qcowfs umount {} failed; forcing the unmount",
                self.mountpoint.display()
            );
            self.force_unmount();
        }
        self.live = false;
    }
}

/// The pid of a live `qcowfs mount ... MOUNTPOINT` process (the daemon; the command that
/// started it has exited), found by scanning /proc command lines.
fn find_daemon(mountpoint: &Path) -> Option<u32> {
    let bin = qcowfs_bin();
    let want = mountpoint.as_os_str().as_encoded_bytes();
    let bin_name = bin.file_name()?.as_encoded_bytes();
    fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = fs::read(entry.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_qcowfs = args.first().is_some_and(|a0| a0.ends_with(bin_name));
        let serves = args.contains(&want) && args.contains(&&b"mount"[..]);
        (is_qcowfs && serves).then_some(pid)
    })
}

/// Runs `qcowfs mount OPTIONS IMAGE MNT` expecting it to fail; returns what it printed. A mount
/// that succeeds fails the test (after unmounting).
pub fn mount_failure<S: AsRef<OsStr>>(image: &Path, options: &[S], stdin: Option<&[u8]>) -> Run {
    match Mount::try_new(image, options, stdin, Path::new("/")) {
        Ok(m) => {
            let mp = m.mountpoint().display().to_string();
            drop(m);
            panic!(
                "qcowfs mount of {} succeeded at {mp}, expected a refusal",
                image.display()
            );
        }
        Err(r) => r,
    }
}

/// Asserts the error contract of the CLI: non-zero exit, no panic, exactly one stderr line,
/// naming one of `names` (file names or paths), within `limit`.
pub fn assert_one_line_error(r: &Run, names: &[&str], limit: Duration) {
    assert!(
        !r.status.success(),
        "expected failure, got success: {}\nstdout:\n{}\nstderr:\n{}",
        r.command,
        r.stdout_str(),
        r.stderr
    );
    assert!(
        r.status.code().is_some(),
        "expected an exit code, the process was {}: {}\nstderr:\n{}",
        describe_status(r.status),
        r.command,
        r.stderr
    );
    assert!(
        !r.stderr.contains("panicked") && !r.stderr.contains("RUST_BACKTRACE"),
        "qcowfs panicked: {}\n{}",
        r.command,
        r.stderr
    );
    let lines: Vec<&str> = r.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected exactly one stderr line, got {}: {}\n{}",
        lines.len(),
        r.command,
        r.stderr
    );
    assert!(
        names.iter().any(|n| lines[0].contains(n)),
        "the error line does not name any of {names:?}: {:?}",
        lines[0]
    );
    assert!(
        r.elapsed < limit,
        "took {:?} (limit {limit:?}): {}",
        r.elapsed,
        r.command
    );
}

/// File name of `path` as a str (for "names the file" assertions).
pub fn file_name(path: &Path) -> &str {
    path.file_name()
        .and_then(OsStr::to_str)
        .expect("UTF-8 file name")
}

/// A temp folder for one test's images.
pub fn workdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("qcowfs-test-")
        .tempdir()
        .expect("create temp folder")
}
