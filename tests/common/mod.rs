//! Helpers shared by the integration tests: bounded external commands, qemu image builders, the
//! `qemu-img convert -O raw` oracle, byte comparison that names the first differing offset, and a
//! `Mount` guard that never leaves a FUSE mount behind.
//!
//! QEMU is the oracle and is required: a missing `qemu-img` or `qemu-io` fails the test, it never
//! skips it. Every external command runs with a timeout, in its own session (no controlling tty,
//! so nothing can prompt), with stdin from `/dev/null` unless a test gives bytes.

#![allow(dead_code)]

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// How long any external command may run before the test kills it and fails.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// How long reading a whole `disk` through FUSE may take before the test fails instead of hanging.
pub const READ_TIMEOUT: Duration = Duration::from_secs(120);

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;
pub const TIB: u64 = 1024 * GIB;

/// qcow2 header extension type of the backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

// ---------------------------------------------------------------------------------------------
// Bounded command runner
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Deterministic data
// ---------------------------------------------------------------------------------------------

/// splitmix64: small, seeded, good enough to make test data that no two offsets share.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5851_f42d_4c95_7f2d)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// `len` incompressible bytes from `seed`.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

/// `len` bytes that compress to roughly a third (words from a small vocabulary, runs of one byte,
/// some noise), so compressed clusters have varied, unaligned lengths.
pub fn compressible_bytes(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&[u8]; 12] = [
        b"qcow2 ",
        b"cluster ",
        b"backing ",
        b"refcount ",
        b"\n",
        b"L2 ",
        b"zstd ",
        b"zlib ",
        b"snapshot ",
        b"guest ",
        b"sector ",
        b"nova ",
    ];
    let mut rng = Rng::new(seed);
    let mut v = Vec::with_capacity(len + 64);
    while v.len() < len {
        match rng.below(10) {
            0 => {
                let n = rng.range(1, 40) as usize;
                let b = rng.next_u64() as u8;
                v.resize(v.len() + n, b);
            }
            1 => {
                let mut noise = [0u8; 8];
                rng.fill(&mut noise);
                v.extend_from_slice(&noise);
            }
            _ => v.extend_from_slice(WORDS[rng.below(WORDS.len() as u64) as usize]),
        }
    }
    v.truncate(len);
    v
}

// ---------------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------------

/// Image format as qemu names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// An image file made by qemu tools, with what qemu needs to open it: the passphrase of each
/// layer of its chain (this image first), `None` for a plain layer.
#[derive(Clone, Debug)]
pub struct Image {
    pub path: PathBuf,
    pub format: Format,
    pub size: u64,
    pub secrets: Vec<Option<String>>,
}

/// Escapes a value for qemu's comma-separated option syntax.
fn qemu_escape(s: &str) -> String {
    s.replace(',', ",,")
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

impl Image {
    /// An existing image with a plain chain.
    pub fn plain(path: impl Into<PathBuf>, format: Format, size: u64) -> Self {
        Image {
            path: path.into(),
            format,
            size,
            secrets: vec![None],
        }
    }

    pub fn encrypted(&self) -> bool {
        self.secrets.first().is_some_and(Option::is_some)
    }

    /// How qemu tools open this image: (options before the command's own flags, the image
    /// argument). Plain chains use `-f FMT PATH`; any secret switches to `--object secret` +
    /// `--image-opts` with `encrypt.key-secret` for this layer and `backing.` prefixes below.
    pub fn qemu_open_args(&self) -> (Vec<String>, String) {
        if self.secrets.iter().all(Option::is_none) {
            return (
                vec!["-f".into(), self.format.as_str().into()],
                path_str(&self.path).to_string(),
            );
        }
        let mut opts = vec![];
        let mut spec = format!(
            "driver={},file.filename={}",
            self.format.as_str(),
            qemu_escape(path_str(&self.path))
        );
        for (depth, secret) in self.secrets.iter().enumerate() {
            if let Some(pass) = secret {
                opts.push("--object".to_string());
                opts.push(format!("secret,id=s{depth},data={}", qemu_escape(pass)));
                spec.push_str(&format!(
                    ",{}encrypt.key-secret=s{depth}",
                    "backing.".repeat(depth)
                ));
            }
        }
        opts.push("--image-opts".into());
        (opts, spec)
    }

    /// Runs `qemu-io` on this image with the given `-c` commands (one process for all).
    pub fn qemu_io(&self, commands: &[String]) -> Run {
        let (mut args, target) = self.qemu_open_args();
        for c in commands {
            args.push("-c".into());
            args.push(c.clone());
        }
        args.push(target);
        let r = qemu_io(&args);
        // qemu-io reports some failed commands on stdout/stderr with status 0 in old versions.
        let text = format!("{}{}", r.stdout_str(), r.stderr);
        assert!(
            !text.contains("failed:") && !text.contains("Pattern verification failed"),
            "qemu-io reported an error: {}\n{text}",
            r.command
        );
        r
    }

    /// `write -P BYTE OFF LEN`: a constant pattern at any (unaligned) offset.
    pub fn write_pattern(&self, off: u64, len: u64, byte: u8) -> &Self {
        self.qemu_io(&[format!("write -P 0x{byte:02x} {off} {len}")]);
        self
    }

    /// Writes `data` at `off` through qemu-io (`write -s FILE`), so any bytes can be placed.
    pub fn write_bytes(&self, off: u64, data: &[u8]) -> &Self {
        self.write_bytes_with(off, data, "")
    }

    /// `write -c -s FILE`: compressed write; `off` and `data.len()` must be cluster aligned
    /// (the last cluster of the disk may be short). Unencrypted images only.
    pub fn write_compressed(&self, off: u64, data: &[u8]) -> &Self {
        self.write_bytes_with(off, data, "-c ")
    }

    fn write_bytes_with(&self, off: u64, data: &[u8], flags: &str) -> &Self {
        let mut src = tempfile::NamedTempFile::new().expect("temp data file");
        src.write_all(data).expect("write temp data file");
        src.flush().expect("flush temp data file");
        self.qemu_io(&[format!(
            "write {flags}-s {} {off} {}",
            path_str(src.path()),
            data.len()
        )]);
        self
    }

    /// Seeded test data of `len` bytes for this image: uniform random bytes for a plain image;
    /// guest-like data (text, runs, some noise; every offset still distinct) for an encrypted one,
    /// because qcowfs refuses a legacy AES passphrase when every sampled cluster decrypts to
    /// noise, and uniform random plaintext is indistinguishable from that.
    pub fn test_data(&self, len: usize, seed: u64) -> Vec<u8> {
        if self.encrypted() {
            compressible_bytes(len, seed)
        } else {
            random_bytes(len, seed)
        }
    }

    /// Seeded test data (see [`Image::test_data`]) at `off`; returns it.
    pub fn write_random(&self, off: u64, len: usize, seed: u64) -> Vec<u8> {
        let data = self.test_data(len, seed);
        self.write_bytes(off, &data);
        data
    }

    /// `count` writes of test data (see [`Image::test_data`]) at random unaligned offsets and
    /// lengths (up to `max_len`) within the first `span` bytes, in one qemu-io run.
    pub fn scatter_random(&self, span: u64, count: usize, max_len: u64, seed: u64) -> &Self {
        let mut rng = Rng::new(seed);
        let mut files = Vec::new();
        let mut cmds = Vec::new();
        for _ in 0..count {
            let len = rng.range(1, max_len.min(span));
            let off = rng.below(span - len + 1);
            let mut f = tempfile::NamedTempFile::new().expect("temp data file");
            let data = self.test_data(len as usize, rng.next_u64());
            f.write_all(&data).expect("write temp data file");
            cmds.push(format!("write -s {} {off} {len}", path_str(f.path())));
            files.push(f);
        }
        self.qemu_io(&cmds);
        self
    }

    /// `write -z OFF LEN`: zeroes, kept allocated where qemu can (a zero cluster that keeps its
    /// host offset when it was allocated before).
    pub fn write_zeroes(&self, off: u64, len: u64) -> &Self {
        self.qemu_io(&[format!("write -z {off} {len}")]);
        self
    }

    /// `write -z -u OFF LEN`: zeroes, unmapping (a zero cluster without a host offset).
    pub fn write_zeroes_unmap(&self, off: u64, len: u64) -> &Self {
        self.qemu_io(&[format!("write -z -u {off} {len}")]);
        self
    }

    /// `qemu-img snapshot -c NAME`: an internal snapshot of the current state.
    pub fn snapshot(&self, name: &str) -> &Self {
        let (mut args, target) = self.qemu_open_args();
        args.insert(0, "snapshot".into());
        args.push("-c".into());
        args.push(name.into());
        args.push(target);
        qemu_img(&args);
        self
    }

    /// `qemu-img rebase -u -b NAME -F FMT`: rewrites the backing name without touching data.
    pub fn rebase_unsafe(&self, backing_name: &str, backing_format: Format) -> &Self {
        qemu_img([
            "rebase",
            "-u",
            "-b",
            backing_name,
            "-F",
            backing_format.as_str(),
            path_str(&self.path),
        ]);
        self
    }

    /// `qemu-img convert -O raw` of the whole chain into `dest`: the read oracle.
    pub fn convert_raw(&self, dest: &Path) {
        let (mut args, target) = self.qemu_open_args();
        args.insert(0, "convert".into());
        args.push(target);
        args.push("-O".into());
        args.push("raw".into());
        args.push(path_str(dest).into());
        qemu_img(&args);
    }

    /// The guest view according to qemu, as bytes.
    pub fn raw(&self) -> Vec<u8> {
        let dest = tempfile::NamedTempFile::new().expect("temp raw file");
        self.convert_raw(dest.path());
        let bytes = fs::read(dest.path()).expect("read converted raw image");
        assert_eq!(
            bytes.len() as u64,
            self.size,
            "qemu-img convert gave an unexpected size for {}",
            self.path.display()
        );
        bytes
    }

    /// `qemu-img check` must report no errors and no leaks.
    pub fn check(&self) -> Run {
        let (mut args, target) = self.qemu_open_args();
        args.insert(0, "check".into());
        args.push(target);
        qemu_img(&args)
    }

    /// `qemu-img compare` with another image (exit 0: identical guest contents).
    pub fn compare(&self, other: &Image) -> Run {
        assert!(
            !self.encrypted() && !other.encrypted(),
            "compare through convert_raw for encrypted images"
        );
        qemu_img([
            "compare",
            "-f",
            self.format.as_str(),
            "-F",
            other.format.as_str(),
            path_str(&self.path),
            path_str(&other.path),
        ])
    }

    /// `qemu-img info --output=json` (without --backing-chain), parsed.
    pub fn qemu_info(&self) -> serde_json::Value {
        let r = qemu_img(["info", "--output=json", "-U", path_str(&self.path)]);
        serde_json::from_slice(&r.stdout).expect("qemu-img info --output=json parses")
    }
}

/// The guest view of `image` according to `qemu-img convert -O raw` (the read oracle).
pub fn raw_of(image: &Image) -> Vec<u8> {
    image.raw()
}

/// `qemu-img map --output=json` of `image` (its whole chain), parsed: one object per extent with
/// `start`, `length`, `depth`, `zero`, `data`, `compressed` and, when mapped, `offset`.
pub fn qemu_map(image: &Image) -> Vec<serde_json::Value> {
    let (mut args, target) = image.qemu_open_args();
    args.insert(0, "map".into());
    args.push("--output=json".into());
    args.push(target);
    let r = qemu_img(&args);
    serde_json::from_slice(&r.stdout).expect("qemu-img map --output=json parses")
}

/// Whether some extent of `image`'s own layer (depth 0) has `key` true in `qemu-img map`, e.g.
/// "compressed" or "zero": proof that a test made the kind of cluster it means to read.
pub fn has_extent(image: &Image, key: &str) -> bool {
    qemu_map(image)
        .iter()
        .any(|e| e["depth"] == 0 && e[key] == true)
}

/// A raw image of `size` bytes (sparse, zeros) made by `qemu-img create -f raw`.
pub fn create_raw(path: impl Into<PathBuf>, size: u64) -> Image {
    let path = path.into();
    qemu_img([
        "create",
        "-q",
        "-f",
        "raw",
        path_str(&path),
        &size.to_string(),
    ]);
    Image::plain(path, Format::Raw, size)
}

/// A raw image holding exactly `bytes` (any length, not even sector aligned).
pub fn raw_from_bytes(path: impl Into<PathBuf>, bytes: &[u8]) -> Image {
    let path = path.into();
    fs::write(&path, bytes).expect("write raw image");
    Image::plain(path, Format::Raw, bytes.len() as u64)
}

/// Starts a qcow2 image description; defaults are qemu's (v3, 64 KiB clusters, 16-bit
/// refcounts, zlib, no encryption, no backing file).
pub fn qcow2(path: impl Into<PathBuf>, size: u64) -> Qcow2Builder {
    Qcow2Builder {
        path: path.into(),
        size,
        v2: false,
        cluster_size: None,
        refcount_bits: None,
        extended_l2: false,
        compression_type: None,
        aes: None,
        backing: None,
        options: vec![],
    }
}

/// Options for `qemu-img create -f qcow2`, built up by name.
#[derive(Clone, Debug)]
pub struct Qcow2Builder {
    path: PathBuf,
    size: u64,
    v2: bool,
    cluster_size: Option<u64>,
    refcount_bits: Option<u32>,
    extended_l2: bool,
    compression_type: Option<&'static str>,
    aes: Option<String>,
    /// Backing name as written in the header, its format, the secrets of its chain.
    backing: Option<(String, Format, Vec<Option<String>>)>,
    options: Vec<String>,
}

impl Qcow2Builder {
    /// qcow2 version 2 (`compat=0.10`).
    pub fn v2(mut self) -> Self {
        self.v2 = true;
        self
    }

    pub fn cluster_size(mut self, bytes: u64) -> Self {
        self.cluster_size = Some(bytes);
        self
    }

    pub fn refcount_bits(mut self, bits: u32) -> Self {
        self.refcount_bits = Some(bits);
        self
    }

    /// `extended_l2=on` (32 subclusters per cluster; needs clusters of at least 16 KiB).
    pub fn extended_l2(mut self) -> Self {
        self.extended_l2 = true;
        self
    }

    /// `compression_type=zlib|zstd`.
    pub fn compression(mut self, kind: &'static str) -> Self {
        self.compression_type = Some(kind);
        self
    }

    /// Legacy QEMU AES (`encrypt.format=aes`, crypt_method 1) with this passphrase.
    pub fn aes(mut self, passphrase: &str) -> Self {
        self.aes = Some(passphrase.to_string());
        self
    }

    /// Backed by `base`, named by its absolute path.
    pub fn backing(self, base: &Image) -> Self {
        let name = path_str(&base.path).to_string();
        self.backing_named(base, &name)
    }

    /// Backed by `base`, with `name` written in the header as is (a relative name is relative to
    /// the overlay's folder, as qemu resolves it).
    pub fn backing_named(mut self, base: &Image, name: &str) -> Self {
        self.backing = Some((name.to_string(), base.format, base.secrets.clone()));
        self
    }

    /// Any other `-o key=value` creation option.
    pub fn option(mut self, kv: &str) -> Self {
        self.options.push(kv.to_string());
        self
    }

    pub fn create(self) -> Image {
        let mut opts = vec![format!("compat={}", if self.v2 { "0.10" } else { "1.1" })];
        if let Some(c) = self.cluster_size {
            opts.push(format!("cluster_size={c}"));
        }
        if let Some(r) = self.refcount_bits {
            opts.push(format!("refcount_bits={r}"));
        }
        if self.extended_l2 {
            opts.push("extended_l2=on".into());
        }
        if let Some(c) = self.compression_type {
            opts.push(format!("compression_type={c}"));
        }
        opts.extend(self.options.iter().cloned());
        let mut args: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
        if let Some(pass) = &self.aes {
            args.push("--object".into());
            args.push(format!("secret,id=s0,data={}", qemu_escape(pass)));
            opts.push("encrypt.format=aes".into());
            opts.push("encrypt.key-secret=s0".into());
        }
        args.push("-o".into());
        args.push(opts.join(","));
        let mut secrets = vec![self.aes.clone()];
        if let Some((name, fmt, below)) = &self.backing {
            // -u: do not open the backing file (the size is given; it may be encrypted).
            args.extend(["-u".into(), "-b".into(), name.clone(), "-F".into()]);
            args.push(fmt.as_str().into());
            secrets.extend(below.iter().cloned());
        }
        args.push(path_str(&self.path).into());
        args.push(self.size.to_string());
        qemu_img(&args);
        Image {
            path: self.path,
            format: Format::Qcow2,
            // qemu rounds a qcow2 virtual size up to whole sectors.
            size: self.size.div_ceil(512) * 512,
            secrets,
        }
    }
}

/// `qemu-img convert -O qcow2 -c` of `src` into a new image with compressed clusters.
pub fn convert_compressed(src: &Image, dest: impl Into<PathBuf>, options: &str) -> Image {
    let dest = dest.into();
    let (mut args, target) = src.qemu_open_args();
    args.insert(0, "convert".into());
    args.extend([
        "-c".into(),
        target,
        "-O".into(),
        "qcow2".into(),
        "-o".into(),
        options.into(),
        path_str(&dest).into(),
    ]);
    qemu_img(&args);
    Image::plain(dest, Format::Qcow2, src.size)
}

/// Writes `passphrase` plus one trailing newline (which qcowfs drops) to `dir/name`, mode 0600.
pub fn passphrase_file(dir: &Path, name: &str, passphrase: &str) -> PathBuf {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .expect("create passphrase file");
    writeln!(f, "{passphrase}").expect("write passphrase file");
    path
}

// ---------------------------------------------------------------------------------------------
// Header surgery (hostile inputs)
// ---------------------------------------------------------------------------------------------

pub fn read_be_u32(path: &Path, off: u64) -> u32 {
    let mut b = [0u8; 4];
    File::open(path)
        .expect("open image")
        .read_exact_at(&mut b, off)
        .expect("read header field");
    u32::from_be_bytes(b)
}

pub fn read_be_u64(path: &Path, off: u64) -> u64 {
    let mut b = [0u8; 8];
    File::open(path)
        .expect("open image")
        .read_exact_at(&mut b, off)
        .expect("read header field");
    u64::from_be_bytes(b)
}

pub fn patch_bytes(path: &Path, off: u64, bytes: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open image for patching");
    f.write_all_at(bytes, off).expect("patch image");
}

pub fn patch_be_u32(path: &Path, off: u64, v: u32) {
    patch_bytes(path, off, &v.to_be_bytes());
}

pub fn patch_be_u64(path: &Path, off: u64, v: u64) {
    patch_bytes(path, off, &v.to_be_bytes());
}

pub fn truncate_file(path: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open image for truncation")
        .set_len(len)
        .expect("truncate image");
}

/// Removes the header extension of type `ext_type` from a v3 qcow2 header (the later ones move
/// down; the backing name, found by its own offset, stays where it is). Returns whether it was
/// there.
pub fn strip_header_extension(path: &Path, ext_type: u32) -> bool {
    let bytes = fs::read(path).expect("read image");
    let be32 = |o: usize| u32::from_be_bytes(bytes[o..o + 4].try_into().unwrap());
    let version = be32(4);
    let mut off = if version >= 3 { be32(100) as usize } else { 72 };
    let start = off;
    let mut kept = Vec::new();
    let mut found = false;
    loop {
        let (t, len) = (be32(off), be32(off + 4) as usize);
        let total = 8 + len.div_ceil(8) * 8;
        if t == 0 {
            off += 8;
            break;
        }
        if t == ext_type {
            found = true;
        } else {
            kept.extend_from_slice(&bytes[off..off + total]);
        }
        off += total;
    }
    kept.extend_from_slice(&[0u8; 8]);
    kept.resize(off - start, 0);
    patch_bytes(path, start as u64, &kept);
    found
}

// ---------------------------------------------------------------------------------------------
// Comparing bytes
// ---------------------------------------------------------------------------------------------

/// The first offset where `a` and `b` differ (or the shorter length if one is a prefix).
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    const CHUNK: usize = 64 * 1024;
    let n = a.len().min(b.len());
    let mut base = 0;
    while base < n {
        let end = (base + CHUNK).min(n);
        if a[base..end] != b[base..end] {
            return (base..end).find(|&i| a[i] != b[i]);
        }
        base = end;
    }
    (a.len() != b.len()).then_some(n)
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Asserts `actual == expected`; on a mismatch names the first differing offset (and its 512 B
/// sector and 64 KiB cluster), how many bytes differ, and the bytes there.
pub fn assert_same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    let Some(at) = first_difference(actual, expected) else {
        return;
    };
    let differing = actual.iter().zip(expected).filter(|(x, y)| x != y).count();
    let show = |v: &[u8]| hex(&v[at.min(v.len())..(at + 16).min(v.len())]);
    panic!(
        "{what}: first difference at offset {at} (0x{at:x}; sector {}, 64 KiB cluster {}); \
         lengths {} (qcowfs) vs {} (qemu); {differing} differing bytes in the common length\n\
         qcowfs: {}\nqemu:   {}",
        at / 512,
        at / 65536,
        actual.len(),
        expected.len(),
        show(actual),
        show(expected),
    );
}

/// Reads the whole of `path` under [`READ_TIMEOUT`].
pub fn read_all_bounded(path: &Path) -> Vec<u8> {
    let p = path.to_path_buf();
    within(
        READ_TIMEOUT,
        &format!("reading {}", path.display()),
        move || fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display())),
    )
}

/// Reads `len` bytes at `off` of `path` (positional read) under [`READ_TIMEOUT`].
pub fn read_at_bounded(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let p = path.to_path_buf();
    within(
        READ_TIMEOUT,
        &format!("reading {}", path.display()),
        move || {
            let f = File::open(&p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, off)
                .unwrap_or_else(|e| panic!("read {len} bytes at {off} of {}: {e}", p.display()));
            buf
        },
    )
}

/// `count` positional reads at random unaligned offsets and lengths, each compared to `expected`.
pub fn assert_random_reads_match(disk: &Path, expected: &[u8], count: usize, seed: u64) {
    let p = disk.to_path_buf();
    let exp = expected.to_vec();
    within(READ_TIMEOUT, "random reads", move || {
        let f = File::open(&p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
        let mut rng = Rng::new(seed);
        for _ in 0..count {
            let len = rng.range(1, 300_000.min(exp.len() as u64)) as usize;
            let off = rng.below(exp.len() as u64 - len as u64 + 1) as usize;
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, off as u64)
                .unwrap_or_else(|e| panic!("read {len} bytes at {off}: {e}"));
            if let Some(d) = first_difference(&buf, &exp[off..off + len]) {
                panic!(
                    "read of {len} bytes at offset {off}: first difference at disk offset {}",
                    off + d
                );
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// qcowfs and FUSE
// ---------------------------------------------------------------------------------------------

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
    run_with(
        Command::new(qcowfs_bin())
            .args(args)
            .current_dir(cwd)
            .env("RUST_BACKTRACE", "0"),
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
    let target = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines().any(|line| {
        line.split(' ')
            .nth(4)
            .map(unescape_mountinfo)
            .is_some_and(|m| Path::new(&m) == target)
    })
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
        require_fuse();
        let dir = tempfile::Builder::new()
            .prefix("qcowfs-mnt-")
            .tempdir()
            .expect("create mount point folder");
        let mountpoint = dir.path().join("mnt");
        fs::create_dir(&mountpoint).expect("create mount point");
        let mut args: Vec<OsString> = vec!["mount".into()];
        args.extend(options.iter().map(|o| o.as_ref().to_os_string()));
        args.push(image.into());
        args.push(mountpoint.clone().into());
        let r = qcowfs_with(&args, stdin, cwd);
        let mounted = is_mounted(&mountpoint);
        let dev = fs::metadata(&mountpoint).map(|m| m.dev()).unwrap_or(0);
        let mut guard = Mount {
            mountpoint,
            dev,
            live: mounted,
            _dir: dir,
        };
        if !r.status.success() {
            if mounted {
                drop(guard);
                panic!(
                    "qcowfs mount failed ({}) but left {} mounted:\n{}",
                    describe_status(r.status),
                    "the mount point",
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
        Ok(guard)
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
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
                "qcowfs umount failed ({}):\n{}",
                describe_status(r.status),
                r.stderr
            );
        }
        r
    }

    /// Last resort: abort the FUSE connection (so no request can hang) and detach lazily.
    fn force_unmount(&self) {
        // minor(3) of a Linux dev_t, which names the FUSE connection.
        let minor = (self.dev & 0xff) | ((self.dev >> 12) & 0xffff_ff00);
        let abort = PathBuf::from(format!("/sys/fs/fuse/connections/{minor}/abort"));
        if self.dev != 0 && abort.exists() {
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
