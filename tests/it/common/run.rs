//! Bounded external commands: every command a test runs has a timeout, its own session (no
//! controlling tty, so nothing can prompt), stdin from `/dev/null` unless bytes are given, and
//! output captured through files (a daemon that inherits them cannot block the test).

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// How long any external command may run before the test kills it and fails.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// What a finished external command left behind.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
    pub elapsed: Duration,
    /// The command line, for messages.
    pub command: String,
}

impl Run {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Panics with the command's stderr unless it exited 0.
    pub fn assert_success(&self) -> &Self {
        assert!(
            self.status.success(),
            "command failed ({}): {}\n--- stderr ---\n{}--- stdout ---\n{}",
            describe_status(self.status),
            self.command,
            self.stderr,
            self.stdout_str()
        );
        self
    }
}

/// "exit code 3" or "killed by signal 11".
pub fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => format!("{status}"),
    }
}

/// Runs `cmd` to completion within `timeout`, with stdin from `stdin` (or `/dev/null`), stdout and
/// stderr captured through anonymous files (so a daemon that inherits them cannot block us), and in
/// a new session (no controlling terminal). On timeout the whole process group is killed and the
/// test fails. A program missing from PATH fails the test with a hint.
pub fn run_with(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Run {
    let command = format!("{cmd:?}");
    // Captured by the test harness and shown only when the test fails: the steps to reproduce.
    eprintln!("$ {command}");
    let mut out = tempfile::tempfile().expect("create stdout capture file");
    let mut err = tempfile::tempfile().expect("create stderr capture file");
    cmd.stdout(Stdio::from(out.try_clone().expect("dup stdout capture")));
    cmd.stderr(Stdio::from(err.try_clone().expect("dup stderr capture")));
    match stdin {
        None => {
            cmd.stdin(Stdio::null());
        }
        Some(bytes) => {
            let mut input = tempfile::tempfile().expect("create stdin file");
            input.write_all(bytes).expect("write stdin file");
            input.seek(SeekFrom::Start(0)).expect("rewind stdin file");
            cmd.stdin(Stdio::from(input));
        }
    }
    // SAFETY: setsid() is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "cannot run {command}: program not found ({e}). This suite requires QEMU's tools \
             (Debian/Ubuntu: apt-get install qemu-utils) and FUSE (fuse3); it never skips."
        ),
        Err(e) => panic!("cannot run {command}: {e}"),
    };
    let pid = child.id() as libc::pid_t;
    let mut pause = Duration::from_millis(2);
    let status = loop {
        match child.try_wait().expect("wait for child") {
            Some(status) => break status,
            None if start.elapsed() > timeout => {
                // SAFETY: plain kill(2) of the process group this child leads (setsid above).
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                }
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "command timed out after {timeout:?} and was killed: {command}\n--- stderr so far ---\n{}",
                    read_capture(&mut err)
                );
            }
            None => {
                thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
        }
    };
    let elapsed = start.elapsed();
    let stderr = read_capture(&mut err);
    let mut stdout = Vec::new();
    out.seek(SeekFrom::Start(0)).expect("rewind stdout capture");
    out.read_to_end(&mut stdout).expect("read stdout capture");
    Run {
        status,
        stdout,
        stderr,
        elapsed,
        command,
    }
}

fn read_capture(file: &mut File) -> String {
    let mut bytes = Vec::new();
    let _ = file.seek(SeekFrom::Start(0));
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Runs a program with arguments under [`COMMAND_TIMEOUT`]; does not check its status.
pub fn run<I, S>(program: &str, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_with(Command::new(program).args(args), None, COMMAND_TIMEOUT)
}

/// Runs a program and panics with its stderr unless it exits 0.
pub fn run_ok<I, S>(program: &str, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let r = run(program, args);
    r.assert_success();
    r
}

/// `qemu-img ARGS`, which must succeed.
pub fn qemu_img<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_ok("qemu-img", args)
}

/// `qemu-io ARGS`, which must succeed.
pub fn qemu_io<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_ok("qemu-io", args)
}

/// Runs `f` on another thread and fails the test if it does not finish within `timeout` (a FUSE
/// read that hangs must fail the test, not hang the suite).
pub fn within<T: Send + 'static>(
    timeout: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(timeout) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: no answer within {timeout:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: the worker thread panicked"),
    }
}
