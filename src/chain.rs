//! The backing chain: open IMAGE and every backing file below it (qcow2 or raw), each with its own
//! key, and read guest ranges through the stack. Depth is limited and loops are refused.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use zeroize::Zeroizing;

use crate::crypto::luks::KeySlot;
use crate::crypto::{CryptoError, LuksHeader, QcowAes, SectorCipher};
use crate::error::{escaped, Context, Error, Result, Role};
use crate::io::{HostFile, ImageLock, LockMode};
use crate::qcow2::{ClusterSource, Encryption, FormatError, Header, Qcow2Image};

/// QEMU refuses deeper chains too.
pub const MAX_DEPTH: usize = 32;

/// Passphrases for the encrypted layers of a chain.
#[derive(Default)]
pub struct KeyRing {
    /// Used by every encrypted layer without its own entry.
    pub default: Option<Zeroizing<Vec<u8>>>,
    /// Per-layer passphrases, by the layer's canonical path.
    pub per_layer: Vec<(PathBuf, Zeroizing<Vec<u8>>)>,
}

impl KeyRing {
    /// The passphrase for the layer at `path`: its own, else the default.
    pub fn for_layer(&self, path: &Path) -> Option<&[u8]> {
        let canon = std::fs::canonicalize(path).ok();
        self.per_layer
            .iter()
            .find(|(p, _)| Some(p) == canon.as_ref() || p == path)
            .map(|(_, k)| k.as_slice())
            .or(self.default.as_deref().map(|k| k.as_slice()))
    }
}

/// How to open the chain.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open the top layer for writing (backing layers are always read-only).
    pub writable: bool,
    /// Take no QEMU locks (reads may be inconsistent if someone writes).
    pub force_share: bool,
    /// Open even a layer that cannot be decrypted (for `info`: no key needed to list the chain).
    pub without_keys: bool,
    /// A LUKS layer whose key slots all refuse its passphrase is opened without a key and named
    /// by `Chain::key_rejected`, instead of failing the open (`check-key` and `info` report it).
    pub keep_rejected_keys: bool,
    /// When not empty, every backing file must resolve (symlinks followed) inside one of these
    /// folders (canonical paths, `--backing-within`); anything else is refused before it is opened.
    pub backing_within: Vec<PathBuf>,
    /// Log every write and barrier to the top layer (crash-state tests build states from it).
    pub record: Option<crate::io::WriteLog>,
    /// Make one host operation on the top layer fail (fault-state tests).
    pub faults: Option<crate::io::FaultPlan>,
}

/// One layer of the chain.
#[derive(Debug)]
pub enum Layer {
    Qcow2(Arc<Qcow2Image>),
    Raw(HostFile),
}

impl Layer {
    pub fn path(&self) -> &Path {
        match self {
            Layer::Qcow2(q) => q.path(),
            Layer::Raw(f) => f.path(),
        }
    }

    pub fn format(&self) -> &'static str {
        match self {
            Layer::Qcow2(_) => "qcow2",
            Layer::Raw(_) => "raw",
        }
    }

    pub fn virtual_size(&self) -> Result<u64> {
        match self {
            Layer::Qcow2(q) => Ok(q.virtual_size()),
            Layer::Raw(f) => f.len(),
        }
    }

    pub fn encryption(&self) -> Encryption {
        match self {
            Layer::Qcow2(q) => q.encryption(),
            Layer::Raw(_) => Encryption::None,
        }
    }
}

/// The stack of layers, top (the image the user named) first.
#[derive(Debug)]
pub struct Chain {
    layers: Vec<Layer>,
    /// The top layer (`layers[0]`), the only one ever written: `open` refuses a chain whose top
    /// is not qcow2, so the writers hold it typed instead of matching `Layer` again.
    image: Arc<Qcow2Image>,
    /// Cached virtual sizes, so reads need no metadata calls.
    sizes: Vec<u64>,
    /// Levels whose LUKS key slots refused the passphrase (only with `keep_rejected_keys`).
    rejected_keys: Vec<usize>,
    _locks: Vec<ImageLock>,
}

impl Chain {
    pub fn open(image: &Path, keys: &KeyRing, opts: OpenOptions) -> Result<Chain> {
        let mut layers = Vec::new();
        let mut rejected_keys = Vec::new();
        let mut locks = Vec::new();
        let mut seen = HashSet::new();
        let mut top = None;
        let mut next: Option<(PathBuf, Option<String>)> = Some((image.to_path_buf(), None));
        let mut parent: Option<PathBuf> = None;
        while let Some((path, format)) = next.take() {
            // A backing file's error names the file that names it: "backing file B of D: missing".
            let role = match &parent {
                None => Role::Plain,
                Some(of) => Role::BackingFile {
                    of: Box::new(of.clone()),
                },
            };
            let named = |e: Error| e.as_role(role.clone());
            if layers.len() == MAX_DEPTH {
                return Err(Error::new(image, FormatError::ChainTooDeep(MAX_DEPTH)));
            }
            let writable = opts.writable && layers.is_empty();
            // A confined backing file is opened where the check found it, by a path that cannot
            // be swapped for a link in between.
            let confined = match layers.is_empty() {
                true => None,
                false => confine(&path, &opts.backing_within).map_err(named)?,
            };
            let mut file = match confined {
                Some((dir, rel)) => HostFile::open_beneath(&dir, &rel, &path).map_err(named)?,
                None if layers.is_empty() => {
                    HostFile::open(&path, writable).map_err(|e| image_hint(e, &path, writable))?
                }
                None => HostFile::open(&path, writable).map_err(named)?,
            };
            let os = file.os_file().ok_or_else(|| {
                Error::new(&path, std::io::Error::from(std::io::ErrorKind::Unsupported))
            })?;
            let meta = os.metadata().at(&path)?;
            if !seen.insert((meta.dev(), meta.ino())) {
                return Err(Error::new(&path, FormatError::ChainLoop));
            }
            if !opts.force_share {
                let mode = if writable {
                    LockMode::Write
                } else {
                    LockMode::Read
                };
                locks.push(
                    ImageLock::acquire(os, mode)
                        .map_err(|m| named(Error::new(&path, crate::Problem::Locked(m))))?,
                );
            }
            let is_top = layers.is_empty();
            if let (true, Some(log)) = (is_top, &opts.record) {
                file = file.recorded(log.clone());
            }
            if let (true, Some(plan)) = (is_top, &opts.faults) {
                file = file.with_faults(plan.clone());
            }
            let (layer, rejected) =
                open_layer(file, format.as_deref(), keys, &opts).map_err(named)?;
            if rejected {
                rejected_keys.push(layers.len());
            }
            // The image the user names must be qcow2; only backing files may be raw.
            if is_top {
                let Layer::Qcow2(q) = &layer else {
                    return Err(Error::new(&path, FormatError::BadMagic)
                        .hint("a raw disk needs no qcowfs (mount -o loop)"));
                };
                top = Some(q.clone());
            }
            if let Layer::Qcow2(q) = &layer {
                let header = q.header();
                if writable && header.is_dirty() {
                    return Err(Error::new(&path, FormatError::DirtyBit));
                }
                if let Some(name) = &header.backing_file {
                    next = Some((resolve_backing(&path, name), header.backing_format.clone()));
                }
            }
            log::debug!("opened {} ({})", path.display(), layer.format());
            layers.push(layer);
            parent = Some(path);
        }
        let sizes = layers
            .iter()
            .map(Layer::virtual_size)
            .collect::<Result<Vec<_>>>()?;
        let image = top.ok_or_else(|| Error::new(image, FormatError::BadMagic))?;
        Ok(Chain {
            layers,
            image,
            sizes,
            rejected_keys,
            _locks: locks,
        })
    }

    /// Whether the layer at `level` is a LUKS layer whose key slots refused its passphrase (see
    /// `OpenOptions::keep_rejected_keys`); it is open without a key.
    pub fn key_rejected(&self, level: usize) -> bool {
        self.rejected_keys.contains(&level)
    }

    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    pub fn top(&self) -> &Layer {
        &self.layers[0]
    }

    /// The top layer as the qcow2 image it always is (the one writes go to).
    pub fn image(&self) -> &Arc<Qcow2Image> {
        &self.image
    }

    /// The guest disk size: the top layer's virtual size.
    pub fn size(&self) -> u64 {
        self.sizes[0]
    }

    /// Read guest bytes through the whole chain.
    pub fn read(&self, guest: u64, buf: &mut [u8]) -> Result<()> {
        self.read_level(0, guest, buf)
    }

    /// Read guest bytes as the layers from `level` down show them. Past a layer's end: zeros.
    pub fn read_level(&self, level: usize, guest: u64, buf: &mut [u8]) -> Result<()> {
        let Some(layer) = self.layers.get(level) else {
            buf.fill(0);
            return Ok(());
        };
        let size = self.sizes[level];
        let inside = size.saturating_sub(guest).min(buf.len() as u64) as usize;
        // A qcow2 layer stores whole sectors (and decrypts nothing less): a size that ends inside
        // one is read up to the sector's end, and what lies past the size is then cut to zeros.
        let read = match layer {
            Layer::Qcow2(_) if guest % 512 == 0 => inside.div_ceil(512).saturating_mul(512),
            _ => inside,
        }
        .min(buf.len());
        let (head, tail) = buf.split_at_mut(read);
        tail.fill(0);
        if head.is_empty() {
            return Ok(());
        }
        match layer {
            Layer::Raw(f) => f.read_at(guest, head)?,
            Layer::Qcow2(q) => q.read(guest, head, &|g, b| self.read_level(level + 1, g, b))?,
        }
        head[inside..].fill(0);
        Ok(())
    }
}

impl Chain {
    /// Whether the guest bytes at `guest` hold data somewhere in the chain (as opposed to reading as
    /// zeros because no layer has them, or a zero cluster), and for how many bytes (at most `len`)
    /// that holds.
    pub fn data_extent(&self, guest: u64, len: u64) -> Result<(bool, u64)> {
        let (provider, n) = self.provider(guest, len)?;
        Ok((provider.is_some(), n))
    }

    /// Which layer (index, top = 0) provides the data the guest reads at `guest`, for how many bytes
    /// (at most `len`); None where the guest reads zeros that no layer stores.
    pub fn provider(&self, guest: u64, len: u64) -> Result<(Option<usize>, u64)> {
        let mut level = 0;
        let mut len = len;
        while let Some(layer) = self.layers.get(level) {
            let size = self.sizes[level];
            if guest >= size {
                return Ok((None, len));
            }
            len = len.min(size - guest);
            match layer {
                Layer::Raw(f) => {
                    let (data, n) = raw_data_extent(f, guest, len)?;
                    return Ok((data.then_some(level), n));
                }
                Layer::Qcow2(q) => {
                    let (source, n) = q.map(guest, len)?;
                    match source {
                        ClusterSource::Backing => {
                            len = n;
                            level += 1;
                        }
                        ClusterSource::Zero => return Ok((None, n)),
                        ClusterSource::Data { .. } | ClusterSource::Compressed { .. } => {
                            return Ok((Some(level), n))
                        }
                    }
                }
            }
        }
        Ok((None, len))
    }

    /// Guest-visible data bytes each layer provides (index = layer, top first).
    pub fn coverage(&self) -> Result<Vec<u64>> {
        let mut per_layer = vec![0u64; self.layers.len()];
        let mut at = 0;
        while at < self.size() {
            let (provider, n) = self.provider(at, self.size() - at)?;
            if let Some(level) = provider {
                per_layer[level] += n;
            }
            at += n;
        }
        Ok(per_layer)
    }

    /// Bytes of guest data the chain holds (what `st_blocks` reports).
    pub fn data_bytes(&self) -> Result<u64> {
        Ok(self.coverage()?.iter().sum())
    }
}

/// Data or hole in a raw file, as the host file system knows it: its extent map, where unwritten
/// (reserved, never written) extents are holes (`io::extents`), else SEEK_DATA / SEEK_HOLE.
fn raw_data_extent(f: &HostFile, at: u64, len: u64) -> Result<(bool, u64)> {
    use std::os::unix::io::AsRawFd;
    let Some(os) = f.os_file() else {
        return Ok((true, len));
    };
    match crate::io::extents::run_at(os, at, len) {
        Ok(Some(run)) => return Ok(run),
        Ok(None) => {}
        Err(e) => log::debug!("{}: cannot read the extent map: {e}", f.path().display()),
    }
    let fd = os.as_raw_fd();
    // SAFETY: fd is a valid descriptor for the duration of the call.
    let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        // ENXIO: no data after `at`; anything else: treat as data (no hole information).
        let err = std::io::Error::last_os_error();
        return Ok((err.raw_os_error() != Some(libc::ENXIO), len));
    }
    let data = data as u64;
    if data > at {
        return Ok((false, (data - at).min(len)));
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_HOLE) };
    let n = if hole < 0 {
        len
    } else {
        (hole as u64).saturating_sub(at).clamp(1, len)
    };
    Ok((true, n))
}

/// With `--backing-within`: `path` (symlinks followed) must lie inside one of `within`. Returns
/// that folder and the resolved path relative to it (None when nothing confines).
fn confine(path: &Path, within: &[PathBuf]) -> Result<Option<(PathBuf, PathBuf)>> {
    if within.is_empty() {
        return Ok(None);
    }
    let resolved = std::fs::canonicalize(path).at(path)?;
    for dir in within {
        if let Ok(rel) = resolved.strip_prefix(dir) {
            return Ok(Some((dir.clone(), rel.to_path_buf())));
        }
    }
    let allowed: Vec<String> = within.iter().map(|d| crate::error::escaped(d)).collect();
    Err(Error::new(
        path,
        crate::Problem::Refused(format!(
            "the backing file resolves to {}, outside every --backing-within folder ({}): refused",
            crate::error::escaped(&resolved),
            allowed.join(", ")
        )),
    ))
}

/// The image's open error with what to do about it: a folder given for an image (a nova instance
/// folder, or the instances folder) names the disk inside it; a file this user may not write names
/// `--read-only`.
fn image_hint(e: Error, path: &Path, writable: bool) -> Error {
    match e.os_error() {
        Some(libc::EISDIR) => {
            let disk = path.join("disk");
            let hint = if disk.is_file() {
                format!("an instance folder? its disk is {}", escaped(&disk))
            } else if has_instance_disks(path) {
                format!(
                    "an instances folder? name one disk, {}/UUID/disk (qcowfs audit {} lists them)",
                    escaped(path),
                    escaped(path)
                )
            } else {
                "a folder, not an image".to_string()
            };
            e.hint(hint)
        }
        Some(libc::EACCES | libc::EPERM | libc::EROFS) if writable => {
            e.hint("to read it only: --read-only")
        }
        _ => e,
    }
}

/// Whether some `DIR/*/disk` exists (a nova instances folder), looking at a bounded number of
/// entries.
fn has_instance_disks(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries
        .take(10_000)
        .flatten()
        .any(|entry| entry.path().join("disk").is_file())
}

/// Whether `layer_path` (symlinks followed) lies outside the tree of the image `image`: the folder
/// above the image's own, which holds a nova instance's folder and `_base` alike.
pub fn outside_tree(image: &Path, layer_path: &Path) -> Option<PathBuf> {
    let top = std::fs::canonicalize(image).ok()?;
    let tree = top.parent()?.parent().unwrap_or(Path::new("/"));
    let resolved = std::fs::canonicalize(layer_path).ok()?;
    (!resolved.starts_with(tree)).then_some(resolved)
}

/// Backing names are relative to the directory of the image that names them.
fn resolve_backing(overlay: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match overlay.parent() {
        Some(dir) => dir.join(p),
        None => p.to_path_buf(),
    }
}

/// Open one layer with its key; also whether its LUKS key slots refused the passphrase (with
/// `keep_rejected_keys`; the layer is then open without a key).
fn open_layer(
    file: HostFile,
    format: Option<&str>,
    keys: &KeyRing,
    opts: &OpenOptions,
) -> Result<(Layer, bool)> {
    let path = file.path().to_path_buf();
    let mut first = [0u8; 4];
    let len = file.len()?;
    file.read_at(0, &mut first)?;
    let is_qcow2 = match format {
        Some("qcow2") => true,
        Some("raw") => false,
        Some(other) => {
            return Err(Error::new(
                &path,
                FormatError::BackingFormat(other.to_string()),
            ))
        }
        None => first == crate::qcow2::header::MAGIC,
    };
    if !is_qcow2 {
        return Ok((Layer::Raw(file), false));
    }
    let mut head = vec![0u8; len.min(4096) as usize];
    file.read_exact_at(0, &mut head)?;
    let want = Header::bytes_wanted(&head).at(&path)?;
    let mut cluster = vec![0u8; want.min(len as usize)];
    file.read_exact_at(0, &mut cluster)?;
    let header = Header::parse(&cluster, len).at(&path)?;
    let encryption = header.encryption;
    let writable = file.is_writable();
    let mut image = Qcow2Image::open(file, header, writable)?;
    match encryption {
        Encryption::None => {}
        Encryption::Aes => match keys.for_layer(&path) {
            Some(key) => image.set_cipher(crate::crypto::secret::scope(|| {
                Box::new(crate::crypto::secret::StackHiding(Box::new(QcowAes::new(
                    key,
                )))) as Box<dyn SectorCipher>
            })),
            None if opts.without_keys => {}
            None => return Err(Error::new(&path, CryptoError::NoPassphrase)),
        },
        Encryption::Luks => {
            let luks = luks_header(&image)?;
            match keys.for_layer(&path) {
                Some(key) => {
                    // Key material, slot keys, the master key and the cipher: all secret memory.
                    let cipher = crate::crypto::secret::scope(|| {
                        luks.unlock(key, &|slot| read_key_material(&image, &luks, slot))
                            .map(|c| {
                                Box::new(crate::crypto::secret::StackHiding(Box::new(c)))
                                    as Box<dyn SectorCipher>
                            })
                    });
                    match cipher {
                        Ok(cipher) => image.set_cipher(cipher),
                        Err(CryptoError::WrongPassphrase) if opts.keep_rejected_keys => {
                            return Ok((Layer::Qcow2(Arc::new(image)), true))
                        }
                        Err(e) => return Err(Error::new(&path, e)),
                    }
                }
                None if opts.without_keys => {}
                None => return Err(Error::new(&path, CryptoError::NoPassphrase)),
            }
        }
    }
    Ok((Layer::Qcow2(Arc::new(image)), false))
}

/// The LUKS header of a LUKS-encrypted qcow2 layer, from where the encryption extension points.
pub fn luks_header(image: &Qcow2Image) -> Result<LuksHeader> {
    let path = image.path();
    let (offset, len) = luks_area(image)?;
    let mut buf = vec![0u8; crate::crypto::luks::HEADER_LEN];
    image.file().read_exact_at(offset, &mut buf)?;
    LuksHeader::parse(&buf, len).at(path)
}

/// (offset, length) of the LUKS area, checked against the file.
fn luks_area(image: &Qcow2Image) -> Result<(u64, u64)> {
    let path = image.path();
    let header = image.header();
    let Some((offset, len)) = header.fde_header else {
        return Err(Error::new(
            path,
            FormatError::BadExtension("full disk encryption (missing for LUKS)"),
        ));
    };
    let file_len = image.file().len()?;
    let cs = header.cluster_size();
    if offset % cs != 0 || offset == 0 {
        return Err(Error::new(
            path,
            FormatError::Misaligned {
                what: "LUKS header",
                offset,
                align: cs,
            },
        ));
    }
    if offset.checked_add(len).is_none_or(|end| end > file_len)
        || len < crate::crypto::luks::HEADER_LEN as u64
    {
        return Err(Error::new(
            path,
            FormatError::BeyondEnd {
                what: "LUKS header",
                offset,
                len,
                file_len,
            },
        ));
    }
    Ok((offset, len))
}

fn read_key_material(
    image: &Qcow2Image,
    luks: &LuksHeader,
    slot: &KeySlot,
) -> Result<Vec<u8>, CryptoError> {
    let mut buf = vec![0u8; luks.material_len(slot)];
    let (offset, len) =
        luks_area(image).map_err(|_| CryptoError::BadLuksHeader("LUKS area moved"))?;
    let at = key_material_at(offset, len, slot.material_offset, buf.len() as u64)?;
    image
        .file()
        .read_exact_at(at, &mut buf)
        .map_err(|_| CryptoError::BadLuksHeader("key material cannot be read"))?;
    Ok(buf)
}

/// The file offset of a key slot's material (`material_len` bytes at `material_offset` into the LUKS
/// area at `area_offset`, `area_len` long), which must lie inside the area.
fn key_material_at(
    area_offset: u64,
    area_len: u64,
    material_offset: u64,
    material_len: u64,
) -> Result<u64, CryptoError> {
    let outside = CryptoError::BadLuksHeader("key material lies outside the LUKS area");
    let end = material_offset
        .checked_add(material_len)
        .ok_or(CryptoError::BadLuksHeader("key material offset overflows"))?;
    if end > area_len {
        return Err(outside);
    }
    area_offset
        .checked_add(material_offset)
        .ok_or(CryptoError::BadLuksHeader("key material offset overflows"))
}

#[cfg(test)]
impl Chain {
    /// A chain over layers already open (in memory in unit tests): no files to check or lock.
    pub(crate) fn from_layers(layers: Vec<Layer>) -> Chain {
        let sizes = layers.iter().map(|l| l.virtual_size().unwrap()).collect();
        let Some(Layer::Qcow2(image)) = layers.first() else {
            panic!("a chain's top layer is qcow2");
        };
        Chain {
            image: image.clone(),
            layers,
            sizes,
            rejected_keys: Vec::new(),
            _locks: Vec::new(),
        }
    }
}

#[cfg(test)]
#[path = "chain/tests.rs"]
mod tests;
