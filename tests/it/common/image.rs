//! Images made by qemu tools: raw and qcow2 builders, writes through `qemu-io`, internal
//! snapshots, and the read oracle `qemu-img convert -O raw`.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::data::{compressible_bytes, random_bytes, Rng};
use super::run::{qemu_img, qemu_io, run, Run};

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

/// `qemu-img compare IMAGE RAW` (the whole chain of `image`, with its secrets, against a raw file),
/// whatever its exit code: 0 means the guest views are identical.
pub fn qemu_compare_with_raw(image: &Image, raw: &Path) -> Run {
    let (mut args, target) = image.qemu_open_args();
    args.insert(0, "compare".into());
    if image.secrets.iter().any(Option::is_some) {
        // --image-opts applies to both files.
        args.push(target);
        args.push(format!("driver=raw,file.filename={}", path_str(raw)));
    } else {
        args.push("-F".into());
        args.push("raw".into());
        args.push(target);
        args.push(path_str(raw).into());
    }
    run("qemu-img", &args)
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
        luks: None,
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
    luks: Option<String>,
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

    /// LUKS (`encrypt.format=luks`, QEMU's default cipher) with this passphrase and a 10 ms
    /// iteration time, so opening it costs little.
    pub fn luks(mut self, passphrase: &str) -> Self {
        self.luks = Some(passphrase.to_string());
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
        if let Some(pass) = &self.luks {
            args.push("--object".into());
            args.push(format!("secret,id=s0,data={}", qemu_escape(pass)));
            opts.push("encrypt.format=luks".into());
            opts.push("encrypt.key-secret=s0".into());
            opts.push("encrypt.iter-time=10".into());
        }
        args.push("-o".into());
        args.push(opts.join(","));
        let mut secrets = vec![self.aes.clone().or_else(|| self.luks.clone())];
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

/// Mount (and seal, info) options that give qcowfs `passphrase` through a file in `dir`.
pub fn passphrase_opts(dir: &Path, passphrase: &str) -> Vec<std::ffi::OsString> {
    let file = passphrase_file(dir, "passphrase", passphrase);
    vec!["--passphrase-file".into(), file.into()]
}

/// A nova instance folder: `DIR/instances/UUID/disk` over `DIR/instances/_base/HASH`.
pub fn nova_paths(dir: &Path) -> (PathBuf, PathBuf) {
    let instances = dir.join("instances");
    let uuid = instances.join("6f1c0e4e-2b6c-4b8e-9d1e-inspection");
    let base = instances.join("_base");
    fs::create_dir_all(&uuid).expect("mkdir instance");
    fs::create_dir_all(&base).expect("mkdir _base");
    (
        uuid.join("disk"),
        base.join("3b2c1f0e8d7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c"),
    )
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
