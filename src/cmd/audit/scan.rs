//! Measuring each disk found: its chain and encryption coverage (`info`'s computation), whether
//! a running VM holds it, and per base image the instances on it. A found image that another
//! disk leans on (a CloudStack template, an older external snapshot) is a base, not a disk.
//!
//! Disks are opened without locks, as `qemu-img info -U` does: only metadata is read, and a
//! running VM's disk is what an audit is for. QEMU's lock probe then tells whether a writer holds
//! it ("in use": its numbers are read as they are, and may be changing).
//!
//! Disks are opened one at a time and closed before the next, so time and memory are those of
//! one `qcowfs info` per disk: the coverage walk maps extents and holds O(layers), whatever the
//! virtual size. A base is measured once, with the first disk that reaches it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use super::discover::Candidate;
use crate::chain::{Chain, KeyRing, OpenOptions};
use crate::cmd::info::{allocated_bytes, Coverage};
use crate::error::{Error, Result};
use crate::io::held_for_writing;
use crate::qcow2::Encryption;

/// One layer of an audited disk's chain.
#[derive(Debug, Clone)]
pub(crate) struct LayerRow {
    /// As the chain names it (the backing name resolved against the overlay's folder).
    pub path: PathBuf,
    /// Symlinks followed: how bases are told apart.
    pub canonical: PathBuf,
    pub format: &'static str,
    pub encryption: Encryption,
    /// Guest data bytes this layer provides to the disk.
    pub provided: u64,
    /// The data the layer's file holds, measured for a base the first time a disk reaches it.
    pub allocated: Option<u64>,
}

/// A disk that could be audited.
#[derive(Debug, Clone)]
pub(crate) struct DiskAudit {
    pub virtual_size: u64,
    /// Top first; never empty.
    pub layers: Vec<LayerRow>,
    pub coverage: Coverage,
}

impl DiskAudit {
    /// The top layer's encryption: what protects what the instance writes.
    pub(crate) fn encryption(&self) -> Encryption {
        self.layers
            .first()
            .map_or(Encryption::None, |l| l.encryption)
    }

    pub(crate) fn encrypted(&self) -> bool {
        self.encryption() != Encryption::None
    }

    /// Guest data bytes that unencrypted layers below the top provide.
    pub(crate) fn plaintext_base_bytes(&self) -> u64 {
        self.layers
            .iter()
            .skip(1)
            .filter(|l| l.encryption == Encryption::None)
            .map(|l| l.provided)
            .sum()
    }
}

/// One disk's row: its audit, or one line saying why there is none.
#[derive(Debug)]
pub(crate) struct DiskRow {
    pub path: PathBuf,
    /// Held open for writing by another process (a running VM); None when that cannot be told.
    pub in_use: Option<bool>,
    pub result: std::result::Result<DiskAudit, String>,
}

/// A base image: a layer below the top of at least one audited disk.
#[derive(Debug, Clone)]
pub(crate) struct BaseRow {
    /// Canonical.
    pub path: PathBuf,
    pub format: &'static str,
    pub encryption: Encryption,
    /// The data its file holds (see `info::allocated_bytes`).
    pub allocated: Option<u64>,
    /// The disks relying on it, in audit order.
    pub instances: Vec<PathBuf>,
    /// How many of them have an encrypted top layer.
    pub encrypted_instances: usize,
    /// Guest data bytes it provides, summed over its instances.
    pub provided: u64,
}

impl BaseRow {
    /// The data it holds unencrypted: all of an unencrypted base's data, none of an encrypted one's.
    pub(crate) fn plaintext_bytes(&self) -> u64 {
        match self.encryption {
            Encryption::None => self.allocated.unwrap_or(0),
            _ => 0,
        }
    }
}

/// The whole audit: disks in discovery order, bases by canonical path.
#[derive(Debug, Default)]
pub(crate) struct Audit {
    pub disks: Vec<DiskRow>,
    pub bases: Vec<BaseRow>,
}

impl Audit {
    /// Disks that could not be audited.
    pub(crate) fn failed(&self) -> usize {
        self.disks.iter().filter(|d| d.result.is_err()).count()
    }
}

/// The data each base's file holds, by canonical path, measured once.
type Measured = HashMap<PathBuf, Option<u64>>;

/// Audit every candidate, one at a time; then drop the disks other disks lean on (they are
/// bases) and gather the bases.
pub(crate) fn audit(candidates: Vec<Candidate>, opts: &OpenOptions) -> Audit {
    let mut measured = Measured::new();
    let mut disks = Vec::new();
    for Candidate { path, refused } in candidates {
        let (in_use, result) = match refused {
            Some(why) => (None, Err(why)),
            None => (in_use(&path), audit_guarded(&path, opts, &mut measured)),
        };
        disks.push(DiskRow {
            path,
            in_use,
            result,
        });
    }
    let leaned_on: HashSet<&Path> = disks
        .iter()
        .filter_map(|d| d.result.as_ref().ok())
        .flat_map(|d| d.layers.iter().skip(1).map(|l| l.canonical.as_path()))
        .collect();
    let is_base: Vec<bool> = disks
        .iter()
        .map(|d| {
            d.result
                .as_ref()
                .is_ok_and(|a| leaned_on.contains(a.layers[0].canonical.as_path()))
        })
        .collect();
    let mut is_base = is_base.into_iter();
    disks.retain(|_| !is_base.next().unwrap_or(false));
    let mut bases: BTreeMap<PathBuf, BaseRow> = BTreeMap::new();
    for disk in &disks {
        if let Ok(audit) = &disk.result {
            add_bases(&mut bases, &disk.path, audit);
        }
    }
    Audit {
        disks,
        bases: bases.into_values().collect(),
    }
}

/// Whether another process holds the image at `path` open for writing (QEMU's lock probe). The
/// file is opened apart from the audit's own open, without blocking, and only if it is a regular
/// file or a block device (as `HostFile` requires).
fn in_use(path: &Path) -> Option<bool> {
    let image = |meta: fs::Metadata| meta.is_file() || meta.file_type().is_block_device();
    if !image(fs::metadata(path).ok()?) {
        return None;
    }
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    if !image(file.metadata().ok()?) {
        return None;
    }
    held_for_writing(&file).ok()
}

/// `audit_disk`, with its error as the row's one line. A panic (a bug: none is expected) is
/// caught and becomes that disk's row, so one disk cannot end the audit of the others.
fn audit_guarded(
    path: &Path,
    opts: &OpenOptions,
    measured: &mut Measured,
) -> std::result::Result<DiskAudit, String> {
    match catch_unwind(AssertUnwindSafe(|| audit_disk(path, opts, measured))) {
        Ok(Ok(disk)) => Ok(disk),
        Ok(Err(e)) => Err(row_error(path, &e)),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(format!("internal error (a bug in qcowfs): {what}"))
        }
    }
}

/// Open the disk's chain read-only without keys or locks, measure its coverage, and the data of
/// each base that `measured` does not know yet.
fn audit_disk(path: &Path, opts: &OpenOptions, measured: &mut Measured) -> Result<DiskAudit> {
    let chain = Chain::open(path, &KeyRing::default(), opts.clone())?;
    let coverage = Coverage::of(&chain)?;
    let mut layers = Vec::with_capacity(chain.layers().len());
    for (depth, (layer, &provided)) in chain.layers().iter().zip(&coverage.provided).enumerate() {
        let canonical =
            fs::canonicalize(layer.path()).unwrap_or_else(|_| layer.path().to_path_buf());
        let allocated = match (depth, measured.get(&canonical)) {
            (0, _) => None,
            (_, Some(&known)) => known,
            (_, None) => {
                let bytes = allocated_bytes(layer)?;
                measured.insert(canonical.clone(), bytes);
                bytes
            }
        };
        layers.push(LayerRow {
            path: layer.path().to_path_buf(),
            canonical,
            format: layer.format(),
            encryption: layer.encryption(),
            provided,
            allocated,
        });
    }
    Ok(DiskAudit {
        virtual_size: chain.size(),
        layers,
        coverage,
    })
}

/// Count `disk` as an instance of every layer below its top.
fn add_bases(bases: &mut BTreeMap<PathBuf, BaseRow>, path: &Path, disk: &DiskAudit) {
    for layer in disk.layers.iter().skip(1) {
        let base = bases
            .entry(layer.canonical.clone())
            .or_insert_with(|| BaseRow {
                path: layer.canonical.clone(),
                format: layer.format,
                encryption: layer.encryption,
                allocated: None,
                instances: Vec::new(),
                encrypted_instances: 0,
                provided: 0,
            });
        if base.allocated.is_none() {
            base.allocated = layer.allocated;
        }
        base.instances.push(path.to_path_buf());
        base.encrypted_instances += usize::from(disk.encrypted());
        base.provided = base.provided.saturating_add(layer.provided);
    }
}

/// One line for a disk's row: the problem (the row names the disk; another file is named).
fn row_error(disk: &Path, e: &Error) -> String {
    let text = if e.path == disk || e.path.as_os_str().is_empty() {
        e.problem.to_string()
    } else {
        e.to_string()
    };
    text.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(path: &str, encryption: Encryption, provided: u64, allocated: u64) -> LayerRow {
        LayerRow {
            path: PathBuf::from(path),
            canonical: PathBuf::from(path),
            format: if path.ends_with("disk") {
                "qcow2"
            } else {
                "raw"
            },
            encryption,
            provided,
            allocated: Some(allocated),
        }
    }

    fn disk(layers: Vec<LayerRow>) -> DiskAudit {
        let provided: Vec<u64> = layers.iter().map(|l| l.provided).collect();
        let unencrypted_bytes = layers
            .iter()
            .filter(|l| l.encryption == Encryption::None)
            .map(|l| l.provided)
            .sum();
        DiskAudit {
            virtual_size: 1 << 30,
            coverage: Coverage {
                data_bytes: provided.iter().sum(),
                provided,
                unencrypted_bytes,
            },
            layers,
        }
    }

    #[test]
    fn a_base_counts_each_instance_once_and_keeps_the_first_measure_of_its_data() {
        let mut bases = BTreeMap::new();
        let a = disk(vec![
            layer("/i/a/disk", Encryption::Aes, 10, 10),
            layer("/i/_base/b", Encryption::None, 90, 100),
        ]);
        let mut b = disk(vec![
            layer("/i/b/disk", Encryption::None, 5, 5),
            layer("/i/_base/b", Encryption::None, 95, 0),
        ]);
        b.layers[1].allocated = None;
        add_bases(&mut bases, Path::new("/i/a/disk"), &a);
        add_bases(&mut bases, Path::new("/i/b/disk"), &b);
        let base = &bases[Path::new("/i/_base/b")];
        assert_eq!(base.instances.len(), 2);
        assert_eq!(base.encrypted_instances, 1);
        assert_eq!(base.plaintext_bytes(), 100);
        assert_eq!(base.provided, 185);
        assert_eq!(a.plaintext_base_bytes(), 90);
        assert_eq!(b.plaintext_base_bytes(), 95);
    }

    #[test]
    fn an_encrypted_base_holds_no_plaintext() {
        let base = BaseRow {
            path: PathBuf::from("/i/_base/enc"),
            format: "qcow2",
            encryption: Encryption::Luks,
            allocated: Some(4096),
            instances: vec![],
            encrypted_instances: 0,
            provided: 0,
        };
        assert_eq!(base.plaintext_bytes(), 0);
    }
}
