//! Building a configuration's chain with qemu-img and qemu-io: each layer created, given seeded
//! data (and zeroes, compressed clusters), the guest's partition table written into the bottom
//! layer, an internal snapshot where the row asks for one; each layer with its own passphrase.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::common::{
    compressible_bytes, passphrase_file, qemu_img, random_bytes, Format, Image, Rng, KIB,
};
use crate::config::{Config, Enc, Layer, Window};
use crate::ptable::Layout;

/// A built chain and what mounting and checking it needs.
pub struct Built {
    /// Bottom first; the last is the mounted image. Each carries its own chain's secrets.
    pub layers: Vec<Image>,
    /// The passphrase file of each layer (`None` for a plain one).
    pub keys: Vec<Option<PathBuf>>,
    pub layout: Layout,
    /// Where operations may write: the row's windows minus the partition tables.
    pub windows: Vec<(u64, u64)>,
    /// Seeded test data is guest-like (compressible) when any layer is encrypted: qcowfs refuses
    /// a legacy AES key when every sampled cluster decrypts to noise.
    pub guest_like: bool,
}

impl Built {
    pub fn top(&self) -> &Image {
        self.layers.last().expect("a chain has a layer")
    }

    /// Test data for a write.
    pub fn data(&self, len: u64, seed: u64) -> Vec<u8> {
        data(self.guest_like, len, seed)
    }

    /// `--passphrase-file TOP` and `--layer-passphrase-file PATH=FILE` for each encrypted layer
    /// below, as mount and seal take them; `depth` layers from the top are still in the chain.
    pub fn key_options(&self, depth: usize) -> Vec<OsString> {
        let n = self.layers.len();
        let mut opts: Vec<OsString> = vec![];
        for i in (n - depth..n).rev() {
            let Some(key) = &self.keys[i] else { continue };
            if i == n - 1 {
                opts.push("--passphrase-file".into());
                opts.push(key.into());
            } else {
                opts.push("--layer-passphrase-file".into());
                let mut spec = OsString::from(&self.layers[i].path);
                spec.push("=");
                spec.push(key);
                opts.push(spec);
            }
        }
        opts
    }
}

pub fn data(guest_like: bool, len: u64, seed: u64) -> Vec<u8> {
    if guest_like {
        compressible_bytes(len as usize, seed)
    } else {
        random_bytes(len as usize, seed)
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// The row's windows on a disk of `size` bytes, cut by the partition layout's reserved ranges.
pub fn op_windows(cfg: &Config, size: u64, layout: &Layout) -> Vec<(u64, u64)> {
    let wanted: Vec<(u64, u64)> = if cfg.windows.is_empty() {
        vec![(0, size)]
    } else {
        cfg.windows
            .iter()
            .map(|w| match *w {
                Window::At(s, l) => (s, l.min(size - s)),
                Window::Tail(l) => (size - l, l),
            })
            .collect()
    };
    let mut out = vec![];
    for (ws, wl) in wanted {
        for (ls, ll) in layout.windows() {
            let s = ws.max(ls);
            let e = (ws + wl).min(ls + ll);
            if s < e {
                out.push((s, e - s));
            }
        }
    }
    out
}

/// Creates every layer of `cfg` in `dir`.
pub fn build(cfg: &Config, dir: &Path, rng: &mut Rng) -> Built {
    let disk_size = cfg.size.div_ceil(512) * 512;
    let layout = Layout::new(cfg.guest, disk_size);
    let windows = op_windows(cfg, disk_size, &layout);
    let guest_like = cfg.encrypted();
    let mut layers: Vec<Image> = vec![];
    let mut keys = vec![];
    for (i, layer) in cfg.layers.iter().enumerate() {
        let pass = (layer.enc != Enc::Plain).then(|| format!("difftest key {i} of {}", cfg.name));
        let key = pass
            .as_ref()
            .map(|p| passphrase_file(dir, &format!("layer{i}.key"), p));
        let image = create_layer(dir, i, layer, disk_size, layers.last(), pass.as_deref());
        fill_layer(&image, layer, &windows, guest_like, rng);
        if i == 0 {
            for (off, bytes) in layout.table_writes() {
                write_layer(&image, off, &bytes);
            }
        }
        layers.push(image);
        keys.push(key);
    }
    if cfg.snapshot {
        let top = layers.last().expect("a top layer");
        top.snapshot("snap1");
        fill_layer(top, cfg.top(), &windows, guest_like, rng);
    }
    Built {
        layers,
        keys,
        layout,
        windows,
        guest_like,
    }
}

fn create_layer(
    dir: &Path,
    i: usize,
    layer: &Layer,
    disk_size: u64,
    below: Option<&Image>,
    pass: Option<&str>,
) -> Image {
    let size = layer.size.unwrap_or(disk_size);
    if layer.raw {
        assert!(below.is_none(), "a raw layer has no backing file");
        let path = dir.join(format!("layer{i}.raw"));
        File::create(&path)
            .and_then(|f| f.set_len(size))
            .expect("create raw layer");
        return Image::plain(path, Format::Raw, size);
    }
    let path = dir.join(format!("layer{i}.qcow2"));
    let mut opts = vec![
        format!("compat={}", if layer.v2 { "0.10" } else { "1.1" }),
        format!("cluster_size={}", layer.cluster),
        format!("refcount_bits={}", layer.refcount_bits),
    ];
    if layer.extended_l2 {
        opts.push("extended_l2=on".into());
    }
    if let Some(mode) = layer.prealloc {
        opts.push(format!("preallocation={mode}"));
    }
    if layer.lazy_refcounts {
        opts.push("lazy_refcounts=on".into());
    }
    let mut args: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    match layer.enc {
        Enc::Plain => {}
        Enc::Aes => opts.extend(["encrypt.format=aes".into(), "encrypt.key-secret=s0".into()]),
        Enc::Luks => opts.extend([
            "encrypt.format=luks".into(),
            "encrypt.key-secret=s0".into(),
            "encrypt.iter-time=10".into(),
        ]),
    }
    if let Some(pass) = pass {
        args.push("--object".into());
        args.push(format!("secret,id=s0,data={pass}"));
    }
    args.push("-o".into());
    args.push(opts.join(","));
    let mut secrets = vec![pass.map(str::to_string)];
    if let Some(below) = below {
        args.extend(["-u".into(), "-b".into(), path_str(&below.path).into()]);
        args.extend(["-F".into(), below.format.as_str().into()]);
        secrets.extend(below.secrets.iter().cloned());
    }
    args.push(path_str(&path).into());
    args.push(size.to_string());
    qemu_img(&args);
    Image {
        path,
        format: Format::Qcow2,
        size: size.div_ceil(512) * 512,
        secrets,
    }
}

/// Bytes into one layer directly (raw) or through qemu-io (qcow2, with its chain's secrets).
fn write_layer(image: &Image, off: u64, bytes: &[u8]) {
    match image.format {
        Format::Raw => OpenOptions::new()
            .write(true)
            .open(&image.path)
            .and_then(|f| f.write_all_at(bytes, off))
            .expect("write raw layer"),
        Format::Qcow2 => {
            image.write_bytes(off, bytes);
        }
    }
}

/// Seeded extents in the windows (within the layer's own size), one zeroed extent and, where the
/// row asks, one compressed extent; all qcow2 writes in one qemu-io run.
fn fill_layer(
    image: &Image,
    layer: &Layer,
    windows: &[(u64, u64)],
    guest_like: bool,
    rng: &mut Rng,
) {
    let size = image.size;
    let inside: Vec<(u64, u64)> = windows
        .iter()
        .filter(|(s, _)| *s < size)
        .map(|&(s, l)| (s, l.min(size - s)))
        .collect();
    if inside.is_empty() {
        return;
    }
    let mut files = vec![];
    let mut cmds = vec![];
    for k in 0..6 {
        let (ws, wl) = inside[rng.below(inside.len() as u64) as usize];
        let len = rng.range(1, (256 * KIB).min(wl));
        let off = ws + rng.below(wl - len + 1);
        let bytes = data(guest_like, len, rng.next_u64());
        if image.format == Format::Raw {
            write_layer(image, off, &bytes);
            continue;
        }
        if k == 5 {
            cmds.push(format!("write -z {off} {len}"));
            continue;
        }
        let mut f = tempfile::NamedTempFile::new().expect("temp data file");
        f.write_all(&bytes).expect("write temp data file");
        cmds.push(format!("write -s {} {off} {len}", path_str(f.path())));
        files.push(f);
    }
    if layer.compressed && image.format == Format::Qcow2 {
        let c = layer.cluster;
        if let Some(&(ws, wl)) = inside
            .iter()
            .find(|(s, l)| s.div_ceil(c) * c + 2 * c <= s + l)
        {
            let slots = (ws + wl) / c - ws.div_ceil(c) - 1;
            let off = (ws.div_ceil(c) + rng.below(slots)) * c;
            let bytes = compressible_bytes(2 * c as usize, rng.next_u64());
            let mut f = tempfile::NamedTempFile::new().expect("temp data file");
            f.write_all(&bytes).expect("write temp data file");
            // First: qemu compresses only into clusters not yet allocated.
            cmds.insert(
                0,
                format!("write -c -s {} {off} {}", path_str(f.path()), 2 * c),
            );
            files.push(f);
        }
    }
    if !cmds.is_empty() {
        image.qemu_io(&cmds);
    }
}
