//! Finding a host's instance disks and measuring each one: nova's `DIR/*/disk` (one level down,
//! `_base` skipped, links inside DIR not followed) and image files named directly; per disk its
//! chain and encryption coverage (`info`'s computation), per base image the instances on it.
//!
//! Disks are opened one at a time and closed before the next, so time and memory are those of
//! one `qcowfs info` per disk: the coverage walk maps extents and holds O(layers), whatever the
//! virtual size. A base is measured once, with the first disk that reaches it.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::ErrorKind;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use crate::chain::{Chain, KeyRing, OpenOptions};
use crate::cmd::info::{allocated_bytes, Coverage};
use crate::error::{Error, Problem, Result};
use crate::qcow2::Encryption;

/// Nova's folder of base images beside the instance folders; never an instance itself.
const BASE_FOLDER: &str = "_base";
/// The name of an instance's root disk in its folder.
const DISK_NAME: &str = "disk";

const LINKED_DISK: &str = "is a symbolic link; audit does not follow links inside an instance \
                           folder (name the image as an argument to audit it)";
const LINKED_FOLDER: &str = "lies in a linked instance folder; audit does not follow links \
                             inside DIR (name the image as an argument to audit it)";

/// A disk to audit, or one found but refused before opening it (with the reason).
#[derive(Debug)]
pub(crate) struct Candidate {
    pub path: PathBuf,
    pub refused: Option<String>,
}

/// What discovery found: the disks in order, and paths that could not be searched at all.
#[derive(Debug, Default)]
pub(crate) struct Found {
    pub disks: Vec<Candidate>,
    pub problems: Vec<Error>,
    /// Disks already listed, by canonical path (a disk named twice is audited once).
    seen: HashSet<PathBuf>,
}

impl Found {
    fn add(&mut self, path: PathBuf, refused: Option<String>) {
        // A refused link is known by its own name: following it to dedupe would be following it.
        let key = match refused {
            Some(_) => path.clone(),
            None => fs::canonicalize(&path).unwrap_or_else(|_| path.clone()),
        };
        if self.seen.insert(key) {
            self.disks.push(Candidate { path, refused });
        }
    }
}

/// The disks named by `paths`: a folder is searched for `*/disk`, anything else is a disk.
pub(crate) fn discover(paths: &[PathBuf]) -> Found {
    let mut found = Found::default();
    for path in paths {
        // The paths the user names are followed (/var/lib/nova/instances is often a link).
        match fs::metadata(path) {
            Err(e) => found.problems.push(Error::new(path, e)),
            Ok(meta) if meta.is_dir() => search_folder(path, &mut found),
            Ok(_) => found.add(path.clone(), None),
        }
    }
    found
}

/// `dir/*/disk`, in name order; `_base` skipped; entries without a `disk` ignored.
fn search_folder(dir: &Path, found: &mut Found) {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => return found.problems.push(Error::new(dir, e)),
    };
    let mut listed = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => listed.push(entry),
            Err(e) => found.problems.push(Error::new(dir, e)),
        }
    }
    listed.sort_by_key(|e| e.file_name());
    for entry in listed {
        if entry.file_name() == BASE_FOLDER {
            continue;
        }
        let disk = entry.path().join(DISK_NAME);
        let kind = match entry.file_type() {
            Ok(kind) => kind,
            Err(e) => {
                found.problems.push(Error::new(entry.path(), e));
                continue;
            }
        };
        if kind.is_dir() {
            match fs::symlink_metadata(&disk) {
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => found.add(disk, Some(e.to_string())),
                Ok(meta) if meta.file_type().is_symlink() => {
                    found.add(disk, Some(LINKED_DISK.to_string()))
                }
                Ok(_) => found.add(disk, None),
            }
        } else if kind.is_symlink() && fs::symlink_metadata(&disk).is_ok() {
            // Not followed, but not silently passed over either when it leads to a disk.
            found.add(disk, Some(LINKED_FOLDER.to_string()));
        }
    }
}

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

/// Audit every candidate, one at a time.
pub(crate) fn audit(candidates: Vec<Candidate>, opts: &OpenOptions) -> Audit {
    let mut bases: BTreeMap<PathBuf, BaseRow> = BTreeMap::new();
    let mut disks = Vec::new();
    for Candidate { path, refused } in candidates {
        let result = match refused {
            Some(why) => Err(why),
            None => audit_guarded(&path, opts, &|base| {
                bases.get(base).is_some_and(|b| b.allocated.is_some())
            }),
        };
        if let Ok(disk) = &result {
            add_bases(&mut bases, &path, disk);
        }
        disks.push(DiskRow { path, result });
    }
    Audit {
        disks,
        bases: bases.into_values().collect(),
    }
}

/// `audit_disk`, with its error as the row's one line. A panic (a bug: none is expected) is
/// caught and becomes that disk's row, so one disk cannot end the audit of the others.
fn audit_guarded(
    path: &Path,
    opts: &OpenOptions,
    measured: &dyn Fn(&Path) -> bool,
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

/// Open the disk's chain read-only without keys, measure its coverage, and the data of each base
/// that `measured` does not know yet.
fn audit_disk(
    path: &Path,
    opts: &OpenOptions,
    measured: &dyn Fn(&Path) -> bool,
) -> Result<DiskAudit> {
    let chain = Chain::open(path, &KeyRing::default(), opts.clone())?;
    let coverage = Coverage::of(&chain)?;
    let mut layers = Vec::with_capacity(chain.layers().len());
    for (depth, (layer, &provided)) in chain.layers().iter().zip(&coverage.provided).enumerate() {
        let canonical =
            fs::canonicalize(layer.path()).unwrap_or_else(|_| layer.path().to_path_buf());
        let allocated = match depth > 0 && !measured(&canonical) {
            true => allocated_bytes(layer)?,
            false => None,
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

/// One line for a disk's row: the problem (the row names the disk; another file is named), with
/// the way round a lock.
fn row_error(disk: &Path, e: &Error) -> String {
    let text = if e.path == disk || e.path.as_os_str().is_empty() {
        e.problem.to_string()
    } else {
        e.to_string()
    };
    let text = text.replace(['\n', '\r'], " ");
    match e.problem {
        Problem::Locked(_) => format!("{text} (--force-share audits it without locks)"),
        _ => text,
    }
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

    #[test]
    fn discovery_skips_base_and_folders_without_a_disk_and_names_a_linked_disk() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for sub in ["_base", "b-inst", "a-inst", "locks", "linked"] {
            fs::create_dir(root.join(sub)).unwrap();
        }
        fs::write(root.join("_base/disk"), b"not an instance").unwrap();
        fs::write(root.join("a-inst/disk"), b"x").unwrap();
        fs::write(root.join("b-inst/disk"), b"y").unwrap();
        fs::write(root.join("compute_nodes"), b"host").unwrap();
        std::os::unix::fs::symlink(root.join("a-inst/disk"), root.join("linked/disk")).unwrap();
        std::os::unix::fs::symlink(root.join("b-inst"), root.join("z-link")).unwrap();
        let found = discover(&[root.to_path_buf(), root.join("a-inst/disk")]);
        let names: Vec<(String, bool)> = found
            .disks
            .iter()
            .map(|c| {
                let rel = c.path.strip_prefix(root).unwrap().display().to_string();
                (rel, c.refused.is_some())
            })
            .collect();
        assert_eq!(
            names,
            [
                ("a-inst/disk".to_string(), false),
                ("b-inst/disk".to_string(), false),
                ("linked/disk".to_string(), true),
                ("z-link/disk".to_string(), true),
            ]
        );
        assert!(found.problems.is_empty(), "{:?}", found.problems);
        let missing = discover(&[root.join("nowhere")]);
        assert!(missing.disks.is_empty());
        assert_eq!(missing.problems.len(), 1);
    }
}
